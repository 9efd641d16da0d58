//! Bearer-token authentication of the HTTP API (`--api-token-file`), for when it is reachable
//! beyond loopback (the `bicsi-api` Service in a cluster). Every route but `/healthz` (the
//! kubelet's probe carries no token) and the web UI's files (`crate::ui`: the page that asks for
//! the token) requires `Authorization: Bearer <token>`; anything else is answered 401 with a
//! message saying what to send. The token itself is never logged.

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{Error, Result};

/// Reads the token from `path`: its content without surrounding whitespace, never empty.
pub fn load(path: Option<&Path>) -> Result<Option<String>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::InvalidArgument(format!(
            "--api-token-file {}: {e}; give a readable file holding the API token",
            path.display()
        ))
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "--api-token-file {} is empty; put the API token in it",
            path.display()
        )));
    }
    Ok(Some(token.to_string()))
}

/// `api` with the token required on every route but `/healthz`; unchanged without a token.
pub fn protect(api: Router, token: Option<String>) -> Router {
    match token {
        Some(token) => api.layer(axum::middleware::from_fn_with_state(
            Arc::new(token),
            require,
        )),
        None => api,
    }
}

/// Compares in constant time: both sides are hashed to SHA-256 first (32 bytes whatever their
/// lengths, so neither a prefix nor the token's length shows in the timing), and the digests
/// are compared without stopping at the first differing byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

async fn require(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    // The probe, and the web UI's files (not secret: the page must load to ask for the token).
    if req.uri().path() == "/healthz" || crate::ui::is_ui_path(req.uri().path()) {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let message = match given {
        Some(t) if same(t.trim().as_bytes(), token.as_bytes()) => return next.run(req).await,
        Some(_) => {
            "the API token is wrong; use the token of Secret bicsi-api-token (--token or BICSI_TOKEN)"
        }
        None => {
            "this bicsi API requires a token: send Authorization: Bearer TOKEN (bicsi --token or BICSI_TOKEN)"
        }
    };
    let mut resp = (
        StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({ "error": message, "code": "Unauthenticated" })),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    fn app(token: Option<&str>) -> Router {
        protect(
            Router::new()
                .route("/healthz", get(|| async { "ok" }))
                .route("/v1/backingimages", get(|| async { "[]" })),
            token.map(str::to_string),
        )
    }

    async fn status(app: Router, path: &str, auth: Option<&str>) -> (u16, String) {
        let mut req = Request::builder().uri(path);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let resp = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        let code = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn token_required_everywhere_but_healthz() {
        let cases = [
            ("/healthz", None, 200, "ok"),
            ("/v1/backingimages", None, 401, "requires a token"),
            (
                "/v1/backingimages",
                Some("Bearer wrong"),
                401,
                "token is wrong",
            ),
            (
                "/v1/backingimages",
                Some("Basic s3cret"),
                401,
                "requires a token",
            ),
            ("/v1/backingimages", Some("Bearer s3cret"), 200, "[]"),
        ];
        for (path, auth, want, text) in cases {
            let (code, body) = status(app(Some("s3cret")), path, auth).await;
            assert_eq!(code, want, "{path} {auth:?}: {body}");
            assert!(body.contains(text), "{path} {auth:?}: {body}");
        }
    }

    #[test]
    fn tokens_compare_equal_only_when_every_byte_is() {
        let token = b"0123456789abcdef0123456789abcdef";
        assert!(same(token, token));
        let mut first = *token;
        first[0] ^= 1;
        let mut last = *token;
        last[31] ^= 1;
        for (other, why) in [
            (&first[..], "first byte differs"),
            (&last[..], "last byte differs"),
            (&token[..31], "a prefix"),
            (b"0123456789abcdef0123456789abcdef0", "longer"),
            (b"", "empty"),
        ] {
            assert!(!same(other, token), "{why}");
            assert!(!same(token, other), "{why}");
        }
        assert!(same(b"", b""));
    }

    #[tokio::test]
    async fn no_token_configured_leaves_the_api_open() {
        assert_eq!(status(app(None), "/v1/backingimages", None).await.0, 200);
    }

    #[test]
    fn token_file_is_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "abc\n").unwrap();
        assert_eq!(load(Some(&f)).unwrap().as_deref(), Some("abc"));
        std::fs::write(&f, " \n").unwrap();
        assert!(load(Some(&f)).unwrap_err().to_string().contains("is empty"));
        let missing = dir.path().join("nope");
        assert!(
            load(Some(&missing))
                .unwrap_err()
                .to_string()
                .contains("--api-token-file")
        );
        assert_eq!(load(None).unwrap(), None);
    }
}
