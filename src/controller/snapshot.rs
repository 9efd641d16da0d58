//! The controller's side of CSI snapshots and of volumes made from a snapshot or a volume:
//! which node and disks, the snapshot records, idempotency by name, and the backing image rule
//! of the seed's restore ("Longhorn will automatically choose the backing image during the
//! restore" and "allows you to re-specify/override the backing image"): a volume made from a
//! snapshot uses the backing image recorded with the snapshot unless its parameters name
//! another in `backingImage`. The file work is the node agents' (`crate::snapshot`).

use std::collections::BTreeMap;

use super::{Controller, CreateVolume, place_replicas, size_for_range, volume_id_for};
use crate::backing::object::{self, BackingImage, SourceType};
use crate::error::{Error, Result};
use crate::model::{Replica, Volume};
use crate::params::VolumeParams;
use crate::snapshot::{ExportedImage, Snapshot, SnapshotFile};
use crate::store::{Kind, StoreExt};

const SNAPSHOT_PAGE_PREFIX: &str = "bicsi-snapshots-1:";

/// A CreateSnapshot request in domain terms.
#[derive(Clone, Debug, Default)]
pub struct CreateSnapshot {
    pub name: String,
    pub source_volume_id: String,
    pub parameters: BTreeMap<String, String>,
}

pub(super) fn now() -> (u64, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

/// How long a snapshot of a volume whose replicas wait for its backing image's file waits for
/// that file before answering Unavailable.
const DEFERRED_SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Controller {
    pub fn get_snapshot(&self, id: &str) -> Result<Option<Snapshot>> {
        self.store.get(Kind::Snapshot, id)
    }

    /// Whether the snapshot can be used: one kept on disks is as soon as it exists; one exported
    /// as a backing image once that image has a ready file.
    pub fn snapshot_ready(&self, s: &Snapshot) -> Result<bool> {
        match &s.exported {
            None => Ok(true),
            Some(e) => Ok(self
                .backing
                .get(&e.name)?
                .is_some_and(|bi| bi.has_ready_file())),
        }
    }

    /// The replicas to capture a volume from: those of the node its engine runs on when it is
    /// attached (the engine holds the point in time), else of its first replica's node.
    pub(super) fn capture_node(volume: &Volume) -> Result<(String, Vec<Replica>)> {
        let node = match &volume.publication {
            Some(p) => p.node_id.clone(),
            None => volume
                .replicas
                .first()
                .map(|r| r.node_id.clone())
                .ok_or_else(|| {
                    Error::FailedPrecondition(format!("volume {:?} has no replica", volume.id))
                })?,
        };
        let replicas: Vec<Replica> = volume
            .replicas
            .iter()
            .filter(|r| r.node_id == node)
            .cloned()
            .collect();
        if replicas.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {:?} is attached to node {node:?}, which holds none of its replicas: its engine can copy only a local replica at one instant; detach the volume to take the snapshot",
                volume.id
            )));
        }
        Ok((node, replicas))
    }

    pub(super) async fn capture(
        &self,
        snapshot_id: &str,
        volume: &Volume,
    ) -> Result<Vec<SnapshotFile>> {
        let (node, replicas) = Self::capture_node(volume)?;
        self.cluster
            .agent(&node)?
            .snapshot_replicas(snapshot_id, &replicas, volume.spec.backing_image.as_deref())
            .await
    }

    /// A volume created before its backing image's file was ready has deferred replicas until
    /// its first attach. A snapshot of it (its content is the image's, as nothing wrote it yet)
    /// makes them now where the file is ready; while no file is, it waits for one up to
    /// `DEFERRED_SNAPSHOT_WAIT`, then answers Unavailable with where the image stands, and the
    /// CO's retry takes the snapshot.
    pub(super) async fn make_deferred_replicas(&self, mut volume: Volume) -> Result<Volume> {
        let Some(image) = volume.spec.backing_image.clone() else {
            return Ok(volume);
        };
        if volume.replicas.iter().all(|r| !r.deferred) {
            return Ok(volume);
        }
        // The image's file is usually on its way (a download, or a copy to the replica's disk):
        // wait for it a while, so that a snapshot taken right after the volume was created is
        // taken rather than refused; past the wait the CO's retry takes it.
        let deadline = tokio::time::Instant::now() + DEFERRED_SNAPSHOT_WAIT;
        loop {
            let mut made = false;
            for r in volume.replicas.iter_mut().filter(|r| r.deferred) {
                let Ok(agent) = self.cluster.agent(&r.node_id) else {
                    continue;
                };
                if agent
                    .create_replica(r, volume.spec.capacity_bytes, Some(&image))
                    .await?
                {
                    r.deferred = false;
                    made = true;
                }
            }
            if made {
                self.store.put(Kind::Volume, &volume.id, &volume)?;
            }
            if !volume.replicas.iter().all(|r| r.deferred) {
                break;
            }
            let bi = self.backing.must_get(&image)?;
            self.backing.check_not_failed(&bi)?;
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "volume {:?} has not been attached and its backing image {image:?} is being prepared ({}); the snapshot can be taken once the image is ready",
                    volume.id,
                    bi.describe()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Ok(volume)
    }

    pub(super) async fn delete_files(&self, files: &[SnapshotFile]) -> Result<()> {
        let mut by_node: BTreeMap<&str, Vec<SnapshotFile>> = BTreeMap::new();
        for f in files {
            by_node.entry(&f.node_id).or_default().push(f.clone());
        }
        for (node, files) in by_node {
            self.cluster
                .agent(node)?
                .delete_snapshot_files(&files)
                .await?;
        }
        Ok(())
    }

    /// Takes a snapshot of a volume, or returns the one of that name and source.
    pub async fn create_snapshot(&self, req: CreateSnapshot) -> Result<Snapshot> {
        if req.name.is_empty() {
            return Err(Error::InvalidArgument("snapshot name is required".into()));
        }
        if req.name.len() > super::MAX_NAME_LEN {
            return Err(Error::InvalidArgument(format!(
                "snapshot name is {} characters long; CSI allows at most {}",
                req.name.len(),
                super::MAX_NAME_LEN
            )));
        }
        if req.source_volume_id.is_empty() {
            return Err(Error::InvalidArgument(
                "source_volume_id is required".into(),
            ));
        }
        let export_type = crate::snapshot::parse_parameters(&req.parameters)?;
        let id = volume_id_for(&req.name);
        let _guard = self
            .guards
            .try_take(&format!("snapshot/{id}"), "snapshot")?;
        if let Some(existing) = self.get_snapshot(&id)? {
            if existing.source_volume_id != req.source_volume_id {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {:?} already exists of volume {:?}, not of {:?}; use another name or delete the snapshot first",
                    req.name, existing.source_volume_id, req.source_volume_id
                )));
            }
            if existing.parameters != req.parameters {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {:?} already exists with other parameters ({:?}, requested {:?}); use another name or delete the snapshot first",
                    req.name, existing.parameters, req.parameters
                )));
            }
            return Ok(existing);
        }
        if crate::snapshot::is_backup(&req.parameters) {
            return self.create_backup_snapshot(&req, &id).await;
        }
        let volume = self.must_get(&req.source_volume_id)?;
        let _volume_guard = self.guards.try_take(&volume.id, "volume")?;
        let exported = export_type.map(|t| ExportedImage {
            name: crate::snapshot::image_name_for(&req.name),
            export_type: t,
        });
        if let Some(e) = &exported
            && self.backing.get(&e.name)?.is_some()
        {
            return Err(Error::AlreadyExists(format!(
                "snapshot {:?} would be exported as backing image {:?}, which exists already; delete that image or use another snapshot name",
                req.name, e.name
            )));
        }
        let volume = self.make_deferred_replicas(volume).await?;
        let files = self.capture(&id, &volume).await?;
        let (secs, nanos) = now();
        let snapshot = Snapshot {
            id: id.clone(),
            name: req.name.clone(),
            source_volume_id: volume.id.clone(),
            size_bytes: volume.spec.capacity_bytes,
            creation_secs: secs,
            creation_nanos: nanos,
            backing_image: volume.spec.backing_image.clone(),
            parameters: req.parameters.clone(),
            files,
            exported: exported.clone(),
            group_snapshot_id: None,
        };
        if let Err(e) = self.store.put(Kind::Snapshot, &id, &snapshot) {
            let _ = self.delete_files(&snapshot.files).await;
            return Err(e);
        }
        if let Some(e) = &exported {
            // The image's first file is exported from this snapshot's file (see `backing::first_file_source`),
            // so it holds the volume as it was now, not when the export runs.
            let bi = BackingImage {
                api_version: object::API_VERSION.to_string(),
                kind: object::KIND.to_string(),
                metadata: object::ObjectMeta {
                    name: e.name.clone(),
                    namespace: object::DEFAULT_NAMESPACE.to_string(),
                },
                spec: object::BackingImageSpec {
                    source_type: SourceType::ExportFromVolume,
                    source_parameters: [
                        ("volume-name".to_string(), volume.spec.name.clone()),
                        ("export-type".to_string(), e.export_type.clone()),
                    ]
                    .into(),
                    checksum: String::new(),
                    min_number_of_copies: 1,
                },
                status: Default::default(),
            };
            if let Err(err) = self.backing.create(bi).await {
                let _ = self.store.delete(Kind::Snapshot, &id);
                let _ = self.delete_files(&snapshot.files).await;
                return Err(err);
            }
        }
        tracing::info!(snapshot = %id, volume = %volume.id, exported = ?exported.as_ref().map(|e| &e.name), "snapshot created");
        Ok(snapshot)
    }

    /// Deletes a snapshot; an unknown id is Ok. A snapshot exported as a backing image deletes
    /// that image too, which is refused while volumes use it.
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let _guard = self
            .guards
            .try_take(&format!("snapshot/{id}"), "snapshot")?;
        let Some(snapshot) = self.get_snapshot(id)? else {
            return Ok(());
        };
        // CSI, DeleteSnapshot: "A snapshot for which SP provided a non-empty group_snapshot_id
        // indicates a snapshot that CAN NOT be deleted stand alone", and its error table:
        // "Snapshot is part of a group | 3 INVALID_ARGUMENT".
        if let Some(group) = &snapshot.group_snapshot_id {
            return Err(Error::InvalidArgument(format!(
                "snapshot {id:?} is a member of volume group snapshot {group:?} and cannot be deleted alone; delete the group snapshot (DeleteVolumeGroupSnapshot)"
            )));
        }
        if crate::snapshot::is_backup(&snapshot.parameters) {
            // A `bak` snapshot is its backup: deleting one deletes the other.
            self.delete_backup(&snapshot.id).await?;
        }
        if let Some(e) = &snapshot.exported {
            let users = self.backing.users(&e.name)?;
            if !users.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {:?} is exported as backing image {:?}, which volumes {} use; delete them first",
                    snapshot.name,
                    e.name,
                    users.join(", ")
                )));
            }
            self.backing.delete(&e.name).await?;
        }
        self.delete_files(&snapshot.files).await?;
        self.store.delete(Kind::Snapshot, id)?;
        tracing::info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    /// A page of snapshots ordered by id, filtered by id and source volume (an unknown id gives
    /// an empty list). Tokens are opaque; one bicsi did not issue is refused with Aborted.
    pub fn list_snapshots(
        &self,
        max_entries: usize,
        starting_token: &str,
        source_volume_id: &str,
        snapshot_id: &str,
    ) -> Result<(Vec<Snapshot>, String)> {
        let all: Vec<Snapshot> = self.store.list(Kind::Snapshot)?;
        let matching = all
            .into_iter()
            .filter(|s| snapshot_id.is_empty() || s.id == snapshot_id)
            .filter(|s| source_volume_id.is_empty() || s.source_volume_id == source_volume_id)
            .collect();
        super::page_by_id(
            matching,
            |s| &s.id,
            max_entries,
            starting_token,
            SNAPSHOT_PAGE_PREFIX,
            "bicsi's ListSnapshots",
        )
    }

    /// CreateVolume with a content source: a snapshot (restore) or a volume (clone, through a
    /// snapshot taken for it and removed after). The new replicas are copies of the snapshot's
    /// file over the backing image: the snapshot's own, or the one `backingImage` names, onto
    /// which the content is rebased so it stays the snapshot's.
    pub(super) async fn create_from_source(
        &self,
        req: &CreateVolume,
        mut p: VolumeParams,
        id: &str,
    ) -> Result<Volume> {
        let (files, source_size, source_image, temporary) =
            match (&req.source_snapshot, &req.source_volume) {
                (Some(sid), _) => {
                    let s = self
                        .get_snapshot(sid)?
                        .ok_or_else(|| Error::NotFound(format!("snapshot {sid:?} not found")))?;
                    if crate::snapshot::is_backup(&s.parameters) {
                        if p.number_of_replicas.is_none() {
                            p.number_of_replicas = self
                                .get(&s.source_volume_id)?
                                .map(|v| v.spec.number_of_replicas);
                        }
                        return self.restore_from_backup(req, p, id, &s.id).await;
                    }
                    // Without `numberOfReplicas` a restore keeps its source volume's count
                    // (while that volume exists; else the default for the disks).
                    if p.number_of_replicas.is_none() {
                        p.number_of_replicas = self
                            .get(&s.source_volume_id)?
                            .map(|v| v.spec.number_of_replicas);
                    }
                    (s.files, s.size_bytes, s.backing_image, false)
                }
                (None, Some(vid)) => {
                    let source = self.must_get(vid)?;
                    let _source_guard = self.guards.try_take(&source.id, "volume")?;
                    let source = self.make_deferred_replicas(source).await?;
                    p.number_of_replicas
                        .get_or_insert(source.spec.number_of_replicas);
                    // A leading '.' never starts a snapshot id (see `volume_id_for`).
                    let files = self.capture(&format!(".clone-{id}"), &source).await?;
                    (
                        files,
                        source.spec.capacity_bytes,
                        source.spec.backing_image.clone(),
                        true,
                    )
                }
                (None, None) => {
                    return Err(Error::Internal("no content source".into()));
                }
            };
        let result = self
            .restore_volume(req, p, id, &files, source_size, source_image)
            .await;
        if temporary && let Err(e) = self.delete_files(&files).await {
            tracing::warn!(volume = %id, error = %e, "cannot remove the clone's temporary snapshot");
        }
        result
    }

    pub(super) async fn restore_volume(
        &self,
        req: &CreateVolume,
        mut p: VolumeParams,
        id: &str,
        files: &[SnapshotFile],
        source_size: u64,
        source_image: Option<String>,
    ) -> Result<Volume> {
        let what = match (&req.source_snapshot, &req.source_volume) {
            (Some(s), _) => format!("snapshot {s:?}"),
            (_, Some(v)) => format!("volume {v:?}"),
            _ => String::new(),
        };
        let first = files.first().ok_or_else(|| {
            Error::FailedPrecondition(format!("{what} has no snapshot file left to restore from"))
        })?;
        let size = size_for_range(req.required_bytes, req.limit_bytes, source_size)?;
        if size < source_size {
            return Err(Error::OutOfRange(format!(
                "volume {:?} would be {size} bytes, smaller than its source {what} ({source_size} bytes); request at least {source_size} bytes",
                req.name
            )));
        }
        // The seed's restore rule: the source's backing image unless `backingImage` names one.
        let image = match &p.backing_image {
            Some(b) => {
                let bi = self.ready_image(b).await?;
                if bi.status.virtual_size > size {
                    return Err(Error::OutOfRange(format!(
                        "volume {:?} would be {size} bytes, smaller than the {}-byte virtual size of backing image {:?}",
                        req.name,
                        bi.status.virtual_size,
                        bi.name()
                    )));
                }
                Some(b.name.clone())
            }
            None => source_image.clone(),
        };
        // The snapshot's files are on one node; the new replicas go on that node's disks.
        let node = first.node_id.clone();
        let all = self.cluster.disks().await?;
        let nodes = crate::volume_engine::nodes_of(&all);
        let disks: Vec<_> = all.into_iter().filter(|d| d.disk.node_id == node).collect();
        let disks = crate::volume_engine::candidate_disks(p.engine, disks)?;
        let wanted = *p
            .number_of_replicas
            .get_or_insert(crate::params::default_replicas(disks.len()));
        let chosen = place_replicas(disks, wanted as usize);
        let engine = crate::volume_engine::decide(p.engine, wanted, &chosen, nodes)?;
        p.engine = crate::volume_engine::EngineChoice::Pinned(engine);
        if chosen.is_empty() {
            return Err(Error::ResourceExhausted(format!(
                "node {node:?}, which holds {what}, has no disk for the new volume's replicas"
            )));
        }
        let agent = self.cluster.agent(&node)?;
        let mut replicas: Vec<Replica> = Vec::new();
        for d in &chosen {
            let rid = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
            // The format the engine uses on this disk: a mirror volume on a disk that does
            // not share blocks gets a copy-on-write replica, as a new volume does.
            let format = crate::volume_engine::replica_format(engine, d);
            let replica = Replica {
                path: d.disk.replica_file(id, &rid, format),
                id: rid,
                node_id: d.disk.node_id.clone(),
                disk_id: d.disk.id.clone(),
                format,
                deferred: false,
                cluster_bytes: (format == crate::os::ImageFormat::Cow)
                    .then_some(crate::mirror::cow::DEFAULT_CLUSTER),
                health: Default::default(),
            };
            let source = files
                .iter()
                .find(|f| f.disk_id == d.disk.id)
                .unwrap_or(first);
            if let Err(e) = agent
                .restore_replica(
                    source,
                    source_image.as_deref(),
                    &replica,
                    size,
                    image.as_deref(),
                )
                .await
            {
                self.delete_replicas(&replicas).await;
                let _ = agent.delete_replica(&replica).await;
                return Err(e);
            }
            replicas.push(replica);
        }
        let volume = self
            .record_volume(id, req, p, size, image, replicas)
            .await?;
        tracing::info!(volume = %id, source = %what, size, backing_image = ?volume.spec.backing_image, "volume created from a source");
        Ok(volume)
    }
}

impl Controller {
    /// CreateSnapshot with `type: bak`: a backup named by the snapshot's id, taken now (the
    /// call returns when it is complete), recorded as a snapshot without files.
    async fn create_backup_snapshot(&self, req: &CreateSnapshot, id: &str) -> Result<Snapshot> {
        let volume = self.must_get(&req.source_volume_id)?;
        let backup = self
            .backup_now(super::backup::CreateBackup {
                volume: volume.spec.name.clone(),
                name: Some(id.to_string()),
                snapshot: None,
                full: false,
                compression: None,
            })
            .await?;
        let (secs, nanos) = now();
        let snapshot = Snapshot {
            id: id.to_string(),
            name: req.name.clone(),
            source_volume_id: volume.id.clone(),
            size_bytes: backup.size_bytes.max(volume.spec.capacity_bytes),
            creation_secs: secs,
            creation_nanos: nanos,
            backing_image: volume.spec.backing_image.clone(),
            parameters: req.parameters.clone(),
            files: Vec::new(),
            exported: None,
            group_snapshot_id: None,
        };
        self.store.put(Kind::Snapshot, id, &snapshot)?;
        tracing::info!(snapshot = %id, volume = %volume.id, "snapshot taken as a backup");
        Ok(snapshot)
    }
}
