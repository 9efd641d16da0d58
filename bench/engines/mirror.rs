//! Paths of bicsi's own `mirror` engine (issue 14, several replicas): two XFS disks (reflink=1,
//! each on a loop device of its own), the volume's two raw replicas one on each, against a
//! plain loop device over a sparse raw file in the first XFS, with the candidates' fio jobs.
//!
//! - `volume-io-mirror-tuned`: `bicsi engine-mirror` started by hand, one per variant, over two
//!   sparse raw replicas, a loop device on its FUSE file: FUSE worker threads, the loop device's
//!   direct I/O and logical block size, FOPEN_DIRECT_IO, FUSE's writeback cache.
//! - `volume-io-mirror`: the engine as it ships: a new empty 2-replica block volume of one
//!   `bicsi serve` with the two XFS disks (engine chosen automatically, checked: `mirror`),
//!   published through CSI; plus the engine's resident memory after the jobs.
//! - `volume-io-mirror-remote`: a `bicsi controller` and two `bicsi node` agents on 127.0.0.1
//!   (`sync_cross::Cluster`), each node's directory on its own XFS disk: a 2-replica volume
//!   (engine chosen automatically, checked: `mirror`, one replica per node) attached on n1, so
//!   its second replica is written over the engine's NBD client to n2's replica server, against
//!   a 1-replica volume of the loop engine (issue 14's "1-replica figure") and the plain loop
//!   device, same jobs.

use super::volume_engine::{ServedVolume, engine_of, served_volume_runs};
use super::*;

/// Two XFS disks on loop devices under `dir`.
async fn two_disks(dir: &Path, len: u64) -> Res<(LoopMount, LoopMount)> {
    two_disks_at(dir, [&dir.join("xfs1"), &dir.join("xfs2")], len).await
}

/// Two XFS disks on loop devices (images in `dir`) mounted at `at`.
async fn two_disks_at(dir: &Path, at: [&Path; 2], len: u64) -> Res<(LoopMount, LoopMount)> {
    let a = LoopMount::xfs(&dir.join("xfs1.img"), at[0], 4 * len + GIB).await?;
    let b = LoopMount::xfs(&dir.join("xfs2.img"), at[1], 4 * len + GIB).await?;
    Ok((a, b))
}

fn have_xfs(path: &str) -> bool {
    if !check_root(path) {
        return false;
    }
    if !have_tool("mkfs.xfs") {
        println!("{path}: skipped: mkfs.xfs is missing (Debian package xfsprogs)");
        return false;
    }
    true
}

/// One hand-started variant.
struct Variant {
    label: &'static str,
    threads: usize,
    direct_io: bool,
    writeback: bool,
    loop_dio: &'static str,
    sector: &'static str,
}

const VARIANTS: [Variant; 7] = [
    Variant {
        label: "4 threads, loop dio",
        threads: 4,
        direct_io: false,
        writeback: false,
        loop_dio: "on",
        sector: "512",
    },
    Variant {
        label: "1 thread, loop dio",
        threads: 1,
        direct_io: false,
        writeback: false,
        loop_dio: "on",
        sector: "512",
    },
    Variant {
        label: "8 threads, loop dio",
        threads: 8,
        direct_io: false,
        writeback: false,
        loop_dio: "on",
        sector: "512",
    },
    Variant {
        label: "4 threads, loop dio 4k",
        threads: 4,
        direct_io: false,
        writeback: false,
        loop_dio: "on",
        sector: "4096",
    },
    Variant {
        label: "4 threads, FOPEN_DIRECT_IO, loop dio",
        threads: 4,
        direct_io: true,
        writeback: false,
        loop_dio: "on",
        sector: "512",
    },
    Variant {
        label: "4 threads, loop buffered",
        threads: 4,
        direct_io: false,
        writeback: false,
        loop_dio: "off",
        sector: "512",
    },
    Variant {
        label: "4 threads, writeback cache, loop buffered",
        threads: 4,
        direct_io: false,
        writeback: true,
        loop_dio: "off",
        sector: "512",
    },
];

pub(crate) async fn mirror_tuned(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    let path = "volume-io-mirror-tuned";
    if !have_xfs(path) {
        return Ok(vec![]);
    }
    let len = device_len(b.size);
    println!(
        "{path}: `bicsi engine-mirror` over two {} sparse raw replicas, one per XFS disk \
         (reflink=1, each on a loop device), a loop device on its FUSE file, vs a plain loop \
         device in the first XFS; load average {}",
        fmt_bytes(len),
        load_average()
    );
    let dir = b.work.join(path);
    std::fs::create_dir_all(&dir)?;
    let guard = SweepOnDrop(dir.clone());
    let (d1, d2) = two_disks(&dir, len).await?;
    let result = mirror_tuned_in(b, checks, &dir, &d1.mnt, &d2.mnt, len).await;
    drop((d1, d2));
    drop(guard);
    result?;
    Ok(vec![])
}

/// Starts `bicsi engine-mirror` for `v` and attaches its loop device.
async fn start_variant(
    b: &Bench,
    dir: &Path,
    d1: &Path,
    d2: &Path,
    i: usize,
    v: &Variant,
    len: u64,
) -> Res<(String, PathBuf)> {
    let r1 = d1.join(format!("m{i}.raw"));
    let r2 = d2.join(format!("m{i}.raw"));
    for r in [&r1, &r2] {
        std::fs::File::create(r)?.set_len(len)?;
    }
    let export = dir.join(format!("export-{i}"));
    std::fs::File::create(&export)?;
    let pid = dir.join(format!("mirror-{i}.pid"));
    let mut args: Vec<String> = vec![
        "engine-mirror".into(),
        "--export".into(),
        export.display().to_string(),
        "--replica".into(),
        r1.display().to_string(),
        "--replica".into(),
        r2.display().to_string(),
        "--threads".into(),
        v.threads.to_string(),
        "--pid-file".into(),
        pid.display().to_string(),
        "--daemonize".into(),
    ];
    if v.direct_io {
        args.push("--direct-io".into());
    }
    if v.writeback {
        args.push("--writeback-cache".into());
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    capture_checked(&b.bicsi.to_string_lossy(), &arg_refs).await?;
    let dev = capture_checked(
        "losetup",
        &[
            "--find",
            "--show",
            &format!("--direct-io={}", v.loop_dio),
            "--sector-size",
            v.sector,
            &export.to_string_lossy(),
        ],
    )
    .await?;
    Ok((dev, export))
}

async fn mirror_tuned_in(
    b: &Bench,
    checks: &mut Checks,
    dir: &Path,
    d1: &Path,
    d2: &Path,
    len: u64,
) -> Res<()> {
    let mut sides = vec![plain_loop(d1, len).await?];
    let mut exports = Vec::new();
    let mut result = Ok(());
    for (i, v) in VARIANTS.iter().enumerate() {
        match start_variant(b, dir, d1, d2, i, v, len).await {
            Ok((dev, export)) => {
                let dio_now = std::fs::read_to_string(format!(
                    "/sys/block/{}/loop/dio",
                    dev.trim_start_matches("/dev/")
                ))
                .unwrap_or_default();
                let about = format!(
                    "`bicsi engine-mirror --threads {}{}{}` over two sparse raw replicas (one per \
                     XFS disk), `losetup --direct-io={} --sector-size {}` on its file (sysfs \
                     dio={})",
                    v.threads,
                    if v.direct_io { " --direct-io" } else { "" },
                    if v.writeback {
                        " --writeback-cache"
                    } else {
                        ""
                    },
                    v.loop_dio,
                    v.sector,
                    dio_now.trim()
                );
                let shown = format!("{dev} (dio={})", dio_now.trim());
                sides.push(verified_side(v.label, dev, shown, about, len).await);
                exports.push(export);
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let res = async {
        result?;
        measure(b, &sides, len).await
    }
    .await;
    for s in &sides {
        detach(&s.dev).await;
    }
    for e in &exports {
        let _ = capture("umount", &[&e.to_string_lossy()]).await;
    }
    let res = res?;
    print_results("volume-io-mirror-tuned", &sides, &res, len, b.runs, b.quick);
    for s in &sides[1..] {
        checks.check(
            s.verified.as_ref().is_some_and(Result::is_ok),
            format!(
                "volume-io-mirror-tuned: {} reads back a verified pattern",
                s.label
            ),
        );
    }
    Ok(())
}

pub(crate) async fn mirror_engine(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    let path = "volume-io-mirror";
    if !have_xfs(path) {
        return Ok(vec![]);
    }
    let len = device_len(b.size);
    println!(
        "{path}: a new empty {} volume of one `bicsi serve` (2 replicas, block, engine chosen \
         automatically) on two disks in XFS (reflink=1) on loop devices, vs a plain loop device \
         in the first XFS; load average {}",
        fmt_bytes(len),
        load_average()
    );
    let dir = b.work.join(path);
    std::fs::create_dir_all(&dir)?;
    let guard = SweepOnDrop(dir.clone());
    let (d1, d2) = two_disks(&dir, len).await?;
    let disks = [d1.mnt.join("disk"), d2.mnt.join("disk")];
    for d in &disks {
        std::fs::create_dir_all(d)?;
    }
    let serve = Serve::start_disks(&b.bicsi, &dir, &disks, &b.http).await?;
    let result = served_volume_runs(b, checks, &serve, &dir, &d1.mnt, len, &MIRROR_VOLUME).await;
    let log = serve.stop().await.unwrap_or_default();
    if result.is_err() {
        eprintln!("bicsi serve log (last lines):\n{}", log_tail(&log, 20));
    }
    drop((d1, d2));
    drop(guard);
    result?;
    Ok(vec![])
}

pub(crate) async fn cow_engine(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    let path = "volume-io-cow";
    if !check_root(path) {
        return Ok(vec![]);
    }
    if !have_tool("mkfs.ext4") {
        println!("{path}: skipped: mkfs.ext4 is missing (Debian package e2fsprogs)");
        return Ok(vec![]);
    }
    let len = device_len(b.size);
    println!(
        "{path}: a new empty {} volume of one `bicsi serve` (1 replica, block, engine: mirror) \
         on a disk in ext4 (no reflink: a copy-on-write replica) on a loop device, vs a plain \
         loop device in that ext4; load average {}",
        fmt_bytes(len),
        load_average()
    );
    let dir = b.work.join(path);
    std::fs::create_dir_all(&dir)?;
    let guard = SweepOnDrop(dir.clone());
    let fs = LoopMount::ext4(&dir.join("ext4.img"), &dir.join("ext4"), 4 * len + GIB).await?;
    let disk = fs.mnt.join("disk");
    std::fs::create_dir_all(&disk)?;
    let serve = Serve::start_disks(&b.bicsi, &dir, std::slice::from_ref(&disk), &b.http).await?;
    let result = served_volume_runs(b, checks, &serve, &dir, &fs.mnt, len, &COW_VOLUME).await;
    let log = serve.stop().await.unwrap_or_default();
    if result.is_err() {
        eprintln!("bicsi serve log (last lines):\n{}", log_tail(&log, 20));
    }
    drop(fs);
    drop(guard);
    result?;
    Ok(vec![])
}

const COW_VOLUME: ServedVolume = ServedVolume {
    path: "volume-io-cow",
    parameters: &[("numberOfReplicas", "1"), ("engine", "mirror")],
    chosen: |record| {
        let engine = engine_of(record);
        let format = record["replicas"][0]["format"].as_str().unwrap_or_default();
        (
            engine == "mirror" && format == "cow",
            format!(
                "volume-io-cow: the volume on ext4 got the mirror engine over a copy-on-write \
                 replica (engine {engine:?}, replica format {format:?})"
            ),
        )
    },
    no_daemon: "volume-io-cow: no qemu-storage-daemon serves the copy-on-write volume",
    label: "bicsi (mirror engine, 1 cow replica)",
    about: "the published block device of a bicsi volume of the mirror engine over one \
            copy-on-write replica (sparse data file + cluster map) on ext4",
    mirror_rss: true,
};

/// Prints the resident memory of the mirror engines whose command line names `dir` after a
/// path's jobs, and returns it (see [`mirror_rss`]).
pub(crate) fn show_mirror_rss(dir: &Path) -> Vec<(i32, u64)> {
    let rss = mirror_rss(dir);
    println!(
        "  mirror engine resident memory after the jobs: {}",
        rss.iter()
            .map(|(pid, r)| format!("pid {pid}: {}", fmt_bytes(*r)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    rss
}

/// Resident memory (VmRSS, bytes) of the mirror engines whose command line names `dir`.
pub(crate) fn mirror_rss(dir: &Path) -> Vec<(i32, u64)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    let needle = dir.display().to_string();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.contains("engine-mirror") || !cmd.contains(&needle) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        out.push((pid, rss * 1024));
    }
    out
}

const MIRROR_VOLUME: ServedVolume = ServedVolume {
    path: "volume-io-mirror",
    parameters: &[("numberOfReplicas", "2")],
    chosen: |record| {
        let engine = engine_of(record);
        (
            engine == "mirror",
            format!(
                "volume-io-mirror: the 2-replica volume on two XFS disks got the mirror engine \
                 ({engine:?})"
            ),
        )
    },
    no_daemon: "volume-io-mirror: no qemu-storage-daemon serves the mirror engine's volume",
    label: "bicsi (mirror engine, 2 replicas)",
    about: "the published block device of a bicsi volume of the mirror engine: a direct-I/O \
            loop device on the engine's FUSE file, every write to both raw replicas (one per XFS \
            disk)",
    mirror_rss: true,
};

pub(crate) async fn mirror_remote(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    let path = "volume-io-mirror-remote";
    if !have_xfs(path) {
        return Ok(vec![]);
    }
    let len = device_len(b.size);
    println!(
        "{path}: a controller and two node agents on 127.0.0.1, each node's directory on an XFS \
         disk (reflink=1) on a loop device; a new empty {} 2-replica volume (block, engine \
         chosen automatically) attached on n1 with its second replica on n2, vs a 1-replica \
         volume (loop engine) and a plain loop device in n1's XFS; load average {}",
        fmt_bytes(len),
        load_average()
    );
    let dir = b.work.join(path);
    std::fs::create_dir_all(&dir)?;
    let guard = SweepOnDrop(dir.clone());
    let (n1, n2) = (dir.join("n1"), dir.join("n2"));
    let (d1, d2) = two_disks_at(&dir, [&n1, &n2], len).await?;
    let result = match Cluster::start(b, &dir).await {
        Ok(cluster) => {
            let result = mirror_remote_runs(b, checks, &cluster, &dir, len).await;
            let logs = cluster.stop().await;
            if result.is_err() {
                eprintln!("cluster logs (last lines):\n{logs}");
            }
            result
        }
        Err(e) => Err(e),
    };
    drop((d1, d2));
    drop(guard);
    result?;
    Ok(vec![])
}

/// A volume of the cluster attached on one node: what to detach and delete afterwards.
struct Attached {
    id: String,
    node: String,
    node_csi: CsiClient,
    staging: String,
    target: String,
}

impl Attached {
    async fn detach_and_delete(mut self, ctl: &mut CsiClient) -> Res<()> {
        node_detach(&mut self.node_csi, &self.id, self.target, self.staging).await?;
        unpublish_and_delete(ctl, &self.id, &self.node).await
    }
}

/// Creates a block volume `name` of the cluster with `replicas`, checks its engine is `engine`,
/// and attaches it on `node` (None: the node of its first replica). Returns it and its record.
/// A volume to create in the cluster: its name, number of replicas and the node to attach it on
/// (None: the node of its first replica).
struct Wanted<'a> {
    name: &'a str,
    replicas: &'a str,
    node: Option<&'a str>,
}

async fn cluster_volume(
    b: &Bench,
    cluster: &Cluster,
    ctl: &mut CsiClient,
    dir: &Path,
    want: Wanted<'_>,
    len: u64,
) -> Res<(Attached, serde_json::Value)> {
    let Wanted {
        name,
        replicas,
        node,
    } = want;
    let cap = block_capability();
    let id = create_block_volume(ctl, name, len, &[("numberOfReplicas", replicas)]).await?;
    let volumes = api_get(&b.http, &cluster.api, "/v1/volumes").await?;
    let record = volumes
        .as_array()
        .and_then(|a| a.iter().find(|v| v["id"] == id.as_str()))
        .cloned()
        .ok_or_else(|| format!("volume {id} is not listed"))?;
    let node = match node {
        Some(n) => n.to_string(),
        None => record["replicas"][0]["nodeId"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    };
    let p = publish_until_ready(ctl, &id, &node, &cap, Duration::from_secs(60)).await?;
    let mut node_csi = csi_connect(&format!(
        "unix://{}",
        dir.join(&node).join("csi.sock").display()
    ))
    .await?;
    let staging = dir.join(format!("staging-{name}"));
    let target = dir.join(format!("target-{name}"));
    std::fs::create_dir_all(&staging)?;
    let (staging, target) = (staging.display().to_string(), target.display().to_string());
    node_stage(&mut node_csi, &id, &p, &staging, &cap).await?;
    node_publish(&mut node_csi, &id, &p, &staging, &target, &cap).await?;
    Ok((
        Attached {
            id,
            node,
            node_csi,
            staging,
            target,
        },
        record,
    ))
}

async fn mirror_remote_runs(
    b: &Bench,
    checks: &mut Checks,
    cluster: &Cluster,
    dir: &Path,
    len: u64,
) -> Res<()> {
    let path = "volume-io-mirror-remote";
    let mut ctl = csi_connect(&cluster.csi).await?;
    let (one, one_rec) = cluster_volume(
        b,
        cluster,
        &mut ctl,
        dir,
        Wanted {
            name: "vio-one",
            replicas: "1",
            node: None,
        },
        len,
    )
    .await?;
    checks.check(
        one_rec["spec"]["engine"] == "loop",
        format!(
            "{path}: the 1-replica volume on XFS got the loop engine ({})",
            one_rec["spec"]["engine"]
        ),
    );
    let (two, two_rec) = cluster_volume(
        b,
        cluster,
        &mut ctl,
        dir,
        Wanted {
            name: "vio-remote",
            replicas: "2",
            node: Some("n1"),
        },
        len,
    )
    .await?;
    let mut nodes: Vec<&str> = two_rec["replicas"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["nodeId"].as_str()).collect())
        .unwrap_or_default();
    nodes.sort();
    checks.check(
        two_rec["spec"]["engine"] == "mirror" && nodes == ["n1", "n2"],
        format!(
            "{path}: the 2-replica volume got the mirror engine with one replica per node ({}, \
             {nodes:?})",
            two_rec["spec"]["engine"]
        ),
    );
    let remote_engines: Vec<(i32, u64)> = mirror_rss(&dir.join("n1"))
        .into_iter()
        .filter(|(pid, _)| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("nbd://127.0.0.1:"))
        })
        .collect();
    checks.check(
        remote_engines.len() == 1,
        format!("{path}: n1's mirror engine reaches n2's replica over NBD ({remote_engines:?})"),
    );
    let result = async {
        let plain = plain_loop(&dir.join("n1"), len).await?;
        let one_side = verified_side_of("bicsi loop (1 replica)", &one, len, one_rec).await;
        let two_side =
            verified_side_of("bicsi mirror (2 replicas, 1 remote)", &two, len, two_rec).await;
        let sides = vec![plain, one_side, two_side];
        let res = measure(b, &sides, len).await;
        detach(&sides[0].dev).await;
        let res = res?;
        for s in &sides[1..] {
            checks.check(
                s.verified.as_ref().is_some_and(Result::is_ok),
                format!("{path}: {} reads back a verified pattern", s.label),
            );
        }
        print_results(path, &sides, &res, len, b.runs, b.quick);
        // The target: the remote volume's writes against the 1-replica figure.
        for (j, job) in JOBS.iter().enumerate() {
            if job.rw.contains("write") && job.qd == 32 {
                let bw = |s: usize| median(res[s][j].iter().map(|r| r.1).collect());
                println!(
                    "  {}: 2 replicas (1 remote) / 1 replica = {:.2} (target >= 0.5)",
                    job.name(),
                    bw(2) / bw(1)
                );
            }
        }
        show_mirror_rss(&dir.join("n1"));
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    let detached = async {
        one.detach_and_delete(&mut ctl).await?;
        two.detach_and_delete(&mut ctl).await
    }
    .await;
    result?;
    detached
}

/// A published volume's side, its pattern verified, described from its record.
async fn verified_side_of(label: &str, v: &Attached, len: u64, record: serde_json::Value) -> Side {
    let replicas: Vec<String> = record["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| format!("{} on {}", r["format"].as_str().unwrap_or("?"), r["nodeId"]))
                .collect()
        })
        .unwrap_or_default();
    let about = format!(
        "the published block device of a bicsi volume of engine {} (replicas: {}), attached on \
         {}",
        record["spec"]["engine"],
        replicas.join(", "),
        v.node
    );
    verified_side(label, v.target.clone(), v.target.clone(), about, len).await
}
