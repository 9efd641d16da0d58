//! `bicsi snapshot create|list|delete|restore`: CSI snapshot calls on a running bicsi, for use
//! without Kubernetes (the CSI snapshotter sidecar makes the same calls there). It only shapes
//! requests and prints answers; the rules live in the controller.

use clap::Subcommand;

use super::{Endpoint, mount_capability, parse_parameter};
use crate::client::{CsiClient, status_error};
use crate::csi::pb;
use crate::error::{Error, Result};
use crate::quantity;

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a snapshot of a volume (CSI CreateSnapshot); `-p type=bi -p export-type=raw` also
    /// exports it as a backing image.
    Create {
        name: String,
        /// The volume to snapshot.
        #[arg(long)]
        volume: String,
        /// A snapshot parameter KEY=VALUE (repeatable): type=snap|bi, export-type=raw|qcow2.
        #[arg(short = 'p', long = "parameter")]
        parameters: Vec<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// List snapshots, optionally of one volume.
    List {
        #[arg(long)]
        volume: Option<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Delete a snapshot (and the backing image a `type=bi` snapshot exported).
    Delete {
        id: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Create a volume from a snapshot; `-p backingImage=NAME` restores onto another image.
    Restore {
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
        endpoint: Endpoint,
    },
}

fn print_header() {
    println!(
        "{:<44} {:<30} {:>10} {:<6} CREATED",
        "SNAPSHOT", "SOURCE VOLUME", "SIZE", "READY"
    );
}

fn print_row(s: &pb::Snapshot) {
    let created = s
        .creation_time
        .as_ref()
        .map(|t| crate::model::rfc3339(t.seconds.max(0) as u64))
        .unwrap_or_default();
    println!(
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
            endpoint,
        } => {
            let parameters = parameters
                .iter()
                .map(|p| parse_parameter(p))
                .collect::<Result<_>>()?;
            let mut c = CsiClient::connect(&endpoint.csi_endpoint).await?;
            let s = c
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
            print_header();
            print_row(&s);
            Ok(())
        }
        SnapshotCommand::List { volume, endpoint } => {
            let mut c = CsiClient::connect(&endpoint.csi_endpoint).await?;
            print_header();
            let mut token = String::new();
            loop {
                let page = c
                    .controller
                    .list_snapshots(pb::ListSnapshotsRequest {
                        max_entries: 100,
                        starting_token: token.clone(),
                        source_volume_id: volume.clone().unwrap_or_default(),
                        ..Default::default()
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                for e in page.entries {
                    print_row(&e.snapshot.unwrap_or_default());
                }
                if page.next_token.is_empty() {
                    return Ok(());
                }
                token = page.next_token;
            }
        }
        SnapshotCommand::Delete { id, endpoint } => {
            let mut c = CsiClient::connect(&endpoint.csi_endpoint).await?;
            c.controller
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(status_error)?;
            println!("snapshot {id} deleted");
            Ok(())
        }
        SnapshotCommand::Restore {
            snapshot,
            volume,
            size,
            parameters,
            endpoint,
        } => {
            let bytes = match size {
                Some(s) => quantity::parse(&s).map_err(Error::InvalidArgument)?,
                None => 0,
            };
            let parameters = parameters
                .iter()
                .map(|p| parse_parameter(p))
                .collect::<Result<_>>()?;
            let mut c = CsiClient::connect(&endpoint.csi_endpoint).await?;
            let v = c
                .controller
                .create_volume(pb::CreateVolumeRequest {
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
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .volume
                .unwrap_or_default();
            println!(
                "volume {} created from snapshot {snapshot} ({})",
                v.volume_id,
                quantity::format(v.capacity_bytes.max(0) as u64)
            );
            Ok(())
        }
    }
}
