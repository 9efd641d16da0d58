//! Online rebuild of an attached mirror volume (issue 15): a replica whose disk filled is
//! rebuilt while the volume stays attached and fio keeps writing and verifying through it, and
//! `kill -9` of bicsi in the middle of that rebuild never makes the replica rw before the engine
//! finished and verified it. Real engine, XFS disks on loop devices, the kits of `replicas`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::checks::*;
use crate::disk_full::SmallDisk;
use crate::harness::root_or_skip;
use crate::procs::Serve;
use crate::replicas::{
    VOLUME, attach_ok, create_two_replicas_and_attach, fio, fio_job, ok, record, replicas,
    small_replica_errs, wait_mode,
};

/// Random 4k writes at depth 16 over the first `mib` MiB of `dev`, each block read back and
/// checked (crc32c) at the end of the run, or (`verify_only`) only the check of an earlier run
/// (fio repeats the same offsets and patterns). Panics when fio reports an error.
pub(crate) fn fio_random(dev: &Path, mib: u64, verify_only: bool) {
    fio_job(
        &[
            "--name=online",
            "--rw=randwrite",
            "--bs=4k",
            "--ioengine=libaio",
            "--iodepth=16",
        ],
        dev,
        mib,
        verify_only,
    );
}

/// Two disks, bicsi serving them, and the 2-replica mirror volume attached at `dir/blk`; the
/// small disk is the one a test fills.
pub(crate) struct Setup {
    pub(crate) small: SmallDisk,
    pub(crate) _big: SmallDisk,
    pub(crate) small_disk: PathBuf,
    pub(crate) big_disk: PathBuf,
    pub(crate) dev: PathBuf,
    pub(crate) s: Serve,
    pub(crate) dir: tempfile::TempDir,
    /// The HTTP server of the volume's backing image, if it has one.
    pub(crate) _server: Option<crate::throttle::ImageServer>,
}

impl Setup {
    /// bicsi serving a `disk` directory on each of `small` and `big`, from a temp dir named
    /// `prefix…`; no volume yet.
    pub(crate) async fn serve(small: SmallDisk, big: SmallDisk, prefix: &str) -> Setup {
        let (small_disk, big_disk) = (small.mnt.join("disk"), big.mnt.join("disk"));
        std::fs::create_dir_all(&small_disk).unwrap();
        std::fs::create_dir_all(&big_disk).unwrap();
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        let s = Serve::start(dir.path(), vec![small_disk.clone(), big_disk.clone()]).await;
        Setup {
            small,
            _big: big,
            small_disk,
            big_disk,
            dev: dir.path().join("blk"),
            s,
            dir,
            _server: None,
        }
    }

    /// Fills the small disk and writes `mib` MiB: its replica turns err (the engine dropped
    /// it). Returns (the small replica's id, the big replica's record).
    pub(crate) async fn fill_until_err(&self, mib: u64) -> (String, serde_json::Value) {
        self.small.fill_to(20);
        fio(&self.dev, mib, false);
        let (small_id, _, big) =
            small_replica_errs(&self.s, &self.small_disk, &self.big_disk).await;
        assert_eq!(record(&self.s)["health"], "degraded");
        (small_id, big)
    }
}

/// Two XFS disks that share blocks, bicsi serving them, and the 2-replica mirror volume of
/// `size` attached at `dir/blk`, the first disk left with `free_mib` free.
async fn setup(disk_mib: u64, size: &str) -> Setup {
    let t = Setup::serve(
        SmallDisk::xfs(disk_mib),
        SmallDisk::xfs(disk_mib),
        "bicsi-online-",
    )
    .await;
    create_two_replicas_and_attach(&t.s, &t.dev, size, &[]).await;
    assert_eq!(record(&t.s)["engine"], "mirror", "{}", record(&t.s));
    t
}

fn same_bytes(a: &str, b: &str) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[tokio::test]
async fn a_replica_whose_disk_filled_is_rebuilt_online_while_fio_writes_and_verifies() {
    if !root_or_skip("a_replica_whose_disk_filled_is_rebuilt_online_while_fio_writes_and_verifies")
    {
        return;
    }
    let t = setup(320, "128Mi").await;
    let (small_id, big) = t.fill_until_err(60).await;
    // fio writes and verifies in a loop from before the disk has room until after the replica
    // is rw again: the rebuild runs under it, the volume never detached.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, dev) = (stop.clone(), t.dev.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(Ordering::Acquire) {
                fio_random(&dev, 48, false);
                runs += 1;
            }
            runs
        })
    };
    std::fs::remove_file(t.small.mnt.join("filler")).unwrap();
    let rw = wait_mode(&t.s, &small_id, "rw", Duration::from_secs(120)).await;
    let still_writing = !writer.is_finished();
    stop.store(true, Ordering::Release);
    let runs = writer.join().expect("fio passed its verify in every run");
    assert!(
        still_writing && runs >= 1,
        "fio was not writing during the rebuild"
    );
    assert!(
        rw["modeReason"]
            .as_str()
            .unwrap()
            .contains("rebuilt online"),
        "{rw}"
    );
    let log = t.s.log();
    assert!(
        log.contains("online rebuild started in the mirror engine"),
        "{log}"
    );
    let v = record(&t.s);
    assert!(
        v["record"]["publication"].is_object(),
        "detached meanwhile: {v}"
    );
    assert_eq!(record(&t.s)["health"], "healthy", "{}", record(&t.s));
    // What the last fio run wrote reads back, then the two replicas are byte-identical at rest.
    fio_random(&t.dev, 48, true);
    ok(&t.s, &["volume", "detach", VOLUME]);
    assert!(
        same_bytes(big["path"].as_str().unwrap(), rw["path"].as_str().unwrap()),
        "the replica rebuilt online differs from its source"
    );
    assert!(
        !Path::new(&format!("{}.online", rw["path"].as_str().unwrap())).exists(),
        "the temporary file stayed"
    );
    // The next attach serves both replicas and the data is intact.
    attach_ok(&t.s, &t.dev).await;
    assert_eq!(record(&t.s)["health"], "healthy");
    fio_random(&t.dev, 48, true);
    ok(&t.s, &["volume", "detach", VOLUME]);
}

#[tokio::test]
async fn kill9_during_an_online_rebuild_never_makes_the_replica_rw_before_it_completes() {
    if !root_or_skip(
        "kill9_during_an_online_rebuild_never_makes_the_replica_rw_before_it_completes",
    ) {
        return;
    }
    let mut t = setup(640, "320Mi").await;
    let (small_id, big) = t.fill_until_err(300).await;
    std::fs::remove_file(t.small.mnt.join("filler")).unwrap();
    let seen = wait_for(
        "the online rebuild under way",
        Duration::from_secs(60),
        || t.s.log(),
        || async {
            let r = replicas(&t.s)
                .into_iter()
                .find(|r| r["replica"] == small_id.as_str())?;
            (r["mode"] == "wo" || r["mode"] == "rw").then_some(r)
        },
    )
    .await;
    assert_eq!(
        seen["mode"], "wo",
        "the rebuild ended before the kill could land; write more: {seen}"
    );
    t.s.kill9();
    // The engine outlives bicsi and keeps serving: what was written reads back.
    fio(&t.dev, 300, true);
    t.s.restart().await;
    let first = replicas(&t.s)
        .into_iter()
        .find(|r| r["replica"] == small_id.as_str())
        .unwrap();
    assert_ne!(
        first["mode"], "rw",
        "rw right after the restart, before a pass checked the engine: {first}"
    );
    let rw = wait_mode(&t.s, &small_id, "rw", Duration::from_secs(120)).await;
    assert!(
        rw["modeReason"]
            .as_str()
            .unwrap()
            .contains("rebuilt online"),
        "{rw}"
    );
    assert!(
        t.s.log().contains("an online rebuild was interrupted"),
        "{}",
        t.s.log()
    );
    fio(&t.dev, 300, true);
    ok(&t.s, &["volume", "detach", VOLUME]);
    assert!(
        same_bytes(big["path"].as_str().unwrap(), rw["path"].as_str().unwrap()),
        "the replica rebuilt online differs from its source"
    );
}
