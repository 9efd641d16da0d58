//! The controller's side of backups: which snapshot a backup reads (an existing one, or one taken
//! for it and removed after), the backup and restore records, the target from the settings, and
//! the seed's restore rule: "As long as the backing image is already set for the backup volume,
//! Longhorn will automatically choose the backing image during the restore" and "allows you to
//! re-specify/override the backing image". A restore builds one file of the backup's content
//! over the chosen image on a node, then makes the volume through the normal restore-from-snapshot
//! path (`restore_volume`). The block work is the node agents' (`crate::backup::blocks`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Controller, CreateVolume, size_for_range, volume_id_for};
use crate::backup::blocks::{
    BackupFileRequest, OriginalImage, Progress, ProgressFn, RestoreFileRequest,
};
use crate::backup::layout::{self, BackupMeta, BackupVolumeMeta, ImageRef};
use crate::backup::{Backup, BackupState, Restore, Target};
use crate::error::{Error, Result};
use crate::model::{Capability, Volume};
use crate::params::{self, VolumeParams};
use crate::settings::BACKUP_TARGET;
use crate::store::{Kind, StoreExt};

/// A `bicsi backup create` request.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateBackup {
    pub volume: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Read this snapshot (its id) instead of taking one.
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub full: bool,
    /// How this backup's new blocks are compressed (default: the volume's `backupCompression`,
    /// else zstd).
    #[serde(default)]
    pub compression: Option<String>,
}

/// A `bicsi backup restore` request.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreBackup {
    pub backup: String,
    pub volume: String,
    #[serde(default)]
    pub backing_image: Option<String>,
    /// 0: the backup's size.
    #[serde(default)]
    pub size_bytes: u64,
    /// StorageClass parameters of the new volume, over the ones the backup recorded.
    #[serde(default)]
    pub parameters: std::collections::BTreeMap<String, String>,
}

/// How every error of the backup target starts (`crate::backup::target`).
const TARGET_ERROR_PREFIX: &str = "backup target ";

/// How often a running backup or restore writes its progress to the store.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// A progress callback that updates a record in the store at most every [`PROGRESS_EVERY`].
fn progress_writer<T: serde::Serialize + Send + 'static>(
    store: Arc<dyn crate::store::Store>,
    kind: Kind,
    key: String,
    record: T,
    apply: fn(&mut T, &Progress),
) -> ProgressFn {
    let state = std::sync::Mutex::new((record, Instant::now() - PROGRESS_EVERY));
    Arc::new(move |p: Progress| {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        apply(&mut s.0, &p);
        if s.1.elapsed() >= PROGRESS_EVERY || p.blocks_done == p.blocks_total {
            s.1 = Instant::now();
            if let Err(e) = store.put(kind, &key, &s.0) {
                tracing::debug!(key = %key, error = %e, "cannot record progress");
            }
        }
    })
}

impl Controller {
    /// The backup target of the settings, opened (not reached yet).
    pub fn backup_target(&self) -> Result<Target> {
        let settings = self.backing.settings();
        let url = settings.text(BACKUP_TARGET)?;
        let creds = settings.backup_credential_file()?;
        Target::open(&url, creds.as_deref())
    }

    fn credential_file(&self) -> Result<Option<std::path::PathBuf>> {
        self.backing.settings().backup_credential_file()
    }

    pub fn get_backup_record(&self, name: &str) -> Result<Option<Backup>> {
        self.store.get(Kind::Backup, name)
    }

    /// Checks a backup request and records it as in progress; the work is [`Self::run_backup`].
    fn begin_backup(&self, req: &CreateBackup) -> Result<(Backup, Volume)> {
        let volume = self.must_get(&volume_id_for(&req.volume))?;
        let name = match &req.name {
            Some(n) => n.trim().to_string(),
            None => format!(
                "{}-{}",
                volume.id,
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
        };
        layout::check_name("backup", &name)?;
        layout::check_name("backup volume", &volume.id)?;
        if let Some(c) = &req.compression {
            layout::Compression::parse(c)?;
        }
        if let Some(existing) = self.get_backup_record(&name)?
            && existing.state != BackupState::Error
        {
            return Err(Error::AlreadyExists(format!(
                "backup {name:?} exists already ({} of volume {:?}); use another name or delete it first",
                existing.state.as_str(),
                existing.volume
            )));
        }
        let target = self.backup_target()?;
        let rec = Backup {
            name: name.clone(),
            volume: volume.id.clone(),
            snapshot: req.snapshot.clone().unwrap_or_default(),
            target: target.url().to_string(),
            state: BackupState::InProgress,
            progress: 0,
            blocks_total: 0,
            blocks_done: 0,
            blocks_uploaded: 0,
            bytes_uploaded: 0,
            size_bytes: volume.spec.capacity_bytes,
            backing_image: volume.spec.backing_image.clone(),
            full: req.full,
            message: String::new(),
            created: crate::model::now_rfc3339(),
            completed: String::new(),
        };
        self.store.put(Kind::Backup, &name, &rec)?;
        Ok((rec, volume))
    }

    /// Starts a backup in the background; the record shows its progress.
    pub fn start_backup(self: &Arc<Self>, req: CreateBackup) -> Result<Backup> {
        let (rec, volume) = self.begin_backup(&req)?;
        let this = self.clone();
        let started = rec.clone();
        tokio::spawn(async move {
            let _ = this.finish_backup(rec, volume, req).await;
        });
        Ok(started)
    }

    /// Takes a backup and waits for it (CSI CreateSnapshot with `type: bak`).
    pub async fn backup_now(&self, req: CreateBackup) -> Result<Backup> {
        let (rec, volume) = self.begin_backup(&req)?;
        self.finish_backup(rec, volume, req).await
    }

    async fn finish_backup(
        &self,
        rec: Backup,
        volume: Volume,
        req: CreateBackup,
    ) -> Result<Backup> {
        let name = rec.name.clone();
        let result = self.run_backup(rec.clone(), volume, &req).await;
        let mut done: Backup = self.get_backup_record(&name)?.unwrap_or(rec);
        match &result {
            Ok(meta) => {
                done.state = done.state.to(BackupState::Completed)?;
                done.progress = 100;
                done.bytes_uploaded = meta.uploaded_bytes;
                done.size_bytes = meta.size_bytes;
                done.completed = crate::model::now_rfc3339();
                tracing::info!(backup = %name, volume = %done.volume, uploaded = meta.uploaded_bytes, blocks = meta.blocks.len(), "backup completed");
            }
            Err(e) => {
                done.state = done.state.to(BackupState::Error)?;
                done.message = e.to_string();
                tracing::warn!(backup = %name, error = %e, "backup failed");
            }
        }
        self.store.put(Kind::Backup, &name, &done)?;
        result.map(|_| done)
    }

    async fn run_backup(
        &self,
        rec: Backup,
        volume: Volume,
        req: &CreateBackup,
    ) -> Result<BackupMeta> {
        let target = self.backup_target()?;
        target.check().await?;
        // One backup or deletion per backup volume at a time (a deletion would collect the
        // blocks this backup has put before its metadata lists them).
        let _backup_volume = self
            .guards
            .try_take(&format!("backupvolume/{}", volume.id), "backup volume")?;
        // An existing snapshot, or one taken now and removed after.
        let (file, image, temporary) = match &req.snapshot {
            Some(sid) => {
                let s = self
                    .get_snapshot(sid)?
                    .ok_or_else(|| Error::NotFound(format!("snapshot {sid:?} not found")))?;
                if s.source_volume_id != volume.id {
                    return Err(Error::InvalidArgument(format!(
                        "snapshot {sid:?} is of volume {:?}, not of {:?}",
                        s.source_volume_id, volume.id
                    )));
                }
                let file = s.files.first().cloned().ok_or_else(|| {
                    Error::FailedPrecondition(format!("snapshot {sid:?} has no file to read"))
                })?;
                (file, s.backing_image.clone(), false)
            }
            None => {
                let _guard = self.guards.try_take(&volume.id, "volume")?;
                let volume = self.make_deferred_replicas(volume.clone()).await?;
                let files = self
                    .capture(&format!(".backup-{}", rec.name), &volume)
                    .await?;
                // Only the first file is read; the copies on other disks are not needed.
                if files.len() > 1 {
                    let _ = self.delete_files(&files[1..]).await;
                }
                let file = files.into_iter().next().ok_or_else(|| {
                    Error::Internal(format!("volume {:?}: the capture made no file", volume.id))
                })?;
                (file, volume.spec.backing_image.clone(), true)
            }
        };
        let backing = match image.as_deref() {
            Some(name) => {
                let bi = self.backing.must_get(name)?;
                Some(ImageRef {
                    name: name.to_string(),
                    checksum: bi.status.checksum.clone(),
                    source_type: bi.spec.source_type.as_str().to_string(),
                    source_parameters: bi.spec.source_parameters.clone(),
                    virtual_size: bi.status.virtual_size,
                })
            }
            None => None,
        };
        // "BackupBackingImage": the first backup over an image not in the target takes it too,
        // so a restore works where the image does not exist.
        if let Some(b) = &backing {
            self.backup_image(&b.name).await?;
        }
        let block_size = match volume.spec.parameters.get(params::BACKUP_BLOCK_SIZE) {
            Some(v) => layout::parse_block_size(v)?,
            None => layout::DEFAULT_BLOCK_SIZE,
        };
        let compression = match req.compression.as_deref().or(volume
            .spec
            .parameters
            .get(params::BACKUP_COMPRESSION)
            .map(String::as_str))
        {
            Some(c) => layout::Compression::parse(c)?,
            None => layout::Compression::Zstd,
        };
        let progress = progress_writer(
            self.store.clone(),
            Kind::Backup,
            rec.name.clone(),
            rec.clone(),
            |r: &mut Backup, p| r.set_progress(p),
        );
        let request = BackupFileRequest {
            target_url: target.url().to_string(),
            credential_file: self.credential_file()?,
            name: rec.name.clone(),
            volume: volume.id.clone(),
            snapshot: if temporary {
                String::new()
            } else {
                req.snapshot.clone().unwrap_or_default()
            },
            file: file.clone(),
            backing,
            block_size,
            full: req.full,
            compression,
            volume_parameters: restore_defaults(&volume),
        };
        let result = self
            .cluster
            .agent(&file.node_id)?
            .backup_file(request, progress)
            .await;
        if temporary && let Err(e) = self.delete_files(std::slice::from_ref(&file)).await {
            tracing::warn!(backup = %rec.name, error = %e, "cannot remove the backup's temporary snapshot");
        }
        result
    }

    /// Backs up a backing image's file into the target, once per target: an image there with
    /// the same SHA-512 is not put again.
    pub async fn backup_image(&self, name: &str) -> Result<crate::backup::image::ImageMeta> {
        let target = self.backup_target()?;
        target.check().await?;
        let bi = self.backing.must_get(name)?;
        if bi.status.checksum.is_empty() || !bi.has_ready_file() {
            return Err(Error::FailedPrecondition(format!(
                "backing image {name:?} has no ready file yet ({}); back it up once it is ready",
                bi.describe()
            )));
        }
        if let Some(m) = crate::backup::image::get_meta(&target, name).await? {
            if m.checksum == bi.status.checksum {
                return Ok(m);
            }
            return Err(Error::AlreadyExists(format!(
                "the backup target {} holds another backing image named {name:?} (SHA-512 {}, this one's is {}); delete it there or rename the image",
                target.url(),
                m.checksum,
                bi.status.checksum
            )));
        }
        let node = bi
            .status
            .disk_file_status_map
            .values()
            .find(|f| f.state == crate::backing::state::FileState::Ready)
            .map(|f| f.node_id.clone())
            .unwrap_or_default();
        let template = crate::backup::image::ImageMeta {
            format: layout::FORMAT,
            name: name.to_string(),
            checksum: bi.status.checksum.clone(),
            size: 0,
            virtual_size: bi.status.virtual_size,
            image_format: bi.status.format.clone(),
            source_type: bi.spec.source_type.as_str().to_string(),
            source_parameters: bi.spec.source_parameters.clone(),
            block_size: 0,
            blocks: Vec::new(),
            uploaded_bytes: 0,
            created: String::new(),
        };
        self.cluster
            .agent(&node)?
            .backup_image(target.url(), self.credential_file()?, template)
            .await
    }

    /// The backups: the records of this bicsi (in progress, failed, done) and the completed
    /// backups in the target it has no record of (taken by another bicsi).
    pub async fn list_backups(&self, volume: Option<&str>) -> Result<Vec<Backup>> {
        let mut out: Vec<Backup> = self.store.list(Kind::Backup)?;
        if let Ok(target) = self.backup_target() {
            let volumes = match volume {
                Some(v) => vec![volume_id_for(v)],
                None => target.folders("backupvolumes").await?,
            };
            for v in volumes {
                for key in target.list(&layout::backups_prefix(&v)).await? {
                    let Some(name) = key.rsplit('/').next().and_then(|n| n.strip_suffix(".json"))
                    else {
                        continue;
                    };
                    if out.iter().any(|b| b.name == name) {
                        continue;
                    }
                    let Some(bytes) = target.get(&key).await? else {
                        continue;
                    };
                    let meta = BackupMeta::parse(&bytes, &key)?;
                    out.push(record_of(&meta, target.url()));
                }
            }
        }
        if let Some(v) = volume {
            let id = volume_id_for(v);
            out.retain(|b| b.volume == id);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The backup volumes in the target.
    pub async fn backup_volumes(&self) -> Result<Vec<BackupVolumeMeta>> {
        let target = self.backup_target()?;
        target.check().await?;
        let mut out = Vec::new();
        for v in target.folders("backupvolumes").await? {
            let key = layout::volume_key(&v);
            if let Some(bytes) = target.get(&key).await? {
                out.push(serde_json::from_slice(&bytes).map_err(|e| {
                    Error::FailedPrecondition(format!(
                        "backup volume metadata {key} in {} is not valid: {e}",
                        target.url()
                    ))
                })?);
            }
        }
        Ok(out)
    }

    /// The metadata of a completed backup, found by name in any backup volume of the target.
    pub async fn find_backup(&self, target: &Target, name: &str) -> Result<BackupMeta> {
        layout::check_name("backup", name)?;
        let volumes = match self.get_backup_record(name)? {
            Some(rec) => vec![rec.volume],
            None => target.folders("backupvolumes").await?,
        };
        for v in volumes {
            let key = layout::backup_key(&v, name);
            if let Some(bytes) = target.get(&key).await? {
                return BackupMeta::parse(&bytes, &key);
            }
        }
        if let Some(rec) = self.get_backup_record(name)? {
            return Err(Error::FailedPrecondition(format!(
                "backup {name:?} is {}{}; only a completed backup can be restored",
                rec.state.as_str(),
                if rec.message.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", rec.message)
                }
            )));
        }
        Err(Error::NotFound(format!(
            "backup {name:?} not found in the backup target {}; `bicsi backup list` shows the backups there",
            target.url()
        )))
    }

    /// Deletes a backup: its metadata first (it stops being a backup), then the blocks of its
    /// backup volume that no other backup lists. Unknown: Ok.
    pub async fn delete_backup(&self, name: &str) -> Result<()> {
        layout::check_name("backup", name)?;
        let rec = self.get_backup_record(name)?;
        if rec
            .as_ref()
            .is_some_and(|r| r.state == BackupState::InProgress)
        {
            return Err(Error::FailedPrecondition(format!(
                "backup {name:?} is in progress; delete it once it has completed or failed"
            )));
        }
        let target = self.backup_target()?;
        target.check().await?;
        let volume = match &rec {
            Some(r) => Some(r.volume.clone()),
            None => match self.find_backup(&target, name).await {
                Ok(m) => Some(m.volume),
                Err(Error::NotFound(_)) => None,
                Err(e) => return Err(e),
            },
        };
        if let Some(volume) = volume {
            // One deletion or backup per backup volume at a time: a backup running meanwhile
            // puts blocks no metadata lists yet.
            let _guard = self
                .guards
                .try_take(&format!("backupvolume/{volume}"), "backup volume")?;
            if self
                .store
                .list::<Backup>(Kind::Backup)?
                .iter()
                .any(|b| b.volume == volume && b.state == BackupState::InProgress)
            {
                return Err(Error::Aborted(format!(
                    "a backup of volume {volume:?} is in progress; delete backup {name:?} after it"
                )));
            }
            target.delete(&layout::backup_key(&volume, name)).await?;
            let removed = self.collect_blocks(&target, &volume).await?;
            tracing::info!(backup = %name, volume = %volume, removed_blocks = removed, "backup deleted");
        }
        self.store.delete(Kind::Backup, name)?;
        Ok(())
    }

    /// Removes the blocks of a backup volume that none of its backups lists (a block is its hash
    /// under one compression); how many.
    async fn collect_blocks(&self, target: &Target, volume: &str) -> Result<usize> {
        let mut used = std::collections::HashSet::new();
        for key in target.list(&layout::backups_prefix(volume)).await? {
            if let Some(bytes) = target.get(&key).await? {
                let meta = BackupMeta::parse(&bytes, &key)?;
                used.extend(meta.blocks.iter().filter_map(|b| b.key(volume)));
            }
        }
        let mut removed = 0;
        for key in target.list(&layout::blocks_prefix(volume)).await? {
            if layout::hash_of_block_key(&key).is_some() && !used.contains(&key) {
                target.delete(&key).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The backing image a restore of `meta` goes over: the override (ready, and not larger
    /// than the volume), or the backup's own, which must exist here with the same SHA-512.
    async fn restore_image(
        &self,
        meta: &BackupMeta,
        p: &VolumeParams,
        size: u64,
        name: &str,
    ) -> Result<(Option<String>, Option<OriginalImage>)> {
        if let Some(b) = &p.backing_image {
            let bi = self.ready_image(b).await?;
            if bi.status.virtual_size > size {
                return Err(Error::OutOfRange(format!(
                    "volume {name:?} would be {size} bytes, smaller than the {}-byte virtual size of backing image {:?}; request at least that size",
                    bi.status.virtual_size,
                    bi.name()
                )));
            }
            let original = self
                .original_image(meta, bi.status.checksum.as_str())
                .await?;
            return Ok((Some(bi.name().to_string()), original));
        }
        let Some(want) = &meta.backing_image else {
            return Ok((None, None));
        };
        let Some(bi) = self.backing.get(&want.name)? else {
            // Not here: restored from the target first when the target holds it.
            let target = self.backup_target()?;
            if let Some(m) = crate::backup::image::get_meta(&target, &want.name).await?
                && m.checksum == want.checksum
            {
                let bi = crate::backing::object::BackingImage {
                    api_version: crate::backing::object::API_VERSION.to_string(),
                    kind: crate::backing::object::KIND.to_string(),
                    metadata: crate::backing::object::ObjectMeta {
                        name: want.name.clone(),
                        namespace: crate::backing::object::DEFAULT_NAMESPACE.to_string(),
                    },
                    spec: crate::backing::object::BackingImageSpec {
                        source_type: crate::backing::object::SourceType::Restore,
                        source_parameters: [(
                            crate::backup::image::BACKUP_URL.to_string(),
                            crate::backup::image::backup_url(target.url(), &want.name),
                        )]
                        .into(),
                        checksum: want.checksum.clone(),
                        min_number_of_copies: 1,
                    },
                    status: Default::default(),
                };
                self.backing.create(bi).await?;
                tracing::info!(image = %want.name, backup = %meta.name, "backing image restored from the backup target for a restore");
                let req = params::BackingImageRequest {
                    name: want.name.clone(),
                    source: None,
                    checksum: None,
                };
                return Ok((Some(self.ready_image(&req).await?.name().to_string()), None));
            }
            return Err(Error::FailedPrecondition(format!(
                "backup {:?} was taken over backing image {:?} (SHA-512 {}, {} {:?}), which does not exist here; create it with that checksum (bicsi apply), or restore over another image with --backing-image",
                meta.name, want.name, want.checksum, want.source_type, want.source_parameters
            )));
        };
        if !crate::model::checksum::matches(&want.checksum, &bi.status.checksum) {
            return Err(Error::FailedPrecondition(format!(
                "backup {:?} was taken over backing image {:?} with SHA-512 {}, but the image of that name here has {}; restore over it explicitly with --backing-image {} if its content is the same, or over another image",
                meta.name,
                want.name,
                want.checksum,
                if bi.status.checksum.is_empty() {
                    "no checksum yet"
                } else {
                    &bi.status.checksum
                },
                want.name
            )));
        }
        let req = params::BackingImageRequest {
            name: want.name.clone(),
            source: None,
            checksum: None,
        };
        Ok((Some(self.ready_image(&req).await?.name().to_string()), None))
    }

    /// Where a restore over an override finds the image `meta` was taken over (the blocks the
    /// backup left out hold its bytes): an image of this cluster with its SHA-512, else the
    /// target's copy. None when the override has that SHA-512 itself, or when neither has it
    /// (the left-out blocks then come from the override, as logged).
    async fn original_image(
        &self,
        meta: &BackupMeta,
        override_checksum: &str,
    ) -> Result<Option<OriginalImage>> {
        let Some(want) = &meta.backing_image else {
            return Ok(None);
        };
        if crate::model::checksum::matches(&want.checksum, override_checksum) {
            return Ok(None);
        }
        let mut here: Vec<_> = self
            .backing
            .list()?
            .into_iter()
            .filter(|bi| bi.status.checksum == want.checksum)
            .collect();
        here.sort_by_key(|bi| bi.name() != want.name);
        if let Some(bi) = here.first() {
            let req = params::BackingImageRequest {
                name: bi.name().to_string(),
                source: None,
                checksum: None,
            };
            let local = self.ready_image(&req).await?.name().to_string();
            return Ok(Some(OriginalImage {
                name: want.name.clone(),
                checksum: want.checksum.clone(),
                local: Some(local),
            }));
        }
        let target = self.backup_target()?;
        if let Some(m) = crate::backup::image::get_meta(&target, &want.name).await?
            && m.checksum == want.checksum
        {
            return Ok(Some(OriginalImage {
                name: want.name.clone(),
                checksum: want.checksum.clone(),
                local: None,
            }));
        }
        tracing::warn!(backup = %meta.name, image = %want.name, "the backup's backing image is neither here nor in the target: the blocks the backup left out come from the override image as they are");
        Ok(None)
    }

    /// CreateVolume from a backup: one file of the backup's content over the chosen image on a
    /// node's disk, then the volume made from it like a restore from a snapshot.
    pub(super) async fn restore_from_backup(
        &self,
        req: &CreateVolume,
        mut p: VolumeParams,
        id: &str,
        backup: &str,
    ) -> Result<Volume> {
        let target = self.backup_target()?;
        target.check().await?;
        let meta = self.find_backup(&target, backup).await?;
        let size = size_for_range(req.required_bytes, req.limit_bytes, meta.size_bytes)?;
        if size < meta.size_bytes {
            return Err(Error::OutOfRange(format!(
                "volume {:?} would be {size} bytes, smaller than backup {backup:?} ({} bytes); request at least {} bytes",
                req.name, meta.size_bytes, meta.size_bytes
            )));
        }
        let (image, original) = self.restore_image(&meta, &p, size, &req.name).await?;
        // A disk that holds a ready file of the image, else the one with the most room.
        let mut disks = self.cluster.disks().await?;
        if disks.is_empty() {
            return Err(Error::ResourceExhausted(
                "no disks to restore onto; start bicsi with --disk PATH".into(),
            ));
        }
        let ready_on: Vec<String> = match &image {
            Some(name) => self
                .backing
                .must_get(name)?
                .status
                .disk_file_status_map
                .iter()
                .filter(|(_, f)| f.state == crate::backing::state::FileState::Ready)
                .map(|(d, _)| d.clone())
                .collect(),
            None => Vec::new(),
        };
        disks.sort_by_key(|d| (!ready_on.contains(&d.disk.id), u64::MAX - d.free_bytes));
        let progress_key = req.name.clone();
        let mut restore_rec = self.restore_record_for(req, backup, size)?;
        // The disk an earlier attempt built on, where its file is continued; else the best one,
        // recorded (before any block is written) for the next attempt.
        let earlier = disks
            .iter()
            .position(|d| !restore_rec.disk_id.is_empty() && d.disk.id == restore_rec.disk_id);
        let disk = disks.swap_remove(earlier.unwrap_or(0)).disk;
        restore_rec.disk_id = disk.id.clone();
        self.store.put(Kind::Restore, &progress_key, &restore_rec)?;
        let csi = restore_rec.csi;
        let progress: ProgressFn = progress_writer(
            self.store.clone(),
            Kind::Restore,
            progress_key.clone(),
            restore_rec,
            Restore::set_progress,
        );
        let agent = self.cluster.agent(&disk.node_id)?;
        let file = agent
            .restore_backup_file(
                RestoreFileRequest {
                    target_url: target.url().to_string(),
                    credential_file: self.credential_file()?,
                    meta: meta.clone(),
                    restore_id: format!(".restore-{id}"),
                    disk_id: disk.id.clone(),
                    backing_image: image.clone(),
                    original,
                },
                progress,
            )
            .await;
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                // A CSI restore's record says why its attempt failed; the CO's retry continues
                // it on the same disk. (`bicsi backup restore`'s is ended by its own task.)
                if csi {
                    self.end_csi_restore(&progress_key, Err(&e));
                }
                return Err(e);
            }
        };
        // The file is over `image` already: the snapshot path only copies it (same image).
        p.backing_image = None;
        let result = self
            .restore_volume(
                req,
                p,
                id,
                std::slice::from_ref(&file),
                meta.size_bytes,
                image,
            )
            .await;
        if let Err(e) = self.delete_files(std::slice::from_ref(&file)).await {
            tracing::warn!(volume = %id, error = %e, "cannot remove the restore's temporary file");
        }
        if csi {
            self.end_csi_restore(&progress_key, result.as_ref().map(|_| ()));
        }
        let v = result?;
        tracing::info!(volume = %id, backup = %backup, data_bytes = meta.data_bytes, "volume restored from a backup");
        Ok(v)
    }

    /// The Restore record a restore into `req.name` works under. `bicsi backup restore` made
    /// one before it started (its task drives it); a CSI CreateVolume from a `bak` snapshot makes
    /// its own, so the CO's retry of the same call (same name) after a restart or a failure finds
    /// the disk the earlier attempt built on and continues its file there.
    fn restore_record_for(&self, req: &CreateVolume, backup: &str, size: u64) -> Result<Restore> {
        let existing: Option<Restore> = self.store.get(Kind::Restore, &req.name)?;
        match existing {
            Some(r) if !r.csi && r.state == BackupState::InProgress => Ok(r),
            Some(mut r) if r.csi && r.backup == backup && r.state != BackupState::Completed => {
                // A retry: another attempt of the same restore.
                r.attempts += 1;
                r.blocks_fetched = 0;
                r.state = BackupState::InProgress;
                r.message.clear();
                tracing::info!(volume = %r.volume, backup = %r.backup, attempt = r.attempts, done = r.blocks_done, disk = %r.disk_id, "CreateVolume retried: continuing its restore");
                Ok(r)
            }
            _ => Ok(Restore {
                volume: req.name.clone(),
                backup: backup.to_string(),
                backing_image: None,
                size_bytes: size,
                state: BackupState::InProgress,
                progress: 0,
                bytes_fetched: 0,
                message: String::new(),
                created: crate::model::now_rfc3339(),
                attempts: 1,
                blocks_total: 0,
                blocks_done: 0,
                blocks_fetched: 0,
                disk_id: String::new(),
                parameters: Default::default(),
                csi: true,
            }),
        }
    }

    /// Marks a CSI restore's record with how its attempt ended.
    fn end_csi_restore(&self, volume: &str, result: std::result::Result<(), &Error>) {
        let Ok(Some(mut r)) = self.get_restore(volume) else {
            return;
        };
        match result {
            Ok(()) => {
                r.state = BackupState::Completed;
                r.progress = 100;
                r.message.clear();
            }
            Err(e) => {
                r.state = BackupState::Error;
                r.message =
                    format!("{e}; the CO's retry of CreateVolume {volume:?} continues the restore");
            }
        }
        if let Err(e) = self.store.put(Kind::Restore, volume, &r) {
            tracing::warn!(volume = %volume, error = %e, "cannot record the restore's end");
        }
    }

    pub fn get_restore(&self, volume: &str) -> Result<Option<Restore>> {
        self.store.get(Kind::Restore, volume)
    }

    /// Starts restoring a backup into a new volume in the background; the Restore record (by
    /// the volume's name) shows its progress until the volume exists.
    pub async fn start_restore(self: &Arc<Self>, req: RestoreBackup) -> Result<Restore> {
        layout::check_name("backup", &req.backup)?;
        if req.volume.is_empty() {
            return Err(Error::InvalidArgument(
                "the new volume's name is required".into(),
            ));
        }
        if let Some(b) = &req.backing_image {
            crate::backing::object::validate_name(b)?;
        }
        // Unknown or bad parameters are refused now, not when the restore runs.
        params::parse(&req.parameters)?;
        if let Some(existing) = self.get_restore(&req.volume)?
            && existing.state == BackupState::InProgress
        {
            if existing.csi {
                return Err(Error::AlreadyExists(format!(
                    "volume {:?} is being restored from backup {:?} by a CSI CreateVolume already; its retry continues it",
                    req.volume, existing.backup
                )));
            }
            if existing.backup != req.backup
                || existing.backing_image != req.backing_image
                || existing.parameters != req.parameters
            {
                return Err(Error::AlreadyExists(format!(
                    "volume {:?} is being restored from backup {:?} already",
                    req.volume, existing.backup
                )));
            }
            return Ok(existing);
        }
        if self.get(&volume_id_for(&req.volume))?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "volume {:?} exists already; restore into a new volume name",
                req.volume
            )));
        }
        // A backup that is not there (or not complete) is refused now, before anything is
        // recorded, rather than a restore that "started" and fails in the background.
        let target = self.backup_target()?;
        target.check().await?;
        self.find_backup(&target, &req.backup).await?;
        let rec = Restore {
            volume: req.volume.clone(),
            backup: req.backup.clone(),
            backing_image: req.backing_image.clone(),
            size_bytes: req.size_bytes,
            state: BackupState::InProgress,
            progress: 0,
            bytes_fetched: 0,
            message: String::new(),
            created: crate::model::now_rfc3339(),
            attempts: 1,
            blocks_total: 0,
            blocks_done: 0,
            blocks_fetched: 0,
            disk_id: String::new(),
            parameters: req.parameters.clone(),
            csi: false,
        };
        self.store.put(Kind::Restore, &rec.volume, &rec)?;
        self.spawn_restore(rec.clone());
        Ok(rec)
    }

    fn spawn_restore(self: &Arc<Self>, rec: Restore) {
        let this = self.clone();
        tokio::spawn(async move {
            // The backed-up volume's parameters (its replica count, engine, ...), then the
            // request's, then the override image.
            let recorded = match this.backup_target() {
                Ok(target) => this
                    .find_backup(&target, &rec.backup)
                    .await
                    .map(|m| m.volume_parameters)
                    .unwrap_or_default(),
                Err(_) => Default::default(),
            };
            let mut parameters = recorded;
            parameters.extend(rec.parameters.clone());
            if let Some(b) = &rec.backing_image {
                parameters.insert(params::BACKING_IMAGE.to_string(), b.clone());
            }
            let req = CreateVolume {
                name: rec.volume.clone(),
                required_bytes: rec.size_bytes,
                parameters,
                capabilities: vec![Capability {
                    access: crate::model::AccessType::Mount {
                        fs_type: String::new(),
                        mount_flags: vec![],
                    },
                    mode: crate::model::AccessMode::SingleNodeWriter,
                }],
                source_backup: Some(rec.backup.clone()),
                ..Default::default()
            };
            // The restore waits for a backing image being prepared, as a provisioner retries;
            // a target that does not answer (or refuses) ends it at once, with its message.
            let deadline = Instant::now() + Duration::from_secs(30 * 60);
            let result = loop {
                match this.create_volume(req.clone()).await {
                    Err(Error::Unavailable(m))
                        if Instant::now() < deadline && !m.starts_with(TARGET_ERROR_PREFIX) =>
                    {
                        tracing::debug!(volume = %rec.volume, why = %m, "restore waits");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    r => break r,
                }
            };
            let mut done: Restore = this
                .get_restore(&rec.volume)
                .ok()
                .flatten()
                .unwrap_or(rec.clone());
            match result {
                Ok(_) => {
                    done.state = BackupState::Completed;
                    done.progress = 100;
                }
                Err(e) => {
                    done.state = BackupState::Error;
                    done.message = e.to_string();
                }
            }
            if let Err(e) = this.store.put(Kind::Restore, &done.volume, &done) {
                tracing::warn!(volume = %done.volume, error = %e, "cannot record the restore's end");
            }
        });
    }

    /// After a restart: a backup that was running is failed (its metadata was never written, so
    /// the target holds no backup of that name), and a restore that was running continues: its
    /// file on the disk it recorded, from the blocks its checkpoint says are written
    /// (`crate::backup::blocks::restore`).
    pub fn resume_backups(self: &Arc<Self>) -> Result<()> {
        for mut b in self.store.list::<Backup>(Kind::Backup)? {
            if b.state == BackupState::InProgress {
                b.state = b.state.to(BackupState::Error)?;
                b.message = "bicsi restarted during the backup; nothing of it is a backup in the target: take the backup again".into();
                self.store.put(Kind::Backup, &b.name, &b)?;
                tracing::warn!(backup = %b.name, "backup interrupted by a restart");
            }
        }
        for mut r in self.store.list::<Restore>(Kind::Restore)? {
            if r.state == BackupState::InProgress && r.csi {
                // Its CreateVolume was cut off; the CO retries it, and that retry continues
                // the restore (`restore_record_for`). Starting it here too would run it twice.
                r.message = format!(
                    "bicsi restarted during the restore; the CO's retry of CreateVolume {:?} continues it",
                    r.volume
                );
                self.store.put(Kind::Restore, &r.volume, &r)?;
                tracing::info!(volume = %r.volume, backup = %r.backup, done = r.blocks_done, "CSI restore interrupted by a restart; the CO's retry continues it");
                continue;
            }
            if r.state == BackupState::InProgress {
                r.attempts += 1;
                r.blocks_fetched = 0;
                self.store.put(Kind::Restore, &r.volume, &r)?;
                tracing::info!(volume = %r.volume, backup = %r.backup, attempt = r.attempts, done = r.blocks_done, "restore interrupted by a restart; continuing it");
                self.spawn_restore(r);
            }
        }
        Ok(())
    }
}

/// The record of a completed backup known only from the target.
fn record_of(meta: &BackupMeta, target: &str) -> Backup {
    Backup {
        name: meta.name.clone(),
        volume: meta.volume.clone(),
        snapshot: meta.snapshot.clone(),
        target: target.to_string(),
        state: BackupState::Completed,
        progress: 100,
        blocks_total: meta.blocks.len() as u64,
        blocks_done: meta.blocks.len() as u64,
        blocks_uploaded: 0,
        bytes_uploaded: meta.uploaded_bytes,
        size_bytes: meta.size_bytes,
        backing_image: meta.backing_image.as_ref().map(|b| b.name.clone()),
        full: false,
        message: String::new(),
        created: meta.created.clone(),
        completed: meta.created.clone(),
    }
}

/// What a restore of a backup of `volume` takes by default: its parameters, without those
/// naming its backing image (the restore chooses the image), with its replica count.
fn restore_defaults(volume: &Volume) -> std::collections::BTreeMap<String, String> {
    let mut out: std::collections::BTreeMap<String, String> = volume
        .spec
        .parameters
        .iter()
        .filter(|(k, _)| !k.starts_with("backingImage") && !k.starts_with("csi.storage.k8s.io/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.insert(
        params::NUMBER_OF_REPLICAS.to_string(),
        volume.spec.number_of_replicas.to_string(),
    );
    out
}
