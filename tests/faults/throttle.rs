//! Slow networks on purpose, so that a `kill -9` lands in the middle of a transfer: an HTTP server
//! of images whose rate the test sets (it answers `Range` requests and counts every request), and
//! a TCP proxy with a settable rate in front of a node agent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes per second; 0 means as fast as it goes.
pub type Rate = Arc<AtomicU64>;

const CHUNK: usize = 64 * 1024;

/// How long `len` bytes take at `rate`.
fn pause(rate: &Rate, len: usize) -> Option<Duration> {
    let r = rate.load(Ordering::Relaxed);
    (r > 0).then(|| Duration::from_nanos(len as u64 * 1_000_000_000 / r))
}

/// Each image with its ETag.
type Files = Arc<Mutex<HashMap<String, (bytes::Bytes, String)>>>;
/// Every request: the file's name and the start of its `Range`, if it had one.
type Ranges = Arc<Mutex<Vec<(String, Option<usize>)>>>;

fn with_etag(b: Vec<u8>) -> (bytes::Bytes, String) {
    let etag = format!("\"{}\"", &crate::images::sha512(&b)[..16]);
    (bytes::Bytes::from(b), etag)
}

#[derive(Clone)]
struct Shared {
    files: Files,
    rate: Rate,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    ranges: Ranges,
}

/// Images served over HTTP at a rate the test controls.
pub struct ImageServer {
    pub base: String,
    pub rate: Rate,
    files: Files,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    ranges: Ranges,
}

impl ImageServer {
    pub async fn start(files: HashMap<String, Vec<u8>>) -> ImageServer {
        // Each image with its ETag, hashed once.
        let files = files.into_iter().map(|(n, b)| (n, with_etag(b))).collect();
        let shared = Shared {
            files: Arc::new(Mutex::new(files)),
            rate: Arc::new(AtomicU64::new(0)),
            hits: Arc::new(Mutex::new(HashMap::new())),
            ranges: Arc::new(Mutex::new(Vec::new())),
        };
        let (rate, hits, ranges, files) = (
            shared.rate.clone(),
            shared.hits.clone(),
            shared.ranges.clone(),
            shared.files.clone(),
        );
        let app = axum::Router::new()
            .route("/img/{name}", axum::routing::get(serve))
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        ImageServer {
            base,
            rate,
            files,
            hits,
            ranges,
        }
    }

    /// Serves other bytes (with another ETag) under `name` from now on.
    pub fn replace(&self, name: &str, bytes: Vec<u8>) {
        self.files
            .lock()
            .unwrap()
            .insert(name.to_string(), with_etag(bytes));
    }

    /// The `Range` starts of the requests for `name` so far (None: no Range).
    pub fn range_starts(&self, name: &str) -> Vec<Option<usize>> {
        self.ranges
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, r)| *r)
            .collect()
    }

    pub fn url(&self, name: &str) -> String {
        format!("{}/img/{name}", self.base)
    }

    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// GET requests for `name` so far.
    pub fn hits(&self, name: &str) -> usize {
        self.hits.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

/// `Range: bytes=N-` (the only form bicsi sends).
fn range_start(headers: &HeaderMap) -> Option<usize> {
    let v = headers.get(header::RANGE)?.to_str().ok()?;
    v.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok()
}

async fn serve(
    State(s): State<Shared>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let found = s.files.lock().unwrap().get(&name).cloned();
    // `Range: bytes=0-N`: the head CreateVolume reads for the image's size. It is not a
    // download, so it is neither a hit nor in the log of ranges.
    let head_end = headers.get(header::RANGE).and_then(|v| {
        v.to_str()
            .ok()?
            .strip_prefix("bytes=0-")?
            .parse::<usize>()
            .ok()
    });
    if let (Some(end), Some((bytes, etag))) = (head_end, &found) {
        let end = end.min(bytes.len().saturating_sub(1));
        return (
            StatusCode::PARTIAL_CONTENT,
            [
                (
                    header::CONTENT_RANGE,
                    format!("bytes 0-{end}/{}", bytes.len()),
                ),
                (header::ETAG, etag.clone()),
            ],
            bytes.slice(0..=end),
        )
            .into_response();
    }
    *s.hits.lock().unwrap().entry(name.clone()).or_default() += 1;
    s.ranges
        .lock()
        .unwrap()
        .push((name.clone(), range_start(&headers)));
    let Some((bytes, etag)) = found else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .is_none_or(|v| v.as_bytes() == etag.as_bytes());
    let start = range_start(&headers)
        .filter(|s| *s < bytes.len() && if_range_ok)
        .unwrap_or(0);
    let len = bytes.len();
    let rate = s.rate.clone();
    let body = futures::stream::unfold(start, move |at| {
        let (bytes, rate) = (bytes.clone(), rate.clone());
        async move {
            if at >= bytes.len() {
                return None;
            }
            let end = (at + CHUNK).min(bytes.len());
            if let Some(d) = pause(&rate, end - at) {
                tokio::time::sleep(d).await;
            }
            Some((Ok::<_, std::io::Error>(bytes.slice(at..end)), end))
        }
    });
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, "bytes".parse().unwrap());
    h.insert(header::ETAG, etag.parse().unwrap());
    h.insert(header::CONTENT_LENGTH, (len - start).into());
    if start > 0 {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        resp.headers_mut().insert(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", len - 1).parse().unwrap(),
        );
    }
    resp
}

/// What the proxy's side of an upstream connection may hold unread. A router holds little;
/// without a bound the kernel grows the buffer up to `net.ipv4.tcp_rmem`'s maximum (32 MiB on
/// the CI machines), so a whole 16 MiB transfer could sit in it and still reach the receiver at
/// the throttled rate after a `kill -9` of the sender, which then never looks cut (seen: the
/// sender-kill test waited 30 s for a failure that could not come).
const UPSTREAM_RCVBUF: u32 = 128 << 10;

async fn connect_bounded(port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    // Set before connect, so the window the sender sees never grows past it.
    socket.set_recv_buffer_size(UPSTREAM_RCVBUF)?;
    socket
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await
}

/// A TCP proxy on a port of its own on 127.0.0.1 to `127.0.0.1:PORT`; answers flow at
/// [`Proxy::rate`]. Node agents advertise the proxy's URL (`--advertise-*-url`).
pub struct Proxy {
    pub rate: Rate,
    /// The port the proxy listens on.
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(port: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap_or_else(|e| panic!("bind a proxy for 127.0.0.1:{port}: {e}"));
        let listen_port = listener.local_addr().unwrap().port();
        let rate: Rate = Arc::new(AtomicU64::new(0));
        let r = rate.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let r = r.clone();
                tokio::spawn(async move {
                    let Ok(upstream) = connect_bounded(port).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut ur, mut uw) = upstream.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut uw).await;
                        let _ = uw.shutdown().await;
                    });
                    let mut buf = vec![0u8; CHUNK / 4];
                    loop {
                        let n = match ur.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if let Some(d) = pause(&r, n) {
                            tokio::time::sleep(d).await;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = cw.shutdown().await;
                    up.abort();
                });
            }
        });
        Proxy {
            rate,
            port: listen_port,
            task,
        }
    }

    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
