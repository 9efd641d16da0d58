//! Mutual TLS between the split mode's processes (issue 19), against a real `bicsi controller`
//! and `bicsi node` on 127.0.0.1: each TCP listener (the controller's Cluster service, the
//! node's Agent service and its file-transfer listener) refuses, at the handshake, a client with
//! no certificate, one from another CA, an expired one, a revoked one (the CA's CRL in the
//! server's `--tls-dir`) and one of the wrong role, and answers a client with the right
//! certificate; the refusals are logged with their reason. Without `--tls-dir` the processes
//! refuse to start unless `--insecure` says so, which logs a warning. The HTTP API serves HTTPS
//! with `--tls-cert`/`--tls-key`.

#[path = "kit/mod.rs"]
mod kit;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bicsi::remote::pb;
use bicsi::tls::Role;
use kit::{Proc, bicsi, csi_endpoint, free_port, temp_dir};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// `bicsi certs ARGS`, which must succeed.
fn certs(args: &[&str]) -> String {
    let out = bicsi().arg("certs").args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bicsi certs {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A directory with `tls.crt`/`tls.key` of a certificate of `role` from the CA in `ca_dir`,
/// valid from `from` to `until`.
fn issued(dir: &Path, ca_dir: &Path, role: Role, from: SystemTime, until: SystemTime) -> PathBuf {
    let (cert, key) = bicsi::certs::issue(ca_dir, role, &[], from, until).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tls.crt"), cert).unwrap();
    std::fs::write(dir.join("tls.key"), key).unwrap();
    dir.to_path_buf()
}

/// A rustls client trusting the CA `ca` (so only the client side can fail), presenting the
/// certificate in `identity` (`tls.crt`, `tls.key`), or none.
fn client_config(ca: &Path, identity: Option<&Path>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match identity {
        None => b.with_no_client_auth(),
        Some(dir) => b
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(dir.join("tls.crt"))
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_file(dir.join("tls.key")).unwrap(),
            )
            .unwrap(),
    })
}

/// A gRPC channel over TLS with `config` to 127.0.0.1:`port`, checking the server's certificate
/// for `server`'s role name.
fn channel(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    server: Role,
) -> tonic::transport::Channel {
    let connector = tokio_rustls::TlsConnector::from(config);
    tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let name = ServerName::try_from(server.dns_name()).unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
}

/// Calls the Cluster service (StoreList of the nodes) as the holder of `config`.
async fn call_cluster(port: u16, config: Arc<rustls::ClientConfig>) -> Result<usize, String> {
    let mut c = pb::cluster_client::ClusterClient::new(channel(port, config, Role::Controller));
    c.store_list(pb::StoreKind {
        kind: "nodes".into(),
    })
    .await
    .map(|r| r.into_inner().entries.len())
    .map_err(|s| format!("{s}"))
}

/// Calls the Agent service (DiskSpace) as the holder of `config`.
async fn call_agent(port: u16, config: Arc<rustls::ClientConfig>) -> Result<usize, String> {
    let mut c = pb::agent_client::AgentClient::new(channel(port, config, Role::Node));
    c.disk_space(pb::Empty {})
        .await
        .map(|r| r.into_inner().disks.len())
        .map_err(|s| format!("{s}"))
}

/// GETs /healthz of the transfer listener as the holder of `config`.
async fn call_transfers(port: u16, config: Arc<rustls::ClientConfig>) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured((*config).clone())
        .resolve("bicsi-node", ([127, 0, 0, 1], port).into())
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = client
        .get(format!("https://bicsi-node:{port}/healthz"))
        .send()
        .await
        .map_err(|e| bicsi::messages::error_chain(&e))?;
    r.text().await.map_err(|e| e.to_string())
}

async fn wait_for(what: &str, proc: &mut Proc, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok().await {
        proc.assert_alive();
        assert!(Instant::now() < deadline, "{what}:\n{}", proc.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `proc`'s log has one more line with `needle` than it had (`before`).
async fn logged(proc: &Proc, needle: &str, before: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = proc.log();
        if log.matches(needle).count() > before {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no new {needle:?} in the log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_refuses_clients_without_a_valid_certificate_of_its_role() {
    let dir = temp_dir("bicsi-mtls-");
    let certs_dir = dir.path().join("certs");
    let ca = certs_dir.join("ca");
    certs(&["--out", certs_dir.to_str().unwrap()]);
    let now = SystemTime::now();
    let day = Duration::from_secs(86400);
    // A node certificate and a controller certificate of the cluster's CA, both revoked.
    let revoked_node = issued(
        &dir.path().join("revoked-node"),
        &ca,
        Role::Node,
        now - day,
        now + day,
    );
    let revoked_ctl = issued(
        &dir.path().join("revoked-controller"),
        &ca,
        Role::Controller,
        now - day,
        now + day,
    );
    let out = certs(&[
        "--out",
        certs_dir.to_str().unwrap(),
        "--revoke",
        revoked_node.join("tls.crt").to_str().unwrap(),
        "--revoke",
        revoked_ctl.join("tls.crt").to_str().unwrap(),
    ]);
    assert_eq!(out.matches("revoked serial").count(), 2, "{out}");
    assert!(
        certs_dir.join("controller/ca.crl").is_file() && certs_dir.join("node/ca.crl").is_file()
    );
    // Expired ones of the same CA, and valid ones of another CA.
    let expired_node = issued(
        &dir.path().join("expired-node"),
        &ca,
        Role::Node,
        now - 3 * day,
        now - day,
    );
    let expired_ctl = issued(
        &dir.path().join("expired-controller"),
        &ca,
        Role::Controller,
        now - 3 * day,
        now - day,
    );
    let other = dir.path().join("other");
    certs(&["--out", other.to_str().unwrap()]);

    let (http, cluster, agent, transfers) = (free_port(), free_port(), free_port(), free_port());
    let mut controller = Proc::spawn(
        vec![
            "controller".into(),
            "--data-dir".into(),
            dir.path().join("controller").display().to_string(),
            "--csi-endpoint".into(),
            format!("unix://{}", dir.path().join("controller.sock").display()),
            "--http-listen".into(),
            format!("127.0.0.1:{http}"),
            "--cluster-listen".into(),
            format!("127.0.0.1:{cluster}"),
            "--tls-dir".into(),
            certs_dir.join("controller").display().to_string(),
        ],
        dir.path().join("controller.log"),
    );
    let ndir = dir.path().join("n1");
    let mut node = Proc::spawn(
        vec![
            "node".into(),
            "--node-id".into(),
            "n1".into(),
            "--data-dir".into(),
            ndir.join("data").display().to_string(),
            "--csi-endpoint".into(),
            csi_endpoint(&ndir),
            "--disk".into(),
            ndir.join("disk").display().to_string(),
            "--controller".into(),
            format!("https://127.0.0.1:{cluster}"),
            "--agent-listen".into(),
            format!("127.0.0.1:{agent}"),
            "--http-listen".into(),
            format!("127.0.0.1:{transfers}"),
            "--nbd-listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--tls-dir".into(),
            certs_dir.join("node").display().to_string(),
        ],
        dir.path().join("node.log"),
    );
    // The node registers over mTLS, and the controller reaches its agent (disks) over mTLS.
    let api = format!("http://127.0.0.1:{http}");
    wait_for(
        "the node did not register over mTLS",
        &mut node,
        async || {
            let Ok(r) = reqwest::get(format!("{api}/v1/disks")).await else {
                return false;
            };
            r.json::<serde_json::Value>()
                .await
                .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() == 1))
        },
    )
    .await;
    controller.assert_alive();
    let nodes: serde_json::Value = reqwest::get(format!("{api}/v1/nodes"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for field in ["agentUrl", "transferUrl"] {
        assert!(
            nodes[0][field]
                .as_str()
                .is_some_and(|u| u.starts_with("https://")),
            "{field}: {nodes}"
        );
    }

    let ca_crt = ca.join("ca.crt");
    let cfg = |identity: Option<&Path>| client_config(&ca_crt, identity);
    let node_id = certs_dir.join("node");
    let ctl_id = certs_dir.join("controller");
    let other_node = other.join("node");
    let other_ctl = other.join("controller");

    // (client, what must be in the server's log line)
    type Case<'a> = (&'a str, Option<&'a Path>, &'a str);
    let refused_for_nodes: [Case; 5] = [
        ("no certificate", None, "peer sent no certificates"),
        ("another CA's", Some(&other_node), "UnknownIssuer"),
        ("expired", Some(&expired_node), "expired"),
        ("revoked", Some(&revoked_node), "Revoked"),
        (
            "the controller's (wrong role)",
            Some(&ctl_id),
            "not a node agent certificate",
        ),
    ];
    let refused_for_controller: [Case; 5] = [
        ("no certificate", None, "peer sent no certificates"),
        ("another CA's", Some(&other_ctl), "UnknownIssuer"),
        ("expired", Some(&expired_ctl), "expired"),
        ("revoked", Some(&revoked_ctl), "Revoked"),
        (
            "a node's (wrong role)",
            Some(&node_id),
            "not a controller certificate",
        ),
    ];

    // The controller's Cluster service: node agents only.
    for (what, id, reason) in refused_for_nodes {
        let before = controller.log().matches(reason).count();
        let r = call_cluster(cluster, cfg(id)).await;
        assert!(
            r.is_err(),
            "Cluster service answered a client with {what} certificate: {r:?}"
        );
        let log = logged(&controller, reason, before).await;
        assert!(log.contains("listener=\"Cluster service\""), "{log}");
    }
    assert_eq!(call_cluster(cluster, cfg(Some(&node_id))).await, Ok(1));

    // The node's Agent service: the controller only.
    for (what, id, reason) in refused_for_controller {
        let before = node.log().matches(reason).count();
        let r = call_agent(agent, cfg(id)).await;
        assert!(
            r.is_err(),
            "Agent service answered a client with {what} certificate: {r:?}"
        );
        let log = logged(&node, reason, before).await;
        assert!(log.contains("listener=\"Agent service\""), "{log}");
    }
    assert_eq!(call_agent(agent, cfg(Some(&ctl_id))).await, Ok(1));

    // The node's file transfers: other node agents only.
    for (what, id, reason) in refused_for_nodes {
        let before = node.log().matches(reason).count();
        let r = call_transfers(transfers, cfg(id)).await;
        assert!(
            r.is_err(),
            "the transfer listener answered a client with {what} certificate: {r:?}"
        );
        logged(&node, reason, before).await;
    }
    assert_eq!(
        call_transfers(transfers, cfg(Some(&node_id)))
            .await
            .as_deref(),
        Ok("ok\n")
    );
    // Plain HTTP to the transfer listener gets nothing either.
    assert!(
        reqwest::get(format!("http://127.0.0.1:{transfers}/healthz"))
            .await
            .is_err()
    );
    node.assert_alive();
    controller.assert_alive();
}

#[tokio::test]
async fn split_mode_needs_tls_dir_or_an_explicit_insecure_which_warns() {
    let dir = temp_dir("bicsi-mtls-insecure-");
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "controller".into(),
            "--data-dir".into(),
            dir.path().join("c").display().to_string(),
            "--csi-endpoint".into(),
            format!("unix://{}", dir.path().join("c.sock").display()),
            "--http-listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--cluster-listen".into(),
            format!("127.0.0.1:{}", free_port()),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // Neither: refused, saying what to give.
    let out = bicsi().args(base(&[])).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--tls-dir") && err.contains("--insecure") && err.contains("bicsi certs"),
        "{err}"
    );
    // Both: contradictory.
    let tls = kit::controller_tls_dir();
    let out = bicsi()
        .args(base(&["--tls-dir", &tls, "--insecure"]))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("contradict"));
    // A --tls-dir without the files: refused at start, naming the directory and the file.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = bicsi()
        .args(base(&["--tls-dir", empty.to_str().unwrap()]))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(empty.to_str().unwrap()) && err.contains("ca.crt"),
        "{err}"
    );
    // --insecure: it runs, and says what that means.
    let mut p = Proc::spawn(base(&["--insecure"]), dir.path().join("insecure.log"));
    let log = logged(&p, "bicsi serving", 0).await;
    assert!(
        log.contains(
            "--insecure: the Cluster and Agent services and file transfers run over plain TCP"
        ),
        "{log}"
    );
    p.assert_alive();
}

#[tokio::test]
async fn http_api_serves_https_with_tls_cert_and_key() {
    let dir = temp_dir("bicsi-mtls-api-");
    // Any certificate and key do; here a controller certificate that also names 127.0.0.1.
    let made = dir.path().join("api-certs");
    certs(&[
        "--out",
        made.to_str().unwrap(),
        "--controller-name",
        "127.0.0.1",
    ]);
    let tls = made.join("controller");
    let port = free_port();
    let mut args = kit::serve_args(dir.path(), "api-node", &format!("127.0.0.1:{port}"));
    args.extend([
        "--tls-cert".into(),
        tls.join("tls.crt").display().to_string(),
        "--tls-key".into(),
        tls.join("tls.key").display().to_string(),
    ]);
    let mut p = Proc::spawn(args, dir.path().join("serve.log"));
    let ca = reqwest::Certificate::from_pem(&std::fs::read(tls.join("ca.crt")).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .no_proxy()
        .build()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}/v1/backingimages");
    wait_for("the HTTPS API did not answer", &mut p, async || {
        client
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    // Plain HTTP is not served on that port.
    assert!(
        reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
            .await
            .is_err()
    );
    // The CLI reaches it with --ca-cert.
    let out = bicsi()
        .args(["get", "backingimages", "--server"])
        .arg(format!("https://127.0.0.1:{port}"))
        .arg("--ca-cert")
        .arg(tls.join("ca.crt"))
        .env_remove("BICSI_TOKEN")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // A key that is not the certificate's: refused at start.
    let other = dir.path().join("other");
    certs(&["--out", other.to_str().unwrap()]);
    let mut args = kit::serve_args(&dir.path().join("bad"), "api-node", "127.0.0.1:0");
    args.extend([
        "--tls-cert".into(),
        tls.join("tls.crt").display().to_string(),
        "--tls-key".into(),
        other.join("controller/tls.key").display().to_string(),
    ]);
    let out = bicsi().args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--tls-key") && err.contains("does not fit"),
        "{err}"
    );
}
