//! Bringing an image's file to a disk from a ready one: copied from another disk of this node
//! (reflink where possible, else a sparse copy) or transferred from another node (data extents
//! only, verified against the sender's chunk manifest or the whole SHA-512), each holding a
//! sync slot ([`super::slots`]) while it runs. It picks the source and reports pending, progress
//! and the outcome; it must not make a first file from an image's data source.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU8;
use std::time::Duration;

use super::progress::percent_sink;
use super::{FileManagers, FileReport, read_manifest, ready_on};
use crate::error::{Error, Result};
use crate::fsutil::blocking;
use crate::model::backing_image::BackingImage;
use crate::model::file_state::FileState;
use crate::model::{Disk, NodeRecord};

/// A transfer from another node that receives nothing for this long fails (and is retried).
const TRANSFER_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl FileManagers {
    /// The ready file of the image on `disk_id`, or a retryable error while it is prepared there:
    /// copied from another disk of this node (reflink where possible, else a sparse copy), or
    /// transferred from another node (data extents only, verified on arrival against the sender's
    /// chunk manifest, or by the whole SHA-512 without a usable one). A later
    /// call continues the same work; it never starts it twice.
    pub async fn ensure_file(self: &Arc<Self>, name: &str, disk_id: &str) -> Result<PathBuf> {
        let disk = self.disk(disk_id)?.clone();
        let bi = self.image(name)?;
        let path = disk.image_file(&bi);
        if ready_on(&bi, &disk.id) && path.is_file() {
            return Ok(path);
        }
        let running = self
            .manager(&disk)
            .tasks
            .lock()
            .expect("tasks poisoned")
            .contains_key(name);
        let state = bi.status.disk_file_status_map.get(&disk.id);
        if running || state.is_some_and(|f| !f.state.is_final() && f.state != FileState::Unknown) {
            let (s, p, m) = state
                .map(|f| (f.state.as_str(), f.progress, f.message.clone()))
                .unwrap_or(("pending", 0, String::new()));
            return Err(Error::Unavailable(format!(
                "backing image {name:?} is being prepared on disk {}: {s} {p}%{}; retry shortly",
                disk.id,
                if m.is_empty() {
                    String::new()
                } else {
                    format!(" ({m})")
                }
            )));
        }
        self.start_sync(&bi, &disk).await?;
        Err(Error::Unavailable(format!(
            "backing image {name:?} is being prepared on disk {}; retry shortly",
            disk.id
        )))
    }

    /// Starts bringing the image's file to `disk` from a ready one (pending until a sync slot
    /// frees), or says why no ready file can be its source yet.
    pub(super) async fn start_sync(self: &Arc<Self>, bi: &BackingImage, disk: &Disk) -> Result<()> {
        let source = self.pick_source(bi, disk)?;
        let name = bi.name();
        let d = disk.clone();
        let n = name.to_string();
        self.report(
            name,
            disk,
            FileReport::new(FileState::Pending, 0, source.describe()),
        )
        .await?;
        self.spawn(name, disk, move |this, _cancel| {
            Box::pin(async move { this.sync_file(&n, &d, source).await })
        });
        Ok(())
    }

    fn pick_source(&self, bi: &BackingImage, disk: &Disk) -> Result<Source> {
        if let Some(local) = self
            .disks
            .iter()
            .find(|d| d.id != disk.id && ready_on(bi, &d.id) && d.image_file(bi).is_file())
        {
            return Ok(Source::Local(local.clone()));
        }
        for (disk_id, f) in &bi.status.disk_file_status_map {
            if f.state != FileState::Ready || f.node_id == self.node_id || f.node_id.is_empty() {
                continue;
            }
            let node: Option<NodeRecord> = self.records.node(&f.node_id)?;
            if let Some(n) = node.filter(|n| n.up && !n.transfer_url.is_empty()) {
                return Ok(Source::Remote {
                    node_id: n.node_id,
                    disk_id: disk_id.clone(),
                    url: format!(
                        "{}/v1/files/{}",
                        n.transfer_url.trim_end_matches('/'),
                        bi.dir_name()
                    ),
                });
            }
        }
        Err(Error::Unavailable(format!(
            "backing image {:?} has no ready file to bring to disk {} yet: {}",
            bi.name(),
            disk.id,
            bi.describe()
        )))
    }

    async fn sync_file(&self, name: &str, disk: &Disk, source: Source) -> Result<()> {
        let message = source.describe();
        // "At most this many syncs at once per node; others wait in pending."
        let slot = match self.syncs.try_take(self.sync_limit()) {
            Some(slot) => slot,
            None => {
                self.report(
                    name,
                    disk,
                    FileReport::new(
                        FileState::Pending,
                        0,
                        format!(
                            "waiting: {} syncs run on node {} (concurrent-backing-image-syncs-per-node)",
                            self.syncs.running(),
                            self.node_id
                        ),
                    ),
                )
                .await?;
                self.syncs.take(|| self.sync_limit()).await
            }
        };
        let _slot = slot;
        let mut transfer = crate::counters::Transfer::start(match source {
            Source::Local(_) => crate::counters::TransferKind::SyncSameNode,
            Source::Remote { .. } => crate::counters::TransferKind::SyncCrossNode,
        });
        let bi = self.image(name)?;
        self.report(
            name,
            disk,
            FileReport::new(FileState::Starting, 0, &message),
        )
        .await?;
        self.report(
            name,
            disk,
            FileReport::new(FileState::InProgress, 0, &message),
        )
        .await?;
        let tmp = disk.image_tmp(&bi);
        let _ = std::fs::remove_file(&tmp);
        if bi.status.checksum.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "backing image {name:?} has no checksum yet; its first file is not ready"
            )));
        }
        let (sha512, size, manifest) = match &source {
            Source::Local(from) => {
                let src = from.image_file(&bi);
                let t = tmp.clone();
                let checksum = bi.status.checksum.clone();
                let (outcome, manifest) = blocking(move || {
                    let manifest = read_manifest(&src, &checksum);
                    crate::sync::local_copy(&src, &t)
                        .map(|o| (o, manifest))
                        .map_err(|e| Error::Internal(e.to_string()))
                })
                .await?;
                tracing::info!(image = %name, disk = %disk.id, method = ?outcome.method, bytes = outcome.bytes_copied, "copied backing image file between disks");
                transfer.moved(outcome.bytes_copied);
                // Same bytes of the same node, copied by the kernel: the checksum is the image's.
                let size = std::fs::metadata(&tmp)
                    .map_err(|e| Error::Internal(format!("{}: {e}", tmp.display())))?
                    .len();
                (bi.status.checksum.clone(), size, manifest)
            }
            Source::Remote { url, .. } => {
                let progress = Arc::new(AtomicU8::new(0));
                let sink = percent_sink(progress.clone());
                let manifest_url = format!("{url}/manifest");
                let work = crate::sync::receive_from_peer(
                    url,
                    &manifest_url,
                    &tmp,
                    &bi.status.checksum,
                    TRANSFER_IDLE_TIMEOUT,
                    &sink,
                    self.peer_tls.get().cloned(),
                );
                let outcome = self
                    .with_progress(name, disk, &progress, &message, work)
                    .await
                    .map_err(|e| {
                        use crate::sync::SyncError;
                        if matches!(
                            e,
                            SyncError::ChecksumMismatch { .. } | SyncError::ChunkMismatch { .. }
                        ) {
                            crate::counters::checksum_failure("transfer");
                        }
                        Error::Unavailable(format!("backing image {name:?}, disk {}: {e}", disk.id))
                    })?;
                transfer.moved(outcome.bytes_on_wire + outcome.manifest_bytes);
                let verified = match &outcome.verified {
                    crate::sync::Verified::Manifest => "manifest",
                    crate::sync::Verified::Sha512 { .. } => "sha512",
                };
                tracing::info!(image = %name, disk = %disk.id, wire = outcome.bytes_on_wire, manifest = outcome.manifest_bytes, data = outcome.data_bytes, verified = %verified, "received backing image file");
                (outcome.sha512, outcome.size, Some(outcome.manifest))
            }
        };
        self.finish_file(name, disk, &tmp, sha512, size, manifest)
            .await
            .map(|()| transfer.ok(size))
    }
}

/// Where a file for a disk comes from.
#[derive(Clone, Debug)]
enum Source {
    Local(Disk),
    Remote {
        node_id: String,
        disk_id: String,
        url: String,
    },
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::Local(d) => format!("copying from disk {}", d.id),
            Source::Remote {
                node_id, disk_id, ..
            } => {
                format!("transferring from disk {disk_id} of node {node_id}")
            }
        }
    }
}
