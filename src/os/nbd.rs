//! The replica server: one `qemu-storage-daemon` per node that serves this node's replica files
//! to the engines of other nodes over NBD (TCP), one writable export per replica, export name =
//! replica id. The attaching node's engine reads them as quorum children through qemu's built-in
//! NBD client (`ReplicaTarget::Nbd`), so neither side needs the kernel NBD module.
//!
//! The daemon starts with only its NBD server (`--nbd-server`, JSON) and a QMP monitor; exports
//! come and go through QMP (`blockdev-add` + `block-export-add`, `block-export-del` +
//! `blockdev-del`), so adding or removing one replica never disturbs the others. What runs is read
//! back from the daemon itself (its command line in /proc for the address, QMP for the exports):
//! this module keeps no state, and the run directory holds only the QMP socket, pid file and log.
//! The export id encodes the replica id (hex), so the list of exports is the list of replica ids;
//! the block node gets a short hashed name because qemu limits node names to 31 bytes.
//!
//! Measured (qemu 10.0): the server is up ~40 ms after the start and an export is added in a few
//! milliseconds. `block-export-del` in its default (safe) mode refuses ("still in use") while a
//! client is connected; the hard mode cuts the clients off. The NBD server sets no keep-alive, so
//! a client on a node that died keeps its export busy until the hard mode is used.
//!
//! Security (issue 19): with the node's `--tls-dir` (`QemuStorageDaemon::nbd_tls`) the server
//! requires TLS (`tls-creds-x509`, `verify-peer=on`, the credentials linked into the run
//! directory's `tls/` by `qemu_tls`) and lets in only node certificates (`authz-simple` for
//! `CN=bicsi-node`): a client without TLS is refused before any export is opened, one with a
//! certificate of another CA or another role at the handshake. Without a `--tls-dir`
//! (`--insecure`) it serves plain NBD to anyone who reaches it, as before. A server running the
//! other way than the node now asks for (a restart from `--insecure` to `--tls-dir`) is
//! restarted when it exports nothing, else refused with the fix named.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::Digest;

use super::engine::{
    ListenFailure, MAX_NBD_NAME, MAX_SOCKET_PATH, QemuStorageDaemon, find_processes,
    listen_failure, monitor_args, terminate,
};
use super::{
    ImageFormat, OsError, OsResult, ReplicaExport, command_failure, resolve_parent, utf8_path,
};

/// How long one QMP exchange may take. The replica server answers within milliseconds unless its
/// main loop is stuck (a disk that hangs).
const QMP_TIMEOUT: Duration = Duration::from_secs(15);

/// One replica-server operation at a time in this process: two concurrent first exports must not
/// start two servers, and the QMP socket takes one client at a time anyway.
static SERVER_LOCK: Mutex<()> = Mutex::new(());

pub(super) fn server_lock() -> MutexGuard<'static, ()> {
    SERVER_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A QMP error reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct QmpError {
    pub class: String,
    pub desc: String,
}

/// A connection to a daemon's QMP monitor, past the capabilities negotiation.
pub(crate) struct Qmp {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub(crate) fn connect(socket: &Path) -> OsResult<Qmp> {
        let context = || format!("connecting to the QMP monitor {}", socket.display());
        let stream = UnixStream::connect(socket).map_err(|e| OsError::io(context(), e))?;
        stream
            .set_read_timeout(Some(QMP_TIMEOUT))
            .and_then(|_| stream.set_write_timeout(Some(QMP_TIMEOUT)))
            .map_err(|e| OsError::io(context(), e))?;
        let writer = stream.try_clone().map_err(|e| OsError::io(context(), e))?;
        let mut qmp = Qmp {
            socket: socket.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message("the greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(OsError::Other(format!(
                "{} is not a QMP monitor: it greeted with {greeting}",
                socket.display()
            )));
        }
        qmp.execute("qmp_capabilities", None)?
            .map_err(|e| OsError::Other(format!("QMP qmp_capabilities failed: {}", e.desc)))?;
        Ok(qmp)
    }

    fn read_message(&mut self, waiting_for: &str) -> OsResult<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(OsError::Other(format!(
                "QMP monitor {} closed the connection while we waited for {waiting_for}",
                self.socket.display()
            ))),
            Ok(_) => serde_json::from_str(&line).map_err(|e| {
                OsError::Other(format!(
                    "QMP monitor {} sent {line:?}: {e}",
                    self.socket.display()
                ))
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(OsError::Timeout(format!(
                    "QMP monitor {} did not answer {waiting_for} within {QMP_TIMEOUT:?}; the \
                     daemon is stuck (a hung disk or remote?)",
                    self.socket.display()
                )))
            }
            Err(e) => Err(OsError::io(
                format!("reading from QMP monitor {}", self.socket.display()),
                e,
            )),
        }
    }

    /// Run one command; the outer error is the transport, the inner one qemu's refusal.
    pub(crate) fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> OsResult<Result<Value, QmpError>> {
        let mut msg = json!({ "execute": command });
        if let Some(arguments) = arguments {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).map_err(|e| {
            OsError::io(
                format!("sending {command} to QMP monitor {}", self.socket.display()),
                e,
            )
        })?;
        loop {
            let reply = self.read_message(&format!("the reply to {command}"))?;
            if let Some(ret) = reply.get("return") {
                return Ok(Ok(ret.clone()));
            }
            if let Some(err) = reply.get("error") {
                let field = |k: &str| {
                    err.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                return Ok(Err(QmpError {
                    class: field("class"),
                    desc: field("desc"),
                }));
            }
            // An asynchronous event (e.g. BLOCK_EXPORT_DELETED): not our answer.
        }
    }

    /// `execute`, with qemu's refusal turned into an `OsError` that names the command.
    fn call(&mut self, command: &str, arguments: Value) -> OsResult<Value> {
        let display = format!("QMP {command} {arguments}");
        self.execute(command, Some(arguments))?
            .map_err(|e| qmp_failure(display, &e.desc))
    }
}

/// A QMP refusal as the error the domain can act on.
fn qmp_failure(display: String, desc: &str) -> OsError {
    if desc.contains("lock") {
        command_failure(
            display,
            desc.to_string(),
            Some(
                "another process (usually the volume's engine on this node) has the replica \
                 open; stop it first",
            ),
        )
    } else {
        command_failure(display, desc.to_string(), None)
    }
}

/// The export id of a replica: qemu ids take letters, digits, '-', '.', '_' and start with a
/// letter, so the replica id is hex-encoded behind a prefix, and decoded back by `replica_of`.
pub(crate) fn export_id(replica_id: &str) -> String {
    format!("r-{}", hex::encode(replica_id.as_bytes()))
}

fn replica_of(export_id: &str) -> Option<String> {
    let bytes = hex::decode(export_id.strip_prefix("r-")?).ok()?;
    String::from_utf8(bytes).ok()
}

/// The block node of a replica: qemu limits node names to 31 bytes.
fn node_name(replica_id: &str) -> String {
    let digest = hex::encode(sha2::Sha256::digest(replica_id.as_bytes()));
    format!("rq-{}", &digest[..24])
}

/// The files of a replica server's run directory.
#[derive(Clone, Debug)]
struct ServerPaths {
    dir: PathBuf,
    qmp: PathBuf,
    pid: PathBuf,
    log: PathBuf,
    /// qemu's TLS credentials (links into the node's `--tls-dir`).
    tls: PathBuf,
}

impl ServerPaths {
    fn new(run_dir: &Path) -> ServerPaths {
        let dir = std::fs::canonicalize(run_dir).unwrap_or_else(|_| resolve_parent(run_dir));
        ServerPaths {
            qmp: dir.join("qmp.sock"),
            pid: dir.join("qsd.pid"),
            log: dir.join("qsd.log"),
            tls: dir.join(super::qemu_tls::DIR_NAME),
            dir,
        }
    }
}

/// What a replica server's command line says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ServerArgs {
    host: String,
    port: u16,
    /// Whether it requires TLS (its `--nbd-server` names credentials).
    tls: bool,
}

/// The daemon's arguments; `tls`: serve only TLS clients with node certificates, with the
/// credentials in `paths.tls` (made by the caller).
fn build_server_args(
    host: &str,
    port: u16,
    paths: &ServerPaths,
    tls: bool,
) -> OsResult<Vec<String>> {
    use super::qemu_tls::{AUTHZ_ID, CREDS_ID, Endpoint, authz_object, creds_object};
    let mut server = json!({"addr": {"type": "inet", "host": host, "port": port.to_string()}});
    let mut args = Vec::new();
    if tls {
        // Objects first: the NBD server names them.
        args.extend([
            "--object".to_string(),
            creds_object(&paths.tls, Endpoint::Server)?,
            "--object".to_string(),
            authz_object(),
        ]);
        server["tls-creds"] = json!(CREDS_ID);
        server["tls-authz"] = json!(AUTHZ_ID);
    }
    args.extend(["--nbd-server".to_string(), server.to_string()]);
    args.extend(monitor_args(&paths.qmp, &paths.pid)?);
    Ok(args)
}

/// The replica server's arguments (with TLS) for a run directory, for the engine host's tests.
#[cfg(test)]
pub(crate) fn server_args_for_tests(run_dir: &Path) -> Vec<String> {
    build_server_args("127.0.0.1", 10809, &ServerPaths::new(run_dir), true).unwrap()
}

/// Our replica server of `pid_file`, read back from its command line; None for anything else.
fn parse_server_args(argv: &[String], pid_file: &Path) -> Option<ServerArgs> {
    if !argv.first()?.contains("qemu-storage-daemon") {
        return None;
    }
    let mut server = None;
    let mut ours = false;
    for pair in argv.windows(2) {
        match pair[0].as_str() {
            "--nbd-server" => {
                let v: Value = serde_json::from_str(&pair[1]).ok()?;
                let addr = v.get("addr")?;
                let port = match addr.get("port")? {
                    Value::String(s) => s.parse().ok()?,
                    Value::Number(n) => u16::try_from(n.as_u64()?).ok()?,
                    _ => return None,
                };
                server = Some(ServerArgs {
                    host: addr.get("host")?.as_str()?.to_string(),
                    port,
                    tls: v.get("tls-creds").is_some(),
                });
            }
            "--pidfile" => ours = Path::new(&pair[1]) == pid_file,
            _ => {}
        }
    }
    server.filter(|_| ours)
}

fn find_servers(paths: &ServerPaths) -> Vec<(i32, ServerArgs)> {
    find_processes(&paths.pid, |argv| parse_server_args(argv, &paths.pid))
}

fn live_server(run_dir: &Path) -> Option<(ServerPaths, i32, ServerArgs)> {
    if !run_dir.is_dir() {
        return None;
    }
    let paths = ServerPaths::new(run_dir);
    let (pid, args) = find_servers(&paths).into_iter().next()?;
    Some((paths, pid, args))
}

/// The exports of a server: (export id, node name).
fn list_exports(qmp: &mut Qmp) -> OsResult<Vec<(String, String)>> {
    let ret = qmp.call("query-block-exports", json!({}))?;
    Ok(ret
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e.get("id")?.as_str()?.to_string(),
                e.get("node-name")?.as_str()?.to_string(),
            ))
        })
        .collect())
}

/// The file of a block node (its image's file name), if the node exists.
fn node_file(qmp: &mut Qmp, node: &str) -> OsResult<Option<PathBuf>> {
    let ret = qmp.call("query-named-block-nodes", json!({"flat": true}))?;
    Ok(ret
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n.get("node-name").and_then(Value::as_str) == Some(node))
        .map(|n| PathBuf::from(n.get("file").and_then(Value::as_str).unwrap_or_default())))
}

/// A free TCP port on `host`, as the kernel hands it out (bind to port 0, read it, close).
fn free_port(host: &str) -> OsResult<u16> {
    let listener = TcpListener::bind((host, 0))
        .map_err(|e| OsError::io(format!("finding a free TCP port on {host}"), e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| OsError::io(format!("finding a free TCP port on {host}"), e))
}

/// What `export_replica` refuses for what the request itself says: a replica id that is no NBD
/// export name (1 to 4096 bytes), a host that is no host name or address, a replica path that is
/// relative, missing or not UTF-8, and a run directory too long for the server's socket. Both
/// replica servers (`super::replica_server` for raw replicas) and the fake engine
/// (`super::fake`) call it.
pub(crate) fn check_replica_export(
    run_dir: &Path,
    host: &str,
    export: &ReplicaExport,
) -> OsResult<()> {
    let id = &export.replica_id;
    if id.is_empty() || id.len() > MAX_NBD_NAME {
        return Err(OsError::Unsupported(format!(
            "replica id {id:?}: an NBD export name must have 1 to {MAX_NBD_NAME} bytes"
        )));
    }
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(OsError::Unsupported(format!(
            "replica server address {host:?} is not a host name or address"
        )));
    }
    let path = &export.path;
    if !path.is_absolute() {
        return Err(OsError::Unsupported(format!(
            "replica {id:?}: path {} must be absolute",
            path.display()
        )));
    }
    if !path.is_file() {
        return Err(OsError::NotFound(format!(
            "replica {id:?}: {} does not exist; create it first",
            path.display()
        )));
    }
    utf8_path(path)?;
    let qmp = resolve_parent(run_dir).join("qmp.sock");
    if qmp.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(OsError::Unsupported(format!(
            "replica server: socket path {} is longer than {MAX_SOCKET_PATH} bytes, the limit of \
             unix sockets; use a shorter data directory",
            qmp.display()
        )));
    }
    Ok(())
}

/// Start a replica server in `paths` on host:port (0: a free port); returns its pid and port.
fn start_server(
    qsd: &QemuStorageDaemon,
    paths: &ServerPaths,
    host: &str,
    port: u16,
) -> OsResult<(i32, u16)> {
    // A dead server's leftovers; a live one would have been found.
    for stale in [&paths.pid, &paths.qmp] {
        let _ = std::fs::remove_file(stale);
    }
    if let Some(tls_dir) = &qsd.nbd_tls {
        super::qemu_tls::link_dir(tls_dir, &paths.tls)?;
    }
    // A port we pick may be taken by someone else before the daemon binds it: pick again.
    let attempts = if port == 0 { 5 } else { 1 };
    for attempt in 1..=attempts {
        let port = if port == 0 { free_port(host)? } else { port };
        let args = build_server_args(host, port, paths, qsd.nbd_tls.is_some())?;
        let spawned = qsd.spawn(
            &args,
            &paths.log,
            &format!("starting replica server on {host}:{port}"),
        )?;
        let log = || spawned.log_text(&paths.log);
        let failure = |reason: String, hint: &str| {
            for (pid, _) in find_servers(paths) {
                let _ = terminate(pid, qsd.stop_timeout, "replica server");
            }
            command_failure(
                spawned.display.clone(),
                format!("{reason}; log {}:\n{}", paths.log.display(), log()),
                Some(hint),
            )
        };
        match spawned.status {
            None => {
                return Err(OsError::Timeout(
                    failure(
                        format!("did not start within {:?}", qsd.start_timeout),
                        "see the log above",
                    )
                    .to_string(),
                ));
            }
            Some(status) if !status.success() => {
                match listen_failure(&paths.dir, &paths.log, host, port, &log()) {
                    ListenFailure::PortTaken(_) if attempt < attempts => continue,
                    ListenFailure::PortTaken(e) => return Err(e),
                    ListenFailure::Exited { hint } => {
                        return Err(failure(format!("exited with {status}"), hint));
                    }
                }
            }
            Some(_) => {}
        }
        let Some((pid, args)) = find_servers(paths).into_iter().next() else {
            return Err(failure(
                "started but no running server was found".to_string(),
                "see the log above",
            ));
        };
        tracing::debug!(run_dir = %paths.dir.display(), pid, host, port = args.port,
            elapsed_ms = spawned.started.elapsed().as_millis() as u64, "replica server started");
        return Ok((pid, args.port));
    }
    unreachable!("the last attempt returns")
}

fn stop_server(qsd: &QemuStorageDaemon, paths: &ServerPaths) -> OsResult<()> {
    for (pid, _) in find_servers(paths) {
        terminate(
            pid,
            qsd.stop_timeout,
            &format!("replica server in {}", paths.dir.display()),
        )?;
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

/// Make the server behind `qmp` export `export`; idempotent.
fn ensure_export(qmp: &mut Qmp, paths: &ServerPaths, export: &ReplicaExport) -> OsResult<()> {
    let id = export_id(&export.replica_id);
    let node = node_name(&export.replica_id);
    let want = resolve_parent(&export.path);
    let conflict = |file: &Path| {
        OsError::Conflict(format!(
            "replica server in {} already exports replica {:?} from {}, not from {}; unexport it \
             first",
            paths.dir.display(),
            export.replica_id,
            file.display(),
            export.path.display()
        ))
    };
    let exported = list_exports(qmp)?.into_iter().any(|(e, _)| e == id);
    match node_file(qmp, &node)? {
        Some(file) if resolve_parent(&file) == want => {
            if exported {
                return Ok(());
            }
        }
        Some(file) if exported => return Err(conflict(&file)),
        Some(_) => {
            // Left over from an interrupted export of another file: not served, so drop it.
            qmp.call("blockdev-del", json!({"node-name": node}))?;
            add_node(qmp, &node, &want, export.format)?;
        }
        None => add_node(qmp, &node, &want, export.format)?,
    }
    let added = qmp.call(
        "block-export-add",
        json!({"type": "nbd", "id": id, "node-name": node, "name": export.replica_id,
            "writable": true}),
    );
    if let Err(e) = added {
        let _ = qmp.execute("blockdev-del", Some(json!({"node-name": node})));
        return Err(e);
    }
    Ok(())
}

/// The replica's format node over its file: qcow2, or raw for a loop engine's replica (opened
/// with the raw driver, never probed: a raw volume may hold any bytes, a qcow2 header too).
fn add_node(qmp: &mut Qmp, node: &str, path: &Path, format: ImageFormat) -> OsResult<()> {
    let filename = utf8_path(path)?;
    qmp.call(
        "blockdev-add",
        json!({"driver": format.as_str(), "node-name": node, "discard": "unmap",
            "file": {"driver": "file", "filename": filename, "discard": "unmap"}}),
    )
    .map(|_| ())
}

pub(crate) fn export_replica(
    qsd: &QemuStorageDaemon,
    run_dir: &Path,
    host: &str,
    port: u16,
    export: &ReplicaExport,
) -> OsResult<u16> {
    check_replica_export(run_dir, host, export)?;
    let _guard = server_lock();
    std::fs::create_dir_all(run_dir).map_err(|e| {
        OsError::io(
            format!(
                "creating run directory {} of the replica server",
                run_dir.display()
            ),
            e,
        )
    })?;
    let tls = qsd.nbd_tls.is_some();
    let (paths, port, fresh) = match live_server(run_dir) {
        Some((paths, _, args)) if args.tls != tls => {
            // Started before the node's TLS setting changed: restarted when it serves nothing,
            // never silently kept (a plain server would serve anyone).
            let exports = Qmp::connect(&paths.qmp).and_then(|mut q| list_exports(&mut q))?;
            if !exports.is_empty() {
                return Err(OsError::Conflict(format!(
                    "replica server in {} runs {} but this node {}; unexport its replicas (it \
                     stops with the last one, e.g. detach their volumes) and export again",
                    paths.dir.display(),
                    if args.tls { "with TLS" } else { "without TLS" },
                    if tls {
                        "has a --tls-dir"
                    } else {
                        "runs --insecure"
                    },
                )));
            }
            stop_server(qsd, &paths)?;
            std::fs::create_dir_all(run_dir).map_err(|e| {
                OsError::io(format!("creating run directory {}", run_dir.display()), e)
            })?;
            let paths = ServerPaths::new(run_dir);
            let (_, port) = start_server(qsd, &paths, host, port)?;
            (paths, port, true)
        }
        Some((paths, _, args)) => {
            if args.host != host || (port != 0 && port != args.port) {
                return Err(OsError::Conflict(format!(
                    "replica server in {} listens on {}:{}, not on {host}:{port}; unexport its \
                     replicas first (it stops with the last one) or use that address",
                    paths.dir.display(),
                    args.host,
                    args.port
                )));
            }
            (paths, args.port, false)
        }
        None => {
            let paths = ServerPaths::new(run_dir);
            let (_, port) = start_server(qsd, &paths, host, port)?;
            (paths, port, true)
        }
    };
    let result = Qmp::connect(&paths.qmp).and_then(|mut qmp| {
        ensure_export(&mut qmp, &paths, export)?;
        list_exports(&mut qmp)
    });
    match result {
        Ok(_) => Ok(port),
        Err(e) => {
            // A server started for this export alone must not outlive its failure.
            if fresh {
                let _ = stop_server(qsd, &paths);
            }
            Err(e)
        }
    }
}

/// How long a safe unexport waits for a client that has just disconnected to be released.
const CLIENT_RELEASE_GRACE: Duration = Duration::from_secs(2);

pub(crate) fn unexport_replica(
    qsd: &QemuStorageDaemon,
    run_dir: &Path,
    replica_id: &str,
    force: bool,
) -> OsResult<()> {
    let _guard = server_lock();
    let Some((paths, _, args)) = live_server(run_dir) else {
        // Nothing runs: nothing is exported. Clear a dead server's leftovers.
        if run_dir.is_dir() {
            stop_server(qsd, &ServerPaths::new(run_dir))?;
        }
        return Ok(());
    };
    let id = export_id(replica_id);
    let node = node_name(replica_id);
    let mut qmp = Qmp::connect(&paths.qmp)?;
    if list_exports(&mut qmp)?.iter().any(|(e, _)| *e == id) {
        let mode = if force { "hard" } else { "safe" };
        let display = format!("QMP block-export-del {id} (mode {mode})");
        // An engine that has just stopped may still count as a client for a moment: qemu
        // releases a closed connection asynchronously. Only one that stays connected is busy.
        let grace = Instant::now() + CLIENT_RELEASE_GRACE;
        loop {
            match qmp.execute("block-export-del", Some(json!({"id": id, "mode": mode})))? {
                Ok(_) => break,
                Err(e) if e.desc.contains("in use") && Instant::now() < grace => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) if e.desc.contains("in use") => {
                    return Err(OsError::Busy(format!(
                        "replica {replica_id:?} exported on {}:{} is still in use by a volume \
                         engine (an attaching node is connected to it); stop that engine first, \
                         or use unexport_replica_force when that node is gone",
                        args.host, args.port
                    )));
                }
                Err(e) => return Err(qmp_failure(display, &e.desc)),
            }
        }
        // The deletion completes asynchronously (at once without clients; after the clients
        // are cut off in hard mode).
        let deadline = Instant::now() + qsd.stop_timeout;
        while list_exports(&mut qmp)?.iter().any(|(e, _)| *e == id) {
            if Instant::now() >= deadline {
                return Err(OsError::Timeout(format!(
                    "replica server in {}: export of {replica_id:?} still shutting down after \
                     {:?}",
                    paths.dir.display(),
                    qsd.stop_timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if node_file(&mut qmp, &node)?.is_some() {
        qmp.call("blockdev-del", json!({"node-name": node}))?;
    }
    if list_exports(&mut qmp)?.is_empty() {
        drop(qmp);
        stop_server(qsd, &paths)?;
    }
    Ok(())
}

/// Whether qemu-storage-daemon's replica server runs in `run_dir`.
pub(crate) fn serving(run_dir: &Path) -> bool {
    live_server(run_dir).is_some()
}

pub(crate) fn replica_server_status(
    _qsd: &QemuStorageDaemon,
    run_dir: &Path,
) -> OsResult<Option<(u16, Vec<String>)>> {
    let _guard = server_lock();
    let Some((paths, _, args)) = live_server(run_dir) else {
        return Ok(None);
    };
    let mut qmp = Qmp::connect(&paths.qmp)?;
    let mut ids: Vec<String> = list_exports(&mut qmp)?
        .into_iter()
        .filter_map(|(e, _)| replica_of(&e))
        .collect();
    ids.sort();
    Ok(Some((args.port, ids)))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::fs;
    use std::io::Write as _;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::process::Command;
    use std::sync::mpsc;

    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    use super::*;
    use crate::os::engine::wait_exit;
    use crate::os::fake::Fake;
    use crate::os::testutil::{Cleanup, sh};
    use crate::os::{Engine, Os, ReplicaTarget, VolumeEngineSpec};

    /// Tests listen on loopback only.
    const HOST: &str = "127.0.0.1";

    fn kind(r: &OsResult<impl std::fmt::Debug>) -> String {
        match r {
            Ok(v) => format!("Ok({v:?})"),
            Err(OsError::Command { .. }) => "Command".into(),
            Err(OsError::Io { .. }) => "Io".into(),
            Err(OsError::NotFound(_)) => "NotFound".into(),
            Err(OsError::Busy(_)) => "Busy".into(),
            Err(OsError::Conflict(_)) => "Conflict".into(),
            Err(OsError::Unsupported(_)) => "Unsupported".into(),
            Err(OsError::NoSpace(_)) => "NoSpace".into(),
            Err(OsError::Timeout(_)) => "Timeout".into(),
            Err(OsError::Unavailable(_)) => "Unavailable".into(),
            Err(OsError::Other(_)) => "Other".into(),
        }
    }

    fn nbd(port: u16, export: &str) -> ReplicaTarget {
        ReplicaTarget::Nbd {
            host: HOST.into(),
            port,
            export: export.into(),
        }
    }

    fn export(id: &str, path: &Path) -> ReplicaExport {
        ReplicaExport {
            replica_id: id.into(),
            path: path.to_path_buf(),
            format: ImageFormat::of_file(path),
        }
    }

    /// qcow2 replicas `names` of `size` bytes in `disk` (created).
    fn replicas(os: &Os, disk: &Path, names: &[&str], size: u64) -> Vec<PathBuf> {
        fs::create_dir_all(disk).unwrap();
        names
            .iter()
            .map(|n| {
                let r = disk.join(format!("{n}.qcow2"));
                os.images.create_replica(&r, size, None).unwrap();
                r
            })
            .collect()
    }

    /// Two nodes of one machine in `d` for the real tests: `a` with its replica r0, `b` with
    /// the replicas `remote`, which b's replica server (run dir `b/run`, registered in `cb`)
    /// is to serve. Returns (r0, b's replicas, the server's run dir).
    fn two_nodes(
        os: &Os,
        d: &Path,
        cb: &mut Cleanup,
        remote: &[&str],
        size: u64,
    ) -> (PathBuf, Vec<PathBuf>, PathBuf) {
        let r0 = replicas(os, &d.join("a"), &["r0"], size).remove(0);
        let rb = replicas(os, &d.join("b"), remote, size);
        let server = d.join("b/run");
        cb.replica_server(&server);
        (r0, rb, server)
    }

    /// Volume "v" on node a (run dir `a/run`) over `replicas`, writable.
    fn volume_spec(d: &Path, replicas: Vec<ReplicaTarget>) -> VolumeEngineSpec {
        VolumeEngineSpec {
            volume_id: "v".into(),
            replicas,
            run_dir: d.join("a/run"),
            read_only: false,
        }
    }

    /// Starts `spec`'s engine and attaches its export to a loop device, both registered in `ca`;
    /// returns the device.
    fn start_attached(os: &Os, ca: &mut Cleanup, spec: &VolumeEngineSpec) -> PathBuf {
        ca.engine(&spec.run_dir);
        let state = os.engine.start_volume(spec).unwrap();
        let dev = os.loops.attach(&state.export_path).unwrap();
        ca.loop_file(&state.export_path);
        dev
    }

    /// The real replica server of `run_dir` dies at once (SIGKILL): the kernel closes its
    /// connections, as when its node's bicsi-managed daemon crashes.
    pub(crate) fn kill_real_server(run_dir: &Path) {
        let pid: i32 = fs::read_to_string(run_dir.join("qsd.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        assert!(wait_exit(pid, Duration::from_secs(5)));
    }

    fn write_synced(path: &Path, data: &[u8]) {
        let mut f = fs::File::create(path).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }

    fn compare(a: &Path, b: &Path) -> String {
        let out = crate::os::output(
            Command::new("qemu-img")
                .args(["compare", "-U"])
                .arg(a)
                .arg(b),
        )
        .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Two nodes: B serves replicas, A runs the volume engine over a local replica and B's. As
    /// observations that must be the same on the fakes and on the real machine (the contract
    /// test, `crate::os::fake`'s `fake_and_real_keep_one_contract`, runs it on both).
    pub(crate) fn remote_flow(
        a: &Os,
        b: &Os,
        dir: &Path,
        ca: &mut Cleanup,
        cb: &mut Cleanup,
        kill_server: &dyn Fn(&Path),
    ) -> Vec<String> {
        let mut seen = Vec::new();
        let mut note = |what: &str, v: String| seen.push(format!("{what}: {v}"));
        let size = 64u64 << 20;
        let r0 = replicas(a, &dir.join("a/disk"), &["r0"], size).remove(0);
        let rb = replicas(b, &dir.join("b/disk"), &["r1", "r2", "r3"], size);
        let (r1, r2, r3) = (&rb[0], &rb[1], &rb[2]);
        let server = dir.join("b/run/replicas");
        cb.replica_server(&server);
        let port = free_port(HOST).unwrap();
        let same_port = |r: OsResult<u16>| kind(&r.map(|p| p == port));

        let e = &b.engine;
        note(
            "export r1",
            same_port(e.export_replica(&server, HOST, port, &export("pvc-1-r1", r1))),
        );
        note(
            "export r2",
            same_port(e.export_replica(&server, HOST, port, &export("pvc-1-r2", r2))),
        );
        note(
            "export r1 again",
            same_port(e.export_replica(&server, HOST, port, &export("pvc-1-r1", r1))),
        );
        note(
            "export r1 on any port",
            same_port(e.export_replica(&server, HOST, 0, &export("pvc-1-r1", r1))),
        );
        note(
            "export r1 on another host",
            same_port(e.export_replica(&server, "localhost", port, &export("pvc-1-r1", r1))),
        );
        note(
            "export r1 on another port",
            same_port(e.export_replica(
                &server,
                HOST,
                port.wrapping_add(1),
                &export("pvc-1-r1", r1),
            )),
        );
        note(
            "export r1 from another file",
            same_port(e.export_replica(&server, HOST, port, &export("pvc-1-r1", r3))),
        );
        note(
            "export r1's file as another replica",
            same_port(e.export_replica(&server, HOST, port, &export("other", r1))),
        );
        note(
            "export a missing file",
            same_port(e.export_replica(
                &server,
                HOST,
                port,
                &export("x", &dir.join("b/disk/none")),
            )),
        );
        note(
            "server status",
            kind(
                &e.replica_server_status(&server)
                    .map(|s| s.map(|(p, ids)| (p == port, ids))),
            ),
        );

        let run = dir.join("a/run/vol");
        ca.engine(&run);
        let spec = VolumeEngineSpec {
            volume_id: "pvc-1".into(),
            replicas: vec![
                ReplicaTarget::Local(r0.clone()),
                nbd(port, "pvc-1-r1"),
                nbd(port, "pvc-1-r2"),
            ],
            run_dir: run.clone(),
            read_only: false,
        };
        let bad = VolumeEngineSpec {
            replicas: vec![ReplicaTarget::Local(r0.clone()), nbd(port, "nope")],
            run_dir: dir.join("a/run/bad"),
            ..spec.clone()
        };
        ca.engine(&bad.run_dir);
        note(
            "start with an unexported replica",
            kind(&a.engine.start_volume(&bad)),
        );
        note(
            "start with port 0",
            kind(&a.engine.start_volume(&VolumeEngineSpec {
                replicas: vec![nbd(0, "pvc-1-r1")],
                ..bad.clone()
            })),
        );
        let state = a.engine.start_volume(&spec).unwrap();
        note(
            "state lists the local replica",
            format!("{}", state.replicas == [r0.clone()]),
        );
        let vs = a.engine.volume_status(&run).unwrap().unwrap();
        note(
            "volume status",
            format!(
                "{} {} {:?} {}",
                vs.engine == state,
                vs.replicas == spec.replicas,
                vs.reconnected,
                vs.remote_errors
            ),
        );
        let mut reordered = spec.clone();
        reordered.replicas.reverse();
        note(
            "start again reordered",
            format!(
                "{}",
                a.engine.start_volume(&reordered).unwrap().pid == state.pid
            ),
        );
        note(
            "start another set",
            kind(&a.engine.start_volume(&VolumeEngineSpec {
                replicas: spec.replicas[..2].to_vec(),
                ..spec.clone()
            })),
        );
        let dev = a.loops.attach(&state.export_path).unwrap();
        ca.loop_file(&state.export_path);
        note("device size", kind(&a.fs.device_size(&dev)));
        note(
            "unexport r1 in use",
            kind(&e.unexport_replica(&server, "pvc-1-r1")),
        );
        note(
            "force unexport r2 in use",
            kind(&e.unexport_replica_force(&server, "pvc-1-r2")),
        );
        note(
            "unexport r2 again",
            kind(&e.unexport_replica(&server, "pvc-1-r2")),
        );
        note(
            "server status",
            kind(
                &e.replica_server_status(&server)
                    .map(|s| s.map(|(_, ids)| ids)),
            ),
        );

        kill_server(&server);
        note(
            "server status after kill",
            kind(&e.replica_server_status(&server)),
        );
        note(
            "engine alive after kill",
            format!("{}", a.engine.status(&run).unwrap().is_some()),
        );
        note(
            "export r1 after kill",
            same_port(e.export_replica(&server, HOST, port, &export("pvc-1-r1", r1))),
        );
        // The first write after the loss fails on r1 (and on r2, gone), succeeds on r0, and r1
        // is connected again for the next ones.
        note("mkfs", kind(&a.fs.mkfs(&dev, "ext4")));
        note("probe", kind(&a.fs.probe(&dev)));
        let vs = a.engine.volume_status(&run).unwrap().unwrap();
        note(
            "reconnected",
            format!("{}", vs.reconnected == [nbd(port, "pvc-1-r1")]),
        );
        note("remote errors", format!("{}", vs.remote_errors > 0));

        a.loops.detach(&dev).unwrap();
        note("stop engine", kind(&a.engine.stop(&run)));
        note(
            "unexport r1",
            kind(&e.unexport_replica(&server, "pvc-1-r1")),
        );
        note(
            "server status at the end",
            kind(&e.replica_server_status(&server)),
        );
        note("server dir gone", format!("{}", !server.exists()));
        note(
            "unexport r1 again",
            kind(&e.unexport_replica(&server, "pvc-1-r1")),
        );

        // What the replicas hold: r2 was cut off before the mkfs.
        for (os, r, name, cleanup) in [(a, &r0, "r0", &mut *ca), (b, r2, "r2", &mut *cb)] {
            let run = dir.join(format!("check-{name}"));
            cleanup.engine(&run);
            let st = os
                .engine
                .start_volume(&VolumeEngineSpec {
                    volume_id: "check".into(),
                    replicas: vec![ReplicaTarget::Local(r.clone())],
                    run_dir: run.clone(),
                    read_only: true,
                })
                .unwrap();
            let dev = os.loops.attach(&st.export_path).unwrap();
            cleanup.loop_file(&st.export_path);
            note(&format!("{name} holds"), kind(&os.fs.probe(&dev)));
            os.loops.detach(&dev).unwrap();
            os.engine.stop(&run).unwrap();
        }
        seen
    }

    pub(crate) const EXPECTED_REMOTE: &[&str] = &[
        "export r1: Ok(true)",
        "export r2: Ok(true)",
        "export r1 again: Ok(true)",
        "export r1 on any port: Ok(true)",
        "export r1 on another host: Conflict",
        "export r1 on another port: Conflict",
        "export r1 from another file: Conflict",
        "export r1's file as another replica: Command",
        "export a missing file: NotFound",
        "server status: Ok(Some((true, [\"pvc-1-r1\", \"pvc-1-r2\"])))",
        "start with an unexported replica: Command",
        "start with port 0: Unsupported",
        "state lists the local replica: true",
        "volume status: true true [] 0",
        "start again reordered: true",
        "start another set: Conflict",
        "device size: Ok(67108864)",
        "unexport r1 in use: Busy",
        "force unexport r2 in use: Ok(())",
        "unexport r2 again: Ok(())",
        "server status: Ok(Some([\"pvc-1-r1\"]))",
        "server status after kill: Ok(None)",
        "engine alive after kill: true",
        "export r1 after kill: Ok(true)",
        "mkfs: Ok(())",
        "probe: Ok(Some(\"ext4\"))",
        "reconnected: true",
        "remote errors: true",
        "stop engine: Ok(())",
        "unexport r1: Ok(())",
        "server status at the end: Ok(None)",
        "server dir gone: true",
        "unexport r1 again: Ok(())",
        "r0 holds: Ok(Some(\"ext4\"))",
        "r2 holds: Ok(None)",
    ];

    #[test]
    fn fake_remote_flow_on_two_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = Fake::new_cluster(2);
        let (a, b) = (nodes[0].os(), nodes[1].os());
        let mut cb = Cleanup::with(b.clone());
        let mut ca = Cleanup::with(a.clone());
        let node_b = nodes[1].clone();
        let seen = remote_flow(&a, &b, dir.path(), &mut ca, &mut cb, &|run_dir| {
            node_b.kill_replica_server(run_dir)
        });
        assert_eq!(seen, EXPECTED_REMOTE);
        assert!(nodes[0].engines().is_empty());
        assert!(nodes[1].engines().is_empty());
        assert!(nodes[1].replica_servers().is_empty());
    }

    #[test]
    fn fake_nodes_share_the_net_not_their_machines() {
        let dir = tempfile::tempdir().unwrap();
        let a = Fake::new();
        let b = Fake::with_net(&a.net());
        let lonely = Fake::new();
        let (oa, ob) = (a.os(), b.os());
        let r1 = replicas(&ob, &dir.path().join("b"), &["r1"], 1 << 30).remove(0);
        let server = dir.path().join("b/run");
        let port = ob
            .engine
            .export_replica(&server, HOST, 0, &export("r1", &r1))
            .unwrap();
        assert!(port > 0);
        assert_eq!(
            b.replica_servers(),
            vec![(
                resolve_parent(&server),
                HOST.to_string(),
                port,
                vec!["r1".to_string()]
            )]
        );
        // The server is B's: A has none in that run dir, and its port is taken for A too.
        assert_eq!(oa.engine.replica_server_status(&server).unwrap(), None);
        let ra = replicas(&oa, &dir.path().join("a"), &["ra"], 1 << 30).remove(0);
        let err = oa
            .engine
            .export_replica(&dir.path().join("a/run"), HOST, port, &export("ra", &ra))
            .unwrap_err();
        assert!(matches!(err, OsError::Conflict(_)), "{err}");
        // The exported file is open: B cannot resize it or run an engine on it.
        let err = ob.images.resize(&r1, 2 << 30).unwrap_err();
        assert!(err.to_string().contains("lock"), "{err}");
        let local = VolumeEngineSpec {
            volume_id: "v".into(),
            replicas: vec![ReplicaTarget::Local(r1.clone())],
            run_dir: dir.path().join("b/engine"),
            read_only: false,
        };
        assert!(matches!(
            ob.engine.start_volume(&local),
            Err(OsError::Command { .. })
        ));
        // A machine on another network does not reach it.
        let remote = VolumeEngineSpec {
            replicas: vec![nbd(port, "r1")],
            run_dir: dir.path().join("a/engine"),
            ..local.clone()
        };
        assert!(matches!(
            lonely.os().engine.start_volume(&remote),
            Err(OsError::Command { .. })
        ));
        // A does; the volume's content is the remote replica's.
        let st = oa.engine.start_volume(&remote).unwrap();
        assert!(st.replicas.is_empty());
        let dev = oa.loops.attach(&st.export_path).unwrap();
        assert_eq!(oa.fs.device_size(&dev).unwrap(), 1 << 30);
        oa.fs.mkfs(&dev, "xfs").unwrap();
        assert_eq!(oa.fs.probe(&dev).unwrap().as_deref(), Some("xfs"));
        // Its only replica gone, the volume fails with EIO.
        ob.engine.unexport_replica_force(&server, "r1").unwrap();
        assert!(b.replica_servers().is_empty());
        let err = oa.fs.probe(&dev).unwrap_err();
        assert!(matches!(err, OsError::Io { .. }), "{err}");
        oa.loops.detach(&dev).unwrap();
        oa.engine.stop(&remote.run_dir).unwrap();
        // B can use its replica again, with what A wrote.
        ob.engine.start_volume(&local).unwrap();
        let st = ob.engine.status(&local.run_dir).unwrap().unwrap();
        let dev = ob.loops.attach(&st.export_path).unwrap();
        assert_eq!(ob.fs.probe(&dev).unwrap().as_deref(), Some("xfs"));
        // Injected failures of the new operations.
        b.fail_next("engine.export_replica", OsError::Other("boom".into()));
        assert!(
            ob.engine
                .export_replica(&server, HOST, 0, &export("r1", &r1))
                .is_err()
        );
        ob.loops.detach(&dev).unwrap();
        ob.engine.stop(&local.run_dir).unwrap();
    }

    #[test]
    fn ids_and_names() {
        for id in ["pvc-1-r1", "a,b c/'\"é", &"x".repeat(300)] {
            let e = export_id(id);
            assert!(e.starts_with("r-"));
            assert!(
                e.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            );
            assert_eq!(replica_of(&e).as_deref(), Some(id));
            let n = node_name(id);
            assert!(n.len() <= 31 && n.starts_with("rq-"), "{n}");
        }
        assert_ne!(node_name("a"), node_name("b"));
        assert_eq!(replica_of("export0"), None);
        let paths = ServerPaths::new(Path::new("/var/lib/bi,csi/run/replicas"));
        let mut argv = vec!["/usr/bin/qemu-storage-daemon".to_string()];
        argv.extend(build_server_args("10.0.0.7", 10809, &paths, false).unwrap());
        assert_eq!(
            parse_server_args(&argv, &paths.pid),
            Some(ServerArgs {
                host: "10.0.0.7".into(),
                port: 10809,
                tls: false,
            })
        );
        assert!(!argv.iter().any(|a| a.contains("tls")), "{argv:?}");
        // With the node's --tls-dir: credentials and authorization before the server names
        // them, read back as a TLS server.
        let mut tls = vec!["/usr/bin/qemu-storage-daemon".to_string()];
        tls.extend(build_server_args("10.0.0.7", 10809, &paths, true).unwrap());
        assert_eq!(
            parse_server_args(&tls, &paths.pid).map(|a| a.tls),
            Some(true)
        );
        assert_eq!(
            tls[1..5],
            [
                "--object",
                "tls-creds-x509,id=bicsi-nbd-tls,endpoint=server,verify-peer=on,\
                 dir=/var/lib/bi,,csi/run/replicas/tls",
                "--object",
                "authz-simple,id=bicsi-nbd-authz,identity=CN=bicsi-node",
            ]
        );
        let server: Value = serde_json::from_str(&tls[6]).unwrap();
        assert_eq!(server["tls-creds"], "bicsi-nbd-tls");
        assert_eq!(server["tls-authz"], "bicsi-nbd-authz");
        assert_eq!(parse_server_args(&argv, Path::new("/other/qsd.pid")), None);
        assert!(
            argv.contains(
                &"socket,id=qmp0,path=/var/lib/bi,,csi/run/replicas/qmp.sock,server=on,wait=off"
                    .to_string()
            )
        );
    }

    /// (1) A volume over one local and two remote replicas: every write reaches all three.
    #[test]
    fn real_quorum_over_local_and_remote_replicas_writes_all() {
        if !crate::os::root_or_skip("real_quorum_over_local_and_remote_replicas_writes_all") {
            return;
        }
        let os = Os::real();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut cb = Cleanup::default();
        let mut ca = Cleanup::default();
        let (r0, rb, server) = two_nodes(&os, d, &mut cb, &["r1", "r2"], 64 << 20);
        let t = Instant::now();
        let port = os
            .engine
            .export_replica(&server, HOST, 0, &export("v-r1", &rb[0]))
            .unwrap();
        eprintln!("replica server start + first export: {:?}", t.elapsed());
        let t = Instant::now();
        assert_eq!(
            os.engine
                .export_replica(&server, HOST, port, &export("v-r2", &rb[1]))
                .unwrap(),
            port
        );
        eprintln!("second export on the running server: {:?}", t.elapsed());
        let spec = volume_spec(
            d,
            vec![
                ReplicaTarget::Local(r0.clone()),
                nbd(port, "v-r1"),
                nbd(port, "v-r2"),
            ],
        );
        ca.engine(&spec.run_dir);
        let mnt = d.join("mnt");
        ca.mount(&mnt);
        let t = Instant::now();
        let state = os.engine.start_volume(&spec).unwrap();
        eprintln!("volume engine start (1 local + 2 NBD): {:?}", t.elapsed());
        let dev = os.loops.attach(&state.export_path).unwrap();
        ca.loop_file(&state.export_path);
        os.fs.mkfs(&dev, "ext4").unwrap();
        os.mounts.mount(&dev, &mnt, "ext4", &[]).unwrap();
        let data = crate::kit::noise(8 << 20, 1);
        let t = Instant::now();
        write_synced(&mnt.join("data"), &data);
        eprintln!("8 MiB written and synced: {:?}", t.elapsed());
        os.mounts.unmount(&mnt).unwrap();
        // Quiet now: the replicas compare equal even while both daemons run.
        assert_eq!(compare(&r0, &rb[0]), "Images are identical.");
        assert_eq!(compare(&r0, &rb[1]), "Images are identical.");
        let vs = os.engine.volume_status(&spec.run_dir).unwrap().unwrap();
        assert_eq!((vs.reconnected.len(), vs.remote_errors), (0, 0), "{vs:?}");
        os.loops.detach(&dev).unwrap();
        // The engine first, then the server (which refuses while the engine is connected).
        os.engine.stop(&spec.run_dir).unwrap();
        os.engine.unexport_replica(&server, "v-r1").unwrap();
        os.engine.unexport_replica(&server, "v-r2").unwrap();
        assert_eq!(os.engine.replica_server_status(&server).unwrap(), None);
        for r in &rb {
            let cmp = sh(Command::new("qemu-img").arg("compare").arg(&r0).arg(r));
            assert!(cmp.contains("identical"), "{cmp}");
            let check = sh(Command::new("qemu-img").arg("check").arg(r));
            assert!(check.contains("No errors were found"), "{check}");
        }
        // The data reads back from a remote replica alone.
        let port = os
            .engine
            .export_replica(&server, HOST, 0, &export("v-r2", &rb[1]))
            .unwrap();
        let only = VolumeEngineSpec {
            replicas: vec![nbd(port, "v-r2")],
            read_only: true,
            ..spec.clone()
        };
        let state = os.engine.start_volume(&only).unwrap();
        let dev = os.loops.attach(&state.export_path).unwrap();
        ca.loop_file(&state.export_path);
        os.mounts
            .mount(&dev, &mnt, "ext4", &["ro".to_string()])
            .unwrap();
        assert!(fs::read(mnt.join("data")).unwrap() == data);
        os.mounts.unmount(&mnt).unwrap();
        os.loops.detach(&dev).unwrap();
        os.engine.stop(&only.run_dir).unwrap();
        os.engine.unexport_replica(&server, "v-r2").unwrap();
        assert!(!server.exists());
    }

    /// (2) Exports come and go one by one; the others keep serving.
    #[test]
    fn real_unexport_one_replica_keeps_the_others() {
        if !crate::os::root_or_skip("real_unexport_one_replica_keeps_the_others") {
            return;
        }
        let os = Os::real();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut cb = Cleanup::default();
        let mut ca = Cleanup::default();
        let (r0, rb, server) = two_nodes(&os, d, &mut cb, &["r1", "r2", "r3"], 64 << 20);
        let port = os
            .engine
            .export_replica(&server, HOST, 0, &export("v-r1", &rb[0]))
            .unwrap();
        for (id, r) in [("v-r2", &rb[1]), ("other", &rb[2]), ("v-r1", &rb[0])] {
            assert_eq!(
                os.engine
                    .export_replica(&server, HOST, 0, &export(id, r))
                    .unwrap(),
                port
            );
        }
        // An exported file is open in the server: no resize, no engine of this node on it.
        let err = os.images.resize(&rb[0], 128 << 20).unwrap_err();
        assert!(err.to_string().contains("lock"), "{err}");
        let local = VolumeEngineSpec {
            volume_id: "b".into(),
            replicas: vec![ReplicaTarget::Local(rb[0].clone())],
            run_dir: d.join("b/engine"),
            read_only: false,
        };
        cb.engine(&local.run_dir);
        let err = os.engine.start_volume(&local).unwrap_err();
        assert!(err.to_string().contains("lock"), "{err}");

        let spec = volume_spec(
            d,
            vec![
                ReplicaTarget::Local(r0.clone()),
                nbd(port, "v-r1"),
                nbd(port, "v-r2"),
            ],
        );
        let mnt = d.join("mnt");
        ca.mount(&mnt);
        let dev = start_attached(&os, &mut ca, &spec);
        os.fs.mkfs(&dev, "ext4").unwrap();
        os.mounts.mount(&dev, &mnt, "ext4", &[]).unwrap();
        let one = crate::kit::noise(4 << 20, 2);
        write_synced(&mnt.join("one"), &one);

        // An export nobody uses goes at once; the volume does not notice.
        os.engine.unexport_replica(&server, "other").unwrap();
        os.engine.unexport_replica(&server, "other").unwrap();
        assert_eq!(
            os.engine.replica_server_status(&server).unwrap(),
            Some((port, vec!["v-r1".to_string(), "v-r2".to_string()]))
        );
        // One in use is refused, then cut off by force; the volume goes on without it.
        let err = os.engine.unexport_replica(&server, "v-r2").unwrap_err();
        assert!(matches!(err, OsError::Busy(_)), "{err}");
        assert!(err.to_string().contains("stop that engine"), "{err}");
        let t = Instant::now();
        os.engine.unexport_replica_force(&server, "v-r2").unwrap();
        eprintln!("forced unexport of a replica in use: {:?}", t.elapsed());
        assert_eq!(
            os.engine.replica_server_status(&server).unwrap(),
            Some((port, vec!["v-r1".to_string()]))
        );
        let two = crate::kit::noise(4 << 20, 3);
        write_synced(&mnt.join("two"), &two);
        os.mounts.unmount(&mnt).unwrap();
        os.mounts.mount(&dev, &mnt, "ext4", &[]).unwrap();
        assert!(fs::read(mnt.join("one")).unwrap() == one);
        assert!(fs::read(mnt.join("two")).unwrap() == two);
        os.mounts.unmount(&mnt).unwrap();
        let vs = os.engine.volume_status(&spec.run_dir).unwrap().unwrap();
        eprintln!("after the forced unexport: {vs:?}");
        assert!(vs.remote_errors > 0, "{vs:?}");
        assert!(vs.reconnected.is_empty(), "{vs:?}");
        // The remaining export kept up; the cut one missed the second file.
        assert_eq!(compare(&r0, &rb[0]), "Images are identical.");
        assert_ne!(compare(&r0, &rb[1]), "Images are identical.");
        os.loops.detach(&dev).unwrap();
        os.engine.stop(&spec.run_dir).unwrap();
        os.engine.unexport_replica(&server, "v-r1").unwrap();
        assert_eq!(os.engine.replica_server_status(&server).unwrap(), None);
        // Closed: this node may use the file again.
        os.engine.start_volume(&local).unwrap();
        os.engine.stop(&local.run_dir).unwrap();
    }

    /// (3) The remote replica server dies while the volume is written: the volume keeps working
    /// from the local replica; qemu reconnects silently once the export is back.
    #[test]
    fn real_remote_death_keeps_the_volume_writable() {
        if !crate::os::root_or_skip("real_remote_death_keeps_the_volume_writable") {
            return;
        }
        let os = Os::real();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut cb = Cleanup::default();
        let mut ca = Cleanup::default();
        let (r0, mut rb, server) = two_nodes(&os, d, &mut cb, &["r1"], 128 << 20);
        let r1 = rb.remove(0);
        let port = os
            .engine
            .export_replica(&server, HOST, 0, &export("v-r1", &r1))
            .unwrap();
        let spec = volume_spec(d, vec![ReplicaTarget::Local(r0.clone()), nbd(port, "v-r1")]);
        let mnt = d.join("mnt");
        ca.mount(&mnt);
        let dev = start_attached(&os, &mut ca, &spec);
        os.fs.mkfs(&dev, "ext4").unwrap();
        os.mounts.mount(&dev, &mnt, "ext4", &[]).unwrap();
        let before = crate::kit::noise(4 << 20, 4);
        write_synced(&mnt.join("before"), &before);

        // Kill the server while a writer is busy on the volume.
        let (tx, rx) = mpsc::channel();
        let path = mnt.join("during");
        let writer = std::thread::spawn(move || {
            let mut written = Vec::new();
            let mut f = fs::File::create(&path)?;
            for i in 0..32u64 {
                let chunk = crate::kit::noise(1 << 20, 100 + i);
                f.write_all(&chunk)?;
                f.sync_data()?;
                written.extend_from_slice(&chunk);
                if i == 4 {
                    let _ = tx.send(());
                }
            }
            Ok::<_, std::io::Error>(written)
        });
        rx.recv_timeout(Duration::from_secs(30)).unwrap();
        kill_real_server(&server);
        let during = writer.join().unwrap().expect("writes keep working");
        let after = crate::kit::noise(4 << 20, 5);
        write_synced(&mnt.join("after"), &after);
        assert_eq!(os.engine.replica_server_status(&server).unwrap(), None);
        let vs = os.engine.volume_status(&spec.run_dir).unwrap().unwrap();
        eprintln!("remote killed mid-write: {vs:?}");
        assert!(vs.remote_errors > 0, "{vs:?}");
        assert!(vs.reconnected.is_empty(), "{vs:?}");
        // Everything reads back from the device (remounted: nothing from the page cache).
        os.mounts.unmount(&mnt).unwrap();
        os.mounts.mount(&dev, &mnt, "ext4", &[]).unwrap();
        assert!(fs::read(mnt.join("before")).unwrap() == before);
        assert!(fs::read(mnt.join("during")).unwrap() == during);
        assert!(fs::read(mnt.join("after")).unwrap() == after);

        // The export back on the same port: the engine reconnects at the next write, silently;
        // only volume_status tells, and the replica misses what was written meanwhile.
        assert_eq!(
            os.engine
                .export_replica(&server, HOST, port, &export("v-r1", &r1))
                .unwrap(),
            port
        );
        // qemu's connection thread retries with a backoff that grows to 16 s while the export
        // is away, and a request only fails over to it once connected: write until it is.
        let t = Instant::now();
        let mut writes = 0;
        let vs = loop {
            write_synced(&mnt.join("back"), &crate::kit::noise(64 << 10, 6 + writes));
            writes += 1;
            let vs = os.engine.volume_status(&spec.run_dir).unwrap().unwrap();
            if !vs.reconnected.is_empty() || t.elapsed() > Duration::from_secs(40) {
                break vs;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        eprintln!(
            "export back: reconnected after {:?} and {writes} synced writes: {vs:?}",
            t.elapsed()
        );
        assert_eq!(vs.reconnected, vec![nbd(port, "v-r1")]);
        os.mounts.unmount(&mnt).unwrap();
        assert!(matches!(
            os.engine.unexport_replica(&server, "v-r1"),
            Err(OsError::Busy(_))
        ));
        os.loops.detach(&dev).unwrap();
        os.engine.stop(&spec.run_dir).unwrap();
        os.engine.unexport_replica(&server, "v-r1").unwrap();
        let cmp = compare(&r0, &r1);
        assert!(cmp.contains("mismatch"), "{cmp}");
    }

    /// (3b) A remote that hangs without closing its connection (stopped process, host gone
    /// without a reset) blocks the volume's writes until that connection breaks.
    #[test]
    fn real_hung_remote_blocks_writes_until_its_connection_breaks() {
        if !crate::os::root_or_skip("real_hung_remote_blocks_writes_until_its_connection_breaks") {
            return;
        }
        let os = Os::real();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut cb = Cleanup::default();
        let mut ca = Cleanup::default();
        let (r0, mut rb, server) = two_nodes(&os, d, &mut cb, &["r1"], 16 << 20);
        let r1 = rb.remove(0);
        let port = os
            .engine
            .export_replica(&server, HOST, 0, &export("v-r1", &r1))
            .unwrap();
        let spec = volume_spec(d, vec![ReplicaTarget::Local(r0.clone()), nbd(port, "v-r1")]);
        let dev = start_attached(&os, &mut ca, &spec);
        let write = |dev: PathBuf, seed: u64| {
            move || -> std::io::Result<()> {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&dev)?;
                // O_DIRECT wants an aligned buffer: a 64 KiB chunk of a larger allocation.
                let buf = crate::kit::noise(128 << 10, seed);
                let off = buf.as_ptr().align_offset(4096);
                f.write_all_at(&buf[off..off + (64 << 10)], 1 << 20)?;
                f.sync_data()
            }
        };
        write(dev.clone(), 7)().unwrap();
        let pid: i32 = fs::read_to_string(server.join("qsd.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
        let (tx, rx) = mpsc::channel();
        let w = write(dev.clone(), 8);
        std::thread::spawn(move || {
            let _ = tx.send(w());
        });
        let blocked = rx.recv_timeout(Duration::from_secs(3));
        // Whatever happened, the server dies now: its connection closes and the write ends.
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        assert!(
            blocked.is_err(),
            "a write finished while the remote was stopped: {blocked:?}"
        );
        let t = Instant::now();
        let done = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the write ends once the connection breaks");
        eprintln!(
            "write blocked by a stopped remote finished {:?} after its SIGKILL: {done:?}",
            t.elapsed()
        );
        done.unwrap();
        assert!(wait_exit(pid, Duration::from_secs(5)));
        let vs = os.engine.volume_status(&spec.run_dir).unwrap().unwrap();
        assert!(vs.remote_errors > 0, "{vs:?}");
        os.loops.detach(&dev).unwrap();
        os.engine.stop(&spec.run_dir).unwrap();
        // The dead server's leftovers go with the last unexport.
        os.engine.unexport_replica(&server, "v-r1").unwrap();
        assert!(!server.exists());
    }

    /// (4) After a restart of bicsi (a fresh engine object), the volume engine with NBD children
    /// and the replica server are found again from /proc and QMP.
    #[test]
    fn real_readopt_volume_engine_and_replica_server() {
        if !crate::os::root_or_skip("real_readopt_volume_engine_and_replica_server") {
            return;
        }
        let os = Os::real();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut cb = Cleanup::default();
        let mut ca = Cleanup::default();
        let (r0, rb, server) = two_nodes(&os, d, &mut cb, &["r1", "r2"], 16 << 20);
        let port = os
            .engine
            .export_replica(&server, HOST, 0, &export("v-r1", &rb[0]))
            .unwrap();
        os.engine
            .export_replica(&server, HOST, port, &export("v-r2", &rb[1]))
            .unwrap();
        let spec = volume_spec(
            d,
            vec![
                nbd(port, "v-r2"),
                ReplicaTarget::Local(r0.clone()),
                nbd(port, "v-r1"),
            ],
        );
        ca.engine(&spec.run_dir);
        let state = os.engine.start_volume(&spec).unwrap();

        let restarted = QemuStorageDaemon::new();
        assert_eq!(
            restarted.status(&spec.run_dir).unwrap(),
            Some(state.clone())
        );
        let vs = restarted.volume_status(&spec.run_dir).unwrap().unwrap();
        assert_eq!(vs.engine, state);
        assert_eq!(vs.replicas, spec.replicas);
        assert_eq!(state.replicas, vec![r0.clone()]);
        let mut reordered = spec.clone();
        reordered.replicas.rotate_left(1);
        assert_eq!(restarted.start_volume(&reordered).unwrap(), state);
        assert_eq!(
            restarted.replica_server_status(&server).unwrap(),
            Some((port, vec!["v-r1".to_string(), "v-r2".to_string()]))
        );
        assert_eq!(
            restarted
                .export_replica(&server, HOST, 0, &export("v-r1", &rb[0]))
                .unwrap(),
            port
        );
        // The old-style API sees the same engine; a local-only spec is another engine.
        let err = restarted
            .start(&crate::os::EngineSpec {
                volume_id: "v".into(),
                replicas: vec![r0.clone()],
                run_dir: spec.run_dir.clone(),
                read_only: false,
            })
            .unwrap_err();
        assert!(matches!(err, OsError::Conflict(_)), "{err}");
        assert!(err.to_string().contains("nbd://127.0.0.1:"), "{err}");
        restarted.stop(&spec.run_dir).unwrap();
        restarted.unexport_replica(&server, "v-r1").unwrap();
        restarted.unexport_replica(&server, "v-r2").unwrap();
        assert_eq!(restarted.replica_server_status(&server).unwrap(), None);
    }

    /// qemu-img on `url`-ish image options through qemu's TLS client with the `--tls-dir`
    /// `tls` (its credentials laid out by `qemu_tls`, as the node's own qemu-img calls are).
    fn qemu_img_info_tls(tls: &Path, port: u16, export: &str) -> std::process::Output {
        let (_dir, object) = crate::os::qemu_tls::client_creds(tls).unwrap();
        Command::new("qemu-img")
            .args(["info", "--object", &object, "--image-opts"])
            .arg(format!(
                "driver=nbd,host={HOST},port={port},export={export},tls-creds=bicsi-nbd-tls,\
                 tls-hostname=bicsi-node"
            ))
            .output()
            .unwrap()
    }

    /// `qemu-nbd --list` of the server at `port` through qemu's TLS client with the `--tls-dir`
    /// `tls`.
    fn qemu_nbd_list_tls(tls: &Path, port: u16) -> std::process::Output {
        let (_creds, object) = crate::os::qemu_tls::client_creds(tls).unwrap();
        Command::new("qemu-nbd")
            .args([
                "--list",
                "-b",
                HOST,
                "-p",
                &port.to_string(),
                "--object",
                &object,
            ])
            .args(["--tls-creds=bicsi-nbd-tls", "--tls-hostname=bicsi-node"])
            .output()
            .unwrap()
    }

    /// `tls` with the CA `ca` and the certificate and key of `identity`.
    fn tls_dir_of(dir: &Path, ca: &Path, identity: &Path) -> PathBuf {
        fs::create_dir_all(dir).unwrap();
        fs::copy(ca.join("ca.crt"), dir.join("ca.crt")).unwrap();
        fs::copy(identity.join("tls.crt"), dir.join("tls.crt")).unwrap();
        fs::copy(identity.join("tls.key"), dir.join("tls.key")).unwrap();
        dir.to_path_buf()
    }

    /// (5) Issue 19: with the node's --tls-dir, qemu's replica server serves qcow2 replicas only
    /// over TLS to node certificates of the cluster CA, and the engine's NBD children and
    /// qemu-img reach it with the node's certificate. A plain client, a controller's
    /// certificate and a node certificate of another CA are refused; an authorized client can
    /// list the export names (qemu 10.0 answers NBD_OPT_LIST after the handshake).
    #[test]
    fn real_tls_replica_server_serves_node_certificates_only() {
        if !crate::os::root_or_skip("real_tls_replica_server_serves_node_certificates_only") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let made = crate::certs::make(&d.join("certs"), 1, &[]).unwrap();
        let other = crate::certs::make(&d.join("other"), 1, &[]).unwrap();
        let os = Os::real_with_nbd_tls(None, made.node_dir.clone());
        let mut cb = Cleanup::default();
        let mut ca = Cleanup::default();
        let (r0, mut rb, server) = two_nodes(&os, d, &mut cb, &["r1"], 64 << 20);
        let r1 = rb.remove(0);
        let port = os
            .engine
            .export_replica(&server, HOST, 0, &export("v-r1", &r1))
            .unwrap();
        // The credentials are links in the run directory, private to root.
        let tls = server.join("tls");
        assert_eq!(
            fs::read_link(tls.join("server-key.pem")).unwrap(),
            made.node_dir.join("tls.key")
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&tls).unwrap().permissions().mode() & 0o777,
            0o700
        );

        // Refused: plain NBD (qemu's server answers every option with TLS required), a
        // controller's certificate (authz), a node certificate of another CA (handshake).
        let plain = Command::new("qemu-img")
            .args(["info", &format!("nbd://{HOST}:{port}/v-r1")])
            .output()
            .unwrap();
        assert!(
            !plain.status.success() && String::from_utf8_lossy(&plain.stderr).contains("TLS"),
            "{plain:?}"
        );
        let plain_list = Command::new("qemu-nbd")
            .args(["--list", "-b", HOST, "-p", &port.to_string()])
            .output()
            .unwrap();
        assert!(!plain_list.status.success(), "{plain_list:?}");
        assert!(
            !String::from_utf8_lossy(&plain_list.stdout).contains("v-r1"),
            "{plain_list:?}"
        );
        let controller = tls_dir_of(&d.join("as-controller"), &made.ca_dir, &made.controller_dir);
        let foreign = tls_dir_of(&d.join("other-ca"), &made.ca_dir, &other.node_dir);
        for (what, tls) in [("controller", &controller), ("other CA", &foreign)] {
            let out = qemu_img_info_tls(tls, port, "v-r1");
            assert!(!out.status.success(), "{what}: {out:?}");
        }
        let log = fs::read_to_string(server.join("qsd.log")).unwrap_or_default();
        eprintln!("replica server log after the refused clients:\n{log}");
        // The node's certificate: qemu-img reads it, and can list the export names.
        let ok = qemu_img_info_tls(&made.node_dir, port, "v-r1");
        assert!(ok.status.success(), "{ok:?}");
        assert!(
            String::from_utf8_lossy(&ok.stdout).contains("64 MiB"),
            "{ok:?}"
        );
        let list = qemu_nbd_list_tls(&made.node_dir, port);
        eprintln!("qemu-nbd --list with a node certificate: {list:?}");
        assert!(list.status.success(), "{list:?}");
        assert!(
            String::from_utf8_lossy(&list.stdout).contains("v-r1"),
            "{list:?}"
        );
        let list = qemu_nbd_list_tls(&controller, port);
        assert!(!list.status.success(), "{list:?}");
        assert!(
            !String::from_utf8_lossy(&list.stdout).contains("v-r1"),
            "{list:?}"
        );

        // The engine's NBD child over TLS: writes reach the remote, reads come back.
        let spec = volume_spec(d, vec![ReplicaTarget::Local(r0.clone()), nbd(port, "v-r1")]);
        let dev = start_attached(&os, &mut ca, &spec);
        let data = crate::kit::noise(4 << 20, 9);
        {
            let f = fs::OpenOptions::new().write(true).open(&dev).unwrap();
            f.write_all_at(&data, 1 << 20).unwrap();
            f.sync_all().unwrap();
        }
        let vs = os.engine.volume_status(&spec.run_dir).unwrap().unwrap();
        assert_eq!(vs.remote_errors, 0, "{vs:?}");
        os.loops.detach(&dev).unwrap();
        os.engine.stop(&spec.run_dir).unwrap();
        // Both replicas hold it: compared over TLS by the node's qemu-img, and by hand.
        assert!(
            crate::os::compare::identical(
                &ReplicaTarget::Local(r0.clone()),
                &nbd(port, "v-r1"),
                Some(&made.node_dir)
            )
            .unwrap()
        );
        // The offline rebuild's copy of a remote qcow2 replica goes over TLS too.
        let copy = d.join("c/volume.qcow2");
        fs::create_dir_all(d.join("c")).unwrap();
        crate::os::compare::copy_from(&nbd(port, "v-r1"), &copy, None, Some(&made.node_dir))
            .unwrap();
        assert_eq!(compare(&r0, &copy), "Images are identical.");
        // Without the node's certificate the same comparison fails, naming qemu's reason.
        let err = crate::os::compare::identical(
            &ReplicaTarget::Local(r0.clone()),
            &nbd(port, "v-r1"),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("TLS"), "{err}");
        os.engine.unexport_replica(&server, "v-r1").unwrap();
        assert_eq!(compare(&r0, &r1), "Images are identical.");
        assert!(!server.exists(), "the run directory and its links went");
    }

    /// A replica server started plain (the node was --insecure) is restarted with TLS when the
    /// node now has a --tls-dir and it exports nothing; while it exports something it is
    /// refused with the fix named, never kept serving plain under a TLS node.
    #[test]
    fn real_plain_replica_server_is_not_kept_under_a_tls_node() {
        if !crate::os::root_or_skip("real_plain_replica_server_is_not_kept_under_a_tls_node") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let made = crate::certs::make(&d.join("certs"), 1, &[]).unwrap();
        let plain = Os::real();
        let tls = Os::real_with_nbd_tls(None, made.node_dir.clone());
        let mut cb = Cleanup::default();
        let rb = replicas(&plain, &d.join("b"), &["r1", "r2"], 16 << 20);
        let server = d.join("b/run");
        cb.replica_server(&server);
        let port = plain
            .engine
            .export_replica(&server, HOST, 0, &export("v-r1", &rb[0]))
            .unwrap();
        let err = tls
            .engine
            .export_replica(&server, HOST, port, &export("v-r2", &rb[1]))
            .unwrap_err();
        assert!(matches!(err, OsError::Conflict(_)), "{err}");
        assert!(err.to_string().contains("without TLS"), "{err}");
        // Its export gone behind bicsi's back (the server keeps running with none): a TLS
        // node restarts it with TLS.
        let plain_pid = live_server(&server).unwrap().1;
        let mut qmp = Qmp::connect(&server.join("qmp.sock")).unwrap();
        qmp.call(
            "block-export-del",
            json!({"id": export_id("v-r1"), "mode": "hard"}),
        )
        .unwrap();
        let t = Instant::now();
        while !list_exports(&mut qmp).unwrap().is_empty() {
            assert!(t.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(qmp);
        let port = tls
            .engine
            .export_replica(&server, HOST, 0, &export("v-r2", &rb[1]))
            .unwrap();
        let out = Command::new("qemu-img")
            .args(["info", &format!("nbd://{HOST}:{port}/v-r2")])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{out:?}");
        assert!(
            qemu_img_info_tls(&made.node_dir, port, "v-r2")
                .status
                .success()
        );
        let (_, pid, args) = live_server(&server).unwrap();
        assert!(args.tls && pid != plain_pid, "{args:?}");
        assert!(wait_exit(plain_pid, Duration::from_secs(5)));
        tls.engine.unexport_replica(&server, "v-r2").unwrap();
    }
}
