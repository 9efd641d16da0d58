//! StorageClass parameters of a volume: parsed, validated, and refused by name when unknown, so a
//! typo in a StorageClass fails at provisioning with the list of keys bicsi accepts.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::model::SourceType;

pub const NUMBER_OF_REPLICAS: &str = "numberOfReplicas";
pub const STALE_REPLICA_TIMEOUT: &str = "staleReplicaTimeout";
pub const FS_TYPE: &str = "fsType";
pub const BACKING_IMAGE: &str = "backingImage";
pub const BACKING_IMAGE_SOURCE_TYPE: &str = "backingImageDataSourceType";
pub const BACKING_IMAGE_SOURCE_PARAMETERS: &str = "backingImageDataSourceParameters";
pub const BACKING_IMAGE_CHECKSUM: &str = "backingImageChecksum";
/// `auto` (the default), `loop` or `qemu`: see `crate::volume_engine`.
pub const ENGINE: &str = crate::volume_engine::PARAMETER;
/// The block size of the volume's backups (`2Mi` by default, `16Mi` for large volumes).
pub const BACKUP_BLOCK_SIZE: &str = "backupBlockSize";
/// How the volume's backup blocks are compressed: `zstd` (the default), `lz4` or `none`.
pub const BACKUP_COMPRESSION: &str = "backupCompression";

/// Every parameter key bicsi accepts (besides the `csi.storage.k8s.io/` keys the sidecars add).
pub const ACCEPTED: &[&str] = &[
    NUMBER_OF_REPLICAS,
    STALE_REPLICA_TIMEOUT,
    FS_TYPE,
    BACKING_IMAGE,
    BACKING_IMAGE_SOURCE_TYPE,
    BACKING_IMAGE_SOURCE_PARAMETERS,
    BACKING_IMAGE_CHECKSUM,
    ENGINE,
    BACKUP_BLOCK_SIZE,
    BACKUP_COMPRESSION,
];

/// The backing image a volume asks for, and how to create it if it does not exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingImageRequest {
    pub name: String,
    /// Source type and parameters, when the StorageClass says how to create the image.
    pub source: Option<(SourceType, BTreeMap<String, String>)>,
    /// Expected checksum (lower-case hex), when given.
    pub checksum: Option<String>,
}

/// Keys the Kubernetes sidecars add (`--extra-create-metadata`); accepted and not kept as spec.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

/// The most replicas a volume gets when `numberOfReplicas` is not given: fewer when there are
/// fewer disks to put them on (see `default_replicas`).
pub const DEFAULT_REPLICAS: u32 = 3;
pub const MAX_REPLICAS: u32 = 20;
pub const FS_TYPES: &[&str] = &["ext4", "xfs"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeParams {
    /// None when the parameter is not given: the controller then picks `default_replicas` (or
    /// the source volume's count, for a restore or a clone).
    pub number_of_replicas: Option<u32>,
    pub stale_replica_timeout_minutes: Option<u32>,
    pub fs_type: Option<String>,
    pub backing_image: Option<BackingImageRequest>,
    /// The engine the StorageClass asks for.
    pub engine: crate::volume_engine::EngineChoice,
    /// The parameters that define the volume (sidecar metadata removed), for idempotency checks.
    pub kept: BTreeMap<String, String>,
}

pub fn parse(params: &BTreeMap<String, String>) -> Result<VolumeParams> {
    let mut out = VolumeParams {
        number_of_replicas: None,
        stale_replica_timeout_minutes: None,
        fs_type: None,
        backing_image: None,
        engine: crate::volume_engine::EngineChoice::Auto,
        kept: BTreeMap::new(),
    };
    let mut bi_name = None;
    let mut bi_type = None;
    let mut bi_params = None;
    let mut bi_checksum = None;
    for (key, value) in params {
        if key.starts_with(SIDECAR_PREFIX) {
            continue;
        }
        match key.as_str() {
            NUMBER_OF_REPLICAS => out.number_of_replicas = Some(parse_replicas(value)?),
            STALE_REPLICA_TIMEOUT => {
                out.stale_replica_timeout_minutes = Some(value.trim().parse().map_err(|_| {
                    Error::InvalidArgument(format!(
                        "parameter {STALE_REPLICA_TIMEOUT}={value:?} is not a whole number of minutes (for example \"2880\")"
                    ))
                })?)
            }
            FS_TYPE => out.fs_type = Some(parse_fs_type(value)?),
            ENGINE => out.engine = crate::volume_engine::EngineChoice::parse(value)?,
            BACKING_IMAGE => {
                crate::model::validate_name(value.trim())?;
                bi_name = Some(value.trim().to_string());
            }
            BACKING_IMAGE_SOURCE_TYPE => bi_type = Some(SourceType::parse(value.trim())?),
            BACKING_IMAGE_SOURCE_PARAMETERS => bi_params = Some(parse_source_parameters(value)?),
            BACKING_IMAGE_CHECKSUM => {
                let name = bi_name.clone().unwrap_or_default();
                bi_checksum = Some(crate::model::normalize_checksum(&name, value)?)
                    .filter(|c| !c.is_empty());
            }
            BACKUP_BLOCK_SIZE => {
                crate::backup::layout::parse_block_size(value.trim())?;
            }
            BACKUP_COMPRESSION => {
                crate::backup::layout::Compression::parse(value)?;
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown parameter {other:?}; accepted parameters are: {}",
                    ACCEPTED.join(", ")
                )));
            }
        }
        out.kept.insert(key.clone(), value.clone());
    }
    match (bi_name, bi_type, bi_params) {
        (Some(name), ty, params) => {
            let source = match (ty, params) {
                (Some(t), p) => Some((t, p.unwrap_or_default())),
                (None, Some(_)) => {
                    return Err(Error::InvalidArgument(format!(
                        "parameter {BACKING_IMAGE_SOURCE_PARAMETERS} needs {BACKING_IMAGE_SOURCE_TYPE} (download or export-from-volume)"
                    )));
                }
                (None, None) => None,
            };
            out.backing_image = Some(BackingImageRequest {
                name,
                source,
                checksum: bi_checksum,
            });
        }
        (None, ty, params) => {
            if ty.is_some() || params.is_some() || bi_checksum.is_some() {
                return Err(Error::InvalidArgument(format!(
                    "parameters {BACKING_IMAGE_SOURCE_TYPE}, {BACKING_IMAGE_SOURCE_PARAMETERS} and {BACKING_IMAGE_CHECKSUM} need {BACKING_IMAGE} (the image's name)"
                )));
            }
        }
    }
    Ok(out)
}

/// `backingImageDataSourceParameters`: a JSON object of strings in a string, as in the seed's
/// StorageClass examples.
fn parse_source_parameters(value: &str) -> Result<BTreeMap<String, String>> {
    let parsed: serde_json::Value = serde_json::from_str(value).map_err(|e| {
        Error::InvalidArgument(format!(
            "parameter {BACKING_IMAGE_SOURCE_PARAMETERS} is not valid JSON ({e}); write a JSON object such as '{{\"url\": \"https://host/image.raw\"}}' and mind the escaping of \\ in YAML"
        ))
    })?;
    let serde_json::Value::Object(map) = parsed else {
        return Err(Error::InvalidArgument(format!(
            "parameter {BACKING_IMAGE_SOURCE_PARAMETERS} must be a JSON object of strings, got {value}"
        )));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            serde_json::Value::Number(n) => Ok((k, n.to_string())),
            serde_json::Value::Bool(b) => Ok((k, b.to_string())),
            other => Err(Error::InvalidArgument(format!(
                "parameter {BACKING_IMAGE_SOURCE_PARAMETERS}: value of {k:?} must be a string, got {other}"
            ))),
        })
        .collect()
}

/// The replica count of a volume whose parameters do not give one: [`DEFAULT_REPLICAS`], or the
/// number of distinct disks replicas can be placed on when that is smaller (a replica per disk
/// at most), so a volume on a one-disk node is not degraded from birth.
pub fn default_replicas(disks: usize) -> u32 {
    (disks.min(DEFAULT_REPLICAS as usize) as u32).max(1)
}

/// The smallest volume bicsi makes for a block volume: the default filesystem fits in nothing
/// smaller than a few blocks and a raw device this small is a unit mistake, not a wish.
pub const MIN_BLOCK_SIZE: u64 = 1 << 20;
/// The smallest ext4 volume: below 2 MiB mkfs.ext4 leaves the journal out, and 4 MiB leaves the
/// files some room next to the journal and the inode tables.
pub const MIN_EXT4_SIZE: u64 = 4 << 20;
/// mkfs.xfs refuses anything smaller ("Filesystem must be larger than 300MB").
pub const MIN_XFS_SIZE: u64 = 300 << 20;

/// The smallest size for a volume with these capabilities and `fsType` parameter, and what
/// needs it: a mount capability needs its filesystem (its own fs_type, else the parameter, else
/// ext4) to fit; block only needs [`MIN_BLOCK_SIZE`].
pub fn minimum_size(caps: &[crate::model::Capability], fs_type: Option<&str>) -> (u64, String) {
    let mut min = (MIN_BLOCK_SIZE, "a volume".to_string());
    for cap in caps {
        if let crate::model::AccessType::Mount {
            fs_type: cap_fs, ..
        } = &cap.access
        {
            let fs = Some(cap_fs.as_str())
                .filter(|f| !f.is_empty())
                .or(fs_type)
                .unwrap_or("ext4");
            let size = match fs {
                "xfs" => MIN_XFS_SIZE,
                _ => MIN_EXT4_SIZE,
            };
            if size > min.0 {
                min = (size, format!("an {fs} filesystem"));
            }
        }
    }
    min
}

pub fn parse_replicas(value: &str) -> Result<u32> {
    match value.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_REPLICAS).contains(&n) => Ok(n),
        _ => Err(Error::InvalidArgument(format!(
            "parameter {NUMBER_OF_REPLICAS}={value:?} must be a whole number from 1 to {MAX_REPLICAS}"
        ))),
    }
}

pub fn parse_fs_type(value: &str) -> Result<String> {
    let v = value.trim();
    if FS_TYPES.contains(&v) {
        Ok(v.to_string())
    } else {
        Err(Error::InvalidArgument(format!(
            "filesystem type {value:?} is not supported; use one of: {}",
            FS_TYPES.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn default_replicas_are_the_disks_up_to_three() {
        for (disks, want) in [(0, 1), (1, 1), (2, 2), (3, 3), (7, 3)] {
            assert_eq!(default_replicas(disks), want, "{disks} disks");
        }
    }

    #[test]
    fn minimum_sizes_follow_the_filesystem() {
        use crate::model::{AccessMode, AccessType, Capability};
        let mount = |fs: &str| Capability {
            access: AccessType::Mount {
                fs_type: fs.into(),
                mount_flags: vec![],
            },
            mode: AccessMode::SingleNodeWriter,
        };
        let block = Capability {
            access: AccessType::Block,
            mode: AccessMode::SingleNodeWriter,
        };
        let table: &[(Vec<Capability>, Option<&str>, u64)] = &[
            (vec![], None, MIN_BLOCK_SIZE),
            (vec![block.clone()], Some("xfs"), MIN_BLOCK_SIZE),
            (vec![mount("")], None, MIN_EXT4_SIZE),
            (vec![mount("")], Some("xfs"), MIN_XFS_SIZE),
            (vec![mount("xfs")], None, MIN_XFS_SIZE),
            (vec![mount("ext4")], Some("xfs"), MIN_EXT4_SIZE),
            (vec![block, mount("xfs")], None, MIN_XFS_SIZE),
        ];
        for (caps, fs, want) in table {
            assert_eq!(minimum_size(caps, *fs).0, *want, "{caps:?} {fs:?}");
        }
    }

    #[test]
    fn parses_parameters() {
        let p = parse(&map(&[
            ("numberOfReplicas", "3"),
            ("staleReplicaTimeout", "2880"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]))
        .unwrap();
        assert_eq!(p.number_of_replicas, Some(3));
        assert_eq!(p.stale_replica_timeout_minutes, Some(2880));
        assert!(!p.kept.contains_key("csi.storage.k8s.io/pvc/name"));
        assert_eq!(parse(&map(&[])).unwrap().number_of_replicas, None);
    }

    #[test]
    fn parses_the_seed_storage_class_parameters() {
        let p = parse(&map(&[
            ("numberOfReplicas", "3"),
            ("staleReplicaTimeout", "2880"),
            ("backingImage", "bi-download"),
            ("backingImageDataSourceType", "download"),
            ("backingImageDataSourceParameters", r#"{"url": "https://backing-image-example.s3-region.amazonaws.com/test-backing-image"}"#),
        ]))
        .unwrap();
        let b = p.backing_image.unwrap();
        assert_eq!(b.name, "bi-download");
        let (t, params) = b.source.unwrap();
        assert_eq!(t, SourceType::Download);
        assert_eq!(
            params["url"],
            "https://backing-image-example.s3-region.amazonaws.com/test-backing-image"
        );
        let p = parse(&map(&[
            ("backingImage", "bi-export-from-volume"),
            ("backingImageDataSourceType", "export-from-volume"),
            (
                "backingImageDataSourceParameters",
                r#"{"volume-name": "vol-export-src", "export-type": "qcow2"}"#,
            ),
        ]))
        .unwrap();
        assert_eq!(
            p.backing_image.unwrap().source.unwrap().1["export-type"],
            "qcow2"
        );
        let p = parse(&map(&[("backingImage", "plain")])).unwrap();
        assert_eq!(p.backing_image.unwrap().source, None);
    }

    #[test]
    fn refuses_bad_parameters_by_name() {
        let table: &[(&[(&str, &str)], &str)] = &[
            (&[("numberOfReplicas", "0")], "numberOfReplicas"),
            (&[("numberOfReplicas", "three")], "numberOfReplicas"),
            (&[("numberOfReplicas", "21")], "1 to 20"),
            (&[("staleReplicaTimeout", "-1")], "staleReplicaTimeout"),
            (&[("fsType", "btrfs")], "ext4, xfs"),
            (
                &[("engine", "fuse")],
                "auto (the default), loop, mirror or qemu",
            ),
            (&[("replicas", "3")], "unknown parameter \"replicas\""),
            (
                &[("replicas", "3")],
                "numberOfReplicas, staleReplicaTimeout, fsType",
            ),
        ];
        for (input, want) in table {
            let err = parse(&map(input)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.to_string().contains(want), "{input:?}: {err}");
        }
    }
}
