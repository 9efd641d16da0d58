//! Fakes of every OS trait, sharing one simulated machine, for domain tests that run without root.
//!
//! They keep the rules of the real layer, not just its signatures: an engine locks its replicas
//! (a second engine or a resize is refused while it runs), a stop is `Busy` while a loop device
//! sits on the export, a detach is `Busy` while the device is mounted, `mkfs` refuses a device
//! that holds a filesystem, a filesystem written through one engine is found again through the
//! next one, and a read-only engine gives read-only devices and mounts. What a test could not tell
//! apart lives on disk as on a real node, inside the test's temp dir: image files (a small JSON
//! description instead of qcow2 data), the engine's run directory and export file, and mount
//! targets. Processes, loop devices and mounts live in memory, so they survive a "restart" of the
//! domain that reuses the same `Fake`, as the real ones survive a restart of bicsi.
//!
//! Several machines share a `FakeNet` (`Fake::new_cluster`, `Fake::with_net`): a replica server
//! of one (`export_replica`) is reached by address from the engines of the others
//! (`ReplicaTarget::Nbd`), with qemu's measured behaviour: a write goes to every child that
//! answers and succeeds when one took it, a read comes from the first that answers, an export in
//! use is `Busy` to unexport, a child whose server died (`Fake::kill_replica_server`) or was cut
//! off misses the writes from then on and is reconnected silently at a later request once its
//! export is back, which `volume_status` reports as the real engine does.
//!
//! It must not be used outside tests and must never touch the machine beyond the paths it is given.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::{
    Engine, EngineSpec, EngineState, Filesystems, FsStats, ImageFormat, ImageInfo, ImageTool,
    LoopDevices, MountInfo, Mounter, Os, OsError, OsResult, ReplicaExport, ReplicaTarget,
    SUPPORTED_FILESYSTEMS, VolumeEngineSpec, VolumeEngineState, resolve_parent,
};

/// First line of a fake image file.
const MAGIC: &str = "BICSI-FAKE-IMAGE v1\n";
/// Where fake loop devices pretend to live; nothing is ever created there.
const LOOP_PREFIX: &str = "/dev/fakeloop";

/// A filesystem as the fake knows it: its type and the size it was made or last grown to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeFs {
    pub fstype: String,
    pub size: u64,
}

/// The content of a fake image file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FakeImage {
    format: String,
    virtual_size: u64,
    backing: Option<PathBuf>,
    backing_format: Option<String>,
    /// None: whatever the backing file holds (a fresh overlay shows its backing's content).
    fs: Option<FakeFs>,
}

/// The bytes of a fake image file, e.g. for a test server that serves a backing image that carries
/// a filesystem. Files without this form are raw images of their own length.
pub fn image_bytes(format: ImageFormat, virtual_size: u64, fstype: Option<&str>) -> Vec<u8> {
    let img = FakeImage {
        format: format.as_str().to_string(),
        virtual_size,
        backing: None,
        backing_format: None,
        fs: fstype.map(|t| FakeFs {
            fstype: t.to_string(),
            size: virtual_size,
        }),
    };
    let mut out = MAGIC.as_bytes().to_vec();
    out.extend(serde_json::to_vec(&img).expect("serializable"));
    out
}

/// Recognise real ext4 and xfs in a raw file, so a backing image made with the real mkfs works.
fn sniff_fs(head: &[u8]) -> Option<String> {
    if head.len() >= 4 && &head[..4] == b"XFSB" {
        return Some("xfs".into());
    }
    if head.len() >= 1082 && head[1080..1082] == [0x53, 0xef] {
        return Some("ext4".into());
    }
    None
}

fn read_image(path: &Path) -> OsResult<FakeImage> {
    let file =
        fs::File::open(path).map_err(|e| OsError::io(format!("image {}", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| OsError::io(format!("image {}", path.display()), e))?
        .len();
    let mut head = Vec::new();
    file.take(1 << 16)
        .read_to_end(&mut head)
        .map_err(|e| OsError::io(format!("reading image {}", path.display()), e))?;
    if let Some(json) = head.strip_prefix(MAGIC.as_bytes()) {
        return serde_json::from_slice(json)
            .map_err(|e| OsError::Other(format!("fake image {} is corrupt: {e}", path.display())));
    }
    Ok(FakeImage {
        format: "raw".into(),
        virtual_size: len,
        backing: None,
        backing_format: None,
        fs: sniff_fs(&head).map(|fstype| FakeFs { fstype, size: len }),
    })
}

fn write_image(path: &Path, img: &FakeImage) -> OsResult<()> {
    let mut bytes = MAGIC.as_bytes().to_vec();
    bytes.extend(serde_json::to_vec(img).expect("serializable"));
    let tmp = path.with_file_name(format!(
        ".{}.tmp-fake",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    fs::write(&tmp, &bytes)
        .and_then(|_| fs::rename(&tmp, path))
        .map_err(|e| OsError::io(format!("writing image {}", path.display()), e))
}

/// The filesystem visible in an image: its own, else its backing chain's.
fn content_fs(path: &Path) -> OsResult<Option<FakeFs>> {
    let mut path = path.to_path_buf();
    for _ in 0..16 {
        let img = read_image(&path)?;
        match (img.fs, img.backing) {
            (Some(fs), _) => return Ok(Some(fs)),
            (None, Some(backing)) => path = backing,
            (None, None) => return Ok(None),
        }
    }
    Err(OsError::Other(format!(
        "backing chain of {} is too deep",
        path.display()
    )))
}

fn lock_error(cmd: &str, path: &Path) -> OsError {
    OsError::Command {
        cmd: format!("{cmd} {}", path.display()),
        stderr: format!(
            "Failed to get \"write\" lock; Is another process using the image [{}]?; another \
             process (usually the volume's engine) has {} open; stop the engine (detach the \
             volume) and retry",
            path.display(),
            path.display()
        ),
    }
}

#[derive(Clone, Debug)]
struct EngineEntry {
    pid: i32,
    /// The local children (resolved paths), which this engine holds open.
    replicas: Vec<PathBuf>,
    /// Every child in read order, local ones resolved.
    targets: Vec<ReplicaTarget>,
    read_only: bool,
    export: PathBuf,
    /// False after `Fake::kill_engine`: the process is gone, its export mount is stale.
    alive: bool,
}

#[derive(Clone, Debug)]
struct LoopEntry {
    file: PathBuf,
    size: u64,
    read_only: bool,
}

#[derive(Clone, Debug)]
struct MountEntry {
    info: MountInfo,
    /// The fake loop device underneath, if any.
    device: Option<u32>,
    /// For binds: the source path, to recognise a repeated request.
    bind_of: Option<PathBuf>,
    read_only: bool,
}

#[derive(Default)]
struct World {
    /// This machine's number on its network.
    node: u32,
    net: FakeNet,
    next_pid: i32,
    engines: BTreeMap<PathBuf, EngineEntry>,
    loops: BTreeMap<u32, LoopEntry>,
    mounts: Vec<MountEntry>,
    failures: HashMap<String, VecDeque<OsError>>,
    /// Directories whose "filesystem" shares blocks (`Fake::share_blocks`): reflink clones
    /// work under them, as on XFS with reflink; everywhere else they are `Unsupported`.
    reflink_dirs: Vec<PathBuf>,
}

/// What a fake loop device's reads and writes reach.
enum Backing {
    /// The children of a live engine, resolved at each access like qemu's quorum does.
    Engine {
        run_dir: PathBuf,
        targets: Vec<ReplicaTarget>,
        read_only: bool,
    },
    /// A plain file.
    File(PathBuf),
}

impl World {
    fn shares_blocks(&self, path: &Path) -> bool {
        let path = resolve_parent(path);
        self.reflink_dirs.iter().any(|d| path.starts_with(d))
    }

    fn fail(&mut self, op: &str) -> OsResult<()> {
        match self.failures.get_mut(op).and_then(VecDeque::pop_front) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn engine_by_export(&self, export: &Path) -> Option<&EngineEntry> {
        self.engines.values().find(|e| e.export == export)
    }

    fn engine_using(&self, image: &Path, except_run_dir: Option<&Path>) -> Option<&EngineEntry> {
        self.engines
            .iter()
            .filter(|(dir, e)| e.alive && Some(dir.as_path()) != except_run_dir)
            .map(|(_, e)| e)
            .find(|e| e.replicas.iter().any(|r| r == image))
    }

    /// The replica id under which a replica server of this machine serves `image` (and so holds
    /// it open for writing), if any.
    fn exported_as(&self, image: &Path) -> Option<String> {
        let net = self.net.lock();
        net.servers
            .values()
            .filter(|s| s.node == self.node)
            .find_map(|s| {
                s.exports
                    .iter()
                    .find(|(_, p)| p.as_path() == image)
                    .map(|(id, _)| id.clone())
            })
    }

    /// The files of an engine's children that one access reaches, in read order: local ones
    /// always, an NBD one while its server runs and exports it. As qemu's NBD client does, a
    /// child whose connection was lost fails the request that finds out (counted in the engine's
    /// remote errors) and connects again at the next one once its export is back (counted as a
    /// handshake); `all`: stop at the first reachable child (a read) or try them all (a write).
    fn reach(&self, run_dir: &Path, targets: &[ReplicaTarget], all: bool) -> Vec<PathBuf> {
        let mut net = self.net.lock();
        let mut files = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            let file = match target {
                ReplicaTarget::Local(p) => Some(p.clone()),
                ReplicaTarget::Nbd { .. } => {
                    net.access(&ClientKey(self.node, run_dir.to_path_buf(), i), target)
                }
            };
            if let Some(f) = file {
                files.push(f);
                if !all {
                    break;
                }
            }
        }
        files
    }

    /// The file that holds an engine's content for a read, or EIO when no child answers.
    fn read_file(&self, run_dir: &Path, targets: &[ReplicaTarget]) -> OsResult<PathBuf> {
        self.reach(run_dir, targets, false)
            .into_iter()
            .next()
            .ok_or_else(|| no_child(run_dir))
    }

    fn loop_index(dev: &Path) -> Option<u32> {
        dev.to_str()?.strip_prefix(LOOP_PREFIX)?.parse().ok()
    }

    fn loop_entry(&self, dev: &Path) -> Option<(u32, &LoopEntry)> {
        let idx = Self::loop_index(dev)?;
        Some((idx, self.loops.get(&idx)?))
    }

    fn backing_of(&self, file: &Path) -> OsResult<Backing> {
        if let Some(e) = self.engine_by_export(file) {
            if !e.alive {
                return Err(OsError::io(
                    format!("{}", file.display()),
                    std::io::Error::from_raw_os_error(libc::ENOTCONN),
                ));
            }
            let run_dir = self
                .engines
                .iter()
                .find(|(_, x)| x.export == e.export)
                .map(|(dir, _)| dir.clone())
                .unwrap_or_default();
            return Ok(Backing::Engine {
                run_dir,
                targets: e.targets.clone(),
                read_only: e.read_only,
            });
        }
        Ok(Backing::File(file.to_path_buf()))
    }

    fn backing_size(&self, backing: &Backing) -> OsResult<u64> {
        match backing {
            // The size the engine learnt when it opened its children; no request goes out.
            Backing::Engine {
                run_dir, targets, ..
            } => {
                let file = match targets.iter().find_map(|t| match t {
                    ReplicaTarget::Local(p) => Some(p.clone()),
                    ReplicaTarget::Nbd { .. } => None,
                }) {
                    Some(local) => local,
                    None => self.net.lock().size_file(run_dir, targets)?,
                };
                Ok(read_image(&file)?.virtual_size)
            }
            // A fake raw replica is a description of its content; other files are raw images
            // of their own length, which `read_image` reports as their virtual size.
            Backing::File(f) => Ok(read_image(f)?.virtual_size),
        }
    }

    /// The device behind `dev`: a fake loop device, or a file used directly.
    fn device_backing(&self, dev: &Path) -> OsResult<(Backing, bool)> {
        if let Some((_, l)) = self.loop_entry(dev) {
            return Ok((self.backing_of(&l.file)?, l.read_only));
        }
        if World::loop_index(dev).is_some() || !dev.exists() {
            return Err(OsError::io(
                format!(
                    "{}: the device is not there (is its loop device attached?)",
                    dev.display()
                ),
                std::io::Error::from_raw_os_error(libc::ENOENT),
            ));
        }
        Ok((Backing::File(dev.to_path_buf()), false))
    }

    fn device_fs(&self, dev: &Path) -> OsResult<Option<FakeFs>> {
        match self.device_backing(dev)?.0 {
            Backing::Engine {
                run_dir, targets, ..
            } => content_fs(&self.read_file(&run_dir, &targets)?),
            Backing::File(f) => content_fs(&f),
        }
    }

    fn device_size(&self, dev: &Path) -> OsResult<u64> {
        if let Some((_, l)) = self.loop_entry(dev) {
            return Ok(l.size);
        }
        let (backing, _) = self.device_backing(dev)?;
        self.backing_size(&backing)
    }

    /// Write a filesystem "through" the device: into every replica, as quorum writes to all.
    fn set_device_fs(&self, dev: &Path, fs_: FakeFs) -> OsResult<()> {
        let (backing, dev_read_only) = self.device_backing(dev)?;
        let files = match backing {
            Backing::Engine {
                read_only: false,
                run_dir,
                targets,
            } if !dev_read_only => {
                // Every write goes to every child that answers; it succeeds when one took it.
                let files = self.reach(&run_dir, &targets, true);
                // The flush that ends it is a request of its own: a child that lost its
                // connection during the write connects again here, without the write.
                let _ = self.reach(&run_dir, &targets, true);
                if files.is_empty() {
                    return Err(no_child(&run_dir));
                }
                files
            }
            Backing::File(f) if !dev_read_only => vec![f],
            _ => {
                return Err(OsError::Command {
                    cmd: format!("write to {}", dev.display()),
                    stderr: "Read-only file system".into(),
                });
            }
        };
        for f in files {
            let mut img = read_image(&f)?;
            img.fs = Some(fs_.clone());
            write_image(&f, &img)?;
        }
        Ok(())
    }

    fn top_mount(&self, target: &Path) -> Option<&MountEntry> {
        self.mounts.iter().rev().find(|m| m.info.target == target)
    }
}

/// EIO from an engine none of whose children answers.
fn no_child(run_dir: &Path) -> OsError {
    OsError::io(
        format!(
            "volume engine in {}: no replica answers (every remote one is unreachable)",
            run_dir.display()
        ),
        std::io::Error::from_raw_os_error(libc::EIO),
    )
}

/// An engine's NBD child: (machine, engine run_dir, child index).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ClientKey(u32, PathBuf, usize);

/// What an engine's NBD child knows of its connection.
#[derive(Clone, Debug)]
struct ClientState {
    target: ReplicaTarget,
    /// The pid of the replica server it is connected to; None once the connection was lost.
    conn: Option<i32>,
    /// Completed handshakes: more than one is a reconnect.
    handshakes: u32,
    /// Failures its engine's NBD client would have logged.
    errors: u64,
}

/// A fake replica server: a process of machine `node`, listening on its address.
#[derive(Clone, Debug)]
struct FakeServer {
    node: u32,
    run_dir: PathBuf,
    pid: i32,
    /// Replica id → file (resolved).
    exports: BTreeMap<String, PathBuf>,
    /// Which server this is: bicsi's (raw replicas) or qemu-storage-daemon (qcow2), as the
    /// format of its first export chose (the real one dispatches the same way).
    format: ImageFormat,
}

#[derive(Default)]
struct Net {
    next_node: u32,
    next_port: u16,
    /// Live replica servers by (host, port).
    servers: BTreeMap<(String, u16), FakeServer>,
    clients: BTreeMap<ClientKey, ClientState>,
}

impl Net {
    fn server_of(&self, node: u32, run_dir: &Path) -> Option<((String, u16), &FakeServer)> {
        self.servers
            .iter()
            .find(|(_, s)| s.node == node && s.run_dir == run_dir)
            .map(|(addr, s)| (addr.clone(), s))
    }

    /// The file an NBD target reaches right now, without side effects.
    fn peek(&self, target: &ReplicaTarget) -> Option<PathBuf> {
        let ReplicaTarget::Nbd { host, port, export } = target else {
            return None;
        };
        self.servers
            .get(&(host.clone(), *port))?
            .exports
            .get(export)
            .cloned()
    }

    fn server_pid(&self, target: &ReplicaTarget) -> Option<i32> {
        let ReplicaTarget::Nbd { host, port, .. } = target else {
            return None;
        };
        Some(self.servers.get(&(host.clone(), *port))?.pid)
    }

    /// One request of an NBD child (see `World::reach`).
    fn access(&mut self, key: &ClientKey, target: &ReplicaTarget) -> Option<PathBuf> {
        let now = self.peek(target);
        let pid = self.server_pid(target);
        let client = self
            .clients
            .entry(key.clone())
            .or_insert_with(|| ClientState {
                target: target.clone(),
                conn: None,
                handshakes: 0,
                errors: 0,
            });
        if client.conn.is_some() && (client.conn != pid || now.is_none()) {
            // The server died or cut us off: the request that finds out fails on this child.
            client.conn = None;
            client.errors += 1;
            return None;
        }
        // Not connected: connect again when the export is back (a new handshake).
        let file = now?;
        if client.conn.is_none() {
            client.conn = pid;
            client.handshakes += 1;
        }
        Some(file)
    }

    /// Connect an engine's NBD children at its start; the error names the first that fails.
    fn connect(&mut self, node: u32, run_dir: &Path, targets: &[ReplicaTarget]) -> OsResult<()> {
        for t in targets {
            if let ReplicaTarget::Nbd { host, port, export } = t {
                let Some(server) = self.servers.get(&(host.clone(), *port)) else {
                    return Err(OsError::Command {
                        cmd: "qemu-storage-daemon".into(),
                        stderr: format!(
                            "--blockdev {{\"driver\":\"nbd\",..}}: Failed to connect to \
                             '{host}:{port}': Connection refused; a remote replica is not \
                             reachable or not exported: check that its node's replica server \
                             runs (export_replica) and that host:port is reachable from this node"
                        ),
                    });
                };
                if !server.exports.contains_key(export) {
                    return Err(OsError::Command {
                        cmd: "qemu-storage-daemon".into(),
                        stderr: format!(
                            "--blockdev {{\"driver\":\"nbd\",..}}: Requested export not \
                             available\nserver reported: export '{export}' not present; a remote \
                             replica is not reachable or not exported: check that its node's \
                             replica server runs (export_replica) and that host:port is \
                             reachable from this node"
                        ),
                    });
                }
            }
        }
        self.disconnect(node, run_dir);
        for (i, t) in targets.iter().enumerate() {
            if matches!(t, ReplicaTarget::Nbd { .. }) {
                let pid = self.server_pid(t);
                self.clients.insert(
                    ClientKey(node, run_dir.to_path_buf(), i),
                    ClientState {
                        target: t.clone(),
                        conn: pid,
                        handshakes: 1,
                        errors: 0,
                    },
                );
            }
        }
        Ok(())
    }

    /// The engine's process is gone: so are its connections.
    fn disconnect(&mut self, node: u32, run_dir: &Path) {
        self.clients
            .retain(|k, _| !(k.0 == node && k.1.as_path() == run_dir));
    }

    /// For the size of an engine without local children: its first NBD child that answers.
    fn size_file(&self, run_dir: &Path, targets: &[ReplicaTarget]) -> OsResult<PathBuf> {
        targets
            .iter()
            .find_map(|t| self.peek(t))
            .ok_or_else(|| no_child(run_dir))
    }

    /// Engines (of any machine) connected to `export` of the server at `addr`.
    fn clients_of(&self, addr: &(String, u16), export: &str) -> usize {
        let Some(server) = self.servers.get(addr) else {
            return 0;
        };
        self.clients
            .values()
            .filter(|c| {
                c.conn == Some(server.pid)
                    && matches!(&c.target, ReplicaTarget::Nbd { host, port, export: e }
                        if (host, *port) == (&addr.0, addr.1) && e == export)
            })
            .count()
    }

    fn free_port(&mut self, host: &str) -> u16 {
        if self.next_port < 20_000 {
            self.next_port = 20_000;
        }
        loop {
            self.next_port = self.next_port.wrapping_add(1).max(20_000);
            if !self
                .servers
                .contains_key(&(host.to_string(), self.next_port))
            {
                return self.next_port;
            }
        }
    }
}

/// The network fake machines share: their replica servers by address and the connections of
/// their engines' NBD children. Every `Fake` has one; `Fake::with_net` puts another machine on
/// the same network, so a domain test can run two "nodes" in one process, node B exporting a
/// replica with `export_replica` and node A's engine using it as `ReplicaTarget::Nbd`. Machines on
/// one network see each other's files (the test's temp dir) as a real cluster would not: the
/// fakes only reach them through the rules above.
#[derive(Clone, Default)]
pub struct FakeNet {
    inner: Arc<Mutex<Net>>,
}

impl std::fmt::Debug for FakeNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeNet { .. }")
    }
}

impl FakeNet {
    pub fn new() -> FakeNet {
        FakeNet::default()
    }

    fn lock(&self) -> MutexGuard<'_, Net> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One simulated machine; clone it freely, all clones share it.
#[derive(Clone, Default)]
pub struct Fake {
    world: Arc<Mutex<World>>,
}

impl std::fmt::Debug for Fake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fake { .. }")
    }
}

fn lock(world: &Mutex<World>) -> MutexGuard<'_, World> {
    // A panicking test thread must not poison the machine for the other assertions.
    world.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fake {
    /// A machine alone on its own network.
    pub fn new() -> Fake {
        Fake::with_net(&FakeNet::new())
    }

    /// Another machine on `net`, which reaches the replica servers of the machines already there.
    pub fn with_net(net: &FakeNet) -> Fake {
        let node = {
            let mut n = net.lock();
            n.next_node += 1;
            n.next_node - 1
        };
        let fake = Fake::default();
        {
            let mut w = lock(&fake.world);
            w.next_pid = 40_000;
            w.node = node;
            w.net = net.clone();
        }
        fake
    }

    /// `n` machines on one network ("nodes" of a cluster).
    pub fn new_cluster(n: usize) -> Vec<Fake> {
        let net = FakeNet::new();
        (0..n).map(|_| Fake::with_net(&net)).collect()
    }

    /// The network this machine is on, to put another one on it with `with_net`.
    pub fn net(&self) -> FakeNet {
        self.world().net.clone()
    }

    /// The `Os` bundle whose parts all act on this machine.
    pub fn os(&self) -> Os {
        Os {
            images: Arc::new(FakeImages(self.clone())),
            engine: Arc::new(FakeEngine(self.clone())),
            loops: Arc::new(FakeLoops(self.clone())),
            mounts: Arc::new(FakeMounter(self.clone())),
            fs: Arc::new(FakeFilesystems(self.clone())),
        }
    }

    fn world(&self) -> MutexGuard<'_, World> {
        lock(&self.world)
    }

    /// Makes everything under `dir` share blocks (reflink clones work there), as a disk on XFS
    /// with reflink does.
    pub fn share_blocks(&self, dir: &Path) {
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        self.world().reflink_dirs.push(dir);
    }

    /// Make the next call of `op` fail with `error`. `op` is "<trait>.<method>": "images.create_replica",
    /// "images.resize", "images.info", "images.convert", "engine.start", "engine.status",
    /// "engine.stop", "loops.attach", "loops.find", "loops.detach", "loops.detach_file",
    /// "loops.refresh_size",
    /// "mounts.mount", "mounts.bind_mount", "mounts.unmount", "mounts.mount_info", "fs.probe",
    /// "fs.mkfs", "fs.grow", "fs.stats", "fs.device_size", "engine.start_volume",
    /// "engine.volume_status", "engine.export_replica", "engine.unexport_replica" (also for the
    /// forced form), "engine.replica_server_status". Several calls queue up.
    pub fn fail_next(&self, op: &str, error: OsError) {
        self.world()
            .failures
            .entry(op.to_string())
            .or_default()
            .push_back(error);
    }

    /// Simulate an engine crash: the process is gone, its export mount stays behind stale.
    pub fn kill_engine(&self, run_dir: &Path) {
        let mut w = self.world();
        let run_dir = resolve_parent(run_dir);
        if let Some(e) = w.engines.get_mut(&run_dir) {
            e.alive = false;
            let node = w.node;
            w.net.lock().disconnect(node, &run_dir);
        }
    }

    /// Simulate a replica server crash (or its node going down): the process is gone with its
    /// exports and its port, the engines connected to it lose those children (see
    /// `World::reach`), and its run directory stays behind.
    pub fn kill_replica_server(&self, run_dir: &Path) {
        let w = self.world();
        let mut net = w.net.lock();
        let run_dir = resolve_parent(run_dir);
        if let Some((addr, _)) = net.server_of(w.node, &run_dir) {
            net.servers.remove(&addr);
        }
    }

    /// Live replica servers of this machine: run_dir, host, port and exported replica ids.
    pub fn replica_servers(&self) -> Vec<(PathBuf, String, u16, Vec<String>)> {
        let w = self.world();
        let net = w.net.lock();
        net.servers
            .iter()
            .filter(|(_, s)| s.node == w.node)
            .map(|((host, port), s)| {
                (
                    s.run_dir.clone(),
                    host.clone(),
                    *port,
                    s.exports.keys().cloned().collect(),
                )
            })
            .collect()
    }

    /// Live engines.
    pub fn engines(&self) -> Vec<EngineState> {
        self.world()
            .engines
            .iter()
            .filter(|(_, e)| e.alive)
            .map(|(dir, e)| engine_state(dir, e))
            .collect()
    }

    /// Attached loop devices and their files.
    pub fn loop_devices(&self) -> Vec<(PathBuf, PathBuf)> {
        self.world()
            .loops
            .iter()
            .map(|(i, l)| (PathBuf::from(format!("{LOOP_PREFIX}{i}")), l.file.clone()))
            .collect()
    }

    /// Every mount, in the order they were made.
    pub fn mounts(&self) -> Vec<MountInfo> {
        self.world().mounts.iter().map(|m| m.info.clone()).collect()
    }

    /// Write a fake image file (e.g. a backing image that carries a filesystem).
    pub fn make_image(
        &self,
        path: &Path,
        format: ImageFormat,
        virtual_size: u64,
        fstype: Option<&str>,
    ) -> OsResult<()> {
        fs::write(path, image_bytes(format, virtual_size, fstype))
            .map_err(|e| OsError::io(format!("writing image {}", path.display()), e))
    }
}

fn engine_state(run_dir: &Path, e: &EngineEntry) -> EngineState {
    EngineState {
        pid: e.pid,
        export_path: e.export.clone(),
        qmp_socket: run_dir.join("qmp.sock"),
        replicas: e.replicas.clone(),
        read_only: e.read_only,
    }
}

struct FakeImages(Fake);
struct FakeEngine(Fake);
struct FakeLoops(Fake);
struct FakeMounter(Fake);
struct FakeFilesystems(Fake);

fn require_parent(path: &Path) -> OsResult<()> {
    match path.parent() {
        Some(dir) if dir.is_dir() => Ok(()),
        _ => Err(OsError::NotFound(format!(
            "cannot create {}: its directory does not exist; create it first",
            path.display()
        ))),
    }
}

impl ImageTool for FakeImages {
    fn create_replica(
        &self,
        path: &Path,
        size: u64,
        backing: Option<(&Path, ImageFormat)>,
    ) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("images.create_replica")?;
        if let Some((file, _)) = backing {
            if !file.is_absolute() {
                return Err(OsError::Unsupported(format!(
                    "backing file {} of replica {} must be an absolute path",
                    file.display(),
                    path.display()
                )));
            }
            if !file.exists() {
                return Err(OsError::NotFound(format!(
                    "backing file {} of replica {} does not exist; prepare the backing image on \
                     this disk first",
                    file.display(),
                    path.display()
                )));
            }
        }
        let want_backing = backing.map(|(f, _)| f.to_path_buf());
        if path.exists() {
            let img = read_image(path)?;
            if img.format == "qcow2" && img.virtual_size == size && img.backing == want_backing {
                return Ok(());
            }
            return Err(OsError::Conflict(format!(
                "replica {} already exists as {} of {} bytes with backing {:?}, but {} bytes with \
                 backing {:?} was asked; delete it or use another path",
                path.display(),
                img.format,
                img.virtual_size,
                img.backing,
                size,
                want_backing
            )));
        }
        require_parent(path)?;
        write_image(
            path,
            &FakeImage {
                format: "qcow2".into(),
                virtual_size: size,
                backing: want_backing,
                backing_format: backing.map(|(_, f)| f.as_str().to_string()),
                fs: None,
            },
        )
    }

    fn resize(&self, path: &Path, new_size: u64) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("images.resize")?;
        let mut img = read_image(path)?;
        if new_size == img.virtual_size {
            return Ok(());
        }
        if new_size < img.virtual_size {
            return Err(OsError::Unsupported(format!(
                "cannot shrink image {} from {} to {} bytes: volumes only grow",
                path.display(),
                img.virtual_size,
                new_size
            )));
        }
        let image = resolve_parent(path);
        if w.engine_using(&image, None).is_some() || w.exported_as(&image).is_some() {
            return Err(lock_error("qemu-img resize", path));
        }
        img.virtual_size = new_size;
        write_image(path, &img)
    }

    fn info(&self, path: &Path) -> OsResult<ImageInfo> {
        self.0.world().fail("images.info")?;
        if !path.exists() {
            return Err(OsError::NotFound(format!(
                "image {} does not exist",
                path.display()
            )));
        }
        let img = read_image(path)?;
        let format = ImageFormat::parse(&img.format).ok_or_else(|| {
            OsError::Unsupported(format!(
                "image {} is in format {:?}; only raw and qcow2 are supported",
                path.display(),
                img.format
            ))
        })?;
        Ok(ImageInfo {
            format,
            virtual_size: img.virtual_size,
            actual_size: fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            backing_file: img.backing,
        })
    }

    fn convert(
        &self,
        src: &Path,
        src_format: ImageFormat,
        dst: &Path,
        format: ImageFormat,
    ) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("images.convert")?;
        if dst.exists() {
            return Err(OsError::Conflict(format!(
                "cannot convert {} into {}: the destination already exists",
                src.display(),
                dst.display()
            )));
        }
        if !src.exists() {
            return Err(OsError::NotFound(format!(
                "cannot convert {}: it does not exist",
                src.display()
            )));
        }
        let image = resolve_parent(src);
        if w.engine_using(&image, None).is_some_and(|e| !e.read_only)
            || w.exported_as(&image).is_some()
        {
            return Err(lock_error("qemu-img convert", src));
        }
        require_parent(dst)?;
        let img = read_image(src)?;
        if img.format != src_format.as_str() {
            // qemu-img convert -f raw would read a qcow2 file's bytes as the volume: a bug.
            return Err(OsError::Command {
                cmd: format!("qemu-img convert -f {src_format} {}", src.display()),
                stderr: format!("the file is {}, not {src_format}", img.format),
            });
        }
        write_image(
            dst,
            &FakeImage {
                format: format.as_str().into(),
                virtual_size: img.virtual_size,
                backing: None,
                backing_format: None,
                fs: content_fs(src)?,
            },
        )
    }
    fn rebase(
        &self,
        path: &Path,
        backing: Option<(&Path, ImageFormat)>,
        safe: bool,
    ) -> OsResult<()> {
        self.0.world().fail("images.rebase")?;
        let mut img = read_image(path)?;
        if safe {
            // The content stays what it was: keep it in the image itself.
            img.fs = content_fs(path)?;
        }
        img.backing = backing.map(|(f, _)| f.to_path_buf());
        img.backing_format = backing.map(|(_, f)| f.as_str().to_string());
        write_image(path, &img)
    }

    fn create_raw(&self, path: &Path, size: u64, base: Option<&Path>) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("images.create_raw")?;
        if path.exists() {
            let img = read_image(path)?;
            if img.format == "raw" && img.virtual_size == size {
                return Ok(());
            }
            return Err(OsError::Conflict(format!(
                "raw replica {} already exists with {} bytes, but {size} bytes was asked",
                path.display(),
                img.virtual_size
            )));
        }
        require_parent(path)?;
        let fs_ = match base {
            Some(base) => {
                if !base.is_file() {
                    return Err(OsError::NotFound(format!(
                        "raw base {} of replica {} does not exist",
                        base.display(),
                        path.display()
                    )));
                }
                if !w.shares_blocks(path) || !w.shares_blocks(base) {
                    return Err(OsError::Unsupported(format!(
                        "cannot reflink {} to {}: Operation not supported",
                        base.display(),
                        path.display()
                    )));
                }
                content_fs(base)?
            }
            None => None,
        };
        write_image(
            path,
            &FakeImage {
                format: "raw".into(),
                virtual_size: size,
                backing: None,
                backing_format: None,
                fs: fs_,
            },
        )
    }

    fn resize_raw(&self, path: &Path, new_size: u64) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("images.resize_raw")?;
        let mut img = read_image(path)?;
        if new_size < img.virtual_size {
            return Err(OsError::Unsupported(format!(
                "cannot shrink raw replica {} from {} to {new_size} bytes: volumes only grow",
                path.display(),
                img.virtual_size
            )));
        }
        img.virtual_size = new_size;
        write_image(path, &img)
    }

    fn raw_size(&self, path: &Path) -> OsResult<u64> {
        self.0.world().fail("images.raw_size")?;
        Ok(read_image(path)?.virtual_size)
    }

    fn clone_raw(&self, src: &Path, dst: &Path) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("images.clone_raw")?;
        if dst.exists() {
            return Err(OsError::Conflict(format!(
                "cannot clone {} to {}: the destination exists",
                src.display(),
                dst.display()
            )));
        }
        require_parent(dst)?;
        if !w.shares_blocks(src) || !w.shares_blocks(dst) {
            return Err(OsError::Unsupported(format!(
                "cannot reflink {} to {}: Operation not supported",
                src.display(),
                dst.display()
            )));
        }
        fs::copy(src, dst)
            .map(drop)
            .map_err(|e| OsError::io(format!("cloning {}", src.display()), e))
    }

    fn shares_blocks(&self, dir: &Path) -> OsResult<bool> {
        let mut w = self.0.world();
        w.fail("images.shares_blocks")?;
        Ok(w.shares_blocks(dir))
    }
}

impl FakeEngine {
    /// `start_volume` without the failure injection, shared by `start`.
    fn start_targets(&self, w: &mut World, spec: &VolumeEngineSpec) -> OsResult<EngineState> {
        let volume = &spec.volume_id;
        if spec.replicas.is_empty() {
            return Err(OsError::Unsupported(format!(
                "engine for volume {volume:?}: no replicas given; a volume needs at least one"
            )));
        }
        for (i, target) in spec.replicas.iter().enumerate() {
            if spec.replicas[..i].contains(target) {
                return Err(OsError::Unsupported(format!(
                    "engine for volume {volume:?}: replica {target} is listed twice"
                )));
            }
            match target {
                ReplicaTarget::Local(r) => {
                    if !r.is_absolute() {
                        return Err(OsError::Unsupported(format!(
                            "engine for volume {volume:?}: replica path {} must be absolute",
                            r.display()
                        )));
                    }
                    if !r.is_file() {
                        return Err(OsError::NotFound(format!(
                            "engine for volume {volume:?}: replica {} does not exist; create it \
                             first",
                            r.display()
                        )));
                    }
                }
                ReplicaTarget::Nbd { host, port, export } => {
                    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
                        return Err(OsError::Unsupported(format!(
                            "engine for volume {volume:?}: replica {target}: {host:?} is not a \
                             host name or address"
                        )));
                    }
                    if *port == 0 {
                        return Err(OsError::Unsupported(format!(
                            "engine for volume {volume:?}: replica {target}: port 0; give the \
                             port export_replica returned"
                        )));
                    }
                    if export.is_empty() || export.len() > 4096 {
                        return Err(OsError::Unsupported(format!(
                            "engine for volume {volume:?}: replica {target}: the export name must \
                             have 1 to 4096 bytes"
                        )));
                    }
                }
            }
        }
        fs::create_dir_all(&spec.run_dir).map_err(|e| {
            OsError::io(
                format!("creating run directory {}", spec.run_dir.display()),
                e,
            )
        })?;
        let run_dir = resolve_parent(&spec.run_dir);
        let targets: Vec<ReplicaTarget> = spec
            .replicas
            .iter()
            .map(|t| match t {
                ReplicaTarget::Local(r) => ReplicaTarget::Local(resolve_parent(r)),
                nbd => nbd.clone(),
            })
            .collect();
        let replicas: Vec<PathBuf> = targets
            .iter()
            .filter_map(|t| match t {
                ReplicaTarget::Local(r) => Some(r.clone()),
                ReplicaTarget::Nbd { .. } => None,
            })
            .collect();
        if let Some(e) = w.engines.get(&run_dir).filter(|e| e.alive) {
            let (mut a, mut b) = (e.targets.clone(), targets.clone());
            a.sort();
            b.sort();
            if a == b && e.read_only == spec.read_only {
                return Ok(engine_state(&run_dir, e));
            }
            let show = |t: &[ReplicaTarget]| {
                t.iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(OsError::Conflict(format!(
                "engine in {} already serves replicas [{}] (read_only={}) for another request \
                 (volume {volume:?}: replicas [{}], read_only={}); stop it first",
                run_dir.display(),
                show(&e.targets),
                e.read_only,
                show(&spec.replicas),
                spec.read_only
            )));
        }
        let export = run_dir.join("export");
        // A dead engine's stale export can only be cleaned when no loop device holds it.
        if w.engines.contains_key(&run_dir) {
            if w.loops.values().any(|l| l.file == export) {
                return Err(export_busy(&run_dir, &export));
            }
            w.engines.remove(&run_dir);
        }
        for r in &replicas {
            let img = read_image(r)?;
            if img.format != "qcow2" {
                return Err(OsError::Command {
                    cmd: "qemu-storage-daemon".into(),
                    stderr: format!(
                        "Image is not in qcow2 format ({}); see the log above",
                        r.display()
                    ),
                });
            }
            if let Some(other) = w.engine_using(r, Some(&run_dir))
                && !(other.read_only && spec.read_only)
            {
                return Err(lock_error("qemu-storage-daemon", r));
            }
            if w.exported_as(r).is_some() {
                return Err(lock_error("qemu-storage-daemon", r));
            }
        }
        let node = w.node;
        w.net.lock().connect(node, &run_dir, &targets)?;
        fs::write(&export, b"").map_err(|e| OsError::io("creating export file", e))?;
        let mode = if spec.read_only { 0o400 } else { 0o600 };
        let _ = fs::set_permissions(&export, fs::Permissions::from_mode(mode));
        w.next_pid += 1;
        let entry = EngineEntry {
            pid: w.next_pid,
            replicas,
            targets,
            read_only: spec.read_only,
            export,
            alive: true,
        };
        let _ = fs::write(run_dir.join("qsd.pid"), format!("{}\n", entry.pid));
        let state = engine_state(&run_dir, &entry);
        w.engines.insert(run_dir, entry);
        Ok(state)
    }

    fn unexport(&self, run_dir: &Path, replica_id: &str, force: bool) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("engine.unexport_replica")?;
        let run_dir = resolve_parent(run_dir);
        let node = w.node;
        let net = w.net.clone();
        let mut net = net.lock();
        let Some((addr, _)) = net.server_of(node, &run_dir) else {
            drop(net);
            return remove_run_dir(&run_dir);
        };
        if !net.servers[&addr].exports.contains_key(replica_id) {
            return Ok(());
        }
        if !force && net.clients_of(&addr, replica_id) > 0 {
            return Err(OsError::Busy(format!(
                "replica {replica_id:?} exported on {}:{} is still in use by a volume engine (an \
                 attaching node is connected to it); stop that engine first, or use \
                 unexport_replica_force when that node is gone",
                addr.0, addr.1
            )));
        }
        let server = net.servers.get_mut(&addr).expect("found above");
        server.exports.remove(replica_id);
        if server.exports.is_empty() {
            net.servers.remove(&addr);
            drop(net);
            return remove_run_dir(&run_dir);
        }
        Ok(())
    }
}

fn remove_run_dir(run_dir: &Path) -> OsResult<()> {
    match fs::remove_dir_all(run_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(OsError::io(
            format!("removing run directory {}", run_dir.display()),
            e,
        )),
    }
}

impl Engine for FakeEngine {
    fn backup_replica(&self, replica: &Path, target: &Path) -> OsResult<bool> {
        let mut w = self.0.world();
        w.fail("engine.backup_replica")?;
        if w.engine_using(&resolve_parent(replica), None).is_none() {
            return Ok(false);
        }
        let own = read_image(replica)?.fs;
        let mut img = read_image(target)?;
        img.fs = own;
        write_image(target, &img)?;
        Ok(true)
    }

    fn start(&self, spec: &EngineSpec) -> OsResult<EngineState> {
        let mut w = self.0.world();
        w.fail("engine.start")?;
        self.start_targets(&mut w, &VolumeEngineSpec::from(spec))
    }

    fn start_volume(&self, spec: &VolumeEngineSpec) -> OsResult<EngineState> {
        let mut w = self.0.world();
        w.fail("engine.start_volume")?;
        self.start_targets(&mut w, spec)
    }

    fn status(&self, run_dir: &Path) -> OsResult<Option<EngineState>> {
        let mut w = self.0.world();
        w.fail("engine.status")?;
        let run_dir = resolve_parent(run_dir);
        Ok(w.engines
            .get(&run_dir)
            .filter(|e| e.alive)
            .map(|e| engine_state(&run_dir, e)))
    }

    fn volume_status(&self, run_dir: &Path) -> OsResult<Option<VolumeEngineState>> {
        let mut w = self.0.world();
        w.fail("engine.volume_status")?;
        let run_dir = resolve_parent(run_dir);
        let Some(e) = w.engines.get(&run_dir).filter(|e| e.alive) else {
            return Ok(None);
        };
        let net = w.net.lock();
        let mut reconnected = Vec::new();
        let mut remote_errors = 0;
        for (i, t) in e.targets.iter().enumerate() {
            if let Some(c) = net.clients.get(&ClientKey(w.node, run_dir.clone(), i)) {
                if c.handshakes > 1 {
                    reconnected.push(t.clone());
                }
                remote_errors += c.errors;
            }
        }
        Ok(Some(VolumeEngineState {
            engine: engine_state(&run_dir, e),
            replicas: e.targets.clone(),
            reconnected,
            remote_errors,
        }))
    }

    fn stop(&self, run_dir: &Path) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("engine.stop")?;
        let run_dir = resolve_parent(run_dir);
        if let Some(e) = w.engines.get(&run_dir) {
            if w.loops.values().any(|l| l.file == e.export) {
                return Err(export_busy(&run_dir, &e.export));
            }
            w.engines.remove(&run_dir);
            let node = w.node;
            w.net.lock().disconnect(node, &run_dir);
        }
        remove_run_dir(&run_dir)
    }

    fn export_replica(
        &self,
        run_dir: &Path,
        host: &str,
        port: u16,
        export: &ReplicaExport,
    ) -> OsResult<u16> {
        let mut w = self.0.world();
        w.fail("engine.export_replica")?;
        let id = &export.replica_id;
        if id.is_empty() || id.len() > 4096 {
            return Err(OsError::Unsupported(format!(
                "replica id {id:?}: an NBD export name must have 1 to 4096 bytes"
            )));
        }
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(OsError::Unsupported(format!(
                "replica server address {host:?} is not a host name or address"
            )));
        }
        if !export.path.is_absolute() {
            return Err(OsError::Unsupported(format!(
                "replica {id:?}: path {} must be absolute",
                export.path.display()
            )));
        }
        if !export.path.is_file() {
            return Err(OsError::NotFound(format!(
                "replica {id:?}: {} does not exist; create it first",
                export.path.display()
            )));
        }
        let actual = read_image(&export.path)?.format;
        if actual != export.format.as_str() {
            return Err(OsError::Command {
                cmd: format!("QMP blockdev-add {}", export.path.display()),
                stderr: format!("Image is not in {} format (it is {actual})", export.format),
            });
        }
        let path = resolve_parent(&export.path);
        fs::create_dir_all(run_dir).map_err(|e| {
            OsError::io(
                format!(
                    "creating run directory {} of the replica server",
                    run_dir.display()
                ),
                e,
            )
        })?;
        let run_dir = resolve_parent(run_dir);
        if w.engine_using(&path, None).is_some() {
            return Err(lock_error("QMP blockdev-add", &path));
        }
        let exported_as = w.exported_as(&path);
        let node = w.node;
        let net = w.net.clone();
        let mut net = net.lock();
        let addr = match net.server_of(node, &run_dir) {
            Some((_, server)) if server.format != export.format => {
                return Err(OsError::Conflict(super::engine::server_kind_conflict(
                    &run_dir, export,
                )));
            }
            Some((addr, _)) => {
                if addr.0 != host || (port != 0 && port != addr.1) {
                    return Err(OsError::Conflict(format!(
                        "replica server in {} listens on {}:{}, not on {host}:{port}; unexport \
                         its replicas first (it stops with the last one) or use that address",
                        run_dir.display(),
                        addr.0,
                        addr.1
                    )));
                }
                addr
            }
            None => {
                let port = if port == 0 { net.free_port(host) } else { port };
                let addr = (host.to_string(), port);
                if net.servers.contains_key(&addr) {
                    return Err(OsError::Conflict(format!(
                        "replica server in {}: port {port} on {host} is taken by another \
                         program; use another port",
                        run_dir.display()
                    )));
                }
                addr
            }
        };
        if let Some(server) = net.servers.get(&addr)
            && let Some(file) = server.exports.get(id)
        {
            if *file == path {
                return Ok(addr.1);
            }
            return Err(OsError::Conflict(format!(
                "replica server in {} already exports replica {id:?} from {}, not from {}; \
                 unexport it first",
                run_dir.display(),
                file.display(),
                export.path.display()
            )));
        }
        if exported_as.is_some() {
            return Err(lock_error("QMP blockdev-add", &path));
        }
        if !net.servers.contains_key(&addr) {
            w.next_pid += 1;
            let _ = fs::write(run_dir.join("qsd.pid"), format!("{}\n", w.next_pid));
            net.servers.insert(
                addr.clone(),
                FakeServer {
                    node,
                    run_dir: run_dir.clone(),
                    pid: w.next_pid,
                    exports: BTreeMap::new(),
                    format: export.format,
                },
            );
        }
        let server = net.servers.get_mut(&addr).expect("inserted above");
        server.exports.insert(id.clone(), path);
        Ok(addr.1)
    }

    fn unexport_replica(&self, run_dir: &Path, replica_id: &str) -> OsResult<()> {
        self.unexport(run_dir, replica_id, false)
    }

    fn unexport_replica_force(&self, run_dir: &Path, replica_id: &str) -> OsResult<()> {
        self.unexport(run_dir, replica_id, true)
    }

    fn replica_server_status(&self, run_dir: &Path) -> OsResult<Option<(u16, Vec<String>)>> {
        let mut w = self.0.world();
        w.fail("engine.replica_server_status")?;
        let run_dir = resolve_parent(run_dir);
        let net = w.net.lock();
        Ok(net
            .server_of(w.node, &run_dir)
            .map(|((_, port), s)| (port, s.exports.keys().cloned().collect())))
    }
}

fn export_busy(run_dir: &Path, export: &Path) -> OsError {
    OsError::Busy(format!(
        "cannot stop the engine in {}: its export {} is still in use by a loop device; unmount \
         the volume and detach its loop device first",
        run_dir.display(),
        export.display()
    ))
}

impl FakeLoops {
    fn attach_as(&self, file: &Path, force_read_only: bool) -> OsResult<PathBuf> {
        let mut w = self.0.world();

        w.fail("loops.attach")?;
        let file = resolve_parent(file);
        if !file.exists() {
            return Err(OsError::NotFound(format!(
                "cannot attach a loop device to {}: the file is not there (is its engine running?)",
                file.display()
            )));
        }
        if let Some((i, _)) = w.loops.iter().find(|(_, l)| l.file == file) {
            return Ok(PathBuf::from(format!("{LOOP_PREFIX}{i}")));
        }
        let backing = w.backing_of(&file)?;
        let size = w.backing_size(&backing)?;
        let read_only = force_read_only
            || match backing {
                Backing::Engine { read_only, .. } => read_only,
                Backing::File(_) => fs::metadata(&file)
                    .map(|m| m.permissions().mode() & 0o222 == 0)
                    .unwrap_or(false),
            };
        let idx = (0..)
            .find(|i| !w.loops.contains_key(i))
            .expect("a free index");
        w.loops.insert(
            idx,
            LoopEntry {
                file,
                size,
                read_only,
            },
        );
        Ok(PathBuf::from(format!("{LOOP_PREFIX}{idx}")))
    }
}

impl LoopDevices for FakeLoops {
    fn attach(&self, file: &Path) -> OsResult<PathBuf> {
        self.attach_as(file, false)
    }

    fn attach_read_only(&self, file: &Path) -> OsResult<PathBuf> {
        self.attach_as(file, true)
    }

    fn find(&self, file: &Path) -> OsResult<Option<PathBuf>> {
        let mut w = self.0.world();
        w.fail("loops.find")?;
        let file = resolve_parent(file);
        Ok(w.loops
            .iter()
            .find(|(_, l)| l.file == file)
            .map(|(i, _)| PathBuf::from(format!("{LOOP_PREFIX}{i}"))))
    }

    fn detach(&self, dev: &Path) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("loops.detach")?;
        let Some(idx) = World::loop_index(dev) else {
            return Err(OsError::Unsupported(format!(
                "{} is not a loop device (expected {LOOP_PREFIX}N)",
                dev.display()
            )));
        };
        if w.mounts.iter().any(|m| m.device == Some(idx)) {
            return Err(OsError::Busy(format!(
                "loop device {} is still attached after detaching: something still uses it (a \
                 mount or an open file); unmount it first, the kernel then frees it",
                dev.display()
            )));
        }
        w.loops.remove(&idx);
        Ok(())
    }

    fn flush(&self, dev: &Path) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("loops.flush")?;
        match World::loop_index(dev) {
            Some(idx) if w.loops.contains_key(&idx) => Ok(()),
            _ => Err(OsError::NotFound(format!(
                "loop device {} is not attached; nothing to flush",
                dev.display()
            ))),
        }
    }

    fn detach_file(&self, file: &Path) -> OsResult<()> {
        let file = resolve_parent(file);
        let devs: Vec<PathBuf> = {
            let mut w = self.0.world();
            w.fail("loops.detach_file")?;
            w.loops
                .iter()
                .filter(|(_, l)| l.file == file)
                .map(|(i, _)| PathBuf::from(format!("{LOOP_PREFIX}{i}")))
                .collect()
        };
        for dev in devs {
            self.detach(&dev)?;
        }
        Ok(())
    }

    fn file_mounts(&self, file: &Path) -> OsResult<Option<Vec<PathBuf>>> {
        let mut w = self.0.world();
        w.fail("loops.file_mounts")?;
        let file = resolve_parent(file);
        let Some((idx, _)) = w.loops.iter().find(|(_, l)| l.file == file) else {
            return Ok(None);
        };
        Ok(Some(
            w.mounts
                .iter()
                .filter(|m| m.device == Some(*idx) && m.bind_of.is_none())
                .map(|m| m.info.target.clone())
                .take(1)
                .collect(),
        ))
    }

    fn refresh_size(&self, dev: &Path) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("loops.refresh_size")?;
        let Some((idx, l)) = w.loop_entry(dev) else {
            return Err(OsError::NotFound(format!(
                "loop device {} is not attached; attach it to the volume's export first",
                dev.display()
            )));
        };
        let file = l.file.clone();
        let backing = w.backing_of(&file)?;
        let size = w.backing_size(&backing)?;
        if let Some(l) = w.loops.get_mut(&idx) {
            l.size = size;
        }
        Ok(())
    }
}

fn ensure_target(target: &Path, want_dir: bool) -> OsResult<()> {
    if fs::symlink_metadata(target).is_ok() {
        return Ok(());
    }
    let result = if want_dir {
        fs::create_dir(target)
    } else {
        fs::write(target, b"")
    };
    result.map_err(|e| {
        OsError::io(
            format!(
                "creating mount target {} (its parent directory must exist)",
                target.display()
            ),
            e,
        )
    })
}

impl Mounter for FakeMounter {
    fn mount(
        &self,
        source: &Path,
        target: &Path,
        fstype: &str,
        options: &[String],
    ) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("mounts.mount")?;
        let target = resolve_parent(target);
        let source_name = source.display().to_string();
        if let Some(top) = w.top_mount(&target) {
            if top.bind_of.is_none() && top.info.source == source_name {
                return Ok(());
            }
            return Err(OsError::Conflict(format!(
                "cannot mount {} on {}: {} ({}) is already mounted there; unmount it first",
                source.display(),
                target.display(),
                top.info.source,
                top.info.fstype
            )));
        }
        let (backing, dev_ro) = w.device_backing(source).map_err(|_| {
            OsError::NotFound(format!(
                "cannot mount {} on {}: the device does not exist (is its loop device attached?)",
                source.display(),
                target.display()
            ))
        })?;
        let found = w.device_fs(source)?;
        if found.as_ref().map(|f| f.fstype.as_str()) != Some(fstype) {
            return Err(OsError::Command {
                cmd: format!(
                    "mount -t {fstype} -- {} {}",
                    source.display(),
                    target.display()
                ),
                stderr: format!(
                    "mount: {}: wrong fs type, bad option, bad superblock on {}, missing codepage \
                     or helper program, or other error.",
                    target.display(),
                    source.display()
                ),
            });
        }
        ensure_target(&target, true)?;
        let engine_ro = matches!(
            backing,
            Backing::Engine {
                read_only: true,
                ..
            }
        );
        // As mount(8) does on a write-protected device: fall back to read-only.
        let read_only = dev_ro || engine_ro || options.iter().any(|o| o == "ro");
        let mut opts = vec![if read_only { "ro" } else { "rw" }.to_string()];
        for o in options {
            let o = o.trim();
            if !o.is_empty() && o != "ro" && o != "rw" && !opts.iter().any(|x| x == o) {
                opts.push(o.to_string());
            }
        }
        w.mounts.push(MountEntry {
            info: MountInfo {
                source: source_name,
                target,
                fstype: fstype.to_string(),
                options: opts,
            },
            device: World::loop_index(source),
            bind_of: None,
            read_only,
        });
        Ok(())
    }

    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("mounts.bind_mount")?;
        let target = resolve_parent(target);
        let source_key = resolve_parent(source);
        // What is bound: a fake device node, a fake mount, or a plain path.
        let (info_source, fstype, device, is_dir) = if let Some((idx, _)) = w.loop_entry(source) {
            (
                "devtmpfs".to_string(),
                "devtmpfs".to_string(),
                Some(idx),
                false,
            )
        } else if let Some(m) = w.top_mount(&source_key) {
            (m.info.source.clone(), m.info.fstype.clone(), m.device, true)
        } else {
            let meta = fs::metadata(source).map_err(|e| {
                OsError::io(
                    format!(
                        "cannot bind-mount {} on {}: source",
                        source.display(),
                        target.display()
                    ),
                    e,
                )
            })?;
            ("none".to_string(), "none".to_string(), None, meta.is_dir())
        };
        if let Some(top) = w.top_mount(&target) {
            if top.bind_of.as_deref() == Some(source_key.as_path()) && top.read_only == read_only {
                return Ok(());
            }
            return Err(OsError::Conflict(format!(
                "cannot bind-mount {} on {} ({}): {} ({}) is already mounted there; unmount it \
                 first",
                source.display(),
                target.display(),
                if read_only { "read-only" } else { "read-write" },
                top.info.source,
                if top.read_only {
                    "read-only"
                } else {
                    "read-write"
                },
            )));
        }
        ensure_target(&target, is_dir)?;
        w.mounts.push(MountEntry {
            info: MountInfo {
                source: info_source,
                target,
                fstype,
                options: vec![if read_only { "ro" } else { "rw" }.to_string()],
            },
            device,
            bind_of: Some(source_key),
            read_only,
        });
        Ok(())
    }

    fn unmount(&self, target: &Path) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("mounts.unmount")?;
        let target = resolve_parent(target);
        w.mounts.retain(|m| m.info.target != target);
        Ok(())
    }

    fn mount_info(&self, target: &Path) -> OsResult<Option<MountInfo>> {
        let mut w = self.0.world();
        w.fail("mounts.mount_info")?;
        Ok(w.top_mount(&resolve_parent(target)).map(|m| m.info.clone()))
    }

    fn mounts_of(&self, device: &Path) -> OsResult<Vec<PathBuf>> {
        let mut w = self.0.world();
        w.fail("mounts.mounts_of")?;
        let Some(index) = World::loop_index(device) else {
            return Ok(Vec::new());
        };
        let mut found: Vec<PathBuf> = w
            .mounts
            .iter()
            .filter(|m| m.device == Some(index))
            .map(|m| m.info.target.clone())
            .collect();
        found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        found.dedup();
        Ok(found)
    }
}

impl Filesystems for FakeFilesystems {
    fn probe(&self, dev: &Path) -> OsResult<Option<String>> {
        let mut w = self.0.world();
        w.fail("fs.probe")?;
        if fs::metadata(dev).is_ok_and(|m| m.is_dir()) {
            return Err(OsError::Unsupported(format!(
                "cannot probe {}: it is neither a block device nor a regular file",
                dev.display()
            )));
        }
        match w.device_fs(dev) {
            Ok(found) => Ok(found.map(|f| f.fstype)),
            Err(OsError::NotFound(m)) => Err(OsError::NotFound(format!("cannot probe {m}"))),
            Err(e) => Err(e),
        }
    }

    fn mkfs(&self, dev: &Path, fstype: &str) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("fs.mkfs")?;
        if !SUPPORTED_FILESYSTEMS.contains(&fstype) {
            return Err(OsError::Unsupported(format!(
                "filesystem type {fstype:?} is not supported; use one of {}",
                SUPPORTED_FILESYSTEMS.join(", ")
            )));
        }
        if let Some(found) = w.device_fs(dev)? {
            return Err(OsError::Conflict(format!(
                "refusing to format {} as {fstype}: it already holds {}; its data would be lost",
                dev.display(),
                found.fstype
            )));
        }
        let size = w.device_size(dev)?;
        if fstype == "xfs" && size <= 300 << 20 {
            return Err(OsError::Command {
                cmd: format!("mkfs.xfs -f -q -K {}", dev.display()),
                stderr: "Filesystem must be larger than 300MB.; xfs needs a volume of at least \
                         300 MiB; ask for a bigger volume"
                    .into(),
            });
        }
        w.set_device_fs(
            dev,
            FakeFs {
                fstype: fstype.to_string(),
                size,
            },
        )
    }

    fn grow(&self, dev: &Path, mount_point: &Path, fstype: &str) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("fs.grow")?;
        if !SUPPORTED_FILESYSTEMS.contains(&fstype) {
            return Err(OsError::Unsupported(format!(
                "filesystem type {fstype:?} is not supported; use one of {}",
                SUPPORTED_FILESYSTEMS.join(", ")
            )));
        }
        let idx = World::loop_index(dev);
        let mounted_here = w
            .top_mount(&resolve_parent(mount_point))
            .is_some_and(|m| idx.is_some() && m.device == idx);
        if !mounted_here {
            if let Some(m) = w.mounts.iter().find(|m| idx.is_some() && m.device == idx) {
                return Err(OsError::Busy(format!(
                    "cannot grow the filesystem on {}: it is mounted at {}, not at {}; pass that \
                     mount point",
                    dev.display(),
                    m.info.target.display(),
                    mount_point.display()
                )));
            }
            if fstype == "xfs" {
                return Err(OsError::Unsupported(format!(
                    "cannot grow the xfs filesystem on {}: xfs grows only while mounted; mount it \
                     at {} first",
                    dev.display(),
                    mount_point.display()
                )));
            }
        }
        let found = w.device_fs(dev)?;
        if found.as_ref().map(|f| f.fstype.as_str()) != Some(fstype) {
            return Err(OsError::Command {
                cmd: format!("grow {fstype} on {}", dev.display()),
                stderr: format!("{} holds no {fstype} filesystem", dev.display()),
            });
        }
        let size = w.device_size(dev)?;
        if found.is_some_and(|f| f.size >= size) {
            return Ok(());
        }
        w.set_device_fs(
            dev,
            FakeFs {
                fstype: fstype.to_string(),
                size,
            },
        )
    }

    fn stats(&self, path: &Path) -> OsResult<FsStats> {
        let mut w = self.0.world();
        w.fail("fs.stats")?;
        let target = resolve_parent(path);
        if let Some(m) = w.top_mount(&target)
            && let Some(idx) = m.device
            && m.info.fstype != "devtmpfs"
        {
            let dev = PathBuf::from(format!("{LOOP_PREFIX}{idx}"));
            if let Some(f) = w.device_fs(&dev)? {
                // Shaped like a fresh filesystem: a little metadata, one inode per 16 KiB (ext4's
                // default ratio), 11 inodes in use.
                let used = f.size / 64;
                let inodes = (f.size / 16384).max(16);
                return Ok(FsStats {
                    total_bytes: f.size,
                    available_bytes: f.size - used,
                    used_bytes: used,
                    total_inodes: inodes,
                    free_inodes: inodes - 11,
                    used_inodes: 11,
                });
            }
        }
        drop(w);
        super::fs::SysFilesystems::new().stats(path)
    }

    fn device_size(&self, dev: &Path) -> OsResult<u64> {
        let mut w = self.0.world();
        w.fail("fs.device_size")?;
        w.device_size(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::testutil::Cleanup;

    fn kind(r: &OsResult<impl std::fmt::Debug>) -> String {
        match r {
            Ok(v) => format!("Ok({v:?})"),
            Err(OsError::Command { .. }) => "Command".into(),
            Err(OsError::Io { .. }) => "Io".into(),
            Err(OsError::NotFound(_)) => "NotFound".into(),
            Err(OsError::Busy(_)) => "Busy".into(),
            Err(OsError::Conflict(_)) => "Conflict".into(),
            Err(OsError::Unsupported(_)) => "Unsupported".into(),
            Err(OsError::NoSpace(_)) => "NoSpace".into(),
            Err(OsError::Timeout(_)) => "Timeout".into(),
            Err(OsError::Unavailable(_)) => "Unavailable".into(),
            Err(OsError::Other(_)) => "Other".into(),
        }
    }

    /// The basic node flow, as observations that must be the same on the fake and on the real
    /// machine (paths of devices and pids differ, so they are reduced to what a caller checks).
    fn basic_flow(os: &Os, dir: &Path, cleanup: &mut Cleanup) -> Vec<String> {
        let mut seen = Vec::new();
        let mut note = |what: &str, v: String| seen.push(format!("{what}: {v}"));
        let size = 64u64 << 20;
        let reps: Vec<PathBuf> = (0..2)
            .map(|i| {
                let disk = dir.join(format!("disk{i}"));
                fs::create_dir_all(&disk).unwrap();
                disk.join("replica.qcow2")
            })
            .collect();
        for r in &reps {
            note("create", kind(&os.images.create_replica(r, size, None)));
            note(
                "create again",
                kind(&os.images.create_replica(r, size, None)),
            );
        }
        let info = os.images.info(&reps[0]).unwrap();
        note(
            "info",
            format!(
                "{} {} {:?}",
                info.format, info.virtual_size, info.backing_file
            ),
        );
        note(
            "create other size",
            kind(&os.images.create_replica(&reps[0], size * 2, None)),
        );
        let run_dir = dir.join("run");
        cleanup.engine(&run_dir);
        let spec = EngineSpec {
            volume_id: "pvc-flow".into(),
            replicas: reps.clone(),
            run_dir: run_dir.clone(),
            read_only: false,
        };
        note("status before", kind(&os.engine.status(&run_dir)));
        let state = os.engine.start(&spec).unwrap();
        note(
            "state",
            format!("{:?} ro={}", state.replicas == reps, state.read_only),
        );
        let status = os.engine.status(&run_dir).unwrap().unwrap();
        note("status pid", format!("{}", status.pid == state.pid));
        note(
            "start again",
            format!("{}", os.engine.start(&spec).unwrap().pid == state.pid),
        );
        note(
            "resize while running",
            kind(&os.images.resize(&reps[0], size * 2)),
        );

        let dev = os.loops.attach(&state.export_path).unwrap();
        cleanup.loop_file(&state.export_path);
        note(
            "attach again",
            format!("{}", os.loops.attach(&state.export_path).unwrap() == dev),
        );
        note(
            "find",
            format!(
                "{}",
                os.loops.find(&state.export_path).unwrap() == Some(dev.clone())
            ),
        );
        note("device size", kind(&os.fs.device_size(&dev)));
        note("probe", kind(&os.fs.probe(&dev)));
        note("mkfs btrfs", kind(&os.fs.mkfs(&dev, "btrfs")));
        note("mkfs", kind(&os.fs.mkfs(&dev, "ext4")));
        note("probe after", kind(&os.fs.probe(&dev)));
        note("mkfs again", kind(&os.fs.mkfs(&dev, "ext4")));

        let stage = dir.join("stage");
        let publish = dir.join("publish");
        let block = dir.join("block");
        cleanup.mount(&stage);
        cleanup.mount(&publish);
        cleanup.mount(&block);
        note(
            "mount wrong fs",
            kind(&os.mounts.mount(&dev, &stage, "xfs", &[])),
        );
        note("mount", kind(&os.mounts.mount(&dev, &stage, "ext4", &[])));
        note(
            "mount again",
            kind(&os.mounts.mount(&dev, &stage, "ext4", &[])),
        );
        let m = os.mounts.mount_info(&stage).unwrap().unwrap();
        note(
            "stage info",
            format!(
                "{} {} rw={}",
                m.fstype,
                m.target == resolve_parent(&stage),
                m.options.contains(&"rw".into())
            ),
        );
        note(
            "bind ro",
            kind(&os.mounts.bind_mount(&stage, &publish, true)),
        );
        note(
            "bind ro again",
            kind(&os.mounts.bind_mount(&stage, &publish, true)),
        );
        note(
            "bind rw over ro",
            kind(&os.mounts.bind_mount(&stage, &publish, false)),
        );
        let p = os.mounts.mount_info(&publish).unwrap().unwrap();
        note(
            "publish info",
            format!("{} ro={}", p.fstype, p.options.contains(&"ro".into())),
        );
        note(
            "bind block",
            kind(&os.mounts.bind_mount(&dev, &block, false)),
        );
        note(
            "block target is not a dir",
            format!("{}", !fs::metadata(&block).unwrap().is_dir()),
        );
        let st = os.fs.stats(&stage).unwrap();
        note(
            "stats",
            format!(
                "{}",
                st.total_bytes > 0 && st.total_bytes <= size && st.used_bytes < st.total_bytes
            ),
        );
        note("stop while attached", kind(&os.engine.stop(&run_dir)));

        for t in [&publish, &block, &stage] {
            note("unmount", kind(&os.mounts.unmount(t)));
            note("unmount again", kind(&os.mounts.unmount(t)));
            note("info after", kind(&os.mounts.mount_info(t)));
        }
        note("detach", kind(&os.loops.detach(&dev)));
        note(
            "detach again",
            kind(&os.loops.detach_file(&state.export_path)),
        );
        note("find after", kind(&os.loops.find(&state.export_path)));
        note("stop", kind(&os.engine.stop(&run_dir)));
        note("stop again", kind(&os.engine.stop(&run_dir)));
        note("status after", kind(&os.engine.status(&run_dir)));
        note("run dir gone", format!("{}", !run_dir.exists()));
        for r in &reps {
            note("resize stopped", kind(&os.images.resize(r, size * 2)));
        }
        note("shrink", kind(&os.images.resize(&reps[0], size)));
        note(
            "attach missing",
            kind(&os.loops.attach(&dir.join("nothing"))),
        );
        note("probe missing", kind(&os.fs.probe(&dir.join("nothing"))));
        note(
            "mount missing",
            kind(&os.mounts.mount(&dir.join("nothing"), &stage, "ext4", &[])),
        );

        // Restart: the filesystem made through the first engine is there through the second.
        let state = os.engine.start(&spec).unwrap();
        let dev = os.loops.attach(&state.export_path).unwrap();
        cleanup.loop_file(&state.export_path);
        note(
            "size after offline resize",
            format!("{}", os.fs.device_size(&dev).unwrap() == size * 2),
        );
        note("probe after restart", kind(&os.fs.probe(&dev)));
        note("grow xfs unmounted", kind(&os.fs.grow(&dev, &stage, "xfs")));
        note("grow offline", kind(&os.fs.grow(&dev, &stage, "ext4")));
        note(
            "grow offline again",
            kind(&os.fs.grow(&dev, &stage, "ext4")),
        );
        note(
            "mount after restart",
            kind(&os.mounts.mount(&dev, &stage, "ext4", &[])),
        );
        note(
            "grow mounted elsewhere",
            kind(&os.fs.grow(&dev, &publish, "ext4")),
        );
        let st = os.fs.stats(&stage).unwrap();
        note("grown", format!("{}", st.total_bytes > size));
        os.mounts.unmount(&stage).unwrap();
        os.loops.detach(&dev).unwrap();
        os.engine.stop(&run_dir).unwrap();
        seen
    }

    const EXPECTED: &[&str] = &[
        "create: Ok(())",
        "create again: Ok(())",
        "create: Ok(())",
        "create again: Ok(())",
        "info: qcow2 67108864 None",
        "create other size: Conflict",
        "status before: Ok(None)",
        "state: true ro=false",
        "status pid: true",
        "start again: true",
        "resize while running: Command",
        "attach again: true",
        "find: true",
        "device size: Ok(67108864)",
        "probe: Ok(None)",
        "mkfs btrfs: Unsupported",
        "mkfs: Ok(())",
        "probe after: Ok(Some(\"ext4\"))",
        "mkfs again: Conflict",
        "mount wrong fs: Command",
        "mount: Ok(())",
        "mount again: Ok(())",
        "stage info: ext4 true rw=true",
        "bind ro: Ok(())",
        "bind ro again: Ok(())",
        "bind rw over ro: Conflict",
        "publish info: ext4 ro=true",
        "bind block: Ok(())",
        "block target is not a dir: true",
        "stats: true",
        "stop while attached: Busy",
        "unmount: Ok(())",
        "unmount again: Ok(())",
        "info after: Ok(None)",
        "unmount: Ok(())",
        "unmount again: Ok(())",
        "info after: Ok(None)",
        "unmount: Ok(())",
        "unmount again: Ok(())",
        "info after: Ok(None)",
        "detach: Ok(())",
        "detach again: Ok(())",
        "find after: Ok(None)",
        "stop: Ok(())",
        "stop again: Ok(())",
        "status after: Ok(None)",
        "run dir gone: true",
        "resize stopped: Ok(())",
        "resize stopped: Ok(())",
        "shrink: Unsupported",
        "attach missing: NotFound",
        "probe missing: NotFound",
        "mount missing: NotFound",
        "size after offline resize: true",
        "probe after restart: Ok(Some(\"ext4\"))",
        "grow xfs unmounted: Unsupported",
        "grow offline: Ok(())",
        "grow offline again: Ok(())",
        "mount after restart: Ok(())",
        "grow mounted elsewhere: Busy",
        "grown: true",
    ];

    #[test]
    fn fake_basic_flow() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::new();
        let mut cleanup = Cleanup::with(fake.os());
        let seen = basic_flow(&fake.os(), dir.path(), &mut cleanup);
        assert_eq!(seen, EXPECTED);
        assert!(fake.engines().is_empty());
        assert!(fake.loop_devices().is_empty());
        assert!(fake.mounts().is_empty());
    }

    #[test]
    fn real_matches_fake_basic_flow() {
        if !crate::os::root_or_skip("real_matches_fake_basic_flow") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let seen = basic_flow(&Os::real(), dir.path(), &mut cleanup);
        assert_eq!(seen, EXPECTED);
    }

    #[test]
    fn fake_engines_lock_replicas_and_readonly_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::new();
        let os = fake.os();
        let r = dir.path().join("r.qcow2");
        os.images.create_replica(&r, 1 << 30, None).unwrap();
        let spec = |run: &str, ro: bool| EngineSpec {
            volume_id: "v".into(),
            replicas: vec![r.clone()],
            run_dir: dir.path().join(run),
            read_only: ro,
        };
        let a = os.engine.start(&spec("a", false)).unwrap();
        let err = os.engine.start(&spec("b", false)).unwrap_err();
        assert!(err.to_string().contains("lock"), "{err}");
        assert!(matches!(
            os.engine.start(&spec("b", true)),
            Err(OsError::Command { .. })
        ));
        let dev = os.loops.attach(&a.export_path).unwrap();
        os.fs.mkfs(&dev, "xfs").unwrap();
        os.loops.detach(&dev).unwrap();
        os.engine.stop(&dir.path().join("a")).unwrap();

        // Two read-only engines may share a replica; their devices and mounts are read-only.
        let b = os.engine.start(&spec("b", true)).unwrap();
        let c = os.engine.start(&spec("c", true)).unwrap();
        let dev = os.loops.attach(&b.export_path).unwrap();
        assert!(matches!(
            os.fs.mkfs(&dev, "ext4"),
            Err(OsError::Conflict(_))
        ));
        let mnt = dir.path().join("mnt");
        os.mounts.mount(&dev, &mnt, "xfs", &[]).unwrap();
        let info = os.mounts.mount_info(&mnt).unwrap().unwrap();
        assert_eq!(info.options[0], "ro");
        assert!(matches!(os.loops.detach(&dev), Err(OsError::Busy(_))));
        os.mounts.unmount(&mnt).unwrap();
        os.loops.detach(&dev).unwrap();
        assert_eq!(fake.engines().len(), 2);
        os.engine.stop(&dir.path().join("b")).unwrap();
        os.engine.stop(&dir.path().join("c")).unwrap();
        let _ = c;
    }

    #[test]
    fn fake_crash_failure_injection_and_backing_images() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::new();
        let os = fake.os();
        // A backing image that carries a filesystem shows through a bigger replica.
        let backing = dir.path().join("backing");
        fake.make_image(&backing, ImageFormat::Raw, 8 << 20, Some("ext4"))
            .unwrap();
        assert_eq!(os.images.info(&backing).unwrap().format, ImageFormat::Raw);
        let r = dir.path().join("r.qcow2");
        os.images
            .create_replica(&r, 32 << 20, Some((&backing, ImageFormat::Raw)))
            .unwrap();
        assert_eq!(
            os.images.info(&r).unwrap().backing_file,
            Some(backing.clone())
        );
        let spec = EngineSpec {
            volume_id: "v".into(),
            replicas: vec![r.clone()],
            run_dir: dir.path().join("run"),
            read_only: false,
        };
        let st = os.engine.start(&spec).unwrap();
        let dev = os.loops.attach(&st.export_path).unwrap();
        assert_eq!(os.fs.probe(&dev).unwrap().as_deref(), Some("ext4"));
        let mnt = dir.path().join("mnt");
        os.mounts.mount(&dev, &mnt, "ext4", &[]).unwrap();
        assert_eq!(os.fs.stats(&mnt).unwrap().total_bytes, 8 << 20);
        os.fs.grow(&dev, &mnt, "ext4").unwrap();
        assert_eq!(os.fs.stats(&mnt).unwrap().total_bytes, 32 << 20);
        // The shared backing file is untouched.
        assert_eq!(content_fs(&backing).unwrap().unwrap().size, 8 << 20);

        // Exporting the volume flattens it.
        os.mounts.unmount(&mnt).unwrap();
        os.loops.detach(&dev).unwrap();
        let err = os
            .images
            .convert(
                &r,
                ImageFormat::Qcow2,
                &dir.path().join("x"),
                ImageFormat::Qcow2,
            )
            .unwrap_err();
        assert!(err.to_string().contains("lock"), "{err}");
        os.engine.stop(&spec.run_dir).unwrap();
        let out = dir.path().join("exported.qcow2");
        os.images
            .convert(&r, ImageFormat::Qcow2, &out, ImageFormat::Qcow2)
            .unwrap();
        let info = os.images.info(&out).unwrap();
        assert_eq!(
            (info.format, info.virtual_size, info.backing_file),
            (ImageFormat::Qcow2, 32 << 20, None)
        );

        // A crashed engine: not live, its stale export blocks nothing once the loop is gone.
        let st = os.engine.start(&spec).unwrap();
        let dev = os.loops.attach(&st.export_path).unwrap();
        fake.kill_engine(&spec.run_dir);
        assert_eq!(os.engine.status(&spec.run_dir).unwrap(), None);
        assert!(matches!(os.fs.probe(&dev), Err(OsError::Io { .. })));
        assert!(matches!(os.engine.start(&spec), Err(OsError::Busy(_))));
        os.loops.detach(&dev).unwrap();
        let st2 = os.engine.start(&spec).unwrap();
        assert_ne!(st2.pid, st.pid);

        // Injected failures come once each, in order.
        fake.fail_next("fs.mkfs", OsError::NoSpace("disk full".into()));
        let dev = os.loops.attach(&st2.export_path).unwrap();
        assert!(matches!(os.fs.mkfs(&dev, "ext4"), Err(OsError::NoSpace(_))));
        assert!(matches!(
            os.fs.mkfs(&dev, "ext4"),
            Err(OsError::Conflict(_))
        ));
        os.loops.detach(&dev).unwrap();
        os.engine.stop(&spec.run_dir).unwrap();
        assert!(fake.engines().is_empty());
    }

    #[test]
    fn fake_sniffs_real_filesystems_in_raw_files() {
        let mut head = vec![0u8; 2048];
        assert_eq!(sniff_fs(&head), None);
        head[1080] = 0x53;
        head[1081] = 0xef;
        assert_eq!(sniff_fs(&head).as_deref(), Some("ext4"));
        assert_eq!(sniff_fs(b"XFSB....").as_deref(), Some("xfs"));
    }

    /// The loop engine's file work, as observations that must be the same on the fake and on
    /// the real machine: `shared` is a directory whose filesystem shares blocks (XFS with
    /// reflink), `plain` one whose filesystem does not (ext4).
    fn raw_flow(os: &Os, shared: &Path, plain: &Path, cleanup: &mut Cleanup) -> Vec<String> {
        let mut seen = Vec::new();
        let mut note = |what: &str, v: String| seen.push(format!("{what}: {v}"));
        let size = 64u64 << 20;
        note("shares blocks", kind(&os.images.shares_blocks(shared)));
        note("plain shares blocks", kind(&os.images.shares_blocks(plain)));
        let r = shared.join("volume.raw");
        note("create", kind(&os.images.create_raw(&r, size, None)));
        note("create again", kind(&os.images.create_raw(&r, size, None)));
        note(
            "create other size",
            kind(&os.images.create_raw(&r, size * 2, None)),
        );
        note("size", kind(&os.images.raw_size(&r)));
        // A base holding a filesystem, as the raw expansion of an image would.
        let base = shared.join("backing.raw");
        os.images.create_raw(&base, size / 2, None).unwrap();
        cleanup.loop_file(&base);
        let dev = os.loops.attach(&base).unwrap();
        os.fs.mkfs(&dev, "ext4").unwrap();
        os.loops.detach(&dev).unwrap();
        let clone = shared.join("clone.raw");
        note(
            "clone of base",
            kind(&os.images.create_raw(&clone, size, Some(&base))),
        );
        note(
            "clone across filesystems",
            kind(
                &os.images
                    .create_raw(&plain.join("c.raw"), size, Some(&base)),
            ),
        );
        cleanup.loop_file(&clone);
        let dev = os.loops.attach(&clone).unwrap();
        note("clone holds", kind(&os.fs.probe(&dev)));
        note("clone device size", kind(&os.fs.device_size(&dev)));
        note("file mounts unmounted", kind(&os.loops.file_mounts(&clone)));
        note("file mounts no device", kind(&os.loops.file_mounts(&r)));
        let mnt = shared.join("mnt");
        cleanup.mount(&mnt);
        os.mounts.mount(&dev, &mnt, "ext4", &[]).unwrap();
        let mounts = os.loops.file_mounts(&clone).unwrap();
        note(
            "file mounts",
            format!("{}", mounts == Some(vec![mnt.clone()])),
        );
        os.loops.flush(&dev).unwrap();
        let snap = shared.join("snapshot.raw");
        note("clone_raw live", kind(&os.images.clone_raw(&clone, &snap)));
        note("clone_raw again", kind(&os.images.clone_raw(&clone, &snap)));
        note(
            "clone_raw across filesystems",
            kind(&os.images.clone_raw(&clone, &plain.join("s.raw"))),
        );
        os.mounts.unmount(&mnt).unwrap();
        os.loops.detach(&dev).unwrap();
        note("grow", kind(&os.images.resize_raw(&clone, size * 2)));
        note("grown size", kind(&os.images.raw_size(&clone)));
        note("shrink", kind(&os.images.resize_raw(&clone, size)));
        cleanup.loop_file(&snap);
        let ro = os.loops.attach_read_only(&snap).unwrap();
        note("snapshot holds", kind(&os.fs.probe(&ro)));
        note("snapshot size", kind(&os.fs.device_size(&ro)));
        note("read-only mkfs", kind(&os.fs.mkfs(&ro, "xfs")));
        os.loops.detach(&ro).unwrap();
        let q = shared.join("out.qcow2");
        note(
            "convert raw to qcow2",
            kind(
                &os.images
                    .convert(&clone, ImageFormat::Raw, &q, ImageFormat::Qcow2),
            ),
        );
        let info = os.images.info(&q).unwrap();
        note(
            "converted",
            format!("{} {}", info.format, info.virtual_size),
        );
        seen
    }

    const RAW_EXPECTED: &[&str] = &[
        "shares blocks: Ok(true)",
        "plain shares blocks: Ok(false)",
        "create: Ok(())",
        "create again: Ok(())",
        "create other size: Conflict",
        "size: Ok(67108864)",
        "clone of base: Ok(())",
        "clone across filesystems: Unsupported",
        "clone holds: Ok(Some(\"ext4\"))",
        "clone device size: Ok(67108864)",
        "file mounts unmounted: Ok(Some([]))",
        "file mounts no device: Ok(None)",
        "file mounts: true",
        "clone_raw live: Ok(())",
        "clone_raw again: Conflict",
        "clone_raw across filesystems: Unsupported",
        "grow: Ok(())",
        "grown size: Ok(134217728)",
        "shrink: Unsupported",
        "snapshot holds: Ok(Some(\"ext4\"))",
        "snapshot size: Ok(67108864)",
        "read-only mkfs: Conflict",
        "convert raw to qcow2: Ok(())",
        "converted: qcow2 134217728",
    ];

    #[test]
    fn fake_raw_flow() {
        let (shared, plain) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let fake = Fake::new();
        fake.share_blocks(shared.path());
        let mut cleanup = Cleanup::with(fake.os());
        let seen = raw_flow(&fake.os(), shared.path(), plain.path(), &mut cleanup);
        assert_eq!(seen, RAW_EXPECTED);
        assert!(fake.loop_devices().is_empty());
        assert!(fake.mounts().is_empty());
    }

    /// A run directory holds one replica server: raw replicas (bicsi's server) and qcow2 ones
    /// (qemu-storage-daemon) in the same one conflict, as on the real engine
    /// (`tests/replica_server.rs` checks the real side).
    #[test]
    fn fake_replica_servers_are_one_kind_per_run_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let fake = Fake::new();
        let os = fake.os();
        let (raw, qcow2) = (d.join("r.raw"), d.join("q.qcow2"));
        os.images.create_raw(&raw, 1 << 20, None).unwrap();
        os.images.create_replica(&qcow2, 1 << 20, None).unwrap();
        let export = |id: &str, path: &Path, format| ReplicaExport {
            replica_id: id.into(),
            path: path.to_path_buf(),
            format,
        };
        let (raw_dir, qemu_dir) = (d.join("replica-server-raw"), d.join("replica-server"));
        let port = os
            .engine
            .export_replica(
                &raw_dir,
                "127.0.0.1",
                0,
                &export("r", &raw, ImageFormat::Raw),
            )
            .unwrap();
        let err = os
            .engine
            .export_replica(
                &raw_dir,
                "127.0.0.1",
                0,
                &export("q", &qcow2, ImageFormat::Qcow2),
            )
            .unwrap_err();
        assert!(matches!(err, OsError::Conflict(_)), "{err}");
        assert!(
            err.to_string().contains("run directory of its own"),
            "{err}"
        );
        let qport = os
            .engine
            .export_replica(
                &qemu_dir,
                "127.0.0.1",
                0,
                &export("q", &qcow2, ImageFormat::Qcow2),
            )
            .unwrap();
        assert_ne!(port, qport);
        assert_eq!(
            os.engine.replica_server_status(&raw_dir).unwrap(),
            Some((port, vec!["r".to_string()]))
        );
        os.engine.unexport_replica(&raw_dir, "r").unwrap();
        os.engine.unexport_replica(&qemu_dir, "q").unwrap();
        assert!(fake.replica_servers().is_empty());
    }

    /// XFS made with reflink in a file, loop-mounted; lazily unmounted on drop (after the
    /// test's own `Cleanup`, declared later, has released what sits on it).
    struct XfsDir(tempfile::TempDir);

    impl Drop for XfsDir {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path().join("mnt"))
                .status();
        }
    }

    #[test]
    fn real_matches_fake_raw_flow() {
        if !crate::os::root_or_skip("real_matches_fake_raw_flow") {
            return;
        }
        use crate::os::testutil::sh;
        use std::process::Command;
        let xfs = XfsDir(tempfile::tempdir().unwrap());
        let image = xfs.0.path().join("xfs.img");
        fs::File::create(&image)
            .unwrap()
            .set_len(512 << 20)
            .unwrap();
        sh(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&image));
        let shared = xfs.0.path().join("mnt");
        fs::create_dir(&shared).unwrap();
        sh(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&shared));
        let plain = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let seen = raw_flow(&Os::real(), &shared, plain.path(), &mut cleanup);
        assert_eq!(seen, RAW_EXPECTED);
    }
}
