//! A disk that fills up: a 48 MiB ext4 filesystem on a loop device is bicsi's only disk, and
//! images larger than it are downloaded and uploaded to it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::checks::*;
use crate::harness::root_or_skip;
use crate::images::sha512;
use crate::procs::Serve;
use crate::throttle::ImageServer;

const MIB: usize = 1 << 20;

/// A small ext4 filesystem on a loop device over a sparse file, mounted at `mnt`; unmounted and
/// detached when dropped, whatever happened.
struct SmallDisk {
    mnt: PathBuf,
    dev: String,
    _dir: tempfile::TempDir,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl SmallDisk {
    fn new(mib: u64) -> SmallDisk {
        let tmp = tempfile::Builder::new()
            .prefix("bicsi-faults-disk-")
            .tempdir()
            .unwrap();
        let dir = tmp.path();
        let file = dir.join("small-disk.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&file));
        let dev = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&file));
        let mnt = dir.join("small");
        std::fs::create_dir_all(&mnt).unwrap();
        let d = SmallDisk {
            mnt,
            dev,
            _dir: tmp,
        };
        run(Command::new("mount").arg(&d.dev).arg(&d.mnt));
        d
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let quiet = |args: &[&str], path: &Path| {
            Command::new(args[0])
                .args(&args[1..])
                .arg(path)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !quiet(&["umount"], &self.mnt) {
            quiet(&["umount", "-l"], &self.mnt);
        }
        quiet(&["losetup", "-d"], Path::new(&self.dev));
    }
}

#[tokio::test]
async fn a_full_disk_fails_the_file_with_a_space_message_leaves_no_temp_file_and_bicsi_serves_on() {
    if !root_or_skip("a_full_disk_fails_the_file_with_a_space_message") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("bicsi-faults-")
        .tempdir()
        .unwrap();
    let small = SmallDisk::new(48);
    let disk = small.mnt.join("bicsi");
    let big = random_image(64 * MIB, 6);
    let fits = random_image(4 * MIB, 7);
    let want_fits = sha512(&fits);
    let server = ImageServer::start(
        [
            ("big.raw".to_string(), big.clone()),
            ("fits.raw".to_string(), fits),
        ]
        .into(),
    )
    .await;
    let mut b = Serve::start(dir.path(), vec![disk.clone()]).await;
    let watch = Watch::start(&b.http, &b.disks, &[("bi-fits", &want_fits)]);

    // A download larger than the disk.
    create_image(
        &b.http,
        "bi-big",
        "download",
        serde_json::json!({ "url": server.url("big.raw") }),
    )
    .await;
    let all = settle(&b.http, &b.disks, &[], || b.log()).await;
    let (_, state, message) = files(&all[0]).remove(0);
    assert_eq!(state, "failed", "{:?}", all[0]);
    eprintln!("download to a full disk: {message}");
    assert!(
        message.contains("space"),
        "the message names the cause: {message}"
    );
    assert!(backing_files(&disk).is_empty());

    // An upload larger than the disk, its length unknown in advance (a chunked body).
    create_image(&b.http, "bi-big-up", "upload", serde_json::json!({})).await;
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = big
        .chunks(MIB)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/backingimages/bi-big-up/file", b.http))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await;
    if let Ok(r) = resp {
        assert!(
            !r.status().is_success(),
            "an upload larger than the disk succeeded"
        );
        let text = r.text().await.unwrap();
        assert!(text.contains("space"), "{text}");
    }
    let all = settle(&b.http, &b.disks, &[], || b.log()).await;
    let up = all
        .iter()
        .find(|v| v["metadata"]["name"] == "bi-big-up")
        .unwrap();
    let (_, state, message) = files(up).remove(0);
    assert_eq!(state, "failed", "{up}");
    eprintln!("upload to a full disk: {message}");
    assert!(message.contains("space"), "{message}");

    // The space is free again and bicsi serves on: an image that fits becomes ready there.
    b.proc.assert_alive();
    create_image(
        &b.http,
        "bi-fits",
        "download",
        serde_json::json!({ "url": server.url("fits.raw") }),
    )
    .await;
    wait_for(
        "bi-fits ready",
        Duration::from_secs(30),
        || b.log(),
        || async {
            let v = image(&b.http, "bi-fits").await?;
            files(&v).iter().any(|(_, s, _)| s == "ready").then_some(())
        },
    )
    .await;
    settle(&b.http, &b.disks, &[("bi-fits", &want_fits)], || b.log()).await;
    watch.finish().await;
    drop(b);
    drop(small);
}
