//! Point-in-time copies of a live engine's replica: qemu's `blockdev-backup` with `sync: top`
//! into a qcow2 file the caller made. qemu puts a copy-before-write filter above the replica
//! while the job runs, so a write that lands on a cluster not yet copied first copies the old
//! data: the file ends up holding the replica as it was when the job started, whatever the
//! workload does meanwhile. `top` copies only the replica's own clusters; the target shares the
//! replica's backing file for the rest, which never changes.
//!
//! Measured with qemu 10.0 on a quorum of two overlays over a raw image: a job started after
//! writing AAAA, with BBBB written over it while the job ran, leaves AAAA in the copy and the
//! backing file's bytes where the volume was never written; `qemu-img check` finds no error.
//! The engine keeps serving the volume throughout; the filter goes away with the job.
//!
//! One QMP client at a time, measured: a second client that connects to an engine's monitor
//! while another is connected waits for the greeting, and once it gives up the monitor stops
//! answering anyone (no greeting for later clients). So copies are serialized in this process.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{find_processes, parse_args};
use crate::os::nbd::Qmp;
use crate::os::{OsError, OsResult, ReplicaTarget, utf8_path};

/// A backup that makes no progress for this long is cancelled.
const STALL_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(50);

/// Serializes this process's QMP sessions with engines (see the module doc).
static QMP_LOCK: Mutex<()> = Mutex::new(());

/// The run directory of the live engine that has `replica` open, and the index of that child.
fn engine_of(replica: &Path) -> Option<(PathBuf, usize)> {
    let want = std::fs::canonicalize(replica).unwrap_or_else(|_| replica.to_path_buf());
    let same = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()) == want;
    // No pid file names such an engine: scan /proc.
    let found = find_processes(Path::new("/nonexistent/bicsi-backup.pid"), |argv| {
        let args = parse_args(argv)?;
        let index = args
            .targets
            .iter()
            .position(|t| matches!(t, ReplicaTarget::Local(p) if same(p)))?;
        Some((args.export.parent()?.to_path_buf(), index))
    });
    found.into_iter().next().map(|(_, found)| found)
}

fn call(qmp: &mut Qmp, command: &str, args: Value) -> OsResult<Value> {
    qmp.execute(command, Some(args.clone()))?.map_err(|e| {
        OsError::Other(format!(
            "QMP {command} {args} failed: {}; the volume's engine refused the point-in-time copy",
            e.desc
        ))
    })
}

/// The environment variable that turns on live copies (`1`); off by default, see [`LIVE_COPY`].
const LIVE_COPY_ENV: &str = "BICSI_EXPERIMENTAL_LIVE_COPY";

/// Why live copies are off by default, measured here on 2026-11-27 with qemu 10.0.2: once a
/// `blockdev-backup` job starts on a node that a FUSE export serves, the export can stop
/// answering. With a writer on the mounted volume the first job wedged the daemon (QMP silent,
/// the volume's I/O hung, and every `mkfs` on the machine hung on its loop device); with the
/// filesystem frozen around the job's start, the thaw itself hung. An export in an iothread
/// made the daemon drop the QMP connection. Until a qemu or a method without this is proven, a
/// snapshot or export of an attached volume is refused unless the operator opts in.
const LIVE_COPY: &str = "a point-in-time copy of an attached volume is off: with \
     qemu-storage-daemon 10.0 a backup job on a FUSE-exported volume can stop the volume's I/O; \
     detach the volume (or stop its workload and unpublish it) and retry, or set \
     BICSI_EXPERIMENTAL_LIVE_COPY=1 in bicsi's environment to accept that risk";

pub(super) fn backup_replica(replica: &Path, target: &Path) -> OsResult<bool> {
    let _one_client = QMP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some((run_dir, index)) = engine_of(replica) else {
        return Ok(false);
    };
    if std::env::var_os(LIVE_COPY_ENV).is_none_or(|v| v != "1") {
        return Err(OsError::Busy(format!(
            "replica {} is open by a running engine: {LIVE_COPY}",
            replica.display()
        )));
    }
    let mut qmp = Qmp::connect(&run_dir.join("qmp.sock"))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(0);
    // qemu node names are at most 31 bytes.
    let node = format!("bk-{nanos:08x}-{}", std::process::id());
    let job = format!("job-{node}");
    call(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": node,
            "file": {"driver": "file", "filename": utf8_path(target)?}}),
    )?;
    let result = run_job(&mut qmp, &format!("replica{index}"), &node, &job, target);
    if result.is_err() {
        let _ = qmp.execute("job-cancel", Some(json!({"id": job})));
        let _ = wait_concluded(&mut qmp, &job, target);
    }
    let _ = qmp.execute("job-dismiss", Some(json!({"id": job})));
    let deleted = call(&mut qmp, "blockdev-del", json!({"node-name": node}));
    result?;
    deleted?;
    Ok(true)
}

fn run_job(qmp: &mut Qmp, device: &str, node: &str, job: &str, target: &Path) -> OsResult<()> {
    call(
        qmp,
        "blockdev-backup",
        json!({"job-id": job, "device": device, "target": node, "sync": "top",
            "auto-dismiss": false}),
    )?;
    match wait_concluded(qmp, job, target)? {
        None => Ok(()),
        Some(error) => Err(OsError::Other(format!(
            "point-in-time copy of {device} into {} failed: {error}",
            target.display()
        ))),
    }
}

/// Waits for the job to conclude; returns its error, if it had one.
fn wait_concluded(qmp: &mut Qmp, job: &str, target: &Path) -> OsResult<Option<String>> {
    let mut last_progress = 0u64;
    let mut since = Instant::now();
    loop {
        let jobs = call(qmp, "query-jobs", json!({}))?;
        let Some(entry) = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == job))
            .cloned()
        else {
            return Ok(Some(format!("job {job} disappeared")));
        };
        if entry["status"] == "concluded" {
            return Ok(entry["error"].as_str().map(str::to_string));
        }
        let progress = entry["current-progress"].as_u64().unwrap_or(0);
        if progress != last_progress {
            last_progress = progress;
            since = Instant::now();
        } else if since.elapsed() > STALL_TIMEOUT {
            return Err(OsError::Timeout(format!(
                "point-in-time copy into {} made no progress for {STALL_TIMEOUT:?}",
                target.display()
            )));
        }
        std::thread::sleep(POLL);
    }
}
