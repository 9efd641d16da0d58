//! Starts the real `bicsi serve` binary on a unix socket in a temp dir and cleans up everything it
//! may leave behind (engines, loop devices, mounts), also when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bicsi::client::CsiClient;
use bicsi::csi::pb;

pub const NODE_ID: &str = "test-node";
pub const MIB: i64 = 1 << 20;

/// Node tests need root (loop devices, FUSE, mounts). Off CI they skip and say why; in CI
/// (`CI` set) a skip would hide a regression, so it fails instead.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root (loop devices, FUSE, mounts) and CI must not skip it");
    }
    eprintln!("SKIP {test}: needs root for loop devices, FUSE and mounts");
    false
}

pub struct Bicsi {
    pub dir: tempfile::TempDir,
    pub endpoint: String,
    /// The HTTP API, `http://127.0.0.1:PORT`.
    pub http: String,
    pub disks: Vec<PathBuf>,
    /// Extra flags of `bicsi serve` (kept across restarts).
    pub args: Vec<String>,
    /// Environment variables of `bicsi serve` (kept across restarts), e.g. a PATH whose
    /// programs fail on purpose.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Bicsi {
    /// Starts bicsi with `n_disks` disk directories.
    pub async fn start(n_disks: usize) -> Bicsi {
        Bicsi::start_with(n_disks, &[]).await
    }

    /// Starts bicsi with `n_disks` disk directories and extra `bicsi serve` flags.
    pub async fn start_with(n_disks: usize, args: &[&str]) -> Bicsi {
        Bicsi::start_with_env(n_disks, args, &[]).await
    }

    /// Starts bicsi with `n_disks` disk directories, extra flags and environment variables.
    pub async fn start_with_env(n_disks: usize, args: &[&str], env: &[(&str, &str)]) -> Bicsi {
        let dir = tempfile::Builder::new()
            .prefix("bicsi-test-")
            .tempdir()
            .expect("temp dir");
        let disks = (0..n_disks)
            .map(|i| dir.path().join(format!("disk{i}")))
            .collect();
        let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut b = Bicsi {
            dir,
            endpoint,
            http: format!("http://127.0.0.1:{port}"),
            disks,
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        b.spawn().await;
        b
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bicsi"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--csi-endpoint")
            .arg(&self.endpoint)
            .arg("--node-id")
            .arg(NODE_ID)
            .arg("--http-listen")
            .arg(self.http.trim_start_matches("http://"));
        for d in &self.disks {
            cmd.arg("--disk").arg(d);
        }
        cmd.args(&self.args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("bicsi.log"))
            .expect("log file");
        cmd.stdout(Stdio::null()).stderr(log);
        self.child = Some(cmd.spawn().expect("start bicsi"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if CsiClient::connect(&self.endpoint).await.is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("bicsi exited early ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "bicsi did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the `bicsi` CLI against this server; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_bicsi"))
            .args(args)
            .env("BICSI_CSI_ENDPOINT", &self.endpoint)
            .env("BICSI_SERVER", &self.http)
            .output()
            .expect("run bicsi");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bicsi.log")).unwrap_or_default()
    }

    pub async fn client(&self) -> CsiClient {
        CsiClient::connect(&self.endpoint).await.expect("connect")
    }

    /// SIGTERM and wait: the clean stop a user does.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("bicsi did not stop on SIGTERM within 20 s:\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

impl Drop for Bicsi {
    fn drop(&mut self) {
        self.kill();
        cleanup_under(self.dir.path());
    }
}

/// Mount points under `dir`, deepest first.
/// How many nodes the HTTP API at `http` lists as up (0 while it does not answer).
#[allow(dead_code)] // for the suites that start several node agents (engine, multinode, faults)
pub async fn nodes_up(http: &str) -> usize {
    let Ok(r) = reqwest::get(format!("{http}/v1/nodes")).await else {
        return 0;
    };
    let Ok(v) = r.json::<serde_json::Value>().await else {
        return 0;
    };
    v.as_array()
        .map_or(0, |a| a.iter().filter(|n| n["up"] == true).count())
}

/// ControllerUnpublishVolume from [`NODE_ID`], then DeleteVolume.
pub async fn unpublish_and_delete(c: &mut CsiClient, volume: &str) {
    c.controller
        .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: volume.into(),
            node_id: NODE_ID.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("unpublish {volume}: {e}"));
    c.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: volume.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("delete {volume}: {e}"));
}

pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

/// Loop devices whose backing file is under `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output();
    let Ok(out) = out else { return vec![] };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?;
            let back = it.next()?;
            Path::new(back).starts_with(dir).then(|| name.to_string())
        })
        .collect()
}

/// Live qemu-storage-daemon processes started for `dir`.
pub fn engines_under(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let needle = dir.display().to_string();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmdline);
            if cmd.starts_with("qemu-storage-daemon") && cmd.contains(&needle) {
                pids.push(pid);
            }
        }
    }
    pids
}

fn cleanup_under(dir: &Path) {
    for m in mounts_under(dir) {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
    for l in loops_under(dir) {
        let _ = Command::new("losetup").arg("-d").arg(&l).status();
    }
    for pid in engines_under(dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for m in mounts_under(dir) {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
}

// ---- request builders -------------------------------------------------------------------------

pub fn mount_cap() -> pb::VolumeCapability {
    cap_with(
        false,
        pb::volume_capability::access_mode::Mode::SingleNodeWriter,
    )
}

pub fn block_cap() -> pb::VolumeCapability {
    cap_with(
        true,
        pb::volume_capability::access_mode::Mode::SingleNodeWriter,
    )
}

pub fn cap_with(
    block: bool,
    mode: pb::volume_capability::access_mode::Mode,
) -> pb::VolumeCapability {
    use pb::volume_capability::AccessType;
    pb::VolumeCapability {
        access_type: Some(if block {
            AccessType::Block(pb::volume_capability::BlockVolume {})
        } else {
            AccessType::Mount(pb::volume_capability::MountVolume {
                fs_type: String::new(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            })
        }),
        access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn create_req(name: &str, bytes: i64, params: &[(&str, &str)]) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

pub fn stage_req(
    id: &str,
    staging: &Path,
    cap: pb::VolumeCapability,
) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

pub fn publish_req(
    id: &str,
    staging: &Path,
    target: &Path,
    cap: pb::VolumeCapability,
    readonly: bool,
) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

pub fn cpublish_req(
    id: &str,
    cap: pb::VolumeCapability,
    readonly: bool,
) -> pb::ControllerPublishVolumeRequest {
    pb::ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: NODE_ID.into(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

/// Asserts a call failed with `code` and a message containing `needle`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) {
    match r {
        Ok(v) => panic!("expected {code:?} containing {needle:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "wrong code; message: {}", s.message());
            assert!(
                s.message().contains(needle),
                "message {:?} does not mention {needle:?}",
                s.message()
            );
        }
    }
}
