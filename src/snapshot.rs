//! CSI snapshots as bicsi keeps them: the record, its parameters, and the node-side file work
//! (capture, copy to the volume's other disks, restore into a new replica).
//!
//! A snapshot is a qcow2 file per disk at `<disk>/snapshots/<snapshot-id>/snapshot.qcow2`
//! holding the volume's own clusters at one instant, with the disk's file of the volume's
//! backing image as its backing file, so a snapshot of a volume over a 10 GiB image with 5 MiB
//! written takes about 5 MiB. An attached volume is captured by its engine (qemu's
//! copy-before-write backup, `os::Engine::backup_replica`), a detached one by copying its replica
//! file (reflink where the filesystem shares blocks). A new volume from a snapshot gets copies of
//! that file as its replicas, rebased onto the backing image it should use.
//!
//! A copy-on-write replica's snapshot is raw too (`snapshot.raw`): the volume's view read
//! through the layer, holes kept (`capture_cow` has the argument for an attached volume), so
//! restores, clones, exports and backups read it as any raw snapshot; a restore into a
//! copy-on-write replica writes a new one over the disk's raw expansion of the backing image,
//! with what differs from it (`restore_into_cow`).
//!
//! A loop volume's replica is a raw file, and so is its snapshot (`snapshot.raw`): a reflink
//! copy (FICLONE) of the replica, the whole volume in a file that shares every block with it.
//! Attached, the loop device is flushed first (what its page cache holds goes down to the
//! file), then the file is cloned in one FICLONE, which the filesystem makes atomic with
//! respect to every write into the file (it holds the file's locks and writes back its dirty
//! pages before sharing the blocks): each write the volume acknowledged before the clone is in
//! it whole, none after it is, and writes in flight are in or out as a crash would leave them,
//! so the copy is crash-consistent, as a power cut at that instant would be. A restore or clone
//! converts between formats where the new volume's engine differs (`qemu-img convert` with the
//! source format given, never probed).
//!
//! The controller decides which snapshot, which volume and which disks (`controller::snapshot`);
//! this module must not touch volume or snapshot records, and the OS layer does the qemu work.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Disk;
use crate::os::{ImageFormat, Os};

/// Snapshot parameter (VolumeSnapshotClass): `bi` exports the snapshot as a backing image.
pub const TYPE: &str = "type";
/// Snapshot parameter: the format of that backing image, `raw` or `qcow2` (the default).
pub const EXPORT_TYPE: &str = "export-type";
/// The value of [`TYPE`] that asks for a backing image.
pub const TYPE_BACKING_IMAGE: &str = "bi";
/// The value of [`TYPE`] for a snapshot kept on the volume's disks (the default).
pub const TYPE_SNAPSHOT: &str = "snap";
/// The value of [`TYPE`] that makes the snapshot a backup in the backup target
/// (`crate::controller::backup`): it keeps no file on the volume's disks.
pub const TYPE_BACKUP: &str = "bak";

/// Whether snapshot parameters ask for a backup (`type: bak`).
pub fn is_backup(params: &BTreeMap<String, String>) -> bool {
    params.get(TYPE).map(|s| s.trim()) == Some(TYPE_BACKUP)
}

/// One file of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotFile {
    pub node_id: String,
    pub disk_id: String,
    pub path: PathBuf,
}

/// The backing image a `type: bi` snapshot was exported as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportedImage {
    pub name: String,
    pub export_type: String,
}

/// A snapshot of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub source_volume_id: String,
    /// The source volume's size when it was taken: a volume restored from it is at least this.
    pub size_bytes: u64,
    pub creation_secs: u64,
    pub creation_nanos: u32,
    /// The backing image of the source volume, which a restore uses unless told otherwise.
    pub backing_image: Option<String>,
    pub parameters: BTreeMap<String, String>,
    pub files: Vec<SnapshotFile>,
    /// Set for `type: bi`.
    pub exported: Option<ExportedImage>,
    /// The volume group snapshot this snapshot is a member of: it was cut at the same instant
    /// as the group's other members and is deleted only with them (DeleteVolumeGroupSnapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_snapshot_id: Option<String>,
}

/// One volume of a group snapshot, as its node captures it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupMember {
    pub snapshot_id: String,
    /// The volume's replicas on the capturing node.
    pub replicas: Vec<crate::model::Replica>,
    pub backing_image: Option<String>,
}

/// What a node needs to capture one volume: the replica to copy (`replica`, on `disk`, over
/// `backing`) and the volume's other disks of this node, each with its own file of the backing
/// image, that get a copy of the result.
#[derive(Clone, Debug)]
pub struct CapturePlan {
    pub snapshot_id: String,
    pub disk: Disk,
    pub replica: PathBuf,
    pub backing: Option<(PathBuf, ImageFormat)>,
    pub copies: Vec<(Disk, Option<(PathBuf, ImageFormat)>)>,
}

/// Captures one volume by `plan`: the point-in-time file on the plan's disk, then its copies on
/// the other disks. Blocking.
pub fn capture_plan(os: &Os, node_id: &str, plan: &CapturePlan) -> Result<Vec<SnapshotFile>> {
    let first = capture_first(os, node_id, plan)?;
    copy_plan(os, node_id, plan, first)
}

/// The format of a snapshot of a replica of `format`: a copy-on-write replica's snapshot is
/// raw (its view, see [`capture`]), so everything that reads raw snapshots reads it.
pub fn snapshot_format(format: ImageFormat) -> ImageFormat {
    match format {
        ImageFormat::Cow => ImageFormat::Raw,
        f => f,
    }
}

fn capture_first(os: &Os, node_id: &str, plan: &CapturePlan) -> Result<SnapshotFile> {
    let format = snapshot_format(ImageFormat::of_file(&plan.replica));
    let dest = snapshot_path_as(&plan.disk, &plan.snapshot_id, format);
    let b = plan.backing.as_ref().map(|(p, f)| (p.as_path(), *f));
    capture(os, &plan.replica, &dest, b)?;
    Ok(SnapshotFile {
        node_id: node_id.to_string(),
        disk_id: plan.disk.id.clone(),
        path: dest,
    })
}

fn copy_plan(
    os: &Os,
    node_id: &str,
    plan: &CapturePlan,
    first: SnapshotFile,
) -> Result<Vec<SnapshotFile>> {
    let mut files = vec![first];
    let format = ImageFormat::of_file(&files[0].path);
    for (other, other_backing) in &plan.copies {
        let path = snapshot_path_as(other, &plan.snapshot_id, format);
        let b = other_backing.as_ref().map(|(p, f)| (p.as_path(), *f));
        if let Err(e) = copy_to(os, &files[0].path, &path, b) {
            files.iter().for_each(|f| drop(remove(f)));
            return Err(e);
        }
        files.push(SnapshotFile {
            node_id: node_id.to_string(),
            disk_id: other.id.clone(),
            path,
        });
    }
    Ok(files)
}

/// Captures several volumes of this node at one instant (a volume group snapshot). Blocking.
///
/// The guarantee: every write that any member volume acknowledged before the instant is in the
/// group's files, and none issued after it is, for all members alike, so a set of volumes
/// written in a dependent order (a database's log on one, its data on another) restores to a
/// state that existed. How: a member that no engine has open is at rest (the controller holds
/// each member's volume guard, so none is attached meanwhile) and its file is copied as it is.
/// For a member whose engine runs here, the filesystem mounted from it is frozen (FIFREEZE:
/// the kernel flushes it through the engine and makes every new write wait) before any member
/// is captured, all members are captured while every one of them is frozen (each engine's
/// point-in-time copy, `backup_replica`, holds the volume as it was when its job started, and
/// no write reaches any member between the first job and the last), and all are thawed at once
/// after the last capture, also when one fails. Writers wait, they do not fail, for as long as
/// the captures take (the replicas' own clusters, copied locally). An attached member that no
/// filesystem here is mounted from (a raw block volume, whose writes bicsi cannot hold) makes
/// the group fail with FailedPrecondition before anything is frozen: the CSI spec requires a
/// group snapshot to be write-order consistent or to fail. The copies to the members' other
/// disks are made after the thaw, from the captured files.
pub fn capture_group(
    os: &Os,
    node_id: &str,
    plans: &[CapturePlan],
) -> Result<Vec<Vec<SnapshotFile>>> {
    let mut frozen: Vec<PathBuf> = Vec::new();
    for plan in plans {
        let mounts = match ImageFormat::of_file(&plan.replica) {
            ImageFormat::Qcow2 => os.engine.engine_mounts(&plan.replica)?,
            // The loop engine: the filesystem on the loop device over the raw replica; the
            // mirror engine: the one on the loop device over its file.
            ImageFormat::Raw | ImageFormat::Cow => {
                match crate::os::engine::mirror::export_of(&plan.replica) {
                    Some(export) => os.loops.file_mounts(&export)?,
                    None => os.loops.file_mounts(&plan.replica)?,
                }
            }
        };
        match mounts {
            None => {}
            Some(mounts) if mounts.is_empty() => {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {:?}: its volume is attached on node {node_id:?} without a filesystem bicsi can freeze (a raw block volume): bicsi cannot hold its writes for a write-order consistent group snapshot; snapshot it alone, or detach it first",
                    plan.snapshot_id
                )));
            }
            Some(mounts) => {
                for m in mounts {
                    if !frozen.contains(&m) {
                        frozen.push(m);
                    }
                }
            }
        }
    }
    let mut held = Vec::new();
    let mut result = Ok(());
    for m in &frozen {
        match os.fs.freeze(m) {
            Ok(()) => held.push(m.clone()),
            Err(e) => {
                result = Err(Error::from(e));
                break;
            }
        }
    }
    let mut firsts = Vec::new();
    if result.is_ok() {
        tracing::info!(
            members = plans.len(),
            frozen = held.len(),
            "group snapshot: writes held; capturing"
        );
        for plan in plans {
            match capture_first(os, node_id, plan) {
                Ok(f) => firsts.push(f),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
    }
    // Thaw whatever happened: a filesystem left frozen hangs its writers.
    let mut thaw_error = None;
    for m in held.iter().rev() {
        if let Err(e) = os.fs.thaw(m) {
            tracing::error!(mount = %m.display(), error = %e, "cannot thaw a filesystem frozen for a group snapshot");
            thaw_error.get_or_insert(Error::from(e));
        }
    }
    if let Some(e) = thaw_error {
        result = result.and(Err(e));
    }
    if let Err(e) = result {
        firsts.iter().for_each(|f| drop(remove(f)));
        return Err(e);
    }
    let mut all: Vec<Vec<SnapshotFile>> = Vec::new();
    for (plan, first) in plans.iter().zip(firsts) {
        match copy_plan(os, node_id, plan, first) {
            Ok(files) => all.push(files),
            Err(e) => {
                all.iter().flatten().for_each(|f| drop(remove(f)));
                return Err(e);
            }
        }
    }
    Ok(all)
}

/// What CreateSnapshot's parameters ask for: None for a snapshot on the volume's disks, else the
/// backing image's export type.
pub fn parse_parameters(params: &BTreeMap<String, String>) -> Result<Option<String>> {
    for key in params.keys() {
        if key != TYPE && key != EXPORT_TYPE && !key.starts_with("csi.storage.k8s.io/") {
            return Err(Error::InvalidArgument(format!(
                "snapshot parameter {key:?} is not supported; the accepted keys are {TYPE:?} ({TYPE_SNAPSHOT} or {TYPE_BACKING_IMAGE}) and {EXPORT_TYPE:?} (raw or qcow2, with {TYPE}: {TYPE_BACKING_IMAGE})"
            )));
        }
    }
    let export_type = match params.get(EXPORT_TYPE).map(|s| s.trim()) {
        None | Some("") => None,
        Some(t @ ("raw" | "qcow2")) => Some(t.to_string()),
        Some(other) => {
            return Err(Error::InvalidArgument(format!(
                "snapshot parameter {EXPORT_TYPE}: {other:?} is not an export type; use raw or qcow2"
            )));
        }
    };
    match params.get(TYPE).map(|s| s.trim()) {
        Some(TYPE_BACKING_IMAGE) => Ok(Some(export_type.unwrap_or_else(|| "qcow2".into()))),
        Some(TYPE_BACKUP) if export_type.is_some() => Err(Error::InvalidArgument(format!(
            "snapshot parameter {EXPORT_TYPE} needs {TYPE}: {TYPE_BACKING_IMAGE}, not {TYPE_BACKUP}"
        ))),
        Some(TYPE_BACKUP) => Ok(None),
        None | Some("") | Some(TYPE_SNAPSHOT) => {
            if export_type.is_some() {
                return Err(Error::InvalidArgument(format!(
                    "snapshot parameter {EXPORT_TYPE} needs {TYPE}: {TYPE_BACKING_IMAGE} (it is the format of the exported backing image)"
                )));
            }
            Ok(None)
        }
        Some(other) => Err(Error::InvalidArgument(format!(
            "snapshot parameter {TYPE}: {other:?} is not a snapshot type; use {TYPE_SNAPSHOT} (kept on the volume's disks), {TYPE_BACKING_IMAGE} (exported as a backing image) or {TYPE_BACKUP} (a backup in the backup target)"
        ))),
    }
}

/// The backing image name of a `type: bi` snapshot: the snapshot name when it is a DNS-1123
/// label already, else its lower-cased letters and digits joined by '-', cut to fit, with a
/// digest of the full name so two names never share an image.
pub fn image_name_for(snapshot_name: &str) -> String {
    if crate::model::validate_name(snapshot_name).is_ok() {
        return snapshot_name.to_string();
    }
    let mut clean = String::new();
    for c in snapshot_name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            clean.push(c);
        } else if !clean.ends_with('-') && !clean.is_empty() {
            clean.push('-');
        }
    }
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha512::digest(snapshot_name.as_bytes()));
    // 63 characters at most: up to 50 of the name, '-', 12 of the digest.
    let mut head: String = clean.chars().take(50).collect();
    while head.ends_with('-') {
        head.pop();
    }
    if head.is_empty() {
        format!("snap-{}", &digest[..12])
    } else {
        format!("{head}-{}", &digest[..12])
    }
}

pub fn snapshot_path(disk: &Disk, snapshot_id: &str) -> PathBuf {
    snapshot_path_as(disk, snapshot_id, ImageFormat::Qcow2)
}

/// The snapshot's file on a disk in `format` (the format of the replica it was taken from).
pub fn snapshot_path_as(disk: &Disk, snapshot_id: &str, format: ImageFormat) -> PathBuf {
    disk.snapshot_dir(snapshot_id)
        .join(format!("snapshot.{}", format.extension()))
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Internal(format!("{what} {}: {e}", path.display()))
}

fn part_path(dest: &Path) -> PathBuf {
    dest.with_extension(format!("{}.part", ImageFormat::of_file(dest).extension()))
}

/// Moves a finished file into place durably.
fn commit(tmp: &Path, dest: &Path) -> Result<()> {
    Ok(crate::os::image::commit(tmp, dest)?)
}

/// Builds `dest` through `make`, which writes its `.part` file: the file moves into place durably
/// only when `make` succeeds; on failure nothing is left, neither the part file nor the
/// directory when this call created it.
fn build(dest: &Path, make: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = dest
        .parent()
        .ok_or_else(|| Error::Internal(format!("{} has no directory", dest.display())))?;
    let made_dir = !dir.exists();
    std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
    let tmp = part_path(dest);
    let _ = std::fs::remove_file(&tmp);
    let result = make(&tmp).and_then(|()| commit(&tmp, dest));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        if made_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
    result
}

/// Copies a snapshot or replica file to `to`, naming both in the error.
fn copy_file(what: &str, from: &Path, to: &Path) -> Result<()> {
    crate::sync::local_copy(from, to).map(drop).map_err(|e| {
        Error::Internal(format!(
            "copying {what} {} to {}: {e}",
            from.display(),
            to.display()
        ))
    })
}

/// Captures `replica` as it is now into `dest` (a new qcow2 with the replica's size and
/// `backing`, the replica's own backing file): through the engine when one has it open (a
/// point-in-time copy while writes go on), else a copy of the file at rest. Blocking.
pub fn capture(
    os: &Os,
    replica: &Path,
    dest: &Path,
    backing: Option<(&Path, ImageFormat)>,
) -> Result<()> {
    match ImageFormat::of_file(replica) {
        ImageFormat::Raw => return build(dest, |tmp| capture_raw(os, replica, tmp)),
        ImageFormat::Cow => return build(dest, |tmp| capture_cow(os, replica, tmp)),
        ImageFormat::Qcow2 => {}
    }
    build(dest, |tmp| {
        let size = os.images.info(replica)?.virtual_size;
        os.images.create_replica(tmp, size, backing)?;
        if os.engine.backup_replica(replica, tmp)? {
            tracing::info!(replica = %replica.display(), copy = %dest.display(), "point-in-time copy made by the volume's engine");
        } else {
            // No engine has it open: the file is at rest and its copy is the content.
            std::fs::remove_file(tmp).map_err(|e| io("cannot remove", tmp, e))?;
            copy_file("replica", replica, tmp)?;
        }
        Ok(())
    })
}

/// A raw replica as it is now (see the module doc): served by a loop device, that device is
/// flushed and the file cloned in one FICLONE; served by a mirror engine, the loop device on
/// its file is flushed, the engine holds writes (those in flight complete first: every write
/// it acknowledged is in every replica, none after), the file is cloned and the writes go on;
/// at rest, copied (reflink where the filesystem shares blocks).
fn capture_raw(os: &Os, replica: &Path, tmp: &Path) -> Result<()> {
    if let Some(export) = crate::os::engine::mirror::export_of(replica) {
        if let Some(dev) = os.loops.find(&export)? {
            os.loops.flush(&dev)?;
        }
        let run_dir = export.parent().unwrap_or(Path::new("/"));
        let paused = crate::os::engine::mirror::pause(run_dir)?;
        let cloned = os.images.clone_raw(replica, tmp);
        drop(paused);
        cloned?;
        tracing::info!(replica = %replica.display(), engine = %run_dir.display(), "point-in-time reflink copy of a mirror engine's replica, its writes held");
        return Ok(());
    }
    match os.loops.find(replica)? {
        Some(dev) => {
            os.loops.flush(&dev)?;
            os.images.clone_raw(replica, tmp)?;
            tracing::info!(replica = %replica.display(), device = %dev.display(), "point-in-time reflink copy of a loop engine's replica");
            Ok(())
        }
        None => copy_file("replica", replica, tmp),
    }
}

/// A copy-on-write replica as it is now, into the sparse raw file `tmp` (its view through the
/// layer, `replica_file::cow_to_raw`). At rest, its files on disk are the volume (the engine
/// that served it flushed them when it stopped). Served by a mirror engine: the loop device on
/// the engine's file is flushed, the engine holds writes (`pause`: those in flight complete
/// first), then flushes this replica (`flush PATH`), and only then are the replica's files
/// opened a second time and read, before the writes go on. Why that reads every acknowledged
/// write and nothing later: the engine acknowledges a write only after the layer wrote its
/// bytes into the data file and set its cluster's bit in memory; the map on disk may lag
/// behind those bits until the layer's `sync`, which writes every bit set before it (after
/// making the data durable). Under `pause` no write or discard is in flight or can start, so
/// the bits in memory are fixed, and the `sync` asked for under it puts all of them on disk:
/// the second open then sees exactly the engine's bits, and the data file's bytes through the
/// same page cache. Reading the engine's FUSE file instead is not safe: a write held by the
/// pause may hold that file's page locks (or have put its bytes in its cache already). The
/// replica must be healthy in the engine: one it dropped is refused by `flush` (not current).
fn capture_cow(os: &Os, replica: &Path, tmp: &Path) -> Result<()> {
    if let Some(export) = crate::os::engine::mirror::export_of(replica) {
        if let Some(dev) = os.loops.find(&export)? {
            os.loops.flush(&dev)?;
        }
        let run_dir = export.parent().unwrap_or(Path::new("/"));
        let mut paused = crate::os::engine::mirror::pause(run_dir)?;
        let copied = paused
            .flush(replica)
            .map_err(Error::from)
            .and_then(|()| crate::replica_file::cow_to_raw(replica, tmp));
        drop(paused);
        copied?;
        tracing::info!(replica = %replica.display(), engine = %run_dir.display(), "point-in-time copy of a mirror engine's copy-on-write replica, its writes held");
        return Ok(());
    }
    crate::replica_file::cow_to_raw(replica, tmp)
}

/// Copies a snapshot file to `dest` (another disk), pointing it at that disk's file of the same
/// backing image (the same verified bytes, so only the header changes). Blocking.
pub fn copy_to(
    os: &Os,
    src: &Path,
    dest: &Path,
    backing: Option<(&Path, ImageFormat)>,
) -> Result<()> {
    build(dest, |tmp| {
        copy_file("snapshot", src, tmp)?;
        // A raw snapshot holds the whole volume; it has no backing file to point elsewhere.
        if backing.is_some() && ImageFormat::of_file(src) == ImageFormat::Qcow2 {
            os.images.rebase(tmp, backing, false)?;
        }
        Ok(())
    })
}

/// Makes the replica file `dest` of `size` bytes from the snapshot file `src`. `same_image`:
/// `backing` is a file of the snapshot's own backing image (only the header changes); else the
/// content is kept by a safe rebase, which writes into the replica every cluster where the
/// snapshot's backing and the new one differ. Blocking.
pub fn restore(
    os: &Os,
    src: &Path,
    dest: &Path,
    size: u64,
    backing: Option<(&Path, ImageFormat)>,
    same_image: bool,
) -> Result<()> {
    let (from, to) = (ImageFormat::of_file(src), ImageFormat::of_file(dest));
    if to == ImageFormat::Cow {
        return restore_into_cow(os, src, from, dest, size, backing);
    }
    if (from, to) != (ImageFormat::Qcow2, ImageFormat::Qcow2) {
        return build(dest, |tmp| {
            restore_across(os, src, from, tmp, to, size, backing)
        });
    }
    build(dest, |tmp| {
        // Its pages stay cached: a rebuild compares the copy with its source next, and the
        // node's compare drops them (`Agent::compare_replicas`).
        crate::sync::local_copy_keeping_cache(src, tmp)
            .map(drop)
            .map_err(|e| {
                Error::Internal(format!(
                    "copying snapshot {} to {}: {e}",
                    src.display(),
                    tmp.display()
                ))
            })?;
        let current = os.images.info(tmp)?.backing_file;
        let wanted = backing.map(|(p, _)| p.to_path_buf());
        if !same_image {
            os.images.rebase(tmp, backing, true)?;
        } else if current != wanted {
            os.images.rebase(tmp, backing, false)?;
        }
        os.images.resize(tmp, size)?;
        Ok(())
    })
}

/// `restore` into a copy-on-write replica (a restore, a clone, or an offline rebuild whose
/// source is a replica at rest): a new one over `backing`'s raw expansion on the replica's
/// disk (made there when missing, through the disk's `tmp/`; the replica's path is
/// `<disk>/replicas/<dir>/volume.cow`), or without a base when the volume has no image, that
/// holds the source's content: every cluster where the source reads other than the base is
/// written (`replica_file::cow_from`), so over the same image only what the volume wrote takes
/// room. A raw snapshot or a raw or copy-on-write replica is read directly; a qcow2 snapshot is
/// first flattened into a raw file beside the replica, removed after. The cluster size is the
/// default one.
fn restore_into_cow(
    os: &Os,
    src: &Path,
    from: ImageFormat,
    dest: &Path,
    size: u64,
    backing: Option<(&Path, ImageFormat)>,
) -> Result<()> {
    let dir = dest
        .parent()
        .ok_or_else(|| Error::Internal(format!("{} has no directory", dest.display())))?;
    std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
    let base = match backing {
        Some((file, format)) => {
            let tmp = crate::model::disk_tmp_of_replica(dest).ok_or_else(|| {
                Error::Internal(format!("{} is not in a disk's replicas/", dest.display()))
            })?;
            Some(crate::os::rawfile::expand_backing(
                &*os.images,
                file,
                format,
                &tmp,
            )?)
        }
        None => None,
    };
    let cluster = crate::mirror::cow::DEFAULT_CLUSTER;
    let into =
        |src: &Path| crate::replica_file::cow_from(src, dest, size, cluster, base.as_deref());
    match from {
        ImageFormat::Raw | ImageFormat::Cow => into(src),
        ImageFormat::Qcow2 => {
            let flat = dest.with_extension("import.raw");
            let _ = std::fs::remove_file(&flat);
            let made = os
                .images
                .convert(src, from, &flat, ImageFormat::Raw)
                .map_err(Error::from)
                .and_then(|()| into(&flat));
            let _ = std::fs::remove_file(&flat);
            made
        }
    }
}

/// `restore` where the snapshot or the new replica is raw. Raw to raw: a copy (reflink where
/// the filesystem shares blocks) grown to `size`. qcow2 to raw: the snapshot with its backing
/// chain flattened into a raw file. Raw to qcow2: the raw content converted to a standalone
/// qcow2, then put over `backing` by a safe rebase (which keeps the content: it writes into the
/// replica every cluster where the backing file differs from what the replica held).
fn restore_across(
    os: &Os,
    src: &Path,
    from: ImageFormat,
    tmp: &Path,
    to: ImageFormat,
    size: u64,
    backing: Option<(&Path, ImageFormat)>,
) -> Result<()> {
    match (from, to) {
        // Snapshots of copy-on-write replicas are raw; restores into them: `restore_into_cow`.
        (ImageFormat::Cow, _) | (_, ImageFormat::Cow) => {
            return Err(crate::replica_file::cow_refused("restore", src));
        }
        (ImageFormat::Raw, ImageFormat::Raw) => copy_file("snapshot", src, tmp)?,
        (_, ImageFormat::Raw) => os.images.convert(src, from, tmp, to)?,
        (_, ImageFormat::Qcow2) => {
            os.images.convert(src, from, tmp, to)?;
            if backing.is_some() {
                os.images.rebase(tmp, backing, true)?;
            }
        }
    }
    crate::replica_file::resize(os, tmp, to, size)
}

/// Removes a snapshot's directory on a disk; Ok when it is gone already.
pub fn remove(file: &SnapshotFile) -> Result<()> {
    let Some(dir) = file.path.parent() else {
        return Ok(());
    };
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("cannot remove snapshot directory", dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    type Pairs<'a> = &'a [(&'a str, &'a str)];

    #[test]
    fn parameters_table() {
        let ok: &[(Pairs, Option<&str>)] = &[
            (&[], None),
            (&[("type", "snap")], None),
            (&[("type", "bi")], Some("qcow2")),
            (&[("type", "bi"), ("export-type", "raw")], Some("raw")),
            (&[("type", "bi"), ("export-type", "qcow2")], Some("qcow2")),
            (&[("type", "bak")], None),
            (&[("csi.storage.k8s.io/volumesnapshot/name", "s1")], None),
        ];
        for (p, want) in ok {
            assert_eq!(
                parse_parameters(&params(p)).unwrap().as_deref(),
                *want,
                "{p:?}"
            );
        }
        let bad: &[(Pairs, &str)] = &[
            (&[("color", "blue")], "\"color\""),
            (&[("type", "bi"), ("export-type", "vmdk")], "vmdk"),
            (&[("type", "backup")], "backup"),
            (&[("export-type", "raw")], "needs"),
            (&[("type", "bak"), ("export-type", "raw")], "needs"),
        ];
        for (p, needle) in bad {
            let e = parse_parameters(&params(p)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{p:?}");
            assert!(e.to_string().contains(needle), "{p:?}: {e}");
        }
    }

    #[test]
    fn image_names_are_dns_labels() {
        assert_eq!(image_name_for("snap-1"), "snap-1");
        for name in [
            "Snapshot_One",
            "snapshot-e8f2c4a0-7c1b-4a6e-9a53-0b0e3c1f5d2a-with-a-long-suffix-beyond-63",
            "___",
            "a.b.c",
        ] {
            let got = image_name_for(name);
            crate::model::validate_name(&got)
                .unwrap_or_else(|e| panic!("{name:?} -> {got:?}: {e}"));
            assert_eq!(got, image_name_for(name), "stable");
        }
        assert_ne!(image_name_for("A"), image_name_for("a_"));
    }
}
