//! Mounts: filesystem mounts through the `mount` program (so every option a CSI user may pass in
//! `mount_flags` is understood exactly as on the command line), bind mounts and unmounts through
//! the kernel calls (nix's safe wrappers), and the reading of `/proc/self/mountinfo`.
//!
//! It must not decide what to mount where, nor remove mount targets: that is the domain's call.
//! It creates a missing target because CSI makes creating the target path the plugin's job and
//! only this layer knows whether a source needs a directory or a file.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::statvfs::{FsFlags, statvfs};

use super::{MountInfo, Mounter, OsError, OsResult, resolve_parent, run};

/// One line of /proc/self/mountinfo (see proc(5)), with the octal escapes decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MountEntry {
    pub major: u32,
    pub minor: u32,
    /// The path inside the mounted filesystem that is visible at `mount_point` (not "/" for binds).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub mount_options: Vec<String>,
    pub fstype: String,
    pub source: String,
    pub super_options: Vec<String>,
}

impl MountEntry {
    pub fn to_info(&self) -> MountInfo {
        let mut options = self.mount_options.clone();
        for o in &self.super_options {
            if !options.contains(o) {
                options.push(o.clone());
            }
        }
        MountInfo {
            source: self.source.clone(),
            target: self.mount_point.clone(),
            fstype: self.fstype.clone(),
            options,
        }
    }
}

/// The kernel writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
pub(crate) fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            if value <= 0xff {
                out.push(value as u8);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse the whole of /proc/self/mountinfo; lines that do not parse are skipped (the format has
/// been stable since 2.6.26, so a bad line is noise rather than a reason to fail every call).
pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    // id parent major:minor root mount_point options [optional fields...] - fstype source super
    let sep = fields.iter().position(|f| *f == "-")?;
    if sep < 6 || fields.len() < sep + 4 {
        return None;
    }
    let (major, minor) = fields[2].split_once(':')?;
    let split_opts = |s: &str| -> Vec<String> {
        s.split(',')
            .filter(|o| !o.is_empty())
            .map(str::to_string)
            .collect()
    };
    Some(MountEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: PathBuf::from(unescape_octal(fields[3])),
        mount_point: PathBuf::from(unescape_octal(fields[4])),
        mount_options: split_opts(fields[5]),
        fstype: unescape_octal(fields[sep + 1]),
        source: unescape_octal(fields[sep + 2]),
        super_options: split_opts(fields[sep + 3]),
    })
}

pub(crate) fn read_mountinfo() -> OsResult<Vec<MountEntry>> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| OsError::io("reading /proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text))
}

/// The top-most mount on `target` (the last one listed wins: later mounts stack on earlier ones).
pub(crate) fn lookup(target: &Path) -> OsResult<Option<MountEntry>> {
    let target = resolve_parent(target);
    Ok(read_mountinfo()?
        .into_iter()
        .rev()
        .find(|e| e.mount_point == target))
}

/// One `umount2(2)` call. Ok(false) when nothing was mounted there.
pub(crate) fn umount_once(target: &Path, flags: MntFlags) -> OsResult<bool> {
    let mut result = nix::mount::umount2(target, flags);
    // A short-lived EBUSY is normal in a multi-threaded process: a child forked by another
    // thread holds copies of our descriptors (a file just closed on this mount) until it execs.
    // Measured in the parallel tests: a write, a close, then an unmount failed this way.
    let mut delay = Duration::from_millis(10);
    while result == Err(Errno::EBUSY) && delay <= Duration::from_millis(320) {
        std::thread::sleep(delay);
        delay *= 2;
        result = nix::mount::umount2(target, flags);
    }
    match result {
        Ok(()) => Ok(true),
        Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(false),
        Err(Errno::EBUSY) => Err(OsError::Busy(format!(
            "cannot unmount {}: it is busy (a process, a bind mount's user or a loop device still \
             uses it); stop what uses it first (see `fuser -vm {}`, `losetup -j`)",
            target.display(),
            target.display()
        ))),
        Err(e) => Err(OsError::io(
            format!("unmounting {}", target.display()),
            std::io::Error::from(e),
        )),
    }
}

/// Unmount everything stacked on `target`.
pub(crate) fn unmount_all(target: &Path) -> OsResult<()> {
    let target = resolve_parent(target);
    // Bounded: a mount that reappears forever (another agent re-mounting) must not hang us.
    for _ in 0..32 {
        if lookup(&target)?.is_none() {
            return Ok(());
        }
        if !umount_once(&target, MntFlags::empty())? {
            return Ok(());
        }
    }
    Err(OsError::Busy(format!(
        "{} is still mounted after 32 unmounts; something keeps mounting it",
        target.display()
    )))
}

/// Create a missing mount target: a directory for directory sources, an empty file otherwise
/// (device nodes for block volumes), as the kernel only binds like onto like. The fake mounter
/// (`super::fake`) makes its targets with it too.
pub(crate) fn ensure_target(target: &Path, want_dir: bool) -> OsResult<()> {
    match fs::symlink_metadata(target) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let result = if want_dir {
                fs::create_dir(target)
            } else {
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(target)
                    .map(|_| ())
            };
            match result {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(OsError::io(
                    format!(
                        "creating mount target {} (its parent directory must exist)",
                        target.display()
                    ),
                    e,
                )),
            }
        }
        // A target that cannot be stat'ed (ENOTCONN of a dead FUSE mount) is left to the mount
        // call, whose error then names it.
        Err(_) => Ok(()),
    }
}

/// The source of a bind mount must be there: its metadata (a directory is bound on a
/// directory, anything else on a file), else the error naming it. The fake mounter
/// (`super::fake`) calls it for sources that are plain paths.
pub(crate) fn check_bind_source(source: &Path, target: &Path) -> OsResult<fs::Metadata> {
    fs::metadata(source).map_err(|e| {
        OsError::io(
            format!(
                "cannot bind-mount {} on {}: source",
                source.display(),
                target.display()
            ),
            e,
        )
    })
}

/// Does `entry` show `source` (a block device) mounted? Compared by device number, not by name,
/// because /dev paths have aliases (/dev/disk/by-id/..., symlinks).
pub(crate) fn entry_is_device(entry: &MountEntry, source: &Path) -> bool {
    match fs::metadata(source) {
        Ok(m) if m.file_type().is_block_device() => {
            let rdev = m.rdev();
            (
                nix::sys::stat::major(rdev) as u32,
                nix::sys::stat::minor(rdev) as u32,
            ) == (entry.major, entry.minor)
        }
        _ => resolve_parent(source) == Path::new(&entry.source),
    }
}

/// Is `target` a bind of `source`? The same file (device and inode) is visible at both.
fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The flags of the mount at `path` that a read-only remount must repeat: inside a user namespace
/// the kernel refuses a remount that drops a locked nosuid/nodev/noexec/atime flag (EPERM).
fn locked_flags(path: &Path) -> MsFlags {
    let mut flags = MsFlags::empty();
    if let Ok(st) = statvfs(path) {
        let f = st.flags();
        for (fs_flag, ms_flag) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ] {
            if f.contains(fs_flag) {
                flags |= ms_flag;
            }
        }
    }
    flags
}

/// The real mounter of this machine.
#[derive(Clone, Debug, Default)]
pub struct SysMounter;

impl SysMounter {
    pub fn new() -> SysMounter {
        SysMounter
    }
}

impl Mounter for SysMounter {
    fn mount(
        &self,
        source: &Path,
        target: &Path,
        fstype: &str,
        options: &[String],
    ) -> OsResult<()> {
        if let Some(existing) = lookup(target)? {
            if entry_is_device(&existing, source) {
                return Ok(());
            }
            return Err(OsError::Conflict(format!(
                "cannot mount {} on {}: {} ({}) is already mounted there; unmount it first",
                source.display(),
                target.display(),
                existing.source,
                existing.fstype
            )));
        }
        if !source.exists() {
            return Err(OsError::NotFound(format!(
                "cannot mount {} on {}: the device does not exist (is its loop device attached?)",
                source.display(),
                target.display()
            )));
        }
        ensure_target(target, true)?;
        let mut cmd = Command::new("mount");
        cmd.arg("-t").arg(fstype);
        let options: Vec<&str> = options
            .iter()
            .map(|o| o.trim())
            .filter(|o| !o.is_empty())
            .collect();
        if !options.is_empty() {
            cmd.arg("-o").arg(options.join(","));
        }
        // `--` so a source or target that starts with '-' is never read as an option.
        cmd.arg("--").arg(source).arg(target);
        run(&mut cmd).map(|_| ())
    }

    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> OsResult<()> {
        let meta = check_bind_source(source, target)?;
        if let Some(existing) = lookup(target)? {
            let is_ro = existing.mount_options.iter().any(|o| o == "ro");
            if same_file(source, target) && is_ro == read_only {
                return Ok(());
            }
            return Err(OsError::Conflict(format!(
                "cannot bind-mount {} on {} ({}): {} ({}, {}) is already mounted there; unmount it \
                 first",
                source.display(),
                target.display(),
                if read_only { "read-only" } else { "read-write" },
                existing.source,
                existing.root.display(),
                if is_ro { "read-only" } else { "read-write" },
            )));
        }
        ensure_target(target, meta.is_dir())?;
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            OsError::io(
                format!("bind-mounting {} on {}", source.display(), target.display()),
                e.into(),
            )
        })?;
        if read_only {
            // MS_RDONLY is ignored on the first bind call; only a remount makes a bind read-only.
            let flags =
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | locked_flags(target);
            if let Err(e) =
                nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
            {
                // Never leave a writable bind where a read-only one was asked for.
                let _ = umount_once(target, MntFlags::empty());
                return Err(OsError::io(
                    format!(
                        "remounting the bind of {} on {} read-only",
                        source.display(),
                        target.display()
                    ),
                    e.into(),
                ));
            }
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> OsResult<()> {
        unmount_all(target)
    }

    fn mount_info(&self, target: &Path) -> OsResult<Option<MountInfo>> {
        Ok(lookup(target)?.map(|e| e.to_info()))
    }

    fn mounts_of(&self, device: &Path) -> OsResult<Vec<PathBuf>> {
        // A bind of the device node shows devtmpfs with the node's name as its root.
        let node = device
            .file_name()
            .map(|n| Path::new("/").join(n))
            .unwrap_or_default();
        let mut found: Vec<PathBuf> = read_mountinfo()?
            .into_iter()
            .filter(|e| {
                entry_is_device(e, device)
                    || (e.fstype == "devtmpfs" && e.root == node && !node.as_os_str().is_empty())
            })
            .map(|e| e.mount_point)
            .collect();
        found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        found.dedup();
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::testutil::Cleanup;

    #[test]
    fn unescape_table() {
        for (raw, want) in [
            (r"/plain", "/plain"),
            (r"/with\040space", "/with space"),
            (r"/tab\011here", "/tab\there"),
            (r"/nl\012x", "/nl\nx"),
            (r"/back\134slash", r"/back\slash"),
            (r"/trailing\04", r"/trailing\04"),
            (r"/not\999octal", r"/not\999octal"),
            (r"\040\040", "  "),
            (r"/ütf8\040ok", "/ütf8 ok"),
        ] {
            assert_eq!(unescape_octal(raw), want, "unescaping {raw:?}");
        }
    }

    #[test]
    fn mountinfo_table() {
        let text = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
36 22 98:0 /mnt1 /mnt\\040two rw,noatime master:1 shared:2 - ext3 /dev/my\\040disk rw,errors=continue
42 27 0:39 / /var/lib/bicsi/run/vol/export rw,nosuid,nodev,relatime - fuse /dev/fuse rw,user_id=0,group_id=0,default_permissions,allow_other,max_read=67108864
43 27 0:6 /loop0 /tmp/target\\012file ro,relatime - devtmpfs devtmpfs rw,size=123k,mode=755
bad line
44 27 0:6 / /x rw - short
";
        let entries = parse_mountinfo(text);
        assert_eq!(entries.len(), 4, "{entries:#?}");
        assert_eq!(
            entries[0],
            MountEntry {
                major: 8,
                minor: 1,
                root: "/".into(),
                mount_point: "/".into(),
                mount_options: vec!["rw".into(), "relatime".into()],
                fstype: "ext4".into(),
                source: "/dev/sda1".into(),
                super_options: vec!["rw".into(), "errors=remount-ro".into()],
            }
        );
        assert_eq!(entries[1].mount_point, Path::new("/mnt two"));
        assert_eq!(entries[1].root, Path::new("/mnt1"));
        assert_eq!(entries[1].source, "/dev/my disk");
        assert_eq!(entries[1].fstype, "ext3");
        assert_eq!((entries[1].major, entries[1].minor), (98, 0));
        assert_eq!(entries[2].fstype, "fuse");
        assert_eq!(entries[3].mount_point, Path::new("/tmp/target\nfile"));
        let info = entries[3].to_info();
        assert_eq!(
            info.options,
            vec!["ro", "relatime", "rw", "size=123k", "mode=755"]
        );
        assert_eq!(info.source, "devtmpfs");
    }

    #[test]
    fn unmount_of_nothing_is_ok() {
        let dir = tempfile::tempdir().unwrap();
        let m = SysMounter::new();
        m.unmount(&dir.path().join("missing")).unwrap();
        m.unmount(dir.path()).unwrap();
        assert_eq!(m.mount_info(&dir.path().join("missing")).unwrap(), None);
    }

    #[test]
    fn real_bind_mounts_read_only_and_idempotent() {
        if !crate::os::root_or_skip("real_bind_mounts_read_only_and_idempotent") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let src = dir.path().join("src dir");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("f"), b"hello").unwrap();
        let target = dir.path().join("target dir");
        let m = SysMounter::new();
        cleanup.mount(&target);

        m.bind_mount(&src, &target, true).unwrap();
        m.bind_mount(&src, &target, true).unwrap(); // idempotent
        let info = m.mount_info(&target).unwrap().expect("mounted");
        assert_eq!(info.target, resolve_parent(&target)); // the space came back from \040
        assert!(info.options.contains(&"ro".to_string()), "{info:?}");
        assert_eq!(fs::read(target.join("f")).unwrap(), b"hello");
        let err = fs::write(target.join("g"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        // Same source but writable is a different request.
        assert!(matches!(
            m.bind_mount(&src, &target, false),
            Err(OsError::Conflict(_))
        ));
        m.unmount(&target).unwrap();
        m.unmount(&target).unwrap();
        assert_eq!(m.mount_info(&target).unwrap(), None);

        // A file source gets a file target (block volumes bind device nodes this way).
        let file_target = dir.path().join("dev-target");
        cleanup.mount(&file_target);
        m.bind_mount(&src.join("f"), &file_target, false).unwrap();
        assert!(fs::metadata(&file_target).unwrap().is_file());
        assert_eq!(fs::read(&file_target).unwrap(), b"hello");
        m.unmount(&file_target).unwrap();
    }
}
