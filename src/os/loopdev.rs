//! Loop devices: turn the engine's exported file into a block device with `losetup`, and find
//! existing ones through sysfs so a restarted bicsi re-adopts them.
//!
//! It must not attach with direct I/O: measured on qemu-storage-daemon 10.0.2's FUSE export,
//! `losetup --direct-io=on` is accepted but writes through the device are lost or misplaced
//! (a pattern written with O_DIRECT reads back different from byte 1; ext4 made on it fails to
//! mount with "journal inode checksum invalid"), while buffered loop devices read back exactly.
//! The exception is the file of bicsi's own mirror engine (`crate::mirror`, FUSE source
//! `bicsi-mirror`): it copies every write before answering and serves many requests at once, so
//! its loop device does direct I/O (asynchronous, several requests in flight, and no second page
//! cache over the replicas' own); fio `verify=crc32c` passes on it (README, volume-io-mirror).
//!
//! A buffered loop device reads its file through the page cache, so over a FUSE export the
//! file's read-ahead decides how large the requests to the engine are. It raises that read-ahead
//! (see [`FUSE_READ_AHEAD_KB`]); it changes nothing on other filesystems.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{LoopDevices, OsError, OsResult, command_error, output, resolve_parent, run};

/// How long a detached device may take to let go of its file (the kernel finishes the detach
/// when the last opener, e.g. a blkid probe from udev, closes it).
const DETACH_WAIT: Duration = Duration::from_secs(5);

/// Read-ahead (KiB) given to a FUSE file's backing device before a loop device is attached to
/// it. The kernel's 128 KiB default makes every sequential read a chain of small requests, one
/// round trip each through qemu-storage-daemon's single-threaded FUSE export: measured here
/// (10.0.2, fio 1 MiB direct sequential reads on the loop device), about 100 MB/s at 128 KiB
/// and 1 MiB, 360–490 MB/s at 4 MiB, less again at 16 MiB.
pub const FUSE_READ_AHEAD_KB: u64 = 4096;

/// `/sys/class/bdi/MAJ:MIN/read_ahead_kb` of the filesystem holding `file` when it is a FUSE
/// filesystem; None elsewhere.
pub(crate) fn fuse_read_ahead_path(file: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let fs = nix::sys::statfs::statfs(file).ok()?;
    if fs.filesystem_type() != nix::sys::statfs::FUSE_SUPER_MAGIC {
        return None;
    }
    let dev = fs::metadata(file).ok()?.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    Some(PathBuf::from(format!(
        "/sys/class/bdi/{major}:{minor}/read_ahead_kb"
    )))
}

/// Raises the read-ahead of a FUSE `file` to [`FUSE_READ_AHEAD_KB`] (never lowers it). Best
/// effort: without it the volume is only slower, so a failure is logged, not returned.
fn raise_fuse_read_ahead(file: &Path) {
    let Some(knob) = fuse_read_ahead_path(file) else {
        return;
    };
    let current = fs::read_to_string(&knob)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if current.is_some_and(|kb| kb >= FUSE_READ_AHEAD_KB) {
        return;
    }
    if let Err(e) = fs::write(&knob, FUSE_READ_AHEAD_KB.to_string()) {
        tracing::warn!(file = %file.display(), knob = %knob.display(), error = %e,
            "cannot raise the read-ahead of the engine's export; sequential reads will be slower");
    }
}

/// The real loop devices of this machine.
#[derive(Clone, Debug, Default)]
pub struct Losetup;

impl Losetup {
    pub fn new() -> Losetup {
        Losetup
    }
}

/// A loop device is named `loopN` (any directory): its name, else `Unsupported`. Every call
/// that takes a device checks it first, here and in the fake (`super::fake`).
pub(crate) fn check_loop_device(dev: &Path) -> OsResult<&str> {
    dev.file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.starts_with("loop") && n[4..].chars().all(|c| c.is_ascii_digit()))
        .ok_or_else(|| {
            OsError::Unsupported(format!(
                "{} is not a loop device (expected /dev/loopN)",
                dev.display()
            ))
        })
}

/// The file a loop device is attached to, or None when it is not attached. Read from sysfs,
/// which holds the path as it was at attach time: it still matches when the file is a dead FUSE
/// mount that `losetup -j` can no longer stat, which is exactly the leftover we must find.
fn backing_file(name: &str) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    let text = text.trim_end_matches('\n');
    (!text.is_empty()).then(|| PathBuf::from(text))
}

/// Every attached loop device with its backing file.
pub(crate) fn attached() -> OsResult<Vec<(PathBuf, PathBuf)>> {
    let entries = match fs::read_dir("/sys/block") {
        Ok(entries) => entries,
        Err(e) => return Err(OsError::io("listing /sys/block", e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("loop") {
            continue;
        }
        if let Some(file) = backing_file(name) {
            out.push((PathBuf::from("/dev").join(name), file));
        }
    }
    out.sort();
    Ok(out)
}

impl Losetup {
    fn attach_as(&self, file: &Path, read_only: bool) -> OsResult<PathBuf> {
        let meta = fs::metadata(file).map_err(|e| {
            OsError::io(
                format!(
                    "cannot attach a loop device to {}: the file is not there (is its engine \
                     running?)",
                    file.display()
                ),
                e,
            )
        })?;
        if let Some(dev) = self.find(file)? {
            return Ok(dev);
        }
        raise_fuse_read_ahead(file);
        let mirror = super::mount::lookup(file)
            .ok()
            .flatten()
            .is_some_and(|m| m.source == crate::os::engine::mirror::FS_NAME);
        let mut cmd = Command::new("losetup");
        cmd.args([
            "--find",
            "--show",
            if mirror {
                "--direct-io=on"
            } else {
                "--direct-io=off"
            },
        ]);
        // Root ignores permission bits, so the engine's read-only export (mode 0400) would be
        // opened read-write and every write would fail with EIO deep inside a filesystem. Honour
        // the mode ourselves and make the device itself read-only.
        if read_only || meta.permissions().mode() & 0o222 == 0 {
            cmd.arg("--read-only");
        }
        cmd.arg("--").arg(file);
        let out = run(&mut cmd)?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dev.starts_with("/dev/") {
            return Err(OsError::Other(format!(
                "losetup attached {} but printed {dev:?} instead of a device path",
                file.display()
            )));
        }
        Ok(PathBuf::from(dev))
    }
}

impl LoopDevices for Losetup {
    fn attach(&self, file: &Path) -> OsResult<PathBuf> {
        self.attach_as(file, false)
    }

    fn attach_read_only(&self, file: &Path) -> OsResult<PathBuf> {
        self.attach_as(file, true)
    }

    fn find(&self, file: &Path) -> OsResult<Option<PathBuf>> {
        let file = resolve_parent(file);
        Ok(attached()?
            .into_iter()
            .find(|(_, backing)| *backing == file)
            .map(|(dev, _)| dev))
    }

    fn detach(&self, dev: &Path) -> OsResult<()> {
        let name = check_loop_device(dev)?;
        let Some(file) = backing_file(name) else {
            return Ok(());
        };
        let mut cmd = Command::new("losetup");
        cmd.arg("--detach").arg(dev);
        let out = output(&mut cmd)?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            // Someone else detached it between our check and our call: what we wanted.
            if stderr.contains("No such device or address") || backing_file(name).is_none() {
                return Ok(());
            }
            return Err(command_error(&cmd, &out, None));
        }
        // LOOP_CLR_FD on a device still in use succeeds but only marks it for auto-clear; the
        // caller must learn that the device is still there.
        // Compare with the file it had: once free, the number may at once serve another file.
        let deadline = Instant::now() + DETACH_WAIT;
        while backing_file(name).as_ref() == Some(&file) {
            if Instant::now() >= deadline {
                return Err(OsError::Busy(format!(
                    "loop device {} is still attached after detaching: something still uses it \
                     (a mount or an open file); unmount it first, the kernel then frees it",
                    dev.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn detach_file(&self, file: &Path) -> OsResult<()> {
        // Bounded: a file may carry several devices (attached by hand), never endlessly many.
        for _ in 0..64 {
            match self.find(file)? {
                Some(dev) => self.detach(&dev)?,
                None => return Ok(()),
            }
        }
        Err(OsError::Busy(format!(
            "loop devices keep appearing on {}; something else attaches them",
            file.display()
        )))
    }

    fn flush(&self, dev: &Path) -> OsResult<()> {
        let name = check_loop_device(dev)?;
        if backing_file(name).is_none() {
            return Err(OsError::NotFound(format!(
                "loop device {} is not attached; nothing to flush",
                dev.display()
            )));
        }
        // fsync of a block device writes its dirty pages and then sends a flush request, which
        // a loop device turns into an fsync of its file (the engine's export: a flush of every
        // replica). A read-only open is enough for fsync and works on read-only devices too.
        fs::File::open(dev)
            .and_then(|f| f.sync_all())
            .map_err(|e| OsError::io(format!("flushing loop device {}", dev.display()), e))
    }

    fn file_mounts(&self, file: &Path) -> OsResult<Option<Vec<PathBuf>>> {
        match self.find(file)? {
            Some(dev) => super::engine::backup::filesystem_mount(&dev).map(Some),
            None => Ok(None),
        }
    }

    fn refresh_size(&self, dev: &Path) -> OsResult<()> {
        let name = check_loop_device(dev)?;
        if backing_file(name).is_none() {
            return Err(OsError::NotFound(format!(
                "loop device {} is not attached; attach it to the volume's export first",
                dev.display()
            )));
        }
        let mut cmd = Command::new("losetup");
        cmd.arg("--set-capacity").arg(dev);
        run(&mut cmd).map(|_| ())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::os::Filesystems;
    use crate::os::fs::SysFilesystems;
    use crate::os::testutil::Cleanup;

    pub(crate) fn write_block(dev: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let mut f = fs::OpenOptions::new().write(true).open(dev)?;
        f.write_all(&[0u8; 4096])?;
        f.sync_all()
    }

    #[test]
    fn device_names() {
        assert!(check_loop_device(Path::new("/dev/loop12")).is_ok());
        assert!(matches!(
            check_loop_device(Path::new("/dev/sda")),
            Err(OsError::Unsupported(_))
        ));
        assert!(check_loop_device(Path::new("/dev/loop-control")).is_err());
    }

    #[test]
    fn real_attach_find_refresh_detach_plain_file() {
        if !crate::os::root_or_skip("real_attach_find_refresh_detach_plain_file") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk with space.img");
        fs::File::create(&file).unwrap().set_len(4 << 20).unwrap();
        let loops = Losetup::new();
        let mut cleanup = Cleanup::default();

        assert_eq!(loops.find(&file).unwrap(), None);
        let dev = loops.attach(&file).unwrap();
        cleanup.loop_file(&file);
        assert_eq!(loops.attach(&file).unwrap(), dev, "attach is idempotent");
        assert_eq!(loops.find(&file).unwrap(), Some(dev.clone()));
        let fsys = SysFilesystems::new();
        assert_eq!(fsys.device_size(&dev).unwrap(), 4 << 20);

        fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        assert_eq!(
            fsys.device_size(&dev).unwrap(),
            4 << 20,
            "kernel caches the size"
        );
        loops.refresh_size(&dev).unwrap();
        assert_eq!(fsys.device_size(&dev).unwrap(), 8 << 20);

        // Buffered writes through the device reach the file once it is flushed.
        fs::OpenOptions::new()
            .write(true)
            .open(&dev)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"flushed"))
            .unwrap();
        loops.flush(&dev).unwrap();
        assert_eq!(&fs::read(&file).unwrap()[..7], b"flushed");
        loops.detach(&dev).unwrap();
        // Idempotent by file; a second detach(dev) could hit a device another test got since.
        loops.detach_file(&file).unwrap();
        assert_eq!(loops.find(&file).unwrap(), None);
        assert!(matches!(
            loops.refresh_size(&dev),
            Err(OsError::NotFound(_))
        ));
    }

    #[test]
    fn real_read_only_file_gets_read_only_device() {
        if !crate::os::root_or_skip("real_read_only_file_gets_read_only_device") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ro.img");
        fs::File::create(&file).unwrap().set_len(1 << 20).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o400)).unwrap();
        let loops = Losetup::new();
        let mut cleanup = Cleanup::default();
        let dev = loops.attach(&file).unwrap();
        cleanup.loop_file(&file);
        let name = check_loop_device(&dev).unwrap();
        assert_eq!(
            fs::read_to_string(format!("/sys/block/{name}/ro"))
                .unwrap()
                .trim(),
            "1"
        );
        // The kernel lets a read-only device be opened for writing, but refuses every write.
        let err = write_block(&dev).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        // NodeUnstageVolume flushes every device before detaching it, read-only ones too.
        loops.flush(&dev).unwrap();
        loops.detach(&dev).unwrap();
    }

    #[test]
    fn attach_missing_file_names_it() {
        let err = Losetup::new()
            .attach(Path::new("/nonexistent/bicsi/export"))
            .unwrap_err();
        assert!(matches!(err, OsError::NotFound(_)), "{err}");
        assert!(err.to_string().contains("/nonexistent/bicsi/export"));
    }
}
