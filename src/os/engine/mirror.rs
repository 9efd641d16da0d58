//! Starting, finding and pausing the `mirror` engine (`crate::mirror`, the hidden `bicsi
//! engine-mirror` command): the engine of a volume whose replicas are local raw files. It lives
//! in the same run directory as a qemu-storage-daemon would (`export`, `faults.jsonl`,
//! `children.json`) with its own pid file (`mirror.pid`), log (`mirror.log`) and control socket
//! (`control.sock`), and is found again after a restart of bicsi from its pid file and its
//! command line in /proc, like the daemon. `QemuStorageDaemon` hands it the volumes whose
//! children are raw files and otherwise treats it as one of its own: status, stop (flush through
//! the export, unmount, SIGTERM) and the idempotence and conflict rules are the same code.
//!
//! Online rebuilds: [`add_target`], [`targets`], [`promote`], [`drop_target`] speak the engine's
//! control socket; a replica promoted by one is listed in the run directory's `added.json`
//! ([`record_added`]), which re-adoption reads with the command line, so a restarted bicsi sees
//! the engine's replicas as they are (a new engine starts from the volume record's rw replicas
//! and the file goes).
//!
//! Its children are local raw files (`--replica`), local copy-on-write replicas (`--cow-replica
//! data=,map=[,base=]`, known by their data file `*.cow`, see `crate::replica_file`) and
//! replicas of other nodes (`--remote
//! nbd://host:port/export`, served by their node's replica server and read by the engine's own
//! NBD client), both on its command line so that re-adoption sees them; a local child that is
//! not a raw file is refused with the fix. With an engine host configured (`--engine-endpoint`)
//! the host starts it (Spawn with program `engine-mirror`: the host's own bicsi executable), so
//! it lives in the host's container and a restart of the plugin's container (on Kubernetes)
//! leaves it serving, as qemu-storage-daemon; a host that predates this (its Ping lists no
//! programs) is left alone and the engine is started by this process, with a warning.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{DaemonArgs, QemuStorageDaemon, RunPaths, events, find_processes, spawn_daemonized};
use crate::os::{EngineState, ImageFormat, OsError, OsResult, ReplicaTarget, VolumeEngineSpec};
use crate::os::{command_failure, utf8_path};

/// The hidden subcommand of the bicsi binary that serves the volume.
pub const SUBCOMMAND: &str = "engine-mirror";
const PID: &str = "mirror.pid";
const LOG: &str = "mirror.log";
/// The control socket in the run directory (`pause`, `resume`, `status`).
pub const CONTROL: &str = "control.sock";
/// The replicas promoted by online rebuilds, beside the command line's (a JSON list of paths).
pub const ADDED: &str = "added.json";
// The engine's own defaults and name, here with its command line so that this seam needs
// nothing of the engine (`crate::mirror` re-exports them).
/// The FUSE file system's source name (mountinfo): how a loop device knows the file is ours.
pub const FS_NAME: &str = "bicsi-mirror";
/// FUSE worker threads when the command line does not say.
pub const DEFAULT_THREADS: usize = 4;
/// Seconds a remote replica may take to answer when the command line does not say (the
/// `replica-timeout` setting's default).
pub const DEFAULT_REPLICA_TIMEOUT: u64 = 8;
/// FUSE worker threads of a shipped engine (see README, volume-io-mirror).
const THREADS: usize = DEFAULT_THREADS;
/// FUSE worker threads of an engine with a remote child: a thread waits for the remote's reply
/// before it takes the next request, so the threads bound the writes in flight to the replica
/// server (measured, debug build, 4k random writes at depth 32 with one local and one remote
/// child on bicsi's replica server: 5.3k IOPS with 4 threads, 10.0k with 16).
const REMOTE_THREADS: usize = 16;

/// The program to run: `BICSI_MIRROR_PROGRAM` when set (tests whose own binary is not bicsi),
/// else this executable.
pub fn program() -> OsResult<PathBuf> {
    if let Some(p) = std::env::var_os("BICSI_MIRROR_PROGRAM") {
        return Ok(PathBuf::from(p));
    }
    std::env::current_exe()
        .map_err(|e| OsError::io("finding the bicsi executable for the mirror engine", e))
}

/// Whether the mirror engine serves these children: any of them is a raw file here (qemu's
/// engine reads local children as qcow2).
pub(crate) fn serves(targets: &[ReplicaTarget]) -> bool {
    targets.iter().any(|t| match t {
        ReplicaTarget::Local(p) => {
            matches!(ImageFormat::of_file(p), ImageFormat::Raw | ImageFormat::Cow)
        }
        ReplicaTarget::Nbd { .. } => false,
    })
}

/// The `--cow-replica` value of the copy-on-write replica whose data file is `data`.
fn cow_arg(data: &Path) -> OsResult<String> {
    let spec = crate::os::cow::cow_spec(data);
    let mut arg = format!(
        "data={},map={}",
        utf8_path(&spec.data)?,
        utf8_path(&spec.map)?
    );
    if let Some(base) = &spec.base {
        arg.push_str(&format!(",base={}", utf8_path(base)?));
    }
    Ok(arg)
}

/// Whether the live engine of `run_dir` is a mirror engine.
pub fn serving(run_dir: &Path) -> bool {
    !find(&RunPaths::new(run_dir)).is_empty()
}

/// What an `engine-mirror` command line says.
fn parse_args(argv: &[String]) -> Option<DaemonArgs> {
    if argv.get(1).map(String::as_str) != Some(SUBCOMMAND) {
        return None;
    }
    let mut export = None;
    let mut targets = Vec::new();
    let mut read_only = false;
    let mut it = argv[2..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--export" => export = Some(PathBuf::from(it.next()?)),
            "--replica" => targets.push(ReplicaTarget::Local(PathBuf::from(it.next()?))),
            "--remote" => targets.push(ReplicaTarget::parse_nbd(it.next()?)?),
            // A copy-on-write replica is known by its data file (its map and base beside it).
            "--cow-replica" => targets.push(ReplicaTarget::Local(
                crate::os::cow::CowSpec::parse(it.next()?).ok()?.data,
            )),
            "--read-only" => read_only = true,
            _ => {}
        }
    }
    Some(DaemonArgs {
        export: export?,
        targets,
        read_only,
    })
}

/// The live mirror engines of `paths` (none without a pid file: a mirror engine always has one).
pub(super) fn find(paths: &RunPaths) -> Vec<(i32, DaemonArgs)> {
    let pid = paths.dir.join(PID);
    if !pid.exists() {
        return Vec::new();
    }
    find_processes(&pid, |argv| {
        parse_args(argv)
            .filter(|a| a.export == paths.export)
            .map(with_added)
    })
}

/// The engine's replicas: its command line's and those its online rebuilds promoted.
fn with_added(mut args: DaemonArgs) -> DaemonArgs {
    if let Some(dir) = args.export.parent() {
        for p in added(dir) {
            // A remote replica rebuilt online is listed by its `nbd://` address.
            let t = p
                .to_str()
                .and_then(ReplicaTarget::parse_nbd)
                .unwrap_or(ReplicaTarget::Local(p));
            if !args.targets.contains(&t) {
                args.targets.push(t);
            }
        }
    }
    args
}

/// The replicas `added.json` in `run_dir` lists.
pub fn added(run_dir: &Path) -> Vec<PathBuf> {
    fs::read(run_dir.join(ADDED))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Lists `replica` in `added.json` (atomically: temporary file, fsync, rename, fsync of the
/// directory), after the engine promoted it.
pub fn record_added(run_dir: &Path, replica: &Path) -> OsResult<()> {
    let mut list = added(run_dir);
    if list.iter().any(|p| p == replica) {
        return Ok(());
    }
    list.push(replica.to_path_buf());
    let tmp = run_dir.join(format!("{ADDED}.tmp"));
    let text = serde_json::to_vec(&list).map_err(|e| OsError::Other(e.to_string()))?;
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        fs::rename(&tmp, run_dir.join(ADDED))?;
        File::open(run_dir)?.sync_all()
    };
    write().map_err(|e| OsError::io(format!("writing {}", run_dir.join(ADDED).display()), e))
}

/// What the engine says of one online rebuild target (`targets` on the control socket).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct TargetStatus {
    /// The file it was added as (its temporary name).
    pub path: PathBuf,
    /// The name it is known by (the final one once promoted).
    pub name: PathBuf,
    /// copying, verifying, complete, promoted or failed.
    pub state: String,
    pub done: u64,
    pub total: u64,
    #[serde(default)]
    pub error: Option<String>,
}

/// Sends one command line to the engine in `run_dir` and returns its answer after `ok `.
fn command(run_dir: &Path, line: &str) -> OsResult<String> {
    let socket = RunPaths::new(run_dir).dir.join(CONTROL);
    let conn = UnixStream::connect(&socket).map_err(|e| {
        OsError::io(
            format!(
                "connecting to the mirror engine's control socket {}",
                socket.display()
            ),
            e,
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| OsError::io("setting a timeout", e))?;
    let mut out = conn
        .try_clone()
        .map_err(|e| OsError::io("cloning the control connection", e))?;
    writeln!(out, "{line}").map_err(|e| OsError::io("writing to the mirror engine", e))?;
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .map_err(|e| OsError::io("reading the mirror engine's answer", e))?;
    match answer.trim().strip_prefix("ok") {
        Some(rest) => Ok(rest.trim().to_string()),
        None => Err(OsError::Other(format!(
            "the mirror engine in {} refused `{line}`: {}",
            run_dir.display(),
            answer.trim()
        ))),
    }
}

/// Has the engine in `run_dir` take `path` (the volume's size) as a write-only target and fill it.
pub fn add_target(run_dir: &Path, path: &Path) -> OsResult<()> {
    command(run_dir, &format!("add {}", utf8_path(path)?)).map(|_| ())
}

/// Has the engine take the new copy-on-write replica `spec` as an online rebuild target (`add
/// data=,map=[,base=]`); it is known by its data file from then on.
pub fn add_cow_target(run_dir: &Path, spec: &crate::os::cow::CowSpec) -> OsResult<()> {
    let mut line = format!(
        "add data={},map={}",
        utf8_path(&spec.data)?,
        utf8_path(&spec.map)?
    );
    if let Some(base) = &spec.base {
        line.push_str(&format!(",base={}", utf8_path(base)?));
    }
    command(run_dir, &line).map(|_| ())
}

/// The engine's online rebuild targets.
pub fn targets(run_dir: &Path) -> OsResult<Vec<TargetStatus>> {
    let answer = command(run_dir, "targets")?;
    let json = answer.strip_prefix("targets").unwrap_or(&answer).trim();
    serde_json::from_str(json).map_err(|e| {
        OsError::Other(format!(
            "the mirror engine in {} answered `targets` with {json:?}: {e}",
            run_dir.display()
        ))
    })
}

/// Makes the complete target `path`, renamed to `name`, a replica of the engine.
pub fn promote(run_dir: &Path, path: &Path, name: &Path) -> OsResult<()> {
    command(
        run_dir,
        &format!("promote {} {}", utf8_path(path)?, utf8_path(name)?),
    )
    .map(|_| ())
}

/// Has the engine forget the target known as `path` (Ok when it has none).
pub fn drop_target(run_dir: &Path, path: &Path) -> OsResult<()> {
    command(run_dir, &format!("drop {}", utf8_path(path)?)).map(|_| ())
}

/// What the mirror engine refuses to serve: a local child that is neither a raw nor a
/// copy-on-write file (a qcow2 file is qemu's). Checked before anything of the engine is made;
/// the fake engine (`crate::os::fake`) calls it too.
pub(crate) fn check_children(spec: &VolumeEngineSpec) -> OsResult<()> {
    match spec.replicas.iter().find(|t| match t {
        ReplicaTarget::Local(p) => {
            !matches!(ImageFormat::of_file(p), ImageFormat::Raw | ImageFormat::Cow)
        }
        ReplicaTarget::Nbd { .. } => false,
    }) {
        Some(other) => Err(not_served(spec, other)),
        None => Ok(()),
    }
}

fn not_served(spec: &VolumeEngineSpec, child: &ReplicaTarget) -> OsError {
    OsError::Unsupported(format!(
        "engine for volume {:?}: the mirror engine serves raw replica files and replicas of \
         other nodes over NBD, and {child} is neither (a qcow2 file); use a volume of engine \
         qemu (StorageClass parameter engine: qemu) for qcow2 replicas",
        spec.volume_id
    ))
}

/// The engine's command line for `spec` in `paths` (without the program): its replicas, then
/// the run directory's files and the settings.
pub(super) fn args(
    engine: &QemuStorageDaemon,
    spec: &VolumeEngineSpec,
    paths: &RunPaths,
    replica_timeout: Duration,
) -> OsResult<Vec<String>> {
    let mut args = vec![SUBCOMMAND.to_string()];
    for t in &spec.replicas {
        match t {
            ReplicaTarget::Local(p) if ImageFormat::of_file(p) == ImageFormat::Raw => {
                args.extend(["--replica".into(), utf8_path(p)?.to_string()]);
            }
            ReplicaTarget::Local(p) if ImageFormat::of_file(p) == ImageFormat::Cow => {
                args.extend(["--cow-replica".into(), cow_arg(p)?]);
            }
            ReplicaTarget::Nbd { .. } => {
                args.extend(["--remote".into(), t.to_string()]);
            }
            other => return Err(not_served(spec, other)),
        }
    }
    args.extend([
        "--replica-timeout".into(),
        replica_timeout.as_secs().max(1).to_string(),
    ]);
    // Also for an engine with local replicas only: an online rebuild may add a replica of
    // another node to it later (`add nbd://…`), over TLS like the command line's remotes.
    if let Some(dir) = &engine.nbd_tls {
        args.extend(["--tls-dir".into(), utf8_path(dir)?.to_string()]);
    }
    args.extend([
        "--export".into(),
        utf8_path(&paths.export)?.to_string(),
        "--faults".into(),
        utf8_path(&events::faults_path(&paths.dir))?.to_string(),
        "--control".into(),
        utf8_path(&paths.dir.join(CONTROL))?.to_string(),
        "--pid-file".into(),
        utf8_path(&paths.dir.join(PID))?.to_string(),
        "--threads".into(),
        if spec
            .replicas
            .iter()
            .any(|t| matches!(t, ReplicaTarget::Nbd { .. }))
        {
            REMOTE_THREADS
        } else {
            THREADS
        }
        .to_string(),
        "--daemonize".into(),
    ]);
    if spec.read_only {
        args.push("--read-only".into());
    }
    Ok(args)
}

/// Starts the engine for `spec` in `paths` (a run directory with no live engine, leftovers
/// removed) and returns once its file is mounted.
/// `replica_timeout`: how long a remote child may take to answer before the engine drops it.
pub(super) fn start(
    engine: &QemuStorageDaemon,
    spec: &VolumeEngineSpec,
    paths: &RunPaths,
    replica_timeout: Duration,
) -> OsResult<EngineState> {
    let args = args(engine, spec, paths, replica_timeout)?;
    for stale in [PID, CONTROL, ADDED] {
        let _ = fs::remove_file(paths.dir.join(stale));
    }
    File::create(&paths.export).map_err(|e| {
        OsError::io(
            format!("creating export file {}", paths.export.display()),
            e,
        )
    })?;
    // children.json, for the fault file's readers; the qemu monitor arguments are not needed.
    let _ = events::prepare(&paths.dir, &spec.replicas)?;
    let log = paths.dir.join(LOG);
    let banner = format!("starting mirror engine for volume {:?}", spec.volume_id);
    let hosted = match &engine.host {
        Some(socket) if super::host::runs(socket, super::host::MIRROR)? => Some(socket),
        Some(socket) => {
            tracing::warn!(socket = %socket.display(), volume = %spec.volume_id,
                "the engine host does not run the mirror engine (an older bicsi engine): \
                 starting it from this process, so a restart of this process's container ends it");
            None
        }
        None => None,
    };
    let spawned = match hosted {
        Some(socket) => super::host::spawn(
            socket,
            super::host::MIRROR,
            &args,
            &log,
            &banner,
            engine.start_timeout,
        )?,
        None => spawn_daemonized(&program()?, &args, &log, &banner, engine.start_timeout)?,
    };
    let failure = |reason: String| -> OsError {
        let _ = engine.shut_down(paths);
        let text = spawned.log_text(&log);
        command_failure(
            spawned.display.clone(),
            format!("{reason}; log {}:\n{text}", log.display()),
            Some(
                "the mirror engine needs /dev/fuse (modprobe fuse; in a container, give it \
                 /dev/fuse and CAP_SYS_ADMIN) and its replica files readable and writable",
            ),
        )
    };
    match spawned.status {
        None => {
            return Err(failure(format!(
                "did not mount its file within {:?}",
                engine.start_timeout
            )));
        }
        Some(status) if !status.success() => {
            return Err(failure(format!("exited with {status}")));
        }
        Some(_) => {}
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((_, pid, a)) = engine.live(&paths.dir)? {
            return Ok(QemuStorageDaemon::state(paths, pid, &a));
        }
        if Instant::now() >= deadline {
            return Err(failure(
                "started but its file never appeared as a mount".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The export file of the live mirror engine on this machine that serves `replica` (named as
/// its record names it), if any: snapshots of such a replica go through the engine (`pause`).
pub fn export_of(replica: &Path) -> Option<PathBuf> {
    let wanted = ReplicaTarget::Local(replica.to_path_buf());
    // No pid file to start from: every process's command line is read.
    find_processes(Path::new("/nonexistent/mirror.pid"), |argv| {
        parse_args(argv)
            .map(with_added)
            .filter(|a| a.targets.contains(&wanted))
    })
    .into_iter()
    .next()
    .map(|(_, a)| a.export)
}

/// Writes held by the live mirror engine of a run directory: new writes wait until this is
/// dropped (or this process dies: the engine resumes when the connection closes).
pub struct Paused {
    conn: UnixStream,
}

impl Paused {
    /// Asks the paused engine to make every write its local replica `replica` took durable
    /// (`flush PATH`): for a copy-on-write replica, its map on disk then holds every bit the
    /// engine has in memory, and no write changes it before this is dropped.
    pub fn flush(&mut self, replica: &Path) -> OsResult<()> {
        writeln!(self.conn, "flush {}", replica.display())
            .map_err(|e| OsError::io("asking the mirror engine to flush a replica", e))?;
        let mut line = String::new();
        BufReader::new(
            self.conn
                .try_clone()
                .map_err(|e| OsError::io("cloning the control connection", e))?,
        )
        .read_line(&mut line)
        .map_err(|e| OsError::io("waiting for the mirror engine to flush a replica", e))?;
        if !line.starts_with("ok") {
            return Err(OsError::Other(format!(
                "the mirror engine serving {} did not flush it: {}",
                replica.display(),
                line.trim()
            )));
        }
        Ok(())
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = writeln!(self.conn, "resume");
    }
}

/// Pauses the writes of the live mirror engine in `run_dir` (those in flight complete first).
pub fn pause(run_dir: &Path) -> OsResult<Paused> {
    let socket = RunPaths::new(run_dir).dir.join(CONTROL);
    let mut conn = UnixStream::connect(&socket).map_err(|e| {
        OsError::io(
            format!(
                "connecting to the mirror engine's control socket {}",
                socket.display()
            ),
            e,
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| OsError::io("setting a timeout", e))?;
    writeln!(conn, "pause").map_err(|e| OsError::io("asking the mirror engine to pause", e))?;
    let mut line = String::new();
    BufReader::new(
        conn.try_clone()
            .map_err(|e| OsError::io("cloning the control connection", e))?,
    )
    .read_line(&mut line)
    .map_err(|e| OsError::io("waiting for the mirror engine to pause", e))?;
    if !line.starts_with("ok") {
        return Err(OsError::Other(format!(
            "the mirror engine in {} did not pause: {}",
            run_dir.display(),
            line.trim()
        )));
    }
    Ok(Paused { conn })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_command_line_back() {
        let argv: Vec<String> = [
            "/usr/bin/bicsi",
            SUBCOMMAND,
            "--replica",
            "/d1/r.raw",
            "--replica",
            "/d2/r.raw",
            "--export",
            "/run/e/export",
            "--remote",
            "nbd://127.0.0.1:10809/r-2",
            "--cow-replica",
            "data=/d3/r/volume.cow,map=/d3/r/volume.cowmap,base=/d3/r/base",
            "--threads",
            "4",
            "--replica-timeout",
            "8",
            "--read-only",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let a = parse_args(&argv).expect("parsed");
        assert_eq!(a.export, PathBuf::from("/run/e/export"));
        assert_eq!(
            a.targets,
            vec![
                ReplicaTarget::Local("/d1/r.raw".into()),
                ReplicaTarget::Local("/d2/r.raw".into()),
                ReplicaTarget::Nbd {
                    host: "127.0.0.1".into(),
                    port: 10809,
                    export: "r-2".into()
                },
                ReplicaTarget::Local("/d3/r/volume.cow".into()),
            ]
        );
        assert!(a.read_only);
        assert!(serves(&[ReplicaTarget::Local("/d3/r/volume.cow".into())]));
        assert!(!serves(&[ReplicaTarget::Local(
            "/d3/r/volume.qcow2".into()
        )]));
        let mut qemu = argv.clone();
        qemu[1] = "--blockdev".into();
        assert!(parse_args(&qemu).is_none());
    }
}
