//! Node service conformance on the real data path: qemu-storage-daemon, FUSE, loop devices,
//! mkfs and mounts. Needs root (see `root_or_skip`).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use tonic::Code;

use super::harness::*;
use bicsi::client::CsiClient;
use bicsi::csi::pb;
use pb::volume_capability::access_mode::Mode;

async fn create_and_cpublish(
    c: &mut CsiClient,
    name: &str,
    bytes: i64,
    replicas: &str,
    cap: pb::VolumeCapability,
) {
    c.controller
        .create_volume(create_req(name, bytes, &[("numberOfReplicas", replicas)]))
        .await
        .unwrap();
    c.controller
        .controller_publish_volume(cpublish_req(name, cap, false))
        .await
        .unwrap();
}

async fn stage_publish(
    c: &mut CsiClient,
    id: &str,
    staging: &Path,
    target: &Path,
    cap: pb::VolumeCapability,
) {
    for _ in 0..2 {
        c.node
            .node_stage_volume(stage_req(id, staging, cap.clone()))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        c.node
            .node_publish_volume(publish_req(id, staging, target, cap.clone(), false))
            .await
            .unwrap();
    }
}

async fn unpublish_unstage(c: &mut CsiClient, id: &str, staging: &Path, target: &Path) {
    for _ in 0..2 {
        c.node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .unwrap();
    }
    assert!(!target.exists(), "NodeUnpublish removes the target path");
    for _ in 0..2 {
        c.node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .unwrap();
    }
}

/// Nothing of a volume's data path is left: no mount, loop device or engine under the test dir.
fn assert_no_leaks(b: &Bicsi) {
    let dir = b.dir.path();
    assert!(
        mounts_under(dir).is_empty(),
        "mounts left: {:?}",
        mounts_under(dir)
    );
    assert!(
        loops_under(dir).is_empty(),
        "loop devices left: {:?}",
        loops_under(dir)
    );
    assert!(
        engines_under(dir).is_empty(),
        "engines left: {:?}",
        engines_under(dir)
    );
}

#[tokio::test]
async fn node_info_and_capabilities() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let info = c
        .node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE_ID);
    assert_eq!(
        info.accessible_topology.unwrap().segments["topology.bicsi.io/node"],
        NODE_ID
    );
    use pb::node_service_capability::rpc::Type as R;
    let got = node_rpcs(&mut c).await;
    for want in [
        R::StageUnstageVolume,
        R::GetVolumeStats,
        R::ExpandVolume,
        R::VolumeCondition,
    ] {
        assert!(got.contains(&(want as i32)), "{want:?}");
    }
}

#[tokio::test]
async fn node_calls_check_required_fields_and_unknown_ids() {
    // These fail before touching the system, so they run without root too.
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let st = b.path("staging");
    let tg = b.path("target");
    let mut r = stage_req("v", &st, mount_cap());
    r.volume_id.clear();
    assert_code(
        c.node.node_stage_volume(r).await,
        Code::InvalidArgument,
        "volume_id",
    );
    let mut r = stage_req("v", &st, mount_cap());
    r.staging_target_path.clear();
    assert_code(
        c.node.node_stage_volume(r).await,
        Code::InvalidArgument,
        "staging_target_path",
    );
    let mut r = stage_req("v", &st, mount_cap());
    r.volume_capability = None;
    assert_code(
        c.node.node_stage_volume(r).await,
        Code::InvalidArgument,
        "volume_capability",
    );
    assert_code(
        c.node
            .node_stage_volume(stage_req("ghost", &st, mount_cap()))
            .await,
        Code::NotFound,
        "ghost",
    );

    let mut r = publish_req("v", &st, &tg, mount_cap(), false);
    r.target_path.clear();
    assert_code(
        c.node.node_publish_volume(r).await,
        Code::InvalidArgument,
        "target_path",
    );
    let mut r = publish_req("v", &st, &tg, mount_cap(), false);
    r.volume_capability = None;
    assert_code(
        c.node.node_publish_volume(r).await,
        Code::InvalidArgument,
        "volume_capability",
    );
    assert_code(
        c.node
            .node_publish_volume(publish_req("ghost", &st, &tg, mount_cap(), false))
            .await,
        Code::NotFound,
        "ghost",
    );
    c.controller
        .create_volume(create_req("v", 8 * MIB, &[]))
        .await
        .unwrap();
    let mut r = publish_req("v", &st, &tg, mount_cap(), false);
    r.staging_target_path.clear();
    assert_code(
        c.node.node_publish_volume(r).await,
        Code::FailedPrecondition,
        "staging_target_path",
    );
    assert_code(
        c.node
            .node_publish_volume(publish_req("v", &st, &tg, mount_cap(), false))
            .await,
        Code::FailedPrecondition,
        "not staged",
    );

    c.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: "ghost".into(),
            target_path: tg.display().to_string(),
        })
        .await
        .expect("unpublish of an unknown volume succeeds");
    c.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: "ghost".into(),
            staging_target_path: st.display().to_string(),
        })
        .await
        .expect("unstage of an unknown volume succeeds");
    let mut r = pb::NodeUnstageVolumeRequest {
        volume_id: "v".into(),
        staging_target_path: String::new(),
    };
    assert_code(
        c.node.node_unstage_volume(r.clone()).await,
        Code::InvalidArgument,
        "staging_target_path",
    );
    r.volume_id.clear();
    r.staging_target_path = "/x".into();
    assert_code(
        c.node.node_unstage_volume(r).await,
        Code::InvalidArgument,
        "volume_id",
    );
    assert_code(
        c.node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: "v".into(),
                target_path: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "target_path",
    );

    let stats = |id: &str, path: &str| pb::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };
    assert_code(
        c.node.node_get_volume_stats(stats("", "/x")).await,
        Code::InvalidArgument,
        "volume_id",
    );
    assert_code(
        c.node.node_get_volume_stats(stats("v", "")).await,
        Code::InvalidArgument,
        "volume_path",
    );
    assert_code(
        c.node.node_get_volume_stats(stats("ghost", "/x")).await,
        Code::NotFound,
        "ghost",
    );
    assert_code(
        c.node.node_get_volume_stats(stats("v", "/nowhere")).await,
        Code::NotFound,
        "/nowhere",
    );
    let expand = |id: &str, path: &str| pb::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    assert_code(
        c.node.node_expand_volume(expand("v", "")).await,
        Code::InvalidArgument,
        "volume_path",
    );
    assert_code(
        c.node.node_expand_volume(expand("ghost", "/x")).await,
        Code::NotFound,
        "ghost",
    );
}

#[tokio::test]
async fn filesystem_volume_holds_data_across_restage_and_restart() {
    if !root_or_skip("filesystem_volume_holds_data_across_restage_and_restart") {
        return;
    }
    let mut b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let (st, tg) = (b.path("staging"), b.path("pods/target"));
    create_and_cpublish(&mut c, "fsvol", 64 * MIB, "1", mount_cap()).await;
    stage_publish(&mut c, "fsvol", &st, &tg, mount_cap()).await;
    std::fs::write(tg.join("hello.txt"), b"hello from bicsi").unwrap();

    let stats = c
        .node
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: "fsvol".into(),
            volume_path: tg.display().to_string(),
            staging_target_path: st.display().to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage.len(), 2, "bytes and inodes");
    assert!(stats.usage[0].total > 40 * MIB && stats.usage[0].total <= 64 * MIB);
    assert!(stats.usage[1].used > 0);
    assert!(!stats.volume_condition.unwrap().abnormal);

    // Different capability at the same paths.
    let ro = cap_with(false, Mode::SingleNodeReaderOnly);
    assert_code(
        c.node
            .node_stage_volume(stage_req("fsvol", &st, ro.clone()))
            .await,
        Code::AlreadyExists,
        "another capability",
    );
    assert_code(
        c.node
            .node_publish_volume(publish_req("fsvol", &st, &tg, mount_cap(), true))
            .await,
        Code::AlreadyExists,
        "read-only",
    );

    unpublish_unstage(&mut c, "fsvol", &st, &tg).await;
    assert_no_leaks(&b);
    stage_publish(&mut c, "fsvol", &st, &tg, mount_cap()).await;
    assert_eq!(
        std::fs::read(tg.join("hello.txt")).unwrap(),
        b"hello from bicsi"
    );

    // A restart of bicsi leaves the mounted volume working and re-adopts it.
    drop(c);
    b.restart().await;
    std::fs::write(tg.join("during-restart.txt"), b"still here").unwrap();
    let mut c = b.client().await;
    stage_publish(&mut c, "fsvol", &st, &tg, mount_cap()).await;
    assert_eq!(
        std::fs::read(tg.join("hello.txt")).unwrap(),
        b"hello from bicsi"
    );
    // A crash too.
    drop(c);
    b.kill();
    b.restart().await;
    let mut c = b.client().await;
    stage_publish(&mut c, "fsvol", &st, &tg, mount_cap()).await;
    unpublish_unstage(&mut c, "fsvol", &st, &tg).await;
    assert_no_leaks(&b);
    stage_publish(&mut c, "fsvol", &st, &tg, mount_cap()).await;
    assert_eq!(
        std::fs::read(tg.join("during-restart.txt")).unwrap(),
        b"still here"
    );
    unpublish_unstage(&mut c, "fsvol", &st, &tg).await;
    assert_no_leaks(&b);
}

#[tokio::test]
async fn read_only_publish_refuses_writes() {
    let Some((b, mut c)) = Bicsi::start_as_root("read_only_publish_refuses_writes", 1).await else {
        return;
    };
    let (st, tg, ro_tg) = (b.path("staging"), b.path("target"), b.path("ro-target"));
    create_and_cpublish(&mut c, "rov", 32 * MIB, "1", mount_cap()).await;
    stage_publish(&mut c, "rov", &st, &tg, mount_cap()).await;
    std::fs::write(tg.join("f"), b"x").unwrap();
    c.node
        .node_publish_volume(publish_req("rov", &st, &ro_tg, mount_cap(), true))
        .await
        .unwrap();
    assert_eq!(std::fs::read(ro_tg.join("f")).unwrap(), b"x");
    let err = std::fs::write(ro_tg.join("g"), b"y").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    for t in [&ro_tg, &tg] {
        c.node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: "rov".into(),
                target_path: t.display().to_string(),
            })
            .await
            .unwrap();
    }
    unpublish_unstage(&mut c, "rov", &st, &tg).await;
    assert_no_leaks(&b);
}

#[tokio::test]
async fn block_volume_reads_back_its_bytes() {
    let Some((b, mut c)) = Bicsi::start_as_root("block_volume_reads_back_its_bytes", 1).await
    else {
        return;
    };
    let (st, tg) = (b.path("staging"), b.path("pods/dev"));
    // The orchestrator may hand over the block target as an existing directory.
    std::fs::create_dir_all(&tg).unwrap();
    create_and_cpublish(&mut c, "blk", 16 * MIB, "1", block_cap()).await;
    stage_publish(&mut c, "blk", &st, &tg, block_cap()).await;
    let pattern: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&tg).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(&pattern).unwrap();
        f.sync_all().unwrap();
    }
    let stats = c
        .node
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: "blk".into(),
            volume_path: tg.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, 16 * MIB);
    unpublish_unstage(&mut c, "blk", &st, &tg).await;
    assert_no_leaks(&b);
    stage_publish(&mut c, "blk", &st, &tg, block_cap()).await;
    let mut back = vec![0u8; pattern.len()];
    {
        let mut f = std::fs::File::open(&tg).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.read_exact(&mut back).unwrap();
    }
    assert!(back == pattern, "block data read back differs");
    unpublish_unstage(&mut c, "blk", &st, &tg).await;
    assert_no_leaks(&b);
}

#[tokio::test]
async fn writes_reach_every_replica() {
    let Some((b, mut c)) = Bicsi::start_as_root("writes_reach_every_replica", 3).await else {
        return;
    };
    let (st, tg) = (b.path("staging"), b.path("target"));
    create_and_cpublish(&mut c, "rep3", 32 * MIB, "3", mount_cap()).await;
    stage_publish(&mut c, "rep3", &st, &tg, mount_cap()).await;
    std::fs::write(tg.join("data.bin"), vec![7u8; 4 << 20]).unwrap();
    unpublish_unstage(&mut c, "rep3", &st, &tg).await;
    let replicas: Vec<_> = b
        .disks
        .iter()
        .flat_map(|d| super::walk(&d.join("replicas")))
        .collect();
    assert_eq!(replicas.len(), 3);
    // The default engine of this one-node ext4 cluster: the mirror engine over copy-on-write
    // replicas, compared through their views (as `bicsi volume rebuild` compares them).
    for r in &replicas {
        assert!(r.ends_with("volume.cow"), "{replicas:?}");
    }
    for r in &replicas[1..] {
        assert!(
            bicsi::os::compare::identical_files(&replicas[0], r).unwrap(),
            "replicas differ: {} and {}",
            replicas[0].display(),
            r.display()
        );
    }
    // Each replica alone holds the data: stage with one replica after removing the others.
    assert_no_leaks(&b);
}

#[tokio::test]
async fn offline_expansion_then_online_filesystem_growth() {
    let Some((b, mut c)) =
        Bicsi::start_as_root("offline_expansion_then_online_filesystem_growth", 2).await
    else {
        return;
    };
    let (st, tg) = (b.path("staging"), b.path("target"));
    create_and_cpublish(&mut c, "grow", 64 * MIB, "2", mount_cap()).await;
    stage_publish(&mut c, "grow", &st, &tg, mount_cap()).await;
    std::fs::write(tg.join("keep"), b"kept").unwrap();
    let total = |s: pb::NodeGetVolumeStatsResponse| s.usage[0].total;
    let stats_req = pb::NodeGetVolumeStatsRequest {
        volume_id: "grow".into(),
        volume_path: tg.display().to_string(),
        staging_target_path: String::new(),
    };
    let before = total(
        c.node
            .node_get_volume_stats(stats_req.clone())
            .await
            .unwrap()
            .into_inner(),
    );
    unpublish_unstage(&mut c, "grow", &st, &tg).await;
    c.controller
        .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: "grow".into(),
            node_id: NODE_ID.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let r = c
        .controller
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: "grow".into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 256 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.node_expansion_required);
    c.controller
        .controller_publish_volume(cpublish_req("grow", mount_cap(), false))
        .await
        .unwrap();
    stage_publish(&mut c, "grow", &st, &tg, mount_cap()).await;
    for _ in 0..2 {
        let got = c
            .node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: "grow".into(),
                volume_path: tg.display().to_string(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 256 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.capacity_bytes, 256 * MIB);
    }
    let after = total(
        c.node
            .node_get_volume_stats(stats_req)
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(
        after > before * 3,
        "filesystem grew from {before} to {after}"
    );
    assert_eq!(std::fs::read(tg.join("keep")).unwrap(), b"kept");
    unpublish_unstage(&mut c, "grow", &st, &tg).await;
    assert_no_leaks(&b);
}

#[tokio::test]
async fn missing_replica_makes_the_condition_abnormal() {
    let Some((b, mut c)) =
        Bicsi::start_as_root("missing_replica_makes_the_condition_abnormal", 2).await
    else {
        return;
    };
    let (st, tg) = (b.path("staging"), b.path("target"));
    create_and_cpublish(&mut c, "sick", 16 * MIB, "2", mount_cap()).await;
    stage_publish(&mut c, "sick", &st, &tg, mount_cap()).await;
    let victim = super::walk(&b.disks[1].join("replicas")).remove(0);
    std::fs::remove_file(&victim).unwrap();
    let s = c
        .node
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: "sick".into(),
            volume_path: tg.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = s.volume_condition.unwrap();
    assert!(cond.abnormal);
    assert!(cond.message.contains("missing"), "{}", cond.message);
    let v = c
        .controller
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: "sick".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.status.unwrap().volume_condition.unwrap().abnormal);
    // The surviving replica still serves the data.
    std::fs::write(tg.join("after"), b"ok").unwrap();
    unpublish_unstage(&mut c, "sick", &st, &tg).await;
    assert_no_leaks(&b);
}

#[tokio::test]
async fn xfs_volume_from_the_fs_type_parameter() {
    let Some((b, mut c)) = Bicsi::start_as_root("xfs_volume_from_the_fs_type_parameter", 1).await
    else {
        return;
    };
    let (st, tg) = (b.path("staging"), b.path("target"));
    c.controller
        .create_volume(create_req(
            "xv",
            320 * MIB,
            &[("fsType", "xfs"), ("numberOfReplicas", "1")],
        ))
        .await
        .unwrap();
    c.controller
        .controller_publish_volume(cpublish_req("xv", mount_cap(), false))
        .await
        .unwrap();
    stage_publish(&mut c, "xv", &st, &tg, mount_cap()).await;
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mi
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&st.display().to_string()))
        .expect("staging mount");
    assert!(line.contains(" - xfs "), "{line}");
    unpublish_unstage(&mut c, "xv", &st, &tg).await;
    assert_no_leaks(&b);
}
