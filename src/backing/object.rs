//! The validation of the BackingImage object (its records are `model::backing_image`'s,
//! re-exported here): which source parameters each source type takes and how they go together,
//! and what a user's object is checked and normalised to.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
pub use crate::files::source::{CLUSTER_KEYS, UrlKind};
use crate::files::source::{ImageSource, access_files_of, param};
pub use crate::model::backing_image::{
    API_VERSION, BackingImage, BackingImageSpec, BackingImageStatus, DEFAULT_NAMESPACE,
    DiskFileStatus, KIND, ObjectMeta, PollStatus, PolledVersion,
};
pub use crate::model::{SourceType, normalize_checksum, validate_name};

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

/// The optional keys only this kind of URL takes, and the credential keys it takes.
fn own_keys(kind: UrlKind) -> &'static [&'static str] {
    match kind {
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

fn describe_kind(kind: UrlKind) -> &'static str {
    match kind {
        UrlKind::Http => "an http(s) URL",
        UrlKind::S3 => "an s3:// URL",
        UrlKind::Registry => "a docker:// or oci:// image",
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
        if k != "url" && !COMMON_KEYS.contains(&k) && !own_keys(kind).contains(&k) {
            return Err(format!(
                "the source parameter {k:?} does not go with {} ({url:?}); it takes: {}",
                describe_kind(kind),
                COMMON_KEYS
                    .iter()
                    .chain(own_keys(kind))
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
    access_files_of(params).check()
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
            access_files_of(&spec.source_parameters)
                .check()
                .map_err(|e| Error::InvalidArgument(format!("backing image {name:?}: {e}")))?;
            super::poll::check_spec(name, spec)
                .map_err(|e| Error::InvalidArgument(format!("backing image {name:?}: {e}")))?;
        }
        SourceType::ExportFromVolume | SourceType::Upload | SourceType::Restore => {}
    }
    // What travels to the nodes is this spec's typed source: every spec accepted here has one
    // (an export's `export-type` is checked in the parse).
    let source = ImageSource::from_spec(spec)
        .map_err(|e| Error::InvalidArgument(format!("backing image {name:?}: {e}")))?;
    if let ImageSource::Restore(restore) = &source {
        crate::backup::image::parse_backup_url(&restore.backup_url)
            .map_err(|e| Error::InvalidArgument(format!("backing image {name:?}: {e}")))?;
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
    if !crate::model::checksum::matches(&wanted.checksum, &existing.checksum) {
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
    use crate::model::backing_image::spec_of as spec;

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
