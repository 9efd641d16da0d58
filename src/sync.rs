//! Sync between disks: moving a backing image file from one disk to another, same node or not,
//! without ever moving its holes.
//!
//! This module owns the byte-moving half of "sync between disks" (see the architecture's data
//! path): finding a file's data extents ([`data_extents`], [`allocated_bytes`]), the same-node
//! copy ([`local_copy`]: `FICLONE` reflink where the filesystem shares blocks, else a
//! sparse-aware `copy_file_range` of the data extents only), the cross-node transfer (the sender's
//! [`extent_stream`] and the receiver's [`receive`] / [`receive_with_manifest`], speaking the
//! framed format below over HTTP), the SHA-512 of a file's logical content computed from its
//! data extents ([`sha512_sparse`], [`hash_sparse`]), and chunk [`Manifest`]s. Every file it
//! writes is either complete, synced and (for a receive) verified when it returns `Ok`, or
//! removed; the page cache the write filled is released.
//!
//! It must not know about backing-image objects, disks' directory layout, the store, or HTTP
//! routes and servers: callers pick the paths, serve [`extent_stream`] and a file's manifest on
//! whatever routes they like, rename a finished file into place and sync its directory.
//!
//! What a receive guarantees: the expected SHA-512 always comes from the caller, never from the
//! sender. Either the received content hashes to it, or every chunk of the content matches a
//! manifest that names exactly that SHA-512 and whose seal is intact. A manifest is only ever
//! built from the very bytes that were hashed to a SHA-512 in the same pass (a download, a
//! full-hash receive, a verification or scrub) and only kept when that SHA-512 matched the
//! image's checksum; so a file whose chunks all match it holds the bytes that matched, up to
//! SHA-256 collisions. Rot in the sender's file after its manifest was made shows as a chunk
//! that differs; rot in the manifest breaks its seal (and the receive falls back to the whole
//! SHA-512). The seal is a checksum, not a signature: a node that forges a manifest on purpose
//! is outside what it protects against, as it is for every other byte a node serves. Only
//! `reflink` may use `unsafe` (one ioctl that nix does not wrap).
//!
//! # Wire format (`BICSIX1`)
//!
//! ```text
//! stream = header record* end
//! header = "BICSIX1\n" (8 bytes) | size:   u64 BE     the file's logical size in bytes
//! record = offset: u64 BE         | len:    u64 BE     len > 0, followed by len bytes: the file's
//!                                                      content at [offset, offset + len)
//! end    = offset: u64 BE = size  | len:    u64 BE = 0
//! ```
//!
//! Records come in increasing offset order, do not overlap, and lie within `size`; every byte no
//! record covers is zero (a hole), so only the data extents cross the wire and the overhead is
//! 16 bytes per extent plus 32. Nothing follows the end record; a body that ends before it is a
//! truncated transfer. Frames are independent of HTTP chunking: a receiver must accept any split,
//! down to one byte per chunk. The stream carries no checksum: the receiver verifies the
//! logical content (holes as zeros) against the SHA-512 its caller knows, directly or through
//! the file's manifest (a separate document, see [`manifest`]).

mod flush;
mod hash;
mod local;
pub mod manifest;
mod receive;
mod reflink;
mod send;
#[cfg(test)]
mod tests;
mod wire;
#[cfg(feature = "fuzzing")]
pub use wire::fuzz as fuzz_wire;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use tracing::{debug, warn};

pub use crate::os::extents::{Extent, allocated_bytes, data_extents, extents_in};
pub use hash::{hash_sparse, sha512_sparse};
pub use local::{
    CopyMethod, CopyOutcome, byte_identical, drop_cache, local_copy, local_copy_keeping_cache,
};
pub use manifest::Manifest;
pub use receive::{ReceiveOutcome, Verified, receive, receive_from_peer, receive_with_manifest};
pub use send::extent_stream;

/// Receives progress. Called from the download's task, so it must be cheap (store, don't block).
/// Also the progress of a [`receive`] (`done` bytes of the file's logical content, holes
/// included, of `total`): one sink for both, so one adapter serves both (`crate::download`
/// re-exports it).
pub trait ProgressSink: Send + Sync {
    /// `received` bytes of `total` (when the server said) are in; `received` can go back to 0
    /// when the server ignores a Range request and the download restarts.
    fn progress(&self, received: u64, total: Option<u64>);
}

/// Any `Fn(received, total)` closure is a sink.
impl<F: Fn(u64, Option<u64>) + Send + Sync> ProgressSink for F {
    fn progress(&self, received: u64, total: Option<u64>) {
        self(received, total)
    }
}

/// A sink that ignores progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn progress(&self, _: u64, _: Option<u64>) {}
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A local file operation failed; `context` names the operation and the path.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// ENOSPC or EDQUOT writing the named path.
    #[error("no space left on the disk holding {0}; free space on that disk and retry")]
    NoSpace(String),
    /// The URL could not be used at all (malformed, unsupported scheme).
    #[error("invalid sync URL {0}")]
    InvalidUrl(String),
    /// The expected checksum given by the caller is not a SHA-512 (128 hex digits).
    #[error("invalid expected checksum {0:?}: a SHA-512 is 128 hexadecimal digits")]
    InvalidChecksum(String),
    /// The sending node answered with a non-success status.
    #[error("GET {url}: HTTP {status} from the sending node")]
    Http { url: String, status: u16 },
    /// The sending node could not be reached.
    #[error("cannot reach the sending node: {0}")]
    Connect(String),
    /// The stream ended (or the connection broke) before the end record.
    #[error("truncated transfer: {0}; it will be retried")]
    Truncated(String),
    /// The stream is not a well-formed `BICSIX1` stream.
    #[error("sync protocol error: {0}")]
    Protocol(String),
    /// The file arrived whole but its SHA-512 is not the expected one.
    #[error(
        "checksum mismatch: expected {expected}, got {got}; the transfer was corrupt and will be \
         retried"
    )]
    ChecksumMismatch { expected: String, got: String },
    /// A chunk that arrived is not the one the image's manifest (whose SHA-512 is the expected
    /// one) describes.
    #[error(
        "chunk at offset {offset} ({len} bytes) of {dest} does not match the image's manifest: \
         {detail}; the sending node's file or the transfer is corrupt and the sync will be \
         retried"
    )]
    ChunkMismatch {
        dest: String,
        offset: u64,
        len: u64,
        detail: String,
    },
    /// No byte arrived for `idle`.
    #[error("GET {url}: no data received for {} s; the sending node stalled", idle.as_secs_f64())]
    IdleTimeout { url: String, idle: Duration },
}

impl SyncError {
    /// Whether trying the same sync again later may succeed: network trouble, stalls, truncated
    /// or corrupt transfers, and 408/429/5xx answers. A full disk, a malformed stream, a bad URL,
    /// other HTTP answers and local I/O errors need someone to fix something first.
    pub fn is_retryable(&self) -> bool {
        match self {
            SyncError::Http { status, .. } => matches!(status, 408 | 429 | 500..=599),
            SyncError::Connect(_)
            | SyncError::Truncated(_)
            | SyncError::ChecksumMismatch { .. }
            | SyncError::ChunkMismatch { .. }
            | SyncError::IdleTimeout { .. } => true,
            SyncError::Io { .. }
            | SyncError::NoSpace(_)
            | SyncError::InvalidUrl(_)
            | SyncError::InvalidChecksum(_)
            | SyncError::Protocol(_) => false,
        }
    }

    /// `what` failed on `path`: ENOSPC and EDQUOT become [`SyncError::NoSpace`] naming the path.
    fn io(what: &str, path: &Path, source: io::Error) -> Self {
        let full = [Errno::ENOSPC as i32, Errno::EDQUOT as i32];
        if source.raw_os_error().is_some_and(|c| full.contains(&c)) {
            SyncError::NoSpace(path.display().to_string())
        } else {
            SyncError::Io {
                context: format!("{what} {}", path.display()),
                source,
            }
        }
    }
}

/// Removes a file being written when dropped, unless disarmed: every error, panic or dropped
/// future leaves nothing behind.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn new(path: &Path) -> Self {
        RemoveOnDrop(Some(path.to_path_buf()))
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            match std::fs::remove_file(&path) {
                Ok(()) => debug!(path = %path.display(), "removed unfinished file"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot remove unfinished file")
                }
            }
        }
    }
}
