//! An image's data source, typed: what its first file is made from. A BackingImage keeps its
//! source as `sourceType` and a map of `sourceParameters` (the record and the wire keep those
//! fields); [`ImageSource::from_spec`] turns a validated spec into one of these values, once,
//! where the controller asks a node for the first file (`backing::first_file_source`, which
//! also adds what only the records know: the snapshot an export comes from). The value travels
//! to the node in the request, so nothing on the node reads a parameter by its key.
//!
//! It must not validate a user's spec (that is `backing::object`, which names the keys in its
//! errors) nor fetch anything: [`DownloadSource::access`] only reads the credential files a
//! download names, on the node that downloads.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::download::{Access, AccessFiles, Credentials, Remote, SourceChecksum, oci, s3};
use crate::model::backing_image::BackingImageSpec;
use crate::model::{ImageFormat, SourceType, volume_id_for};
use crate::snapshot::SnapshotFile;

/// Where a backing image's first file comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ImageSource {
    /// From a URL (http(s), s3:// or a registry image).
    Download(DownloadSource),
    /// From a volume's content at one point in time.
    ExportFromVolume(ExportSource),
    /// From a file a client uploads; bicsi never prepares it itself.
    Upload,
    /// From a backup of the image in a backup target.
    Restore(RestoreSource),
}

/// A download: its URL and the options its parameters set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DownloadSource {
    /// As given (`url`); its kind is [`UrlKind::of`] it.
    pub url: String,
    /// The checksum of the bytes as the server sends them (`sourceChecksum`).
    #[serde(default, with = "source_checksum")]
    pub source_checksum: Option<SourceChecksum>,
    /// `headersFile`, `authorizationFile`, `usernameFile`, `passwordFile`, `caBundleFile`.
    #[serde(default)]
    pub headers_file: Option<PathBuf>,
    #[serde(default)]
    pub authorization_file: Option<PathBuf>,
    #[serde(default)]
    pub username_file: Option<PathBuf>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub ca_bundle_file: Option<PathBuf>,
    /// An S3 source: `endpoint`, `region`, and the files of its access key.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub access_key_id_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    /// A registry image: `dockerConfigFile`.
    #[serde(default)]
    pub docker_config_file: Option<PathBuf>,
    /// The source names a Secret or a CA ConfigMap (`secret`, `caBundleConfigMap`): their
    /// values come from the controller with the request.
    #[serde(default)]
    pub names_cluster_objects: bool,
}

/// An export of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportSource {
    /// The volume's name (`volume-name`), for messages.
    pub volume_name: String,
    /// Its id (`model::volume_id_for` its name), to read its record.
    pub volume_id: String,
    /// `raw` or `qcow2` (`export-type`).
    pub format: ImageFormat,
    /// Of an image a `type: bi` snapshot exports: that snapshot (the volume as it was when it
    /// was taken), which the controller finds in its records; `None`: the volume as it is now.
    #[serde(default)]
    pub snapshot: Option<ExportedSnapshot>,
}

/// The snapshot an export is converted from, and where its files are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportedSnapshot {
    pub name: String,
    pub files: Vec<SnapshotFile>,
}

/// A restore from a backup target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSource {
    /// `TARGET#NAME` (`backup-url`).
    pub backup_url: String,
}

impl ImageSource {
    /// The source of a spec `backing::object::validate_spec` accepted (an older record that
    /// would no longer pass gives an error naming the parameter). An export's snapshot is
    /// not known here: the caller that reads the records sets it.
    pub fn from_spec(spec: &BackingImageSpec) -> Result<ImageSource, String> {
        let params = &spec.source_parameters;
        // Required values as given (validation refuses empty ones).
        let required = |key: &str| {
            params
                .get(key)
                .filter(|v| !v.trim().is_empty())
                .cloned()
                .ok_or_else(|| format!("the source parameter {key:?} is missing"))
        };
        Ok(match spec.source_type {
            SourceType::Download => ImageSource::Download(DownloadSource::from_params(params)?),
            SourceType::ExportFromVolume => {
                let volume_name = required("volume-name")?;
                let format = match required("export-type")?.as_str() {
                    "raw" => ImageFormat::Raw,
                    "qcow2" => ImageFormat::Qcow2,
                    t => {
                        return Err(format!(
                            "export-type {t:?} is not supported; use raw or qcow2"
                        ));
                    }
                };
                ImageSource::ExportFromVolume(ExportSource {
                    volume_id: volume_id_for(&volume_name),
                    volume_name,
                    format,
                    snapshot: None,
                })
            }
            SourceType::Upload => ImageSource::Upload,
            SourceType::Restore => ImageSource::Restore(RestoreSource {
                backup_url: required("backup-url")?,
            }),
        })
    }

    pub fn source_type(&self) -> SourceType {
        match self {
            ImageSource::Download(_) => SourceType::Download,
            ImageSource::ExportFromVolume(_) => SourceType::ExportFromVolume,
            ImageSource::Upload => SourceType::Upload,
            ImageSource::Restore(_) => SourceType::Restore,
        }
    }
}

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
}

/// A parameter's value, trimmed; `None` when it is missing or empty.
pub fn param<'a>(params: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    params.get(key).map(|v| v.trim()).filter(|v| !v.is_empty())
}

/// The files a download's private-URL parameters name (paths only: the secrets stay in them).
pub fn access_files_of(params: &BTreeMap<String, String>) -> AccessFiles {
    let path = |key: &str| param(params, key).map(PathBuf::from);
    AccessFiles {
        headers: path("headersFile"),
        authorization: path("authorizationFile"),
        username: path("usernameFile"),
        password: path("passwordFile"),
        ca_bundle: path("caBundleFile"),
    }
}

/// The source parameters that name Kubernetes objects: only a store in a cluster reads them.
pub const CLUSTER_KEYS: &[&str] = &["secret", "caBundleConfigMap"];

impl DownloadSource {
    /// The download the parameters of a `download` source describe.
    pub fn from_params(params: &BTreeMap<String, String>) -> Result<DownloadSource, String> {
        let path = |key: &str| param(params, key).map(PathBuf::from);
        let files = access_files_of(params);
        Ok(DownloadSource {
            url: params
                .get("url")
                .cloned()
                .ok_or("the source parameter \"url\" is missing")?,
            source_checksum: params
                .get("sourceChecksum")
                .map(|c| SourceChecksum::parse(c))
                .transpose()?,
            headers_file: files.headers,
            authorization_file: files.authorization,
            username_file: files.username,
            password_file: files.password,
            ca_bundle_file: files.ca_bundle,
            endpoint: param(params, "endpoint").map(str::to_string),
            region: param(params, "region").map(str::to_string),
            access_key_id_file: path("accessKeyIdFile"),
            secret_access_key_file: path("secretAccessKeyFile"),
            docker_config_file: path("dockerConfigFile"),
            names_cluster_objects: CLUSTER_KEYS.iter().any(|k| param(params, k).is_some()),
        })
    }

    pub fn kind(&self) -> UrlKind {
        UrlKind::of(&self.url)
    }

    /// The files its private-URL options name (paths only: the secrets stay in them).
    pub fn access_files(&self) -> AccessFiles {
        AccessFiles {
            headers: self.headers_file.clone(),
            authorization: self.authorization_file.clone(),
            username: self.username_file.clone(),
            password: self.password_file.clone(),
            ca_bundle: self.ca_bundle_file.clone(),
        }
    }

    /// What the download needs besides its URL, from the files the source names or, for a
    /// source that names a Secret or ConfigMap, from the `credentials` the controller read
    /// from them. Errors name the key and the file or object, never a value.
    pub fn access(&self, credentials: Option<&Credentials>) -> Result<(Remote, Access), String> {
        if self.names_cluster_objects && credentials.is_none() {
            return Err(
                "its source names a Secret or ConfigMap, and their values were not handed over (the controller reads them and starts the download again)"
                    .to_string(),
            );
        }
        let secret = credentials.filter(|c| !c.origin.is_empty());
        let ca = match credentials.map(|c| c.ca_pem()).transpose()?.flatten() {
            Some(pem) => Some(pem),
            None => self.access_files().load()?.ca_bundle,
        };
        match self.kind() {
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
                    None => self.access_files().load()?,
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
                    None => match (&self.access_key_id_file, &self.secret_access_key_file) {
                        (Some(i), Some(k)) => Some(s3::S3Keys {
                            access_key_id: read_file("accessKeyIdFile", i)?.trim().to_string(),
                            secret_access_key: read_file("secretAccessKeyFile", k)?
                                .trim()
                                .to_string(),
                        }),
                        _ => None,
                    },
                };
                let remote = Remote::S3(s3::S3Access {
                    endpoint: self.endpoint.clone(),
                    region: self
                        .region
                        .clone()
                        .unwrap_or_else(|| s3::DEFAULT_REGION.to_string()),
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
                        if let Some(cfg) =
                            c.get(".dockerconfigjson").or_else(|| c.get("config.json"))
                        {
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
                        if let Some(p) = &self.docker_config_file {
                            let text = read_file("dockerConfigFile", p)?;
                            oci::OciAccess::check_docker_config(
                                &format!("dockerConfigFile {}", p.display()),
                                &text,
                            )?;
                            access.docker_config = Some(text);
                        } else if let (Some(u), Some(pw)) =
                            (&self.username_file, &self.password_file)
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
}

fn read_file(key: &str, path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "{key} {}: cannot read it ({e}); check the path and that bicsi may read it",
            path.display()
        )
    })?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

/// `sourceChecksum` on the wire as the text it is written in (`sha256:HEX`).
mod source_checksum {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::download::SourceChecksum;

    pub fn serialize<S: Serializer>(c: &Option<SourceChecksum>, s: S) -> Result<S::Ok, S::Error> {
        match c {
            Some(c) => s.serialize_some(&c.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SourceChecksum>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| SourceChecksum::parse(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::backing_image::spec_of as spec;

    #[test]
    fn each_source_type_parses_into_its_typed_value() {
        let d = ImageSource::from_spec(&spec(
            SourceType::Download,
            &[("url", "s3://b/k.qcow2"), ("sourceChecksum", "SHA256:AB")],
        ));
        assert!(
            d.unwrap_err().contains("sha256"),
            "a bad sourceChecksum is refused"
        );
        let sha = "a".repeat(64);
        let d = ImageSource::from_spec(&spec(
            SourceType::Download,
            &[
                ("url", "s3://b/k.qcow2"),
                ("sourceChecksum", &format!("SHA256:{sha}")),
                ("region", " eu-1 "),
                ("accessKeyIdFile", "/k/id"),
                ("secretAccessKeyFile", "/k/secret"),
                ("secret", ""),
            ],
        ))
        .unwrap();
        let ImageSource::Download(d) = d else {
            panic!("{d:?}")
        };
        assert_eq!(d.kind(), UrlKind::S3);
        assert_eq!(
            d.source_checksum.as_ref().unwrap().to_string(),
            format!("sha256:{sha}")
        );
        assert_eq!(d.region.as_deref(), Some("eu-1"));
        assert_eq!(d.access_key_id_file, Some(PathBuf::from("/k/id")));
        assert!(!d.names_cluster_objects, "an empty secret names nothing");

        let e = ImageSource::from_spec(&spec(
            SourceType::ExportFromVolume,
            &[("volume-name", "a/b c"), ("export-type", "raw")],
        ))
        .unwrap();
        assert_eq!(
            e,
            ImageSource::ExportFromVolume(ExportSource {
                volume_name: "a/b c".into(),
                volume_id: volume_id_for("a/b c"),
                format: ImageFormat::Raw,
                snapshot: None,
            })
        );
        assert!(
            ImageSource::from_spec(&spec(
                SourceType::ExportFromVolume,
                &[("volume-name", "v"), ("export-type", "vmdk")],
            ))
            .unwrap_err()
            .contains("vmdk")
        );
        assert_eq!(
            ImageSource::from_spec(&spec(SourceType::Upload, &[])).unwrap(),
            ImageSource::Upload
        );
        let r = ImageSource::from_spec(&spec(SourceType::Restore, &[("backup-url", "s3://t#img")]));
        assert_eq!(
            r.unwrap(),
            ImageSource::Restore(RestoreSource {
                backup_url: "s3://t#img".into()
            })
        );
        assert!(
            ImageSource::from_spec(&spec(SourceType::Restore, &[]))
                .unwrap_err()
                .contains("backup-url")
        );
    }

    #[test]
    fn the_typed_source_goes_over_the_wire_and_back() {
        let sha = "b".repeat(128);
        let s = ImageSource::from_spec(&spec(
            SourceType::Download,
            &[
                ("url", "https://example.com/i.qcow2"),
                ("sourceChecksum", &format!("sha512:{sha}")),
                ("caBundleConfigMap", "ca"),
            ],
        ))
        .unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains(&format!("\"sourceChecksum\":\"sha512:{sha}\"")),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<ImageSource>(&json).unwrap(), s);
        let ImageSource::Download(d) = &s else {
            panic!()
        };
        assert!(d.names_cluster_objects);
        let e = d.access(None).unwrap_err();
        assert!(e.contains("Secret or ConfigMap"), "{e}");
    }

    #[test]
    fn a_record_as_older_versions_wrote_it_loads_and_gives_its_typed_source() {
        // The stored shape is the same before and after the source became typed: sourceType
        // and sourceParameters, nothing more.
        let json = r#"{"apiVersion":"longhorn.io/v1beta2","kind":"BackingImage",
            "metadata":{"name":"img"},
            "spec":{"sourceType":"export-from-volume",
                    "sourceParameters":{"volume-name":"v1","export-type":"qcow2"}},
            "status":{"uuid":"0123abcd","diskFileStatusMap":{"d1":{"state":"in-progress",
                "progress":5,"lastStateTransitionTime":"2033-05-18T03:33:20Z"}}}}"#;
        let bi: crate::model::backing_image::BackingImage = serde_json::from_str(json).unwrap();
        assert_eq!(bi.spec.min_number_of_copies, 1);
        assert_eq!(
            bi.status.disk_file_status_map["d1"].state,
            crate::model::file_state::FileState::InProgress
        );
        assert_eq!(
            ImageSource::from_spec(&bi.spec).unwrap(),
            ImageSource::ExportFromVolume(ExportSource {
                volume_name: "v1".into(),
                volume_id: "v1".into(),
                format: ImageFormat::Qcow2,
                snapshot: None,
            })
        );
    }
}
