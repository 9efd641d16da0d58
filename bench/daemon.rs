//! The bicsi process: a `bicsi serve`, `controller` or `node` child logging to a file, started
//! on a fresh data dir, waited for, measured (peak RSS) and stopped; killed if dropped.

use super::*;

/// A bicsi child process (`serve`, `controller` or `node`) logging to a file; killed if dropped.
pub(crate) struct Daemon {
    pub(crate) what: String,
    pub(crate) child: tokio::process::Child,
    pub(crate) pid: u32,
    pub(crate) log: PathBuf,
}

impl Daemon {
    pub(crate) fn spawn(bin: &Path, args: &[String], log: PathBuf) -> Res<Daemon> {
        let what = format!("bicsi {}", args.first().map_or("", String::as_str));
        let child = child_command(bin)
            .args(args)
            .env("BICSI_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id().ok_or_else(|| format!("{what} exited at once"))?;
        Ok(Daemon {
            what,
            child,
            pid,
            log,
        })
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An error with the log when the process has exited.
    pub(crate) fn check_alive(&mut self) -> Res<()> {
        match self.child.try_wait()? {
            Some(st) => {
                Err(format!("{} exited ({st}); its log:\n{}", self.what, self.log_text()).into())
            }
            None => Ok(()),
        }
    }

    /// SIGTERM, wait (SIGKILL after 30 s); returns the log.
    pub(crate) async fn stop(mut self) -> String {
        if let Ok(pid) = i32::try_from(self.pid) {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "{} did not stop within 30 s of SIGTERM; killing it",
                self.what
            );
            let _ = self.child.kill().await;
        }
        self.log_text()
    }
}

/// The last `n` lines of a log, indented, for an error report.
pub(crate) fn log_tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("  {l}\n"))
        .collect()
}

/// A `bicsi serve` child on its own data dir, disks and HTTP port, node id `bench`.
pub(crate) struct Serve {
    pub(crate) daemon: Daemon,
    pub(crate) pid: u32,
    pub(crate) api: String,
    /// Its CSI endpoint, `unix://<dir>/csi.sock`.
    pub(crate) csi: String,
    pub(crate) log: PathBuf,
    pub(crate) http: reqwest::Client,
}

impl Serve {
    pub(crate) async fn start(
        bin: &Path,
        dir: &Path,
        disk: &Path,
        http: &reqwest::Client,
    ) -> Res<Serve> {
        Self::start_disks(bin, dir, &[disk.to_path_buf()], http).await
    }

    pub(crate) async fn start_disks(
        bin: &Path,
        dir: &Path,
        disks: &[PathBuf],
        http: &reqwest::Client,
    ) -> Res<Serve> {
        let port = try_free_port()?;
        let api = format!("http://127.0.0.1:{port}");
        let log = dir.join("serve.log");
        let csi = format!("unix://{}", dir.join("csi.sock").display());
        let mut args: Vec<String> = [
            "serve",
            "--data-dir",
            &dir.display().to_string(),
            "--csi-endpoint",
            &csi,
            "--http-listen",
            &format!("127.0.0.1:{port}"),
            "--node-id",
            "bench",
        ]
        .map(String::from)
        .to_vec();
        for d in disks {
            args.extend(["--disk".to_string(), d.display().to_string()]);
        }
        let daemon = Daemon::spawn(bin, &args, log.clone())?;
        let mut serve = Serve {
            pid: daemon.pid,
            daemon,
            api,
            csi,
            log,
            http: http.clone(),
        };
        let started = Instant::now();
        loop {
            let health = serve
                .http
                .get(format!("{}/healthz", serve.api))
                .send()
                .await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return Ok(serve);
            }
            serve.daemon.check_alive()?;
            if started.elapsed() > Duration::from_secs(30) {
                return Err("bicsi serve did not answer /healthz within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) async fn get(&self, path: &str) -> Res<serde_json::Value> {
        api_get(&self.http, &self.api, path).await
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, wait (SIGKILL after 30 s); returns the log.
    pub(crate) async fn stop(self) -> Res<String> {
        Ok(self.daemon.stop().await)
    }

    /// Stops bicsi after a path's work ended with `result`, showing the last lines of its log
    /// when the work failed; returns `result`.
    pub(crate) async fn stop_after<T>(self, result: Res<T>) -> Res<T> {
        let log = self.stop().await.unwrap_or_default();
        if result.is_err() {
            eprintln!("bicsi serve log (last lines):\n{}", log_tail(&log, 20));
        }
        result
    }
}

pub(crate) async fn api_get(
    http: &reqwest::Client,
    base: &str,
    path: &str,
) -> Res<serde_json::Value> {
    let resp = http.get(format!("{base}{path}")).send().await?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("GET {path}: {status}: {}", resp.text().await?).into());
    }
    Ok(resp.json().await?)
}

/// A child process without proxy settings, killed with us if we die.
pub(crate) fn child_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    cmd.kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// CPU seconds of process `pid` (user+system, all threads so far) and of each live thread.
pub(crate) fn cpu_usage(pid: u32) -> Option<(f64, Vec<(String, f64)>)> {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime and stime are fields 14 and 15 of /proc/…/stat, counted after the ")" that ends
    // the command name (which may contain spaces).
    let secs = |stat: &str| -> Option<f64> {
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let (u, s): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
        Some((u + s) / tick)
    };
    let total = secs(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let mut threads = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if let Some(secs) = secs(&stat) {
            threads.push((name.trim().to_string(), secs));
        }
    }
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    Some((total, threads))
}

pub(crate) fn proc_status(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}
