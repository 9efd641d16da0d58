//! Writeback while a file is being written: every [`WINDOW`] bytes written, a helper thread
//! writes the window back ([`crate::os::pagecache::write_back`]: no journal commit, the final
//! `fsync` is the owner's) and (unless the caller reads the file again at once, see [`Pages`])
//! drops its pages from the page cache.
//!
//! Without it a copy or transfer leaves the whole file dirty in memory until the final sync,
//! which then waits for all of it: the disk would work after the network instead of with it,
//! and a large image would fill the page cache. The writer is held back (bounded queue) so at
//! most about three windows are dirty at once. This module must not decide what is written
//! where, nor do the final sync: its owner does both.

use std::fs::File;
use std::io;
use std::sync::mpsc::{SyncSender, sync_channel};

/// Bytes written between two writebacks.
pub(super) const WINDOW: u64 = 16 << 20;

/// Handle given to the writing code: report each write with [`Writeback::wrote`].
pub(super) struct Writeback {
    tx: Option<SyncSender<(u64, u64)>>,
    /// The range written since the last hand-over (writes go forward, so one range covers them).
    start: u64,
    end: u64,
    pending: u64,
}

impl Writeback {
    /// `len` bytes were written at `offset` (offsets only grow between calls).
    pub(super) fn wrote(&mut self, offset: u64, len: u64) {
        if self.pending == 0 {
            self.start = offset;
        }
        self.end = offset + len;
        self.pending += len;
        if self.pending >= WINDOW {
            self.pending = 0;
            // A closed queue means the flusher stopped on an error, which its join reports.
            if let Some(tx) = &self.tx
                && tx.send((self.start, self.end)).is_err()
            {
                self.tx = None;
            }
        }
    }
}

/// What the flusher does with a window's pages once they are on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pages {
    /// Drop them: a large image must not fill the page cache.
    Drop,
    /// Keep them: the caller reads the whole file again at once (a rebuild's compare), which
    /// would otherwise read it back from the disk.
    Keep,
}

/// Runs `body` with a flusher thread behind it; returns `body`'s result, or the flusher's
/// error if `body` succeeded and the flusher did not.
pub(super) fn with_writeback<T>(
    file: &File,
    pages: Pages,
    body: impl FnOnce(&mut Writeback) -> io::Result<T>,
) -> io::Result<T> {
    std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<(u64, u64)>(1);
        let flusher = scope.spawn(move || -> io::Result<()> {
            for (from, to) in rx {
                crate::os::pagecache::write_back(file, from, to, pages == Pages::Drop)?;
            }
            Ok(())
        });
        let mut writeback = Writeback {
            tx: Some(tx),
            start: 0,
            end: 0,
            pending: 0,
        };
        let result = body(&mut writeback);
        drop(writeback);
        let flushed = flusher
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("writeback thread panicked")));
        let value = result?;
        flushed?;
        Ok(value)
    })
}
