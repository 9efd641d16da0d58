//! `/metrics` of a real `bicsi serve`: it needs the API token, `promtool check metrics` accepts
//! a real scrape, and a download, a failing checksum, a sync between disks and an attach each
//! move their metrics by the right amounts (scraped before and after). And `--log-format json`:
//! every log line of a real process is a JSON object, and a failed call's line carries its code
//! and the span's method and volume.

#[path = "kit/mod.rs"]
mod kit;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bicsi::client::CsiClient;
use bicsi::csi::pb;
use kit::{Proc, csi_endpoint, free_port, have_tool, may_run, serve_args, temp_dir};

const TOKEN: &str = "metrics-token";
const MIB: usize = 1 << 20;

/// A `bicsi serve` with `disks` disks and an API token; killed before its directory goes.
struct Served {
    proc: Proc,
    http: String,
    endpoint: String,
    dir: tempfile::TempDir,
}

impl Served {
    async fn start(disks: usize, extra: &[&str]) -> Served {
        let dir = temp_dir("bicsi-metrics-");
        let token = dir.path().join("token");
        std::fs::write(&token, TOKEN).unwrap();
        let http = format!("127.0.0.1:{}", free_port());
        let mut args = serve_args(dir.path(), "metrics-node", &http);
        for i in 0..disks {
            args.extend([
                "--disk".into(),
                dir.path().join(format!("disk{i}")).display().to_string(),
            ]);
        }
        args.extend(["--api-token-file".into(), token.display().to_string()]);
        args.extend(["--lifecycle-tick-ms".into(), "200".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc = Proc::spawn(args, dir.path().join("bicsi.log"));
        let http = format!("http://{http}");
        let url = format!("{http}/healthz");
        proc.wait_ready("bicsi serve", async || {
            reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        Served {
            proc,
            endpoint: csi_endpoint(dir.path()),
            http,
            dir,
        }
    }

    async fn scrape(&self) -> String {
        let resp = reqwest::Client::new()
            .get(format!("{}/metrics", self.http))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
        resp.text().await.unwrap()
    }

    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        cli(&self.http, &self.endpoint, args)
    }

    async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", self.http))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(
            status.is_success(),
            "{path}: {status} {text}\n{}",
            self.proc.log()
        );
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    /// Waits until some file of `image` is in `state`; the image's status then.
    async fn wait_file(&self, image: &str, state: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let bi = self
                .api(
                    reqwest::Method::GET,
                    &format!("/v1/backingimages/{image}"),
                    None,
                )
                .await;
            let files = bi["status"]["diskFileStatusMap"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            if files.values().any(|f| f["state"] == state) {
                return bi;
            }
            assert!(
                Instant::now() < deadline,
                "no file of {image} became {state}: {bi}\n{}",
                self.proc.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The CLI against the server at `http` and the CSI socket `endpoint`, with the token in
/// `BICSI_TOKEN`.
fn cli(http: &str, endpoint: &str, args: &[&str]) -> (bool, String, String) {
    let out = kit::bicsi()
        .args(args)
        .env("BICSI_SERVER", http)
        .env("BICSI_CSI_ENDPOINT", endpoint)
        .env("BICSI_TOKEN", TOKEN)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `/metrics` at `http` with the token.
async fn scrape(http: &str) -> String {
    let resp = reqwest::Client::new()
        .get(format!("{http}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{http}/metrics");
    resp.text().await.unwrap()
}

/// The samples of a scrape: `name{labels}` (as written) → value.
fn samples(scrape: &str) -> HashMap<String, f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// How much `series` grew from `before` to `after` (absent counts as 0).
fn grew(before: &str, after: &str, series: &str) -> f64 {
    let v = |s: &str| samples(s).get(series).copied().unwrap_or(0.0);
    v(after) - v(before)
}

/// The sum of every sample of `name` whose labels contain all of `labels` (`k="v"` each).
fn sum(scrape: &str, name: &str, labels: &[&str]) -> f64 {
    samples(scrape)
        .iter()
        .filter(|(s, _)| {
            s.split_once('{').map_or(s.as_str(), |(n, _)| n) == name
                && labels.iter().all(|l| s.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}

/// `promtool check metrics` (Debian's `prometheus` package) on a scrape: lint problems fail.
fn promtool_accepts(scrape: &str) {
    if !may_run(
        have_tool("promtool"),
        "promtool is not installed (Debian package prometheus; scripts/test installs it)",
    ) {
        return;
    }
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{scrape}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An HTTP server on 127.0.0.1 serving `files` at `/NAME`; its base URL.
async fn image_server(files: HashMap<String, Vec<u8>>) -> String {
    use axum::extract::{Path as UrlPath, State};
    use axum::response::IntoResponse;
    let files = std::sync::Arc::new(files);
    let app = axum::Router::new()
        .route(
            "/{name}",
            axum::routing::get(
                |State(f): State<std::sync::Arc<HashMap<String, Vec<u8>>>>,
                 UrlPath(name): UrlPath<String>| async move {
                    match f.get(&name) {
                        Some(b) => b.clone().into_response(),
                        None => axum::http::StatusCode::NOT_FOUND.into_response(),
                    }
                },
            ),
        )
        .with_state(files);
    let addr = format!("127.0.0.1:{}", free_port());
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn sha512(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha512::digest(bytes))
}

fn download_image(name: &str, url: &str, checksum: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "longhorn.io/v1beta2", "kind": "BackingImage",
        "metadata": {"name": name},
        "spec": {"sourceType": "download", "sourceParameters": {"url": url}, "checksum": checksum},
    })
}

#[tokio::test]
async fn metrics_need_the_token_and_pass_promtool() {
    let s = Served::start(1, &[]).await;
    let url = format!("{}/metrics", s.http);
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 401);
    let wrong = reqwest::Client::new()
        .get(&url)
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let scrape = s.scrape().await;
    for family in [
        "bicsi_build_info",
        "process_resident_memory_bytes",
        "process_open_fds",
        "bicsi_disk_capacity_bytes",
        "bicsi_disk_free_bytes",
        "bicsi_disk_backing_images_bytes",
        "bicsi_disk_replicas_bytes",
        "bicsi_node_up",
        // The CLI's and the probe's calls: the health check above went over HTTP, so call once.
    ] {
        assert!(
            scrape.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{scrape}"
        );
    }
    assert_eq!(
        sum(&scrape, "bicsi_node_up", &[r#"node="metrics-node""#]),
        1.0
    );
    promtool_accepts(&scrape);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_a_failing_checksum_and_a_sync_move_their_metrics() {
    let good = kit::noise(4 * MIB, 1);
    let bad = kit::noise(2 * MIB, 2);
    let base = image_server(
        [
            ("good.raw".to_string(), good.clone()),
            ("bad.raw".to_string(), bad.clone()),
        ]
        .into(),
    )
    .await;
    let s = Served::start(2, &[]).await;
    let post = reqwest::Method::POST;

    // A download: one transfer ok, its bytes, one ready file.
    let s0 = s.scrape().await;
    s.api(
        post.clone(),
        "/v1/backingimages",
        Some(download_image(
            "bi-good",
            &format!("{base}/good.raw"),
            &sha512(&good),
        )),
    )
    .await;
    s.wait_file("bi-good", "ready").await;
    let s1 = s.scrape().await;
    let len = good.len() as f64;
    assert_eq!(
        grew(
            &s0,
            &s1,
            r#"bicsi_backing_image_transfers_total{kind="download",result="ok"}"#
        ),
        1.0
    );
    assert_eq!(
        grew(
            &s0,
            &s1,
            r#"bicsi_backing_image_transfer_bytes_total{kind="download"}"#
        ),
        len
    );
    assert_eq!(
        grew(
            &s0,
            &s1,
            r#"bicsi_backing_image_prepared_bytes_total{kind="download"}"#
        ),
        len
    );
    assert_eq!(
        grew(
            &s0,
            &s1,
            r#"bicsi_backing_image_transfer_duration_seconds_count{kind="download",result="ok"}"#
        ),
        1.0
    );
    assert_eq!(
        sum(&s1, "bicsi_backing_image_files", &[r#"state="ready""#]),
        1.0
    );
    assert_eq!(
        sum(
            &s1,
            "bicsi_backing_image_size_bytes",
            &[r#"image="bi-good""#]
        ),
        len
    );
    assert!(
        sum(&s1, "bicsi_disk_backing_images_bytes", &[]) >= len,
        "the ready file's bytes are on a disk:\n{s1}"
    );

    // A download whose bytes do not match the checksum: one checksum failure, one failed
    // transfer, one failed file.
    let wrong = sha512(b"something else");
    s.api(
        post.clone(),
        "/v1/backingimages",
        Some(download_image("bi-bad", &format!("{base}/bad.raw"), &wrong)),
    )
    .await;
    s.wait_file("bi-bad", "failed").await;
    let s2 = s.scrape().await;
    assert_eq!(
        grew(
            &s1,
            &s2,
            r#"bicsi_backing_image_checksum_failures_total{check="download"}"#
        ),
        1.0
    );
    assert_eq!(
        grew(
            &s1,
            &s2,
            r#"bicsi_backing_image_transfers_total{kind="download",result="failed"}"#
        ),
        1.0
    );
    assert_eq!(
        grew(
            &s1,
            &s2,
            r#"bicsi_backing_image_transfers_total{kind="download",result="ok"}"#
        ),
        0.0
    );
    assert_eq!(
        sum(&s2, "bicsi_backing_image_files", &[r#"state="failed""#]),
        1.0
    );

    // A two-replica volume of the image: publishing it brings the file to the other disk (a
    // sync on the same node).
    let (ok, out, err) = s.cli(&[
        "volume",
        "create",
        "vol-sync",
        "--size",
        "16Mi",
        "-p",
        "numberOfReplicas=2",
        "-p",
        "backingImage=bi-good",
    ]);
    assert!(ok, "{out}{err}\n{}", s.proc.log());
    let mut c = CsiClient::connect(&s.endpoint).await.unwrap();
    let publish = pb::ControllerPublishVolumeRequest {
        volume_id: "vol-sync".into(),
        node_id: "metrics-node".into(),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Block(Default::default())),
            access_mode: Some(pb::volume_capability::AccessMode {
                mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut unavailable = 0.0;
    loop {
        match c
            .controller
            .controller_publish_volume(publish.clone())
            .await
        {
            Ok(_) => break,
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                unavailable += 1.0;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("publish: {e}\n{}", s.proc.log()),
        }
    }
    let s3 = s.scrape().await;
    assert_eq!(
        grew(
            &s2,
            &s3,
            r#"bicsi_backing_image_transfers_total{kind="sync_same_node",result="ok"}"#
        ),
        1.0
    );
    assert_eq!(
        grew(
            &s2,
            &s3,
            r#"bicsi_backing_image_prepared_bytes_total{kind="sync_same_node"}"#
        ),
        len
    );
    assert_eq!(
        sum(&s3, "bicsi_backing_image_files", &[r#"state="ready""#]),
        2.0
    );
    // The CSI calls, by method and code, as the layer saw them.
    assert_eq!(
        grew(
            &s2,
            &s3,
            r#"bicsi_csi_requests_total{code="OK",method="ControllerPublishVolume"}"#
        ),
        1.0
    );
    assert_eq!(
        grew(
            &s2,
            &s3,
            r#"bicsi_csi_requests_total{code="UNAVAILABLE",method="ControllerPublishVolume"}"#
        ),
        unavailable
    );
    assert_eq!(
        sum(
            &s3,
            "bicsi_volume_attached",
            &[r#"volume="vol-sync""#, r#"node="metrics-node""#]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &s3,
            "bicsi_volume_replicas",
            &[r#"volume="vol-sync""#, r#"mode="rw""#]
        ),
        2.0
    );
    assert_eq!(
        sum(
            &s3,
            "bicsi_volume_health",
            &[r#"volume="vol-sync""#, r#"health="healthy""#]
        ),
        1.0
    );
    promtool_accepts(&s3);
}

#[tokio::test]
async fn an_attach_and_a_detach_move_their_metrics() {
    if !kit::root_or_skip("an_attach_and_a_detach_move_their_metrics") {
        return;
    }
    let s = Served::start(1, &[]).await;
    let (ok, out, err) = s.cli(&[
        "volume",
        "create",
        "vol-io",
        "--size",
        "16Mi",
        "-p",
        "numberOfReplicas=1",
    ]);
    assert!(ok, "{out}{err}");
    let s0 = s.scrape().await;
    let dev = s.dir.path().join("vol-io.dev");
    let dev_s = dev.display().to_string();
    let (ok, out, err) = s.cli(&["volume", "attach", "vol-io", "--block", &dev_s]);
    assert!(ok, "{out}{err}\n{}", s.proc.log());
    // Bytes written through the volume's device show in its I/O counters.
    write_direct(&dev, 4 * MIB);
    let s1 = s.scrape().await;
    assert_eq!(
        grew(
            &s0,
            &s1,
            r#"bicsi_volume_attach_duration_seconds_count{operation="attach"}"#
        ),
        1.0
    );
    assert_eq!(
        grew(
            &s0,
            &s1,
            r#"bicsi_csi_requests_total{code="OK",method="NodeStageVolume"}"#
        ),
        1.0
    );
    assert_eq!(
        sum(
            &s1,
            "bicsi_volume_attached",
            &[r#"volume="vol-io""#, r#"node="metrics-node""#]
        ),
        1.0
    );
    let written = sum(
        &s1,
        "bicsi_volume_written_bytes_total",
        &[r#"volume="vol-io""#],
    );
    // Counted from this attach: the loop device may have served other volumes before.
    assert!(
        (4 * MIB) as f64 <= written && written <= (5 * MIB) as f64,
        "written {written}:\n{s1}"
    );
    assert!(sum(&s1, "bicsi_disk_replicas_bytes", &[]) > 0.0, "{s1}");
    promtool_accepts(&s1);
    let (ok, out, err) = s.cli(&["volume", "detach", "vol-io"]);
    assert!(ok, "{out}{err}");
    let s2 = s.scrape().await;
    assert_eq!(
        grew(
            &s1,
            &s2,
            r#"bicsi_volume_attach_duration_seconds_count{operation="detach"}"#
        ),
        1.0
    );
    assert_eq!(
        sum(&s2, "bicsi_volume_attached", &[r#"volume="vol-io""#]),
        0.0
    );
    // Detached: no I/O series for it any more.
    assert!(
        !s2.contains(r#"bicsi_volume_written_bytes_total{node="metrics-node",volume="vol-io"}"#)
    );
    let (ok, out, err) = s.cli(&["volume", "delete", "vol-io"]);
    assert!(ok, "{out}{err}");
}

/// Writes `len` bytes of zeros at the start of the block device `dev` with O_DIRECT, synced.
fn write_direct(dev: &Path, len: usize) {
    let out = std::process::Command::new("dd")
        .args([
            "if=/dev/zero".to_string(),
            format!("of={}", dev.display()),
            "bs=1M".into(),
            format!("count={}", len / MIB),
            "oflag=direct".into(),
            "conv=fsync".into(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn json_logs_parse_and_a_failed_call_carries_its_code_and_span() {
    let s = Served::start(1, &["--log-format", "json"]).await;
    let (ok, _, err) = s.cli(&["volume", "expand", "no-such-volume", "--size", "20Mi"]);
    assert!(!ok, "expanding a volume that does not exist fails: {err}");
    // The line is written as the call ends; give the process a moment to flush it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = s.proc.log();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        assert!(!lines.is_empty());
        for l in &lines {
            assert!(
                l["timestamp"].is_string() && l["level"].is_string() && l["message"].is_string(),
                "{l}"
            );
        }
        let failed = lines.iter().find(|l| {
            l["message"] == "call failed" && l["span"]["method"] == "ControllerExpandVolume"
        });
        if let Some(l) = failed {
            assert_eq!(l["level"], "WARN", "{l}");
            assert_eq!(l["code"], "NotFound", "{l}");
            assert_eq!(l["span"]["volume"], "no-such-volume", "{l}");
            assert!(
                l["error"].as_str().unwrap().contains("no-such-volume"),
                "{l}"
            );
            // Logged once.
            let n = lines
                .iter()
                .filter(|l| {
                    l["span"]["method"] == "ControllerExpandVolume" && l["message"] == "call failed"
                })
                .count();
            assert_eq!(n, 1, "{log}");
            return;
        }
        assert!(Instant::now() < deadline, "no failed-call line:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Backing image work logs in a span with the image, the disk and the node; without the
/// Kubernetes store the events (`bicsi::events`) go to the log only, one line each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_backing_image_span_and_events_go_to_the_log() {
    let bad = kit::noise(MIB, 3);
    let base = image_server([("bad.raw".to_string(), bad)].into()).await;
    let s = Served::start(1, &["--log-format", "json"]).await;
    s.api(
        reqwest::Method::POST,
        "/v1/backingimages",
        Some(download_image(
            "bi-logged",
            &format!("{base}/bad.raw"),
            &"0".repeat(128),
        )),
    )
    .await;
    s.wait_file("bi-logged", "failed").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = s.proc.log();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let in_span = lines.iter().find(|l| {
            l["spans"].as_array().is_some_and(|spans| {
                spans
                    .iter()
                    .any(|sp| sp["name"] == "backing_image" && sp["image"] == "bi-logged")
            }) && l["level"] == "WARN"
        });
        let event = lines.iter().find(|l| {
            l["message"] == "event"
                && l["object"] == "backingimage/bi-logged"
                && l["reason"] == "BackingImageFailed"
        });
        if let (Some(l), Some(e)) = (in_span, event) {
            let span = l["spans"]
                .as_array()
                .unwrap()
                .iter()
                .find(|sp| sp["name"] == "backing_image")
                .unwrap();
            assert_eq!(span["node"], "metrics-node", "{l}");
            assert!(span["disk"].as_str().is_some_and(|d| !d.is_empty()), "{l}");
            assert_eq!(e["level"], "WARN", "{e}");
            assert!(e["note"].as_str().unwrap().contains("checksum"), "{e}");
            // The start of the preparation was told as well, once.
            let started = lines
                .iter()
                .filter(|l| {
                    l["message"] == "event"
                        && l["object"] == "backingimage/bi-logged"
                        && l["reason"] == "BackingImagePreparing"
                })
                .count();
            assert!(started >= 1, "{log}");
            return;
        }
        assert!(Instant::now() < deadline, "no span or event line:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// Multi-threaded: the image server runs on this runtime while the CLI blocks a thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_mode_the_controller_and_each_node_serve_metrics_and_count_a_cross_node_sync() {
    let dir = temp_dir("bicsi-metrics-split-");
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let token_arg = ["--api-token-file".to_string(), token.display().to_string()];
    let (http_port, cluster_port) = (free_port(), free_port());
    let mut args = kit::controller_args(dir.path(), http_port, cluster_port);
    args.extend(token_arg.iter().cloned());
    let mut controller = Proc::spawn(args, dir.path().join("controller.log"));
    let http = format!("http://127.0.0.1:{http_port}");
    let endpoint = kit::controller_endpoint(dir.path());
    let mut nodes = Vec::new();
    for id in ["node-1", "node-2"] {
        let ndir = dir.path().join(id);
        std::fs::create_dir_all(&ndir).unwrap();
        // The node's --http-listen takes only cluster certificates (mutual TLS): a scraper
        // reads /metrics on --metrics-listen, plain HTTP behind the token.
        let (node_http, node_metrics) = (free_port(), free_port());
        let mut args = kit::node_args(id, &ndir, cluster_port, free_port(), node_http);
        args.extend(token_arg.iter().cloned());
        args.extend([
            "--metrics-listen".into(),
            format!("127.0.0.1:{node_metrics}"),
        ]);
        let proc = Proc::spawn(args, ndir.join("node.log"));
        nodes.push((proc, format!("http://127.0.0.1:{node_metrics}")));
    }
    let healthz = format!("{http}/healthz");
    controller
        .wait_ready("bicsi controller", async || {
            reqwest::get(&healthz)
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while sum(&scrape(&http).await, "bicsi_node_up", &[]) < 2.0 {
        assert!(
            Instant::now() < deadline,
            "the nodes did not come up:\n{}",
            controller.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Each node's /metrics: behind the token, its own disk, accepted by promtool.
    for (i, (proc, node_http)) in nodes.iter_mut().enumerate() {
        let url = format!("{node_http}/metrics");
        proc.wait_ready("bicsi node", async || reqwest::get(&url).await.is_ok())
            .await;
        assert_eq!(reqwest::get(&url).await.unwrap().status(), 401);
        let s = scrape(node_http).await;
        let node = format!("node=\"node-{}\"", i + 1);
        assert_eq!(
            samples(&s)
                .keys()
                .filter(|k| k.starts_with("bicsi_disk_capacity_bytes{") && k.contains(&node))
                .count(),
            1,
            "{s}"
        );
        promtool_accepts(&s);
    }
    let (ok, out, err) = cli(
        &http,
        &endpoint,
        &[
            "set",
            "setting",
            "backing-image-download-allowed-networks",
            "127.0.0.1",
        ],
    );
    assert!(ok, "{out}{err}");

    let image = kit::noise(3 * MIB, 3);
    let base = image_server([("img.raw".to_string(), image.clone())].into()).await;
    let before: Vec<String> = futures::future::join_all(nodes.iter().map(|(_, h)| scrape(h))).await;
    let ctl_before = scrape(&http).await;
    let (ok, out, err) = cli(
        &http,
        &endpoint,
        &[
            "volume",
            "create",
            "vol-x",
            "--size",
            "16Mi",
            "--timeout",
            "60s",
            "-p",
            "numberOfReplicas=2",
            "-p",
            "backingImage=bi-x",
            "-p",
            "backingImageDataSourceType=download",
            "-p",
            &format!("backingImageDataSourceParameters={{\"url\": \"{base}/img.raw\"}}"),
            "-p",
            &format!("backingImageChecksum={}", sha512(&image)),
        ],
    );
    assert!(ok, "{out}{err}\n{}", controller.log());
    // Publishing to either node brings the file to the node without it.
    let mut c = CsiClient::connect(&endpoint).await.unwrap();
    let publish = pb::ControllerPublishVolumeRequest {
        volume_id: "vol-x".into(),
        node_id: "node-1".into(),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Block(Default::default())),
            access_mode: Some(pb::volume_capability::AccessMode {
                mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c
            .controller
            .controller_publish_volume(publish.clone())
            .await
        {
            Ok(_) => break,
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("publish: {e}\n{}", controller.log()),
        }
    }
    let after: Vec<String> = futures::future::join_all(nodes.iter().map(|(_, h)| scrape(h))).await;
    let total = |series: &str| -> f64 {
        before
            .iter()
            .zip(&after)
            .map(|(b, a)| grew(b, a, series))
            .sum()
    };
    let len = image.len() as f64;
    // One download on one node, one transfer to the other: counted where they ran.
    assert_eq!(
        total(r#"bicsi_backing_image_transfers_total{kind="download",result="ok"}"#),
        1.0
    );
    assert_eq!(
        total(r#"bicsi_backing_image_transfers_total{kind="sync_cross_node",result="ok"}"#),
        1.0
    );
    assert_eq!(
        total(r#"bicsi_backing_image_prepared_bytes_total{kind="sync_cross_node"}"#),
        len
    );
    let wire = total(r#"bicsi_backing_image_transfer_bytes_total{kind="sync_cross_node"}"#);
    assert!(
        wire >= len,
        "the whole file (no holes) crossed the wire: {wire}"
    );
    // The controller sees the files of both nodes and the publish.
    let ctl = scrape(&http).await;
    assert_eq!(
        sum(&ctl, "bicsi_backing_image_files", &[r#"state="ready""#]),
        2.0,
        "{ctl}"
    );
    assert_eq!(
        grew(
            &ctl_before,
            &ctl,
            r#"bicsi_csi_requests_total{code="OK",method="ControllerPublishVolume"}"#
        ),
        1.0
    );
    promtool_accepts(&ctl);
    for (mut p, _) in nodes {
        p.stop();
    }
    controller.stop();
    kit::cleanup_under(dir.path());
}
