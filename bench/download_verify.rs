//! Path: download + verify. A URL to a ready, verified file on a fresh `bicsi serve` against
//! `curl -o FILE URL && sha512sum FILE` and `curl URL | tee FILE | sha512sum`.

use super::*;

/// URL to a ready, verified file: bicsi (POST of a BackingImage with its checksum until its file
/// is `ready`, on a fresh `bicsi serve`) against `curl -o FILE URL && sha512sum FILE` and
/// `curl URL | tee FILE | sha512sum`, the three alternating their order from run to run.
pub(crate) async fn download_verify(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    const REFS: [(&str, &str); 2] = [
        (
            "curl -o FILE URL && sha512sum FILE",
            r#"curl -sS --fail --noproxy '*' -o "$1" "$2" && sha512sum "$1""#,
        ),
        (
            "curl URL | tee FILE | sha512sum",
            r#"curl -sS --fail --noproxy '*' "$2" | tee "$1" | sha512sum"#,
        ),
    ];
    println!(
        "download + verify: {} runs; bicsi = POST /v1/backingimages (with checksum) until state \
         ready, fresh `bicsi serve` per run; bicsi's file is fdatasynced, the references' are not",
        b.runs
    );
    let mut bicsi = Stats::default();
    let mut refs: [Stats; 2] = Default::default();
    let mut peak: Option<u64> = None;
    for run in 0..b.runs {
        let mut notes = Vec::new();
        // Rotate the order, so no side always goes first (or right after another's writeback).
        for k in 0..3 {
            match (run + k) % 3 {
                0 => {
                    let r = bicsi_download(b, run).await?;
                    bicsi.push(r.elapsed);
                    peak = peak.max(r.vm_hwm);
                    checks.check(
                        r.checksum == b.source.sha512,
                        format!(
                            "run {}: bicsi's checksum {} != sha512sum's {}",
                            run + 1,
                            r.checksum,
                            b.source.sha512
                        ),
                    );
                    notes.push(r.describe(b.source.len));
                }
                i => {
                    let (name, script) = REFS[i - 1];
                    let (elapsed, sha) = reference(b, script).await?;
                    refs[i - 1].push(elapsed);
                    checks.check(
                        sha == b.source.sha512,
                        format!("run {}: `{name}` gave {sha}", run + 1),
                    );
                    notes.push(format!("`{name}` {:.2} s", elapsed.as_secs_f64()));
                }
            }
        }
        println!("  run {}: {}", run + 1, notes.join("\n         "));
    }
    Ok(REFS
        .iter()
        .zip(refs)
        .map(|((name, _), reference)| Row {
            path: "download + verify".into(),
            bicsi: bicsi.clone(),
            reference,
            ref_name: (*name).into(),
            peak_rss: peak,
            note: None,
        })
        .collect())
}

/// What one bicsi download run measured.
pub(crate) struct BicsiRun {
    pub(crate) elapsed: Duration,
    pub(crate) checksum: String,
    pub(crate) vm_hwm: Option<u64>,
    /// RssAnon and RssFile of the idle process, just before the POST.
    pub(crate) idle: (u64, u64),
    /// Peaks sampled at each poll while downloading: anonymous and file-backed resident memory,
    /// and threads.
    pub(crate) anon_peak: u64,
    pub(crate) file_peak: u64,
    pub(crate) threads_peak: u64,
    /// Bytes of the ready file in the page cache, when fincore is there.
    pub(crate) cached: Option<u64>,
    /// The download's own time as bicsi logged it ("download done secs=…").
    pub(crate) logged_secs: Option<f64>,
    /// /proc/PID/smaps_rollup at the end, when the peak was over the bound.
    pub(crate) smaps: Option<String>,
    /// CPU seconds (user+system) of the process since it started, and of each of its threads
    /// still alive when the file was ready (busiest first).
    pub(crate) cpu: Option<(f64, Vec<(String, f64)>)>,
}

impl BicsiRun {
    pub(crate) fn describe(&self, len: u64) -> String {
        let secs = self.elapsed.as_secs_f64();
        let mut s = format!(
            "bicsi {secs:.2} s ({}",
            fmt_rate(len as f64 / secs.max(1e-9))
        );
        if let Some(d) = self.logged_secs {
            let _ = write!(s, "; download {d:.2} s + rest {:.2} s", secs - d);
        }
        let _ = write!(
            s,
            "), VmHWM {} (idle before the POST: RssAnon {}, RssFile {}; \
             sampled peaks: RssAnon {}, RssFile {}, {} threads), \
             page cache of the ready file {}, checksum {}",
            self.vm_hwm.map_or("n/a".into(), fmt_bytes),
            fmt_bytes(self.idle.0),
            fmt_bytes(self.idle.1),
            fmt_bytes(self.anon_peak),
            fmt_bytes(self.file_peak),
            self.threads_peak,
            self.cached.map_or("n/a".into(), fmt_bytes),
            if self.checksum.len() >= 16 {
                format!("{}…", &self.checksum[..16])
            } else {
                format!("{:?}", self.checksum)
            }
        );
        if let Some((total, threads)) = &self.cpu {
            let busy: Vec<String> = threads
                .iter()
                .filter(|(_, t)| *t >= 0.05)
                .map(|(name, t)| format!("{t:.2} {name}"))
                .collect();
            let _ = write!(
                s,
                "\n         cpu {total:.2} s in all; busiest threads (s): {}",
                busy.join(", ")
            );
        }
        if let Some(smaps) = &self.smaps {
            let kb = |k: &str| kib_field(smaps, k).map_or("?".into(), fmt_bytes);
            let _ = write!(
                s,
                "\n         over {} (smaps_rollup when ready: Rss {}, Anonymous {}, Pss_File {}, \
                 Private_Dirty {})",
                fmt_bytes(RSS_BOUND),
                kb("Rss:"),
                kb("Anonymous:"),
                kb("Pss_File:"),
                kb("Private_Dirty:")
            );
        }
        s
    }
}

pub(crate) async fn bicsi_download(b: &Bench, run: usize) -> Res<BicsiRun> {
    bicsi_download_of(b, run, &b.url, &b.source.sha512, b.source.len).await
}

/// [`bicsi_download`] of `url`, whose stored file must have the SHA-512 `sha512` (`len` bytes:
/// it sizes the deadline).
pub(crate) async fn bicsi_download_of(
    b: &Bench,
    run: usize,
    url: &str,
    sha512: &str,
    len: u64,
) -> Res<BicsiRun> {
    let dir = b.work.join(format!("bicsi-{run}"));
    let disk = dir.join("disk");
    std::fs::create_dir_all(&disk)?;
    let serve = Serve::start(&b.bicsi, &dir, &disk, &b.http).await?;
    let name = format!("bench-{run}");
    let result = async {
        let st = proc_status(serve.pid).unwrap_or_default();
        let idle = (
            kib_field(&st, "RssAnon:").unwrap_or(0),
            kib_field(&st, "RssFile:").unwrap_or(0),
        );
        sync().await;
        let body = download_image(&name, url, sha512);
        let started = Instant::now();
        let resp = b
            .http
            .post(format!("{}/v1/backingimages", serve.api))
            .json(&body)
            .send()
            .await?;
        if !resp.status().is_success() {
            let status = resp.status();
            return Err(format!("POST backing image: {status}: {}", resp.text().await?).into());
        }
        let deadline = Duration::from_secs(120 + len / (5 * MIB));
        let (mut anon_peak, mut file_peak, mut threads_peak) = (0, 0, 0);
        let obj = loop {
            if let Some(st) = proc_status(serve.pid) {
                anon_peak = anon_peak.max(kib_field(&st, "RssAnon:").unwrap_or(0));
                file_peak = file_peak.max(kib_field(&st, "RssFile:").unwrap_or(0));
                let threads = field(&st, "Threads:").and_then(|v| v.parse().ok());
                threads_peak = threads_peak.max(threads.unwrap_or(0));
            }
            let obj = serve.get(&format!("/v1/backingimages/{name}")).await?;
            let file = obj["status"]["diskFileStatusMap"]
                .as_object()
                .and_then(|m| m.values().next().cloned());
            match file.as_ref().and_then(|f| f["state"].as_str()) {
                Some("ready") => break obj,
                Some("failed") => {
                    return Err(format!(
                        "bicsi: backing image failed: {}",
                        file.as_ref()
                            .map_or("", |f| f["message"].as_str().unwrap_or(""))
                    )
                    .into());
                }
                _ if started.elapsed() > deadline => {
                    return Err(format!("bicsi: not ready after {deadline:?}: {obj}").into());
                }
                _ => tokio::time::sleep(POLL).await,
            }
        };
        let elapsed = started.elapsed();
        let status = proc_status(serve.pid);
        let vm_hwm = status.as_deref().and_then(|s| kib_field(s, "VmHWM:"));
        let smaps = vm_hwm.filter(|&h| h > RSS_BOUND).and_then(|_| {
            std::fs::read_to_string(format!("/proc/{}/smaps_rollup", serve.pid)).ok()
        });
        let cpu = cpu_usage(serve.pid);
        let cached = match ready_file(&disk, &name) {
            Some(f) => fincore(&f).await,
            None => None,
        };
        Ok(BicsiRun {
            elapsed,
            checksum: obj["status"]["checksum"].as_str().unwrap_or("").to_string(),
            vm_hwm,
            idle,
            anon_peak,
            file_peak,
            threads_peak,
            cached,
            logged_secs: None,
            smaps,
            cpu,
        })
    }
    .await;
    let log = serve.stop().await;
    let result = result.map(|mut r| {
        r.logged_secs = log.as_deref().ok().and_then(download_secs);
        r
    });
    if let (Err(_), Ok(log)) = (&result, &log) {
        eprintln!("bicsi serve log (last lines):");
        for l in log
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            eprintln!("  {l}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `<disk>/backing-images/<name>-<uuid>/backing`
pub(crate) fn ready_file(disk: &Path, name: &str) -> Option<PathBuf> {
    let prefix = format!("{name}-");
    std::fs::read_dir(disk.join("backing-images"))
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path().join("backing"))
        .filter(|p| p.is_file())
}

/// The `secs=` of bicsi's "download done" log line.
pub(crate) fn download_secs(log: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains("download done"))?;
    let line = strip_ansi(line);
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("secs="))
        .and_then(|v| v.parse().ok())
}

/// Runs a reference script (`$1` = FILE, `$2` = URL) and returns its time and the SHA-512 that
/// sha512sum printed. FILE sits in the work dir, next to bicsi's disks, and is removed after.
pub(crate) async fn reference(b: &Bench, script: &str) -> Res<(Duration, String)> {
    let file = b.work.join("reference.out");
    sync().await;
    let out = run_script_output(script, &[file.as_os_str(), b.url.as_ref()]).await;
    let _ = std::fs::remove_file(&file);
    let (elapsed, stdout) = out?;
    let sha = stdout.split_whitespace().next().unwrap_or("").to_string();
    Ok((elapsed, sha))
}
