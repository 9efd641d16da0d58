//! The fake `Filesystems`: a filesystem is a type and a size written into the fake image files
//! behind a device; `mkfs` refuses a device that holds one, growing follows the real online and
//! offline rules, and `stats` of a fake mount is shaped like a fresh filesystem.

use super::*;
use crate::os::fs as sysfs;

/// The `Filesystems` part of a fake machine.
pub(super) struct FakeFilesystems(pub(super) Fake);

impl Filesystems for FakeFilesystems {
    fn probe(&self, dev: &Path) -> OsResult<Option<String>> {
        let mut w = self.0.world();
        w.fail("fs.probe")?;
        // Fake devices are not on disk; anything else that is must be a file or a device.
        if let Ok(m) = fs::metadata(dev) {
            sysfs::check_device_kind(dev, m.file_type())?;
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
        sysfs::check_fstype(fstype)?;
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
                stderr: format!(
                    "Filesystem must be larger than 300MB.; {}",
                    sysfs::XFS_TOO_SMALL
                ),
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
        let idx = World::loop_index(dev);
        let mounted_here = w
            .top_mount(&resolve_parent(mount_point))
            .is_some_and(|m| idx.is_some() && m.device == idx);
        let mounted_at = w
            .mounts
            .iter()
            .find(|m| idx.is_some() && m.device == idx)
            .map(|m| m.info.target.clone());
        sysfs::check_grow(
            dev,
            mount_point,
            fstype,
            mounted_here,
            mounted_at.as_deref(),
        )?;
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

    fn fs_size(&self, dev: &Path, fstype: &str) -> OsResult<Option<u64>> {
        let mut w = self.0.world();
        w.fail("fs.fs_size")?;
        // As the real one: read from an ext4 superblock, unknown for anything else.
        if fstype != "ext4" {
            return Ok(None);
        }
        Ok(w.device_fs(dev)?
            .filter(|f| f.fstype == "ext4")
            .map(|f| f.size))
    }

    fn freeze(&self, mount_point: &Path) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("fs.freeze")?;
        let target = fsfreeze_target(&w, mount_point, "--freeze")?;
        if w.frozen.contains(&target) {
            return Err(fsfreeze_error(
                mount_point,
                "--freeze",
                "Device or resource busy",
            ));
        }
        w.frozen.push(target);
        Ok(())
    }

    fn thaw(&self, mount_point: &Path) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("fs.thaw")?;
        let target = fsfreeze_target(&w, mount_point, "--unfreeze")?;
        let before = w.frozen.len();
        w.frozen.retain(|f| *f != target);
        if w.frozen.len() == before {
            return Err(fsfreeze_error(
                mount_point,
                "--unfreeze",
                "Invalid argument",
            ));
        }
        Ok(())
    }
}

/// The fake mount `fsfreeze` acts on at `mount_point`: missing is fsfreeze's "cannot open"; a
/// path that no fake filesystem is mounted on would freeze the test machine's own filesystem,
/// which the fake refuses.
fn fsfreeze_target(w: &World, mount_point: &Path, flag: &str) -> OsResult<PathBuf> {
    if !mount_point.exists() {
        return Err(fsfreeze_error(
            mount_point,
            flag,
            "No such file or directory",
        ));
    }
    let target = resolve_parent(mount_point);
    match w.top_mount(&target) {
        Some(m) if m.device.is_some() && m.info.fstype != "devtmpfs" => Ok(target),
        _ => Err(OsError::Other(format!(
            "the fake cannot freeze {}: no fake filesystem is mounted there",
            mount_point.display()
        ))),
    }
}

fn fsfreeze_error(mount_point: &Path, flag: &str, why: &str) -> OsError {
    OsError::Command {
        cmd: format!("fsfreeze {flag} {}", mount_point.display()),
        stderr: format!("fsfreeze: {}: {why}", mount_point.display()),
    }
}
