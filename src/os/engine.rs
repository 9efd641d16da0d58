//! The block engine: one `qemu-storage-daemon` per attached volume, serving the volume's qcow2
//! replicas as one block node (a `quorum` over them when there are several) and exporting it as a
//! regular file through qemu's FUSE export, for a loop device to sit on. A replica on another node
//! is a child read through qemu's built-in NBD client from that node's replica server
//! (`super::nbd`), so no kernel NBD module is needed.
//!
//! Everything about a running engine lives in its run directory (export file, QMP socket, pid
//! file, log, NBD trace) and in the daemon's own command line, which is read back from /proc to
//! re-adopt it after bicsi restarts: this module keeps no state in memory. With an engine host
//! (`host`, `--engine-endpoint`) the daemon is started by that process instead of forked from
//! this one, so it lives in the host's container; everything else here works the same. It must
//! not resize (quorum cannot grow online; the domain grows replicas offline with
//! `ImageTool::resize`), must not touch loop devices or mounts other than its own export, and
//! never kills a process it cannot prove is the engine of that run directory.
//!
//! Measured with qemu 10.0 (quorum, vote-threshold 1, one local and NBD children):
//! - a remote replica server that dies (its process killed, so the kernel closes the connection)
//!   costs nothing visible: writes and fsyncs through the export keep succeeding from the local
//!   child, qemu logs nothing and emits only a QMP event nobody listens to;
//! - once the export is back on the same host:port, the NBD client reconnects on the next request,
//!   silently, and writes reach that replica again although it missed the ones made meanwhile;
//!   the `--trace` events written to `nbd-trace.log` are the only record (`volume_status`);
//! - a remote that hangs without closing its connection (process stopped, host gone without a
//!   reset) blocks every write of the volume until the connection breaks (for a dead host, TCP's
//!   retransmission timeout, ~15 min by default), and while a FUSE request waits the daemon's main
//!   loop does not answer QMP either (and qemu-storage-daemon has no `yank`).

pub(crate) mod backup;
pub mod events;
pub mod host;
pub mod mirror;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use serde_json::{Value, json};

use super::{
    Engine, EngineSpec, EngineState, ImageFormat, OsError, OsResult, ReplicaExport, ReplicaTarget,
    VolumeEngineSpec, VolumeEngineState, command_failure, display_command, loopdev, mount, nbd,
    replica_server, resolve_parent, spawn_error, utf8_path,
};

/// `sun_path` holds 108 bytes including the terminating NUL.
pub(super) const MAX_SOCKET_PATH: usize = 107;

/// The longest export name the NBD protocol allows.
pub(super) const MAX_NBD_NAME: usize = 4096;

/// qemu's NBD client events written to `nbd-trace.log` of an engine with NBD children: a
/// completed handshake (names the export; a second one for the same export is a reconnect), and
/// the two failures that mean a remote child missed a request. They fire only on (re)connects and
/// failures, so the file stays small.
const NBD_TRACE_HANDSHAKE: &str = "nbd_client_handshake_success";
const NBD_TRACE_FAILURES: &[&str] = &["nbd_co_request_fail", "nbd_read_reply_entry_fail"];

/// The real engine: `qemu-storage-daemon` processes.
#[derive(Clone, Debug)]
pub struct QemuStorageDaemon {
    pub program: PathBuf,
    /// How long the daemon may take to set up its export before we give up on it.
    pub start_timeout: Duration,
    /// How long after SIGTERM before SIGKILL. Measured: the daemon exits ~30 ms after SIGTERM;
    /// the ~1.6 s a shell loop on `kill -0` sees is the zombie waiting for init to reap it.
    pub stop_timeout: Duration,
    /// The engine host's socket (`bicsi engine`, `--engine-endpoint`): daemons are started by
    /// it instead of forked from this process. Everything else (pid files, /proc, QMP, stop)
    /// works on the shared host PID namespace and data directory as before.
    pub host: Option<PathBuf>,
    /// The node's `--tls-dir` (`crate::tls`): the replica servers require TLS with a node
    /// certificate of its CA, and the engines' NBD clients present its certificate.
    pub nbd_tls: Option<PathBuf>,
}

impl Default for QemuStorageDaemon {
    fn default() -> Self {
        QemuStorageDaemon {
            program: PathBuf::from("qemu-storage-daemon"),
            start_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
            host: None,
            nbd_tls: None,
        }
    }
}

impl QemuStorageDaemon {
    pub fn new() -> QemuStorageDaemon {
        QemuStorageDaemon::default()
    }

    /// Daemons started through the engine host listening on `socket`.
    pub fn with_host(socket: PathBuf) -> QemuStorageDaemon {
        QemuStorageDaemon {
            host: Some(socket),
            ..QemuStorageDaemon::default()
        }
    }
}

/// The files of one engine's run directory.
#[derive(Clone, Debug)]
struct RunPaths {
    dir: PathBuf,
    export: PathBuf,
    qmp: PathBuf,
    pid: PathBuf,
    log: PathBuf,
    trace: PathBuf,
    /// qemu's TLS credentials of the NBD children (links into the node's `--tls-dir`).
    tls: PathBuf,
}

impl RunPaths {
    fn new(run_dir: &Path) -> RunPaths {
        // Resolved the way the kernel reports mount points, so comparisons with mountinfo and
        // with the daemon's command line hold whatever spelling the caller used.
        let dir = fs::canonicalize(run_dir).unwrap_or_else(|_| resolve_parent(run_dir));
        RunPaths {
            export: dir.join("export"),
            qmp: dir.join("qmp.sock"),
            pid: dir.join("qsd.pid"),
            log: dir.join("qsd.log"),
            trace: dir.join("nbd-trace.log"),
            tls: dir.join(super::qemu_tls::DIR_NAME),
            dir,
        }
    }
}

/// What a daemon's command line says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DaemonArgs {
    export: PathBuf,
    /// The children in read order.
    targets: Vec<ReplicaTarget>,
    read_only: bool,
}

impl DaemonArgs {
    fn local_replicas(&self) -> Vec<PathBuf> {
        self.targets
            .iter()
            .filter_map(|t| match t {
                ReplicaTarget::Local(p) => Some(p.clone()),
                ReplicaTarget::Nbd { .. } => None,
            })
            .collect()
    }
}

/// qemu's option syntax (`key=value,key=value`) needs a literal comma doubled.
pub(super) fn escape_opt(value: &str) -> String {
    value.replace(',', ",,")
}

/// The last arguments of every qemu-storage-daemon bicsi starts: its QMP monitor on the socket
/// `qmp`, its pid file `pid` (the file names the run directory: it is how a daemon is
/// recognised in /proc), and `--daemonize`: the daemon outlives bicsi (re-adoption after a
/// restart), and its parent exits only once it is up or failed, which is our readiness signal.
pub(super) fn monitor_args(qmp: &Path, pid: &Path) -> OsResult<[String; 7]> {
    Ok([
        "--chardev".to_string(),
        format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            escape_opt(utf8_path(qmp)?)
        ),
        "--monitor".to_string(),
        "chardev=qmp0,mode=control".to_string(),
        "--pidfile".to_string(),
        utf8_path(pid)?.to_string(),
        "--daemonize".to_string(),
    ])
}

/// A replica server (qemu's or bicsi's) in `dir` that was to listen on `host:port` and exited:
/// its `log` read for why. The port taken by another program is a Conflict (a server on a port
/// it picked itself tries another); else the error is the exit with `hint` for the log.
pub(super) fn listen_failure(
    dir: &Path,
    log_path: &Path,
    host: &str,
    port: u16,
    log: &str,
) -> ListenFailure {
    if log.contains("Address already in use") {
        return ListenFailure::PortTaken(OsError::Conflict(format!(
            "replica server in {}: port {port} on {host} is taken by another program; \
             use another port (log {}:\n{log})",
            dir.display(),
            log_path.display()
        )));
    }
    ListenFailure::Exited {
        hint: if log.contains("Cannot assign requested address") {
            "the address is not one of this node's; give the node's own IP"
        } else {
            "see the log above"
        },
    }
}

/// Why a replica server did not start listening (see [`listen_failure`]).
pub(super) enum ListenFailure {
    PortTaken(OsError),
    Exited { hint: &'static str },
}

/// The daemon's arguments. Block nodes and the export use qemu's JSON syntax, so paths need no
/// escaping; only --chardev, --trace and --object still take the key=value syntax.
/// `tls`: the NBD children connect over TLS with the credentials in `paths.tls` (made by the
/// caller) and check the server's certificate for the node role.
fn build_args(spec: &VolumeEngineSpec, paths: &RunPaths, tls: bool) -> OsResult<Vec<String>> {
    let ro = spec.read_only;
    let mut args = Vec::new();
    let remote = spec
        .replicas
        .iter()
        .any(|t| matches!(t, ReplicaTarget::Nbd { .. }));
    if remote && tls {
        args.extend([
            "--object".to_string(),
            super::qemu_tls::creds_object(&paths.tls, super::qemu_tls::Endpoint::Client)?,
        ]);
    }
    if remote {
        // First, so that the handshakes of the initial connections are recorded too.
        args.extend([
            "--trace".to_string(),
            format!(
                "enable={NBD_TRACE_HANDSHAKE},file={}",
                escape_opt(utf8_path(&paths.trace)?)
            ),
        ]);
        for event in NBD_TRACE_FAILURES {
            args.extend(["--trace".to_string(), event.to_string()]);
        }
    }
    let mut children = Vec::new();
    for (i, target) in spec.replicas.iter().enumerate() {
        let node = format!("replica{i}");
        match target {
            ReplicaTarget::Local(replica) => {
                let file = format!("file{i}");
                // discard=unmap: a discard that reaches the export frees the clusters in every
                // replica (measured: blkdiscard on the loop device, or a punched hole in the
                // export file).
                let file_node = json!({"driver": "file", "node-name": file,
                    "filename": utf8_path(replica)?, "read-only": ro, "discard": "unmap"});
                let fmt_node = json!({"driver": "qcow2", "node-name": node, "file": file,
                    "read-only": ro, "discard": "unmap"});
                args.extend(["--blockdev".to_string(), file_node.to_string()]);
                args.extend(["--blockdev".to_string(), fmt_node.to_string()]);
            }
            ReplicaTarget::Nbd { host, port, export } => {
                // The remote serves the qcow2 node, so this is the replica's content as is.
                // reconnect-delay stays 0: a request to a lost child fails at once and quorum
                // goes on with the others instead of waiting. keep-alive lets the kernel break
                // an idle connection to a dead host (after net.ipv4.tcp_keepalive_time).
                let mut nbd_node = json!({"driver": "nbd", "node-name": node,
                    "server": {"type": "inet", "host": host, "port": port.to_string(),
                        "keep-alive": true},
                    "export": export, "read-only": ro, "discard": "unmap"});
                if tls {
                    nbd_node["tls-creds"] = json!(super::qemu_tls::CREDS_ID);
                    nbd_node["tls-hostname"] = json!(super::qemu_tls::server_name());
                }
                args.extend(["--blockdev".to_string(), nbd_node.to_string()]);
            }
        }
        children.push(node);
    }
    let top = if children.len() == 1 {
        children[0].clone()
    } else {
        // vote-threshold 1: a read succeeds from any healthy replica and a write succeeds when one
        // replica took it, while every write still goes to all of them. fifo: read from the first
        // replica (the local one) and fall back to the next only on error, instead of reading all
        // and voting.
        let quorum = json!({"driver": "quorum", "node-name": "volume", "vote-threshold": 1,
            "read-pattern": "fifo", "children": children, "read-only": ro, "discard": "unmap"});
        args.extend(["--blockdev".to_string(), quorum.to_string()]);
        "volume".to_string()
    };
    let export = json!({"type": "fuse", "id": "export0", "node-name": top,
        "mountpoint": utf8_path(&paths.export)?, "writable": !ro});
    args.extend(["--export".to_string(), export.to_string()]);
    args.extend(monitor_args(&paths.qmp, &paths.pid)?);
    Ok(args)
}

/// An NBD child's address as written in a `--blockdev` (the port is a string in qemu's schema;
/// a number is accepted too).
fn parse_nbd_node(v: &Value) -> Option<ReplicaTarget> {
    let server = v.get("server")?;
    let port = match server.get("port")? {
        Value::String(s) => s.parse().ok()?,
        Value::Number(n) => u16::try_from(n.as_u64()?).ok()?,
        _ => return None,
    };
    Some(ReplicaTarget::Nbd {
        host: server.get("host")?.as_str()?.to_string(),
        port,
        export: v.get("export")?.as_str()?.to_string(),
    })
}

/// Read our own arguments back from a daemon's command line; None when it is not an engine.
fn parse_args(argv: &[String]) -> Option<DaemonArgs> {
    let program = argv.first()?;
    if !program.contains("qemu-storage-daemon") {
        return None;
    }
    let mut export = None;
    let mut read_only = false;
    let mut targets = Vec::new();
    for pair in argv.windows(2) {
        let value = || serde_json::from_str::<Value>(&pair[1]).ok();
        match pair[0].as_str() {
            "--export" => {
                let v = value()?;
                export = Some(PathBuf::from(v.get("mountpoint")?.as_str()?));
                read_only = !v.get("writable").and_then(Value::as_bool).unwrap_or(false);
            }
            "--blockdev" => {
                // The children are written in read order, a local one as its file node.
                let Some(v) = value() else { continue };
                match v.get("driver").and_then(Value::as_str) {
                    Some("file") => {
                        targets.push(ReplicaTarget::Local(PathBuf::from(
                            v.get("filename")?.as_str()?,
                        )));
                    }
                    Some("nbd") => targets.push(parse_nbd_node(&v)?),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    Some(DaemonArgs {
        export: export?,
        targets,
        read_only,
    })
}

pub(super) fn read_cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Alive and not a zombie: if bicsi runs as PID 1 of a container, an exited daemon is re-parented
/// to us and lingers as a zombie that kill(0) still reports as existing.
///
/// A process is alive while any of its threads is: after SIGKILL the thread-group leader turns
/// zombie first while the others are still exiting, and they hold the shared file table, so
/// qemu's image locks (and FUSE's device) are released only when the last thread is gone. Read
/// as dead at the leader's zombie, a restart raced them ("Failed to get \"write\" lock").
pub(super) fn alive(pid: i32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        fs::read_to_string(t.path().join("stat"))
            .map(|stat| running(&stat))
            .unwrap_or(false)
    })
}

/// Whether a `/proc/.../stat` line shows a task that has not exited (neither zombie nor dead).
fn running(stat: &str) -> bool {
    // The state follows the last ')' (the command name may itself contain parentheses).
    match stat.rsplit_once(')') {
        Some((_, rest)) => !matches!(rest.trim_start().chars().next(), Some('Z' | 'X') | None),
        None => false,
    }
}

/// The live processes whose command line `ours` accepts: the pid file's first (the fast path),
/// else a scan of /proc, which also finds a daemon whose pid file was lost.
pub(super) fn find_processes<T>(
    pid_file: &Path,
    ours: impl Fn(&[String]) -> Option<T>,
) -> Vec<(i32, T)> {
    let check = |pid: i32| -> Option<T> {
        let args = ours(&read_cmdline(pid)?)?;
        alive(pid).then_some(args)
    };
    if let Some(pid) = fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        && let Some(args) = check(pid)
    {
        return vec![(pid, args)];
    }
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<(i32, T)> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, check(pid)?)))
        .collect();
    found.sort_by_key(|(pid, _)| *pid);
    found
}

/// The live daemons serving `paths.export` (a mirror engine, `mirror`, counts as one).
fn find_daemons(paths: &RunPaths) -> Vec<(i32, DaemonArgs)> {
    let mirrors = mirror::find(paths);
    if !mirrors.is_empty() {
        return mirrors;
    }
    find_processes(&paths.pid, |argv| {
        parse_args(argv).filter(|a| a.export == paths.export)
    })
}

fn export_mounted(paths: &RunPaths) -> OsResult<bool> {
    Ok(mount::lookup(&paths.export)?.is_some_and(|e| e.fstype.starts_with("fuse")))
}

/// Unmount the export, turning "busy" into the fix: a loop device still sits on it.
fn unmount_export(paths: &RunPaths) -> OsResult<()> {
    match mount::unmount_all(&paths.export) {
        Err(OsError::Busy(_)) => {
            let loops: Vec<String> = loopdev::attached()
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, file)| *file == paths.export)
                .map(|(dev, _)| dev.display().to_string())
                .collect();
            Err(OsError::Busy(format!(
                "cannot stop the engine in {}: its export {} is still in use{}; unmount the \
                 volume and detach its loop device first",
                paths.dir.display(),
                paths.export.display(),
                if loops.is_empty() {
                    String::new()
                } else {
                    format!(" by loop device {}", loops.join(", "))
                }
            )))
        }
        other => other,
    }
}

pub(super) fn wait_exit(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid) {
            // Reap it when we are its parent (bicsi as PID 1 or a subreaper), so stopped engines
            // do not pile up as zombies; ECHILD otherwise, which is fine. Only a verified engine
            // daemon gets here, never a child another thread is waiting for.
            let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, then SIGKILL after `timeout`, for a process proven to be one of our daemons.
pub(super) fn terminate(pid: i32, timeout: Duration, what: &str) -> OsResult<()> {
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    if wait_exit(pid, timeout) {
        return Ok(());
    }
    tracing::warn!(pid, "{what} ignored SIGTERM for {timeout:?}; killing it");
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    if !wait_exit(pid, Duration::from_secs(5)) {
        return Err(OsError::Timeout(format!(
            "{what} pid {pid} survives SIGKILL (stuck in the kernel?); check `cat \
             /proc/{pid}/stack`"
        )));
    }
    Ok(())
}

pub(super) fn read_log_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.seek(SeekFrom::Start(offset));
        let _ = f.take(64 * 1024).read_to_string(&mut text);
    }
    text.trim().to_string()
}

/// A `--daemonize`d daemon whose parent has exited (or was given up on).
pub(super) struct Spawned {
    /// The command line, for messages.
    pub display: String,
    /// Where this start's lines begin in the log.
    pub log_start: u64,
    /// The parent's exit status; None when it did not exit within the timeout (it was killed).
    pub status: Option<ExitStatus>,
    pub started: Instant,
    /// The log lines of a failed start as the engine host sent them; None: read the log file.
    pub log: Option<String>,
}

impl Spawned {
    /// This start's lines of the daemon's log.
    pub fn log_text(&self, log_path: &Path) -> String {
        match &self.log {
            Some(text) => text.clone(),
            None => read_log_from(log_path, self.log_start),
        }
    }
}

/// The command that runs `program args` with its output appended to `log_path` (after a
/// `bicsi: <banner>` line), its display form and where this start's lines begin in the log.
pub(super) fn daemonizing_command(
    program: &Path,
    args: &[String],
    log_path: &Path,
    banner: &str,
) -> OsResult<(Command, String, u64)> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let display = display_command(&cmd);
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| OsError::io(format!("opening {}", log_path.display()), e))?;
    let log_start = log.seek(SeekFrom::End(0)).unwrap_or(0);
    let _ = writeln!(log, "bicsi: {banner}: {display}");
    let log_err = log
        .try_clone()
        .map_err(|e| OsError::io(format!("opening {}", log_path.display()), e))?;
    // The daemon writes its start-up errors to the log file rather than to a pipe: the
    // daemonized child keeps the inherited descriptors open, so reading a pipe to EOF would
    // wait for the daemon to exit.
    cmd.env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    Ok((cmd, display, log_start))
}

/// Run `program args` in this process (see `daemonizing_command`) and wait for the daemonizing
/// parent to exit, which it does once the daemon is set up or has failed.
pub(super) fn spawn_daemonized(
    program: &Path,
    args: &[String],
    log_path: &Path,
    banner: &str,
    timeout: Duration,
) -> OsResult<Spawned> {
    let (mut cmd, display, log_start) = daemonizing_command(program, args, log_path, banner)?;
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| spawn_error(&cmd, e))?;
    let deadline = started + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Err(e) => {
                return Err(OsError::io(format!("waiting for {display}"), e));
            }
        }
    };
    Ok(Spawned {
        display,
        log_start,
        status,
        started,
        log: None,
    })
}

/// How long `daemonize_self` waits for the child to be ready.
const DAEMONIZE_TIMEOUT: Duration = Duration::from_secs(30);

/// The `--daemonize` of bicsi's own daemons (`engine-mirror`, `replica-server`): runs this
/// command again without the flag, in its own process group (so it outlives this process and
/// its session), and returns once the child wrote its pid to `pid_file` (its readiness signal),
/// or an error when it exited first or took longer than 30 s (then it is killed). `what` names
/// the daemon in errors.
pub fn daemonize_self(pid_file: &Path, what: &str) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let _ = fs::remove_file(pid_file);
    let argv: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--daemonize")
        .collect();
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(&argv)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()?;
    let deadline = Instant::now() + DAEMONIZE_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(std::io::Error::other(format!(
                "{what} exited with {status} before it was ready"
            )));
        }
        let pid = fs::read_to_string(pid_file).unwrap_or_default();
        if pid.trim() == child.id().to_string() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "{what} was not ready within {DAEMONIZE_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl QemuStorageDaemon {
    /// Start a daemon: forked from this process, or by the engine host when one is configured,
    /// so that it lives in the host's container.
    pub(super) fn spawn(
        &self,
        args: &[String],
        log_path: &Path,
        banner: &str,
    ) -> OsResult<Spawned> {
        match &self.host {
            Some(socket) => host::spawn(
                socket,
                host::QEMU,
                args,
                log_path,
                banner,
                self.start_timeout,
            ),
            None => spawn_daemonized(&self.program, args, log_path, banner, self.start_timeout),
        }
    }
}

impl QemuStorageDaemon {
    /// Terminate every daemon of `paths` and remove its export mount; run_dir stays.
    fn shut_down(&self, paths: &RunPaths) -> OsResult<()> {
        // Flush the volume through its export (qemu's FUSE export answers fsync with a flush of
        // its block node): what qcow2 keeps in memory (new clusters' table entries) is written
        // out while the daemon certainly runs, not only by a graceful exit that SIGKILL may cut.
        // Best effort: a dead export cannot be flushed and must still be stopped.
        if export_mounted(paths)? && !find_daemons(paths).is_empty() {
            if let Err(e) = File::open(&paths.export).and_then(|f| f.sync_all()) {
                tracing::warn!(export = %paths.export.display(), error = %e, "cannot flush the engine's export before stopping it");
            }
        }
        // Unmount first: a daemon can leave its FUSE mount behind when it quits (seen after a
        // graceful QMP quit), and an unmount refused because a loop device still uses the export
        // must stop us before the data path is cut under a mounted filesystem.
        unmount_export(paths)?;
        for (pid, _) in find_daemons(paths) {
            terminate(
                pid,
                self.stop_timeout,
                &format!("engine in {}", paths.dir.display()),
            )?;
        }
        // A daemon killed mid-way leaves its FUSE mount behind: clean it too.
        unmount_export(paths)
    }

    fn state(paths: &RunPaths, pid: i32, args: &DaemonArgs) -> EngineState {
        EngineState {
            pid,
            export_path: paths.export.clone(),
            qmp_socket: paths.qmp.clone(),
            replicas: args.local_replicas(),
            read_only: args.read_only,
        }
    }

    /// The live engine in `run_dir` and its command line.
    fn live(&self, run_dir: &Path) -> OsResult<Option<(RunPaths, i32, DaemonArgs)>> {
        if !run_dir.is_dir() {
            return Ok(None);
        }
        let paths = RunPaths::new(run_dir);
        let Some((pid, args)) = find_daemons(&paths).into_iter().next() else {
            return Ok(None);
        };
        if !export_mounted(&paths)? {
            return Ok(None);
        }
        Ok(Some((paths, pid, args)))
    }
}

/// What `start_volume` refuses for what the spec itself says: no replicas, one listed twice, a
/// local one that is relative, missing or not UTF-8, an NBD one without a host, a port or a
/// valid export name, and a run directory too long for the engine's socket. The fake engine
/// (`super::fake`) calls it too.
pub(crate) fn check_volume_spec(spec: &VolumeEngineSpec) -> OsResult<()> {
    let volume = &spec.volume_id;
    if spec.replicas.is_empty() {
        return Err(OsError::Unsupported(format!(
            "engine for volume {volume:?}: no replicas given; a volume needs at least one"
        )));
    }
    for (i, target) in spec.replicas.iter().enumerate() {
        if spec.replicas[..i].contains(target) {
            return Err(OsError::Unsupported(format!(
                "engine for volume {volume:?}: replica {target} is listed twice"
            )));
        }
        match target {
            ReplicaTarget::Local(r) => {
                if !r.is_absolute() {
                    return Err(OsError::Unsupported(format!(
                        "engine for volume {volume:?}: replica path {} must be absolute",
                        r.display()
                    )));
                }
                if !r.is_file() {
                    return Err(OsError::NotFound(format!(
                        "engine for volume {volume:?}: replica {} does not exist; create it \
                         first",
                        r.display()
                    )));
                }
                utf8_path(r)?;
            }
            ReplicaTarget::Nbd { host, port, export } => {
                if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
                    return Err(OsError::Unsupported(format!(
                        "engine for volume {volume:?}: replica {target}: {host:?} is not a \
                         host name or address"
                    )));
                }
                if *port == 0 {
                    return Err(OsError::Unsupported(format!(
                        "engine for volume {volume:?}: replica {target}: port 0; give the \
                         port export_replica returned"
                    )));
                }
                if export.is_empty() || export.len() > MAX_NBD_NAME {
                    return Err(OsError::Unsupported(format!(
                        "engine for volume {volume:?}: replica {target}: the export name must \
                         have 1 to {MAX_NBD_NAME} bytes"
                    )));
                }
            }
        }
    }
    let qmp = resolve_parent(&spec.run_dir).join("qmp.sock");
    if qmp.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(OsError::Unsupported(format!(
            "engine for volume {:?}: socket path {} is longer than {MAX_SOCKET_PATH} bytes, \
             the limit of unix sockets; use a shorter data directory",
            spec.volume_id,
            qmp.display()
        )));
    }
    Ok(())
}

/// Order-insensitive: the same set of children is the same engine; which one is read first only
/// matters for speed.
fn same_targets(a: &[ReplicaTarget], b: &[ReplicaTarget]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}

/// What `nbd-trace.log` says: the NBD children that completed more than one handshake, and the
/// number of failure events.
fn read_nbd_trace(path: &Path, targets: &[ReplicaTarget]) -> (Vec<ReplicaTarget>, u64) {
    let Ok(text) = fs::read(path) else {
        return (Vec::new(), 0);
    };
    let text = String::from_utf8_lossy(&text);
    let mut handshakes: std::collections::HashMap<&str, u32> = Default::default();
    let mut failures = 0;
    for line in text.lines() {
        // Lines read "<event> <message>", perhaps after a "pid@time:" prefix.
        if let Some(at) = line.find(NBD_TRACE_HANDSHAKE) {
            let rest = &line[at + NBD_TRACE_HANDSHAKE.len()..];
            if let Some(start) = rest.find("export '")
                && let Some(end) = rest.rfind('\'')
                && end >= start + "export '".len()
            {
                *handshakes
                    .entry(&rest[start + "export '".len()..end])
                    .or_default() += 1;
            }
        } else if NBD_TRACE_FAILURES.iter().any(|e| line.contains(e)) {
            failures += 1;
        }
    }
    let reconnected = targets
        .iter()
        .filter(|t| match t {
            ReplicaTarget::Nbd { export, .. } => {
                handshakes.get(export.as_str()).is_some_and(|n| *n > 1)
            }
            ReplicaTarget::Local(_) => false,
        })
        .cloned()
        .collect();
    (reconnected, failures)
}

impl QemuStorageDaemon {
    /// `start_volume`; `mirror`: served by bicsi's mirror engine whatever the children are,
    /// with this replica timeout (else the mirror engine serves only raw local children).
    fn start_engine(
        &self,
        spec: &VolumeEngineSpec,
        mirror: Option<Duration>,
    ) -> OsResult<EngineState> {
        check_volume_spec(spec)?;
        if mirror.is_some() {
            mirror::check_children(spec)?;
        }
        // With an engine host, make sure it answers before anything is created for the new
        // engine, so an unreachable host leaves nothing behind (a live engine needs no host).
        if let Some(socket) = &self.host
            && self.live(&spec.run_dir)?.is_none()
        {
            host::ping(socket)?;
        }
        fs::create_dir_all(&spec.run_dir).map_err(|e| {
            OsError::io(
                format!(
                    "creating run directory {} of volume {:?}",
                    spec.run_dir.display(),
                    spec.volume_id
                ),
                e,
            )
        })?;
        let paths = RunPaths::new(&spec.run_dir);
        if let Some((_, pid, args)) = self.live(&paths.dir)? {
            if same_targets(&args.targets, &spec.replicas) && args.read_only == spec.read_only {
                return Ok(Self::state(&paths, pid, &args));
            }
            let show = |t: &[ReplicaTarget]| {
                t.iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(OsError::Conflict(format!(
                "engine in {} already serves replicas [{}] (read_only={}) for another request \
                 (volume {:?}: replicas [{}], read_only={}); stop it first",
                paths.dir.display(),
                show(&args.targets),
                args.read_only,
                spec.volume_id,
                show(&spec.replicas),
                spec.read_only
            )));
        }
        // Leftovers of a dead or half-started engine: a stale mount, a daemon without export.
        self.shut_down(&paths)?;
        for stale in [&paths.pid, &paths.qmp, &paths.trace] {
            let _ = fs::remove_file(stale);
        }
        // Raw replica files, or a volume of the mirror engine: served by bicsi's own mirror
        // engine, not by the daemon.
        if let Some(timeout) = mirror.or_else(|| {
            mirror::serves(&spec.replicas)
                .then(|| Duration::from_secs(mirror::DEFAULT_REPLICA_TIMEOUT))
        }) {
            return mirror::start(self, spec, &paths, timeout);
        }
        // The FUSE export mounts over an existing regular file.
        File::create(&paths.export).map_err(|e| {
            OsError::io(
                format!("creating export file {}", paths.export.display()),
                e,
            )
        })?;

        let tls = self.nbd_tls.as_ref().filter(|_| {
            spec.replicas
                .iter()
                .any(|t| matches!(t, ReplicaTarget::Nbd { .. }))
        });
        if let Some(tls_dir) = tls {
            super::qemu_tls::link_dir(tls_dir, &paths.tls)?;
        }
        let mut args = build_args(spec, &paths, tls.is_some())?;
        // The second monitor, on a file: child failures are kept even while nobody listens.
        args.extend(events::prepare(&paths.dir, &spec.replicas)?);
        let spawned = self.spawn(
            &args,
            &paths.log,
            &format!("starting engine for volume {:?}", spec.volume_id),
        )?;
        let failure = |reason: String| -> OsError {
            // Best effort: leave nothing half-started behind; the log stays for a person.
            let _ = self.shut_down(&paths);
            let log = spawned.log_text(&paths.log);
            let hint = if log.contains("lock") {
                "another engine or qemu-img has a replica open; stop it first"
            } else if log.contains("fuse") || log.contains("FUSE") {
                "the FUSE export needs /dev/fuse (modprobe fuse; in a container, give it /dev/fuse \
                 and CAP_SYS_ADMIN)"
            } else if log.contains("\"nbd\"") || log.contains("export") {
                "a remote replica is not reachable or not exported: check that its node's replica \
                 server runs (export_replica) and that host:port is reachable from this node"
            } else {
                "see the log above"
            };
            command_failure(
                spawned.display.clone(),
                format!("{reason}; log {}:\n{log}", paths.log.display()),
                Some(hint),
            )
        };
        match spawned.status {
            None => {
                return Err(OsError::Timeout(
                    failure(format!(
                        "did not set up its export within {:?} (a remote replica that accepts \
                         the connection but never answers does this)",
                        self.start_timeout
                    ))
                    .to_string(),
                ));
            }
            Some(status) if !status.success() => {
                return Err(failure(format!("exited with {status}")));
            }
            Some(_) => {}
        }
        // --daemonize returns once the export is set up; the check guards against an export that
        // was set up and torn down again at once.
        let mount_deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(state) = self.status(&paths.dir)? {
                tracing::debug!(volume = %spec.volume_id, pid = state.pid,
                    elapsed_ms = spawned.started.elapsed().as_millis() as u64, "engine started");
                return Ok(state);
            }
            if Instant::now() >= mount_deadline {
                return Err(failure(
                    "started but its export never appeared as a mount".to_string(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Engine for QemuStorageDaemon {
    fn start(&self, spec: &EngineSpec) -> OsResult<EngineState> {
        self.start_volume(&VolumeEngineSpec::from(spec))
    }

    fn start_volume(&self, spec: &VolumeEngineSpec) -> OsResult<EngineState> {
        self.start_engine(spec, None)
    }

    fn start_mirror(
        &self,
        spec: &VolumeEngineSpec,
        replica_timeout: Duration,
    ) -> OsResult<EngineState> {
        self.start_engine(spec, Some(replica_timeout))
    }

    fn status(&self, run_dir: &Path) -> OsResult<Option<EngineState>> {
        Ok(self
            .live(run_dir)?
            .map(|(paths, pid, args)| Self::state(&paths, pid, &args)))
    }

    fn volume_status(&self, run_dir: &Path) -> OsResult<Option<VolumeEngineState>> {
        Ok(self.live(run_dir)?.map(|(paths, pid, args)| {
            let (reconnected, remote_errors) = read_nbd_trace(&paths.trace, &args.targets);
            VolumeEngineState {
                engine: Self::state(&paths, pid, &args),
                replicas: args.targets,
                reconnected,
                remote_errors,
            }
        }))
    }

    fn stop(&self, run_dir: &Path) -> OsResult<()> {
        if fs::symlink_metadata(run_dir).is_err() {
            return Ok(());
        }
        let paths = RunPaths::new(run_dir);
        self.shut_down(&paths)?;
        // remove_dir_all would descend into anything mounted below run_dir and delete its files:
        // refuse instead.
        if let Some(m) = mount::read_mountinfo()?
            .into_iter()
            .find(|m| m.mount_point.starts_with(&paths.dir))
        {
            return Err(OsError::Busy(format!(
                "not removing run directory {}: {} is mounted inside it; unmount it first",
                paths.dir.display(),
                m.mount_point.display()
            )));
        }
        match fs::remove_dir_all(&paths.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(OsError::io(
                format!("removing run directory {}", paths.dir.display()),
                e,
            )),
        }
    }

    fn nbd_tls(&self) -> Option<PathBuf> {
        self.nbd_tls.clone()
    }

    fn export_replica(
        &self,
        run_dir: &Path,
        host: &str,
        port: u16,
        export: &ReplicaExport,
    ) -> OsResult<u16> {
        // Raw replicas go to bicsi's server, qcow2 ones to qemu's; a run directory holds one.
        let raw = export.format == ImageFormat::Raw;
        let other = if raw {
            nbd::serving(run_dir)
        } else {
            replica_server::serving(run_dir)
        };
        if other {
            return Err(OsError::Conflict(server_kind_conflict(run_dir, export)));
        }
        if raw {
            replica_server::export_replica(self, run_dir, host, port, export)
        } else {
            nbd::export_replica(self, run_dir, host, port, export)
        }
    }

    fn unexport_replica(&self, run_dir: &Path, replica_id: &str) -> OsResult<()> {
        if replica_server::serving(run_dir) {
            return replica_server::unexport_replica(self, run_dir, replica_id, false);
        }
        nbd::unexport_replica(self, run_dir, replica_id, false)
    }

    fn unexport_replica_force(&self, run_dir: &Path, replica_id: &str) -> OsResult<()> {
        if replica_server::serving(run_dir) {
            return replica_server::unexport_replica(self, run_dir, replica_id, true);
        }
        nbd::unexport_replica(self, run_dir, replica_id, true)
    }

    fn backup_replica(&self, replica: &Path, target: &Path) -> OsResult<bool> {
        backup::backup_replica(replica, target)
    }

    fn engine_mounts(&self, replica: &Path) -> OsResult<Option<Vec<PathBuf>>> {
        backup::engine_mounts(replica)
    }

    fn replica_server_status(&self, run_dir: &Path) -> OsResult<Option<(u16, Vec<String>)>> {
        if replica_server::serving(run_dir) {
            return replica_server::replica_server_status(run_dir);
        }
        nbd::replica_server_status(self, run_dir)
    }
}

/// Why `export` cannot go to the server of `run_dir`: that one serves the other format.
pub(crate) fn server_kind_conflict(run_dir: &Path, export: &ReplicaExport) -> String {
    let (running, wanted) = match export.format {
        ImageFormat::Raw => (
            "qemu-storage-daemon's (qcow2 replicas)",
            "bicsi's replica server",
        ),
        ImageFormat::Qcow2 => ("bicsi's (raw replicas)", "qemu-storage-daemon"),
        ImageFormat::Cow => (
            "a replica server",
            "no replica server (a copy-on-write replica is read on its own node only)",
        ),
    };
    format!(
        "replica server in {} is {running}, and replica {:?} is a {} file, which {wanted} \
         serves; give each server a run directory of its own (raw replicas: --raw-nbd-listen's)",
        run_dir.display(),
        export.replica_id,
        export.format
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::testutil::{Cleanup, sh};
    use crate::os::{ImageFormat, ImageTool, Os};

    fn spec(dir: &Path, replicas: &[PathBuf], read_only: bool) -> EngineSpec {
        EngineSpec {
            volume_id: "pvc-test".into(),
            replicas: replicas.to_vec(),
            run_dir: dir.join("run"),
            read_only,
        }
    }

    #[test]
    fn a_task_state_reads_as_running_unless_zombie_or_dead() {
        for (stat, want) in [
            ("12 (qemu-storage-d) S 1 12", true),
            ("12 (a) (b)) R 1 12", true),
            ("12 (qemu) Z 1 12", false),
            ("12 (qemu) X 1 12", false),
            ("12 (qemu)", false),
            ("garbage", false),
        ] {
            assert_eq!(running(stat), want, "{stat:?}");
        }
    }

    /// A process whose leader has exited while another thread still runs (as after SIGKILL,
    /// the leader first) is alive: its threads still hold its files and their locks.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_process_is_alive_while_a_thread_outlives_its_zombie_leader() {
        // The main thread leaves by the raw exit(2) (60 on x86_64), not exit_group: the leader
        // turns zombie, the other thread sleeps on for a second.
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import ctypes, threading, time\n\
                 threading.Thread(target=lambda: time.sleep(1)).start()\n\
                 ctypes.CDLL(None).syscall(60, 0)",
            ])
            .spawn()
            .expect("python3 runs");
        let pid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(5);
        let leader_zombie =
            || fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !running(&s));
        while !leader_zombie() {
            assert!(
                Instant::now() < deadline,
                "the leader of {pid} never exited"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(alive(pid), "a thread of {pid} still runs");
        assert!(
            wait_exit(pid, Duration::from_secs(5)),
            "{pid} ends with its thread"
        );
        let _ = child.wait();
    }

    #[test]
    fn args_round_trip_and_escape() {
        let paths = RunPaths::new(Path::new("/var/lib/bi,csi/run/vol"));
        let s = EngineSpec {
            volume_id: "v".into(),
            replicas: vec!["/d0/r,0.qcow2".into(), "/d1/r 1.qcow2".into()],
            run_dir: "/var/lib/bi,csi/run/vol".into(),
            read_only: false,
        };
        let mut argv = vec!["/usr/bin/qemu-storage-daemon".to_string()];
        argv.extend(build_args(&VolumeEngineSpec::from(&s), &paths, false).unwrap());
        assert!(argv.contains(&"--daemonize".to_string()));
        assert!(
            argv.contains(
                &"socket,id=qmp0,path=/var/lib/bi,,csi/run/vol/qmp.sock,server=on,wait=off"
                    .to_string()
            ),
            "{argv:?}"
        );
        let quorum = argv
            .iter()
            .find(|a| a.contains("quorum"))
            .expect("quorum node");
        let q: Value = serde_json::from_str(quorum).unwrap();
        assert_eq!(q["vote-threshold"], 1);
        assert_eq!(q["read-pattern"], "fifo");
        assert_eq!(q["children"], json!(["replica0", "replica1"]));
        assert_eq!(
            parse_args(&argv),
            Some(DaemonArgs {
                export: "/var/lib/bi,csi/run/vol/export".into(),
                targets: s
                    .replicas
                    .iter()
                    .cloned()
                    .map(ReplicaTarget::Local)
                    .collect(),
                read_only: false
            })
        );

        // One replica: the qcow2 node is exported directly; read-only all the way down.
        let one = EngineSpec {
            replicas: vec!["/d0/r.qcow2".into()],
            read_only: true,
            ..s
        };
        let mut argv = vec!["qemu-storage-daemon".to_string()];
        argv.extend(build_args(&VolumeEngineSpec::from(&one), &paths, false).unwrap());
        assert!(!argv.iter().any(|a| a.contains("quorum")));
        let export = argv.iter().find(|a| a.contains("\"fuse\"")).unwrap();
        let e: Value = serde_json::from_str(export).unwrap();
        assert_eq!(
            (e["node-name"].as_str(), e["writable"].as_bool()),
            (Some("replica0"), Some(false))
        );
        assert!(parse_args(&argv).unwrap().read_only);
        assert_eq!(
            parse_args(&["/bin/sleep".to_string(), "1".to_string()]),
            None
        );
    }

    #[test]
    fn nbd_children_round_trip_and_their_trace_is_read() {
        let paths = RunPaths::new(Path::new("/run/bi,csi/vol"));
        let remote = |port, export: &str| ReplicaTarget::Nbd {
            host: "10.0.0.2".into(),
            port,
            export: export.into(),
        };
        let spec = VolumeEngineSpec {
            volume_id: "v".into(),
            replicas: vec![
                ReplicaTarget::Local("/d/r0.qcow2".into()),
                remote(10809, "v-r1"),
                remote(10810, "v-r2"),
            ],
            run_dir: "/run/bi,csi/vol".into(),
            read_only: false,
        };
        let mut argv = vec!["qemu-storage-daemon".to_string()];
        argv.extend(build_args(&spec, &paths, false).unwrap());
        // The trace comes before the block nodes, so the first handshakes are recorded.
        assert_eq!(argv[1], "--trace");
        assert_eq!(
            argv[2],
            "enable=nbd_client_handshake_success,file=/run/bi,,csi/vol/nbd-trace.log"
        );
        let node: Value = serde_json::from_str(
            argv.iter()
                .find(|a| a.contains("\"nbd\""))
                .expect("an nbd node"),
        )
        .unwrap();
        assert_eq!(node["server"]["port"], "10809");
        assert_eq!(node["node-name"], "replica1");
        let parsed = parse_args(&argv).unwrap();
        assert_eq!(parsed.targets, spec.replicas);
        assert_eq!(parsed.local_replicas(), vec![PathBuf::from("/d/r0.qcow2")]);
        assert!(!argv.iter().any(|a| a.contains("tls")), "{argv:?}");
        // With the node's --tls-dir: the client credentials first, each NBD child names them
        // and checks the server for the node role; read back as the same targets.
        let mut tls = vec!["qemu-storage-daemon".to_string()];
        tls.extend(build_args(&spec, &paths, true).unwrap());
        assert_eq!(
            tls[1..3],
            [
                "--object",
                "tls-creds-x509,id=bicsi-nbd-tls,endpoint=client,dir=/run/bi,,csi/vol/tls"
            ]
        );
        let children: Vec<Value> = tls
            .iter()
            .filter(|a| a.contains("\"nbd\""))
            .map(|a| serde_json::from_str(a).unwrap())
            .collect();
        assert_eq!(children.len(), 2);
        for c in &children {
            assert_eq!(c["tls-creds"], "bicsi-nbd-tls");
            assert_eq!(c["tls-hostname"], "bicsi-node");
        }
        assert_eq!(parse_args(&tls).unwrap().targets, spec.replicas);
        // Local only: no trace, and no TLS whatever the node has.
        let local = VolumeEngineSpec {
            replicas: spec.replicas[..1].to_vec(),
            ..spec.clone()
        };
        assert!(
            !build_args(&local, &paths, false)
                .unwrap()
                .contains(&"--trace".to_string())
        );
        assert!(
            !build_args(&local, &paths, true)
                .unwrap()
                .iter()
                .any(|a| a.contains("tls"))
        );

        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("nbd-trace.log");
        assert_eq!(read_nbd_trace(&trace, &spec.replicas), (vec![], 0));
        fs::write(
            &trace,
            "nbd_client_handshake_success export 'v-r1'\n\
             nbd_client_handshake_success export 'v-r2'\n\
             nbd_co_request_fail Request failed { .from = 1, .len = 2, .handle = 1, .flags = \
             0x0, .type = 1 (write) } ret = -5, err: Connection closed\n\
             123@1700000000.000001:nbd_client_handshake_success export 'v-r2'\n",
        )
        .unwrap();
        assert_eq!(
            read_nbd_trace(&trace, &spec.replicas),
            (vec![remote(10810, "v-r2")], 1)
        );
    }

    #[test]
    fn start_validates_the_spec() {
        let dir = tempfile::tempdir().unwrap();
        let e = QemuStorageDaemon::new();
        let err = e.start(&spec(dir.path(), &[], false)).unwrap_err();
        assert!(err.to_string().contains("at least one"), "{err}");
        let err = e
            .start(&spec(dir.path(), &["rel.qcow2".into()], false))
            .unwrap_err();
        assert!(matches!(err, OsError::Unsupported(_)), "{err}");
        let missing = dir.path().join("missing.qcow2");
        let err = e.start(&spec(dir.path(), &[missing], false)).unwrap_err();
        assert!(matches!(err, OsError::NotFound(_)), "{err}");
        let r = dir.path().join("r.qcow2");
        fs::write(&r, b"").unwrap();
        let err = e
            .start(&spec(dir.path(), &[r.clone(), r.clone()], false))
            .unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
        let long = dir.path().join("x".repeat(120));
        let s = EngineSpec {
            run_dir: long.clone(),
            ..spec(dir.path(), &[r], false)
        };
        let err = e.start(&s).unwrap_err();
        assert!(err.to_string().contains("shorter data directory"), "{err}");
        assert!(!long.exists(), "a refused start creates nothing");
        // Nothing runs: status is None and stop is a no-op, twice.
        assert!(e.status(&dir.path().join("run")).unwrap().is_none());
        e.stop(&dir.path().join("never-started")).unwrap();
        e.stop(&dir.path().join("never-started")).unwrap();
    }

    /// CAP_SYS_RESOURCE (bit 24 of CapEff), which ext4's online resize needs.
    fn has_cap_sys_resource() -> bool {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .unwrap()
            .trim();
        u64::from_str_radix(hex, 16).unwrap() & (1 << 24) != 0
    }

    fn replicas(dir: &Path, n: usize, size: u64) -> Vec<PathBuf> {
        let images = crate::os::image::QemuImg::new();
        (0..n)
            .map(|i| {
                let disk = dir.join(format!("disk{i}"));
                fs::create_dir_all(&disk).unwrap();
                let r = disk.join("replica.qcow2");
                images.create_replica(&r, size, None).unwrap();
                r
            })
            .collect()
    }

    /// Nothing of an engine is left: no process, no mount under run_dir, no loop device on it.
    fn assert_gone(run_dir: &Path, pid: i32) {
        assert!(!alive(pid), "engine pid {pid} still alive");
        let paths = RunPaths::new(run_dir);
        assert!(
            !mount::read_mountinfo()
                .unwrap()
                .iter()
                .any(|m| m.mount_point.starts_with(&paths.dir)),
            "a mount is left under {}",
            paths.dir.display()
        );
        assert!(
            !loopdev::attached()
                .unwrap()
                .iter()
                .any(|(_, f)| f.starts_with(&paths.dir)),
            "a loop device is left on {}",
            paths.dir.display()
        );
        assert!(!run_dir.exists(), "{} still exists", run_dir.display());
    }

    /// One 64 KiB block of the live-copy test: its index and the pass that wrote it, repeated.
    fn stamp(index: u32, pass: u32) -> Vec<u8> {
        let mut unit = index.to_le_bytes().to_vec();
        unit.extend(pass.to_le_bytes());
        unit.repeat(LIVE_BLOCK / unit.len())
    }

    const LIVE_BLOCK: usize = 64 << 10;
    const LIVE_BLOCKS: u32 = 256;

    /// The order the writer visits blocks in: a fixed permutation that is not monotonic, so a
    /// copy that read the blocks one after another while they were written would not match any
    /// one instant of the writer (97 is odd, hence a permutation of 0..256).
    fn live_order(k: u32) -> u32 {
        (k * 97 + 13) % LIVE_BLOCKS
    }

    /// A live copy of a replica taken while a writer keeps overwriting the volume through the
    /// engine's export is the volume at one instant: every block the writer had finished before
    /// that instant, none it wrote after, and `qemu-img check` finds the copy clean. The writer
    /// passes over every block again and again in a fixed order, stamping each with its pass,
    /// so the instants it goes through are known: after `n` writes, the first `n % 256` blocks
    /// of the order hold pass `n / 256 + 1` and the others pass `n / 256`. Several copies in a
    /// row, because with qemu 10.0 a job left to finalize itself wedged the engine within a
    /// few of them (see `backup.rs`).
    #[test]
    fn real_live_copy_under_writes_is_one_instant_of_the_volume() {
        if !crate::os::root_or_skip("real_live_copy_under_writes_is_one_instant_of_the_volume") {
            return;
        }
        use std::os::unix::fs::FileExt;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let os = Os::real();
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let size = LIVE_BLOCKS as u64 * LIVE_BLOCK as u64;
        let reps = replicas(dir.path(), 2, size);
        let s = spec(dir.path(), &reps, false);
        cleanup.engine(&s.run_dir);
        // At rest, no engine has the replica: the caller copies the file itself.
        let idle = dir.path().join("idle.qcow2");
        os.images.create_replica(&idle, size, None).unwrap();
        assert!(!os.engine.backup_replica(&reps[0], &idle).unwrap());

        let state = os.engine.start(&s).unwrap();
        // Dropped before `cleanup`: if a copy wedged the engine, the writer is stuck in the
        // export and the engine cannot be stopped; killing the daemon fails the writer's request
        // and lets cleanup unmount the export, so no wedged daemon outlives the test.
        struct KillOnPanic(i32);
        impl Drop for KillOnPanic {
            fn drop(&mut self) {
                if std::thread::panicking() && kill(Pid::from_raw(self.0), Signal::SIGKILL).is_ok()
                {
                    wait_exit(self.0, Duration::from_secs(5));
                }
            }
        }
        let _kill = KillOnPanic(state.pid);
        let export = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&state.export_path)
            .unwrap();
        // Pass 0 everywhere, so every block is the replica's own cluster that the copy holds.
        for i in 0..LIVE_BLOCKS {
            export
                .write_all_at(&stamp(i, 0), i as u64 * LIVE_BLOCK as u64)
                .unwrap();
        }
        export.sync_all().unwrap();
        // A disk without room for the replica's 16 MiB is refused before any job starts, with
        // the fix in the message (a job that ran out of space could wedge the engine).
        let small = dir.path().join("small");
        fs::create_dir(&small).unwrap();
        sh(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(&small));
        cleanup.mount(&small);
        let cramped = small.join("copy.qcow2");
        os.images.create_replica(&cramped, size, None).unwrap();
        let err = os.engine.backup_replica(&reps[0], &cramped).unwrap_err();
        assert!(matches!(err, OsError::NoSpace(_)), "{err}");
        assert!(err.to_string().contains("free space on that disk"), "{err}");
        let check = sh(Command::new("qemu-img").arg("check").arg(&cramped));
        assert!(check.contains("No errors were found"), "{check}");
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let writer = {
            let (stop, written) = (stop.clone(), written.clone());
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let block = live_order((n % LIVE_BLOCKS as u64) as u32);
                    let pass = (n / LIVE_BLOCKS as u64 + 1) as u32;
                    // Without a writeback cache every write is a FUSE request: once pwrite
                    // returns, qemu has the data.
                    export.write_all_at(&stamp(block, pass), block as u64 * LIVE_BLOCK as u64)?;
                    n += 1;
                    written.store(n, Ordering::SeqCst);
                }
                Ok(())
            })
        };
        for round in 0..6 {
            let copy = dir.path().join(format!("copy{round}.qcow2"));
            os.images.create_replica(&copy, size, None).unwrap();
            // Let the writer get going (and past the previous copy).
            let from = written.load(Ordering::SeqCst);
            while written.load(Ordering::SeqCst) < from + 64 && !writer.is_finished() {
                std::thread::sleep(Duration::from_millis(1));
            }
            let before = written.load(Ordering::SeqCst);
            let t = Instant::now();
            let live = os.engine.backup_replica(&reps[0], &copy);
            let after = written.load(Ordering::SeqCst);
            assert!(live.as_ref().is_ok_and(|l| *l), "round {round}: {live:?}");
            eprintln!(
                "live copy {round}: {:?}, writes {before}..{after}",
                t.elapsed()
            );
            let check = sh(Command::new("qemu-img").arg("check").arg(&copy));
            assert!(check.contains("No errors were found"), "{check}");
            let raw = dir.path().join(format!("copy{round}.raw"));
            sh(Command::new("qemu-img")
                .args(["convert", "-O", "raw"])
                .arg(&copy)
                .arg(&raw));
            let bytes = fs::read(&raw).unwrap();
            let pass_of = |i: u32| -> u32 {
                let b = &bytes[i as usize * LIVE_BLOCK..(i as usize + 1) * LIVE_BLOCK];
                let pass = u32::from_le_bytes(b[4..8].try_into().unwrap());
                assert_eq!(b, stamp(i, pass), "round {round}: block {i} is torn");
                pass
            };
            // The instant: the number of writes n that gives exactly these passes.
            let base = (0..LIVE_BLOCKS).map(pass_of).min().unwrap();
            let ahead = (0..LIVE_BLOCKS)
                .take_while(|k| pass_of(live_order(*k)) == base + 1)
                .count() as u32;
            for k in 0..LIVE_BLOCKS {
                let want = if k < ahead { base + 1 } else { base };
                assert_eq!(
                    pass_of(live_order(k)),
                    want,
                    "round {round}: block {} is from another instant than the writer's first \
                     {ahead} blocks of pass {}",
                    live_order(k),
                    base + 1
                );
            }
            let n = base as u64 * LIVE_BLOCKS as u64 + ahead as u64;
            // Everything written before the call is in the copy; nothing written after it.
            assert!(
                (before..=after).contains(&n),
                "round {round}: the copy is the volume after {n} writes, not between {before} \
                 and {after}"
            );
            fs::remove_file(&raw).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap().unwrap();
        os.engine.stop(&s.run_dir).unwrap();
        assert_gone(&s.run_dir, state.pid);
    }

    #[test]
    fn real_two_replicas_write_stop_readopt_read_back() {
        if !crate::os::root_or_skip("real_two_replicas_write_stop_readopt_read_back") {
            return;
        }
        let os = Os::real();
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let reps = replicas(dir.path(), 2, 64 << 20);
        let s = spec(dir.path(), &reps, false);
        cleanup.engine(&s.run_dir);
        let mnt = dir.path().join("mnt");
        cleanup.mount(&mnt);

        let t = Instant::now();
        let state = os.engine.start(&s).unwrap();
        eprintln!("engine start (2 replicas): {:?}", t.elapsed());
        assert_eq!(state.replicas, reps);
        assert!(!state.read_only);
        assert_eq!(os.engine.status(&s.run_dir).unwrap(), Some(state.clone()));
        // Idempotent, also with the replicas in another order.
        let mut reordered = s.clone();
        reordered.replicas.reverse();
        assert_eq!(os.engine.start(&reordered).unwrap().pid, state.pid);
        // Another replica set in the same run_dir is refused.
        let err = os
            .engine
            .start(&spec(dir.path(), &reps[..1], false))
            .unwrap_err();
        assert!(matches!(err, OsError::Conflict(_)), "{err}");
        // Replicas cannot be resized while the engine has them open; the error says why.
        let err = os.images.resize(&reps[0], 128 << 20).unwrap_err();
        assert!(err.to_string().contains("stop the engine"), "{err}");
        assert_eq!(os.images.info(&reps[0]).unwrap().virtual_size, 64 << 20);

        let dev = os.loops.attach(&state.export_path).unwrap();
        cleanup.loop_file(&state.export_path);
        // The export's read-ahead was raised for the loop device's buffered reads.
        let knob = crate::os::loopdev::fuse_read_ahead_path(&state.export_path)
            .expect("the export is a FUSE file");
        let kb: u64 = fs::read_to_string(&knob).unwrap().trim().parse().unwrap();
        assert!(
            kb >= crate::os::loopdev::FUSE_READ_AHEAD_KB,
            "{}: {kb}",
            knob.display()
        );
        assert_eq!(os.fs.device_size(&dev).unwrap(), 64 << 20);
        assert_eq!(os.fs.probe(&dev).unwrap(), None);
        os.fs.mkfs(&dev, "ext4").unwrap();
        assert_eq!(os.fs.probe(&dev).unwrap().as_deref(), Some("ext4"));
        os.mounts.mount(&dev, &mnt, "ext4", &[]).unwrap();
        os.mounts.mount(&dev, &mnt, "ext4", &[]).unwrap(); // idempotent
        assert_eq!(os.mounts.mount_info(&mnt).unwrap().unwrap().fstype, "ext4");
        fs::write(mnt.join("hello.txt"), b"hello through quorum\n").unwrap();

        // Busy while the volume is in use, and the message says what to do.
        let err = os.engine.stop(&s.run_dir).unwrap_err();
        assert!(matches!(err, OsError::Busy(_)), "{err}");
        assert!(
            err.to_string().contains(&dev.display().to_string()),
            "{err}"
        );
        assert!(
            os.engine.status(&s.run_dir).unwrap().is_some(),
            "a refused stop changes nothing"
        );

        os.mounts.unmount(&mnt).unwrap();
        os.loops.detach(&dev).unwrap();
        let t = Instant::now();
        os.engine.stop(&s.run_dir).unwrap();
        eprintln!("engine stop (2 replicas): {:?}", t.elapsed());
        os.engine.stop(&s.run_dir).unwrap();
        assert_gone(&s.run_dir, state.pid);
        assert_eq!(os.engine.status(&s.run_dir).unwrap(), None);
        // Every write reached both replicas.
        let cmp = sh(Command::new("qemu-img").arg("compare").args(&reps));
        assert!(cmp.contains("identical"), "{cmp}");
        // And the daemon closed them cleanly: no leaked clusters, no corruption.
        for r in &reps {
            let check = sh(Command::new("qemu-img").arg("check").arg(r));
            assert!(check.contains("No errors were found"), "{check}");
        }

        // Start again; a fresh engine object (as after a bicsi restart) re-adopts it.
        let state2 = os.engine.start(&s).unwrap();
        assert_ne!(state2.pid, state.pid);
        let restarted = QemuStorageDaemon::new();
        assert_eq!(restarted.status(&s.run_dir).unwrap(), Some(state2.clone()));
        assert_eq!(restarted.start(&s).unwrap(), state2);
        let dev = os.loops.attach(&state2.export_path).unwrap();
        cleanup.loop_file(&state2.export_path);
        assert_eq!(
            os.loops.find(&state2.export_path).unwrap(),
            Some(dev.clone())
        );
        assert_eq!(os.fs.probe(&dev).unwrap().as_deref(), Some("ext4"));
        os.mounts.mount(&dev, &mnt, "ext4", &[]).unwrap();
        assert_eq!(
            fs::read(mnt.join("hello.txt")).unwrap(),
            b"hello through quorum\n"
        );
        os.mounts.unmount(&mnt).unwrap();
        os.loops.detach(&dev).unwrap();
        os.engine.stop(&s.run_dir).unwrap();
        assert_gone(&s.run_dir, state2.pid);
    }

    #[test]
    fn real_read_only_engine_refuses_writes() {
        if !crate::os::root_or_skip("real_read_only_engine_refuses_writes") {
            return;
        }
        let os = Os::real();
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let reps = replicas(dir.path(), 2, 32 << 20);
        let mnt = dir.path().join("mnt");
        cleanup.mount(&mnt);
        let rw = spec(dir.path(), &reps, false);
        cleanup.engine(&rw.run_dir);

        // Put a file on the volume first.
        let state = os.engine.start(&rw).unwrap();
        let dev = os.loops.attach(&state.export_path).unwrap();
        cleanup.loop_file(&state.export_path);
        os.fs.mkfs(&dev, "ext4").unwrap();
        os.mounts.mount(&dev, &mnt, "ext4", &[]).unwrap();
        fs::write(mnt.join("f"), b"kept").unwrap();
        os.mounts.unmount(&mnt).unwrap();
        os.loops.detach(&dev).unwrap();
        // Read-write → read-only in the same run_dir is a different engine: refused while live.
        assert!(matches!(
            os.engine.start(&spec(dir.path(), &reps, true)),
            Err(OsError::Conflict(_))
        ));
        os.engine.stop(&rw.run_dir).unwrap();

        let ro = spec(dir.path(), &reps, true);
        let state = os.engine.start(&ro).unwrap();
        assert!(state.read_only);
        let dev = os.loops.attach(&state.export_path).unwrap();
        cleanup.loop_file(&state.export_path);
        // The device itself is read-only: every write is refused.
        let err = crate::os::loopdev::tests::write_block(&dev).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        // Writing the export file directly (what a careless loop device would do) fails too.
        let mut export = fs::OpenOptions::new()
            .write(true)
            .open(&state.export_path)
            .unwrap();
        assert!(
            export
                .write_all(&[0u8; 4096])
                .and_then(|_| export.sync_all())
                .is_err()
        );
        drop(export);
        // mkfs refuses (it holds ext4), and the filesystem mounts read-only with the data there.
        assert!(matches!(
            os.fs.mkfs(&dev, "ext4"),
            Err(OsError::Conflict(_))
        ));
        os.mounts
            .mount(&dev, &mnt, "ext4", &["ro".to_string()])
            .unwrap();
        assert_eq!(fs::read(mnt.join("f")).unwrap(), b"kept");
        let err = fs::write(mnt.join("g"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        os.mounts.unmount(&mnt).unwrap();
        os.loops.detach(&dev).unwrap();
        os.engine.stop(&ro.run_dir).unwrap();
        assert_gone(&ro.run_dir, state.pid);
    }

    #[test]
    fn real_xfs_grows_after_offline_resize() {
        if !crate::os::root_or_skip("real_xfs_grows_after_offline_resize") {
            return;
        }
        let os = Os::real();
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        // xfs needs more than 300 MiB; qcow2 keeps this sparse.
        let reps = replicas(dir.path(), 2, 400 << 20);
        let s = spec(dir.path(), &reps, false);
        cleanup.engine(&s.run_dir);
        let mnt = dir.path().join("mnt");
        cleanup.mount(&mnt);

        let state = os.engine.start(&s).unwrap();
        let dev = os.loops.attach(&state.export_path).unwrap();
        cleanup.loop_file(&state.export_path);
        os.fs.mkfs(&dev, "xfs").unwrap();
        assert_eq!(os.fs.probe(&dev).unwrap().as_deref(), Some("xfs"));
        os.mounts
            .mount(&dev, &mnt, "xfs", &["noatime".to_string()])
            .unwrap();
        let info = os.mounts.mount_info(&mnt).unwrap().unwrap();
        assert_eq!(info.fstype, "xfs");
        assert!(info.options.contains(&"noatime".to_string()), "{info:?}");
        fs::write(mnt.join("data"), vec![42u8; 1 << 20]).unwrap();
        let before = os.fs.stats(&mnt).unwrap();
        os.mounts.unmount(&mnt).unwrap();
        os.loops.detach(&dev).unwrap();
        os.engine.stop(&s.run_dir).unwrap();

        // Offline resize of every replica, then the engine comes back with the bigger volume.
        for r in &reps {
            os.images.resize(r, 800 << 20).unwrap();
        }
        let state = os.engine.start(&s).unwrap();
        let dev = os.loops.attach(&state.export_path).unwrap();
        cleanup.loop_file(&state.export_path);
        os.loops.refresh_size(&dev).unwrap();
        assert_eq!(os.fs.device_size(&dev).unwrap(), 800 << 20);
        os.mounts.mount(&dev, &mnt, "xfs", &[]).unwrap();
        os.fs.grow(&dev, &mnt, "xfs").unwrap();
        os.fs.grow(&dev, &mnt, "xfs").unwrap(); // nothing left to grow: still Ok
        let after = os.fs.stats(&mnt).unwrap();
        eprintln!(
            "xfs total before {} after {}",
            before.total_bytes, after.total_bytes
        );
        assert!(
            after.total_bytes > before.total_bytes + (300 << 20),
            "{before:?} {after:?}"
        );
        assert!(after.used_bytes >= 1 << 20);
        assert_eq!(fs::read(mnt.join("data")).unwrap(), vec![42u8; 1 << 20]);
        os.mounts.unmount(&mnt).unwrap();
        os.loops.detach(&dev).unwrap();
        os.engine.stop(&s.run_dir).unwrap();
        assert_gone(&s.run_dir, state.pid);
    }

    /// The architecture's path for an image that carries a filesystem: a raw backing image with
    /// ext4 under a larger qcow2 replica is probed as ext4 (never formatted) and grown, online
    /// where the kernel allows it, else offline before mounting.
    #[test]
    fn real_backing_image_filesystem_is_grown_not_formatted() {
        if !crate::os::root_or_skip("real_backing_image_filesystem_is_grown_not_formatted") {
            return;
        }
        let os = Os::real();
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let backing = dir.path().join("backing");
        File::create(&backing).unwrap().set_len(32 << 20).unwrap();
        os.fs.mkfs(&backing, "ext4").unwrap();
        let replica = dir.path().join("replica.qcow2");
        os.images
            .create_replica(&replica, 96 << 20, Some((&backing, ImageFormat::Raw)))
            .unwrap();
        let s = spec(dir.path(), std::slice::from_ref(&replica), false);
        cleanup.engine(&s.run_dir);
        let mnt = dir.path().join("mnt");
        cleanup.mount(&mnt);
        let state = os.engine.start(&s).unwrap();
        let dev = os.loops.attach(&state.export_path).unwrap();
        cleanup.loop_file(&state.export_path);
        assert_eq!(os.fs.device_size(&dev).unwrap(), 96 << 20);
        assert_eq!(os.fs.probe(&dev).unwrap().as_deref(), Some("ext4"));
        assert!(matches!(
            os.fs.mkfs(&dev, "ext4"),
            Err(OsError::Conflict(_))
        ));
        os.mounts.mount(&dev, &mnt, "ext4", &[]).unwrap();
        let before = os.fs.stats(&mnt).unwrap();
        assert!(before.total_bytes <= 32 << 20, "{before:?}");
        // Online: works where the kernel grants CAP_SYS_RESOURCE; elsewhere the error says so.
        match os.fs.grow(&dev, &mnt, "ext4") {
            Ok(()) => {
                assert!(has_cap_sys_resource());
                os.fs.grow(&dev, &mnt, "ext4").unwrap();
            }
            Err(e) => {
                assert!(!has_cap_sys_resource(), "{e}");
                assert!(e.to_string().contains("CAP_SYS_RESOURCE"), "{e}");
                // Offline, before mounting: what the domain does when it stages the volume.
                os.mounts.unmount(&mnt).unwrap();
                assert!(matches!(
                    os.fs.grow(&dev, &mnt, "xfs"),
                    Err(OsError::Unsupported(_))
                ));
                os.fs.grow(&dev, &mnt, "ext4").unwrap();
                os.fs.grow(&dev, &mnt, "ext4").unwrap();
                os.mounts.mount(&dev, &mnt, "ext4", &[]).unwrap();
            }
        }
        let after = os.fs.stats(&mnt).unwrap();
        eprintln!(
            "ext4 total before {} after {}",
            before.total_bytes, after.total_bytes
        );
        assert!(
            after.total_bytes > before.total_bytes + (50 << 20),
            "{before:?} {after:?}"
        );
        fs::write(mnt.join("new"), b"on the overlay").unwrap();
        os.mounts.unmount(&mnt).unwrap();
        os.loops.detach(&dev).unwrap();
        os.engine.stop(&s.run_dir).unwrap();
        assert_gone(&s.run_dir, state.pid);
        // The shared backing file was never written.
        assert_eq!(os.fs.probe(&backing).unwrap().as_deref(), Some("ext4"));
        assert_eq!(fs::metadata(&backing).unwrap().len(), 32 << 20);
    }

    #[test]
    fn real_crashed_engine_is_cleaned_and_restarted() {
        if !crate::os::root_or_skip("real_crashed_engine_is_cleaned_and_restarted") {
            return;
        }
        let os = Os::real();
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let reps = replicas(dir.path(), 1, 16 << 20);
        let s = spec(dir.path(), &reps, false);
        cleanup.engine(&s.run_dir);
        let state = os.engine.start(&s).unwrap();
        kill(Pid::from_raw(state.pid), Signal::SIGKILL).unwrap();
        assert!(wait_exit(state.pid, Duration::from_secs(5)));
        // The dead daemon's FUSE mount stays behind; status does not report it as live.
        assert!(export_mounted(&RunPaths::new(&s.run_dir)).unwrap());
        assert_eq!(os.engine.status(&s.run_dir).unwrap(), None);
        // start() clears the leftovers and starts afresh.
        let state2 = os.engine.start(&s).unwrap();
        assert_ne!(state2.pid, state.pid);
        kill(Pid::from_raw(state2.pid), Signal::SIGKILL).unwrap();
        assert!(wait_exit(state2.pid, Duration::from_secs(5)));
        // stop() cleans a stale mount too.
        os.engine.stop(&s.run_dir).unwrap();
        assert_gone(&s.run_dir, state2.pid);
    }

    #[test]
    fn real_start_failure_shows_the_log() {
        if !crate::os::root_or_skip("real_start_failure_shows_the_log") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let bogus = dir.path().join("not-qcow2");
        fs::write(&bogus, vec![1u8; 1 << 20]).unwrap();
        let s = spec(dir.path(), &[bogus], false);
        cleanup.engine(&s.run_dir);
        let e = QemuStorageDaemon::new();
        let err = e.start(&s).unwrap_err();
        assert!(matches!(err, OsError::Command { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("qcow2"), "{text}");
        assert!(text.contains("qsd.log"), "{text}");
        assert_eq!(e.status(&s.run_dir).unwrap(), None);
        assert!(!export_mounted(&RunPaths::new(&s.run_dir)).unwrap());
        e.stop(&s.run_dir).unwrap();
        assert!(!s.run_dir.exists());
    }
}
