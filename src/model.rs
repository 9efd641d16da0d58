//! The records bicsi keeps: volumes with their replicas and attachments, and what a node has
//! staged and published. Plain data with serde; no I/O and no protocol types (the CSI adapter
//! converts from and to these).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How a volume is presented to a workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AccessType {
    /// A filesystem mounted at the target path.
    Mount {
        fs_type: String,
        mount_flags: Vec<String>,
    },
    /// The raw block device bind-mounted onto the target file.
    Block,
}

/// CSI access modes. bicsi volumes attach to one node at a time, so only the single-node modes
/// are supported; the others are kept so they can be named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    Unknown,
}

impl AccessMode {
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeWriter
                | AccessMode::SingleNodeReaderOnly
                | AccessMode::SingleNodeSingleWriter
                | AccessMode::SingleNodeMultiWriter
        )
    }

    pub fn is_read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capability {
    pub access: AccessType,
    pub mode: AccessMode,
}

impl Capability {
    pub fn is_block(&self) -> bool {
        matches!(self.access, AccessType::Block)
    }

    /// Capabilities are "the same" for idempotency when access type, filesystem and mode match;
    /// an empty fs type means "the default" and matches the default.
    pub fn same_as(&self, other: &Capability) -> bool {
        self.mode == other.mode
            && match (&self.access, &other.access) {
                (AccessType::Block, AccessType::Block) => true,
                (
                    AccessType::Mount {
                        fs_type: a,
                        mount_flags: fa,
                    },
                    AccessType::Mount {
                        fs_type: b,
                        mount_flags: fb,
                    },
                ) => (a == b || a.is_empty() || b.is_empty()) && fa == fb,
                _ => false,
            }
    }
}

/// What serves a volume's replicas as a block device (see `crate::volume_engine` for how it is
/// chosen): `qemu`, qemu-storage-daemon over qcow2 replicas (several replicas, remote ones),
/// exported over FUSE with a loop device on the export; `loop`, one raw replica file with a loop
/// device straight on it and no engine process; `mirror`, several raw replicas (files on the
/// attaching node, NBD exports of the others) served by bicsi's own engine process over FUSE
/// (`crate::mirror`), a loop device on its file.
/// Records written before engines could be chosen read as `qemu`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Loop,
    #[default]
    Qemu,
    Mirror,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Loop => "loop",
            EngineKind::Qemu => "qemu",
            EngineKind::Mirror => "mirror",
        }
    }

    /// The format of this engine's replica files.
    pub fn replica_format(self) -> crate::os::ImageFormat {
        match self {
            EngineKind::Loop | EngineKind::Mirror => crate::os::ImageFormat::Raw,
            EngineKind::Qemu => crate::os::ImageFormat::Qcow2,
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One copy of a volume's data: a qcow2 file on a disk, or a raw file for the loop engine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Replica {
    pub id: String,
    pub node_id: String,
    pub disk_id: String,
    /// The replica's file, `<disk>/replicas/<volume>-<id>/volume.qcow2` (or `volume.raw`).
    pub path: PathBuf,
    /// The file's format: raw for a loop engine's replica, qcow2 otherwise (and for records
    /// written before replicas had a format).
    #[serde(default = "crate::os::ImageFormat::qcow2")]
    pub format: crate::os::ImageFormat,
    /// The cluster size of a copy-on-write replica (`format: cow`, `crate::mirror::cow`), in
    /// bytes; absent for the other formats (and in records written before the layout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_bytes: Option<u32>,
    /// Not created yet: its disk had no file of the volume's backing image when the volume was
    /// created, so the overlay is made at first attach, once the file is there.
    #[serde(default)]
    pub deferred: bool,
    /// Mode (rw, wo, err), since when and why (`crate::health`); flattened, so the record reads
    /// `mode`, `modeSince`, `modeReason`; records without them read as rw.
    #[serde(flatten)]
    pub health: crate::health::ReplicaHealth,
}

/// A volume attached (ControllerPublished) to a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Publication {
    pub node_id: String,
    pub capability: Capability,
    pub read_only: bool,
    /// How the attaching node's engine reaches each replica (local file or NBD export).
    #[serde(default)]
    pub targets: Vec<crate::os::ReplicaTarget>,
}

/// What a user asked for when creating the volume (desired state).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSpec {
    pub name: String,
    pub capacity_bytes: u64,
    pub number_of_replicas: u32,
    pub stale_replica_timeout_minutes: Option<u32>,
    pub fs_type: Option<String>,
    pub backing_image: Option<String>,
    /// The parameters exactly as given, compared on a repeated CreateVolume.
    pub parameters: BTreeMap<String, String>,
    pub capabilities: Vec<Capability>,
    /// What the volume was made from, compared on a repeated CreateVolume: the same name with
    /// another source is another volume (AlreadyExists). None: an empty volume, or a volume
    /// recorded by a version that did not keep its source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeSource>,
    /// The engine that serves the volume, chosen at creation.
    #[serde(default)]
    pub engine: EngineKind,
    /// The PersistentVolumeClaim it was made for (the `csi.storage.k8s.io/pvc/*` parameters of
    /// CreateVolume), where its Kubernetes Events go (`crate::events`); not compared on a
    /// repeated CreateVolume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<ClaimRef>,
}

/// A PersistentVolumeClaim, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRef {
    pub namespace: String,
    pub name: String,
}

/// CreateVolume's content source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum VolumeSource {
    Snapshot { id: String },
    Volume { id: String },
}

impl std::fmt::Display for VolumeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VolumeSource::Snapshot { id } => write!(f, "snapshot {id:?}"),
            VolumeSource::Volume { id } => write!(f, "volume {id:?}"),
        }
    }
}

/// A volume: its spec and what exists for it (observed state).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub id: String,
    pub spec: VolumeSpec,
    pub replicas: Vec<Replica>,
    pub publication: Option<Publication>,
    pub created_at: String,
    /// Set (unix seconds) when an engine starts for the volume and cleared by a clean detach:
    /// found set at the next engine start, the previous one ended uncleanly and the replicas are
    /// compared before use (`crate::health`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_epoch: Option<u64>,
    /// Why the volume is faulted although it has rw replicas (they differ after an unclean end
    /// and no record says which one missed writes); cleared by `bicsi volume rebuild --from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
}

impl Volume {
    /// A copy-on-write replica of the volume, if it has one (what bicsi does not do with such
    /// replicas yet is refused naming it: `crate::replica_file::cow_refused`).
    pub fn cow_replica(&self) -> Option<&Replica> {
        self.replicas
            .iter()
            .find(|r| r.format == crate::os::ImageFormat::Cow)
    }

    /// Fewer replicas than asked for: the volume works but has less redundancy.
    pub fn is_degraded(&self) -> bool {
        (self.replicas.len() as u32) < self.spec.number_of_replicas
    }
}

/// A published target path of a staged volume on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePublication {
    pub target_path: PathBuf,
    pub capability: Capability,
    pub read_only: bool,
}

/// What this node has set up for a volume: the engine, the loop device, the staging mount and the
/// published targets. Kept so a restart of bicsi re-adopts them instead of starting over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeVolume {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub capability: Capability,
    pub engine_dir: PathBuf,
    pub device: PathBuf,
    /// The local replica files among the engine's children.
    pub replicas: Vec<PathBuf>,
    /// Every child of the engine, local and remote.
    #[serde(default)]
    pub targets: Vec<crate::os::ReplicaTarget>,
    pub publications: Vec<NodePublication>,
    /// What actually serves this attach: `loop` when the loop device sits straight on the
    /// local raw replica (`replicas[0]`; no engine runs), `qemu` otherwise (also for a loop
    /// volume whose replica is on another node, reached over NBD).
    #[serde(default)]
    pub engine: EngineKind,
}

/// A disk of a node: a directory that holds replicas (and, later, backing image files).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    pub id: String,
    pub node_id: String,
    pub path: PathBuf,
}

/// A node as the controller knows it: where its agent and its file transfers are, its disks, and
/// whether it is up (sending heartbeats).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub node_id: String,
    /// The node's Agent gRPC service (split mode); empty for the all-in-one process.
    #[serde(default)]
    pub agent_url: String,
    /// Base URL other nodes fetch this node's backing image files from.
    #[serde(default)]
    pub transfer_url: String,
    pub disks: Vec<Disk>,
    pub up: bool,
    pub last_heartbeat: String,
    /// How many volumes may be published to this node at once (`--max-volumes-per-node`);
    /// 0: no limit. Records written before the limit existed read as 0.
    #[serde(default)]
    pub max_volumes_per_node: u64,
}

/// Current time as RFC 3339 (UTC, seconds), for records people read.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic
/// Gregorian), so we need no date crate for one timestamp format.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Parses what [`rfc3339`] writes back into seconds since the epoch.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // days-from-civil, the inverse of the computation in `rfc3339`.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// Seconds since the epoch, now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_formats() {
        for secs in [0, 951_782_400, 1_795_766_903, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&rfc3339(secs)), Some(secs));
        }
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn formats_timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_766_903), "2026-11-27T08:08:23Z");
    }

    #[test]
    fn capability_sameness() {
        let m = |fs: &str| Capability {
            access: AccessType::Mount {
                fs_type: fs.into(),
                mount_flags: vec![],
            },
            mode: AccessMode::SingleNodeWriter,
        };
        let b = Capability {
            access: AccessType::Block,
            mode: AccessMode::SingleNodeWriter,
        };
        assert!(m("ext4").same_as(&m("ext4")));
        assert!(m("").same_as(&m("ext4")));
        assert!(!m("xfs").same_as(&m("ext4")));
        assert!(!m("ext4").same_as(&b));
        assert!(b.same_as(&b));
    }
}
