//! Path: CreateVolume while the backing image is still downloading. One `bicsi serve`; per run,
//! [`CALLS`] CreateVolume calls (one client, one replica) with the seed's StorageClass
//! parameters naming a new image whose URL sends its length and first chunk and then stalls, so
//! the download is under way for the whole run. The first call creates the image and reads the
//! head of the URL for the size; the others use what it learned. Every call must answer with
//! the image's size at once: the target is a median under [`TARGET_MS`]. The reference is the
//! same number of CreateVolume calls for plain volumes (no image) on the same server.

use super::*;

/// CreateVolume calls per run and side.
const CALLS: usize = 20;
/// The target for the median latency, in milliseconds.
const TARGET_MS: f64 = 100.0;

pub(crate) async fn create_downloading(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    let len = attach_unit(b.size);
    println!(
        "create-downloading: {} runs; one `bicsi serve`; bicsi = {CALLS} CreateVolume calls from \
         a {} image whose download stalls after its first MiB (a new image per run, created by \
         the first call); reference = {CALLS} CreateVolume calls of plain volumes",
        b.runs,
        fmt_bytes(len)
    );
    let dir = b.work.join("create-downloading");
    let disk = dir.join("disk");
    std::fs::create_dir_all(&disk)?;
    let guard = SweepOnDrop(dir.clone());
    let serve = Serve::start(&b.bicsi, &dir, &disk, &b.http).await?;
    let result = runs(b, checks, &serve, len).await;
    let result = serve.stop_after(result).await;
    drop(guard);
    let (calls, firsts, plain) = result?;
    let median_ms = calls.median() * 1e3;
    let note = format!(
        "median of {} calls {median_ms:.1} ms (target < {TARGET_MS:.0} ms: {}); the first call of \
         each run (creates the image, reads the URL's head) {}",
        calls.0.len(),
        if median_ms < TARGET_MS { "met" } else { "OVER" },
        firsts
            .0
            .iter()
            .map(|s| format!("{:.1} ms", s * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(vec![Row {
        path: format!("CreateVolume while downloading ×{CALLS}"),
        bicsi: calls,
        reference: plain,
        ref_name: "CreateVolume, no image".into(),
        peak_rss: None,
        note: Some(note),
    }])
}

async fn runs(
    b: &Bench,
    checks: &mut Checks,
    serve: &Serve,
    len: u64,
) -> Res<(Stats, Stats, Stats)> {
    let url = format!("{}/stall/sparse-{len}", b.files);
    let mut c = csi_connect(&serve.csi).await?;
    let cap = block_capability();
    let (mut calls, mut firsts, mut plain) = (Stats::default(), Stats::default(), Stats::default());
    for run in 0..b.runs {
        let image = format!("downloading-{run}");
        let parameters = HashMap::from([
            ("numberOfReplicas".to_string(), "1".to_string()),
            ("backingImage".to_string(), image.clone()),
            (
                "backingImageDataSourceType".to_string(),
                "download".to_string(),
            ),
            (
                "backingImageDataSourceParameters".to_string(),
                serde_json::json!({ "url": url }).to_string(),
            ),
        ]);
        let mut ids = Vec::new();
        for i in 0..CALLS {
            let t = Instant::now();
            let req = pb::CreateVolumeRequest {
                name: format!("dl-{run}-{i}"),
                volume_capabilities: vec![cap.clone()],
                parameters: parameters.clone(),
                ..Default::default()
            };
            let v = create(&mut c, req, "CreateVolume while downloading").await?;
            let took = t.elapsed();
            calls.push(took);
            if i == 0 {
                firsts.push(took);
            }
            checks.check(
                v.capacity_bytes as u64 == len.div_ceil(MIB) * MIB,
                format!(
                    "create-downloading run {}: volume {} has {} bytes, not the image's {len}",
                    run + 1,
                    v.volume_id,
                    v.capacity_bytes
                ),
            );
            ids.push(v.volume_id);
        }
        let img: serde_json::Value = b
            .http
            .get(format!("{}/v1/backingimages/{image}", serve.api))
            .send()
            .await?
            .json()
            .await?;
        let ready = img["status"]["diskFileStatusMap"]
            .as_object()
            .is_some_and(|m| m.values().any(|f| f["state"] == "ready"));
        checks.check(
            !ready,
            format!(
                "create-downloading run {}: the image became ready, so the calls did not measure \
                 a download under way",
                run + 1
            ),
        );
        for i in 0..CALLS {
            let t = Instant::now();
            let req = pb::CreateVolumeRequest {
                volume_capabilities: vec![cap.clone()],
                ..one_replica_block(&format!("plain-{run}-{i}"), len)
            };
            let v = create(&mut c, req, "CreateVolume").await?;
            plain.push(t.elapsed());
            ids.push(v.volume_id);
        }
        for id in ids {
            c.controller
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: id,
                    ..Default::default()
                })
                .await
                .map_err(|s| rpc_err("DeleteVolume", s))?;
        }
        println!(
            "  run {}: {CALLS} creates while downloading, median {:.1} ms (first {:.1} ms); \
             {CALLS} plain creates, median {:.1} ms",
            run + 1,
            Stats(calls.0[calls.0.len() - CALLS..].to_vec()).median() * 1e3,
            firsts.0[run] * 1e3,
            Stats(plain.0[plain.0.len() - CALLS..].to_vec()).median() * 1e3
        );
    }
    Ok((calls, firsts, plain))
}
