//! Backing images in the backup target, so a restore works where the image does not exist: the
//! image's file (its bytes as they are, raw or qcow2, whose SHA-512 is the image's checksum) in
//! blocks of [`IMAGE_BLOCK_SIZE`], each stored once by its SHA-256, zstd-compressed, zero blocks
//! left out, with its metadata (name, SHA-512, size, format, source) put last. A BackingImage of
//! source type `restore` brings the file back (`backup-url`: `TARGET#NAME`), every block checked
//! against its hash and the whole file against its SHA-512 before it becomes ready.
//!
//! ```text
//! backingimages/<name>/image.json
//! backingimages/<name>/blocks/<h[0..2]>/<h>.zst
//! ```
//!
//! This module does the file and target work; it must not touch records (the controller and the
//! file managers pass what they need).

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::blocks::{UPLOADS, sha256_hex};
use super::layout::{self, BlockRef};
use super::target::Target;
use crate::error::{Error, Result};

pub const IMAGE_BLOCK_SIZE: u64 = 2 << 20;
/// The `sourceParameters` key of a BackingImage of source type `restore`.
pub const BACKUP_URL: &str = "backup-url";

pub fn image_key(name: &str) -> String {
    format!("backingimages/{name}/image.json")
}

pub fn image_block_key(name: &str, hash: &str) -> String {
    format!("backingimages/{name}/blocks/{}/{hash}.zst", &hash[..2])
}

/// `TARGET#NAME`: where a backed-up image is, as a `restore` BackingImage names it.
pub fn backup_url(target: &str, name: &str) -> String {
    format!("{target}#{name}")
}

/// Splits a `backup-url` into the target URL and the image's name in it.
pub fn parse_backup_url(url: &str) -> Result<(String, String)> {
    let (target, name) = url.rsplit_once('#').ok_or_else(|| {
        Error::InvalidArgument(format!(
            "backup-url {url:?} has no image name; use TARGET#NAME, e.g. file:///mnt/backups#ubuntu"
        ))
    })?;
    super::target::TargetUrl::parse(target)?;
    layout::check_name("backing image", name)?;
    Ok((target.to_string(), name.to_string()))
}

/// A backing image as the target keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageMeta {
    pub format: u32,
    pub name: String,
    /// SHA-512 of the whole file.
    pub checksum: String,
    /// Bytes of the file.
    pub size: u64,
    pub virtual_size: u64,
    /// raw or qcow2.
    pub image_format: String,
    pub source_type: String,
    #[serde(default)]
    pub source_parameters: std::collections::BTreeMap<String, String>,
    pub block_size: u64,
    /// The non-zero blocks of the file.
    pub blocks: Vec<BlockRef>,
    pub uploaded_bytes: u64,
    pub created: String,
}

/// Reads the image metadata at `name`, None when the target has none.
pub async fn get_meta(target: &Target, name: &str) -> Result<Option<ImageMeta>> {
    let key = image_key(name);
    let Some(bytes) = target.get(&key).await? else {
        return Ok(None);
    };
    let m: ImageMeta = serde_json::from_slice(&bytes).map_err(|e| {
        Error::FailedPrecondition(format!(
            "backing image metadata {key} in the backup target {} is not valid: {e}",
            target.url()
        ))
    })?;
    if m.format != layout::FORMAT || m.block_size == 0 {
        return Err(Error::FailedPrecondition(format!(
            "backing image metadata {key} in {} has format {} (block size {}); this bicsi reads format {}",
            target.url(),
            m.format,
            m.block_size,
            layout::FORMAT
        )));
    }
    Ok(Some(m))
}

/// Backs up the image file `file` (whose SHA-512 must be `template.checksum`; it is checked
/// while reading) under `template.name`. Returns the metadata, put last.
pub async fn backup_image_file(
    target: &Target,
    file: &Path,
    template: ImageMeta,
) -> Result<ImageMeta> {
    target.check().await?;
    let name = template.name.clone();
    layout::check_name("backing image", &name)?;
    let mut existing: HashSet<String> = HashSet::new();
    for k in target.list(&format!("backingimages/{name}/blocks")).await? {
        if let Some((h, layout::Compression::Zstd)) = layout::hash_of_block_key(&k) {
            existing.insert(h.to_string());
        }
    }
    let size = std::fs::metadata(file)
        .map_err(|e| Error::Internal(format!("cannot stat {}: {e}", file.display())))?
        .len();
    type Item = Result<(u64, Option<(String, Option<Vec<u8>>)>)>;
    let (tx, rx) = tokio::sync::mpsc::channel::<Item>(UPLOADS * 2);
    let path = file.to_path_buf();
    let want = template.checksum.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let r = (|| -> Result<()> {
            let f = std::fs::File::open(&path)
                .map_err(|e| Error::Internal(format!("cannot open {}: {e}", path.display())))?;
            let mut sha512 = sha2::Sha512::new();
            let mut buf = vec![0u8; IMAGE_BLOCK_SIZE as usize];
            let mut seen = existing;
            let mut index = 0u64;
            while index * IMAGE_BLOCK_SIZE < size {
                let off = index * IMAGE_BLOCK_SIZE;
                let len = IMAGE_BLOCK_SIZE.min(size - off) as usize;
                f.read_exact_at(&mut buf[..len], off)
                    .map_err(|e| Error::Internal(format!("cannot read {}: {e}", path.display())))?;
                sha512.update(&buf[..len]);
                let item = if super::blocks::is_zero(&buf[..len]) {
                    (index, None)
                } else {
                    let h = sha256_hex(&buf[..len]);
                    let upload =
                        if seen.insert(h.clone()) {
                            Some(zstd::bulk::compress(&buf[..len], 3).map_err(|e| {
                                Error::Internal(format!("zstd cannot compress: {e}"))
                            })?)
                        } else {
                            None
                        };
                    (index, Some((h, upload)))
                };
                if tx.blocking_send(Ok(item)).is_err() {
                    return Ok(());
                }
                index += 1;
            }
            let got = hex::encode(sha512.finalize());
            if !want.is_empty() && got != want {
                return Err(Error::FailedPrecondition(format!(
                    "backing image file {} has SHA-512 {got}, not the image's {want}: it changed on disk; let the scrub replace it, then back it up",
                    path.display()
                )));
            }
            Ok(())
        })();
        if let Err(e) = r {
            let _ = tx.blocking_send(Err(e));
        }
    });
    let mut puts = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|item| {
            let target = target.clone();
            let name = name.clone();
            async move {
                let (index, block) = item?;
                let mut sent = 0;
                let hash = match block {
                    Some((h, Some(bytes))) => {
                        sent = bytes.len() as u64;
                        target
                            .put(&image_block_key(&name, &h), Bytes::from(bytes))
                            .await?;
                        Some(h)
                    }
                    Some((h, None)) => Some(h),
                    None => None,
                };
                Ok::<_, Error>((index, hash, sent))
            }
        })
        .buffered(UPLOADS);
    let mut blocks = Vec::new();
    let mut uploaded = 0;
    while let Some(r) = puts.next().await {
        let (index, hash, sent) = r?;
        uploaded += sent;
        if hash.is_some() {
            blocks.push(BlockRef {
                index,
                hash,
                compression: layout::Compression::Zstd,
            });
        }
    }
    reader
        .await
        .map_err(|e| Error::Internal(format!("image backup reader stopped: {e}")))?;
    let meta = ImageMeta {
        format: layout::FORMAT,
        size,
        block_size: IMAGE_BLOCK_SIZE,
        blocks,
        uploaded_bytes: uploaded,
        created: crate::model::now_rfc3339(),
        ..template
    };
    target
        .put(
            &image_key(&name),
            Bytes::from(serde_json::to_vec_pretty(&meta)?),
        )
        .await?;
    tracing::info!(image = %name, target = %target.url(), uploaded, "backing image backed up");
    Ok(meta)
}

/// Writes the backed-up image `url` (`TARGET#NAME`) to `out` (sparse), each block checked by
/// its SHA-256; returns the file's SHA-512 and size, which the caller checks against the image.
pub async fn restore_image_file(
    url: &str,
    credential_file: Option<PathBuf>,
    out: &Path,
    progress: Arc<AtomicU8>,
) -> Result<(String, u64)> {
    let (target_url, name) = parse_backup_url(url)?;
    let target = Target::open(&target_url, credential_file.as_deref())?;
    let meta = get_meta(&target, &name).await?.ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "backing image {name:?} is not in the backup target {target_url}; back it up there first (bicsi backup image {name})"
        ))
    })?;
    let f = std::fs::File::create(out)
        .map_err(|e| Error::Internal(format!("cannot create {}: {e}", out.display())))?;
    f.set_len(meta.size)
        .map_err(|e| Error::Internal(format!("cannot size {}: {e}", out.display())))?;
    let total = meta.blocks.len().max(1);
    let shared = Arc::new((target.clone(), meta.clone()));
    let mut fetched = futures::stream::iter(meta.blocks.clone())
        .map(|b| {
            let shared = shared.clone();
            async move {
                let (target, meta) = &*shared;
                let hash = b.hash.clone().unwrap_or_default();
                let key = image_block_key(&meta.name, &hash);
                let off = b.index * meta.block_size;
                let len = meta.block_size.min(meta.size.saturating_sub(off)) as usize;
                let bad = |why: String| {
                    Error::FailedPrecondition(format!(
                        "backing image {:?} in the backup target {}: block {} ({key}) {why}",
                        meta.name,
                        target.url(),
                        b.index
                    ))
                };
                let bytes = target
                    .get(&key)
                    .await?
                    .ok_or_else(|| bad("is missing".into()))?;
                let data = zstd::bulk::decompress(&bytes, len)
                    .map_err(|e| bad(format!("does not decompress ({e})")))?;
                let got = sha256_hex(&data);
                if got != hash || data.len() != len {
                    return Err(bad(format!("is corrupt: its content hashes to {got}")));
                }
                Ok((off, data))
            }
        })
        .buffered(UPLOADS);
    let mut done = 0usize;
    while let Some(r) = fetched.next().await {
        let (off, data) = r?;
        f.write_all_at(&data, off)
            .map_err(|e| Error::Internal(format!("cannot write {}: {e}", out.display())))?;
        done += 1;
        progress.store((done * 99 / total) as u8, Ordering::Relaxed);
    }
    f.sync_all()
        .map_err(|e| Error::Internal(format!("cannot sync {}: {e}", out.display())))?;
    drop(f);
    let path = out.to_path_buf();
    let sha = tokio::task::spawn_blocking(move || -> Result<String> {
        let mut f = std::fs::File::open(&path)
            .map_err(|e| Error::Internal(format!("cannot open {}: {e}", path.display())))?;
        let mut h = sha2::Sha512::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut f, &mut buf)
                .map_err(|e| Error::Internal(format!("cannot read {}: {e}", path.display())))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex::encode(h.finalize()))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    progress.store(100, Ordering::Relaxed);
    Ok((sha, meta.size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_image_file_round_trips_through_a_file_target_with_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let tdir = dir.path().join("t");
        std::fs::create_dir(&tdir).unwrap();
        let url = format!("file://{}", tdir.display());
        let target = Target::open(&url, None).unwrap();
        // 5 MiB: a zero block, a data block, a partial data block at the end.
        let mut bytes = vec![0u8; 5 << 20];
        for (i, b) in bytes[(2 << 20)..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let file = dir.path().join("img.raw");
        std::fs::write(&file, &bytes).unwrap();
        let checksum = hex::encode(sha2::Sha512::digest(&bytes));
        let template = ImageMeta {
            format: layout::FORMAT,
            name: "img".into(),
            checksum: checksum.clone(),
            size: 0,
            virtual_size: bytes.len() as u64,
            image_format: "raw".into(),
            source_type: "upload".into(),
            source_parameters: Default::default(),
            block_size: 0,
            blocks: vec![],
            uploaded_bytes: 0,
            created: String::new(),
        };
        let meta = backup_image_file(&target, &file, template.clone())
            .await
            .unwrap();
        assert_eq!(meta.blocks.len(), 2);
        assert_eq!(meta.size, 5 << 20);
        // Again: nothing new is put.
        let again = backup_image_file(&target, &file, template.clone())
            .await
            .unwrap();
        assert_eq!(again.uploaded_bytes, 0);
        let out = dir.path().join("back.raw");
        let (sha, size) = restore_image_file(
            &backup_url(&url, "img"),
            None,
            &out,
            Arc::new(AtomicU8::new(0)),
        )
        .await
        .unwrap();
        assert_eq!((sha, size), (checksum.clone(), 5 << 20));
        assert_eq!(std::fs::read(&out).unwrap(), bytes);

        // A file that changed on disk is refused, naming both checksums.
        let mut other = bytes.clone();
        other[0] = 1;
        std::fs::write(&file, &other).unwrap();
        let e = backup_image_file(&target, &file, template)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&checksum) && e.contains("changed on disk"),
            "{e}"
        );
        let e = parse_backup_url("file:///x").unwrap_err().to_string();
        assert!(e.contains("TARGET#NAME"), "{e}");
    }
}
