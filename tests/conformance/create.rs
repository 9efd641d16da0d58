//! CreateVolume's rules that decide what a new volume is: a name already taken with another
//! content source is AlreadyExists; without `numberOfReplicas` a volume gets as many replicas
//! as there are disks, up to 3, and a restore or clone its source's count; a size too small for
//! the volume's filesystem is rounded up to the minimum, or refused when the limit forbids it.

use std::path::PathBuf;

use tonic::Code;

use super::harness::*;
use bicsi::client::CsiClient;
use bicsi::csi::pb;

fn with_source(
    mut req: pb::CreateVolumeRequest,
    source: pb::volume_content_source::Type,
) -> pb::CreateVolumeRequest {
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(source),
    });
    req
}

fn snapshot_source(id: &str) -> pb::volume_content_source::Type {
    pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
        snapshot_id: id.into(),
    })
}

fn volume_source(id: &str) -> pb::volume_content_source::Type {
    pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
        volume_id: id.into(),
    })
}

async fn snapshot(c: &mut CsiClient, name: &str, source: &str) -> String {
    c.controller
        .create_snapshot(pb::CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: source.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("snapshot {name}: {s:?}"))
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id
}

async fn create_ok(c: &mut CsiClient, req: pb::CreateVolumeRequest) -> pb::Volume {
    let name = req.name.clone();
    c.controller
        .create_volume(req)
        .await
        .unwrap_or_else(|s| panic!("create {name}: {s:?}"))
        .into_inner()
        .volume
        .unwrap()
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
            // Any engine's replica file: qcow2, raw, or a copy-on-write replica's data file.
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

async fn condition(c: &mut CsiClient, id: &str) -> String {
    c.controller
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .volume_condition
        .unwrap()
        .message
}

#[tokio::test]
async fn a_name_taken_with_another_content_source_is_already_exists() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let one = [("numberOfReplicas", "1")];
    create_ok(&mut c, create_req("src", 16 * MIB, &one)).await;
    let sa = snapshot(&mut c, "sa", "src").await;
    let sb = snapshot(&mut c, "sb", "src").await;

    let restore = |source| with_source(create_req("r", 16 * MIB, &one), source);
    let first = create_ok(&mut c, restore(snapshot_source(&sa))).await;
    let again = create_ok(&mut c, restore(snapshot_source(&sa))).await;
    assert_eq!(
        first.volume_id, again.volume_id,
        "same source: the same volume"
    );
    assert_code(
        c.controller
            .create_volume(restore(snapshot_source(&sb)))
            .await,
        Code::AlreadyExists,
        &format!("made from snapshot {sa:?}"),
    );
    assert_code(
        c.controller
            .create_volume(restore(volume_source("src")))
            .await,
        Code::AlreadyExists,
        "volume \"src\"",
    );
    assert_code(
        c.controller
            .create_volume(create_req("r", 16 * MIB, &one))
            .await,
        Code::AlreadyExists,
        "made empty",
    );
    // And an empty volume's name is not taken over by a restore.
    assert_code(
        c.controller
            .create_volume(with_source(
                create_req("src", 16 * MIB, &one),
                snapshot_source(&sa),
            ))
            .await,
        Code::AlreadyExists,
        "already exists, made empty",
    );
}

#[tokio::test]
async fn replicas_default_to_the_disks_there_are_and_restores_keep_their_source_count() {
    let b = Bicsi::start(2).await;
    let mut c = b.client().await;
    // Two disks: two replicas, a healthy volume, not "degraded: 2 of 3".
    create_ok(&mut c, create_req("plain", 16 * MIB, &[])).await;
    assert_eq!(replica_files(&b, "plain").len(), 2);
    assert_eq!(condition(&mut c, "plain").await, "healthy");

    // A one-replica source: its restore and its clone get one replica too, not two.
    create_ok(
        &mut c,
        create_req("single", 16 * MIB, &[("numberOfReplicas", "1")]),
    )
    .await;
    let s = snapshot(&mut c, "s1", "single").await;
    create_ok(
        &mut c,
        with_source(create_req("restored", 16 * MIB, &[]), snapshot_source(&s)),
    )
    .await;
    assert_eq!(replica_files(&b, "restored").len(), 1);
    assert_eq!(condition(&mut c, "restored").await, "healthy");
    create_ok(
        &mut c,
        with_source(create_req("cloned", 16 * MIB, &[]), volume_source("single")),
    )
    .await;
    assert_eq!(replica_files(&b, "cloned").len(), 1);
    // A restore that names its count gets it.
    create_ok(
        &mut c,
        with_source(
            create_req("restored2", 16 * MIB, &[("numberOfReplicas", "2")]),
            snapshot_source(&s),
        ),
    )
    .await;
    assert_eq!(replica_files(&b, "restored2").len(), 2);
}

#[tokio::test]
async fn small_volumes_are_rounded_up_to_what_their_filesystem_needs() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let one = [("numberOfReplicas", "1")];
    // ext4 (the default filesystem): 4 MiB at least.
    let v = create_ok(&mut c, create_req("tiny", 1, &one)).await;
    assert_eq!(v.capacity_bytes, 4 * MIB);
    let v = create_ok(&mut c, create_req("tiny", 1, &one)).await;
    assert_eq!(
        v.capacity_bytes,
        4 * MIB,
        "the same request: the same volume"
    );
    // A block volume: 1 MiB.
    let mut block = create_req("tinyblock", 1, &one);
    block.volume_capabilities = vec![block_cap()];
    assert_eq!(create_ok(&mut c, block).await.capacity_bytes, MIB);
    // XFS: 300 MiB, from the fsType parameter.
    let v = create_ok(
        &mut c,
        create_req(
            "smallxfs",
            16 * MIB,
            &[("numberOfReplicas", "1"), ("fsType", "xfs")],
        ),
    )
    .await;
    assert_eq!(v.capacity_bytes, 300 * MIB);
    // A limit below the minimum cannot be met.
    let mut capped = create_req("capped", MIB, &[("fsType", "xfs")]);
    capped.capacity_range = Some(pb::CapacityRange {
        required_bytes: 0,
        limit_bytes: 100 * MIB,
    });
    assert_code(
        c.controller.create_volume(capped).await,
        Code::OutOfRange,
        "300 MiB), the smallest volume bicsi makes for an xfs filesystem",
    );
    let mut capped = create_req("capped", MIB, &[]);
    capped.capacity_range = Some(pb::CapacityRange {
        required_bytes: 1,
        limit_bytes: 2 * MIB,
    });
    assert_code(
        c.controller.create_volume(capped).await,
        Code::OutOfRange,
        "4 MiB",
    );
}
