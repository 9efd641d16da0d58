//! What a backup target holds and under which keys: per backup volume (the source volume's
//! name) its content-addressed blocks and one metadata document per backup; per backing image
//! its blocks and its metadata. This module owns the key layout and the metadata types (the
//! on-target format, versioned by `format`); it must not do I/O.
//!
//! ```text
//! backupvolumes/<volume>/volume.json                 the backup volume: size, block size, image
//! backupvolumes/<volume>/blocks/<h[0..2]>/<h>.zst    one block, zstd, named by the SHA-256 of its
//!                                                    uncompressed bytes
//! backupvolumes/<volume>/blocks/<h[0..2]>/<h>.lz4    the same, lz4 (block format)
//! backupvolumes/<volume>/blocks/<h[0..2]>/<h>.raw    the same, not compressed
//! backupvolumes/<volume>/backups/<backup>.json       a backup: written last, after its blocks
//! ```
//!
//! Each block of a backup records how its object is compressed (`c`: absent for zstd, the only
//! kind format 1 knew), so one backup may list blocks of several kinds: a block stored once
//! under one compression is reused by later backups whatever their own compression is. A backup
//! that lists a block other than zstd is written as format 2, which a bicsi reading only format 1
//! refuses by name instead of missing its blocks.
//!
//! A backup exists once its metadata document exists: a backup cut off before that leaves only
//! blocks, which no backup lists, and the next delete on that backup volume removes them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The newest version of the metadata documents this bicsi writes and reads: 2 adds the
/// compression of each block. A backup whose blocks are all zstd is still written as format 1.
pub const FORMAT: u32 = 2;
/// The oldest version this bicsi reads.
pub const FORMAT_MIN: u32 = 1;
/// The default block size of a volume's backups (a volume option, `backupBlockSize`).
pub const DEFAULT_BLOCK_SIZE: u64 = 2 << 20;

pub fn volume_prefix(volume: &str) -> String {
    format!("backupvolumes/{volume}")
}

pub fn volume_key(volume: &str) -> String {
    format!("backupvolumes/{volume}/volume.json")
}

pub fn blocks_prefix(volume: &str) -> String {
    format!("backupvolumes/{volume}/blocks")
}

/// How a block object is compressed (a volume option, `backupCompression`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Zstd,
    Lz4,
    None,
}

impl Compression {
    pub const ALL: [Compression; 3] = [Compression::Zstd, Compression::Lz4, Compression::None];

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
            Compression::None => "none",
        }
    }

    /// The extension of its block objects.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Zstd => "zst",
            Compression::Lz4 => "lz4",
            Compression::None => "raw",
        }
    }

    /// Parses the option's value: `zstd`, `lz4` or `none`.
    pub fn parse(text: &str) -> Result<Compression> {
        let t = text.trim();
        Compression::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "backup compression {text:?} is not known; use zstd, lz4 or none"
                ))
            })
    }

    fn is_zstd(&self) -> bool {
        *self == Compression::Zstd
    }
}

pub fn block_key(volume: &str, hash: &str, compression: Compression) -> String {
    format!(
        "backupvolumes/{volume}/blocks/{}/{hash}.{}",
        &hash[..2],
        compression.extension()
    )
}

/// The hash and compression of a block key, when `key` is one.
pub fn hash_of_block_key(key: &str) -> Option<(&str, Compression)> {
    let name = key.rsplit('/').next()?;
    let (hash, ext) = name.rsplit_once('.')?;
    let c = Compression::ALL
        .into_iter()
        .find(|c| c.extension() == ext)?;
    (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some((hash, c))
}

pub fn backups_prefix(volume: &str) -> String {
    format!("backupvolumes/{volume}/backups")
}

pub fn backup_key(volume: &str, backup: &str) -> String {
    format!("backupvolumes/{volume}/backups/{backup}.json")
}

/// Checks a name used as one key component (a backup volume or a backup).
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "{what} name {name:?} is not valid; use up to 128 letters, digits, '-', '_' and '.', not starting with '.'"
        )));
    }
    Ok(())
}

/// The backing image a backup was taken over: enough to find it here (name and SHA-512) or to
/// create it again (its source).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRef {
    pub name: String,
    /// SHA-512 of the image file, as the BackingImage's status has it.
    pub checksum: String,
    pub source_type: String,
    #[serde(default)]
    pub source_parameters: BTreeMap<String, String>,
    pub virtual_size: u64,
}

/// One block of a backup that differs from the backing image (or from zeros without one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRef {
    /// The block's number: it covers bytes `index * block_size ..` of the volume.
    #[serde(rename = "i")]
    pub index: u64,
    /// SHA-256 of its bytes; None: the block is all zeros (nothing is stored for it).
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// How its object is compressed (absent: zstd).
    #[serde(rename = "c", default, skip_serializing_if = "Compression::is_zstd")]
    pub compression: Compression,
}

impl BlockRef {
    /// Its object's key, when it has one.
    pub fn key(&self, volume: &str) -> Option<String> {
        self.hash
            .as_deref()
            .map(|h| block_key(volume, h, self.compression))
    }
}

/// A complete backup, as the target keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupMeta {
    pub format: u32,
    pub name: String,
    /// The backup volume: the source volume's name.
    pub volume: String,
    pub snapshot: String,
    pub created: String,
    pub size_bytes: u64,
    pub block_size: u64,
    pub backing_image: Option<ImageRef>,
    /// The blocks that differ from the backing image, by index.
    pub blocks: Vec<BlockRef>,
    /// Compressed bytes this backup uploaded (blocks other backups had stored are not counted).
    pub uploaded_bytes: u64,
    /// Uncompressed bytes of its non-zero blocks: what a restore writes.
    pub data_bytes: u64,
    /// The source volume's StorageClass parameters (its backing image's left out: the restore
    /// chooses the image) with its replica count: a restore's defaults.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volume_parameters: BTreeMap<String, String>,
}

impl BackupMeta {
    pub fn parse(bytes: &[u8], key: &str) -> Result<BackupMeta> {
        let m: BackupMeta = serde_json::from_slice(bytes).map_err(|e| {
            Error::FailedPrecondition(format!(
                "backup metadata {key} in the backup target is not valid: {e}"
            ))
        })?;
        if !(FORMAT_MIN..=FORMAT).contains(&m.format) {
            return Err(Error::FailedPrecondition(format!(
                "backup metadata {key} has format {}, this bicsi reads formats {FORMAT_MIN} to {FORMAT}; use a matching bicsi",
                m.format
            )));
        }
        if m.block_size == 0 {
            return Err(Error::FailedPrecondition(format!(
                "backup metadata {key} has block size 0"
            )));
        }
        Ok(m)
    }

    /// The format a backup with these blocks is written in: 1 while every block is zstd (so
    /// a bicsi reading format 1 reads it), else 2.
    pub fn format_for(blocks: &[BlockRef]) -> u32 {
        if blocks.iter().all(|b| b.compression.is_zstd()) {
            1
        } else {
            FORMAT
        }
    }
}

/// A backup volume: every backup of one source volume, sharing its blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupVolumeMeta {
    pub format: u32,
    pub name: String,
    pub size_bytes: u64,
    pub block_size: u64,
    pub backing_image: Option<ImageRef>,
    /// The newest backup when this was written.
    pub last_backup: String,
    pub last_backup_at: String,
}

/// Parses a block size option (`2Mi`, `16Mi`, or bytes): a power of two from 64 KiB to 64 MiB,
/// so blocks line up with qcow2 clusters.
pub fn parse_block_size(text: &str) -> Result<u64> {
    let n = crate::quantity::parse(text).map_err(|e| {
        Error::InvalidArgument(format!("backup block size {text:?}: {e}; use 2Mi or 16Mi"))
    })?;
    if !n.is_power_of_two() || !(64 << 10..=64 << 20).contains(&n) {
        return Err(Error::InvalidArgument(format!(
            "backup block size {text:?} must be a power of two from 64Ki to 64Mi (2Mi or 16Mi are usual)"
        )));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of zstd only are written as format 1 (older readers read them) and without a `c`
    /// field; an lz4 block makes the backup format 2 and is named in its block.
    #[test]
    fn compression_is_recorded_per_block() {
        let h = "cd".repeat(32);
        let zstd = BlockRef {
            index: 1,
            hash: Some(h.clone()),
            compression: Compression::Zstd,
        };
        let lz4 = BlockRef {
            compression: Compression::Lz4,
            ..zstd.clone()
        };
        assert_eq!(BackupMeta::format_for(std::slice::from_ref(&zstd)), 1);
        assert_eq!(BackupMeta::format_for(&[zstd.clone(), lz4.clone()]), 2);
        let text = serde_json::to_string(&zstd).unwrap();
        assert!(!text.contains("\"c\""), "{text}");
        let text = serde_json::to_string(&lz4).unwrap();
        assert!(text.contains("\"c\":\"lz4\""), "{text}");
        let back: BlockRef = serde_json::from_str(&format!("{{\"i\":1,\"h\":\"{h}\"}}")).unwrap();
        assert_eq!(back, zstd);
        assert_eq!(
            lz4.key("v").unwrap(),
            format!("backupvolumes/v/blocks/cd/{h}.lz4")
        );
    }

    #[test]
    fn keys_and_names() {
        let h = "ab".repeat(32);
        let k = block_key("vol-1", &h, Compression::Zstd);
        assert_eq!(k, format!("backupvolumes/vol-1/blocks/ab/{h}.zst"));
        assert_eq!(hash_of_block_key(&k), Some((h.as_str(), Compression::Zstd)));
        for c in Compression::ALL {
            let k = block_key("v", &h, c);
            assert_eq!(hash_of_block_key(&k), Some((h.as_str(), c)), "{k}");
            assert_eq!(Compression::parse(c.as_str()).unwrap(), c);
        }
        assert_eq!(hash_of_block_key("backupvolumes/v/blocks/ab/x.zst"), None);
        assert_eq!(hash_of_block_key(&format!("{h}.zst#1")), None);
        assert_eq!(hash_of_block_key(&format!("{h}.gz")), None);
        let e = Compression::parse("gzip").unwrap_err().to_string();
        assert!(e.contains("gzip") && e.contains("lz4"), "{e}");
        for good in ["v", "vol-1_a.b"] {
            check_name("backup", good).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            let e = check_name("backup", bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn block_sizes() {
        assert_eq!(parse_block_size("2Mi").unwrap(), 2 << 20);
        assert_eq!(parse_block_size("16Mi").unwrap(), 16 << 20);
        for bad in ["3Mi", "1Ki", "128Mi", "x"] {
            assert!(parse_block_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn metadata_of_another_format_is_refused() {
        let m = BackupMeta {
            format: FORMAT + 1,
            name: "b".into(),
            volume: "v".into(),
            snapshot: "s".into(),
            created: String::new(),
            size_bytes: 1 << 20,
            block_size: 1 << 20,
            backing_image: None,
            blocks: vec![BlockRef {
                index: 0,
                hash: None,
                compression: Compression::Zstd,
            }],
            uploaded_bytes: 0,
            data_bytes: 0,
            volume_parameters: BTreeMap::new(),
        };
        let bytes = serde_json::to_vec(&m).unwrap();
        let e = BackupMeta::parse(&bytes, "k").unwrap_err().to_string();
        assert!(e.contains(&format!("format {}", FORMAT + 1)), "{e}");
        let e = BackupMeta::parse(b"{", "k").unwrap_err().to_string();
        assert!(e.contains("k") && e.contains("not valid"), "{e}");
    }
}
