//! The upload data source: a file streamed to the HTTP API becomes the image's first file.
//!
//! The body is never held whole: its chunks go over a bounded queue to a blocking writer that
//! hashes them (SHA-512, and the chunk manifest from the same bytes) and writes them to `<disk>/tmp/<name>-<uuid>.part`, leaving all-zero
//! 64 KiB chunks as holes, then `fdatasync`s. The file then goes through the same checks as any
//! first file ([`FileManagers::finish_file`]: probe, checksum, rename). A body that breaks off
//! fails the file ("upload interrupted"), removes the temp file, and a new upload starts over:
//! an uploaded image is never retried by bicsi itself.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha512};
use tokio_util::sync::CancellationToken;

use super::{FileManagers, FileReport, ReadyFile};
use crate::error::{Error, Result};
use crate::model::Disk;
use crate::model::SourceType;
use crate::model::checksum;
use crate::model::file_state::FileState;
use crate::sync::manifest::{CHUNK_SIZE, Manifest, ManifestBuilder};

/// Chunks queued for the writer before the receiver waits (back-pressure to the client).
const QUEUE_DEPTH: usize = 8;
/// The writer gathers this much before writing, so zero chunks can be found at fixed offsets.
const BLOCK: usize = 1 << 20;
/// Aligned chunks of this size that hold only zeros are not written: they stay holes.
const HOLE_CHUNK: usize = 64 * 1024;

/// What the caller of an upload says about it.
#[derive(Clone, Debug, Default)]
pub struct UploadRequest {
    /// The body's length (Content-Length), when the client said.
    pub length: Option<u64>,
    /// The SHA-512 the client expects (lower-case hex, validated), besides the image's own.
    pub checksum: Option<String>,
}

/// Validates a SHA-512 given by a user: 128 hex digits, returned lower-case.
pub fn parse_checksum(text: &str, what: &str) -> Result<String> {
    checksum::normalize_sha512(text).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{what} {text:?} is not a SHA-512 checksum (128 hex digits, as `shasum -a 512 FILE` prints)"
        ))
    })
}

/// Frees the upload slot and the disk manager's task entry when the upload ends, however.
struct Slot {
    files: Arc<FileManagers>,
    name: String,
    disk: Option<Disk>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(d) = &self.disk {
            let m = self.files.manager(d);
            m.tasks.lock().expect("tasks poisoned").remove(&self.name);
        }
        self.files
            .uploads
            .lock()
            .expect("uploads poisoned")
            .remove(&self.name);
    }
}

/// Removes the temp file unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl FileManagers {
    /// Receives the image's first file from `body`, on the local disk with the most free space.
    /// Returns the ready file. Errors are also reported as the file's failed state (except when
    /// the image was deleted meanwhile); a concurrent upload of the same image is `Aborted`.
    pub async fn upload<S, E>(
        self: &Arc<Self>,
        name: &str,
        body: S,
        req: UploadRequest,
    ) -> Result<ReadyFile>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin + 'static,
        E: std::fmt::Display,
    {
        let bi = self.image(name)?;
        if bi.spec.source_type != SourceType::Upload {
            return Err(Error::FailedPrecondition(format!(
                "backing image {name:?} has source type {}: only an image created with sourceType upload takes an upload",
                bi.spec.source_type.as_str()
            )));
        }
        if let Some(c) = &req.checksum
            && !bi.status.checksum.is_empty()
            && *c != bi.status.checksum
        {
            return Err(Error::FailedPrecondition(format!(
                "backing image {name:?}: the upload's checksum {c} differs from the image's {}; no file can match both",
                bi.status.checksum
            )));
        }
        if bi.has_ready_file() {
            return Err(Error::FailedPrecondition(format!(
                "backing image {name:?} already has a ready file; to upload another file, delete the image and create it again"
            )));
        }
        if !self
            .uploads
            .lock()
            .expect("uploads poisoned")
            .insert(name.to_string())
        {
            return Err(Error::Aborted(format!(
                "backing image {name:?} is being uploaded already; wait for that upload to finish or fail"
            )));
        }
        let mut slot = Slot {
            files: self.clone(),
            name: name.to_string(),
            disk: None,
        };
        let disk = self.upload_disk(req.length)?;
        let cancel = CancellationToken::new();
        {
            let m = self.manager(&disk);
            let mut tasks = m.tasks.lock().expect("tasks poisoned");
            if tasks.contains_key(name) {
                return Err(Error::Aborted(format!(
                    "backing image {name:?} has work running on disk {} already; retry when it ends",
                    disk.id
                )));
            }
            tasks.insert(name.to_string(), cancel.clone());
        }
        slot.disk = Some(disk.clone());
        let result = self.receive(name, &disk, body, &req, &cancel).await;
        match result {
            Ok(ready) => Ok(ready),
            Err(e) => {
                if !cancel.is_cancelled() {
                    tracing::warn!(image = %name, disk = %disk.id, error = %e, "upload failed");
                    let _ = self
                        .report(
                            name,
                            &disk,
                            FileReport::new(FileState::Failed, 0, e.to_string()),
                        )
                        .await;
                }
                Err(e)
            }
        }
    }

    /// This node's disk with the most free space, which must hold `length` bytes when known.
    fn upload_disk(&self, length: Option<u64>) -> Result<Disk> {
        let mut best: Option<(u64, &Disk)> = None;
        for d in &self.disks {
            let free = crate::disks::free_bytes(&d.path)?;
            if best.is_none_or(|(f, _)| free > f) {
                best = Some((free, d));
            }
        }
        let (free, disk) = best.ok_or_else(|| {
            Error::ResourceExhausted(
                "no disks to hold backing images; start bicsi with --disk PATH".into(),
            )
        })?;
        if let Some(len) = length
            && len > free
        {
            return Err(Error::ResourceExhausted(format!(
                "the upload is {} but disk {} has {} free",
                crate::quantity::human(len),
                disk.id,
                crate::quantity::human(free)
            )));
        }
        Ok(disk.clone())
    }

    async fn receive<S, E>(
        &self,
        name: &str,
        disk: &Disk,
        mut body: S,
        req: &UploadRequest,
        cancel: &CancellationToken,
    ) -> Result<ReadyFile>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin + 'static,
        E: std::fmt::Display,
    {
        let bi = self.image(name)?;
        let mut transfer = crate::counters::Transfer::start(crate::counters::TransferKind::Upload);
        // A failed earlier attempt on this disk starts over (failed → pending).
        self.report(
            name,
            disk,
            FileReport::new(FileState::Pending, 0, "waiting for the upload"),
        )
        .await?;
        self.report(
            name,
            disk,
            FileReport::new(FileState::Starting, 0, "receiving the upload"),
        )
        .await?;
        let tmp = disk.image_tmp(&bi);
        let mut guard = RemoveOnDrop(Some(tmp.clone()));
        let file = open_tmp(&tmp)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUE_DEPTH);
        let writer = tokio::task::spawn_blocking(move || write_worker(file, rx));
        let message = |received: u64| match req.length {
            Some(total) => format!(
                "uploading: {} of {}",
                crate::quantity::human(received),
                crate::quantity::human(total)
            ),
            None => format!("uploading: {} received", crate::quantity::human(received)),
        };
        let percent = |received: u64| match req.length {
            Some(t) if t > 0 => (received.saturating_mul(100) / t).min(99) as u8,
            _ => 0,
        };
        self.report(
            name,
            disk,
            FileReport::new(FileState::InProgress, 0, message(0)),
        )
        .await?;
        let mut received = 0u64;
        let mut tick = tokio::time::interval(super::progress::PROGRESS_INTERVAL);
        tick.tick().await;
        let interrupted = |received: u64, why: String| {
            Error::Aborted(format!(
                "upload interrupted after {received} bytes ({why}); upload again"
            ))
        };
        let outcome: Result<()> = loop {
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    break Err(Error::Aborted(format!("the upload of backing image {name:?} was cancelled: the image is being deleted")));
                }
                _ = tick.tick() => {
                    let _ = self
                        .report(name, disk, FileReport::new(FileState::InProgress, percent(received), message(received)))
                        .await;
                    continue;
                }
                next = body.next() => next,
            };
            match next {
                None => break Ok(()),
                Some(Err(e)) => break Err(interrupted(received, e.to_string())),
                Some(Ok(chunk)) => {
                    received += chunk.len() as u64;
                    if let Some(len) = req.length
                        && received > len
                    {
                        break Err(Error::InvalidArgument(format!(
                            "the upload sent more than its Content-Length of {len} bytes"
                        )));
                    }
                    if tx.send(chunk).await.is_err() {
                        // The writer stopped: its error is reported below.
                        break Ok(());
                    }
                }
            }
        };
        drop(tx);
        let written = writer
            .await
            .map_err(|e| Error::Internal(format!("upload writer failed: {e}")))?;
        outcome?;
        let (sha512, size, manifest) = written.map_err(|e| io_error(&tmp, e))?;
        if size != received {
            return Err(Error::Internal(format!(
                "upload: {size} bytes written of {received} received"
            )));
        }
        if let Some(len) = req.length
            && received != len
        {
            return Err(interrupted(
                received,
                format!("the body ended before its Content-Length of {len} bytes"),
            ));
        }
        if let Some(expected) = &req.checksum
            && !checksum::matches(expected, &sha512)
        {
            crate::counters::checksum_failure("upload");
            return Err(Error::FailedPrecondition(format!(
                "backing image {name:?}: checksum mismatch: expected {expected}, got {sha512}; the upload is corrupt or the checksum is wrong: upload again"
            )));
        }
        self.report(
            name,
            disk,
            FileReport::new(FileState::InProgress, 99, "checking the uploaded file"),
        )
        .await?;
        // finish_file removes the temp file itself when it refuses it, and renames it when not.
        guard.0 = None;
        let r = self
            .finish_file(name, disk, &tmp, sha512.clone(), size, Some(manifest))
            .await;
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r?;
        transfer.moved(size);
        transfer.ok(size);
        let bi = self.image(name)?;
        Ok(ReadyFile {
            size: bi.status.size,
            virtual_size: bi.status.virtual_size,
            format: bi.status.format.clone(),
            checksum: sha512,
        })
    }
}

fn io_error(path: &Path, e: io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        Error::ResourceExhausted(format!(
            "disk full: no space left to write {}; free space on that disk and upload again",
            path.display()
        ))
    } else {
        Error::Internal(format!("upload: {}: {e}", path.display()))
    }
}

fn open_tmp(path: &Path) -> Result<std::fs::File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io_error(path, e))
}

/// Hashes and writes every chunk in order; returns the hex SHA-512, the bytes written and the
/// manifest built from the same bytes.
fn write_worker(
    file: std::fs::File,
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> io::Result<(String, u64, Manifest)> {
    let mut hasher = Sha512::new();
    let mut builder = ManifestBuilder::new(CHUNK_SIZE);
    let mut buf = BytesMut::with_capacity(BLOCK);
    let mut offset = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        hasher.update(&chunk);
        builder.update(&chunk);
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            let take = (BLOCK - buf.len()).min(rest.len());
            buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if buf.len() == BLOCK {
                write_block(&file, offset, &buf)?;
                offset += buf.len() as u64;
                buf.clear();
            }
        }
    }
    write_block(&file, offset, &buf)?;
    offset += buf.len() as u64;
    // Zero chunks at the end were skipped: the length covers them.
    file.set_len(offset)?;
    file.sync_data()?;
    let _ = nix::fcntl::posix_fadvise(
        &file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    let sha512 = hex::encode(hasher.finalize());
    let manifest = builder.finish(&sha512);
    Ok((sha512, offset, manifest))
}

/// Writes `buf` at `offset` (a multiple of [`BLOCK`]), skipping its all-zero chunks.
fn write_block(file: &std::fs::File, offset: u64, buf: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    for (i, piece) in buf.chunks(HOLE_CHUNK).enumerate() {
        if piece.iter().all(|b| *b == 0) {
            continue;
        }
        file.write_all_at(piece, offset + (i * HOLE_CHUNK) as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_validated_and_lowered() {
        let good = "AB".repeat(64);
        assert_eq!(parse_checksum(&good, "x").unwrap(), "ab".repeat(64));
        let e = parse_checksum("abc", "X-Bicsi-Checksum").unwrap_err();
        assert!(e.to_string().contains("128 hex digits"), "{e}");
    }

    #[test]
    fn zero_chunks_stay_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = open_tmp(&path).unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut data = vec![0u8; 3 * BLOCK + 100];
        data[BLOCK + 5] = 7;
        data[3 * BLOCK + 99] = 1;
        let sent = data.clone();
        let sender = std::thread::spawn(move || {
            for c in sent.chunks(12345) {
                tx.blocking_send(Bytes::copy_from_slice(c)).unwrap();
            }
        });
        let (sha, size, manifest) = write_worker(file, rx).unwrap();
        sender.join().unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(sha, hex::encode(Sha512::digest(&data)));
        assert_eq!(std::fs::read(&path).unwrap(), data);
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(allocated < BLOCK as u64, "{allocated} bytes allocated");
        // The manifest built while writing is the one a verification of the file builds.
        use crate::sync::manifest::Chunk;
        let kinds: Vec<bool> = manifest.chunks.iter().map(|c| *c == Chunk::Zero).collect();
        assert_eq!(kinds, [true, false, true, false]);
        assert_eq!(manifest.sha512, sha);
        assert_eq!(crate::sync::hash_sparse(&path).unwrap(), (sha, manifest));
    }
}
