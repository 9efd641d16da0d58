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
    let result = serve.stop_after(result).await;
    drop(guard);
    result?;
    Ok(vec![])
}

async fn fuse_runs(b: &Bench, checks: &mut Checks, serve: &Serve, dir: &Path, len: u64) -> Res<()> {
    let mut csi = csi_connect(&serve.csi).await?;
    let BlockVolume {
        id: vol,
        staging: staging_s,
        target: target_s,
    } = publish_block_volume(&mut csi, "volume-io-fuse", len, dir).await?;

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
