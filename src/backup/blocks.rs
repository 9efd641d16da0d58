//! The node's side of backups: a snapshot file's content cut into fixed blocks and stored in the
//! target, and a backup's blocks written back over a backing image. Runs where the files are.
//!
//! Backup: `qemu-img info` tells the snapshot's format (never guessed), `qemu-img map` which of
//! its extents are its own (depth 0 over a backing file; every data extent of a file without
//! one). Only blocks touching those are read, from a sparse raw view (`qemu-img convert -O raw`;
//! a raw file without backing is read as it is), compared with the backing image's bytes and
//! with zeros, hashed (SHA-256), compressed (zstd, lz4 or not at all: the volume's
//! `backupCompression`) and put under their hash unless the backup volume holds that block
//! already, under any compression (or `full` asks for every block again). One reader thread
//! reads, hashes and compresses while up to [`UPLOADS`] puts run, so memory stays at a few
//! blocks. The metadata is put last: a backup cut off before it is not a backup.
//!
//! Restore: a qcow2 file over the chosen backing image's file (or over nothing), into which
//! `qemu-io` writes each block of the backup after its SHA-256 is checked, built under a
//! temporary name (`.part`) and renamed into place when complete. After each batch of blocks the
//! `.part` file is fsynced and then a checkpoint beside it (`.progress`: which job, how many
//! blocks are written) is replaced atomically and fsynced, so a restore cut off by a kill or a
//! crash continues after the last checkpoint: the same job (the same backup metadata over the
//! same files) finds the `.part` sound (`qemu-img check`) and fetches only the blocks after it.
//! Any other job, a missing or unsound `.part`, starts from the beginning. Over an override image (not the one the
//! backup was taken over), the blocks the backup left out hold the original image's bytes: where
//! the original (a file of this node, or fetched from the target) and the override differ,
//! those blocks are written from the original as well.
//!
//! This module must not touch records in the store: the controller passes everything in.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::layout::{self, BackupMeta, BlockRef, Compression, ImageRef};
use super::target::Target;
use crate::error::{Error, Result};
use crate::os::{ImageFormat, Os};

/// Puts (or gets) in flight at once.
pub const UPLOADS: usize = 4;
/// Blocks written by one `qemu-io` run during a restore.
const RESTORE_BATCH: usize = 16;
const ZSTD_LEVEL: i32 = 3;

/// How far a backup or a restore is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Blocks to look at (backup) or to write (restore).
    pub blocks_total: u64,
    pub blocks_done: u64,
    /// Blocks put into the target by this backup (restore: 0).
    pub blocks_uploaded: u64,
    /// Compressed bytes put (backup) or fetched (restore).
    pub bytes_transferred: u64,
    /// Restore: blocks this run fetched from the target (a resumed restore fetches only those
    /// after its checkpoint).
    #[serde(default)]
    pub blocks_fetched: u64,
}

impl Progress {
    pub fn percent(&self) -> u64 {
        (self.blocks_done * 100)
            .checked_div(self.blocks_total)
            .unwrap_or(100)
            .min(100)
    }
}

pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// What the controller asks a node agent to back up: a snapshot file of that node (JSON on the
/// split mode's wire, `crate::remote`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupFileRequest {
    pub target_url: String,
    pub credential_file: Option<PathBuf>,
    pub name: String,
    pub volume: String,
    /// The snapshot's id, when the backup reads an existing snapshot.
    pub snapshot: String,
    pub file: crate::snapshot::SnapshotFile,
    /// The backing image of the snapshot, as the backup will name it.
    pub backing: Option<ImageRef>,
    pub block_size: u64,
    pub full: bool,
    /// How the blocks this backup puts are compressed.
    #[serde(default)]
    pub compression: Compression,
    /// The volume's parameters, recorded in the backup (`BackupMeta::volume_parameters`).
    #[serde(default)]
    pub volume_parameters: std::collections::BTreeMap<String, String>,
}

/// What the controller asks a node agent to restore: a backup's content over `backing_image`'s
/// file on `disk_id`, as the snapshot file of `restore_id` there (JSON on the split mode's wire).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreFileRequest {
    pub target_url: String,
    pub credential_file: Option<PathBuf>,
    pub meta: BackupMeta,
    pub restore_id: String,
    pub disk_id: String,
    pub backing_image: Option<String>,
    /// Where the backup's own backing image comes from when `backing_image` overrides it (the
    /// blocks the backup left out hold that image's bytes); None without an override, or when
    /// neither this cluster nor the target has it.
    #[serde(default)]
    pub original: Option<OriginalImage>,
}

/// The backing image a backup was taken over, for a restore over another image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OriginalImage {
    /// Its name in the backup (and in the target's `backingimages/`).
    pub name: String,
    /// Its SHA-512.
    pub checksum: String,
    /// A backing image of this cluster with that SHA-512, whose file is used; None: the image
    /// is fetched from the target (checked against `checksum`).
    pub local: Option<String>,
}

/// What one backup needs, all of it resolved by the controller and the agent.
#[derive(Clone, Debug)]
pub struct BackupJob {
    pub target: Target,
    pub name: String,
    pub volume: String,
    pub snapshot: String,
    /// The snapshot's file on this node.
    pub file: PathBuf,
    /// A scratch directory of the file's disk; removed afterwards.
    pub work_dir: PathBuf,
    /// The volume's backing image and its ready file on this node.
    pub backing: Option<(ImageRef, PathBuf, ImageFormat)>,
    pub block_size: u64,
    pub full: bool,
    pub compression: Compression,
    pub volume_parameters: std::collections::BTreeMap<String, String>,
}

/// What a restore needs.
#[derive(Clone, Debug)]
pub struct RestoreJob {
    pub target: Target,
    pub meta: BackupMeta,
    /// The file to build (a snapshot file the normal restore path then copies into replicas).
    pub dest: PathBuf,
    /// The backing image's file the restored content goes over.
    pub backing: Option<(PathBuf, ImageFormat)>,
    /// The file of the image the backup was taken over, when `backing` is another one: every
    /// block the backup left out is written from it where the two differ.
    pub original: Option<(PathBuf, ImageFormat)>,
    pub work_dir: PathBuf,
}

/// One extent of `qemu-img map --output=json`.
#[derive(Clone, Debug, Deserialize)]
struct Extent {
    start: u64,
    length: u64,
    #[serde(default)]
    depth: u64,
    #[serde(default)]
    data: bool,
    #[serde(default)]
    zero: bool,
    #[serde(default)]
    compressed: bool,
    /// Where the extent's bytes are in the image file (qcow2 data clusters).
    #[serde(default)]
    offset: Option<u64>,
}

/// Where a block's bytes are read from.
enum Content {
    /// A raw view of the whole volume (the raw file itself, or a converted copy).
    Raw(PathBuf, std::fs::File),
    /// The qcow2 snapshot file itself: its own extents (depth 0) read at their host offsets,
    /// the rest from the backing image's raw view (or zeros), so nothing is converted.
    Own(std::fs::File, Vec<Extent>),
}

/// Whether the own extents of a qcow2 file can be read in place: none compressed, every data
/// extent with its host offset.
fn readable_in_place(extents: &[Extent]) -> bool {
    extents
        .iter()
        .filter(|e| e.depth == 0)
        .all(|e| !e.compressed && (e.zero || !e.data || e.offset.is_some()))
}

/// Overlays the own extents of `[off, off + buf.len())` onto `buf`, which holds the backing
/// bytes: data read from the file at the extent's host offset, zeros for zero extents.
fn overlay_own(
    f: &std::fs::File,
    path: &Path,
    extents: &[Extent],
    off: u64,
    buf: &mut [u8],
) -> Result<()> {
    let end = off + buf.len() as u64;
    for e in extents.iter().filter(|e| e.depth == 0) {
        let (a, b) = (e.start.max(off), (e.start + e.length).min(end));
        if a >= b {
            continue;
        }
        let dst = &mut buf[(a - off) as usize..(b - off) as usize];
        match e.offset {
            Some(host) if e.data && !e.zero => read_at(f, path, host + (a - e.start), dst)?,
            _ => dst.fill(0),
        }
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    Ok(crate::os::run(cmd)?.stdout)
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Internal(format!("{what} {}: {e}", path.display()))
}

fn map(file: &Path, format: ImageFormat) -> Result<Vec<Extent>> {
    let out = run(Command::new("qemu-img")
        .args(["map", "-U", "--output=json", "-f", format.as_str()])
        .arg(file))?;
    serde_json::from_slice(&out).map_err(|e| {
        Error::Internal(format!(
            "cannot parse `qemu-img map` of {}: {e}",
            file.display()
        ))
    })
}

/// A sparse raw copy of `file` (read with its backing chain) at `out`.
fn to_raw(file: &Path, format: ImageFormat, out: &Path) -> Result<()> {
    let _ = std::fs::remove_file(out);
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-f", format.as_str(), "-O", "raw"])
        .arg(file)
        .arg(out))?;
    Ok(())
}

/// A readable raw view of an image: the file itself when it is raw, else a converted copy.
fn raw_view(file: &Path, format: ImageFormat, chain: bool, scratch: &Path) -> Result<PathBuf> {
    if format == ImageFormat::Raw && !chain {
        return Ok(file.to_path_buf());
    }
    to_raw(file, format, scratch)?;
    Ok(scratch.to_path_buf())
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros.
fn read_at(f: &std::fs::File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = f
            .read_at(&mut buf[done..], offset + done as u64)
            .map_err(|e| io("cannot read", path, e))?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// Whether every byte is 0 (slices of a zero page compared with memcmp, as this runs over
/// every block read).
pub fn is_zero(data: &[u8]) -> bool {
    const ZEROS: [u8; 4096] = [0; 4096];
    data.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

/// Which blocks may differ from the backing image (or zeros), from the file's extent map.
fn candidate_blocks(
    extents: &[Extent],
    chain: bool,
    has_image: bool,
    size: u64,
    bs: u64,
) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for e in extents {
        let own = if chain {
            e.depth == 0
        } else {
            // A file without backing holds everything; over an image every block must be
            // compared with the image's, else only data can differ from zeros.
            has_image || e.data
        };
        if !own || e.length == 0 || e.start >= size {
            continue;
        }
        let end = (e.start + e.length).min(size);
        out.extend(e.start / bs..=(end - 1) / bs);
    }
    out
}

/// Compresses a block's bytes for its object.
pub fn compress(c: Compression, data: &[u8]) -> Result<Vec<u8>> {
    match c {
        Compression::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL)
            .map_err(|e| Error::Internal(format!("zstd cannot compress a block: {e}"))),
        Compression::Lz4 => Ok(lz4_flex::block::compress(data)),
        Compression::None => Ok(data.to_vec()),
    }
}

/// The bytes of a block object compressed with `c`, which holds `len` bytes; the error says
/// why it does not decompress.
pub fn decompress(
    c: Compression,
    bytes: &[u8],
    len: usize,
) -> std::result::Result<Vec<u8>, String> {
    match c {
        Compression::Zstd => zstd::bulk::decompress(bytes, len).map_err(|e| e.to_string()),
        Compression::Lz4 => lz4_flex::block::decompress(bytes, len).map_err(|e| e.to_string()),
        Compression::None => Ok(bytes.to_vec()),
    }
}

/// One block read by the reader thread.
struct Read {
    index: u64,
    /// Whether the backup lists it (it differs from the backing image).
    listed: bool,
    /// None: all zeros.
    hash: Option<String>,
    /// How its object is (or is to be) compressed.
    compression: Compression,
    /// The compressed bytes to put; None when the target has them (or the block is zeros).
    upload: Option<Vec<u8>>,
}

/// Backs up `job.file` into the target. Returns the metadata, already written.
pub async fn backup(job: BackupJob, progress: ProgressFn) -> Result<BackupMeta> {
    layout::check_name("backup volume", &job.volume)?;
    layout::check_name("backup", &job.name)?;
    let target = job.target.clone();
    target.check().await?;
    let key = layout::backup_key(&job.volume, &job.name);
    if target.get(&key).await?.is_some() {
        return Err(Error::AlreadyExists(format!(
            "backup {:?} of volume {:?} exists in the backup target {} already; use another name",
            job.name,
            job.volume,
            target.url()
        )));
    }
    // What the backup volume holds already, under any compression: those blocks are not put
    // again, and the backup lists them as they are stored.
    let mut existing: HashMap<String, Compression> = HashMap::new();
    if !job.full {
        for k in target.list(&layout::blocks_prefix(&job.volume)).await? {
            if let Some((h, c)) = layout::hash_of_block_key(&k) {
                existing.insert(h.to_string(), c);
            }
        }
    }
    std::fs::create_dir_all(&job.work_dir).map_err(|e| io("cannot create", &job.work_dir, e))?;
    let result = run_backup(&job, existing, progress).await;
    let _ = std::fs::remove_dir_all(&job.work_dir);
    let meta = result?;
    // The metadata last: from now on the backup exists, and every block it lists is stored.
    let doc = serde_json::to_vec_pretty(&meta)?;
    target.put(&key, Bytes::from(doc)).await?;
    let vol = layout::BackupVolumeMeta {
        format: layout::FORMAT,
        name: meta.volume.clone(),
        size_bytes: meta.size_bytes,
        block_size: meta.block_size,
        backing_image: meta.backing_image.clone(),
        last_backup: meta.name.clone(),
        last_backup_at: meta.created.clone(),
    };
    target
        .put(
            &layout::volume_key(&meta.volume),
            Bytes::from(serde_json::to_vec_pretty(&vol)?),
        )
        .await?;
    Ok(meta)
}

async fn run_backup(
    job: &BackupJob,
    existing: HashMap<String, Compression>,
    progress: ProgressFn,
) -> Result<BackupMeta> {
    let bs = job.block_size;
    let os = Os::real();
    let info = os.images.info(&job.file)?;
    let size = info.virtual_size;
    let chain = info.backing_file.is_some();
    let extents = map(&job.file, info.format)?;
    let candidates = candidate_blocks(&extents, chain, job.backing.is_some(), size, bs);
    let in_place = info.format == ImageFormat::Qcow2 && readable_in_place(&extents);
    let mut p = Progress {
        blocks_total: candidates.len() as u64,
        ..Default::default()
    };
    progress(p);
    tracing::info!(backup = %job.name, volume = %job.volume, size, candidates = candidates.len(), chain, in_place, "backup: reading the snapshot's own blocks");

    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Read>>(UPLOADS * 2);
    let reader_job = job.clone();
    let full = job.full;
    let compression = job.compression;
    let reader = tokio::task::spawn_blocking(move || {
        let send = |r: Result<Read>| tx.blocking_send(r).is_ok();
        let job = reader_job;
        let result = (|| -> Result<()> {
            if candidates.is_empty() {
                return Ok(());
            }
            let base = match &job.backing {
                Some((_, path, fmt)) => {
                    let view = raw_view(path, *fmt, false, &job.work_dir.join("backing.raw"))?;
                    let f = std::fs::File::open(&view).map_err(|e| io("cannot open", &view, e))?;
                    Some((view, f))
                }
                None => None,
            };
            // In place when the file's own extents say where every byte is and the chain
            // below is the image the backup compares with; else through a raw copy.
            let in_place = info.format == ImageFormat::Qcow2
                && chain == base.is_some()
                && readable_in_place(&extents);
            let content = if in_place {
                let f =
                    std::fs::File::open(&job.file).map_err(|e| io("cannot open", &job.file, e))?;
                Content::Own(f, extents)
            } else {
                let view = raw_view(
                    &job.file,
                    info.format,
                    chain,
                    &job.work_dir.join("content.raw"),
                )?;
                let f = std::fs::File::open(&view).map_err(|e| io("cannot open", &view, e))?;
                Content::Raw(view, f)
            };
            let mut seen = existing;
            let mut data = vec![0u8; bs as usize];
            let mut other = vec![0u8; bs as usize];
            for index in candidates {
                let off = index * bs;
                let len = bs.min(size - off) as usize;
                match &base {
                    Some((view, f)) => read_at(f, view, off, &mut other[..len])?,
                    None => other[..len].fill(0),
                }
                match &content {
                    Content::Raw(view, f) => read_at(f, view, off, &mut data[..len])?,
                    Content::Own(f, own) => {
                        data[..len].copy_from_slice(&other[..len]);
                        overlay_own(f, &job.file, own, off, &mut data[..len])?;
                    }
                }
                let zero = is_zero(&data[..len]);
                let same = data[..len] == other[..len];
                // A block equal to the image's (or to zeros without one) is left out; a zero
                // block over an image is listed without a hash, so a restore writes zeros there.
                let read = if same || zero {
                    Read {
                        index,
                        listed: !same,
                        hash: None,
                        compression: Compression::Zstd,
                        upload: None,
                    }
                } else {
                    let hash = sha256_hex(&data[..len]);
                    let stored = seen.get(&hash).copied();
                    let (upload, compression) = match stored {
                        Some(c) if !full => (None, c),
                        _ => {
                            seen.insert(hash.clone(), compression);
                            let bytes = compress(compression, &data[..len])
                                .map_err(|e| Error::Internal(format!("block {index}: {e}")))?;
                            (Some(bytes), compression)
                        }
                    };
                    Read {
                        index,
                        listed: true,
                        hash: Some(hash),
                        compression,
                        upload,
                    }
                };
                if !send(Ok(read)) {
                    return Ok(());
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e));
        }
    });

    let target = job.target.clone();
    let volume = job.volume.clone();
    let mut uploads = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|r| {
            let target = target.clone();
            let volume = volume.clone();
            async move {
                let r = r?;
                let mut sent = 0u64;
                if let (Some(hash), Some(bytes)) = (&r.hash, r.upload) {
                    sent = bytes.len() as u64;
                    target
                        .put(
                            &layout::block_key(&volume, hash, r.compression),
                            Bytes::from(bytes),
                        )
                        .await?;
                }
                Ok::<_, Error>((r.index, r.listed, r.hash, r.compression, sent))
            }
        })
        .buffered(UPLOADS);
    let mut blocks = Vec::new();
    let mut data_bytes = 0u64;
    while let Some(r) = uploads.next().await {
        let (index, listed, hash, compression, sent) = r?;
        p.blocks_done += 1;
        if sent > 0 {
            p.blocks_uploaded += 1;
            p.bytes_transferred += sent;
        }
        if listed {
            if hash.is_some() {
                data_bytes += bs.min(size - index * bs);
            }
            blocks.push(BlockRef {
                index,
                hash,
                compression,
            });
        }
        progress(p);
    }
    reader
        .await
        .map_err(|e| Error::Internal(format!("backup reader stopped: {e}")))?;
    blocks.sort_by_key(|b| b.index);
    Ok(BackupMeta {
        format: BackupMeta::format_for(&blocks),
        name: job.name.clone(),
        volume: job.volume.clone(),
        snapshot: job.snapshot.clone(),
        created: crate::model::now_rfc3339(),
        size_bytes: size,
        block_size: bs,
        backing_image: job.backing.as_ref().map(|(r, _, _)| r.clone()),
        blocks,
        uploaded_bytes: p.bytes_transferred,
        data_bytes,
        volume_parameters: job.volume_parameters.clone(),
    })
}

/// Fetches a block and checks it against its hash; the error names the block and the backup.
async fn fetch_block(target: &Target, meta: &BackupMeta, b: &BlockRef) -> Result<Vec<u8>> {
    let Some(hash) = &b.hash else {
        return Ok(Vec::new());
    };
    let key = layout::block_key(&meta.volume, hash, b.compression);
    let offset = b.index * meta.block_size;
    let corrupt = |why: String| {
        Error::FailedPrecondition(format!(
            "backup {:?} of volume {:?}: block {} (offset {offset}, {key}) in the backup target {} {why}; the backup cannot be restored as it was: restore another backup of the volume",
            meta.name,
            meta.volume,
            b.index,
            target.url()
        ))
    };
    let bytes = target
        .get(&key)
        .await?
        .ok_or_else(|| corrupt("is missing".into()))?;
    let len = meta.block_size.min(meta.size_bytes - offset) as usize;
    let hash = hash.clone();
    let compression = b.compression;
    let data = tokio::task::spawn_blocking(move || {
        let data = decompress(compression, &bytes, len)
            .map_err(|e| format!("does not decompress as {} ({e})", compression.as_str()))?;
        let got = sha256_hex(&data);
        if data.len() != len || got != hash {
            return Err(format!(
                "is corrupt: its content hashes to {got} ({} bytes), not {hash} ({len} bytes)",
                data.len()
            ));
        }
        Ok(data)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?;
    data.map_err(corrupt)
}

/// What a restore has made durable in its `.part` file: which job (a digest of the backup's
/// metadata and the files it goes over) and how many of its blocks, in the order they are
/// written, are in the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Checkpoint {
    job: String,
    done: u64,
}

/// The identity of a restore job: the same backup over the same files writes the same blocks in
/// the same order.
fn job_digest(job: &RestoreJob) -> Result<String> {
    let mut h = sha2::Sha256::new();
    h.update(serde_json::to_vec(&job.meta)?);
    for f in [&job.backing, &job.original] {
        h.update(format!("\n{f:?}"));
    }
    Ok(hex::encode(h.finalize()))
}

fn checkpoint_path(dest: &Path) -> PathBuf {
    dest.with_extension("qcow2.progress")
}

/// Replaces the checkpoint durably (`crate::os::image::commit`: fsync, rename, fsync of the
/// directory). The `.part` file's data must be fsynced before.
fn write_checkpoint(dest: &Path, c: &Checkpoint) -> Result<()> {
    let path = checkpoint_path(dest);
    let tmp = dest.with_extension("qcow2.progress.tmp");
    std::fs::write(&tmp, serde_json::to_vec(c)?).map_err(|e| io("cannot write", &tmp, e))?;
    Ok(crate::os::image::commit(&tmp, &path)?)
}

/// How many blocks of `digest`'s job a `.part` left by an earlier run holds: its checkpoint's
/// count when the checkpoint is of this job and the file is sound; else 0.
fn resumable(dest: &Path, part: &Path, digest: &str) -> usize {
    let Ok(bytes) = std::fs::read(checkpoint_path(dest)) else {
        return 0;
    };
    let Ok(c) = serde_json::from_slice::<Checkpoint>(&bytes) else {
        return 0;
    };
    if c.job != digest || !part.is_file() {
        return 0;
    }
    // A qemu-io started by a bicsi that was killed may still hold the file (qemu's image lock):
    // let it finish its batch first.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = Command::new("qemu-img")
            .args(["check", "-q", "-f", "qcow2"])
            .arg(part)
            .output();
        match out {
            // 0: clean; 3: leaked clusters only (a write cut off), which do no harm.
            Ok(o) if matches!(o.status.code(), Some(0 | 3)) => return c.done as usize,
            Ok(o)
                if String::from_utf8_lossy(&o.stderr).contains("lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Ok(o) => {
                tracing::warn!(file = %part.display(), stderr = %String::from_utf8_lossy(&o.stderr).trim(), "restore: the file an earlier run left is not sound; starting again");
                return 0;
            }
            Err(e) => {
                tracing::warn!(file = %part.display(), error = %e, "restore: cannot check the file an earlier run left; starting again");
                return 0;
            }
        }
    }
}

/// Builds `job.dest` from the backup: its blocks written over the backing file, continuing an
/// earlier run of the same job from its checkpoint. Nothing is left at `dest` unless it
/// completes; a restore that fails (rather than being cut off) leaves nothing.
pub async fn restore(job: RestoreJob, progress: ProgressFn) -> Result<()> {
    let meta = &job.meta;
    let part = job.dest.with_extension("qcow2.part");
    let dir = job
        .dest
        .parent()
        .ok_or_else(|| Error::Internal(format!("{} has no directory", job.dest.display())))?;
    std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
    std::fs::create_dir_all(&job.work_dir).map_err(|e| io("cannot create", &job.work_dir, e))?;
    let digest = job_digest(&job)?;
    let (dest, part2, digest2) = (job.dest.clone(), part.clone(), digest.clone());
    let resume = tokio::task::spawn_blocking(move || resumable(&dest, &part2, &digest2))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    if resume == 0 {
        let _ = std::fs::remove_file(&part);
        let _ = std::fs::remove_file(checkpoint_path(&job.dest));
    } else {
        tracing::info!(backup = %meta.name, blocks = resume, "restore: continuing after the blocks an earlier run wrote");
    }
    let result = restore_into(&job, &part, &digest, resume, progress).await;
    let _ = std::fs::remove_dir_all(&job.work_dir);
    match result {
        Ok(()) => {
            crate::os::image::commit(&part, &job.dest)?;
            let _ = std::fs::remove_file(checkpoint_path(&job.dest));
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            let _ = std::fs::remove_file(checkpoint_path(&job.dest));
            tracing::warn!(backup = %meta.name, error = %e, "restore failed");
            Err(e)
        }
    }
}

/// After a batch: the `.part` file's data on disk, then the checkpoint that counts it.
async fn checkpoint(job: &RestoreJob, part: &Path, digest: &str, done: u64) -> Result<()> {
    let (part, dest, c) = (
        part.to_path_buf(),
        job.dest.clone(),
        Checkpoint {
            job: digest.to_string(),
            done,
        },
    );
    tokio::task::spawn_blocking(move || {
        std::fs::File::open(&part)
            .and_then(|f| f.sync_all())
            .map_err(|e| io("cannot sync", &part, e))?;
        write_checkpoint(&dest, &c)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
}

async fn restore_into(
    job: &RestoreJob,
    part: &Path,
    digest: &str,
    resume: usize,
    progress: ProgressFn,
) -> Result<()> {
    let meta = &job.meta;
    let os = Os::real();
    let b = job.backing.as_ref().map(|(p, f)| (p.as_path(), *f));
    if resume == 0 {
        os.images.create_replica(part, meta.size_bytes, b)?;
    }
    let mut p = Progress {
        blocks_total: meta.blocks.len() as u64,
        blocks_done: resume as u64,
        ..Default::default()
    };
    progress(p);
    // Over an override: the blocks the backup left out, where the original image differs.
    let (from_original, original_view) = match (&job.original, &job.backing) {
        (Some(original), Some(over)) => {
            let listed: HashSet<u64> = meta.blocks.iter().map(|b| b.index).collect();
            let (original, over) = (original.clone(), over.clone());
            let (work_dir, size, bs) = (job.work_dir.clone(), meta.size_bytes, meta.block_size);
            let (blocks, view) = tokio::task::spawn_blocking(move || {
                differing_blocks(&original, &over, &listed, size, bs, &work_dir)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
            (blocks, Some(view))
        }
        _ => (Vec::new(), None),
    };
    p.blocks_total += from_original.len() as u64;
    progress(p);
    let shared = Arc::new((job.target.clone(), meta.clone()));
    let skip = resume.min(meta.blocks.len());
    for batch in meta.blocks[skip..].chunks(RESTORE_BATCH) {
        let fetched: Vec<Result<Vec<u8>>> = futures::stream::iter(batch.to_vec())
            .map(|b| {
                let shared = shared.clone();
                async move { fetch_block(&shared.0, &shared.1, &b).await }
            })
            .buffered(UPLOADS)
            .collect()
            .await;
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "qcow2"]);
        for (b, data) in batch.iter().zip(fetched) {
            let data = data?;
            let off = b.index * meta.block_size;
            let len = meta.block_size.min(meta.size_bytes - off);
            if b.hash.is_none() {
                cmd.arg("-c").arg(format!("write -q -z {off} {len}"));
            } else {
                p.bytes_transferred += data.len() as u64;
                p.blocks_fetched += 1;
                let f = job.work_dir.join(format!("block-{}", b.index));
                std::fs::write(&f, &data).map_err(|e| io("cannot write", &f, e))?;
                let f = crate::os::utf8_path(&f)?.to_string();
                cmd.arg("-c").arg(format!("write -q -s {f} {off} {len}"));
            }
        }
        run_qemu_io(cmd, part, &meta.name).await?;
        for b in batch {
            let _ = std::fs::remove_file(job.work_dir.join(format!("block-{}", b.index)));
        }
        p.blocks_done += batch.len() as u64;
        checkpoint(job, part, digest, p.blocks_done).await?;
        progress(p);
    }
    if let Some(original) = original_view {
        let mut data = vec![0u8; meta.block_size as usize];
        let skip = resume
            .saturating_sub(meta.blocks.len())
            .min(from_original.len());
        for batch in from_original[skip..].chunks(RESTORE_BATCH) {
            let mut cmd = Command::new("qemu-io");
            cmd.args(["-f", "qcow2"]);
            let mut files = Vec::new();
            for &(index, zero) in batch {
                let off = index * meta.block_size;
                let len = meta.block_size.min(meta.size_bytes - off);
                if zero {
                    cmd.arg("-c").arg(format!("write -q -z {off} {len}"));
                } else {
                    original.read(off, &mut data[..len as usize])?;
                    let b = job.work_dir.join(format!("original-{index}"));
                    std::fs::write(&b, &data[..len as usize])
                        .map_err(|e| io("cannot write", &b, e))?;
                    let name = crate::os::utf8_path(&b)?.to_string();
                    cmd.arg("-c").arg(format!("write -q -s {name} {off} {len}"));
                    files.push(b);
                }
            }
            run_qemu_io(cmd, part, &meta.name).await?;
            for b in files {
                let _ = std::fs::remove_file(b);
            }
            p.blocks_done += batch.len() as u64;
            checkpoint(job, part, digest, p.blocks_done).await?;
            progress(p);
        }
        tracing::info!(backup = %meta.name, blocks = from_original.len(), "restore: blocks of the backup's original image written over the override where they differ");
    }
    Ok(())
}

/// Runs the `qemu-io` writes of a restore into `part`. While another `qemu-io` holds the file
/// (one a killed bicsi started, finishing its batch), it waits up to a minute.
async fn run_qemu_io(mut cmd: Command, part: &Path, backup: &str) -> Result<()> {
    cmd.arg(part);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (out, _) = tokio::task::spawn_blocking(move || {
        loop {
            let out = run(&mut cmd);
            match &out {
                Err(e)
                    if e.to_string().contains("lock") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(200))
                }
                _ => return (out, ()),
            }
        }
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?;
    // qemu-io reports a failed command on stdout and still exits 0.
    let text = String::from_utf8_lossy(&out?).into_owned();
    if !text.trim().is_empty() {
        return Err(Error::Internal(format!(
            "qemu-io writing backup {backup:?} into {}: {}",
            part.display(),
            text.trim()
        )));
    }
    Ok(())
}

/// A backing image read block by block where it is, never converted when it need not be: a raw
/// file as it is; a qcow2 file at the host offsets of its extents (`qemu-img map`: no backing
/// chain, no compressed clusters); else (compressed clusters) through a raw copy. Its extent
/// map tells which blocks read as zeros without reading them.
struct ImageReader {
    path: PathBuf,
    file: std::fs::File,
    /// The qcow2 extents to read at their host offsets; None: `file` is a raw view.
    own: Option<Vec<Extent>>,
    map: Vec<Extent>,
}

impl ImageReader {
    fn open(image: &(PathBuf, ImageFormat), scratch: &Path) -> Result<ImageReader> {
        let (path, format) = image;
        let extents = map(path, *format)?;
        let (path, own) = match format {
            ImageFormat::Raw => (path.clone(), None),
            ImageFormat::Qcow2 if readable_in_place(&extents) => {
                (path.clone(), Some(extents.clone()))
            }
            _ => (raw_view(path, *format, false, scratch)?, None),
        };
        let file = std::fs::File::open(&path).map_err(|e| io("cannot open", &path, e))?;
        Ok(ImageReader {
            path,
            file,
            own,
            map: extents,
        })
    }

    /// Whether `[off, off + len)` reads as zeros by the extent map alone (past the end: zeros).
    fn zero_by_map(&self, off: u64, len: u64) -> bool {
        let end = off + len;
        self.map
            .iter()
            .filter(|e| e.start < end && e.start + e.length > off)
            .all(|e| e.zero || !e.data)
    }

    /// Reads `buf.len()` bytes at `off` (zeros past the end).
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        match &self.own {
            Some(extents) => {
                buf.fill(0);
                overlay_own(&self.file, &self.path, extents, off, buf)
            }
            None => read_at(&self.file, &self.path, off, buf),
        }
    }
}

/// The blocks a backup left out (not in `listed`: equal to its original image, zeros past that
/// image's end) where the override image `over` reads otherwise, each with whether the
/// original's bytes there are zeros; and the original's reader to take their bytes from. Only
/// blocks that hold data in one of the two images by their extent maps are read (a block that
/// is zeros in both is equal), each where it is in its file ([`ImageReader`]); how many were
/// read is logged.
fn differing_blocks(
    original: &(PathBuf, ImageFormat),
    over: &(PathBuf, ImageFormat),
    listed: &HashSet<u64>,
    size: u64,
    bs: u64,
    work_dir: &Path,
) -> Result<(Vec<(u64, bool)>, ImageReader)> {
    let a = ImageReader::open(original, &work_dir.join("original.raw"))?;
    let b = ImageReader::open(over, &work_dir.join("override.raw"))?;
    let mut out = Vec::new();
    let (mut da, mut db) = (vec![0u8; bs as usize], vec![0u8; bs as usize]);
    let (mut read, mut skipped) = (0u64, 0u64);
    for index in (0..size.div_ceil(bs)).filter(|i| !listed.contains(i)) {
        let off = index * bs;
        let len = bs.min(size - off) as usize;
        let (za, zb) = (
            a.zero_by_map(off, len as u64),
            b.zero_by_map(off, len as u64),
        );
        if za && zb {
            skipped += 1;
            continue;
        }
        read += 1;
        if za {
            da[..len].fill(0);
        } else {
            a.read(off, &mut da[..len])?;
        }
        if zb {
            db[..len].fill(0);
        } else {
            b.read(off, &mut db[..len])?;
        }
        if da[..len] != db[..len] {
            out.push((index, is_zero(&da[..len])));
        }
    }
    tracing::info!(
        blocks_read = read,
        blocks_zero_in_both = skipped,
        differing = out.len(),
        "restore over an override: compared the left-out blocks of the two images"
    );
    Ok((out, a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(start: u64, length: u64, depth: u64, data: bool) -> Extent {
        Extent {
            start,
            length,
            depth,
            data,
            zero: !data,
            compressed: false,
            offset: data.then_some(start),
        }
    }

    /// Blocks the backup left out are compared between the original and the override: listed
    /// blocks are skipped, bytes past the original's end count as zeros.
    #[test]
    fn blocks_where_the_override_differs_from_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let bs = 4096u64;
        let mut original = vec![7u8; 3 * bs as usize];
        original[..bs as usize].fill(0);
        let mut over = original.clone();
        over[10] = 1; // block 0: differs, the original's bytes are zeros
        over[bs as usize + 5] = 1; // block 1: differs, but the backup lists it
        over.extend(vec![9u8; bs as usize]); // block 3: past the original's end
        let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
        std::fs::write(&a, &original).unwrap();
        std::fs::write(&b, &over).unwrap();
        let listed: HashSet<u64> = [1].into();
        let (blocks, view) = differing_blocks(
            &(a.clone(), ImageFormat::Raw),
            &(b, ImageFormat::Raw),
            &listed,
            5 * bs,
            bs,
            dir.path(),
        )
        .unwrap();
        assert_eq!(blocks, [(0, true), (3, true)]);
        assert_eq!(view.path, a, "a raw original is read as it is");
    }

    /// A qcow2 original is read in place (no raw copy in the work dir), sparse raw files by
    /// their data only: blocks that are zeros in both by the maps are not read, and still equal.
    #[test]
    fn a_qcow2_original_is_compared_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let bs = 64u64 << 10;
        let mut original = vec![0u8; 8 * bs as usize];
        original[..bs as usize].fill(3); // block 0: data in both, equal
        original[2 * bs as usize..3 * bs as usize].fill(4); // block 2: differs
        let raw = dir.path().join("o.raw");
        std::fs::write(&raw, &original).unwrap();
        let qcow2 = dir.path().join("o.qcow2");
        let out = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow2)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // The override: sparse, block 0 as the original, block 2 other, block 5 data.
        let over = dir.path().join("over.raw");
        let f = std::fs::File::create(&over).unwrap();
        f.set_len(8 * bs).unwrap();
        f.write_all_at(&vec![3u8; bs as usize], 0).unwrap();
        f.write_all_at(&vec![5u8; bs as usize], 2 * bs).unwrap();
        f.write_all_at(&vec![6u8; bs as usize], 5 * bs).unwrap();
        drop(f);
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let (blocks, reader) = differing_blocks(
            &(qcow2.clone(), ImageFormat::Qcow2),
            &(over, ImageFormat::Raw),
            &HashSet::new(),
            8 * bs,
            bs,
            &work,
        )
        .unwrap();
        assert_eq!(blocks, [(2, false), (5, true)]);
        assert!(
            reader.own.is_some() && reader.path == qcow2,
            "read in place"
        );
        assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0, "no raw copy");
        // Blocks 3, 4, 6, 7 are zeros in both by the maps alone.
        assert!(reader.zero_by_map(3 * bs, bs) && !reader.zero_by_map(2 * bs, bs));
        let mut buf = vec![0u8; bs as usize];
        reader.read(2 * bs, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 4));
    }

    #[test]
    fn zero_blocks() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0u8; 10_000]));
        for at in [0, 4095, 4096, 9_999] {
            let mut v = vec![0u8; 10_000];
            v[at] = 1;
            assert!(!is_zero(&v), "{at}");
        }
    }

    #[test]
    fn candidates_table() {
        let mib = 1 << 20;
        let bs = 2 * mib;
        let map = [
            ext(0, 64 << 10, 0, false),
            ext(64 << 10, mib, 1, true),
            ext(3 * mib, mib, 0, true),
            ext(4 * mib, 4 * mib, 1, false),
        ];
        // Over a backing file: only depth 0, a block per touched range.
        assert_eq!(
            candidate_blocks(&map, true, true, 8 * mib, bs),
            [0, 1].into()
        );
        // No backing file, no image: data extents only.
        assert_eq!(
            candidate_blocks(&map, false, false, 8 * mib, bs),
            [0, 1].into()
        );
        // No backing file but an image (a full copy): everything is compared.
        assert_eq!(
            candidate_blocks(&map, false, true, 8 * mib, bs),
            [0, 1, 2, 3].into()
        );
        // Extents past the size are cut.
        assert_eq!(
            candidate_blocks(&[ext(0, 10 * mib, 0, true)], true, true, 3 * mib, bs),
            [0, 1].into()
        );
    }
}
