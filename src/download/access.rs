//! What a private URL needs besides its address: request headers that carry a credential (an
//! `Authorization` value, basic-auth user and password, or any `Name: value` lines), and CA
//! certificates trusted in addition to the system roots.
//!
//! The values are secrets: [`Access`] never shows them (its `Debug` lists header names only),
//! the header values are marked sensitive for the HTTP stack, and every error here names the
//! file and the line, never what is in it. They are read from files whose paths the source
//! parameters give (see [`AccessFiles`]); the paths are what is stored on the backing image.
//!
//! It must not know about backing-image objects: the caller turns its parameters into
//! [`AccessFiles`].

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use reqwest::header::{AUTHORIZATION, HeaderName, HeaderValue};

/// Headers and trust for one download; empty for a public URL.
#[derive(Clone, Default)]
pub struct Access {
    /// Sent with every request of the download (and of its head).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// PEM certificates trusted in addition to the system roots.
    pub ca_bundle: Option<Vec<u8>>,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Access")
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(n, _)| format!("{n}: <redacted>"))
                    .collect::<Vec<_>>(),
            )
            .field("ca_bundle", &self.ca_bundle.as_ref().map(Vec::len))
            .finish()
    }
}

/// Where the secrets of a private URL are: each a file path (from the source parameters of the
/// same names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessFiles {
    /// `headersFile`: lines `Name: value`; empty lines and lines starting with `#` are skipped.
    pub headers: Option<PathBuf>,
    /// `authorizationFile`: the whole `Authorization` value, e.g. `Bearer TOKEN`.
    pub authorization: Option<PathBuf>,
    /// `usernameFile` and `passwordFile`: basic authentication.
    pub username: Option<PathBuf>,
    pub password: Option<PathBuf>,
    /// `caBundleFile`: PEM certificates.
    pub ca_bundle: Option<PathBuf>,
}

impl AccessFiles {
    /// Checks the combination without reading anything: absolute paths, user and password
    /// together, one way of authorizing.
    pub fn check(&self) -> Result<(), String> {
        for (key, path) in [
            ("headersFile", &self.headers),
            ("authorizationFile", &self.authorization),
            ("usernameFile", &self.username),
            ("passwordFile", &self.password),
            ("caBundleFile", &self.ca_bundle),
        ] {
            if let Some(p) = path
                && !p.is_absolute()
            {
                return Err(format!(
                    "{key} {:?} is not an absolute path; give the file's full path on the machine bicsi runs on",
                    p.display()
                ));
            }
        }
        if self.username.is_some() != self.password.is_some() {
            return Err(
                "usernameFile and passwordFile go together (basic authentication); give both"
                    .to_string(),
            );
        }
        if self.authorization.is_some() && self.username.is_some() {
            return Err(
                "authorizationFile and usernameFile/passwordFile both set the Authorization header; give one"
                    .to_string(),
            );
        }
        Ok(())
    }

    /// Reads the files into an [`Access`]. Errors name the key and the file, never a value.
    pub fn load(&self) -> Result<Access, String> {
        self.check()?;
        let mut access = Access::default();
        if let Some(p) = &self.headers {
            let text = read_text("headersFile", p)?;
            let what = format!("headersFile {}", p.display());
            access.headers.extend(header_lines(&what, &text)?);
        }
        if let Some(p) = &self.authorization {
            let text = read_text("authorizationFile", p)?;
            let value = secret_value(text.trim()).ok_or_else(|| {
                format!(
                    "authorizationFile {}: not a valid Authorization value (one line, such as `Bearer TOKEN`)",
                    p.display()
                )
            })?;
            access.headers.push((AUTHORIZATION, value));
        }
        if let (Some(u), Some(pw)) = (&self.username, &self.password) {
            let user = read_text("usernameFile", u)?;
            let pass = read_text("passwordFile", pw)?;
            // A trailing newline is how editors and `echo` end a file, not part of the secret.
            let user = user.trim_end_matches(['\r', '\n']);
            let pass = pass.trim_end_matches(['\r', '\n']);
            let value = basic(&format!("usernameFile {}", u.display()), user, pass)?;
            access.headers.push((AUTHORIZATION, value));
        }
        if let Some(p) = &self.ca_bundle {
            let pem = std::fs::read(p).map_err(|e| cannot_read("caBundleFile", p, e))?;
            check_pem(&format!("caBundleFile {}", p.display()), &pem)?;
            access.ca_bundle = Some(pem);
        }
        Ok(access)
    }
}

/// Parses `Name: value` lines (empty lines and `#` comments skipped); errors name `what` and the
/// line, never a value.
fn header_lines(what: &str, text: &str) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| {
            format!(
                "{what}: line {}: {why}; write one `Name: value` per line",
                i + 1
            )
        };
        let (name, value) = line.split_once(':').ok_or_else(|| bad("no ':'"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| bad("not a valid header name"))?;
        let value = secret_value(value.trim())
            .ok_or_else(|| bad(&format!("the value of {name} is not a valid header value")))?;
        out.push((name, value));
    }
    Ok(out)
}

/// `Basic base64(user:password)`; the user may not contain ':'.
fn basic(what: &str, user: &str, pass: &str) -> Result<HeaderValue, String> {
    if user.contains(':') {
        return Err(format!("{what}: a basic-auth user name cannot contain ':'"));
    }
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    Ok(secret_value(&format!("Basic {token}")).expect("base64 is a valid value"))
}

/// Secret material of a source as the controller read it from Kubernetes objects (a Secret's
/// keys, a ConfigMap's CA bundle) and hands to the node in its request: the node never calls
/// the API server. Values are never shown: `Debug` lists which ones are present.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    /// Where the values came from, for messages: `Secret "ns/name"`.
    pub origin: String,
    /// The Secret's keys and values (`authorization`, `username`, `password`, `headers`,
    /// `accessKeyId`, `secretAccessKey`, `.dockerconfigjson`), as UTF-8 text.
    pub values: std::collections::BTreeMap<String, String>,
    /// PEM certificates trusted in addition to the system roots (a ConfigMap's `ca.crt`).
    pub ca_bundle: Option<String>,
    /// Where the CA bundle came from, for messages: `ConfigMap "ns/name"`.
    pub ca_origin: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("origin", &self.origin)
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .field("ca_bundle", &self.ca_bundle.as_ref().map(String::len))
            .field("ca_origin", &self.ca_origin)
            .finish()
    }
}

/// The keys of a Secret that make a plain URL's headers.
pub const SECRET_HTTP_KEYS: &[&str] = &["authorization", "username", "password", "headers"];

impl Credentials {
    /// A value of the Secret, trimmed of the newline `echo` and editors end files with.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .map(|v| v.trim_end_matches(['\r', '\n']))
    }

    /// The headers and trust of a plain http(s) URL: `authorization` (the whole value), or
    /// `username` + `password` (basic authentication), and/or `headers` (`Name: value` lines);
    /// the CA bundle when one was given. Errors name the Secret and the key, never a value.
    pub fn access(&self) -> Result<Access, String> {
        let o = &self.origin;
        let mut access = Access::default();
        if let Some(text) = self.get("headers") {
            access
                .headers
                .extend(header_lines(&format!("{o}, key headers"), text)?);
        }
        let (user, pass) = (self.get("username"), self.get("password"));
        if user.is_some() != pass.is_some() {
            return Err(format!(
                "{o}: the keys username and password go together (basic authentication); give both"
            ));
        }
        if let Some(auth) = self.get("authorization") {
            if user.is_some() {
                return Err(format!(
                    "{o}: the keys authorization and username/password both set the Authorization header; give one"
                ));
            }
            let value = secret_value(auth.trim()).ok_or_else(|| {
                format!("{o}, key authorization: not a valid Authorization value (one line, such as `Bearer TOKEN`)")
            })?;
            access.headers.push((AUTHORIZATION, value));
        }
        if let (Some(u), Some(p)) = (user, pass) {
            access
                .headers
                .push((AUTHORIZATION, basic(&format!("{o}, key username"), u, p)?));
        }
        access.ca_bundle = self.ca_pem()?;
        Ok(access)
    }

    /// The CA bundle, checked to hold PEM certificates.
    pub fn ca_pem(&self) -> Result<Option<Vec<u8>>, String> {
        let Some(pem) = &self.ca_bundle else {
            return Ok(None);
        };
        check_pem(&self.ca_origin, pem.as_bytes())?;
        Ok(Some(pem.clone().into_bytes()))
    }
}

fn check_pem(what: &str, pem: &[u8]) -> Result<(), String> {
    let certs = reqwest::Certificate::from_pem_bundle(pem)
        .map_err(|e| format!("{what}: not a PEM certificate bundle ({e})"))?;
    if certs.is_empty() {
        return Err(format!(
            "{what}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it"
        ));
    }
    Ok(())
}

fn cannot_read(key: &str, path: &Path, e: std::io::Error) -> String {
    format!(
        "{key} {}: cannot read it ({e}); check the path and that bicsi may read it",
        path.display()
    )
}

fn read_text(key: &str, path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| cannot_read(key, path, e))?;
    String::from_utf8(bytes).map_err(|_| format!("{key} {}: not UTF-8 text", path.display()))
}

fn secret_value(v: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(v).ok()?;
    value.set_sensitive(true);
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, text: &str) -> Option<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        Some(p)
    }

    #[test]
    fn headers_authorization_and_basic_auth_are_read_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let files = AccessFiles {
            headers: file(
                d,
                "h",
                "# comment\n\nPRIVATE-TOKEN: s3cret-1\nX-Other:  two words \n",
            ),
            ..Default::default()
        };
        let a = files.load().unwrap();
        let got: Vec<_> = a
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.to_str().unwrap().to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("private-token".to_string(), "s3cret-1".to_string()),
                ("x-other".to_string(), "two words".to_string())
            ]
        );
        assert!(a.headers.iter().all(|(_, v)| v.is_sensitive()));
        assert!(!format!("{a:?}").contains("s3cret"), "{a:?}");

        let a = AccessFiles {
            authorization: file(d, "a", "Bearer s3cret-2\n"),
            ..Default::default()
        }
        .load()
        .unwrap();
        assert_eq!(a.headers[0].0, AUTHORIZATION);
        assert_eq!(a.headers[0].1, "Bearer s3cret-2");

        let a = AccessFiles {
            username: file(d, "u", "alice\n"),
            password: file(d, "p", "open sesame\n"),
            ..Default::default()
        }
        .load()
        .unwrap();
        // base64("alice:open sesame")
        assert_eq!(a.headers[0].1, "Basic YWxpY2U6b3BlbiBzZXNhbWU=");
    }

    #[test]
    fn bad_files_are_errors_naming_the_key_and_never_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let cases: Vec<(AccessFiles, &str)> = vec![
            (
                AccessFiles {
                    headers: file(d, "h1", "Authorization Bearer s3cret\n"),
                    ..Default::default()
                },
                "line 1: no ':'",
            ),
            (
                AccessFiles {
                    headers: file(d, "h2", "Bad Name: s3cret\n"),
                    ..Default::default()
                },
                "not a valid header name",
            ),
            (
                AccessFiles {
                    headers: Some(d.join("missing")),
                    ..Default::default()
                },
                "headersFile",
            ),
            (
                AccessFiles {
                    headers: Some(PathBuf::from("relative/h")),
                    ..Default::default()
                },
                "not an absolute path",
            ),
            (
                AccessFiles {
                    username: file(d, "u", "alice"),
                    ..Default::default()
                },
                "go together",
            ),
            (
                AccessFiles {
                    authorization: file(d, "a", "Bearer s3cret"),
                    username: file(d, "u2", "alice"),
                    password: file(d, "p2", "s3cret"),
                    ..Default::default()
                },
                "give one",
            ),
            (
                AccessFiles {
                    ca_bundle: file(d, "ca", "s3cret, not a certificate"),
                    ..Default::default()
                },
                "no PEM certificate",
            ),
        ];
        for (files, want) in cases {
            let e = files.load().unwrap_err();
            assert!(e.contains(want), "{files:?}: {e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
    }
}
