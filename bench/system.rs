//! Files, processes and cleanup on this machine for the paths: allocated bytes, shell commands
//! and their output, an XFS loop mount, and the guard that sweeps a path's directory (through the
//! test kit's `sweep`) when it ends, however.

use super::*;

/// Bytes allocated to `path` on disk (st_blocks × 512).
pub(crate) fn allocated(path: &Path) -> Res<u64> {
    Ok(std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .blocks()
        * 512)
}

/// Drops the (clean) page cache of `path`, so the next reader reads the disk.
pub(crate) fn drop_page_cache(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}

/// SHA-512 of a file's logical content, read in 1 MiB blocks.
pub(crate) async fn sha512_file(path: &Path) -> Res<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Res<String> {
        let mut f = std::fs::File::open(&path)?;
        let mut h = Sha512::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        // Advice only: the harness's read must not warm the next side's cache.
        let _ = nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
        Ok(hex::encode(h.finalize()))
    })
    .await?
}

/// Resets the peak resident size (VmHWM) of `pid` to its current RSS (`5 > clear_refs`).
pub(crate) fn reset_hwm(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

pub(crate) fn vm_hwm(pid: u32) -> Option<u64> {
    proc_status(pid).and_then(|s| kib_field(&s, "VmHWM:"))
}

/// Runs `bash -c SCRIPT reference ARGS…` and returns its time.
pub(crate) async fn run_script(script: &str, args: &[&std::ffi::OsStr]) -> Res<Duration> {
    Ok(run_script_output(script, args).await?.0)
}

/// Runs `bash -c SCRIPT reference ARGS…` and returns its time and what it printed.
pub(crate) async fn run_script_output(
    script: &str,
    args: &[&std::ffi::OsStr],
) -> Res<(Duration, String)> {
    let started = Instant::now();
    let out = child_command("bash")
        .arg("-c")
        .arg(format!("set -o pipefail; {script}"))
        .arg("reference")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await?;
    let elapsed = started.elapsed();
    if !out.status.success() {
        return Err(format!(
            "reference `{script}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok((elapsed, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// The value of `key=` after the message `msg` on the last log line that holds `msg`.
pub(crate) fn logged(log: &str, msg: &str, key: &str) -> Option<String> {
    let line = strip_ansi(log.lines().rev().find(|l| l.contains(msg))?);
    let (_, rest) = line.split_once(msg)?;
    let prefix = format!("{key}=");
    rest.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .map(|v| v.trim_matches('"').to_string())
}

pub(crate) async fn fs_type(dir: &Path) -> String {
    let dir = dir.to_string_lossy();
    match capture("findmnt", &["-n", "-o", "FSTYPE", "-T", &dir]).await {
        Ok(fs) => fs,
        Err(_) => capture("stat", &["-f", "-c", "%T", &dir])
            .await
            .unwrap_or_else(|_| "unknown".into()),
    }
}

/// An XFS filesystem with reflink (or ext4) in a sparse file, on a loop device, mounted at `mnt`
/// (the kit's [`kit::LoopFs`]); dropping it sweeps it, reporting what was left on it, unmounts
/// it, detaches the loop device and removes the file.
pub(crate) struct LoopMount {
    fs: kit::LoopFs,
}

impl std::ops::Deref for LoopMount {
    type Target = kit::LoopFs;
    fn deref(&self) -> &kit::LoopFs {
        &self.fs
    }
}

impl LoopMount {
    pub(crate) async fn xfs(img: &Path, mnt: &Path, len: u64) -> Res<LoopMount> {
        LoopMount::make(img, mnt, len, kit::LoopFs::xfs).await
    }

    /// The same with ext4 (no reflink: the copy-on-write replicas' disk).
    pub(crate) async fn ext4(img: &Path, mnt: &Path, len: u64) -> Res<LoopMount> {
        LoopMount::make(img, mnt, len, kit::LoopFs::ext4).await
    }

    async fn make(
        img: &Path,
        mnt: &Path,
        len: u64,
        make: fn(&Path, &Path, u64) -> Result<kit::LoopFs, String>,
    ) -> Res<LoopMount> {
        let (img, mnt) = (img.to_path_buf(), mnt.to_path_buf());
        let fs = tokio::task::spawn_blocking(move || make(&img, &mnt, len)).await??;
        Ok(LoopMount { fs })
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let left = self.fs.release(SWEEP_GRACE);
        report_leftovers(&format!("under {}", self.fs.mnt.display()), &left);
    }
}

/// How long the qemu-storage-daemons a sweep stops get to exit on SIGTERM before SIGKILL.
pub(crate) const SWEEP_GRACE: Duration = Duration::from_secs(5);

/// Sweeps `dir` (see [`kit::sweep`]) and removes it when dropped: every run's guard, so a failure or
/// an early return leaves nothing mounted or running.
pub(crate) struct SweepOnDrop(pub(crate) PathBuf);

/// Runs `work` (a future that works in `dir`) with `dir` created and swept when it ends,
/// however (see [`SweepOnDrop`]).
pub(crate) async fn in_swept_dir<T>(dir: &Path, work: impl Future<Output = Res<T>>) -> Res<T> {
    std::fs::create_dir_all(dir)?;
    let guard = SweepOnDrop(dir.to_path_buf());
    let result = work.await;
    drop(guard);
    result
}

impl Drop for SweepOnDrop {
    fn drop(&mut self) {
        report_leftovers(
            &format!("of {}", self.0.display()),
            &kit::sweep(&self.0, SWEEP_GRACE),
        );
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn report_leftovers(context: &str, done: &[String]) {
    if !done.is_empty() {
        println!("  cleanup {context}: {}", done.join("; "));
    }
}
