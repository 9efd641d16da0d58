//! Starting, finding and driving bicsi's own replica server (`crate::replica_server`, the hidden
//! `bicsi replica-server` command): the NBD server of this node's raw replica files, the
//! counterpart of qemu-storage-daemon's server (`super::nbd`), which keeps the qcow2 ones. The
//! `Engine` methods `export_replica`, `unexport_replica(_force)` and `replica_server_status` of
//! `QemuStorageDaemon` come here for a raw replica, or for a run directory this server lives
//! in, with the same contract (see the trait).
//!
//! A run directory holds one server: its pid file (`server.pid`), control socket
//! (`control.sock`) and log (`server.log`). The server is a daemon of its own (`--daemonize`
//! returns once it listens) in its own process group, so it outlives this process; it is found
//! again from its pid file and its command line in /proc (`--pid-file` names the run
//! directory), and what it exports is asked of it (`list` on the control socket): this module
//! keeps no state. It starts with the first export and stops (SIGTERM) with the last.
//!
//! It is started by this process even when an engine host is configured (the host runs only
//! qemu-storage-daemon), so on Kubernetes a restart of the plugin's container ends it, as it
//! ends the mirror engine.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::engine::{
    ListenFailure, MAX_SOCKET_PATH, QemuStorageDaemon, find_processes, listen_failure,
    spawn_daemonized, terminate,
};
use super::{
    OsError, OsResult, ReplicaExport, command_failure, loopdev, resolve_parent, utf8_path,
};
use serde::{Deserialize, Serialize};

/// The node's run directory of the server, relative to its data directory (qemu's server has
/// `replica-server/`).
pub const RUN_DIR: &str = "replica-server-raw";
/// The hidden subcommand of the bicsi binary that serves the replicas.
pub const SUBCOMMAND: &str = "replica-server";
const PID: &str = "server.pid";
const CONTROL: &str = "control.sock";
const LOG: &str = "server.log";
/// How long one control exchange may take (a forced removal waits for its cut connections).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a safe unexport waits for a client that has just disconnected to be released.
const CLIENT_RELEASE_GRACE: Duration = Duration::from_secs(2);

// The control socket's records, written by this side and read by the server's
// (`crate::replica_server`), which re-exports them.

/// What `list` reports of one export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInfo {
    pub id: String,
    pub path: PathBuf,
    /// Connections in transmission on it.
    pub clients: usize,
}

/// What `list` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// The address the server listens on, `host:port` (the port it actually bound).
    pub listen: String,
    pub exports: Vec<ExportInfo>,
}

/// `add`'s argument.
#[derive(Debug, Serialize, Deserialize)]
pub struct AddRequest {
    pub id: String,
    pub path: PathBuf,
}

/// `remove`'s argument.
#[derive(Debug, Serialize, Deserialize)]
pub struct RemoveRequest {
    pub id: String,
    #[serde(default)]
    pub force: bool,
}

/// The program to run: `BICSI_PROGRAM` when set (tests whose own binary is not bicsi), else
/// this executable.
fn program() -> OsResult<PathBuf> {
    if let Some(p) = std::env::var_os("BICSI_PROGRAM") {
        return Ok(PathBuf::from(p));
    }
    std::env::current_exe()
        .map_err(|e| OsError::io("finding the bicsi executable for the replica server", e))
}

/// The files of a run directory.
struct Paths {
    dir: PathBuf,
    pid: PathBuf,
    control: PathBuf,
    log: PathBuf,
}

impl Paths {
    fn new(run_dir: &Path) -> Paths {
        let dir = std::fs::canonicalize(run_dir).unwrap_or_else(|_| resolve_parent(run_dir));
        Paths {
            pid: dir.join(PID),
            control: dir.join(CONTROL),
            log: dir.join(LOG),
            dir,
        }
    }
}

/// The host a server's command line says it listens on.
fn parse_args(argv: &[String], pid_file: &Path) -> Option<String> {
    if argv.get(1).map(String::as_str) != Some(SUBCOMMAND) {
        return None;
    }
    let mut listen = None;
    let mut ours = false;
    let mut it = argv[2..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => listen = Some(it.next()?.clone()),
            "--pid-file" => ours = Path::new(it.next()?) == pid_file,
            _ => {}
        }
    }
    let listen = listen.filter(|_| ours)?;
    let (host, _) = listen.rsplit_once(':')?;
    Some(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
}

/// The live server of `run_dir`: its paths, pid and host.
fn live(run_dir: &Path) -> Option<(Paths, i32, String)> {
    if !run_dir.is_dir() {
        return None;
    }
    let paths = Paths::new(run_dir);
    if !paths.pid.exists() {
        return None;
    }
    let (pid, host) = find_processes(&paths.pid, |argv| parse_args(argv, &paths.pid))
        .into_iter()
        .next()?;
    Some((paths, pid, host))
}

/// Whether bicsi's replica server runs in `run_dir`.
pub fn serving(run_dir: &Path) -> bool {
    live(run_dir).is_some()
}

/// Sends one command line and returns the answer after `ok `; `error busy…` is `Busy`,
/// `error conflict…` is `Conflict`.
fn command(paths: &Paths, line: &str) -> OsResult<String> {
    let context = |what: &str| {
        format!(
            "{what} the replica server's control socket {}",
            paths.control.display()
        )
    };
    let conn = UnixStream::connect(&paths.control)
        .map_err(|e| OsError::io(context("connecting to"), e))?;
    conn.set_read_timeout(Some(CONTROL_TIMEOUT))
        .map_err(|e| OsError::io(context("setting a timeout on"), e))?;
    let mut out = conn
        .try_clone()
        .map_err(|e| OsError::io(context("cloning"), e))?;
    writeln!(out, "{line}").map_err(|e| OsError::io(context("writing to"), e))?;
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .map_err(|e| OsError::io(context("reading from"), e))?;
    let answer = answer.trim();
    if let Some(rest) = answer.strip_prefix("ok") {
        return Ok(rest.trim().to_string());
    }
    let refusal = answer.strip_prefix("error ").unwrap_or(answer);
    let message = format!("replica server in {}: {refusal}", paths.dir.display());
    Err(if refusal.starts_with("busy") {
        OsError::Busy(message)
    } else if refusal.starts_with("conflict") {
        OsError::Conflict(message)
    } else {
        OsError::Other(message)
    })
}

fn list(paths: &Paths) -> OsResult<Listing> {
    let answer = command(paths, "list")?;
    serde_json::from_str(&answer).map_err(|e| {
        OsError::Other(format!(
            "replica server in {} answered `list` with {answer:?}: {e}",
            paths.dir.display()
        ))
    })
}

fn port_of(listing: &Listing) -> OsResult<u16> {
    listing
        .listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| OsError::Other(format!("replica server listens on {:?}?", listing.listen)))
}

/// `host:port` as a listen address (IPv6 hosts in brackets).
fn listen_addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A raw replica that an engine of this node has open: the file must not be served to another
/// node at the same time (two writers, neither seeing the other's writes).
fn local_user(path: &Path) -> OsResult<Option<String>> {
    if let Some(export) = super::engine::mirror::export_of(path) {
        return Ok(Some(format!("the mirror engine of {}", export.display())));
    }
    let resolved = resolve_parent(path);
    Ok(loopdev::attached()?
        .into_iter()
        .find(|(_, file)| resolve_parent(file) == resolved)
        .map(|(dev, _)| format!("loop device {}", dev.display())))
}

/// Starts a server in `paths` on host:port (0: any free port, which the server binds itself).
fn start(engine: &QemuStorageDaemon, paths: &Paths, host: &str, port: u16) -> OsResult<()> {
    for stale in [&paths.pid, &paths.control] {
        let _ = std::fs::remove_file(stale);
    }
    let mut args = vec![
        SUBCOMMAND.to_string(),
        "--listen".into(),
        listen_addr(host, port),
        "--control".into(),
        utf8_path(&paths.control)?.to_string(),
        "--pid-file".into(),
        utf8_path(&paths.pid)?.to_string(),
        "--daemonize".into(),
    ];
    if let Some(dir) = &engine.nbd_tls {
        args.extend(["--tls-dir".into(), utf8_path(dir)?.to_string()]);
    }
    let spawned = spawn_daemonized(
        &program()?,
        &args,
        &paths.log,
        &format!("starting replica server on {}", listen_addr(host, port)),
        engine.start_timeout,
    )?;
    let text = || spawned.log_text(&paths.log);
    match spawned.status {
        Some(status) if status.success() => Ok(()),
        Some(status) => {
            let log = text();
            let hint = match listen_failure(&paths.dir, &paths.log, host, port, &log) {
                ListenFailure::PortTaken(e) => return Err(e),
                ListenFailure::Exited { hint } => hint,
            };
            Err(command_failure(
                spawned.display.clone(),
                format!("exited with {status}; log {}:\n{log}", paths.log.display()),
                Some(hint),
            ))
        }
        None => Err(OsError::Timeout(format!(
            "{} did not start within {:?}; log {}:\n{}",
            spawned.display,
            engine.start_timeout,
            paths.log.display(),
            text()
        ))),
    }
}

fn stop(engine: &QemuStorageDaemon, paths: &Paths) -> OsResult<()> {
    if paths.pid.exists() {
        for (pid, _) in find_processes(&paths.pid, |argv| parse_args(argv, &paths.pid)) {
            terminate(
                pid,
                engine.stop_timeout,
                &format!("replica server in {}", paths.dir.display()),
            )?;
        }
    }
    match std::fs::remove_dir_all(&paths.dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(OsError::io(
            format!("removing run directory {}", paths.dir.display()),
            e,
        )),
    }
}

pub(crate) fn export_replica(
    engine: &QemuStorageDaemon,
    run_dir: &Path,
    host: &str,
    port: u16,
    export: &ReplicaExport,
) -> OsResult<u16> {
    super::nbd::check_replica_export(run_dir, host, export)?;
    let control = resolve_parent(run_dir).join(CONTROL);
    if control.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(OsError::Unsupported(format!(
            "replica server: socket path {} is longer than {MAX_SOCKET_PATH} bytes, the limit of \
             unix sockets; use a shorter data directory",
            control.display()
        )));
    }
    let _guard = super::nbd::server_lock();
    if let Some(user) = local_user(&export.path)? {
        return Err(command_failure(
            format!("exporting replica {:?}", export.replica_id),
            format!("{} is open by {user}", export.path.display()),
            Some(
                "another process (usually the volume's engine on this node) has the replica \
                 open (a lock); stop it first",
            ),
        ));
    }
    std::fs::create_dir_all(run_dir).map_err(|e| {
        OsError::io(
            format!(
                "creating run directory {} of the replica server",
                run_dir.display()
            ),
            e,
        )
    })?;
    let (paths, fresh) = match live(run_dir) {
        Some((paths, _, running_host)) => {
            let listing = list(&paths)?;
            let running = port_of(&listing)?;
            if running_host != host || (port != 0 && port != running) {
                return Err(OsError::Conflict(format!(
                    "replica server in {} listens on {}, not on {}; unexport its replicas first \
                     (it stops with the last one) or use that address",
                    paths.dir.display(),
                    listing.listen,
                    listen_addr(host, port)
                )));
            }
            (paths, false)
        }
        None => {
            let paths = Paths::new(run_dir);
            start(engine, &paths, host, port)?;
            (paths, true)
        }
    };
    let add = AddRequest {
        id: export.replica_id.clone(),
        path: export.path.clone(),
    };
    let line = format!("add {}", serde_json::json!(add));
    let result = command(&paths, &line).and_then(|_| port_of(&list(&paths)?));
    if result.is_err() && fresh {
        // A server started for this export alone must not outlive its failure.
        let _ = stop(engine, &paths);
    }
    result
}

pub(crate) fn unexport_replica(
    engine: &QemuStorageDaemon,
    run_dir: &Path,
    replica_id: &str,
    force: bool,
) -> OsResult<()> {
    let _guard = super::nbd::server_lock();
    let Some((paths, _, _)) = live(run_dir) else {
        // Nothing runs: nothing is exported. Clear a dead server's leftovers.
        if run_dir.is_dir() {
            stop(engine, &Paths::new(run_dir))?;
        }
        return Ok(());
    };
    let line = format!(
        "remove {}",
        serde_json::json!(RemoveRequest {
            id: replica_id.to_string(),
            force,
        })
    );
    // An engine that has just stopped may still count as a client for a moment (its connection
    // thread is finishing): only one that stays connected is busy.
    let grace = Instant::now() + CLIENT_RELEASE_GRACE;
    loop {
        match command(&paths, &line) {
            Ok(_) => break,
            Err(OsError::Busy(_)) if Instant::now() < grace => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(OsError::Busy(_)) => {
                let listen = list(&paths).map(|l| l.listen).unwrap_or_default();
                return Err(OsError::Busy(format!(
                    "replica {replica_id:?} exported on {listen} is still in use by a volume \
                     engine (an attaching node is connected to it); stop that engine first, or \
                     use unexport_replica_force when that node is gone"
                )));
            }
            Err(e) => return Err(e),
        }
    }
    if list(&paths)?.exports.is_empty() {
        stop(engine, &paths)?;
    }
    Ok(())
}

pub(crate) fn replica_server_status(run_dir: &Path) -> OsResult<Option<(u16, Vec<String>)>> {
    let _guard = super::nbd::server_lock();
    let Some((paths, _, _)) = live(run_dir) else {
        return Ok(None);
    };
    let listing = list(&paths)?;
    let mut ids: Vec<String> = listing.exports.iter().map(|e| e.id.clone()).collect();
    ids.sort();
    Ok(Some((port_of(&listing)?, ids)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_command_line_back() {
        let pid = Path::new("/data/replica-server-raw/server.pid");
        let argv = |listen: &str, pid_file: &str| -> Vec<String> {
            [
                "/usr/bin/bicsi",
                SUBCOMMAND,
                "--listen",
                listen,
                "--control",
                "/data/replica-server-raw/control.sock",
                "--pid-file",
                pid_file,
            ]
            .map(String::from)
            .to_vec()
        };
        let ours = pid.to_str().unwrap();
        assert_eq!(
            parse_args(&argv("10.0.0.5:10810", ours), pid),
            Some("10.0.0.5".into())
        );
        assert_eq!(
            parse_args(&argv("[fd00::5]:0", ours), pid),
            Some("fd00::5".into())
        );
        // Another run directory's server, another command, no address: not ours.
        assert_eq!(
            parse_args(&argv("10.0.0.5:1", "/elsewhere/server.pid"), pid),
            None
        );
        let mut other = argv("10.0.0.5:1", ours);
        other[1] = "engine-mirror".into();
        assert_eq!(parse_args(&other, pid), None);
        assert_eq!(parse_args(&argv("nonsense", ours), pid), None);
        assert_eq!(listen_addr("fd00::5", 7), "[fd00::5]:7");
        assert_eq!(listen_addr("127.0.0.1", 0), "127.0.0.1:0");
    }
}
