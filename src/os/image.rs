//! Disk images through `qemu-img`: create qcow2 replicas (optionally over a shared backing
//! file; the empty image itself is written by [`super::qcow2`]), grow them offline, read their
//! metadata (a plain qcow2 header is read directly, [`native_info`]; anything else is asked of
//! `qemu-img info`), and flatten a volume into a standalone image.
//!
//! It must not download, checksum or place images (the domain does), and it never resizes an image
//! an engine has open: qemu's image locks refuse that, and the error says to stop the engine.
//! New files appear only when complete (written under a temporary name, fsynced, renamed), so a
//! crash never leaves a half-made replica that a retry would mistake for a finished one.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use super::{
    ImageFormat, ImageInfo, ImageTool, OsError, OsResult, command_error, output, utf8_path,
};

/// The real `qemu-img` of this machine.
#[derive(Clone, Debug, Default)]
pub struct QemuImg;

impl QemuImg {
    pub fn new() -> QemuImg {
        QemuImg
    }
}

/// The fields of `qemu-img info --output=json` we use.
#[derive(Deserialize)]
struct QemuImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    actual_size: u64,
    #[serde(rename = "full-backing-filename")]
    full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
}

/// qemu counts a disk in 512-byte sectors: the virtual size it reports of a raw file, and gives
/// a new qcow2 image, is the length rounded up to a whole sector. The fake follows it too.
pub(crate) fn sectors_rounded(len: u64) -> u64 {
    len.div_ceil(512) * 512
}

/// The format of the image at `path` as qemu names it: raw or qcow2, else `Unsupported` with
/// the fix. The fake image tool (`super::fake`) calls it too.
pub(crate) fn check_format(path: &Path, name: &str) -> OsResult<ImageFormat> {
    ImageFormat::parse(name).ok_or_else(|| {
        OsError::Unsupported(format!(
            "image {} is in format {name:?}; only raw and qcow2 are supported, convert it with \
             `qemu-img convert -O qcow2`",
            path.display(),
        ))
    })
}

pub(crate) fn parse_info(path: &Path, json: &str) -> OsResult<ImageInfo> {
    let raw: QemuImgInfo = serde_json::from_str(json).map_err(|e| {
        OsError::Other(format!(
            "cannot parse `qemu-img info` output for {}: {e}",
            path.display()
        ))
    })?;
    Ok(ImageInfo {
        format: check_format(path, &raw.format)?,
        virtual_size: raw.virtual_size,
        actual_size: raw.actual_size,
        backing_file: raw
            .full_backing_filename
            .or(raw.backing_filename)
            .map(PathBuf::from),
    })
}

/// What `qemu-img info` says of a plain qcow2 image, read from its header without a process:
/// None (ask qemu-img) for anything else: a raw file, a header that is not version 2 or 3, an
/// encrypted or corrupt image, one with an external data file, a backing file name that is not
/// a plain path (a protocol or `json:` name) or not UTF-8, and any read error. The backing
/// file is resolved as qemu resolves it (a relative name against the image's directory, as the
/// path was given) and the actual size is the file's allocated blocks, as qemu reports them.
/// The test `native_info_matches_qemu_img_info` holds it to qemu-img's answers.
pub(crate) fn native_info(path: &Path) -> Option<ImageInfo> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    const MAGIC: &[u8] = b"QFI\xfb";
    // qemu's limit on the backing file name.
    const MAX_NAME: u32 = 1023;
    let mut file = File::open(path).ok()?;
    let mut header = [0u8; 104];
    let mut got = 0;
    while got < header.len() {
        match file.read(&mut header[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => return None,
        }
    }
    if got < 72 || &header[..4] != MAGIC {
        return None;
    }
    let u32_at = |o: usize| u32::from_be_bytes(header[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_be_bytes(header[o..o + 8].try_into().unwrap());
    let version = u32_at(4);
    let (backing_offset, backing_len) = (u64_at(8), u32_at(16));
    let virtual_size = u64_at(24);
    let encrypted = u32_at(32) != 0;
    if !(version == 2 || version == 3) || encrypted {
        return None;
    }
    if version == 3 {
        if got < 104 {
            return None;
        }
        // Incompatible features: bit 1 corrupt, bit 2 external data file; any unknown bit.
        let incompatible = u64_at(72);
        if incompatible & !0b1_1001 != 0 {
            return None;
        }
    }
    let backing_file = if backing_offset == 0 {
        None
    } else {
        if backing_len == 0 || backing_len > MAX_NAME {
            return None;
        }
        let mut name = vec![0u8; backing_len as usize];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut name, backing_offset).ok()?;
        let name = String::from_utf8(name).ok()?;
        if name.contains(':') || name.contains('\0') {
            return None;
        }
        let name = PathBuf::from(name);
        Some(if name.is_absolute() {
            name
        } else {
            path.parent().unwrap_or(Path::new("")).join(name)
        })
    };
    let meta = file.metadata().ok()?;
    Some(ImageInfo {
        format: ImageFormat::Qcow2,
        virtual_size,
        actual_size: meta.blocks() * 512,
        backing_file,
    })
}

/// Kills the `qemu-img` processes that write under `dir` and are not this process's children:
/// ones an earlier bicsi started before it was killed (a kill -9 does not reach its children),
/// which would otherwise go on writing into `dir` after the new process cleaned it up, and
/// rename their output over the file a restarted export writes. Returns how many it stopped.
pub fn kill_stray_jobs(dir: &Path) -> usize {
    let prefix = format!("{}/", dir.display());
    let me = std::process::id().to_string();
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Some(args) = super::engine::read_cmdline(pid) else {
            continue;
        };
        let is_qemu_img = args
            .first()
            .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == "qemu-img"));
        if !is_qemu_img || !args.iter().any(|a| a.starts_with(&prefix)) {
            continue;
        }
        // The parent pid is the 4th field of /proc/PID/stat, after "pid (comm) state".
        let parent = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|st| {
                st.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string))
            });
        if parent.as_deref() == Some(me.as_str()) {
            continue;
        }
        let target = nix::unistd::Pid::from_raw(pid);
        if nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL).is_ok() {
            tracing::warn!(pid, dir = %dir.display(), "stopped a qemu-img left running by an earlier bicsi");
            killed.push(pid);
        }
    }
    // Gone before the caller removes what they wrote.
    for pid in &killed {
        for _ in 0..100 {
            if !super::engine::alive(*pid) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    killed.len()
}

/// `.<name>.tmp-<pid>` beside `path`: same directory (so the rename is atomic), hidden, and
/// distinct per process so two agents never write the same temporary file.
fn temp_path(path: &Path) -> OsResult<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| OsError::Unsupported(format!("{} does not name a file", path.display())))?;
    Ok(path.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// fsync the file, rename it into place, fsync the directory: the file is there whole or not at
/// all, even across a power cut.
pub(crate) fn commit(tmp: &Path, path: &Path) -> OsResult<()> {
    let sync = |p: &Path| {
        File::open(p)
            .and_then(|f| f.sync_all())
            .map_err(|e| OsError::io(format!("syncing {}", p.display()), e))
    };
    sync(tmp)?;
    fs::rename(tmp, path).map_err(|e| {
        OsError::io(
            format!("renaming {} to {}", tmp.display(), path.display()),
            e,
        )
    })?;
    if let Some(dir) = path.parent() {
        sync(dir)?;
    }
    Ok(())
}

/// The directory a new file goes into must exist: `NotFound` naming it otherwise.
pub(crate) fn require_parent(path: &Path, what: &str) -> OsResult<()> {
    match path.parent() {
        Some(dir) if dir.as_os_str().is_empty() || dir.is_dir() => Ok(()),
        Some(dir) => Err(OsError::NotFound(format!(
            "cannot create {what} {}: directory {} does not exist; create it first",
            path.display(),
            dir.display()
        ))),
        None => Err(OsError::Unsupported(format!(
            "{} does not name a file",
            path.display()
        ))),
    }
}

// The checks of the requests below that need no qemu: the fake image tool (`super::fake`)
// calls the same functions, so it refuses exactly what this one refuses.

/// A backing file is named by an absolute path: qemu resolves a relative one against the
/// image's directory, which is not what the caller meant.
pub(crate) fn check_backing_path(image: &Path, backing: &Path) -> OsResult<()> {
    if backing.is_absolute() {
        return Ok(());
    }
    Err(OsError::Unsupported(format!(
        "backing file {} of {} must be an absolute path (qemu resolves a relative one against \
         the image's directory)",
        backing.display(),
        image.display()
    )))
}

/// What `create_replica` refuses before looking at `path`: a backing file that is relative or
/// missing, and a size or backing name qcow2 cannot hold (`super::qcow2::check_image`).
/// Returns the virtual size the image gets (`size` rounded up to 512, as qemu does).
pub(crate) fn check_replica(
    path: &Path,
    size: u64,
    backing: Option<(&Path, ImageFormat)>,
) -> OsResult<u64> {
    if let Some((file, _)) = backing {
        check_backing_path(path, file)?;
        if !file.exists() {
            return Err(OsError::NotFound(format!(
                "backing file {} of replica {} does not exist; prepare the backing image on \
                 this disk first",
                file.display(),
                path.display()
            )));
        }
    }
    super::qcow2::check_image(size, backing)
}

/// `create_replica` of a `path` that exists already, as `found`: Ok when it is the replica
/// asked for (qcow2, `size` bytes, that backing file), else `Conflict`. The size is compared as
/// asked, not rounded: a replica created with a size that is not a multiple of 512 has the
/// rounded size, so asking for it again with the same size is a `Conflict`.
pub(crate) fn check_existing_replica(
    path: &Path,
    found: &ImageInfo,
    size: u64,
    backing: Option<(&Path, ImageFormat)>,
) -> OsResult<()> {
    let want_backing = backing.map(|(f, _)| f.to_path_buf());
    if found.format == ImageFormat::Qcow2
        && found.virtual_size == size
        && found.backing_file == want_backing
    {
        return Ok(());
    }
    Err(OsError::Conflict(format!(
        "replica {} already exists as {} of {} bytes with backing {:?}, but {} bytes with \
         backing {:?} was asked; delete it or use another path",
        path.display(),
        found.format,
        found.virtual_size,
        found.backing_file,
        size,
        want_backing
    )))
}

/// An image that is read or changed in place must exist (`NotFound`) and have a UTF-8 path
/// (`Unsupported`: qemu's options need one).
pub(crate) fn check_image_path(path: &Path) -> OsResult<()> {
    if !path.exists() {
        return Err(OsError::NotFound(format!(
            "image {} does not exist",
            path.display()
        )));
    }
    utf8_path(path).map(drop)
}

/// Growing `what` at `path` from `current` to `new` bytes: Ok(false) when it has that size
/// already, Ok(true) when it grows, `Unsupported` when it would shrink (volumes only grow).
pub(crate) fn check_grow(what: &str, path: &Path, current: u64, new: u64) -> OsResult<bool> {
    if new < current {
        return Err(OsError::Unsupported(format!(
            "cannot shrink {what} {} from {current} to {new} bytes: volumes only grow",
            path.display()
        )));
    }
    Ok(new > current)
}

/// `convert` writes a new `dst` from an existing `src`: `Conflict` when `dst` exists,
/// `NotFound` when `src` or `dst`'s directory does not.
pub(crate) fn check_convert(src: &Path, dst: &Path) -> OsResult<()> {
    if dst.exists() {
        return Err(OsError::Conflict(format!(
            "cannot convert {} into {}: the destination already exists; delete it or choose \
             another path",
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
    require_parent(dst, "image")
}

/// Run qemu-img; on failure, point at the usual cause when qemu's image locks refused.
fn qemu_img(cmd: &mut Command, path: &Path) -> OsResult<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hint = stderr.contains("lock").then(|| {
            format!(
                "another process (usually the volume's engine) has {} open; stop the engine \
                 (detach the volume) and retry",
                path.display()
            )
        });
        return Err(command_error(cmd, &out, hint.as_deref()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl ImageTool for QemuImg {
    fn create_replica(
        &self,
        path: &Path,
        size: u64,
        backing: Option<(&Path, ImageFormat)>,
    ) -> OsResult<()> {
        check_replica(path, size, backing)?;
        if path.exists() {
            return check_existing_replica(path, &self.info(path)?, size, backing);
        }
        require_parent(path, "replica")?;
        let tmp = temp_path(path)?;
        let _ = fs::remove_file(&tmp);
        // Written directly, not by `qemu-img create`: the same layout without a process spawn
        // per replica (see qcow2.rs, whose tests prove it with `qemu-img check`).
        let result = super::qcow2::create(&tmp, size, backing).and_then(|()| commit(&tmp, path));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn resize(&self, path: &Path, new_size: u64) -> OsResult<()> {
        let info = self.info(path)?;
        if !check_grow("image", path, info.virtual_size, new_size)? {
            return Ok(());
        }
        let mut cmd = Command::new("qemu-img");
        cmd.args(["resize", "-q", "-f", info.format.as_str()])
            .arg(path)
            .arg(new_size.to_string());
        qemu_img(&mut cmd, path).map(|_| ())
    }

    fn info(&self, path: &Path) -> OsResult<ImageInfo> {
        check_image_path(path)?;
        // A plain qcow2 header is read here: a qemu-img process costs 15-50 ms, a few of which
        // made up most of what a rebuild spends beside its copy and compare.
        if let Some(info) = native_info(path) {
            return Ok(info);
        }
        // -U (force-share): read the metadata even while an engine holds the image's write lock.
        let mut cmd = Command::new("qemu-img");
        cmd.args(["info", "-U", "--output=json"]).arg(path);
        let json = qemu_img(&mut cmd, path)?;
        parse_info(path, &json)
    }

    fn convert(
        &self,
        src: &Path,
        src_format: ImageFormat,
        dst: &Path,
        format: ImageFormat,
    ) -> OsResult<()> {
        check_convert(src, dst)?;
        let tmp = temp_path(dst)?;
        let _ = fs::remove_file(&tmp);
        // No -U: the copy must be consistent, so qemu's locks refuse while an engine writes.
        let mut cmd = Command::new("qemu-img");
        cmd.args([
            "convert",
            "-q",
            "-f",
            src_format.as_str(),
            "-O",
            format.as_str(),
        ])
        .arg(src)
        .arg(&tmp);
        let result = qemu_img(&mut cmd, src).and_then(|_| commit(&tmp, dst));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
    fn rebase(
        &self,
        path: &Path,
        backing: Option<(&Path, ImageFormat)>,
        safe: bool,
    ) -> OsResult<()> {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["rebase", "-q", "-f", "qcow2"]);
        if !safe {
            cmd.arg("-u");
        }
        check_image_path(path)?;
        match backing {
            Some((file, format)) => {
                check_backing_path(path, file)?;
                cmd.arg("-b").arg(file).arg("-F").arg(format.as_str());
            }
            None => {
                cmd.args(["-b", ""]);
            }
        }
        cmd.arg(path);
        qemu_img(&mut cmd, path)?;
        File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| OsError::io(format!("syncing {}", path.display()), e))
    }

    fn create_raw(&self, path: &Path, size: u64, base: Option<&Path>) -> OsResult<()> {
        super::rawfile::create(path, size, base)
    }

    fn resize_raw(&self, path: &Path, new_size: u64) -> OsResult<()> {
        super::rawfile::resize(path, new_size)
    }

    fn raw_size(&self, path: &Path) -> OsResult<u64> {
        super::rawfile::size(path)
    }

    fn clone_raw(&self, src: &Path, dst: &Path) -> OsResult<()> {
        super::rawfile::clone(src, dst)
    }

    fn shares_blocks(&self, dir: &Path) -> OsResult<bool> {
        super::rawfile::shares_blocks(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A qemu-img whose parent is gone (as after a kill -9 of bicsi) and that works under the
    /// directory is stopped; one that works elsewhere is left alone.
    #[test]
    fn stray_qemu_img_jobs_under_a_directory_are_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, other) = (dir.path().join("tmp"), dir.path().join("other"));
        let mut pids = Vec::new();
        for d in [&ours, &other] {
            fs::create_dir_all(d).unwrap();
            let img = d.join("x.raw");
            File::create(&img).unwrap().set_len(1 << 20).unwrap();
            // `sh` starts it in the background and exits: its parent is no longer this process.
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "qemu-img bench -q -c 2000000000 -d 1 -f raw {} >/dev/null 2>&1 & echo $!",
                    img.display()
                ))
                .output()
                .unwrap();
            let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            pids.push(pid);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(super::super::engine::alive(pids[0]) && super::super::engine::alive(pids[1]));
        assert_eq!(kill_stray_jobs(&ours), 1);
        assert!(
            !super::super::engine::alive(pids[0]),
            "the stray job still runs"
        );
        assert!(
            super::super::engine::alive(pids[1]),
            "a job elsewhere was stopped"
        );
        assert_eq!(kill_stray_jobs(&ours), 0);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pids[1]),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    /// The header read without a process says what `qemu-img info` says, for the images bicsi
    /// makes and meets: qcow2 v3 and v2 (compat=0.10), over no backing file, an absolute and a
    /// relative one, grown, zstd-compressed clusters, with data written, bicsi's own, a raw
    /// backing of a qcow2; and it leaves to qemu-img what it cannot read (raw, encrypted-like
    /// or corrupt-flagged headers, a protocol backing name).
    #[test]
    fn native_info_matches_qemu_img_info() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let run = |args: &[&str]| {
            let out = Command::new("qemu-img")
                .args(args)
                .current_dir(d)
                .output()
                .unwrap();
            assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
        };
        let qemu_info = |path: &Path| {
            let out = Command::new("qemu-img")
                .args(["info", "-U", "--output=json"])
                .arg(path)
                .current_dir(d)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            parse_info(path, &String::from_utf8_lossy(&out.stdout)).unwrap()
        };
        run(&["create", "-q", "-f", "raw", "base.raw", "64M"]);
        run(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
        let base_raw = d.join("base.raw");
        run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base_raw.to_str().unwrap(),
            "-F",
            "raw",
            "abs.qcow2",
        ]);
        run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "rel.qcow2",
            "128M",
        ]);
        run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "3G",
        ]);
        run(&["create", "-q", "-f", "qcow2", "grown.qcow2", "1M"]);
        run(&["resize", "-q", "grown.qcow2", "10G"]);
        run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "zstd.qcow2",
            "8M",
        ]);
        let data = fs::File::create(d.join("data.raw")).unwrap();
        data.set_len(32 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&data, &[7u8; 3 << 20], 1 << 20).unwrap();
        run(&[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "data.raw",
            "written.qcow2",
        ]);
        let ours =
            crate::os::qcow2::empty_image(5 << 20, Some((&base_raw, ImageFormat::Raw))).unwrap();
        fs::write(d.join("ours.qcow2"), ours).unwrap();
        let mut checked = 0;
        for name in [
            "base.qcow2",
            "abs.qcow2",
            "rel.qcow2",
            "v2.qcow2",
            "grown.qcow2",
            "zstd.qcow2",
            "written.qcow2",
            "ours.qcow2",
        ] {
            let path = d.join(name);
            let native = native_info(&path).unwrap_or_else(|| panic!("{name}: not read natively"));
            assert_eq!(native, qemu_info(&path), "{name}");
            checked += 1;
        }
        assert_eq!(checked, 8);
        let rel = native_info(&d.join("rel.qcow2")).unwrap();
        assert_eq!(rel.backing_file, Some(d.join("base.qcow2")));
        assert_eq!(rel.virtual_size, 128 << 20);
        // Left to qemu-img.
        assert!(native_info(&base_raw).is_none(), "raw");
        let mut bytes = fs::read(d.join("base.qcow2")).unwrap();
        bytes[79] |= 2; // the corrupt bit
        fs::write(d.join("corrupt.qcow2"), &bytes).unwrap();
        assert!(native_info(&d.join("corrupt.qcow2")).is_none(), "corrupt");
        let mut bytes = fs::read(d.join("base.qcow2")).unwrap();
        bytes[35] = 1; // crypt_method AES
        fs::write(d.join("aes.qcow2"), &bytes).unwrap();
        assert!(native_info(&d.join("aes.qcow2")).is_none(), "encrypted");
        run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nbd://127.0.0.1:1/x",
            "-F",
            "raw",
            "nbd.qcow2",
            "1M",
        ]);
        assert!(
            native_info(&d.join("nbd.qcow2")).is_none(),
            "protocol backing"
        );
        assert!(native_info(&d.join("missing.qcow2")).is_none());
        // And `info` itself goes on answering for what is left to qemu-img.
        assert_eq!(
            QemuImg::new().info(&base_raw).unwrap().format,
            ImageFormat::Raw
        );
        assert_eq!(
            QemuImg::new()
                .info(&d.join("nbd.qcow2"))
                .unwrap()
                .virtual_size,
            1 << 20
        );
    }

    #[test]
    fn parse_info_table() {
        let p = Path::new("/x");
        let qcow = r#"{"virtual-size": 67108864, "filename": "ov.qcow2", "format": "qcow2",
            "actual-size": 200704, "backing-filename-format": "raw",
            "full-backing-filename": "/d/base.raw", "backing-filename": "base.raw"}"#;
        assert_eq!(
            parse_info(p, qcow).unwrap(),
            ImageInfo {
                format: ImageFormat::Qcow2,
                virtual_size: 67108864,
                actual_size: 200704,
                backing_file: Some("/d/base.raw".into())
            }
        );
        let raw = r#"{"virtual-size": 1024, "format": "raw"}"#;
        let info = parse_info(p, raw).unwrap();
        assert_eq!(
            (info.format, info.actual_size, info.backing_file),
            (ImageFormat::Raw, 0, None)
        );
        let vmdk = r#"{"virtual-size": 1024, "format": "vmdk"}"#;
        let err = parse_info(p, vmdk).unwrap_err();
        assert!(matches!(err, OsError::Unsupported(_)), "{err}");
        assert!(err.to_string().contains("qemu-img convert"), "{err}");
        assert!(parse_info(p, "not json").is_err());
    }

    #[test]
    fn replica_over_raw_backing_is_idempotent_and_grows() {
        let dir = tempfile::tempdir().unwrap();
        let img = QemuImg::new();
        let base = dir.path().join("backing");
        let mut f = File::create(&base).unwrap();
        f.write_all(&[7u8; 65536]).unwrap();
        f.set_len(1 << 20).unwrap();
        let base_info = img.info(&base).unwrap();
        assert_eq!(base_info.format, ImageFormat::Raw);
        assert_eq!(base_info.virtual_size, 1 << 20);

        let replica = dir.path().join("replica.qcow2");
        let backing = Some((base.as_path(), ImageFormat::Raw));
        img.create_replica(&replica, 4 << 20, backing).unwrap();
        img.create_replica(&replica, 4 << 20, backing).unwrap();
        let info = img.info(&replica).unwrap();
        assert_eq!(info.format, ImageFormat::Qcow2);
        assert_eq!(info.virtual_size, 4 << 20);
        assert_eq!(info.backing_file, Some(base.clone()));
        assert!(info.actual_size < 1 << 20, "qcow2 is sparse: {info:?}");
        // No temporary file left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        let err = img.create_replica(&replica, 8 << 20, backing).unwrap_err();
        assert!(matches!(err, OsError::Conflict(_)), "{err}");
        let err = img.create_replica(&replica, 4 << 20, None).unwrap_err();
        assert!(matches!(err, OsError::Conflict(_)), "{err}");

        img.resize(&replica, 8 << 20).unwrap();
        img.resize(&replica, 8 << 20).unwrap();
        assert_eq!(img.info(&replica).unwrap().virtual_size, 8 << 20);
        let err = img.resize(&replica, 1 << 20).unwrap_err();
        assert!(matches!(err, OsError::Unsupported(_)), "{err}");

        // Flattening keeps the backing content and drops the backing file.
        let flat = dir.path().join("flat.raw");
        img.convert(&replica, ImageFormat::Qcow2, &flat, ImageFormat::Raw)
            .unwrap();
        let flat_info = img.info(&flat).unwrap();
        assert_eq!(
            (
                flat_info.format,
                flat_info.virtual_size,
                flat_info.backing_file
            ),
            (ImageFormat::Raw, 8 << 20, None)
        );
        let bytes = fs::read(&flat).unwrap();
        assert!(bytes[..65536].iter().all(|b| *b == 7));
        assert!(bytes[65536..].iter().all(|b| *b == 0));
        assert!(matches!(
            img.convert(&replica, ImageFormat::Qcow2, &flat, ImageFormat::Raw),
            Err(OsError::Conflict(_))
        ));
        let q = dir.path().join("flat.qcow2");
        img.convert(&replica, ImageFormat::Qcow2, &q, ImageFormat::Qcow2)
            .unwrap();
        assert_eq!(img.info(&q).unwrap().format, ImageFormat::Qcow2);
    }

    #[test]
    fn replica_errors_name_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let img = QemuImg::new();
        let err = img
            .create_replica(
                &dir.path().join("r"),
                1 << 20,
                Some((Path::new("relative"), ImageFormat::Raw)),
            )
            .unwrap_err();
        assert!(matches!(err, OsError::Unsupported(_)), "{err}");
        let err = img
            .create_replica(
                &dir.path().join("r"),
                1 << 20,
                Some((&dir.path().join("missing"), ImageFormat::Raw)),
            )
            .unwrap_err();
        assert!(matches!(err, OsError::NotFound(_)), "{err}");
        let err = img
            .create_replica(&dir.path().join("no/such/dir/r"), 1 << 20, None)
            .unwrap_err();
        assert!(err.to_string().contains("create it first"), "{err}");
        assert!(matches!(
            img.info(&dir.path().join("missing")),
            Err(OsError::NotFound(_))
        ));
    }
}
