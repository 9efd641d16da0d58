//! Path: attach. CreateVolume, ControllerPublish, NodeStage and NodePublish of a new volume for
//! a 1x and a 4x image (root), against making the same volume by hand.

use super::*;

/// The 1x image of the attach path: a quarter of --size in whole MiB, at least 64 MiB.
pub(crate) fn attach_unit(size: u64) -> u64 {
    (size / 4 / MIB * MIB).max(64 * MIB)
}

/// Attach of a new volume, image already ready on the disk: CreateVolume (1 replica) +
/// ControllerPublish + NodeStage (block) + NodePublish, for a 1x and a 4x image on one
/// `bicsi serve`; detach (untimed) after each. O(1) in the image size: the ratio 4x/1x.
pub(crate) async fn attach(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
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
    let result = serve.stop_after(result).await;
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

pub(crate) async fn attach_runs(
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
pub(crate) fn check_block_target(target: &Path, image: &Path, len: u64) -> Result<(), String> {
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
