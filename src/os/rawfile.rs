//! Raw replica files, the loop engine's layout: a volume is one plain file of the volume's size
//! that a loop device serves directly, with no engine process in between.
//!
//! It owns the file work: a sparse file (`truncate`), a reflink clone of a raw base (FICLONE
//! through `cp --reflink=always`, which fails rather than copies where blocks cannot be shared),
//! growing a file, the probe of whether a directory's filesystem shares blocks, and the per-disk
//! raw expansion of a backing image file ([`expand_backing`]), and the positioned read of a
//! raw file that the engines and the replica server share ([`read_full`]). Files appear only
//! when complete (temporary name, fsync, rename, fsync of the directory).
//!
//! It must not decide which volumes are raw (the domain's `volume_engine` does) and never reads
//! a raw file's content to learn its format: a raw file is always opened as raw.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{ImageFormat, ImageTool, OsError, OsResult, output};

/// A temporary name beside `path` (same directory, so the rename is atomic), distinct per
/// process and per call.
/// Fills `buf` from `offset` of `file` (retrying short and interrupted reads); zeros past its
/// end, as a sparse raw file reads past its size.
pub fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn temp_beside(path: &Path) -> OsResult<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| OsError::Unsupported(format!("{} does not name a file", path.display())))?;
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    Ok(path.with_file_name(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        &nonce[..8]
    )))
}

/// `cp --reflink=always` of `src` to `dst`: one FICLONE; an error where the filesystem cannot
/// share blocks (or across filesystems), never a byte copy.
fn reflink(src: &Path, dst: &Path) -> OsResult<()> {
    let mut cmd = Command::new("cp");
    cmd.args(["--reflink=always", "--"]).arg(src).arg(dst);
    let out = output(&mut cmd)?;
    if out.status.success() {
        return Ok(());
    }
    let _ = fs::remove_file(dst);
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.contains("not supported")
        || stderr.contains("Invalid cross-device link")
        || stderr.contains("Invalid argument")
        || stderr.contains("Inappropriate ioctl")
    {
        return Err(OsError::Unsupported(format!(
            "cannot reflink {} to {}: {stderr}; the loop engine needs a disk whose filesystem \
             shares blocks (XFS made with reflink=1, or btrfs), on one filesystem",
            src.display(),
            dst.display()
        )));
    }
    Err(super::command_error(&cmd, &out, None))
}

/// Grows (or sets) the length of the file at `path`.
fn set_len(path: &Path, size: u64) -> OsResult<()> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(size))
        .map_err(|e| OsError::io(format!("setting the size of {}", path.display()), e))
}

fn file_len(path: &Path) -> OsResult<u64> {
    fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| OsError::io(format!("raw file {}", path.display()), e))
}

/// What `create_raw` refuses or finds done, from the request and the length of the file
/// already at `path` (None: there is none): Ok(false) when that file is the replica asked for,
/// `Conflict` when it has another size, `NotFound` for a missing base or directory, Ok(true)
/// when the replica is to be made. The fake image tool (`super::fake`) calls it too.
pub(crate) fn check_create(
    path: &Path,
    size: u64,
    base: Option<&Path>,
    existing: Option<u64>,
) -> OsResult<bool> {
    if let Some(len) = existing {
        if len == size {
            return Ok(false);
        }
        return Err(OsError::Conflict(format!(
            "raw replica {} already exists with {len} bytes, but {size} bytes was asked; delete \
             it or use another path",
            path.display()
        )));
    }
    if let Some(base) = base
        && !base.is_file()
    {
        return Err(OsError::NotFound(format!(
            "raw base {} of replica {} does not exist; prepare the backing image on this disk \
             first",
            base.display(),
            path.display()
        )));
    }
    match path.parent() {
        Some(dir) if dir.is_dir() => Ok(true),
        _ => Err(OsError::NotFound(format!(
            "cannot create raw replica {}: its directory does not exist; create it first",
            path.display()
        ))),
    }
}

/// What `clone_raw` refuses before any copy: a `dst` that exists (`Conflict`), a `src` that
/// is not a file or a `dst` directory that does not exist (`NotFound`). The fake image tool
/// (`super::fake`) calls it too.
pub(crate) fn check_clone(src: &Path, dst: &Path) -> OsResult<()> {
    if dst.exists() {
        return Err(OsError::Conflict(format!(
            "cannot clone {} to {}: the destination exists",
            src.display(),
            dst.display()
        )));
    }
    if !src.is_file() {
        return Err(OsError::NotFound(format!(
            "cannot clone {} to {}: the source does not exist",
            src.display(),
            dst.display()
        )));
    }
    super::image::require_parent(dst, "clone")
}

/// See [`ImageTool::create_raw`].
pub(crate) fn create(path: &Path, size: u64, base: Option<&Path>) -> OsResult<()> {
    let existing = if path.exists() {
        Some(file_len(path)?)
    } else {
        None
    };
    if !check_create(path, size, base, existing)? {
        return Ok(());
    }
    let tmp = temp_beside(path)?;
    let made = (|| {
        match base {
            Some(base) => {
                reflink(base, &tmp)?;
                if file_len(&tmp)? > size {
                    return Err(OsError::Conflict(format!(
                        "raw base {} is larger than the {size}-byte replica {}",
                        base.display(),
                        path.display()
                    )));
                }
            }
            None => {
                fs::File::create(&tmp)
                    .map_err(|e| OsError::io(format!("creating {}", tmp.display()), e))?;
            }
        }
        set_len(&tmp, size)?;
        super::image::commit(&tmp, path)
    })();
    if made.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    made
}

/// See [`ImageTool::resize_raw`].
pub(crate) fn resize(path: &Path, new_size: u64) -> OsResult<()> {
    if !super::image::check_grow("raw replica", path, file_len(path)?, new_size)? {
        return Ok(());
    }
    set_len(path, new_size)?;
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| OsError::io(format!("syncing {}", path.display()), e))
}

/// See [`ImageTool::raw_size`].
pub(crate) fn size(path: &Path) -> OsResult<u64> {
    file_len(path)
}

/// See [`ImageTool::clone_raw`].
pub(crate) fn clone(src: &Path, dst: &Path) -> OsResult<()> {
    check_clone(src, dst)?;
    let tmp = temp_beside(dst)?;
    let made = reflink(src, &tmp).and_then(|()| super::image::commit(&tmp, dst));
    if made.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    made
}

/// `shares_blocks` probes a directory that exists: `NotFound` naming it otherwise. The fake
/// image tool (`super::fake`) calls it too.
pub(crate) fn check_probe_dir(dir: &Path) -> OsResult<()> {
    if dir.is_dir() {
        return Ok(());
    }
    Err(OsError::NotFound(format!(
        "cannot tell whether {} shares blocks: it is not a directory; create the disk's \
         directory first",
        dir.display()
    )))
}

/// See [`ImageTool::shares_blocks`].
pub(crate) fn shares_blocks(dir: &Path) -> OsResult<bool> {
    check_probe_dir(dir)?;
    let probe = dir.join(format!(
        ".reflink-probe-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let copy = probe.with_extension("clone");
    fs::write(&probe, b"bicsi reflink probe\n")
        .map_err(|e| OsError::io(format!("writing {}", probe.display()), e))?;
    let result = match reflink(&probe, &copy) {
        Ok(()) => Ok(true),
        Err(OsError::Unsupported(_)) => Ok(false),
        Err(e) => Err(e),
    };
    let _ = fs::remove_file(&copy);
    let _ = fs::remove_file(&probe);
    result
}

/// The raw expansion of a disk's backing image file `backing` (of `format`): `backing` itself
/// when it is raw already, else `backing.raw` beside it, made once per disk per image by
/// `qemu-img convert -f <format> -O raw` into the disk's `tmp_dir` and renamed into place when
/// complete (a crash leaves only a file in `tmp/`, which the disk's start-up cleanup removes).
/// Raw replicas are reflink clones of it and share its blocks without depending on it: removing
/// it, or the image's file, or the whole image, never breaks a volume. Blocking.
pub fn expand_backing(
    images: &dyn ImageTool,
    backing: &Path,
    format: ImageFormat,
    tmp_dir: &Path,
) -> OsResult<PathBuf> {
    if format == ImageFormat::Raw {
        return Ok(backing.to_path_buf());
    }
    let expanded = backing.with_extension("raw");
    if expanded.is_file() {
        return Ok(expanded);
    }
    fs::create_dir_all(tmp_dir)
        .map_err(|e| OsError::io(format!("creating {}", tmp_dir.display()), e))?;
    let dir_name = backing
        .parent()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tmp_dir.join(format!(
        "raw-{dir_name}-{}.raw",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let made = images
        .convert(backing, format, &tmp, ImageFormat::Raw)
        .and_then(|()| super::image::commit(&tmp, &expanded));
    if made.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    made.map(|()| expanded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_create_is_idempotent_grows_and_refuses_other_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().join("volume.raw");
        create(&r, 1 << 20, None).unwrap();
        create(&r, 1 << 20, None).unwrap();
        assert_eq!(size(&r).unwrap(), 1 << 20);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(&r).unwrap().blocks(), 0, "sparse");
        let e = create(&r, 2 << 20, None).unwrap_err();
        assert!(matches!(e, OsError::Conflict(_)), "{e}");
        resize(&r, 2 << 20).unwrap();
        assert_eq!(size(&r).unwrap(), 2 << 20);
        let e = resize(&r, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("only grow"), "{e}");
        let e = create(&dir.path().join("no/dir.raw"), 1, None).unwrap_err();
        assert!(e.to_string().contains("directory does not exist"), "{e}");
    }
}
