//! Compressed download bodies: which compression a body uses (from its first bytes, never from
//! the URL's file name), and a streaming decoder over the body's blocks.
//!
//! A download's body may be gzip, xz, zstd or bzip2 (cloud images are published as
//! `.qcow2.xz`, `.raw.gz`, `.img.zst`); the file stored is the decompressed image, hashed and
//! written by the same pipeline as a plain body. The decoders are the synchronous ones of
//! flate2, liblzma, zstd and bzip2, run on a thread of their own (see [`super::pipeline`]):
//! decompression then overlaps receiving, hashing and writing instead of holding up the network,
//! and a decoder's state lives as long as the download, so a connection dropped mid-way goes on
//! with `Range` on the compressed stream and the decoder simply gets the rest. Memory stays
//! bounded whatever the ratio (a "decompression bomb" only fills the disk it is written to,
//! which the download's space check and the disk itself bound): the decoder reads into one
//! block at a time and hands it on over a bounded queue.
//!
//! Every format is read multi-stream (concatenated gzip members, xz streams, zstd frames, bzip2
//! streams, as parallel compressors write them); a stream cut short, corrupt data, or bytes
//! after the end are a [`Corrupt`] error naming the format.
//!
//! It must not know about HTTP, URLs or files: it takes blocks and gives blocks.

use std::fmt;
use std::io::{self, BufRead, Read};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

/// How a download's body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Zstd,
    Bzip2,
}

/// Bytes of a body's start that [`Compression::detect`] looks at.
pub const MAGIC_LEN: usize = 6;

impl Compression {
    /// The compression whose magic number `head` (a body's first bytes) starts with; `None`
    /// for anything else, which is stored as it arrives.
    pub fn detect(head: &[u8]) -> Option<Self> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(Compression::Gzip)
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Some(Compression::Xz)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Compression::Zstd)
        } else if head.starts_with(b"BZh") && head.get(3).is_some_and(|d| (b'1'..=b'9').contains(d))
        {
            Some(Compression::Bzip2)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
        }
    }

    /// A multi-stream decoder of this format reading from `input`.
    fn decoder<'a, R: BufRead + 'a>(self, input: R) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
            Compression::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(input)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(input)?),
            Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(input)),
        })
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A compressed body that does not decompress: carried inside an [`io::Error`] through the
/// pipeline, so the download can name it (see [`corrupt_in`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrupt {
    pub compression: Compression,
    pub detail: String,
}

impl fmt::Display for Corrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the body is {}-compressed but does not decompress: {}",
            self.compression, self.detail
        )
    }
}

impl std::error::Error for Corrupt {}

impl Corrupt {
    fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self)
    }
}

/// The [`Corrupt`] an error of the pipeline carries, if it is one.
pub fn corrupt_in(e: &io::Error) -> Option<&Corrupt> {
    e.get_ref()?.downcast_ref::<Corrupt>()
}

/// The first at most `limit` bytes `compressed` (the start of a compressed body) decompresses
/// to: whatever decodes before the input runs out. For reading an image's header before the
/// download is in; an error in the data just ends the output early.
pub fn decode_prefix(compression: Compression, compressed: &[u8], limit: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(limit);
    let Ok(decoder) = compression.decoder(compressed) else {
        return out;
    };
    let mut decoder = decoder.take(limit as u64);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match decoder.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

/// A block of the body: its chunks in order, shared with the other stages.
pub(super) type Block = Arc<[Bytes]>;

/// Reads the blocks arriving on a channel as one byte stream, without copying them; the stream
/// ends when the sender is dropped.
pub(super) struct BlockReader {
    rx: mpsc::Receiver<Block>,
    block: Option<Block>,
    piece: usize,
    pos: usize,
}

impl BlockReader {
    pub(super) fn new(rx: mpsc::Receiver<Block>) -> Self {
        BlockReader {
            rx,
            block: None,
            piece: 0,
            pos: 0,
        }
    }
}

impl BufRead for BlockReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        loop {
            let (piece, pos) = (self.piece, self.pos);
            match &self.block {
                Some(b) if piece < b.len() && pos < b[piece].len() => break,
                Some(b) if piece < b.len() => {
                    self.piece += 1;
                    self.pos = 0;
                }
                _ => match self.rx.blocking_recv() {
                    Some(b) => {
                        self.block = Some(b);
                        (self.piece, self.pos) = (0, 0);
                    }
                    None => {
                        self.block = None;
                        return Ok(&[]);
                    }
                },
            }
        }
        let b = self.block.as_ref().expect("a block with bytes left");
        Ok(&b[self.piece][self.pos..])
    }

    fn consume(&mut self, amt: usize) {
        self.pos += amt;
    }
}

impl Read for BlockReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Why a decoder stopped before its input ended cleanly.
pub(super) enum DecodeEnd {
    /// The data does not decompress (an [`io::Error`] carrying [`Corrupt`]).
    Corrupt(io::Error),
    /// A stage it hands blocks to stopped; that stage's error is the one to report.
    Downstream,
}

/// Decompresses everything `input` yields, handing the output on in blocks of `block_len`
/// bytes through `emit` (which fails when the next stage stopped). Returns when the input ends;
/// a stream that is cut short, corrupt, or followed by other bytes is [`DecodeEnd::Corrupt`].
pub(super) fn decode(
    compression: Compression,
    input: &mut BlockReader,
    block_len: usize,
    mut emit: impl FnMut(Bytes) -> Result<(), ()>,
) -> Result<u64, DecodeEnd> {
    let corrupt = |detail: String| {
        DecodeEnd::Corrupt(
            Corrupt {
                compression,
                detail,
            }
            .into_io(),
        )
    };
    let mut total = 0u64;
    {
        let mut decoder = compression
            .decoder(&mut *input)
            .map_err(|e| corrupt(e.to_string()))?;
        loop {
            let mut buf = vec![0u8; block_len];
            let mut filled = 0;
            while filled < block_len {
                match decoder.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return Err(corrupt(format!(
                            "the stream ends before its end marker ({e}); the file is cut short"
                        )));
                    }
                    Err(e) => return Err(corrupt(e.to_string())),
                }
            }
            if filled == 0 {
                break;
            }
            buf.truncate(filled);
            total += filled as u64;
            emit(Bytes::from(buf)).map_err(|()| DecodeEnd::Downstream)?;
            if filled < block_len {
                break;
            }
        }
    }
    // The decoder stopped at the end of its last stream: anything after it is not part of the
    // image, and a file with a tail nobody can account for is not trusted.
    let mut trailing = 0u64;
    loop {
        let n = match input.fill_buf() {
            Ok([]) => break,
            Ok(b) => b.len(),
            Err(e) => return Err(corrupt(e.to_string())),
        };
        trailing += n as u64;
        input.consume(n);
    }
    if trailing > 0 {
        return Err(corrupt(format!(
            "{trailing} bytes follow the end of the compressed data"
        )));
    }
    Ok(total)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    pub(crate) fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
        match c {
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Xz => {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Zstd => zstd::encode_all(data, 1).unwrap(),
            Compression::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
        }
    }

    pub(crate) const ALL: [Compression; 4] = [
        Compression::Gzip,
        Compression::Xz,
        Compression::Zstd,
        Compression::Bzip2,
    ];

    #[test]
    fn detect_table() {
        for c in ALL {
            assert_eq!(Compression::detect(&compress(c, b"data")), Some(c), "{c}");
        }
        let cases: [(&[u8], Option<Compression>); 7] = [
            (b"", None),
            (b"\x1f", None),
            (b"QFI\xfb\0\0\0\x03", None),
            (b"BZh0", None),
            (b"BZh", None),
            (b"\xfd7zXZ", None),
            (&[0u8; 512], None),
        ];
        for (head, want) in cases {
            assert_eq!(Compression::detect(head), want, "{head:?}");
        }
    }

    fn run(c: Compression, blocks: Vec<Vec<u8>>) -> Result<Vec<u8>, DecodeEnd> {
        let (tx, rx) = mpsc::channel(blocks.len().max(1));
        for b in blocks {
            tx.try_send(Arc::from([Bytes::from(b)])).unwrap();
        }
        drop(tx);
        let mut input = BlockReader::new(rx);
        let mut out = Vec::new();
        decode(c, &mut input, 4096, |b| {
            out.extend_from_slice(&b);
            Ok(())
        })?;
        Ok(out)
    }

    fn detail(r: Result<Vec<u8>, DecodeEnd>) -> String {
        match r {
            Err(DecodeEnd::Corrupt(e)) => corrupt_in(&e).expect("a Corrupt").to_string(),
            Err(DecodeEnd::Downstream) => panic!("downstream"),
            Ok(v) => panic!("decoded {} bytes", v.len()),
        }
    }

    #[test]
    fn each_format_decodes_split_anywhere_and_concatenated() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for c in ALL {
            let mut z = compress(c, &data[..150_000]);
            z.extend(compress(c, &data[150_000..]));
            let blocks: Vec<Vec<u8>> = z.chunks(777).map(<[u8]>::to_vec).collect();
            assert_eq!(run(c, blocks).ok().unwrap(), data, "{c}");
        }
    }

    #[test]
    fn cut_short_corrupt_and_trailing_data_are_errors_naming_the_format() {
        let data = vec![7u8; 300_000];
        for c in ALL {
            let z = compress(c, &data);
            let cut = detail(run(c, vec![z[..z.len() - 5].to_vec()]));
            assert!(cut.contains(&format!("{c}-compressed")), "{c}: {cut}");
            let mut bad = z.clone();
            let mid = bad.len() / 2;
            bad[mid..mid + 8].copy_from_slice(b"garbage!");
            let bad = detail(run(c, vec![bad]));
            assert!(bad.contains(&format!("{c}-compressed")), "{c}: {bad}");
            let mut tail = z.clone();
            tail.extend_from_slice(b"tail");
            let tail = detail(run(c, vec![tail]));
            assert!(tail.contains("does not decompress"), "{c}: {tail}");
        }
    }

    #[test]
    fn decode_prefix_gives_the_start_of_a_partial_stream() {
        // Incompressible: the cut falls after the first block of every format but bzip2's.
        let mut x = 88172645463325252u64;
        let data: Vec<u8> = (0..1_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for c in ALL {
            let z = compress(c, &data);
            let part = &z[..z.len() / 2];
            let got = decode_prefix(c, part, 1000);
            if c == Compression::Bzip2 {
                // bzip2 gives nothing before a whole block (100-900 kB of input) is in.
                assert!(data.starts_with(&got), "{c}");
            } else {
                assert_eq!(got, data[..1000], "{c}");
            }
        }
    }
}
