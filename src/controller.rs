//! The controller domain: volumes, their replicas and their attachment to nodes. It owns the
//! volume records in the store and the rules of CSI's Controller service (idempotency by name,
//! capacity ranges, single-node attachment), and knows nothing about gRPC: the CSI adapter calls
//! it with domain types and maps its errors with the one table in `error.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::backing::BackingImages;
use crate::backing::object::BackingImage;
use crate::backing::state::FileState;
use crate::error::{Error, Result};
use crate::fsutil::blocking;
use crate::guard::Guards;
use crate::model::{Capability, Publication, Replica, Volume, VolumeSpec, now_rfc3339};
use crate::os::ImageFormat;
use crate::params;
use crate::replicas::{DiskSpace, ReplicaFiles};
use crate::store::{Kind, Store, StoreExt};

/// Size of a volume created without a capacity range.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;
/// The largest volume bicsi creates (qcow2 handles more; this catches unit mistakes).
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
/// CSI names may be up to 128 characters.
pub const MAX_NAME_LEN: usize = 128;
const PAGE_TOKEN_PREFIX: &str = "bicsi-page-1:";

/// A CreateVolume request in domain terms.
#[derive(Clone, Debug, Default)]
pub struct CreateVolume {
    pub name: String,
    pub required_bytes: u64,
    pub limit_bytes: u64,
    pub parameters: BTreeMap<String, String>,
    /// Parameters that ControllerModifyVolume may change later (a VolumeAttributesClass).
    pub mutable_parameters: BTreeMap<String, String>,
    pub capabilities: Vec<Capability>,
    pub source_volume: Option<String>,
    pub source_snapshot: Option<String>,
}

/// The health of a volume as CSI's VolumeCondition reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

pub struct Controller {
    store: Arc<dyn Store>,
    backing: Arc<BackingImages>,
    replicas: Arc<dyn ReplicaFiles>,
    nodes: RwLock<BTreeSet<String>>,
    guards: Guards,
}

/// The CSI volume id for a volume name: the name itself when it is a safe file and path
/// component, else a digest of it. Deterministic, so a repeated CreateVolume finds its volume.
pub fn volume_id_for(name: &str) -> String {
    let safe = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if safe {
        name.to_string()
    } else {
        use sha2::Digest;
        let digest = sha2::Sha512::digest(name.as_bytes());
        format!("vol-{}", &hex::encode(digest)[..40])
    }
}

/// The size to create for a capacity range, or OutOfRange.
pub fn size_for_range(required: u64, limit: u64, default: u64) -> Result<u64> {
    if required > 0 && limit > 0 && required > limit {
        return Err(Error::OutOfRange(format!(
            "capacity range is empty: required_bytes {required} is larger than limit_bytes {limit}"
        )));
    }
    let wanted = match (required, limit) {
        (0, 0) => default,
        (0, l) => default.min(l),
        (r, _) => r,
    };
    // qcow2 sizes are whole 512-byte sectors; a request that already is one is honoured exactly
    // (callers compare the size they get with the size they asked for).
    let size = wanted.div_ceil(512) * 512;
    if limit > 0 && size > limit {
        return Err(Error::OutOfRange(format!(
            "no size between {required} and {limit} bytes is a multiple of 512 bytes"
        )));
    }
    if size > MAX_VOLUME_SIZE {
        return Err(Error::OutOfRange(format!(
            "requested size {size} bytes is larger than bicsi's maximum of {MAX_VOLUME_SIZE} bytes (64 TiB)"
        )));
    }
    Ok(size)
}

fn check_capabilities(caps: &[Capability]) -> Result<()> {
    for cap in caps {
        if !cap.mode.is_supported() {
            return Err(Error::InvalidArgument(format!(
                "access mode {:?} is not supported: bicsi volumes attach to one node at a time (use a single-node mode such as SINGLE_NODE_WRITER)",
                cap.mode
            )));
        }
        if let crate::model::AccessType::Mount { fs_type, .. } = &cap.access
            && !fs_type.is_empty()
        {
            params::parse_fs_type(fs_type)?;
        }
    }
    Ok(())
}

fn image_format(bi: &BackingImage) -> Result<ImageFormat> {
    ImageFormat::parse(&bi.status.format).ok_or_else(|| {
        Error::Internal(format!(
            "backing image {:?} has an unknown format {:?}",
            bi.name(),
            bi.status.format
        ))
    })
}

/// Mutable parameters (CreateVolume's and ControllerModifyVolume's): only `numberOfReplicas`.
fn check_mutable(mutable: &BTreeMap<String, String>) -> Result<()> {
    for (key, value) in mutable {
        if key != params::NUMBER_OF_REPLICAS {
            return Err(Error::InvalidArgument(format!(
                "parameter {key:?} cannot be modified; the only mutable parameter is {}",
                params::NUMBER_OF_REPLICAS
            )));
        }
        params::parse_replicas(value)?;
    }
    Ok(())
}

/// Picks disks for `n` replicas: distinct disks always, distinct nodes first, most free space
/// first. Returns fewer than `n` when there are not enough disks (the volume is then degraded).
pub fn place_replicas(mut disks: Vec<DiskSpace>, n: usize) -> Vec<DiskSpace> {
    disks.sort_by(|a, b| {
        b.free_bytes
            .cmp(&a.free_bytes)
            .then_with(|| a.disk.id.cmp(&b.disk.id))
    });
    let mut chosen: Vec<DiskSpace> = Vec::new();
    let mut nodes = BTreeSet::new();
    for d in &disks {
        if chosen.len() < n && nodes.insert(d.disk.node_id.clone()) {
            chosen.push(d.clone());
        }
    }
    for d in &disks {
        if chosen.len() < n && !chosen.iter().any(|c| c.disk.id == d.disk.id) {
            chosen.push(d.clone());
        }
    }
    chosen
}

impl Controller {
    pub fn new(
        store: Arc<dyn Store>,
        replicas: Arc<dyn ReplicaFiles>,
        backing: Arc<BackingImages>,
    ) -> Controller {
        Controller {
            store,
            backing,
            replicas,
            nodes: RwLock::new(BTreeSet::new()),
            guards: Guards::default(),
        }
    }

    /// Makes `node_id` a node volumes can be published to.
    pub fn register_node(&self, node_id: &str) {
        self.nodes
            .write()
            .expect("node set poisoned")
            .insert(node_id.to_string());
    }

    fn known_node(&self, node_id: &str) -> bool {
        self.nodes
            .read()
            .expect("node set poisoned")
            .contains(node_id)
    }

    pub fn get(&self, id: &str) -> Result<Option<Volume>> {
        self.store.get(Kind::Volume, id)
    }

    fn must_get(&self, id: &str) -> Result<Volume> {
        self.get(id)?
            .ok_or_else(|| Error::NotFound(format!("volume {id:?} not found")))
    }

    pub async fn create_volume(&self, req: CreateVolume) -> Result<Volume> {
        if req.name.len() > MAX_NAME_LEN {
            return Err(Error::InvalidArgument(format!(
                "volume name is {} characters long; CSI allows at most {MAX_NAME_LEN}",
                req.name.len()
            )));
        }
        check_capabilities(&req.capabilities)?;
        let mut p = params::parse(&req.parameters)?;
        check_mutable(&req.mutable_parameters)?;
        if let Some(n) = req.mutable_parameters.get(params::NUMBER_OF_REPLICAS) {
            // A VolumeAttributesClass overrides the StorageClass for the mutable parameters.
            p.number_of_replicas = params::parse_replicas(n)?;
            p.kept
                .insert(params::NUMBER_OF_REPLICAS.into(), n.trim().to_string());
        }
        if let Some(src) = &req.source_snapshot {
            return Err(Error::NotFound(format!("snapshot {src:?} not found")));
        }
        if let Some(src) = &req.source_volume {
            self.must_get(src)?;
            return Err(Error::InvalidArgument(format!(
                "cloning volume {src:?} is not supported yet; create an empty volume instead"
            )));
        }
        let id = volume_id_for(&req.name);
        let _guard = self.guards.try_take(&id, "volume")?;

        if let Some(existing) = self.get(&id)? {
            return self.compatible_existing(existing, &req, &p.kept);
        }

        let image = match &p.backing_image {
            Some(b) => Some(self.ready_image(b).await?),
            None => None,
        };
        let size = match &image {
            Some(bi) => {
                const MIB: u64 = 1 << 20;
                let virtual_size = bi.status.virtual_size;
                let size = size_for_range(
                    req.required_bytes,
                    req.limit_bytes,
                    virtual_size.div_ceil(MIB) * MIB,
                )?;
                if size < virtual_size {
                    return Err(Error::OutOfRange(format!(
                        "volume {:?} would be {size} bytes, smaller than the {virtual_size}-byte virtual size of backing image {:?}; request at least {virtual_size} bytes",
                        req.name,
                        bi.name()
                    )));
                }
                size
            }
            None => size_for_range(req.required_bytes, req.limit_bytes, DEFAULT_VOLUME_SIZE)?,
        };

        let disks = {
            let files = self.replicas.clone();
            blocking(move || files.disks()).await?
        };
        if disks.is_empty() {
            return Err(Error::ResourceExhausted(
                "no disks to place replicas on; start bicsi with --disk PATH".into(),
            ));
        }
        let chosen = place_replicas(disks, p.number_of_replicas as usize);
        // A replica on a disk that holds a ready file of the image is an overlay on it now;
        // elsewhere it is made at first attach, when the file has been brought to that disk.
        let mut plans: Vec<(Replica, Option<(PathBuf, ImageFormat)>)> = Vec::new();
        for d in &chosen {
            let rid = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
            let mut replica = Replica {
                path: crate::disks::replica_path(&d.disk, &id, &rid),
                id: rid,
                node_id: d.disk.node_id.clone(),
                disk_id: d.disk.id.clone(),
                deferred: false,
            };
            let backing = match &image {
                Some(bi) => {
                    let ready = bi
                        .status
                        .disk_file_status_map
                        .get(&d.disk.id)
                        .is_some_and(|f| f.state == FileState::Ready);
                    let file = BackingImages::file_path(&d.disk, bi);
                    if ready && file.is_file() {
                        Some((file, image_format(bi)?))
                    } else {
                        replica.deferred = true;
                        None
                    }
                }
                None => None,
            };
            plans.push((replica, backing));
        }
        let replicas: Vec<Replica> = plans.iter().map(|(r, _)| r.clone()).collect();
        {
            let files = self.replicas.clone();
            let plans = plans.clone();
            blocking(move || {
                let reps: Vec<Replica> = plans.iter().map(|(r, _)| r.clone()).collect();
                for (i, (r, backing)) in plans.iter().enumerate() {
                    if r.deferred {
                        continue;
                    }
                    let backing = backing.as_ref().map(|(p, f)| (p.as_path(), *f));
                    if let Err(e) = files.create(r, size, backing) {
                        // Leave nothing half-made: remove the replicas created so far.
                        for done in &reps[..=i] {
                            let _ = files.delete(done);
                        }
                        return Err(e);
                    }
                }
                Ok(())
            })
            .await?;
        }
        let volume = Volume {
            id: id.clone(),
            spec: VolumeSpec {
                name: req.name.clone(),
                capacity_bytes: size,
                number_of_replicas: p.number_of_replicas,
                stale_replica_timeout_minutes: p.stale_replica_timeout_minutes,
                fs_type: p.fs_type.clone(),
                backing_image: p.backing_image.as_ref().map(|b| b.name.clone()),
                parameters: p.kept,
                capabilities: req.capabilities.clone(),
            },
            replicas,
            publication: None,
            created_at: now_rfc3339(),
        };
        if let Err(e) = self.store.put(Kind::Volume, &id, &volume) {
            let files = self.replicas.clone();
            let reps = volume.replicas.clone();
            let _ = blocking(move || {
                for r in &reps {
                    let _ = files.delete(r);
                }
                Ok(())
            })
            .await;
            return Err(e);
        }
        if volume.is_degraded() {
            tracing::warn!(
                volume = %id,
                wanted = volume.spec.number_of_replicas,
                placed = volume.replicas.len(),
                "volume created degraded: fewer disks than replicas"
            );
        } else {
            tracing::info!(volume = %id, size, replicas = volume.replicas.len(), "volume created");
        }
        Ok(volume)
    }

    /// The volume's backing image with a ready file, or why not yet: Unavailable while it is
    /// being prepared (the provisioner retries), FailedPrecondition when every file failed.
    async fn ready_image(&self, req: &params::BackingImageRequest) -> Result<BackingImage> {
        let bi = self.backing.ensure_for_volume(req).await?;
        if bi.has_ready_file() {
            return Ok(bi);
        }
        let files = &bi.status.disk_file_status_map;
        if !files.is_empty() && files.values().all(|f| f.state == FileState::Failed) {
            return Err(Error::FailedPrecondition(format!(
                "backing image {:?} failed: {}; fix its source, delete it and create it again",
                bi.name(),
                BackingImages::describe(&bi)
            )));
        }
        Err(Error::Unavailable(format!(
            "backing image {:?} is being prepared ({}); the volume is created when it is ready",
            bi.name(),
            BackingImages::describe(&bi)
        )))
    }

    fn compatible_existing(
        &self,
        existing: Volume,
        req: &CreateVolume,
        kept: &BTreeMap<String, String>,
    ) -> Result<Volume> {
        let cap = existing.spec.capacity_bytes;
        let fits = (req.required_bytes == 0 || cap >= req.required_bytes)
            && (req.limit_bytes == 0 || cap <= req.limit_bytes);
        if !fits {
            return Err(Error::AlreadyExists(format!(
                "volume {:?} already exists with capacity {cap} bytes, outside the requested range (required {}, limit {}); use another name or delete the volume first",
                req.name, req.required_bytes, req.limit_bytes
            )));
        }
        if &existing.spec.parameters != kept {
            return Err(Error::AlreadyExists(format!(
                "volume {:?} already exists with other parameters ({:?}, requested {:?}); use another name or delete the volume first",
                req.name, existing.spec.parameters, kept
            )));
        }
        Ok(existing)
    }

    pub async fn delete_volume(&self, id: &str) -> Result<()> {
        let _guard = self.guards.try_take(id, "volume")?;
        let Some(volume) = self.get(id)? else {
            return Ok(());
        };
        if let Some(p) = &volume.publication {
            return Err(Error::FailedPrecondition(format!(
                "volume {id:?} is attached to node {:?}; detach it before deleting",
                p.node_id
            )));
        }
        let files = self.replicas.clone();
        let reps = volume.replicas.clone();
        blocking(move || {
            for r in &reps {
                files.delete(r)?;
            }
            Ok(())
        })
        .await?;
        self.store.delete(Kind::Volume, id)?;
        tracing::info!(volume = %id, "volume deleted");
        Ok(())
    }

    pub async fn publish(
        &self,
        id: &str,
        node_id: &str,
        capability: Capability,
        read_only: bool,
    ) -> Result<BTreeMap<String, String>> {
        check_capabilities(std::slice::from_ref(&capability))?;
        let _guard = self.guards.try_take(id, "volume")?;
        let mut volume = self.must_get(id)?;
        if !self.known_node(node_id) {
            return Err(Error::NotFound(format!(
                "node {node_id:?} not found; known nodes: {:?}",
                self.nodes.read().expect("node set poisoned")
            )));
        }
        match &volume.publication {
            Some(p) if p.node_id == node_id => {
                if p.capability.same_as(&capability) && p.read_only == read_only {
                    return Ok(BTreeMap::new());
                }
                return Err(Error::AlreadyExists(format!(
                    "volume {id:?} is already published to node {node_id:?} with another capability or read-only flag; unpublish it first"
                )));
            }
            Some(p) => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id:?} is published to node {:?}; a volume attaches to one node at a time: unpublish it there first",
                    p.node_id
                )));
            }
            None => {}
        }
        volume.publication = Some(Publication {
            node_id: node_id.to_string(),
            capability,
            read_only,
        });
        self.store.put(Kind::Volume, id, &volume)?;
        Ok(BTreeMap::new())
    }

    /// Unpublishes from `node_id` (or from any node when empty). Unknown volume or node: Ok.
    pub async fn unpublish(&self, id: &str, node_id: &str) -> Result<()> {
        let _guard = self.guards.try_take(id, "volume")?;
        let Some(mut volume) = self.get(id)? else {
            return Ok(());
        };
        match &volume.publication {
            Some(p) if node_id.is_empty() || p.node_id == node_id => {
                volume.publication = None;
                self.store.put(Kind::Volume, id, &volume)
            }
            _ => Ok(()),
        }
    }

    /// None when every capability is supported, else the reason.
    pub fn validate_capabilities(&self, id: &str, caps: &[Capability]) -> Result<Option<String>> {
        self.must_get(id)?;
        Ok(check_capabilities(caps).err().map(|e| e.to_string()))
    }

    /// A page of volumes ordered by id. Tokens are opaque to callers; one bicsi did not issue is
    /// refused with Aborted. Volumes added or removed between pages do not break the listing.
    pub fn list_volumes(
        &self,
        max_entries: usize,
        starting_token: &str,
    ) -> Result<(Vec<Volume>, String)> {
        let after = if starting_token.is_empty() {
            None
        } else {
            let decoded = starting_token
                .strip_prefix(PAGE_TOKEN_PREFIX)
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    Error::Aborted(format!(
                        "starting_token {starting_token:?} was not issued by bicsi; list again from the start"
                    ))
                })?;
            Some(decoded)
        };
        let all: Vec<Volume> = self.store.list(Kind::Volume)?;
        let mut page: Vec<Volume> = all
            .into_iter()
            .filter(|v| after.as_ref().is_none_or(|a| &v.id > a))
            .collect();
        let mut next = String::new();
        if max_entries > 0 && page.len() > max_entries {
            page.truncate(max_entries);
            let last = &page[max_entries - 1].id;
            next = format!("{PAGE_TOKEN_PREFIX}{}", hex::encode(last));
        }
        Ok((page, next))
    }

    /// Free bytes across the disks that take replicas.
    pub async fn capacity(&self) -> Result<u64> {
        let files = self.replicas.clone();
        let disks = blocking(move || files.disks()).await?;
        Ok(disks.iter().map(|d| d.free_bytes).sum())
    }

    pub async fn condition(&self, volume: &Volume) -> Result<Condition> {
        let files = self.replicas.clone();
        let reps = volume.replicas.clone();
        let missing: Vec<String> = blocking(move || {
            let mut missing = Vec::new();
            for r in &reps {
                if !files.exists(r)? {
                    missing.push(format!(
                        "replica {} ({}) is missing",
                        r.id,
                        r.path.display()
                    ));
                }
            }
            Ok(missing)
        })
        .await?;
        if missing.is_empty() {
            let message = if volume.is_degraded() {
                format!(
                    "degraded: {} of {} replicas",
                    volume.replicas.len(),
                    volume.spec.number_of_replicas
                )
            } else {
                "healthy".to_string()
            };
            Ok(Condition {
                abnormal: false,
                message,
            })
        } else {
            Ok(Condition {
                abnormal: true,
                message: missing.join("; "),
            })
        }
    }

    /// Grows a volume; returns (new capacity, whether the node must grow the filesystem).
    /// Growth is offline: qemu's quorum driver cannot resize while a volume is attached.
    pub async fn expand(
        &self,
        id: &str,
        required: u64,
        limit: u64,
        is_block: bool,
    ) -> Result<(u64, bool)> {
        let _guard = self.guards.try_take(id, "volume")?;
        let mut volume = self.must_get(id)?;
        let size = size_for_range(required, limit, volume.spec.capacity_bytes)?;
        if size <= volume.spec.capacity_bytes {
            return Ok((volume.spec.capacity_bytes, !is_block));
        }
        if let Some(p) = &volume.publication {
            return Err(Error::FailedPrecondition(format!(
                "volume {id:?} is attached to node {:?}; bicsi grows volumes offline: detach it, expand it, attach it again",
                p.node_id
            )));
        }
        let files = self.replicas.clone();
        let reps = volume.replicas.clone();
        blocking(move || {
            for r in &reps {
                files.resize(r, size)?;
            }
            Ok(())
        })
        .await?;
        volume.spec.capacity_bytes = size;
        self.store.put(Kind::Volume, id, &volume)?;
        Ok((size, !is_block))
    }

    /// Applies mutable parameters; only `numberOfReplicas` can change.
    pub async fn modify(&self, id: &str, mutable: &BTreeMap<String, String>) -> Result<()> {
        check_mutable(mutable)?;
        let Some(wanted) = mutable.get(params::NUMBER_OF_REPLICAS) else {
            self.must_get(id)?;
            return Ok(());
        };
        let wanted = params::parse_replicas(wanted)?;
        let _guard = self.guards.try_take(id, "volume")?;
        let mut volume = self.must_get(id)?;
        if volume.spec.number_of_replicas == wanted {
            return Ok(());
        }
        if let Some(p) = &volume.publication {
            return Err(Error::FailedPrecondition(format!(
                "volume {id:?} is attached to node {:?}; change its replicas while it is detached",
                p.node_id
            )));
        }
        if let Some(image) = &volume.spec.backing_image
            && wanted > volume.spec.number_of_replicas
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {id:?} starts from backing image {image:?}: adding replicas to such a volume is not supported yet"
            )));
        }
        let files = self.replicas.clone();
        let current = volume.replicas.clone();
        let vol_id = id.to_string();
        let new_replicas = blocking(move || {
            let mut reps = current;
            let want = wanted as usize;
            while reps.len() > want {
                let r = reps.pop().expect("non-empty");
                files.delete(&r)?;
            }
            if reps.len() < want {
                let free: Vec<DiskSpace> = files
                    .disks()?
                    .into_iter()
                    .filter(|d| !reps.iter().any(|r| r.disk_id == d.disk.id))
                    .collect();
                let source = reps.first().cloned().ok_or_else(|| {
                    Error::FailedPrecondition("volume has no replica to copy from".into())
                })?;
                for d in place_replicas(free, want - reps.len()) {
                    let rid = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
                    let r = Replica {
                        path: crate::disks::replica_path(&d.disk, &vol_id, &rid),
                        id: rid,
                        node_id: d.disk.node_id.clone(),
                        disk_id: d.disk.id.clone(),
                        deferred: false,
                    };
                    files.copy(&source, &r)?;
                    reps.push(r);
                }
            }
            Ok(reps)
        })
        .await?;
        volume.replicas = new_replicas;
        volume.spec.number_of_replicas = wanted;
        volume
            .spec
            .parameters
            .insert(params::NUMBER_OF_REPLICAS.into(), wanted.to_string());
        self.store.put(Kind::Volume, id, &volume)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Disk;

    fn disk(id: &str, node: &str, free: u64) -> DiskSpace {
        DiskSpace {
            disk: Disk {
                id: id.into(),
                node_id: node.into(),
                path: format!("/d/{id}").into(),
            },
            free_bytes: free,
        }
    }

    #[test]
    fn placement_prefers_distinct_nodes_then_distinct_disks() {
        let disks = vec![
            disk("a1", "a", 100),
            disk("a2", "a", 90),
            disk("b1", "b", 10),
            disk("c1", "c", 50),
        ];
        let ids = |v: Vec<DiskSpace>| v.into_iter().map(|d| d.disk.id).collect::<Vec<_>>();
        assert_eq!(ids(place_replicas(disks.clone(), 3)), ["a1", "c1", "b1"]);
        assert_eq!(
            ids(place_replicas(disks.clone(), 4)),
            ["a1", "c1", "b1", "a2"]
        );
        assert_eq!(
            ids(place_replicas(disks.clone(), 9)).len(),
            4,
            "degraded, never more than disks"
        );
        assert_eq!(ids(place_replicas(vec![disk("x", "n", 1)], 3)), ["x"]);
    }

    #[test]
    fn capacity_ranges() {
        let mib = 1u64 << 20;
        let table: &[(u64, u64, Result<u64, tonic::Code>)] = &[
            (0, 0, Ok(DEFAULT_VOLUME_SIZE)),
            (10 * mib, 0, Ok(10 * mib)),
            (10 * mib + 1, 0, Ok(10 * mib + 512)),
            (10 * mib + 512, 0, Ok(10 * mib + 512)),
            (0, 5 * mib, Ok(5 * mib)),
            (1000, 1024, Ok(1024)),
            (2 * mib, mib, Err(tonic::Code::OutOfRange)),
            (1000, 1001, Err(tonic::Code::OutOfRange)),
            (MAX_VOLUME_SIZE + 1, 0, Err(tonic::Code::OutOfRange)),
        ];
        for (req, lim, want) in table {
            let got = size_for_range(*req, *lim, DEFAULT_VOLUME_SIZE).map_err(|e| e.code());
            assert_eq!(got, *want, "required {req} limit {lim}");
        }
    }

    #[test]
    fn volume_ids_are_stable_and_safe() {
        assert_eq!(volume_id_for("pvc-1234"), "pvc-1234");
        let weird = volume_id_for("a/b c");
        assert!(weird.starts_with("vol-") && weird.len() == 44);
        assert_eq!(weird, volume_id_for("a/b c"));
        assert_ne!(volume_id_for(&"x".repeat(128)), "x".repeat(128));
        assert!(volume_id_for(".hidden").starts_with("vol-"));
    }
}
