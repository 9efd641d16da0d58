//! The S3 and registry sources against real servers started here on 127.0.0.1: `s3s-fs` (an S3
//! server from crates.io; scripts/test installs it) and Debian's `docker-registry` with
//! htpasswd authentication, the test image pushed by `skopeo` (both installed by scripts/test).
//! Without them a test says why it skips; under CI it fails instead.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256, Sha512};
use tokio_util::sync::CancellationToken;

use super::oci::{OciAccess, Platform};
use super::s3::{S3Access, S3Keys};
use super::*;
use crate::kit::{free_port, noise};

const MIB: usize = 1 << 20;

fn sha512_hex(data: &[u8]) -> String {
    hex::encode(Sha512::digest(data))
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn wait_listening(port: u16, what: &str) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on 127.0.0.1:{port}");
}

/// A program the test needs: `$VAR`, else on the PATH. `None` (the test skips, saying so)
/// only outside CI.
fn tool(name: &str, var: &str, install: &str) -> Option<PathBuf> {
    let found = std::env::var_os(var).map(PathBuf::from).or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs {name} ({install}; scripts/test installs it) and CI must not skip it"
        );
        eprintln!("SKIP: no {name} ({install}, or scripts/test)");
    }
    found
}

fn outcome(
    req: &DownloadRequest,
    progress: &dyn ProgressSink,
) -> impl Future<Output = Result<DownloadOutcome, DownloadError>> {
    download(req, progress, CancellationToken::new())
}

/// s3s-fs serving `root` (a directory per bucket) with one access key; killed when dropped.
struct S3Server {
    bin: PathBuf,
    root: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl S3Server {
    fn start(bin: &Path, root: &Path) -> S3Server {
        let mut s = S3Server {
            bin: bin.to_path_buf(),
            root: root.to_path_buf(),
            port: free_port(),
            child: None,
        };
        s.run();
        s
    }

    fn run(&mut self) {
        let child = Command::new(&self.bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", "bicsi-key", "--secret-key", "bicsi-secret"])
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_listening(self.port, "s3s-fs");
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_objects_come_signed_resume_mid_way_and_refusals_say_why() {
    let Some(bin) = tool(
        "s3s-fs",
        "BICSI_S3S_FS",
        "cargo install s3s-fs@0.14.1 --features binary",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s3");
    std::fs::create_dir_all(root.join("images/vm")).unwrap();
    let data = noise(24 * MIB + 5, 3);
    std::fs::write(root.join("images/vm/disk.img"), &data).unwrap();
    let server = Arc::new(Mutex::new(S3Server::start(&bin, &root)));
    let endpoint = format!("http://127.0.0.1:{}", server.lock().unwrap().port);
    let remote = |keys: Option<(&str, &str)>| {
        Remote::S3(S3Access {
            endpoint: Some(endpoint.clone()),
            region: "us-east-1".into(),
            keys: keys.map(|(i, k)| S3Keys {
                access_key_id: i.into(),
                secret_access_key: k.into(),
            }),
        })
    };
    let dest = dir.path().join("disk/tmp/image.part");
    let request = |url: &str, remote: Remote| DownloadRequest {
        idle_timeout: Duration::from_secs(5),
        max_attempts: 10,
        backoff: Duration::from_millis(100),
        remote,
        ..DownloadRequest::new(url, &dest)
    };
    let url = "s3://images/vm/disk.img";
    let good = Some(("bicsi-key", "bicsi-secret"));

    // The right keys: the object, verified, through the presigned GET.
    let req = request(url, remote(good));
    let out = outcome(&req, &NoProgress).await.unwrap();
    assert_eq!(out.sha512, sha512_hex(&data));
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    std::fs::remove_file(&dest).unwrap();
    // The head (the size of volumes made before the download is in) goes the same way.
    let h = head_remote(
        url,
        &remote(good),
        512,
        Duration::from_secs(5),
        &req.guard,
        &Access::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        (h.bytes.as_slice(), h.total),
        (&data[..512], Some(data.len() as u64))
    );

    // Wrong keys, no keys on a private server, a missing key or bucket: refused at once, said
    // why, the secret never shown.
    for (url, keys, want) in [
        (
            url,
            Some(("bicsi-key", "not-the-s3cret")),
            "check the access key id",
        ),
        (url, None, "the bucket is not public"),
        ("s3://images/vm/nothing.img", good, "no such bucket or key"),
        ("s3://no-bucket/vm/disk.img", good, "no such bucket or key"),
    ] {
        let req = request(url, remote(keys));
        let e = outcome(&req, &NoProgress).await.unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, DownloadError::Refused { .. }), "{url}: {m}");
        assert!(m.contains(want) && m.contains(url), "{url}: {m}");
        assert!(!m.contains("s3cret") && !m.contains("X-Amz"), "{m}");
        assert!(e.is_permanent(), "{m}");
        assert!(!dest.exists());
    }

    // The server dies at the first progress report and comes back: the download goes on
    // with a Range request on a fresh connection (same presigned URL) and is whole.
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s, k) = (server.clone(), killed.clone());
    let sink = move |received: u64, _total: Option<u64>| {
        if received > 0 && !k.swap(true, std::sync::atomic::Ordering::SeqCst) {
            s.lock().unwrap().kill();
            let s = s.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                s.lock().unwrap().run();
            });
        }
    };
    let req = request(url, remote(good));
    let out = outcome(&req, &sink).await.unwrap();
    assert!(killed.load(std::sync::atomic::Ordering::SeqCst));
    assert!(out.resumed >= 1, "resumed {}", out.resumed);
    assert_eq!(out.sha512, sha512_hex(&data));
    assert_eq!(std::fs::read(&dest).unwrap(), data);
}

/// docker-registry on 127.0.0.1 with htpasswd (basic) authentication; killed when dropped.
struct Registry {
    child: Child,
    port: u16,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    fn start(bin: &Path, dir: &Path) -> Registry {
        let port = free_port();
        let htpasswd = Command::new("htpasswd")
            .args(["-Bbn", "alice", "open sesame"])
            .output()
            .expect("htpasswd (apache2-utils)");
        assert!(htpasswd.status.success());
        std::fs::write(dir.join("htpasswd"), &htpasswd.stdout).unwrap();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}\n  \
             delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    \
             realm: bicsi-test\n    path: {ht}\n",
            root = dir.join("data").display(),
            ht = dir.join("htpasswd").display()
        );
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_listening(port, "docker-registry");
        Registry { child, port }
    }
}

/// Writes a blob into an OCI layout; returns its descriptor's digest and size.
fn blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let hex = sha256_hex(bytes);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

/// A containerDisk image's manifest in the layout: one gzip layer with `/disk/disk.img`.
fn disk_manifest(layout: &Path, disk: &[u8], arch: &str) -> serde_json::Value {
    let mut b = tar::Builder::new(Vec::new());
    let mut d = tar::Header::new_gnu();
    d.set_entry_type(tar::EntryType::Directory);
    d.set_size(0);
    d.set_mode(0o555);
    b.append_data(&mut d, "disk/", std::io::empty()).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(disk.len() as u64);
    h.set_mode(0o444);
    b.append_data(&mut h, "disk/disk.img", disk).unwrap();
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let layer = gz.finish().unwrap();
    let (ld, ls) = blob(layout, &layer);
    let config = serde_json::json!({"architecture": arch, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&tar))]}});
    let (cd, cs) = blob(layout, config.to_string().as_bytes());
    let manifest = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": ls}]});
    let (md, ms) = blob(layout, manifest.to_string().as_bytes());
    serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md, "size": ms, "platform": {"os": "linux", "architecture": arch}})
}

/// Pushes the layout's `tag` to the registry with skopeo, as a user would.
fn push(skopeo: &Path, layout: &Path, tag: &str, dest: &str, all: bool) {
    let mut cmd = Command::new(skopeo);
    cmd.args(["copy", "--quiet", "--dest-tls-verify=false"])
        .args(["--dest-creds", "alice:open sesame"]);
    if all {
        cmd.arg("--all");
    }
    let out = cmd
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_images_give_their_disk_with_credentials_and_the_platform_picked() {
    let Some(registry_bin) = tool(
        "docker-registry",
        "BICSI_DOCKER_REGISTRY",
        "apt-get install docker-registry",
    ) else {
        return;
    };
    let Some(skopeo) = tool("skopeo", "BICSI_SKOPEO", "apt-get install skopeo") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&registry_bin, dir.path());
    let host = format!("127.0.0.1:{}", registry.port);

    // A sparse raw disk (data, a 4 MiB hole, data) for this platform, another for another.
    let mut disk = noise(MIB, 1);
    disk.extend(std::iter::repeat_n(0u8, 4 * MIB));
    disk.extend(noise(MIB + 123, 2));
    let other = noise(MIB, 77);
    let layout = dir.path().join("layout");
    let here = Platform::default().architecture;
    let there = if here == "arm64" { "amd64" } else { "arm64" };
    let mine = disk_manifest(&layout, &disk, &here);
    let theirs = disk_manifest(&layout, &other, there);
    let index = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [theirs, mine.clone()]});
    let (idx, idx_size) = blob(&layout, index.to_string().as_bytes());
    let named = |d: &serde_json::Value, tag: &str| {
        let mut d = d.clone();
        d["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        d
    };
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [
        named(&mine, "single"),
        named(&serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": idx, "size": idx_size}), "multi"),
    ]});
    std::fs::write(layout.join("index.json"), top.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    push(
        &skopeo,
        &layout,
        "single",
        &format!("docker://{host}/vm/disk:v1"),
        false,
    );
    push(
        &skopeo,
        &layout,
        "multi",
        &format!("docker://{host}/vm/multi:v1"),
        true,
    );

    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        "alice:open sesame",
    );
    let config = format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#);
    let with = |docker_config: Option<String>, basic: Option<(&str, &str)>| {
        Remote::Oci(OciAccess {
            docker_config,
            basic: basic.map(|(u, p)| (u.to_string(), p.to_string())),
            platform: Platform::default(),
        })
    };
    let dest = dir.path().join("disk/tmp/image.part");
    let request = |url: String, remote: Remote| DownloadRequest {
        idle_timeout: Duration::from_secs(10),
        max_attempts: 3,
        backoff: Duration::from_millis(50),
        remote,
        ..DownloadRequest::new(url, &dest)
    };

    // The disk file of the layer, verified against the layer's digest, its hole kept.
    for (url, remote) in [
        (
            format!("docker://{host}/vm/disk:v1"),
            with(Some(config.clone()), None),
        ),
        (
            format!("oci://{host}/vm/multi:v1"),
            with(None, Some(("alice", "open sesame"))),
        ),
    ] {
        let req = request(url.clone(), remote.clone());
        let out = outcome(&req, &NoProgress)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(out.sha512, sha512_hex(&disk), "{url}");
        assert_eq!(out.compression, Some(Compression::Gzip));
        assert_eq!(
            out.source_checksum.as_ref().unwrap().algo,
            SourceAlgo::Sha256
        );
        let meta = std::fs::metadata(&dest).unwrap();
        assert_eq!(meta.len(), disk.len() as u64);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < disk.len() as u64 - 3 * MIB as u64,
            "the hole is kept: {} blocks",
            meta.blocks()
        );
        assert_eq!(std::fs::read(&dest).unwrap(), disk);
        std::fs::remove_file(&dest).unwrap();
        // The head: the disk image's first bytes and its size, before the download.
        let h = head_remote(
            &url,
            &remote,
            4096,
            Duration::from_secs(10),
            &req.guard,
            &Access::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("head {url}: {e}"));
        assert_eq!(h.bytes, disk[..4096], "{url}");
        assert_eq!(h.total, Some(disk.len() as u64));
    }

    // No credentials, wrong ones, a tag that is not there: refused, saying what to fix.
    let url = format!("docker://{host}/vm/disk:v1");
    for (url, remote, want) in [
        (url.clone(), with(None, None), "wants credentials"),
        (
            url.clone(),
            with(None, Some(("alice", "not-the-s3cret"))),
            "check the pull Secret",
        ),
        (
            format!("docker://{host}/vm/disk:v2"),
            with(Some(config.clone()), None),
            "no such repository or tag",
        ),
    ] {
        let e = outcome(&request(url.clone(), remote), &NoProgress)
            .await
            .unwrap_err();
        let m = e.to_string();
        assert!(m.contains(want) && !m.contains("s3cret"), "{url}: {m}");
        assert!(e.is_permanent(), "{m}");
        assert!(!dest.exists());
    }
}
