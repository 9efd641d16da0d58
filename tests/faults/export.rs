//! `kill -9` of bicsi while it exports a volume as a backing image: the export starts again after
//! the restart and ends ready with the volume's content.

use std::time::{Duration, Instant};

use crate::checks::*;
use crate::harness::create_req;
use crate::images::{create_retrying, sha512};
use crate::procs::Serve;

const MIB: usize = 1 << 20;

#[tokio::test]
async fn kill9_during_an_export_restarts_it_and_it_ends_ready_with_the_volume_content() {
    export_killed(false).await;
}

#[tokio::test]
async fn kill9_during_an_export_restarts_it_without_failing_on_its_own_temp_file() {
    export_killed(true).await;
}

/// Kills bicsi while it exports a volume; with `strict`, the restarted export must not fail on
/// the way to ready (without, recovery may retry it).
async fn export_killed(strict: bool) {
    let dir = tempfile::Builder::new()
        .prefix("bicsi-faults-")
        .tempdir()
        .unwrap();
    // The volume is an overlay on this image with nothing written: a raw export of a volume of
    // the image's size is the image, byte for byte.
    let raw = crate::kit::noise(96 * MIB, 3);
    let want = sha512(&raw);
    let server = crate::throttle::ImageServer::start([("src.raw".to_string(), raw)].into()).await;
    let disk = dir.path().join("disk");
    let mut b = Serve::start(dir.path(), vec![disk.clone()]).await;
    let mut csi = bicsi::client::CsiClient::connect(&b.endpoint)
        .await
        .unwrap();
    create_retrying(
        &mut csi,
        create_req(
            "vol-src",
            96 * MIB as i64,
            &[
                ("numberOfReplicas", "1"),
                ("backingImage", "bi-src"),
                ("backingImageDataSourceType", "download"),
                (
                    "backingImageDataSourceParameters",
                    &format!("{{\"url\": \"{}\"}}", server.url("src.raw")),
                ),
            ],
        ),
    )
    .await
    .unwrap();
    // CreateVolume does not wait for the first file; the export is timed from its own start.
    wait_ready_without_failing(&b.http, "bi-src", || b.log()).await;
    let expected = [("bi-src", want.as_str()), ("bi-export", want.as_str())];
    let watch = Watch::start(&b.http, &b.disks, &expected);
    create_image(
        &b.http,
        "bi-export",
        "export-from-volume",
        serde_json::json!({ "volume-name": "vol-src", "export-type": "raw" }),
    )
    .await;
    // The export writes its temp file: kill as soon as it has data.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let grown = std::fs::read_dir(disk.join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.file_name().to_string_lossy().starts_with("bi-export-")
                    && e.metadata().is_ok_and(|m| m.len() > 0)
            });
        if grown {
            break;
        }
        assert!(Instant::now() < deadline, "no export started:\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    b.kill9();
    let killed_at = bicsi::model::now_secs();
    assert!(
        backing_files(&disk)
            .iter()
            .all(|(d, _)| !d.starts_with("bi-export-")),
        "a file outside tmp/ right after the kill: either a partial export escaped tmp/, or the \
         export had finished and the kill tested nothing"
    );
    b.restart().await;
    // Nothing partial is called ready: a file ready by now was exported again after the kill
    // (96 MiB may well be, while the restart waits for bicsi to answer).
    let v = image(&b.http, "bi-export").await.unwrap();
    for f in v["status"]["diskFileStatusMap"]
        .as_object()
        .unwrap()
        .values()
    {
        let since = f["lastStateTransitionTime"].as_str().unwrap_or_default();
        assert!(
            f["state"] != "ready"
                || bicsi::model::parse_rfc3339(since).is_some_and(|t| t >= killed_at),
            "{v}"
        );
    }
    if strict {
        wait_ready_without_failing(&b.http, "bi-export", || b.log()).await;
    }
    let all = settle(&b.http, &b.disks, &expected, || b.log()).await;
    let v = all
        .iter()
        .find(|v| v["metadata"]["name"] == "bi-export")
        .unwrap();
    assert_eq!(files(v)[0].1, "ready", "{v}");
    watch.finish().await;
}
