//! Filesystems on volume devices: detect what a device holds (`blkid`), create ext4 or xfs,
//! grow them (online when mounted; ext4 also offline before mounting), and report usage
//! (`statvfs`).
//!
//! It must never destroy data: `probe` answers "empty" only when the device is readable and
//! `blkid` positively found no signature, and `mkfs` re-checks that itself before formatting, so a
//! wrong decision in the domain cannot wipe an image that carries a filesystem.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::Command;

use super::{
    Filesystems, FsStats, OsError, OsResult, SUPPORTED_FILESYSTEMS, command_error, mount, output,
    run,
};

/// resize2fs refuses an unmounted filesystem that was not checked since its last mount, so check
/// it first; -p repairs only what is safe without a person.
fn grow_ext4_offline(dev: &Path) -> OsResult<()> {
    let mut fsck = Command::new("e2fsck");
    fsck.args(["-f", "-p"]).arg(dev);
    let out = output(&mut fsck)?;
    // 0: clean, 1: errors fixed, 2: fixed, reboot advised (irrelevant for a data volume).
    if !matches!(out.status.code(), Some(0..=2)) {
        let hint = format!(
            "the filesystem on {} has errors that need a person: run `e2fsck -f {}` by hand",
            dev.display(),
            dev.display()
        );
        return Err(command_error(&fsck, &out, Some(&hint)));
    }
    let mut cmd = Command::new("resize2fs");
    cmd.arg(dev);
    let out = output(&mut cmd)?;
    if !out.status.success() {
        return Err(command_error(&cmd, &out, None));
    }
    Ok(())
}

/// The real filesystem tools of this machine.
#[derive(Clone, Debug, Default)]
pub struct SysFilesystems;

impl SysFilesystems {
    pub fn new() -> SysFilesystems {
        SysFilesystems
    }
}

/// The hint when mkfs.xfs refuses a small device (the fake's mkfs gives it too).
pub(crate) const XFS_TOO_SMALL: &str =
    "xfs needs a volume of at least 300 MiB; ask for a bigger volume";

/// `mkfs` and `grow` know only `SUPPORTED_FILESYSTEMS`: `Unsupported` naming them otherwise.
/// The fake (`super::fake`) calls it too, as it calls the checks below.
pub(crate) fn check_fstype(fstype: &str) -> OsResult<()> {
    if SUPPORTED_FILESYSTEMS.contains(&fstype) {
        return Ok(());
    }
    Err(OsError::Unsupported(format!(
        "filesystem type {fstype:?} is not supported; use one of {}",
        SUPPORTED_FILESYSTEMS.join(", ")
    )))
}

/// Only a block device or a regular file can hold a filesystem: `Unsupported` for anything
/// else (a directory), before any probe.
pub(crate) fn check_device_kind(dev: &Path, kind: std::fs::FileType) -> OsResult<()> {
    if kind.is_block_device() || kind.is_file() {
        return Ok(());
    }
    Err(OsError::Unsupported(format!(
        "cannot probe {}: it is neither a block device nor a regular file",
        dev.display()
    )))
}

/// How `grow` grows the `fstype` filesystem on `dev`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Growth {
    /// It is mounted at the mount point given: through it.
    Online,
    /// It is mounted nowhere, and it is ext4: checked and grown offline.
    Offline,
}

/// The rule of `grow`, from where the filesystem is mounted: at `mount_point` (`mounted_here`),
/// elsewhere (`mounted_at`, `Busy`: pass that mount point), or nowhere (ext4 offline; xfs is
/// `Unsupported`: it grows only while mounted).
pub(crate) fn check_grow(
    dev: &Path,
    mount_point: &Path,
    fstype: &str,
    mounted_here: bool,
    mounted_at: Option<&Path>,
) -> OsResult<Growth> {
    check_fstype(fstype)?;
    if mounted_here {
        return Ok(Growth::Online);
    }
    if let Some(at) = mounted_at {
        return Err(OsError::Busy(format!(
            "cannot grow the filesystem on {}: it is mounted at {}, not at {}; pass that mount \
             point",
            dev.display(),
            at.display(),
            mount_point.display()
        )));
    }
    match fstype {
        "ext4" => Ok(Growth::Offline),
        _ => Err(OsError::Unsupported(format!(
            "cannot grow the xfs filesystem on {}: xfs grows only while mounted; mount it at {} \
             first",
            dev.display(),
            mount_point.display()
        ))),
    }
}

/// The `blkid -o export` answer: the filesystem type, else the partition table type, else a
/// generic marker for any other signature blkid reported.
pub(crate) fn signature_from_blkid_export(stdout: &str) -> Option<String> {
    let mut pttype = None;
    let mut other = false;
    for line in stdout.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "TYPE" if !value.is_empty() => return Some(value.to_string()),
            "PTTYPE" if !value.is_empty() => pttype = Some(value.to_string()),
            "DEVNAME" => {}
            _ => other = true,
        }
    }
    pttype.or(other.then(|| "unknown".to_string()))
}

/// Fail unless `dev` exists and its first block can be read: blkid answers "nothing found" (exit
/// 2) for a missing or unreadable device too, and that must never read as "empty, format it".
fn check_readable(dev: &Path) -> OsResult<()> {
    let meta = std::fs::metadata(dev).map_err(|e| {
        OsError::io(
            format!(
                "cannot probe {}: the device is not there (is its loop device attached?)",
                dev.display()
            ),
            e,
        )
    })?;
    check_device_kind(dev, meta.file_type())?;
    let mut buf = vec![0u8; 4096];
    File::open(dev)
        .and_then(|mut f| f.read(&mut buf))
        .map_err(|e| {
            OsError::io(
                format!(
                    "cannot read {}; refusing to decide whether it holds data (check the engine \
                     log for I/O errors on the replicas)",
                    dev.display()
                ),
                e,
            )
        })?;
    Ok(())
}

impl Filesystems for SysFilesystems {
    fn freeze(&self, mount_point: &Path) -> OsResult<()> {
        run(Command::new("fsfreeze").arg("--freeze").arg(mount_point)).map(drop)
    }

    fn thaw(&self, mount_point: &Path) -> OsResult<()> {
        run(Command::new("fsfreeze").arg("--unfreeze").arg(mount_point)).map(drop)
    }

    fn fs_size(&self, dev: &Path, fstype: &str) -> OsResult<Option<u64>> {
        if fstype != "ext4" {
            return Ok(None);
        }
        let mut sb = [0u8; 1024];
        let mut f =
            File::open(dev).map_err(|e| OsError::io(format!("open {}", dev.display()), e))?;
        f.seek(SeekFrom::Start(1024))
            .and_then(|_| f.read_exact(&mut sb))
            .map_err(|e| OsError::io(format!("read the superblock of {}", dev.display()), e))?;
        Ok(ext4_size(&sb))
    }

    fn probe(&self, dev: &Path) -> OsResult<Option<String>> {
        check_readable(dev)?;
        // -p: low-level probe of the device itself, never blkid's cache, which may be stale.
        let mut cmd = Command::new("blkid");
        cmd.args(["-p", "-o", "export"]).arg(dev);
        let out = output(&mut cmd)?;
        match out.status.code() {
            Some(0) => Ok(Some(
                signature_from_blkid_export(&String::from_utf8_lossy(&out.stdout))
                    .unwrap_or_else(|| "unknown".to_string()),
            )),
            Some(2) => Ok(None),
            Some(8) => Err(OsError::Conflict(format!(
                "{} holds several conflicting signatures ({}); refusing to use or format it, \
                 inspect it with `wipefs {}`",
                dev.display(),
                String::from_utf8_lossy(&out.stderr).trim(),
                dev.display()
            ))),
            _ => Err(command_error(&cmd, &out, None)),
        }
    }

    fn mkfs(&self, dev: &Path, fstype: &str) -> OsResult<()> {
        check_fstype(fstype)?;
        if let Some(found) = self.probe(dev)? {
            return Err(OsError::Conflict(format!(
                "refusing to format {} as {fstype}: it already holds {found}; its data would be \
                 lost (mount it as {found}, or wipe it by hand if it is truly unwanted)",
                dev.display()
            )));
        }
        let mut cmd = match fstype {
            "ext4" => {
                let mut cmd = Command::new("mkfs.ext4");
                // -m 0: a volume's capacity is the user's, no blocks reserved for root (as
                // Kubernetes' own formatter does). Lazy init and nodiscard: a fresh qcow2 already
                // reads as zeros, and zeroing or discarding it through FUSE only costs time.
                cmd.args([
                    "-F",
                    "-q",
                    "-m",
                    "0",
                    "-E",
                    "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                ]);
                cmd
            }
            "xfs" => {
                let mut cmd = Command::new("mkfs.xfs");
                // -K: no discard, for the same reason as ext4's nodiscard.
                cmd.args(["-f", "-q", "-K"]);
                cmd
            }
            _ => unreachable!("checked against SUPPORTED_FILESYSTEMS"),
        };
        cmd.arg(dev);
        let out = output(&mut cmd)?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let hint = (fstype == "xfs" && stderr.contains("must be larger than"))
                .then_some(XFS_TOO_SMALL);
            return Err(command_error(&cmd, &out, hint));
        }
        Ok(())
    }

    fn grow(&self, dev: &Path, mount_point: &Path, fstype: &str) -> OsResult<()> {
        let mounted_here =
            mount::lookup(mount_point)?.is_some_and(|m| mount::entry_is_device(&m, dev));
        let mounted_at = if mounted_here {
            None
        } else {
            mount::read_mountinfo()?
                .into_iter()
                .find(|m| mount::entry_is_device(m, dev))
                .map(|m| m.mount_point)
        };
        match check_grow(
            dev,
            mount_point,
            fstype,
            mounted_here,
            mounted_at.as_deref(),
        )? {
            Growth::Offline => return grow_ext4_offline(dev),
            Growth::Online => {}
        }
        let mut cmd = if fstype == "ext4" {
            let mut cmd = Command::new("resize2fs");
            cmd.arg(dev);
            cmd
        } else {
            // xfs grows only through its mount point.
            let mut cmd = Command::new("xfs_growfs");
            cmd.arg(mount_point);
            cmd
        };
        let out = output(&mut cmd)?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            // Measured: in a container without CAP_SYS_RESOURCE the kernel refuses ext4's resize
            // ioctl with EPERM even for root.
            let hint = if stderr.contains("Permission denied") || stderr.contains("not permitted") {
                "growing ext4 while mounted needs CAP_SYS_RESOURCE: give the node plugin that \
                 capability, or grow the filesystem before mounting it (offline)"
            } else {
                "see the message above"
            };
            return Err(command_error(&cmd, &out, Some(hint)));
        }
        Ok(())
    }

    fn stats(&self, path: &Path) -> OsResult<FsStats> {
        let st = nix::sys::statvfs::statvfs(path).map_err(|e| {
            OsError::io(
                format!("reading filesystem usage of {}", path.display()),
                e.into(),
            )
        })?;
        let frsize = st.fragment_size() as u64;
        let total_bytes = st.blocks() as u64 * frsize;
        let free_bytes = st.blocks_free() as u64 * frsize;
        let total_inodes = st.files() as u64;
        let free_inodes = st.files_free() as u64;
        Ok(FsStats {
            total_bytes,
            // What an unprivileged writer can still use, as `df` reports it.
            available_bytes: st.blocks_available() as u64 * frsize,
            used_bytes: total_bytes.saturating_sub(free_bytes),
            total_inodes,
            free_inodes,
            used_inodes: total_inodes.saturating_sub(free_inodes),
        })
    }

    fn device_size(&self, dev: &Path) -> OsResult<u64> {
        // Seeking to the end gives the size of block devices and regular files alike.
        File::open(dev)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .map_err(|e| OsError::io(format!("reading the size of {}", dev.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_export_table() {
        for (stdout, want) in [
            ("DEVNAME=/dev/loop0\nUUID=abc\nTYPE=ext4\n", Some("ext4")),
            (
                "DEVNAME=/dev/loop0\nUUID=abc\nBLOCK_SIZE=512\nTYPE=xfs\n",
                Some("xfs"),
            ),
            ("DEVNAME=pt.img\nPTTYPE=dos\n", Some("dos")),
            ("DEVNAME=x\nPTUUID=1\nPTTYPE=gpt\n", Some("gpt")),
            ("DEVNAME=x\nSOMETHING=1\n", Some("unknown")),
            ("DEVNAME=x\n", None),
            ("", None),
        ] {
            assert_eq!(
                signature_from_blkid_export(stdout).as_deref(),
                want,
                "{stdout:?}"
            );
        }
    }

    #[test]
    fn probe_refuses_missing_and_non_devices() {
        let f = SysFilesystems::new();
        assert!(matches!(
            f.probe(Path::new("/nonexistent/dev")),
            Err(OsError::NotFound(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(f.probe(dir.path()), Err(OsError::Unsupported(_))));
    }

    #[test]
    fn mkfs_lists_supported_types() {
        let err = SysFilesystems::new()
            .mkfs(Path::new("/dev/null"), "btrfs")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "filesystem type \"btrfs\" is not supported; use one of ext4, xfs"
        );
        assert!(matches!(
            SysFilesystems::new().grow(Path::new("/dev/x"), Path::new("/x"), "zfs"),
            Err(OsError::Unsupported(_))
        ));
    }

    /// Probing and formatting work on image files too, so this needs no root.
    #[test]
    fn probe_mkfs_on_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = SysFilesystems::new();
        let img = dir.path().join("fs.img");
        File::create(&img).unwrap().set_len(32 << 20).unwrap();
        assert_eq!(f.probe(&img).unwrap(), None);
        f.mkfs(&img, "ext4").unwrap();
        assert_eq!(f.probe(&img).unwrap().as_deref(), Some("ext4"));
        let err = f.mkfs(&img, "ext4").unwrap_err();
        assert!(matches!(err, OsError::Conflict(_)), "{err}");
        assert!(err.to_string().contains("already holds ext4"), "{err}");
        assert_eq!(f.device_size(&img).unwrap(), 32 << 20);

        // A partition table with no filesystem is data too.
        let pt = dir.path().join("pt.img");
        let mut mbr = vec![0u8; 1 << 20];
        mbr[446 + 4] = 0x83; // partition type: Linux
        mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        mbr[446 + 12..446 + 16].copy_from_slice(&8u32.to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        std::fs::write(&pt, &mbr).unwrap();
        assert_eq!(f.probe(&pt).unwrap().as_deref(), Some("dos"));
        assert!(matches!(f.mkfs(&pt, "xfs"), Err(OsError::Conflict(_))));

        // xfs refuses tiny devices; the error says what to do.
        let small = dir.path().join("small.img");
        File::create(&small).unwrap().set_len(16 << 20).unwrap();
        let err = f.mkfs(&small, "xfs").unwrap_err();
        assert!(err.to_string().contains("at least 300 MiB"), "{err}");
    }

    #[test]
    fn stats_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let s = SysFilesystems::new().stats(dir.path()).unwrap();
        assert!(s.total_bytes > 0);
        assert!(s.available_bytes <= s.total_bytes);
        assert!(s.used_bytes <= s.total_bytes);
        assert_eq!(s.used_inodes + s.free_inodes, s.total_inodes);
    }
}

/// The size an ext4 superblock (the 1024 bytes at offset 1024) says its filesystem spans.
pub fn ext4_size(sb: &[u8; 1024]) -> Option<u64> {
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        return None;
    }
    let log_block = u32_at(0x18);
    if log_block > 6 {
        return None;
    }
    let block_size = 1024u64 << log_block;
    // The high half of the block count is valid only with the 64bit feature (incompat 0x80).
    let hi = if u32_at(0x60) & 0x80 != 0 {
        u64::from(u32_at(0x150))
    } else {
        0
    };
    Some(((hi << 32) | u64::from(u32_at(0x4))) * block_size)
}

#[cfg(test)]
mod ext4_size_tests {
    use super::*;

    #[test]
    fn reads_the_size_from_a_real_superblock() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(48 << 20)
            .unwrap();
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let size = SysFilesystems::new().fs_size(&img, "ext4").unwrap();
        assert_eq!(size, Some(48 << 20));
        assert_eq!(SysFilesystems::new().fs_size(&img, "xfs").unwrap(), None);
        let mut garbage = [0u8; 1024];
        garbage[0x38] = 1;
        assert_eq!(ext4_size(&garbage), None);
    }
}
