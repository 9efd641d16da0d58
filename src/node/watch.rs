//! The node's side of replica health: turning what a volume's engine reports (child failures in
//! its event file, NBD reconnects and failures in its trace) into fault records and err modes,
//! taking a failed child out of the live quorum, and the checks before an engine starts (the
//! faults a dead engine left, the attach epoch, the comparison of the replicas after an unclean
//! end). The rules of modes and health are `crate::health`'s; this module applies them to the
//! volume records and must not start, stop or rebuild anything.
//!
//! Record writes race with the controller's (both read, change and put the volume record): the
//! marks happen while the volume is attached, when the controller does not write it, and at
//! stage/unstage under the node's volume guard.

use std::path::Path;

use crate::error::{Error, Result};
use crate::health::{self, ReplicaMode, faulted};
use crate::model::{Volume, now_secs};
use crate::os::engine::events::{self, FaultRecord};
use crate::os::{Os, ReplicaTarget};
use crate::store::{Kind, Store, StoreExt};

/// How often the node looks at its engines' reports.
pub const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// How often the remote replicas of attached volumes are probed for a stalled node.
pub const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The replica of `volume` an engine child is.
pub fn replica_id_of(volume: &Volume, target: &ReplicaTarget) -> Option<String> {
    volume
        .replicas
        .iter()
        .find(|r| match target {
            ReplicaTarget::Local(p) => r.path == *p,
            ReplicaTarget::Nbd { export, .. } => r.id == *export,
        })
        .map(|r| r.id.clone())
}

/// The NBD children of the live engine in `run_dir` (not in `skip`) whose server does not greet
/// a new connection within `timeout`: a stalled node. Their connections are cut, so the engine's
/// requests to them fail now and its writes go on with the other children.
fn hung_children(
    os: &Os,
    run_dir: &Path,
    skip: &[FaultRecord],
    timeout: std::time::Duration,
) -> Result<Vec<FaultRecord>> {
    let Some(vs) = os.engine.volume_status(run_dir)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for t in vs.replicas {
        let ReplicaTarget::Nbd { host, port, .. } = &t else {
            continue;
        };
        if skip.iter().any(|f| f.target == t) || events::nbd_answers(host, *port, timeout) {
            continue;
        }
        if let Err(e) = events::cut_connections(host, *port) {
            tracing::warn!(replica = %t, error = %e, "cannot cut the connections to a stalled replica server");
        }
        out.push(FaultRecord {
            reason: format!(
                "its replica server {host}:{port} did not answer within {timeout:?} (a stalled \
                 node); its connections were cut"
            ),
            target: t,
            at: now_secs(),
        });
    }
    Ok(out)
}

/// What the engine in `run_dir` reports now: failed children, and with a live engine the NBD
/// children that reconnected or (when qemu does not say which) every NBD child after failures.
fn reported(os: &Os, run_dir: &Path) -> Result<Vec<FaultRecord>> {
    let mut out: Vec<FaultRecord> = Vec::new();
    fn add(out: &mut Vec<FaultRecord>, target: ReplicaTarget, reason: String, at: u64) {
        if !out.iter().any(|f| f.target == target) {
            out.push(FaultRecord { target, reason, at });
        }
    }
    let now = now_secs();
    for f in events::child_faults(run_dir) {
        if f.request_failed {
            continue;
        }
        // A refused write-zeroes is followed by the quorum's failure event, which qemu may
        // delay by up to a second (throttling): decide on it once that has passed.
        if f.error.contains("not supported") && now < f.at + 2 {
            continue;
        }
        if matches!(f.operation.as_str(), "write" | "flush") {
            add(
                &mut out,
                f.target.clone(),
                format!("a {} failed: {}", f.operation, f.error),
                f.at,
            );
        } else {
            tracing::warn!(run_dir = %run_dir.display(), child = %f.target, operation = %f.operation, error = %f.error, "an engine child failed a read; the engine read another child");
        }
    }
    if let Some(vs) = os.engine.volume_status(run_dir)? {
        for t in vs.reconnected {
            add(
                &mut out,
                t,
                "its NBD connection dropped and qemu reconnected it; it missed the writes made \
                 meanwhile"
                    .into(),
                now,
            );
        }
        let named = vs
            .replicas
            .iter()
            .any(|t| matches!(t, ReplicaTarget::Nbd { .. }) && out.iter().any(|f| f.target == *t));
        if vs.remote_errors > 0 && !named {
            for t in vs
                .replicas
                .iter()
                .filter(|t| matches!(t, ReplicaTarget::Nbd { .. }))
            {
                add(
                    &mut out,
                    t.clone(),
                    format!(
                        "qemu's NBD client logged {} failure(s) without naming the replica; \
                         every remote replica may have missed writes",
                        vs.remote_errors
                    ),
                    now,
                );
            }
        }
    }
    Ok(out)
}

/// Records what the engine in `run_dir` reports (fsync'ed fault file), drops failed children from
/// its live quorum (never the last healthy one), and marks their replicas err in the volume
/// record. Returns the replicas newly marked. Idempotent.
/// `probe`: also look for stalled NBD children, waiting at most this long for each.
pub fn apply_faults(
    os: &Os,
    volumes: &dyn Store,
    volume_id: &str,
    run_dir: &Path,
    probe: Option<std::time::Duration>,
) -> Result<Vec<String>> {
    apply_faults_locked(os, volumes, volume_id, run_dir, probe, || Ok(()))
}

/// `apply_faults` for a caller that does not hold the volume's guard (the periodic watch):
/// everything but the record write runs without it, and `lock` is called only when the record
/// must change (an error there leaves the marking to the next round; the faults are recorded).
pub fn apply_faults_locked<G>(
    os: &Os,
    volumes: &dyn Store,
    volume_id: &str,
    run_dir: &Path,
    probe: Option<std::time::Duration>,
    lock: impl FnOnce() -> Result<G>,
) -> Result<Vec<String>> {
    if !run_dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut recorded = events::read_faults(run_dir);
    let mut found = reported(os, run_dir)?;
    if let Some(timeout) = probe {
        let known: Vec<FaultRecord> = recorded.iter().chain(&found).cloned().collect();
        found.extend(hung_children(os, run_dir, &known, timeout)?);
    }
    for f in found {
        if !recorded.iter().any(|r| r.target == f.target) {
            events::record_fault(run_dir, &f)?;
            tracing::warn!(volume = %volume_id, replica = %f.target, reason = %f.reason, "a replica missed writes; recorded");
            recorded.push(f);
        }
    }
    if recorded.is_empty() {
        return Ok(Vec::new());
    }
    // Out of the live quorum first: from now on nothing reads the failed child. (The mirror
    // engine drops a replica itself before it records the fault.)
    if let Some(state) = os.engine.status(run_dir)?
        && !crate::os::engine::mirror::serving(run_dir)
    {
        let children = events::children(run_dir);
        let healthy = children
            .iter()
            .filter(|c| !recorded.iter().any(|f| f.target == **c))
            .count();
        if healthy > 0 {
            for f in &recorded {
                if let Some(index) = children.iter().position(|c| *c == f.target) {
                    let local = matches!(f.target, ReplicaTarget::Local(_));
                    if let Err(e) = events::drop_child(&state.qmp_socket, index, local) {
                        tracing::warn!(volume = %volume_id, replica = %f.target, error = %e, "cannot take a failed replica out of the engine; retrying");
                    }
                }
            }
        }
    }
    let mark = |volume: &mut Volume| -> Result<Vec<String>> {
        let mut marked = Vec::new();
        for f in &recorded {
            let Some(id) = replica_id_of(volume, &f.target) else {
                continue;
            };
            // A fault older than the replica's wo or rw mode came before its online rebuild
            // started (the engine's fault file lives as long as the engine): that rebuild
            // began from err after it, so the fault is not about the rebuilt file.
            if volume.replicas.iter().any(|r| {
                r.id == id && r.health.mode != ReplicaMode::Err && f.at < r.health.mode_since
            }) {
                continue;
            }
            let reason = format!(
                "{}; recorded in {}",
                f.reason,
                events::faults_path(run_dir).display()
            );
            if health::mark_err(volume, &id, &reason, f.at.max(1))? {
                marked.push(id);
            }
        }
        Ok(marked)
    };
    let Some(mut volume) = volumes.get::<Volume>(Kind::Volume, volume_id)? else {
        return Ok(Vec::new());
    };
    if mark(&mut volume)?.is_empty() {
        return Ok(Vec::new());
    }
    // Read again under the lock, so the write does not undo another one.
    let Ok(_lock) = lock() else {
        return Ok(Vec::new());
    };
    let Some(mut volume) = volumes.get::<Volume>(Kind::Volume, volume_id)? else {
        return Ok(Vec::new());
    };
    let marked = mark(&mut volume)?;
    if !marked.is_empty() {
        volumes.put(Kind::Volume, volume_id, &volume)?;
        let (h, why) = health::volume_health(&volume);
        tracing::warn!(volume = %volume_id, replicas = ?marked, health = %h, %why, "replicas marked err");
    }
    Ok(marked)
}

/// Before an engine starts for `volume_id` in `run_dir` with `targets`: the faults a dead engine
/// left there are applied (and then forgotten), the targets whose replica is not rw are left
/// out, and after an unclean end (attach epoch set) the remaining ones are compared. Returns the
/// targets to start with, having set the attach epoch. A live engine is returned as it is.
pub fn before_engine_start(
    os: &Os,
    volumes: &dyn Store,
    volume_id: &str,
    run_dir: &Path,
    targets: Vec<ReplicaTarget>,
) -> Result<Vec<ReplicaTarget>> {
    if os.engine.status(run_dir)?.is_some() {
        return Ok(targets);
    }
    apply_faults(os, volumes, volume_id, run_dir, None)?;
    events::clear_faults(run_dir)?;
    let mut volume: Volume = volumes
        .get(Kind::Volume, volume_id)?
        .ok_or_else(|| Error::NotFound(format!("volume {volume_id:?} not found")))?;
    if let Some(fault) = &volume.fault {
        return Err(faulted(&volume, fault));
    }
    let (readable, left_out): (Vec<ReplicaTarget>, Vec<ReplicaTarget>) =
        targets.into_iter().partition(|t| {
            replica_id_of(&volume, t).is_some_and(|id| {
                volume
                    .replicas
                    .iter()
                    .any(|r| r.id == id && r.health.mode == ReplicaMode::Rw)
            })
        });
    for t in &left_out {
        tracing::warn!(volume = %volume_id, replica = %t, "not serving a replica that is not rw");
    }
    if readable.is_empty() {
        let (_, why) = health::volume_health(&volume);
        return Err(faulted(&volume, &why));
    }
    if volume.attach_epoch.is_some() && readable.len() >= 2 {
        let first = &readable[0];
        let mut differ = Vec::new();
        for other in &readable[1..] {
            // Both kinds of replica server require TLS when the node has a --tls-dir.
            let tls = os.engine.nbd_tls();
            if !crate::os::compare::identical(first, other, tls.as_deref())? {
                differ.push(other.clone());
            }
        }
        if !differ.is_empty() {
            let names = |ts: &[ReplicaTarget]| {
                ts.iter()
                    .map(|t| {
                        let id = replica_id_of(&volume, t).unwrap_or_default();
                        format!("{id} ({t})")
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let fault = format!(
                "the last attach ended uncleanly (attach epoch {}) and replica {} differs from {} \
                 with no fault record saying which one missed writes",
                volume.attach_epoch.unwrap_or_default(),
                names(std::slice::from_ref(first)),
                names(&differ)
            );
            volume.fault = Some(fault.clone());
            volumes.put(Kind::Volume, volume_id, &volume)?;
            return Err(faulted(&volume, &fault));
        }
        tracing::info!(volume = %volume_id, replicas = readable.len(), "the last attach ended uncleanly; the replicas were compared and are identical");
    }
    volume.attach_epoch = Some(now_secs());
    volumes.put(Kind::Volume, volume_id, &volume)?;
    Ok(readable)
}

/// After a clean end of the engine (flushed and stopped): the attach epoch goes.
pub fn after_clean_stop(volumes: &dyn Store, volume_id: &str) -> Result<()> {
    if let Some(mut volume) = volumes.get::<Volume>(Kind::Volume, volume_id)?
        && volume.attach_epoch.is_some()
    {
        volume.attach_epoch = None;
        volumes.put(Kind::Volume, volume_id, &volume)?;
    }
    Ok(())
}
