//! Tests of the sync module through its public API, on real files: same-node copies (ext4 here,
//! XFS with reflink on a loop mount as root), cross-node transfers through a real axum server on
//! loopback, and qcow2 images made by qemu-img. Also the benchmark, run only when asked
//! (`BICSI_SYNC_BENCH=1`).
//!
//! Tests assert what a user would check (SHA-512 of the bytes, allocated blocks, error variants
//! and messages, no file left behind) and never time anything.

use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::routing::get;
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha512};

use crate::kit::{have_tool, is_root, may_run};

use super::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Fills `buf` with pseudo-random bytes (xorshift), different for each `seed`.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// A `size`-byte file at `path` with pseudo-random data at each `(offset, len)` and holes
/// elsewhere, synced.
fn make_sparse(path: &Path, size: u64, data: &[(u64, u64)]) {
    let file = File::create_new(path).unwrap();
    file.set_len(size).unwrap();
    let mut buf = vec![0u8; 4 * MIB as usize];
    for (i, &(offset, len)) in data.iter().enumerate() {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            fill(&mut buf[..n], (i as u64 + 1) * 1_000_003 + done);
            file.write_all_at(&buf[..n], offset + done).unwrap();
            done += n as u64;
        }
    }
    file.sync_all().unwrap();
}

/// SHA-512 of every byte of the file, read the plain way (holes read as zeros).
fn full_sha512(path: &Path) -> String {
    let mut file = File::open(path).unwrap();
    let mut hasher = Sha512::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hex::encode(hasher.finalize())
}

fn data_len(path: &Path) -> u64 {
    data_extents(&File::open(path).unwrap())
        .unwrap()
        .iter()
        .map(|e| e.len)
        .sum()
}

fn size_of(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where a test file's data is: `(offset, len)` runs.
type Layout = &'static [(u64, u64)];

/// 64 MiB with about 8 MiB of data in a few extents, some not block aligned, ending in a hole.
const SPARSE_64: Layout = &[
    (0, MIB),
    (5 * MIB + 12_345, 3 * MIB),
    (20 * MIB, 2 * MIB),
    (40 * MIB + 4096, MIB + 4096),
    (60 * MIB + 100, MIB - 200),
];

// ---- same node ----

#[test]
fn sha512_sparse_matches_a_full_read() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, u64, Layout)] = &[
        ("empty", 0, &[]),
        ("holes only", 3 * MIB + 7, &[]),
        ("dense", 2 * MIB + 3, &[(0, 2 * MIB + 3)]),
        ("data at the end", 9 * MIB + 1, &[(9 * MIB - 10, 11)]),
        ("sparse 64 MiB", 64 * MIB, SPARSE_64),
    ];
    for &(name, size, data) in cases {
        let path = dir.path().join(name);
        make_sparse(&path, size, data);
        assert_eq!(sha512_sparse(&path).unwrap(), full_sha512(&path), "{name}");
    }
    let empty = concat!(
        "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce",
        "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"
    );
    assert_eq!(sha512_sparse(&dir.path().join("empty")).unwrap(), empty);
    match sha512_sparse(&dir.path().join("missing")) {
        Err(SyncError::Io { context, .. }) => assert!(context.contains("missing"), "{context}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn local_copy_on_ext4_copies_data_extents_and_keeps_holes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    make_sparse(&src, 64 * MIB, SPARSE_64);

    let outcome = local_copy(&src, &dst).unwrap();
    assert_eq!(outcome.method, CopyMethod::SparseCopy);
    assert_eq!(outcome.bytes_copied, data_len(&src));
    assert!(outcome.bytes_copied < 9 * MIB, "{outcome:?}");
    assert_eq!(size_of(&dst), 64 * MIB);
    let want = full_sha512(&src);
    assert_eq!(full_sha512(&dst), want);
    assert_eq!(sha512_sparse(&dst).unwrap(), want);
    let (a_src, a_dst) = (
        allocated_bytes(&src).unwrap(),
        allocated_bytes(&dst).unwrap(),
    );
    assert!(a_dst <= a_src + MIB, "dst allocates {a_dst}, src {a_src}");
    assert!(a_dst < 10 * MIB, "holes filled: {a_dst} allocated");
}

use crate::os::pagecache::cached_bytes;

/// A rebuild compares the copy with its source right after `local_copy_keeping_cache`: the
/// copy's pages must still be cached then (its writeback used to drop them window by window,
/// so the compare read the whole copy back from the disk), while `local_copy` drops them.
#[test]
fn local_copy_keeping_cache_leaves_the_copy_in_the_page_cache() {
    // Not /tmp: on a tmpfs the page cache is the storage and nothing is ever dropped.
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = dir.path().join("src");
    let len = 64 * MIB; // four writeback windows
    make_sparse(&src, len, &[(0, len)]);
    let (kept, dropped) = (dir.path().join("kept"), dir.path().join("dropped"));
    assert_eq!(
        local_copy_keeping_cache(&src, &kept).unwrap().method,
        CopyMethod::SparseCopy
    );
    assert_eq!(
        local_copy(&src, &dropped).unwrap().method,
        CopyMethod::SparseCopy
    );
    let (k, d) = (cached_bytes(&kept), cached_bytes(&dropped));
    assert!(
        k >= len * 9 / 10,
        "the kept copy has {k} of {len} bytes cached"
    );
    assert!(
        d <= len / 10,
        "the dropped copy has {d} of {len} bytes cached"
    );
    drop_cache(&kept);
    assert!(cached_bytes(&kept) <= len / 10, "drop_cache left the pages");
}

/// A rebuild's verification takes byte identity (same bytes, same holes) as identity and asks
/// qemu-img otherwise: a sparse copy is byte-identical; a changed byte, a different length or
/// zeros written where the other has a hole are not (the last is the same content, left to
/// qemu-img compare).
#[test]
fn byte_identical_holds_for_a_sparse_copy_and_nothing_else() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = dir.path().join("src");
    make_sparse(&src, 64 * MIB, SPARSE_64);
    let copy = dir.path().join("copy");
    local_copy(&src, &copy).unwrap();
    assert!(byte_identical(&src, &copy).unwrap());

    let changed = dir.path().join("changed");
    local_copy(&src, &changed).unwrap();
    let (offset, _) = SPARSE_64[SPARSE_64.len() - 1];
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&changed)
        .unwrap();
    let mut byte = [0u8; 1];
    File::open(&src)
        .unwrap()
        .read_exact_at(&mut byte, offset + 7)
        .unwrap();
    f.write_all_at(&[byte[0] ^ 0xff], offset + 7).unwrap();
    assert!(!byte_identical(&src, &changed).unwrap());

    let longer = dir.path().join("longer");
    local_copy(&src, &longer).unwrap();
    File::options()
        .write(true)
        .open(&longer)
        .unwrap()
        .set_len(65 * MIB)
        .unwrap();
    assert!(!byte_identical(&src, &longer).unwrap());

    // Zeros written into a hole: the same content, other extents.
    let filled = dir.path().join("filled");
    local_copy(&src, &filled).unwrap();
    let hole = (0..64)
        .map(|i| i * MIB)
        .find(|o| SPARSE_64.iter().all(|&(d, l)| o + MIB <= d || *o >= d + l))
        .unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&filled)
        .unwrap();
    f.write_all_at(&vec![0u8; MIB as usize], hole).unwrap();
    f.sync_all().unwrap();
    assert!(!byte_identical(&src, &filled).unwrap());
}

#[test]
fn local_copy_of_empty_and_hole_only_files() {
    let dir = tempfile::tempdir().unwrap();
    for (name, size) in [("empty", 0), ("holes", 100 * MIB + 1)] {
        let src = dir.path().join(name);
        let dst = dir.path().join(format!("{name}.copy"));
        make_sparse(&src, size, &[]);
        let outcome = local_copy(&src, &dst).unwrap();
        assert_eq!(outcome.bytes_copied, 0, "{name}");
        assert_eq!(size_of(&dst), size, "{name}");
        assert_eq!(full_sha512(&dst), full_sha512(&src), "{name}");
        assert!(allocated_bytes(&dst).unwrap() < MIB, "{name}");
    }
}

#[test]
fn local_copy_refuses_an_existing_destination_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    make_sparse(&src, MIB, &[(0, 4096)]);
    std::fs::write(&dst, b"someone else's file").unwrap();
    let err = local_copy(&src, &dst).unwrap_err();
    match &err {
        SyncError::Io { context, source } => {
            assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists);
            assert!(context.contains("must not exist"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_retryable());
    assert_eq!(std::fs::read(&dst).unwrap(), b"someone else's file");
}

#[test]
fn local_copy_of_a_missing_source_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("dst");
    let err = local_copy(&dir.path().join("nope"), &dst).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    assert!(!dst.exists());
    // A missing parent directory is an error too, and leaves nothing.
    make_sparse(&dir.path().join("src"), MIB, &[(0, 10)]);
    let deep = dir.path().join("no/such/dir/dst");
    assert!(local_copy(&dir.path().join("src"), &deep).is_err());
    assert!(!deep.exists());
}

/// An XFS filesystem with reflink in a file, loop-mounted in a temp dir; unmounted on drop,
/// whatever the test did.
struct XfsMount {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl XfsMount {
    fn new(size: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("xfs.img");
        File::create_new(&image).unwrap().set_len(size).unwrap();
        run(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&image));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mut this = XfsMount {
            dir,
            mounted: false,
        };
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt));
        this.mounted = true;
        this
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn free_bytes(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.path()).unwrap();
        st.blocks_free() * st.fragment_size()
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        if self.mounted {
            let out = Command::new("umount").arg(self.path()).output();
            if !out.is_ok_and(|o| o.status.success()) {
                // Busy (a test failed with a file open): detach lazily rather than leak it.
                let _ = Command::new("umount").arg("-l").arg(self.path()).status();
            }
        }
    }
}

#[test]
fn local_copy_reflinks_on_xfs_and_falls_back_across_filesystems() {
    if !may_run(is_root(), "reflink test needs root to loop-mount XFS")
        || !may_run(have_tool("mkfs.xfs"), "mkfs.xfs is not installed")
    {
        return;
    }
    let xfs = XfsMount::new(512 * MIB);
    let src = xfs.path().join("src");
    let dst = xfs.path().join("dst");
    make_sparse(&src, 64 * MIB, &[(0, 64 * MIB)]);
    let want = full_sha512(&src);

    let free_before = xfs.free_bytes();
    let outcome = local_copy(&src, &dst).unwrap();
    assert_eq!(
        outcome,
        CopyOutcome {
            method: CopyMethod::Reflink,
            bytes_copied: 0
        }
    );
    assert_eq!(full_sha512(&dst), want);
    assert_eq!(sha512_sparse(&dst).unwrap(), want);
    // Shared blocks: the copy took (almost) no space.
    let used = free_before.saturating_sub(xfs.free_bytes());
    assert!(used < 8 * MIB, "reflink used {used} bytes");

    // XFS → ext4: FICLONE says EXDEV, and so may copy_file_range; the copy still happens.
    let other = tempfile::tempdir().unwrap();
    let across = other.path().join("across");
    let outcome = local_copy(&src, &across).unwrap();
    assert_eq!(outcome.method, CopyMethod::SparseCopy);
    assert_eq!(outcome.bytes_copied, 64 * MIB);
    assert_eq!(full_sha512(&across), want);
}

// ---- cross node ----

/// Where the test routes serve `file`'s manifest from (404 while it does not exist).
fn manifest_file(file: &Path) -> PathBuf {
    file.with_extension("manifest")
}

/// The test routes, all serving `file` (or a corruption of its stream), and its manifest.
fn routes(file: PathBuf) -> Router {
    Router::new()
        .route(
            "/file/manifest",
            get(|State(p): State<PathBuf>| async move {
                std::fs::read(manifest_file(&p))
                    .map(Body::from)
                    .map_err(|_| axum::http::StatusCode::NOT_FOUND)
            }),
        )
        .route(
            "/file",
            get(|State(p): State<PathBuf>| async move { Body::from_stream(extent_stream(p)) }),
        )
        .route(
            "/flip",
            get(|State(p): State<PathBuf>| async move {
                // One byte inside the first record's payload (header 16 + record header 16).
                const AT: u64 = 32 + 1000;
                let mut pos = 0u64;
                Body::from_stream(extent_stream(p).map(move |item| {
                    item.map(|b| {
                        let start = pos;
                        pos += b.len() as u64;
                        if (start..pos).contains(&AT) {
                            let mut v = b.to_vec();
                            v[(AT - start) as usize] ^= 0x01;
                            Bytes::from(v)
                        } else {
                            b
                        }
                    })
                }))
            }),
        )
        .route(
            "/cut",
            get(|State(p): State<PathBuf>| async move {
                let half = data_len(&p) / 2;
                let mut sent = 0u64;
                Body::from_stream(extent_stream(p).take_while(move |item| {
                    let keep = sent < half;
                    if let Ok(b) = item {
                        sent += b.len() as u64;
                    }
                    std::future::ready(keep)
                }))
            }),
        )
        .route(
            "/abort",
            get(|State(p): State<PathBuf>| async move {
                let half = data_len(&p) / 2;
                let mut sent = 0u64;
                Body::from_stream(extent_stream(p).map(move |item| {
                    let b = item?;
                    sent += b.len() as u64;
                    if sent > half {
                        return Err(std::io::Error::other("sender failed half-way"));
                    }
                    Ok(b)
                }))
            }),
        )
        .route(
            "/stall",
            get(|State(p): State<PathBuf>| async move {
                Body::from_stream(extent_stream(p).take(1).chain(futures::stream::pending()))
            }),
        )
        .route("/html", get(|| async { "<html>not a stream</html>" }))
        .with_state(file)
}

/// Serves `router` on 127.0.0.1 (never another address); returns its base URL. The server
/// stops with the test's runtime.
async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

/// Records every progress report.
#[derive(Default)]
struct Recorder(Mutex<Vec<(u64, Option<u64>)>>);

impl ProgressSink for Recorder {
    fn progress(&self, done: u64, total: Option<u64>) {
        self.0.lock().unwrap().push((done, total));
    }
}

const IDLE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_gets_identical_content_with_only_data_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    make_sparse(&src, 64 * MIB, SPARSE_64);
    let want = full_sha512(&src);
    let base = serve(routes(src.clone())).await;
    let dest = dir.path().join("dest");

    let progress = Recorder::default();
    let got = receive(&format!("{base}/file"), &dest, &want, IDLE, &progress)
        .await
        .unwrap();

    assert_eq!(got.size, 64 * MIB);
    assert_eq!(got.sha512, want);
    assert_eq!(full_sha512(&dest), want);
    let data = data_len(&src);
    assert!((8 * MIB..9 * MIB).contains(&data), "{data}");
    assert_eq!(got.data_bytes, data);
    assert!(got.bytes_on_wire >= data);
    assert!(
        got.bytes_on_wire <= data + data / 100 + 4 * KIB,
        "{} bytes on the wire for {data} bytes of data",
        got.bytes_on_wire
    );
    let (a_src, a_dest) = (
        allocated_bytes(&src).unwrap(),
        allocated_bytes(&dest).unwrap(),
    );
    assert!(
        a_dest <= a_src + MIB,
        "dest allocates {a_dest}, src {a_src}"
    );
    let reports = progress.0.into_inner().unwrap();
    assert_eq!(reports.last(), Some(&(64 * MIB, Some(64 * MIB))));
    assert!(reports.windows(2).all(|w| w[0].0 <= w[1].0), "{reports:?}");

    // The expected checksum may come in upper case.
    let dest2 = dir.path().join("dest2");
    let url = format!("{base}/file");
    receive(&url, &dest2, &want.to_uppercase(), IDLE, &NoProgress)
        .await
        .unwrap();
    assert_eq!(sha512_sparse(&dest2).unwrap(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_of_empty_and_hole_only_files() {
    let dir = tempfile::tempdir().unwrap();
    for (name, size) in [("empty", 0), ("holes", 33 * MIB + 5)] {
        let src = dir.path().join(name);
        make_sparse(&src, size, &[]);
        let want = full_sha512(&src);
        let base = serve(routes(src.clone())).await;
        let dest = dir.path().join(format!("{name}.received"));
        let got = receive(&format!("{base}/file"), &dest, &want, IDLE, &NoProgress)
            .await
            .unwrap();
        assert_eq!((got.size, got.data_bytes), (size, 0), "{name}");
        assert_eq!(got.bytes_on_wire, 32, "{name}");
        assert_eq!(size_of(&dest), size, "{name}");
        assert_eq!(full_sha512(&dest), want, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_of_a_corrupted_stream_is_a_checksum_mismatch_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    make_sparse(&src, 64 * MIB, SPARSE_64);
    let want = full_sha512(&src);
    let base = serve(routes(src)).await;
    let dest = dir.path().join("dest");

    let err = receive(&format!("{base}/flip"), &dest, &want, IDLE, &NoProgress)
        .await
        .unwrap_err();
    let SyncError::ChecksumMismatch { expected, got } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(expected, &want);
    assert_ne!(got, &want);
    let msg = err.to_string();
    assert!(msg.contains(&want) && msg.contains(got.as_str()), "{msg}");
    assert!(msg.contains("corrupt") && msg.contains("retried"), "{msg}");
    assert!(err.is_retryable());
    assert!(!dest.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_of_a_cut_stream_is_truncated_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    make_sparse(&src, 64 * MIB, SPARSE_64);
    let want = full_sha512(&src);
    let base = serve(routes(src)).await;
    // Ended cleanly half-way, and aborted half-way by a failing sender.
    for route in ["cut", "abort"] {
        let dest = dir.path().join(route);
        let err = receive(&format!("{base}/{route}"), &dest, &want, IDLE, &NoProgress)
            .await
            .unwrap_err();
        assert!(matches!(err, SyncError::Truncated(_)), "{route}: {err:?}");
        assert!(err.to_string().contains("truncated transfer"), "{err}");
        assert!(err.is_retryable());
        assert!(!dest.exists(), "{route}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_reports_http_errors_bad_streams_and_unreachable_senders() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    make_sparse(&src, MIB, &[(0, 4096)]);
    let want = full_sha512(&src);
    let base = serve(routes(src)).await;
    let dest = dir.path().join("dest");

    let url = format!("{base}/missing");
    let err = receive(&url, &dest, &want, IDLE, &NoProgress)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SyncError::Http { url: u, status: 404 } if *u == url),
        "{err:?}"
    );
    assert!(err.to_string().contains(&url), "{err}");
    assert!(!err.is_retryable());
    assert!(!dest.exists());

    let err = receive(&format!("{base}/html"), &dest, &want, IDLE, &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Protocol(_)), "{err:?}");
    assert!(
        err.to_string().contains("not a bicsi extent stream"),
        "{err}"
    );
    assert!(!dest.exists());

    // A port nobody listens on (bound, then released).
    let addr = format!("127.0.0.1:{}", crate::kit::free_port());
    let err = receive(
        &format!("http://{addr}/file"),
        &dest,
        &want,
        IDLE,
        &NoProgress,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SyncError::Connect(_)), "{err:?}");
    assert!(err.is_retryable());
    assert!(!dest.exists());

    let err = receive("ftp://127.0.0.1/x", &dest, &want, IDLE, &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::InvalidUrl(_)), "{err:?}");
    assert!(!dest.exists());

    for bad in ["", "abc", &want[..127], &format!("{}g", &want[..127])] {
        let err = receive(&format!("{base}/file"), &dest, bad, IDLE, &NoProgress)
            .await
            .unwrap_err();
        assert!(matches!(err, SyncError::InvalidChecksum(_)), "{err:?}");
        assert!(!err.is_retryable());
        assert!(!dest.exists());
    }

    // Credentials and query never show.
    let err = receive(
        &format!("http://user:secret@{addr}/file?token=hush"),
        &dest,
        &want,
        IDLE,
        &NoProgress,
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(!msg.contains("secret") && !msg.contains("hush"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_from_a_stalled_sender_times_out_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    make_sparse(&src, 64 * MIB, SPARSE_64);
    let want = full_sha512(&src);
    let base = serve(routes(src)).await;
    let dest = dir.path().join("dest");
    let url = format!("{base}/stall");
    let err = receive(&url, &dest, &want, Duration::from_secs(1), &NoProgress)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SyncError::IdleTimeout { url: u, idle } if *u == url && idle.as_secs() == 1),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(!dest.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_image_survives_local_copy_and_receive_bit_identical() {
    if !may_run(have_tool("qemu-img"), "qemu-img is not installed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    make_sparse(
        &raw,
        256 * MIB,
        &[(0, 64 * KIB), (100 * MIB + 4096, 192 * KIB)],
    );
    let image = dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&image));
    let want = full_sha512(&image);
    assert_eq!(sha512_sparse(&image).unwrap(), want);

    let copied = dir.path().join("copied.qcow2");
    local_copy(&image, &copied).unwrap();
    assert_eq!(full_sha512(&copied), want);

    let base = serve(routes(image.clone())).await;
    let received = dir.path().join("received.qcow2");
    let got = receive(&format!("{base}/file"), &received, &want, IDLE, &NoProgress)
        .await
        .unwrap();
    assert_eq!(got.sha512, want);
    assert_eq!(full_sha512(&received), want);

    // And qemu still reads the same guest content through each copy.
    for copy in [&copied, &received] {
        run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&raw)
            .arg(copy));
    }
}

// ---- cross node, with a manifest ----

/// A 64 MiB sparse source served with its manifest written beside it, as a ready file has it.
async fn with_manifest(dir: &Path) -> (PathBuf, String, Manifest, String) {
    let src = dir.join("src");
    make_sparse(&src, 64 * MIB, SPARSE_64);
    let (want, manifest) = hash_sparse(&src).unwrap();
    assert_eq!(want, full_sha512(&src));
    std::fs::write(manifest_file(&src), manifest.to_bytes()).unwrap();
    let base = serve(routes(src.clone())).await;
    (src, want, manifest, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_with_a_manifest_checks_chunks_and_gives_the_same_file_and_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let (src, want, manifest, base) = with_manifest(dir.path()).await;
    // Most of SPARSE_64's chunks are holes: those are not hashed at all.
    let zero = manifest
        .chunks
        .iter()
        .filter(|c| **c == manifest::Chunk::Zero)
        .count();
    assert!(zero > 40 && zero < 64, "{zero} zero chunks of 64");

    let dest = dir.path().join("dest");
    let progress = Recorder::default();
    let got = receive_with_manifest(
        &format!("{base}/file"),
        &format!("{base}/file/manifest"),
        &dest,
        &want.to_uppercase(),
        IDLE,
        &progress,
    )
    .await
    .unwrap();
    assert_eq!(got.verified, Verified::Manifest);
    assert_eq!((got.size, got.sha512.as_str()), (64 * MIB, want.as_str()));
    assert_eq!(got.manifest, manifest);
    assert_eq!(got.manifest_bytes, manifest.to_bytes().len() as u64);
    assert_eq!(full_sha512(&dest), want);
    assert_eq!(got.data_bytes, data_len(&src));
    assert!(got.bytes_on_wire + got.manifest_bytes <= got.data_bytes + got.data_bytes / 100);
    let reports = progress.0.into_inner().unwrap();
    assert_eq!(reports.last(), Some(&(64 * MIB, Some(64 * MIB))));

    // The whole-SHA-512 receive of the same content builds the very same manifest.
    let dest2 = dir.path().join("dest2");
    let full = receive(&format!("{base}/file"), &dest2, &want, IDLE, &NoProgress)
        .await
        .unwrap();
    assert!(matches!(full.verified, Verified::Sha512 { .. }));
    assert_eq!(full.manifest, manifest);
    assert_eq!(full.manifest_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_changed_in_the_senders_file_after_its_manifest_fails_that_chunk_and_leaves_nothing()
{
    let dir = tempfile::tempdir().unwrap();
    let (src, want, _, base) = with_manifest(dir.path()).await;
    let file = File::options().write(true).open(&src).unwrap();
    // Rot inside a data run, then data written where the manifest says the chunk is zeros.
    for (at, expected) in [
        (5 * MIB + 20_000, "expected sha256"),
        (2 * MIB + 12_345, "expected zeros"),
    ] {
        let mut b = [0u8; 1];
        File::open(&src).unwrap().read_exact_at(&mut b, at).unwrap();
        file.write_all_at(&[b[0] ^ 0x20], at).unwrap();
        let dest = dir.path().join("dest");
        let err = receive_with_manifest(
            &format!("{base}/file"),
            &format!("{base}/file/manifest"),
            &dest,
            &want,
            IDLE,
            &NoProgress,
        )
        .await
        .unwrap_err();
        let chunk = at / manifest::CHUNK_SIZE * manifest::CHUNK_SIZE;
        match &err {
            SyncError::ChunkMismatch {
                offset,
                len,
                detail,
                dest: d,
            } => {
                assert_eq!((*offset, *len), (chunk, manifest::CHUNK_SIZE), "{err}");
                assert!(detail.contains(expected), "{err}");
                assert_eq!(d, &dest.display().to_string());
            }
            other => panic!("{other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&format!("chunk at offset {chunk}")), "{msg}");
        assert!(err.is_retryable());
        assert!(!dest.exists(), "no file left after a bad chunk");
        // Put the byte back for the next case.
        file.write_all_at(&b, at).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_corrupt_or_foreign_manifest_falls_back_to_the_whole_sha512() {
    let dir = tempfile::tempdir().unwrap();
    let (src, want, manifest, base) = with_manifest(dir.path()).await;
    let (file, manifest_url) = (format!("{base}/file"), format!("{base}/file/manifest"));
    let get = |stream: String, dest: PathBuf| {
        let (manifest_url, want) = (manifest_url.clone(), want.clone());
        async move {
            receive_with_manifest(&stream, &manifest_url, &dest, &want, IDLE, &NoProgress).await
        }
    };
    let fallback = |got: &ReceiveOutcome, why: &str| match &got.verified {
        Verified::Sha512 { why: w } => assert!(w.contains(why), "{w}"),
        other => panic!("{other:?}"),
    };

    // The stream corrupted on the way: a good manifest names the chunk.
    let dest = dir.path().join("flip");
    let err = get(format!("{base}/flip"), dest.clone()).await.unwrap_err();
    assert!(
        matches!(err, SyncError::ChunkMismatch { offset: 0, .. }),
        "{err:?}"
    );
    assert!(!dest.exists());

    // A manifest that rotted: its seal breaks, the whole SHA-512 is checked instead, and the
    // received file's manifest is built from the bytes that matched.
    let good = manifest.to_bytes();
    let mut rotten = good.clone();
    let at = rotten.len() / 2;
    rotten[at] ^= 0x01;
    std::fs::write(manifest_file(&src), &rotten).unwrap();
    let got = get(file.clone(), dir.path().join("rotten")).await.unwrap();
    fallback(&got, "seal");
    assert_eq!(got.manifest, manifest);
    assert_eq!(full_sha512(&dir.path().join("rotten")), want);
    // ... and the corrupted stream is still caught, by the SHA-512.
    let dest = dir.path().join("flip2");
    let err = get(format!("{base}/flip"), dest.clone()).await.unwrap_err();
    assert!(matches!(err, SyncError::ChecksumMismatch { .. }), "{err:?}");
    assert!(!dest.exists());

    // A well-sealed manifest of other content (another SHA-512) is not used.
    let mut other = manifest.clone();
    other.sha512 = "ab".repeat(64);
    std::fs::write(manifest_file(&src), other.to_bytes()).unwrap();
    let got = get(file.clone(), dir.path().join("other")).await.unwrap();
    fallback(&got, "not the expected");

    // A well-sealed manifest naming the right SHA-512 but other chunks: the chunk is caught.
    let mut forged = manifest.clone();
    forged.chunks[5] = manifest::Chunk::Sha256([7; 32]);
    std::fs::write(manifest_file(&src), forged.to_bytes()).unwrap();
    let dest = dir.path().join("forged");
    let err = get(file.clone(), dest.clone()).await.unwrap_err();
    assert!(
        matches!(err, SyncError::ChunkMismatch { offset, .. } if offset == 5 * MIB),
        "{err:?}"
    );
    assert!(!dest.exists());

    // No manifest at all (an older sender): the whole SHA-512, as before.
    std::fs::remove_file(manifest_file(&src)).unwrap();
    let got = get(file.clone(), dir.path().join("none")).await.unwrap();
    fallback(&got, "HTTP 404");
    assert_eq!(got.manifest, manifest);
    assert_eq!(got.manifest_bytes, 0);
    assert_eq!(full_sha512(&dir.path().join("none")), want);
}

// ---- benchmark ----

/// `BICSI_SYNC_BENCH=1 cargo test --release bench_sync -- --nocapture`: a 1 GiB file with 25%
/// data in 64 extents; `local_copy` against `cp --sparse=always` (with and without an fsync
/// of the copy, as `local_copy` syncs), and `receive` over loopback against `curl -o /dev/null`
/// of the same stream. The source's page cache is dropped before every run, so all read it
/// from disk.
#[test]
fn bench_sync_1gib() {
    if std::env::var("BICSI_SYNC_BENCH").as_deref() != Ok("1") {
        eprintln!("skipping: set BICSI_SYNC_BENCH=1 to run the sync benchmark");
        return;
    }
    const RUNS: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let data: Vec<(u64, u64)> = (0..64u64)
        .map(|i| (i * 16 * MIB + (i % 4) * 3 * MIB, 4 * MIB))
        .collect();
    make_sparse(&src, 1 << 30, &data);
    let want = sha512_sparse(&src).unwrap();
    let dst = dir.path().join("dst");
    let cold = || {
        let f = File::open(&src).unwrap();
        nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        let _ = std::fs::remove_file(&dst);
    };
    let time = |f: &mut dyn FnMut()| {
        let mut runs: Vec<f64> = (0..RUNS)
            .map(|_| {
                cold();
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect();
        runs.sort_by(f64::total_cmp);
        (runs[RUNS / 2], runs[0], runs[RUNS - 1])
    };
    let show = |name: &str, (med, min, max): (f64, f64, f64)| {
        println!("  {name:<40} median {med:6.3} s  (min {min:.3}, max {max:.3})");
        med
    };
    println!("sync benchmark: 1 GiB file, 256 MiB of data in 64 extents, {RUNS} runs, source cold");

    let hash = show(
        "sha512_sparse (hash bound)",
        time(&mut || assert_eq!(sha512_sparse(&src).unwrap(), want)),
    );
    let ours = show(
        "local_copy (copy_file_range + fsync)",
        time(&mut || {
            let o = local_copy(&src, &dst).unwrap();
            assert_eq!(o.method, CopyMethod::SparseCopy);
        }),
    );
    let cp = show(
        "cp --sparse=always",
        time(&mut || {
            run(Command::new("cp")
                .arg("--sparse=always")
                .arg(&src)
                .arg(&dst))
        }),
    );
    let cp_sync = show(
        "cp --sparse=always && sync FILE",
        time(&mut || {
            run(Command::new("cp")
                .arg("--sparse=always")
                .arg(&src)
                .arg(&dst));
            run(Command::new("sync").arg(&dst));
        }),
    );
    println!(
        "  local_copy / cp = {:.2}; local_copy / (cp + sync) = {:.2}",
        ours / cp,
        ours / cp_sync
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let base = rt.block_on(serve(routes(src.clone())));
    let url = format!("{base}/file");
    let mut on_wire = 0;
    let recv = show(
        "receive (hash + write + fdatasync)",
        time(&mut || {
            let got = rt
                .block_on(receive(&url, &dst, &want, IDLE, &NoProgress))
                .unwrap();
            on_wire = got.bytes_on_wire;
        }),
    );
    let curl = show(
        "curl -s -o /dev/null (same stream)",
        time(&mut || {
            run(Command::new("curl")
                .args(["-s", "-f", "-o", "/dev/null"])
                .arg(&url))
        }),
    );
    let curl_file = show(
        "curl -s -o FILE && sync FILE (same stream)",
        time(&mut || {
            run(Command::new("curl")
                .args(["-s", "-f", "-o"])
                .arg(&dst)
                .arg(&url));
            run(Command::new("sync").arg(&dst));
        }),
    );
    println!(
        "  receive / curl = {:.2}; receive / (curl to file + sync) = {:.2}; receive / hash \
         bound = {:.2}; {on_wire} bytes on the wire",
        recv / curl,
        recv / curl_file,
        recv / hash
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("");
    println!("  peak resident memory of the whole test process: {hwm}");
    drop(rt);
}
