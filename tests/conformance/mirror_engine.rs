//! The mirror engine (issue 14, several replicas): a 2-replica volume on two XFS disks with
//! reflink gets it automatically (and `-o wide` says so); fio's crc32c-verified data reads back
//! through detaches, restarts, a kill -9 of bicsi while fio writes, and re-adoption of the live
//! engine; both raw replica files hold the same bytes after every detach; a snapshot of the
//! attached volume taken while a writer runs is one instant of it, and restores into a volume
//! that reads it back; offline expansion grows both replicas.

use std::path::{Path, PathBuf};

use tonic::Code;

use super::backing::{attach, create_with, detach};
use super::harness::*;
use super::loop_engine::{
    Xfs, create, engine_of, fio, have_fio, kill_and_restart_while_fio_writes, pairs, replica_paths,
};
use bicsi::csi::pb;

#[track_caller]
fn assert_same_bytes(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "{} vs {}", a.display(), b.display());
    assert!(
        x == y,
        "replicas {} and {} differ",
        a.display(),
        b.display()
    );
}

async fn two_disk_bicsi(x1: &Xfs, x2: &Xfs) -> Bicsi {
    Bicsi::start_with(
        0,
        &[
            "--disk",
            x1.path().to_str().unwrap(),
            "--disk",
            x2.path().to_str().unwrap(),
        ],
    )
    .await
}

#[tokio::test]
async fn a_mirror_volume_keeps_fio_verified_data_through_detach_restart_kill_and_readoption() {
    let test = "a_mirror_volume_keeps_fio_verified_data_through_detach_restart_kill_and_readoption";
    if !root_or_skip(test) || !have_fio(test) {
        return;
    }
    let (Some(x1), Some(x2)) = (Xfs::new(test, 512), Xfs::new(test, 512)) else {
        return;
    };
    let mut b = two_disk_bicsi(&x1, &x2).await;
    let mut c = b.client().await;
    let two = pairs(&[("numberOfReplicas", "2")]);
    let id = create(&mut c, create_with("data", 64 * MIB, &two, block_cap())).await;
    assert_eq!(engine_of(&b, "data"), "mirror");
    let (ok, wide, err) = b.cli(&["get", "volumes", "-o", "wide"]);
    assert!(ok, "{err}");
    let row = wide.lines().find(|l| l.starts_with("data ")).unwrap();
    assert!(row.contains(" mirror "), "{wide}");
    let replicas = replica_paths(&b, "data");
    assert_eq!(replicas.len(), 2);
    assert!(
        replicas.iter().all(|r| r.ends_with("volume.raw")),
        "{replicas:?}"
    );
    assert!(
        replicas[0].starts_with(x1.path()) != replicas[1].starts_with(x1.path()),
        "one replica per disk: {replicas:?}"
    );

    let (st, tg) = attach(&mut c, &b, &id, block_cap()).await;
    let engines = mirror_engines_under(b.dir.path());
    assert_eq!(engines.len(), 1, "one mirror engine serves the volume");
    assert!(
        engines_under(b.dir.path()).is_empty(),
        "a qemu-storage-daemon runs"
    );
    // The loop device sits on the engine's file, not on a replica, and does direct I/O.
    assert!(loops_under(&x1.path()).is_empty() && loops_under(&x2.path()).is_empty());
    let devs = loops_under(b.dir.path());
    assert_eq!(devs.len(), 1, "{devs:?}");
    let name = devs[0].trim_start_matches("/dev/");
    let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap();
    assert_eq!(
        dio.trim(),
        "1",
        "the mirror engine's loop device is buffered"
    );
    fio(&tg, true);
    detach(&mut c, &id, &st, &tg).await;
    assert!(
        mirror_engines_under(b.dir.path()).is_empty(),
        "the engine stayed"
    );
    assert_same_bytes(&replicas[0], &replicas[1]);

    // A restart of bicsi while detached, then attach again: the data is there.
    b.restart().await;
    let mut c = b.client().await;
    let (st, tg) = attach(&mut c, &b, &id, block_cap()).await;
    fio(&tg, false);

    // A restart while staged re-adopts the live engine (the same process), and a repeated stage
    // finds it in place.
    let before = mirror_engines_under(b.dir.path());
    b.restart().await;
    assert!(b.log().contains("re-adopted staged volume"), "{}", b.log());
    let mut c = b.client().await;
    c.node
        .node_stage_volume(stage_req(&id, &st, block_cap()))
        .await
        .unwrap();
    assert_eq!(mirror_engines_under(b.dir.path()), before);
    fio(&tg, false);

    // kill -9 of bicsi and a restart while fio writes (rate-limited, so it spans them): the
    // writes go on through the engine and verify.
    kill_and_restart_while_fio_writes(&mut b, &tg).await;
    assert_eq!(mirror_engines_under(b.dir.path()), before);
    let mut c = b.client().await;
    fio(&tg, false);
    detach(&mut c, &id, &st, &tg).await;
    assert!(mirror_engines_under(b.dir.path()).is_empty());
    assert_same_bytes(&replicas[0], &replicas[1]);
    // A mirror volume's replica count is fixed.
    assert_code(
        c.controller
            .controller_modify_volume(pb::ControllerModifyVolumeRequest {
                volume_id: id.clone(),
                mutable_parameters: [("numberOfReplicas".to_string(), "3".to_string())].into(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "mirror engine",
    );
    for _ in 0..2 {
        c.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(replicas.iter().all(|r| !r.exists()));
}

/// The region the snapshot test's writer rewrites, pass after pass.
const REGION: usize = 1 << 20;

/// REGION bytes of a stamp: every 4 KiB block holds `pass` and its index, so a copy shows which
/// pass each block was at.
fn stamp_pass(pass: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(REGION);
    for i in 0..(REGION / 4096) as u32 {
        let mut block = [0u8; 4096];
        for chunk in block.chunks_mut(8) {
            chunk[..4].copy_from_slice(&pass.to_le_bytes());
            chunk[4..].copy_from_slice(&i.to_le_bytes());
        }
        out.extend_from_slice(&block);
    }
    out
}

/// The pass each 4 KiB block of `bytes` was written at.
fn passes(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4096)
        .map(|b| u32::from_le_bytes(b[..4].try_into().unwrap()))
        .collect()
}

#[tokio::test]
async fn a_snapshot_of_an_attached_mirror_volume_is_one_instant_and_restores() {
    let test = "a_snapshot_of_an_attached_mirror_volume_is_one_instant_and_restores";
    if !root_or_skip(test) {
        return;
    }
    let (Some(x1), Some(x2)) = (Xfs::new(test, 512), Xfs::new(test, 512)) else {
        return;
    };
    let b = two_disk_bicsi(&x1, &x2).await;
    let mut c = b.client().await;
    let two = pairs(&[("numberOfReplicas", "2")]);
    let id = create(&mut c, create_with("src", 16 * MIB, &two, block_cap())).await;
    assert_eq!(engine_of(&b, "src"), "mirror");
    let (st, tg) = attach(&mut c, &b, &id, block_cap()).await;

    // A writer rewrites the first MiB pass after pass, in order (O_DIRECT, 4 KiB a write),
    // while the snapshot is taken: a copy of one instant holds a run of pass p followed by a
    // run of pass p-1 (the pass going on when it was taken), nothing else.
    let dev = tg.clone();
    use std::sync::atomic::Ordering::Relaxed;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (stop_w, done_w) = (stop.clone(), done.clone());
    let writer = std::thread::spawn(move || {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev)
            .unwrap();
        let mut pass = 1u32;
        let mut buf = AlignedBlock::new();
        while !stop_w.load(std::sync::atomic::Ordering::Relaxed) {
            let data = stamp_pass(pass);
            for (i, block) in data.chunks(4096).enumerate() {
                buf.bytes().copy_from_slice(block);
                f.write_all_at(buf.bytes(), i as u64 * 4096).unwrap();
            }
            done_w.store(pass, Relaxed);
            pass += 1;
        }
        pass
    });
    let wait_for = |n: u32| {
        let done = done.clone();
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while done.load(Relaxed) < n {
                assert!(std::time::Instant::now() < deadline, "the writer is stuck");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    };
    wait_for(2).await;
    let snap = c
        .controller
        .create_snapshot(pb::CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "instant".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let at_snapshot = done.load(Relaxed);
    wait_for(at_snapshot + 2).await;
    stop.store(true, Relaxed);
    writer.join().unwrap();
    detach(&mut c, &id, &st, &tg).await;

    // Restored into a new volume (of the same engine) and read back through its device.
    let restored = c
        .controller
        .create_volume(pb::CreateVolumeRequest {
            volume_content_source: Some(pb::VolumeContentSource {
                r#type: Some(pb::volume_content_source::Type::Snapshot(
                    pb::volume_content_source::SnapshotSource {
                        snapshot_id: snap.snapshot_id.clone(),
                    },
                )),
            }),
            ..create_with("restored", 16 * MIB, &two, block_cap())
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let (st2, tg2) = attach(&mut c, &b, &restored, block_cap()).await;
    let bytes = std::fs::read(&tg2).unwrap();
    let p = passes(&bytes[..REGION]);
    let first = p[0];
    assert!(
        first >= 2 && first <= at_snapshot + 2,
        "the snapshot holds the writes of its time: pass {first}, {at_snapshot} done when it was taken"
    );
    let cut = p.iter().position(|&x| x != first).unwrap_or(p.len());
    assert!(
        p[cut..].iter().all(|&x| x + 1 == first),
        "not one instant: pass {first} up to block {cut}, then {:?}",
        &p[cut..cut + 4.min(p.len() - cut)]
    );
    detach(&mut c, &restored, &st2, &tg2).await;
}

/// A 4 KiB buffer aligned for O_DIRECT.
struct AlignedBlock {
    raw: Vec<u8>,
    at: usize,
}

impl AlignedBlock {
    fn new() -> AlignedBlock {
        let raw = vec![0u8; 8192];
        let at = raw.as_ptr().align_offset(4096);
        AlignedBlock { raw, at }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.raw[self.at..self.at + 4096]
    }
}

#[tokio::test]
async fn a_mirror_volume_grows_offline_on_both_replicas() {
    let test = "a_mirror_volume_grows_offline_on_both_replicas";
    if !root_or_skip(test) {
        return;
    }
    let (Some(x1), Some(x2)) = (Xfs::new(test, 512), Xfs::new(test, 512)) else {
        return;
    };
    let b = two_disk_bicsi(&x1, &x2).await;
    let mut c = b.client().await;
    let two = pairs(&[("numberOfReplicas", "2")]);
    let id = create(&mut c, create_with("grow", 16 * MIB, &two, block_cap())).await;
    assert_eq!(engine_of(&b, "grow"), "mirror");
    c.controller
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 32 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let replicas: Vec<PathBuf> = replica_paths(&b, "grow");
    for r in &replicas {
        assert_eq!(
            std::fs::metadata(r).unwrap().len(),
            32 << 20,
            "{}",
            r.display()
        );
    }
    let (st, tg) = attach(&mut c, &b, &id, block_cap()).await;
    let f = std::fs::File::open(&tg).unwrap();
    use std::io::Seek;
    let size = (&f).seek(std::io::SeekFrom::End(0)).unwrap();
    assert_eq!(size, 32 << 20);
    drop(f);
    detach(&mut c, &id, &st, &tg).await;
}
