//! A replica's file in its format: qcow2 for the `qemu` engine (an overlay on the disk's file of
//! the backing image), raw for the `loop` engine (a sparse file, or a reflink clone of the
//! disk's raw expansion of the backing image), cow for the `mirror` engine on a disk that does
//! not share blocks (`crate::mirror::cow`: a sparse data file `volume.cow`, its cluster map
//! `volume.cowmap` and a link `base` to the disk's raw expansion of the backing image, all in
//! the replica's directory, so removing the directory removes the replica). Creating, growing and sizing a replica go through
//! here, so the callers (node agent, snapshots) never assume a format; which format a file has
//! comes from its record (`Replica::format`) or, for files bicsi named itself, from
//! `ImageFormat::of_file`, never from its content.
//!
//! It must not choose formats (that is `volume_engine`'s) nor place replicas.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::Replica;
use crate::os::cow::CowSpec;
use crate::os::{ImageFormat, Os};

pub use crate::os::cow::{View, cow_spec};

/// Creates `replica`'s file of `size` bytes over `backing` (the disk's ready file of the
/// volume's backing image and its format). Raw: the backing image is expanded to raw once per
/// disk (`os::rawfile::expand_backing`, through `tmp_dir`, the disk's `tmp/`) and the replica is
/// a reflink clone of that expansion, grown to `size`. Idempotent. Blocking.
pub fn create(
    os: &Os,
    replica: &Replica,
    size: u64,
    backing: Option<(&Path, ImageFormat)>,
    tmp_dir: &Path,
) -> Result<()> {
    match replica.format {
        ImageFormat::Qcow2 => Ok(os.images.create_replica(&replica.path, size, backing)?),
        ImageFormat::Raw => {
            if replica.path.is_file() {
                // Made already (CreateVolume retried): the same size is Ok, another a Conflict.
                return Ok(os.images.create_raw(&replica.path, size, None)?);
            }
            let base = match backing {
                Some((file, format)) => Some(crate::os::rawfile::expand_backing(
                    &*os.images,
                    file,
                    format,
                    tmp_dir,
                )?),
                None => None,
            };
            Ok(os.images.create_raw(&replica.path, size, base.as_deref())?)
        }
        ImageFormat::Cow => {
            let cluster = replica
                .cluster_bytes
                .unwrap_or(crate::os::cow::DEFAULT_CLUSTER);
            create_cow(os, &replica.path, size, cluster, backing, tmp_dir)
        }
    }
}

/// Creates the copy-on-write replica with data file `data`: the base link first (to the disk's
/// raw expansion, made once per disk), then `cow::create` (the data, then the map, atomically).
/// A replica made already is Ok when it holds `size` bytes (CreateVolume retried), else
/// AlreadyExists; a failure leaves none of the three files behind.
fn create_cow(
    os: &Os,
    data: &Path,
    size: u64,
    cluster: u32,
    backing: Option<(&Path, ImageFormat)>,
    tmp_dir: &Path,
) -> Result<()> {
    let map = ImageFormat::cow_map(data);
    if map.is_file() {
        let have = crate::os::cow::Cow::open(&cow_spec(data), true)
            .map_err(|e| Error::Internal(e.to_string()))?
            .size();
        if have == size {
            return Ok(());
        }
        return Err(Error::AlreadyExists(format!(
            "copy-on-write replica {} holds {have} bytes, not {size}; remove its directory to make it again",
            data.display()
        )));
    }
    // Leftovers of a creation that crashed before its map was written.
    let link = ImageFormat::cow_base(data);
    for stale in [data, link.as_path()] {
        let _ = std::fs::remove_file(stale);
    }
    let made = (|| -> Result<()> {
        if let Some((file, format)) = backing {
            let base = crate::os::rawfile::expand_backing(&*os.images, file, format, tmp_dir)?;
            std::os::unix::fs::symlink(&base, &link).map_err(|e| {
                Error::Internal(format!(
                    "copy-on-write replica {}: linking its base {}: {e}",
                    data.display(),
                    base.display()
                ))
            })?;
        }
        crate::os::cow::create(&cow_spec(data), size, cluster).map_err(|e| {
            Error::Internal(format!(
                "creating copy-on-write replica {}: {e}",
                data.display()
            ))
        })
    })();
    if made.is_err() {
        for f in [data, map.as_path(), link.as_path()] {
            let _ = std::fs::remove_file(f);
        }
    }
    made
}

/// Creates the copy-on-write target `spec` of an online rebuild (its data and map under
/// temporary names, `agent::online_cow_spec`) of `size` bytes, empty: every cluster reads from
/// its base, the disk's raw expansion of `backing` (made once per disk, as for [`create`]),
/// reached through `spec.base` (the replica's `base` link, made or pointed again at this disk's
/// expansion), or as zeros without a backing image. Leftovers of an earlier attempt at these
/// temporary names are removed first: a target is always filled from empty. On failure neither
/// temporary file is left. Blocking.
pub fn create_cow_target(
    os: &Os,
    spec: &CowSpec,
    size: u64,
    cluster: u32,
    backing: Option<(&Path, ImageFormat)>,
    tmp_dir: &Path,
) -> Result<()> {
    let name = spec.data.display();
    if let Some(dir) = spec.data.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| internal("creating the directory of", &spec.data, e))?;
    }
    for stale in [&spec.data, &spec.map] {
        match std::fs::remove_file(stale) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(internal("removing the leftover", stale, e)),
        }
    }
    match (backing, &spec.base) {
        (Some((file, format)), Some(link)) => {
            let base = crate::os::rawfile::expand_backing(&*os.images, file, format, tmp_dir)?;
            if std::fs::read_link(link).ok().as_deref() != Some(base.as_path()) {
                // A new link renamed over the old one: the replica's other files never see none.
                let tmp = link.with_file_name("base.online");
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(&base, &tmp)
                    .and_then(|()| std::fs::rename(&tmp, link))
                    .map_err(|e| internal("linking the base of", &spec.data, e))?;
            }
        }
        (None, None) => {}
        _ => {
            return Err(Error::Internal(format!(
                "copy-on-write target {name}: a base link is given exactly when the volume has                  a backing image"
            )));
        }
    }
    crate::mirror::cow::create(spec, size, cluster).map_err(|e| {
        let _ = std::fs::remove_file(&spec.data);
        let _ = std::fs::remove_file(&spec.map);
        Error::Internal(format!("creating copy-on-write target {name}: {e}"))
    })
}

/// FailedPrecondition for `what` (an operation) on the copy-on-write replica `path`, which is
/// not wired for it yet, naming the fix.
pub fn cow_refused(what: &str, path: &Path) -> Error {
    Error::FailedPrecondition(format!(
        "{what}: replica {} is a copy-on-write replica (engine mirror on a disk that does not share blocks), and bicsi does not {what} such replicas yet; make the volume with the StorageClass parameter engine: qemu (or on a disk that shares blocks: XFS with reflink=1, btrfs) where this is needed",
        path.display()
    ))
}

/// Bytes read per step when copying a volume's view.
const STEP: usize = 1 << 20;
/// The granularity at which zeros are left as holes in a raw copy.
const BLOCK: usize = 4096;

fn internal(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{what} {}: {e}", path.display()))
}

/// Writes the view of the copy-on-write replica `data` (as its files on disk hold it: a
/// replica an engine serves must be flushed first, see `snapshot::capture`) into the new
/// sparse raw file `dest` of the volume's size: only the layer's data extents are read (the
/// clusters in its data file where that file has data, the base elsewhere), and only the
/// non-zero 4 KiB blocks of those are written, so holes stay holes. Blocking.
pub fn cow_to_raw(data: &Path, dest: &Path) -> Result<()> {
    let layer = crate::os::cow::Cow::open(&cow_spec(data), true)
        .map_err(|e| internal("reading copy-on-write replica", data, e))?;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|e| internal("creating", dest, e))?;
    out.set_len(layer.size())
        .map_err(|e| internal("sizing", dest, e))?;
    let extents = layer
        .data_extents(0, layer.size())
        .map_err(|e| internal("mapping copy-on-write replica", data, e))?;
    let mut buf = vec![0u8; STEP];
    for e in extents {
        let mut pos = e.offset;
        while pos < e.end() {
            let n = (e.end() - pos).min(STEP as u64) as usize;
            let part = &mut buf[..n];
            layer
                .read_at(part, pos)
                .map_err(|e| internal("reading copy-on-write replica", data, e))?;
            write_nonzero(&out, part, pos).map_err(|e| internal("writing", dest, e))?;
            pos += n as u64;
        }
    }
    out.sync_all().map_err(|e| internal("syncing", dest, e))
}

/// Writes the runs of non-zero [`BLOCK`]s of `buf` at `offset + their place` in `out`.
fn write_nonzero(out: &std::fs::File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut i = 0;
    while i < buf.len() {
        let zero = |j: usize| buf[j..(j + BLOCK).min(buf.len())].iter().all(|&b| b == 0);
        if zero(i) {
            i += BLOCK;
            continue;
        }
        let start = i;
        while i < buf.len() && !zero(i) {
            i += BLOCK;
        }
        out.write_all_at(&buf[start..i.min(buf.len())], offset + start as u64)?;
    }
    Ok(())
}

/// Makes the copy-on-write replica `data` of `size` bytes holding the content of `src` (a raw
/// file, or another copy-on-write replica at rest, read through its view; zeros past its end),
/// over `base` (the disk's raw expansion of the volume's backing image, linked as its `base`)
/// or none: a new replica, then every cluster where `src` reads other than the new replica
/// (its base, or zeros) is written through the layer, so a replica over the same image as its
/// source holds only what differs from it. Only where `src` has data or the base has bytes
/// is read. Built under temporary names beside `data` and moved into place at the end, the
/// map first and the data file last, so `data` exists only once the replica is whole (a
/// restore retried finds it, `Agent::restore_replica`), and a failure leaves none of its files
/// behind. Blocking.
pub fn cow_from(
    src: &Path,
    data: &Path,
    size: u64,
    cluster: u32,
    base: Option<&Path>,
) -> Result<()> {
    let stem = data
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let part = data.with_file_name(format!(".{stem}.part.cow"));
    let part_map = ImageFormat::cow_map(&part);
    let map = ImageFormat::cow_map(data);
    let link = ImageFormat::cow_base(data);
    let cleanup = || {
        let _ = std::fs::remove_file(&part);
        let _ = std::fs::remove_file(&part_map);
    };
    cleanup();
    // A base link left by an earlier attempt is made again (or must not be there).
    let _ = std::fs::remove_file(&link);
    let made = (|| -> Result<()> {
        if let Some(b) = base {
            std::os::unix::fs::symlink(b, &link)
                .map_err(|e| internal("linking the base of", data, e))?;
        }
        let spec = CowSpec {
            data: part.clone(),
            map: part_map.clone(),
            base: base.map(|_| link.clone()),
        };
        crate::os::cow::create(&spec, size, cluster)
            .map_err(|e| internal("creating copy-on-write replica", data, e))?;
        let layer = crate::os::cow::Cow::open(&spec, false)
            .map_err(|e| internal("opening copy-on-write replica", data, e))?;
        let input = View::open(src).map_err(|e| internal("opening", src, e))?;
        let len = input.size().min(size);
        let mut ranges = input
            .extents(len)
            .map_err(|e| internal("mapping", src, e))?;
        // Where the base shows through, a hole of the source must be written as zeros.
        ranges.extend(
            layer
                .data_extents(0, len)
                .map_err(|e| internal("mapping the base of", data, e))?,
        );
        ranges.sort_by_key(|e| e.offset);
        let c = cluster as u64;
        let step = (STEP as u64).max(c) as usize;
        let (mut want, mut have) = (vec![0u8; step], vec![0u8; step]);
        let mut done = 0u64; // Everything below is copied.
        for e in ranges {
            // Whole clusters: a cluster is compared and written whole.
            let mut pos = (e.offset / c * c).max(done);
            let end = e.end().min(len);
            while pos < end {
                let n = (len - pos)
                    .min(step as u64)
                    .min((end - pos).div_ceil(c) * c) as usize;
                let (w, h) = (&mut want[..n], &mut have[..n]);
                input
                    .read_at(w, pos)
                    .map_err(|e| internal("reading", src, e))?;
                layer
                    .read_at(h, pos)
                    .map_err(|e| internal("reading copy-on-write replica", data, e))?;
                for (k, (a, b)) in w.chunks(c as usize).zip(h.chunks(c as usize)).enumerate() {
                    if a != b {
                        layer
                            .write_at(a, pos + k as u64 * c)
                            .map_err(|e| internal("writing copy-on-write replica", data, e))?;
                    }
                }
                pos += n as u64;
                done = pos;
            }
        }
        layer
            .sync()
            .map_err(|e| internal("syncing copy-on-write replica", data, e))?;
        drop(layer);
        std::fs::rename(&part_map, &map).map_err(|e| internal("moving into place", &map, e))?;
        std::fs::rename(&part, data).map_err(|e| internal("moving into place", data, e))?;
        let dir = data.parent().unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| internal("syncing", dir, e))
    })();
    if made.is_err() {
        cleanup();
        let _ = std::fs::remove_file(&map);
        let _ = std::fs::remove_file(&link);
    }
    made
}

/// Grows the file at `path` of `format` to `size` (offline). Blocking.
pub fn resize(os: &Os, path: &Path, format: ImageFormat, size: u64) -> Result<()> {
    match format {
        ImageFormat::Qcow2 => Ok(os.images.resize(path, size)?),
        ImageFormat::Raw => Ok(os.images.resize_raw(path, size)?),
        ImageFormat::Cow => crate::os::cow::grow(&cow_spec(path), size)
            .map_err(|e| internal("growing copy-on-write replica", path, e)),
    }
}

/// The size of the volume the file at `path` of `format` holds. Blocking.
pub fn volume_size(os: &Os, path: &Path, format: ImageFormat) -> Result<u64> {
    match format {
        ImageFormat::Qcow2 => Ok(os.images.info(path)?.virtual_size),
        ImageFormat::Raw => Ok(os.images.raw_size(path)?),
        ImageFormat::Cow => Ok(crate::os::cow::Cow::open(&cow_spec(path), true)
            .map_err(|e| Error::Internal(e.to_string()))?
            .size()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Replica;
    use crate::os::ReplicaTarget;
    use crate::os::compare::identical;

    fn cow_replica(path: &Path) -> Replica {
        Replica {
            id: "r1".into(),
            node_id: "n1".into(),
            disk_id: "d1".into(),
            path: path.to_path_buf(),
            format: ImageFormat::Cow,
            cluster_bytes: Some(4096),
            deferred: false,
            health: Default::default(),
        }
    }

    fn read_view(data: &Path) -> Vec<u8> {
        let layer = crate::os::cow::Cow::open(&cow_spec(data), true).unwrap();
        let mut all = vec![0u8; layer.size() as usize];
        layer.read_at(&mut all, 0).unwrap();
        all
    }

    #[test]
    fn a_cow_replica_grows_in_two_readable_steps_and_copies_to_and_from_sparse_raw() {
        let dir = tempfile::tempdir().unwrap();
        let os = Os::real();
        // A base of 2 clusters (8 KiB), a volume of 5 clusters and a half.
        let image = dir.path().join("backing");
        std::fs::write(&image, vec![7u8; 2 * 4096]).unwrap();
        let rdir = dir.path().join("replicas/v-r1");
        std::fs::create_dir_all(&rdir).unwrap();
        let data = rdir.join("volume.cow");
        let size = 5 * 4096 + 2048;
        let backing = Some((image.as_path(), ImageFormat::Raw));
        create(&os, &cow_replica(&data), size, backing, dir.path()).unwrap();
        {
            let layer = crate::os::cow::Cow::open(&cow_spec(&data), false).unwrap();
            layer.write_at(b"tail", size - 4).unwrap();
            layer.write_at(b"mid", 3 * 4096).unwrap();
            layer.sync().unwrap();
        }
        let mut want = read_view(&data);
        assert_eq!(&want[..8192], &[7u8; 8192][..]);

        // A crash between the two steps: the data file is longer, the map says the old size.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&data)
            .unwrap()
            .set_len(64 * 1024)
            .unwrap();
        assert_eq!(volume_size(&os, &data, ImageFormat::Cow).unwrap(), size);
        assert_eq!(read_view(&data), want);
        // Done again: the new size, the old content, zeros after it; idempotent.
        for _ in 0..2 {
            resize(&os, &data, ImageFormat::Cow, 64 * 1024).unwrap();
            assert_eq!(
                volume_size(&os, &data, ImageFormat::Cow).unwrap(),
                64 * 1024
            );
            want.resize(64 * 1024, 0);
            assert_eq!(read_view(&data), want);
        }
        let e = resize(&os, &data, ImageFormat::Cow, 4096).unwrap_err();
        assert!(e.to_string().contains("cannot shrink"), "{e}");
        // The new clusters take writes.
        {
            let layer = crate::os::cow::Cow::open(&cow_spec(&data), false).unwrap();
            layer.write_at(b"new", 60 * 1024).unwrap();
            layer.sync().unwrap();
        }
        want[60 * 1024..60 * 1024 + 3].copy_from_slice(b"new");
        assert_eq!(read_view(&data), want);

        // To raw: the view, holes where it is zero.
        let raw = dir.path().join("snapshot.raw");
        cow_to_raw(&data, &raw).unwrap();
        assert_eq!(std::fs::read(&raw).unwrap(), want);
        let extents =
            crate::sync::extents_in(&std::fs::File::open(&raw).unwrap(), 0, 65536).unwrap();
        let allocated: u64 = extents.iter().map(|e| e.len).sum();
        assert!(allocated <= 5 * 4096, "{extents:?}");
        // From raw: a new replica without a base holding the same view, a larger size too.
        let back = dir.path().join("replicas/v-r2/volume.cow");
        std::fs::create_dir_all(back.parent().unwrap()).unwrap();
        cow_from(&raw, &back, 128 * 1024, 4096, None).unwrap();
        assert!(cow_spec(&back).base.is_none());
        let mut bigger = want.clone();
        bigger.resize(128 * 1024, 0);
        assert_eq!(read_view(&back), bigger);
        let leftovers: Vec<_> = std::fs::read_dir(back.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "{leftovers:?}");
        // From a cow replica over a base to a new one over the same base: only the clusters
        // that differ from the base are written, a hole over base bytes included.
        {
            let layer = crate::os::cow::Cow::open(&cow_spec(&data), false).unwrap();
            layer.write_zeroes(0, 4096).unwrap();
            layer.sync().unwrap();
        }
        want[..4096].fill(0);
        let over = dir.path().join("replicas/v-r4/volume.cow");
        std::fs::create_dir_all(over.parent().unwrap()).unwrap();
        cow_from(&data, &over, 64 * 1024, 4096, Some(&image)).unwrap();
        assert_eq!(
            std::fs::read_link(over.with_file_name("base")).unwrap(),
            image
        );
        assert_eq!(read_view(&over), want);
        let layer = crate::os::cow::Cow::open(&cow_spec(&over), true).unwrap();
        // Cluster 0 (zeroed over the base), 3 ("mid"), 5 ("tail"), 15 ("new").
        assert_eq!(layer.clusters_in_data(), 4);
        drop(layer);
        // A source that cannot be read leaves nothing behind.
        let none = dir.path().join("replicas/v-r3/volume.cow");
        std::fs::create_dir_all(none.parent().unwrap()).unwrap();
        assert!(cow_from(&dir.path().join("missing.raw"), &none, 4096, 4096, None).is_err());
        assert_eq!(
            std::fs::read_dir(none.parent().unwrap()).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_cow_replica_is_made_over_the_base_idempotently_and_compares_on_its_view() {
        let dir = tempfile::tempdir().unwrap();
        let os = Os::real();
        // A raw image file is its own expansion (no qemu-img needed).
        let image = dir.path().join("backing");
        let content: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&image, &content).unwrap();
        let rdir = dir.path().join("replicas/v-r1");
        std::fs::create_dir_all(&rdir).unwrap();
        let data = rdir.join("volume.cow");
        assert_eq!(ImageFormat::of_file(&data), ImageFormat::Cow);
        let r = cow_replica(&data);
        let size = 8 * 4096;
        let backing = Some((image.as_path(), ImageFormat::Raw));
        create(&os, &r, size, backing, dir.path()).unwrap();
        assert!(data.is_file() && rdir.join("volume.cowmap").is_file());
        assert_eq!(std::fs::read_link(rdir.join("base")).unwrap(), image);
        assert_eq!(cow_spec(&data).base, Some(rdir.join("base")));
        // CreateVolume retried: the same size is Ok, another AlreadyExists naming the fix.
        create(&os, &r, size, backing, dir.path()).unwrap();
        let e = create(&os, &r, size * 2, backing, dir.path()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
        assert!(e.to_string().contains("remove its directory"), "{e}");
        assert_eq!(volume_size(&os, &data, ImageFormat::Cow).unwrap(), size);

        // Its view is the base then zeros: equal to a raw file of that content.
        let raw = dir.path().join("other.raw");
        let mut want = content.clone();
        want.resize(size as usize, 0);
        std::fs::write(&raw, &want).unwrap();
        let (a, b) = (
            ReplicaTarget::Local(data.clone()),
            ReplicaTarget::Local(raw.clone()),
        );
        assert!(identical(&a, &b, None).unwrap());
        // A write through the layer shows; the raw file without it differs.
        {
            let layer = crate::os::cow::Cow::open(&cow_spec(&data), false).unwrap();
            layer.write_at(b"changed", 5000).unwrap();
            layer.sync().unwrap();
        }
        assert!(!identical(&a, &b, None).unwrap());
        want[5000..5007].copy_from_slice(b"changed");
        std::fs::write(&raw, &want).unwrap();
        assert!(identical(&a, &b, None).unwrap());
        // Against a qcow2 replica: refused (qemu cannot read the layout).
        let q = ReplicaTarget::Local(dir.path().join("x.qcow2"));
        assert!(identical(&a, &q, None).is_err());

        // Without a backing image: no base link; a failed creation leaves nothing behind.
        let plain = dir.path().join("replicas/v-r2");
        std::fs::create_dir_all(&plain).unwrap();
        let d2 = plain.join("volume.cow");
        create(&os, &cow_replica(&d2), size, None, dir.path()).unwrap();
        assert!(!plain.join("base").exists() && cow_spec(&d2).base.is_none());
        let bad = dir.path().join("replicas/v-r3");
        std::fs::create_dir_all(&bad).unwrap();
        let mut r3 = cow_replica(&bad.join("volume.cow"));
        r3.cluster_bytes = Some(1000); // not a power of two
        assert!(create(&os, &r3, size, backing, dir.path()).is_err());
        assert_eq!(std::fs::read_dir(&bad).unwrap().count(), 0, "leftovers");
    }
}
