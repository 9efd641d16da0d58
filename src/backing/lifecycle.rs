//! What happens to backing image files over time, run by the controller at every lifecycle tick
//! (`--lifecycle-tick-ms`): deadlines ([`BackingImages::expire`]), recovery of failed files and
//! cleanup of unused ones, and the manual cleanup of chosen disks. The rules are the seed's:
//!
//! - "Longhorn automatically cleans up the unused backing image files in the disks based on the
//!   setting Backing Image Cleanup Wait Interval. But Longhorn will retain at least one file in a
//!   disk for each backing image anyway": at least `minNumberOfCopies` files, ready ones first.
//! - "Once there is one replica in a disk using a backing image, no matter what the replica's
//!   current state is, the backing image file in this disk cannot be cleaned up."
//! - "If there is still a ready backing image file in one disk, Longhorn will automatically clean
//!   up the failed backing image files then re-launch these files from the ready one."
//! - "If somehow all files of a backing image become failed": a download downloads again, an
//!   export exports again, an upload cannot be recovered and says so.
//!
//! Time comes from the images' [`Clock`](crate::clock::Clock); the node does the file work.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::object::{BackingImage, SourceType};
use super::state::FileState;
use super::{BackingImages, set_file};
use crate::error::Result;
use crate::model::{Disk, Volume, parse_rfc3339, rfc3339};
use crate::store::{Kind, StoreExt};

/// The answer of a manual cleanup.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupResult {
    /// Disk ids whose file was removed.
    pub cleaned: Vec<String>,
    pub refused: Vec<Refusal>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The disk as the user named it (id or path).
    pub disk: String,
    pub reason: String,
}

/// The message of an uploaded image whose files have all failed.
pub fn unrecoverable_upload(name: &str) -> String {
    format!(
        "backing image {name:?} was uploaded and all its files have failed: it cannot be recovered; delete it (bicsi delete backingimage {name}) and upload the file again"
    )
}

/// Which of `candidates` (disk ids) may go, keeping at least `min_copies` files of the image,
/// ready ones before others. `files` are all the image's files (disk id → state).
pub fn removable(
    files: &BTreeMap<String, FileState>,
    candidates: &BTreeSet<String>,
    min_copies: u32,
) -> BTreeSet<String> {
    let min = min_copies.max(1) as usize;
    let staying = files.keys().filter(|d| !candidates.contains(*d));
    let mut kept = staying.clone().count();
    let mut ready_kept = staying.filter(|d| files[*d] == FileState::Ready).count();
    let mut spared = BTreeSet::new();
    // Ready files are kept first, until `min` ready ones stay (or there are no more)...
    for d in candidates.iter().filter(|d| files[*d] == FileState::Ready) {
        if ready_kept < min {
            spared.insert(d.clone());
            ready_kept += 1;
            kept += 1;
        }
    }
    // ...then any file, until `min` files stay.
    for d in candidates.iter().filter(|d| files[*d] != FileState::Ready) {
        if kept < min {
            spared.insert(d.clone());
            kept += 1;
        }
    }
    candidates.difference(&spared).cloned().collect()
}

impl BackingImages {
    /// One lifecycle round: deadlines, recovery, cleanup.
    pub async fn tick(&self) -> Result<()> {
        let now = self.now();
        self.expire(now).await?;
        self.recover().await?;
        self.cleanup(now).await?;
        Ok(())
    }

    /// Disk id → the volumes with a replica on that disk that use the image (any replica
    /// state, deferred ones too).
    fn disks_in_use(&self, name: &str) -> Result<BTreeMap<String, Vec<String>>> {
        let volumes: Vec<Volume> = self.store.list(Kind::Volume)?;
        let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for v in volumes
            .iter()
            .filter(|v| v.spec.backing_image.as_deref() == Some(name))
        {
            for r in &v.replicas {
                let list = used.entry(r.disk_id.clone()).or_default();
                if !list.contains(&v.spec.name) {
                    list.push(v.spec.name.clone());
                }
            }
        }
        Ok(used)
    }

    /// Removes the image's file on one disk (through its node) and its entry in the status.
    async fn remove_file(&self, name: &str, disk_id: &str, node_id: &str) -> Result<()> {
        self.cluster
            .agent(node_id)?
            .delete_image_file(name, disk_id)
            .await?;
        self.update(name, |bi| {
            bi.status.disk_file_status_map.remove(disk_id);
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Automatic cleanup at `now`: records since when each file is unused, and removes the
    /// files unused for longer than `backing-image-cleanup-wait-interval`, within the rules.
    /// Returns the (image, disk) pairs removed.
    pub async fn cleanup(&self, now: u64) -> Result<Vec<(String, String)>> {
        let wait = self.settings.cleanup_wait().as_secs();
        let mut removed = Vec::new();
        for bi in self.list()? {
            let name = bi.name().to_string();
            let used = self.disks_in_use(&name)?;
            // Since when each file is unused: set when first seen unused, cleared when used.
            let marks: Vec<(String, String)> = bi
                .status
                .disk_file_status_map
                .iter()
                .filter_map(|(d, f)| {
                    let want = if used.contains_key(d) {
                        String::new()
                    } else if f.unused_since.is_empty() {
                        rfc3339(now)
                    } else {
                        return None;
                    };
                    (want != f.unused_since).then(|| (d.clone(), want))
                })
                .collect();
            let bi = if marks.is_empty() {
                bi
            } else {
                self.update(&name, |bi| {
                    for (d, since) in &marks {
                        if let Some(f) = bi.status.disk_file_status_map.get_mut(d) {
                            f.unused_since = since.clone();
                        }
                    }
                    Ok(())
                })
                .await?
            };
            let candidates: BTreeSet<String> = bi
                .status
                .disk_file_status_map
                .iter()
                .filter(|(d, f)| {
                    !used.contains_key(*d)
                        && matches!(f.state, FileState::Ready | FileState::Failed)
                        && self.cluster.is_up(&f.node_id)
                        && parse_rfc3339(&f.unused_since)
                            .is_some_and(|since| now.saturating_sub(since) >= wait)
                })
                .map(|(d, _)| d.clone())
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let files = states(&bi);
            for disk in removable(&files, &candidates, bi.spec.min_number_of_copies) {
                let node = bi.status.disk_file_status_map[&disk].node_id.clone();
                match self.remove_file(&name, &disk, &node).await {
                    Ok(()) => {
                        tracing::info!(image = %name, disk = %disk, "unused backing image file cleaned up");
                        removed.push((name.clone(), disk));
                    }
                    Err(e) => {
                        tracing::warn!(image = %name, disk = %disk, error = %e, "cannot clean up the file; retrying at the next tick")
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Manual cleanup of the image's files on `disks` (ids or paths), now, by the same rules
    /// as the automatic one but without its wait. Says which disks were cleaned and which were
    /// refused and why.
    pub async fn cleanup_disks(&self, name: &str, disks: &[String]) -> Result<CleanupResult> {
        let bi = self.must_get(name)?;
        if disks.is_empty() {
            return Err(crate::error::Error::InvalidArgument(format!(
                "backing image {name:?}: name at least one disk to clean up (its id or path, as `bicsi get disks` shows)"
            )));
        }
        let known: Vec<Disk> = self
            .store
            .list::<crate::model::NodeRecord>(Kind::Node)?
            .into_iter()
            .flat_map(|n| n.disks)
            .collect();
        let used = self.disks_in_use(name)?;
        let mut result = CleanupResult::default();
        let mut chosen: BTreeMap<String, String> = BTreeMap::new();
        for asked in disks {
            let refuse = |reason: String| Refusal {
                disk: asked.clone(),
                reason,
            };
            let Some(disk) = known
                .iter()
                .find(|d| d.id == *asked || d.path.as_os_str() == asked.as_str())
            else {
                result.refused.push(refuse(
                    "no node has this disk; name a disk by the id or path `bicsi get disks` shows"
                        .into(),
                ));
                continue;
            };
            let Some(f) = bi.status.disk_file_status_map.get(&disk.id) else {
                result.refused.push(refuse(format!(
                    "disk {} holds no file of backing image {name:?}",
                    disk.id
                )));
                continue;
            };
            if let Some(volumes) = used.get(&disk.id) {
                result.refused.push(refuse(format!(
                    "replicas of volumes {} on disk {} use the file; a file that replicas use is never cleaned up",
                    volumes.join(", "),
                    disk.id
                )));
                continue;
            }
            if !matches!(f.state, FileState::Ready | FileState::Failed) {
                result.refused.push(refuse(format!(
                    "the file on disk {} is {}; wait until it is ready or failed",
                    disk.id, f.state
                )));
                continue;
            }
            if !self.cluster.is_up(&f.node_id) {
                result.refused.push(refuse(format!(
                    "node {} of disk {} is down; clean up when it is back",
                    f.node_id, disk.id
                )));
                continue;
            }
            chosen.insert(disk.id.clone(), asked.clone());
        }
        let candidates: BTreeSet<String> = chosen.keys().cloned().collect();
        let allowed = removable(&states(&bi), &candidates, bi.spec.min_number_of_copies);
        for (disk, asked) in &chosen {
            if !allowed.contains(disk) {
                result.refused.push(Refusal {
                    disk: asked.clone(),
                    reason: format!(
                        "backing image {name:?} keeps at least {} file(s) (minNumberOfCopies), ready ones first; the file on disk {disk} is one of them",
                        bi.spec.min_number_of_copies.max(1)
                    ),
                });
                continue;
            }
            let node = bi.status.disk_file_status_map[disk].node_id.clone();
            match self.remove_file(name, disk, &node).await {
                Ok(()) => {
                    tracing::info!(image = %name, disk = %disk, "backing image file cleaned up on request");
                    result.cleaned.push(disk.clone());
                }
                Err(e) => result.refused.push(Refusal {
                    disk: asked.clone(),
                    reason: format!("cannot remove the file: {e}"),
                }),
            }
        }
        Ok(result)
    }

    /// Recovery of failed files, per image: from a ready file when there is one, else from the
    /// data source (an upload cannot be, and says so).
    pub async fn recover(&self) -> Result<()> {
        for bi in self.list()? {
            if let Err(e) = self.recover_image(&bi).await {
                tracing::warn!(image = %bi.name(), error = %e, "cannot recover backing image files yet; retrying at the next tick");
            }
        }
        Ok(())
    }

    async fn recover_image(&self, bi: &BackingImage) -> Result<()> {
        let name = bi.name();
        let files = &bi.status.disk_file_status_map;
        if files.is_empty() {
            return Ok(());
        }
        if bi.has_ready_file() {
            for (disk, f) in files {
                if f.state != FileState::Failed || !self.cluster.is_up(&f.node_id) {
                    continue;
                }
                tracing::info!(image = %name, disk = %disk, "failed file: removing it and syncing it again from a ready one");
                self.remove_file(name, disk, &f.node_id).await?;
                self.cluster
                    .agent(&f.node_id)?
                    .sync_image_file(name, disk)
                    .await?;
            }
            return Ok(());
        }
        // "All files failed": unknown ones count once past the recovery wait, when `expire`
        // has failed them.
        if !files.values().all(|f| f.state == FileState::Failed) {
            return Ok(());
        }
        let now = self.now();
        match bi.spec.source_type {
            SourceType::Upload => {
                let message = unrecoverable_upload(name);
                if bi.status.message == message {
                    return Ok(());
                }
                tracing::warn!(image = %name, "{message}");
                self.update(name, |bi| {
                    bi.status.message = message.clone();
                    let disks: Vec<Disk> = bi
                        .status
                        .disk_file_status_map
                        .iter()
                        .map(|(id, f)| Disk {
                            id: id.clone(),
                            node_id: f.node_id.clone(),
                            path: Default::default(),
                        })
                        .collect();
                    for d in disks {
                        set_file(bi, &d, FileState::Failed, 0, message.clone(), now)?;
                    }
                    Ok(())
                })
                .await?;
            }
            SourceType::Download | SourceType::ExportFromVolume => {
                // Prepared again on the disk of a failed file of an up node with the most free
                // space; the others follow from it once it is ready.
                let space = self.cluster.disks().await?;
                let target = space
                    .iter()
                    .filter(|s| files.contains_key(&s.disk.id))
                    .max_by_key(|s| s.free_bytes)
                    .or_else(|| space.iter().max_by_key(|s| s.free_bytes))
                    .map(|s| s.disk.clone());
                let Some(disk) = target else {
                    return Ok(());
                };
                let verb = if bi.spec.source_type == SourceType::Download {
                    "downloading"
                } else {
                    "exporting"
                };
                tracing::info!(image = %name, disk = %disk.id, "all files failed: {verb} again");
                let agent = self.cluster.agent(&disk.node_id)?;
                if files.contains_key(&disk.id) {
                    agent.delete_image_file(name, &disk.id).await?;
                }
                let message = format!("all files failed; {verb} again");
                self.update(name, |bi| {
                    set_file(bi, &disk, FileState::Pending, 0, message.clone(), now)
                })
                .await?;
                agent.prepare_first_file(name, &disk.id).await?;
            }
        }
        Ok(())
    }
}

fn states(bi: &BackingImage) -> BTreeMap<String, FileState> {
    bi.status
        .disk_file_status_map
        .iter()
        .map(|(d, f)| (d.clone(), f.state))
        .collect()
}
