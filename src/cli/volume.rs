//! `bicsi volume create|attach|detach|delete|expand` and `bicsi get volume(s)`: CSI calls on a
//! running bicsi for use without Kubernetes, which wait where a user waits (a backing image on
//! its way, a volume being prepared for this node). It shapes requests, waits and prints; the
//! rules live in the controller and the node.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `client.method(request)` retried while it answers Aborted (`wait::retry_aborted`): another
/// operation on the volume (a rebuild pass, the replica watcher) is waited out, not reported.
macro_rules! retrying {
    ($client:expr, $method:ident, $req:expr) => {{
        let req = $req;
        wait::retry_aborted(|| {
            let mut client = $client.clone();
            let req = req.clone();
            async move { client.$method(req).await }
        })
        .await
    }};
}

use clap::Subcommand;
use serde::{Deserialize, Serialize};

use super::wait::{self, WaitArgs, retry_unavailable};
use super::{Endpoint, ListOutput, Server, mount_capability, parse_parameter};
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

fn record_path(endpoint: &str, volume_id: &str) -> Result<PathBuf> {
    Ok(attach_dir(endpoint)?.join(format!("{volume_id}.json")))
}

/// The attachment `bicsi volume attach` recorded for a volume through this endpoint, if any.
fn attach_record(endpoint: &str, volume_id: &str) -> Result<Option<AttachRecord>> {
    match std::fs::read(record_path(endpoint, volume_id)?) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Internal(format!(
            "cannot read the attachment record of {volume_id:?}: {e}"
        ))),
    }
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
    let bi = match crate::cli_api::backing_image(&server.server, image).await {
        Ok(bi) => bi,
        Err(e) => {
            eprintln!(
                "cannot follow backing image {image:?} at {}: {e}; `bicsi volume attach {name}` waits for it",
                server.server
            );
            return Ok(v);
        }
    };
    match crate::cli_api::readiness(&bi) {
        crate::cli_api::Readiness::Ready => {}
        crate::cli_api::Readiness::Failed(why) => return Err(Error::FailedPrecondition(why)),
        crate::cli_api::Readiness::Preparing { text, .. } if wait.no_wait => {
            outln!(
                "backing image {image} is being prepared ({text}); `bicsi volume attach {name}` waits for it"
            );
        }
        crate::cli_api::Readiness::Preparing { .. } => {
            wait::on_interrupt(format!(
                "stopped waiting; volume {name} is created and bicsi goes on preparing backing image {image:?}; `bicsi volume attach {name}` waits for it"
            ));
            crate::cli_api::wait_for_image(&server.server, image, deadline).await?;
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
            let mut merged: HashMap<String, String> = HashMap::new();
            if let Some(sc) = storage_class {
                merged.extend(crate::cli_api::storage_class_parameters(&server.server, &sc).await?);
            }
            for p in &parameters {
                let (k, v) = parse_parameter(p)?;
                merged.insert(k, v);
            }
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
            retrying!(
                c.controller,
                delete_volume,
                pb::DeleteVolumeRequest {
                    volume_id: crate::controller::volume_id_for(&name),
                    ..Default::default()
                }
            )
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
    let volume_id = crate::controller::volume_id_for(name);
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
    // One attachment per volume through the CLI: a second path would replace the record that
    // detach undoes, and strand the first mount.
    if let Some(rec) = attach_record(endpoint, &volume_id)?
        && rec.target_path != target
    {
        return Err(Error::FailedPrecondition(format!(
            "volume {name} is attached at {} already; `bicsi volume detach {name}` first to attach it at {}",
            rec.target_path.display(),
            target.display()
        )));
    }
    let dir = attach_dir(endpoint)?;
    let staging = dir.join(&volume_id).join("staging");
    let mut c = CsiClient::connect(endpoint).await?;
    let node_id = c
        .node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .node_id;
    let pb_cap = crate::csi::capability_to_pb(&cap);
    wait::on_interrupt(format!(
        "stopped waiting; volume {name} is not attached, and bicsi goes on preparing its files for this node: run the same command again to attach it"
    ));
    let publish_context = publish_until_ready(
        &mut c,
        pb::ControllerPublishVolumeRequest {
            volume_id: volume_id.clone(),
            node_id: node_id.clone(),
            volume_capability: Some(pb_cap.clone()),
            readonly: read_only,
            ..Default::default()
        },
        name,
        wait,
    )
    .await?;
    wait::on_interrupt(format!(
        "volume {name} may be attached in part: `bicsi volume detach {name}` undoes it, or run the same command again"
    ));
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
        &record_path(endpoint, &volume_id)?,
        &serde_json::to_vec_pretty(&record)?,
    )
    .map_err(|e| Error::Internal(format!("cannot record the attachment: {e}")))?;
    let mut staged = false;
    let attached: Result<()> = async {
        retrying!(
            c.node,
            node_stage_volume,
            pb::NodeStageVolumeRequest {
                volume_id: volume_id.clone(),
                publish_context: publish_context.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(pb_cap.clone()),
                ..Default::default()
            }
        )
        .map_err(status_error)?;
        staged = true;
        retrying!(
            c.node,
            node_publish_volume,
            pb::NodePublishVolumeRequest {
                volume_id: volume_id.clone(),
                publish_context,
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(pb_cap),
                readonly: read_only,
                ..Default::default()
            }
        )
        .map_err(status_error)?;
        Ok(())
    }
    .await;
    if let Err(e) = attached {
        // Undo what this attach did, so that the volume is not left published to this node (which
        // makes DeleteVolume refuse) with a record only `detach` would remove.
        return Err(match undo_attach(&mut c, &record, staged, endpoint).await {
            Ok(()) => Error::from_code(
                e.code(),
                format!("{e}; the attach was undone, volume {name} is detached"),
            ),
            Err(u) => Error::from_code(
                e.code(),
                format!(
                    "{e}; undoing the attach failed too ({u}): `bicsi volume detach {name}` undoes what was done"
                ),
            ),
        });
    }
    outln!("volume {name} attached at {}", target.display());
    Ok(())
}

/// Undoes a failed attach of `rec`: NodeUnstage when NodeStage succeeded (NodePublish removes
/// what it made when it fails; NodeUnpublish only when NodeUnstage says the target is still
/// published), ControllerUnpublish, and the attach record.
async fn undo_attach(
    c: &mut CsiClient,
    rec: &AttachRecord,
    staged: bool,
    endpoint: &str,
) -> Result<()> {
    let unstage = pb::NodeUnstageVolumeRequest {
        volume_id: rec.volume_id.clone(),
        staging_target_path: rec.staging_path.display().to_string(),
    };
    if staged {
        match retrying!(c.node, node_unstage_volume, unstage.clone()) {
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                retrying!(
                    c.node,
                    node_unpublish_volume,
                    pb::NodeUnpublishVolumeRequest {
                        volume_id: rec.volume_id.clone(),
                        target_path: rec.target_path.display().to_string(),
                    }
                )
                .map_err(status_error)?;
                retrying!(c.node, node_unstage_volume, unstage).map_err(status_error)?;
            }
            other => {
                other.map_err(status_error)?;
            }
        }
    }
    retrying!(
        c.controller,
        controller_unpublish_volume,
        pb::ControllerUnpublishVolumeRequest {
            volume_id: rec.volume_id.clone(),
            node_id: rec.node_id.clone(),
            ..Default::default()
        }
    )
    .map_err(status_error)?;
    let _ = std::fs::remove_file(record_path(endpoint, &rec.volume_id)?);
    let _ = std::fs::remove_dir_all(attach_dir(endpoint)?.join(&rec.volume_id));
    Ok(())
}

async fn detach(name: &str, endpoint: &str) -> Result<()> {
    let volume_id = crate::controller::volume_id_for(name);
    let mut c = CsiClient::connect(endpoint).await?;
    let Some(rec) = attach_record(endpoint, &volume_id)? else {
        // Nothing this CLI attached: fine when the volume is attached nowhere (detach is
        // idempotent, and a failed attach undoes itself), an error when someone else attached it.
        let nodes = published_nodes(&mut c, &volume_id).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "volume {name:?} not found; `bicsi get volumes` lists them"
            ))
        })?;
        if nodes.is_empty() {
            outln!("volume {name} is not attached; nothing to detach");
            return Ok(());
        }
        return Err(Error::FailedPrecondition(format!(
            "volume {name:?} is attached to {} but not with `bicsi volume attach` through this endpoint; detach it where it was attached",
            nodes.join(", ")
        )));
    };
    wait::on_interrupt(format!(
        "volume {name} may be detached in part: run `bicsi volume detach {name}` again"
    ));
    retrying!(
        c.node,
        node_unpublish_volume,
        pb::NodeUnpublishVolumeRequest {
            volume_id: volume_id.clone(),
            target_path: rec.target_path.display().to_string(),
        }
    )
    .map_err(status_error)?;
    // An older bicsi replaced the record on a second attach at another path, so the first
    // path stayed published and NodeUnstage refuses, naming it: unpublish what it names (only
    // paths of this volume on this node) and unstage again.
    let mut stranded = Vec::new();
    loop {
        let unstaged = retrying!(
            c.node,
            node_unstage_volume,
            pb::NodeUnstageVolumeRequest {
                volume_id: volume_id.clone(),
                staging_target_path: rec.staging_path.display().to_string(),
            }
        );
        let path = match &unstaged {
            Err(s) if s.code() == tonic::Code::FailedPrecondition && stranded.len() < 16 => s
                .message()
                .split_once(" is still published at ")
                .and_then(|(_, rest)| rest.rsplit_once("; unpublish it first"))
                .map(|(p, _)| p.to_string()),
            _ => None,
        };
        let Some(path) = path.filter(|p| !stranded.contains(p)) else {
            unstaged.map_err(status_error)?;
            break;
        };
        retrying!(
            c.node,
            node_unpublish_volume,
            pb::NodeUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                target_path: path.clone(),
            }
        )
        .map_err(status_error)?;
        eprintln!("volume {name}: unpublished {path} too (left by an earlier attach)");
        stranded.push(path);
    }
    retrying!(
        c.controller,
        controller_unpublish_volume,
        pb::ControllerUnpublishVolumeRequest {
            volume_id: volume_id.clone(),
            node_id: rec.node_id.clone(),
            ..Default::default()
        }
    )
    .map_err(status_error)?;
    let _ = std::fs::remove_file(record_path(endpoint, &volume_id)?);
    let _ = std::fs::remove_dir_all(attach_dir(endpoint)?.join(&volume_id));
    outln!("volume {name} detached");
    Ok(())
}

/// The nodes a volume is published to, or None when there is no such volume.
async fn published_nodes(c: &mut CsiClient, volume_id: &str) -> Result<Option<Vec<String>>> {
    let mut token = String::new();
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
            if e.volume.as_ref().is_some_and(|v| v.volume_id == volume_id) {
                return Ok(Some(e.status.unwrap_or_default().published_node_ids));
            }
        }
        if page.next_token.is_empty() {
            return Ok(None);
        }
        token = page.next_token;
    }
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
    let records: Option<HashMap<String, crate::model::Volume>> =
        match crate::cli_api::volumes(&server.server).await {
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
    let mut token = String::new();
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
        if page.next_token.is_empty() {
            return Ok(views);
        }
        token = page.next_token;
    }
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
    match output {
        None => print_table(&views, false, false),
        Some(ListOutput::Wide) => print_table(&views, true, true),
        Some(ListOutput::Json) => super::print_json(&views)?,
        Some(ListOutput::Yaml) => super::print_yaml(&views)?,
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
    match output {
        None => print_table(std::slice::from_ref(&view), false, true),
        Some(ListOutput::Wide) => print_table(std::slice::from_ref(&view), true, true),
        Some(ListOutput::Json) => super::print_json(&view)?,
        Some(ListOutput::Yaml) => super::print_yaml(&view)?,
    }
    Ok(())
}
