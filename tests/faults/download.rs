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
