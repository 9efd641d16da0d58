//! The export data source: a volume's content at one point in time becomes an image's first file
//! (a `type: bi` snapshot's image from that snapshot's file, an attached volume from a
//! point-in-time copy its engine makes, a detached one from its replica, a never-written one
//! from an overlay over its image). It converts and hashes; it must not write the volume or its
//! replicas, nor move the result into place (that is [`FileManagers::finish_file`]).

use std::path::{Path, PathBuf};

use super::source::{ExportSource, ExportedSnapshot};
use super::{FileManagers, ready_on};
use crate::error::{Error, Result};
use crate::fsutil::blocking;
use crate::model::Volume;
use crate::model::backing_image::BackingImage;
use crate::os::ImageFormat;

impl FileManagers {
    /// Exports a volume's content at one point in time (its replica with its backing chain,
    /// flattened, sparse): a `type: bi` snapshot's image from that snapshot's file, an attached
    /// volume from a point-in-time copy its engine makes, a detached one from its replica.
    pub(super) async fn export_volume(
        &self,
        bi: &BackingImage,
        source: &ExportSource,
        tmp: &Path,
    ) -> Result<(String, u64, Option<crate::sync::Manifest>)> {
        let vol_name = &source.volume_name;
        let format = source.format;
        if let Some(snapshot) = &source.snapshot {
            let file = self.snapshot_file(bi, snapshot)?;
            return self.convert(file, tmp, format, None).await;
        }
        let volume: Volume = self.records.volume(&source.volume_id)?.ok_or_else(|| {
            Error::NotFound(format!(
                "backing image {:?}: volume {vol_name:?} to export does not exist",
                bi.name()
            ))
        })?;
        let replica = volume
            .replicas
            .iter()
            .find(|r| r.node_id == self.node_id && !r.deferred && r.path.is_file())
            .cloned();
        let Some(replica) = replica else {
            return self.export_unwritten(bi, &volume, tmp, format).await;
        };
        // A copy-on-write replica is never handed to qemu: its view is captured into a raw
        // file first (`snapshot::capture`), attached or not.
        let cow = replica.format == ImageFormat::Cow;
        match &volume.publication {
            None if !cow => return self.convert(replica.path, tmp, format, None).await,
            // A cow replica is attached only on its own node (this one).
            Some(p) if p.node_id != self.node_id && !cow => {
                return Err(Error::FailedPrecondition(format!(
                    "backing image {:?}: volume {vol_name:?} is attached to node {:?} and its replica here is written over the network; export it while it is detached, or from a snapshot (type: bi) in the all-in-one mode",
                    bi.name(),
                    p.node_id
                )));
            }
            _ => {}
        }
        // The engine copies the replica's own clusters as they are now, over the same backing
        // file; the conversion then reads that copy, which no one writes.
        let backing = match &volume.spec.backing_image {
            Some(name) => {
                let image = self.image(name)?;
                let disk = self.disk(&replica.disk_id)?;
                let format = ImageFormat::parse(&image.status.format).ok_or_else(|| {
                    Error::Internal(format!("backing image {name:?} has no known format"))
                })?;
                Some((disk.image_file(&image), format))
            }
            None => None,
        };
        let pit = crate::snapshot::snapshot_format(replica.format);
        let point = tmp.with_extension(format!("pit.{}", pit.extension()));
        self.convert(replica.path, tmp, format, Some((point, backing)))
            .await
    }

    /// The file of the snapshot an image is exported from, on one of this node's disks.
    fn snapshot_file(&self, bi: &BackingImage, snapshot: &ExportedSnapshot) -> Result<PathBuf> {
        snapshot
            .files
            .iter()
            .find(|f| self.disks.iter().any(|d| d.id == f.disk_id) && f.path.is_file())
            .map(|f| f.path.clone())
            .ok_or_else(|| {
                let nodes: Vec<&str> = snapshot.files.iter().map(|f| f.node_id.as_str()).collect();
                Error::FailedPrecondition(format!(
                    "backing image {:?} is exported from snapshot {:?}, whose files are on node(s) {nodes:?}, not on the disks of this node; delete the snapshot and take it again so the image is prepared where its files are",
                    bi.name(),
                    snapshot.name
                ))
            })
    }

    /// Exports a volume that was never attached (made while its image's file was on its way,
    /// its replicas deferred): its content is the image's at the volume's size, so a temporary
    /// overlay of that size over this node's ready file of the image is converted.
    async fn export_unwritten(
        &self,
        bi: &BackingImage,
        volume: &Volume,
        tmp: &Path,
        format: ImageFormat,
    ) -> Result<(String, u64, Option<crate::sync::Manifest>)> {
        let no_file = || {
            Error::FailedPrecondition(format!(
                "backing image {:?}: volume {:?} has no replica file on node {:?}",
                bi.name(),
                volume.spec.name,
                self.node_id
            ))
        };
        let never_attached = volume.publication.is_none()
            && volume
                .replicas
                .iter()
                .all(|r| r.deferred && !r.path.exists());
        let Some(image_name) = volume
            .spec
            .backing_image
            .as_ref()
            .filter(|_| never_attached)
        else {
            return Err(no_file());
        };
        let image = self.image(image_name)?;
        let Some(disk) = self
            .disks
            .iter()
            .find(|d| ready_on(&image, &d.id) && d.image_file(&image).is_file())
        else {
            return Err(Error::Unavailable(format!(
                "backing image {:?}: volume {:?} has not been written and its backing image {image_name:?} has no ready file on node {:?} yet; the export is tried again",
                bi.name(),
                volume.spec.name,
                self.node_id
            )));
        };
        let backing = disk.image_file(&image);
        let backing_format = ImageFormat::parse(&image.status.format).ok_or_else(|| {
            Error::Internal(format!("backing image {image_name:?} has no known format"))
        })?;
        let overlay = tmp.with_extension("unwritten.qcow2");
        let (os, o, size) = (self.os.clone(), overlay.clone(), volume.spec.capacity_bytes);
        blocking(move || {
            let _ = std::fs::remove_file(&o);
            Ok(os
                .images
                .create_replica(&o, size, Some((&backing, backing_format)))?)
        })
        .await?;
        let converted = self.convert(overlay.clone(), tmp, format, None).await;
        let _ = std::fs::remove_file(&overlay);
        converted
    }

    /// Converts `source` into `tmp` (standalone, sparse) and hashes it (SHA-512 and, in the same
    /// pass, its manifest); with `point`, `source` is first captured there at one instant (over
    /// the given backing file) and converted from that copy, which is removed after.
    async fn convert(
        &self,
        source: PathBuf,
        tmp: &Path,
        format: ImageFormat,
        point: Option<(PathBuf, Option<(PathBuf, ImageFormat)>)>,
    ) -> Result<(String, u64, Option<crate::sync::Manifest>)> {
        let os = self.os.clone();
        let tmp = tmp.to_path_buf();
        blocking(move || {
            let from = match &point {
                Some((copy, backing)) => {
                    let b = backing.as_ref().map(|(p, f)| (p.as_path(), *f));
                    crate::snapshot::capture(&os, &source, copy, b)?;
                    copy.clone()
                }
                None => source,
            };
            let converted = os
                .images
                .convert(&from, ImageFormat::of_file(&from), &tmp, format);
            if let Some((copy, _)) = &point {
                let _ = std::fs::remove_file(copy);
            }
            converted?;
            let (sha, manifest) = crate::sync::hash_sparse(&tmp)
                .map_err(|e| Error::Internal(format!("hashing the export: {e}")))?;
            Ok((sha, manifest.size, Some(manifest)))
        })
        .await
    }
}
