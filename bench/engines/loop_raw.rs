//! Path `volume-io-loop-raw`: the replica as a raw reflink clone of the backing image on XFS,
//! attached straight to a loop device, against the plain loop device; and the time to clone.

use super::*;

pub(crate) async fn loop_raw(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    if !check_root("volume-io-loop-raw") {
        return Ok(vec![]);
    }
    if !have_tool("mkfs.xfs") {
        println!("volume-io-loop-raw: skipped: mkfs.xfs is missing (Debian package xfsprogs)");
        return Ok(vec![]);
    }
    let len = device_len(b.size);
    println!(
        "volume-io-loop-raw: {} raw replicas, reflink clones of a raw backing image, on loop \
         devices, in XFS (reflink=1) on a loop device, vs a plain loop device in the same XFS; \
         load average {}",
        fmt_bytes(len),
        load_average()
    );
    let dir = b.work.join("volume-io-loop-raw");
    std::fs::create_dir_all(&dir)?;
    let guard = SweepOnDrop(dir.clone());
    let xfs_len = 2 * b.size + 8 * len + GIB;
    let xfs = LoopMount::xfs(&dir.join("xfs.img"), &dir.join("xfs"), xfs_len).await?;
    let result = loop_raw_in(b, checks, &xfs.mnt, len).await;
    drop(xfs);
    drop(guard);
    result?;
    Ok(vec![])
}

async fn loop_raw_in(b: &Bench, checks: &mut Checks, mnt: &Path, len: u64) -> Res<()> {
    // The disk's backing image: a qcow2 (as downloaded) expanded once to raw on the disk.
    let src_raw = mnt.join("src.raw");
    backing_raw(b, &src_raw, len).await?;
    let qcow = mnt.join("backing.qcow2");
    let base = mnt.join("backing.raw");
    let (src_s, qcow_s, base_s) = (
        src_raw.to_string_lossy().into_owned(),
        qcow.to_string_lossy().into_owned(),
        base.to_string_lossy().into_owned(),
    );
    capture_checked(
        "qemu-img",
        &["convert", "-q", "-O", "qcow2", &src_s, &qcow_s],
    )
    .await?;
    std::fs::remove_file(&src_raw)?;
    let t = Instant::now();
    capture_checked(
        "qemu-img",
        &["convert", "-q", "-O", "raw", &qcow_s, &base_s],
    )
    .await?;
    let expand = t.elapsed();
    println!(
        "  expanding the {} qcow2 backing image to raw (qemu-img convert, not synced): {:.2} s",
        fmt_bytes(len),
        expand.as_secs_f64()
    );

    // The time to clone a whole image of --size (random data, fully allocated).
    let big = mnt.join("image.raw");
    let (src, dst) = (b.source.path.clone(), big.clone());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::copy(src, &dst)?;
        std::fs::File::open(&dst)?.sync_all()
    })
    .await??;
    let mut clone_secs = Vec::new();
    for i in 0..b.runs.max(3) {
        let c = mnt.join(format!("clone-{i}.raw"));
        sync().await;
        let t = Instant::now();
        capture_checked(
            "cp",
            &[
                "--reflink=always",
                &big.to_string_lossy(),
                &c.to_string_lossy(),
            ],
        )
        .await?;
        clone_secs.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(&c)?;
    }
    std::fs::remove_file(&big)?;
    let clone_med = median(clone_secs.clone());
    println!(
        "  reflink clone of a {} raw image (`cp --reflink=always`, FICLONE): median {:.1} ms \
         of {} [{}]",
        fmt_bytes(b.size),
        clone_med * 1000.0,
        clone_secs.len(),
        clone_secs
            .iter()
            .map(|s| format!("{:.1}", s * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut sides = vec![plain_loop(mnt, len).await?];
    let kinds: [(&str, &str, &str); 3] = [
        ("raw clone, loop dio", "on", "512"),
        ("raw clone, loop dio 4k", "on", "4096"),
        ("raw clone, loop buffered", "off", "512"),
    ];
    let mut result = Ok(());
    for (i, (label, dio, sector)) in kinds.iter().enumerate() {
        let replica = mnt.join(format!("replica-{i}.raw"));
        let replica_s = replica.to_string_lossy().into_owned();
        let made = async {
            capture_checked("cp", &["--reflink=always", &base_s, &replica_s]).await?;
            capture_checked(
                "losetup",
                &[
                    "--find",
                    "--show",
                    &format!("--direct-io={dio}"),
                    "--sector-size",
                    sector,
                    &replica_s,
                ],
            )
            .await
        }
        .await;
        match made {
            Ok(dev) => {
                let dio_now = std::fs::read_to_string(format!(
                    "/sys/block/{}/loop/dio",
                    dev.trim_start_matches("/dev/")
                ))
                .unwrap_or_default();
                let shown = format!("{dev} (dio={})", dio_now.trim());
                let about = format!(
                    "`cp --reflink=always backing.raw replica.raw` then `losetup \
                     --direct-io={dio} --sector-size {sector}` (sysfs dio={})",
                    dio_now.trim()
                );
                sides.push(verified_side(label, dev, shown, about, len).await);
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // Measured only when every candidate started.
    let res = async {
        result?;
        measure(b, &sides, len).await
    }
    .await;
    for s in &sides {
        detach(&s.dev).await;
    }
    let res = res?;
    print_results("volume-io-loop-raw", &sides, &res, len, b.runs, b.quick);
    println!(
        "- reflink clone of a {} image: median {:.1} ms",
        fmt_bytes(b.size),
        clone_med * 1000.0
    );
    for s in &sides[1..] {
        checks.check(
            s.verified.as_ref().is_some_and(Result::is_ok),
            format!(
                "volume-io-loop-raw: {} reads back a verified pattern",
                s.label
            ),
        );
    }
    Ok(())
}
