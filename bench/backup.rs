//! Path `backup` (issue 17): backup and restore of a volume of `--size` (1 GiB) with a quarter of
//! it written (256 MiB of /dev/urandom data) over a backing image of the same size (the bench's
//! random image), to a `file://` target and to a local S3 server (`s3s-fs` from crates.io, when
//! it is on the PATH or at `$BICSI_S3S_FS`), against `tar -cS | zstd -3` and `restic backup` of
//! the volume's replica file (its own clusters over the image: the same data) and their
//! restores; then an incremental backup after 1% more writes, which must move at most 1.1× the
//! bytes written (checked), against restic's own incremental backup.
//!
//! One `bicsi serve` (root: the volume is attached as a block device to write it); each run
//! backs up into a fresh target (the image is put first, timed apart, so the volume's backup is
//! timed alone) and restores into a new volume, whose replica must read as the source's
//! (`qemu-img compare`). bicsi's side is timed through the HTTP API from the request to the
//! record's `completed`, polled every 20 ms (the CLI polls every 500 ms). `--quick` runs it small
//! once and checks only correctness.

use super::*;

/// How often the backup and restore records are polled while timing.
const RECORD_POLL: Duration = Duration::from_millis(20);
/// The backup block size (bicsi's default): the incremental writes whole blocks of it.
const BLOCK: u64 = 2 * MIB;

pub(crate) async fn backup(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    if !is_root() {
        println!(
            "backup: skipped (not root: the volume is attached as a block device to write it)"
        );
        return Ok(vec![]);
    }
    let dir = b.work.join("backup");
    in_swept_dir(&dir, backup_in(b, checks, &dir)).await
}

/// The local S3 server: `$BICSI_S3S_FS`, else `s3s-fs` on the PATH.
fn s3s_fs() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BICSI_S3S_FS") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.is_file())
    })
}

/// Runs the `bicsi` CLI against the serve; its stdout.
async fn cli(b: &Bench, serve: &Serve, args: &[&str]) -> Res<String> {
    let out = child_command(&b.bicsi)
        .args(args)
        .env("BICSI_SERVER", &serve.api)
        .env("BICSI_CSI_ENDPOINT", &serve.csi)
        .env_remove("BICSI_TOKEN")
        .stdin(Stdio::null())
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!(
            "bicsi {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn send_json(
    serve: &Serve,
    method: reqwest::Method,
    path: &str,
    body: serde_json::Value,
) -> Res<serde_json::Value> {
    let resp = serve
        .http
        .request(method, format!("{}{path}", serve.api))
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        return Err(format!("{path}: {status}: {text}").into());
    }
    Ok(serde_json::from_str(&text).unwrap_or_default())
}

async fn set_target(serve: &Serve, url: &str) -> Res<()> {
    send_json(
        serve,
        reqwest::Method::PUT,
        "/v1/settings/backup-target",
        serde_json::json!({ "value": url }),
    )
    .await
    .map(drop)
}

/// Polls `path` until its `state` is `completed` (an error on `error`); the last record.
async fn until_completed(serve: &Serve, path: &str) -> Res<serde_json::Value> {
    let started = Instant::now();
    loop {
        let r = serve.get(path).await?;
        match r["state"].as_str() {
            Some("completed") => return Ok(r),
            Some("error") => return Err(format!("{path}: {}", r["message"]).into()),
            _ => {}
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err(format!("{path} did not complete within 30 minutes: {r}").into());
        }
        tokio::time::sleep(RECORD_POLL).await;
    }
}

/// Backs up volume `v` as `name`; its time, the record, and bicsi's peak RSS meanwhile.
async fn timed_backup(
    serve: &Serve,
    name: &str,
) -> Res<(Duration, serde_json::Value, Option<u64>)> {
    sync().await;
    let hwm = reset_hwm(serve.pid);
    let started = Instant::now();
    send_json(
        serve,
        reqwest::Method::POST,
        "/v1/backups",
        serde_json::json!({ "volume": "v", "name": name }),
    )
    .await?;
    let rec = until_completed(serve, &format!("/v1/backups/{name}")).await?;
    let took = started.elapsed();
    Ok((took, rec, if hwm { vm_hwm(serve.pid) } else { None }))
}

/// Restores backup `name` into volume `into`; its time.
async fn timed_restore(serve: &Serve, name: &str, into: &str) -> Res<Duration> {
    sync().await;
    let started = Instant::now();
    send_json(
        serve,
        reqwest::Method::POST,
        &format!("/v1/backups/{name}/restore"),
        serde_json::json!({ "volume": into }),
    )
    .await?;
    until_completed(serve, &format!("/v1/restores/{into}")).await?;
    Ok(started.elapsed())
}

/// The replica file of volume `name` (its first replica).
async fn replica_file(serve: &Serve, name: &str) -> Res<PathBuf> {
    let list = serve.get("/v1/volumes").await?;
    list.as_array()
        .into_iter()
        .flatten()
        .find(|v| v["spec"]["name"] == name)
        .and_then(|v| v["replicas"][0]["path"].as_str())
        .map(PathBuf::from)
        .ok_or_else(|| format!("volume {name} has no replica in GET /v1/volumes").into())
}

/// Writes `len` bytes of /dev/urandom data at `offset` of volume `v` through a block attach.
async fn write_volume(b: &Bench, serve: &Serve, dir: &Path, offset: u64, len: u64) -> Res<()> {
    let dev = dir.join("dev-v");
    cli(
        b,
        serve,
        &[
            "volume",
            "attach",
            "v",
            "--block",
            &dev.display().to_string(),
        ],
    )
    .await?;
    let target = dev.clone();
    let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut rnd = std::fs::File::open("/dev/urandom")?;
        let f = std::fs::OpenOptions::new().write(true).open(&target)?;
        let mut buf = vec![0u8; CHUNK];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            rnd.read_exact(&mut buf[..n])?;
            f.write_all_at(&buf[..n], offset + done)?;
            done += n as u64;
        }
        f.sync_all()
    })
    .await?;
    cli(b, serve, &["volume", "detach", "v"]).await?;
    Ok(written?)
}

/// `restic` with its repository password, or None when it is not installed.
fn restic() -> Option<Command> {
    have_tool("restic").then(|| {
        let mut c = child_command("restic");
        c.env("RESTIC_PASSWORD", "bicsi-bench").stdin(Stdio::null());
        c
    })
}

async fn run_restic(args: &[&std::ffi::OsStr]) -> Res<Duration> {
    let mut c = restic().ok_or("restic is not installed")?;
    sync().await;
    let started = Instant::now();
    let out = c.args(args).output().await?;
    let took = started.elapsed();
    if !out.status.success() {
        return Err(format!(
            "restic {:?} failed: {}",
            args,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(took)
}

/// The measurements of one target kind over the runs.
#[derive(Default)]
struct Side {
    backup: Stats,
    restore: Stats,
    uploaded: Vec<u64>,
    image: Stats,
    peak: Option<u64>,
}

async fn backup_in(b: &Bench, checks: &mut Checks, dir: &Path) -> Res<Vec<Row>> {
    let size = b.size;
    let written = size / 4;
    let s3s = s3s_fs();
    let restic_here = restic().is_some();
    println!(
        "backup: {} runs; one `bicsi serve`; a {} volume over the {} random image with {} of \
         random data written; bicsi = backup into a fresh target per run (file://{}) and restore \
         into a new volume; references = `tar -cS | zstd -3 -T1` of the replica file and its \
         `zstd -d | tar -x`{}",
        b.runs,
        fmt_bytes(size),
        fmt_bytes(b.source.len),
        fmt_bytes(written),
        if s3s.is_some() {
            " and s3s-fs on 127.0.0.1"
        } else {
            ""
        },
        if restic_here {
            ", `restic backup` / `restic restore` (fresh repository per run)"
        } else {
            "; restic is not installed (apt-get install restic), so not measured"
        }
    );
    if s3s.is_none() {
        println!(
            "  s3s-fs is not installed (cargo install --locked s3s-fs@0.14.1 --features binary, \
             or scripts/test): the S3 rows are left out"
        );
    }
    let disk = dir.join("disk");
    std::fs::create_dir_all(&disk)?;
    std::fs::create_dir_all(dir.join("serve"))?;
    let serve = Serve::start(&b.bicsi, &dir.join("serve"), &disk, &b.http).await?;
    let result = measure(b, checks, dir, &serve, s3s.as_deref(), written).await;
    serve.stop_after(result).await
}

async fn measure(
    b: &Bench,
    checks: &mut Checks,
    dir: &Path,
    serve: &Serve,
    s3s: Option<&Path>,
    written: u64,
) -> Res<Vec<Row>> {
    let size = b.size;
    cli(
        b,
        serve,
        &[
            "image",
            "upload",
            "img",
            &b.source.path.display().to_string(),
        ],
    )
    .await?;
    cli(
        b,
        serve,
        &[
            "volume",
            "create",
            "v",
            "--size",
            &size.to_string(),
            "-p",
            "numberOfReplicas=1",
            "-p",
            "backingImage=img",
        ],
    )
    .await?;
    // The written quarter starts at a quarter of the volume, block-aligned.
    write_volume(b, serve, dir, size / 4, written).await?;
    let replica = replica_file(serve, "v").await?;

    // An S3 server for the runs, when installed.
    let mut s3: Option<(Daemon, u16)> = None;
    if let Some(bin) = s3s {
        let root = dir.join("s3");
        std::fs::create_dir_all(root.join("bkp"))?;
        let port = try_free_port()?;
        let d = Daemon::spawn(
            bin,
            &[
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
                "--access-key".into(),
                "bench".into(),
                "--secret-key".into(),
                "bench-secret".into(),
                root.display().to_string(),
            ],
            dir.join("s3s.log"),
        )?;
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if started.elapsed() > Duration::from_secs(20) {
                return Err("s3s-fs did not listen within 20 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let creds = dir.join("s3.creds");
        std::fs::write(
            &creds,
            "AWS_ACCESS_KEY_ID=bench\nAWS_SECRET_ACCESS_KEY=bench-secret\n",
        )?;
        send_json(
            serve,
            reqwest::Method::PUT,
            "/v1/settings/backup-target-credential-file",
            serde_json::json!({ "value": creds.display().to_string() }),
        )
        .await?;
        s3 = Some((d, port));
    }

    let (mut file, mut s3side) = (Side::default(), Side::default());
    let (mut tar, mut untar, mut restic_b, mut restic_r) = (
        Stats::default(),
        Stats::default(),
        Stats::default(),
        Stats::default(),
    );
    let mut tar_bytes = 0;
    let mut last_file_target = String::new();
    let mut restic_repo = None;
    let restic_here = restic().is_some();
    for run in 0..b.runs {
        // bicsi, file://
        let target = dir.join(format!("target-{run}"));
        std::fs::create_dir_all(&target)?;
        last_file_target = format!("file://{}", target.display());
        for (side, url) in
            [(&mut file, last_file_target.clone())]
                .into_iter()
                .chain(s3.as_ref().map(|(_, port)| {
                    (
                        &mut s3side,
                        format!(
                            "s3://bkp/run-{run}?endpoint=http://127.0.0.1:{port}&path-style=true"
                        ),
                    )
                }))
        {
            set_target(serve, &url).await?;
            let kind = if url.starts_with("s3") { "s3" } else { "file" };
            let started = Instant::now();
            send_json(
                serve,
                reqwest::Method::POST,
                "/v1/backingimages/img/backup",
                serde_json::json!({}),
            )
            .await?;
            side.image.push(started.elapsed());
            let name = format!("v-{kind}-{run}");
            let (took, rec, peak) = timed_backup(serve, &name).await?;
            side.backup.push(took);
            side.peak = side.peak.max(peak);
            let up = rec["bytesUploaded"].as_u64().unwrap_or(0);
            side.uploaded.push(up);
            checks.check(
                up >= written && up <= written + written / 50,
                format!("backup {name} put {up} bytes for {written} bytes of random data written"),
            );
            let into = format!("r-{kind}-{run}");
            side.restore.push(timed_restore(serve, &name, &into).await?);
            let restored = replica_file(serve, &into).await?;
            let same = child_command("qemu-img")
                .args(["compare", "-U", "-q"])
                .arg(&replica)
                .arg(&restored)
                .status()
                .await?
                .success();
            checks.check(
                same,
                format!("volume {into} restored from {url} reads as the backed-up volume"),
            );
            cli(b, serve, &["volume", "delete", &into]).await?;
        }

        // tar | zstd of the replica file, and back.
        let out = dir.join("replica.tar.zst");
        let parent = replica.parent().ok_or("replica without a directory")?;
        sync().await;
        tar.push(
            run_script(
                "tar -cS -C \"$1\" \"$2\" | zstd -q -3 -T1 > \"$3\"",
                &[
                    parent.as_os_str(),
                    replica.file_name().ok_or("replica without a name")?,
                    out.as_os_str(),
                ],
            )
            .await?,
        );
        tar_bytes = std::fs::metadata(&out)?.len();
        let x = dir.join("untar");
        std::fs::create_dir_all(&x)?;
        sync().await;
        untar.push(
            run_script(
                "zstd -q -d -c \"$1\" | tar -xS -C \"$2\"",
                &[out.as_os_str(), x.as_os_str()],
            )
            .await?,
        );
        std::fs::remove_dir_all(&x)?;
        std::fs::remove_file(&out)?;

        // restic: a fresh repository, backup, restore.
        if restic().is_some() {
            let repo = dir.join(format!("restic-{run}"));
            let mut init = restic().ok_or("restic")?;
            let ok = init
                .args(["init", "--repo"])
                .arg(&repo)
                .output()
                .await?
                .status
                .success();
            if !ok {
                return Err(format!("restic init --repo {} failed", repo.display()).into());
            }
            restic_b.push(
                run_restic(&[
                    "--repo".as_ref(),
                    repo.as_os_str(),
                    "backup".as_ref(),
                    "--quiet".as_ref(),
                    replica.as_os_str(),
                ])
                .await?,
            );
            let x = dir.join("restic-restore");
            restic_r.push(
                run_restic(&[
                    "--repo".as_ref(),
                    repo.as_os_str(),
                    "restore".as_ref(),
                    "latest".as_ref(),
                    "--target".as_ref(),
                    x.as_os_str(),
                ])
                .await?,
            );
            std::fs::remove_dir_all(&x)?;
            if run + 1 < b.runs {
                std::fs::remove_dir_all(&repo)?;
            } else {
                restic_repo = Some(repo);
            }
        }
    }

    // The incremental: 1% of the volume more (whole blocks), into the last file target.
    let inc = ((size / 100) / BLOCK * BLOCK).max(BLOCK);
    write_volume(b, serve, dir, 3 * size / 4, inc).await?;
    set_target(serve, &last_file_target).await?;
    let (inc_took, rec, _) = timed_backup(serve, "v-inc").await?;
    let moved = rec["bytesUploaded"].as_u64().unwrap_or(u64::MAX);
    let ratio = moved as f64 / inc as f64;
    checks.check(
        ratio <= 1.1,
        format!(
            "the incremental backup after {inc} bytes more moved {moved} bytes ({ratio:.4}×, at most 1.1×)"
        ),
    );
    let mut inc_stats = Stats::default();
    inc_stats.push(inc_took);
    let mut inc_ref = Stats::default();
    let inc_ref_name = match &restic_repo {
        Some(repo) => {
            inc_ref.push(
                run_restic(&[
                    "--repo".as_ref(),
                    repo.as_os_str(),
                    "backup".as_ref(),
                    "--quiet".as_ref(),
                    replica.as_os_str(),
                ])
                .await?,
            );
            "restic backup, incremental"
        }
        None => {
            inc_ref = tar.clone();
            "tar -cS | zstd -3 (all again)"
        }
    };
    if let Some((d, _)) = s3 {
        d.stop().await;
    }

    let mib = |n: u64| n as f64 / MIB as f64;
    let avg = |v: &[u64]| v.iter().sum::<u64>() / v.len().max(1) as u64;
    let mut rows = vec![Row {
        path: format!("backup → file:// ({} written)", fmt_bytes(written)),
        bicsi: file.backup.clone(),
        reference: tar.clone(),
        ref_name: "tar -cS | zstd -3 -T1".into(),
        // The peak RSS is the whole `bicsi serve`'s (engines, HTTP, store), not a node agent
        // moving an image, so it goes in the note rather than against the agent's bound.
        peak_rss: None,
        note: Some(format!(
            "bicsi put {:.1} MiB per backup; tar | zstd wrote {:.1} MiB; the image went in \
             first, once per target, in {} (not counted); `bicsi serve` peak RSS during the \
             backups {}",
            mib(avg(&file.uploaded)),
            mib(tar_bytes),
            file.image.show(),
            file.peak.map_or("n/a".into(), fmt_bytes)
        )),
    }];
    if restic_here {
        rows.push(Row {
            path: "backup → file://".into(),
            bicsi: file.backup.clone(),
            reference: restic_b,
            ref_name: "restic backup".into(),
            peak_rss: None,
            note: None,
        });
    }
    rows.push(Row {
        path: "restore ← file://".into(),
        bicsi: file.restore.clone(),
        reference: untar.clone(),
        ref_name: "zstd -d | tar -xS".into(),
        peak_rss: None,
        note: None,
    });
    if restic_here {
        rows.push(Row {
            path: "restore ← file://".into(),
            bicsi: file.restore,
            reference: restic_r,
            ref_name: "restic restore".into(),
            peak_rss: None,
            note: None,
        });
    }
    if s3s.is_some() {
        rows.push(Row {
            path: "backup → s3 (s3s-fs)".into(),
            bicsi: s3side.backup,
            reference: tar,
            ref_name: "tar -cS | zstd -3 -T1".into(),
            peak_rss: None,
            note: Some(format!(
                "the image went in first, once per target, in {} (not counted); `bicsi serve` \
                 peak RSS during the backups {}",
                s3side.image.show(),
                s3side.peak.map_or("n/a".into(), fmt_bytes)
            )),
        });
        rows.push(Row {
            path: "restore ← s3 (s3s-fs)".into(),
            bicsi: s3side.restore,
            reference: untar,
            ref_name: "zstd -d | tar -xS".into(),
            peak_rss: None,
            note: None,
        });
    }
    rows.push(Row {
        path: format!("incremental backup, {} more", fmt_bytes(inc)),
        bicsi: inc_stats,
        reference: inc_ref,
        ref_name: inc_ref_name.into(),
        peak_rss: None,
        note: Some(format!(
            "moved {moved} bytes for {inc} bytes written: {ratio:.4}× (at most 1.1×: {})",
            if ratio <= 1.1 { "met" } else { "OVER" }
        )),
    });
    Ok(rows)
}
