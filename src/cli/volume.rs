//! `bicsi volume create|attach|detach|delete|expand` and `bicsi get volume(s)`: CSI calls on a
//! running bicsi for use without Kubernetes, which wait where a user waits (a backing image on
//! its way, a volume being prepared for this node). It shapes requests, waits and prints; the
//! rules live in the controller and the node.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Subcommand;
use serde::Serialize;

use super::output::{self, ListOutput};
use super::wait::{self, WaitArgs, retry_unavailable};
use super::{Endpoint, Server};
use crate::client::attach::{Attach, Detached, attach_record};
use crate::client::{CsiClient, status_error};
use crate::csi::pb;
use crate::error::{Error, Result};
use crate::model::{AccessMode, AccessType, Capability};
use crate::outln;
use crate::quantity;

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a volume (CSI CreateVolume); with a backing image, wait until the image is ready
    /// to use.
    Create {
        /// The volume's name (its id when it is a plain name).
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
        wait: WaitArgs,
        #[command(flatten)]
        endpoint: Endpoint,
        #[command(flatten)]
        server: Server,
    },
    /// Attach a volume to this node: ControllerPublish (waiting while its files are prepared for
    /// this node), NodeStage, NodePublish.
    Attach {
        /// The volume to attach (as given to `bicsi volume create`).
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
        /// Attach read-only.
        #[arg(long)]
        read_only: bool,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Detach a volume attached with `bicsi volume attach`.
    Detach {
        /// The volume to detach.
        name: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Delete a volume (CSI DeleteVolume).
    Delete {
        /// The volume to delete.
        name: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Rebuild the volume's replicas that missed writes (mode err) from a current one, offline
    /// (the volume must be detached); --from chooses the source by hand, e.g. for a faulted
    /// volume whose replicas differ.
    Rebuild {
        /// The volume (as given to `bicsi volume create`).
        name: String,
        /// The replica to copy from (see `bicsi get replicas NAME`); the others are rebuilt
        /// from it.
        #[arg(long)]
        from: Option<String>,
        #[command(flatten)]
        server: Server,
    },
    /// Grow a volume (CSI ControllerExpandVolume, and NodeExpandVolume when it is attached here);
    /// bicsi grows volumes while they are detached, and the filesystem at the next attach.
    Expand {
        /// The volume to grow.
        name: String,
        /// The new size in Kubernetes quantity form (256Mi, 10Gi); never smaller than now.
        #[arg(long)]
        size: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

/// The backing image a volume's parameters name.
fn image_of(parameters: &HashMap<String, String>) -> Option<String> {
    parameters
        .get(crate::params::BACKING_IMAGE)
        .filter(|n| !n.is_empty())
        .cloned()
}

/// CreateVolume, retried while the server answers Unavailable (a backing image being prepared,
/// on servers that make CreateVolume wait for it), then, unless `--no-wait`, a wait until the
/// volume's backing image is ready to use. `announce` words the line printed once it exists.
pub async fn create_volume(
    c: &mut CsiClient,
    req: pb::CreateVolumeRequest,
    image: Option<&str>,
    wait: &WaitArgs,
    server: &Server,
    announce: impl Fn(&pb::Volume) -> String,
) -> Result<pb::Volume> {
    let name = req.name.clone();
    let deadline = wait.deadline();
    wait::on_interrupt(format!(
        "stopped waiting; volume {name} is not created: run the same command again to create it"
    ));
    let ctl = c.controller.clone();
    let v = retry_unavailable(
        wait,
        format!("creating {name}"),
        &format!("volume {name} is not created"),
        "run the command again to create it (without --no-wait it waits)",
        "run the command again to create it",
        || {
            let (mut ctl, req) = (ctl.clone(), req.clone());
            async move { ctl.create_volume(req).await }
        },
    )
    .await?
    .volume
    .unwrap_or_default();
    outln!("{}", announce(&v));
    let Some(image) = image else {
        return Ok(v);
    };
    let bi = match super::image::backing_image(&server.server, image).await {
        Ok(bi) => bi,
        Err(e) => {
            eprintln!(
                "cannot follow backing image {image:?} at {}: {e}; `bicsi volume attach {name}` waits for it",
                server.server
            );
            return Ok(v);
        }
    };
    match super::image::readiness(&bi) {
        super::image::Readiness::Ready => {}
        super::image::Readiness::Failed(why) => return Err(Error::FailedPrecondition(why)),
        super::image::Readiness::Preparing { text, .. } if wait.no_wait => {
            outln!(
                "backing image {image} is being prepared ({text}); `bicsi volume attach {name}` waits for it"
            );
        }
        super::image::Readiness::Preparing { .. } => {
            wait::on_interrupt(format!(
                "stopped waiting; volume {name} is created and bicsi goes on preparing backing image {image:?}; `bicsi volume attach {name}` waits for it"
            ));
            super::image::wait_for_image(&server.server, image, deadline).await?;
            outln!("backing image {image} is ready");
        }
    }
    Ok(v)
}

pub async fn run(cmd: VolumeCommand) -> Result<()> {
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            parameters,
            storage_class,
            wait,
            endpoint,
            server,
        } => {
            let bytes = quantity::parse(&size).map_err(Error::InvalidArgument)?;
            let merged: HashMap<String, String> = super::storageclass::parameters(
                &server.server,
                storage_class.as_deref(),
                &parameters,
            )
            .await?
            .into_iter()
            .collect();
            let image = image_of(&merged);
            let mut c = CsiClient::connect(&endpoint.csi_endpoint).await?;
            let req = pb::CreateVolumeRequest {
                name: name.clone(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: bytes as i64,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![crate::csi::capability_to_pb(&mount_capability(
                    None, false,
                ))],
                parameters: merged,
                ..Default::default()
            };
            create_volume(&mut c, req, image.as_deref(), &wait, &server, |v| {
                format!(
                    "volume {name} created: id {}, {}",
                    v.volume_id,
                    quantity::format(v.capacity_bytes.max(0) as u64)
                )
            })
            .await?;
            Ok(())
        }
        VolumeCommand::Attach {
            name,
            mount,
            block,
            fs_type,
            read_only,
            wait,
            endpoint,
        } => {
            attach(
                &name,
                mount,
                block,
                fs_type,
                read_only,
                &wait,
                &endpoint.csi_endpoint,
            )
            .await
        }
        VolumeCommand::Detach { name, endpoint } => detach(&name, &endpoint.csi_endpoint).await,
        VolumeCommand::Delete { name, endpoint } => {
            let c = CsiClient::connect(&endpoint.csi_endpoint).await?;
            let req = pb::DeleteVolumeRequest {
                volume_id: crate::controller::volume_id_for(&name),
                ..Default::default()
            };
            wait::retry_aborted(|| {
                let (mut ctl, req) = (c.controller.clone(), req.clone());
                async move { ctl.delete_volume(req).await }
            })
            .await
            .map_err(status_error)?;
            outln!("volume {name} deleted");
            Ok(())
        }
        VolumeCommand::Expand {
            name,
            size,
            endpoint,
        } => expand(&name, &size, &endpoint.csi_endpoint).await,
        VolumeCommand::Rebuild { name, from, server } => {
            super::replica::rebuild(&name, from.as_deref(), &server).await
        }
    }
}

async fn attach(
    name: &str,
    mount: Option<PathBuf>,
    block: Option<PathBuf>,
    fs_type: Option<String>,
    read_only: bool,
    wait: &WaitArgs,
    endpoint: &str,
) -> Result<()> {
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
    let mut c = CsiClient::connect(endpoint).await?;
    wait::on_interrupt(format!(
        "stopped waiting; volume {name} is not attached, and bicsi goes on preparing its files for this node: run the same command again to attach it"
    ));
    let request = Attach {
        name: name.to_string(),
        target,
        capability: cap,
        read_only,
    };
    let ctl = c.clone();
    let rec = crate::client::attach::attach(&mut c, endpoint, &request, |req| async move {
        let mut ctl = ctl;
        let context = publish_until_ready(&mut ctl, req, name, wait).await?;
        wait::on_interrupt(format!(
            "volume {name} may be attached in part: `bicsi volume detach {name}` undoes it, or run the same command again"
        ));
        Ok(context)
    })
    .await?;
    outln!("volume {name} attached at {}", rec.target_path.display());
    Ok(())
}

async fn detach(name: &str, endpoint: &str) -> Result<()> {
    let mut c = CsiClient::connect(endpoint).await?;
    wait::on_interrupt(format!(
        "volume {name} may be detached in part: run `bicsi volume detach {name}` again"
    ));
    match crate::client::attach::detach(&mut c, endpoint, name).await? {
        Detached::NotAttached => outln!("volume {name} is not attached; nothing to detach"),
        Detached::Detached {
            also_unpublished, ..
        } => {
            for path in also_unpublished {
                eprintln!("volume {name}: unpublished {path} too (left by an earlier attach)");
            }
            outln!("volume {name} detached");
        }
    }
    Ok(())
}

async fn expand(name: &str, size: &str, endpoint: &str) -> Result<()> {
    let bytes = quantity::parse(size).map_err(Error::InvalidArgument)?;
    let volume_id = crate::controller::volume_id_for(name);
    let rec = attach_record(endpoint, &volume_id)?;
    let mut c = CsiClient::connect(endpoint).await?;
    let r = c
        .controller
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: volume_id.clone(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: bytes as i64,
                limit_bytes: 0,
            }),
            volume_capability: rec
                .as_ref()
                .map(|r| crate::csi::capability_to_pb(&r.capability)),
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let capacity = quantity::format(r.capacity_bytes.max(0) as u64);
    match rec {
        // Attached here: the node grows the filesystem now.
        Some(rec) if r.node_expansion_required => {
            c.node
                .node_expand_volume(pb::NodeExpandVolumeRequest {
                    volume_id,
                    volume_path: rec.target_path.display().to_string(),
                    staging_target_path: rec.staging_path.display().to_string(),
                    capacity_range: Some(pb::CapacityRange {
                        required_bytes: r.capacity_bytes,
                        limit_bytes: 0,
                    }),
                    volume_capability: Some(crate::csi::capability_to_pb(&rec.capability)),
                    ..Default::default()
                })
                .await
                .map_err(status_error)?;
            outln!(
                "volume {name} expanded to {capacity}; its filesystem at {} grew",
                rec.target_path.display()
            );
        }
        _ if r.node_expansion_required => outln!(
            "volume {name} expanded to {capacity}; its filesystem grows when it is attached next"
        ),
        _ => outln!("volume {name} expanded to {capacity}"),
    }
    Ok(())
}

/// ControllerPublishVolume, retried while the volume is being prepared (its backing image is on
/// its way to a replica's disk), with the progress the server reports.
async fn publish_until_ready(
    c: &mut CsiClient,
    req: pb::ControllerPublishVolumeRequest,
    name: &str,
    wait: &WaitArgs,
) -> Result<HashMap<String, String>> {
    let ctl = c.controller.clone();
    let answer = retry_unavailable(
        wait,
        format!("attaching {name}"),
        &format!("volume {name} is not attached"),
        "bicsi goes on preparing it: run the command again to attach it",
        "bicsi goes on preparing it: run the command again to attach it",
        || {
            let (ctl, req) = (ctl.clone(), req.clone());
            async move {
                wait::retry_aborted(|| {
                    let (mut ctl, req) = (ctl.clone(), req.clone());
                    async move { ctl.controller_publish_volume(req).await }
                })
                .await
            }
        },
    )
    .await?;
    Ok(answer.publish_context)
}

/// A volume as `bicsi get volume(s)` shows it: CSI's view (size, attachment, condition) joined
/// with the HTTP API's record (image, replicas) and this machine's attach record (path).
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct VolumeView {
    pub id: String,
    pub capacity_bytes: u64,
    /// None when the HTTP API could not be asked.
    pub backing_image: Option<String>,
    pub healthy_replicas: Option<u32>,
    pub wanted_replicas: Option<u32>,
    /// The engine that serves it (`loop` or `qemu`); None when the HTTP API could not be asked.
    pub engine: Option<String>,
    pub attached_nodes: Vec<String>,
    /// Where `bicsi volume attach` put it on this machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attached_path: Option<PathBuf>,
    pub abnormal: bool,
    pub condition: String,
    /// healthy, degraded or faulted (`crate::health`); None when the HTTP API could not be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<crate::health::VolumeHealth>,
    /// The controller's whole record (spec, replicas, publication), when it could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<crate::model::Volume>,
}

/// Replicas not named missing or down by the condition. A deferred replica (placed, made at the
/// volume's first attach once its backing image's file is on that disk) counts: the volume is
/// not degraded for it, and `-o yaml` shows which ones are deferred.
fn healthy_replicas(v: &crate::model::Volume, abnormal: bool, condition: &str) -> u32 {
    v.replicas
        .iter()
        .filter(|r| r.health.mode == crate::health::ReplicaMode::Rw)
        .filter(|r| !abnormal || !condition.contains(&format!("replica {} (", r.id)))
        .count() as u32
}

async fn volume_views(endpoint: &str, server: &Server) -> Result<Vec<VolumeView>> {
    let mut c = CsiClient::connect(endpoint).await?;
    let records: Option<HashMap<String, crate::model::Volume>> = match records(&server.server).await
    {
        Ok(list) => Some(list.into_iter().map(|v| (v.id.clone(), v)).collect()),
        Err(e) => {
            eprintln!(
                "warning: IMAGE and REPLICAS need the HTTP API ({}): {e}",
                server.server
            );
            None
        }
    };
    let mut views = Vec::new();
    for e in c.all_volumes().await? {
        let v = e.volume.unwrap_or_default();
        let status = e.status.unwrap_or_default();
        let (abnormal, condition) = status
            .volume_condition
            .map(|c| (c.abnormal, c.message))
            .unwrap_or_default();
        let record = records.as_ref().and_then(|r| r.get(&v.volume_id)).cloned();
        let attached_path = attach_record(endpoint, &v.volume_id)
            .ok()
            .flatten()
            .map(|r| r.target_path);
        views.push(VolumeView {
            capacity_bytes: v.capacity_bytes.max(0) as u64,
            backing_image: record
                .as_ref()
                .map(|r| r.spec.backing_image.clone().unwrap_or_default()),
            healthy_replicas: record
                .as_ref()
                .map(|r| healthy_replicas(r, abnormal, &condition)),
            wanted_replicas: record.as_ref().map(|r| r.spec.number_of_replicas),
            engine: record.as_ref().map(|r| r.spec.engine.to_string()),
            attached_nodes: status.published_node_ids,
            attached_path,
            abnormal,
            condition,
            health: record.as_ref().map(|r| crate::health::volume_health(r).0),
            record,
            id: v.volume_id,
        });
    }
    Ok(views)
}

fn attached(v: &VolumeView) -> String {
    match (v.attached_nodes.is_empty(), &v.attached_path) {
        (true, _) => "-".to_string(),
        (false, Some(p)) => format!("{}:{}", v.attached_nodes.join(","), p.display()),
        (false, None) => v.attached_nodes.join(","),
    }
}

/// The table of volumes; `wide` adds the replicas' nodes, `engine` the ENGINE column (wide, and
/// a single volume, show it).
fn print_table(views: &[VolumeView], wide: bool, engine: bool) {
    let unknown = |s: Option<String>| s.unwrap_or_else(|| "?".to_string());
    let engine_col = |e: &str| {
        if engine {
            format!("{e:<7} ")
        } else {
            String::new()
        }
    };
    if wide {
        outln!(
            "{:<32} {:>10} {:<24} {:<9} {:<9} {}{:<40} {:<24} CONDITION",
            "VOLUME",
            "SIZE",
            "IMAGE",
            "REPLICAS",
            "HEALTH",
            engine_col("ENGINE"),
            "ATTACHED",
            "REPLICA NODES"
        );
    } else {
        outln!(
            "{:<32} {:>10} {:<24} {:<9} {:<9} {}{:<40} CONDITION",
            "VOLUME",
            "SIZE",
            "IMAGE",
            "REPLICAS",
            "HEALTH",
            engine_col("ENGINE"),
            "ATTACHED"
        );
    }
    for v in views {
        let image = unknown(
            v.backing_image
                .clone()
                .map(|i| if i.is_empty() { "-".to_string() } else { i }),
        );
        let replicas = unknown(
            v.healthy_replicas
                .zip(v.wanted_replicas)
                .map(|(h, w)| format!("{h}/{w}")),
        );
        let condition = if v.abnormal {
            format!("abnormal: {}", v.condition)
        } else {
            v.condition.clone()
        };
        let size = quantity::format(v.capacity_bytes);
        let eng = engine_col(&unknown(v.engine.clone()));
        let health = unknown(v.health.map(|h| h.to_string()));
        if wide {
            let nodes = unknown(v.record.as_ref().map(|r| {
                let mut n: Vec<&str> = r.replicas.iter().map(|r| r.node_id.as_str()).collect();
                n.dedup();
                n.join(",")
            }));
            outln!(
                "{:<32} {size:>10} {image:<24} {replicas:<9} {health:<9} {eng}{:<40} {nodes:<24} {condition}",
                v.id,
                attached(v),
            );
        } else {
            outln!(
                "{:<32} {size:>10} {image:<24} {replicas:<9} {health:<9} {eng}{:<40} {condition}",
                v.id,
                attached(v),
            );
        }
    }
}

/// `bicsi get volumes [-o json|yaml|wide]`.
pub async fn get_volumes(
    endpoint: &str,
    server: &Server,
    output: Option<ListOutput>,
) -> Result<()> {
    let views = volume_views(endpoint, server).await?;
    if !output::print_records(&views, output)? {
        let wide = output == Some(ListOutput::Wide);
        print_table(&views, wide, wide);
    }
    Ok(())
}

/// `bicsi get volume NAME [-o json|yaml|wide]`.
pub async fn get_volume(
    name: &str,
    endpoint: &str,
    server: &Server,
    output: Option<ListOutput>,
) -> Result<()> {
    let id = crate::controller::volume_id_for(name);
    let view = volume_views(endpoint, server)
        .await?
        .into_iter()
        .find(|v| v.id == id)
        .ok_or_else(|| Error::NotFound(format!("volume {name:?} not found")))?;
    if !output::print_records(&view, output)? {
        let wide = output == Some(ListOutput::Wide);
        print_table(std::slice::from_ref(&view), wide, true);
    }
    Ok(())
}

/// The controller's volume records (`GET /v1/volumes`).
pub(super) async fn records(server: &str) -> Result<Vec<crate::model::Volume>> {
    super::api::get(server, "v1/volumes").await
}

/// The capability of a filesystem volume on one node (`--fs-type`, `--read-only`).
pub(super) fn mount_capability(fs_type: Option<String>, read_only: bool) -> Capability {
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
