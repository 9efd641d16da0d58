//! The mirror engine serving a copy-on-write replica (`--cow-replica`, issue 14's layout for
//! disks without reflink) as a real `bicsi engine-mirror` process over FUSE: bytes written
//! through its file read back, and a SIGKILL between flushes loses no flushed write and leaves
//! no cluster reading anything but its flushed or its newer bytes; `pause` + `flush PATH` put
//! every acknowledged write into the map a second open reads (attached snapshots).

#[path = "kit/mod.rs"]
mod kit;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bicsi::mirror::cow::{self, CowSpec};

const C: usize = 64 * 1024;
const SIZE: usize = 32 * C;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Starts the engine on `export` (in the foreground, as its own child) and waits until the
/// file is mounted (its pid file is written then).
fn start(dir: &Path, export: &Path, spec: &CowSpec) -> Child {
    start_with(dir, export, spec, &[])
}

fn start_with(dir: &Path, export: &Path, spec: &CowSpec, extra: &[&Path]) -> Child {
    let pid = dir.join("mirror.pid");
    let _ = std::fs::remove_file(&pid);
    let base = spec
        .base
        .as_ref()
        .map(|b| format!(",base={}", b.display()))
        .unwrap_or_default();
    let child = Command::new(env!("CARGO_BIN_EXE_bicsi"))
        .arg("engine-mirror")
        .arg("--export")
        .arg(export)
        .arg("--cow-replica")
        .arg(format!(
            "data={},map={}{base}",
            spec.data.display(),
            spec.map.display()
        ))
        .arg("--pid-file")
        .arg(&pid)
        .args(extra)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pid.exists() {
        assert!(
            Instant::now() < deadline,
            "the engine did not mount its file"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn unmount(export: &Path) {
    let _ = Command::new("umount").arg("-l").arg(export).status();
}

/// What a snapshot of an attached cow volume relies on (`snapshot::capture_cow`): a write the
/// engine acknowledged without a flush is not in the replica's map on disk, so a second open
/// reads the old cluster; after `pause` and `flush PATH` on the control socket it is, and a
/// second open reads it; `flush` of a path that is not a replica is an error.
#[test]
fn pause_and_flush_put_every_acknowledged_write_in_the_map_a_second_open_reads() {
    if !kit::root_or_skip("cow tests (FUSE, mounts)") {
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let base: Vec<u8> = pattern(200, SIZE / 2);
    std::fs::write(dir.path().join("base.raw"), &base).unwrap();
    let spec = CowSpec {
        data: dir.path().join("volume.data"),
        map: dir.path().join("volume.map"),
        base: Some(dir.path().join("base.raw")),
    };
    cow::create(&spec, SIZE as u64, cow::DEFAULT_CLUSTER).unwrap();
    let export: PathBuf = dir.path().join("export");
    std::fs::write(&export, b"").unwrap();
    let socket = dir.path().join("control");
    let mut engine = start_with(
        dir.path(),
        &export,
        &spec,
        &[Path::new("--control"), &socket],
    );
    let file = OpenOptions::new().write(true).open(&export).unwrap();
    let written = pattern(9, 3 * C);
    file.write_all_at(&written, C as u64 + 5).unwrap();
    let second = || {
        let layer = cow::Cow::open(&spec, true).unwrap();
        let mut got = vec![0u8; 3 * C];
        layer.read_at(&mut got, C as u64 + 5).unwrap();
        got
    };
    assert!(
        second() != written,
        "the map on disk has the write before any flush"
    );
    let conn = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let mut out = conn.try_clone().unwrap();
    let mut lines = BufReader::new(conn).lines();
    let mut ask = |cmd: &str| {
        writeln!(out, "{cmd}").unwrap();
        lines.next().unwrap().unwrap()
    };
    assert_eq!(ask("pause"), "ok paused");
    let data = spec.data.display().to_string();
    assert_eq!(ask(&format!("flush {data}")), "ok flushed");
    assert!(
        second() == written,
        "a second open after flush misses the write"
    );
    let e = ask("flush /nowhere/volume.cow");
    assert!(e.starts_with("error") && e.contains("not a replica"), "{e}");
    assert_eq!(ask("resume"), "ok resumed");
    drop(file);
    let _ = Command::new("umount").arg(&export).status();
    let _ = engine.kill();
    let _ = engine.wait();
    unmount(&export);
}

#[test]
fn a_killed_engine_over_a_cow_replica_keeps_every_flushed_write() {
    if !kit::root_or_skip("cow tests (FUSE, mounts)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base: Vec<u8> = pattern(200, SIZE / 2 + 1000);
    std::fs::write(dir.path().join("base.raw"), &base).unwrap();
    let spec = CowSpec {
        data: dir.path().join("volume.data"),
        map: dir.path().join("volume.map"),
        base: Some(dir.path().join("base.raw")),
    };
    cow::create(&spec, SIZE as u64, cow::DEFAULT_CLUSTER).unwrap();
    let export: PathBuf = dir.path().join("export");
    std::fs::write(&export, b"").unwrap();
    let mut initial = vec![0u8; SIZE];
    initial[..base.len()].copy_from_slice(&base);

    let mut engine = start(dir.path(), &export, &spec);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&export)
        .unwrap();
    assert_eq!(file.metadata().unwrap().len(), SIZE as u64);
    let mut got = vec![0u8; SIZE];
    file.read_exact_at(&mut got, 0).unwrap();
    assert!(
        got == initial,
        "a new replica reads as its base, then zeros"
    );

    // Flushed: part of a clear cluster, a run across cluster edges past the base's end.
    let mut model = initial.clone();
    for (seed, off, len) in [(1u8, 100, 5000), (2, 10 * C - 10, 3 * C), (3, 20 * C, 4096)] {
        file.write_all_at(&pattern(seed, len), off as u64).unwrap();
        model[off..off + len].copy_from_slice(&pattern(seed, len));
    }
    file.sync_all().unwrap();
    let flushed = model.clone();
    // Not flushed: over a flushed cluster and into clear ones.
    for (seed, off, len) in [(4u8, 200, 100), (5, 25 * C + 7, C)] {
        file.write_all_at(&pattern(seed, len), off as u64).unwrap();
        model[off..off + len].copy_from_slice(&pattern(seed, len));
    }
    drop(file);
    engine.kill().unwrap();
    engine.wait().unwrap();
    unmount(&export);

    let mut engine = start(dir.path(), &export, &spec);
    let file = OpenOptions::new().read(true).open(&export).unwrap();
    file.read_exact_at(&mut got, 0).unwrap();
    drop(file);
    for k in 0..SIZE / C {
        let r = k * C..(k + 1) * C;
        assert!(
            got[r.clone()] == flushed[r.clone()] || got[r.clone()] == model[r.clone()],
            "cluster {k} reads neither its flushed nor its newer bytes after the kill"
        );
    }
    for (off, len) in [(300, 4800), (10 * C - 10, 3 * C), (20 * C, 4096)] {
        assert!(
            got[off..off + len] == flushed[off..off + len],
            "a flushed write at {off} is lost"
        );
    }
    let _ = Command::new("umount").arg(&export).status();
    let _ = engine.kill();
    let _ = engine.wait();
    unmount(&export);
}
