//! The file managers' lifecycle on a fake OS and a manual clock: verification, the scrub,
//! restarts cut in the middle of work, and the sync slots.

use std::time::Duration;

use super::*;
use crate::backing::StoreRecords;
use crate::backing::object::{self, BackingImageSpec, BackingImageStatus, DiskFileStatus};
use crate::clock::ManualClock;
use crate::error::Error;
use crate::model::SourceType;
use crate::settings::Settings;
use crate::store::embedded::EmbeddedStore;
use crate::store::{Kind, Store, StoreExt};

const T0: u64 = 2_000_000_000;

#[derive(Default)]
struct Reports(Mutex<Vec<(String, FileReport)>>);

#[tonic::async_trait]
impl FileReports for Reports {
    async fn report(&self, _image: &str, disk: &Disk, report: FileReport) -> Result<()> {
        self.0.lock().unwrap().push((disk.id.clone(), report));
        Ok(())
    }
}

struct World {
    _dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    files: Arc<FileManagers>,
    reports: Arc<Reports>,
    store: Arc<dyn Store>,
    settings: Settings,
    path: PathBuf,
}

/// File managers of `disks` over `store` (its records and settings).
fn managers(
    store: &Arc<dyn Store>,
    disks: Vec<Disk>,
    reports: Arc<Reports>,
    clock: Arc<ManualClock>,
) -> Arc<FileManagers> {
    FileManagers::new(
        "n1".into(),
        disks,
        Os::fake(),
        Arc::new(StoreRecords(store.clone())),
        Arc::new(Settings::new(store.clone())),
        reports,
        clock,
    )
}

/// A node with one disk holding a ready file of image "img" that the store says is ready.
fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    let disk = Disk {
        id: "d1".into(),
        node_id: "n1".into(),
        path: dir.path().join("disk"),
    };
    let path = disk.path.join("backing-images/img-0123abcd/backing");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let checksum = crate::fsutil::sha512_file(&path).unwrap();
    let bi = BackingImage {
        api_version: object::API_VERSION.into(),
        kind: object::KIND.into(),
        metadata: object::ObjectMeta {
            name: "img".into(),
            namespace: object::DEFAULT_NAMESPACE.into(),
        },
        spec: BackingImageSpec {
            source_type: SourceType::Download,
            source_parameters: [("url".to_string(), "http://127.0.0.1/x".to_string())].into(),
            checksum: checksum.clone(),
            min_number_of_copies: 1,
        },
        status: BackingImageStatus {
            uuid: "0123abcd".into(),
            size: data.len() as u64,
            virtual_size: data.len() as u64,
            format: "raw".into(),
            checksum,
            disk_file_status_map: [(
                "d1".to_string(),
                DiskFileStatus {
                    state: FileState::Ready,
                    progress: 100,
                    message: String::new(),
                    last_state_transition_time: crate::model::rfc3339(T0),
                    last_update_time: crate::model::rfc3339(T0),
                    node_id: "n1".into(),
                    unused_since: String::new(),
                },
            )]
            .into(),
            ..Default::default()
        },
    };
    store.put(Kind::BackingImage, "img", &bi).unwrap();
    let clock = ManualClock::new(T0);
    let reports = Arc::new(Reports::default());
    let files = managers(&store, vec![disk], reports.clone(), clock.clone());
    World {
        _dir: dir,
        clock,
        files,
        reports,
        settings: Settings::new(store.clone()),
        store,
        path,
    }
}

fn flip_a_byte(path: &Path) {
    let mut data = std::fs::read(path).unwrap();
    data[4096] ^= 0xff;
    std::fs::write(path, data).unwrap();
}

/// Image "img" as the store holds it now.
fn stored_image(w: &World) -> BackingImage {
    w.store.get(Kind::BackingImage, "img").unwrap().unwrap()
}

fn take(w: &World) -> Vec<(String, FileReport)> {
    std::mem::take(&mut *w.reports.0.lock().unwrap())
}

/// A second disk of node n1, not yet known to `w.files`, with the `tmp/` that
/// `disks::open_disk` prepares.
fn second_disk(w: &World) -> Disk {
    let d2 = Disk {
        id: "d2".into(),
        node_id: "n1".into(),
        path: w._dir.path().join("disk2"),
    };
    std::fs::create_dir_all(d2.tmp_dir()).unwrap();
    d2
}

/// File managers of `w`'s disks plus `disk`, over the same store, reports and clock.
fn with_disk(w: &World, disk: &Disk) -> Arc<FileManagers> {
    let mut disks = w.files.disks().to_vec();
    disks.push(disk.clone());
    managers_of(w, disks)
}

/// A new process's file managers of `w`'s disks, over the same store, reports and clock.
fn restarted(w: &World) -> Arc<FileManagers> {
    managers_of(w, w.files.disks().to_vec())
}

fn managers_of(w: &World, disks: Vec<Disk>) -> Arc<FileManagers> {
    managers(&w.store, disks, w.reports.clone(), w.clock.clone())
}

/// The reports made until one says ready, by `deadline` at the latest.
async fn reports_until_ready(w: &World, deadline: std::time::Instant) -> Vec<(String, FileReport)> {
    let mut seen = Vec::new();
    loop {
        seen.extend(take(w));
        if seen.iter().any(|(_, r)| r.state == FileState::Ready) {
            return seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn verification_writes_a_missing_manifest_and_repairs_a_corrupt_one_but_not_for_a_changed_file()
 {
    let w = world();
    let manifest = manifest_path(&w.path);
    assert!(!manifest.exists());
    // The start-up verification finds the file intact and writes its manifest.
    w.files.resume().await.unwrap();
    assert!(take(&w).is_empty());
    let want = crate::sync::hash_sparse(&w.path).unwrap().1;
    let written = std::fs::read(&manifest).unwrap();
    assert_eq!(crate::sync::Manifest::parse(&written).unwrap(), want);
    assert_eq!(read_manifest(&w.path, &want.sha512), Some(want.clone()));

    // A manifest that rotted is refused by readers and replaced by the next verification.
    let mut bad = written.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x01;
    std::fs::write(&manifest, &bad).unwrap();
    assert_eq!(read_manifest(&w.path, &want.sha512), None);
    let bi = w.files.image("img").unwrap();
    let disk = w.files.disks()[0].clone();
    let r = w.files.verify(&bi, &disk, "scrub").await;
    assert_eq!(r.state, FileState::Ready, "{}", r.message);
    assert_eq!(std::fs::read(&manifest).unwrap(), written);

    // A changed file fails, and its (old, still right) manifest is not rebuilt from it.
    flip_a_byte(&w.path);
    let r = w.files.verify(&bi, &disk, "scrub").await;
    assert_eq!(r.state, FileState::Failed);
    assert_eq!(std::fs::read(&manifest).unwrap(), written);
}

#[tokio::test]
async fn start_up_verification_fails_a_changed_ready_file_once_per_start() {
    let w = world();
    w.files.resume().await.unwrap();
    assert!(take(&w).is_empty(), "an intact ready file stays ready");
    flip_a_byte(&w.path);
    // Registering again (a controller restart) does not hash everything again.
    w.files.resume().await.unwrap();
    assert!(take(&w).is_empty());
    // A new process start does.
    let w2 = World {
        files: restarted(&w),
        ..w
    };
    w2.files.resume().await.unwrap();
    let got = take(&w2);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1.state, FileState::Failed);
    assert!(
        got[0].1.message.contains("start-up verification")
            && got[0].1.message.contains("checksum mismatch on disk d1"),
        "{}",
        got[0].1.message
    );
    std::fs::remove_file(&w2.path).unwrap();
    let w3 = restarted(&w2);
    w3.resume().await.unwrap();
    let got = take(&w2);
    assert!(got[0].1.message.contains("missing from disk d1"), "{got:?}");
}

#[tokio::test]
async fn registering_again_leaves_running_work_and_its_temp_file_alone() {
    let w = world();
    w.files.resume().await.unwrap();
    take(&w);
    let disk = w.files.disks()[0].clone();
    let mut bi = stored_image(&w);
    bi.status.disk_file_status_map.get_mut("d1").unwrap().state = FileState::InProgress;
    w.store.put(Kind::BackingImage, "img", &bi).unwrap();
    let tmp = disk.image_tmp(&bi);
    std::fs::create_dir_all(disk.tmp_dir()).unwrap();
    std::fs::write(&tmp, b"under way").unwrap();
    let stale = disk.path.join("tmp/gone-0123.part");
    std::fs::write(&stale, b"cut off").unwrap();
    // The image's work runs in this process when the node registers again.
    w.files
        .manager(&disk)
        .tasks
        .lock()
        .unwrap()
        .insert("img".into(), CancellationToken::new());
    w.files.resume().await.unwrap();
    assert!(
        take(&w).is_empty(),
        "running work is not failed nor restarted"
    );
    assert!(tmp.is_file(), "the running work keeps its temp file");
    assert!(!stale.exists(), "the temp file of no running work goes");
}

#[tokio::test]
async fn the_scrub_rehashes_ready_files_at_its_interval_and_catches_a_flipped_byte() {
    let w = world();
    w.settings
        .set(crate::settings::SCRUB_INTERVAL, "100")
        .unwrap();
    assert_eq!(w.files.scrub().await.unwrap(), 0, "not due yet");
    w.clock.advance(100);
    assert_eq!(w.files.scrub().await.unwrap(), 1);
    assert!(take(&w).is_empty(), "intact");
    flip_a_byte(&w.path);
    w.clock.advance(99);
    assert_eq!(w.files.scrub().await.unwrap(), 0, "hashed 99 s ago");
    w.clock.advance(1);
    assert_eq!(w.files.scrub().await.unwrap(), 1);
    let got = take(&w);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.state, FileState::Failed);
    assert!(
        got[0]
            .1
            .message
            .contains("scrub: checksum mismatch on disk d1"),
        "{}",
        got[0].1.message
    );
    // 0 turns the scrub off.
    w.settings
        .set(crate::settings::SCRUB_INTERVAL, "0")
        .unwrap();
    w.clock.advance(1_000_000);
    assert_eq!(w.files.scrub().await.unwrap(), 0);
}

#[tokio::test]
async fn a_first_file_cut_off_by_a_restart_goes_back_to_pending_without_failing() {
    let w = world();
    // The only file was downloading when bicsi stopped: no ready file anywhere.
    let mut bi = stored_image(&w);
    let f = bi.status.disk_file_status_map.get_mut("d1").unwrap();
    f.state = FileState::InProgress;
    f.progress = 40;
    w.store.put(Kind::BackingImage, "img", &bi).unwrap();
    w.files.resume().await.unwrap();
    // Its first report puts it back to pending, marked as a restart; the download starts
    // again (and fails for real here: nothing serves its URL).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|(_, r): &(String, FileReport)| r.state == FileState::Starting)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never started: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        seen.extend(take(&w));
    }
    assert_eq!(seen[0].1.state, FileState::Pending, "{seen:?}");
    assert!(seen[0].1.restart, "{seen:?}");
    assert!(seen[0].1.message.contains("interrupted by a restart"));
    assert_eq!(seen[1].1.state, FileState::Starting, "{seen:?}");
}

#[tokio::test]
async fn a_copy_cut_off_by_a_restart_starts_again_at_resume_and_ends_ready() {
    let w = world();
    let d2 = second_disk(&w);
    // The copy to d2 was under way when bicsi stopped: its partial file is in tmp/.
    let mut bi = stored_image(&w);
    let mut f = bi.status.disk_file_status_map["d1"].clone();
    f.state = FileState::InProgress;
    f.progress = 40;
    bi.status.disk_file_status_map.insert("d2".into(), f);
    w.store.put(Kind::BackingImage, "img", &bi).unwrap();
    std::fs::write(d2.image_tmp(&bi), b"partial").unwrap();
    let files = with_disk(&w, &d2);
    files.resume().await.unwrap();
    // Nothing else asks for it (no attach): resume itself starts the copy again.
    let seen = reports_until_ready(&w, std::time::Instant::now() + Duration::from_secs(10)).await;
    assert_eq!(seen[0].1.state, FileState::Pending, "{seen:?}");
    assert!(seen[0].1.restart, "{seen:?}");
    assert!(seen[0].1.message.contains("interrupted by a restart"));
    assert!(
        seen.iter().all(|(_, r)| r.state != FileState::Failed),
        "failed on the way: {seen:?}"
    );
    assert_eq!(
        std::fs::read(d2.image_file(&bi)).unwrap(),
        std::fs::read(&w.path).unwrap()
    );
    assert!(!d2.image_tmp(&bi).exists());
}

#[tokio::test]
async fn a_sync_waits_in_pending_while_the_node_runs_its_limit_of_syncs() {
    let w = world();
    let d2 = second_disk(&w);
    let files = with_disk(&w, &d2);
    w.settings
        .set(crate::settings::CONCURRENT_SYNCS_PER_NODE, "1")
        .unwrap();
    let held = files.syncs().try_take(files.sync_limit()).unwrap();
    let e = files.ensure_file("img", "d2").await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !take(&w)
        .iter()
        .any(|(_, r)| r.state == FileState::Pending && r.message.contains("waiting: 1 syncs"))
    {
        assert!(std::time::Instant::now() < deadline, "never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        take(&w).iter().all(|(_, r)| r.state == FileState::Pending),
        "nothing starts while the slot is taken"
    );
    assert!(!d2.image_file(&files.image("img").unwrap()).exists());
    // The slot frees: the copy runs and ends ready, with the same bytes.
    drop(held);
    reports_until_ready(&w, deadline).await;
    let copy = d2.image_file(&files.image("img").unwrap());
    assert_eq!(
        std::fs::read(copy).unwrap(),
        std::fs::read(&w.path).unwrap()
    );
    assert_eq!(files.syncs().running(), 0);
}
