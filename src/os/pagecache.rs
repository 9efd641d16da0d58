//! The page cache behind the long writers (downloads, same-node copies, cross-node receives):
//! write a range of a file back to the disk while the next ranges are written, then drop its
//! pages, so a large image neither fills memory nor waits for all its writeback at the end.
//!
//! It owns the one kernel call for this, `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)`:
//! it writes the range's dirty pages and waits for them, and nothing else. An `fdatasync` per
//! window, which these writers used before, also commits the filesystem's journal and flushes
//! the device's write cache each time (on ext4 a journal commit per 16 MiB), work the writer's
//! one final `fsync` does anyway. It also holds the writers' one vectored positional write
//! ([`write_all_at`]). This module must not make anything durable: its callers
//! still `fsync` the file when it is complete, and only that makes it durable.

#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};

/// Writes back the dirty pages of `[from, to)` of `file` and waits until they are on the disk
/// (not durable: no journal commit, no cache flush), then, with `drop_pages`, drops them from
/// the page cache (advice only; the pages are clean, so nothing can be lost).
pub fn write_back(file: &File, from: u64, to: u64, drop_pages: bool) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to.saturating_sub(from)))
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("write-back range {from}..{to} is past what the kernel takes"),
        ));
    };
    if len == 0 {
        return Ok(());
    }
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    loop {
        // SAFETY: sync_file_range takes a file descriptor, two integers and flags, and touches
        // no memory of ours; the descriptor is valid for as long as `file` is borrowed.
        let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
        if rc == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if drop_pages {
        let _ = posix_fadvise(file, offset, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
    Ok(())
}

/// Writes all of `slices` at `offset` of `file` with `pwritev`, as one run of bytes, without
/// copying them together first (the writers' blocks are the network's pieces, shared with the
/// hashing workers); returns the bytes written.
pub fn write_all_at(file: &File, offset: u64, slices: &mut [IoSlice<'_>]) -> io::Result<u64> {
    let mut rest = slices;
    let mut written = 0u64;
    while !rest.is_empty() {
        let at = i64::try_from(offset + written).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("write at {offset} is past what the kernel takes"),
            )
        })?;
        match nix::sys::uio::pwritev(file, rest, at) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n as u64;
                IoSlice::advance_slices(&mut rest, n);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(written)
}

/// Bytes of `path` in the page cache (util-linux's `fincore`): for the tests of the writers
/// that drop or keep their pages.
#[cfg(test)]
pub(crate) fn cached_bytes(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux) runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// An empty file to write, read and write back in the tests of the long writers, in a temporary
/// directory on a real filesystem (not /tmp: on a tmpfs the page cache is the storage, nothing
/// is ever dropped, and there are no holes to check).
#[cfg(test)]
pub(crate) fn scratch_file() -> (tempfile::TempDir, std::path::PathBuf, File) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("f");
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    (dir, path, file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A range written back with its pages dropped leaves the page cache (dropping dirty pages
    /// does not: without the write-back they stay), reads back intact, and a range the kernel
    /// cannot take is refused with what it was.
    #[test]
    fn a_written_back_range_leaves_the_page_cache_and_reads_back() {
        let (_dir, path, f) = scratch_file();
        let data: Vec<u8> = (0..(8 << 20)).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all_at(&data, 0).unwrap();
        let before = cached_bytes(&path);
        write_back(&f, 0, 4 << 20, true).unwrap();
        write_back(&f, 4 << 20, 8 << 20, false).unwrap();
        write_back(&f, 5, 5, true).unwrap();
        let after = cached_bytes(&path);
        assert!(before >= 8 << 20, "written pages resident: {before}");
        assert!(
            after <= (4 << 20) + (256 << 10),
            "{before} -> {after} bytes resident"
        );
        assert!(after >= 4 << 20, "the kept half stays: {after}");
        let mut back = vec![0u8; data.len()];
        File::open(&path)
            .unwrap()
            .read_exact_at(&mut back, 0)
            .unwrap();
        assert!(back == data);
        let err = write_back(&f, 0, u64::MAX, false).unwrap_err();
        assert!(
            err.to_string().contains("past what the kernel takes"),
            "{err}"
        );
    }
}
