//! Lets every conforming gRPC client reach bicsi's gRPC servers, whatever `:authority` it sends.
//!
//! A gRPC client names the server it calls in the HTTP/2 `:authority` pseudo-header. For a unix
//! socket there is no host to name, and clients disagree on what to send: Go sends `localhost`,
//! gRPC's C core (Python, C++, Ruby) sends the socket path percent-encoded
//! (`unix:///run/csi.sock` → `run%2Fcsi.sock`), grpc-java the raw path, others nothing or an
//! empty value. The `h2` crate under tonic parses `:authority` with `http::uri::Authority`, which
//! takes only `[userinfo@]host[:port]` without `%` in the host, and answers any other value with
//! RST_STREAM(PROTOCOL_ERROR) before the request reaches tonic (`h2::server`'s
//! `convert_poll_message`); neither h2 nor hyper nor tonic has a setting to relax it.
//!
//! So the connection is read through [`AnyAuthority`]: it passes the client's bytes on to h2
//! unchanged, except header blocks, which it decodes (HPACK, RFC 7541) and encodes again, leaving
//! out an `:authority` that h2 would refuse. Such a request is then served as one without an
//! authority, which HTTP/2 allows. Nothing is weakened by it: no bicsi service reads the
//! authority (tonic routes by `:path`; there is no TLS or virtual hosting behind it), and a value
//! h2 accepts (`localhost`, `host:port`) passes untouched. Every field is written again as a
//! literal that does not enter h2's dynamic table, so this side's table and the client's stay
//! the only ones in use and cannot drift apart.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use futures::{Stream, TryStreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Wraps every connection of `incoming` in [`AnyAuthority`].
pub fn any_authority<S, IO, E>(incoming: S) -> impl Stream<Item = Result<AnyAuthority<IO>, E>>
where
    S: Stream<Item = Result<IO, E>>,
{
    incoming.map_ok(AnyAuthority::new)
}

/// A server-side connection whose incoming header blocks are rewritten as the module says.
pub struct AnyAuthority<T> {
    inner: T,
    /// Bytes read from the client, not yet handed on.
    raw: BytesMut,
    /// Bytes ready for the HTTP/2 server.
    out: BytesMut,
    eof: bool,
    rewriter: Rewriter,
}

impl<T> AnyAuthority<T> {
    pub fn new(inner: T) -> AnyAuthority<T> {
        AnyAuthority {
            inner,
            raw: BytesMut::new(),
            out: BytesMut::new(),
            eof: false,
            rewriter: Rewriter::default(),
        }
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AnyAuthority<T>
{
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AnyAuthority<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            this.rewriter.process(&mut this.raw, &mut this.out)?;
            if !this.out.is_empty() {
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // The client has gone: what is left (a cut-off frame) goes on as it came, and h2
                // sees the same end.
                this.eof = true;
                let rest = this.raw.split();
                this.out.extend_from_slice(&rest);
            } else {
                this.raw.extend_from_slice(rb.filled());
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AnyAuthority<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Whether h2 takes `value` as a request's `:authority`: it parses it exactly this way.
pub fn acceptable(value: &[u8]) -> bool {
    tonic::codegen::http::uri::Authority::try_from(value).is_ok()
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a peer may set (and h2's default): frames written to h2
/// never exceed it.
const MAX_FRAME: usize = 16 * 1024;
/// Bounds on one header block, encoded and decoded (h2's own limit on a decoded header list,
/// 16 KiB by default, is far below): a bigger one ends the connection.
const MAX_BLOCK: usize = 1 << 20;
/// The dynamic table size h2 offers clients (the HTTP/2 default; neither tonic nor hyper sends
/// SETTINGS_HEADER_TABLE_SIZE).
const TABLE_SIZE: usize = 4096;

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

#[derive(Default)]
enum Mode {
    /// Waiting for the client's connection preface.
    #[default]
    Preface,
    Frames,
    /// Not HTTP/2 with prior knowledge: everything goes on untouched.
    Passthrough,
}

/// The client's HTTP/2 frames, read one by one; header blocks are rewritten.
struct Rewriter {
    mode: Mode,
    /// Bytes of the current (not header) frame still to pass on.
    skip: usize,
    hpack: Decoder,
    /// A header block waiting for its CONTINUATION frames.
    pending: Option<Block>,
}

impl Default for Rewriter {
    fn default() -> Rewriter {
        Rewriter {
            mode: Mode::Preface,
            skip: 0,
            hpack: Decoder::new(TABLE_SIZE),
            pending: None,
        }
    }
}

struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl Rewriter {
    /// Moves what it can from `raw` to `out`; an incomplete frame waits in `raw`.
    fn process(&mut self, raw: &mut BytesMut, out: &mut BytesMut) -> io::Result<()> {
        loop {
            match self.mode {
                Mode::Passthrough => {
                    out.extend_from_slice(&raw.split());
                    return Ok(());
                }
                Mode::Preface => {
                    let n = raw.len().min(PREFACE.len());
                    if raw[..n] != PREFACE[..n] {
                        self.mode = Mode::Passthrough;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    out.extend_from_slice(&raw.split_to(n));
                    self.mode = Mode::Frames;
                }
                Mode::Frames => {
                    if self.skip > 0 {
                        let n = self.skip.min(raw.len());
                        out.extend_from_slice(&raw.split_to(n));
                        self.skip -= n;
                        if self.skip > 0 {
                            return Ok(());
                        }
                    }
                    if raw.len() < 9 {
                        return Ok(());
                    }
                    let len = (usize::from(raw[0]) << 16)
                        | (usize::from(raw[1]) << 8)
                        | usize::from(raw[2]);
                    let kind = raw[3];
                    if self.pending.is_some() && kind != CONTINUATION {
                        return Err(invalid("a header block was interrupted by another frame"));
                    }
                    if kind != HEADERS && kind != CONTINUATION {
                        out.extend_from_slice(&raw.split_to(9));
                        self.skip = len;
                        continue;
                    }
                    if len > MAX_BLOCK {
                        return Err(invalid("header frame too large"));
                    }
                    if raw.len() < 9 + len {
                        return Ok(());
                    }
                    let frame = raw.split_to(9 + len);
                    self.header_frame(&frame, out)?;
                }
            }
        }
    }

    fn header_frame(&mut self, frame: &[u8], out: &mut BytesMut) -> io::Result<()> {
        let (kind, flags) = (frame[3], frame[4]);
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let mut payload = &frame[9..];
        if kind == HEADERS {
            if flags & PADDED != 0 {
                let (&pad, rest) = payload
                    .split_first()
                    .ok_or_else(|| invalid("padded HEADERS frame without its pad length"))?;
                let keep = rest
                    .len()
                    .checked_sub(usize::from(pad))
                    .ok_or_else(|| invalid("HEADERS padding longer than the frame"))?;
                payload = &rest[..keep];
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                if payload.len() < 5 {
                    return Err(invalid("HEADERS frame too short for its priority"));
                }
                let mut p = [0u8; 5];
                p.copy_from_slice(&payload[..5]);
                priority = Some(p);
                payload = &payload[5..];
            }
            self.pending = Some(Block {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                fragment: payload.to_vec(),
            });
        } else {
            let block = self
                .pending
                .as_mut()
                .filter(|b| b.stream == stream)
                .ok_or_else(|| invalid("CONTINUATION frame without its HEADERS"))?;
            if block.fragment.len() + payload.len() > MAX_BLOCK {
                return Err(invalid("header block too large"));
            }
            block.fragment.extend_from_slice(payload);
        }
        if flags & END_HEADERS != 0 {
            let block = self.pending.take().expect("a block is pending");
            self.rewrite(block, out)?;
        }
        Ok(())
    }

    /// Decodes a whole header block and writes it on as HEADERS (and CONTINUATION) frames.
    fn rewrite(&mut self, block: Block, out: &mut BytesMut) -> io::Result<()> {
        let fields = self.hpack.decode(&block.fragment)?;
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        for f in &fields {
            if f.name == b":authority" && !acceptable(&f.value) {
                tracing::debug!(
                    authority = %String::from_utf8_lossy(&f.value),
                    "serving a request without the :authority it gave, which is not host[:port]"
                );
                continue;
            }
            encode_literal(&mut encoded, f);
        }
        let mut rest = &encoded[..];
        let mut first = true;
        loop {
            let room = MAX_FRAME
                - if first && block.priority.is_some() {
                    5
                } else {
                    0
                };
            let (chunk, more) = rest.split_at(rest.len().min(room));
            rest = more;
            let mut flags = if rest.is_empty() { END_HEADERS } else { 0 };
            let kind = if first {
                if block.end_stream {
                    flags |= END_STREAM;
                }
                if block.priority.is_some() {
                    flags |= PRIORITY;
                }
                HEADERS
            } else {
                CONTINUATION
            };
            let prio: &[u8] = match (&block.priority, first) {
                (Some(p), true) => p,
                _ => &[],
            };
            let len = prio.len() + chunk.len();
            out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
            out.extend_from_slice(&block.stream.to_be_bytes());
            out.extend_from_slice(prio);
            out.extend_from_slice(chunk);
            first = false;
            if rest.is_empty() {
                return Ok(());
            }
        }
    }
}

/// One decoded header field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
    /// Sent as "never indexed" (RFC 7541 6.2.3): kept so on the way.
    pub sensitive: bool,
}

impl Field {
    fn size(&self) -> usize {
        self.name.len() + self.value.len() + 32
    }
}

/// A literal field without indexing (or never indexed), with a literal name and no Huffman
/// coding: h2's dynamic table never changes.
fn encode_literal(out: &mut Vec<u8>, f: &Field) {
    out.push(if f.sensitive { 0x10 } else { 0x00 });
    for s in [&f.name, &f.value] {
        encode_int(out, s.len(), 7, 0x00);
        out.extend_from_slice(s);
    }
}

fn encode_int(out: &mut Vec<u8>, mut value: usize, prefix: u8, first: u8) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// An HPACK decoder (RFC 7541): the client's dynamic table, mirrored.
pub struct Decoder {
    table: VecDeque<Field>,
    size: usize,
    max: usize,
    /// The most the client may make the table (what the server allows).
    limit: usize,
}

impl Decoder {
    pub fn new(limit: usize) -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max: limit,
            limit,
        }
    }

    /// Decodes one whole header block.
    pub fn decode(&mut self, mut src: &[u8]) -> io::Result<Vec<Field>> {
        let mut fields = Vec::new();
        let mut list = 0usize;
        while let Some(&b) = src.first() {
            let field = if b & 0x80 != 0 {
                let i = decode_int(&mut src, 7)?;
                self.get(i)?
            } else if b & 0xe0 == 0x20 {
                if !fields.is_empty() {
                    return Err(invalid("HPACK table size update after a header field"));
                }
                let max = decode_int(&mut src, 5)?;
                if max > self.limit {
                    return Err(invalid("HPACK table size update above the allowed size"));
                }
                self.max = max;
                self.evict(0);
                continue;
            } else {
                // 01: incremental indexing (6-bit index); 0000 without and 0001 never indexed
                // (4-bit index).
                let (prefix, index) = if b & 0xc0 == 0x40 {
                    (6, true)
                } else {
                    (4, false)
                };
                let sensitive = b & 0xf0 == 0x10;
                let i = decode_int(&mut src, prefix)?;
                let name = if i == 0 {
                    decode_string(&mut src)?
                } else {
                    self.get(i)?.name
                };
                let value = decode_string(&mut src)?;
                let field = Field {
                    name,
                    value,
                    sensitive,
                };
                if index {
                    self.insert(field.clone());
                }
                field
            };
            list += field.size();
            if list > MAX_BLOCK {
                return Err(invalid("header list too large"));
            }
            fields.push(field);
        }
        Ok(fields)
    }

    fn get(&self, index: usize) -> io::Result<Field> {
        let (name, value): (&[u8], &[u8]) = match index {
            0 => return Err(invalid("HPACK index 0")),
            i if i <= STATIC.len() => {
                let (n, v) = STATIC[i - 1];
                (n.as_bytes(), v.as_bytes())
            }
            i => {
                let f = self
                    .table
                    .get(i - STATIC.len() - 1)
                    .ok_or_else(|| invalid("HPACK index past the table"))?;
                (&f.name, &f.value)
            }
        };
        Ok(Field {
            name: name.to_vec(),
            value: value.to_vec(),
            sensitive: false,
        })
    }

    fn insert(&mut self, field: Field) {
        let size = field.size();
        self.evict(size);
        if size <= self.max {
            self.size += size;
            self.table.push_front(field);
        }
    }

    /// Evicts the oldest entries until `room` more fits (all of them if it cannot).
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            match self.table.pop_back() {
                Some(f) => self.size -= f.size(),
                None => break,
            }
        }
    }
}

fn decode_int(src: &mut &[u8], prefix: u8) -> io::Result<usize> {
    let max = (1usize << prefix) - 1;
    let (&first, rest) = src
        .split_first()
        .ok_or_else(|| invalid("HPACK integer cut off"))?;
    *src = rest;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let (&b, rest) = src
            .split_first()
            .ok_or_else(|| invalid("HPACK integer cut off"))?;
        *src = rest;
        if shift > 21 {
            return Err(invalid("HPACK integer too large"));
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

fn decode_string(src: &mut &[u8]) -> io::Result<Vec<u8>> {
    let huffman = src.first().is_some_and(|b| b & 0x80 != 0);
    let len = decode_int(src, 7)?;
    if len > src.len() {
        return Err(invalid("HPACK string cut off"));
    }
    let (s, rest) = src.split_at(len);
    *src = rest;
    if huffman {
        huffman_decode(s)
    } else {
        Ok(s.to_vec())
    }
}

/// The Huffman code's length in bits for each symbol, 0..=255 and EOS (RFC 7541 Appendix B).
/// The code is canonical: each length's codes are consecutive, in symbol order, and follow
/// the last code of the length before (shifted), so the lengths alone give every code.
const HUFFMAN_BITS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, // 0x00
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, // 0x10
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, // ' ' .. '/'
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, // '0' .. '?'
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, // '@' .. 'O'
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, // 'P' .. '_'
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, // '`' .. 'o'
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, // 'p' .. 0x7f
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, // 0x80
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, // 0x90
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, // 0xa0
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, // 0xb0
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, // 0xc0
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, // 0xd0
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, // 0xe0
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, // 0xf0
    30, // EOS
];

const EOS: u16 = 256;

/// The canonical code, by length: the first code, how many, and where its symbols start in
/// the symbols sorted by (length, symbol).
struct Huffman {
    first: [u32; 31],
    count: [u32; 31],
    offset: [usize; 31],
    symbols: [u16; 257],
}

fn huffman() -> &'static Huffman {
    static CODE: std::sync::OnceLock<Huffman> = std::sync::OnceLock::new();
    CODE.get_or_init(|| {
        let mut h = Huffman {
            first: [0; 31],
            count: [0; 31],
            offset: [0; 31],
            symbols: [0; 257],
        };
        for &bits in &HUFFMAN_BITS {
            h.count[usize::from(bits)] += 1;
        }
        let (mut code, mut at) = (0u32, 0usize);
        for len in 1..31 {
            code = (code + if len > 1 { h.count[len - 1] } else { 0 }) << 1;
            h.first[len] = code;
            h.offset[len] = at;
            at += h.count[len] as usize;
        }
        let mut next = h.offset;
        for (sym, &bits) in HUFFMAN_BITS.iter().enumerate() {
            h.symbols[next[usize::from(bits)]] = sym as u16;
            next[usize::from(bits)] += 1;
        }
        h
    })
}

/// Decodes a Huffman-coded string: padding must be under 8 bits and all ones (a prefix of EOS),
/// and EOS itself must not appear.
pub fn huffman_decode(src: &[u8]) -> io::Result<Vec<u8>> {
    let h = huffman();
    let mut out = Vec::with_capacity(src.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0usize);
    for byte in src {
        for bit in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> bit) & 1);
            len += 1;
            if len > 30 {
                return Err(invalid("bad Huffman code"));
            }
            let i = code.wrapping_sub(h.first[len]);
            if code >= h.first[len] && i < h.count[len] {
                let sym = h.symbols[h.offset[len] + i as usize];
                if sym == EOS {
                    return Err(invalid("EOS in a Huffman-coded string"));
                }
                out.push(sym as u8);
                (code, len) = (0, 0);
            }
        }
    }
    if len >= 8 || code != (1u32 << len) - 1 {
        return Err(invalid("bad Huffman padding"));
    }
    Ok(out)
}

/// The static table (RFC 7541 Appendix A), index 1 first.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        hex::decode(s).unwrap()
    }

    fn pairs(fields: &[Field]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8(f.name.clone()).unwrap(),
                    String::from_utf8(f.value.clone()).unwrap(),
                )
            })
            .collect()
    }

    fn p(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_huffman_code_is_complete_and_decodes_the_rfc_examples() {
        // A complete prefix code: the lengths fill the code space exactly (Kraft equality).
        let space: u64 = HUFFMAN_BITS.iter().map(|&b| 1u64 << (30 - b)).sum();
        assert_eq!(space, 1 << 30);
        // RFC 7541 C.4 and C.6.
        for (coded, text) in [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            (
                "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            (
                "9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3",
                "https://www.example.com",
            ),
            (
                "94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 \
                 3160 65c0 03ed 4ee5 b106 3d50 07",
                "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
            ),
        ] {
            assert_eq!(huffman_decode(&unhex(coded)).unwrap(), text.as_bytes());
        }
        // Padding of 8 bits or more, padding with a 0 bit, and EOS itself are errors.
        assert!(huffman_decode(&unhex("6402 ff")).is_err());
        assert_eq!(huffman_decode(&[0x07]).unwrap(), b"0");
        assert!(huffman_decode(&[0x00]).is_err());
        assert!(huffman_decode(&unhex("ffff fffc")).is_err());
    }

    #[test]
    fn decodes_the_rfc_request_examples_with_their_dynamic_table() {
        // RFC 7541 C.3 (plain) and C.4 (Huffman): three requests on one connection.
        for blocks in [
            [
                "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "8286 84be 5808 6e6f 2d63 6163 6865",
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            ],
            [
                "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                "8286 84be 5886 a8eb 1064 9cbf",
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ],
        ] {
            let mut d = Decoder::new(TABLE_SIZE);
            let base = [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ];
            assert_eq!(pairs(&d.decode(&unhex(blocks[0])).unwrap()), p(&base));
            let mut second = base.to_vec();
            second.push(("cache-control", "no-cache"));
            assert_eq!(pairs(&d.decode(&unhex(blocks[1])).unwrap()), p(&second));
            assert_eq!(
                pairs(&d.decode(&unhex(blocks[2])).unwrap()),
                p(&[
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/index.html"),
                    (":authority", "www.example.com"),
                    ("custom-key", "custom-value"),
                ])
            );
            assert_eq!(d.size, 164);
            assert_eq!(d.table.len(), 3);
        }
    }

    #[test]
    fn the_dynamic_table_evicts_and_refuses_oversized_updates() {
        let mut d = Decoder::new(TABLE_SIZE);
        // A size update to 50 bytes: one 45-byte entry fits; the next evicts it.
        let mut b = vec![0x3f, 50 - 31];
        for v in ["aaaaaaaaaaaa", "bbbbbbbbbbbb"] {
            b.extend_from_slice(&[0x40, 1, b'x', v.len() as u8]);
            b.extend_from_slice(v.as_bytes());
        }
        b.push(0x80 | 62);
        let f = pairs(&d.decode(&b).unwrap());
        assert_eq!(f[2], ("x".to_string(), "bbbbbbbbbbbb".to_string()));
        assert_eq!(d.table.len(), 1);
        assert!(d.decode(&[0x80 | 63]).is_err(), "evicted entry");
        // Above what the server allows.
        assert!(
            Decoder::new(TABLE_SIZE).decode(&[0x3f, 0xe1, 0x1f]).is_ok(),
            "4096"
        );
        assert!(
            Decoder::new(TABLE_SIZE)
                .decode(&[0x3f, 0xe2, 0x1f])
                .is_err(),
            "4097"
        );
        assert!(Decoder::new(TABLE_SIZE).decode(&[0x00]).is_err(), "cut off");
        assert!(Decoder::new(TABLE_SIZE).decode(&[0x80]).is_err(), "index 0");
    }

    /// A header block as gRPC's C core writes it for `unix:///tmp/x.sock`: new names, indexed
    /// incrementally, then the same request again from the dynamic table.
    fn c_core_request(authority: &str) -> (Vec<u8>, Vec<u8>) {
        let lit = |out: &mut Vec<u8>, n: &str, v: &str| {
            out.push(0x40);
            for s in [n, v] {
                encode_int(out, s.len(), 7, 0);
                out.extend_from_slice(s.as_bytes());
            }
        };
        let mut first = Vec::new();
        lit(&mut first, ":path", "/csi.v1.Identity/GetPluginInfo");
        lit(&mut first, ":authority", authority);
        first.extend_from_slice(&[0x83, 0x86]);
        lit(&mut first, "content-type", "application/grpc");
        lit(&mut first, "te", "trailers");
        // The second: every field from the dynamic table (newest first: te is 62).
        let second = vec![0x80 | 65, 0x80 | 64, 0x83, 0x86, 0x80 | 63, 0x80 | 62];
        (first, second)
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Reads the rewritten stream as h2 would: frames, and header blocks through a decoder of
    /// its own whose table must never be needed.
    fn h2_view(mut out: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert!(out.starts_with(PREFACE));
        out = &out[PREFACE.len()..];
        let mut frames = Vec::new();
        while !out.is_empty() {
            let len =
                (usize::from(out[0]) << 16) | (usize::from(out[1]) << 8) | usize::from(out[2]);
            let stream = u32::from_be_bytes([out[5], out[6], out[7], out[8]]);
            frames.push((out[3], out[4], stream, out[9..9 + len].to_vec()));
            out = &out[9 + len..];
        }
        frames
    }

    fn rewrite_all(input: &[u8], step: usize) -> Vec<u8> {
        let mut r = Rewriter::default();
        let (mut raw, mut out) = (BytesMut::new(), BytesMut::new());
        for chunk in input.chunks(step) {
            raw.extend_from_slice(chunk);
            r.process(&mut raw, &mut out).unwrap();
        }
        assert!(raw.is_empty());
        out.to_vec()
    }

    #[test]
    fn leaves_out_only_an_authority_h2_refuses_and_keeps_the_tables_apart() {
        for (authority, kept) in [
            ("tmp%2Fx.sock", false),
            ("/tmp/x.sock", false),
            ("", false),
            ("localhost", true),
            ("127.0.0.1:50051", true),
            ("[::1]:50051", true),
        ] {
            assert_eq!(acceptable(authority.as_bytes()), kept, "{authority}");
            let (first, second) = c_core_request(authority);
            let mut input = PREFACE.to_vec();
            input.extend(frame(0x4, 0, 0, &[]));
            input.extend(frame(HEADERS, END_HEADERS, 1, &first));
            input.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
            input.extend(frame(HEADERS, END_HEADERS, 3, &second));
            input.extend(frame(0x0, END_STREAM, 3, &[0, 0, 0, 0, 0]));
            // Byte by byte and all at once read the same.
            let out = rewrite_all(&input, 1);
            assert_eq!(out, rewrite_all(&input, input.len()));
            let frames = h2_view(&out);
            let kinds: Vec<(u8, u32)> = frames.iter().map(|f| (f.0, f.2)).collect();
            assert_eq!(kinds, [(4, 0), (HEADERS, 1), (0, 1), (HEADERS, 3), (0, 3)]);
            let mut want = vec![
                (":path", "/csi.v1.Identity/GetPluginInfo"),
                (":authority", authority),
                (":method", "POST"),
                (":scheme", "http"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ];
            if !kept {
                want.remove(1);
            }
            // h2's decoder with no dynamic table at all reads both requests.
            let mut h2 = Decoder::new(0);
            for i in [1, 3] {
                assert_eq!(frames[i].1, END_HEADERS);
                assert_eq!(
                    pairs(&h2.decode(&frames[i].3).unwrap()),
                    p(&want),
                    "{authority}"
                );
            }
            assert_eq!(frames[2].3, [0, 0, 0, 0, 0]);
        }
    }

    #[test]
    fn splits_big_blocks_keeps_priority_end_stream_and_sensitivity_and_drops_padding() {
        let big = "v".repeat(40_000);
        let mut block = Vec::new();
        for (n, v, flag) in [(":path", "/x", 0x00), ("big", big.as_str(), 0x10)] {
            block.push(flag);
            for s in [n, v] {
                encode_int(&mut block, s.len(), 7, 0);
                block.extend_from_slice(s.as_bytes());
            }
        }
        // HEADERS, padded and with a priority, then two CONTINUATIONs.
        let (a, rest) = block.split_at(1000);
        let (b, c) = rest.split_at(30_000);
        let mut payload = vec![3];
        payload.extend_from_slice(&[0, 0, 0, 0, 7]);
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &payload));
        input.extend(frame(CONTINUATION, 0, 5, b));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, c));
        let frames = h2_view(&rewrite_all(&input, 4096));
        assert!(frames.len() >= 3);
        assert_eq!(frames[0].0, HEADERS);
        assert_eq!(frames[0].1, PRIORITY | END_STREAM);
        assert_eq!(&frames[0].3[..5], &[0, 0, 0, 0, 7]);
        let mut joined = frames[0].3[5..].to_vec();
        for (i, f) in frames.iter().enumerate().skip(1) {
            assert_eq!(f.0, CONTINUATION);
            let last = i == frames.len() - 1;
            assert_eq!(f.1, if last { END_HEADERS } else { 0 });
            joined.extend_from_slice(&f.3);
        }
        assert!(frames.iter().all(|f| f.3.len() <= MAX_FRAME));
        let fields = Decoder::new(0).decode(&joined).unwrap();
        assert_eq!(pairs(&fields)[1].1, big);
        assert!(!fields[0].sensitive && fields[1].sensitive);
    }

    #[test]
    fn anything_but_http2_with_prior_knowledge_passes_untouched() {
        let http1 = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut r = Rewriter::default();
        let (mut raw, mut out) = (BytesMut::from(&http1[..3]), BytesMut::new());
        r.process(&mut raw, &mut out).unwrap();
        raw.extend_from_slice(&http1[3..]);
        r.process(&mut raw, &mut out).unwrap();
        assert_eq!(&out[..], &http1[..]);
    }

    /// What a tonic server with bicsi's Identity service answers a client that sends
    /// `authority` over a unix socket, with or without [`any_authority`].
    async fn call_identity(authority: &str, layer: bool) -> Result<Vec<(String, String)>, u32> {
        use crate::csi::identity::IdentityService;
        use crate::csi::pb::identity_server::IdentityServer;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("csi.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let router =
            tonic::transport::Server::builder().add_service(IdentityServer::new(IdentityService {
                driver_name: "bicsi.test".into(),
                controller: true,
            }));
        let server = if layer {
            tokio::spawn(router.serve_with_incoming(any_authority(incoming)))
        } else {
            tokio::spawn(router.serve_with_incoming(incoming))
        };
        let mut conn = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let (request, _) = c_core_request(authority);
        let mut out = PREFACE.to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        out.extend(frame(HEADERS, END_HEADERS, 1, &request));
        out.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
        conn.write_all(&out).await.unwrap();
        let mut decoder = Decoder::new(TABLE_SIZE);
        let mut headers = Vec::new();
        let answer = async {
            loop {
                let mut head = [0u8; 9];
                conn.read_exact(&mut head).await.unwrap();
                let len = (usize::from(head[0]) << 16)
                    | (usize::from(head[1]) << 8)
                    | usize::from(head[2]);
                let mut payload = vec![0u8; len];
                conn.read_exact(&mut payload).await.unwrap();
                match head[3] {
                    // RST_STREAM: its error code.
                    0x3 => return Err(u32::from_be_bytes(payload[..4].try_into().unwrap())),
                    HEADERS => {
                        assert_ne!(head[4] & END_HEADERS, 0);
                        headers.extend(pairs(&decoder.decode(&payload).unwrap()));
                        if head[4] & END_STREAM != 0 {
                            return Ok(headers);
                        }
                    }
                    _ => {}
                }
            }
        };
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), answer)
            .await
            .expect("an answer within 10 s");
        server.abort();
        result
    }

    #[tokio::test]
    async fn a_tonic_server_answers_the_c_cores_unix_socket_authority_through_the_layer() {
        let has =
            |h: &[(String, String)], n: &str, v: &str| h.iter().any(|(a, b)| a == n && b == v);
        // The cause: h2 answers RST_STREAM(PROTOCOL_ERROR = 1) to the C core's authority.
        assert_eq!(call_identity("tmp%2Fx.sock", false).await, Err(1));
        for authority in ["tmp%2Fx.sock", "/tmp/x.sock", "", "localhost"] {
            let h = call_identity(authority, true).await.unwrap();
            assert!(has(&h, ":status", "200"), "{authority}: {h:?}");
            assert!(has(&h, "grpc-status", "0"), "{authority}: {h:?}");
        }
    }
}
