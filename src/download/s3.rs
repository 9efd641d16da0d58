//! The S3 source: `s3://bucket/key` with an endpoint, a region and, for a private bucket, an
//! access key. It turns the object into a plain HTTPS (or HTTP) GET so the whole download
//! pipeline applies unchanged (decompression, checksums, Range resume, the guard): a SigV4
//! presigned URL (query-string authentication, signed for this object, valid for
//! [`PRESIGN_VALID`]) when keys are given, the object's plain URL for a public bucket. Range and
//! If-Range headers are not part of a presigned signature, so a resume needs no new URL.
//!
//! The presigned URL carries the signature in its query string: it is shown only through
//! [`super::redact`] (which drops the query) and never stored; the source keeps `s3://…`.
//! It must not know about backing-image objects or Kubernetes: the caller gives the keys.

use std::fmt;
use std::time::Duration;

use object_store::signer::Signer;
use reqwest::Url;

/// How long a presigned URL is accepted: long enough for a large image over a slow link with
/// its retries, short of SigV4's 7-day limit.
pub const PRESIGN_VALID: Duration = Duration::from_secs(24 * 3600);

/// The region when none is given (the one S3-compatible servers default to).
pub const DEFAULT_REGION: &str = "us-east-1";

/// An object in a bucket, parsed from `s3://bucket/key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Object {
    pub bucket: String,
    pub key: String,
}

impl S3Object {
    /// Parses `s3://bucket/key` (the key may hold `/`).
    pub fn parse(url: &str) -> Result<S3Object, String> {
        let rest = url
            .trim()
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{url:?} is not an S3 URL; write s3://BUCKET/KEY"))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(format!(
                "s3://{bucket}/…: {bucket:?} is not a valid bucket name (3 to 63 lower-case letters, digits, '-' and '.'); write s3://BUCKET/KEY"
            ));
        }
        if key.is_empty() || key.contains('?') || key.contains('#') {
            return Err(format!(
                "s3://{bucket}/{key}: no object key (or one with '?' or '#'); write s3://BUCKET/KEY"
            ));
        }
        Ok(S3Object {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }
}

impl fmt::Display for S3Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// An access key pair; never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Keys {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl fmt::Debug for S3Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("S3Keys(<redacted>)")
    }
}

/// Where the bucket is and how to sign for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Access {
    /// `http(s)://host[:port]` of an S3-compatible server, addressed path-style
    /// (`ENDPOINT/BUCKET/KEY`); `None` for AWS (`https://BUCKET.s3.REGION.amazonaws.com/KEY`).
    pub endpoint: Option<String>,
    pub region: String,
    /// `None`: a public bucket, fetched unsigned.
    pub keys: Option<S3Keys>,
}

/// Checks an `endpoint` source parameter: an http or https URL with a host and no path.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let u = Url::parse(endpoint.trim()).map_err(|e| {
        format!("endpoint {endpoint:?} is not a URL ({e}); write http(s)://HOST[:PORT]")
    })?;
    if !matches!(u.scheme(), "http" | "https")
        || u.host_str().is_none_or(str::is_empty)
        || !matches!(u.path(), "" | "/")
        || u.query().is_some()
    {
        return Err(format!(
            "endpoint {endpoint:?}: write http(s)://HOST[:PORT], without a path (the bucket is in the s3:// URL)"
        ));
    }
    Ok(())
}

/// The URL to GET `object` with: presigned with the keys, else the plain one.
pub async fn object_url(object: &S3Object, access: &S3Access) -> Result<Url, String> {
    let what = object.to_string();
    let Some(keys) = &access.keys else {
        let base = match &access.endpoint {
            Some(ep) => format!("{}/{}/", ep.trim().trim_end_matches('/'), object.bucket),
            None => format!(
                "https://{}.s3.{}.amazonaws.com/",
                object.bucket, access.region
            ),
        };
        let mut url = Url::parse(&base).map_err(|e| format!("{what}: {e}"))?;
        url.path_segments_mut()
            .map_err(|()| format!("{what}: the endpoint cannot take a path"))?
            .pop_if_empty()
            .extend(object.key.split('/'));
        return Ok(url);
    };
    let mut b = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&object.bucket)
        .with_region(&access.region)
        .with_access_key_id(&keys.access_key_id)
        .with_secret_access_key(&keys.secret_access_key);
    match &access.endpoint {
        Some(ep) => {
            b = b
                .with_endpoint(ep.trim().trim_end_matches('/'))
                .with_allow_http(ep.trim().starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        None => b = b.with_virtual_hosted_style_request(true),
    }
    // Building and presigning are local computations: nothing is sent here.
    let s3 = b.build().map_err(|e| format!("{what}: {e}"))?;
    s3.signed_url(
        object_store::signer::Method::GET,
        &object_store::path::Path::from(object.key.as_str()),
        PRESIGN_VALID,
    )
    .await
    .map_err(|e| format!("{what}: cannot presign the GET ({e})"))
}

/// What an S3 server's refusal means, for the error a user reads.
pub fn explain(status: reqwest::StatusCode, signed: bool) -> Option<&'static str> {
    match (status.as_u16(), signed) {
        (403, true) => Some(
            "the S3 server refused the signed request: check the access key id and secret access key, and the region",
        ),
        (401 | 403, false) => Some(
            "the bucket is not public: give an access key (secret with accessKeyId and secretAccessKey, or accessKeyIdFile and secretAccessKeyFile)",
        ),
        (404, _) => Some("no such bucket or key: check the s3:// URL and the endpoint"),
        (301 | 400, true) => {
            Some("the S3 server refused the request: check the region and the endpoint")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_parse_or_say_how_to_write_them() {
        let o = S3Object::parse("s3://images/cloud/noble.qcow2").unwrap();
        assert_eq!(
            (o.bucket.as_str(), o.key.as_str()),
            ("images", "cloud/noble.qcow2")
        );
        assert_eq!(o.to_string(), "s3://images/cloud/noble.qcow2");
        for (bad, want) in [
            ("https://x/y", "not an S3 URL"),
            ("s3://images", "no object key"),
            ("s3://images/", "no object key"),
            ("s3://Images/k", "not a valid bucket name"),
            ("s3://im/k", "not a valid bucket name"),
        ] {
            let e = S3Object::parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert!(check_endpoint("http://127.0.0.1:9000").is_ok());
        assert!(check_endpoint("https://s3.example.com/").is_ok());
        assert!(check_endpoint("https://s3.example.com/bucket").is_err());
        assert!(check_endpoint("ftp://s3.example.com").is_err());
    }

    #[tokio::test]
    async fn a_presigned_url_names_the_object_and_hides_the_key_behind_redact() {
        let object = S3Object::parse("s3://images/dir/a b.img").unwrap();
        let access = S3Access {
            endpoint: Some("http://127.0.0.1:9000".into()),
            region: DEFAULT_REGION.into(),
            keys: Some(S3Keys {
                access_key_id: "AKID".into(),
                secret_access_key: "s3cret-key".into(),
            }),
        };
        let url = object_url(&object, &access).await.unwrap();
        assert_eq!(url.path(), "/images/dir/a%20b.img");
        let q = url.query().unwrap();
        assert!(q.contains("X-Amz-Signature=") && q.contains("AKID"), "{q}");
        assert!(!url.as_str().contains("s3cret-key"));
        assert_eq!(
            super::super::redact(&url),
            "http://127.0.0.1:9000/images/dir/a%20b.img?…"
        );
        let public = object_url(
            &object,
            &S3Access {
                keys: None,
                ..access
            },
        )
        .await
        .unwrap();
        assert_eq!(
            public.as_str(),
            "http://127.0.0.1:9000/images/dir/a%20b.img"
        );
    }
}
