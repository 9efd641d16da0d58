//! The download data source: fetch a backing image from an http(s) URL into a temp file, verified
//! by SHA-512, in one streaming pass.
//!
//! This module owns the HTTP transfer and everything that makes it dependable: bounded memory
//! (the body streams through [`pipeline`] in 256 KiB blocks, never held whole), SHA-512 computed
//! while the bytes arrive on a thread of its own (the hash is the slowest stage, so it overlaps
//! receiving and writing instead of following them; the file is never read back), the file's
//! pages written back and dropped from the page cache while it grows (so the disk works with the
//! network, not after it, and the page cache the download fills stays small), resume with
//! `Range: bytes=N-` after a dropped connection (the hash state continues in memory), restart
//! from zero when the server ignores Range, bounded attempts with capped exponential backoff, an
//! idle timeout so no download hangs forever, and at the end `fdatasync` then
//! `POSIX_FADV_DONTNEED` so the page cache the download filled is released.
//!
//! The temp file at [`DownloadRequest::dest`] is either a complete, synced, verified file when
//! [`download`] returns `Ok`, or gone: every error, cancellation, or dropping the future removes
//! it; only a [`DownloadRequest::resume`] download dropped mid-way (its process stopping) leaves
//! it, with the server's validator beside it, for the next process to go on from with `Range`
//! and `If-Range` after hashing the kept bytes again. Renaming it into place (and syncing the
//! directory) is the caller's job, as is deciding what the image is (see [`crate::imagefmt`]).
//! [`head`] reads the first bytes of a URL, so a caller learns an image's size before it is in.
//!
//! It must not know about backing-image objects, disks or Kubernetes, and must never log a URL's
//! credentials or query string (they often carry tokens): URLs are shown through [`redact`].

mod access;
mod decompress;
pub mod guard;
pub mod oci;
mod pipeline;
#[cfg(test)]
mod remote_tests;
pub mod s3;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use nix::errno::Errno;
use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use guard::{NetworkGuard, Refusal};
use pipeline::Pipeline;

use crate::messages::error_chain;
pub use crate::messages::redact;
use crate::messages::redact_text;
pub use crate::sync::{NoProgress, ProgressSink};
pub use access::{Access, AccessFiles, Credentials, SECRET_HTTP_KEYS};
pub use decompress::{Compression, decode_prefix};

/// Default for [`DownloadRequest::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for [`DownloadRequest::max_attempts`].
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Default for [`DownloadRequest::backoff`].
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two attempts, whatever the base and the attempt number.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 10;
/// Progress is reported at most this often (and once at the end).
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// What to download, where, and how hard to try.
#[derive(Debug, Clone)]
pub struct DownloadRequest {
    /// An http or https URL; redirects are followed.
    pub url: String,
    /// The temp file to write (under `<disk>/tmp/`). Created, parent directories too; an existing
    /// file there is truncated.
    pub dest: PathBuf,
    /// Lower-case hex SHA-512 (128 characters), already validated by the caller. `None` accepts
    /// whatever arrives and reports its checksum.
    pub expected_sha512: Option<String>,
    /// An attempt fails when no byte arrives for this long (also the connect timeout).
    pub idle_timeout: Duration,
    /// Attempts in all, the first included (0 is taken as 1).
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each further one, capped at [`MAX_BACKOFF`].
    pub backoff: Duration,
    /// Keep the partial file for a later process: the server's validator (strong ETag, else
    /// Last-Modified) is written beside it at [`resume_path`], a dropped future (the process
    /// stopping) leaves both in place, and a later download of the same URL into the same
    /// `dest` goes on from the partial file's end with `Range` and `If-Range`; the bytes kept
    /// are hashed again from the file, so the SHA-512 is of what is on disk. Errors and
    /// cancellation still remove both.
    pub resume: bool,
    /// The addresses it may connect to ([`guard`]); by default the default of where this process
    /// runs, with no setting applied.
    pub guard: NetworkGuard,
    /// The checksum of the body's bytes as downloaded (compressed or not), as distributions
    /// publish in their SHA256SUMS; checked at the end like `expected_sha512`.
    pub source_checksum: Option<SourceChecksum>,
    /// Headers (credentials) sent with every request, and extra trusted CA certificates.
    pub access: Access,
    /// What `url` names: an http(s) URL, or an object store or registry reached over HTTP.
    pub remote: Remote,
}

/// What kind of thing a download's URL names, with what it needs besides [`Access`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Remote {
    /// `http://` or `https://`: fetched as it is.
    #[default]
    Http,
    /// `s3://bucket/key`: fetched with a presigned (or, public, plain) GET ([`s3`]).
    S3(s3::S3Access),
    /// `docker://` or `oci://`: the disk image in a layer of a registry's image ([`oci`]).
    Oci(oci::OciAccess),
}

/// A hash a [`SourceChecksum`] is made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceAlgo {
    Sha256,
    Sha512,
}

impl SourceAlgo {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceAlgo::Sha256 => "sha256",
            SourceAlgo::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            SourceAlgo::Sha256 => 64,
            SourceAlgo::Sha512 => 128,
        }
    }
}

/// The checksum of a download's bytes as they come from the server: `sha256:HEX` or
/// `sha512:HEX` (the `sourceChecksum` source parameter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceChecksum {
    pub algo: SourceAlgo,
    /// Lower-case hex.
    pub hex: String,
}

impl SourceChecksum {
    /// Parses `sha256:HEX` or `sha512:HEX` (hex in any case, spaces around ignored).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let Some((algo, hex)) = text.split_once(':') else {
            return Err(format!(
                "sourceChecksum {text:?} has no algorithm: write sha256:HEX or sha512:HEX (as sha256sum or sha512sum prints HEX)"
            ));
        };
        let algo = match algo.trim().to_ascii_lowercase().as_str() {
            "sha256" => SourceAlgo::Sha256,
            "sha512" => SourceAlgo::Sha512,
            other => {
                return Err(format!(
                    "sourceChecksum algorithm {other:?} is not supported: use sha256 or sha512"
                ));
            }
        };
        let hex = hex.trim().to_ascii_lowercase();
        if hex.len() != algo.hex_len() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "sourceChecksum: a {} checksum is {} hexadecimal characters, got {:?}",
                algo.as_str(),
                algo.hex_len(),
                hex
            ));
        }
        Ok(SourceChecksum { algo, hex })
    }
}

impl std::fmt::Display for SourceChecksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.algo.as_str(), self.hex)
    }
}

impl DownloadRequest {
    /// A request with the default timeouts and attempts and no expected checksum.
    pub fn new(url: impl Into<String>, dest: impl Into<PathBuf>) -> Self {
        DownloadRequest {
            url: url.into(),
            dest: dest.into(),
            expected_sha512: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: DEFAULT_BACKOFF,
            resume: false,
            guard: NetworkGuard::from_settings(
                "",
                "",
                guard::in_cluster(),
                &guard::node_addresses(),
            )
            .expect("the default networks parse"),
            source_checksum: None,
            access: Access::default(),
            remote: Remote::Http,
        }
    }
}

/// A finished, synced and verified download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadOutcome {
    /// Bytes in the file.
    pub size: u64,
    /// Lower-case hex SHA-512 of the whole file (of the decompressed image when the body was
    /// compressed).
    pub sha512: String,
    /// How the body was compressed; the file holds it decompressed.
    pub compression: Option<Compression>,
    /// The checksum of the body's bytes as downloaded, when one was asked for (and matched).
    pub source_checksum: Option<SourceChecksum>,
    /// How many times the transfer went on from where it broke, with a Range request.
    pub resumed: u32,
    /// Bytes kept from the partial file of an earlier process ([`DownloadRequest::resume`]):
    /// hashed again from the file, not downloaded again.
    pub kept: u64,
    /// The file's chunk manifest, built from the bytes that were hashed, in the same pass. Its
    /// SHA-512 is `sha512`: when the request had an expected checksum, the verified one.
    pub manifest: crate::sync::Manifest,
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("unsupported URL scheme {scheme:?} in {url}: only http and https are supported")]
    UnsupportedScheme { scheme: String, url: String },
    #[error("GET {url}: HTTP {status}{}", gave_up(*attempts))]
    HttpStatus {
        url: String,
        status: StatusCode,
        attempts: u32,
    },
    #[error("GET {url}: connection failed after {attempts} attempt(s): {last}")]
    Connection {
        url: String,
        attempts: u32,
        last: String,
    },
    #[error("GET {url}: no data received for {}{}", secs(*idle), gave_up(*attempts))]
    IdleTimeout {
        url: String,
        idle: Duration,
        attempts: u32,
    },
    #[error(
        "GET {url}: truncated: the body ended at {received} of {expected} bytes{}",
        gave_up(*attempts)
    )]
    Truncated {
        url: String,
        received: u64,
        expected: u64,
        attempts: u32,
    },
    #[error("GET {url}: {detail}")]
    Redirect { url: String, detail: String },
    #[error(
        "GET {url}: the server's TLS certificate is not trusted ({detail}); if a private CA \
         signed it, give that CA's certificate in the source parameter caBundleFile"
    )]
    Untrusted { url: String, detail: String },
    #[error("GET {url}: refused: {refusal}")]
    Denied { url: String, refusal: Refusal },
    /// An object store or registry said no, with what that means for its kind of source.
    #[error("GET {url}: HTTP {status}: {hint}")]
    Refused {
        url: String,
        status: StatusCode,
        hint: String,
    },
    /// What an s3:// or docker:// URL names could not be found or used (a manifest without a
    /// disk image, a platform the image lacks, bad credentials given for it).
    #[error("{url}: {detail}")]
    Source { url: String, detail: String },
    #[error(
        "checksum mismatch: expected {expected}, got {got}; the file at the URL changed or is \
         corrupt"
    )]
    ChecksumMismatch { expected: String, got: String },
    #[error(
        "source checksum mismatch: sourceChecksum is {expected} but the bytes downloaded have \
         {got}; the file at the URL changed or is corrupt, or the checksum is of another file"
    )]
    SourceChecksumMismatch { expected: String, got: String },
    #[error("GET {url}: {corrupt}; the file at the URL is corrupt or cut short")]
    Corrupt {
        url: String,
        corrupt: decompress::Corrupt,
    },
    #[error(
        "disk full: no space left to write {path}; free space on that disk and retry",
        path = path.display()
    )]
    DiskFull { path: PathBuf },
    #[error("I/O error on {path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("HTTP client error: {0}")]
    Client(String),
    #[error("download of {url} cancelled")]
    Cancelled { url: String },
}

fn gave_up(attempts: u32) -> String {
    if attempts > 1 {
        format!(" (gave up after {attempts} attempts)")
    } else {
        String::new()
    }
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

impl DownloadError {
    /// Whether trying the same download again later may succeed: network trouble, timeouts,
    /// 408/429/5xx answers. Bad URLs, other 4xx answers, checksum mismatches, a full disk and
    /// cancellation are not retryable. [`download`] already retried these itself up to
    /// [`DownloadRequest::max_attempts`]; this is for the caller's own, slower, retry loop.
    pub fn is_retryable(&self) -> bool {
        match self {
            DownloadError::HttpStatus { status, .. } => retryable_status(*status),
            DownloadError::Connection { .. }
            | DownloadError::IdleTimeout { .. }
            | DownloadError::Truncated { .. } => true,
            DownloadError::InvalidUrl { .. }
            | DownloadError::UnsupportedScheme { .. }
            | DownloadError::Redirect { .. }
            | DownloadError::Denied { .. }
            | DownloadError::Refused { .. }
            | DownloadError::Source { .. }
            | DownloadError::Untrusted { .. }
            | DownloadError::ChecksumMismatch { .. }
            | DownloadError::SourceChecksumMismatch { .. }
            | DownloadError::Corrupt { .. }
            | DownloadError::DiskFull { .. }
            | DownloadError::Io { .. }
            | DownloadError::Client(_)
            | DownloadError::Cancelled { .. } => false,
        }
    }

    /// Whether the same download would fail the same way however often it is tried: a checksum
    /// mismatch, a 4xx answer other than 408/429, a bad URL or redirect loop. The caller's
    /// slow retry loop backs off to hours for these instead of trying every few seconds.
    pub fn is_permanent(&self) -> bool {
        match self {
            DownloadError::HttpStatus { status, .. } => {
                status.is_client_error() && !retryable_status(*status)
            }
            DownloadError::ChecksumMismatch { .. }
            | DownloadError::SourceChecksumMismatch { .. }
            | DownloadError::Corrupt { .. }
            | DownloadError::InvalidUrl { .. }
            | DownloadError::UnsupportedScheme { .. }
            | DownloadError::Redirect { .. }
            | DownloadError::Untrusted { .. }
            | DownloadError::Refused { .. }
            | DownloadError::Source { .. }
            | DownloadError::Denied { .. } => true,
            _ => false,
        }
    }

    fn io(path: &Path, source: io::Error) -> Self {
        let full = [Errno::ENOSPC as i32, Errno::EDQUOT as i32];
        if source.raw_os_error().is_some_and(|c| full.contains(&c)) {
            DownloadError::DiskFull {
                path: path.to_path_buf(),
            }
        } else {
            DownloadError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

fn retryable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// The HTTP client of a download: it connects only where `guard` allows (host names through
/// its resolver, IP literals of redirects through the redirect policy; the first URL's literal
/// is checked by the caller) and follows at most [`MAX_REDIRECTS`] redirects.
fn http_client(
    guard: &NetworkGuard,
    connect_timeout: Duration,
    access: &Access,
) -> Result<reqwest::Client, DownloadError> {
    let redirects = guard.clone();
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(format!("too many redirects (more than {MAX_REDIRECTS})"));
        }
        match redirects.check_url(attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(refusal) => attempt.error(refusal),
        }
    });
    let mut builder = reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .redirect(policy)
        .dns_resolver(guard.resolver())
        .user_agent(concat!("bicsi/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = &access.ca_bundle {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| DownloadError::Client(format!("caBundleFile: {e}")))?;
        builder = builder.tls_certs_merge(certs);
    }
    builder
        .build()
        .map_err(|e| DownloadError::Client(error_chain(&e.without_url())))
}

/// Parses `url` and accepts only absolute http and https URLs with a host.
pub fn validate_url(url: &str) -> Result<Url, DownloadError> {
    let parsed = Url::parse(url.trim()).map_err(|e| DownloadError::InvalidUrl {
        url: url.to_owned(),
        reason: format!("{e}; only absolute http and https URLs are supported"),
    })?;
    match parsed.scheme() {
        "http" | "https" => {}
        other => {
            return Err(DownloadError::UnsupportedScheme {
                scheme: other.to_owned(),
                url: redact(&parsed),
            });
        }
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(DownloadError::InvalidUrl {
            url: redact(&parsed),
            reason: "no host".to_owned(),
        });
    }
    Ok(parsed)
}

/// Downloads `req.url` into `req.dest`, hashing as the bytes arrive.
///
/// Cancel with `cancel`: the download stops within one chunk or timer, removes the temp file
/// and returns [`DownloadError::Cancelled`]. Dropping the future also removes the temp file.
/// `progress` is called at most every [`PROGRESS_INTERVAL`] and once at the end.
///
/// On `Ok` the file holds exactly the body, is `fdatasync`ed, its pages are dropped from the
/// page cache, and, when `expected_sha512` was given, it matched.
pub async fn download(
    req: &DownloadRequest,
    progress: &dyn ProgressSink,
    cancel: CancellationToken,
) -> Result<DownloadOutcome, DownloadError> {
    let plan = tokio::select! {
        biased;
        _ = cancel.cancelled() => return Err(DownloadError::Cancelled { url: redact_text(&req.url) }),
        plan = resolve(req, req.idle_timeout) => plan?,
    };
    let mut effective;
    let req = if plan.changes_request() {
        effective = req.clone();
        effective
            .access
            .headers
            .extend(plan.headers.iter().cloned());
        if let Some(c) = &plan.source_checksum {
            effective.source_checksum = Some(c.clone());
        }
        &effective
    } else {
        req
    };
    let result = fetch(req, plan.url.clone(), plan.shown.clone(), progress, cancel).await;
    result.map_err(|e| plan.explain(e))
}

/// The HTTP GET a download's URL comes down to, once its [`Remote`] is resolved.
struct Plan {
    url: Url,
    /// How the source is shown in messages (`s3://bucket/key`, never a presigned URL).
    shown: String,
    /// Added to the request's headers (a registry's token).
    headers: Vec<(header::HeaderName, HeaderValue)>,
    /// Checked as the request's source checksum (a registry blob's digest).
    source_checksum: Option<SourceChecksum>,
    remote: RemoteKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RemoteKind {
    Http,
    S3 { signed: bool },
    Oci,
}

impl Plan {
    fn changes_request(&self) -> bool {
        !self.headers.is_empty() || self.source_checksum.is_some()
    }

    /// A refusal explained for its kind of source.
    fn explain(&self, e: DownloadError) -> DownloadError {
        let hint = match (&e, self.remote) {
            (DownloadError::HttpStatus { status, .. }, RemoteKind::S3 { signed }) => {
                s3::explain(*status, signed)
            }
            (DownloadError::HttpStatus { status, .. }, RemoteKind::Oci) => oci::explain(*status),
            _ => None,
        };
        match (e, hint) {
            (DownloadError::HttpStatus { url, status, .. }, Some(hint)) => DownloadError::Refused {
                url,
                status,
                hint: hint.to_string(),
            },
            (e, _) => e,
        }
    }
}

/// Turns the request's URL into the GET to make: an http(s) URL as it is, an S3 object's
/// presigned URL, a registry image's layer blob with its token and digest.
async fn resolve(req: &DownloadRequest, timeout: Duration) -> Result<Plan, DownloadError> {
    match &req.remote {
        Remote::Http => {
            let url = validate_url(&req.url)?;
            let shown = redact(&url);
            Ok(Plan {
                url,
                shown,
                headers: Vec::new(),
                source_checksum: None,
                remote: RemoteKind::Http,
            })
        }
        Remote::S3(access) => {
            let object =
                s3::S3Object::parse(&req.url).map_err(|reason| DownloadError::InvalidUrl {
                    url: redact_text(&req.url),
                    reason,
                })?;
            let shown = object.to_string();
            let url =
                s3::object_url(&object, access)
                    .await
                    .map_err(|detail| DownloadError::Source {
                        url: shown.clone(),
                        detail,
                    })?;
            Ok(Plan {
                url,
                shown,
                headers: Vec::new(),
                source_checksum: None,
                remote: RemoteKind::S3 {
                    signed: access.keys.is_some(),
                },
            })
        }
        Remote::Oci(access) => {
            let blob = oci::resolve(&req.url, access, &req.guard, &req.access, timeout).await?;
            Ok(Plan {
                url: blob.url,
                shown: blob.shown,
                headers: blob.headers,
                source_checksum: Some(blob.digest),
                remote: RemoteKind::Oci,
            })
        }
    }
}

/// [`download`] of a resolved plain GET.
async fn fetch(
    req: &DownloadRequest,
    url: Url,
    shown: String,
    progress: &dyn ProgressSink,
    cancel: CancellationToken,
) -> Result<DownloadOutcome, DownloadError> {
    let span = tracing::info_span!("download", url = %shown, dest = %req.dest.display());
    async move {
        // Armed before the file exists: whatever happens from here, a failed download leaves
        // nothing behind (a dropped resumable one leaves its partial file for the next process).
        let mut guard = RemoveOnDrop {
            paths: vec![req.dest.clone(), resume_path(&req.dest)],
            keep_on_drop: req.resume,
        };
        let started = Instant::now();
        let result = match Transfer::new(req, url, shown, progress, &cancel) {
            Ok(t) => t.run().await,
            Err(e) => Err(e),
        };
        match result {
            Ok(outcome) => {
                guard.paths.remove(0);
                guard.keep_on_drop = false;
                let secs = started.elapsed().as_secs_f64();
                info!(
                    size = outcome.size,
                    sha512 = %outcome.sha512,
                    resumed = outcome.resumed,
                    secs,
                    mib_per_s = outcome.size as f64 / (1 << 20) as f64 / secs.max(1e-9),
                    "download done"
                );
                Ok(outcome)
            }
            Err(e) => {
                warn!(error = %e, "download failed");
                guard.keep_on_drop = false;
                drop(guard);
                Err(e)
            }
        }
    }
    .instrument(span)
    .await
}

/// The first bytes of a URL and what the server says of the whole file, learned without
/// downloading it: see [`head`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// At most the number of bytes asked for, from offset 0 (fewer when the file is shorter).
    pub bytes: Vec<u8>,
    /// The whole file's length: the Content-Range total of a 206 answer, or the Content-Length
    /// of a 200 one; None when the server says neither.
    pub total: Option<u64>,
    /// What says which content the source has now: `etag:VALUE` (weak ones too), else
    /// `last-modified:VALUE`; None when the server sends neither (and for a registry image,
    /// whose manifest digest [`oci::digest`] gives).
    pub validator: Option<String>,
}

/// [`head`] of any source: an S3 object through its presigned URL, a registry image's disk
/// image through its layer ([`oci::head`]).
pub async fn head_remote(
    url: &str,
    remote: &Remote,
    len: usize,
    timeout: Duration,
    guard: &NetworkGuard,
    access: &Access,
) -> Result<Head, DownloadError> {
    if let Remote::Oci(oci_access) = remote {
        let work = oci::head(url, oci_access, len, timeout, guard, access);
        return tokio::time::timeout(timeout, work).await.map_err(|_| {
            DownloadError::IdleTimeout {
                url: redact_text(url),
                idle: timeout,
                attempts: 1,
            }
        })?;
    }
    let req = DownloadRequest {
        remote: remote.clone(),
        ..DownloadRequest::new(url, PathBuf::new())
    };
    let plan = resolve(&req, timeout).await?;
    let shown = plan.shown.clone();
    head_url(plan.url.clone(), shown, len, timeout, guard, access)
        .await
        .map_err(|e| plan.explain(e))
}

/// Fetches the first `len` bytes of `url` with one ranged GET (`Range: bytes=0-<len-1>`), so a
/// caller learns the image's size before the download is done. A server that ignores Range
/// answers the whole file: only `len` bytes are read and the connection is dropped. Nothing is
/// retried; `timeout` bounds the whole call.
pub async fn head(
    url: &str,
    len: usize,
    timeout: Duration,
    guard: &NetworkGuard,
    access: &Access,
) -> Result<Head, DownloadError> {
    let parsed = validate_url(url)?;
    let shown = redact(&parsed);
    head_url(parsed, shown, len, timeout, guard, access).await
}

async fn head_url(
    parsed: Url,
    shown: String,
    len: usize,
    timeout: Duration,
    guard: &NetworkGuard,
    access: &Access,
) -> Result<Head, DownloadError> {
    guard
        .check_url(&parsed)
        .map_err(|refusal| DownloadError::Denied {
            url: shown.clone(),
            refusal,
        })?;
    let client = http_client(guard, timeout, access)?;
    let idle = |_| DownloadError::IdleTimeout {
        url: shown.clone(),
        idle: timeout,
        attempts: 1,
    };
    let work = async {
        let mut request = client.get(parsed.clone());
        for (name, value) in &access.headers {
            request = request.header(name, value);
        }
        let response = request
            .header(header::ACCEPT_ENCODING, "identity")
            .header(header::RANGE, format!("bytes=0-{}", len.max(1) - 1))
            .send()
            .await
            .map_err(|e| {
                if let Some(refusal) = guard::refusal_in(&e) {
                    DownloadError::Denied {
                        url: shown.clone(),
                        refusal,
                    }
                } else if let Some(detail) = untrusted_in(&e) {
                    DownloadError::Untrusted {
                        url: shown.clone(),
                        detail,
                    }
                } else if e.is_redirect() {
                    DownloadError::Redirect {
                        url: shown.clone(),
                        detail: error_chain(&e.without_url()),
                    }
                } else {
                    DownloadError::Connection {
                        url: shown.clone(),
                        attempts: 1,
                        last: error_chain(&e.without_url()),
                    }
                }
            })?;
        let status = response.status();
        let validator = change_validator(response.headers());
        let total = match status {
            StatusCode::PARTIAL_CONTENT => content_range(response.headers())
                .filter(|(start, _)| *start == 0)
                .ok_or_else(|| DownloadError::Connection {
                    url: shown.clone(),
                    attempts: 1,
                    last: format!(
                        "the server answered a Range request from byte 0 with Content-Range {:?}",
                        response.headers().get(header::CONTENT_RANGE)
                    ),
                })?
                .1,
            StatusCode::OK => response.content_length(),
            s => {
                return Err(DownloadError::HttpStatus {
                    url: shown.clone(),
                    status: s,
                    attempts: 1,
                });
            }
        };
        let mut bytes = Vec::with_capacity(len);
        let mut body = response.bytes_stream();
        while bytes.len() < len {
            match body.next().await {
                None => break,
                Some(Err(e)) => {
                    return Err(DownloadError::Connection {
                        url: shown.clone(),
                        attempts: 1,
                        last: error_chain(&e.without_url()),
                    });
                }
                Some(Ok(chunk)) => {
                    let take = chunk.len().min(len - bytes.len());
                    bytes.extend_from_slice(&chunk[..take]);
                }
            }
        }
        Ok(Head {
            bytes,
            total,
            validator,
        })
    };
    tokio::time::timeout(timeout, work).await.map_err(idle)?
}

/// Where a resumable download keeps the validator of its partial file `dest`.
pub fn resume_path(dest: &Path) -> PathBuf {
    dest.with_extension("resume")
}

/// What a resumable download writes beside its partial file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Kept {
    url: String,
    /// The strong ETag or Last-Modified of the answer the partial file holds the start of.
    validator: String,
    total: Option<u64>,
}

/// Removes the temp file (and a resumable one's validator) when dropped: on error, on
/// cancellation, or on a dropped future unless `keep_on_drop`.
struct RemoveOnDrop {
    paths: Vec<PathBuf>,
    keep_on_drop: bool,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.keep_on_drop {
            return;
        }
        for path in self.paths.drain(..) {
            match std::fs::remove_file(&path) {
                Ok(()) => debug!(path = %path.display(), "removed temp file"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => warn!(path = %path.display(), error = %e, "cannot remove temp file"),
            }
        }
    }
}

/// One attempt's failure.
enum Failure {
    /// Give up now.
    Fatal(DownloadError),
    /// Try again (after a backoff, or after the server's Retry-After if longer).
    Transient {
        why: Transient,
        retry_after: Option<Duration>,
    },
}

enum Transient {
    Connect(String),
    Status(StatusCode),
    Idle,
    Truncated { received: u64, expected: u64 },
}

impl From<Transient> for Failure {
    fn from(why: Transient) -> Self {
        Failure::Transient {
            why,
            retry_after: None,
        }
    }
}

/// Whether the server serves byte ranges, as far as we know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ranges {
    Unknown,
    Yes,
    No,
}

struct Transfer<'a> {
    req: &'a DownloadRequest,
    url: Url,
    shown: String,
    progress: &'a dyn ProgressSink,
    cancel: &'a CancellationToken,
    client: reqwest::Client,
    /// Bytes handed to the pipeline since the last restart, i.e. where a resume starts.
    received: u64,
    /// Size of the whole file, when the server said.
    total: Option<u64>,
    ranges: Ranges,
    /// ETag (strong) or Last-Modified of the first answer, sent as If-Range so a file that
    /// changed between attempts is sent whole instead of spliced.
    validator: Option<HeaderValue>,
    resumed: u32,
    /// Bytes kept from an earlier process's partial file.
    kept: u64,
    last_progress: Option<Instant>,
    /// The validator of the current answer is not written beside the partial file yet: it is
    /// once the body is known to be plain (a compressed one cannot go on from its partial
    /// file: the decoder's state is lost with the process).
    validator_unsaved: bool,
}

impl<'a> Transfer<'a> {
    fn new(
        req: &'a DownloadRequest,
        url: Url,
        shown: String,
        progress: &'a dyn ProgressSink,
        cancel: &'a CancellationToken,
    ) -> Result<Self, DownloadError> {
        req.guard
            .check_url(&url)
            .map_err(|refusal| DownloadError::Denied {
                url: shown.clone(),
                refusal,
            })?;
        let client = http_client(&req.guard, req.idle_timeout, &req.access)?;
        Ok(Transfer {
            req,
            url,
            shown,
            progress,
            cancel,
            client,
            received: 0,
            total: None,
            ranges: Ranges::Unknown,
            validator: None,
            resumed: 0,
            kept: 0,
            last_progress: None,
            validator_unsaved: false,
        })
    }

    fn dest(&self) -> &Path {
        &self.req.dest
    }

    fn cancelled(&self) -> DownloadError {
        DownloadError::Cancelled {
            url: self.shown.clone(),
        }
    }

    async fn run(mut self) -> Result<DownloadOutcome, DownloadError> {
        if self.cancel.is_cancelled() {
            return Err(self.cancelled());
        }
        let (file, kept) = self.open_dest().await?;
        let mut pipe = Pipeline::start(
            file,
            self.req.source_checksum.as_ref().map(|c| c.algo),
            matches!(self.req.remote, Remote::Oci(_)),
        );
        if let Some((len, kept)) = kept {
            self.rehash(&mut pipe, len).await?;
            info!(
                from = len,
                "going on with the partial file of an earlier process"
            );
            self.received = len;
            self.kept = len;
            self.total = kept.total;
            self.validator = HeaderValue::from_str(&kept.validator).ok();
            self.ranges = Ranges::Yes;
            self.report(true);
        }
        let max_attempts = self.req.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let failure = match self.attempt(attempt, &mut pipe).await {
                Ok(()) => break,
                Err(f) => f,
            };
            let (why, retry_after) = match failure {
                Failure::Fatal(e) => return Err(e),
                Failure::Transient { why, retry_after } => (why, retry_after),
            };
            let error = self.give_up(why, attempt);
            if attempt >= max_attempts {
                return Err(error);
            }
            let delay = backoff(self.req.backoff, attempt).max(retry_after.unwrap_or_default());
            debug!(
                attempt,
                error = %error,
                delay_ms = delay.as_millis() as u64,
                "attempt failed; retrying"
            );
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(self.cancelled()),
                _ = tokio::time::sleep(delay) => {}
            }
        }

        let finished = pipe.finish().await.map_err(|e| self.pipe_error(e))?;
        let (file, size) = (finished.file, finished.size);
        self.progress
            .progress(self.received, self.total.or(Some(self.received)));
        let dest = self.dest().to_path_buf();
        tokio::task::spawn_blocking(move || settle(&file, &dest, size))
            .await
            .map_err(|e| DownloadError::io(self.dest(), io::Error::other(e.to_string())))??;

        if let Some(expected) = &self.req.source_checksum
            && finished.source.as_ref() != Some(expected)
        {
            return Err(DownloadError::SourceChecksumMismatch {
                expected: expected.to_string(),
                got: finished
                    .source
                    .as_ref()
                    .map_or_else(|| "none".to_string(), |s| s.to_string()),
            });
        }
        let sha512 = finished.sha512;
        if let Some(expected) = &self.req.expected_sha512
            && !crate::model::checksum::matches(expected, &sha512)
        {
            return Err(DownloadError::ChecksumMismatch {
                expected: expected.to_ascii_lowercase(),
                got: sha512,
            });
        }
        Ok(DownloadOutcome {
            size,
            sha512,
            compression: finished.compression,
            source_checksum: finished.source,
            resumed: self.resumed,
            kept: self.kept,
            manifest: finished.manifest,
        })
    }

    /// The temp file to write and, when a resumable download finds the partial file of an
    /// earlier process of the same URL with its validator, that file's length and validator.
    /// Anything else there is started over.
    async fn open_dest(&self) -> Result<(std::fs::File, Option<(u64, Kept)>), DownloadError> {
        let dest = self.dest().to_path_buf();
        let side = resume_path(&dest);
        if self.req.resume {
            let kept = std::fs::read(&side)
                .ok()
                .and_then(|b| serde_json::from_slice::<Kept>(&b).ok())
                .filter(|k| k.url == self.req.url && !k.validator.is_empty());
            let len = std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
            if let Some(k) = kept
                && len > 0
                && k.total.is_none_or(|t| len < t)
            {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&dest)
                    .map_err(|e| DownloadError::io(&dest, e))?;
                return Ok((file, Some((len, k))));
            }
        }
        match std::fs::remove_file(&side) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(DownloadError::io(&side, e)),
        }
        Ok((create_dest(&dest).await?, None))
    }

    /// Feeds the first `len` bytes of the partial file to the hash and the manifest (not to the
    /// writer: they are in the file already). Reading them back costs a pass over the disk but
    /// hashes exactly what is there, whatever the earlier process managed to write.
    async fn rehash(&self, pipe: &mut Pipeline, len: u64) -> Result<(), DownloadError> {
        use tokio::io::AsyncReadExt;
        let dest = self.dest();
        let mut f = tokio::fs::File::open(dest)
            .await
            .map_err(|e| DownloadError::io(dest, e))?;
        let mut left = len;
        while left > 0 {
            if self.cancel.is_cancelled() {
                return Err(self.cancelled());
            }
            let n = left.min(pipeline::BLOCK as u64) as usize;
            let mut buf = vec![0u8; n];
            f.read_exact(&mut buf)
                .await
                .map_err(|e| DownloadError::io(dest, e))?;
            pipe.prefix(Bytes::from(buf))
                .await
                .map_err(|e| DownloadError::io(dest, e))?;
            left -= n as u64;
        }
        Ok(())
    }

    /// Writes (or, without a validator, removes) what a later process needs to go on with the
    /// partial file of this answer.
    async fn keep_validator(&self, compressed: bool) -> Result<(), Failure> {
        if !self.req.resume {
            return Ok(());
        }
        let side = resume_path(self.dest());
        let kept = self
            .validator
            .as_ref()
            .filter(|_| !compressed)
            .and_then(|v| v.to_str().ok())
            .map(|v| Kept {
                url: self.req.url.clone(),
                validator: v.to_string(),
                total: self.total,
            });
        let r = tokio::task::spawn_blocking(move || match kept {
            Some(k) => crate::fsutil::write_atomic(
                &side,
                &serde_json::to_vec(&k).map_err(io::Error::other)?,
            ),
            None => match std::fs::remove_file(&side) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))
        .and_then(|r| r);
        r.map_err(|e| self.io(e))
    }

    /// The error to report if this failure is the last one.
    fn give_up(&self, why: Transient, attempts: u32) -> DownloadError {
        let url = self.shown.clone();
        match why {
            Transient::Connect(last) => DownloadError::Connection {
                url,
                attempts,
                last,
            },
            Transient::Status(status) => DownloadError::HttpStatus {
                url,
                status,
                attempts,
            },
            Transient::Idle => DownloadError::IdleTimeout {
                url,
                idle: self.req.idle_timeout,
                attempts,
            },
            Transient::Truncated { received, expected } => DownloadError::Truncated {
                url,
                received,
                expected,
                attempts,
            },
        }
    }

    async fn attempt(&mut self, attempt: u32, pipe: &mut Pipeline) -> Result<(), Failure> {
        let resume_from = self.received;
        let try_range = resume_from > 0 && self.ranges != Ranges::No;
        if resume_from > 0 && !try_range {
            self.restart(pipe).await?;
        }
        let mut request = self.client.get(self.url.clone());
        for (name, value) in &self.req.access.headers {
            request = request.header(name, value);
        }
        // The checksum is of the bytes as stored: no transfer compression.
        request = request.header(header::ACCEPT_ENCODING, "identity");
        if try_range {
            request = request.header(header::RANGE, format!("bytes={resume_from}-"));
            if let Some(v) = &self.validator {
                request = request.header(header::IF_RANGE, v.clone());
            }
        }
        debug!(
            attempt,
            range_start = try_range.then_some(resume_from),
            "GET"
        );

        let idle = self.req.idle_timeout;
        let response = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return Err(Failure::Fatal(self.cancelled())),
            r = tokio::time::timeout(idle, request.send()) => r,
        };
        let response = match response {
            Err(_) => return Err(Transient::Idle.into()),
            Ok(Err(e)) => return Err(self.request_failure(e)),
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        let headers = response.headers();
        debug!(
            attempt,
            status = status.as_u16(),
            final_url = %redact(response.url()),
            content_length = response.content_length(),
            "response"
        );

        match status {
            StatusCode::PARTIAL_CONTENT if try_range => {
                let range = content_range(headers);
                match range {
                    Some((start, total))
                        if start == resume_from
                            && (self.total.is_none() || total.is_none() || total == self.total) =>
                    {
                        self.resumed += 1;
                        self.ranges = Ranges::Yes;
                        self.total = self.total.or(total);
                        debug!(attempt, from = start, "resuming");
                    }
                    _ => {
                        // Not the range asked for, or the file changed size: start over.
                        self.ranges = Ranges::No;
                        self.restart(pipe).await?;
                        return Err(Transient::Connect(format!(
                            "the server answered a Range request from byte {resume_from} with \
                             Content-Range {:?}",
                            headers.get(header::CONTENT_RANGE)
                        ))
                        .into());
                    }
                }
            }
            StatusCode::OK => {
                if self.received > 0 {
                    if try_range {
                        debug!(
                            attempt,
                            "the server ignored the Range request; restarting from 0"
                        );
                        self.ranges = Ranges::No;
                    }
                    self.restart(pipe).await?;
                }
                self.total = response.content_length();
                if self.ranges == Ranges::Unknown {
                    self.ranges = match headers
                        .get(header::ACCEPT_RANGES)
                        .map(HeaderValue::as_bytes)
                    {
                        Some(b"bytes") => Ranges::Yes,
                        Some(b"none") => Ranges::No,
                        _ => Ranges::Unknown,
                    };
                }
                self.validator = validator(headers);
                // Written once the first bytes say whether the body is compressed.
                self.validator_unsaved = self.req.resume;
                if let Some(total) = self.total {
                    pipe.reserve(total).await.map_err(|e| self.io(e))?;
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE if try_range => {
                self.ranges = Ranges::No;
                self.restart(pipe).await?;
                return Err(Transient::Status(status).into());
            }
            s if retryable_status(s) => {
                return Err(Failure::Transient {
                    why: Transient::Status(s),
                    retry_after: retry_after(headers),
                });
            }
            s => {
                return Err(Failure::Fatal(DownloadError::HttpStatus {
                    url: self.shown.clone(),
                    status: s,
                    attempts: attempt,
                }));
            }
        }

        let mut body = response.bytes_stream();
        loop {
            let next = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(Failure::Fatal(self.cancelled())),
                next = tokio::time::timeout(idle, body.next()) => next,
            };
            let chunk: Bytes = match next {
                Err(_) => return Err(Transient::Idle.into()),
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(Transient::Connect(error_chain(&e.without_url())).into());
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            self.received += chunk.len() as u64;
            pipe.push(chunk).await.map_err(|e| self.io(e))?;
            if self.validator_unsaved
                && let Some(compressed) = pipe.compressed()
            {
                self.validator_unsaved = false;
                self.keep_validator(compressed).await?;
            }
            self.report(false);
        }
        match self.total {
            Some(expected) if self.received != expected => {
                let received = self.received;
                if received > expected {
                    // More than announced: nothing to resume from.
                    self.restart(pipe).await?;
                }
                Err(Transient::Truncated { received, expected }.into())
            }
            _ => Ok(()),
        }
    }

    async fn restart(&mut self, pipe: &mut Pipeline) -> Result<(), Failure> {
        pipe.restart().await.map_err(|e| self.io(e))?;
        self.received = 0;
        self.kept = 0;
        self.report(true);
        Ok(())
    }

    fn io(&self, e: io::Error) -> Failure {
        Failure::Fatal(self.pipe_error(e))
    }

    /// The error the pipeline stopped with: a body that does not decompress, or the file's.
    fn pipe_error(&self, e: io::Error) -> DownloadError {
        if let Some(n) = oci::not_a_disk_in(&e) {
            return DownloadError::Source {
                url: self.shown.clone(),
                detail: n.to_string(),
            };
        }
        match decompress::corrupt_in(&e) {
            Some(c) => DownloadError::Corrupt {
                url: self.shown.clone(),
                corrupt: c.clone(),
            },
            None => DownloadError::io(self.dest(), e),
        }
    }

    fn request_failure(&self, e: reqwest::Error) -> Failure {
        if let Some(refusal) = guard::refusal_in(&e) {
            return Failure::Fatal(DownloadError::Denied {
                url: self.shown.clone(),
                refusal,
            });
        }
        if let Some(detail) = untrusted_in(&e) {
            return Failure::Fatal(DownloadError::Untrusted {
                url: self.shown.clone(),
                detail,
            });
        }
        let (redirect, builder) = (e.is_redirect(), e.is_builder());
        let detail = error_chain(&e.without_url());
        if redirect {
            Failure::Fatal(DownloadError::Redirect {
                url: self.shown.clone(),
                detail,
            })
        } else if builder {
            Failure::Fatal(DownloadError::Client(detail))
        } else {
            Transient::Connect(detail).into()
        }
    }

    fn report(&mut self, force: bool) {
        let now = Instant::now();
        if force
            || self
                .last_progress
                .is_none_or(|t| now.duration_since(t) >= PROGRESS_INTERVAL)
        {
            self.last_progress = Some(now);
            self.progress.progress(self.received, self.total);
        }
    }
}

/// The reason, when a request failed because the server's certificate is not trusted: trying
/// again cannot help, trusting its CA can.
fn untrusted_in(e: &reqwest::Error) -> Option<String> {
    // rustls reports it as "invalid peer certificate: <reason>", wrapped in I/O errors whose
    // `source` skips it: the text of the chain is what is left to look at.
    let chain = error_chain(e);
    let at = chain.find("invalid peer certificate")?;
    Some(chain[at..].to_string())
}

/// Wait before attempt `attempt + 1`: base · 2^(attempt-1), at most [`MAX_BACKOFF`].
fn backoff(base: Duration, attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

/// `Retry-After: <seconds>` (the HTTP-date form is rare for downloads and ignored), capped.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_BACKOFF))
}

/// `Content-Range: bytes START-END/TOTAL` → (START, TOTAL if not `*`).
fn content_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let (range, total) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end): (u64, u64) = (start.trim().parse().ok()?, end.trim().parse().ok()?);
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    // A range that ends at or past the whole length is malformed (RFC 9110 §14.4).
    if total.is_some_and(|t: u64| end >= t) {
        return None;
    }
    Some((start, total))
}

/// A strong ETag, else Last-Modified: what If-Range accepts (RFC 9110 §13.1.5).
fn validator(headers: &HeaderMap) -> Option<HeaderValue> {
    headers
        .get(header::ETAG)
        .filter(|v| !v.as_bytes().starts_with(b"W/"))
        .or_else(|| headers.get(header::LAST_MODIFIED))
        .cloned()
}

/// Any ETag (weak ones say a change too), else Last-Modified, named: what a poll compares.
fn change_validator(headers: &HeaderMap) -> Option<String> {
    let text = |v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).trim().to_string();
    headers
        .get(header::ETAG)
        .map(|v| format!("etag:{}", text(v)))
        .or_else(|| {
            headers
                .get(header::LAST_MODIFIED)
                .map(|v| format!("last-modified:{}", text(v)))
        })
}

async fn create_dest(path: &Path) -> Result<std::fs::File, DownloadError> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        if let Some(parent) = owned.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&owned)
    })
    .await
    .map_err(|e| io::Error::other(e.to_string()))
    .and_then(|r| r)
    .map_err(|e| DownloadError::io(path, e))
}

/// Makes the file durable, checks its size, and releases the page cache the download filled
/// (dirty pages cannot be dropped, so this comes after the sync).
fn settle(file: &std::fs::File, path: &Path, size: u64) -> Result<(), DownloadError> {
    let err = |e| DownloadError::io(path, e);
    file.sync_data().map_err(err)?;
    let on_disk = file.metadata().map_err(err)?.len();
    if on_disk != size {
        return Err(err(io::Error::other(format!(
            "file is {on_disk} bytes after writing {size}"
        ))));
    }
    if let Err(e) = posix_fadvise(file, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED) {
        debug!(error = %e, "posix_fadvise(DONTNEED) failed; page cache left to the kernel");
    }
    Ok(())
}

/// Fuzzing entry (feature `fuzzing`, `fuzz/`): a Content-Range a server sends never panics, and
/// one that parses has its start within its total.
#[cfg(feature = "fuzzing")]
pub fn fuzz_content_range(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_RANGE, value);
    if let Some((start, Some(total))) = content_range(&headers) {
        assert!(start < total, "{data:?}");
    }
}
