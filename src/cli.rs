//! The command line: `bicsi serve` and the client commands that drive a running bicsi. Parsing
//! lives here; every command calls the library and prints. Flags named in the issues are
//! contracts other tools script against: add flags, never rename them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::client::{CsiClient, status_error};
use crate::csi::pb;
use crate::error::{Error, Result};
use crate::model::{AccessMode, AccessType, Capability};
use crate::quantity;

mod snapshot;

pub use snapshot::SnapshotCommand;

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
    /// The HTTP API's bearer token (Secret bicsi-api-token), for commands that use --server.
    #[arg(long, env = "BICSI_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
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
    /// Print the CustomResourceDefinitions of the Kubernetes store (deploy/crds.yaml).
    Crd,
    /// Create, attach, detach and delete volumes on a running `bicsi serve`.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// List objects, or show one.
    #[command(subcommand)]
    Get(GetCommand),
    /// Create or check the BackingImages and StorageClasses in a YAML file (`-f -`: stdin).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: String,
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
}

#[derive(Subcommand, Debug)]
pub enum SetCommand {
    /// Set a setting (`bicsi get settings` lists them); it applies without a restart.
    Setting {
        name: String,
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
        name: String,
        file: PathBuf,
        /// The file's SHA-512 (`shasum -a 512 FILE`); the upload fails if what arrives differs.
        #[arg(long)]
        checksum: Option<String>,
        #[command(flatten)]
        server: Server,
    },
    /// Download a backing image's ready file, verified by its SHA-512.
    Download {
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
        name: String,
        /// A disk id or path (repeatable), as `bicsi get disks` shows.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        #[command(flatten)]
        server: Server,
    },
}

#[derive(Args, Debug, Clone)]
pub struct Server {
    /// The HTTP API of the running bicsi.
    #[arg(long, env = "BICSI_SERVER", default_value = "http://127.0.0.1:9500")]
    pub server: String,
}

#[derive(Subcommand, Debug)]
pub enum DeleteCommand {
    /// Delete a backing image and its files (refused while volumes use it).
    #[command(alias = "backingimages", alias = "bi")]
    Backingimage {
        name: String,
        #[command(flatten)]
        server: Server,
    },
    /// Delete a StorageClass kept by bicsi.
    #[command(alias = "storageclasses", alias = "sc")]
    Storageclass {
        name: String,
        #[command(flatten)]
        server: Server,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Output {
    Json,
    Yaml,
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
}

#[derive(Args, Debug, Clone)]
pub struct Endpoint {
    /// The CSI endpoint of the running bicsi.
    #[arg(long, env = "BICSI_CSI_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub csi_endpoint: String,
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a volume (CSI CreateVolume).
    Create {
        name: String,
        /// Size in Kubernetes quantity form: 256Mi, 10Gi.
        #[arg(long)]
        size: String,
        /// A StorageClass parameter KEY=VALUE (repeatable); split at the first '='.
        #[arg(short = 'p', long = "parameter")]
        parameters: Vec<String>,
        /// Take the parameters of this StorageClass (applied with `bicsi apply`); -p overrides.
        #[arg(long)]
        storage_class: Option<String>,
        #[command(flatten)]
        endpoint: Endpoint,
        #[command(flatten)]
        server: Server,
    },
    /// Attach a volume to this node: ControllerPublish, NodeStage, NodePublish.
    Attach {
        name: String,
        /// Mount the volume's filesystem at PATH.
        #[arg(long, conflicts_with = "block", required_unless_present = "block")]
        mount: Option<PathBuf>,
        /// Expose the raw block device at PATH (a file).
        #[arg(long)]
        block: Option<PathBuf>,
        /// Filesystem for a new volume: ext4 (default) or xfs.
        #[arg(long)]
        fs_type: Option<String>,
        #[arg(long)]
        read_only: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Detach a volume attached with `bicsi volume attach`.
    Detach {
        name: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Delete a volume (CSI DeleteVolume).
    Delete {
        name: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Subcommand, Debug)]
pub enum GetCommand {
    /// List volumes with capacity, attachment and condition.
    Volumes {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// List backing images with their state on each disk.
    #[command(alias = "bi")]
    Backingimages {
        #[command(flatten)]
        server: Server,
    },
    /// Show one backing image with its status.
    Backingimage {
        name: String,
        #[arg(short = 'o', long, value_enum, default_value = "yaml")]
        output: Output,
        #[command(flatten)]
        server: Server,
    },
    /// List the StorageClasses kept by bicsi.
    #[command(alias = "sc")]
    Storageclasses {
        #[command(flatten)]
        server: Server,
    },
    /// List the nodes with their state.
    Nodes {
        #[command(flatten)]
        server: Server,
    },
    /// List the disks of the up nodes with their free space.
    Disks {
        #[command(flatten)]
        server: Server,
    },
    /// List the settings with their values, defaults and descriptions.
    Settings {
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

/// What `attach` remembers so `detach` can undo it: kept beside the socket, in `cli-attach/`.
#[derive(Serialize, Deserialize)]
struct AttachRecord {
    volume_id: String,
    node_id: String,
    staging_path: PathBuf,
    target_path: PathBuf,
    block: bool,
    capability: Capability,
}

fn attach_dir(endpoint: &str) -> Result<PathBuf> {
    let sock = crate::server::socket_path(endpoint)?;
    Ok(sock.parent().unwrap_or(Path::new("/")).join("cli-attach"))
}

pub async fn run(cli: Cli) -> Result<()> {
    crate::cli_api::set_token(cli.token);
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Controller(args) => {
            let mut cfg = process_config(args.process, None, args.http_listen)?;
            cfg.store = args.state.store;
            cfg.api_token_file = args.state.api_token_file;
            let split = crate::server::SplitConfig {
                cluster_listen: args.cluster_listen,
                node_down_after: Some(std::time::Duration::from_secs(args.node_down_after.max(1))),
                ..Default::default()
            };
            crate::server::controller(cfg, split, shutdown_signal()).await
        }
        Command::Engine(args) => engine(args).await,
        Command::Node(args) => {
            let os = real_os(args.disk.engine_endpoint.as_deref())?;
            let cfg = process_config(args.process, Some(args.disk), args.http_listen)?;
            let split = crate::server::SplitConfig {
                controller: args.controller,
                agent_listen: args.agent_listen,
                advertise_host: args.advertise_host,
                advertise_agent_url: args.advertise_agent_url,
                advertise_transfer_url: args.advertise_transfer_url,
                nbd_listen: args.nbd_listen,
                ..Default::default()
            };
            crate::server::node(cfg, split, os, shutdown_signal()).await
        }
        Command::Crd => {
            print!("{}", crate::store::kubernetes::crd::manifests());
            Ok(())
        }
        Command::Get(GetCommand::Nodes { server }) => {
            crate::cli_api::get_nodes(&server.server).await
        }
        Command::Get(GetCommand::Disks { server }) => {
            crate::cli_api::get_disks(&server.server).await
        }
        Command::Get(GetCommand::Settings { output, server }) => {
            crate::cli_api::get_settings(&server.server, output).await
        }
        Command::Set(SetCommand::Setting {
            name,
            value,
            server,
        }) => crate::cli_api::set_setting(&server.server, &name, &value).await,
        Command::Image(ImageCommand::Cleanup {
            name,
            disks,
            server,
        }) => crate::cli_api::cleanup_image(&server.server, &name, &disks).await,
        Command::Volume(cmd) => volume(cmd).await,
        Command::Snapshot(cmd) => snapshot::run(cmd).await,
        Command::Get(GetCommand::Volumes { endpoint }) => get_volumes(&endpoint.csi_endpoint).await,
        Command::Get(GetCommand::Backingimages { server }) => {
            crate::cli_api::get_backing_images(&server.server).await
        }
        Command::Get(GetCommand::Backingimage {
            name,
            output,
            server,
        }) => crate::cli_api::get_backing_image(&server.server, &name, output).await,
        Command::Get(GetCommand::Storageclasses { server }) => {
            crate::cli_api::get_storage_classes(&server.server).await
        }
        Command::Apply { file, server } => crate::cli_api::apply(&server.server, &file).await,
        Command::Delete(DeleteCommand::Backingimage { name, server }) => {
            crate::cli_api::delete(&server.server, "backingimages", &name).await
        }
        Command::Delete(DeleteCommand::Storageclass { name, server }) => {
            crate::cli_api::delete(&server.server, "storageclasses", &name).await
        }
        Command::Image(ImageCommand::Upload {
            name,
            file,
            checksum,
            server,
        }) => crate::cli_api::upload_image(&server.server, &name, &file, checksum).await,
        Command::Image(ImageCommand::Download {
            name,
            output,
            server,
        }) => {
            let output = output.unwrap_or_else(|| PathBuf::from(&name));
            crate::cli_api::download_image(&server.server, &name, &output).await
        }
    }
}

pub fn serve_config(args: ServeArgs) -> Result<crate::server::Config> {
    let mut cfg = process_config(args.process, Some(args.disk), args.http_listen)?;
    cfg.store = args.state.store;
    cfg.api_token_file = args.state.api_token_file;
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

async fn serve(args: ServeArgs) -> Result<()> {
    let os = real_os(args.disk.engine_endpoint.as_deref())?;
    let cfg = serve_config(args)?;
    crate::server::serve(cfg, os, shutdown_signal()).await
}

/// The machine, with engines started by the engine host at `engine_endpoint` when one is given.
fn real_os(engine_endpoint: Option<&str>) -> Result<crate::os::Os> {
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
        println!(
            "engine host pid {} (bicsi {}), data dir {}",
            info.pid, info.version, info.data_dir
        );
        return Ok(());
    }
    crate::server::engine(args.data_dir, &listen, shutdown_signal()).await
}

fn mount_capability(fs_type: Option<String>, read_only: bool) -> Capability {
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

async fn volume(cmd: VolumeCommand) -> Result<()> {
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            parameters,
            storage_class,
            endpoint,
            server,
        } => {
            let bytes = quantity::parse(&size).map_err(Error::InvalidArgument)?;
            let mut merged: HashMap<String, String> = HashMap::new();
            if let Some(sc) = storage_class {
                merged.extend(crate::cli_api::storage_class_parameters(&server.server, &sc).await?);
            }
            for p in &parameters {
                let (k, v) = parse_parameter(p)?;
                merged.insert(k, v);
            }
            let parameters = merged;
            let mut c = CsiClient::connect(&endpoint.csi_endpoint).await?;
            let v = c
                .controller
                .create_volume(pb::CreateVolumeRequest {
                    name: name.clone(),
                    capacity_range: Some(pb::CapacityRange {
                        required_bytes: bytes as i64,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![crate::csi::capability_to_pb(&mount_capability(
                        None, false,
                    ))],
                    parameters,
                    ..Default::default()
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .volume
                .unwrap_or_default();
            println!(
                "volume {name} created: id {}, {}",
                v.volume_id,
                quantity::format(v.capacity_bytes as u64)
            );
            Ok(())
        }
        VolumeCommand::Attach {
            name,
            mount,
            block,
            fs_type,
            read_only,
            endpoint,
        } => {
            let volume_id = crate::controller::volume_id_for(&name);
            let (target, cap) = match (mount, block) {
                (Some(m), None) => (m, mount_capability(fs_type, read_only)),
                (None, Some(b)) => (
                    b,
                    Capability {
                        access: AccessType::Block,
                        mode: if read_only {
                            AccessMode::SingleNodeReaderOnly
                        } else {
                            AccessMode::SingleNodeWriter
                        },
                    },
                ),
                _ => {
                    return Err(Error::InvalidArgument(
                        "give exactly one of --mount PATH or --block PATH".into(),
                    ));
                }
            };
            let target = std::path::absolute(&target)
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", target.display())))?;
            let dir = attach_dir(&endpoint.csi_endpoint)?;
            let staging = dir.join(&volume_id).join("staging");
            let mut c = CsiClient::connect(&endpoint.csi_endpoint).await?;
            let node_id = c
                .node
                .node_get_info(pb::NodeGetInfoRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .node_id;
            let pb_cap = crate::csi::capability_to_pb(&cap);
            let publish_context = publish_until_ready(
                &mut c,
                pb::ControllerPublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    node_id: node_id.clone(),
                    volume_capability: Some(pb_cap.clone()),
                    readonly: read_only,
                    ..Default::default()
                },
            )
            .await?;
            std::fs::create_dir_all(&staging)
                .map_err(|e| Error::Internal(format!("{}: {e}", staging.display())))?;
            let record = AttachRecord {
                volume_id: volume_id.clone(),
                node_id,
                staging_path: staging.clone(),
                target_path: target.clone(),
                block: cap.is_block(),
                capability: cap,
            };
            crate::fsutil::write_atomic(
                &dir.join(format!("{volume_id}.json")),
                &serde_json::to_vec_pretty(&record)?,
            )
            .map_err(|e| Error::Internal(format!("cannot record the attachment: {e}")))?;
            c.node
                .node_stage_volume(pb::NodeStageVolumeRequest {
                    volume_id: volume_id.clone(),
                    publish_context: publish_context.clone(),
                    staging_target_path: staging.display().to_string(),
                    volume_capability: Some(pb_cap.clone()),
                    ..Default::default()
                })
                .await
                .map_err(status_error)?;
            c.node
                .node_publish_volume(pb::NodePublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    publish_context,
                    staging_target_path: staging.display().to_string(),
                    target_path: target.display().to_string(),
                    volume_capability: Some(pb_cap),
                    readonly: read_only,
                    ..Default::default()
                })
                .await
                .map_err(status_error)?;
            println!("volume {name} attached at {}", target.display());
            Ok(())
        }
        VolumeCommand::Detach { name, endpoint } => {
            let volume_id = crate::controller::volume_id_for(&name);
            let dir = attach_dir(&endpoint.csi_endpoint)?;
            let record_path = dir.join(format!("{volume_id}.json"));
            let bytes = std::fs::read(&record_path).map_err(|_| {
                Error::NotFound(format!(
                    "volume {name:?} was not attached with `bicsi volume attach` through this endpoint"
                ))
            })?;
            let rec: AttachRecord = serde_json::from_slice(&bytes)?;
            let mut c = CsiClient::connect(&endpoint.csi_endpoint).await?;
            c.node
                .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    target_path: rec.target_path.display().to_string(),
                })
                .await
                .map_err(status_error)?;
            c.node
                .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                    volume_id: volume_id.clone(),
                    staging_target_path: rec.staging_path.display().to_string(),
                })
                .await
                .map_err(status_error)?;
            c.controller
                .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    node_id: rec.node_id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(status_error)?;
            let _ = std::fs::remove_file(&record_path);
            let _ = std::fs::remove_dir_all(dir.join(&volume_id));
            println!("volume {name} detached");
            Ok(())
        }
        VolumeCommand::Delete { name, endpoint } => {
            let mut c = CsiClient::connect(&endpoint.csi_endpoint).await?;
            c.controller
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: crate::controller::volume_id_for(&name),
                    ..Default::default()
                })
                .await
                .map_err(status_error)?;
            println!("volume {name} deleted");
            Ok(())
        }
    }
}

/// ControllerPublishVolume, retried while the volume is being prepared (its backing image is on
/// its way to a replica's disk), with the progress shown.
async fn publish_until_ready(
    c: &mut CsiClient,
    req: pb::ControllerPublishVolumeRequest,
) -> Result<HashMap<String, String>> {
    let bar = indicatif::ProgressBar::new_spinner();
    loop {
        match c.controller.controller_publish_volume(req.clone()).await {
            Ok(r) => {
                bar.finish_and_clear();
                return Ok(r.into_inner().publish_context);
            }
            Err(s) if s.code() == tonic::Code::Unavailable => {
                bar.set_message(s.message().to_string());
                bar.tick();
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(s) => {
                bar.finish_and_clear();
                return Err(status_error(s));
            }
        }
    }
}

async fn get_volumes(endpoint: &str) -> Result<()> {
    let mut c = CsiClient::connect(endpoint).await?;
    let mut token = String::new();
    println!(
        "{:<44} {:>10} {:<20} CONDITION",
        "VOLUME", "SIZE", "ATTACHED TO"
    );
    loop {
        let page = c
            .controller
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 100,
                starting_token: token.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        for e in page.entries {
            let v = e.volume.unwrap_or_default();
            let status = e.status.unwrap_or_default();
            let cond = status
                .volume_condition
                .map(|c| {
                    if c.abnormal {
                        format!("abnormal: {}", c.message)
                    } else {
                        c.message
                    }
                })
                .unwrap_or_default();
            println!(
                "{:<44} {:>10} {:<20} {}",
                v.volume_id,
                quantity::format(v.capacity_bytes as u64),
                if status.published_node_ids.is_empty() {
                    "-".to_string()
                } else {
                    status.published_node_ids.join(",")
                },
                cond
            );
        }
        if page.next_token.is_empty() {
            return Ok(());
        }
        token = page.next_token;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
