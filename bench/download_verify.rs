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
    /// Resident memory by mapping, idle before the POST and at the highest sample during it.
    pub(crate) idle_map: Option<MemMap>,
    pub(crate) peak_map: Option<MemMap>,
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
        if let Some(m) = &self.peak_map {
            let _ = write!(
                s,
                "\n         resident at the sampled peak {}",
                m.describe()
            );
        }
        if let Some(m) = &self.idle_map {
            let _ = write!(s, "\n         resident idle {}", m.describe());
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
        let idle_map = MemMap::read(serve.pid);
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
        let sampler = MemSampler::start(serve.pid);
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
        let peak_map = sampler.stop().await;
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
            idle_map,
            peak_map,
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

/// Where a process's resident memory is, by mapping (`/proc/PID/smaps`): the figures the
/// README's memory paragraph names.
#[derive(Debug, Default, Clone)]
pub(crate) struct MemMap {
    /// All resident memory (the sum of the mappings' Rss: VmRSS).
    pub(crate) rss: u64,
    /// The executable's code (its r-x mapping), file-backed.
    pub(crate) text: u64,
    /// The executable's read-only data (.rodata, .eh_frame: its r-- mappings), file-backed.
    pub(crate) rodata: u64,
    /// The executable's pages written since it was loaded: relocated pointers (.data.rel.ro),
    /// .data and .bss.
    pub(crate) exe_anon: u64,
    /// Shared libraries (libc, libm, the loader) and the vdso.
    pub(crate) libs: u64,
    /// malloc's main arena (`[heap]`).
    pub(crate) heap: u64,
    /// Thread stacks (an anonymous mapping above a guard page) and the main stack.
    pub(crate) stacks: u64,
    pub(crate) threads: usize,
    /// Other anonymous mappings: malloc's large blocks (mmap) and the runtime's own.
    pub(crate) other_anon: u64,
}

impl MemMap {
    pub(crate) fn read(pid: u32) -> Option<MemMap> {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        let exe = exe.to_str()?.to_string();
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
        struct Mapping<'a> {
            start: u64,
            end: u64,
            perms: &'a str,
            path: &'a str,
            rss: u64,
            anon: u64,
        }
        let mut maps: Vec<Mapping> = Vec::new();
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or("");
            if let Some(key) = first.strip_suffix(':') {
                let kib = words
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                if let Some(m) = maps.last_mut() {
                    match key {
                        "Rss" => m.rss = kib * 1024,
                        "Anonymous" => m.anon = kib * 1024,
                        _ => {}
                    }
                }
                continue;
            }
            let Some((start, end)) = first.split_once('-') else {
                continue;
            };
            let perms = words.next().unwrap_or("");
            let path = words.nth(3).unwrap_or("");
            maps.push(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                perms,
                path,
                rss: 0,
                anon: 0,
            });
        }
        let mut m = MemMap::default();
        for (i, map) in maps.iter().enumerate() {
            m.rss += map.rss;
            if map.path == exe {
                if map.perms.contains('x') {
                    m.text += map.rss - map.anon;
                } else {
                    m.rodata += map.rss - map.anon;
                }
                m.exe_anon += map.anon;
            } else if map.path == "[heap]" {
                m.heap += map.rss;
            } else if map.path == "[stack]" {
                m.stacks += map.rss;
                m.threads += 1;
            } else if map.path.is_empty() {
                let guarded = i > 0 && maps[i - 1].perms == "---p" && maps[i - 1].end == map.start;
                if guarded && map.perms.starts_with("rw") {
                    m.stacks += map.rss;
                    m.threads += 1;
                } else {
                    m.other_anon += map.rss;
                }
            } else {
                m.libs += map.rss;
            }
        }
        Some(m)
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "{}: code {}, read-only data {}, written data of the binary {}, libraries {}, \
             malloc heap {}, {} stacks {}, other anonymous {}",
            fmt_bytes(self.rss),
            fmt_bytes(self.text),
            fmt_bytes(self.rodata),
            fmt_bytes(self.exe_anon),
            fmt_bytes(self.libs),
            fmt_bytes(self.heap),
            self.threads,
            fmt_bytes(self.stacks),
            fmt_bytes(self.other_anon)
        )
    }
}

/// Samples a process's [`MemMap`] every [`MEM_SAMPLE`] until stopped and keeps the one with
/// the most resident memory: the breakdown at (about) the process's peak.
pub(crate) struct MemSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Option<MemMap>>,
}

const MEM_SAMPLE: Duration = Duration::from_millis(25);

impl MemSampler {
    pub(crate) fn start(pid: u32) -> MemSampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak: Option<MemMap> = None;
            loop {
                let done = flag.load(std::sync::atomic::Ordering::Relaxed);
                if let Some(m) = MemMap::read(pid)
                    && peak.as_ref().is_none_or(|p| m.rss > p.rss)
                {
                    peak = Some(m);
                }
                if done {
                    return peak;
                }
                tokio::time::sleep(MEM_SAMPLE).await;
            }
        });
        MemSampler { stop, task }
    }

    /// The breakdown at the highest resident memory sampled (one last sample included).
    pub(crate) async fn stop(mut self) -> Option<MemMap> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (&mut self.task).await.ok().flatten()
    }
}

impl Drop for MemSampler {
    /// A run that fails ends its sampler too.
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
