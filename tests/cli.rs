//! The `bicsi volume …`, `get`, `delete`, `image` and `snapshot` commands against a running
//! `bicsi serve`, as a person without Kubernetes uses them: the real binary, its exit status and
//! what it prints.

#[path = "kit/mod.rs"]
mod kit;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kit::{Proc, cleanup_under, csi_endpoint, root_or_skip, serve_args, temp_dir};

struct Served {
    dir: tempfile::TempDir,
    endpoint: String,
    /// The HTTP API, `http://127.0.0.1:PORT`.
    http: String,
    proc: Proc,
}

impl Served {
    fn start() -> Served {
        Served::start_with(&[])
    }

    /// A `bicsi serve` with extra flags (`--disk` …, paths relative to its directory).
    fn start_with(extra: &[&str]) -> Served {
        let dir = temp_dir("bicsi-cli-");
        let endpoint = csi_endpoint(dir.path());
        let mut args = serve_args(dir.path(), "cli-node", "127.0.0.1:0");
        args.extend(extra.iter().map(|a| {
            if a.starts_with("--") {
                a.to_string()
            } else {
                dir.path().join(a).display().to_string()
            }
        }));
        let mut proc = Proc::spawn(args, dir.path().join("bicsi.log"));
        // The HTTP port is the one the OS chose: read it from the "bicsi serving" log line.
        let mut http = String::new();
        let socket = dir.path().join("csi.sock");
        proc.wait_ready_blocking("bicsi", || {
            let addr = std::fs::read_to_string(dir.path().join("bicsi.log"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("bicsi serving"))
                .find_map(|l| l.split(" http=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string);
            match addr {
                Some(addr) if socket.exists() => {
                    http = format!("http://{addr}");
                    true
                }
                _ => false,
            }
        });
        Served {
            dir,
            endpoint,
            http,
            proc,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bicsi"));
        c.args(args)
            .env("BICSI_CSI_ENDPOINT", &self.endpoint)
            .env("BICSI_SERVER", &self.http)
            .env_remove("BICSI_TOKEN");
        c
    }

    fn bicsi(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs a command that must fail; answers its stderr.
    #[track_caller]
    fn fails(&self, args: &[&str]) -> String {
        kit::failed(args, self.bicsi(args))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Applies a BackingImage that downloads `url`.
    #[track_caller]
    fn apply_download(&self, name: &str, url: &str) {
        let file = self.path(&format!("{name}.yaml"));
        std::fs::write(
            &file,
            format!(
                "apiVersion: longhorn.io/v1beta2\nkind: BackingImage\nmetadata:\n  name: {name}\n  namespace: longhorn-system\nspec:\n  sourceType: download\n  sourceParameters:\n    url: {url}\n"
            ),
        )
        .unwrap();
        self.ok(&["apply", "-f", file.to_str().unwrap()]);
    }

    /// Whether the backing image has a ready file, as `get backingimage -o json` shows.
    fn image_ready(&self, name: &str) -> bool {
        let bi: serde_json::Value =
            serde_json::from_str(&self.ok(&["get", "backingimage", name, "-o", "json"])).unwrap();
        bi["status"]["diskFileStatusMap"]
            .as_object()
            .is_some_and(|m| m.values().any(|f| f["state"] == "ready"))
    }

    /// `volume create NAME --size SIZE` with one replica; answers what it printed.
    #[track_caller]
    fn create_one(&self, name: &str, size: &str) -> String {
        self.ok(&[
            "volume",
            "create",
            name,
            "--size",
            size,
            "-p",
            "numberOfReplicas=1",
        ])
    }

    /// `volume attach NAME --mount PATH`; answers what it printed.
    #[track_caller]
    fn attach_mount(&self, name: &str, path: &Path) -> String {
        self.ok(&["volume", "attach", name, "--mount", path.to_str().unwrap()])
    }

    /// `volume attach NAME --block PATH`; answers what it printed.
    #[track_caller]
    fn attach_block(&self, name: &str, path: &Path) -> String {
        self.ok(&["volume", "attach", name, "--block", path.to_str().unwrap()])
    }

    /// `volume detach NAME`; answers what it printed.
    #[track_caller]
    fn detach(&self, name: &str) -> String {
        self.ok(&["volume", "detach", name])
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        kit::succeeded(args, self.bicsi(args))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.proc.kill9();
        // Leave nothing running, mounted or attached if a test failed half-way: the engines
        // serving this test's volumes outlive a killed serve (they are daemons on purpose).
        cleanup_under(self.dir.path());
    }
}

#[test]
fn create_list_and_delete_without_attaching() {
    let s = Served::start();
    let out = s.create_one("data", "64Mi");
    assert!(out.contains("volume data created"), "{out}");
    assert!(out.contains("64Mi"), "{out}");
    let list = s.ok(&["get", "volumes"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("data ") && l.contains("64Mi")),
        "{list}"
    );

    let bad = s.bicsi(&["volume", "create", "x", "--size", "lots"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a quantity"));
    let bad = s.bicsi(&[
        "volume",
        "create",
        "x",
        "--size",
        "1Mi",
        "-p",
        "colour=blue",
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown parameter \"colour\""));

    s.ok(&["volume", "delete", "data"]);
    s.ok(&["volume", "delete", "data"]);
    assert!(!s.ok(&["get", "volumes"]).contains("data "));

    let gone = Command::new(env!("CARGO_BIN_EXE_bicsi"))
        .args([
            "get",
            "volumes",
            "--csi-endpoint",
            "unix:///nonexistent/csi.sock",
        ])
        .output()
        .unwrap();
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("is `bicsi serve` running"));
}

#[test]
fn attach_mount_and_block_then_detach() {
    if !root_or_skip("attach_mount_and_block_then_detach") {
        return;
    }
    let s = Served::start();
    let mnt = s.dir.path().join("mnt");
    s.create_one("web", "64Mi");
    let out = s.attach_mount("web", &mnt);
    assert!(out.contains("attached"), "{out}");
    std::fs::write(mnt.join("index.html"), b"<h1>hi</h1>").unwrap();
    assert!(s.ok(&["get", "volumes"]).contains("cli-node"));
    s.detach("web");
    assert!(!mnt.exists());
    s.attach_mount("web", &mnt);
    assert_eq!(
        std::fs::read(mnt.join("index.html")).unwrap(),
        b"<h1>hi</h1>"
    );
    s.detach("web");

    let dev = s.dir.path().join("raw-dev");
    s.create_one("raw", "8Mi");
    s.attach_block("raw", &dev);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&dev)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"block bytes"))
        .unwrap();
    s.detach("raw");
    s.attach_block("raw", &dev);
    let mut back = vec![0u8; 11];
    std::io::Read::read_exact(&mut std::fs::File::open(&dev).unwrap(), &mut back).unwrap();
    assert_eq!(&back, b"block bytes");
    s.detach("raw");
    s.ok(&["volume", "delete", "raw"]);
    s.ok(&["volume", "delete", "web"]);
}

/// An attach that fails on the node (mkfs.xfs refuses a 32 MiB volume) undoes itself: the
/// volume is no longer published to the node, no record is left for `detach`, and the volume
/// can be deleted at once; the error printed is the node's.
#[test]
fn a_failed_attach_undoes_itself() {
    if !root_or_skip("a_failed_attach_undoes_itself") {
        return;
    }
    let s = Served::start();
    let mnt = s.path("mnt");
    s.create_one("small", "32Mi");
    let err = s.fails(&[
        "volume",
        "attach",
        "small",
        "--mount",
        mnt.to_str().unwrap(),
        "--fs-type",
        "xfs",
    ]);
    assert!(
        err.contains("xfs needs a volume of at least 300 MiB"),
        "{err}"
    );
    assert!(err.contains("the attach was undone"), "{err}");
    assert!(!is_mounted(&mnt));
    let row = s.ok(&["get", "volume", "small"]);
    assert!(!row.contains("cli-node"), "still attached: {row}");
    assert!(!s.path("cli-attach/small.json").exists());
    // Nothing is attached any more, so detach has nothing to do (and says so).
    let out = s.detach("small");
    assert!(out.contains("is not attached; nothing to detach"), "{out}");
    // Attaching it as it can be still works, and detaching it then too.
    s.attach_mount("small", &mnt);
    s.detach("small");
    s.ok(&["volume", "delete", "small"]);
}

/// Bytes written through `--block` targets and only closed (no fsync, no O_DIRECT: what the
/// page cache holds when detach starts) are there after a detach and a re-attach, for several
/// volumes attached, written and detached at once.
#[test]
fn block_writes_without_fsync_survive_detach() {
    use sha2::{Digest, Sha512};
    if !root_or_skip("block_writes_without_fsync_survive_detach") {
        return;
    }
    let s = Served::start();
    let names: Vec<String> = (0..4).map(|i| format!("durable{i}")).collect();
    for name in &names {
        s.create_one(name, "16Mi");
    }
    std::thread::scope(|scope| {
        for (i, name) in names.iter().enumerate() {
            let s = &s;
            scope.spawn(move || {
                let dev = s.path(&format!("{name}-dev"));
                for round in 0..2u64 {
                    s.attach_block(name, &dev);
                    // Odd-sized pieces at both ends and in the middle of the device.
                    let body = kit::noise(3 << 20, 1 + i as u64 * 10 + round);
                    let mut f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
                    for off in [0u64, 6 << 20, 13 << 20] {
                        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(off)).unwrap();
                        f.write_all(&body).unwrap();
                    }
                    drop(f);
                    let want = Sha512::digest(&body);
                    s.detach(name);
                    s.attach_block(name, &dev);
                    let mut f = std::fs::File::open(&dev).unwrap();
                    for off in [0u64, 6 << 20, 13 << 20] {
                        let mut back = vec![0u8; body.len()];
                        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(off)).unwrap();
                        f.read_exact(&mut back).unwrap();
                        assert!(
                            Sha512::digest(&back) == want,
                            "volume {name}, round {round}: the {} bytes written at {off} \
                             read back different after detach and attach (first bytes {:?})",
                            body.len(),
                            &back[..16]
                        );
                    }
                    drop(f);
                    s.detach(name);
                }
            });
        }
    });
    for name in &names {
        s.ok(&["volume", "delete", name]);
    }
}

/// Writes `body` to `out` in 16 KiB pieces at `rate` bytes per second; stops when the reader
/// goes away.
fn trickle(out: &mut impl Write, body: &[u8], rate: u64) {
    for piece in body.chunks(16 * 1024) {
        if out.write_all(piece).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_nanos(
            piece.len() as u64 * 1_000_000_000 / rate,
        ));
    }
}

/// An HTTP server of one file at a fixed rate, answering `Range: bytes=A-[B]` with 206.
fn slow_file_server(body: Vec<u8>, rate: u64) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/image.raw", listener.local_addr().unwrap());
    let body = Arc::new(body);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut range = None;
                let mut head = false;
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if line.starts_with("HEAD ") {
                        head = true;
                    }
                    if let Some(r) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        let (a, b) = r.trim().split_once('-').unwrap_or(("0", ""));
                        let first: usize = a.parse().unwrap_or(0);
                        let last = b.parse().unwrap_or(body.len() - 1).min(body.len() - 1);
                        range = Some((first, last));
                    }
                    if line == "\r\n" {
                        break;
                    }
                    line.clear();
                }
                let mut conn = conn;
                let (status, part) = match range {
                    Some((a, b)) => (
                        format!(
                            "206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}",
                            body.len()
                        ),
                        &body[a..=b],
                    ),
                    None => ("200 OK".to_string(), &body[..]),
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                    part.len()
                );
                if !head {
                    trickle(&mut conn, part, rate);
                }
            });
        }
    });
    url
}

/// A TCP proxy to `upstream` (`http://HOST:PORT`) whose bytes flow at `rate` bytes per second
/// each way and, when `cut_after` is set, whose answers break off after that many bytes.
fn slow_proxy(upstream: &str, rate: u64, cut_after: Option<usize>) -> String {
    let upstream = upstream.trim_start_matches("http://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = c_in.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    trickle(&mut s_out, &buf[..n], rate);
                }
                let _ = s_out.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_in, mut c_out) = (server, client);
            std::thread::spawn(move || {
                let mut sent = 0usize;
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = s_in.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let n = cut_after.map_or(n, |cut| n.min(cut - sent));
                    trickle(&mut c_out, &buf[..n], rate);
                    sent += n;
                    if cut_after.is_some_and(|cut| sent >= cut) {
                        let _ = c_out.shutdown(std::net::Shutdown::Both);
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(m) == path)
}

/// Sends SIGINT (what Ctrl-C sends) to a child.
fn interrupt(child: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
}

/// Waits until `done` holds, polling, or panics with `what`.
#[track_caller]
fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn volume_create_waits_for_its_backing_image_with_progress_lines() {
    let s = Served::start();
    let url = slow_file_server(kit::noise(3 << 20, 7), 1 << 20);
    s.apply_download("bi-slow", &url);
    // Right after `apply`, as the README does: the CLI waits instead of failing.
    let out = s.bicsi(&[
        "volume",
        "create",
        "vm1",
        "--size",
        "8Mi",
        "-p",
        "backingImage=bi-slow",
        "-p",
        "numberOfReplicas=1",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("volume vm1 created"), "{stdout}");
    // Not a terminal: plain progress lines, with a percentage.
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("bi-slow") && l.contains('%')),
        "{stderr}"
    );
    assert!(s.image_ready("bi-slow"));
    let list = s.ok(&["get", "volumes"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("vm1 ") && l.contains("bi-slow") && l.contains("1/1")),
        "{list}"
    );
}

#[test]
fn apply_wait_waits_until_the_image_is_ready() {
    let s = Served::start();
    let url = slow_file_server(kit::noise(2 << 20, 3), 1 << 20);
    let file = s.path("bi.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: longhorn.io/v1beta2\nkind: BackingImage\nmetadata:\n  name: bi-wait\nspec:\n  sourceType: download\n  sourceParameters:\n    url: {url}\n"
        ),
    )
    .unwrap();
    let out = s.ok(&["apply", "-f", file.to_str().unwrap(), "--wait"]);
    assert!(out.contains("backingimage/bi-wait created"), "{out}");
    assert!(out.contains("backingimage/bi-wait ready"), "{out}");
    assert!(s.image_ready("bi-wait"));
}

#[test]
fn ctrl_c_stops_waiting_not_the_work() {
    let s = Served::start();
    let url = slow_file_server(kit::noise(3 << 20, 11), 512 << 10);
    s.apply_download("bi-int", &url);
    let stderr_path = s.path("create.err");
    let mut child = s
        .command(&[
            "volume",
            "create",
            "vint",
            "--size",
            "8Mi",
            "-p",
            "backingImage=bi-int",
            "-p",
            "numberOfReplicas=1",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    wait_until("a progress line", Duration::from_secs(30), || {
        std::fs::read_to_string(&stderr_path).is_ok_and(|e| e.contains('%'))
    });
    assert!(!s.image_ready("bi-int"), "the image was ready too soon");
    interrupt(&child);
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted: stopped waiting"), "{stderr}");
    // The download goes on without the CLI, and the same command then finishes the job.
    wait_until("the image to be ready", Duration::from_secs(60), || {
        s.image_ready("bi-int")
    });
    s.ok(&[
        "volume",
        "create",
        "vint",
        "--size",
        "8Mi",
        "-p",
        "backingImage=bi-int",
        "-p",
        "numberOfReplicas=1",
    ]);
    assert!(s.ok(&["get", "volume", "vint"]).contains("bi-int"));
}

#[test]
fn image_download_leaves_no_part_file_when_interrupted_or_broken() {
    let s = Served::start();
    let data = kit::noise(4 << 20, 5);
    let file = s.path("disk.raw");
    std::fs::write(&file, &data).unwrap();
    let out = s.ok(&["image", "upload", "up", file.to_str().unwrap()]);
    assert!(out.contains("backingimage/up uploaded"), "{out}");

    // Ctrl-C half-way through a slow download.
    let slow = slow_proxy(&s.http, 512 << 10, None);
    let target = s.path("copy.raw");
    let part = s.path("copy.raw.part");
    let child = s
        .command(&["image", "download", "up", "-o", target.to_str().unwrap()])
        .args(["--server", &slow])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("a partial file", Duration::from_secs(30), || {
        std::fs::metadata(&part).is_ok_and(|m| m.len() > 0)
    });
    interrupt(&child);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("was removed"), "{stderr}");
    assert!(!part.exists(), "{} is left behind", part.display());
    assert!(!target.exists());

    // A connection that breaks off.
    let broken = slow_proxy(&s.http, 64 << 20, Some(1 << 20));
    let err = s.fails(&[
        "image",
        "download",
        "up",
        "-o",
        target.to_str().unwrap(),
        "--server",
        &broken,
    ]);
    assert!(err.contains("download again"), "{err}");
    assert!(!part.exists(), "{} is left behind", part.display());
    assert!(!target.exists());

    // And a whole one, verified.
    s.ok(&["image", "download", "up", "-o", target.to_str().unwrap()]);
    assert_eq!(std::fs::read(&target).unwrap(), data);
    assert!(!part.exists());
}

#[test]
fn deleting_what_does_not_exist_says_not_found() {
    let s = Served::start();
    for args in [
        &["delete", "backingimage", "nosuch"][..],
        &["delete", "storageclass", "nosuch"],
        &["snapshot", "delete", "nosuch"],
    ] {
        let err = s.fails(args);
        assert!(err.contains("\"nosuch\" not found"), "{args:?}: {err}");
        let mut quiet = args.to_vec();
        quiet.push("--ignore-not-found");
        let out = s.ok(&quiet);
        assert!(!out.contains("deleted"), "{quiet:?}: {out}");
    }
    let sc = s.path("sc.yaml");
    std::fs::write(
        &sc,
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: fast\nprovisioner: driver.longhorn.io\nparameters:\n  numberOfReplicas: \"1\"\n",
    )
    .unwrap();
    s.ok(&["apply", "-f", sc.to_str().unwrap()]);
    let out = s.ok(&["delete", "storageclass", "fast"]);
    assert_eq!(out.trim(), "storageclass/fast deleted");
    s.fails(&["delete", "storageclass", "fast"]);

    let img = s.path("i.raw");
    std::fs::write(&img, kit::noise(1 << 20, 9)).unwrap();
    s.ok(&["image", "upload", "gone", img.to_str().unwrap()]);
    assert_eq!(
        s.ok(&["delete", "backingimage", "gone"]).trim(),
        "backingimage/gone deleted"
    );
    assert!(s.fails(&["delete", "bi", "gone"]).contains("not found"));
}

#[test]
fn a_closed_stdout_is_a_quiet_exit() {
    let s = Served::start();
    s.create_one("piped", "8Mi");
    for args in [
        &["get", "volumes", "-o", "json"][..],
        &["get", "settings", "-o", "json"],
        &["get", "backingimages", "-o", "yaml"],
        &["crd"],
    ] {
        // The reader is gone before the first write: every write fails with EPIPE.
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        let out = s
            .command(args)
            .stdout(Stdio::from(write))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    }
}

#[test]
fn get_volume_and_lists_in_json_and_yaml() {
    let s = Served::start();
    s.create_one("one", "16Mi");
    let table = s.ok(&["get", "volumes"]);
    let header = table.lines().next().unwrap();
    for col in [
        "VOLUME",
        "SIZE",
        "IMAGE",
        "REPLICAS",
        "HEALTH",
        "ATTACHED",
        "CONDITION",
    ] {
        assert!(header.contains(col), "{header}");
    }
    assert!(
        table.lines().any(|l| l.starts_with("one ")
            && l.contains("16Mi")
            && l.contains(" 1/1 ")
            && l.contains(" healthy ")),
        "{table}"
    );
    let replicas: serde_json::Value =
        serde_json::from_str(&s.ok(&["get", "replicas", "one", "-o", "json"])).unwrap();
    assert_eq!(replicas.as_array().unwrap().len(), 1, "{replicas}");
    assert_eq!(replicas[0]["volume"], "one");
    assert_eq!(replicas[0]["mode"], "rw");
    assert_eq!(replicas[0]["node"], "cli-node");
    let table = s.ok(&["get", "replicas"]);
    assert!(table.lines().next().unwrap().contains("MODE"), "{table}");
    assert!(
        s.fails(&["get", "replicas", "nosuch"])
            .contains("not found")
    );
    let one: serde_json::Value =
        serde_json::from_str(&s.ok(&["get", "volume", "one", "-o", "json"])).unwrap();
    assert_eq!(one["id"], "one");
    assert_eq!(one["capacityBytes"], 16 << 20);
    assert_eq!(one["healthyReplicas"], 1);
    assert_eq!(one["wantedReplicas"], 1);
    assert!(
        s.ok(&["get", "volume", "one", "-o", "yaml"])
            .contains("capacityBytes: 16777216")
    );
    let list: serde_json::Value =
        serde_json::from_str(&s.ok(&["get", "volumes", "-o", "json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(s.ok(&["get", "volumes", "-o", "wide"]).contains("cli-node"));
    assert!(s.fails(&["get", "volume", "nosuch"]).contains("not found"));

    for list in [
        &["get", "nodes", "-o", "json"][..],
        &["get", "disks", "-o", "json"],
        &["get", "backingimages", "-o", "json"],
        &["get", "storageclasses", "-o", "json"],
        &["snapshot", "list", "-o", "json"],
    ] {
        let v: serde_json::Value =
            serde_json::from_str(&s.ok(list)).unwrap_or_else(|e| panic!("{list:?}: not JSON: {e}"));
        assert!(v.is_array(), "{list:?}");
    }
    assert!(
        s.ok(&["get", "nodes", "-o", "yaml"])
            .contains("nodeId: cli-node")
    );
}

#[test]
fn volume_expand_grows_a_detached_volume() {
    let s = Served::start();
    s.create_one("grow", "16Mi");
    let out = s.ok(&["volume", "expand", "grow", "--size", "32Mi"]);
    assert!(out.contains("volume grow expanded to 32Mi"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&s.ok(&["get", "volume", "grow", "-o", "json"])).unwrap();
    assert_eq!(v["capacityBytes"], 32 << 20);
    assert!(
        s.fails(&["volume", "expand", "nosuch", "--size", "32Mi"])
            .contains("nosuch")
    );
}

#[test]
fn attach_at_a_second_path_is_refused_and_detach_undoes_attach() {
    if !root_or_skip("attach_at_a_second_path_is_refused_and_detach_undoes_attach") {
        return;
    }
    let s = Served::start();
    let (a, b) = (s.path("mnt-a"), s.path("mnt-b"));
    s.create_one("twice", "32Mi");
    s.attach_mount("twice", &a);
    // Attaching again at the same path is fine (idempotent).
    s.attach_mount("twice", &a);
    let err = s.fails(&["volume", "attach", "twice", "--mount", b.to_str().unwrap()]);
    assert!(
        err.contains(&format!("attached at {}", a.display())),
        "{err}"
    );
    assert!(!b.exists());
    let row = s.ok(&["get", "volume", "twice"]);
    assert!(row.contains(&format!("cli-node:{}", a.display())), "{row}");
    s.detach("twice");
    assert!(!a.exists());
    s.attach_mount("twice", &b);
    s.detach("twice");
    assert!(!b.exists());

    // What an older bicsi left: a second attach replaced the record of the first path, which
    // stayed mounted. Detach now undoes both.
    s.attach_mount("twice", &a);
    let record = s.path("cli-attach/twice.json");
    let text = std::fs::read_to_string(&record).unwrap();
    std::fs::write(
        &record,
        text.replace(a.to_str().unwrap(), b.to_str().unwrap()),
    )
    .unwrap();
    s.attach_mount("twice", &b);
    assert!(is_mounted(&a) && is_mounted(&b));
    let out = s.bicsi(&["volume", "detach", "twice"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&a) && !is_mounted(&b));
    assert!(!a.exists() && !b.exists());

    // Grown while detached, the filesystem is larger at the next attach.
    let total = |p: &Path| {
        let st = nix::sys::statvfs::statvfs(p).unwrap();
        st.blocks() as u64 * st.fragment_size() as u64
    };
    s.attach_mount("twice", &a);
    let before = total(&a);
    let err = s.fails(&["volume", "expand", "twice", "--size", "64Mi"]);
    assert!(err.contains("detach it"), "{err}");
    s.detach("twice");
    s.ok(&["volume", "expand", "twice", "--size", "64Mi"]);
    s.attach_mount("twice", &a);
    assert!(total(&a) > before + (16 << 20), "{before} → {}", total(&a));
    s.detach("twice");
    s.ok(&["volume", "delete", "twice"]);
}

#[test]
fn snapshot_create_waits_until_ready_to_use() {
    let s = Served::start();
    s.create_one("src", "16Mi");
    let out = s.ok(&[
        "snapshot",
        "create",
        "exp",
        "--volume",
        "src",
        "-p",
        "type=bi",
        "-p",
        "export-type=raw",
    ]);
    let row = out.lines().nth(1).unwrap_or_default();
    assert!(row.starts_with("exp ") && row.contains(" true "), "{out}");
    let out = s.ok(&[
        "snapshot",
        "restore",
        "exp",
        "copy",
        "-p",
        "numberOfReplicas=1",
    ]);
    assert!(
        out.contains("volume copy created from snapshot exp"),
        "{out}"
    );
}

#[test]
fn timeout_gives_up_waiting_and_no_wait_does_not_wait() {
    let s = Served::start();
    let url = slow_file_server(kit::noise(2 << 20, 13), 128 << 10);
    s.apply_download("bi-late", &url);
    let started = Instant::now();
    let err = s.fails(&[
        "volume",
        "create",
        "late",
        "--size",
        "8Mi",
        "-p",
        "backingImage=bi-late",
        "-p",
        "numberOfReplicas=1",
        "--timeout",
        "2s",
    ]);
    assert!(err.contains("gave up waiting (--timeout)"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "{err}");
    // --no-wait answers at once, and never says the volume will appear by itself.
    let out = s.bicsi(&[
        "volume",
        "create",
        "late",
        "--size",
        "8Mi",
        "-p",
        "backingImage=bi-late",
        "-p",
        "numberOfReplicas=1",
        "--no-wait",
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("created when it is ready"), "{text}");
    if out.status.success() {
        // A server whose CreateVolume does not wait for the image: attach waits for it.
        assert!(
            text.contains("`bicsi volume attach late` waits for it"),
            "{text}"
        );
    } else {
        assert!(
            text.contains("run the command again to create it"),
            "{text}"
        );
    }
    assert!(!s.image_ready("bi-late"));
}

#[test]
fn attach_waits_while_the_image_is_copied_to_a_second_disk() {
    if !root_or_skip("attach_waits_while_the_image_is_copied_to_a_second_disk") {
        return;
    }
    let s = Served::start_with(&["--disk", "d1", "--disk", "d2"]);
    let data = kit::noise(32 << 20, 17);
    let file = s.path("img.raw");
    std::fs::write(&file, &data).unwrap();
    s.ok(&["image", "upload", "img", file.to_str().unwrap()]);
    s.ok(&[
        "volume",
        "create",
        "two",
        "--size",
        "32Mi",
        "-p",
        "backingImage=img",
        "-p",
        "numberOfReplicas=2",
    ]);
    let dev = s.path("two-dev");
    let out = s.bicsi(&["volume", "attach", "two", "--block", dev.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The image's file had to reach the second disk first. ControllerPublishVolume waits for
    // it in the call (up to 10 s; a 32 MiB copy takes less), so the CLI shows a progress line
    // only when bicsi answered Unavailable (a slower copy) — either way the attach completes.
    if stderr.contains("attaching two: ") {
        assert!(stderr.contains('%'), "{stderr}");
    }
    let mut back = vec![0u8; data.len()];
    std::io::Read::read_exact(&mut std::fs::File::open(&dev).unwrap(), &mut back).unwrap();
    assert!(back == data, "the volume does not read as its image");
    let row = s.ok(&["get", "volume", "two"]);
    assert!(row.contains(" 2/2 "), "{row}");
    s.detach("two");
    s.ok(&["volume", "delete", "two"]);
}

#[test]
fn ctrl_c_of_an_upload_says_it_must_start_over() {
    let s = Served::start();
    // Larger than the sockets' buffers can hold: what the CLI had sent before Ctrl-C still
    // reaches the server, and with a small file that was all of it, so the upload completed.
    let data = kit::noise(32 << 20, 19);
    let file = s.path("up.raw");
    std::fs::write(&file, &data).unwrap();
    let slow = slow_proxy(&s.http, 1 << 20, None);
    let err_path = s.path("upload.err");
    let child = s
        .command(&["image", "upload", "cut", file.to_str().unwrap()])
        .args(["--server", &slow])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    wait_until("an upload progress line", Duration::from_secs(30), || {
        std::fs::read_to_string(&err_path).is_ok_and(|e| e.contains("uploading: "))
    });
    // The CLI's first progress line can come before the server has the request (the proxy
    // trickles it): interrupt once the server is receiving, so that there is a file to fail.
    wait_until(
        "the server to receive the upload",
        Duration::from_secs(30),
        || {
            let bi: serde_json::Value =
                serde_json::from_str(&s.ok(&["get", "backingimage", "cut", "-o", "json"])).unwrap();
            bi["status"]["diskFileStatusMap"]
                .as_object()
                .is_some_and(|m| m.values().any(|f| f["state"] == "in-progress"))
        },
    );
    interrupt(&child);
    let status = child.wait_with_output().unwrap().status;
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("an upload cannot resume"), "{stderr}");
    assert!(!s.image_ready("cut"));
    // What the message says: the file fails, and uploading again works.
    wait_until("the cut upload to fail", Duration::from_secs(30), || {
        let bi: serde_json::Value =
            serde_json::from_str(&s.ok(&["get", "backingimage", "cut", "-o", "json"])).unwrap();
        bi["status"]["diskFileStatusMap"]
            .as_object()
            .is_some_and(|m| m.values().any(|f| f["state"] == "failed"))
    });
    s.ok(&["image", "upload", "cut", file.to_str().unwrap()]);
    assert!(s.image_ready("cut"));
}

/// The content an [`changing_server`] serves now: the body and its ETag.
type Served2 = Arc<std::sync::Mutex<(Vec<u8>, String)>>;

/// An HTTP server of one file whose content (and ETag) the test changes, answering HEAD, GET
/// and `Range: bytes=A-[B]` with the current ETag.
fn changing_server(body: Vec<u8>, etag: &str) -> (String, Served2) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/cloud.img", listener.local_addr().unwrap());
    let now: Served2 = Arc::new(std::sync::Mutex::new((body, etag.to_string())));
    let state = now.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let state = state.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let (mut range, mut head, mut line) = (None, false, String::new());
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    head |= line.starts_with("HEAD ");
                    if let Some(r) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        let (a, b) = r.trim().split_once('-').unwrap_or(("0", ""));
                        range = Some((a.parse().unwrap_or(0usize), b.parse::<usize>().ok()));
                    }
                    if line == "\r\n" {
                        break;
                    }
                    line.clear();
                }
                let (body, etag) = state.lock().unwrap().clone();
                let (status, part) = match range {
                    Some((a, b)) => {
                        let b = b.unwrap_or(body.len() - 1).min(body.len() - 1);
                        (
                            format!(
                                "206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}",
                                body.len()
                            ),
                            &body[a..=b],
                        )
                    }
                    None => ("200 OK".to_string(), &body[..]),
                };
                let mut conn = conn;
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nETag: \"{etag}\"\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
                    part.len()
                );
                if !head {
                    let _ = conn.write_all(part);
                }
            });
        }
    });
    (url, now)
}

impl Served {
    /// `get backingimage NAME -o json`, or None when there is no such image.
    fn image_json(&self, name: &str) -> Option<serde_json::Value> {
        let out = self.bicsi(&["get", "backingimage", name, "-o", "json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// The image a volume was made from.
    fn volume_image(&self, name: &str) -> String {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["get", "volume", name, "-o", "json"])).unwrap();
        v["backingImage"].as_str().unwrap_or("").to_string()
    }

    /// `volume create NAME` from backing image `image`, one replica.
    #[track_caller]
    fn create_from(&self, name: &str, image: &str) {
        self.ok(&[
            "volume",
            "create",
            name,
            "--size",
            "8Mi",
            "-p",
            &format!("backingImage={image}"),
            "-p",
            "numberOfReplicas=1",
        ]);
    }
}

fn file_states(bi: &serde_json::Value) -> Vec<String> {
    bi["status"]["diskFileStatusMap"]
        .as_object()
        .map(|m| {
            m.values()
                .map(|f| f["state"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Images that update: the controller polls the source's ETag every second; a change makes a
/// verified version `NAME-<digest>` that new volumes get, old volumes keep theirs, a version
/// whose content is bad leaves the alias, an unchanged source makes nothing, and versions no
/// volume uses beyond `keepVersions` go.
#[test]
fn a_polled_image_makes_versions_new_volumes_use_and_old_ones_go() {
    use sha2::{Digest, Sha512};
    let s = Served::start();
    let v1 = kit::noise(1 << 20, 1);
    let (url, source) = changing_server(v1.clone(), "v1");
    let file = s.path("poll.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: longhorn.io/v1beta2\nkind: BackingImage\nmetadata:\n  name: bi-poll\nspec:\n  sourceType: download\n  sourceParameters:\n    url: {url}\n    pollInterval: 1s\n    keepVersions: \"1\"\n"
        ),
    )
    .unwrap();
    s.ok(&["apply", "-f", file.to_str().unwrap(), "--wait"]);
    let poll = |name: &str| s.image_json(name).unwrap()["status"]["poll"].clone();
    wait_until("the first check", Duration::from_secs(20), || {
        poll("bi-poll")["validator"] == "etag:\"v1\""
    });
    s.create_from("vol-a", "bi-poll");
    assert_eq!(s.volume_image("vol-a"), "bi-poll");

    // Unchanged: checked again, nothing made.
    let first = poll("bi-poll")["lastCheckTime"].clone();
    wait_until("a second check", Duration::from_secs(20), || {
        poll("bi-poll")["lastCheckTime"] != first
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(poll("bi-poll")["versions"].is_null(), "{}", poll("bi-poll"));
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&s.ok(&["get", "backingimages", "-o", "json"])).unwrap();
    assert_eq!(list.len(), 1);

    // A new content: a version, verified, and new volumes get it.
    let v2 = kit::noise(1 << 20, 2);
    *source.lock().unwrap() = (v2.clone(), "v2".into());
    let mut second = String::new();
    wait_until(
        "the alias to move to the new version",
        Duration::from_secs(60),
        || {
            second = poll("bi-poll")["current"]
                .as_str()
                .unwrap_or("")
                .to_string();
            !second.is_empty()
        },
    );
    assert!(
        second.starts_with("bi-poll-") && second.len() == "bi-poll-".len() + 8,
        "{second}"
    );
    let version = s.image_json(&second).unwrap();
    assert_eq!(
        version["status"]["checksum"],
        hex::encode(Sha512::digest(&v2))
    );
    assert_eq!(version["status"]["versionOf"], "bi-poll");
    assert!(
        version["spec"]["sourceParameters"]
            .get("pollInterval")
            .is_none()
    );
    s.create_from("vol-b", "bi-poll");
    assert_eq!(s.volume_image("vol-b"), second);
    assert_eq!(
        s.volume_image("vol-a"),
        "bi-poll",
        "an old volume keeps its image"
    );

    // A bad content (a gzip body whose CRC is wrong): its version fails, the alias stays.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&kit::noise(1 << 20, 3)).unwrap();
    let mut bad = gz.finish().unwrap();
    let crc = bad.len() - 8;
    bad[crc] ^= 0xff;
    *source.lock().unwrap() = (bad, "v3".into());
    let mut third = String::new();
    wait_until("the bad version to fail", Duration::from_secs(60), || {
        let versions = poll("bi-poll")["versions"].clone();
        let Some(last) = versions.as_array().and_then(|v| v.last()) else {
            return false;
        };
        third = last["name"].as_str().unwrap().to_string();
        third != second
            && s.image_json(&third)
                .is_some_and(|b| file_states(&b).iter().any(|f| f == "failed"))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(poll("bi-poll")["current"], second.as_str());
    s.create_from("vol-c", "bi-poll");
    assert_eq!(s.volume_image("vol-c"), second);

    // Another good content: the alias moves; keepVersions 1 deletes the failed version, while
    // the one volumes use stays.
    let v4 = kit::noise(1 << 20, 4);
    *source.lock().unwrap() = (v4.clone(), "v4".into());
    let mut fourth = String::new();
    wait_until("the alias to move again", Duration::from_secs(60), || {
        fourth = poll("bi-poll")["current"]
            .as_str()
            .unwrap_or("")
            .to_string();
        fourth != second
    });
    assert_eq!(
        s.image_json(&fourth).unwrap()["status"]["checksum"],
        hex::encode(Sha512::digest(&v4))
    );
    wait_until("the failed version to go", Duration::from_secs(20), || {
        s.image_json(&third).is_none()
    });
    assert!(s.image_json(&second).is_some(), "a version in use is kept");
    let table = s.ok(&["get", "backingimages"]);
    assert!(
        table.contains(&format!("alias: bi-poll -> {fourth}"))
            && table.contains(&format!("versions: {second}, {fourth}"))
            && table.contains("version of bi-poll"),
        "{table}"
    );
    // Its volumes gone, the old version goes too; the newest stays.
    s.ok(&["volume", "delete", "vol-b"]);
    s.ok(&["volume", "delete", "vol-c"]);
    wait_until("the unused version to go", Duration::from_secs(20), || {
        s.image_json(&second).is_none()
    });
    assert!(s.image_json(&fourth).is_some());
    assert!(s.image_json("bi-poll").is_some());
    assert_eq!(s.volume_image("vol-a"), "bi-poll");
}

impl Served {
    /// kill -9 and start again on the same HTTP address: a crash and a restart.
    fn restart(&mut self) {
        self.proc.kill9();
        let addr = self.http.trim_start_matches("http://").to_string();
        let args = self.proc.args_mut();
        let at = args.iter().position(|a| a == "--http-listen").unwrap();
        args[at + 1] = addr;
        self.proc.start();
        let socket = self.dir.path().join("csi.sock");
        let http = self.http.clone();
        self.proc.wait_ready_blocking("bicsi again", || {
            socket.exists()
                && Command::new(env!("CARGO_BIN_EXE_bicsi"))
                    .args(["get", "backingimages"])
                    .env("BICSI_SERVER", &http)
                    .env("BICSI_CSI_ENDPOINT", csi_endpoint(socket.parent().unwrap()))
                    .output()
                    .is_ok_and(|o| o.status.success())
        });
    }
}

/// A program on the PATH, or None (the test says it skips) outside CI.
fn program(name: &str, install: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs {name} ({install}; scripts/test installs it)"
        );
        eprintln!("SKIP: no {name} ({install})");
    }
    found
}

/// Writes a containerDisk image (one gzip layer holding `/disk/disk.img`) into a fresh OCI
/// layout at `layout` under the tag `latest`.
fn container_disk_layout(layout: &Path, disk: &[u8]) {
    use sha2::{Digest, Sha256};
    let _ = std::fs::remove_dir_all(layout);
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let blob = |bytes: &[u8]| {
        let hex = hex::encode(Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(disk.len() as u64);
    h.set_mode(0o444);
    b.append_data(&mut h, "disk/disk.img", disk).unwrap();
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let (ld, ls) = blob(&gz.finish().unwrap());
    let config = serde_json::json!({"architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "os": "linux", "rootfs": {"type": "layers",
        "diff_ids": [format!("sha256:{}", hex::encode(Sha256::digest(&tar)))]}});
    let (cd, cs) = blob(config.to_string().as_bytes());
    let manifest = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": ls}]});
    let (md, ms) = blob(manifest.to_string().as_bytes());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
}

/// A registry tag re-pushed with skopeo: the poll sees the new manifest digest (and, across a
/// crash and restart of bicsi, no change while there is none), makes a version pinned to the
/// digest, and new volumes get it while the old one keeps its image.
#[test]
fn a_polled_registry_tag_pushed_again_makes_a_pinned_version() {
    use sha2::{Digest, Sha512};
    let Some(registry_bin) = program("docker-registry", "apt-get install docker-registry") else {
        return;
    };
    let Some(skopeo) = program("skopeo", "apt-get install skopeo") else {
        return;
    };
    let mut s = Served::start();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let root = s.path("registry");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        root.join("config.yml"),
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            root.join("data").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(root.join("registry.log")).unwrap();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _registry = Kill(
        Command::new(&registry_bin)
            .arg("serve")
            .arg(root.join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_until("the registry to listen", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let layout = s.path("layout");
    let image = format!("127.0.0.1:{port}/vm/disk:latest");
    let push = |disk: &[u8]| {
        container_disk_layout(&layout, disk);
        let out = Command::new(&skopeo)
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{image}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let a = kit::noise(1 << 20, 11);
    push(&a);
    let file = s.path("reg.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: longhorn.io/v1beta2\nkind: BackingImage\nmetadata:\n  name: bi-reg\nspec:\n  sourceType: download\n  sourceParameters:\n    url: docker://{image}\n    pollInterval: 1s\n"
        ),
    )
    .unwrap();
    s.ok(&["apply", "-f", file.to_str().unwrap(), "--wait"]);
    let poll = |s: &Served| s.image_json("bi-reg").unwrap()["status"]["poll"].clone();
    wait_until("the first check", Duration::from_secs(20), || {
        poll(&s)["validator"]
            .as_str()
            .is_some_and(|v| v.starts_with("sha256:"))
    });
    let first = poll(&s)["validator"].as_str().unwrap().to_string();
    s.create_from("vol-r1", "bi-reg");

    // A crash and a restart: the poll goes on from its record, and makes nothing.
    s.restart();
    let checked = poll(&s)["lastCheckTime"].clone();
    wait_until("a check after the restart", Duration::from_secs(20), || {
        poll(&s)["lastCheckTime"] != checked
    });
    assert_eq!(poll(&s)["validator"], first.as_str());
    assert!(poll(&s)["versions"].is_null(), "{}", poll(&s));

    // The tag pushed again with another disk: a version pinned to the new digest.
    let b = kit::noise(1 << 20, 12);
    push(&b);
    let mut current = String::new();
    wait_until(
        "the alias to move to the new version",
        Duration::from_secs(60),
        || {
            current = poll(&s)["current"].as_str().unwrap_or("").to_string();
            !current.is_empty()
        },
    );
    let digest = poll(&s)["validator"].as_str().unwrap().to_string();
    assert_ne!(digest, first);
    assert_eq!(
        current,
        format!("bi-reg-{}", &digest["sha256:".len()..][..8])
    );
    let version = s.image_json(&current).unwrap();
    assert_eq!(
        version["spec"]["sourceParameters"]["url"],
        format!("docker://127.0.0.1:{port}/vm/disk@{digest}")
    );
    assert_eq!(
        version["status"]["checksum"],
        hex::encode(Sha512::digest(&b))
    );
    s.create_from("vol-r2", "bi-reg");
    assert_eq!(s.volume_image("vol-r2"), current);
    assert_eq!(s.volume_image("vol-r1"), "bi-reg");
    assert_eq!(
        s.image_json("bi-reg").unwrap()["status"]["checksum"],
        hex::encode(Sha512::digest(&a))
    );
}
