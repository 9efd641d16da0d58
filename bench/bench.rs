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
//! a new volume for two image sizes (root only); backup and restore to a backup target (root
//! only, `backup`). Every process, mount, loop device and
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

use api::*;
use attach::*;
use daemon::*;
use download_verify::*;
use fio::FioJob;
use images::*;
use kit::{alive, engines_under, have_tool, is_root, try_free_port};
use results::*;
use sync_cross::*;
use sync_same_node::*;
use system::*;
use util::*;

#[path = "../tests/kit/host.rs"]
mod kit;

mod api;
mod attach;
mod backup;
mod control;
mod create_downloading;
mod daemon;
mod decompress;
mod download_verify;
mod engines;
mod fio;
mod images;
mod rebuild;
mod rebuild_online;
mod results;
mod sync_cross;
mod sync_same_node;
mod system;
mod util;
mod volume_io;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Chunk size of the file server and of the generator.
const CHUNK: usize = 1 << 20;
/// The memory bound for the node agent while it moves a 2 GiB image.
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
    /// A compressed sparse image (gzip, xz, zstd) to a ready, verified file vs
    /// `curl URL | <decompressor> > FILE && sha512sum FILE` (issue 20; name it to run it).
    DownloadDecompress,
    /// Second disk of the same node ready (ext4, the work dir's filesystem) vs
    /// `cp --sparse=always`.
    SyncExt4,
    /// Second disk of the same node ready on XFS with reflink (loop-mounted; root) vs
    /// `cp --reflink=always`.
    SyncXfs,
    /// Another node's disk ready (HTTPS, mutual TLS, between two node agents) vs curl of the same stream.
    SyncCross,
    /// The same with the sender's chunk manifest removed first: the receiver falls back to the
    /// SHA-512 of the whole logical content (as before manifests, and for files without one).
    SyncCrossSha512,
    /// The same as sync-cross with the fully random image of --size (no holes: every chunk is
    /// data), vs curl of the same bytes (issue 22).
    SyncCrossDense,
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
    /// Backup and restore of a volume with a quarter written over an image, to file:// and a
    /// local S3 server, vs `tar | zstd` and restic; the incremental after 1% more (root).
    Backup,
    /// Engine candidates (issue 14), not run by default: bicsi's volume as shipped, with fio's
    /// job matrix (seq 1M / rand 4k, read / write, depth 1 / 32) vs a plain loop device.
    VolumeIoFuse,
    /// qemu-storage-daemon 10.0 started by hand with each of its knobs, same jobs.
    VolumeIoFuseTuned,
    /// Raw replicas cloned by reflink on XFS, attached straight to loop devices, same jobs;
    /// and the time to clone an image.
    VolumeIoLoopRaw,
    /// The loop engine as it ships: a bicsi volume on an XFS-with-reflink disk (engine chosen
    /// automatically), same jobs as the candidates, vs a plain loop device in the same XFS.
    VolumeIoLoop,
    /// A replica rebuilt by hand (detached 2-replica volume of --size, a quarter written) vs
    /// `cp --sparse=always` of the source replica's file, and the same with `sync` (issue 15).
    Rebuild,
    /// A replica of an attached 2-replica mirror volume (two XFS disks) made err by its disk
    /// filling and rebuilt online vs `cp --sparse=always` of the source replica's file, and fio
    /// random write 4k IOPS during the rebuild vs healthy (issue 15).
    RebuildOnline,
    /// bicsi's own mirror engine started by hand with its knobs: two raw replicas on two XFS
    /// disks, same jobs.
    VolumeIoMirrorTuned,
    /// The mirror engine as it ships: a 2-replica bicsi volume on two XFS disks (engine chosen
    /// automatically), same jobs, and the engine's resident memory.
    VolumeIoMirror,
    /// The mirror engine with a remote replica: a controller and two node agents on 127.0.0.1
    /// (an XFS disk each), a 2-replica volume attached on the first (its second replica over the
    /// engine's NBD client) vs a 1-replica loop-engine volume, same jobs.
    VolumeIoMirrorRemote,
    /// The mirror engine over a copy-on-write replica: a 1-replica bicsi volume (`engine:
    /// mirror`) on an ext4 disk on a loop device, same jobs, vs a plain loop device in that ext4.
    VolumeIoCow,
}

impl PathName {
    /// Every path but the engine candidates, which take minutes each, the rebuild and the
    /// decompression (its images take minutes to compress): name them to run them.
    fn all() -> Vec<PathName> {
        PathName::value_variants()
            .iter()
            .copied()
            .filter(|p| {
                !matches!(
                    p,
                    PathName::VolumeIoFuse
                        | PathName::DownloadDecompress
                        | PathName::VolumeIoFuseTuned
                        | PathName::VolumeIoLoopRaw
                        | PathName::VolumeIoLoop
                        | PathName::Rebuild
                        | PathName::RebuildOnline
                        | PathName::VolumeIoMirrorTuned
                        | PathName::VolumeIoMirror
                        | PathName::VolumeIoMirrorRemote
                        | PathName::VolumeIoCow
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
                | PathName::DownloadDecompress
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
        PathName::DownloadDecompress => decompress::download_decompress(b, checks).await,
        PathName::SyncExt4 => sync_ext4(b, checks).await,
        PathName::SyncXfs => sync_xfs(b, checks).await,
        PathName::SyncCross => sync_cross(b, checks, true, false).await,
        PathName::SyncCrossSha512 => sync_cross(b, checks, false, false).await,
        PathName::SyncCrossDense => sync_cross(b, checks, true, true).await,
        PathName::Attach => attach(b, checks).await,
        PathName::Control => control::control(b, checks).await,
        PathName::VolumeIo => volume_io::volume_io(b, checks).await,
        PathName::CreateDownloading => create_downloading::create_downloading(b, checks).await,
        PathName::Backup => backup::backup(b, checks).await,
        PathName::VolumeIoFuse => engines::fuse(b, checks).await,
        PathName::VolumeIoFuseTuned => engines::fuse_tuned(b, checks).await,
        PathName::VolumeIoLoopRaw => engines::loop_raw(b, checks).await,
        PathName::VolumeIoLoop => engines::loop_engine(b, checks).await,
        PathName::Rebuild => rebuild::rebuild(b, checks).await,
        PathName::RebuildOnline => rebuild_online::rebuild_online(b, checks).await,
        PathName::VolumeIoMirrorTuned => engines::mirror_tuned(b, checks).await,
        PathName::VolumeIoMirror => engines::mirror_engine(b, checks).await,
        PathName::VolumeIoMirrorRemote => engines::mirror_remote(b, checks).await,
        PathName::VolumeIoCow => engines::cow_engine(b, checks).await,
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
