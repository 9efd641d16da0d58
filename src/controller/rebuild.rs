//! Rebuilding replicas that are not rw, offline: for a detached volume, from a reconcile pass
//! ([`spawn`]), before an attach (`Controller::publish`), or by hand (`bicsi volume rebuild NAME
//! [--from REPLICA]`). It owns the order of a rebuild and the replacement of a replica; the mode
//! rules are `crate::health`'s and the copying is the node agent's (`Agent::restore_replica`:
//! the source's own clusters copied into a temporary file, pointed at the target disk's file of
//! the shared backing image, renamed into place only when complete).
//!
//! A rebuild of replica T from a rw replica S (of T's node when there is one):
//! 1. T err → wo (recorded, with the source);
//! 2. T's file is removed and made again as a copy of S (same node: the agent's sparse copy of
//!    S's own clusters, pointed at T's disk's file of the backing image; another node: S is
//!    exported to T's node over NBD and `qemu-img convert` writes it over T's disk's file of the
//!    backing image);
//! 3. `qemu-img compare` S T: identical → T wo → rw; else (or on any error) T wo → err.
//!
//! A kill -9 anywhere leaves T wo or err, never rw: the next pass turns a wo it did not start into
//! err and starts over (the copy restarts from nothing; the temporary file of the killed one is
//! removed by the copy itself). T is replaced instead (a new replica on a disk that holds none of
//! the volume's replicas, on a node that holds none either unless it is S's, rebuilt the same
//! way, then T deleted and its space freed) when T's disk is gone or T stayed
//! err longer than the volume's `staleReplicaTimeout` (minutes, as in the seed StorageClass;
//! 0: at the next pass). At most `concurrent-replica-rebuilds-per-node` rebuilds run at once on a
//! node.
//!
//! Not done: rebuilding while the volume is attached (qemu's `x-blockdev-change` could add the
//! child to the quorum and a copy job fill it): an attached volume runs degraded and its err
//! replicas are rebuilt at its next attach. Progress shows the phase, not a byte count (the copy
//! runs in one call on the target's node).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::health::{self, RebuildProgress, ReplicaHealth, ReplicaMode};
use crate::model::{Replica, Volume, now_secs};
use crate::snapshot::SnapshotFile;
use crate::store::{Kind, StoreExt};

use super::{Controller, place_replicas};

/// How long after a failed rebuild the passes leave the replica alone.
pub const RETRY_SECS: u64 = 10;
/// How the reason of a replica whose rebuild failed starts.
const FAILED_REBUILD: &str = "rebuild from";

/// What one pass did to a volume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RebuildReport {
    /// Replicas rebuilt and verified (now rw).
    pub rebuilt: Vec<String>,
    /// Replicas that could not be rebuilt in this pass, with why.
    pub skipped: Vec<String>,
}

const STALE: &str = "err longer than staleReplicaTimeout";

/// Why a replica in err since `since` must be replaced rather than rebuilt in place, or None:
/// its disk (or node) is gone, or it stayed err longer than the volume's staleReplicaTimeout
/// (minutes; 0: at once; None: never for this reason).
pub fn replace_reason(
    disk_back: bool,
    stale_minutes: Option<u32>,
    since: u64,
    now: u64,
) -> Option<&'static str> {
    if !disk_back {
        return Some("its disk is gone");
    }
    stale_minutes
        .is_some_and(|m| now >= since.saturating_add(u64::from(m) * 60))
        .then_some(STALE)
}

/// Frees a node's rebuild slot when dropped.
struct Slot<'a> {
    controller: &'a Controller,
    node: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut slots = self
            .controller
            .rebuild_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = slots.get_mut(&self.node) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Controller {
    fn take_rebuild_slot(&self, node: &str) -> Option<Slot<'_>> {
        let limit = crate::settings::Settings::new(self.store.clone())
            .value_or_default(crate::settings::CONCURRENT_REBUILDS_PER_NODE)
            .max(1) as usize;
        let mut slots = self.rebuild_slots.lock().unwrap_or_else(|e| e.into_inner());
        let n = slots.entry(node.to_string()).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(Slot {
            controller: self,
            node: node.to_string(),
        })
    }

    /// `bicsi volume rebuild NAME [--from REPLICA]`: rebuilds the volume's replicas that are not
    /// rw now. `from` chooses the source by hand: the volume's fault (replicas found different)
    /// is cleared and every other replica is rebuilt from it. The volume must be detached.
    pub async fn rebuild(&self, id: &str, from: Option<&str>) -> Result<(Volume, RebuildReport)> {
        let _guard = self.guards.try_take(id, "volume")?;
        let mut volume = self.must_get(id)?;
        if let Some(p) = &volume.publication {
            return Err(Error::FailedPrecondition(format!(
                "volume {id:?} is attached to node {:?}; bicsi rebuilds replicas offline: detach \
                 it (its replicas are also rebuilt at its next attach)",
                p.node_id
            )));
        }
        if let Some(from) = from {
            let now = now_secs();
            let chosen = volume
                .replicas
                .iter()
                .find(|r| r.id == from)
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "volume {id:?} has no replica {from:?}; its replicas are {}",
                        volume
                            .replicas
                            .iter()
                            .map(|r| r.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
            if chosen.health.mode != ReplicaMode::Rw {
                return Err(Error::FailedPrecondition(format!(
                    "replica {from:?} of volume {id:?} is {} ({}); choose a replica that is rw",
                    chosen.health.mode, chosen.health.mode_reason
                )));
            }
            volume.fault = None;
            for r in volume.replicas.iter_mut().filter(|r| r.id != from) {
                health::transition(
                    r,
                    ReplicaMode::Err,
                    &format!("replica {from} was chosen by hand as the one to rebuild from"),
                    now,
                )?;
            }
            self.store.put(Kind::Volume, id, &volume)?;
        }
        let report = self.rebuild_detached(&mut volume, from).await?;
        Ok((volume, report))
    }

    /// One pass over `volume` (detached, its guard held by the caller).
    pub(crate) async fn rebuild_detached(
        &self,
        volume: &mut Volume,
        from: Option<&str>,
    ) -> Result<RebuildReport> {
        let mut report = RebuildReport::default();
        let now = now_secs();
        // A wo replica with no rebuild running (we hold the guard) was cut by a crash: it starts
        // over from err.
        let mut changed = false;
        for r in volume.replicas.iter_mut() {
            if r.health.mode == ReplicaMode::Wo {
                changed |= health::transition(
                    r,
                    ReplicaMode::Err,
                    "its rebuild was interrupted; it restarts",
                    now,
                )?;
            }
        }
        if changed {
            tracing::warn!(volume = %volume.id, "a rebuild was interrupted (its process was killed); it restarts");
            self.store.put(Kind::Volume, &volume.id, &*volume)?;
        }
        if volume.fault.is_some() {
            return Ok(report);
        }
        // A rebuild that just failed (a disk still full) waits a little before the next try,
        // unless a person asked for this one.
        let pending: Vec<Replica> = volume
            .replicas
            .iter()
            .filter(|r| r.health.mode == ReplicaMode::Err)
            .filter(|r| {
                from.is_some()
                    || !r.health.mode_reason.starts_with(FAILED_REBUILD)
                    || now >= r.health.mode_since + RETRY_SECS
            })
            .cloned()
            .collect();
        if pending.is_empty() {
            return Ok(report);
        }
        let disks = self.cluster.disks().await?;
        for old in pending {
            match self.rebuild_one(volume, &old, from, &disks, now).await {
                Ok(Some(id)) => report.rebuilt.push(id),
                Ok(None) => {}
                Err(e) => {
                    // Waiting for a source or a disk is said once per pass at debug level; a
                    // copy or verification that failed is a warning.
                    if matches!(
                        e.code(),
                        tonic::Code::FailedPrecondition | tonic::Code::ResourceExhausted
                    ) {
                        tracing::debug!(volume = %volume.id, replica = %old.id, error = %e, "rebuild waits");
                    } else {
                        tracing::warn!(volume = %volume.id, replica = %old.id, error = %e, "rebuild failed; the next pass retries");
                    }
                    report.skipped.push(format!("replica {}: {e}", old.id));
                }
            }
        }
        Ok(report)
    }

    /// Rebuilds (or replaces) `old`; Some(id of the rw replica) when done, None when it waits.
    async fn rebuild_one(
        &self,
        volume: &mut Volume,
        old: &Replica,
        from: Option<&str>,
        disks: &[crate::agent::DiskSpace],
        now: u64,
    ) -> Result<Option<String>> {
        let source = |node: Option<&str>| {
            volume
                .replicas
                .iter()
                .filter(|r| r.health.mode == ReplicaMode::Rw && !r.deferred)
                .filter(|r| from.is_none_or(|f| r.id == f))
                .find(|r| node.is_none_or(|n| r.node_id == n))
                .cloned()
        };
        let disk_back = disks.iter().any(|d| d.disk.id == old.disk_id)
            && self.cluster.agent(&old.node_id).is_ok();
        let replace = replace_reason(
            disk_back,
            volume.spec.stale_replica_timeout_minutes,
            old.health.mode_since,
            now,
        );
        let stale = replace == Some(STALE);
        let (target, replaced, source) = if replace.is_none() {
            // A source on the same node copies locally; else over NBD from its node.
            let Some(source) = source(Some(&old.node_id)).or_else(|| source(None)) else {
                return Err(Error::FailedPrecondition(
                    "no rw replica to rebuild from".into(),
                ));
            };
            (old.clone(), None, source)
        } else {
            let Some(source) = source(None) else {
                return Err(Error::FailedPrecondition(
                    "no rw replica to rebuild from".into(),
                ));
            };
            // Any disk without a replica of the volume, other nodes first (place_replicas).
            let free: Vec<_> = disks
                .iter()
                .filter(|d| !volume.replicas.iter().any(|r| r.disk_id == d.disk.id))
                .filter(|d| {
                    d.disk.node_id == source.node_id
                        || !volume
                            .replicas
                            .iter()
                            .any(|r| r.node_id == d.disk.node_id && r.id != old.id)
                })
                .cloned()
                .collect();
            let Some(d) = place_replicas(free, 1).into_iter().next() else {
                return Err(Error::ResourceExhausted(format!(
                    "replica {} must be replaced ({}) but no disk is free of this volume's \
                     replicas; add a disk or a node",
                    old.id,
                    replace.unwrap_or_default(),
                )));
            };
            let rid = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
            let new = Replica {
                path: crate::disks::replica_path_as(&d.disk, &volume.id, &rid, source.format),
                id: rid,
                node_id: d.disk.node_id.clone(),
                disk_id: d.disk.id.clone(),
                format: source.format,
                deferred: false,
                health: ReplicaHealth::new_err(&format!("replaces replica {}", old.id), now),
            };
            volume.replicas.push(new.clone());
            self.store.put(Kind::Volume, &volume.id, &*volume)?;
            tracing::info!(volume = %volume.id, old = %old.id, new = %new.id, disk = %new.disk_id, stale, "placing a replacement replica");
            (new, Some(old.clone()), source)
        };
        let Some(_slot) = self.take_rebuild_slot(&target.node_id) else {
            tracing::info!(volume = %volume.id, replica = %target.id, node = %target.node_id, "rebuild waits for a slot on its node");
            return Ok(None);
        };
        self.set_mode(
            volume,
            &target.id,
            ReplicaMode::Wo,
            &format!("rebuilding from {}", source.id),
            |h| {
                h.rebuild = Some(RebuildProgress {
                    source: source.id.clone(),
                    done_bytes: 0,
                    total_bytes: 0,
                    started: now,
                });
            },
        )?;
        let started = std::time::Instant::now();
        let outcome = self.copy_and_verify(volume, &source, &target).await;
        let took_ms = started.elapsed().as_millis() as u64;
        match outcome {
            Ok(true) => {
                self.set_mode(
                    volume,
                    &target.id,
                    ReplicaMode::Rw,
                    &format!("rebuilt from {} and verified identical", source.id),
                    |_| {},
                )?;
                tracing::info!(volume = %volume.id, replica = %target.id, source = %source.id, took_ms, "replica rebuilt and verified");
                if let Some(old) = replaced {
                    volume.replicas.retain(|r| r.id != old.id);
                    self.store.put(Kind::Volume, &volume.id, &*volume)?;
                    match self.cluster.agent(&old.node_id) {
                        Ok(agent) => {
                            if let Err(e) = agent.delete_replica(&old).await {
                                tracing::warn!(volume = %volume.id, replica = %old.id, error = %e, "cannot delete the replaced replica's files");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(volume = %volume.id, replica = %old.id, error = %e, "the replaced replica's node is down; its files stay")
                        }
                    }
                }
                Ok(Some(target.id))
            }
            Ok(false) => {
                self.set_mode(
                    volume,
                    &target.id,
                    ReplicaMode::Err,
                    &format!(
                        "rebuilt from {} but qemu-img compare found them different",
                        source.id
                    ),
                    |_| {},
                )?;
                Err(Error::Internal(format!(
                    "replica {} differs from its source {} after the copy",
                    target.id, source.id
                )))
            }
            Err(e) => {
                self.set_mode(
                    volume,
                    &target.id,
                    ReplicaMode::Err,
                    &format!("{FAILED_REBUILD} {} failed: {e}", source.id),
                    |_| {},
                )?;
                Err(e)
            }
        }
    }

    async fn copy_and_verify(
        &self,
        volume: &Volume,
        source: &Replica,
        target: &Replica,
    ) -> Result<bool> {
        let agent = self.cluster.agent(&target.node_id)?;
        let image = volume.spec.backing_image.as_deref();
        if source.node_id != target.node_id {
            // Another node: its agent exports the source to the target's node, which copies it
            // over NBD and compares; the export goes when done.
            let source_agent = self.cluster.agent(&source.node_id)?;
            let exported = source_agent
                .prepare_replica(source, volume.spec.capacity_bytes, image, &target.node_id)
                .await?;
            let copied = agent.copy_replica_from(&exported, target, image).await;
            if let Err(e) = source_agent.release_replica(source).await {
                tracing::warn!(volume = %volume.id, replica = %source.id, error = %e, "cannot stop exporting a rebuild's source");
            }
            return copied;
        }
        agent.delete_replica(target).await?;
        let file = SnapshotFile {
            node_id: source.node_id.clone(),
            disk_id: source.disk_id.clone(),
            path: source.path.clone(),
        };
        agent
            .restore_replica(&file, image, target, volume.spec.capacity_bytes, image)
            .await?;
        let copied = std::time::Instant::now();
        let same = agent.compare_replicas(source, target).await;
        tracing::debug!(volume = %volume.id, replica = %target.id, compare_ms = copied.elapsed().as_millis() as u64, "rebuild verified");
        same
    }

    /// Moves one replica of `volume` through `health::transition` and stores the record.
    fn set_mode(
        &self,
        volume: &mut Volume,
        id: &str,
        to: ReplicaMode,
        reason: &str,
        extra: impl FnOnce(&mut ReplicaHealth),
    ) -> Result<()> {
        let r = volume
            .replicas
            .iter_mut()
            .find(|r| r.id == id)
            .ok_or_else(|| Error::NotFound(format!("replica {id:?} not found")))?;
        health::transition(r, to, reason, now_secs())?;
        extra(&mut r.health);
        self.store.put(Kind::Volume, &volume.id, &*volume)
    }

    /// One reconcile pass: every detached volume with a replica that is not rw, whose guard is
    /// free, gets a rebuild pass.
    pub async fn rebuild_pass(&self) -> Result<()> {
        let volumes: Vec<Volume> = self.store.list(Kind::Volume)?;
        for v in volumes {
            if v.publication.is_some()
                || v.fault.is_some()
                || v.replicas.iter().all(|r| r.health.mode == ReplicaMode::Rw)
            {
                continue;
            }
            let Ok(_guard) = self.guards.try_take(&v.id, "volume") else {
                continue;
            };
            // Read again under the guard: an attach may have happened meanwhile.
            let Some(mut v) = self.get(&v.id)? else {
                continue;
            };
            if v.publication.is_some() {
                continue;
            }
            self.rebuild_detached(&mut v, None).await?;
        }
        Ok(())
    }
}

/// Runs [`Controller::rebuild_pass`] every `every` (5 s at most).
pub fn spawn(
    controller: Arc<Controller>,
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // At most every 5 s whatever the lifecycle tick: a pass with nothing to do only lists
        // the volume records.
        let every = every.clamp(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(5),
        );
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = controller.rebuild_pass().await {
                tracing::warn!(error = %e, "replica rebuild pass failed; retrying at the next tick");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacement_table() {
        // (disk back, staleReplicaTimeout minutes, err since, now) → reason
        let t0 = 1_000_000;
        let table = [
            (true, None, t0, t0 + 86_400, None),
            (true, Some(2880), t0, t0 + 2880 * 60 - 1, None),
            (true, Some(2880), t0, t0 + 2880 * 60, Some(STALE)),
            (true, Some(0), t0, t0, Some(STALE)),
            (false, None, t0, t0, Some("its disk is gone")),
            (false, Some(2880), t0, t0, Some("its disk is gone")),
            (true, Some(1), u64::MAX, u64::MAX - 1, None),
        ];
        for (back, minutes, since, now, want) in table {
            assert_eq!(
                replace_reason(back, minutes, since, now),
                want,
                "{back} {minutes:?} {since} {now}"
            );
        }
    }
}
