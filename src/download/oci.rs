//! The OCI registry source: `docker://REGISTRY/REPO:TAG` (or `@sha256:…`, or `oci://`), the
//! disk image inside a layer of a container image the way KubeVirt's containerDisks carry it:
//! one regular file under `/disk/` of a layer's tar, the layer gzip- or zstd-compressed or not.
//!
//! [`resolve`] speaks the registry API (distribution spec) up to the layer: the manifest (an
//! index or manifest list picks the entry of this node's platform), the registry's
//! authentication (a `401` with `WWW-Authenticate: Bearer realm=…,service=…,scope=…` is answered
//! by fetching a token from the realm, with the pull credentials when given; `Basic` is answered
//! with the credentials), and returns the layer blob's URL with its `Authorization` and digest.
//! The download pipeline then streams the blob like any body: the layer's sha256 (the
//! registry's own checksum, its digest) is checked as the source checksum, the compression
//! decoded on its thread, and the tar unpacked as it streams by [`DiskEntry`], which hands on
//! only the disk file's bytes, so holes are kept as for any download.
//!
//! Credentials come from a docker config (`.dockerconfigjson`, as `kubectl create secret
//! docker-registry` writes it, or the file `dockerConfigFile` names) or a user and password;
//! they are never shown: tokens and passwords travel only in headers marked sensitive.
//! It must not know about backing-image objects or Kubernetes.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use reqwest::header::{self, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::guard::NetworkGuard;
use super::{Access, DownloadError, Head, SourceAlgo, SourceChecksum};
use crate::messages::error_chain;

/// Where a containerDisk keeps its image.
pub const DISK_DIR: &str = "disk/";

/// The manifest types asked for, images and indexes, OCI and Docker.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Manifests larger than this are refused (real ones are a few KiB).
const MAX_MANIFEST: usize = 4 << 20;
/// Compressed bytes [`head`] reads at most to find the disk image's first bytes.
const HEAD_LIMIT: usize = 16 << 20;

/// An image reference, parsed from `docker://…` or `oci://…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`; `registry-1.docker.io` for Docker Hub.
    pub registry: String,
    /// `library/ubuntu`, `kubevirt/fedora-cloud-container-disk-demo`.
    pub repository: String,
    /// A tag or a `sha256:…` digest.
    pub reference: String,
}

impl Reference {
    /// Parses `docker://[REGISTRY/]REPO[:TAG|@DIGEST]` (or `oci://`); no registry means Docker
    /// Hub, no tag means `latest`.
    pub fn parse(url: &str) -> Result<Reference, String> {
        let url = url.trim();
        let rest = url
            .strip_prefix("docker://")
            .or_else(|| url.strip_prefix("oci://"))
            .ok_or_else(|| {
                format!("{url:?} is not a registry image; write docker://REGISTRY/REPO:TAG")
            })?;
        let bad = |why: &str| {
            format!(
                "{url}: {why}; write docker://REGISTRY/REPO:TAG or docker://REGISTRY/REPO@sha256:DIGEST"
            )
        };
        if rest.is_empty() || rest.contains(char::is_whitespace) {
            return Err(bad("no image named"));
        }
        let (first, after) = rest.split_once('/').unwrap_or(("", rest));
        let (registry, path) =
            if !first.is_empty() && (first.contains(['.', ':']) || first == "localhost") {
                (first.to_string(), after.to_string())
            } else {
                ("registry-1.docker.io".to_string(), rest.to_string())
            };
        let (name, reference) = if let Some((n, d)) = path.split_once('@') {
            let hex = d
                .strip_prefix("sha256:")
                .ok_or_else(|| bad("only sha256 digests"))?;
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(
                    "the digest is not sha256: and 64 hexadecimal characters",
                ));
            }
            (n.to_string(), d.to_ascii_lowercase())
        } else {
            match path.rsplit_once(':') {
                Some((n, t)) if !t.contains('/') => (n.to_string(), t.to_string()),
                _ => (path.clone(), "latest".to_string()),
            }
        };
        let name_ok = !name.is_empty()
            && name.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !name_ok {
            return Err(bad(
                "the repository is not lower-case letters, digits, '.', '_', '-' and '/'",
            ));
        }
        let tag_ok = reference.starts_with("sha256:")
            || (reference.len() <= 128
                && reference
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
        if !tag_ok {
            return Err(bad("the tag is not letters, digits, '.', '_' and '-'"));
        }
        let repository = if registry == "registry-1.docker.io" && !name.contains('/') {
            format!("library/{name}")
        } else {
            name
        };
        Ok(Reference {
            registry,
            repository,
            reference,
        })
    }

    /// `http` for a registry on this machine (as Docker treats localhost and 127.0.0.0/8 as
    /// insecure registries by default), `https` for every other.
    fn scheme(&self) -> &'static str {
        let host = self
            .registry
            .rsplit_once(':')
            .map_or(self.registry.as_str(), |(h, _)| h);
        let local = host == "localhost"
            || host == "[::1]"
            || host
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|a| a.is_loopback());
        if local { "http" } else { "https" }
    }

    fn base(&self) -> String {
        format!(
            "{}://{}/v2/{}",
            self.scheme(),
            self.registry,
            self.repository
        )
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = if self.reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        write!(
            f,
            "docker://{}/{}{sep}{}",
            self.registry, self.repository, self.reference
        )
    }
}

/// What picks an index's entry: `linux` and the architecture bicsi runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
}

impl Default for Platform {
    fn default() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "powerpc64" => "ppc64le",
            "x86" => "386",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
        }
    }
}

/// How to reach an image: credentials (never shown) and the platform to pick.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct OciAccess {
    /// A docker config (`{"auths": {"REGISTRY": {"auth": base64(user:password)}}}`): the
    /// entry of the image's registry is used.
    pub docker_config: Option<String>,
    /// User and password, when given directly instead.
    pub basic: Option<(String, String)>,
    pub platform: Platform,
}

impl fmt::Debug for OciAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OciAccess")
            .field(
                "docker_config",
                &self.docker_config.as_ref().map(|_| "<redacted>"),
            )
            .field("basic", &self.basic.as_ref().map(|_| "<redacted>"))
            .field("platform", &self.platform)
            .finish()
    }
}

impl OciAccess {
    /// Checks a docker config's shape (not its entries' secrets): for errors at create time.
    pub fn check_docker_config(what: &str, text: &str) -> Result<(), String> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| format!("{what}: not JSON ({e}); give a docker config such as ~/.docker/config.json or a Secret's .dockerconfigjson"))?;
        if !v.get("auths").is_some_and(Value::is_object) {
            return Err(format!(
                "{what}: no \"auths\" object; give a docker config such as ~/.docker/config.json or a Secret's .dockerconfigjson"
            ));
        }
        Ok(())
    }

    /// The user and password for `registry`: the direct ones, else the docker config's entry.
    fn credentials(&self, registry: &str) -> Result<Option<(String, String)>, String> {
        if let Some(b) = &self.basic {
            return Ok(Some(b.clone()));
        }
        let Some(text) = &self.docker_config else {
            return Ok(None);
        };
        let v: Value = serde_json::from_str(text)
            .map_err(|e| format!("the docker config is not JSON ({e})"))?;
        let auths = v
            .get("auths")
            .and_then(Value::as_object)
            .ok_or_else(|| "the docker config has no \"auths\" object".to_string())?;
        let hub = registry == "registry-1.docker.io";
        let entry = auths.iter().find(|(k, _)| {
            let k = k
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/');
            let host = k.split('/').next().unwrap_or(k);
            host == registry
                || (hub
                    && matches!(
                        host,
                        "docker.io" | "index.docker.io" | "registry-1.docker.io"
                    ))
        });
        let Some((_, e)) = entry else {
            return Ok(None);
        };
        if let Some(auth) = e.get("auth").and_then(Value::as_str) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| {
                    format!("the docker config's entry for {registry}: \"auth\" is not base64")
                })?;
            let text = String::from_utf8(raw).map_err(|_| {
                format!("the docker config's entry for {registry}: \"auth\" is not UTF-8")
            })?;
            let (u, p) = text.split_once(':').ok_or_else(|| {
                format!("the docker config's entry for {registry}: \"auth\" is not base64(user:password)")
            })?;
            return Ok(Some((u.to_string(), p.to_string())));
        }
        match (
            e.get("username").and_then(Value::as_str),
            e.get("password").and_then(Value::as_str),
        ) {
            (Some(u), Some(p)) => Ok(Some((u.to_string(), p.to_string()))),
            _ => Err(format!(
                "the docker config's entry for {registry} has neither \"auth\" nor \"username\" and \"password\""
            )),
        }
    }
}

/// A registry's refusal explained.
pub fn explain(status: StatusCode) -> Option<&'static str> {
    match status.as_u16() {
        401 | 403 => Some(
            "the registry refused the pull: check the pull Secret (or dockerConfigFile) and that it may read this repository",
        ),
        404 => Some("the registry has no such blob"),
        _ => None,
    }
}

/// The layer blob to stream, ready for the download pipeline.
pub struct Blob {
    pub url: Url,
    /// The image as shown in messages.
    pub shown: String,
    /// `Authorization` for the blob, when the registry wants one.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The layer's digest: the sha256 of the blob's bytes.
    pub digest: SourceChecksum,
    /// The blob's size, as the manifest says.
    pub size: Option<u64>,
}

/// A registry client for one repository, holding the token it earned.
struct Registry<'a> {
    reference: Reference,
    shown: String,
    client: reqwest::Client,
    access: &'a OciAccess,
    extra: &'a Access,
    authorization: Option<HeaderValue>,
}

fn source_error(shown: &str, detail: impl Into<String>) -> DownloadError {
    DownloadError::Source {
        url: shown.to_string(),
        detail: detail.into(),
    }
}

/// `key="value"` pairs of a `WWW-Authenticate` challenge after its scheme.
fn challenge_params(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq]
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = &rest[eq + 1..];
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (q[..end].to_string(), &q[end + 1..]),
                None => (q.to_string(), ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (after[..end].trim().to_string(), &after[end..]),
                None => (after.trim().to_string(), ""),
            }
        };
        out.push((key, value));
        rest = next;
    }
    out
}

fn sensitive(v: &str) -> Option<HeaderValue> {
    let mut h = HeaderValue::from_str(v).ok()?;
    h.set_sensitive(true);
    Some(h)
}

fn basic_value(user: &str, pass: &str) -> HeaderValue {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    sensitive(&format!("Basic {token}")).expect("base64 is a valid header value")
}

impl Registry<'_> {
    fn err(&self, detail: impl Into<String>) -> DownloadError {
        source_error(&self.shown, detail)
    }

    fn connection(&self, e: reqwest::Error) -> DownloadError {
        if let Some(refusal) = super::guard::refusal_in(&e) {
            return DownloadError::Denied {
                url: self.shown.clone(),
                refusal,
            };
        }
        if let Some(detail) = super::untrusted_in(&e) {
            return DownloadError::Untrusted {
                url: self.shown.clone(),
                detail,
            };
        }
        DownloadError::Connection {
            url: self.shown.clone(),
            attempts: 1,
            last: error_chain(&e.without_url()),
        }
    }

    /// A GET that answers the registry's challenge once; returns the answer (any status).
    async fn get(
        &mut self,
        url: &str,
        accept: Option<&str>,
        range: Option<&str>,
    ) -> Result<reqwest::Response, DownloadError> {
        let mut challenged = false;
        loop {
            let mut req = self.client.get(url);
            for (n, v) in &self.extra.headers {
                req = req.header(n, v);
            }
            if let Some(a) = &self.authorization {
                req = req.header(header::AUTHORIZATION, a.clone());
            }
            if let Some(a) = accept {
                req = req.header(header::ACCEPT, a);
            }
            if let Some(r) = range {
                req = req
                    .header(header::RANGE, r)
                    .header(header::ACCEPT_ENCODING, "identity");
            }
            let resp = req.send().await.map_err(|e| self.connection(e))?;
            if resp.status() != StatusCode::UNAUTHORIZED || challenged {
                return Ok(resp);
            }
            challenged = true;
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            self.answer(&challenge).await?;
        }
    }

    /// Earns the `Authorization` a challenge asks for.
    async fn answer(&mut self, challenge: &str) -> Result<(), DownloadError> {
        let creds = self
            .access
            .credentials(&self.reference.registry)
            .map_err(|e| self.err(e))?;
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                let Some((u, p)) = creds else {
                    return Err(self.err(format!(
                        "the registry {} wants credentials (HTTP 401, basic authentication); give a pull Secret (secret) or dockerConfigFile",
                        self.reference.registry
                    )));
                };
                self.authorization = Some(basic_value(&u, &p));
                Ok(())
            }
            "bearer" => {
                let params = challenge_params(params);
                let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                let realm = get("realm").ok_or_else(|| {
                    self.err("the registry's Bearer challenge names no realm to get a token from")
                })?;
                let mut url = Url::parse(&realm).map_err(|e| {
                    self.err(format!("the registry's token realm {realm:?} is not a URL ({e})"))
                })?;
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = get("service") {
                        q.append_pair("service", &s);
                    }
                    let scope = get("scope").unwrap_or_else(|| {
                        format!("repository:{}:pull", self.reference.repository)
                    });
                    q.append_pair("scope", &scope);
                }
                let mut req = self.client.get(url);
                if let Some((u, p)) = &creds {
                    req = req.header(header::AUTHORIZATION, basic_value(u, p));
                }
                let resp = req.send().await.map_err(|e| self.connection(e))?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(DownloadError::Refused {
                        url: self.shown.clone(),
                        status,
                        hint: if creds.is_some() {
                            "the registry's token service refused the pull credentials: check the pull Secret (or dockerConfigFile)".into()
                        } else {
                            "the registry's token service wants credentials: give a pull Secret (secret) or dockerConfigFile".into()
                        },
                    });
                }
                let body: Value = resp.json().await.map_err(|e| {
                    self.err(format!("the registry's token answer is not JSON ({})", error_chain(&e.without_url())))
                })?;
                let token = body
                    .get("token")
                    .or_else(|| body.get("access_token"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| self.err("the registry's token answer holds no token"))?;
                self.authorization = Some(sensitive(&format!("Bearer {token}")).ok_or_else(|| {
                    self.err("the registry's token is not a valid header value")
                })?);
                Ok(())
            }
            _ => Err(self.err(format!(
                "the registry {} answered 401 with an authentication scheme bicsi does not speak ({scheme:?}); Bearer and Basic are supported",
                self.reference.registry
            ))),
        }
    }

    /// A manifest by tag or digest, checked against the digest when it is one.
    async fn manifest(&mut self, reference: &str) -> Result<Value, DownloadError> {
        let bytes = self.manifest_bytes(reference).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| self.err(format!("the manifest is not JSON ({e})")))
    }

    /// The bytes of a manifest by tag or digest, checked against the digest when it is one.
    async fn manifest_bytes(&mut self, reference: &str) -> Result<Vec<u8>, DownloadError> {
        let url = format!("{}/manifests/{reference}", self.reference.base());
        let resp = self.get(&url, Some(ACCEPT), None).await?;
        let status = resp.status();
        if !status.is_success() {
            let hint = match status.as_u16() {
                401 | 403 => "the registry refused the pull: check the pull Secret (or dockerConfigFile) and that it may read this repository".to_string(),
                404 => format!("the registry {} has no such repository or tag", self.reference.registry),
                _ => "the registry did not serve the manifest".to_string(),
            };
            return Err(DownloadError::Refused {
                url: self.shown.clone(),
                status,
                hint,
            });
        }
        let mut bytes = Vec::new();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| self.err(error_chain(&e.without_url())))?;
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_MANIFEST {
                return Err(
                    self.err("the manifest is larger than 4 MiB; that is no image manifest")
                );
            }
        }
        if let Some(hex) = reference.strip_prefix("sha256:") {
            let got = hex::encode(Sha256::digest(&bytes));
            if got != hex {
                return Err(self.err(format!(
                    "the manifest {reference} the registry sent has the digest sha256:{got}; the registry is corrupt or not the one meant"
                )));
            }
        }
        Ok(bytes)
    }

    /// The image manifest for the platform: an index's matching entry, or the manifest itself.
    async fn image_manifest(&mut self) -> Result<Value, DownloadError> {
        let reference = self.reference.reference.clone();
        let top = self.manifest(&reference).await?;
        let Some(entries) = top.get("manifests").and_then(Value::as_array) else {
            return Ok(top);
        };
        let want = &self.access.platform;
        let platform_of = |e: &Value| {
            let p = e.get("platform");
            let f = |k: &str| {
                p.and_then(|p| p.get(k))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            (f("os"), f("architecture"))
        };
        let chosen = entries
            .iter()
            .find(|e| platform_of(e) == (want.os.clone(), want.architecture.clone()))
            .and_then(|e| e.get("digest").and_then(Value::as_str))
            .map(str::to_string);
        let Some(digest) = chosen else {
            let have: Vec<String> = entries
                .iter()
                .map(platform_of)
                .filter(|(os, arch)| !os.is_empty() || !arch.is_empty())
                .map(|(os, arch)| format!("{os}/{arch}"))
                .collect();
            return Err(self.err(format!(
                "the image has no entry for this node's platform {}/{} (it has: {}); use an image built for it",
                want.os,
                want.architecture,
                if have.is_empty() { "none named".to_string() } else { have.join(", ") }
            )));
        };
        self.manifest(&digest).await
    }
}

/// The layers of an image manifest, last (top) first: (digest, size).
fn layers(
    shown: &str,
    manifest: &Value,
) -> Result<Vec<(SourceChecksum, Option<u64>)>, DownloadError> {
    let list = manifest
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            source_error(
                shown,
                "the manifest lists no layers; it is not an image manifest",
            )
        })?;
    let mut out = Vec::new();
    for l in list.iter().rev() {
        let digest = l.get("digest").and_then(Value::as_str).unwrap_or("");
        let hex = digest.strip_prefix("sha256:").ok_or_else(|| {
            source_error(
                shown,
                format!("layer digest {digest:?} is not sha256; only sha256 layers are supported"),
            )
        })?;
        let checksum = SourceChecksum::parse(&format!("sha256:{hex}"))
            .map_err(|e| source_error(shown, format!("layer digest {digest:?}: {e}")))?;
        out.push((checksum, l.get("size").and_then(Value::as_u64)));
    }
    if out.is_empty() {
        return Err(source_error(
            shown,
            "the image has no layers, so no disk image",
        ));
    }
    Ok(out)
}

async fn open<'a>(
    url: &str,
    access: &'a OciAccess,
    guard: &NetworkGuard,
    extra: &'a Access,
    timeout: Duration,
) -> Result<Registry<'a>, DownloadError> {
    let reference = Reference::parse(url).map_err(|reason| DownloadError::InvalidUrl {
        url: crate::messages::redact_text(url),
        reason,
    })?;
    let shown = reference.to_string();
    let base = Url::parse(&reference.base()).map_err(|e| source_error(&shown, e.to_string()))?;
    guard
        .check_url(&base)
        .map_err(|refusal| DownloadError::Denied {
            url: shown.clone(),
            refusal,
        })?;
    let client = super::http_client(guard, timeout, extra)?;
    Ok(Registry {
        reference,
        shown,
        client,
        access,
        extra,
        authorization: None,
    })
}

fn blob_of(
    reg: &Registry<'_>,
    digest: SourceChecksum,
    size: Option<u64>,
) -> Result<Blob, DownloadError> {
    let url = Url::parse(&format!(
        "{}/blobs/sha256:{}",
        reg.reference.base(),
        digest.hex
    ))
    .map_err(|e| reg.err(e.to_string()))?;
    Ok(Blob {
        url,
        shown: reg.shown.clone(),
        headers: reg
            .authorization
            .iter()
            .map(|v| (header::AUTHORIZATION, v.clone()))
            .collect(),
        digest,
        size,
    })
}

/// Resolves the image to the layer that holds its disk image: the only layer, or of several
/// the top-most whose tar has a file under `/disk/`.
pub async fn resolve(
    url: &str,
    access: &OciAccess,
    guard: &NetworkGuard,
    extra: &Access,
    timeout: Duration,
) -> Result<Blob, DownloadError> {
    let mut reg = open(url, access, guard, extra, timeout).await?;
    let manifest = reg.image_manifest().await?;
    let layers = layers(&reg.shown, &manifest)?;
    if layers.len() == 1 {
        let (d, s) = layers.into_iter().next().expect("one layer");
        return blob_of(&reg, d, s);
    }
    for (digest, size) in layers {
        let blob = blob_of(&reg, digest, size)?;
        if peek(&mut reg, &blob, 1).await?.is_some() {
            return Ok(blob);
        }
    }
    Err(reg.err(format!(
        "no layer of the image has a file under /{DISK_DIR}; a containerDisk image keeps its disk image there"
    )))
}

/// The digest (`sha256:HEX`) of the manifest the image's tag names now (the index's, for a
/// multi-platform image): what a poll compares, and what pins a version of it.
pub async fn digest(
    url: &str,
    access: &OciAccess,
    guard: &NetworkGuard,
    extra: &Access,
    timeout: Duration,
) -> Result<String, DownloadError> {
    let mut reg = open(url, access, guard, extra, timeout).await?;
    let reference = reg.reference.reference.clone();
    let bytes = reg.manifest_bytes(&reference).await?;
    Ok(format!("sha256:{}", hex::encode(Sha256::digest(&bytes))))
}

/// The first `len` bytes of the disk image inside a layer blob and the disk image's size, read
/// from the blob's start (at most [`HEAD_LIMIT`] bytes of it); `None` when the layer's tar has
/// no file under `/disk/` before the limit.
async fn peek(
    reg: &mut Registry<'_>,
    blob: &Blob,
    len: usize,
) -> Result<Option<(Vec<u8>, u64)>, DownloadError> {
    let resp = reg
        .get(
            blob.url.as_str(),
            None,
            Some(&format!("bytes=0-{}", HEAD_LIMIT - 1)),
        )
        .await?;
    let status = resp.status();
    if !status.is_success() {
        return Err(DownloadError::HttpStatus {
            url: reg.shown.clone(),
            status,
            attempts: 1,
        });
    }
    let mut body = resp.bytes_stream();
    let mut raw = Vec::new();
    loop {
        let chunk = match body.next().await {
            None => None,
            Some(Err(e)) => return Err(reg.connection(e)),
            Some(Ok(c)) => Some(c),
        };
        let done = chunk.is_none();
        if let Some(c) = chunk {
            let take = c.len().min(HEAD_LIMIT - raw.len());
            raw.extend_from_slice(&c[..take]);
        }
        // Enough of the tar for its headers and `len` bytes of the file, decompressed.
        let tar = match super::Compression::detect(&raw) {
            Some(c) => super::decode_prefix(c, &raw, len + 64 * 1024),
            None => raw.clone(),
        };
        let mut entry = DiskEntry::new();
        let mut got = Vec::new();
        let pushed = entry.push(Bytes::from(tar), &mut |b: Bytes| {
            if got.len() < len {
                let take = b.len().min(len - got.len());
                got.extend_from_slice(&b[..take]);
            }
            Ok(())
        });
        if let Err(e) = pushed {
            return Err(reg.err(e.to_string()));
        }
        if let Some((_, size)) = entry.found() {
            if got.len() >= len.min(size as usize) {
                got.truncate(len);
                return Ok(Some((got, size)));
            }
        } else if entry.ended() {
            return Ok(None);
        }
        if done || raw.len() >= HEAD_LIMIT {
            return Ok(entry.found().map(|(_, size)| (got, size)));
        }
    }
}

/// [`super::head_remote`] of an image: the disk image's first bytes and its size.
pub async fn head(
    url: &str,
    access: &OciAccess,
    len: usize,
    timeout: Duration,
    guard: &NetworkGuard,
    extra: &Access,
) -> Result<Head, DownloadError> {
    let blob = resolve(url, access, guard, extra, timeout).await?;
    let mut reg = open(url, access, guard, extra, timeout).await?;
    reg.authorization = blob
        .headers
        .iter()
        .find(|(n, _)| n == header::AUTHORIZATION)
        .map(|(_, v)| v.clone());
    match peek(&mut reg, &blob, len).await? {
        Some((bytes, size)) => Ok(Head {
            bytes,
            total: Some(size),
            validator: None,
        }),
        None => Err(reg.err(format!(
            "the layer {} has no file under /{DISK_DIR}; a containerDisk image keeps its disk image there",
            blob.digest
        ))),
    }
}

/// Why a layer's tar does not give a disk image; carried in an [`std::io::Error`] through the
/// pipeline so the download can name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotADisk(pub String);

impl fmt::Display for NotADisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotADisk {}

/// The [`NotADisk`] an error of the pipeline carries, if it is one.
pub(super) fn not_a_disk_in(e: &std::io::Error) -> Option<&NotADisk> {
    e.get_ref()?.downcast_ref::<NotADisk>()
}

fn not_a_disk(why: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, NotADisk(why))
}

/// Where [`DiskEntry`] is in the tar stream.
enum TarState {
    /// Gathering a 512-byte header.
    Header,
    /// In an entry's data: bytes left, padding after, whether they are the disk file's, or a
    /// pax or GNU long-name record being gathered.
    Data { left: u64, pad: u64, what: DataKind },
    /// After the end-of-archive blocks: the rest is ignored.
    End,
}

enum DataKind {
    Disk,
    Skip,
    Pax,
    LongName,
}

/// Unpacks a tar stream pushed in pieces and hands on only the bytes of the one regular file
/// under `/disk/`; refuses a sparse or second disk file and a stream that is no tar.
pub(super) struct DiskEntry {
    state: TarState,
    header: Vec<u8>,
    record: Vec<u8>,
    /// Path and size from the pax or GNU records before the next header.
    next_path: Option<String>,
    next_size: Option<u64>,
    found: Option<(String, u64)>,
    zero_blocks: u32,
    done_disk: bool,
}

/// pax records longer than this are refused (they only hold paths and numbers here).
const MAX_RECORD: u64 = 1 << 20;

impl DiskEntry {
    pub(super) fn new() -> Self {
        DiskEntry {
            state: TarState::Header,
            header: Vec::with_capacity(512),
            record: Vec::new(),
            next_path: None,
            next_size: None,
            found: None,
            zero_blocks: 0,
            done_disk: false,
        }
    }

    /// The disk file's path and size, once its header went by.
    pub(super) fn found(&self) -> Option<(&str, u64)> {
        self.found.as_ref().map(|(p, s)| (p.as_str(), *s))
    }

    fn ended(&self) -> bool {
        matches!(self.state, TarState::End)
    }

    /// Takes the next piece of the tar; `emit` gets the disk file's bytes in order.
    pub(super) fn push(
        &mut self,
        mut bytes: Bytes,
        emit: &mut dyn FnMut(Bytes) -> Result<(), ()>,
    ) -> Result<(), std::io::Error> {
        while !bytes.is_empty() {
            match &mut self.state {
                TarState::End => return Ok(()),
                TarState::Header => {
                    let take = (512 - self.header.len()).min(bytes.len());
                    self.header.extend_from_slice(&bytes.split_to(take));
                    if self.header.len() == 512 {
                        let h = std::mem::take(&mut self.header);
                        self.header_done(&h)?;
                    }
                }
                TarState::Data { left, pad, what } => {
                    if *left > 0 {
                        let take = (*left).min(bytes.len() as u64) as usize;
                        let piece = bytes.split_to(take);
                        *left -= take as u64;
                        match what {
                            DataKind::Disk => emit(piece).map_err(|()| {
                                std::io::Error::other("download pipeline stage stopped")
                            })?,
                            DataKind::Skip => {}
                            DataKind::Pax | DataKind::LongName => {
                                self.record.extend_from_slice(&piece)
                            }
                        }
                    } else if *pad > 0 {
                        let take = (*pad).min(bytes.len() as u64) as usize;
                        let _ = bytes.split_to(take);
                        *pad -= take as u64;
                    }
                    if let TarState::Data {
                        left: 0,
                        pad: 0,
                        what,
                    } = &self.state
                    {
                        match what {
                            DataKind::Pax => self.pax_done(),
                            DataKind::LongName => {
                                let name = std::mem::take(&mut self.record);
                                let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
                                self.next_path =
                                    Some(String::from_utf8_lossy(&name[..end]).into_owned());
                            }
                            DataKind::Disk => self.done_disk = true,
                            DataKind::Skip => {}
                        }
                        self.state = TarState::Header;
                    }
                }
            }
        }
        Ok(())
    }

    /// Says whether the stream held a whole disk file; called when it ended.
    pub(super) fn finish(&self) -> Result<u64, std::io::Error> {
        match (&self.found, self.done_disk) {
            (Some((_, size)), true) => Ok(*size),
            (Some((path, size)), false) => Err(not_a_disk(format!(
                "the layer ends inside /{path} ({size} bytes); the blob is cut short"
            ))),
            (None, _) => Err(not_a_disk(format!(
                "the layer has no file under /{DISK_DIR}; a containerDisk image keeps its disk image there"
            ))),
        }
    }

    fn pax_done(&mut self) {
        let rec = std::mem::take(&mut self.record);
        let mut rest = &rec[..];
        // Records are "LEN key=value\n", LEN counting the whole record.
        while let Some(sp) = rest.iter().position(|b| *b == b' ') {
            let Some(n) = std::str::from_utf8(&rest[..sp])
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
            else {
                break;
            };
            if n <= sp + 1 || n > rest.len() {
                break;
            }
            let kv = &rest[sp + 1..n - 1];
            if let Some(eq) = kv.iter().position(|b| *b == b'=') {
                let (k, v) = (
                    &kv[..eq],
                    String::from_utf8_lossy(&kv[eq + 1..]).into_owned(),
                );
                match k {
                    b"path" => self.next_path = Some(v),
                    b"size" => self.next_size = v.parse().ok(),
                    _ => {}
                }
            }
            rest = &rest[n..];
        }
    }

    fn header_done(&mut self, h: &[u8]) -> Result<(), std::io::Error> {
        if h.iter().all(|b| *b == 0) {
            self.zero_blocks += 1;
            if self.zero_blocks >= 2 {
                self.state = TarState::End;
            }
            return Ok(());
        }
        self.zero_blocks = 0;
        let stored = octal(&h[148..156]);
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    *b as u64
                }
            })
            .sum();
        if stored != Some(sum) {
            return Err(not_a_disk(
                "the layer is not a tar archive (a header's checksum does not match)".to_string(),
            ));
        }
        let typeflag = h[156];
        let size = match self.next_size.take() {
            Some(s) => s,
            None => number(&h[124..136]).ok_or_else(|| {
                not_a_disk("the layer's tar has an entry with an unreadable size".to_string())
            })?,
        };
        let path = match self.next_path.take() {
            Some(p) => p,
            None => {
                let field = |r: std::ops::Range<usize>| {
                    let f = &h[r];
                    let end = f.iter().position(|b| *b == 0).unwrap_or(f.len());
                    String::from_utf8_lossy(&f[..end]).into_owned()
                };
                let name = field(0..100);
                let prefix = if &h[257..262] == b"ustar" {
                    field(345..500)
                } else {
                    String::new()
                };
                if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                }
            }
        };
        let pad = (512 - size % 512) % 512;
        let what = match typeflag {
            b'x' | b'g' if size > MAX_RECORD => {
                return Err(not_a_disk(
                    "the layer's tar has a pax record over 1 MiB".to_string(),
                ));
            }
            b'x' => DataKind::Pax,
            b'g' => DataKind::Skip,
            b'L' if size > MAX_RECORD => {
                return Err(not_a_disk(
                    "the layer's tar has a long name over 1 MiB".to_string(),
                ));
            }
            b'L' => DataKind::LongName,
            _ => {
                let clean = path.trim_start_matches("./").trim_start_matches('/');
                let in_disk = clean
                    .strip_prefix(DISK_DIR)
                    .is_some_and(|f| !f.is_empty() && !f.ends_with('/'));
                match typeflag {
                    b'0' | 0 | b'7' if in_disk => {
                        if let Some((first, _)) = &self.found {
                            return Err(not_a_disk(format!(
                                "the layer holds more than one file under /{DISK_DIR} (/{first} and /{clean}); a containerDisk holds one"
                            )));
                        }
                        self.found = Some((clean.to_string(), size));
                        DataKind::Disk
                    }
                    b'S' if in_disk => {
                        return Err(not_a_disk(format!(
                            "/{clean} is a GNU sparse file in the layer's tar, which bicsi does not unpack; build the image without --sparse"
                        )));
                    }
                    _ => DataKind::Skip,
                }
            }
        };
        self.state = TarState::Data {
            left: size,
            pad,
            what,
        };
        Ok(())
    }
}

/// Fuzzing entry (feature `fuzzing`, `fuzz/`): a layer's tar stream never panics the reader,
/// and the pieces it comes in do not matter: pushed whole or cut where the first two bytes say,
/// it gives the same disk bytes and the same verdict. What it hands on is never more than the
/// size the disk file's header said, and a whole disk file is exactly that size.
#[cfg(feature = "fuzzing")]
pub fn fuzz(data: &[u8]) {
    let (cut, tar) = match data {
        [a, b, rest @ ..] => (1 + (usize::from(*a) << 8 | usize::from(*b)), rest),
        _ => return,
    };
    let run = |piece: usize| {
        let mut entry = DiskEntry::new();
        let mut out = Vec::new();
        let mut pushed = Ok(());
        for chunk in tar.chunks(piece) {
            pushed = entry.push(Bytes::copy_from_slice(chunk), &mut |b: Bytes| {
                out.extend_from_slice(&b);
                Ok(())
            });
            if pushed.is_err() {
                break;
            }
        }
        let verdict = pushed
            .and_then(|()| entry.finish())
            .map_err(|e| e.to_string());
        if let Some((_, size)) = entry.found() {
            assert!(out.len() as u64 <= size, "more bytes than the header said");
        } else {
            assert!(out.is_empty(), "bytes handed on without a disk file");
        }
        if let Ok(size) = &verdict {
            assert_eq!(out.len() as u64, *size, "a whole disk file is its size");
        }
        (out, verdict)
    };
    let whole = run(tar.len().max(1));
    assert_eq!(run(cut), whole, "the pieces changed the result (cut {cut})");
}

/// An octal field (NUL or space terminated).
fn octal(f: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(f).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// A size field: octal, or GNU's base-256 (high bit set) for sizes of 8 GiB and more.
fn number(f: &[u8]) -> Option<u64> {
    if f[0] & 0x80 != 0 {
        let mut n: u64 = (f[0] & 0x7f) as u64;
        for b in &f[1..] {
            n = n.checked_mul(256)?.checked_add(*b as u64)?;
        }
        return Some(n);
    }
    octal(f)
}

/// The digest algorithm a layer is checked with.
pub const LAYER_ALGO: SourceAlgo = SourceAlgo::Sha256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_like_docker_does() {
        let r = Reference::parse("docker://127.0.0.1:5000/vm/fedora:41").unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("127.0.0.1:5000", "vm/fedora", "41")
        );
        assert_eq!(r.scheme(), "http");
        assert_eq!(r.to_string(), "docker://127.0.0.1:5000/vm/fedora:41");
        let r = Reference::parse("docker://quay.io/containerdisks/ubuntu").unwrap();
        assert_eq!((r.reference.as_str(), r.scheme()), ("latest", "https"));
        let r = Reference::parse("docker://busybox").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("registry-1.docker.io", "library/busybox")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("oci://localhost:5000/x@{d}")).unwrap();
        assert_eq!(r.reference, d);
        for bad in [
            "https://x/y",
            "docker://",
            "docker://Host.io/UPPER:1",
            "docker://h.io/x@md5:abc",
            "docker://h.io/x:t@g",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn challenges_and_docker_configs_are_read() {
        let p = challenge_params(
            r#"realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(p[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull".into()));
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        let access = OciAccess {
            docker_config: Some(format!(
                r#"{{"auths":{{"https://127.0.0.1:5000":{{"auth":"{auth}"}},"docker.io":{{"username":"bob","password":"pw"}}}}}}"#
            )),
            ..Default::default()
        };
        assert_eq!(
            access.credentials("127.0.0.1:5000").unwrap(),
            Some(("alice".into(), "s3cret".into()))
        );
        assert_eq!(
            access.credentials("registry-1.docker.io").unwrap(),
            Some(("bob".into(), "pw".into()))
        );
        assert_eq!(access.credentials("quay.io").unwrap(), None);
        assert!(!format!("{access:?}").contains("s3cret"));
        assert!(OciAccess::check_docker_config("x", "{}").is_err());
    }

    /// A tar with a directory, a pax-named disk file, another file, in uneven pieces.
    #[test]
    fn the_disk_file_is_unpacked_from_a_tar_pushed_in_pieces() {
        let mut b = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_ustar();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_size(0);
        dir.set_mode(0o755);
        b.append_data(&mut dir, "disk/", std::io::empty()).unwrap();
        let disk: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let mut h = tar::Header::new_gnu();
        h.set_size(disk.len() as u64);
        h.set_mode(0o644);
        let long = format!("disk/{}.qcow2", "n".repeat(120));
        b.append_data(&mut h, &long, &disk[..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, "etc/other", &b"abc"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        for step in [1usize, 511, 512, 4096, tar.len()] {
            let mut e = DiskEntry::new();
            let mut out = Vec::new();
            for piece in tar.chunks(step) {
                e.push(Bytes::copy_from_slice(piece), &mut |b| {
                    out.extend_from_slice(&b);
                    Ok(())
                })
                .unwrap();
            }
            assert_eq!(e.finish().unwrap(), disk.len() as u64);
            assert_eq!(out, disk, "step {step}");
            assert_eq!(e.found().unwrap().0, long);
        }
        // No disk file, and no tar at all.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        b.append_data(&mut h, "etc/other", &b"abc"[..]).unwrap();
        let mut e = DiskEntry::new();
        e.push(Bytes::from(b.into_inner().unwrap()), &mut |_| Ok(()))
            .unwrap();
        assert!(
            e.finish()
                .unwrap_err()
                .to_string()
                .contains("no file under /disk/")
        );
        let mut e = DiskEntry::new();
        let err = e
            .push(Bytes::from(vec![7u8; 1024]), &mut |_| Ok(()))
            .unwrap_err();
        assert!(err.to_string().contains("not a tar archive"), "{err}");
    }
}
