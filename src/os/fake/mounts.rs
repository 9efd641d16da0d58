//! The fake `Mounter`: mounts and binds kept in memory, their targets created on disk as the real
//! one does (with its `ensure_target`), idempotent and `Conflict` by the real rules.

use super::*;
use crate::os::mount::{check_bind_source, ensure_target};

/// The `Mounter` part of a fake machine.
pub(super) struct FakeMounter(pub(super) Fake);

impl Mounter for FakeMounter {
    fn mount(
        &self,
        source: &Path,
        target: &Path,
        fstype: &str,
        options: &[String],
    ) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("mounts.mount")?;
        let target = resolve_parent(target);
        let source_name = source.display().to_string();
        if let Some(top) = w.top_mount(&target) {
            if top.bind_of.is_none() && top.info.source == source_name {
                return Ok(());
            }
            return Err(OsError::Conflict(format!(
                "cannot mount {} on {}: {} ({}) is already mounted there; unmount it first",
                source.display(),
                target.display(),
                top.info.source,
                top.info.fstype
            )));
        }
        let (backing, dev_ro) = w.device_backing(source).map_err(|_| {
            OsError::NotFound(format!(
                "cannot mount {} on {}: the device does not exist (is its loop device attached?)",
                source.display(),
                target.display()
            ))
        })?;
        let found = w.device_fs(source)?;
        if found.as_ref().map(|f| f.fstype.as_str()) != Some(fstype) {
            return Err(OsError::Command {
                cmd: format!(
                    "mount -t {fstype} -- {} {}",
                    source.display(),
                    target.display()
                ),
                stderr: format!(
                    "mount: {}: wrong fs type, bad option, bad superblock on {}, missing codepage \
                     or helper program, or other error.",
                    target.display(),
                    source.display()
                ),
            });
        }
        ensure_target(&target, true)?;
        let engine_ro = matches!(
            backing,
            Backing::Engine {
                read_only: true,
                ..
            }
        );
        // As mount(8) does on a write-protected device: fall back to read-only.
        let read_only = dev_ro || engine_ro || options.iter().any(|o| o == "ro");
        let mut opts = vec![if read_only { "ro" } else { "rw" }.to_string()];
        for o in options {
            let o = o.trim();
            if !o.is_empty() && o != "ro" && o != "rw" && !opts.iter().any(|x| x == o) {
                opts.push(o.to_string());
            }
        }
        w.mounts.push(MountEntry {
            info: MountInfo {
                source: source_name,
                target,
                fstype: fstype.to_string(),
                options: opts,
            },
            device: World::loop_index(source),
            bind_of: None,
            read_only,
        });
        Ok(())
    }

    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("mounts.bind_mount")?;
        let target = resolve_parent(target);
        let source_key = resolve_parent(source);
        // What is bound: a fake device node, a fake mount, or a plain path.
        let (info_source, fstype, device, is_dir) = if let Some((idx, _)) = w.loop_entry(source) {
            (
                "devtmpfs".to_string(),
                "devtmpfs".to_string(),
                Some(idx),
                false,
            )
        } else if let Some(m) = w.top_mount(&source_key) {
            (m.info.source.clone(), m.info.fstype.clone(), m.device, true)
        } else {
            let meta = check_bind_source(source, &target)?;
            ("none".to_string(), "none".to_string(), None, meta.is_dir())
        };
        if let Some(top) = w.top_mount(&target) {
            if top.bind_of.as_deref() == Some(source_key.as_path()) && top.read_only == read_only {
                return Ok(());
            }
            return Err(OsError::Conflict(format!(
                "cannot bind-mount {} on {} ({}): {} ({}) is already mounted there; unmount it \
                 first",
                source.display(),
                target.display(),
                if read_only { "read-only" } else { "read-write" },
                top.info.source,
                if top.read_only {
                    "read-only"
                } else {
                    "read-write"
                },
            )));
        }
        ensure_target(&target, is_dir)?;
        w.mounts.push(MountEntry {
            info: MountInfo {
                source: info_source,
                target,
                fstype,
                options: vec![if read_only { "ro" } else { "rw" }.to_string()],
            },
            device,
            bind_of: Some(source_key),
            read_only,
        });
        Ok(())
    }

    fn unmount(&self, target: &Path) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("mounts.unmount")?;
        let target = resolve_parent(target);
        w.mounts.retain(|m| m.info.target != target);
        Ok(())
    }

    fn mount_info(&self, target: &Path) -> OsResult<Option<MountInfo>> {
        let mut w = self.0.world();
        w.fail("mounts.mount_info")?;
        Ok(w.top_mount(&resolve_parent(target)).map(|m| m.info.clone()))
    }

    fn mounts_of(&self, device: &Path) -> OsResult<Vec<PathBuf>> {
        let mut w = self.0.world();
        w.fail("mounts.mounts_of")?;
        let Some(index) = World::loop_index(device) else {
            return Ok(Vec::new());
        };
        let mut found: Vec<PathBuf> = w
            .mounts
            .iter()
            .filter(|m| m.device == Some(index))
            .map(|m| m.info.target.clone())
            .collect();
        found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        found.dedup();
        Ok(found)
    }
}
