//! The sending side of a cross-node sync: a file as a `BICSIX1` stream of its data extents,
//! ready to be an HTTP body.
//!
//! This module owns reading the file (on a blocking thread, at most [`CHUNK`] bytes at a time,
//! a few chunks ahead of the network through a bounded queue, so memory stays at a few MiB
//! whatever the image size) and framing it. It must not know about routes, servers or
//! authorization: the caller serves the stream. A file that changes under it is not detected
//! beyond reads that come up short; the receiver's checksum catches the rest.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
use tokio::sync::mpsc;
use tracing::debug;

use super::wire::{self, HEAD_LEN};
use crate::os::extents::extents_within;

/// Largest chunk handed to the body (headers included).
const CHUNK: usize = 1 << 20;
/// Chunks read ahead of the network.
const QUEUE_DEPTH: usize = 4;

type Chunk = io::Result<Bytes>;

/// The sender: the file at `path` as a `BICSIX1` stream (see [`super`]) of `Bytes` chunks
/// (each at most 1 MiB), suitable for `axum::body::Body::from_stream`.
///
/// Nothing happens until the stream is first polled (inside a Tokio runtime): then a blocking
/// task opens the file, finds its data extents and reads them into a bounded queue. A failure
/// (file missing, unreadable, shrinking) ends the stream with an error item, which makes the
/// HTTP server abort the response, so the receiver sees a truncated transfer. The status line
/// goes out before the first chunk, so a route should check that the file exists (and answer
/// 404) before starting the stream. Dropping the stream (a client gone) stops the reader at its
/// next chunk.
pub fn extent_stream(path: PathBuf) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    enum State {
        NotStarted(PathBuf),
        Running(mpsc::Receiver<Chunk>),
    }
    futures::stream::unfold(State::NotStarted(path), |state| async move {
        let mut rx = match state {
            State::NotStarted(path) => {
                let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = produce(&path, &tx) {
                        debug!(path = %path.display(), error = %e, "extent stream failed");
                        let _ = tx.blocking_send(Err(e));
                    }
                });
                rx
            }
            State::Running(rx) => rx,
        };
        let item = rx.recv().await?;
        Some((item, State::Running(rx)))
    })
}

/// Reads and frames the whole file into `tx`. Stops with BrokenPipe when the stream was dropped.
fn produce(path: &Path, tx: &mpsc::Sender<Chunk>) -> io::Result<()> {
    let named = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    let file = File::open(path).map_err(|e| named("opening", e))?;
    let size = file
        .metadata()
        .map_err(|e| named("reading metadata of", e))?
        .len();
    let extents = extents_within(&file, size).map_err(|e| named("finding data extents of", e))?;
    // Advice only: the file is read once, front to back.
    let _ = posix_fadvise(&file, 0, 0, PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL);
    debug!(
        path = %path.display(),
        size,
        extents = extents.len(),
        data = extents.iter().map(|e| e.len).sum::<u64>(),
        "sending extents"
    );

    let mut out = Framer {
        tx,
        buf: BytesMut::with_capacity(CHUNK),
    };
    out.buf.put_slice(&wire::header(size));
    for extent in extents {
        out.make_room(HEAD_LEN)?;
        out.buf
            .put_slice(&wire::record_header(extent.offset, extent.len));
        let mut done = 0u64;
        while done < extent.len {
            out.make_room(1)?;
            let n = (CHUNK - out.buf.len()).min((extent.len - done) as usize);
            let start = out.buf.len();
            out.buf.resize(start + n, 0);
            // A short read (the file shrank) is UnexpectedEof: the stream must not lie about
            // the record's length.
            file.read_exact_at(&mut out.buf[start..], extent.offset + done)
                .map_err(|e| named("reading", e))?;
            done += n as u64;
        }
    }
    out.make_room(HEAD_LEN)?;
    out.buf.put_slice(&wire::record_header(size, 0));
    out.send()
}

/// Gathers frames into chunks of at most [`CHUNK`] bytes and sends them.
struct Framer<'a> {
    tx: &'a mpsc::Sender<Chunk>,
    buf: BytesMut,
}

impl Framer<'_> {
    /// Sends the current chunk if fewer than `n` bytes fit in it.
    fn make_room(&mut self, n: usize) -> io::Result<()> {
        if CHUNK - self.buf.len() < n {
            self.send()?;
        }
        Ok(())
    }

    fn send(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.buf, BytesMut::with_capacity(CHUNK)).freeze();
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the receiver went away"))
    }
}
