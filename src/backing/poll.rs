//! Images that update (`pollInterval`), as CDI's DataImportCron keeps them: the controller checks
//! a polled download's source every interval for its validator (an HTTP ETag or Last-Modified,
//! S3's ETag, a registry tag's manifest digest) and, when it changed, makes a new BackingImage
//! `NAME-<short digest>` from the same source parameters (a registry image pinned to the digest
//! found), prepared and verified like any other. New volumes that name `NAME` get its newest
//! version with a ready file (the alias, `status.poll.current`); volumes keep the version they
//! were made from. Versions no volume uses beyond the `keepVersions` newest (and never the
//! alias) are deleted. All the poll knows is in the polled image's status, so it goes on after a
//! restart where it stood. A check that fails, or finds the validator unchanged, makes nothing;
//! a version that fails leaves the alias where it was.
//!
//! It must not touch disks: the checks are one ranged GET or one manifest GET by the
//! controller, the versions are made and deleted through [`BackingImages`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::BackingImages;
use super::object::{
    self, BackingImage, BackingImageSpec, PollStatus, PolledVersion, SourceType, UrlKind,
};
use crate::error::{Error, Result};
use crate::files::source::DownloadSource;
use crate::model::{parse_rfc3339, rfc3339};
use crate::store::{Kind, StoreExt};

/// The source parameter that makes an image poll its source: `30s`, `10m`, `1h30m`, `1d`.
pub const POLL_INTERVAL: &str = "pollInterval";
/// The source parameter of how many of the newest versions are kept besides those in use.
pub const KEEP_VERSIONS: &str = "keepVersions";
/// `keepVersions` when not given.
pub const DEFAULT_KEEP: usize = 3;
/// How long one check of a source may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// The suffix a version's name adds: `-` and 8 hexadecimal characters.
const SUFFIX_LEN: usize = 9;

/// Seconds of a duration written as number-unit groups (`s`, `m`, `h`, `d`): `90s`, `1h30m`.
pub fn parse_interval(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let bad =
        || format!("{POLL_INTERVAL} {t:?} is not a duration; write e.g. 30s, 10m, 1h30m or 1d");
    if t.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(bad)?;
        number.clear();
    }
    if !number.is_empty() {
        return Err(bad());
    }
    if total == 0 {
        return Err(format!("{POLL_INTERVAL} {t:?} is zero; give at least 1s"));
    }
    Ok(total)
}

fn keep_versions(params: &BTreeMap<String, String>) -> usize {
    params
        .get(KEEP_VERSIONS)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_KEEP)
}

/// The image's poll interval in seconds, when it polls.
pub fn interval(bi: &BackingImage) -> Option<u64> {
    if bi.spec.source_type != SourceType::Download {
        return None;
    }
    parse_interval(bi.spec.source_parameters.get(POLL_INTERVAL)?).ok()
}

/// Checks `pollInterval` and `keepVersions` of a download's spec.
pub fn check_spec(name: &str, spec: &BackingImageSpec) -> std::result::Result<(), String> {
    let params = &spec.source_parameters;
    let Some(every) = params.get(POLL_INTERVAL) else {
        if params.contains_key(KEEP_VERSIONS) {
            return Err(format!(
                "{KEEP_VERSIONS} is how many versions a polled image keeps, and {POLL_INTERVAL} is not given"
            ));
        }
        return Ok(());
    };
    parse_interval(every)?;
    if let Some(k) = params.get(KEEP_VERSIONS) {
        match k.trim().parse::<usize>() {
            Ok(n) if n >= 1 => {}
            _ => {
                return Err(format!(
                    "{KEEP_VERSIONS} {k:?} is not a whole number of at least 1"
                ));
            }
        }
    }
    if !spec.checksum.is_empty() || params.contains_key("sourceChecksum") {
        return Err(format!(
            "{POLL_INTERVAL} follows a source whose content changes, and checksum or sourceChecksum pin one content; give one or the other"
        ));
    }
    let url = params.get("url").map(|u| u.trim()).unwrap_or("");
    if UrlKind::of(url) == UrlKind::Registry
        && crate::download::oci::Reference::parse(url)
            .is_ok_and(|r| r.reference.starts_with("sha256:"))
    {
        return Err(format!(
            "{POLL_INTERVAL} follows a tag, and {url} is pinned by its digest, which never changes; name a tag"
        ));
    }
    if name.len() + SUFFIX_LEN > 63 {
        return Err(format!(
            "a polled image's versions are named NAME-<8 hex digits>, which must fit 63 characters: use a name of at most {} characters",
            63 - SUFFIX_LEN
        ));
    }
    Ok(())
}

/// The version of `name` made for `validator`: `NAME-` and 8 hexadecimal characters (of a
/// `sha256:` digest its start, of another validator the start of its SHA-256).
pub fn version_name(name: &str, validator: &str) -> String {
    let short = match validator.strip_prefix("sha256:") {
        Some(hex) if hex.len() >= 8 => hex[..8].to_string(),
        _ => hex::encode(Sha256::digest(validator.as_bytes()))[..8].to_string(),
    };
    format!("{name}-{short}")
}

/// A version's spec: the polled image's source without the poll keys, a registry tag pinned to
/// the digest found.
fn version_spec(bi: &BackingImage, validator: &str) -> BackingImageSpec {
    let mut params = bi.spec.source_parameters.clone();
    params.remove(POLL_INTERVAL);
    params.remove(KEEP_VERSIONS);
    if let Some(url) = params.get_mut("url")
        && UrlKind::of(url) == UrlKind::Registry
        && validator.starts_with("sha256:")
        && let Ok(mut r) = crate::download::oci::Reference::parse(url)
    {
        r.reference = validator.to_string();
        *url = r.to_string();
    }
    BackingImageSpec {
        source_type: bi.spec.source_type,
        source_parameters: params,
        checksum: String::new(),
        min_number_of_copies: bi.spec.min_number_of_copies,
    }
}

impl BackingImages {
    /// One poll round at `now`: for every polled image, the alias and the versions' cleanup,
    /// and the check of its source when it is due.
    pub async fn poll(self: &Arc<Self>, now: u64) -> Result<()> {
        for bi in self.list()? {
            let Some(every) = interval(&bi) else {
                continue;
            };
            if bi.status.uuid.is_empty() {
                continue;
            }
            if let Err(e) = self.poll_image(&bi, every, now).await {
                tracing::warn!(image = %bi.name(), error = %e, "poll of a backing image failed; it goes on at the next round");
            }
        }
        Ok(())
    }

    async fn poll_image(self: &Arc<Self>, bi: &BackingImage, every: u64, now: u64) -> Result<()> {
        let name = bi.name();
        self.refresh_alias(name).await?;
        self.collect_versions(name).await?;
        let st = bi.status.poll.clone().unwrap_or_default();
        let due = parse_rfc3339(&st.next_check_time).is_none_or(|t| t <= now);
        if !due {
            return Ok(());
        }
        let checked = self.check_source(bi).await;
        let next = rfc3339(now + every);
        let validator = match checked {
            Ok(v) => v,
            Err(e) => {
                let message = e.to_string();
                tracing::warn!(image = %name, error = %message, "cannot check the source of a polled backing image");
                self.update(name, |b| {
                    let p = b.status.poll.get_or_insert_with(PollStatus::default);
                    p.last_check_time = rfc3339(now);
                    p.next_check_time = next.clone();
                    p.last_error = message.clone();
                    Ok(())
                })
                .await?;
                return Ok(());
            }
        };
        let made = if st.validator.is_empty() || st.validator == validator {
            // The first check records what the image was made from; an unchanged one, nothing.
            None
        } else {
            Some(self.make_version(bi, &validator, now).await?)
        };
        self.update(name, |b| {
            let p = b.status.poll.get_or_insert_with(PollStatus::default);
            p.last_check_time = rfc3339(now);
            p.next_check_time = next.clone();
            p.last_error.clear();
            p.validator = validator.clone();
            if let Some(v) = &made
                && !p.versions.iter().any(|x| &x.name == v)
            {
                p.versions.push(PolledVersion {
                    name: v.clone(),
                    validator: validator.clone(),
                    created_time: rfc3339(now),
                });
            }
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// The source's validator now, read by the controller with the image's credentials.
    async fn check_source(&self, bi: &BackingImage) -> Result<String> {
        let name = bi.name();
        let failed = |e| Error::FailedPrecondition(format!("backing image {name:?}: {e}"));
        let download = DownloadSource::from_params(&bi.spec.source_parameters).map_err(failed)?;
        let url = download.url.trim();
        let guard = self.settings().download_guard()?;
        let credentials = self.source_credentials(bi)?;
        let (remote, access) = download.access(credentials.as_ref()).map_err(failed)?;
        let explain = |e: crate::download::DownloadError| {
            Error::Unavailable(format!(
                "backing image {name:?}: cannot check its source for a new version: {e}"
            ))
        };
        let timed_out = |_| {
            Error::Unavailable(format!(
                "backing image {name:?}: the check of its source for a new version took more than {} s",
                CHECK_TIMEOUT.as_secs()
            ))
        };
        if let crate::download::Remote::Oci(oci) = &remote {
            let work = crate::download::oci::digest(url, oci, &guard, &access, CHECK_TIMEOUT);
            return tokio::time::timeout(CHECK_TIMEOUT, work)
                .await
                .map_err(timed_out)?
                .map_err(explain);
        }
        let head = crate::download::head_remote(url, &remote, 1, CHECK_TIMEOUT, &guard, &access)
            .await
            .map_err(explain)?;
        head.validator.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "backing image {name:?}: the server of {} sends neither ETag nor Last-Modified, so {POLL_INTERVAL} cannot tell when it changes; drop {POLL_INTERVAL} or serve the image with one",
                crate::messages::redact_text(url)
            ))
        })
    }

    /// Makes the version of `bi` for `validator` (nothing when it exists) and starts its first
    /// file. Answers its name.
    async fn make_version(
        self: &Arc<Self>,
        bi: &BackingImage,
        validator: &str,
        now: u64,
    ) -> Result<String> {
        let name = version_name(bi.name(), validator);
        let wanted = BackingImage {
            api_version: object::API_VERSION.to_string(),
            kind: object::KIND.to_string(),
            metadata: object::ObjectMeta {
                name: name.clone(),
                namespace: bi.metadata.namespace.clone(),
            },
            spec: version_spec(bi, validator),
            status: Default::default(),
        };
        let mut version = object::from_user(wanted)?;
        let created = {
            let _w = self.write.lock().await;
            if self.get(&name)?.is_some() {
                None
            } else {
                version.status.version_of = bi.name().to_string();
                self.initialise(&mut version).await?;
                self.store.put(Kind::BackingImage, &name, &version)?;
                Some(version)
            }
        };
        if let Some(v) = created {
            tracing::info!(image = %bi.name(), version = %name, validator = %validator, at = now, "the source changed: a new version is made");
            self.start_first_files(&v).await;
        }
        Ok(name)
    }

    /// Points the alias at the newest version with a ready file (the image itself while none
    /// has one).
    async fn refresh_alias(&self, name: &str) -> Result<()> {
        let Some(bi) = self.get(name)? else {
            return Ok(());
        };
        let Some(p) = &bi.status.poll else {
            return Ok(());
        };
        let mut current = String::new();
        for v in p.versions.iter().rev() {
            if self.get(&v.name)?.is_some_and(|b| b.has_ready_file()) {
                current = v.name.clone();
                break;
            }
        }
        if current != p.current {
            self.update(name, |b| {
                if let Some(p) = &mut b.status.poll {
                    p.current = current.clone();
                }
                Ok(())
            })
            .await?;
            tracing::info!(image = %name, to = %if current.is_empty() { name } else { &current }, "new volumes of the polled image get a new version");
        }
        Ok(())
    }

    /// Deletes the versions beyond the `keepVersions` newest that no volume uses and the alias
    /// does not name; forgets versions deleted by hand. Answers the names deleted.
    pub(crate) async fn collect_versions(&self, name: &str) -> Result<Vec<String>> {
        let Some(bi) = self.get(name)? else {
            return Ok(Vec::new());
        };
        let Some(p) = &bi.status.poll else {
            return Ok(Vec::new());
        };
        let keep = keep_versions(&bi.spec.source_parameters);
        let n = p.versions.len();
        let mut gone = Vec::new();
        let mut deleted = Vec::new();
        for (i, v) in p.versions.iter().enumerate() {
            if self.get(&v.name)?.is_none() {
                gone.push(v.name.clone());
                continue;
            }
            if i + keep >= n || v.name == p.current || !self.users(&v.name)?.is_empty() {
                continue;
            }
            match self.delete(&v.name).await {
                Ok(()) => {
                    tracing::info!(image = %name, version = %v.name, keep, "an unused old version is deleted");
                    gone.push(v.name.clone());
                    deleted.push(v.name.clone());
                }
                Err(e) => {
                    // Held by a snapshot, or a node to reach: tried again next round (each second).
                    tracing::debug!(image = %name, version = %v.name, error = %e, "an old version stays")
                }
            }
        }
        if !gone.is_empty() {
            self.update(name, |b| {
                if let Some(p) = &mut b.status.poll {
                    p.versions.retain(|v| !gone.contains(&v.name));
                }
                Ok(())
            })
            .await?;
        }
        Ok(deleted)
    }

    /// What a new volume naming `bi` gets: the version the alias names when it has a ready
    /// file, else `bi` itself.
    pub fn alias_target(&self, bi: BackingImage) -> Result<BackingImage> {
        let current = match &bi.status.poll {
            Some(p) if !p.current.is_empty() => p.current.clone(),
            _ => return Ok(bi),
        };
        match self.get(&current)? {
            Some(v) if v.has_ready_file() => Ok(v),
            _ => Ok(bi),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_number_unit_groups() {
        assert_eq!(parse_interval("30s").unwrap(), 30);
        assert_eq!(parse_interval("1h30m").unwrap(), 5400);
        assert_eq!(parse_interval(" 1d ").unwrap(), 86400);
        for bad in [
            "",
            "30",
            "s",
            "1x",
            "0s",
            "1.5h",
            "-1s",
            "99999999999999999999d",
        ] {
            assert!(parse_interval(bad).is_err(), "{bad:?}");
        }
    }

    fn spec(params: &[(&str, &str)], checksum: &str) -> BackingImageSpec {
        BackingImageSpec {
            source_type: SourceType::Download,
            source_parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            checksum: checksum.to_string(),
            min_number_of_copies: 1,
        }
    }

    #[test]
    fn poll_parameters_are_checked() {
        let url = ("url", "http://127.0.0.1/x.img");
        check_spec("img", &spec(&[url, (POLL_INTERVAL, "5m")], "")).unwrap();
        check_spec(
            "img",
            &spec(&[url, (POLL_INTERVAL, "5m"), (KEEP_VERSIONS, "1")], ""),
        )
        .unwrap();
        /// Parameters, checksum, name, and what the refusal says.
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str, &'a str);
        let refused: &[Case] = &[
            (&[url, (KEEP_VERSIONS, "2")], "", "img", "is not given"),
            (&[url, (POLL_INTERVAL, "soon")], "", "img", "not a duration"),
            (
                &[url, (POLL_INTERVAL, "5m"), (KEEP_VERSIONS, "0")],
                "",
                "img",
                "at least 1",
            ),
            (
                &[url, (POLL_INTERVAL, "5m"), ("sourceChecksum", "sha256:00")],
                "",
                "img",
                "pin one content",
            ),
            (
                &[url, (POLL_INTERVAL, "5m")],
                "ab",
                "img",
                "pin one content",
            ),
            (
                &[
                    (
                        "url",
                        "docker://127.0.0.1:5000/vm/disk@sha256:0123456789012345678901234567890123456789012345678901234567890123",
                    ),
                    (POLL_INTERVAL, "5m"),
                ],
                "",
                "img",
                "name a tag",
            ),
            (
                &[url, (POLL_INTERVAL, "5m")],
                "",
                &"a".repeat(55),
                "at most 54",
            ),
        ];
        for (params, checksum, name, want) in refused {
            let e = check_spec(name, &spec(params, checksum)).unwrap_err();
            assert!(e.contains(want), "{params:?}: {e}");
        }
        // Through the whole validation too: the keys are known to a download.
        let mut s = spec(&[url, (POLL_INTERVAL, "10s"), (KEEP_VERSIONS, "2")], "");
        object::validate_spec("img", &mut s).unwrap();
        let mut s = spec(&[url, (POLL_INTERVAL, "never")], "");
        let e = object::validate_spec("img", &mut s)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backing image \"img\"") && e.contains("30s"),
            "{e}"
        );
    }

    #[test]
    fn versions_are_named_by_the_digest_and_pinned_to_it() {
        let digest = format!("sha256:{}", "ab12cd34".repeat(8));
        assert_eq!(version_name("img", &digest), "img-ab12cd34");
        let etag = version_name("img", "etag:\"v1\"");
        assert_eq!(etag.len(), "img".len() + SUFFIX_LEN);
        assert_ne!(etag, version_name("img", "etag:\"v2\""));
        let bi = BackingImage {
            api_version: object::API_VERSION.into(),
            kind: object::KIND.into(),
            metadata: object::ObjectMeta {
                name: "img".into(),
                namespace: object::DEFAULT_NAMESPACE.into(),
            },
            spec: spec(
                &[
                    ("url", "docker://127.0.0.1:5000/vm/disk:latest"),
                    (POLL_INTERVAL, "5m"),
                    (KEEP_VERSIONS, "2"),
                    ("usernameFile", "/u"),
                ],
                "",
            ),
            status: Default::default(),
        };
        let v = version_spec(&bi, &digest);
        assert_eq!(
            v.source_parameters["url"],
            format!("docker://127.0.0.1:5000/vm/disk@{digest}")
        );
        assert!(!v.source_parameters.contains_key(POLL_INTERVAL));
        assert!(!v.source_parameters.contains_key(KEEP_VERSIONS));
        assert_eq!(v.source_parameters["usernameFile"], "/u");
    }
}
