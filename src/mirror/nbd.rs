//! The mirror engine's NBD client: one replica on another node, read and written through that
//! node's raw replica server (`crate::replica_server`, bicsi's own; qemu-storage-daemon's NBD
//! server, which served them before, speaks the same protocol) over TCP. The protocol's numbers
//! are `crate::nbd_wire`'s.
//!
//! Protocol (the NBD spec's fixed newstyle): the handshake asks for the export by name with
//! `NBD_OPT_GO` (`NBD_OPT_EXPORT_NAME` when a server does not know GO), and transmission uses
//! simple replies only (no structured replies are negotiated): READ, WRITE (with FUA when
//! asked), FLUSH and WRITE_ZEROES, the last two only when the server advertises them. No TRIM:
//! the engine's discards are punched holes of the volume file, which must read back as zeros,
//! and NBD's TRIM does not promise that; WRITE_ZEROES without NO_HOLE does, and lets the server
//! free the blocks (qemu's replica server opens replicas with discard=unmap).
//!
//! Many requests in flight: every caller (a FUSE worker thread) sends its request whole (header
//! and payload in one vectored write) under its connection's writer lock and waits for its own
//! reply, which the connection's reader thread matches by handle (servers run the requests of
//! one connection concurrently and may answer out of order). A request can also be sent and
//! its reply awaited later (`begin_write`, `begin_flush`, then `finish`), so the engine writes
//! its local replicas while the remote one works. Several connections to one export when the
//! server advertises multi-conn (`NBD_FLAG_CAN_MULTI_CONN`, as bicsi's replica server does):
//! each request goes to a connection whose writer is free, so payloads cross in parallel and
//! no caller waits behind another's 1 MiB; the spec promises that a FLUSH on one of them covers
//! every write acknowledged on any, which is what fsync of the volume needs. A server without
//! multi-conn (qemu's, on a writable export) gets one connection whatever was asked, where a
//! FLUSH covers every write acknowledged before it.
//!
//! TLS (issue 19): given the node's certificate (`bicsi engine-mirror --tls-dir`), the client
//! asks for `NBD_OPT_STARTTLS` before anything else, and refuses to go on without it; the
//! server's certificate must be a node's of the cluster CA. The session then runs through the
//! pump of `crate::nbd_tls`, unchanged.
//!
//! Failures are final: a request that fails, a connection (any of them) that drops, or a reply
//! that does not come within the timeout (`replica-timeout`) marks the client dead, shuts every
//! socket down (the reader threads and every waiting caller get an error at once) and every
//! later request fails at once. The engine drops such a replica and records why; it is never reconnected, because a
//! replica that missed writes must not be read again until it is rebuilt.
//!
//! It must not retry, reconnect, or hide a failure from the engine.

use std::collections::HashMap;
use std::io::{IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};

use crate::nbd_tls::Sock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::nbd_wire::{
    CMD_DISC, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_WRITE, CMD_WRITE_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_EXPORT, NBDMAGIC, OPT_EXPORT_NAME, OPT_GO,
    OPT_STARTTLS, REP_ACK, REP_ERR_UNSUP, REP_INFO, REPLY_MAGIC_OPT, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC, TFLAG_CAN_MULTI_CONN, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA,
    TFLAG_SEND_WRITE_ZEROES, be16, be32, be64,
};

/// The largest READ or WRITE sent as one request (qemu's server takes up to 32 MiB).
const MAX_IO: usize = 8 << 20;
/// The largest WRITE_ZEROES sent as one request (the length field has 32 bits).
const MAX_RANGE: u64 = 1 << 30;
/// A zero buffer for zeroing on a server without WRITE_ZEROES.
const ZERO_CHUNK: usize = 1 << 20;

type Reply = std::io::Result<Vec<u8>>;

/// A caller waiting for a reply: where to send it, how many data bytes a READ's reply has, and
/// the connection its request went out on (the only one that may answer it).
struct Waiting {
    tx: SyncSender<Reply>,
    read_len: usize,
    conn: usize,
}

/// One TCP connection of a client.
struct Conn {
    /// Where requests are written (one at a time, each whole).
    writer: Mutex<Sock>,
    /// For `shutdown`, independent of the writer's lock (a writer stuck on a full socket).
    socket: Sock,
    /// Requests sent on it (tests: the connections share the load).
    sent: AtomicU64,
}

struct Shared {
    conns: Vec<Conn>,
    waiting: Mutex<HashMap<u64, Waiting>>,
    next_handle: AtomicU64,
    dead: AtomicBool,
    /// Why the connection died, for the errors of later requests.
    cause: Mutex<String>,
}

impl Shared {
    /// Marks the client dead (the first cause is kept), shuts every connection down and fails
    /// every waiting caller.
    fn kill(&self, cause: &str) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            *self.cause.lock().unwrap_or_else(|e| e.into_inner()) = cause.to_string();
        }
        for c in &self.conns {
            let _ = c.socket.shutdown(Shutdown::Both);
        }
        let waiting: Vec<Waiting> = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, w)| w)
            .collect();
        for w in waiting {
            let _ = w.tx.try_send(Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                cause.to_string(),
            )));
        }
    }

    fn dead_error(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            format!(
                "the connection is closed: {}",
                self.cause.lock().unwrap_or_else(|e| e.into_inner())
            ),
        )
    }
}

/// Requests sent and not yet answered (`NbdClient::finish` waits for them).
#[must_use = "a sent request is done only once `finish` has its reply"]
pub struct Pending {
    /// Each request's reply and the moment it is late (its send + the timeout).
    replies: Vec<(Receiver<Reply>, Instant)>,
}

/// Writes `head` then `payload` whole, in as few system calls as the socket takes.
fn write_request(w: &mut Sock, head: &[u8], payload: &[u8]) -> std::io::Result<()> {
    let mut slices = [IoSlice::new(head), IoSlice::new(payload)];
    let mut left: &mut [IoSlice<'_>] = &mut slices;
    if payload.is_empty() {
        left = &mut left[..1];
    }
    while !left.is_empty() {
        match w.write_vectored(left) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "the socket took no bytes",
                ));
            }
            Ok(n) => IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A connection to one NBD export, usable from many threads at once.
pub struct NbdClient {
    shared: Arc<Shared>,
    /// Where the next request looks for a free connection first (round robin).
    next_conn: AtomicUsize,
    /// The export's size in bytes.
    size: u64,
    flags: u16,
    timeout: Duration,
    /// "nbd://host:port/export", for messages.
    name: String,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NbdClient({})", self.name)
    }
}

fn protocol(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// An option request: IHAVEOPT, the option, its data.
fn send_option(s: &mut Sock, option: u32, data: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg)
}

/// One option reply: its type and data.
fn read_option_reply(s: &mut Sock, option: u32) -> std::io::Result<(u32, Vec<u8>)> {
    let mut head = [0u8; 20];
    s.read_exact(&mut head)?;
    if be64(&head) != REPLY_MAGIC_OPT || be32(&head[8..]) != option {
        return Err(protocol(format!(
            "the server answered option {option} with magic {:#x} for option {}",
            be64(&head),
            be32(&head[8..])
        )));
    }
    let len = be32(&head[16..]) as usize;
    if len > 64 << 10 {
        return Err(protocol(format!("an option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len];
    s.read_exact(&mut data)?;
    Ok((be32(&head[12..]), data))
}

/// NBD_OPT_GO for `export`: Ok(Some((size, flags))), or Ok(None) when the server does not
/// know the option (then EXPORT_NAME is the way).
fn opt_go(s: &mut Sock, export: &str) -> std::io::Result<Option<(u64, u16)>> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(s, OPT_GO, &data)?;
    let mut info = None;
    loop {
        let (kind, data) = read_option_reply(s, OPT_GO)?;
        match kind {
            REP_INFO if data.len() >= 12 && be16(&data) == INFO_EXPORT => {
                info = Some((be64(&data[2..]), be16(&data[10..])));
            }
            REP_INFO => {}
            REP_ACK => {
                return info.map(Some).ok_or_else(|| {
                    protocol("the server ended NBD_OPT_GO without the export's size".into())
                });
            }
            REP_ERR_UNSUP => return Ok(None),
            k if k & (1 << 31) != 0 => {
                let text = String::from_utf8_lossy(&data);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "the server refused export {export:?} (error {:#x}{}{text}); is the \
                         replica exported on its node (replica server)?",
                        k & !(1 << 31),
                        if text.is_empty() { "" } else { ": " }
                    ),
                ));
            }
            k => return Err(protocol(format!("unknown option reply type {k}"))),
        }
    }
}

impl NbdClient {
    /// Connects to `export` on host:port and negotiates; `timeout` bounds the connection, the
    /// handshake and every later request.
    #[cfg(test)]
    pub fn connect(
        host: &str,
        port: u16,
        export: &str,
        timeout: Duration,
    ) -> std::io::Result<NbdClient> {
        Self::connect_tls(host, port, export, timeout, None)
    }

    /// `connect`, inside TLS when `tls` is given: `NBD_OPT_STARTTLS` first, then the handshake
    /// with `tls` (the node's certificate; the server's must be a node's of the cluster CA),
    /// then the rest of the protocol through the pump of `crate::nbd_tls`.
    #[cfg(test)]
    pub fn connect_tls(
        host: &str,
        port: u16,
        export: &str,
        timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> std::io::Result<NbdClient> {
        Self::connect_pool(host, port, export, timeout, tls, 1)
    }

    /// `connect_tls` with up to `connections` connections to the export: that many when the
    /// server advertises multi-conn, one otherwise. Every connection must show the first one's
    /// size and flags.
    pub fn connect_pool(
        host: &str,
        port: u16,
        export: &str,
        timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
        connections: usize,
    ) -> std::io::Result<NbdClient> {
        let name = if host.contains(':') {
            format!("nbd://[{host}]:{port}/{export}")
        } else {
            format!("nbd://{host}:{port}/{export}")
        };
        let context = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{name}: {e}"));
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(context)?
            .next()
            .ok_or_else(|| context(std::io::Error::other("the host has no address")))?;
        let open = || -> std::io::Result<(Sock, u64, u16)> {
            let tcp = TcpStream::connect_timeout(&addr, timeout)?;
            tcp.set_nodelay(true)?;
            tcp.set_read_timeout(Some(timeout))?;
            tcp.set_write_timeout(Some(timeout))?;
            let mut s = Sock::Tcp(tcp);
            let (size, flags) = Self::handshake(&mut s, export, tls.clone(), timeout)?;
            // The reader thread waits for replies as long as it takes; the callers time out.
            s.set_read_timeout(None)?;
            Ok((s, size, flags))
        };
        let (first, size, flags) = open().map_err(context)?;
        let mut socks = vec![first];
        let wanted = if flags & TFLAG_CAN_MULTI_CONN != 0 {
            connections.max(1)
        } else {
            1
        };
        while socks.len() < wanted {
            let (s, len, more) = open().map_err(context)?;
            if (len, more) != (size, flags) {
                return Err(context(protocol(format!(
                    "a second connection to the export shows {len} bytes and flags {more:#x},                      the first {size} bytes and flags {flags:#x}"
                ))));
            }
            socks.push(s);
        }
        let conns = socks
            .iter()
            .map(|s| {
                Ok(Conn {
                    writer: Mutex::new(s.try_clone()?),
                    socket: s.try_clone()?,
                    sent: AtomicU64::new(0),
                })
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(context)?;
        let shared = Arc::new(Shared {
            conns,
            waiting: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            dead: AtomicBool::new(false),
            cause: Mutex::new(String::new()),
        });
        for (i, s) in socks.into_iter().enumerate() {
            let reader = shared.clone();
            let spawned = std::thread::Builder::new()
                .name("nbd-reader".into())
                .spawn(move || read_replies(&reader, i, s));
            if let Err(e) = spawned {
                shared.kill("a reader thread could not start");
                return Err(context(e));
            }
        }
        Ok(NbdClient {
            shared,
            next_conn: AtomicUsize::new(0),
            size,
            flags,
            timeout,
            name,
        })
    }

    /// How many connections carry the requests.
    pub fn connections(&self) -> usize {
        self.shared.conns.len()
    }

    fn handshake(
        s: &mut Sock,
        export: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> std::io::Result<(u64, u16)> {
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if be64(&hello) != NBDMAGIC || be64(&hello[8..]) != IHAVEOPT {
            return Err(protocol(
                "the server is not an NBD server speaking the newstyle handshake".into(),
            ));
        }
        let server = be16(&hello[16..]);
        if server & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol(
                "the server does not speak the fixed newstyle handshake".into(),
            ));
        }
        let client = (server & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)) as u32;
        s.write_all(&client.to_be_bytes())?;
        if let Some(config) = tls {
            send_option(s, OPT_STARTTLS, &[])?;
            let (kind, data) = read_option_reply(s, OPT_STARTTLS)?;
            if kind != REP_ACK {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "the server does not offer TLS (reply {kind:#x}: {}); is its replica                          server started with the node's --tls-dir?",
                        String::from_utf8_lossy(&data)
                    ),
                ));
            }
            let Sock::Tcp(tcp) = &*s else {
                unreachable!("STARTTLS is sent once, on TCP")
            };
            let plain = crate::nbd_tls::connect(tcp.try_clone()?, config, crate::tls::Role::Node)?;
            plain.set_read_timeout(Some(timeout))?;
            plain.set_write_timeout(Some(timeout))?;
            *s = Sock::Unix(plain);
        }
        if let Some(found) = opt_go(s, export)? {
            return Ok(found);
        }
        send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
        let mut info = [0u8; 10];
        s.read_exact(&mut info)?;
        if server & FLAG_NO_ZEROES == 0 {
            let mut zeroes = [0u8; 124];
            s.read_exact(&mut zeroes)?;
        }
        Ok((be64(&info), be16(&info[8..])))
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }

    /// Sends one request and waits for its reply (the data of a READ).
    fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<Vec<u8>> {
        let (rx, late) = self.send(kind, flags, offset, len, payload)?;
        self.wait(rx, late)
    }

    /// Sends one request on a connection whose writer is free (else the next one's, in turn)
    /// and returns where its reply will come, and when it is late.
    fn send(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<(Receiver<Reply>, Instant)> {
        let shared = &self.shared;
        if shared.dead.load(Ordering::Acquire) {
            return Err(shared.dead_error());
        }
        let n = shared.conns.len();
        let start = self.next_conn.fetch_add(1, Ordering::Relaxed) % n;
        let mut writer = None;
        for k in 0..n {
            let i = (start + k) % n;
            if let Ok(w) = shared.conns[i].writer.try_lock() {
                writer = Some((i, w));
                break;
            }
        }
        let (conn, mut w) = match writer {
            Some(found) => found,
            None => (
                start,
                shared.conns[start]
                    .writer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            ),
        };
        let handle = shared.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        let read_len = if kind == CMD_READ { len as usize } else { 0 };
        shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(handle, Waiting { tx, read_len, conn });
        let mut head = [0u8; 28];
        head[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        head[4..6].copy_from_slice(&flags.to_be_bytes());
        head[6..8].copy_from_slice(&kind.to_be_bytes());
        head[8..16].copy_from_slice(&handle.to_be_bytes());
        head[16..24].copy_from_slice(&offset.to_be_bytes());
        head[24..28].copy_from_slice(&len.to_be_bytes());
        let late = Instant::now() + self.timeout;
        let sent = write_request(&mut w, &head, payload);
        drop(w);
        shared.conns[conn].sent.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = sent {
            let cause = format!("sending a request to {} failed: {e}", self.name);
            shared.kill(&cause);
            return Err(std::io::Error::new(e.kind(), cause));
        }
        Ok((rx, late))
    }

    /// Waits for one reply until `late`; past it the client is dead (replica-timeout).
    fn wait(&self, rx: Receiver<Reply>, late: Instant) -> std::io::Result<Vec<u8>> {
        let shared = &self.shared;
        match rx.recv_timeout(late.saturating_duration_since(Instant::now())) {
            Ok(reply) => reply,
            Err(RecvTimeoutError::Timeout) => {
                let cause = format!(
                    "{} did not answer within {:?} (replica-timeout)",
                    self.name, self.timeout
                );
                shared.kill(&cause);
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, cause))
            }
            Err(RecvTimeoutError::Disconnected) => Err(shared.dead_error()),
        }
    }

    /// Sends `data` at `offset` as WRITEs without waiting: `finish` waits for their replies.
    pub fn begin_write(&self, data: &[u8], offset: u64) -> std::io::Result<Pending> {
        let mut replies = Vec::with_capacity(data.len().div_ceil(MAX_IO).max(1));
        for (i, chunk) in data.chunks(MAX_IO).enumerate() {
            let at = offset + (i * MAX_IO) as u64;
            replies.push(self.send(CMD_WRITE, 0, at, chunk.len() as u32, chunk)?);
        }
        Ok(Pending { replies })
    }

    /// Sends a FLUSH without waiting (nothing when the server does not offer FLUSH: it then
    /// writes through): `finish` waits for it.
    pub fn begin_flush(&self) -> std::io::Result<Pending> {
        let mut replies = Vec::new();
        if self.flags & TFLAG_SEND_FLUSH != 0 {
            replies.push(self.send(CMD_FLUSH, 0, 0, 0, &[])?);
        }
        Ok(Pending { replies })
    }

    /// Waits for every reply of `pending`; the first error is returned (and a late reply
    /// kills the client, as for any request).
    pub fn finish(&self, pending: Pending) -> std::io::Result<()> {
        let mut result = Ok(());
        for (rx, late) in pending.replies {
            if let Err(e) = self.wait(rx, late)
                && result.is_ok()
            {
                result = Err(e);
            }
        }
        result
    }

    /// Fills `buf` from `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        for (i, chunk) in buf.chunks_mut(MAX_IO).enumerate() {
            let at = offset + (i * MAX_IO) as u64;
            let data = self.request(CMD_READ, 0, at, chunk.len() as u32, &[])?;
            chunk.copy_from_slice(&data);
        }
        Ok(())
    }

    /// Writes `data` at `offset`; `fua`: durable before the reply (when the server offers it,
    /// else followed by a FLUSH).
    pub fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        let flag = if fua && self.flags & TFLAG_SEND_FUA != 0 {
            CMD_FLAG_FUA
        } else {
            0
        };
        let mut replies = Vec::with_capacity(data.len().div_ceil(MAX_IO).max(1));
        for (i, chunk) in data.chunks(MAX_IO).enumerate() {
            let at = offset + (i * MAX_IO) as u64;
            replies.push(self.send(CMD_WRITE, flag, at, chunk.len() as u32, chunk)?);
        }
        self.finish(Pending { replies })?;
        if fua && flag == 0 {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes every write acknowledged before it durable (nothing to do when the server does
    /// not offer FLUSH: it then writes through). One FLUSH on one connection: with several,
    /// the server promised multi-conn, so it covers what any connection had acknowledged.
    pub fn flush(&self) -> std::io::Result<()> {
        let pending = self.begin_flush()?;
        self.finish(pending)
    }

    /// Makes the range read as zeros; `may_punch`: the server may free the blocks (a discard),
    /// else it keeps them allocated. Without WRITE_ZEROES on the server, zeros are written.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool) -> std::io::Result<()> {
        if self.flags & TFLAG_SEND_WRITE_ZEROES != 0 {
            let flags = if may_punch { 0 } else { CMD_FLAG_NO_HOLE };
            return self.ranges(CMD_WRITE_ZEROES, flags, offset, len);
        }
        let zeros = vec![0u8; ZERO_CHUNK];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64) as usize;
            self.write_at(&zeros[..n], offset + done, false)?;
            done += n as u64;
        }
        Ok(())
    }

    fn ranges(&self, kind: u16, flags: u16, offset: u64, len: u64) -> std::io::Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_RANGE);
            self.request(kind, flags, offset + done, n as u32, &[])?;
            done += n;
        }
        Ok(())
    }

    /// Closes the connections (NBD_CMD_DISC on each, then shutdown); later requests fail.
    pub fn close(&self) {
        if !self.shared.dead.load(Ordering::Acquire) {
            let mut head = [0u8; 28];
            head[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            head[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
            for c in &self.shared.conns {
                let mut w = c.writer.lock().unwrap_or_else(|e| e.into_inner());
                let _ = w.write_all(&head);
            }
        }
        self.shared.kill("closed by the engine");
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.close();
    }
}

/// The reader thread of connection `conn`: matches replies to waiting callers until the
/// connection ends. Buffered: one read takes every reply the socket holds (a reply is 16
/// bytes, and a busy server sends many between two wake-ups of this thread).
fn read_replies(shared: &Shared, conn: usize, s: Sock) {
    let mut s = std::io::BufReader::with_capacity(64 << 10, s);
    let cause = loop {
        let mut head = [0u8; 16];
        if let Err(e) = s.read_exact(&mut head) {
            break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the server closed the connection".to_string()
            } else {
                format!("reading from the server failed: {e}")
            };
        }
        if be32(&head) != SIMPLE_REPLY_MAGIC {
            break format!("the server sent a reply with magic {:#x}", be32(&head));
        }
        let error = be32(&head[4..]);
        let handle = be64(&head[8..]);
        let Some(w) = shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&handle)
        else {
            break format!("the server answered handle {handle}, which was never sent");
        };
        if w.conn != conn {
            let _ = w.tx.try_send(Err(protocol(format!(
                "the server answered handle {handle} on another connection"
            ))));
            break format!(
                "the server answered handle {handle} on connection {conn}, sent on {}",
                w.conn
            );
        }
        let reply = if error != 0 {
            Err(std::io::Error::from_raw_os_error(
                crate::nbd_wire::errno_of(error),
            ))
        } else if w.read_len > 0 {
            let mut data = vec![0u8; w.read_len];
            if let Err(e) = s.read_exact(&mut data) {
                let _ = w.tx.try_send(Err(std::io::Error::new(
                    e.kind(),
                    format!("reading a reply's data failed: {e}"),
                )));
                break format!("reading a reply's data failed: {e}");
            }
            Ok(data)
        } else {
            Ok(Vec::new())
        };
        let _ = w.tx.try_send(reply);
    };
    shared.kill(&cause);
}

#[cfg(test)]
mod tests;
