//! The fake `LoopDevices`: devices named `/dev/fake/loopN` that live in memory only (nothing is
//! created under /dev), read-only when the file or the engine is, `Busy` to detach while mounted.

use super::*;
use crate::os::loopdev;

/// The `Loops` part of a fake machine.
pub(super) struct FakeLoops(pub(super) Fake);

impl FakeLoops {
    fn attach_as(&self, file: &Path, force_read_only: bool) -> OsResult<PathBuf> {
        let mut w = self.0.world();

        w.fail("loops.attach")?;
        if force_read_only {
            w.called.insert("loops.attach_read_only".into());
        }
        let file = resolve_parent(file);
        if !file.exists() {
            return Err(OsError::NotFound(format!(
                "cannot attach a loop device to {}: the file is not there (is its engine running?)",
                file.display()
            )));
        }
        if let Some((i, _)) = w.loops.iter().find(|(_, l)| l.file == file) {
            return Ok(PathBuf::from(format!("{LOOP_PREFIX}{i}")));
        }
        let backing = w.backing_of(&file)?;
        let size = w.backing_size(&backing)?;
        let read_only = force_read_only
            || match backing {
                Backing::Engine { read_only, .. } => read_only,
                Backing::File(_) => fs::metadata(&file)
                    .map(|m| m.permissions().mode() & 0o222 == 0)
                    .unwrap_or(false),
            };
        let idx = (0..)
            .find(|i| !w.loops.contains_key(i))
            .expect("a free index");
        w.loops.insert(
            idx,
            LoopEntry {
                file,
                size,
                read_only,
            },
        );
        Ok(PathBuf::from(format!("{LOOP_PREFIX}{idx}")))
    }
}

impl LoopDevices for FakeLoops {
    fn attach(&self, file: &Path) -> OsResult<PathBuf> {
        self.attach_as(file, false)
    }

    fn attach_read_only(&self, file: &Path) -> OsResult<PathBuf> {
        self.attach_as(file, true)
    }

    fn find(&self, file: &Path) -> OsResult<Option<PathBuf>> {
        let mut w = self.0.world();
        w.fail("loops.find")?;
        let file = resolve_parent(file);
        Ok(w.loops
            .iter()
            .find(|(_, l)| l.file == file)
            .map(|(i, _)| PathBuf::from(format!("{LOOP_PREFIX}{i}"))))
    }

    fn detach(&self, dev: &Path) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("loops.detach")?;
        loopdev::check_loop_device(dev)?;
        // A loop device this machine never attached is not attached: nothing to do.
        let Some(idx) = World::loop_index(dev) else {
            return Ok(());
        };
        if w.mounts.iter().any(|m| m.device == Some(idx)) {
            return Err(OsError::Busy(format!(
                "loop device {} is still attached after detaching: something still uses it (a \
                 mount or an open file); unmount it first, the kernel then frees it",
                dev.display()
            )));
        }
        w.loops.remove(&idx);
        Ok(())
    }

    fn flush(&self, dev: &Path) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("loops.flush")?;
        loopdev::check_loop_device(dev)?;
        match World::loop_index(dev) {
            Some(idx) if w.loops.contains_key(&idx) => Ok(()),
            _ => Err(OsError::NotFound(format!(
                "loop device {} is not attached; nothing to flush",
                dev.display()
            ))),
        }
    }

    fn detach_file(&self, file: &Path) -> OsResult<()> {
        let file = resolve_parent(file);
        let devs: Vec<PathBuf> = {
            let mut w = self.0.world();
            w.fail("loops.detach_file")?;
            w.loops
                .iter()
                .filter(|(_, l)| l.file == file)
                .map(|(i, _)| PathBuf::from(format!("{LOOP_PREFIX}{i}")))
                .collect()
        };
        for dev in devs {
            self.detach(&dev)?;
        }
        Ok(())
    }

    fn file_mounts(&self, file: &Path) -> OsResult<Option<Vec<PathBuf>>> {
        let mut w = self.0.world();
        w.fail("loops.file_mounts")?;
        let file = resolve_parent(file);
        let Some((idx, _)) = w.loops.iter().find(|(_, l)| l.file == file) else {
            return Ok(None);
        };
        Ok(Some(
            w.mounts
                .iter()
                .filter(|m| m.device == Some(*idx) && m.bind_of.is_none())
                .map(|m| m.info.target.clone())
                .take(1)
                .collect(),
        ))
    }

    fn refresh_size(&self, dev: &Path) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("loops.refresh_size")?;
        loopdev::check_loop_device(dev)?;
        let Some((idx, l)) = w.loop_entry(dev) else {
            return Err(OsError::NotFound(format!(
                "loop device {} is not attached; attach it to the volume's export first",
                dev.display()
            )));
        };
        let file = l.file.clone();
        let backing = w.backing_of(&file)?;
        let size = w.backing_size(&backing)?;
        if let Some(l) = w.loops.get_mut(&idx) {
            l.size = size;
        }
        Ok(())
    }
}
