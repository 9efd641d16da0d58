//! Path `rebuild` (issue 15, Deliver 7): the offline rebuild of a replica against a copy of the
//! same allocated bytes. One `bicsi serve` with two disks in the work dir's filesystem, a
//! 2-replica block volume of --size with a quarter of it written (the image's first bytes,
//! random data) through the attached volume, then detached; each run rebuilds the second
//! replica by hand (`POST /v1/volumes/ID/rebuild` with `from` the first: the target goes err,
//! wo, is copied, compared with `qemu-img compare`, and turns rw; timed around the call) and,
//! alternating, copies the source replica's file with `cp --sparse=always` (the issue's
//! reference), and with `cp --sparse=always` + `sync` (the same bytes made durable, as the
//! rebuild makes them before the replica is rw). The stages of each rebuild (copy, compare) are
//! read from bicsi's log. I/O during a rebuild is not measured: a rebuild runs only while the
//! volume is detached (see README, Replica health). It must not touch anything outside its own
//! directory of the work dir.

use super::*;

pub(crate) async fn rebuild(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    if !is_root() {
        println!("rebuild: skipped: needs root (loop devices, FUSE, mounts)");
        return Ok(vec![]);
    }
    let len = b.size;
    let written = (len / 4).min(b.source.len);
    println!(
        "rebuild: a 2-replica {} block volume with {} written, one replica rebuilt from the other \
         (same node, two directories of the work dir's filesystem), vs cp --sparse=always of \
         the source replica's file; load average {}",
        fmt_bytes(len),
        fmt_bytes(written),
        load_average()
    );
    let dir = b.work.join("rebuild");
    std::fs::create_dir_all(&dir)?;
    let guard = SweepOnDrop(dir.clone());
    let disks = vec![dir.join("d1"), dir.join("d2")];
    for d in &disks {
        std::fs::create_dir_all(d)?;
    }
    let serve = Serve::start_disks(&b.bicsi, &dir, &disks, &b.http).await?;
    let result = rebuild_runs(b, checks, &serve, &dir, len, written).await;
    let result = serve.stop_after(result).await;
    drop(guard);
    result?;
    Ok(vec![])
}

async fn rebuild_runs(
    b: &Bench,
    checks: &mut Checks,
    serve: &Serve,
    dir: &Path,
    len: u64,
    written: u64,
) -> Res<()> {
    let mut csi = csi_connect(&serve.csi).await?;
    let cap = block_capability();
    let vol = create_block_volume(
        &mut csi,
        "rebuild",
        len,
        &[("numberOfReplicas", "2"), ("engine", "qemu")],
    )
    .await?;
    let p = publish_until_ready(&mut csi, &vol, "bench", &cap, Duration::from_secs(60)).await?;
    let staging = dir.join("staging");
    let target = dir.join("target");
    std::fs::create_dir_all(&staging)?;
    let (staging_s, target_s) = (staging.display().to_string(), target.display().to_string());
    node_stage(&mut csi, &vol, &p, &staging_s, &cap).await?;
    node_publish(&mut csi, &vol, &p, &staging_s, &target_s, &cap).await?;
    let mib = written / MIB;
    capture_checked(
        "dd",
        &[
            &format!("if={}", b.source.path.display()),
            &format!("of={target_s}"),
            "bs=1M",
            &format!("count={mib}"),
            "oflag=direct",
            "conv=fsync,notrunc",
            "status=none",
        ],
    )
    .await?;
    csi.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: vol.clone(),
            target_path: target_s.clone(),
        })
        .await
        .map_err(|s| rpc_err("NodeUnpublishVolume", s))?;
    csi.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: vol.clone(),
            staging_target_path: staging_s.clone(),
        })
        .await
        .map_err(|s| rpc_err("NodeUnstageVolume", s))?;
    csi.controller
        .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: vol.clone(),
            node_id: "bench".into(),
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_err("ControllerUnpublishVolume", s))?;

    let record = volume_record(serve, &vol).await?;
    let replicas = record["replicas"].as_array().cloned().unwrap_or_default();
    if replicas.len() != 2 {
        return Err(format!(
            "the volume has {} replicas, not 2: {record}",
            replicas.len()
        )
        .into());
    }
    let source_id = replicas[0]["id"].as_str().unwrap_or_default().to_string();
    let target_id = replicas[1]["id"].as_str().unwrap_or_default().to_string();
    let source_path = PathBuf::from(replicas[0]["path"].as_str().unwrap_or_default());
    let allocated = std::fs::metadata(&source_path)?.blocks() * 512;
    println!(
        "rebuild: source replica {} ({} allocated)",
        source_path.display(),
        fmt_bytes(allocated)
    );
    let copy = dir.join("cp-copy.qcow2");
    let (mut ours, mut cp, mut cp_sync) = (Stats::default(), Stats::default(), Stats::default());
    let (mut copy_ms, mut compare_ms) = (Vec::new(), Vec::new());
    for run in 0..b.runs {
        sync().await;
        let started = Instant::now();
        let resp = serve
            .http
            .post(format!("{}/v1/volumes/{vol}/rebuild", serve.api))
            .json(&serde_json::json!({ "from": source_id }))
            .send()
            .await?;
        let took = started.elapsed();
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            return Err(format!("rebuild: POST answered {status}: {text}").into());
        }
        ours.push(took);
        let after = volume_record(serve, &vol).await?;
        let rw = after["replicas"].as_array().is_some_and(|rs| {
            rs.iter().any(|r| {
                r["id"] == target_id.as_str() && (r["mode"] == "rw" || r["health"]["mode"] == "rw")
            })
        });
        checks.check(rw, format!("rebuild: run {run}: the rebuilt replica is rw"));
        if let Some((c, v)) = last_stages(&serve.log_text()) {
            copy_ms.push(c);
            compare_ms.push(v);
        }
        let (plain, synced) = time_cp(&source_path, &copy).await?;
        cp.push(plain);
        cp_sync.push(synced);
        println!(
            "  run {run}: rebuild {:.3} s (copy {} ms, compare {} ms), cp {:.3} s, cp + sync {:.3} s",
            took.as_secs_f64(),
            copy_ms.last().copied().unwrap_or_default(),
            compare_ms.last().copied().unwrap_or_default(),
            cp.0.last().copied().unwrap_or_default(),
            cp_sync.0.last().copied().unwrap_or_default(),
        );
    }
    println!(
        "rebuild: bicsi {} | cp --sparse=always {} | cp + sync {} | ratio {:.2}x (to cp), {:.2}x \
         (to cp + sync); stages (median ms): copy {}, compare {}; load average {}",
        ours.show(),
        cp.show(),
        cp_sync.show(),
        ours.median() / cp.median(),
        ours.median() / cp_sync.median(),
        median_u64(copy_ms),
        median_u64(compare_ms),
        load_average()
    );
    csi.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: vol.clone(),
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_err("DeleteVolume", s))?;
    Ok(())
}

/// The volume's record from `GET /v1/volumes`.
async fn volume_record(serve: &Serve, id: &str) -> Res<serde_json::Value> {
    let all = serve.get("/v1/volumes").await?;
    all.as_array()
        .and_then(|a| a.iter().find(|v| v["id"] == id).cloned())
        .ok_or_else(|| format!("volume {id} is not in GET /v1/volumes").into())
}

/// The copy and compare milliseconds of the last "rebuild copied and compared" line of the log.
fn last_stages(log: &str) -> Option<(u64, u64)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("rebuild copied and compared"))?;
    let num = |key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        let digits: String = rest
            .trim_start_matches(['=', ':', '"', ' '])
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    Some((num("copy_ms")?, num("compare_ms")?))
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// What the rebuilds are compared with: `cp --sparse=always` of the replica `source` to `copy`
/// from a synced start, once without and once with the `sync` after it (the copy removed after).
pub(crate) async fn time_cp(source: &Path, copy: &Path) -> Res<(Duration, Duration)> {
    let mut took = [Duration::ZERO; 2];
    for (with_sync, took) in [false, true].into_iter().zip(&mut took) {
        let _ = std::fs::remove_file(copy);
        sync().await;
        let started = Instant::now();
        capture_checked(
            "cp",
            &[
                "--sparse=always",
                &source.display().to_string(),
                &copy.display().to_string(),
            ],
        )
        .await?;
        if with_sync {
            sync().await;
        }
        *took = started.elapsed();
    }
    let _ = std::fs::remove_file(copy);
    Ok((took[0], took[1]))
}
