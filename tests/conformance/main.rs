//! bicsi's own CSI conformance suite: the real binary on a unix socket, driven through a real gRPC
//! client. Every mutating call is made twice; missing fields and unknown ids are checked for their
//! codes; data written through a published volume is read back after unstage/restage and after a
//! restart of bicsi. Covers the rules in shared/docs/conformance.md (`csi-sanity/run.sh` runs the
//! upstream csi-sanity suite besides).

mod backing;
mod cow_engine;
mod create;
mod failures;
mod groups;
mod harness;
mod images;
#[path = "../kit/mod.rs"]
mod kit;
mod lifecycle;
mod loop_engine;
mod mirror_engine;
mod node;
mod snapshots;
mod transfer;

use harness::*;
use tonic::Code;

use bicsi::csi::pb;
use pb::volume_capability::access_mode::Mode;

#[tokio::test]
async fn identity_reports_name_capabilities_and_readiness() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let info = c
        .identity
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "driver.longhorn.io");
    assert!(!info.vendor_version.is_empty());
    use pb::plugin_capability::service;
    assert!(
        plugin_services(&mut c)
            .await
            .contains(&(service::Type::ControllerService as i32))
    );
    let probe = c
        .identity
        .probe(pb::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
}

#[tokio::test]
async fn controller_advertises_what_it_implements() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    use pb::controller_service_capability::rpc::Type as R;
    let got = controller_rpcs(&mut c).await;
    for want in [
        R::CreateDeleteVolume,
        R::PublishUnpublishVolume,
        R::ListVolumes,
        R::GetCapacity,
        R::ExpandVolume,
        R::ListVolumesPublishedNodes,
        R::VolumeCondition,
        R::GetVolume,
        R::ModifyVolume,
        R::CreateDeleteSnapshot,
        R::ListSnapshots,
        R::CloneVolume,
    ] {
        assert!(got.contains(&(want as i32)), "{want:?} not advertised");
    }
}

#[tokio::test]
async fn create_volume_validates_and_is_idempotent() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;

    let mut no_name = create_req("", 64 * MIB, &[]);
    no_name.name.clear();
    assert_code(
        c.controller.create_volume(no_name).await,
        Code::InvalidArgument,
        "name",
    );
    let mut no_caps = create_req("v", 64 * MIB, &[]);
    no_caps.volume_capabilities.clear();
    assert_code(
        c.controller.create_volume(no_caps).await,
        Code::InvalidArgument,
        "volume_capabilities",
    );

    let first = c
        .controller
        .create_volume(create_req("vol-a", 64 * MIB, &[("numberOfReplicas", "1")]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(first.capacity_bytes, 64 * MIB);
    let again = c
        .controller
        .create_volume(create_req("vol-a", 64 * MIB, &[("numberOfReplicas", "1")]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        first.volume_id, again.volume_id,
        "same request, same volume"
    );
    assert_eq!(again.capacity_bytes, 64 * MIB);

    assert_code(
        c.controller
            .create_volume(create_req("vol-a", 128 * MIB, &[("numberOfReplicas", "1")]))
            .await,
        Code::AlreadyExists,
        "vol-a",
    );
    assert_code(
        c.controller
            .create_volume(create_req("vol-a", 64 * MIB, &[("numberOfReplicas", "2")]))
            .await,
        Code::AlreadyExists,
        "other parameters",
    );

    // The replica file exists with the requested virtual size.
    let replicas: Vec<_> = walk(&b.disks[0].join("replicas"));
    assert_eq!(replicas.len(), 1, "{replicas:?}");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(&replicas[0])
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 64 * MIB);
    // The default engine of a one-node cluster on ext4: the mirror engine over a copy-on-write
    // replica, whose data file is a sparse raw file of the volume's size.
    assert!(replicas[0].ends_with("volume.cow"), "{replicas:?}");
    assert_eq!(info["format"], "raw");
}

/// The files under `dir`, recursively: one per replica (a copy-on-write replica's cluster map
/// `volume.cowmap` and its `base` link to the disk's image expansion belong to its data file
/// `volume.cow` and are not listed).
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            if name == "base" || p.extension().is_some_and(|x| x == "cowmap") {
                continue;
            }
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn create_volume_refuses_bad_requests_with_the_right_codes() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let long = "n".repeat(128);
    c.controller
        .create_volume(create_req(&long, MIB, &[]))
        .await
        .expect("a 128-character name is allowed");
    assert_code(
        c.controller
            .create_volume(create_req(&"n".repeat(129), MIB, &[]))
            .await,
        Code::InvalidArgument,
        "at most 128",
    );

    let mut bad_range = create_req("r", 0, &[]);
    bad_range.capacity_range = Some(pb::CapacityRange {
        required_bytes: 10 * MIB,
        limit_bytes: 5 * MIB,
    });
    assert_code(
        c.controller.create_volume(bad_range).await,
        Code::OutOfRange,
        "limit_bytes",
    );

    assert_code(
        c.controller
            .create_volume(create_req("p", MIB, &[("replicaCount", "3")]))
            .await,
        Code::InvalidArgument,
        "unknown parameter \"replicaCount\"; accepted parameters are: numberOfReplicas",
    );
    assert_code(
        c.controller
            .create_volume(create_req("p", MIB, &[("numberOfReplicas", "zero")]))
            .await,
        Code::InvalidArgument,
        "numberOfReplicas",
    );

    let mut multi = create_req("m", MIB, &[]);
    multi.volume_capabilities = vec![cap_with(false, Mode::MultiNodeMultiWriter)];
    assert_code(
        c.controller.create_volume(multi).await,
        Code::InvalidArgument,
        "one node",
    );

    let mut from_snap = create_req("s", MIB, &[]);
    from_snap.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(
            pb::volume_content_source::SnapshotSource {
                snapshot_id: "no-such-snapshot".into(),
            },
        )),
    });
    assert_code(
        c.controller.create_volume(from_snap).await,
        Code::NotFound,
        "no-such-snapshot",
    );

    let mut from_vol = create_req("s", MIB, &[]);
    from_vol.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Volume(
            pb::volume_content_source::VolumeSource {
                volume_id: "no-such-volume".into(),
            },
        )),
    });
    assert_code(
        c.controller.create_volume(from_vol).await,
        Code::NotFound,
        "no-such-volume",
    );

    // Nothing was left behind by the refused requests: only the 128-character volume exists.
    let list = c
        .controller
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.entries.len(), 1);
}

#[tokio::test]
async fn create_without_capacity_gets_the_default_size() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let mut req = create_req("dflt", 0, &[("numberOfReplicas", "1")]);
    req.capacity_range = None;
    let v = c
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 1 << 30);
}

#[tokio::test]
async fn replicas_go_on_distinct_disks_and_fewer_disks_means_degraded() {
    let b = Bicsi::start(3).await;
    let mut c = b.client().await;
    c.controller
        .create_volume(create_req("three", 16 * MIB, &[("numberOfReplicas", "3")]))
        .await
        .unwrap();
    for d in &b.disks {
        assert_eq!(
            walk(&d.join("replicas")).len(),
            1,
            "one replica on {}",
            d.display()
        );
    }
    c.controller
        .create_volume(create_req("five", 16 * MIB, &[("numberOfReplicas", "5")]))
        .await
        .expect("fewer disks than replicas creates a degraded volume, not a failure");
    let v = c
        .controller
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: "five".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = v.status.unwrap().volume_condition.unwrap();
    assert!(!cond.abnormal);
    assert!(
        cond.message.contains("degraded: 3 of 5"),
        "{}",
        cond.message
    );
}

#[tokio::test]
async fn delete_volume_is_idempotent_and_removes_the_replicas() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    assert_code(
        c.controller
            .delete_volume(pb::DeleteVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
    c.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: "never-existed".into(),
            ..Default::default()
        })
        .await
        .expect("deleting an unknown volume succeeds");
    c.controller
        .create_volume(create_req("d", 8 * MIB, &[]))
        .await
        .unwrap();
    assert_eq!(walk(&b.disks[0].join("replicas")).len(), 1);
    for _ in 0..2 {
        c.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: "d".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(walk(&b.disks[0].join("replicas")).is_empty());
    assert_code(
        c.controller
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: "d".into(),
            })
            .await,
        Code::NotFound,
        "\"d\"",
    );
}

#[tokio::test]
async fn controller_publish_rules() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    c.controller
        .create_volume(create_req("pub", 8 * MIB, &[]))
        .await
        .unwrap();

    let mut missing = cpublish_req("pub", mount_cap(), false);
    missing.node_id.clear();
    assert_code(
        c.controller.controller_publish_volume(missing).await,
        Code::InvalidArgument,
        "node_id",
    );
    let mut missing = cpublish_req("pub", mount_cap(), false);
    missing.volume_capability = None;
    assert_code(
        c.controller.controller_publish_volume(missing).await,
        Code::InvalidArgument,
        "volume_capability",
    );
    assert_code(
        c.controller
            .controller_publish_volume(cpublish_req("nope", mount_cap(), false))
            .await,
        Code::NotFound,
        "nope",
    );
    let mut other_node = cpublish_req("pub", mount_cap(), false);
    other_node.node_id = "no-such-node".into();
    assert_code(
        c.controller.controller_publish_volume(other_node).await,
        Code::NotFound,
        "no-such-node",
    );

    for _ in 0..2 {
        c.controller
            .controller_publish_volume(cpublish_req("pub", mount_cap(), false))
            .await
            .unwrap();
    }
    assert_code(
        c.controller
            .controller_publish_volume(cpublish_req("pub", mount_cap(), true))
            .await,
        Code::AlreadyExists,
        "read-only",
    );
    let got = c
        .controller
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: "pub".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status.unwrap().published_node_ids, [NODE_ID]);
    assert_code(
        c.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: "pub".into(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "attached",
    );

    for _ in 0..2 {
        c.controller
            .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                volume_id: "pub".into(),
                node_id: NODE_ID.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    c.controller
        .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: "unknown".into(),
            node_id: "unknown-node".into(),
            ..Default::default()
        })
        .await
        .expect("unpublishing an unknown volume from an unknown node succeeds");
}

#[tokio::test]
async fn validate_volume_capabilities_rules() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    c.controller
        .create_volume(create_req("vc", MIB, &[]))
        .await
        .unwrap();
    let req = |id: &str, caps: Vec<pb::VolumeCapability>| pb::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    assert_code(
        c.controller
            .validate_volume_capabilities(req("missing", vec![mount_cap()]))
            .await,
        Code::NotFound,
        "missing",
    );
    assert_code(
        c.controller
            .validate_volume_capabilities(req("vc", vec![]))
            .await,
        Code::InvalidArgument,
        "volume_capabilities",
    );
    let ok = c
        .controller
        .validate_volume_capabilities(req("vc", vec![mount_cap(), block_cap()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.confirmed.unwrap().volume_capabilities.len(), 2);
    let no = c
        .controller
        .validate_volume_capabilities(req("vc", vec![cap_with(false, Mode::MultiNodeMultiWriter)]))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none());
    assert!(no.message.contains("one node"), "{}", no.message);
}

#[tokio::test]
async fn list_volumes_pages_and_survives_changes_between_pages() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    for i in 0..5 {
        c.controller
            .create_volume(create_req(
                &format!("l{i}"),
                MIB,
                &[("numberOfReplicas", "1")],
            ))
            .await
            .unwrap();
    }
    let page = |token: String| pb::ListVolumesRequest {
        max_entries: 2,
        starting_token: token,
    };
    let p1 = c
        .controller
        .list_volumes(page(String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.entries.len(), 2);
    assert!(!p1.next_token.is_empty());
    // Delete the last volume of the page and add one: the token must still work.
    let last = p1.entries[1].volume.as_ref().unwrap().volume_id.clone();
    c.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: last,
            ..Default::default()
        })
        .await
        .unwrap();
    c.controller
        .create_volume(create_req("l9", MIB, &[("numberOfReplicas", "1")]))
        .await
        .unwrap();
    let mut seen: Vec<String> = p1
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    let mut token = p1.next_token;
    while !token.is_empty() {
        let p = c
            .controller
            .list_volumes(page(token))
            .await
            .unwrap()
            .into_inner();
        assert!(p.entries.len() <= 2);
        seen.extend(
            p.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        token = p.next_token;
    }
    assert_eq!(seen, ["l0", "l1", "l2", "l3", "l4", "l9"]);
    assert_code(
        c.controller.list_volumes(page("not-a-token".into())).await,
        Code::Aborted,
        "not-a-token",
    );
}

#[tokio::test]
async fn get_capacity_reports_free_disk_space() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let cap = c
        .controller
        .get_capacity(pb::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    let st = nix::sys::statvfs::statvfs(&b.disks[0]).unwrap();
    let free = st.blocks_available() as i64 * st.fragment_size() as i64;
    assert!(cap.available_capacity > 0);
    assert!((cap.available_capacity - free).abs() < free / 10 + (64 << 20));
}

#[tokio::test]
async fn expand_volume_rules_and_growth() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    c.controller
        .create_volume(create_req("ex", 16 * MIB, &[]))
        .await
        .unwrap();
    let req = |id: &str, bytes: Option<i64>| pb::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: bytes.map(|b| pb::CapacityRange {
            required_bytes: b,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    assert_code(
        c.controller.controller_expand_volume(req("ex", None)).await,
        Code::InvalidArgument,
        "capacity_range",
    );
    assert_code(
        c.controller
            .controller_expand_volume(req("nope", Some(32 * MIB)))
            .await,
        Code::NotFound,
        "nope",
    );
    for _ in 0..2 {
        let r = c
            .controller
            .controller_expand_volume(req("ex", Some(32 * MIB)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.capacity_bytes, 32 * MIB);
        assert!(r.node_expansion_required);
    }
    let smaller = c
        .controller
        .controller_expand_volume(req("ex", Some(8 * MIB)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(smaller.capacity_bytes, 32 * MIB, "never shrinks");
    let replica = walk(&b.disks[0].join("replicas")).remove(0);
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(&replica)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 32 * MIB);

    c.controller
        .controller_publish_volume(cpublish_req("ex", mount_cap(), false))
        .await
        .unwrap();
    assert_code(
        c.controller
            .controller_expand_volume(req("ex", Some(64 * MIB)))
            .await,
        Code::FailedPrecondition,
        "detach it",
    );
}

#[tokio::test]
async fn modify_volume_changes_only_the_replica_count() {
    let b = Bicsi::start(2).await;
    let mut c = b.client().await;
    c.controller
        .create_volume(create_req("mod", 8 * MIB, &[("numberOfReplicas", "1")]))
        .await
        .unwrap();
    let req = |k: &str, v: &str| pb::ControllerModifyVolumeRequest {
        volume_id: "mod".into(),
        mutable_parameters: [(k.to_string(), v.to_string())].into_iter().collect(),
        ..Default::default()
    };
    assert_code(
        c.controller
            .controller_modify_volume(req("fsType", "xfs"))
            .await,
        Code::InvalidArgument,
        "only mutable parameter is numberOfReplicas",
    );
    let mut unknown = req("numberOfReplicas", "2");
    unknown.volume_id = "nope".into();
    assert_code(
        c.controller.controller_modify_volume(unknown).await,
        Code::NotFound,
        "nope",
    );
    for _ in 0..2 {
        c.controller
            .controller_modify_volume(req("numberOfReplicas", "2"))
            .await
            .unwrap();
    }
    let total: usize = b
        .disks
        .iter()
        .map(|d| walk(&d.join("replicas")).len())
        .sum();
    assert_eq!(total, 2);
    c.controller
        .controller_modify_volume(req("numberOfReplicas", "1"))
        .await
        .unwrap();
    let total: usize = b
        .disks
        .iter()
        .map(|d| walk(&d.join("replicas")).len())
        .sum();
    assert_eq!(total, 1);
}

#[tokio::test]
async fn volumes_survive_a_restart() {
    let mut b = Bicsi::start(1).await;
    {
        let mut c = b.client().await;
        c.controller
            .create_volume(create_req("keep", 8 * MIB, &[]))
            .await
            .unwrap();
    }
    b.restart().await;
    let mut c = b.client().await;
    let v = c
        .controller
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: "keep".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.volume.unwrap().capacity_bytes, 8 * MIB);
}

#[tokio::test]
async fn modify_without_parameters_and_create_with_mutable_parameters() {
    let b = Bicsi::start(2).await;
    let mut c = b.client().await;
    // csi-sanity: ModifyVolume with no parameters is NotFound for an unknown volume, OK otherwise.
    assert_code(
        c.controller
            .controller_modify_volume(pb::ControllerModifyVolumeRequest {
                volume_id: "ghost".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "ghost",
    );
    c.controller
        .create_volume(create_req("plain", MIB, &[("numberOfReplicas", "1")]))
        .await
        .unwrap();
    c.controller
        .controller_modify_volume(pb::ControllerModifyVolumeRequest {
            volume_id: "plain".into(),
            ..Default::default()
        })
        .await
        .expect("no mutable parameters is a no-op");

    let mut bad = create_req("vac", MIB, &[]);
    bad.mutable_parameters = [("XXX_FakeKey".to_string(), "v".to_string())]
        .into_iter()
        .collect();
    assert_code(
        c.controller.create_volume(bad).await,
        Code::InvalidArgument,
        "XXX_FakeKey",
    );
    let mut good = create_req("vac", MIB, &[("numberOfReplicas", "1")]);
    good.mutable_parameters = [("numberOfReplicas".to_string(), "2".to_string())]
        .into_iter()
        .collect();
    c.controller.create_volume(good).await.unwrap();
    let total: usize = b
        .disks
        .iter()
        .map(|d| walk(&d.join("replicas")).len())
        .sum();
    assert_eq!(
        total, 3,
        "1 replica of 'plain' + 2 of 'vac' (the mutable parameter wins)"
    );
}

#[tokio::test]
async fn sizes_that_are_whole_sectors_are_honoured_exactly() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let v = c
        .controller
        .create_volume(create_req("odd", 10 * MIB + 512, &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 10 * MIB + 512);
    let v = c
        .controller
        .create_volume(create_req("odder", 10 * MIB + 1, &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        v.capacity_bytes,
        10 * MIB + 512,
        "rounded up to a whole sector"
    );
}

#[tokio::test]
async fn sigterm_stops_bicsi_while_a_client_stays_connected() {
    let mut b = Bicsi::start(1).await;
    let mut c = b.client().await;
    c.identity.probe(pb::ProbeRequest {}).await.unwrap();
    // `c` keeps its connection open (the kubelet and the sidecars do): stop must still end it.
    b.stop();
    drop(c);
}
