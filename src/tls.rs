//! Mutual TLS between bicsi's processes (issue 19): the controller's Cluster service, the node
//! agents' Agent service and their file-transfer listener, and the clients of each.
//!
//! Trust is one cluster CA. Every process has a certificate of it, read from a `--tls-dir` laid
//! out like a `kubernetes.io/tls` Secret as cert-manager writes it: `ca.crt` (the CA),
//! `tls.crt` (this process's chain), `tls.key` (its key) and, optionally, `ca.crl` (revoked
//! certificates, PEM). A certificate names its role as a DNS name: [`Role::Controller`]
//! (`bicsi-controller`) or [`Role::Node`] (`bicsi-node`). Servers require a client certificate
//! of the CA, valid now and not revoked, checked by rustls during the handshake, and then the
//! role the listener is for (only the controller may call a node's Agent service; only nodes the
//! Cluster service and the transfers); a client that fails either is dropped before any request
//! is read. Clients check the server's certificate against the CA and the role they expect,
//! whatever address they dialled: pods' addresses change, roles do not.
//!
//! The crypto provider is aws-lc-rs, passed explicitly, as kube's and reqwest's are.
//! This module must not decide whether TLS is on: [`Transport`] carries that decision, made
//! from the flags (`--tls-dir` or an explicit `--insecure`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::error::{Error, Result};

/// The files of a `--tls-dir`.
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
pub const CRL_FILE: &str = "ca.crl";

/// A client has this long to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which kind of bicsi process a certificate belongs to, named by a DNS name in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Controller,
    Node,
}

impl Role {
    pub fn dns_name(self) -> &'static str {
        match self {
            Role::Controller => "bicsi-controller",
            Role::Node => "bicsi-node",
        }
    }

    fn server_name(self) -> ServerName<'static> {
        ServerName::try_from(self.dns_name()).expect("a valid DNS name")
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A process's cluster identity: the CA, its own certificate and key, and the revoked
/// certificates.
pub struct ClusterTls {
    dir: PathBuf,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ClusterTls")
            .field("dir", &self.dir)
            .finish()
    }
}

fn bad(dir: &Path, file: &str, what: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!(
        "--tls-dir {}: {file}: {what}; give a directory with ca.crt, tls.crt and tls.key \
         (`bicsi certs` makes them, or mount the Secret cert-manager writes)",
        dir.display()
    ))
}

impl ClusterTls {
    /// Reads and checks `dir`: every file parses, the key matches the certificate, and the
    /// certificate chains to the CA.
    pub fn load(dir: &Path) -> Result<Arc<ClusterTls>> {
        let ca = dir.join(CA_FILE);
        let mut roots = RootCertStore::empty();
        let ca_certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca)
            .map_err(|e| bad(dir, CA_FILE, e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(dir, CA_FILE, e))?;
        if ca_certs.is_empty() {
            return Err(bad(dir, CA_FILE, "no certificate in it"));
        }
        for c in ca_certs {
            roots.add(c).map_err(|e| bad(dir, CA_FILE, e))?;
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join(CERT_FILE))
                .map_err(|e| bad(dir, CERT_FILE, e))?
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| bad(dir, CERT_FILE, e))?;
        if chain.is_empty() {
            return Err(bad(dir, CERT_FILE, "no certificate in it"));
        }
        let key =
            PrivateKeyDer::from_pem_file(dir.join(KEY_FILE)).map_err(|e| bad(dir, KEY_FILE, e))?;
        let crl_path = dir.join(CRL_FILE);
        let crls = if crl_path.exists() {
            CertificateRevocationListDer::pem_file_iter(&crl_path)
                .map_err(|e| bad(dir, CRL_FILE, e))?
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| bad(dir, CRL_FILE, e))?
        } else {
            Vec::new()
        };
        let tls = ClusterTls {
            dir: dir.to_path_buf(),
            roots: Arc::new(roots),
            chain,
            key,
            crls,
        };
        // Built once here so a key that does not match, or a CRL that does not parse, stops
        // the process at start with the directory named, not at the first connection.
        tls.server_config(None)?;
        tls.client_config(Role::Node)?;
        Ok(Arc::new(tls))
    }

    /// The server side: a client certificate of the CA is required (and, with `ca.crl`, not
    /// revoked). ALPN offers HTTP/2 and HTTP/1.1 (gRPC, transfers).
    pub fn server_config(&self, alpn: Option<&[&[u8]]>) -> Result<Arc<ServerConfig>> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .with_crls(self.crls.clone())
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| bad(&self.dir, CRL_FILE, e))?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Internal(format!("TLS versions: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| bad(&self.dir, KEY_FILE, e))?;
        cfg.alpn_protocols = alpn
            .unwrap_or(&[b"h2", b"http/1.1"])
            .iter()
            .map(|p| p.to_vec())
            .collect();
        Ok(Arc::new(cfg))
    }

    /// The client side, for servers of role `peer`: presents this process's certificate and
    /// checks the server's against the CA, the CRL and `peer`'s name.
    pub fn client_config(&self, peer: Role) -> Result<Arc<ClientConfig>> {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .with_crls(self.crls.clone())
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| bad(&self.dir, CRL_FILE, e))?;
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Internal(format!("TLS versions: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(RoleVerifier {
                inner,
                name: peer.server_name(),
            }))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| bad(&self.dir, KEY_FILE, e))?;
        Ok(Arc::new(cfg))
    }
}

/// Checks a server certificate with webpki as usual, but for the role's name instead of the
/// address dialled (a pod IP, a Service name): the CA only issues role names.
#[derive(Debug)]
struct RoleVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// How a split-mode process talks to the others: mutual TLS, or plain TCP when the operator
/// said `--insecure`.
#[derive(Clone, Debug)]
pub enum Transport {
    Mtls(Arc<ClusterTls>),
    Insecure,
}

impl Transport {
    /// From `--tls-dir` and `--insecure`: exactly one must be given.
    pub fn from_flags(tls_dir: Option<&Path>, insecure: bool) -> Result<Transport> {
        match (tls_dir, insecure) {
            (Some(_), true) => Err(Error::InvalidArgument(
                "--tls-dir and --insecure contradict each other; give one".into(),
            )),
            (Some(dir), false) => Ok(Transport::Mtls(ClusterTls::load(dir)?)),
            (None, true) => {
                tracing::warn!(
                    "--insecure: the Cluster and Agent services and file transfers run over plain \
                     TCP, unauthenticated and unencrypted; anyone who can reach these ports can \
                     call them. Use --tls-dir outside a test machine"
                );
                Ok(Transport::Insecure)
            }
            (None, false) => Err(Error::InvalidArgument(
                "the controller and the node agents authenticate each other with mutual TLS: \
                 give --tls-dir DIR (ca.crt, tls.crt, tls.key; `bicsi certs --out DIR` makes \
                 them), or --insecure for plain TCP"
                    .into(),
            )),
        }
    }

    /// The URL scheme of this transport's listeners.
    pub fn scheme(&self) -> &'static str {
        match self {
            Transport::Mtls(_) => "https",
            Transport::Insecure => "http",
        }
    }

    /// A lazily connecting gRPC channel to a server of role `peer` at `url`
    /// (`http(s)://host:port`; with mTLS the handshake happens whatever the scheme says).
    pub fn channel(&self, url: &str, peer: Role) -> Result<tonic::transport::Channel> {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| Error::InvalidArgument(format!("bad address {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60));
        let Transport::Mtls(tls) = self else {
            return Ok(endpoint.connect_lazy());
        };
        let connector = tokio_rustls::TlsConnector::from(tls.client_config(peer)?);
        Ok(endpoint.connect_with_connector_lazy(tower::service_fn(
            move |uri: tonic::transport::Uri| {
                let connector = connector.clone();
                async move {
                    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
                    let port = uri.port_u16().unwrap_or(443);
                    let tcp = TcpStream::connect((host, port)).await?;
                    let _ = tcp.set_nodelay(true);
                    let tls = connector.connect(peer.server_name(), tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            },
        )))
    }
}

/// Accepts TCP connections on a listener and hands on those whose TLS handshake succeeded and
/// whose certificate holds the listener's role; every other one is closed and logged. Each
/// handshake runs in a task of its own, so a slow or silent client holds up no one else.
pub struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsListener {
    /// Serves `listener` with `config`; `client_role`: the role a client's certificate must
    /// name (None: any certificate the config accepts, or none if it asks for none).
    /// `what` names the listener in the log.
    pub fn new(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        client_role: Option<Role>,
        what: &'static str,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(listener = what, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::warn!(listener = what, %peer, error = %e, "refused a TLS client");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(listener = what, %peer, "refused a TLS client: no handshake within {HANDSHAKE_TIMEOUT:?}");
                            return;
                        }
                    };
                    if let Some(role) = client_role
                        && let Err(why) = holds_role(&stream, role)
                    {
                        tracing::warn!(listener = what, %peer, "refused a TLS client: {why}");
                        return;
                    }
                    let _ = tx.send((stream, peer)).await;
                });
            }
        });
        Ok(TlsListener { rx, local, task })
    }

    /// The connections, as a stream for tonic's `serve_with_incoming`.
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static {
        futures::stream::unfold(self, |mut l| async move {
            let (s, _) = l.rx.recv().await?;
            Some((Ok(s), l))
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ended (only when aborted): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Whether the client's certificate (already verified against the CA) names `role`.
fn holds_role(stream: &TlsStream<TcpStream>, role: Role) -> std::result::Result<(), String> {
    let (_, conn) = stream.get_ref();
    peer_holds_role(conn.peer_certificates(), role)
}

/// Whether the peer's certificate chain (already verified against the CA by rustls) names
/// `role`; the error says why not, for the log.
pub fn peer_holds_role(
    certs: Option<&[CertificateDer<'static>]>,
    role: Role,
) -> std::result::Result<(), String> {
    let cert = certs
        .and_then(|c| c.first())
        .ok_or("it sent no certificate")?;
    let parsed = rustls::server::ParsedCertificate::try_from(cert)
        .map_err(|e| format!("its certificate does not parse: {e}"))?;
    rustls::client::verify_server_name(&parsed, &role.server_name()).map_err(|_| {
        format!(
            "its certificate is not a {} certificate (no DNS name {:?}); this listener serves only those",
            match role {
                Role::Controller => "controller",
                Role::Node => "node agent",
            },
            role.dns_name()
        )
    })
}

/// A server-only TLS config from a certificate and key file (the HTTP API's `--tls-cert`,
/// `--tls-key`): clients authenticate with the bearer token, not certificates.
pub fn api_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<std::result::Result<_, _>>())
        .map_err(|e| {
            Error::InvalidArgument(format!(
                "--tls-cert {}: {e}; give the PEM certificate (chain) of the HTTP API",
                cert.display()
            ))
        })?;
    if chain.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "--tls-cert {}: no certificate in it",
            cert.display()
        )));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        Error::InvalidArgument(format!(
            "--tls-key {}: {e}; give the PEM private key of --tls-cert",
            key.display()
        ))
    })?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            Error::InvalidArgument(format!(
                "--tls-key {} does not fit --tls-cert {}: {e}",
                key.display(),
                cert.display()
            ))
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
