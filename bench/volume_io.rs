//! Path: volume I/O. A new empty volume (1 replica, the default engine: on this ext4 work
//! directory of one node, the mirror engine over a copy-on-write replica) of one `bicsi serve`,
//! published as a block
//! device (ControllerPublish + NodeStage + NodePublish), against a plain loop device over a raw
//! sparse file on the same filesystem (`losetup` with its defaults). Both get the same fio jobs
//! in the same order (a sequential write first, so the reads find allocated data on both), with
//! direct I/O, one side after the other, alternating which goes first from run to run. Without
//! fio, `dd` with direct I/O does the sequential jobs and the random ones are skipped.

use super::*;

/// One I/O pattern.
struct Job {
    name: &'static str,
    /// fio's `--rw`.
    rw: &'static str,
    bs: &'static str,
    /// Bytes it moves: the whole device for sequential jobs, an eighth for random ones.
    share: u64,
}

const JOBS: [Job; 4] = [
    Job {
        name: "seq write 1M",
        rw: "write",
        bs: "1M",
        share: 1,
    },
    Job {
        name: "seq read 1M",
        rw: "read",
        bs: "1M",
        share: 1,
    },
    Job {
        name: "rand write 4k",
        rw: "randwrite",
        bs: "4k",
        share: 8,
    },
    Job {
        name: "rand read 4k",
        rw: "randread",
        bs: "4k",
        share: 8,
    },
];

/// The device size: a quarter of --size, at least 64 MiB and at most 1 GiB (fio's random jobs
/// at 4 KiB through the slow side must finish in seconds).
fn device_len(size: u64) -> u64 {
    (size / 4 / MIB * MIB).clamp(64 * MIB, GIB)
}

/// Why the engine is FUSE here, printed with the rows when the kernel has no NBD client.
const NO_NBD: &str = "; bound: every request is a round trip through the daemon's single-threaded \
                      FUSE export; this kernel has no nbd (and no ublk) module for the faster \
                      kernel NBD client";

pub(crate) async fn volume_io(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    if !is_root() {
        println!("volume-io: skipped: needs root (loop devices, FUSE, mounts)");
        return Ok(vec![]);
    }
    let fio = have_tool("fio");
    let nbd = Path::new("/sys/module/nbd").exists();
    let len = device_len(b.size);
    println!(
        "volume-io: {} runs; a new empty {} volume of one `bicsi serve` (1 replica, block, \
         published once, untimed) vs a loop device over a sparse raw file of the same size in the \
         same filesystem; {}; the two sides alternate their order",
        b.runs,
        fmt_bytes(len),
        if fio {
            "fio --direct=1 --ioengine=libaio --iodepth=16, sequential jobs over the whole device, \
             random ones over an eighth of it"
                .to_string()
        } else {
            "fio is missing (Debian package fio): dd with oflag/iflag=direct does the sequential \
             jobs, the random ones are skipped"
                .to_string()
        }
    );
    let dir = b.work.join("volume-io");
    let disk = dir.join("disk");
    std::fs::create_dir_all(&disk)?;
    let guard = SweepOnDrop(dir.clone());
    let serve = Serve::start(&b.bicsi, &dir, &disk, &b.http).await?;
    let result = io_runs(b, checks, &serve, &dir, len, fio).await;
    let result = serve.stop_after(result).await;
    drop(guard);
    let (stats, peak, engine) = result?;
    let mut rows = Vec::new();
    for (job, (bicsi, reference)) in JOBS.iter().zip(stats) {
        if bicsi.0.is_empty() {
            continue;
        }
        let bytes = (len / job.share) as f64;
        let ratio = bicsi.median() / reference.median();
        rows.push(Row {
            path: format!("volume I/O: {} ({})", job.name, fmt_bytes(len / job.share)),
            bicsi: bicsi.clone(),
            reference: reference.clone(),
            ref_name: "plain loop device over a raw file".into(),
            peak_rss: peak,
            note: Some(format!(
                "{} vs {}; target ≥ half the loop device's throughput (ratio ≤ 2): {}; the \
                 default engine here: {engine}; peak RSS = its process (VmHWM){}",
                fmt_rate(bytes / bicsi.median()),
                fmt_rate(bytes / reference.median()),
                if ratio <= 2.0 { "met" } else { "OVER" },
                if nbd || !engine.starts_with("qemu") {
                    ""
                } else {
                    NO_NBD
                }
            )),
        });
    }
    Ok(rows)
}

async fn io_runs(
    b: &Bench,
    checks: &mut Checks,
    serve: &Serve,
    dir: &Path,
    len: u64,
    fio: bool,
) -> Res<(Vec<(Stats, Stats)>, Option<u64>, String)> {
    let mut csi = csi_connect(&serve.csi).await?;
    let BlockVolume {
        id: vol,
        staging: staging_s,
        target: target_s,
    } = publish_block_volume(&mut csi, "volume-io", len, dir).await?;
    let volumes = serve.get("/v1/volumes").await?;
    let record = volumes
        .as_array()
        .and_then(|a| a.iter().find(|v| v["id"] == vol.as_str()))
        .cloned()
        .unwrap_or_default();
    let engine = format!(
        "{} over a {} replica",
        record["spec"]["engine"].as_str().unwrap_or("?"),
        record["replicas"][0]["format"].as_str().unwrap_or("qcow2")
    );
    println!("volume-io: the volume's engine: {engine}");

    let raw = dir.join("plain.raw");
    std::fs::File::create(&raw)?.set_len(len)?;
    let loopdev = capture_checked("losetup", &["--find", "--show", &raw.to_string_lossy()]).await?;
    let result = io_sides(
        b,
        checks,
        Path::new(&target_s),
        Path::new(&loopdev),
        len,
        fio,
    )
    .await;
    let _ = capture("losetup", &["-d", &loopdev]).await;
    let _ = std::fs::remove_file(&raw);
    let mut pids = engines_under(dir);
    pids.extend(
        crate::engines::mirror::mirror_rss(dir)
            .into_iter()
            .map(|(pid, _)| pid),
    );
    let peak = pids
        .into_iter()
        .filter_map(|pid| u32::try_from(pid).ok().and_then(vm_hwm))
        .max();

    // Detach (untimed) and let the engine exit.
    detach_and_delete(&mut csi, &vol, target_s, staging_s).await?;
    Ok((result?, peak, engine))
}

async fn io_sides(
    b: &Bench,
    checks: &mut Checks,
    volume: &Path,
    plain: &Path,
    len: u64,
    fio: bool,
) -> Res<Vec<(Stats, Stats)>> {
    let mut stats: Vec<(Stats, Stats)> = JOBS.iter().map(|_| Default::default()).collect();
    for run in 0..b.runs {
        let mut notes = Vec::new();
        for (j, job) in JOBS.iter().enumerate() {
            if !fio && job.share != 1 {
                continue;
            }
            let mut line = format!("{}:", job.name);
            for k in 0..2 {
                let bicsi_side = (run + k) % 2 == 0;
                let dev = if bicsi_side { volume } else { plain };
                sync().await;
                let t = if fio {
                    run_fio(dev, job, len).await?
                } else {
                    run_dd(dev, job, len).await?
                };
                let _ = write!(
                    line,
                    " {} {:.2} s",
                    if bicsi_side { "bicsi" } else { "loop" },
                    t.as_secs_f64()
                );
                if bicsi_side {
                    stats[j].0.push(t);
                } else {
                    stats[j].1.push(t);
                }
            }
            notes.push(line);
        }
        println!("  run {}: {}", run + 1, notes.join("; "));
    }
    // What was written through the volume reads back the same from both ends of the engine.
    let ok = tokio::task::spawn_blocking({
        let volume = volume.to_path_buf();
        move || -> std::io::Result<bool> {
            let pattern: Vec<u8> = (0..MIB as usize).map(|i| (i * 7 % 251) as u8).collect();
            let f = std::fs::OpenOptions::new().write(true).open(&volume)?;
            f.write_all_at(&pattern, len - MIB)?;
            f.sync_all()?;
            drop(f);
            let mut back = vec![0u8; MIB as usize];
            std::fs::File::open(&volume)?.read_exact_at(&mut back, len - MIB)?;
            Ok(back == pattern)
        }
    })
    .await?;
    checks.check(
        ok.as_ref().is_ok_and(|ok| *ok),
        format!("volume-io: the last MiB written through the volume reads back: {ok:?}"),
    );
    Ok(stats)
}

/// One fio job on `dev`; returns fio's own runtime of the job.
async fn run_fio(dev: &Path, job: &Job, len: u64) -> Res<Duration> {
    let size = len / job.share;
    let fio = FioJob {
        rw: job.rw,
        bs: job.bs,
        iodepth: 16,
        size,
        runtime: None,
    };
    let out = fio.run(&dev.display().to_string()).await?;
    if out.io_bytes != size {
        return Err(format!(
            "fio {} on {} moved {} bytes, not {size}",
            job.name,
            dev.display(),
            out.io_bytes
        )
        .into());
    }
    Ok(Duration::from_millis(out.runtime_ms.max(1)))
}

/// The sequential jobs with dd (direct I/O), timed from outside.
async fn run_dd(dev: &Path, job: &Job, len: u64) -> Res<Duration> {
    let count = (len / MIB).to_string();
    let script = if job.rw == "write" {
        "dd if=/dev/zero of=\"$1\" bs=1M count=\"$2\" oflag=direct conv=notrunc status=none"
    } else {
        "dd if=\"$1\" of=/dev/null bs=1M count=\"$2\" iflag=direct status=none"
    };
    run_script(script, &[dev.as_os_str(), count.as_ref()]).await
}
