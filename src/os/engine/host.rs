//! The engine host (`bicsi engine`): a small long-running process that starts
//! qemu-storage-daemon on behalf of the node agent, so that the daemons are its children and live
//! in its container. On Kubernetes a restart or upgrade of the node plugin's container kills every
//! process in that container's cgroup; daemons started here survive it, and the agent re-adopts
//! them through their run directories as it does after any restart.
//!
//! It owns the EngineHost gRPC service (`proto/bicsi.proto`) on a unix socket, the client side the
//! agent's `QemuStorageDaemon` calls when `--engine-endpoint` is set, the check of what it is asked
//! to run, and the reaping of its children. It does not stop, inspect or re-adopt daemons: the
//! agent does that itself through pid files, /proc, QMP and signals, which works because both run
//! in the host's PID namespace and share the data directory. It only ever runs its own
//! qemu-storage-daemon, `--daemonize`d, with its pid file, sockets, export, trace and log inside a
//! run directory under `<data-dir>/engines/` (volume engines) or `<data-dir>/replica-server/` (the
//! node's NBD replica server), and bicsi's own mirror engine (its own executable's hidden
//! `engine-mirror` command, Spawn's `program: "engine-mirror"`), `--daemonize`d, with only the
//! flags that engine has, its pid file, export, fault file, control socket and log inside a run
//! directory under `<data-dir>/engines/` (its replicas are on the node's disks, as a qemu
//! engine's are). A host that predates the hosted mirror engine lists no programs in Ping, and
//! the agent then starts that engine itself (`crate::os::engine::mirror`).
//!
//! Daemonized children re-parent to this process (PR_SET_CHILD_SUBREAPER, set by `serve`), so
//! their exits are reaped here: one reaper owns every `waitpid`, and a spawn registers its
//! daemonizing parent with the reaper before the reaper can see it exit.

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

use super::{Spawned, daemonizing_command, read_log_from};
use crate::messages::error_chain;
use crate::os::{OsError, OsResult, spawn_error};
use crate::proto as pb;
use pb::engine_host_client::EngineHostClient;

/// The host's socket in its data directory, unless `--listen` says otherwise.
pub const SOCKET_NAME: &str = "engine.sock";

/// The run directories the host starts daemons in, relative to its data directory: each volume
/// engine's directory is a child of `engines/`, the replica server's is `replica-server/` itself.
pub const ENGINES_DIR: &str = "engines";
pub const REPLICA_SERVER_DIR: &str = "replica-server";

/// Spawn's `program` for qemu-storage-daemon (also the empty string, older agents' default).
pub const QEMU: &str = "qemu-storage-daemon";
/// Spawn's `program` for bicsi's mirror engine: the host's own executable, this subcommand.
pub const MIRROR: &str = super::mirror::SUBCOMMAND;

/// The flags of `bicsi engine-mirror` the agent uses, each with whether it takes a value: the
/// host runs no other (`--direct-io` and `--writeback-cache` are for measurements only).
const MIRROR_FLAGS: &[(&str, bool)] = &[
    ("--replica", true),
    ("--cow-replica", true),
    ("--remote", true),
    ("--replica-timeout", true),
    ("--tls-dir", true),
    ("--export", true),
    ("--faults", true),
    ("--control", true),
    ("--pid-file", true),
    ("--threads", true),
    ("--daemonize", false),
    ("--read-only", false),
];

/// The longest a spawn may wait for the daemonizing parent, whatever the request asks.
const MAX_SPAWN_TIMEOUT: Duration = Duration::from_secs(600);

// ---- what the host accepts ------------------------------------------------------------------

/// qemu's `key=value,key=value` syntax, a doubled comma being a literal one.
fn split_opts(text: &str) -> Vec<(String, String)> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
        .into_iter()
        .map(|i| match i.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (i, String::new()),
        })
        .collect()
}

/// The values of `keys` in an option value, written as JSON or as `key=value,...`.
fn option_paths(value: &str, keys: &[&str]) -> Vec<String> {
    if value.trim_start().starts_with('{') {
        let Ok(v) = serde_json::from_str::<Value>(value) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for key in keys {
            if let Some(p) = v.get(*key).and_then(Value::as_str) {
                out.push(p.to_string());
            }
        }
        // A unix socket address (`"addr": {"type": "unix", "path": ...}`).
        if let Some(p) = v.pointer("/addr/path").and_then(Value::as_str) {
            out.push(p.to_string());
        }
        out
    } else {
        split_opts(value)
            .into_iter()
            .filter(|(k, _)| keys.contains(&k.as_str()) || k == "addr.path")
            .map(|(_, v)| v)
            .collect()
    }
}

fn refused(what: &str, reason: String) -> OsError {
    OsError::Unsupported(format!("engine host: {what}: {reason}"))
}

/// The one pid file a spawn names (`flag`: qemu's `--pidfile`, the mirror engine's
/// `--pid-file`) and the run directory it lies in: refused unless there is exactly one.
fn one_pid_file<'a, S: AsRef<str>>(
    pid_files: &'a [S],
    flag: &str,
    daemon: &str,
) -> OsResult<(&'a str, PathBuf)> {
    let [pid_file] = pid_files else {
        return Err(refused(
            "arguments",
            format!(
                "exactly one {flag} is needed (got {}); it names the {daemon}'s run directory",
                pid_files.len()
            ),
        ));
    };
    let pid_file = pid_file.as_ref();
    Ok((pid_file, resolved_dir(Path::new(pid_file), flag)?))
}

/// `path`'s directory, resolved; `path` itself must be absolute, plain (no `.` or `..`) and name a
/// file in an existing directory.
fn resolved_dir(path: &Path, what: &str) -> OsResult<PathBuf> {
    if !path.is_absolute()
        || path
            .components()
            .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
    {
        return Err(refused(
            what,
            format!(
                "{} must be an absolute path without . or .. components",
                path.display()
            ),
        ));
    }
    let (Some(dir), Some(_)) = (path.parent(), path.file_name()) else {
        return Err(refused(what, format!("{} names no file", path.display())));
    };
    std::fs::canonicalize(dir).map_err(|e| {
        refused(
            what,
            format!("directory {} cannot be resolved: {e}", dir.display()),
        )
    })
}

/// Checks a Spawn request against the rules of the module doc and returns the daemon's run
/// directory (resolved). `data_dir` is the host's, resolved.
pub fn check_spawn(data_dir: &Path, args: &[String], log_path: &Path) -> OsResult<PathBuf> {
    let engines = data_dir.join(ENGINES_DIR);
    let replica_server = data_dir.join(REPLICA_SERVER_DIR);
    let where_ = || {
        format!(
            "under {} or in {}",
            engines.display(),
            replica_server.display()
        )
    };
    if !args.iter().any(|a| a == "--daemonize") {
        return Err(refused(
            "arguments",
            "--daemonize is missing; the host only starts daemons that detach once set up"
                .to_string(),
        ));
    }
    let pid_files: Vec<&String> = args
        .windows(2)
        .filter(|w| w[0] == "--pidfile")
        .map(|w| &w[1])
        .collect();
    let (pid_file, run_dir) = one_pid_file(&pid_files, "--pidfile", "daemon")?;
    let allowed = run_dir == replica_server || run_dir.parent() == Some(engines.as_path());
    if !allowed {
        return Err(refused(
            "--pidfile",
            format!(
                "{pid_file} is not in a run directory {}; the node and `bicsi engine` must use \
                 the same --data-dir",
                where_()
            ),
        ));
    }
    let mut files: Vec<(String, &str)> = vec![(log_path.display().to_string(), "log")];
    for w in args.windows(2) {
        let (what, keys): (&str, &[&str]) = match w[0].as_str() {
            "--chardev" => ("--chardev", &["path"]),
            "--trace" => ("--trace", &["file"]),
            "--export" => ("--export", &["mountpoint"]),
            "--nbd-server" => ("--nbd-server", &[]),
            // TLS credentials (a directory of links to the node's --tls-dir) and any object
            // that would read a file.
            "--object" => ("--object", &["dir", "file"]),
            _ => continue,
        };
        for p in option_paths(&w[1], keys) {
            files.push((p, what));
        }
    }
    for (file, what) in files {
        let dir = resolved_dir(Path::new(&file), what)?;
        if dir != run_dir {
            return Err(refused(
                what,
                format!(
                    "{file} is outside the daemon's run directory {}",
                    run_dir.display()
                ),
            ));
        }
    }
    Ok(run_dir)
}

/// Checks a Spawn request for the mirror engine (`args` begin with its subcommand) as
/// [`check_spawn`] does for qemu-storage-daemon: it must `--daemonize`, use only the flags the
/// agent uses, and keep its pid file, export, fault file, control socket and log in one run
/// directory under `<data-dir>/engines/`. Returns that directory, resolved.
pub fn check_spawn_mirror(data_dir: &Path, args: &[String], log_path: &Path) -> OsResult<PathBuf> {
    let engines = data_dir.join(ENGINES_DIR);
    if args.first().map(String::as_str) != Some(MIRROR) {
        return Err(refused(
            "arguments",
            format!(
                "program {MIRROR} runs `bicsi {MIRROR} ...`: the first argument must be {MIRROR:?}, \
                 got {:?}",
                args.first()
            ),
        ));
    }
    let mut files: Vec<(String, &str)> = vec![(log_path.display().to_string(), "log")];
    let mut pid_files = Vec::new();
    let mut i = 1;
    while i < args.len() {
        let flag = args[i].as_str();
        let Some(&(_, takes_value)) = MIRROR_FLAGS.iter().find(|(f, _)| *f == flag) else {
            return Err(refused(
                "arguments",
                format!(
                    "{flag:?} is not a flag the host passes to the mirror engine (it runs only {})",
                    MIRROR_FLAGS
                        .iter()
                        .map(|(f, _)| *f)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        if takes_value {
            let Some(value) = args.get(i + 1) else {
                return Err(refused("arguments", format!("{flag} has no value")));
            };
            match flag {
                "--pid-file" => pid_files.push(value.clone()),
                "--export" | "--faults" | "--control" => files.push((value.clone(), flag)),
                _ => {}
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    if !args.iter().any(|a| a == "--daemonize") {
        return Err(refused(
            "arguments",
            "--daemonize is missing; the host only starts daemons that detach once set up"
                .to_string(),
        ));
    }
    let (pid_file, run_dir) = one_pid_file(&pid_files, "--pid-file", "engine")?;
    if run_dir.parent() != Some(engines.as_path()) {
        return Err(refused(
            "--pid-file",
            format!(
                "{pid_file} is not in a run directory under {}; the node and `bicsi engine` must \
                 use the same --data-dir",
                engines.display()
            ),
        ));
    }
    for flag in ["--export", "--control"] {
        if !files.iter().any(|(_, what)| *what == flag) {
            return Err(refused("arguments", format!("{flag} is missing")));
        }
    }
    for (file, what) in files {
        let dir = resolved_dir(Path::new(&file), what)?;
        if dir != run_dir {
            return Err(refused(
                what,
                format!(
                    "{file} is outside the engine's run directory {}",
                    run_dir.display()
                ),
            ));
        }
    }
    Ok(run_dir)
}

// ---- the service ----------------------------------------------------------------------------

/// The daemonizing parents spawns wait for, keyed by pid; the reaper hands each its wait status.
#[derive(Default)]
pub struct Children {
    waiting: Mutex<HashMap<i32, oneshot::Sender<WaitStatus>>>,
}

impl Children {
    /// Reaps every child that has exited: a spawn's daemonizing parent goes to its waiter, an
    /// engine daemon (re-parented here) is logged. Never blocks.
    pub fn reap(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    let Some(pid) = status.pid() else { return };
                    match waiting.remove(&pid.as_raw()) {
                        Some(tx) => {
                            let _ = tx.send(status);
                        }
                        None => tracing::info!(pid = pid.as_raw(), ?status, "daemon exited"),
                    }
                }
            }
        }
    }

    /// Reaps on every SIGCHLD (and every few seconds, in case one is missed) until dropped.
    pub fn reaper(self: Arc<Self>) -> OsResult<impl Future<Output = ()> + Send + 'static> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigchld =
            signal(SignalKind::child()).map_err(|e| OsError::io("listening for SIGCHLD", e))?;
        Ok(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = tick.tick() => {}
                }
                self.reap();
            }
        })
    }
}

/// waitpid's status word, as `ExitStatus::from_raw` reads it.
fn raw_status(status: &WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => (code & 0xff) << 8,
        WaitStatus::Signaled(_, sig, core) => *sig as i32 | if *core { 0x80 } else { 0 },
        _ => 0,
    }
}

pub struct EngineHostService {
    /// Resolved.
    data_dir: PathBuf,
    /// qemu-storage-daemon.
    program: PathBuf,
    /// bicsi's own executable, for the mirror engine.
    mirror_program: PathBuf,
    children: Arc<Children>,
}

impl EngineHostService {
    /// `program`: qemu-storage-daemon; `mirror_program`: the bicsi executable whose
    /// `engine-mirror` command serves mirror volumes (this one's, see `mirror::program`).
    pub fn new(
        data_dir: PathBuf,
        program: PathBuf,
        mirror_program: PathBuf,
        children: Arc<Children>,
    ) -> EngineHostService {
        EngineHostService {
            data_dir,
            program,
            mirror_program,
            children,
        }
    }

    async fn run(&self, req: pb::SpawnRequest) -> OsResult<pb::SpawnResponse> {
        let log_path = PathBuf::from(&req.log_path);
        let (program, run_dir) = match req.program.as_str() {
            "" | QEMU => (
                &self.program,
                check_spawn(&self.data_dir, &req.args, &log_path)?,
            ),
            MIRROR => (
                &self.mirror_program,
                check_spawn_mirror(&self.data_dir, &req.args, &log_path)?,
            ),
            other => {
                return Err(refused(
                    "program",
                    format!(
                        "{other:?} is not a program the host runs; it runs {QEMU} and {MIRROR}"
                    ),
                ));
            }
        };
        let timeout =
            Duration::from_millis(req.timeout_ms).clamp(Duration::from_secs(1), MAX_SPAWN_TIMEOUT);
        let (mut cmd, display, log_start) =
            daemonizing_command(program, &req.args, &log_path, &req.banner)?;
        let started = Instant::now();
        // Registered before the reaper can run, so the parent's exit cannot be reaped unseen.
        let (pid, mut rx) = {
            let mut waiting = self
                .children
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let child = cmd.spawn().map_err(|e| spawn_error(&cmd, e))?;
            let pid = child.id() as i32;
            let (tx, rx) = oneshot::channel();
            waiting.insert(pid, tx);
            (pid, rx)
        };
        let status = match tokio::time::timeout(timeout, &mut rx).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                if tokio::time::timeout(Duration::from_secs(5), rx)
                    .await
                    .is_err()
                {
                    let mut waiting = self
                        .children
                        .waiting
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    waiting.remove(&pid);
                }
                None
            }
        };
        let ok = status
            .as_ref()
            .is_some_and(|s| matches!(s, WaitStatus::Exited(_, 0)));
        let daemon = if ok {
            std::fs::read_to_string(run_dir.join(pid_file_name(&req.args)))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        } else {
            0
        };
        tracing::info!(run_dir = %run_dir.display(), pid = daemon, ?status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            program = if req.program.is_empty() { QEMU } else { req.program.as_str() },
            "spawned a daemon");
        Ok(pb::SpawnResponse {
            display,
            log_start,
            exited: status.is_some(),
            wait_status: status.as_ref().map(raw_status).unwrap_or(0),
            elapsed_ms: started.elapsed().as_millis() as u64,
            pid: daemon,
            log: if ok {
                String::new()
            } else {
                read_log_from(&log_path, log_start)
            },
        })
    }
}

/// The pid file's name (the checks made sure there is exactly one, in the run directory):
/// qemu-storage-daemon's `--pidfile`, the mirror engine's `--pid-file`.
fn pid_file_name(args: &[String]) -> PathBuf {
    args.windows(2)
        .find(|w| w[0] == "--pidfile" || w[0] == "--pid-file")
        .and_then(|w| Path::new(&w[1]).file_name().map(PathBuf::from))
        .unwrap_or_default()
}

#[tonic::async_trait]
impl pb::engine_host_server::EngineHost for EngineHostService {
    async fn ping(&self, _: Request<pb::Empty>) -> Result<Response<pb::EngineHostInfo>, Status> {
        Ok(Response::new(pb::EngineHostInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            data_dir: self.data_dir.display().to_string(),
            pid: std::process::id() as i32,
            programs: vec![QEMU.to_string(), MIRROR.to_string()],
        }))
    }

    async fn spawn(
        &self,
        req: Request<pb::SpawnRequest>,
    ) -> Result<Response<pb::SpawnResponse>, Status> {
        match self.run(req.into_inner()).await {
            Ok(r) => Ok(Response::new(r)),
            Err(e @ OsError::Unsupported(_)) => Err(Status::invalid_argument(e.to_string())),
            Err(e) => Err(Status::from(crate::error::Error::Os(e))),
        }
    }
}

// ---- the client -----------------------------------------------------------------------------

fn unreachable(socket: &Path, why: String) -> OsError {
    OsError::Unavailable(format!(
        "the engine host at unix://{} is not reachable ({why}); start `bicsi engine` with this \
         node's --data-dir (on Kubernetes: the bicsi-engine DaemonSet, deploy/engine.yaml), or \
         run the node without --engine-endpoint to start engines itself",
        socket.display()
    ))
}

/// A connection to the host at `socket`.
pub async fn connect(socket: &Path) -> OsResult<EngineHostClient<Channel>> {
    let path = socket.to_path_buf();
    // The URI is required by tonic but unused: the connector opens the socket.
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .map_err(|e| unreachable(socket, error_chain(&e)))?;
    Ok(EngineHostClient::new(channel))
}

fn call_error(socket: &Path, s: Status) -> OsError {
    let message = format!(
        "engine host at unix://{}: {}",
        socket.display(),
        s.message()
    );
    match s.code() {
        tonic::Code::InvalidArgument => OsError::Unsupported(message),
        tonic::Code::Unavailable => unreachable(socket, s.message().to_string()),
        tonic::Code::NotFound => OsError::NotFound(message),
        _ => OsError::Other(message),
    }
}

/// Runs `fut` to completion from synchronous code (the OS layer runs in blocking threads), on a
/// runtime of its own in a thread of its own, so it works inside and outside a Tokio runtime.
fn block_on<F>(fut: F) -> OsResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| OsError::io("starting a runtime for the engine host client", e))?;
            Ok(rt.block_on(fut))
        })
        .join()
        .unwrap_or_else(|_| Err(OsError::Other("engine host client panicked".into())))
    })
}

/// The host's answer to Ping: proof that it is there.
pub async fn ping_async(socket: &Path) -> OsResult<pb::EngineHostInfo> {
    let mut client = connect(socket).await?;
    let mut req = Request::new(pb::Empty {});
    req.set_timeout(Duration::from_secs(10));
    Ok(client
        .ping(req)
        .await
        .map_err(|s| call_error(socket, s))?
        .into_inner())
}

pub(in crate::os) fn ping(socket: &Path) -> OsResult<pb::EngineHostInfo> {
    block_on(ping_async(socket))?
}

/// Whether the host at `socket` runs `program` (a host from before the hosted mirror engine
/// lists none, and runs qemu-storage-daemon only).
pub(in crate::os) fn runs(socket: &Path, program: &str) -> OsResult<bool> {
    Ok(ping(socket)?.programs.iter().any(|p| p == program))
}

/// `spawn_daemonized`, done by the host at `socket`; `program` is [`QEMU`] or [`MIRROR`].
pub(in crate::os) fn spawn(
    socket: &Path,
    program: &str,
    args: &[String],
    log_path: &Path,
    banner: &str,
    timeout: Duration,
) -> OsResult<Spawned> {
    let started = Instant::now();
    let req = pb::SpawnRequest {
        args: args.to_vec(),
        log_path: crate::os::utf8_path(log_path)?.to_string(),
        banner: banner.to_string(),
        timeout_ms: timeout.as_millis() as u64,
        program: program.to_string(),
    };
    let r = block_on(async {
        let mut client = connect(socket).await?;
        let mut req = Request::new(req);
        req.set_timeout(timeout + Duration::from_secs(15));
        Ok::<_, OsError>(
            client
                .spawn(req)
                .await
                .map_err(|s| call_error(socket, s))?
                .into_inner(),
        )
    })??;
    tracing::debug!(pid = r.pid, socket = %socket.display(), "engine host started a daemon");
    Ok(Spawned {
        display: r.display,
        log_start: r.log_start,
        status: r.exited.then(|| ExitStatus::from_raw(r.wait_status)),
        started,
        log: (!r.log.is_empty()).then_some(r.log),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let data = std::fs::canonicalize(dir.path()).unwrap().join("data");
        for d in ["engines/vol-a", "replica-server", "elsewhere"] {
            std::fs::create_dir_all(data.join(d)).unwrap();
        }
        (dir, data)
    }

    /// The arguments the node really builds, for an engine and for the replica server.
    fn engine_args(run: &Path) -> Vec<String> {
        let spec = crate::os::VolumeEngineSpec {
            volume_id: "vol-a".into(),
            replicas: vec![
                crate::os::ReplicaTarget::Local("/disks/d1/replicas/r1/volume.qcow2".into()),
                crate::os::ReplicaTarget::Nbd {
                    host: "10.0.0.2".into(),
                    port: 10809,
                    export: "r2".into(),
                },
            ],
            run_dir: run.to_path_buf(),
            read_only: false,
        };
        super::super::build_args(&spec, &super::super::RunPaths::new(run), true).unwrap()
    }

    fn swap(args: &[String], from: &str, to: &str) -> Vec<String> {
        args.iter().map(|a| a.replace(from, to)).collect()
    }

    #[test]
    fn accepts_what_the_node_builds() {
        let (_t, data) = setup();
        let run = data.join("engines/vol-a");
        let args = engine_args(&run);
        assert!(args.iter().any(|a| a.starts_with("enable=")), "{args:?}");
        assert!(
            args.iter().any(|a| a.starts_with("tls-creds-x509")),
            "{args:?}"
        );
        assert_eq!(
            check_spawn(&data, &args, &run.join("qsd.log")).unwrap(),
            run
        );
        let rs = data.join("replica-server");
        let server = crate::os::nbd::server_args_for_tests(&rs);
        assert_eq!(
            check_spawn(&data, &server, &rs.join("qsd.log")).unwrap(),
            rs
        );
    }

    /// The mirror engine's arguments as the node builds them: a raw, a cow and a remote child.
    fn mirror_args(run: &Path) -> Vec<String> {
        let spec = crate::os::VolumeEngineSpec {
            volume_id: "vol-a".into(),
            replicas: vec![
                crate::os::ReplicaTarget::Local("/disks/d1/replicas/r1/volume.raw".into()),
                crate::os::ReplicaTarget::Local("/disks/d2/replicas/r2/volume.cow".into()),
                crate::os::ReplicaTarget::Nbd {
                    host: "10.0.0.2".into(),
                    port: 10810,
                    export: "r3".into(),
                },
            ],
            run_dir: run.to_path_buf(),
            read_only: true,
        };
        let mut engine = super::super::QemuStorageDaemon::new();
        engine.nbd_tls = Some("/etc/bicsi/tls".into());
        super::super::mirror::args(
            &engine,
            &spec,
            &super::super::RunPaths::new(run),
            Duration::from_secs(8),
        )
        .unwrap()
    }

    #[test]
    fn accepts_the_mirror_engine_the_node_builds_and_nothing_else() {
        let (_t, data) = setup();
        let run = data.join("engines/vol-a");
        let log = run.join("mirror.log");
        let args = mirror_args(&run);
        for flag in ["--cow-replica", "--remote", "--tls-dir", "--read-only"] {
            assert!(args.iter().any(|a| a == flag), "{flag}: {args:?}");
        }
        assert_eq!(check_spawn_mirror(&data, &args, &log).unwrap(), run);
        // qemu's check refuses the mirror engine's command line, and the reverse.
        assert!(check_spawn(&data, &args, &log).is_err());
        assert!(check_spawn_mirror(&data, &engine_args(&run), &run.join("qsd.log")).is_err());

        let run_s = run.display().to_string();
        let without = |flag: &str| -> Vec<String> {
            let mut out = Vec::new();
            let mut i = 0;
            while i < args.len() {
                if args[i] == flag {
                    i += if flag == "--daemonize" { 1 } else { 2 };
                    continue;
                }
                out.push(args[i].clone());
                i += 1;
            }
            out
        };
        let with = |extra: &[&str]| -> Vec<String> {
            let mut a = args.clone();
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        let cases: Vec<(&str, Vec<String>, PathBuf, &str)> = vec![
            (
                "another subcommand",
                {
                    let mut a = args.clone();
                    a[0] = "replica-server".into();
                    a
                },
                log.clone(),
                "first argument must be \"engine-mirror\"",
            ),
            (
                "no --daemonize",
                without("--daemonize"),
                log.clone(),
                "--daemonize is missing",
            ),
            (
                "no pid file",
                without("--pid-file"),
                log.clone(),
                "exactly one --pid-file",
            ),
            (
                "two pid files",
                with(&["--pid-file", &format!("{run_s}/other.pid")]),
                log.clone(),
                "exactly one --pid-file",
            ),
            (
                "no control socket",
                without("--control"),
                log.clone(),
                "--control is missing",
            ),
            (
                "a flag the agent never passes",
                with(&["--writeback-cache"]),
                log.clone(),
                "\"--writeback-cache\" is not a flag",
            ),
            (
                "a flag without its value",
                with(&["--threads"]),
                log.clone(),
                "--threads has no value",
            ),
            (
                "export elsewhere",
                swap(&args, &format!("{run_s}/export"), "/tmp/export"),
                log.clone(),
                "--export: /tmp/export is outside",
            ),
            (
                "fault file elsewhere",
                swap(&args, &format!("{run_s}/faults.jsonl"), "/tmp/faults.jsonl"),
                log.clone(),
                "--faults: /tmp/faults.jsonl is outside",
            ),
            (
                "log elsewhere",
                args.clone(),
                PathBuf::from("/tmp/mirror.log"),
                "log: /tmp/mirror.log is outside",
            ),
            (
                "the replica server's directory",
                swap(
                    &args,
                    &run_s,
                    &data.join("replica-server").display().to_string(),
                ),
                data.join("replica-server/mirror.log"),
                "not in a run directory under",
            ),
            (
                "dot-dot",
                swap(
                    &args,
                    &format!("{run_s}/mirror.pid"),
                    &format!("{run_s}/../vol-a/mirror.pid"),
                ),
                log.clone(),
                "without . or ..",
            ),
        ];
        for (what, a, log, want) in cases {
            let e = check_spawn_mirror(&data, &a, &log).expect_err(what);
            assert!(e.to_string().contains(want), "{what}: {e}");
        }
    }

    #[test]
    fn refuses_what_escapes_the_run_directories() {
        let (_t, data) = setup();
        let run = data.join("engines/vol-a");
        let log = run.join("qsd.log");
        let args = engine_args(&run);
        let run_s = run.display().to_string();
        let other = data.join("elsewhere").display().to_string();
        std::os::unix::fs::symlink("/tmp", data.join("engines/link")).unwrap();
        let qmp = format!("{run_s}/qmp.sock");
        let export = format!("{run_s}/export");
        let trace = format!("{run_s}/nbd-trace.log");
        let tls = format!("dir={run_s}/tls");
        let without = |flag: &str| -> Vec<String> {
            let mut a = args.clone();
            let i = a.iter().position(|x| x == flag).unwrap();
            a.remove(i);
            if flag == "--pidfile" {
                a.remove(i);
            }
            a
        };
        let mut two_pid_files = args.clone();
        two_pid_files.extend(["--pidfile".into(), format!("{run_s}/other.pid")]);
        let table: Vec<(&str, Vec<String>, PathBuf, &str)> = vec![
            (
                "no --daemonize",
                without("--daemonize"),
                log.clone(),
                "--daemonize",
            ),
            (
                "no --pidfile",
                without("--pidfile"),
                log.clone(),
                "exactly one --pidfile",
            ),
            (
                "two pid files",
                two_pid_files,
                log.clone(),
                "exactly one --pidfile",
            ),
            // The whole engine somewhere else than under engines/.
            (
                "run dir elsewhere",
                swap(&args, &run_s, &other),
                PathBuf::from(format!("{other}/qsd.log")),
                "not in a run directory",
            ),
            (
                "run dir is engines/ itself",
                swap(&args, &run_s, &data.join("engines").display().to_string()),
                data.join("engines/qsd.log"),
                "not in a run directory",
            ),
            (
                "run dir through a symlink",
                swap(
                    &args,
                    &run_s,
                    &data.join("engines/link").display().to_string(),
                ),
                data.join("engines/link/qsd.log"),
                "not in a run directory",
            ),
            (
                "dot-dot",
                swap(
                    &args,
                    &format!("{run_s}/qsd.pid"),
                    &format!("{run_s}/../vol-a/qsd.pid"),
                ),
                log.clone(),
                "without . or ..",
            ),
            (
                "relative pid file",
                swap(&args, &format!("{run_s}/qsd.pid"), "qsd.pid"),
                log.clone(),
                "absolute path",
            ),
            (
                "QMP socket elsewhere",
                swap(&args, &qmp, "/tmp/qmp.sock"),
                log.clone(),
                "--chardev: /tmp/qmp.sock is outside",
            ),
            (
                "export elsewhere",
                swap(&args, &export, "/tmp/export"),
                log.clone(),
                "--export: /tmp/export is outside",
            ),
            (
                "trace elsewhere",
                swap(&args, &trace, "/tmp/trace"),
                log.clone(),
                "--trace: /tmp/trace is outside",
            ),
            (
                "TLS credentials elsewhere",
                swap(&args, &tls, "dir=/tmp/tls"),
                log.clone(),
                "--object: /tmp/tls is outside",
            ),
            (
                "a secret read from a file",
                {
                    let mut a = args.clone();
                    a.extend(["--object".into(), "secret,id=s,file=/etc/shadow".into()]);
                    a
                },
                log.clone(),
                "--object: /etc/shadow is outside",
            ),
            (
                "log elsewhere",
                args.clone(),
                PathBuf::from("/tmp/qsd.log"),
                "log: /tmp/qsd.log is outside",
            ),
            (
                "log in a missing directory",
                args.clone(),
                run.join("gone/qsd.log"),
                "cannot be resolved",
            ),
        ];
        for (name, a, log, needle) in table {
            let err = check_spawn(&data, &a, &log).expect_err(name);
            assert!(matches!(err, OsError::Unsupported(_)), "{name}: {err}");
            assert!(err.to_string().contains(needle), "{name}: {err}");
        }
    }

    #[test]
    fn reads_qemu_option_syntax() {
        assert_eq!(
            split_opts("socket,id=q,path=/a,,b,server=on"),
            vec![
                ("socket".to_string(), String::new()),
                ("id".into(), "q".into()),
                ("path".into(), "/a,b".into()),
                ("server".into(), "on".into()),
            ]
        );
        assert_eq!(
            option_paths(
                r#"{"type":"fuse","mountpoint":"/r/export"}"#,
                &["mountpoint"]
            ),
            vec!["/r/export".to_string()]
        );
        assert_eq!(
            option_paths(r#"{"addr":{"type":"unix","path":"/r/nbd.sock"}}"#, &[]),
            vec!["/r/nbd.sock".to_string()]
        );
        assert_eq!(
            option_paths("addr.type=unix,addr.path=/r/nbd.sock", &[]),
            vec!["/r/nbd.sock".to_string()]
        );
    }

    #[test]
    fn wait_statuses_round_trip() {
        let pid = Pid::from_raw(1);
        let exited = ExitStatus::from_raw(raw_status(&WaitStatus::Exited(pid, 3)));
        assert_eq!(exited.code(), Some(3));
        let ok = ExitStatus::from_raw(raw_status(&WaitStatus::Exited(pid, 0)));
        assert!(ok.success());
        let killed = ExitStatus::from_raw(raw_status(&WaitStatus::Signaled(
            pid,
            Signal::SIGKILL,
            false,
        )));
        assert_eq!(killed.signal(), Some(libc::SIGKILL));
        assert!(!killed.success());
    }

    #[test]
    fn unreachable_host_names_the_socket_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("engine.sock");
        let err = ping(&socket).unwrap_err();
        assert!(matches!(err, OsError::Unavailable(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("unix://{}", socket.display())),
            "{text}"
        );
        assert!(text.contains("bicsi engine"), "{text}");
        assert!(text.contains("bicsi-engine DaemonSet"), "{text}");
    }
}
