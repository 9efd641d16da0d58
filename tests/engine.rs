//! A restart of the node plugin's container must not break attached volumes: with
//! `--engine-endpoint`, qemu-storage-daemon is started by `bicsi engine` and lives in its cgroup.
//!
//! A container restart is simulated for real: the plugin (`bicsi serve`) runs in a cgroup of its
//! own and every process in that cgroup is killed, as a container runtime does (cgroup2
//! `cgroup.kill`, else a kill loop over a cgroup v1 hierarchy's `cgroup.procs`). Everything runs
//! as root with real processes, loop devices, FUSE and mounts; what a test started it cleans up
//! in Drop, and it kills only processes it started.

#[path = "kit/mod.rs"]
mod kit;

#[path = "conformance/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bicsi::client::CsiClient;
use bicsi::csi::pb;
use harness::{
    MIB, NODE_ID, block_cap, cpublish_req, create_req, mount_cap, publish_req, stage_req,
};
use kit::{
    STOP_LIMIT, alive, bicsi, cleanup_under, controller_args, controller_endpoint, csi_endpoint,
    engines_under, free_port, loops_under, mirror_engines_under, mounts_under, node_args,
    root_or_skip, serve_args, spawn_logged, temp_dir, wait_exit,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

// ---- cgroups ----------------------------------------------------------------------------------

/// A cgroup of the test's own, to put a process in and kill everything in it at once.
struct Cgroup {
    path: PathBuf,
    /// cgroup2: `cgroup.kill` exists.
    v2: bool,
}

/// The mount points of cgroup hierarchies usable for this: cgroup2 first, then the v1
/// hierarchies that every process belongs to (pids, freezer, any other).
fn cgroup_roots() -> Vec<(PathBuf, bool)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v2 = Vec::new();
    let mut v1 = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split(' ').nth(4).unwrap_or_default();
        let fstype = right.split(' ').next().unwrap_or_default();
        match fstype {
            "cgroup2" => v2.push((PathBuf::from(mount_point), true)),
            "cgroup" => v1.push((PathBuf::from(mount_point), false)),
            _ => {}
        }
    }
    // A v1 hierarchy where a kill loop is cheap to watch; any other after them.
    v1.sort_by_key(|(p, _)| !(p.ends_with("pids") || p.ends_with("freezer")));
    v2.extend(v1);
    v2
}

impl Cgroup {
    /// Creates `name` in the first hierarchy that takes it; panics (a root test must not skip)
    /// when none does, saying what was tried.
    fn create(name: &str) -> Cgroup {
        let mut tried = Vec::new();
        for (root, v2) in cgroup_roots() {
            let path = root.join(name);
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    // A probe: the kernel must accept a process here (a v2 hierarchy with
                    // controllers in the wrong place refuses).
                    let mut probe = Command::new("sleep").arg("60").spawn().expect("sleep");
                    let ok =
                        std::fs::write(path.join("cgroup.procs"), probe.id().to_string()).is_ok();
                    let _ = probe.kill();
                    let _ = probe.wait();
                    if ok && (!v2 || path.join("cgroup.kill").exists()) {
                        return Cgroup { path, v2 };
                    }
                    let _ = std::fs::remove_dir(&path);
                    tried.push(format!("{}: does not take processes", path.display()));
                }
                Err(e) => tried.push(format!("{}: {e}", path.display())),
            }
        }
        panic!(
            "no usable cgroup hierarchy to simulate a container restart (tried {}); this test \
             needs root and a writable cgroup2 or cgroup v1 mount under /sys/fs/cgroup",
            tried.join("; ")
        );
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving pid {pid} into {}: {e}", self.path.display()));
    }

    fn procs(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// What a container runtime does when a container stops: SIGKILL to every process in it.
    fn kill_all(&self) {
        if self.v2 {
            std::fs::write(self.path.join("cgroup.kill"), "1")
                .unwrap_or_else(|e| panic!("cgroup.kill in {}: {e}", self.path.display()));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let procs = self.procs();
            if procs.is_empty() {
                return;
            }
            // cgroup v1 has no cgroup.kill; a process may fork while we kill, hence the loop.
            for pid in procs {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            assert!(
                Instant::now() < deadline,
                "processes survive SIGKILL in {}: {:?}",
                self.path.display(),
                self.procs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Only processes this test put here (and their children) are in it.
        if !self.procs().is_empty() {
            if self.v2 {
                let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
            }
            for pid in self.procs() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.procs().is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // A killed process leaves the cgroup once reaped: the tests declare their cgroups before
        // the processes' owners, so those are dropped (and reap) first.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---- processes --------------------------------------------------------------------------------

/// The test's directory with an engine host and a plugin (`bicsi serve`) in it, cleaned up on
/// drop: plugin and host killed, our mounts and loop devices removed, our daemons killed.
struct Node {
    dir: tempfile::TempDir,
    engine: Option<Child>,
    plugin: Option<Child>,
    endpoint: String,
    http: String,
    /// `--engine-endpoint` of the plugin; None: engines are started in-process.
    engine_endpoint: Option<String>,
}

impl Node {
    fn new(with_engine_host: bool) -> Node {
        let dir = temp_dir("bicsi-engine-");
        let port = free_port();
        Node {
            endpoint: csi_endpoint(dir.path()),
            http: format!("127.0.0.1:{port}"),
            engine_endpoint: with_engine_host
                .then(|| format!("unix://{}", dir.path().join("engine.sock").display())),
            dir,
            engine: None,
            plugin: None,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn data_dir(&self) -> PathBuf {
        self.path("data")
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    fn engine_socket(&self) -> PathBuf {
        self.path("engine.sock")
    }

    /// `bicsi engine --probe` against the socket: (answered, stdout + stderr).
    fn probe(&self) -> (bool, String) {
        let out = bicsi()
            .args(["engine", "--probe", "--data-dir"])
            .arg(self.data_dir())
            .arg("--listen")
            .arg(format!("unix://{}", self.engine_socket().display()))
            .output()
            .expect("run bicsi engine --probe");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn start_engine_host(&mut self) -> u32 {
        assert!(self.engine.is_none());
        let args: Vec<String> = vec![
            "engine".into(),
            "--data-dir".into(),
            self.data_dir().display().to_string(),
            "--listen".into(),
            format!("unix://{}", self.engine_socket().display()),
        ];
        let mut child = spawn_logged(&args, &self.path("engine.log"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.probe().0 {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "bicsi engine exited ({status}):\n{}",
                    self.log("engine.log")
                );
            }
            assert!(
                Instant::now() < deadline,
                "bicsi engine did not answer:\n{}",
                self.log("engine.log")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let pid = child.id();
        self.engine = Some(child);
        pid
    }

    /// SIGTERM to the engine host; it must exit 0 and remove its socket.
    fn stop_engine_host(&mut self) {
        let mut child = self.engine.take().expect("engine host running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let status = wait_exit(&mut child, "bicsi engine", STOP_LIMIT);
        assert!(status.success(), "{status}:\n{}", self.log("engine.log"));
        assert!(!self.engine_socket().exists(), "socket left behind");
    }

    /// Starts the plugin, moved into `cgroup` at once (before it starts any engine).
    async fn start_plugin(&mut self, cgroup: Option<&Cgroup>) -> CsiClient {
        assert!(self.plugin.is_none());
        let mut args = serve_args(self.dir.path(), NODE_ID, &self.http);
        args.extend(["--disk".into(), self.path("disk0").display().to_string()]);
        if let Some(e) = &self.engine_endpoint {
            args.extend(["--engine-endpoint".into(), e.clone()]);
        }
        let child = spawn_logged(&args, &self.path("plugin.log"));
        if let Some(cg) = cgroup {
            cg.add(child.id());
        }
        self.plugin = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(c) = CsiClient::connect(&self.endpoint).await {
                return c;
            }
            if let Some(status) = self.plugin.as_mut().unwrap().try_wait().unwrap() {
                panic!("bicsi serve exited ({status}):\n{}", self.log("plugin.log"));
            }
            assert!(
                Instant::now() < deadline,
                "bicsi serve did not start:\n{}",
                self.log("plugin.log")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The plugin was killed with its cgroup: collect its exit status.
    fn reap_plugin(&mut self) {
        let mut child = self.plugin.take().expect("plugin started");
        let status = wait_exit(&mut child, "bicsi serve", STOP_LIMIT);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "the plugin should have been killed with its cgroup: {status}"
        );
    }

    /// The pid in a volume engine's pid file: qemu-storage-daemon's (`qsd.pid`), or the mirror
    /// engine's (`mirror.pid`) when that is the one there.
    fn engine_pid(&self, volume: &str) -> i32 {
        let dir = self.data_dir().join("engines").join(volume);
        let file = ["qsd.pid", "mirror.pid"]
            .iter()
            .map(|f| dir.join(f))
            .find(|f| f.exists())
            .unwrap_or_else(|| dir.join("qsd.pid"));
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for mut c in [self.plugin.take(), self.engine.take()]
            .into_iter()
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        cleanup_under(self.dir.path());
    }
}

/// Children of `parent` that are zombies (exited, not reaped).
fn zombie_children(parent: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or_default();
        let ppid: u32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == parent && state == "Z" {
            out.push(pid);
        }
    }
    out
}

// ---- volumes ----------------------------------------------------------------------------------

const FILE_VOL: &str = "engine-fs";
const BLOCK_VOL: &str = "engine-block";

/// Which engine's pid file a volume's run directory has: "qemu" or "mirror".
fn engine_kind(node: &Node, volume: &str) -> &'static str {
    let dir = node.data_dir().join("engines").join(volume);
    if dir.join("mirror.pid").exists() {
        "mirror"
    } else {
        "qemu"
    }
}

/// Every engine process (qemu-storage-daemon or bicsi's mirror engine) naming a path under `dir`.
fn all_engines_under(dir: &Path) -> Vec<i32> {
    let mut pids = engines_under(dir);
    pids.extend(mirror_engines_under(dir));
    pids
}

/// Creates, controller-publishes, stages and publishes a volume of the StorageClass parameter
/// `engine` ("" for the default, `auto`).
async fn attach(c: &mut CsiClient, node: &Node, name: &str, block: bool, engine: &str) {
    let cap = if block { block_cap() } else { mount_cap() };
    let mut params = vec![("numberOfReplicas", "1")];
    if !engine.is_empty() {
        params.push(("engine", engine));
    }
    let mut req = create_req(name, 64 * MIB, &params);
    req.volume_capabilities = vec![cap.clone()];
    let id = c
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    assert_eq!(id, name, "volume ids are their names here");
    c.controller
        .controller_publish_volume(cpublish_req(name, cap.clone(), false))
        .await
        .unwrap();
    let staging = node.path(&format!("staging-{name}"));
    c.node
        .node_stage_volume(stage_req(name, &staging, cap.clone()))
        .await
        .unwrap_or_else(|e| panic!("stage {name}: {e}\n{}", node.log("plugin.log")));
    c.node
        .node_publish_volume(publish_req(
            name,
            &staging,
            &node.path(&format!("target-{name}")),
            cap,
            false,
        ))
        .await
        .unwrap();
}

/// Unpublishes, unstages, controller-unpublishes and deletes a volume.
async fn detach_and_delete(c: &mut CsiClient, node: &Node, name: &str) {
    c.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: name.into(),
            target_path: node.path(&format!("target-{name}")).display().to_string(),
        })
        .await
        .unwrap();
    c.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: name.into(),
            staging_target_path: node.path(&format!("staging-{name}")).display().to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("unstage {name}: {e}\n{}", node.log("plugin.log")));
    harness::unpublish_and_delete(c, name).await;
}

/// Writes and fsyncs a file on the mounted volume.
fn write_file(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Writes one block at `offset` of the block volume (through its published device node, O_DIRECT
/// so it reaches the engine) and fsyncs.
fn write_block(dev: &Path, offset: u64, byte: u8) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap();
    let buf = aligned_block(byte);
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&buf.0).unwrap();
    f.sync_all().unwrap();
}

fn read_block(dev: &Path, offset: u64) -> Vec<u8> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap();
    let mut buf = aligned_block(0);
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut buf.0).unwrap();
    buf.0.to_vec()
}

/// 4 KiB, 4 KiB-aligned as O_DIRECT needs.
#[repr(C, align(4096))]
struct Block([u8; 4096]);

fn aligned_block(byte: u8) -> Box<Block> {
    Box::new(Block([byte; 4096]))
}

// ---- the tests --------------------------------------------------------------------------------

/// With the engine host, a container restart of the plugin (its whole cgroup killed) leaves the
/// attached volumes serving: a mounted filesystem and a block volume read back what was written
/// and take new writes; the restarted plugin re-adopts the same daemons; detach and delete then
/// leave nothing behind, and the engine host reaps what it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_container_restart_keeps_volumes_served_by_the_engine_host() {
    if !root_or_skip("plugin_container_restart_keeps_volumes_served_by_the_engine_host") {
        return;
    }
    // Before the node: dropped after it, once it has reaped what ran in them.
    let first = Cgroup::create(&format!("bicsi-test-plugin-{}-1", std::process::id()));
    let second = Cgroup::create(&format!("bicsi-test-plugin-{}-2", std::process::id()));
    let mut node = Node::new(true);
    let host_pid = node.start_engine_host();
    let (ok, text) = node.probe();
    assert!(ok && text.contains(&format!("pid {host_pid}")), "{text}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(node.engine_socket())
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the engine socket is root's only");
    let mut c = node.start_plugin(Some(&first)).await;
    // The default engine on this one-node ext4 cluster (the mirror engine over a copy-on-write
    // replica) and qemu-storage-daemon, pinned: the host runs both.
    attach(&mut c, &node, FILE_VOL, false, "").await;
    attach(&mut c, &node, BLOCK_VOL, true, "qemu").await;
    assert_eq!(engine_kind(&node, FILE_VOL), "mirror");
    assert_eq!(engine_kind(&node, BLOCK_VOL), "qemu");
    let target = node.path(&format!("target-{FILE_VOL}"));
    let dev = node.path(&format!("target-{BLOCK_VOL}"));
    write_file(&target.join("before"), b"written before the restart\n");
    write_block(&dev, 8 * MIB as u64, 0xa5);
    let pids = [node.engine_pid(FILE_VOL), node.engine_pid(BLOCK_VOL)];
    for pid in pids {
        assert!(alive(pid), "engine {pid}");
        assert_eq!(
            parent_of(pid),
            Some(host_pid),
            "engine {pid} is the engine host's child"
        );
        // The daemons are the engine host's, not the plugin's: outside the plugin's cgroup.
        assert!(
            !first.procs().contains(&pid),
            "engine {pid} is in the plugin's cgroup"
        );
    }

    // The container restart.
    drop(c);
    first.kill_all();
    node.reap_plugin();
    for pid in pids {
        assert!(alive(pid), "engine {pid} died with the plugin's cgroup");
    }
    assert_eq!(
        std::fs::read(target.join("before")).unwrap(),
        b"written before the restart\n"
    );
    write_file(
        &target.join("during"),
        b"written while the plugin is down\n",
    );
    assert_eq!(read_block(&dev, 8 * MIB as u64), vec![0xa5; 4096]);
    write_block(&dev, 16 * MIB as u64, 0x5a);

    // A SIGTERM of the engine host stops the host, not its daemons.
    node.stop_engine_host();
    for pid in pids {
        assert!(alive(pid), "engine {pid} died with the engine host");
    }
    assert_eq!(read_block(&dev, 16 * MIB as u64), vec![0x5a; 4096]);
    let host_pid = node.start_engine_host();

    // The plugin comes back in a new container and re-adopts the same daemons.
    let mut c = node.start_plugin(Some(&second)).await;
    let log = node.log("plugin.log");
    assert_eq!(
        log.matches("re-adopted staged volume").count(),
        2,
        "both volumes re-adopted:\n{log}"
    );
    for (name, cap) in [(FILE_VOL, mount_cap()), (BLOCK_VOL, block_cap())] {
        // kubelet repeats NodeStage after a plugin restart: nothing to do, the same daemon.
        c.node
            .node_stage_volume(stage_req(name, &node.path(&format!("staging-{name}")), cap))
            .await
            .unwrap();
        let stats = c
            .node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: name.into(),
                volume_path: node.path(&format!("target-{name}")).display().to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let condition = stats.volume_condition.expect("volume condition");
        assert!(!condition.abnormal, "{name}: {}", condition.message);
    }
    assert_eq!(
        [node.engine_pid(FILE_VOL), node.engine_pid(BLOCK_VOL)],
        pids
    );
    assert_eq!(all_engines_under(node.dir.path()).len(), 2, "no new daemon");
    assert_eq!(
        std::fs::read(target.join("during")).unwrap(),
        b"written while the plugin is down\n"
    );
    write_file(&target.join("after"), b"written after the restart\n");

    // Detach and delete: no daemon, loop device or mount left behind.
    detach_and_delete(&mut c, &node, FILE_VOL).await;
    detach_and_delete(&mut c, &node, BLOCK_VOL).await;
    for pid in pids {
        assert!(!alive(pid), "engine {pid} survives unstage");
    }
    assert_eq!(all_engines_under(node.dir.path()), Vec::<i32>::new());
    assert_eq!(loops_under(node.dir.path()), Vec::<String>::new());
    assert_eq!(mounts_under(node.dir.path()), Vec::<PathBuf>::new());
    // The daemons of the second host were never its children (the first host's were orphaned
    // to init when it stopped); but a daemon it starts and that exits is reaped, not a zombie.
    c.controller
        .create_volume(create_req(
            "engine-reaped",
            32 * MIB,
            &[("numberOfReplicas", "1")],
        ))
        .await
        .unwrap();
    c.controller
        .controller_publish_volume(cpublish_req("engine-reaped", mount_cap(), false))
        .await
        .unwrap();
    c.node
        .node_stage_volume(stage_req(
            "engine-reaped",
            &node.path("staging-engine-reaped"),
            mount_cap(),
        ))
        .await
        .unwrap();
    let pid = node.engine_pid("engine-reaped");
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap()
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .nth(1),
        Some(host_pid.to_string().as_str()),
        "the daemon is the engine host's child"
    );
    c.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: "engine-reaped".into(),
            staging_target_path: node.path("staging-engine-reaped").display().to_string(),
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !zombie_children(host_pid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "zombies: {:?}",
            zombie_children(host_pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        node.log("engine.log").contains("daemon exited"),
        "{}",
        node.log("engine.log")
    );
    node.stop_engine_host();
}

/// The control: without the engine host the same kill takes the daemon down with the plugin,
/// which is what the test above would see without the feature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_engine_host_a_container_restart_kills_the_engine() {
    if !root_or_skip("without_the_engine_host_a_container_restart_kills_the_engine") {
        return;
    }
    let cgroup = Cgroup::create(&format!("bicsi-test-plugin-{}-c", std::process::id()));
    let mut node = Node::new(false);
    let mut c = node.start_plugin(Some(&cgroup)).await;
    attach(&mut c, &node, BLOCK_VOL, true, "").await;
    let pid = node.engine_pid(BLOCK_VOL);
    assert!(
        cgroup.procs().contains(&pid),
        "in-process engines share the plugin's cgroup"
    );
    drop(c);
    cgroup.kill_all();
    node.reap_plugin();
    assert!(!alive(pid), "engine {pid} survived");
    // Drop unmounts and detaches what is left; no I/O touches the dead export.
}

/// An engine host that is not there: NodeStage fails with Unavailable naming the socket and the
/// fix, and leaves no run directory, daemon, loop device, mount or record behind; once the host
/// runs, the same call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_engine_host_fails_stage_clearly_and_leaves_nothing() {
    if !root_or_skip("unreachable_engine_host_fails_stage_clearly_and_leaves_nothing") {
        return;
    }
    let mut node = Node::new(true);
    let mut c = node.start_plugin(None).await;
    let name = "engine-nohost";
    c.controller
        .create_volume(create_req(name, 32 * MIB, &[("numberOfReplicas", "1")]))
        .await
        .unwrap();
    c.controller
        .controller_publish_volume(cpublish_req(name, mount_cap(), false))
        .await
        .unwrap();
    let staging = node.path("staging-nohost");
    for _ in 0..2 {
        let err = c
            .node
            .node_stage_volume(stage_req(name, &staging, mount_cap()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{}", err.message());
        let socket = format!("unix://{}", node.engine_socket().display());
        for needle in [socket.as_str(), "bicsi engine", "bicsi-engine DaemonSet"] {
            assert!(
                err.message().contains(needle),
                "{needle:?} in {}",
                err.message()
            );
        }
    }
    assert!(!node.data_dir().join("engines").join(name).exists());
    assert_eq!(engines_under(node.dir.path()), Vec::<i32>::new());
    assert_eq!(loops_under(node.dir.path()), Vec::<String>::new());
    assert_eq!(mounts_under(node.dir.path()), Vec::<PathBuf>::new());
    // No record of a staged volume: publishing says it is not staged.
    let err = c
        .node
        .node_publish_volume(publish_req(
            name,
            &staging,
            &node.path("target-nohost"),
            mount_cap(),
            false,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        err.message()
    );

    node.start_engine_host();
    c.node
        .node_stage_volume(stage_req(name, &staging, mount_cap()))
        .await
        .unwrap();
    let pid = node.engine_pid(name);
    assert!(alive(pid));
    c.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: name.into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
    assert!(!alive(pid));
    assert_eq!(mounts_under(node.dir.path()), Vec::<PathBuf>::new());
    // A host killed outright leaves its socket behind; the next one replaces it.
    let mut host = node.engine.take().unwrap();
    host.kill().unwrap();
    host.wait().unwrap();
    assert!(node.engine_socket().exists());
    assert!(!node.probe().0);
    node.start_engine_host();
    node.stop_engine_host();
}

// ---- split mode: the replica server -------------------------------------------------------------

/// A controller and two node agents, each agent with an engine host of its own: the NBD replica
/// server a node runs for the other's engine is started by its engine host too.
struct Split {
    dir: tempfile::TempDir,
    http: String,
    controller_endpoint: String,
    cluster_port: u16,
    children: Vec<Child>,
    /// Node agents by index; None while stopped.
    agents: Vec<Option<Child>>,
    /// Each agent's flags, kept across restarts (same ports).
    agent_args: Vec<Vec<String>>,
    engine_pids: Vec<u32>,
}

impl Split {
    async fn start() -> Split {
        let dir = temp_dir("bicsi-engine-split-");
        let (http_port, cluster_port) = (free_port(), free_port());
        let controller_endpoint = controller_endpoint(dir.path());
        let controller = spawn_logged(
            &controller_args(dir.path(), http_port, cluster_port),
            &dir.path().join("controller.log"),
        );
        let mut s = Split {
            http: format!("http://127.0.0.1:{http_port}"),
            controller_endpoint,
            cluster_port,
            children: vec![controller],
            agents: vec![None, None],
            agent_args: vec![],
            engine_pids: vec![],
            dir,
        };
        for i in 0..2 {
            let data = s.node_dir(i).join("data");
            std::fs::create_dir_all(&data).unwrap();
            let mut host = spawn_logged(
                &[
                    "engine".to_string(),
                    "--data-dir".into(),
                    data.display().to_string(),
                ],
                &s.node_dir(i).join("engine.log"),
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while !data.join("engine.sock").exists() {
                assert!(host.try_wait().unwrap().is_none(), "engine host exited");
                assert!(Instant::now() < deadline, "engine host did not start");
                std::thread::sleep(Duration::from_millis(50));
            }
            s.engine_pids.push(host.id());
            s.children.push(host);
            let args = s.agent_args(i);
            s.agent_args.push(args);
        }
        s
    }

    fn agent_args(&self, i: usize) -> Vec<String> {
        let dir = self.node_dir(i);
        let id = format!("node-{}", i + 1);
        let mut args = node_args(&id, &dir, self.cluster_port, free_port(), free_port());
        args.extend([
            "--engine-endpoint".into(),
            format!("unix://{}", dir.join("data/engine.sock").display()),
        ]);
        args
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{}", i + 1))
    }

    fn node_endpoint(&self, i: usize) -> String {
        csi_endpoint(&self.node_dir(i))
    }

    fn logs(&self) -> String {
        let mut out =
            std::fs::read_to_string(self.dir.path().join("controller.log")).unwrap_or_default();
        for i in 0..2 {
            for f in ["node.log", "engine.log"] {
                out.push_str(&format!("\n--- node-{} {f} ---\n", i + 1));
                out.push_str(
                    &std::fs::read_to_string(self.node_dir(i).join(f)).unwrap_or_default(),
                );
            }
        }
        out
    }

    /// Starts node agent `i` (the default data dir's engine socket), in `cgroup` when given.
    fn start_agent(&mut self, i: usize, cgroup: Option<&Cgroup>) {
        let child = spawn_logged(&self.agent_args[i], &self.node_dir(i).join("node.log"));
        if let Some(cg) = cgroup {
            cg.add(child.id());
        }
        self.agents[i] = Some(child);
    }

    async fn wait_up(&self, n: usize) {
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

    /// The replica server node `i` runs for other nodes' engines.
    fn replica_server_pid(&self, i: usize) -> i32 {
        let file = self.node_dir(i).join("data/replica-server/qsd.pid");
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", file.display(), self.logs()))
            .trim()
            .parse()
            .unwrap()
    }

    fn replicas(&self) -> Vec<PathBuf> {
        (0..2)
            .flat_map(|i| {
                std::fs::read_dir(self.node_dir(i).join("disk/replicas"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path().join("volume.qcow2"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Drop for Split {
    fn drop(&mut self) {
        for mut c in self
            .agents
            .iter_mut()
            .filter_map(Option::take)
            .chain(self.children.drain(..))
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        cleanup_under(self.dir.path());
    }
}

/// 1 MiB of `byte`.
fn filled(byte: u8) -> Vec<u8> {
    vec![byte; 1 << 20]
}

fn parent_of(pid: i32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()?
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A volume attached on node-1 with its second replica on node-2 (read over NBD from node-2's
/// replica server): node-2's plugin container restarts while writes go on, and the replica
/// server, started by node-2's engine host, keeps taking them: both replicas end identical, and
/// the restarted agent re-adopts the same server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_server_survives_a_restart_of_its_nodes_plugin() {
    if !root_or_skip("replica_server_survives_a_restart_of_its_nodes_plugin") {
        return;
    }
    let cgroup = Cgroup::create(&format!("bicsi-test-plugin-{}-s1", std::process::id()));
    let again = Cgroup::create(&format!("bicsi-test-plugin-{}-s2", std::process::id()));
    let mut s = Split::start().await;
    s.start_agent(0, None);
    s.start_agent(1, Some(&cgroup));
    s.wait_up(2).await;
    let mut ctl = CsiClient::connect(&s.controller_endpoint).await.unwrap();
    let name = "engine-nbd";
    ctl.controller
        .create_volume(create_req(name, 64 * MIB, &[("numberOfReplicas", "2")]))
        .await
        .unwrap();
    let publish = pb::ControllerPublishVolumeRequest {
        node_id: "node-1".into(),
        ..cpublish_req(name, mount_cap(), false)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let ctx = loop {
        match ctl
            .controller
            .controller_publish_volume(publish.clone())
            .await
        {
            Ok(r) => break r.into_inner().publish_context,
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("publish: {e}\n{}", s.logs()),
        }
    };
    let mut n1 = CsiClient::connect(&s.node_endpoint(0)).await.unwrap();
    let st = s.dir.path().join("st");
    let tg = s.dir.path().join("tg");
    let mut stage = stage_req(name, &st, mount_cap());
    stage.publish_context = ctx.clone();
    n1.node
        .node_stage_volume(stage)
        .await
        .unwrap_or_else(|e| panic!("stage: {e}\n{}", s.logs()));
    let mut publish = publish_req(name, &st, &tg, mount_cap(), false);
    publish.publish_context = ctx;
    n1.node.node_publish_volume(publish).await.unwrap();
    write_file(&tg.join("before"), &filled(1));
    let server = s.replica_server_pid(1);
    assert_eq!(
        parent_of(server),
        Some(s.engine_pids[1]),
        "node-2's replica server is its engine host's child"
    );

    // node-2's plugin container restarts; node-1 keeps writing to both replicas.
    cgroup.kill_all();
    let mut agent = s.agents[1].take().unwrap();
    wait_exit(&mut agent, "node-2 agent", STOP_LIMIT);
    assert!(
        alive(server),
        "the replica server died with node-2's plugin"
    );
    write_file(&tg.join("during"), &filled(2));
    s.start_agent(1, Some(&again));
    s.wait_up(2).await;
    assert_eq!(
        s.replica_server_pid(1),
        server,
        "the same server, re-adopted"
    );
    write_file(&tg.join("after"), &filled(3));

    n1.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: name.into(),
            target_path: tg.display().to_string(),
        })
        .await
        .unwrap();
    n1.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: name.into(),
            staging_target_path: st.display().to_string(),
        })
        .await
        .unwrap();
    ctl.controller
        .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: name.into(),
            node_id: "node-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("controller unpublish: {e}\n{}", s.logs()));
    // Every write reached node-2's replica too, including those made while its plugin was down.
    let replicas = s.replicas();
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    let out = Command::new("qemu-img")
        .arg("compare")
        .args(&replicas)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("identical"), "{text}{}", s.logs());
    ctl.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: name.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        !alive(server),
        "the replica server stops once it exports nothing"
    );
    assert_eq!(engines_under(s.dir.path()), Vec::<i32>::new());
    assert_eq!(loops_under(s.dir.path()), Vec::<String>::new());
    assert_eq!(mounts_under(s.dir.path()), Vec::<PathBuf>::new());
}
