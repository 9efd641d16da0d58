//! The processes under test: `bicsi serve`, or a `bicsi controller` with `bicsi node` agents, each
//! a real child process that a test can `kill -9`, stop with SIGTERM and start again with the
//! same flags and data (the kit's [`Proc`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::kit::{
    Proc, cleanup_under, controller_args, controller_endpoint, csi_endpoint, free_port, node_args,
    serve_args, temp_dir,
};
use crate::throttle::Proxy;

/// How often the processes run their lifecycle work (expiry, cleanup, recovery, scrub).
pub const TICK_MS: &str = "200";

/// `--lifecycle-tick-ms TICK_MS`, for every process.
pub fn tick_args() -> Vec<String> {
    vec!["--lifecycle-tick-ms".into(), TICK_MS.into()]
}

/// Waits until `url` answers 2xx, or panics with the process's log after the kit's start limit.
async fn wait_http(url: &str, what: &str, proc: &mut Proc) {
    proc.wait_ready(what, async || {
        reqwest::get(url)
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
}

/// `bicsi serve` with disk directories of the test's choosing.
pub struct Serve {
    pub http: String,
    pub endpoint: String,
    pub disks: Vec<PathBuf>,
    pub proc: Proc,
    dir: PathBuf,
}

impl Serve {
    /// Starts `bicsi serve` in `dir` (its data directory is `dir/data`) with these disks.
    pub async fn start(dir: &Path, disks: Vec<PathBuf>) -> Serve {
        let http = format!("127.0.0.1:{}", free_port());
        let endpoint = csi_endpoint(dir);
        let mut args = serve_args(dir, "fault-node", &http);
        args.extend(tick_args());
        for d in &disks {
            args.push("--disk".into());
            args.push(d.display().to_string());
        }
        let mut s = Serve {
            http: format!("http://{http}"),
            endpoint,
            disks,
            proc: Proc::spawn(args, dir.join("bicsi.log")),
            dir: dir.to_path_buf(),
        };
        s.wait().await;
        s
    }

    async fn wait(&mut self) {
        let url = format!("{}/healthz", self.http);
        wait_http(&url, "bicsi serve", &mut self.proc).await;
    }

    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    pub async fn restart(&mut self) {
        self.proc.kill9();
        self.proc.start();
        self.wait().await;
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Runs the `bicsi` CLI against this server; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        crate::kit::cli(&self.http, Some(&self.endpoint), args)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.proc.kill9();
        cleanup_under(&self.dir);
    }
}

/// One node agent of a [`Cluster`]. It advertises the URLs of proxies of the test that forward
/// to its listeners: its file transfers to other nodes can be throttled.
pub struct Node {
    pub id: String,
    pub disk: PathBuf,
    pub proc: Proc,
    pub transfer: Proxy,
    _agent: Proxy,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub http: String,
    pub endpoint: String,
    pub nodes: Vec<Node>,
    pub controller: Proc,
}

impl Cluster {
    pub async fn start(n: usize) -> Cluster {
        let dir = temp_dir("bicsi-faults-");
        let (http_port, cluster_port) = (free_port(), free_port());
        let endpoint = controller_endpoint(dir.path());
        let mut args = controller_args(dir.path(), http_port, cluster_port);
        args.extend(["--node-down-after".into(), "3".into()]);
        args.extend(tick_args());
        let mut controller = Proc::spawn(args, dir.path().join("controller.log"));
        let http = format!("http://127.0.0.1:{http_port}");
        wait_http(
            &format!("{http}/healthz"),
            "bicsi controller",
            &mut controller,
        )
        .await;
        let mut nodes = Vec::new();
        for i in 1..=n {
            let id = format!("node-{i}");
            let ndir = dir.path().join(&id);
            std::fs::create_dir_all(&ndir).unwrap();
            let disk = ndir.join("disk");
            let (agent_port, transfer_port) = (free_port(), free_port());
            let agent = Proxy::start(agent_port).await;
            let transfer = Proxy::start(transfer_port).await;
            let mut args = node_args(&id, &ndir, cluster_port, agent_port, transfer_port);
            // The proxies pass TLS through: the nodes run with mTLS (the kit's --tls-dir).
            args.extend([
                "--advertise-agent-url".into(),
                format!("https://127.0.0.1:{}", agent.port),
                "--advertise-transfer-url".into(),
                format!("https://127.0.0.1:{}", transfer.port),
            ]);
            args.extend(tick_args());
            nodes.push(Node {
                id,
                disk,
                proc: Proc::spawn(args, ndir.join("node.log")),
                transfer,
                _agent: agent,
            });
        }
        let mut c = Cluster {
            dir,
            http,
            endpoint,
            nodes,
            controller,
        };
        c.wait_up(n).await;
        // A cluster's downloads may not reach loopback by default; the image servers are there.
        crate::kit::allow_loopback_downloads(&c.http, true);
        c
    }

    pub fn logs(&self) -> String {
        let mut out = self.controller.log();
        for n in &self.nodes {
            out.push_str(&format!("\n--- {} ---\n{}", n.id, n.proc.log()));
        }
        out
    }

    /// Waits until `n` nodes are registered and up.
    pub async fn wait_up(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if crate::harness::nodes_up(&self.http).await == n {
                return;
            }
            for node in &mut self.nodes {
                node.proc.assert_alive();
            }
            assert!(
                Instant::now() < deadline,
                "nodes did not come up:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn node_index(&self, id: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    pub fn disks(&self) -> Vec<PathBuf> {
        self.nodes.iter().map(|n| n.disk.clone()).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.proc.kill9();
        }
        self.controller.kill9();
        cleanup_under(self.dir.path());
    }
}
