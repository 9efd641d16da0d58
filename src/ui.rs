//! The web UI, served at `/` by the HTTP API listener of `bicsi serve` and `bicsi controller`:
//! plain HTML, ES modules and CSS compiled into the binary (no build step, no Node.js for
//! `cargo build`). The pages are clients of the `/v1/...` API like the CLI, so they hold no
//! rule of their own; this module only serves the files.
//!
//! The files are not secret, so they are served without the API token (`crate::auth` lets
//! them through): the page must load to show its login prompt. Every answer carries a
//! Content-Security-Policy that allows only this origin, so the page makes no request beyond
//! the bicsi it came from (it works on a closed network, and a stray external reference would
//! fail in the browser tests rather than go unnoticed).

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The files under `/ui/`, by name: (content type, content).
const FILES: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/api.js"),
    ),
    (
        "sha512.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/sha512.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("ui/style.css"),
    ),
];

const INDEX: &str = include_str!("ui/index.html");

/// Only this origin, for scripts, styles, images and requests; no frames.
const CSP: &str = "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'; base-uri 'none'";

/// Whether `path` is one of the UI's files (served without the API token).
pub fn is_ui_path(path: &str) -> bool {
    path == "/"
        || path == "/index.html"
        || path
            .strip_prefix("/ui/")
            .is_some_and(|f| FILES.iter().any(|(n, _, _)| *n == f))
}

/// `/` and `/ui/{file}`, for any router state.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { page("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/index.html",
            get(|| async { page("text/html; charset=utf-8", INDEX) }),
        )
        .route("/ui/{file}", get(file))
}

async fn file(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, kind, body)) => page(kind, body),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({
                "error": format!("the web UI has no file {name:?}; open / for the UI"),
                "code": "NotFound",
            })),
        )
            .into_response(),
    }
}

fn page(kind: &'static str, body: &'static str) -> Response {
    let mut resp = ([(header::CONTENT_TYPE, kind)], body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    // A new binary serves new files: the browser asks again instead of running old ones.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::is_ui_path;

    #[test]
    fn ui_paths() {
        for p in ["/", "/index.html", "/ui/app.js", "/ui/style.css"] {
            assert!(is_ui_path(p), "{p}");
        }
        for p in [
            "/v1/backingimages",
            "/ui/",
            "/ui/nope.js",
            "/ui/../v1/volumes",
            "/healthz",
        ] {
            assert!(!is_ui_path(p), "{p}");
        }
    }
}
