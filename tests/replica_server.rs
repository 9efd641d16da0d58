//! bicsi's replica server as the node agent drives it (`Engine::export_replica` and friends of
//! the real `QemuStorageDaemon`, issue 14): a real `bicsi replica-server` process on 127.0.0.1,
//! real clients (`qemu-io`, a raw NBD connection), found again by a fresh engine object as after
//! a restart of the node agent.

#[path = "kit/mod.rs"]
mod kit;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bicsi::os::engine::QemuStorageDaemon;
use bicsi::os::{Engine, ImageFormat, OsError, ReplicaExport};

const HOST: &str = "127.0.0.1";

/// The replica server is this test's `bicsi` binary, not the test executable.
fn engine() -> QemuStorageDaemon {
    // SAFETY: nextest runs each test in its own process, and this runs before the test starts
    // any thread; every call sets the same value.
    unsafe { std::env::set_var("BICSI_PROGRAM", env!("CARGO_BIN_EXE_bicsi")) };
    QemuStorageDaemon::new()
}

fn raw_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn export(id: &str, path: &Path) -> ReplicaExport {
    ReplicaExport {
        replica_id: id.into(),
        path: path.to_path_buf(),
        format: ImageFormat::Raw,
    }
}

fn server_pid(run_dir: &Path) -> i32 {
    std::fs::read_to_string(run_dir.join("server.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// An NBD client in transmission on `id` (NBD_OPT_GO by hand), held open by the caller.
fn connect(port: u16, id: &str) -> TcpStream {
    let mut s = TcpStream::connect((HOST, port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut go = Vec::new();
    go.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(&(4 + id.len() as u32 + 2).to_be_bytes());
    go.extend_from_slice(&(id.len() as u32).to_be_bytes());
    go.extend_from_slice(id.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&go).unwrap();
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).unwrap();
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        match kind {
            1 => return s,
            3 => {}
            other => panic!("GO {id:?} answered {other:#x}"),
        }
    }
}

fn qemu_io(port: u16, id: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd
        .arg(format!("nbd://{HOST}:{port}/{id}"))
        .output()
        .expect("qemu-io (qemu-utils)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !text.contains("failed"), "{text}");
    text
}

#[test]
fn raw_replicas_are_served_by_bicsis_own_server_and_readopted() {
    if !kit::root_or_skip("raw_replicas_are_served_by_bicsis_own_server_and_readopted") {
        return;
    }
    let e = engine();
    let dir = kit::temp_dir("bicsi-rs-");
    let d = dir.path();
    let run = d.join("replica-server-raw");
    let (r1, r2) = (
        raw_file(d, "r1.raw", 16 << 20),
        raw_file(d, "r2.raw", 16 << 20),
    );

    // The first export starts the server on a port of its own choosing; the next joins it.
    let port = e
        .export_replica(&run, HOST, 0, &export("v-r1", &r1))
        .unwrap();
    assert_ne!(port, 0);
    let pid = server_pid(&run);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("replica-server"),
        "the server is bicsi's own process"
    );
    assert_eq!(
        e.export_replica(&run, HOST, 0, &export("v-r2", &r2))
            .unwrap(),
        port
    );
    assert_eq!(
        e.export_replica(&run, HOST, port, &export("v-r1", &r1))
            .unwrap(),
        port
    );
    // Another file under an exported id, another address, a qcow2 replica: conflicts.
    let other = raw_file(d, "other.raw", 16 << 20);
    let err = e
        .export_replica(&run, HOST, 0, &export("v-r1", &other))
        .unwrap_err();
    assert!(matches!(err, OsError::Conflict(_)), "{err}");
    let err = e
        .export_replica(
            &run,
            HOST,
            port.wrapping_add(1).max(1),
            &export("x", &other),
        )
        .unwrap_err();
    assert!(matches!(err, OsError::Conflict(_)), "{err}");
    let qcow2 = ReplicaExport {
        format: ImageFormat::Qcow2,
        ..export("q", &other)
    };
    let err = e.export_replica(&run, HOST, 0, &qcow2).unwrap_err();
    assert!(matches!(err, OsError::Conflict(_)), "{err}");
    assert!(
        err.to_string().contains("run directory of its own"),
        "{err}"
    );
    assert_eq!(
        e.replica_server_status(&run).unwrap(),
        Some((port, vec!["v-r1".to_string(), "v-r2".to_string()]))
    );

    // qemu's NBD client writes and reads back through it.
    qemu_io(
        port,
        "v-r1",
        &["write -P 0xab 0 1M", "read -P 0xab 0 1M", "flush"],
    );
    let mut head = vec![0u8; 1 << 20];
    std::fs::File::open(&r1)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert!(head.iter().all(|b| *b == 0xab));

    // A restart of the node agent: a fresh engine object finds the server and its exports.
    let restarted = QemuStorageDaemon::new();
    assert_eq!(
        restarted.replica_server_status(&run).unwrap(),
        Some((port, vec!["v-r1".to_string(), "v-r2".to_string()]))
    );
    assert_eq!(
        restarted
            .export_replica(&run, HOST, 0, &export("v-r2", &r2))
            .unwrap(),
        port
    );
    assert_eq!(server_pid(&run), pid);

    // An export in use is Busy; forced, its client is cut off.
    let mut client = connect(port, "v-r2");
    let err = restarted.unexport_replica(&run, "v-r2").unwrap_err();
    assert!(matches!(err, OsError::Busy(_)), "{err}");
    assert!(err.to_string().contains("stop that engine"), "{err}");
    restarted.unexport_replica_force(&run, "v-r2").unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        client.read_to_end(&mut rest).unwrap_or(0),
        0,
        "the client was cut off"
    );
    restarted.unexport_replica(&run, "v-r2").unwrap();
    assert_eq!(
        restarted.replica_server_status(&run).unwrap(),
        Some((port, vec!["v-r1".to_string()]))
    );
    // The last export stops the server and removes its run directory.
    restarted.unexport_replica(&run, "v-r1").unwrap();
    assert_eq!(restarted.replica_server_status(&run).unwrap(), None);
    assert!(!run.exists());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "server pid {pid} still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_dead_raw_server_is_cleaned_and_a_taken_port_is_a_conflict() {
    if !kit::root_or_skip("a_dead_raw_server_is_cleaned_and_a_taken_port_is_a_conflict") {
        return;
    }
    let e = engine();
    let dir = kit::temp_dir("bicsi-rs-");
    let d = dir.path();
    let run = d.join("replica-server-raw");
    let r1 = raw_file(d, "r1.raw", 4 << 20);
    // A port another program holds.
    let taken = std::net::TcpListener::bind((HOST, kit::free_port())).unwrap();
    let busy_port = taken.local_addr().unwrap().port();
    let err = e
        .export_replica(&run, HOST, busy_port, &export("v-r1", &r1))
        .unwrap_err();
    assert!(matches!(err, OsError::Conflict(_)), "{err}");
    assert!(
        err.to_string().contains("taken by another program"),
        "{err}"
    );
    drop(taken);

    let port = e
        .export_replica(&run, HOST, 0, &export("v-r1", &r1))
        .unwrap();
    let pid = server_pid(&run);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Dead: nothing is exported; unexport clears its leftovers; a new export starts anew.
    assert_eq!(e.replica_server_status(&run).unwrap(), None);
    e.unexport_replica(&run, "v-r1").unwrap();
    assert!(!run.exists());
    let again = e
        .export_replica(&run, HOST, port, &export("v-r1", &r1))
        .unwrap();
    assert_eq!(again, port);
    e.unexport_replica(&run, "v-r1").unwrap();
    assert!(!run.exists());
}
