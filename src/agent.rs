//! What the controller asks of a node agent: replica files on its disks, backing image files,
//! free space, and the removal of what a failed attach left on the node. One trait, two
//! implementations: [`LocalAgent`] works on this process's disks (the all-in-one mode, and the
//! node side of the split mode), `remote::RemoteAgent` forwards the same calls over gRPC. The
//! controller never touches a disk directly.
//!
//! One name per role, across the modules: `Agent` is the controller's handle on a node (local:
//! [`LocalAgent`]; remote: `remote::RemoteAgent`, the gRPC client); `remote::AgentService` is
//! the node's end of that gRPC (the stub that answers the controller and calls its
//! `LocalAgent`); `node::NodeAgent` is the node domain itself (stage, publish, unstage on this
//! node, which the CSI node service calls). A backing image's first file is asked for with its
//! typed source (`files::source::ImageSource`), so the node reads no source parameter.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::files::FileManagers;
use crate::files::source::ImageSource;
use crate::fsutil::blocking;
use crate::guard::Guards;
use crate::model::file_state::FileState;
use crate::model::{Disk, NodeVolume, Replica};
use crate::os::{ImageFormat, Os, ReplicaExport, ReplicaTarget};
use crate::snapshot::{GroupMember, SnapshotFile};
use crate::store::{Kind, Store, StoreExt};

/// Where an online rebuild of a replica is, as the node's mirror engine says (issue 15).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OnlineRebuild {
    /// copying, verifying, complete (filled and verified, not yet in place), promoted (renamed
    /// into place and a replica of the engine), failed, or missing (the engine has no such
    /// target: it was restarted, or the volume detached).
    pub state: String,
    /// Bytes of the source's data done in the current pass (copy, then verification), and in all.
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Why it failed.
    pub error: Option<String>,
}

impl OnlineRebuild {
    pub fn missing() -> OnlineRebuild {
        OnlineRebuild {
            state: "missing".into(),
            done_bytes: 0,
            total_bytes: 0,
            error: None,
        }
    }
}

/// The temporary name of a replica file at `path` while an online rebuild fills it: beside its
/// final name (so the rename is atomic), never the final name before it is complete and
/// verified.
fn online_temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!("{name}.online"))
}

/// The files of the copy-on-write target of an online rebuild whose final data file is `data`
/// (`volume.cow`): its data and map under temporary names beside their final ones
/// (`volume.cow.online`, `volume.cowmap.online`), its base the replica's `base` link (absent
/// without a backing image: then none).
pub fn online_cow_spec(data: &Path, with_base: bool) -> crate::mirror::cow::CowSpec {
    crate::mirror::cow::CowSpec {
        data: online_temp_name(data),
        map: online_temp_name(&ImageFormat::cow_map(data)),
        base: with_base.then(|| ImageFormat::cow_base(data)),
    }
}

/// How the engine of the node an online rebuild runs on knows its target, from the typed
/// [`ReplicaTarget`] the controller passes with the replica (issue 15): a local replica file is
/// filled under a temporary name and renamed into place; another node's replica, exported to
/// this node (`Agent::prepare_replica`), is filled in place over NBD under its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnlineTarget {
    /// What the engine is told to `add` (and `drop`).
    pub added: PathBuf,
    /// The name it is promoted to, and listed under in `added.json`.
    pub name: PathBuf,
    /// Another node's replica: nothing to make, rename or remove here.
    pub remote: bool,
}

impl OnlineTarget {
    /// Checks `target` against `replica` for the node `node_id`: a local target must be a
    /// replica of this node (InvalidArgument otherwise, naming what to pass instead).
    pub fn of(replica: &Replica, target: &ReplicaTarget, node_id: &str) -> Result<OnlineTarget> {
        match target {
            ReplicaTarget::Local(path) => {
                if replica.node_id != node_id {
                    return Err(Error::InvalidArgument(format!(
                        "replica {} is on node {:?}, not on node {node_id:?}: its online rebuild \
                         target is the NBD address its node exported it at (prepare_replica), \
                         not the local path {}",
                        replica.id,
                        replica.node_id,
                        path.display()
                    )));
                }
                if !path.is_absolute() {
                    return Err(Error::InvalidArgument(format!(
                        "replica {}: online rebuild target {} is not an absolute path",
                        replica.id,
                        path.display()
                    )));
                }
                Ok(OnlineTarget {
                    added: online_temp_name(path),
                    name: path.clone(),
                    remote: false,
                })
            }
            ReplicaTarget::Nbd { .. } => {
                let url = PathBuf::from(target.to_string());
                Ok(OnlineTarget {
                    added: url.clone(),
                    name: url,
                    remote: true,
                })
            }
        }
    }
}

pub use crate::model::DiskSpace;

#[tonic::async_trait]
pub trait Agent: Send + Sync {
    async fn disk_space(&self) -> Result<Vec<DiskSpace>>;
    /// Creates an empty replica, or an overlay on the disk's file of `backing_image` when the
    /// disk holds a ready one. Returns false when the replica must wait for that file (it is
    /// then created at first attach). Idempotent.
    async fn create_replica(
        &self,
        replica: &Replica,
        size: u64,
        backing_image: Option<&str>,
    ) -> Result<bool>;
    /// Removes the replica's directory; Ok when it is gone already.
    async fn delete_replica(&self, replica: &Replica) -> Result<()>;
    async fn replica_exists(&self, replica: &Replica) -> Result<bool>;
    /// Grows the replica (offline).
    async fn resize_replica(&self, replica: &Replica, size: u64) -> Result<()>;
    /// Creates `replica` as a copy of `source`, another replica on this node (sparse).
    async fn copy_replica(&self, source: &Replica, replica: &Replica) -> Result<()>;
    /// Starts preparing an image's first file on one of this node's disks from `source`, as
    /// the controller parsed it (`backing::first_file_source`). `credentials` are what the
    /// controller read from the Secret and ConfigMap the source names (the node never reads
    /// them itself); `None` when it names none.
    async fn prepare_first_file(
        &self,
        image: &str,
        disk_id: &str,
        source: &ImageSource,
        credentials: Option<&crate::download::Credentials>,
    ) -> Result<()>;
    /// Removes every file of an image from this node's disks.
    async fn delete_image_files(&self, image: &str) -> Result<()>;
    /// Removes the image's file (and any work in progress on it) from one of this node's disks.
    async fn delete_image_file(&self, image: &str, disk_id: &str) -> Result<()>;
    /// Starts syncing the image's file to one of this node's disks from a ready file (another
    /// disk of this node, or another node); Ok once it runs or is already ready.
    async fn sync_image_file(&self, image: &str, disk_id: &str) -> Result<()>;
    /// Makes a replica of this node usable by the node the volume attaches to: its disk gets
    /// the backing image's file (copied or transferred, verified), a deferred replica is
    /// created, and for another node the replica is exported over NBD. Unavailable while a
    /// file is on its way; the next call continues the same work.
    async fn prepare_replica(
        &self,
        replica: &Replica,
        size: u64,
        backing_image: Option<&str>,
        attach_node: &str,
    ) -> Result<ReplicaTarget>;
    /// Stops exporting a replica to other nodes; Ok when it is not exported.
    async fn release_replica(&self, replica: &Replica) -> Result<()>;
    /// Captures the volume of these replicas (all on this node) as it is now into snapshot
    /// `snapshot_id`: one point-in-time file from the first replica that has one (through its
    /// engine when the volume is attached here), copied to the other replicas' disks.
    async fn snapshot_replicas(
        &self,
        snapshot_id: &str,
        replicas: &[Replica],
        backing_image: Option<&str>,
    ) -> Result<Vec<SnapshotFile>>;
    /// Captures the volumes of a group snapshot whose replicas are on this node at one instant
    /// (`snapshot::capture_group` says how and what it guarantees); the files of each member,
    /// in the order of `members`. Nothing is left behind when it fails.
    async fn snapshot_group(&self, members: &[GroupMember]) -> Result<Vec<Vec<SnapshotFile>>> {
        let _ = members;
        Err(Error::FailedPrecondition(
            "this node agent cannot take group snapshots; upgrade it".into(),
        ))
    }
    /// Creates `replica` of `size` bytes from the snapshot file `source` (on this node), over
    /// `backing_image`'s file on the replica's disk; `source_image` is the snapshot's own. Ok
    /// when the replica exists already. Unavailable while the image's file comes to that disk.
    async fn restore_replica(
        &self,
        source: &SnapshotFile,
        source_image: Option<&str>,
        replica: &Replica,
        size: u64,
        backing_image: Option<&str>,
    ) -> Result<()>;
    /// Removes snapshot files of this node; Ok when they are gone.
    async fn delete_snapshot_files(&self, files: &[SnapshotFile]) -> Result<()>;
    /// Backs up a snapshot file of this node into the backup target (`crate::backup::blocks`);
    /// the metadata, already written last.
    async fn backup_file(
        &self,
        req: crate::backup::blocks::BackupFileRequest,
        progress: crate::backup::blocks::ProgressFn,
    ) -> Result<crate::backup::layout::BackupMeta> {
        let _ = (req, progress);
        Err(Error::FailedPrecondition(
            "this node agent cannot take backups; upgrade it".into(),
        ))
    }
    /// Backs up the ready file of a backing image on one of this node's disks into the backup
    /// target (`crate::backup::image`); the metadata, put last.
    async fn backup_image(
        &self,
        target_url: &str,
        credential_file: Option<PathBuf>,
        template: crate::backup::image::ImageMeta,
    ) -> Result<crate::backup::image::ImageMeta> {
        let _ = (target_url, credential_file, template);
        Err(Error::FailedPrecondition(
            "this node agent cannot back up backing images; upgrade it".into(),
        ))
    }
    /// Builds the snapshot file `req.restore_id` on `req.disk_id` with a backup's content over
    /// the backing image's file there (waiting for that file), replacing any earlier one.
    async fn restore_backup_file(
        &self,
        req: crate::backup::blocks::RestoreFileRequest,
        progress: crate::backup::blocks::ProgressFn,
    ) -> Result<SnapshotFile> {
        let _ = (req, progress);
        Err(Error::FailedPrecondition(
            "this node agent cannot restore backups; upgrade it".into(),
        ))
    }
    /// Removes what an attach of the volume left on this node although the volume is not
    /// staged here (an attach that failed half-way, in a version that did not undo it): mounts
    /// of its loop devices, loop devices over its engine's export or over one of `replicas`
    /// (those of this node), its engine. Ok when there is nothing; FailedPrecondition while the
    /// volume is staged on this node.
    async fn clean_volume(&self, volume_id: &str, replicas: &[Replica]) -> Result<()>;
    /// Whether two replicas of this node hold the same content (`qemu-img compare`), for the
    /// verification that ends a rebuild. Neither may be open in an engine.
    async fn compare_replicas(&self, a: &Replica, b: &Replica) -> Result<bool> {
        let _ = (a, b);
        Err(Error::FailedPrecondition(
            "this node agent cannot compare replicas (needed to verify a rebuild); upgrade it"
                .into(),
        ))
    }
    /// Makes `replica` (of this node; its file is replaced) a copy of `source`, a replica of
    /// another node exported to this one over NBD, over `backing_image`'s file on its disk, and
    /// answers whether the two are then identical (`qemu-img compare`): a cross-node rebuild.
    async fn copy_replica_from(
        &self,
        source: &ReplicaTarget,
        replica: &Replica,
        backing_image: Option<&str>,
    ) -> Result<bool> {
        let _ = (source, replica, backing_image);
        Err(Error::FailedPrecondition(
            "this node agent cannot rebuild a replica from another node; upgrade it".into(),
        ))
    }
    /// Starts the online rebuild of `replica` in the mirror engine that serves `volume_id` here,
    /// into `target`: a local path (a replica of this node, its final path) has its file made
    /// under a temporary name (`online_temp_name`) as a reflink clone of its disk's raw
    /// file of `backing_image` (or a sparse file of `size`), and the engine adds it write-only
    /// and fills it; another node's replica comes as the NBD address its node exported it at
    /// (`prepare_replica`): the engine adds that address and fills the file in place over NBD
    /// (nothing is renamed at the end). Idempotent: a target the engine still has (filling,
    /// complete or promoted) is kept, since it got every write since it was added.
    async fn start_online_rebuild(
        &self,
        volume_id: &str,
        replica: &Replica,
        target: &ReplicaTarget,
        size: u64,
        backing_image: Option<&str>,
    ) -> Result<()> {
        let _ = (volume_id, replica, target, size, backing_image);
        Err(Error::FailedPrecondition(
            "this node agent cannot rebuild a replica online; upgrade it".into(),
        ))
    }
    /// Where the online rebuild of `replica` into `target` is.
    async fn online_rebuild_status(
        &self,
        volume_id: &str,
        replica: &Replica,
        target: &ReplicaTarget,
    ) -> Result<OnlineRebuild> {
        let _ = (volume_id, replica, target);
        Ok(OnlineRebuild::missing())
    }
    /// Ends a complete online rebuild: a local file is renamed to the replica's path, the engine
    /// makes the target one of its replicas, and the run directory and the node's stage record
    /// list it. Idempotent. FailedPrecondition when the engine does not say complete (or
    /// promoted).
    async fn finish_online_rebuild(
        &self,
        volume_id: &str,
        replica: &Replica,
        target: &ReplicaTarget,
    ) -> Result<()> {
        let _ = (volume_id, replica, target);
        Err(Error::FailedPrecondition(
            "this node agent cannot rebuild a replica online; upgrade it".into(),
        ))
    }
    /// Has the engine forget `target` and removes its temporary file (a local one); Ok when
    /// there is none.
    async fn cancel_online_rebuild(
        &self,
        volume_id: &str,
        replica: &Replica,
        target: &ReplicaTarget,
    ) -> Result<()> {
        let _ = (volume_id, replica, target);
        Ok(())
    }
}

/// The run directory of a volume's engine under a node's data directory. Its QMP socket path
/// must fit a unix socket address (108 bytes with the NUL), so a long volume id under a long
/// data dir is replaced by a digest of it.
pub fn engine_dir(data_dir: &Path, volume_id: &str) -> PathBuf {
    let base = data_dir.join("engines");
    let plain = base.join(volume_id);
    if plain.join("qmp.sock").as_os_str().len() <= 100 {
        return plain;
    }
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha512::digest(volume_id.as_bytes()));
    base.join(format!("h-{}", &digest[..16]))
}

/// Finds by the volume's id what an attach set up on this node and removes it, last step first:
/// every mount of a loop device over the engine's export or over one of `replicas`, those loop
/// devices, then the engine (process, FUSE export, run directory). Returns whether anything was
/// there. The caller makes sure the volume is not staged here: this removes a live attach too.
pub fn remove_attach_leftovers(
    os: &Os,
    data_dir: &Path,
    volume_id: &str,
    replicas: &[PathBuf],
) -> Result<bool> {
    let mut run_dirs = vec![engine_dir(data_dir, volume_id)];
    let plain = data_dir.join("engines").join(volume_id);
    if !run_dirs.contains(&plain) {
        run_dirs.push(plain);
    }
    let mut files: Vec<PathBuf> = run_dirs.iter().map(|d| d.join("export")).collect();
    files.extend(replicas.iter().cloned());
    let mut found = false;
    for file in &files {
        // Bounded: a file carries a few loop devices at most (attached by hand), never many.
        for _ in 0..16 {
            let Some(dev) = os.loops.find(file)? else {
                break;
            };
            found = true;
            for target in os.mounts.mounts_of(&dev)? {
                tracing::warn!(volume = %volume_id, device = %dev.display(), target = %target.display(), "unmounting what an attach left behind");
                os.mounts.unmount(&target)?;
            }
            tracing::warn!(volume = %volume_id, device = %dev.display(), file = %file.display(), "detaching a loop device an attach left behind");
            // It may be a live attach: write out what its page cache holds first.
            if let Err(e) = os.loops.flush(&dev) {
                tracing::warn!(volume = %volume_id, device = %dev.display(), error = %e, "cannot flush the loop device before detaching it");
            }
            os.loops.detach(&dev)?;
        }
    }
    for dir in &run_dirs {
        if std::fs::symlink_metadata(dir).is_ok() {
            found = true;
            if os.engine.status(dir)?.is_some() {
                tracing::warn!(volume = %volume_id, run_dir = %dir.display(), "stopping an engine an attach left behind");
            }
            os.engine.stop(dir)?;
        }
    }
    Ok(found)
}

/// The agent of the disks in this process.
pub struct LocalAgent {
    pub node_id: String,
    pub disks: Vec<Disk>,
    pub os: Os,
    pub files: Arc<FileManagers>,
    /// The image records (the controller's store).
    pub store: Arc<dyn Store>,
    /// Where this node serves its replicas to other nodes: the replica server's run directory
    /// and its NBD address (host, port). None in the all-in-one mode (one node, no exports).
    pub nbd: Option<(PathBuf, String, u16)>,
    /// Where this node serves its raw replicas (`loop` and `mirror` volumes) to other nodes:
    /// bicsi's replica server's run directory and NBD address (port 0: any free port). None:
    /// raw replicas go to `nbd`'s server as well.
    pub raw_nbd: Option<(PathBuf, String, u16)>,
    /// This node's data directory (the engines' run directories are under it).
    pub data_dir: PathBuf,
    /// This node's own records (what is staged here).
    pub node_records: Arc<dyn Store>,
    /// Per-volume guards of the node's attach work, shared with `crate::node::NodeAgent`, so a
    /// cleanup never runs into a stage in progress.
    pub volume_guards: Guards,
    /// Whether each disk (by id) shares blocks, probed once per disk (a file cloned in its
    /// `tmp/`): a filesystem does not gain or lose reflink while mounted.
    pub shares_blocks: Arc<std::sync::Mutex<std::collections::BTreeMap<String, bool>>>,
}

fn replica_dir(replica: &Replica) -> &Path {
    replica.path.parent().unwrap_or(Path::new("/"))
}

impl LocalAgent {
    /// What capturing the volume of `replicas` (all on this node) takes: the first replica that
    /// has a file, the disk's file of the backing image under it, and the volume's other disks
    /// that get a copy (each over its own file of the image).
    async fn plan_capture(
        &self,
        snapshot_id: &str,
        replicas: &[Replica],
        backing_image: Option<&str>,
    ) -> Result<crate::snapshot::CapturePlan> {
        let first = replicas
            .iter()
            .find(|r| !r.deferred && r.path.is_file())
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "snapshot {snapshot_id:?}: the volume has no replica file on node {:?} yet (its replicas are made at first attach); attach the volume once, then take the snapshot",
                    self.node_id
                ))
            })?;
        let disk = self.disk(&first.disk_id)?.clone();
        let backing = match backing_image {
            Some(image) => Some(self.image_file(image, &disk)?.ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "snapshot {snapshot_id:?}: disk {} has no ready file of backing image {image:?}",
                    disk.id
                ))
            })?),
            None => None,
        };
        // The other replicas' disks get a copy over their own file of the image.
        let mut copies = Vec::new();
        for r in replicas.iter().filter(|r| r.disk_id != first.disk_id) {
            let other = self.disk(&r.disk_id)?.clone();
            if copies.iter().any(|(d, _): &(Disk, _)| d.id == other.id) {
                continue;
            }
            let other_backing = match backing_image {
                Some(image) => match self.image_file(image, &other)? {
                    Some(b) => Some(b),
                    None => continue,
                },
                None => None,
            };
            copies.push((other, other_backing));
        }
        Ok(crate::snapshot::CapturePlan {
            snapshot_id: snapshot_id.to_string(),
            disk,
            replica: first.path.clone(),
            backing,
            copies,
        })
    }

    fn disk(&self, id: &str) -> Result<&Disk> {
        self.disks
            .iter()
            .find(|d| d.id == id)
            .ok_or_else(|| Error::NotFound(format!("disk {id:?} is not on this node")))
    }

    /// The ready file of `image` on `disk` and its format; None when the disk has none yet.
    /// The ready file of `image` on `disk`, brought there first (copied or transferred,
    /// verified) and waited for up to ten minutes.
    async fn wait_image_file(&self, image: &str, disk: &Disk) -> Result<(PathBuf, ImageFormat)> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
        loop {
            match self.files.ensure_file(image, &disk.id).await {
                Ok(_) => break,
                Err(Error::Unavailable(m)) if std::time::Instant::now() < deadline => {
                    tracing::debug!(image = %image, why = %m, "restore waits for the image's file");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
        self.image_file(image, disk)?.ok_or_else(|| {
            Error::Unavailable(format!(
                "backing image {image:?} is being prepared on disk {}",
                disk.id
            ))
        })
    }

    fn image_file(&self, image: &str, disk: &Disk) -> Result<Option<(PathBuf, ImageFormat)>> {
        let bi: crate::model::backing_image::BackingImage = self
            .store
            .get(Kind::BackingImage, image)?
            .ok_or_else(|| Error::NotFound(format!("backing image {image:?} not found")))?;
        let file = disk.image_file(&bi);
        let ready = bi
            .status
            .disk_file_status_map
            .get(&disk.id)
            .is_some_and(|f| f.state == FileState::Ready);
        if !ready || !file.is_file() {
            return Ok(None);
        }
        let format = ImageFormat::parse(&bi.status.format).ok_or_else(|| {
            Error::Internal(format!("backing image {image:?} has no known format"))
        })?;
        Ok(Some((file, format)))
    }
}

#[tonic::async_trait]
impl Agent for LocalAgent {
    async fn disk_space(&self) -> Result<Vec<DiskSpace>> {
        let disks = self.disks.clone();
        let running = self.files.running_managers();
        let (os, probed) = (self.os.clone(), self.shares_blocks.clone());
        blocking(move || {
            disks
                .into_iter()
                .map(|d| {
                    let known = probed.lock().expect("probe cache").get(&d.id).copied();
                    let shares_blocks = match known {
                        Some(s) => s,
                        None => {
                            let s = os.images.shares_blocks(&d.tmp_dir())?;
                            tracing::info!(disk = %d.id, path = %d.path.display(), shares_blocks = s, "probed whether the disk shares blocks (reflink)");
                            probed.lock().expect("probe cache").insert(d.id.clone(), s);
                            s
                        }
                    };
                    Ok(DiskSpace {
                        free_bytes: crate::disks::free_bytes(&d.path)?,
                        manager: running.contains(&d.id),
                        shares_blocks,
                        disk: d,
                    })
                })
                .collect()
        })
        .await
    }

    async fn create_replica(
        &self,
        replica: &Replica,
        size: u64,
        backing_image: Option<&str>,
    ) -> Result<bool> {
        let disk = self.disk(&replica.disk_id)?.clone();
        let backing = match backing_image {
            Some(name) => match self.image_file(name, &disk)? {
                Some(file) => Some(file),
                None => return Ok(false),
            },
            None => None,
        };
        let os = self.os.clone();
        let r = replica.clone();
        let tmp_dir = disk.tmp_dir();
        blocking(move || {
            let dir = replica_dir(&r);
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::Internal(format!(
                    "replica {}: cannot create {}: {e}",
                    r.id,
                    dir.display()
                ))
            })?;
            let backing = backing.as_ref().map(|(p, f)| (p.as_path(), *f));
            crate::replica_file::create(&os, &r, size, backing, &tmp_dir)?;
            Ok(true)
        })
        .await
    }

    async fn delete_replica(&self, replica: &Replica) -> Result<()> {
        let r = replica.clone();
        blocking(move || match std::fs::remove_dir_all(replica_dir(&r)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Internal(format!(
                "replica {}: cannot remove {}: {e}",
                r.id,
                replica_dir(&r).display()
            ))),
        })
        .await
    }

    async fn replica_exists(&self, replica: &Replica) -> Result<bool> {
        Ok(replica.path.is_file())
    }

    async fn resize_replica(&self, replica: &Replica, size: u64) -> Result<()> {
        let os = self.os.clone();
        let (path, format) = (replica.path.clone(), replica.format);
        blocking(move || crate::replica_file::resize(&os, &path, format, size)).await
    }

    async fn copy_replica(&self, source: &Replica, replica: &Replica) -> Result<()> {
        // Unreachable from the controller today (a mirror volume's number of replicas does
        // not change); a cow replica's copy would go through its view (`replica_file::cow_from`).
        if source.format == ImageFormat::Cow {
            return Err(crate::replica_file::cow_refused("copy", &source.path));
        }
        let (src, r) = (source.clone(), replica.clone());
        blocking(move || {
            let dir = replica_dir(&r);
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
            let tmp = r
                .path
                .with_extension(format!("{}.part", r.format.extension()));
            let _ = std::fs::remove_file(&tmp);
            crate::sync::local_copy(&src.path, &tmp).map_err(|e| {
                Error::Internal(format!("copying replica {} to {}: {e}", src.id, r.id))
            })?;
            std::fs::rename(&tmp, &r.path)
                .map_err(|e| Error::Internal(format!("replica {}: {e}", r.id)))
        })
        .await
    }

    async fn prepare_first_file(
        &self,
        image: &str,
        disk_id: &str,
        source: &ImageSource,
        credentials: Option<&crate::download::Credentials>,
    ) -> Result<()> {
        self.files.prepare_first_file_with(
            image,
            disk_id,
            Some(source.clone()),
            credentials.cloned(),
        )
    }

    async fn delete_image_files(&self, image: &str) -> Result<()> {
        self.files.delete_image_files(image).await
    }

    async fn delete_image_file(&self, image: &str, disk_id: &str) -> Result<()> {
        self.files.delete_image_file(image, disk_id).await
    }

    async fn sync_image_file(&self, image: &str, disk_id: &str) -> Result<()> {
        match self.files.ensure_file(image, disk_id).await {
            Ok(_) | Err(Error::Unavailable(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn prepare_replica(
        &self,
        replica: &Replica,
        size: u64,
        backing_image: Option<&str>,
        attach_node: &str,
    ) -> Result<ReplicaTarget> {
        if let Some(image) = backing_image {
            self.files.ensure_file(image, &replica.disk_id).await?;
            if !replica.path.is_file() && !self.create_replica(replica, size, Some(image)).await? {
                return Err(Error::Unavailable(format!(
                    "replica {} waits for backing image {image:?} on disk {}",
                    replica.id, replica.disk_id
                )));
            }
        }
        if !replica.path.is_file() {
            return Err(Error::FailedPrecondition(format!(
                "replica {} of disk {} is missing ({})",
                replica.id,
                replica.disk_id,
                replica.path.display()
            )));
        }
        if attach_node == self.node_id {
            return Ok(ReplicaTarget::Local(replica.path.clone()));
        }
        let server = match replica.format {
            ImageFormat::Raw => self.raw_nbd.clone().or_else(|| self.nbd.clone()),
            ImageFormat::Qcow2 => self.nbd.clone(),
            ImageFormat::Cow => {
                return Err(Error::FailedPrecondition(format!(
                    "replica {} on node {:?} is a copy-on-write replica (engine mirror on a disk that does not share blocks), which only an engine on its own node reads; attach the volume on node {:?}, or make it with engine: qemu to attach it anywhere",
                    replica.id, self.node_id, self.node_id
                )));
            }
        };
        let (run_dir, host, port) = server.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "node {:?} does not serve replicas to other nodes (no --nbd-listen)",
                self.node_id
            ))
        })?;
        let os = self.os.clone();
        let export = ReplicaExport {
            replica_id: replica.id.clone(),
            path: replica.path.clone(),
            format: replica.format,
        };
        let h = host.clone();
        let port =
            blocking(move || Ok(os.engine.export_replica(&run_dir, &h, port, &export)?)).await?;
        Ok(ReplicaTarget::Nbd {
            host,
            port,
            export: replica.id.clone(),
        })
    }

    async fn release_replica(&self, replica: &Replica) -> Result<()> {
        // Either server may have it (a raw replica exported before bicsi's own server served
        // them is on qemu's); each is Ok when it does not.
        let run_dirs: Vec<PathBuf> = [&self.raw_nbd, &self.nbd]
            .into_iter()
            .flatten()
            .map(|(dir, _, _)| dir.clone())
            .collect();
        let os = self.os.clone();
        let id = replica.id.clone();
        // The attaching node unstaged (or is gone): a connection left behind must not keep the
        // export busy forever.
        blocking(move || {
            for run_dir in &run_dirs {
                os.engine.unexport_replica_force(run_dir, &id)?;
            }
            Ok(())
        })
        .await
    }
    async fn snapshot_replicas(
        &self,
        snapshot_id: &str,
        replicas: &[Replica],
        backing_image: Option<&str>,
    ) -> Result<Vec<SnapshotFile>> {
        let plan = self
            .plan_capture(snapshot_id, replicas, backing_image)
            .await?;
        let os = self.os.clone();
        let node = self.node_id.clone();
        blocking(move || crate::snapshot::capture_plan(&os, &node, &plan)).await
    }

    async fn snapshot_group(&self, members: &[GroupMember]) -> Result<Vec<Vec<SnapshotFile>>> {
        let mut plans = Vec::with_capacity(members.len());
        for m in members {
            plans.push(
                self.plan_capture(&m.snapshot_id, &m.replicas, m.backing_image.as_deref())
                    .await?,
            );
        }
        let os = self.os.clone();
        let node = self.node_id.clone();
        blocking(move || crate::snapshot::capture_group(&os, &node, &plans)).await
    }

    async fn restore_replica(
        &self,
        source: &SnapshotFile,
        source_image: Option<&str>,
        replica: &Replica,
        size: u64,
        backing_image: Option<&str>,
    ) -> Result<()> {
        if replica.path.is_file() {
            return Ok(());
        }
        let backing = match backing_image {
            Some(image) => {
                let path = self.files.ensure_file(image, &replica.disk_id).await?;
                let disk = self.disk(&replica.disk_id)?.clone();
                let (_, format) = self.image_file(image, &disk)?.ok_or_else(|| {
                    Error::Unavailable(format!(
                        "backing image {image:?} is being prepared on disk {}",
                        disk.id
                    ))
                })?;
                Some((path, format))
            }
            None => None,
        };
        let same_image = source_image == backing_image;
        let os = self.os.clone();
        let (src, dest) = (source.path.clone(), replica.path.clone());
        blocking(move || {
            let b = backing.as_ref().map(|(p, f)| (p.as_path(), *f));
            crate::snapshot::restore(&os, &src, &dest, size, b, same_image)
        })
        .await
    }

    async fn delete_snapshot_files(&self, files: &[SnapshotFile]) -> Result<()> {
        let files = files.to_vec();
        blocking(move || files.iter().try_for_each(crate::snapshot::remove)).await
    }

    async fn start_online_rebuild(
        &self,
        volume_id: &str,
        replica: &Replica,
        target: &ReplicaTarget,
        size: u64,
        backing_image: Option<&str>,
    ) -> Result<()> {
        let names = OnlineTarget::of(replica, target, &self.node_id)?;
        let run_dir = engine_dir(&self.data_dir, volume_id);
        let serving = {
            let run_dir = run_dir.clone();
            blocking(move || Ok(crate::os::engine::mirror::serving(&run_dir))).await?
        };
        if !serving {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id:?} is not served by a mirror engine on node {:?}; its replica \
                 {} is rebuilt offline once it is detached",
                self.node_id, replica.id
            )));
        }
        let status = self
            .online_rebuild_status(volume_id, replica, target)
            .await?;
        match status.state.as_str() {
            "copying" | "verifying" | "complete" | "promoted" => return Ok(()),
            _ => {
                self.cancel_online_rebuild(volume_id, replica, target)
                    .await?
            }
        }
        if names.remote {
            // Another node's replica, exported by its node for this rebuild (`prepare_replica`):
            // the engine connects to it and fills it in place.
            let id = volume_id.to_string();
            let replica_id = replica.id.clone();
            return blocking(move || {
                crate::os::engine::mirror::add_target(&run_dir, &names.added)?;
                tracing::info!(volume = %id, replica = %replica_id, target = %names.added.display(), "online rebuild of a remote replica started in the mirror engine");
                Ok(())
            })
            .await;
        }
        let disk = self.disk(&replica.disk_id)?.clone();
        let backing = match backing_image {
            Some(image) => {
                self.files.ensure_file(image, &replica.disk_id).await?;
                Some(self.image_file(image, &disk)?.ok_or_else(|| {
                    Error::Unavailable(format!(
                        "backing image {image:?} is being prepared on disk {}",
                        disk.id
                    ))
                })?)
            }
            None => None,
        };
        let os = self.os.clone();
        let mut file = replica.clone();
        file.path = names.added.clone();
        let tmp_dir = disk.tmp_dir();
        let id = volume_id.to_string();
        if ImageFormat::of_file(&names.name) == ImageFormat::Cow {
            // A new copy-on-write replica over this disk's base, under temporary names; the
            // engine fills only what its view lacks and writes it through its layer.
            let cluster = replica
                .cluster_bytes
                .unwrap_or(crate::mirror::cow::DEFAULT_CLUSTER);
            let spec = online_cow_spec(&names.name, backing.is_some());
            return blocking(move || {
                let b = backing.as_ref().map(|(p, f)| (p.as_path(), *f));
                crate::replica_file::create_cow_target(&os, &spec, size, cluster, b, &tmp_dir)?;
                crate::os::engine::mirror::add_cow_target(&run_dir, &spec).map_err(|e| {
                    let _ = std::fs::remove_file(&spec.data);
                    let _ = std::fs::remove_file(&spec.map);
                    Error::from(e)
                })?;
                tracing::info!(volume = %id, replica = %file.id, file = %spec.data.display(), "online rebuild started in the mirror engine (copy-on-write target)");
                Ok(())
            })
            .await;
        }
        blocking(move || {
            if let Some(dir) = file.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    Error::Internal(format!("replica {}: cannot create {}: {e}", file.id, dir.display()))
                })?;
            }
            let b = backing.as_ref().map(|(p, f)| (p.as_path(), *f));
            crate::replica_file::create(&os, &file, size, b, &tmp_dir)?;
            crate::os::engine::mirror::add_target(&run_dir, &file.path).map_err(|e| {
                let _ = std::fs::remove_file(&file.path);
                Error::from(e)
            })?;
            tracing::info!(volume = %id, replica = %file.id, file = %file.path.display(), "online rebuild started in the mirror engine");
            Ok(())
        })
        .await
    }

    async fn online_rebuild_status(
        &self,
        volume_id: &str,
        replica: &Replica,
        target: &ReplicaTarget,
    ) -> Result<OnlineRebuild> {
        let names = OnlineTarget::of(replica, target, &self.node_id)?;
        let run_dir = engine_dir(&self.data_dir, volume_id);
        blocking(move || {
            if !crate::os::engine::mirror::serving(&run_dir) {
                return Ok(OnlineRebuild::missing());
            }
            let targets = crate::os::engine::mirror::targets(&run_dir)?;
            Ok(targets
                .into_iter()
                .filter(|t| t.path == names.added || t.name == names.name)
                .map(|t| OnlineRebuild {
                    state: t.state,
                    done_bytes: t.done,
                    total_bytes: t.total,
                    error: t.error,
                })
                // A failed one and a new one: the new one.
                .min_by_key(|s| s.state == "failed")
                .unwrap_or_else(OnlineRebuild::missing))
        })
        .await
    }

    async fn finish_online_rebuild(
        &self,
        volume_id: &str,
        replica: &Replica,
        target: &ReplicaTarget,
    ) -> Result<()> {
        let names = OnlineTarget::of(replica, target, &self.node_id)?;
        let status = self
            .online_rebuild_status(volume_id, replica, target)
            .await?;
        if !matches!(status.state.as_str(), "complete" | "promoted") {
            return Err(Error::FailedPrecondition(format!(
                "the online rebuild of replica {} is {}{}, not complete",
                replica.id,
                status.state,
                status.error.map(|e| format!(" ({e})")).unwrap_or_default()
            )));
        }
        let run_dir = engine_dir(&self.data_dir, volume_id);
        let target = target.clone();
        let local = self.node_records.clone();
        let id = volume_id.to_string();
        blocking(move || {
            use crate::os::engine::mirror;
            let OnlineTarget {
                added: tmp,
                name: path,
                remote,
            } = names;
            if remote {
                // Filled in place on its node: nothing to rename; promoted under its address.
                if status.state == "complete" {
                    mirror::promote(&run_dir, &path, &path)?;
                }
                mirror::record_added(&run_dir, &path)?;
                if let Some(mut rec) = local.get::<NodeVolume>(Kind::NodeVolume, &id)?
                    && !rec.targets.contains(&target)
                {
                    rec.targets.push(target);
                    local.put(Kind::NodeVolume, &id, &rec)?;
                }
                return Ok(());
            }
            if status.state == "complete" {
                // A copy-on-write target's map goes into place first, then its data file (the
                // replica is wo until the domain makes it rw, so nothing reads the pair between).
                if ImageFormat::of_file(&path) == ImageFormat::Cow {
                    let (tmp_map, map) = (
                        online_temp_name(&ImageFormat::cow_map(&path)),
                        ImageFormat::cow_map(&path),
                    );
                    if tmp_map.exists() {
                        std::fs::rename(&tmp_map, &map).map_err(|e| {
                            Error::Internal(format!(
                                "renaming {} to {}: {e}",
                                tmp_map.display(),
                                map.display()
                            ))
                        })?;
                    }
                }
                // The temporary file is gone only once renamed: the engine holds the target, so
                // nothing else removes it (see `start_online_rebuild`).
                if tmp.exists() {
                    std::fs::rename(&tmp, &path).map_err(|e| {
                        Error::Internal(format!(
                            "renaming {} to {}: {e}",
                            tmp.display(),
                            path.display()
                        ))
                    })?;
                    if let Some(dir) = path.parent() {
                        std::fs::File::open(dir)
                            .and_then(|d| d.sync_all())
                            .map_err(|e| {
                                Error::Internal(format!("fsync of {}: {e}", dir.display()))
                            })?;
                    }
                }
                mirror::promote(&run_dir, &tmp, &path)?;
            }
            mirror::record_added(&run_dir, &path)?;
            // The node's stage record: a repair of the stage compares the live engine's
            // replicas with these.
            if let Some(mut rec) = local.get::<NodeVolume>(Kind::NodeVolume, &id)?
                && !rec.targets.contains(&target)
            {
                rec.targets.push(target);
                rec.replicas.push(path.clone());
                local.put(Kind::NodeVolume, &id, &rec)?;
            }
            Ok(())
        })
        .await
    }

    async fn cancel_online_rebuild(
        &self,
        volume_id: &str,
        replica: &Replica,
        target: &ReplicaTarget,
    ) -> Result<()> {
        let names = OnlineTarget::of(replica, target, &self.node_id)?;
        let run_dir = engine_dir(&self.data_dir, volume_id);
        blocking(move || {
            if crate::os::engine::mirror::serving(&run_dir) {
                crate::os::engine::mirror::drop_target(&run_dir, &names.added)?;
            }
            if names.remote {
                // Its node's file: the controller releases its export; the file stays err.
                return Ok(());
            }
            let mut files = vec![names.added.clone()];
            if ImageFormat::of_file(&names.name) == ImageFormat::Cow {
                files.push(online_temp_name(&ImageFormat::cow_map(&names.name)));
            }
            for f in files {
                match std::fs::remove_file(&f) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(Error::Internal(format!("removing {}: {e}", f.display())));
                    }
                }
            }
            Ok(())
        })
        .await
    }

    async fn compare_replicas(&self, a: &Replica, b: &Replica) -> Result<bool> {
        let (a, b) = (a.path.clone(), b.path.clone());
        blocking(move || {
            // A copy that kept the source's bytes and holes (a replica without a backing
            // file, or raw) is identical as files; anything else (a qcow2 rebased onto its
            // own disk's image file) is compared by content with qemu-img.
            let same = match crate::sync::byte_identical(&a, &b) {
                Ok(true) => Ok(true),
                _ => crate::os::compare::identical_files(&a, &b),
            };
            // A rebuild's copy left both files' pages cached for this read; they go now.
            crate::sync::drop_cache(&a);
            crate::sync::drop_cache(&b);
            Ok(same?)
        })
        .await
    }

    async fn copy_replica_from(
        &self,
        source: &ReplicaTarget,
        replica: &Replica,
        backing_image: Option<&str>,
    ) -> Result<bool> {
        let backing = match backing_image {
            Some(image) => {
                self.files.ensure_file(image, &replica.disk_id).await?;
                let disk = self.disk(&replica.disk_id)?.clone();
                Some(self.image_file(image, &disk)?.ok_or_else(|| {
                    Error::Unavailable(format!(
                        "backing image {image:?} is being prepared on disk {}",
                        disk.id
                    ))
                })?)
            }
            None => None,
        };
        let (source, r) = (source.clone(), replica.clone());
        // Both replica servers (bicsi's for raw replicas, qemu-storage-daemon's for qcow2
        // ones) require TLS with a node certificate when the node has a --tls-dir (issue 19).
        let tls = self.os.engine.nbd_tls();
        blocking(move || {
            let dir = replica_dir(&r);
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::Internal(format!(
                        "replica {}: cannot remove {}: {e}",
                        r.id,
                        dir.display()
                    )));
                }
            }
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
            let b = backing.as_ref().map(|(p, f)| (p.as_path(), *f));
            crate::os::compare::copy_from(&source, &r.path, b, tls.as_deref())?;
            Ok(crate::os::compare::identical(
                &source,
                &ReplicaTarget::Local(r.path.clone()),
                tls.as_deref(),
            )?)
        })
        .await
    }

    async fn backup_file(
        &self,
        req: crate::backup::blocks::BackupFileRequest,
        progress: crate::backup::blocks::ProgressFn,
    ) -> Result<crate::backup::layout::BackupMeta> {
        let disk = self.disk(&req.file.disk_id)?.clone();
        let backing = match req.backing {
            Some(image) => {
                let (path, format) = self.image_file(&image.name, &disk)?.ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "backup {:?}: disk {} has no ready file of backing image {:?} to compare the volume's blocks with",
                        req.name, disk.id, image.name
                    ))
                })?;
                Some((image, path, format))
            }
            None => None,
        };
        let target = crate::backup::Target::open(&req.target_url, req.credential_file.as_deref())?;
        let job = crate::backup::blocks::BackupJob {
            target,
            work_dir: disk.tmp_dir().join(format!("backup-{}", req.name)),
            name: req.name,
            volume: req.volume,
            snapshot: req.snapshot,
            file: req.file.path,
            backing,
            block_size: req.block_size,
            full: req.full,
            compression: req.compression,
            volume_parameters: req.volume_parameters,
        };
        crate::backup::blocks::backup(job, progress).await
    }

    async fn backup_image(
        &self,
        target_url: &str,
        credential_file: Option<PathBuf>,
        template: crate::backup::image::ImageMeta,
    ) -> Result<crate::backup::image::ImageMeta> {
        let mut file = None;
        for disk in &self.disks {
            if let Some((path, _)) = self.image_file(&template.name, disk)? {
                file = Some(path);
                break;
            }
        }
        let file = file.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "backing image {:?} has no ready file on node {:?} to back up",
                template.name, self.node_id
            ))
        })?;
        let target = crate::backup::Target::open(target_url, credential_file.as_deref())?;
        crate::backup::image::backup_image_file(&target, &file, template).await
    }

    async fn restore_backup_file(
        &self,
        req: crate::backup::blocks::RestoreFileRequest,
        progress: crate::backup::blocks::ProgressFn,
    ) -> Result<SnapshotFile> {
        let disk = self.disk(&req.disk_id)?.clone();
        let backing = match &req.backing_image {
            Some(image) => Some(self.wait_image_file(image, &disk).await?),
            None => None,
        };
        let work_dir = disk.tmp_dir().join(format!("restore{}", req.restore_id));
        let target = crate::backup::Target::open(&req.target_url, req.credential_file.as_deref())?;
        // Over an override, the original image's file: one of this cluster's, or from the target.
        let original_dir = disk
            .tmp_dir()
            .join(format!("restore{}-original", req.restore_id));
        let original = match &req.original {
            Some(o) if backing.is_some() => Some(match &o.local {
                Some(image) => self.wait_image_file(image, &disk).await?,
                None => {
                    std::fs::create_dir_all(&original_dir).map_err(|e| {
                        Error::Internal(format!("cannot create {}: {e}", original_dir.display()))
                    })?;
                    let m = crate::backup::image::get_meta(&target, &o.name)
                        .await?
                        .ok_or_else(|| {
                            Error::FailedPrecondition(format!(
                                "backup {:?}: its backing image {:?} is no longer in the backup target {}; back it up there again (bicsi backup image {}) or restore without --backing-image",
                                req.meta.name, o.name, req.target_url, o.name
                            ))
                        })?;
                    let format = match m.image_format.as_str() {
                        "raw" => ImageFormat::Raw,
                        "qcow2" => ImageFormat::Qcow2,
                        other => {
                            return Err(Error::FailedPrecondition(format!(
                                "backing image {:?} in the backup target {} has format {other:?}; this bicsi reads raw and qcow2",
                                o.name, req.target_url
                            )));
                        }
                    };
                    let path = original_dir.join("image");
                    let (sha, _) = crate::backup::image::restore_image_file(
                        &crate::backup::image::backup_url(&req.target_url, &o.name),
                        req.credential_file.clone(),
                        &path,
                        Default::default(),
                    )
                    .await?;
                    if sha != o.checksum {
                        let _ = std::fs::remove_dir_all(&original_dir);
                        return Err(Error::FailedPrecondition(format!(
                            "backing image {:?} in the backup target {} has SHA-512 {sha}, not the {} backup {:?} was taken over; restore without --backing-image",
                            o.name, req.target_url, o.checksum, req.meta.name
                        )));
                    }
                    (path, format)
                }
            }),
            _ => None,
        };
        let file = SnapshotFile {
            node_id: self.node_id.clone(),
            disk_id: disk.id.clone(),
            path: crate::snapshot::snapshot_path(&disk, &req.restore_id),
        };
        // A finished file of an earlier attempt is built again; a `.part` file a restart cut
        // off is continued when its checkpoint is of this very job (`backup::blocks::restore`).
        match std::fs::remove_file(&file.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Internal(format!(
                    "cannot remove {}: {e}",
                    file.path.display()
                )));
            }
        }
        let job = crate::backup::blocks::RestoreJob {
            target,
            meta: req.meta,
            dest: file.path.clone(),
            backing,
            original,
            work_dir,
        };
        let result = crate::backup::blocks::restore(job, progress).await;
        let _ = std::fs::remove_dir_all(&original_dir);
        result?;
        Ok(file)
    }

    async fn clean_volume(&self, volume_id: &str, replicas: &[Replica]) -> Result<()> {
        let _guard = self.volume_guards.try_take(volume_id, "volume")?;
        if let Some(rec) = self
            .node_records
            .get::<NodeVolume>(Kind::NodeVolume, volume_id)?
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id:?} is staged on node {:?} at {}; unstage it there first",
                self.node_id,
                rec.staging_path.display()
            )));
        }
        let replicas: Vec<PathBuf> = replicas
            .iter()
            .filter(|r| r.node_id == self.node_id)
            .map(|r| r.path.clone())
            .collect();
        let (os, data_dir, id) = (
            self.os.clone(),
            self.data_dir.clone(),
            volume_id.to_string(),
        );
        if blocking(move || remove_attach_leftovers(&os, &data_dir, &id, &replicas)).await? {
            tracing::info!(volume = %volume_id, node = %self.node_id, "removed what an attach left behind");
        }
        Ok(())
    }
}

#[cfg(test)]
mod online_target_tests {
    use super::*;

    fn replica(node: &str, path: &str) -> Replica {
        Replica {
            id: "r1".into(),
            node_id: node.into(),
            disk_id: "d1".into(),
            path: PathBuf::from(path),
            format: ImageFormat::Raw,
            deferred: false,
            health: Default::default(),
            cluster_bytes: None,
        }
    }

    /// The engine's name of an online rebuild's target comes from the typed target alone: a
    /// local path is filled under its temporary name and promoted to the path; an NBD address
    /// is filled and promoted under the address. A replica's `path` is never read as an
    /// address any more (it was how the controller said "remote" before), and a local target
    /// of a replica of another node is refused, naming what to pass.
    #[test]
    fn the_online_target_is_read_from_its_type_not_from_the_replica_path() {
        let r = replica("n1", "/d1/replicas/v-r1/volume.raw");
        let local = OnlineTarget::of(&r, &ReplicaTarget::Local(r.path.clone()), "n1").unwrap();
        assert_eq!(
            local,
            OnlineTarget {
                added: PathBuf::from("/d1/replicas/v-r1/volume.raw.online"),
                name: r.path.clone(),
                remote: false,
            }
        );
        let address = ReplicaTarget::Nbd {
            host: "127.0.0.1".into(),
            port: 10809,
            export: "r1".into(),
        };
        // Another node's replica keeps its own path; the target says where the engine finds it.
        let theirs = replica("n2", "/d9/replicas/v-r1/volume.raw");
        let remote = OnlineTarget::of(&theirs, &address, "n1").unwrap();
        assert_eq!(
            remote,
            OnlineTarget {
                added: PathBuf::from("nbd://127.0.0.1:10809/r1"),
                name: PathBuf::from("nbd://127.0.0.1:10809/r1"),
                remote: true,
            }
        );
        // An address in a local replica's path is just a (bad) path, never a remote target.
        let odd = replica("n1", "nbd://127.0.0.1:10809/r1");
        let e = OnlineTarget::of(&odd, &ReplicaTarget::Local(odd.path.clone()), "n1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an absolute path"), "{e}");
        let e = OnlineTarget::of(&theirs, &ReplicaTarget::Local(theirs.path.clone()), "n1")
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert!(e.to_string().contains("NBD address"), "{e}");
    }
}
