//! Empty qcow2 images written directly, without spawning `qemu-img create`: the header, the
//! backing file and its format, a refcount table with one refcount block, and an all-zero L1
//! table. That is all an empty image holds, and it is what `qemu-img create -f qcow2` (10.0,
//! default options) lays out: version 3, 64 KiB clusters, 16-bit refcounts, zlib compression
//! type, no lazy refcounts, no extended L2 entries, no preallocation. A process spawn costs
//! 10–40 ms here; this costs one small write, which is what lets CreateVolume keep up with
//! many clients.
//!
//! It must not read, grow or repair images: everything else stays with `qemu-img` (see
//! [`super::image`]). The tests prove each layout with `qemu-img check` and `qemu-img info`.
//!
//! Layout (clusters of 64 KiB): 0 header, its extensions and the backing file name; 1 refcount
//! table; 2 refcount block; 3… L1 table (its size rounded up to whole entries, the file ends
//! there). The refcount block covers 32768 clusters, far more than any L1 table needs.

use std::io::Write;
use std::path::Path;

use super::{ImageFormat, OsError, OsResult, utf8_path};

const MAGIC: u32 = 0x5146_49fb;
const VERSION: u32 = 3;
const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// 16-bit refcounts.
const REFCOUNT_ORDER: u32 = 4;
/// Version 3 header with the compression type byte, padded to 8 bytes.
const HEADER_LEN: u32 = 112;
/// Header extension: the backing file's format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// qemu refuses backing file names longer than this.
const MAX_BACKING_NAME: usize = 1023;
const REFTABLE_OFFSET: u64 = CLUSTER;
const REFBLOCK_OFFSET: u64 = 2 * CLUSTER;
const L1_OFFSET: u64 = 3 * CLUSTER;
/// Guest bytes one L2 table maps: CLUSTER / 8 entries of one cluster each.
const L2_COVERS: u64 = (CLUSTER / 8) * CLUSTER;
/// Clusters one refcount block counts (2-byte entries).
const REFBLOCK_ENTRIES: u64 = CLUSTER / 2;

/// What an empty qcow2 image of `size` guest bytes over `backing` can be: its virtual size
/// (`size` rounded up to 512, as qemu does), or `Unsupported` for a size beyond the layout
/// below or a backing file name qemu would refuse (not UTF-8, longer than its 1023 bytes). The
/// fake image tool (`super::fake`) calls it too.
pub(crate) fn check_image(size: u64, backing: Option<(&Path, ImageFormat)>) -> OsResult<u64> {
    let size = super::image::sectors_rounded(size);
    let l1_entries = size.div_ceil(L2_COVERS);
    let clusters = 3 + (l1_entries * 8).div_ceil(CLUSTER);
    if clusters > REFBLOCK_ENTRIES || l1_entries > u64::from(u32::MAX) {
        return Err(OsError::Unsupported(format!(
            "a qcow2 image of {size} bytes is larger than bicsi creates; ask for a smaller volume"
        )));
    }
    if let Some((path, _)) = backing {
        let name = utf8_path(path)?;
        if name.len() > MAX_BACKING_NAME {
            return Err(OsError::Unsupported(format!(
                "backing file path {name} is longer than qemu's {MAX_BACKING_NAME} bytes; use a \
                 shorter disk path"
            )));
        }
    }
    Ok(size)
}

/// The bytes of an empty qcow2 image of `size` guest bytes (rounded up to 512, as qemu does),
/// optionally over `backing` (an absolute path) of the given format.
pub fn empty_image(size: u64, backing: Option<(&Path, ImageFormat)>) -> OsResult<Vec<u8>> {
    let size = check_image(size, backing)?;
    let l1_entries = size.div_ceil(L2_COVERS);
    let l1_bytes = l1_entries * 8;
    let l1_clusters = l1_bytes.div_ceil(CLUSTER);
    let clusters = 3 + l1_clusters;
    let (name, format) = match backing {
        Some((path, format)) => (utf8_path(path)?.as_bytes(), format.as_str().as_bytes()),
        None => (&[][..], &[][..]),
    };
    // Extensions follow the header, each padded to 8 bytes; the backing file name follows them.
    let mut ext = Vec::new();
    if backing.is_some() {
        ext.extend(EXT_BACKING_FORMAT.to_be_bytes());
        ext.extend((format.len() as u32).to_be_bytes());
        ext.extend(format);
        ext.resize(ext.len().next_multiple_of(8), 0);
    }
    ext.extend([0u8; 8]); // end of the extensions
    let name_offset = u64::from(HEADER_LEN) + ext.len() as u64;

    let len = if l1_entries == 0 {
        L1_OFFSET
    } else {
        L1_OFFSET + l1_bytes
    };
    let mut img = vec![0u8; len as usize];
    let mut h = Vec::with_capacity(HEADER_LEN as usize);
    h.extend(MAGIC.to_be_bytes());
    h.extend(VERSION.to_be_bytes());
    h.extend((if backing.is_some() { name_offset } else { 0 }).to_be_bytes());
    h.extend((name.len() as u32).to_be_bytes());
    h.extend(CLUSTER_BITS.to_be_bytes());
    h.extend(size.to_be_bytes());
    h.extend(0u32.to_be_bytes()); // no encryption
    h.extend((l1_entries as u32).to_be_bytes());
    h.extend((if l1_entries == 0 { 0 } else { L1_OFFSET }).to_be_bytes());
    h.extend(REFTABLE_OFFSET.to_be_bytes());
    h.extend(1u32.to_be_bytes()); // refcount table clusters
    h.extend(0u32.to_be_bytes()); // snapshots
    h.extend(0u64.to_be_bytes()); // snapshots offset
    h.extend(0u64.to_be_bytes()); // incompatible features
    h.extend(0u64.to_be_bytes()); // compatible features
    h.extend(0u64.to_be_bytes()); // autoclear features
    h.extend(REFCOUNT_ORDER.to_be_bytes());
    h.extend(HEADER_LEN.to_be_bytes());
    h.push(0); // compression type: zlib
    h.resize(HEADER_LEN as usize, 0);
    h.extend(&ext);
    h.extend(name);
    img[..h.len()].copy_from_slice(&h);

    // The refcount table's one entry points at the refcount block, which counts the header,
    // the table, the block itself and the L1 table's clusters once each.
    let rt = REFTABLE_OFFSET as usize;
    img[rt..rt + 8].copy_from_slice(&REFBLOCK_OFFSET.to_be_bytes());
    let counted = if l1_entries == 0 { 3 } else { clusters };
    for c in 0..counted as usize {
        let at = REFBLOCK_OFFSET as usize + 2 * c;
        img[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    Ok(img)
}

/// Writes an empty qcow2 image to the new file `path` (it must not exist); the caller makes it
/// durable and moves it into place (`image::commit`).
pub fn create(path: &Path, size: u64, backing: Option<(&Path, ImageFormat)>) -> OsResult<()> {
    let img = empty_image(size, backing)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| OsError::io(format!("creating {}", path.display()), e))?;
    f.write_all(&img)
        .map_err(|e| OsError::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Command;

    use super::*;
    use crate::os::ImageTool;
    use crate::os::image::QemuImg;

    fn qemu_img_present(test: &str) -> bool {
        let ok = Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("{test}: skipped: qemu-img is not installed (Debian package qemu-utils)");
        }
        ok
    }

    fn qemu_img(args: &[&str]) -> (bool, String) {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn info(path: &Path) -> serde_json::Value {
        let (ok, out) = qemu_img(&["info", "--output=json", path.to_str().unwrap()]);
        assert!(ok, "qemu-img info {}: {out}", path.display());
        serde_json::from_str(&out).unwrap()
    }

    /// qemu-img check finds no error and no leak, and qemu-img info reads back what qemu-img
    /// create would have made, for sizes across L1 and refcount boundaries, with and without a
    /// backing file of either format.
    #[test]
    fn images_pass_qemu_img_check_and_match_qemu_img_create() {
        if !qemu_img_present("images_pass_qemu_img_check_and_match_qemu_img_create") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("base.raw");
        std::fs::File::create(&raw)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let qcow = dir.path().join("base.qcow2");
        let (ok, out) = qemu_img(&["create", "-q", "-f", "qcow2", qcow.to_str().unwrap(), "8M"]);
        assert!(ok, "{out}");
        let sizes = [
            0,
            1000,
            1 << 20,
            (1 << 30) + 512,
            L2_COVERS,
            L2_COVERS + 1,
            5 << 40,
            (1u64 << 49) + 3,
        ];
        let backings: [Option<(PathBuf, ImageFormat)>; 3] = [
            None,
            Some((raw.clone(), ImageFormat::Raw)),
            Some((qcow.clone(), ImageFormat::Qcow2)),
        ];
        for (i, size) in sizes.iter().enumerate() {
            for (j, backing) in backings.iter().enumerate() {
                let ours = dir.path().join(format!("ours-{i}-{j}.qcow2"));
                let theirs = dir.path().join(format!("theirs-{i}-{j}.qcow2"));
                let b = backing.as_ref().map(|(p, f)| (p.as_path(), *f));
                create(&ours, *size, b).unwrap();
                let mut args = vec!["create", "-q", "-f", "qcow2"];
                if let Some((p, f)) = backing {
                    args.extend(["-b", p.to_str().unwrap(), "-F", f.as_str()]);
                }
                let size_s = size.to_string();
                args.extend([theirs.to_str().unwrap(), &size_s]);
                let (ok, out) = qemu_img(&args);
                assert!(ok, "{out}");

                let (ok, out) = qemu_img(&["check", ours.to_str().unwrap()]);
                assert!(
                    ok,
                    "size {size}, backing {backing:?}: qemu-img check: {out}"
                );
                assert!(out.contains("No errors were found"), "{out}");
                assert!(!out.contains("leaked"), "{out}");

                let (a, b) = (info(&ours), info(&theirs));
                for key in [
                    "format",
                    "virtual-size",
                    "cluster-size",
                    "backing-filename",
                    "full-backing-filename",
                    "backing-filename-format",
                ] {
                    assert_eq!(a[key], b[key], "size {size}, backing {backing:?}: {key}");
                }
                for key in [
                    "compat",
                    "refcount-bits",
                    "compression-type",
                    "lazy-refcounts",
                ] {
                    assert_eq!(
                        a["format-specific"]["data"][key], b["format-specific"]["data"][key],
                        "size {size}, backing {backing:?}: {key}"
                    );
                }
                assert_eq!(
                    std::fs::metadata(&ours).unwrap().len(),
                    std::fs::metadata(&theirs).unwrap().len(),
                    "size {size}: file length"
                );
                // The parsed info is what the rest of bicsi reads back.
                let parsed = QemuImg::new().info(&ours).unwrap();
                assert_eq!(parsed.format, ImageFormat::Qcow2);
                assert_eq!(parsed.virtual_size, size.div_ceil(512) * 512);
                assert_eq!(
                    parsed.backing_file,
                    backing.as_ref().map(|(p, _)| p.clone())
                );
            }
        }
    }

    /// Data written through qemu lands in the image and reads back; unwritten ranges show the
    /// backing file.
    #[test]
    fn written_data_reads_back_over_the_backing_file() {
        if !qemu_img_present("written_data_reads_back_over_the_backing_file") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("base.raw");
        let base: Vec<u8> = (0..(4 << 20)).map(|i: u32| (i % 251) as u8).collect();
        std::fs::write(&raw, &base).unwrap();
        let img = dir.path().join("v.qcow2");
        create(&img, 4 << 20, Some((&raw, ImageFormat::Raw))).unwrap();
        // Write 64 KiB at 1 MiB through qemu's qcow2 driver, then flatten and compare.
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0xab 1M 64k"])
            .arg(&img)
            .output()
            .expect("qemu-io (Debian package qemu-utils) runs");
        assert!(out.status.success(), "qemu-io: {out:?}");
        let (ok, out) = qemu_img(&["check", img.to_str().unwrap()]);
        assert!(ok, "{out}");
        let flat = dir.path().join("flat.raw");
        let (ok, out) = qemu_img(&[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            flat.to_str().unwrap(),
        ]);
        assert!(ok, "{out}");
        let got = std::fs::read(&flat).unwrap();
        let mut want = base.clone();
        want[1 << 20..(1 << 20) + 65536].fill(0xab);
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the flattened image differs from base + write");
    }

    #[test]
    fn refuses_what_it_cannot_lay_out() {
        let long = PathBuf::from(format!("/{}", "a".repeat(MAX_BACKING_NAME + 1)));
        let err = empty_image(1 << 20, Some((&long, ImageFormat::Raw))).unwrap_err();
        assert!(err.to_string().contains("shorter disk path"), "{err}");
        let err = empty_image(u64::MAX / 2, None).unwrap_err();
        assert!(err.to_string().contains("smaller volume"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.qcow2");
        std::fs::write(&p, b"keep").unwrap();
        assert!(
            create(&p, 1 << 20, None).is_err(),
            "an existing file is never overwritten"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"keep");
    }
}
