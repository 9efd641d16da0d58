//! Helpers for tests that use backing images: an HTTP server in the test process (127.0.0.1
//! only) serving images made here, image builders, and waits on image and volume states.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
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

pub struct ImageServer {
    pub base: String,
}

async fn serve_file(State(files): State<Files>, UrlPath(name): UrlPath<String>) -> Response {
    match files.get(&name) {
        Some(bytes) => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            bytes.clone(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
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
        let app = axum::Router::new()
            .route("/img/{name}", axum::routing::get(serve_file))
            .route("/redirect/{name}", axum::routing::get(redirect))
            .with_state(Arc::new(files));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        ImageServer { base }
    }

    pub fn url(&self, name: &str) -> String {
        format!("{}/img/{name}", self.base)
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
