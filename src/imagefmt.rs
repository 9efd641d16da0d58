//! Backing-image format detection from a file's first bytes, without qemu.
//!
//! This module owns telling RAW from QCOW2, reading a qcow2 image's virtual size, and refusing
//! images that cannot serve as a backing image: a backing image must be self-contained (no
//! backing file, no external data file), unencrypted, and of a qcow2 version qemu reads (2 or 3).
//! It also refuses files whose magic says they are some other container (VMDK, VHDX, VDI, QED, …)
//! or compressed (gzip, xz, zstd, bzip2), which would otherwise pass as RAW and give a VM garbage.
//! It must not read beyond the header nor interpret clusters, tables or snapshots: qemu does that
//! when it opens the image; this is the cheap check done once when a file is ready.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// How many bytes [`probe`] reads from the start of a file. Enough for every qcow2 header and
/// header extensions qemu writes, and for the backing-file name that follows them.
pub const PROBE_LEN: usize = 64 * 1024;

/// "QFI\xfb", the qcow magic (versions 1 to 3).
const QCOW_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Length of a version 2 header; version 3 headers say their own length at offset 100.
const QCOW2_V2_HEADER_LEN: u64 = 72;
/// The fixed part of a version 3 header, which `header_length` must cover.
const QCOW2_V3_MIN_HEADER_LEN: u64 = 104;
/// qemu's own limit on the backing-file name (`bdrv_get_full_backing_filename` uses PATH_MAX-ish
/// 1023 bytes); a larger value marks a corrupt header.
const QCOW2_MAX_BACKING_NAME: u32 = 1023;

/// qcow2 incompatible feature bits (docs/interop/qcow2.txt).
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// A backing image's on-disk format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// The name qemu uses for the format (`-f raw`, `-f qcow2`).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the header says about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeaderInfo {
    pub format: Format,
    /// Size of the disk a VM sees, in bytes. For RAW it is the file size.
    pub virtual_size: u64,
    /// Size of the image file itself, in bytes.
    pub file_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageFormatError {
    #[error("cannot read image file {path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt or truncated qcow2 header: {0}")]
    Corrupt(String),
    #[error("unsupported qcow2 version {0}: only versions 2 and 3 are supported")]
    UnsupportedVersion(u32),
    #[error("qcow2 image has a backing file '{0}'; flatten it with qemu-img convert first")]
    BackingFile(String),
    #[error(
        "qcow2 image uses an external data file; a backing image must be self-contained: \
         convert it with qemu-img convert first"
    )]
    ExternalDataFile,
    #[error(
        "qcow2 image is encrypted (method {0}); a backing image must be unencrypted: \
         convert it with qemu-img convert first"
    )]
    Encrypted(u32),
    #[error("qcow2 image is marked corrupt; repair it with qemu-img check -r all first")]
    MarkedCorrupt,
    #[error("qcow2 image uses unsupported incompatible features {0:#x}")]
    UnsupportedFeatures(u64),
    #[error("the file looks like {what}, not a RAW or QCOW2 disk image; {fix}")]
    UnsupportedFormat {
        what: &'static str,
        fix: &'static str,
    },
}

/// Reads the first [`PROBE_LEN`] bytes of `path` and parses them with [`parse_header`].
pub fn probe(path: &Path) -> Result<ImageHeaderInfo, ImageFormatError> {
    let io_err = |source| ImageFormatError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let file_size = file.metadata().map_err(io_err)?.len();
    let mut head = Vec::with_capacity(PROBE_LEN.min(file_size as usize));
    file.take(PROBE_LEN as u64)
        .read_to_end(&mut head)
        .map_err(io_err)?;
    parse_header(&head, file_size)
}

/// Parses the start of an image. `bytes` is the beginning of the file (at least the whole qcow2
/// header; [`PROBE_LEN`] bytes is always enough, fewer only when the file is shorter) and
/// `file_size` the size of the whole file.
pub fn parse_header(bytes: &[u8], file_size: u64) -> Result<ImageHeaderInfo, ImageFormatError> {
    if bytes.starts_with(&QCOW_MAGIC) {
        return parse_qcow2(bytes, file_size);
    }
    if let Some((what, fix)) = foreign_format(bytes) {
        return Err(ImageFormatError::UnsupportedFormat { what, fix });
    }
    Ok(ImageHeaderInfo {
        format: Format::Raw,
        virtual_size: file_size,
        file_size,
    })
}

const CONVERT: &str = "convert it with qemu-img convert -O qcow2 (or -O raw) first";
const DECOMPRESS: &str = "decompress it first";

/// Magic numbers of formats qemu could open but bicsi does not take, and of compressed files.
/// A raw disk starts with a boot sector, a partition table, a file system or zeros, never with
/// one of these.
fn foreign_format(bytes: &[u8]) -> Option<(&'static str, &'static str)> {
    let at = |off: usize, magic: &[u8]| bytes.get(off..off + magic.len()) == Some(magic);
    let table: [(bool, &'static str, &'static str); 11] = [
        (at(0, b"QED\0"), "a QED image", CONVERT),
        (at(0, b"KDMV"), "a VMDK image", CONVERT),
        (
            at(0, b"# Disk DescriptorFile"),
            "a VMDK descriptor",
            CONVERT,
        ),
        (at(0, b"vhdxfile"), "a VHDX image", CONVERT),
        (at(0, b"conectix"), "a dynamic VHD image", CONVERT),
        // VDI: signature 0xbeda107f (little-endian) at offset 64.
        (at(64, &[0x7f, 0x10, 0xda, 0xbe]), "a VDI image", CONVERT),
        (at(0, &[0x1f, 0x8b]), "a gzip-compressed file", DECOMPRESS),
        (
            at(0, &[0xfd, b'7', b'z', b'X', b'Z', 0]),
            "an xz-compressed file",
            DECOMPRESS,
        ),
        (
            at(0, &[0x28, 0xb5, 0x2f, 0xfd]),
            "a zstd-compressed file",
            DECOMPRESS,
        ),
        (
            at(0, b"BZh") && bytes.get(3).is_some_and(|d| (b'1'..=b'9').contains(d)),
            "a bzip2-compressed file",
            DECOMPRESS,
        ),
        (at(0, b"PK\x03\x04"), "a zip archive", DECOMPRESS),
    ];
    table
        .into_iter()
        .find(|(hit, _, _)| *hit)
        .map(|(_, what, fix)| (what, fix))
}

fn be_u32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn parse_qcow2(bytes: &[u8], file_size: u64) -> Result<ImageHeaderInfo, ImageFormatError> {
    let corrupt = |s: String| ImageFormatError::Corrupt(s);
    // The version decides the header length, so it is read first (8 bytes: magic + version).
    if bytes.len() < 8 || file_size < 8 {
        return Err(corrupt(format!(
            "file is {file_size} bytes, shorter than the 8 bytes of magic and version"
        )));
    }
    let version = be_u32(bytes, 4);
    if version != 2 && version != 3 {
        return Err(ImageFormatError::UnsupportedVersion(version));
    }
    let fixed_len = if version == 2 {
        QCOW2_V2_HEADER_LEN
    } else {
        QCOW2_V3_MIN_HEADER_LEN
    };
    let short = |need: u64| {
        corrupt(format!(
            "the version {version} header needs {need} bytes but the file has {}",
            file_size.min(bytes.len() as u64)
        ))
    };
    if file_size < fixed_len || (bytes.len() as u64) < fixed_len {
        return Err(short(fixed_len));
    }

    let backing_file_offset = be_u64(bytes, 8);
    let backing_file_size = be_u32(bytes, 16);
    let cluster_bits = be_u32(bytes, 20);
    let virtual_size = be_u64(bytes, 24);
    let crypt_method = be_u32(bytes, 32);

    // qemu: "cluster_bits must be at least 9 and at most 21" (MIN/MAX_CLUSTER_BITS).
    if !(9..=21).contains(&cluster_bits) {
        return Err(corrupt(format!(
            "cluster_bits {cluster_bits} is outside 9..=21"
        )));
    }
    let cluster_size = 1u64 << cluster_bits;
    // qemu refuses sizes above QCOW_MAX_VIRTUAL_SIZE-ish bounds; anything that does not fit an
    // off_t cannot be a disk.
    if virtual_size > i64::MAX as u64 {
        return Err(corrupt(format!("virtual size {virtual_size} is too large")));
    }

    let (header_len, incompatible) = if version == 3 {
        let header_length = u64::from(be_u32(bytes, 100));
        if header_length < QCOW2_V3_MIN_HEADER_LEN {
            return Err(corrupt(format!(
                "header_length {header_length} is less than {QCOW2_V3_MIN_HEADER_LEN}"
            )));
        }
        if header_length > cluster_size {
            return Err(corrupt(format!(
                "header_length {header_length} is larger than the {cluster_size}-byte cluster"
            )));
        }
        if file_size < header_length {
            return Err(short(header_length));
        }
        (header_length, be_u64(bytes, 72))
    } else {
        (QCOW2_V2_HEADER_LEN, 0)
    };

    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(ImageFormatError::MarkedCorrupt);
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(ImageFormatError::ExternalDataFile);
    }
    if incompatible & !INCOMPAT_KNOWN != 0 {
        return Err(ImageFormatError::UnsupportedFeatures(
            incompatible & !INCOMPAT_KNOWN,
        ));
    }
    if crypt_method != 0 {
        return Err(ImageFormatError::Encrypted(crypt_method));
    }

    if backing_file_offset != 0 {
        // qemu: the name must lie in the first cluster and be at most 1023 bytes.
        let end = backing_file_offset.saturating_add(u64::from(backing_file_size));
        if backing_file_size > QCOW2_MAX_BACKING_NAME
            || backing_file_offset < header_len
            || end > cluster_size
            || end > file_size
        {
            return Err(corrupt(format!(
                "backing file name at offset {backing_file_offset}, {backing_file_size} bytes, \
                 lies outside the first cluster or the file"
            )));
        }
        let name = match bytes.get(backing_file_offset as usize..end as usize) {
            Some(raw) => String::from_utf8_lossy(raw).into_owned(),
            None => format!("<name at offset {backing_file_offset} not read>"),
        };
        return Err(ImageFormatError::BackingFile(name));
    }

    Ok(ImageHeaderInfo {
        format: Format::Qcow2,
        virtual_size,
        file_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A hand-made qcow2 header: version, cluster_bits, size; the rest zero except v3's
    /// header_length (112, as qemu 10 writes it).
    fn header(version: u32, cluster_bits: u32, size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(&QCOW_MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        if version == 3 {
            h[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order
            h[100..104].copy_from_slice(&112u32.to_be_bytes());
        }
        h
    }

    fn set_u32(h: &mut [u8], off: usize, v: u32) {
        h[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn set_u64(h: &mut [u8], off: usize, v: u64) {
        h[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }

    fn with(mut h: Vec<u8>, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        f(&mut h);
        h
    }

    #[test]
    fn parse_header_table() {
        const MIB: u64 = 1 << 20;
        let backing = with(header(3, 16, MIB), |h| {
            set_u64(h, 8, 200);
            set_u32(h, 16, 8);
            h[200..208].copy_from_slice(b"base.img");
        });
        // (name, bytes, file size, Ok((format, virtual size)) or Err(message fragment))
        type Case = (
            &'static str,
            Vec<u8>,
            u64,
            Result<(Format, u64), &'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "v3 64 KiB clusters",
                header(3, 16, 64 * MIB),
                196_616,
                Ok((Format::Qcow2, 64 * MIB)),
            ),
            (
                "v2",
                header(2, 16, 10 * MIB),
                196_616,
                Ok((Format::Qcow2, 10 * MIB)),
            ),
            (
                "v3 min cluster",
                header(3, 9, 512),
                4096,
                Ok((Format::Qcow2, 512)),
            ),
            (
                "v3 max cluster",
                header(3, 21, 1 << 40),
                1 << 22,
                Ok((Format::Qcow2, 1 << 40)),
            ),
            (
                "v3 dirty is readable",
                with(header(3, 16, MIB), |h| set_u64(h, 72, INCOMPAT_DIRTY)),
                4096,
                Ok((Format::Qcow2, MIB)),
            ),
            (
                "v3 zstd + extended l2",
                with(header(3, 16, MIB), |h| {
                    set_u64(h, 72, INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
                }),
                4096,
                Ok((Format::Qcow2, MIB)),
            ),
            (
                "zeros are raw",
                vec![0u8; 4096],
                8 * MIB,
                Ok((Format::Raw, 8 * MIB)),
            ),
            (
                "boot sector is raw",
                with(vec![0u8; 512], |h| {
                    h[0] = 0xeb;
                    h[1] = 0x63;
                    h[2] = 0x90;
                    h[510] = 0x55;
                    h[511] = 0xaa;
                }),
                3 * MIB,
                Ok((Format::Raw, 3 * MIB)),
            ),
            ("empty file is raw", vec![], 0, Ok((Format::Raw, 0))),
            (
                "short non-qcow file is raw",
                b"QF".to_vec(),
                2,
                Ok((Format::Raw, 2)),
            ),
            (
                "version 1",
                header(1, 12, MIB),
                4096,
                Err("unsupported qcow2 version 1"),
            ),
            (
                "version 4",
                header(4, 16, MIB),
                4096,
                Err("unsupported qcow2 version 4"),
            ),
            (
                "cluster_bits 8",
                header(3, 8, MIB),
                4096,
                Err("cluster_bits 8 is outside 9..=21"),
            ),
            (
                "cluster_bits 22",
                header(3, 22, MIB),
                4096,
                Err("cluster_bits 22 is outside 9..=21"),
            ),
            (
                "header_length 100",
                with(header(3, 16, MIB), |h| set_u32(h, 100, 100)),
                4096,
                Err("header_length 100 is less than 104"),
            ),
            (
                "header_length past cluster",
                with(header(3, 9, MIB), |h| set_u32(h, 100, 1024)),
                4096,
                Err("larger than the 512-byte cluster"),
            ),
            (
                "truncated magic+version",
                QCOW_MAGIC.to_vec(),
                4,
                Err("corrupt or truncated qcow2 header: file is 4 bytes"),
            ),
            (
                "truncated v2",
                header(2, 16, MIB)[..60].to_vec(),
                60,
                Err(
                    "corrupt or truncated qcow2 header: the version 2 header needs 72 bytes but the file has 60",
                ),
            ),
            (
                "truncated v3",
                header(3, 16, MIB)[..90].to_vec(),
                90,
                Err(
                    "corrupt or truncated qcow2 header: the version 3 header needs 104 bytes but the file has 90",
                ),
            ),
            (
                "v3 header_length past eof",
                header(3, 16, MIB)[..108].to_vec(),
                108,
                Err("the version 3 header needs 112 bytes but the file has 108"),
            ),
            (
                "backing file",
                backing.clone(),
                4096,
                Err(
                    "qcow2 image has a backing file 'base.img'; flatten it with qemu-img convert first",
                ),
            ),
            (
                "backing name not in bytes",
                backing[..150].to_vec(),
                4096,
                Err("has a backing file '<name at offset 200 not read>'"),
            ),
            (
                "backing name past eof",
                backing.clone(),
                204,
                Err("corrupt or truncated qcow2 header: backing file name at offset 200"),
            ),
            (
                "backing name inside header",
                with(header(3, 16, MIB), |h| {
                    set_u64(h, 8, 50);
                    set_u32(h, 16, 4);
                }),
                4096,
                Err("lies outside the first cluster"),
            ),
            (
                "backing name too long",
                with(header(3, 16, MIB), |h| {
                    set_u64(h, 8, 200);
                    set_u32(h, 16, 2000);
                }),
                1 << 20,
                Err("lies outside the first cluster"),
            ),
            (
                "aes encrypted",
                with(header(2, 16, MIB), |h| set_u32(h, 32, 1)),
                4096,
                Err("qcow2 image is encrypted (method 1)"),
            ),
            (
                "luks encrypted",
                with(header(3, 16, MIB), |h| set_u32(h, 32, 2)),
                4096,
                Err("encrypted (method 2)"),
            ),
            (
                "marked corrupt",
                with(header(3, 16, MIB), |h| set_u64(h, 72, INCOMPAT_CORRUPT)),
                4096,
                Err("marked corrupt"),
            ),
            (
                "external data file",
                with(header(3, 16, MIB), |h| set_u64(h, 72, INCOMPAT_DATA_FILE)),
                4096,
                Err("external data file"),
            ),
            (
                "unknown incompatible bit",
                with(header(3, 16, MIB), |h| set_u64(h, 72, 1 << 9)),
                4096,
                Err("unsupported incompatible features 0x200"),
            ),
            (
                "huge virtual size",
                header(3, 16, u64::MAX),
                4096,
                Err("virtual size 18446744073709551615 is too large"),
            ),
            (
                "qed",
                b"QED\0rest".to_vec(),
                4096,
                Err("looks like a QED image"),
            ),
            (
                "vmdk",
                b"KDMV\x01\0\0\0".to_vec(),
                4096,
                Err("looks like a VMDK image"),
            ),
            (
                "vhdx",
                b"vhdxfile".to_vec(),
                4096,
                Err("looks like a VHDX image"),
            ),
            (
                "vdi",
                with(vec![0u8; 128], |h| {
                    h[64..68].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe])
                }),
                4096,
                Err("looks like a VDI image"),
            ),
            (
                "gzip",
                vec![0x1f, 0x8b, 8, 0],
                4096,
                Err("gzip-compressed file, not a RAW or QCOW2 disk image; decompress it first"),
            ),
            (
                "xz",
                vec![0xfd, b'7', b'z', b'X', b'Z', 0],
                4096,
                Err("xz-compressed"),
            ),
            (
                "zstd",
                vec![0x28, 0xb5, 0x2f, 0xfd],
                4096,
                Err("zstd-compressed"),
            ),
            ("bzip2", b"BZh9".to_vec(), 4096, Err("bzip2-compressed")),
        ];
        for (name, bytes, file_size, want) in cases {
            let got = parse_header(&bytes, file_size);
            match (want, got) {
                (Ok((format, virtual_size)), Ok(info)) => assert_eq!(
                    info,
                    ImageHeaderInfo {
                        format,
                        virtual_size,
                        file_size
                    },
                    "case {name}"
                ),
                (Err(fragment), Err(e)) => assert!(
                    e.to_string().contains(fragment),
                    "case {name}: error {e:?} ({e}) does not contain {fragment:?}"
                ),
                (want, got) => panic!("case {name}: want {want:?}, got {got:?}"),
            }
        }
    }

    fn qemu_img(args: &[&str]) -> std::process::Output {
        let out = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img is installed");
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    #[test]
    fn probe_files_made_by_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        // (file, create options, size argument, expected virtual size)
        let cases: &[(&str, &[&str], &str, u64)] = &[
            ("a.qcow2", &[], "1M", 1 << 20),
            ("b.qcow2", &[], "64M", 64 << 20),
            ("c.qcow2", &[], "10G", 10 << 30),
            ("d.qcow2", &["-o", "compat=0.10"], "100M", 100 << 20),
            ("e.qcow2", &["-o", "cluster_size=512"], "3M", 3 << 20),
            ("f.qcow2", &["-o", "cluster_size=2M"], "1T", 1 << 40),
            (
                "g.qcow2",
                &["-o", "preallocation=metadata"],
                "16M",
                16 << 20,
            ),
            // qemu rounds odd sizes up to a multiple of 512.
            ("h.qcow2", &[], "1000", 1024),
        ];
        for (name, opts, size, virtual_size) in cases {
            let path = p(name);
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            args.extend_from_slice(opts);
            args.extend_from_slice(&[&path, size]);
            qemu_img(&args);
            let info = probe(Path::new(&path)).unwrap();
            let file_size = std::fs::metadata(&path).unwrap().len();
            assert_eq!(
                info,
                ImageHeaderInfo {
                    format: Format::Qcow2,
                    virtual_size: *virtual_size,
                    file_size
                },
                "{name} {opts:?} {size}"
            );
        }

        // RAW made by qemu-img, and a RAW image with data (a qcow2 converted to raw).
        qemu_img(&["create", "-q", "-f", "raw", &p("r.raw"), "5M"]);
        let info = probe(Path::new(&p("r.raw"))).unwrap();
        assert_eq!(info.format, Format::Raw);
        assert_eq!((info.virtual_size, info.file_size), (5 << 20, 5 << 20));
        qemu_img(&["convert", "-O", "raw", &p("b.qcow2"), &p("b.raw")]);
        let info = probe(Path::new(&p("b.raw"))).unwrap();
        assert_eq!((info.format, info.virtual_size), (Format::Raw, 64 << 20));

        // An overlay with a backing file is refused, naming the backing file.
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &p("a.qcow2"),
            "-F",
            "qcow2",
            &p("overlay.qcow2"),
        ]);
        let e = probe(Path::new(&p("overlay.qcow2"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "qcow2 image has a backing file '{}'; flatten it with qemu-img convert first",
                p("a.qcow2")
            )
        );
        // Flattened with qemu-img convert, it is accepted.
        qemu_img(&[
            "convert",
            "-O",
            "qcow2",
            &p("overlay.qcow2"),
            &p("flat.qcow2"),
        ]);
        assert_eq!(
            probe(Path::new(&p("flat.qcow2"))).unwrap().virtual_size,
            1 << 20
        );

        // An external data file makes the image not self-contained.
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", p("data.raw")),
            &p("ext.qcow2"),
            "1M",
        ]);
        let e = probe(Path::new(&p("ext.qcow2"))).unwrap_err();
        assert!(matches!(e, ImageFormatError::ExternalDataFile), "{e}");

        // LUKS encryption.
        qemu_img(&[
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=123456",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            &p("luks.qcow2"),
            "1M",
        ]);
        let e = probe(Path::new(&p("luks.qcow2"))).unwrap_err();
        assert!(matches!(e, ImageFormatError::Encrypted(2)), "{e}");

        // A real header cut short.
        let full = std::fs::read(p("b.qcow2")).unwrap();
        std::fs::write(p("cut.qcow2"), &full[..80]).unwrap();
        let e = probe(Path::new(&p("cut.qcow2"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "corrupt or truncated qcow2 header: the version 3 header needs 104 bytes but the \
             file has 80"
        );

        // A missing file names the path.
        let e = probe(Path::new(&p("missing"))).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}

/// Fuzzing entry (feature `fuzzing`, `fuzz/`): any first bytes of an image (the file's size is
/// the input's length) give a header or an error, never a panic; a RAW file's virtual size is
/// its length.
#[cfg(feature = "fuzzing")]
pub fn fuzz(data: &[u8]) {
    if let Ok(info) = parse_header(data, data.len() as u64) {
        assert_eq!(info.file_size, data.len() as u64);
        if info.format == Format::Raw {
            assert_eq!(info.virtual_size, info.file_size);
        }
    }
}
