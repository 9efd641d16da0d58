//! The node domain: turning a volume's replicas into a device and a mount on this node, and back.
//!
//! Stage: qemu-storage-daemon serves the replicas (quorum when several) and exports them as a
//! file through FUSE; a loop device over that file is the volume's block device; a filesystem
//! volume is formatted only when the device holds no filesystem, then mounted at the staging path.
//! Publish: a bind mount of the staging mount (or of the device node, for block) onto the target.
//! Every step is idempotent and checked against the real system, so a restart of bicsi re-adopts
//! what is running (the daemon outlives bicsi) and a half-done stage is finished or redone.
//! A stage that fails undoes the steps it took, so a failed attach leaves no engine, loop device
//! or mount behind; an unstage without a record removes what older versions' failed stages left.
//! The loop engine (a volume whose one replica is a raw file, `crate::volume_engine`) staged on
//! the replica's own node has no engine process: the loop device sits straight on the replica
//! file, attached as the plain loop device the benchmarks compare with (buffered, 512-byte
//! sectors: direct I/O measured no better on every job, see the README, and a buffered device
//! is the one whose flush the unstage relies on); the node record says `engine: loop`, and
//! re-adoption, unstage (flush, then detach) and the undo of a failed stage look for the loop
//! device on the replica file instead of on an engine's export. Staged on another node, the
//! same volume is served by qemu-storage-daemon over NBD like any remote replica.
//! It must not decide anything about placement or attachment: that is the controller's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::agent::{Agent, LocalAgent, remove_attach_leftovers};
use crate::error::{Error, Result};
use crate::fsutil::blocking;
use crate::guard::Guards;
use crate::model::{AccessType, Capability, EngineKind, NodePublication, NodeVolume, Volume};
use crate::os::{ImageFormat, Os, ReplicaTarget, VolumeEngineSpec};
use crate::store::{Kind, Store, StoreExt};

pub mod watch;

/// Topology key NodeGetInfo reports.
pub const TOPOLOGY_KEY: &str = "topology.bicsi.io/node";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeStats {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    /// None for block volumes.
    pub inodes: Option<(u64, u64, u64)>,
    pub abnormal: bool,
    pub message: String,
}

pub struct NodeAgent {
    node_id: String,
    data_dir: PathBuf,
    os: Os,
    /// Where volume records live (the controller's store).
    volumes: Arc<dyn Store>,
    /// Where this node's own records live.
    local: Arc<dyn Store>,
    /// This node's agent: replica and backing image file work on its disks.
    agent: Arc<LocalAgent>,
    guards: Guards,
    /// NodeGetInfo's max_volumes_per_node; 0: no limit.
    max_volumes: u64,
}

fn default_fs(cap: &Capability, volume: &Volume) -> String {
    match &cap.access {
        AccessType::Mount { fs_type, .. } if !fs_type.is_empty() => fs_type.clone(),
        _ => volume
            .spec
            .fs_type
            .clone()
            .unwrap_or_else(|| "ext4".to_string()),
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Internal(format!("{what} {}: {e}", path.display()))
}

impl NodeAgent {
    pub fn new(
        node_id: String,
        data_dir: PathBuf,
        os: Os,
        volumes: Arc<dyn Store>,
        local: Arc<dyn Store>,
        agent: Arc<LocalAgent>,
    ) -> NodeAgent {
        NodeAgent {
            node_id,
            data_dir,
            os,
            volumes,
            local,
            guards: agent.volume_guards.clone(),
            agent,
            max_volumes: 0,
        }
    }

    /// Reports `max` as this node's attach limit (0: none); the controller enforces it.
    pub fn with_max_volumes(mut self, max: u64) -> NodeAgent {
        self.max_volumes = max;
        self
    }

    /// How many volumes may be published to this node at once; 0: no limit.
    pub fn max_volumes(&self) -> u64 {
        self.max_volumes
    }

    /// The engine's children when no publish context names them: this node's own replicas,
    /// made ready by the local agent exactly as ControllerPublishVolume would (the backing
    /// image's file on each replica's disk, deferred replicas created). A replica whose file is
    /// gone is left out (the volume stages degraded and its condition says so); while a file is
    /// on its way this answers Unavailable.
    async fn local_targets(&self, volume: &mut Volume) -> Result<Vec<ReplicaTarget>> {
        let image = volume.spec.backing_image.clone();
        let size = volume.spec.capacity_bytes;
        let mut targets = Vec::new();
        let mut changed = false;
        for r in volume
            .replicas
            .iter_mut()
            .filter(|r| r.node_id == self.node_id)
        {
            match self
                .agent
                .prepare_replica(r, size, image.as_deref(), &self.node_id)
                .await
            {
                Ok(t) => {
                    changed |= r.deferred;
                    r.deferred = false;
                    targets.push(t);
                }
                Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                    tracing::warn!(volume = %volume.id, replica = %r.id, error = %e, "staging without a replica");
                    // Degraded attach: the replica misses every write from now on.
                    changed |= crate::health::transition(
                        r,
                        crate::health::ReplicaMode::Err,
                        &format!("unusable at attach: {e}"),
                        crate::model::now_secs(),
                    )
                    .unwrap_or(false);
                }
                Err(e) => return Err(e),
            }
        }
        if changed {
            self.volumes.put(Kind::Volume, &volume.id, &*volume)?;
        }
        Ok(targets)
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    fn engine_dir(&self, volume_id: &str) -> PathBuf {
        crate::agent::engine_dir(&self.data_dir, volume_id)
    }

    /// The volume's replica files on this node (none when the volume is unknown).
    fn local_replica_paths(&self, volume_id: &str) -> Result<Vec<PathBuf>> {
        let volume: Option<Volume> = self.volumes.get(Kind::Volume, volume_id)?;
        Ok(volume
            .map(|v| v.replicas)
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.node_id == self.node_id)
            .map(|r| r.path)
            .collect())
    }

    fn record(&self, volume_id: &str) -> Result<Option<NodeVolume>> {
        self.local.get(Kind::NodeVolume, volume_id)
    }

    /// Whether what the record describes is really in place (engine, loop device, mount).
    fn healthy(os: &Os, rec: &NodeVolume) -> Result<bool> {
        let Some(file) = served_file(os, rec)? else {
            return Ok(false);
        };
        if os.loops.find(&file)?.as_deref() != Some(rec.device.as_path()) {
            return Ok(false);
        }
        if rec.capability.is_block() {
            return Ok(true);
        }
        Ok(os
            .mounts
            .mount_info(&rec.staging_path)?
            .is_some_and(|m| Path::new(&m.source) == rec.device))
    }

    /// Logs what survived a restart; the next Node call on each volume repairs what did not.
    pub async fn readopt(&self) -> Result<()> {
        let records: Vec<NodeVolume> = self.local.list(Kind::NodeVolume)?;
        // Run directories no record owns are what failed stages of older versions left; only
        // named here (at startup a spelling of --data-dir other than the records' must not stop
        // live engines): detaching or deleting their volume removes them.
        if let Ok(entries) = std::fs::read_dir(self.data_dir.join("engines")) {
            for dir in entries.flatten().map(|e| e.path()) {
                if !records.iter().any(|r| r.engine_dir == dir) {
                    tracing::warn!(run_dir = %dir.display(), "an engine run directory without a stage record (a failed stage left it); detach or delete its volume to remove it");
                }
            }
        }
        for rec in records {
            let os = self.os.clone();
            let r = rec.clone();
            let ok = blocking(move || Self::healthy(&os, &r)).await?;
            if ok {
                tracing::info!(volume = %rec.volume_id, "re-adopted staged volume");
            } else {
                tracing::warn!(volume = %rec.volume_id, "staged volume is not fully in place; the next stage call repairs it");
            }
        }
        Ok(())
    }

    /// Starts the look at this node's engines every `every`: failed children are recorded,
    /// taken out of their quorum and marked err (`watch::apply_faults`). A volume with another
    /// operation in progress is looked at in the next round.
    pub fn spawn_health_watch(
        self: &Arc<NodeAgent>,
        every: std::time::Duration,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_probe = std::time::Instant::now();
            loop {
                tick.tick().await;
                // Remote replicas are probed every PROBE_EVERY (each probe is a connection).
                let probe = (last_probe.elapsed() >= watch::PROBE_EVERY).then(|| {
                    last_probe = std::time::Instant::now();
                    std::time::Duration::from_secs(
                        crate::settings::Settings::new(me.volumes.clone())
                            .value_or_default(crate::settings::REPLICA_TIMEOUT)
                            .max(1),
                    )
                });
                let records: Vec<NodeVolume> = match me.local.list(Kind::NodeVolume) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot list staged volumes");
                        continue;
                    }
                };
                for rec in records {
                    let (os, volumes, guards) =
                        (me.os.clone(), me.volumes.clone(), me.guards.clone());
                    let id = rec.volume_id.clone();
                    // The guard only around the record write: a stage or unstage of the volume
                    // is not refused while a probe waits.
                    let done = blocking(move || {
                        watch::apply_faults_locked(
                            &os,
                            &*volumes,
                            &rec.volume_id,
                            &rec.engine_dir,
                            probe,
                            || guards.try_take(&rec.volume_id, "volume"),
                        )
                    })
                    .await;
                    if let Err(e) = done {
                        tracing::warn!(volume = %id, error = %e, "cannot record an engine's replica faults; retrying");
                    }
                }
            }
        })
    }

    /// `publish_context` is ControllerPublishVolume's answer: it names the engine's children
    /// (replicas of other nodes over NBD). Without it, this node's own replicas are used.
    pub async fn stage(
        &self,
        volume_id: &str,
        staging_path: &Path,
        capability: Capability,
        publish_context: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        let _guard = self.guards.try_take(volume_id, "volume")?;
        let mut volume: Volume = self
            .volumes
            .get(Kind::Volume, volume_id)?
            .ok_or_else(|| Error::NotFound(format!("volume {volume_id:?} not found")))?;
        if let Some(rec) = self.record(volume_id)? {
            if rec.staging_path != staging_path {
                return Err(Error::FailedPrecondition(format!(
                    "volume {volume_id:?} is already staged at {}; unstage it there first",
                    rec.staging_path.display()
                )));
            }
            if !rec.capability.same_as(&capability) {
                return Err(Error::AlreadyExists(format!(
                    "volume {volume_id:?} is already staged at {} with another capability",
                    staging_path.display()
                )));
            }
            let os = self.os.clone();
            let r = rec.clone();
            if blocking(move || Self::healthy(&os, &r)).await? {
                return Ok(());
            }
            tracing::warn!(volume = %volume_id, "repairing a staged volume that is not fully in place");
        }
        let targets = match publish_context.get(crate::model::REPLICAS_CONTEXT_KEY) {
            Some(json) => serde_json::from_str::<Vec<ReplicaTarget>>(json).map_err(|e| {
                Error::InvalidArgument(format!(
                    "publish_context {} is malformed ({e}); pass ControllerPublishVolume's answer unchanged",
                    crate::model::REPLICAS_CONTEXT_KEY
                ))
            })?,
            None => {
                if volume.replicas.iter().any(|r| r.node_id != self.node_id) {
                    tracing::warn!(volume = %volume_id, "no publish context: staging with this node's replicas only");
                }
                self.local_targets(&mut volume).await?
            }
        };
        if targets.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id:?} has no replica reachable from node {:?}; its replicas are: {}",
                self.node_id,
                volume
                    .replicas
                    .iter()
                    .map(|r| format!("{} on {}", r.path.display(), r.node_id))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        // Only rw replicas are served; after an unclean end they are compared first.
        let targets = {
            let (os, volumes, run_dir, id) = (
                self.os.clone(),
                self.volumes.clone(),
                self.engine_dir(volume_id),
                volume_id.to_string(),
            );
            blocking(move || watch::before_engine_start(&os, &*volumes, &id, &run_dir, targets))
                .await?
        };
        let replicas: Vec<PathBuf> = targets
            .iter()
            .filter_map(|t| match t {
                ReplicaTarget::Local(p) => Some(p.clone()),
                ReplicaTarget::Nbd { .. } => None,
            })
            .collect();
        let engine = attach_engine(volume.spec.engine, &targets);
        let read_only = capability.mode.is_read_only();
        let prior = self.record(volume_id)?;
        let rec = NodeVolume {
            volume_id: volume_id.to_string(),
            staging_path: staging_path.to_path_buf(),
            capability: capability.clone(),
            engine_dir: self.engine_dir(volume_id),
            device: PathBuf::new(),
            replicas,
            targets,
            publications: prior
                .as_ref()
                .map(|r| r.publications.clone())
                .unwrap_or_default(),
            engine,
        };
        let fs_type = default_fs(&capability, &volume);
        let repair = prior.is_some();
        let replica_timeout = std::time::Duration::from_secs(
            crate::settings::Settings::new(self.volumes.clone())
                .value_or_default(crate::settings::REPLICA_TIMEOUT)
                .max(1),
        );
        let (os, data_dir, local) = (self.os.clone(), self.data_dir.clone(), self.local.clone());
        let rec = blocking(move || {
            let mut done = StageSteps::default();
            let result = stage_steps(
                &os,
                rec.clone(),
                &fs_type,
                read_only,
                replica_timeout,
                &mut done,
            )
                .and_then(|rec| {
                    local.put(Kind::NodeVolume, &rec.volume_id, &rec)?;
                    Ok(rec)
                });
            if let Err(e) = &result {
                // A failed stage leaves the node as it found it. A first stage owns everything
                // of the volume here (also what an older version's failed stage left); a repair
                // of a recorded stage undoes only its own steps and keeps the record, so that
                // NodeUnstageVolume still finds what to remove.
                tracing::warn!(volume = %rec.volume_id, error = %e, "stage failed; undoing its steps");
                let undone = if repair {
                    done.undo(&os, &rec)
                } else {
                    remove_attach_leftovers(&os, &data_dir, &rec.volume_id, &rec.replicas)
                        .map(|_| ())
                };
                if let Err(u) = undone {
                    tracing::error!(volume = %rec.volume_id, error = %u, "cannot undo a failed stage; NodeUnstageVolume or DeleteVolume retries it");
                }
            }
            result
        })
        .await?;
        tracing::info!(volume = %volume_id, device = %rec.device.display(), engine = %rec.engine, "volume staged");
        crate::metrics::volume_staged(volume_id, &rec.device);
        Ok(())
    }

    pub async fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        let _guard = self.guards.try_take(volume_id, "volume")?;
        let Some(rec) = self.record(volume_id)? else {
            // Not staged here; but a stage that failed in an older version, which did not undo
            // its steps, left an engine, a loop device, perhaps a mount: found by the volume's
            // id, they go now.
            let replicas = self.local_replica_paths(volume_id)?;
            let (os, data_dir, id) = (
                self.os.clone(),
                self.data_dir.clone(),
                volume_id.to_string(),
            );
            if blocking(move || remove_attach_leftovers(&os, &data_dir, &id, &replicas)).await? {
                tracing::info!(volume = %volume_id, "removed what a failed stage left behind");
            }
            return Ok(());
        };
        if rec.staging_path != staging_path {
            return Ok(());
        }
        if let Some(p) = rec.publications.first() {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id:?} is still published at {}; unpublish it first",
                p.target_path.display()
            )));
        }
        let os = self.os.clone();
        let r = rec.clone();
        let volumes = self.volumes.clone();
        let clean = blocking(move || {
            if !r.capability.is_block() {
                os.mounts.unmount(&r.staging_path)?;
            }
            if r.engine == EngineKind::Loop {
                // No engine: the loop device sits on the replica file. Its page cache goes down
                // to the file (and the file's to the disk) before it goes.
                if let Some(file) = r.replicas.first()
                    && let Some(dev) = os.loops.find(file)?
                {
                    os.loops.flush(&dev)?;
                    os.loops.detach(&dev)?;
                }
                os.engine.stop(&r.engine_dir)?;
                // Flushed and detached: the one replica holds every acknowledged write.
                return Ok(true);
            }
            let live = os.engine.status(&r.engine_dir)?.is_some();
            if let Some(state) = os.engine.status(&r.engine_dir)? {
                if let Some(dev) = os.loops.find(&state.export_path)? {
                    // A block volume's writes may still sit in the device's page cache (a
                    // program that wrote and closed without fsync), and nothing has flushed the
                    // engine's own caches (qcow2 metadata) since: flush end to end before the
                    // device goes, or they are lost with it and with the engine. A failure
                    // stops here; NodeUnstageVolume is retried.
                    os.loops.flush(&dev)?;
                    os.loops.detach(&dev)?;
                }
            } else if !r.device.as_os_str().is_empty() {
                // The engine is gone; the loop device, if still there, points at nothing useful.
                let export = r.engine_dir.join("export");
                if let Some(dev) = os.loops.find(&export)? {
                    os.loops.detach(&dev)?;
                }
            }
            // What the engine reported goes into the volume record before its run directory
            // (and the fault file in it) is removed.
            watch::apply_faults(&os, &*volumes, &r.volume_id, &r.engine_dir, None)?;
            os.engine.stop(&r.engine_dir)?;
            Ok(live)
        })
        .await?;
        self.local.delete(Kind::NodeVolume, volume_id)?;
        if clean {
            // Flushed and stopped: no replica can have missed a write we did not record.
            watch::after_clean_stop(&*self.volumes, volume_id)?;
        } else {
            tracing::warn!(volume = %volume_id, "the engine was gone at unstage: the replicas are compared at the next attach");
        }
        tracing::info!(volume = %volume_id, "volume unstaged");
        Ok(())
    }

    pub async fn publish(
        &self,
        volume_id: &str,
        staging_path: &Path,
        target: &Path,
        capability: Capability,
        read_only: bool,
    ) -> Result<()> {
        let _guard = self.guards.try_take(volume_id, "volume")?;
        if self.volumes.get_raw(Kind::Volume, volume_id)?.is_none() {
            return Err(Error::NotFound(format!("volume {volume_id:?} not found")));
        }
        let mut rec = match self.record(volume_id)? {
            Some(r) if r.staging_path == staging_path => r,
            _ => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {volume_id:?} is not staged at {}; call NodeStageVolume first",
                    staging_path.display()
                )));
            }
        };
        if capability.is_block() != rec.capability.is_block() {
            return Err(Error::InvalidArgument(format!(
                "volume {volume_id:?} was staged as {} but is published as {}",
                if rec.capability.is_block() {
                    "block"
                } else {
                    "filesystem"
                },
                if capability.is_block() {
                    "block"
                } else {
                    "filesystem"
                }
            )));
        }
        let read_only = read_only || capability.mode.is_read_only();
        if let Some(p) = rec.publications.iter().find(|p| p.target_path == target) {
            if p.capability.same_as(&capability) && p.read_only == read_only {
                let os = self.os.clone();
                let t = target.to_path_buf();
                if blocking(move || Ok(os.mounts.mount_info(&t)?.is_some())).await? {
                    return Ok(());
                }
            } else {
                return Err(Error::AlreadyExists(format!(
                    "volume {volume_id:?} is already published at {} with another capability or read-only flag",
                    target.display()
                )));
            }
        }
        let os = self.os.clone();
        let source = if capability.is_block() {
            rec.device.clone()
        } else {
            rec.staging_path.clone()
        };
        let t = target.to_path_buf();
        let block = capability.is_block();
        blocking(move || {
            let existed = std::fs::symlink_metadata(&t).is_ok();
            let bound = (|| {
                if block {
                    prepare_block_target(&t)?;
                } else {
                    std::fs::create_dir_all(&t)
                        .map_err(|e| io_err("cannot create target path", &t, e))?;
                }
                if os.mounts.mount_info(&t)?.is_none() {
                    os.mounts.bind_mount(&source, &t, read_only)?;
                }
                Ok(())
            })();
            // A failed publish leaves no target behind that it made itself.
            if bound.is_err() && !existed && os.mounts.mount_info(&t).is_ok_and(|m| m.is_none()) {
                let _ = std::fs::remove_dir(&t).or_else(|_| std::fs::remove_file(&t));
            }
            bound
        })
        .await?;
        rec.publications.retain(|p| p.target_path != target);
        rec.publications.push(NodePublication {
            target_path: target.to_path_buf(),
            capability,
            read_only,
        });
        self.local.put(Kind::NodeVolume, volume_id, &rec)?;
        Ok(())
    }

    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<()> {
        let _guard = self.guards.try_take(volume_id, "volume")?;
        let rec = self.record(volume_id)?;
        let ours = rec
            .as_ref()
            .is_some_and(|r| r.publications.iter().any(|p| p.target_path == target));
        let os = self.os.clone();
        let t = target.to_path_buf();
        blocking(move || {
            if ours {
                os.mounts.unmount(&t)?;
            }
            // The target path is ours to remove once nothing is mounted on it.
            if os.mounts.mount_info(&t)?.is_none() {
                match std::fs::symlink_metadata(&t) {
                    Ok(m) if m.is_dir() => {
                        let _ = std::fs::remove_dir(&t);
                    }
                    Ok(_) => {
                        let _ = std::fs::remove_file(&t);
                    }
                    Err(_) => {}
                }
            }
            Ok(())
        })
        .await?;
        if let Some(mut rec) = rec
            && ours
        {
            rec.publications.retain(|p| p.target_path != target);
            self.local.put(Kind::NodeVolume, volume_id, &rec)?;
        }
        Ok(())
    }

    /// The record of a known volume that is staged or published at `path`, else NotFound.
    fn record_at(&self, volume_id: &str, path: &Path) -> Result<NodeVolume> {
        if self.volumes.get_raw(Kind::Volume, volume_id)?.is_none() {
            return Err(Error::NotFound(format!("volume {volume_id:?} not found")));
        }
        self.record(volume_id)?
            .filter(|r| {
                r.staging_path == path || r.publications.iter().any(|p| p.target_path == path)
            })
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "volume {volume_id:?} is not staged or published at {}",
                    path.display()
                ))
            })
    }

    /// Usage and health of a volume at one of its paths on this node.
    pub async fn stats(&self, volume_id: &str, path: &Path) -> Result<VolumeStats> {
        let rec = self.record_at(volume_id, path)?;
        // The volume's health as its record says (replicas marked err while attached).
        let health = self
            .volumes
            .get::<Volume>(Kind::Volume, volume_id)?
            .filter(|v| {
                v.fault.is_some()
                    || v.replicas
                        .iter()
                        .any(|r| r.health.mode != crate::health::ReplicaMode::Rw)
            })
            .map(|v| {
                let (h, why) = crate::health::volume_health(&v);
                format!("{h}: {why}")
            });
        let os = self.os.clone();
        let p = path.to_path_buf();
        blocking(move || {
            let mut stats = if rec.capability.is_block() {
                let size = os.fs.device_size(&rec.device)?;
                VolumeStats {
                    total_bytes: size,
                    ..VolumeStats::default()
                }
            } else {
                let s = os.fs.stats(&p)?;
                VolumeStats {
                    total_bytes: s.total_bytes,
                    available_bytes: s.available_bytes,
                    used_bytes: s.used_bytes,
                    inodes: Some((s.total_inodes, s.free_inodes, s.used_inodes)),
                    ..VolumeStats::default()
                }
            };
            let mut problems: Vec<String> = rec
                .replicas
                .iter()
                .filter(|r| !r.is_file())
                .map(|r| format!("replica {} is missing", r.display()))
                .collect();
            if rec.engine == EngineKind::Qemu && os.engine.status(&rec.engine_dir)?.is_none() {
                problems.push("the block engine (qemu-storage-daemon) is not running".into());
            }
            if rec.engine == EngineKind::Mirror && os.engine.status(&rec.engine_dir)?.is_none() {
                problems.push("the block engine (bicsi's mirror engine) is not running".into());
            }
            problems.extend(health);
            stats.abnormal = !problems.is_empty();
            stats.message = if problems.is_empty() {
                "healthy".into()
            } else {
                problems.join("; ")
            };
            Ok(stats)
        })
        .await
    }

    /// Grows the filesystem (online) to the device's size; returns the device size.
    pub async fn expand(&self, volume_id: &str, path: &Path) -> Result<u64> {
        let _guard = self.guards.try_take(volume_id, "volume")?;
        let rec = self.record_at(volume_id, path)?;
        let os = self.os.clone();
        blocking(move || {
            os.loops.refresh_size(&rec.device)?;
            let device_size = os.fs.device_size(&rec.device)?;
            if !rec.capability.is_block() {
                let fs = os.fs.probe(&rec.device)?.unwrap_or_else(|| "ext4".into());
                // Staging already grew an ext4 filesystem that was smaller than its device;
                // only grow (online) when there is something left to grow.
                let grown = os
                    .fs
                    .fs_size(&rec.device, &fs)?
                    .is_some_and(|size| size >= device_size);
                if !grown {
                    os.fs.grow(&rec.device, &rec.staging_path, &fs)?;
                }
            }
            Ok(device_size)
        })
        .await
    }
}

/// What a stage call did itself (and so must undo when a later step fails): whatever was in
/// place before the call is left alone.
#[derive(Default)]
struct StageSteps {
    engine: bool,
    loop_device: bool,
    mount: bool,
}

impl StageSteps {
    /// Undoes the recorded steps, last first.
    fn undo(&self, os: &Os, rec: &NodeVolume) -> Result<()> {
        if self.mount {
            os.mounts.unmount(&rec.staging_path)?;
        }
        if self.loop_device {
            match (rec.engine, rec.replicas.first()) {
                (EngineKind::Loop, Some(file)) => os.loops.detach_file(file)?,
                _ => os.loops.detach_file(&rec.engine_dir.join("export"))?,
            }
        }
        if self.engine {
            os.engine.stop(&rec.engine_dir)?;
        }
        Ok(())
    }
}

/// Engine, loop device, filesystem and staging mount of `rec`, each step skipped when it is in
/// place already; `done` learns each step as it is taken, so a failure can be undone.
/// `replica_timeout`: the `replica-timeout` setting, for the mirror engine's remote replicas.
fn stage_steps(
    os: &Os,
    mut rec: NodeVolume,
    fs_type: &str,
    read_only: bool,
    replica_timeout: std::time::Duration,
    done: &mut StageSteps,
) -> Result<NodeVolume> {
    let file = match (rec.engine, rec.replicas.first()) {
        (EngineKind::Loop, Some(replica)) => replica.clone(),
        _ => {
            done.engine = os.engine.status(&rec.engine_dir)?.is_none();
            let spec = VolumeEngineSpec {
                volume_id: rec.volume_id.clone(),
                replicas: rec.targets.clone(),
                run_dir: rec.engine_dir.clone(),
                read_only,
            };
            let state = if rec.engine == EngineKind::Mirror {
                os.engine.start_mirror(&spec, replica_timeout)?
            } else {
                os.engine.start_volume(&spec)?
            };
            state.export_path
        }
    };
    done.loop_device = os.loops.find(&file)?.is_none();
    rec.device = if rec.engine == EngineKind::Loop && read_only {
        os.loops.attach_read_only(&file)?
    } else {
        os.loops.attach(&file)?
    };
    if let AccessType::Mount { mount_flags, .. } = &rec.capability.access {
        let existing = os.fs.probe(&rec.device)?;
        let fs = match existing {
            Some(fs) => fs,
            None if read_only => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {:?} holds no filesystem and is staged read-only; stage it writable once to format it",
                    rec.volume_id
                )));
            }
            None => {
                os.fs.mkfs(&rec.device, fs_type)?;
                fs_type.to_string()
            }
        };
        std::fs::create_dir_all(&rec.staging_path)
            .map_err(|e| io_err("cannot create staging path", &rec.staging_path, e))?;
        let mounted = os.mounts.mount_info(&rec.staging_path)?;
        if mounted.is_none_or(|m| Path::new(&m.source) != rec.device) {
            // A filesystem smaller than its device (an image's filesystem, or a volume
            // expanded while detached) is grown to the volume size. ext4 grows offline
            // here, before mounting: growing it mounted needs CAP_SYS_RESOURCE.
            let device_size = os.fs.device_size(&rec.device)?;
            if !read_only
                && os
                    .fs
                    .fs_size(&rec.device, &fs)?
                    .is_some_and(|size| size < device_size)
            {
                os.fs.grow(&rec.device, &rec.staging_path, &fs)?;
            }
            let mut options = mount_flags.clone();
            if read_only {
                options.push("ro".into());
            }
            done.mount = true;
            os.mounts
                .mount(&rec.device, &rec.staging_path, &fs, &options)?;
            if !read_only && fs == "xfs" {
                os.fs.grow(&rec.device, &rec.staging_path, &fs)?;
            }
        }
    }
    Ok(rec)
}

/// The engine that serves an attach of a volume of engine `volume` with these children: `loop`
/// for a single local raw replica (the loop engine on its own node), `mirror` for several local
/// raw replicas and for local copy-on-write ones (one or several), and for a mirror or loop volume whose children are raw files here and replicas
/// of other nodes (over NBD, all of them when this node holds none: a loop volume attached on
/// another node), `qemu` for everything else (qcow2 replicas). So raw replicas of other nodes
/// are always read by bicsi's own NBD client from bicsi's replica server (TLS between the two
/// with `--tls-dir`, issue 19), qcow2 ones by qemu's client from qemu's server.
fn attach_engine(volume: EngineKind, targets: &[ReplicaTarget]) -> EngineKind {
    let format = |t: &ReplicaTarget| match t {
        ReplicaTarget::Local(p) => Some(ImageFormat::of_file(p)),
        ReplicaTarget::Nbd { .. } => None,
    };
    let raw = |t: &ReplicaTarget| format(t) == Some(ImageFormat::Raw);
    let cow = |t: &ReplicaTarget| format(t) == Some(ImageFormat::Cow);
    let remote = |t: &ReplicaTarget| matches!(t, ReplicaTarget::Nbd { .. });
    match targets {
        [t] if raw(t) => EngineKind::Loop,
        // Copy-on-write replicas: only the mirror engine reads the layout.
        [_, ..] if targets.iter().all(|t| raw(t) || cow(t)) && targets.iter().any(cow) => {
            EngineKind::Mirror
        }
        [_, _, ..] if targets.iter().all(raw) => EngineKind::Mirror,
        [_, ..]
            if matches!(volume, EngineKind::Mirror | EngineKind::Loop)
                && targets.iter().all(|t| raw(t) || remote(t)) =>
        {
            EngineKind::Mirror
        }
        _ => EngineKind::Qemu,
    }
}

/// The file the record's loop device sits on: the raw replica for the loop engine, the live
/// engine's export otherwise (None when that engine is not running).
fn served_file(os: &Os, rec: &NodeVolume) -> Result<Option<PathBuf>> {
    match (rec.engine, rec.replicas.first()) {
        (EngineKind::Loop, Some(file)) => Ok(Some(file.clone())),
        (EngineKind::Loop, None) => Ok(None),
        (EngineKind::Qemu | EngineKind::Mirror, _) => {
            Ok(os.engine.status(&rec.engine_dir)?.map(|s| s.export_path))
        }
    }
}

/// A block volume's target is a file the device is bind-mounted onto; the orchestrator may hand
/// us a path that exists as an (empty) directory or not at all.
fn prepare_block_target(target: &Path) -> Result<()> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_err("cannot create", parent, e))?;
    }
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => {
            std::fs::remove_dir(target).map_err(|e| {
                io_err(
                    "block target is a non-empty directory; expected a file at",
                    target,
                    e,
                )
            })?;
            std::fs::File::create(target).map_err(|e| io_err("cannot create", target, e))?;
        }
        Ok(_) => {}
        Err(_) => {
            std::fs::File::create(target).map_err(|e| io_err("cannot create", target, e))?;
        }
    }
    Ok(())
}
