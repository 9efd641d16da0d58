//! Rebuilding the err replicas of an ATTACHED mirror volume while it serves (issue 15): the
//! mirror engine owns its write path, so it can take a new replica write-only, fill it and
//! verify it itself (`crate::mirror`'s `rebuild` module holds the copy and its locking
//! argument). This module drives it from the reconcile pass and `bicsi volume rebuild`, with the
//! offline path's rules (`super`): the guard only around record changes, a slot per node
//! (`concurrent-replica-rebuilds-per-node`), a replacement replica placed when the old one's disk
//! is gone or it stayed err past `staleReplicaTimeout` (here on a disk that shares blocks: the
//! engine serves raw files, its node's and, over NBD, other nodes'). A volume over copy-on-write
//! replicas (ext4) is rebuilt the same way into a new copy-on-write replica on a disk of the
//! attached node that does not share blocks (its replicas all live there: the engine reads
//! them); a target on another node is refused (FailedPrecondition naming the replica and the
//! fix), and the engine's side of it is argued in `crate::mirror`'s `rebuild` module.
//!
//! One online rebuild of target T from source S (rw, on the attached node N):
//! 1. under the guard: T err → wo (recorded with the source), a slot of N taken;
//! 2. N's agent is told T and where the engine finds it, a typed `ReplicaTarget`: T's local
//!    path when T is on N (the agent makes its file under a temporary name, a reflink clone of
//!    its disk's raw file of the backing image, or a sparse file), or the NBD address T's node
//!    exported it at (`prepare_replica`) when it is on another node; the engine adds it
//!    (`add`): every write from
//!    then on reaches it, never a read; the engine copies and verifies; the pass follows its
//!    progress (`bicsi get replicas` REBUILD: the copy is the first half, the verification the
//!    second);
//! 3. complete: the agent renames the file into place, the engine promotes it to a replica and
//!    the run directory's `added.json` and the node's stage record list it; then, under the
//!    guard, T wo → rw. Failed, lost (the engine restarted, the volume detached) or marked err
//!    meanwhile by the node watcher: T wo → err and the target is dropped.
//!
//! Crashes: bicsi killed at any step leaves T wo (or err) in the record, never rw before the
//! engine said complete; the next pass turns a wo it did not start into err and starts again,
//! keeping a target the engine still holds (it got every write since its `add`, so the copy
//! and verification the engine runs or ran are as good as a new one; a complete or promoted one
//! is only renamed into place again, idempotently). The engine killed: the node's normal
//! restart path starts a new engine from the record's rw replicas, without T; the pass finds the
//! target missing and T goes back to err, to be rebuilt again.

use crate::error::{Error, Result};
use crate::health::{RebuildProgress, ReplicaMode};
use crate::model::{EngineKind, Replica, Volume, now_secs};
use crate::os::ReplicaTarget;
use crate::store::{Kind, StoreExt};

use super::{Controller, FAILED_REBUILD, RETRY_SECS, RebuildReport, Records, Running};

/// How often the pass asks the engine where a rebuild is: first after [`POLL_FIRST`], then a
/// quarter longer each time up to [`POLL`], so a long one costs two questions a second; but
/// never later than the copy's progress says it should end (the time so far, scaled by what is
/// left), and from [`POLL_FIRST`] again once the copy is done, so the end of a rebuild is seen
/// within a few tens of milliseconds (at 500 ms, the wait for the next question was a quarter
/// of a 256 MiB rebuild's time, measured by the bench's stages).
const POLL: std::time::Duration = std::time::Duration::from_millis(500);
const POLL_FIRST: std::time::Duration = std::time::Duration::from_millis(20);

/// Whether `volume` is rebuilt online: attached and served by the mirror engine.
pub fn online(volume: &Volume) -> bool {
    volume.publication.is_some() && volume.spec.engine == EngineKind::Mirror
}

impl Controller {
    /// One pass over the attached mirror volume `volume`: each err replica is rebuilt online.
    pub(crate) async fn rebuild_attached(&self, volume: &mut Volume) -> Result<RebuildReport> {
        let Some(running) = self.start_running(&volume.id) else {
            return Ok(RebuildReport {
                skipped: vec!["a rebuild of this volume is running".into()],
                ..Default::default()
            });
        };
        let mut report = RebuildReport::default();
        let now = now_secs();
        let pending: Vec<Replica> = {
            let _guard = self.lock_records(&volume.id, Records::Take).await?;
            *volume = self.must_get(&volume.id)?;
            if !online(volume) {
                return Ok(report);
            }
            // A wo replica with no rebuild running (the running entry is ours) was cut by a
            // crash of bicsi: never made rw by a later step, it starts over from err.
            self.reset_interrupted(
                volume,
                "online rebuild",
                "an online rebuild was interrupted (bicsi was killed); it restarts",
                now,
            )?;
            if volume.fault.is_some() {
                return Ok(report);
            }
            volume
                .replicas
                .iter()
                .filter(|r| r.health.mode == ReplicaMode::Err)
                // The err mark must be older than the wo one to come: the node watcher applies
                // a replica's fault records only when they are not older than its mode (see
                // `crate::node::watch`), so its old fault cannot cut the rebuild.
                .filter(|r| now > r.health.mode_since)
                .filter(|r| {
                    !r.health.mode_reason.starts_with(FAILED_REBUILD)
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
                .rebuild_one_online(volume, &old.id, &disks, now, &running)
                .await
            {
                Ok(Some(id)) => report.rebuilt.push(id),
                Ok(None) => {}
                Err(e) => report.skip(&volume.id, &old.id, "online rebuild", &e),
            }
        }
        Ok(report)
    }

    async fn rebuild_one_online(
        &self,
        volume: &mut Volume,
        old_id: &str,
        disks: &[crate::agent::DiskSpace],
        now: u64,
        running: &Running<'_>,
    ) -> Result<Option<String>> {
        let (target, replaced, source, node, _slot) = {
            let _guard = self.lock_records(&volume.id, Records::Take).await?;
            *volume = self.must_get(&volume.id)?;
            let Some(node) = volume.publication.as_ref().map(|p| p.node_id.clone()) else {
                return Ok(None);
            };
            let Some(old) = volume
                .replicas
                .iter()
                .find(|r| r.id == old_id && r.health.mode == ReplicaMode::Err)
                .cloned()
            else {
                return Ok(None);
            };
            // The engine serves raw files: the target goes on a disk that shares blocks and has
            // room for the volume, of the attached node (a file the engine opens) or of another
            // (a file its node exports to the engine over NBD). A copy-on-write volume keeps
            // all its replicas on the attached node, on disks that do not share blocks (the
            // placement `volume_engine` gave it): a new copy-on-write replica there.
            let cow = volume.cow_replica().is_some();
            let here: Vec<_> = disks
                .iter()
                .filter(|d| {
                    if cow {
                        !d.shares_blocks && d.disk.node_id == node
                    } else {
                        d.shares_blocks
                    }
                })
                .cloned()
                .collect();
            let Some((target, replaced, source)) =
                self.choose_target(volume, &old, None, &here, now).await?
            else {
                return Ok(None);
            };
            if cow && target.node_id != node {
                return Err(Error::FailedPrecondition(format!(
                    "replica {} of volume {:?} is a copy-on-write replica on node {:?}, and the \
                     volume is attached on node {node:?}: bicsi rebuilds copy-on-write replicas \
                     online only on the attached node (the engine reads them there); detach the \
                     volume to rebuild it offline, or attach it on node {:?}",
                    target.id, volume.spec.name, target.node_id, target.node_id
                )));
            }
            let free = here
                .iter()
                .find(|d| d.disk.id == target.disk_id)
                .map(|d| d.free_bytes)
                .unwrap_or(0);
            // A target the engine still holds (bicsi was killed during its rebuild) has its
            // space already: it is kept, not made again.
            // (A remote target's address is known once its node exports it: never held here.)
            let held = match self.cluster.agent(&node) {
                Ok(agent) if target.node_id == node => agent
                    .online_rebuild_status(
                        &volume.id,
                        &target,
                        &ReplicaTarget::Local(target.path.clone()),
                    )
                    .await
                    .is_ok_and(|s| {
                        matches!(
                            s.state.as_str(),
                            "copying" | "verifying" | "complete" | "promoted"
                        )
                    }),
                _ => false,
            };
            // A remote replica rebuilt in place is filled over the file it has.
            let in_place = replaced.is_none() && target.node_id != node;
            if !held && !in_place && free < volume.spec.capacity_bytes {
                return Err(Error::ResourceExhausted(format!(
                    "disk {} has {free} bytes free, less than volume {:?}'s {} bytes: the online \
                     rebuild of replica {} waits for room",
                    target.disk_id, volume.spec.name, volume.spec.capacity_bytes, target.id
                )));
            }
            let Some(slot) = self.take_rebuild_slot(&node) else {
                tracing::info!(volume = %volume.id, replica = %target.id, node = %node, "online rebuild waits for a slot on its node");
                return Ok(None);
            };
            self.set_mode(
                volume,
                &target.id,
                ReplicaMode::Wo,
                &format!("rebuilding online from {}", source.id),
                |h| {
                    h.rebuild = Some(RebuildProgress {
                        source: source.id.clone(),
                        done_bytes: 0,
                        total_bytes: 0,
                        started: now,
                    });
                },
            )?;
            (target, replaced, source, node, slot)
        };
        self.rebuild_started(volume, "online", &target, &source);
        let _ = running;
        let agent = self.cluster.agent(&node)?;
        let image = volume.spec.backing_image.clone();
        let started = std::time::Instant::now();
        // A target on another node: its node makes the file (when it is a new replica) and
        // exports it to the attached node, and the engine gets its address; one of the attached
        // node is its local path.
        let remote = target.node_id != node;
        let mut engine_target = ReplicaTarget::Local(target.path.clone());
        let mut exported = false;
        // Each stage's time goes into the log line of a rebuild that succeeds (the bench reads
        // the whole; the stages say where it goes).
        let mut stages = [0u128; 3];
        let outcome: Result<()> = async {
            if remote {
                let address = self
                    .cluster
                    .agent(&target.node_id)?
                    .prepare_replica(&target, volume.spec.capacity_bytes, image.as_deref(), &node)
                    .await?;
                engine_target = address;
                exported = true;
            }
            agent
                .start_online_rebuild(
                    &volume.id,
                    &target,
                    &engine_target,
                    volume.spec.capacity_bytes,
                    image.as_deref(),
                )
                .await?;
            stages[0] = started.elapsed().as_millis();
            let followed = self
                .follow(
                    volume,
                    &target,
                    &engine_target,
                    &node,
                    agent.as_ref(),
                    &mut stages[2],
                )
                .await;
            stages[1] = started.elapsed().as_millis() - stages[0] - stages[2];
            followed
        }
        .await;
        let _guard = self.lock_records(&volume.id, Records::Take).await?;
        *volume = self.must_get(&volume.id)?;
        let still_wo = volume
            .replicas
            .iter()
            .any(|r| r.id == target.id && r.health.mode == ReplicaMode::Wo);
        let result = match outcome {
            Ok(()) if still_wo => {
                self.set_mode(
                    volume,
                    &target.id,
                    ReplicaMode::Rw,
                    &format!(
                        "rebuilt online from {} and verified identical by the mirror engine",
                        source.id
                    ),
                    |_| {},
                )?;
                tracing::info!(volume = %volume.id, replica = %target.id, source = %source.id, took_ms = started.elapsed().as_millis() as u64, start_ms = stages[0] as u64, engine_ms = stages[1] as u64, finish_ms = stages[2] as u64, "replica rebuilt online and verified");
                if let Some(old) = replaced {
                    volume.replicas.retain(|r| r.id != old.id);
                    self.store.put(Kind::Volume, &volume.id, &*volume)?;
                    let deleted = match self.cluster.agent(&old.node_id) {
                        Ok(a) => a.delete_replica(&old).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = deleted {
                        tracing::warn!(volume = %volume.id, replica = %old.id, error = %e, "cannot delete the replaced replica's files");
                    }
                }
                Ok(Some(target.id.clone()))
            }
            Ok(()) => Err(Error::FailedPrecondition(format!(
                "replica {} changed mode during its online rebuild; the next pass looks again",
                target.id
            ))),
            Err(e) => {
                // A remote target the engine never got (its export failed) is not dropped there.
                if (!remote || exported)
                    && let Err(c) = agent
                        .cancel_online_rebuild(&volume.id, &target, &engine_target)
                        .await
                {
                    tracing::warn!(volume = %volume.id, replica = %target.id, error = %c, "cannot drop a failed online rebuild's target");
                }
                if remote
                    && let Err(c) = match self.cluster.agent(&target.node_id) {
                        Ok(a) => a.release_replica(&target).await,
                        Err(e) => Err(e),
                    }
                {
                    tracing::warn!(volume = %volume.id, replica = %target.id, error = %c, "cannot stop exporting a failed online rebuild's target");
                }
                if still_wo {
                    self.set_mode(
                        volume,
                        &target.id,
                        ReplicaMode::Err,
                        &format!("{FAILED_REBUILD} {} (online) failed: {e}", source.id),
                        |_| {},
                    )?;
                }
                Err(e)
            }
        };
        self.rebuild_finished(volume, "online", &target, &result);
        result
    }

    /// Follows the engine's rebuild of `target` until it is complete and in place (Ok), or
    /// failed, lost, or no longer wanted (Err, why).
    async fn follow(
        &self,
        volume: &Volume,
        target: &Replica,
        engine_target: &ReplicaTarget,
        node: &str,
        agent: &dyn crate::agent::Agent,
        finish_ms: &mut u128,
    ) -> Result<()> {
        let mut last = (u64::MAX, u64::MAX);
        let mut wait = POLL_FIRST;
        let began = std::time::Instant::now();
        loop {
            tokio::time::sleep(wait).await;
            wait = (wait * 5 / 4).min(POLL);
            let now: Volume = self.must_get(&volume.id)?;
            if now.publication.as_ref().map(|p| p.node_id.as_str()) != Some(node) {
                return Err(Error::FailedPrecondition(format!(
                    "volume {:?} was detached during the online rebuild of replica {}; it is \
                     rebuilt offline",
                    volume.spec.name, target.id
                )));
            }
            let mode = now
                .replicas
                .iter()
                .find(|r| r.id == target.id)
                .map(|r| (r.health.mode, r.health.mode_reason.clone()));
            if mode.as_ref().map(|m| m.0) != Some(ReplicaMode::Wo) {
                return Err(Error::FailedPrecondition(format!(
                    "replica {} left wo during its online rebuild ({})",
                    target.id,
                    mode.map(|m| format!("{}: {}", m.0, m.1))
                        .unwrap_or_else(|| "removed".into())
                )));
            }
            let s = agent
                .online_rebuild_status(&volume.id, target, engine_target)
                .await?;
            match s.state.as_str() {
                "complete" | "promoted" => {
                    let started = std::time::Instant::now();
                    agent
                        .finish_online_rebuild(&volume.id, target, engine_target)
                        .await?;
                    *finish_ms = started.elapsed().as_millis();
                    return Ok(());
                }
                "copying" | "verifying" => {
                    // Near the end of the copy, ask again about when it should be done: the
                    // copied fraction so far tells (the fsync and the verification of written
                    // chunks after it are short; the growth from POLL_FIRST covers them).
                    if s.state == "copying" && s.total_bytes > 0 {
                        let left = s.total_bytes.saturating_sub(s.done_bytes);
                        if left == 0 {
                            wait = POLL_FIRST;
                        } else if s.done_bytes > 0 {
                            let eta = began.elapsed().mul_f64(left as f64 / s.done_bytes as f64);
                            wait = wait.min(eta.max(POLL_FIRST));
                        }
                    } else if s.state == "verifying" && last.0 < last.1 / 2 {
                        wait = POLL_FIRST;
                    }
                    // The copy is the first half of the progress, the verification the second.
                    let done = if s.state == "verifying" {
                        s.total_bytes + s.done_bytes
                    } else {
                        s.done_bytes
                    };
                    let total = 2 * s.total_bytes;
                    if (done, total) != last {
                        last = (done, total);
                        self.note_progress(&volume.id, &target.id, done, total);
                    }
                }
                "failed" => {
                    return Err(Error::Internal(format!(
                        "the mirror engine's online rebuild of replica {} failed: {}",
                        target.id,
                        s.error.unwrap_or_default()
                    )));
                }
                _ => {
                    return Err(Error::Unavailable(format!(
                        "the mirror engine serving volume {:?} no longer has the rebuild target \
                         of replica {} (it was restarted); the rebuild starts over",
                        volume.spec.name, target.id
                    )));
                }
            }
        }
    }

    /// Records a rebuild's progress when the volume's guard is free (else at the next poll).
    fn note_progress(&self, volume_id: &str, replica: &str, done: u64, total: u64) {
        let Ok(_guard) = self.guards.try_take(volume_id, "volume") else {
            return;
        };
        let Ok(mut v) = self.must_get(volume_id) else {
            return;
        };
        let Some(r) = v
            .replicas
            .iter_mut()
            .find(|r| r.id == replica && r.health.mode == ReplicaMode::Wo)
        else {
            return;
        };
        if let Some(p) = r.health.rebuild.as_mut() {
            p.done_bytes = done;
            p.total_bytes = total;
        }
        if let Err(e) = self.store.put(Kind::Volume, volume_id, &v) {
            tracing::debug!(volume = %volume_id, error = %e, "cannot record a rebuild's progress");
        }
    }
}
