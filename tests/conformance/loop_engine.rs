//! The loop engine (issue 14): which engine a volume gets on the disk kinds CI has (a directory
//! on ext4, XFS with reflink on a loop device), data written with fio's crc32c verification read
//! back through detaches, restarts and re-adoption, and snapshots, restores and clones into
//! either engine, expansion and exports of loop volumes, with the bytes checked through the
//! mounted volumes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use tonic::Code;

use super::backing::{attach, create_with, detach};
use super::harness::*;
use super::images::*;
use crate::kit::noise;
use bicsi::client::CsiClient;
use bicsi::csi::pb;

/// An XFS filesystem made with reflink in a sparse file, on a loop device in a temp dir; on
/// drop (also when a test fails) whatever is left on it (mounts, loop devices of replicas)
/// goes, then the filesystem is unmounted (`kit::LoopFs`).
pub(super) struct Xfs {
    fs: crate::kit::LoopFs,
    _dir: tempfile::TempDir,
}

impl Xfs {
    /// None (the test skips, saying why) where mkfs.xfs is missing; CI installs xfsprogs.
    pub(super) fn new(test: &str, mib: u64) -> Option<Xfs> {
        if !crate::kit::may_run(
            crate::kit::have_tool("mkfs.xfs"),
            &format!("{test}: mkfs.xfs is not installed (xfsprogs)"),
        ) {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("bicsi-xfs-")
            .tempdir()
            .unwrap();
        let fs = crate::kit::LoopFs::xfs(
            &dir.path().join("xfs.img"),
            &dir.path().join("mnt"),
            mib << 20,
        )
        .unwrap();
        Some(Xfs { fs, _dir: dir })
    }

    pub(super) fn path(&self) -> PathBuf {
        self.fs.mnt.clone()
    }
}

/// Whether fio is there for `test` (see `kit::may_run`: CI must not skip).
pub(super) fn have_fio(test: &str) -> bool {
    crate::kit::may_run(
        crate::kit::have_tool("fio"),
        &format!("{test}: fio is not installed"),
    )
}

/// A qcow2 image of an ext4 filesystem of `mib` MiB in `b`'s work directory, served over HTTP,
/// and the volume parameters that make it the backing image `name` (downloaded), after
/// `params`; the server is returned to keep it up.
pub(super) async fn served_qcow2(
    b: &Bicsi,
    mib: u64,
    name: &str,
    params: &[(&str, &str)],
) -> (ImageServer, Vec<(String, String)>) {
    let work = b.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = ext4_image(&work, mib);
    let qcow = to_qcow2(&work, &raw);
    let server = ImageServer::start([("img.qcow2".to_string(), qcow)].into()).await;
    let url = format!("{{\"url\": \"{}\"}}", server.url("img.qcow2"));
    let mut all = pairs(params);
    all.extend(pairs(&[
        ("backingImage", name),
        ("backingImageDataSourceType", "download"),
        ("backingImageDataSourceParameters", &url),
    ]));
    (server, all)
}

pub(super) fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `bicsi get volume NAME -o json`: the view with the engine and the controller's record.
pub(super) fn volume_view(b: &Bicsi, name: &str) -> serde_json::Value {
    let (ok, out, err) = b.cli(&["get", "volume", name, "-o", "json"]);
    assert!(ok, "get volume {name}: {err}");
    serde_json::from_str(&out).unwrap()
}

pub(super) fn engine_of(b: &Bicsi, name: &str) -> String {
    volume_view(b, name)["engine"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The volume's replica files as its record names them.
pub(super) fn replica_paths(b: &Bicsi, name: &str) -> Vec<PathBuf> {
    volume_view(b, name)["record"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| PathBuf::from(r["path"].as_str().unwrap()))
        .collect()
}

/// Creates a volume (twice: CreateVolume is idempotent) and answers its id.
pub(super) async fn create(c: &mut CsiClient, req: pb::CreateVolumeRequest) -> String {
    let v = create_retrying(c, req.clone()).await.unwrap();
    let again = create_retrying(c, req).await.unwrap();
    assert_eq!(v.volume_id, again.volume_id);
    v.volume_id
}

#[tokio::test]
async fn the_engine_is_chosen_by_disk_and_replicas() {
    if !root_or_skip("the_engine_is_chosen_by_disk_and_replicas") {
        return;
    }
    let Some(xfs) = Xfs::new("the_engine_is_chosen_by_disk_and_replicas", 512) else {
        return;
    };
    // A directory on ext4 (the temp dir): no reflink, so in this one-node cluster the mirror
    // engine over a copy-on-write replica (qemu when pinned), and a pinned loop is refused.
    let ext4 = Bicsi::start(1).await;
    let mut c = ext4.client().await;
    let one = pairs(&[("numberOfReplicas", "1")]);
    create(&mut c, create_with("plain", 16 * MIB, &one, mount_cap())).await;
    assert_eq!(engine_of(&ext4, "plain"), "mirror");
    let r = replica_paths(&ext4, "plain");
    assert!(r[0].ends_with("volume.cow") && r[0].is_file(), "{r:?}");
    let record = &volume_view(&ext4, "plain")["record"]["replicas"][0];
    assert_eq!(record["format"], "cow", "{record}");
    let q = pairs(&[("numberOfReplicas", "1"), ("engine", "qemu")]);
    create(&mut c, create_with("plainq", 16 * MIB, &q, mount_cap())).await;
    assert_eq!(engine_of(&ext4, "plainq"), "qemu");
    let r = replica_paths(&ext4, "plainq");
    assert!(r[0].ends_with("volume.qcow2") && r[0].is_file(), "{r:?}");
    let pinned = pairs(&[("numberOfReplicas", "1"), ("engine", "loop")]);
    assert_code(
        c.controller
            .create_volume(create_with("pinned", 16 * MIB, &pinned, mount_cap()))
            .await,
        Code::FailedPrecondition,
        "shares blocks",
    );
    let bad = pairs(&[("engine", "fuse")]);
    assert_code(
        c.controller
            .create_volume(create_with("bad", 16 * MIB, &bad, mount_cap()))
            .await,
        Code::InvalidArgument,
        "auto (the default), loop, mirror or qemu",
    );

    // XFS with reflink: one replica is loop, several stay on qemu, loop with several is refused.
    let b = Bicsi::start_with(0, &["--disk", xfs.path().to_str().unwrap()]).await;
    let mut c = b.client().await;
    create(&mut c, create_with("fast", 16 * MIB, &one, mount_cap())).await;
    assert_eq!(engine_of(&b, "fast"), "loop");
    let r = replica_paths(&b, "fast");
    assert!(r[0].ends_with("volume.raw"), "{r:?}");
    let meta = std::fs::metadata(&r[0]).unwrap();
    assert_eq!(meta.len(), 16 << 20);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.blocks(), 0, "a new raw replica is sparse");
    let two = pairs(&[("numberOfReplicas", "2")]);
    create(&mut c, create_with("quorum", 16 * MIB, &two, mount_cap())).await;
    assert_eq!(engine_of(&b, "quorum"), "qemu");
    let two_loop = pairs(&[("numberOfReplicas", "2"), ("engine", "loop")]);
    assert_code(
        c.controller
            .create_volume(create_with("loop2", 16 * MIB, &two_loop, mount_cap()))
            .await,
        Code::InvalidArgument,
        "numberOfReplicas: 1",
    );
    let qemu = pairs(&[("numberOfReplicas", "1"), ("engine", "qemu")]);
    create(&mut c, create_with("pinnedq", 16 * MIB, &qemu, mount_cap())).await;
    assert_eq!(engine_of(&b, "pinnedq"), "qemu");
    let (ok, wide, err) = b.cli(&["get", "volumes", "-o", "wide"]);
    assert!(ok, "{err}");
    assert!(wide.lines().next().unwrap().contains("ENGINE"), "{wide}");
    let row = wide.lines().find(|l| l.starts_with("fast ")).unwrap();
    assert!(row.contains(" loop "), "{wide}");
    let (ok, one_row, _) = b.cli(&["get", "volume", "quorum"]);
    assert!(ok && one_row.contains(" qemu "), "{one_row}");
    // A loop volume cannot be given more replicas.
    assert_code(
        c.controller
            .controller_modify_volume(pb::ControllerModifyVolumeRequest {
                volume_id: "fast".into(),
                mutable_parameters: [("numberOfReplicas".to_string(), "2".to_string())].into(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "loop engine",
    );
    for v in ["fast", "quorum", "pinnedq"] {
        c.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: v.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(!r[0].exists());
}

/// A crash (SIGKILL) and a restart of bicsi while fio writes to `dev` (rate-limited, so the
/// writes span both): every write must still go through and verify.
pub(super) async fn kill_and_restart_while_fio_writes(b: &mut Bicsi, dev: &Path) {
    let writer = Command::new("fio")
        .args([
            "--name=during",
            &format!("--filename={}", dev.display()),
            "--rw=randwrite",
            "--bs=4k",
            "--offset=56M",
            "--size=8M",
            "--rate=4m",
            "--ioengine=libaio",
            "--iodepth=8",
            "--direct=1",
            "--verify=crc32c",
            "--verify_fatal=1",
            // No `*-verify.state` file in the working directory (the repository's, under cargo).
            "--verify_state_save=0",
            "--output-format=terse",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    b.kill();
    b.restart().await;
    let out = writer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio across the restart: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// fio over `dev`: `write` lays down a crc32c-verified pattern (random 4k at depth 32, then
/// sequential 1M) and reads it back; otherwise only verifies what an earlier run wrote.
pub(super) fn fio(dev: &Path, write: bool) {
    for (name, rw, bs) in [("rand", "randwrite", "4k"), ("seq", "write", "1M")] {
        let offset = if name == "rand" { "0" } else { "32M" };
        let mut cmd = Command::new("fio");
        cmd.args([
            &format!("--name={name}"),
            &format!("--filename={}", dev.display()),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--offset={offset}"),
            "--size=24M",
            "--ioengine=libaio",
            "--iodepth=32",
            "--direct=1",
            "--verify=crc32c",
            "--verify_fatal=1",
            // No `*-verify.state` file in the working directory (the repository's, under cargo).
            "--verify_state_save=0",
            "--randrepeat=1",
            "--output-format=terse",
        ]);
        if !write {
            cmd.arg("--verify_only");
        }
        let out = cmd.output().expect("fio");
        assert!(
            out.status.success(),
            "fio {name} (write={write}) failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn a_loop_volume_keeps_fio_verified_data_through_detach_restart_and_readoption() {
    let test = "a_loop_volume_keeps_fio_verified_data_through_detach_restart_and_readoption";
    if !root_or_skip(test) {
        return;
    }
    if !have_fio(test) {
        return;
    }
    let Some(xfs) = Xfs::new(test, 512) else {
        return;
    };
    let mut b = Bicsi::start_with(0, &["--disk", xfs.path().to_str().unwrap()]).await;
    let mut c = b.client().await;
    let one = pairs(&[("numberOfReplicas", "1")]);
    let id = create(&mut c, create_with("data", 64 * MIB, &one, block_cap())).await;
    assert_eq!(engine_of(&b, "data"), "loop");
    let replica = replica_paths(&b, "data").remove(0);

    let (st, tg) = attach(&mut c, &b, &id, block_cap()).await;
    // No engine process: the loop device sits on the raw replica itself.
    assert!(engines_under(b.dir.path()).is_empty(), "an engine runs");
    let loops = loops_under(&xfs.path());
    assert_eq!(loops.len(), 1, "{loops:?}");
    fio(&tg, true);
    detach(&mut c, &id, &st, &tg).await;
    assert!(
        loops_under(&xfs.path()).is_empty(),
        "the loop device stayed"
    );

    // A restart of bicsi while the volume is detached, then attach again: the data is there.
    b.restart().await;
    let mut c = b.client().await;
    let (st, tg) = attach(&mut c, &b, &id, block_cap()).await;
    fio(&tg, false);

    // A restart while it is staged re-adopts it: the loop device stays, a repeated stage finds
    // it in place, and the data written before reads back.
    let dev_before = loops_under(&xfs.path());
    b.restart().await;
    assert!(b.log().contains("re-adopted staged volume"), "{}", b.log());
    let mut c = b.client().await;
    c.node
        .node_stage_volume(stage_req(&id, &st, block_cap()))
        .await
        .unwrap();
    assert_eq!(loops_under(&xfs.path()), dev_before);
    fio(&tg, false);
    // A crash (SIGKILL) and a restart of bicsi while fio writes (rate-limited, so it spans
    // them) change nothing either: the writes go on through the loop device and verify.
    kill_and_restart_while_fio_writes(&mut b, &tg).await;
    let mut c = b.client().await;
    fio(&tg, false);
    detach(&mut c, &id, &st, &tg).await;
    assert!(loops_under(&xfs.path()).is_empty());
    assert!(replica.is_file());
    for _ in 0..2 {
        c.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(!replica.exists());
}

/// Writes a file and makes it durable (data, inode and directory entry).
pub(super) fn write_synced(dir: &Path, name: &str, bytes: &[u8]) {
    let mut f = std::fs::File::create(dir.join(name)).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

pub(super) fn snap_req(
    name: &str,
    source: &str,
    params: &[(&str, &str)],
) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn from_source(
    name: &str,
    params: &[(String, String)],
    source: pb::volume_content_source::Type,
) -> pb::CreateVolumeRequest {
    let mut req = create_with(name, 0, params, mount_cap());
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(source),
    });
    req
}

fn of_snapshot(id: &str) -> pb::volume_content_source::Type {
    pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
        snapshot_id: id.into(),
    })
}

/// Attaches `id` (mount), checks that it holds exactly `want` (file name → bytes; None: the
/// file must not be there) and the backing image's hello.txt, and detaches it; answers the
/// size of its filesystem.
async fn check_content(
    c: &mut CsiClient,
    b: &Bicsi,
    id: &str,
    want: &[(&str, Option<&[u8]>)],
) -> u64 {
    let (st, tg) = attach(c, b, id, mount_cap()).await;
    assert_eq!(
        std::fs::read(tg.join("hello.txt")).unwrap(),
        b"hello from the backing image\n",
        "{id}: the image's content"
    );
    for (name, bytes) in want {
        match bytes {
            Some(bytes) => assert!(
                std::fs::read(tg.join(name)).unwrap() == *bytes,
                "{id}: {name} differs"
            ),
            None => assert!(!tg.join(name).exists(), "{id}: {name} should not be there"),
        }
    }
    let total = nix::sys::statvfs::statvfs(&tg).unwrap();
    let bytes = total.blocks() as u64 * total.fragment_size() as u64;
    detach(c, id, &st, &tg).await;
    bytes
}

#[tokio::test]
async fn loop_volumes_snapshot_restore_clone_expand_and_export() {
    let test = "loop_volumes_snapshot_restore_clone_expand_and_export";
    if !root_or_skip(test) {
        return;
    }
    let Some(xfs) = Xfs::new(test, 1024) else {
        return;
    };
    let b = Bicsi::start_with(0, &["--disk", xfs.path().to_str().unwrap()]).await;
    let mut c = b.client().await;
    // A qcow2 image: the loop engine's replicas start from its raw expansion on the disk.
    let (_server, image) = served_qcow2(&b, 32, "bi-loop", &[("numberOfReplicas", "1")]).await;
    let src = create(&mut c, create_with("src", 64 * MIB, &image, mount_cap())).await;
    assert_eq!(engine_of(&b, "src"), "loop");
    let (st, tg) = attach(&mut c, &b, &src, mount_cap()).await;
    let expansions: Vec<PathBuf> = std::fs::read_dir(xfs.path().join("backing-images"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("backing.raw"))
        .filter(|p| p.is_file())
        .collect();
    assert_eq!(expansions.len(), 1, "the disk's raw expansion of the image");
    assert_eq!(
        std::fs::read(tg.join("hello.txt")).unwrap(),
        b"hello from the backing image\n"
    );
    let before = noise(4 << 20, 1);
    write_synced(&tg, "before.bin", &before);

    // A snapshot of the attached volume: flush, then one reflink clone.
    let s1 = c
        .controller
        .create_snapshot(snap_req("s1", &src, &[]))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(s1.ready_to_use);
    let snap_file = xfs
        .path()
        .join("snapshots")
        .join(&s1.snapshot_id)
        .join("snapshot.raw");
    assert!(snap_file.is_file(), "{}", snap_file.display());
    let after = noise(1 << 20, 2);
    write_synced(&tg, "after.bin", &after);
    // Exported as a backing image while attached (type: bi, qcow2).
    c.controller
        .create_snapshot(snap_req(
            "s-bi",
            &src,
            &[("type", "bi"), ("export-type", "qcow2")],
        ))
        .await
        .unwrap();
    let exported = wait_final(&b, "s-bi").await;
    assert!(
        exported["status"]["diskFileStatusMap"]
            .as_object()
            .unwrap()
            .values()
            .all(|f| f["state"] == "ready"),
        "{exported}"
    );
    // A clone of the attached volume.
    let clone = create(
        &mut c,
        from_source(
            "clone",
            &pairs(&[("numberOfReplicas", "1")]),
            pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
                volume_id: src.clone(),
            }),
        ),
    )
    .await;
    detach(&mut c, &src, &st, &tg).await;

    // Restores of the snapshot into either engine.
    let r_loop = create(
        &mut c,
        from_source(
            "r-loop",
            &pairs(&[("numberOfReplicas", "1")]),
            of_snapshot(&s1.snapshot_id),
        ),
    )
    .await;
    let r_qemu = create(
        &mut c,
        from_source(
            "r-qemu",
            &pairs(&[("numberOfReplicas", "1"), ("engine", "qemu")]),
            of_snapshot(&s1.snapshot_id),
        ),
    )
    .await;
    assert_eq!(engine_of(&b, "clone"), "loop");
    assert_eq!(engine_of(&b, "r-loop"), "loop");
    assert_eq!(engine_of(&b, "r-qemu"), "qemu");
    let snapped: &[(&str, Option<&[u8]>)] = &[("before.bin", Some(&before)), ("after.bin", None)];
    check_content(&mut c, &b, &r_loop, snapped).await;
    check_content(&mut c, &b, &r_qemu, snapped).await;
    let all: &[(&str, Option<&[u8]>)] =
        &[("before.bin", Some(&before)), ("after.bin", Some(&after))];
    check_content(&mut c, &b, &clone, all).await;

    // A qemu volume's snapshot restored into a loop volume (qcow2 flattened into raw).
    let q = create(
        &mut c,
        from_source(
            "q",
            &pairs(&[("numberOfReplicas", "1"), ("engine", "qemu")]),
            of_snapshot(&s1.snapshot_id),
        ),
    )
    .await;
    let sq = c
        .controller
        .create_snapshot(snap_req("sq", &q, &[]))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let q2l = create(
        &mut c,
        from_source(
            "q2l",
            &pairs(&[("numberOfReplicas", "1")]),
            of_snapshot(&sq.snapshot_id),
        ),
    )
    .await;
    assert_eq!(engine_of(&b, "q2l"), "loop");
    check_content(&mut c, &b, &q2l, snapped).await;

    // The exported image is the volume as it was: a new volume over it holds both files.
    let over_export = create(
        &mut c,
        create_with(
            "over-export",
            64 * MIB,
            &pairs(&[("numberOfReplicas", "1"), ("backingImage", "s-bi")]),
            mount_cap(),
        ),
    )
    .await;
    assert_eq!(engine_of(&b, "over-export"), "loop");
    check_content(&mut c, &b, &over_export, all).await;

    // Expansion (offline) of the loop volume: the raw file grows, the filesystem with it.
    let grown = c
        .controller
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: src.clone(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 128 * MIB);
    let replica = replica_paths(&b, "src").remove(0);
    assert_eq!(std::fs::metadata(&replica).unwrap().len(), 128 << 20);
    let fs_bytes = check_content(&mut c, &b, &src, all).await;
    assert!(
        fs_bytes > 100 << 20,
        "the filesystem grew: {fs_bytes} bytes"
    );

    // export-from-volume of the detached loop volume (raw, read with -f raw): a qemu volume
    // over the exported image holds everything.
    let exported_params = pairs(&[
        ("numberOfReplicas", "1"),
        ("engine", "qemu"),
        ("backingImage", "bi-from-loop"),
        ("backingImageDataSourceType", "export-from-volume"),
        (
            "backingImageDataSourceParameters",
            "{\"volume-name\": \"src\", \"export-type\": \"raw\"}",
        ),
    ]);
    let over_volume_export = create(
        &mut c,
        create_with(
            "over-volume-export",
            128 * MIB,
            &exported_params,
            mount_cap(),
        ),
    )
    .await;
    assert_eq!(engine_of(&b, "over-volume-export"), "qemu");
    check_content(&mut c, &b, &over_volume_export, all).await;

    // Removing the image's raw expansion breaks nothing: the clones do not depend on it.
    std::fs::remove_file(&expansions[0]).unwrap();
    check_content(&mut c, &b, &r_loop, snapped).await;

    for s in [&s1.snapshot_id, &sq.snapshot_id] {
        c.controller
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: s.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(!snap_file.exists());
    for v in [
        &over_volume_export,
        &over_export,
        &q2l,
        &q,
        &r_loop,
        &r_qemu,
        &clone,
        &src,
    ] {
        c.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: v.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let left: Vec<_> = std::fs::read_dir(xfs.path().join("replicas"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A group snapshot of two attached loop volumes: their filesystems (mounted from the loop
/// devices, no engine) are frozen around the reflink clones, and the members restore to what
/// was written before; an attached raw block member is refused (its writes cannot be held).
#[tokio::test]
async fn a_group_snapshot_of_attached_loop_volumes() {
    let test = "a_group_snapshot_of_attached_loop_volumes";
    if !root_or_skip(test) {
        return;
    }
    let Some(xfs) = Xfs::new(test, 1024) else {
        return;
    };
    let b = Bicsi::start_with(0, &["--disk", xfs.path().to_str().unwrap()]).await;
    let mut c = b.client().await;
    let one = pairs(&[("numberOfReplicas", "1")]);
    let mut attached = Vec::new();
    for name in ["ga", "gb"] {
        let id = create(&mut c, create_with(name, 32 * MIB, &one, mount_cap())).await;
        assert_eq!(engine_of(&b, name), "loop");
        let (st, tg) = attach(&mut c, &b, &id, mount_cap()).await;
        write_synced(&tg, "log.txt", format!("{name} before").as_bytes());
        attached.push((id, st, tg));
    }
    let group = c
        .group
        .create_volume_group_snapshot(pb::CreateVolumeGroupSnapshotRequest {
            name: "g1".into(),
            source_volume_ids: attached.iter().map(|(id, _, _)| id.clone()).collect(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", b.log()))
        .into_inner()
        .group_snapshot
        .unwrap();
    for (_, _, tg) in &attached {
        write_synced(tg, "log.txt", b"after");
    }
    for (id, st, tg) in &attached {
        detach(&mut c, id, st, tg).await;
    }
    for (i, (id, _, _)) in attached.iter().enumerate() {
        let member = group
            .snapshots
            .iter()
            .find(|s| &s.source_volume_id == id)
            .unwrap();
        let name = format!("gr{i}");
        let restored = create(
            &mut c,
            from_source(&name, &one, of_snapshot(&member.snapshot_id)),
        )
        .await;
        let (st, tg) = attach(&mut c, &b, &restored, mount_cap()).await;
        assert_eq!(
            std::fs::read_to_string(tg.join("log.txt")).unwrap(),
            format!("{id} before")
        );
        detach(&mut c, &restored, &st, &tg).await;
    }

    // A raw block loop volume attached: no filesystem to freeze, the group is refused.
    let blk = create(&mut c, create_with("gblk", 32 * MIB, &one, block_cap())).await;
    let (st, tg) = attach(&mut c, &b, &blk, block_cap()).await;
    assert_code(
        c.group
            .create_volume_group_snapshot(pb::CreateVolumeGroupSnapshotRequest {
                name: "g2".into(),
                source_volume_ids: vec![attached[0].0.clone(), blk.clone()],
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "raw block volume",
    );
    detach(&mut c, &blk, &st, &tg).await;
}
