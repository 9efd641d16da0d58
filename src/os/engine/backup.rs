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
//! The job is never left to finish on its own (`auto-finalize: false`): we finalize it with a
//! QMP command. Found on 2026-11-27 with qemu-storage-daemon 10.0.2 (gdb on the wedged daemon):
//! its FUSE export serves a request synchronously, and a write or flush of the volume waits for
//! its block request in a nested `aio_poll`, with the export's in-flight count held. When the
//! job's last copy completes inside that poll, the job's completion runs there too, and its
//! removal of the copy-before-write filter (`bdrv_cbw_drop`, a drained graph change) waits for
//! the export to have no request in flight: the one it is nested in, which cannot finish. The
//! daemon then answers nothing, the loop device above hangs, and so does every `mkfs` on the
//! machine. A job that waits in `pending` does nothing in that poll; `job-finalize` removes the
//! filter from the monitor, at the top of the main loop, where no request is in flight: 0 hangs
//! in 205 jobs under writes (`scripts/repro-live-copy-hang finalize 30`, and `quorum`), where
//! letting the job finalize itself wedged 11 runs of 12 within 10 jobs (`... auto 10`).
//!
//! What this does not fix in qemu 10.0: a job that fails (its target disk full, a replica
//! unreadable) or that is cancelled while still running is torn down by qemu in that same
//! nested poll, and can wedge the same way while the volume is busy (measured: 1 of 8 failures
//! on a full target, 3 of 10 cancels after an error). So the copy first checks that its disk has
//! room for all of the replica's clusters, and a job is cancelled only when it has stalled for
//! [`STALL_TIMEOUT`]. qemu reworked the FUSE export to serve requests in coroutines, without the
//! nested poll ("export/fuse: Use coroutines and multi-threading", Hanna Czenczek, 2025).
//!
//! One QMP client at a time, measured: a second client that connects to an engine's monitor
//! while another is connected waits for the greeting, and once it gives up the monitor stops
//! answering anyone (no greeting for later clients). So copies are serialized in this process.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{find_processes, parse_args};
use crate::os::fs::SysFilesystems;
use crate::os::nbd::Qmp;
use crate::os::{Filesystems, OsError, OsResult, ReplicaTarget, utf8_path};

/// A backup that makes no progress for this long is cancelled.
const STALL_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(50);

/// Serializes this process's QMP sessions with engines (see the module doc).
static QMP_LOCK: Mutex<()> = Mutex::new(());

/// The run directory of the live engine that has `replica` open, and the index of that child.
fn engine_of(replica: &Path) -> Option<(PathBuf, usize)> {
    let (export, index) = export_of(replica)?;
    Some((export.parent()?.to_path_buf(), index))
}

/// The FUSE export file of the live engine that has `replica` open, and the index of that child.
fn export_of(replica: &Path) -> Option<(PathBuf, usize)> {
    let want = std::fs::canonicalize(replica).unwrap_or_else(|_| replica.to_path_buf());
    let same = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()) == want;
    // No pid file names such an engine: scan /proc.
    let found = find_processes(Path::new("/nonexistent/bicsi-backup.pid"), |argv| {
        let args = parse_args(argv)?;
        let index = args
            .targets
            .iter()
            .position(|t| matches!(t, ReplicaTarget::Local(p) if same(p)))?;
        Some((args.export.clone(), index))
    });
    found.into_iter().next().map(|(_, found)| found)
}

/// The filesystem mounted on this machine from the volume whose live engine has `replica` open:
/// None when no live engine has it (the file is at rest); else one mount point of the
/// filesystem on the engine's loop device (freezing one mount freezes its superblock, so all of
/// them), or none when nothing here mounts that device (a raw block volume).
pub(super) fn engine_mounts(replica: &Path) -> OsResult<Option<Vec<PathBuf>>> {
    use crate::os::LoopDevices;
    let Some((export, _)) = export_of(replica) else {
        return Ok(None);
    };
    let Some(dev) = crate::os::loopdev::Losetup.find(&export)? else {
        return Ok(Some(vec![]));
    };
    filesystem_mount(&dev).map(Some)
}

/// The mount point of the filesystem on the block device `dev` (at most one: binds of it are
/// left out); empty when nothing mounts a filesystem from it.
pub(crate) fn filesystem_mount(dev: &Path) -> OsResult<Vec<PathBuf>> {
    let name = dev.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let sys = Path::new("/sys/block").join(name).join("dev");
    let majmin = std::fs::read_to_string(&sys)
        .map_err(|e| OsError::io(format!("reading {}", sys.display()), e))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| OsError::io("reading /proc/self/mountinfo", e))?;
    Ok(mount_points_of(&mountinfo, majmin.trim())
        .into_iter()
        .take(1)
        .collect())
}

/// The mount points in `mountinfo` (the format of /proc/self/mountinfo) of the filesystem on
/// device `majmin` ("7:3"). A block device bind-mounted onto a file shows devtmpfs's numbers,
/// not the device's, so only real filesystems on the device match.
fn mount_points_of(mountinfo: &str, majmin: &str) -> Vec<PathBuf> {
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    };
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.len() > 4 && fields[2] == majmin).then(|| PathBuf::from(unescape(fields[4])))
        })
        .collect()
}

/// Refuses a copy whose disk cannot hold all of the replica's clusters: a job that runs out of
/// space fails inside qemu, which can wedge a busy volume (see the module doc). The replica
/// file's allocated size bounds what the copy (its clusters at the instant the job starts,
/// plus qcow2 metadata of about the same size) can take.
fn ensure_room(replica: &Path, target: &Path) -> OsResult<()> {
    use std::os::unix::fs::MetadataExt;
    let need = std::fs::metadata(replica)
        .map_err(|e| OsError::io(format!("reading the size of {}", replica.display()), e))?
        .blocks()
        * 512;
    let dir = target.parent().unwrap_or(Path::new("/"));
    let free = SysFilesystems.stats(dir)?.available_bytes;
    if free < need {
        return Err(OsError::NoSpace(format!(
            "a point-in-time copy of replica {} needs up to {need} bytes in {}, which has \
             {free} free; free space on that disk and retry",
            replica.display(),
            dir.display()
        )));
    }
    Ok(())
}

fn call(qmp: &mut Qmp, command: &str, args: Value) -> OsResult<Value> {
    qmp.execute(command, Some(args.clone()))?.map_err(|e| {
        OsError::Other(format!(
            "QMP {command} {args} failed: {}; the volume's engine refused the point-in-time copy",
            e.desc
        ))
    })
}

pub(super) fn backup_replica(replica: &Path, target: &Path) -> OsResult<bool> {
    let _one_client = QMP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some((run_dir, index)) = engine_of(replica) else {
        return Ok(false);
    };
    ensure_room(replica, target)?;
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
    // auto-finalize off: see the module doc; wait_concluded finalizes it.
    call(
        qmp,
        "blockdev-backup",
        json!({"job-id": job, "device": device, "target": node, "sync": "top",
            "auto-finalize": false, "auto-dismiss": false}),
    )?;
    match wait_concluded(qmp, job, target)? {
        None => Ok(()),
        Some(error) => Err(OsError::Other(format!(
            "point-in-time copy of {device} into {} failed: {error}",
            target.display()
        ))),
    }
}

/// Waits for the job to conclude, finalizing it from here once it is `pending` (see the module
/// doc); returns its error, if it had one.
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
        match entry["status"].as_str() {
            Some("concluded") => return Ok(entry["error"].as_str().map(str::to_string)),
            Some("pending") => {
                call(qmp, "job-finalize", json!({"id": job}))?;
                continue;
            }
            _ => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_of_a_device() {
        let info = "\
36 25 7:3 / /var/lib/kubelet/staging/pv\\0401 rw,relatime shared:1 - ext4 /dev/loop3 rw
37 25 7:3 / /var/lib/kubelet/pods/x/mount rw,relatime shared:1 - ext4 /dev/loop3 rw
38 25 0:5 /loop4 /var/lib/kubelet/pods/y/dev rw shared:2 - devtmpfs udev rw
39 25 7:30 / /other rw - xfs /dev/loop30 rw
";
        assert_eq!(
            mount_points_of(info, "7:3"),
            [
                PathBuf::from("/var/lib/kubelet/staging/pv 1"),
                PathBuf::from("/var/lib/kubelet/pods/x/mount")
            ]
        );
        assert!(
            mount_points_of(info, "7:4").is_empty(),
            "a block bind mount is no filesystem"
        );
    }
}
