//! Ready files that change under bicsi: bytes flipped (found by the periodic scrub, and by the
//! start-up verification), a file deleted while bicsi was down, and every file corrupt at once.
//! Each is marked failed and recovered (from the other ready file, or by downloading again) and
//! ends ready with the image's SHA-512.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bicsi::client::CsiClient;

use crate::checks::*;
use crate::harness::{MIB, cpublish_req, create_req, mount_cap};
use crate::images::{create_retrying, sha512};
use crate::procs::Serve;
use crate::throttle::ImageServer;

/// Flips one byte of `path` in place (same inode, same size).
fn flip_byte(path: &Path, at: u64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x5a;
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
}

fn the_file(disk: &Path) -> PathBuf {
    let mut f = backing_files(disk);
    assert_eq!(f.len(), 1, "{}: {f:?}", disk.display());
    f.remove(0).1
}

/// Waits until the file on `disk` is ready with the right bytes again: the changed or missing
/// one was detected, failed and replaced (only a replacement can bring the bytes back; inode
/// numbers are no proof, the filesystem reuses them).
async fn wait_replaced(b: &Serve, disk: &Path, want: &str) {
    let id = disk_id(disk);
    wait_for(
        "the changed file to be replaced",
        Duration::from_secs(60),
        || format!("{:?}\n{}", backing_files(disk), b.log()),
        || async {
            let v = image(&b.http, "bi-scrub").await?;
            let ready = files(&v).iter().any(|(d, s, _)| *d == id && s == "ready");
            let (_, path) = backing_files(disk).pop()?;
            (ready && sha512_file(&path).as_deref() == Some(want)).then_some(())
        },
    )
    .await
}

#[tokio::test]
async fn changed_and_missing_ready_files_are_detected_failed_and_recovered() {
    let dir = tempfile::Builder::new()
        .prefix("bicsi-faults-")
        .tempdir()
        .unwrap();
    let raw = crate::kit::noise(8 << 20, 8);
    let want = sha512(&raw);
    let server = ImageServer::start([("img.raw".to_string(), raw)].into()).await;
    let disks = vec![dir.path().join("disk-a"), dir.path().join("disk-b")];
    let mut b = Serve::start(dir.path(), disks.clone()).await;
    let expected = [("bi-scrub", want.as_str())];

    // Two ready files: a two-replica volume, attached, brings the image to both disks.
    let mut csi = CsiClient::connect(&b.endpoint).await.unwrap();
    let req = create_req(
        "vol-scrub",
        8 * MIB,
        &[
            ("numberOfReplicas", "2"),
            ("backingImage", "bi-scrub"),
            ("backingImageDataSourceType", "download"),
            (
                "backingImageDataSourceParameters",
                &format!("{{\"url\": \"{}\"}}", server.url("img.raw")),
            ),
        ],
    );
    create_retrying(&mut csi, req).await.unwrap();
    let mut publish = cpublish_req("vol-scrub", mount_cap(), false);
    publish.node_id = "fault-node".into();
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = csi
        .controller
        .controller_publish_volume(publish.clone())
        .await
    {
        assert!(Instant::now() < deadline, "attach: {e:?}\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settle(&b.http, &disks, &expected, || b.log()).await;
    let (a, bb) = (disks[0].clone(), disks[1].clone());
    assert_eq!(server.hits("img.raw"), 1);

    // 1. Bytes flipped in a ready file; the scrub (every second) finds it.
    let (ok, out, err) = b.cli(&["set", "setting", "backing-image-scrub-interval", "1"]);
    assert!(ok, "stdout: {out}\nstderr: {err}");
    flip_byte(&the_file(&a), 4 << 20);
    wait_replaced(&b, &a, &want).await;
    let log = b.log();
    assert!(
        log.lines()
            .any(|l| l.contains("scrub found a changed file") && l.contains(&disk_id(&a))),
        "the scrub names the disk:\n{log}"
    );
    settle(&b.http, &disks, &expected, || b.log()).await;
    let (ok, out, err) = b.cli(&["set", "setting", "backing-image-scrub-interval", "0"]);
    assert!(ok, "stdout: {out}\nstderr: {err}");

    // 2. A ready file deleted while bicsi is down: the start-up verification finds it missing.
    b.kill9();
    std::fs::remove_file(the_file(&bb)).unwrap();
    b.restart().await;
    wait_replaced(&b, &bb, &want).await;
    settle(&b.http, &disks, &expected, || b.log()).await;

    // 3. Bytes flipped in a ready file while bicsi is down: the start-up verification finds it
    //    before the file is used again.
    b.kill9();
    flip_byte(&the_file(&a), 12345);
    b.restart().await;
    wait_replaced(&b, &a, &want).await;
    settle(&b.http, &disks, &expected, || b.log()).await;
    assert_eq!(
        server.hits("img.raw"),
        1,
        "recovered from the other ready file, not downloaded again"
    );

    // 4. Every file corrupt: nothing to copy from, so the image is downloaded again.
    b.kill9();
    flip_byte(&the_file(&a), 777);
    flip_byte(&the_file(&bb), 777);
    b.restart().await;
    wait_replaced(&b, &a, &want).await;
    wait_replaced(&b, &bb, &want).await;
    settle(&b.http, &disks, &expected, || b.log()).await;
    assert_eq!(server.hits("img.raw"), 2, "downloaded once more");
}
