//! The fake `Filesystems`: a filesystem is a type and a size written into the fake image files
//! behind a device; `mkfs` refuses a device that holds one, growing follows the real online and
//! offline rules, and `stats` of a fake mount is shaped like a fresh filesystem.

use super::*;

/// The `Filesystems` part of a fake machine.
pub(super) struct FakeFilesystems(pub(super) Fake);

impl Filesystems for FakeFilesystems {
    fn probe(&self, dev: &Path) -> OsResult<Option<String>> {
        let mut w = self.0.world();
        w.fail("fs.probe")?;
        if fs::metadata(dev).is_ok_and(|m| m.is_dir()) {
            return Err(OsError::Unsupported(format!(
                "cannot probe {}: it is neither a block device nor a regular file",
                dev.display()
            )));
        }
        match w.device_fs(dev) {
            Ok(found) => Ok(found.map(|f| f.fstype)),
            Err(OsError::NotFound(m)) => Err(OsError::NotFound(format!("cannot probe {m}"))),
            Err(e) => Err(e),
        }
    }

    fn mkfs(&self, dev: &Path, fstype: &str) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("fs.mkfs")?;
        if !SUPPORTED_FILESYSTEMS.contains(&fstype) {
            return Err(OsError::Unsupported(format!(
                "filesystem type {fstype:?} is not supported; use one of {}",
                SUPPORTED_FILESYSTEMS.join(", ")
            )));
        }
        if let Some(found) = w.device_fs(dev)? {
            return Err(OsError::Conflict(format!(
                "refusing to format {} as {fstype}: it already holds {}; its data would be lost",
                dev.display(),
                found.fstype
            )));
        }
        let size = w.device_size(dev)?;
        if fstype == "xfs" && size <= 300 << 20 {
            return Err(OsError::Command {
                cmd: format!("mkfs.xfs -f -q -K {}", dev.display()),
                stderr: "Filesystem must be larger than 300MB.; xfs needs a volume of at least \
                         300 MiB; ask for a bigger volume"
                    .into(),
            });
        }
        w.set_device_fs(
            dev,
            FakeFs {
                fstype: fstype.to_string(),
                size,
            },
        )
    }

    fn grow(&self, dev: &Path, mount_point: &Path, fstype: &str) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("fs.grow")?;
        if !SUPPORTED_FILESYSTEMS.contains(&fstype) {
            return Err(OsError::Unsupported(format!(
                "filesystem type {fstype:?} is not supported; use one of {}",
                SUPPORTED_FILESYSTEMS.join(", ")
            )));
        }
        let idx = World::loop_index(dev);
        let mounted_here = w
            .top_mount(&resolve_parent(mount_point))
            .is_some_and(|m| idx.is_some() && m.device == idx);
        if !mounted_here {
            if let Some(m) = w.mounts.iter().find(|m| idx.is_some() && m.device == idx) {
                return Err(OsError::Busy(format!(
                    "cannot grow the filesystem on {}: it is mounted at {}, not at {}; pass that \
                     mount point",
                    dev.display(),
                    m.info.target.display(),
                    mount_point.display()
                )));
            }
            if fstype == "xfs" {
                return Err(OsError::Unsupported(format!(
                    "cannot grow the xfs filesystem on {}: xfs grows only while mounted; mount it \
                     at {} first",
                    dev.display(),
                    mount_point.display()
                )));
            }
        }
        let found = w.device_fs(dev)?;
        if found.as_ref().map(|f| f.fstype.as_str()) != Some(fstype) {
            return Err(OsError::Command {
                cmd: format!("grow {fstype} on {}", dev.display()),
                stderr: format!("{} holds no {fstype} filesystem", dev.display()),
            });
        }
        let size = w.device_size(dev)?;
        if found.is_some_and(|f| f.size >= size) {
            return Ok(());
        }
        w.set_device_fs(
            dev,
            FakeFs {
                fstype: fstype.to_string(),
                size,
            },
        )
    }

    fn stats(&self, path: &Path) -> OsResult<FsStats> {
        let mut w = self.0.world();
        w.fail("fs.stats")?;
        let target = resolve_parent(path);
        if let Some(m) = w.top_mount(&target)
            && let Some(idx) = m.device
            && m.info.fstype != "devtmpfs"
        {
            let dev = PathBuf::from(format!("{LOOP_PREFIX}{idx}"));
            if let Some(f) = w.device_fs(&dev)? {
                // Shaped like a fresh filesystem: a little metadata, one inode per 16 KiB (ext4's
                // default ratio), 11 inodes in use.
                let used = f.size / 64;
                let inodes = (f.size / 16384).max(16);
                return Ok(FsStats {
                    total_bytes: f.size,
                    available_bytes: f.size - used,
                    used_bytes: used,
                    total_inodes: inodes,
                    free_inodes: inodes - 11,
                    used_inodes: 11,
                });
            }
        }
        drop(w);
        crate::os::fs::SysFilesystems::new().stats(path)
    }

    fn device_size(&self, dev: &Path) -> OsResult<u64> {
        let mut w = self.0.world();
        w.fail("fs.device_size")?;
        w.device_size(dev)
    }
}
