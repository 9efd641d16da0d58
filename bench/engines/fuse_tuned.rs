//! Path `volume-io-fuse-tuned`: qemu-storage-daemon 10.0 started by hand with each of its knobs
//! (aio and cache modes, an iothread, the loop device's direct I/O and block size), each variant
//! a qcow2 overlay on a raw backing file, against the plain loop device.

use super::*;

/// One way to start qemu-storage-daemon and its loop device.
struct Variant {
    label: &'static str,
    /// The file driver's `aio`: threads (qemu's default), native, io_uring.
    aio: &'static str,
    /// `cache.direct`: the replica opened with O_DIRECT.
    cache_direct: bool,
    /// `cache.no-flush`: flushes ignored (unsafe; measured to show what flushes cost).
    no_flush: bool,
    /// The export's node runs in an iothread instead of the main loop.
    iothread: bool,
    /// `losetup --direct-io=on`.
    loop_direct: bool,
    /// `losetup --sector-size`.
    sector: u32,
}

const VARIANTS: [Variant; 7] = [
    Variant {
        label: "as shipped",
        aio: "threads",
        cache_direct: false,
        no_flush: false,
        iothread: false,
        loop_direct: false,
        sector: 512,
    },
    Variant {
        label: "io_uring+direct",
        aio: "io_uring",
        cache_direct: true,
        no_flush: false,
        iothread: false,
        loop_direct: false,
        sector: 512,
    },
    Variant {
        label: "native+direct",
        aio: "native",
        cache_direct: true,
        no_flush: false,
        iothread: false,
        loop_direct: false,
        sector: 512,
    },
    Variant {
        label: "io_uring+direct+iothread",
        aio: "io_uring",
        cache_direct: true,
        no_flush: false,
        iothread: true,
        loop_direct: false,
        sector: 512,
    },
    Variant {
        label: "io_uring+direct+no-flush",
        aio: "io_uring",
        cache_direct: true,
        no_flush: true,
        iothread: false,
        loop_direct: false,
        sector: 512,
    },
    Variant {
        label: "io_uring+direct, loop dio",
        aio: "io_uring",
        cache_direct: true,
        no_flush: false,
        iothread: false,
        loop_direct: true,
        sector: 512,
    },
    Variant {
        label: "io_uring+direct, loop dio 4k",
        aio: "io_uring",
        cache_direct: true,
        no_flush: false,
        iothread: false,
        loop_direct: true,
        sector: 4096,
    },
];

impl Variant {
    fn about(&self) -> String {
        format!(
            "file driver aio={}, cache.direct={}, cache.no-flush={}{}; loop device \
             --direct-io={} --sector-size={}; FUSE read-ahead 4 MiB",
            self.aio,
            if self.cache_direct { "on" } else { "off" },
            if self.no_flush { "on" } else { "off" },
            if self.iothread {
                ", export in an iothread"
            } else {
                ""
            },
            if self.loop_direct { "on" } else { "off" },
            self.sector
        )
    }
}

/// Starts one qemu-storage-daemon for `v` (a qcow2 overlay on `backing`, exported over FUSE,
/// daemonized) and attaches a loop device; returns the device.
async fn start_variant(dir: &Path, backing: &Path, len: u64, v: &Variant) -> Res<String> {
    std::fs::create_dir_all(dir)?;
    let replica = dir.join("replica.qcow2");
    let export = dir.join("export");
    std::fs::File::create(&export)?;
    capture_checked(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &backing.to_string_lossy(),
            &replica.to_string_lossy(),
            &len.to_string(),
        ],
    )
    .await?;
    let file = serde_json::json!({"driver": "file", "node-name": "file0",
        "filename": replica.to_string_lossy(), "discard": "unmap", "aio": v.aio,
        "cache": {"direct": v.cache_direct, "no-flush": v.no_flush}});
    let fmt = serde_json::json!({"driver": "qcow2", "node-name": "replica0", "file": "file0",
        "discard": "unmap",
        "cache": {"direct": v.cache_direct, "no-flush": v.no_flush}});
    let mut exp = serde_json::json!({"type": "fuse", "id": "export0", "node-name": "replica0",
        "mountpoint": export.to_string_lossy(), "writable": true});
    let mut args: Vec<String> = Vec::new();
    if v.iothread {
        args.extend(["--object".into(), "iothread,id=io0".into()]);
        exp["iothread"] = "io0".into();
    }
    args.extend(["--blockdev".into(), file.to_string()]);
    args.extend(["--blockdev".into(), fmt.to_string()]);
    args.extend(["--export".into(), exp.to_string()]);
    args.extend([
        "--pidfile".into(),
        dir.join("pid").to_string_lossy().into_owned(),
        "--daemonize".into(),
    ]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    capture_checked("qemu-storage-daemon", &argv).await?;
    // What bicsi does (src/os/loopdev.rs): a 4 MiB read-ahead on the FUSE file's bdi, so a
    // buffered loop device's reads reach the export as large requests.
    let (major, minor) = {
        let m = std::fs::metadata(&export)?;
        (
            nix::sys::stat::major(m.dev()),
            nix::sys::stat::minor(m.dev()),
        )
    };
    let _ = std::fs::write(
        format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"),
        "4096",
    );
    let sector = v.sector.to_string();
    let dev = capture_checked(
        "losetup",
        &[
            "--find",
            "--show",
            if v.loop_direct {
                "--direct-io=on"
            } else {
                "--direct-io=off"
            },
            "--sector-size",
            &sector,
            &export.to_string_lossy(),
        ],
    )
    .await?;
    Ok(dev)
}

/// Detaches the loop device, then stops the daemon (SIGTERM) and waits for its export to go.
async fn stop_variant(dir: &Path, dev: &str) {
    detach(dev).await;
    if let Some(pid) = std::fs::read_to_string(dir.join("pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let started = Instant::now();
        while alive(pid) && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub(crate) async fn fuse_tuned(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    if !check_root("volume-io-fuse-tuned") {
        return Ok(vec![]);
    }
    let len = device_len(b.size);
    let uring = std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "absent".into());
    println!(
        "volume-io-fuse-tuned: {} qcow2 overlays on a raw backing file, each served by its own \
         qemu-storage-daemon ({}) over FUSE with a loop device, vs a plain loop device; load \
         average {}; FUSE over io_uring (/sys/module/fuse/parameters/enable_uring): {uring} \
         (qemu 10.0's export does not use it either way)",
        fmt_bytes(len),
        capture("qemu-storage-daemon", &["--version"])
            .await
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or("version unknown"),
        load_average()
    );
    let dir = b.work.join("volume-io-fuse-tuned");
    std::fs::create_dir_all(&dir)?;
    let guard = SweepOnDrop(dir.clone());
    let backing = dir.join("backing.raw");
    backing_raw(b, &backing, len).await?;
    let mut sides = vec![plain_loop(&dir, len).await?];
    let mut started = Vec::new();
    let mut result = Ok(());
    for (i, v) in VARIANTS.iter().enumerate() {
        let vdir = dir.join(format!("v{i}"));
        match start_variant(&vdir, &backing, len, v).await {
            Ok(dev) => {
                started.push((vdir, dev.clone()));
                sides.push(verified_side(v.label, dev.clone(), dev, v.about(), len).await);
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
    for (vdir, dev) in &started {
        stop_variant(vdir, dev).await;
    }
    detach(&sides[0].dev).await;
    drop(guard);
    let res = res?;
    print_results("volume-io-fuse-tuned", &sides, &res, len, b.runs, b.quick);
    // Only what bicsi ships must be correct; the other variants report, they do not fail.
    checks.check(
        sides[1].verified.as_ref().is_some_and(Result::is_ok),
        "volume-io-fuse-tuned: the as-shipped variant reads back a verified pattern",
    );
    Ok(vec![])
}
