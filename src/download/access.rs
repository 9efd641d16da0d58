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
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let bad = |what: &str| {
                    format!(
                        "headersFile {}: line {}: {what}; write one `Name: value` per line",
                        p.display(),
                        i + 1
                    )
                };
                let (name, value) = line.split_once(':').ok_or_else(|| bad("no ':'"))?;
                let name = HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| bad("not a valid header name"))?;
                let value = secret_value(value.trim()).ok_or_else(|| {
                    bad(&format!("the value of {name} is not a valid header value"))
                })?;
                access.headers.push((name, value));
            }
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
            if user.contains(':') {
                return Err(format!(
                    "usernameFile {}: a basic-auth user name cannot contain ':'",
                    u.display()
                ));
            }
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            let value = secret_value(&format!("Basic {token}")).expect("base64 is a valid value");
            access.headers.push((AUTHORIZATION, value));
        }
        if let Some(p) = &self.ca_bundle {
            let pem = std::fs::read(p).map_err(|e| cannot_read("caBundleFile", p, e))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                format!(
                    "caBundleFile {}: not a PEM certificate bundle ({e})",
                    p.display()
                )
            })?;
            if certs.is_empty() {
                return Err(format!(
                    "caBundleFile {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
                    p.display()
                ));
            }
            access.ca_bundle = Some(pem);
        }
        Ok(access)
    }
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
