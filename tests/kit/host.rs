//! The machine side of the test kit: whether a test may run here (root, tools), free TCP ports
//! on 127.0.0.1, what a test's processes may leave behind under its directory (mounts, loop
//! devices, qemu-storage-daemon engines), found and swept, filesystems on loop devices
//! (`LoopFs`), commands that must succeed (`run`) and pseudo-random test data (`noise`). The integration tests, the
//! benchmark and the crate's own real-system tests include this file (`#[path]`), so it uses
//! nothing but std and nix and must not name the `bicsi` crate nor start bicsi (that is
//! `procs.rs`, for the integration tests only).

#![allow(dead_code)] // each includer uses its own part

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether a test whose need is `ok` may run. Off CI it skips and says `why`; in CI (`CI` set)
/// a skip would hide a regression, so it fails instead.
pub fn may_run(ok: bool, why: &str) -> bool {
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("{why}: this test must run in CI");
        }
        eprintln!("SKIP: {why}");
    }
    ok
}

/// For tests that need root (loop devices, FUSE, mounts): see [`may_run`].
pub fn root_or_skip(test: &str) -> bool {
    may_run(
        is_root(),
        &format!("{test}: needs root (loop devices, FUSE, mounts); run the tests as root"),
    )
}

/// Whether `tool` is on PATH (not all tools answer `--version`: mkfs.xfs does not).
pub fn have_tool(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
}

/// A free TCP port on 127.0.0.1: bound, read and released (the window for another taker is
/// tiny).
pub fn try_free_port() -> std::io::Result<u16> {
    // Below the kernel's ephemeral range (32768-60999 by default): a port bound to 0 comes from
    // that range, where the outgoing connections of every test on the machine take their local
    // ports too, so one of them could take it before the process the test gives it to binds
    // it (seen: a node agent's replica server failing "Address already in use"). Random, so
    // that tests in other processes rarely pick the same one; never the same twice here.
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    const LOW: u16 = 20000;
    const HIGH: u16 = 32767;
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..200 {
        let port = LOW + (uuid::Uuid::new_v4().as_u128() % u128::from(HIGH - LOW)) as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// [`try_free_port`] for a test, which fails if there is none.
pub fn free_port() -> u16 {
    try_free_port().expect("a free TCP port on 127.0.0.1")
}

/// Mount points strictly below `dir`, deepest first (/proc/self/mountinfo, escapes decoded).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount(p)))
        .filter(|p| p != dir && p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// Decodes the `\ooo` octal escapes of /proc/self/mountinfo.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Loop devices whose backing file is below `dir` (also once the file is deleted).
pub fn loops_under(dir: &Path) -> Vec<String> {
    let Ok(out) = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output()
    else {
        return vec![];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (name, back) = l.trim().split_once(char::is_whitespace)?;
            let back = back.trim();
            let back = back.strip_suffix(" (deleted)").unwrap_or(back);
            Path::new(back).starts_with(dir).then(|| name.to_string())
        })
        .collect()
}

/// Live qemu-storage-daemon processes whose command line names a path below `dir`.
pub fn engines_under(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|&c| c == 0).map(String::from_utf8_lossy);
        let is_qsd = args
            .next()
            .is_some_and(|a0| a0.rsplit('/').next() == Some("qemu-storage-daemon"));
        if is_qsd && args.any(|a| a.contains(&needle)) {
            pids.push(pid);
        }
    }
    pids
}

/// The pids of bicsi's mirror engines (`bicsi engine-mirror`) whose command line names `dir`.
pub fn mirror_engines_under(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<_> = cmdline
            .split(|&c| c == 0)
            .map(String::from_utf8_lossy)
            .collect();
        if args.get(1).is_some_and(|a| a == "engine-mirror")
            && args.iter().any(|a| a.contains(&needle))
            && alive(pid)
        {
            pids.push(pid);
        }
    }
    pids
}

/// Whether `pid` runs (exists and is not a zombie: a daemonized process's parent may be an init
/// that does not reap).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Removes what a run's processes may leave under `dir`, whatever state they died in (bind
/// mounts, FUSE exports, loop devices, qemu-storage-daemon processes, which are daemonized and
/// outlive bicsi): unmounts everything mounted below `dir` (deepest first; lazily where a plain
/// unmount fails, so a dead FUSE server cannot block it), detaches loop devices backed by files
/// below it, stops the qemu-storage-daemons whose command line names it (SIGTERM and up to
/// `grace` to exit, then SIGKILL; at once with SIGKILL for a zero `grace`), and unmounts again
/// (a FUSE export left by its daemon). Returns what it did.
pub fn sweep(dir: &Path, grace: Duration) -> Vec<String> {
    let mut done = Vec::new();
    let umount = |m: &Path, done: &mut Vec<String>| {
        if unmount(m, 1) {
            done.push(format!("unmounted {}", m.display()));
        } else {
            done.push(format!("unmounted {} lazily", m.display()));
        }
    };
    for m in mounts_under(dir) {
        umount(&m, &mut done);
    }
    for l in loops_under(dir) {
        let _ = Command::new("losetup").args(["-d", &l]).status();
        done.push(format!("detached {l}"));
    }
    // qemu-storage-daemons, and bicsi's mirror engines (whose FUSE file may have been
    // unmounted lazily above, which leaves them running).
    let mut pids = engines_under(dir);
    pids.extend(mirror_engines_under(dir));
    let first = if grace.is_zero() {
        Signal::SIGKILL
    } else {
        Signal::SIGTERM
    };
    for &pid in &pids {
        let _ = kill(Pid::from_raw(pid), first);
        done.push(format!("stopped engine {pid}"));
    }
    let started = Instant::now();
    while pids.iter().any(|&p| alive(p)) && started.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in &pids {
        if alive(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    for m in mounts_under(dir) {
        umount(&m, &mut done);
    }
    done
}

/// Unmounts `m`, trying `tries` times 300 ms apart; when it stays busy (or its FUSE server is
/// dead), lazily. Answers whether the plain unmount did it.
pub fn unmount(m: &Path, tries: u32) -> bool {
    for i in 0..tries {
        let ok = Command::new("umount")
            .arg(m)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return true;
        }
        if i + 1 < tries {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let _ = Command::new("umount").arg("-l").arg(m).status();
    false
}

/// [`sweep`] for a test's drop: daemons are killed at once, nothing is reported.
pub fn cleanup_under(dir: &Path) {
    sweep(dir, Duration::ZERO);
}

/// Runs `cmd`, which must succeed; its stdout, trimmed.
#[track_caller]
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A filesystem in a sparse file `image` on a loop device of its own, mounted at `mnt`: the
/// disks of the tests and paths that need XFS with reflink, ext4, or a small disk to fill. When
/// released (or dropped) it sweeps what is left on it (see [`sweep`]), unmounts it (lazily when
/// it stays busy), detaches its loop device and removes the file.
pub struct LoopFs {
    pub image: PathBuf,
    pub dev: String,
    pub mnt: PathBuf,
    released: bool,
}

impl LoopFs {
    /// XFS that shares blocks (`-m reflink=1`, as the loop and mirror engines want; mkfs.xfs
    /// needs 300 MiB at least).
    pub fn xfs(image: &Path, mnt: &Path, bytes: u64) -> Result<LoopFs, String> {
        LoopFs::make(
            image,
            mnt,
            bytes,
            &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
        )
    }

    /// ext4 (no reflink: the copy-on-write replicas' disk).
    pub fn ext4(image: &Path, mnt: &Path, bytes: u64) -> Result<LoopFs, String> {
        LoopFs::make(image, mnt, bytes, &["mkfs.ext4", "-q", "-F"])
    }

    /// Made by `mkfs` (the program and its flags; the device is added).
    pub fn make(image: &Path, mnt: &Path, bytes: u64, mkfs: &[&str]) -> Result<LoopFs, String> {
        let step = |cmd: &mut Command| -> Result<String, String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "{cmd:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        std::fs::File::create(image)
            .and_then(|f| f.set_len(bytes))
            .map_err(|e| format!("{}: {e}", image.display()))?;
        let dev = step(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(image),
        )?;
        let fs = LoopFs {
            image: image.to_path_buf(),
            dev,
            mnt: mnt.to_path_buf(),
            released: false,
        };
        // On the device, not the file: for a file, mkfs asks every loop device of the machine
        // whether it is backed by it, and one that hangs (a stuck FUSE export of some other
        // test) would hang this too.
        step(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&fs.dev))?;
        std::fs::create_dir_all(mnt).map_err(|e| format!("{}: {e}", mnt.display()))?;
        step(Command::new("mount").arg(&fs.dev).arg(mnt))?;
        Ok(fs)
    }

    /// Sweeps, unmounts and detaches it now, giving the daemons on it `grace` to stop; returns
    /// what the sweep found left on it.
    pub fn release(&mut self, grace: Duration) -> Vec<String> {
        if std::mem::replace(&mut self.released, true) {
            return vec![];
        }
        let left = sweep(&self.mnt, grace);
        let quiet = |cmd: &mut Command| {
            cmd.stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        // Mounted at all? (make may have failed before the mount.)
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .any(|p| Path::new(&unescape_mount(p)) == self.mnt);
        if mounted && !unmount(&self.mnt, 10) {
            eprintln!("{} was busy; unmounted it lazily", self.mnt.display());
        }
        quiet(Command::new("losetup").arg("-d").arg(&self.dev));
        let _ = std::fs::remove_dir(&self.mnt);
        let _ = std::fs::remove_file(&self.image);
        left
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        self.release(Duration::from_secs(2));
    }
}

/// `len` pseudo-random bytes (xorshift), different for each `seed`: test data that does not
/// compress and that a test can make again to compare.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
