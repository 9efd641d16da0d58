//! Backing images as the controller keeps them: the objects, where the first file goes, the
//! reports of the nodes on their files, and deletion. Every change of a file's state goes through
//! [`state::transition`]. The file work itself (download, export, copy, transfer) is the nodes'
//! (`files.rs`); this module must not touch disks, nor know about CSI or HTTP. It is where an
//! image's source is parsed for the nodes ([`first_file_source`]: the typed source with what
//! only the records know), and it gives the nodes' file managers their view of the records
//! ([`StoreRecords`]).

pub mod events;
pub mod expected;
pub mod lifecycle;
pub mod object;
pub mod poll;
/// The states of a file and their one transition function (`model::file_state`).
pub use crate::model::file_state as state;

use std::sync::Arc;

use crate::clock::Clock;
use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::files::source::{ExportedSnapshot, ImageSource};
use crate::files::{FileReport, FileReports, ImageRecords};
use crate::model::{Disk, Volume, rfc3339};
use crate::settings::Settings;
use crate::store::{Kind, Store, StoreExt};
use object::{BackingImage, DiskFileStatus, SourceType};
use state::{FileState, transition};

pub struct BackingImages {
    store: Arc<dyn Store>,
    cluster: Arc<Cluster>,
    /// Serialises read-modify-write of image objects (reports come from many tasks and nodes).
    write: tokio::sync::Mutex<()>,
    /// "Now" for state times, deadlines and the lifecycle's waits.
    clock: Arc<dyn Clock>,
    settings: Settings,
}

/// Sets a disk file's state through the one transition function, at `now` (seconds).
fn set_file(
    bi: &mut BackingImage,
    disk: &Disk,
    to: FileState,
    progress: u8,
    message: impl Into<String>,
    now: u64,
) -> Result<()> {
    let entry = bi.status.disk_file_status_map.get(&disk.id);
    let from = entry.map(|f| f.state).unwrap_or(FileState::Pending);
    let state = transition(from, to)?;
    let changed = entry.is_none_or(|f| f.state != state);
    let time = match entry {
        Some(f) if !changed => f.last_state_transition_time.clone(),
        _ => rfc3339(now),
    };
    let unused_since = entry.map(|f| f.unused_since.clone()).unwrap_or_default();
    bi.status.disk_file_status_map.insert(
        disk.id.clone(),
        DiskFileStatus {
            state,
            progress,
            message: message.into(),
            last_state_transition_time: time,
            last_update_time: rfc3339(now),
            node_id: disk.node_id.clone(),
            unused_since,
        },
    );
    Ok(())
}

/// The message of a first file whose virtual size is not the one volumes were made for.
pub fn virtual_size_mismatch(bi: &BackingImage, got: u64) -> String {
    format!(
        "virtual size mismatch: volumes were made for the {} bytes learned from {}, but the file's virtual size is {got} bytes; the file at the source changed: delete the volumes made from backing image {:?} and the image, then create them again",
        bi.status.expected_virtual_size,
        if bi.status.expected_virtual_size_from.is_empty() {
            "the source"
        } else {
            &bi.status.expected_virtual_size_from
        },
        bi.name()
    )
}

impl BackingImages {
    pub fn new(store: Arc<dyn Store>, cluster: Arc<Cluster>) -> Arc<BackingImages> {
        BackingImages::with_clock(store, cluster, crate::clock::system())
    }

    /// Backing images whose time rules read `clock` (a manual one in tests).
    pub fn with_clock(
        store: Arc<dyn Store>,
        cluster: Arc<Cluster>,
        clock: Arc<dyn Clock>,
    ) -> Arc<BackingImages> {
        Arc::new(BackingImages {
            settings: Settings::new(store.clone()),
            store,
            cluster,
            write: tokio::sync::Mutex::new(()),
            clock,
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn now(&self) -> u64 {
        self.clock.now_secs()
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

    /// Applies `f` to the stored object under the write lock and stores the result.
    async fn update(
        &self,
        name: &str,
        f: impl FnOnce(&mut BackingImage) -> Result<()>,
    ) -> Result<BackingImage> {
        let _w = self.write.lock().await;
        let mut bi = self.must_get(name)?;
        let before = bi.clone();
        f(&mut bi)?;
        self.store.put(Kind::BackingImage, name, &bi)?;
        events::announce(&*self.store, name, events::file_events(&before, &bi));
        Ok(bi)
    }

    /// Creates the image, or checks that an existing one has the same spec. Returns the stored
    /// object and whether it was created now. Starts preparing the first file.
    pub async fn create(self: &Arc<Self>, wanted: BackingImage) -> Result<(BackingImage, bool)> {
        let wanted = object::from_user(wanted)?;
        let name = wanted.name().to_string();
        self.check_cluster_keys(&wanted)?;
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
            self.initialise(&mut bi).await?;
            self.store.put(Kind::BackingImage, &name, &bi)?;
            bi
        };
        tracing::info!(image = %name, source = created.spec.source_type.as_str(), "backing image created");
        self.start_first_files(&created).await;
        Ok((self.must_get(&name)?, true))
    }

    /// A new image's identity and first file: its uuid, the checksum it was given, and (unless
    /// it waits for an upload) the disk its first file goes to.
    async fn initialise(&self, bi: &mut BackingImage) -> Result<()> {
        bi.status.uuid = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        bi.status.checksum = bi.spec.checksum.clone();
        if bi.spec.source_type != SourceType::Upload {
            self.place_first_file(bi).await?;
        }
        Ok(())
    }

    /// Takes up an image that appeared in the store without going through [`Self::create`]
    /// (`kubectl apply` of a BackingImage with the Kubernetes store): validates it, gives it
    /// its uuid and starts its first file. Images already taken up are left alone.
    pub async fn adopt(self: &Arc<Self>, name: &str) -> Result<()> {
        let bi = {
            let _w = self.write.lock().await;
            let Some(found) = self.get(name)? else {
                return Ok(());
            };
            if !found.status.uuid.is_empty() {
                return Ok(());
            }
            let mut bi = object::from_user(found)?;
            self.check_cluster_keys(&bi)?;
            self.initialise(&mut bi).await?;
            self.store.put(Kind::BackingImage, name, &bi)?;
            bi
        };
        tracing::info!(image = %name, source = bi.spec.source_type.as_str(), "backing image taken up from the cluster");
        self.start_first_files(&bi).await;
        Ok(())
    }

    /// Puts the first file on the disk with the most free space of an up node.
    async fn place_first_file(&self, bi: &mut BackingImage) -> Result<()> {
        let disks = self.cluster.disks().await?;
        let best = disks
            .into_iter()
            .max_by_key(|d| d.free_bytes)
            .ok_or_else(|| {
                Error::ResourceExhausted(
                    "no disks to hold backing images; start bicsi with --disk PATH".into(),
                )
            })?;
        set_file(
            bi,
            &best.disk,
            FileState::Pending,
            0,
            "waiting to start",
            self.now(),
        )
    }

    /// Refuses a source that names a Secret or ConfigMap where the store has none to read.
    fn check_cluster_keys(&self, bi: &BackingImage) -> Result<()> {
        let params = &bi.spec.source_parameters;
        if bi.spec.source_type == SourceType::Download
            && object::names_cluster_objects(params)
            && self.store.cluster_namespace().is_none()
        {
            return Err(object::cluster_keys_refused(bi.name(), params));
        }
        Ok(())
    }

    /// The values of the Secret and CA ConfigMap a download's source names, read from the
    /// cluster now, for the node's request or the head of the download: never stored, logged
    /// or put in the image's status. `None` when the source names neither.
    pub fn source_credentials(
        &self,
        bi: &BackingImage,
    ) -> Result<Option<crate::download::Credentials>> {
        let params = &bi.spec.source_parameters;
        if bi.spec.source_type != SourceType::Download || !object::names_cluster_objects(params) {
            return Ok(None);
        }
        let name = bi.name();
        let ns = self
            .store
            .cluster_namespace()
            .ok_or_else(|| object::cluster_keys_refused(name, params))?;
        let about = |e: Error| match e {
            Error::FailedPrecondition(m) => {
                Error::FailedPrecondition(format!("backing image {name:?}: {m}"))
            }
            Error::Unavailable(m) => Error::Unavailable(format!("backing image {name:?}: {m}")),
            other => other,
        };
        let (secret, ca) = object::cluster_refs(params, &ns);
        let mut c = crate::download::Credentials::default();
        if let Some((ns, secret)) = secret {
            c.origin = format!("Secret {ns}/{secret}");
            for (key, value) in self.store.read_secret(&ns, &secret).map_err(about)? {
                let value = String::from_utf8(value).map_err(|_| {
                    Error::FailedPrecondition(format!(
                        "backing image {name:?}: Secret {ns}/{secret}: the value of key {key} is not UTF-8 text"
                    ))
                })?;
                c.values.insert(key, value);
            }
        }
        if let Some((ns, map)) = ca {
            c.ca_origin = format!("ConfigMap {ns}/{map}, key ca.crt");
            let data = self.store.read_config_map(&ns, &map).map_err(about)?;
            c.ca_bundle = Some(data.get("ca.crt").cloned().ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "backing image {name:?}: ConfigMap {ns}/{map} has no key ca.crt; put the PEM certificates of the CA there"
                ))
            })?);
        }
        Ok(Some(c))
    }

    /// Asks the nodes holding pending first files to start preparing them, with the values of
    /// the Secret and ConfigMap the source names; when those cannot be read, the files fail
    /// with the reason (and recovery tries again).
    async fn start_first_files(&self, bi: &BackingImage) {
        let request = first_file_source(&*self.store, bi)
            .and_then(|source| Ok((source, self.source_credentials(bi)?)));
        let (source, credentials) = match request {
            Ok(r) => r,
            Err(e) => {
                for (disk_id, f) in &bi.status.disk_file_status_map {
                    if f.state != FileState::Pending {
                        continue;
                    }
                    tracing::warn!(image = %bi.name(), disk = %disk_id, error = %e, "cannot read the source's credentials");
                    let disk = Disk {
                        id: disk_id.clone(),
                        node_id: f.node_id.clone(),
                        path: Default::default(),
                    };
                    let report = FileReport::new(FileState::Failed, 0, e.to_string());
                    if let Err(e) = self.apply_report(bi.name(), &disk, report).await {
                        tracing::warn!(image = %bi.name(), disk = %disk_id, error = %e, "cannot report the failed first file");
                    }
                }
                return;
            }
        };
        for (disk_id, f) in &bi.status.disk_file_status_map {
            if f.state != FileState::Pending {
                continue;
            }
            let r = match self.cluster.agent(&f.node_id) {
                Ok(agent) => {
                    agent
                        .prepare_first_file(bi.name(), disk_id, &source, credentials.as_ref())
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                tracing::warn!(image = %bi.name(), disk = %disk_id, error = %e, "cannot start the first file");
            }
        }
    }

    /// Applies a node's report on one of its files: through the state machine, and with the
    /// checksum rule (the first ready file fixes the image's checksum; every later file must
    /// match it).
    pub async fn apply_report(&self, name: &str, disk: &Disk, report: FileReport) -> Result<()> {
        let now = self.now();
        self.update(name, |bi| {
            let mut report = report;
            if let Some(ready) = &report.ready {
                if !crate::model::checksum::matches(&bi.status.checksum, &ready.checksum) {
                    report = FileReport::new(
                        FileState::Failed,
                        0,
                        format!(
                            "checksum mismatch: expected {}, got {}; the file is corrupt",
                            bi.status.checksum, ready.checksum
                        ),
                    );
                    // A first file from the source would come with the same bytes again.
                    report.permanent = !bi.has_ready_file();
                } else if bi.status.expected_virtual_size > 0
                    && !bi.has_ready_file()
                    && ready.virtual_size != bi.status.expected_virtual_size
                {
                    let message = virtual_size_mismatch(bi, ready.virtual_size);
                    bi.status.message = message.clone();
                    report = FileReport::new(FileState::Failed, 0, message);
                    report.permanent = true;
                } else {
                    bi.status.source_failures = 0;
                    bi.status.next_source_retry_time.clear();
                    if bi.status.checksum.is_empty() {
                        bi.status.checksum = ready.checksum.clone();
                    }
                    bi.status.message.clear();
                    bi.status.size = ready.size;
                    bi.status.virtual_size = ready.virtual_size;
                    bi.status.format = ready.format.clone();
                }
            }
            if report.state == FileState::Failed && report.permanent {
                bi.status.source_failures += 1;
                let wait = lifecycle::source_backoff(bi.status.source_failures);
                bi.status.next_source_retry_time = rfc3339(now + wait);
                report.message = format!(
                    "{}; the source is tried again at {} (in {}; failure {} in a row, the wait doubles up to 6 h)",
                    report.message,
                    bi.status.next_source_retry_time,
                    lifecycle::human_secs(wait),
                    bi.status.source_failures
                );
            }
            if report.restart
                && let Some(f) = bi.status.disk_file_status_map.get(&disk.id)
                && matches!(f.state, FileState::Starting | FileState::InProgress)
            {
                // Work cut off by a restart: failed and pending again in this one update.
                set_file(bi, disk, FileState::Failed, 0, report.message.clone(), now)?;
            }
            set_file(bi, disk, report.state, report.progress, report.message, now)
        })
        .await
        .map(|_| ())
    }

    /// Fails every file that sits in a non-final state past its deadline at `now` (seconds since
    /// the epoch), so nothing stays stuck; recovery then prepares it again. An unknown file's
    /// deadline is the `backing-image-recovery-wait-interval` setting. Returns how many.
    pub async fn expire(&self, now: u64) -> Result<usize> {
        let unknown_after = self.settings.recovery_wait();
        let mut failed = 0;
        for bi in self.list()? {
            for (disk_id, f) in &bi.status.disk_file_status_map {
                let entered =
                    crate::model::parse_rfc3339(&f.last_state_transition_time).unwrap_or(now);
                let updated = crate::model::parse_rfc3339(&f.last_update_time).unwrap_or(entered);
                let deadline = if f.state == FileState::Unknown {
                    Some(unknown_after)
                } else {
                    f.state.deadline()
                };
                let Some(why) = state::overdue_after(f.state, deadline, entered, updated, now)
                else {
                    continue;
                };
                let disk = Disk {
                    id: disk_id.clone(),
                    node_id: f.node_id.clone(),
                    path: Default::default(),
                };
                tracing::warn!(image = %bi.name(), disk = %disk_id, "{why}");
                self.update(bi.name(), |bi| {
                    set_file(bi, &disk, FileState::Failed, 0, why.clone(), now)
                })
                .await?;
                failed += 1;
            }
        }
        Ok(failed)
    }

    /// A node went down: its files are unknown until it returns and reports them again.
    pub async fn node_down(&self, node_id: &str) -> Result<()> {
        let now = self.now();
        for bi in self.list()? {
            let disks: Vec<Disk> = bi
                .status
                .disk_file_status_map
                .iter()
                .filter(|(_, f)| f.node_id == node_id && f.state != FileState::Unknown)
                .map(|(id, f)| Disk {
                    id: id.clone(),
                    node_id: f.node_id.clone(),
                    path: Default::default(),
                })
                .collect();
            for d in disks {
                self.update(bi.name(), |bi| {
                    // Registered again since the sweep found it silent: its reports (a
                    // restarted download among them) are the truth now, not "unknown".
                    if self.cluster.is_up(node_id) {
                        return Ok(());
                    }
                    set_file(
                        bi,
                        &d,
                        FileState::Unknown,
                        0,
                        format!("node {node_id} is down"),
                        now,
                    )
                })
                .await?;
            }
        }
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
                if known.is_empty() {
                    // What CreateVolume was told is kept: the first file must match it.
                    return self
                        .update(name, |b| {
                            if b.status.checksum.is_empty() {
                                b.status.checksum = c.clone();
                            }
                            Ok(())
                        })
                        .await;
                }
            }
            // A polled image: new volumes get its newest ready version.
            return self.alias_target(bi);
        }
        let Some((source_type, params)) = &req.source else {
            return Err(Error::NotFound(format!(
                "backing image {name:?} not found; create it first, or give {BACKING_IMAGE_SOURCE_TYPE} and {BACKING_IMAGE_SOURCE_PARAMETERS} so bicsi creates it"
            )));
        };
        if *source_type == SourceType::Upload {
            return Err(Error::InvalidArgument(format!(
                "backing image {name:?} cannot be created by uploading through a StorageClass: upload it first (bicsi image upload {name} FILE, or PUT the file to /v1/backingimages/{name}/file of the HTTP API), then name it in backingImage"
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
        let snapshots = snapshots_over(&*self.store, name)?;
        if !snapshots.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "backing image {name:?} holds the data under snapshots {}; delete them first",
                snapshots.join(", ")
            )));
        }
        let _ = bi;
        for node in self.cluster.node_ids() {
            match self.cluster.agent(&node) {
                Ok(agent) => agent.delete_image_files(name).await?,
                // A node that is down removes the files when it comes back (files of images
                // that no longer exist are removed at its start).
                Err(e) => {
                    tracing::warn!(image = %name, node = %node, error = %e, "files left for later")
                }
            }
        }
        let _w = self.write.lock().await;
        self.store.delete(Kind::BackingImage, name)?;
        tracing::info!(image = %name, "backing image deleted");
        Ok(())
    }

    /// A one-line summary of where an image stands (`BackingImage::describe`, the record's
    /// own; kept here for the callers that know it by this name).
    pub fn describe(bi: &BackingImage) -> String {
        bi.describe()
    }
}

/// The typed source of the image's first file, as a node's request carries it: the spec's
/// source (`files::source`), and for an export the snapshot it comes from when a `type: bi`
/// snapshot made the image (the records know it; the node reads no snapshot records).
pub fn first_file_source(store: &dyn Store, bi: &BackingImage) -> Result<ImageSource> {
    let name = bi.name();
    let mut source = ImageSource::from_spec(&bi.spec)
        .map_err(|e| Error::FailedPrecondition(format!("backing image {name:?}: {e}")))?;
    if let ImageSource::ExportFromVolume(export) = &mut source {
        export.snapshot = exported_by(store, name)?.map(|s| ExportedSnapshot {
            name: s.name,
            files: s.files,
        });
    }
    Ok(source)
}

/// The `type: bi` snapshot that was exported as backing image `image`, if one was.
pub fn exported_by(store: &dyn Store, image: &str) -> Result<Option<crate::snapshot::Snapshot>> {
    let snapshots: Vec<crate::snapshot::Snapshot> = store.list(Kind::Snapshot)?;
    Ok(snapshots
        .into_iter()
        .find(|s| s.exported.as_ref().is_some_and(|e| e.name == image)))
}

/// Snapshots whose files sit on top of backing image `image` (their source volume's): the
/// image cannot go while they exist.
pub fn snapshots_over(store: &dyn Store, image: &str) -> Result<Vec<String>> {
    let snapshots: Vec<crate::snapshot::Snapshot> = store.list(Kind::Snapshot)?;
    Ok(snapshots
        .into_iter()
        .filter(|s| s.backing_image.as_deref() == Some(image))
        .map(|s| s.name)
        .collect())
}

/// The file managers' view of the records (`files::ImageRecords`) over a store: a node's,
/// local or remote.
pub struct StoreRecords(pub Arc<dyn Store>);

impl ImageRecords for StoreRecords {
    fn image(&self, name: &str) -> Result<Option<BackingImage>> {
        self.0.get(Kind::BackingImage, name)
    }

    fn images(&self) -> Result<Vec<BackingImage>> {
        self.0.list(Kind::BackingImage)
    }

    fn node(&self, node_id: &str) -> Result<Option<crate::model::NodeRecord>> {
        self.0.get(Kind::Node, node_id)
    }

    fn volume(&self, volume_id: &str) -> Result<Option<Volume>> {
        self.0.get(Kind::Volume, volume_id)
    }

    fn source(&self, bi: &BackingImage) -> Result<ImageSource> {
        first_file_source(&*self.0, bi)
    }
}

#[tonic::async_trait]
impl FileReports for BackingImages {
    async fn report(&self, image: &str, disk: &Disk, report: FileReport) -> Result<()> {
        self.apply_report(image, disk, report).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::object::{
        BackingImageSpec, BackingImageStatus, DiskFileStatus, ObjectMeta,
    };
    use crate::store::embedded::EmbeddedStore;

    fn file(state: FileState, entered: u64, updated: u64) -> DiskFileStatus {
        DiskFileStatus {
            state,
            progress: 40,
            message: String::new(),
            last_state_transition_time: crate::model::rfc3339(entered),
            last_update_time: crate::model::rfc3339(updated),
            node_id: "n1".into(),
            unused_since: String::new(),
        }
    }

    /// A download image named "img" with `status`, as the lifecycle tests start from.
    fn download_image(status: BackingImageStatus) -> BackingImage {
        BackingImage {
            api_version: object::API_VERSION.into(),
            kind: object::KIND.into(),
            metadata: ObjectMeta {
                name: "img".into(),
                namespace: object::DEFAULT_NAMESPACE.into(),
            },
            spec: BackingImageSpec {
                source_type: SourceType::Download,
                source_parameters: [("url".to_string(), "http://127.0.0.1/x".to_string())].into(),
                checksum: String::new(),
                min_number_of_copies: 1,
            },
            status,
        }
    }

    #[tokio::test]
    async fn expire_fails_only_files_past_their_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let images = BackingImages::new(store.clone(), Cluster::new(store.clone()));
        let t0 = 2_000_000_000;
        let bi = download_image(BackingImageStatus {
            uuid: "0123abcd".into(),
            disk_file_status_map: [
                (
                    "stuck".to_string(),
                    file(FileState::InProgress, t0, t0 + 60),
                ),
                (
                    "alive".to_string(),
                    file(FileState::InProgress, t0, t0 + 20 * 60),
                ),
                ("done".to_string(), file(FileState::Ready, t0, t0)),
            ]
            .into(),
            ..Default::default()
        });
        store.put(Kind::BackingImage, "img", &bi).unwrap();
        // Twenty-one minutes on: "stuck" last reported 20 minutes ago, "alive" one minute ago.
        assert_eq!(images.expire(t0 + 21 * 60).await.unwrap(), 1);
        let got = images.must_get("img").unwrap().status.disk_file_status_map;
        assert_eq!(got["stuck"].state, FileState::Failed);
        assert!(
            got["stuck"].message.contains("no progress"),
            "{}",
            got["stuck"].message
        );
        assert_eq!(got["alive"].state, FileState::InProgress);
        assert_eq!(got["done"].state, FileState::Ready);
        assert_eq!(
            images.expire(t0 + 21 * 60).await.unwrap(),
            0,
            "failed is final"
        );
    }

    /// Work cut off by a restart goes back to pending in one update: the store never holds
    /// the file failed (others read it between two updates: the controller's cleanup and
    /// recovery, users, the fault suite's checks).
    #[tokio::test]
    async fn a_restart_report_moves_work_back_to_pending_in_one_update() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let images = BackingImages::new(store.clone(), Cluster::new(store.clone()));
        let t0 = 2_000_000_000;
        let mut bi = download_image(BackingImageStatus {
            uuid: "0123abcd".into(),
            ..Default::default()
        });
        for (disk, state) in [
            ("starting", FileState::Starting),
            ("in-progress", FileState::InProgress),
            ("pending", FileState::Pending),
            ("ready", FileState::Ready),
        ] {
            bi.status
                .disk_file_status_map
                .insert(disk.into(), file(state, t0, t0));
        }
        store.put(Kind::BackingImage, "img", &bi).unwrap();
        let disk = |id: &str| Disk {
            id: id.into(),
            node_id: "n1".into(),
            path: dir.path().join(id),
        };
        let state =
            |id: &str| images.must_get("img").unwrap().status.disk_file_status_map[id].clone();
        // Without the restart mark, in progress cannot go back to pending.
        assert!(
            images
                .apply_report(
                    "img",
                    &disk("in-progress"),
                    FileReport::new(FileState::Pending, 0, "x")
                )
                .await
                .is_err()
        );
        for id in ["starting", "in-progress", "pending"] {
            images
                .apply_report(
                    "img",
                    &disk(id),
                    FileReport::restarting("interrupted; restarting"),
                )
                .await
                .unwrap();
            let f = state(id);
            assert_eq!(f.state, FileState::Pending, "{id}");
            assert_eq!(f.message, "interrupted; restarting");
        }
        // A ready file is not work: a restart mark does not reset it.
        assert!(
            images
                .apply_report("img", &disk("ready"), FileReport::restarting("x"))
                .await
                .is_err()
        );
        assert_eq!(state("ready").state, FileState::Ready);
    }

    #[test]
    fn an_exports_source_names_the_snapshot_the_records_say_it_comes_from() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let mut bi = download_image(BackingImageStatus::default());
        bi.spec = crate::model::backing_image::spec_of(
            SourceType::ExportFromVolume,
            &[("volume-name", "pvc/1"), ("export-type", "raw")],
        );
        let export = |store: &dyn Store| match first_file_source(store, &bi).unwrap() {
            ImageSource::ExportFromVolume(e) => e,
            other => panic!("{other:?}"),
        };
        // The volume as it is now: its id comes with the source, no snapshot.
        let now = export(&*store);
        assert_eq!(now.volume_id, crate::model::volume_id_for("pvc/1"));
        assert_eq!(now.format, crate::model::ImageFormat::Raw);
        assert_eq!(now.snapshot, None);
        // A `type: bi` snapshot exported as this image: its files come with the source.
        let file = crate::snapshot::SnapshotFile {
            node_id: "n2".into(),
            disk_id: "d9".into(),
            path: "/d9/snapshots/s1/snapshot.raw".into(),
        };
        let snapshot = crate::snapshot::Snapshot {
            id: "s1".into(),
            name: "snap-1".into(),
            source_volume_id: now.volume_id.clone(),
            size_bytes: 1 << 20,
            creation_secs: 1,
            creation_nanos: 0,
            backing_image: None,
            parameters: Default::default(),
            files: vec![file.clone()],
            exported: Some(crate::snapshot::ExportedImage {
                name: "img".into(),
                export_type: "raw".into(),
            }),
            group_snapshot_id: None,
        };
        store.put(Kind::Snapshot, "s1", &snapshot).unwrap();
        assert_eq!(
            export(&*store).snapshot,
            Some(ExportedSnapshot {
                name: "snap-1".into(),
                files: vec![file],
            })
        );
        // Through the file managers' view of the records, the same.
        assert_eq!(
            StoreRecords(store.clone()).source(&bi).unwrap(),
            first_file_source(&*store, &bi).unwrap()
        );
    }
}
