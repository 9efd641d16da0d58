//! The backup target: where backups live off the cluster, reached through one object-store seam
//! (`put`, `get`, `list`, `delete` of keys under the target's prefix). `file:///PATH` is a
//! directory on a mounted filesystem (NFS or local); `s3://BUCKET/PREFIX` an S3 bucket, with
//! `?endpoint=URL&region=R&path-style=true` for self-hosted stores. Both go through the
//! `object_store` crate (Apache Arrow), whose local store writes each object to a temporary file
//! and renames it into place, and whose S3 PUT is atomic per object, so a reader never sees half
//! an object. The local store runs with fsync on: each object's data is synced before its
//! rename, and the directories whose entries changed (the rename's, new ones) after it, so a
//! put that returned is on disk, and a crash cannot leave a backup's metadata (put after its
//! blocks) without the blocks it lists. [`check_new_target`] is what `set setting
//! backup-target` runs before it stores a URL. This module owns the URL syntax, the credentials file and the error wording (every
//! error names the target); it must not know what the keys mean (`crate::backup::layout` does).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::{Error, Result};

/// What a `backup-target` URL names, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetUrl {
    /// A directory: `file:///PATH`.
    File { path: PathBuf },
    /// A bucket and a key prefix (may be empty), with the options of a self-hosted store.
    S3 {
        bucket: String,
        prefix: String,
        endpoint: Option<String>,
        region: Option<String>,
        path_style: bool,
    },
}

impl TargetUrl {
    /// Parses `file:///PATH` or `s3://BUCKET[/PREFIX][?endpoint=…&region=…&path-style=true]`.
    pub fn parse(url: &str) -> Result<TargetUrl> {
        let url = url.trim();
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "backup target {url:?}: {why}; use file:///PATH or s3://BUCKET/PREFIX[?endpoint=URL&region=R&path-style=true]"
            ))
        };
        if url.is_empty() {
            return Err(Error::FailedPrecondition(
                "no backup target is set; set one with `bicsi set setting backup-target file:///PATH` (or s3://BUCKET/PREFIX)".into(),
            ));
        }
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') || path.len() < 2 {
                return Err(bad("a file target needs an absolute path"));
            }
            if path.contains('?') {
                return Err(bad("a file target takes no options"));
            }
            return Ok(TargetUrl::File {
                path: PathBuf::from(path.trim_end_matches('/')),
            });
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(bad("unknown scheme"));
        };
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err(bad("the bucket is missing"));
        }
        let mut options: BTreeMap<&str, &str> = BTreeMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
            if !matches!(k, "endpoint" | "region" | "path-style") {
                return Err(bad(&format!(
                    "unknown option {k:?} (the options are endpoint, region, path-style)"
                )));
            }
            options.insert(k, v);
        }
        let path_style = match options.get("path-style").copied() {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => return Err(bad(&format!("path-style={other:?} is not true or false"))),
        };
        Ok(TargetUrl::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: options.get("endpoint").map(|s| s.to_string()),
            region: options.get("region").map(|s| s.to_string()),
            path_style,
        })
    }
}

/// Credentials of an S3 target, read from a file of `KEY=VALUE` lines.
#[derive(Clone, Default)]
struct Credentials {
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
}

fn read_credentials(file: &Path) -> Result<Credentials> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        Error::FailedPrecondition(format!(
            "backup target credential file {}: {e}; fix the setting backup-target-credential-file or create the file",
            file.display()
        ))
    })?;
    let mut c = Credentials::default();
    for line in text.lines() {
        let line = line.trim().trim_start_matches("export ");
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_string();
        match k.trim() {
            "AWS_ACCESS_KEY_ID" => c.access_key_id = Some(v),
            "AWS_SECRET_ACCESS_KEY" => c.secret_access_key = Some(v),
            "AWS_SESSION_TOKEN" => c.session_token = Some(v),
            _ => {}
        }
    }
    if c.access_key_id.is_none() || c.secret_access_key.is_none() {
        return Err(Error::FailedPrecondition(format!(
            "backup target credential file {} has no AWS_ACCESS_KEY_ID=… and AWS_SECRET_ACCESS_KEY=… lines",
            file.display()
        )));
    }
    Ok(c)
}

/// An opened backup target.
#[derive(Clone)]
pub struct Target {
    /// The URL as the user gave it (no secrets are in it), for messages.
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({})", self.url)
    }
}

impl Target {
    /// Opens the target `url` (with an S3 target's credentials from `credential_file`; without
    /// one, the usual AWS_* environment variables). Nothing is reached yet: see [`Target::check`].
    pub fn open(url: &str, credential_file: Option<&Path>) -> Result<Target> {
        let parsed = TargetUrl::parse(url)?;
        let url = url.trim().to_string();
        match parsed {
            TargetUrl::File { path } => {
                if path.exists() && !path.is_dir() {
                    return Err(Error::FailedPrecondition(format!(
                        "backup target {url}: {} is not a directory; give the path of a directory (an NFS mount or any filesystem)",
                        path.display()
                    )));
                }
                if !path.is_dir() {
                    return Err(Error::FailedPrecondition(format!(
                        "backup target {url}: directory {} does not exist; create it or mount the backup filesystem there",
                        path.display()
                    )));
                }
                let store = object_store::local::LocalFileSystem::new_with_prefix(&path)
                    .map_err(|e| Error::FailedPrecondition(format!("backup target {url}: {e}")))?
                    .with_fsync(true);
                Ok(Target {
                    url,
                    store: Arc::new(store),
                    prefix: String::new(),
                })
            }
            TargetUrl::S3 {
                bucket,
                prefix,
                endpoint,
                region,
                path_style,
            } => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&bucket)
                    .with_region(region.unwrap_or_else(|| "us-east-1".into()))
                    .with_virtual_hosted_style_request(!path_style)
                    // An unreachable target answers within seconds, with its name, not after
                    // the default minutes of retries.
                    .with_retry(object_store::RetryConfig {
                        max_retries: 2,
                        retry_timeout: Duration::from_secs(10),
                        ..Default::default()
                    })
                    .with_client_options(
                        object_store::ClientOptions::new()
                            .with_connect_timeout(Duration::from_secs(5))
                            .with_timeout(Duration::from_secs(120)),
                    );
                if let Some(ep) = &endpoint {
                    b = b
                        .with_endpoint(ep)
                        .with_allow_http(ep.starts_with("http://"));
                }
                if let Some(file) = credential_file {
                    let c = read_credentials(file)?;
                    b = b
                        .with_access_key_id(c.access_key_id.unwrap_or_default())
                        .with_secret_access_key(c.secret_access_key.unwrap_or_default());
                    if let Some(t) = c.session_token {
                        b = b.with_token(t);
                    }
                }
                let store = b
                    .build()
                    .map_err(|e| Error::FailedPrecondition(format!("backup target {url}: {e}")))?;
                Ok(Target {
                    url,
                    store: Arc::new(store),
                    prefix,
                })
            }
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn key_of(&self, path: &ObjectPath) -> String {
        let p = path.as_ref();
        if self.prefix.is_empty() {
            p.to_string()
        } else {
            p.strip_prefix(&format!("{}/", self.prefix))
                .unwrap_or(p)
                .to_string()
        }
    }

    fn error(&self, what: &str, key: &str, e: object_store::Error) -> Error {
        Error::Unavailable(format!(
            "backup target {}: cannot {what} {key}: {e}; check that the target is reachable and its credentials",
            self.url
        ))
    }

    /// Reaches the target once (a listing of its root): Ok, or an error naming it.
    pub async fn check(&self) -> Result<()> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        self.store
            .list_with_delimiter(prefix.as_ref())
            .await
            .map(drop)
            .map_err(|e| self.error("list", "its root", e))
    }

    /// Stores `bytes` at `key`, replacing what is there; readers see the old or the new object,
    /// never a part.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        self.store
            .put(&self.path(key), PutPayload::from_bytes(bytes))
            .await
            .map(drop)
            .map_err(|e| self.error("write", key, e))
    }

    /// The object at `key`, or None when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        match self.store.get(&self.path(key)).await {
            Ok(r) => r
                .bytes()
                .await
                .map(Some)
                .map_err(|e| self.error("read", key, e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("read", key, e)),
        }
    }

    /// Every key under `prefix` (a folder: `a/b`), relative to the target.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let p = self.path(prefix);
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&p))
            .try_collect()
            .await
            .map_err(|e| self.error("list", prefix, e))?;
        Ok(metas.iter().map(|m| self.key_of(&m.location)).collect())
    }

    /// The folders right under `prefix` (their last component only).
    pub async fn folders(&self, prefix: &str) -> Result<Vec<String>> {
        let p = self.path(prefix);
        let listing = self
            .store
            .list_with_delimiter(Some(&p))
            .await
            .map_err(|e| self.error("list", prefix, e))?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// Removes `key`; Ok when it is gone already.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", key, e)),
        }
    }
}

/// Checks a URL before the setting `backup-target` takes it: it parses, the target answers (with
/// the credentials of `credential_file`), and an object can be written there and removed. An
/// empty URL (no target) passes. The error names the target and says what to fix.
pub async fn check_new_target(url: &str, credential_file: Option<&Path>) -> Result<()> {
    if url.trim().is_empty() {
        return Ok(());
    }
    let hint = |e: Error| {
        let s3 = url.trim().starts_with("s3://");
        let fix = if s3 && credential_file.is_none() {
            "; when the store needs credentials, set backup-target-credential-file first"
        } else {
            ""
        };
        let text = format!("{e}{fix}; the setting backup-target is unchanged");
        match e {
            Error::InvalidArgument(_) => Error::InvalidArgument(text),
            Error::Unavailable(_) => Error::Unavailable(text),
            _ => Error::FailedPrecondition(text),
        }
    };
    let t = Target::open(url, credential_file).map_err(hint)?;
    t.check().await.map_err(hint)?;
    let probe = format!(".bicsi-check-{}", uuid::Uuid::new_v4().simple());
    t.put(
        &probe,
        Bytes::from_static(b"bicsi checks that it can write to this backup target\n"),
    )
    .await
    .map_err(hint)?;
    t.delete(&probe).await.map_err(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checks `set setting backup-target` runs: a missing directory, a file, an unreachable
    /// store are refused with the target and the fix; a writable directory passes and keeps no
    /// probe object.
    #[tokio::test]
    async fn a_new_target_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ok = format!("file://{}", dir.path().display());
        check_new_target(&ok, None).await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        check_new_target("", None).await.unwrap();

        let missing = format!("file://{}/nope", dir.path().display());
        let e = check_new_target(&missing, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&missing) && e.contains("create it"), "{e}");
        assert!(e.contains("unchanged"), "{e}");
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let not_dir = format!("file://{}", file.display());
        let e = check_new_target(&not_dir, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&not_dir) && e.contains("not a directory"), "{e}");

        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let url = format!("s3://b/x?endpoint=http://127.0.0.1:{port}&path-style=true");
        let e = check_new_target(&url, None).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        let e = e.to_string();
        assert!(
            e.contains(&url) && e.contains("backup-target-credential-file"),
            "{e}"
        );
    }

    #[test]
    fn urls_table() {
        assert_eq!(
            TargetUrl::parse("file:///mnt/backups/").unwrap(),
            TargetUrl::File {
                path: "/mnt/backups".into()
            }
        );
        assert_eq!(
            TargetUrl::parse("s3://b/p/q?endpoint=http://127.0.0.1:9000&region=r1&path-style=true")
                .unwrap(),
            TargetUrl::S3 {
                bucket: "b".into(),
                prefix: "p/q".into(),
                endpoint: Some("http://127.0.0.1:9000".into()),
                region: Some("r1".into()),
                path_style: true,
            }
        );
        assert_eq!(
            TargetUrl::parse("s3://b").unwrap(),
            TargetUrl::S3 {
                bucket: "b".into(),
                prefix: String::new(),
                endpoint: None,
                region: None,
                path_style: false,
            }
        );
        for (bad, want) in [
            ("nfs://h/x", "unknown scheme"),
            ("file://rel", "absolute path"),
            ("s3:///p", "bucket is missing"),
            ("s3://b?colour=red", "\"colour\""),
            ("s3://b?path-style=maybe", "maybe"),
        ] {
            let e = TargetUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(bad), "{bad}: {e}");
        }
        let e = TargetUrl::parse("").unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.to_string().contains("bicsi set setting backup-target"));
    }

    #[tokio::test]
    async fn file_target_round_trip_and_errors_name_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let t = Target::open(&url, None).unwrap();
        t.check().await.unwrap();
        assert_eq!(t.get("a/b.json").await.unwrap(), None);
        t.put("a/b.json", Bytes::from_static(b"one")).await.unwrap();
        t.put("a/c/d.zst", Bytes::from_static(b"two"))
            .await
            .unwrap();
        t.put("a/b.json", Bytes::from_static(b"three"))
            .await
            .unwrap();
        assert_eq!(t.get("a/b.json").await.unwrap().unwrap(), &b"three"[..]);
        let mut keys = t.list("a").await.unwrap();
        keys.sort();
        assert_eq!(keys, ["a/b.json", "a/c/d.zst"]);
        assert_eq!(t.folders("a").await.unwrap(), ["c"]);
        // No temporary file is left beside the objects.
        assert_eq!(std::fs::read_dir(dir.path().join("a")).unwrap().count(), 2);
        t.delete("a/b.json").await.unwrap();
        t.delete("a/b.json").await.unwrap();
        assert_eq!(t.list("a").await.unwrap(), ["a/c/d.zst"]);

        let missing = format!("file://{}/nope", dir.path().display());
        let e = Target::open(&missing, None).unwrap_err().to_string();
        assert!(e.contains(&missing) && e.contains("does not exist"), "{e}");
    }

    #[tokio::test]
    async fn unreachable_s3_target_is_named_in_the_error() {
        // A port nothing listens on: connection refused, reported with the target's URL.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let url = format!("s3://bucket/x?endpoint=http://127.0.0.1:{port}&path-style=true");
        let creds = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            creds.path(),
            "AWS_ACCESS_KEY_ID=k\nAWS_SECRET_ACCESS_KEY=s\n",
        )
        .unwrap();
        let t = Target::open(&url, Some(creds.path())).unwrap();
        let e = t.check().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.to_string().contains(&url), "{e}");
        let bad = tempfile::NamedTempFile::new().unwrap();
        let e = Target::open(&url, Some(bad.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("AWS_ACCESS_KEY_ID"), "{e}");
    }
}
