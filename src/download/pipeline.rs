//! The receive → (hash ‖ write) pipeline behind [`super::download`].
//!
//! The async side gathers the body's chunks into blocks of at least [`BLOCK`] bytes without
//! copying them (only tiny chunks are copied together) and hands each block, shared, to three
//! blocking workers over bounded queues: one feeds SHA-512, one builds the file's chunk
//! [`Manifest`] from the same bytes (SHA-256 of each data chunk, see [`crate::sync::manifest`]),
//! and one writes the file (runs of data with positional writes; all-zero chunks are skipped and
//! stay holes), while a fourth thread writes back the file's dirty pages as it grows and drops
//! them from the page cache. SHA-512 cannot be split across cores and is the slowest stage
//! (about 0.5 GiB/s), so it gets a thread of its own and the whole download takes
//! max(network, write, hash) rather than their sum. Memory is bounded by the queues: about
//! `(QUEUE_DEPTH + 2) * BLOCK` bytes of body at most, whatever the image size; dirty page cache
//! by about three [`FLUSH_WINDOW`]s. The hash state lives only here, in memory, so a download
//! resumed within a process never reads the file back; one that goes on with the partial file of
//! an earlier process feeds its bytes through [`Pipeline::prefix`] first.
//!
//! The body's first block says what it is ([`Compression::detect`]). A plain body goes to the
//! three workers as it is; a compressed one goes to a decoder thread ([`super::decompress`]),
//! which hands the decompressed blocks to them instead, so the file, its SHA-512 and its
//! manifest are of the decompressed image, and a resume within the process feeds the decoder
//! the rest of the compressed stream. When a source checksum is asked for, a fifth worker
//! hashes the body's bytes as they arrived (compressed or not) with SHA-256 or SHA-512; for a
//! plain body and SHA-512 that is the stored file's hash, and no extra worker runs. A restart
//! stops the decoder and the source hasher, and the next bytes are looked at afresh.
//!
//! This module must not know about HTTP, retries or URLs: it takes bytes, restarts from zero when
//! told, and at the end returns the file (written, not yet synced) and its digest.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use nix::errno::Errno;
use sha2::{Digest, Sha512};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::decompress::{self, BlockReader, Compression, DecodeEnd};
use super::{SourceAlgo, SourceChecksum};
use crate::sync::manifest::{CHUNK_SIZE, Manifest, ManifestBuilder};

/// Bytes per block handed to the workers. Memory is about `(QUEUE_DEPTH + 2) * BLOCK` plus what
/// the HTTP client holds; 256 KiB still means few queue operations (4096 per GiB) and large
/// writes. Measured (`bench/run --path download-verify`, 1 GiB): the malloc heap of `bicsi
/// serve` peaked at 7.3 MiB with 1 MiB blocks and 4.5 MiB with these, at the same CPU time.
pub(super) const BLOCK: usize = 256 << 10;
/// Chunks smaller than this are copied together rather than referenced one by one, so a block
/// never has more than about `BLOCK / SMALL_CHUNK` pieces.
const SMALL_CHUNK: usize = 16 * 1024;
/// Blocks each worker may have queued before the receiver waits (back-pressure to TCP). The hash
/// is always the slowest stage, so a deeper queue only holds memory.
const QUEUE_DEPTH: usize = 3;
/// Bytes written before they are handed to the flusher thread for writeback.
const FLUSH_WINDOW: u64 = 16 << 20;

/// A run of the body, in order: the chunks as they arrived, shared between the workers.
type Block = decompress::Block;

/// What the body is, as far as its first bytes said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    /// No block handed on yet since the start or the last restart.
    Unknown,
    /// Stored as it arrives.
    Plain,
    /// Decompressed on the decoder thread.
    Compressed(Compression),
    /// A container image layer: decompressed (when it is) and unpacked on the decoder thread,
    /// which hands on only the disk file's bytes ([`super::oci::DiskEntry`]).
    Layer(Option<Compression>),
}

/// The decoder thread: the decompressed length, or why it stopped.
type DecoderHandle = JoinHandle<Result<u64, DecodeEnd>>;

/// What [`Pipeline::finish`] returns.
pub(super) struct Finished {
    /// The file, written, not yet synced.
    pub file: File,
    /// Bytes in the file (the decompressed length of a compressed body).
    pub size: u64,
    /// Lower-case hex SHA-512 of the file's bytes.
    pub sha512: String,
    /// The file's manifest (naming `sha512`: keep it only if that is the expected one).
    pub manifest: Manifest,
    /// The source checksum asked for, of the body's bytes as they arrived.
    pub source: Option<SourceChecksum>,
    /// How the body was compressed.
    pub compression: Option<Compression>,
}

#[derive(Clone)]
enum Msg {
    Data(Block),
    /// Forget everything received so far: truncate the file, reset the hash.
    Restart,
    /// The final size is known: reserve the space now, so a full disk fails at once rather than
    /// after gigabytes (writer only).
    Reserve(u64),
    /// This many bytes at the current offset are in the file already (a partial file kept from
    /// an earlier process): go on after them (writer only; the hash gets them as `Data`).
    Skip(u64),
}

pub(super) struct Pipeline {
    /// Chunks of the block being gathered, and their total length (with `small`).
    pending: Vec<Bytes>,
    pending_len: usize,
    /// Small chunks copied together, to become one piece of `pending`.
    small: BytesMut,
    hash_tx: mpsc::Sender<Msg>,
    manifest_tx: mpsc::Sender<Msg>,
    write_tx: mpsc::Sender<Msg>,
    hasher: Option<JoinHandle<Sha512>>,
    builder: Option<JoinHandle<ManifestBuilder>>,
    writer: Option<JoinHandle<io::Result<(File, u64)>>>,
    stream: Stream,
    /// The decoder thread while the body is compressed: the body's blocks go to it, and it
    /// hands the decompressed ones to the three workers.
    decoder: Option<(mpsc::Sender<Block>, DecoderHandle)>,
    /// The source checksum asked for, and its worker once the stream is known (none when it
    /// is the file's SHA-512 of a plain body).
    source_algo: Option<SourceAlgo>,
    source: Option<(mpsc::Sender<Block>, JoinHandle<SourceChecksum>)>,
    /// The body is a layer's tar: store only its disk file.
    layer: bool,
}

/// Why the pipeline stopped: the writer's error (disk full, I/O), or a worker that panicked.
pub(super) type PipeError = io::Error;

impl Pipeline {
    pub(super) fn start(file: File, source_algo: Option<SourceAlgo>, layer: bool) -> Self {
        let (hash_tx, hash_rx) = mpsc::channel(QUEUE_DEPTH);
        let (manifest_tx, manifest_rx) = mpsc::channel(QUEUE_DEPTH);
        let (write_tx, write_rx) = mpsc::channel(QUEUE_DEPTH);
        Pipeline {
            pending: Vec::new(),
            pending_len: 0,
            small: BytesMut::new(),
            hash_tx,
            manifest_tx,
            write_tx,
            hasher: Some(tokio::task::spawn_blocking(move || hash_worker(hash_rx))),
            builder: Some(tokio::task::spawn_blocking(move || {
                manifest_worker(manifest_rx)
            })),
            writer: Some(tokio::task::spawn_blocking(move || {
                write_worker(file, write_rx)
            })),
            stream: Stream::Unknown,
            decoder: None,
            source_algo,
            source: None,
            layer,
        }
    }

    /// Whether the body is compressed; `None` until its first block was handed on.
    pub(super) fn compressed(&self) -> Option<bool> {
        match self.stream {
            Stream::Unknown => None,
            Stream::Plain => Some(false),
            Stream::Compressed(_) | Stream::Layer(_) => Some(true),
        }
    }

    /// Starts the stages of a body whose first bytes are `head`.
    fn begin(&mut self, head: &[u8]) {
        self.stream = match Compression::detect(head) {
            c if self.layer => {
                let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
                let out = [
                    self.hash_tx.clone(),
                    self.manifest_tx.clone(),
                    self.write_tx.clone(),
                ];
                let handle = tokio::task::spawn_blocking(move || layer_worker(c, rx, out));
                self.decoder = Some((tx, handle));
                Stream::Layer(c)
            }
            None => Stream::Plain,
            Some(c) => {
                let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
                let out = [
                    self.hash_tx.clone(),
                    self.manifest_tx.clone(),
                    self.write_tx.clone(),
                ];
                let handle = tokio::task::spawn_blocking(move || decode_worker(c, rx, out));
                self.decoder = Some((tx, handle));
                Stream::Compressed(c)
            }
        };
        let algo = self.source_algo;
        match algo {
            Some(SourceAlgo::Sha512) if self.stream == Stream::Plain => {}
            Some(algo) => {
                let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
                let handle = tokio::task::spawn_blocking(move || source_worker(algo, rx));
                self.source = Some((tx, handle));
            }
            None => {}
        }
    }

    /// Stops the decoder and the source hasher, whatever they hold: what they made of the
    /// bytes so far is thrown away.
    async fn end_stream(&mut self) {
        if let Some((tx, handle)) = self.decoder.take() {
            drop(tx);
            let _ = handle.await;
        }
        if let Some((tx, handle)) = self.source.take() {
            drop(tx);
            let _ = handle.await;
        }
        self.stream = Stream::Unknown;
    }

    /// Takes one chunk of the body, in order.
    pub(super) async fn push(&mut self, chunk: Bytes) -> Result<(), PipeError> {
        self.pending_len += chunk.len();
        if chunk.len() < SMALL_CHUNK {
            if self.small.capacity() == 0 {
                self.small.reserve(4 * SMALL_CHUNK);
            }
            self.small.extend_from_slice(&chunk);
            if self.small.len() >= SMALL_CHUNK {
                self.pending.push(self.small.split().freeze());
            }
        } else {
            if !self.small.is_empty() {
                self.pending.push(self.small.split().freeze());
            }
            self.pending.push(chunk);
        }
        if self.stream == Stream::Unknown && self.pending_len >= decompress::MAGIC_LEN {
            let head = self.head();
            self.begin(&head);
        }
        if self.pending_len >= BLOCK {
            self.flush().await?;
        }
        Ok(())
    }

    /// The first [`decompress::MAGIC_LEN`] bytes gathered (fewer if fewer are in).
    fn head(&self) -> Vec<u8> {
        let mut head = Vec::with_capacity(decompress::MAGIC_LEN);
        for piece in self.pending.iter().chain([&self.small.clone().freeze()]) {
            let want = decompress::MAGIC_LEN - head.len();
            head.extend_from_slice(&piece[..want.min(piece.len())]);
        }
        head
    }

    /// Takes bytes that are in the file already, in order, before any [`Self::push`]: they are
    /// hashed and go into the manifest, and the writer goes on after them.
    /// A kept partial file is always of a plain body: a compressed download never keeps one.
    pub(super) async fn prefix(&mut self, block: Bytes) -> Result<(), PipeError> {
        self.flush().await?;
        if self.stream == Stream::Unknown {
            self.begin(&[]);
        }
        let len = block.len() as u64;
        let block: Block = Arc::from([block]);
        self.send_source(&block).await?;
        self.send_writer(Msg::Skip(len)).await?;
        self.send_hasher(Msg::Data(block)).await
    }

    /// Throws away everything received so far (the server ignored the Range request).
    pub(super) async fn restart(&mut self) -> Result<(), PipeError> {
        self.pending.clear();
        self.pending_len = 0;
        self.small.clear();
        self.end_stream().await;
        self.send_hasher(Msg::Restart).await?;
        self.send_writer(Msg::Restart).await
    }

    /// Asks the writer to reserve `len` bytes for the file.
    pub(super) async fn reserve(&mut self, len: u64) -> Result<(), PipeError> {
        self.send_writer(Msg::Reserve(len)).await
    }

    /// Hands over the last partial block, stops the workers and returns the file with its
    /// SHA-512 and manifest of every byte stored since the last restart (see [`Finished`]).
    pub(super) async fn finish(mut self) -> Result<Finished, PipeError> {
        self.flush().await?;
        if self.stream == Stream::Unknown {
            // An empty body.
            self.begin(&[]);
        }
        let compression = match self.stream {
            Stream::Compressed(c) | Stream::Layer(Some(c)) => Some(c),
            _ => None,
        };
        if let Some((tx, handle)) = self.decoder.take() {
            drop(tx);
            match join(handle).await? {
                Ok(_) => {}
                Err(DecodeEnd::Corrupt(e)) => return Err(e),
                Err(DecodeEnd::Downstream) => return Err(self.worker_died(false).await),
            }
        }
        let source = match self.source.take() {
            Some((tx, handle)) => {
                drop(tx);
                Some(join(handle).await?)
            }
            None => None,
        };
        let Pipeline {
            hash_tx,
            manifest_tx,
            write_tx,
            hasher,
            builder,
            writer,
            source_algo,
            ..
        } = self;
        drop((hash_tx, manifest_tx, write_tx));
        let (file, size) = join(writer.expect("writer joined once")).await??;
        let digest = join(hasher.expect("hasher joined once")).await?.finalize();
        let sha512 = hex::encode(digest);
        let manifest = join(builder.expect("builder joined once"))
            .await?
            .finish(&sha512);
        let source = match (source, source_algo) {
            (Some(s), _) => Some(s),
            // A plain body's bytes are the file's: its SHA-512 is the one asked for.
            (None, Some(SourceAlgo::Sha512)) => Some(SourceChecksum {
                algo: SourceAlgo::Sha512,
                hex: sha512.clone(),
            }),
            (None, _) => None,
        };
        Ok(Finished {
            file,
            size,
            sha512,
            manifest,
            source,
            compression,
        })
    }

    async fn flush(&mut self) -> Result<(), PipeError> {
        if !self.small.is_empty() {
            self.pending.push(self.small.split().freeze());
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.stream == Stream::Unknown {
            let head = self.head();
            self.begin(&head);
        }
        let block: Block = std::mem::take(&mut self.pending).into();
        self.pending_len = 0;
        self.send_source(&block).await?;
        if let Some((tx, _)) = &self.decoder {
            if tx.send(block).await.is_err() {
                return Err(self.worker_died(true).await);
            }
            return Ok(());
        }
        // The workers share the block's buffers: the bytes are in memory once.
        self.send_writer(Msg::Data(block.clone())).await?;
        self.send_hasher(Msg::Data(block)).await
    }

    async fn send_source(&mut self, block: &Block) -> Result<(), PipeError> {
        if let Some((tx, _)) = &self.source
            && tx.send(block.clone()).await.is_err()
        {
            return Err(io::Error::other(
                "download source hasher stopped unexpectedly",
            ));
        }
        Ok(())
    }

    async fn send_writer(&mut self, msg: Msg) -> Result<(), PipeError> {
        if self.write_tx.send(msg).await.is_err() {
            return Err(self.worker_died(false).await);
        }
        Ok(())
    }

    /// Sends to the SHA-512 worker and the manifest builder, which see the same bytes.
    async fn send_hasher(&mut self, msg: Msg) -> Result<(), PipeError> {
        if self.hash_tx.send(msg.clone()).await.is_err()
            || self.manifest_tx.send(msg).await.is_err()
        {
            return Err(self.worker_died(false).await);
        }
        Ok(())
    }

    /// A queue was closed: a worker stopped early. The decoder stops on data that does not
    /// decompress (`decoder`: its queue was the one closed), the writer on an I/O error: those
    /// are worth reporting; otherwise something panicked.
    async fn worker_died(&mut self, decoder: bool) -> PipeError {
        if decoder && let Some((tx, handle)) = self.decoder.take() {
            drop(tx);
            match join(handle).await {
                Ok(Err(DecodeEnd::Corrupt(e))) | Err(e) => return e,
                Ok(_) => {}
            }
        }
        if let Some(writer) = self.writer.take() {
            match join(writer).await {
                Ok(Err(e)) => return e,
                Err(e) => return e,
                Ok(Ok(_)) => {}
            }
        }
        io::Error::other("download pipeline worker stopped unexpectedly")
    }
}

async fn join<T>(handle: JoinHandle<T>) -> Result<T, PipeError> {
    handle
        .await
        .map_err(|e| io::Error::other(format!("download pipeline worker failed: {e}")))
}

fn hash_worker(mut rx: mpsc::Receiver<Msg>) -> Sha512 {
    let mut hasher = Sha512::new();
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Msg::Data(block) => block.iter().for_each(|b| hasher.update(b)),
            Msg::Restart => hasher = Sha512::new(),
            Msg::Reserve(_) | Msg::Skip(_) => {}
        }
    }
    hasher
}

fn manifest_worker(mut rx: mpsc::Receiver<Msg>) -> ManifestBuilder {
    let mut builder = ManifestBuilder::new(CHUNK_SIZE);
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Msg::Data(block) => block.iter().for_each(|b| builder.update(b)),
            Msg::Restart => builder = ManifestBuilder::new(CHUNK_SIZE),
            Msg::Reserve(_) | Msg::Skip(_) => {}
        }
    }
    builder
}

/// Decompresses the body's blocks and hands the output to the SHA-512 worker, the manifest
/// builder and the writer (`out`, in that order), as the async side does for a plain body.
fn decode_worker(
    compression: Compression,
    rx: mpsc::Receiver<Block>,
    out: [mpsc::Sender<Msg>; 3],
) -> Result<u64, DecodeEnd> {
    let mut input = BlockReader::new(rx);
    decompress::decode(compression, &mut input, BLOCK, |bytes| {
        let block: Block = Arc::from([bytes]);
        for tx in &out {
            tx.blocking_send(Msg::Data(block.clone())).map_err(|_| ())?;
        }
        Ok(())
    })
}

/// Unpacks a layer's tar (decompressing it first when `compression` says) and hands the disk
/// file's bytes to the SHA-512 worker, the manifest builder and the writer, as
/// [`decode_worker`] does with a whole body. A tar without exactly one whole disk file is
/// [`DecodeEnd::Corrupt`] with a [`super::oci::NotADisk`] in it.
fn layer_worker(
    compression: Option<Compression>,
    rx: mpsc::Receiver<Block>,
    out: [mpsc::Sender<Msg>; 3],
) -> Result<u64, DecodeEnd> {
    let mut entry = super::oci::DiskEntry::new();
    let mut failed: Option<io::Error> = None;
    let mut emit = |bytes: Bytes| -> Result<(), ()> {
        let block: Block = Arc::from([bytes]);
        for tx in &out {
            tx.blocking_send(Msg::Data(block.clone())).map_err(|_| ())?;
        }
        Ok(())
    };
    let mut feed = |bytes: Bytes, entry: &mut super::oci::DiskEntry| -> Result<(), ()> {
        if failed.is_some() {
            // Read to the end anyway: the source checksum covers the whole blob.
            return Ok(());
        }
        match entry.push(bytes, &mut emit) {
            Ok(()) => Ok(()),
            Err(e) if super::oci::not_a_disk_in(&e).is_some() => {
                failed = Some(e);
                Ok(())
            }
            Err(_) => Err(()),
        }
    };
    let mut input = BlockReader::new(rx);
    match compression {
        Some(c) => {
            decompress::decode(c, &mut input, BLOCK, |bytes| feed(bytes, &mut entry))?;
        }
        None => loop {
            use std::io::BufRead;
            let buf = input.fill_buf().map_err(|_| DecodeEnd::Downstream)?;
            if buf.is_empty() {
                break;
            }
            let bytes = Bytes::copy_from_slice(buf);
            let n = bytes.len();
            input.consume(n);
            feed(bytes, &mut entry).map_err(|()| DecodeEnd::Downstream)?;
        },
    }
    if let Some(e) = failed {
        return Err(DecodeEnd::Corrupt(e));
    }
    entry.finish().map_err(DecodeEnd::Corrupt)
}

/// Hashes the body's bytes as they arrived, for the source checksum.
fn source_worker(algo: SourceAlgo, mut rx: mpsc::Receiver<Block>) -> SourceChecksum {
    use sha2::Sha256;
    enum H {
        S256(Sha256),
        S512(Sha512),
    }
    let mut h = match algo {
        SourceAlgo::Sha256 => H::S256(Sha256::new()),
        SourceAlgo::Sha512 => H::S512(Sha512::new()),
    };
    while let Some(block) = rx.blocking_recv() {
        for piece in block.iter() {
            match &mut h {
                H::S256(h) => h.update(piece),
                H::S512(h) => h.update(piece),
            }
        }
    }
    let hex = match h {
        H::S256(h) => hex::encode(h.finalize()),
        H::S512(h) => hex::encode(h.finalize()),
    };
    SourceChecksum { algo, hex }
}

fn write_worker(file: File, rx: mpsc::Receiver<Msg>) -> io::Result<(File, u64)> {
    let written = std::thread::scope(|scope| {
        // One window queued while another is being flushed: at most about three windows of the
        // file are dirty in the page cache at any time.
        let (flush_tx, flush_rx) = std::sync::mpsc::sync_channel(1);
        let flusher = scope.spawn(|| flush_worker(&file, flush_rx));
        let written = write_loop(&file, rx, flush_tx);
        let flushed = flusher
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("download flusher thread panicked")));
        written.and_then(|n| flushed.map(|()| n))
    })?;
    Ok((file, written))
}

/// Returns the file's length.
fn write_loop(
    mut file: &File,
    mut rx: mpsc::Receiver<Msg>,
    flush_tx: std::sync::mpsc::SyncSender<(u64, u64)>,
) -> io::Result<u64> {
    let mut written = 0u64;
    let mut handed = 0u64;
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Msg::Data(block) => {
                written += write_block(file, written, &block)?;
                if written - handed >= FLUSH_WINDOW {
                    if flush_tx.send((handed, written)).is_err() {
                        // The flusher stopped on an error; joining it reports that error.
                        return Ok(written);
                    }
                    handed = written;
                }
            }
            Msg::Restart => {
                file.set_len(0)?;
                io::Seek::rewind(&mut file)?;
                (written, handed) = (0, 0);
            }
            Msg::Reserve(len) => reserve(file, len)?,
            Msg::Skip(len) => {
                // On disk already: nothing to write back for these.
                written += len;
                handed = written;
            }
        }
    }
    // Zero chunks were skipped, not written: the length covers the holes at the end.
    if file.metadata()?.len() != written {
        file.set_len(written)?;
    }
    Ok(written)
}

/// Chunks of this size (aligned to the file offset) that hold only zeros are not written, so
/// they stay holes: a sparse image downloads into a sparse file, and syncing it to other disks
/// later moves only its data.
const HOLE_CHUNK: u64 = 64 * 1024;

/// Writes the block at `offset`, leaving its all-zero chunks as holes; returns its length.
/// The pieces are scanned and written where they lie (vectored writes of the data runs): a
/// copy of the block into one buffer would cost a block of memory and a pass over its bytes.
fn write_block(file: &File, offset: u64, block: &[Bytes]) -> io::Result<u64> {
    let total: usize = block.iter().map(Bytes::len).sum();
    let mut pos = 0usize;
    let mut run_start: Option<usize> = None;
    while pos < total {
        let abs = offset + pos as u64;
        let end = (((abs / HOLE_CHUNK) + 1) * HOLE_CHUNK - offset) as usize;
        let end = end.min(total);
        let zero = slices(block, pos, end).all(|s| s.iter().all(|b| *b == 0));
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(start)) => {
                write_run(file, offset, block, start, pos)?;
                run_start = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(start) = run_start {
        write_run(file, offset, block, start, total)?;
    }
    Ok(total as u64)
}

/// Writes bytes `from..to` of the block (its pieces read as one run) at `offset + from`.
fn write_run(file: &File, offset: u64, block: &[Bytes], from: usize, to: usize) -> io::Result<()> {
    let mut iov: Vec<IoSlice<'_>> = slices(block, from, to).map(IoSlice::new).collect();
    crate::os::pagecache::write_all_at(file, offset + from as u64, &mut iov)?;
    Ok(())
}

/// The parts of the pieces that hold bytes `from..to` of the block, in order.
fn slices(block: &[Bytes], from: usize, to: usize) -> impl Iterator<Item = &[u8]> {
    let mut start = 0usize;
    block.iter().filter_map(move |piece| {
        let (s, e) = (start, start + piece.len());
        start = e;
        let (a, b) = (from.max(s), to.min(e));
        (a < b).then(|| &piece[a - s..b - s])
    })
}

/// Writes back each window while the next ones are written, then drops its pages from the page
/// cache. Without this the whole file would sit dirty in memory until the final `fdatasync`,
/// which would then wait for all of it: the disk would work after the network instead of with
/// it, and a large download would fill the page cache.
fn flush_worker(file: &File, rx: std::sync::mpsc::Receiver<(u64, u64)>) -> io::Result<()> {
    for (from, to) in rx {
        crate::os::pagecache::write_back(file, from, to, true)?;
    }
    Ok(())
}

/// Fails at once with ENOSPC when the file system cannot hold `len` more bytes, so a full disk
/// is reported before gigabytes arrive. Space is checked, not allocated: allocating it would
/// fill the holes the writer leaves.
fn reserve(file: &File, len: u64) -> io::Result<()> {
    let st = nix::sys::statvfs::fstatvfs(file.as_fd()).map_err(io::Error::from)?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    if len > free {
        return Err(io::Error::from_raw_os_error(Errno::ENOSPC as i32));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::Extent;

    /// A block cut at odd places (a piece ending inside a chunk, one of a single byte) is
    /// written as its bytes, and its all-zero chunks stay holes.
    #[test]
    fn a_block_in_odd_pieces_is_written_with_its_zero_chunks_as_holes() {
        let (_dir, path, file) = crate::os::pagecache::scratch_file();
        let chunk = HOLE_CHUNK as usize;
        let mut want = vec![0u8; 6 * chunk];
        want[chunk..2 * chunk].fill(7);
        want[3 * chunk + 100] = 1;
        want[5 * chunk..].fill(9);
        let cuts = [
            1,
            3000,
            chunk - 5,
            chunk + 17,
            3 * chunk + 100,
            3 * chunk + 101,
            5 * chunk,
        ];
        let mut pieces = Vec::new();
        let mut from = 0;
        for to in cuts.into_iter().chain([want.len()]) {
            pieces.push(Bytes::copy_from_slice(&want[from..to]));
            from = to;
        }
        let at = HOLE_CHUNK;
        assert_eq!(write_block(&file, at, &pieces).unwrap(), want.len() as u64);
        file.set_len(at + want.len() as u64).unwrap();
        let got = std::fs::read(&path).unwrap();
        assert!(got[..chunk].iter().all(|b| *b == 0));
        assert!(got[chunk..] == want[..], "the block reads back as written");
        let data = |i: usize| Extent {
            offset: at + (i * chunk) as u64,
            len: HOLE_CHUNK,
        };
        assert_eq!(
            crate::sync::data_extents(&file).unwrap(),
            [data(1), data(3), data(5)]
        );
    }
}
