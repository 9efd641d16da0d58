//! The BackingImage object, shaped like the `longhorn.io/v1beta2` manifests users already have,
//! and its validation. Spec (what the user asked) and status (what bicsi observed) are separate
//! types; only bicsi writes the status.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::state::FileState;
use crate::error::{Error, Result};
pub use crate::model::{SourceType, normalize_checksum, validate_name};

pub const API_VERSION: &str = "longhorn.io/v1beta2";
pub const KIND: &str = "BackingImage";
pub const DEFAULT_NAMESPACE: &str = "longhorn-system";

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
    /// Of an image whose source is polled (`pollInterval`): what the poll saw and made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll: Option<PollStatus>,
    /// Of a version the poll made: the polled image it is a version of; empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version_of: String,
}

/// The poll of an image that updates (see [`super::poll`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PollStatus {
    /// The source's validator the image or its newest version was made from (`etag:"…"`,
    /// `last-modified:…`, or a registry manifest's `sha256:…`); empty before the first check.
    #[serde(default)]
    pub validator: String,
    /// When the source was last checked (RFC 3339).
    #[serde(default)]
    pub last_check_time: String,
    /// When it is checked next (RFC 3339); empty: at once.
    #[serde(default)]
    pub next_check_time: String,
    /// Why the last check failed; empty when it did not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    /// The image new volumes naming this one get: the newest version with a ready file; empty
    /// while that is this image itself.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub current: String,
    /// The versions made, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<PolledVersion>,
}

/// One version the poll made of an image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolledVersion {
    /// `NAME-<short digest>`, a BackingImage of its own.
    pub name: String,
    /// The validator the source had when the version was made.
    pub validator: String,
    /// When it was made (RFC 3339).
    pub created_time: String,
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

/// The optional source parameters of a download (see the README's "Compressed and private
/// sources").
pub const DOWNLOAD_OPTIONAL: &[&str] = &[
    "sourceChecksum",
    "headersFile",
    "authorizationFile",
    "usernameFile",
    "passwordFile",
    "caBundleFile",
    "secret",
    "secretNamespace",
    "caBundleConfigMap",
    "caBundleConfigMapNamespace",
    "endpoint",
    "region",
    "accessKeyIdFile",
    "secretAccessKeyFile",
    "dockerConfigFile",
    "pollInterval",
    "keepVersions",
];

/// The source parameters that name Kubernetes objects: only a store in a cluster reads them.
pub const CLUSTER_KEYS: &[&str] = &["secret", "caBundleConfigMap"];

/// What a download's `url` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlKind {
    Http,
    S3,
    Registry,
}

impl UrlKind {
    pub fn of(url: &str) -> UrlKind {
        let u = url.trim();
        if u.starts_with("s3://") {
            UrlKind::S3
        } else if u.starts_with("docker://") || u.starts_with("oci://") {
            UrlKind::Registry
        } else {
            UrlKind::Http
        }
    }

    /// The optional keys only this kind takes, and the credential keys it takes.
    fn own_keys(self) -> &'static [&'static str] {
        match self {
            UrlKind::Http => &[
                "headersFile",
                "authorizationFile",
                "usernameFile",
                "passwordFile",
            ],
            UrlKind::S3 => &[
                "endpoint",
                "region",
                "accessKeyIdFile",
                "secretAccessKeyFile",
            ],
            UrlKind::Registry => &["dockerConfigFile", "usernameFile", "passwordFile"],
        }
    }

    fn describe(self) -> &'static str {
        match self {
            UrlKind::Http => "an http(s) URL",
            UrlKind::S3 => "an s3:// URL",
            UrlKind::Registry => "a docker:// or oci:// image",
        }
    }
}

/// Keys every download takes, whatever its URL.
const COMMON_KEYS: &[&str] = &[
    "sourceChecksum",
    "pollInterval",
    "keepVersions",
    "caBundleFile",
    "secret",
    "secretNamespace",
    "caBundleConfigMap",
    "caBundleConfigMapNamespace",
];

/// The credential-file keys a `secret` replaces.
const CREDENTIAL_FILE_KEYS: &[&str] = &[
    "headersFile",
    "authorizationFile",
    "usernameFile",
    "passwordFile",
    "accessKeyIdFile",
    "secretAccessKeyFile",
    "dockerConfigFile",
];

fn param<'a>(params: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    params.get(key).map(|v| v.trim()).filter(|v| !v.is_empty())
}

/// Checks the parameters of a download beyond their names: which keys go with which kind of
/// URL and with each other.
fn check_download(params: &BTreeMap<String, String>) -> std::result::Result<(), String> {
    let url = params["url"].trim();
    let kind = UrlKind::of(url);
    match kind {
        UrlKind::Http => {
            crate::download::validate_url(url).map_err(|e| e.to_string())?;
        }
        UrlKind::S3 => {
            crate::download::s3::S3Object::parse(url)?;
        }
        UrlKind::Registry => {
            crate::download::oci::Reference::parse(url)?;
        }
    }
    for key in params.keys() {
        let k = key.as_str();
        if k != "url" && !COMMON_KEYS.contains(&k) && !kind.own_keys().contains(&k) {
            return Err(format!(
                "the source parameter {k:?} does not go with {} ({url:?}); it takes: {}",
                kind.describe(),
                COMMON_KEYS
                    .iter()
                    .chain(kind.own_keys())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if kind == UrlKind::Registry && params.contains_key("sourceChecksum") {
        return Err(
            "sourceChecksum does not go with a registry image: the layer's own digest is checked; pin the image with @sha256:DIGEST instead"
                .to_string(),
        );
    }
    if param(params, "secret").is_some() {
        if let Some(k) = CREDENTIAL_FILE_KEYS
            .iter()
            .find(|k| params.contains_key(**k))
        {
            return Err(format!(
                "secret and {k} both give the credentials; give one (secret in a cluster, the files without one)"
            ));
        }
    } else if params.contains_key("secretNamespace") {
        return Err("secretNamespace names the namespace of secret, which is not given".into());
    }
    if param(params, "caBundleConfigMap").is_some() {
        if params.contains_key("caBundleFile") {
            return Err(
                "caBundleConfigMap and caBundleFile both give the CA bundle; give one".into(),
            );
        }
    } else if params.contains_key("caBundleConfigMapNamespace") {
        return Err(
            "caBundleConfigMapNamespace names the namespace of caBundleConfigMap, which is not given"
                .into(),
        );
    }
    for key in [
        "secret",
        "secretNamespace",
        "caBundleConfigMap",
        "caBundleConfigMapNamespace",
    ] {
        if let Some(v) = param(params, key)
            && validate_name(v).is_err()
        {
            return Err(format!(
                "{key} {v:?} is not a Kubernetes object name (lower-case letters, digits and '-')"
            ));
        }
    }
    if let Some(ep) = param(params, "endpoint") {
        crate::download::s3::check_endpoint(ep)?;
    }
    if params.contains_key("accessKeyIdFile") != params.contains_key("secretAccessKeyFile") {
        return Err(
            "accessKeyIdFile and secretAccessKeyFile go together (an S3 access key); give both"
                .into(),
        );
    }
    for key in ["accessKeyIdFile", "secretAccessKeyFile", "dockerConfigFile"] {
        if let Some(p) = param(params, key)
            && !std::path::Path::new(p).is_absolute()
        {
            return Err(format!(
                "{key} {p:?} is not an absolute path; give the file's full path on the machine bicsi runs on"
            ));
        }
    }
    if kind == UrlKind::Registry
        && params.contains_key("usernameFile") != params.contains_key("passwordFile")
    {
        return Err("usernameFile and passwordFile go together (the registry's user and password); give both".into());
    }
    if kind == UrlKind::Registry
        && params.contains_key("usernameFile")
        && params.contains_key("dockerConfigFile")
    {
        return Err("dockerConfigFile and usernameFile/passwordFile both give the registry's credentials; give one".into());
    }
    download_access_files(params).check()
}

/// A Kubernetes object by (namespace, name).
pub type ObjectRef = (String, String);

/// Where a download's Secret and CA ConfigMap are, the namespace defaulting to `default_ns`
/// (the store's).
pub fn cluster_refs(
    params: &BTreeMap<String, String>,
    default_ns: &str,
) -> (Option<ObjectRef>, Option<ObjectRef>) {
    let pick = |name: &str, ns: &str| {
        param(params, name).map(|n| {
            (
                param(params, ns).unwrap_or(default_ns).to_string(),
                n.to_string(),
            )
        })
    };
    (
        pick("secret", "secretNamespace"),
        pick("caBundleConfigMap", "caBundleConfigMapNamespace"),
    )
}

/// Whether the source names Kubernetes objects (a Secret or a CA ConfigMap).
pub fn names_cluster_objects(params: &BTreeMap<String, String>) -> bool {
    CLUSTER_KEYS.iter().any(|k| param(params, k).is_some())
}

/// The refusal of `secret` and `caBundleConfigMap` where no cluster holds them.
pub fn cluster_keys_refused(name: &str, params: &BTreeMap<String, String>) -> Error {
    let kind = params.get("url").map_or(UrlKind::Http, |u| UrlKind::of(u));
    let files = match kind {
        UrlKind::Http => "headersFile, authorizationFile, or usernameFile and passwordFile",
        UrlKind::S3 => "accessKeyIdFile and secretAccessKeyFile",
        UrlKind::Registry => "dockerConfigFile, or usernameFile and passwordFile",
    };
    Error::InvalidArgument(format!(
        "backing image {name:?}: the source parameters secret and caBundleConfigMap name Kubernetes objects, which only --store kubernetes reads; without a cluster give the credentials in files ({files}) and the CA bundle in caBundleFile"
    ))
}

fn read_file(key: &str, path: &str) -> std::result::Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!("{key} {path}: cannot read it ({e}); check the path and that bicsi may read it")
    })?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

/// What a download needs besides its URL, from the files its parameters name or, for a
/// source that names a Secret or ConfigMap, from the `credentials` the controller read from
/// them. Errors name the key and the file or object, never a value.
pub fn download_source(
    params: &BTreeMap<String, String>,
    credentials: Option<&crate::download::Credentials>,
) -> std::result::Result<(crate::download::Remote, crate::download::Access), String> {
    use crate::download::{Access, Remote, oci, s3};
    let url = params["url"].trim();
    let kind = UrlKind::of(url);
    if names_cluster_objects(params) && credentials.is_none() {
        return Err(
            "its source names a Secret or ConfigMap, and their values were not handed over (the controller reads them and starts the download again)"
                .to_string(),
        );
    }
    let secret = credentials.filter(|c| !c.origin.is_empty());
    let ca = match credentials.map(|c| c.ca_pem()).transpose()?.flatten() {
        Some(pem) => Some(pem),
        None => download_access_files(params).load()?.ca_bundle,
    };
    match kind {
        UrlKind::Http => {
            let mut access = match secret {
                Some(c) => {
                    if !c
                        .values
                        .keys()
                        .any(|k| crate::download::SECRET_HTTP_KEYS.contains(&k.as_str()))
                    {
                        return Err(format!(
                            "{}: none of the keys authorization, username and password, or headers; put the URL's credentials in one of them",
                            c.origin
                        ));
                    }
                    c.access()?
                }
                None => download_access_files(params).load()?,
            };
            access.ca_bundle = ca;
            Ok((Remote::Http, access))
        }
        UrlKind::S3 => {
            let keys = match secret {
                Some(c) => match (c.get("accessKeyId"), c.get("secretAccessKey")) {
                    (Some(id), Some(key)) => Some(s3::S3Keys {
                        access_key_id: id.trim().to_string(),
                        secret_access_key: key.trim().to_string(),
                    }),
                    _ => {
                        return Err(format!(
                            "{}: an S3 source's Secret needs the keys accessKeyId and secretAccessKey",
                            c.origin
                        ));
                    }
                },
                None => match (
                    param(params, "accessKeyIdFile"),
                    param(params, "secretAccessKeyFile"),
                ) {
                    (Some(i), Some(k)) => Some(s3::S3Keys {
                        access_key_id: read_file("accessKeyIdFile", i)?.trim().to_string(),
                        secret_access_key: read_file("secretAccessKeyFile", k)?.trim().to_string(),
                    }),
                    _ => None,
                },
            };
            let remote = Remote::S3(s3::S3Access {
                endpoint: param(params, "endpoint").map(str::to_string),
                region: param(params, "region")
                    .unwrap_or(s3::DEFAULT_REGION)
                    .to_string(),
                keys,
            });
            Ok((
                remote,
                Access {
                    headers: Vec::new(),
                    ca_bundle: ca,
                },
            ))
        }
        UrlKind::Registry => {
            let mut access = oci::OciAccess::default();
            match secret {
                Some(c) => {
                    if let Some(cfg) = c.get(".dockerconfigjson").or_else(|| c.get("config.json")) {
                        oci::OciAccess::check_docker_config(
                            &format!("{}, key .dockerconfigjson", c.origin),
                            cfg,
                        )?;
                        access.docker_config = Some(cfg.to_string());
                    } else if let (Some(u), Some(p)) = (c.get("username"), c.get("password")) {
                        access.basic = Some((u.to_string(), p.to_string()));
                    } else {
                        return Err(format!(
                            "{}: a registry's pull Secret needs the key .dockerconfigjson (kubectl create secret docker-registry) or username and password",
                            c.origin
                        ));
                    }
                }
                None => {
                    if let Some(p) = param(params, "dockerConfigFile") {
                        let text = read_file("dockerConfigFile", p)?;
                        oci::OciAccess::check_docker_config(
                            &format!("dockerConfigFile {p}"),
                            &text,
                        )?;
                        access.docker_config = Some(text);
                    } else if let (Some(u), Some(pw)) =
                        (param(params, "usernameFile"), param(params, "passwordFile"))
                    {
                        access.basic = Some((
                            read_file("usernameFile", u)?,
                            read_file("passwordFile", pw)?,
                        ));
                    }
                }
            }
            Ok((
                Remote::Oci(access),
                Access {
                    headers: Vec::new(),
                    ca_bundle: ca,
                },
            ))
        }
    }
}

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
            check_download(&spec.source_parameters)
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
            super::poll::check_spec(name, spec)
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
