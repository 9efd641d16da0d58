//! One simulated machine (`Fake`) and what its parts share: the `World` of live engines, loop
//! devices, mounts and injected failures, and the fake image files on disk (a small JSON
//! description after a magic line; any other file is a raw image of its own length, with a real
//! ext4 or xfs recognised in it). It must not hold a rule of one trait that the others do not
//! need: those live in the trait's own file.

use super::*;

/// First line of a fake image file.
pub(super) const MAGIC: &str = "BICSI-FAKE-IMAGE v1\n";
/// Where fake loop devices pretend to live; nothing is ever created there.
pub(super) const LOOP_PREFIX: &str = "/dev/fake/loop";

/// A filesystem as the fake knows it: its type and the size it was made or last grown to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeFs {
    pub fstype: String,
    pub size: u64,
}

/// The content of a fake image file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct FakeImage {
    pub(super) format: String,
    pub(super) virtual_size: u64,
    pub(super) backing: Option<PathBuf>,
    pub(super) backing_format: Option<String>,
    /// None: whatever the backing file holds (a fresh overlay shows its backing's content).
    pub(super) fs: Option<FakeFs>,
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
pub(super) fn sniff_fs(head: &[u8]) -> Option<String> {
    if head.len() >= 4 && &head[..4] == b"XFSB" {
        return Some("xfs".into());
    }
    if head.len() >= 1082 && head[1080..1082] == [0x53, 0xef] {
        return Some("ext4".into());
    }
    None
}

pub(super) fn read_image(path: &Path) -> OsResult<FakeImage> {
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

pub(super) fn write_image(path: &Path, img: &FakeImage) -> OsResult<()> {
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
pub(super) fn content_fs(path: &Path) -> OsResult<Option<FakeFs>> {
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

pub(super) fn lock_error(cmd: &str, path: &Path) -> OsError {
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
pub(super) struct EngineEntry {
    pub(super) pid: i32,
    /// The local children (resolved paths), which this engine holds open.
    pub(super) replicas: Vec<PathBuf>,
    /// Every child in read order, local ones resolved.
    pub(super) targets: Vec<ReplicaTarget>,
    pub(super) read_only: bool,
    pub(super) export: PathBuf,
    /// False after `Fake::kill_engine`: the process is gone, its export mount is stale.
    pub(super) alive: bool,
}

#[derive(Clone, Debug)]
pub(super) struct LoopEntry {
    pub(super) file: PathBuf,
    pub(super) size: u64,
    pub(super) read_only: bool,
}

#[derive(Clone, Debug)]
pub(super) struct MountEntry {
    pub(super) info: MountInfo,
    /// The fake loop device underneath, if any.
    pub(super) device: Option<u32>,
    /// For binds: the source path, to recognise a repeated request.
    pub(super) bind_of: Option<PathBuf>,
    pub(super) read_only: bool,
}

#[derive(Default)]
pub(super) struct World {
    /// This machine's number on its network.
    pub(super) node: u32,
    pub(super) net: FakeNet,
    pub(super) next_pid: i32,
    pub(super) engines: BTreeMap<PathBuf, EngineEntry>,
    pub(super) loops: BTreeMap<u32, LoopEntry>,
    pub(super) mounts: Vec<MountEntry>,
    pub(super) failures: HashMap<String, VecDeque<OsError>>,
    /// Directories whose "filesystem" shares blocks (`Fake::share_blocks`): reflink clones
    /// work under them, as on XFS with reflink; everywhere else they are `Unsupported`.
    pub(super) reflink_dirs: Vec<PathBuf>,
    /// Mount points whose filesystem is frozen (`Filesystems::freeze`).
    pub(super) frozen: Vec<PathBuf>,
    /// Every trait method called, as "<trait>.<method>" (`Fake::called`).
    pub(super) called: std::collections::BTreeSet<String>,
}

/// What a fake loop device's reads and writes reach.
pub(super) enum Backing {
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
    pub(super) fn shares_blocks(&self, path: &Path) -> bool {
        let path = resolve_parent(path);
        self.reflink_dirs.iter().any(|d| path.starts_with(d))
    }

    /// Records the call of `op` ("<trait>.<method>") and returns the failure injected for it.
    pub(super) fn fail(&mut self, op: &str) -> OsResult<()> {
        self.called.insert(op.to_string());
        match self.failures.get_mut(op).and_then(VecDeque::pop_front) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub(super) fn engine_by_export(&self, export: &Path) -> Option<&EngineEntry> {
        self.engines.values().find(|e| e.export == export)
    }

    pub(super) fn engine_using(
        &self,
        image: &Path,
        except_run_dir: Option<&Path>,
    ) -> Option<&EngineEntry> {
        self.engines
            .iter()
            .filter(|(dir, e)| e.alive && Some(dir.as_path()) != except_run_dir)
            .map(|(_, e)| e)
            .find(|e| e.replicas.iter().any(|r| r == image))
    }

    /// The replica id under which a replica server of this machine serves `image` (and so holds
    /// it open for writing), if any.
    pub(super) fn exported_as(&self, image: &Path) -> Option<String> {
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
    pub(super) fn reach(
        &self,
        run_dir: &Path,
        targets: &[ReplicaTarget],
        all: bool,
    ) -> Vec<PathBuf> {
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
    pub(super) fn read_file(&self, run_dir: &Path, targets: &[ReplicaTarget]) -> OsResult<PathBuf> {
        self.reach(run_dir, targets, false)
            .into_iter()
            .next()
            .ok_or_else(|| no_child(run_dir))
    }

    pub(super) fn loop_index(dev: &Path) -> Option<u32> {
        dev.to_str()?.strip_prefix(LOOP_PREFIX)?.parse().ok()
    }

    pub(super) fn loop_entry(&self, dev: &Path) -> Option<(u32, &LoopEntry)> {
        let idx = Self::loop_index(dev)?;
        Some((idx, self.loops.get(&idx)?))
    }

    pub(super) fn backing_of(&self, file: &Path) -> OsResult<Backing> {
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

    pub(super) fn backing_size(&self, backing: &Backing) -> OsResult<u64> {
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
    pub(super) fn device_backing(&self, dev: &Path) -> OsResult<(Backing, bool)> {
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

    pub(super) fn device_fs(&self, dev: &Path) -> OsResult<Option<FakeFs>> {
        match self.device_backing(dev)?.0 {
            Backing::Engine {
                run_dir, targets, ..
            } => content_fs(&self.read_file(&run_dir, &targets)?),
            Backing::File(f) => content_fs(&f),
        }
    }

    pub(super) fn device_size(&self, dev: &Path) -> OsResult<u64> {
        if let Some((_, l)) = self.loop_entry(dev) {
            return Ok(l.size);
        }
        let (backing, _) = self.device_backing(dev)?;
        self.backing_size(&backing)
    }

    /// Write a filesystem "through" the device: into every replica, as quorum writes to all.
    pub(super) fn set_device_fs(&self, dev: &Path, fs_: FakeFs) -> OsResult<()> {
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

    pub(super) fn top_mount(&self, target: &Path) -> Option<&MountEntry> {
        self.mounts.iter().rev().find(|m| m.info.target == target)
    }
}

/// EIO from an engine none of whose children answers.
pub(super) fn no_child(run_dir: &Path) -> OsError {
    OsError::io(
        format!(
            "volume engine in {}: no replica answers (every remote one is unreachable)",
            run_dir.display()
        ),
        std::io::Error::from_raw_os_error(libc::EIO),
    )
}

/// One simulated machine; clone it freely, all clones share it.
#[derive(Clone, Default)]
pub struct Fake {
    pub(super) world: Arc<Mutex<World>>,
}

impl std::fmt::Debug for Fake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fake { .. }")
    }
}

pub(super) fn lock(world: &Mutex<World>) -> MutexGuard<'_, World> {
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

    pub(super) fn world(&self) -> MutexGuard<'_, World> {
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
    /// Every trait method called on this machine so far, as "<trait>.<method>" (the names
    /// `fail_next` takes; `loops.attach_read_only`, `engine.unexport_replica_force` and
    /// `engine.nbd_tls` besides), for a test to show what it exercised.
    pub fn called(&self) -> std::collections::BTreeSet<String> {
        self.world().called.clone()
    }

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

pub(super) fn engine_state(run_dir: &Path, e: &EngineEntry) -> EngineState {
    EngineState {
        pid: e.pid,
        export_path: e.export.clone(),
        qmp_socket: run_dir.join("qmp.sock"),
        replicas: e.replicas.clone(),
        read_only: e.read_only,
    }
}
