//! The disks of this node: directories given with `--disk`, each with a stable id kept in
//! `<disk>/disk.json` so a disk keeps its identity when its path or the node's state changes.
//! The layout under a disk (`replicas/`, `backing-images/`, `snapshots/`, `tmp/`) is computed
//! in one place, `model::Disk`'s methods.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::write_atomic;
use crate::model::Disk;

#[derive(Serialize, Deserialize)]
struct DiskMeta {
    id: String,
}

/// Opens a disk directory, creating it and its id on first use.
pub fn open_disk(node_id: &str, path: &Path) -> Result<Disk> {
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::Internal(format!("current directory: {e}")))?
            .join(path)
    };
    for sub in Disk::DIRS {
        std::fs::create_dir_all(path.join(sub)).map_err(|e| {
            Error::FailedPrecondition(format!(
                "disk {}: cannot create {sub}/: {e}; check that the path is writable",
                path.display()
            ))
        })?;
    }
    let meta_path = path.join("disk.json");
    let id = match std::fs::read(&meta_path) {
        Ok(bytes) => {
            let meta: DiskMeta = serde_json::from_slice(&bytes).map_err(|e| {
                Error::FailedPrecondition(format!(
                    "disk {}: disk.json is corrupt ({e}); restore it or remove it to give the disk a new id",
                    path.display()
                ))
            })?;
            meta.id
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
            let bytes = serde_json::to_vec(&DiskMeta { id: id.clone() })?;
            write_atomic(&meta_path, &bytes).map_err(|e| {
                Error::FailedPrecondition(format!(
                    "disk {}: cannot write disk.json: {e}",
                    path.display()
                ))
            })?;
            id
        }
        Err(e) => {
            return Err(Error::FailedPrecondition(format!(
                "disk {}: cannot read disk.json: {e}",
                path.display()
            )));
        }
    };
    Ok(Disk {
        id,
        node_id: node_id.to_string(),
        path,
    })
}

/// Bytes available to bicsi on the filesystem that holds `path`.
pub fn free_bytes(path: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| Error::Internal(format!("statvfs {}: {e}", path.display())))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Where a qcow2 replica of `volume_id` lives on `disk` (`Disk::replica_file`).
pub fn replica_path(disk: &Disk, volume_id: &str, replica_id: &str) -> PathBuf {
    disk.replica_file(volume_id, replica_id, crate::os::ImageFormat::Qcow2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_id_is_stable_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let a = open_disk("n1", dir.path()).unwrap();
        let b = open_disk("n1", dir.path()).unwrap();
        assert_eq!(a.id, b.id);
        assert!(dir.path().join("replicas").is_dir());
        assert!(dir.path().join("tmp").is_dir());
    }

    #[test]
    fn corrupt_disk_meta_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("disk.json"), b"not json").unwrap();
        let err = open_disk("n1", dir.path()).err().unwrap();
        assert!(err.to_string().contains("disk.json is corrupt"), "{err}");
    }
}
