//! The command line: `bicsi serve` and the client commands that drive a running bicsi. This file
//! holds the command tree and its dispatch; each noun has its module under `cli/` (`volume`,
//! `image`, `snapshot`, `backup`, `replica`, `storageclass`, `settings`, `nodes`, `apply`,
//! `certs`, the serving modes in `process`), printing through `output`, talking to the HTTP API
//! through `api` and waiting through `wait`. Flags named in the issues are contracts other tools
//! script against: add flags, never rename them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::error::Result;

mod api;
pub mod apply;
mod backup;
mod certs;
mod image;
mod nodes;
pub mod output;
mod process;
mod replica;
mod settings;
mod snapshot;
mod storageclass;
mod volume;
pub mod wait;

pub use backup::BackupCommand;
pub use certs::CertsArgs;
pub use image::ImageCommand;
pub use output::{ListOutput, Output};
pub use process::{
    ClusterTlsArgs, ControllerArgs, DiskArgs, EngineArgs, NodeArgs, ProcessArgs, ServeArgs,
    StateArgs, serve_config,
};
pub use settings::SetCommand;
pub use snapshot::SnapshotCommand;
pub use storageclass::parse_parameter;
pub use volume::VolumeCommand;

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
    api::set_token(token);
    if let Some(ca) = server_of(&cli.command).and_then(|s| s.ca_cert.as_deref()) {
        api::set_ca_cert(ca)?;
    }
    match cli.command {
        Command::Serve(args) => process::serve(args).await,
        Command::Controller(args) => process::controller(args).await,
        Command::Node(args) => process::node(args).await,
        Command::Engine(args) => process::engine(args).await,
        Command::EngineMirror(args) => process::engine_mirror(args).await,
        Command::ReplicaServer(args) => process::replica_server(args).await,
        // Client commands stop waiting on Ctrl-C (see `wait`); servers stop on their own signal.
        cmd => wait::interruptible(client(cmd)).await,
    }
}

async fn client(cmd: Command) -> Result<()> {
    match cmd {
        Command::Serve(_)
        | Command::Controller(_)
        | Command::Node(_)
        | Command::Engine(_)
        | Command::EngineMirror(_)
        | Command::ReplicaServer(_) => {
            unreachable!("servers are run by `run`")
        }
        Command::Certs(args) => certs::run(args),
        Command::Crd => {
            crate::out!("{}", crate::store::kubernetes::crd::manifests());
            Ok(())
        }
        Command::Volume(cmd) => volume::run(cmd).await,
        Command::Snapshot(cmd) => snapshot::run(cmd).await,
        Command::Backup(cmd) => backup::run(cmd).await,
        Command::Image(cmd) => image::run(cmd).await,
        Command::Set(cmd) => settings::run(cmd).await,
        Command::Apply {
            file,
            wait,
            timeout,
            server,
        } => {
            let deadline = (!timeout.is_zero()).then(|| std::time::Instant::now() + timeout);
            apply::apply(&server.server, &file, wait, deadline).await
        }
        Command::Get(get) => match get {
            GetCommand::Volumes {
                output,
                endpoint,
                server,
            } => volume::get_volumes(&endpoint.csi_endpoint, &server, output).await,
            GetCommand::Volume {
                name,
                output,
                endpoint,
                server,
            } => volume::get_volume(&name, &endpoint.csi_endpoint, &server, output).await,
            GetCommand::Replicas {
                volume,
                output,
                server,
            } => replica::get_replicas(volume.as_deref(), &server, output).await,
            GetCommand::Backingimages { output, server } => {
                image::get_backing_images(&server.server, output).await
            }
            GetCommand::Backingimage {
                name,
                output,
                server,
            } => image::get_backing_image(&server.server, &name, output).await,
            GetCommand::Storageclasses { output, server } => {
                storageclass::get_storage_classes(&server.server, output).await
            }
            GetCommand::Nodes { output, server } => nodes::get_nodes(&server.server, output).await,
            GetCommand::Disks { output, server } => nodes::get_disks(&server.server, output).await,
            GetCommand::Backupvolumes { output, server } => {
                backup::get_backup_volumes(&server.server, output).await
            }
            GetCommand::Settings { output, server } => {
                settings::get_settings(&server.server, output).await
            }
        },
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
