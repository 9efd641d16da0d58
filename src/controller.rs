//! The controller domain: volumes, their replicas and their attachment to nodes. It owns the
//! volume records in the store and the rules of CSI's Controller service (idempotency by name,
//! capacity ranges, single-node attachment), and knows nothing about gRPC: the CSI adapter calls
//! it with domain types and maps its errors with the one table in `error.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::agent::DiskSpace;
use crate::backing::BackingImages;
use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::guard::Guards;
use crate::model::{
    Capability, NodeRecord, Publication, Replica, Volume, VolumeSource, VolumeSpec, now_rfc3339,
};
use crate::params;
use crate::store::{Kind, Store, StoreExt};

/// The volume id rule is the model's; re-exported for the callers that know it here.
pub use crate::model::volume_id_for;

pub mod backup;
pub mod group_snapshot;
pub mod rebuild;
pub mod snapshot;

/// Size of a volume created without a capacity range.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;
/// The largest volume bicsi creates (qcow2 handles more; this catches unit mistakes).
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
/// How long ControllerPublishVolume waits in the call for the volume's files (a backing image
/// downloading or being copied to a replica's disk) before answering Unavailable.
pub const PUBLISH_PREPARE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// CSI names may be up to 128 characters.
pub const MAX_NAME_LEN: usize = 128;
const PAGE_TOKEN_PREFIX: &str = "bicsi-page-1:";

/// One page of `items` (in the store's order, by id): those after the id that `token` names, at
/// most `max_entries` of them (0: all), and the token of the next page ("" after the last).
/// Tokens are `prefix` plus the hex of the last id; one without `prefix` was not issued by
/// `issuer` and is refused with Aborted.
pub(crate) fn page_by_id<T>(
    items: Vec<T>,
    id: impl Fn(&T) -> &str,
    max_entries: usize,
    token: &str,
    prefix: &str,
    issuer: &str,
) -> Result<(Vec<T>, String)> {
    let after = if token.is_empty() {
        None
    } else {
        let decoded = token
            .strip_prefix(prefix)
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| {
                Error::Aborted(format!(
                    "starting_token {token:?} was not issued by {issuer}; list again from the start"
                ))
            })?;
        Some(decoded)
    };
    let mut page: Vec<T> = items
        .into_iter()
        .filter(|t| after.as_deref().is_none_or(|a| id(t) > a))
        .collect();
    let mut next = String::new();
    if max_entries > 0 && page.len() > max_entries {
        page.truncate(max_entries);
        next = format!("{prefix}{}", hex::encode(id(&page[max_entries - 1])));
    }
    Ok((page, next))
}

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
    /// A backup to restore (`bicsi backup restore`); CSI reaches backups through `bak` snapshots.
    pub source_backup: Option<String>,
}

impl CreateVolume {
    /// The content source, one of the two at most (a snapshot wins, as the CSI adapter only
    /// fills one).
    pub fn source(&self) -> Option<VolumeSource> {
        match (&self.source_snapshot, &self.source_volume) {
            (Some(id), _) => Some(VolumeSource::Snapshot { id: id.clone() }),
            (None, Some(id)) => Some(VolumeSource::Volume { id: id.clone() }),
            (None, None) => None,
        }
    }
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
    cluster: Arc<Cluster>,
    guards: Guards,
    /// Held from counting a node's published volumes to recording a new one, so two publishes
    /// to a node with an attach limit cannot both take its last slot.
    attach_slots: tokio::sync::Mutex<()>,
    /// Rebuilds running per node (`rebuild`), against `concurrent-replica-rebuilds-per-node`.
    rebuild_slots: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// Volumes with a rebuild copying now (`rebuild`): the copy runs without the volume's
    /// guard, so this is what tells a running rebuild from one a crash cut.
    rebuilding: std::sync::Mutex<std::collections::HashMap<String, bool>>,
    /// Each volume's health at the last rebuild pass, to tell its changes as events.
    health_seen: std::sync::Mutex<std::collections::HashMap<String, crate::health::VolumeHealth>>,
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

/// CreateVolume's capacity range raised to the smallest volume that can hold what it is for
/// (`params::minimum_size`): a smaller `required_bytes` is rounded up, which CSI allows (a
/// volume may be larger than required); a `limit_bytes` below the minimum is OutOfRange naming
/// it. Decided here rather than left to the first mkfs, which would fail at attach.
fn raise_to_minimum(mut req: CreateVolume, minimum: u64, needs: &str) -> Result<CreateVolume> {
    if req.limit_bytes > 0 && req.limit_bytes < minimum {
        return Err(Error::OutOfRange(format!(
            "volume {:?}: limit_bytes {} is below {minimum} bytes ({} MiB), the smallest volume bicsi makes for {needs}; allow at least that much",
            req.name,
            req.limit_bytes,
            minimum >> 20
        )));
    }
    if req.required_bytes > 0 && req.required_bytes < minimum {
        req.required_bytes = minimum;
    }
    Ok(req)
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

pub use crate::model::{READ_ONLY_CONTEXT_KEY, REPLICAS_CONTEXT_KEY};

fn publish_context(
    targets: &[crate::os::ReplicaTarget],
    read_only: bool,
) -> Result<BTreeMap<String, String>> {
    let mut ctx = BTreeMap::new();
    if read_only {
        ctx.insert(READ_ONLY_CONTEXT_KEY.to_string(), "true".to_string());
    }
    if !targets.is_empty() {
        ctx.insert(
            REPLICAS_CONTEXT_KEY.to_string(),
            serde_json::to_string(targets)?,
        );
    }
    Ok(ctx)
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
        cluster: Arc<Cluster>,
        backing: Arc<BackingImages>,
    ) -> Controller {
        Controller {
            store,
            backing,
            cluster,
            guards: Guards::default(),
            attach_slots: tokio::sync::Mutex::new(()),
            rebuild_slots: Default::default(),
            rebuilding: Default::default(),
            health_seen: Default::default(),
        }
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
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
            p.number_of_replicas = Some(params::parse_replicas(n)?);
            p.kept
                .insert(params::NUMBER_OF_REPLICAS.into(), n.trim().to_string());
        }
        let (minimum, needs) = params::minimum_size(&req.capabilities, p.fs_type.as_deref());
        let req = raise_to_minimum(req, minimum, &needs)?;
        let id = volume_id_for(&req.name);
        let _guard = self.guards.try_take(&id, "volume")?;

        if let Some(existing) = self.get(&id)? {
            return self.compatible_existing(existing, &req, &p.kept);
        }
        if let Some(backup) = &req.source_backup {
            return self.restore_from_backup(&req, p, &id, backup).await;
        }
        if req.source_snapshot.is_some() || req.source_volume.is_some() {
            return self.create_from_source(&req, p, &id).await;
        }

        // The volume is made as soon as its size is known; its replicas over an image whose
        // file is not ready yet are made at attach, which is where waiting belongs.
        let image = match &p.backing_image {
            Some(b) => {
                let bi = self.backing.ensure_for_volume(b).await?;
                let virtual_size = self.backing.virtual_size_for_volume(&bi).await?;
                Some((bi, virtual_size))
            }
            None => None,
        };
        let size = match &image {
            Some((bi, virtual_size)) => {
                const MIB: u64 = 1 << 20;
                let virtual_size = *virtual_size;
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

        let disks = self.cluster.disks().await?;
        if disks.is_empty() {
            return Err(Error::ResourceExhausted(
                "no disks to place replicas on; start bicsi with --disk PATH".into(),
            ));
        }
        let nodes = crate::volume_engine::nodes_of(&disks);
        let disks = crate::volume_engine::candidate_disks(p.engine, disks)?;
        let wanted = *p
            .number_of_replicas
            .get_or_insert(params::default_replicas(disks.len()));
        let disks = crate::volume_engine::preferred_disks(p.engine, wanted, size, disks);
        let chosen = place_replicas(disks, wanted as usize);
        let engine = crate::volume_engine::decide(p.engine, wanted, &chosen, nodes)?;
        p.engine = crate::volume_engine::EngineChoice::Pinned(engine);
        // A replica on a disk that holds a ready file of the image is an overlay on it now;
        // elsewhere it is made at first attach, when the file has been brought to that disk.
        let image_name = image.as_ref().map(|(bi, _)| bi.name().to_string());
        let mut replicas: Vec<Replica> = Vec::new();
        for d in &chosen {
            let rid = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
            let format = crate::volume_engine::replica_format(engine, d);
            let mut replica = Replica {
                path: d.disk.replica_file(&id, &rid, format),
                id: rid,
                node_id: d.disk.node_id.clone(),
                disk_id: d.disk.id.clone(),
                format,
                cluster_bytes: (format == crate::os::ImageFormat::Cow)
                    .then_some(crate::mirror::cow::DEFAULT_CLUSTER),
                deferred: false,
                health: Default::default(),
            };
            let created = match self.cluster.agent(&replica.node_id) {
                Ok(agent) => {
                    agent
                        .create_replica(&replica, size, image_name.as_deref())
                        .await
                }
                Err(e) => Err(e),
            };
            match created {
                Ok(now) => replica.deferred = !now,
                Err(e) => {
                    // Leave nothing half-made: remove the replicas created so far.
                    self.delete_replicas(&replicas).await;
                    return Err(e);
                }
            }
            replicas.push(replica);
        }
        // The image the volume is made from: a polled image's current version, not its name.
        let image = image_name;
        let volume = self
            .record_volume(&id, &req, p, size, image, replicas)
            .await?;
        if volume.is_degraded() {
            tracing::warn!(
                volume = %id,
                wanted = volume.spec.number_of_replicas,
                placed = volume.replicas.len(),
                "volume created degraded: fewer disks than replicas"
            );
        } else {
            tracing::info!(volume = %id, size, replicas = volume.replicas.len(), engine = %engine, "volume created");
        }
        Ok(volume)
    }

    /// Stores a new volume whose replicas were just made; if the store refuses it, the replicas
    /// are removed again so nothing is left half-made.
    async fn record_volume(
        &self,
        id: &str,
        req: &CreateVolume,
        p: params::VolumeParams,
        size: u64,
        backing_image: Option<String>,
        replicas: Vec<Replica>,
    ) -> Result<Volume> {
        // The callers pin the engine `decide` chose (the replicas' formats do not say it: a
        // pinned `mirror` may have one raw replica).
        let engine = match p.engine {
            crate::volume_engine::EngineChoice::Pinned(kind) => kind,
            crate::volume_engine::EngineChoice::Auto => crate::model::EngineKind::Qemu,
        };
        let volume = Volume {
            id: id.to_string(),
            spec: VolumeSpec {
                name: req.name.clone(),
                capacity_bytes: size,
                number_of_replicas: p.number_of_replicas.unwrap_or(replicas.len() as u32),
                stale_replica_timeout_minutes: p.stale_replica_timeout_minutes,
                fs_type: p.fs_type,
                backing_image,
                parameters: p.kept,
                capabilities: req.capabilities.clone(),
                source: req.source(),
                engine,
                claim: crate::events::claim_of(&req.parameters),
            },
            replicas,
            publication: None,
            created_at: now_rfc3339(),
            attach_epoch: None,
            fault: None,
        };
        if let Err(e) = self.store.put(Kind::Volume, id, &volume) {
            self.delete_replicas(&volume.replicas).await;
            return Err(e);
        }
        Ok(volume)
    }

    /// Best-effort removal of replicas of a volume that is not being created after all.
    async fn delete_replicas(&self, replicas: &[Replica]) {
        for r in replicas {
            if let Ok(agent) = self.cluster.agent(&r.node_id) {
                let _ = agent.delete_replica(r).await;
            }
        }
    }

    /// The backing image a restore rebases onto, with a ready file (the rebase reads it), or why
    /// not yet: Unavailable while it is being prepared (the provisioner retries),
    /// FailedPrecondition when it failed. Plain volumes never wait: see `create_volume`.
    async fn ready_image(
        &self,
        req: &params::BackingImageRequest,
    ) -> Result<crate::backing::object::BackingImage> {
        let bi = self.backing.ensure_for_volume(req).await?;
        if bi.has_ready_file() {
            return Ok(bi);
        }
        self.backing.check_not_failed(&bi)?;
        Err(Error::Unavailable(format!(
            "backing image {:?} is being prepared ({}); a volume restored onto it is created when it is ready",
            bi.name(),
            bi.describe()
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
        // "If a volume corresponding to the specified volume name already exists [...] and is
        // incompatible with the specified capacity_range, volume_capabilities, parameters,
        // accessibility_requirements or volume_content_source, the Plugin MUST reply 6
        // ALREADY_EXISTS" (CSI spec, CreateVolume).
        if existing.spec.source != req.source() {
            let made_from = |s: &Option<VolumeSource>| match s {
                Some(s) => format!("from {s}"),
                None => "empty".to_string(),
            };
            return Err(Error::AlreadyExists(format!(
                "volume {:?} already exists, made {}; the request asks for one made {}; use another name or delete the volume first",
                req.name,
                made_from(&existing.spec.source),
                made_from(&req.source())
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
        self.refuse_while_rebuilding(id)?;
        let Some(volume) = self.get(id)? else {
            return Ok(());
        };
        if let Some(p) = &volume.publication {
            return Err(Error::FailedPrecondition(format!(
                "volume {id:?} is attached to node {:?}; detach it before deleting",
                p.node_id
            )));
        }
        // An attach that failed half-way in an older version left its engine, loop device or
        // mount behind, holding the replicas open: each node that is up removes its own.
        for node in self.cluster.node_ids() {
            if let Ok(agent) = self.cluster.agent(&node) {
                agent.clean_volume(id, &volume.replicas).await?;
            }
        }
        for r in &volume.replicas {
            self.cluster.agent(&r.node_id)?.delete_replica(r).await?;
        }
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
        self.note_publish_during_rebuild(id);
        let mut volume = self.must_get(id)?;
        if !self.cluster.known(node_id) {
            return Err(Error::NotFound(format!(
                "node {node_id:?} not found; known nodes: {:?}",
                self.cluster.node_ids()
            )));
        }
        match &volume.publication {
            Some(p) if p.node_id == node_id => {
                // CSI, ControllerPublishVolume: "ALREADY_EXISTS: Indicates that a volume
                // corresponding to the specified volume_id has already been published at the
                // node corresponding to the specified node_id but is incompatible with the
                // specified volume_capability or readonly flag."
                if p.capability.same_as(&capability) && p.read_only == read_only {
                    return publish_context(&p.targets, p.read_only);
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
        if let Some(image) = &volume.spec.backing_image {
            // A volume made before its image's file was ready never attaches over a file
            // that turned out wrong, nor waits for one that cannot come.
            let bi = self.backing.must_get(image)?;
            self.backing.check_not_failed(&bi)?;
        }
        let limit = self
            .store
            .get::<NodeRecord>(Kind::Node, node_id)?
            .map_or(0, |n| n.max_volumes_per_node);
        let _slots = if limit > 0 {
            let slots = self.attach_slots.lock().await;
            let published: Vec<String> = self
                .store
                .list::<Volume>(Kind::Volume)?
                .into_iter()
                .filter(|v| v.id != id)
                .filter(|v| v.publication.as_ref().is_some_and(|p| p.node_id == node_id))
                .map(|v| v.id)
                .collect();
            // CSI, ControllerPublishVolume: "RESOURCE_EXHAUSTED: Indicates that the maximum
            // supported number of volumes that can be attached to the specified node are already
            // attached."
            if published.len() as u64 >= limit {
                return Err(Error::ResourceExhausted(format!(
                    "node {node_id:?} has {} of its limit of {limit} volumes published ({}); unpublish one there or publish volume {id:?} to another node",
                    published.len(),
                    published.join(", ")
                )));
            }
            Some(slots)
        } else {
            None
        };
        // Replicas that missed writes and whose disks are back are rebuilt before the engine
        // starts (offline); what cannot be rebuilt now is left out of the attach.
        if volume
            .replicas
            .iter()
            .any(|r| r.health.mode != crate::health::ReplicaMode::Rw)
            && volume.fault.is_none()
        {
            match self
                .rebuild_detached(&mut volume, None, rebuild::Records::Held)
                .await
            {
                Ok(r) if !r.skipped.is_empty() => {
                    tracing::warn!(volume = %id, skipped = ?r.skipped, "attaching without rebuilding some replicas");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(volume = %id, error = %e, "cannot rebuild replicas before the attach")
                }
            }
        }
        // Attach is where a volume waits for its files: a short while in the call, so a file
        // that is nearly there attaches now rather than after the CO's retry backoff; past it,
        // Unavailable with the progress, and the retry continues the same work.
        let deadline = tokio::time::Instant::now() + PUBLISH_PREPARE_WAIT;
        let prepared = loop {
            match self.prepare_replicas(&mut volume, node_id).await {
                Err(Error::Unavailable(why)) if tokio::time::Instant::now() < deadline => {
                    if let Some(image) = &volume.spec.backing_image {
                        self.backing
                            .check_not_failed(&self.backing.must_get(image)?)?;
                    }
                    tracing::debug!(volume = %id, node = %node_id, %why, "waiting for the volume's files");
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                other => break other,
            }
        };
        let published = prepared.and_then(|targets| {
            let context = publish_context(&targets, read_only)?;
            volume.publication = Some(Publication {
                node_id: node_id.to_string(),
                capability,
                read_only,
                targets,
            });
            self.store.put(Kind::Volume, id, &volume)?;
            Ok(context)
        });
        if published.is_err() {
            // Nothing stays exported for an attach that did not happen.
            self.release_exports(&volume, node_id).await;
        }
        published
    }

    /// Stops exporting the volume's replicas of other nodes to `node_id`; a failure is logged.
    async fn release_exports(&self, volume: &Volume, node_id: &str) {
        for r in volume.replicas.iter().filter(|r| r.node_id != node_id) {
            let released = match self.cluster.agent(&r.node_id) {
                Ok(agent) => agent.release_replica(r).await,
                Err(e) => Err(e),
            };
            if let Err(e) = released {
                tracing::warn!(volume = %volume.id, replica = %r.id, error = %e, "cannot stop exporting a replica");
            }
        }
    }

    /// Asks each replica's node to make it usable from `node_id`: the backing image file on its
    /// disk, a deferred replica created, an NBD export for another node. Replicas on nodes that
    /// are down are left out (the volume attaches degraded); while files are on their way this
    /// answers Unavailable, and the CO's retry continues the work.
    async fn prepare_replicas(
        &self,
        volume: &mut Volume,
        node_id: &str,
    ) -> Result<Vec<crate::os::ReplicaTarget>> {
        let image = volume.spec.backing_image.clone();
        let mut targets = Vec::new();
        let mut waiting = Vec::new();
        let mut skipped = Vec::new();
        // Replicas unusable now, with why: marked err when the volume attaches without them.
        let mut lost: Vec<(String, String, bool)> = Vec::new();
        if let Some(fault) = &volume.fault {
            return Err(crate::health::faulted(volume, fault));
        }
        for r in volume.replicas.iter_mut() {
            if r.health.mode != crate::health::ReplicaMode::Rw {
                skipped.push(format!("replica {} is {}", r.id, r.health.mode));
                continue;
            }
            let agent = match self.cluster.agent(&r.node_id) {
                Ok(a) => a,
                Err(e) => {
                    skipped.push(format!("replica {}: {e}", r.id));
                    lost.push((
                        r.id.clone(),
                        format!("its node {:?} was down at attach", r.node_id),
                        false,
                    ));
                    continue;
                }
            };
            match agent
                .prepare_replica(r, volume.spec.capacity_bytes, image.as_deref(), node_id)
                .await
            {
                Ok(t) => {
                    r.deferred = false;
                    targets.push(t);
                }
                Err(e) if e.code() == tonic::Code::Unavailable => waiting.push(e.to_string()),
                Err(e)
                    if e.code() == tonic::Code::FailedPrecondition
                        && matches!(agent.replica_exists(r).await, Ok(false)) =>
                {
                    // Its file or disk is gone: the volume attaches from the others.
                    skipped.push(format!("replica {}: {e}", r.id));
                    lost.push((
                        r.id.clone(),
                        format!(
                            "unusable at attach on disk {} ({}): {e}",
                            r.disk_id,
                            r.path.display()
                        ),
                        true,
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        // A replica left out of an attach misses its writes: err from now on. A node that is
        // down does not count against a volume that cannot attach at all (it may come back).
        let now = crate::model::now_secs();
        let mut marked = false;
        for (rid, why, definitive) in &lost {
            if (!targets.is_empty() || *definitive) && waiting.is_empty() {
                marked |= crate::health::mark_err(volume, rid, why, now)?;
            }
        }
        if marked {
            self.store.put(Kind::Volume, &volume.id, &*volume)?;
        }
        if !waiting.is_empty() {
            // Deferred replicas created so far are recorded even though attaching must wait.
            self.store.put(Kind::Volume, &volume.id, &*volume)?;
            return Err(Error::Unavailable(format!(
                "volume {:?} is being prepared for node {node_id:?}: {}",
                volume.id,
                waiting.join("; ")
            )));
        }
        if targets.is_empty() {
            if crate::health::volume_health(volume).0 == crate::health::VolumeHealth::Faulted {
                let (_, why) = crate::health::volume_health(volume);
                return Err(crate::health::faulted(volume, &why));
            }
            return Err(Error::Unavailable(format!(
                "no replica of volume {:?} is reachable: {}",
                volume.id,
                skipped.join("; ")
            )));
        }
        for s in &skipped {
            tracing::warn!(volume = %volume.id, "attaching degraded, without a replica: {s}");
        }
        // The attaching node's own replica first: qemu's quorum reads from the first child.
        targets.sort_by_key(|t| !matches!(t, crate::os::ReplicaTarget::Local(_)));
        Ok(targets)
    }

    /// Unpublishes from `node_id` (or from any node when empty). Unknown volume or node: Ok.
    pub async fn unpublish(&self, id: &str, node_id: &str) -> Result<()> {
        let _guard = self.guards.try_take(id, "volume")?;
        let Some(mut volume) = self.get(id)? else {
            return Ok(());
        };
        let attached = match &volume.publication {
            Some(p) if node_id.is_empty() || p.node_id == node_id => p.node_id.clone(),
            _ => return Ok(()),
        };
        // What a failed stage of an older version left on the node goes first (its engine
        // holds the exports below open); a volume still staged there is left alone: DeleteVolume
        // refuses it later.
        if let Ok(agent) = self.cluster.agent(&attached)
            && let Err(e) = agent.clean_volume(id, &volume.replicas).await
        {
            tracing::warn!(volume = %id, node = %attached, error = %e, "not cleaning the node the volume was attached to");
        }
        // Replicas served to the attaching node over NBD are no longer needed there.
        self.release_exports(&volume, &attached).await;
        volume.publication = None;
        self.store.put(Kind::Volume, id, &volume)
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
        let all: Vec<Volume> = self.store.list(Kind::Volume)?;
        page_by_id(
            all,
            |v| &v.id,
            max_entries,
            starting_token,
            PAGE_TOKEN_PREFIX,
            "bicsi",
        )
    }

    /// Free bytes across the disks that take replicas.
    pub async fn capacity(&self) -> Result<u64> {
        let disks = self.cluster.disks().await?;
        Ok(disks.iter().map(|d| d.free_bytes).sum())
    }

    pub async fn condition(&self, volume: &Volume) -> Result<Condition> {
        let mut missing = Vec::new();
        for r in volume.replicas.iter().filter(|r| !r.deferred) {
            let exists = match self.cluster.agent(&r.node_id) {
                Ok(agent) => agent.replica_exists(r).await?,
                Err(_) => {
                    missing.push(format!(
                        "replica {} is on node {}, which is down",
                        r.id, r.node_id
                    ));
                    continue;
                }
            };
            if !exists {
                missing.push(format!(
                    "replica {} ({}) is missing",
                    r.id,
                    r.path.display()
                ));
            }
        }
        let (health, why) = crate::health::volume_health(volume);
        // Fewer replicas placed than wanted stays a normal condition (as before modes existed).
        if health != crate::health::VolumeHealth::Healthy
            && (volume.fault.is_some()
                || volume
                    .replicas
                    .iter()
                    .any(|r| r.health.mode != crate::health::ReplicaMode::Rw))
        {
            missing.insert(0, format!("{health}: {why}"));
        }
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
        self.refuse_while_rebuilding(id)?;
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
        for r in volume.replicas.iter().filter(|r| !r.deferred) {
            self.cluster
                .agent(&r.node_id)?
                .resize_replica(r, size)
                .await?;
        }
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
        self.refuse_while_rebuilding(id)?;
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
        // A mirror volume over copy-on-write replicas (all on one node) changes like a qemu
        // one: a new replica is built from an existing one through its view, on the same node.
        let cow = volume
            .replicas
            .iter()
            .any(|r| r.format == crate::os::ImageFormat::Cow);
        if volume.spec.engine == crate::model::EngineKind::Mirror && !cow {
            return Err(Error::FailedPrecondition(format!(
                "volume {id:?} is served by the mirror engine, whose replicas are raw files made at creation; its number of replicas cannot change: clone it into a new volume with the number of replicas wanted"
            )));
        }
        if volume.spec.engine == crate::model::EngineKind::Loop && wanted > 1 {
            return Err(Error::FailedPrecondition(format!(
                "volume {id:?} is served by the loop engine, which serves exactly one replica; it cannot get {wanted} replicas: clone it into a volume of engine qemu (StorageClass parameter engine: qemu) and use that one"
            )));
        }
        if let Some(image) = &volume.spec.backing_image
            && wanted > volume.spec.number_of_replicas
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {id:?} starts from backing image {image:?}: adding replicas to such a volume is not supported yet"
            )));
        }
        let want = wanted as usize;
        let mut reps = volume.replicas.clone();
        while reps.len() > want {
            let r = reps.pop().expect("non-empty");
            self.cluster.agent(&r.node_id)?.delete_replica(&r).await?;
        }
        if reps.len() < want {
            let source = reps.first().cloned().ok_or_else(|| {
                Error::FailedPrecondition("volume has no replica to copy from".into())
            })?;
            // A new replica is a copy of an existing one, so it goes on the source's node.
            let free: Vec<DiskSpace> = self
                .cluster
                .disks()
                .await?
                .into_iter()
                .filter(|d| d.disk.node_id == source.node_id)
                .filter(|d| !reps.iter().any(|r| r.disk_id == d.disk.id))
                .collect();
            let agent = self.cluster.agent(&source.node_id)?;
            for d in place_replicas(free, want - reps.len()) {
                let rid = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
                let r = Replica {
                    path: d.disk.replica_file(id, &rid, source.format),
                    id: rid,
                    node_id: d.disk.node_id.clone(),
                    disk_id: d.disk.id.clone(),
                    format: source.format,
                    deferred: false,
                    cluster_bytes: source.cluster_bytes,
                    health: Default::default(),
                };
                if source.format == crate::os::ImageFormat::Cow {
                    let file = crate::snapshot::SnapshotFile {
                        node_id: source.node_id.clone(),
                        disk_id: source.disk_id.clone(),
                        path: source.path.clone(),
                    };
                    let size = volume.spec.capacity_bytes;
                    agent.restore_replica(&file, None, &r, size, None).await?;
                } else {
                    agent.copy_replica(&source, &r).await?;
                }
                reps.push(r);
            }
        }
        let new_replicas = reps;
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
            manager: false,
            shares_blocks: false,
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
    fn small_requests_are_raised_to_the_minimum_or_refused() {
        let mib = 1u64 << 20;
        let table: &[(u64, u64, Result<u64, tonic::Code>)] = &[
            (0, 0, Ok(0)),
            (1, 0, Ok(4 * mib)),
            (4 * mib, 0, Ok(4 * mib)),
            (5 * mib, 0, Ok(5 * mib)),
            (1, 4 * mib, Ok(4 * mib)),
            (0, 4 * mib, Ok(0)),
            (1, 2 * mib, Err(tonic::Code::OutOfRange)),
            (0, 2 * mib, Err(tonic::Code::OutOfRange)),
        ];
        for (required, limit, want) in table {
            let req = CreateVolume {
                name: "v".into(),
                required_bytes: *required,
                limit_bytes: *limit,
                ..CreateVolume::default()
            };
            let got = raise_to_minimum(req, 4 * mib, "an ext4 filesystem")
                .map(|r| r.required_bytes)
                .map_err(|e| e.code());
            assert_eq!(got, *want, "required {required} limit {limit}");
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
