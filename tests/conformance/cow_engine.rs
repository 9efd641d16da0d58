//! The mirror engine over copy-on-write replicas (issue 14, disks without reflink): on the
//! test's ext4 temp dirs a volume pinned to `engine: mirror` gets `cow` replicas (a data file,
//! its map and a link to the disk's raw expansion of the backing image), `-o wide` says
//! mirror, the image reads through the layer, data written survives detach, restart and
//! re-adoption of the live engine, the two replicas' views are equal after detach, snapshots
//! (detached, and attached with writes the engine acknowledged but nobody flushed) are sparse
//! raw files of the view that restore and clone into new cow volumes, what is not wired yet
//! (expansion) is refused naming the fix, the image is kept while
//! the volume uses it, and deleting the volume removes its replicas' files.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::backing::{attach, create_with, detach};
use super::harness::*;
use super::images::*;
use super::loop_engine::{
    create, engine_of, fio, have_fio, pairs, replica_paths, served_qcow2, snap_req, volume_view,
    write_synced,
};
use crate::kit::noise;
use bicsi::csi::pb;

/// The replica directories of the disks of `b` (each holds one replica's files).
fn replica_dirs(b: &Bicsi) -> Vec<PathBuf> {
    b.disks
        .iter()
        .flat_map(|d| std::fs::read_dir(d.join("replicas")).into_iter().flatten())
        .flatten()
        .map(|e| e.path())
        .collect()
}

fn assert_same_view(a: &Path, b: &Path) {
    assert!(
        bicsi::os::compare::identical_files(a, b).unwrap(),
        "the views of {} and {} differ",
        a.display(),
        b.display()
    );
}

async fn snapshot(c: &mut bicsi::client::CsiClient, name: &str, source: &str) -> String {
    c.controller
        .create_snapshot(snap_req(name, source, &[]))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id
}

/// The one file of snapshot `id` on the disks of `b`.
fn snapshot_file(b: &Bicsi, id: &str) -> PathBuf {
    let found: Vec<PathBuf> = b
        .disks
        .iter()
        .map(|d| d.join("snapshots").join(id).join("snapshot.raw"))
        .filter(|p| p.is_file())
        .collect();
    assert!(!found.is_empty(), "snapshot {id} has no snapshot.raw");
    found[0].clone()
}

/// Writes `bytes` at MiB `seek` of the device `dev`, O_DIRECT, no fsync.
fn dd_write(dev: &Path, bytes: &[u8], seek: u64) {
    let src = dev.with_extension("dd-in");
    std::fs::write(&src, bytes).unwrap();
    let out = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", dev.display()))
        .args([
            "bs=1M",
            &format!("seek={seek}"),
            "oflag=direct",
            "conv=notrunc",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&src);
}

/// The whole content of the device `dev`, read with O_DIRECT.
fn dd_read(dev: &Path) -> Vec<u8> {
    let out = Command::new("dd")
        .arg(format!("if={}", dev.display()))
        .args(["bs=1M", "iflag=direct", "status=none"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn of_snapshot(id: &str) -> pb::volume_content_source::Type {
    pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
        snapshot_id: id.into(),
    })
}

fn from_source(
    name: &str,
    bytes: i64,
    params: &[(String, String)],
    cap: pb::VolumeCapability,
    source: pb::volume_content_source::Type,
) -> pb::CreateVolumeRequest {
    let mut req = create_with(name, bytes, params, cap);
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(source),
    });
    req
}

#[tokio::test]
async fn a_pinned_mirror_volume_on_ext4_is_served_over_copy_on_write_replicas() {
    let test = "a_pinned_mirror_volume_on_ext4_is_served_over_copy_on_write_replicas";
    if !root_or_skip(test) || !have_fio(test) {
        return;
    }
    // Two disk directories on the temp dir's ext4: no reflink.
    let mut b = Bicsi::start(2).await;
    let mut c = b.client().await;
    let (_server, image) = served_qcow2(
        &b,
        16,
        "bi-cow",
        &[("numberOfReplicas", "2"), ("engine", "mirror")],
    )
    .await;
    let img = create(&mut c, create_with("img", 64 * MIB, &image, mount_cap())).await;
    // One replica, no image, block: the engine serves a single cow replica too.
    let one = pairs(&[("numberOfReplicas", "1"), ("engine", "mirror")]);
    let blk = create(&mut c, create_with("blk", 64 * MIB, &one, block_cap())).await;
    for name in ["img", "blk"] {
        assert_eq!(engine_of(&b, name), "mirror", "{name}");
    }
    let (ok, wide, err) = b.cli(&["get", "volumes", "-o", "wide"]);
    assert!(ok, "{err}");
    let row = wide.lines().find(|l| l.starts_with("img ")).unwrap();
    assert!(row.contains(" mirror "), "{wide}");
    let (ok, json, err) = b.cli(&["get", "volume", "img", "-o", "json"]);
    assert!(ok, "{err}");
    let view: serde_json::Value = serde_json::from_str(&json).unwrap();
    for r in view["record"]["replicas"].as_array().unwrap() {
        assert_eq!(r["format"], "cow", "{r}");
        assert_eq!(r["clusterBytes"], 65536, "{r}");
    }

    // The image reads through the layer; written data is in both replicas' views.
    let (st, tg) = attach(&mut c, &b, &img, mount_cap()).await;
    assert_eq!(mirror_engines_under(b.dir.path()).len(), 1);
    assert!(
        engines_under(b.dir.path()).is_empty(),
        "a qemu-storage-daemon runs"
    );
    assert_eq!(
        std::fs::read(tg.join("hello.txt")).unwrap(),
        b"hello from the backing image\n"
    );
    // The replicas (made at first attach, once the image's file is on their disks): data + map
    // + a base link to the disk's raw expansion.
    let replicas = replica_paths(&b, "img");
    assert_eq!(replicas.len(), 2);
    for r in &replicas {
        assert!(r.ends_with("volume.cow") && r.is_file(), "{r:?}");
        assert!(r.with_extension("cowmap").is_file(), "{r:?}");
        let base = std::fs::read_link(r.with_file_name("base")).unwrap();
        assert!(
            base.ends_with("backing.raw") && base.is_file(),
            "{}",
            base.display()
        );
        let disk = b.disks.iter().find(|d| r.starts_with(d)).unwrap();
        assert!(base.starts_with(disk), "the base is on the replica's disk");
    }
    assert!(replicas[0].parent() != replicas[1].parent(), "{replicas:?}");
    let single = replica_paths(&b, "blk");
    assert!(
        !single[0].with_file_name("base").exists(),
        "no image, no base"
    );

    let data = noise(3 << 20, 7);
    write_synced(&tg, "data.bin", &data);
    detach(&mut c, &img, &st, &tg).await;
    assert!(
        mirror_engines_under(b.dir.path()).is_empty(),
        "the engine stayed"
    );
    assert_same_view(&replicas[0], &replicas[1]);

    // Block volume: fio-verified data through a restart that re-adopts the live engine.
    let (bst, btg) = attach(&mut c, &b, &blk, block_cap()).await;
    fio(&btg, true);
    let before = mirror_engines_under(b.dir.path());
    assert_eq!(before.len(), 1);
    b.restart().await;
    assert!(b.log().contains("re-adopted staged volume"), "{}", b.log());
    let mut c = b.client().await;
    c.node
        .node_stage_volume(stage_req(&blk, &bst, block_cap()))
        .await
        .unwrap();
    assert_eq!(
        mirror_engines_under(b.dir.path()),
        before,
        "the same engine"
    );
    fio(&btg, false);
    detach(&mut c, &blk, &bst, &btg).await;
    let (bst, btg) = attach(&mut c, &b, &blk, block_cap()).await;
    fio(&btg, false);
    detach(&mut c, &blk, &bst, &btg).await;

    // Snapshots are sparse raw files of the view. Detached: the image's volume.
    let s1 = snapshot(&mut c, "s1", &img).await;
    let s1_file = snapshot_file(&b, &s1);
    let used = std::fs::metadata(&s1_file).unwrap().blocks() * 512;
    assert!(
        used < 40 * MIB as u64,
        "{}: {used} bytes allocated for a 64 MiB volume holding ~20 MiB",
        s1_file.display()
    );
    // Attached, block: writes the engine acknowledged (O_DIRECT, no fsync) are in it; later
    // ones are not.
    let (bst, btg) = attach(&mut c, &b, &blk, block_cap()).await;
    let block = noise(4 << 20, 11);
    dd_write(&btg, &block, 40);
    let at_snapshot = dd_read(&btg);
    let s2 = snapshot(&mut c, "s2", &blk).await;
    assert!(snapshot_file(&b, &s2).ends_with("snapshot.raw"));
    dd_write(&btg, &noise(4 << 20, 12), 40);
    detach(&mut c, &blk, &bst, &btg).await;
    // Restored into a new copy-on-write volume (no base): the snapshot's content exactly.
    let restored = create(
        &mut c,
        from_source("blkr", 64 * MIB, &one, block_cap(), of_snapshot(&s2)),
    )
    .await;
    let r = replica_paths(&b, "blkr");
    assert!(
        r[0].ends_with("volume.cow") && r[0].with_extension("cowmap").is_file(),
        "{r:?}"
    );
    let (rst, rtg) = attach(&mut c, &b, &restored, block_cap()).await;
    assert!(
        dd_read(&rtg) == at_snapshot,
        "the restored volume is not the snapshot's instant"
    );
    detach(&mut c, &restored, &rst, &rtg).await;
    // A volume over the image: attached snapshot, restore and clone into cow volumes.
    let (st, tg) = attach(&mut c, &b, &img, mount_cap()).await;
    let before = noise(1 << 20, 13);
    write_synced(&tg, "before.bin", &before);
    let s3 = snapshot(&mut c, "s3", &img).await;
    write_synced(&tg, "after.bin", b"after the snapshot");
    detach(&mut c, &img, &st, &tg).await;
    let from_s3 = create(
        &mut c,
        from_source("froms3", 64 * MIB, &one, mount_cap(), of_snapshot(&s3)),
    )
    .await;
    let clone = create(
        &mut c,
        from_source(
            "clone",
            64 * MIB,
            &one,
            mount_cap(),
            pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
                volume_id: img.clone(),
            }),
        ),
    )
    .await;
    for (name, id, after) in [("froms3", &from_s3, false), ("clone", &clone, true)] {
        assert_eq!(
            volume_view(&b, name)["record"]["replicas"][0]["format"],
            "cow",
            "{name}"
        );
        let (st, tg) = attach(&mut c, &b, id, mount_cap()).await;
        assert_eq!(
            std::fs::read(tg.join("hello.txt")).unwrap(),
            b"hello from the backing image\n"
        );
        assert!(std::fs::read(tg.join("data.bin")).unwrap() == data, "{id}");
        assert!(
            std::fs::read(tg.join("before.bin")).unwrap() == before,
            "{id}"
        );
        assert_eq!(tg.join("after.bin").exists(), after, "{id}");
        detach(&mut c, id, &st, &tg).await;
    }

    // Exports: a `type: bi` snapshot of the attached volume, and export-from-volume of the
    // detached one; a qemu volume over each holds the volume's files.
    let (st, tg) = attach(&mut c, &b, &img, mount_cap()).await;
    let sbi = c
        .controller
        .create_snapshot(snap_req(
            "s-bi",
            &img,
            &[("type", "bi"), ("export-type", "raw")],
        ))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    detach(&mut c, &img, &st, &tg).await;
    wait_final(&b, "s-bi").await;
    let from_volume = pairs(&[
        ("numberOfReplicas", "1"),
        ("engine", "qemu"),
        ("backingImage", "bi-from-cow"),
        ("backingImageDataSourceType", "export-from-volume"),
        (
            "backingImageDataSourceParameters",
            "{\"volume-name\": \"img\", \"export-type\": \"qcow2\"}",
        ),
    ]);
    let over_bi = pairs(&[
        ("numberOfReplicas", "1"),
        ("engine", "qemu"),
        ("backingImage", "s-bi"),
    ]);
    let mut exported = Vec::new();
    for (name, params) in [("over-bi", &over_bi), ("over-volume", &from_volume)] {
        let id = create(&mut c, create_with(name, 64 * MIB, params, mount_cap())).await;
        let (st, tg) = attach(&mut c, &b, &id, mount_cap()).await;
        assert!(
            std::fs::read(tg.join("data.bin")).unwrap() == data,
            "{name}"
        );
        assert!(tg.join("after.bin").exists(), "{name}");
        detach(&mut c, &id, &st, &tg).await;
        exported.push(id);
    }

    // Expansion (offline): data file and map grow together; the filesystem grows at attach.
    let grown = c
        .controller
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: img.clone(),
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
    for r in &replicas {
        assert_eq!(std::fs::metadata(r).unwrap().len(), 128 << 20, "{r:?}");
    }
    assert_same_view(&replicas[0], &replicas[1]);
    assert_eq!(replica_dirs(&b).len(), 8, "{:?}", replica_dirs(&b));

    // An offline rebuild by hand: the other replica is made again through the source's view,
    // a new cow replica over its own disk's base, equal to the source.
    let ids: Vec<String> = volume_view(&b, "img")["record"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    // A file made again: another inode, or the same number reused (ext4 hands a freed inode
    // number out again) with another birth time.
    let identity = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.ino(), m.created().unwrap())
    };
    let old_file = identity(&replicas[1]);
    let (ok, out, err) = b.cli(&["volume", "rebuild", "img", "--from", &ids[0]]);
    assert!(ok && out.contains("rebuilt and verified"), "{out}{err}");
    assert_ne!(identity(&replicas[1]), old_file);
    assert_same_view(&replicas[0], &replicas[1]);
    let base = std::fs::read_link(replicas[1].with_file_name("base")).unwrap();
    let disk = b.disks.iter().find(|d| replicas[1].starts_with(d)).unwrap();
    assert!(
        base.starts_with(disk) && base.ends_with("backing.raw"),
        "{base:?}"
    );
    assert_eq!(replica_dirs(&b).len(), 8, "{:?}", replica_dirs(&b));

    // The image and its expansion stay while the volume uses them: its content still reads.
    let (ok, _, err) = b.cli(&["delete", "backingimage", "bi-cow"]);
    assert!(!ok && err.contains("used by volumes"), "{err}");
    let (st, tg) = attach(&mut c, &b, &img, mount_cap()).await;
    assert!(std::fs::read(tg.join("data.bin")).unwrap() == data);
    assert_eq!(
        std::fs::read(tg.join("hello.txt")).unwrap(),
        b"hello from the backing image\n"
    );
    let fs = nix::sys::statvfs::statvfs(&tg).unwrap();
    let fs_bytes = fs.blocks() as u64 * fs.fragment_size() as u64;
    assert!(
        fs_bytes > 100 << 20,
        "the filesystem grew: {fs_bytes} bytes"
    );
    detach(&mut c, &img, &st, &tg).await;

    // Deleting the volumes removes every replica's files.
    for id in exported
        .iter()
        .chain([&img, &blk, &restored, &from_s3, &clone])
    {
        for _ in 0..2 {
            c.controller
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    for id in [&s1, &s2, &s3, &sbi] {
        c.controller
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(replica_dirs(&b).is_empty(), "{:?}", replica_dirs(&b));
}
