//! A disk that fills up: a 48 MiB ext4 filesystem on a loop device is bicsi's only disk, and
//! images larger than it are downloaded and uploaded to it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::checks::*;
use crate::harness::root_or_skip;
use crate::images::sha512;
use crate::kit::{LoopFs, run};
use crate::procs::Serve;
use crate::throttle::ImageServer;

const MIB: usize = 1 << 20;

/// A small filesystem on a loop device over a sparse file in a temp dir, mounted at `mnt`
/// (`kit::LoopFs`): swept, unmounted and detached when dropped, whatever happened.
pub struct SmallDisk {
    fs: LoopFs,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for SmallDisk {
    type Target = LoopFs;
    fn deref(&self) -> &LoopFs {
        &self.fs
    }
}

impl SmallDisk {
    /// An ext4 disk of `mib` MiB.
    pub fn new(mib: u64) -> SmallDisk {
        SmallDisk::made_with(mib, LoopFs::ext4)
    }

    /// An XFS disk that shares blocks, as the loop and mirror engines want (300 MiB at least).
    pub fn xfs(mib: u64) -> SmallDisk {
        SmallDisk::made_with(mib, LoopFs::xfs)
    }

    fn made_with(mib: u64, make: fn(&Path, &Path, u64) -> Result<LoopFs, String>) -> SmallDisk {
        let tmp = tempfile::Builder::new()
            .prefix("bicsi-faults-disk-")
            .tempdir()
            .unwrap();
        let dir = tmp.path();
        let fs = make(&dir.join("small-disk.img"), &dir.join("small"), mib << 20).unwrap();
        SmallDisk { fs, _dir: tmp }
    }

    /// Leaves about `free_mib` MiB free, with a filler file.
    pub fn fill_to(&self, free_mib: u64) {
        let st = nix::sys::statvfs::statvfs(&self.mnt).unwrap();
        let avail = st.blocks_available() * st.fragment_size();
        let len = avail.saturating_sub(free_mib << 20);
        run(Command::new("fallocate")
            .args(["-l", &len.to_string()])
            .arg(self.mnt.join("filler")));
    }
}

/// The small disk, bicsi serving on it, and an image of 64 MiB (larger than the disk) and one
/// of 4 MiB, served over HTTP.
struct Setup {
    b: Serve,
    server: ImageServer,
    big: Vec<u8>,
    want_fits: String,
    disk: PathBuf,
    _dir: tempfile::TempDir,
    // Dropped last: bicsi is stopped before its disk is unmounted.
    _small: SmallDisk,
}

async fn setup() -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("bicsi-faults-")
        .tempdir()
        .unwrap();
    let small = SmallDisk::new(48);
    let disk = small.mnt.join("bicsi");
    let big = crate::kit::noise(64 * MIB, 6);
    let fits = crate::kit::noise(4 * MIB, 7);
    let want_fits = sha512(&fits);
    let server = ImageServer::start(
        [
            ("big.raw".to_string(), big.clone()),
            ("fits.raw".to_string(), fits),
        ]
        .into(),
    )
    .await;
    let b = Serve::start(dir.path(), vec![disk.clone()]).await;
    Setup {
        b,
        server,
        big,
        want_fits,
        disk,
        _dir: dir,
        _small: small,
    }
}

/// bicsi serves on and the space is free again: an image that fits becomes ready on the disk.
async fn an_image_that_fits_becomes_ready(s: &mut Setup) {
    let b = &mut s.b;
    b.proc.assert_alive();
    create_image(
        &b.http,
        "bi-fits",
        "download",
        serde_json::json!({ "url": s.server.url("fits.raw") }),
    )
    .await;
    wait_for(
        "bi-fits ready",
        Duration::from_secs(30),
        || b.log(),
        || async {
            let v = image(&b.http, "bi-fits").await?;
            files(&v)
                .iter()
                .any(|(_, st, _)| st == "ready")
                .then_some(())
        },
    )
    .await;
    settle(&b.http, &b.disks, &[("bi-fits", &s.want_fits)], || b.log()).await;
}

#[tokio::test]
async fn a_download_larger_than_its_disk_fails_saying_so_and_leaves_no_temp_file() {
    if !root_or_skip("a_download_larger_than_its_disk_fails_saying_so") {
        return;
    }
    let mut s = setup().await;
    let watch = Watch::start(&s.b.http, &s.b.disks, &[("bi-fits", &s.want_fits)]);
    create_image(
        &s.b.http,
        "bi-big",
        "download",
        serde_json::json!({ "url": s.server.url("big.raw") }),
    )
    .await;
    let b = &s.b;
    let all = settle(&b.http, &b.disks, &[], || b.log()).await;
    let (_, state, message) = files(&all[0]).remove(0);
    assert_eq!(state, "failed", "{:?}", all[0]);
    assert!(
        message.contains("space"),
        "the message names the cause: {message}"
    );
    assert!(backing_files(&s.disk).is_empty());
    // Deleting the image that cannot fit frees its disk for good.
    let (ok, out, err) = s.b.cli(&["delete", "backingimage", "bi-big"]);
    assert!(ok, "stdout: {out}\nstderr: {err}");
    an_image_that_fits_becomes_ready(&mut s).await;
    watch.finish().await;
}

#[tokio::test]
async fn a_download_that_cannot_fit_is_not_retried_in_a_loop() {
    if !root_or_skip("a_download_that_cannot_fit_is_not_retried_in_a_loop") {
        return;
    }
    let s = setup().await;
    let b = &s.b;
    create_image(
        &b.http,
        "bi-big",
        "download",
        serde_json::json!({ "url": s.server.url("big.raw") }),
    )
    .await;
    settle(&b.http, &b.disks, &[], || b.log()).await;
    // Each attempt fills the disk that replicas share, and the failure is not going away: the
    // recovery re-downloads, but not at every lifecycle tick (15 ticks here).
    let before = s.server.hits("big.raw");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = s.server.hits("big.raw") - before;
    assert!(
        again <= 1,
        "{again} downloads of an image that cannot fit in 3 s:\n{}",
        b.log()
    );
}

#[tokio::test]
async fn an_upload_larger_than_its_disk_fails_saying_so_and_leaves_no_temp_file() {
    if !root_or_skip("an_upload_larger_than_its_disk_fails_saying_so") {
        return;
    }
    upload_too_large(false).await;
}

#[tokio::test]
async fn an_upload_larger_than_its_disk_keeps_its_cause_once_called_unrecoverable() {
    if !root_or_skip("an_upload_larger_than_its_disk_keeps_its_cause") {
        return;
    }
    upload_too_large(true).await;
}

/// An upload larger than the disk; with `keep_cause`, the message must still name the cause
/// once recovery has called the upload unrecoverable.
async fn upload_too_large(keep_cause: bool) {
    let mut s = setup().await;
    let watch = Watch::start(&s.b.http, &s.b.disks, &[("bi-fits", &s.want_fits)]);
    let b = &s.b;
    create_image(&b.http, "bi-big-up", "upload", serde_json::json!({})).await;
    // Its length unknown in advance (a chunked body): bicsi finds out by filling the disk.
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = s
        .big
        .chunks(MIB)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/backingimages/bi-big-up/file", b.http))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await;
    // The client hears why, unless bicsi closed the connection while the body still flowed.
    if let Ok(r) = resp {
        assert!(
            !r.status().is_success(),
            "an upload larger than the disk succeeded"
        );
        let text = r.text().await.unwrap();
        assert!(text.contains("space"), "{text}");
    }
    // The image says why too, also once recovery has said that it cannot re-upload it.
    let all = settle(&b.http, &b.disks, &[], || b.log()).await;
    let (_, state, message) = files(&all[0]).remove(0);
    assert_eq!(state, "failed", "{:?}", all[0]);
    assert!(
        message.contains("space"),
        "the message names the cause: {message}"
    );
    if keep_cause {
        let message = wait_for(
            "recovery to say the upload cannot be recovered",
            Duration::from_secs(30),
            || b.log(),
            || async {
                let v = image(&b.http, "bi-big-up").await?;
                let (_, _, m) = files(&v).pop()?;
                m.contains("cannot be recovered").then_some(m)
            },
        )
        .await;
        assert!(
            message.contains("space"),
            "the cause is kept beside what to do: {message}"
        );
    }
    assert!(backing_files(&s.disk).is_empty());
    an_image_that_fits_becomes_ready(&mut s).await;
    watch.finish().await;
}

/// An upload whose Content-Length is more than the disk's free space is refused before a byte
/// of it is read or written (issue 19): the answer comes while the client has sent no byte of
/// the body, names the sizes, and no temp file appears on the disk.
#[tokio::test]
async fn an_upload_announced_larger_than_the_free_space_is_refused_before_writing() {
    if !root_or_skip("an_upload_announced_larger_than_the_free_space") {
        return;
    }
    let s = setup().await;
    let b = &s.b;
    create_image(&b.http, "bi-announced", "upload", serde_json::json!({})).await;
    // A body that never sends a byte: only the announced length can have it refused.
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<bytes::Bytes, std::io::Error>>();
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        reqwest::Client::new()
            .put(format!("{}/v1/backingimages/bi-announced/file", b.http))
            .header(reqwest::header::CONTENT_LENGTH, 64 * MIB)
            .body(reqwest::Body::wrap_stream(rx))
            .send(),
    )
    .await
    .expect("bicsi waited for the body instead of refusing its announced length")
    .expect("an answer");
    assert_eq!(resp.status().as_u16(), 507, "ResourceExhausted");
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("the upload is") && text.contains("free"),
        "{text}"
    );
    drop(tx);
    let tmp = s.disk.join("tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "temp files: {left:?}");
    assert!(backing_files(&s.disk).is_empty());
}
