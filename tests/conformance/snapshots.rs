//! CSI snapshots, clones and restores, and exports of attached volumes: the CSI rules (names,
//! idempotency, AlreadyExists, filters, pagination, unknown ids), and the data read back from
//! new volumes made from a snapshot, a volume or an exported image, with the backing image kept
//! or overridden as the seed's restore describes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tonic::Code;

use super::backing::{attach, create_with, detach};
use super::harness::*;
use super::images::*;
use bicsi::client::CsiClient;
use bicsi::csi::pb;

fn snap_req(name: &str, source: &str, params: &[(&str, &str)]) -> pb::CreateSnapshotRequest {
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

fn list_req(max: i32, token: &str, source: &str, id: &str) -> pb::ListSnapshotsRequest {
    pb::ListSnapshotsRequest {
        max_entries: max,
        starting_token: token.into(),
        source_volume_id: source.into(),
        snapshot_id: id.into(),
        ..Default::default()
    }
}

async fn list_ids(c: &mut CsiClient, req: pb::ListSnapshotsRequest) -> (Vec<String>, String) {
    let r = c.controller.list_snapshots(req).await.unwrap().into_inner();
    (
        r.entries
            .into_iter()
            .map(|e| e.snapshot.unwrap().snapshot_id)
            .collect(),
        r.next_token,
    )
}

async fn snapshot(c: &mut CsiClient, name: &str, source: &str) -> pb::Snapshot {
    c.controller
        .create_snapshot(snap_req(name, source, &[]))
        .await
        .unwrap_or_else(|s| panic!("snapshot {name}: {s:?}"))
        .into_inner()
        .snapshot
        .unwrap()
}

fn from_snapshot(
    name: &str,
    bytes: i64,
    snapshot: &str,
    params: &[(String, String)],
) -> pb::CreateVolumeRequest {
    let mut req = create_with(name, bytes, params, mount_cap());
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(
            pb::volume_content_source::SnapshotSource {
                snapshot_id: snapshot.into(),
            },
        )),
    });
    req
}

fn from_volume(
    name: &str,
    bytes: i64,
    volume: &str,
    params: &[(String, String)],
) -> pb::CreateVolumeRequest {
    let mut req = create_with(name, bytes, params, mount_cap());
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Volume(
            pb::volume_content_source::VolumeSource {
                volume_id: volume.into(),
            },
        )),
    });
    req
}

fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Writes a file and makes it durable (data, inode and directory entry).
fn write_synced(dir: &Path, name: &str, bytes: &[u8]) {
    let mut f = std::fs::File::create(dir.join(name)).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

/// A writer that keeps rewriting a file in the mounted volume until dropped.
struct BusyWriter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl BusyWriter {
    fn start(dir: &Path) -> BusyWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let path = dir.join("busy.bin");
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rounds = 0u64;
            let block = vec![0x5a_u8; 1 << 20];
            while !s.load(Ordering::Relaxed) {
                let mut f = std::fs::File::create(&path).unwrap();
                for _ in 0..4 {
                    f.write_all(&block).unwrap();
                }
                f.sync_all().unwrap();
                rounds += 1;
            }
            rounds
        });
        BusyWriter {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for BusyWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The replica files of a volume (`<disk>/replicas/<volume>-<id>/volume.qcow2`).
fn replica_files(b: &Bicsi, volume: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in &b.disks {
        if let Ok(entries) = std::fs::read_dir(d.join("replicas")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.rsplit_once('-').is_some_and(|(v, _)| v == volume) {
                    // Any engine's replica file: qcow2, raw, or a copy-on-write replica's data
                    // file (a sparse raw file of the volume's size).
                    let file = ["volume.qcow2", "volume.raw", "volume.cow"]
                        .iter()
                        .map(|f| e.path().join(f))
                        .find(|f| f.exists())
                        .unwrap_or_else(|| e.path().join("volume.qcow2"));
                    out.push(file);
                }
            }
        }
    }
    out.sort();
    out
}

fn qemu_info(path: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `qemu-img compare` of two images' guest content (whole backing chains); true when equal.
fn same_content(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare {} {}: {}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn snapshot_files(b: &Bicsi, id: &str) -> Vec<PathBuf> {
    b.disks
        .iter()
        .map(|d| d.join("snapshots").join(id).join("snapshot.qcow2"))
        .filter(|p| p.is_file())
        .collect()
}

#[tokio::test]
async fn snapshot_rpcs_follow_the_csi_rules() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    // The capabilities are asserted by `controller_advertises_what_it_implements` (main.rs).
    // qemu's engine, pinned: its qcow2 snapshot files are inspected below (the default engine
    // of this one-node ext4 cluster, mirror over copy-on-write replicas, takes raw snapshots:
    // `cow_engine.rs`).
    for name in ["src-a", "src-b"] {
        c.controller
            .create_volume(create_req(
                name,
                16 * MIB,
                &[("numberOfReplicas", "1"), ("engine", "qemu")],
            ))
            .await
            .unwrap();
    }

    // Missing fields, unknown source, bad parameters.
    assert_code(
        c.controller
            .create_snapshot(snap_req("", "src-a", &[]))
            .await,
        Code::InvalidArgument,
        "name",
    );
    assert_code(
        c.controller.create_snapshot(snap_req("s", "", &[])).await,
        Code::InvalidArgument,
        "source_volume_id",
    );
    assert_code(
        c.controller
            .create_snapshot(snap_req("s", "nope", &[]))
            .await,
        Code::NotFound,
        "nope",
    );
    assert_code(
        c.controller
            .create_snapshot(snap_req("s", "src-a", &[("colour", "blue")]))
            .await,
        Code::InvalidArgument,
        "\"colour\"",
    );
    assert_code(
        c.controller
            .create_snapshot(snap_req(
                "s",
                "src-a",
                &[("type", "bi"), ("export-type", "vmdk")],
            ))
            .await,
        Code::InvalidArgument,
        "vmdk",
    );

    // Idempotent by name; the same name of another volume is AlreadyExists.
    let s1 = snapshot(&mut c, "snap-1", "src-a").await;
    let again = snapshot(&mut c, "snap-1", "src-a").await;
    assert_eq!(s1, again);
    assert!(s1.ready_to_use);
    assert_eq!(s1.size_bytes, 16 * MIB);
    assert_eq!(s1.source_volume_id, "src-a");
    let t = s1.creation_time.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - t.seconds).abs() < 120, "creation time {t:?}");
    assert_eq!(snapshot_files(&b, &s1.snapshot_id).len(), 1);
    assert_code(
        c.controller
            .create_snapshot(snap_req("snap-1", "src-b", &[]))
            .await,
        Code::AlreadyExists,
        "src-a",
    );
    let s2 = snapshot(&mut c, "snap-2", "src-a").await;
    let s3 = snapshot(&mut c, "snap-3", "src-b").await;

    // Filters: by id (an unknown one lists nothing), by source volume.
    let (all, next) = list_ids(&mut c, list_req(0, "", "", "")).await;
    assert_eq!(all, ["snap-1", "snap-2", "snap-3"]);
    assert!(next.is_empty());
    assert_eq!(
        list_ids(&mut c, list_req(0, "", "", "snap-2")).await.0,
        ["snap-2"]
    );
    assert!(
        list_ids(&mut c, list_req(0, "", "", "no-such"))
            .await
            .0
            .is_empty()
    );
    assert_eq!(
        list_ids(&mut c, list_req(0, "", "src-a", "")).await.0,
        ["snap-1", "snap-2"]
    );
    assert_eq!(
        list_ids(&mut c, list_req(0, "", "src-b", "")).await.0,
        ["snap-3"]
    );
    assert!(
        list_ids(&mut c, list_req(0, "", "nope", ""))
            .await
            .0
            .is_empty()
    );

    // Pagination with opaque tokens; an entry deleted between pages does not break it.
    let (p1, t1) = list_ids(&mut c, list_req(1, "", "", "")).await;
    assert_eq!(p1, ["snap-1"]);
    assert!(!t1.is_empty());
    let (p2, t2) = list_ids(&mut c, list_req(1, &t1, "", "")).await;
    assert_eq!(p2, ["snap-2"]);
    c.controller
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: s2.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (p3, t3) = list_ids(&mut c, list_req(1, &t2, "", "")).await;
    assert_eq!(p3, ["snap-3"]);
    assert!(t3.is_empty(), "{t3:?}");
    assert_code(
        c.controller
            .list_snapshots(list_req(1, "made-up-token", "", ""))
            .await,
        Code::Aborted,
        "made-up-token",
    );

    // Restores: unknown sources are NotFound, a size below the source's is OutOfRange.
    let one = params(&[("numberOfReplicas", "1")]);
    assert_code(
        c.controller
            .create_volume(from_snapshot("r0", 16 * MIB, "no-such-snap", &one))
            .await,
        Code::NotFound,
        "no-such-snap",
    );
    assert_code(
        c.controller
            .create_volume(from_volume("r0", 16 * MIB, "no-such-vol", &one))
            .await,
        Code::NotFound,
        "no-such-vol",
    );
    assert_code(
        c.controller
            .create_volume(from_snapshot("r0", 8 * MIB, &s1.snapshot_id, &one))
            .await,
        Code::OutOfRange,
        "smaller",
    );
    assert_code(
        c.controller
            .create_volume(from_volume("r0", 8 * MIB, "src-a", &one))
            .await,
        Code::OutOfRange,
        "smaller",
    );
    // Twice each: the same volume; no capacity: the source's size.
    for _ in 0..2 {
        let v = c
            .controller
            .create_volume(from_snapshot("r1", 0, &s1.snapshot_id, &one))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(v.capacity_bytes, 16 * MIB);
        assert!(v.content_source.is_some());
        let v = c
            .controller
            .create_volume(from_volume("c1", 32 * MIB, "src-b", &one))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(v.capacity_bytes, 32 * MIB);
    }
    assert_eq!(replica_files(&b, "r1").len(), 1);
    assert_eq!(
        qemu_info(&replica_files(&b, "c1")[0])["virtual-size"],
        32 * MIB
    );
    // The clone's temporary snapshot is gone.
    assert!(snapshot_files(&b, ".clone-c1").is_empty());
    assert!(
        b.disks[0].join("snapshots").read_dir().unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".clone-")),
        "no temporary snapshot is left"
    );

    // Deleting: twice, and an unknown id, are OK; the files go.
    for id in [&s1.snapshot_id, &s1.snapshot_id, &"never-was".to_string()] {
        c.controller
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(snapshot_files(&b, &s1.snapshot_id).is_empty());
    assert_code(
        c.controller
            .delete_snapshot(pb::DeleteSnapshotRequest::default())
            .await,
        Code::InvalidArgument,
        "snapshot_id",
    );
    assert_eq!(
        list_ids(&mut c, list_req(0, "", "", "")).await.0,
        ["snap-3"]
    );
    let _ = s3;
}

/// An image server with an ext4 image, and the seed StorageClass parameters naming it.
async fn image_params(
    b: &Bicsi,
    name: &str,
    replicas: &str,
) -> (ImageServer, Vec<(String, String)>) {
    let work = b.path(&format!("work-{name}"));
    std::fs::create_dir_all(&work).unwrap();
    let raw = ext4_image(&work, 32);
    let server = ImageServer::start([("fs.raw".to_string(), raw)].into()).await;
    let mut p = seed_sc_params(&server.url("fs.raw"), name);
    p[0].1 = replicas.to_string();
    (server, p)
}

#[tokio::test]
async fn snapshot_of_an_attached_volume_restores_and_clones_with_the_backing_image() {
    let Some((b, mut c)) = Bicsi::start_as_root(
        "snapshot_of_an_attached_volume_restores_and_clones_with_the_backing_image",
        2,
    )
    .await
    else {
        return;
    };
    let (_server, mut sc) = image_params(&b, "bi-base", "2").await;
    // qemu's engine, pinned: its log line and qcow2 snapshot files are checked below (the
    // default engine's attached snapshots: `cow_engine.rs`).
    sc.push(("engine".into(), "qemu".into()));
    create_retrying(&mut c, create_with("src", 64 * MIB, &sc, mount_cap()))
        .await
        .unwrap();
    let (st, tg) = attach(&mut c, &b, "src", mount_cap()).await;
    write_synced(&tg, "before.txt", b"written before the snapshot");

    // Taken while the volume is attached (mounted, its engine running); copies under a running
    // writer are `attached_volumes_export_consistently_...`.
    let s = snapshot(&mut c, "snap-attached", "src").await;
    write_synced(&tg, "after.txt", b"written after the snapshot");
    assert!(
        b.log()
            .contains("point-in-time copy made by the volume's engine"),
        "the attached volume was not captured by its engine"
    );
    // Kept on both of the volume's disks, each over its own disk's file of the image.
    let files = snapshot_files(&b, &s.snapshot_id);
    assert_eq!(files.len(), 2, "{files:?}");
    for (f, d) in files.iter().zip(&b.disks) {
        let info = qemu_info(f);
        let backing = info["full-backing-filename"].as_str().unwrap();
        assert!(
            backing.starts_with(d.join("backing-images").to_str().unwrap()),
            "{info}"
        );
    }
    assert!(same_content(&files[0], &files[1]));

    // Restore, larger than the source: the data of the snapshot, not what came after.
    let restored = create_retrying(
        &mut c,
        from_snapshot("restored", 96 * MIB, &s.snapshot_id, &sc),
    )
    .await
    .unwrap();
    assert_eq!(restored.capacity_bytes, 96 * MIB);
    let reps = replica_files(&b, "restored");
    assert_eq!(reps.len(), 2);
    for r in &reps {
        // An overlay on the disk's one file of the image: the backing image is kept.
        let backing = qemu_info(r)["full-backing-filename"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(backing.contains("/backing-images/bi-base-"), "{backing}");
    }
    // Clone of the attached source: its content now, after.txt included.
    create_retrying(&mut c, from_volume("cloned", 64 * MIB, "src", &sc))
        .await
        .unwrap();
    detach(&mut c, "src", &st, &tg).await;

    let (rst, rtg) = attach(&mut c, &b, "restored", mount_cap()).await;
    assert_eq!(
        std::fs::read(rtg.join("before.txt")).unwrap(),
        b"written before the snapshot"
    );
    assert!(!rtg.join("after.txt").exists());
    assert_eq!(
        std::fs::read(rtg.join("hello.txt")).unwrap(),
        b"hello from the backing image\n"
    );
    detach(&mut c, "restored", &rst, &rtg).await;
    let (cst, ctg) = attach(&mut c, &b, "cloned", mount_cap()).await;
    assert_eq!(
        std::fs::read(ctg.join("after.txt")).unwrap(),
        b"written after the snapshot"
    );
    assert_eq!(
        std::fs::read(ctg.join("hello.txt")).unwrap(),
        b"hello from the backing image\n"
    );
    detach(&mut c, "cloned", &cst, &ctg).await;
    // The image is in use by the new volumes.
    let (ok, _, err) = b.cli(&["delete", "backingimage", "bi-base"]);
    assert!(!ok && err.contains("restored"), "{err}");
}

#[tokio::test]
async fn restore_overrides_the_backing_image_and_keeps_the_content() {
    let Some((b, mut c)) = Bicsi::start_as_root(
        "restore_overrides_the_backing_image_and_keeps_the_content",
        1,
    )
    .await
    else {
        return;
    };
    let work = b.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let one = ext4_image(&work, 32);
    // Another image: the same filesystem with other bytes in a region it does not use, and a
    // different file content, so an unsafe rebase would show.
    let mut two = one.clone();
    let at = two.len() - (1 << 20);
    two[at..at + 4096].fill(0xab);
    let server = ImageServer::start(
        [
            ("one.raw".to_string(), one.clone()),
            ("two.raw".to_string(), two.clone()),
        ]
        .into(),
    )
    .await;
    // qemu's engine, pinned: the qcow2 replicas' backing files are inspected below.
    let mut sc_one = seed_sc_params(&server.url("one.raw"), "bi-one");
    sc_one[0].1 = "1".into();
    sc_one.push(("engine".into(), "qemu".into()));
    let mut sc_two = seed_sc_params(&server.url("two.raw"), "bi-two");
    sc_two[0].1 = "1".into();
    sc_two.push(("engine".into(), "qemu".into()));
    create_retrying(&mut c, create_with("src", 64 * MIB, &sc_one, mount_cap()))
        .await
        .unwrap();
    let (st, tg) = attach(&mut c, &b, "src", mount_cap()).await;
    write_synced(&tg, "data.txt", b"data of the source volume");
    detach(&mut c, "src", &st, &tg).await;
    let s = snapshot(&mut c, "snap-one", "src").await;

    // Without backingImage: the snapshot's image. With it: the one named, same content.
    let keep = create_retrying(
        &mut c,
        from_snapshot(
            "keep",
            0,
            &s.snapshot_id,
            &params(&[("numberOfReplicas", "1"), ("engine", "qemu")]),
        ),
    )
    .await
    .unwrap();
    assert_eq!(keep.capacity_bytes, 64 * MIB);
    let keep_rep = &replica_files(&b, "keep")[0];
    assert!(
        qemu_info(keep_rep)["full-backing-filename"]
            .as_str()
            .unwrap()
            .contains("/bi-one-")
    );
    create_retrying(
        &mut c,
        from_snapshot("over", 64 * MIB, &s.snapshot_id, &sc_two),
    )
    .await
    .unwrap();
    let over_rep = &replica_files(&b, "over")[0];
    assert!(
        qemu_info(over_rep)["full-backing-filename"]
            .as_str()
            .unwrap()
            .contains("/bi-two-")
    );
    let snap_file = &snapshot_files(&b, &s.snapshot_id)[0];
    assert!(
        same_content(over_rep, snap_file),
        "content differs from the snapshot's"
    );
    assert!(same_content(keep_rep, snap_file));
    // The images themselves differ, so the rebase had to write the difference.
    let (a, bb) = (work.join("one-check.raw"), work.join("two-check.raw"));
    std::fs::write(&a, &one).unwrap();
    std::fs::write(&bb, &two).unwrap();
    assert!(!same_content(&a, &bb));

    let (ost, otg) = attach(&mut c, &b, "over", mount_cap()).await;
    assert_eq!(
        std::fs::read(otg.join("data.txt")).unwrap(),
        b"data of the source volume"
    );
    detach(&mut c, "over", &ost, &otg).await;
    // The volume is recorded as a user of the image it was restored onto.
    let (ok, _, err) = b.cli(&["delete", "backingimage", "bi-two"]);
    assert!(!ok && err.contains("over"), "{err}");
}

async fn wait_snapshot_ready(
    c: &mut CsiClient,
    name: &str,
    source: &str,
    params: &[(&str, &str)],
) -> pb::Snapshot {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // A volume made while its image downloads has no replica file until the image is
        // ready: its snapshot answers Unavailable until then, and the CO retries.
        let s = match c
            .controller
            .create_snapshot(snap_req(name, source, params))
            .await
        {
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                assert!(s.message().contains("being prepared"), "{}", s.message());
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            r => r.unwrap().into_inner().snapshot.unwrap(),
        };
        if s.ready_to_use {
            return s;
        }
        assert!(Instant::now() < deadline, "snapshot {name} never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bytes allocated on disk for a file.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// With qemu-storage-daemon 10.0 a copy job that finalized itself under writes wedged the
/// volume's engine (see `src/os/engine/backup.rs`); bicsi finalizes it over QMP.
#[tokio::test]
async fn attached_volumes_export_consistently_as_raw_and_qcow2_and_as_snapshots() {
    let Some((b, mut c)) = Bicsi::start_as_root(
        "attached_volumes_export_consistently_as_raw_and_qcow2_and_as_snapshots",
        1,
    )
    .await
    else {
        return;
    };
    c.controller
        // qemu's engine, pinned: its copy jobs are what this test checks.
        .create_volume(create_req(
            "live",
            256 * MIB,
            &[("numberOfReplicas", "1"), ("engine", "qemu")],
        ))
        .await
        .unwrap();
    let (st, tg) = attach(&mut c, &b, "live", mount_cap()).await;
    write_synced(&tg, "data.txt", b"exported while attached");

    // The seed's export manifest, applied while the volume is attached and written to.
    let busy = BusyWriter::start(&tg);
    for format in ["raw", "qcow2"] {
        let f = b.path(&format!("export-{format}.yaml"));
        std::fs::write(
            &f,
            format!(
                "apiVersion: longhorn.io/v1beta2
kind: BackingImage
metadata:
  name: bi-live-{format}
  namespace: longhorn-system
spec:
  sourceType: export-from-volume
  sourceParameters:
    volume-name: live
    export-type: {format}
"
            ),
        )
        .unwrap();
        let (ok, out, err) = b.cli(&["apply", "-f", f.to_str().unwrap()]);
        assert!(ok, "{out}{err}");
    }
    // A snapshot exported as a backing image (how Kubernetes users export a volume).
    let bi_snap = wait_snapshot_ready(
        &mut c,
        "Export_Snap",
        "live",
        &[("type", "bi"), ("export-type", "raw")],
    )
    .await;
    assert!(bi_snap.ready_to_use);
    let mut images = Vec::new();
    for format in ["raw", "qcow2"] {
        let name = format!("bi-live-{format}");
        let v = wait_final(&b, &name).await;
        let states: Vec<_> = v["status"]["diskFileStatusMap"]
            .as_object()
            .unwrap()
            .values()
            .map(|f| f["state"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(states, ["ready"], "{v}");
        assert_eq!(v["status"]["format"], format);
        let uuid = v["status"]["uuid"].as_str().unwrap();
        let file = b.disks[0].join(format!("backing-images/{name}-{uuid}/backing"));
        if format == "qcow2" {
            let check = Command::new("qemu-img")
                .args(["check", "-U"])
                .arg(&file)
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "{}",
                String::from_utf8_lossy(&check.stdout)
            );
        }
        // Sparse: a 256 MiB volume holding a few MiB of data exports as about that.
        assert_eq!(qemu_info(&file)["virtual-size"], 256 * MIB);
        let used = allocated(&file);
        assert!(used < 64 * MIB as u64, "{name}: {used} bytes allocated");
        images.push(name);
    }
    let rounds = busy.finish();
    assert!(rounds > 0);
    let log = b.log();
    assert!(
        log.matches("point-in-time copy made by the volume's engine")
            .count()
            >= 3,
        "the exports and the snapshot were not taken by the engine:\n{log}"
    );
    write_synced(&tg, "later.txt", b"after the exports");
    detach(&mut c, "live", &st, &tg).await;

    // The derived image name is a DNS-1123 label.
    let (ok, out, _) = b.cli(&["get", "backingimages"]);
    assert!(ok);
    let snap_image = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .find(|n| n.starts_with("export-snap-"))
        .unwrap_or_else(|| panic!("no image for the snapshot in:\n{out}"))
        .to_string();
    images.push(snap_image.clone());

    for (i, image) in images.iter().enumerate() {
        let name = format!("from-{i}");
        create_retrying(
            &mut c,
            create_with(
                &name,
                256 * MIB,
                &params(&[("backingImage", image), ("numberOfReplicas", "1")]),
                mount_cap(),
            ),
        )
        .await
        .unwrap();
        let (vst, vtg) = attach(&mut c, &b, &name, mount_cap()).await;
        assert_eq!(
            std::fs::read(vtg.join("data.txt")).unwrap(),
            b"exported while attached",
            "{image}"
        );
        assert!(!vtg.join("later.txt").exists(), "{image}");
        detach(&mut c, &name, &vst, &vtg).await;
    }

    // Deleting the bi snapshot is refused while a volume uses its image, then removes it.
    let del = pb::DeleteSnapshotRequest {
        snapshot_id: bi_snap.snapshot_id.clone(),
        ..Default::default()
    };
    assert_code(
        c.controller.delete_snapshot(del.clone()).await,
        Code::FailedPrecondition,
        "from-2",
    );
    c.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: "from-2".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    c.controller.delete_snapshot(del.clone()).await.unwrap();
    c.controller.delete_snapshot(del).await.unwrap();
    assert!(get_image(&b, &snap_image).await.is_none());
}

/// The parameters of one of csi-sanity's YAML files, as csi-sanity reads them.
fn sanity_params(file: &str) -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("csi-sanity")
        .join(file);
    let map: std::collections::BTreeMap<String, String> =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    map.into_iter().collect()
}

/// csi-sanity's snapshot, restore and clone calls with the seed's backing image StorageClass
/// parameters and both snapshot parameter files of `csi-sanity/run.sh` (csi-sanity itself is a
/// Go program that cannot be installed here).
#[tokio::test]
async fn csi_sanity_snapshot_calls_with_the_seed_backing_image_parameters() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let (_server, mut sc) = image_params(&b, "bi-download", "1").await;
    // run.sh's params-backing-image.yaml with its placeholders filled in the same way.
    let template = sanity_params("params-backing-image.yaml");
    assert_eq!(
        template.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        [
            "backingImage",
            "backingImageChecksum",
            "backingImageDataSourceParameters",
            "backingImageDataSourceType",
            "numberOfReplicas",
            "staleReplicaTimeout"
        ]
    );
    sc.sort();
    let size = 64 * MIB;
    let make = |name: &str| {
        let mut r = create_with(name, size, &sc, mount_cap());
        r.capacity_range.as_mut().unwrap().limit_bytes = size;
        r
    };
    for (file, exported) in [
        ("params-snapshot.yaml", false),
        ("params-snapshot-bi.yaml", true),
    ] {
        let sp = sanity_params(file);
        let sp: Vec<(&str, &str)> = sp.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let vol = format!("sanity-source-{exported}");
        create_retrying(&mut c, make(&vol)).await.unwrap();
        // A maximum-length name, twice.
        let name = format!("{}{}", if exported { "b" } else { "s" }, "x".repeat(127));
        let first = wait_snapshot_ready(&mut c, &name, &vol, &sp).await;
        let second = wait_snapshot_ready(&mut c, &name, &vol, &sp).await;
        assert_eq!(first.snapshot_id, second.snapshot_id);
        let (ids, _) = list_ids(&mut c, list_req(0, "", "", &first.snapshot_id)).await;
        assert_eq!(ids, std::slice::from_ref(&first.snapshot_id));
        // Restore and clone with csi-sanity's request shape (required = limit = 64 MiB).
        let mut restore = make(&format!("sanity-restore-{exported}"));
        restore.volume_content_source =
            from_snapshot("x", 0, &first.snapshot_id, &[]).volume_content_source;
        create_retrying(&mut c, restore).await.unwrap();
        let mut clone = make(&format!("sanity-clone-{exported}"));
        clone.volume_content_source = from_volume("x", 0, &vol, &[]).volume_content_source;
        create_retrying(&mut c, clone).await.unwrap();
        let (ok, out, _) = b.cli(&["get", "backingimages"]);
        assert!(ok);
        assert_eq!(
            out.lines().count(),
            if exported { 3 } else { 2 },
            "a bi snapshot adds one image:\n{out}"
        );
        // csi-sanity's cleanup: volumes, then the snapshot.
        for v in [
            format!("sanity-restore-{exported}"),
            format!("sanity-clone-{exported}"),
            vol.clone(),
        ] {
            c.controller
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: v,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        // The image is still under the snapshot's data.
        let (ok, _, err) = b.cli(&["delete", "backingimage", "bi-download"]);
        assert!(!ok && err.contains(&name), "{err}");
        c.controller
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: first.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        let (_, out, _) = b.cli(&["get", "backingimages"]);
        assert_eq!(out.lines().count(), 2, "{out}");
    }
    let (ok, _, err) = b.cli(&["delete", "backingimage", "bi-download"]);
    assert!(ok, "{err}");
}

#[tokio::test]
async fn cli_takes_lists_restores_and_deletes_snapshots() {
    let b = Bicsi::start(1).await;
    let run = |args: &[&str]| {
        let (ok, out, err) = b.cli(args);
        assert!(ok, "bicsi {args:?}: {out}{err}");
        out
    };
    run(&[
        "volume",
        "create",
        "cli-src",
        "--size",
        "32Mi",
        "-p",
        "numberOfReplicas=1",
    ]);
    let out = run(&["snapshot", "create", "cli-snap", "--volume", "cli-src"]);
    assert!(out.contains("cli-snap") && out.contains("cli-src"), "{out}");
    let (ok, _, err) = b.cli(&[
        "snapshot",
        "create",
        "cli-bad",
        "--volume",
        "cli-src",
        "-p",
        "colour=blue",
    ]);
    assert!(!ok && err.contains("\"colour\""), "{err}");
    let out = run(&["snapshot", "list", "--volume", "cli-src"]);
    assert!(out.lines().any(|l| l.starts_with("cli-snap ")), "{out}");
    assert!(out.contains("true"), "ready: {out}");
    let out = run(&[
        "snapshot",
        "restore",
        "cli-snap",
        "cli-restored",
        "--size",
        "64Mi",
    ]);
    assert!(out.contains("cli-restored"), "{out}");
    let out = run(&["get", "volumes"]);
    assert!(out.lines().any(|l| l.starts_with("cli-restored ")), "{out}");
    run(&["snapshot", "delete", "cli-snap"]);
    let out = run(&["snapshot", "list"]);
    assert_eq!(out.lines().count(), 1, "only the header is left: {out}");
}
