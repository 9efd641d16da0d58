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

mod fuse;
mod fuse_tuned;
mod loop_raw;
pub(crate) mod mirror;

pub(crate) use fuse::fuse;
pub(crate) use fuse_tuned::fuse_tuned;
pub(crate) use loop_raw::loop_raw;
pub(crate) use mirror::{cow_engine, mirror_engine, mirror_remote, mirror_tuned};

use super::*;

#[path = "volume_engine.rs"]
mod volume_engine;
pub(crate) use volume_engine::loop_engine;

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

/// A candidate's device (`shown` as printed), its pattern verified (see [`verify`]) and said.
async fn verified_side(label: &str, dev: String, shown: String, about: String, len: u64) -> Side {
    let verified = verify(&dev, len).await;
    println!("  {label}: {shown}; verify: {verified:?}");
    Side {
        label: label.into(),
        dev,
        about,
        verified: Some(verified),
    }
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
