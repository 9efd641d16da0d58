//! The network fake machines share (`FakeNet`): replica servers by address and the connections
//! of the engines' NBD children, with qemu's measured behaviour (a child whose server died fails
//! the request that finds out, and is reconnected silently at a later one once its export is
//! back). It must not know about files or devices: it maps an NBD target to the file it reaches.

use super::*;

/// An engine's NBD child: (machine, engine run_dir, child index).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct ClientKey(pub(super) u32, pub(super) PathBuf, pub(super) usize);

/// What an engine's NBD child knows of its connection.
#[derive(Clone, Debug)]
pub(super) struct ClientState {
    pub(super) target: ReplicaTarget,
    /// The pid of the replica server it is connected to; None once the connection was lost.
    pub(super) conn: Option<i32>,
    /// Completed handshakes: more than one is a reconnect.
    pub(super) handshakes: u32,
    /// Failures its engine's NBD client would have logged.
    pub(super) errors: u64,
}

/// A fake replica server: a process of machine `node`, listening on its address.
#[derive(Clone, Debug)]
pub(super) struct FakeServer {
    pub(super) node: u32,
    pub(super) run_dir: PathBuf,
    pub(super) pid: i32,
    /// Replica id → file (resolved).
    pub(super) exports: BTreeMap<String, PathBuf>,
    /// Which server this is: bicsi's (raw replicas) or qemu-storage-daemon (qcow2), as the
    /// format of its first export chose (the real one dispatches the same way).
    pub(super) format: ImageFormat,
}

#[derive(Default)]
pub(super) struct Net {
    pub(super) next_node: u32,
    pub(super) next_port: u16,
    /// Live replica servers by (host, port).
    pub(super) servers: BTreeMap<(String, u16), FakeServer>,
    pub(super) clients: BTreeMap<ClientKey, ClientState>,
}

impl Net {
    pub(super) fn server_of(
        &self,
        node: u32,
        run_dir: &Path,
    ) -> Option<((String, u16), &FakeServer)> {
        self.servers
            .iter()
            .find(|(_, s)| s.node == node && s.run_dir == run_dir)
            .map(|(addr, s)| (addr.clone(), s))
    }

    /// The file an NBD target reaches right now, without side effects.
    pub(super) fn peek(&self, target: &ReplicaTarget) -> Option<PathBuf> {
        let ReplicaTarget::Nbd { host, port, export } = target else {
            return None;
        };
        self.servers
            .get(&(host.clone(), *port))?
            .exports
            .get(export)
            .cloned()
    }

    pub(super) fn server_pid(&self, target: &ReplicaTarget) -> Option<i32> {
        let ReplicaTarget::Nbd { host, port, .. } = target else {
            return None;
        };
        Some(self.servers.get(&(host.clone(), *port))?.pid)
    }

    /// One request of an NBD child (see `World::reach`).
    pub(super) fn access(&mut self, key: &ClientKey, target: &ReplicaTarget) -> Option<PathBuf> {
        let now = self.peek(target);
        let pid = self.server_pid(target);
        let client = self
            .clients
            .entry(key.clone())
            .or_insert_with(|| ClientState {
                target: target.clone(),
                conn: None,
                handshakes: 0,
                errors: 0,
            });
        if client.conn.is_some() && (client.conn != pid || now.is_none()) {
            // The server died or cut us off: the request that finds out fails on this child.
            client.conn = None;
            client.errors += 1;
            return None;
        }
        // Not connected: connect again when the export is back (a new handshake).
        let file = now?;
        if client.conn.is_none() {
            client.conn = pid;
            client.handshakes += 1;
        }
        Some(file)
    }

    /// Connect an engine's NBD children at its start; the error names the first that fails.
    pub(super) fn connect(
        &mut self,
        node: u32,
        run_dir: &Path,
        targets: &[ReplicaTarget],
    ) -> OsResult<()> {
        for t in targets {
            if let ReplicaTarget::Nbd { host, port, export } = t {
                let Some(server) = self.servers.get(&(host.clone(), *port)) else {
                    return Err(OsError::Command {
                        cmd: "qemu-storage-daemon".into(),
                        stderr: format!(
                            "--blockdev {{\"driver\":\"nbd\",..}}: Failed to connect to \
                             '{host}:{port}': Connection refused; a remote replica is not \
                             reachable or not exported: check that its node's replica server \
                             runs (export_replica) and that host:port is reachable from this node"
                        ),
                    });
                };
                if !server.exports.contains_key(export) {
                    return Err(OsError::Command {
                        cmd: "qemu-storage-daemon".into(),
                        stderr: format!(
                            "--blockdev {{\"driver\":\"nbd\",..}}: Requested export not \
                             available\nserver reported: export '{export}' not present; a remote \
                             replica is not reachable or not exported: check that its node's \
                             replica server runs (export_replica) and that host:port is \
                             reachable from this node"
                        ),
                    });
                }
            }
        }
        self.disconnect(node, run_dir);
        for (i, t) in targets.iter().enumerate() {
            if matches!(t, ReplicaTarget::Nbd { .. }) {
                let pid = self.server_pid(t);
                self.clients.insert(
                    ClientKey(node, run_dir.to_path_buf(), i),
                    ClientState {
                        target: t.clone(),
                        conn: pid,
                        handshakes: 1,
                        errors: 0,
                    },
                );
            }
        }
        Ok(())
    }

    /// The engine's process is gone: so are its connections.
    pub(super) fn disconnect(&mut self, node: u32, run_dir: &Path) {
        self.clients
            .retain(|k, _| !(k.0 == node && k.1.as_path() == run_dir));
    }

    /// For the size of an engine without local children: its first NBD child that answers.
    pub(super) fn size_file(&self, run_dir: &Path, targets: &[ReplicaTarget]) -> OsResult<PathBuf> {
        targets
            .iter()
            .find_map(|t| self.peek(t))
            .ok_or_else(|| no_child(run_dir))
    }

    /// Engines (of any machine) connected to `export` of the server at `addr`.
    pub(super) fn clients_of(&self, addr: &(String, u16), export: &str) -> usize {
        let Some(server) = self.servers.get(addr) else {
            return 0;
        };
        self.clients
            .values()
            .filter(|c| {
                c.conn == Some(server.pid)
                    && matches!(&c.target, ReplicaTarget::Nbd { host, port, export: e }
                        if (host, *port) == (&addr.0, addr.1) && e == export)
            })
            .count()
    }

    pub(super) fn free_port(&mut self, host: &str) -> u16 {
        if self.next_port < 20_000 {
            self.next_port = 20_000;
        }
        loop {
            self.next_port = self.next_port.wrapping_add(1).max(20_000);
            if !self
                .servers
                .contains_key(&(host.to_string(), self.next_port))
            {
                return self.next_port;
            }
        }
    }
}

/// The network fake machines share: their replica servers by address and the connections of
/// their engines' NBD children. Every `Fake` has one; `Fake::with_net` puts another machine on
/// the same network, so a domain test can run two "nodes" in one process, node B exporting a
/// replica with `export_replica` and node A's engine using it as `ReplicaTarget::Nbd`. Machines on
/// one network see each other's files (the test's temp dir) as a real cluster would not: the
/// fakes only reach them through the rules above.
#[derive(Clone, Default)]
pub struct FakeNet {
    pub(super) inner: Arc<Mutex<Net>>,
}

impl std::fmt::Debug for FakeNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeNet { .. }")
    }
}

impl FakeNet {
    pub fn new() -> FakeNet {
        FakeNet::default()
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Net> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}
