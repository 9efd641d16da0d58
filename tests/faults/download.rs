//! `kill -9` of bicsi while it downloads an image's first file, twice, then a restart.

use crate::checks::*;
use crate::images::sha512;
use crate::procs::Serve;
use crate::throttle::ImageServer;

const MIB: usize = 1 << 20;

#[tokio::test]
async fn kill9_during_a_download_never_readies_partial_bytes_and_the_download_restarts() {
    let dir = tempfile::Builder::new()
        .prefix("bicsi-faults-")
        .tempdir()
        .unwrap();
    let raw = random_image(24 * MIB, 1);
    let want = sha512(&raw);
    let server = ImageServer::start([("img.raw".to_string(), raw)].into()).await;
    // 24 MiB at 6 MiB/s: about four seconds, long enough to be cut off.
    server.set_rate(6 * MIB as u64);
    let disk = dir.path().join("disk");
    let mut b = Serve::start(dir.path(), vec![disk.clone()]).await;
    let watch = Watch::start(&b.http, &b.disks, &[("bi-kill", &want)]);
    // No checksum given: the first ready file fixes it, so a half-written file that became
    // ready would make the image's checksum wrong for good.
    create_image(
        &b.http,
        "bi-kill",
        "download",
        serde_json::json!({ "url": server.url("img.raw") }),
    )
    .await;
    for cut in [3 * MIB as u64, MIB as u64] {
        wait_part(&disk, cut, || b.log()).await;
        b.kill9();
        assert!(
            backing_files(&disk).is_empty(),
            "a partial download outside tmp/: {:?}",
            backing_files(&disk)
        );
        b.restart().await;
        // Started again: not ready, and not stuck in what it was doing when killed.
        let v = image(&b.http, "bi-kill").await.unwrap();
        assert!(
            files(&v).iter().all(|(_, s, _)| s != "ready"),
            "ready right after a restart: {v}"
        );
    }
    server.set_rate(0);
    wait_ready_without_failing(&b.http, "bi-kill", || b.log()).await;
    let all = settle(&b.http, &b.disks, &[("bi-kill", &want)], || b.log()).await;
    let v = all
        .iter()
        .find(|v| v["metadata"]["name"] == "bi-kill")
        .unwrap();
    let f = files(v);
    assert_eq!(f.len(), 1, "{v}");
    assert_eq!(f[0].1, "ready", "{v}");
    assert!(
        server.hits("img.raw") >= 3,
        "each restart downloads again: {} requests",
        server.hits("img.raw")
    );
    watch.finish().await;
}

/// The first file downloads on a node agent of a cluster; the agent is killed mid-download and
/// started again.
#[tokio::test]
async fn kill9_of_a_node_agent_during_a_download_restarts_it() {
    let mut c = crate::procs::Cluster::start(1).await;
    let raw = random_image(16 * MIB, 9);
    let want = sha512(&raw);
    let server = ImageServer::start([("img.raw".to_string(), raw)].into()).await;
    server.set_rate(4 * MIB as u64);
    let disk = c.nodes[0].disk.clone();
    let expected = [("bi-node", want.as_str())];
    let watch = Watch::start(&c.http, &c.disks(), &expected);
    create_image(
        &c.http,
        "bi-node",
        "download",
        serde_json::json!({ "url": server.url("img.raw") }),
    )
    .await;
    wait_part(&disk, 2 * MIB as u64, || c.logs()).await;
    c.nodes[0].proc.kill9();
    assert!(backing_files(&disk).is_empty());
    server.set_rate(0);
    c.nodes[0].proc.start();
    c.wait_up(1).await;
    wait_ready_without_failing(&c.http, "bi-node", || c.logs()).await;
    assert!(server.hits("img.raw") >= 2, "the download started again");
    settle(&c.http, &c.disks(), &expected, || c.logs()).await;
    watch.finish().await;
}

/// The controller is killed while a node agent downloads, and comes back after the download
/// has ended on the node: the file must not stay in progress in the controller's records.
#[tokio::test]
async fn kill9_of_the_controller_during_a_download_does_not_leave_the_file_in_progress() {
    let mut c = crate::procs::Cluster::start(1).await;
    let raw = random_image(16 * MIB, 10);
    let want = sha512(&raw);
    let server = ImageServer::start([("img.raw".to_string(), raw)].into()).await;
    server.set_rate(4 * MIB as u64);
    let disk = c.nodes[0].disk.clone();
    let expected = [("bi-ctl", want.as_str())];
    let watch = Watch::start(&c.http, &c.disks(), &expected);
    create_image(
        &c.http,
        "bi-ctl",
        "download",
        serde_json::json!({ "url": server.url("img.raw") }),
    )
    .await;
    wait_part(&disk, 2 * MIB as u64, || c.logs()).await;
    c.controller.kill9();
    server.set_rate(0);
    wait_for(
        "the node's download to end",
        std::time::Duration::from_secs(30),
        || c.logs(),
        || async {
            c.nodes[0]
                .proc
                .log()
                .contains("download done")
                .then_some(())
        },
    )
    .await;
    c.controller.start();
    c.wait_up(1).await;
    settle(&c.http, &c.disks(), &expected, || c.logs()).await;
    watch.finish().await;
}
