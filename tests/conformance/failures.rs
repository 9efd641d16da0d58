//! An attach that fails at any step leaves nothing behind: no engine, FUSE export, loop device,
//! mount or record of the volume, and a later detach and delete succeed and leave nothing
//! either. Each step is made to fail for real (as root: real engines, loop devices and mkfs): a
//! program that is missing or fails (bicsi runs with a PATH of its own, `FailingPath`), a mount
//! option the kernel refuses, a filesystem its volume is too small for. What an older version's
//! failed attach left (an engine and a loop device with no record) goes with the next detach or
//! delete.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tonic::Code;

use super::harness::*;
use bicsi::client::CsiClient;
use bicsi::csi::pb;

/// A directory of links to every program of this process's PATH, with some left out and some
/// replaced by scripts: the PATH of a bicsi whose tools fail on purpose.
struct FailingPath {
    dir: PathBuf,
}

impl FailingPath {
    /// `scripts`: (program, shell script body) pairs; `$REAL` in a body is the real program.
    fn new(b: &Bicsi, missing: &[&str], scripts: &[(&str, &str)]) -> FailingPath {
        let dir = b.path("failing-bin");
        std::fs::create_dir_all(&dir).unwrap();
        let path = std::env::var("PATH").unwrap_or_default();
        for d in std::env::split_paths(&path) {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(n) = name.to_str() else { continue };
                let link = dir.join(n);
                if missing.contains(&n) || link.exists() {
                    continue;
                }
                let real = e.path();
                if let Some((_, body)) = scripts.iter().find(|(p, _)| *p == n) {
                    let text = format!(
                        "#!/bin/sh\nREAL={}\n{}\n",
                        real.display(),
                        body.replace("$REAL", "\"$REAL\"")
                    );
                    std::fs::write(&link, text).unwrap();
                    std::fs::set_permissions(&link, std::fs::Permissions::from_mode(0o755))
                        .unwrap();
                } else {
                    let _ = std::os::unix::fs::symlink(&real, &link);
                }
            }
        }
        FailingPath { dir }
    }

    fn env(&self) -> String {
        self.dir.display().to_string()
    }
}

/// bicsi with one disk whose `serve` runs with `missing` programs left out of its PATH and
/// `scripts` in place of others.
async fn bicsi_with(missing: &[&str], scripts: &[(&str, &str)]) -> Bicsi {
    let mut b = Bicsi::start(1).await;
    let path = FailingPath::new(&b, missing, scripts);
    b.env = vec![("PATH".into(), path.env())];
    b.restart().await;
    b
}

async fn create(c: &mut CsiClient, name: &str, bytes: i64, params: &[(&str, &str)]) {
    c.controller
        .create_volume(create_req(name, bytes, params))
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
}

fn mount_cap_with(fs_type: &str, flags: &[&str]) -> pb::VolumeCapability {
    let mut cap = mount_cap();
    if let Some(pb::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.fs_type = fs_type.into();
        m.mount_flags = flags.iter().map(|f| f.to_string()).collect();
    }
    cap
}

/// Nothing of `id`'s data path remains on the node: no mount, loop device or engine under the
/// test directory, no engine run directory, and no stage record (NodeGetVolumeStats at the
/// staging path answers NotFound).
async fn assert_nothing_left(b: &Bicsi, c: &mut CsiClient, id: &str, staging: &Path) {
    let dir = b.dir.path();
    assert!(
        mounts_under(dir).is_empty(),
        "mounts left: {:?}\n{}",
        mounts_under(dir),
        b.log()
    );
    assert!(
        loops_under(dir).is_empty(),
        "loop devices left: {:?}\n{}",
        loops_under(dir),
        b.log()
    );
    assert!(
        engines_under(dir).is_empty() && mirror_engines_under(dir).is_empty(),
        "engines left: {:?} {:?}\n{}",
        engines_under(dir),
        mirror_engines_under(dir),
        b.log()
    );
    let run_dir = b.data_dir().join("engines").join(id);
    assert!(!run_dir.exists(), "{} is left", run_dir.display());
    let stats = c
        .node
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: staging.display().to_string(),
            staging_target_path: String::new(),
        })
        .await;
    if let Ok(r) = &stats {
        panic!("a stage record of {id} is left: {r:?}");
    }
}

/// The failed RPC is in bicsi's log with its method, code and volume id.
fn assert_logged(b: &Bicsi, method: &str, code: Code, id: &str) {
    let log = b.log();
    let found = log.lines().any(|l| {
        l.contains("call failed")
            && l.contains(method)
            && l.contains(&format!("volume={id}"))
            && l.contains(&format!("code={code:?}"))
    });
    assert!(
        found,
        "no log line for the failed {method} ({code:?}) of {id}:\n{log}"
    );
}

/// What a user does after a failed attach: detach (NodeUnstage, ControllerUnpublish), each twice,
/// then delete; all succeed, and nothing of the volume is left, its replica files included.
async fn detach_and_delete(b: &Bicsi, c: &mut CsiClient, id: &str, staging: &Path) {
    for _ in 0..2 {
        c.node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("unstage {id}: {e}\n{}", b.log()));
    }
    unpublish_and_delete(c, id).await;
    assert_nothing_left(b, c, id, staging).await;
    assert!(
        replica_files(b, id).is_empty(),
        "replicas left: {:?}",
        replica_files(b, id)
    );
}

/// The volume's replica files on the test's disks.
fn replica_files(b: &Bicsi, id: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for disk in &b.disks {
        let Ok(entries) = std::fs::read_dir(disk.join("replicas")) else {
            continue;
        };
        for e in entries.flatten() {
            if !e
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{id}-"))
            {
                continue;
            }
            // qemu's qcow2, the loop and mirror engines' raw file, or a copy-on-write replica's
            // data file (the default on this one-node ext4 cluster).
            for name in ["volume.qcow2", "volume.raw", "volume.cow"] {
                let file = e.path().join(name);
                if file.exists() {
                    out.push(file);
                }
            }
        }
    }
    out
}

/// Creates and ControllerPublishes `id`, then stages it with `cap` twice: both stages fail with
/// `code` and a message naming `needle`, and leave nothing behind; then detach and delete.
async fn stage_fails_and_leaves_nothing(
    b: &Bicsi,
    id: &str,
    bytes: i64,
    cap: pb::VolumeCapability,
    code: Code,
    needle: &str,
) {
    stage_fails_and_leaves_nothing_on(b, id, bytes, cap, code, needle, "").await;
}

/// `stage_fails_and_leaves_nothing` for a volume of StorageClass parameter `engine` ("": the
/// default).
async fn stage_fails_and_leaves_nothing_on(
    b: &Bicsi,
    id: &str,
    bytes: i64,
    cap: pb::VolumeCapability,
    code: Code,
    needle: &str,
    engine: &str,
) {
    let mut c = b.client().await;
    let staging = b.path("staging");
    let mut params = vec![("numberOfReplicas", "1")];
    if !engine.is_empty() {
        params.push(("engine", engine));
    }
    create(&mut c, id, bytes, &params).await;
    c.controller
        .controller_publish_volume(cpublish_req(id, cap.clone(), false))
        .await
        .unwrap();
    // Twice: a retried stage fails the same way and still leaves nothing.
    for _ in 0..2 {
        let r = c
            .node
            .node_stage_volume(stage_req(id, &staging, cap.clone()))
            .await;
        assert_code(r, code, needle);
        assert_nothing_left(b, &mut c, id, &staging).await;
    }
    assert_logged(b, "NodeStageVolume", code, id);
    detach_and_delete(b, &mut c, id, &staging).await;
}

#[tokio::test]
async fn stage_with_mkfs_missing_leaves_nothing() {
    if !root_or_skip("stage_with_mkfs_missing_leaves_nothing") {
        return;
    }
    let b = bicsi_with(&["mkfs.xfs"], &[]).await;
    stage_fails_and_leaves_nothing(
        &b,
        "nomkfs",
        320 * MIB,
        mount_cap_with("xfs", &[]),
        Code::Internal,
        "mkfs.xfs",
    )
    .await;
}

#[tokio::test]
async fn stage_with_mkfs_failing_leaves_nothing() {
    if !root_or_skip("stage_with_mkfs_failing_leaves_nothing") {
        return;
    }
    // XFS needs 300 MiB: a 16 MiB volume made for ext4 but staged as xfs fails in mkfs.xfs.
    let b = Bicsi::start(1).await;
    stage_fails_and_leaves_nothing(
        &b,
        "smallxfs",
        16 * MIB,
        mount_cap_with("xfs", &[]),
        Code::Internal,
        "300 MiB",
    )
    .await;
}

#[tokio::test]
async fn stage_with_mount_failing_leaves_nothing() {
    if !root_or_skip("stage_with_mount_failing_leaves_nothing") {
        return;
    }
    let b = Bicsi::start(1).await;
    stage_fails_and_leaves_nothing(
        &b,
        "badmount",
        16 * MIB,
        mount_cap_with("", &["bicsi_no_such_option"]),
        Code::Internal,
        "mount",
    )
    .await;
}

#[tokio::test]
async fn stage_with_loop_attach_failing_leaves_nothing() {
    if !root_or_skip("stage_with_loop_attach_failing_leaves_nothing") {
        return;
    }
    // losetup refuses to attach (as when no loop device is free) but still detaches and lists.
    let script = r#"case " $* " in
  *" --find "*) echo "losetup: cannot find an unused loop device" >&2; exit 1;;
esac
exec $REAL "$@""#;
    let b = bicsi_with(&[], &[("losetup", script)]).await;
    stage_fails_and_leaves_nothing(
        &b,
        "noloop",
        16 * MIB,
        mount_cap(),
        Code::Internal,
        "unused loop device",
    )
    .await;
}

#[tokio::test]
async fn stage_with_engine_start_failing_leaves_nothing() {
    if !root_or_skip("stage_with_engine_start_failing_leaves_nothing") {
        return;
    }
    let script = r#"echo "qemu-storage-daemon: simulated start failure" >&2
exit 1"#;
    let b = bicsi_with(&[], &[("qemu-storage-daemon", script)]).await;
    stage_fails_and_leaves_nothing_on(
        &b,
        "noengine",
        16 * MIB,
        block_cap(),
        Code::Internal,
        "simulated start failure",
        "qemu",
    )
    .await;
}

/// The same for the default engine of this one-node ext4 cluster, bicsi's mirror engine over a
/// copy-on-write replica, whose process fails to start.
#[tokio::test]
async fn stage_with_mirror_engine_start_failing_leaves_nothing() {
    if !root_or_skip("stage_with_mirror_engine_start_failing_leaves_nothing") {
        return;
    }
    let mut b = Bicsi::start(1).await;
    let program = b.path("failing-mirror");
    std::fs::write(
        &program,
        "#!/bin/sh\necho \"bicsi engine-mirror: simulated start failure\" >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    b.env = vec![("BICSI_MIRROR_PROGRAM".into(), program.display().to_string())];
    b.restart().await;
    stage_fails_and_leaves_nothing(
        &b,
        "nomirror",
        16 * MIB,
        block_cap(),
        Code::Internal,
        "simulated start failure",
    )
    .await;
}

/// What an older version's failed stage left: the engine serving the replica, a loop device on
/// its export and the filesystem mounted at the staging path, with no record of any of it.
async fn leave_an_old_failed_stage(b: &Bicsi, c: &mut CsiClient, id: &str, staging: &Path) {
    // An older version served every volume with qemu-storage-daemon.
    create(
        c,
        id,
        16 * MIB,
        &[("numberOfReplicas", "1"), ("engine", "qemu")],
    )
    .await;
    c.controller
        .controller_publish_volume(cpublish_req(id, mount_cap(), false))
        .await
        .unwrap();
    // Made by hand, as a stage without a record.
    let os = bicsi::os::Os::real();
    let replicas = replica_files(b, id);
    assert_eq!(replicas.len(), 1, "{replicas:?}");
    let state = os
        .engine
        .start_volume(&bicsi::os::VolumeEngineSpec {
            volume_id: id.into(),
            replicas: vec![bicsi::os::ReplicaTarget::Local(replicas[0].clone())],
            run_dir: b.data_dir().join("engines").join(id),
            read_only: false,
        })
        .unwrap();
    let dev = os.loops.attach(&state.export_path).unwrap();
    os.fs.mkfs(&dev, "ext4").unwrap();
    os.mounts.mount(&dev, staging, "ext4", &[]).unwrap();
    assert!(
        !engines_under(b.dir.path()).is_empty() || !mirror_engines_under(b.dir.path()).is_empty()
    );
}

#[tokio::test]
async fn unstage_removes_what_an_old_failed_stage_left() {
    let Some((b, mut c)) =
        Bicsi::start_as_root("unstage_removes_what_an_old_failed_stage_left", 1).await
    else {
        return;
    };
    let staging = b.path("staging");
    leave_an_old_failed_stage(&b, &mut c, "oldleft", &staging).await;
    // A restart of bicsi does not change what is left, nor what the next detach removes.
    let mut b = b;
    b.restart().await;
    assert!(
        b.log()
            .contains("an engine run directory without a stage record"),
        "the restart does not name the leftover engine:\n{}",
        b.log()
    );
    let mut c = b.client().await;
    detach_and_delete(&b, &mut c, "oldleft", &staging).await;
}

#[tokio::test]
async fn delete_removes_what_an_old_failed_stage_left() {
    let Some((b, mut c)) =
        Bicsi::start_as_root("delete_removes_what_an_old_failed_stage_left", 1).await
    else {
        return;
    };
    let staging = b.path("staging");
    leave_an_old_failed_stage(&b, &mut c, "oldleft2", &staging).await;
    // No NodeUnstage: ControllerUnpublish and DeleteVolume alone clean the node.
    unpublish_and_delete(&mut c, "oldleft2").await;
    assert_nothing_left(&b, &mut c, "oldleft2", &staging).await;
    assert!(replica_files(&b, "oldleft2").is_empty());
}

#[tokio::test]
async fn cli_attach_of_an_xfs_volume_without_mkfs_xfs_fails_and_detach_and_delete_leave_nothing() {
    if !root_or_skip(
        "cli_attach_of_an_xfs_volume_without_mkfs_xfs_fails_and_detach_and_delete_leave_nothing",
    ) {
        return;
    }
    // The issue's steps, on a host without xfsprogs.
    let b = bicsi_with(&["mkfs.xfs"], &[]).await;
    let (ok, out, err) = b.cli(&[
        "volume",
        "create",
        "vx",
        "--size",
        "1",
        "-p",
        "numberOfReplicas=1",
        "-p",
        "fsType=xfs",
    ]);
    assert!(ok, "{out}{err}");
    let mnt = b.path("mnt");
    let (ok, out, err) = b.cli(&["volume", "attach", "vx", "--mount", mnt.to_str().unwrap()]);
    assert!(!ok, "attach without mkfs.xfs succeeded: {out}");
    assert!(err.contains("mkfs.xfs"), "{err}");
    let mut c = b.client().await;
    let staging = b
        .path("csi.sock")
        .parent()
        .unwrap()
        .join("cli-attach/vx/staging");
    assert_nothing_left(&b, &mut c, "vx", &staging).await;
    assert_logged(&b, "NodeStageVolume", Code::Internal, "vx");
    let (ok, out, err) = b.cli(&["volume", "detach", "vx"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = b.cli(&["volume", "delete", "vx"]);
    assert!(ok, "{out}{err}");
    assert_nothing_left(&b, &mut c, "vx", &staging).await;
    assert!(replica_files(&b, "vx").is_empty());
}
