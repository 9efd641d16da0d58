//! The first file of an image, made on one disk from the image's data source: a download from
//! its URL (going on from a partial file an earlier process left, when the server offers the
//! same file) or an export of a volume ([`super::export`]). An upload is the third source and has
//! its own module ([`super::upload`]). It reports starting, progress and the outcome, and says
//! whether a failure is permanent (the same bytes would come again). It must not copy files
//! between disks or nodes (that is [`super::sync`]) nor decide that a file is ready: every file
//! goes through [`FileManagers::finish_file`].

use std::sync::Arc;
use std::sync::atomic::AtomicU8;

use tokio_util::sync::CancellationToken;

use super::progress::percent_sink;
use super::source::ImageSource;
use super::{FileManagers, FileReport};
use crate::download::{self, DownloadRequest};
use crate::error::{Error, Result};
use crate::messages::redact_text;
use crate::model::Disk;
use crate::model::file_state::FileState;

/// Why a first file failed, and whether its source failed for good (see
/// [`FileReport::permanent`]).
struct SourceFailure {
    error: Error,
    permanent: bool,
}

impl From<Error> for SourceFailure {
    fn from(error: Error) -> Self {
        SourceFailure {
            error,
            permanent: false,
        }
    }
}

impl FileManagers {
    /// Starts preparing the image's first file on `disk_id` from its data source, as the
    /// records give it (work a node starts again by itself).
    pub fn prepare_first_file(self: &Arc<Self>, image: &str, disk_id: &str) -> Result<()> {
        self.prepare_first_file_with(image, disk_id, None, None)
    }

    /// [`Self::prepare_first_file`] from `source` as the controller's request carries it
    /// (`None`: as the records give it), with the values of the Secret and ConfigMap the
    /// source names, as the controller read them (kept in memory only, for this download).
    pub fn prepare_first_file_with(
        self: &Arc<Self>,
        image: &str,
        disk_id: &str,
        source: Option<ImageSource>,
        credentials: Option<crate::download::Credentials>,
    ) -> Result<()> {
        let disk = self.disk(disk_id)?.clone();
        let name = image.to_string();
        let d = disk.clone();
        self.spawn(image, &disk, move |this, cancel| {
            Box::pin(async move {
                match this
                    .first_file(&name, &d, source, credentials.as_ref(), cancel.clone())
                    .await
                {
                    Err(f) if f.permanent && !cancel.is_cancelled() => {
                        tracing::warn!(image = %name, disk = %d.id, error = %f.error, "backing image file failed; its source is retried with a growing backoff");
                        let mut report = FileReport::new(FileState::Failed, 0, f.error.to_string());
                        report.permanent = true;
                        this.report(&name, &d, report).await
                    }
                    r => r.map_err(|f| f.error),
                }
            })
        });
        Ok(())
    }

    async fn first_file(
        &self,
        name: &str,
        disk: &Disk,
        source: Option<ImageSource>,
        credentials: Option<&crate::download::Credentials>,
        cancel: CancellationToken,
    ) -> Result<(), SourceFailure> {
        let bi = self.image(name)?;
        let source = match source {
            Some(s) => s,
            None => self.records.source(&bi)?,
        };
        let mut transfer = crate::counters::Transfer::start(
            crate::counters::TransferKind::of_source(source.source_type()),
        );
        self.report(
            name,
            disk,
            FileReport::new(FileState::Starting, 0, "starting"),
        )
        .await?;
        let tmp = disk.image_tmp(&bi);
        if !matches!(source, ImageSource::Download(_)) {
            // A download goes on with a partial file an earlier process left, if it can.
            let _ = std::fs::remove_file(&tmp);
        }
        let progress = Arc::new(AtomicU8::new(0));
        let (sha512, size, manifest) = match &source {
            ImageSource::Download(download) => {
                let url = download.url.clone();
                let message = format!("downloading {}", redact_text(&url));
                self.report(
                    name,
                    disk,
                    FileReport::new(FileState::InProgress, 0, &message),
                )
                .await?;
                let mut req = DownloadRequest::new(url, tmp.clone());
                req.expected_sha512 =
                    (!bi.status.checksum.is_empty()).then(|| bi.status.checksum.clone());
                req.resume = true;
                (req.remote, req.access) =
                    download.access(credentials).map_err(|e| SourceFailure {
                        permanent: false,
                        error: Error::FailedPrecondition(format!("backing image {name:?}: {e}")),
                    })?;
                req.source_checksum = download.source_checksum.clone();
                req.guard = self.settings.download_guard().map_err(|e| SourceFailure {
                    permanent: true,
                    error: Error::FailedPrecondition(format!("backing image {name:?}: {e}")),
                })?;
                let sink = percent_sink(progress.clone());
                let work = download::download(&req, &sink, cancel.clone());
                let outcome = self
                    .with_progress(name, disk, &progress, &message, work)
                    .await
                    .map_err(|e| {
                        if matches!(e, download::DownloadError::ChecksumMismatch { .. }) {
                            crate::counters::checksum_failure("download");
                        }
                        SourceFailure {
                            permanent: e.is_permanent(),
                            error: Error::Unavailable(format!("backing image {name:?}: {e}")),
                        }
                    })?;
                transfer.moved(outcome.size - outcome.kept);
                if outcome.kept > 0 {
                    tracing::info!(image = %name, disk = %disk.id, kept = outcome.kept, "download went on from the partial file of an earlier process");
                }
                (outcome.sha512, outcome.size, Some(outcome.manifest))
            }
            ImageSource::ExportFromVolume(export) => {
                self.report(
                    name,
                    disk,
                    FileReport::new(FileState::InProgress, 0, "exporting"),
                )
                .await?;
                self.export_volume(&bi, export, &tmp).await?
            }
            ImageSource::Upload => {
                return Err(Error::FailedPrecondition(format!(
                    "backing image {name:?} is uploaded, not prepared by bicsi"
                ))
                .into());
            }
            ImageSource::Restore(restore) => {
                let url = restore.backup_url.clone();
                let message = format!("restoring from {url}");
                self.report(
                    name,
                    disk,
                    FileReport::new(FileState::InProgress, 0, &message),
                )
                .await?;
                let creds = self.settings.backup_credential_file().unwrap_or_default();
                let work =
                    crate::backup::image::restore_image_file(&url, creds, &tmp, progress.clone());
                let (sha512, size) = self
                    .with_progress(name, disk, &progress, &message, work)
                    .await?;
                (sha512, size, None)
            }
        };
        let download = matches!(source, ImageSource::Download(_));
        if !download {
            transfer.moved(size);
        }
        self.finish_file(name, disk, &tmp, sha512, size, manifest)
            .await
            .map(|()| transfer.ok(size))
            .map_err(|error| SourceFailure {
                // The same bytes would come again: not a disk image, or the wrong checksum.
                permanent: download && matches!(error, Error::FailedPrecondition(_)),
                error,
            })
    }
}
