//! Replica modes and volume health: the one place that says which replica may be read, how a
//! replica's mode may change, and what a volume's health is. Pure rules over the records in
//! `model`; no I/O, no engine, no store. The node marks replicas (`os::engine::events`, the
//! attach checks in `node`), `rebuild` brings them back; both change modes only through
//! [`transition`].
//!
//! ```text
//!               write failed / connection dropped / found behind / disk gone
//!        ┌──── rw ─────────────────────────────────────────────────────┐
//!        │     ▲                                                         ▼
//!        │     │ rebuild verified (qemu-img compare, or the mirror      err ◄──┐
//!        │     │ engine's own verification when rebuilt online)          │     │
//!        │     │                                                         │     │ copy failed,
//!        │     └──────────────────── wo ◄────────────────────────────────┘     │ killed, or
//!        │                           │          rebuild starts                 │ a write failed
//!        │                           └─────────────────────────────────────────┘
//!        └─ a replica is created rw only with its volume (all replicas equal);
//!           a replacement is created err and takes the rebuild path.
//! ```
//!
//! Legal moves: rw→err, err→wo, wo→rw, wo→err; staying in a mode is a no-op that keeps the
//! first reason (the one a person needs). Everything else (rw→wo, err→rw, wo→… skipping the
//! verification) is refused: a replica that missed writes can become readable again only by a
//! rebuild that completed and was verified.
//!
//! Health: `healthy` when every wanted replica exists and is rw; `degraded` when at least one rw
//! replica remains but some are err/wo or missing; `faulted` when no replica is rw, or when the
//! volume carries a fault (its rw replicas were found different after an unclean end and no
//! record says which one missed writes).
//!
//! # Why no stale read is possible
//! A read is served only by an engine whose children are the volume's rw replicas at its start
//! (the node builds the engine from them, never from err/wo ones). A replica stops being read:
//! - when a write to it fails while the engine runs: qemu's quorum emits `QUORUM_REPORT_BAD`
//!   (type write, naming the child) before the write is acknowledged; the engine writes it to its
//!   own event file (a QMP monitor on a file, so no listener needs to be connected and a crash of
//!   bicsi loses nothing); the node agent reads it, records the fault durably (an fsync'ed fault
//!   file in the run directory), drops the child from the quorum (`x-blockdev-change`), and marks
//!   the replica err in the volume record. Between the failed write and the drop (up to the
//!   watcher's 0.5 s interval plus a QMP round trip), a read of that very range is served by the
//!   failed child if it is the first in read order (measured: it returns the old bytes; see
//!   `os::engine::events`). This window is the one stale read left; closing it needs qemu to
//!   stop reading a child that failed a write, which quorum 10.0 does not do.
//! - when a remote child's node stalls: a probe finds its server silent for `replica-timeout`
//!   seconds, its connections are cut and it is marked err like a failed write;
//! - when an NBD child dropped its connection or reported failures (`volume_status`), checked
//!   periodically and at detach;
//! - when the node (bicsi and qemu) died before any of that was recorded: the volume record
//!   carries an attach epoch from engine start to clean detach. The next engine start finds it
//!   set and, before starting, applies the fault records the run directory kept, then compares the
//!   remaining rw replicas at rest (`qemu-img compare`). Identical: no acknowledged write is
//!   missing from any of them. Different with no record saying which missed writes: the volume is
//!   faulted and the attach refused; `bicsi volume rebuild NAME --from REPLICA` lets a person
//!   choose. "Identical" is the proof needed, not a guess: every byte a read can return is the
//!   same in each of them, so whichever replica missed a write, reading it returns what the
//!   others return (a missed write that did not change any byte changed nothing to read). The
//!   comparison runs before the engine starts, so nothing reads a replica in between.
//! - an online rebuild (mirror engine, `crate::controller::rebuild::online`): the engine never
//!   reads its target while it is filled or verified, reads it only after `promote` (filled,
//!   verified identical, renamed into place), and the record makes it rw only after that; a
//!   fault recorded for the replica before its rebuild began (the engine's fault file lives as
//!   long as the engine) is not applied to the rebuilt replica, one recorded after is.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use crate::model::{RebuildProgress, ReplicaHealth, ReplicaMode};
use crate::model::{Replica, Volume};

/// Whether `from → to` is a legal move (staying is not a move).
pub fn legal(from: ReplicaMode, to: ReplicaMode) -> bool {
    use ReplicaMode::*;
    matches!((from, to), (Rw, Err) | (Err, Wo) | (Wo, Rw) | (Wo, Err))
}

/// Moves `replica` to `to` for `reason` at `now`. Ok(true) when the mode changed, Ok(false) when it
/// was in `to` already (the first reason is kept); FailedPrecondition for an illegal move.
pub fn transition(replica: &mut Replica, to: ReplicaMode, reason: &str, now: u64) -> Result<bool> {
    let from = replica.health.mode;
    if from == to {
        return Ok(false);
    }
    if !legal(from, to) {
        return Err(Error::FailedPrecondition(format!(
            "replica {}: cannot go from {from} to {to} ({reason}); a replica becomes rw only \
             through a verified rebuild (err → wo → rw)",
            replica.id
        )));
    }
    replica.health.mode = to;
    replica.health.mode_since = now;
    replica.health.mode_reason = reason.to_string();
    if to != ReplicaMode::Wo {
        replica.health.rebuild = None;
    }
    Ok(true)
}

/// Marks the replica `id` of `volume` err; Ok(true) when it changed. A wo replica (being rebuilt)
/// also goes to err; an unknown id is NotFound.
pub fn mark_err(volume: &mut Volume, id: &str, reason: &str, now: u64) -> Result<bool> {
    let r = volume
        .replicas
        .iter_mut()
        .find(|r| r.id == id)
        .ok_or_else(|| {
            Error::NotFound(format!(
                "volume {:?} has no replica {id:?}",
                volume.spec.name
            ))
        })?;
    transition(r, ReplicaMode::Err, reason, now)
}

/// A volume's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeHealth {
    Healthy,
    Degraded,
    Faulted,
}

impl VolumeHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeHealth::Healthy => "healthy",
            VolumeHealth::Degraded => "degraded",
            VolumeHealth::Faulted => "faulted",
        }
    }
}

impl std::fmt::Display for VolumeHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The one derivation of a volume's health from its record, with the reason (empty when
/// healthy).
pub fn volume_health(v: &Volume) -> (VolumeHealth, String) {
    let describe = |r: &Replica| {
        let mut s = format!(
            "replica {} on disk {} is {}",
            r.id, r.disk_id, r.health.mode
        );
        if !r.health.mode_reason.is_empty() {
            s.push_str(&format!(" ({})", r.health.mode_reason));
        }
        if let Some(p) = &r.health.rebuild {
            s.push_str(&format!(", rebuilt from {} {}%", p.source, p.percent()));
        }
        s
    };
    let others: Vec<String> = v
        .replicas
        .iter()
        .filter(|r| r.health.mode != ReplicaMode::Rw)
        .map(describe)
        .collect();
    if let Some(fault) = &v.fault {
        return (VolumeHealth::Faulted, fault.clone());
    }
    let rw = v
        .replicas
        .iter()
        .filter(|r| r.health.mode == ReplicaMode::Rw)
        .count();
    if rw == 0 {
        let mut why = "no replica holds every acknowledged write".to_string();
        if !others.is_empty() {
            why.push_str(&format!(": {}", others.join("; ")));
        }
        return (VolumeHealth::Faulted, why);
    }
    let mut reasons = others;
    if (v.replicas.len() as u32) < v.spec.number_of_replicas {
        reasons.push(format!(
            "{} of {} replicas placed",
            v.replicas.len(),
            v.spec.number_of_replicas
        ));
    }
    if reasons.is_empty() {
        (VolumeHealth::Healthy, String::new())
    } else {
        (VolumeHealth::Degraded, reasons.join("; "))
    }
}

/// The replicas an engine may be built from: the rw ones.
pub fn readable(v: &Volume) -> impl Iterator<Item = &Replica> {
    v.replicas
        .iter()
        .filter(|r| r.health.mode == ReplicaMode::Rw)
}

/// The refusal of an attach of a faulted volume, naming the replicas and the fix.
pub fn faulted(volume: &Volume, why: &str) -> Error {
    let replicas = volume
        .replicas
        .iter()
        .map(|r| {
            format!(
                "{} on node {} disk {} ({}{})",
                r.id,
                r.node_id,
                r.disk_id,
                r.health.mode,
                if r.health.mode_reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", r.health.mode_reason)
                }
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Error::FailedPrecondition(format!(
        "volume {:?} is faulted: {why}; replicas: {replicas}; choose the replica that holds the \
         data with `bicsi volume rebuild {} --from REPLICA` (the others are rebuilt from it), or \
         restore the volume from a snapshot or backup",
        volume.spec.name, volume.spec.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VolumeSpec;
    use ReplicaMode::*;

    fn replica(id: &str, mode: ReplicaMode) -> Replica {
        Replica {
            id: id.into(),
            node_id: "n1".into(),
            disk_id: format!("d-{id}"),
            path: format!("/d/{id}/volume.qcow2").into(),
            format: crate::os::ImageFormat::Qcow2,
            deferred: false,
            cluster_bytes: None,
            health: ReplicaHealth {
                mode,
                ..Default::default()
            },
        }
    }

    fn volume(modes: &[ReplicaMode], wanted: u32) -> Volume {
        Volume {
            id: "v".into(),
            spec: VolumeSpec {
                name: "v".into(),
                capacity_bytes: 1 << 20,
                number_of_replicas: wanted,
                stale_replica_timeout_minutes: None,
                fs_type: None,
                backing_image: None,
                parameters: Default::default(),
                capabilities: vec![],
                source: None,
                engine: Default::default(),
                claim: None,
            },
            replicas: modes
                .iter()
                .enumerate()
                .map(|(i, m)| replica(&format!("r{i}"), *m))
                .collect(),
            publication: None,
            created_at: String::new(),
            attach_epoch: None,
            fault: None,
        }
    }

    #[test]
    fn transitions_table() {
        let table = [
            (Rw, Err, true),
            (Err, Wo, true),
            (Wo, Rw, true),
            (Wo, Err, true),
            (Rw, Wo, false),
            (Err, Rw, false),
        ];
        for (from, to, ok) in table {
            assert_eq!(legal(from, to), ok, "{from} → {to}");
            let mut r = replica("r", from);
            let got = transition(&mut r, to, "why", 7);
            assert_eq!(got.is_ok(), ok, "{from} → {to}: {got:?}");
            assert_eq!(r.health.mode, if ok { to } else { from });
            if ok {
                assert_eq!(
                    (r.health.mode_since, r.health.mode_reason.as_str()),
                    (7, "why")
                );
            } else {
                assert!(got.unwrap_err().to_string().contains("verified rebuild"));
            }
        }
    }

    #[test]
    fn staying_keeps_the_first_reason() {
        let mut r = replica("r", Rw);
        assert!(transition(&mut r, Err, "disk full", 1).unwrap());
        assert!(!transition(&mut r, Err, "later", 2).unwrap());
        assert_eq!(
            (r.health.mode_since, r.health.mode_reason.as_str()),
            (1, "disk full")
        );
    }

    #[test]
    fn health_is_derived_from_the_modes() {
        let table: [(&[ReplicaMode], u32, VolumeHealth); 7] = [
            (&[Rw, Rw], 2, VolumeHealth::Healthy),
            (&[Rw], 1, VolumeHealth::Healthy),
            (&[Rw, Err], 2, VolumeHealth::Degraded),
            (&[Rw, Wo], 2, VolumeHealth::Degraded),
            (&[Rw], 2, VolumeHealth::Degraded),
            (&[Err], 1, VolumeHealth::Faulted),
            (&[Wo, Err], 2, VolumeHealth::Faulted),
        ];
        for (modes, wanted, want) in table {
            let (got, why) = volume_health(&volume(modes, wanted));
            assert_eq!(got, want, "{modes:?}: {why}");
            assert_eq!(why.is_empty(), want == VolumeHealth::Healthy, "{why}");
        }
        let mut v = volume(&[Rw, Rw], 2);
        v.fault = Some("replicas r0 and r1 differ".into());
        assert_eq!(volume_health(&v).0, VolumeHealth::Faulted);
    }

    #[test]
    fn old_records_read_as_rw() {
        let json = r#"{"id":"r","nodeId":"n","diskId":"d","path":"/p"}"#;
        let r: Replica = serde_json::from_str(json).unwrap();
        assert_eq!(r.health.mode, Rw);
        let mut v = volume(&[Rw], 1);
        mark_err(&mut v, "r0", "gone", 3).unwrap();
        let text = serde_json::to_string(&v.replicas[0]).unwrap();
        assert!(text.contains(r#""mode":"err""#), "{text}");
        assert!(text.contains(r#""modeSince":3"#), "{text}");
        assert!(text.contains(r#""modeReason":"gone""#), "{text}");
    }
}
