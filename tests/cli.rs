//! The `bicsi volume …` and `bicsi get volumes` commands against a running `bicsi serve`, as a
//! person without Kubernetes uses them.

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

struct Served {
    dir: tempfile::TempDir,
    endpoint: String,
    child: Child,
}

impl Served {
    fn start() -> Served {
        let dir = tempfile::Builder::new()
            .prefix("bicsi-cli-")
            .tempdir()
            .unwrap();
        let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
        let log = std::fs::File::create(dir.path().join("bicsi.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_bicsi"))
            .args([
                "serve",
                "--node-id",
                "cli-node",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--csi-endpoint")
            .arg(&endpoint)
            .stderr(log)
            .spawn()
            .unwrap();
        let s = Served {
            dir,
            endpoint,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s.dir.path().join("csi.sock").exists() {
            assert!(Instant::now() < deadline, "bicsi did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn bicsi(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_bicsi"))
            .args(args)
            .env("BICSI_CSI_ENDPOINT", &self.endpoint)
            .output()
            .unwrap()
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.bicsi(args);
        assert!(
            out.status.success(),
            "bicsi {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Leave nothing mounted or attached if a test failed half-way.
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<&str> = mi
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| Path::new(m).starts_with(self.dir.path()))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
    }
}

fn is_root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CLI attach tests need root and CI must not skip them"
    );
    eprintln!("SKIP: attaching needs root (loop devices, FUSE, mounts)");
    false
}

#[test]
fn create_list_and_delete_without_attaching() {
    let s = Served::start();
    let out = s.ok(&[
        "volume",
        "create",
        "data",
        "--size",
        "64Mi",
        "-p",
        "numberOfReplicas=1",
    ]);
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
    if !is_root() {
        return;
    }
    let s = Served::start();
    let mnt = s.dir.path().join("mnt");
    s.ok(&[
        "volume",
        "create",
        "web",
        "--size",
        "64Mi",
        "-p",
        "numberOfReplicas=1",
    ]);
    let out = s.ok(&["volume", "attach", "web", "--mount", mnt.to_str().unwrap()]);
    assert!(out.contains("attached"), "{out}");
    std::fs::write(mnt.join("index.html"), b"<h1>hi</h1>").unwrap();
    assert!(s.ok(&["get", "volumes"]).contains("cli-node"));
    s.ok(&["volume", "detach", "web"]);
    assert!(!mnt.exists());
    s.ok(&["volume", "attach", "web", "--mount", mnt.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(mnt.join("index.html")).unwrap(),
        b"<h1>hi</h1>"
    );
    s.ok(&["volume", "detach", "web"]);

    let dev = s.dir.path().join("raw-dev");
    s.ok(&[
        "volume",
        "create",
        "raw",
        "--size",
        "8Mi",
        "-p",
        "numberOfReplicas=1",
    ]);
    s.ok(&["volume", "attach", "raw", "--block", dev.to_str().unwrap()]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&dev)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"block bytes"))
        .unwrap();
    s.ok(&["volume", "detach", "raw"]);
    s.ok(&["volume", "attach", "raw", "--block", dev.to_str().unwrap()]);
    let mut back = vec![0u8; 11];
    std::io::Read::read_exact(&mut std::fs::File::open(&dev).unwrap(), &mut back).unwrap();
    assert_eq!(&back, b"block bytes");
    s.ok(&["volume", "detach", "raw"]);
    s.ok(&["volume", "delete", "raw"]);
    s.ok(&["volume", "delete", "web"]);
}
