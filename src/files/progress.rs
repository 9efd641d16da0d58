//! Progress of running work as the controller sees it: a sink that keeps the percentage a copy
//! has done, and a wrapper that reports it once a second while the work runs. It must not decide
//! a file's state beyond "in progress".

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use super::{FileManagers, FileReport};
use crate::model::Disk;
use crate::model::file_state::FileState;

/// How often the progress of running work is reported.
pub(super) const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

impl FileManagers {
    /// Runs `work` while reporting its progress once a second.
    pub(super) async fn with_progress<T>(
        &self,
        name: &str,
        disk: &Disk,
        progress: &AtomicU8,
        message: &str,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        tokio::pin!(work);
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        let mut last = 0u8;
        loop {
            tokio::select! {
                r = &mut work => return r,
                _ = tick.tick() => {
                    let p = progress.load(Ordering::Relaxed);
                    if p != last {
                        last = p;
                        let _ = self
                            .report(name, disk, FileReport::new(FileState::InProgress, p, message))
                            .await;
                    }
                }
            }
        }
    }
}

/// A progress sink that keeps the percentage done (at most 99 until the file is ready).
pub(super) fn percent_sink(p: Arc<AtomicU8>) -> impl Fn(u64, Option<u64>) + Send + Sync {
    move |done, total| {
        if let Some(t) = total.filter(|t| *t > 0) {
            p.store(
                (done.saturating_mul(100) / t).min(99) as u8,
                Ordering::Relaxed,
            );
        }
    }
}
