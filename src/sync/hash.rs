//! SHA-512 of a file's logical content without reading its holes: the data extents are read
//! from disk, the zeros between them are hashed from a static zero buffer.
//!
//! This module owns [`sha512_sparse`] (and [`hash_sparse`], which also builds the file's chunk
//! [`Manifest`] in the same pass) and the zero-hashing helper the receiver shares. It must not
//! write files or drop their page cache (the file it hashes may be in use by replicas).
//! SHA-512 runs on one core at about 0.5 GiB/s and cannot be split, so reading (and the
//! manifest's SHA-256 of the data chunks) is done on a second thread, a few chunks ahead, and
//! the whole takes max(read, hash) rather than their sum.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
use sha2::{Digest, Sha512};

use super::SyncError;
use super::manifest::{CHUNK_SIZE, Manifest, ManifestBuilder};
use crate::os::extents::extents_within;

/// Zeros for hashing holes: small enough to stay in the CPU cache while it is hashed over and
/// over, large enough that the per-call overhead does not show.
pub(super) static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Bytes read from disk at a time.
const READ_CHUNK: usize = 1 << 20;
/// Chunks the reader may be ahead of the hasher.
const READ_AHEAD: usize = 4;

/// Feeds `n` zero bytes to `hasher` without touching memory beyond [`ZEROS`].
pub(super) fn hash_zeros(hasher: &mut Sha512, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Computes SHA-512 of the file's full logical content (holes hashed as zeros, without reading
/// them from disk) in one pass over the data extents. Returns lower-case hex.
///
/// Blocking: call it from a blocking thread. The file must not change while it is hashed (a
/// file that shrinks meanwhile is an error, one that grows is hashed up to its size at the
/// start).
pub fn sha512_sparse(path: &Path) -> Result<String, SyncError> {
    hash_sparse(path).map(|(sha512, _)| sha512)
}

/// [`sha512_sparse`] and, from the same bytes in the same pass, the file's chunk manifest
/// (chunks of [`CHUNK_SIZE`], SHA-256 on the reading thread). The manifest names the SHA-512
/// computed here: keep it only if that SHA-512 is the expected one.
pub fn hash_sparse(path: &Path) -> Result<(String, Manifest), SyncError> {
    let err = |what: &str, e: std::io::Error| SyncError::io(what, path, e);
    let file = File::open(path).map_err(|e| err("opening", e))?;
    let size = file
        .metadata()
        .map_err(|e| err("reading metadata of", e))?
        .len();
    let extents = extents_within(&file, size).map_err(|e| err("finding data extents of", e))?;
    // Advice only: read-ahead helps, and without it the result is the same.
    let _ = posix_fadvise(&file, 0, 0, PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL);

    let mut hasher = Sha512::new();
    let mut hashed = 0u64;
    let mut builder = std::thread::scope(|scope| {
        let (full_tx, full_rx) = sync_channel::<(u64, Vec<u8>)>(READ_AHEAD);
        let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(READ_AHEAD + 2);
        for _ in 0..READ_AHEAD + 2 {
            let _ = empty_tx.send(Vec::new());
        }
        let file = &file;
        let reader = scope.spawn(move || read_extents(file, &extents, full_tx, empty_rx));
        for (offset, chunk) in full_rx {
            hash_zeros(&mut hasher, offset - hashed);
            hasher.update(&chunk);
            hashed = offset + chunk.len() as u64;
            // The reader may have stopped on an error; its result says so below.
            let _ = empty_tx.send(chunk);
        }
        drop(empty_tx);
        reader
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("sha512 reader thread panicked")))
    })
    .map_err(|e| err("reading", e))?;
    hash_zeros(&mut hasher, size - hashed);
    builder.zeros(size - builder.position());
    let sha512 = hex::encode(hasher.finalize());
    let manifest = builder.finish(&sha512);
    Ok((sha512, manifest))
}

/// Reads every extent in chunks, in order, into recycled buffers, feeds each to the manifest
/// builder (holes as zeros) and sends it with its offset. Stops quietly when the hasher has
/// gone; returns the builder, fed up to the end of the last extent.
fn read_extents(
    file: &File,
    extents: &[super::Extent],
    full: SyncSender<(u64, Vec<u8>)>,
    empty: Receiver<Vec<u8>>,
) -> std::io::Result<ManifestBuilder> {
    let mut builder = ManifestBuilder::new(CHUNK_SIZE);
    for extent in extents {
        builder.zeros(extent.offset - builder.position());
        let mut done = 0u64;
        while done < extent.len {
            let Ok(mut buf) = empty.recv() else {
                return Ok(builder);
            };
            let n = (extent.len - done).min(READ_CHUNK as u64) as usize;
            buf.resize(n, 0);
            // A short read means the file shrank under us: read_exact_at says UnexpectedEof.
            file.read_exact_at(&mut buf, extent.offset + done)?;
            builder.update(&buf);
            if full.send((extent.offset + done, buf)).is_err() {
                return Ok(builder);
            }
            done += n as u64;
        }
    }
    Ok(builder)
}
