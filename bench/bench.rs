//! `bicsi-bench`: times bicsi's data paths against their references in the same run and prints
//! one table row per path (median [min–max] of N runs each side, the ratio, bicsi's peak
//! resident memory). Run it through `bench/run`, which builds it and gives it a temp directory.
//!
//! Everything happens on this machine over 127.0.0.1: the image is an incompressible random file
//! served by an in-process HTTP server (axum, streamed from disk in 1 MiB chunks, with
//! Content-Length and Range), bicsi is a fresh `bicsi serve` child per run on a fresh data dir,
//! and the references are shell pipelines of curl and coreutils writing to the same filesystem.
//!
//! Adding a path: write an `async fn(&Bench, &mut Checks) -> Res<Vec<Row>>` like
//! [`download_verify`] (time bicsi and its reference in the same runs, alternating their order)
//! and list it in [`PathName`] and `run_path`. Correctness checks go through [`Checks`]: a failed
//! check makes the whole run exit non-zero; times are reported, never asserted.

use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use sha2::{Digest, Sha512};
use tokio::process::Command;

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
}

impl PathName {
    fn all() -> Vec<PathName> {
        PathName::value_variants().to_vec()
    }
}

/// Everything a path needs: the image, where to work, what to run.
struct Bench {
    work: PathBuf,
    bicsi: PathBuf,
    runs: usize,
    source: Source,
    /// URL of `source` on the in-process file server.
    url: String,
    /// Client for bicsi's HTTP API (no proxy).
    http: reqwest::Client,
}

/// The random image on disk.
struct Source {
    path: PathBuf,
    len: u64,
    sha512: String,
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

    /// `6.62 s [6.40–7.01]`
    fn show(&self) -> String {
        if self.0.len() == 1 {
            format!("{:.2} s", self.median())
        } else {
            format!(
                "{:.2} s [{:.2}–{:.2}]",
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
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bicsi-bench: error: {e}");
            ExitCode::FAILURE
        }
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

    let url = start_file_server(source.path.clone(), size).await?;
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
        source,
        url,
        http: reqwest::Client::builder().no_proxy().build()?,
    };
    let mut checks = Checks::default();
    let mut rows = Vec::new();
    for p in paths {
        rows.extend(run_path(p, &bench, &mut checks).await?);
    }

    println!();
    print_table(&rows);
    println!();
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
// The bicsi process

/// A `bicsi serve` child on its own data dir, disk and HTTP port.
struct Serve {
    child: tokio::process::Child,
    pid: u32,
    api: String,
    log: PathBuf,
    http: reqwest::Client,
}

impl Serve {
    async fn start(bin: &Path, dir: &Path, disk: &Path, http: &reqwest::Client) -> Res<Serve> {
        // A free port: bound, read and released (the window for another taker is tiny here).
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let api = format!("http://127.0.0.1:{port}");
        let log = dir.join("serve.log");
        let child = child_command(bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .arg("--csi-endpoint")
            .arg(format!("unix://{}", dir.join("csi.sock").display()))
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--node-id")
            .arg("bench")
            .arg("--disk")
            .arg(disk)
            .env("BICSI_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id().ok_or("bicsi serve exited at once")?;
        let mut serve = Serve {
            child,
            pid,
            api,
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
            if let Some(st) = serve.child.try_wait()? {
                let log = std::fs::read_to_string(&serve.log).unwrap_or_default();
                return Err(format!("bicsi serve exited ({st}) before it was up:\n{log}").into());
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err("bicsi serve did not answer /healthz within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn get(&self, path: &str) -> Res<serde_json::Value> {
        let resp = self.http.get(format!("{}{path}", self.api)).send().await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("GET {path}: {status}: {}", resp.text().await?).into());
        }
        Ok(resp.json().await?)
    }

    /// SIGTERM, wait (SIGKILL after 30 s); returns the log.
    async fn stop(mut self) -> Res<String> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid)?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            eprintln!("bicsi serve did not stop within 30 s of SIGTERM; killing it");
            self.child.kill().await?;
        }
        Ok(std::fs::read_to_string(&self.log)?)
    }
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
        let sha512 = hasher.join().map_err(|_| "hash thread panicked")?;
        Ok(Source { path, len, sha512 })
    })
    .await?
}

struct Served {
    path: PathBuf,
    len: u64,
}

/// Serves the file at `/image` on 127.0.0.1:0; returns its URL.
async fn start_file_server(path: PathBuf, len: u64) -> Res<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/image", get(serve_file))
        .with_state(Arc::new(Served { path, len }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("file server stopped: {e}");
        }
    });
    Ok(format!("http://{addr}/image"))
}

async fn serve_file(State(f): State<Arc<Served>>, headers: HeaderMap) -> Response {
    let len = f.len;
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
    let path = f.path.clone();
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
    if let Ok(v) = HeaderValue::from_str(&format!("\"bench-{len}\"")) {
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

async fn sync() {
    let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
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
