//! The fake `Engine`: volume engines and replica servers as entries of the simulated machine and
//! its network, with the real idempotency, `Conflict` and `Busy` rules. The spec and export
//! checks are the real ones (`crate::os::engine::check_volume_spec`,
//! `crate::os::engine::mirror::check_children`, `crate::os::nbd::check_replica_export`). It
//! does not run bicsi's mirror engine: a volume of raw children is simulated as qemu's is.

use super::*;
use crate::os::{engine, nbd};

/// The `Engine` part of a fake machine.
pub(super) struct FakeEngine(pub(super) Fake);

impl FakeEngine {
    /// `start_volume` without the failure injection, shared by `start`.
    /// `mirror`: the volume of bicsi's mirror engine (`start_mirror`).
    fn start_targets(
        &self,
        w: &mut World,
        spec: &VolumeEngineSpec,
        mirror: bool,
    ) -> OsResult<EngineState> {
        let volume = &spec.volume_id;
        engine::check_volume_spec(spec)?;
        // As the real engine: raw children (or a mirror engine asked for) are served by bicsi's
        // mirror engine, which serves no qcow2 file; qemu's reads local children as qcow2.
        let mirror = mirror || engine::mirror::serves(&spec.replicas);
        if mirror {
            engine::mirror::check_children(spec)?;
        }
        fs::create_dir_all(&spec.run_dir).map_err(|e| {
            OsError::io(
                format!("creating run directory {}", spec.run_dir.display()),
                e,
            )
        })?;
        let run_dir = resolve_parent(&spec.run_dir);
        let targets: Vec<ReplicaTarget> = spec
            .replicas
            .iter()
            .map(|t| match t {
                ReplicaTarget::Local(r) => ReplicaTarget::Local(resolve_parent(r)),
                nbd => nbd.clone(),
            })
            .collect();
        let replicas: Vec<PathBuf> = targets
            .iter()
            .filter_map(|t| match t {
                ReplicaTarget::Local(r) => Some(r.clone()),
                ReplicaTarget::Nbd { .. } => None,
            })
            .collect();
        if let Some(e) = w.engines.get(&run_dir).filter(|e| e.alive) {
            let (mut a, mut b) = (e.targets.clone(), targets.clone());
            a.sort();
            b.sort();
            if a == b && e.read_only == spec.read_only {
                return Ok(engine_state(&run_dir, e));
            }
            let show = |t: &[ReplicaTarget]| {
                t.iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(OsError::Conflict(format!(
                "engine in {} already serves replicas [{}] (read_only={}) for another request \
                 (volume {volume:?}: replicas [{}], read_only={}); stop it first",
                run_dir.display(),
                show(&e.targets),
                e.read_only,
                show(&spec.replicas),
                spec.read_only
            )));
        }
        let export = run_dir.join("export");
        // A dead engine's stale export can only be cleaned when no loop device holds it.
        if w.engines.contains_key(&run_dir) {
            if w.loops.values().any(|l| l.file == export) {
                return Err(export_busy(&run_dir, &export));
            }
            w.engines.remove(&run_dir);
        }
        for r in &replicas {
            let img = read_image(r)?;
            if !mirror && img.format != "qcow2" {
                return Err(OsError::Command {
                    cmd: "qemu-storage-daemon".into(),
                    stderr: format!(
                        "Image is not in qcow2 format ({}); see the log above",
                        r.display()
                    ),
                });
            }
            if let Some(other) = w.engine_using(r, Some(&run_dir))
                && !(other.read_only && spec.read_only)
            {
                return Err(lock_error("qemu-storage-daemon", r));
            }
            if w.exported_as(r).is_some() {
                return Err(lock_error("qemu-storage-daemon", r));
            }
        }
        let node = w.node;
        w.net.lock().connect(node, &run_dir, &targets)?;
        fs::write(&export, b"").map_err(|e| OsError::io("creating export file", e))?;
        let mode = if spec.read_only { 0o400 } else { 0o600 };
        let _ = fs::set_permissions(&export, fs::Permissions::from_mode(mode));
        w.next_pid += 1;
        let entry = EngineEntry {
            pid: w.next_pid,
            replicas,
            targets,
            read_only: spec.read_only,
            export,
            alive: true,
        };
        let _ = fs::write(run_dir.join("qsd.pid"), format!("{}\n", entry.pid));
        let state = engine_state(&run_dir, &entry);
        w.engines.insert(run_dir, entry);
        Ok(state)
    }

    fn unexport(&self, run_dir: &Path, replica_id: &str, force: bool) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("engine.unexport_replica")?;
        if force {
            w.called.insert("engine.unexport_replica_force".into());
        }
        let run_dir = resolve_parent(run_dir);
        let node = w.node;
        let net = w.net.clone();
        let mut net = net.lock();
        let Some((addr, _)) = net.server_of(node, &run_dir) else {
            drop(net);
            return remove_run_dir(&run_dir);
        };
        if !net.servers[&addr].exports.contains_key(replica_id) {
            return Ok(());
        }
        if !force && net.clients_of(&addr, replica_id) > 0 {
            return Err(OsError::Busy(format!(
                "replica {replica_id:?} exported on {}:{} is still in use by a volume engine (an \
                 attaching node is connected to it); stop that engine first, or use \
                 unexport_replica_force when that node is gone",
                addr.0, addr.1
            )));
        }
        let server = net.servers.get_mut(&addr).expect("found above");
        server.exports.remove(replica_id);
        if server.exports.is_empty() {
            net.servers.remove(&addr);
            drop(net);
            return remove_run_dir(&run_dir);
        }
        Ok(())
    }
}

impl Engine for FakeEngine {
    fn backup_replica(&self, replica: &Path, target: &Path) -> OsResult<bool> {
        let mut w = self.0.world();
        w.fail("engine.backup_replica")?;
        if w.engine_using(&resolve_parent(replica), None).is_none() {
            return Ok(false);
        }
        let own = read_image(replica)?.fs;
        let mut img = read_image(target)?;
        img.fs = own;
        write_image(target, &img)?;
        Ok(true)
    }

    fn start(&self, spec: &EngineSpec) -> OsResult<EngineState> {
        let mut w = self.0.world();
        w.fail("engine.start")?;
        self.start_targets(&mut w, &VolumeEngineSpec::from(spec), false)
    }

    fn start_volume(&self, spec: &VolumeEngineSpec) -> OsResult<EngineState> {
        let mut w = self.0.world();
        w.fail("engine.start_volume")?;
        self.start_targets(&mut w, spec, false)
    }

    fn nbd_tls(&self) -> Option<PathBuf> {
        // The fake's NBD servers and clients never use TLS.
        self.0.world().called.insert("engine.nbd_tls".into());
        None
    }

    fn start_mirror(
        &self,
        spec: &VolumeEngineSpec,
        _replica_timeout: std::time::Duration,
    ) -> OsResult<EngineState> {
        let mut w = self.0.world();
        w.fail("engine.start_mirror")?;
        self.start_targets(&mut w, spec, true)
    }

    fn engine_mounts(&self, replica: &Path) -> OsResult<Option<Vec<PathBuf>>> {
        let mut w = self.0.world();
        w.fail("engine.engine_mounts")?;
        let Some(e) = w.engine_using(&resolve_parent(replica), None) else {
            return Ok(None);
        };
        // The filesystem mount of the loop device on its export, not the binds of it.
        let device = w
            .loops
            .iter()
            .find(|(_, l)| l.file == e.export)
            .map(|(i, _)| *i);
        Ok(Some(
            w.mounts
                .iter()
                .filter(|m| device.is_some() && m.device == device && m.bind_of.is_none())
                .map(|m| m.info.target.clone())
                .take(1)
                .collect(),
        ))
    }

    fn status(&self, run_dir: &Path) -> OsResult<Option<EngineState>> {
        let mut w = self.0.world();
        w.fail("engine.status")?;
        let run_dir = resolve_parent(run_dir);
        Ok(w.engines
            .get(&run_dir)
            .filter(|e| e.alive)
            .map(|e| engine_state(&run_dir, e)))
    }

    fn volume_status(&self, run_dir: &Path) -> OsResult<Option<VolumeEngineState>> {
        let mut w = self.0.world();
        w.fail("engine.volume_status")?;
        let run_dir = resolve_parent(run_dir);
        let Some(e) = w.engines.get(&run_dir).filter(|e| e.alive) else {
            return Ok(None);
        };
        let net = w.net.lock();
        let mut reconnected = Vec::new();
        let mut remote_errors = 0;
        for (i, t) in e.targets.iter().enumerate() {
            if let Some(c) = net.clients.get(&ClientKey(w.node, run_dir.clone(), i)) {
                if c.handshakes > 1 {
                    reconnected.push(t.clone());
                }
                remote_errors += c.errors;
            }
        }
        Ok(Some(VolumeEngineState {
            engine: engine_state(&run_dir, e),
            replicas: e.targets.clone(),
            reconnected,
            remote_errors,
        }))
    }

    fn stop(&self, run_dir: &Path) -> OsResult<()> {
        let mut w = self.0.world();
        w.fail("engine.stop")?;
        let run_dir = resolve_parent(run_dir);
        if let Some(e) = w.engines.get(&run_dir) {
            if w.loops.values().any(|l| l.file == e.export) {
                return Err(export_busy(&run_dir, &e.export));
            }
            w.engines.remove(&run_dir);
            let node = w.node;
            w.net.lock().disconnect(node, &run_dir);
        }
        remove_run_dir(&run_dir)
    }

    fn export_replica(
        &self,
        run_dir: &Path,
        host: &str,
        port: u16,
        export: &ReplicaExport,
    ) -> OsResult<u16> {
        let mut w = self.0.world();
        w.fail("engine.export_replica")?;
        let id = &export.replica_id;
        nbd::check_replica_export(run_dir, host, export)?;
        let actual = read_image(&export.path)?.format;
        if actual != export.format.as_str() {
            return Err(OsError::Command {
                cmd: format!("QMP blockdev-add {}", export.path.display()),
                stderr: format!("Image is not in {} format (it is {actual})", export.format),
            });
        }
        let path = resolve_parent(&export.path);
        fs::create_dir_all(run_dir).map_err(|e| {
            OsError::io(
                format!(
                    "creating run directory {} of the replica server",
                    run_dir.display()
                ),
                e,
            )
        })?;
        let run_dir = resolve_parent(run_dir);
        if w.engine_using(&path, None).is_some() {
            return Err(lock_error("QMP blockdev-add", &path));
        }
        let exported_as = w.exported_as(&path);
        let node = w.node;
        let net = w.net.clone();
        let mut net = net.lock();
        let addr = match net.server_of(node, &run_dir) {
            Some((_, server)) if server.format != export.format => {
                return Err(OsError::Conflict(crate::os::engine::server_kind_conflict(
                    &run_dir, export,
                )));
            }
            Some((addr, _)) => {
                if addr.0 != host || (port != 0 && port != addr.1) {
                    return Err(OsError::Conflict(format!(
                        "replica server in {} listens on {}:{}, not on {host}:{port}; unexport \
                         its replicas first (it stops with the last one) or use that address",
                        run_dir.display(),
                        addr.0,
                        addr.1
                    )));
                }
                addr
            }
            None => {
                let port = if port == 0 { net.free_port(host) } else { port };
                let addr = (host.to_string(), port);
                if net.servers.contains_key(&addr) {
                    return Err(OsError::Conflict(format!(
                        "replica server in {}: port {port} on {host} is taken by another \
                         program; use another port",
                        run_dir.display()
                    )));
                }
                addr
            }
        };
        if let Some(server) = net.servers.get(&addr)
            && let Some(file) = server.exports.get(id)
        {
            if *file == path {
                return Ok(addr.1);
            }
            return Err(OsError::Conflict(format!(
                "replica server in {} already exports replica {id:?} from {}, not from {}; \
                 unexport it first",
                run_dir.display(),
                file.display(),
                export.path.display()
            )));
        }
        if exported_as.is_some() {
            return Err(lock_error("QMP blockdev-add", &path));
        }
        if !net.servers.contains_key(&addr) {
            w.next_pid += 1;
            let _ = fs::write(run_dir.join("qsd.pid"), format!("{}\n", w.next_pid));
            net.servers.insert(
                addr.clone(),
                FakeServer {
                    node,
                    run_dir: run_dir.clone(),
                    pid: w.next_pid,
                    exports: BTreeMap::new(),
                    format: export.format,
                },
            );
        }
        let server = net.servers.get_mut(&addr).expect("inserted above");
        server.exports.insert(id.clone(), path);
        Ok(addr.1)
    }

    fn unexport_replica(&self, run_dir: &Path, replica_id: &str) -> OsResult<()> {
        self.unexport(run_dir, replica_id, false)
    }

    fn unexport_replica_force(&self, run_dir: &Path, replica_id: &str) -> OsResult<()> {
        self.unexport(run_dir, replica_id, true)
    }

    fn replica_server_status(&self, run_dir: &Path) -> OsResult<Option<(u16, Vec<String>)>> {
        let mut w = self.0.world();
        w.fail("engine.replica_server_status")?;
        let run_dir = resolve_parent(run_dir);
        let net = w.net.lock();
        Ok(net
            .server_of(w.node, &run_dir)
            .map(|((_, port), s)| (port, s.exports.keys().cloned().collect())))
    }
}

fn remove_run_dir(run_dir: &Path) -> OsResult<()> {
    match fs::remove_dir_all(run_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(OsError::io(
            format!("removing run directory {}", run_dir.display()),
            e,
        )),
    }
}

fn export_busy(run_dir: &Path, export: &Path) -> OsError {
    OsError::Busy(format!(
        "cannot stop the engine in {}: its export {} is still in use by a loop device; unmount \
         the volume and detach its loop device first",
        run_dir.display(),
        export.display()
    ))
}
