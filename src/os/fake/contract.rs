//! The contract between the fakes and the machine: the same flows of calls, with good and bad
//! inputs, run on `Fake` and (as root) on `Os::real()`, reduced to what a caller observes (Ok or
//! which error kind, sizes, listings) and compared with one expected list. A fake that accepts
//! what the machine refuses, or the reverse, fails here. The remote flow (replica servers and NBD
//! children on two machines) is `super::super::nbd`'s `remote_flow`.

use super::*;
use crate::os::testutil::Cleanup;

fn kind(r: &OsResult<impl std::fmt::Debug>) -> String {
    match r {
        Ok(v) => format!("Ok({v:?})"),
        Err(OsError::Command { .. }) => "Command".into(),
        Err(OsError::Io { .. }) => "Io".into(),
        Err(OsError::NotFound(_)) => "NotFound".into(),
        Err(OsError::Busy(_)) => "Busy".into(),
        Err(OsError::Conflict(_)) => "Conflict".into(),
        Err(OsError::Unsupported(_)) => "Unsupported".into(),
        Err(OsError::NoSpace(_)) => "NoSpace".into(),
        Err(OsError::Timeout(_)) => "Timeout".into(),
        Err(OsError::Unavailable(_)) => "Unavailable".into(),
        Err(OsError::Other(_)) => "Other".into(),
    }
}

/// The basic node flow, as observations that must be the same on the fake and on the real
/// machine (paths of devices and pids differ, so they are reduced to what a caller checks).
fn basic_flow(os: &Os, dir: &Path, cleanup: &mut Cleanup) -> Vec<String> {
    let mut seen = Vec::new();
    let mut note = |what: &str, v: String| seen.push(format!("{what}: {v}"));
    let size = 64u64 << 20;
    let reps: Vec<PathBuf> = (0..2)
        .map(|i| {
            let disk = dir.join(format!("disk{i}"));
            fs::create_dir_all(&disk).unwrap();
            disk.join("replica.qcow2")
        })
        .collect();
    for r in &reps {
        note("create", kind(&os.images.create_replica(r, size, None)));
        note(
            "create again",
            kind(&os.images.create_replica(r, size, None)),
        );
    }
    let info = os.images.info(&reps[0]).unwrap();
    note(
        "info",
        format!(
            "{} {} {:?}",
            info.format, info.virtual_size, info.backing_file
        ),
    );
    note(
        "create other size",
        kind(&os.images.create_replica(&reps[0], size * 2, None)),
    );
    let run_dir = dir.join("run");
    cleanup.engine(&run_dir);
    let spec = EngineSpec {
        volume_id: "pvc-flow".into(),
        replicas: reps.clone(),
        run_dir: run_dir.clone(),
        read_only: false,
    };
    note("status before", kind(&os.engine.status(&run_dir)));
    let state = os.engine.start(&spec).unwrap();
    note(
        "state",
        format!("{:?} ro={}", state.replicas == reps, state.read_only),
    );
    let status = os.engine.status(&run_dir).unwrap().unwrap();
    note("status pid", format!("{}", status.pid == state.pid));
    note(
        "start again",
        format!("{}", os.engine.start(&spec).unwrap().pid == state.pid),
    );
    note(
        "resize while running",
        kind(&os.images.resize(&reps[0], size * 2)),
    );

    let dev = os.loops.attach(&state.export_path).unwrap();
    cleanup.loop_file(&state.export_path);
    note(
        "attach again",
        format!("{}", os.loops.attach(&state.export_path).unwrap() == dev),
    );
    note(
        "find",
        format!(
            "{}",
            os.loops.find(&state.export_path).unwrap() == Some(dev.clone())
        ),
    );
    note("device size", kind(&os.fs.device_size(&dev)));
    note("probe", kind(&os.fs.probe(&dev)));
    note("mkfs btrfs", kind(&os.fs.mkfs(&dev, "btrfs")));
    note("mkfs", kind(&os.fs.mkfs(&dev, "ext4")));
    note("probe after", kind(&os.fs.probe(&dev)));
    note("mkfs again", kind(&os.fs.mkfs(&dev, "ext4")));

    let stage = dir.join("stage");
    let publish = dir.join("publish");
    let block = dir.join("block");
    cleanup.mount(&stage);
    cleanup.mount(&publish);
    cleanup.mount(&block);
    note(
        "mount wrong fs",
        kind(&os.mounts.mount(&dev, &stage, "xfs", &[])),
    );
    note("mount", kind(&os.mounts.mount(&dev, &stage, "ext4", &[])));
    note(
        "mount again",
        kind(&os.mounts.mount(&dev, &stage, "ext4", &[])),
    );
    let m = os.mounts.mount_info(&stage).unwrap().unwrap();
    note(
        "stage info",
        format!(
            "{} {} rw={}",
            m.fstype,
            m.target == resolve_parent(&stage),
            m.options.contains(&"rw".into())
        ),
    );
    note(
        "bind ro",
        kind(&os.mounts.bind_mount(&stage, &publish, true)),
    );
    note(
        "bind ro again",
        kind(&os.mounts.bind_mount(&stage, &publish, true)),
    );
    note(
        "bind rw over ro",
        kind(&os.mounts.bind_mount(&stage, &publish, false)),
    );
    let p = os.mounts.mount_info(&publish).unwrap().unwrap();
    note(
        "publish info",
        format!("{} ro={}", p.fstype, p.options.contains(&"ro".into())),
    );
    note(
        "bind block",
        kind(&os.mounts.bind_mount(&dev, &block, false)),
    );
    note(
        "block target is not a dir",
        format!("{}", !fs::metadata(&block).unwrap().is_dir()),
    );
    let st = os.fs.stats(&stage).unwrap();
    note(
        "stats",
        format!(
            "{}",
            st.total_bytes > 0 && st.total_bytes <= size && st.used_bytes < st.total_bytes
        ),
    );
    note("stop while attached", kind(&os.engine.stop(&run_dir)));

    for t in [&publish, &block, &stage] {
        note("unmount", kind(&os.mounts.unmount(t)));
        note("unmount again", kind(&os.mounts.unmount(t)));
        note("info after", kind(&os.mounts.mount_info(t)));
    }
    note("detach", kind(&os.loops.detach(&dev)));
    note(
        "detach again",
        kind(&os.loops.detach_file(&state.export_path)),
    );
    note("find after", kind(&os.loops.find(&state.export_path)));
    note("stop", kind(&os.engine.stop(&run_dir)));
    note("stop again", kind(&os.engine.stop(&run_dir)));
    note("status after", kind(&os.engine.status(&run_dir)));
    note("run dir gone", format!("{}", !run_dir.exists()));
    for r in &reps {
        note("resize stopped", kind(&os.images.resize(r, size * 2)));
    }
    note("shrink", kind(&os.images.resize(&reps[0], size)));
    note(
        "attach missing",
        kind(&os.loops.attach(&dir.join("nothing"))),
    );
    note("probe missing", kind(&os.fs.probe(&dir.join("nothing"))));
    note(
        "mount missing",
        kind(&os.mounts.mount(&dir.join("nothing"), &stage, "ext4", &[])),
    );

    // Restart: the filesystem made through the first engine is there through the second.
    let state = os.engine.start(&spec).unwrap();
    let dev = os.loops.attach(&state.export_path).unwrap();
    cleanup.loop_file(&state.export_path);
    note(
        "size after offline resize",
        format!("{}", os.fs.device_size(&dev).unwrap() == size * 2),
    );
    note("probe after restart", kind(&os.fs.probe(&dev)));
    note("grow xfs unmounted", kind(&os.fs.grow(&dev, &stage, "xfs")));
    note("grow offline", kind(&os.fs.grow(&dev, &stage, "ext4")));
    note(
        "grow offline again",
        kind(&os.fs.grow(&dev, &stage, "ext4")),
    );
    note(
        "mount after restart",
        kind(&os.mounts.mount(&dev, &stage, "ext4", &[])),
    );
    note(
        "grow mounted elsewhere",
        kind(&os.fs.grow(&dev, &publish, "ext4")),
    );
    let st = os.fs.stats(&stage).unwrap();
    note("grown", format!("{}", st.total_bytes > size));
    os.mounts.unmount(&stage).unwrap();
    os.loops.detach(&dev).unwrap();
    os.engine.stop(&run_dir).unwrap();
    seen
}

const EXPECTED: &[&str] = &[
    "create: Ok(())",
    "create again: Ok(())",
    "create: Ok(())",
    "create again: Ok(())",
    "info: qcow2 67108864 None",
    "create other size: Conflict",
    "status before: Ok(None)",
    "state: true ro=false",
    "status pid: true",
    "start again: true",
    "resize while running: Command",
    "attach again: true",
    "find: true",
    "device size: Ok(67108864)",
    "probe: Ok(None)",
    "mkfs btrfs: Unsupported",
    "mkfs: Ok(())",
    "probe after: Ok(Some(\"ext4\"))",
    "mkfs again: Conflict",
    "mount wrong fs: Command",
    "mount: Ok(())",
    "mount again: Ok(())",
    "stage info: ext4 true rw=true",
    "bind ro: Ok(())",
    "bind ro again: Ok(())",
    "bind rw over ro: Conflict",
    "publish info: ext4 ro=true",
    "bind block: Ok(())",
    "block target is not a dir: true",
    "stats: true",
    "stop while attached: Busy",
    "unmount: Ok(())",
    "unmount again: Ok(())",
    "info after: Ok(None)",
    "unmount: Ok(())",
    "unmount again: Ok(())",
    "info after: Ok(None)",
    "unmount: Ok(())",
    "unmount again: Ok(())",
    "info after: Ok(None)",
    "detach: Ok(())",
    "detach again: Ok(())",
    "find after: Ok(None)",
    "stop: Ok(())",
    "stop again: Ok(())",
    "status after: Ok(None)",
    "run dir gone: true",
    "resize stopped: Ok(())",
    "resize stopped: Ok(())",
    "shrink: Unsupported",
    "attach missing: NotFound",
    "probe missing: NotFound",
    "mount missing: NotFound",
    "size after offline resize: true",
    "probe after restart: Ok(Some(\"ext4\"))",
    "grow xfs unmounted: Unsupported",
    "grow offline: Ok(())",
    "grow offline again: Ok(())",
    "mount after restart: Ok(())",
    "grow mounted elsewhere: Busy",
    "grown: true",
];

#[test]
fn fake_basic_flow() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new();
    let mut cleanup = Cleanup::with(fake.os());
    let seen = basic_flow(&fake.os(), dir.path(), &mut cleanup);
    assert_eq!(seen, EXPECTED);
    assert!(fake.engines().is_empty());
    assert!(fake.loop_devices().is_empty());
    assert!(fake.mounts().is_empty());
}

/// The loop engine's file work, as observations that must be the same on the fake and on
/// the real machine: `shared` is a directory whose filesystem shares blocks (XFS with
/// reflink), `plain` one whose filesystem does not (ext4).
fn raw_flow(os: &Os, shared: &Path, plain: &Path, cleanup: &mut Cleanup) -> Vec<String> {
    let mut seen = Vec::new();
    let mut note = |what: &str, v: String| seen.push(format!("{what}: {v}"));
    let size = 64u64 << 20;
    note("shares blocks", kind(&os.images.shares_blocks(shared)));
    note("plain shares blocks", kind(&os.images.shares_blocks(plain)));
    let r = shared.join("volume.raw");
    note("create", kind(&os.images.create_raw(&r, size, None)));
    note("create again", kind(&os.images.create_raw(&r, size, None)));
    note(
        "create other size",
        kind(&os.images.create_raw(&r, size * 2, None)),
    );
    note("size", kind(&os.images.raw_size(&r)));
    // A base holding a filesystem, as the raw expansion of an image would.
    let base = shared.join("backing.raw");
    os.images.create_raw(&base, size / 2, None).unwrap();
    cleanup.loop_file(&base);
    let dev = os.loops.attach(&base).unwrap();
    os.fs.mkfs(&dev, "ext4").unwrap();
    os.loops.detach(&dev).unwrap();
    let clone = shared.join("clone.raw");
    note(
        "clone of base",
        kind(&os.images.create_raw(&clone, size, Some(&base))),
    );
    note(
        "clone across filesystems",
        kind(
            &os.images
                .create_raw(&plain.join("c.raw"), size, Some(&base)),
        ),
    );
    cleanup.loop_file(&clone);
    let dev = os.loops.attach(&clone).unwrap();
    note("clone holds", kind(&os.fs.probe(&dev)));
    note("clone device size", kind(&os.fs.device_size(&dev)));
    note("file mounts unmounted", kind(&os.loops.file_mounts(&clone)));
    note("file mounts no device", kind(&os.loops.file_mounts(&r)));
    let mnt = shared.join("mnt");
    cleanup.mount(&mnt);
    os.mounts.mount(&dev, &mnt, "ext4", &[]).unwrap();
    let mounts = os.loops.file_mounts(&clone).unwrap();
    note(
        "file mounts",
        format!("{}", mounts == Some(vec![mnt.clone()])),
    );
    os.loops.flush(&dev).unwrap();
    let snap = shared.join("snapshot.raw");
    note("clone_raw live", kind(&os.images.clone_raw(&clone, &snap)));
    note("clone_raw again", kind(&os.images.clone_raw(&clone, &snap)));
    note(
        "clone_raw across filesystems",
        kind(&os.images.clone_raw(&clone, &plain.join("s.raw"))),
    );
    os.mounts.unmount(&mnt).unwrap();
    os.loops.detach(&dev).unwrap();
    note("grow", kind(&os.images.resize_raw(&clone, size * 2)));
    note("grown size", kind(&os.images.raw_size(&clone)));
    note("shrink", kind(&os.images.resize_raw(&clone, size)));
    cleanup.loop_file(&snap);
    let ro = os.loops.attach_read_only(&snap).unwrap();
    note("snapshot holds", kind(&os.fs.probe(&ro)));
    note("snapshot size", kind(&os.fs.device_size(&ro)));
    note("read-only mkfs", kind(&os.fs.mkfs(&ro, "xfs")));
    os.loops.detach(&ro).unwrap();
    let q = shared.join("out.qcow2");
    note(
        "convert raw to qcow2",
        kind(
            &os.images
                .convert(&clone, ImageFormat::Raw, &q, ImageFormat::Qcow2),
        ),
    );
    let info = os.images.info(&q).unwrap();
    note(
        "converted",
        format!("{} {}", info.format, info.virtual_size),
    );
    seen
}

const RAW_EXPECTED: &[&str] = &[
    "shares blocks: Ok(true)",
    "plain shares blocks: Ok(false)",
    "create: Ok(())",
    "create again: Ok(())",
    "create other size: Conflict",
    "size: Ok(67108864)",
    "clone of base: Ok(())",
    "clone across filesystems: Unsupported",
    "clone holds: Ok(Some(\"ext4\"))",
    "clone device size: Ok(67108864)",
    "file mounts unmounted: Ok(Some([]))",
    "file mounts no device: Ok(None)",
    "file mounts: true",
    "clone_raw live: Ok(())",
    "clone_raw again: Conflict",
    "clone_raw across filesystems: Unsupported",
    "grow: Ok(())",
    "grown size: Ok(134217728)",
    "shrink: Unsupported",
    "snapshot holds: Ok(Some(\"ext4\"))",
    "snapshot size: Ok(67108864)",
    "read-only mkfs: Conflict",
    "convert raw to qcow2: Ok(())",
    "converted: qcow2 134217728",
];

#[test]
fn fake_raw_flow() {
    let (shared, plain) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let fake = Fake::new();
    fake.share_blocks(shared.path());
    let mut cleanup = Cleanup::with(fake.os());
    let seen = raw_flow(&fake.os(), shared.path(), plain.path(), &mut cleanup);
    assert_eq!(seen, RAW_EXPECTED);
    assert!(fake.loop_devices().is_empty());
    assert!(fake.mounts().is_empty());
}

/// XFS made with reflink in a file, loop-mounted; lazily unmounted on drop (after the
/// test's own `Cleanup`, declared later, has released what sits on it).
struct XfsDir(tempfile::TempDir);

impl Drop for XfsDir {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path().join("mnt"))
            .status();
    }
}

/// Every trait method the flows above leave out, and bad input for each method, as
/// observations that must be the same on the fake and on the real machine: sizes that are not
/// multiples of 512, names and paths too long for qemu or a unix socket, relative and missing
/// paths, unknown formats and filesystem types, devices that are no loop devices.
fn edge_flow(os: &Os, dir: &Path, cleanup: &mut Cleanup) -> Vec<String> {
    let mut seen = Vec::new();
    let mut note = |what: &str, v: String| seen.push(format!("{what}: {v}"));
    let size = 64u64 << 20;
    let missing = dir.join("missing");
    let no_dir = dir.join("no/such/dir");
    let long_run = dir.join("r".repeat(120));

    // ImageTool.
    let odd = dir.join("odd.qcow2");
    note(
        "create odd size",
        kind(&os.images.create_replica(&odd, 1000, None)),
    );
    note(
        "odd size as qemu rounds it",
        kind(&os.images.info(&odd).map(|i| i.virtual_size)),
    );
    note(
        "create odd size again",
        kind(&os.images.create_replica(&odd, 1000, None)),
    );
    note(
        "create too large",
        kind(
            &os.images
                .create_replica(&dir.join("huge.qcow2"), u64::MAX / 2, None),
        ),
    );
    let base = dir.join("base.qcow2");
    os.images.create_replica(&base, size, None).unwrap();
    let r = dir.join("r.qcow2");
    note(
        "create over a relative backing",
        kind(&os.images.create_replica(
            &r,
            size,
            Some((Path::new("base.qcow2"), ImageFormat::Qcow2)),
        )),
    );
    note(
        "create over a missing backing",
        kind(
            &os.images
                .create_replica(&r, size, Some((&missing, ImageFormat::Qcow2))),
        ),
    );
    // A backing file whose path is longer than qemu's 1023 bytes.
    let mut deep = dir.to_path_buf();
    for i in 0..5 {
        deep = deep.join(format!("{i}{}", "d".repeat(220)));
    }
    fs::create_dir_all(&deep).unwrap();
    let far = deep.join("base.qcow2");
    fs::copy(&base, &far).unwrap();
    note(
        "create over a backing name too long",
        kind(
            &os.images
                .create_replica(&r, size, Some((&far, ImageFormat::Qcow2))),
        ),
    );
    note(
        "create in a missing directory",
        kind(
            &os.images
                .create_replica(&no_dir.join("r.qcow2"), size, None),
        ),
    );
    note("create over a backing", {
        let made = os
            .images
            .create_replica(&r, size, Some((&base, ImageFormat::Qcow2)));
        kind(&made.and_then(|()| {
            os.images
                .info(&r)
                .map(|i| i.backing_file == Some(base.clone()))
        }))
    });
    note("info of a missing image", kind(&os.images.info(&missing)));
    let plain = dir.join("plain.raw");
    fs::write(&plain, vec![7u8; 3000]).unwrap();
    note(
        "info of a plain file",
        kind(
            &os.images
                .info(&plain)
                .map(|i| (i.format, i.virtual_size, i.backing_file)),
        ),
    );
    note(
        "resize a missing image",
        kind(&os.images.resize(&missing, size)),
    );
    note(
        "resize to the same size",
        kind(&os.images.resize(&base, size)),
    );
    note("shrink", kind(&os.images.resize(&base, size / 2)));
    note(
        "convert onto an existing file",
        kind(
            &os.images
                .convert(&r, ImageFormat::Qcow2, &base, ImageFormat::Qcow2),
        ),
    );
    note(
        "convert a missing image",
        kind(&os.images.convert(
            &missing,
            ImageFormat::Qcow2,
            &dir.join("c1.qcow2"),
            ImageFormat::Qcow2,
        )),
    );
    note(
        "convert into a missing directory",
        kind(&os.images.convert(
            &r,
            ImageFormat::Qcow2,
            &no_dir.join("c.qcow2"),
            ImageFormat::Qcow2,
        )),
    );
    note(
        "convert a raw file read as qcow2",
        kind(&os.images.convert(
            &plain,
            ImageFormat::Qcow2,
            &dir.join("c2.qcow2"),
            ImageFormat::Qcow2,
        )),
    );
    note(
        "convert a qcow2 file read as raw",
        kind(
            &os.images
                .convert(&r, ImageFormat::Raw, &dir.join("c3.raw"), ImageFormat::Raw),
        ),
    );
    note(
        "rebase a missing image",
        kind(&os.images.rebase(&missing, None, true)),
    );
    note(
        "rebase onto a relative backing",
        kind(&os.images.rebase(
            &r,
            Some((Path::new("base.qcow2"), ImageFormat::Qcow2)),
            false,
        )),
    );
    note(
        "rebase flattening",
        kind(
            &os.images
                .rebase(&r, None, true)
                .and_then(|()| os.images.info(&r).map(|i| i.backing_file)),
        ),
    );
    note(
        "rebase unsafe onto a backing",
        kind(
            &os.images
                .rebase(&r, Some((&base, ImageFormat::Qcow2)), false)
                .and_then(|()| {
                    os.images
                        .info(&r)
                        .map(|i| i.backing_file == Some(base.clone()))
                }),
        ),
    );
    let raw = dir.join("v.raw");
    note(
        "create raw of an odd size",
        kind(
            &os.images
                .create_raw(&raw, 1000, None)
                .and_then(|()| os.images.raw_size(&raw)),
        ),
    );
    note(
        "create raw over a missing base",
        kind(
            &os.images
                .create_raw(&dir.join("w.raw"), size, Some(&missing)),
        ),
    );
    note(
        "create raw in a missing directory",
        kind(&os.images.create_raw(&no_dir.join("w.raw"), size, None)),
    );
    note(
        "size of a missing raw file",
        kind(&os.images.raw_size(&missing)),
    );
    note(
        "grow a missing raw file",
        kind(&os.images.resize_raw(&missing, size)),
    );
    note(
        "grow raw to the same size",
        kind(&os.images.resize_raw(&raw, 1000)),
    );
    note(
        "clone a missing raw file",
        kind(&os.images.clone_raw(&missing, &dir.join("x.raw"))),
    );
    note(
        "clone into a missing directory",
        kind(&os.images.clone_raw(&raw, &no_dir.join("x.raw"))),
    );
    note(
        "shares blocks of a missing directory",
        kind(&os.images.shares_blocks(&no_dir)),
    );

    // Engine.
    let spec = |replicas: Vec<ReplicaTarget>, run: &Path| VolumeEngineSpec {
        volume_id: "pvc-edge".into(),
        replicas,
        run_dir: run.to_path_buf(),
        read_only: false,
    };
    let run = dir.join("run");
    cleanup.engine(&run);
    let local = |p: &Path| ReplicaTarget::Local(p.to_path_buf());
    note(
        "start with no replica",
        kind(&os.engine.start_volume(&spec(vec![], &run))),
    );
    note(
        "start with a relative replica",
        kind(
            &os.engine
                .start_volume(&spec(vec![local(Path::new("r.qcow2"))], &run)),
        ),
    );
    note(
        "start with a missing replica",
        kind(&os.engine.start_volume(&spec(vec![local(&missing)], &run))),
    );
    note(
        "start with a replica twice",
        kind(
            &os.engine
                .start_volume(&spec(vec![local(&base), local(&base)], &run)),
        ),
    );
    note(
        "start with a run directory too long",
        kind(&os.engine.start_volume(&spec(vec![local(&base)], &long_run))),
    );
    note(
        "start with an export name too long",
        kind(&os.engine.start_volume(&spec(
            vec![ReplicaTarget::Nbd {
                host: "127.0.0.1".into(),
                port: 1,
                export: "e".repeat(4097),
            }],
            &run,
        ))),
    );
    note(
        "start with no host",
        kind(&os.engine.start_volume(&spec(
            vec![ReplicaTarget::Nbd {
                host: "".into(),
                port: 1,
                export: "e".into(),
            }],
            &run,
        ))),
    );
    note(
        "start a mirror engine over qcow2",
        kind(&os.engine.start_mirror(
            &spec(vec![local(&base)], &run),
            std::time::Duration::from_secs(5),
        )),
    );
    note("status of none", kind(&os.engine.status(&run)));
    note(
        "volume status of none",
        kind(&os.engine.volume_status(&run)),
    );
    note("stop none", kind(&os.engine.stop(&run)));
    note(
        "backup of a replica no engine has open",
        kind(&os.engine.backup_replica(&base, &r)),
    );
    note(
        "mounts of a replica no engine has open",
        kind(&os.engine.engine_mounts(&base)),
    );
    note("tls", format!("{:?}", os.engine.nbd_tls()));
    let server = dir.join("server");
    cleanup.replica_server(&server);
    let export = |id: &str, path: &Path| ReplicaExport {
        replica_id: id.into(),
        path: path.to_path_buf(),
        format: ImageFormat::of_file(path),
    };
    note(
        "export with an empty id",
        kind(
            &os.engine
                .export_replica(&server, "127.0.0.1", 0, &export("", &base)),
        ),
    );
    note(
        "export with an id too long",
        kind(
            &os.engine
                .export_replica(&server, "127.0.0.1", 0, &export(&"i".repeat(4097), &base)),
        ),
    );
    note(
        "export on a bad host",
        kind(
            &os.engine
                .export_replica(&server, "a host", 0, &export("b", &base)),
        ),
    );
    note(
        "export a relative path",
        kind(&os.engine.export_replica(
            &server,
            "127.0.0.1",
            0,
            &export("b", Path::new("base.qcow2")),
        )),
    );
    note(
        "export with a run directory too long",
        kind(
            &os.engine
                .export_replica(&long_run, "127.0.0.1", 0, &export("b", &base)),
        ),
    );
    note(
        "unexport from no server",
        kind(&os.engine.unexport_replica(&server, "b")),
    );
    note(
        "force unexport from no server",
        kind(&os.engine.unexport_replica_force(&server, "b")),
    );
    note(
        "status of no server",
        kind(&os.engine.replica_server_status(&server)),
    );

    // A live engine: its replica is backed up at an instant and its mount is known.
    let state = os
        .engine
        .start_volume(&spec(vec![local(&base)], &run))
        .unwrap();
    note(
        "mounts of a replica an engine has open",
        kind(&os.engine.engine_mounts(&base)),
    );
    let target = dir.join("backup.qcow2");
    os.images.create_replica(&target, size, None).unwrap();
    note(
        "backup of a live replica",
        kind(&os.engine.backup_replica(&base, &target)),
    );

    // LoopDevices.
    let dev = os.loops.attach(&state.export_path).unwrap();
    cleanup.loop_file(&state.export_path);
    note("find of no device", kind(&os.loops.find(&plain)));
    let not_a_loop = dir.join("sda");
    note("detach no loop device", kind(&os.loops.detach(&not_a_loop)));
    note("flush no loop device", kind(&os.loops.flush(&not_a_loop)));
    note(
        "refresh no loop device",
        kind(&os.loops.refresh_size(&not_a_loop)),
    );
    let unattached = Path::new("/dev/loop99999");
    note("detach unattached", kind(&os.loops.detach(unattached)));
    note("flush unattached", kind(&os.loops.flush(unattached)));
    note(
        "refresh unattached",
        kind(&os.loops.refresh_size(unattached)),
    );
    note("detach_file of none", kind(&os.loops.detach_file(&plain)));
    note("flush", kind(&os.loops.flush(&dev)));

    // Filesystems and Mounter.
    note("probe a directory", kind(&os.fs.probe(dir)));
    note(
        "device size of a missing device",
        kind(&os.fs.device_size(&missing)),
    );
    note("grow btrfs", kind(&os.fs.grow(&dev, &missing, "btrfs")));
    note("mkfs", kind(&os.fs.mkfs(&dev, "ext4")));
    note("fs size of ext4", kind(&os.fs.fs_size(&dev, "ext4")));
    note("fs size as xfs", kind(&os.fs.fs_size(&dev, "xfs")));
    note(
        "mount in a missing directory",
        kind(&os.mounts.mount(&dev, &no_dir.join("m"), "ext4", &[])),
    );
    let mnt = dir.join("mnt");
    let bind = dir.join("bind");
    cleanup.mount(&mnt);
    cleanup.mount(&bind);
    note(
        "mount with options",
        kind(&os.mounts.mount(&dev, &mnt, "ext4", &["noatime".into()])),
    );
    note(
        "bind of a missing source",
        kind(&os.mounts.bind_mount(&missing, &dir.join("b2"), false)),
    );
    note("bind", kind(&os.mounts.bind_mount(&mnt, &bind, false)));
    note(
        "mounts of the device",
        kind(&os.mounts.mounts_of(&dev).map(|found| {
            found
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })),
    );
    note(
        "mounts of another device",
        kind(&os.mounts.mounts_of(&not_a_loop)),
    );
    note(
        "engine mounts",
        kind(
            &os.engine
                .engine_mounts(&base)
                .map(|m| m.map(|m| m == [resolve_parent(&mnt)])),
        ),
    );
    note("stats of a missing path", kind(&os.fs.stats(&missing)));
    note("freeze a missing path", kind(&os.fs.freeze(&missing)));
    note("freeze", kind(&os.fs.freeze(&mnt)));
    note("freeze again", kind(&os.fs.freeze(&mnt)));
    note("thaw", kind(&os.fs.thaw(&mnt)));
    note("thaw again", kind(&os.fs.thaw(&mnt)));
    os.mounts.unmount(&bind).unwrap();
    os.mounts.unmount(&mnt).unwrap();
    os.loops.detach(&dev).unwrap();
    os.engine.stop(&run).unwrap();

    // A raw file on a loop device picks up its new size.
    let grown = dir.join("grown.raw");
    os.images.create_raw(&grown, size, None).unwrap();
    let dev = os.loops.attach(&grown).unwrap();
    cleanup.loop_file(&grown);
    os.images.resize_raw(&grown, size * 2).unwrap();
    note("size before refresh", kind(&os.fs.device_size(&dev)));
    note("refresh", kind(&os.loops.refresh_size(&dev)));
    note("size after refresh", kind(&os.fs.device_size(&dev)));
    os.loops.detach(&dev).unwrap();
    seen
}

const EDGE_EXPECTED: &[&str] = &[
    "create odd size: Ok(())",
    "odd size as qemu rounds it: Ok(1024)",
    "create odd size again: Conflict",
    "create too large: Unsupported",
    "create over a relative backing: Unsupported",
    "create over a missing backing: NotFound",
    "create over a backing name too long: Unsupported",
    "create in a missing directory: NotFound",
    "create over a backing: Ok(true)",
    "info of a missing image: NotFound",
    "info of a plain file: Ok((Raw, 3072, None))",
    "resize a missing image: NotFound",
    "resize to the same size: Ok(())",
    "shrink: Unsupported",
    "convert onto an existing file: Conflict",
    "convert a missing image: NotFound",
    "convert into a missing directory: NotFound",
    "convert a raw file read as qcow2: Command",
    "convert a qcow2 file read as raw: Ok(())",
    "rebase a missing image: NotFound",
    "rebase onto a relative backing: Unsupported",
    "rebase flattening: Ok(None)",
    "rebase unsafe onto a backing: Ok(true)",
    "create raw of an odd size: Ok(1000)",
    "create raw over a missing base: NotFound",
    "create raw in a missing directory: NotFound",
    "size of a missing raw file: NotFound",
    "grow a missing raw file: NotFound",
    "grow raw to the same size: Ok(())",
    "clone a missing raw file: NotFound",
    "clone into a missing directory: NotFound",
    "shares blocks of a missing directory: NotFound",
    "start with no replica: Unsupported",
    "start with a relative replica: Unsupported",
    "start with a missing replica: NotFound",
    "start with a replica twice: Unsupported",
    "start with a run directory too long: Unsupported",
    "start with an export name too long: Unsupported",
    "start with no host: Unsupported",
    "start a mirror engine over qcow2: Unsupported",
    "status of none: Ok(None)",
    "volume status of none: Ok(None)",
    "stop none: Ok(())",
    "backup of a replica no engine has open: Ok(false)",
    "mounts of a replica no engine has open: Ok(None)",
    "tls: None",
    "export with an empty id: Unsupported",
    "export with an id too long: Unsupported",
    "export on a bad host: Unsupported",
    "export a relative path: Unsupported",
    "export with a run directory too long: Unsupported",
    "unexport from no server: Ok(())",
    "force unexport from no server: Ok(())",
    "status of no server: Ok(None)",
    "mounts of a replica an engine has open: Ok(Some([]))",
    "backup of a live replica: Ok(true)",
    "find of no device: Ok(None)",
    "detach no loop device: Unsupported",
    "flush no loop device: Unsupported",
    "refresh no loop device: Unsupported",
    "detach unattached: Ok(())",
    "flush unattached: NotFound",
    "refresh unattached: NotFound",
    "detach_file of none: Ok(())",
    "flush: Ok(())",
    "probe a directory: Unsupported",
    "device size of a missing device: NotFound",
    "grow btrfs: Unsupported",
    "mkfs: Ok(())",
    "fs size of ext4: Ok(Some(67108864))",
    "fs size as xfs: Ok(None)",
    "mount in a missing directory: NotFound",
    "mount with options: Ok(())",
    "bind of a missing source: NotFound",
    "bind: Ok(())",
    "mounts of the device: Ok([\"mnt\", \"bind\"])",
    "mounts of another device: Ok([])",
    "engine mounts: Ok(Some(true))",
    "stats of a missing path: NotFound",
    "freeze a missing path: Command",
    "freeze: Ok(())",
    "freeze again: Command",
    "thaw: Ok(())",
    "thaw again: Command",
    "size before refresh: Ok(67108864)",
    "refresh: Ok(())",
    "size after refresh: Ok(134217728)",
];

/// Every method of the five traits, as `Fake::called` names them: the contract test must call
/// each (add a new trait method here and to a flow).
const EVERY_METHOD: &[&str] = &[
    "images.create_replica",
    "images.resize",
    "images.info",
    "images.convert",
    "images.rebase",
    "images.create_raw",
    "images.resize_raw",
    "images.raw_size",
    "images.clone_raw",
    "images.shares_blocks",
    "engine.start",
    "engine.status",
    "engine.stop",
    "engine.start_volume",
    "engine.start_mirror",
    "engine.volume_status",
    "engine.export_replica",
    "engine.unexport_replica",
    "engine.unexport_replica_force",
    "engine.replica_server_status",
    "engine.backup_replica",
    "engine.engine_mounts",
    "engine.nbd_tls",
    "loops.attach",
    "loops.attach_read_only",
    "loops.find",
    "loops.detach",
    "loops.detach_file",
    "loops.refresh_size",
    "loops.file_mounts",
    "loops.flush",
    "mounts.mount",
    "mounts.bind_mount",
    "mounts.unmount",
    "mounts.mount_info",
    "mounts.mounts_of",
    "fs.probe",
    "fs.mkfs",
    "fs.grow",
    "fs.stats",
    "fs.freeze",
    "fs.thaw",
    "fs.device_size",
    "fs.fs_size",
];

/// A flow of calls on one machine, in a directory of its own, as what a caller observes.
type Flow = fn(&Os, &Path, &mut Cleanup) -> Vec<String>;

/// What two runs of one flow saw: equal, and as expected.
fn agree(name: &str, expected: &[&str], on_fake: &[String], on_real: Option<&[String]>) {
    if let Some(on_real) = on_real {
        let differ: Vec<String> = on_fake
            .iter()
            .zip(on_real)
            .filter(|(f, r)| f != r)
            .map(|(f, r)| format!("fake {f:?} / real {r:?}"))
            .collect();
        assert!(
            differ.is_empty() && on_fake.len() == on_real.len(),
            "{name} flow: the fake and the machine disagree:\n{}\nfake: {on_fake:?}\nreal: \
             {on_real:?}",
            differ.join("\n")
        );
    }
    assert_eq!(on_fake, expected, "{name} flow");
}

/// A directory whose filesystem shares blocks on the machine: XFS with reflink, made in a file
/// and loop-mounted under `xfs`.
fn reflink_dir(xfs: &XfsDir) -> PathBuf {
    use crate::os::testutil::sh;
    use std::process::Command;
    let image = xfs.0.path().join("xfs.img");
    fs::File::create(&image)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    sh(Command::new("mkfs.xfs")
        .args(["-q", "-m", "reflink=1"])
        .arg(&image));
    let shared = xfs.0.path().join("mnt");
    fs::create_dir(&shared).unwrap();
    sh(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&shared));
    shared
}

/// The one contract: every flow on the fake and, as root, the same flows on the machine must
/// give the expected observations, so the fake and the real implementations agree on every
/// trait method of `ImageTool`, `Engine`, `LoopDevices`, `Mounter` and `Filesystems`, with good
/// and bad input alike: the basic node flow, the loop engine's raw files (`raw_flow`), the
/// edges (`edge_flow`) and replica servers with NBD children on two machines
/// (`crate::os::nbd`'s `remote_flow`).
#[test]
fn fake_and_real_keep_one_contract() {
    let real = crate::os::root_or_skip("fake_and_real_keep_one_contract (its real half)");
    let mut called = std::collections::BTreeSet::new();
    let flows: [(&str, &[&str], Flow); 2] = [
        ("basic", EXPECTED, basic_flow),
        ("edge", EDGE_EXPECTED, edge_flow),
    ];
    for (name, expected, flow) in flows {
        let on_fake = {
            let dir = tempfile::tempdir().unwrap();
            let fake = Fake::new();
            let mut cleanup = Cleanup::with(fake.os());
            let seen = flow(&fake.os(), dir.path(), &mut cleanup);
            called.extend(fake.called());
            seen
        };
        let on_real = real.then(|| {
            let dir = tempfile::tempdir().unwrap();
            let mut cleanup = Cleanup::default();
            flow(&Os::real(), dir.path(), &mut cleanup)
        });
        agree(name, expected, &on_fake, on_real.as_deref());
    }

    let on_fake = {
        let (shared, plain) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let fake = Fake::new();
        fake.share_blocks(shared.path());
        let mut cleanup = Cleanup::with(fake.os());
        let seen = raw_flow(&fake.os(), shared.path(), plain.path(), &mut cleanup);
        called.extend(fake.called());
        seen
    };
    let on_real = real.then(|| {
        let xfs = XfsDir(tempfile::tempdir().unwrap());
        let shared = reflink_dir(&xfs);
        let plain = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        raw_flow(&Os::real(), &shared, plain.path(), &mut cleanup)
    });
    agree("raw", RAW_EXPECTED, &on_fake, on_real.as_deref());

    use crate::os::nbd::tests::{EXPECTED_REMOTE, kill_real_server, remote_flow};
    let on_fake = {
        let dir = tempfile::tempdir().unwrap();
        let nodes = Fake::new_cluster(2);
        let (a, b) = (nodes[0].os(), nodes[1].os());
        let mut cb = Cleanup::with(b.clone());
        let mut ca = Cleanup::with(a.clone());
        let node_b = nodes[1].clone();
        let seen = remote_flow(&a, &b, dir.path(), &mut ca, &mut cb, &|run_dir| {
            node_b.kill_replica_server(run_dir)
        });
        called.extend(nodes.iter().flat_map(Fake::called));
        seen
    };
    let on_real = real.then(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut cb = Cleanup::default();
        let mut ca = Cleanup::default();
        remote_flow(
            &Os::real(),
            &Os::real(),
            dir.path(),
            &mut ca,
            &mut cb,
            &kill_real_server,
        )
    });
    agree("remote", EXPECTED_REMOTE, &on_fake, on_real.as_deref());

    let missed: Vec<&str> = EVERY_METHOD
        .iter()
        .copied()
        .filter(|m| !called.contains(*m))
        .collect();
    assert!(missed.is_empty(), "no flow calls {missed:?}");
    let unknown: Vec<&String> = called
        .iter()
        .filter(|c| !EVERY_METHOD.contains(&c.as_str()))
        .collect();
    assert!(unknown.is_empty(), "EVERY_METHOD lacks {unknown:?}");
}
