//! Helpers for tests that use backing images: an HTTP server in the test process (127.0.0.1
//! only) serving images made here, image builders, and waits on image and volume states.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::Digest;
use tonic::Code;

use super::harness::*;
use bicsi::csi::pb;

/// Files served by the test's HTTP server, by name.
type Files = Arc<HashMap<String, Vec<u8>>>;

/// Bytes per second the server sends (0: as fast as it goes).
type Rate = Arc<AtomicU64>;

#[derive(Clone)]
struct Shared {
    files: Files,
    rate: Rate,
}

pub struct ImageServer {
    pub base: String,
    rate: Rate,
    /// Requests received, of any path.
    requests: Arc<AtomicU64>,
}

/// The body of `bytes`, in 64 KiB pieces at the server's rate (read again for every piece, so
/// a test can speed up a transfer that is under way).
fn paced(bytes: Vec<u8>, rate: Rate) -> axum::body::Body {
    let bytes = bytes::Bytes::from(bytes);
    let body = futures::stream::unfold(0usize, move |at| {
        let (bytes, rate) = (bytes.clone(), rate.clone());
        async move {
            if at >= bytes.len() {
                return None;
            }
            let end = (at + 64 * 1024).min(bytes.len());
            let r = rate.load(Ordering::Relaxed);
            if let Some(nanos) = ((end - at) as u64 * 1_000_000_000).checked_div(r) {
                tokio::time::sleep(Duration::from_nanos(nanos)).await;
            }
            Some((Ok::<_, std::io::Error>(bytes.slice(at..end)), end))
        }
    });
    axum::body::Body::from_stream(body)
}

/// `/img/NAME`: the whole file (Range ignored), with its length.
async fn serve_file(State(s): State<Shared>, UrlPath(name): UrlPath<String>) -> Response {
    match s.files.get(&name) {
        Some(bytes) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (header::CONTENT_LENGTH, bytes.len().to_string()),
            ],
            paced(bytes.clone(), s.rate.clone()),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `/nolength/NAME`: the whole file without Content-Length (chunked), Range ignored.
async fn serve_without_length(State(s): State<Shared>, UrlPath(name): UrlPath<String>) -> Response {
    match s.files.get(&name) {
        Some(bytes) => paced(bytes.clone(), s.rate.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `/liar/HEAD/BODY`: a Range request for the start gets the start of file HEAD (206, with
/// HEAD's length as the total); a plain GET gets file BODY. A file that changed between the
/// two requests looks like this.
async fn serve_liar(
    State(s): State<Shared>,
    UrlPath((head, body)): UrlPath<(String, String)>,
    headers: axum::http::HeaderMap,
) -> Response {
    let (Some(h), Some(b)) = (s.files.get(&head), s.files.get(&body)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let range_end = headers.get(header::RANGE).and_then(|v| {
        v.to_str()
            .ok()?
            .strip_prefix("bytes=0-")?
            .parse::<usize>()
            .ok()
    });
    match range_end {
        Some(end) => {
            let end = end.min(h.len() - 1);
            (
                StatusCode::PARTIAL_CONTENT,
                [(header::CONTENT_RANGE, format!("bytes 0-{end}/{}", h.len()))],
                h[..=end].to_vec(),
            )
                .into_response()
        }
        None => (
            [(header::CONTENT_LENGTH, b.len().to_string())],
            paced(b.clone(), s.rate.clone()),
        )
            .into_response(),
    }
}

async fn redirect(UrlPath(name): UrlPath<String>) -> Response {
    (
        StatusCode::FOUND,
        [(header::LOCATION, format!("/img/{name}"))],
    )
        .into_response()
}

impl ImageServer {
    pub async fn start(files: HashMap<String, Vec<u8>>) -> ImageServer {
        let shared = Shared {
            files: Arc::new(files),
            rate: Arc::new(AtomicU64::new(0)),
        };
        let rate = shared.rate.clone();
        let requests = Arc::new(AtomicU64::new(0));
        let counted = requests.clone();
        let app = axum::Router::new()
            .route("/img/{name}", axum::routing::get(serve_file))
            .route("/nolength/{name}", axum::routing::get(serve_without_length))
            .route("/liar/{head}/{body}", axum::routing::get(serve_liar))
            .route("/redirect/{name}", axum::routing::get(redirect))
            .with_state(shared)
            .layer(axum::middleware::map_request(
                move |req: axum::extract::Request| {
                    counted.fetch_add(1, Ordering::Relaxed);
                    async move { req }
                },
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        ImageServer {
            base,
            rate,
            requests,
        }
    }

    /// How many requests the server has received.
    pub fn hits(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn url(&self, name: &str) -> String {
        format!("{}/img/{name}", self.base)
    }

    /// Sends at most `bytes_per_sec` from now on (0: as fast as it goes).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }
}

pub fn sha512(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha512::digest(bytes))
}

/// A raw ext4 image of `mib` MiB holding `hello.txt`, made without root (`mkfs.ext4 -d`).
pub fn ext4_image(dir: &Path, mib: u64) -> Vec<u8> {
    let src = dir.join("image-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), b"hello from the backing image\n").unwrap();
    let img = dir.join("image.raw");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img)
        .arg(format!("{mib}M"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&img).unwrap()
}

/// The same content as a qcow2 file.
pub fn to_qcow2(dir: &Path, raw: &[u8]) -> Vec<u8> {
    let r = dir.join("conv.raw");
    let q = dir.join("conv.qcow2");
    std::fs::write(&r, raw).unwrap();
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&r)
        .arg(&q)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&q).unwrap()
}

pub async fn get_image(b: &Bicsi, name: &str) -> Option<serde_json::Value> {
    let resp = reqwest::get(format!("{}/v1/backingimages/{name}", b.http))
        .await
        .unwrap();
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return None;
    }
    Some(resp.json().await.unwrap())
}

/// Waits until every disk file of the image is ready or failed; returns the object.
pub async fn wait_final(b: &Bicsi, name: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = get_image(b, name).await {
            let files = v["status"]["diskFileStatusMap"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            if !files.is_empty()
                && files
                    .values()
                    .all(|f| f["state"] == "ready" || f["state"] == "failed")
            {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "image {name} not final:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn seed_sc_params(url: &str, name: &str) -> Vec<(String, String)> {
    [
        ("numberOfReplicas", "3"),
        ("staleReplicaTimeout", "2880"),
        ("backingImage", name),
        ("backingImageDataSourceType", "download"),
        (
            "backingImageDataSourceParameters",
            &format!("{{\"url\": \"{url}\"}}"),
        ),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// CreateVolume until it stops answering Unavailable (the image is being prepared).
pub async fn create_retrying(
    c: &mut bicsi::client::CsiClient,
    req: pb::CreateVolumeRequest,
) -> Result<pb::Volume, tonic::Status> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c.controller.create_volume(req.clone()).await {
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                assert!(s.message().contains("being prepared"), "{}", s.message());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other.map(|r| r.into_inner().volume.unwrap()),
        }
    }
}
