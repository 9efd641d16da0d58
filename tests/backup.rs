//! Backups and restores as a person uses them: the real `bicsi serve`, the real CLI, a `file://`
//! backup target in a temporary directory, volumes written through real attaches (loop devices,
//! qemu-storage-daemon, mounts), and the bytes read back after a restore.

#[path = "kit/mod.rs"]
mod kit;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use sha2::Digest;

/// A `bicsi serve` in its own directory, restartable on the same data.
struct Served {
    dir: PathBuf,
    endpoint: String,
    http: String,
    child: Option<Child>,
    starts: u32,
    /// More `bicsi serve` arguments (disks).
    extra: Vec<String>,
}

impl Served {
    fn start(dir: &Path) -> Served {
        Served::start_with(dir, &[])
    }

    fn start_with(dir: &Path, extra: &[&str]) -> Served {
        std::fs::create_dir_all(dir).unwrap();
        let mut s = Served {
            dir: dir.to_path_buf(),
            endpoint: kit::csi_endpoint(dir),
            http: String::new(),
            child: None,
            starts: 0,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        s.launch();
        s
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("bicsi-{}.log", self.starts))
    }

    fn launch(&mut self) {
        self.starts += 1;
        let _ = std::fs::remove_file(self.dir.join("csi.sock"));
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_bicsi"))
            .args([
                "serve",
                "--node-id",
                "bak-node",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--csi-endpoint")
            .arg(&self.endpoint)
            .args(&self.extra)
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            if let Some(addr) = log
                .lines()
                .filter(|l| l.contains("bicsi serving"))
                .find_map(|l| l.split(" http=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                && self.dir.join("csi.sock").exists()
            {
                self.http = format!("http://{addr}");
                return;
            }
            assert!(Instant::now() < deadline, "bicsi did not start: {log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9, then start again on the same data directory.
    fn kill_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.launch();
    }

    fn bicsi(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_bicsi"))
            .args(args)
            .env("BICSI_CSI_ENDPOINT", &self.endpoint)
            .env("BICSI_SERVER", &self.http)
            .env_remove("BICSI_TOKEN")
            .output()
            .unwrap()
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        kit::succeeded(args, self.bicsi(args))
    }

    #[track_caller]
    fn fails(&self, args: &[&str]) -> String {
        kit::failed(args, self.bicsi(args))
    }

    fn backups(&self, volume: &str) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["backup", "list", volume, "-o", "json"])).unwrap()
    }

    fn backup(&self, name: &str) -> serde_json::Value {
        let volume = name.split('-').next().unwrap();
        self.backups(volume)
            .into_iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("no backup {name}"))
    }

    /// Attaches a volume as a block device, runs `f` on the device path, detaches.
    fn with_block(&self, volume: &str, f: impl FnOnce(&Path)) {
        let dev = self.dir.join(format!("dev-{volume}"));
        self.ok(&["volume", "attach", volume, "--block", dev.to_str().unwrap()]);
        f(&dev);
        self.ok(&["volume", "detach", volume]);
    }

    fn with_mount(&self, volume: &str, f: impl FnOnce(&Path)) {
        let mnt = self.dir.join(format!("mnt-{volume}"));
        self.ok(&["volume", "attach", volume, "--mount", mnt.to_str().unwrap()]);
        f(&mnt);
        self.ok(&["volume", "detach", volume]);
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Mounts, loop devices and engines a failed test left under its directory.
        kit::cleanup_under(&self.dir);
    }
}

fn is_root() -> bool {
    kit::root_or_skip("backup tests (they attach volumes)")
}

fn write_at(dev: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn sha_of_device(dev: &Path, len: u64) -> String {
    let mut f = std::fs::File::open(dev).unwrap();
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = buf.len().min(left as usize);
        f.read_exact(&mut buf[..n]).unwrap();
        h.update(&buf[..n]);
        left -= n as u64;
    }
    hex::encode(h.finalize())
}

impl Served {
    /// A `bicsi serve` in a new temp dir whose backup target is a `file://` directory in it:
    /// the temp dir (kept alive by the caller), the serve, and the target directory.
    fn with_file_target() -> (tempfile::TempDir, Served, PathBuf) {
        let base = kit::temp_dir("bicsi-bak-");
        let s = Served::start(&base.path().join("serve"));
        let target = target_dir(base.path());
        set_target(&s, &target);
        (base, s, target)
    }
}

fn target_dir(base: &Path) -> PathBuf {
    let t = base.join("target");
    std::fs::create_dir_all(&t).unwrap();
    t
}

fn set_target(s: &Served, dir: &Path) {
    s.ok(&[
        "set",
        "setting",
        "backup-target",
        &format!("file://{}", dir.display()),
    ]);
}

/// Block files stored in the target for a backup volume, of any compression.
fn stored_blocks(target: &Path, volume: &str) -> usize {
    ["zst", "lz4", "raw"]
        .iter()
        .map(|ext| stored_blocks_as(target, volume, ext))
        .sum()
}

/// Block files stored in the target for a backup volume with the extension `ext` (zst, lz4, raw).
fn stored_blocks_as(target: &Path, volume: &str, ext: &str) -> usize {
    fn walk(p: &Path, ext: &str, n: &mut usize) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), ext, n);
            } else if e.path().extension().is_some_and(|x| x == ext) {
                *n += 1;
            }
        }
    }
    let mut n = 0;
    walk(
        &target.join("backupvolumes").join(volume).join("blocks"),
        ext,
        &mut n,
    );
    n
}

/// A backup's metadata document in a `file://` target.
fn backup_meta(target: &Path, volume: &str, name: &str) -> serde_json::Value {
    let p = target.join(format!("backupvolumes/{volume}/backups/{name}.json"));
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// Files under `dir` whose name ends with `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(files_ending(&p, suffix));
        } else if p.to_string_lossy().ends_with(suffix) {
            out.push(p);
        }
    }
    out
}

const MIB: u64 = 1 << 20;

#[test]
fn block_volume_round_trip_incremental_full_and_delete() {
    if !is_root() {
        return;
    }
    let base = kit::temp_dir("bicsi-bak-");
    let s = Served::start(&base.path().join("serve"));
    let target = target_dir(base.path());

    // No target yet: a clear error that says how to set one.
    s.ok(&[
        "volume",
        "create",
        "web",
        "--size",
        "64Mi",
        "-p",
        "numberOfReplicas=1",
    ]);
    let e = s.fails(&["backup", "create", "web"]);
    assert!(e.contains("bicsi set setting backup-target"), "{e}");
    set_target(&s, &target);

    let first = kit::noise(5 * MIB as usize, 1);
    let second = kit::noise(MIB as usize, 2);
    s.with_block("web", |dev| {
        write_at(dev, 0, &first);
        write_at(dev, 20 * MIB, &second);
    });
    let out = s.ok(&["backup", "create", "web", "--name", "web-b1"]);
    assert!(out.contains("backup web-b1 completed"), "{out}");
    let b1 = s.backup("web-b1");
    assert_eq!(b1["state"], "completed");
    // 5 MiB at 0 touches blocks 0-2, 1 MiB at 20 MiB block 10: four blocks of noise.
    assert_eq!(b1["blocksUploaded"], 4, "{b1}");
    let up1 = b1["bytesUploaded"].as_u64().unwrap();
    assert!(up1 > 6 * MIB && up1 < 8 * MIB + MIB, "{b1}");

    // Incremental: 4 KiB more in a block of its own moves that block only.
    s.with_block("web", |dev| write_at(dev, 40 * MIB, &kit::noise(4096, 3)));
    s.ok(&["backup", "create", "web", "--name", "web-b2"]);
    let b2 = s.backup("web-b2");
    assert_eq!(b2["blocksUploaded"], 1, "{b2}");
    assert!(b2["bytesUploaded"].as_u64().unwrap() < 64 * 1024, "{b2}");
    assert_eq!(stored_blocks(&target, "web"), 5);

    // --full puts every block again.
    s.ok(&["backup", "create", "web", "--name", "web-b3", "--full"]);
    let b3 = s.backup("web-b3");
    assert_eq!(b3["blocksUploaded"], 5, "{b3}");

    let mut expected = String::new();
    s.with_block("web", |dev| expected = sha_of_device(dev, 64 * MIB));
    let out = s.ok(&["backup", "restore", "web-b2", "copy"]);
    assert!(
        out.contains("volume copy restored from backup web-b2"),
        "{out}"
    );
    s.with_block("copy", |dev| {
        assert_eq!(sha_of_device(dev, 64 * MIB), expected)
    });
    // A larger volume from the same backup: the backup's bytes, then zeros.
    s.ok(&["backup", "restore", "web-b2", "bigger", "--size", "96Mi"]);
    let v: serde_json::Value =
        serde_json::from_str(&s.ok(&["get", "volume", "bigger", "-o", "json"])).unwrap();
    assert_eq!(v["capacityBytes"], 96 * MIB, "{v}");
    s.with_block("bigger", |dev| {
        assert_eq!(sha_of_device(dev, 64 * MIB), expected);
        let mut tail = vec![1u8; 4096];
        let mut f = std::fs::File::open(dev).unwrap();
        f.seek(SeekFrom::Start(96 * MIB - 4096)).unwrap();
        f.read_exact(&mut tail).unwrap();
        assert!(tail.iter().all(|&b| b == 0));
    });
    let e = s.fails(&["backup", "restore", "web-b2", "smaller", "--size", "32Mi"]);
    assert!(e.contains("smaller than backup"), "{e}");

    let vols = s.ok(&["get", "backupvolumes"]);
    assert!(vols.contains("web") && vols.contains("web-b3"), "{vols}");

    // Deleting b1 keeps the blocks b2 and b3 use (all of b1's); deleting the rest empties it.
    s.ok(&["backup", "delete", "web-b1"]);
    assert_eq!(stored_blocks(&target, "web"), 5);
    assert!(s.backups("web").iter().all(|b| b["name"] != "web-b1"));
    s.ok(&["backup", "delete", "web-b2"]);
    s.ok(&["backup", "delete", "web-b3"]);
    assert_eq!(stored_blocks(&target, "web"), 0);
    let e = s.fails(&["backup", "restore", "web-b2", "again"]);
    assert!(e.contains("web-b2") && e.contains("not found"), "{e}");
}

/// A raw image holding an ext4 filesystem with `base.bin` (4 MiB of noise) in it.
fn ext4_image(dir: &Path, name: &str, size: &str) -> (PathBuf, Vec<u8>) {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    let base = kit::noise(4 * MIB as usize, 7);
    std::fs::write(src.join("base.bin"), &base).unwrap();
    let img = dir.join(format!("{name}.raw"));
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img)
        .arg(size)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    (img, base)
}

#[test]
fn filesystem_volume_over_an_image_restores_in_a_second_serve_and_over_an_override() {
    if !is_root() {
        return;
    }
    let base_dir = kit::temp_dir("bicsi-bak-");
    let target = target_dir(base_dir.path());
    let (img, base) = ext4_image(base_dir.path(), "img", "48M");

    let a = Served::start(&base_dir.path().join("a"));
    set_target(&a, &target);
    a.ok(&["image", "upload", "img", img.to_str().unwrap()]);
    a.ok(&[
        "volume",
        "create",
        "vm",
        "--size",
        "64Mi",
        "-p",
        "numberOfReplicas=1",
        "-p",
        "backingImage=img",
    ]);
    let new = kit::noise(3 * MIB as usize, 8);
    a.with_mount("vm", |m| {
        assert_eq!(std::fs::read(m.join("base.bin")).unwrap(), base);
        std::fs::write(m.join("new.bin"), &new).unwrap();
    });
    a.ok(&["backup", "create", "vm", "--name", "vm-b1"]);
    let b1 = a.backup("vm-b1");
    assert_eq!(b1["backingImage"], "img", "{b1}");
    // The image's 4 MiB of noise stay out of the backup: only the volume's own blocks move.
    let up = b1["bytesUploaded"].as_u64().unwrap();
    assert!(up > 3 * MIB && up < 6 * MIB, "{b1}");
    drop(a);

    // The first backup over the image put the image into the target too, with its SHA-512.
    let img_meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(target.join("backingimages/img/image.json")).unwrap(),
    )
    .unwrap();
    let img_sha = hex::encode(sha2::Sha512::digest(std::fs::read(&img).unwrap()));
    assert_eq!(img_meta["checksum"], img_sha.as_str());

    // Another bicsi with its own data dir. Without the image here nor in the target: a clear
    // error naming the image and what to do.
    let b = Served::start(&base_dir.path().join("b"));
    set_target(&b, &target);
    let listed = b.backups("vm");
    assert!(
        listed
            .iter()
            .any(|x| x["name"] == "vm-b1" && x["state"] == "completed"),
        "{listed:?}"
    );
    let hidden = base_dir.path().join("hidden-images");
    std::fs::rename(target.join("backingimages"), &hidden).unwrap();
    let e = b.fails(&["backup", "restore", "vm-b1", "r0"]);
    assert!(
        e.contains("\"img\"") && e.contains("does not exist here"),
        "{e}"
    );
    std::fs::rename(&hidden, target.join("backingimages")).unwrap();
    // With the image in the target: restored from there first (source type restore, verified
    // by its SHA-512), then the volume over it.
    b.ok(&["backup", "restore", "vm-b1", "r1"]);
    let bi: serde_json::Value =
        serde_json::from_str(&b.ok(&["get", "backingimage", "img", "-o", "json"])).unwrap();
    assert_eq!(bi["spec"]["sourceType"], "restore", "{bi}");
    assert_eq!(bi["status"]["checksum"], img_sha.as_str(), "{bi}");
    b.with_mount("r1", |m| {
        assert_eq!(std::fs::read(m.join("base.bin")).unwrap(), base);
        assert_eq!(std::fs::read(m.join("new.bin")).unwrap(), new);
    });

    // An override: another image of the same virtual size is accepted. The blocks the backup
    // left out hold the original image's bytes: where the override differs (here base.bin's
    // blocks and an unused stretch of the filesystem), the restore writes the original's, so
    // the volume reads exactly as one restored over the original itself (never mounted: a mount
    // writes to the filesystem).
    b.ok(&["backup", "restore", "vm-b1", "r-ref"]);
    let mut r1_sha = String::new();
    b.with_block("r-ref", |dev| r1_sha = sha_of_device(dev, 64 * MIB));
    let image_bytes = std::fs::read(&img).unwrap();
    let at = image_bytes
        .windows(4096)
        .position(|w| w == &base[..4096])
        .expect("base.bin's bytes in the image");
    let mut other = image_bytes.clone();
    other[at..at + base.len()].copy_from_slice(&kit::noise(base.len(), 9));
    let unused = 40 * MIB as usize;
    other[unused..unused + MIB as usize].copy_from_slice(&kit::noise(MIB as usize, 10));
    let other_img = base_dir.path().join("other.raw");
    std::fs::write(&other_img, &other).unwrap();
    b.ok(&["image", "upload", "img-other", other_img.to_str().unwrap()]);
    // Here the original is this bicsi's "img" (same SHA-512).
    b.ok(&[
        "backup",
        "restore",
        "vm-b1",
        "r2",
        "--backing-image",
        "img-other",
    ]);
    b.with_block("r2", |dev| assert_eq!(sha_of_device(dev, 64 * MIB), r1_sha));
    b.with_mount("r2", |m| {
        assert_eq!(std::fs::read(m.join("base.bin")).unwrap(), base);
        assert_eq!(std::fs::read(m.join("new.bin")).unwrap(), new);
    });
    let vols: serde_json::Value =
        serde_json::from_str(&b.ok(&["get", "volume", "r2", "-o", "json"])).unwrap();
    assert_eq!(vols["backingImage"], "img-other", "{vols}");
    // A third bicsi without the original: it comes from the target's copy.
    let c = Served::start(&base_dir.path().join("c"));
    set_target(&c, &target);
    c.ok(&["image", "upload", "img-other", other_img.to_str().unwrap()]);
    c.ok(&[
        "backup",
        "restore",
        "vm-b1",
        "r4",
        "--backing-image",
        "img-other",
    ]);
    assert!(
        c.fails(&["get", "backingimage", "img"])
            .contains("not found"),
        "the original was read from the target, not created here"
    );
    c.with_block("r4", |dev| assert_eq!(sha_of_device(dev, 64 * MIB), r1_sha));
    drop(c);
    let big = base_dir.path().join("big.raw");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(96 * MIB)
        .unwrap();
    b.ok(&["image", "upload", "big", big.to_str().unwrap()]);
    let e = b.fails(&["backup", "restore", "vm-b1", "r3", "--backing-image", "big"]);
    assert!(e.contains("virtual size") && e.contains("big"), "{e}");
}

#[test]
fn a_corrupt_block_is_named_at_restore() {
    if !is_root() {
        return;
    }
    let (_base, s, target) = Served::with_file_target();
    s.ok(&[
        "volume",
        "create",
        "db",
        "--size",
        "16Mi",
        "-p",
        "numberOfReplicas=1",
    ]);
    s.with_block("db", |dev| {
        write_at(dev, 6 * MIB, &kit::noise(MIB as usize, 4))
    });
    s.ok(&["backup", "create", "db", "--name", "db-b1"]);
    // Block 3 (6 MiB / 2 MiB) is the only one; replace its content with other bytes.
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(target.join("backupvolumes/db/backups/db-b1.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["blocks"].as_array().unwrap().len(), 1, "{meta}");
    assert_eq!(meta["blocks"][0]["i"], 3, "{meta}");
    let hash = meta["blocks"][0]["h"].as_str().unwrap();
    let file = target.join(format!("backupvolumes/db/blocks/{}/{hash}.zst", &hash[..2]));
    let other = zstd::bulk::compress(&kit::noise(2 * MIB as usize, 5), 3).unwrap();
    std::fs::write(&file, other).unwrap();
    let e = s.fails(&["backup", "restore", "db-b1", "back"]);
    assert!(
        e.contains("db-b1") && e.contains("block 3") && e.contains("corrupt") && e.contains(hash),
        "{e}"
    );
    // Nothing claims to be the restored volume.
    let e = s.fails(&["get", "volume", "back"]);
    assert!(e.contains("not found"), "{e}");
}

/// GET of a JSON document from the HTTP API (Null when it cannot be had).
fn http_get_json(base: &str, path: &str) -> serde_json::Value {
    let addr = base.trim_start_matches("http://");
    let Ok(mut c) = std::net::TcpStream::connect(addr) else {
        return serde_json::Value::Null;
    };
    let _ = write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = c.read_to_string(&mut text);
    text.split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or_default()
}

/// Waits until `done` or panics after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kill_9_during_a_backup_and_during_a_restore() {
    if !is_root() {
        return;
    }
    let (_base, mut s, target) = Served::with_file_target();
    s.ok(&[
        "volume",
        "create",
        "big",
        "--size",
        "256Mi",
        "-p",
        "numberOfReplicas=1",
    ]);
    let data = kit::noise(160 * MIB as usize, 6);
    s.with_block("big", |dev| write_at(dev, 0, &data));

    // The kill must land while the backup runs: bicsi is stopped (SIGSTOP) once the backup has
    // made progress, and killed only if its metadata is not in the target yet; a backup that
    // was quicker than the test is let go and a full one (every block put again) tried anew.
    let mut cut_name = None;
    for attempt in 0..5 {
        let name = format!("big-cut{attempt}");
        let mut args = vec!["backup", "create", "big", "--name", &name, "--no-wait"];
        if attempt > 0 {
            args.push("--full");
        }
        s.ok(&args);
        // The first tries wait for progress; on a quiet machine the whole 160 MiB can go
        // between two polls (seen: five backups in a row ended first), so the later tries stop
        // bicsi as soon as the record exists: in progress either way, and the restart must fail
        // it the same way.
        if attempt < 2 {
            wait_until(
                "the backup to make progress",
                Duration::from_secs(60),
                || s.backup(&name)["blocksDone"].as_u64().unwrap_or(0) > 0,
            );
        }
        let pid = nix::unistd::Pid::from_raw(s.child.as_ref().unwrap().id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let meta = target.join(format!("backupvolumes/big/backups/{name}.json"));
        if meta.exists() {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
            continue;
        }
        s.kill_and_restart();
        // No metadata: the target holds no backup of that name, and the record says why.
        assert!(!meta.exists(), "{}", meta.display());
        cut_name = Some(name);
        break;
    }
    let cut_name = cut_name.expect("five backups all ended before bicsi could be stopped");
    let cut = s.backup(&cut_name);
    assert_eq!(cut["state"], "error", "{cut}");
    assert!(
        cut["message"].as_str().unwrap().contains("restarted"),
        "{cut}"
    );
    let e = s.fails(&["backup", "restore", &cut_name, "nope"]);
    assert!(e.contains("only a completed backup"), "{e}");

    // The next backup completes (reusing the blocks the cut one had put).
    s.ok(&["backup", "create", "big", "--name", "big-ok"]);
    let mut expected = String::new();
    s.with_block("big", |dev| expected = sha_of_device(dev, 256 * MIB));

    // The blocks the restore fetches: the backup's blocks that have content.
    let meta = backup_meta(&target, "big", "big-ok");
    let with_content = meta["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["h"].is_string())
        .count() as u64;
    assert!(with_content >= 80, "{with_content}");
    // The kill lands once the restore has checkpointed some blocks (its record counts them
    // after the checkpoint is on disk) and before it has finished: bicsi is stopped, and killed
    // only while the restore's checkpoint file is there; a restore quicker than the test is let
    // go and another one tried.
    let data_dir = s.dir.join("data");
    let mut cut = None;
    for attempt in 0..5 {
        let volume = format!("again{attempt}");
        s.ok(&["backup", "restore", "big-ok", &volume, "--no-wait"]);
        wait_until(
            "the restore to write blocks",
            Duration::from_secs(60),
            || {
                let v = http_get_json(&s.http, &format!("/v1/restores/{volume}"));
                v["blocksDone"].as_u64().unwrap_or(0) > 0 || v["state"] != "in-progress"
            },
        );
        let pid = nix::unistd::Pid::from_raw(s.child.as_ref().unwrap().id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let checkpoints = files_ending(&data_dir, ".qcow2.progress");
        let done: Option<u64> = checkpoints.first().and_then(|p| {
            let c: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
            c["done"].as_u64()
        });
        match done {
            Some(d) if d > 0 && d < with_content => {
                s.kill_and_restart();
                cut = Some((volume, d));
                break;
            }
            _ => nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap(),
        }
        wait_until("the uncut restore", Duration::from_secs(120), || {
            s.bicsi(&["get", "volume", &volume]).status.success()
        });
    }
    let (volume, done_before) = cut.expect("five restores all ended before bicsi could be stopped");
    // The restore continues by itself from its checkpoint and ends with the volume, complete.
    // The volume record comes first and the Restore record is marked after it, so wait for both.
    wait_until("the continued restore", Duration::from_secs(120), || {
        s.bicsi(&["get", "volume", &volume]).status.success()
            && http_get_json(&s.http, &format!("/v1/restores/{volume}"))["state"] != "in-progress"
    });
    let r = http_get_json(&s.http, &format!("/v1/restores/{volume}"));
    assert_eq!(r["state"], "completed", "{r}");
    assert_eq!(r["attempts"], 2, "{r}");
    // The second run fetched only the blocks after the checkpoint, not the whole backup.
    let fetched = r["blocksFetched"].as_u64().unwrap();
    assert!(fetched > 0, "{r}");
    assert!(
        fetched <= with_content - done_before && fetched < with_content,
        "the continued restore fetched {fetched} of {with_content} blocks, {done_before} were checkpointed: {r}"
    );
    assert!(files_ending(&data_dir, ".qcow2.progress").is_empty());
    assert!(files_ending(&data_dir, ".qcow2.part").is_empty());
    s.with_block(&volume, |dev| {
        assert_eq!(sha_of_device(dev, 256 * MIB), expected)
    });
}

#[test]
fn a_bak_snapshot_is_a_backup_and_restores_through_csi() {
    if !is_root() {
        return;
    }
    let (_base, s, target) = Served::with_file_target();
    s.ok(&[
        "volume",
        "create",
        "app",
        "--size",
        "32Mi",
        "-p",
        "numberOfReplicas=1",
    ]);
    s.with_block("app", |dev| {
        write_at(dev, MIB, &kit::noise(3 * MIB as usize, 11))
    });
    let out = s.ok(&[
        "snapshot", "create", "app-snap", "--volume", "app", "-p", "type=bak",
    ]);
    assert!(
        out.lines().nth(1).unwrap_or_default().contains(" true "),
        "{out}"
    );
    // CreateSnapshot again is the same snapshot, not a second backup.
    s.ok(&[
        "snapshot", "create", "app-snap", "--volume", "app", "-p", "type=bak",
    ]);
    assert_eq!(s.backups("app").len(), 1);
    assert!(
        target
            .join("backupvolumes/app/backups/app-snap.json")
            .exists()
    );
    let mut expected = String::new();
    s.with_block("app", |dev| expected = sha_of_device(dev, 32 * MIB));
    // The volume's disks keep nothing of it: the restore reads the target.
    s.ok(&[
        "snapshot",
        "restore",
        "app-snap",
        "app-copy",
        "-p",
        "numberOfReplicas=1",
    ]);
    s.with_block("app-copy", |dev| {
        assert_eq!(sha_of_device(dev, 32 * MIB), expected)
    });
    s.ok(&["snapshot", "delete", "app-snap"]);
    assert!(
        !target
            .join("backupvolumes/app/backups/app-snap.json")
            .exists()
    );
    assert_eq!(stored_blocks(&target, "app"), 0);
}

/// The local S3 server the S3 test runs against: `$BICSI_S3S_FS`, else `s3s-fs` on the PATH
/// (scripts/test installs it from crates.io when missing).
fn s3s_fs() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BICSI_S3S_FS") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.is_file())
    })
}

/// A real S3 server (s3s-fs) on 127.0.0.1 with one bucket, killed when dropped.
struct S3 {
    child: Child,
    port: u16,
}

impl S3 {
    fn start(bin: &Path, root: &Path, bucket: &str) -> S3 {
        std::fs::create_dir_all(root.join(bucket)).unwrap();
        let port = kit::free_port();
        let log = std::fs::File::create(root.with_extension("log")).unwrap();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "bicsi-key", "--secret-key", "bicsi-secret"])
            .arg(root)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_until("s3s-fs to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        S3 { child, port }
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn s3_target_round_trip_incremental_and_clear_errors() {
    if !is_root() {
        return;
    }
    let Some(bin) = s3s_fs() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "the S3 backup test needs s3s-fs (scripts/test installs it) and CI must not skip it"
        );
        eprintln!(
            "SKIP: no s3s-fs (cargo install s3s-fs@0.14.1 --features binary, or scripts/test)"
        );
        return;
    };
    let base = kit::temp_dir("bicsi-bak-");
    let s3 = S3::start(&bin, &base.path().join("s3"), "backups");
    let s = Served::start(&base.path().join("serve"));
    let creds = base.path().join("creds.env");
    std::fs::write(
        &creds,
        "AWS_ACCESS_KEY_ID=bicsi-key\nAWS_SECRET_ACCESS_KEY=bicsi-secret\n",
    )
    .unwrap();
    let url = format!(
        "s3://backups/cluster-1?endpoint=http://127.0.0.1:{}&region=us-east-1&path-style=true",
        s3.port
    );
    // Without credentials, then with wrong ones, the target is refused at set time, by name.
    let e = s.fails(&["set", "setting", "backup-target", &url]);
    assert!(
        e.contains(&url) && e.contains("backup-target-credential-file"),
        "{e}"
    );
    std::fs::write(
        &creds,
        "AWS_ACCESS_KEY_ID=bicsi-key\nAWS_SECRET_ACCESS_KEY=wrong\n",
    )
    .unwrap();
    s.ok(&[
        "set",
        "setting",
        "backup-target-credential-file",
        creds.to_str().unwrap(),
    ]);
    let e = s.fails(&["set", "setting", "backup-target", &url]);
    assert!(e.contains(&url) && e.contains("unchanged"), "{e}");
    std::fs::write(
        &creds,
        "AWS_ACCESS_KEY_ID=bicsi-key\nAWS_SECRET_ACCESS_KEY=bicsi-secret\n",
    )
    .unwrap();
    s.ok(&["set", "setting", "backup-target", &url]);

    s.ok(&[
        "volume",
        "create",
        "obj",
        "--size",
        "32Mi",
        "-p",
        "numberOfReplicas=1",
    ]);
    s.with_block("obj", |dev| {
        write_at(dev, 0, &kit::noise(3 * MIB as usize, 21))
    });
    s.ok(&["backup", "create", "obj", "--name", "obj-1"]);
    assert_eq!(s.backup("obj-1")["blocksUploaded"], 2);
    s.with_block("obj", |dev| write_at(dev, 9 * MIB, &kit::noise(4096, 22)));
    s.ok(&["backup", "create", "obj", "--name", "obj-2"]);
    assert_eq!(s.backup("obj-2")["blocksUploaded"], 1);
    // The objects are in the bucket, under the prefix.
    assert!(
        base.path()
            .join("s3/backups/cluster-1/backupvolumes/obj/backups/obj-2.json")
            .is_file()
    );
    let mut expected = String::new();
    s.with_block("obj", |dev| expected = sha_of_device(dev, 32 * MIB));
    s.ok(&["backup", "restore", "obj-2", "obj-back"]);
    s.with_block("obj-back", |dev| {
        assert_eq!(sha_of_device(dev, 32 * MIB), expected)
    });

    // Wrong credentials and an unreachable server: errors that name the target.
    std::fs::write(
        &creds,
        "AWS_ACCESS_KEY_ID=bicsi-key\nAWS_SECRET_ACCESS_KEY=wrong\n",
    )
    .unwrap();
    let e = s.fails(&["backup", "create", "obj", "--name", "obj-3"]);
    assert!(e.contains(&url), "{e}");
    std::fs::write(
        &creds,
        "AWS_ACCESS_KEY_ID=bicsi-key\nAWS_SECRET_ACCESS_KEY=bicsi-secret\n",
    )
    .unwrap();
    drop(s3);
    let e = s.fails(&["backup", "create", "obj", "--name", "obj-4"]);
    assert!(e.contains(&url), "{e}");
    // A restore from a target that does not answer fails at once (it is not retried like an
    // image being prepared), naming the target.
    let started = Instant::now();
    let e = s.fails(&["backup", "restore", "obj-2", "obj-nope"]);
    assert!(e.contains(&url), "{e}");
    assert!(started.elapsed() < Duration::from_secs(60), "{e}");
}

#[test]
fn block_volume_over_a_qcow2_image_keeps_zeroed_image_blocks() {
    if !is_root() {
        return;
    }
    let (base, s, target) = Served::with_file_target();
    // A qcow2 image with 8 MiB of noise at its start.
    let raw = base.path().join("q.raw");
    let mut bytes = kit::noise(8 * MIB as usize, 31);
    bytes.resize(24 * MIB as usize, 0);
    std::fs::write(&raw, &bytes).unwrap();
    let img = base.path().join("q.qcow2");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    s.ok(&["image", "upload", "q", img.to_str().unwrap()]);
    s.ok(&[
        "volume",
        "create",
        "qv",
        "--size",
        "32Mi",
        "-p",
        "numberOfReplicas=1",
        "-p",
        "backingImage=q",
    ]);
    // Zeros over the image's noise (block 1), new noise past it (block 5), and the image's own
    // bytes written again unchanged (block 0: equal to the image, so not in the backup).
    s.with_block("qv", |dev| {
        write_at(dev, 2 * MIB, &vec![0u8; 2 * MIB as usize]);
        write_at(dev, 10 * MIB, &kit::noise(MIB as usize, 32));
        write_at(dev, 0, &bytes[..2 * MIB as usize]);
    });
    s.ok(&["backup", "create", "qv", "--name", "qv-1"]);
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(target.join("backupvolumes/qv/backups/qv-1.json")).unwrap(),
    )
    .unwrap();
    let blocks = meta["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 2, "{meta}");
    assert_eq!(
        (blocks[0]["i"].as_u64(), blocks[0].get("h")),
        (Some(1), None),
        "{meta}"
    );
    assert_eq!(blocks[1]["i"], 5, "{meta}");
    assert_eq!(s.backup("qv-1")["blocksUploaded"], 1);
    let mut expected = String::new();
    s.with_block("qv", |dev| expected = sha_of_device(dev, 32 * MIB));
    s.ok(&["backup", "restore", "qv-1", "qv-back"]);
    s.with_block("qv-back", |dev| {
        assert_eq!(sha_of_device(dev, 32 * MIB), expected)
    });
}

#[test]
fn a_backup_of_an_attached_volume_holds_its_content_when_the_backup_started() {
    if !is_root() {
        return;
    }
    let (_base, s, _target) = Served::with_file_target();
    s.ok(&[
        "volume",
        "create",
        "live",
        "--size",
        "32Mi",
        "-p",
        "numberOfReplicas=1",
    ]);
    let first = kit::noise(3 * MIB as usize, 41);
    let mut image = first.clone();
    image.resize(32 * MIB as usize, 0);
    let expected = hex::encode(sha2::Sha256::digest(&image));
    // Taken while attached (the engine's point-in-time copy), then written over.
    s.with_block("live", |dev| {
        write_at(dev, 0, &first);
        s.ok(&["backup", "create", "live", "--name", "live-1"]);
        write_at(dev, 0, &kit::noise(3 * MIB as usize, 42));
    });
    s.ok(&["backup", "restore", "live-1", "live-back"]);
    s.with_block("live-back", |dev| {
        assert_eq!(sha_of_device(dev, 32 * MIB), expected)
    });
}

/// A volume whose backups are lz4 (`backupCompression`): its blocks are `.lz4` objects and the
/// restore is byte for byte; an incremental backup in zstd (`--compression`) reuses the lz4
/// blocks, puts only the changed one, and its restore reads the mix; `none` stores blocks as
/// they are. A bad compression and a target that is not a directory are refused by name.
#[test]
fn lz4_backups_restore_and_an_incremental_changes_compression() {
    if !is_root() {
        return;
    }
    let (base, s, target) = Served::with_file_target();
    let e = s.fails(&[
        "volume",
        "create",
        "bad",
        "--size",
        "16Mi",
        "-p",
        "backupCompression=gzip",
    ]);
    assert!(e.contains("gzip") && e.contains("lz4"), "{e}");
    s.ok(&[
        "volume",
        "create",
        "lz",
        "--size",
        "32Mi",
        "-p",
        "numberOfReplicas=1",
        "-p",
        "backupCompression=lz4",
    ]);
    // Noise (does not compress) and text (does) in blocks of their own.
    let text: Vec<u8> = b"bicsi lz4 block "
        .iter()
        .copied()
        .cycle()
        .take(2 * MIB as usize)
        .collect();
    s.with_block("lz", |dev| {
        write_at(dev, 0, &kit::noise(3 * MIB as usize, 41));
        write_at(dev, 8 * MIB, &text);
    });
    s.ok(&["backup", "create", "lz", "--name", "lz-1"]);
    assert_eq!(stored_blocks_as(&target, "lz", "lz4"), 3);
    assert_eq!(stored_blocks_as(&target, "lz", "zst"), 0);
    let m1 = backup_meta(&target, "lz", "lz-1");
    assert_eq!(m1["format"], 2, "{m1}");
    assert!(
        m1["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["c"] == "lz4"),
        "{m1}"
    );
    // The text block went in compressed: far below its 2 MiB.
    let up1 = s.backup("lz-1")["bytesUploaded"].as_u64().unwrap();
    assert!(up1 < 4 * MIB + MIB / 2, "{up1}");
    let mut sha1 = String::new();
    s.with_block("lz", |dev| sha1 = sha_of_device(dev, 32 * MIB));
    s.ok(&["backup", "restore", "lz-1", "lz-copy"]);
    s.with_block("lz-copy", |dev| {
        assert_eq!(sha_of_device(dev, 32 * MIB), sha1)
    });

    // The next backup in zstd: the changed block only, the others stay lz4 objects.
    s.with_block("lz", |dev| write_at(dev, 20 * MIB, &kit::noise(4096, 42)));
    let e = s.fails(&["backup", "create", "lz", "--compression", "brotli"]);
    assert!(e.contains("brotli"), "{e}");
    s.ok(&[
        "backup",
        "create",
        "lz",
        "--name",
        "lz-2",
        "--compression",
        "zstd",
    ]);
    assert_eq!(s.backup("lz-2")["blocksUploaded"], 1);
    assert_eq!(stored_blocks_as(&target, "lz", "zst"), 1);
    assert_eq!(stored_blocks_as(&target, "lz", "lz4"), 3);
    let m2 = backup_meta(&target, "lz", "lz-2");
    let kinds: Vec<String> = m2["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["c"].as_str().unwrap_or("zstd").to_string())
        .collect();
    assert_eq!(kinds, ["lz4", "lz4", "lz4", "zstd"], "{m2}");
    let mut sha2 = String::new();
    s.with_block("lz", |dev| sha2 = sha_of_device(dev, 32 * MIB));
    assert_ne!(sha1, sha2);
    s.ok(&["backup", "restore", "lz-2", "lz-copy2"]);
    s.with_block("lz-copy2", |dev| {
        assert_eq!(sha_of_device(dev, 32 * MIB), sha2)
    });
    // `none`, full: every block again, as it is.
    s.ok(&[
        "backup",
        "create",
        "lz",
        "--name",
        "lz-3",
        "--full",
        "--compression",
        "none",
    ]);
    assert_eq!(stored_blocks_as(&target, "lz", "raw"), 4);
    s.ok(&["backup", "restore", "lz-3", "lz-copy3"]);
    s.with_block("lz-copy3", |dev| {
        assert_eq!(sha_of_device(dev, 32 * MIB), sha2)
    });
    // Deleting the first two keeps what lz-3 lists (its raw blocks) and nothing else.
    s.ok(&["backup", "delete", "lz-1"]);
    s.ok(&["backup", "delete", "lz-2"]);
    assert_eq!(stored_blocks(&target, "lz"), 4);
    assert_eq!(stored_blocks_as(&target, "lz", "raw"), 4);

    // The setting checks a new target: a missing directory and a file are refused, naming the
    // target and the fix, and the setting keeps its value.
    let before = s.ok(&["get", "settings", "-o", "json"]);
    let missing = format!("file://{}/nope", base.path().display());
    let e = s.fails(&["set", "setting", "backup-target", &missing]);
    assert!(e.contains(&missing) && e.contains("create it"), "{e}");
    let file = base.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let not_dir = format!("file://{}", file.display());
    let e = s.fails(&["set", "setting", "backup-target", &not_dir]);
    assert!(e.contains(&not_dir) && e.contains("not a directory"), "{e}");
    assert_eq!(s.ok(&["get", "settings", "-o", "json"]), before);
    // The check leaves nothing in a good target.
    set_target(&s, &target);
    assert!(
        std::fs::read_dir(&target)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with(".bicsi-check"))
    );
}

/// A restore takes the backed-up volume's replica count and parameters by default; `-p` and
/// `--storage-class` override them; an unknown parameter is refused before anything starts.
#[test]
fn a_restore_takes_the_backed_up_volumes_parameters_unless_given() {
    if !is_root() {
        return;
    }
    let base = kit::temp_dir("bicsi-bak-");
    let (d1, d2) = (base.path().join("d1"), base.path().join("d2"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let s = Served::start_with(
        &base.path().join("serve"),
        &[
            "--disk",
            d1.to_str().unwrap(),
            "--disk",
            d2.to_str().unwrap(),
        ],
    );
    let target = target_dir(base.path());
    set_target(&s, &target);
    s.ok(&[
        "volume",
        "create",
        "par",
        "--size",
        "16Mi",
        "-p",
        "numberOfReplicas=2",
        "-p",
        "staleReplicaTimeout=30",
        "-p",
        "backupBlockSize=1Mi",
    ]);
    s.with_block("par", |dev| {
        write_at(dev, MIB, &kit::noise(3 * MIB as usize, 51))
    });
    s.ok(&["backup", "create", "par", "--name", "par-b1"]);
    let meta = backup_meta(&target, "par", "par-b1");
    assert_eq!(meta["volumeParameters"]["numberOfReplicas"], "2", "{meta}");
    assert_eq!(
        meta["volumeParameters"]["staleReplicaTimeout"], "30",
        "{meta}"
    );
    let mut expected = String::new();
    s.with_block("par", |dev| expected = sha_of_device(dev, 16 * MIB));

    let volume = |name: &str| -> serde_json::Value {
        serde_json::from_str(&s.ok(&["get", "volume", name, "-o", "json"])).unwrap()
    };
    // By default: the backed-up volume's.
    s.ok(&["backup", "restore", "par-b1", "par-copy"]);
    let v = volume("par-copy");
    assert_eq!(v["wantedReplicas"], 2, "{v}");
    let p = &v["record"]["spec"]["parameters"];
    assert_eq!(p["staleReplicaTimeout"], "30", "{v}");
    assert_eq!(p["backupBlockSize"], "1Mi", "{v}");
    s.with_block("par-copy", |dev| {
        assert_eq!(sha_of_device(dev, 16 * MIB), expected)
    });
    // -p wins over the recorded ones, key by key.
    s.ok(&[
        "backup",
        "restore",
        "par-b1",
        "par-one",
        "-p",
        "numberOfReplicas=1",
    ]);
    let v = volume("par-one");
    assert_eq!(v["wantedReplicas"], 1, "{v}");
    assert_eq!(
        v["record"]["spec"]["parameters"]["staleReplicaTimeout"],
        "30"
    );
    // --storage-class: its parameters, then -p.
    let sc = base.path().join("sc.yaml");
    std::fs::write(
        &sc,
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: single\nprovisioner: driver.longhorn.io\nparameters:\n  numberOfReplicas: \"1\"\n  staleReplicaTimeout: \"45\"\n",
    )
    .unwrap();
    s.ok(&["apply", "-f", sc.to_str().unwrap()]);
    s.ok(&[
        "backup",
        "restore",
        "par-b1",
        "par-sc",
        "--storage-class",
        "single",
        "-p",
        "staleReplicaTimeout=50",
    ]);
    let v = volume("par-sc");
    assert_eq!(v["wantedReplicas"], 1, "{v}");
    assert_eq!(
        v["record"]["spec"]["parameters"]["staleReplicaTimeout"],
        "50"
    );
    s.with_block("par-sc", |dev| {
        assert_eq!(sha_of_device(dev, 16 * MIB), expected)
    });
    // Refused before a restore starts: no record, no volume.
    let e = s.fails(&["backup", "restore", "par-b1", "par-bad", "-p", "colour=red"]);
    assert!(
        e.contains("colour") && e.contains("numberOfReplicas"),
        "{e}"
    );
    assert!(s.fails(&["get", "volume", "par-bad"]).contains("not found"));
    let e = s.fails(&[
        "backup",
        "restore",
        "par-b1",
        "par-bad",
        "--storage-class",
        "nosuch",
    ]);
    assert!(e.contains("nosuch"), "{e}");
}

/// A restore started by CSI CreateVolume (from a `bak` snapshot) that bicsi's kill -9 cuts off
/// is not started again by bicsi at its restart (the CO retries the call); the CO's retry of the
/// same CreateVolume continues it on the disk its record names, fetching only the blocks after
/// its checkpoint, and the volume ends byte-exact.
#[test]
fn kill_9_during_a_csi_restore_and_the_cos_retry_continues_it() {
    if !is_root() {
        return;
    }
    let (_base, mut s, target) = Served::with_file_target();
    s.ok(&[
        "volume",
        "create",
        "csi",
        "--size",
        "256Mi",
        "-p",
        "numberOfReplicas=1",
    ]);
    s.with_block("csi", |dev| {
        write_at(dev, 0, &kit::noise(160 * MIB as usize, 61))
    });
    s.ok(&[
        "snapshot", "create", "csi-bak", "--volume", "csi", "-p", "type=bak",
    ]);
    let mut expected = String::new();
    s.with_block("csi", |dev| expected = sha_of_device(dev, 256 * MIB));
    let meta = backup_meta(&target, "csi", "csi-bak");
    let with_content = meta["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["h"].is_string())
        .count() as u64;
    assert!(with_content >= 80, "{with_content}");

    // CreateVolume is the CLI's `snapshot restore` (a CSI call that returns when the volume
    // exists), run in the background; bicsi is killed once the restore has checkpointed some
    // blocks and not all.
    let data_dir = s.dir.join("data");
    let restore = |volume: &str| -> Child {
        Command::new(env!("CARGO_BIN_EXE_bicsi"))
            .args(["snapshot", "restore", "csi-bak", volume])
            .args(["-p", "numberOfReplicas=1"])
            .env("BICSI_CSI_ENDPOINT", &s.endpoint)
            .env("BICSI_SERVER", &s.http)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut cut = None;
    for attempt in 0..5 {
        let volume = format!("csi-again{attempt}");
        let mut call = restore(&volume);
        wait_until(
            "the CSI restore to write blocks",
            Duration::from_secs(60),
            || {
                let v = http_get_json(&s.http, &format!("/v1/restores/{volume}"));
                v["blocksDone"].as_u64().unwrap_or(0) > 0
                    || v["state"] == "completed"
                    || call.try_wait().unwrap().is_some()
            },
        );
        let pid = nix::unistd::Pid::from_raw(s.child.as_ref().unwrap().id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let done: Option<u64> = files_ending(&data_dir, ".qcow2.progress")
            .first()
            .and_then(|p| {
                let c: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
                c["done"].as_u64()
            });
        match done {
            Some(d) if d > 0 && d < with_content => {
                s.kill_and_restart();
                // The CO's call fails with the connection.
                assert!(!call.wait().unwrap().success());
                cut = Some((volume, d));
                break;
            }
            _ => nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap(),
        }
        assert!(call.wait().unwrap().success(), "the uncut restore failed");
    }
    let (volume, done_before) = cut.expect("five restores all ended before bicsi could be stopped");
    let progress_file = || -> Option<u64> {
        let p = files_ending(&data_dir, ".qcow2.progress")
            .into_iter()
            .next()?;
        let c: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
        c["done"].as_u64()
    };
    // bicsi does not start it again by itself: the record waits for the CO's retry, and the
    // restore's file stays where it was.
    std::thread::sleep(Duration::from_secs(3));
    let r = http_get_json(&s.http, &format!("/v1/restores/{volume}"));
    assert_eq!(r["state"], "in-progress", "{r}");
    assert_eq!(r["attempts"], 1, "{r}");
    assert_eq!(r["csi"], true, "{r}");
    assert!(
        r["message"].as_str().unwrap_or_default().contains("retry"),
        "{r}"
    );
    let disk = r["diskId"].as_str().unwrap().to_string();
    assert!(!disk.is_empty(), "{r}");
    assert!(!s.bicsi(&["get", "volume", &volume]).status.success());
    assert_eq!(progress_file(), Some(done_before));

    // The CO's retry: the same CreateVolume, which continues the restore and ends with the
    // volume.
    s.ok(&[
        "snapshot",
        "restore",
        "csi-bak",
        &volume,
        "-p",
        "numberOfReplicas=1",
    ]);
    let r = http_get_json(&s.http, &format!("/v1/restores/{volume}"));
    assert_eq!(r["state"], "completed", "{r}");
    assert_eq!(r["attempts"], 2, "{r}");
    assert_eq!(r["diskId"], disk.as_str(), "{r}");
    let fetched = r["blocksFetched"].as_u64().unwrap();
    assert!(fetched > 0, "{r}");
    assert!(
        fetched <= with_content - done_before && fetched < with_content,
        "the continued restore fetched {fetched} of {with_content} blocks, {done_before} were checkpointed: {r}"
    );
    assert!(files_ending(&data_dir, ".qcow2.progress").is_empty());
    assert!(files_ending(&data_dir, ".qcow2.part").is_empty());
    // The same call again is the same volume (idempotent by name), with no restore run.
    s.ok(&[
        "snapshot",
        "restore",
        "csi-bak",
        &volume,
        "-p",
        "numberOfReplicas=1",
    ]);
    assert_eq!(
        http_get_json(&s.http, &format!("/v1/restores/{volume}"))["attempts"],
        2
    );
    s.with_block(&volume, |dev| {
        assert_eq!(sha_of_device(dev, 256 * MIB), expected)
    });
}

/// A restore of a backup that does not exist is refused at once, through the CLI (naming the
/// backup and `bicsi backup list`) and through CSI (NotFound), leaving no record and no volume.
#[test]
fn a_restore_of_a_missing_backup_is_refused_at_once() {
    if !is_root() {
        return;
    }
    let (_base, s, _target) = Served::with_file_target();
    let e = s.fails(&["backup", "restore", "nope", "from-nope"]);
    assert!(
        e.contains("\"nope\"") && e.contains("bicsi backup list"),
        "{e}"
    );
    assert!(e.contains("not found"), "{e}");
    let r = http_get_json(&s.http, "/v1/restores/from-nope");
    assert!(r["state"].is_null(), "{r}");
    assert!(
        s.fails(&["get", "volume", "from-nope"])
            .contains("not found")
    );

    // CSI: a `bak` snapshot whose backup was deleted from the target.
    s.ok(&[
        "volume",
        "create",
        "gone",
        "--size",
        "16Mi",
        "-p",
        "numberOfReplicas=1",
    ]);
    s.ok(&[
        "snapshot", "create", "gone-bak", "--volume", "gone", "-p", "type=bak",
    ]);
    s.ok(&["backup", "delete", "gone-bak"]);
    let out = s.bicsi(&[
        "snapshot",
        "restore",
        "gone-bak",
        "from-gone",
        "-p",
        "numberOfReplicas=1",
    ]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("not found") && e.contains("gone-bak"), "{e}");
    let r = http_get_json(&s.http, "/v1/restores/from-gone");
    assert!(r["state"].is_null(), "{r}");
    assert!(
        s.fails(&["get", "volume", "from-gone"])
            .contains("not found")
    );
}
