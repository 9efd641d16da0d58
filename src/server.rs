//! `bicsi serve`: the all-in-one mode. Opens the embedded store and the disks, builds the
//! controller and the node agent, and serves CSI on a unix socket and the HTTP API on loopback
//! until `shutdown` resolves. Takes everything as arguments (no globals), so tests can run several.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;

use crate::agent::LocalAgent;
use crate::authority::any_authority;
use crate::backing::BackingImages;
use crate::cluster::Cluster;
use crate::controller::Controller;
use crate::csi::controller::ControllerService;
use crate::csi::group_controller::GroupControllerService;
use crate::csi::identity::IdentityService;
use crate::csi::node::NodeService;
use crate::csi::pb::controller_server::ControllerServer;
use crate::csi::pb::group_controller_server::GroupControllerServer;
use crate::csi::pb::identity_server::IdentityServer;
use crate::csi::pb::node_server::NodeServer;
use crate::error::{Error, Result};
use crate::files::FileManagers;
use crate::model::NodeRecord;
use crate::node::NodeAgent;
use crate::os::Os;
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;

/// How long in-flight calls may run after a shutdown signal.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub csi_endpoint: String,
    pub node_id: String,
    pub disks: Vec<PathBuf>,
    pub driver_name: String,
    pub http_listen: String,
    /// How often the controller runs expiry, recovery and cleanup, and the node looks for
    /// scrub work (`--lifecycle-tick-ms`).
    pub lifecycle_tick: std::time::Duration,
    /// Where the cluster state lives (serve and controller; a node's own records stay local).
    pub store: StoreBackend,
    /// Bearer token the HTTP API requires (except /healthz); None: no token.
    pub api_token_file: Option<PathBuf>,
    /// How many volumes may be published to this node at once (`--max-volumes-per-node`):
    /// NodeGetInfo reports it and ControllerPublishVolume enforces it; 0: no limit.
    pub max_volumes_per_node: u64,
    /// The HTTP API's certificate and key (`--tls-cert`, `--tls-key`; serve and controller):
    /// it then serves HTTPS. None: plain HTTP.
    pub api_tls: Option<(PathBuf, PathBuf)>,
}

/// `--store`: the embedded redb file (default) or Kubernetes custom resources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreBackend {
    #[default]
    Embedded,
    Kubernetes,
}

/// Opens the store `cfg` asks for; the Kubernetes one also comes back typed, for its watches.
async fn open_store(
    cfg: &Config,
) -> Result<(
    Arc<dyn Store>,
    Option<Arc<crate::store::kubernetes::KubeStore>>,
)> {
    match cfg.store {
        StoreBackend::Embedded => Ok((
            Arc::new(EmbeddedStore::open(&cfg.data_dir.join("state.redb"))?),
            None,
        )),
        StoreBackend::Kubernetes => {
            let kube = Arc::new(crate::store::kubernetes::KubeStore::connect().await?);
            tracing::info!(
                namespace = kube.namespace(),
                "state in Kubernetes custom resources"
            );
            Ok((kube.clone(), Some(kube)))
        }
    }
}

/// The default `--lifecycle-tick-ms`.
pub const LIFECYCLE_TICK: std::time::Duration = std::time::Duration::from_secs(30);

pub use crate::csi::socket_path;

/// The default endpoint for a data directory.
pub fn default_endpoint(data_dir: &Path) -> String {
    format!("unix://{}", data_dir.join("csi.sock").display())
}

/// Binds the unix socket, replacing a stale socket file but never a live server's (`flag` is the
/// option that chose the path, for the message).
async fn bind_unix(path: &Path, flag: &str) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(Error::FailedPrecondition(format!(
                "another process is serving on {}; stop it or choose another {flag}",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path)
        .map_err(|e| Error::Internal(format!("cannot listen on {}: {e}", path.display())))
}

/// Where the split mode's processes listen and find each other.
#[derive(Clone, Debug, Default)]
pub struct SplitConfig {
    /// Controller: the Cluster service for node agents (`host:port`).
    pub cluster_listen: String,
    /// Node: the controller's Cluster service (`http://host:port`).
    pub controller: String,
    /// Node: the Agent service for the controller (`host:port`).
    pub agent_listen: String,
    /// Node: the host name or address other processes reach this node at; default: the
    /// address it listens on.
    pub advertise_host: Option<String>,
    /// Node: the Agent service's URL as others reach it, when it is not `http://HOST:PORT` of
    /// the listen address (a Service, a NAT, a proxy in front of the agent).
    pub advertise_agent_url: Option<String>,
    /// Node: the HTTP file-transfer URL as others reach it, likewise.
    pub advertise_transfer_url: Option<String>,
    /// Node: where this node's replica server listens for NBD clients (`host:port`).
    pub nbd_listen: String,
    /// Node: the port bicsi's replica server of the raw replicas listens on, on the replica
    /// server's host (0: any free port).
    pub raw_nbd_port: u16,
    /// Controller: a node silent for this long is down.
    pub node_down_after: Option<std::time::Duration>,
    /// How the controller and the node agents talk: mutual TLS or (`--insecure`) plain TCP.
    /// None is refused: the choice is the operator's, never a default.
    pub transport: Option<crate::tls::Transport>,
    /// Node: a plain-HTTP listener (`host:port`) serving only /metrics, for Prometheus.
    pub metrics_listen: Option<String>,
}

impl SplitConfig {
    fn transport(&self) -> Result<crate::tls::Transport> {
        self.transport.clone().ok_or_else(|| {
            Error::InvalidArgument(
                "no transport chosen for the split mode: give --tls-dir or --insecure".into(),
            )
        })
    }
}

/// A TCP listener, served as it is or behind TLS.
enum Listen {
    Plain(TcpListener),
    Tls(crate::tls::TlsListener),
}

impl Listen {
    /// `listener` behind `transport`: with mTLS, clients must hold a certificate of `role`.
    fn cluster(
        listener: TcpListener,
        transport: &crate::tls::Transport,
        role: crate::tls::Role,
        what: &'static str,
    ) -> Result<Listen> {
        match transport {
            crate::tls::Transport::Insecure => Ok(Listen::Plain(listener)),
            crate::tls::Transport::Mtls(tls) => Ok(Listen::Tls(
                crate::tls::TlsListener::new(listener, tls.server_config(None)?, Some(role), what)
                    .map_err(|e| Error::Internal(format!("{what}: {e}")))?,
            )),
        }
    }

    /// The HTTP API's listener: HTTPS with `--tls-cert`/`--tls-key`, else plain. Beyond
    /// loopback without a token, anyone who reaches it may do anything: said in the log.
    fn api(listener: TcpListener, cfg: &Config) -> Result<Listen> {
        if let Ok(addr) = listener.local_addr()
            && !addr.ip().is_loopback()
        {
            if cfg.api_token_file.is_none() {
                tracing::warn!(%addr, "the HTTP API listens beyond loopback without --api-token-file: anyone who reaches it can create and delete images and volumes");
            }
            if cfg.api_tls.is_none() {
                tracing::warn!(%addr, "the HTTP API listens beyond loopback over plain HTTP: its bearer token crosses the network readable; give --tls-cert and --tls-key");
            }
        }
        match &cfg.api_tls {
            None => Ok(Listen::Plain(listener)),
            Some((cert, key)) => Ok(Listen::Tls(
                crate::tls::TlsListener::new(
                    listener,
                    crate::tls::api_server_config(cert, key)?,
                    None,
                    "HTTP API",
                )
                .map_err(|e| Error::Internal(format!("HTTP API: {e}")))?,
            )),
        }
    }
}

/// What one process runs: the CSI services it offers and the extra gRPC services.
struct Services {
    controller: Option<Arc<Controller>>,
    node: Option<Arc<NodeAgent>>,
    extra: Option<(Listen, tonic::service::Routes)>,
}

/// Opens the data directory, the store and the disks.
async fn open_local(
    cfg: &Config,
) -> Result<(
    Arc<dyn Store>,
    Option<Arc<crate::store::kubernetes::KubeStore>>,
    Vec<crate::model::Disk>,
)> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        Error::Internal(format!(
            "cannot create data directory {}: {e}",
            cfg.data_dir.display()
        ))
    })?;
    let (store, kube) = open_store(cfg).await?;
    let disk_paths = if cfg.disks.is_empty() {
        vec![cfg.data_dir.join("disks").join("default")]
    } else {
        cfg.disks.clone()
    };
    let mut disks = Vec::new();
    for path in &disk_paths {
        let disk = crate::disks::open_disk(&cfg.node_id, path)?;
        tracing::info!(disk = %disk.id, path = %disk.path.display(), "disk ready");
        disks.push(disk);
    }
    Ok((store, kube, disks))
}

async fn bind_tcp(addr: &str, flag: &str) -> Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await.map_err(|e| {
        Error::FailedPrecondition(format!(
            "cannot listen on {addr}: {e}; choose another {flag}"
        ))
    })?;
    let a = l.local_addr().map_err(|e| Error::Internal(e.to_string()))?;
    Ok((l, a))
}

/// `bicsi serve`: controller and node agent in one process, calling each other directly.
pub async fn serve(
    cfg: Config,
    os: Os,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let token = crate::auth::load(cfg.api_token_file.as_deref())?;
    // In a cluster (--store kubernetes), a download may not reach the node itself by default.
    crate::download::guard::set_in_cluster(cfg.store == StoreBackend::Kubernetes);
    let (store, kube, disks) = open_local(&cfg).await?;
    let cluster = Cluster::new(store.clone());
    let metrics = crate::metrics::controller_sources(store.clone(), cluster.clone());
    let metrics = crate::metrics::with_node(metrics, &cfg.node_id, disks.clone(), store.clone());
    let backing = BackingImages::new(store.clone(), cluster.clone());
    let files = FileManagers::new(
        cfg.node_id.clone(),
        disks.clone(),
        os.clone(),
        Arc::new(crate::backing::StoreRecords(store.clone())),
        Arc::new(crate::settings::Settings::new(store.clone())),
        backing.clone(),
        crate::clock::system(),
    );
    let local_agent = Arc::new(LocalAgent {
        node_id: cfg.node_id.clone(),
        disks: disks.clone(),
        os: os.clone(),
        files: files.clone(),
        store: store.clone(),
        nbd: None,
        raw_nbd: None,
        data_dir: cfg.data_dir.clone(),
        node_records: store.clone(),
        volume_guards: Default::default(),
        shares_blocks: Default::default(),
    });
    cluster.register(
        NodeRecord {
            node_id: cfg.node_id.clone(),
            agent_url: String::new(),
            transfer_url: String::new(),
            disks: disks.clone(),
            up: true,
            last_heartbeat: String::new(),
            max_volumes_per_node: cfg.max_volumes_per_node,
        },
        local_agent.clone(),
        true,
    )?;
    files.resume().await?;
    let controller = Arc::new(Controller::new(store.clone(), cluster, backing.clone()));
    controller.resume_backups()?;
    let lifecycle = spawn_lifecycle(backing.clone(), cfg.lifecycle_tick);
    let poll = spawn_poll(backing.clone());
    let scrub = spawn_scrub(files.clone(), cfg.lifecycle_tick);
    let reconciler = kube.map(|k| crate::reconcile::spawn(k, backing.clone()));
    let agent = Arc::new(
        NodeAgent::new(
            cfg.node_id.clone(),
            cfg.data_dir.clone(),
            os,
            store.clone(),
            store.clone(),
            local_agent.clone(),
        )
        .with_max_volumes(cfg.max_volumes_per_node),
    );
    agent.readopt().await?;
    let health_watch = agent.spawn_health_watch(crate::node::watch::WATCH_INTERVAL);
    let rebuilds = crate::controller::rebuild::spawn(controller.clone(), cfg.lifecycle_tick);
    let (http, http_addr) = bind_tcp(&cfg.http_listen, "--http-listen").await?;
    let http = Listen::api(http, &cfg)?;
    let api = crate::auth::protect(
        crate::http::router(crate::http::ApiState {
            controller: Some(controller.clone()),
            backing: Some(backing),
            files: Some(files),
            store,
            driver_name: cfg.driver_name.clone(),
            attach: Some(crate::http::LocalAttach {
                csi_endpoint: cfg.csi_endpoint.clone(),
                data_dir: std::path::absolute(&cfg.data_dir).unwrap_or(cfg.data_dir.clone()),
            }),
        })
        .merge(crate::metrics::routes(metrics)),
        token,
    );
    let r = run(
        &cfg,
        Services {
            controller: Some(controller),
            node: Some(agent),
            extra: None,
        },
        (http, http_addr, api),
        shutdown,
    )
    .await;
    lifecycle.abort();
    poll.abort();
    scrub.abort();
    health_watch.abort();
    rebuilds.abort();
    if let Some(task) = reconciler {
        task.abort();
    }
    r
}

/// The controller's lifecycle round every `every`: deadlines, recovery, cleanup.
fn spawn_lifecycle(
    backing: Arc<BackingImages>,
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(std::time::Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = backing.tick().await {
                tracing::warn!(error = %e, "backing image lifecycle round failed; retrying at the next tick");
            }
        }
    })
}

/// The controller's poll of images that update (`pollInterval`): every second it sees which
/// images are due; the intervals themselves are the images' own.
fn spawn_poll(backing: Arc<BackingImages>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = backing.poll(backing.now()).await {
                tracing::warn!(error = %e, "poll of the images that update failed; retrying at the next round");
            }
        }
    })
}

/// The node's look for scrub work every `every` (the scrub interval is a setting).
fn spawn_scrub(
    files: Arc<FileManagers>,
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(std::time::Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = files.scrub().await {
                tracing::debug!(error = %e, "cannot scrub backing image files now");
            }
        }
    })
}

/// `bicsi controller`: state, the CSI Controller service, the HTTP API, and the Cluster service
/// the node agents register with.
pub async fn controller(
    cfg: Config,
    split: SplitConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| Error::Internal(format!("cannot create {}: {e}", cfg.data_dir.display())))?;
    let token = crate::auth::load(cfg.api_token_file.as_deref())?;
    let transport = split.transport()?;
    crate::download::guard::set_in_cluster(true);
    let (store, kube) = open_store(&cfg).await?;
    let cluster = Cluster::with_down_after(
        store.clone(),
        split.node_down_after.unwrap_or(crate::cluster::DOWN_AFTER),
    );
    let backing = BackingImages::new(store.clone(), cluster.clone());
    let controller = Arc::new(Controller::new(
        store.clone(),
        cluster.clone(),
        backing.clone(),
    ));
    let (cluster_l, cluster_addr) = bind_tcp(&split.cluster_listen, "--cluster-listen").await?;
    tracing::info!(cluster = %cluster_addr, tls = transport.scheme() == "https", "serving node agents");
    let cluster_l = Listen::cluster(
        cluster_l,
        &transport,
        crate::tls::Role::Node,
        "Cluster service",
    )?;
    let routes = tonic::service::Routes::new(
        crate::remote::pb::cluster_server::ClusterServer::new(crate::remote::ClusterService {
            cluster: cluster.clone(),
            store: store.clone(),
            backing: backing.clone(),
            transport,
        }),
    );
    // Nodes that stop sending heartbeats are marked down, and their files unknown.
    let sweeper = {
        let (cluster, backing) = (cluster.clone(), backing.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::cluster::HEARTBEAT_INTERVAL);
            loop {
                tick.tick().await;
                if let Ok(down) = cluster.sweep() {
                    for node in down {
                        let _ = backing.node_down(&node).await;
                    }
                }
            }
        })
    };
    let (http, http_addr) = bind_tcp(&cfg.http_listen, "--http-listen").await?;
    let http = Listen::api(http, &cfg)?;
    let backing_for_expiry = backing.clone();
    let metrics = crate::metrics::controller_sources(store.clone(), cluster.clone());
    let api = crate::auth::protect(
        crate::http::router(crate::http::ApiState {
            controller: Some(controller.clone()),
            backing: Some(backing),
            files: None,
            store,
            driver_name: cfg.driver_name.clone(),
            attach: None,
        })
        .merge(crate::metrics::routes(metrics)),
        token,
    );
    let reconciler = kube.map(|k| crate::reconcile::spawn(k, backing_for_expiry.clone()));
    let poll = spawn_poll(backing_for_expiry.clone());
    let lifecycle = spawn_lifecycle(backing_for_expiry, cfg.lifecycle_tick);
    let rebuilds = crate::controller::rebuild::spawn(controller.clone(), cfg.lifecycle_tick);
    let r = run(
        &cfg,
        Services {
            controller: Some(controller),
            node: None,
            extra: Some((cluster_l, routes)),
        },
        (http, http_addr, api),
        shutdown,
    )
    .await;
    sweeper.abort();
    lifecycle.abort();
    poll.abort();
    rebuilds.abort();
    if let Some(task) = reconciler {
        task.abort();
    }
    r
}

/// `bicsi node`: the CSI Node service, this node's disks and their backing image files, the
/// Agent service for the controller, and the file transfer endpoint for other nodes.
pub async fn node(
    cfg: Config,
    split: SplitConfig,
    os: Os,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let transport = split.transport()?;
    if let (crate::tls::Transport::Mtls(_), Some(url)) = (&transport, &split.advertise_transfer_url)
        && !url.starts_with("https://")
    {
        return Err(Error::InvalidArgument(format!(
            "--advertise-transfer-url {url:?}: with --tls-dir the transfer listener serves HTTPS; \
             give an https:// URL"
        )));
    }
    crate::download::guard::set_in_cluster(true);
    let (local_store, _, disks) = open_local(&cfg).await?;
    let channel = transport.channel(&split.controller, crate::tls::Role::Controller)?;
    let cluster_store: Arc<dyn Store> = Arc::new(crate::remote::RemoteStore::new(channel.clone()));
    let reports = Arc::new(crate::remote::RemoteReports {
        client: crate::remote::pb::cluster_client::ClusterClient::new(channel.clone()),
    });
    let files = FileManagers::new(
        cfg.node_id.clone(),
        disks.clone(),
        os.clone(),
        Arc::new(crate::backing::StoreRecords(cluster_store.clone())),
        Arc::new(crate::settings::Settings::new(cluster_store.clone())),
        reports,
        crate::clock::system(),
    );
    if let crate::tls::Transport::Mtls(tls) = &transport {
        files.use_peer_tls(tls.client_config(crate::tls::Role::Node)?);
    }
    let (nbd_host, nbd_port) = split.nbd_listen.rsplit_once(':').ok_or_else(|| {
        Error::InvalidArgument(format!(
            "--nbd-listen {:?} is not host:port",
            split.nbd_listen
        ))
    })?;
    let nbd_port: u16 = nbd_port.parse().map_err(|_| {
        Error::InvalidArgument(format!("--nbd-listen {:?}: bad port", split.nbd_listen))
    })?;
    let nbd_advertised = split
        .advertise_host
        .clone()
        .unwrap_or_else(|| nbd_host.to_string());
    let local_agent = Arc::new(LocalAgent {
        node_id: cfg.node_id.clone(),
        disks: disks.clone(),
        os: os.clone(),
        files: files.clone(),
        store: cluster_store.clone(),
        nbd: Some((
            cfg.data_dir.join("replica-server"),
            nbd_advertised.clone(),
            nbd_port,
        )),
        raw_nbd: Some((
            cfg.data_dir.join(crate::os::replica_server::RUN_DIR),
            nbd_advertised,
            split.raw_nbd_port,
        )),
        data_dir: cfg.data_dir.clone(),
        node_records: local_store.clone(),
        volume_guards: Default::default(),
        shares_blocks: Default::default(),
    });
    let agent = Arc::new(
        NodeAgent::new(
            cfg.node_id.clone(),
            cfg.data_dir.clone(),
            os,
            cluster_store.clone(),
            local_store.clone(),
            local_agent.clone(),
        )
        .with_max_volumes(cfg.max_volumes_per_node),
    );
    agent.readopt().await?;
    let health_watch = agent.spawn_health_watch(crate::node::watch::WATCH_INTERVAL);
    let (agent_l, agent_addr) = bind_tcp(&split.agent_listen, "--agent-listen").await?;
    let (http, http_addr) = bind_tcp(&cfg.http_listen, "--http-listen").await?;
    // Only the controller calls the Agent service; only other nodes fetch files.
    let agent_l = Listen::cluster(
        agent_l,
        &transport,
        crate::tls::Role::Controller,
        "Agent service",
    )?;
    let http = Listen::cluster(http, &transport, crate::tls::Role::Node, "file transfers")?;
    let scheme = transport.scheme();
    let host = split
        .advertise_host
        .clone()
        .unwrap_or_else(|| agent_addr.ip().to_string());
    let register = crate::remote::pb::RegisterNodeRequest {
        node_id: cfg.node_id.clone(),
        agent_url: split
            .advertise_agent_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{host}:{}", agent_addr.port())),
        transfer_url: split
            .advertise_transfer_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{host}:{}", http_addr.port())),
        disks: vec![],
        max_volumes_per_node: cfg.max_volumes_per_node,
    };
    let routes = tonic::service::Routes::new(crate::remote::pb::agent_server::AgentServer::new(
        crate::remote::AgentService {
            local: local_agent.clone(),
        },
    ));
    let keeper = tokio::spawn(crate::remote::keep_registered(
        crate::remote::pb::cluster_client::ClusterClient::new(channel),
        register,
        local_agent,
    ));
    let scrub = spawn_scrub(files.clone(), cfg.lifecycle_tick);
    let metrics = crate::metrics::with_node(
        Default::default(),
        &cfg.node_id,
        disks.clone(),
        local_store.clone(),
    );
    let api = crate::http::router(crate::http::ApiState {
        controller: None,
        backing: None,
        files: Some(files),
        store: local_store,
        driver_name: cfg.driver_name.clone(),
        attach: None,
    })
    // The file transfers stay as they are; /metrics takes the token the node is given.
    .merge(crate::auth::protect(
        crate::metrics::routes(metrics.clone()),
        crate::auth::load(cfg.api_token_file.as_deref())?,
    ));
    // /metrics alone, plain HTTP, for a scraper without a cluster certificate.
    let metrics_server = match &split.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                Error::InvalidArgument(format!(
                    "--metrics-listen {addr:?}: cannot listen there: {e}; choose a free \
                     host:port"
                ))
            })?;
            let router = crate::auth::protect(
                crate::metrics::routes(metrics),
                crate::auth::load(cfg.api_token_file.as_deref())?,
            );
            tracing::info!(listen = %addr, "serving /metrics");
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::warn!(error = %e, "the /metrics listener stopped");
                }
            }))
        }
        None => None,
    };
    let r = run(
        &cfg,
        Services {
            controller: None,
            node: Some(agent),
            extra: Some((agent_l, routes)),
        },
        (http, http_addr, api),
        shutdown,
    )
    .await;
    keeper.abort();
    scrub.abort();
    health_watch.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    r
}

/// `bicsi engine`: the engine host (`os::engine::host`) on the unix socket `listen` until
/// `shutdown`. The qemu-storage-daemon processes it started keep running when it stops: they
/// serve attached volumes and end only with the engine's container (or when the node agent
/// stops them).
pub async fn engine(
    data_dir: PathBuf,
    listen: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use crate::os::engine::host;
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| Error::Internal(format!("cannot create {}: {e}", data_dir.display())))?;
    let data_dir = std::fs::canonicalize(&data_dir)
        .map_err(|e| Error::Internal(format!("cannot resolve {}: {e}", data_dir.display())))?;
    // Daemonized engines re-parent to us instead of to init, so we reap them and they are ours
    // (our container's) for their whole life.
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| Error::Internal(format!("PR_SET_CHILD_SUBREAPER: {e}")))?;
    let sock = socket_path(listen).map_err(|_| {
        Error::InvalidArgument(format!(
            "--listen {listen:?} is not a unix socket; use unix:///path/to/engine.sock"
        ))
    })?;
    let unix = bind_unix(&sock, "--listen").await?;
    {
        use std::os::unix::fs::PermissionsExt;
        // Whoever can connect can start processes as us: root only.
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::Internal(format!("chmod 0600 {}: {e}", sock.display())))?;
    }
    let children = Arc::new(host::Children::default());
    let reaper = tokio::spawn(children.clone().reaper()?);
    let service = host::EngineHostService::new(
        data_dir.clone(),
        crate::os::engine::QemuStorageDaemon::new().program,
        crate::os::engine::mirror::program().map_err(Error::Os)?,
        children.clone(),
    );
    tracing::info!(socket = %sock.display(), data_dir = %data_dir.display(), "engine host serving");
    let r = tonic::transport::Server::builder()
        .add_service(crate::remote::pb::engine_host_server::EngineHostServer::new(service))
        .serve_with_incoming_shutdown(any_authority(UnixListenerStream::new(unix)), shutdown)
        .await;
    let _ = std::fs::remove_file(&sock);
    children.reap();
    reaper.abort();
    r.map_err(|e| Error::Internal(format!("engine host: {e}")))?;
    tracing::info!("engine host stopped; the engines it started keep running");
    Ok(())
}

/// Serves CSI on the unix socket, the HTTP API, and any extra gRPC services until `shutdown`.
async fn run(
    cfg: &Config,
    services: Services,
    (http, http_addr, api): (Listen, SocketAddr, axum::Router),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let sock = socket_path(&cfg.csi_endpoint)?;
    let unix = bind_unix(&sock, "--csi-endpoint").await?;
    tracing::info!(
        csi = %sock.display(),
        http = %http_addr,
        node = %cfg.node_id,
        driver = %cfg.driver_name,
        "bicsi serving"
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let mut builder =
        tonic::transport::Server::builder().layer(crate::metrics::csi::CsiMetricsLayer);
    let mut router = builder.add_service(IdentityServer::new(IdentityService {
        driver_name: cfg.driver_name.clone(),
        controller: services.controller.is_some(),
    }));
    if let Some(controller) = services.controller {
        router = router.add_service(GroupControllerServer::new(GroupControllerService {
            controller: controller.clone(),
        }));
        router = router.add_service(ControllerServer::new(ControllerService { controller }));
    }
    if let Some(agent) = services.node {
        router = router.add_service(NodeServer::new(NodeService { agent }));
    }
    let grpc = tokio::spawn(router.serve_with_incoming_shutdown(
        any_authority(UnixListenerStream::new(unix)),
        wait(stop_rx.clone()),
    ));
    let extra = services.extra.map(|(listener, routes)| {
        let server = tonic::transport::Server::builder().add_routes(routes);
        match listener {
            Listen::Plain(l) => tokio::spawn(server.serve_with_incoming_shutdown(
                any_authority(tokio_stream::wrappers::TcpListenerStream::new(l)),
                wait(stop_rx.clone()),
            )),
            Listen::Tls(l) => tokio::spawn(server.serve_with_incoming_shutdown(
                any_authority(l.into_stream()),
                wait(stop_rx.clone()),
            )),
        }
    });
    let http_server = match http {
        Listen::Plain(l) => {
            let s = axum::serve(l, api).with_graceful_shutdown(wait(stop_rx.clone()));
            tokio::spawn(async move { s.await })
        }
        Listen::Tls(l) => {
            let s = axum::serve(l, api).with_graceful_shutdown(wait(stop_rx.clone()));
            tokio::spawn(async move { s.await })
        }
    };
    wait(stop_rx.clone()).await;
    // Sidecars and the kubelet keep their connections open; give in-flight calls a grace period,
    // then stop regardless, so SIGTERM always ends the process.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let g = grpc.await;
        let h = http_server.await;
        if let Some(e) = extra {
            let _ = e.await;
        }
        (g, h)
    })
    .await;
    let _ = std::fs::remove_file(&sock);
    match drained {
        Ok((g, h)) => {
            g.map_err(|e| Error::Internal(format!("gRPC server task: {e}")))?
                .map_err(|e| Error::Internal(format!("gRPC server: {e}")))?;
            h.map_err(|e| Error::Internal(format!("HTTP server task: {e}")))?
                .map_err(|e| Error::Internal(format!("HTTP server: {e}")))?;
        }
        Err(_) => tracing::warn!(
            grace = ?SHUTDOWN_GRACE,
            "clients kept connections open past the grace period; stopping anyway"
        ),
    }
    tracing::info!("bicsi stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            socket_path("unix:///run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert_eq!(
            socket_path("/run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://").is_err());
    }
}
