//! The records bicsi keeps: volumes with their replicas and attachments, and what a node has
//! staged and published. Plain data with serde; no I/O and no protocol types (the CSI adapter
//! converts from and to these).
//!
//! It is the bottom floor the OS seams and the domain share, so it also holds the values both
//! speak of: a replica file's format and an engine's replica target (`ImageFormat`,
//! `ReplicaTarget`, re-exported by `os`) and a replica's health record (`ReplicaMode`,
//! `ReplicaHealth`, `RebuildProgress`; their rules are `health`'s).
//! Also: a disk's free space as the controller's placement sees it (`DiskSpace`, re-exported
//! by `agent`); the publish context's keys (the controller's message to the node); a backing
//! image's source type and checksum rule (`SourceType`, `normalize_checksum`, re-exported by
//! `backing::object`); and the object-name rules (`validate_name`, a DNS-1123 label;
//! `object_name`, a store key as a Kubernetes object name, re-exported by `store::kubernetes`).

pub mod backing_image;
pub mod checksum;
pub mod file_state;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    pub fn replica_format(self) -> ImageFormat {
        match self {
            EngineKind::Loop | EngineKind::Mirror => ImageFormat::Raw,
            EngineKind::Qemu => ImageFormat::Qcow2,
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
    #[serde(default = "ImageFormat::qcow2")]
    pub format: ImageFormat,
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
    pub health: ReplicaHealth,
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
    pub targets: Vec<ReplicaTarget>,
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
        self.replicas.iter().find(|r| r.format == ImageFormat::Cow)
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
    pub targets: Vec<ReplicaTarget>,
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

/// The layout under a disk, in one home: every path below a disk's directory is computed here.
///
/// ```text
/// <disk>/disk.json                             the disk's id (`disks::open_disk`)
/// <disk>/replicas/<volume>-<replica>/volume.*  a replica's file (the name says its format)
/// <disk>/backing-images/<name>-<uuid>/backing  an image's ready file, beside it
///                                   backing.cfg      its facts (`FileMeta`)
///                                   backing.manifest its chunk manifest
/// <disk>/snapshots/<snapshot id>/              a snapshot's file
/// <disk>/tmp/                                  work in progress, renamed into place when whole
/// ```
impl Disk {
    /// The directories a disk holds from its first use.
    pub const DIRS: [&'static str; 3] = ["replicas", "backing-images", Disk::TMP];
    const TMP: &'static str = "tmp";

    pub fn replicas_dir(&self) -> PathBuf {
        self.path.join("replicas")
    }

    /// A replica's file: `replicas/<volume>-<replica>/volume.<format>`.
    pub fn replica_file(&self, volume_id: &str, replica_id: &str, format: ImageFormat) -> PathBuf {
        self.replicas_dir()
            .join(format!("{volume_id}-{replica_id}"))
            .join(format!("volume.{}", format.extension()))
    }

    pub fn backing_images_dir(&self) -> PathBuf {
        self.path.join("backing-images")
    }

    /// The directory of an image's file: `backing-images/<name>-<uuid>`.
    pub fn image_dir(&self, bi: &backing_image::BackingImage) -> PathBuf {
        self.backing_images_dir().join(bi.dir_name())
    }

    /// An image's ready file: `backing-images/<name>-<uuid>/backing`.
    pub fn image_file(&self, bi: &backing_image::BackingImage) -> PathBuf {
        self.image_file_in(&bi.dir_name())
    }

    /// The ready file in the image directory `dir_name` (`<name>-<uuid>`).
    pub fn image_file_in(&self, dir_name: &str) -> PathBuf {
        self.backing_images_dir().join(dir_name).join("backing")
    }

    /// The facts of an image's ready file (`FileMeta`), beside it.
    pub fn image_meta(&self, bi: &backing_image::BackingImage) -> PathBuf {
        self.image_dir(bi).join("backing.cfg")
    }

    /// The work under way on an image's file: `tmp/<name>-<uuid>.part`.
    pub fn image_tmp(&self, bi: &backing_image::BackingImage) -> PathBuf {
        self.tmp_dir().join(format!("{}.part", bi.dir_name()))
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.path.join("snapshots")
    }

    /// The directory of a snapshot's file: `snapshots/<snapshot id>`.
    pub fn snapshot_dir(&self, snapshot_id: &str) -> PathBuf {
        self.snapshots_dir().join(snapshot_id)
    }

    /// Work in progress (temp files, restores, backups), renamed into place only when whole.
    pub fn tmp_dir(&self) -> PathBuf {
        self.path.join(Disk::TMP)
    }
}

/// The `tmp/` of the disk that holds the replica file `file`
/// (`<disk>/replicas/<volume>-<replica>/volume.*`); `None` when it is not that deep.
pub fn disk_tmp_of_replica(file: &Path) -> Option<PathBuf> {
    let disk = file.parent()?.parent()?.parent()?;
    Some(disk.join(Disk::TMP))
}

/// The chunk manifest beside a ready `backing` file (the path of that file).
pub fn manifest_path(file: &Path) -> PathBuf {
    file.with_file_name("backing.manifest")
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

/// A replica the volume engine reads and writes: a local qcow2 file, or a replica served by
/// another node's engine over NBD (TCP).
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum ReplicaTarget {
    /// A qcow2 replica file on this node, absolute path.
    Local(PathBuf),
    /// A replica exported by another node's replica server (`Engine::export_replica`): `export`
    /// is the replica id it was exported under. Read by qemu's built-in NBD client, so no kernel
    /// NBD module is needed.
    Nbd {
        host: String,
        port: u16,
        export: String,
    },
}

impl std::fmt::Display for ReplicaTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaTarget::Local(path) => write!(f, "{}", path.display()),
            ReplicaTarget::Nbd { host, port, export } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            ReplicaTarget::Nbd { host, port, export } => write!(f, "nbd://{host}:{port}/{export}"),
        }
    }
}

impl ReplicaTarget {
    /// An NBD child read back from its `Display` form, `nbd://host:port/export` (IPv6 hosts in
    /// brackets); None for anything else. The export is everything after the port's slash.
    pub fn parse_nbd(value: &str) -> Option<ReplicaTarget> {
        let rest = value.strip_prefix("nbd://")?;
        let (authority, export) = rest.split_once('/')?;
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, port) = v6.split_once("]:")?;
                (host, port)
            }
            None => authority.rsplit_once(':')?,
        };
        let port: u16 = port.parse().ok()?;
        if host.is_empty() || export.is_empty() || port == 0 {
            return None;
        }
        Some(ReplicaTarget::Nbd {
            host: host.to_string(),
            port,
            export: export.to_string(),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
    /// bicsi's copy-on-write replica layout (`crate::mirror::cow`) on disks whose filesystem
    /// does not share blocks: the file (`volume.cow`) is its data, `volume.cowmap` beside it
    /// its cluster map, and `base` beside it, when there, a link to the disk's raw expansion of
    /// the backing image. Only bicsi's mirror engine reads it: qemu has no driver for it, so
    /// it is never handed to qemu (every path that would is refused before, naming the volume).
    Cow,
}

impl ImageFormat {
    /// The format of records written before replicas had one: every replica was qcow2.
    pub fn qcow2() -> ImageFormat {
        ImageFormat::Qcow2
    }

    /// The format of a replica, snapshot or export file bicsi made, from its name: `*.raw` is
    /// raw, `*.cow` bicsi's copy-on-write layout, everything else qcow2. The one place a file's format is decided from a path; it
    /// never looks at the content: a raw volume holds whatever its user wrote, a qcow2 header
    /// naming a host file as its backing included, and qemu must never be told to probe it.
    pub fn of_file(path: &Path) -> ImageFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some("raw") => ImageFormat::Raw,
            Some("cow") => ImageFormat::Cow,
            _ => ImageFormat::Qcow2,
        }
    }

    /// The file name extension of files of this format.
    pub fn extension(self) -> &'static str {
        self.as_str()
    }

    /// The name qemu uses (`-f`, `-F`, `"driver"`); `cow` for bicsi's layout, which qemu
    /// does not know (its own long-removed `cow` driver is not this).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Cow => "cow",
        }
    }

    /// The map file of a copy-on-write replica whose data file is `data`.
    pub fn cow_map(data: &Path) -> PathBuf {
        data.with_extension("cowmap")
    }

    /// The link to the base of a copy-on-write replica whose data file is `data` (absent for a
    /// volume without a backing image).
    pub fn cow_base(data: &Path) -> PathBuf {
        data.with_file_name("base")
    }

    /// A backing image's or a user's format name (`raw`, `qcow2`); bicsi's `cow` layout is
    /// never one.
    pub fn parse(name: &str) -> Option<ImageFormat> {
        match name {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a replica may be used for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaMode {
    /// Holds every acknowledged write: read and written.
    #[default]
    Rw,
    /// Being rebuilt: written (new writes, the copy) but never read.
    Wo,
    /// Missed writes, or its file or disk is gone: neither read nor written until rebuilt.
    Err,
}

impl ReplicaMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaMode::Rw => "rw",
            ReplicaMode::Wo => "wo",
            ReplicaMode::Err => "err",
        }
    }
}

impl std::fmt::Display for ReplicaMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rebuild of a replica in progress (mode wo), for `bicsi get replicas`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RebuildProgress {
    /// The replica copied from.
    pub source: String,
    /// Bytes of the source's own clusters copied so far, and in all.
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Unix seconds.
    pub started: u64,
}

impl RebuildProgress {
    pub fn percent(&self) -> u64 {
        (self.done_bytes * 100)
            .checked_div(self.total_bytes)
            .unwrap_or(0)
            .min(100)
    }
}

/// A replica's mode with when and why it was entered. Records written before modes existed read
/// as rw since 0 (their replicas were all written alike).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaHealth {
    #[serde(default)]
    pub mode: ReplicaMode,
    /// Unix seconds.
    #[serde(default)]
    pub mode_since: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mode_reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildProgress>,
}

impl ReplicaHealth {
    /// A replica made to replace another: not readable until rebuilt.
    pub fn new_err(reason: &str, now: u64) -> ReplicaHealth {
        ReplicaHealth {
            mode: ReplicaMode::Err,
            mode_since: now,
            mode_reason: reason.to_string(),
            rebuild: None,
        }
    }
}

// The publish context is the controller's message to the node (ControllerPublishVolume's answer,
// NodeStageVolume's and NodePublishVolume's input): its keys are records both sides read.

/// The key of the publish context that carries the replica targets to NodeStageVolume.
pub const REPLICAS_CONTEXT_KEY: &str = "bicsi.io/replicas";

/// The key of the publish context that tells NodePublishVolume the volume was published
/// read-only (PUBLISH_READONLY), so every mount of it on the node is read-only.
pub const READ_ONLY_CONTEXT_KEY: &str = "bicsi.io/read-only";

/// A disk that can take replicas, with the bytes it has free.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpace {
    pub disk: Disk,
    pub free_bytes: u64,
    /// Whether the disk's backing image manager runs (it does while the disk holds files).
    #[serde(default)]
    pub manager: bool,
    /// Whether the disk's filesystem shares blocks (FICLONE works: XFS with reflink, btrfs),
    /// which the loop engine needs; probed once per disk by its agent.
    #[serde(default)]
    pub shares_blocks: bool,
}

/// DNS-1123 label: what Kubernetes allows as an object name segment, and safe as a path part.
pub fn validate_name(name: &str) -> crate::error::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(crate::error::Error::InvalidArgument(format!(
            "backing image name {name:?} is invalid: use at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit (a DNS-1123 label)"
        )))
    }
}

/// A valid Kubernetes object name (DNS-1123 subdomain) for a store key.
pub fn object_name(key: &str) -> String {
    let valid = !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && key.as_bytes()[0].is_ascii_alphanumeric()
        && key.as_bytes()[key.len() - 1].is_ascii_alphanumeric();
    if valid {
        key.to_string()
    } else {
        let digest = hex::encode(<sha2::Sha512 as sha2::Digest>::digest(key.as_bytes()));
        format!("k-{}", &digest[..40])
    }
}

// Where a backing image's first file comes from (a BackingImage's `sourceType`, and the
// StorageClass parameter `backingImageDataSourceType`). Not a doc comment: it would become the
// CRD schema's description, and deploy/crds.yaml is kept as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum SourceType {
    #[serde(rename = "download")]
    Download,
    #[serde(rename = "upload")]
    Upload,
    #[serde(rename = "export-from-volume")]
    ExportFromVolume,
    /// Restored from a backup of the image in a backup target (`backup-url`: `TARGET#NAME`).
    #[serde(rename = "restore")]
    Restore,
}

impl SourceType {
    pub const NAMES: &'static str = "download, upload, export-from-volume, restore";

    pub fn parse(name: &str) -> crate::error::Result<SourceType> {
        match name {
            "download" => Ok(SourceType::Download),
            "upload" => Ok(SourceType::Upload),
            "export-from-volume" => Ok(SourceType::ExportFromVolume),
            "restore" => Ok(SourceType::Restore),
            other => Err(crate::error::Error::InvalidArgument(format!(
                "unknown backing image source type {other:?}; use one of: {}",
                SourceType::NAMES
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SourceType::Download => "download",
            SourceType::Upload => "upload",
            SourceType::ExportFromVolume => "export-from-volume",
            SourceType::Restore => "restore",
        }
    }
}

/// Normalises and checks an image's expected checksum: empty (not known yet), or a SHA-512
/// ([`checksum::normalize_sha512`]).
pub fn normalize_checksum(name: &str, checksum: &str) -> crate::error::Result<String> {
    if checksum.trim().is_empty() {
        return Ok(String::new());
    }
    if let Some(c) = checksum::normalize_sha512(checksum) {
        Ok(c)
    } else {
        Err(crate::error::Error::InvalidArgument(format!(
            "backing image {name:?}: checksum must be the SHA-512 of the file, 128 hexadecimal characters (as `shasum -a 512 FILE` prints), got {} characters",
            checksum.trim().len()
        )))
    }
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
