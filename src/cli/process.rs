//! The serving modes: `bicsi serve`, `controller`, `node` and `engine`, and the hidden processes
//! the node agent starts (`engine-mirror`, `replica-server`): their flags and how each turns them
//! into the server's configuration and runs until SIGTERM or SIGINT.

use std::path::PathBuf;

use clap::Args;

use crate::error::{Error, Result};

const DEFAULT_DATA_DIR: &str = "/var/lib/bicsi";

/// Flags every serving mode takes.
#[derive(Args, Debug, Clone)]
pub struct ProcessArgs {
    /// Where bicsi keeps its state, engines and default disk.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// CSI endpoint; default unix://<data-dir>/csi.sock.
    #[arg(long)]
    pub csi_endpoint: Option<String>,
    /// The CSI driver name (the StorageClass provisioner).
    #[arg(long, default_value = "driver.longhorn.io")]
    pub driver_name: String,
    /// How often (milliseconds) the controller runs backing image expiry, recovery and cleanup,
    /// and a node looks for scrub work.
    #[arg(long, default_value_t = crate::server::LIFECYCLE_TICK.as_millis() as u64)]
    pub lifecycle_tick_ms: u64,
}

/// Flags of a process that holds disks (serve, node).
#[derive(Args, Debug, Clone)]
pub struct DiskArgs {
    /// This node's id; default the host name.
    #[arg(long)]
    pub node_id: Option<String>,
    /// A disk directory for replicas and backing images (repeatable); default <data-dir>/disks/default.
    #[arg(long = "disk")]
    pub disks: Vec<PathBuf>,
    /// The engine host (`bicsi engine`, unix:///PATH) that starts this node's qemu-storage-daemon
    /// processes, so they outlive a restart of this process's container; default: none, this
    /// process starts them.
    #[arg(long)]
    pub engine_endpoint: Option<String>,
    /// How many volumes may be published to this node at once (CSI's max_volumes_per_node,
    /// reported by NodeGetInfo and enforced by ControllerPublishVolume); 0: no limit.
    #[arg(long, default_value_t = 0)]
    pub max_volumes_per_node: u64,
}

#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// The node agent's data directory: the host only starts daemons whose run directories are
    /// under <data-dir>/engines/ or in <data-dir>/replica-server/.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Where to listen; default unix://<data-dir>/engine.sock.
    #[arg(long)]
    pub listen: Option<String>,
    /// Ask the engine host at --listen whether it answers, print its pid, and exit (non-zero when
    /// it does not answer): a readiness check.
    #[arg(long)]
    pub probe: bool,
}

/// Flags of the processes that own the cluster state and its HTTP API (serve, controller).
#[derive(Args, Debug, Clone)]
pub struct StateArgs {
    /// Where the state lives: `embedded` (a redb file in the data directory) or `kubernetes`
    /// (longhorn.io/v1beta2 custom resources in the pod's namespace; apply deploy/crds.yaml).
    #[arg(long, value_enum, default_value = "embedded")]
    pub store: crate::server::StoreBackend,
    /// A file holding the bearer token the HTTP API requires on every route but /healthz.
    #[arg(long)]
    pub api_token_file: Option<PathBuf>,
    /// Serve the HTTP API over HTTPS with this PEM certificate (chain); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// How the split mode's processes authenticate each other (controller, node).
#[derive(Args, Debug, Clone)]
pub struct ClusterTlsArgs {
    /// Mutual TLS for the Cluster and Agent services and file transfers: a directory with
    /// ca.crt, tls.crt, tls.key and optionally ca.crl (a mounted kubernetes.io/tls Secret;
    /// `bicsi certs` makes them).
    #[arg(long, env = "BICSI_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Plain TCP instead: unauthenticated and unencrypted, for a test machine only (logs a
    /// warning).
    #[arg(long)]
    pub insecure: bool,
}

impl ClusterTlsArgs {
    fn transport(&self) -> Result<crate::tls::Transport> {
        crate::tls::Transport::from_flags(self.tls_dir.as_deref(), self.insecure)
    }
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub process: ProcessArgs,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub disk: DiskArgs,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:9500")]
    pub http_listen: String,
}

#[derive(Args, Debug, Clone)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub process: ProcessArgs,
    #[command(flatten)]
    pub state: StateArgs,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:9500")]
    pub http_listen: String,
    /// Where node agents reach the Cluster service.
    #[arg(long, default_value = "127.0.0.1:9501")]
    pub cluster_listen: String,
    /// Seconds without a heartbeat after which a node is down.
    #[arg(long, default_value_t = crate::cluster::DOWN_AFTER.as_secs())]
    pub node_down_after: u64,
    #[command(flatten)]
    pub tls: ClusterTlsArgs,
}

#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    #[command(flatten)]
    pub process: ProcessArgs,
    #[command(flatten)]
    pub disk: DiskArgs,
    /// The controller's Cluster service.
    #[arg(long, default_value = "http://127.0.0.1:9501")]
    pub controller: String,
    /// Where the controller reaches this node's Agent service.
    #[arg(long, default_value = "127.0.0.1:9502")]
    pub agent_listen: String,
    /// Where other nodes fetch this node's backing image files (HTTP).
    #[arg(long, default_value = "127.0.0.1:9503")]
    pub http_listen: String,
    /// Host name or address other processes reach this node at (default: the listen address).
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// The Agent service's URL as the controller reaches it, when that is not
    /// `http://ADVERTISE_HOST:PORT` of --agent-listen (a Service, a NAT, a proxy).
    #[arg(long)]
    pub advertise_agent_url: Option<String>,
    /// The file-transfer URL (this node's HTTP listener) as other nodes reach it, likewise.
    #[arg(long)]
    pub advertise_transfer_url: Option<String>,
    /// Where this node serves its replicas to other nodes' engines (NBD over TCP).
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd_listen: String,
    /// The port bicsi's replica server serves this node's raw replicas on (loop and mirror
    /// volumes), on the same host as --nbd-listen's server, which keeps the qcow2 ones. 0: any
    /// free port (pin one for a firewall).
    #[arg(long, default_value_t = 0)]
    pub raw_nbd_port: u16,
    /// A file holding the bearer token /metrics requires (the controller's API token), on
    /// --http-listen and --metrics-listen; without it /metrics is open.
    #[arg(long)]
    pub api_token_file: Option<PathBuf>,
    /// Also serve /metrics (only it, plain HTTP, behind --api-token-file's token) on this
    /// address (`host:port`): with mutual TLS, --http-listen answers only other nodes'
    /// certificates, which a Prometheus server does not hold.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub tls: ClusterTlsArgs,
}

pub fn serve_config(args: ServeArgs) -> Result<crate::server::Config> {
    let cfg = process_config(args.process, Some(args.disk), args.http_listen)?;
    Ok(with_state(cfg, args.state))
}

/// The configuration of a process that owns the cluster state (serve, controller).
fn with_state(mut cfg: crate::server::Config, state: StateArgs) -> crate::server::Config {
    cfg.store = state.store;
    cfg.api_token_file = state.api_token_file;
    cfg.api_tls = state.tls_cert.zip(state.tls_key);
    cfg
}

/// The server configuration of a mode; a process without disks (the controller) has no node id.
fn process_config(
    process: ProcessArgs,
    disk: Option<DiskArgs>,
    http_listen: String,
) -> Result<crate::server::Config> {
    let max_volumes_per_node = disk.as_ref().map_or(0, |d| d.max_volumes_per_node);
    let (node_id, disks) = match disk {
        Some(d) => {
            let id = match d.node_id {
                Some(id) => id,
                None => nix::unistd::gethostname()
                    .map_err(|e| Error::Internal(format!("host name: {e}; pass --node-id")))?
                    .to_string_lossy()
                    .into_owned(),
            };
            (id, d.disks)
        }
        None => (String::new(), vec![]),
    };
    Ok(crate::server::Config {
        csi_endpoint: process
            .csi_endpoint
            .unwrap_or_else(|| crate::server::default_endpoint(&process.data_dir)),
        data_dir: process.data_dir,
        node_id,
        disks,
        driver_name: process.driver_name,
        http_listen,
        lifecycle_tick: std::time::Duration::from_millis(process.lifecycle_tick_ms.max(1)),
        store: Default::default(),
        api_token_file: None,
        max_volumes_per_node,
        api_tls: None,
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}

pub(super) async fn serve(args: ServeArgs) -> Result<()> {
    // The embedded mode has no other nodes: its replica servers, if any, stay plain.
    let os = real_os(args.disk.engine_endpoint.as_deref(), None)?;
    let cfg = serve_config(args)?;
    crate::server::serve(cfg, os, shutdown_signal()).await
}

/// The machine, with engines started by the engine host at `engine_endpoint` when one is given.
/// `nbd_tls`: the node's `--tls-dir`, for its NBD servers and its engines' NBD clients.
fn real_os(engine_endpoint: Option<&str>, nbd_tls: Option<PathBuf>) -> Result<crate::os::Os> {
    let host = engine_endpoint
        .map(|e| {
            crate::server::socket_path(e).map_err(|_| {
                Error::InvalidArgument(format!(
                    "--engine-endpoint {e:?} is not a unix socket; use unix:///path/to/engine.sock"
                ))
            })
        })
        .transpose()?;
    Ok(match (nbd_tls, host) {
        (Some(dir), host) => crate::os::Os::real_with_nbd_tls(host, dir),
        (None, None) => crate::os::Os::real(),
        (None, Some(socket)) => crate::os::Os::real_with_engine_host(socket),
    })
}

pub(super) async fn engine(args: EngineArgs) -> Result<()> {
    let listen = args.listen.unwrap_or_else(|| {
        format!(
            "unix://{}",
            args.data_dir
                .join(crate::os::engine::host::SOCKET_NAME)
                .display()
        )
    });
    if args.probe {
        let socket = crate::server::socket_path(&listen)?;
        let info = crate::os::engine::host::ping_async(&socket).await?;
        crate::outln!(
            "engine host pid {} (bicsi {}), data dir {}",
            info.pid,
            info.version,
            info.data_dir
        );
        return Ok(());
    }
    crate::server::engine(args.data_dir, &listen, shutdown_signal()).await
}

pub(super) async fn controller(args: ControllerArgs) -> Result<()> {
    let transport = args.tls.transport()?;
    let cfg = process_config(args.process, None, args.http_listen)?;
    let cfg = with_state(cfg, args.state);
    let split = crate::server::SplitConfig {
        cluster_listen: args.cluster_listen,
        node_down_after: Some(std::time::Duration::from_secs(args.node_down_after.max(1))),
        transport: Some(transport),
        ..Default::default()
    };
    crate::server::controller(cfg, split, shutdown_signal()).await
}

pub(super) async fn node(args: NodeArgs) -> Result<()> {
    let transport = args.tls.transport()?;
    // The NBD listeners and the engines' NBD clients use the node's certificate too.
    let os = real_os(
        args.disk.engine_endpoint.as_deref(),
        args.tls.tls_dir.clone(),
    )?;
    let mut cfg = process_config(args.process, Some(args.disk), args.http_listen)?;
    cfg.api_token_file = args.api_token_file;
    let split = crate::server::SplitConfig {
        metrics_listen: args.metrics_listen,
        transport: Some(transport),
        controller: args.controller,
        agent_listen: args.agent_listen,
        advertise_host: args.advertise_host,
        advertise_agent_url: args.advertise_agent_url,
        advertise_transfer_url: args.advertise_transfer_url,
        nbd_listen: args.nbd_listen,
        raw_nbd_port: args.raw_nbd_port,
        ..Default::default()
    };
    crate::server::node(cfg, split, os, shutdown_signal()).await
}

/// A blocking process of its own (`engine-mirror`, `replica-server`), its error named `what`.
async fn blocking(
    what: &'static str,
    main: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> Result<()> {
    tokio::task::spawn_blocking(move || main().map_err(|e| Error::Internal(format!("{what}: {e}"))))
        .await
        .map_err(|e| Error::Internal(format!("{what}: {e}")))?
}

pub(super) async fn engine_mirror(args: crate::mirror::MirrorArgs) -> Result<()> {
    blocking("mirror engine", move || crate::mirror::main(args)).await
}

pub(super) async fn replica_server(args: crate::replica_server::ReplicaServerArgs) -> Result<()> {
    blocking("replica server", move || crate::replica_server::main(args)).await
}
