//! What a volume can know of a backing image before its first file is ready: the virtual size,
//! so CreateVolume answers at once and only attach waits for the file ("Longhorn starts to
//! prepare the backing images to disks for the replicas when a volume using the backing image
//! is attached to a node"). The size comes from the ready file when there is one; else from the
//! head of a download (one ranged GET: the qcow2 header, or the length of a RAW file), or from
//! the volume (or `type: bi` snapshot) an export is made of. What was learned is kept on the
//! image, and the first file must match it (`apply_report`); a mismatch fails the image with
//! both values, and its volumes refuse to attach rather than show a wrong size.
//!
//! It must not touch disks: the head is read over HTTP by [`crate::download::head`] and parsed
//! by [`crate::imagefmt::parse_header`], the same check a ready file gets.

use std::sync::Arc;
use std::time::Duration;

use super::BackingImages;
use super::object::BackingImage;
use super::state::FileState;
use crate::error::{Error, Result};
use crate::files::source::ImageSource;
use crate::imagefmt::{self, Format};
use crate::model::Volume;
use crate::store::{Kind, StoreExt};

/// How long CreateVolume waits for the head of a download; a CO's own timeout is about 10 s.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// A virtual size and where it was learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learned {
    pub virtual_size: u64,
    pub from: String,
}

/// What the head of a download says the virtual size is. `total` is the whole file's length
/// when the server said it. Errors say why no size can be known yet (Unavailable) or why the
/// file can never be a disk image (FailedPrecondition).
pub fn size_from_head(name: &str, url: &str, head: &[u8], total: Option<u64>) -> Result<Learned> {
    if let Some(c) = crate::download::Compression::detect(head) {
        // The stored image is the decompressed body: its header is in the first bytes the
        // head decompresses to, and a RAW image's length is known only at the end.
        let inner = crate::download::decode_prefix(c, head, imagefmt::PROBE_LEN);
        return match imagefmt::parse_header(&inner, u64::MAX) {
            Ok(h) if h.format == Format::Qcow2 => Ok(Learned {
                virtual_size: h.virtual_size,
                from: format!("the qcow2 header of {url} ({c}-compressed)"),
            }),
            _ => Err(Error::Unavailable(format!(
                "backing image {name:?}: {url} is {c}-compressed and its start has no qcow2 header, so the volume's size is known only when the download is done; retry then"
            ))),
        };
    }
    // A qcow2 header needs no total: its virtual size is in it. The parser checks lengths
    // against the file size, which is at least what was read when the server did not say.
    let file_size = total.unwrap_or(u64::MAX);
    match imagefmt::parse_header(head, file_size) {
        Ok(h) if h.format == Format::Qcow2 => Ok(Learned {
            virtual_size: h.virtual_size,
            from: format!("the qcow2 header of {url}"),
        }),
        Ok(_) => match total {
            Some(len) => Ok(Learned {
                virtual_size: len,
                from: format!("the length of {url} (a RAW image)"),
            }),
            None => Err(Error::Unavailable(format!(
                "backing image {name:?}: the server of {url} says neither the file's length (no Content-Length, no Content-Range total) nor has it a qcow2 header, so the volume's size is known only when the download is done; retry then"
            ))),
        },
        Err(e) => Err(Error::FailedPrecondition(format!(
            "backing image {name:?}: the start of {url} is not a usable disk image: {e}"
        ))),
    }
}

impl BackingImages {
    /// The virtual size a volume of `bi` is made for, learned now if it was not yet, and kept on
    /// the image. FailedPrecondition when the image failed for good; Unavailable, saying why,
    /// while its source gives no size.
    pub async fn virtual_size_for_volume(self: &Arc<Self>, bi: &BackingImage) -> Result<u64> {
        let name = bi.name();
        if bi.has_ready_file() {
            return Ok(bi.status.virtual_size);
        }
        self.check_not_failed(bi)?;
        if bi.status.expected_virtual_size > 0 {
            return Ok(bi.status.expected_virtual_size);
        }
        let learned = self.learn(bi).await?;
        let kept = self
            .update(name, |b| {
                // Another CreateVolume may have learned it meanwhile: the first one stands.
                if b.status.expected_virtual_size == 0 && !b.has_ready_file() {
                    b.status.expected_virtual_size = learned.virtual_size;
                    b.status.expected_virtual_size_from = learned.from.clone();
                }
                Ok(())
            })
            .await?;
        tracing::info!(image = %name, virtual_size = learned.virtual_size, from = %learned.from, "virtual size learned before the file is ready");
        Ok(if kept.has_ready_file() {
            kept.status.virtual_size
        } else {
            kept.status.expected_virtual_size
        })
    }

    /// FailedPrecondition naming the image when it has no ready file and cannot get one by
    /// itself: every file failed, or a mismatch with what was learned set its message.
    pub fn check_not_failed(&self, bi: &BackingImage) -> Result<()> {
        if bi.has_ready_file() {
            return Ok(());
        }
        if !bi.status.message.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "backing image {:?} failed: {}",
                bi.name(),
                bi.status.message
            )));
        }
        let files = &bi.status.disk_file_status_map;
        if !files.is_empty() && files.values().all(|f| f.state == FileState::Failed) {
            return Err(Error::FailedPrecondition(format!(
                "backing image {:?} failed: {}; fix its source, delete it and create it again",
                bi.name(),
                bi.describe()
            )));
        }
        Ok(())
    }

    async fn learn(&self, bi: &BackingImage) -> Result<Learned> {
        let name = bi.name();
        match super::first_file_source(&*self.store, bi)? {
            ImageSource::Download(download) => {
                let url = &download.url;
                let shown = crate::messages::redact_text(url);
                let guard = self.settings().download_guard()?;
                let credentials = self.source_credentials(bi)?;
                let (remote, access) = download.access(credentials.as_ref()).map_err(|e| {
                    Error::FailedPrecondition(format!("backing image {name:?}: {e}"))
                })?;
                let head = crate::download::head_remote(
                    url,
                    &remote,
                    imagefmt::PROBE_LEN,
                    HEAD_TIMEOUT,
                    &guard,
                    &access,
                )
                .await
                    .map_err(|e| {
                        let m = format!(
                            "backing image {name:?}: cannot learn the volume's size from the head of the download: {e}"
                        );
                        if e.is_retryable() {
                            Error::Unavailable(m)
                        } else {
                            Error::FailedPrecondition(m)
                        }
                    })?;
                size_from_head(name, &shown, &head.bytes, head.total)
            }
            ImageSource::ExportFromVolume(export) => {
                if let Some(s) = super::exported_by(&*self.store, name)? {
                    return Ok(Learned {
                        virtual_size: s.size_bytes,
                        from: format!("the size of snapshot {:?}", s.name),
                    });
                }
                let volume = &export.volume_name;
                let v: Volume = self.store.get(Kind::Volume, &export.volume_id)?.ok_or_else(|| {
                    Error::Unavailable(format!(
                        "backing image {name:?}: volume {volume:?} to export does not exist, so the size of volumes made from the image is not known; create that volume"
                    ))
                })?;
                Ok(Learned {
                    virtual_size: v.spec.capacity_bytes,
                    from: format!("the size of volume {volume:?}"),
                })
            }
            ImageSource::Restore(restore) => {
                let url = &restore.backup_url;
                let (target_url, image) = crate::backup::image::parse_backup_url(url)?;
                let creds = self.settings().backup_credential_file()?;
                let target = crate::backup::Target::open(&target_url, creds.as_deref())?;
                let meta = crate::backup::image::get_meta(&target, &image)
                    .await?
                    .ok_or_else(|| {
                        Error::FailedPrecondition(format!(
                            "backing image {name:?}: {url} names no backed-up image"
                        ))
                    })?;
                Ok(Learned {
                    virtual_size: meta.virtual_size,
                    from: format!("the backup of the image in {target_url}"),
                })
            }
            ImageSource::Upload => Err(Error::Unavailable(format!(
                "backing image {name:?} waits for its upload, so the size of volumes made from it is not known yet; upload the file (bicsi image upload {name} FILE)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2_header(size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h
    }

    #[test]
    fn sizes_from_heads() {
        type Case = (
            &'static str,
            Vec<u8>,
            Option<u64>,
            Result<u64, (tonic::Code, &'static str)>,
        );
        let table: Vec<Case> = vec![
            (
                "raw with a length",
                vec![1u8; 4096],
                Some(10 << 20),
                Ok(10 << 20),
            ),
            (
                "qcow2 with a length",
                qcow2_header(64 << 20),
                Some(200_000),
                Ok(64 << 20),
            ),
            (
                "qcow2 without a length",
                qcow2_header(64 << 20),
                None,
                Ok(64 << 20),
            ),
            (
                "raw without a length",
                vec![1u8; 4096],
                None,
                Err((tonic::Code::Unavailable, "neither the file's length")),
            ),
            // A compressed body is stored decompressed (issue 20): a qcow2 inside is sized from
            // its header; a RAW image inside only when the download is done.
            (
                "gzip of a raw image",
                vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0],
                Some(1000),
                Err((tonic::Code::Unavailable, "gzip-compressed")),
            ),
            (
                "xz of a qcow2 image, the head cut mid-stream",
                {
                    let mut z = Vec::new();
                    let mut e = liblzma::write::XzEncoder::new(&mut z, 1);
                    std::io::Write::write_all(&mut e, &qcow2_header(64 << 20)).unwrap();
                    std::io::Write::write_all(&mut e, &vec![0u8; 1 << 20]).unwrap();
                    e.finish().unwrap();
                    z.truncate(z.len() - 20);
                    z
                },
                Some(1000),
                Ok(64 << 20),
            ),
            (
                "zip",
                b"PK\x03\x04 rest".to_vec(),
                Some(1000),
                Err((tonic::Code::FailedPrecondition, "zip archive")),
            ),
            (
                "truncated qcow2",
                qcow2_header(1 << 20)[..50].to_vec(),
                Some(50),
                Err((tonic::Code::FailedPrecondition, "qcow2 header")),
            ),
        ];
        for (what, head, total, want) in table {
            let got = size_from_head("img", "http://127.0.0.1/x", &head, total);
            match (got, want) {
                (Ok(l), Ok(size)) => assert_eq!(l.virtual_size, size, "{what}"),
                (Err(e), Err((code, needle))) => {
                    assert_eq!(e.code(), code, "{what}: {e}");
                    assert!(e.to_string().contains(needle), "{what}: {e}");
                    assert!(e.to_string().contains("\"img\""), "{what}: {e}");
                }
                (got, want) => panic!("{what}: got {got:?}, wanted {want:?}"),
            }
        }
    }
}
