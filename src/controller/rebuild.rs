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
//! The volume's guard is held only while the record is read and written (before the copy, to
//! choose and mark the target wo; after it, to record the outcome), not during the copy and
//! its check: a ControllerPublish or ControllerUnpublish arriving meanwhile is answered at once.
//! Which volumes have a copy running is kept in memory (`Controller::rebuilding`): it is what
//! tells a running rebuild's wo target from one a crash cut, it makes DeleteVolume, expansion
//! and a change of replica count answer Aborted while a copy runs, and a publish that goes
//! ahead sets its flag so the copy's result is dropped (the engine started without the wo
//! target, so the target misses what is written from then on): the target goes back to err and
//! is rebuilt after the detach.
//!
//! An attached volume served by the mirror engine is rebuilt online instead ([`online`]): the
//! engine takes the target write-only, fills and verifies it while it serves.
//!
//! Not done: rebuilding a qemu-served volume while it is attached. Measured with qemu-storage-daemon 10.0.2
//! (quorum under a writable FUSE export, the engine's layout), none of qemu's copy jobs can
//! fill a new quorum child while the export writes: `blockdev-mirror` of the quorum (with
//! `replaces` naming a child, qemu's quorum repair) is refused because a writable FUSE export
//! holds the RESIZE permission on its node and a mirror source must not be resized ("Permission
//! conflict ... 'resize'"); an NBD export of a child for a second reader is refused for the
//! same reason; a new child whose backing is the healthy child cannot join the quorum (a
//! backing link unshares WRITE, which the quorum needs) and `block-stream` refuses a written
//! intermediate node; a new child whose backing reads the export's own FUSE file from inside
//! the daemon hangs the daemon; one whose backing is read over NBD from a separate `qemu-nbd`
//! joins the quorum and takes writes, but neither `block-stream` nor a backup through a
//! `copy-on-read` filter may fill it (RESIZE, WRITE), and a read-only FUSE export of that
//! filter hangs the daemon. An attached volume runs degraded and its err replicas are
//! rebuilt at its next attach or once it is detached. Progress shows the phase, not a byte
//! count (the copy runs in one call on the target's node).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::health::{self, RebuildProgress, ReplicaHealth, ReplicaMode};
use crate::model::{Replica, Volume, now_secs};
use crate::snapshot::SnapshotFile;
use crate::store::{Kind, StoreExt};

use super::{Controller, place_replicas};

pub mod online;

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

impl RebuildReport {
    /// A replica not rebuilt in this pass: waiting for a source, a disk or the volume is said
    /// at debug level; a copy or verification that failed is a warning. `what` names the kind
    /// of rebuild in the log.
    pub(crate) fn skip(&mut self, volume: &str, replica: &str, what: &str, e: &Error) {
        if matches!(
            e.code(),
            tonic::Code::FailedPrecondition | tonic::Code::ResourceExhausted | tonic::Code::Aborted
        ) {
            tracing::debug!(volume, replica, error = %e, "{what} waits");
        } else {
            tracing::warn!(volume, replica, error = %e, "{what} failed; the next pass retries");
        }
        self.skipped.push(format!("replica {replica}: {e}"));
    }
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

/// Whether the caller of a rebuild holds the volume's guard. An attach that rebuilds before
/// its engine starts holds it for the whole attach; the reconcile pass and `bicsi volume
/// rebuild` take it only to read and write the volume's record, so ControllerPublish and
/// ControllerUnpublish are answered at once while a copy runs (a publish then attaches from the
/// rw replicas and the copy's result is dropped, see [`Running::attached`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Records {
    Held,
    Take,
}

/// How long a rebuild waits for the volume's guard to record a step before giving up (the
/// replica stays wo and the next pass turns it err and starts over).
const RECORD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// This volume's entry in the controller's set of running rebuilds, removed when dropped. Its
/// flag is set by a publish that went ahead while the copy ran.
pub(crate) struct Running<'a> {
    controller: &'a Controller,
    volume: String,
}

impl Running<'_> {
    /// Whether the volume was published while this rebuild ran.
    fn attached(&self) -> bool {
        self.controller
            .rebuilding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&self.volume)
            .copied()
            .unwrap_or(false)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.controller
            .rebuilding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.volume);
    }
}

/// `--from`: the chosen rw replica is kept, the volume's fault cleared, every other replica err.
fn choose_source(volume: &mut Volume, from: &str) -> Result<()> {
    let id = volume.id.clone();
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
    Ok(())
}

impl Controller {
    /// Marks a rebuild of `volume` as running; None when one is.
    fn start_running(&self, volume: &str) -> Option<Running<'_>> {
        let mut running = self.rebuilding.lock().unwrap_or_else(|e| e.into_inner());
        if running.contains_key(volume) {
            return None;
        }
        running.insert(volume.to_string(), false);
        Some(Running {
            controller: self,
            volume: volume.to_string(),
        })
    }

    /// Called by a publish (holding the guard): a rebuild copying now must not make its target
    /// rw, since the engine about to start does not write it.
    pub(crate) fn note_publish_during_rebuild(&self, volume: &str) {
        if let Some(flag) = self
            .rebuilding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(volume)
        {
            tracing::info!(
                volume,
                "published while a replica is rebuilt offline; that rebuild will start over after the detach"
            );
            *flag = true;
        }
    }

    /// Aborted while a rebuild of `volume` copies: deleting, growing or re-placing its replicas
    /// would pull the files from under the copy.
    pub(crate) fn refuse_while_rebuilding(&self, volume: &str) -> Result<()> {
        if self
            .rebuilding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(volume)
        {
            return Err(Error::Aborted(format!(
                "volume {volume:?} has a replica being rebuilt; retry when it finishes (`bicsi \
                 get replicas {volume}` shows it)"
            )));
        }
        Ok(())
    }

    /// The volume's guard for a record change: none needed when the caller holds it, else
    /// taken, waiting up to [`RECORD_WAIT`] for the operation that holds it.
    async fn lock_records(
        &self,
        volume: &str,
        records: Records,
    ) -> Result<Option<crate::guard::Guard>> {
        if records == Records::Held {
            return Ok(None);
        }
        let deadline = tokio::time::Instant::now() + RECORD_WAIT;
        loop {
            match self.guards.try_take(volume, "volume") {
                Ok(g) => return Ok(Some(g)),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

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
    /// is cleared and every other replica is rebuilt from it. The volume must be detached. The
    /// guard is held only while the records are read and written (see [`Records`]).
    pub async fn rebuild(&self, id: &str, from: Option<&str>) -> Result<(Volume, RebuildReport)> {
        let (mut volume, running) = {
            let _guard = self.guards.try_take(id, "volume")?;
            let mut volume = self.must_get(id)?;
            // Offline rebuilds of copy-on-write replicas go through their view
            // (`snapshot::restore`); online ones into a new copy-on-write target of the engine
            // (`online`).
            if online::online(&volume) && from.is_none() {
                drop(_guard);
                let report = self.rebuild_attached(&mut volume).await?;
                return Ok((volume, report));
            }
            if let Some(p) = &volume.publication {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id:?} is attached to node {:?}; bicsi rebuilds the replicas of an \
                     attached volume online only when the mirror engine serves it, without \
                     --from: detach it (its replicas are also rebuilt at its next attach)",
                    p.node_id
                )));
            }
            let Some(running) = self.start_running(id) else {
                return Err(Error::Aborted(format!(
                    "volume {id:?} is being rebuilt now; follow it with `bicsi get replicas {id}`"
                )));
            };
            if let Some(from) = from {
                choose_source(&mut volume, from)?;
                self.store.put(Kind::Volume, id, &volume)?;
            }
            (volume, running)
        };
        let report = self
            .rebuild_running(&mut volume, from, Records::Take, &running)
            .await?;
        Ok((volume, report))
    }

    /// One pass over `volume` (detached). `records` says whether the caller holds the volume's
    /// guard (an attach rebuilding first) or the pass takes it for each record change.
    pub(crate) async fn rebuild_detached(
        &self,
        volume: &mut Volume,
        from: Option<&str>,
        records: Records,
    ) -> Result<RebuildReport> {
        let Some(running) = self.start_running(&volume.id) else {
            return Ok(RebuildReport {
                skipped: vec!["a rebuild of this volume is running".into()],
                ..Default::default()
            });
        };
        self.rebuild_running(volume, from, records, &running).await
    }

    /// [`Controller::rebuild_detached`] once this volume's entry in the running set is held.
    async fn rebuild_running(
        &self,
        volume: &mut Volume,
        from: Option<&str>,
        records: Records,
        running: &Running<'_>,
    ) -> Result<RebuildReport> {
        let mut report = RebuildReport::default();
        let now = now_secs();
        let pending: Vec<Replica> = {
            let _guard = self.lock_records(&volume.id, records).await?;
            *volume = self.must_get(&volume.id)?;
            if volume.publication.is_some() {
                return Ok(report);
            }
            // A wo replica with no rebuild running (this volume's entry in the running set is
            // ours) was cut by a crash: it starts over from err.
            self.reset_interrupted(
                volume,
                "rebuild",
                "a rebuild was interrupted (its process was killed); it restarts",
                now,
            )?;
            if volume.fault.is_some() {
                return Ok(report);
            }
            // A rebuild that just failed (a disk still full) waits a little before the next
            // try, unless a person asked for this one.
            volume
                .replicas
                .iter()
                .filter(|r| r.health.mode == ReplicaMode::Err)
                .filter(|r| {
                    from.is_some()
                        || !r.health.mode_reason.starts_with(FAILED_REBUILD)
                        || now >= r.health.mode_since + RETRY_SECS
                })
                .cloned()
                .collect()
        };
        if pending.is_empty() {
            return Ok(report);
        }
        let disks = self.cluster.disks().await?;
        for old in pending {
            match self
                .rebuild_one(volume, &old.id, from, &disks, now, records, running)
                .await
            {
                Ok(Some(id)) => report.rebuilt.push(id),
                Ok(None) => {}
                Err(e) => report.skip(&volume.id, &old.id, "rebuild", &e),
            }
        }
        Ok(report)
    }

    /// Rebuilds (or replaces) the err replica `old_id`; Some(id of the rw replica) when done,
    /// None when it waits. Three steps: the choice of source and target and the move to wo
    /// under the guard, the copy and its check without it, the outcome under it again.
    #[allow(clippy::too_many_arguments)]
    async fn rebuild_one(
        &self,
        volume: &mut Volume,
        old_id: &str,
        from: Option<&str>,
        disks: &[crate::agent::DiskSpace],
        now: u64,
        records: Records,
        running: &Running<'_>,
    ) -> Result<Option<String>> {
        let (target, replaced, source, _slot) = {
            let _guard = self.lock_records(&volume.id, records).await?;
            *volume = self.must_get(&volume.id)?;
            if volume.publication.is_some() {
                return Ok(None);
            }
            let Some(old) = volume
                .replicas
                .iter()
                .find(|r| r.id == old_id && r.health.mode == ReplicaMode::Err)
                .cloned()
            else {
                return Ok(None);
            };
            let Some((target, replaced, source)) =
                self.choose_target(volume, &old, from, disks, now).await?
            else {
                return Ok(None);
            };
            let Some(slot) = self.take_rebuild_slot(&target.node_id) else {
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
            (target, replaced, source, slot)
        };
        self.rebuild_started(volume, "offline", &target, &source);
        let started = std::time::Instant::now();
        let outcome = self.copy_and_verify(volume, &source, &target).await;
        let took_ms = started.elapsed().as_millis() as u64;
        let _guard = self.lock_records(&volume.id, records).await?;
        *volume = self.must_get(&volume.id)?;
        // An attach while the copy ran started its engine without the target (it was wo), so
        // the target missed what the volume wrote since: the copy is worth nothing.
        let attached = running.attached() || volume.publication.is_some();
        let still_wo = volume
            .replicas
            .iter()
            .any(|r| r.id == target.id && r.health.mode == ReplicaMode::Wo);
        let result = match outcome {
            // Whatever the copy or its check said (a check that ran into the engine's lock on
            // the source fails): the copy is stale.
            _ if attached && still_wo => {
                self.set_mode(
                    volume,
                    &target.id,
                    ReplicaMode::Err,
                    "the volume was attached while it was rebuilt (offline); it is rebuilt \
                     again once the volume is detached",
                    |_| {},
                )?;
                Err(Error::FailedPrecondition(format!(
                    "volume {:?} was attached during the rebuild of replica {}",
                    volume.id, target.id
                )))
            }
            Ok(true) if still_wo => {
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
                Ok(Some(target.id.clone()))
            }
            Ok(true) => Err(Error::FailedPrecondition(format!(
                "replica {} changed mode during its rebuild; the next pass looks again",
                target.id
            ))),
            Ok(false) => {
                if still_wo {
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
                }
                Err(Error::Internal(format!(
                    "replica {} differs from its source {} after the copy",
                    target.id, source.id
                )))
            }
            Err(e) => {
                if still_wo {
                    self.set_mode(
                        volume,
                        &target.id,
                        ReplicaMode::Err,
                        &format!("{FAILED_REBUILD} {} failed: {e}", source.id),
                        |_| {},
                    )?;
                }
                Err(e)
            }
        };
        self.rebuild_finished(volume, "offline", &target, &result);
        result
    }

    /// The source and target of the rebuild of `old` (err), placing a replacement replica (and
    /// storing it) when `old` must be replaced; None when nothing can be done now.
    async fn choose_target(
        &self,
        volume: &mut Volume,
        old: &Replica,
        from: Option<&str>,
        disks: &[crate::agent::DiskSpace],
        now: u64,
    ) -> Result<Option<(Replica, Option<Replica>, Replica)>> {
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
                path: d.disk.replica_file(&volume.id, &rid, source.format),
                id: rid,
                node_id: d.disk.node_id.clone(),
                disk_id: d.disk.id.clone(),
                format: source.format,
                deferred: false,
                cluster_bytes: source.cluster_bytes,
                health: ReplicaHealth::new_err(&format!("replaces replica {}", old.id), now),
            };
            volume.replicas.push(new.clone());
            self.store.put(Kind::Volume, &volume.id, &*volume)?;
            tracing::info!(volume = %volume.id, old = %old.id, new = %new.id, disk = %new.disk_id, stale, "placing a replacement replica");
            (new, Some(old.clone()), source)
        };
        Ok(Some((target, replaced, source)))
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
        let t0 = std::time::Instant::now();
        agent.delete_replica(target).await?;
        let file = SnapshotFile {
            node_id: source.node_id.clone(),
            disk_id: source.disk_id.clone(),
            path: source.path.clone(),
        };
        let t1 = std::time::Instant::now();
        agent
            .restore_replica(&file, image, target, volume.spec.capacity_bytes, image)
            .await?;
        let t2 = std::time::Instant::now();
        let same = agent.compare_replicas(source, target).await;
        // The stages, for the rebuild benchmark (`bench/run rebuild`) and a slow rebuild's log.
        tracing::info!(
            volume = %volume.id,
            replica = %target.id,
            delete_ms = (t1 - t0).as_millis() as u64,
            copy_ms = (t2 - t1).as_millis() as u64,
            compare_ms = t2.elapsed().as_millis() as u64,
            "rebuild copied and compared"
        );
        same
    }

    /// Turns every wo replica of `volume` err ("its WHAT was interrupted; it restarts") and
    /// stores the record and logs `log` when one changed: called with no rebuild of the volume
    /// running, so a wo replica is one a crash cut, never made rw by a later step.
    pub(crate) fn reset_interrupted(
        &self,
        volume: &mut Volume,
        what: &str,
        log: &str,
        now: u64,
    ) -> Result<()> {
        let mut changed = false;
        for r in volume.replicas.iter_mut() {
            if r.health.mode == ReplicaMode::Wo {
                changed |= health::transition(
                    r,
                    ReplicaMode::Err,
                    &format!("its {what} was interrupted; it restarts"),
                    now,
                )?;
            }
        }
        if changed {
            tracing::warn!(volume = %volume.id, "{log}");
            self.store.put(Kind::Volume, &volume.id, &*volume)?;
        }
        Ok(())
    }

    /// A rebuild of `target` from `source` started (`mode`: offline, online): counted, and an
    /// event on the volume's claim.
    pub(crate) fn rebuild_started(
        &self,
        volume: &Volume,
        mode: &'static str,
        target: &Replica,
        source: &Replica,
    ) {
        crate::counters::rebuild_started(mode);
        crate::events::emit(
            &*self.store,
            crate::events::Event::normal(
                crate::events::of_volume(volume),
                crate::events::reason::REBUILD_STARTED,
                format!(
                    "rebuilding replica {} on node {} from replica {} ({mode})",
                    target.id, target.node_id, source.id
                ),
            ),
        );
    }

    /// The rebuild of `target` ended with `result`: counted, and an event.
    pub(crate) fn rebuild_finished(
        &self,
        volume: &Volume,
        mode: &'static str,
        target: &Replica,
        result: &Result<Option<String>>,
    ) {
        crate::counters::rebuild_finished(mode, result.is_ok());
        let regarding = crate::events::of_volume(volume);
        let event = match result {
            Ok(_) => crate::events::Event::normal(
                regarding,
                crate::events::reason::REBUILD_FINISHED,
                format!("replica {} rebuilt and verified ({mode})", target.id),
            ),
            Err(e) => crate::events::Event::warning(
                regarding,
                crate::events::reason::REBUILD_FAILED,
                format!("rebuild of replica {} failed ({mode}): {e}", target.id),
            ),
        };
        crate::events::emit(&*self.store, event);
    }

    /// Tells each change of a volume's health since the last pass as an event on its claim
    /// (a volume first seen not healthy counts as a change, so a restart tells it again).
    fn announce_health(&self, volumes: &[Volume]) {
        let mut seen = self.health_seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|id, _| volumes.iter().any(|v| &v.id == id));
        for v in volumes {
            let (now, why) = health::volume_health(v);
            let before = seen.insert(v.id.clone(), now);
            if before.unwrap_or(health::VolumeHealth::Healthy) == now {
                continue;
            }
            let regarding = crate::events::of_volume(v);
            let event = match now {
                health::VolumeHealth::Healthy => crate::events::Event::normal(
                    regarding,
                    crate::events::reason::HEALTHY,
                    "every replica is rw again".to_string(),
                ),
                health::VolumeHealth::Degraded => {
                    crate::events::Event::warning(regarding, crate::events::reason::DEGRADED, why)
                }
                health::VolumeHealth::Faulted => {
                    crate::events::Event::warning(regarding, crate::events::reason::FAULTED, why)
                }
            };
            crate::events::emit(&*self.store, event);
        }
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

    /// One reconcile pass: every detached volume with a replica that is not rw gets a rebuild
    /// pass, which takes the volume's guard only to read and write its record; an attached one
    /// served by the mirror engine an online rebuild pass.
    pub async fn rebuild_pass(&self) -> Result<()> {
        let volumes: Vec<Volume> = self.store.list(Kind::Volume)?;
        self.announce_health(&volumes);
        for mut v in volumes {
            if v.fault.is_some() || v.replicas.iter().all(|r| r.health.mode == ReplicaMode::Rw) {
                continue;
            }
            if online::online(&v) {
                // Attached and served by the mirror engine: rebuilt while it serves.
                if let Err(e) = self.rebuild_attached(&mut v).await {
                    tracing::warn!(volume = %v.id, error = %e, "online rebuild pass failed; retrying at the next tick");
                }
                continue;
            }
            if v.publication.is_some() {
                continue;
            }
            // The record is read again under the guard there: an attach may come meanwhile.
            match self.rebuild_detached(&mut v, None, Records::Take).await {
                Ok(_) => {}
                Err(e) if e.code() == tonic::Code::Aborted => {
                    tracing::debug!(volume = %v.id, error = %e, "rebuild pass waits for the volume")
                }
                Err(e) => return Err(e),
            }
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
