//! The operating-system layer: the few small, synchronous traits through which the node domain
//! touches the machine (qcow2 images, the qemu-storage-daemon engine, loop devices, mounts and
//! filesystems), their real implementations, and (in test builds only, `fake`) in-memory fakes for
//! tests that run without root.
//!
//! It owns the exact command lines, kernel calls and the facts measured on real machines (why loop
//! devices never use direct I/O on the FUSE export, why the export is unmounted before the daemon
//! is signalled). It must not make decisions that belong to the domain: it never chooses sizes,
//! replica placement or whether a device should be formatted, and it keeps no state of its own
//! beyond what the kernel and the engine's run directory already hold, so a restarted bicsi finds
//! everything again. Every call may block: the domain runs them inside
//! `tokio::task::spawn_blocking`. Every operation is idempotent where its documentation says
//! so, because CSI retries every call.
//!
//! It stands on the bottom floor only (`error`, `model`, `proto`, `tls`, `messages`), so what
//! it shares with the code above lives here and is re-exported there: the image formats it
//! reads and writes (qcow2, raw and bicsi's copy-on-write layout, [`cow`]), a file's data
//! extents ([`extents`]), and the command lines, defaults and control records of the engines
//! and replica servers it starts (`crate::mirror`, `crate::replica_server`).

pub mod compare;
pub mod cow;
pub mod engine;
pub mod extents;
#[cfg(test)]
pub mod fake;
pub mod fs;
pub mod image;
pub mod loopdev;
pub mod malloc;
pub mod mount;
pub mod nbd;
pub mod pagecache;
pub mod qcow2;
pub mod qemu_tls;
pub mod rawfile;
pub mod replica_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

pub use crate::error::{OsError, OsResult};
pub use crate::model::{ImageFormat, ReplicaTarget};

/// The filesystems `Filesystems::mkfs` can create.
pub const SUPPORTED_FILESYSTEMS: &[&str] = &["ext4", "xfs"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    /// What the guest (the volume) sees, in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host disk.
    pub actual_size: u64,
    /// Absolute path of the backing file, as qemu resolves it.
    pub backing_file: Option<PathBuf>,
}

pub trait ImageTool: Send + Sync {
    /// Create a qcow2 replica file of `size` bytes, optionally on top of a backing file (absolute
    /// path) of the given format. Idempotent: if it exists with the same size/backing, Ok; if it
    /// exists with another size or backing, `Conflict`.
    fn create_replica(
        &self,
        path: &Path,
        size: u64,
        backing: Option<(&Path, ImageFormat)>,
    ) -> OsResult<()>;
    /// Grow the image's virtual size (never shrinks; equal size is Ok). Offline only: fails while
    /// an engine has the image open.
    fn resize(&self, path: &Path, new_size: u64) -> OsResult<()>;
    /// Format, sizes and backing file; works while an engine has the image open.
    fn info(&self, path: &Path) -> OsResult<ImageInfo>;
    /// Copy the whole content of `src`, read as `src_format` (never probed: a raw file may hold
    /// anything), including what it inherits from its backing chain, into a new standalone image
    /// `dst` of `format`, sparse. Used to export a volume as a backing image and to change a
    /// replica's format. `dst` must not exist; it appears only when complete.
    fn convert(
        &self,
        src: &Path,
        src_format: ImageFormat,
        dst: &Path,
        format: ImageFormat,
    ) -> OsResult<()>;
    /// Point the qcow2 image `path` at another backing file (None: no backing, the content
    /// flattened into it). `safe`: the content stays what it was, qemu writes into `path` every
    /// cluster where the old and the new backing differ; unsafe: only the header changes, for a
    /// backing file known to hold the same bytes (a verified copy of the same image).
    fn rebase(
        &self,
        path: &Path,
        backing: Option<(&Path, ImageFormat)>,
        safe: bool,
    ) -> OsResult<()>;

    /// Create a raw replica file of `size` bytes: sparse when `base` is None, else a reflink
    /// clone (FICLONE) of the raw file `base` (on the same filesystem) grown to `size`. The
    /// clone shares `base`'s blocks but does not depend on it: removing `base` later changes
    /// nothing in the replica. Idempotent: a raw file of `size` bytes at `path` is Ok; one of
    /// another size is a `Conflict`. `Unsupported` when the filesystem cannot share blocks.
    fn create_raw(&self, path: &Path, size: u64, base: Option<&Path>) -> OsResult<()>;
    /// Grow a raw file to `new_size` (never shrinks; equal is Ok).
    fn resize_raw(&self, path: &Path, new_size: u64) -> OsResult<()>;
    /// The size of a raw file, which is the size of the volume it holds.
    fn raw_size(&self, path: &Path) -> OsResult<u64>;
    /// Make `dst` (absent) a reflink clone of the raw file `src`, in one FICLONE: a copy of
    /// `src` at one instant even while writes go on, atomic with respect to each of them.
    /// `Unsupported` where the filesystem cannot share blocks (no copy is made then: a plain
    /// copy of a file being written is not a point in time). `dst` appears only when complete.
    fn clone_raw(&self, src: &Path, dst: &Path) -> OsResult<()>;
    /// Whether the filesystem of the directory `dir` shares blocks between files (FICLONE works:
    /// XFS with reflink, btrfs), found by cloning a small file made there and removed again.
    fn shares_blocks(&self, dir: &Path) -> OsResult<bool>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineSpec {
    pub volume_id: String,
    /// qcow2 replica files, absolute paths; the first is preferred for reads.
    pub replicas: Vec<PathBuf>,
    /// Directory that belongs to this engine alone (export file, QMP socket, pid file, log).
    pub run_dir: PathBuf,
    pub read_only: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineState {
    pub pid: i32,
    /// The volume as a regular file (the FUSE export); attach a loop device to it.
    pub export_path: PathBuf,
    pub qmp_socket: PathBuf,
    pub replicas: Vec<PathBuf>,
    pub read_only: bool,
}

/// `EngineSpec` with replicas that may live on other nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeEngineSpec {
    pub volume_id: String,
    /// The children of the volume, the first preferred for reads (qemu's quorum reads the first
    /// healthy child and falls back to the next only on an error): put the local replica first.
    pub replicas: Vec<ReplicaTarget>,
    /// Directory that belongs to this engine alone (export file, QMP socket, pid file, logs).
    pub run_dir: PathBuf,
    pub read_only: bool,
}

impl From<&EngineSpec> for VolumeEngineSpec {
    fn from(spec: &EngineSpec) -> VolumeEngineSpec {
        VolumeEngineSpec {
            volume_id: spec.volume_id.clone(),
            replicas: spec
                .replicas
                .iter()
                .cloned()
                .map(ReplicaTarget::Local)
                .collect(),
            run_dir: spec.run_dir.clone(),
            read_only: spec.read_only,
        }
    }
}

/// A live volume engine with all its children, and what its NBD client saw of the remote ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeEngineState {
    /// As `Engine::status` reports it; its `replicas` holds the local children only.
    pub engine: EngineState,
    /// Every child, in the engine's read order.
    pub replicas: Vec<ReplicaTarget>,
    /// NBD children whose connection dropped and that qemu reconnected since the engine started
    /// (it does so silently on the next request once the export is back). Writes made while it was
    /// away are missing from that replica: treat it as stale until it is rebuilt.
    pub reconnected: Vec<ReplicaTarget>,
    /// Failures qemu's NBD client logged since the engine started: a dropped connection, or an
    /// error the remote server returned (e.g. its disk is full). Requests refused while a child
    /// stays disconnected are not counted. Non-zero: some NBD child may have missed writes
    /// (qemu does not say which; with vote-threshold 1 the volume itself saw no error).
    pub remote_errors: u64,
}

/// A replica file of this node to serve to other nodes under its replica id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaExport {
    /// The NBD export name the other node's engine asks for (`ReplicaTarget::Nbd::export`).
    pub replica_id: String,
    /// The replica file, absolute path.
    pub path: PathBuf,
    /// Its format: the server opens it with this driver, never by probing.
    pub format: ImageFormat,
}

pub trait Engine: Send + Sync {
    /// Start the engine serving the replicas as one volume exported as a regular file at
    /// `<run_dir>/export`, and return once the export is mounted. Idempotent: a live engine in
    /// `run_dir` with the same replicas and mode is returned as it is; one with other replicas is a
    /// `Conflict`. The engine outlives this process (re-adoption through `status`).
    fn start(&self, spec: &EngineSpec) -> OsResult<EngineState>;
    /// The live engine in `run_dir`, if any (process alive AND export mounted).
    fn status(&self, run_dir: &Path) -> OsResult<Option<EngineState>>;
    /// Unmount the export, stop the process, remove `run_dir`. Ok if nothing runs; cleans the
    /// stale mount of a dead engine. `Busy` while a loop device is attached to the export.
    fn stop(&self, run_dir: &Path) -> OsResult<()>;

    /// Start the volume engine with local and/or NBD children (a quorum with vote-threshold 1
    /// when there is more than one), with the same FUSE export, idempotence (the same set of
    /// children in any order is the same engine), `Conflict` and re-adoption rules as `start`,
    /// which is this with local children only. Every NBD child must be reachable and exported
    /// when the engine starts (else `Command` naming it); once running, a child that fails is
    /// left behind while the volume keeps working from the others (see `volume_status`). Stop it
    /// with `stop`, before the replica servers it uses.
    fn start_volume(&self, spec: &VolumeEngineSpec) -> OsResult<EngineState>;
    /// `start_volume` with bicsi's mirror engine (`crate::mirror`) for a volume of that engine:
    /// local children must be raw files, NBD children are read by the engine's own client, and
    /// one that does not answer within `replica_timeout` is dropped (recorded in the run
    /// directory's fault file). Engines without it start the volume their own way.
    fn start_mirror(
        &self,
        spec: &VolumeEngineSpec,
        _replica_timeout: std::time::Duration,
    ) -> OsResult<EngineState> {
        self.start_volume(spec)
    }
    /// The live engine in `run_dir` with all its children, local and remote, and what its NBD
    /// client saw of the remote ones; None as for `status`.
    fn volume_status(&self, run_dir: &Path) -> OsResult<Option<VolumeEngineState>>;
    /// Ensure an NBD server for this node's replicas runs in `run_dir` (a directory that belongs
    /// to it alone) listening on host:port (TCP; port 0: any free port, or the one the running
    /// server already uses), and exports `export` (writable, export name = replica id), adding it
    /// to a running server without disturbing the other exports. Idempotent. Returns the port
    /// actually used. `Conflict` when the running server listens elsewhere, when the replica id
    /// is exported from another file, or when the port is taken by another program; `Command`
    /// with a lock hint when a local engine has the file open. The server outlives this process
    /// (re-adoption through `replica_server_status`) but not a reboot or a crash: exports are
    /// kept only in the daemon, so the caller re-exports what attached volumes need. A replica
    /// whose server died while an engine used it has missed writes: do not re-export it under
    /// the same id while that engine runs (its NBD client would reconnect to it silently).
    fn export_replica(
        &self,
        run_dir: &Path,
        host: &str,
        port: u16,
        export: &ReplicaExport,
    ) -> OsResult<u16>;
    /// Stop exporting one replica (Ok if not exported) and close its file; stops the server and
    /// removes `run_dir` when it exports nothing any more. `Busy` while an engine (on any node)
    /// is connected to the export: stop that engine first.
    fn unexport_replica(&self, run_dir: &Path, replica_id: &str) -> OsResult<()>;
    /// `unexport_replica` that cuts connected engines off instead of refusing: for an attaching
    /// node that is gone (its dead TCP connection would keep the export busy forever) or when
    /// the replica must be taken away from a running engine (which then goes on without it).
    fn unexport_replica_force(&self, run_dir: &Path, replica_id: &str) -> OsResult<()>;
    /// The live replica server in `run_dir`: its port and the replica ids it exports (sorted).
    fn replica_server_status(&self, run_dir: &Path) -> OsResult<Option<(u16, Vec<String>)>>;
    /// Copies what a live engine's local child `replica` holds at this instant (its own
    /// clusters, not its backing file's) into `target`, an existing qcow2 image the caller made
    /// with the replica's size and backing file: a point-in-time copy, so writes that go on
    /// meanwhile do not reach it. Returns false, copying nothing, when no live engine on this
    /// machine has `replica` open (the file is then at rest and can be copied as it is).
    fn backup_replica(&self, replica: &Path, target: &Path) -> OsResult<bool>;
    /// Where the volume whose live engine on this machine has `replica` open is mounted: None
    /// when no live engine has it open (nothing writes to it); else the mount point of its
    /// filesystem, or no mount point when nothing here mounts the engine's device (a raw block
    /// volume). Group snapshots freeze that filesystem around their point-in-time copies.
    fn engine_mounts(&self, _replica: &Path) -> OsResult<Option<Vec<PathBuf>>> {
        Ok(None)
    }
    /// The node's `--tls-dir` when its NBD servers and clients use TLS (issue 19): the qemu-img
    /// commands that read another node's replica present its certificate.
    fn nbd_tls(&self) -> Option<PathBuf> {
        None
    }
}

pub trait LoopDevices: Send + Sync {
    /// Attach a loop device to `file` (read-only when the file has no write permission bits, as
    /// the engine's read-only export does). Idempotent: returns the device already attached.
    fn attach(&self, file: &Path) -> OsResult<PathBuf>;
    /// `attach` with a read-only device whatever the file's mode (a loop engine's raw replica
    /// staged read-only). Idempotent like `attach`: a device already on `file` is returned.
    fn attach_read_only(&self, file: &Path) -> OsResult<PathBuf>;
    /// The loop device attached to `file`, if any.
    fn find(&self, file: &Path) -> OsResult<Option<PathBuf>>;
    /// Detach; Ok if already gone. `Busy` if it stays attached because it is still in use.
    /// Beware of repeating it: once detached, the kernel may hand the same device number to
    /// another volume, and a second `detach(dev)` would cut that one. Retries use `detach_file`.
    fn detach(&self, dev: &Path) -> OsResult<()>;
    /// Detach every loop device attached to `file`; Ok if there is none. The idempotent form.
    fn detach_file(&self, file: &Path) -> OsResult<()>;
    /// Make the device pick up a new size of its backing file.
    fn refresh_size(&self, dev: &Path) -> OsResult<()>;
    /// Where the filesystem on the loop device attached straight to `file` is mounted: None when
    /// no loop device is attached to `file`; an empty list when nothing mounts its filesystem
    /// (a raw block volume); else its mount point (one; binds of it are not listed).
    fn file_mounts(&self, file: &Path) -> OsResult<Option<Vec<PathBuf>>>;
    /// Write what the device's page cache holds down to its file and flush that file (fsync of
    /// the device: the loop driver passes the flush on as an fsync of its backing file, which the
    /// engine's export turns into a flush of the volume). Detach must come after it: writes still
    /// cached when a device is detached are dropped, and an engine stopped without a flush may
    /// lose what it had not written out.
    fn flush(&self, dev: &Path) -> OsResult<()>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    pub source: String,
    pub target: PathBuf,
    pub fstype: String,
    /// Per-mount options followed by the superblock options, without duplicates.
    pub options: Vec<String>,
}

pub trait Mounter: Send + Sync {
    /// Mount `source` (a device) on `target`, creating `target` as a directory when missing.
    /// Idempotent: Ok if `source` is already mounted there; `Conflict` if something else is.
    fn mount(&self, source: &Path, target: &Path, fstype: &str, options: &[String])
    -> OsResult<()>;
    /// Bind-mount `source` (a directory or a device node) on `target`, creating `target` as a
    /// directory or an empty file to match. Idempotent like `mount`.
    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> OsResult<()>;
    /// Unmount everything stacked on `target`; Ok if nothing is mounted or it does not exist.
    fn unmount(&self, target: &Path) -> OsResult<()>;
    /// The top-most mount on `target`, if any.
    fn mount_info(&self, target: &Path) -> OsResult<Option<MountInfo>>;
    /// Every mount point that shows the block device `device`: its filesystem mounted, binds of
    /// that mount, and binds of the device node itself; deepest first, so unmounting them in
    /// that order never meets a mount that still has another one inside it.
    fn mounts_of(&self, device: &Path) -> OsResult<Vec<PathBuf>>;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

pub trait Filesystems: Send + Sync {
    /// The filesystem (or other signature, e.g. a partition table type such as "dos" or "gpt")
    /// on the device; None only when the device is readable and holds no known signature.
    fn probe(&self, dev: &Path) -> OsResult<Option<String>>;
    /// Create a filesystem (one of `SUPPORTED_FILESYSTEMS`). Refuses (`Conflict`) when the device
    /// already holds a signature: this layer never destroys data, whatever the caller believes.
    fn mkfs(&self, dev: &Path, fstype: &str) -> OsResult<()>;
    /// Grow the filesystem to fill its device: online when it is mounted at `mount_point`
    /// (resize2fs / xfs_growfs); when it is not mounted anywhere, ext4 is checked and grown
    /// offline (e2fsck -f -p, resize2fs) and xfs is refused (`Unsupported`: mount it first).
    /// Growing online needs CAP_SYS_RESOURCE for ext4. Nothing to grow is Ok.
    fn grow(&self, dev: &Path, mount_point: &Path, fstype: &str) -> OsResult<()>;
    fn stats(&self, path: &Path) -> OsResult<FsStats>;
    /// Flushes the filesystem mounted at `mount_point` and makes every new write to it wait
    /// until [`Filesystems::thaw`] (FIFREEZE, `fsfreeze --freeze`).
    fn freeze(&self, mount_point: &Path) -> OsResult<()> {
        Err(OsError::Other(format!(
            "cannot freeze the filesystem at {}: not supported here",
            mount_point.display()
        )))
    }
    /// Lets writes to a frozen filesystem go on (FITHAW, `fsfreeze --unfreeze`).
    fn thaw(&self, mount_point: &Path) -> OsResult<()> {
        Err(OsError::Other(format!(
            "cannot thaw the filesystem at {}: not supported here",
            mount_point.display()
        )))
    }
    /// Size in bytes of a block device or a regular file.
    fn device_size(&self, dev: &Path) -> OsResult<u64>;
    /// Bytes the filesystem on `dev` spans, where cheaply known without mounting (ext4, read
    /// from its superblock); None when unknown. Lets a stage skip an offline check-and-grow
    /// when there is nothing to grow.
    fn fs_size(&self, dev: &Path, fstype: &str) -> OsResult<Option<u64>> {
        let _ = (dev, fstype);
        Ok(None)
    }
}

/// Everything the node domain needs, bundled.
#[derive(Clone)]
pub struct Os {
    pub images: Arc<dyn ImageTool>,
    pub engine: Arc<dyn Engine>,
    pub loops: Arc<dyn LoopDevices>,
    pub mounts: Arc<dyn Mounter>,
    pub fs: Arc<dyn Filesystems>,
}

impl Os {
    /// The machine itself: qemu-img, qemu-storage-daemon, losetup, mount(2), mkfs.
    pub fn real() -> Os {
        Os {
            images: Arc::new(image::QemuImg::new()),
            engine: Arc::new(engine::QemuStorageDaemon::new()),
            loops: Arc::new(loopdev::Losetup::new()),
            mounts: Arc::new(mount::SysMounter::new()),
            fs: Arc::new(fs::SysFilesystems::new()),
        }
    }

    /// The machine, with qemu-storage-daemon started by the engine host listening on `socket`
    /// (`bicsi engine`) instead of forked from this process.
    pub fn real_with_engine_host(socket: PathBuf) -> Os {
        Os {
            engine: Arc::new(engine::QemuStorageDaemon::with_host(socket)),
            ..Os::real()
        }
    }

    /// The machine, with the NBD servers of this node's replicas requiring TLS with a node
    /// certificate of the cluster CA, and the engines' NBD clients presenting this node's:
    /// `dir` is the node's `--tls-dir` (`crate::tls`).
    /// `engine_host`: as `real_with_engine_host`.
    pub fn real_with_nbd_tls(engine_host: Option<PathBuf>, dir: PathBuf) -> Os {
        let mut engine = match engine_host {
            Some(socket) => engine::QemuStorageDaemon::with_host(socket),
            None => engine::QemuStorageDaemon::new(),
        };
        engine.nbd_tls = Some(dir);
        Os {
            engine: Arc::new(engine),
            ..Os::real()
        }
    }

    /// In-memory fakes sharing one simulated machine; see `fake::Fake` to inspect it. Tests only.
    #[cfg(test)]
    pub fn fake() -> Os {
        fake::Fake::new().os()
    }
}

impl std::fmt::Debug for Os {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Os { .. }")
    }
}

/// For tests that need root: the test kit's (`tests/kit/host.rs`), under the name the OS tests
/// call it by.
#[cfg(test)]
pub(crate) use crate::kit::root_or_skip;

/// A command line as a person would type it, for error messages.
pub(crate) fn display_command(cmd: &Command) -> String {
    let mut out = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        out.push(' ');
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            out.push('\'');
            out.push_str(&arg.replace('\'', r"'\''"));
            out.push('\'');
        } else {
            out.push_str(&arg);
        }
    }
    out
}

/// Run a program to completion and return its output whatever its exit status. The C locale makes
/// the messages we match on stable; stdin is closed so nothing can wait for a terminal.
pub(crate) fn output(cmd: &mut Command) -> OsResult<Output> {
    cmd.env("LC_ALL", "C").stdin(Stdio::null());
    cmd.output().map_err(|e| spawn_error(cmd, e))
}

/// Like `output`, but a non-zero exit is an `OsError::Command` carrying stderr.
pub(crate) fn run(cmd: &mut Command) -> OsResult<Output> {
    let out = output(cmd)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(command_error(cmd, &out, None))
    }
}

pub(crate) fn spawn_error(cmd: &Command, e: std::io::Error) -> OsError {
    let program = cmd.get_program().to_string_lossy().into_owned();
    if e.kind() == std::io::ErrorKind::NotFound {
        OsError::NotFound(format!(
            "program {program:?} not found in PATH; install it (the node image needs qemu-utils, \
             qemu-system-common or qemu-storage-daemon, e2fsprogs, xfsprogs, util-linux)"
        ))
    } else {
        OsError::Io {
            context: format!("cannot run {}", display_command(cmd)),
            source: e,
        }
    }
}

/// The error for a failed command: stderr (or stdout, or the exit status when both are empty),
/// an optional hint that says how to fix it, and `NoSpace` when the disk is full.
pub(crate) fn command_error(cmd: &Command, out: &Output, hint: Option<&str>) -> OsError {
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if text.is_empty() {
        text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    if text.is_empty() {
        text = format!("{} with no message", out.status);
    }
    command_failure(display_command(cmd), text, hint)
}

pub(crate) fn command_failure(cmd: String, mut stderr: String, hint: Option<&str>) -> OsError {
    if let Some(hint) = hint {
        stderr.push_str("; ");
        stderr.push_str(hint);
    }
    if stderr.contains("No space left on device") {
        return OsError::NoSpace(format!("{cmd} failed: {stderr}; free space on that disk"));
    }
    OsError::Command { cmd, stderr }
}

/// A path as UTF-8, which qemu's JSON options need.
pub(crate) fn utf8_path(path: &Path) -> OsResult<&str> {
    path.to_str().ok_or_else(|| {
        OsError::Unsupported(format!(
            "path {} is not valid UTF-8; qemu's options need UTF-8 paths, rename it",
            path.display()
        ))
    })
}

/// `path` with its parent resolved through symlinks but its last component left alone, so it
/// matches /proc/self/mountinfo and sysfs even when the last component is a dead FUSE mount that
/// cannot be stat'ed (ENOTCONN).
pub(crate) fn resolve_parent(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => match std::fs::canonicalize(parent) {
            Ok(parent) => parent.join(name),
            Err(_) => absolute,
        },
        _ => absolute,
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Cleanup that runs even when a root test panics halfway, so a failed test leaves no mount,
    //! loop device or daemon behind to break the next run.

    use super::*;

    /// Registers what a test created; on drop (also when the test panics) unmounts, detaches,
    /// stops the engines and then the replica servers (every export cut off) through `os`, in
    /// that order.
    pub struct Cleanup {
        pub os: Os,
        pub mounts: Vec<PathBuf>,
        pub loops: Vec<PathBuf>,
        pub engines: Vec<PathBuf>,
        pub replica_servers: Vec<PathBuf>,
    }

    impl Default for Cleanup {
        fn default() -> Self {
            Cleanup::with(Os::real())
        }
    }

    impl Cleanup {
        pub fn with(os: Os) -> Cleanup {
            Cleanup {
                os,
                mounts: Vec::new(),
                loops: Vec::new(),
                engines: Vec::new(),
                replica_servers: Vec::new(),
            }
        }
        pub fn mount(&mut self, target: &Path) {
            self.mounts.push(target.to_path_buf());
        }
        /// Registered by file, not by device: a device number freed by the test's own detach
        /// may already serve another test running in parallel.
        pub fn loop_file(&mut self, file: &Path) {
            self.loops.push(file.to_path_buf());
        }
        pub fn engine(&mut self, run_dir: &Path) {
            self.engines.push(run_dir.to_path_buf());
        }
        pub fn replica_server(&mut self, run_dir: &Path) {
            self.replica_servers.push(run_dir.to_path_buf());
        }
    }

    /// Run a command and return stdout, panicking with its stderr on failure.
    pub fn sh(cmd: &mut Command) -> String {
        let out = run(cmd).unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let os = &self.os;
            for target in self.mounts.iter().rev() {
                if let Err(e) = os.mounts.unmount(target) {
                    eprintln!("cleanup: {e}");
                }
            }
            for file in self.loops.iter().rev() {
                if let Err(e) = os.loops.detach_file(file) {
                    eprintln!("cleanup: {e}");
                }
            }
            for run_dir in self.engines.iter().rev() {
                if let Err(e) = os.engine.stop(run_dir) {
                    eprintln!("cleanup: {e}");
                }
            }
            for run_dir in self.replica_servers.iter().rev() {
                match os.engine.replica_server_status(run_dir) {
                    Ok(Some((_, ids))) => {
                        for id in ids {
                            if let Err(e) = os.engine.unexport_replica_force(run_dir, &id) {
                                eprintln!("cleanup: {e}");
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(e) => eprintln!("cleanup: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_targets_read_back_from_their_display() {
        for t in [
            ReplicaTarget::Nbd {
                host: "127.0.0.1".into(),
                port: 10809,
                export: "pvc-1-r0".into(),
            },
            ReplicaTarget::Nbd {
                host: "fd00::1".into(),
                port: 1,
                export: "a/b".into(),
            },
        ] {
            assert_eq!(ReplicaTarget::parse_nbd(&t.to_string()), Some(t));
        }
        for bad in [
            "/d/r.raw",
            "nbd://h:0/x",
            "nbd://h:1/",
            "nbd://:1/x",
            "nbd://h/x",
            "nbd://h:port/x",
        ] {
            assert_eq!(ReplicaTarget::parse_nbd(bad), None, "{bad}");
        }
    }

    #[test]
    fn display_command_quotes_what_a_shell_would_split() {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["info", "/a b/c", "it's", ""]);
        assert_eq!(
            display_command(&cmd),
            r"qemu-img info '/a b/c' 'it'\''s' ''"
        );
    }

    #[test]
    fn failing_command_carries_stderr_and_hint() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo boom >&2; exit 3"]);
        let err = run(&mut cmd).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sh -c 'echo boom >&2; exit 3' failed: boom"
        );
        let out = output(&mut cmd).unwrap();
        let err = command_error(&cmd, &out, Some("do the fix"));
        assert!(err.to_string().ends_with("boom; do the fix"), "{err}");
    }

    #[test]
    fn enospc_is_no_space() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'write: No space left on device' >&2; exit 1"]);
        assert!(matches!(run(&mut cmd), Err(OsError::NoSpace(_))));
        let e = OsError::io("writing x", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(e, OsError::NoSpace(_)), "{e}");
    }

    #[test]
    fn missing_program_is_not_found_with_fix() {
        // A plain PATH: an unreadable directory in the caller's PATH would turn ENOENT into EACCES.
        let mut cmd = Command::new("bicsi-no-such-program");
        cmd.env("PATH", "/usr/bin:/bin");
        let err = run(&mut cmd).unwrap_err();
        assert!(matches!(err, OsError::NotFound(_)));
        assert!(err.to_string().contains("install it"), "{err}");
    }

    #[test]
    fn resolve_parent_keeps_last_component() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let canonical = std::fs::canonicalize(&real).unwrap();
        assert_eq!(
            resolve_parent(&dir.path().join("link/export")),
            canonical.join("export")
        );
    }
}
