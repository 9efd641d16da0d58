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
use super::{FileManagers, FileReport, tmp_path};
use crate::backing::object::SourceType;
use crate::backing::state::FileState;
use crate::download::{self, DownloadRequest};
use crate::error::{Error, Result};
use crate::messages::redact_text;
use crate::model::Disk;

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
    /// Starts preparing the image's first file on `disk_id` from its data source.
    pub fn prepare_first_file(self: &Arc<Self>, image: &str, disk_id: &str) -> Result<()> {
        self.prepare_first_file_with(image, disk_id, None)
    }

    /// [`Self::prepare_first_file`] with the values of the Secret and ConfigMap the image's
    /// source names, as the controller read them (kept in memory only, for this download).
    pub fn prepare_first_file_with(
        self: &Arc<Self>,
        image: &str,
        disk_id: &str,
        credentials: Option<crate::download::Credentials>,
    ) -> Result<()> {
        let disk = self.disk(disk_id)?.clone();
        let name = image.to_string();
        let d = disk.clone();
        self.spawn(image, &disk, move |this, cancel| {
            Box::pin(async move {
                match this
                    .first_file(&name, &d, credentials.as_ref(), cancel.clone())
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
        credentials: Option<&crate::download::Credentials>,
        cancel: CancellationToken,
    ) -> Result<(), SourceFailure> {
        let bi = self.image(name)?;
        let mut transfer = crate::metrics::Transfer::start(
            crate::metrics::TransferKind::of_source(bi.spec.source_type),
        );
        self.report(
            name,
            disk,
            FileReport::new(FileState::Starting, 0, "starting"),
        )
        .await?;
        let tmp = tmp_path(disk, &bi);
        if bi.spec.source_type != SourceType::Download {
            // A download goes on with a partial file an earlier process left, if it can.
            let _ = std::fs::remove_file(&tmp);
        }
        let progress = Arc::new(AtomicU8::new(0));
        let (sha512, size, manifest) = match bi.spec.source_type {
            SourceType::Download => {
                let url = bi.spec.source_parameters["url"].clone();
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
                (req.remote, req.access) = crate::backing::object::download_source(
                    &bi.spec.source_parameters,
                    credentials,
                )
                .map_err(|e| SourceFailure {
                    permanent: false,
                    error: Error::FailedPrecondition(format!("backing image {name:?}: {e}")),
                })?;
                req.source_checksum = bi
                    .spec
                    .source_parameters
                    .get("sourceChecksum")
                    .map(|c| download::SourceChecksum::parse(c))
                    .transpose()
                    .map_err(|e| SourceFailure {
                        permanent: true,
                        error: Error::FailedPrecondition(format!("backing image {name:?}: {e}")),
                    })?;
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
                            crate::metrics::checksum_failure("download");
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
            SourceType::ExportFromVolume => {
                self.report(
                    name,
                    disk,
                    FileReport::new(FileState::InProgress, 0, "exporting"),
                )
                .await?;
                self.export_volume(&bi, &tmp).await?
            }
            SourceType::Upload => {
                return Err(Error::FailedPrecondition(format!(
                    "backing image {name:?} is uploaded, not prepared by bicsi"
                ))
                .into());
            }
            SourceType::Restore => {
                let url = bi.spec.source_parameters["backup-url"].clone();
                let message = format!("restoring from {url}");
                self.report(
                    name,
                    disk,
                    FileReport::new(FileState::InProgress, 0, &message),
                )
                .await?;
                let creds = self
                    .settings
                    .text(crate::settings::BACKUP_TARGET_CREDENTIAL_FILE)
                    .unwrap_or_default();
                let creds = (!creds.is_empty()).then(|| std::path::PathBuf::from(creds));
                let work =
                    crate::backup::image::restore_image_file(&url, creds, &tmp, progress.clone());
                let (sha512, size) = self
                    .with_progress(name, disk, &progress, &message, work)
                    .await?;
                (sha512, size, None)
            }
        };
        let download = bi.spec.source_type == SourceType::Download;
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
