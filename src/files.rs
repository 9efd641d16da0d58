//! Backing image files on this node's disks: one manager per disk, started when the disk first
//! needs a file and retired when it holds none and has no work running.
//!
//! A manager prepares files (from the image's data source, from another disk of this node, or
//! from another node over HTTP), and reports each file's state to the controller through
//! [`FileReports`]. Work happens under `<disk>/tmp/`; a file is renamed to
//! `<disk>/backing-images/<name>-<uuid>/backing` only after its SHA-512 matched the image's
//! checksum, so nothing half-written is ever ready. Beside it go `backing.cfg` (its facts) and,
//! when one was built from the same bytes as that SHA-512, `backing.manifest` (its chunk
//! manifest, see [`crate::sync::manifest`], which lets other nodes check a transfer chunk by
//! chunk); verification and the scrub rebuild a missing or wrong manifest. It must not change
//! image objects itself: the controller owns them and applies the reports.

mod upload;

pub use upload::{UploadRequest, parse_checksum};

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::backing::object::{BackingImage, SourceType};
use crate::backing::state::FileState;
use crate::backing::{BackingImages, FileMeta};
use crate::clock::Clock;
use crate::download::{self, DownloadRequest};
use crate::error::{Error, Result};
use crate::fsutil::{blocking, write_atomic};
use crate::imagefmt;
use crate::model::{Disk, NodeRecord, Volume};
use crate::os::{ImageFormat, Os};
use crate::settings::Settings;
use crate::store::{Kind, Store, StoreExt};

/// How often the progress of running work is reported.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// A transfer from another node that receives nothing for this long fails (and is retried).
const TRANSFER_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The facts of a ready file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadyFile {
    pub size: u64,
    pub virtual_size: u64,
    pub format: String,
    pub checksum: String,
}

/// What a node says about a file on one of its disks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileReport {
    pub state: FileState,
    pub progress: u8,
    pub message: String,
    pub ready: Option<ReadyFile>,
    /// The work on the file was cut off by a restart of bicsi and starts again: the file goes
    /// back to pending from where it was (through failed, as its states require) in one update
    /// of the image, so no one ever sees it failed for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart: bool,
    /// With a failed state: the source failed in a way that trying again soon cannot fix (a
    /// checksum mismatch, a 4xx answer, a file that is no disk image), so it is retried with a
    /// backoff that grows to hours.
    #[serde(default)]
    pub permanent: bool,
}

impl FileReport {
    pub fn new(state: FileState, progress: u8, message: impl Into<String>) -> FileReport {
        FileReport {
            state,
            progress,
            message: message.into(),
            ready: None,
            restart: false,
            permanent: false,
        }
    }

    /// Pending again after a restart cut off the work (see `restart`).
    pub fn restarting(message: impl Into<String>) -> FileReport {
        FileReport {
            restart: true,
            ..FileReport::new(FileState::Pending, 0, message)
        }
    }
}

/// Where a node's reports go: the controller's image objects.
#[tonic::async_trait]
pub trait FileReports: Send + Sync {
    async fn report(&self, image: &str, disk: &Disk, report: FileReport) -> Result<()>;
}

/// One disk's manager: the work running on it, by image name.
pub struct DiskManager {
    pub disk: Disk,
    tasks: Mutex<HashMap<String, CancellationToken>>,
}

pub struct FileManagers {
    node_id: String,
    disks: Vec<Disk>,
    os: Os,
    /// Image, volume and node records (the controller's store, local or remote).
    store: Arc<dyn Store>,
    reports: Arc<dyn FileReports>,
    managers: Mutex<HashMap<String, Arc<DiskManager>>>,
    /// Images being uploaded through this process now.
    uploads: Mutex<HashSet<String>>,
    /// "Now" for the scrub.
    clock: Arc<dyn Clock>,
    /// Read on every use, from the controller's store: changes apply without a restart.
    settings: Settings,
    /// File syncs (sending or receiving) running on this node.
    syncs: SyncSlots,
    /// (image directory, disk id) → when its ready file was last verified (seconds).
    verified: Mutex<HashMap<(String, String), u64>>,
    /// Ready files are verified once per process start, at the first `resume`.
    verified_at_start: AtomicBool,
    /// When this process started (seconds): the scrub's first round counts from it.
    started: u64,
}

/// Counts the file syncs running on a node against `concurrent-backing-image-syncs-per-node`.
#[derive(Default)]
pub struct SyncSlots(Arc<SlotsInner>);

#[derive(Default)]
struct SlotsInner {
    running: Mutex<usize>,
    freed: tokio::sync::Notify,
}

/// A running sync; dropping it frees its slot.
pub struct SyncSlot(Arc<SlotsInner>);

impl Drop for SyncSlot {
    fn drop(&mut self) {
        *self.0.running.lock().expect("sync slots poisoned") -= 1;
        self.0.freed.notify_waiters();
    }
}

impl SyncSlots {
    /// Takes a slot if fewer than `limit` are taken.
    pub fn try_take(&self, limit: usize) -> Option<SyncSlot> {
        let mut running = self.0.running.lock().expect("sync slots poisoned");
        (*running < limit).then(|| {
            *running += 1;
            SyncSlot(self.0.clone())
        })
    }

    pub fn running(&self) -> usize {
        *self.0.running.lock().expect("sync slots poisoned")
    }

    /// Waits for a free slot; the limit is read again each time one frees (or every second,
    /// so a changed setting applies).
    pub async fn take(&self, limit: impl Fn() -> usize) -> SyncSlot {
        loop {
            let freed = self.0.freed.notified();
            if let Some(slot) = self.try_take(limit()) {
                return slot;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
        }
    }
}

/// The chunk manifest beside a ready `backing` file (the path of that file).
pub fn manifest_path(file: &Path) -> PathBuf {
    file.with_file_name("backing.manifest")
}

/// The manifest beside a ready file, if there is one, it is intact and it names `sha512`.
fn read_manifest(file: &Path, sha512: &str) -> Option<crate::sync::Manifest> {
    let bytes = std::fs::read(manifest_path(file)).ok()?;
    crate::sync::Manifest::parse(&bytes)
        .ok()
        .filter(|m| m.sha512 == sha512)
}

fn tmp_path(disk: &Disk, bi: &BackingImage) -> PathBuf {
    disk.path
        .join("tmp")
        .join(format!("{}.part", bi.dir_name()))
}

/// Why a first file failed, and whether its source failed for good (see
/// [`FileReport::permanent`]).
struct SourceFailure {
    error: Error,
    permanent: bool,
}

impl From<Error> for SourceFailure {
    fn from(error: Error) -> Self {
        SourceFailure {
            error,
            permanent: false,
        }
    }
}

/// Whether the image says `disk` holds a ready file.
fn ready_on(bi: &BackingImage, disk_id: &str) -> bool {
    bi.status
        .disk_file_status_map
        .get(disk_id)
        .is_some_and(|f| f.state == FileState::Ready)
}

impl FileManagers {
    pub fn new(
        node_id: String,
        disks: Vec<Disk>,
        os: Os,
        store: Arc<dyn Store>,
        reports: Arc<dyn FileReports>,
        clock: Arc<dyn Clock>,
    ) -> Arc<FileManagers> {
        Arc::new(FileManagers {
            node_id,
            disks,
            os,
            settings: Settings::new(store.clone()),
            store,
            reports,
            managers: Mutex::new(HashMap::new()),
            uploads: Mutex::new(HashSet::new()),
            started: clock.now_secs(),
            clock,
            syncs: SyncSlots::default(),
            verified: Mutex::new(HashMap::new()),
            verified_at_start: AtomicBool::new(false),
        })
    }

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
    fn manager(&self, disk: &Disk) -> Arc<DiskManager> {
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
    fn running(&self, disk_id: &str, image: &str) -> bool {
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
            let has_files = std::fs::read_dir(m.disk.path.join("backing-images"))
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
            .map(|d| BackingImages::file_path(d, &bi))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "backing image {name:?} has no ready file to download yet: {}",
                    BackingImages::describe(&bi)
                ))
            })?;
        Ok((bi, path))
    }

    fn image(&self, name: &str) -> Result<BackingImage> {
        self.store
            .get(Kind::BackingImage, name)?
            .ok_or_else(|| Error::NotFound(format!("backing image {name:?} not found")))
    }

    async fn report(&self, name: &str, disk: &Disk, r: FileReport) -> Result<()> {
        self.reports.report(name, disk, r).await
    }

    /// Runs `work` for `image` on `disk` as the disk manager's task, unless one already runs.
    /// Failures are reported as the file's failed state.
    fn spawn(
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
        tokio::spawn(async move {
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
        });
        true
    }

    /// Starts preparing the image's first file on `disk_id` from its data source.
    pub fn prepare_first_file(self: &Arc<Self>, image: &str, disk_id: &str) -> Result<()> {
        let disk = self.disk(disk_id)?.clone();
        let name = image.to_string();
        let d = disk.clone();
        self.spawn(image, &disk, move |this, cancel| {
            Box::pin(async move {
                match this.first_file(&name, &d, cancel.clone()).await {
                    Err(f) if f.permanent && !cancel.is_cancelled() => {
                        tracing::warn!(image = %name, disk = %d.id, error = %f.error, "backing image file failed; its source is retried with a growing backoff");
                        let mut report = FileReport::new(FileState::Failed, 0, f.error.to_string());
                        report.permanent = true;
                        this.report(&name, &d, report).await
                    }
                    r => r.map_err(|f| f.error),
                }
            })
        });
        Ok(())
    }

    async fn first_file(
        &self,
        name: &str,
        disk: &Disk,
        cancel: CancellationToken,
    ) -> Result<(), SourceFailure> {
        let bi = self.image(name)?;
        self.report(
            name,
            disk,
            FileReport::new(FileState::Starting, 0, "starting"),
        )
        .await?;
        let tmp = tmp_path(disk, &bi);
        if bi.spec.source_type != SourceType::Download {
            // A download goes on with a partial file an earlier process left, if it can.
            let _ = std::fs::remove_file(&tmp);
        }
        let progress = Arc::new(AtomicU8::new(0));
        let (sha512, size, manifest) = match bi.spec.source_type {
            SourceType::Download => {
                let url = bi.spec.source_parameters["url"].clone();
                let message = format!("downloading {}", redact(&url));
                self.report(
                    name,
                    disk,
                    FileReport::new(FileState::InProgress, 0, &message),
                )
                .await?;
                let mut req = DownloadRequest::new(url, tmp.clone());
                req.expected_sha512 =
                    (!bi.status.checksum.is_empty()).then(|| bi.status.checksum.clone());
                req.resume = true;
                let sink = percent_sink(progress.clone());
                let work = download::download(&req, &sink, cancel.clone());
                let outcome = self
                    .with_progress(name, disk, &progress, &message, work)
                    .await
                    .map_err(|e| SourceFailure {
                        permanent: e.is_permanent(),
                        error: Error::Unavailable(format!("backing image {name:?}: {e}")),
                    })?;
                if outcome.kept > 0 {
                    tracing::info!(image = %name, disk = %disk.id, kept = outcome.kept, "download went on from the partial file of an earlier process");
                }
                (outcome.sha512, outcome.size, Some(outcome.manifest))
            }
            SourceType::ExportFromVolume => {
                self.report(
                    name,
                    disk,
                    FileReport::new(FileState::InProgress, 0, "exporting"),
                )
                .await?;
                self.export_volume(&bi, &tmp).await?
            }
            SourceType::Upload => {
                return Err(Error::FailedPrecondition(format!(
                    "backing image {name:?} is uploaded, not prepared by bicsi"
                ))
                .into());
            }
            SourceType::Restore => {
                let url = bi.spec.source_parameters["backup-url"].clone();
                let message = format!("restoring from {url}");
                self.report(
                    name,
                    disk,
                    FileReport::new(FileState::InProgress, 0, &message),
                )
                .await?;
                let creds = self
                    .settings
                    .text(crate::settings::BACKUP_TARGET_CREDENTIAL_FILE)
                    .unwrap_or_default();
                let creds = (!creds.is_empty()).then(|| PathBuf::from(creds));
                let work =
                    crate::backup::image::restore_image_file(&url, creds, &tmp, progress.clone());
                let (sha512, size) = self
                    .with_progress(name, disk, &progress, &message, work)
                    .await?;
                (sha512, size, None)
            }
        };
        let download = bi.spec.source_type == SourceType::Download;
        self.finish_file(name, disk, &tmp, sha512, size, manifest)
            .await
            .map_err(|error| SourceFailure {
                // The same bytes would come again: not a disk image, or the wrong checksum.
                permanent: download && matches!(error, Error::FailedPrecondition(_)),
                error,
            })
    }

    /// Runs `work` while reporting its progress once a second.
    async fn with_progress<T>(
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

    /// Exports a volume's content at one point in time (its replica with its backing chain,
    /// flattened, sparse): a `type: bi` snapshot's image from that snapshot's file, an attached
    /// volume from a point-in-time copy its engine makes, a detached one from its replica.
    async fn export_volume(
        &self,
        bi: &BackingImage,
        tmp: &Path,
    ) -> Result<(String, u64, Option<crate::sync::Manifest>)> {
        let vol_name = bi.spec.source_parameters["volume-name"].clone();
        let format = match bi.spec.source_parameters["export-type"].as_str() {
            "raw" => ImageFormat::Raw,
            _ => ImageFormat::Qcow2,
        };
        if let Some(source) =
            crate::controller::snapshot::export_source(&*self.store, bi.name(), &self.disks)?
        {
            return self.convert(source, tmp, format, None).await;
        }
        let id = crate::controller::volume_id_for(&vol_name);
        let volume: Volume = self.store.get(Kind::Volume, &id)?.ok_or_else(|| {
            Error::NotFound(format!(
                "backing image {:?}: volume {vol_name:?} to export does not exist",
                bi.name()
            ))
        })?;
        let replica = volume
            .replicas
            .iter()
            .find(|r| r.node_id == self.node_id && !r.deferred && r.path.is_file())
            .cloned();
        let Some(replica) = replica else {
            return self.export_unwritten(bi, &volume, tmp, format).await;
        };
        let Some(p) = &volume.publication else {
            return self.convert(replica.path, tmp, format, None).await;
        };
        if p.node_id != self.node_id {
            return Err(Error::FailedPrecondition(format!(
                "backing image {:?}: volume {vol_name:?} is attached to node {:?} and its replica here is written over the network; export it while it is detached, or from a snapshot (type: bi) in the all-in-one mode",
                bi.name(),
                p.node_id
            )));
        }
        // The engine copies the replica's own clusters as they are now, over the same backing
        // file; the conversion then reads that copy, which no one writes.
        let backing = match &volume.spec.backing_image {
            Some(name) => {
                let image = self.image(name)?;
                let disk = self.disk(&replica.disk_id)?;
                let format = ImageFormat::parse(&image.status.format).ok_or_else(|| {
                    Error::Internal(format!("backing image {name:?} has no known format"))
                })?;
                Some((BackingImages::file_path(disk, &image), format))
            }
            None => None,
        };
        let point = tmp.with_extension("pit.qcow2");
        self.convert(replica.path, tmp, format, Some((point, backing)))
            .await
    }

    /// Exports a volume that was never attached (made while its image's file was on its way,
    /// its replicas deferred): its content is the image's at the volume's size, so a temporary
    /// overlay of that size over this node's ready file of the image is converted.
    async fn export_unwritten(
        &self,
        bi: &BackingImage,
        volume: &Volume,
        tmp: &Path,
        format: ImageFormat,
    ) -> Result<(String, u64, Option<crate::sync::Manifest>)> {
        let no_file = || {
            Error::FailedPrecondition(format!(
                "backing image {:?}: volume {:?} has no replica file on node {:?}",
                bi.name(),
                volume.spec.name,
                self.node_id
            ))
        };
        let never_attached = volume.publication.is_none()
            && volume
                .replicas
                .iter()
                .all(|r| r.deferred && !r.path.exists());
        let Some(image_name) = volume
            .spec
            .backing_image
            .as_ref()
            .filter(|_| never_attached)
        else {
            return Err(no_file());
        };
        let image = self.image(image_name)?;
        let Some(disk) = self
            .disks
            .iter()
            .find(|d| ready_on(&image, &d.id) && BackingImages::file_path(d, &image).is_file())
        else {
            return Err(Error::Unavailable(format!(
                "backing image {:?}: volume {:?} has not been written and its backing image {image_name:?} has no ready file on node {:?} yet; the export is tried again",
                bi.name(),
                volume.spec.name,
                self.node_id
            )));
        };
        let backing = BackingImages::file_path(disk, &image);
        let backing_format = ImageFormat::parse(&image.status.format).ok_or_else(|| {
            Error::Internal(format!("backing image {image_name:?} has no known format"))
        })?;
        let overlay = tmp.with_extension("unwritten.qcow2");
        let (os, o, size) = (self.os.clone(), overlay.clone(), volume.spec.capacity_bytes);
        blocking(move || {
            let _ = std::fs::remove_file(&o);
            Ok(os
                .images
                .create_replica(&o, size, Some((&backing, backing_format)))?)
        })
        .await?;
        let converted = self.convert(overlay.clone(), tmp, format, None).await;
        let _ = std::fs::remove_file(&overlay);
        converted
    }

    /// Converts `source` into `tmp` (standalone, sparse) and hashes it (SHA-512 and, in the same
    /// pass, its manifest); with `point`, `source` is first captured there at one instant (over
    /// the given backing file) and converted from that copy, which is removed after.
    async fn convert(
        &self,
        source: PathBuf,
        tmp: &Path,
        format: ImageFormat,
        point: Option<(PathBuf, Option<(PathBuf, ImageFormat)>)>,
    ) -> Result<(String, u64, Option<crate::sync::Manifest>)> {
        let os = self.os.clone();
        let tmp = tmp.to_path_buf();
        blocking(move || {
            let from = match &point {
                Some((copy, backing)) => {
                    let b = backing.as_ref().map(|(p, f)| (p.as_path(), *f));
                    crate::snapshot::capture(&os, &source, copy, b)?;
                    copy.clone()
                }
                None => source,
            };
            let converted = os.images.convert(&from, &tmp, format);
            if let Some((copy, _)) = &point {
                let _ = std::fs::remove_file(copy);
            }
            converted?;
            let (sha, manifest) = crate::sync::hash_sparse(&tmp)
                .map_err(|e| Error::Internal(format!("hashing the export: {e}")))?;
            Ok((sha, manifest.size, Some(manifest)))
        })
        .await
    }

    /// Checks a prepared temp file and moves it into place as the disk's ready file.
    /// `manifest`, built from the same bytes as `sha512`, is written beside the file when that
    /// SHA-512 is the image's.
    async fn finish_file(
        &self,
        name: &str,
        disk: &Disk,
        tmp: &Path,
        sha512: String,
        size: u64,
        manifest: Option<crate::sync::Manifest>,
    ) -> Result<()> {
        let probe_path = tmp.to_path_buf();
        let header = blocking(move || {
            let header =
                imagefmt::probe(&probe_path).map_err(|e| Error::InvalidArgument(e.to_string()));
            // The probe's read (and its readahead) brought pages back into the cache that the
            // download had released: release them again.
            if let Ok(f) = std::fs::File::open(&probe_path) {
                let _ = nix::fcntl::posix_fadvise(
                    &f,
                    0,
                    0,
                    nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                );
            }
            header
        })
        .await;
        let header = match header {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_file(tmp);
                return Err(Error::FailedPrecondition(format!(
                    "backing image {name:?}: the file is not a usable disk image: {e}"
                )));
            }
        };
        let bi = self.image(name)?;
        if !bi.status.checksum.is_empty() && bi.status.checksum != sha512 {
            let _ = std::fs::remove_file(tmp);
            return Err(Error::FailedPrecondition(format!(
                "backing image {name:?}: checksum mismatch: expected {}, got {sha512}; the file changed or is corrupt",
                bi.status.checksum
            )));
        }
        let final_path = BackingImages::file_path(disk, &bi);
        let dir = final_path
            .parent()
            .expect("file has a directory")
            .to_path_buf();
        let ready = ReadyFile {
            size,
            virtual_size: header.virtual_size,
            format: header.format.as_str().to_string(),
            checksum: sha512,
        };
        let meta = FileMeta {
            name: name.to_string(),
            uuid: bi.status.uuid.clone(),
            size,
            virtual_size: ready.virtual_size,
            format: ready.format.clone(),
            checksum: ready.checksum.clone(),
            source_type: bi.spec.source_type.as_str().to_string(),
        };
        let tmp = tmp.to_path_buf();
        // Only a manifest of exactly these verified bytes goes beside them.
        let manifest = manifest.filter(|m| m.sha512 == ready.checksum && m.size == size);
        blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
            // A manifest left from an earlier file of this image goes first: a manifest
            // beside a file is always that file's.
            let manifest_path = manifest_path(&final_path);
            if let Err(e) = std::fs::remove_file(&manifest_path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(Error::Internal(format!(
                    "cannot remove {}: {e}",
                    manifest_path.display()
                )));
            }
            std::fs::rename(&tmp, &final_path)
                .map_err(|e| Error::Internal(format!("cannot move the file into place: {e}")))?;
            write_atomic(&dir.join("backing.cfg"), &serde_json::to_vec_pretty(&meta)?)
                .map_err(|e| Error::Internal(format!("cannot write backing.cfg: {e}")))?;
            if let Some(m) = manifest {
                write_atomic(&manifest_path, &m.to_bytes()).map_err(|e| {
                    Error::Internal(format!("cannot write {}: {e}", manifest_path.display()))
                })?;
            }
            Ok(())
        })
        .await?;
        let mut report = FileReport::new(FileState::Ready, 100, "");
        report.ready = Some(ready);
        self.report(name, disk, report).await?;
        tracing::info!(image = %name, disk = %disk.id, size, "backing image file ready");
        Ok(())
    }

    /// The ready file of the image on `disk_id`, or a retryable error while it is prepared there:
    /// copied from another disk of this node (reflink where possible, else a sparse copy), or
    /// transferred from another node (data extents only, verified on arrival against the sender's
    /// chunk manifest, or by the whole SHA-512 without a usable one). A later
    /// call continues the same work; it never starts it twice.
    pub async fn ensure_file(self: &Arc<Self>, name: &str, disk_id: &str) -> Result<PathBuf> {
        let disk = self.disk(disk_id)?.clone();
        let bi = self.image(name)?;
        let path = BackingImages::file_path(&disk, &bi);
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
    async fn start_sync(self: &Arc<Self>, bi: &BackingImage, disk: &Disk) -> Result<()> {
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
        if let Some(local) = self.disks.iter().find(|d| {
            d.id != disk.id && ready_on(bi, &d.id) && BackingImages::file_path(d, bi).is_file()
        }) {
            return Ok(Source::Local(local.clone()));
        }
        for (disk_id, f) in &bi.status.disk_file_status_map {
            if f.state != FileState::Ready || f.node_id == self.node_id || f.node_id.is_empty() {
                continue;
            }
            let node: Option<NodeRecord> = self.store.get(Kind::Node, &f.node_id)?;
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
            BackingImages::describe(bi)
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
        let tmp = tmp_path(disk, &bi);
        let _ = std::fs::remove_file(&tmp);
        if bi.status.checksum.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "backing image {name:?} has no checksum yet; its first file is not ready"
            )));
        }
        let (sha512, size, manifest) = match &source {
            Source::Local(from) => {
                let src = BackingImages::file_path(from, &bi);
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
                let work = crate::sync::receive_with_manifest(
                    url,
                    &manifest_url,
                    &tmp,
                    &bi.status.checksum,
                    TRANSFER_IDLE_TIMEOUT,
                    &sink,
                );
                let outcome = self
                    .with_progress(name, disk, &progress, &message, work)
                    .await
                    .map_err(|e| {
                        Error::Unavailable(format!("backing image {name:?}, disk {}: {e}", disk.id))
                    })?;
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
    }

    /// Checks a file against the image's checksum (SHA-512, streamed): Ready when it matches,
    /// else Failed with a message naming the disk, the mismatch and `why` it was checked.
    async fn verify(&self, bi: &BackingImage, disk: &Disk, why: &str) -> FileReport {
        let path = BackingImages::file_path(disk, bi);
        self.verified
            .lock()
            .expect("verified poisoned")
            .insert((bi.dir_name(), disk.id.clone()), self.clock.now_secs());
        if !path.is_file() {
            return FileReport::new(
                FileState::Failed,
                0,
                format!(
                    "{why}: the file is missing from disk {} ({})",
                    disk.id,
                    path.display()
                ),
            );
        }
        let p = path.clone();
        let checksum = bi.status.checksum.clone();
        let sum = blocking(move || {
            let (sum, manifest) =
                crate::sync::hash_sparse(&p).map_err(|e| Error::Internal(e.to_string()))?;
            // The file is verified: its manifest, built in the same pass, replaces a missing,
            // corrupt or different one.
            if sum == checksum && read_manifest(&p, &sum).as_ref() != Some(&manifest) {
                let mp = manifest_path(&p);
                match write_atomic(&mp, &manifest.to_bytes()) {
                    Ok(()) => tracing::info!(path = %mp.display(), "rebuilt the chunk manifest of a verified file"),
                    Err(e) => tracing::warn!(path = %mp.display(), error = %e, "cannot write the chunk manifest"),
                }
            }
            Ok(sum)
        })
        .await;
        match sum {
            Ok(sum) if sum == bi.status.checksum => {
                let mut r = FileReport::new(FileState::Ready, 100, format!("{why}: verified"));
                r.ready = Some(ReadyFile {
                    size: bi.status.size,
                    virtual_size: bi.status.virtual_size,
                    format: bi.status.format.clone(),
                    checksum: sum,
                });
                r
            }
            Ok(sum) => FileReport::new(
                FileState::Failed,
                0,
                format!(
                    "{why}: checksum mismatch on disk {}: expected {}, got {sum}; the file changed on disk",
                    disk.id, bi.status.checksum
                ),
            ),
            Err(e) => FileReport::new(
                FileState::Failed,
                0,
                format!("{why}: cannot read the file on disk {}: {e}", disk.id),
            ),
        }
    }

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
                for sub in ["backing-images", "tmp"] {
                    let Ok(entries) = std::fs::read_dir(d.path.join(sub)) else {
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

    /// After a restart or a return: work that was cut off starts again (from the beginning, but
    /// a first download goes on from its partial file when the server offers the same file), ready files that disappeared are reported failed, files marked
    /// unknown while the node was away are verified and reused, and files of images that no
    /// longer exist are removed.
    pub async fn resume(self: &Arc<Self>) -> Result<()> {
        let images: Vec<BackingImage> = self.store.list(Kind::BackingImage)?;
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
                    let tmp = tmp_path(d, bi);
                    [download::resume_path(&tmp), tmp]
                })
                .collect();
            // A conversion an earlier process started may still be writing here.
            crate::os::image::kill_stray_jobs(&d.path.join("tmp"));
            for e in std::fs::read_dir(d.path.join("tmp"))
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
                match f.state {
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
                    FileState::Ready if !BackingImages::file_path(&disk, bi).is_file() => {
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
            let Ok(entries) = std::fs::read_dir(d.path.join("backing-images")) else {
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
            let has = std::fs::read_dir(d.path.join("backing-images"))
                .map(|mut i| i.next().is_some())
                .unwrap_or(false);
            if has {
                self.manager(&d);
            }
        }
        self.verified_at_start.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// The periodic scrub at a lifecycle tick: every ready file of this node not verified for
    /// `backing-image-scrub-interval` is hashed again (streamed, bounded memory); one whose
    /// bytes changed is reported failed, and recovery replaces it. Files with work running are
    /// left alone. Returns how many files were hashed.
    pub async fn scrub(&self) -> Result<usize> {
        let Some(interval) = self.settings.scrub_interval() else {
            return Ok(0);
        };
        let images: Vec<BackingImage> = self.store.list(Kind::BackingImage)?;
        let mut hashed = 0;
        for bi in &images {
            for disk in &self.disks {
                if !ready_on(bi, &disk.id) {
                    continue;
                }
                let busy = self
                    .managers
                    .lock()
                    .expect("managers poisoned")
                    .get(&disk.id)
                    .is_some_and(|m| {
                        m.tasks
                            .lock()
                            .expect("tasks poisoned")
                            .contains_key(bi.name())
                    });
                let last = self
                    .verified
                    .lock()
                    .expect("verified poisoned")
                    .get(&(bi.dir_name(), disk.id.clone()))
                    .copied()
                    .unwrap_or(self.started);
                if busy || self.clock.now_secs().saturating_sub(last) < interval.as_secs() {
                    continue;
                }
                let report = self.verify(bi, disk, "scrub").await;
                hashed += 1;
                if report.state != FileState::Ready {
                    tracing::warn!(image = %bi.name(), disk = %disk.id, message = %report.message, "scrub found a changed file");
                    self.report(bi.name(), disk, report).await?;
                }
            }
        }
        Ok(hashed)
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

/// A progress sink that keeps the percentage done (at most 99 until the file is ready).
fn percent_sink(p: Arc<AtomicU8>) -> impl Fn(u64, Option<u64>) + Send + Sync {
    move |done, total| {
        if let Some(t) = total.filter(|t| *t > 0) {
            p.store(
                (done.saturating_mul(100) / t).min(99) as u8,
                Ordering::Relaxed,
            );
        }
    }
}

/// A URL without credentials or query, for messages.
fn redact(url: &str) -> String {
    reqwest::Url::parse(url)
        .map(|u| download::redact(&u))
        .unwrap_or_else(|_| "<invalid URL>".to_string())
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

#[cfg(test)]
mod lifecycle_tests {
    use super::*;
    use crate::backing::object::{self, BackingImageSpec, BackingImageStatus, DiskFileStatus};
    use crate::clock::ManualClock;
    use crate::store::embedded::EmbeddedStore;

    const T0: u64 = 2_000_000_000;

    #[derive(Default)]
    struct Reports(Mutex<Vec<(String, FileReport)>>);

    #[tonic::async_trait]
    impl FileReports for Reports {
        async fn report(&self, _image: &str, disk: &Disk, report: FileReport) -> Result<()> {
            self.0.lock().unwrap().push((disk.id.clone(), report));
            Ok(())
        }
    }

    struct World {
        _dir: tempfile::TempDir,
        clock: Arc<ManualClock>,
        files: Arc<FileManagers>,
        reports: Arc<Reports>,
        settings: Settings,
        path: PathBuf,
    }

    /// A node with one disk holding a ready file of image "img" that the store says is ready.
    fn world() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let disk = Disk {
            id: "d1".into(),
            node_id: "n1".into(),
            path: dir.path().join("disk"),
        };
        let path = disk.path.join("backing-images/img-0123abcd/backing");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let checksum = crate::fsutil::sha512_file(&path).unwrap();
        let bi = BackingImage {
            api_version: object::API_VERSION.into(),
            kind: object::KIND.into(),
            metadata: object::ObjectMeta {
                name: "img".into(),
                namespace: object::DEFAULT_NAMESPACE.into(),
            },
            spec: BackingImageSpec {
                source_type: SourceType::Download,
                source_parameters: [("url".to_string(), "http://127.0.0.1/x".to_string())].into(),
                checksum: checksum.clone(),
                min_number_of_copies: 1,
            },
            status: BackingImageStatus {
                uuid: "0123abcd".into(),
                size: data.len() as u64,
                virtual_size: data.len() as u64,
                format: "raw".into(),
                checksum,
                disk_file_status_map: [(
                    "d1".to_string(),
                    DiskFileStatus {
                        state: FileState::Ready,
                        progress: 100,
                        message: String::new(),
                        last_state_transition_time: crate::model::rfc3339(T0),
                        last_update_time: crate::model::rfc3339(T0),
                        node_id: "n1".into(),
                        unused_since: String::new(),
                    },
                )]
                .into(),
                ..Default::default()
            },
        };
        store.put(Kind::BackingImage, "img", &bi).unwrap();
        let clock = ManualClock::new(T0);
        let reports = Arc::new(Reports::default());
        let files = FileManagers::new(
            "n1".into(),
            vec![disk],
            Os::fake(),
            store.clone(),
            reports.clone(),
            clock.clone(),
        );
        World {
            _dir: dir,
            clock,
            files,
            reports,
            settings: Settings::new(store),
            path,
        }
    }

    fn flip_a_byte(path: &Path) {
        let mut data = std::fs::read(path).unwrap();
        data[4096] ^= 0xff;
        std::fs::write(path, data).unwrap();
    }

    fn take(w: &World) -> Vec<(String, FileReport)> {
        std::mem::take(&mut *w.reports.0.lock().unwrap())
    }

    /// A second disk of node n1, not yet known to `w.files`, with the `tmp/` that
    /// `disks::open_disk` prepares.
    fn second_disk(w: &World) -> Disk {
        let d2 = Disk {
            id: "d2".into(),
            node_id: "n1".into(),
            path: w._dir.path().join("disk2"),
        };
        std::fs::create_dir_all(d2.path.join("tmp")).unwrap();
        d2
    }

    /// File managers of `w`'s disks plus `disk`, over the same store, reports and clock.
    fn with_disk(w: &World, disk: &Disk) -> Arc<FileManagers> {
        let mut disks = w.files.disks().to_vec();
        disks.push(disk.clone());
        FileManagers::new(
            "n1".into(),
            disks,
            Os::fake(),
            w.files.store.clone(),
            w.reports.clone(),
            w.clock.clone(),
        )
    }

    /// The reports made until one says ready, by `deadline` at the latest.
    async fn reports_until_ready(
        w: &World,
        deadline: std::time::Instant,
    ) -> Vec<(String, FileReport)> {
        let mut seen = Vec::new();
        loop {
            seen.extend(take(w));
            if seen.iter().any(|(_, r)| r.state == FileState::Ready) {
                return seen;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never ready: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn verification_writes_a_missing_manifest_and_repairs_a_corrupt_one_but_not_for_a_changed_file()
     {
        let w = world();
        let manifest = manifest_path(&w.path);
        assert!(!manifest.exists());
        // The start-up verification finds the file intact and writes its manifest.
        w.files.resume().await.unwrap();
        assert!(take(&w).is_empty());
        let want = crate::sync::hash_sparse(&w.path).unwrap().1;
        let written = std::fs::read(&manifest).unwrap();
        assert_eq!(crate::sync::Manifest::parse(&written).unwrap(), want);
        assert_eq!(read_manifest(&w.path, &want.sha512), Some(want.clone()));

        // A manifest that rotted is refused by readers and replaced by the next verification.
        let mut bad = written.clone();
        let at = bad.len() / 2;
        bad[at] ^= 0x01;
        std::fs::write(&manifest, &bad).unwrap();
        assert_eq!(read_manifest(&w.path, &want.sha512), None);
        let bi = w.files.image("img").unwrap();
        let disk = w.files.disks()[0].clone();
        let r = w.files.verify(&bi, &disk, "scrub").await;
        assert_eq!(r.state, FileState::Ready, "{}", r.message);
        assert_eq!(std::fs::read(&manifest).unwrap(), written);

        // A changed file fails, and its (old, still right) manifest is not rebuilt from it.
        flip_a_byte(&w.path);
        let r = w.files.verify(&bi, &disk, "scrub").await;
        assert_eq!(r.state, FileState::Failed);
        assert_eq!(std::fs::read(&manifest).unwrap(), written);
    }

    #[tokio::test]
    async fn start_up_verification_fails_a_changed_ready_file_once_per_start() {
        let w = world();
        w.files.resume().await.unwrap();
        assert!(take(&w).is_empty(), "an intact ready file stays ready");
        flip_a_byte(&w.path);
        // Registering again (a controller restart) does not hash everything again.
        w.files.resume().await.unwrap();
        assert!(take(&w).is_empty());
        // A new process start does.
        let w2 = World {
            files: FileManagers::new(
                "n1".into(),
                w.files.disks().to_vec(),
                Os::fake(),
                w.files.store.clone(),
                w.reports.clone(),
                w.clock.clone(),
            ),
            ..w
        };
        w2.files.resume().await.unwrap();
        let got = take(&w2);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].1.state, FileState::Failed);
        assert!(
            got[0].1.message.contains("start-up verification")
                && got[0].1.message.contains("checksum mismatch on disk d1"),
            "{}",
            got[0].1.message
        );
        std::fs::remove_file(&w2.path).unwrap();
        let w3 = FileManagers::new(
            "n1".into(),
            w2.files.disks().to_vec(),
            Os::fake(),
            w2.files.store.clone(),
            w2.reports.clone(),
            w2.clock.clone(),
        );
        w3.resume().await.unwrap();
        let got = take(&w2);
        assert!(got[0].1.message.contains("missing from disk d1"), "{got:?}");
    }

    #[tokio::test]
    async fn registering_again_leaves_running_work_and_its_temp_file_alone() {
        let w = world();
        w.files.resume().await.unwrap();
        take(&w);
        let disk = w.files.disks()[0].clone();
        let mut bi: BackingImage = w
            .files
            .store
            .get(Kind::BackingImage, "img")
            .unwrap()
            .unwrap();
        bi.status.disk_file_status_map.get_mut("d1").unwrap().state = FileState::InProgress;
        w.files.store.put(Kind::BackingImage, "img", &bi).unwrap();
        let tmp = tmp_path(&disk, &bi);
        std::fs::create_dir_all(disk.path.join("tmp")).unwrap();
        std::fs::write(&tmp, b"under way").unwrap();
        let stale = disk.path.join("tmp/gone-0123.part");
        std::fs::write(&stale, b"cut off").unwrap();
        // The image's work runs in this process when the node registers again.
        w.files
            .manager(&disk)
            .tasks
            .lock()
            .unwrap()
            .insert("img".into(), CancellationToken::new());
        w.files.resume().await.unwrap();
        assert!(
            take(&w).is_empty(),
            "running work is not failed nor restarted"
        );
        assert!(tmp.is_file(), "the running work keeps its temp file");
        assert!(!stale.exists(), "the temp file of no running work goes");
    }

    #[tokio::test]
    async fn the_scrub_rehashes_ready_files_at_its_interval_and_catches_a_flipped_byte() {
        let w = world();
        w.settings
            .set(crate::settings::SCRUB_INTERVAL, "100")
            .unwrap();
        assert_eq!(w.files.scrub().await.unwrap(), 0, "not due yet");
        w.clock.advance(100);
        assert_eq!(w.files.scrub().await.unwrap(), 1);
        assert!(take(&w).is_empty(), "intact");
        flip_a_byte(&w.path);
        w.clock.advance(99);
        assert_eq!(w.files.scrub().await.unwrap(), 0, "hashed 99 s ago");
        w.clock.advance(1);
        assert_eq!(w.files.scrub().await.unwrap(), 1);
        let got = take(&w);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.state, FileState::Failed);
        assert!(
            got[0]
                .1
                .message
                .contains("scrub: checksum mismatch on disk d1"),
            "{}",
            got[0].1.message
        );
        // 0 turns the scrub off.
        w.settings
            .set(crate::settings::SCRUB_INTERVAL, "0")
            .unwrap();
        w.clock.advance(1_000_000);
        assert_eq!(w.files.scrub().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_first_file_cut_off_by_a_restart_goes_back_to_pending_without_failing() {
        let w = world();
        // The only file was downloading when bicsi stopped: no ready file anywhere.
        let mut bi: BackingImage = w
            .files
            .store
            .get(Kind::BackingImage, "img")
            .unwrap()
            .unwrap();
        let f = bi.status.disk_file_status_map.get_mut("d1").unwrap();
        f.state = FileState::InProgress;
        f.progress = 40;
        w.files.store.put(Kind::BackingImage, "img", &bi).unwrap();
        w.files.resume().await.unwrap();
        // Its first report puts it back to pending, marked as a restart; the download starts
        // again (and fails for real here: nothing serves its URL).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|(_, r): &(String, FileReport)| r.state == FileState::Starting)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "never started: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            seen.extend(take(&w));
        }
        assert_eq!(seen[0].1.state, FileState::Pending, "{seen:?}");
        assert!(seen[0].1.restart, "{seen:?}");
        assert!(seen[0].1.message.contains("interrupted by a restart"));
        assert_eq!(seen[1].1.state, FileState::Starting, "{seen:?}");
    }

    #[tokio::test]
    async fn a_copy_cut_off_by_a_restart_starts_again_at_resume_and_ends_ready() {
        let w = world();
        let d2 = second_disk(&w);
        // The copy to d2 was under way when bicsi stopped: its partial file is in tmp/.
        let mut bi: BackingImage = w
            .files
            .store
            .get(Kind::BackingImage, "img")
            .unwrap()
            .unwrap();
        let mut f = bi.status.disk_file_status_map["d1"].clone();
        f.state = FileState::InProgress;
        f.progress = 40;
        bi.status.disk_file_status_map.insert("d2".into(), f);
        w.files.store.put(Kind::BackingImage, "img", &bi).unwrap();
        std::fs::write(tmp_path(&d2, &bi), b"partial").unwrap();
        let files = with_disk(&w, &d2);
        files.resume().await.unwrap();
        // Nothing else asks for it (no attach): resume itself starts the copy again.
        let seen =
            reports_until_ready(&w, std::time::Instant::now() + Duration::from_secs(10)).await;
        assert_eq!(seen[0].1.state, FileState::Pending, "{seen:?}");
        assert!(seen[0].1.restart, "{seen:?}");
        assert!(seen[0].1.message.contains("interrupted by a restart"));
        assert!(
            seen.iter().all(|(_, r)| r.state != FileState::Failed),
            "failed on the way: {seen:?}"
        );
        assert_eq!(
            std::fs::read(BackingImages::file_path(&d2, &bi)).unwrap(),
            std::fs::read(&w.path).unwrap()
        );
        assert!(!tmp_path(&d2, &bi).exists());
    }

    #[tokio::test]
    async fn a_sync_waits_in_pending_while_the_node_runs_its_limit_of_syncs() {
        let w = world();
        let d2 = second_disk(&w);
        let files = with_disk(&w, &d2);
        w.settings
            .set(crate::settings::CONCURRENT_SYNCS_PER_NODE, "1")
            .unwrap();
        let held = files.syncs().try_take(files.sync_limit()).unwrap();
        let e = files.ensure_file("img", "d2").await.unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !take(&w)
            .iter()
            .any(|(_, r)| r.state == FileState::Pending && r.message.contains("waiting: 1 syncs"))
        {
            assert!(std::time::Instant::now() < deadline, "never waited");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            take(&w).iter().all(|(_, r)| r.state == FileState::Pending),
            "nothing starts while the slot is taken"
        );
        assert!(!BackingImages::file_path(&d2, &files.image("img").unwrap()).exists());
        // The slot frees: the copy runs and ends ready, with the same bytes.
        drop(held);
        reports_until_ready(&w, deadline).await;
        let copy = BackingImages::file_path(&d2, &files.image("img").unwrap());
        assert_eq!(
            std::fs::read(copy).unwrap(),
            std::fs::read(&w.path).unwrap()
        );
        assert_eq!(files.syncs().running(), 0);
    }

    #[tokio::test]
    async fn sync_slots_hold_back_syncs_over_the_limit() {
        let slots = SyncSlots::default();
        let a = slots.try_take(2).unwrap();
        let _b = slots.try_take(2).unwrap();
        assert!(slots.try_take(2).is_none());
        assert_eq!(slots.running(), 2);
        // A waiter gets the slot freed by another sync.
        let waiter = tokio::spawn({
            let inner = SyncSlots(slots.0.clone());
            async move {
                let _s = inner.take(|| 2).await;
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        // A higher limit (the setting changed) lets more run at once.
        assert!(slots.try_take(3).is_some());
    }
}
