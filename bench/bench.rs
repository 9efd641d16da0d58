//! `bicsi-bench`: times bicsi's data paths against their references in the same run and prints
//! one table row per path (median [min–max] of N runs each side, the ratio, bicsi's peak
//! resident memory). Run it through `bench/run`, which builds it and gives it a temp directory.
//!
//! Everything happens on this machine over 127.0.0.1: the images (an incompressible random file,
//! and sparse ones with 1 MiB of random data at every 4th MiB) are served by an in-process HTTP
//! server (axum, streamed from disk in 1 MiB chunks, with Content-Length and Range), bicsi is a
//! fresh `bicsi serve` child (or a `bicsi controller` and two `bicsi node` agents) per run on a
//! fresh data dir, and the references are shell commands (curl, cp, coreutils) writing to the
//! same filesystem.
//!
//! Paths: download + verify; same-node sync on ext4 (the work dir's filesystem) and on XFS with
//! reflink (a loop-mounted file, root only); cross-node sync between two node agents; attach of
//! a new volume for two image sizes (root only). Every process, mount, loop device and
//! qemu-storage-daemon a run leaves behind is removed by a guard ([`SweepOnDrop`]), also on
//! failure. The volume engine candidates of issue 14 (`engines`) print their own tables of
//! IOPS and throughput and run only when named.
//!
//! Adding a path: write an `async fn(&Bench, &mut Checks) -> Res<Vec<Row>>` like
//! [`download_verify`] (time bicsi and its reference in the same runs, alternating their order)
//! and list it in [`PathName`] and `run_path`. Correctness checks go through [`Checks`]: a failed
//! check makes the whole run exit non-zero; times are reported, never asserted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom, Write as _};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bicsi::client::CsiClient;
use bicsi::csi::pb;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use sha2::{Digest, Sha512};
use tokio::process::Command;

use fio::FioJob;
use kit::{alive, engines_under, have_tool, is_root, try_free_port};

#[path = "../tests/kit/host.rs"]
mod kit;

mod control;
mod create_downloading;
mod engines;
mod fio;
mod volume_io;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Chunk size of the file server and of the generator.
const CHUNK: usize = 1 << 20;
/// The issue's memory bound for the node agent while it moves a 2 GiB image.
const RSS_BOUND: u64 = 32 * MIB;
/// How often a backing image's state is polled while timing.
const POLL: Duration = Duration::from_millis(10);
/// Environment variables that would send HTTP through a proxy: removed for every child.
const PROXY_VARS: [&str; 8] = [
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
];

#[derive(Parser, Debug)]
#[command(
    name = "bicsi-bench",
    about = "Times bicsi's data paths against their references"
)]
struct Args {
    /// Image size (1GiB, 512MiB, 256Mi, 2G = 2 GiB, 3GB = 3e9 bytes, or bytes). Default 1GiB,
    /// 64MiB with --quick.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Runs per side. Default 5, 1 with --quick.
    #[arg(long)]
    runs: Option<usize>,
    /// Smoke run (64MiB, 1 run): checks correctness, says nothing about speed.
    #[arg(long)]
    quick: bool,
    /// Scratch directory (created if missing): the image, bicsi's data dirs and the references'
    /// files all go here, so both sides write to the same filesystem. bench/run gives a mktemp
    /// dir and removes it.
    #[arg(long)]
    work_dir: PathBuf,
    /// The bicsi binary (default: `bicsi` next to this binary).
    #[arg(long)]
    bicsi: Option<PathBuf>,
    /// Paths to run (repeatable; default: all).
    #[arg(long = "path", value_enum)]
    paths: Vec<PathName>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PathName {
    /// URL to a ready, verified file vs `curl -o FILE URL && sha512sum FILE`.
    DownloadVerify,
    /// Second disk of the same node ready (ext4, the work dir's filesystem) vs
    /// `cp --sparse=always`.
    SyncExt4,
    /// Second disk of the same node ready on XFS with reflink (loop-mounted; root) vs
    /// `cp --reflink=always`.
    SyncXfs,
    /// Another node's disk ready (HTTP between two node agents) vs curl of the same stream.
    SyncCross,
    /// The same with the sender's chunk manifest removed first: the receiver falls back to the
    /// SHA-512 of the whole logical content (as before manifests, and for files without one).
    SyncCrossSha512,
    /// CreateVolume + ControllerPublish + NodeStage + NodePublish of a new volume, for a 1x and a
    /// 4x image (root).
    Attach,
    /// CreateVolume and DeleteVolume at 1 and 32 concurrent clients over the CSI socket vs
    /// `qemu-img create` + `sync` and `rm -r` at the same concurrency.
    Control,
    /// fio (or dd) through a published volume vs a plain loop device over a raw file (root).
    VolumeIo,
    /// CreateVolume of volumes from a backing image whose download is still under way (it
    /// stalls on purpose) vs CreateVolume of plain volumes; target: median under 100 ms.
    CreateDownloading,
    /// Engine candidates (issue 14), not run by default: bicsi's volume as shipped, with fio's
    /// job matrix (seq 1M / rand 4k, read / write, depth 1 / 32) vs a plain loop device.
    VolumeIoFuse,
    /// qemu-storage-daemon 10.0 started by hand with each of its knobs, same jobs.
    VolumeIoFuseTuned,
    /// Raw replicas cloned by reflink on XFS, attached straight to loop devices, same jobs;
    /// and the time to clone an image.
    VolumeIoLoopRaw,
}

impl PathName {
    /// Every path but the engine candidates, which take minutes each (name them to run them).
    fn all() -> Vec<PathName> {
        PathName::value_variants()
            .iter()
            .copied()
            .filter(|p| {
                !matches!(
                    p,
                    PathName::VolumeIoFuse
                        | PathName::VolumeIoFuseTuned
                        | PathName::VolumeIoLoopRaw
                )
            })
            .collect()
    }
}

/// Everything a path needs: the image, where to work, what to run.
struct Bench {
    work: PathBuf,
    bicsi: PathBuf,
    runs: usize,
    /// --quick: a smoke run.
    quick: bool,
    /// The --size option.
    size: u64,
    source: Source,
    /// URL of `source` on the in-process file server.
    url: String,
    /// Sparse images by length (1 MiB of random data at every 4th MiB), served at
    /// `{files}/sparse-{len}`.
    sparse: BTreeMap<u64, Source>,
    /// Base URL of the in-process file server.
    files: String,
    /// Client for bicsi's HTTP API (no proxy).
    http: reqwest::Client,
}

/// The random image on disk.
struct Source {
    path: PathBuf,
    len: u64,
    sha512: String,
    /// Bytes allocated on disk (st_blocks × 512).
    allocated: u64,
}

// ---------------------------------------------------------------------------------------------
// Results

/// Durations of the runs of one side, in seconds.
#[derive(Clone, Debug, Default)]
struct Stats(Vec<f64>);

impl Stats {
    fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64());
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    /// `6.62 s [6.40–7.01]`; three decimals when every run took under a second.
    fn show(&self) -> String {
        let p = if self.max() < 1.0 { 3 } else { 2 };
        if self.0.len() == 1 {
            format!("{:.p$} s", self.median())
        } else {
            format!(
                "{:.p$} s [{:.p$}–{:.p$}]",
                self.median(),
                self.min(),
                self.max()
            )
        }
    }
}

/// One line of the result table: bicsi and its reference on one path, from the same runs.
struct Row {
    path: String,
    bicsi: Stats,
    reference: Stats,
    ref_name: String,
    /// Largest VmHWM of the bicsi process over the runs.
    peak_rss: Option<u64>,
    /// Printed under the table: what the figures include, the bound.
    note: Option<String>,
}

fn print_table(rows: &[Row]) {
    let header = [
        "path",
        "bicsi median [min–max]",
        "reference",
        "reference median [min–max]",
        "bicsi / ref",
        "bicsi peak RSS",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.path.clone(),
                r.bicsi.show(),
                format!("`{}`", r.ref_name.replace('|', "\\|")),
                r.reference.show(),
                format!("{:.2}", r.bicsi.median() / r.reference.median()),
                r.peak_rss.map_or("n/a".into(), fmt_bytes),
            ]
        })
        .collect();
    let mut width = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let mut s = String::from("|");
        for (c, w) in cols.iter().zip(width) {
            let pad = w - c.chars().count();
            let _ = write!(s, " {c}{} |", " ".repeat(pad));
        }
        println!("{s}");
    };
    line(&header.map(String::from));
    line(&width.map(|w| "-".repeat(w)));
    for row in &cells {
        line(row);
    }
}

/// Correctness checks: printed as they happen; any failure makes the run exit 1.
#[derive(Default)]
struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, what: impl Into<String>) -> bool {
        let what = what.into();
        if !ok {
            println!("  CHECK FAILED: {what}");
            self.failed.push(what);
        }
        ok
    }
}

// ---------------------------------------------------------------------------------------------
// main

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    let work = args.work_dir.clone();
    let outcome = tokio::select! {
        r = run(args) => r,
        what = stop_signal() => {
            // The run future is dropped by now: its guards killed bicsi, unmounted and swept
            // what they own. Sweep the whole work dir once more for anything in between.
            if let Ok(work) = work.canonicalize() {
                report_leftovers("after the interruption", &kit::sweep(&work, SWEEP_GRACE));
            }
            Err(format!("stopped by {what}").into())
        }
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bicsi-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT with the signal's name.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

async fn run(args: Args) -> Res<bool> {
    let size = args.size.unwrap_or(if args.quick { 64 * MIB } else { GIB });
    let runs = args.runs.unwrap_or(if args.quick { 1 } else { 5 });
    if runs == 0 || size == 0 {
        return Err("--runs and --size must be at least 1".into());
    }
    let bicsi = match args.bicsi {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .ok_or("no directory for the current executable")?
            .join("bicsi"),
    };
    if !bicsi.is_file() {
        return Err(format!("bicsi binary {} not found", bicsi.display()).into());
    }
    std::fs::create_dir_all(&args.work_dir)
        .map_err(|e| format!("cannot create {}: {e}", args.work_dir.display()))?;
    let work = args.work_dir.canonicalize()?;
    let _ = WORK_DIR.set(work.clone());
    let paths = if args.paths.is_empty() {
        PathName::all()
    } else {
        args.paths.clone()
    };

    print_header(&work, size, runs, args.quick).await;

    let started = Instant::now();
    let source = generate(work.join("image.raw"), size).await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "image:    {} of /dev/urandom data, generated in {secs:.1} s, sha512 {}…",
        fmt_bytes(size),
        &source.sha512[..16]
    );

    // Sparse images: the sync paths use one of --size, attach one of 1x and one of 4x.
    let mut sparse_lens = BTreeSet::new();
    if paths.iter().any(|p| {
        matches!(
            p,
            PathName::SyncExt4
                | PathName::SyncXfs
                | PathName::SyncCross
                | PathName::SyncCrossSha512
        )
    }) {
        sparse_lens.insert(size);
    }
    if paths.contains(&PathName::Attach) {
        let one = attach_unit(size);
        sparse_lens.extend([one, 4 * one]);
    }
    if paths.contains(&PathName::Control) || paths.contains(&PathName::CreateDownloading) {
        sparse_lens.insert(attach_unit(size));
    }
    let mut sparse = BTreeMap::new();
    for len in sparse_lens {
        let started = Instant::now();
        let s = generate_sparse(work.join(format!("sparse-{len}.raw")), len).await?;
        println!(
            "image:    {} sparse (1 MiB of /dev/urandom data at every 4th MiB: {} allocated), \
             generated in {:.1} s, sha512 {}…",
            fmt_bytes(len),
            fmt_bytes(s.allocated),
            started.elapsed().as_secs_f64(),
            &s.sha512[..16]
        );
        sparse.insert(len, s);
    }

    let mut served = vec![("image".to_string(), source.path.clone(), size)];
    for (len, s) in &sparse {
        served.push((format!("sparse-{len}"), s.path.clone(), *len));
    }
    let files = start_file_server(served).await?;
    let url = format!("{files}/image");
    let rate = curl_rate(&url, size).await?;
    println!(
        "server:   {url} (in-process axum, 1 MiB chunks from a warm page cache); \
         `curl -o /dev/null` {} (median of 3)",
        fmt_rate(rate)
    );
    println!();

    let bench = Bench {
        work,
        bicsi,
        runs,
        quick: args.quick,
        size,
        source,
        url,
        sparse,
        files,
        http: reqwest::Client::builder().no_proxy().build()?,
    };
    let mut checks = Checks::default();
    let mut rows = Vec::new();
    for p in paths {
        let result = run_path(p, &bench, &mut checks).await;
        // Whatever the path left behind (it cleans up itself; this is the last resort).
        report_leftovers("after the path", &kit::sweep(&bench.work, SWEEP_GRACE));
        rows.extend(result?);
        println!();
    }

    print_table(&rows);
    println!();
    for r in &rows {
        if let Some(note) = &r.note {
            println!("- {}: {note}", r.path);
        }
    }
    for r in &rows {
        if let Some(peak) = r.peak_rss {
            println!(
                "{} vs `{}`: bicsi/ref {:.2} (median), bicsi peak RSS {} ({} {})",
                r.path,
                r.ref_name,
                r.bicsi.median() / r.reference.median(),
                fmt_bytes(peak),
                if peak <= RSS_BOUND { "under" } else { "OVER" },
                fmt_bytes(RSS_BOUND)
            );
        }
    }
    println!("load average at the end: {}", load_average());
    if checks.failed.is_empty() {
        println!("checks: all passed");
        Ok(true)
    } else {
        println!("checks: {} FAILED", checks.failed.len());
        for f in &checks.failed {
            println!("  - {f}");
        }
        Ok(false)
    }
}

async fn run_path(p: PathName, b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    match p {
        PathName::DownloadVerify => download_verify(b, checks).await,
        PathName::SyncExt4 => sync_ext4(b, checks).await,
        PathName::SyncXfs => sync_xfs(b, checks).await,
        PathName::SyncCross => sync_cross(b, checks, true).await,
        PathName::SyncCrossSha512 => sync_cross(b, checks, false).await,
        PathName::Attach => attach(b, checks).await,
        PathName::Control => control::control(b, checks).await,
        PathName::VolumeIo => volume_io::volume_io(b, checks).await,
        PathName::CreateDownloading => create_downloading::create_downloading(b, checks).await,
        PathName::VolumeIoFuse => engines::fuse(b, checks).await,
        PathName::VolumeIoFuseTuned => engines::fuse_tuned(b, checks).await,
        PathName::VolumeIoLoopRaw => engines::loop_raw(b, checks).await,
    }
}

async fn print_header(work: &Path, size: u64, runs: usize, quick: bool) {
    let command = std::env::var("BICSI_BENCH_COMMAND").unwrap_or_else(|_| {
        std::env::args()
            .map(|a| shell_quote(&a))
            .collect::<Vec<_>>()
            .join(" ")
    });
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown cpu", |(_, m)| m.trim())
        .to_string();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| kib_field(&s, "MemTotal:"))
        .map_or("unknown".into(), fmt_bytes);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("unknown".into(), |s| s.trim().to_string());
    let dir = work.to_string_lossy();
    let fs = match capture("findmnt", &["-n", "-o", "FSTYPE", "-T", &dir]).await {
        Ok(fs) => fs,
        Err(_) => capture("stat", &["-f", "-c", "%T", &dir])
            .await
            .unwrap_or_else(|_| "unknown".into()),
    };
    let curl = capture("curl", &["--version"])
        .await
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).map(String::from))
        .unwrap_or_else(|| "?".into());
    println!("command:  {command}");
    println!(
        "machine:  {cpus} cpus ({model}), {mem} memory, kernel {kernel}, \
         work dir {} on {fs}; curl {curl}; load average {}",
        work.display(),
        load_average()
    );
    println!(
        "settings: {} image, {runs} run(s) per side{}; medians [min–max]; \
         `sync` before each side's run; source file warm in page cache for both sides",
        fmt_bytes(size),
        if quick {
            " (--quick: smoke run, times mean nothing)"
        } else {
            ""
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Path: download + verify

/// URL to a ready, verified file: bicsi (POST of a BackingImage with its checksum until its file
/// is `ready`, on a fresh `bicsi serve`) against `curl -o FILE URL && sha512sum FILE` and
/// `curl URL | tee FILE | sha512sum`, the three alternating their order from run to run.
async fn download_verify(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    const REFS: [(&str, &str); 2] = [
        (
            "curl -o FILE URL && sha512sum FILE",
            r#"curl -sS --fail --noproxy '*' -o "$1" "$2" && sha512sum "$1""#,
        ),
        (
            "curl URL | tee FILE | sha512sum",
            r#"curl -sS --fail --noproxy '*' "$2" | tee "$1" | sha512sum"#,
        ),
    ];
    println!(
        "download + verify: {} runs; bicsi = POST /v1/backingimages (with checksum) until state \
         ready, fresh `bicsi serve` per run; bicsi's file is fdatasynced, the references' are not",
        b.runs
    );
    let mut bicsi = Stats::default();
    let mut refs: [Stats; 2] = Default::default();
    let mut peak: Option<u64> = None;
    for run in 0..b.runs {
        let mut notes = Vec::new();
        // Rotate the order, so no side always goes first (or right after another's writeback).
        for k in 0..3 {
            match (run + k) % 3 {
                0 => {
                    let r = bicsi_download(b, run).await?;
                    bicsi.push(r.elapsed);
                    peak = peak.max(r.vm_hwm);
                    checks.check(
                        r.checksum == b.source.sha512,
                        format!(
                            "run {}: bicsi's checksum {} != sha512sum's {}",
                            run + 1,
                            r.checksum,
                            b.source.sha512
                        ),
                    );
                    notes.push(r.describe(b.source.len));
                }
                i => {
                    let (name, script) = REFS[i - 1];
                    let (elapsed, sha) = reference(b, script).await?;
                    refs[i - 1].push(elapsed);
                    checks.check(
                        sha == b.source.sha512,
                        format!("run {}: `{name}` gave {sha}", run + 1),
                    );
                    notes.push(format!("`{name}` {:.2} s", elapsed.as_secs_f64()));
                }
            }
        }
        println!("  run {}: {}", run + 1, notes.join("\n         "));
    }
    Ok(REFS
        .iter()
        .zip(refs)
        .map(|((name, _), reference)| Row {
            path: "download + verify".into(),
            bicsi: bicsi.clone(),
            reference,
            ref_name: (*name).into(),
            peak_rss: peak,
            note: None,
        })
        .collect())
}

/// What one bicsi download run measured.
struct BicsiRun {
    elapsed: Duration,
    checksum: String,
    vm_hwm: Option<u64>,
    /// RssAnon and RssFile of the idle process, just before the POST.
    idle: (u64, u64),
    /// Peaks sampled at each poll while downloading: anonymous and file-backed resident memory,
    /// and threads.
    anon_peak: u64,
    file_peak: u64,
    threads_peak: u64,
    /// Bytes of the ready file in the page cache, when fincore is there.
    cached: Option<u64>,
    /// The download's own time as bicsi logged it ("download done secs=…").
    logged_secs: Option<f64>,
    /// /proc/PID/smaps_rollup at the end, when the peak was over the bound.
    smaps: Option<String>,
    /// CPU seconds (user+system) of the process since it started, and of each of its threads
    /// still alive when the file was ready (busiest first).
    cpu: Option<(f64, Vec<(String, f64)>)>,
}

impl BicsiRun {
    fn describe(&self, len: u64) -> String {
        let secs = self.elapsed.as_secs_f64();
        let mut s = format!(
            "bicsi {secs:.2} s ({}",
            fmt_rate(len as f64 / secs.max(1e-9))
        );
        if let Some(d) = self.logged_secs {
            let _ = write!(s, "; download {d:.2} s + rest {:.2} s", secs - d);
        }
        let _ = write!(
            s,
            "), VmHWM {} (idle before the POST: RssAnon {}, RssFile {}; \
             sampled peaks: RssAnon {}, RssFile {}, {} threads), \
             page cache of the ready file {}, checksum {}",
            self.vm_hwm.map_or("n/a".into(), fmt_bytes),
            fmt_bytes(self.idle.0),
            fmt_bytes(self.idle.1),
            fmt_bytes(self.anon_peak),
            fmt_bytes(self.file_peak),
            self.threads_peak,
            self.cached.map_or("n/a".into(), fmt_bytes),
            if self.checksum.len() >= 16 {
                format!("{}…", &self.checksum[..16])
            } else {
                format!("{:?}", self.checksum)
            }
        );
        if let Some((total, threads)) = &self.cpu {
            let busy: Vec<String> = threads
                .iter()
                .filter(|(_, t)| *t >= 0.05)
                .map(|(name, t)| format!("{t:.2} {name}"))
                .collect();
            let _ = write!(
                s,
                "\n         cpu {total:.2} s in all; busiest threads (s): {}",
                busy.join(", ")
            );
        }
        if let Some(smaps) = &self.smaps {
            let kb = |k: &str| kib_field(smaps, k).map_or("?".into(), fmt_bytes);
            let _ = write!(
                s,
                "\n         over {} (smaps_rollup when ready: Rss {}, Anonymous {}, Pss_File {}, \
                 Private_Dirty {})",
                fmt_bytes(RSS_BOUND),
                kb("Rss:"),
                kb("Anonymous:"),
                kb("Pss_File:"),
                kb("Private_Dirty:")
            );
        }
        s
    }
}

async fn bicsi_download(b: &Bench, run: usize) -> Res<BicsiRun> {
    let dir = b.work.join(format!("bicsi-{run}"));
    let disk = dir.join("disk");
    std::fs::create_dir_all(&disk)?;
    let serve = Serve::start(&b.bicsi, &dir, &disk, &b.http).await?;
    let name = format!("bench-{run}");
    let result = async {
        let st = proc_status(serve.pid).unwrap_or_default();
        let idle = (
            kib_field(&st, "RssAnon:").unwrap_or(0),
            kib_field(&st, "RssFile:").unwrap_or(0),
        );
        sync().await;
        let body = serde_json::json!({
            "apiVersion": "longhorn.io/v1beta2",
            "kind": "BackingImage",
            "metadata": { "name": name },
            "spec": {
                "sourceType": "download",
                "sourceParameters": { "url": b.url },
                "checksum": b.source.sha512,
            },
        });
        let started = Instant::now();
        let resp = b
            .http
            .post(format!("{}/v1/backingimages", serve.api))
            .json(&body)
            .send()
            .await?;
        if !resp.status().is_success() {
            let status = resp.status();
            return Err(format!("POST backing image: {status}: {}", resp.text().await?).into());
        }
        let deadline = Duration::from_secs(120 + b.source.len / (5 * MIB));
        let (mut anon_peak, mut file_peak, mut threads_peak) = (0, 0, 0);
        let obj = loop {
            if let Some(st) = proc_status(serve.pid) {
                anon_peak = anon_peak.max(kib_field(&st, "RssAnon:").unwrap_or(0));
                file_peak = file_peak.max(kib_field(&st, "RssFile:").unwrap_or(0));
                let threads = field(&st, "Threads:").and_then(|v| v.parse().ok());
                threads_peak = threads_peak.max(threads.unwrap_or(0));
            }
            let obj = serve.get(&format!("/v1/backingimages/{name}")).await?;
            let file = obj["status"]["diskFileStatusMap"]
                .as_object()
                .and_then(|m| m.values().next().cloned());
            match file.as_ref().and_then(|f| f["state"].as_str()) {
                Some("ready") => break obj,
                Some("failed") => {
                    return Err(format!(
                        "bicsi: backing image failed: {}",
                        file.as_ref()
                            .map_or("", |f| f["message"].as_str().unwrap_or(""))
                    )
                    .into());
                }
                _ if started.elapsed() > deadline => {
                    return Err(format!("bicsi: not ready after {deadline:?}: {obj}").into());
                }
                _ => tokio::time::sleep(POLL).await,
            }
        };
        let elapsed = started.elapsed();
        let status = proc_status(serve.pid);
        let vm_hwm = status.as_deref().and_then(|s| kib_field(s, "VmHWM:"));
        let smaps = vm_hwm.filter(|&h| h > RSS_BOUND).and_then(|_| {
            std::fs::read_to_string(format!("/proc/{}/smaps_rollup", serve.pid)).ok()
        });
        let cpu = cpu_usage(serve.pid);
        let cached = match ready_file(&disk, &name) {
            Some(f) => fincore(&f).await,
            None => None,
        };
        Ok(BicsiRun {
            elapsed,
            checksum: obj["status"]["checksum"].as_str().unwrap_or("").to_string(),
            vm_hwm,
            idle,
            anon_peak,
            file_peak,
            threads_peak,
            cached,
            logged_secs: None,
            smaps,
            cpu,
        })
    }
    .await;
    let log = serve.stop().await;
    let result = result.map(|mut r| {
        r.logged_secs = log.as_deref().ok().and_then(download_secs);
        r
    });
    if let (Err(_), Ok(log)) = (&result, &log) {
        eprintln!("bicsi serve log (last lines):");
        for l in log
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            eprintln!("  {l}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `<disk>/backing-images/<name>-<uuid>/backing`
fn ready_file(disk: &Path, name: &str) -> Option<PathBuf> {
    let prefix = format!("{name}-");
    std::fs::read_dir(disk.join("backing-images"))
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path().join("backing"))
        .filter(|p| p.is_file())
}

/// The `secs=` of bicsi's "download done" log line.
fn download_secs(log: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains("download done"))?;
    let line = strip_ansi(line);
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("secs="))
        .and_then(|v| v.parse().ok())
}

/// Runs a reference script (`$1` = FILE, `$2` = URL) and returns its time and the SHA-512 that
/// sha512sum printed. FILE sits in the work dir, next to bicsi's disks, and is removed after.
async fn reference(b: &Bench, script: &str) -> Res<(Duration, String)> {
    let file = b.work.join("reference.out");
    sync().await;
    let started = Instant::now();
    let out = child_command("bash")
        .arg("-c")
        .arg(format!("set -o pipefail; {script}"))
        .arg("reference")
        .arg(&file)
        .arg(&b.url)
        .stdin(Stdio::null())
        .output()
        .await?;
    let elapsed = started.elapsed();
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        return Err(format!(
            "reference `{script}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let sha = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    Ok((elapsed, sha))
}

// ---------------------------------------------------------------------------------------------
// Paths: same-node sync (ext4, XFS reflink)

/// Smallest XFS filesystem mkfs.xfs makes (it refuses under 300 MB).
const XFS_MIN: u64 = 512 * MIB;

impl Bench {
    fn sparse_image(&self, len: u64) -> Res<&Source> {
        Ok(self
            .sparse
            .get(&len)
            .ok_or_else(|| format!("no sparse image of {len} bytes was generated"))?)
    }

    fn sparse_url(&self, len: u64) -> String {
        format!("{}/sparse-{len}", self.files)
    }
}

/// How long a file of `len` bytes may take to get ready anywhere.
fn file_deadline(len: u64) -> Duration {
    Duration::from_secs(120 + len / (5 * MIB))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SameNode {
    Ext4,
    XfsReflink,
}

impl SameNode {
    fn label(self) -> &'static str {
        match self {
            SameNode::Ext4 => "same-node sync, ext4",
            SameNode::XfsReflink => "same-node sync, XFS reflink",
        }
    }

    /// The reference's name and script (`$1` = SRC, `$2` = DST).
    fn reference(self) -> (&'static str, &'static str) {
        match self {
            SameNode::Ext4 => (
                "cp --sparse=always SRC DST && sync DST",
                r#"cp --sparse=always "$1" "$2" && sync "$2""#,
            ),
            SameNode::XfsReflink => (
                "cp --reflink=always SRC DST && sync DST",
                r#"cp --reflink=always "$1" "$2" && sync "$2""#,
            ),
        }
    }
}

async fn sync_ext4(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    let fs = fs_type(&b.work).await;
    if fs != "ext4" {
        println!(
            "{}: note: the work dir is on {fs}, not ext4; measuring there anyway",
            SameNode::Ext4.label()
        );
    }
    same_node_sync(b, checks, &b.work.join("sync-ext4"), SameNode::Ext4).await
}

async fn sync_xfs(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    let label = SameNode::XfsReflink.label();
    if !is_root() {
        println!("{label}: skipped: needs root");
        return Ok(vec![]);
    }
    for (tool, package) in [
        ("mkfs.xfs", "xfsprogs"),
        ("losetup", "mount"),
        ("mount", "mount"),
        ("umount", "mount"),
    ] {
        if !have_tool(tool) {
            println!("{label}: skipped: {tool} is missing (Debian package {package})");
            return Ok(vec![]);
        }
    }
    let len = (2 * b.size).max(XFS_MIN);
    let started = Instant::now();
    let fs = LoopMount::xfs(&b.work.join("xfs.img"), &b.work.join("xfs"), len).await?;
    println!(
        "{label}: XFS (mkfs.xfs -q -m reflink=1) in a {} sparse file on {}, mounted at {} \
         in {:.2} s",
        fmt_bytes(len),
        fs.dev.as_deref().unwrap_or("?"),
        fs.mnt.display(),
        started.elapsed().as_secs_f64()
    );
    let rows = same_node_sync(b, checks, &fs.mnt.clone(), SameNode::XfsReflink).await;
    drop(fs); // unmount, losetup -d, remove the file
    rows
}

/// What one run of a sync path measured, both sides.
#[derive(Default)]
struct SyncRun {
    bicsi: Duration,
    reference: Duration,
    vm_hwm: Option<u64>,
    /// Whether VmHWM was reset (`/proc/PID/clear_refs`) just before the publish.
    hwm_reset: bool,
    /// Cross-node: bytes on the wire (the extent stream) and data bytes the receiver logged,
    /// the manifest's bytes it fetched besides, how it verified, bytes curl received.
    wire: Option<u64>,
    data: Option<u64>,
    manifest: Option<u64>,
    verified: Option<String>,
    curl_bytes: u64,
    notes: Vec<String>,
}

/// Same-node sync: a fresh `bicsi serve` with disks A and B under `base` per run, the image
/// downloaded to one of them (untimed), then ControllerPublishVolume of a 2-replica volume until
/// it succeeds (the file on the other disk ready) against the reference's copy of that file.
async fn same_node_sync(
    b: &Bench,
    checks: &mut Checks,
    base: &Path,
    kind: SameNode,
) -> Res<Vec<Row>> {
    let src = b.sparse_image(b.size)?;
    let (ref_name, _) = kind.reference();
    println!(
        "{}: {} runs; fresh `bicsi serve` per run with two disks on one filesystem; the {} sparse \
         image ({} allocated) is downloaded to one disk (untimed) and a 2-replica volume created \
         (the other disk's replica deferred); bicsi = ControllerPublishVolume (retried every {} \
         ms while Unavailable) from the first call until it succeeds, i.e. the file is ready on \
         the second disk; reference = `{ref_name}` of the same ready file; the source's page \
         cache is dropped before each side",
        kind.label(),
        b.runs,
        fmt_bytes(src.len),
        fmt_bytes(src.allocated),
        POLL.as_millis()
    );
    let mut bicsi = Stats::default();
    let mut reference = Stats::default();
    let mut peak: Option<u64> = None;
    let mut hwm_reset = true;
    for run in 0..b.runs {
        let dir = base.join(format!("run-{run}"));
        std::fs::create_dir_all(&dir)?;
        let guard = SweepOnDrop(dir.clone());
        let r = same_node_run(b, checks, &dir, run, kind, src).await;
        drop(guard);
        let r = r?;
        bicsi.push(r.bicsi);
        reference.push(r.reference);
        peak = peak.max(r.vm_hwm);
        hwm_reset &= r.hwm_reset;
        println!("  run {}: {}", run + 1, r.notes.join("\n         "));
    }
    let _ = std::fs::remove_dir(base);
    let rss = if hwm_reset {
        "peak RSS = bicsi serve's VmHWM during the publish (reset just before it)"
    } else {
        "peak RSS = bicsi serve's VmHWM since its start (could not reset it: not root?), \
         the download included"
    };
    let note = match kind {
        SameNode::Ext4 => format!(
            "bound: a sparse copy of the data extents only ({} of {}); bicsi fsyncs its copy \
             (so does the reference: `sync DST`), and its time also holds the publish round \
             trips and the deferred replica's qcow2 overlay; {rss}",
            fmt_bytes(src.allocated),
            fmt_bytes(src.len)
        ),
        SameNode::XfsReflink => format!(
            "bound: O(1), one FICLONE (the node log's method=Reflink is checked); target well \
             under 0.1 s whatever the size: median {:.1} ms, max {:.1} ms ({}); bicsi fsyncs \
             its copy (so does the reference); {rss}",
            bicsi.median() * 1e3,
            bicsi.max() * 1e3,
            if bicsi.max() < 0.1 { "met" } else { "OVER" }
        ),
    };
    Ok(vec![Row {
        path: kind.label().into(),
        bicsi,
        reference,
        ref_name: ref_name.into(),
        peak_rss: peak,
        note: Some(note),
    }])
}

async fn same_node_run(
    b: &Bench,
    checks: &mut Checks,
    dir: &Path,
    run: usize,
    kind: SameNode,
    src: &Source,
) -> Res<SyncRun> {
    let disks = [dir.join("disk-a"), dir.join("disk-b")];
    for d in &disks {
        std::fs::create_dir_all(d)?;
    }
    let serve = Serve::start_disks(&b.bicsi, dir, &disks, &b.http).await?;
    let result = same_node_sides(b, checks, dir, run, kind, src, &serve, &disks).await;
    let log = serve.stop().await.unwrap_or_default();
    if result.is_err() {
        eprintln!("bicsi serve log (last lines):\n{}", log_tail(&log, 20));
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn same_node_sides(
    b: &Bench,
    checks: &mut Checks,
    dir: &Path,
    run: usize,
    kind: SameNode,
    src: &Source,
    serve: &Serve,
    disks: &[PathBuf; 2],
) -> Res<SyncRun> {
    let name = format!("sync-{run}");
    let url = b.sparse_url(src.len);
    create_image(&b.http, &serve.api, &name, &url, &src.sha512, src.len).await?;
    let (from, to) = match (ready_file(&disks[0], &name), ready_file(&disks[1], &name)) {
        (Some(f), None) => (f, &disks[1]),
        (None, Some(f)) => (f, &disks[0]),
        other => {
            return Err(format!(
                "expected the image's ready file on exactly one disk, found {other:?}"
            )
            .into());
        }
    };
    let from_alloc = allocated(&from)?;
    let mut csi = csi_connect(&serve.csi).await?;
    let cap = mount_capability();
    let vol = create_volume(&mut csi, &format!("sync-vol-{run}"), &name, 2, &cap).await?;
    let (ref_name, script) = kind.reference();
    let mut out = SyncRun::default();
    for k in 0..2 {
        if (run + k) % 2 == 0 {
            sync().await;
            drop_page_cache(&from);
            out.hwm_reset = reset_hwm(serve.pid);
            let p =
                publish_until_ready(&mut csi, &vol, "bench", &cap, file_deadline(src.len)).await?;
            out.bicsi = p.elapsed;
            out.vm_hwm = vm_hwm(serve.pid);
            let copy = ready_file(to, &name)
                .ok_or("the publish succeeded, but no ready file is on the second disk")?;
            let copy_alloc = allocated(&copy)?;
            let sha = sha512_file(&copy).await?;
            checks.check(
                sha == src.sha512,
                format!("run {}: bicsi's copy hashes to {sha}", run + 1),
            );
            checks.check(
                copy_alloc <= from_alloc + from_alloc / 20 + MIB,
                format!(
                    "run {}: bicsi's copy allocates {} for a source of {}: holes were filled",
                    run + 1,
                    fmt_bytes(copy_alloc),
                    fmt_bytes(from_alloc)
                ),
            );
            let log = serve.log_text();
            let method = logged(&log, "copied backing image file between disks", "method");
            let copy_secs = logged(&log, "local copy done", "secs")
                .and_then(|s| s.parse::<f64>().ok())
                .map_or("?".into(), |s| format!("{:.1} ms", s * 1e3));
            if kind == SameNode::XfsReflink {
                checks.check(
                    method.as_deref() == Some("Reflink"),
                    format!(
                        "run {}: the node log says method={}, not Reflink",
                        run + 1,
                        method.as_deref().unwrap_or("(no line)")
                    ),
                );
            }
            out.notes.push(format!(
                "bicsi {:.1} ms ({} ControllerPublish calls, the first {:.1} ms, the last {:.1} \
                 ms; node log: \"copied backing image file between disks ... method={}\", the \
                 copy itself {copy_secs}); copy allocated {} vs source {}; VmHWM {}",
                p.elapsed.as_secs_f64() * 1e3,
                p.calls,
                p.first_call.as_secs_f64() * 1e3,
                p.last_call.as_secs_f64() * 1e3,
                method.as_deref().unwrap_or("?"),
                fmt_bytes(copy_alloc),
                fmt_bytes(from_alloc),
                out.vm_hwm.map_or("n/a".into(), fmt_bytes)
            ));
            unpublish_and_delete(&mut csi, &vol, "bench").await?;
        } else {
            let dst = dir.join("reference.copy");
            sync().await;
            drop_page_cache(&from);
            let t = run_script(script, &[from.as_os_str(), dst.as_os_str()]).await?;
            let alloc = allocated(&dst)?;
            let _ = std::fs::remove_file(&dst);
            out.reference = t;
            out.notes.push(format!(
                "`{ref_name}` {:.1} ms, copy allocated {}",
                t.as_secs_f64() * 1e3,
                fmt_bytes(alloc)
            ));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Path: cross-node sync

/// A `bicsi controller` and two `bicsi node` agents (n1, n2, one disk each) on 127.0.0.1.
struct Cluster {
    controller: Daemon,
    nodes: Vec<ClusterNode>,
    /// The controller's HTTP API.
    api: String,
    /// The controller's CSI endpoint.
    csi: String,
}

struct ClusterNode {
    id: String,
    daemon: Daemon,
    disk: PathBuf,
    /// Where it serves its ready files to other nodes.
    http_port: u16,
}

impl Cluster {
    async fn start(b: &Bench, dir: &Path) -> Res<Cluster> {
        let (http_port, cluster_port) = (try_free_port()?, try_free_port()?);
        let csi = format!("unix://{}", dir.join("controller.sock").display());
        let s = |v: &str| v.to_string();
        let controller = Daemon::spawn(
            &b.bicsi,
            &[
                s("controller"),
                s("--data-dir"),
                dir.join("controller").display().to_string(),
                s("--csi-endpoint"),
                csi.clone(),
                s("--http-listen"),
                format!("127.0.0.1:{http_port}"),
                s("--cluster-listen"),
                format!("127.0.0.1:{cluster_port}"),
            ],
            dir.join("controller.log"),
        )?;
        let mut nodes = Vec::new();
        for id in ["n1", "n2"] {
            let ndir = dir.join(id);
            let disk = ndir.join("disk");
            std::fs::create_dir_all(&disk)?;
            let node_http = try_free_port()?;
            let args = vec![
                s("node"),
                s("--node-id"),
                s(id),
                s("--data-dir"),
                ndir.join("data").display().to_string(),
                s("--csi-endpoint"),
                format!("unix://{}", ndir.join("csi.sock").display()),
                s("--disk"),
                disk.display().to_string(),
                s("--controller"),
                format!("http://127.0.0.1:{cluster_port}"),
                s("--agent-listen"),
                format!("127.0.0.1:{}", try_free_port()?),
                s("--http-listen"),
                format!("127.0.0.1:{node_http}"),
                s("--nbd-listen"),
                format!("127.0.0.1:{}", try_free_port()?),
            ];
            let daemon = Daemon::spawn(&b.bicsi, &args, ndir.join("node.log"))?;
            nodes.push(ClusterNode {
                id: id.into(),
                daemon,
                disk,
                http_port: node_http,
            });
        }
        let mut c = Cluster {
            controller,
            nodes,
            api: format!("http://127.0.0.1:{http_port}"),
            csi,
        };
        let started = Instant::now();
        loop {
            let up = match api_get(&b.http, &c.api, "/v1/nodes").await {
                Ok(v) => v.as_array().map_or(0, |a| {
                    a.iter()
                        .filter(|n| {
                            n["up"] == true && n["disks"].as_array().is_some_and(|d| !d.is_empty())
                        })
                        .count()
                }),
                Err(_) => 0,
            };
            if up == c.nodes.len() {
                return Ok(c);
            }
            c.controller.check_alive()?;
            for n in &mut c.nodes {
                n.daemon.check_alive()?;
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("only {up} of 2 nodes up after 30 s").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the nodes, then the controller; returns the tails of their logs.
    async fn stop(self) -> String {
        let mut logs = String::new();
        for n in self.nodes {
            let log = n.daemon.stop().await;
            let _ = write!(logs, "--- node {} ---\n{}", n.id, log_tail(&log, 15));
        }
        let log = self.controller.stop().await;
        let _ = write!(logs, "--- controller ---\n{}", log_tail(&log, 15));
        logs
    }
}

/// Cross-node sync: per run a fresh controller and two nodes; the image is downloaded to one
/// node (untimed); ControllerPublishVolume of a 2-replica volume to that node until it succeeds
/// (the other node has received, verified and stored the file) against curl of the same stream
/// from the sending node, then `sync FILE`.
async fn sync_cross(b: &Bench, checks: &mut Checks, manifest: bool) -> Res<Vec<Row>> {
    const REF: &str = "curl -o FILE http://SENDER/v1/files/NAME-UUID && sync FILE";
    let src = b.sparse_image(b.size)?;
    let title = if manifest {
        "cross-node sync"
    } else {
        "cross-node sync, no manifest"
    };
    let variant = if manifest {
        ""
    } else {
        " the sender's backing.manifest is removed before each publish, so the receiver verifies \
         the whole SHA-512;"
    };
    println!(
        "{title}: {} runs;{variant} fresh `bicsi controller` + 2 `bicsi node` per run on \
         127.0.0.1; the {} sparse image ({} allocated) is downloaded to one node (untimed) and a \
         2-replica volume created (one replica per node, the other node's deferred); bicsi = \
         ControllerPublishVolume to the node holding the file (retried every {} ms while \
         Unavailable) until it succeeds: the other node has pulled the data extents over HTTP, \
         hashed and fsynced them; reference = `{REF}` of the same stream from the sender; the \
         sender's page cache of the file is dropped before each side",
        b.runs,
        fmt_bytes(src.len),
        fmt_bytes(src.allocated),
        POLL.as_millis()
    );
    let mut bicsi = Stats::default();
    let mut reference = Stats::default();
    let mut peak: Option<u64> = None;
    let mut wire: Vec<(u64, u64)> = Vec::new();
    let mut hwm_reset = true;
    for run in 0..b.runs {
        let dir = b.work.join(format!("cross-{run}"));
        std::fs::create_dir_all(&dir)?;
        let guard = SweepOnDrop(dir.clone());
        let r = cross_run(b, checks, &dir, run, src, manifest).await;
        drop(guard);
        let r = r?;
        bicsi.push(r.bicsi);
        reference.push(r.reference);
        peak = peak.max(r.vm_hwm);
        hwm_reset &= r.hwm_reset;
        if let (Some(w), Some(a)) = (r.wire, r.data) {
            wire.push((w + r.manifest.unwrap_or(0), a));
        }
        println!("  run {}: {}", run + 1, r.notes.join("\n         "));
    }
    let wire_note = match wire.last() {
        Some(&(w, _)) => {
            let over = w as f64 / src.allocated as f64 - 1.0;
            format!(
                "bytes on the wire (extent stream + manifest) {} vs the image's allocated {}: \
                 {:+.2}% (target within 5%: {})",
                fmt_bytes(w),
                fmt_bytes(src.allocated),
                over * 100.0,
                if over.abs() <= 0.05 { "met" } else { "OVER" }
            )
        }
        None => "bytes on the wire: not logged".into(),
    };
    let note = format!(
        "{wire_note}; bicsi checks each 1 MiB chunk that holds data against the sender's chunk \
         manifest (SHA-256; its SHA-512 is the image's, and all-zero chunks must arrive as \
         holes), or without a usable manifest hashes the whole logical size ({}, holes as \
         zeros) with SHA-512 on one core (about 0.5 GiB/s here), and fsyncs the file; its time \
         also holds the deferred replica's qcow2 overlay and its NBD export on the receiver; \
         peak RSS = the RECEIVING node's VmHWM{}",
        fmt_bytes(src.len),
        if hwm_reset {
            " during the publish (reset just before it)"
        } else {
            " since its start (could not reset it)"
        }
    );
    Ok(vec![Row {
        path: title.into(),
        bicsi,
        reference,
        ref_name: REF.into(),
        peak_rss: peak,
        note: Some(note),
    }])
}

async fn cross_run(
    b: &Bench,
    checks: &mut Checks,
    dir: &Path,
    run: usize,
    src: &Source,
    manifest: bool,
) -> Res<SyncRun> {
    let cluster = Cluster::start(b, dir).await?;
    let result = cross_sides(b, checks, dir, run, src, &cluster, manifest).await;
    let logs = cluster.stop().await;
    if result.is_err() {
        eprintln!("bicsi logs (last lines):\n{logs}");
    }
    result
}

async fn cross_sides(
    b: &Bench,
    checks: &mut Checks,
    dir: &Path,
    run: usize,
    src: &Source,
    cluster: &Cluster,
    manifest: bool,
) -> Res<SyncRun> {
    let name = format!("cross-{run}");
    let url = b.sparse_url(src.len);
    let obj = create_image(&b.http, &cluster.api, &name, &url, &src.sha512, src.len).await?;
    let uuid = obj["status"]["uuid"]
        .as_str()
        .filter(|u| !u.is_empty())
        .ok_or("the backing image has no status.uuid")?
        .to_string();
    let holder = obj["status"]["diskFileStatusMap"]
        .as_object()
        .and_then(|m| m.values().find(|f| f["state"] == "ready"))
        .and_then(|f| f["nodeId"].as_str())
        .ok_or("no ready file with a nodeId")?
        .to_string();
    let s = cluster
        .nodes
        .iter()
        .position(|n| n.id == holder)
        .ok_or_else(|| format!("the image is ready on unknown node {holder:?}"))?;
    let (sender, receiver) = (&cluster.nodes[s], &cluster.nodes[1 - s]);
    let from = ready_file(&sender.disk, &name).ok_or("no ready file on the sending node")?;
    let from_alloc = allocated(&from)?;
    let mut csi = csi_connect(&cluster.csi).await?;
    let cap = mount_capability();
    let vol = create_volume(&mut csi, &format!("cross-vol-{run}"), &name, 2, &cap).await?;
    let stream_url = format!(
        "http://127.0.0.1:{}/v1/files/{name}-{uuid}",
        sender.http_port
    );
    let mut out = SyncRun::default();
    for k in 0..2 {
        if (run + k) % 2 == 0 {
            let sender_manifest = from.with_file_name("backing.manifest");
            if !manifest {
                std::fs::remove_file(&sender_manifest)?;
            }
            checks.check(
                sender_manifest.is_file() == manifest,
                format!(
                    "run {}: the sender's file {} a manifest",
                    run + 1,
                    if manifest { "has" } else { "no longer has" }
                ),
            );
            sync().await;
            drop_page_cache(&from);
            out.hwm_reset = reset_hwm(receiver.daemon.pid);
            let p =
                publish_until_ready(&mut csi, &vol, &holder, &cap, file_deadline(src.len)).await?;
            out.bicsi = p.elapsed;
            out.vm_hwm = vm_hwm(receiver.daemon.pid);
            let got = ready_file(&receiver.disk, &name)
                .ok_or("the publish succeeded, but the receiving node has no ready file")?;
            let got_alloc = allocated(&got)?;
            let sha = sha512_file(&got).await?;
            checks.check(
                sha == src.sha512,
                format!("run {}: the received file hashes to {sha}", run + 1),
            );
            let log = receiver.daemon.log_text();
            let msg = "received backing image file";
            out.wire = logged(&log, msg, "wire").and_then(|v| v.parse().ok());
            out.data = logged(&log, msg, "data").and_then(|v| v.parse().ok());
            out.manifest = logged(&log, msg, "manifest").and_then(|v| v.parse().ok());
            out.verified = logged(&log, msg, "verified");
            let want = if manifest { "manifest" } else { "sha512" };
            checks.check(
                out.verified.as_deref() == Some(want),
                format!(
                    "run {}: the receiver verified by {want} ({:?})",
                    run + 1,
                    out.verified
                ),
            );
            let stages = ["body_secs", "check_wait_secs", "settle_secs"]
                .map(|k| logged(&log, "sync receive stages", k).unwrap_or("?".into()));
            let recv = logged(&log, "sync receive done", "secs")
                .and_then(|s| s.parse::<f64>().ok())
                .map_or("?".into(), |s| format!("{s:.2} s"));
            out.notes.push(format!(
                "bicsi {:.2} s ({} ControllerPublish calls, the first {:.1} ms, the last {:.1} \
                 ms; {} → {}; receiver log: \"{msg} wire={} manifest={} data={} verified={}\", \
                 receive itself {recv}: body {} s, then waiting for the checks {} s, settle {} \
                 s); sender's file allocated {}, received file allocated {}; receiver VmHWM {}",
                p.elapsed.as_secs_f64(),
                p.calls,
                p.first_call.as_secs_f64() * 1e3,
                p.last_call.as_secs_f64() * 1e3,
                sender.id,
                receiver.id,
                out.wire.map_or("?".into(), |w| w.to_string()),
                out.manifest.map_or("?".into(), |m| m.to_string()),
                out.data.map_or("?".into(), |d| d.to_string()),
                out.verified.as_deref().unwrap_or("?"),
                stages[0],
                stages[1],
                stages[2],
                fmt_bytes(from_alloc),
                fmt_bytes(got_alloc),
                out.vm_hwm.map_or("n/a".into(), fmt_bytes)
            ));
            unpublish_and_delete(&mut csi, &vol, &holder).await?;
        } else {
            let file = dir.join("reference.stream");
            sync().await;
            drop_page_cache(&from);
            let t = run_script(
                r#"curl -sS --fail --noproxy '*' -o "$1" "$2" && sync "$1""#,
                &[file.as_os_str(), std::ffi::OsStr::new(&stream_url)],
            )
            .await?;
            out.curl_bytes = std::fs::metadata(&file)?.len();
            let _ = std::fs::remove_file(&file);
            out.reference = t;
            out.notes.push(format!(
                "`curl -o FILE {stream_url} && sync FILE` {:.2} s ({} bytes received)",
                t.as_secs_f64(),
                out.curl_bytes
            ));
        }
    }
    if let Some(w) = out.wire {
        checks.check(
            w == out.curl_bytes,
            format!(
                "run {}: bicsi logged {w} bytes on the wire, curl received {} of the same stream",
                run + 1,
                out.curl_bytes
            ),
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Path: attach

/// The 1x image of the attach path: a quarter of --size in whole MiB, at least 64 MiB.
fn attach_unit(size: u64) -> u64 {
    (size / 4 / MIB * MIB).max(64 * MIB)
}

/// Attach of a new volume, image already ready on the disk: CreateVolume (1 replica) +
/// ControllerPublish + NodeStage (block) + NodePublish, for a 1x and a 4x image on one
/// `bicsi serve`; detach (untimed) after each. O(1) in the image size: the ratio 4x/1x.
async fn attach(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    if !is_root() {
        println!("attach: skipped: needs root (loop devices, FUSE, mounts)");
        return Ok(vec![]);
    }
    let one = attach_unit(b.size);
    let sizes = [one, 4 * one];
    println!(
        "attach: {} runs; one `bicsi serve`, images of {} (1x) and {} (4x) ready on its disk \
         (downloaded untimed); bicsi = CreateVolume (1 replica) + ControllerPublishVolume + \
         NodeStageVolume (block) + NodePublishVolume to a target file, of a new volume; then \
         NodeUnpublish, NodeUnstage, ControllerUnpublish and DeleteVolume (untimed); 1x and 4x \
         alternate their order; reference = attach 1x",
        b.runs,
        fmt_bytes(sizes[0]),
        fmt_bytes(sizes[1])
    );
    let dir = b.work.join("attach");
    let disk = dir.join("disk");
    std::fs::create_dir_all(&disk)?;
    let guard = SweepOnDrop(dir.clone());
    let serve = Serve::start(&b.bicsi, &dir, &disk, &b.http).await?;
    let result = attach_runs(b, checks, &serve, &dir, sizes).await;
    let log = serve.stop().await.unwrap_or_default();
    if result.is_err() {
        eprintln!("bicsi serve log (last lines):\n{}", log_tail(&log, 20));
    }
    drop(guard);
    let (stats, peak, hwm_reset) = result?;
    let [s1, s4] = stats;
    let ratio = s4.median() / s1.median();
    let ref_name = format!("attach 1x ({})", fmt_bytes(sizes[0]));
    let rss = if hwm_reset {
        "peak RSS = bicsi serve's VmHWM over the attaches (reset after the downloads)"
    } else {
        "peak RSS = bicsi serve's VmHWM since its start, downloads included"
    };
    Ok(vec![
        Row {
            path: ref_name.clone(),
            bicsi: s1.clone(),
            reference: s1.clone(),
            ref_name: ref_name.clone(),
            peak_rss: peak,
            note: Some(format!(
                "the reference of the 4x row (ratio 1 by construction); {rss}; the engine is \
                 qemu-storage-daemon's FUSE export on a loop device"
            )),
        },
        Row {
            path: format!("attach 4x ({})", fmt_bytes(sizes[1])),
            bicsi: s4,
            reference: s1,
            ref_name,
            peak_rss: peak,
            note: Some(format!(
                "bound: O(1) in the image size (a qcow2 overlay, nothing copied); target \
                 4x/1x ≤ 1.2: {ratio:.2} ({})",
                if ratio <= 1.2 { "met" } else { "OVER" }
            )),
        },
    ])
}

async fn attach_runs(
    b: &Bench,
    checks: &mut Checks,
    serve: &Serve,
    dir: &Path,
    sizes: [u64; 2],
) -> Res<([Stats; 2], Option<u64>, bool)> {
    const X: [u64; 2] = [1, 4];
    for (i, &len) in sizes.iter().enumerate() {
        let src = b.sparse_image(len)?;
        let name = format!("attach-{}x", X[i]);
        create_image(
            &b.http,
            &serve.api,
            &name,
            &b.sparse_url(len),
            &src.sha512,
            len,
        )
        .await?;
    }
    let mut csi = csi_connect(&serve.csi).await?;
    let cap = block_capability();
    let hwm_reset = reset_hwm(serve.pid);
    let mut stats: [Stats; 2] = Default::default();
    for run in 0..b.runs {
        let mut notes = Vec::new();
        for k in 0..2 {
            let i = (run + k) % 2;
            let src = b.sparse_image(sizes[i])?;
            let image = format!("attach-{}x", X[i]);
            let name = format!("attach-{}x-{run}", X[i]);
            let staging = dir.join("staging").join(&name);
            let target = dir.join("targets").join(&name);
            std::fs::create_dir_all(&staging)?;
            std::fs::create_dir_all(dir.join("targets"))?;
            let staging_s = staging.display().to_string();
            let target_s = target.display().to_string();
            sync().await;
            let t0 = Instant::now();
            let vol = create_volume(&mut csi, &name, &image, 1, &cap).await?;
            let t1 = Instant::now();
            let p =
                publish_until_ready(&mut csi, &vol, "bench", &cap, Duration::from_secs(60)).await?;
            let t2 = Instant::now();
            node_stage(&mut csi, &vol, &p, &staging_s, &cap).await?;
            let t3 = Instant::now();
            node_publish(&mut csi, &vol, &p, &staging_s, &target_s, &cap).await?;
            let t4 = Instant::now();
            stats[i].push(t4 - t0);
            let (t, path, len) = (target.clone(), src.path.clone(), src.len);
            let shows =
                tokio::task::spawn_blocking(move || check_block_target(&t, &path, len)).await?;
            if let Err(e) = &shows {
                checks.check(false, format!("run {}: {}x volume: {e}", run + 1, X[i]));
            }
            // Detach (untimed).
            let d0 = Instant::now();
            detach_and_delete(&mut csi, &vol, target_s, staging_s).await?;
            let _ = std::fs::remove_dir(&staging);
            let detach = d0.elapsed();
            // The engine (qemu-storage-daemon) exits 1.5–2 s after NodeUnstage returns: let it
            // go before the next timed attach, so the two never overlap.
            let engine_gone = tokio::task::spawn_blocking({
                let dir = dir.to_path_buf();
                move || {
                    let started = Instant::now();
                    while engines_under(&dir).into_iter().any(alive)
                        && started.elapsed() < Duration::from_secs(15)
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    started.elapsed()
                }
            })
            .await?;
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            notes.push(format!(
                "{}x: {:.1} ms (CreateVolume {:.1}, ControllerPublish {:.1}, NodeStage {:.1}, \
                 NodePublish {:.1}); {}; detach {:.2} s, then the engine exited {:.2} s later",
                X[i],
                ms(t0, t4),
                ms(t0, t1),
                ms(t1, t2),
                ms(t2, t3),
                ms(t3, t4),
                if shows.is_ok() {
                    "the block device shows the image"
                } else {
                    "the block device does NOT show the image"
                },
                detach.as_secs_f64(),
                engine_gone.as_secs_f64()
            ));
        }
        println!("  run {}: {}", run + 1, notes.join("\n         "));
    }
    let peak = vm_hwm(serve.pid);
    Ok((stats, peak, hwm_reset))
}

/// The published target is a block device of at least `len` bytes whose first MiB and last
/// data block are the image's.
fn check_block_target(target: &Path, image: &Path, len: u64) -> Result<(), String> {
    let meta = std::fs::metadata(target).map_err(|e| format!("{}: {e}", target.display()))?;
    if !meta.file_type().is_block_device() {
        return Err(format!("{} is not a block device", target.display()));
    }
    let mut dev = std::fs::File::open(target).map_err(|e| format!("open target: {e}"))?;
    let size = dev
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("size of the device: {e}"))?;
    if size < len {
        return Err(format!("the device has {size} bytes, the image {len}"));
    }
    let img = std::fs::File::open(image).map_err(|e| format!("open image: {e}"))?;
    let last = (len - 1) / (4 * MIB) * (4 * MIB);
    for offset in [0, last] {
        let n = (len - offset).min(MIB) as usize;
        let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
        dev.read_exact_at(&mut a, offset)
            .map_err(|e| format!("read the device at {offset}: {e}"))?;
        img.read_exact_at(&mut b, offset)
            .map_err(|e| format!("read the image at {offset}: {e}"))?;
        if a != b {
            return Err(format!(
                "the device differs from the image at offset {offset}"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bicsi's APIs: backing images over HTTP, volumes over CSI

/// POSTs a download BackingImage of `url` with its checksum and waits until a file of it is
/// ready on some disk; returns the object.
async fn create_image(
    http: &reqwest::Client,
    api: &str,
    name: &str,
    url: &str,
    sha512: &str,
    len: u64,
) -> Res<serde_json::Value> {
    let body = serde_json::json!({
        "apiVersion": "longhorn.io/v1beta2",
        "kind": "BackingImage",
        "metadata": { "name": name },
        "spec": {
            "sourceType": "download",
            "sourceParameters": { "url": url },
            "checksum": sha512,
        },
    });
    let resp = http
        .post(format!("{api}/v1/backingimages"))
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(format!(
            "POST backing image {name}: {status}: {}",
            resp.text().await?
        )
        .into());
    }
    let deadline = file_deadline(len);
    let started = Instant::now();
    loop {
        let obj = api_get(http, api, &format!("/v1/backingimages/{name}")).await?;
        let files = obj["status"]["diskFileStatusMap"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        if files.values().any(|f| f["state"] == "ready") {
            return Ok(obj);
        }
        if let Some(f) = files.values().find(|f| f["state"] == "failed") {
            return Err(format!("backing image {name} failed: {}", f["message"]).into());
        }
        if started.elapsed() > deadline {
            return Err(format!("backing image {name} not ready after {deadline:?}: {obj}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rpc_err(what: &str, s: tonic::Status) -> Box<dyn std::error::Error + Send + Sync> {
    format!("{what}: {:?}: {}", s.code(), s.message()).into()
}

/// Connects to a CSI endpoint, retrying for 30 s while its socket is not there yet.
async fn csi_connect(endpoint: &str) -> Res<CsiClient> {
    let started = Instant::now();
    loop {
        match CsiClient::connect(endpoint).await {
            Ok(c) => return Ok(c),
            Err(e) if started.elapsed() > Duration::from_secs(30) => {
                return Err(format!("CSI endpoint {endpoint}: {e}").into());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn capability(access: pb::volume_capability::AccessType) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(access),
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

fn mount_capability() -> pb::VolumeCapability {
    capability(pb::volume_capability::AccessType::Mount(
        pb::volume_capability::MountVolume::default(),
    ))
}

fn block_capability() -> pb::VolumeCapability {
    capability(pb::volume_capability::AccessType::Block(
        pb::volume_capability::BlockVolume {},
    ))
}

/// CreateVolume of `name` from backing image `image` with `replicas` replicas and the image's
/// size; returns the volume id.
async fn create_volume(
    c: &mut CsiClient,
    name: &str,
    image: &str,
    replicas: u32,
    cap: &pb::VolumeCapability,
) -> Res<String> {
    let parameters = HashMap::from([
        ("backingImage".to_string(), image.to_string()),
        ("numberOfReplicas".to_string(), replicas.to_string()),
    ]);
    let v = c
        .controller
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            volume_capabilities: vec![cap.clone()],
            parameters,
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_err("CreateVolume", s))?
        .into_inner()
        .volume
        .ok_or("CreateVolume answered no volume")?;
    Ok(v.volume_id)
}

struct Published {
    elapsed: Duration,
    calls: usize,
    /// How long the first call (which starts the work) and the last (successful) one took.
    first_call: Duration,
    last_call: Duration,
    context: HashMap<String, String>,
}

/// ControllerPublishVolume, called again every [`POLL`] while it answers Unavailable (the
/// backing image's file is on its way to a replica's disk); timed from the first call.
async fn publish_until_ready(
    c: &mut CsiClient,
    volume_id: &str,
    node_id: &str,
    cap: &pb::VolumeCapability,
    deadline: Duration,
) -> Res<Published> {
    let req = pb::ControllerPublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node_id.into(),
        volume_capability: Some(cap.clone()),
        readonly: false,
        ..Default::default()
    };
    let started = Instant::now();
    let mut calls = 0;
    let mut first_call = Duration::ZERO;
    loop {
        calls += 1;
        let call = Instant::now();
        let result = c.controller.controller_publish_volume(req.clone()).await;
        let took = call.elapsed();
        if calls == 1 {
            first_call = took;
        }
        match result {
            Ok(r) => {
                return Ok(Published {
                    elapsed: started.elapsed(),
                    calls,
                    first_call,
                    last_call: took,
                    context: r.into_inner().publish_context,
                });
            }
            Err(s) if s.code() == tonic::Code::Unavailable => {
                if started.elapsed() > deadline {
                    return Err(format!(
                        "ControllerPublishVolume still Unavailable after {deadline:?}: {}",
                        s.message()
                    )
                    .into());
                }
                tokio::time::sleep(POLL).await;
            }
            Err(s) => return Err(rpc_err("ControllerPublishVolume", s)),
        }
    }
}

/// Unpublishes and unstages `volume_id` on the node (node "bench"), then unpublishes and deletes it.
/// NodeStageVolume of a published volume at `staging`.
async fn node_stage(
    c: &mut CsiClient,
    volume_id: &str,
    published: &Published,
    staging: &str,
    cap: &pb::VolumeCapability,
) -> Res<()> {
    c.node
        .node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: volume_id.into(),
            publish_context: published.context.clone(),
            staging_target_path: staging.into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_err("NodeStageVolume", s))?;
    Ok(())
}

/// NodePublishVolume of a staged volume at `target`, read-write.
async fn node_publish(
    c: &mut CsiClient,
    volume_id: &str,
    published: &Published,
    staging: &str,
    target: &str,
    cap: &pb::VolumeCapability,
) -> Res<()> {
    c.node
        .node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: volume_id.into(),
            publish_context: published.context.clone(),
            staging_target_path: staging.into(),
            target_path: target.into(),
            volume_capability: Some(cap.clone()),
            readonly: false,
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_err("NodePublishVolume", s))?;
    Ok(())
}

async fn detach_and_delete(
    c: &mut CsiClient,
    volume_id: &str,
    target_path: String,
    staging_target_path: String,
) -> Res<()> {
    c.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            target_path,
        })
        .await
        .map_err(|s| rpc_err("NodeUnpublishVolume", s))?;
    c.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path,
        })
        .await
        .map_err(|s| rpc_err("NodeUnstageVolume", s))?;
    unpublish_and_delete(c, volume_id, "bench").await
}

async fn unpublish_and_delete(c: &mut CsiClient, volume_id: &str, node_id: &str) -> Res<()> {
    c.controller
        .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            node_id: node_id.into(),
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_err("ControllerUnpublishVolume", s))?;
    c.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: volume_id.into(),
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_err("DeleteVolume", s))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Files, processes, cleanup

/// Bytes allocated to `path` on disk (st_blocks × 512).
fn allocated(path: &Path) -> Res<u64> {
    Ok(std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .blocks()
        * 512)
}

/// Drops the (clean) page cache of `path`, so the next reader reads the disk.
fn drop_page_cache(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}

/// SHA-512 of a file's logical content, read in 1 MiB blocks.
async fn sha512_file(path: &Path) -> Res<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Res<String> {
        let mut f = std::fs::File::open(&path)?;
        let mut h = Sha512::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        // Advice only: the harness's read must not warm the next side's cache.
        let _ = nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
        Ok(hex::encode(h.finalize()))
    })
    .await?
}

/// Resets the peak resident size (VmHWM) of `pid` to its current RSS (`5 > clear_refs`).
fn reset_hwm(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn vm_hwm(pid: u32) -> Option<u64> {
    proc_status(pid).and_then(|s| kib_field(&s, "VmHWM:"))
}

/// Runs `bash -c SCRIPT reference ARGS…` and returns its time.
async fn run_script(script: &str, args: &[&std::ffi::OsStr]) -> Res<Duration> {
    let started = Instant::now();
    let out = child_command("bash")
        .arg("-c")
        .arg(format!("set -o pipefail; {script}"))
        .arg("reference")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await?;
    let elapsed = started.elapsed();
    if !out.status.success() {
        return Err(format!(
            "reference `{script}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(elapsed)
}

/// The value of `key=` after the message `msg` on the last log line that holds `msg`.
fn logged(log: &str, msg: &str, key: &str) -> Option<String> {
    let line = strip_ansi(log.lines().rev().find(|l| l.contains(msg))?);
    let (_, rest) = line.split_once(msg)?;
    let prefix = format!("{key}=");
    rest.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .map(|v| v.trim_matches('"').to_string())
}

async fn fs_type(dir: &Path) -> String {
    let dir = dir.to_string_lossy();
    match capture("findmnt", &["-n", "-o", "FSTYPE", "-T", &dir]).await {
        Ok(fs) => fs,
        Err(_) => capture("stat", &["-f", "-c", "%T", &dir])
            .await
            .unwrap_or_else(|_| "unknown".into()),
    }
}

/// An XFS filesystem with reflink in a sparse file, on a loop device, mounted at `mnt`; dropping
/// it unmounts, detaches the loop device and removes the file.
struct LoopMount {
    img: PathBuf,
    dev: Option<String>,
    mnt: PathBuf,
    mounted: bool,
}

impl LoopMount {
    async fn xfs(img: &Path, mnt: &Path, len: u64) -> Res<LoopMount> {
        let mut lm = LoopMount {
            img: img.to_path_buf(),
            dev: None,
            mnt: mnt.to_path_buf(),
            mounted: false,
        };
        std::fs::File::create(img)?.set_len(len)?;
        let img_s = img.to_string_lossy();
        capture_checked("mkfs.xfs", &["-q", "-m", "reflink=1", &img_s]).await?;
        let dev = capture_checked("losetup", &["--find", "--show", &img_s]).await?;
        lm.dev = Some(dev.clone());
        std::fs::create_dir_all(mnt)?;
        capture_checked("mount", &[&dev, &mnt.to_string_lossy()]).await?;
        lm.mounted = true;
        Ok(lm)
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted {
            report_leftovers(
                &format!("under {}", self.mnt.display()),
                &kit::sweep(&self.mnt, SWEEP_GRACE),
            );
            let mut unmounted = false;
            for _ in 0..10 {
                let st = std::process::Command::new("umount").arg(&self.mnt).status();
                if st.is_ok_and(|s| s.success()) {
                    unmounted = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            if !unmounted {
                eprintln!("{} is busy; unmounting it lazily", self.mnt.display());
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.mnt)
                    .status();
            }
        }
        if let Some(dev) = &self.dev {
            let _ = std::process::Command::new("losetup")
                .args(["-d", dev])
                .status();
        }
        let _ = std::fs::remove_dir(&self.mnt);
        let _ = std::fs::remove_file(&self.img);
    }
}

/// How long the qemu-storage-daemons a sweep stops get to exit on SIGTERM before SIGKILL.
const SWEEP_GRACE: Duration = Duration::from_secs(5);

/// Sweeps `dir` (see [`kit::sweep`]) and removes it when dropped: every run's guard, so a failure or
/// an early return leaves nothing mounted or running.
struct SweepOnDrop(PathBuf);

impl Drop for SweepOnDrop {
    fn drop(&mut self) {
        report_leftovers(
            &format!("of {}", self.0.display()),
            &kit::sweep(&self.0, SWEEP_GRACE),
        );
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn report_leftovers(context: &str, done: &[String]) {
    if !done.is_empty() {
        println!("  cleanup {context}: {}", done.join("; "));
    }
}

// ---------------------------------------------------------------------------------------------
// The bicsi process

/// A bicsi child process (`serve`, `controller` or `node`) logging to a file; killed if dropped.
struct Daemon {
    what: String,
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
}

impl Daemon {
    fn spawn(bin: &Path, args: &[String], log: PathBuf) -> Res<Daemon> {
        let what = format!("bicsi {}", args.first().map_or("", String::as_str));
        let child = child_command(bin)
            .args(args)
            .env("BICSI_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id().ok_or_else(|| format!("{what} exited at once"))?;
        Ok(Daemon {
            what,
            child,
            pid,
            log,
        })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An error with the log when the process has exited.
    fn check_alive(&mut self) -> Res<()> {
        match self.child.try_wait()? {
            Some(st) => {
                Err(format!("{} exited ({st}); its log:\n{}", self.what, self.log_text()).into())
            }
            None => Ok(()),
        }
    }

    /// SIGTERM, wait (SIGKILL after 30 s); returns the log.
    async fn stop(mut self) -> String {
        if let Ok(pid) = i32::try_from(self.pid) {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "{} did not stop within 30 s of SIGTERM; killing it",
                self.what
            );
            let _ = self.child.kill().await;
        }
        self.log_text()
    }
}

/// The last `n` lines of a log, indented, for an error report.
fn log_tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("  {l}\n"))
        .collect()
}

/// A `bicsi serve` child on its own data dir, disks and HTTP port, node id `bench`.
struct Serve {
    daemon: Daemon,
    pid: u32,
    api: String,
    /// Its CSI endpoint, `unix://<dir>/csi.sock`.
    csi: String,
    log: PathBuf,
    http: reqwest::Client,
}

impl Serve {
    async fn start(bin: &Path, dir: &Path, disk: &Path, http: &reqwest::Client) -> Res<Serve> {
        Self::start_disks(bin, dir, &[disk.to_path_buf()], http).await
    }

    async fn start_disks(
        bin: &Path,
        dir: &Path,
        disks: &[PathBuf],
        http: &reqwest::Client,
    ) -> Res<Serve> {
        let port = try_free_port()?;
        let api = format!("http://127.0.0.1:{port}");
        let log = dir.join("serve.log");
        let csi = format!("unix://{}", dir.join("csi.sock").display());
        let mut args: Vec<String> = [
            "serve",
            "--data-dir",
            &dir.display().to_string(),
            "--csi-endpoint",
            &csi,
            "--http-listen",
            &format!("127.0.0.1:{port}"),
            "--node-id",
            "bench",
        ]
        .map(String::from)
        .to_vec();
        for d in disks {
            args.extend(["--disk".to_string(), d.display().to_string()]);
        }
        let daemon = Daemon::spawn(bin, &args, log.clone())?;
        let mut serve = Serve {
            pid: daemon.pid,
            daemon,
            api,
            csi,
            log,
            http: http.clone(),
        };
        let started = Instant::now();
        loop {
            let health = serve
                .http
                .get(format!("{}/healthz", serve.api))
                .send()
                .await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return Ok(serve);
            }
            serve.daemon.check_alive()?;
            if started.elapsed() > Duration::from_secs(30) {
                return Err("bicsi serve did not answer /healthz within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn get(&self, path: &str) -> Res<serde_json::Value> {
        api_get(&self.http, &self.api, path).await
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, wait (SIGKILL after 30 s); returns the log.
    async fn stop(self) -> Res<String> {
        Ok(self.daemon.stop().await)
    }
}

async fn api_get(http: &reqwest::Client, base: &str, path: &str) -> Res<serde_json::Value> {
    let resp = http.get(format!("{base}{path}")).send().await?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("GET {path}: {status}: {}", resp.text().await?).into());
    }
    Ok(resp.json().await?)
}

/// A child process without proxy settings, killed with us if we die.
fn child_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    cmd.kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// CPU seconds of process `pid` (user+system, all threads so far) and of each live thread.
fn cpu_usage(pid: u32) -> Option<(f64, Vec<(String, f64)>)> {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime and stime are fields 14 and 15 of /proc/…/stat, counted after the ")" that ends
    // the command name (which may contain spaces).
    let secs = |stat: &str| -> Option<f64> {
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let (u, s): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
        Some((u + s) / tick)
    };
    let total = secs(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let mut threads = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if let Some(secs) = secs(&stat) {
            threads.push((name.trim().to_string(), secs));
        }
    }
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    Some((total, threads))
}

fn proc_status(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

// ---------------------------------------------------------------------------------------------
// The image and its file server

/// Writes `len` bytes of /dev/urandom to `path` in 1 MiB blocks, hashing them on another thread,
/// then syncs the file (its pages stay cached: both sides read it warm).
async fn generate(path: PathBuf, len: u64) -> Res<Source> {
    tokio::task::spawn_blocking(move || -> Res<Source> {
        let mut rng = std::fs::File::open("/dev/urandom")?;
        let mut out = std::fs::File::create(&path)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Vec<u8>>>(4);
        let hasher = std::thread::spawn(move || {
            let mut h = Sha512::new();
            for block in rx {
                h.update(&block[..]);
            }
            hex::encode(h.finalize())
        });
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            let mut block = vec![0u8; n];
            rng.read_exact(&mut block)?;
            out.write_all(&block)?;
            let block = Arc::new(block);
            tx.send(block).map_err(|_| "hash thread stopped")?;
            left -= n as u64;
        }
        drop(tx);
        out.sync_all()?;
        let allocated = out.metadata()?.blocks() * 512;
        let sha512 = hasher.join().map_err(|_| "hash thread panicked")?;
        Ok(Source {
            path,
            len,
            sha512,
            allocated,
        })
    })
    .await?
}

/// Writes a sparse raw image of `len` bytes: 1 MiB of /dev/urandom data at every 4th MiB
/// (offsets 0, 4, 8, … MiB), holes between, so about 25% of it is allocated in extents. Hashed
/// as its logical content (holes as zeros), then synced.
async fn generate_sparse(path: PathBuf, len: u64) -> Res<Source> {
    tokio::task::spawn_blocking(move || -> Res<Source> {
        let mut rng = std::fs::File::open("/dev/urandom")?;
        let out = std::fs::File::create(&path)?;
        out.set_len(len)?;
        let mut h = Sha512::new();
        let zeros = vec![0u8; CHUNK];
        let mut block = vec![0u8; CHUNK];
        let (mut offset, mut i) = (0u64, 0u64);
        while offset < len {
            let n = (len - offset).min(CHUNK as u64) as usize;
            if i % 4 == 0 {
                rng.read_exact(&mut block[..n])?;
                out.write_all_at(&block[..n], offset)?;
                h.update(&block[..n]);
            } else {
                h.update(&zeros[..n]);
            }
            offset += n as u64;
            i += 1;
        }
        out.sync_all()?;
        let allocated = out.metadata()?.blocks() * 512;
        Ok(Source {
            path,
            len,
            sha512: hex::encode(h.finalize()),
            allocated,
        })
    })
    .await?
}

/// The files of the file server by URL name: path and length.
struct Served {
    files: HashMap<String, (PathBuf, u64)>,
}

/// Serves each `(name, path, len)` at `/{name}` on 127.0.0.1:0; returns the base URL.
async fn start_file_server(files: Vec<(String, PathBuf, u64)>) -> Res<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let files = files.into_iter().map(|(n, p, l)| (n, (p, l))).collect();
    let app = Router::new()
        .route("/{name}", get(serve_file))
        .route("/stall/{name}", get(serve_stalling))
        .with_state(Arc::new(Served { files }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("file server stopped: {e}");
        }
    });
    Ok(format!("http://{addr}"))
}

async fn serve_file(
    State(f): State<Arc<Served>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let Some((path, len)) = f.files.get(&name).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_range(v, len));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len),
        Some(Err(())) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response();
        }
        Some(Ok((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    // A plain thread reads ahead (up to 4 chunks) while hyper writes: the reads never wait on
    // the runtime, and the runtime never waits on a read.
    std::thread::spawn(move || {
        let send = |r| tx.blocking_send(r).is_ok();
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) => {
                send(Err(e));
                return;
            }
        };
        if let Err(e) = file.seek(SeekFrom::Start(start)) {
            send(Err(e));
            return;
        }
        let mut left = end - start;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            let mut buf = vec![0u8; n];
            if let Err(e) = file.read_exact(&mut buf) {
                send(Err(e));
                return;
            }
            left -= n as u64;
            if !send(Ok(Bytes::from(buf))) {
                return; // the client went away
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("\"bench-{name}-{len}\"")) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let range = format!("bytes {start}-{}/{len}", end - 1);
        if let Ok(v) = HeaderValue::from_str(&range) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    resp
}

/// `/stall/NAME`: a Range request is answered as `/NAME` answers it; a plain GET sends the
/// file's length and its first chunk, then nothing more, so a download stays under way.
async fn serve_stalling(
    State(f): State<Arc<Served>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if headers.contains_key(header::RANGE) {
        return serve_file(State(f), UrlPath(name), headers).await;
    }
    let Some((path, len)) = f.files.get(&name).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut first = vec![0u8; (CHUNK as u64).min(len) as usize];
    let read = std::fs::File::open(&path).and_then(|file| file.read_exact_at(&mut first, 0));
    if let Err(e) = read {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    let body = futures::StreamExt::chain(
        futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(first)) }),
        futures::stream::pending(),
    );
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// `bytes=A-B`, `bytes=A-`, `bytes=-N` → half-open `[start, end)`; `Err` when unsatisfiable;
/// `None` (serve the whole file) for anything else, multiple ranges included.
fn parse_range(v: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || len == 0 {
            return Some(Err(()));
        }
        return Some(Ok((len.saturating_sub(n), len)));
    }
    let start: u64 = a.parse().ok()?;
    let end = if b.is_empty() {
        len
    } else {
        let last: u64 = b.parse().ok()?;
        if last < start {
            return None;
        }
        (last + 1).min(len)
    };
    if start >= len {
        return Some(Err(()));
    }
    Some(Ok((start, end)))
}

/// `curl -o /dev/null` from the file server, 3 times: the median rate in bytes/s.
async fn curl_rate(url: &str, len: u64) -> Res<f64> {
    let mut times = Stats::default();
    for _ in 0..3 {
        let started = Instant::now();
        let out = child_command("curl")
            .args(["-sS", "--fail", "--noproxy", "*", "-o", "/dev/null", url])
            .output()
            .await?;
        if !out.status.success() {
            return Err(format!(
                "curl of the file server failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        times.push(started.elapsed());
    }
    Ok(len as f64 / times.median())
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/// The work dir, whose filesystem [`sync`] flushes.
static WORK_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Flushes the work dir's filesystem (syncfs), not every filesystem: on a shared machine a
/// global sync(2) waits for everyone's writeback, and forever when another user's FUSE export
/// has stopped answering under a mounted filesystem (seen here).
async fn sync() {
    let _ = tokio::task::spawn_blocking(|| {
        let dir = WORK_DIR.get().map_or(Path::new("/"), PathBuf::as_path);
        if let Ok(f) = std::fs::File::open(dir) {
            let _ = nix::unistd::syncfs(&f);
        }
    })
    .await;
}

/// Bytes of `file` in the page cache, by `fincore` (None when it is not installed).
async fn fincore(file: &Path) -> Option<u64> {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file)
        .output()
        .await
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Like [`capture`], with the command's stderr in the error.
async fn capture_checked(program: &str, args: &[&str]) -> Res<String> {
    let out = Command::new(program).args(args).output().await?;
    if !out.status.success() {
        return Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

async fn capture(program: &str, args: &[&str]) -> Res<String> {
    let out = Command::new(program).args(args).output().await?;
    if !out.status.success() {
        return Err(format!("{program} failed").into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The value after `key` on its line of a /proc file.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// A `NNN kB` field of a /proc file, in bytes.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    field(text, key)?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

/// The 1, 5 and 15 minute load averages: the machine is shared, so say how busy it was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 1GiB, 512MiB, 256Mi"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "ki" | "kib" => 1024.0,
        "m" | "mi" | "mib" => MIB as f64,
        "g" | "gi" | "gib" => GIB as f64,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        other => return Err(format!("invalid size unit {other:?} in {s:?}")),
    };
    let bytes = (num * mult).round();
    if !(1.0..=(1u64 << 50) as f64).contains(&bytes) {
        return Err(format!("size {s:?} out of range"));
    }
    Ok(bytes as u64)
}

fn fmt_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= GIB as f64 {
        format!("{:.2} GiB", n / GIB as f64)
    } else if n >= MIB as f64 {
        format!("{:.1} MiB", n / MIB as f64)
    } else if n >= 1024.0 {
        format!("{:.0} KiB", n / 1024.0)
    } else {
        format!("{n} B")
    }
}

fn fmt_rate(bytes_per_s: f64) -> String {
    if bytes_per_s >= 1e9 {
        format!("{:.2} GB/s", bytes_per_s / 1e9)
    } else {
        format!("{:.0} MB/s", bytes_per_s / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Ok(GIB));
        assert_eq!(parse_size("64MiB"), Ok(64 * MIB));
        assert_eq!(parse_size("256Mi"), Ok(256 * MIB));
        assert_eq!(parse_size("3GB"), Ok(3_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-99", 1000), Some(Ok((0, 100))));
        assert_eq!(parse_range("bytes=900-", 1000), Some(Ok((900, 1000))));
        assert_eq!(parse_range("bytes=-100", 1000), Some(Ok((900, 1000))));
        assert_eq!(parse_range("bytes=990-2000", 1000), Some(Ok((990, 1000))));
        assert_eq!(parse_range("bytes=1000-", 1000), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), None);
        assert_eq!(parse_range("items=0-1", 1000), None);
    }

    #[test]
    fn stats() {
        let mut s = Stats::default();
        for x in [3.0, 1.0, 2.0, 10.0] {
            s.push(Duration::from_secs_f64(x));
        }
        assert_eq!((s.median(), s.min(), s.max()), (2.5, 1.0, 10.0));
    }

    #[test]
    fn logged_secs() {
        let line = "2025 INFO download{url=x}: bicsi::download: download done size=1 sha512=ab \
                    resumed=0 secs=6.25 mib_per_s=1.0";
        assert_eq!(download_secs(line), Some(6.25));
    }
}
