//! The fakes' own rules, beyond what the contract with the machine (`contract`) can show on
//! both: locks between engines, read-only engines, crashes and injected failures, backing
//! images that carry a filesystem, one replica server kind per run directory.

use super::*;

#[test]
fn fake_engines_lock_replicas_and_readonly_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new();
    let os = fake.os();
    let r = dir.path().join("r.qcow2");
    os.images.create_replica(&r, 1 << 30, None).unwrap();
    let spec = |run: &str, ro: bool| EngineSpec {
        volume_id: "v".into(),
        replicas: vec![r.clone()],
        run_dir: dir.path().join(run),
        read_only: ro,
    };
    let a = os.engine.start(&spec("a", false)).unwrap();
    let err = os.engine.start(&spec("b", false)).unwrap_err();
    assert!(err.to_string().contains("lock"), "{err}");
    assert!(matches!(
        os.engine.start(&spec("b", true)),
        Err(OsError::Command { .. })
    ));
    let dev = os.loops.attach(&a.export_path).unwrap();
    os.fs.mkfs(&dev, "xfs").unwrap();
    os.loops.detach(&dev).unwrap();
    os.engine.stop(&dir.path().join("a")).unwrap();

    // Two read-only engines may share a replica; their devices and mounts are read-only.
    let b = os.engine.start(&spec("b", true)).unwrap();
    let c = os.engine.start(&spec("c", true)).unwrap();
    let dev = os.loops.attach(&b.export_path).unwrap();
    assert!(matches!(
        os.fs.mkfs(&dev, "ext4"),
        Err(OsError::Conflict(_))
    ));
    let mnt = dir.path().join("mnt");
    os.mounts.mount(&dev, &mnt, "xfs", &[]).unwrap();
    let info = os.mounts.mount_info(&mnt).unwrap().unwrap();
    assert_eq!(info.options[0], "ro");
    assert!(matches!(os.loops.detach(&dev), Err(OsError::Busy(_))));
    os.mounts.unmount(&mnt).unwrap();
    os.loops.detach(&dev).unwrap();
    assert_eq!(fake.engines().len(), 2);
    os.engine.stop(&dir.path().join("b")).unwrap();
    os.engine.stop(&dir.path().join("c")).unwrap();
    let _ = c;
}

#[test]
fn fake_crash_failure_injection_and_backing_images() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new();
    let os = fake.os();
    // A backing image that carries a filesystem shows through a bigger replica.
    let backing = dir.path().join("backing");
    fake.make_image(&backing, ImageFormat::Raw, 8 << 20, Some("ext4"))
        .unwrap();
    assert_eq!(os.images.info(&backing).unwrap().format, ImageFormat::Raw);
    let r = dir.path().join("r.qcow2");
    os.images
        .create_replica(&r, 32 << 20, Some((&backing, ImageFormat::Raw)))
        .unwrap();
    assert_eq!(
        os.images.info(&r).unwrap().backing_file,
        Some(backing.clone())
    );
    let spec = EngineSpec {
        volume_id: "v".into(),
        replicas: vec![r.clone()],
        run_dir: dir.path().join("run"),
        read_only: false,
    };
    let st = os.engine.start(&spec).unwrap();
    let dev = os.loops.attach(&st.export_path).unwrap();
    assert_eq!(os.fs.probe(&dev).unwrap().as_deref(), Some("ext4"));
    let mnt = dir.path().join("mnt");
    os.mounts.mount(&dev, &mnt, "ext4", &[]).unwrap();
    assert_eq!(os.fs.stats(&mnt).unwrap().total_bytes, 8 << 20);
    os.fs.grow(&dev, &mnt, "ext4").unwrap();
    assert_eq!(os.fs.stats(&mnt).unwrap().total_bytes, 32 << 20);
    // The shared backing file is untouched.
    assert_eq!(content_fs(&backing).unwrap().unwrap().size, 8 << 20);

    // Exporting the volume flattens it.
    os.mounts.unmount(&mnt).unwrap();
    os.loops.detach(&dev).unwrap();
    let err = os
        .images
        .convert(
            &r,
            ImageFormat::Qcow2,
            &dir.path().join("x"),
            ImageFormat::Qcow2,
        )
        .unwrap_err();
    assert!(err.to_string().contains("lock"), "{err}");
    os.engine.stop(&spec.run_dir).unwrap();
    let out = dir.path().join("exported.qcow2");
    os.images
        .convert(&r, ImageFormat::Qcow2, &out, ImageFormat::Qcow2)
        .unwrap();
    let info = os.images.info(&out).unwrap();
    assert_eq!(
        (info.format, info.virtual_size, info.backing_file),
        (ImageFormat::Qcow2, 32 << 20, None)
    );

    // A crashed engine: not live, its stale export blocks nothing once the loop is gone.
    let st = os.engine.start(&spec).unwrap();
    let dev = os.loops.attach(&st.export_path).unwrap();
    fake.kill_engine(&spec.run_dir);
    assert_eq!(os.engine.status(&spec.run_dir).unwrap(), None);
    assert!(matches!(os.fs.probe(&dev), Err(OsError::Io { .. })));
    assert!(matches!(os.engine.start(&spec), Err(OsError::Busy(_))));
    os.loops.detach(&dev).unwrap();
    let st2 = os.engine.start(&spec).unwrap();
    assert_ne!(st2.pid, st.pid);

    // Injected failures come once each, in order.
    fake.fail_next("fs.mkfs", OsError::NoSpace("disk full".into()));
    let dev = os.loops.attach(&st2.export_path).unwrap();
    assert!(matches!(os.fs.mkfs(&dev, "ext4"), Err(OsError::NoSpace(_))));
    assert!(matches!(
        os.fs.mkfs(&dev, "ext4"),
        Err(OsError::Conflict(_))
    ));
    os.loops.detach(&dev).unwrap();
    os.engine.stop(&spec.run_dir).unwrap();
    assert!(fake.engines().is_empty());
}

#[test]
fn fake_sniffs_real_filesystems_in_raw_files() {
    let mut head = vec![0u8; 2048];
    assert_eq!(sniff_fs(&head), None);
    head[1080] = 0x53;
    head[1081] = 0xef;
    assert_eq!(sniff_fs(&head).as_deref(), Some("ext4"));
    assert_eq!(sniff_fs(b"XFSB....").as_deref(), Some("xfs"));
}

/// A run directory holds one replica server: raw replicas (bicsi's server) and qcow2 ones
/// (qemu-storage-daemon) in the same one conflict, as on the real engine
/// (`tests/replica_server.rs` checks the real side).
#[test]
fn fake_replica_servers_are_one_kind_per_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fake = Fake::new();
    let os = fake.os();
    let (raw, qcow2) = (d.join("r.raw"), d.join("q.qcow2"));
    os.images.create_raw(&raw, 1 << 20, None).unwrap();
    os.images.create_replica(&qcow2, 1 << 20, None).unwrap();
    let export = |id: &str, path: &Path, format| ReplicaExport {
        replica_id: id.into(),
        path: path.to_path_buf(),
        format,
    };
    let (raw_dir, qemu_dir) = (d.join("replica-server-raw"), d.join("replica-server"));
    let port = os
        .engine
        .export_replica(
            &raw_dir,
            "127.0.0.1",
            0,
            &export("r", &raw, ImageFormat::Raw),
        )
        .unwrap();
    let err = os
        .engine
        .export_replica(
            &raw_dir,
            "127.0.0.1",
            0,
            &export("q", &qcow2, ImageFormat::Qcow2),
        )
        .unwrap_err();
    assert!(matches!(err, OsError::Conflict(_)), "{err}");
    assert!(
        err.to_string().contains("run directory of its own"),
        "{err}"
    );
    let qport = os
        .engine
        .export_replica(
            &qemu_dir,
            "127.0.0.1",
            0,
            &export("q", &qcow2, ImageFormat::Qcow2),
        )
        .unwrap();
    assert_ne!(port, qport);
    assert_eq!(
        os.engine.replica_server_status(&raw_dir).unwrap(),
        Some((port, vec!["r".to_string()]))
    );
    os.engine.unexport_replica(&raw_dir, "r").unwrap();
    os.engine.unexport_replica(&qemu_dir, "q").unwrap();
    assert!(fake.replica_servers().is_empty());
}
