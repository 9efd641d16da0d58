//! `bicsi snapshot create|list|delete|restore`: CSI snapshot calls on a running bicsi, for use
//! without Kubernetes (the CSI snapshotter sidecar makes the same calls there). It only shapes
//! requests and prints answers; the rules live in the controller.

use clap::Subcommand;
use serde::Serialize;

use super::output::{self, ListOutput};
use super::storageclass::parse_parameter;
use super::volume::mount_capability;
use super::wait::{self, WaitArgs, retry_unavailable};
use super::{Endpoint, Server};
use crate::client::{CsiClient, status_error};
use crate::csi::pb;
use crate::error::{Error, Result};
use crate::outln;
use crate::quantity;

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a snapshot of a volume (CSI CreateSnapshot); `-p type=bi -p export-type=raw` also
    /// exports it as a backing image.
    Create {
        /// The snapshot's name (its id when it is a plain name).
        name: String,
        /// The volume to snapshot.
        #[arg(long)]
        volume: String,
        /// A snapshot parameter KEY=VALUE (repeatable): type=snap|bi, export-type=raw|qcow2.
        #[arg(short = 'p', long = "parameter")]
        parameters: Vec<String>,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        endpoint: Endpoint,
        #[command(flatten)]
        server: Server,
    },
    /// List snapshots, optionally of one volume.
    List {
        /// Only the snapshots of this volume.
        #[arg(long)]
        volume: Option<String>,
        /// json|yaml: the records (wide: the table).
        #[arg(short = 'o', long, value_enum)]
        output: Option<ListOutput>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Delete a snapshot (and the backing image a `type=bi` snapshot exported).
    Delete {
        /// The snapshot's id, as `bicsi snapshot list` shows it.
        id: String,
        /// Exit 0, quietly, when it does not exist (else: NotFound, exit 1).
        #[arg(long)]
        ignore_not_found: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Create a volume from a snapshot; `-p backingImage=NAME` restores onto another image.
    Restore {
        /// The snapshot's id, as `bicsi snapshot list` shows it.
        snapshot: String,
        /// The new volume's name.
        volume: String,
        /// Size (256Mi, 10Gi); default: the snapshot's.
        #[arg(long)]
        size: Option<String>,
        /// A StorageClass parameter KEY=VALUE (repeatable).
        #[arg(short = 'p', long = "parameter")]
        parameters: Vec<String>,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        endpoint: Endpoint,
        #[command(flatten)]
        server: Server,
    },
}

impl SnapshotCommand {
    /// The HTTP API flags, for the commands that follow a backing image's progress.
    pub fn server(&self) -> Option<&Server> {
        match self {
            SnapshotCommand::Create { server, .. } | SnapshotCommand::Restore { server, .. } => {
                Some(server)
            }
            SnapshotCommand::List { .. } | SnapshotCommand::Delete { .. } => None,
        }
    }
}

/// A snapshot as `-o json|yaml` prints it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SnapshotView {
    snapshot_id: String,
    source_volume_id: String,
    size_bytes: u64,
    ready_to_use: bool,
    creation_time: String,
}

fn view(s: &pb::Snapshot) -> SnapshotView {
    SnapshotView {
        snapshot_id: s.snapshot_id.clone(),
        source_volume_id: s.source_volume_id.clone(),
        size_bytes: s.size_bytes.max(0) as u64,
        ready_to_use: s.ready_to_use,
        creation_time: s
            .creation_time
            .as_ref()
            .map(|t| crate::model::rfc3339(t.seconds.max(0) as u64))
            .unwrap_or_default(),
    }
}

/// The snapshot with this id, if it exists.
async fn find(c: &mut CsiClient, id: &str) -> Result<Option<pb::Snapshot>> {
    Ok(c.controller
        .list_snapshots(pb::ListSnapshotsRequest {
            snapshot_id: id.to_string(),
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.snapshot)
        .find(|s| s.snapshot_id == id))
}

/// Polls a snapshot until it is ready to use (a `type=bi` one: its backing image has a ready
/// file), with the image's progress when the HTTP API answers; `--timeout` gives up through the
/// CLI's one wait loop ([`retry_unavailable`]), a not-ready snapshot standing for Unavailable.
async fn wait_ready(
    c: &CsiClient,
    id: &str,
    image: Option<&str>,
    wait: &WaitArgs,
    server: &Server,
) -> Result<pb::Snapshot> {
    retry_unavailable(
        wait,
        format!("snapshot {id}"),
        &format!("snapshot {id} is not ready to use"),
        "bicsi goes on with it",
        "bicsi goes on with it",
        || {
            let mut c = c.clone();
            async move {
                let s = find(&mut c, id).await?.ok_or_else(|| {
                    Error::NotFound(format!("snapshot {id:?} disappeared while waiting for it"))
                })?;
                if s.ready_to_use {
                    return Ok(tonic::Response::new(s));
                }
                let text = match image {
                    Some(name) => match super::image::backing_image(&server.server, name).await {
                        Ok(bi) => match super::image::readiness(&bi) {
                            super::image::Readiness::Failed(why) => {
                                return Err(Error::FailedPrecondition(why).into());
                            }
                            super::image::Readiness::Preparing { text, .. } => {
                                format!("exporting backing image {name}: {text}")
                            }
                            super::image::Readiness::Ready => "ready 100%".to_string(),
                        },
                        Err(_) => format!("exporting backing image {name}"),
                    },
                    None => "not ready to use yet".to_string(),
                };
                Err(tonic::Status::unavailable(text))
            }
        },
    )
    .await
}

fn print_header() {
    outln!(
        "{:<44} {:<30} {:>10} {:<6} CREATED",
        "SNAPSHOT",
        "SOURCE VOLUME",
        "SIZE",
        "READY"
    );
}

fn print_row(s: &pb::Snapshot) {
    let created = s
        .creation_time
        .as_ref()
        .map(|t| crate::model::rfc3339(t.seconds.max(0) as u64))
        .unwrap_or_default();
    outln!(
        "{:<44} {:<30} {:>10} {:<6} {created}",
        s.snapshot_id,
        s.source_volume_id,
        quantity::format(s.size_bytes.max(0) as u64),
        s.ready_to_use
    );
}

pub async fn run(cmd: SnapshotCommand) -> Result<()> {
    match cmd {
        SnapshotCommand::Create {
            name,
            volume,
            parameters,
            wait,
            endpoint,
            server,
        } => {
            let parameters: std::collections::HashMap<String, String> = parameters
                .iter()
                .map(|p| parse_parameter(p))
                .collect::<Result<_>>()?;
            let exported = (parameters.get(crate::snapshot::TYPE).map(String::as_str)
                == Some(crate::snapshot::TYPE_BACKING_IMAGE))
            .then(|| crate::snapshot::image_name_for(&name));
            let mut c = CsiClient::connect(&endpoint.csi_endpoint).await?;
            let mut s = c
                .controller
                .create_snapshot(pb::CreateSnapshotRequest {
                    name,
                    source_volume_id: volume,
                    parameters,
                    ..Default::default()
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            if !s.ready_to_use && !wait.no_wait {
                wait::on_interrupt(format!(
                    "stopped waiting; snapshot {} is taken and bicsi goes on exporting it (`bicsi snapshot list` shows READY)",
                    s.snapshot_id
                ));
                s = wait_ready(&c, &s.snapshot_id, exported.as_deref(), &wait, &server).await?;
            }
            print_header();
            print_row(&s);
            Ok(())
        }
        SnapshotCommand::List {
            volume,
            output,
            endpoint,
        } => {
            let mut c = CsiClient::connect(&endpoint.csi_endpoint).await?;
            let all = c
                .all_snapshots(volume.as_deref().unwrap_or_default())
                .await?;
            let views: Vec<_> = all.iter().map(view).collect();
            if !output::print_records(&views, output)? {
                print_header();
                all.iter().for_each(print_row);
            }
            Ok(())
        }
        SnapshotCommand::Delete {
            id,
            ignore_not_found,
            endpoint,
        } => {
            let mut c = CsiClient::connect(&endpoint.csi_endpoint).await?;
            // DeleteSnapshot of an unknown id succeeds (CSI); the CLI says it was not there, as
            // `kubectl delete` does.
            if find(&mut c, &id).await?.is_none() {
                if ignore_not_found {
                    return Ok(());
                }
                return Err(Error::NotFound(format!(
                    "snapshot {id:?} not found (--ignore-not-found exits 0 when it is missing)"
                )));
            }
            c.controller
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(status_error)?;
            outln!("snapshot {id} deleted");
            Ok(())
        }
        SnapshotCommand::Restore {
            snapshot,
            volume,
            size,
            parameters,
            wait,
            endpoint,
            server,
        } => {
            let bytes = match size {
                Some(s) => quantity::parse(&s).map_err(Error::InvalidArgument)?,
                None => 0,
            };
            let parameters: std::collections::HashMap<String, String> = parameters
                .iter()
                .map(|p| parse_parameter(p))
                .collect::<Result<_>>()?;
            let image = parameters
                .get(crate::params::BACKING_IMAGE)
                .filter(|n| !n.is_empty())
                .cloned();
            let mut c = CsiClient::connect(&endpoint.csi_endpoint).await?;
            let req = pb::CreateVolumeRequest {
                name: volume,
                capacity_range: (bytes > 0).then_some(pb::CapacityRange {
                    required_bytes: bytes as i64,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![crate::csi::capability_to_pb(&mount_capability(
                    None, false,
                ))],
                parameters,
                volume_content_source: Some(pb::VolumeContentSource {
                    r#type: Some(pb::volume_content_source::Type::Snapshot(
                        pb::volume_content_source::SnapshotSource {
                            snapshot_id: snapshot.clone(),
                        },
                    )),
                }),
                ..Default::default()
            };
            super::volume::create_volume(&mut c, req, image.as_deref(), &wait, &server, |v| {
                format!(
                    "volume {} created from snapshot {snapshot} ({})",
                    v.volume_id,
                    quantity::format(v.capacity_bytes.max(0) as u64)
                )
            })
            .await?;
            Ok(())
        }
    }
}
