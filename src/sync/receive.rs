//! The receiving side of a cross-node sync: pull a `BICSIX1` stream over HTTP into a sparse
//! file, verified as it arrives, chunk by chunk against the image's manifest or by SHA-512.
//!
//! This module owns the transfer: the manifest's GET and its checks, the stream's GET, the idle
//! timeout, decoding frames as chunks arrive, and a pipeline of blocking workers fed over
//! bounded queues: one writes each record at its offset (holes stay holes) with writeback
//! following behind ([`super::flush`]); the others see the logical content in order (the gaps
//! between records as zeros from a static buffer, never read from disk). With a manifest whose
//! SHA-512 is the expected one, one worker checks every chunk against it (SHA-256 of the data
//! chunks; "zero" chunks must arrive as holes or zeros). Without one (none served, or one that
//! fails its checks), one worker hashes SHA-512, the slowest stage, and another builds the
//! manifest from the same bytes, so the received file can be sent on later. Either way the
//! checks run beside receiving and writing rather than after them, and memory is bounded by the
//! queues, whatever the image size. The file at `dest` is complete, synced, verified and out of the page cache when
//! [`receive`] returns `Ok`, and gone on every error or when the future is dropped. It must not
//! retry (the caller decides, see [`SyncError::is_retryable`]), rename the file into place, or
//! log a URL's credentials or query.

use std::fs::File;
use std::io::{self, IoSlice};
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

use super::flush::{Pages, with_writeback};
use super::hash::hash_zeros;
use super::manifest::{
    CHUNK_SIZE, ChunkChecker, ChunkMismatch, MAX_MANIFEST_BYTES, Manifest, ManifestBuilder,
};
use super::wire::{Decoder, Event, WireError};
use super::{ProgressSink, RemoveOnDrop, SyncError};
use crate::messages::{error_chain, redact_text};

/// Bytes of contiguous data gathered before they are handed to the workers: 256 KiB, so the
/// queues below hold about a megabyte (measured on `bench/run --path sync-cross`, 1 GiB sparse
/// image: the receiving node agent's malloc heap peaked at 8.0 MiB with 1 MiB blocks and at
/// 4.1 MiB with these).
const BLOCK: u64 = 256 << 10;
/// Blocks each worker may have queued before receiving waits (back-pressure to TCP). The blocks
/// are shared, so memory follows the slowest worker's queue, and the disk still has blocks
/// queued while the network waits.
const QUEUE_DEPTH: usize = 4;
/// Progress is reported at most this often (and once at the end).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// How a transfer was verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// Chunk by chunk against the sender's manifest, whose SHA-512 is the expected one.
    Manifest,
    /// By the SHA-512 of the whole content; `why` says why the manifest was not used.
    Sha512 { why: String },
}

/// A finished, verified transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveOutcome {
    /// The file's logical size.
    pub size: u64,
    /// Lower-case hex SHA-512 of the file's logical content (equal to the expected one).
    pub sha512: String,
    /// Bytes of the stream's HTTP body received: data plus framing.
    pub bytes_on_wire: u64,
    /// Bytes of the manifest's HTTP body received (0 without one).
    pub manifest_bytes: u64,
    /// Bytes of file content received (the sender's data extents).
    pub data_bytes: u64,
    pub verified: Verified,
    /// The file's manifest: the sender's, which every chunk matched, or the one built from the
    /// bytes whose SHA-512 matched. Its SHA-512 is the expected one: write it beside the file.
    pub manifest: Manifest,
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
    receive_with(
        url,
        None,
        dest,
        expected_sha512,
        idle_timeout,
        progress,
        None,
    )
    .await
}

/// [`receive`], verified chunk by chunk against the manifest at `manifest_url` (served by the
/// same peer, see [`super::manifest`]) when it is sealed, well formed and names
/// `expected_sha512`: a chunk that differs from it is [`SyncError::ChunkMismatch`] naming the
/// chunk's offset, as soon as the chunk is complete. A manifest that is missing (any non-success
/// answer), unreadable or fails a check is logged and the transfer is verified by SHA-512 as
/// [`receive`] does; so is one whose size is not the stream's.
pub async fn receive_with_manifest(
    url: &str,
    manifest_url: &str,
    dest: &Path,
    expected_sha512: &str,
    idle_timeout: Duration,
    progress: &dyn ProgressSink,
) -> Result<ReceiveOutcome, SyncError> {
    receive_with(
        url,
        Some(manifest_url),
        dest,
        expected_sha512,
        idle_timeout,
        progress,
        None,
    )
    .await
}

/// [`receive_with_manifest`] from another node's transfer listener: with `tls` (the cluster's
/// mutual TLS, [`crate::tls`]) both GETs present this node's certificate, check the peer's, and
/// a plain `http://` URL is refused.
pub async fn receive_from_peer(
    url: &str,
    manifest_url: &str,
    dest: &Path,
    expected_sha512: &str,
    idle_timeout: Duration,
    progress: &dyn ProgressSink,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<ReceiveOutcome, SyncError> {
    receive_with(
        url,
        Some(manifest_url),
        dest,
        expected_sha512,
        idle_timeout,
        progress,
        tls,
    )
    .await
}

async fn receive_with(
    url: &str,
    manifest_url: Option<&str>,
    dest: &Path,
    expected_sha512: &str,
    idle_timeout: Duration,
    progress: &dyn ProgressSink,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<ReceiveOutcome, SyncError> {
    let shown = redact_text(url);
    let span = tracing::info_span!("sync_receive", url = %shown, dest = %dest.display());
    async move {
        // Armed before the file exists: whatever happens from here, a failure leaves nothing.
        let mut guard = RemoveOnDrop::new(dest);
        let started = Instant::now();
        let transfer = Transfer {
            url,
            manifest_url,
            shown: &shown,
            dest,
            idle: idle_timeout,
            progress,
            tls,
        };
        match transfer.run(expected_sha512).await {
            Ok(outcome) => {
                guard.disarm();
                let secs = started.elapsed().as_secs_f64();
                info!(
                    size = outcome.size,
                    data_bytes = outcome.data_bytes,
                    bytes_on_wire = outcome.bytes_on_wire,
                    manifest_bytes = outcome.manifest_bytes,
                    verified = ?outcome.verified,
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
    manifest_url: Option<&'a str>,
    shown: &'a str,
    dest: &'a Path,
    idle: Duration,
    progress: &'a dyn ProgressSink,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Transfer<'_> {
    async fn run(&self, expected_sha512: &str) -> Result<ReceiveOutcome, SyncError> {
        // Checked before any byte moves: a wrong value here would fail only after the transfer.
        if crate::model::checksum::normalize_sha512(expected_sha512).is_none() {
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
        let mut client = reqwest::Client::builder();
        if let Some(tls) = &self.tls {
            client = client
                .tls_backend_preconfigured((**tls).clone())
                .https_only(true);
        }
        let client = client
            .connect_timeout(self.idle)
            .user_agent(concat!("bicsi-sync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SyncError::Connect(error_chain(&e)))?;
        let expected = expected_sha512.to_ascii_lowercase();
        let (check, manifest_bytes) = match self.manifest_url {
            Some(m) => match self.fetch_manifest(&client, m, &expected).await {
                Ok((manifest, bytes)) => (Check::Manifest(Arc::new(manifest)), bytes),
                Err((why, bytes)) => {
                    warn!(manifest = %redact_text(m), %why, "not using the sender's manifest; verifying the whole SHA-512");
                    (Check::Sha512 { why }, bytes)
                }
            },
            None => (
                Check::Sha512 {
                    why: "no manifest was asked for".into(),
                },
                0,
            ),
        };

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
        let body_started = Instant::now();
        let mut pipe = Pipe::start(file, &check);
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
                    Event::Start { size: s } => {
                        if let Check::Manifest(m) = &check
                            && m.size != *s
                        {
                            return Err(self.chunk_error(ChunkMismatch {
                                offset: m.size.min(*s),
                                len: m.size.abs_diff(*s),
                                detail: format!(
                                    "the sender's stream is of a {s}-byte file, the image's \
                                     manifest says {}",
                                    m.size
                                ),
                            }));
                        }
                        size = Some(*s)
                    }
                    Event::Data { offset, bytes } => done = offset + bytes.len() as u64,
                    Event::End => done = size.unwrap_or(done),
                }
                pipe.event(event).await.map_err(|e| self.pipe_error(e))?;
            }
            if last_progress.is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL) {
                self.progress.progress(done, size);
                last_progress = Some(Instant::now());
            }
        }
        decoder.finish().map_err(|e| self.wire_error(e))?;
        let size = size.expect("a finished stream has a header");
        let body_done = Instant::now();

        let (file, verdict, data_bytes) = pipe.finish().await.map_err(|e| self.pipe_error(e))?;
        let (sha512, verified, manifest) = match (verdict, check) {
            (Verdict::Checked, Check::Manifest(m)) => {
                (expected, Verified::Manifest, Arc::unwrap_or_clone(m))
            }
            (Verdict::Hashed { sha512, builder }, Check::Sha512 { why }) => {
                if !crate::model::checksum::matches(&expected, &sha512) {
                    return Err(SyncError::ChecksumMismatch {
                        expected,
                        got: sha512,
                    });
                }
                let manifest = builder.finish(&sha512);
                (sha512, Verified::Sha512 { why }, manifest)
            }
            _ => unreachable!("the pipe verifies the way it was started"),
        };
        let checked = Instant::now();
        let dest = self.dest.to_path_buf();
        tokio::task::spawn_blocking(move || settle(&file, &dest, size))
            .await
            .map_err(|e| self.io("syncing", io::Error::other(e)))?
            .map_err(|e| self.io("syncing", e))?;
        // Where the time went: the body (receiving, bounded by the slowest worker through the
        // queues), the wait for the workers after the body's end, and the final sync.
        info!(
            body_secs = (body_done - body_started).as_secs_f64(),
            check_wait_secs = (checked - body_done).as_secs_f64(),
            settle_secs = checked.elapsed().as_secs_f64(),
            "sync receive stages"
        );
        self.progress.progress(size, Some(size));
        Ok(ReceiveOutcome {
            size,
            sha512,
            bytes_on_wire: on_wire,
            manifest_bytes,
            data_bytes,
            verified,
            manifest,
        })
    }

    /// GETs and checks the sender's manifest; on any failure, why (and the bytes received), for
    /// the log: the transfer then falls back to the whole SHA-512.
    async fn fetch_manifest(
        &self,
        client: &reqwest::Client,
        url: &str,
        expected: &str,
    ) -> Result<(Manifest, u64), (String, u64)> {
        let shown = redact_text(url);
        let fetch = async {
            let mut response = client
                .get(url)
                .header(reqwest::header::ACCEPT_ENCODING, "identity")
                .send()
                .await
                .map_err(|e| (format!("GET {shown}: {}", error_chain(&e.without_url())), 0))?;
            if !response.status().is_success() {
                return Err((
                    format!("GET {shown}: HTTP {}", response.status().as_u16()),
                    0,
                ));
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| {
                let e = error_chain(&e.without_url());
                (format!("GET {shown}: {e}"), body.len() as u64)
            })? {
                body.extend_from_slice(&chunk);
                if body.len() as u64 > MAX_MANIFEST_BYTES {
                    return Err((
                        format!("{shown} is larger than {MAX_MANIFEST_BYTES} bytes"),
                        body.len() as u64,
                    ));
                }
            }
            Ok(body)
        };
        // One bound for the whole manifest: it is small.
        let body = tokio::time::timeout(self.idle, fetch)
            .await
            .map_err(|_| (format!("GET {shown}: no answer in {:?}", self.idle), 0))??;
        let bytes = body.len() as u64;
        let manifest = Manifest::parse(&body)
            .map_err(|why| (format!("the manifest at {shown} is invalid: {why}"), bytes))?;
        if !crate::model::checksum::matches(expected, &manifest.sha512) {
            return Err((
                format!(
                    "the manifest at {shown} is of content with SHA-512 {}, not the expected {expected}",
                    manifest.sha512
                ),
                bytes,
            ));
        }
        Ok((manifest, bytes))
    }

    fn io(&self, what: &str, e: io::Error) -> SyncError {
        SyncError::io(what, self.dest, e)
    }

    fn pipe_error(&self, e: PipeError) -> SyncError {
        match e {
            PipeError::Io(e) => self.io("writing", e),
            PipeError::Chunk(c) => self.chunk_error(c),
        }
    }

    fn chunk_error(&self, c: ChunkMismatch) -> SyncError {
        SyncError::ChunkMismatch {
            dest: self.dest.display().to_string(),
            offset: c.offset,
            len: c.len,
            detail: c.detail,
        }
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

/// A run of contiguous file content, as the pieces that arrived, shared by all workers.
type Block = Arc<[Bytes]>;

#[derive(Clone)]
enum HashMsg {
    Zeros(u64),
    Data(Block),
}

/// How the content is checked.
enum Check {
    Manifest(Arc<Manifest>),
    Sha512 { why: String },
}

/// What the checking workers found, once they all finished.
enum Verdict {
    /// Every chunk matched the manifest.
    Checked,
    /// The content's SHA-512 (not yet compared) and its manifest, built in the same pass.
    Hashed {
        sha512: String,
        builder: ManifestBuilder,
    },
}

/// Why the pipe stopped.
enum PipeError {
    /// Writing failed, or a worker died.
    Io(io::Error),
    /// A chunk did not match the manifest.
    Chunk(ChunkMismatch),
}

impl From<io::Error> for PipeError {
    fn from(e: io::Error) -> Self {
        PipeError::Io(e)
    }
}

/// A worker that sees the logical content in order.
enum Checker {
    Chunks(JoinHandle<Result<(), ChunkMismatch>>),
    Sha512(JoinHandle<Sha512>),
    Build(JoinHandle<ManifestBuilder>),
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
    /// One queue per checking worker, in the order of `checkers`.
    hash_tx: Vec<mpsc::Sender<HashMsg>>,
    write_tx: mpsc::Sender<WriteMsg>,
    checkers: Vec<Checker>,
    writer: Option<JoinHandle<io::Result<File>>>,
}

impl Pipe {
    fn start(file: File, check: &Check) -> Self {
        let (write_tx, write_rx) = mpsc::channel(QUEUE_DEPTH);
        let mut hash_tx = Vec::new();
        let mut checkers = Vec::new();
        let mut queue = || {
            let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
            hash_tx.push(tx);
            rx
        };
        match check {
            Check::Manifest(m) => {
                let (rx, m) = (queue(), m.clone());
                checkers.push(Checker::Chunks(tokio::task::spawn_blocking(move || {
                    check_worker(rx, &m)
                })));
            }
            Check::Sha512 { .. } => {
                // Two threads: SHA-512 is the slowest stage and gets one to itself.
                let rx = queue();
                checkers.push(Checker::Sha512(tokio::task::spawn_blocking(move || {
                    hash_worker(rx)
                })));
                let rx = queue();
                checkers.push(Checker::Build(tokio::task::spawn_blocking(move || {
                    build_worker(rx)
                })));
            }
        }
        Pipe {
            pending: Vec::new(),
            pending_offset: 0,
            pending_len: 0,
            size: 0,
            hashed_to: 0,
            data_bytes: 0,
            hash_tx,
            write_tx,
            checkers,
            writer: Some(tokio::task::spawn_blocking(move || {
                write_worker(file, write_rx)
            })),
        }
    }

    /// Takes the decoder's events in order (the decoder has checked them).
    async fn event(&mut self, event: Event) -> Result<(), PipeError> {
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

    /// Stops the workers; returns the file (not yet synced), what the checking workers found,
    /// and the data bytes received.
    async fn finish(mut self) -> Result<(File, Verdict, u64), PipeError> {
        self.flush().await?;
        let Pipe {
            hash_tx,
            write_tx,
            checkers,
            writer,
            data_bytes,
            ..
        } = self;
        drop((hash_tx, write_tx));
        let file = join(writer.expect("writer joined once")).await??;
        let (mut sha512, mut builder) = (None, None);
        for c in checkers {
            match c {
                Checker::Chunks(h) => join(h).await?.map_err(PipeError::Chunk)?,
                Checker::Sha512(h) => sha512 = Some(hex::encode(join(h).await?.finalize())),
                Checker::Build(h) => builder = Some(join(h).await?),
            }
        }
        let verdict = match (sha512, builder) {
            (Some(sha512), Some(builder)) => Verdict::Hashed { sha512, builder },
            _ => Verdict::Checked,
        };
        Ok((file, verdict, data_bytes))
    }

    async fn flush(&mut self) -> Result<(), PipeError> {
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

    async fn send_writer(&mut self, msg: WriteMsg) -> Result<(), PipeError> {
        if self.write_tx.send(msg).await.is_err() {
            return Err(self.worker_died(None).await);
        }
        Ok(())
    }

    async fn send_hasher(&mut self, msg: HashMsg) -> Result<(), PipeError> {
        for i in 0..self.hash_tx.len() {
            if self.hash_tx[i].send(msg.clone()).await.is_err() {
                return Err(self.worker_died(Some(i)).await);
            }
        }
        Ok(())
    }

    /// A queue was closed: a worker stopped early. The chunk checker stops at the first chunk
    /// that differs from the manifest, and the writer on an I/O error (a full disk, say): those
    /// are the ones worth reporting; otherwise something panicked.
    /// `checker`: the index of the checking worker whose queue closed (None: the writer's).
    async fn worker_died(&mut self, checker: Option<usize>) -> PipeError {
        if let Some(i) = checker
            && matches!(self.checkers[i], Checker::Chunks(_))
            && let Checker::Chunks(h) = self.checkers.remove(i)
        {
            match join(h).await {
                Ok(Err(mismatch)) => return PipeError::Chunk(mismatch),
                Err(e) => return PipeError::Io(e),
                Ok(Ok(())) => {}
            }
        }
        if let Some(writer) = self.writer.take() {
            match join(writer).await {
                Ok(Err(e)) | Err(e) => return PipeError::Io(e),
                Ok(Ok(_)) => {}
            }
        }
        PipeError::Io(io::Error::other("sync receive worker stopped unexpectedly"))
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

/// Builds the content's manifest (kept only if the SHA-512 worker's digest matches).
fn build_worker(mut rx: mpsc::Receiver<HashMsg>) -> ManifestBuilder {
    let mut builder = ManifestBuilder::new(CHUNK_SIZE);
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            HashMsg::Zeros(n) => builder.zeros(n),
            HashMsg::Data(block) => block.iter().for_each(|b| builder.update(b)),
        }
    }
    builder
}

/// Checks the content against the manifest; stops (closing its queue) at the first chunk that
/// differs.
fn check_worker(mut rx: mpsc::Receiver<HashMsg>, manifest: &Manifest) -> Result<(), ChunkMismatch> {
    let mut checker = ChunkChecker::new(manifest);
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            HashMsg::Zeros(n) => checker.zeros(n)?,
            HashMsg::Data(block) => block.iter().try_for_each(|b| checker.update(b))?,
        }
    }
    checker.finish()
}

fn write_worker(file: File, mut rx: mpsc::Receiver<WriteMsg>) -> io::Result<File> {
    with_writeback(&file, Pages::Drop, |writeback| {
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

/// Writes the block's pieces at `offset` as they are (one vectored write, no copy).
fn write_block(file: &File, offset: u64, block: &[Bytes]) -> io::Result<u64> {
    let mut slices: Vec<IoSlice<'_>> = block.iter().map(|b| IoSlice::new(b)).collect();
    crate::os::pagecache::write_all_at(file, offset, &mut slices)
}
