//! The checks that make a file ready and keep it so: finishing a prepared temp file (probe, the
//! image's checksum, the rename into place with `backing.cfg` and the chunk manifest), verifying
//! a ready file against the checksum (rebuilding a missing or wrong manifest), and the periodic
//! scrub that verifies every ready file at its interval. This is the one place a file becomes
//! ready; it must not fetch bytes from anywhere.

use std::path::Path;

use super::{FileManagers, FileReport, ReadyFile, read_manifest, ready_on};
use crate::error::{Error, Result};
use crate::fsutil::{blocking, write_atomic};
use crate::imagefmt;
use crate::model::backing_image::BackingImage;
use crate::model::backing_image::FileMeta;
use crate::model::file_state::FileState;
use crate::model::{Disk, checksum, manifest_path};

impl FileManagers {
    /// Checks a prepared temp file and moves it into place as the disk's ready file.
    /// `manifest`, built from the same bytes as `sha512`, is written beside the file when that
    /// SHA-512 is the image's.
    pub(super) async fn finish_file(
        &self,
        name: &str,
        disk: &Disk,
        tmp: &Path,
        sha512: String,
        size: u64,
        manifest: Option<crate::sync::Manifest>,
    ) -> Result<()> {
        let probe_path = tmp.to_path_buf();
        let header = blocking(move || {
            let header =
                imagefmt::probe(&probe_path).map_err(|e| Error::InvalidArgument(e.to_string()));
            // The probe's read (and its readahead) brought pages back into the cache that the
            // download had released: release them again.
            if let Ok(f) = std::fs::File::open(&probe_path) {
                let _ = nix::fcntl::posix_fadvise(
                    &f,
                    0,
                    0,
                    nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                );
            }
            header
        })
        .await;
        let header = match header {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_file(tmp);
                return Err(Error::FailedPrecondition(format!(
                    "backing image {name:?}: the file is not a usable disk image: {e}"
                )));
            }
        };
        let bi = self.image(name)?;
        if !checksum::matches(&bi.status.checksum, &sha512) {
            crate::counters::checksum_failure("prepared");
            let _ = std::fs::remove_file(tmp);
            return Err(Error::FailedPrecondition(format!(
                "backing image {name:?}: checksum mismatch: expected {}, got {sha512}; the file changed or is corrupt",
                bi.status.checksum
            )));
        }
        let final_path = disk.image_file(&bi);
        let meta_path = disk.image_meta(&bi);
        let dir = final_path
            .parent()
            .expect("file has a directory")
            .to_path_buf();
        let ready = ReadyFile {
            size,
            virtual_size: header.virtual_size,
            format: header.format.as_str().to_string(),
            checksum: sha512,
        };
        let meta = FileMeta {
            name: name.to_string(),
            uuid: bi.status.uuid.clone(),
            size,
            virtual_size: ready.virtual_size,
            format: ready.format.clone(),
            checksum: ready.checksum.clone(),
            source_type: bi.spec.source_type.as_str().to_string(),
        };
        let tmp = tmp.to_path_buf();
        // Only a manifest of exactly these verified bytes goes beside them.
        let manifest = manifest.filter(|m| m.sha512 == ready.checksum && m.size == size);
        blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
            // A manifest left from an earlier file of this image goes first: a manifest
            // beside a file is always that file's.
            let manifest_path = manifest_path(&final_path);
            if let Err(e) = std::fs::remove_file(&manifest_path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(Error::Internal(format!(
                    "cannot remove {}: {e}",
                    manifest_path.display()
                )));
            }
            std::fs::rename(&tmp, &final_path)
                .map_err(|e| Error::Internal(format!("cannot move the file into place: {e}")))?;
            write_atomic(&meta_path, &serde_json::to_vec_pretty(&meta)?)
                .map_err(|e| Error::Internal(format!("cannot write backing.cfg: {e}")))?;
            if let Some(m) = manifest {
                write_atomic(&manifest_path, &m.to_bytes()).map_err(|e| {
                    Error::Internal(format!("cannot write {}: {e}", manifest_path.display()))
                })?;
            }
            Ok(())
        })
        .await?;
        let mut report = FileReport::new(FileState::Ready, 100, "");
        report.ready = Some(ready);
        self.report(name, disk, report).await?;
        tracing::info!(image = %name, disk = %disk.id, size, "backing image file ready");
        Ok(())
    }
}

impl FileManagers {
    /// Checks a file against the image's checksum (SHA-512, streamed): Ready when it matches,
    /// else Failed with a message naming the disk, the mismatch and `why` it was checked.
    pub(super) async fn verify(&self, bi: &BackingImage, disk: &Disk, why: &str) -> FileReport {
        let path = disk.image_file(bi);
        self.verified
            .lock()
            .expect("verified poisoned")
            .insert((bi.dir_name(), disk.id.clone()), self.clock.now_secs());
        if !path.is_file() {
            return FileReport::new(
                FileState::Failed,
                0,
                format!(
                    "{why}: the file is missing from disk {} ({})",
                    disk.id,
                    path.display()
                ),
            );
        }
        let p = path.clone();
        let expected = bi.status.checksum.clone();
        let sum = blocking(move || {
            let (sum, manifest) =
                crate::sync::hash_sparse(&p).map_err(|e| Error::Internal(e.to_string()))?;
            // The file is verified: its manifest, built in the same pass, replaces a missing,
            // corrupt or different one.
            if !expected.is_empty()
                && checksum::matches(&expected, &sum)
                && read_manifest(&p, &sum).as_ref() != Some(&manifest)
            {
                let mp = manifest_path(&p);
                match write_atomic(&mp, &manifest.to_bytes()) {
                    Ok(()) => tracing::info!(path = %mp.display(), "rebuilt the chunk manifest of a verified file"),
                    Err(e) => tracing::warn!(path = %mp.display(), error = %e, "cannot write the chunk manifest"),
                }
            }
            Ok(sum)
        })
        .await;
        match sum {
            // A ready file's image always has its checksum: an empty one verifies nothing.
            Ok(sum)
                if !bi.status.checksum.is_empty()
                    && checksum::matches(&bi.status.checksum, &sum) =>
            {
                let mut r = FileReport::new(FileState::Ready, 100, format!("{why}: verified"));
                r.ready = Some(ReadyFile {
                    size: bi.status.size,
                    virtual_size: bi.status.virtual_size,
                    format: bi.status.format.clone(),
                    checksum: sum,
                });
                r
            }
            Ok(sum) => {
                crate::counters::checksum_failure("verify");
                FileReport::new(
                    FileState::Failed,
                    0,
                    format!(
                        "{why}: checksum mismatch on disk {}: expected {}, got {sum}; the file changed on disk",
                        disk.id, bi.status.checksum
                    ),
                )
            }
            Err(e) => FileReport::new(
                FileState::Failed,
                0,
                format!("{why}: cannot read the file on disk {}: {e}", disk.id),
            ),
        }
    }
}

impl FileManagers {
    /// The periodic scrub at a lifecycle tick: every ready file of this node not verified for
    /// `backing-image-scrub-interval` is hashed again (streamed, bounded memory); one whose
    /// bytes changed is reported failed, and recovery replaces it. Files with work running are
    /// left alone. Returns how many files were hashed.
    pub async fn scrub(&self) -> Result<usize> {
        let Some(interval) = self.settings.scrub_interval() else {
            return Ok(0);
        };
        let images = self.records.images()?;
        let mut hashed = 0;
        for bi in &images {
            for disk in &self.disks {
                if !ready_on(bi, &disk.id) {
                    continue;
                }
                let busy = self
                    .managers
                    .lock()
                    .expect("managers poisoned")
                    .get(&disk.id)
                    .is_some_and(|m| {
                        m.tasks
                            .lock()
                            .expect("tasks poisoned")
                            .contains_key(bi.name())
                    });
                let last = self
                    .verified
                    .lock()
                    .expect("verified poisoned")
                    .get(&(bi.dir_name(), disk.id.clone()))
                    .copied()
                    .unwrap_or(self.started);
                if busy || self.clock.now_secs().saturating_sub(last) < interval.as_secs() {
                    continue;
                }
                let report = self.verify(bi, disk, "scrub").await;
                hashed += 1;
                if report.state != FileState::Ready {
                    tracing::warn!(image = %bi.name(), disk = %disk.id, message = %report.message, "scrub found a changed file");
                    self.report(bi.name(), disk, report).await?;
                }
            }
        }
        Ok(hashed)
    }
}
