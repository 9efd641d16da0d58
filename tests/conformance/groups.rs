//! Volume group snapshots (the GroupController service), read-only publishes (PUBLISH_READONLY)
//! and the node attach limit (max_volumes_per_node): the CSI rules, every mutating call made
//! twice, and for group snapshots the data read back from volumes restored from the members.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tonic::Code;

use super::backing::{attach, create_with, detach};
use super::harness::*;
use bicsi::client::CsiClient;
use bicsi::csi::pb;

fn group_req(name: &str, volumes: &[&str]) -> pb::CreateVolumeGroupSnapshotRequest {
    pb::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    }
}

async fn create_group(c: &mut CsiClient, name: &str, volumes: &[&str]) -> pb::VolumeGroupSnapshot {
    c.group
        .create_volume_group_snapshot(group_req(name, volumes))
        .await
        .unwrap_or_else(|s| panic!("group snapshot {name}: {s:?}"))
        .into_inner()
        .group_snapshot
        .unwrap()
}

fn member_of<'a>(g: &'a pb::VolumeGroupSnapshot, volume: &str) -> &'a pb::Snapshot {
    g.snapshots
        .iter()
        .find(|s| s.source_volume_id == volume)
        .unwrap_or_else(|| panic!("no member of {volume} in {g:?}"))
}

async fn create_volume(c: &mut CsiClient, req: pb::CreateVolumeRequest) {
    for _ in 0..2 {
        c.controller.create_volume(req.clone()).await.unwrap();
    }
}

fn restore_req(name: &str, snapshot_id: &str) -> pb::CreateVolumeRequest {
    let mut req = create_with(name, 64 * MIB, &[], mount_cap());
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(
            pb::volume_content_source::SnapshotSource {
                snapshot_id: snapshot_id.into(),
            },
        )),
    });
    req
}

/// Attaches a filesystem volume read-write, writes `file` in it and detaches it again.
async fn write_once(c: &mut CsiClient, b: &Bicsi, volume: &str, file: &str, bytes: &[u8]) {
    let (staging, target) = attach(c, b, volume, mount_cap()).await;
    std::fs::write(target.join(file), bytes).unwrap();
    detach(c, volume, &staging, &target).await;
}

async fn list_all_snapshots(c: &mut CsiClient) -> Vec<pb::Snapshot> {
    c.controller
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.snapshot.unwrap())
        .collect()
}

/// The GroupController rules that need no data: capabilities, required fields, NotFound,
/// idempotency by name, AlreadyExists, members listed with their group and not deletable alone,
/// snapshot_ids checked, delete twice.
#[tokio::test]
async fn group_snapshot_rpcs_follow_the_csi_rules() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;

    use pb::plugin_capability::service;
    assert!(
        plugin_services(&mut c)
            .await
            .contains(&(service::Type::GroupControllerService as i32))
    );
    use pb::group_controller_service_capability::rpc::Type as R;
    assert!(
        group_rpcs(&mut c)
            .await
            .contains(&(R::CreateDeleteGetVolumeGroupSnapshot as i32))
    );

    create_volume(&mut c, create_req("ga", 16 * MIB, &[])).await;
    create_volume(&mut c, create_req("gb", 16 * MIB, &[])).await;
    create_volume(&mut c, create_req("gc", 16 * MIB, &[])).await;

    assert_code(
        c.group
            .create_volume_group_snapshot(group_req("", &["ga"]))
            .await,
        Code::InvalidArgument,
        "name",
    );
    assert_code(
        c.group
            .create_volume_group_snapshot(group_req("g0", &[]))
            .await,
        Code::InvalidArgument,
        "source_volume_ids",
    );
    assert_code(
        c.group
            .create_volume_group_snapshot(group_req("g0", &["ga", "ga"]))
            .await,
        Code::InvalidArgument,
        "twice",
    );
    let mut bi = group_req("g0", &["ga"]);
    bi.parameters.insert("type".into(), "bi".into());
    assert_code(
        c.group.create_volume_group_snapshot(bi).await,
        Code::InvalidArgument,
        "single snapshots",
    );
    assert_code(
        c.group
            .create_volume_group_snapshot(group_req("g0", &["ga", "nosuch"]))
            .await,
        Code::NotFound,
        "nosuch",
    );
    // Nothing was left behind by the refused calls.
    assert!(list_all_snapshots(&mut c).await.is_empty());

    let g = create_group(&mut c, "g1", &["ga", "gb"]).await;
    let again = create_group(&mut c, "g1", &["gb", "ga"]).await;
    assert_eq!(g, again, "the same name and volumes give the same group");
    assert!(!g.group_snapshot_id.is_empty());
    assert!(g.ready_to_use);
    assert_eq!(g.snapshots.len(), 2);
    for s in &g.snapshots {
        assert_eq!(s.group_snapshot_id, g.group_snapshot_id);
        assert_eq!(s.creation_time, g.creation_time, "one instant for all");
        assert!(s.ready_to_use);
    }
    assert_code(
        c.group
            .create_volume_group_snapshot(group_req("g1", &["ga", "gc"]))
            .await,
        Code::AlreadyExists,
        "g1",
    );

    // Members are listed, with their group's id, by id and by source volume too.
    let listed = list_all_snapshots(&mut c).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    for s in &listed {
        assert_eq!(s.group_snapshot_id, g.group_snapshot_id);
    }
    let by_source = c
        .controller
        .list_snapshots(pb::ListSnapshotsRequest {
            source_volume_id: "gb".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(
        by_source[0].snapshot.as_ref().unwrap().snapshot_id,
        member_of(&g, "gb").snapshot_id
    );
    // A member cannot be deleted alone (CSI: INVALID_ARGUMENT, "part of a group").
    assert_code(
        c.controller
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: member_of(&g, "ga").snapshot_id.clone(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "DeleteVolumeGroupSnapshot",
    );

    let ids: Vec<String> = g.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();
    let got = c
        .group
        .get_volume_group_snapshot(pb::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: g.group_snapshot_id.clone(),
            snapshot_ids: ids.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(got, g);
    assert_code(
        c.group
            .get_volume_group_snapshot(pb::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: g.group_snapshot_id.clone(),
                snapshot_ids: vec![ids[0].clone()],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "members",
    );
    assert_code(
        c.group
            .get_volume_group_snapshot(pb::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: "group-nosuch".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "group-nosuch",
    );
    assert_code(
        c.group
            .delete_volume_group_snapshot(pb::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: g.group_snapshot_id.clone(),
                snapshot_ids: vec!["other".into()],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "members",
    );
    for _ in 0..2 {
        c.group
            .delete_volume_group_snapshot(pb::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: g.group_snapshot_id.clone(),
                snapshot_ids: ids.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(list_all_snapshots(&mut c).await.is_empty());
    assert_code(
        c.group
            .get_volume_group_snapshot(pb::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: g.group_snapshot_id.clone(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "not found",
    );
    assert!(
        std::fs::read_dir(b.disks[0].join("snapshots"))
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "snapshot files left after deleting the group"
    );
}

/// A counter written in the same place of a file, so any instant of the file holds a whole
/// number (no truncation between two values).
fn write_counter(f: &std::fs::File, n: u64) {
    f.write_all_at(format!("{n:020}\n").as_bytes(), 0).unwrap();
    f.sync_data().unwrap();
}

fn read_counter(path: &Path) -> u64 {
    let s = std::fs::read_to_string(path).unwrap();
    s.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{path:?}: {s:?}"))
}

/// Writes counter n to volume A, then (after A acknowledged it) n to volume B, over and over:
/// at every instant A holds B's value or one more. A capture of B after A (two snapshots, not
/// one instant) shows B ahead of A.
struct OrderedWriter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl OrderedWriter {
    fn start(a: &Path, b: &Path) -> OrderedWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let (fa, fb) = (
            std::fs::OpenOptions::new().write(true).open(a).unwrap(),
            std::fs::OpenOptions::new().write(true).open(b).unwrap(),
        );
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                write_counter(&fa, n);
                write_counter(&fb, n);
            }
            n
        });
        OrderedWriter {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

fn new_counter(dir: &Path) -> PathBuf {
    let p = dir.join("counter");
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(format!("{:020}\n", 0).as_bytes()).unwrap();
    f.sync_all().unwrap();
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
    p
}

/// Two attached volumes written in a dependent order and one detached volume, snapshotted as a
/// group while the writer runs: the volumes restored from the members hold one instant (B never
/// ahead of A), and the detached one its data.
#[tokio::test]
async fn group_snapshot_of_attached_and_detached_volumes_restores_one_instant() {
    let Some((b, mut c)) = Bicsi::start_as_root(
        "group_snapshot_of_attached_and_detached_volumes_restores_one_instant",
        1,
    )
    .await
    else {
        return;
    };
    for v in ["va", "vb", "vc"] {
        create_volume(&mut c, create_with(v, 64 * MIB, &[], mount_cap())).await;
    }
    write_once(
        &mut c,
        &b,
        "vc",
        "detached.txt",
        b"written while vc was attached",
    )
    .await;
    let (ast, atg) = attach(&mut c, &b, "va", mount_cap()).await;
    let (bst, btg) = attach(&mut c, &b, "vb", mount_cap()).await;
    let (ca, cb) = (new_counter(&atg), new_counter(&btg));

    let writer = OrderedWriter::start(&ca, &cb);
    // Let the writer get going, so the capture happens under it.
    while read_counter(&cb) < 20 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let g = create_group(&mut c, "g-instant", &["va", "vb", "vc"]).await;
    let again = create_group(&mut c, "g-instant", &["va", "vb", "vc"]).await;
    assert_eq!(g, again);
    let rounds = writer.stop();
    assert!(
        b.log().contains("group snapshot: writes held"),
        "the attached members were not captured with their writes held"
    );

    for (v, name) in [("va", "ra"), ("vb", "rb"), ("vc", "rc")] {
        create_volume(&mut c, restore_req(name, &member_of(&g, v).snapshot_id)).await;
    }
    detach(&mut c, "va", &ast, &atg).await;
    detach(&mut c, "vb", &bst, &btg).await;
    let (rast, ratg) = attach(&mut c, &b, "ra", mount_cap()).await;
    let (rbst, rbtg) = attach(&mut c, &b, "rb", mount_cap()).await;
    let (na, nb) = (
        read_counter(&ratg.join("counter")),
        read_counter(&rbtg.join("counter")),
    );
    assert!(
        na == nb || na == nb + 1,
        "not one instant: A restored with {na}, B with {nb} (the writer wrote B after A)"
    );
    assert!(nb >= 20 && na < rounds, "{na} {nb} of {rounds}");
    detach(&mut c, "ra", &rast, &ratg).await;
    detach(&mut c, "rb", &rbst, &rbtg).await;
    let (rcst, rctg) = attach(&mut c, &b, "rc", mount_cap()).await;
    assert_eq!(
        std::fs::read(rctg.join("detached.txt")).unwrap(),
        b"written while vc was attached"
    );
    detach(&mut c, "rc", &rcst, &rctg).await;

    for _ in 0..2 {
        c.group
            .delete_volume_group_snapshot(pb::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: g.group_snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(list_all_snapshots(&mut c).await.is_empty());
}

/// An attached raw block volume cannot have its writes held: a group with it fails, and leaves
/// no snapshot behind.
#[tokio::test]
async fn group_snapshot_refuses_an_attached_block_volume() {
    let Some((b, mut c)) =
        Bicsi::start_as_root("group_snapshot_refuses_an_attached_block_volume", 1).await
    else {
        return;
    };
    create_volume(&mut c, create_with("fsv", 32 * MIB, &[], mount_cap())).await;
    create_volume(&mut c, create_with("blk", 32 * MIB, &[], block_cap())).await;
    let (fst, ftg) = attach(&mut c, &b, "fsv", mount_cap()).await;
    let (bst, btg) = attach(&mut c, &b, "blk", block_cap()).await;
    assert_code(
        c.group
            .create_volume_group_snapshot(group_req("g-block", &["fsv", "blk"]))
            .await,
        Code::FailedPrecondition,
        "raw block",
    );
    assert!(list_all_snapshots(&mut c).await.is_empty());
    // The filesystem was not left frozen.
    std::fs::write(ftg.join("after.txt"), b"still writable").unwrap();
    detach(&mut c, "blk", &bst, &btg).await;
    detach(&mut c, "fsv", &fst, &ftg).await;
    // Detached, the same volumes are captured together.
    let g = create_group(&mut c, "g-block", &["fsv", "blk"]).await;
    assert_eq!(g.snapshots.len(), 2);
}

/// PUBLISH_READONLY: advertised; a republish with the other readonly flag is AlreadyExists;
/// a volume published read-only is read-only in its node mounts.
#[tokio::test]
async fn readonly_publish_rules() {
    let Some((b, mut c)) = Bicsi::start_as_root("readonly_publish_rules", 1).await else {
        return;
    };
    use pb::controller_service_capability::rpc::Type as R;
    assert!(
        controller_rpcs(&mut c)
            .await
            .contains(&(R::PublishReadonly as i32))
    );

    create_volume(&mut c, create_with("rov", 32 * MIB, &[], mount_cap())).await;
    // Written once, read-write, so there is something to read.
    write_once(&mut c, &b, "rov", "data.txt", b"written read-write").await;

    let mut context = Default::default();
    for _ in 0..2 {
        context = c
            .controller
            .controller_publish_volume(cpublish_req("rov", mount_cap(), true))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
    }
    assert_code(
        c.controller
            .controller_publish_volume(cpublish_req("rov", mount_cap(), false))
            .await,
        Code::AlreadyExists,
        "read-only flag",
    );
    let (st, tg) = (b.path("st-ro"), b.path("tg-ro"));
    let mut stage = stage_req("rov", &st, mount_cap());
    stage.publish_context = context.clone();
    for _ in 0..2 {
        c.node.node_stage_volume(stage.clone()).await.unwrap();
    }
    // NodePublishVolume's own flag is false: the controller's read-only publish still rules.
    let mut publish = publish_req("rov", &st, &tg, mount_cap(), false);
    publish.publish_context = context;
    for _ in 0..2 {
        c.node.node_publish_volume(publish.clone()).await.unwrap();
    }
    assert_eq!(
        std::fs::read(tg.join("data.txt")).unwrap(),
        b"written read-write"
    );
    let err = std::fs::write(tg.join("new.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_erofs()), "{err}");
    detach(&mut c, "rov", &st, &tg).await;

    // Unpublished, it can be published read-write again; then read-only is AlreadyExists.
    for _ in 0..2 {
        c.controller
            .controller_publish_volume(cpublish_req("rov", mount_cap(), false))
            .await
            .unwrap();
    }
    assert_code(
        c.controller
            .controller_publish_volume(cpublish_req("rov", mount_cap(), true))
            .await,
        Code::AlreadyExists,
        "read-only flag",
    );
    unpublish_and_delete(&mut c, "rov").await;
}

/// EROFS on Linux.
fn libc_erofs() -> i32 {
    30
}

/// max_volumes_per_node: reported by NodeGetInfo; a publish beyond it is ResourceExhausted
/// naming the node and the limit; a repeated publish of a published volume is still OK at the
/// limit; unpublishing one frees a slot.
#[tokio::test]
async fn attach_limit_is_reported_and_enforced() {
    let b = Bicsi::start_with(1, &["--max-volumes-per-node", "2"]).await;
    let mut c = b.client().await;
    let info = c
        .node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.max_volumes_per_node, 2);
    for v in ["l1", "l2", "l3"] {
        create_volume(&mut c, create_req(v, 16 * MIB, &[])).await;
    }
    for v in ["l1", "l2"] {
        for _ in 0..2 {
            c.controller
                .controller_publish_volume(cpublish_req(v, mount_cap(), false))
                .await
                .unwrap();
        }
    }
    for _ in 0..2 {
        assert_code(
            c.controller
                .controller_publish_volume(cpublish_req("l3", mount_cap(), false))
                .await,
            Code::ResourceExhausted,
            &format!("node {NODE_ID:?} has 2 of its limit of 2 volumes"),
        );
    }
    // Idempotent at the limit.
    c.controller
        .controller_publish_volume(cpublish_req("l1", mount_cap(), false))
        .await
        .unwrap();
    for _ in 0..2 {
        c.controller
            .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                volume_id: "l1".into(),
                node_id: NODE_ID.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for _ in 0..2 {
        c.controller
            .controller_publish_volume(cpublish_req("l3", mount_cap(), false))
            .await
            .unwrap();
    }
    for v in ["l1", "l2", "l3"] {
        unpublish_and_delete(&mut c, v).await;
    }

    // Without the flag there is no limit, and NodeGetInfo says 0.
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let info = c
        .node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.max_volumes_per_node, 0);
}
