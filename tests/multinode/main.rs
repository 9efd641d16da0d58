//! The split mode on one machine: a `bicsi controller` and several `bicsi node` agents on
//! 127.0.0.1, each with its own disks, ports and CSI socket. Backing image files travel between
//! the nodes over HTTP (data extents only, SHA-512 verified), and volumes whose replicas sit on
//! several nodes attach through NBD.

#[path = "../kit/mod.rs"]
mod kit;

#[path = "../conformance/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "../conformance/images.rs"]
#[allow(dead_code)]
mod images;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bicsi::client::CsiClient;
use bicsi::csi::pb;
use harness::*;
use kit::{
    Proc, cleanup_under, controller_args, controller_endpoint, csi_endpoint, free_port, node_args,
    noise, temp_dir,
};
use tonic::Code;

pub struct Node {
    pub id: String,
    pub dir: PathBuf,
    pub endpoint: String,
    pub disk: PathBuf,
    proc: Proc,
}

pub struct TestCluster {
    /// Disks made for the test (`xfs_disk`, `mount_xfs`).
    disks: Vec<kit::LoopFs>,
    pub dir: tempfile::TempDir,
    pub http: String,
    pub endpoint: String,
    pub nodes: Vec<Node>,
    controller: Proc,
}

impl TestCluster {
    pub async fn start(n: usize) -> TestCluster {
        TestCluster::start_with(n, &[]).await
    }

    /// `n` nodes, with `extra` flags for the controller and every node.
    pub async fn start_with(n: usize, extra: &[&str]) -> TestCluster {
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let dir = temp_dir("bicsi-multi-");
        let (http_port, cluster_port) = (free_port(), free_port());
        let endpoint = controller_endpoint(dir.path());
        let mut args = controller_args(dir.path(), http_port, cluster_port);
        args.extend(["--node-down-after".into(), "3".into()]);
        args.extend(extra.iter().cloned());
        let controller = Proc::spawn(args, dir.path().join("controller.log"));
        let mut nodes = Vec::new();
        for i in 1..=n {
            let id = format!("node-{i}");
            let ndir = dir.path().join(&id);
            let disk = ndir.join("disk");
            let endpoint = csi_endpoint(&ndir);
            let mut args = node_args(&id, &ndir, cluster_port, free_port(), free_port());
            args.extend(extra.iter().cloned());
            std::fs::create_dir_all(&ndir).unwrap();
            let proc = Proc::spawn(args, ndir.join("node.log"));
            nodes.push(Node {
                id,
                dir: ndir,
                endpoint,
                disk,
                proc,
            });
        }
        let c = TestCluster {
            disks: Vec::new(),
            dir,
            http: format!("http://127.0.0.1:{http_port}"),
            endpoint,
            nodes,
            controller,
        };
        c.wait_up(n).await;
        // In a cluster, downloads may not reach loopback by default; the image servers of these
        // tests live there, so the cluster opens a hole for 127.0.0.1 as an operator would.
        c.allow_loopback_downloads(true);
        c
    }

    /// Opens (or closes) the download guard's hole for 127.0.0.1, where the tests' image
    /// servers listen.
    pub fn allow_loopback_downloads(&self, yes: bool) {
        kit::allow_loopback_downloads(&self.http, yes);
    }

    pub fn logs(&self) -> String {
        let mut out = self.controller.log();
        for n in &self.nodes {
            out.push_str(&format!("\n--- {} ---\n{}", n.id, n.proc.log()));
        }
        out
    }

    pub fn node_log(&self, i: usize) -> String {
        self.nodes[i].proc.log()
    }

    /// Waits until `n` nodes are registered and up.
    pub async fn wait_up(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if harness::nodes_up(&self.http).await == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodes did not come up:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn controller_client(&self) -> CsiClient {
        CsiClient::connect(&self.endpoint).await.unwrap()
    }

    pub async fn node_client(&self, i: usize) -> CsiClient {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(c) = CsiClient::connect(&self.nodes[i].endpoint).await {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} socket:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        kit::cli(&self.http, None, args)
    }

    /// SIGTERM to node `i`'s agent, waiting for it to exit.
    pub fn stop_node(&mut self, i: usize) {
        self.nodes[i].proc.stop();
    }

    pub fn start_node(&mut self, i: usize) {
        self.nodes[i].proc.start();
    }

    /// Node `i`'s disk becomes an XFS with reflink of `bytes` on a loop device (a new disk at
    /// the same path; the agent is stopped meanwhile and waited for once it is back).
    pub async fn xfs_disk(&mut self, i: usize, bytes: u64) {
        self.stop_node(i);
        let image = self
            .dir
            .path()
            .join(format!("xfs-{}.img", self.nodes[i].id));
        let disk = kit::LoopFs::xfs(&image, &self.nodes[i].disk, bytes).unwrap();
        self.disks.push(disk);
        self.start_node(i);
        self.wait_up(self.nodes.len()).await;
    }
}

/// CreateVolume until the node agents answer for their disks (a restarted agent does once it
/// registered again).
async fn create_retrying(c: &TestCluster, ctl: &mut CsiClient, req: pb::CreateVolumeRequest) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ctl.controller.create_volume(req.clone()).await {
            Ok(_) => return,
            Err(s) if Instant::now() < deadline => {
                assert!(
                    matches!(s.code(), Code::FailedPrecondition | Code::Unavailable),
                    "{s:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("{s:?}\n{}", c.logs()),
        }
    }
}

/// The volume's record as the controller's HTTP API shows it.
async fn volume_record(c: &TestCluster, id: &str) -> serde_json::Value {
    let volumes: Vec<serde_json::Value> = reqwest::get(format!("{}/v1/volumes", c.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    volumes
        .into_iter()
        .find(|v| v["id"] == id)
        .unwrap_or_else(|| panic!("no volume {id}"))
}

/// Volume `id`'s record once every replica of it is rw, polled every 200 ms; fails with `what`
/// after `within`.
async fn all_replicas_rw(
    c: &TestCluster,
    id: &str,
    within: Duration,
    what: &str,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let v = volume_record(c, id).await;
        if v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["mode"] == "rw")
        {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {v}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.proc.kill9();
        }
        self.controller.kill9();
        cleanup_under(self.dir.path());
    }
}

async fn image(c: &TestCluster, name: &str) -> serde_json::Value {
    reqwest::get(format!("{}/v1/backingimages/{name}", c.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// ControllerPublish until the replicas are prepared (it answers Unavailable while files move).
async fn publish_retrying(
    c: &mut CsiClient,
    req: pb::ControllerPublishVolumeRequest,
) -> pb::ControllerPublishVolumeResponse {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c.controller.controller_publish_volume(req.clone()).await {
            Ok(r) => return r.into_inner(),
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("publish: {s:?}"),
        }
    }
}

fn sha512sum(path: &Path) -> String {
    let out = Command::new("sha512sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn backing_files(disk: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(disk.join("backing-images"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let f = e.path().join("backing");
        if f.is_file() {
            out.push(f);
        }
    }
    out
}

#[tokio::test]
async fn nodes_register_heartbeat_and_go_down() {
    let mut c = TestCluster::start(2).await;
    let (ok, out, err) = c.cli(&["get", "nodes"]);
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("node-1") && l.contains(" up ")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("node-2") && l.contains(" up ")),
        "{out}"
    );
    let (ok, disks, _) = c.cli(&["get", "disks"]);
    assert!(
        ok && disks.contains("node-1") && disks.contains("node-2"),
        "{disks}"
    );
    c.stop_node(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, out, _) = c.cli(&["get", "nodes"]);
        if out
            .lines()
            .any(|l| l.starts_with("node-2") && l.contains(" down "))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-2 never marked down:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.start_node(1);
    c.wait_up(2).await;
}

#[tokio::test]
async fn attaching_brings_the_image_to_every_replica_disk_and_writes_reach_every_replica() {
    if !root_or_skip("attaching_brings_the_image_to_every_replica_disk") {
        return;
    }
    let c = TestCluster::start(3).await;
    let work = c.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    // A sparse raw image: a filesystem of 64 MiB with a few MiB of data.
    let raw = images::ext4_image(&work, 64);
    let want = images::sha512(&raw);
    let server = images::ImageServer::start([("img.raw".to_string(), raw.clone())].into()).await;
    let params = images::seed_sc_params(&server.url("img.raw"), "bi-multi");
    let mut ctl = c.controller_client().await;
    let mut req = pb::CreateVolumeRequest {
        name: "vol-3".into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 128 * MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        parameters: params.iter().cloned().collect(),
        ..Default::default()
    };
    images::create_retrying(&mut ctl, req.clone())
        .await
        .unwrap();
    // Attach on node-2: every replica disk (one per node) gets a verified file.
    let mut publish = cpublish_req("vol-3", mount_cap(), false);
    publish.node_id = "node-2".into();
    let ctx = publish_retrying(&mut ctl, publish.clone())
        .await
        .publish_context;
    let img = image(&c, "bi-multi").await;
    let files = img["status"]["diskFileStatusMap"].as_object().unwrap();
    assert_eq!(files.len(), 3, "{img}");
    assert!(files.values().all(|f| f["state"] == "ready"), "{img}");
    for n in &c.nodes {
        let f = backing_files(&n.disk);
        assert_eq!(f.len(), 1, "{} holds the image once", n.id);
        assert_eq!(sha512sum(&f[0]), want, "{} has the right bytes", n.id);
    }
    // Only data crossed the wire: the receivers say so in their logs.
    let mut received = 0;
    for i in 0..3 {
        for line in c
            .node_log(i)
            .lines()
            .filter(|l| l.contains("received backing image file"))
        {
            received += 1;
            let field = |k: &str| -> u64 {
                let at = line.find(&format!("{k}=")).unwrap() + k.len() + 1;
                line[at..]
                    .split(|ch: char| !ch.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            let (wire, data) = (field("wire"), field("data"));
            assert!(
                wire <= data + data / 20 + 4096,
                "wire {wire} vs data {data}"
            );
            assert!(
                data < raw.len() as u64 / 2,
                "a sparse image sends less than its size: {data}"
            );
        }
    }
    assert_eq!(
        received,
        2,
        "two nodes received the file from the first:\n{}",
        c.logs()
    );

    // Stage on node-2 with the publish context: a quorum over one local and two NBD replicas.
    let mut n2 = c.node_client(1).await;
    let st = c.dir.path().join("st");
    let tg = c.dir.path().join("tg");
    let mut stage = stage_req("vol-3", &st, mount_cap());
    stage.publish_context = ctx.clone();
    n2.node.node_stage_volume(stage.clone()).await.unwrap();
    let mut pubr = publish_req("vol-3", &st, &tg, mount_cap(), false);
    pubr.publish_context = ctx.clone();
    n2.node.node_publish_volume(pubr).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(tg.join("hello.txt")).unwrap(),
        "hello from the backing image\n"
    );
    std::fs::write(tg.join("new.bin"), vec![9u8; 3 << 20]).unwrap();
    // Issue 19: the quorum's NBD children reach node-1's and node-3's qemu replica servers
    // over TLS with node-2's certificate; those servers require it and refuse a plain client.
    let engines = engines_under(&c.nodes[1].dir.join("data/engines"));
    assert_eq!(engines.len(), 1, "node-2 runs the volume's engine");
    let cmdline =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", engines[0])).unwrap())
            .replace('\0', " ");
    assert!(
        cmdline.contains("tls-creds-x509,id=bicsi-nbd-tls,endpoint=client,")
            && cmdline.matches("\"tls-creds\":\"bicsi-nbd-tls\"").count() == 2
            && cmdline.matches("\"tls-hostname\":\"bicsi-node\"").count() == 2,
        "{cmdline}"
    );
    for i in [0, 2] {
        let pid: i32 = std::fs::read_to_string(c.nodes[i].dir.join("data/replica-server/qsd.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let server =
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
                .replace('\0', " ");
        assert!(
            server.contains("endpoint=server,verify-peer=on")
                && server.contains("authz-simple,id=bicsi-nbd-authz,identity=CN=bicsi-node")
                && server.contains("\"tls-authz\":\"bicsi-nbd-authz\""),
            "{server}"
        );
        let port = server
            .split("\"port\":\"")
            .nth(1)
            .and_then(|p| p.split('"').next())
            .unwrap();
        let plain = Command::new("qemu-img")
            .args(["info", &format!("nbd://127.0.0.1:{port}/x")])
            .output()
            .unwrap();
        assert!(
            !plain.status.success() && String::from_utf8_lossy(&plain.stderr).contains("TLS"),
            "a plain NBD client reached node-{}'s replica server: {plain:?}",
            i + 1
        );
    }
    n2.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: "vol-3".into(),
            target_path: tg.display().to_string(),
        })
        .await
        .unwrap();
    n2.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: "vol-3".into(),
            staging_target_path: st.display().to_string(),
        })
        .await
        .unwrap();
    let mut unpub = pb::ControllerUnpublishVolumeRequest {
        volume_id: "vol-3".into(),
        node_id: "node-2".into(),
        ..Default::default()
    };
    ctl.controller
        .controller_unpublish_volume(unpub.clone())
        .await
        .unwrap();
    // Every replica holds the same guest content (qemu-img follows each one's backing file).
    let replicas: Vec<PathBuf> = c
        .nodes
        .iter()
        .flat_map(|n| {
            std::fs::read_dir(n.disk.join("replicas"))
                .unwrap()
                .flatten()
                .map(|e| e.path().join("volume.qcow2"))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(replicas.len(), 3);
    for r in &replicas[1..] {
        let out = Command::new("qemu-img")
            .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
            .arg(&replicas[0])
            .arg(r)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "replicas differ: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // A second volume on the same disks reuses the files: no transfer.
    req.name = "vol-3b".into();
    images::create_retrying(&mut ctl, req).await.unwrap();
    let mut publish = cpublish_req("vol-3b", mount_cap(), false);
    publish.node_id = "node-3".into();
    publish_retrying(&mut ctl, publish).await;
    let again: usize = (0..3)
        .map(|i| c.node_log(i).matches("received backing image file").count())
        .sum();
    assert_eq!(again, 2, "no new transfer for a second volume");
    unpub.volume_id = "vol-3b".into();
    unpub.node_id = "node-3".into();
    ctl.controller
        .controller_unpublish_volume(unpub)
        .await
        .unwrap();
    assert!(
        engines_under(c.dir.path()).len() <= 3,
        "only replica servers may remain"
    );
}

#[tokio::test]
async fn a_corrupted_transfer_is_caught_and_retried() {
    let c = TestCluster::start(2).await;
    let work = c.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = images::ext4_image(&work, 16);
    let server = images::ImageServer::start([("img.raw".to_string(), raw.clone())].into()).await;
    let mut ctl = c.controller_client().await;
    // The image lands on one node; a two-replica volume needs it on the other.
    let params = images::seed_sc_params(&server.url("img.raw"), "bi-corrupt");
    let mut req = pb::CreateVolumeRequest {
        name: "v".into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 32 * MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        parameters: params.into_iter().collect(),
        ..Default::default()
    };
    req.parameters.insert("numberOfReplicas".into(), "2".into());
    images::create_retrying(&mut ctl, req).await.unwrap();
    // CreateVolume does not wait for the first file; the corruption needs it in place.
    let deadline = Instant::now() + Duration::from_secs(60);
    let img = loop {
        let img = image(&c, "bi-corrupt").await;
        let ready = img["status"]["diskFileStatusMap"]
            .as_object()
            .is_some_and(|m| m.values().any(|f| f["state"] == "ready"));
        if ready {
            break img;
        }
        assert!(
            Instant::now() < deadline,
            "no ready file: {img}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (first_disk, first) = img["status"]["diskFileStatusMap"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, f)| f["state"] == "ready")
        .map(|(d, f)| (d.clone(), f["nodeId"].as_str().unwrap().to_string()))
        .unwrap();
    let src_node = c.nodes.iter().position(|n| n.id == first).unwrap();
    let src = backing_files(&c.nodes[src_node].disk).remove(0);
    // The sender's file has its manifest, made when its download's SHA-512 matched.
    let manifest = src.with_file_name("backing.manifest");
    let m = bicsi::sync::Manifest::parse(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(m.sha512, images::sha512(&raw));
    // Flip a byte of the source file after that: the receiver's chunk check against the
    // manifest must refuse it and name the chunk and the disk.
    let good = std::fs::read(&src).unwrap();
    let mut bad = good.clone();
    bad[4096] ^= 0xff;
    std::fs::write(&src, &bad).unwrap();
    let mut publish = cpublish_req("v", mount_cap(), false);
    publish.node_id = c.nodes[src_node].id.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let message = loop {
        let _ = ctl
            .controller
            .controller_publish_volume(publish.clone())
            .await;
        let img = image(&c, "bi-corrupt").await;
        let failed = img["status"]["diskFileStatusMap"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(d, f)| **d != first_disk && f["state"] == "failed")
            .map(|(_, f)| f["message"].as_str().unwrap().to_string());
        if let Some(m) = failed {
            break m;
        }
        // A chunk check fails within milliseconds and the next publish starts the sync again:
        // the failed state may be gone before it is seen, the receiver's log keeps it.
        let logged = c.node_log(1 - src_node);
        if let Some(line) = logged
            .lines()
            .find(|l| l.contains("backing image file failed"))
        {
            break line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "corruption not caught:\n{img}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let other = 1 - src_node;
    let other_disk = img_disk_of(&c, "bi-corrupt", &c.nodes[other].id).await;
    assert!(
        message.contains("chunk at offset 0 ")
            && message.contains("does not match the image's manifest")
            && message.contains(&format!("disk {other_disk}")),
        "{message}"
    );
    assert!(
        backing_files(&c.nodes[other].disk).is_empty(),
        "a corrupt file never becomes ready"
    );
    // Repair the source: the next attach retries the transfer and succeeds.
    std::fs::write(&src, &good).unwrap();
    publish_retrying(&mut ctl, publish).await;
    let received = backing_files(&c.nodes[other].disk).remove(0);
    assert_eq!(sha512sum(&received), images::sha512(&raw));
    // Verified against the sender's manifest, which now sits beside the received file too.
    assert!(
        c.node_log(other).contains("verified=manifest"),
        "{}",
        c.node_log(other)
    );
    assert_eq!(
        std::fs::read(received.with_file_name("backing.manifest")).unwrap(),
        std::fs::read(&manifest).unwrap()
    );
}

/// The id of the disk of `node` that the image's status lists.
/// Split mode: the controller learns the size from the download's head and answers CreateVolume
/// at once; the replicas on the node agents are made at attach, which waits for the file.
/// Issue 19's download guard in a cluster: by default a URL on loopback is refused with a message
/// naming the network and both settings, before anything connects to it; the allowed-networks
/// setting opens the hole and the same URL then downloads.
#[tokio::test]
async fn a_cluster_refuses_downloads_from_loopback_until_the_hole_is_opened() {
    let c = TestCluster::start(1).await;
    c.allow_loopback_downloads(false);
    let work = c.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = images::ext4_image(&work, 16);
    let server = images::ImageServer::start([("img.raw".to_string(), raw.clone())].into()).await;
    let mut params = images::seed_sc_params(&server.url("img.raw"), "bi-guard");
    params[0].1 = "1".into();
    let mut ctl = c.controller_client().await;
    let req = pb::CreateVolumeRequest {
        name: "vol-guard".into(),
        volume_capabilities: vec![mount_cap()],
        parameters: params.iter().cloned().collect(),
        ..Default::default()
    };
    let s = ctl
        .controller
        .create_volume(req.clone())
        .await
        .expect_err("a loopback URL in a cluster");
    println!("{}", s.message());
    assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
    for want in [
        "127.0.0.0/8 (loopback)",
        "backing-image-download-denied-networks",
        "backing-image-download-allowed-networks",
    ] {
        assert!(s.message().contains(want), "{want}: {}", s.message());
    }
    assert_eq!(server.hits(), 0, "the guard connected to the server");
    // The refused image waits out its backoff (as any failed source does): a new one downloads
    // at once.
    c.allow_loopback_downloads(true);
    let mut params = images::seed_sc_params(&server.url("img.raw"), "bi-guard2");
    params[0].1 = "1".into();
    let req = pb::CreateVolumeRequest {
        name: "vol-guard".into(),
        volume_capabilities: vec![mount_cap()],
        parameters: params.iter().cloned().collect(),
        ..Default::default()
    };
    let v = ctl
        .controller
        .create_volume(req)
        .await
        .unwrap_or_else(|s| panic!("CreateVolume with the hole open: {s:?}"))
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 16 * MIB);
    let mut publish = cpublish_req("vol-guard", mount_cap(), false);
    publish.node_id = "node-1".into();
    publish_retrying(&mut ctl, publish).await;
    let img = image(&c, "bi-guard2").await;
    let files = img["status"]["diskFileStatusMap"].as_object().unwrap();
    assert!(files.values().all(|f| f["state"] == "ready"), "{img}");
    assert!(server.hits() > 0);
}

#[tokio::test]
async fn create_volume_answers_at_once_while_a_node_agent_downloads() {
    let c = TestCluster::start(2).await;
    let work = c.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = images::ext4_image(&work, 32);
    let server = images::ImageServer::start([("img.raw".to_string(), raw.clone())].into()).await;
    server.set_rate(128 * 1024);
    let mut params = images::seed_sc_params(&server.url("img.raw"), "bi-split");
    params[0].1 = "2".into();
    let mut ctl = c.controller_client().await;
    let started = Instant::now();
    let v = ctl
        .controller
        .create_volume(pb::CreateVolumeRequest {
            name: "vol-split".into(),
            volume_capabilities: vec![mount_cap()],
            parameters: params.iter().cloned().collect(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("CreateVolume: {s:?}"))
        .into_inner()
        .volume
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(v.capacity_bytes, 32 * MIB);
    let img = image(&c, "bi-split").await;
    let files = img["status"]["diskFileStatusMap"].as_object().unwrap();
    assert!(files.values().all(|f| f["state"] != "ready"), "{img}");
    let mut publish = cpublish_req("vol-split", mount_cap(), false);
    publish.node_id = "node-2".into();
    let s = ctl
        .controller
        .controller_publish_volume(publish.clone())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    assert!(s.message().contains('%'), "{}", s.message());
    server.set_rate(0);
    publish_retrying(&mut ctl, publish).await;
    let img = image(&c, "bi-split").await;
    let files = img["status"]["diskFileStatusMap"].as_object().unwrap();
    assert_eq!(files.len(), 2, "{img}");
    assert!(files.values().all(|f| f["state"] == "ready"), "{img}");
    assert_eq!(img["status"]["virtualSize"], 32 * MIB);
}

async fn img_disk_of(c: &TestCluster, name: &str, node: &str) -> String {
    let img = image(c, name).await;
    img["status"]["diskFileStatusMap"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, f)| f["nodeId"] == node)
        .map(|(d, _)| d.clone())
        .unwrap_or_else(|| panic!("no file of {name} on {node}: {img}"))
}

#[tokio::test]
async fn a_returning_node_verifies_and_reuses_its_files() {
    use std::os::unix::fs::MetadataExt;
    let mut c = TestCluster::start(2).await;
    let work = c.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = images::ext4_image(&work, 8);
    let server = images::ImageServer::start([("i.raw".to_string(), raw.clone())].into()).await;
    let f = work.join("bi.yaml");
    std::fs::write(
        &f,
        format!(
            "apiVersion: longhorn.io/v1beta2\nkind: BackingImage\nmetadata:\n  name: bi-away\nspec:\n  sourceType: download\n  sourceParameters:\n    url: {}\n",
            server.url("i.raw")
        ),
    )
    .unwrap();
    let (ok, out, err) = c.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let file_state = |img: &serde_json::Value| -> (String, String, String) {
        let (_, f) = img["status"]["diskFileStatusMap"]
            .as_object()
            .unwrap()
            .iter()
            .next()
            .unwrap();
        (
            f["state"].as_str().unwrap().to_string(),
            f["message"].as_str().unwrap_or_default().to_string(),
            f["nodeId"].as_str().unwrap().to_string(),
        )
    };
    let http = c.http.clone();
    let wait_state = async |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let img: serde_json::Value = reqwest::get(format!("{http}/v1/backingimages/bi-away"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let s = file_state(&img);
            if s.0 == want {
                return s;
            }
            assert!(Instant::now() < deadline, "never {want}: {img}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let (_, _, holder) = wait_state("ready").await;
    let i = c.nodes.iter().position(|n| n.id == holder).unwrap();
    let path = backing_files(&c.nodes[i].disk).remove(0);
    let inode = std::fs::metadata(&path).unwrap().ino();
    c.stop_node(i);
    let (_, msg, _) = wait_state("unknown").await;
    assert!(msg.contains("is down"), "{msg}");
    c.start_node(i);
    let (_, msg, _) = wait_state("ready").await;
    assert!(msg.contains("verified"), "{msg}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().ino(),
        inode,
        "the same file, not a new download"
    );
}

#[tokio::test]
async fn a_file_changed_on_one_node_is_caught_by_its_scrub_and_synced_again_from_another() {
    let c = TestCluster::start_with(2, &["--lifecycle-tick-ms", "200"]).await;
    let work = c.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = images::ext4_image(&work, 8);
    let want = images::sha512(&raw);
    let server = images::ImageServer::start([("img.raw".to_string(), raw.clone())].into()).await;
    let mut params = images::seed_sc_params(&server.url("img.raw"), "bi-scrub");
    params[0].1 = "2".into();
    let mut ctl = c.controller_client().await;
    images::create_retrying(
        &mut ctl,
        pb::CreateVolumeRequest {
            name: "vol-s".into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap()],
            parameters: params.iter().cloned().collect(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut publish = cpublish_req("vol-s", mount_cap(), false);
    publish.node_id = "node-1".into();
    publish_retrying(&mut ctl, publish).await;
    let files: Vec<PathBuf> = c
        .nodes
        .iter()
        .map(|n| backing_files(&n.disk).remove(0))
        .collect();
    // node-2's copy changes on disk; the setting reaches node-2 through the controller's store.
    let mut bytes = std::fs::read(&files[1]).unwrap();
    bytes[8192] ^= 0x5a;
    std::fs::write(&files[1], bytes).unwrap();
    let (ok, _, err) = c.cli(&["set", "setting", "backing-image-scrub-interval", "1"]);
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let img = image(&c, "bi-scrub").await;
        let states = img["status"]["diskFileStatusMap"].as_object().unwrap();
        if states.len() == 2
            && states.values().all(|f| f["state"] == "ready")
            && sha512sum(&files[1]) == want
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not recovered: {img}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        c.node_log(1).contains("scrub: checksum mismatch on disk"),
        "{}",
        c.logs()
    );
    assert!(
        c.logs().contains("syncing it again from a ready one"),
        "synced again from node-1:\n{}",
        c.logs()
    );
    assert_eq!(sha512sum(&files[0]), want);
}

/// Publishes `volume` to node `i` and stages and publishes it there; returns the target path.
async fn attach_on(c: &TestCluster, ctl: &mut CsiClient, volume: &str, i: usize) -> PathBuf {
    attach_as(c, ctl, volume, i, mount_cap()).await
}

/// `attach_on` with capability `cap` (for a block volume the target is the device's file).
async fn attach_as(
    c: &TestCluster,
    ctl: &mut CsiClient,
    volume: &str,
    i: usize,
    cap: pb::VolumeCapability,
) -> PathBuf {
    let mut publish = cpublish_req(volume, cap.clone(), false);
    publish.node_id = c.nodes[i].id.clone();
    let ctx = publish_retrying(ctl, publish).await.publish_context;
    let mut node = c.node_client(i).await;
    let st = c.dir.path().join(format!("st-{volume}"));
    let tg = c.dir.path().join(format!("tg-{volume}"));
    let mut stage = stage_req(volume, &st, cap.clone());
    stage.publish_context = ctx.clone();
    node.node.node_stage_volume(stage).await.unwrap();
    let mut pubr = publish_req(volume, &st, &tg, cap, false);
    pubr.publish_context = ctx;
    node.node.node_publish_volume(pubr).await.unwrap();
    tg
}

async fn detach_from(c: &TestCluster, ctl: &mut CsiClient, volume: &str, i: usize) {
    let mut node = c.node_client(i).await;
    node.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: volume.into(),
            target_path: c
                .dir
                .path()
                .join(format!("tg-{volume}"))
                .display()
                .to_string(),
        })
        .await
        .unwrap();
    node.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: volume.into(),
            staging_target_path: c
                .dir
                .path()
                .join(format!("st-{volume}"))
                .display()
                .to_string(),
        })
        .await
        .unwrap();
    ctl.controller
        .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: volume.into(),
            node_id: c.nodes[i].id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
}

fn write_synced(dir: &Path, name: &str, bytes: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join(name)).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

/// Snapshots, restores and clones in the split mode go through the node agents' API: the
/// attached node's engine takes the point in time, the snapshot stays on that node's disk, and
/// the restored volume attaches from another node over NBD.
#[tokio::test]
async fn snapshots_restores_and_clones_through_the_node_agents() {
    if !root_or_skip("snapshots_restores_and_clones_through_the_node_agents") {
        return;
    }
    let c = TestCluster::start(2).await;
    let mut ctl = c.controller_client().await;
    ctl.controller
        .create_volume(create_req("src", 64 * MIB, &[("numberOfReplicas", "2")]))
        .await
        .unwrap();
    let tg = attach_on(&c, &mut ctl, "src", 0).await;
    write_synced(&tg, "before.txt", b"before the snapshot");
    let snap = ctl
        .controller
        .create_snapshot(pb::CreateSnapshotRequest {
            name: "snap-split".into(),
            source_volume_id: "src".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", c.logs()))
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    assert!(
        c.node_log(0)
            .contains("point-in-time copy made by the volume's engine"),
        "node-1's engine did not take the snapshot:\n{}",
        c.logs()
    );
    let file = c.nodes[0].disk.join("snapshots/snap-split/snapshot.qcow2");
    assert!(file.is_file(), "{}", file.display());
    write_synced(&tg, "after.txt", b"after the snapshot");
    detach_from(&c, &mut ctl, "src", 0).await;

    // Restored on node-1's disk (where the snapshot is), attached on node-2 through NBD.
    let mut req = create_req("restored", 64 * MIB, &[("numberOfReplicas", "1")]);
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(
            pb::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    ctl.controller.create_volume(req).await.unwrap();
    let tg = attach_on(&c, &mut ctl, "restored", 1).await;
    assert_eq!(
        std::fs::read(tg.join("before.txt")).unwrap(),
        b"before the snapshot"
    );
    assert!(!tg.join("after.txt").exists());
    detach_from(&c, &mut ctl, "restored", 1).await;

    // A clone of the detached source has everything.
    let mut req = create_req("cloned", 64 * MIB, &[("numberOfReplicas", "1")]);
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Volume(
            pb::volume_content_source::VolumeSource {
                volume_id: "src".into(),
            },
        )),
    });
    ctl.controller.create_volume(req).await.unwrap();
    let tg = attach_on(&c, &mut ctl, "cloned", 0).await;
    assert_eq!(
        std::fs::read(tg.join("after.txt")).unwrap(),
        b"after the snapshot"
    );
    detach_from(&c, &mut ctl, "cloned", 0).await;

    ctl.controller
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!file.exists(), "the node agent removed the snapshot file");
}

/// A node's `--max-volumes-per-node` reaches the controller at registration: NodeGetInfo
/// reports it, and ControllerPublishVolume refuses a publish beyond it with ResourceExhausted.
#[tokio::test]
async fn a_node_tells_the_controller_its_attach_limit() {
    let mut c = TestCluster::start(1).await;
    c.stop_node(0);
    c.nodes[0]
        .proc
        .args_mut()
        .extend(["--max-volumes-per-node".to_string(), "1".to_string()]);
    c.start_node(0);
    let mut node = c.node_client(0).await;
    let info = node
        .node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.max_volumes_per_node, 1);
    let mut ctl = c.controller_client().await;
    for v in ["lim-1", "lim-2"] {
        for _ in 0..2 {
            ctl.controller
                .create_volume(create_req(v, 16 * MIB, &[("numberOfReplicas", "1")]))
                .await
                .unwrap();
        }
    }
    let publish = |v: &str| pb::ControllerPublishVolumeRequest {
        volume_id: v.into(),
        node_id: "node-1".into(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    };
    publish_retrying(&mut ctl, publish("lim-1")).await;
    // The restarted node registers again with its limit; until then the controller knows the
    // old registration (no limit), and the second publish is undone and tried again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ctl
            .controller
            .controller_publish_volume(publish("lim-2"))
            .await
        {
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(
                    s.message().contains("node \"node-1\"") && s.message().contains("limit of 1"),
                    "{}",
                    s.message()
                );
                break;
            }
            Err(s) if s.code() == Code::Unavailable => {}
            Ok(_) => {
                ctl.controller
                    .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                        volume_id: "lim-2".into(),
                        node_id: "node-1".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
            Err(s) => panic!("publish lim-2: {s:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the controller never learned the node's limit:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Idempotent at the limit.
    publish_retrying(&mut ctl, publish("lim-1")).await;
}

/// A group snapshot through the node agents (the SnapshotGroup Agent RPC): each member's file
/// on its volume's node, each restorable, all deleted with their group.
#[tokio::test]
async fn group_snapshots_through_the_node_agents() {
    let c = TestCluster::start(2).await;
    let mut ctl = c.controller_client().await;
    for v in ["gm-1", "gm-2", "gm-3"] {
        for _ in 0..2 {
            ctl.controller
                .create_volume(create_req(v, 16 * MIB, &[("numberOfReplicas", "1")]))
                .await
                .unwrap();
        }
    }
    let req = pb::CreateVolumeGroupSnapshotRequest {
        name: "g-split".into(),
        source_volume_ids: vec!["gm-1".into(), "gm-2".into(), "gm-3".into()],
        ..Default::default()
    };
    let g = ctl
        .group
        .create_volume_group_snapshot(req.clone())
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    let again = ctl
        .group
        .create_volume_group_snapshot(req)
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(g, again);
    assert_eq!(g.snapshots.len(), 3);
    // The members' files are on the nodes' disks, captured by their agents.
    let files = |c: &TestCluster| -> usize {
        c.nodes
            .iter()
            .map(|n| {
                std::fs::read_dir(n.disk.join("snapshots"))
                    .map(|d| d.count())
                    .unwrap_or(0)
            })
            .sum()
    };
    assert_eq!(files(&c), 3);
    for s in &g.snapshots {
        assert_eq!(s.group_snapshot_id, g.group_snapshot_id);
        let mut restore = create_req(&format!("r-{}", s.source_volume_id), 16 * MIB, &[]);
        restore.volume_content_source = Some(pb::VolumeContentSource {
            r#type: Some(pb::volume_content_source::Type::Snapshot(
                pb::volume_content_source::SnapshotSource {
                    snapshot_id: s.snapshot_id.clone(),
                },
            )),
        });
        for _ in 0..2 {
            ctl.controller.create_volume(restore.clone()).await.unwrap();
        }
    }
    for _ in 0..2 {
        ctl.group
            .delete_volume_group_snapshot(pb::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: g.group_snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let left = ctl
        .controller
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(files(&c), 0);
}

/// A loop-engine volume (its raw replica on node-1's XFS-with-reflink disk) attaches on node-2
/// through qemu-storage-daemon over NBD (node-1's raw replica server, bicsi's own, serves the
/// raw file), and what node-2 wrote reads back when node-1 attaches it with its loop device.
#[tokio::test]
async fn a_loop_volume_attaches_on_another_node_over_nbd() {
    if !root_or_skip("a_loop_volume_attaches_on_another_node_over_nbd") {
        return;
    }
    if Command::new("mkfs.xfs").arg("-V").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "mkfs.xfs is missing");
        eprintln!("SKIP a_loop_volume_attaches_on_another_node_over_nbd: no mkfs.xfs");
        return;
    }
    let mut c = TestCluster::start(2).await;
    // node-1's disk becomes XFS with reflink (a new disk at the same path).
    c.xfs_disk(0, 512 << 20).await;
    let mut ctl = c.controller_client().await;
    let params = [("numberOfReplicas", "1"), ("engine", "loop")];
    create_retrying(&c, &mut ctl, create_req("lv", 64 * MIB, &params)).await;
    let record = volume_record(&c, "lv").await;
    assert_eq!(record["spec"]["engine"], "loop", "{record}");
    let replica = PathBuf::from(record["replicas"][0]["path"].as_str().unwrap());
    assert!(
        replica.starts_with(&c.nodes[0].disk) && replica.ends_with("volume.raw"),
        "{}",
        replica.display()
    );

    // On node-2: the mirror engine with node-1's replica as its one remote, read by bicsi's
    // NBD client (over TLS) from the replica server on node-1 serving the raw file.
    let tg = attach_on(&c, &mut ctl, "lv", 1).await;
    write_synced(&tg, "remote.txt", b"written from node-2 over NBD");
    assert_eq!(
        mirror_engines_under(&c.nodes[1].dir).len(),
        1,
        "node-2 serves it with the mirror engine"
    );
    assert!(
        engines_under(&c.nodes[1].dir).is_empty(),
        "no qemu-storage-daemon (its NBD client would meet a TLS-only server)"
    );
    // node-1's raw replicas are served by bicsi's own replica server, which outlives a restart
    // of node-1's agent: the restarted agent finds it (and its export) and stops it with the
    // release at the detach.
    let raw_server = c.nodes[0].dir.join("data/replica-server-raw");
    let server_pid = || -> i32 {
        std::fs::read_to_string(raw_server.join("server.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let pid = server_pid();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("replica-server"));
    c.stop_node(0);
    c.start_node(0);
    c.wait_up(2).await;
    assert_eq!(server_pid(), pid, "the replica server outlived the agent");
    write_synced(
        &tg,
        "after-restart.txt",
        b"node-1's agent restarted meanwhile",
    );
    detach_from(&c, &mut ctl, "lv", 1).await;
    assert!(
        !raw_server.exists(),
        "the release stopped the re-adopted server"
    );
    let gone = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |st| {
        st.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    });
    assert!(gone, "replica server pid {pid} still runs");

    // On node-1: the loop device straight on the replica, no engine.
    let tg = attach_on(&c, &mut ctl, "lv", 0).await;
    assert_eq!(
        std::fs::read(tg.join("remote.txt")).unwrap(),
        b"written from node-2 over NBD"
    );
    assert_eq!(
        std::fs::read(tg.join("after-restart.txt")).unwrap(),
        b"node-1's agent restarted meanwhile"
    );
    assert!(
        engines_under(&c.nodes[0].dir.join("data")).is_empty(),
        "node-1 runs no engine for it"
    );
    assert_eq!(loops_under(&c.nodes[0].disk).len(), 1);
    detach_from(&c, &mut ctl, "lv", 0).await;
    ctl.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: "lv".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!replica.exists());
}

/// fio over the block device (or its bind-mounted target file) `dev`: a crc32c-verified pattern
/// laid down at `offset` (random 4k at depth 32, `mib` MiB) and read back, or (`verify_only`)
/// only the check of what an earlier run wrote there. `rate`: limit the writes (bytes/s).
fn fio_at(dev: &Path, offset_mib: u64, mib: u64, verify_only: bool, rate: Option<&str>) {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=verified",
        "--rw=randwrite",
        "--bs=4k",
        "--ioengine=libaio",
        "--iodepth=32",
        "--direct=1",
        "--verify=crc32c",
        "--verify_fatal=1",
        // No `*-verify.state` file in the working directory (the repository's, under cargo).
        "--verify_state_save=0",
        "--randrepeat=1",
        "--output-format=terse",
    ])
    .arg(format!("--filename={}", dev.display()))
    .arg(format!("--offset={offset_mib}M"))
    .arg(format!("--size={mib}M"));
    if let Some(rate) = rate {
        cmd.arg(format!("--rate={rate}"));
    }
    if verify_only {
        cmd.arg("--verify_only");
    }
    let out = cmd.output().expect("fio");
    assert!(
        out.status.success(),
        "fio at {offset_mib}M (verify_only={verify_only}) failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 14's remote replica on the mirror engine: two node agents, each with an XFS disk
/// (reflink), a 2-replica block volume gets `mirror` with one replica per node; attached on
/// node-1, the engine writes its local file and node-2's replica over its own NBD client. fio's
/// crc32c pattern reads back through attach, detach, re-attach and an attach on node-2 (where
/// node-1's replica is the remote one). Then node-2's replica server is killed (kill -9) while
/// fio writes: the writes go on, the replica is marked err with the engine's reason, the volume
/// is degraded, and everything fio wrote verifies; once detached the replica is rebuilt across
/// the nodes, the two files are identical, and node-2 reads everything back from its own.
#[tokio::test]
async fn a_mirror_volume_with_replicas_on_two_nodes_writes_both_and_outlives_the_remote() {
    let test = "a_mirror_volume_with_replicas_on_two_nodes_writes_both_and_outlives_the_remote";
    if !root_or_skip(test) {
        return;
    }
    for tool in ["mkfs.xfs", "fio"] {
        if Command::new(tool).arg("--version").output().is_err()
            && Command::new(tool).arg("-V").output().is_err()
        {
            assert!(std::env::var_os("CI").is_none(), "{tool} is missing");
            eprintln!("SKIP {test}: no {tool}");
            return;
        }
    }
    let mut c = TestCluster::start(2).await;
    c.xfs_disk(0, 768 << 20).await;
    c.xfs_disk(1, 768 << 20).await;
    let put = reqwest::Client::new()
        .put(format!("{}/v1/settings/replica-timeout", c.http))
        .json(&serde_json::json!({"value": "3"}))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{put:?}");
    let mut ctl = c.controller_client().await;
    let mut req = create_req("mr", 128 * MIB, &[("numberOfReplicas", "2")]);
    req.volume_capabilities = vec![block_cap()];
    create_retrying(&c, &mut ctl, req).await;
    let record = volume_record(&c, "mr").await;
    assert_eq!(record["spec"]["engine"], "mirror", "{record}");
    let mut nodes: Vec<&str> = record["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["nodeId"].as_str().unwrap())
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["node-1", "node-2"], "{record}");
    let replica_on = |node: &str| {
        PathBuf::from(
            record["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["nodeId"] == node)
                .unwrap()["path"]
                .as_str()
                .unwrap(),
        )
    };
    let (r1, r2) = (replica_on("node-1"), replica_on("node-2"));

    // On node-1: the mirror engine, node-2's replica on its command line as an NBD address.
    let dev = attach_as(&c, &mut ctl, "mr", 0, block_cap()).await;
    let engines = mirror_engines_under(&c.nodes[0].dir);
    assert_eq!(engines.len(), 1, "node-1 serves it with the mirror engine");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", engines[0])).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("--remote nbd://127.0.0.1:") && cmdline.contains("--replica-timeout 3"),
        "{cmdline}"
    );
    // Issue 19: the engine reaches node-2's replica server over TLS with node-1's certificate,
    // and that server refuses a client without one (qemu's, plain NBD) while the engine uses it.
    assert!(cmdline.contains("--tls-dir "), "{cmdline}");
    let remote_url = cmdline
        .split_whitespace()
        .find(|a| a.starts_with("nbd://"))
        .unwrap()
        .to_string();
    let plain = Command::new("qemu-img")
        .args(["info", &remote_url])
        .output()
        .unwrap();
    assert!(
        !plain.status.success() && String::from_utf8_lossy(&plain.stderr).contains("TLS"),
        "a plain NBD client read node-2's replica: {plain:?}"
    );
    assert!(
        engines_under(&c.nodes[0].dir).is_empty(),
        "no qemu-storage-daemon serves it"
    );
    fio_at(&dev, 0, 24, false, None);
    detach_from(&c, &mut ctl, "mr", 0).await;
    // Both replica files hold what was written: the remote one got every write.
    let same = Command::new("cmp").arg(&r1).arg(&r2).status().unwrap();
    assert!(same.success(), "the replicas differ after a clean detach");
    let dev = attach_as(&c, &mut ctl, "mr", 0, block_cap()).await;
    fio_at(&dev, 0, 24, true, None);
    detach_from(&c, &mut ctl, "mr", 0).await;
    // On node-2, node-1's replica is the remote one.
    let dev = attach_as(&c, &mut ctl, "mr", 1, block_cap()).await;
    assert_eq!(mirror_engines_under(&c.nodes[1].dir).len(), 1);
    fio_at(&dev, 0, 24, true, None);
    detach_from(&c, &mut ctl, "mr", 1).await;

    // Attached on node-1 again; node-2's replica server dies while fio writes.
    let dev = attach_as(&c, &mut ctl, "mr", 0, block_cap()).await;
    let engines = mirror_engines_under(&c.nodes[0].dir);
    let writer = {
        let dev = dev.clone();
        std::thread::spawn(move || fio_at(&dev, 64, 16, false, Some("4m")))
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Raw replicas are served by bicsi's own replica server, not qemu-storage-daemon's.
    let server_pid: i32 =
        std::fs::read_to_string(c.nodes[1].dir.join("data/replica-server-raw/server.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    // Marked err within the replica timeout, while fio still writes; watched closely, as the
    // online rebuild below follows within seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    let remote = loop {
        let v = volume_record(&c, "mr").await;
        let remote = v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["nodeId"] == "node-2")
            .unwrap()
            .clone();
        if remote["mode"] == "err" || Instant::now() > deadline {
            break remote;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(remote["mode"], "err", "{remote}\n{}", c.logs());
    let reason = remote["modeReason"].as_str().unwrap();
    assert!(
        reason.contains("mirror engine dropped replica nbd://127.0.0.1:"),
        "{remote}"
    );
    let cond = ctl
        .controller
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: "mr".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(
        cond.abnormal && cond.message.contains("degraded"),
        "{cond:?}"
    );
    while !writer.is_finished() {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "fio stays blocked after the remote replica died:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer
        .join()
        .expect("fio's writes go on without the remote replica");
    let local = volume_record(&c, "mr").await["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["nodeId"] == "node-1")
        .unwrap()
        .clone();
    assert_eq!(local["mode"], "rw", "{local}");
    // Every acknowledged write reads back: before the fault and across it.
    fio_at(&dev, 0, 24, true, None);
    fio_at(&dev, 64, 16, true, None);

    // Still attached: the controller rebuilds node-2's replica online (issue 15): node-2
    // exports its file again and node-1's engine fills it in place over NBD while it serves
    // the volume; rw only once the engine verified it. The engine is the same process.
    all_replicas_rw(
        &c,
        "mr",
        Duration::from_secs(60),
        "no online rebuild of the remote replica",
    )
    .await;
    assert!(
        c.logs()
            .contains("online rebuild of a remote replica started in the mirror engine"),
        "{}",
        c.logs()
    );
    assert_eq!(
        mirror_engines_under(&c.nodes[0].dir),
        engines,
        "the same engine serves it"
    );
    fio_at(&dev, 0, 24, true, None);
    fio_at(&dev, 64, 16, true, None);
    // Written after the rebuild: it reaches the rebuilt remote replica too.
    fio_at(&dev, 100, 8, false, None);
    detach_from(&c, &mut ctl, "mr", 0).await;

    // Detached: every replica is rw (rebuilt above, or, had the online rebuild been cut, by
    // the detached pass from node-1's, raw, across nodes); identical, and node-2's engine reads
    // everything back from its own.
    let v = all_replicas_rw(&c, "mr", Duration::from_secs(90), "no rebuild").await;
    let paths: Vec<&str> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    let same = Command::new("cmp").args(&paths).status().unwrap();
    assert!(same.success(), "the replicas differ after the rebuild: {v}");
    let dev = attach_as(&c, &mut ctl, "mr", 1, block_cap()).await;
    fio_at(&dev, 0, 24, true, None);
    fio_at(&dev, 64, 16, true, None);
    fio_at(&dev, 100, 8, true, None);
    detach_from(&c, &mut ctl, "mr", 1).await;
}

/// The replica-timeout setting on a volume whose second replica is on another node: that node's
/// replica server is stopped (SIGSTOP: its kernel still holds the connection open, nothing
/// answers). The volume's writes resume within a few seconds of the setting, the stalled replica
/// is marked err, and every synced file reads back.
#[tokio::test]
async fn a_stalled_remote_replica_stops_blocking_writes_and_is_marked_err() {
    if !root_or_skip("a_stalled_remote_replica_stops_blocking_writes_and_is_marked_err") {
        return;
    }
    remote_replica_fault(RemoteFault::Stall).await;
}

/// The same with the remote replica's TCP connection cut (`ss -K`) while the volume writes.
#[tokio::test]
async fn a_remote_replica_whose_connection_is_cut_is_marked_err_and_rebuilt() {
    if !root_or_skip("a_remote_replica_whose_connection_is_cut_is_marked_err_and_rebuilt") {
        return;
    }
    remote_replica_fault(RemoteFault::Cut).await;
}

/// The same with the remote node's replica server killed (kill -9) while the volume writes.
#[tokio::test]
async fn a_remote_replica_whose_server_is_killed_is_marked_err_and_rebuilt() {
    if !root_or_skip("a_remote_replica_whose_server_is_killed_is_marked_err_and_rebuilt") {
        return;
    }
    remote_replica_fault(RemoteFault::Kill).await;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RemoteFault {
    Stall,
    Cut,
    Kill,
}

/// A 2-replica volume, one replica per node, attached on node-1 with a file written; then the
/// fault on node-2's replica server and a second synced write, which must complete (within a few
/// seconds of replica-timeout for a stall); node-2's replica is marked err, both files read back,
/// and once detached the replica is rebuilt across nodes and found identical.
async fn remote_replica_fault(fault: RemoteFault) {
    let c = TestCluster::start(2).await;
    let put = reqwest::Client::new()
        .put(format!("{}/v1/settings/replica-timeout", c.http))
        .json(&serde_json::json!({"value": "2"}))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{put:?}");
    let mut ctl = c.controller_client().await;
    ctl.controller
        .create_volume(pb::CreateVolumeRequest {
            name: "vol-h".into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap()],
            parameters: [("numberOfReplicas".to_string(), "2".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let tg = attach_on(&c, &mut ctl, "vol-h", 0).await;
    let a = noise(4 << 20, 1);
    write_synced(&tg, "a", &a);

    let server_pid: i32 =
        std::fs::read_to_string(c.nodes[1].dir.join("data/replica-server/qsd.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let pid = nix::unistd::Pid::from_raw(server_pid);
    let port: u16 = {
        let v: Vec<serde_json::Value> = reqwest::get(format!("{}/v1/volumes", c.http))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let targets = v[0]["publication"]["targets"].as_array().unwrap().clone();
        targets
            .iter()
            .find_map(|t| t["Nbd"]["port"].as_u64())
            .unwrap() as u16
    };
    match fault {
        RemoteFault::Stall => {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap()
        }
        RemoteFault::Kill => {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap()
        }
        RemoteFault::Cut => {
            let st = Command::new("ss")
                .args([
                    "-K",
                    "-t",
                    "dst",
                    "127.0.0.1",
                    "dport",
                    "=",
                    &port.to_string(),
                ])
                .output()
                .unwrap();
            assert!(st.status.success(), "{st:?}");
        }
    }
    let started = Instant::now();
    let b = noise(4 << 20, 2);
    let (dir, bytes) = (tg.clone(), b.clone());
    let writer = std::thread::spawn(move || write_synced(&dir, "b", &bytes));
    let deadline = Instant::now() + Duration::from_secs(40);
    while !writer.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let finished = writer.is_finished();
    let took = started.elapsed();
    if fault == RemoteFault::Stall {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    }
    assert!(
        finished,
        "the write stayed blocked on the stalled replica:\n{}",
        c.logs()
    );
    writer.join().unwrap();
    eprintln!("{fault:?}: a synced 4 MiB write took {took:?} (replica-timeout 2 s)");
    assert!(took < Duration::from_secs(15), "took {took:?}");

    // The write resumes when the connections are cut; the record is marked in the same pass or
    // the next one (0.5 s later).
    let deadline = Instant::now() + Duration::from_secs(5);
    let v = loop {
        let volumes: Vec<serde_json::Value> = reqwest::get(format!("{}/v1/volumes", c.http))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let v = volumes.into_iter().find(|v| v["id"] == "vol-h").unwrap();
        let marked = v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["nodeId"] == "node-2" && r["mode"] == "err");
        if marked || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let remote = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["nodeId"] == "node-2")
        .unwrap();
    assert_eq!(remote["mode"], "err", "{v}");
    let reason = remote["modeReason"].as_str().unwrap();
    match fault {
        RemoteFault::Stall => assert!(reason.contains("did not answer"), "{remote}"),
        // qemu's report of the writes that failed on that child (QUORUM_REPORT_BAD), or, when
        // its NBD client logged the failure first without naming the child, that log line
        // (which marks every remote replica): either comes first, depending on timing.
        // Or, when the cut connection was re-established by qemu before either, the
        // reconnection (the replica missed the writes in between).
        RemoteFault::Cut | RemoteFault::Kill => assert!(
            reason.contains("failed")
                || reason.contains("NBD client logged")
                || reason.contains("NBD connection dropped"),
            "{remote}"
        ),
    }
    assert_eq!(std::fs::read(tg.join("a")).unwrap(), a);
    assert_eq!(std::fs::read(tg.join("b")).unwrap(), b);
    let listed = ctl
        .controller
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: "vol-h".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = listed.status.unwrap().volume_condition.unwrap();
    let events = std::fs::read_to_string(c.nodes[0].dir.join("data/engines/vol-h/events.log"))
        .unwrap_or_default();
    assert!(
        cond.abnormal && cond.message.contains("degraded"),
        "{cond:?}\nevents:\n{events}"
    );
    // Later reports (the writes cut with the connection) leave the local replica rw.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v: Vec<serde_json::Value> = reqwest::get(format!("{}/v1/volumes", c.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let local = v[0]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["nodeId"] == "node-1")
        .unwrap()
        .clone();
    assert_eq!(local["mode"], "rw", "{local}\nevents:\n{events}");
    detach_from(&c, &mut ctl, "vol-h", 0).await;

    // Detached: the controller's pass rebuilds the stalled replica on its own node from the
    // other node's (exported over NBD, copied, compared), and only then is it rw.
    let detached = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    let replicas = loop {
        let v: Vec<serde_json::Value> = reqwest::get(format!("{}/v1/volumes", c.http))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let reps = v[0]["replicas"].as_array().unwrap().clone();
        if reps.iter().all(|r| r["mode"] == "rw") {
            break reps;
        }
        assert!(
            Instant::now() < deadline,
            "no rebuild: {reps:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "{fault:?}: the remote replica was rebuilt from the other node {:?} after the detach",
        detached.elapsed()
    );
    let rebuilt = replicas.iter().find(|r| r["nodeId"] == "node-2").unwrap();
    assert!(
        rebuilt["modeReason"]
            .as_str()
            .unwrap()
            .contains("verified identical"),
        "{rebuilt}"
    );
    let same = Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(replicas[0]["path"].as_str().unwrap())
        .arg(replicas[1]["path"].as_str().unwrap())
        .status()
        .unwrap();
    assert_eq!(
        same.code(),
        Some(0),
        "the replicas differ after the rebuild"
    );
    // Both replicas serve the data again.
    let tg = attach_on(&c, &mut ctl, "vol-h", 1).await;
    assert_eq!(std::fs::read(tg.join("a")).unwrap(), a);
    assert_eq!(std::fs::read(tg.join("b")).unwrap(), b);
    detach_from(&c, &mut ctl, "vol-h", 1).await;
}

/// Backups in the split mode go through the node agents' Agent RPCs (BackupFile, BackupImage,
/// RestoreBackupFile): a volume over a downloaded image, written on node-1, is backed up to a
/// `file://` target (its backing image with it, by the node holding the image's file) and
/// restored into a new volume that attaches on node-2 with the same bytes.
#[tokio::test]
async fn a_backup_and_its_restore_run_through_the_node_agents() {
    if !root_or_skip("a_backup_and_its_restore_run_through_the_node_agents") {
        return;
    }
    let c = TestCluster::start(2).await;
    let work = c.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = images::ext4_image(&work, 64);
    let server = images::ImageServer::start([("img.raw".to_string(), raw)].into()).await;
    let mut params = images::seed_sc_params(&server.url("img.raw"), "bi-bak");
    for (k, v) in &mut params {
        if k == "numberOfReplicas" {
            *v = "1".into();
        }
    }
    let mut ctl = c.controller_client().await;
    let req = pb::CreateVolumeRequest {
        name: "bak-src".into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 64 * MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        parameters: params.iter().cloned().collect(),
        ..Default::default()
    };
    images::create_retrying(&mut ctl, req).await.unwrap();
    let data = noise(3 * MIB as usize + 12_345, 17);
    let tg = attach_on(&c, &mut ctl, "bak-src", 0).await;
    write_synced(&tg, "data.bin", &data);
    detach_from(&c, &mut ctl, "bak-src", 0).await;

    let target = c.dir.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let url = format!("file://{}", target.display());
    let (ok, _, err) = c.cli(&["set", "setting", "backup-target", &url]);
    assert!(ok, "{err}");
    let (ok, out, err) = c.cli(&["backup", "create", "bak-src", "--name", "bak-1"]);
    assert!(ok, "{out}{err}\n{}", c.logs());
    assert!(out.contains("backup bak-1 completed"), "{out}");
    // The record's block counts come only from the progress the node streamed back.
    let (ok, out, err) = c.cli(&["backup", "list", "bak-src", "-o", "json"]);
    assert!(ok, "{err}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let rec = list.iter().find(|b| b["name"] == "bak-1").expect("bak-1");
    assert!(rec["blocksUploaded"].as_u64().unwrap() >= 2, "{rec}");
    assert_eq!(rec["blocksDone"], rec["blocksTotal"], "{rec}");
    assert!(
        target
            .join("backupvolumes/bak-src/backups/bak-1.json")
            .is_file(),
        "the metadata is in the target"
    );
    // The first backup over the image backed the image up too, through BackupImage.
    let image_meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(target.join("backingimages/bi-bak/image.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(image_meta["name"], "bi-bak", "{image_meta}");

    let (ok, out, err) = c.cli(&["backup", "restore", "bak-1", "bak-copy"]);
    assert!(ok, "{out}{err}\n{}", c.logs());
    assert!(
        out.contains("volume bak-copy restored from backup bak-1"),
        "{out}"
    );
    let tg = attach_on(&c, &mut ctl, "bak-copy", 1).await;
    assert_eq!(std::fs::read(tg.join("data.bin")).unwrap(), data);
    assert_eq!(
        std::fs::read(tg.join("hello.txt")).unwrap(),
        b"hello from the backing image\n",
        "the image's own bytes under the restored blocks"
    );
    detach_from(&c, &mut ctl, "bak-copy", 1).await;
}

/// An XFS filesystem (reflink=1) of `mib` MiB in a file under the cluster's directory,
/// mounted on `mnt` through a loop device, until the cluster is dropped.
fn mount_xfs(c: &mut TestCluster, name: &str, mib: u64, mnt: &Path) {
    let image = c.dir.path().join(format!("{name}.img"));
    let disk = kit::LoopFs::xfs(&image, mnt, mib << 20).unwrap();
    c.disks.push(disk);
}

async fn volume_json(c: &TestCluster, id: &str) -> serde_json::Value {
    let all: Vec<serde_json::Value> = reqwest::get(format!("{}/v1/volumes", c.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    all.into_iter().find(|v| v["id"] == id).unwrap()
}

/// The split mode's controller drives the online rebuild of a mirror volume through the node
/// agent's gRPC service, as `bicsi serve` does in one process: node-1 has two XFS disks, the
/// 2-replica volume gets the mirror engine and is attached there; the second disk fills under
/// a write, its replica turns err; once the disk has room again the replica is rebuilt while
/// the volume stays attached, turns rw, and the two replica files are identical after detach.
#[tokio::test]
async fn the_split_mode_rebuilds_a_mirror_replica_online() {
    if !root_or_skip("the_split_mode_rebuilds_a_mirror_replica_online") {
        return;
    }
    let mut c = TestCluster::start(1).await;
    c.stop_node(0);
    let disk2 = c.nodes[0].dir.join("disk2");
    std::fs::create_dir_all(&disk2).unwrap();
    let disk1 = c.nodes[0].disk.clone();
    mount_xfs(&mut c, "d1", 512, &disk1);
    mount_xfs(&mut c, "d2", 400, &disk2);
    c.nodes[0]
        .proc
        .args_mut()
        .extend(["--disk".to_string(), disk2.display().to_string()]);
    c.start_node(0);
    c.wait_up(1).await;
    let mut ctl = c.controller_client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The restarted agent answers for its new disks once it registered again.
        match ctl
            .controller
            .create_volume(create_req("ov", 96 * MIB, &[("numberOfReplicas", "2")]))
            .await
        {
            Ok(_) => break,
            Err(s) if Instant::now() < deadline => {
                assert!(
                    matches!(
                        s.code(),
                        // Until the agent registered again, no disk is up.
                        Code::FailedPrecondition | Code::Unavailable | Code::ResourceExhausted
                    ),
                    "{s:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("{s:?}\n{}", c.logs()),
        }
    }
    let v = volume_json(&c, "ov").await;
    assert_eq!(v["spec"]["engine"], "mirror", "{v}");
    let on_disk2 = |v: &serde_json::Value| {
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| {
                r["path"]
                    .as_str()
                    .unwrap()
                    .starts_with(disk2.to_str().unwrap())
            })
            .unwrap()
            .clone()
    };
    let target = on_disk2(&v);
    let tg = attach_on(&c, &mut ctl, "ov", 0).await;

    // disk2 keeps 8 MiB free: a 48 MiB write fails there and the engine drops that replica.
    let st = nix::sys::statvfs::statvfs(&disk2).unwrap();
    let free = st.blocks_available() * st.fragment_size();
    let filler = disk2.join("filler");
    let out = Command::new("fallocate")
        .args(["-l", &(free - (8 << 20)).to_string()])
        .arg(&filler)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let data = noise(48 << 20, 7);
    write_synced(&tg, "data", &data);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = on_disk2(&volume_json(&c, "ov").await);
        if r["mode"] == "err" {
            break;
        }
        assert!(Instant::now() < deadline, "never err: {r}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Room again: the controller rebuilds it online, through the node agent's gRPC service.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let rebuilt = loop {
        let r = on_disk2(&volume_json(&c, "ov").await);
        if r["mode"] == "rw" {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "never rw again: {r}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        rebuilt["modeReason"].as_str().unwrap().contains("online"),
        "{rebuilt}"
    );
    assert_eq!(
        target["id"], rebuilt["id"],
        "the same replica, rebuilt in place"
    );
    assert_eq!(std::fs::read(tg.join("data")).unwrap(), data);
    let v = volume_json(&c, "ov").await;
    assert!(
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["mode"] == "rw"),
        "{v}"
    );
    detach_from(&c, &mut ctl, "ov", 0).await;
    let v = volume_json(&c, "ov").await;
    let files: Vec<Vec<u8>> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| std::fs::read(r["path"].as_str().unwrap()).unwrap())
        .collect();
    assert!(
        files.len() == 2 && files[0] == files[1],
        "the replicas differ"
    );
}

#[tokio::test]
async fn a_copy_on_write_volume_keeps_its_replicas_and_its_attach_on_one_node() {
    let test = "a_copy_on_write_volume_keeps_its_replicas_and_its_attach_on_one_node";
    if !root_or_skip(test) {
        return;
    }
    // Both nodes' disks are on the temp dir's ext4: a pinned mirror gets cow replicas.
    let c = TestCluster::start(2).await;
    let mut ctl = c.controller_client().await;
    // Two replicas go to distinct nodes first: refused, naming the nodes and the fixes.
    let two = [("numberOfReplicas", "2"), ("engine", "mirror")];
    let e = ctl
        .controller
        .create_volume(create_req("cw2", 64 * MIB, &two))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("nodes") && e.message().contains("engine: qemu"),
        "{}",
        e.message()
    );
    // `auto` in a cluster of two nodes keeps ext4 volumes on qemu: they may be attached on
    // either node, and a cow replica is read on its own node only.
    for (name, replicas) in [("auto1", "1"), ("auto2", "2")] {
        let params = [("numberOfReplicas", replicas)];
        create_retrying(&c, &mut ctl, create_req(name, 64 * MIB, &params)).await;
        let record = volume_record(&c, name).await;
        assert_eq!(record["spec"]["engine"], "qemu", "{record}");
        assert_eq!(record["replicas"][0]["format"], "qcow2", "{record}");
    }
    let one = [("numberOfReplicas", "1"), ("engine", "mirror")];
    create_retrying(&c, &mut ctl, create_req("cw", 64 * MIB, &one)).await;
    let record = volume_record(&c, "cw").await;
    assert_eq!(record["spec"]["engine"], "mirror", "{record}");
    assert_eq!(record["replicas"][0]["format"], "cow", "{record}");
    let owner = record["replicas"][0]["nodeId"]
        .as_str()
        .unwrap()
        .to_string();
    let other = c.nodes.iter().position(|n| n.id != owner).unwrap();
    // Attached on the node without its replica: refused (no server reads the layout).
    let mut publish = cpublish_req("cw", mount_cap(), false);
    publish.node_id = c.nodes[other].id.clone();
    let refused = match ctl.controller.controller_publish_volume(publish).await {
        Err(s) => s,
        Ok(r) => {
            let mut node = c.node_client(other).await;
            let st = c.dir.path().join("st-cw");
            let mut stage = stage_req("cw", &st, mount_cap());
            stage.publish_context = r.into_inner().publish_context;
            node.node.node_stage_volume(stage).await.unwrap_err()
        }
    };
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("copy-on-write") && refused.message().contains(&owner),
        "{}",
        refused.message()
    );
    assert!(mirror_engines_under(&c.nodes[other].dir).is_empty());
}
