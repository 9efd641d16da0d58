//! The CLI's client of bicsi's HTTP API: the token and CA of this invocation, requests, and the
//! server's errors turned back into the domain's (worded as the server words them).

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The API token of this CLI invocation (`--token` or `BICSI_TOKEN`), sent on every request.
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the token the HTTP commands send; called once by `cli::run`.
pub fn set_token(token: Option<String>) {
    if let Some(t) = token.filter(|t| !t.trim().is_empty()) {
        let _ = TOKEN.set(t.trim().to_string());
    }
}

/// The CA certificates `--ca-cert` adds to the system's (an https API of a private CA).
static CA_CERTS: std::sync::OnceLock<Vec<reqwest::Certificate>> = std::sync::OnceLock::new();

/// Trusts the PEM certificate(s) in `path` for the HTTP API; called once by `cli::run`.
pub fn set_ca_cert(path: &std::path::Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| {
        Error::InvalidArgument(format!(
            "--ca-cert {}: {e}; give the PEM CA certificate of the API's --tls-cert",
            path.display()
        ))
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&bytes)
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "--ca-cert {}: no PEM certificate in it",
                path.display()
            ))
        })?;
    let _ = CA_CERTS.set(certs);
    Ok(())
}

pub(super) fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = TOKEN.get()
        && let Ok(mut v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
    {
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    let mut builder = reqwest::Client::builder().default_headers(headers);
    if let Some(certs) = CA_CERTS.get() {
        builder = builder.tls_certs_merge(certs.iter().cloned());
    }
    builder.build().unwrap_or_default()
}

pub(super) fn url(server: &str, path: &str) -> String {
    format!(
        "{}/{}",
        server.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// Sends a request and turns a non-2xx answer into the server's own error message.
pub(super) async fn send(req: reqwest::RequestBuilder, server: &str) -> Result<reqwest::Response> {
    let resp = req.send().await.map_err(|e| {
        Error::Unavailable(format!(
            "cannot reach bicsi at {server}: {e}; is `bicsi serve` running with this --server address?"
        ))
    })?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or(text);
    Err(match status.as_u16() {
        400 => Error::InvalidArgument(message),
        401 => Error::InvalidArgument(format!("bicsi at {server} refused the request: {message}")),
        404 => Error::NotFound(message),
        409 => Error::FailedPrecondition(message),
        503 => Error::Unavailable(message),
        _ => Error::Internal(format!("HTTP {status}: {message}")),
    })
}

pub(super) async fn json<T: for<'de> Deserialize<'de>>(resp: reqwest::Response) -> Result<T> {
    resp.json()
        .await
        .map_err(|e| Error::Internal(format!("unexpected answer from bicsi: {e}")))
}

/// `GET path` of the API, its JSON answer parsed.
pub(super) async fn get<T: for<'de> Deserialize<'de>>(server: &str, path: &str) -> Result<T> {
    json(send(client().get(url(server, path)), server).await?).await
}

/// `bicsi delete KIND NAME`: like `kubectl delete`, a missing object is an error (NotFound,
/// exit 1) unless `ignore_not_found`, which exits 0 quietly. The server's DELETE is idempotent,
/// so the CLI asks first; `kind` is the singular the messages use (`storageclass`).
pub async fn delete(
    server: &str,
    collection: &str,
    kind: &str,
    name: &str,
    ignore_not_found: bool,
) -> Result<()> {
    let path = format!("v1/{collection}/{name}");
    match send(client().get(url(server, &path)), server).await {
        Ok(_) => {}
        Err(Error::NotFound(_)) if ignore_not_found => return Ok(()),
        Err(Error::NotFound(_)) => {
            return Err(Error::NotFound(format!(
                "{kind} {name:?} not found (--ignore-not-found exits 0 when it is missing)"
            )));
        }
        Err(e) => return Err(e),
    }
    send(client().delete(url(server, &path)), server).await?;
    crate::outln!("{kind}/{name} deleted");
    Ok(())
}
