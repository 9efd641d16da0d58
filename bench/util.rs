//! Small helpers of every path: flushing the work dir's filesystem, formatting sizes, rates and
//! times, reading a process's peak RSS, the load average.

use super::*;

/// The work dir, whose filesystem [`sync`] flushes.
pub(crate) static WORK_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Flushes the work dir's filesystem (syncfs), not every filesystem: on a shared machine a
/// global sync(2) waits for everyone's writeback, and forever when another user's FUSE export
/// has stopped answering under a mounted filesystem (seen here).
pub(crate) async fn sync() {
    let _ = tokio::task::spawn_blocking(|| {
        let dir = WORK_DIR.get().map_or(Path::new("/"), PathBuf::as_path);
        if let Ok(f) = std::fs::File::open(dir) {
            let _ = nix::unistd::syncfs(&f);
        }
    })
    .await;
}

/// Bytes of `file` in the page cache, by `fincore` (None when it is not installed).
pub(crate) async fn fincore(file: &Path) -> Option<u64> {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file)
        .output()
        .await
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Like [`capture`], with the command's stderr in the error.
pub(crate) async fn capture_checked(program: &str, args: &[&str]) -> Res<String> {
    let out = Command::new(program).args(args).output().await?;
    if !out.status.success() {
        return Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(crate) async fn capture(program: &str, args: &[&str]) -> Res<String> {
    let out = Command::new(program).args(args).output().await?;
    if !out.status.success() {
        return Err(format!("{program} failed").into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The value after `key` on its line of a /proc file.
pub(crate) fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// A `NNN kB` field of a /proc file, in bytes.
pub(crate) fn kib_field(text: &str, key: &str) -> Option<u64> {
    field(text, key)?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

/// The 1, 5 and 15 minute load averages: the machine is shared, so say how busy it was.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 1GiB, 512MiB, 256Mi"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "ki" | "kib" => 1024.0,
        "m" | "mi" | "mib" => MIB as f64,
        "g" | "gi" | "gib" => GIB as f64,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        other => return Err(format!("invalid size unit {other:?} in {s:?}")),
    };
    let bytes = (num * mult).round();
    if !(1.0..=(1u64 << 50) as f64).contains(&bytes) {
        return Err(format!("size {s:?} out of range"));
    }
    Ok(bytes as u64)
}

pub(crate) fn fmt_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= GIB as f64 {
        format!("{:.2} GiB", n / GIB as f64)
    } else if n >= MIB as f64 {
        format!("{:.1} MiB", n / MIB as f64)
    } else if n >= 1024.0 {
        format!("{:.0} KiB", n / 1024.0)
    } else {
        format!("{n} B")
    }
}

pub(crate) fn fmt_rate(bytes_per_s: f64) -> String {
    if bytes_per_s >= 1e9 {
        format!("{:.2} GB/s", bytes_per_s / 1e9)
    } else {
        format!("{:.0} MB/s", bytes_per_s / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Ok(GIB));
        assert_eq!(parse_size("64MiB"), Ok(64 * MIB));
        assert_eq!(parse_size("256Mi"), Ok(256 * MIB));
        assert_eq!(parse_size("3GB"), Ok(3_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-99", 1000), Some(Ok((0, 100))));
        assert_eq!(parse_range("bytes=900-", 1000), Some(Ok((900, 1000))));
        assert_eq!(parse_range("bytes=-100", 1000), Some(Ok((900, 1000))));
        assert_eq!(parse_range("bytes=990-2000", 1000), Some(Ok((990, 1000))));
        assert_eq!(parse_range("bytes=1000-", 1000), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), None);
        assert_eq!(parse_range("items=0-1", 1000), None);
    }

    #[test]
    fn stats() {
        let mut s = Stats::default();
        for x in [3.0, 1.0, 2.0, 10.0] {
            s.push(Duration::from_secs_f64(x));
        }
        assert_eq!((s.median(), s.min(), s.max()), (2.5, 1.0, 10.0));
    }

    #[test]
    fn logged_secs() {
        let line = "2025 INFO download{url=x}: bicsi::download: download done size=1 sha512=ab \
                    resumed=0 secs=6.25 mib_per_s=1.0";
        assert_eq!(download_secs(line), Some(6.25));
    }
}
