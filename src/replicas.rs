//! Replica files: creating, removing, growing and checking the qcow2 files that hold a volume's
//! data on the disks. The controller decides where replicas go; this seam does the file work, so
//! that the all-in-one mode (local disks) and the split mode (disks behind node agents) share the
//! controller's logic.

use std::path::Path;
use std::sync::Arc;

use crate::disks;
use crate::error::{Error, Result};
use crate::model::{Disk, Replica};
use crate::os::{ImageFormat, Os};

/// A disk that can take replicas, with the bytes it has free.
#[derive(Clone, Debug)]
pub struct DiskSpace {
    pub disk: Disk,
    pub free_bytes: u64,
}

/// File operations on replicas, wherever their disks are. Blocking: call from the blocking pool.
pub trait ReplicaFiles: Send + Sync {
    fn disks(&self) -> Result<Vec<DiskSpace>>;
    /// Creates an empty replica of `size` bytes, or an overlay on a backing file (an absolute
    /// path on the replica's own disk). Idempotent.
    fn create(
        &self,
        replica: &Replica,
        size: u64,
        backing: Option<(&Path, ImageFormat)>,
    ) -> Result<()>;
    /// Creates `replica` as a copy of `source`'s data (sparse: holes stay holes).
    fn copy(&self, source: &Replica, replica: &Replica) -> Result<()>;
    /// Removes the replica's directory. Ok when it is already gone.
    fn delete(&self, replica: &Replica) -> Result<()>;
    fn exists(&self, replica: &Replica) -> Result<bool>;
    /// Grows the replica to `size` bytes (offline).
    fn resize(&self, replica: &Replica, size: u64) -> Result<()>;
}

/// Replicas on this node's own disks.
pub struct LocalReplicas {
    pub disks: Vec<Disk>,
    pub os: Os,
}

impl LocalReplicas {
    pub fn new(disks: Vec<Disk>, os: Os) -> Arc<LocalReplicas> {
        Arc::new(LocalReplicas { disks, os })
    }
}

fn replica_dir(replica: &Replica) -> &Path {
    replica.path.parent().unwrap_or(Path::new("/"))
}

impl ReplicaFiles for LocalReplicas {
    fn disks(&self) -> Result<Vec<DiskSpace>> {
        self.disks
            .iter()
            .map(|d| {
                Ok(DiskSpace {
                    disk: d.clone(),
                    free_bytes: disks::free_bytes(&d.path)?,
                })
            })
            .collect()
    }

    fn create(
        &self,
        replica: &Replica,
        size: u64,
        backing: Option<(&Path, ImageFormat)>,
    ) -> Result<()> {
        std::fs::create_dir_all(replica_dir(replica)).map_err(|e| {
            Error::Internal(format!(
                "replica {}: cannot create {}: {e}",
                replica.id,
                replica_dir(replica).display()
            ))
        })?;
        self.os
            .images
            .create_replica(&replica.path, size, backing)?;
        Ok(())
    }

    fn copy(&self, source: &Replica, replica: &Replica) -> Result<()> {
        let dir = replica_dir(replica);
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::Internal(format!(
                "replica {}: cannot create {}: {e}",
                replica.id,
                dir.display()
            ))
        })?;
        let tmp = dir.join("volume.qcow2.part");
        let out = std::process::Command::new("cp")
            .args(["--sparse=always", "--reflink=auto"])
            .arg(&source.path)
            .arg(&tmp)
            .output()
            .map_err(|e| Error::Internal(format!("cp: {e}")))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Internal(format!(
                "copying replica {} to {}: {}",
                source.path.display(),
                replica.path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        std::fs::rename(&tmp, &replica.path)
            .map_err(|e| Error::Internal(format!("replica {}: {e}", replica.id)))
    }

    fn delete(&self, replica: &Replica) -> Result<()> {
        match std::fs::remove_dir_all(replica_dir(replica)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Internal(format!(
                "replica {}: cannot remove {}: {e}",
                replica.id,
                replica_dir(replica).display()
            ))),
        }
    }

    fn exists(&self, replica: &Replica) -> Result<bool> {
        Ok(replica.path.is_file())
    }

    fn resize(&self, replica: &Replica, size: u64) -> Result<()> {
        self.os.images.resize(&replica.path, size)?;
        Ok(())
    }
}
