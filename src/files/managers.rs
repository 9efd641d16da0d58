//! The registry of this node's disk managers: one per disk, started when the disk first needs a
//! file (a task for an image on it) and retired when it holds no file and runs no work. It owns
//! the task table (one running task per image and disk, cancelled on delete), the look-ups every
//! job shares (a disk of this node, an image record, a ready file to serve) and the removal of an
//! image's files. It must not prepare, verify or move files itself: the jobs beside it do, each
//! as a task it spawns.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::{DiskManager, FileManagers, FileReport, SyncSlots, ready_on};
use crate::error::{Error, Result};
use crate::fsutil::blocking;
use crate::model::Disk;
use crate::model::backing_image::BackingImage;
use crate::model::file_state::FileState;

impl FileManagers {
    /// The sync slots of this node (the HTTP sender takes one per file it sends).
    pub fn syncs(&self) -> &SyncSlots {
        &self.syncs
    }

    /// The current `concurrent-backing-image-syncs-per-node`.
    pub fn sync_limit(&self) -> usize {
        self.settings.concurrent_syncs()
    }

    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    pub fn disk(&self, id: &str) -> Result<&Disk> {
        self.disks.iter().find(|d| d.id == id).ok_or_else(|| {
            Error::NotFound(format!(
                "disk {id:?} is not a disk of node {:?}",
                self.node_id
            ))
        })
    }

    /// Ids of the disks whose manager is running.
    pub fn running_managers(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .managers
            .lock()
            .expect("managers poisoned")
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    /// The disk's manager, started on demand.
    pub(super) fn manager(&self, disk: &Disk) -> Arc<DiskManager> {
        self.managers
            .lock()
            .expect("managers poisoned")
            .entry(disk.id.clone())
            .or_insert_with(|| {
                tracing::info!(disk = %disk.id, "backing image manager started");
                Arc::new(DiskManager {
                    disk: disk.clone(),
                    tasks: Mutex::new(HashMap::new()),
                })
            })
            .clone()
    }

    /// Whether work on the image's file on `disk_id` runs in this process now.
    pub(super) fn running(&self, disk_id: &str, image: &str) -> bool {
        self.managers
            .lock()
            .expect("managers poisoned")
            .get(disk_id)
            .is_some_and(|m| m.tasks.lock().expect("tasks poisoned").contains_key(image))
    }

    /// Stops the managers of disks that hold no backing image file and run no work.
    pub fn retire_idle(&self) {
        let mut managers = self.managers.lock().expect("managers poisoned");
        managers.retain(|id, m| {
            let busy = !m.tasks.lock().expect("tasks poisoned").is_empty();
            let has_files = std::fs::read_dir(m.disk.backing_images_dir())
                .map(|mut d| d.next().is_some())
                .unwrap_or(false);
            if !busy && !has_files {
                tracing::info!(disk = %id, "backing image manager stopped: no files left on the disk");
            }
            busy || has_files
        });
    }

    /// The image and its ready file on one of this process's disks, to serve it whole. Without
    /// one: FailedPrecondition saying where the image stands.
    pub fn ready_file(&self, name: &str) -> Result<(BackingImage, PathBuf)> {
        let bi = self.image(name)?;
        let path = self
            .disks
            .iter()
            .filter(|d| ready_on(&bi, &d.id))
            .map(|d| d.image_file(&bi))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "backing image {name:?} has no ready file to download yet: {}",
                    bi.describe()
                ))
            })?;
        Ok((bi, path))
    }

    pub(super) fn image(&self, name: &str) -> Result<BackingImage> {
        self.records
            .image(name)?
            .ok_or_else(|| Error::NotFound(format!("backing image {name:?} not found")))
    }

    pub(super) async fn report(&self, name: &str, disk: &Disk, r: FileReport) -> Result<()> {
        self.reports.report(name, disk, r).await
    }

    /// Runs `work` for `image` on `disk` as the disk manager's task, unless one already runs.
    /// Failures are reported as the file's failed state.
    pub(super) fn spawn(
        self: &Arc<Self>,
        image: &str,
        disk: &Disk,
        work: impl FnOnce(
            Arc<FileManagers>,
            CancellationToken,
        ) -> futures::future::BoxFuture<'static, Result<()>>,
    ) -> bool {
        let manager = self.manager(disk);
        let cancel = CancellationToken::new();
        {
            let mut tasks = manager.tasks.lock().expect("tasks poisoned");
            if tasks.contains_key(image) {
                return false;
            }
            tasks.insert(image.to_string(), cancel.clone());
        }
        let this = self.clone();
        let name = image.to_string();
        let disk = disk.clone();
        let fut = work(this.clone(), cancel.clone());
        // The work's log lines carry the image, disk and node (`--log-format json`: `spans`).
        let span = tracing::info_span!("backing_image", image = %name, disk = %disk.id, node = %disk.node_id);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                if let Err(e) = fut.await
                    && !cancel.is_cancelled()
                {
                    tracing::warn!(image = %name, disk = %disk.id, error = %e, "backing image file failed");
                    let _ = this
                        .report(
                            &name,
                            &disk,
                            FileReport::new(FileState::Failed, 0, e.to_string()),
                        )
                        .await;
                }
                manager.tasks.lock().expect("tasks poisoned").remove(&name);
            },
            span,
        ));
        true
    }
}

impl FileManagers {
    /// Removes every file of the image (any uuid) from this node's disks.
    pub async fn delete_image_files(&self, name: &str) -> Result<()> {
        self.delete_files(name, None).await
    }

    /// Removes the image's file (any uuid) and its work in progress from one disk.
    pub async fn delete_image_file(&self, name: &str, disk_id: &str) -> Result<()> {
        self.disk(disk_id)?;
        self.delete_files(name, Some(disk_id)).await
    }

    async fn delete_files(&self, name: &str, only: Option<&str>) -> Result<()> {
        for (id, m) in self.managers.lock().expect("managers poisoned").iter() {
            if only.is_some_and(|o| o != id) {
                continue;
            }
            if let Some(c) = m.tasks.lock().expect("tasks poisoned").get(name) {
                c.cancel();
            }
        }
        let disks: Vec<Disk> = self
            .disks
            .iter()
            .filter(|d| only.is_none_or(|o| o == d.id))
            .cloned()
            .collect();
        let prefix = format!("{name}-");
        blocking(move || {
            for d in &disks {
                for dir in [d.backing_images_dir(), d.tmp_dir()] {
                    let Ok(entries) = std::fs::read_dir(dir) else {
                        continue;
                    };
                    for e in entries.flatten() {
                        let file_name = e.file_name().to_string_lossy().into_owned();
                        let rest = file_name.strip_prefix(&prefix).unwrap_or_default();
                        // `<name>-<8 hex uuid>` or `<name>-<uuid>.part`; never another image
                        // whose name merely starts with this one.
                        let uuid = rest
                            .strip_suffix(".part")
                            .or_else(|| rest.strip_suffix(".resume"))
                            .unwrap_or(rest);
                        if uuid.len() != 8 || !uuid.bytes().all(|b| b.is_ascii_hexdigit()) {
                            continue;
                        }
                        let p = e.path();
                        let r = if p.is_dir() {
                            remove_dir_settled(&p)
                        } else {
                            std::fs::remove_file(&p)
                        };
                        if let Err(e) = r
                            && e.kind() != std::io::ErrorKind::NotFound
                        {
                            return Err(Error::Internal(format!(
                                "cannot remove {}: {e}",
                                p.display()
                            )));
                        }
                    }
                }
            }
            Ok(())
        })
        .await?;
        self.retire_idle();
        Ok(())
    }
}

/// Removes a file's directory. Work on the image was cancelled just before, but a task already
/// moving its file into place (the rename, `backing.cfg`, the manifest) finishes those few
/// steps: a directory that is not empty because of them is removed again once they are done.
fn remove_dir_settled(dir: &Path) -> std::io::Result<()> {
    let mut tries = 0;
    loop {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}
