//! What an engine tells about its children failing, kept in its run directory: qemu's own QMP
//! events written to `events.log` by a second monitor on a *file* (no client needs to be
//! connected, so events are not lost while bicsi is down), the list of children the daemon was
//! started with (`children.json`, so events can be read after the daemon died), an fsync'ed fault
//! file the domain appends to (`faults.jsonl`), and dropping a failed child from a live quorum.
//! It reports; deciding which replica is marked err is the domain's (`crate::node`).
//!
//! Measured with qemu-storage-daemon 10.0.2, quorum (vote-threshold 1, read-pattern fifo) over
//! two local qcow2 children, the first on a 24 MiB ext4 loop disk, 40 MiB written through the
//! FUSE export with `dd conv=fsync`:
//! - the write and the fsync succeed (the second child took every write); qemu logs nothing;
//! - the monitor emits `QUORUM_REPORT_BAD` `{"node-name": "replica0", "type": "write", "error":
//!   "No space left on device", "sector-num": …, "sectors-count": …}`; no `BLOCK_IO_ERROR` (that
//!   one comes from the export's block backend, which saw success). qemu throttles
//!   `QUORUM_REPORT_BAD` per node name (one per second, the first at once), so the first failed
//!   write of a child is in the file before that write is acknowledged;
//! - reading the export back then returns *stale data* (zeros where the write failed): fifo
//!   reads the first child, which does not have the write. Hence a failed child is dropped from
//!   the quorum (`x-blockdev-change` + `blockdev-del`, measured to work on a live export) as soon
//!   as the event is seen, not only marked err for the next attach. The window between the
//!   failed write and the drop is the watcher's poll interval plus a QMP round trip.
//!
//! - a request the whole quorum fails is followed by `QUORUM_FAILURE` for the same range (seen
//!   when a remote child was cut off while the local one refused a write-zeroes it cannot do
//!   without fallback, "Operation not supported"): its caller got the error (the export falls
//!   back to plain writes), so such a child report is not a missed write. qemu throttles
//!   `QUORUM_FAILURE` too (one a second, the last one kept): a report whose failure event was
//!   dropped by the throttle counts as a fault, which errs on the safe side.
//!
//! A file monitor needs its `qmp_capabilities` from its input file (`events.in`), which is
//! written before the daemon starts.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{OsError, OsResult, ReplicaTarget, escape_opt, utf8_path};

pub(super) const EVENTS_LOG: &str = "events.log";
const EVENTS_IN: &str = "events.in";
pub(super) const CHILDREN: &str = "children.json";
/// The domain's durable record of faults, one JSON object a line.
pub const FAULTS: &str = "faults.jsonl";

/// A child of an engine that failed an operation, as qemu reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildFault {
    /// The child's position among the engine's children (`replica<i>`).
    pub index: usize,
    pub target: ReplicaTarget,
    /// qemu's operation type: write, flush or read.
    pub operation: String,
    pub error: String,
    /// Unix seconds of qemu's timestamp.
    pub at: u64,
    /// A `QUORUM_FAILURE` for the same range follows: the whole request failed and its caller
    /// was told, so nothing acknowledged is missing from this child.
    pub request_failed: bool,
}

/// One fault the domain recorded: which child, why, when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultRecord {
    pub target: ReplicaTarget,
    pub reason: String,
    pub at: u64,
}

/// The monitor arguments for the event file; writes its input file (the capabilities
/// negotiation) and the children list first.
pub(super) fn prepare(run_dir: &Path, children: &[ReplicaTarget]) -> OsResult<Vec<String>> {
    let input = run_dir.join(EVENTS_IN);
    fs::write(&input, "{\"execute\":\"qmp_capabilities\"}\n")
        .map_err(|e| OsError::io(format!("writing {}", input.display()), e))?;
    let list = run_dir.join(CHILDREN);
    let text = serde_json::to_string(children).map_err(|e| OsError::Other(e.to_string()))?;
    fs::write(&list, text).map_err(|e| OsError::io(format!("writing {}", list.display()), e))?;
    let _ = fs::remove_file(run_dir.join(EVENTS_LOG));
    Ok(vec![
        "--chardev".to_string(),
        format!(
            "file,id=events0,path={},input-path={}",
            escape_opt(utf8_path(&run_dir.join(EVENTS_LOG))?),
            escape_opt(utf8_path(&input)?)
        ),
        "--monitor".to_string(),
        "chardev=events0,mode=control".to_string(),
    ])
}

/// The children the engine of `run_dir` was started with (empty when unknown).
pub fn children(run_dir: &Path) -> Vec<ReplicaTarget> {
    fs::read(run_dir.join(CHILDREN))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The child failures in the engine's event file, in order; works after the daemon died.
pub fn child_faults(run_dir: &Path) -> Vec<ChildFault> {
    let Ok(text) = fs::read(run_dir.join(EVENTS_LOG)) else {
        return Vec::new();
    };
    let children = children(run_dir);
    let text = String::from_utf8_lossy(&text);
    let mut out: Vec<(ChildFault, (u64, u64))> = Vec::new();
    for line in text.lines() {
        if let Some(range) = quorum_failure(line) {
            for (f, r) in out.iter_mut() {
                if *r == range {
                    f.request_failed = true;
                }
            }
        } else if let Some(f) = parse_event(line, &children) {
            let range = serde_json::from_str::<Value>(line)
                .ok()
                .map(|v| {
                    let n = |k: &str| v["data"][k].as_u64().unwrap_or(u64::MAX);
                    (n("sector-num"), n("sectors-count"))
                })
                .unwrap_or((u64::MAX, u64::MAX));
            out.push((f, range));
        }
    }
    out.into_iter().map(|(f, _)| f).collect()
}

/// The range of a `QUORUM_FAILURE` event (the whole quorum failed a request).
fn quorum_failure(line: &str) -> Option<(u64, u64)> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v.get("event")?.as_str()? != "QUORUM_FAILURE" {
        return None;
    }
    let data = v.get("data")?;
    Some((
        data.get("sector-num")?.as_u64()?,
        data.get("sectors-count")?.as_u64()?,
    ))
}

fn parse_event(line: &str, children: &[ReplicaTarget]) -> Option<ChildFault> {
    let v: Value = serde_json::from_str(line).ok()?;
    let data = v.get("data")?;
    let (node, operation) = match v.get("event")?.as_str()? {
        "QUORUM_REPORT_BAD" => (
            data.get("node-name")?.as_str()?,
            data.get("type")?.as_str()?,
        ),
        // Emitted by a block backend: with a quorum that is the whole volume (the user saw
        // the error); with a single child, that child.
        "BLOCK_IO_ERROR" => (
            data.get("node-name")?.as_str()?,
            data.get("operation")?.as_str()?,
        ),
        _ => return None,
    };
    let index: usize = node.strip_prefix("replica")?.parse().ok()?;
    Some(ChildFault {
        index,
        target: children.get(index)?.clone(),
        operation: operation.to_string(),
        error: data
            .get("error")
            .or_else(|| data.get("reason"))
            .and_then(Value::as_str)
            .unwrap_or("an I/O error")
            .to_string(),
        at: v
            .get("timestamp")
            .and_then(|t| t.get("seconds"))
            .and_then(Value::as_u64)
            .unwrap_or(0),
        request_failed: false,
    })
}

/// Appends `fault` to the run directory's fault file and makes it durable (file and directory
/// fsync'ed) before returning.
pub fn record_fault(run_dir: &Path, fault: &FaultRecord) -> OsResult<()> {
    let path = run_dir.join(FAULTS);
    let mut line = serde_json::to_string(fault).map_err(|e| OsError::Other(e.to_string()))?;
    line.push('\n');
    let ctx = || format!("recording a replica fault in {}", path.display());
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| OsError::io(ctx(), e))?;
    f.write_all(line.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| OsError::io(ctx(), e))?;
    File::open(run_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| OsError::io(ctx(), e))
}

/// The faults recorded in `run_dir` (a torn last line is skipped).
pub fn read_faults(run_dir: &Path) -> Vec<FaultRecord> {
    let Ok(text) = fs::read_to_string(run_dir.join(FAULTS)) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Takes child `index` out of the live quorum of the engine whose QMP socket is `qmp` and
/// closes it, so it is neither read nor written again (nor silently reconnected, for NBD).
/// Ok when it is out already.
pub fn drop_child(qmp: &Path, index: usize, local: bool) -> OsResult<()> {
    let mut q = crate::os::nbd::Qmp::connect(qmp)?;
    let nodes = q
        .execute("query-named-block-nodes", Some(json!({"flat": true})))?
        .map_err(|e| OsError::Other(format!("QMP query-named-block-nodes: {}", e.desc)))?;
    let node = format!("replica{index}");
    let present = |name: &str| {
        nodes
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n["node-name"] == name))
    };
    if !present(&node) {
        return Ok(());
    }
    let child = format!("children.{index}");
    if let Err(e) = q.execute(
        "x-blockdev-change",
        Some(json!({"parent": "volume", "child": child})),
    )? {
        // Already out of the quorum (a drop that was cut before its blockdev-del).
        if !e.desc.contains("not have a child") && !e.desc.contains("does not have") {
            return Err(OsError::Other(format!(
                "QMP x-blockdev-change removing {child} from the volume's quorum in {}: {}",
                qmp.display(),
                e.desc
            )));
        }
    }
    let mut del = vec![node];
    if local {
        del.push(format!("file{index}"));
    }
    for n in del {
        if let Err(e) = q.execute("blockdev-del", Some(json!({"node-name": n})))? {
            return Err(OsError::Other(format!(
                "QMP blockdev-del {n} in {}: {}",
                qmp.display(),
                e.desc
            )));
        }
    }
    Ok(())
}

/// Forgets the recorded faults once the domain has applied them to the volume record, so an old
/// fault never marks a replica that was rebuilt since.
pub fn clear_faults(run_dir: &Path) -> OsResult<()> {
    match fs::remove_file(run_dir.join(FAULTS)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(OsError::io(
            format!("removing {}", run_dir.join(FAULTS).display()),
            e,
        )),
    }
}

/// Whether the NBD server at host:port is alive: it sends its greeting (`NBDMAGIC`) within
/// `timeout` of a new connection. A server process that is stopped, or a node that stopped
/// answering without closing connections, does not (its kernel may still accept the
/// connection). A refused connection counts as answering: a dead server makes qemu's requests
/// fail at once, which the engine reports itself.
pub fn nbd_answers(host: &str, port: u16, timeout: std::time::Duration) -> bool {
    use std::io::Read;
    use std::net::ToSocketAddrs;
    let Some(addr) = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
    else {
        return true;
    };
    let mut stream = match std::net::TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return e.kind() != std::io::ErrorKind::TimedOut,
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let mut magic = [0u8; 8];
    match stream.read_exact(&mut magic) {
        Ok(()) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Destroys this machine's TCP connections to host:port (`ss -K`, the kernel's sock_destroy):
/// qemu's NBD client sees its requests to a stalled server fail at once instead of waiting for
/// TCP to give up (minutes), and quorum goes on with the other children.
pub fn cut_connections(host: &str, port: u16) -> OsResult<()> {
    let mut cmd = std::process::Command::new("ss");
    cmd.args(["-K", "-t", "dst", host, "dport", "=", &port.to_string()]);
    let out = cmd.output().map_err(|e| crate::os::spawn_error(&cmd, e))?;
    if !out.status.success() {
        return Err(crate::os::command_failure(
            crate::os::display_command(&cmd),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
            Some("the kernel needs CONFIG_INET_DIAG_DESTROY and the caller CAP_NET_ADMIN"),
        ));
    }
    Ok(())
}

/// The fault file's path, for messages.
pub fn faults_path(run_dir: &Path) -> PathBuf {
    run_dir.join(FAULTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_events_qemu_writes() {
        let children = vec![
            ReplicaTarget::Local("/d1/r0.qcow2".into()),
            ReplicaTarget::Local("/d2/r1.qcow2".into()),
        ];
        // As measured (see the module doc).
        let line = r#"{"timestamp": {"seconds": 1796197150, "microseconds": 947474}, "event": "QUORUM_REPORT_BAD", "data": {"node-name": "replica0", "sectors-count": 2048, "sector-num": 40960, "type": "write", "error": "No space left on device"}}"#;
        let f = parse_event(line, &children).unwrap();
        assert_eq!(f.index, 0);
        assert_eq!(f.target, children[0]);
        assert_eq!(f.operation, "write");
        assert_eq!(f.error, "No space left on device");
        assert_eq!(f.at, 1_796_197_150);
        let failed = [
            r#"{"timestamp": {"seconds": 5}, "event": "QUORUM_REPORT_BAD", "data": {"node-name": "replica0", "sectors-count": 1016, "sector-num": 558, "type": "write", "error": "Operation not supported"}}"#,
            r#"{"timestamp": {"seconds": 5}, "event": "QUORUM_FAILURE", "data": {"reference": "volume", "sectors-count": 1016, "sector-num": 558}}"#,
        ];
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CHILDREN),
            serde_json::to_string(&children).unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join(EVENTS_LOG),
            format!("{line}\n{}\n{}\n", failed[0], failed[1]),
        )
        .unwrap();
        let got = child_faults(dir.path());
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(!got[0].request_failed, "a write the other child took");
        assert!(got[1].request_failed, "a request the caller saw fail");
        for other in [
            r#"{"QMP": {"version": {}}}"#,
            r#"{"return": {}}"#,
            r#"{"event": "QUORUM_REPORT_BAD", "data": {"node-name": "volume", "type": "write"}}"#,
            r#"{"event": "QUORUM_REPORT_BAD", "data": {"node-name": "replica7", "type": "write"}}"#,
            "torn {\"event",
        ] {
            assert_eq!(parse_event(other, &children), None, "{other}");
        }
    }

    #[test]
    fn faults_are_appended_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_faults(dir.path()).is_empty());
        let f = FaultRecord {
            target: ReplicaTarget::Local("/d/r.qcow2".into()),
            reason: "write failed: No space left on device".into(),
            at: 5,
        };
        record_fault(dir.path(), &f).unwrap();
        record_fault(dir.path(), &f).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(faults_path(dir.path()))
            .unwrap()
            .write_all(b"{\"target\":")
            .unwrap();
        assert_eq!(read_faults(dir.path()), vec![f.clone(), f]);
    }
}
