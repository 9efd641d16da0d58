//! The BackingImage object, shaped like the `longhorn.io/v1beta2` manifests users already have,
//! and its validation. Spec (what the user asked) and status (what bicsi observed) are separate
//! types; only bicsi writes the status.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::state::FileState;
use crate::error::{Error, Result};

pub const API_VERSION: &str = "longhorn.io/v1beta2";
pub const KIND: &str = "BackingImage";
pub const DEFAULT_NAMESPACE: &str = "longhorn-system";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SourceType {
    #[serde(rename = "download")]
    Download,
    #[serde(rename = "upload")]
    Upload,
    #[serde(rename = "export-from-volume")]
    ExportFromVolume,
    /// Restored from a backup of the image in a backup target (`backup-url`: `TARGET#NAME`).
    #[serde(rename = "restore")]
    Restore,
}

impl SourceType {
    pub const NAMES: &'static str = "download, upload, export-from-volume, restore";

    pub fn parse(name: &str) -> Result<SourceType> {
        match name {
            "download" => Ok(SourceType::Download),
            "upload" => Ok(SourceType::Upload),
            "export-from-volume" => Ok(SourceType::ExportFromVolume),
            "restore" => Ok(SourceType::Restore),
            other => Err(Error::InvalidArgument(format!(
                "unknown backing image source type {other:?}; use one of: {}",
                SourceType::NAMES
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SourceType::Download => "download",
            SourceType::Upload => "upload",
            SourceType::ExportFromVolume => "export-from-volume",
            SourceType::Restore => "restore",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackingImageSpec {
    pub source_type: SourceType,
    #[serde(default)]
    pub source_parameters: BTreeMap<String, String>,
    /// Expected SHA-512 (lower-case hex) of the whole file; empty when not given.
    #[serde(default)]
    pub checksum: String,
    #[serde(default = "one")]
    pub min_number_of_copies: u32,
}

fn one() -> u32 {
    1
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// The state of the image's file on one disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskFileStatus {
    pub state: FileState,
    pub progress: u8,
    #[serde(default)]
    pub message: String,
    pub last_state_transition_time: String,
    /// The last report on the file (progress counts as life for an in-progress file).
    #[serde(default)]
    pub last_update_time: String,
    /// The node the disk belongs to.
    #[serde(default)]
    pub node_id: String,
    /// Since when no replica on the disk uses the file (RFC 3339); empty while one does. The
    /// cleanup wait is measured from it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unused_since: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackingImageStatus {
    #[serde(default)]
    pub uuid: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub virtual_size: u64,
    /// `raw` or `qcow2`, once the first file is ready.
    #[serde(default)]
    pub format: String,
    /// The image's checksum, fixed once known (given in the spec, or the first ready file's).
    #[serde(default)]
    pub checksum: String,
    /// Disk id → the file's state on that disk.
    #[serde(default)]
    pub disk_file_status_map: BTreeMap<String, DiskFileStatus>,
    /// The virtual size learned before the first file was ready (from the head of the download,
    /// or the size of the volume to export), which volumes made meanwhile were sized for: the
    /// first ready file must have it. 0 while nothing was learned.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub expected_virtual_size: u64,
    /// Where `expected_virtual_size` was learned, for messages ("the qcow2 header at the URL").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub expected_virtual_size_from: String,
    /// Failures of the data source in a row that trying again soon cannot fix (a checksum
    /// mismatch, a 4xx answer, a file that is no disk image); 0 again once a file is ready.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub source_failures: u32,
    /// When the source is tried again after such a failure (RFC 3339; the wait doubles from a
    /// minute to six hours); empty when no such wait is on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub next_source_retry_time: String,
    /// What a user must know about the image as a whole (an uploaded image that cannot be
    /// recovered, for one); empty when all is well.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackingImage {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: BackingImageSpec,
    #[serde(default)]
    pub status: BackingImageStatus,
}

impl BackingImage {
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// The directory name of this image's file on a disk: `<name>-<uuid>`.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.metadata.name, self.status.uuid)
    }

    /// Whether some disk holds a ready file.
    pub fn has_ready_file(&self) -> bool {
        self.status
            .disk_file_status_map
            .values()
            .any(|f| f.state == FileState::Ready)
    }
}

/// DNS-1123 label: what Kubernetes allows as an object name segment, and safe as a path part.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "backing image name {name:?} is invalid: use at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit (a DNS-1123 label)"
        )))
    }
}

/// Normalises and checks an expected checksum: empty, or 128 hexadecimal characters.
pub fn normalize_checksum(name: &str, checksum: &str) -> Result<String> {
    let c = checksum.trim().to_ascii_lowercase();
    if c.is_empty() || (c.len() == 128 && c.bytes().all(|b| b.is_ascii_hexdigit())) {
        Ok(c)
    } else {
        Err(Error::InvalidArgument(format!(
            "backing image {name:?}: checksum must be the SHA-512 of the file, 128 hexadecimal characters (as `shasum -a 512 FILE` prints), got {} characters",
            checksum.trim().len()
        )))
    }
}

/// The optional source parameters of a download (see the README's "Compressed and private
/// sources").
pub const DOWNLOAD_OPTIONAL: &[&str] = &[
    "sourceChecksum",
    "headersFile",
    "authorizationFile",
    "usernameFile",
    "passwordFile",
    "caBundleFile",
];

/// The files a download's private-URL parameters name (paths only: the secrets stay in them).
pub fn download_access_files(
    params: &std::collections::BTreeMap<String, String>,
) -> crate::download::AccessFiles {
    let path = |key: &str| {
        params
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    crate::download::AccessFiles {
        headers: path("headersFile"),
        authorization: path("authorizationFile"),
        username: path("usernameFile"),
        password: path("passwordFile"),
        ca_bundle: path("caBundleFile"),
    }
}

/// The source parameters each source type takes: (required, optional).
fn source_keys(t: SourceType) -> (&'static [&'static str], &'static [&'static str]) {
    match t {
        SourceType::Download => (&["url"], DOWNLOAD_OPTIONAL),
        SourceType::Upload => (&[], &[]),
        SourceType::ExportFromVolume => (&["volume-name", "export-type"], &[]),
        SourceType::Restore => (&["backup-url"], &[]),
    }
}

/// Checks a spec (from YAML, the HTTP API or StorageClass parameters) and normalises it.
pub fn validate_spec(name: &str, spec: &mut BackingImageSpec) -> Result<()> {
    validate_name(name)?;
    spec.checksum = normalize_checksum(name, &spec.checksum)?;
    if spec.min_number_of_copies == 0 {
        return Err(Error::InvalidArgument(format!(
            "backing image {name:?}: minNumberOfCopies must be at least 1"
        )));
    }
    let (required, optional) = source_keys(spec.source_type);
    for key in required {
        if spec
            .source_parameters
            .get(*key)
            .is_none_or(|v| v.trim().is_empty())
        {
            return Err(Error::InvalidArgument(format!(
                "backing image {name:?}: source type {} needs the source parameter {key:?}",
                spec.source_type.as_str()
            )));
        }
    }
    for key in spec.source_parameters.keys() {
        if !required.contains(&key.as_str()) && !optional.contains(&key.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "backing image {name:?}: unknown source parameter {key:?} for source type {}; it takes: {}",
                spec.source_type.as_str(),
                if required.is_empty() && optional.is_empty() {
                    "no parameters".to_string()
                } else {
                    required
                        .iter()
                        .chain(optional)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )));
        }
    }
    match spec.source_type {
        SourceType::Download => {
            let url = &spec.source_parameters["url"];
            crate::download::validate_url(url)
                .map_err(|e| Error::InvalidArgument(format!("backing image {name:?}: {e}")))?;
            if let Some(c) = spec.source_parameters.get("sourceChecksum") {
                let parsed = crate::download::SourceChecksum::parse(c)
                    .map_err(|e| Error::InvalidArgument(format!("backing image {name:?}: {e}")))?;
                spec.source_parameters
                    .insert("sourceChecksum".to_string(), parsed.to_string());
            }
            download_access_files(&spec.source_parameters)
                .check()
                .map_err(|e| Error::InvalidArgument(format!("backing image {name:?}: {e}")))?;
        }
        SourceType::ExportFromVolume => {
            let t = &spec.source_parameters["export-type"];
            if t != "raw" && t != "qcow2" {
                return Err(Error::InvalidArgument(format!(
                    "backing image {name:?}: export-type {t:?} is not supported; use raw or qcow2"
                )));
            }
        }
        SourceType::Upload => {}
        SourceType::Restore => {
            crate::backup::image::parse_backup_url(&spec.source_parameters["backup-url"])
                .map_err(|e| Error::InvalidArgument(format!("backing image {name:?}: {e}")))?;
        }
    }
    Ok(())
}

/// Parses and checks an object given by a user, filling defaults. The status is discarded.
pub fn from_user(mut bi: BackingImage) -> Result<BackingImage> {
    if bi.api_version != API_VERSION || bi.kind != KIND {
        return Err(Error::InvalidArgument(format!(
            "expected apiVersion {API_VERSION} and kind {KIND}, got {} {}",
            bi.api_version, bi.kind
        )));
    }
    if bi.metadata.namespace.is_empty() {
        bi.metadata.namespace = DEFAULT_NAMESPACE.to_string();
    }
    let name = bi.metadata.name.clone();
    validate_spec(&name, &mut bi.spec)?;
    bi.status = BackingImageStatus::default();
    Ok(bi)
}

/// The first field where two specs differ, for "same name, different spec" errors.
pub fn first_difference(existing: &BackingImageSpec, wanted: &BackingImageSpec) -> Option<String> {
    if existing.source_type != wanted.source_type {
        return Some(format!(
            "sourceType is {} but {} was requested",
            existing.source_type.as_str(),
            wanted.source_type.as_str()
        ));
    }
    if existing.source_parameters != wanted.source_parameters {
        return Some(format!(
            "sourceParameters are {:?} but {:?} were requested",
            existing.source_parameters, wanted.source_parameters
        ));
    }
    if !wanted.checksum.is_empty() && existing.checksum != wanted.checksum {
        return Some(format!(
            "checksum is {} but {} was requested",
            if existing.checksum.is_empty() {
                "not set".to_string()
            } else {
                existing.checksum.clone()
            },
            wanted.checksum
        ));
    }
    if existing.min_number_of_copies != wanted.min_number_of_copies {
        return Some(format!(
            "minNumberOfCopies is {} but {} was requested",
            existing.min_number_of_copies, wanted.min_number_of_copies
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for ok in ["bi-download", "a", "x1", &"a".repeat(63)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "-a", "a-", "Bi", "a_b", "a.b", &"a".repeat(64), "a/b"] {
            let e = validate_name(bad).unwrap_err();
            assert!(e.to_string().contains("DNS-1123"), "{bad}: {e}");
        }
    }

    #[test]
    fn checksums_are_128_hex_characters() {
        let good = "AB".repeat(64);
        assert_eq!(normalize_checksum("x", &good).unwrap(), "ab".repeat(64));
        assert_eq!(normalize_checksum("x", "").unwrap(), "");
        for bad in ["abc", &"g".repeat(128), &"a".repeat(127)] {
            let e = normalize_checksum("x", bad).unwrap_err();
            assert!(e.to_string().contains("128 hexadecimal"), "{e}");
        }
    }

    fn spec(t: SourceType, params: &[(&str, &str)]) -> BackingImageSpec {
        BackingImageSpec {
            source_type: t,
            source_parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            checksum: String::new(),
            min_number_of_copies: 1,
        }
    }

    #[test]
    fn specs_are_checked_per_source_type() {
        type Case<'a> = (SourceType, &'a [(&'a str, &'a str)], Option<&'a str>);
        let table: &[Case] = &[
            (
                SourceType::Download,
                &[("url", "http://127.0.0.1/x.raw")],
                None,
            ),
            (
                SourceType::Download,
                &[("url", "https://example.invalid/x")],
                None,
            ),
            (
                SourceType::Download,
                &[],
                Some("needs the source parameter \"url\""),
            ),
            (SourceType::Download, &[("url", "ftp://h/x")], Some("ftp")),
            (
                SourceType::Download,
                &[("url", "http://h/x"), ("token", "t")],
                Some("unknown source parameter \"token\""),
            ),
            (
                SourceType::ExportFromVolume,
                &[("volume-name", "v"), ("export-type", "qcow2")],
                None,
            ),
            (
                SourceType::ExportFromVolume,
                &[("volume-name", "v")],
                Some("\"export-type\""),
            ),
            (
                SourceType::ExportFromVolume,
                &[("volume-name", "v"), ("export-type", "vmdk")],
                Some("raw or qcow2"),
            ),
            (SourceType::Upload, &[], None),
        ];
        for (t, params, want) in table {
            let mut s = spec(*t, params);
            match (validate_spec("bi", &mut s), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{params:?}: {e}"),
                (r, w) => panic!("{t:?} {params:?}: got {r:?}, wanted {w:?}"),
            }
        }
    }

    #[test]
    fn the_seed_manifests_parse() {
        let download = r#"
apiVersion: longhorn.io/v1beta2
kind: BackingImage
metadata:
  name: bi-download
  namespace: longhorn-system
spec:
  sourceType: download
  sourceParameters:
    url: https://longhorn-backing-image.s3-us-west-1.amazonaws.com/parrot.raw
  checksum: 304f3ed30ca6878e9056ee6f1b02b328239f0d0c2c1272840998212f9734b196371560b3b939037e4f4c2884ce457c2cbc9f0621f4f5d1ca983983c8cdf8cd9a
"#;
        let bi = from_user(serde_yaml::from_str(download).unwrap()).unwrap();
        assert_eq!(bi.spec.source_type, SourceType::Download);
        assert_eq!(bi.spec.checksum.len(), 128);
        assert_eq!(bi.spec.min_number_of_copies, 1);
        let export = r#"
apiVersion: longhorn.io/v1beta2
kind: BackingImage
metadata:
  name: bi-export
  namespace: longhorn-system
spec:
  sourceType: export-from-volume
  sourceParameters:
    volume-name: vol-export-src
    export-type: qcow2
"#;
        let bi = from_user(serde_yaml::from_str(export).unwrap()).unwrap();
        assert_eq!(bi.spec.source_parameters["export-type"], "qcow2");
    }
}
