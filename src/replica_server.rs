//! bicsi's replica server (the hidden `bicsi replica-server` command, issue 14): the process that
//! serves this node's raw replica files (the `loop` and `mirror` engines' `volume.raw`) to the
//! engines of other nodes over NBD on TCP, one writable export per replica, export name = replica
//! id. The node agent starts, finds and stops it (`crate::os::replica_server`); qcow2 replicas
//! stay on qemu-storage-daemon's server (`crate::os::nbd`).
//!
//! Protocol (the NBD spec, `doc/proto.md`): fixed newstyle handshake only; `NBD_OPT_GO` and
//! `NBD_OPT_INFO` answer the export's size and transmission flags (and block sizes when asked),
//! `NBD_OPT_EXPORT_NAME` is honoured for old clients, `NBD_OPT_ABORT` ends the session, and
//! `NBD_OPT_LIST` is refused with `NBD_REP_ERR_POLICY`: a client must know the replica id it asks
//! for. Everything else (structured replies, meta contexts, extended headers) is answered
//! `NBD_REP_ERR_UNSUP`, so clients fall back to simple replies.
//!
//! TLS (issue 19): with `--tls-dir` (the node's cluster certificate, `crate::tls`) the server is
//! in the spec's "TLS only" mode: before `NBD_OPT_STARTTLS` every option but ABORT is answered
//! `NBD_REP_ERR_TLS_REQD` (and EXPORT_NAME ends the session), so nothing about any export leaks
//! to a client that has not authenticated; the handshake requires a client certificate of the
//! cluster CA, valid and not revoked (`ca.crl`), and the connection is dropped unless that
//! certificate is a node's (`bicsi-node`): only node agents' engines read and write replicas.
//! TLS runs in a pump (`crate::nbd_tls`) and the rest of the session is unchanged. Transmission: READ, WRITE (with
//! FUA), FLUSH, TRIM, WRITE_ZEROES (with NO_HOLE) and DISC, simple replies, sent as each request
//! completes (out of order by handle). `NBD_FLAG_CAN_MULTI_CONN` is advertised honestly: every
//! connection to an export writes through the one file descriptor the export opened, and a
//! FLUSH (fdatasync of that file) covers every write any connection had acknowledged.
//!
//! Many requests in flight per connection: a reader thread parses requests (and reads WRITE
//! payloads) and hands them to the connection's pool of `workers` threads, which pread/pwrite
//! the file and write their replies whole under the connection's writer lock. Small WRITEs
//! without FUA (`inline_write_max`, 64 KiB) are written by the reader thread itself (a pwrite
//! into the page cache costs less than waking a worker), and their replies are sent together
//! once no further request is buffered (or 64 are held): a burst of requests is one read,
//! its pwrites and one send. FLUSH, FUA, READ and the rest still go to the workers, so a slow
//! one never holds back the reader. Memory is bounded:
//! the payload bytes of requests in flight on one connection are capped (`max_in_flight`; the
//! reader stops reading the socket until replies free some, so TCP pushes back), and so is their
//! number. Sockets have TCP_NODELAY (Nagle's delay on small replies would stall a pipelined
//! client waiting for delayed ACKs).
//!
//! Control: a unix socket (`--control`, in the run directory) takes one-line commands, answered
//! with one line starting with `ok` or `error`: `add {"id":…,"path":…}` opens a replica file and
//! exports it (idempotent; another file under the same id is `error conflict`), `remove
//! {"id":…,"force":bool}` stops exporting it and closes the file (`error busy` while a client is
//! connected to it, unless forced: then its connections are cut and their requests in flight end
//! first), `list` prints the address it listens on and the exports with their client counts as
//! JSON. Exports live only in this process: a restarted server exports nothing, as
//! qemu-storage-daemon after a restart, and the agent exports again what attached volumes need.
//!
//! It must not decide anything about replicas (which to export, when to stop), must not touch
//! files it was not given, and keeps no state outside its memory, its command line and its pid
//! file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};

use crate::nbd_tls::Sock;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::nbd_wire::*;
use crate::tls::Role;

pub use crate::os::replica_server::{AddRequest, ExportInfo, Listing, RemoveRequest};

/// Worker threads per connection when the command line does not say.
pub const DEFAULT_WORKERS: usize = 4;
/// Payload bytes in flight per connection when the command line does not say (MiB).
pub const DEFAULT_MAX_IN_FLIGHT_MIB: usize = 64;
/// The longest export name (the spec's limit on names and option strings).
pub const MAX_NAME: usize = 4096;
/// WRITEs without FUA up to this size (KiB) are written by the connection's reader thread
/// itself when the command line does not say.
pub const DEFAULT_INLINE_WRITE_KIB: usize = 64;
/// Replies of inline WRITEs held for one send at most.
const REPLY_BATCH: usize = 64;
/// Requests queued for a connection's workers beyond those they are running.
const QUEUE: usize = 64;
/// How long a client may take over the handshake before its connection is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest option request read (an INFO/GO carries a name and a few info requests).
const MAX_OPTION: u32 = MAX_NAME as u32 + 1024;
/// How long `remove` waits for the cut connections of a forced removal to end.
const CUT_TIMEOUT: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How the server serves its connections.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Worker threads per connection.
    pub workers: usize,
    /// Payload bytes in flight per connection (READ data waiting to be sent, WRITE data
    /// waiting to be written); a larger single request still runs, alone.
    pub max_in_flight: usize,
    /// WRITEs without FUA up to this many bytes are written by the reader thread (0: none).
    pub inline_write_max: usize,
    /// Tests only: a READ at this offset waits this long before it is served (shows that one
    /// slow request does not hold back the others).
    /// With TLS: every client must STARTTLS and hold a node certificate of the cluster CA
    /// (this config requires and checks client certificates; the role is checked after).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    #[cfg(test)]
    pub slow_read_at: Option<(u64, Duration)>,
}

impl ServerConfig {
    pub fn new(workers: usize, max_in_flight: usize) -> ServerConfig {
        ServerConfig {
            workers,
            max_in_flight,
            inline_write_max: DEFAULT_INLINE_WRITE_KIB << 10,
            tls: None,
            #[cfg(test)]
            slow_read_at: None,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig::new(DEFAULT_WORKERS, DEFAULT_MAX_IN_FLIGHT_MIB << 20)
    }
}

/// One exported replica file.
struct Export {
    id: String,
    path: PathBuf,
    file: File,
}

/// A connection in transmission: the export it uses and its socket (to cut it).
struct Client {
    export: String,
    socket: Sock,
}

#[derive(Default)]
struct State {
    exports: HashMap<String, Arc<Export>>,
    clients: HashMap<u64, Client>,
}

/// The exports and the connections using them; shared by the NBD and control sides.
#[derive(Default)]
pub struct Exports {
    state: Mutex<State>,
    /// Signalled when a client leaves.
    left: Condvar,
    next_client: AtomicU64,
}

/// Why `remove` did not remove.
#[derive(Debug, PartialEq, Eq)]
pub enum RemoveError {
    /// Clients are connected and the removal was not forced.
    Busy(usize),
    /// Forced, but the cut connections did not end in time (their requests still run).
    StillClosing(usize),
}

impl Exports {
    /// Exports `path` as `id`; Ok(false) when it already is (same file).
    pub fn add(&self, id: &str, path: &Path) -> Result<bool, String> {
        if id.is_empty() || id.len() > MAX_NAME {
            return Err(format!(
                "export name {id:?}: an NBD export name has 1 to {MAX_NAME} bytes"
            ));
        }
        if !path.is_absolute() {
            return Err(format!(
                "replica {id:?}: path {} must be absolute",
                path.display()
            ));
        }
        let resolved = std::fs::canonicalize(path)
            .map_err(|e| format!("replica {id:?}: {}: {e}", path.display()))?;
        if let Some(e) = lock(&self.state).exports.get(id) {
            return if e.path == resolved {
                Ok(false)
            } else {
                Err(format!(
                    "conflict: replica {id:?} is exported from {}, not from {}; remove it first",
                    e.path.display(),
                    resolved.display()
                ))
            };
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&resolved)
            .map_err(|e| format!("replica {id:?}: opening {}: {e}", resolved.display()))?;
        if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
            return Err(format!(
                "replica {id:?}: {} is not a regular file",
                resolved.display()
            ));
        }
        let mut st = lock(&self.state);
        if let Some(e) = st.exports.get(id) {
            // Added meanwhile by another control connection.
            return if e.path == resolved {
                Ok(false)
            } else {
                Err(format!(
                    "conflict: replica {id:?} is exported from {}; remove it first",
                    e.path.display()
                ))
            };
        }
        st.exports.insert(
            id.to_string(),
            Arc::new(Export {
                id: id.to_string(),
                path: resolved,
                file,
            }),
        );
        Ok(true)
    }

    /// Stops exporting `id` and closes its file once no connection uses it; Ok(false) when it
    /// was not exported. `force`: cut its clients off (their requests in flight end first).
    pub fn remove(&self, id: &str, force: bool) -> Result<bool, RemoveError> {
        let mut st = lock(&self.state);
        if !st.exports.contains_key(id) {
            return Ok(false);
        }
        let users = |st: &State| st.clients.values().filter(|c| c.export == id).count();
        let n = users(&st);
        if n > 0 && !force {
            return Err(RemoveError::Busy(n));
        }
        // No new client finds it from now on; the file closes with the last session's handle.
        st.exports.remove(id);
        for c in st.clients.values().filter(|c| c.export == id) {
            let _ = c.socket.shutdown(Shutdown::Both);
        }
        let deadline = Instant::now() + CUT_TIMEOUT;
        while users(&st) > 0 {
            let now = Instant::now();
            if now >= deadline {
                return Err(RemoveError::StillClosing(users(&st)));
            }
            st = self
                .left
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(true)
    }

    /// The exports, sorted by id, with their client counts.
    pub fn list(&self) -> Vec<ExportInfo> {
        let st = lock(&self.state);
        let mut out: Vec<ExportInfo> = st
            .exports
            .values()
            .map(|e| ExportInfo {
                id: e.id.clone(),
                path: e.path.clone(),
                clients: st.clients.values().filter(|c| c.export == e.id).count(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    fn find(&self, name: &str) -> Option<Arc<Export>> {
        lock(&self.state).exports.get(name).cloned()
    }

    /// Looks `name` up and registers `socket` as its client, in one step (a removal cannot
    /// slip between them).
    fn attach(&self, name: &str, socket: &Sock) -> std::io::Result<Option<(u64, Arc<Export>)>> {
        let mut st = lock(&self.state);
        let Some(export) = st.exports.get(name).cloned() else {
            return Ok(None);
        };
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        st.clients.insert(
            id,
            Client {
                export: name.to_string(),
                socket: socket.try_clone()?,
            },
        );
        Ok(Some((id, export)))
    }

    fn detach(&self, client: u64) {
        lock(&self.state).clients.remove(&client);
        self.left.notify_all();
    }
}

// ---- NBD: handshake ------------------------------------------------------------------------

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

fn option_reply(s: &mut Sock, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(20 + data.len());
    msg.extend_from_slice(&REPLY_MAGIC_OPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&kind.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg)
}

/// The transmission flags of every export: writable, with every command this server serves.
const EXPORT_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;

fn export_size(export: &Export) -> std::io::Result<u64> {
    export.file.metadata().map(|m| m.len())
}

/// The handshake: options until a client picks an export (GO or EXPORT_NAME), then that
/// export, registered as used by this connection. None: the client left or aborted.
fn handshake(
    exports: &Exports,
    tls: Option<&Arc<rustls::ServerConfig>>,
    s: &mut Sock,
) -> std::io::Result<Option<(u64, Arc<Export>, u64)>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut cflags = [0u8; 4];
    s.read_exact(&mut cflags)?;
    let cflags = be32(&cflags);
    // "If the client does not set NBD_FLAG_C_FIXED_NEWSTYLE, the server MAY ... terminate":
    // every client of ours speaks it, and unknown flags mean a protocol we do not know.
    if cflags & FLAG_FIXED_NEWSTYLE as u32 == 0
        || cflags & !((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) as u32) != 0
    {
        return Err(invalid(format!(
            "client flags {cflags:#x}: only fixed newstyle (and no zeroes) is served"
        )));
    }
    let no_zeroes = cflags & FLAG_NO_ZEROES as u32 != 0;
    loop {
        let mut head = [0u8; 16];
        s.read_exact(&mut head)?;
        if be64(&head) != IHAVEOPT {
            return Err(invalid(format!("option magic {:#x}", be64(&head))));
        }
        let option = be32(&head[8..]);
        let len = be32(&head[12..]);
        if len > MAX_OPTION {
            // Too long to be anything we serve: skip it, then say so.
            std::io::copy(&mut (&mut *s).take(len as u64), &mut std::io::sink())?;
            if option == OPT_EXPORT_NAME {
                return Ok(None);
            }
            option_reply(s, option, REP_ERR_TOO_BIG, b"option too long")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        // "the server MUST NOT send any data related to the export until the TLS handshake is
        // complete": with TLS configured, nothing but STARTTLS and ABORT is answered before it
        // (REP_ERR_TLS_REQD, the spec's "TLS only" mode), and NBD_OPT_EXPORT_NAME, which cannot
        // be refused, ends the session.
        if tls.is_some() && !s.is_tls() && option != OPT_STARTTLS && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Ok(None);
            }
            option_reply(
                s,
                option,
                REP_ERR_TLS_REQD,
                b"this replica server requires TLS (NBD_OPT_STARTTLS) with a node certificate",
            )?;
            continue;
        }
        match option {
            OPT_STARTTLS => {
                let Some(config) = tls else {
                    option_reply(s, option, REP_ERR_UNSUP, b"TLS is not configured here")?;
                    continue;
                };
                if s.is_tls() || !data.is_empty() {
                    option_reply(s, option, REP_ERR_INVALID, b"already in TLS, or data sent")?;
                    continue;
                }
                option_reply(s, option, REP_ACK, &[])?;
                let Sock::Tcp(tcp) = &*s else {
                    unreachable!("checked above")
                };
                let plain = crate::nbd_tls::accept(tcp.try_clone()?, config.clone(), Role::Node)?;
                plain.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
                plain.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
                *s = Sock::Unix(plain);
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                // No way to refuse here but to end the session (the spec's rule).
                let Some((client, export)) = exports.attach(&name, s)? else {
                    return Ok(None);
                };
                let size = export_size(&export)?;
                let mut info = Vec::with_capacity(134);
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&EXPORT_FLAGS.to_be_bytes());
                if !no_zeroes {
                    info.extend_from_slice(&[0u8; 124]);
                }
                if let Err(e) = s.write_all(&info) {
                    exports.detach(client);
                    return Err(e);
                }
                return Ok(Some((client, export, size)));
            }
            OPT_ABORT => {
                let _ = option_reply(s, option, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                option_reply(
                    s,
                    option,
                    REP_ERR_POLICY,
                    b"export names are not listed; ask for the replica id",
                )?;
            }
            OPT_INFO | OPT_GO => {
                // name length, name, number of info requests, the requests.
                let parsed = (|| {
                    let n = be32(data.get(..4)?) as usize;
                    let name = data.get(4..4 + n)?;
                    let k = be16(data.get(4 + n..6 + n)?) as usize;
                    let reqs = data.get(6 + n..6 + n + 2 * k)?;
                    (data.len() == 6 + n + 2 * k).then_some((name, reqs))
                })();
                let Some((name, reqs)) = parsed else {
                    option_reply(s, option, REP_ERR_INVALID, b"malformed request")?;
                    continue;
                };
                let name = String::from_utf8_lossy(name).into_owned();
                let block_sizes = reqs.chunks(2).any(|r| be16(r) == INFO_BLOCK_SIZE);
                // GO attaches (registers this connection as a client); INFO only looks.
                let found = if option == OPT_GO {
                    exports.attach(&name, s)?.map(|(c, e)| (Some(c), e))
                } else {
                    exports.find(&name).map(|e| (None, e))
                };
                let Some((client, export)) = found else {
                    let msg = format!("no export {name:?} here");
                    option_reply(s, option, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let sent = (|| {
                    let size = export_size(&export)?;
                    let mut info = Vec::with_capacity(12);
                    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    info.extend_from_slice(&size.to_be_bytes());
                    info.extend_from_slice(&EXPORT_FLAGS.to_be_bytes());
                    option_reply(s, option, REP_INFO, &info)?;
                    if block_sizes {
                        // Any byte range is served (pread/pwrite), 4 KiB preferred.
                        let mut b = Vec::with_capacity(14);
                        b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                        b.extend_from_slice(&1u32.to_be_bytes());
                        b.extend_from_slice(&4096u32.to_be_bytes());
                        b.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                        option_reply(s, option, REP_INFO, &b)?;
                    }
                    option_reply(s, option, REP_ACK, &[])?;
                    Ok::<u64, std::io::Error>(size)
                })();
                match (client, sent) {
                    (Some(client), Ok(size)) => return Ok(Some((client, export, size))),
                    (Some(client), Err(e)) => {
                        exports.detach(client);
                        return Err(e);
                    }
                    (None, sent) => {
                        sent?;
                    }
                }
            }
            _ => {
                option_reply(s, option, REP_ERR_UNSUP, b"not supported by this server")?;
            }
        }
    }
}

// ---- NBD: transmission ---------------------------------------------------------------------

/// Bytes in flight on a connection.
struct Budget {
    cap: usize,
    left: Mutex<usize>,
    freed: Condvar,
}

impl Budget {
    fn new(cap: usize) -> Budget {
        Budget {
            cap,
            left: Mutex::new(cap),
            freed: Condvar::new(),
        }
    }

    /// Takes `n` bytes (at most the whole budget, so one large request runs alone); returns
    /// what was taken, to give back with `release`.
    fn acquire(&self, n: usize) -> usize {
        let n = n.min(self.cap);
        let mut left = lock(&self.left);
        while *left < n {
            left = self.freed.wait(left).unwrap_or_else(|e| e.into_inner());
        }
        *left -= n;
        n
    }

    fn release(&self, n: usize) {
        if n > 0 {
            *lock(&self.left) += n;
            self.freed.notify_all();
        }
    }
}

/// One request for a worker.
struct Job {
    kind: u16,
    flags: u16,
    handle: u64,
    offset: u64,
    len: u32,
    payload: Vec<u8>,
    charged: usize,
}

/// What the workers of one connection share.
struct Conn {
    export: Arc<Export>,
    writer: Mutex<Sock>,
    /// For shutdown without the writer's lock (a writer stuck on a full socket).
    socket: Sock,
    budget: Budget,
    dead: AtomicBool,
    /// WRITEs without FUA up to this many bytes are served by the reader thread.
    inline_write_max: usize,
    #[cfg(test)]
    slow_read_at: Option<(u64, Duration)>,
}

impl Conn {
    /// Sends one reply; `msg` holds 16 bytes for the header first, then any READ data.
    fn reply(&self, handle: u64, error: u32, mut msg: Vec<u8>) {
        msg[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        msg[4..8].copy_from_slice(&error.to_be_bytes());
        msg[8..16].copy_from_slice(&handle.to_be_bytes());
        if self.dead.load(Ordering::Acquire) {
            return;
        }
        self.send(&msg);
    }

    /// Sends replies already encoded (one or several, each whole); a failure kills the
    /// connection.
    fn send(&self, msg: &[u8]) {
        if self.dead.load(Ordering::Acquire) {
            return;
        }
        let sent = lock(&self.writer).write_all(msg);
        if sent.is_err() {
            self.dead.store(true, Ordering::Release);
            let _ = self.socket.shutdown(Shutdown::Both);
        }
    }

    fn serve(&self, job: Job) {
        let file = &self.export.file;
        let fua = job.flags & CMD_FLAG_FUA != 0;
        let sync_if_fua = |r: std::io::Result<()>| match r {
            Ok(()) if fua => file.sync_data(),
            other => other,
        };
        let (result, msg) = match job.kind {
            CMD_READ => {
                #[cfg(test)]
                if let Some((at, delay)) = self.slow_read_at
                    && at == job.offset
                {
                    std::thread::sleep(delay);
                }
                let mut msg = vec![0u8; 16 + job.len as usize];
                let r = crate::os::rawfile::read_full(file, &mut msg[16..], job.offset);
                if r.is_err() {
                    msg.truncate(16);
                }
                (r, msg)
            }
            CMD_WRITE => (
                sync_if_fua(file.write_all_at(&job.payload, job.offset)),
                vec![0u8; 16],
            ),
            CMD_FLUSH => (file.sync_data(), vec![0u8; 16]),
            // A hint: the range may read back as anything after it; a hole reads as zeros.
            CMD_TRIM => {
                let _ = punch(file, job.offset, job.len as u64);
                (sync_if_fua(Ok(())), vec![0u8; 16])
            }
            CMD_WRITE_ZEROES => {
                let r = if job.flags & CMD_FLAG_NO_HOLE != 0 {
                    zero_allocated(file, job.offset, job.len as u64)
                } else {
                    punch(file, job.offset, job.len as u64)
                        .or_else(|_| zero_allocated(file, job.offset, job.len as u64))
                };
                (sync_if_fua(r), vec![0u8; 16])
            }
            _ => (
                Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
                vec![0u8; 16],
            ),
        };
        let error = match &result {
            Ok(()) => 0,
            Err(e) => error_of(e),
        };
        drop(job.payload);
        self.reply(job.handle, error, msg);
        self.budget.release(job.charged);
    }
}

fn fallocate(
    file: &File,
    flags: nix::fcntl::FallocateFlags,
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    nix::fcntl::fallocate(file, flags, offset as i64, len as i64).map_err(std::io::Error::from)
}

/// Frees the range; it reads back as zeros.
fn punch(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use nix::fcntl::FallocateFlags as F;
    fallocate(
        file,
        F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Makes the range read as zeros and keeps it allocated (zeros written where the filesystem
/// cannot zero a range).
fn zero_allocated(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use nix::fcntl::FallocateFlags as F;
    match fallocate(
        file,
        F::FALLOC_FL_ZERO_RANGE | F::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            let zeros = vec![0u8; (1 << 20).min(len as usize)];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], offset + done)?;
                done += n as u64;
            }
            Ok(())
        }
        other => other,
    }
}

/// Reads requests until DISC, EOF or a protocol error, hands them to `workers` threads, and
/// returns once every request read has been answered (or the connection died).
fn transmission(
    cfg: &ServerConfig,
    export: Arc<Export>,
    size: u64,
    socket: Sock,
) -> std::io::Result<()> {
    let conn = Arc::new(Conn {
        export,
        writer: Mutex::new(socket.try_clone()?),
        socket: socket.try_clone()?,
        budget: Budget::new(cfg.max_in_flight.max(1 << 20)),
        dead: AtomicBool::new(false),
        inline_write_max: cfg.inline_write_max,
        #[cfg(test)]
        slow_read_at: cfg.slow_read_at,
    });
    let (tx, rx): (SyncSender<Job>, Receiver<Job>) = sync_channel(QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    let workers: Vec<_> = (0..cfg.workers.max(1))
        .map(|i| {
            let (conn, rx) = (conn.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn(move || {
                    loop {
                        let job = lock(&rx).recv();
                        match job {
                            Ok(job) => conn.serve(job),
                            Err(_) => break,
                        }
                    }
                })
        })
        .collect::<std::io::Result<_>>()?;
    let result = read_requests(&conn, size, socket, &tx);
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    result
}

/// Reads and dispatches requests until DISC, EOF or an error; the replies of inline WRITEs
/// still held are sent before it returns.
fn read_requests(
    conn: &Conn,
    size: u64,
    socket: Sock,
    tx: &SyncSender<Job>,
) -> std::io::Result<()> {
    let mut r = BufReader::with_capacity(256 << 10, socket);
    let mut held = Vec::with_capacity(16 * REPLY_BATCH);
    let result = dispatch(conn, size, &mut r, tx, &mut held);
    send_held(conn, &mut held);
    result
}

/// Sends the held replies of inline WRITEs, if any.
fn send_held(conn: &Conn, held: &mut Vec<u8>) {
    if !held.is_empty() {
        conn.send(held);
        held.clear();
    }
}

fn dispatch(
    conn: &Conn,
    size: u64,
    r: &mut BufReader<Sock>,
    tx: &SyncSender<Job>,
    held: &mut Vec<u8>,
) -> std::io::Result<()> {
    // One buffer for the payloads of inline WRITEs (zeroed only where it grows).
    let mut inline = Vec::new();
    loop {
        // About to wait for the client (no whole request header buffered), or holding many:
        // the held replies go now.
        if r.buffer().len() < 28 || held.len() >= 16 * REPLY_BATCH {
            send_held(conn, held);
        }
        let mut head = [0u8; 28];
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        if be32(&head) != REQUEST_MAGIC {
            return Err(invalid(format!("request magic {:#x}", be32(&head))));
        }
        let flags = be16(&head[4..]);
        let kind = be16(&head[6..]);
        let handle = be64(&head[8..]);
        let offset = be64(&head[16..]);
        let len = be32(&head[24..]);
        let beyond = offset.checked_add(len as u64).is_none_or(|end| end > size);
        let refuse = |error: u32| conn.reply(handle, error, vec![0u8; 16]);
        match kind {
            CMD_DISC => return Ok(()),
            CMD_WRITE => {
                if len > MAX_PAYLOAD {
                    // The client broke the agreed maximum: its payload cannot be trusted to
                    // fit anything, so the session ends.
                    return Err(invalid(format!("a WRITE of {len} bytes")));
                }
                if flags & CMD_FLAG_FUA == 0 && len as usize <= conn.inline_write_max {
                    let n = len as usize;
                    if inline.len() < n {
                        inline.resize(n, 0);
                    }
                    r.read_exact(&mut inline[..n])?;
                    let error = if beyond {
                        ENOSPC
                    } else {
                        match conn.export.file.write_all_at(&inline[..n], offset) {
                            Ok(()) => 0,
                            Err(e) => error_of(&e),
                        }
                    };
                    held.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                    held.extend_from_slice(&error.to_be_bytes());
                    held.extend_from_slice(&handle.to_be_bytes());
                    continue;
                }
                // The reader may wait below (for the budget, for a worker): nothing held.
                send_held(conn, held);
                let charged = conn.budget.acquire(len as usize);
                let mut payload = vec![0u8; len as usize];
                if let Err(e) = r.read_exact(&mut payload) {
                    conn.budget.release(charged);
                    return Err(e);
                }
                if beyond {
                    conn.budget.release(charged);
                    refuse(ENOSPC);
                    continue;
                }
                let job = Job {
                    kind,
                    flags,
                    handle,
                    offset,
                    len,
                    payload,
                    charged,
                };
                if tx.send(job).is_err() {
                    return Ok(());
                }
            }
            CMD_READ | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES => {
                send_held(conn, held);
                if kind == CMD_READ && len > MAX_PAYLOAD {
                    refuse(EOVERFLOW);
                    continue;
                }
                if kind != CMD_FLUSH && beyond {
                    refuse(if kind == CMD_READ || kind == CMD_TRIM {
                        EINVAL
                    } else {
                        ENOSPC
                    });
                    continue;
                }
                let charged = if kind == CMD_READ {
                    conn.budget.acquire(len as usize)
                } else {
                    0
                };
                let job = Job {
                    kind,
                    flags,
                    handle,
                    offset,
                    len,
                    payload: Vec::new(),
                    charged,
                };
                if tx.send(job).is_err() {
                    return Ok(());
                }
            }
            _ => refuse(EINVAL),
        }
        if conn.dead.load(Ordering::Acquire) {
            return Ok(());
        }
    }
}

/// One client connection, from the greeting to its end.
fn session(exports: &Exports, cfg: &ServerConfig, tcp: TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut socket = Sock::Tcp(tcp);
    let Some((client, export, size)) = handshake(exports, cfg.tls.as_ref(), &mut socket)? else {
        return Ok(());
    };
    let result = (|| {
        // Requests may come at any pace once attached; replies wait for a slow reader as long
        // as TCP does.
        socket.set_read_timeout(None)?;
        socket.set_write_timeout(None)?;
        transmission(cfg, export, size, socket)
    })();
    // The export's file handle is gone with `transmission`'s connection: now it may close.
    exports.detach(client);
    result
}

/// Serves NBD on `listener` for the exports in `exports`, a thread per connection, until the
/// process ends.
pub fn serve_nbd(listener: TcpListener, exports: Arc<Exports>, cfg: ServerConfig) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let (exports, cfg) = (exports.clone(), cfg.clone());
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                let peer = conn.peer_addr().ok();
                // A client that leaves, or resets its connection, is no news: the node's probe
                // of stalled servers connects, reads the greeting and closes every 2 s.
                if let Err(e) = session(&exports, &cfg, conn)
                    && !matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::BrokenPipe
                    )
                {
                    eprintln!("bicsi replica-server: connection from {peer:?}: {e}");
                }
            });
        if let Err(e) = spawned {
            eprintln!("bicsi replica-server: cannot start a connection thread: {e}");
        }
    }
}

// ---- control ------------------------------------------------------------------------------

/// One control command's answer line.
fn control_answer(exports: &Exports, listen: &str, line: &str) -> String {
    let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
    match cmd {
        "list" => {
            let listing = Listing {
                listen: listen.to_string(),
                exports: exports.list(),
            };
            format!("ok {}", serde_json::json!(listing))
        }
        "add" => match serde_json::from_str::<AddRequest>(arg) {
            Ok(req) => match exports.add(&req.id, &req.path) {
                Ok(true) => format!("ok added {}", req.id),
                Ok(false) => format!("ok added {} (already)", req.id),
                Err(e) => format!("error {e}"),
            },
            Err(e) => format!("error add wants {{\"id\":…,\"path\":…}}: {e}"),
        },
        "remove" => match serde_json::from_str::<RemoveRequest>(arg) {
            Ok(req) => match exports.remove(&req.id, req.force) {
                Ok(true) => format!("ok removed {}", req.id),
                Ok(false) => format!("ok removed {} (not exported)", req.id),
                Err(RemoveError::Busy(n)) => format!(
                    "error busy: {n} client(s) connected to {:?}; remove with force to cut them off",
                    req.id
                ),
                Err(RemoveError::StillClosing(n)) => format!(
                    "error closing: {n} cut connection(s) to {:?} still have requests running \
                     after {CUT_TIMEOUT:?} (a hung disk?)",
                    req.id
                ),
            },
            Err(e) => format!("error remove wants {{\"id\":…,\"force\":bool}}: {e}"),
        },
        other => format!("error unknown command {other:?}; use list, add or remove"),
    }
}

fn control_session(exports: &Exports, listen: &str, conn: UnixStream) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { break };
        let answer = control_answer(exports, listen, line.trim());
        if writeln!(out, "{answer}").is_err() {
            break;
        }
    }
}

/// Serves the control socket until the process ends.
pub fn serve_control(listener: UnixListener, exports: Arc<Exports>, listen: String) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let (exports, listen) = (exports.clone(), listen.clone());
        std::thread::spawn(move || control_session(&exports, &listen, conn));
    }
}

// ---- the process ---------------------------------------------------------------------------

/// The hidden `bicsi replica-server` command's flags (the node agent builds them; see
/// `crate::os::replica_server`).
#[derive(clap::Args, Debug, Clone)]
pub struct ReplicaServerArgs {
    /// host:port to listen on for NBD clients (port 0: any free port; `list` says which).
    #[arg(long)]
    pub listen: String,
    /// The control socket (add, remove, list).
    #[arg(long)]
    pub control: PathBuf,
    /// Written with the serving process's pid once both sockets listen.
    #[arg(long)]
    pub pid_file: PathBuf,
    /// Worker threads per connection.
    #[arg(long, default_value_t = DEFAULT_WORKERS)]
    pub workers: usize,
    /// Payload bytes in flight per connection, in MiB.
    #[arg(long, default_value_t = DEFAULT_MAX_IN_FLIGHT_MIB)]
    pub max_in_flight_mib: usize,
    /// WRITEs without FUA up to this size (KiB) are written by a connection's reader thread,
    /// their replies sent together (0: every request goes to the workers).
    #[arg(long, default_value_t = DEFAULT_INLINE_WRITE_KIB)]
    pub inline_write_kib: usize,
    /// Serve from a child process in its own process group and return once it listens (0) or
    /// failed (non-zero): the readiness signal of the node agent.
    #[arg(long)]
    pub daemonize: bool,
    /// Require TLS with a node certificate of the cluster CA: the node's `--tls-dir` (ca.crt,
    /// tls.crt, tls.key, optionally ca.crl). Without it the server speaks plain NBD.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
}

/// The NBD listener of `listen` (`host:port`, IPv6 hosts in brackets).
fn bind(listen: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(listen)
        .map_err(|e| std::io::Error::new(e.kind(), format!("listening on {listen}: {e}")))
}

/// `bicsi replica-server`: listen, then serve until killed (SIGTERM: nothing is buffered here,
/// every acknowledged write is in the kernel's hands).
pub fn main(args: ReplicaServerArgs) -> std::io::Result<()> {
    if args.daemonize {
        return crate::os::engine::daemonize_self(&args.pid_file, "the replica server");
    }
    // Checked before listening: a bad directory stops the start with the reason.
    let tls = match &args.tls_dir {
        Some(dir) => Some(
            crate::tls::ClusterTls::load(dir)
                .and_then(|t| t.server_config(Some(&[])))
                .map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
                })?,
        ),
        None => None,
    };
    let listener = bind(&args.listen)?;
    let listen = listener.local_addr()?.to_string();
    let _ = std::fs::remove_file(&args.control);
    let control = UnixListener::bind(&args.control).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("binding control socket {}: {e}", args.control.display()),
        )
    })?;
    let exports = Arc::new(Exports::default());
    let mut cfg = ServerConfig::new(args.workers.max(1), args.max_in_flight_mib.max(1) << 20);
    cfg.inline_write_max = args.inline_write_kib << 10;
    cfg.tls = tls;
    {
        let (exports, listen) = (exports.clone(), listen.clone());
        std::thread::spawn(move || serve_control(control, exports, listen));
    }
    std::fs::write(&args.pid_file, format!("{}\n", std::process::id()))?;
    eprintln!("bicsi replica-server: listening on {listen}");
    serve_nbd(listener, exports, cfg);
    Ok(())
}

#[cfg(test)]
mod tests;
