//! What the metrics read at scrape time: the cluster's records (backing image files, volumes,
//! nodes) where this process owns them, this node's disks and the I/O of the volumes attached
//! here, and the process itself. Everything is read fresh at each scrape and nothing is kept,
//! so a gauge never lags its record. A source that cannot be read leaves its families out (and
//! says why at debug level) rather than failing the scrape.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, GaugeVec, Opts};

use crate::cluster::Cluster;
use crate::health::{ReplicaMode, VolumeHealth, volume_health};
use crate::model::backing_image::BackingImage;
use crate::model::file_state::FileState;
use crate::model::{Disk, NodeRecord, NodeVolume, Volume, now_secs, parse_rfc3339};
use crate::store::{Kind, Store, StoreExt};

/// What one listener's scrape reads besides the process's counters.
#[derive(Default, Clone)]
pub struct Sources {
    /// The cluster's records (serve, controller): images, volumes, nodes.
    pub records: Option<Arc<dyn Store>>,
    /// Which nodes are up (with `records`).
    pub cluster: Option<Arc<Cluster>>,
    /// This node (serve, node): its id, its disks, and its own records (staged volumes).
    pub node_id: String,
    pub disks: Vec<Disk>,
    pub node_records: Option<Arc<dyn Store>>,
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("a valid gauge")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> CounterVec {
    CounterVec::new(Opts::new(name, help), labels).expect("a valid counter")
}

const FILE_STATES: [FileState; 6] = [
    FileState::Pending,
    FileState::Starting,
    FileState::InProgress,
    FileState::Ready,
    FileState::Failed,
    FileState::Unknown,
];

const MODES: [ReplicaMode; 3] = [ReplicaMode::Rw, ReplicaMode::Wo, ReplicaMode::Err];
const HEALTHS: [VolumeHealth; 3] = [
    VolumeHealth::Healthy,
    VolumeHealth::Degraded,
    VolumeHealth::Faulted,
];

/// Every family `sources` gives now.
pub fn collect(sources: &Sources) -> Vec<MetricFamily> {
    let mut out = process();
    if let Some(store) = &sources.records {
        match store.list::<BackingImage>(Kind::BackingImage) {
            Ok(images) => out.extend(images_families(&images, now_secs())),
            Err(e) => tracing::debug!(error = %e, "metrics: cannot list backing images"),
        }
        match store.list::<Volume>(Kind::Volume) {
            Ok(volumes) => out.extend(volume_families(&volumes)),
            Err(e) => tracing::debug!(error = %e, "metrics: cannot list volumes"),
        }
        match store.list::<NodeRecord>(Kind::Node) {
            Ok(nodes) => out.extend(node_families(&nodes, sources.cluster.as_deref())),
            Err(e) => tracing::debug!(error = %e, "metrics: cannot list nodes"),
        }
    }
    if !sources.disks.is_empty() {
        out.extend(disk_families(&sources.node_id, &sources.disks));
    }
    if let Some(store) = &sources.node_records {
        match store.list::<NodeVolume>(Kind::NodeVolume) {
            Ok(staged) => out.extend(io_families(
                &sources.node_id,
                &staged,
                Path::new(SYS_BLOCK),
                &IO_BASE,
            )),
            Err(e) => tracing::debug!(error = %e, "metrics: cannot list staged volumes"),
        }
    }
    out
}

/// Files per state per disk (every state, 0 included, so a rule sees a state empty out), how
/// long each file not in a final state has been in it, and each image's size.
pub(super) fn images_families(images: &[BackingImage], now: u64) -> Vec<MetricFamily> {
    let files = gauge(
        "bicsi_backing_image_files",
        "Backing image files per state on each disk.",
        &["node", "disk", "state"],
    );
    let in_state = gauge(
        "bicsi_backing_image_file_state_seconds",
        "How long each backing image file not ready or failed has been in its state.",
        &["image", "node", "disk", "state"],
    );
    let size = gauge(
        "bicsi_backing_image_size_bytes",
        "Size of each backing image's file (0 until its first file is ready).",
        &["image"],
    );
    let mut per_disk: BTreeMap<(String, String), HashMap<FileState, u64>> = BTreeMap::new();
    for bi in images {
        size.with_label_values(&[bi.name()])
            .set(bi.status.size as f64);
        for (disk, f) in &bi.status.disk_file_status_map {
            *per_disk
                .entry((f.node_id.clone(), disk.clone()))
                .or_default()
                .entry(f.state)
                .or_default() += 1;
            if !f.state.is_final() {
                let since = parse_rfc3339(&f.last_state_transition_time).unwrap_or(now);
                in_state
                    .with_label_values(&[bi.name(), &f.node_id, disk, f.state.as_str()])
                    .set(now.saturating_sub(since) as f64);
            }
        }
    }
    for ((node, disk), counts) in &per_disk {
        for s in FILE_STATES {
            files
                .with_label_values(&[node, disk, s.as_str()])
                .set(counts.get(&s).copied().unwrap_or(0) as f64);
        }
    }
    [files.collect(), in_state.collect(), size.collect()].concat()
}

/// Each volume's size, health, attachment, replicas per mode and rebuilds under way.
pub(super) fn volume_families(volumes: &[Volume]) -> Vec<MetricFamily> {
    let capacity = gauge(
        "bicsi_volume_capacity_bytes",
        "Size of each volume.",
        &["volume"],
    );
    let health = gauge(
        "bicsi_volume_health",
        "1 for the volume's health now (healthy, degraded, faulted), 0 for the others.",
        &["volume", "health"],
    );
    let attached = gauge(
        "bicsi_volume_attached",
        "1 while the volume is published to a node (named), else 0.",
        &["volume", "node"],
    );
    let replicas = gauge(
        "bicsi_volume_replicas",
        "Replicas of each volume per mode (rw: read and written; wo: being rebuilt; err: to rebuild).",
        &["volume", "mode"],
    );
    let wanted = gauge(
        "bicsi_volume_replicas_wanted",
        "Replicas each volume asks for (numberOfReplicas).",
        &["volume"],
    );
    let rebuild = gauge(
        "bicsi_volume_rebuild_progress_ratio",
        "Progress (0 to 1) of each replica rebuild under way, by its target replica.",
        &["volume", "replica", "source"],
    );
    for v in volumes {
        let id = v.id.as_str();
        capacity
            .with_label_values(&[id])
            .set(v.spec.capacity_bytes as f64);
        let (now, _) = volume_health(v);
        for h in HEALTHS {
            health
                .with_label_values(&[id, h.as_str()])
                .set(f64::from(u8::from(h == now)));
        }
        match &v.publication {
            Some(p) => attached.with_label_values(&[id, &p.node_id]).set(1.0),
            None => attached.with_label_values(&[id, ""]).set(0.0),
        }
        for m in MODES {
            let n = v.replicas.iter().filter(|r| r.health.mode == m).count();
            replicas.with_label_values(&[id, m.as_str()]).set(n as f64);
        }
        wanted
            .with_label_values(&[id])
            .set(f64::from(v.spec.number_of_replicas));
        for r in &v.replicas {
            if let (ReplicaMode::Wo, Some(p)) = (r.health.mode, &r.health.rebuild) {
                let ratio = if p.total_bytes == 0 {
                    0.0
                } else {
                    (p.done_bytes as f64 / p.total_bytes as f64).min(1.0)
                };
                rebuild
                    .with_label_values(&[id, &r.id, &p.source])
                    .set(ratio);
            }
        }
    }
    [
        capacity.collect(),
        health.collect(),
        attached.collect(),
        replicas.collect(),
        wanted.collect(),
        rebuild.collect(),
    ]
    .concat()
}

fn node_families(nodes: &[NodeRecord], cluster: Option<&Cluster>) -> Vec<MetricFamily> {
    let up = gauge(
        "bicsi_node_up",
        "1 while the node sends heartbeats (or is this process), else 0.",
        &["node"],
    );
    for n in nodes {
        let is_up = cluster.map_or(n.up, |c| c.is_up(&n.node_id));
        up.with_label_values(&[&n.node_id])
            .set(f64::from(u8::from(is_up)));
    }
    up.collect()
}

/// Bytes allocated on disk under `dir` (holes not counted), walked without following links.
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for e in entries.flatten() {
        let Ok(meta) = e.path().symlink_metadata() else {
            continue;
        };
        if meta.is_dir() {
            total += allocated_bytes(&e.path());
        } else {
            total += meta.blocks() * 512;
        }
    }
    total
}

/// Each disk's capacity and free space (its filesystem's), and the bytes its backing image
/// files and its replicas take.
pub(super) fn disk_families(node: &str, disks: &[Disk]) -> Vec<MetricFamily> {
    let labels = ["node", "disk", "path"];
    let capacity = gauge(
        "bicsi_disk_capacity_bytes",
        "Size of the filesystem each disk is on.",
        &labels,
    );
    let free = gauge(
        "bicsi_disk_free_bytes",
        "Free space on each disk's filesystem, for unprivileged users (what bicsi can use).",
        &labels,
    );
    let images = gauge(
        "bicsi_disk_backing_images_bytes",
        "Bytes allocated by the backing image files on each disk.",
        &labels,
    );
    let replicas = gauge(
        "bicsi_disk_replicas_bytes",
        "Bytes allocated by the replicas on each disk.",
        &labels,
    );
    for d in disks {
        let path = d.path.display().to_string();
        let l = [node, d.id.as_str(), path.as_str()];
        match nix::sys::statvfs::statvfs(&d.path) {
            Ok(s) => {
                let frag = s.fragment_size() as f64;
                capacity.with_label_values(&l).set(s.blocks() as f64 * frag);
                free.with_label_values(&l)
                    .set(s.blocks_available() as f64 * frag);
            }
            Err(e) => tracing::debug!(disk = %d.id, error = %e, "metrics: cannot statvfs the disk"),
        }
        images
            .with_label_values(&l)
            .set(allocated_bytes(&d.backing_images_dir()) as f64);
        replicas
            .with_label_values(&l)
            .set(allocated_bytes(&d.replicas_dir()) as f64);
    }
    [
        capacity.collect(),
        free.collect(),
        images.collect(),
        replicas.collect(),
    ]
    .concat()
}

const SYS_BLOCK: &str = "/sys/block";

/// Volume and device → the device's counters when the volume was staged on it (or, after a
/// restart of this process, when a scrape first saw it): loop devices are reused, and the kernel
/// keeps their counters for the device's life, over every volume that used it.
pub(super) type IoBases = Mutex<HashMap<(String, PathBuf), BlockStat>>;
static IO_BASE: LazyLock<IoBases> = LazyLock::new(Default::default);

/// Takes the counters of `device` as the volume's zero.
pub(super) fn note_staged(volume_id: &str, device: &Path) {
    note_staged_in(&IO_BASE, volume_id, device, Path::new(SYS_BLOCK));
}

pub(super) fn note_staged_in(bases: &IoBases, volume_id: &str, device: &Path, sys_block: &Path) {
    if let Some(stat) = block_stat(device, sys_block) {
        bases
            .lock()
            .expect("io bases poisoned")
            .insert((volume_id.to_string(), device.to_path_buf()), stat);
    }
}

/// The I/O of each volume staged on this node, as its block device counts it: every engine
/// (loop, mirror, qemu) ends in a loop device, whose `/sys/block/loopN/stat` the kernel keeps
/// at no cost. Counted from the volume's stage on that device ([`note_staged`]; after a restart
/// of this process, from the first scrape that sees it), so each attach starts at 0.
pub(super) fn io_families(
    node: &str,
    staged: &[NodeVolume],
    sys_block: &Path,
    bases: &IoBases,
) -> Vec<MetricFamily> {
    let mut bases = bases.lock().expect("io bases poisoned");
    bases.retain(|(volume, device), _| {
        staged
            .iter()
            .any(|v| &v.volume_id == volume && &v.device == device)
    });
    let labels = ["volume", "node"];
    let read_bytes = counter(
        "bicsi_volume_read_bytes_total",
        "Bytes read from each volume attached on this node (its block device).",
        &labels,
    );
    let written_bytes = counter(
        "bicsi_volume_written_bytes_total",
        "Bytes written to each volume attached on this node (its block device).",
        &labels,
    );
    let reads = counter(
        "bicsi_volume_reads_total",
        "Read operations completed on each volume attached on this node.",
        &labels,
    );
    let writes = counter(
        "bicsi_volume_writes_total",
        "Write operations completed on each volume attached on this node.",
        &labels,
    );
    let read_time = counter(
        "bicsi_volume_read_time_seconds_total",
        "Time spent reading from each volume attached on this node (summed over operations; divided by reads_total: the mean latency).",
        &labels,
    );
    let write_time = counter(
        "bicsi_volume_write_time_seconds_total",
        "Time spent writing to each volume attached on this node (summed over operations).",
        &labels,
    );
    for v in staged {
        let Some(now) = block_stat(&v.device, sys_block) else {
            continue;
        };
        let base = bases
            .entry((v.volume_id.clone(), v.device.clone()))
            .or_insert_with(|| now.clone());
        let stat = now.since(base);
        let l = [v.volume_id.as_str(), node];
        read_bytes
            .with_label_values(&l)
            .inc_by(stat.read_sectors as f64 * 512.0);
        written_bytes
            .with_label_values(&l)
            .inc_by(stat.write_sectors as f64 * 512.0);
        reads.with_label_values(&l).inc_by(stat.reads as f64);
        writes.with_label_values(&l).inc_by(stat.writes as f64);
        read_time
            .with_label_values(&l)
            .inc_by(stat.read_ms as f64 / 1000.0);
        write_time
            .with_label_values(&l)
            .inc_by(stat.write_ms as f64 / 1000.0);
    }
    [
        read_bytes.collect(),
        written_bytes.collect(),
        reads.collect(),
        writes.collect(),
        read_time.collect(),
        write_time.collect(),
    ]
    .concat()
}

/// The fields of a block device's `stat` file that the metrics use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct BlockStat {
    pub reads: u64,
    pub read_sectors: u64,
    pub read_ms: u64,
    pub writes: u64,
    pub write_sectors: u64,
    pub write_ms: u64,
}

impl BlockStat {
    /// What was counted since `base`.
    fn since(&self, base: &BlockStat) -> BlockStat {
        BlockStat {
            reads: self.reads.saturating_sub(base.reads),
            read_sectors: self.read_sectors.saturating_sub(base.read_sectors),
            read_ms: self.read_ms.saturating_sub(base.read_ms),
            writes: self.writes.saturating_sub(base.writes),
            write_sectors: self.write_sectors.saturating_sub(base.write_sectors),
            write_ms: self.write_ms.saturating_sub(base.write_ms),
        }
    }
}

/// Parses `/sys/block/DEV/stat` (Documentation/block/stat.rst: reads, merges, sectors, ticks,
/// then the same for writes, ...).
pub(super) fn parse_block_stat(text: &str) -> Option<BlockStat> {
    let f: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    (f.len() >= 8).then(|| BlockStat {
        reads: f[0],
        read_sectors: f[2],
        read_ms: f[3],
        writes: f[4],
        write_sectors: f[6],
        write_ms: f[7],
    })
}

fn block_stat(device: &Path, sys_block: &Path) -> Option<BlockStat> {
    let dev = std::fs::canonicalize(device).ok()?;
    let name = dev.file_name()?;
    parse_block_stat(&std::fs::read_to_string(sys_block.join(name).join("stat")).ok()?)
}

/// The process: resident memory and open files (from /proc/self), and the build.
fn process() -> Vec<MetricFamily> {
    let rss = gauge(
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        &[],
    );
    let fds = gauge("process_open_fds", "Number of open file descriptors.", &[]);
    let build = gauge(
        "bicsi_build_info",
        "Always 1; the labels say which bicsi runs.",
        &["version"],
    );
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm")
        && let Some(pages) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u64>().ok())
    {
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as f64;
        rss.with_label_values(&[] as &[&str])
            .set(pages as f64 * page);
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // The directory read itself holds one descriptor while it is listed.
        let n = dir.count().saturating_sub(1);
        fds.with_label_values(&[] as &[&str]).set(n as f64);
    }
    build
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1.0);
    [rss.collect(), fds.collect(), build.collect()].concat()
}
