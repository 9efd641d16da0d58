//! The image and its file server: the random and sparse images generated on disk and the
//! in-process HTTP server (axum, 1 MiB chunks, Content-Length and Range) that serves them to
//! bicsi and to the references.

use super::*;

/// Writes `len` bytes of /dev/urandom to `path` in 1 MiB blocks, hashing them on another thread,
/// then syncs the file (its pages stay cached: both sides read it warm).
pub(crate) async fn generate(path: PathBuf, len: u64) -> Res<Source> {
    tokio::task::spawn_blocking(move || -> Res<Source> {
        let mut rng = std::fs::File::open("/dev/urandom")?;
        let mut out = std::fs::File::create(&path)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Vec<u8>>>(4);
        let hasher = std::thread::spawn(move || {
            let mut h = Sha512::new();
            for block in rx {
                h.update(&block[..]);
            }
            hex::encode(h.finalize())
        });
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            let mut block = vec![0u8; n];
            rng.read_exact(&mut block)?;
            out.write_all(&block)?;
            let block = Arc::new(block);
            tx.send(block).map_err(|_| "hash thread stopped")?;
            left -= n as u64;
        }
        drop(tx);
        out.sync_all()?;
        let allocated = out.metadata()?.blocks() * 512;
        let sha512 = hasher.join().map_err(|_| "hash thread panicked")?;
        Ok(Source {
            path,
            len,
            sha512,
            allocated,
        })
    })
    .await?
}

/// Writes a sparse raw image of `len` bytes: 1 MiB of /dev/urandom data at every 4th MiB
/// (offsets 0, 4, 8, … MiB), holes between, so about 25% of it is allocated in extents. Hashed
/// as its logical content (holes as zeros), then synced.
pub(crate) async fn generate_sparse(path: PathBuf, len: u64) -> Res<Source> {
    tokio::task::spawn_blocking(move || -> Res<Source> {
        let mut rng = std::fs::File::open("/dev/urandom")?;
        let out = std::fs::File::create(&path)?;
        out.set_len(len)?;
        let mut h = Sha512::new();
        let zeros = vec![0u8; CHUNK];
        let mut block = vec![0u8; CHUNK];
        let (mut offset, mut i) = (0u64, 0u64);
        while offset < len {
            let n = (len - offset).min(CHUNK as u64) as usize;
            if i % 4 == 0 {
                rng.read_exact(&mut block[..n])?;
                out.write_all_at(&block[..n], offset)?;
                h.update(&block[..n]);
            } else {
                h.update(&zeros[..n]);
            }
            offset += n as u64;
            i += 1;
        }
        out.sync_all()?;
        let allocated = out.metadata()?.blocks() * 512;
        Ok(Source {
            path,
            len,
            sha512: hex::encode(h.finalize()),
            allocated,
        })
    })
    .await?
}

/// The files of the file server by URL name: path and length.
pub(crate) struct Served {
    pub(crate) files: HashMap<String, (PathBuf, u64)>,
}

/// Serves each `(name, path, len)` at `/{name}` on 127.0.0.1:0; returns the base URL.
pub(crate) async fn start_file_server(files: Vec<(String, PathBuf, u64)>) -> Res<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let files = files.into_iter().map(|(n, p, l)| (n, (p, l))).collect();
    let app = Router::new()
        .route("/{name}", get(serve_file))
        .route("/stall/{name}", get(serve_stalling))
        .with_state(Arc::new(Served { files }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("file server stopped: {e}");
        }
    });
    Ok(format!("http://{addr}"))
}

pub(crate) async fn serve_file(
    State(f): State<Arc<Served>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let Some((path, len)) = f.files.get(&name).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_range(v, len));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len),
        Some(Err(())) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response();
        }
        Some(Ok((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    // A plain thread reads ahead (up to 4 chunks) while hyper writes: the reads never wait on
    // the runtime, and the runtime never waits on a read.
    std::thread::spawn(move || {
        let send = |r| tx.blocking_send(r).is_ok();
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) => {
                send(Err(e));
                return;
            }
        };
        if let Err(e) = file.seek(SeekFrom::Start(start)) {
            send(Err(e));
            return;
        }
        let mut left = end - start;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            let mut buf = vec![0u8; n];
            if let Err(e) = file.read_exact(&mut buf) {
                send(Err(e));
                return;
            }
            left -= n as u64;
            if !send(Ok(Bytes::from(buf))) {
                return; // the client went away
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("\"bench-{name}-{len}\"")) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let range = format!("bytes {start}-{}/{len}", end - 1);
        if let Ok(v) = HeaderValue::from_str(&range) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    resp
}

/// `/stall/NAME`: a Range request is answered as `/NAME` answers it; a plain GET sends the
/// file's length and its first chunk, then nothing more, so a download stays under way.
pub(crate) async fn serve_stalling(
    State(f): State<Arc<Served>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if headers.contains_key(header::RANGE) {
        return serve_file(State(f), UrlPath(name), headers).await;
    }
    let Some((path, len)) = f.files.get(&name).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut first = vec![0u8; (CHUNK as u64).min(len) as usize];
    let read = std::fs::File::open(&path).and_then(|file| file.read_exact_at(&mut first, 0));
    if let Err(e) = read {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    let body = futures::StreamExt::chain(
        futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(first)) }),
        futures::stream::pending(),
    );
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// `bytes=A-B`, `bytes=A-`, `bytes=-N` → half-open `[start, end)`; `Err` when unsatisfiable;
/// `None` (serve the whole file) for anything else, multiple ranges included.
pub(crate) fn parse_range(v: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || len == 0 {
            return Some(Err(()));
        }
        return Some(Ok((len.saturating_sub(n), len)));
    }
    let start: u64 = a.parse().ok()?;
    let end = if b.is_empty() {
        len
    } else {
        let last: u64 = b.parse().ok()?;
        if last < start {
            return None;
        }
        (last + 1).min(len)
    };
    if start >= len {
        return Some(Err(()));
    }
    Some(Ok((start, end)))
}

/// `curl -o /dev/null` from the file server, 3 times: the median rate in bytes/s.
pub(crate) async fn curl_rate(url: &str, len: u64) -> Res<f64> {
    let mut times = Stats::default();
    for _ in 0..3 {
        let started = Instant::now();
        let out = child_command("curl")
            .args(["-sS", "--fail", "--noproxy", "*", "-o", "/dev/null", url])
            .output()
            .await?;
        if !out.status.success() {
            return Err(format!(
                "curl of the file server failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        times.push(started.elapsed());
    }
    Ok(len as f64 / times.median())
}
