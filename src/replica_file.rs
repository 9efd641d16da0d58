//! A replica's file in its format: qcow2 for the `qemu` engine (an overlay on the disk's file of
//! the backing image), raw for the `loop` engine (a sparse file, or a reflink clone of the
//! disk's raw expansion of the backing image). Creating, growing and sizing a replica go through
//! here, so the callers (node agent, snapshots) never assume a format; which format a file has
//! comes from its record (`Replica::format`) or, for files bicsi named itself, from
//! `ImageFormat::of_file`, never from its content.
//!
//! It must not choose formats (that is `volume_engine`'s) nor place replicas.

use std::path::Path;

use crate::error::Result;
use crate::model::Replica;
use crate::os::{ImageFormat, Os};

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
    }
}

/// Grows the file at `path` of `format` to `size` (offline). Blocking.
pub fn resize(os: &Os, path: &Path, format: ImageFormat, size: u64) -> Result<()> {
    match format {
        ImageFormat::Qcow2 => Ok(os.images.resize(path, size)?),
        ImageFormat::Raw => Ok(os.images.resize_raw(path, size)?),
    }
}

/// The size of the volume the file at `path` of `format` holds. Blocking.
pub fn volume_size(os: &Os, path: &Path, format: ImageFormat) -> Result<u64> {
    match format {
        ImageFormat::Qcow2 => Ok(os.images.info(path)?.virtual_size),
        ImageFormat::Raw => Ok(os.images.raw_size(path)?),
    }
}
