//! gRPC clients that are not tonic against the real `bicsi serve` and `bicsi controller`: Python's
//! grpcio, on gRPC's C core (the core of the C++ and Ruby clients too), through
//! `scripts/grpc-python-client`. The C core sends a unix socket's path, percent-encoded, as the
//! HTTP/2 :authority, which tonic's h2 refused (issue 23; `bicsi::authority`).
//!
//! Needs python3 with pip: grpcio and grpcio-tools are installed from PyPI when missing.

#[path = "kit/mod.rs"]
mod kit;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use kit::{Proc, controller_tls_dir, csi_endpoint, free_port, node_tls_dir, serve_args, temp_dir};

/// Makes sure python3 can import grpc and grpc_tools, installing them with pip once (under a
/// lock: the tests of this file run at the same time, in processes of their own).
fn python_with_grpcio() -> &'static str {
    let importable = || {
        Command::new("python3")
            .args(["-c", "import grpc, grpc_tools"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let lock = std::fs::File::create(std::env::temp_dir().join("bicsi-grpcio-install.lock"))
        .expect("lock file");
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock");
    if !importable() {
        let out = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "grpcio",
                "grpcio-tools",
            ])
            .output()
            .expect("python3 -m pip: these tests need python3 with pip");
        assert!(
            out.status.success() && importable(),
            "cannot install grpcio and grpcio-tools with pip: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    "python3"
}

fn client(args: &[&str]) {
    let python = python_with_grpcio();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/grpc-python-client");
    let started = Instant::now();
    let out = Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .expect("run the Python client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}(in {:?})", started.elapsed());
    assert!(
        out.status.success(),
        "the Python gRPC client failed:\n{text}"
    );
}

/// `bicsi ARGS` logging into `dir`, killed at the end of the test (before `dir`, declared
/// first, is removed).
fn start(dir: &tempfile::TempDir, args: &[String]) -> Proc {
    Proc::spawn(args.to_vec(), dir.path().join("bicsi.log"))
}

fn path(p: PathBuf) -> String {
    p.display().to_string()
}

#[test]
fn python_grpcio_calls_identity_controller_and_node_on_the_csi_socket() {
    let dir = temp_dir("bicsi-grpc-clients-");
    let sock = dir.path().join("csi.sock");
    let endpoint = csi_endpoint(dir.path());
    let args = serve_args(dir.path(), "py-node", "127.0.0.1:0");
    let mut b = start(&dir, &args);
    b.wait_ready_blocking("CSI socket", || sock.exists());
    client(&["csi", &endpoint, "py-node"]);
}

#[test]
fn python_grpcio_calls_the_cluster_service_over_tcp() {
    let dir = temp_dir("bicsi-grpc-clients-");
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let args = [
        "controller".to_string(),
        "--http-listen".into(),
        "127.0.0.1:0".into(),
        "--cluster-listen".into(),
        address.clone(),
        "--data-dir".into(),
        path(dir.path().join("data")),
        "--csi-endpoint".into(),
        format!("unix://{}", dir.path().join("csi.sock").display()),
        "--tls-dir".into(),
        controller_tls_dir(),
    ];
    let mut b = start(&dir, &args);
    b.wait_ready_blocking("Cluster service", || {
        std::net::TcpStream::connect(&address).is_ok()
    });
    // Over mutual TLS, with a node agent's certificate: the C core's TLS, not rustls.
    client(&["cluster", &address, &node_tls_dir()]);
}
