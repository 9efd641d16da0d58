//! The `mirror` engine process (issue 14): serves ONE regular file over FUSE whose bytes are the
//! volume, backed by several raw replica files of the same size (the `loop` engine's
//! `volume.raw`). Reads go to the first healthy replica (the caller lists the preferred one
//! first); writes, discards and zeroings go to every healthy replica before they are
//! acknowledged; an fsync of the file fsyncs every healthy replica. A loop device on the file
//! makes it a block device, as for qemu-storage-daemon's export.
//!
//! Many requests in flight: `threads` FUSE worker threads, each reading the kernel's queue on
//! its own clone of the /dev/fuse descriptor (`FUSE_DEV_IOC_CLONE`, done by the `fuser` crate),
//! requests of up to 1 MiB (`max_write`), and `FUSE_ASYNC_DIO` so a loop device in direct-I/O
//! mode keeps several requests outstanding. A write larger than `PARALLEL_WRITE` goes to the
//! local replicas in parallel (one scoped thread per extra local replica); smaller ones one
//! after the other, where a thread would cost more than the copy. A remote replica's request
//! is sent before the local writes and its reply awaited after them, whatever the size, so the
//! network round trip overlaps the local work without a thread.
//!
//! Faults (issue 15's rules): a replica whose write, discard or fsync fails while another
//! replica took the same request is dropped from the engine at once (never read or written again
//! by this process) and the fault is appended, fsync'ed, to `faults` (the run directory's
//! `faults.jsonl`, the node watcher's record) BEFORE the request is acknowledged, so the domain
//! marks it `err` even if this process dies right after. A request every healthy replica fails
//! returns the error to the caller and drops nothing: no replica holds what the others lack.
//! A read that fails on one replica is retried on the next, and the failing one is dropped.
//!
//! Snapshots: the `control` socket (a unix socket in the run directory) takes one-line commands:
//! `pause` waits for the writes in flight and holds new ones until `resume` (or until the
//! client's connection closes, so a crashed client never leaves the volume frozen); `status`
//! prints the healthy replicas. Between the two the replicas do not change, so each can be
//! cloned (FICLONE) as one instant of the volume. `flush PATH` (between the two, for a
//! copy-on-write replica) makes that replica's map on disk hold every bit the engine has in
//! memory, so a second open of its files reads that instant (`snapshot::capture`).
//!
//! Online rebuild (`rebuild`, issue 15): `add PATH` takes a new replica file while serving (`add
//! data=PATH,map=PATH[,base=PATH]`: a new copy-on-write replica), writes it from then on, fills
//! and verifies it in a copier thread; `targets` prints each one's state
//! and progress (also on `status`), `promote PATH FINAL` makes a complete one a replica under
//! its final name once the node agent renamed it, `drop PATH` forgets one. The argument that a
//! copy of old data never lands over a newer write is in `rebuild`'s module doc.
//! Remote replicas (`--remote nbd://host:port/export`, issue 14's replicas on several nodes):
//! another node's replica server exports the raw replica over NBD and this engine reads and
//! writes it with its own client (`nbd`: several connections when the server allows
//! multi-conn, `--remote-connections`, many requests in flight on each). Each replica
//! is a `Replica` with a backend, a local file or an NBD connection, behind the same small
//! methods, so the rules above hold for both: a remote replica whose request fails, whose
//! connection drops, or that does not answer within `--replica-timeout` seconds is dropped and
//! recorded like a local one. Reads go to the local replicas first (they come first).
//! A third backend, a copy-on-write replica over a shared raw base (`--cow-replica`, `cow`:
//! issue 14's layout for disks without reflink), is a local replica to every rule above; the
//! engine serves a single replica of any kind as well as several.
//!
//! It must not resize (the replicas grow offline; the file's size is the replicas' at start),
//! must not touch loop devices or mounts other than its own export, and keeps no state that is
//! not in its command line, its pid file or the fault file: re-adoption after a restart of bicsi
//! reads those (`crate::os::engine::mirror`), and the replicas promoted by online rebuilds from
//! the run directory's `added.json`, which the node agent writes.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty,
    ReplyOpen, ReplyWrite, Request, Session, SessionACL, WriteFlags,
};

use crate::os::ReplicaTarget;
use crate::os::engine::events::FaultRecord;

/// The copy-on-write replica layout, one of the image formats of the OS seams.
pub use crate::os::cow;
pub(crate) mod nbd;
mod rebuild;

pub use crate::os::engine::mirror::{DEFAULT_REPLICA_TIMEOUT, DEFAULT_THREADS, FS_NAME};
pub use rebuild::TargetState;

/// The largest request the kernel sends (FUSE `max_write`, and the read-ahead window).
pub const MAX_REQUEST: u32 = 1 << 20;
/// Writes from this size on go to the replicas in parallel.
pub const PARALLEL_WRITE: usize = 64 * 1024;
/// Connections to each remote replica when the command line does not say (one when its
/// server does not advertise multi-conn).
pub const DEFAULT_REMOTE_CONNECTIONS: usize = 4;

/// How the engine serves its file: the knobs measured by `bench/run --path volume-io-mirror`.
#[derive(Clone, Debug)]
pub struct MirrorConfig {
    /// The regular file the FUSE file system is mounted over (it must exist).
    pub export: PathBuf,
    /// The raw replica files, the preferred one for reads first.
    pub replicas: Vec<PathBuf>,
    /// Copy-on-write replicas (disks without reflink: `cow`), after the raw ones.
    pub cow_replicas: Vec<cow::CowSpec>,
    /// Replicas on other nodes (`ReplicaTarget::Nbd`), read only when no local one answers.
    pub remotes: Vec<ReplicaTarget>,
    /// How long a remote replica may take to answer a request before it is dropped.
    pub replica_timeout: Duration,
    /// The node's `--tls-dir`: remote replicas are reached over TLS with its certificate.
    pub tls_dir: Option<PathBuf>,
    /// Connections to each remote replica (when its server advertises multi-conn).
    pub remote_connections: usize,
    pub read_only: bool,
    /// FUSE worker threads (each with its own cloned /dev/fuse descriptor).
    pub threads: usize,
    /// Open the file with FOPEN_DIRECT_IO (no page cache of the FUSE file in the kernel).
    pub direct_io: bool,
    /// Ask for FUSE_WRITEBACK_CACHE (the kernel caches writes to the FUSE file and sends them
    /// later): only with `direct_io` off.
    pub writeback_cache: bool,
    /// Where faults are appended (one `FaultRecord` a line); None: nowhere (benchmarks).
    pub faults: Option<PathBuf>,
    /// The control socket (`pause`, `resume`, `status`); None: none.
    pub control: Option<PathBuf>,
}

/// Where a replica's bytes are.
enum Backend {
    File(File),
    Nbd(nbd::NbdClient),
    /// A copy-on-write replica over a shared base (`cow`: disks without reflink).
    Cow(cow::Cow),
}

/// One replica and whether it still gets requests.
struct Replica {
    /// A local replica's file, or a remote one's `nbd://` address as a path (for messages and
    /// the online rebuild's names).
    path: PathBuf,
    target: ReplicaTarget,
    backend: Backend,
    healthy: Arc<AtomicBool>,
}

impl Replica {
    /// Opens a local replica file; returns it with the file's length.
    fn open(path: &Path, read_only: bool) -> std::io::Result<(Replica, u64)> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("opening replica {}: {e}", path.display()))
            })?;
        let len = file.metadata()?.len();
        let replica = Replica {
            path: path.to_path_buf(),
            target: ReplicaTarget::Local(path.to_path_buf()),
            backend: Backend::File(file),
            healthy: Arc::new(AtomicBool::new(true)),
        };
        Ok((replica, len))
    }

    /// Opens a copy-on-write replica (`cow`); returns it with the volume's size. Its faults are
    /// recorded under its data file's path.
    fn open_cow(spec: &cow::CowSpec, read_only: bool) -> std::io::Result<(Replica, u64)> {
        let layer = cow::Cow::open(spec, read_only)?;
        let len = layer.size();
        let replica = Replica {
            path: spec.data.clone(),
            target: ReplicaTarget::Local(spec.data.clone()),
            backend: Backend::Cow(layer),
            healthy: Arc::new(AtomicBool::new(true)),
        };
        Ok((replica, len))
    }

    /// The local file (tests of the online rebuild write into it behind the engine's back).
    #[cfg(test)]
    fn file(&self) -> &File {
        match &self.backend {
            Backend::File(f) => f,
            Backend::Nbd(_) | Backend::Cow(_) => {
                panic!("{} is not a local raw replica", self.target)
            }
        }
    }

    /// The data extents within `[from, to)`: a local file's (SEEK_DATA/SEEK_HOLE); a remote
    /// replica's is the whole range (NBD's simple replies say nothing of holes).
    fn data_extents(&self, from: u64, to: u64) -> std::io::Result<Vec<crate::sync::Extent>> {
        match &self.backend {
            Backend::File(f) => crate::sync::extents_in(f, from, to),
            Backend::Cow(c) => c.data_extents(from, to),
            Backend::Nbd(_) => Ok(if to > from {
                vec![crate::sync::Extent {
                    offset: from,
                    len: to - from,
                }]
            } else {
                Vec::new()
            }),
        }
    }

    /// Fills `buf` from `offset` (zeros past the end of a file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match &self.backend {
            Backend::File(f) => crate::os::rawfile::read_full(f, buf, offset),
            Backend::Nbd(c) => c.read_at(buf, offset),
            Backend::Cow(c) => c.read_at(buf, offset),
        }
    }

    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        match &self.backend {
            Backend::File(f) => f.write_all_at(data, offset),
            Backend::Nbd(c) => c.write_at(data, offset, false),
            Backend::Cow(c) => c.write_at(data, offset),
        }
    }

    /// Frees the range; it reads back as zeros (a punched hole).
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match &self.backend {
            Backend::File(_) => self.fallocate_file(
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
            Backend::Nbd(c) => c.write_zeroes(offset, len, true),
            Backend::Cow(c) => c.discard(offset, len),
        }
    }

    /// Makes the range read as zeros, keeping it allocated.
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match &self.backend {
            Backend::File(_) => self.fallocate_file(
                nix::fcntl::FallocateFlags::FALLOC_FL_ZERO_RANGE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
            Backend::Nbd(c) => c.write_zeroes(offset, len, false),
            Backend::Cow(c) => c.write_zeroes(offset, len),
        }
    }

    /// What an fallocate(2) of the volume file does to this replica: a local file gets the
    /// same call; a remote one gets the punch or zeroing it means (an allocation is a hint
    /// an NBD server has no request for).
    fn fallocate(
        &self,
        flags: nix::fcntl::FallocateFlags,
        offset: u64,
        len: u64,
    ) -> std::io::Result<()> {
        use nix::fcntl::FallocateFlags as F;
        match &self.backend {
            Backend::File(_) => self.fallocate_file(flags, offset, len),
            _ if flags.contains(F::FALLOC_FL_PUNCH_HOLE) => self.discard(offset, len),
            _ if flags.contains(F::FALLOC_FL_ZERO_RANGE) => self.write_zeroes(offset, len),
            // A copy-on-write replica allocates on write; an NBD server has no such request.
            _ => Ok(()),
        }
    }

    fn fallocate_file(
        &self,
        flags: nix::fcntl::FallocateFlags,
        offset: u64,
        len: u64,
    ) -> std::io::Result<()> {
        let Backend::File(f) = &self.backend else {
            return Err(std::io::Error::other("not a local replica"));
        };
        nix::fcntl::fallocate(f, flags, offset as i64, len as i64).map_err(std::io::Error::from)
    }

    /// Makes every acknowledged write durable (fdatasync, or an NBD FLUSH).
    fn sync(&self) -> std::io::Result<()> {
        match &self.backend {
            Backend::File(f) => f.sync_data(),
            Backend::Nbd(c) => c.flush(),
            Backend::Cow(c) => c.sync(),
        }
    }

    /// `write_at`, begun: a remote replica's request is sent and its reply awaited by
    /// `Begun::finish`; a local one is written at once.
    fn begin_write(&self, data: &[u8], offset: u64) -> Begun<'_> {
        match &self.backend {
            Backend::Nbd(c) => Begun::sent(c, c.begin_write(data, offset)),
            _ => Begun::Done(self.write_at(data, offset)),
        }
    }

    /// `sync`, begun as `begin_write`.
    fn begin_sync(&self) -> Begun<'_> {
        match &self.backend {
            Backend::Nbd(c) => Begun::sent(c, c.begin_flush()),
            _ => Begun::Done(self.sync()),
        }
    }

    fn is_remote(&self) -> bool {
        matches!(self.backend, Backend::Nbd(_))
    }
}

/// A request begun on one replica: done (a local one), or sent to a remote one and not yet
/// answered (`on_all` sends to the remote replicas first, then writes the local ones, then
/// waits: the round trip overlaps the local write instead of following it).
enum Begun<'a> {
    Done(std::io::Result<()>),
    Sent(&'a nbd::NbdClient, nbd::Pending),
}

impl<'a> Begun<'a> {
    fn sent(client: &'a nbd::NbdClient, sent: std::io::Result<nbd::Pending>) -> Begun<'a> {
        match sent {
            Ok(p) => Begun::Sent(client, p),
            Err(e) => Begun::Done(Err(e)),
        }
    }

    fn finish(self) -> std::io::Result<()> {
        match self {
            Begun::Done(r) => r,
            Begun::Sent(c, p) => c.finish(p),
        }
    }
}

/// The volume the FUSE file shows.
struct Mirror {
    replicas: Arc<Vec<Replica>>,
    /// Replicas added while serving (online rebuilds).
    targets: Arc<rebuild::Targets>,
    size: u64,
    read_only: bool,
    direct_io: bool,
    writeback_cache: bool,
    faults: Option<PathBuf>,
    /// Serializes appends to the fault file.
    fault_lock: Mutex<()>,
    /// Writes hold it shared; `pause` holds it exclusively.
    pause: Arc<RwLock<()>>,
    /// When the engine started: the file's times.
    started: SystemTime,
    uid: u32,
    gid: u32,
}

const TTL: Duration = Duration::from_secs(1);

fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from(std::io::Error::from_raw_os_error(
        e.raw_os_error().unwrap_or(libc::EIO),
    ))
}

impl Mirror {
    fn attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: self.size,
            blocks: self.size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::RegularFile,
            perm: if self.read_only { 0o400 } else { 0o600 },
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn healthy(&self) -> impl Iterator<Item = (usize, &Replica)> {
        self.replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.healthy.load(Ordering::Acquire))
    }

    /// Drops replica `i` (once) and records why, durably, before returning.
    fn drop_replica(&self, i: usize, operation: &str, error: &std::io::Error) {
        let r = &self.replicas[i];
        if !r.healthy.swap(false, Ordering::AcqRel) {
            return;
        }
        self.record_fault(&r.target, operation, error);
    }

    /// Says why the replica `replica` was dropped and appends it, fsync'ed, to the fault file.
    fn record_fault(&self, target: &ReplicaTarget, operation: &str, error: &std::io::Error) {
        let reason = format!(
            "the mirror engine dropped replica {} after a failed {operation}: {error}",
            target
        );
        eprintln!("bicsi mirror: {reason}");
        let Some(path) = &self.faults else {
            return;
        };
        let record = FaultRecord {
            target: target.clone(),
            reason,
            at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let _guard = self.fault_lock.lock().unwrap_or_else(|e| e.into_inner());
        let written = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new().create(true).append(true).open(path)?;
            let line = serde_json::to_string(&record).map_err(std::io::Error::other)?;
            writeln!(f, "{line}")?;
            f.sync_all()
        })();
        if let Err(e) = written {
            eprintln!(
                "bicsi mirror: cannot record the fault in {}: {e}",
                path.display()
            );
        }
    }

    /// Runs `op` on every healthy replica (the remote ones' requests sent first, then the local
    /// ones, in parallel when `parallel`, then the remote replies awaited), then on the targets
    /// of online rebuilds; drops the replicas that failed when at least one succeeded; the
    /// error when none did. A target that fails is dropped and never fails the request, unless
    /// it is a promoted one, which counts as a replica.
    fn on_all(
        &self,
        operation: &str,
        parallel: bool,
        op: impl for<'r> Fn(&'r Replica) -> Begun<'r> + Sync,
    ) -> Result<(), Errno> {
        let extra = self.targets.written();
        let targets: Vec<(usize, &Replica)> = self.healthy().collect();
        if targets.is_empty() && !extra.iter().any(|t| t.promoted()) {
            return Err(Errno::EIO);
        }
        let (remote, local): (Vec<_>, Vec<_>) =
            targets.into_iter().partition(|(_, r)| r.is_remote());
        let sent: Vec<(usize, Begun)> = remote.iter().map(|(i, r)| (*i, op(r))).collect();
        let mut results: Vec<(usize, std::io::Result<()>)> = if parallel && local.len() > 1 {
            std::thread::scope(|s| {
                let handles: Vec<_> = local[1..]
                    .iter()
                    .map(|(i, r)| {
                        let op = &op;
                        (*i, s.spawn(move || op(r).finish()))
                    })
                    .collect();
                let mut out = vec![(local[0].0, op(local[0].1).finish())];
                for (i, h) in handles {
                    out.push((
                        i,
                        h.join()
                            .unwrap_or_else(|_| Err(std::io::Error::other("writer panicked"))),
                    ));
                }
                out
            })
        } else {
            local.iter().map(|(i, r)| (*i, op(r).finish())).collect()
        };
        results.extend(sent.into_iter().map(|(i, b)| (i, b.finish())));
        let extra: Vec<_> = extra
            .into_iter()
            .map(|t| {
                let r = op(&t.replica).finish();
                (t, r)
            })
            .collect();
        let ok = results.iter().any(|(_, r)| r.is_ok())
            || extra.iter().any(|(t, r)| t.promoted() && r.is_ok());
        if !ok {
            let first = results
                .iter()
                .find_map(|(_, r)| r.as_ref().err())
                .map(errno_of)
                .unwrap_or(Errno::EIO);
            return Err(first);
        }
        for (i, r) in &results {
            if let Err(e) = r {
                self.drop_replica(*i, operation, e);
            }
        }
        for (t, r) in &extra {
            if let Err(e) = r {
                let why = format!("a {operation} failed: {e}");
                if t.fail(why.clone()) == Some(true) {
                    self.record_fault(&target_named(&t.name()), operation, e);
                } else {
                    eprintln!(
                        "bicsi mirror: dropped rebuild target {}: {why}",
                        t.replica.path.display()
                    );
                }
            }
        }
        Ok(())
    }

    fn read_at(&self, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let end = (offset + size as u64).min(self.size);
        let len = end.saturating_sub(offset) as usize;
        let mut buf = vec![0u8; len];
        for (i, r) in self.healthy() {
            match r.read_at(&mut buf, offset) {
                Ok(()) => return Ok(buf),
                Err(e) => self.drop_replica(i, "read", &e),
            }
        }
        // A target is read only once promoted (filled, verified and renamed into place).
        for t in self.targets.written().iter().filter(|t| t.promoted()) {
            match t.replica.read_at(&mut buf, offset) {
                Ok(()) => return Ok(buf),
                Err(e) => {
                    if t.fail(format!("a read failed: {e}")).is_some() {
                        self.record_fault(&target_named(&t.name()), "read", &e);
                    }
                }
            }
        }
        Err(Errno::EIO)
    }
}

impl Filesystem for Mirror {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_REQUEST);
        let _ = config.set_max_readahead(MAX_REQUEST);
        let _ = config.set_max_background(128);
        let _ = config.set_congestion_threshold(96);
        // Several direct-I/O requests of one caller in flight at once (the loop device's aio).
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        if self.writeback_cache && !self.direct_io {
            let _ = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        Ok(())
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        reply.attr(&TTL, &self.attr());
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        // The volume's size is its replicas': it grows offline, never through the file.
        if size.is_some_and(|s| s != self.size) {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &self.attr());
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        if self.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let mut open = FopenFlags::empty();
        if self.direct_io {
            open |= FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        }
        reply.opened(FileHandle(0), open);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.read_at(offset, size) {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        if offset.saturating_add(data.len() as u64) > self.size {
            return reply.error(Errno::ENOSPC);
        }
        let _paused = self.pause.read().unwrap_or_else(|e| e.into_inner());
        let _chunks = self.targets.lock_range(offset, data.len() as u64);
        match self.on_all("write", data.len() >= PARALLEL_WRITE, |r| {
            r.begin_write(data, offset)
        }) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): nothing is buffered here; durability is fsync's.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.read_only {
            return reply.ok();
        }
        match self.on_all("fsync", true, Replica::begin_sync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        use nix::fcntl::FallocateFlags;
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let flags = FallocateFlags::from_bits_truncate(mode);
        // Only what keeps the size: a discard (punch hole) or a zeroing from the loop device.
        if !flags.contains(FallocateFlags::FALLOC_FL_KEEP_SIZE)
            && offset.saturating_add(length) > self.size
        {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let _paused = self.pause.read().unwrap_or_else(|e| e.into_inner());
        let _chunks = self.targets.lock_range(offset, length);
        match self.on_all("discard", false, |r| {
            Begun::Done(r.fallocate(flags, offset, length))
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// Serves the control socket: `pause` (holds new writes until `resume` or the connection
/// closes), `resume`, `status`, and the online rebuild's `add`, `targets`, `promote`, `drop`.
fn serve_control(mirror: Arc<MirrorShared>, listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let mirror = mirror.clone();
        std::thread::spawn(move || control_session(&mirror, conn));
    }
}

/// What the control socket needs of the engine, shared with the FUSE session.
struct MirrorShared {
    /// How remote targets are connected (`add nbd://…`), as the command line's remotes were.
    cfg: MirrorConfig,
    pause: Arc<RwLock<()>>,
    replicas: Vec<(ReplicaTarget, Arc<AtomicBool>)>,
    sources: Arc<Vec<Replica>>,
    targets: Arc<rebuild::Targets>,
    size: u64,
    read_only: bool,
}

impl MirrorShared {
    /// `flush PATH`: makes every write the local replica `PATH` took durable (its `sync`: for a
    /// copy-on-write replica, its map on disk then holds every bit the engine has in memory),
    /// while the engine stays healthy on it; an error when `PATH` is not one of its healthy
    /// replicas (dropped, or never one). A snapshot asks this between `pause` and `resume`, so
    /// that a second open of the replica's files reads the volume as the engine serves it.
    fn flush_replica(&self, path: &Path) -> String {
        // A target promoted under this name (an online rebuild) is the replica now, even when
        // a dropped replica of the command line had the same name.
        if let Some(t) = self.targets.find(path).filter(|t| t.promoted()) {
            return match t.replica.sync() {
                Ok(()) => "ok flushed".to_string(),
                Err(e) => format!("error flushing replica {}: {e}", path.display()),
            };
        }
        let wanted = ReplicaTarget::Local(path.to_path_buf());
        let Some(i) = self.replicas.iter().position(|(t, _)| *t == wanted) else {
            return format!("error {} is not a replica of this engine", path.display());
        };
        if !self.replicas[i].1.load(Ordering::Acquire) {
            return format!(
                "error replica {} was dropped by this engine (a fault); it is not current",
                path.display()
            );
        }
        match self.sources[i].sync() {
            Ok(()) => "ok flushed".to_string(),
            Err(e) => format!("error flushing replica {}: {e}", path.display()),
        }
    }

    /// `add PATH`: opens the target (a local file, or `nbd://host:port/export`: a replica that
    /// another node's replica server exports; `cow`: a new copy-on-write replica, given as
    /// `add data=PATH,map=PATH[,base=PATH]` and known by its data file), installs it while no
    /// write is in flight (the pause lock held exclusively, see `rebuild`) and starts its
    /// copier. A copy-on-write target is written through its layer like a replica (a partial
    /// write to a clear cluster fills the rest from its base) and filled with only what its
    /// view lacks (`rebuild`'s doc).
    fn add(&self, path: &Path, cow: Option<&cow::CowSpec>) -> Result<String, String> {
        if self.read_only {
            return Err("the engine serves its volume read only; nothing to rebuild".into());
        }
        let remote = path
            .to_str()
            .filter(|p| p.starts_with("nbd://"))
            .map(|p| {
                ReplicaTarget::parse_nbd(p)
                    .ok_or_else(|| format!("{p}: not an nbd://host:port/export address"))
            })
            .transpose()?;
        // A remote replica is rebuilt in place (its node's file, exported again): the engine
        // may have it among its replicas, dropped; a healthy one is never a target.
        let clash = self.replicas.iter().any(|(t, healthy)| match (&remote, t) {
            (None, ReplicaTarget::Local(p)) => p == path,
            (Some(r), t) => r == t && healthy.load(Ordering::Acquire),
            (None, _) => false,
        });
        if clash {
            return Err(format!(
                "{} is one of the engine's healthy replicas; add a new file (a temporary name) \
                 or a replica the engine dropped",
                path.display()
            ));
        }
        if let Some(t) = self.targets.find(path) {
            if t.written() {
                return Ok(format!("ok adding {} (already)", path.display()));
            }
            self.targets.remove(&t);
        }
        let (replica, len) = match &remote {
            None => match cow {
                Some(spec) => Replica::open_cow(spec, false).map_err(|e| e.to_string())?,
                None => Replica::open(path, false).map_err(|e| e.to_string())?,
            },
            Some(target) => {
                let replica = connect_remote(target, &self.cfg).map_err(|e| e.to_string())?;
                let len = match &replica.backend {
                    Backend::Nbd(c) => c.size(),
                    Backend::File(f) => f.metadata().map_err(|e| e.to_string())?.len(),
                    Backend::Cow(c) => c.size(),
                };
                (replica, len)
            }
        };
        if len != self.size {
            return Err(format!(
                "{} has {len} bytes but the volume has {}; make the target the volume's size",
                path.display(),
                self.size
            ));
        }
        let target = Arc::new(rebuild::Target::new(replica));
        {
            let _no_write_in_flight = self.pause.write().unwrap_or_else(|e| e.into_inner());
            self.targets.push(target.clone());
        }
        let (sources, targets, size) = (self.sources.clone(), self.targets.clone(), self.size);
        std::thread::spawn(move || rebuild::fill(sources, targets, target, size));
        eprintln!("bicsi mirror: rebuilding {} online", path.display());
        Ok(format!("ok adding {}", path.display()))
    }

    /// `promote PATH FINAL`: a complete target, renamed to FINAL by the node agent, becomes a
    /// replica (read when the others fail; its faults recorded as FINAL's).
    fn promote(&self, path: &Path, name: &Path) -> Result<String, String> {
        let t = self
            .targets
            .find(path)
            .ok_or_else(|| format!("no rebuild target {}", path.display()))?;
        match t.promote(name) {
            Ok(()) => Ok(format!("ok promoted {}", name.display())),
            Err(state) => Err(format!(
                "target {} is {}, not complete; promote it once `targets` says complete",
                path.display(),
                state.as_str()
            )),
        }
    }

    fn drop_target(&self, path: &Path) -> String {
        match self.targets.find(path) {
            Some(t) => {
                t.fail("dropped by the node agent".into());
                self.targets.remove(&t);
                format!("ok dropped {}", path.display())
            }
            None => format!("ok dropped {} (not a target)", path.display()),
        }
    }

    fn targets_json(&self) -> String {
        serde_json::Value::Array(self.targets.all().iter().map(|t| t.status()).collect())
            .to_string()
    }
}

fn control_session(shared: &MirrorShared, conn: UnixStream) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut held = None;
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { break };
        let answer = match line.trim() {
            "pause" if held.is_some() => "ok paused".to_string(),
            "pause" => {
                held = Some(shared.pause.write().unwrap_or_else(|e| e.into_inner()));
                "ok paused".to_string()
            }
            "resume" => {
                held = None;
                "ok resumed".to_string()
            }
            "status" => {
                let healthy: Vec<String> = shared
                    .replicas
                    .iter()
                    .filter(|(_, h)| h.load(Ordering::Acquire))
                    .map(|(t, _)| t.to_string())
                    .chain(
                        shared
                            .targets
                            .written()
                            .iter()
                            .filter(|t| t.promoted())
                            .map(|t| t.name().display().to_string()),
                    )
                    .collect();
                let mut answer = format!("ok healthy {}", serde_json::json!(healthy));
                if !shared.targets.all().is_empty() {
                    answer.push_str(&format!(" targets {}", shared.targets_json()));
                }
                answer
            }
            "targets" => format!("ok targets {}", shared.targets_json()),
            other => match other.split_once(' ') {
                Some(("flush", path)) => shared.flush_replica(Path::new(path)),
                // A copy-on-write target: `add data=PATH,map=PATH[,base=PATH]`.
                Some(("add", spec)) if spec.starts_with("data=") => match cow::CowSpec::parse(spec)
                {
                    Ok(spec) => shared.add(&spec.data.clone(), Some(&spec)),
                    Err(e) => Err(e),
                }
                .unwrap_or_else(|e| format!("error {e}")),
                Some(("add", path)) => shared
                    .add(Path::new(path), None)
                    .unwrap_or_else(|e| format!("error {e}")),
                Some(("drop", path)) => shared.drop_target(Path::new(path)),
                Some(("promote", paths)) => match paths.split_once(' ') {
                    Some((path, name)) => shared
                        .promote(Path::new(path), Path::new(name))
                        .unwrap_or_else(|e| format!("error {e}")),
                    None => "error promote needs PATH FINAL".to_string(),
                },
                _ => format!(
                    "error unknown command {other:?}; use pause, resume, status, targets, add \
                     PATH, add data=PATH,map=PATH[,base=PATH], promote PATH FINAL, drop PATH or \
                     flush PATH"
                ),
            },
        };
        if writeln!(out, "{answer}").is_err() {
            break;
        }
    }
    drop(held);
}

/// Opens the replicas, mounts the FUSE file over `export` and serves it until it is unmounted.
/// `ready` runs once the file is mounted (the caller writes its pid file there).
pub fn run(cfg: &MirrorConfig, ready: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
    if cfg.replicas.is_empty() && cfg.cow_replicas.is_empty() && cfg.remotes.is_empty() {
        return Err(std::io::Error::other(
            "the mirror engine needs at least one --replica, --cow-replica or --remote",
        ));
    }
    let mut replicas = Vec::new();
    let mut size = None;
    for path in &cfg.replicas {
        let (replica, len) = Replica::open(path, cfg.read_only)?;
        match size {
            None => size = Some(len),
            Some(s) if s != len => {
                return Err(std::io::Error::other(format!(
                    "replica {} has {len} bytes but {} has {s}: the replicas of a volume have \
                     one size; grow or rebuild the smaller one first",
                    path.display(),
                    cfg.replicas[0].display()
                )));
            }
            Some(_) => {}
        }
        replicas.push(replica);
    }
    for spec in &cfg.cow_replicas {
        let (replica, len) = Replica::open_cow(spec, cfg.read_only)?;
        match size {
            None => size = Some(len),
            Some(s) if s != len => {
                return Err(std::io::Error::other(format!(
                    "copy-on-write replica {} has {len} bytes but the first replica has {s}: \
                     the replicas of a volume have one size; grow or rebuild the smaller one \
                     first",
                    spec.data.display()
                )));
            }
            Some(_) => {}
        }
        replicas.push(replica);
    }
    for target in &cfg.remotes {
        let replica = connect_remote(target, cfg)?;
        let len = match &replica.backend {
            Backend::Nbd(c) => c.size(),
            Backend::File(f) => f.metadata()?.len(),
            Backend::Cow(c) => c.size(),
        };
        match size {
            None => size = Some(len),
            Some(s) if s != len => {
                return Err(std::io::Error::other(format!(
                    "remote replica {target} has {len} bytes but the first replica has {s}: \
                     the replicas of a volume have one size; grow or rebuild the smaller one \
                     first"
                )));
            }
            Some(_) => {}
        }
        replicas.push(replica);
    }
    let mirror = Mirror {
        replicas: Arc::new(replicas),
        targets: Arc::default(),
        size: size.unwrap_or(0),
        read_only: cfg.read_only,
        direct_io: cfg.direct_io,
        writeback_cache: cfg.writeback_cache,
        faults: cfg.faults.clone(),
        fault_lock: Mutex::new(()),
        pause: Arc::new(RwLock::new(())),
        started: SystemTime::now(),
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
    };
    let mut options = vec![
        MountOption::FSName(FS_NAME.into()),
        MountOption::Subtype(FS_NAME.into()),
    ];
    options.push(if cfg.read_only {
        MountOption::RO
    } else {
        MountOption::RW
    });
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = SessionACL::Owner;
    config.n_threads = Some(cfg.threads.max(1));
    config.clone_fd = true;
    let shared = control_shared(&mirror, cfg);
    let session = Session::new(mirror, &cfg.export, &config)?;
    if let Some(path) = &cfg.control {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("binding control socket {}: {e}", path.display()),
            )
        })?;
        std::thread::spawn(move || serve_control(shared, listener));
    }
    ready()?;
    session.run()
}

/// Connects to a remote replica (an NBD export of another node's replica server).
fn connect_remote(target: &ReplicaTarget, cfg: &MirrorConfig) -> std::io::Result<Replica> {
    let ReplicaTarget::Nbd { host, port, export } = target else {
        return Err(std::io::Error::other(format!(
            "--remote {target}: not an nbd://host:port/export address"
        )));
    };
    let tls = match &cfg.tls_dir {
        Some(dir) => Some(
            crate::tls::ClusterTls::load(dir)
                .and_then(|t| t.client_config(crate::tls::Role::Node))
                .map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
                })?,
        ),
        None => None,
    };
    let client = nbd::NbdClient::connect_pool(
        host,
        *port,
        export,
        cfg.replica_timeout,
        tls,
        cfg.remote_connections,
    )
    .map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "connecting to remote replica {target}: {e}; check that its node's replica \
                 server runs and exports it, and that {host}:{port} is reachable from here"
            ),
        )
    })?;
    eprintln!(
        "bicsi mirror: remote replica {target}: {} connection(s)",
        client.connections()
    );
    if client.read_only() && !cfg.read_only {
        return Err(std::io::Error::other(format!(
            "remote replica {target} is exported read-only, and the volume is served writable; \
             export it writable (the replica server does) or serve the volume read-only"
        )));
    }
    Ok(Replica {
        path: PathBuf::from(target.to_string()),
        target: target.clone(),
        backend: Backend::Nbd(client),
        healthy: Arc::new(AtomicBool::new(true)),
    })
}

fn control_shared(mirror: &Mirror, cfg: &MirrorConfig) -> Arc<MirrorShared> {
    Arc::new(MirrorShared {
        cfg: cfg.clone(),
        pause: mirror.pause.clone(),
        replicas: mirror
            .replicas
            .iter()
            .map(|r| (r.target.clone(), r.healthy.clone()))
            .collect(),
        sources: mirror.replicas.clone(),
        targets: mirror.targets.clone(),
        size: mirror.size,
        read_only: mirror.read_only,
    })
}

/// A promoted target's replica by its name: a remote one's is its `nbd://` address.
fn target_named(name: &Path) -> ReplicaTarget {
    name.to_str()
        .and_then(ReplicaTarget::parse_nbd)
        .unwrap_or_else(|| ReplicaTarget::Local(name.to_path_buf()))
}

/// The replica paths an engine's fault file says were dropped.
pub fn dropped_replicas(faults: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string(faults) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<FaultRecord>(l).ok())
        .filter_map(|r| match r.target {
            ReplicaTarget::Local(p) => Some(p),
            ReplicaTarget::Nbd { .. } => None,
        })
        .collect()
}

/// The hidden `bicsi engine-mirror` command's flags (the node agent builds them; see
/// `crate::os::engine::mirror`).
#[derive(clap::Args, Debug, Clone)]
pub struct MirrorArgs {
    /// The regular file to mount the volume over.
    #[arg(long)]
    pub export: PathBuf,
    /// A raw replica file; repeat for each, the one to read from first.
    #[arg(long = "replica", required_unless_present_any = ["remotes", "cow_replicas"])]
    pub replicas: Vec<PathBuf>,
    /// A copy-on-write replica on a disk without reflink, `data=PATH,map=PATH[,base=PATH]`:
    /// its sparse data file, its cluster map and the disk's raw expansion of the backing image
    /// (none for a volume without one); repeat for each. Read after the raw replicas.
    #[arg(long = "cow-replica", value_parser = cow::CowSpec::parse)]
    pub cow_replicas: Vec<cow::CowSpec>,
    /// A replica on another node, `nbd://HOST:PORT/EXPORT` (its replica server's export);
    /// repeat for each. Read only when no local replica answers.
    #[arg(long = "remote", value_parser = parse_remote)]
    pub remotes: Vec<ReplicaTarget>,
    /// Seconds a remote replica may take to answer a request before it is dropped (the
    /// `replica-timeout` setting).
    #[arg(long, default_value_t = DEFAULT_REPLICA_TIMEOUT)]
    pub replica_timeout: u64,
    /// Reach remote replicas over TLS with this node's certificate (the node's `--tls-dir`:
    /// ca.crt, tls.crt, tls.key, optionally ca.crl); their servers must hold node certificates.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// TCP connections to each remote replica, when its server advertises multi-conn (bicsi's
    /// replica server does; otherwise one).
    #[arg(long, default_value_t = DEFAULT_REMOTE_CONNECTIONS)]
    pub remote_connections: usize,
    /// Serve the file read only (writes and opens for writing are refused).
    #[arg(long)]
    pub read_only: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = DEFAULT_THREADS)]
    pub threads: usize,
    /// FOPEN_DIRECT_IO on the file (no page cache for it in the kernel).
    #[arg(long)]
    pub direct_io: bool,
    /// FUSE_WRITEBACK_CACHE (without --direct-io only).
    #[arg(long)]
    pub writeback_cache: bool,
    /// Append dropped replicas here (the run directory's faults.jsonl).
    #[arg(long)]
    pub faults: Option<PathBuf>,
    /// The control socket (pause, resume, status).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Written with the serving process's pid once the file is mounted.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Serve from a child process in its own process group and return once the file is mounted
    /// (0) or the child failed (non-zero): the readiness signal of the node agent.
    #[arg(long)]
    pub daemonize: bool,
}

impl MirrorArgs {
    pub fn config(&self) -> MirrorConfig {
        MirrorConfig {
            export: self.export.clone(),
            replicas: self.replicas.clone(),
            cow_replicas: self.cow_replicas.clone(),
            remotes: self.remotes.clone(),
            replica_timeout: Duration::from_secs(self.replica_timeout.max(1)),
            tls_dir: self.tls_dir.clone(),
            remote_connections: self.remote_connections.max(1),
            read_only: self.read_only,
            threads: self.threads,
            direct_io: self.direct_io,
            writeback_cache: self.writeback_cache,
            faults: self.faults.clone(),
            control: self.control.clone(),
        }
    }
}

/// `--remote`'s value: an `nbd://host:port/export` address.
fn parse_remote(value: &str) -> Result<ReplicaTarget, String> {
    ReplicaTarget::parse_nbd(value).ok_or_else(|| {
        format!("{value:?} is not an NBD address; write nbd://HOST:PORT/EXPORT (IPv6: [HOST])")
    })
}

/// `bicsi engine-mirror`: serve in this process, or (`--daemonize`) start a copy of this
/// command without the flag in its own process group and wait for its pid file.
pub fn main(args: MirrorArgs) -> std::io::Result<()> {
    if !args.daemonize {
        let pid_file = args.pid_file.clone();
        return run(&args.config(), move || match &pid_file {
            Some(p) => std::fs::write(p, format!("{}\n", std::process::id())),
            None => Ok(()),
        });
    }
    let Some(pid_file) = args.pid_file.clone() else {
        return Err(std::io::Error::other(
            "--daemonize needs --pid-file (its readiness signal)",
        ));
    };
    crate::os::engine::daemonize_self(
        &pid_file,
        &format!("the mirror engine of {}", args.export.display()),
    )
}
