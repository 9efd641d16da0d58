//! The fake `ImageTool`: replica and raw files as fake image files, with qemu's locks (an image
//! an engine or a replica server holds open cannot be resized or converted) simulated. Every
//! refusal the request alone decides comes from the real module's `check_*` functions.

use super::*;

/// The `Images` part of a fake machine.
pub(super) struct FakeImages(pub(super) Fake);

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
