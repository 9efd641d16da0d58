//! Paths: the volume engine candidates of issue 14 (Deliver 1), each against a plain loop device
//! over a sparse raw file in the same filesystem, measured in the same run with the same fio
//! jobs: sequential 1M and random 4k, write and read, queue depth 1 and 32, direct I/O on the
//! block device, each job time-based (a fixed number of seconds), reported as IOPS and bytes/s
//! and as the ratio candidate / plain loop (higher is better; 1.0 is the plain device).
//!
//! - `volume-io-fuse`: bicsi's engine as it ships (a volume of one `bicsi serve`, published as a
//!   block device: qemu-storage-daemon's FUSE export of the qcow2 replica, a buffered loop
//!   device on it).
//! - `volume-io-fuse-tuned`: qemu-storage-daemon 10.0 started by hand with the knobs it has
//!   (the file driver's aio and cache modes, an iothread for the export, the loop device's
//!   direct I/O and logical block size), each variant a qcow2 overlay on a raw backing file.
//! - `volume-io-loop-raw`: the replica as a raw file, a reflink clone (`cp --reflink=always`,
//!   FICLONE) of the backing image expanded once to raw, attached straight to a loop device, on
//!   XFS with reflink (on a loop device, as sync-xfs sets up); plus the time to clone a whole
//!   image of --size.
//!
//! Every candidate first writes and verifies a pattern through its device (fio `verify=crc32c`,
//! mixed 4k/64k/1M sequential writes at queue depth 32), so a variant that loses writes is shown as such
//! instead of as fast. It must not touch anything outside its own directory of the work dir.

use super::*;

/// One fio job of the matrix.
struct Job {
    rw: &'static str,
    bs: &'static str,
    qd: u32,
}

/// The sequential write at depth 32 comes first: it fills every device, so the reads that
/// follow find data on all of them (and the overlays have allocated their clusters).
const JOBS: [Job; 8] = [
    Job {
        rw: "write",
        bs: "1M",
        qd: 32,
    },
    Job {
        rw: "write",
        bs: "1M",
        qd: 1,
    },
    Job {
        rw: "read",
        bs: "1M",
        qd: 1,
    },
    Job {
        rw: "read",
        bs: "1M",
        qd: 32,
    },
    Job {
        rw: "randwrite",
        bs: "4k",
        qd: 1,
    },
    Job {
        rw: "randwrite",
        bs: "4k",
        qd: 32,
    },
    Job {
        rw: "randread",
        bs: "4k",
        qd: 1,
    },
    Job {
        rw: "randread",
        bs: "4k",
        qd: 32,
    },
];

impl Job {
    fn name(&self) -> String {
        let what = match self.rw {
            "write" => "seq write",
            "read" => "seq read",
            "randwrite" => "rand write",
            _ => "rand read",
        };
        format!("{what} {} qd{}", self.bs, self.qd)
    }

    fn sequential(&self) -> bool {
        !self.rw.starts_with("rand")
    }
}

/// Seconds each fio job runs (time-based, so a slow candidate costs no more than a fast one).
const JOB_SECS: u64 = 5;

impl Job {
    /// The fio job over `len` bytes for `secs` seconds.
    fn fio(&self, len: u64, secs: u64) -> FioJob<'static> {
        FioJob {
            rw: self.rw,
            bs: self.bs,
            iodepth: self.qd,
            size: len,
            runtime: Some(secs),
        }
    }
}

/// A block device under test.
struct Side {
    label: String,
    dev: String,
    /// How it is made, printed with the table.
    about: String,
    /// Whether the verified pattern read back (None: not checked).
    verified: Option<Result<(), String>>,
}

/// Per side, per job: each run's (IOPS, bytes/s).
type Results = Vec<Vec<Vec<(f64, f64)>>>;

/// One fio job on `dev`: (IOPS, bytes/s).
async fn run_fio(dev: &str, job: &Job, len: u64, secs: u64) -> Res<(f64, f64)> {
    let out = job.fio(len, secs).run(dev).await?;
    if out.iops <= 0.0 {
        return Err(format!("fio {} on {dev} did no I/O", job.name()).into());
    }
    Ok((out.iops, out.bw_bytes))
}

/// Writes a pattern through `dev` with direct I/O (a mix of 4k, 64k and 1M blocks over its last
/// 32 MiB, queue depth 32; sequential, so no block overwrites another) and reads it back
/// verified (every block's header names its offset, so misplaced writes fail too); Err says
/// what fio saw.
async fn verify(dev: &str, len: u64) -> Result<(), String> {
    let span = (32 * MIB).min(len / 2);
    let out = Command::new("fio")
        .args([
            "--name=verify",
            &format!("--filename={dev}"),
            "--rw=write",
            "--bssplit=4k/50:64k/25:1M/25",
            "--iodepth=32",
            "--direct=1",
            "--ioengine=libaio",
            &format!("--offset={}", len - span),
            &format!("--size={span}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randrepeat=0",
            // No verify-state file in the current directory.
            "--verify_state_save=0",
        ])
        .output()
        .await
        .map_err(|e| format!("fio: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // fio's job header also says "verify"; the failure is on a line of its own.
        let first = text
            .lines()
            .find(|l| l.contains("bad") || l.contains("fio:") || l.contains("error"))
            .unwrap_or("fio failed")
            .trim()
            .to_string();
        Err(first)
    }
}

/// Runs every job on every side, `b.runs` times, rotating which side goes first.
async fn measure(b: &Bench, sides: &[Side], len: u64) -> Res<Results> {
    let secs = if b.quick { 1 } else { JOB_SECS };
    let mut res: Results = vec![vec![Vec::new(); JOBS.len()]; sides.len()];
    for run in 0..b.runs {
        println!("  run {} (load average {})", run + 1, load_average());
        for (j, job) in JOBS.iter().enumerate() {
            let mut line = format!("    {}:", job.name());
            for k in 0..sides.len() {
                let s = (run + j + k) % sides.len();
                sync().await;
                // A failed job is shown as failed; the other sides and jobs still run.
                let (iops, bw) = match run_fio(&sides[s].dev, job, len, secs).await {
                    Ok(r) => r,
                    Err(e) => {
                        let e = e.to_string();
                        println!(
                            "    {} on {}: {}",
                            job.name(),
                            sides[s].label,
                            log_tail(&e, 2)
                        );
                        (f64::NAN, f64::NAN)
                    }
                };
                let _ = write!(line, " {} {}", sides[s].label, cell(job, iops, bw));
                res[s][j].push((iops, bw));
            }
            println!("{line}");
        }
    }
    Ok(res)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn fmt_iops(iops: f64) -> String {
    if iops >= 10_000.0 {
        format!("{:.1}k", iops / 1000.0)
    } else {
        format!("{iops:.0}")
    }
}

/// IOPS for the random jobs, MB/s for the sequential ones.
fn cell(job: &Job, iops: f64, bw: f64) -> String {
    if iops.is_nan() {
        "failed".into()
    } else if job.sequential() {
        format!("{:.0} MB/s", bw / 1e6)
    } else {
        format!("{} IOPS", fmt_iops(iops))
    }
}

/// Prints the medians as a markdown table: one row per job, the plain loop device (side 0)
/// first, then each candidate as "ratio (figure)".
fn print_results(title: &str, sides: &[Side], res: &Results, len: u64, runs: usize, quick: bool) {
    let secs = if quick { 1 } else { JOB_SECS };
    println!();
    println!(
        "{title}: {} device, medians of {runs} run(s), load average now {}",
        fmt_bytes(len),
        load_average()
    );
    let mut head = String::from("| job |");
    let mut rule = String::from("|---|");
    for s in sides {
        let _ = write!(head, " {} |", s.label);
        rule.push_str("---|");
    }
    println!("{head}\n{rule}");
    for (j, job) in JOBS.iter().enumerate() {
        let fig = |s: usize| {
            let iops = median(res[s][j].iter().map(|r| r.0).collect());
            let bw = median(res[s][j].iter().map(|r| r.1).collect());
            (iops, bw)
        };
        let (ref_iops, ref_bw) = fig(0);
        let mut line = format!("| {} | {} |", job.name(), cell(job, ref_iops, ref_bw));
        for s in 1..sides.len() {
            let (iops, bw) = fig(s);
            let _ = write!(line, " {:.2}x ({}) |", iops / ref_iops, cell(job, iops, bw));
        }
        println!("{line}");
    }
    println!();
    for s in sides {
        let v = match &s.verified {
            None => String::new(),
            Some(Ok(())) => "; fio verify=crc32c: passed".into(),
            Some(Err(e)) => format!("; fio verify=crc32c: FAILED ({e})"),
        };
        println!("- {}: {}{v}", s.label, s.about);
    }
    let args = JOBS[0]
        .fio(len, secs)
        .args()
        .into_iter()
        .filter(|a| !a.starts_with("--rw") && !a.starts_with("--bs") && !a.starts_with("--iodepth"))
        .collect::<Vec<_>>()
        .join(" ");
    println!(
        "- fio per job: `fio {args} --rw=RW --bs=BS --iodepth=QD --filename=DEV`; sides \
         rotate their order from job to job and run to run"
    );
}

/// A plain loop device (losetup's defaults: buffered, 512-byte sectors) over a new sparse raw
/// file `len` bytes long in `dir`: the reference.
async fn plain_loop(dir: &Path, len: u64) -> Res<Side> {
    let raw = dir.join("plain.raw");
    std::fs::File::create(&raw)?.set_len(len)?;
    let dev = capture_checked("losetup", &["--find", "--show", &raw.to_string_lossy()]).await?;
    Ok(Side {
        label: "plain loop".into(),
        dev,
        about: format!(
            "`losetup --find --show {}` (defaults: buffered, 512-byte sectors), a sparse raw \
             file in {}",
            raw.display(),
            fs_type(dir).await
        ),
        verified: None,
    })
}

async fn detach(dev: &str) {
    let _ = capture("losetup", &["-d", dev]).await;
}

fn check_root(path: &str) -> bool {
    if is_root() && have_tool("fio") {
        return true;
    }
    println!("{path}: skipped: needs root (loop devices, FUSE, mounts) and fio (Debian fio)");
    false
}

/// The device size: a quarter of --size, at least 64 MiB and at most 1 GiB.
fn device_len(size: u64) -> u64 {
    (size / 4 / MIB * MIB).clamp(64 * MIB, GIB)
}

// ---------------------------------------------------------------------------------------------
// volume-io-fuse: the engine as it ships

pub(crate) async fn fuse(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    if !check_root("volume-io-fuse") {
        return Ok(vec![]);
    }
    let len = device_len(b.size);
    println!(
        "volume-io-fuse: a new empty {} volume of one `bicsi serve` (1 replica, block) vs a plain \
         loop device; load average {}",
        fmt_bytes(len),
        load_average()
    );
    let dir = b.work.join("volume-io-fuse");
    let disk = dir.join("disk");
    std::fs::create_dir_all(&disk)?;
    let guard = SweepOnDrop(dir.clone());
    let serve = Serve::start(&b.bicsi, &dir, &disk, &b.http).await?;
    let result = fuse_runs(b, checks, &serve, &dir, len).await;
    let log = serve.stop().await.unwrap_or_default();
    if result.is_err() {
        eprintln!("bicsi serve log (last lines):\n{}", log_tail(&log, 20));
    }
    drop(guard);
    result?;
    Ok(vec![])
}

async fn fuse_runs(b: &Bench, checks: &mut Checks, serve: &Serve, dir: &Path, len: u64) -> Res<()> {
    let mut csi = csi_connect(&serve.csi).await?;
    let cap = block_capability();
    let vol = csi
        .controller
        .create_volume(pb::CreateVolumeRequest {
            name: "volume-io-fuse".into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: len as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            parameters: HashMap::from([("numberOfReplicas".to_string(), "1".to_string())]),
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_err("CreateVolume", s))?
        .into_inner()
        .volume
        .ok_or("CreateVolume answered no volume")?
        .volume_id;
    let p = publish_until_ready(&mut csi, &vol, "bench", &cap, Duration::from_secs(60)).await?;
    let staging = dir.join("staging");
    let target = dir.join("target");
    std::fs::create_dir_all(&staging)?;
    let (staging_s, target_s) = (staging.display().to_string(), target.display().to_string());
    node_stage(&mut csi, &vol, &p, &staging_s, &cap).await?;
    node_publish(&mut csi, &vol, &p, &staging_s, &target_s, &cap).await?;

    let plain = plain_loop(dir, len).await?;
    let verified = verify(&target_s, len).await;
    checks.check(
        verified.is_ok(),
        format!("volume-io-fuse: a verified pattern reads back through the volume: {verified:?}"),
    );
    let sides = vec![
        plain,
        Side {
            label: "bicsi (FUSE, as shipped)".into(),
            dev: target_s.clone(),
            about: "the published block device of a bicsi volume: qemu-storage-daemon's FUSE \
                    export of the qcow2 replica (aio=threads, cache.direct=off), a buffered loop \
                    device, FUSE read-ahead 4 MiB"
                .into(),
            verified: Some(verified),
        },
    ];
    let result = measure(b, &sides, len).await;
    detach(&sides[0].dev).await;
    let peak = engines_under(dir)
        .into_iter()
        .filter_map(|pid| u32::try_from(pid).ok().and_then(vm_hwm))
        .max();
    detach_and_delete(&mut csi, &vol, target_s, staging_s).await?;
    let res = result?;
    print_results("volume-io-fuse", &sides, &res, len, b.runs, b.quick);
    if let Some(peak) = peak {
        println!(
            "- the volume's qemu-storage-daemon peaked at {}",
            fmt_bytes(peak)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// volume-io-fuse-tuned: qemu-storage-daemon 10.0's knobs

/// One way to start qemu-storage-daemon and its loop device.
struct Variant {
    label: &'static str,
    /// The file driver's `aio`: threads (qemu's default), native, io_uring.
    aio: &'static str,
    /// `cache.direct`: the replica opened with O_DIRECT.
    cache_direct: bool,
    /// `cache.no-flush`: flushes ignored (unsafe; measured to show what flushes cost).
    no_flush: bool,
    /// The export's node runs in an iothread instead of the main loop.
    iothread: bool,
    /// `losetup --direct-io=on`.
    loop_direct: bool,
    /// `losetup --sector-size`.
    sector: u32,
}

const VARIANTS: [Variant; 7] = [
    Variant {
        label: "as shipped",
        aio: "threads",
        cache_direct: false,
        no_flush: false,
        iothread: false,
        loop_direct: false,
        sector: 512,
    },
    Variant {
        label: "io_uring+direct",
        aio: "io_uring",
        cache_direct: true,
        no_flush: false,
        iothread: false,
        loop_direct: false,
        sector: 512,
    },
    Variant {
        label: "native+direct",
        aio: "native",
        cache_direct: true,
        no_flush: false,
        iothread: false,
        loop_direct: false,
        sector: 512,
    },
    Variant {
        label: "io_uring+direct+iothread",
        aio: "io_uring",
        cache_direct: true,
        no_flush: false,
        iothread: true,
        loop_direct: false,
        sector: 512,
    },
    Variant {
        label: "io_uring+direct+no-flush",
        aio: "io_uring",
        cache_direct: true,
        no_flush: true,
        iothread: false,
        loop_direct: false,
        sector: 512,
    },
    Variant {
        label: "io_uring+direct, loop dio",
        aio: "io_uring",
        cache_direct: true,
        no_flush: false,
        iothread: false,
        loop_direct: true,
        sector: 512,
    },
    Variant {
        label: "io_uring+direct, loop dio 4k",
        aio: "io_uring",
        cache_direct: true,
        no_flush: false,
        iothread: false,
        loop_direct: true,
        sector: 4096,
    },
];

impl Variant {
    fn about(&self) -> String {
        format!(
            "file driver aio={}, cache.direct={}, cache.no-flush={}{}; loop device \
             --direct-io={} --sector-size={}; FUSE read-ahead 4 MiB",
            self.aio,
            if self.cache_direct { "on" } else { "off" },
            if self.no_flush { "on" } else { "off" },
            if self.iothread {
                ", export in an iothread"
            } else {
                ""
            },
            if self.loop_direct { "on" } else { "off" },
            self.sector
        )
    }
}

/// Starts one qemu-storage-daemon for `v` (a qcow2 overlay on `backing`, exported over FUSE,
/// daemonized) and attaches a loop device; returns the device.
async fn start_variant(dir: &Path, backing: &Path, len: u64, v: &Variant) -> Res<String> {
    std::fs::create_dir_all(dir)?;
    let replica = dir.join("replica.qcow2");
    let export = dir.join("export");
    std::fs::File::create(&export)?;
    capture_checked(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &backing.to_string_lossy(),
            &replica.to_string_lossy(),
            &len.to_string(),
        ],
    )
    .await?;
    let file = serde_json::json!({"driver": "file", "node-name": "file0",
        "filename": replica.to_string_lossy(), "discard": "unmap", "aio": v.aio,
        "cache": {"direct": v.cache_direct, "no-flush": v.no_flush}});
    let fmt = serde_json::json!({"driver": "qcow2", "node-name": "replica0", "file": "file0",
        "discard": "unmap",
        "cache": {"direct": v.cache_direct, "no-flush": v.no_flush}});
    let mut exp = serde_json::json!({"type": "fuse", "id": "export0", "node-name": "replica0",
        "mountpoint": export.to_string_lossy(), "writable": true});
    let mut args: Vec<String> = Vec::new();
    if v.iothread {
        args.extend(["--object".into(), "iothread,id=io0".into()]);
        exp["iothread"] = "io0".into();
    }
    args.extend(["--blockdev".into(), file.to_string()]);
    args.extend(["--blockdev".into(), fmt.to_string()]);
    args.extend(["--export".into(), exp.to_string()]);
    args.extend([
        "--pidfile".into(),
        dir.join("pid").to_string_lossy().into_owned(),
        "--daemonize".into(),
    ]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    capture_checked("qemu-storage-daemon", &argv).await?;
    // What bicsi does (src/os/loopdev.rs): a 4 MiB read-ahead on the FUSE file's bdi, so a
    // buffered loop device's reads reach the export as large requests.
    let (major, minor) = {
        let m = std::fs::metadata(&export)?;
        (
            nix::sys::stat::major(m.dev()),
            nix::sys::stat::minor(m.dev()),
        )
    };
    let _ = std::fs::write(
        format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"),
        "4096",
    );
    let sector = v.sector.to_string();
    let dev = capture_checked(
        "losetup",
        &[
            "--find",
            "--show",
            if v.loop_direct {
                "--direct-io=on"
            } else {
                "--direct-io=off"
            },
            "--sector-size",
            &sector,
            &export.to_string_lossy(),
        ],
    )
    .await?;
    Ok(dev)
}

/// Detaches the loop device, then stops the daemon (SIGTERM) and waits for its export to go.
async fn stop_variant(dir: &Path, dev: &str) {
    detach(dev).await;
    if let Some(pid) = std::fs::read_to_string(dir.join("pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let started = Instant::now();
        while alive(pid) && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The raw backing image of the overlays: the first `len` bytes of the bench's random image.
async fn backing_raw(b: &Bench, path: &Path, len: u64) -> Res<()> {
    let (src, dst) = (b.source.path.clone(), path.to_path_buf());
    let n = len.min(b.source.len);
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut r = std::fs::File::open(src)?.take(n);
        let mut w = std::fs::File::create(dst)?;
        std::io::copy(&mut r, &mut w)?;
        w.set_len(len)?;
        w.sync_all()
    })
    .await??;
    Ok(())
}

pub(crate) async fn fuse_tuned(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    if !check_root("volume-io-fuse-tuned") {
        return Ok(vec![]);
    }
    let len = device_len(b.size);
    let uring = std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "absent".into());
    println!(
        "volume-io-fuse-tuned: {} qcow2 overlays on a raw backing file, each served by its own \
         qemu-storage-daemon ({}) over FUSE with a loop device, vs a plain loop device; load \
         average {}; FUSE over io_uring (/sys/module/fuse/parameters/enable_uring): {uring} \
         (qemu 10.0's export does not use it either way)",
        fmt_bytes(len),
        capture("qemu-storage-daemon", &["--version"])
            .await
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or("version unknown"),
        load_average()
    );
    let dir = b.work.join("volume-io-fuse-tuned");
    std::fs::create_dir_all(&dir)?;
    let guard = SweepOnDrop(dir.clone());
    let backing = dir.join("backing.raw");
    backing_raw(b, &backing, len).await?;
    let mut sides = vec![plain_loop(&dir, len).await?];
    let mut started = Vec::new();
    let mut result = Ok(());
    for (i, v) in VARIANTS.iter().enumerate() {
        let vdir = dir.join(format!("v{i}"));
        match start_variant(&vdir, &backing, len, v).await {
            Ok(dev) => {
                started.push((vdir, dev.clone()));
                let verified = verify(&dev, len).await;
                println!("  {}: {dev}; verify: {verified:?}", v.label);
                sides.push(Side {
                    label: v.label.into(),
                    dev,
                    about: v.about(),
                    verified: Some(verified),
                });
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let res = match result {
        Ok(()) => measure(b, &sides, len).await,
        Err(e) => Err(e),
    };
    for (vdir, dev) in &started {
        stop_variant(vdir, dev).await;
    }
    detach(&sides[0].dev).await;
    drop(guard);
    let res = res?;
    print_results("volume-io-fuse-tuned", &sides, &res, len, b.runs, b.quick);
    // Only what bicsi ships must be correct; the other variants report, they do not fail.
    checks.check(
        sides[1].verified.as_ref().is_some_and(Result::is_ok),
        "volume-io-fuse-tuned: the as-shipped variant reads back a verified pattern",
    );
    Ok(vec![])
}

// ---------------------------------------------------------------------------------------------
// volume-io-loop-raw: reflink-cloned raw replicas on loop devices

pub(crate) async fn loop_raw(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    if !check_root("volume-io-loop-raw") {
        return Ok(vec![]);
    }
    if !have_tool("mkfs.xfs") {
        println!("volume-io-loop-raw: skipped: mkfs.xfs is missing (Debian package xfsprogs)");
        return Ok(vec![]);
    }
    let len = device_len(b.size);
    println!(
        "volume-io-loop-raw: {} raw replicas, reflink clones of a raw backing image, on loop \
         devices, in XFS (reflink=1) on a loop device, vs a plain loop device in the same XFS; \
         load average {}",
        fmt_bytes(len),
        load_average()
    );
    let dir = b.work.join("volume-io-loop-raw");
    std::fs::create_dir_all(&dir)?;
    let guard = SweepOnDrop(dir.clone());
    let xfs_len = 2 * b.size + 8 * len + GIB;
    let xfs = LoopMount::xfs(&dir.join("xfs.img"), &dir.join("xfs"), xfs_len).await?;
    let result = loop_raw_in(b, checks, &xfs.mnt, len).await;
    drop(xfs);
    drop(guard);
    result?;
    Ok(vec![])
}

async fn loop_raw_in(b: &Bench, checks: &mut Checks, mnt: &Path, len: u64) -> Res<()> {
    // The disk's backing image: a qcow2 (as downloaded) expanded once to raw on the disk.
    let src_raw = mnt.join("src.raw");
    backing_raw(b, &src_raw, len).await?;
    let qcow = mnt.join("backing.qcow2");
    let base = mnt.join("backing.raw");
    let (src_s, qcow_s, base_s) = (
        src_raw.to_string_lossy().into_owned(),
        qcow.to_string_lossy().into_owned(),
        base.to_string_lossy().into_owned(),
    );
    capture_checked(
        "qemu-img",
        &["convert", "-q", "-O", "qcow2", &src_s, &qcow_s],
    )
    .await?;
    std::fs::remove_file(&src_raw)?;
    let t = Instant::now();
    capture_checked(
        "qemu-img",
        &["convert", "-q", "-O", "raw", &qcow_s, &base_s],
    )
    .await?;
    let expand = t.elapsed();
    println!(
        "  expanding the {} qcow2 backing image to raw (qemu-img convert, not synced): {:.2} s",
        fmt_bytes(len),
        expand.as_secs_f64()
    );

    // The time to clone a whole image of --size (random data, fully allocated).
    let big = mnt.join("image.raw");
    let (src, dst) = (b.source.path.clone(), big.clone());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::copy(src, &dst)?;
        std::fs::File::open(&dst)?.sync_all()
    })
    .await??;
    let mut clone_secs = Vec::new();
    for i in 0..b.runs.max(3) {
        let c = mnt.join(format!("clone-{i}.raw"));
        sync().await;
        let t = Instant::now();
        capture_checked(
            "cp",
            &[
                "--reflink=always",
                &big.to_string_lossy(),
                &c.to_string_lossy(),
            ],
        )
        .await?;
        clone_secs.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(&c)?;
    }
    std::fs::remove_file(&big)?;
    let clone_med = median(clone_secs.clone());
    println!(
        "  reflink clone of a {} raw image (`cp --reflink=always`, FICLONE): median {:.1} ms \
         of {} [{}]",
        fmt_bytes(b.size),
        clone_med * 1000.0,
        clone_secs.len(),
        clone_secs
            .iter()
            .map(|s| format!("{:.1}", s * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut sides = vec![plain_loop(mnt, len).await?];
    let kinds: [(&str, &str, &str); 3] = [
        ("raw clone, loop dio", "on", "512"),
        ("raw clone, loop dio 4k", "on", "4096"),
        ("raw clone, loop buffered", "off", "512"),
    ];
    let mut result = Ok(());
    for (i, (label, dio, sector)) in kinds.iter().enumerate() {
        let replica = mnt.join(format!("replica-{i}.raw"));
        let replica_s = replica.to_string_lossy().into_owned();
        let made = async {
            capture_checked("cp", &["--reflink=always", &base_s, &replica_s]).await?;
            capture_checked(
                "losetup",
                &[
                    "--find",
                    "--show",
                    &format!("--direct-io={dio}"),
                    "--sector-size",
                    sector,
                    &replica_s,
                ],
            )
            .await
        }
        .await;
        match made {
            Ok(dev) => {
                let dio_now = std::fs::read_to_string(format!(
                    "/sys/block/{}/loop/dio",
                    dev.trim_start_matches("/dev/")
                ))
                .unwrap_or_default();
                let verified = verify(&dev, len).await;
                println!(
                    "  {label}: {dev} (dio={}); verify: {verified:?}",
                    dio_now.trim()
                );
                sides.push(Side {
                    label: (*label).into(),
                    dev,
                    about: format!(
                        "`cp --reflink=always backing.raw replica.raw` then `losetup \
                         --direct-io={dio} --sector-size {sector}` (sysfs dio={})",
                        dio_now.trim()
                    ),
                    verified: Some(verified),
                });
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let res = match result {
        Ok(()) => measure(b, &sides, len).await,
        Err(e) => Err(e),
    };
    for s in &sides {
        detach(&s.dev).await;
    }
    let res = res?;
    print_results("volume-io-loop-raw", &sides, &res, len, b.runs, b.quick);
    println!(
        "- reflink clone of a {} image: median {:.1} ms",
        fmt_bytes(b.size),
        clone_med * 1000.0
    );
    for s in &sides[1..] {
        checks.check(
            s.verified.as_ref().is_some_and(Result::is_ok),
            format!(
                "volume-io-loop-raw: {} reads back a verified pattern",
                s.label
            ),
        );
    }
    Ok(())
}
