//! The fake `ImageTool`: replica and raw files as fake image files, with qemu's locks (an image
//! an engine or a replica server holds open cannot be resized or converted) simulated. Every
//! refusal the request alone decides comes from the real module's `check_*` functions.

use super::*;
use crate::os::{image, rawfile};

/// The `Images` part of a fake machine.
pub(super) struct FakeImages(pub(super) Fake);

/// What `info` reports of a fake image.
fn info_of(path: &Path, img: &FakeImage) -> OsResult<ImageInfo> {
    let format = image::check_format(path, &img.format)?;
    Ok(ImageInfo {
        format,
        // What qemu reports of a raw file: its length in whole sectors.
        virtual_size: match format {
            ImageFormat::Raw => image::sectors_rounded(img.virtual_size),
            _ => img.virtual_size,
        },
        actual_size: fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        backing_file: img.backing.clone(),
    })
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
        let virtual_size = image::check_replica(path, size, backing)?;
        if path.exists() {
            let found = info_of(path, &read_image(path)?)?;
            return image::check_existing_replica(path, &found, size, backing);
        }
        image::require_parent(path, "replica")?;
        write_image(
            path,
            &FakeImage {
                format: "qcow2".into(),
                virtual_size,
                backing: backing.map(|(f, _)| f.to_path_buf()),
                backing_format: backing.map(|(_, f)| f.as_str().to_string()),
                fs: None,
            },
        )
    }

    fn resize(&self, path: &Path, new_size: u64) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("images.resize")?;
        image::check_image_path(path)?;
        let mut img = read_image(path)?;
        if !image::check_grow("image", path, img.virtual_size, new_size)? {
            return Ok(());
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
        image::check_image_path(path)?;
        info_of(path, &read_image(path)?)
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
        image::check_convert(src, dst)?;
        let image = resolve_parent(src);
        if w.engine_using(&image, None).is_some_and(|e| !e.read_only)
            || w.exported_as(&image).is_some()
        {
            return Err(lock_error("qemu-img convert", src));
        }
        let img = read_image(src)?;
        let (virtual_size, fs_) = if img.format == src_format.as_str() {
            (img.virtual_size, content_fs(src)?)
        } else if src_format == ImageFormat::Raw {
            // As qemu-img does: a file read as raw is its bytes, whatever they are (an image of
            // another format included), and no filesystem is in them.
            let len = fs::metadata(src)
                .map_err(|e| OsError::io(format!("image {}", src.display()), e))?
                .len();
            (len, None)
        } else {
            return Err(OsError::Command {
                cmd: format!("qemu-img convert -f {src_format} {}", src.display()),
                stderr: format!("Image is not in {src_format} format (it is {})", img.format),
            });
        };
        write_image(
            dst,
            &FakeImage {
                format: format.as_str().into(),
                virtual_size,
                backing: None,
                backing_format: None,
                fs: fs_,
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
        image::check_image_path(path)?;
        if let Some((file, _)) = backing {
            image::check_backing_path(path, file)?;
        }
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
        let existing = if path.exists() {
            Some(read_image(path)?.virtual_size)
        } else {
            None
        };
        if !rawfile::check_create(path, size, base, existing)? {
            return Ok(());
        }
        let fs_ = match base {
            Some(base) => {
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
        if !image::check_grow("raw replica", path, img.virtual_size, new_size)? {
            return Ok(());
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
        rawfile::check_clone(src, dst)?;
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
        rawfile::check_probe_dir(dir)?;
        Ok(w.shares_blocks(dir))
    }
}
