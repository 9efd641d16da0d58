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
//! Many requests in flight on ONE connection: every caller (a FUSE worker thread) writes its
//! request under a lock and waits for its own reply, which a reader thread matches by handle
//! (qemu's server runs the requests of one connection concurrently and may answer out of order).
//! One connection, not a pool: qemu's server does not advertise multi-conn on a writable
//! export (`NBD_FLAG_CAN_MULTI_CONN`), so a FLUSH on one connection would not be promised to
//! cover writes acknowledged on another; on one connection it covers every write acknowledged
//! before it, which is what fsync of the volume needs.
//!
//! TLS (issue 19): given the node's certificate (`bicsi engine-mirror --tls-dir`), the client
//! asks for `NBD_OPT_STARTTLS` before anything else, and refuses to go on without it; the
//! server's certificate must be a node's of the cluster CA. The session then runs through the
//! pump of `crate::nbd_tls`, unchanged.
//!
//! Failures are final: a request that fails, a connection that drops, or a reply that does not
//! come within the timeout (`replica-timeout`) marks the client dead, shuts the socket down (the
//! reader thread and every waiting caller get an error at once) and every later request fails
//! at once. The engine drops such a replica and records why; it is never reconnected, because a
//! replica that missed writes must not be read again until it is rebuilt.
//!
//! It must not retry, reconnect, or hide a failure from the engine.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};

use crate::nbd_tls::Sock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::nbd_wire::{
    CMD_DISC, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_WRITE, CMD_WRITE_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_EXPORT, NBDMAGIC, OPT_EXPORT_NAME, OPT_GO,
    OPT_STARTTLS, REP_ACK, REP_ERR_UNSUP, REP_INFO, REPLY_MAGIC_OPT, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA, TFLAG_SEND_WRITE_ZEROES,
    be16, be32, be64,
};

/// The largest READ or WRITE sent as one request (qemu's server takes up to 32 MiB).
const MAX_IO: usize = 8 << 20;
/// The largest WRITE_ZEROES sent as one request (the length field has 32 bits).
const MAX_RANGE: u64 = 1 << 30;
/// A zero buffer for zeroing on a server without WRITE_ZEROES.
const ZERO_CHUNK: usize = 1 << 20;

type Reply = std::io::Result<Vec<u8>>;

/// A caller waiting for a reply: where to send it, and how many data bytes a READ's reply has.
struct Waiting {
    tx: SyncSender<Reply>,
    read_len: usize,
}

struct Shared {
    /// Where requests are written (one at a time, each whole).
    writer: Mutex<Sock>,
    waiting: Mutex<HashMap<u64, Waiting>>,
    next_handle: AtomicU64,
    dead: AtomicBool,
    /// Why the connection died, for the errors of later requests.
    cause: Mutex<String>,
    /// For `shutdown`, independent of the writer's lock (a writer stuck on a full socket).
    socket: Sock,
}

impl Shared {
    /// Marks the connection dead (the first cause is kept), shuts the socket down and fails
    /// every waiting caller.
    fn kill(&self, cause: &str) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            *self.cause.lock().unwrap_or_else(|e| e.into_inner()) = cause.to_string();
        }
        let _ = self.socket.shutdown(Shutdown::Both);
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

/// A connection to one NBD export, usable from many threads at once.
pub struct NbdClient {
    shared: Arc<Shared>,
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
    pub fn connect_tls(
        host: &str,
        port: u16,
        export: &str,
        timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
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
        let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(context)?;
        tcp.set_nodelay(true).map_err(context)?;
        tcp.set_read_timeout(Some(timeout)).map_err(context)?;
        tcp.set_write_timeout(Some(timeout)).map_err(context)?;
        let mut s = Sock::Tcp(tcp);
        let (size, flags) = Self::handshake(&mut s, export, tls, timeout).map_err(context)?;
        // The reader thread waits for replies as long as it takes; the callers time out.
        s.set_read_timeout(None).map_err(context)?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(s.try_clone().map_err(context)?),
            waiting: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            dead: AtomicBool::new(false),
            cause: Mutex::new(String::new()),
            socket: s.try_clone().map_err(context)?,
        });
        let reader = shared.clone();
        std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || read_replies(&reader, s))
            .map_err(context)?;
        Ok(NbdClient {
            shared,
            size,
            flags,
            timeout,
            name,
        })
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
        let shared = &self.shared;
        if shared.dead.load(Ordering::Acquire) {
            return Err(shared.dead_error());
        }
        let handle = shared.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        let read_len = if kind == CMD_READ { len as usize } else { 0 };
        shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(handle, Waiting { tx, read_len });
        let mut head = [0u8; 28];
        head[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        head[4..6].copy_from_slice(&flags.to_be_bytes());
        head[6..8].copy_from_slice(&kind.to_be_bytes());
        head[8..16].copy_from_slice(&handle.to_be_bytes());
        head[16..24].copy_from_slice(&offset.to_be_bytes());
        head[24..28].copy_from_slice(&len.to_be_bytes());
        let sent = {
            let mut w = shared.writer.lock().unwrap_or_else(|e| e.into_inner());
            w.write_all(&head).and_then(|_| w.write_all(payload))
        };
        if let Err(e) = sent {
            let cause = format!("sending a request to {} failed: {e}", self.name);
            shared.kill(&cause);
            return Err(std::io::Error::new(e.kind(), cause));
        }
        match rx.recv_timeout(self.timeout) {
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
        for (i, chunk) in data.chunks(MAX_IO).enumerate() {
            let at = offset + (i * MAX_IO) as u64;
            self.request(CMD_WRITE, flag, at, chunk.len() as u32, chunk)?;
        }
        if fua && flag == 0 {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes every write acknowledged before it durable (nothing to do when the server does
    /// not offer FLUSH: it then writes through).
    pub fn flush(&self) -> std::io::Result<()> {
        if self.flags & TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(CMD_FLUSH, 0, 0, 0, &[]).map(|_| ())
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

    /// Closes the connection (NBD_CMD_DISC, then shutdown); later requests fail.
    pub fn close(&self) {
        if !self.shared.dead.load(Ordering::Acquire) {
            let mut head = [0u8; 28];
            head[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            head[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
            let mut w = self.shared.writer.lock().unwrap_or_else(|e| e.into_inner());
            let _ = w.write_all(&head);
        }
        self.shared.kill("closed by the engine");
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.close();
    }
}

/// The reader thread: matches replies to waiting callers until the connection ends.
fn read_replies(shared: &Shared, mut s: Sock) {
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
