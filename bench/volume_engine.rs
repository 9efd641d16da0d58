//! Path `volume-io-loop`: the loop engine as it ships (issue 14, Deliver 2). A new empty
//! 1-replica block volume of one `bicsi serve` whose disk is XFS made with reflink on a loop
//! device (as sync-xfs sets up), so the automatic choice gives it the loop engine: its replica
//! is a raw file and its published device a loop device straight on that file, no engine
//! process. Measured against a plain loop device over a sparse raw file in the same XFS, with
//! the same fio jobs as the engine candidates (`engines.rs`: seq 1M and rand 4k, read and
//! write, depth 1 and 32, direct I/O, sides rotating), after a crc32c-verified pattern. It
//! must not touch anything outside its own directory of the work dir.

use super::*;

pub(crate) async fn loop_engine(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    if !check_root("volume-io-loop") {
        return Ok(vec![]);
    }
    if !have_tool("mkfs.xfs") {
        println!("volume-io-loop: skipped: mkfs.xfs is missing (Debian package xfsprogs)");
        return Ok(vec![]);
    }
    let len = device_len(b.size);
    println!(
        "volume-io-loop: a new empty {} volume of one `bicsi serve` (1 replica, block, engine \
         chosen automatically) on a disk in XFS (reflink=1) on a loop device, vs a plain loop \
         device in the same XFS; load average {}",
        fmt_bytes(len),
        load_average()
    );
    let dir = b.work.join("volume-io-loop");
    std::fs::create_dir_all(&dir)?;
    let guard = SweepOnDrop(dir.clone());
    let xfs = LoopMount::xfs(&dir.join("xfs.img"), &dir.join("xfs"), 4 * len + GIB).await?;
    let disk = xfs.mnt.join("disk");
    std::fs::create_dir_all(&disk)?;
    let serve = Serve::start(&b.bicsi, &dir, &disk, &b.http).await?;
    let result = served_volume_runs(b, checks, &serve, &dir, &xfs.mnt, len, &LOOP_VOLUME).await;
    let log = serve.stop().await.unwrap_or_default();
    if result.is_err() {
        eprintln!("bicsi serve log (last lines):\n{}", log_tail(&log, 20));
    }
    drop(xfs);
    drop(guard);
    result?;
    Ok(vec![])
}

/// A volume of one `bicsi serve` as it ships, measured against a plain loop device in the same
/// filesystem: what differs between the engines' paths.
pub(super) struct ServedVolume {
    /// The path, also the volume's name.
    pub path: &'static str,
    /// The CreateVolume parameters (the number of replicas, a chosen engine).
    pub parameters: &'static [(&'static str, &'static str)],
    /// Whether the engine chosen, read from the volume's record, is the one the path measures,
    /// and the check's text.
    pub chosen: fn(&serde_json::Value) -> (bool, String),
    /// The check that no qemu-storage-daemon serves the volume.
    pub no_daemon: &'static str,
    /// The side's label and description in the results.
    pub label: &'static str,
    pub about: &'static str,
    /// Whether the engine is a `bicsi engine-mirror` process whose resident memory is shown
    /// and checked after the jobs.
    pub mirror_rss: bool,
}

/// Creates the volume `v` on `serve`, checks the engine chosen, publishes it as a block device,
/// checks that no qemu-storage-daemon serves it and that a verified pattern reads back, and
/// measures it against a plain loop device in `fs`; detaches and deletes it after.
pub(super) async fn served_volume_runs(
    b: &Bench,
    checks: &mut Checks,
    serve: &Serve,
    dir: &Path,
    fs: &Path,
    len: u64,
    v: &ServedVolume,
) -> Res<()> {
    let path = v.path;
    let mut csi = csi_connect(&serve.csi).await?;
    let cap = block_capability();
    let vol = create_block_volume(&mut csi, path, len, v.parameters).await?;
    let volumes = serve.get("/v1/volumes").await?;
    let record = volumes
        .as_array()
        .and_then(|a| a.iter().find(|r| r["id"] == vol.as_str()))
        .cloned()
        .unwrap_or_default();
    let (ok, text) = (v.chosen)(&record);
    checks.check(ok, text);
    let p = publish_until_ready(&mut csi, &vol, "bench", &cap, Duration::from_secs(60)).await?;
    let staging = dir.join("staging");
    let target = dir.join("target");
    std::fs::create_dir_all(&staging)?;
    let (staging_s, target_s) = (staging.display().to_string(), target.display().to_string());
    node_stage(&mut csi, &vol, &p, &staging_s, &cap).await?;
    node_publish(&mut csi, &vol, &p, &staging_s, &target_s, &cap).await?;
    checks.check(engines_under(dir).is_empty(), v.no_daemon);
    let plain = plain_loop(fs, len).await?;
    let verified = verify(&target_s, len).await;
    checks.check(
        verified.is_ok(),
        format!("{path}: a verified pattern reads back through the volume: {verified:?}"),
    );
    let sides = vec![
        plain,
        Side {
            label: v.label.into(),
            dev: target_s.clone(),
            about: v.about.into(),
            verified: Some(verified),
        },
    ];
    let result = measure(b, &sides, len).await;
    if v.mirror_rss {
        let rss = super::mirror::show_mirror_rss(dir);
        checks.check(
            !rss.is_empty() && rss.iter().all(|(_, r)| *r < 64 * MIB),
            format!("{path}: the engine's resident memory stays under 64 MiB ({rss:?})"),
        );
    }
    detach(&sides[0].dev).await;
    detach_and_delete(&mut csi, &vol, target_s, staging_s).await?;
    let res = result?;
    print_results(path, &sides, &res, len, b.runs, b.quick);
    Ok(())
}

/// The engine of a volume's record (`spec.engine`).
pub(super) fn engine_of(record: &serde_json::Value) -> &str {
    record["spec"]["engine"].as_str().unwrap_or_default()
}

const LOOP_VOLUME: ServedVolume = ServedVolume {
    path: "volume-io-loop",
    parameters: &[("numberOfReplicas", "1")],
    chosen: |record| {
        let engine = engine_of(record);
        (
            engine == "loop",
            format!(
                "volume-io-loop: the volume on XFS with reflink got the loop engine ({engine:?})"
            ),
        )
    },
    no_daemon: "volume-io-loop: no qemu-storage-daemon serves the loop engine's volume",
    label: "bicsi (loop engine)",
    about: "the published block device of a bicsi volume of the loop engine: a buffered loop \
            device (512-byte sectors) straight on the raw replica file in the same XFS",
    mirror_rss: false,
};
