//! The command line: `bicsi serve` and the client commands that drive a running bicsi. Parsing
//! lives here; every command calls the library and prints. Flags named in the issues are
//! contracts other tools script against: add flags, never rename them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::model::{AccessMode, AccessType, Capability};

mod backup;
mod replica;
mod snapshot;
mod volume;
pub mod wait;

pub use backup::BackupCommand;
pub use snapshot::SnapshotCommand;
pub use volume::VolumeCommand;

const DEFAULT_DATA_DIR: &str = "/var/lib/bicsi";
const DEFAULT_ENDPOINT: &str = "unix:///var/lib/bicsi/csi.sock";

#[derive(Parser, Debug)]
#[command(
    name = "bicsi",
    version,
    about = "A CSI driver whose volumes start from verified backing images"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Kept for scripts that write `bicsi --token T COMMAND`; the commands that talk to the HTTP
    /// API take `--token` themselves (and show it in their help).
    #[arg(long, hide = true)]
    pub token: Option<String>,
    /// How the log lines on stderr are written: `text` (for people) or `json` (one object a
    /// line, with the fields of the spans it is in, for log collectors).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "BICSI_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: crate::logs::LogFormat,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run controller and node agent in one process (the embedded default).
    Serve(ServeArgs),
    /// The controller of the split mode: state, CSI Controller, HTTP API, and the Cluster
    /// service node agents register with.
    Controller(ControllerArgs),
    /// A node agent of the split mode: CSI Node, this node's disks, file transfers.
    Node(NodeArgs),
    /// The engine host of a node: starts the node agent's qemu-storage-daemon processes so they
    /// live in this process's container and survive restarts of the agent's (--engine-endpoint).
    Engine(EngineArgs),
    /// The mirror engine of one volume: started by the node agent, not by people.
    #[command(name = "engine-mirror", hide = true)]
    EngineMirror(crate::mirror::MirrorArgs),
    /// The NBD server of a node's raw replicas: started by the node agent, not by people.
    #[command(name = "replica-server", hide = true)]
    ReplicaServer(crate::replica_server::ReplicaServerArgs),
    /// Print the CustomResourceDefinitions of the Kubernetes store (deploy/crds.yaml).
    Crd,
    /// Make the cluster CA and the controller's and node agents' certificates for the split
    /// mode's mutual TLS (OUT/controller and OUT/node are --tls-dir directories), or, with
    /// --revoke, put certificates on the CA's revocation list.
    Certs(CertsArgs),
    /// Create, attach, detach and delete volumes on a running `bicsi serve`.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// List objects, or show one.
    #[command(subcommand)]
    Get(GetCommand),
    /// Create or check the BackingImages and StorageClasses in a YAML file (`-f -`: stdin).
    Apply {
        /// The YAML file of one or more documents; `-` reads stdin.
        #[arg(short = 'f', long = "filename")]
        file: String,
        /// Then wait until every BackingImage in the file is ready to use.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after this long (90s, 5m, 1h; 0: no limit).
        #[arg(long, default_value = "0", value_parser = wait::parse_timeout)]
        timeout: std::time::Duration,
        #[command(flatten)]
        server: Server,
    },
    /// Delete an object.
    #[command(subcommand)]
    Delete(DeleteCommand),
    /// Move backing image files between this machine and bicsi, or clean them up.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Take, list, delete and restore CSI snapshots on a running bicsi.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Change a setting.
    #[command(subcommand)]
    Set(SetCommand),
    /// Back up volumes to the backup target, list, delete and restore backups.
    #[command(subcommand)]
    Backup(BackupCommand),
}

#[derive(Subcommand, Debug)]
pub enum SetCommand {
    /// Set a setting (`bicsi get settings` lists them); it applies without a restart.
    Setting {
        /// The setting's name, as `bicsi get settings` lists it.
        name: String,
        /// The new value, in the unit `bicsi get settings` shows.
        value: String,
        #[command(flatten)]
        server: Server,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Upload a local file as the file of a backing image (created with sourceType upload when
    /// it does not exist).
    Upload {
        /// The backing image (created with sourceType upload when missing).
        name: String,
        /// The local file to upload (raw or qcow2).
        file: PathBuf,
        /// The file's SHA-512 (`shasum -a 512 FILE`); the upload fails if what arrives differs.
        #[arg(long)]
        checksum: Option<String>,
        #[command(flatten)]
        server: Server,
    },
    /// Download a backing image's ready file, verified by its SHA-512.
    Download {
        /// The backing image to download.
        name: String,
        /// Where to write the file (default: NAME in the current directory).
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        #[command(flatten)]
        server: Server,
    },
    /// Remove a backing image's files from chosen disks now (never a file replicas use, and
    /// never below minNumberOfCopies files); says which disks were refused and why.
    Cleanup {
        /// The backing image whose files to remove.
        name: String,
        /// A disk id or path (repeatable), as `bicsi get disks` shows.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        #[command(flatten)]
        server: Server,
    },
}

/// The flags of a command that talks to the HTTP API.
#[derive(Args, Debug, Clone)]
pub struct Server {
    /// The HTTP API of the running bicsi.
    #[arg(long, env = "BICSI_SERVER", default_value = "http://127.0.0.1:9500")]
    pub server: String,
    /// The HTTP API's bearer token (Secret bicsi-api-token).
    #[arg(long, env = "BICSI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A PEM CA certificate to trust, besides the system's, for an https:// --server (an API
    /// served with --tls-cert by a private CA).
    #[arg(long, env = "BICSI_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum DeleteCommand {
    /// Delete a backing image and its files (refused while volumes use it).
    #[command(alias = "backingimages", alias = "bi")]
    Backingimage {
        /// The backing image to delete.
        name: String,
        /// Exit 0, quietly, when it does not exist (else: NotFound, exit 1).
        #[arg(long)]
        ignore_not_found: bool,
        #[command(flatten)]
        server: Server,
    },
    /// Delete a StorageClass kept by bicsi.
    #[command(alias = "storageclasses", alias = "sc")]
    Storageclass {
        /// The StorageClass to delete.
        name: String,
        /// Exit 0, quietly, when it does not exist (else: NotFound, exit 1).
        #[arg(long)]
        ignore_not_found: bool,
        #[command(flatten)]
        server: Server,
    },
}

/// The output of a `get` of one object.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Output {
    Json,
    Yaml,
}

/// The output of a `get` that prints a table: JSON or YAML records, or a wider table.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListOutput {
    Json,
    Yaml,
    Wide,
}

/// Prints a value as pretty JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<()> {
    crate::outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints a value as YAML on stdout.
pub(crate) fn print_yaml<T: serde::Serialize + ?Sized>(value: &T) -> Result<()> {
    crate::out!("{}", to_yaml(value)?);
    Ok(())
}

/// YAML of a value as its JSON reads (an enum variant is a key, `mount: {fs_type: ext4}`), not
/// with serde_yaml's `!mount` tags, which kubectl-minded readers and YAML tools without tag
/// support trip on.
pub(crate) fn to_yaml<T: serde::Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_yaml::to_string(&serde_json::to_value(value)?).map_err(|e| Error::Internal(e.to_string()))
}

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

#[derive(Args, Debug, Clone)]
pub struct CertsArgs {
    /// Where to write: OUT/ca (the CA: made once, reused after), OUT/controller, OUT/node.
    #[arg(long)]
    pub out: PathBuf,
    /// How many days the controller's and nodes' certificates are valid.
    #[arg(long, default_value_t = 365)]
    pub days: u64,
    /// More DNS names for the controller's certificate (repeatable); it always has
    /// bicsi-controller, the name node agents check.
    #[arg(long)]
    pub controller_name: Vec<String>,
    /// Revoke this certificate (a PEM file; repeatable) instead of making certificates: writes
    /// ca.crl into OUT/ca, OUT/controller and OUT/node.
    #[arg(long)]
    pub revoke: Vec<PathBuf>,
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

#[derive(Args, Debug, Clone)]
pub struct Endpoint {
    /// The CSI endpoint of the running bicsi.
    #[arg(long, env = "BICSI_CSI_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub csi_endpoint: String,
}

#[derive(Subcommand, Debug)]
pub enum GetCommand {
    /// List volumes with size, backing image, replicas (healthy/wanted), attachment and
    /// condition.
    Volumes {
        /// json|yaml: the records; wide: also the replicas' nodes.
        #[arg(short = 'o', long, value_enum)]
        output: Option<ListOutput>,
        #[command(flatten)]
        endpoint: Endpoint,
        #[command(flatten)]
        server: Server,
    },
    /// List replicas (of one volume, or all) with node, disk, mode (rw, wo, err), since when,
    /// why, and rebuild progress.
    Replicas {
        /// Only this volume's replicas.
        volume: Option<String>,
        /// json|yaml: the rows as records.
        #[arg(short = 'o', long, value_enum)]
        output: Option<ListOutput>,
        #[command(flatten)]
        server: Server,
    },
    /// Show one volume (as a row of `get volumes`, or its record with -o json|yaml).
    Volume {
        /// The volume (as given to `bicsi volume create`).
        name: String,
        /// json|yaml: the record; wide: also the replicas' nodes.
        #[arg(short = 'o', long, value_enum)]
        output: Option<ListOutput>,
        #[command(flatten)]
        endpoint: Endpoint,
        #[command(flatten)]
        server: Server,
    },
    /// List backing images with their state on each disk.
    #[command(alias = "bi")]
    Backingimages {
        /// json|yaml: the objects; wide: also the full checksum and the image's message.
        #[arg(short = 'o', long, value_enum)]
        output: Option<ListOutput>,
        #[command(flatten)]
        server: Server,
    },
    /// Show one backing image with its status.
    Backingimage {
        /// The backing image to show.
        name: String,
        /// json or yaml.
        #[arg(short = 'o', long, value_enum, default_value = "yaml")]
        output: Output,
        #[command(flatten)]
        server: Server,
    },
    /// List the StorageClasses kept by bicsi.
    #[command(alias = "sc")]
    Storageclasses {
        /// json|yaml: the objects (wide: the table).
        #[arg(short = 'o', long, value_enum)]
        output: Option<ListOutput>,
        #[command(flatten)]
        server: Server,
    },
    /// List the nodes with their state.
    Nodes {
        /// json|yaml: the records; wide: also the file-transfer URL.
        #[arg(short = 'o', long, value_enum)]
        output: Option<ListOutput>,
        #[command(flatten)]
        server: Server,
    },
    /// List the disks of the up nodes with their free space.
    Disks {
        /// json|yaml: the records (wide: the table).
        #[arg(short = 'o', long, value_enum)]
        output: Option<ListOutput>,
        #[command(flatten)]
        server: Server,
    },
    /// List the backup volumes in the backup target (one per backed-up volume).
    Backupvolumes {
        /// json|yaml: the records (wide: the table).
        #[arg(short = 'o', long, value_enum)]
        output: Option<ListOutput>,
        #[command(flatten)]
        server: Server,
    },
    /// List the settings with their values, defaults and descriptions.
    Settings {
        /// json|yaml: the records (default: a table).
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
        #[command(flatten)]
        server: Server,
    },
}

/// Splits `KEY=VALUE` at the first '=', so JSON values with '=' pass through.
pub fn parse_parameter(text: &str) -> Result<(String, String)> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(Error::InvalidArgument(format!(
            "parameter {text:?} is not KEY=VALUE"
        ))),
    }
}

/// The HTTP API flags of a client command, if it talks to the HTTP API.
fn server_of(cmd: &Command) -> Option<&Server> {
    match cmd {
        Command::Serve(_)
        | Command::Controller(_)
        | Command::Node(_)
        | Command::Engine(_)
        | Command::EngineMirror(_)
        | Command::ReplicaServer(_)
        | Command::Crd
        | Command::Certs(_) => None,
        Command::Apply { server, .. } => Some(server),
        Command::Volume(VolumeCommand::Create { server, .. }) => Some(server),
        Command::Volume(VolumeCommand::Rebuild { server, .. }) => Some(server),
        Command::Volume(_) => None,
        Command::Get(g) => match g {
            GetCommand::Volumes { server, .. }
            | GetCommand::Volume { server, .. }
            | GetCommand::Replicas { server, .. }
            | GetCommand::Backingimages { server, .. }
            | GetCommand::Backingimage { server, .. }
            | GetCommand::Storageclasses { server, .. }
            | GetCommand::Nodes { server, .. }
            | GetCommand::Disks { server, .. }
            | GetCommand::Backupvolumes { server, .. }
            | GetCommand::Settings { server, .. } => Some(server),
        },
        Command::Delete(
            DeleteCommand::Backingimage { server, .. } | DeleteCommand::Storageclass { server, .. },
        ) => Some(server),
        Command::Image(
            ImageCommand::Upload { server, .. }
            | ImageCommand::Download { server, .. }
            | ImageCommand::Cleanup { server, .. },
        ) => Some(server),
        Command::Snapshot(s) => s.server(),
        Command::Set(SetCommand::Setting { server, .. }) => Some(server),
        Command::Backup(b) => Some(b.server()),
    }
}

pub async fn run(cli: Cli) -> Result<()> {
    // The hidden top-level flag is only ever typed, never read from the environment: when given
    // it wins over the command's (which may come from BICSI_TOKEN).
    let token = cli
        .token
        .or_else(|| server_of(&cli.command).and_then(|s| s.token.clone()));
    crate::cli_api::set_token(token);
    if let Some(ca) = server_of(&cli.command).and_then(|s| s.ca_cert.as_deref()) {
        crate::cli_api::set_ca_cert(ca)?;
    }
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Controller(args) => {
            let transport = args.tls.transport()?;
            let mut cfg = process_config(args.process, None, args.http_listen)?;
            cfg.store = args.state.store;
            cfg.api_token_file = args.state.api_token_file;
            cfg.api_tls = args.state.tls_cert.zip(args.state.tls_key);
            let split = crate::server::SplitConfig {
                cluster_listen: args.cluster_listen,
                node_down_after: Some(std::time::Duration::from_secs(args.node_down_after.max(1))),
                transport: Some(transport),
                ..Default::default()
            };
            crate::server::controller(cfg, split, shutdown_signal()).await
        }
        Command::Engine(args) => engine(args).await,
        Command::EngineMirror(args) => tokio::task::spawn_blocking(move || {
            crate::mirror::main(args).map_err(|e| Error::Internal(format!("mirror engine: {e}")))
        })
        .await
        .map_err(|e| Error::Internal(format!("mirror engine: {e}")))?,
        Command::ReplicaServer(args) => tokio::task::spawn_blocking(move || {
            crate::replica_server::main(args)
                .map_err(|e| Error::Internal(format!("replica server: {e}")))
        })
        .await
        .map_err(|e| Error::Internal(format!("replica server: {e}")))?,
        Command::Node(args) => {
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
        // Client commands stop waiting on Ctrl-C (see `wait`); servers stop on their own signal.
        cmd => wait::interruptible(client(cmd)).await,
    }
}

async fn client(cmd: Command) -> Result<()> {
    use crate::cli_api as api;
    match cmd {
        Command::Serve(_)
        | Command::Controller(_)
        | Command::Node(_)
        | Command::Engine(_)
        | Command::EngineMirror(_)
        | Command::ReplicaServer(_) => {
            unreachable!("servers are run by `run`")
        }
        Command::Certs(args) => certs(args),
        Command::Crd => {
            crate::out!("{}", crate::store::kubernetes::crd::manifests());
            Ok(())
        }
        Command::Get(GetCommand::Nodes { output, server }) => {
            api::get_nodes(&server.server, output).await
        }
        Command::Get(GetCommand::Disks { output, server }) => {
            api::get_disks(&server.server, output).await
        }
        Command::Get(GetCommand::Settings { output, server }) => {
            api::get_settings(&server.server, output).await
        }
        Command::Set(SetCommand::Setting {
            name,
            value,
            server,
        }) => api::set_setting(&server.server, &name, &value).await,
        Command::Image(ImageCommand::Cleanup {
            name,
            disks,
            server,
        }) => api::cleanup_image(&server.server, &name, &disks).await,
        Command::Volume(cmd) => volume::run(cmd).await,
        Command::Snapshot(cmd) => snapshot::run(cmd).await,
        Command::Backup(cmd) => backup::run(cmd).await,
        Command::Get(GetCommand::Backupvolumes { output, server }) => {
            backup::get_backup_volumes(&server.server, output).await
        }
        Command::Get(GetCommand::Volumes {
            output,
            endpoint,
            server,
        }) => volume::get_volumes(&endpoint.csi_endpoint, &server, output).await,
        Command::Get(GetCommand::Volume {
            name,
            output,
            endpoint,
            server,
        }) => volume::get_volume(&name, &endpoint.csi_endpoint, &server, output).await,
        Command::Get(GetCommand::Replicas {
            volume,
            output,
            server,
        }) => replica::get_replicas(volume.as_deref(), &server, output).await,
        Command::Get(GetCommand::Backingimages { output, server }) => {
            api::get_backing_images(&server.server, output).await
        }
        Command::Get(GetCommand::Backingimage {
            name,
            output,
            server,
        }) => api::get_backing_image(&server.server, &name, output).await,
        Command::Get(GetCommand::Storageclasses { output, server }) => {
            api::get_storage_classes(&server.server, output).await
        }
        Command::Apply {
            file,
            wait,
            timeout,
            server,
        } => {
            let deadline = (!timeout.is_zero()).then(|| std::time::Instant::now() + timeout);
            api::apply(&server.server, &file, wait, deadline).await
        }
        Command::Delete(DeleteCommand::Backingimage {
            name,
            ignore_not_found,
            server,
        }) => {
            api::delete(
                &server.server,
                "backingimages",
                "backingimage",
                &name,
                ignore_not_found,
            )
            .await
        }
        Command::Delete(DeleteCommand::Storageclass {
            name,
            ignore_not_found,
            server,
        }) => {
            api::delete(
                &server.server,
                "storageclasses",
                "storageclass",
                &name,
                ignore_not_found,
            )
            .await
        }
        Command::Image(ImageCommand::Upload {
            name,
            file,
            checksum,
            server,
        }) => api::upload_image(&server.server, &name, &file, checksum).await,
        Command::Image(ImageCommand::Download {
            name,
            output,
            server,
        }) => {
            let output = output.unwrap_or_else(|| PathBuf::from(&name));
            api::download_image(&server.server, &name, &output).await
        }
    }
}

pub fn serve_config(args: ServeArgs) -> Result<crate::server::Config> {
    let mut cfg = process_config(args.process, Some(args.disk), args.http_listen)?;
    cfg.store = args.state.store;
    cfg.api_token_file = args.state.api_token_file;
    cfg.api_tls = args.state.tls_cert.zip(args.state.tls_key);
    Ok(cfg)
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

/// `bicsi certs`.
fn certs(args: CertsArgs) -> Result<()> {
    if !args.revoke.is_empty() {
        let serials = crate::certs::revoke(&args.out, &args.revoke)?;
        for s in serials {
            crate::outln!("revoked serial {s}");
        }
        crate::outln!(
            "wrote {}/{{ca,controller,node}}/ca.crl and {}; apply the Secrets and restart the processes",
            args.out.display(),
            args.out.join(crate::certs::SECRETS_FILE).display()
        );
        return Ok(());
    }
    let made = crate::certs::make(&args.out, args.days, &args.controller_name)?;
    crate::outln!(
        "{} CA: {}",
        if made.ca_created { "new" } else { "kept the" },
        made.ca_dir.display()
    );
    crate::outln!(
        "controller: {}  (bicsi controller --tls-dir)",
        made.controller_dir.display()
    );
    crate::outln!(
        "node agents: {}  (bicsi node --tls-dir)",
        made.node_dir.display()
    );
    crate::outln!(
        "Secrets bicsi-controller-tls and bicsi-node-tls: {} (copy to deploy/tls.yaml)",
        args.out.join(crate::certs::SECRETS_FILE).display()
    );
    Ok(())
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

async fn serve(args: ServeArgs) -> Result<()> {
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
    if let Some(dir) = nbd_tls {
        return Ok(crate::os::Os::real_with_nbd_tls(host, dir));
    }
    Ok(match engine_endpoint {
        None => crate::os::Os::real(),
        Some(e) => {
            let socket = crate::server::socket_path(e).map_err(|_| {
                Error::InvalidArgument(format!(
                    "--engine-endpoint {e:?} is not a unix socket; use unix:///path/to/engine.sock"
                ))
            })?;
            crate::os::Os::real_with_engine_host(socket)
        }
    })
}

async fn engine(args: EngineArgs) -> Result<()> {
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

pub(crate) fn mount_capability(fs_type: Option<String>, read_only: bool) -> Capability {
    Capability {
        access: AccessType::Mount {
            fs_type: fs_type.unwrap_or_default(),
            mount_flags: vec![],
        },
        mode: if read_only {
            AccessMode::SingleNodeReaderOnly
        } else {
            AccessMode::SingleNodeWriter
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_output_has_no_enum_tags() {
        let cap = crate::model::AccessType::Mount {
            fs_type: "ext4".into(),
            mount_flags: vec![],
        };
        let yaml = to_yaml(&cap).unwrap();
        assert!(!yaml.contains('!'), "{yaml}");
        assert!(
            yaml.starts_with("mount:\n") && yaml.contains("fs_type: ext4"),
            "{yaml}"
        );
        let block = to_yaml(&crate::model::AccessType::Block).unwrap();
        assert_eq!(block.trim(), "block");
    }

    #[test]
    fn parameters_split_at_the_first_equals() {
        assert_eq!(
            parse_parameter("backingImageDataSourceParameters={\"url\":\"http://x/?a=b\"}")
                .unwrap(),
            (
                "backingImageDataSourceParameters".to_string(),
                "{\"url\":\"http://x/?a=b\"}".to_string()
            )
        );
        assert_eq!(
            parse_parameter("k=").unwrap(),
            ("k".to_string(), String::new())
        );
        assert!(parse_parameter("novalue").is_err());
        assert!(parse_parameter("=v").is_err());
    }

    /// Every command of the tree, with its path (`volume attach`).
    fn all_commands(cmd: &clap::Command, path: String, out: &mut Vec<(String, clap::Command)>) {
        for sub in cmd.get_subcommands() {
            let p = format!("{path} {}", sub.get_name()).trim().to_string();
            out.push((p.clone(), sub.clone()));
            all_commands(sub, p, out);
        }
    }

    fn commands() -> Vec<(String, clap::Command)> {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        cmd.build();
        let mut out = Vec::new();
        all_commands(&cmd, String::new(), &mut out);
        out
    }

    #[test]
    fn every_argument_has_help() {
        let mut missing = Vec::new();
        for (path, cmd) in commands() {
            for arg in cmd.get_arguments() {
                if arg.get_help().is_none() && !arg.is_hide_set() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }

    #[test]
    fn token_is_shown_only_where_the_http_api_is_used() {
        let has_token = |c: &clap::Command| {
            c.get_arguments()
                .any(|a| a.get_id() == "token" && !a.is_hide_set())
        };
        let all = commands();
        let find = |p: &str| {
            all.iter()
                .find(|(path, _)| path == p)
                .map(|(_, c)| c)
                .unwrap_or_else(|| panic!("no command {p}"))
        };
        for p in [
            "volume attach",
            "volume detach",
            "volume delete",
            "volume expand",
            "snapshot list",
            "snapshot delete",
            "serve",
            "node",
            "crd",
        ] {
            assert!(!has_token(find(p)), "{p} shows --token");
        }
        for p in [
            "apply",
            "get backingimages",
            "get nodes",
            "get volumes",
            "delete backingimage",
            "image upload",
            "image download",
            "set setting",
            "volume create",
        ] {
            assert!(has_token(find(p)), "{p} lacks --token");
        }
        assert!(!has_token(&<Cli as clap::CommandFactory>::command()));
        // `bicsi --token T COMMAND`, as scripts wrote it before, still parses.
        let cli = Cli::try_parse_from(["bicsi", "--token", "t", "get", "backingimages"]).unwrap();
        assert_eq!(cli.token.as_deref(), Some("t"));
    }

    #[test]
    fn serve_flags_have_the_documented_defaults() {
        let cli = Cli::try_parse_from(["bicsi", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let cfg = serve_config(args).unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/bicsi"));
        assert_eq!(cfg.csi_endpoint, "unix:///var/lib/bicsi/csi.sock");
        assert_eq!(cfg.driver_name, "driver.longhorn.io");
        assert_eq!(cfg.http_listen, "127.0.0.1:9500");
        assert!(cfg.disks.is_empty());
        let cli = Cli::try_parse_from([
            "bicsi",
            "serve",
            "--data-dir",
            "/d",
            "--disk",
            "/a",
            "--disk",
            "/b",
            "--node-id",
            "n1",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let cfg = serve_config(args).unwrap();
        assert_eq!(cfg.csi_endpoint, "unix:///d/csi.sock");
        assert_eq!(cfg.disks, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(cfg.node_id, "n1");
    }
}
