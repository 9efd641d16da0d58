//! Tests against a real axum HTTP server on 127.0.0.1, serving generated images through routes
//! that misbehave in the ways real servers do.

use super::*;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap as AxHeaders, Response, StatusCode as AxStatus, Uri, header as h};
use sha2::{Digest, Sha512};

const MIB: usize = 1 << 20;
/// Chunk size the test server writes with.
const SERVE_CHUNK: usize = 64 * 1024;

/// Deterministic incompressible bytes (xorshift64*), no extra crate.
fn random_bytes(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v.into()
}

/// SHA-512 computed independently of the code under test.
fn sha512_hex(data: &[u8]) -> String {
    hex::encode(Sha512::digest(data))
}

#[derive(Default)]
struct ServerState {
    files: HashMap<String, Bytes>,
    /// Every request: (path, Range header).
    log: Mutex<Vec<(String, Option<String>)>>,
}

impl ServerState {
    fn hits(&self, path: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .count()
    }

    fn ranges(&self, path: &str) -> Vec<Option<String>> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|(p, _)| p == path)
            .map(|(_, r)| r.clone())
            .collect()
    }
}

struct Server {
    addr: SocketAddr,
    state: Arc<ServerState>,
}

impl Server {
    async fn start(files: HashMap<String, Bytes>) -> Server {
        let state = Arc::new(ServerState {
            files,
            ..Default::default()
        });
        let app = Router::new()
            .route("/{mode}/{name}", axum::routing::get(serve))
            .route("/missing", axum::routing::get(missing))
            .route("/loop", axum::routing::get(redirect_loop))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Server { addr, state }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn record(state: &ServerState, uri: &Uri, headers: &AxHeaders) {
    let range = headers
        .get(h::RANGE)
        .map(|v| v.to_str().unwrap().to_owned());
    state
        .log
        .lock()
        .unwrap()
        .push((uri.path().to_owned(), range));
}

async fn missing(State(st): State<Arc<ServerState>>, uri: Uri, headers: AxHeaders) -> AxStatus {
    record(&st, &uri, &headers);
    AxStatus::NOT_FOUND
}

async fn redirect_loop(
    State(st): State<Arc<ServerState>>,
    uri: Uri,
    headers: AxHeaders,
) -> Response<Body> {
    record(&st, &uri, &headers);
    Response::builder()
        .status(AxStatus::FOUND)
        .header(h::LOCATION, "/loop")
        .body(Body::empty())
        .unwrap()
}

/// Chunks of `data[from..]`; `stop` ends the stream early: `Some(true)` with an error (the
/// connection is cut), `Some(false)` by stalling forever.
fn body_stream(data: Bytes, from: usize, cut_at: Option<(usize, bool)>) -> Body {
    let end = cut_at.map_or(data.len(), |(at, _)| at);
    let chunks: Vec<Result<Bytes, std::io::Error>> = (from..end)
        .step_by(SERVE_CHUNK)
        .map(|i| Ok(data.slice(i..(i + SERVE_CHUNK).min(end))))
        .collect();
    let head = futures::stream::iter(chunks);
    match cut_at {
        None => Body::from_stream(head),
        Some((_, true)) => Body::from_stream(head.chain(futures::stream::once(async {
            Err(std::io::Error::other("connection cut by the test server"))
        }))),
        Some((_, false)) => Body::from_stream(head.chain(futures::stream::pending())),
    }
}

/// `/{mode}/{name}`: modes are `range` (full file, Range support), `norange` (ignores Range),
/// `drop` (first request cut half-way, then `range`), `drop-norange` (first request cut, always
/// ignores Range), `stall` (some bytes then silence), `redirect` (302 to `range`), `chunked` (no
/// Content-Length), `flaky` (503 with Retry-After first, then `range`), `badrange` (cut first,
/// then answers Range with the wrong start).
async fn serve(
    State(st): State<Arc<ServerState>>,
    UrlPath((mode, name)): UrlPath<(String, String)>,
    uri: Uri,
    headers: AxHeaders,
) -> Response<Body> {
    record(&st, &uri, &headers);
    let first = st.hits(uri.path()) == 1;
    let Some(data) = st.files.get(&name).cloned() else {
        return Response::builder()
            .status(AxStatus::NOT_FOUND)
            .body(Body::empty())
            .unwrap();
    };
    let len = data.len();
    let full = |cut: Option<(usize, bool)>, ranges: bool| {
        let mut r = Response::builder()
            .status(AxStatus::OK)
            .header(h::CONTENT_LENGTH, len)
            .header(h::ETAG, "\"v1\"");
        if ranges {
            r = r.header(h::ACCEPT_RANGES, "bytes");
        }
        r.body(body_stream(data.clone(), 0, cut)).unwrap()
    };
    let range_start = headers.get(h::RANGE).and_then(|v| {
        v.to_str()
            .ok()?
            .strip_prefix("bytes=")?
            .strip_suffix('-')?
            .parse::<usize>()
            .ok()
    });
    let ranged = |start: usize, claimed_start: usize| {
        if start >= len {
            return Response::builder()
                .status(AxStatus::RANGE_NOT_SATISFIABLE)
                .header(h::CONTENT_RANGE, format!("bytes */{len}"))
                .body(Body::empty())
                .unwrap();
        }
        Response::builder()
            .status(AxStatus::PARTIAL_CONTENT)
            .header(h::CONTENT_LENGTH, len - start)
            .header(
                h::CONTENT_RANGE,
                format!("bytes {claimed_start}-{}/{len}", len - 1),
            )
            .header(h::ACCEPT_RANGES, "bytes")
            .body(body_stream(data.clone(), start, None))
            .unwrap()
    };
    // If-Range with another validator than the file's: the whole file (RFC 9110 §13.1.5).
    let if_range_ok = headers
        .get(h::IF_RANGE)
        .is_none_or(|v| v.as_bytes() == b"\"v1\"");
    let range_start = range_start.filter(|_| if_range_ok);
    let with_ranges = |range_start: Option<usize>| match range_start {
        Some(start) => ranged(start, start),
        None => full(None, true),
    };
    match mode.as_str() {
        "range" => with_ranges(range_start),
        "norange" => full(None, false),
        "drop" if first => full(Some((len / 2, true)), true),
        "drop" => with_ranges(range_start),
        "drop-norange" if first => full(Some((len / 2, true)), false),
        "drop-norange" => full(None, false),
        "badrange" if first => full(Some((len / 2, true)), true),
        "badrange" => match range_start {
            Some(start) => ranged(start, start.saturating_sub(1000)),
            None => full(None, true),
        },
        "stall" => full(Some((len.min(256 * 1024), false)), true),
        "chunked" => Response::builder()
            .status(AxStatus::OK)
            .body(body_stream(data.clone(), 0, None))
            .unwrap(),
        "flaky" if first => Response::builder()
            .status(AxStatus::SERVICE_UNAVAILABLE)
            .header(h::RETRY_AFTER, "0")
            .body(Body::empty())
            .unwrap(),
        "flaky" => with_ranges(range_start),
        "redirect" => Response::builder()
            .status(AxStatus::FOUND)
            .header(h::LOCATION, format!("/range/{name}"))
            .body(Body::empty())
            .unwrap(),
        // To the same port on another loopback address, where nothing listens: only the guard
        // may stop the client before it tries.
        "away" => Response::builder()
            .status(AxStatus::FOUND)
            .header(
                h::LOCATION,
                format!(
                    "http://127.0.0.2:{}/range/{name}",
                    headers
                        .get(h::HOST)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.rsplit_once(':'))
                        .map(|(_, p)| p)
                        .unwrap_or("80")
                ),
            )
            .body(Body::empty())
            .unwrap(),
        _ => Response::builder()
            .status(AxStatus::BAD_REQUEST)
            .body(Body::empty())
            .unwrap(),
    }
}

/// Records every progress call.
#[derive(Default)]
struct Recorder(Mutex<Vec<(u64, Option<u64>)>>);

impl ProgressSink for Recorder {
    fn progress(&self, received: u64, total: Option<u64>) {
        self.0.lock().unwrap().push((received, total));
    }
}

struct Fixture {
    server: Server,
    dir: tempfile::TempDir,
    rand: Bytes,
    qcow2: Bytes,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        // A few MiB, not a multiple of the 1 MiB block nor of the server's chunk.
        let rand = random_bytes(3 * MIB + 12_345, 7);
        let qpath = dir.path().join("made.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                qpath.to_str().unwrap(),
                "64M",
            ])
            .output()
            .expect("qemu-img is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let qcow2 = Bytes::from(std::fs::read(&qpath).unwrap());
        let files = HashMap::from([
            ("rand.img".to_owned(), rand.clone()),
            ("made.qcow2".to_owned(), qcow2.clone()),
            ("big.img".to_owned(), random_bytes(4 * MIB, 9)),
            ("sparse.img".to_owned(), sparse_bytes()),
        ]);
        Fixture {
            server: Server::start(files).await,
            dir,
            rand,
            qcow2,
        }
    }

    /// A request for `path` into `<tmp>/disk/tmp/<name>` (parent directories not there yet),
    /// with test-sized timeouts.
    fn request(&self, path: &str) -> DownloadRequest {
        DownloadRequest {
            idle_timeout: Duration::from_secs(5),
            max_attempts: 3,
            backoff: Duration::from_millis(10),
            ..DownloadRequest::new(
                self.server.url(path),
                self.dir.path().join("disk/tmp/image.part"),
            )
        }
    }
}

async fn get(req: &DownloadRequest) -> Result<DownloadOutcome, DownloadError> {
    download(req, &NoProgress, CancellationToken::new()).await
}

fn assert_file(req: &DownloadRequest, want: &[u8]) {
    let got = std::fs::read(&req.dest).expect("downloaded file exists");
    assert_eq!(got.len(), want.len(), "file size");
    assert!(got == want, "file content differs from the served bytes");
}

/// The download's manifest is the one a verification of the file it wrote builds, and names
/// its SHA-512: the same content gives the same manifest whichever way it was read.
fn assert_manifest(req: &DownloadRequest, out: &DownloadOutcome) {
    let (sha512, manifest) = crate::sync::hash_sparse(&req.dest).unwrap();
    assert_eq!(sha512, out.sha512);
    assert_eq!(out.manifest, manifest);
    assert_eq!(out.manifest.size, out.size);
}

fn assert_gone(req: &DownloadRequest) {
    assert!(
        !req.dest.exists(),
        "temp file {} was left behind",
        req.dest.display()
    );
}

#[tokio::test]
async fn full_file_with_range_support() {
    let fx = Fixture::new().await;
    let req = fx.request("/range/rand.img");
    let rec = Recorder::default();
    let out = download(&req, &rec, CancellationToken::new())
        .await
        .unwrap();
    let n = fx.rand.len() as u64;
    assert_eq!(
        (out.size, out.sha512.as_str(), out.resumed),
        (n, sha512_hex(&fx.rand).as_str(), 0)
    );
    assert_file(&req, &fx.rand);
    assert_manifest(&req, &out);
    let calls = rec.0.lock().unwrap().clone();
    assert_eq!(calls.last(), Some(&(n, Some(n))), "final progress call");
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0), "{calls:?}");
    assert_eq!(fx.server.state.hits("/range/rand.img"), 1);
}

/// 8 MiB of zeros with 1 MiB of random data in the middle and a few bytes near the end.
fn sparse_bytes() -> Bytes {
    let mut v = vec![0u8; 8 * MIB];
    v[3 * MIB..4 * MIB].copy_from_slice(&random_bytes(MIB, 11));
    v[8 * MIB - 10] = 1;
    Bytes::from(v)
}

#[tokio::test]
async fn zeros_stay_holes_in_the_downloaded_file() {
    let fx = Fixture::new().await;
    let req = fx.request("/range/sparse.img");
    let out = get(&req).await.unwrap();
    let want = sparse_bytes();
    assert_eq!(out.sha512, sha512_hex(&want));
    assert_file(&req, &want);
    assert_manifest(&req, &out);
    // 1 MiB chunks: data in the fourth and the last, zeros elsewhere.
    use crate::sync::manifest::Chunk;
    let data: Vec<usize> = (out.manifest.chunks.iter().enumerate())
        .filter(|(_, c)| **c != Chunk::Zero)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(data, [3, 7]);
    let allocated = crate::sync::allocated_bytes(&req.dest).unwrap();
    assert!(
        allocated <= 2 * MIB as u64,
        "8 MiB with 1 MiB of data must allocate about 1 MiB, got {allocated}"
    );
}

#[tokio::test]
async fn missing_checksum_reports_sha512_of_served_bytes() {
    let fx = Fixture::new().await;
    // The qcow2 made by qemu-img: the checksum is of the file as a raw byte stream.
    let req = fx.request("/range/made.qcow2");
    let out = get(&req).await.unwrap();
    assert_eq!(out.sha512, sha512_hex(&fx.qcow2));
    assert_eq!(out.size, fx.qcow2.len() as u64);
    assert_file(&req, &fx.qcow2);
    let info = crate::imagefmt::probe(&req.dest).unwrap();
    assert_eq!(info.format, crate::imagefmt::Format::Qcow2);
    assert_eq!(info.virtual_size, 64 << 20);
}

#[tokio::test]
async fn right_checksum_is_accepted() {
    let fx = Fixture::new().await;
    let mut req = fx.request("/range/rand.img");
    req.expected_sha512 = Some(sha512_hex(&fx.rand));
    let out = get(&req).await.unwrap();
    assert_eq!(Some(out.sha512), req.expected_sha512);
    assert_file(&req, &fx.rand);
}

#[tokio::test]
async fn wrong_checksum_fails_and_removes_the_file() {
    let fx = Fixture::new().await;
    let mut req = fx.request("/range/rand.img");
    let wrong = sha512_hex(b"something else");
    req.expected_sha512 = Some(wrong.clone());
    let e = get(&req).await.unwrap_err();
    let got = sha512_hex(&fx.rand);
    assert!(matches!(e, DownloadError::ChecksumMismatch { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "checksum mismatch: expected {wrong}, got {got}; the file at the URL changed or is \
             corrupt"
        )
    );
    assert!(!e.is_retryable());
    assert_gone(&req);
}

#[tokio::test]
async fn server_without_range_support() {
    let fx = Fixture::new().await;
    let mut req = fx.request("/norange/rand.img");
    req.expected_sha512 = Some(sha512_hex(&fx.rand));
    let out = get(&req).await.unwrap();
    assert_eq!(out.resumed, 0);
    assert_file(&req, &fx.rand);
}

#[tokio::test]
async fn dropped_connection_resumes_with_range() {
    let fx = Fixture::new().await;
    let mut req = fx.request("/drop/rand.img");
    req.expected_sha512 = Some(sha512_hex(&fx.rand));
    let rec = Recorder::default();
    let out = download(&req, &rec, CancellationToken::new())
        .await
        .unwrap();
    assert!(out.resumed >= 1, "{out:?}");
    assert_eq!(out.sha512, sha512_hex(&fx.rand));
    assert_file(&req, &fx.rand);
    assert_manifest(&req, &out);
    let ranges = fx.server.state.ranges("/drop/rand.img");
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert_eq!(ranges[0], None);
    let start: u64 = ranges[1]
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .expect("second request has Range: bytes=N-");
    assert!(start > 0 && start <= fx.rand.len() as u64 / 2, "{start}");
    // Resumed, not restarted: progress never went back to 0.
    let calls = rec.0.lock().unwrap().clone();
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0), "{calls:?}");
}

#[tokio::test]
async fn dropped_connection_without_range_support_restarts() {
    let fx = Fixture::new().await;
    let mut req = fx.request("/drop-norange/rand.img");
    req.expected_sha512 = Some(sha512_hex(&fx.rand));
    let out = get(&req).await.unwrap();
    assert_eq!(out.resumed, 0);
    assert_eq!(out.sha512, sha512_hex(&fx.rand));
    assert_file(&req, &fx.rand);
    assert_eq!(fx.server.state.hits("/drop-norange/rand.img"), 2);
}

#[tokio::test]
async fn wrong_content_range_restarts_from_zero() {
    let fx = Fixture::new().await;
    let mut req = fx.request("/badrange/rand.img");
    req.expected_sha512 = Some(sha512_hex(&fx.rand));
    let out = get(&req).await.unwrap();
    assert_eq!(out.resumed, 0);
    assert_file(&req, &fx.rand);
    // Restarted from zero: the manifest forgot what came before, as the hash did.
    assert_manifest(&req, &out);
    let ranges = fx.server.state.ranges("/badrange/rand.img");
    // cut; Range answered with the wrong start; whole file without Range.
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    assert!(ranges[1].is_some() && ranges[2].is_none(), "{ranges:?}");
}

#[tokio::test]
async fn stalled_server_times_out_after_max_attempts() {
    let fx = Fixture::new().await;
    let mut req = fx.request("/stall/rand.img");
    req.idle_timeout = Duration::from_millis(300);
    req.max_attempts = 3;
    let started = Instant::now();
    let e = get(&req).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(e, DownloadError::IdleTimeout { attempts: 3, .. }),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "GET {}: no data received for 0.3 s (gave up after 3 attempts)",
            fx.server.url("/stall/rand.img")
        )
    );
    assert!(e.is_retryable());
    assert_eq!(fx.server.state.hits("/stall/rand.img"), 3);
    // Each retry resumed from where the bytes stopped.
    let ranges = fx.server.state.ranges("/stall/rand.img");
    assert_eq!(ranges[1].as_deref(), Some("bytes=262144-"), "{ranges:?}");
    assert_gone(&req);
}

#[tokio::test]
async fn not_found_is_not_retried() {
    let fx = Fixture::new().await;
    let req = fx.request("/missing");
    let e = get(&req).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("GET {}: HTTP 404 Not Found", fx.server.url("/missing"))
    );
    assert!(!e.is_retryable());
    assert_eq!(fx.server.state.hits("/missing"), 1);
    assert_gone(&req);
}

#[tokio::test]
async fn server_error_is_retried() {
    let fx = Fixture::new().await;
    let mut req = fx.request("/flaky/rand.img");
    req.expected_sha512 = Some(sha512_hex(&fx.rand));
    get(&req).await.unwrap();
    assert_file(&req, &fx.rand);
    assert_eq!(fx.server.state.hits("/flaky/rand.img"), 2);
}

#[tokio::test]
async fn redirect_is_followed() {
    let fx = Fixture::new().await;
    let mut req = fx.request("/redirect/rand.img");
    req.expected_sha512 = Some(sha512_hex(&fx.rand));
    get(&req).await.unwrap();
    assert_file(&req, &fx.rand);
    assert_eq!(fx.server.state.hits("/redirect/rand.img"), 1);
    assert_eq!(fx.server.state.hits("/range/rand.img"), 1);
}

#[tokio::test]
async fn redirect_loop_is_an_error_not_retried() {
    let fx = Fixture::new().await;
    let req = fx.request("/loop");
    let e = get(&req).await.unwrap_err();
    assert!(matches!(e, DownloadError::Redirect { .. }), "{e:?}");
    println!("redirect loop: {e}");
    assert!(e.to_string().contains("redirect"), "{e}");
    assert!(!e.is_retryable());
    // The first request and MAX_REDIRECTS redirects, once.
    assert_eq!(fx.server.state.hits("/loop"), MAX_REDIRECTS + 1);
    assert_gone(&req);
}

#[tokio::test]
async fn body_without_content_length() {
    let fx = Fixture::new().await;
    let req = fx.request("/chunked/rand.img");
    let rec = Recorder::default();
    let out = download(&req, &rec, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(out.sha512, sha512_hex(&fx.rand));
    assert_file(&req, &fx.rand);
    let n = fx.rand.len() as u64;
    assert_eq!(rec.0.lock().unwrap().last(), Some(&(n, Some(n))));
}

#[tokio::test]
async fn connection_refused_gives_up_after_max_attempts() {
    let dir = tempfile::tempdir().unwrap();
    // A port that was just free on loopback; nothing listens there any more.
    let port = crate::kit::free_port();
    let req = DownloadRequest {
        max_attempts: 2,
        backoff: Duration::from_millis(10),
        idle_timeout: Duration::from_secs(2),
        ..DownloadRequest::new(
            format!("http://127.0.0.1:{port}/x"),
            dir.path().join("x.part"),
        )
    };
    let e = get(&req).await.unwrap_err();
    assert!(
        matches!(e, DownloadError::Connection { attempts: 2, .. }),
        "{e:?}"
    );
    let msg = e.to_string();
    println!("connection refused: {msg}");
    assert!(
        msg.starts_with(&format!(
            "GET http://127.0.0.1:{port}/x: connection failed after 2 attempt(s): "
        )),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("refused"), "{msg}");
    assert!(e.is_retryable());
    assert_gone(&req);
}

#[tokio::test]
async fn cancel_stops_a_stalled_download_and_removes_the_file() {
    let fx = Fixture::new().await;
    let mut req = fx.request("/stall/rand.img");
    req.idle_timeout = Duration::from_secs(60);
    let cancel = CancellationToken::new();
    let later = cancel.clone();
    // Cancel once the first bytes are in, seen through the progress sink.
    let seen = Arc::new(AtomicU64::new(0));
    let seen2 = seen.clone();
    let sink = move |received: u64, _: Option<u64>| {
        seen2.store(received, Ordering::SeqCst);
        if received > 0 {
            later.cancel();
        }
    };
    let started = Instant::now();
    let e = download(&req, &sink, cancel).await.unwrap_err();
    assert!(matches!(e, DownloadError::Cancelled { .. }), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(seen.load(Ordering::SeqCst) > 0);
    assert_gone(&req);
}

#[tokio::test]
async fn secrets_in_the_url_stay_out_of_errors() {
    let fx = Fixture::new().await;
    let url = format!(
        "http://user:hunter2@{}/missing?X-Amz-Signature=topsecret",
        fx.server.addr
    );
    let req = DownloadRequest::new(url, fx.dir.path().join("s.part"));
    let e = get(&req).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        !msg.contains("hunter2") && !msg.contains("topsecret"),
        "{msg}"
    );
    assert_eq!(
        msg,
        format!(
            "GET http://{}/missing?…: HTTP 404 Not Found",
            fx.server.addr
        )
    );
}

#[tokio::test]
async fn disk_full_is_its_own_error_and_leaves_no_file() {
    if !crate::kit::root_or_skip("disk_full_is_its_own_error_and_leaves_no_file") {
        return;
    }
    let fx = Fixture::new().await;
    let mnt = tempfile::tempdir().unwrap();
    if let Err(e) = nix::mount::mount(
        Some("tmpfs"),
        mnt.path(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    ) {
        println!("SKIP disk_full_is_its_own_error_and_leaves_no_file: mount tmpfs: {e}");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(mnt.path());
    // With Content-Length the reservation fails at once; without, a write fails mid-way.
    for route in ["/range/big.img", "/chunked/big.img"] {
        let req = DownloadRequest {
            dest: mnt.path().join("tmp/big.part"),
            ..fx.request(route)
        };
        let e = get(&req).await.unwrap_err();
        assert!(
            matches!(e, DownloadError::DiskFull { .. }),
            "{route}: {e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "disk full: no space left to write {}; free space on that disk and retry",
                req.dest.display()
            )
        );
        assert!(!e.is_retryable());
        assert_gone(&req);
        assert_eq!(fx.server.state.hits(route), 1, "{route}: not retried");
    }
}

#[test]
fn validate_url_table() {
    let ok = [
        "http://example.com/a.img",
        "https://example.com:8443/x/y.qcow2?sig=1",
        "  https://h/a  ",
    ];
    for u in ok {
        assert!(validate_url(u).is_ok(), "{u}");
    }
    let bad = [
        (
            "ftp://example.com/a.img",
            "unsupported URL scheme \"ftp\" in ftp://example.com/a.img: only http and https are supported",
        ),
        (
            "file:///etc/passwd",
            "unsupported URL scheme \"file\" in file:///etc/passwd: only http and https are supported",
        ),
        ("s3://bucket/key", "unsupported URL scheme \"s3\""),
        (
            "/relative/path",
            "invalid URL \"/relative/path\": relative URL without a base; only absolute http and https URLs are supported",
        ),
        ("", "invalid URL \"\""),
        ("http://", "invalid URL \"http://\": empty host"),
    ];
    for (u, want) in bad {
        let e = validate_url(u).unwrap_err();
        assert!(
            e.to_string().starts_with(want),
            "{u:?}: {e} does not start with {want}"
        );
        assert!(!e.is_retryable());
    }
}

#[test]
fn redact_drops_credentials_and_query() {
    let cases = [
        (
            "https://u:p@h.example/a.img?token=x#frag",
            "https://h.example/a.img?…",
        ),
        (
            "http://h.example:8080/a/b.raw",
            "http://h.example:8080/a/b.raw",
        ),
        ("http://u@h/a", "http://h/a"),
    ];
    for (url, want) in cases {
        assert_eq!(redact(&Url::parse(url).unwrap()), want);
    }
}

#[test]
fn backoff_doubles_and_is_capped() {
    let b = Duration::from_millis(500);
    let got: Vec<_> = (1..=8).map(|a| backoff(b, a).as_millis()).collect();
    assert_eq!(got, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
    assert_eq!(backoff(Duration::from_secs(1), u32::MAX), MAX_BACKOFF);
}

#[test]
fn content_range_table() {
    let cases = [
        ("bytes 100-199/200", Some((100, Some(200)))),
        ("bytes 0-0/1", Some((0, Some(1)))),
        ("bytes 5-9/*", Some((5, None))),
        ("bytes 9-5/10", None),
        ("bytes */200", None),
        ("items 1-2/3", None),
        ("bytes 1-x/3", None),
        // Past the whole length (found by the content-range fuzz target's check).
        ("bytes 5-10/3", None),
        ("bytes 0-199/199", None),
    ];
    for (v, want) in cases {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_RANGE, HeaderValue::from_static(v));
        assert_eq!(content_range(&headers), want, "{v}");
    }
}

#[test]
fn download_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let req = DownloadRequest::new("http://127.0.0.1:1/x", "/nonexistent/x");
    let fut = download(&req, &NoProgress, CancellationToken::new());
    assert_send(&fut);
}

/// Throughput against the reference `curl -s -o f URL && sha512sum f`, same server, same run.
/// `BICSI_DL_BENCH=1 cargo test --release bench_download -- --nocapture`
/// (`BICSI_DL_BENCH_MIB` sets the size, default 512; `BICSI_DL_BENCH_DIR` the directory, /tmp).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_download_vs_curl() {
    if std::env::var_os("BICSI_DL_BENCH").is_none() {
        println!("SKIP bench_download_vs_curl: set BICSI_DL_BENCH=1 (and use --release)");
        return;
    }
    let mib: usize = std::env::var("BICSI_DL_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let rounds = 3;
    let base = std::env::var("BICSI_DL_BENCH_DIR").unwrap_or_else(|_| "/tmp".to_owned());
    let dir = tempfile::tempdir_in(base).unwrap();
    let data = random_bytes(mib * MIB, 42);
    let sha = sha512_hex(&data);
    let server = Server::start(HashMap::from([("big.img".to_owned(), data)])).await;
    let url = server.url("/range/big.img");

    let mut ours = Vec::new();
    let mut curl = Vec::new();
    let mut rss_growth = 0u64;
    for _ in 0..rounds {
        let req = DownloadRequest {
            expected_sha512: Some(sha.clone()),
            ..DownloadRequest::new(&url, dir.path().join("ours.part"))
        };
        // Resident memory sampled at each progress call (10 per second), over the baseline.
        let base = rss_kib();
        let peak = AtomicU64::new(base);
        let sink = |_: u64, _: Option<u64>| {
            peak.fetch_max(rss_kib(), Ordering::Relaxed);
        };
        let t = Instant::now();
        let out = download(&req, &sink, CancellationToken::new())
            .await
            .unwrap();
        ours.push(t.elapsed().as_secs_f64());
        rss_growth = rss_growth.max(peak.load(Ordering::Relaxed).saturating_sub(base));
        assert_eq!(out.sha512, sha);
        std::fs::remove_file(&req.dest).unwrap();

        let f = dir.path().join("curl.img");
        let t = Instant::now();
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "curl -s -o {f} {url} && sha512sum {f} >/dev/null",
                f = f.display()
            ))
            .status()
            .await
            .unwrap();
        curl.push(t.elapsed().as_secs_f64());
        assert!(status.success());
        std::fs::remove_file(&f).unwrap();
    }
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (om, omin, omax) = stats(&mut ours);
    let (cm, cmin, cmax) = stats(&mut curl);
    println!(
        "download+verify {mib} MiB over loopback, {rounds} rounds (median [min-max] s):\n  \
         bicsi (stream+hash+fdatasync+fadvise): {om:.2} [{omin:.2}-{omax:.2}] = {:.0} MiB/s\n  \
         curl -o f && sha512sum f:              {cm:.2} [{cmin:.2}-{cmax:.2}] = {:.0} MiB/s\n  \
         ratio bicsi/curl: {:.2}\n  \
         bicsi resident memory growth while downloading (server included): {} MiB max",
        mib as f64 / om,
        mib as f64 / cm,
        om / cm,
        rss_growth / 1024
    );
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// What an earlier process left: the first `len` bytes of `data` at the request's dest, and the
/// validator it saw beside them.
fn leave_partial(req: &DownloadRequest, data: &[u8], len: usize, validator: &str) {
    std::fs::create_dir_all(req.dest.parent().unwrap()).unwrap();
    std::fs::write(&req.dest, &data[..len]).unwrap();
    let kept = serde_json::json!({
        "url": req.url,
        "validator": validator,
        "total": data.len(),
    });
    std::fs::write(resume_path(&req.dest), kept.to_string()).unwrap();
}

#[tokio::test]
async fn a_partial_file_of_an_earlier_process_is_continued_with_range_and_rehashed() {
    let f = Fixture::new().await;
    let mut req = f.request("/range/rand.img");
    req.resume = true;
    req.expected_sha512 = Some(sha512_hex(&f.rand));
    let cut = MIB + 4321;
    leave_partial(&req, &f.rand, cut, "\"v1\"");
    let out = get(&req).await.unwrap();
    assert_eq!(out.kept, cut as u64);
    assert_eq!(out.sha512, sha512_hex(&f.rand));
    assert_file(&req, &f.rand);
    assert_manifest(&req, &out);
    assert_eq!(
        f.server.state.ranges("/range/rand.img"),
        [Some(format!("bytes={cut}-"))],
        "one request, from where the partial file ends"
    );
    assert!(
        !resume_path(&req.dest).exists(),
        "the validator goes once done"
    );
}

#[tokio::test]
async fn a_partial_file_whose_validator_changed_starts_over() {
    let f = Fixture::new().await;
    let mut req = f.request("/range/rand.img");
    req.resume = true;
    // The earlier process saw another version of the file, whose start differs.
    let mut old = f.rand.to_vec();
    old[..1000].fill(0xAB);
    leave_partial(&req, &old, 2 * MIB, "\"v0\"");
    let out = get(&req).await.unwrap();
    assert_eq!(out.kept, 0, "nothing of the old version kept");
    assert_eq!(out.sha512, sha512_hex(&f.rand));
    assert_file(&req, &f.rand);
    let ranges = f.server.state.ranges("/range/rand.img");
    assert_eq!(ranges[0], Some(format!("bytes={}-", 2 * MIB)), "{ranges:?}");
}

#[tokio::test]
async fn a_partial_file_of_another_url_or_without_resume_is_not_used() {
    let f = Fixture::new().await;
    let mut req = f.request("/range/rand.img");
    req.resume = true;
    leave_partial(&req, &f.rand, MIB, "\"v1\"");
    let mut other = req.clone();
    other.url = f.server.url("/norange/rand.img");
    let out = get(&other).await.unwrap();
    assert_eq!(out.kept, 0);
    assert_file(&other, &f.rand);
    leave_partial(&req, &f.rand, MIB, "\"v1\"");
    req.resume = false;
    let out = get(&req).await.unwrap();
    assert_eq!(out.kept, 0);
    assert_file(&req, &f.rand);
    assert_eq!(f.server.state.ranges("/range/rand.img"), [None]);
}

#[tokio::test]
async fn a_dropped_resumable_download_leaves_its_partial_file_and_validator() {
    let f = Fixture::new().await;
    let mut req = f.request("/stall/big.img");
    req.resume = true;
    let task = tokio::spawn({
        let req = req.clone();
        async move { get(&req).await }
    });
    // The stalling server answers and sends its first bytes, then nothing: the validator is
    // written as the answer arrives, before any byte of the body.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !resume_path(&req.dest).exists() {
        assert!(std::time::Instant::now() < deadline, "no answer arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    task.abort();
    let _ = task.await;
    assert!(
        req.dest.exists(),
        "the partial file stays for the next process"
    );
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(resume_path(&req.dest)).unwrap()).unwrap();
    assert_eq!(kept["validator"], "\"v1\"");
    // An error still removes both.
    req.url = f.server.url("/missing");
    req.dest = req.dest.with_file_name("other.part");
    std::fs::write(&req.dest, b"x").unwrap();
    assert!(get(&req).await.is_err());
    assert_gone(&req);
    assert!(!resume_path(&req.dest).exists());
}

#[test]
fn permanent_errors_are_the_ones_a_retry_cannot_fix() {
    let status = |s: u16| DownloadError::HttpStatus {
        url: "u".into(),
        status: StatusCode::from_u16(s).unwrap(),
        attempts: 1,
    };
    for (e, permanent) in [
        (status(404), true),
        (status(403), true),
        (status(408), false),
        (status(429), false),
        (status(503), false),
        (
            DownloadError::ChecksumMismatch {
                expected: "a".into(),
                got: "b".into(),
            },
            true,
        ),
        (
            DownloadError::Connection {
                url: "u".into(),
                attempts: 5,
                last: "refused".into(),
            },
            false,
        ),
        (DownloadError::DiskFull { path: "/x".into() }, false),
    ] {
        assert_eq!(e.is_permanent(), permanent, "{e}");
    }
}

// ------------------------------------------------------------------ the download guard

fn cluster_guard(allowed: &str) -> super::guard::NetworkGuard {
    super::guard::NetworkGuard::from_settings("", allowed, true, &[]).unwrap()
}

#[tokio::test]
async fn guard_refuses_a_loopback_url_in_a_cluster_before_connecting() {
    let fx = Fixture::new().await;
    let mut req = fx.request("/range/rand.img");
    req.guard = cluster_guard("");
    let e = get(&req).await.unwrap_err();
    println!("{e}");
    let DownloadError::Denied { refusal, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(refusal.addr.to_string(), "127.0.0.1");
    assert_eq!(refusal.network, "127.0.0.0/8 (loopback)");
    assert!(e.to_string().contains(super::guard::DENIED_SETTING), "{e}");
    assert!(e.to_string().contains(super::guard::ALLOWED_SETTING), "{e}");
    assert!(!e.is_retryable() && e.is_permanent());
    assert_eq!(fx.server.state.hits("/range/rand.img"), 0);
    assert_gone(&req);
    // head() says the same, before any connection.
    let e = head(
        &req.url,
        64,
        Duration::from_secs(2),
        &req.guard,
        &req.access,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, DownloadError::Denied { .. }), "{e:?}");
    assert_eq!(fx.server.state.hits("/range/rand.img"), 0);
}

#[tokio::test]
async fn guard_refuses_a_host_name_that_resolves_to_a_denied_address() {
    let fx = Fixture::new().await;
    let mut req = fx.request("/range/rand.img");
    req.url = req.url.replace("127.0.0.1", "localhost");
    req.guard = cluster_guard("");
    let e = get(&req).await.unwrap_err();
    let DownloadError::Denied { refusal, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(refusal.host, "localhost");
    assert!(refusal.addr.is_loopback(), "{e}");
    assert_eq!(fx.server.state.hits("/range/rand.img"), 0);
    assert_gone(&req);
}

#[tokio::test]
async fn guard_lets_an_allowed_network_through() {
    let fx = Fixture::new().await;
    let mut req = fx.request("/range/rand.img");
    req.url = req.url.replace("127.0.0.1", "localhost");
    req.expected_sha512 = Some(sha512_hex(&fx.rand));
    req.guard = cluster_guard("loopback");
    get(&req).await.unwrap();
    assert_file(&req, &fx.rand);
    let e = head(
        &req.url,
        16,
        Duration::from_secs(5),
        &req.guard,
        &req.access,
    )
    .await;
    assert_eq!(e.unwrap().bytes, fx.rand[..16].to_vec());
}

#[tokio::test]
async fn guard_refuses_a_redirect_to_a_denied_address() {
    let fx = Fixture::new().await;
    let mut req = fx.request("/away/rand.img");
    // 127.0.0.1 is allowed, the rest of loopback is not.
    req.guard = cluster_guard("127.0.0.1");
    let e = get(&req).await.unwrap_err();
    println!("{e}");
    let DownloadError::Denied { refusal, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(refusal.addr.to_string(), "127.0.0.2");
    assert!(!e.is_retryable());
    // One request, the redirect; not retried.
    assert_eq!(fx.server.state.hits("/away/rand.img"), 1);
    assert_gone(&req);
}

#[tokio::test]
async fn guard_refuses_the_metadata_address_even_on_the_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    let mut req = DownloadRequest::new(
        "http://169.254.169.254/latest/meta-data/",
        dir.path().join("m.part"),
    );
    req.guard = super::guard::NetworkGuard::from_settings("", "", false, &[]).unwrap();
    let started = std::time::Instant::now();
    let e = get(&req).await.unwrap_err();
    assert!(matches!(e, DownloadError::Denied { .. }), "{e:?}");
    assert!(e.to_string().contains("169.254.0.0/16 (link-local)"), "{e}");
    // Refused before any connection: no connect timeout was waited out.
    assert!(started.elapsed() < Duration::from_secs(1));
}

// Compressed bodies and the source checksum.

use super::decompress::tests::{ALL as COMPRESSIONS, compress};

/// A server with every image of the fixture compressed in every format (`NAME.FORMAT`), and a
/// corrupt xz file.
async fn compressed_fixture() -> (Fixture, Server, HashMap<String, Bytes>) {
    let fx = Fixture::new().await;
    let mut files = HashMap::new();
    for c in COMPRESSIONS {
        for (name, data) in [
            ("sparse.img", sparse_bytes()),
            ("made.qcow2", fx.qcow2.clone()),
        ] {
            files.insert(format!("{name}.{c}"), Bytes::from(compress(c, &data)));
        }
    }
    let mut bad = compress(Compression::Xz, &fx.rand);
    let mid = bad.len() / 2;
    bad[mid..mid + 16].copy_from_slice(&[0x55; 16]);
    files.insert("corrupt.xz".to_owned(), Bytes::from(bad));
    let server = Server::start(files.clone()).await;
    (fx, server, files)
}

fn compressed_request(fx: &Fixture, server: &Server, path: &str) -> DownloadRequest {
    DownloadRequest {
        url: server.url(path),
        ..fx.request(path)
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

#[tokio::test]
async fn each_compression_of_a_raw_and_a_qcow2_image_is_stored_decompressed_with_its_holes() {
    let (fx, server, _) = compressed_fixture().await;
    for c in COMPRESSIONS {
        for (name, want) in [
            ("sparse.img", sparse_bytes()),
            ("made.qcow2", fx.qcow2.clone()),
        ] {
            let path = format!("/range/{name}.{c}");
            let mut req = compressed_request(&fx, &server, &path);
            req.expected_sha512 = Some(sha512_hex(&want));
            let out = get(&req).await.unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(out.compression, Some(c), "{path}");
            assert_eq!(out.size, want.len() as u64, "{path}");
            assert_eq!(out.sha512, sha512_hex(&want), "{path}");
            assert_file(&req, &want);
            assert_manifest(&req, &out);
            let data = want.chunks(64 * 1024).filter(|c| c.iter().any(|b| *b != 0));
            let data = data.count() as u64 * 64 * 1024;
            let allocated = crate::sync::allocated_bytes(&req.dest).unwrap();
            assert!(
                allocated <= data + MIB as u64,
                "{path}: {} bytes with {data} of data allocated {allocated}",
                want.len()
            );
            std::fs::remove_file(&req.dest).unwrap();
        }
    }
}

#[tokio::test]
async fn a_cut_compressed_download_resumes_with_range_and_the_decoder_goes_on() {
    let (fx, server, files) = compressed_fixture().await;
    let want = sparse_bytes();
    for c in COMPRESSIONS {
        let path = format!("/drop/sparse.img.{c}");
        let mut req = compressed_request(&fx, &server, &path);
        req.expected_sha512 = Some(sha512_hex(&want));
        let out = get(&req).await.unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(out.resumed >= 1, "{path}: {out:?}");
        assert_file(&req, &want);
        let ranges = server.state.ranges(&path);
        assert_eq!(ranges.len(), 2, "{path}: {ranges:?}");
        let start: usize = ranges[1]
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
            .expect("the second request has Range: bytes=N-");
        let compressed_len = files[&format!("sparse.img.{c}")].len();
        assert!(start > 0 && start <= compressed_len / 2, "{path}: {start}");
        std::fs::remove_file(&req.dest).unwrap();
    }
}

#[tokio::test]
async fn a_cut_compressed_download_without_range_support_starts_over() {
    let (fx, server, _) = compressed_fixture().await;
    let want = sparse_bytes();
    let path = "/drop-norange/sparse.img.zstd";
    let mut req = compressed_request(&fx, &server, path);
    req.expected_sha512 = Some(sha512_hex(&want));
    let out = get(&req).await.unwrap();
    assert_eq!(out.resumed, 0);
    assert_file(&req, &want);
    assert_eq!(server.state.hits(path), 2);
}

#[tokio::test]
async fn source_checksum_is_of_the_bytes_as_downloaded() {
    let (fx, server, files) = compressed_fixture().await;
    let served = &files["sparse.img.xz"];
    let want = sparse_bytes();
    let path = "/range/sparse.img.xz";
    for algo in ["sha256", "sha512"] {
        let hex = if algo == "sha256" {
            sha256_hex(served)
        } else {
            sha512_hex(served)
        };
        let mut req = compressed_request(&fx, &server, path);
        req.source_checksum = Some(SourceChecksum::parse(&format!("{algo}:{hex}")).unwrap());
        req.expected_sha512 = Some(sha512_hex(&want));
        let out = get(&req).await.unwrap();
        assert_eq!(
            out.source_checksum.unwrap().to_string(),
            format!("{algo}:{hex}")
        );
        assert_file(&req, &want);
        std::fs::remove_file(&req.dest).unwrap();
    }
    // A plain body: the source checksum is the file's own.
    let mut req = fx.request("/range/rand.img");
    req.source_checksum = Some(
        SourceChecksum::parse(&format!("SHA256:{}", sha256_hex(&fx.rand).to_uppercase())).unwrap(),
    );
    get(&req).await.unwrap();
    std::fs::remove_file(&req.dest).unwrap();
    req.source_checksum =
        Some(SourceChecksum::parse(&format!("sha512:{}", sha512_hex(&fx.rand))).unwrap());
    get(&req).await.unwrap();

    // Wrong: both values named, nothing left, not retried.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let mut req = compressed_request(&fx, &server, path);
    req.source_checksum = Some(SourceChecksum::parse(&wrong).unwrap());
    let err = get(&req).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&wrong), "{msg}");
    assert!(
        msg.contains(&format!("sha256:{}", sha256_hex(served))),
        "{msg}"
    );
    assert!(err.is_permanent(), "{msg}");
    assert_gone(&req);
    assert!(!resume_path(&req.dest).exists());
}

#[test]
fn source_checksum_parse_table() {
    let h64 = "a".repeat(64);
    let h128 = "B".repeat(128);
    let ok = [
        (format!("sha256:{h64}"), format!("sha256:{h64}")),
        (
            format!(" SHA512:{h128} "),
            format!("sha512:{}", "b".repeat(128)),
        ),
    ];
    for (input, want) in ok {
        assert_eq!(SourceChecksum::parse(&input).unwrap().to_string(), want);
    }
    let bad = [
        (h64.clone(), "no algorithm"),
        (format!("md5:{h64}"), "not supported"),
        (format!("sha256:{h128}"), "64 hexadecimal"),
        (format!("sha512:{h64}"), "128 hexadecimal"),
        (format!("sha256:{}", "g".repeat(64)), "64 hexadecimal"),
        ("sha256:".to_owned(), "64 hexadecimal"),
    ];
    for (input, want) in bad {
        let e = SourceChecksum::parse(&input).unwrap_err();
        assert!(e.contains(want), "{input}: {e}");
    }
}

#[tokio::test]
async fn a_corrupt_compressed_body_fails_naming_the_format_and_leaves_nothing() {
    let (fx, server, _) = compressed_fixture().await;
    let mut req = compressed_request(&fx, &server, "/range/corrupt.xz");
    req.resume = true;
    let err = get(&req).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DownloadError::Corrupt { .. }), "{msg}");
    assert!(
        msg.contains("xz-compressed but does not decompress"),
        "{msg}"
    );
    assert!(err.is_permanent(), "{msg}");
    assert_eq!(server.state.hits("/range/corrupt.xz"), 1, "not retried");
    assert_gone(&req);
    assert!(!resume_path(&req.dest).exists());
}

#[tokio::test]
async fn a_compressed_body_cut_short_without_a_length_fails_and_leaves_nothing() {
    let fx = Fixture::new().await;
    let z = compress(Compression::Gzip, &fx.rand);
    let files = HashMap::from([(
        "cut.gz".to_owned(),
        Bytes::copy_from_slice(&z[..z.len() / 2]),
    )]);
    let server = Server::start(files).await;
    // `chunked`: no Content-Length, so only the decoder can tell the body is cut short.
    let req = compressed_request(&fx, &server, "/chunked/cut.gz");
    let msg = get(&req).await.unwrap_err().to_string();
    assert!(
        msg.contains("gzip-compressed") && msg.contains("cut short"),
        "{msg}"
    );
    assert_gone(&req);
}

#[tokio::test]
async fn a_dropped_compressed_resumable_download_keeps_no_validator() {
    let (fx, server, _) = compressed_fixture().await;
    // The plain stalled download writes its validator (see above); a compressed one must not,
    // since a later process cannot go on decoding from the middle.
    let mut req = compressed_request(&fx, &server, "/stall/sparse.img.gzip");
    req.resume = true;
    let task = tokio::spawn({
        let req = req.clone();
        async move { get(&req).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!task.is_finished(), "the download stalls mid-way");
    task.abort();
    let _ = task.await;
    assert!(
        req.dest.exists(),
        "the partial file is left as a plain one is"
    );
    assert!(!resume_path(&req.dest).exists());
}

// Private URLs: a real HTTPS server on 127.0.0.1 with a certificate of a CA made here.

struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            // A client that does not trust the certificate hangs up in the handshake.
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// A CA certificate (PEM) and the issuer that signs with it.
fn make_ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), rcgen::Issuer::new(params, key))
}

const BEARER: &str = "Bearer s3cret-token";

/// Serves `data` at `/private/img` over HTTPS to requests with `Authorization: BEARER` (or basic
/// auth alice / open sesame); 401 otherwise. Returns its base URL and its CA's PEM.
async fn private_server(data: Bytes) -> (String, String) {
    use tokio_rustls::rustls;
    let (ca_pem, issuer) = make_ca("bicsi test CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let app = Router::new().route(
        "/private/img",
        axum::routing::get(move |headers: AxHeaders| {
            let data = data.clone();
            async move {
                let auth = headers.get(h::AUTHORIZATION).map(|v| v.as_bytes().to_vec());
                let basic = format!(
                    "Basic {}",
                    base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD,
                        "alice:open sesame"
                    )
                );
                if auth.as_deref() == Some(BEARER.as_bytes())
                    || auth.as_deref() == Some(basic.as_bytes())
                {
                    Response::builder()
                        .status(AxStatus::OK)
                        .header(h::CONTENT_LENGTH, data.len())
                        .body(Body::from(data))
                        .unwrap()
                } else {
                    Response::builder()
                        .status(AxStatus::UNAUTHORIZED)
                        .body(Body::empty())
                        .unwrap()
                }
            }
        }),
    );
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://{}", tcp.local_addr().unwrap());
    let listener = TlsListener {
        tcp,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    };
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, ca_pem)
}

#[tokio::test]
async fn a_private_https_url_needs_its_ca_and_its_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(2 * MIB + 3, 5);
    let (base, ca_pem) = private_server(data.clone()).await;
    let url = format!("{base}/private/img");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        Some(p)
    };
    let ca_file = write("ca.pem", &ca_pem);
    let request = |access: Access| DownloadRequest {
        idle_timeout: Duration::from_secs(5),
        max_attempts: 3,
        backoff: Duration::from_millis(10),
        access,
        ..DownloadRequest::new(&url, dir.path().join("disk/tmp/image.part"))
    };

    // The system roots do not know the test CA: refused at once, saying what to do.
    let creds = AccessFiles {
        authorization: write("auth", &format!("{BEARER}\n")),
        ..Default::default()
    };
    let req = request(creds.load().unwrap());
    let err = get(&req).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DownloadError::Untrusted { .. }), "{msg}");
    assert!(
        msg.contains("caBundleFile") && msg.contains("not trusted"),
        "{msg}"
    );
    assert!(err.is_permanent());
    assert!(!msg.contains("s3cret"), "{msg}");
    assert_gone(&req);
    // Another CA's bundle does not help either.
    let (other_ca, _) = make_ca("another CA");
    let other = AccessFiles {
        ca_bundle: write("other.pem", &other_ca),
        ..creds.clone()
    };
    let err = get(&request(other.load().unwrap())).await.unwrap_err();
    assert!(matches!(err, DownloadError::Untrusted { .. }), "{err}");

    // Trusted, but without the credential: the server's 401, not retried.
    let trusted_only = AccessFiles {
        ca_bundle: ca_file.clone(),
        ..Default::default()
    };
    let err = get(&request(trusted_only.load().unwrap()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    assert!(err.is_permanent());

    // Trusted and with the credential, each way of giving it.
    let ways = [
        AccessFiles {
            ca_bundle: ca_file.clone(),
            ..creds.clone()
        },
        AccessFiles {
            ca_bundle: ca_file.clone(),
            headers: write(
                "headers",
                &format!("# for the test\nAuthorization: {BEARER}\n"),
            ),
            ..Default::default()
        },
        AccessFiles {
            ca_bundle: ca_file.clone(),
            username: write("user", "alice\n"),
            password: write("pass", "open sesame\n"),
            ..Default::default()
        },
    ];
    for files in ways {
        let access = files.load().unwrap();
        let req = request(access.clone());
        assert!(!format!("{req:?}").contains("s3cret"), "{req:?}");
        let out = get(&req).await.unwrap_or_else(|e| panic!("{files:?}: {e}"));
        assert_eq!(out.sha512, sha512_hex(&data));
        assert_file(&req, &data);
        // The head, which sizes volumes before the download is in, goes the same way.
        let got = head(&url, 16, Duration::from_secs(5), &req.guard, &access)
            .await
            .unwrap();
        assert_eq!(got.bytes, data[..16]);
        std::fs::remove_file(&req.dest).unwrap();
    }
}

/// A BackingImage in a cluster whose source names a Secret and a CA ConfigMap: the controller
/// reads them from the (fake) API server, the values make the download's headers and trust,
/// nothing of them lands in the stored object, and a wrong or missing Secret is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_ca_come_from_a_secret_and_a_configmap_in_the_cluster() {
    use crate::backing::BackingImages;
    use crate::backing::object::{self, BackingImage};
    use crate::files::source::DownloadSource;
    use crate::store::kubernetes::KubeStore;
    use crate::store::kubernetes::tests::{FakeApi, NS};
    use base64::Engine;

    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(MIB + 7, 9);
    let (base, ca_pem) = private_server(data.clone()).await;
    let url = format!("{base}/private/img");
    let (fake, client) = FakeApi::start().await;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    fake.put_core(
        "images",
        "secrets",
        "pull",
        serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "pull", "namespace": "images"},
            "data": {"username": b64("alice"), "password": b64("open sesame\n")}}),
    );
    fake.put_core(
        NS,
        "secrets",
        "wrong",
        serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "wrong", "namespace": NS},
            "data": {"authorization": b64("Bearer not-it")}}),
    );
    fake.put_core(
        NS,
        "configmaps",
        "private-ca",
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "private-ca", "namespace": NS},
            "data": {"ca.crt": ca_pem}}),
    );
    let store: Arc<dyn crate::store::Store> = Arc::new(KubeStore::new(client, NS).await.unwrap());
    let images = BackingImages::new(store.clone(), crate::cluster::Cluster::new(store.clone()));
    let image = |params: &[(&str, &str)]| {
        let mut bi: BackingImage = serde_json::from_value(serde_json::json!({
            "apiVersion": object::API_VERSION, "kind": object::KIND,
            "metadata": {"name": "private", "namespace": NS},
            "spec": {"sourceType": "download", "sourceParameters": {"url": url}},
        }))
        .unwrap();
        for (k, v) in params {
            bi.spec
                .source_parameters
                .insert(k.to_string(), v.to_string());
        }
        object::from_user(bi).unwrap()
    };
    let fetch = |bi: BackingImage| {
        let images = images.clone();
        let dest = dir.path().join("disk/tmp/image.part");
        let url = url.clone();
        async move {
            let creds = images.source_credentials(&bi)?;
            let (remote, access) = DownloadSource::from_params(&bi.spec.source_parameters)
                .and_then(|d| d.access(creds.as_ref()))
                .map_err(crate::error::Error::FailedPrecondition)?;
            let req = DownloadRequest {
                idle_timeout: Duration::from_secs(5),
                max_attempts: 2,
                backoff: Duration::from_millis(10),
                remote,
                access,
                ..DownloadRequest::new(&url, dest)
            };
            get(&req)
                .await
                .map_err(|e| crate::error::Error::Unavailable(e.to_string()))
        }
    };

    // The Secret in another namespace and the CA from the store's: the image comes in.
    let good = image(&[
        ("secret", "pull"),
        ("secretNamespace", "images"),
        ("caBundleConfigMap", "private-ca"),
    ]);
    let out = fetch(good.clone()).await.unwrap();
    assert_eq!(out.sha512, sha512_hex(&data));
    let creds = images.source_credentials(&good).unwrap().unwrap();
    assert!(!format!("{creds:?}").contains("open sesame"), "{creds:?}");
    // What the node gets travels as JSON in its request: the same values come out.
    let json = serde_json::to_vec(&creds).unwrap();
    assert_eq!(
        serde_json::from_slice::<crate::download::Credentials>(&json).unwrap(),
        creds
    );
    let reads = fake.log();
    assert!(
        reads
            .iter()
            .any(|l| l.path == "/api/v1/namespaces/images/secrets/pull")
            && reads
                .iter()
                .any(|l| l.path == format!("/api/v1/namespaces/{NS}/configmaps/private-ca")),
        "{reads:?}"
    );

    // Without the CA the server is not trusted; with the wrong Secret the server says 401.
    let e = fetch(image(&[("secret", "pull"), ("secretNamespace", "images")]))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not trusted"), "{e}");
    let e = fetch(image(&[
        ("secret", "wrong"),
        ("caBundleConfigMap", "private-ca"),
    ]))
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("401") && !e.contains("not-it"), "{e}");
    // A Secret or ConfigMap that is not there is named, with the fix.
    let e = images
        .source_credentials(&image(&[("secret", "nope")]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("Secret {NS}/nope does not exist")) && e.contains("\"private\""),
        "{e}"
    );
    let e = images
        .source_credentials(&image(&[("caBundleConfigMap", "gone")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("ConfigMap {NS}/gone")), "{e}");
    // The node without the values (a restart of a node in the split mode) says so and fails
    // softly: the controller starts it again with them.
    let e = DownloadSource::from_params(&good.spec.source_parameters)
        .and_then(|d| d.access(None))
        .unwrap_err();
    assert!(e.contains("not handed over"), "{e}");
}

/// Without a cluster the keys that name Kubernetes objects are refused when the image is made,
/// pointing at the file keys; mixing a Secret and files is refused too.
#[tokio::test]
async fn cluster_keys_are_refused_without_a_cluster() {
    use crate::backing::BackingImages;
    use crate::backing::object::{self, BackingImage};
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn crate::store::Store> =
        Arc::new(crate::store::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    let images = BackingImages::new(store.clone(), crate::cluster::Cluster::new(store.clone()));
    let bi = |params: serde_json::Value| -> BackingImage {
        serde_json::from_value(serde_json::json!({
            "apiVersion": object::API_VERSION, "kind": object::KIND,
            "metadata": {"name": "private", "namespace": object::DEFAULT_NAMESPACE},
            "spec": {"sourceType": "download", "sourceParameters": params},
        }))
        .unwrap()
    };
    for (params, want) in [
        (
            serde_json::json!({"url": "https://example.com/x.img", "secret": "s"}),
            "usernameFile and passwordFile",
        ),
        (
            serde_json::json!({"url": "s3://bucket/x.img", "caBundleConfigMap": "ca"}),
            "accessKeyIdFile and secretAccessKeyFile",
        ),
        (
            serde_json::json!({"url": "docker://quay.io/a/b:1", "secret": "pull"}),
            "dockerConfigFile",
        ),
    ] {
        let e = images.create(bi(params)).await.unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, crate::error::Error::InvalidArgument(_)), "{m}");
        assert!(m.contains("--store kubernetes") && m.contains(want), "{m}");
    }
    for (params, want) in [
        (
            serde_json::json!({"url": "https://e.com/x", "secret": "s", "authorizationFile": "/a"}),
            "give one",
        ),
        (
            serde_json::json!({"url": "https://e.com/x", "endpoint": "http://127.0.0.1:1"}),
            "does not go with an http(s) URL",
        ),
        (
            serde_json::json!({"url": "s3://bucket/k", "dockerConfigFile": "/c"}),
            "does not go with an s3:// URL",
        ),
        (
            serde_json::json!({"url": "s3://bucket/k", "accessKeyIdFile": "/k"}),
            "go together",
        ),
        (
            serde_json::json!({"url": "s3://bucket/k", "endpoint": "http://h:1/bucket"}),
            "without a path",
        ),
        (
            serde_json::json!({"url": "docker://h.io/a:1", "sourceChecksum": format!("sha256:{}", "0".repeat(64))}),
            "layer's own digest",
        ),
        (
            serde_json::json!({"url": "https://e.com/x", "secretNamespace": "x"}),
            "not given",
        ),
    ] {
        let e = object::from_user(bi(params.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{params}: {e}");
    }
}

/// What a poll compares: any ETag (a weak one too), else Last-Modified, named; nothing when the
/// server sends neither.
#[test]
fn the_change_validator_is_the_etag_else_last_modified() {
    let of = |pairs: &[(header::HeaderName, &str)]| {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        change_validator(&m)
    };
    let lm = "Wed, 02 Dec 2026 10:00:00 GMT";
    assert_eq!(
        of(&[(header::ETAG, "\"v1\""), (header::LAST_MODIFIED, lm)]).as_deref(),
        Some("etag:\"v1\"")
    );
    assert_eq!(
        of(&[(header::ETAG, "W/\"v2\"")]).as_deref(),
        Some("etag:W/\"v2\"")
    );
    assert_eq!(
        of(&[(header::LAST_MODIFIED, lm)]),
        Some(format!("last-modified:{lm}"))
    );
    assert_eq!(of(&[(header::CONTENT_LENGTH, "3")]), None);
}
