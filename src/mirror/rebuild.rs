//! Online rebuild inside the mirror engine (issue 15): a new replica file (the *target*) joins
//! a serving engine write-only (`add PATH` on the control socket), a copier thread fills it from
//! the healthy replicas chunk by chunk, verifying each chunk as it goes, a second pass verifies
//! again the chunks the volume wrote after they were copied, and only then is it reported
//! complete. The node agent then renames the file into place and tells the engine
//! (`promote PATH FINAL`), after which it is a replica like the others (read when the others
//! fail, its faults recorded under its final name); the domain (`crate::controller::online`)
//! makes it rw. This module never decides a replica's mode and never renames a file.
//!
//! A target is never read while it is filled. A failure on it (a write, discard, fsync, the
//! copy or the verification) drops only the target, never fails the volume's request. Memory is
//! three chunk buffers per target; when the volume wrote while the copier did a chunk, the copier
//! then sleeps as long as that chunk took ([`PACE`]), so it takes at most about half of one core
//! from the volume's I/O; with no write in the meantime it goes on at once.
//!
//! # Why a copy of old data never lands over a newer acknowledged write
//! The volume is cut into [`CHUNK`]-sized chunks, each with a lock (a set of busy chunk numbers
//! under a mutex, and a condition variable). While a target is being copied or verified:
//! - every write, discard and zeroing of the volume takes the locks of all the chunks it touches
//!   (all at once, waiting until none is busy, so two requests never deadlock) before it writes
//!   any replica, writes the healthy replicas and then the target, and releases them after;
//! - the copier takes the lock of one chunk, reads the chunk from a healthy replica, writes what
//!   differs into the target (and punches what is a hole in the source), and releases it.
//!
//! So for each chunk the copy and every write are ordered. If the copy runs first, the later
//! write puts its bytes into the target itself (it writes the target too). If the write runs
//! first, the healthy replica already holds its bytes when the copier reads it. Either way, once
//! both are done, the target's chunk equals the source's, and every later write keeps it so
//! (it reaches the target under the same lock). A write acknowledged before the target existed
//! is in the source when the copier gets there, since `add` installs the target while holding
//! the engine's pause lock exclusively (as `pause` does): no write is in flight at that instant,
//! and every write after it sees the target and takes the chunk locks. Whether writes take the
//! locks is read under the pause lock too, so no write can miss both the target and the locks.
//! The verification reads both files under the same lock, so no write is half-done on one side
//! when it compares: a difference is real and fails the rebuild. Once verified, the target gets
//! every write as the replicas do, without the locks (nothing else writes it any more).
//!
//! # A copy-on-write target (issue 15 with 14: disks without reflink)
//! A volume over copy-on-write replicas (`super::cow`) is rebuilt into a NEW copy-on-write
//! replica over the target disk's own base (`add data=PATH,map=PATH[,base=PATH]`: the node agent
//! makes it empty, under temporary names, and renames its map and then its data file into place
//! only after the engine says complete). Nothing above changes for it, because the target is
//! reached only through `Replica`'s methods and so through its layer:
//! - *No acknowledged write is lost.* A volume write reaches the target as `Cow::write_at`,
//!   under the chunk locks like any target; a partial write to a clear cluster of the target
//!   fills the rest of that cluster from the target's base inside the layer (under the layer's
//!   own cluster lock) before it sets the bit, so the cluster then holds the base's bytes with
//!   the write over them: what the source's view holds there too, when the source's cluster was
//!   clear (the same base) or when the copier has copied it (it does so under the chunk lock,
//!   before or after the write, as for a raw target). The copier's own writes and punches go
//!   through the layer the same way (a punch of a whole cluster over base bytes keeps zeros in
//!   the data file and sets the bit, so the base never shows through).
//! - *The target never serves stale data.* It is read only once promoted, i.e. complete and
//!   verified, and the domain makes the replica rw only after the node agent renamed both files
//!   into place. The verification compares the two VIEWS (read through both layers) under the
//!   chunk locks, exactly as for raw files. Its durability: the final `sync` of the target is
//!   the layer's flush (data, then map), so the map on disk names every cluster the copy and
//!   the volume's writes set before it was reported complete.
//! - *Only what differs is copied* (`shared_base`, `pieces`): where the source and the target
//!   are both copy-on-write replicas over the same base (`cow::Cow::same_base`: both without a
//!   base, or the same backing image's expansion) and a cluster is clear in both, both read the
//!   base there: it is equal without being read. Under the chunk lock no write sets a bit, so
//!   the test holds while the chunk is copied or verified. Elsewhere the target is compared and
//!   written cluster by cluster, so a cluster the volume wrote with its base's own bytes stays
//!   clear in the target and only clusters whose view differs from the target's base take room.
//!   A kill -9 of the engine leaves only the temporary files, which the next rebuild removes
//!   and makes again (`replica_file::create_cow_target`); nothing ever opens them as a replica.
//!
//! # What the copy reads and writes
//! Per chunk, under its lock, the copier asks both files where they hold data (SEEK_DATA and
//! SEEK_HOLE for a local file; a copy-on-write replica's map; everything for an NBD one, which
//! says nothing of holes) and moves only what it must: the source is read only where it has
//! data, the target only where both have data (a hole of the target reads as zeros, so source
//! zeros over it are equal without a read and other source bytes are written without one),
//! only what differs is written, and target data over a source hole is punched. A second
//! thread `fdatasync`s the target every [`FLUSH_WINDOW`] bytes written while the volume is
//! quiet (no write of the volume in the window: under the volume's writes it would slow them),
//! so the disk writes the copy while it runs and the final fsync waits only for the last
//! window. The engine's log line of a complete target counts the bytes of each kind (`Io`):
//! they do not depend on the load. (The first version read the target everywhere the source
//! had data, holes included, and left the whole copy dirty for one fsync at the end: measured
//! in a debug build, 1.0–2.9 s of fsync after a 3.5–4.6 s copy.) The source and the target are
//! on different disks (a replica per disk), so `copy_file_range` could not share blocks
//! between them: across file systems it fails with EXDEV or copies through the kernel, as the
//! read/write here does.
//!
//! # What is verified, and when
//! The copier compares each chunk of the target with the source's under the chunk's lock: a
//! chunk it finds equal is verified then; one it writes (or punches) it reads back and compares
//! again, still under the lock. What can still make the target differ afterwards is the write
//! path itself (a volume write that reached the source and not the target). So every write that
//! takes the locks marks its chunks *dirty* for each target the copier has already passed there
//! (the copier's position is read under the chunk's lock, so a write either comes before the
//! copy of its chunk, which then copies its bytes, or is marked), and the verification pass
//! compares the dirty chunks again, each under its lock. A chunk neither copied differently nor
//! written since was compared equal under its lock and nothing wrote it since: it is not read
//! twice. (The first version read the whole volume twice, which made the online rebuild of a
//! quiet volume about twice as slow as it had to be.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use super::Replica;

/// The unit of the copy, of the verification and of the locks.
pub const CHUNK: u64 = 1 << 20;
/// The copier sleeps this many times as long as the chunk it just did took.
pub const PACE: u32 = 1;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a target is in its rebuild.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TargetState {
    Copying = 0,
    Verifying = 1,
    /// Filled and verified identical; still written, never read.
    Complete = 2,
    /// Renamed into place by the node agent: a replica of the engine like the others.
    Promoted = 3,
    Failed = 4,
}

impl TargetState {
    fn from_u8(v: u8) -> TargetState {
        match v {
            0 => TargetState::Copying,
            1 => TargetState::Verifying,
            2 => TargetState::Complete,
            3 => TargetState::Promoted,
            _ => TargetState::Failed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Copying => "copying",
            TargetState::Verifying => "verifying",
            TargetState::Complete => "complete",
            TargetState::Promoted => "promoted",
            TargetState::Failed => "failed",
        }
    }
}

/// A replica being rebuilt inside the engine.
pub(super) struct Target {
    pub(super) replica: Replica,
    /// The name it is known by: its temporary path, then (promoted) its final one.
    name: Mutex<PathBuf>,
    state: AtomicU8,
    /// Bytes of the source's data done in the current pass, and in all.
    done: AtomicU64,
    total: AtomicU64,
    error: Mutex<Option<String>>,
    /// Set by `drop`: the copier stops at its next chunk.
    stop: AtomicBool,
    /// The first chunk the copier has not copied yet (written under that chunk's lock).
    copied_upto: AtomicU64,
    /// Chunks the volume wrote after the copier copied them: verified again (module doc).
    dirty: Mutex<BTreeSet<u64>>,
}

impl Target {
    pub(super) fn new(replica: Replica) -> Target {
        Target {
            name: Mutex::new(replica.path.clone()),
            replica,
            state: AtomicU8::new(TargetState::Copying as u8),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            error: Mutex::new(None),
            stop: AtomicBool::new(false),
            copied_upto: AtomicU64::new(0),
            dirty: Mutex::new(BTreeSet::new()),
        }
    }

    /// Marks the chunks `first..=last`, which a volume write holds the locks of, dirty where
    /// the copier has passed them while it fills or verifies.
    fn mark_written(&self, first: u64, last: u64) {
        if !matches!(self.state(), TargetState::Copying | TargetState::Verifying) {
            return;
        }
        let upto = self.copied_upto.load(Ordering::Acquire);
        if first >= upto {
            return;
        }
        let mut dirty = lock(&self.dirty);
        for c in first..=last.min(upto - 1) {
            dirty.insert(c);
        }
    }

    pub(super) fn state(&self) -> TargetState {
        TargetState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub(super) fn name(&self) -> PathBuf {
        lock(&self.name).clone()
    }

    pub(super) fn promoted(&self) -> bool {
        self.state() == TargetState::Promoted
    }

    /// Whether the volume's writes still go to it.
    pub(super) fn written(&self) -> bool {
        self.state() != TargetState::Failed
    }

    fn known_as(&self, path: &Path) -> bool {
        self.replica.path == path || *lock(&self.name) == path
    }

    /// Marks it failed (once); returns whether it was promoted (its fault must then be recorded
    /// under its final name, as a replica's).
    pub(super) fn fail(&self, why: String) -> Option<bool> {
        let mut error = lock(&self.error);
        let before = self.state();
        if before == TargetState::Failed {
            return None;
        }
        self.state
            .store(TargetState::Failed as u8, Ordering::Release);
        self.replica.healthy.store(false, Ordering::Release);
        *error = Some(why);
        Some(before == TargetState::Promoted)
    }

    /// Complete → promoted, known as `name` from now on; Err(its state) when not complete.
    pub(super) fn promote(&self, name: &Path) -> Result<(), TargetState> {
        let _error = lock(&self.error);
        match self.state() {
            TargetState::Complete => {
                *lock(&self.name) = name.to_path_buf();
                self.state
                    .store(TargetState::Promoted as u8, Ordering::Release);
                Ok(())
            }
            TargetState::Promoted if *lock(&self.name) == name => Ok(()),
            other => Err(other),
        }
    }

    /// Moves `from` → `to`; false when it was not in `from` (failed meanwhile).
    fn advance(&self, from: TargetState, to: TargetState) -> bool {
        let _error = lock(&self.error);
        self.state
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// What `targets` on the control socket says of it.
    pub(super) fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.replica.path.display().to_string(),
            "name": self.name().display().to_string(),
            "state": self.state().as_str(),
            "done": self.done.load(Ordering::Acquire),
            "total": self.total.load(Ordering::Acquire),
            "error": lock(&self.error).clone(),
        })
    }
}

/// The engine's targets and the chunk locks that order them against the volume's writes.
#[derive(Default)]
pub(super) struct Targets {
    list: RwLock<Vec<Arc<Target>>>,
    busy: Mutex<BTreeSet<u64>>,
    freed: Condvar,
    /// Targets being copied or verified: while non-zero, writes take the chunk locks.
    filling: AtomicUsize,
    /// Writes (and discards) that took chunk locks: the copier yields to a busy volume.
    writes: AtomicU64,
}

/// Chunk locks held; released when dropped.
pub(super) struct ChunkLock<'a> {
    targets: &'a Targets,
    first: u64,
    last: u64,
}

impl Drop for ChunkLock<'_> {
    fn drop(&mut self) {
        let mut busy = lock(&self.targets.busy);
        for c in self.first..=self.last {
            busy.remove(&c);
        }
        drop(busy);
        self.targets.freed.notify_all();
    }
}

impl Targets {
    /// Every target the volume's writes go to (not failed).
    pub(super) fn written(&self) -> Vec<Arc<Target>> {
        self.list
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|t| t.written())
            .cloned()
            .collect()
    }

    pub(super) fn all(&self) -> Vec<Arc<Target>> {
        self.list.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn find(&self, path: &Path) -> Option<Arc<Target>> {
        self.all().into_iter().find(|t| t.known_as(path))
    }

    /// Adds a target; the caller holds the engine's pause lock exclusively (see the module doc)
    /// and starts its copier.
    pub(super) fn push(&self, target: Arc<Target>) {
        self.filling.fetch_add(1, Ordering::AcqRel);
        self.list
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(target);
    }

    /// Forgets a target (after `drop`; its copier, if running, stops at its next chunk).
    pub(super) fn remove(&self, target: &Arc<Target>) {
        target.stop.store(true, Ordering::Release);
        self.list
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|t| !Arc::ptr_eq(t, target));
    }

    /// The locks of the chunks of `[offset, offset + len)`, when a target is being filled; the
    /// caller holds the engine's pause lock shared.
    pub(super) fn lock_range(&self, offset: u64, len: u64) -> Option<ChunkLock<'_>> {
        if len == 0 || self.filling.load(Ordering::Acquire) == 0 {
            return None;
        }
        let first = offset / CHUNK;
        let last = (offset.saturating_add(len) - 1) / CHUNK;
        self.writes.fetch_add(1, Ordering::Relaxed);
        let locked = self.lock_chunks(first, last);
        for t in self.all() {
            t.mark_written(first, last);
        }
        Some(locked)
    }

    fn lock_chunks(&self, first: u64, last: u64) -> ChunkLock<'_> {
        let mut busy = lock(&self.busy);
        while busy.range(first..=last).next().is_some() {
            busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        for c in first..=last {
            busy.insert(c);
        }
        ChunkLock {
            targets: self,
            first,
            last,
        }
    }
}

/// Fills `target` from the healthy ones of `sources` (a volume of `size` bytes), verifies it and
/// marks it complete, or failed with why. Runs in its own thread; `filling` is decremented
/// whatever the outcome.
pub(super) fn fill(
    sources: Arc<Vec<Replica>>,
    targets: Arc<Targets>,
    target: Arc<Target>,
    size: u64,
) {
    let mut took = Stages::default();
    let outcome = fill_and_verify(&sources, &targets, &target, size, &mut took);
    match outcome {
        Ok(()) => {
            if target.advance(TargetState::Verifying, TargetState::Complete) {
                let io = &took.io;
                eprintln!(
                    "bicsi mirror: target {} copied and verified identical (copy {} ms, fsync {} \
                     ms, verification of {} written chunks {} ms; bytes: source read {}, target \
                     read {}, written {}, read back {}, punched {}, equal without a read {}, \
                     the same base in both {})",
                    target.replica.path.display(),
                    took.copy.as_millis(),
                    took.fsync.as_millis(),
                    took.dirty,
                    took.verify.as_millis(),
                    io.source_read,
                    io.target_read,
                    io.written,
                    io.read_back,
                    io.punched,
                    io.hole_equal,
                    took.base_equal,
                );
            }
        }
        Err(why) => {
            if target.fail(why.clone()).is_some() {
                eprintln!(
                    "bicsi mirror: rebuild of {} failed: {why}",
                    target.replica.path.display()
                );
            }
        }
    }
    targets.filling.fetch_sub(1, Ordering::AcqRel);
}

/// How long each stage of a fill took, and the bytes it moved (the engine's log says both when
/// the target is complete: the bytes do not depend on the machine's load, the times do).
#[derive(Default)]
struct Stages {
    copy: Duration,
    fsync: Duration,
    verify: Duration,
    dirty: usize,
    io: Io,
    /// Source data skipped as the same base in both (copy-on-write source and target).
    base_equal: u64,
}

/// Bytes a fill read, wrote and punched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Io {
    /// Read from the source.
    source_read: u64,
    /// Read from the target to compare with the source (only where the target has data).
    target_read: u64,
    /// Written into the target.
    written: u64,
    /// Read back from the target after writing it (the per-chunk verification).
    read_back: u64,
    /// Punched in the target where the source has a hole.
    punched: u64,
    /// Source data found equal to a hole of the target (zeros) without reading the target.
    hole_equal: u64,
}

/// Bytes written into a target between two background `fdatasync`s: the final fsync then
/// waits only for the last window instead of the whole copy.
const FLUSH_WINDOW: u64 = 32 << 20;

fn fill_and_verify(
    sources: &[Replica],
    targets: &Targets,
    target: &Target,
    size: u64,
    took: &mut Stages,
) -> Result<(), String> {
    let started = Instant::now();
    let source = || {
        sources
            .iter()
            .find(|r| r.healthy.load(Ordering::Acquire))
            .ok_or_else(|| "no healthy replica to copy from".to_string())
    };
    let total: u64 = source()?
        .data_extents(0, size)
        .map_err(|e| format!("finding the data of the source: {e}"))?
        .iter()
        .map(|e| e.len)
        .sum();
    target.total.store(total, Ordering::Release);
    let mut copier = ChunkCopier::new();
    // The copy, each chunk verified as it is copied; the target's writeback runs behind it.
    target.done.store(0, Ordering::Release);
    let chunks = size.div_ceil(CHUNK);
    std::thread::scope(|scope| -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let flusher = scope.spawn(move || -> Result<(), String> {
            for () in rx {
                target
                    .replica
                    .sync()
                    .map_err(|e| format!("fsync of the copy: {e}"))?;
            }
            Ok(())
        });
        let mut tx = Some(tx);
        let mut unflushed = 0u64;
        let mut writes_then = targets.writes.load(Ordering::Relaxed);
        let copied = (0..chunks).try_for_each(|chunk| {
            let written = copier.io.written + copier.io.punched;
            let data = step(targets, target, chunk, |_| {
                let src = source()?;
                let (offset, end) = (chunk * CHUNK, ((chunk + 1) * CHUNK).min(size));
                let data = copier.copy(src, &target.replica, offset, end)?;
                // Under the chunk's lock: a write from now on is marked dirty.
                target.copied_upto.store(chunk + 1, Ordering::Release);
                Ok(data)
            })?;
            target.done.fetch_add(data, Ordering::AcqRel);
            unflushed += copier.io.written + copier.io.punched - written;
            if unflushed >= FLUSH_WINDOW {
                unflushed = 0;
                // Only while the volume is quiet: an fdatasync under the volume's own writes
                // (which reach the target too) slows them, and the volume's I/O comes first.
                // A busy flusher (the queue full) is skipped: the next window catches up. A
                // closed one failed, which its join reports.
                let writes_now = targets.writes.load(Ordering::Relaxed);
                let quiet = std::mem::replace(&mut writes_then, writes_now) == writes_now;
                if quiet
                    && let Some(t) = &tx
                    && let Err(std::sync::mpsc::TrySendError::Disconnected(())) = t.try_send(())
                {
                    tx = None;
                }
            }
            Ok::<(), String>(())
        });
        drop(tx);
        let flushed = flusher
            .join()
            .unwrap_or_else(|_| Err("the writeback thread panicked".into()));
        copied?;
        flushed
    })?;
    took.copy = started.elapsed();
    let started = Instant::now();
    target
        .replica
        .sync()
        .map_err(|e| format!("fsync of the copy: {e}"))?;
    took.fsync = started.elapsed();
    let started = Instant::now();
    if !target.advance(TargetState::Copying, TargetState::Verifying) {
        return Err(lock(&target.error).clone().unwrap_or_default());
    }
    // The chunks written after their copy, again (the module doc says why only these), in
    // order, once each, as a pass over the whole volume would: writes go on meanwhile, and one
    // to a chunk still ahead marks it for this pass, one behind it is past, as it would be.
    target.done.store(0, Ordering::Release);
    took.dirty = lock(&target.dirty).len();
    let to_verify = took.dirty.max(1) as u64;
    let mut verified = 0u64;
    let mut next = 0u64;
    loop {
        let Some(chunk) = lock(&target.dirty).range(next..).next().copied() else {
            break;
        };
        next = chunk + 1;
        step(targets, target, chunk, |_| {
            let src = source()?;
            let (offset, end) = (chunk * CHUNK, ((chunk + 1) * CHUNK).min(size));
            copier.compare(src, &target.replica, offset, end)
        })?;
        verified += 1;
        target.done.store(
            total.saturating_mul(verified.min(to_verify)) / to_verify,
            Ordering::Release,
        );
    }
    target.done.store(total, Ordering::Release);
    took.verify = started.elapsed();
    took.io = copier.io;
    took.base_equal = copier.base_equal;
    Ok(())
}

/// One chunk of the copy or the verification: checks that the target is still wanted, runs
/// `work` under the chunk's lock, and paces the copier when the volume wrote meanwhile.
fn step<T>(
    targets: &Targets,
    target: &Target,
    chunk: u64,
    work: impl FnOnce(u64) -> Result<T, String>,
) -> Result<T, String> {
    if target.stop.load(Ordering::Acquire) {
        return Err("dropped by the node agent".into());
    }
    if !target.written() {
        // A write to it failed: its error is already recorded.
        return Err(lock(&target.error).clone().unwrap_or_default());
    }
    let started = Instant::now();
    let writes = targets.writes.load(Ordering::Relaxed);
    let out = {
        let _locked = targets.lock_chunks(chunk, chunk);
        work(chunk)?
    };
    if targets.writes.load(Ordering::Relaxed) != writes {
        pace(started.elapsed());
    }
    Ok(out)
}

fn pace(took: Duration) {
    let rest = took * PACE;
    if rest.is_zero() {
        std::thread::yield_now();
    } else {
        std::thread::sleep(rest);
    }
}

/// The pieces of `[offset, end)` cut by `extents`: (start, end, inside an extent).
fn segments(extents: &[crate::sync::Extent], offset: u64, end: u64) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut pos = offset;
    for e in extents {
        let (s, t) = (e.offset.max(pos), e.end().min(end));
        if s >= t {
            continue;
        }
        if s > pos {
            out.push((pos, s, false));
        }
        out.push((s, t, true));
        pos = t;
    }
    if pos < end {
        out.push((pos, end, false));
    }
    out
}

/// The data extents of `r` within `[offset, end)`; outside them it reads as zeros.
fn extents(r: &Replica, offset: u64, end: u64) -> Result<Vec<crate::sync::Extent>, String> {
    r.data_extents(offset, end)
        .map_err(|e| format!("finding the data of {} at {offset}: {e}", r.path.display()))
}

/// The runs of `[offset, end)` that read the same bytes in `src` and `dst` without either
/// being read: both are copy-on-write replicas over the same base (`cow::Cow::same_base`) and
/// the clusters are clear in both, so both read the base there (or zeros). Empty for every
/// other pair. The caller holds the chunk's lock, so no write sets a bit meanwhile.
fn shared_base(src: &Replica, dst: &Replica, offset: u64, end: u64) -> Vec<(u64, u64)> {
    let (super::Backend::Cow(a), super::Backend::Cow(b)) = (&src.backend, &dst.backend) else {
        return Vec::new();
    };
    if !a.same_base(b) {
        return Vec::new();
    }
    let (mine, theirs) = (a.clear_runs(offset, end), b.clear_runs(offset, end));
    let mut out = Vec::new();
    for &(s, t) in &mine {
        for &(u, v) in &theirs {
            let (x, y) = (s.max(u), t.min(v));
            if x < y {
                out.push((x, y));
            }
        }
    }
    out
}

/// `segments` cut further at the target's cluster edges when it is a copy-on-write replica, so
/// each cluster is compared, and written when it differs, on its own: a cluster equal to the
/// target's base stays clear (no space taken) beside one that differs. Other targets keep the
/// segments as they are.
fn pieces(dst: &Replica, segments: Vec<(u64, u64, bool)>) -> Vec<(u64, u64, bool)> {
    let super::Backend::Cow(c) = &dst.backend else {
        return segments;
    };
    let k = c.cluster();
    let mut out = Vec::new();
    for (s, t, data) in segments {
        let mut pos = s;
        while pos < t {
            let next = ((pos / k + 1) * k).min(t);
            out.push((pos, next, data));
            pos = next;
        }
    }
    out
}

/// `[s, t)` cut by the sorted, disjoint `runs`: (start, end, inside a run).
fn cut(runs: &[(u64, u64)], s: u64, t: u64) -> Vec<(u64, u64, bool)> {
    let extents: Vec<crate::sync::Extent> = runs
        .iter()
        .map(|&(offset, end)| crate::sync::Extent {
            offset,
            len: end - offset,
        })
        .collect();
    segments(&extents, s, t)
}

/// Copies and compares chunks of a source into a target (two chunk buffers and a chunk of
/// zeros), counting what it reads and writes. Each replica backend is reached through the
/// same few `Replica` methods (extents, read, write, discard): a target of any kind fits.
struct ChunkCopier {
    a: Vec<u8>,
    b: Vec<u8>,
    zeros: Vec<u8>,
    io: Io,
    /// Source data equal to the target's without a read of either: clusters clear in both
    /// copy-on-write replicas over the same base ([`shared_base`]).
    base_equal: u64,
}

impl ChunkCopier {
    fn new() -> ChunkCopier {
        ChunkCopier {
            a: vec![0u8; CHUNK as usize],
            b: vec![0u8; CHUNK as usize],
            zeros: vec![0u8; CHUNK as usize],
            io: Io::default(),
            base_equal: 0,
        }
    }

    /// Makes the target's `[offset, end)` equal to the source's and verifies it, writing only
    /// what differs (so blocks a backing clone shares stay shared). The source is read only
    /// where it has data; the target only where both have data. Source data over a hole of the
    /// target is equal when it is zeros (a hole reads as zeros) and written otherwise; target
    /// data where the source has a hole is punched. What it wrote or punched it reads back and
    /// compares (Err naming the offset when that differs). Returns the source's data bytes in
    /// the range.
    fn copy(&mut self, src: &Replica, dst: &Replica, offset: u64, end: u64) -> Result<u64, String> {
        let theirs = extents(dst, offset, end)?;
        let shared = shared_base(src, dst, offset, end);
        let mut data = 0;
        for (s, t, is_data) in segments(&extents(src, offset, end)?, offset, end) {
            if !is_data {
                if segments(&theirs, s, t).iter().any(|p| p.2) {
                    self.punch(src, dst, s, t)?;
                }
                continue;
            }
            data += t - s;
            for (s, t, same) in cut(&shared, s, t) {
                if same {
                    self.base_equal += t - s;
                } else {
                    self.copy_data(src, dst, &theirs, s, t)?;
                }
            }
        }
        Ok(data)
    }

    /// [`ChunkCopier::copy`] of `[s, t)`, where the source has data (`theirs`: the target's
    /// data extents).
    fn copy_data(
        &mut self,
        src: &Replica,
        dst: &Replica,
        theirs: &[crate::sync::Extent],
        s: u64,
        t: u64,
    ) -> Result<(), String> {
        {
            let len = (t - s) as usize;
            src.read_at(&mut self.a[..len], s)
                .map_err(|e| format!("reading {} at {s}: {e}", src.path.display()))?;
            self.io.source_read += t - s;
            for (u, v, target_data) in pieces(dst, segments(theirs, s, t)) {
                let (i, j) = ((u - s) as usize, (v - s) as usize);
                if target_data {
                    dst.read_at(&mut self.b[..j - i], u)
                        .map_err(|e| format!("reading the target at {u}: {e}"))?;
                    self.io.target_read += v - u;
                    if self.a[i..j] == self.b[..j - i] {
                        continue;
                    }
                } else if self.a[i..j] == self.zeros[..j - i] {
                    self.io.hole_equal += v - u;
                    continue;
                }
                dst.write_at(&self.a[i..j], u)
                    .map_err(|e| format!("writing the target at {u}: {e}"))?;
                self.io.written += v - u;
                dst.read_at(&mut self.b[..j - i], u)
                    .map_err(|e| format!("reading the target back at {u}: {e}"))?;
                self.io.read_back += v - u;
                check_same(src, &self.a[i..j], &self.b[..j - i], u)?;
            }
        }
        Ok(())
    }

    /// Punches the target's `[s, t)` (a hole of the source) and checks it reads as zeros.
    fn punch(&mut self, src: &Replica, dst: &Replica, s: u64, t: u64) -> Result<(), String> {
        dst.discard(s, t - s)
            .map_err(|e| format!("punching the target at {s}: {e}"))?;
        self.io.punched += t - s;
        // A punch may leave data at unaligned edges (zeroed): it must read as zeros.
        if !extents(dst, s, t)?.is_empty() {
            let len = (t - s) as usize;
            dst.read_at(&mut self.b[..len], s)
                .map_err(|e| format!("reading the target back at {s}: {e}"))?;
            self.io.read_back += t - s;
            check_same(src, &self.zeros[..len], &self.b[..len], s)?;
        }
        Ok(())
    }

    /// Compares the target's `[offset, end)` with the source's: Err naming the first offset
    /// that differs. Where neither has data both read as zeros and nothing is read. Returns the
    /// source's data bytes in the range.
    fn compare(
        &mut self,
        src: &Replica,
        dst: &Replica,
        offset: u64,
        end: u64,
    ) -> Result<u64, String> {
        let theirs = extents(dst, offset, end)?;
        let shared = shared_base(src, dst, offset, end);
        let mut data = 0;
        for (s, t, is_data) in segments(&extents(src, offset, end)?, offset, end) {
            if is_data {
                data += t - s;
            }
            for (s, t, same) in cut(&shared, s, t) {
                if is_data && same {
                    self.base_equal += t - s;
                } else {
                    self.compare_part(src, dst, &theirs, s, t, is_data)?;
                }
            }
        }
        Ok(data)
    }

    /// [`ChunkCopier::compare`] of `[s, t)`, where the source has data or not (`is_data`).
    fn compare_part(
        &mut self,
        src: &Replica,
        dst: &Replica,
        theirs: &[crate::sync::Extent],
        s: u64,
        t: u64,
        is_data: bool,
    ) -> Result<(), String> {
        {
            let len = (t - s) as usize;
            if is_data {
                src.read_at(&mut self.a[..len], s)
                    .map_err(|e| format!("reading {} at {s}: {e}", src.path.display()))?;
                self.io.source_read += t - s;
            } else if segments(theirs, s, t).iter().any(|p| p.2) {
                self.a[..len].fill(0);
            } else {
                return Ok(());
            }
            dst.read_at(&mut self.b[..len], s)
                .map_err(|e| format!("reading the target at {s}: {e}"))?;
            self.io.target_read += t - s;
            check_same(src, &self.a[..len], &self.b[..len], s)
        }
    }
}

/// Err naming the first byte where the target (`b`, from `s`) differs from the source (`a`).
fn check_same(src: &Replica, a: &[u8], b: &[u8], s: u64) -> Result<(), String> {
    // memcmp first; the byte-by-byte search only names the offset of a difference.
    if a == b {
        return Ok(());
    }
    let i = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0);
    Err(format!(
        "the verification found the target different from {} at byte {}",
        src.path.display(),
        s + i as u64
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Fills `dst` from `src` while a writer thread writes `write(n)` (offset, bytes) for
    /// n = 0, 1, … to the source and every written target under the range's lock, as the
    /// volume's writes do, until the fill ends.
    fn fill_while_writing(
        src: Replica,
        dst: Replica,
        size: u64,
        write: impl Fn(u64) -> (u64, Vec<u8>) + Sync,
    ) -> (Arc<Vec<Replica>>, Arc<Targets>, Arc<Target>) {
        let sources = Arc::new(vec![src]);
        let targets = Arc::new(Targets::default());
        let target = Arc::new(Target::new(dst));
        targets.push(target.clone());
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let (sources2, targets2, target2) = (sources.clone(), targets.clone(), target.clone());
            let copier = s.spawn(move || fill(sources2, targets2, target2, size));
            s.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let (off, bytes) = write(n);
                    let _l = targets.lock_range(off, bytes.len() as u64);
                    sources[0].write_at(&bytes, off).unwrap();
                    for t in targets.written() {
                        t.replica.write_at(&bytes, off).unwrap();
                    }
                    n += 1;
                }
            });
            copier.join().unwrap();
            stop.store(true, Ordering::Release);
        });
        (sources, targets, target)
    }

    fn replica(path: &Path, size: u64) -> Replica {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        file.set_len(size).unwrap();
        drop(file);
        Replica::open(path, false).unwrap().0
    }

    /// A write into the chunk the copier holds waits for it, and lands after the copy: the
    /// target ends with the newer bytes, never the copy's older ones.
    #[test]
    fn a_write_racing_the_copy_of_its_chunk_waits_and_wins() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 * CHUNK;
        let src = replica(&dir.path().join("src"), size);
        src.file()
            .write_all_at(&[b'o'; 4096], CHUNK + 8192)
            .unwrap();
        let dst = replica(&dir.path().join("dst"), size);
        let targets = Targets::default();
        targets.filling.fetch_add(1, Ordering::AcqRel);
        let mut a = vec![0u8; CHUNK as usize];
        let copier_holds = targets.lock_chunks(1, 1);
        // The copier read the old bytes under its lock ...
        src.read_at(&mut a[..4096], CHUNK + 8192).unwrap();
        let order = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            let writer = s.spawn(|| {
                // ... and a volume write to the same chunk comes in: it must wait.
                let _l = targets
                    .lock_range(CHUNK + 8192, 4096)
                    .expect("locks while filling");
                order.lock().unwrap().push("write");
                src.write_at(&[b'n'; 4096], CHUNK + 8192).unwrap();
                dst.write_at(&[b'n'; 4096], CHUNK + 8192).unwrap();
            });
            std::thread::sleep(Duration::from_millis(100));
            assert!(
                !writer.is_finished(),
                "the write did not wait for the chunk"
            );
            dst.write_at(&a[..4096], CHUNK + 8192).unwrap();
            order.lock().unwrap().push("copy");
            drop(copier_holds);
            writer.join().unwrap();
        });
        assert_eq!(*order.lock().unwrap(), ["copy", "write"]);
        let mut got = [0u8; 4096];
        dst.read_at(&mut got, CHUNK + 8192).unwrap();
        assert_eq!(
            got, [b'n'; 4096],
            "the copy's old bytes landed over the write"
        );
        // A write to another chunk never waits for the copier.
        let _held = targets.lock_chunks(1, 1);
        let other = targets.lock_range(3 * CHUNK, 4096);
        assert!(other.is_some());
        drop(other);
        // With nothing being filled, writes take no lock at all.
        targets.filling.fetch_sub(1, Ordering::AcqRel);
        assert!(targets.lock_range(CHUNK, 4096).is_none());
    }

    /// Writes hammer the volume while the copier fills and verifies the target: the target
    /// ends identical to the source, and a write that spans two chunks takes both.
    #[test]
    fn writes_during_the_fill_end_identical_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * CHUNK;
        let src = replica(&dir.path().join("src"), size);
        for i in 0..size / 65536 {
            if i % 3 != 0 {
                src.file()
                    .write_all_at(&[(i % 251) as u8 + 1; 65536], i * 65536)
                    .unwrap();
            }
        }
        let dst = replica(&dir.path().join("dst"), size);
        // The target starts with bytes where the source has holes: they must be punched.
        dst.file().write_all_at(&[7u8; 65536], 0).unwrap();
        // Straddles chunk boundaries on purpose.
        let (sources, targets, target) = fill_while_writing(src, dst, size, |n| {
            (
                (n * 300_007) % (size - 200_000),
                vec![(n % 200) as u8 + 3; 131_072],
            )
        });
        assert_eq!(target.state(), TargetState::Complete, "{}", target.status());
        let (x, y) = (
            std::fs::read(&sources[0].path).unwrap(),
            std::fs::read(&target.replica.path).unwrap(),
        );
        assert!(x == y, "target differs from its source");
        assert_eq!(targets.filling.load(Ordering::Acquire), 0);
    }

    /// A volume write that reached the source and not the target, after the copier had copied
    /// (and verified) its chunk, is what the verification pass is there for: the chunk was
    /// marked dirty by the write's locks, so the pass compares it again and the rebuild fails.
    /// A write to a chunk the copier has not reached is not marked (the copy takes its bytes).
    #[test]
    fn a_write_that_missed_the_target_after_its_copy_fails_the_verification() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 * CHUNK;
        let src = replica(&dir.path().join("src"), size);
        src.file().write_all_at(&[5u8; 8192], 0).unwrap();
        src.file().write_all_at(&[6u8; 8192], 3 * CHUNK).unwrap();
        let dst = replica(&dir.path().join("dst"), size);
        let sources = Arc::new(vec![src]);
        let targets = Arc::new(Targets::default());
        let target = Arc::new(Target::new(dst));
        targets.push(target.clone());
        // Hold chunk 2 as a long write would: the copier stops there after chunks 0 and 1.
        let held = targets.lock_chunks(2, 2);
        let copier = {
            let (sources, targets, target) = (sources.clone(), targets.clone(), target.clone());
            std::thread::spawn(move || fill(sources, targets, target, size))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while target.copied_upto.load(Ordering::Acquire) < 2 {
            assert!(
                Instant::now() < deadline,
                "the copier never reached chunk 2"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        {
            // Behind the copier: the bad write (source only) is marked.
            let _l = targets.lock_range(100, 10).expect("locks while filling");
            sources[0].write_at(&[9u8; 10], 100).unwrap();
        }
        {
            // Ahead of it: not marked, and written to both as the engine does.
            let _l = targets.lock_range(3 * CHUNK + 50, 10).expect("locks");
            sources[0].write_at(&[8u8; 10], 3 * CHUNK + 50).unwrap();
            target.replica.write_at(&[8u8; 10], 3 * CHUNK + 50).unwrap();
        }
        assert_eq!(*lock(&target.dirty), BTreeSet::from([0]));
        drop(held);
        copier.join().unwrap();
        assert_eq!(target.state(), TargetState::Failed);
        let error = lock(&target.error).clone().unwrap_or_default();
        assert!(error.contains("at byte 100"), "{error}");
    }

    /// A target that differs where nothing was written through the engine fails the
    /// verification (the check is real): here the copier is cheated by a write to the target
    /// behind the locks' back, after its chunk was copied.
    #[test]
    fn the_verification_catches_a_target_that_differs() {
        let dir = tempfile::tempdir().unwrap();
        let size = 2 * CHUNK;
        let src = replica(&dir.path().join("src"), size);
        src.file().write_all_at(&[1u8; 8192], 0).unwrap();
        let dst = replica(&dir.path().join("dst"), size);
        let mut copier = ChunkCopier::new();
        copier.copy(&src, &dst, 0, CHUNK).unwrap();
        copier.compare(&src, &dst, 0, CHUNK).unwrap();
        dst.file().write_all_at(&[9u8; 10], 100).unwrap();
        let e = copier.compare(&src, &dst, 0, CHUNK).unwrap_err();
        assert!(e.contains("at byte 100"), "{e}");
        // Data in the target where the source has a hole is a difference too.
        dst.file().write_all_at(&[9u8; 10], CHUNK + 5).unwrap();
        let e = copier.compare(&src, &dst, CHUNK, size).unwrap_err();
        assert!(e.contains(&format!("at byte {}", CHUNK + 5)), "{e}");
    }

    /// The copy reads the source only where it has data and the target only where both have
    /// data, writes only what differs (and not zeros over a hole of the target), punches the
    /// target's data where the source has a hole, and the result is identical: the bytes it
    /// moved are counted exactly. (The first version read the whole of both and wrote every
    /// byte that differed, zeros over holes included.)
    #[test]
    fn the_copy_reads_and_writes_only_what_it_must() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 * CHUNK;
        let src = replica(&dir.path().join("src"), size);
        let dst = replica(&dir.path().join("dst"), size);
        let k = 65536u64;
        // Chunk 0: the same data in both (a clone's shared block): read from both, not written.
        src.file().write_all_at(&[1u8; 65536], 0).unwrap();
        dst.file().write_all_at(&[1u8; 65536], 0).unwrap();
        // Chunk 0: different data in both: read from both, written, read back.
        src.file().write_all_at(&[2u8; 65536], 4 * k).unwrap();
        dst.file().write_all_at(&[3u8; 65536], 4 * k).unwrap();
        // Chunk 1: data over a hole of the target: the target is not read; written.
        src.file().write_all_at(&[4u8; 65536], CHUNK).unwrap();
        // Chunk 1: zeros written as data in the source over a hole of the target: equal.
        src.file()
            .write_all_at(&[0u8; 65536], CHUNK + 8 * k)
            .unwrap();
        // Chunk 2: data in the target only: punched.
        dst.file().write_all_at(&[5u8; 65536], 2 * CHUNK).unwrap();
        // Chunk 3: a hole in both: nothing at all.
        let mut copier = ChunkCopier::new();
        let mut data = 0;
        for c in 0..4 {
            data += copier.copy(&src, &dst, c * CHUNK, (c + 1) * CHUNK).unwrap();
        }
        assert_eq!(data, 4 * k);
        assert_eq!(
            copier.io,
            Io {
                source_read: 4 * k,
                target_read: 2 * k,
                written: 2 * k,
                read_back: 2 * k,
                punched: CHUNK,
                hole_equal: k,
            }
        );
        let (x, y) = (
            std::fs::read(&src.path).unwrap(),
            std::fs::read(&dst.path).unwrap(),
        );
        assert!(x == y, "target differs from its source");
        assert!(
            extents(&dst, 2 * CHUNK, size).unwrap().is_empty(),
            "the source's holes are holes of the target"
        );
        for c in 0..4 {
            copier
                .compare(&src, &dst, c * CHUNK, (c + 1) * CHUNK)
                .unwrap();
        }
    }
    /// A copy-on-write replica over `base` (None: without one) in `dir`, opened as the engine
    /// opens one.
    fn cow_replica(dir: &Path, name: &str, base: Option<&Path>, size: u64) -> Replica {
        let spec = super::super::cow::CowSpec {
            data: dir.join(format!("{name}.cow")),
            map: dir.join(format!("{name}.cowmap")),
            base: base.map(Path::to_path_buf),
        };
        super::super::cow::create(&spec, size, 65536).unwrap();
        Replica::open_cow(&spec, false).unwrap().0
    }

    fn cow_of(r: &Replica) -> &super::super::cow::Cow {
        match &r.backend {
            super::super::Backend::Cow(c) => c,
            _ => panic!("not a copy-on-write replica"),
        }
    }

    fn view(r: &Replica, size: u64) -> Vec<u8> {
        let mut buf = vec![0u8; size as usize];
        r.read_at(&mut buf, 0).unwrap();
        buf
    }

    /// The same backing image expanded on two disks: `<disk>/backing-images/img-1/backing.raw`,
    /// 3 MiB of non-zero bytes but for a hole at 1 MiB.
    fn two_bases(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let mut bases = Vec::new();
        for disk in ["d1", "d2"] {
            let d = dir.join(disk).join("backing-images/img-1");
            std::fs::create_dir_all(&d).unwrap();
            let f = std::fs::File::create(d.join("backing.raw")).unwrap();
            for k in 0..48u64 {
                if !(16..20).contains(&k) {
                    f.write_all_at(&[(k % 200) as u8 + 1; 65536], k * 65536)
                        .unwrap();
                }
            }
            f.set_len(3 * CHUNK).unwrap();
            bases.push(d.join("backing.raw"));
        }
        (bases.remove(0), bases.remove(0))
    }

    /// The copy into a copy-on-write target over its own disk's base writes only the clusters
    /// where the source's view differs from that base: clusters clear in both (the base in
    /// both) are neither read nor written, a cluster the volume wrote with the base's own
    /// bytes is read and found equal, and the target ends with exactly the differing clusters
    /// set, its view the source's. Without the skip, the source's base bytes were read too.
    #[test]
    fn the_copy_into_a_cow_target_writes_only_the_clusters_that_differ_from_its_base() {
        let dir = tempfile::tempdir().unwrap();
        let size = 6 * CHUNK;
        let k = 65536u64;
        let (base1, base2) = two_bases(dir.path());
        std::fs::create_dir_all(dir.path().join("d1/r")).unwrap();
        std::fs::create_dir_all(dir.path().join("d2/r")).unwrap();
        let src = cow_replica(&dir.path().join("d1/r"), "volume", Some(&base1), size);
        // Cluster 0: new bytes over the base (differs). Cluster 2: the base's own bytes
        // (set in the source, equal to the target's base). Cluster 5: a partial write (the
        // rest of the cluster from the base). Cluster 10: discarded (zeros over base bytes).
        // Cluster 70 (past the base): new bytes.
        src.write_at(&[0xaa; 65536], 0).unwrap();
        let mut own = vec![0u8; 65536];
        std::fs::File::open(&base1)
            .unwrap()
            .read_exact_at(&mut own, 2 * k)
            .unwrap();
        src.write_at(&own, 2 * k).unwrap();
        src.write_at(&[0xdd; 65536], 3 * k).unwrap();
        src.write_at(&[0xbb; 4096], 5 * k + 8192).unwrap();
        src.discard(10 * k, k).unwrap();
        src.write_at(&[0xcc; 65536], 70 * k).unwrap();
        let dst = cow_replica(
            &dir.path().join("d2/r"),
            "volume.online",
            Some(&base2),
            size,
        );
        assert!(cow_of(&src).same_base(cow_of(&dst)));
        let mut copier = ChunkCopier::new();
        for c in 0..size / CHUNK {
            copier.copy(&src, &dst, c * CHUNK, (c + 1) * CHUNK).unwrap();
        }
        assert!(view(&src, size) == view(&dst, size), "views differ");
        // Set in the target: 0, 3, 5, 10 and 70; not 2 (equal to its base), although the
        // source's 2 and 3 are one run of data.
        assert_eq!(cow_of(&dst).clusters_in_data(), 5);
        assert_eq!(cow_of(&dst).clear_runs(2 * k, 3 * k), vec![(2 * k, 3 * k)]);
        // Read from the source: only its set clusters with data (0, 2, 3, 5, 70; 10 is a
        // hole).
        assert_eq!(copier.io.source_read, 5 * k);
        // The base's data under clusters clear in both: 48 - 4 (its hole) - 5 (set in the
        // source) clusters, neither read nor written.
        assert_eq!(copier.base_equal, (48 - 4 - 5) * k);
        // Written cluster by cluster: 0, 3, 5 (the whole cluster: it differs) and 70; 10 is
        // punched, 2 found equal.
        assert_eq!(copier.io.written, 4 * k);
        assert_eq!(copier.io.punched, k);
        for c in 0..size / CHUNK {
            copier
                .compare(&src, &dst, c * CHUNK, (c + 1) * CHUNK)
                .unwrap();
        }
        // The target's map on disk says the same after its flush: a second open reads the view.
        dst.sync().unwrap();
        let spec = super::super::cow::CowSpec {
            data: dir.path().join("d2/r/volume.online.cow"),
            map: dir.path().join("d2/r/volume.online.cowmap"),
            base: Some(base2.clone()),
        };
        let again = Replica::open_cow(&spec, true).unwrap().0;
        assert!(
            view(&src, size) == view(&again, size),
            "reopened view differs"
        );

        // Over bases that are not known to be the same image, nothing is skipped, and the
        // result is the same view.
        let other = dir.path().join("d2/backing-images/img-2");
        std::fs::create_dir_all(&other).unwrap();
        let copied = std::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(&base2)
            .arg(other.join("backing.raw"))
            .status()
            .unwrap();
        assert!(copied.success());
        let dst2 = cow_replica(
            &dir.path().join("d2/r"),
            "other",
            Some(&other.join("backing.raw")),
            size,
        );
        assert!(!cow_of(&src).same_base(cow_of(&dst2)));
        let mut copier = ChunkCopier::new();
        for c in 0..size / CHUNK {
            copier
                .copy(&src, &dst2, c * CHUNK, (c + 1) * CHUNK)
                .unwrap();
        }
        assert_eq!(copier.base_equal, 0);
        assert!(view(&src, size) == view(&dst2, size), "views differ");
        assert_eq!(cow_of(&dst2).clusters_in_data(), 5);
    }

    /// The whole fill into a copy-on-write target while writes (partial clusters included) go
    /// to the source and, through its layer, to the target: the target ends complete, its view
    /// the source's.
    #[test]
    fn writes_during_the_fill_of_a_cow_target_end_identical_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let size = 6 * CHUNK;
        let (base1, base2) = two_bases(dir.path());
        std::fs::create_dir_all(dir.path().join("d1/r")).unwrap();
        std::fs::create_dir_all(dir.path().join("d2/r")).unwrap();
        let src = cow_replica(&dir.path().join("d1/r"), "volume", Some(&base1), size);
        for i in 0..size / 65536 {
            if i % 4 == 1 {
                src.write_at(&[(i % 251) as u8 + 1; 30000], i * 65536 + 1000)
                    .unwrap();
            }
        }
        let dst = cow_replica(
            &dir.path().join("d2/r"),
            "volume.online",
            Some(&base2),
            size,
        );
        let (sources, _, target) = fill_while_writing(src, dst, size, |n| {
            (
                (n * 300_007) % (size - 100_000),
                vec![(n % 200) as u8 + 3; 5000 + (n % 7) as usize * 9000],
            )
        });
        assert_eq!(target.state(), TargetState::Complete, "{}", target.status());
        assert!(
            view(&sources[0], size) == view(&target.replica, size),
            "target differs from its source"
        );
    }
}
