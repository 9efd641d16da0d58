//! The receiving side of a cross-node sync: pull a `BICSIX1` stream over HTTP into a sparse
//! file, verified by SHA-512 as it arrives.
//!
//! This module owns the transfer: the GET, the idle timeout, decoding frames as chunks arrive,
//! and a pipeline of two blocking workers fed over bounded queues, one writing each record at
//! its offset (holes stay holes) with writeback following behind ([`super::flush`]), one
//! hashing the logical content in order (the gaps between records hashed as zeros from a static
//! buffer, never read from disk). SHA-512 is the slowest stage, so it runs beside receiving and
//! writing rather than after them, and memory is bounded by the queues, whatever the image
//! size. The file at `dest` is complete, synced, verified and out of the page cache when
//! [`receive`] returns `Ok`, and gone on every error or when the future is dropped. It must not
//! retry (the caller decides, see [`SyncError::is_retryable`]), rename the file into place, or
//! log a URL's credentials or query.

use std::fs::File;
use std::io::{self, IoSlice, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
use sha2::{Digest, Sha512};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, warn};

use super::flush::with_writeback;
use super::hash::hash_zeros;
use super::wire::{Decoder, Event, WireError};
use super::{ProgressSink, RemoveOnDrop, SyncError, redact};

/// Bytes of contiguous data gathered before they are handed to the workers.
const BLOCK: u64 = 1 << 20;
/// Blocks each worker may have queued before receiving waits (back-pressure to TCP).
const QUEUE_DEPTH: usize = 8;
/// Progress is reported at most this often (and once at the end).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// A finished, verified transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveOutcome {
    /// The file's logical size.
    pub size: u64,
    /// Lower-case hex SHA-512 of the file's logical content (equal to the expected one).
    pub sha512: String,
    /// Bytes of HTTP body received: data plus framing.
    pub bytes_on_wire: u64,
    /// Bytes of file content received (the sender's data extents).
    pub data_bytes: u64,
}

/// The receiver: GETs `url` (served by a peer's [`super::extent_stream`]) into `dest`.
///
/// `dest` is created (truncated if it exists; its parent must exist) and sized to the file, so
/// holes stay holes; records are written at their offsets while the logical content is hashed
/// on a thread of its own. The stream must be well formed (records in increasing offset order,
/// within the size, the end record present: else [`SyncError::Protocol`] or
/// [`SyncError::Truncated`]) and its content must hash to `expected_sha512` (hex, any case),
/// else [`SyncError::ChecksumMismatch`] (a malformed `expected_sha512` is
/// [`SyncError::InvalidChecksum`], before anything is fetched). No byte for `idle_timeout`
/// (also the connect timeout) is [`SyncError::IdleTimeout`]. On success the file is
/// `fdatasync`ed and dropped from the page cache; on any error `dest` is removed.
pub async fn receive(
    url: &str,
    dest: &Path,
    expected_sha512: &str,
    idle_timeout: Duration,
    progress: &dyn ProgressSink,
) -> Result<ReceiveOutcome, SyncError> {
    let shown = redact(url);
    let span = tracing::info_span!("sync_receive", url = %shown, dest = %dest.display());
    async move {
        // Armed before the file exists: whatever happens from here, a failure leaves nothing.
        let mut guard = RemoveOnDrop::new(dest);
        let started = Instant::now();
        let transfer = Transfer {
            url,
            shown: &shown,
            dest,
            idle: idle_timeout,
            progress,
        };
        match transfer.run(expected_sha512).await {
            Ok(outcome) => {
                guard.disarm();
                let secs = started.elapsed().as_secs_f64();
                info!(
                    size = outcome.size,
                    data_bytes = outcome.data_bytes,
                    bytes_on_wire = outcome.bytes_on_wire,
                    sha512 = %outcome.sha512,
                    secs,
                    "sync receive done"
                );
                Ok(outcome)
            }
            Err(e) => {
                warn!(error = %e, "sync receive failed");
                Err(e)
            }
        }
    }
    .instrument(span)
    .await
}

struct Transfer<'a> {
    url: &'a str,
    shown: &'a str,
    dest: &'a Path,
    idle: Duration,
    progress: &'a dyn ProgressSink,
}

impl Transfer<'_> {
    async fn run(&self, expected_sha512: &str) -> Result<ReceiveOutcome, SyncError> {
        // Checked before any byte moves: a wrong value here would fail only after the transfer.
        if expected_sha512.len() != 128 || !expected_sha512.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SyncError::InvalidChecksum(expected_sha512.to_owned()));
        }
        let parsed = reqwest::Url::parse(self.url)
            .map_err(|e| SyncError::InvalidUrl(format!("{}: {e}", self.shown)))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(SyncError::InvalidUrl(format!(
                "{}: only http and https are supported",
                self.shown
            )));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(self.idle)
            .user_agent(concat!("bicsi-sync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SyncError::Connect(error_chain(&e)))?;

        let request = client
            .get(parsed)
            // The checksum is of the bytes as sent: no transfer compression.
            .header(reqwest::header::ACCEPT_ENCODING, "identity")
            .send();
        let response = match tokio::time::timeout(self.idle, request).await {
            Err(_) => return Err(self.idle_timeout()),
            Ok(Err(e)) if e.is_timeout() => return Err(self.idle_timeout()),
            Ok(Err(e)) => {
                return Err(SyncError::Connect(format!(
                    "GET {}: {}",
                    self.shown,
                    error_chain(&e.without_url())
                )));
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        if !status.is_success() {
            return Err(SyncError::Http {
                url: self.shown.to_owned(),
                status: status.as_u16(),
            });
        }

        // Created only once the sender has answered, so a refused request touches no disk.
        let dest = self.dest.to_path_buf();
        let file = tokio::task::spawn_blocking(move || File::create(dest))
            .await
            .map_err(|e| self.io("creating", io::Error::other(e)))?
            .map_err(|e| self.io("creating", e))?;
        let mut pipe = Pipe::start(file);
        let mut decoder = Decoder::default();
        let mut events = Vec::new();
        let mut body = response.bytes_stream();
        let mut on_wire = 0u64;
        let mut size = None;
        let mut done = 0u64;
        let mut last_progress: Option<Instant> = None;
        loop {
            let chunk = match tokio::time::timeout(self.idle, body.next()).await {
                Err(_) => return Err(self.idle_timeout()),
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(SyncError::Truncated(format!(
                        "{}: the connection broke after {on_wire} bytes: {}",
                        self.shown,
                        error_chain(&e.without_url())
                    )));
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            on_wire += chunk.len() as u64;
            decoder
                .feed(chunk, &mut events)
                .map_err(|e| self.wire_error(e))?;
            for event in events.drain(..) {
                match &event {
                    Event::Start { size: s } => size = Some(*s),
                    Event::Data { offset, bytes } => done = offset + bytes.len() as u64,
                    Event::End => done = size.unwrap_or(done),
                }
                pipe.event(event).await.map_err(|e| self.io("writing", e))?;
            }
            if last_progress.is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL) {
                self.progress.progress(done, size);
                last_progress = Some(Instant::now());
            }
        }
        decoder.finish().map_err(|e| self.wire_error(e))?;
        let size = size.expect("a finished stream has a header");

        let (file, sha512, data_bytes) = pipe.finish().await.map_err(|e| self.io("writing", e))?;
        let expected = expected_sha512.to_ascii_lowercase();
        if sha512 != expected {
            return Err(SyncError::ChecksumMismatch {
                expected,
                got: sha512,
            });
        }
        let dest = self.dest.to_path_buf();
        tokio::task::spawn_blocking(move || settle(&file, &dest, size))
            .await
            .map_err(|e| self.io("syncing", io::Error::other(e)))?
            .map_err(|e| self.io("syncing", e))?;
        self.progress.progress(size, Some(size));
        Ok(ReceiveOutcome {
            size,
            sha512,
            bytes_on_wire: on_wire,
            data_bytes,
        })
    }

    fn io(&self, what: &str, e: io::Error) -> SyncError {
        SyncError::io(what, self.dest, e)
    }

    fn idle_timeout(&self) -> SyncError {
        SyncError::IdleTimeout {
            url: self.shown.to_owned(),
            idle: self.idle,
        }
    }

    fn wire_error(&self, e: WireError) -> SyncError {
        match e {
            WireError::Protocol(m) => SyncError::Protocol(format!("GET {}: {m}", self.shown)),
            WireError::Truncated(m) => SyncError::Truncated(format!("{}: {m}", self.shown)),
        }
    }
}

/// `fdatasync`, check the size, then drop the file's pages from the page cache.
fn settle(file: &File, path: &Path, size: u64) -> io::Result<()> {
    file.sync_data()?;
    let on_disk = file.metadata()?.len();
    if on_disk != size {
        return Err(io::Error::other(format!(
            "{} is {on_disk} bytes after receiving {size}",
            path.display()
        )));
    }
    // Advice only: the pages are clean now, so dropping them cannot lose data.
    if let Err(e) = posix_fadvise(file, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED) {
        debug!(error = %e, "posix_fadvise(DONTNEED) failed; page cache left to the kernel");
    }
    Ok(())
}

/// A run of contiguous file content, as the pieces that arrived, shared by both workers.
type Block = Arc<[Bytes]>;

enum HashMsg {
    Zeros(u64),
    Data(Block),
}

enum WriteMsg {
    SetLen(u64),
    Write { offset: u64, block: Block },
}

/// Gathers data events into blocks and hands them to the writer and the hasher.
struct Pipe {
    pending: Vec<Bytes>,
    pending_offset: u64,
    pending_len: u64,
    size: u64,
    /// The logical offset the hasher has been given everything up to.
    hashed_to: u64,
    data_bytes: u64,
    hash_tx: mpsc::Sender<HashMsg>,
    write_tx: mpsc::Sender<WriteMsg>,
    hasher: Option<JoinHandle<Sha512>>,
    writer: Option<JoinHandle<io::Result<File>>>,
}

impl Pipe {
    fn start(file: File) -> Self {
        let (hash_tx, hash_rx) = mpsc::channel(QUEUE_DEPTH);
        let (write_tx, write_rx) = mpsc::channel(QUEUE_DEPTH);
        Pipe {
            pending: Vec::new(),
            pending_offset: 0,
            pending_len: 0,
            size: 0,
            hashed_to: 0,
            data_bytes: 0,
            hash_tx,
            write_tx,
            hasher: Some(tokio::task::spawn_blocking(move || hash_worker(hash_rx))),
            writer: Some(tokio::task::spawn_blocking(move || {
                write_worker(file, write_rx)
            })),
        }
    }

    /// Takes the decoder's events in order (the decoder has checked them).
    async fn event(&mut self, event: Event) -> io::Result<()> {
        match event {
            Event::Start { size } => {
                self.size = size;
                self.send_writer(WriteMsg::SetLen(size)).await
            }
            Event::Data { offset, bytes } => {
                if self.pending_len > 0 && offset != self.pending_offset + self.pending_len {
                    self.flush().await?;
                }
                if self.pending_len == 0 {
                    self.pending_offset = offset;
                }
                self.pending_len += bytes.len() as u64;
                self.data_bytes += bytes.len() as u64;
                self.pending.push(bytes);
                if self.pending_len >= BLOCK {
                    self.flush().await?;
                }
                Ok(())
            }
            Event::End => {
                self.flush().await?;
                let tail = self.size - self.hashed_to;
                self.hashed_to = self.size;
                if tail > 0 {
                    self.send_hasher(HashMsg::Zeros(tail)).await?;
                }
                Ok(())
            }
        }
    }

    /// Stops the workers; returns the file (not yet synced), the lower-case hex SHA-512 of
    /// everything hashed, and the data bytes received.
    async fn finish(mut self) -> io::Result<(File, String, u64)> {
        self.flush().await?;
        let Pipe {
            hash_tx,
            write_tx,
            hasher,
            writer,
            data_bytes,
            ..
        } = self;
        drop((hash_tx, write_tx));
        let file = join(writer.expect("writer joined once")).await??;
        let digest = join(hasher.expect("hasher joined once")).await?.finalize();
        Ok((file, hex::encode(digest), data_bytes))
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.pending_len == 0 {
            return Ok(());
        }
        let block: Block = std::mem::take(&mut self.pending).into();
        let (offset, len) = (self.pending_offset, self.pending_len);
        self.pending_len = 0;
        // Both workers share the block's buffers: the bytes are in memory once.
        self.send_writer(WriteMsg::Write {
            offset,
            block: block.clone(),
        })
        .await?;
        let gap = offset - self.hashed_to;
        if gap > 0 {
            self.send_hasher(HashMsg::Zeros(gap)).await?;
        }
        self.hashed_to = offset + len;
        self.send_hasher(HashMsg::Data(block)).await
    }

    async fn send_writer(&mut self, msg: WriteMsg) -> io::Result<()> {
        if self.write_tx.send(msg).await.is_err() {
            return Err(self.worker_died().await);
        }
        Ok(())
    }

    async fn send_hasher(&mut self, msg: HashMsg) -> io::Result<()> {
        if self.hash_tx.send(msg).await.is_err() {
            return Err(self.worker_died().await);
        }
        Ok(())
    }

    /// A queue was closed: a worker stopped early. The writer stops on an I/O error (a full
    /// disk, say), which is the one worth reporting; otherwise something panicked.
    async fn worker_died(&mut self) -> io::Error {
        if let Some(writer) = self.writer.take() {
            match join(writer).await {
                Ok(Err(e)) | Err(e) => return e,
                Ok(Ok(_)) => {}
            }
        }
        io::Error::other("sync receive worker stopped unexpectedly")
    }
}

async fn join<T>(handle: JoinHandle<T>) -> io::Result<T> {
    handle
        .await
        .map_err(|e| io::Error::other(format!("sync receive worker failed: {e}")))
}

fn hash_worker(mut rx: mpsc::Receiver<HashMsg>) -> Sha512 {
    let mut hasher = Sha512::new();
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            HashMsg::Zeros(n) => hash_zeros(&mut hasher, n),
            HashMsg::Data(block) => block.iter().for_each(|b| hasher.update(b)),
        }
    }
    hasher
}

fn write_worker(file: File, mut rx: mpsc::Receiver<WriteMsg>) -> io::Result<File> {
    with_writeback(&file, |writeback| {
        while let Some(msg) = rx.blocking_recv() {
            match msg {
                // Sized up front: the gaps between records stay holes, and the file has its
                // full length even when it ends in one.
                WriteMsg::SetLen(size) => file.set_len(size)?,
                WriteMsg::Write { offset, block } => {
                    let len = write_block(&file, offset, &block)?;
                    writeback.wrote(offset, len);
                }
            }
        }
        Ok(())
    })?;
    Ok(file)
}

/// Writes the block's pieces at `offset` with `writev` (this thread owns the file position).
fn write_block(mut file: &File, offset: u64, block: &[Bytes]) -> io::Result<u64> {
    file.seek(SeekFrom::Start(offset))?;
    let mut slices: Vec<IoSlice<'_>> = block.iter().map(|b| IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    let mut written = 0u64;
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n as u64;
                IoSlice::advance_slices(&mut rest, n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// An error and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}
