//! Chunk manifests: for each fixed-size chunk of a file's logical content, either "zero" (every
//! byte is zero) or the chunk's SHA-256, with the file's size and the whole-file SHA-512 the
//! content was verified against, sealed by a SHA-256 of the manifest itself.
//!
//! A manifest is built in the same pass as the whole-file SHA-512 (a download, a full-hash
//! receive, a verification or scrub), from the same bytes, and kept only when that SHA-512
//! matched the image's checksum. A receiver that knows the expected SHA-512 can then check a
//! transfer chunk by chunk as it arrives ([`ChunkChecker`]): SHA-256 runs on SHA-NI here at
//! several times SHA-512's speed, and "zero" chunks (holes) cost nothing, instead of hashing the
//! whole logical size with SHA-512 on one core. The seal catches a manifest that rotted; the
//! SHA-512 it names ties it to the image. It does not authenticate the node that serves it.
//!
//! This module owns the format, the builder and the checker; it must not do I/O (callers read
//! and write manifests, see [`Manifest::to_bytes`] and [`Manifest::parse`]).
//!
//! # Format (text, one item per line, `\n` endings)
//!
//! ```text
//! bicsi-manifest 1
//! size <bytes>                 the file's logical size
//! chunk-size <bytes>           every chunk but the last, which holds the rest
//! sha512 <128 hex>             the whole file's SHA-512, verified when this was built
//! chunks <n>                   ceil(size / chunk-size)
//! zero | <64 hex>              n lines, in offset order: all zeros, or the chunk's SHA-256
//! seal <64 hex>                SHA-256 of every byte above this line
//! ```

use sha2::{Digest, Sha256};

use super::hash::ZEROS;

/// The chunk size bicsi builds manifests with. Small enough that a sparse image's holes make
/// whole chunks "zero" (a 1 MiB data run every 4 MiB leaves three of four chunks unhashed),
/// large enough that the manifest stays small (about 66 bytes per MiB of image).
pub const CHUNK_SIZE: u64 = 1 << 20;
/// Bounds a parsed manifest's chunk size and count, so a bad one cannot make a receiver
/// allocate without limit.
const MIN_CHUNK: u64 = 4096;
const MAX_CHUNK: u64 = 1 << 30;
const MAX_CHUNKS: u64 = 1 << 24;
/// The largest manifest a receiver accepts (bytes): [`MAX_CHUNKS`] lines of a SHA-256.
pub const MAX_MANIFEST_BYTES: u64 = 200 + MAX_CHUNKS * 65 + 72;

const MAGIC: &str = "bicsi-manifest 1";

/// One chunk of a manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Every byte is zero (a hole, or written zeros).
    Zero,
    /// The SHA-256 of the chunk's bytes (at least one is not zero).
    Sha256([u8; 32]),
}

impl Chunk {
    fn describe(&self) -> String {
        match self {
            Chunk::Zero => "zeros".to_owned(),
            Chunk::Sha256(d) => format!("sha256 {}", hex::encode(d)),
        }
    }
}

/// A file's chunk manifest (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub size: u64,
    pub chunk_size: u64,
    /// Lower-case hex SHA-512 of the whole logical content.
    pub sha512: String,
    pub chunks: Vec<Chunk>,
}

impl Manifest {
    /// The manifest as its file holds it, sealed.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut s = format!(
            "{MAGIC}\nsize {}\nchunk-size {}\nsha512 {}\nchunks {}\n",
            self.size,
            self.chunk_size,
            self.sha512,
            self.chunks.len()
        );
        s.reserve(self.chunks.len() * 65 + 72);
        for c in &self.chunks {
            match c {
                Chunk::Zero => s.push_str("zero\n"),
                Chunk::Sha256(d) => {
                    s.push_str(&hex::encode(d));
                    s.push('\n');
                }
            }
        }
        let seal = hex::encode(Sha256::digest(s.as_bytes()));
        s.push_str("seal ");
        s.push_str(&seal);
        s.push('\n');
        s.into_bytes()
    }

    /// Parses and checks a manifest file: its format, its bounds and its seal. Says what is
    /// wrong otherwise.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())?;
        let body_end = text
            .strip_suffix('\n')
            .and_then(|t| t.rfind('\n'))
            .map(|i| i + 1)
            .ok_or("too short: no seal line")?;
        let (body, seal_line) = text.split_at(body_end);
        let seal = seal_line
            .strip_prefix("seal ")
            .and_then(|s| s.strip_suffix('\n'))
            .ok_or("the last line is not `seal <sha256>`")?;
        if hex::encode(Sha256::digest(body.as_bytes())) != seal {
            return Err("its seal does not match its content (the manifest is corrupt)".into());
        }
        let mut lines = body.lines();
        let mut field = |name: &str| -> Result<&str, String> {
            let line = lines.next().ok_or(format!("missing `{name}` line"))?;
            if name == MAGIC {
                return (line == MAGIC)
                    .then_some("")
                    .ok_or(format!("not a bicsi manifest: it starts with {line:?}"));
            }
            line.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .ok_or(format!("expected `{name} …`, found {line:?}"))
        };
        field(MAGIC)?;
        let number = |v: &str, name: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{name} {v:?} is not a number"))
        };
        let size = number(field("size")?, "size")?;
        let chunk_size = number(field("chunk-size")?, "chunk-size")?;
        let sha512 = field("sha512")?.to_owned();
        let count = number(field("chunks")?, "chunks")?;
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(format!(
                "chunk-size {chunk_size} is outside {MIN_CHUNK}..={MAX_CHUNK}"
            ));
        }
        if sha512.len() != 128
            || !sha512
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(format!(
                "sha512 {sha512:?} is not 128 lower-case hex digits"
            ));
        }
        if count != size.div_ceil(chunk_size) || count > MAX_CHUNKS {
            return Err(format!(
                "{count} chunks for {size} bytes in chunks of {chunk_size}"
            ));
        }
        let mut chunks = Vec::with_capacity(count as usize);
        for line in lines.by_ref().take(count as usize) {
            chunks.push(if line == "zero" {
                Chunk::Zero
            } else {
                let mut d = [0u8; 32];
                hex::decode_to_slice(line, &mut d)
                    .map_err(|_| format!("chunk {} is {line:?}", chunks.len()))?;
                Chunk::Sha256(d)
            });
        }
        if chunks.len() as u64 != count || lines.next().is_some() {
            return Err(format!("it does not list exactly {count} chunks"));
        }
        Ok(Manifest {
            size,
            chunk_size,
            sha512,
            chunks,
        })
    }
}

/// Builds a manifest from a file's logical content fed in order: bytes with [`update`], holes
/// with [`zeros`]. A chunk's SHA-256 starts only at its first non-zero byte (the zeros before
/// it are hashed then), so a chunk of holes or written zeros costs a zero test, not a hash.
///
/// [`update`]: ManifestBuilder::update
/// [`zeros`]: ManifestBuilder::zeros
pub struct ManifestBuilder {
    chunk_size: u64,
    /// Offset of the next byte.
    pos: u64,
    /// Zeros seen at the start of the current chunk, not yet hashed.
    zero_prefix: u64,
    /// The current chunk's hash, once it has a non-zero byte.
    hasher: Option<Sha256>,
    chunks: Vec<Chunk>,
}

impl ManifestBuilder {
    pub fn new(chunk_size: u64) -> Self {
        assert!(chunk_size > 0, "chunk size must be positive");
        ManifestBuilder {
            chunk_size,
            pos: 0,
            zero_prefix: 0,
            hasher: None,
            chunks: Vec::new(),
        }
    }

    /// Offset of the next byte.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The chunks finished so far.
    pub fn finished(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Feeds the next bytes of the content.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let (n, end) = self.room(data.len() as u64);
            let (piece, rest) = data.split_at(n as usize);
            match &mut self.hasher {
                Some(h) => h.update(piece),
                // The first byte first: most data chunks start with a non-zero one.
                None if piece[0] == 0 && is_zero(piece) => self.zero_prefix += n,
                None => {
                    let mut h = Sha256::new();
                    feed_zeros(&mut h, self.zero_prefix);
                    h.update(piece);
                    self.hasher = Some(h);
                }
            }
            self.advance(n, end);
            data = rest;
        }
    }

    /// Feeds `n` zero bytes (a hole).
    pub fn zeros(&mut self, mut n: u64) {
        while n > 0 {
            let (k, end) = self.room(n);
            match &mut self.hasher {
                Some(h) => feed_zeros(h, k),
                None => self.zero_prefix += k,
            }
            self.advance(k, end);
            n -= k;
        }
    }

    /// Ends the content: the last (short) chunk is finished; `sha512` is the whole content's,
    /// which the caller has verified (or is about to, and drops the manifest if it does not
    /// match).
    pub fn finish(mut self, sha512: &str) -> Manifest {
        if self.pos % self.chunk_size != 0 {
            self.close_chunk();
        }
        Manifest {
            size: self.pos,
            chunk_size: self.chunk_size,
            sha512: sha512.to_ascii_lowercase(),
            chunks: self.chunks,
        }
    }

    /// How many of `want` bytes fit in the current chunk, and whether they end it.
    fn room(&self, want: u64) -> (u64, bool) {
        let left = self.chunk_size - self.pos % self.chunk_size;
        (want.min(left), want >= left)
    }

    fn advance(&mut self, n: u64, ends_chunk: bool) {
        self.pos += n;
        if ends_chunk {
            self.close_chunk();
        }
    }

    fn close_chunk(&mut self) {
        self.zero_prefix = 0;
        self.chunks.push(match self.hasher.take() {
            Some(h) => Chunk::Sha256(h.finalize().into()),
            None => Chunk::Zero,
        });
    }
}

/// Checks a file's content, fed in order, against a manifest chunk by chunk: the first chunk
/// that differs is an error naming its offset, as soon as that chunk is complete.
pub struct ChunkChecker<'a> {
    manifest: &'a Manifest,
    builder: ManifestBuilder,
    checked: usize,
}

/// A chunk that is not what the manifest says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMismatch {
    pub offset: u64,
    pub len: u64,
    pub detail: String,
}

impl<'a> ChunkChecker<'a> {
    pub fn new(manifest: &'a Manifest) -> Self {
        ChunkChecker {
            manifest,
            builder: ManifestBuilder::new(manifest.chunk_size),
            checked: 0,
        }
    }

    pub fn update(&mut self, data: &[u8]) -> Result<(), ChunkMismatch> {
        self.builder.update(data);
        self.check()
    }

    pub fn zeros(&mut self, n: u64) -> Result<(), ChunkMismatch> {
        self.builder.zeros(n);
        self.check()
    }

    /// The content ended: it must be exactly the manifest's size, every chunk matching.
    pub fn finish(self) -> Result<(), ChunkMismatch> {
        let (pos, m) = (self.builder.position(), self.manifest);
        if pos != m.size {
            return Err(ChunkMismatch {
                offset: pos.min(m.size),
                len: pos.abs_diff(m.size),
                detail: format!("the content is {pos} bytes, the manifest says {}", m.size),
            });
        }
        let mut this = self;
        if pos % m.chunk_size != 0 {
            this.builder.close_chunk();
        }
        this.check()
    }

    fn check(&mut self) -> Result<(), ChunkMismatch> {
        let m = self.manifest;
        let done = self.builder.finished();
        while self.checked < done.len() {
            let i = self.checked;
            let offset = i as u64 * m.chunk_size;
            let len = m.chunk_size.min(m.size.saturating_sub(offset));
            let Some(want) = m.chunks.get(i) else {
                return Err(ChunkMismatch {
                    offset,
                    len,
                    detail: format!("the manifest ends at {} bytes", m.size),
                });
            };
            if *want != done[i] {
                return Err(ChunkMismatch {
                    offset,
                    len,
                    detail: format!("expected {}, got {}", want.describe(), done[i].describe()),
                });
            }
            self.checked += 1;
        }
        Ok(())
    }
}

/// Whether every byte is zero; written so the compiler vectorizes it (no early exit inside a
/// 4 KiB block).
fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, b| acc | b) == 0)
}

fn feed_zeros(h: &mut Sha256, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: u64 = 8192;

    /// Content of `size` bytes: zeros except `(offset, byte)` runs of 100 bytes.
    fn content(size: usize, runs: &[(usize, u8)]) -> Vec<u8> {
        let mut v = vec![0u8; size];
        for &(o, b) in runs {
            v[o..o + 100].fill(b);
        }
        v
    }

    fn sha512_hex(data: &[u8]) -> String {
        hex::encode(sha2::Sha512::digest(data))
    }

    /// The manifest of `data`, fed in pieces of `step` bytes, zero runs as holes when `holes`.
    fn build(data: &[u8], step: usize, holes: bool) -> Manifest {
        let mut b = ManifestBuilder::new(C);
        for piece in data.chunks(step) {
            if holes && piece.iter().all(|x| *x == 0) {
                b.zeros(piece.len() as u64);
            } else {
                b.update(piece);
            }
        }
        b.finish(&sha512_hex(data))
    }

    #[test]
    fn builds_zero_and_hashed_chunks_whatever_the_split() {
        // 3.5 chunks: zeros, data at the start, data at the end (after zeros), a short tail.
        let size = (3 * C + C / 2) as usize;
        let data = content(size, &[(C as usize, 1), (3 * C as usize - 100, 2)]);
        let want: Vec<Chunk> = vec![
            Chunk::Zero,
            Chunk::Sha256(Sha256::digest(&data[C as usize..2 * C as usize]).into()),
            Chunk::Sha256(Sha256::digest(&data[2 * C as usize..3 * C as usize]).into()),
            Chunk::Zero,
        ];
        for step in [1, 7, 100, 4096, C as usize, 3 * C as usize, size] {
            for holes in [false, true] {
                let m = build(&data, step, holes);
                assert_eq!(m.chunks, want, "step {step}, holes {holes}");
                assert_eq!((m.size, m.chunk_size), (size as u64, C));
                assert_eq!(m.sha512, sha512_hex(&data));
            }
        }
        let empty = build(&[], 1, false);
        assert_eq!((empty.size, empty.chunks.len()), (0, 0));
    }

    #[test]
    fn round_trips_and_rejects_a_broken_seal_or_format() {
        let data = content(3 * C as usize + 5, &[(10, 9)]);
        let m = build(&data, 1000, true);
        let bytes = m.to_bytes();
        assert_eq!(Manifest::parse(&bytes).unwrap(), m);
        assert!(bytes.starts_with(b"bicsi-manifest 1\nsize 24581\nchunk-size 8192\n"));

        // Any flipped bit breaks the seal (or the format).
        for at in [0, 20, 60, bytes.len() / 2, bytes.len() - 2] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x04;
            assert!(Manifest::parse(&bad).is_err(), "flip at {at}");
        }
        let mut entry_flip = bytes.clone();
        let line = String::from_utf8(bytes.clone())
            .unwrap()
            .find("zero")
            .unwrap();
        entry_flip[line] = b'Z';
        let err = Manifest::parse(&entry_flip).unwrap_err();
        assert!(err.contains("seal"), "{err}");

        // Well sealed but wrong inside: bounds and counts are checked too.
        let mut few = m.clone();
        few.chunks.pop();
        assert!(
            Manifest::parse(&few.to_bytes())
                .unwrap_err()
                .contains("chunks")
        );
        let mut tiny = m.clone();
        tiny.chunk_size = 16;
        assert!(
            Manifest::parse(&tiny.to_bytes())
                .unwrap_err()
                .contains("chunk-size")
        );
        let mut upper = m.clone();
        upper.sha512 = upper.sha512.to_uppercase();
        assert!(
            Manifest::parse(&upper.to_bytes())
                .unwrap_err()
                .contains("sha512")
        );
        for junk in [
            &b""[..],
            b"seal x\n",
            b"hello\nworld\n",
            &[0xff, b'\n', b'\n'],
        ] {
            assert!(Manifest::parse(junk).is_err());
        }
    }

    #[test]
    fn the_checker_accepts_the_same_content_and_names_the_first_bad_chunk() {
        let data = content(4 * C as usize + 10, &[(100, 1), (2 * C as usize + 5, 3)]);
        let m = build(&data, 999, true);
        for step in [1, 333, C as usize, data.len()] {
            let mut c = ChunkChecker::new(&m);
            for piece in data.chunks(step) {
                c.update(piece).unwrap();
            }
            c.finish().unwrap();
        }

        // A flipped byte in a data chunk, and data where the manifest says zeros.
        for (at, kind) in [
            (2 * C as usize + 7, "sha256"),
            (3 * C as usize + 1, "zeros"),
        ] {
            let mut bad = data.clone();
            bad[at] ^= 0x10;
            let mut c = ChunkChecker::new(&m);
            let err = bad
                .chunks(500)
                .try_for_each(|p| c.update(p))
                .and_then(|()| c.finish())
                .unwrap_err();
            let chunk = at as u64 / C * C;
            assert_eq!((err.offset, err.len), (chunk, C), "{err:?}");
            assert!(err.detail.contains(&format!("expected {kind}")), "{err:?}");
        }

        // Zeros that arrive as holes match "zero" chunks; a short or long content does not.
        let mut c = ChunkChecker::new(&m);
        c.update(&data[..C as usize]).unwrap();
        c.zeros(C).unwrap();
        c.update(&data[2 * C as usize..3 * C as usize]).unwrap();
        c.zeros(data.len() as u64 - 3 * C).unwrap();
        c.finish().unwrap();
        let mut short = ChunkChecker::new(&m);
        short.update(&data[..data.len() - 1]).unwrap();
        assert!(short.finish().unwrap_err().detail.contains("manifest says"));
        let mut long = ChunkChecker::new(&m);
        long.update(&data).unwrap();
        let err = long.zeros(2 * C).unwrap_err();
        assert!(err.detail.contains("manifest ends"), "{err:?}");
    }
}

/// Fuzzing entry (feature `fuzzing`, `fuzz/`): a manifest that parses is written back byte for
/// byte as it was read and parses to the same value.
#[cfg(feature = "fuzzing")]
pub fn fuzz(data: &[u8]) {
    if let Ok(m) = Manifest::parse(data) {
        let again =
            Manifest::parse(&m.to_bytes()).expect("a parsed manifest, written back, parses");
        assert_eq!(again, m);
    }
}
