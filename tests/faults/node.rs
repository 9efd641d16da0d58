//! A node agent stopped (SIGTERM) and started again: its files go unknown while it is away, then
//! back to ready by verification, without being downloaded again.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use crate::checks::*;
use crate::images::sha512;
use crate::procs::Cluster;
use crate::throttle::ImageServer;

/// The state and message of the image's one file.
async fn only_file(http: &str, name: &str) -> Option<(String, String)> {
    let v = image(http, name).await?;
    let f = files(&v);
    (f.len() == 1).then(|| (f[0].1.clone(), f[0].2.clone()))
}

#[tokio::test]
async fn a_stopped_node_goes_unknown_then_ready_by_verification_not_by_a_new_download() {
    let mut c = Cluster::start(2).await;
    let raw = crate::kit::noise(8 << 20, 5);
    let want = sha512(&raw);
    let server = ImageServer::start([("img.raw".to_string(), raw)].into()).await;
    let expected = [("bi-away", want.as_str())];
    let watch = Watch::start(&c.http, &c.disks(), &expected);
    create_image(
        &c.http,
        "bi-away",
        "download",
        serde_json::json!({ "url": server.url("img.raw") }),
    )
    .await;
    let all = settle(&c.http, &c.disks(), &expected, || c.logs()).await;
    let holder = all[0]["status"]["diskFileStatusMap"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()["nodeId"]
        .as_str()
        .unwrap()
        .to_string();
    let i = c.node_index(&holder);
    let (_, path) = backing_files(&c.nodes[i].disk).remove(0);
    let inode = std::fs::metadata(&path).unwrap().ino();
    assert_eq!(server.hits("img.raw"), 1);

    c.nodes[i].proc.stop();
    let limit = Duration::from_secs(30);
    let (_, msg) = wait_for(
        "the file to go unknown",
        limit,
        || c.logs(),
        || async {
            only_file(&c.http, "bi-away")
                .await
                .filter(|(s, _)| s == "unknown")
        },
    )
    .await;
    assert!(msg.contains("down"), "{msg}");
    c.nodes[i].proc.start();
    c.wait_up(2).await;
    let (_, msg) = wait_for(
        "the file to be ready again",
        limit,
        || c.logs(),
        || async {
            only_file(&c.http, "bi-away")
                .await
                .filter(|(s, _)| s == "ready")
        },
    )
    .await;
    assert!(msg.contains("verified"), "{msg}");
    settle(&c.http, &c.disks(), &expected, || c.logs()).await;
    assert_eq!(
        server.hits("img.raw"),
        1,
        "the returning node's file is reused, not downloaded again"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().ino(),
        inode,
        "the same file"
    );
    watch.finish().await;
}
