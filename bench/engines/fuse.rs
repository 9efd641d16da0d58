//! Path `volume-io-fuse`: the engine as it ships, a volume of one `bicsi serve` published as a
//! block device (qemu-storage-daemon's FUSE export of the qcow2 replica, a buffered loop device
//! on it), against the plain loop device, with the engines' fio matrix.

use super::*;

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
