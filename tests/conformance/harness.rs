//! Starts the real `bicsi serve` binary on a unix socket in a temp dir and cleans up everything it
//! may leave behind (engines, loop devices, mounts), also when a test fails; the processes, ports
//! and the sweep come from the test kit (`tests/kit`), the CSI requests are built here.

use std::path::{Path, PathBuf};

use bicsi::client::CsiClient;
use bicsi::csi::pb;

// The suites that include the harness use these through it, each a few of them.
use crate::kit::{Proc, cleanup_under, csi_endpoint, free_port, serve_args, temp_dir};
#[allow(unused_imports)]
pub use crate::kit::{
    engines_under, loops_under, mirror_engines_under, mounts_under, root_or_skip,
};

pub const NODE_ID: &str = "test-node";
pub const MIB: i64 = 1 << 20;

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
    proc: Option<Proc>,
}

impl Bicsi {
    /// Starts bicsi with `n_disks` disk directories.
    pub async fn start(n_disks: usize) -> Bicsi {
        Bicsi::start_with(n_disks, &[]).await
    }

    /// For a test that needs root: bicsi with `n_disks` disk directories and a client, or None
    /// (the test skips, see [`root_or_skip`]) when not root.
    pub async fn start_as_root(test: &str, n_disks: usize) -> Option<(Bicsi, CsiClient)> {
        if !root_or_skip(test) {
            return None;
        }
        let b = Bicsi::start(n_disks).await;
        let c = b.client().await;
        Some((b, c))
    }

    /// Starts bicsi with `n_disks` disk directories and extra `bicsi serve` flags.
    pub async fn start_with(n_disks: usize, args: &[&str]) -> Bicsi {
        Bicsi::start_with_env(n_disks, args, &[]).await
    }

    /// Starts bicsi with `n_disks` disk directories, extra flags and environment variables.
    pub async fn start_with_env(n_disks: usize, args: &[&str], env: &[(&str, &str)]) -> Bicsi {
        let dir = temp_dir("bicsi-test-");
        let disks = (0..n_disks)
            .map(|i| dir.path().join(format!("disk{i}")))
            .collect();
        let endpoint = csi_endpoint(dir.path());
        let port = free_port();
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
            proc: None,
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
        let mut args = serve_args(
            self.dir.path(),
            NODE_ID,
            self.http.trim_start_matches("http://"),
        );
        for d in &self.disks {
            args.extend(["--disk".into(), d.display().to_string()]);
        }
        args.extend(self.args.iter().cloned());
        let log = self.dir.path().join("bicsi.log");
        let proc = self
            .proc
            .insert(Proc::spawn_with_env(args, self.env.clone(), log));
        let endpoint = self.endpoint.clone();
        proc.wait_ready("bicsi", async || {
            CsiClient::connect(&endpoint).await.is_ok()
        })
        .await;
    }

    /// Runs the `bicsi` CLI against this server; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        crate::kit::cli(&self.http, Some(&self.endpoint), args)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bicsi.log")).unwrap_or_default()
    }

    pub async fn client(&self) -> CsiClient {
        CsiClient::connect(&self.endpoint).await.expect("connect")
    }

    /// SIGTERM and wait: the clean stop a user does.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
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

// ---- what the services advertise ------------------------------------------------------------

/// What a GetCapabilities call (`$call`, not yet awaited) advertises: the type of each of its
/// capabilities of the variant `$variant`.
macro_rules! advertised {
    ($call:expr, $($variant:ident)::+) => {
        $call
            .await
            .unwrap()
            .into_inner()
            .capabilities
            .into_iter()
            .filter_map(|cap| match cap.r#type {
                Some($($variant)::+(x)) => Some(x.r#type),
                _ => None,
            })
            .collect()
    };
}

/// The services GetPluginCapabilities advertises.
pub async fn plugin_services(c: &mut CsiClient) -> Vec<i32> {
    advertised!(
        c.identity
            .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {}),
        pb::plugin_capability::Type::Service
    )
}

/// The RPCs ControllerGetCapabilities advertises.
pub async fn controller_rpcs(c: &mut CsiClient) -> Vec<i32> {
    advertised!(
        c.controller
            .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {}),
        pb::controller_service_capability::Type::Rpc
    )
}

/// The RPCs NodeGetCapabilities advertises.
pub async fn node_rpcs(c: &mut CsiClient) -> Vec<i32> {
    advertised!(
        c.node
            .node_get_capabilities(pb::NodeGetCapabilitiesRequest {}),
        pb::node_service_capability::Type::Rpc
    )
}

/// The RPCs GroupControllerGetCapabilities advertises.
pub async fn group_rpcs(c: &mut CsiClient) -> Vec<i32> {
    advertised!(
        c.group
            .group_controller_get_capabilities(pb::GroupControllerGetCapabilitiesRequest {}),
        pb::group_controller_service_capability::Type::Rpc
    )
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
