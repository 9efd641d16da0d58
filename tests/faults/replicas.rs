//! Replicas that miss writes, on the real engine: a disk that fills under a 2-replica volume, a
//! replica lost while the volume is detached, the attaching node killed right after a replica
//! missed a write, and `kill -9` in the middle of a rebuild. Each time every acknowledged write
//! reads back (fio's verify through the volume's block device), the replica that missed writes is
//! never served, and the rebuild ends with replicas that `qemu-img compare` finds identical.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::checks::*;
use crate::disk_full::SmallDisk;
use crate::harness::root_or_skip;
use crate::procs::Serve;

pub(crate) const VOLUME: &str = "rv";

/// Runs fio on the block device `dev`: a sequential write of `mib` MiB (fsync'ed at the end) that
/// reads every block back and checks it, or (`verify_only`) only the check of what an earlier run
/// wrote. Returns fio's output; panics when fio reports an error.
pub(crate) fn fio(dev: &Path, mib: u64, verify_only: bool) -> String {
    fio_job(
        &["--name=acked", "--rw=write", "--bs=1M", "--ioengine=psync"],
        dev,
        mib,
        verify_only,
    )
}

/// Runs the fio `job` (its name, pattern, block size and engine) on the first `mib` MiB of the
/// block device `dev`, with direct I/O, every block read back and checked (crc32c) at the end,
/// or (`verify_only`) only the check of an earlier run (fio repeats the same offsets and
/// patterns). Returns fio's output; panics when fio reports an error.
pub(crate) fn fio_job(job: &[&str], dev: &Path, mib: u64, verify_only: bool) -> String {
    let mut cmd = Command::new("fio");
    cmd.args(job)
        .args([
            "--direct=1",
            "--verify=crc32c",
            "--verify_fatal=1",
            // No `*-verify.state` file in the working directory (the repository's, under cargo).
            "--verify_state_save=0",
            "--do_verify=1",
            "--end_fsync=1",
        ])
        .arg(format!("--size={mib}M"))
        .arg(format!("--filename={}", dev.display()));
    if verify_only {
        cmd.arg("--verify_only");
    }
    let out = cmd.output().expect("run fio");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("err= 0"),
        "fio failed:\n{text}"
    );
    text
}

pub(crate) fn ok(s: &Serve, args: &[&str]) -> String {
    let (good, out, err) = s.cli(args);
    assert!(good, "bicsi {args:?} failed:\n{out}\n{err}\n{}", s.log());
    out
}

/// `bicsi volume attach rv --block DEV`, retried while the rebuild pass holds the volume (the
/// CO retries Aborted the same way). Returns (success, stdout, stderr) of the last try.
async fn attach(s: &Serve, dev: &Path) -> (bool, String, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = s.cli(&["volume", "attach", VOLUME, "--block", dev.to_str().unwrap()]);
        if r.0
            || !r.2.contains("another operation in progress")
            || std::time::Instant::now() > deadline
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates the 2-replica block volume `VOLUME` of `size` (with `extra` CLI arguments, e.g.
/// more `-p` parameters) and attaches it at `dev`.
pub(crate) async fn create_two_replicas_and_attach(
    s: &Serve,
    dev: &Path,
    size: &str,
    extra: &[&str],
) {
    let mut args = vec![
        "volume",
        "create",
        VOLUME,
        "--size",
        size,
        "-p",
        "numberOfReplicas=2",
    ];
    args.extend_from_slice(extra);
    ok(s, &args);
    attach_ok(s, dev).await;
}

pub(crate) async fn attach_ok(s: &Serve, dev: &Path) {
    let (good, out, err) = attach(s, dev).await;
    assert!(good, "attach failed:\n{out}\n{err}\n{}", s.log());
}

/// `bicsi get replicas rv -o json`.
pub(crate) fn replicas(s: &Serve) -> Vec<Value> {
    let out = ok(s, &["get", "replicas", VOLUME, "-o", "json"]);
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The volume's record (`bicsi get volume rv -o json`).
pub(crate) fn record(s: &Serve) -> Value {
    let out = ok(s, &["get", "volume", VOLUME, "-o", "json"]);
    serde_json::from_str::<Value>(&out).unwrap()
}

pub(crate) fn replica_on<'a>(list: &'a [Value], disk_dir: &Path) -> &'a Value {
    list.iter()
        .find(|r| Path::new(r["path"].as_str().unwrap()).starts_with(disk_dir))
        .unwrap_or_else(|| panic!("no replica under {}: {list:?}", disk_dir.display()))
}

/// Whether two replica files read the same (qcow2 through `qemu-img compare`, copy-on-write
/// replicas through their views: bicsi's own compare, as its rebuilds use).
fn identical(a: &str, b: &str) -> bool {
    bicsi::os::compare::identical_files(Path::new(a), Path::new(b))
        .unwrap_or_else(|e| panic!("comparing {a} and {b}: {e}"))
}

/// After writes filled the disk `small_disk`: its replica turns err for want of space within
/// 10 s. Returns (its id, its err record, the record of the replica on `big_disk` as the list
/// showed it).
pub(crate) async fn small_replica_errs(
    s: &Serve,
    small_disk: &Path,
    big_disk: &Path,
) -> (String, Value, Value) {
    let list = replicas(s);
    let small = replica_on(&list, small_disk)["replica"]
        .as_str()
        .unwrap()
        .to_string();
    let big = replica_on(&list, big_disk).clone();
    let err = wait_mode(s, &small, "err", Duration::from_secs(10)).await;
    assert!(
        err["modeReason"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{err}"
    );
    (small, err, big)
}

pub(crate) async fn wait_mode(s: &Serve, replica: &str, mode: &str, limit: Duration) -> Value {
    wait_for(
        &format!("replica {replica} {mode}"),
        limit,
        || format!("{:?}\n{}", replicas(s), s.log()),
        || async {
            replicas(s)
                .into_iter()
                .find(|r| r["replica"] == replica && r["mode"] == mode)
        },
    )
    .await
}

/// Kills the engine of the volume (kill -9), as a crash of its node would: qemu-storage-daemon
/// (`qsd.pid`) or the mirror engine (`mirror.pid`), whichever serves it.
fn kill_engine(data: &Path) {
    let dir = data.join("engines").join(VOLUME);
    let file = ["qsd.pid", "mirror.pid"]
        .iter()
        .map(|f| dir.join(f))
        .find(|f| f.exists())
        .unwrap_or_else(|| panic!("no engine pid file in {}", dir.display()));
    let pid: i32 = std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A 96 MiB disk holding a 64 MiB filler (so it fills during the writes) and a plain disk.
struct TwoDisks {
    small: SmallDisk,
    small_disk: PathBuf,
    big_disk: PathBuf,
    dir: tempfile::TempDir,
}

/// A temp dir with `n` plain disk directories in it (`d1`, `d2`, ...) and bicsi serving them.
async fn serve_on_plain_disks(n: usize) -> (tempfile::TempDir, Serve) {
    let dir = tempfile::Builder::new()
        .prefix("bicsi-replicas-")
        .tempdir()
        .unwrap();
    let disks: Vec<PathBuf> = (1..=n).map(|i| dir.path().join(format!("d{i}"))).collect();
    for d in &disks {
        std::fs::create_dir_all(d).unwrap();
    }
    let s = Serve::start(dir.path(), disks.clone()).await;
    (dir, s)
}

impl TwoDisks {
    fn new() -> TwoDisks {
        let dir = tempfile::Builder::new()
            .prefix("bicsi-replicas-")
            .tempdir()
            .unwrap();
        let small = SmallDisk::new(96);
        let small_disk = small.mnt.join("disk");
        let big_disk = dir.path().join("big");
        std::fs::create_dir_all(&small_disk).unwrap();
        std::fs::create_dir_all(&big_disk).unwrap();
        TwoDisks {
            small,
            small_disk,
            big_disk,
            dir,
        }
    }

    fn fill(&self) {
        let st = Command::new("fallocate")
            .args(["-l", "64M"])
            .arg(self.small.mnt.join("filler"))
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn make_room(&self) {
        std::fs::remove_file(self.small.mnt.join("filler")).unwrap();
    }
}

#[tokio::test]
async fn a_disk_that_fills_marks_its_replica_err_and_the_rebuild_makes_it_identical() {
    if !root_or_skip("a_disk_that_fills_marks_its_replica_err_and_the_rebuild_makes_it_identical") {
        return;
    }
    let d = TwoDisks::new();
    let s = Serve::start(d.dir.path(), vec![d.small_disk.clone(), d.big_disk.clone()]).await;
    let dev = d.dir.path().join("blk");
    create_two_replicas_and_attach(&s, &dev, "64Mi", &[]).await;
    d.fill();
    // 40 MiB: the small disk has ~20 MiB left. Every write is acknowledged (the other replica
    // took it) and reads back.
    fio(&dev, 40, false);
    let (small, _, big) = small_replica_errs(&s, &d.small_disk, &d.big_disk).await;
    assert_eq!(big["mode"], "rw");
    let v = record(&s);
    assert_eq!(v["health"], "degraded", "{v}");
    assert_eq!(v["abnormal"], true, "{v}");
    // The failed replica is out of the live quorum: the data reads back right now too.
    fio(&dev, 40, true);
    ok(&s, &["volume", "detach", VOLUME]);
    assert!(
        record(&s)["record"]["attachEpoch"].is_null(),
        "a clean detach clears it"
    );

    // Still full: the rebuild cannot complete and the replica is never rw meanwhile.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_ne!(
        replicas(&s)
            .iter()
            .find(|r| r["replica"] == small.as_str())
            .unwrap()["mode"],
        "rw"
    );
    d.make_room();
    let rw = wait_mode(&s, &small, "rw", Duration::from_secs(40)).await;
    assert!(
        rw["modeReason"]
            .as_str()
            .unwrap()
            .contains("verified identical"),
        "{rw}"
    );
    assert!(identical(
        big["path"].as_str().unwrap(),
        rw["path"].as_str().unwrap()
    ));
    attach_ok(&s, &dev).await;
    assert_eq!(record(&s)["health"], "healthy");
    fio(&dev, 40, true);
    ok(&s, &["volume", "detach", VOLUME]);
    // Counted: every rebuild started has ended, one of them ok (the one after the room).
    let metrics = reqwest::get(format!("{}/metrics", s.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let total = |name: &str, label: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    let started = total("bicsi_volume_rebuilds_started_total", "mode=");
    let ended_ok = total("bicsi_volume_rebuilds_finished_total", r#"result="ok""#);
    let ended_failed = total("bicsi_volume_rebuilds_finished_total", r#"result="failed""#);
    assert_eq!(ended_ok, 1.0, "{metrics}");
    assert_eq!(started, ended_ok + ended_failed, "{metrics}");
    // And told: without the Kubernetes store the events go to the log.
    let log = s.log();
    for reason in [
        "VolumeDegraded",
        "RebuildStarted",
        "RebuildFinished",
        "VolumeHealthy",
    ] {
        assert!(log.contains(reason), "no {reason} event in the log:\n{log}");
    }
    drop(s);
}

#[tokio::test]
async fn a_replica_lost_while_detached_attaches_degraded_and_is_replaced() {
    if !root_or_skip("a_replica_lost_while_detached_attaches_degraded_and_is_replaced") {
        return;
    }
    let (dir, s) = serve_on_plain_disks(3).await;
    let dev = dir.path().join("blk");
    // staleReplicaTimeout 0: a replica in err is replaced at the next pass.
    create_two_replicas_and_attach(&s, &dev, "64Mi", &["-p", "staleReplicaTimeout=0"]).await;
    fio(&dev, 32, false);
    ok(&s, &["volume", "detach", VOLUME]);
    let before = replicas(&s);
    let lost = before[0].clone();
    let kept = before[1].clone();
    let lost_dir = Path::new(lost["path"].as_str().unwrap()).parent().unwrap();
    std::fs::remove_dir_all(lost_dir).unwrap();

    let (good, out, err) = attach(&s, &dev).await;
    assert!(good, "a degraded attach works: {out}\n{err}\n{}", s.log());
    let v = record(&s);
    assert_eq!(v["health"], "degraded", "{v}");
    let marked = replicas(&s)
        .into_iter()
        .find(|r| r["replica"] == lost["replica"])
        .unwrap();
    assert_eq!(marked["mode"], "err");
    let reason = marked["modeReason"].as_str().unwrap();
    assert!(
        reason.contains(lost["disk"].as_str().unwrap())
            && reason.contains(lost["path"].as_str().unwrap()),
        "the reason names disk and path: {reason}"
    );
    assert!(
        s.log().contains("attaching degraded"),
        "a warning is logged"
    );
    fio(&dev, 32, true);
    ok(&s, &["volume", "detach", VOLUME]);

    // Detached, and err for longer than staleReplicaTimeout: a new replica on the third disk,
    // rebuilt from the kept one; the lost one is gone from the record.
    let list = wait_for(
        "a replacement replica",
        Duration::from_secs(40),
        || format!("{:?}\n{}", replicas(&s), s.log()),
        || async {
            let list = replicas(&s);
            (list.len() == 2
                && list.iter().all(|r| r["mode"] == "rw")
                && !list.iter().any(|r| r["replica"] == lost["replica"]))
            .then_some(list)
        },
    )
    .await;
    let new = list
        .iter()
        .find(|r| r["replica"] != kept["replica"])
        .unwrap();
    // On the disk that held no replica of the volume.
    assert!(
        new["disk"] != kept["disk"] && new["disk"] != lost["disk"],
        "{new} / {kept} / {lost}"
    );
    assert!(
        !Path::new(lost["path"].as_str().unwrap()).exists(),
        "the replaced replica's files are gone"
    );
    assert!(identical(
        kept["path"].as_str().unwrap(),
        new["path"].as_str().unwrap()
    ));
    attach_ok(&s, &dev).await;
    assert_eq!(record(&s)["health"], "healthy");
    fio(&dev, 32, true);
    ok(&s, &["volume", "detach", VOLUME]);
}

/// bicsi is killed, then a write misses the small disk's replica, then the engine is killed:
/// nothing of bicsi saw the failure. `keep_events`: the engine's own event file survived (a
/// process crash); else it is lost too (as after a power cut), and only the comparison of the
/// replicas can tell.
async fn crash_after_a_missed_write(keep_events: bool) {
    let d = TwoDisks::new();
    let data = d.dir.path().join("data");
    let mut s = Serve::start(d.dir.path(), vec![d.small_disk.clone(), d.big_disk.clone()]).await;
    let dev = d.dir.path().join("blk");
    create_two_replicas_and_attach(&s, &dev, "64Mi", &[]).await;
    let list = replicas(&s);
    let small = replica_on(&list, &d.small_disk).clone();
    let big = replica_on(&list, &d.big_disk).clone();
    d.fill();
    s.kill9();
    fio(&dev, 40, false);
    kill_engine(&data);
    let run_dir = data.join("engines").join(VOLUME);
    if !keep_events {
        // qemu-storage-daemon's event log, or the mirror engine's fault file: the one this
        // engine wrote goes.
        let removed = ["events.log", "faults.jsonl"]
            .iter()
            .filter(|f| std::fs::remove_file(run_dir.join(f)).is_ok())
            .count();
        assert!(removed > 0, "the engine left no record of the missed write");
    }
    s.restart().await;
    ok(&s, &["volume", "detach", VOLUME]);
    assert!(
        !record(&s)["record"]["attachEpoch"].is_null(),
        "an unclean end keeps the attach epoch"
    );
    let (good, out, err) = attach(&s, &dev).await;
    if keep_events {
        // The engine's event file named the replica: it is err, and the volume attaches from
        // the other one (the replicas are not compared: only one is rw).
        assert!(good, "{out}\n{err}\n{}", s.log());
        let r = replicas(&s)
            .into_iter()
            .find(|r| r["replica"] == small["replica"])
            .unwrap();
        // Its disk is still full: the rebuild before the attach failed, so it stays err.
        assert_eq!(r["mode"], "err", "{r}");
        fio(&dev, 40, true);
        ok(&s, &["volume", "detach", VOLUME]);
        d.make_room();
    } else {
        d.make_room();
        assert!(
            !good,
            "a faulted volume must not attach:\n{out}\n{}",
            s.log()
        );
        for want in [
            "is faulted",
            small["replica"].as_str().unwrap(),
            big["replica"].as_str().unwrap(),
            "bicsi volume rebuild rv --from REPLICA",
        ] {
            assert!(err.contains(want), "{want:?} missing from: {err}");
        }
        assert_eq!(record(&s)["health"], "faulted");
        // A person chooses the replica that took the writes.
        let out = ok(
            &s,
            &[
                "volume",
                "rebuild",
                VOLUME,
                "--from",
                big["replica"].as_str().unwrap(),
            ],
        );
        assert!(out.contains("rebuilt and verified"), "{out}");
        attach_ok(&s, &dev).await;
        fio(&dev, 40, true);
        ok(&s, &["volume", "detach", VOLUME]);
    }
    let list = wait_for(
        "both replicas rw",
        Duration::from_secs(40),
        || format!("{:?}\n{}", replicas(&s), s.log()),
        || async {
            let list = replicas(&s);
            list.iter().all(|r| r["mode"] == "rw").then_some(list)
        },
    )
    .await;
    assert!(identical(
        list[0]["path"].as_str().unwrap(),
        list[1]["path"].as_str().unwrap()
    ));
}

#[tokio::test]
async fn a_crash_after_a_missed_write_attaches_from_the_replica_that_took_it() {
    if !root_or_skip("a_crash_after_a_missed_write_attaches_from_the_replica_that_took_it") {
        return;
    }
    crash_after_a_missed_write(true).await;
}

#[tokio::test]
async fn a_crash_that_lost_every_record_faults_the_volume_until_a_person_chooses() {
    if !root_or_skip("a_crash_that_lost_every_record_faults_the_volume_until_a_person_chooses") {
        return;
    }
    crash_after_a_missed_write(false).await;
}

#[tokio::test]
async fn kill9_during_a_rebuild_restarts_it_and_the_replica_is_never_rw_before() {
    if !root_or_skip("kill9_during_a_rebuild_restarts_it_and_the_replica_is_never_rw_before") {
        return;
    }
    let (dir, mut s) = serve_on_plain_disks(2).await;
    let dev = dir.path().join("blk");
    create_two_replicas_and_attach(&s, &dev, "1Gi", &[]).await;
    fio(&dev, 768, false);
    ok(&s, &["volume", "detach", VOLUME]);
    let list = replicas(&s);
    let (source, target) = (list[0].clone(), list[1].clone());
    let target_id = target["replica"].as_str().unwrap().to_string();
    // A rebuild by hand: the target goes err, then wo while it is copied.
    let http = s.http.clone();
    let endpoint = s.endpoint.clone();
    let from = source["replica"].as_str().unwrap().to_string();
    let rebuild = std::thread::spawn(move || {
        crate::kit::cli(
            &http,
            Some(&endpoint),
            &["volume", "rebuild", VOLUME, "--from", &from],
        )
    });
    let seen = wait_for(
        "the rebuild under way",
        Duration::from_secs(20),
        || s.log(),
        || async {
            let r = replicas(&s)
                .into_iter()
                .find(|r| r["replica"] == target_id.as_str())?;
            let rebuilt = r["modeReason"]
                .as_str()
                .is_some_and(|m| m.contains("rebuilt"));
            (r["mode"] == "wo" || (r["mode"] == "rw" && rebuilt)).then_some(r)
        },
    )
    .await;
    assert_eq!(
        seen["mode"], "wo",
        "the copy ended before the kill could land; make the volume larger: {seen}"
    );
    s.kill9();
    let _ = rebuild.join();
    // Whatever the copy left, the record says wo: never rw.
    s.restart().await;
    let first = replicas(&s)
        .into_iter()
        .find(|r| r["replica"] == target_id.as_str())
        .unwrap();
    assert_ne!(
        first["mode"], "rw",
        "rw before a rebuild completed: {first}"
    );
    let done = wait_mode(&s, &target_id, "rw", Duration::from_secs(60)).await;
    assert!(
        done["modeReason"]
            .as_str()
            .unwrap()
            .contains("verified identical"),
        "{done}"
    );
    assert!(s.log().contains("a rebuild was interrupted"), "{}", s.log());
    assert!(identical(
        source["path"].as_str().unwrap(),
        done["path"].as_str().unwrap()
    ));
    attach_ok(&s, &dev).await;
    fio(&dev, 768, true);
    ok(&s, &["volume", "detach", VOLUME]);
}

/// The rebuild holds the volume's guard only to read and write its record: an attach that
/// arrives while a replica is copied is answered without waiting for the copy, attaches from
/// the rw replica, and the copy's result is dropped (the engine does not write the target), so
/// the target goes back to err and is rebuilt once the volume is detached.
#[tokio::test]
async fn an_attach_during_a_rebuild_is_answered_at_once_and_the_copy_starts_over() {
    if !root_or_skip("an_attach_during_a_rebuild_is_answered_at_once_and_the_copy_starts_over") {
        return;
    }
    let (dir, s) = serve_on_plain_disks(2).await;
    let dev = dir.path().join("blk");
    create_two_replicas_and_attach(&s, &dev, "1Gi", &[]).await;
    fio(&dev, 768, false);
    ok(&s, &["volume", "detach", VOLUME]);
    let list = replicas(&s);
    let (source, target) = (list[0].clone(), list[1].clone());
    let target_id = target["replica"].as_str().unwrap().to_string();
    let http = s.http.clone();
    let endpoint = s.endpoint.clone();
    let from = source["replica"].as_str().unwrap().to_string();
    let rebuild = std::thread::spawn(move || {
        crate::kit::cli(
            &http,
            Some(&endpoint),
            &["volume", "rebuild", VOLUME, "--from", &from],
        )
    });
    wait_mode(&s, &target_id, "wo", Duration::from_secs(20)).await;
    let asked = std::time::Instant::now();
    let (good, out, err) = s.cli(&["volume", "attach", VOLUME, "--block", dev.to_str().unwrap()]);
    let took = asked.elapsed();
    assert!(good, "attach failed:\n{out}\n{err}\n{}", s.log());
    let now = replicas(&s)
        .into_iter()
        .find(|r| r["replica"] == target_id.as_str())
        .unwrap();
    eprintln!("attach answered in {took:?} during the rebuild; the target is then {now}");
    // Had the attach waited for the copy (the guard held through it), the target would be rw
    // by now; it is still being copied, or its copy was dropped.
    assert_ne!(
        now["mode"], "rw",
        "the attach waited for the rebuild: {now}"
    );
    let _ = rebuild.join();
    let dropped = wait_mode(&s, &target_id, "err", Duration::from_secs(60)).await;
    assert!(
        dropped["modeReason"]
            .as_str()
            .unwrap()
            .contains("attached while it was rebuilt"),
        "{dropped}"
    );
    fio(&dev, 768, true);
    ok(&s, &["volume", "detach", VOLUME]);
    let done = wait_mode(&s, &target_id, "rw", Duration::from_secs(60)).await;
    assert!(
        done["modeReason"]
            .as_str()
            .unwrap()
            .contains("verified identical"),
        "{done}"
    );
    assert!(identical(
        source["path"].as_str().unwrap(),
        done["path"].as_str().unwrap()
    ));
}

#[tokio::test]
async fn a_disk_that_fills_under_a_mirror_volume_drops_its_replica_and_the_rebuild_makes_it_identical()
 {
    let test = "a_disk_that_fills_under_a_mirror_volume_drops_its_replica_and_the_rebuild_makes_it_identical";
    if !root_or_skip(test) {
        return;
    }
    let (small, big) = (SmallDisk::xfs(320), SmallDisk::xfs(320));
    let (small_disk, big_disk) = (small.mnt.join("disk"), big.mnt.join("disk"));
    std::fs::create_dir_all(&small_disk).unwrap();
    std::fs::create_dir_all(&big_disk).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("bicsi-replicas-")
        .tempdir()
        .unwrap();
    let s = Serve::start(dir.path(), vec![small_disk.clone(), big_disk.clone()]).await;
    let dev = dir.path().join("blk");
    create_two_replicas_and_attach(&s, &dev, "64Mi", &[]).await;
    assert_eq!(record(&s)["engine"], "mirror", "{}", record(&s));
    small.fill_to(20);
    // 40 MiB: the small disk has ~20 MiB left. Every write is acknowledged (the other replica
    // took it) and reads back.
    fio(&dev, 40, false);
    let (small_id, err, big_r) = small_replica_errs(&s, &small_disk, &big_disk).await;
    let reason = err["modeReason"].as_str().unwrap();
    assert!(reason.contains("mirror engine"), "{err}");
    assert_eq!(big_r["mode"], "rw");
    let v = record(&s);
    assert_eq!(v["health"], "degraded", "{v}");
    // The engine dropped the replica at its first failed write: the data reads back right now,
    // from the replica that has it.
    fio(&dev, 40, true);
    ok(&s, &["volume", "detach", VOLUME]);

    // Room again: the offline rebuild copies the raw replica and verifies it identical.
    std::fs::remove_file(small.mnt.join("filler")).unwrap();
    let rw = wait_mode(&s, &small_id, "rw", Duration::from_secs(60)).await;
    assert!(
        rw["modeReason"]
            .as_str()
            .unwrap()
            .contains("verified identical"),
        "{rw}"
    );
    let (a, b) = (
        std::fs::read(big_r["path"].as_str().unwrap()).unwrap(),
        std::fs::read(rw["path"].as_str().unwrap()).unwrap(),
    );
    assert!(a == b, "the rebuilt raw replica differs");
    attach_ok(&s, &dev).await;
    assert_eq!(record(&s)["health"], "healthy");
    fio(&dev, 40, true);
    ok(&s, &["volume", "detach", VOLUME]);
    drop(s);
}
