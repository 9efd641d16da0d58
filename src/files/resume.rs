//! What a node does with its files after a restart of bicsi or a return after being away: work cut
//! off starts again (an upload cannot and fails), ready files are verified once per process start,
//! files marked unknown are verified and reused, partial files of dead work and files of deleted
//! images are removed. It must not run on its own: the node calls it at start-up and after it
//! registers again.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{FileManagers, FileReport};
use crate::download;
use crate::error::Result;
use crate::model::SourceType;
use crate::model::file_state::FileState;

impl FileManagers {
    /// After a restart or a return: work that was cut off starts again (from the beginning, but
    /// a first download goes on from its partial file when the server offers the same file), ready files that disappeared are reported failed, files marked
    /// unknown while the node was away are verified and reused, and files of images that no
    /// longer exist are removed.
    pub async fn resume(self: &Arc<Self>) -> Result<()> {
        let images = self.records.images()?;
        let first_start = !self.verified_at_start.load(Ordering::SeqCst);
        // The partial files of work cut off by the restart go before any work starts again
        // (a restarted download or export writes its temp file at once); those of work running
        // in this process now (a node registering again after a controller restart) stay.
        // A first download cut off keeps its partial file and validator: the download that
        // starts again below goes on from them when the server still offers the same file.
        for d in &self.disks {
            let live: Vec<PathBuf> = images
                .iter()
                .filter(|bi| {
                    self.running(&d.id, bi.name())
                        || (bi.spec.source_type == SourceType::Download && !bi.has_ready_file())
                })
                .flat_map(|bi| {
                    let tmp = d.image_tmp(bi);
                    [download::resume_path(&tmp), tmp]
                })
                .collect();
            // A conversion an earlier process started may still be writing here.
            crate::os::image::kill_stray_jobs(&d.tmp_dir());
            for e in std::fs::read_dir(d.tmp_dir())
                .into_iter()
                .flatten()
                .flatten()
            {
                if !live.contains(&e.path()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        for bi in &images {
            for disk in self.disks.clone() {
                let Some(f) = bi.status.disk_file_status_map.get(&disk.id) else {
                    continue;
                };
                // Work running in this process now goes on untouched.
                if !f.state.is_final() && self.running(&disk.id, bi.name()) {
                    continue;
                }
                // Unknown: the controller lost this node (down longer than
                // `--node-down-after`) and no longer knows what the file was. With the file on
                // the disk it is verified and reused below; without it, it was work cut off by
                // the same restart or outage (a first download, a sync), which starts again
                // like any other, not a ready file that disappeared.
                let state = if f.state == FileState::Unknown && !disk.image_file(bi).is_file() {
                    FileState::Pending
                } else {
                    f.state
                };
                match state {
                    // An upload cut off by the restart cannot go on: its client has gone.
                    FileState::Starting | FileState::InProgress | FileState::Pending
                        if bi.spec.source_type == SourceType::Upload =>
                    {
                        self.report(
                            bi.name(),
                            &disk,
                            FileReport::new(
                                FileState::Failed,
                                0,
                                "upload interrupted by a restart of bicsi; upload again",
                            ),
                        )
                        .await?;
                    }
                    FileState::Starting | FileState::InProgress | FileState::Pending => {
                        // Back to pending in one report, never failed on the way: the work
                        // is redone, not lost.
                        self.report(
                            bi.name(),
                            &disk,
                            FileReport::restarting("interrupted by a restart of bicsi; restarting"),
                        )
                        .await?;
                        if !bi.has_ready_file() {
                            self.prepare_first_file(bi.name(), &disk.id)?;
                        } else if let Err(e) = self.start_sync(bi, &disk).await {
                            // A copy cut off by the restart starts again from a ready file;
                            // with none reachable yet, it fails, and the next attach (or
                            // recovery) starts it.
                            self.report(
                                bi.name(),
                                &disk,
                                FileReport::new(
                                    FileState::Failed,
                                    0,
                                    format!("interrupted by a restart of bicsi; {e}"),
                                ),
                            )
                            .await?;
                        }
                    }
                    // Start-up verification: a ready file is hashed again before it is used
                    // again; a changed or missing one fails, and recovery replaces it.
                    FileState::Ready if first_start => {
                        let report = self.verify(bi, &disk, "start-up verification").await;
                        if report.state != FileState::Ready {
                            tracing::warn!(image = %bi.name(), disk = %disk.id, message = %report.message, "ready file failed its start-up verification");
                            self.report(bi.name(), &disk, report).await?;
                        }
                    }
                    FileState::Ready if !disk.image_file(bi).is_file() => {
                        self.report(
                            bi.name(),
                            &disk,
                            FileReport::new(
                                FileState::Failed,
                                0,
                                format!("the ready file is missing from disk {}", disk.id),
                            ),
                        )
                        .await?;
                    }
                    // This node was away: its files are verified and reused, not fetched again.
                    FileState::Unknown => {
                        let report = self.verify(bi, &disk, "its node returned").await;
                        self.report(bi.name(), &disk, report).await?;
                    }
                    _ => {}
                }
            }
        }
        // Files of images deleted while this node was away.
        let live: Vec<String> = images.iter().map(|b| b.dir_name()).collect();
        for d in &self.disks {
            let Ok(entries) = std::fs::read_dir(d.backing_images_dir()) else {
                continue;
            };
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !live.contains(&n) {
                    tracing::info!(disk = %d.id, dir = %n, "removing the files of a deleted backing image");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        for d in self.disks.clone() {
            let has = std::fs::read_dir(d.backing_images_dir())
                .map(|mut i| i.next().is_some())
                .unwrap_or(false);
            if has {
                self.manager(&d);
            }
        }
        self.verified_at_start.store(true, Ordering::SeqCst);
        Ok(())
    }
}
