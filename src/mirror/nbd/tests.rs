//! The client against a real NBD server: `qemu-nbd` (qemu-utils) on 127.0.0.1, over a raw file,
//! as qemu's replica server serves a replica; and bicsi's replica server (in this process) for
//! several connections, which it allows by advertising multi-conn.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::*;
use crate::kit::noise;

const HOST: &str = "127.0.0.1";
const MIB: u64 = 1 << 20;

/// A `qemu-nbd` serving one raw file; killed on drop.
struct Server {
    pid: i32,
    port: u16,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Serves a new `size`-byte raw file as export "r1", writable, several clients allowed.
    fn start(size: u64) -> Option<Server> {
        if Command::new("qemu-nbd").arg("--version").output().is_err() {
            println!("skipped: qemu-nbd is missing (Debian package qemu-utils)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("replica.raw");
        std::fs::File::create(&file).unwrap().set_len(size).unwrap();
        let pid_file = dir.path().join("nbd.pid");
        let port = std::net::TcpListener::bind((HOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let out = Command::new("qemu-nbd")
            .args([
                "--fork",
                "--persistent",
                "--shared=8",
                "-f",
                "raw",
                "-x",
                "r1",
            ])
            .args([
                "--bind",
                HOST,
                "--port",
                &port.to_string(),
                "--cache=writeback",
            ])
            .args(["--discard=unmap"])
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-nbd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Some(Server {
            pid,
            port,
            file,
            _dir: dir,
        })
    }

    fn connect(&self, timeout: Duration) -> NbdClient {
        NbdClient::connect(HOST, self.port, "r1", timeout).unwrap()
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid), signal).unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGCONT);
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
    }
}

fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

#[test]
fn reads_and_writes_a_qemu_nbd_export() {
    let Some(server) = Server::start(64 * MIB) else {
        return;
    };
    let c = server.connect(Duration::from_secs(5));
    assert_eq!(c.size(), 64 * MIB);
    assert!(!c.read_only());
    // Larger than one request (MAX_IO), unaligned offset.
    let data = noise(9 * MIB as usize + 123, 7);
    c.write_at(&data, 4096 + 17, false).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_at(&mut back, 4096 + 17).unwrap();
    assert!(back == data, "read back differs");
    c.write_at(&data[..4096], 0, true).unwrap();
    c.flush().unwrap();
    // What the server wrote to its file is what was sent.
    assert!(file_bytes(&server.file, 0, 4096) == data[..4096]);
    assert!(file_bytes(&server.file, 4096 + 17, 1000) == data[..1000]);
    // Zeroing, both kinds.
    c.write_zeroes(4096 + 17, MIB, true).unwrap();
    c.write_zeroes(4096 + 17 + MIB, MIB, false).unwrap();
    let mut z = vec![1u8; 2 * MIB as usize];
    c.read_at(&mut z, 4096 + 17).unwrap();
    assert!(z.iter().all(|b| *b == 0), "zeroed range reads non-zero");
    c.flush().unwrap();
    assert!(
        file_bytes(&server.file, 4096 + 17, 4096)
            .iter()
            .all(|b| *b == 0)
    );
}

#[test]
fn many_requests_in_flight_on_one_connection() {
    let Some(server) = Server::start(64 * MIB) else {
        return;
    };
    let c = Arc::new(server.connect(Duration::from_secs(10)));
    // 16 threads, each its own 4 MiB region in 4k writes, then reads them back.
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let c = c.clone();
            s.spawn(move || {
                let base = t * 4 * MIB;
                let data = noise(4 * MIB as usize, t + 1);
                for (i, chunk) in data.chunks(4096).enumerate() {
                    c.write_at(chunk, base + (i * 4096) as u64, false).unwrap();
                }
                let mut back = vec![0u8; data.len()];
                for (i, chunk) in back.chunks_mut(64 << 10).enumerate() {
                    c.read_at(chunk, base + (i * (64 << 10)) as u64).unwrap();
                }
                assert!(back == data, "thread {t}: read back differs");
            });
        }
    });
    c.flush().unwrap();
    assert!(file_bytes(&server.file, 5 * 4 * MIB, 4096) == noise(4096, 6));
}

#[test]
fn an_unknown_export_is_refused_with_its_name() {
    let Some(server) = Server::start(MIB) else {
        return;
    };
    let e = NbdClient::connect(HOST, server.port, "no-such", Duration::from_secs(5)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    let text = e.to_string();
    assert!(
        text.contains("\"no-such\"") && text.contains("replica server"),
        "{text}"
    );
    // Nothing listens: the address is named.
    drop(server);
    let free = std::net::TcpListener::bind((HOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = NbdClient::connect(HOST, free, "r1", Duration::from_secs(2)).unwrap_err();
    assert!(
        e.to_string().contains(&format!("nbd://{HOST}:{free}/r1")),
        "{e}"
    );
}

#[test]
fn a_server_killed_mid_request_fails_every_request_at_once() {
    let Some(server) = Server::start(256 * MIB) else {
        return;
    };
    let c = Arc::new(server.connect(Duration::from_secs(30)));
    let data = noise(MIB as usize, 3);
    // Writers keep 8 requests in flight until one fails.
    let failed = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8u64)
            .map(|t| {
                let (c, data) = (c.clone(), &data);
                s.spawn(move || {
                    let mut i = 0u64;
                    loop {
                        let at = ((t * 32 + i % 32) * MIB) % (256 * MIB);
                        if let Err(e) = c.write_at(data, at, false) {
                            return (Instant::now(), e);
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let killed = Instant::now();
        server.signal(Signal::SIGKILL);
        workers
            .into_iter()
            .map(|w| {
                let (at, e) = w.join().unwrap();
                (at.duration_since(killed), e)
            })
            .collect::<Vec<_>>()
    });
    for (after, e) in &failed {
        // Far below the 30 s timeout: the dropped connection fails them, not the clock.
        assert!(
            *after < Duration::from_secs(5),
            "failed {after:?} after the kill: {e}"
        );
    }
    // Later requests fail at once, naming why.
    let t = Instant::now();
    let e = c.read_at(&mut [0u8; 4096], 0).unwrap_err();
    assert!(t.elapsed() < Duration::from_millis(100));
    assert!(e.to_string().contains("connection"), "{e}");
}

#[test]
fn a_stalled_server_times_out_within_the_timeout() {
    let Some(server) = Server::start(16 * MIB) else {
        return;
    };
    let c = server.connect(Duration::from_millis(700));
    c.write_at(&noise(4096, 1), 0, false).unwrap();
    // The server stops answering without closing its connection (a hung node).
    server.signal(Signal::SIGSTOP);
    let t = Instant::now();
    let e = c.write_at(&noise(4096, 2), 4096, false).unwrap_err();
    let took = t.elapsed();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(e.to_string().contains("replica-timeout"), "{e}");
    // Dead from now on, even once the server wakes up: the replica missed a write.
    server.signal(Signal::SIGCONT);
    let e = c.read_at(&mut [0u8; 512], 0).unwrap_err();
    assert!(e.to_string().contains("did not answer"), "{e}");
}

/// bicsi's replica server in this process on a port of its own, serving a new sparse file of
/// `size` bytes as "r1".
fn bicsi_server(
    size: u64,
) -> (
    u16,
    Arc<crate::replica_server::Exports>,
    PathBuf,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("replica.raw");
    std::fs::File::create(&file).unwrap().set_len(size).unwrap();
    let listener = std::net::TcpListener::bind((HOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let exports = Arc::new(crate::replica_server::Exports::default());
    assert_eq!(exports.add("r1", &file), Ok(true));
    let e = exports.clone();
    std::thread::spawn(move || {
        crate::replica_server::serve_nbd(
            listener,
            e,
            crate::replica_server::ServerConfig::default(),
        )
    });
    (port, exports, file, dir)
}

#[test]
fn several_connections_share_the_requests_and_a_flush_covers_them_all() {
    let (port, exports, file, _dir) = bicsi_server(64 * MIB);
    let c = Arc::new(
        NbdClient::connect_pool(HOST, port, "r1", Duration::from_secs(10), None, 4).unwrap(),
    );
    assert_eq!(c.connections(), 4);
    assert_eq!(exports.list()[0].clients, 4, "{:?}", exports.list());
    // One writer: each request takes the next free connection in turn, so each carries some.
    for i in 0..8u64 {
        c.write_at(&noise(4096, i + 1), i * 4096, false).unwrap();
    }
    let sent: Vec<u64> = c
        .shared
        .conns
        .iter()
        .map(|k| k.sent.load(Ordering::Relaxed))
        .collect();
    assert!(
        sent.iter().all(|&n| n >= 1),
        "requests per connection: {sent:?}"
    );
    // Many writers at once, 1 MiB each, then one FLUSH (on one connection): every write is in
    // the file, read back through the client and from the file itself.
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let c = c.clone();
            s.spawn(move || {
                c.write_at(&noise(MIB as usize, 100 + t), (t + 1) * MIB, false)
                    .unwrap()
            });
        }
    });
    c.flush().unwrap();
    for t in 0..16u64 {
        let want = noise(MIB as usize, 100 + t);
        assert!(
            file_bytes(&file, (t + 1) * MIB, MIB as usize) == want,
            "write {t} in the file"
        );
        let mut back = vec![0u8; MIB as usize];
        c.read_at(&mut back, (t + 1) * MIB).unwrap();
        assert!(back == want, "write {t} read back");
    }
    for i in 0..8u64 {
        assert!(file_bytes(&file, i * 4096, 4096) == noise(4096, i + 1));
    }
}

#[test]
fn one_dropped_connection_of_several_fails_the_whole_client() {
    let (port, _exports, _file, _dir) = bicsi_server(16 * MIB);
    let c = NbdClient::connect_pool(HOST, port, "r1", Duration::from_secs(30), None, 3).unwrap();
    assert_eq!(c.connections(), 3);
    c.write_at(&noise(4096, 1), 0, false).unwrap();
    // The second connection drops (as a TCP connection cut between the nodes): the client is
    // dead at once, well before the 30 s timeout, on every connection, naming why.
    c.shared.conns[1].socket.shutdown(Shutdown::Both).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.shared.dead.load(Ordering::Acquire) {
        assert!(
            Instant::now() < deadline,
            "the dropped connection went unnoticed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for i in 0..6u64 {
        let e = c.write_at(&noise(4096, 2), i * 4096, false).unwrap_err();
        assert!(e.to_string().contains("closed the connection"), "{e}");
    }
    assert!(c.flush().is_err());
}

#[test]
fn a_server_without_multi_conn_gets_one_connection() {
    let Some(server) = Server::start(16 * MIB) else {
        return;
    };
    let c =
        NbdClient::connect_pool(HOST, server.port, "r1", Duration::from_secs(10), None, 4).unwrap();
    let multi = c.flags & TFLAG_CAN_MULTI_CONN != 0;
    assert_eq!(
        c.connections(),
        if multi { 4 } else { 1 },
        "flags {:#x}",
        c.flags
    );
    c.write_at(&noise(4096, 5), 8192, false).unwrap();
    c.flush().unwrap();
    assert!(file_bytes(&server.file, 8192, 4096) == noise(4096, 5));
}

#[test]
fn a_begun_write_returns_before_its_reply_and_finish_waits_for_it() {
    let Some(server) = Server::start(16 * MIB) else {
        return;
    };
    let c = server.connect(Duration::from_millis(800));
    let p = c.begin_write(&noise(4096, 1), 0).unwrap();
    c.finish(p).unwrap();
    assert!(file_bytes(&server.file, 0, 4096) == noise(4096, 1));
    // A stopped server: the write is sent (begin returns at once), the reply never comes, and
    // finish gives up at the timeout counted from the send.
    server.signal(Signal::SIGSTOP);
    let t = Instant::now();
    let p = c.begin_write(&noise(4096, 2), 4096).unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    let e = c.finish(p).unwrap_err();
    let took = t.elapsed();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "{took:?}"
    );
    server.signal(Signal::SIGCONT);
    assert!(c.begin_flush().is_err(), "a dead client sends nothing");
}
