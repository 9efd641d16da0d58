//! Path `rebuild-online` (issue 15, Deliver 4 and 7): the online rebuild of a replica of an
//! attached 2-replica mirror volume, against a copy of the same allocated bytes, and fio's random
//! 4k write IOPS while it runs against the healthy figure. One `bicsi serve` with two XFS disks
//! (reflink=1, each on a loop device of its own, so the engine is `mirror`), a block volume of
//! --size with a quarter of it written (the image's first bytes) through the attached volume.
//! Each run: fio random write 4k at depth 32 over the written quarter for 5 s (healthy); then
//! twice the first disk filled and 16 MiB written into a hole of the volume (the engine drops
//! that disk's replica: err) and the filler removed: once with nothing else running (the
//! rebuild's own time, as bicsi logs it from the target's file being made to the replica in
//! place, against `cp --sparse=always` of the source replica's file onto the first disk, and the
//! same with `sync`), once with the same fio job started at once for 30 s, its IOPS logged every
//! 100 ms, while the record is polled every 50 ms (the IOPS of the samples inside the wo window
//! against the healthy figure). The first disk's space held by the replicas the engine dropped
//! is freed when the engine stops. It must not touch anything outside its own directory of the
//! work dir.

use super::rebuild::time_cp;
use super::*;

pub(crate) async fn rebuild_online(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    if !is_root() {
        println!("rebuild-online: skipped: needs root (loop devices, FUSE, mounts)");
        return Ok(vec![]);
    }
    if !have_tool("mkfs.xfs") || !have_tool("fio") {
        println!("rebuild-online: skipped: needs mkfs.xfs (xfsprogs) and fio (fio)");
        return Ok(vec![]);
    }
    let len = b.size;
    let written = (len / 4).min(b.source.len);
    println!(
        "rebuild-online: an attached 2-replica mirror {} block volume with {} written, one \
         replica made err by its disk filling and rebuilt online while fio writes; load average {}",
        fmt_bytes(len),
        fmt_bytes(written),
        load_average()
    );
    let dir = b.work.join("rebuild-online");
    std::fs::create_dir_all(&dir)?;
    let guard = SweepOnDrop(dir.clone());
    let d1 = LoopMount::xfs(&dir.join("xfs1.img"), &dir.join("xfs1"), 4 * len + GIB).await?;
    let d2 = LoopMount::xfs(&dir.join("xfs2.img"), &dir.join("xfs2"), 4 * len + GIB).await?;
    let disks = vec![d1.mnt.join("disk"), d2.mnt.join("disk")];
    for d in &disks {
        std::fs::create_dir_all(d)?;
    }
    let serve = Serve::start_disks(&b.bicsi, &dir, &disks, &b.http).await?;
    let result = online_runs(b, checks, &serve, &dir, &d1.mnt, len, written).await;
    let result = serve.stop_after(result).await;
    drop(d2);
    drop(d1);
    drop(guard);
    result?;
    Ok(vec![])
}

/// Fills the disk at `small`, writes 16 MiB of random data at MiB `seek` of the volume (a hole:
/// its replica on that disk fails the write and the engine drops it), waits for it to be err and
/// makes room again.
async fn make_err(
    serve: &Serve,
    vol: &str,
    replica: &str,
    small: &Path,
    dev: &str,
    seek: u64,
) -> Res<()> {
    let st = nix::sys::statvfs::statvfs(small)?;
    let avail = st.blocks_available() * st.fragment_size();
    let filler = small.join("filler");
    capture_checked(
        "fallocate",
        &[
            "-l",
            &avail.saturating_sub(MIB).to_string(),
            &filler.display().to_string(),
        ],
    )
    .await?;
    capture_checked(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={dev}"),
            "bs=1M",
            "count=16",
            &format!("seek={seek}"),
            "oflag=direct",
            "conv=fsync,notrunc",
            "status=none",
        ],
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while mode_of(&volume_record(serve, vol).await?, replica) != "err" {
        if Instant::now() > deadline {
            return Err("rebuild-online: the replica on the full disk never turned err".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::remove_file(&filler)?;
    Ok(())
}

/// Polls the record every 50 ms until `replica` is rw again: (when it was first seen wo, when
/// rw), measured from `t0`.
async fn wait_rebuilt(
    serve: &Serve,
    vol: &str,
    replica: &str,
    t0: Instant,
) -> Res<(Duration, Duration)> {
    let mut wo_at = None;
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        let m = mode_of(&volume_record(serve, vol).await?, replica);
        if m == "wo" && wo_at.is_none() {
            wo_at = Some(t0.elapsed());
        }
        if m == "rw" {
            let rw = t0.elapsed();
            return Ok((wo_at.unwrap_or(rw), rw));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("rebuild-online: the replica did not turn rw within 180 s".into())
}

/// A replica's mode in a `GET /v1/volumes` record.
fn mode_of(record: &serde_json::Value, replica: &str) -> String {
    record["replicas"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["id"] == replica))
        .map(|r| {
            r["health"]["mode"]
                .as_str()
                .or(r["mode"].as_str())
                .unwrap_or("rw")
                .to_string()
        })
        .unwrap_or_default()
}

/// The last "replica rebuilt online and verified" line of the log.
fn last_rebuild_line(log: &str) -> Option<&str> {
    log.lines()
        .rev()
        .find(|l| l.contains("replica rebuilt online and verified"))
}

/// The number after `name` (`name=123`, `"name":123`) in a log line.
fn log_number(line: &str, name: &str) -> Option<u64> {
    let rest = &line[line.find(name)? + name.len()..];
    rest.trim_start_matches(['=', ':', '"', ' '])
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

/// Where the last online rebuild's time went: the domain's stages (from its log line) and the
/// engine's (from the engine's log under `data_dir`).
fn last_stages(log: &str, data_dir: &Path) -> String {
    let Some(line) = last_rebuild_line(log) else {
        return "stages: n/a".into();
    };
    let ms = |name| log_number(line, name).map_or("?".to_string(), |v| v.to_string());
    let engine = std::fs::read_dir(data_dir.join("engines"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("mirror.log")).ok())
        .filter_map(|t| {
            t.lines()
                .rfind(|l| l.contains("copied and verified identical"))
                .and_then(|l| l.find('(').map(|i| l[i..].to_string()))
        })
        .last()
        .unwrap_or_else(|| "(engine stages n/a)".into());
    format!(
        "stages: start {} ms, engine {} ms {engine}, finish {} ms",
        ms("start_ms"),
        ms("engine_ms"),
        ms("finish_ms")
    )
}

/// The `took_ms` of the last "replica rebuilt online and verified" line of the log.
fn last_took_ms(log: &str) -> Option<u64> {
    log_number(last_rebuild_line(log)?, "took_ms")
}

/// Mean of fio's IOPS log samples (`msec, iops, ...`) with msec in `[from, to]`.
fn mean_iops(log: &Path, from: u64, to: u64) -> Option<(f64, usize)> {
    let text = std::fs::read_to_string(log).ok()?;
    let samples: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split(',').map(str::trim);
            let ms: u64 = f.next()?.parse().ok()?;
            let v: f64 = f.next()?.parse().ok()?;
            (ms >= from && ms <= to).then_some(v)
        })
        .collect();
    (!samples.is_empty()).then(|| {
        (
            samples.iter().sum::<f64>() / samples.len() as f64,
            samples.len(),
        )
    })
}

#[allow(clippy::too_many_arguments)]
async fn online_runs(
    b: &Bench,
    checks: &mut Checks,
    serve: &Serve,
    dir: &Path,
    small: &Path,
    len: u64,
    written: u64,
) -> Res<()> {
    let mut csi = csi_connect(&serve.csi).await?;
    let cap = block_capability();
    let vol = create_block_volume(
        &mut csi,
        "rebuild-online",
        len,
        &[("numberOfReplicas", "2")],
    )
    .await?;
    let p = publish_until_ready(&mut csi, &vol, "bench", &cap, Duration::from_secs(60)).await?;
    let staging = dir.join("staging");
    let target = dir.join("target");
    std::fs::create_dir_all(&staging)?;
    let (staging_s, target_s) = (staging.display().to_string(), target.display().to_string());
    node_stage(&mut csi, &vol, &p, &staging_s, &cap).await?;
    node_publish(&mut csi, &vol, &p, &staging_s, &target_s, &cap).await?;
    let record = volume_record(serve, &vol).await?;
    checks.check(
        record["spec"]["engine"] == "mirror",
        format!(
            "rebuild-online: the volume got the mirror engine ({})",
            record["spec"]["engine"]
        ),
    );
    capture_checked(
        "dd",
        &[
            &format!("if={}", b.source.path.display()),
            &format!("of={target_s}"),
            "bs=1M",
            &format!("count={}", written / MIB),
            "oflag=direct",
            "conv=fsync,notrunc",
            "status=none",
        ],
    )
    .await?;
    let replicas = record["replicas"].as_array().cloned().unwrap_or_default();
    let on = |disk: &Path| {
        replicas
            .iter()
            .find(|r| Path::new(r["path"].as_str().unwrap_or_default()).starts_with(disk))
            .cloned()
    };
    let (Some(victim), Some(source)) = (
        on(small),
        replicas
            .iter()
            .find(|r| !Path::new(r["path"].as_str().unwrap_or_default()).starts_with(small)),
    ) else {
        return Err(format!("rebuild-online: no replica on each disk: {record}").into());
    };
    let victim_id = victim["id"].as_str().unwrap_or_default().to_string();
    let source_path = PathBuf::from(source["path"].as_str().unwrap_or_default());
    let job = FioJob {
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        size: written,
        runtime: Some(5),
    };
    let (mut ours, mut window, mut cp, mut cp_sync) = (
        Stats::default(),
        Stats::default(),
        Stats::default(),
        Stats::default(),
    );
    let (mut healthy_iops, mut during_iops) = (Vec::new(), Vec::new());
    // Each run writes 16 MiB twice into the hole past the written half, at MiB `slot(run, k)`:
    // 64 MiB apart per run (32 between the idle and the fio fault) where the volume has room,
    // half that in a small one (`--quick`'s 64 MiB: 32 and 48, ending at its last byte).
    let stride = if len / 2 + b.runs as u64 * 64 * MIB <= len {
        64
    } else {
        32
    };
    let slot = |run: usize, k: u64| (len / 2) / MIB + run as u64 * stride + k * stride / 2;
    for run in 0..b.runs {
        let healthy = job.run(&target_s).await?;
        healthy_iops.push(healthy.iops);
        // Idle: the rebuild's own time, against cp of the same file.
        make_err(serve, &vol, &victim_id, small, &target_s, slot(run, 0)).await?;
        let (wo, rw) = wait_rebuilt(serve, &vol, &victim_id, Instant::now()).await?;
        let idle_ms = last_took_ms(&serve.log_text()).unwrap_or((rw - wo).as_millis() as u64);
        ours.push(Duration::from_millis(idle_ms));
        let idle_stages = last_stages(&serve.log_text(), dir);
        // Under fio: the volume's IOPS while the rebuild runs.
        make_err(serve, &vol, &victim_id, small, &target_s, slot(run, 1)).await?;
        let iops_prefix = dir.join(format!("fio-{run}"));
        let mut args = FioJob {
            runtime: Some(30),
            ..job
        }
        .args();
        args.extend([
            format!("--write_iops_log={}", iops_prefix.display()),
            "--log_avg_msec=100".into(),
            format!("--filename={target_s}"),
        ]);
        let fio_started = Instant::now();
        let fio = tokio::spawn(async move {
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            capture_checked("fio", &argv).await.map(|_| ())
        });
        let (wo, rw) = wait_rebuilt(serve, &vol, &victim_id, fio_started).await?;
        fio.await??;
        let took = last_took_ms(&serve.log_text()).unwrap_or((rw - wo).as_millis() as u64);
        window.push(Duration::from_millis(took));
        let log = PathBuf::from(format!("{}_iops.1.log", iops_prefix.display()));
        let during = mean_iops(&log, wo.as_millis() as u64, rw.as_millis() as u64);
        if let Some((iops, _)) = during {
            during_iops.push(iops);
        }
        checks.check(
            mode_of(&volume_record(serve, &vol).await?, &victim_id) == "rw",
            format!("rebuild-online: run {run}: the rebuilt replica is rw"),
        );
        let copy = small.join("cp-copy.raw");
        let (plain, synced) = time_cp(&source_path, &copy).await?;
        cp.push(plain);
        cp_sync.push(synced);
        println!(
            "  run {run}: rebuild {:.3} s idle, {:.3} s under fio; cp {:.3} s, cp + sync {:.3} s; fio \
             rand write 4k qd32: healthy {:.0} IOPS, during the rebuild {} ({} samples); idle \
             {idle_stages}",
            idle_ms as f64 / 1000.0,
            took as f64 / 1000.0,
            cp.0.last().copied().unwrap_or_default(),
            cp_sync.0.last().copied().unwrap_or_default(),
            healthy.iops,
            during
                .map(|(i, _)| format!("{i:.0} IOPS"))
                .unwrap_or_else(|| "n/a (shorter than one sample)".into()),
            during.map(|(_, n)| n).unwrap_or(0),
        );
    }
    let allocated = std::fs::metadata(&source_path)?.blocks() * 512;
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let (h, d) = (med(healthy_iops), med(during_iops));
    println!(
        "rebuild-online: source replica {} allocated; bicsi online rebuild {} (under fio {}) | cp \
         --sparse=always {} | cp + sync {} | ratio {:.2}x (to cp), {:.2}x (to cp + sync); fio \
         rand write 4k qd32 median: healthy {h:.0} IOPS, during the rebuild {d:.0} IOPS \
         ({:.2}x); load average {}",
        fmt_bytes(allocated),
        ours.show(),
        window.show(),
        cp.show(),
        cp_sync.show(),
        ours.median() / cp.median(),
        ours.median() / cp_sync.median(),
        d / h,
        load_average()
    );
    detach_and_delete(&mut csi, &vol, target_s, staging_s).await?;
    Ok(())
}

/// The volume's record from `GET /v1/volumes`.
async fn volume_record(serve: &Serve, id: &str) -> Res<serde_json::Value> {
    let all = serve.get("/v1/volumes").await?;
    all.as_array()
        .and_then(|a| a.iter().find(|v| v["id"] == id).cloned())
        .ok_or_else(|| format!("volume {id} is not in GET /v1/volumes").into())
}
