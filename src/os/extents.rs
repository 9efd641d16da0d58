//! Where a file's data is: its data extents from `SEEK_DATA`/`SEEK_HOLE`, and the bytes it
//! occupies on disk.
//!
//! This module only asks the filesystem; it must not read file contents or change a file. The
//! extents are a snapshot: a file written meanwhile may have more or fewer, so callers that
//! promise a peer some bytes must still check every read.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

/// A run of a file's bytes that holds data (anything outside every extent is a hole: zeros that
/// take no space).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    /// The offset just past the extent.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Data extents of a file, ordered, adjacent ones merged, all within the file's size.
///
/// Uses `lseek(SEEK_DATA/SEEK_HOLE)`, so the file's offset is moved (callers read and write at
/// explicit offsets). A filesystem without `SEEK_DATA` support yields one extent covering the
/// whole file; an empty file yields none. Extents have the filesystem's granularity (a block on
/// ext4/XFS), so they can include a few zeros around the data.
pub fn data_extents(file: &File) -> io::Result<Vec<Extent>> {
    let size = file.metadata()?.len();
    extents_within(file, size)
}

/// Bytes the file's blocks take on disk (`st_blocks * 512`): for a sparse file, its data (block
/// rounded) plus the filesystem's metadata for it, not its size.
pub fn allocated_bytes(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// [`data_extents`] of the first `size` bytes of `file` (its size when the caller looked).
pub(crate) fn extents_within(file: &File, size: u64) -> io::Result<Vec<Extent>> {
    extents_in(file, 0, size)
}

/// The data extents of `file` between `from` and `size` (clipped to that range): what a copy of
/// one chunk of a file must read. Same rules as [`data_extents`].
pub fn extents_in(file: &File, from: u64, size: u64) -> io::Result<Vec<Extent>> {
    let whole = || {
        (size > from)
            .then_some(Extent {
                offset: from,
                len: size - from,
            })
            .into_iter()
            .collect()
    };
    let mut extents: Vec<Extent> = Vec::new();
    let mut pos = from;
    while pos < size {
        let start = match lseek(file, to_off(pos)?, Whence::SeekData) {
            Ok(start) => start as u64,
            // No data at or after `pos`: the rest is a hole.
            Err(Errno::ENXIO) => break,
            // No SEEK_DATA here (old kernels, some network and FUSE filesystems): all data.
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(whole()),
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match lseek(file, to_off(start)?, Whence::SeekHole) {
            Ok(end) => (end as u64).min(size),
            // The file shrank between the two calls; what is left of it is covered by `size`.
            Err(Errno::ENXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            // A filesystem answering inconsistently: call the rest data rather than loop.
            push_merged(&mut extents, start, size);
            break;
        }
        push_merged(&mut extents, start, end);
        pos = end;
    }
    Ok(extents)
}

fn push_merged(extents: &mut Vec<Extent>, start: u64, end: u64) {
    match extents.last_mut() {
        Some(last) if last.end() >= start => last.len = end.max(last.end()) - last.offset,
        _ => extents.push(Extent {
            offset: start,
            len: end - start,
        }),
    }
}

fn to_off(pos: u64) -> io::Result<i64> {
    i64::try_from(pos).map_err(|_| io::Error::from_raw_os_error(Errno::EFBIG as i32))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn ext(offset: u64, len: u64) -> Extent {
        Extent { offset, len }
    }

    /// A file of `size` bytes with `data` written at each offset, synced so that every
    /// filesystem reports its extents (not only those that see delayed allocations).
    fn sparse_file(dir: &Path, name: &str, size: u64, writes: &[(u64, &[u8])]) -> File {
        let path = dir.join(name);
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(size).unwrap();
        for (offset, data) in writes {
            file.write_all_at(data, *offset).unwrap();
        }
        file.sync_all().unwrap();
        file
    }

    #[test]
    fn data_extents_of_a_sparse_file_are_ordered_merged_and_block_rounded() {
        let dir = tempfile::tempdir().unwrap();
        let block = vec![0xa5u8; 4096];
        let big = vec![0x5au8; 64 * 1024];
        let file = sparse_file(
            dir.path(),
            "sparse",
            10 * MIB,
            &[
                // Written out of order, and two adjacent blocks written separately.
                (5 * MIB + 100, b"x"),
                (MIB, &big),
                (0, &block),
                (8 * MIB, &block),
                (8 * MIB + 4096, &block),
            ],
        );
        let extents = data_extents(&file).unwrap();
        assert_eq!(
            extents,
            vec![
                ext(0, 4096),
                ext(MIB, 64 * 1024),
                ext(5 * MIB, 4096),
                ext(8 * MIB, 8192),
            ]
        );
    }

    #[test]
    fn data_extents_clip_to_size_and_cover_data_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        // Size not a multiple of the block; the last extent ends at the file's end.
        let file = sparse_file(
            dir.path(),
            "tail",
            3 * MIB + 10,
            &[(3 * MIB, b"0123456789")],
        );
        assert_eq!(data_extents(&file).unwrap(), vec![ext(3 * MIB, 10)]);
    }

    #[test]
    fn data_extents_of_empty_hole_only_and_dense_files() {
        let dir = tempfile::tempdir().unwrap();
        let empty = sparse_file(dir.path(), "empty", 0, &[]);
        assert_eq!(data_extents(&empty).unwrap(), vec![]);
        let holes = sparse_file(dir.path(), "holes", 7 * MIB, &[]);
        assert_eq!(data_extents(&holes).unwrap(), vec![]);
        let dense = sparse_file(dir.path(), "dense", 100_000, &[(0, &[1u8; 100_000])]);
        assert_eq!(data_extents(&dense).unwrap(), vec![ext(0, 100_000)]);
    }

    #[test]
    fn extents_within_a_smaller_size_stop_there() {
        let dir = tempfile::tempdir().unwrap();
        let file = sparse_file(
            dir.path(),
            "f",
            4 * MIB,
            &[(0, &[1u8; 8192]), (2 * MIB, b"z")],
        );
        assert_eq!(extents_within(&file, 4096).unwrap(), vec![ext(0, 4096)]);
        assert_eq!(extents_within(&file, MIB).unwrap(), vec![ext(0, 8192)]);
    }

    #[test]
    fn push_merged_joins_touching_and_overlapping_runs() {
        let mut v = Vec::new();
        push_merged(&mut v, 0, 10);
        push_merged(&mut v, 10, 20);
        push_merged(&mut v, 15, 18);
        push_merged(&mut v, 30, 40);
        assert_eq!(v, vec![ext(0, 20), ext(30, 10)]);
    }

    #[test]
    fn allocated_bytes_counts_blocks_not_size() {
        let dir = tempfile::tempdir().unwrap();
        sparse_file(
            dir.path(),
            "sparse",
            64 * MIB,
            &[(0, &[7u8; 8192]), (32 * MIB, &[9u8; 4096])],
        );
        let allocated = allocated_bytes(&dir.path().join("sparse")).unwrap();
        assert!(allocated >= 12 * 1024, "allocated {allocated}");
        assert!(allocated < MIB, "allocated {allocated} for 12 KiB of data");
        sparse_file(dir.path(), "dense", MIB, &[(0, &vec![1u8; MIB as usize])]);
        let dense = allocated_bytes(&dir.path().join("dense")).unwrap();
        assert!(dense >= MIB, "allocated {dense}");
    }
}
