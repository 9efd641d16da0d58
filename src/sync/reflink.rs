//! The `FICLONE` ioctl: make one file share all of another's blocks (a reflink), in O(1),
//! on filesystems that support it (XFS with reflink, btrfs).
//!
//! The one module of bicsi allowed `unsafe` (the crate root denies it): nix has no `FICLONE`
//! wrapper (and its `ioctl_write_int!` macro would generate an `unsafe fn` anyway), so the call
//! goes to `libc::ioctl` directly. This module must do nothing else: no fallbacks, no file
//! opening, no error interpretation; [`super::local`] decides what a failure means.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;

use nix::errno::Errno;

/// Makes `dst` (open for writing) a reflinked copy of `src` (open for reading): `dst`'s content
/// becomes `src`'s, sharing its blocks. Fails with EXDEV across filesystems and EOPNOTSUPP (or
/// EINVAL, ENOTTY) where the filesystem cannot share blocks.
pub(super) fn ficlone(src: &File, dst: &File) -> nix::Result<()> {
    // SAFETY: FICLONE's argument is the source descriptor, passed by value as an int; no memory
    // is shared with the kernel. Both descriptors come from `File`s borrowed for the whole call,
    // so they are open and cannot be closed or reused while the kernel uses them.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    Errno::result(rc).map(drop)
}
