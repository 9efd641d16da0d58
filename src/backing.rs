//! Backing images: the objects, their files on this node's disks, and the work that prepares
//! them (download from a URL, export from a volume, copy from another disk).
//!
//! A file is prepared under `<disk>/tmp/`, hashed with SHA-512 as it is written, checked against
//! the image's checksum, and only then renamed to `<disk>/backing-images/<name>-<uuid>/backing`
//! with a `backing.cfg` beside it; nothing half-written is ever "ready". Every change of a file's
//! state goes through [`state::transition`]. This module must not know about CSI or HTTP.

pub mod object;
pub mod state;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::download::{self, DownloadRequest};
use crate::error::{Error, Result};
use crate::fsutil::{blocking, write_atomic};
use crate::imagefmt;
use crate::model::{Disk, Volume, now_rfc3339};
use crate::os::{ImageFormat, Os};
use crate::store::{Kind, Store, StoreExt};
use object::{BackingImage, DiskFileStatus, SourceType};
use state::{FileState, transition};

/// How often progress of a running preparation is written to the store.
const PROGRESS_PERSIST_INTERVAL: Duration = Duration::from_secs(1);

/// The metadata file beside a ready `backing` file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileMeta {
    pub name: String,
    pub uuid: String,
    pub size: u64,
    pub virtual_size: u64,
    pub format: String,
    pub checksum: String,
    pub source_type: String,
}

pub struct BackingImages {
    store: Arc<dyn Store>,
    disks: Vec<Disk>,
    os: Os,
    /// Serialises read-modify-write of image objects (status updates come from many tasks).
    write: tokio::sync::Mutex<()>,
    /// Running preparations, by `<name>/<disk id>`.
    tasks: std::sync::Mutex<HashMap<String, CancellationToken>>,
}

fn task_key(name: &str, disk_id: &str) -> String {
    format!("{name}/{disk_id}")
}

/// Sets a disk file's state through the one transition function.
fn set_file(
    bi: &mut BackingImage,
    disk: &Disk,
    to: FileState,
    progress: u8,
    message: impl Into<String>,
) -> Result<()> {
    let entry = bi.status.disk_file_status_map.get(&disk.id);
    let from = entry.map(|f| f.state).unwrap_or(FileState::Pending);
    let state = transition(from, to)?;
    let changed = entry.is_none_or(|f| f.state != state);
    let time = if changed {
        now_rfc3339()
    } else {
        entry
            .map(|f| f.last_state_transition_time.clone())
            .unwrap_or_else(now_rfc3339)
    };
    bi.status.disk_file_status_map.insert(
        disk.id.clone(),
        DiskFileStatus {
            state,
            progress,
            message: message.into(),
            last_state_transition_time: time,
            node_id: disk.node_id.clone(),
        },
    );
    Ok(())
}

impl BackingImages {
    pub fn new(store: Arc<dyn Store>, disks: Vec<Disk>, os: Os) -> Arc<BackingImages> {
        Arc::new(BackingImages {
            store,
            disks,
            os,
            write: tokio::sync::Mutex::new(()),
            tasks: std::sync::Mutex::new(HashMap::new()),
        })
    }

    pub fn get(&self, name: &str) -> Result<Option<BackingImage>> {
        self.store.get(Kind::BackingImage, name)
    }

    pub fn must_get(&self, name: &str) -> Result<BackingImage> {
        self.get(name)?.ok_or_else(|| {
            Error::NotFound(format!(
                "backing image {name:?} not found; create it first (bicsi apply -f, or the backingImageDataSourceType StorageClass parameters)"
            ))
        })
    }

    pub fn list(&self) -> Result<Vec<BackingImage>> {
        self.store.list(Kind::BackingImage)
    }

    /// The path of the image's file on `disk`.
    pub fn file_path(disk: &Disk, bi: &BackingImage) -> PathBuf {
        disk.path
            .join("backing-images")
            .join(bi.dir_name())
            .join("backing")
    }

    fn tmp_path(disk: &Disk, bi: &BackingImage) -> PathBuf {
        disk.path
            .join("tmp")
            .join(format!("{}.part", bi.dir_name()))
    }

    pub fn local_disk(&self, id: &str) -> Option<&Disk> {
        self.disks.iter().find(|d| d.id == id)
    }

    /// Applies `f` to the stored object under the write lock and stores the result.
    async fn update(
        &self,
        name: &str,
        f: impl FnOnce(&mut BackingImage) -> Result<()>,
    ) -> Result<BackingImage> {
        let _w = self.write.lock().await;
        let mut bi = self.must_get(name)?;
        f(&mut bi)?;
        self.store.put(Kind::BackingImage, name, &bi)?;
        Ok(bi)
    }

    /// Creates the image, or checks that an existing one has the same spec. Returns the stored
    /// object and whether it was created now. Starts preparing the first file.
    pub async fn create(self: &Arc<Self>, wanted: BackingImage) -> Result<(BackingImage, bool)> {
        let wanted = object::from_user(wanted)?;
        let name = wanted.name().to_string();
        let created = {
            let _w = self.write.lock().await;
            if let Some(existing) = self.get(&name)? {
                if let Some(diff) = object::first_difference(&existing.spec, &wanted.spec) {
                    return Err(Error::AlreadyExists(format!(
                        "backing image {name:?} already exists and differs: {diff}; delete it first or use another name"
                    )));
                }
                return Ok((existing, false));
            }
            let mut bi = wanted;
            bi.status.uuid = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
            bi.status.checksum = bi.spec.checksum.clone();
            if bi.spec.source_type != SourceType::Upload {
                let disk = self.first_file_disk().await?;
                set_file(&mut bi, &disk, FileState::Pending, 0, "waiting to start")?;
            }
            self.store.put(Kind::BackingImage, &name, &bi)?;
            bi
        };
        tracing::info!(image = %name, source = created.spec.source_type.as_str(), "backing image created");
        self.start_first_file(&created);
        Ok((self.must_get(&name)?, true))
    }

    /// The disk with the most free space takes the first file.
    async fn first_file_disk(&self) -> Result<Disk> {
        let disks = self.disks.clone();
        blocking(move || {
            let mut best: Option<(u64, Disk)> = None;
            for d in disks {
                let free = crate::disks::free_bytes(&d.path)?;
                if best.as_ref().is_none_or(|(f, _)| free > *f) {
                    best = Some((free, d));
                }
            }
            best.map(|(_, d)| d).ok_or_else(|| {
                Error::ResourceExhausted(
                    "no disks to hold backing images; start bicsi with --disk PATH".into(),
                )
            })
        })
        .await
    }

    /// Starts the preparation of every first file in `pending` that has no running task.
    fn start_first_file(self: &Arc<Self>, bi: &BackingImage) {
        for (disk_id, f) in &bi.status.disk_file_status_map {
            if f.state != FileState::Pending {
                continue;
            }
            let Some(disk) = self.local_disk(disk_id).cloned() else {
                continue;
            };
            let key = task_key(bi.name(), disk_id);
            let cancel = CancellationToken::new();
            {
                let mut tasks = self.tasks.lock().expect("task map poisoned");
                if tasks.contains_key(&key) {
                    continue;
                }
                tasks.insert(key.clone(), cancel.clone());
            }
            let this = self.clone();
            let name = bi.name().to_string();
            tokio::spawn(async move {
                let result = this.prepare_first_file(&name, &disk, cancel.clone()).await;
                if let Err(e) = result {
                    if !cancel.is_cancelled() {
                        tracing::warn!(image = %name, disk = %disk.id, error = %e, "backing image file failed");
                        let _ = this
                            .update(&name, |bi| {
                                set_file(bi, &disk, FileState::Failed, 0, e.to_string())
                            })
                            .await;
                    }
                }
                this.tasks.lock().expect("task map poisoned").remove(&key);
            });
        }
    }

    /// Prepares the first file of an image on `disk` from its data source.
    async fn prepare_first_file(
        &self,
        name: &str,
        disk: &Disk,
        cancel: CancellationToken,
    ) -> Result<()> {
        let bi = self
            .update(name, |bi| {
                set_file(bi, disk, FileState::Starting, 0, "starting")
            })
            .await?;
        let tmp = Self::tmp_path(disk, &bi);
        let _ = std::fs::remove_file(&tmp);
        let progress = Arc::new(AtomicU8::new(0));
        let (sha512, size) = match bi.spec.source_type {
            SourceType::Download => {
                let url = bi.spec.source_parameters["url"].clone();
                self.update(name, |bi| {
                    set_file(
                        bi,
                        disk,
                        FileState::InProgress,
                        0,
                        format!("downloading {}", redact(&url)),
                    )
                })
                .await?;
                let mut req = DownloadRequest::new(url, tmp.clone());
                req.expected_sha512 =
                    (!bi.status.checksum.is_empty()).then(|| bi.status.checksum.clone());
                let p = progress.clone();
                let sink = move |received: u64, total: Option<u64>| {
                    if let Some(t) = total.filter(|t| *t > 0) {
                        p.store(
                            (received.saturating_mul(100) / t).min(99) as u8,
                            Ordering::Relaxed,
                        );
                    }
                };
                let work = download::download(&req, &sink, cancel.clone());
                let outcome = self.with_progress(name, disk, &progress, work).await;
                let outcome = outcome
                    .map_err(|e| Error::Unavailable(format!("backing image {name:?}: {e}")))?;
                (outcome.sha512, outcome.size)
            }
            SourceType::ExportFromVolume => {
                self.update(name, |bi| {
                    set_file(bi, disk, FileState::InProgress, 0, "exporting")
                })
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

    /// Runs `work` while writing its progress to the store once a second.
    async fn with_progress<T>(
        &self,
        name: &str,
        disk: &Disk,
        progress: &AtomicU8,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        tokio::pin!(work);
        let mut tick = tokio::time::interval(PROGRESS_PERSIST_INTERVAL);
        let mut last = 0u8;
        loop {
            tokio::select! {
                r = &mut work => return r,
                _ = tick.tick() => {
                    let p = progress.load(Ordering::Relaxed);
                    if p != last {
                        last = p;
                        let _ = self
                            .update(name, |bi| {
                                let msg = bi.status.disk_file_status_map.get(&disk.id).map(|f| f.message.clone()).unwrap_or_default();
                                set_file(bi, disk, FileState::InProgress, p, msg)
                            })
                            .await;
                    }
                }
            }
        }
    }

    /// Exports a detached volume's content (its replica with its backing chain, flattened).
    async fn export_volume(&self, bi: &BackingImage, tmp: &Path) -> Result<(String, u64)> {
        let vol_name = bi.spec.source_parameters["volume-name"].clone();
        let format = match bi.spec.source_parameters["export-type"].as_str() {
            "raw" => ImageFormat::Raw,
            _ => ImageFormat::Qcow2,
        };
        let id = crate::controller::volume_id_for(&vol_name);
        let volume: Volume = self.store.get(Kind::Volume, &id)?.ok_or_else(|| {
            Error::NotFound(format!(
                "backing image {:?}: volume {vol_name:?} to export does not exist",
                bi.name()
            ))
        })?;
        if let Some(p) = &volume.publication {
            return Err(Error::FailedPrecondition(format!(
                "backing image {:?}: volume {vol_name:?} is attached to node {:?}; exporting an attached volume is not supported yet: detach it and the export starts again",
                bi.name(),
                p.node_id
            )));
        }
        let replica = volume
            .replicas
            .iter()
            .find(|r| r.path.is_file())
            .cloned()
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "backing image {:?}: volume {vol_name:?} has no replica file on this node",
                    bi.name()
                ))
            })?;
        let os = self.os.clone();
        let tmp = tmp.to_path_buf();
        blocking(move || {
            os.images.convert(&replica.path, &tmp, format)?;
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
            imagefmt::probe(&probe_path).map_err(|e| Error::InvalidArgument(e.to_string()))
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
        let bi = self.must_get(name)?;
        if !bi.status.checksum.is_empty() && bi.status.checksum != sha512 {
            let _ = std::fs::remove_file(tmp);
            return Err(Error::FailedPrecondition(format!(
                "backing image {name:?}: checksum mismatch: expected {}, got {sha512}; the file changed or is corrupt",
                bi.status.checksum
            )));
        }
        let final_path = Self::file_path(disk, &bi);
        let dir = final_path
            .parent()
            .expect("file has a directory")
            .to_path_buf();
        let meta = FileMeta {
            name: name.to_string(),
            uuid: bi.status.uuid.clone(),
            size,
            virtual_size: header.virtual_size,
            format: header.format.as_str().to_string(),
            checksum: sha512.clone(),
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
        self.update(name, |bi| {
            if bi.status.checksum.is_empty() {
                // No expected checksum: the first ready file's becomes the image's.
                bi.status.checksum = sha512.clone();
            }
            bi.status.size = size;
            bi.status.virtual_size = header.virtual_size;
            bi.status.format = header.format.as_str().to_string();
            set_file(bi, disk, FileState::Ready, 100, "")
        })
        .await?;
        tracing::info!(image = %name, disk = %disk.id, size, "backing image file ready");
        Ok(())
    }

    /// The image a volume names in its StorageClass parameters: the existing one (checked against
    /// the parameters when they say how to create it), or a new one created from them.
    pub async fn ensure_for_volume(
        self: &Arc<Self>,
        req: &crate::params::BackingImageRequest,
    ) -> Result<BackingImage> {
        use crate::params::{
            BACKING_IMAGE_CHECKSUM, BACKING_IMAGE_SOURCE_PARAMETERS, BACKING_IMAGE_SOURCE_TYPE,
        };
        let name = &req.name;
        if let Some(bi) = self.get(name)? {
            if let Some((t, params)) = &req.source {
                if *t != bi.spec.source_type {
                    return Err(Error::InvalidArgument(format!(
                        "{BACKING_IMAGE_SOURCE_TYPE} is {} but backing image {name:?} exists with source type {}",
                        t.as_str(),
                        bi.spec.source_type.as_str()
                    )));
                }
                if *params != bi.spec.source_parameters {
                    return Err(Error::InvalidArgument(format!(
                        "{BACKING_IMAGE_SOURCE_PARAMETERS} {params:?} differ from those of the existing backing image {name:?}: {:?}",
                        bi.spec.source_parameters
                    )));
                }
            }
            if let Some(c) = &req.checksum {
                let known = if bi.status.checksum.is_empty() {
                    &bi.spec.checksum
                } else {
                    &bi.status.checksum
                };
                if !known.is_empty() && known != c {
                    return Err(Error::InvalidArgument(format!(
                        "{BACKING_IMAGE_CHECKSUM} {c} differs from the checksum of the existing backing image {name:?}: {known}"
                    )));
                }
            }
            return Ok(bi);
        }
        let Some((source_type, params)) = &req.source else {
            return Err(Error::NotFound(format!(
                "backing image {name:?} not found; create it first, or give {BACKING_IMAGE_SOURCE_TYPE} and {BACKING_IMAGE_SOURCE_PARAMETERS} so bicsi creates it"
            )));
        };
        if *source_type == SourceType::Upload {
            return Err(Error::InvalidArgument(format!(
                "backing image {name:?} cannot be created by uploading through a StorageClass: upload it first (bicsi image upload {name} FILE, or POST the file to the HTTP API), then name it in backingImage"
            )));
        }
        let bi = BackingImage {
            api_version: object::API_VERSION.to_string(),
            kind: object::KIND.to_string(),
            metadata: object::ObjectMeta {
                name: name.clone(),
                namespace: object::DEFAULT_NAMESPACE.to_string(),
            },
            spec: object::BackingImageSpec {
                source_type: *source_type,
                source_parameters: params.clone(),
                checksum: req.checksum.clone().unwrap_or_default(),
                min_number_of_copies: 1,
            },
            status: Default::default(),
        };
        let (bi, _) = self.create(bi).await?;
        Ok(bi)
    }

    /// The ready file of the image on `disk`, or a retryable error while it is being prepared
    /// there: copied from another disk of this node that has it (reflink where the filesystem
    /// can, else a sparse copy), verified, then renamed into place. A later call continues the
    /// same work; it never starts it twice.
    pub async fn prepare_on_disk(self: &Arc<Self>, name: &str, disk: &Disk) -> Result<PathBuf> {
        let bi = self.must_get(name)?;
        let path = Self::file_path(disk, &bi);
        match bi.status.disk_file_status_map.get(&disk.id) {
            Some(f) if f.state == FileState::Ready && path.is_file() => return Ok(path),
            Some(f) if !f.state.is_final() => {
                return Err(Error::Unavailable(format!(
                    "backing image {name:?} is being prepared on disk {}: {} {}%{}; retry shortly",
                    disk.id,
                    f.state,
                    f.progress,
                    if f.message.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", f.message)
                    }
                )));
            }
            _ => {}
        }
        let source = self
            .disks
            .iter()
            .find(|d| {
                d.id != disk.id
                    && bi
                        .status
                        .disk_file_status_map
                        .get(&d.id)
                        .is_some_and(|f| f.state == FileState::Ready)
                    && Self::file_path(d, &bi).is_file()
            })
            .cloned()
            .ok_or_else(|| {
                Error::Unavailable(format!(
                    "backing image {name:?} has no ready file to copy to disk {} yet: {}",
                    disk.id,
                    Self::describe(&bi)
                ))
            })?;
        let key = task_key(name, &disk.id);
        let cancel = CancellationToken::new();
        {
            let mut tasks = self.tasks.lock().expect("task map poisoned");
            if tasks.contains_key(&key) {
                return Err(Error::Unavailable(format!(
                    "backing image {name:?} is being copied to disk {}; retry shortly",
                    disk.id
                )));
            }
            tasks.insert(key.clone(), cancel.clone());
        }
        self.update(name, |bi| {
            if bi
                .status
                .disk_file_status_map
                .get(&disk.id)
                .is_some_and(|f| f.state == FileState::Failed)
            {
                set_file(bi, disk, FileState::Pending, 0, "preparing again")?;
            }
            set_file(
                bi,
                disk,
                FileState::Pending,
                0,
                format!("copy from disk {} queued", source.id),
            )
        })
        .await?;
        let this = self.clone();
        let name_owned = name.to_string();
        let disk_owned = disk.clone();
        tokio::spawn(async move {
            let r = this
                .copy_between_disks(&name_owned, &source, &disk_owned)
                .await;
            if let Err(e) = r {
                tracing::warn!(image = %name_owned, disk = %disk_owned.id, error = %e, "copying backing image file failed");
                let _ = this
                    .update(&name_owned, |bi| {
                        set_file(bi, &disk_owned, FileState::Failed, 0, e.to_string())
                    })
                    .await;
            }
            this.tasks.lock().expect("task map poisoned").remove(&key);
        });
        Err(Error::Unavailable(format!(
            "backing image {name:?} is being copied to disk {}; retry shortly",
            disk.id
        )))
    }

    async fn copy_between_disks(&self, name: &str, from: &Disk, to: &Disk) -> Result<()> {
        let bi = self
            .update(name, |bi| {
                set_file(
                    bi,
                    to,
                    FileState::Starting,
                    0,
                    format!("copying from disk {}", from.id),
                )
            })
            .await?;
        self.update(name, |bi| {
            set_file(
                bi,
                to,
                FileState::InProgress,
                0,
                format!("copying from disk {}", from.id),
            )
        })
        .await?;
        let src = Self::file_path(from, &bi);
        let tmp = Self::tmp_path(to, &bi);
        let _ = std::fs::remove_file(&tmp);
        let t = tmp.clone();
        let (sha512, size) = blocking(move || {
            let out = std::process::Command::new("cp")
                .args(["--sparse=always", "--reflink=auto"])
                .arg(&src)
                .arg(&t)
                .output()
                .map_err(|e| Error::Internal(format!("cp: {e}")))?;
            if !out.status.success() {
                let _ = std::fs::remove_file(&t);
                return Err(Error::Internal(format!(
                    "copying {} failed: {}",
                    src.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            let sha = crate::fsutil::sha512_file(&t)?;
            let size = std::fs::metadata(&t)
                .map_err(|e| Error::Internal(e.to_string()))?
                .len();
            Ok((sha, size))
        })
        .await?;
        self.finish_file(name, to, &tmp, sha512, size).await
    }

    /// Volumes that use the image.
    pub fn users(&self, name: &str) -> Result<Vec<String>> {
        let volumes: Vec<Volume> = self.store.list(Kind::Volume)?;
        Ok(volumes
            .into_iter()
            .filter(|v| v.spec.backing_image.as_deref() == Some(name))
            .map(|v| v.id)
            .collect())
    }

    /// Deletes the image and its files; refused while a volume uses it.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let Some(bi) = self.get(name)? else {
            return Ok(());
        };
        let users = self.users(name)?;
        if !users.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "backing image {name:?} is used by volumes {}; delete them first",
                users.join(", ")
            )));
        }
        {
            let tasks = self.tasks.lock().expect("task map poisoned");
            for (key, cancel) in tasks.iter() {
                if key.starts_with(&format!("{name}/")) {
                    cancel.cancel();
                }
            }
        }
        let disks = self.disks.clone();
        let b = bi.clone();
        blocking(move || {
            for d in &disks {
                let dir = d.path.join("backing-images").join(b.dir_name());
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(Error::Internal(format!(
                            "cannot remove {}: {e}",
                            dir.display()
                        )));
                    }
                }
                let _ = std::fs::remove_file(Self::tmp_path(d, &b));
            }
            Ok(())
        })
        .await?;
        let _w = self.write.lock().await;
        self.store.delete(Kind::BackingImage, name)?;
        tracing::info!(image = %name, "backing image deleted");
        Ok(())
    }

    /// After a restart: files whose preparation was cut off start again (their temp files are
    /// removed), and ready files that disappeared are marked failed.
    pub async fn resume(self: &Arc<Self>) -> Result<()> {
        for bi in self.list()? {
            let name = bi.name().to_string();
            for (disk_id, f) in bi.status.disk_file_status_map.clone() {
                let Some(disk) = self.local_disk(&disk_id).cloned() else {
                    continue;
                };
                match f.state {
                    FileState::Starting | FileState::InProgress | FileState::Pending => {
                        let _ = std::fs::remove_file(Self::tmp_path(&disk, &bi));
                        self.update(&name, |bi| {
                            if f.state != FileState::Pending {
                                set_file(
                                    bi,
                                    &disk,
                                    FileState::Failed,
                                    0,
                                    "interrupted by a restart of bicsi",
                                )?;
                            }
                            set_file(
                                bi,
                                &disk,
                                FileState::Pending,
                                0,
                                "restarting after a restart of bicsi",
                            )
                        })
                        .await?;
                    }
                    FileState::Ready if !Self::file_path(&disk, &bi).is_file() => {
                        self.update(&name, |bi| {
                            set_file(
                                bi,
                                &disk,
                                FileState::Failed,
                                0,
                                "the ready file is missing from the disk",
                            )
                        })
                        .await?;
                    }
                    _ => {}
                }
            }
            let bi = self.must_get(&name)?;
            self.start_first_file(&bi);
        }
        Ok(())
    }

    /// A one-line summary of where an image stands, for retryable errors and tables.
    pub fn describe(bi: &BackingImage) -> String {
        if bi.status.disk_file_status_map.is_empty() {
            return match bi.spec.source_type {
                SourceType::Upload => "waiting for an upload".to_string(),
                _ => "no file yet".to_string(),
            };
        }
        bi.status
            .disk_file_status_map
            .iter()
            .map(|(disk, f)| {
                let mut s = format!("{disk}: {} {}%", f.state, f.progress);
                if !f.message.is_empty() {
                    s.push_str(&format!(" ({})", f.message));
                }
                s
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// A URL without credentials or query, for messages.
fn redact(url: &str) -> String {
    reqwest::Url::parse(url)
        .map(|u| download::redact(&u))
        .unwrap_or_else(|_| "<invalid URL>".to_string())
}
