//! Backing image files moved between this machine and bicsi: `bicsi image upload` and
//! `bicsi image download`, the HTTP API behind them (`PUT`/`GET /v1/backingimages/{name}/file`),
//! byte ranges, checksums, and uploads that break off.

use std::path::Path;
use std::time::{Duration, Instant};

use super::harness::*;
use super::images::*;

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The one disk file status of an image.
fn only_file(v: &serde_json::Value) -> serde_json::Value {
    let files = v["status"]["diskFileStatusMap"].as_object().unwrap();
    assert_eq!(files.len(), 1, "{v}");
    files.values().next().unwrap().clone()
}

async fn create_upload_image(b: &Bicsi, name: &str) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/backingimages", b.http))
        .json(&serde_json::json!({
            "apiVersion": "longhorn.io/v1beta2",
            "kind": "BackingImage",
            "metadata": { "name": name },
            "spec": { "sourceType": "upload" },
        }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
}

/// Waits until the image's file is in `state`; returns the image.
async fn wait_state(b: &Bicsi, name: &str, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = get_image(b, name).await {
            let files = v["status"]["diskFileStatusMap"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            if files.values().any(|f| f["state"] == state) {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "image {name} never {state}: {:?}\n{}",
            get_image(b, name).await,
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn upload_then_download_is_bit_identical_with_ranges() {
    let b = Bicsi::start(1).await;
    // 8 MiB: well past axum's default 2 MB body limit, which must not apply to uploads.
    let raw = ext4_image(b.dir.path(), 8);
    let raw_sum = sha512(&raw);
    let raw_path = b.path("upload.raw");
    std::fs::write(&raw_path, &raw).unwrap();

    // The image does not exist: the CLI creates it (sourceType upload), then uploads.
    let (ok, out, err) = b.cli(&[
        "image",
        "upload",
        "bi-up",
        raw_path.to_str().unwrap(),
        "--checksum",
        &raw_sum.to_uppercase(),
    ]);
    assert!(ok, "stdout: {out}\nstderr: {err}\n{}", b.log());
    assert!(out.contains(&raw_sum), "{out}");
    let v = get_image(&b, "bi-up").await.unwrap();
    assert_eq!(v["spec"]["sourceType"], "upload");
    assert_eq!(v["status"]["checksum"], raw_sum.as_str());
    assert_eq!(v["status"]["size"], raw.len() as u64);
    assert_eq!(v["status"]["format"], "raw");
    let f = only_file(&v);
    assert_eq!(f["state"], "ready", "{v}");
    let dir = format!("bi-up-{}", v["status"]["uuid"].as_str().unwrap());
    let stored = b.disks[0].join("backing-images").join(&dir).join("backing");
    assert_eq!(std::fs::read(&stored).unwrap(), raw);
    assert!(entries(&b.disks[0].join("tmp")).is_empty());

    // Download: bit-identical, verified, no .part left.
    let out_path = b.path("downloaded.raw");
    let (ok, out, err) = b.cli(&[
        "image",
        "download",
        "bi-up",
        "-o",
        out_path.to_str().unwrap(),
    ]);
    assert!(ok, "stdout: {out}\nstderr: {err}\n{}", b.log());
    let got = std::fs::read(&out_path).unwrap();
    assert!(got == raw, "downloaded file differs");
    assert_eq!(sha512(&got), raw_sum);
    assert!(!b.path("downloaded.raw.part").exists());

    // The HTTP API: whole file, a range, an open range, an unsatisfiable range.
    let http = reqwest::Client::new();
    let file_url = format!("{}/v1/backingimages/bi-up/file", b.http);
    let whole = http.get(&file_url).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(whole.headers()["x-bicsi-checksum"], raw_sum.as_str());
    assert_eq!(whole.content_length(), Some(raw.len() as u64));
    let r = http
        .get(&file_url)
        .header("Range", "bytes=1024-5119")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 1024-5119/{}", raw.len()).as_str()
    );
    assert_eq!(&r.bytes().await.unwrap()[..], &raw[1024..5120]);
    let from = raw.len() - 3000;
    let r = http
        .get(&file_url)
        .header("Range", format!("bytes={from}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &raw[from..]);
    let r = http
        .get(&file_url)
        .header("Range", format!("bytes={}-", raw.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{}", raw.len()).as_str()
    );

    // A qcow2 uploaded without a checksum: its sha512 becomes the image's.
    let qcow = to_qcow2(b.dir.path(), &raw);
    let qcow_sum = sha512(&qcow);
    let qcow_path = b.path("upload.qcow2");
    std::fs::write(&qcow_path, &qcow).unwrap();
    let (ok, out, err) = b.cli(&["image", "upload", "bi-qcow", qcow_path.to_str().unwrap()]);
    assert!(ok, "stdout: {out}\nstderr: {err}\n{}", b.log());
    let v = get_image(&b, "bi-qcow").await.unwrap();
    assert_eq!(v["status"]["checksum"], qcow_sum.as_str());
    assert_eq!(v["status"]["format"], "qcow2");
    assert_eq!(v["status"]["virtualSize"], raw.len() as u64);
    assert_eq!(only_file(&v)["state"], "ready");
    let out_path = b.path("downloaded.qcow2");
    let (ok, _, err) = b.cli(&[
        "image",
        "download",
        "bi-qcow",
        "-o",
        out_path.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(sha512(&std::fs::read(&out_path).unwrap()), qcow_sum);

    // A ready image takes no second upload.
    let (ok, _, err) = b.cli(&["image", "upload", "bi-qcow", qcow_path.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("already has a ready file"), "{err}");
}

#[tokio::test]
async fn download_without_a_ready_file_is_409_and_upload_needs_an_upload_image() {
    let b = Bicsi::start(1).await;
    create_upload_image(&b, "bi-empty").await;
    let r = reqwest::get(format!("{}/v1/backingimages/bi-empty/file", b.http))
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body: serde_json::Value = r.json().await.unwrap();
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains("bi-empty") && msg.contains("has no ready file to download yet"),
        "{msg}"
    );
    assert!(msg.contains("waiting for an upload"), "{msg}");
    let (ok, _, err) = b.cli(&["image", "download", "bi-empty", "-o", "/dev/null"]);
    assert!(!ok);
    assert!(err.contains("has no ready file to download yet"), "{err}");

    let r = reqwest::get(format!("{}/v1/backingimages/nope/file", b.http))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = reqwest::Client::new()
        .put(format!("{}/v1/backingimages/nope/file", b.http))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // A download image takes no upload.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/backingimages", b.http))
        .json(&serde_json::json!({
            "apiVersion": "longhorn.io/v1beta2",
            "kind": "BackingImage",
            "metadata": { "name": "bi-dl" },
            "spec": { "sourceType": "download", "sourceParameters": { "url": "http://127.0.0.1:9/x" } },
        }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let r = reqwest::Client::new()
        .put(format!("{}/v1/backingimages/bi-dl/file", b.http))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let text = r.text().await.unwrap();
    assert!(text.contains("sourceType upload"), "{text}");
}

#[tokio::test]
async fn upload_with_a_wrong_checksum_fails_and_leaves_no_file() {
    let b = Bicsi::start(1).await;
    let raw = ext4_image(b.dir.path(), 4);
    let raw_sum = sha512(&raw);
    let wrong = "0".repeat(128);
    let path = b.path("upload.raw");
    std::fs::write(&path, &raw).unwrap();
    let (ok, out, err) = b.cli(&[
        "image",
        "upload",
        "bi-sum",
        path.to_str().unwrap(),
        "--checksum",
        &wrong,
    ]);
    assert!(!ok, "{out}");
    assert!(
        err.contains(&wrong) && err.contains(&raw_sum),
        "both checksums expected in: {err}"
    );
    let v = get_image(&b, "bi-sum").await.unwrap();
    let f = only_file(&v);
    assert_eq!(f["state"], "failed", "{v}");
    let msg = f["message"].as_str().unwrap();
    assert!(msg.contains(&wrong) && msg.contains(&raw_sum), "{msg}");
    assert!(entries(&b.disks[0].join("tmp")).is_empty());
    assert!(entries(&b.disks[0].join("backing-images")).is_empty());
    // A bad checksum argument is refused before anything is sent.
    let (ok, _, err) = b.cli(&[
        "image",
        "upload",
        "bi-sum",
        path.to_str().unwrap(),
        "--checksum",
        "xyz",
    ]);
    assert!(!ok);
    assert!(err.contains("128 hex digits"), "{err}");
    // Uploading again with the right one works: failed → pending → … → ready.
    let (ok, out, err) = b.cli(&[
        "image",
        "upload",
        "bi-sum",
        path.to_str().unwrap(),
        "--checksum",
        &raw_sum,
    ]);
    assert!(ok, "stdout: {out}\nstderr: {err}");
    let v = get_image(&b, "bi-sum").await.unwrap();
    assert_eq!(only_file(&v)["state"], "ready", "{v}");
    assert_eq!(v["status"]["checksum"], raw_sum.as_str());
}

#[tokio::test]
async fn interrupted_upload_fails_then_a_full_upload_succeeds() {
    let b = Bicsi::start(1).await;
    let raw = ext4_image(b.dir.path(), 4);
    let raw_sum = sha512(&raw);
    create_upload_image(&b, "bi-cut").await;

    // A body that sends 1 MiB, waits to be told, then breaks.
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let first = bytes::Bytes::copy_from_slice(&raw[..1 << 20]);
    let body = futures::stream::unfold((0, Some(go_rx)), move |(step, rx)| {
        let first = first.clone();
        async move {
            match step {
                0 => Some((Ok::<_, std::io::Error>(first), (1, rx))),
                1 => {
                    let _ = rx.unwrap().await;
                    Some((Err(std::io::Error::other("client gave up")), (2, None)))
                }
                _ => None,
            }
        }
    });
    let url = format!("{}/v1/backingimages/bi-cut/file", b.http);
    let put = tokio::spawn(
        reqwest::Client::new()
            .put(&url)
            .body(reqwest::Body::wrap_stream(body))
            .send(),
    );
    wait_state(&b, "bi-cut", "in-progress").await;

    // A second upload of the same image while the first runs: 409 Aborted.
    let r = reqwest::Client::new()
        .put(&url)
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "Aborted", "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("being uploaded"),
        "{body}"
    );

    go_tx.send(()).unwrap();
    assert!(put.await.unwrap().is_err(), "the broken upload must fail");
    let v = wait_state(&b, "bi-cut", "failed").await;
    let msg = only_file(&v)["message"].as_str().unwrap().to_string();
    assert!(msg.contains("interrupted"), "{msg}");
    assert!(entries(&b.disks[0].join("tmp")).is_empty());
    assert!(entries(&b.disks[0].join("backing-images")).is_empty());

    // The same image, uploaded whole this time.
    let path = b.path("upload.raw");
    std::fs::write(&path, &raw).unwrap();
    let (ok, out, err) = b.cli(&["image", "upload", "bi-cut", path.to_str().unwrap()]);
    assert!(ok, "stdout: {out}\nstderr: {err}\n{}", b.log());
    let v = get_image(&b, "bi-cut").await.unwrap();
    assert_eq!(only_file(&v)["state"], "ready", "{v}");
    assert_eq!(v["status"]["checksum"], raw_sum.as_str());
}
