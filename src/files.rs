//! Backing image files on this node's disks: one manager per disk, started when the disk first
//! needs a file and retired when it holds none and has no work running.
//!
//! A manager prepares files (from the image's data source, from another disk of this node, or
//! from another node over HTTP), and reports each file's state to the controller through
//! [`FileReports`]. Work happens under `<disk>/tmp/`; a file is renamed to
//! `<disk>/backing-images/<name>-<uuid>/backing` only after its SHA-512 matched the image's
//! checksum, so nothing half-written is ever ready. It must not change image objects itself:
//! the controller owns them and applies the reports.

mod upload;

pub use upload::{UploadRequest, parse_checksum};

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::backing::object::{BackingImage, SourceType};
use crate::backing::state::FileState;
use crate::backing::{BackingImages, FileMeta};
use crate::download::{self, DownloadRequest};
use crate::error::{Error, Result};
use crate::fsutil::{blocking, write_atomic};
use crate::imagefmt;
use crate::model::{Disk, NodeRecord, Volume};
use crate::os::{ImageFormat, Os};
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
}

impl FileReport {
    pub fn new(state: FileState, progress: u8, message: impl Into<String>) -> FileReport {
        FileReport {
            state,
            progress,
            message: message.into(),
            ready: None,
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
}

fn tmp_path(disk: &Disk, bi: &BackingImage) -> PathBuf {
    disk.path
        .join("tmp")
        .join(format!("{}.part", bi.dir_name()))
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
    ) -> Arc<FileManagers> {
        Arc::new(FileManagers {
            node_id,
            disks,
            os,
            store,
            reports,
            managers: Mutex::new(HashMap::new()),
            uploads: Mutex::new(HashSet::new()),
        })
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
            Box::pin(async move { this.first_file(&name, &d, cancel).await })
        });
        Ok(())
    }

    async fn first_file(&self, name: &str, disk: &Disk, cancel: CancellationToken) -> Result<()> {
        let bi = self.image(name)?;
        self.report(
            name,
            disk,
            FileReport::new(FileState::Starting, 0, "starting"),
        )
        .await?;
        let tmp = tmp_path(disk, &bi);
        let _ = std::fs::remove_file(&tmp);
        let progress = Arc::new(AtomicU8::new(0));
        let (sha512, size) = match bi.spec.source_type {
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
                let sink = percent_sink(progress.clone());
                let work = download::download(&req, &sink, cancel.clone());
                let outcome = self
                    .with_progress(name, disk, &progress, &message, work)
                    .await
                    .map_err(|e| Error::Unavailable(format!("backing image {name:?}: {e}")))?;
                (outcome.sha512, outcome.size)
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
                )));
            }
        };
        self.finish_file(name, disk, &tmp, sha512, size).await
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
    async fn export_volume(&self, bi: &BackingImage, tmp: &Path) -> Result<(String, u64)> {
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
            .cloned()
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "backing image {:?}: volume {vol_name:?} has no replica file on node {:?}",
                    bi.name(),
                    self.node_id
                ))
            })?;
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

    /// Converts `source` into `tmp` (standalone, sparse) and hashes it; with `point`, `source` is
    /// first captured there at one instant (over the given backing file) and converted from that
    /// copy, which is removed after.
    async fn convert(
        &self,
        source: PathBuf,
        tmp: &Path,
        format: ImageFormat,
        point: Option<(PathBuf, Option<(PathBuf, ImageFormat)>)>,
    ) -> Result<(String, u64)> {
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
            let sha = crate::fsutil::sha512_file(&tmp)?;
            let size = std::fs::metadata(&tmp)
                .map_err(|e| Error::Internal(format!("{}: {e}", tmp.display())))?
                .len();
            Ok((sha, size))
        })
        .await
    }

    /// Checks a prepared temp file and moves it into place as the disk's ready file.
    async fn finish_file(
        &self,
        name: &str,
        disk: &Disk,
        tmp: &Path,
        sha512: String,
        size: u64,
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
        blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
            std::fs::rename(&tmp, &final_path)
                .map_err(|e| Error::Internal(format!("cannot move the file into place: {e}")))?;
            write_atomic(&dir.join("backing.cfg"), &serde_json::to_vec_pretty(&meta)?)
                .map_err(|e| Error::Internal(format!("cannot write backing.cfg: {e}")))?;
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
    /// transferred from another node (data extents only, SHA-512 verified on arrival). A later
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
        let source = self.pick_source(&bi, &disk)?;
        let d = disk.clone();
        let n = name.to_string();
        self.report(
            name,
            &disk,
            FileReport::new(FileState::Pending, 0, source.describe()),
        )
        .await?;
        self.spawn(name, &disk, move |this, _cancel| {
            Box::pin(async move { this.sync_file(&n, &d, source).await })
        });
        Err(Error::Unavailable(format!(
            "backing image {name:?} is being prepared on disk {}; retry shortly",
            disk.id
        )))
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
        let bi = self.image(name)?;
        let message = source.describe();
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
        let (sha512, size) = match &source {
            Source::Local(from) => {
                let src = BackingImages::file_path(from, &bi);
                let t = tmp.clone();
                let outcome = blocking(move || {
                    crate::sync::local_copy(&src, &t).map_err(|e| Error::Internal(e.to_string()))
                })
                .await?;
                tracing::info!(image = %name, disk = %disk.id, method = ?outcome.method, bytes = outcome.bytes_copied, "copied backing image file between disks");
                // Same bytes of the same node, copied by the kernel: the checksum is the image's.
                let size = std::fs::metadata(&tmp)
                    .map_err(|e| Error::Internal(format!("{}: {e}", tmp.display())))?
                    .len();
                (bi.status.checksum.clone(), size)
            }
            Source::Remote { url, .. } => {
                let progress = Arc::new(AtomicU8::new(0));
                let sink = percent_sink(progress.clone());
                let work = crate::sync::receive(
                    url,
                    &tmp,
                    &bi.status.checksum,
                    TRANSFER_IDLE_TIMEOUT,
                    &sink,
                );
                let outcome = self
                    .with_progress(name, disk, &progress, &message, work)
                    .await
                    .map_err(|e| Error::Unavailable(format!("backing image {name:?}: {e}")))?;
                tracing::info!(image = %name, disk = %disk.id, wire = outcome.bytes_on_wire, data = outcome.data_bytes, "received backing image file");
                (outcome.sha512, outcome.size)
            }
        };
        self.finish_file(name, disk, &tmp, sha512, size).await
    }

    /// Checks a file against the image's checksum: Ready when it matches, else Failed.
    async fn verify(&self, bi: &BackingImage, disk: &Disk) -> FileReport {
        let path = BackingImages::file_path(disk, bi);
        if !path.is_file() {
            return FileReport::new(FileState::Failed, 0, "the file is missing from the disk");
        }
        let p = path.clone();
        let sum = blocking(move || {
            crate::sync::sha512_sparse(&p).map_err(|e| Error::Internal(e.to_string()))
        })
        .await;
        match sum {
            Ok(sum) if sum == bi.status.checksum => {
                let mut r =
                    FileReport::new(FileState::Ready, 100, "verified after its node returned");
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
                    "checksum mismatch: expected {}, got {sum}; the file changed on disk",
                    bi.status.checksum
                ),
            ),
            Err(e) => FileReport::new(FileState::Failed, 0, e.to_string()),
        }
    }

    /// Removes every file of the image (any uuid) from this node's disks.
    pub async fn delete_image_files(&self, name: &str) -> Result<()> {
        for m in self.managers.lock().expect("managers poisoned").values() {
            if let Some(c) = m.tasks.lock().expect("tasks poisoned").get(name) {
                c.cancel();
            }
        }
        let disks = self.disks.clone();
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
                        let uuid = rest.strip_suffix(".part").unwrap_or(rest);
                        if uuid.len() != 8 || !uuid.bytes().all(|b| b.is_ascii_hexdigit()) {
                            continue;
                        }
                        let p = e.path();
                        let r = if p.is_dir() {
                            std::fs::remove_dir_all(&p)
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

    /// After a restart or a return: work that was cut off starts again from the beginning (its
    /// temp file is removed), ready files that disappeared are reported failed, files marked
    /// unknown while the node was away are verified and reused, and files of images that no
    /// longer exist are removed.
    pub async fn resume(self: &Arc<Self>) -> Result<()> {
        let images: Vec<BackingImage> = self.store.list(Kind::BackingImage)?;
        for bi in &images {
            for disk in self.disks.clone() {
                let Some(f) = bi.status.disk_file_status_map.get(&disk.id) else {
                    continue;
                };
                match f.state {
                    // An upload cut off by the restart cannot go on: its client has gone.
                    FileState::Starting | FileState::InProgress | FileState::Pending
                        if bi.spec.source_type == SourceType::Upload =>
                    {
                        let _ = std::fs::remove_file(tmp_path(&disk, bi));
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
                        let _ = std::fs::remove_file(tmp_path(&disk, bi));
                        if f.state != FileState::Pending {
                            self.report(
                                bi.name(),
                                &disk,
                                FileReport::new(
                                    FileState::Failed,
                                    0,
                                    "interrupted by a restart of bicsi",
                                ),
                            )
                            .await?;
                        }
                        let first = !bi.has_ready_file();
                        self.report(
                            bi.name(),
                            &disk,
                            FileReport::new(FileState::Pending, 0, "restarting"),
                        )
                        .await?;
                        if first {
                            self.prepare_first_file(bi.name(), &disk.id)?;
                        }
                    }
                    FileState::Ready if !BackingImages::file_path(&disk, bi).is_file() => {
                        self.report(
                            bi.name(),
                            &disk,
                            FileReport::new(
                                FileState::Failed,
                                0,
                                "the ready file is missing from the disk",
                            ),
                        )
                        .await?;
                    }
                    // This node was away: its files are verified and reused, not fetched again.
                    FileState::Unknown => {
                        let report = self.verify(bi, &disk).await;
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
            for e in std::fs::read_dir(d.path.join("tmp"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let _ = std::fs::remove_file(e.path());
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
        Ok(())
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
