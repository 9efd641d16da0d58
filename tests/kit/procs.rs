//! The process side of the test kit, for the integration tests: the `bicsi` binary as a child
//! process that logs to a file and can be killed (-9), stopped (SIGTERM) and started again with
//! the same flags; the CLI run against a server; temp dirs. It must not clean up what the
//! processes leave on the machine (that is `host.rs`) nor know a test's setup.

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a process may take to start answering, or to stop on SIGTERM.
pub const START_LIMIT: Duration = Duration::from_secs(30);
pub const STOP_LIMIT: Duration = Duration::from_secs(20);

/// The `bicsi` binary under test.
pub fn bicsi() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bicsi"))
}

/// A temp dir `/tmp/<prefix>XXXX`, removed when dropped.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}

/// The CSI endpoint of a test's bicsi in `dir`: `unix://DIR/csi.sock`.
pub fn csi_endpoint(dir: &Path) -> String {
    format!("unix://{}", dir.join("csi.sock").display())
}

/// `serve` and the flags every test's `bicsi serve` in `dir` has: its data in `dir/data`, its
/// CSI socket [`csi_endpoint`], its node id and its HTTP API on `http_listen` (HOST:PORT).
pub fn serve_args(dir: &Path, node_id: &str, http_listen: &str) -> Vec<String> {
    vec![
        "serve".into(),
        "--data-dir".into(),
        dir.join("data").display().to_string(),
        "--csi-endpoint".into(),
        csi_endpoint(dir),
        "--node-id".into(),
        node_id.into(),
        "--http-listen".into(),
        http_listen.into(),
    ]
}

/// The cluster CA and certificates the tests' controllers and node agents use (mutual TLS is on
/// in every split-mode test, as in a real cluster), made once with `bicsi certs` and shared by
/// every test process of this build: `ROOT/ca`, `ROOT/controller`, `ROOT/node` (the last two
/// are `--tls-dir`s). A generation lasts 100 days (the certificates 365), so none a test uses
/// has expired; processes racing to make it keep whichever was renamed into place first.
pub fn cluster_certs() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let days = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 86400;
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let root = base.join(format!("bicsi-test-certs-{}", days / 100));
        if root.join("node").join("tls.key").exists() {
            return root;
        }
        let tmp = base.join(format!("bicsi-test-certs.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let out = bicsi()
            .args(["certs", "--out"])
            .arg(&tmp)
            .output()
            .expect("run bicsi certs");
        assert!(
            out.status.success(),
            "bicsi certs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if std::fs::rename(&tmp, &root).is_err() {
            // Another test process was first: use its certificates.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        assert!(
            root.join("node").join("tls.key").exists(),
            "no certificates in {}",
            root.display()
        );
        root
    })
    .clone()
}

/// `--tls-dir` of a test's controller ([`cluster_certs`]).
pub fn controller_tls_dir() -> String {
    cluster_certs().join("controller").display().to_string()
}

/// `--tls-dir` of a test's node agent ([`cluster_certs`]).
pub fn node_tls_dir() -> String {
    cluster_certs().join("node").display().to_string()
}

/// The CSI endpoint of a test's `bicsi controller` in `dir`: `unix://DIR/controller.sock`.
pub fn controller_endpoint(dir: &Path) -> String {
    format!("unix://{}", dir.join("controller.sock").display())
}

/// `controller` and the flags every test's `bicsi controller` in `dir` has: its data in
/// `dir/controller`, its CSI socket [`controller_endpoint`], its HTTP API and cluster service on
/// these ports of 127.0.0.1, and its certificate ([`controller_tls_dir`]).
pub fn controller_args(dir: &Path, http_port: u16, cluster_port: u16) -> Vec<String> {
    vec![
        "controller".into(),
        "--data-dir".into(),
        dir.join("controller").display().to_string(),
        "--csi-endpoint".into(),
        controller_endpoint(dir),
        "--http-listen".into(),
        format!("127.0.0.1:{http_port}"),
        "--cluster-listen".into(),
        format!("127.0.0.1:{cluster_port}"),
        "--tls-dir".into(),
        controller_tls_dir(),
    ]
}

/// `node` and the flags every test's node agent `id` in `dir` has: its data in `dir/data`, its
/// CSI socket [`csi_endpoint`], its disk `dir/disk`, the controller's cluster service on
/// `cluster_port`, its agent and HTTP (file transfer) listeners on these ports and its NBD
/// listener on a free one, all on 127.0.0.1, and its certificate ([`node_tls_dir`]).
pub fn node_args(
    id: &str,
    dir: &Path,
    cluster_port: u16,
    agent_port: u16,
    http_port: u16,
) -> Vec<String> {
    vec![
        "node".into(),
        "--node-id".into(),
        id.into(),
        "--data-dir".into(),
        dir.join("data").display().to_string(),
        "--csi-endpoint".into(),
        csi_endpoint(dir),
        "--disk".into(),
        dir.join("disk").display().to_string(),
        "--controller".into(),
        format!("http://127.0.0.1:{cluster_port}"),
        "--agent-listen".into(),
        format!("127.0.0.1:{agent_port}"),
        "--http-listen".into(),
        format!("127.0.0.1:{http_port}"),
        "--nbd-listen".into(),
        format!("127.0.0.1:{}", crate::kit::free_port()),
        "--tls-dir".into(),
        node_tls_dir(),
    ]
}

/// `bicsi ARGS`, stdout discarded, stderr appended to `log`.
pub fn logged(args: &[String], log: &Path) -> Command {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut cmd = bicsi();
    cmd.args(args).stdout(Stdio::null()).stderr(f);
    cmd
}

/// Starts `bicsi ARGS`, stdout discarded, stderr appended to `log`.
pub fn spawn_logged(args: &[String], log: &Path) -> Child {
    logged(args, log).spawn().expect("start bicsi")
}

/// Waits up to `limit` for `child` to exit; panics naming `what` if it does not.
pub fn wait_exit(child: &mut Child, what: &str, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One bicsi process, restartable with the same arguments and environment; killed when
/// dropped.
pub struct Proc {
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `bicsi ARGS` logging to `log`.
    pub fn spawn(args: Vec<String>, log: PathBuf) -> Proc {
        Proc::spawn_with_env(args, Vec::new(), log)
    }

    /// Starts `bicsi ARGS` with these environment variables, logging to `log`.
    pub fn spawn_with_env(args: Vec<String>, env: Vec<(String, String)>, log: PathBuf) -> Proc {
        let mut p = Proc {
            args,
            env,
            log,
            child: None,
        };
        p.start();
        p
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = logged(&self.args, &self.log);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(cmd.spawn().expect("start bicsi"));
    }

    /// The flags of the next [`Proc::start`].
    pub fn args_mut(&mut self) -> &mut Vec<String> {
        &mut self.args
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: a crash, nothing runs after it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: the clean stop an operator does. Panics with the log if it takes more
    /// than [`STOP_LIMIT`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + STOP_LIMIT;
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!(
                        "bicsi did not stop on SIGTERM within {STOP_LIMIT:?}:\n{}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// The process as a child, for a test that reaps it itself (its exit status).
    pub fn take_child(&mut self) -> Option<Child> {
        self.child.take()
    }

    /// Panics with the log if the process has exited.
    pub fn assert_alive(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait().unwrap()
        {
            panic!("bicsi exited ({status}):\n{}", self.log());
        }
    }

    /// Polls `ready` until it holds; panics with the log if the process exits first or
    /// [`START_LIMIT`] passes.
    pub async fn wait_ready(&mut self, what: &str, mut ready: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if ready().await {
                return;
            }
            self.assert_alive();
            assert!(
                Instant::now() < deadline,
                "{what} did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// [`Proc::wait_ready`] for a test without a runtime.
    pub fn wait_ready_blocking(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + START_LIMIT;
        while !ready() {
            self.assert_alive();
            assert!(
                Instant::now() < deadline,
                "{what} did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs the `bicsi` CLI against the server at `http` (and the CSI socket `endpoint`); returns
/// (success, stdout, stderr).
/// Opens (or closes, `yes` false) the download guard's hole for 127.0.0.1 on the bicsi at
/// `http`: a cluster's downloads may not reach loopback by default (issue 19), and the tests'
/// image servers listen there, so the split-mode clusters of the tests open it as an operator
/// would.
pub fn allow_loopback_downloads(http: &str, yes: bool) {
    let value = if yes { "127.0.0.1" } else { "" };
    let (ok, out, err) = cli(
        http,
        None,
        &[
            "set",
            "setting",
            "backing-image-download-allowed-networks",
            value,
        ],
    );
    assert!(
        ok,
        "set setting backing-image-download-allowed-networks: {out}{err}"
    );
}

pub fn cli(http: &str, endpoint: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut cmd = bicsi();
    cmd.args(args)
        .env("BICSI_SERVER", http)
        .env_remove("BICSI_TOKEN");
    if let Some(e) = endpoint {
        cmd.env("BICSI_CSI_ENDPOINT", e);
    }
    let out = cmd.output().expect("run bicsi");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The stdout of a `bicsi args` run that must have succeeded.
#[track_caller]
pub fn succeeded(args: &[&str], out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "bicsi {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The stderr of a `bicsi args` run that must have failed.
#[track_caller]
pub fn failed(args: &[&str], out: std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "bicsi {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A JSON request to bicsi's HTTP API; (status, the body parsed as JSON, or as a string when
/// it is not JSON, or null when empty).
pub async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = http.request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let value = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
    };
    (status, value)
}
