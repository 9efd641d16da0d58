//! A copy-on-write replica for disks whose filesystem does not share blocks (ext4; issue 14's
//! "simpler sparse-file layout"): the mirror engine serves it as one of its replica backends.
//! It owns the layout's two files and its reads of the shared base; it knows nothing of FUSE,
//! of the other replicas or of the volume's records, and it never writes the base.
//!
//! # Layout
//! - the **base**: the backing image expanded once per disk to a sparse raw file (the same
//!   expansion as the reflink path's `backing.raw`), read only and shared by every replica on
//!   the disk; a volume without a backing image has none;
//! - the replica's **data**: a sparse raw file of the volume's size;
//! - the replica's **map**: a [`HEADER`]-byte header (magic, version, cluster size, volume size,
//!   the base's length) followed by one bit per cluster ("this cluster is in `data`"), in
//!   4 KiB pages. A cluster whose bit is clear reads from the base, or as zeros past the base's
//!   end or with no base.
//!
//! Why this and not qcow2: the cluster lookup is an in-memory bit test (no L1/L2 tables, no
//! refcounts, no allocation in the map: the data file's offsets ARE the volume's offsets, so
//! the filesystem allocates), a write to a cluster already in `data` is one `pwrite` with no
//! metadata of ours at all, and many requests are served in parallel. What it costs: a
//! replica is never smaller than what its guest wrote, rounded up to clusters (the first write
//! to a cluster copies the cluster), and the base must stay in place while a replica uses it
//! (unlike a reflink clone).
//!
//! # Writes, discards, zeroings
//! - a write to a cluster whose bit is set goes straight to `data`;
//! - a write to a clear cluster writes the whole cluster (the base's bytes merged with the new
//!   ones; just the new ones when the write covers it) into `data`, THEN sets the bit;
//! - a discard or zeroing of a whole cluster that has base bytes under it punches (discard) or
//!   zero-fills (zeroing) the cluster in `data` and sets the bit, so the base never shows
//!   through; of a whole cluster past the base's end (or with no base) it punches the cluster
//!   and clears the bit; a part of a cluster is punched in `data` when its bit is set, filled
//!   from the base and zeroed when it is clear over base bytes, and left alone when it is clear
//!   with no base bytes under it (it reads as zeros already).
//!
//! # Concurrency
//! The FUSE threads call in parallel. A cluster's fill (read the base, write the merged
//! cluster, set the bit) must not race another request on the same cluster, or the fill could
//! write the base's bytes over bytes a concurrent write just put there. So every request that
//! touches a clear cluster, and every discard, takes the locks of all the clusters it touches
//! (one mutex per stripe of clusters, [`STRIPES`] stripes, taken in ascending order so two
//! requests never deadlock) and looks at the bits again under them. A write that finds every cluster it
//! touches already set takes no lock: nothing but a discard changes a set cluster's state, and
//! a discard racing a write leaves the result of one of the two orders (the two requests are
//! concurrent, so the kernel promises no order). Reads take no lock: a bit is set (Release)
//! only after the cluster's data was written, and read (Acquire) before the data is read.
//!
//! # Durability
//! Writes go to the data file's page cache and bits to memory; nothing is durable before a
//! FLUSH. The map on disk may lag behind the memory only for writes not yet flushed (which the
//! guest may not rely on before FLUSH/FUA), and never claims a cluster whose data is not
//! durable. [`Cow::sync`] (a FLUSH) does, under one flush lock: (1) take the set of map pages
//! changed since the last flush and copy those pages from memory; (2) fdatasync `data` (fsync
//! when a range was punched or zeroed since, so the punch's metadata is durable too); (3) write the copied
//! pages into the map and fdatasync it. Every bit in the copy was set after its cluster's data
//! write returned, so before (2) began: (2) makes that data durable before (3) makes the bit
//! durable. A bit set after (1) stays in the changed set for the next flush. Every write
//! acknowledged before the FLUSH set its bit and marked its page before it was acknowledged, so
//! it is in (1). A torn page write in (3) leaves each bit old or new, and both are backed by
//! durable data. A clear that is not durable yet leaves the old bit: its cluster then reads its
//! old (durable) content, which is allowed for a discard not yet flushed.
//! FUA needs nothing of its own: the loop device in front of the engine advertises a volatile
//! write cache without FUA, so the block layer turns a FUA write into a write and a FLUSH, and
//! an `O_SYNC`/`O_DSYNC` write on the FUSE file reaches the engine as a write and an fsync.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use nix::fcntl::FallocateFlags;

use super::ImageFormat;
use super::extents::Extent;

/// The cluster size of new replicas when the caller does not say (see the README's figures).
pub const DEFAULT_CLUSTER: u32 = 64 * 1024;
/// Bytes before the bitmap in the map file.
pub const HEADER: u64 = 4096;
/// The bitmap is written in pages of this many bytes.
const PAGE: u64 = 4096;
/// 64-bit words of the bitmap per page.
const WORDS_PER_PAGE: usize = (PAGE / 8) as usize;
/// Cluster locks (a cluster's lock is its number modulo this).
pub const STRIPES: usize = 1024;
const MAGIC: &[u8; 8] = b"BICSICOW";
const VERSION: u32 = 1;

fn err(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

/// The files of one copy-on-write replica, as the engine's `--cow-replica` names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CowSpec {
    pub data: PathBuf,
    pub map: PathBuf,
    pub base: Option<PathBuf>,
}

impl CowSpec {
    /// Parses `data=PATH,map=PATH[,base=PATH]` (the flag's value).
    pub fn parse(value: &str) -> Result<CowSpec, String> {
        let usage = "write data=PATH,map=PATH[,base=PATH]";
        let (mut data, mut map, mut base) = (None, None, None);
        for part in value.split(',') {
            let (key, path) = part
                .split_once('=')
                .ok_or_else(|| format!("{value:?}: {part:?} is not KEY=PATH; {usage}"))?;
            if path.is_empty() {
                return Err(format!("{value:?}: {key} has an empty path; {usage}"));
            }
            let slot = match key {
                "data" => &mut data,
                "map" => &mut map,
                "base" => &mut base,
                other => return Err(format!("{value:?}: unknown key {other:?}; {usage}")),
            };
            if slot.replace(PathBuf::from(path)).is_some() {
                return Err(format!("{value:?}: {key} given twice; {usage}"));
            }
        }
        Ok(CowSpec {
            data: data.ok_or_else(|| format!("{value:?}: no data=PATH; {usage}"))?,
            map: map.ok_or_else(|| format!("{value:?}: no map=PATH; {usage}"))?,
            base,
        })
    }
}

/// The map file's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    cluster: u32,
    size: u64,
    /// The base's length in bytes; None: the replica has no base.
    base_len: Option<u64>,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut h = vec![0u8; HEADER as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.cluster.to_le_bytes());
        h[16..24].copy_from_slice(&self.size.to_le_bytes());
        h[24..32].copy_from_slice(&self.base_len.unwrap_or(0).to_le_bytes());
        h[32] = self.base_len.is_some() as u8;
        h
    }

    fn decode(map: &Path, h: &[u8]) -> std::io::Result<Header> {
        let int = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(&h[r]);
            u64::from_le_bytes(b)
        };
        if h.len() < HEADER as usize || &h[0..8] != MAGIC {
            return Err(err(format!(
                "{} is not a bicsi copy-on-write map (no {} header); give the map file made \
                 with the replica's data file",
                map.display(),
                String::from_utf8_lossy(MAGIC)
            )));
        }
        let version = int(8..12) as u32;
        if version != VERSION {
            return Err(err(format!(
                "{}: map version {version}, this bicsi reads version {VERSION}; run the bicsi \
                 that made it",
                map.display()
            )));
        }
        let header = Header {
            cluster: int(12..16) as u32,
            size: int(16..24),
            base_len: (h[32] != 0).then(|| int(24..32)),
        };
        check_cluster(header.cluster).map_err(|e| err(format!("{}: {e}", map.display())))?;
        Ok(header)
    }
}

fn check_cluster(cluster: u32) -> Result<(), String> {
    if !cluster.is_power_of_two() || !(4096..=(1 << 20)).contains(&cluster) {
        return Err(format!(
            "cluster size {cluster} is not a power of two from 4096 to 1048576"
        ));
    }
    Ok(())
}

fn bitmap_bytes(size: u64, cluster: u64) -> u64 {
    size.div_ceil(cluster).div_ceil(8).div_ceil(PAGE) * PAGE
}

/// Writes `bytes` to `path` through a temporary file, fsync'ed and renamed into place, the
/// directory fsync'ed: a crash leaves the whole file or none.
fn write_atomically(path: &Path, bytes: &[u8], len: u64) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.set_len(len)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Creates a new replica: a sparse `data` file of `size` bytes and its empty map (every cluster
/// reads from `base`, or as zeros). Refuses to overwrite either file. The map is written last
/// (atomically), so a crash leaves no map that names a missing data file.
pub fn create(spec: &CowSpec, size: u64, cluster: u32) -> std::io::Result<()> {
    check_cluster(cluster).map_err(|e| err(format!("replica {}: {e}", spec.data.display())))?;
    for p in [&spec.data, &spec.map] {
        if p.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists; a new copy-on-write replica needs new files (remove it, or open \
                     the replica instead)",
                    p.display()
                ),
            ));
        }
    }
    let base_len = match &spec.base {
        Some(b) => Some(
            std::fs::metadata(b)
                .map_err(|e| std::io::Error::new(e.kind(), format!("base {}: {e}", b.display())))?
                .len(),
        ),
        None => None,
    };
    let data = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&spec.data)?;
    data.set_len(size)?;
    data.sync_all()?;
    let header = Header {
        cluster,
        size,
        base_len,
    };
    write_atomically(
        &spec.map,
        &header.encode(),
        HEADER + bitmap_bytes(size, cluster as u64),
    )
}

/// Grows the replica `spec` (no engine may have it open) to `size` bytes, in two steps each of
/// which leaves a readable replica: (1) the data file is grown (the new tail is a hole, zeros)
/// and fsync'ed, while the map still says the old size ([`Cow::open`] accepts a data file
/// longer than its map: the old volume); (2) the map is written again with the new size and
/// the old bits (the bits past the old last cluster, which meant nothing, cleared; the new
/// clusters' bits clear) through a temporary file renamed over it ([`write_atomically`]). A
/// crash before (2) completes leaves the old size, after it the new one; calling this again
/// finishes the job. The base is not touched: its length never exceeds the old size (a volume
/// is at least its image), so the new clusters read as zeros until written. The same size is
/// Ok; a smaller one is refused.
pub fn grow(spec: &CowSpec, size: u64) -> std::io::Result<()> {
    let name = spec.data.display();
    let map = OpenOptions::new().read(true).open(&spec.map)?;
    let mut head = vec![0u8; HEADER as usize];
    crate::os::rawfile::read_full(&map, &mut head, 0)?;
    let header = Header::decode(&spec.map, &head)?;
    if size < header.size {
        return Err(err(format!(
            "copy-on-write replica {name} holds {} bytes; it cannot shrink to {size}",
            header.size
        )));
    }
    let data = OpenOptions::new().write(true).open(&spec.data)?;
    let data_len = data.metadata()?.len();
    if data_len < header.size {
        return Err(err(format!(
            "copy-on-write replica {name} has {data_len} bytes but its map {} says {}; give the \
             map made with this data file",
            spec.map.display(),
            header.size
        )));
    }
    if data_len < size {
        data.set_len(size)?;
        data.sync_all()?;
    }
    if header.size == size {
        return Ok(());
    }
    let cluster = header.cluster as u64;
    let old_bytes = bitmap_bytes(header.size, cluster);
    let mut bitmap = vec![0u8; bitmap_bytes(size, cluster) as usize];
    crate::os::rawfile::read_full(&map, &mut bitmap[..old_bytes as usize], HEADER)?;
    let clusters = header.size.div_ceil(cluster);
    for k in clusters..old_bytes * 8 {
        bitmap[(k / 8) as usize] &= !(1u8 << (k % 8));
    }
    let mut bytes = Header { size, ..header }.encode();
    bytes.extend_from_slice(&bitmap);
    let len = bytes.len() as u64;
    write_atomically(&spec.map, &bytes, len)
}

/// One open copy-on-write replica.
pub struct Cow {
    data: File,
    map: File,
    base: Option<File>,
    /// The base's path as opened (its link resolved), for [`Cow::same_base`].
    base_path: Option<PathBuf>,
    /// The base's length (0 without a base): clusters from here on have no base bytes.
    base_len: u64,
    size: u64,
    cluster: u64,
    read_only: bool,
    /// Bit k: cluster k is in `data`.
    bits: Vec<AtomicU64>,
    /// Map pages changed in memory since the last flush.
    dirty: Mutex<BTreeSet<u64>>,
    /// A range of `data` was punched or zeroed since the last flush (extent changes: its
    /// fsync must be a full one).
    fallocated: AtomicBool,
    stripes: Vec<Mutex<()>>,
    flush: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn fallocate(file: &File, flags: FallocateFlags, offset: u64, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    nix::fcntl::fallocate(
        file,
        flags | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
    .map_err(std::io::Error::from)
}

/// Appends `[offset, offset+len)` to `ranges`, merging it with the last one when adjacent.
fn push_range(ranges: &mut Vec<(u64, u64)>, offset: u64, len: u64) {
    if let Some(last) = ranges.last_mut()
        && last.0 + last.1 == offset
    {
        last.1 += len;
        return;
    }
    ranges.push((offset, len));
}

impl Cow {
    /// Opens a replica made by [`create`]; `spec.base` must be the base it was made over (same
    /// length), or absent when it was made without one.
    pub fn open(spec: &CowSpec, read_only: bool) -> std::io::Result<Cow> {
        let name = spec.data.display();
        let open = |p: &Path, write: bool| {
            OpenOptions::new()
                .read(true)
                .write(write)
                .open(p)
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("copy-on-write replica {name}: opening {}: {e}", p.display()),
                    )
                })
        };
        let data = open(&spec.data, !read_only)?;
        let map = open(&spec.map, !read_only)?;
        let mut head = vec![0u8; HEADER as usize];
        crate::os::rawfile::read_full(&map, &mut head, 0)?;
        let header = Header::decode(&spec.map, &head)?;
        let data_len = data.metadata()?.len();
        // Longer is an expansion cut off between its two steps ([`grow`]): the map's size holds.
        if data_len < header.size {
            return Err(err(format!(
                "copy-on-write replica {name} has {data_len} bytes but its map {} says {}; \
                 grow both together, or give the map made with this data file",
                spec.map.display(),
                header.size
            )));
        }
        let base = match (&spec.base, header.base_len) {
            (None, None) => None,
            (Some(b), Some(len)) => {
                let f = open(b, false)?;
                let got = f.metadata()?.len();
                if got != len {
                    return Err(err(format!(
                        "copy-on-write replica {name} was made over a base of {len} bytes but \
                         {} has {got}; give the base it was made over",
                        b.display()
                    )));
                }
                Some(f)
            }
            (None, Some(_)) => {
                return Err(err(format!(
                    "copy-on-write replica {name} was made over a base; give it (base=PATH)"
                )));
            }
            (Some(b), None) => {
                return Err(err(format!(
                    "copy-on-write replica {name} was made without a base; do not give {}",
                    b.display()
                )));
            }
        };
        let base_path = spec
            .base
            .as_ref()
            .map(|b| std::fs::canonicalize(b).unwrap_or_else(|_| b.clone()));
        let cluster = header.cluster as u64;
        let mut bitmap = vec![0u8; bitmap_bytes(header.size, cluster) as usize];
        crate::os::rawfile::read_full(&map, &mut bitmap, HEADER)?;
        let clusters = header.size.div_ceil(cluster);
        let bits: Vec<AtomicU64> = bitmap
            .chunks(8)
            .enumerate()
            .map(|(w, b)| {
                let mut word = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                // Bits past the last cluster mean nothing.
                let first = w as u64 * 64;
                if first + 64 > clusters {
                    let keep = clusters.saturating_sub(first);
                    word &= if keep == 0 {
                        0
                    } else {
                        u64::MAX >> (64 - keep)
                    };
                }
                AtomicU64::new(word)
            })
            .collect();
        Ok(Cow {
            data,
            map,
            base,
            base_path,
            base_len: header.base_len.unwrap_or(0),
            size: header.size,
            cluster,
            read_only,
            bits,
            dirty: Mutex::new(BTreeSet::new()),
            fallocated: AtomicBool::new(false),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            flush: Mutex::new(()),
        })
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The cluster size in bytes.
    pub fn cluster(&self) -> u64 {
        self.cluster
    }

    fn is_set(&self, k: u64) -> bool {
        self.bits[(k / 64) as usize].load(Ordering::Acquire) & (1 << (k % 64)) != 0
    }

    fn set(&self, k: u64, on: bool) {
        let word = &self.bits[(k / 64) as usize];
        let bit = 1u64 << (k % 64);
        let old = if on {
            word.fetch_or(bit, Ordering::AcqRel)
        } else {
            word.fetch_and(!bit, Ordering::AcqRel)
        };
        if (old & bit != 0) != on {
            lock(&self.dirty).insert(k / 64 / WORDS_PER_PAGE as u64);
        }
    }

    /// Whether a cluster that is clear in both `self` and `other` reads the same bytes in both:
    /// neither has a base (zeros), or both read the same backing image's raw expansion. Two
    /// bases are the same image's when they are one file, or when they have one length and the
    /// same name in a directory of the same name: bicsi keeps one expansion per disk per image
    /// at `backing-images/<name>-<uuid>/` (`backing.raw`, or `backing` for a raw image), made
    /// from that image's one file, so those names say the bytes. The online rebuild into a
    /// copy-on-write target (`super::rebuild`) skips such clusters without reading them.
    pub fn same_base(&self, other: &Cow) -> bool {
        match (&self.base_path, &other.base_path) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                a == b
                    || (self.base_len == other.base_len
                        && a.file_name() == b.file_name()
                        && a.parent().and_then(Path::file_name)
                            == b.parent().and_then(Path::file_name))
            }
            _ => false,
        }
    }

    /// The runs `[start, end)` within `[from, to)` whose clusters are clear (they read the base,
    /// or zeros), in order. A caller that must not see them change holds what orders it
    /// against the volume's writes (the online rebuild's chunk locks).
    pub fn clear_runs(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        let to = to.min(self.size);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = from;
        while pos < to {
            let k = pos / self.cluster;
            let end = self.bounds(k).1.min(to);
            if !self.is_set(k) {
                match out.last_mut() {
                    Some(last) if last.1 == pos => last.1 = end,
                    _ => out.push((pos, end)),
                }
            }
            pos = end;
        }
        out
    }

    /// Clusters set in memory (tests and the README's space figures).
    pub fn clusters_in_data(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as u64)
            .sum()
    }

    /// `[start, end)` of cluster `k`, clipped to the volume.
    fn bounds(&self, k: u64) -> (u64, u64) {
        let start = k * self.cluster;
        (start, (start + self.cluster).min(self.size))
    }

    /// Whether cluster `k` has base bytes under it.
    fn has_base(&self, k: u64) -> bool {
        self.base.is_some() && k * self.cluster < self.base_len
    }

    fn clusters(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        offset / self.cluster..=(offset + len - 1) / self.cluster
    }

    /// Locks the stripes of `clusters` in ascending order.
    fn lock_clusters(&self, clusters: impl Iterator<Item = u64>) -> Vec<MutexGuard<'_, ()>> {
        let stripes: BTreeSet<usize> = clusters.map(|k| (k % STRIPES as u64) as usize).collect();
        stripes
            .into_iter()
            .map(|s| lock(&self.stripes[s]))
            .collect()
    }

    fn check_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if self.read_only && len > 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EROFS));
        }
        Ok(())
    }

    /// The base's bytes of `[offset, offset + buf.len())` (zeros past its end, or no base).
    fn read_base(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match &self.base {
            Some(b) if offset < self.base_len => crate::os::rawfile::read_full(b, buf, offset),
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Fills `buf` from `offset` (zeros past the volume's end).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = (offset + buf.len() as u64).min(self.size);
        if offset >= end {
            buf.fill(0);
            return Ok(());
        }
        buf[(end - offset) as usize..].fill(0);
        let mut pos = offset;
        while pos < end {
            // One run of clusters in the same state.
            let k = pos / self.cluster;
            let set = self.is_set(k);
            let mut run_end = self.bounds(k).1;
            while run_end < end && self.is_set(run_end / self.cluster) == set {
                run_end = self.bounds(run_end / self.cluster).1;
            }
            let run_end = run_end.min(end);
            let part = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            if set {
                crate::os::rawfile::read_full(&self.data, part, pos)?;
            } else {
                self.read_base(part, pos)?;
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Writes `bytes` at `offset` (see the module doc).
    pub fn write_at(&self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        let len = bytes.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let clusters = self.clusters(offset, len);
        if clusters.clone().all(|k| self.is_set(k)) {
            return self.data.write_all_at(bytes, offset);
        }
        // All of the range's clusters, not only the clear ones: a discard may clear a set one
        // between the test above and the loop below, which then fills it.
        let _locks = self.lock_clusters(clusters.clone());
        let end = offset + len;
        let mut filled = Vec::new();
        // A run of bytes that go to `data` as they are: [run_start, pos).
        let mut run_start = offset;
        let mut pos = offset;
        for k in clusters {
            let (cs, ce) = self.bounds(k);
            let (ws, we) = (cs.max(offset), ce.min(end));
            if self.is_set(k) {
                pos = we;
                continue;
            }
            filled.push(k);
            if ws == cs && we == ce {
                pos = we;
                continue;
            }
            // A part of a clear cluster: the base's cluster with the new bytes over it.
            if pos > run_start {
                self.data.write_all_at(
                    &bytes[(run_start - offset) as usize..(pos - offset) as usize],
                    run_start,
                )?;
            }
            let mut merged = vec![0u8; (ce - cs) as usize];
            self.read_base(&mut merged, cs)?;
            merged[(ws - cs) as usize..(we - cs) as usize]
                .copy_from_slice(&bytes[(ws - offset) as usize..(we - offset) as usize]);
            self.data.write_all_at(&merged, cs)?;
            pos = we;
            run_start = we;
        }
        if pos > run_start {
            self.data.write_all_at(
                &bytes[(run_start - offset) as usize..(pos - offset) as usize],
                run_start,
            )?;
        }
        for k in filled {
            self.set(k, true);
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeros, freeing what it can (a discard).
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.zero(offset, len, true)
    }

    /// Makes `[offset, offset+len)` read as zeros, keeping clusters in `data` allocated.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.zero(offset, len, false)
    }

    fn zero(&self, offset: u64, len: u64, punch: bool) -> std::io::Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let clusters = self.clusters(offset, len);
        let _locks = self.lock_clusters(clusters.clone());
        let end = offset + len;
        let (mut holes, mut zeros) = (Vec::new(), Vec::new());
        let (mut set, mut clear) = (Vec::new(), Vec::new());
        for k in clusters {
            let (cs, ce) = self.bounds(k);
            let (ws, we) = (cs.max(offset), ce.min(end));
            let whole = ws == cs && we == ce;
            if whole && !self.has_base(k) {
                push_range(&mut holes, cs, ce - cs);
                clear.push(k);
            } else if whole {
                push_range(if punch { &mut holes } else { &mut zeros }, cs, ce - cs);
                set.push(k);
            } else if self.is_set(k) {
                push_range(if punch { &mut holes } else { &mut zeros }, ws, we - ws);
            } else if self.has_base(k) {
                let mut merged = vec![0u8; (ce - cs) as usize];
                self.read_base(&mut merged, cs)?;
                merged[(ws - cs) as usize..(we - cs) as usize].fill(0);
                self.data.write_all_at(&merged, cs)?;
                set.push(k);
            }
        }
        // Clear first: a cluster read between the punch and the clear reads zeros either way.
        for &k in &clear {
            self.set(k, false);
        }
        let changed = !holes.is_empty() || !zeros.is_empty();
        for (o, l) in holes {
            fallocate(&self.data, FallocateFlags::FALLOC_FL_PUNCH_HOLE, o, l)?;
        }
        for (o, l) in zeros {
            fallocate(&self.data, FallocateFlags::FALLOC_FL_ZERO_RANGE, o, l)?;
        }
        // After the calls: a flush that consumed the flag while they ran was not asked to
        // cover them (they were not acknowledged), the next one is.
        if changed {
            self.fallocated.store(true, Ordering::Release);
        }
        for k in set {
            self.set(k, true);
        }
        Ok(())
    }

    /// Makes every write, discard and zeroing done before it durable (see the module doc).
    pub fn sync(&self) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _flush = lock(&self.flush);
        let pages: Vec<u64> = std::mem::take(&mut *lock(&self.dirty))
            .into_iter()
            .collect();
        let copies: Vec<(u64, Vec<u8>)> = pages
            .iter()
            .map(|&p| {
                let first = p as usize * WORDS_PER_PAGE;
                let words = &self.bits[first..(first + WORDS_PER_PAGE).min(self.bits.len())];
                let bytes = words
                    .iter()
                    .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
                    .collect();
                (p, bytes)
            })
            .collect();
        let punched = self.fallocated.swap(false, Ordering::AcqRel);
        let done = (|| {
            if punched {
                self.data.sync_all()?;
            } else {
                self.data.sync_data()?;
            }
            for (p, bytes) in &copies {
                self.map.write_all_at(bytes, HEADER + p * PAGE)?;
            }
            if !copies.is_empty() {
                self.map.sync_data()?;
            }
            Ok(())
        })();
        if done.is_err() {
            // Nothing is known durable: the next flush does it all again.
            lock(&self.dirty).extend(pages);
            if punched {
                self.fallocated.store(true, Ordering::Release);
            }
        }
        done
    }

    /// The data extents of the volume within `[from, to)`: the clusters in `data` where the
    /// data file has data, the others where the base has.
    pub fn data_extents(&self, from: u64, to: u64) -> std::io::Result<Vec<Extent>> {
        let to = to.min(self.size);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = from;
        while pos < to {
            let k = pos / self.cluster;
            let set = self.is_set(k);
            let mut run_end = self.bounds(k).1;
            while run_end < to && self.is_set(run_end / self.cluster) == set {
                run_end = self.bounds(run_end / self.cluster).1;
            }
            let run_end = run_end.min(to);
            let found = match (&self.base, set) {
                (_, true) => super::extents::extents_in(&self.data, pos, run_end)?,
                (Some(b), false) if pos < self.base_len => {
                    super::extents::extents_in(b, pos, run_end.min(self.base_len))?
                }
                _ => Vec::new(),
            };
            for e in found {
                match out.last_mut() {
                    Some(last) if last.end() == e.offset => last.len += e.len,
                    _ => out.push(e),
                }
            }
            pos = run_end;
        }
        Ok(out)
    }
}

/// A volume's content read in-process from a local replica: a raw file, or a copy-on-write
/// replica's view through its layer (qemu cannot read that layout). Used by the restores into
/// copy-on-write replicas (`replica_file::cow_from`) and by the compare of local replicas
/// ([`super::compare::identical`]).
pub enum View {
    Raw(std::fs::File, u64),
    Cow(Cow),
}

impl View {
    /// Opens the replica file `path` read only; a qcow2 file is refused (Unsupported: flatten
    /// it into a raw file first, or let qemu read it).
    pub fn open(path: &Path) -> std::io::Result<View> {
        match ImageFormat::of_file(path) {
            ImageFormat::Cow => Cow::open(&cow_spec(path), true).map(View::Cow),
            ImageFormat::Raw => {
                let f = std::fs::File::open(path)?;
                let len = f.metadata()?.len();
                Ok(View::Raw(f, len))
            }
            ImageFormat::Qcow2 => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!(
                    "{} is qcow2; flatten it into a raw file first",
                    path.display()
                ),
            )),
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            View::Raw(_, len) => *len,
            View::Cow(c) => c.size(),
        }
    }

    /// Where it has data below `to`; elsewhere it reads as zeros.
    pub fn extents(&self, to: u64) -> std::io::Result<Vec<Extent>> {
        match self {
            View::Raw(f, _) => super::extents::extents_in(f, 0, to),
            View::Cow(c) => c.data_extents(0, to),
        }
    }

    /// Fills `buf` from `offset`; zeros past the end.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match self {
            View::Raw(f, _) => crate::os::rawfile::read_full(f, buf, offset),
            View::Cow(c) => c.read_at(buf, offset),
        }
    }
}

/// The engine's view of the copy-on-write replica whose data file is `data`: its map beside it
/// and its base when the replica has one (`base` beside it).
pub fn cow_spec(data: &Path) -> CowSpec {
    let base = ImageFormat::cow_base(data);
    CowSpec {
        data: data.to_path_buf(),
        map: ImageFormat::cow_map(data),
        base: std::fs::symlink_metadata(&base).is_ok().then_some(base),
    }
}

#[cfg(test)]
mod tests;
