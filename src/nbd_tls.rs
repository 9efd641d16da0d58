//! TLS under bicsi's own NBD connections (issue 19): the raw replica server
//! (`crate::replica_server`) and the mirror engine's client (`crate::mirror::nbd`) upgrade a TCP
//! connection with `NBD_OPT_STARTTLS` and then speak the rest of the protocol inside mutual TLS
//! (the cluster CA's certificates of `crate::tls`).
//!
//! There is no kernel TLS on the machines measured (`tcp_available_ulp` lists only mptcp), so
//! TLS runs in user space, in a pump: one rustls connection and two threads bridging the TCP
//! socket to one end of a unix socketpair, whose other end the NBD code reads and writes exactly
//! as it would the TCP socket ([`Sock`]). The NBD code keeps its threads, its blocking I/O and
//! its shutdown-to-cut; the pump ends (close_notify, then TCP shutdown) when its unix end is
//! shut down or closed, and shuts its unix end down when the peer closes or TLS fails.
//!
//! The pump's two threads share the rustls connection under a lock held only while records are
//! encrypted or decrypted, never while a socket blocks: the TCP socket is written by the thread
//! holding a separate send lock, taken before the connection's lock is let go so records leave
//! in the order they were made. (A lock held over a blocking send would deadlock two pumps whose
//! peers both write more than the socket buffers hold.)
//!
//! It must not read or interpret NBD: the callers do the option haggling before and after.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::ServerName;

use crate::tls::Role;

/// Plaintext read from the NBD side per record batch (a 1 MiB WRITE goes as four batches).
const CHUNK: usize = 256 << 10;

/// The socket buffers asked for on each end of the pump's socketpair.
const PAIR_BUFFER: usize = 2 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An NBD connection's socket: the TCP socket itself, or the unix end of a TLS pump.
#[derive(Debug)]
pub enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    pub fn try_clone(&self) -> std::io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Whether the connection is inside TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Sock::Unix(_))
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s.write_all(buf),
            Sock::Unix(s) => s.write_all(buf),
        }
    }

    /// One sendmsg for a request's header and payload (the default would send the first only).
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write_vectored(bufs),
            Sock::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn refused(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, msg)
}

/// Runs the handshake on `tcp` (its timeouts bound it), sending an alert when it fails.
fn handshake(conn: &mut rustls::Connection, tcp: &mut TcpStream) -> std::io::Result<()> {
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(tcp) {
            // complete_io has queued the alert for a TLS error; deliver it if the peer listens.
            let _ = conn.write_tls(tcp);
            return Err(refused(format!("TLS handshake: {e}")));
        }
    }
    Ok(())
}

/// The server side of STARTTLS, after the server answered it with ACK: the handshake (a client
/// certificate of the CA is required by `config`), then the certificate must name `role`.
/// Returns the plaintext side.
pub fn accept(
    mut tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    role: Role,
) -> std::io::Result<UnixStream> {
    let mut conn = rustls::Connection::Server(
        rustls::ServerConnection::new(config).map_err(std::io::Error::other)?,
    );
    handshake(&mut conn, &mut tcp)?;
    if let Err(why) = crate::tls::peer_holds_role(conn.peer_certificates(), role) {
        conn.send_close_notify();
        let _ = conn.write_tls(&mut tcp);
        return Err(refused(why));
    }
    pump(tcp, conn)
}

/// The client side of STARTTLS, after the server answered it with ACK: the handshake with
/// `config` (which checks the server's certificate and its role), then the plaintext side.
pub fn connect(
    mut tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    server_role: Role,
) -> std::io::Result<UnixStream> {
    let name = ServerName::try_from(server_role.dns_name()).map_err(std::io::Error::other)?;
    let mut conn = rustls::Connection::Client(
        rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?,
    );
    handshake(&mut conn, &mut tcp)?;
    pump(tcp, conn)
}

struct Pump {
    conn: Mutex<rustls::Connection>,
    /// Held while TLS records are written to the socket.
    send: Mutex<TcpStream>,
}

impl Pump {
    /// Sends what the connection has queued; `conn` is the connection's guard, let go before the
    /// socket is written (but after the send lock is taken: the order of records holds). `out`
    /// is the calling thread's buffer for the records, kept between calls (its capacity grows
    /// once to a batch's records instead of a new allocation and its regrowths per batch).
    fn flush(
        &self,
        mut conn: MutexGuard<'_, rustls::Connection>,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        if !conn.wants_write() {
            return Ok(());
        }
        out.clear();
        while conn.wants_write() {
            conn.write_tls(out)?;
        }
        let mut send = lock(&self.send);
        drop(conn);
        send.write_all(out)
    }
}

fn pump(tcp: TcpStream, mut conn: rustls::Connection) -> std::io::Result<UnixStream> {
    // Whatever the handshake left queued (a TLS 1.3 server's session tickets) goes first.
    conn.set_buffer_limit(None);
    tcp.set_read_timeout(None)?;
    tcp.set_write_timeout(None)?;
    let (mut ours, theirs) = UnixStream::pair()?;
    // A 1 MiB WRITE crosses the pair in one go instead of five wake-ups of the default 208 KiB
    // (the kernel caps it at net.core.wmem_max/rmem_max; best effort).
    for end in [&ours, &theirs] {
        use nix::sys::socket::{setsockopt, sockopt};
        let _ = setsockopt(end, sockopt::SndBuf, &PAIR_BUFFER);
        let _ = setsockopt(end, sockopt::RcvBuf, &PAIR_BUFFER);
    }
    // A peer may send data right behind its last handshake message (gnutls does): the
    // handshake read it already, so it is handed on here, not waited for on the socket.
    let mut early = Vec::new();
    match conn.reader().read_to_end(&mut early) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    if !early.is_empty() {
        ours.write_all(&early)?;
    }
    let pump = Arc::new(Pump {
        conn: Mutex::new(conn),
        send: Mutex::new(tcp.try_clone()?),
    });
    pump.flush(lock(&pump.conn), &mut Vec::new())?;
    {
        let (pump, tcp, app) = (pump.clone(), tcp.try_clone()?, ours.try_clone()?);
        std::thread::Builder::new()
            .name("nbd-tls-in".into())
            .spawn(move || inbound(&pump, tcp, app))?;
    }
    std::thread::Builder::new()
        .name("nbd-tls-out".into())
        .spawn(move || outbound(&pump, tcp, ours))?;
    Ok(theirs)
}

/// Network to application: decrypts what arrives and hands the plaintext on; at the end (the
/// peer's close, a TLS error, the application gone) both sockets are shut down.
fn inbound(pump: &Pump, tcp: TcpStream, mut app: UnixStream) {
    let mut net = &tcp;
    let mut buf = vec![0u8; CHUNK];
    // The plaintext of one read from the socket is gathered in `plain[..filled]`; `plain` is
    // zeroed only where it grows, never again per batch.
    let mut plain = vec![0u8; CHUNK];
    let mut out = Vec::new();
    'outer: loop {
        let n = match net.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut data = &buf[..n];
        let mut filled = 0;
        let mut closed = false;
        while !data.is_empty() {
            let mut conn = lock(&pump.conn);
            if conn.read_tls(&mut data).is_err() {
                break 'outer;
            }
            let state = match conn.process_new_packets() {
                Ok(s) => s,
                Err(_) => {
                    let _ = pump.flush(conn, &mut out);
                    break 'outer;
                }
            };
            let want = state.plaintext_bytes_to_read();
            if want > 0 {
                if plain.len() < filled + want {
                    plain.resize(filled + want, 0);
                }
                if conn
                    .reader()
                    .read_exact(&mut plain[filled..filled + want])
                    .is_err()
                {
                    break 'outer;
                }
                filled += want;
            }
            closed |= state.peer_has_closed();
            // A key update's answer, say.
            if pump.flush(conn, &mut out).is_err() {
                break 'outer;
            }
        }
        if filled > 0 && app.write_all(&plain[..filled]).is_err() {
            break;
        }
        if closed {
            break;
        }
    }
    let _ = app.shutdown(Shutdown::Both);
    let _ = tcp.shutdown(Shutdown::Both);
}

/// Application to network: encrypts what the NBD code writes; when it shuts its end down or
/// closes it, close_notify and the TCP connection's end.
fn outbound(pump: &Pump, tcp: TcpStream, mut app: UnixStream) {
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::new();
    loop {
        let n = match app.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut conn = lock(&pump.conn);
        if conn.writer().write_all(&buf[..n]).is_err() || pump.flush(conn, &mut out).is_err() {
            let _ = app.shutdown(Shutdown::Both);
            let _ = tcp.shutdown(Shutdown::Both);
            return;
        }
    }
    let mut conn = lock(&pump.conn);
    conn.send_close_notify();
    let _ = pump.flush(conn, &mut out);
    let _ = tcp.shutdown(Shutdown::Both);
}
