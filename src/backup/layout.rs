//! What a backup target holds and under which keys: per backup volume (the source volume's
//! name) its content-addressed blocks and one metadata document per backup; per backing image
//! its blocks and its metadata. This module owns the key layout and the metadata types (the
//! on-target format, versioned by `format`); it must not do I/O.
//!
//! ```text
//! backupvolumes/<volume>/volume.json                 the backup volume: size, block size, image
//! backupvolumes/<volume>/blocks/<h[0..2]>/<h>.zst    one block, zstd, named by the SHA-256 of its
//!                                                    uncompressed bytes
//! backupvolumes/<volume>/backups/<backup>.json       a backup: written last, after its blocks
//! ```
//!
//! A backup exists once its metadata document exists: a backup cut off before that leaves only
//! blocks, which no backup lists, and the next delete on that backup volume removes them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The version of the metadata documents this bicsi writes and reads.
pub const FORMAT: u32 = 1;
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

pub fn block_key(volume: &str, hash: &str) -> String {
    format!("backupvolumes/{volume}/blocks/{}/{hash}.zst", &hash[..2])
}

/// The hash of a block key, when `key` is one.
pub fn hash_of_block_key(key: &str) -> Option<&str> {
    let name = key.rsplit('/').next()?;
    let hash = name.strip_suffix(".zst")?;
    (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hash)
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
}

impl BackupMeta {
    pub fn parse(bytes: &[u8], key: &str) -> Result<BackupMeta> {
        let m: BackupMeta = serde_json::from_slice(bytes).map_err(|e| {
            Error::FailedPrecondition(format!(
                "backup metadata {key} in the backup target is not valid: {e}"
            ))
        })?;
        if m.format != FORMAT {
            return Err(Error::FailedPrecondition(format!(
                "backup metadata {key} has format {}, this bicsi reads format {FORMAT}; use a matching bicsi",
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

    #[test]
    fn keys_and_names() {
        let h = "ab".repeat(32);
        let k = block_key("vol-1", &h);
        assert_eq!(k, format!("backupvolumes/vol-1/blocks/ab/{h}.zst"));
        assert_eq!(hash_of_block_key(&k), Some(h.as_str()));
        assert_eq!(hash_of_block_key("backupvolumes/v/blocks/ab/x.zst"), None);
        assert_eq!(hash_of_block_key(&format!("{h}.zst#1")), None);
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
            }],
            uploaded_bytes: 0,
            data_bytes: 0,
        };
        let bytes = serde_json::to_vec(&m).unwrap();
        let e = BackupMeta::parse(&bytes, "k").unwrap_err().to_string();
        assert!(e.contains("format 2"), "{e}");
        let e = BackupMeta::parse(b"{", "k").unwrap_err().to_string();
        assert!(e.contains("k") && e.contains("not valid"), "{e}");
    }
}
