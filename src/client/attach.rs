//! Attaching a volume to this node through its CSI socket, as `bicsi volume attach|detach` and
//! the HTTP API's `POST /v1/volumes/{id}/attach|detach` (the web UI) both do: ControllerPublish,
//! NodeStage, NodePublish, with a record beside the socket (`cli-attach/<volume>.json`) that
//! detach undoes. Both go through these functions and these records, so each sees (and can
//! undo) the other's attachments. One attachment per volume: a second one at another path is
//! refused, naming the path it is at.
//!
//! This module does not wait for a volume being prepared (the caller's `publish` does, or
//! answers at once) and prints nothing; the CLI and the HTTP handler shape the answer.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{CsiClient, retry_aborted, status_error};
use crate::csi::pb;
use crate::error::{Error, Result};
use crate::model::Capability;

/// `client.method(request)` retried while it answers Aborted ([`retry_aborted`]): another
/// operation on the volume (a rebuild pass, the replica watcher) is waited out, not reported.
macro_rules! retrying {
    ($client:expr, $method:ident, $req:expr) => {{
        let req = $req;
        retry_aborted(|| {
            let mut client = $client.clone();
            let req = req.clone();
            async move { client.$method(req).await }
        })
        .await
    }};
}

/// What an attach remembers so detach can undo it: kept beside the socket, in `cli-attach/`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachRecord {
    pub volume_id: String,
    pub node_id: String,
    pub staging_path: PathBuf,
    pub target_path: PathBuf,
    pub block: bool,
    pub capability: Capability,
}

impl AttachRecord {
    /// How the volume is attached, as the HTTP API words it.
    pub fn mode(&self) -> &'static str {
        if self.block { "block" } else { "filesystem" }
    }
}

/// The directory of the attach records of the bicsi at `endpoint`.
pub fn attach_dir(endpoint: &str) -> Result<PathBuf> {
    let sock = crate::csi::socket_path(endpoint)?;
    Ok(sock.parent().unwrap_or(Path::new("/")).join("cli-attach"))
}

fn record_path(endpoint: &str, volume_id: &str) -> Result<PathBuf> {
    Ok(attach_dir(endpoint)?.join(format!("{volume_id}.json")))
}

/// The attachment recorded for a volume through this endpoint, if any.
pub fn attach_record(endpoint: &str, volume_id: &str) -> Result<Option<AttachRecord>> {
    match std::fs::read(record_path(endpoint, volume_id)?) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Internal(format!(
            "cannot read the attachment record of {volume_id:?}: {e}"
        ))),
    }
}

/// Every attachment recorded through this endpoint, by volume id.
pub fn attach_records(endpoint: &str) -> Result<Vec<AttachRecord>> {
    let dir = attach_dir(endpoint)?;
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Internal(format!(
                "cannot list {}: {e}",
                dir.display()
            )));
        }
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // Temporary files of an atomic write end otherwise.
        if let Some(id) = name.strip_suffix(".json")
            && let Some(rec) = attach_record(endpoint, id)?
        {
            out.push(rec);
        }
    }
    out.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
    Ok(out)
}

/// An attach request: the volume (as the user named it), where, and how.
#[derive(Clone, Debug)]
pub struct Attach {
    pub name: String,
    /// Absolute: the directory to mount at, or the file to put the block device on.
    pub target: PathBuf,
    pub capability: Capability,
    pub read_only: bool,
}

/// Attaches a volume to this node: ControllerPublish through `publish` (which may wait while
/// the volume is prepared for this node, or answer Unavailable), then NodeStage and
/// NodePublish, recorded for [`detach`]. Attaching again at the same path redoes each step
/// (each is idempotent); at another path it is refused, naming the path it is at. A failed
/// attach undoes what it did.
pub async fn attach<P, F>(
    c: &mut CsiClient,
    endpoint: &str,
    a: &Attach,
    publish: P,
) -> Result<AttachRecord>
where
    P: FnOnce(pb::ControllerPublishVolumeRequest) -> F,
    F: Future<Output = Result<HashMap<String, String>>>,
{
    let name = &a.name;
    let volume_id = crate::controller::volume_id_for(name);
    let target = &a.target;
    if let Some(rec) = attach_record(endpoint, &volume_id)?
        && &rec.target_path != target
    {
        return Err(Error::FailedPrecondition(format!(
            "volume {name} is attached at {} already (as a {}); detach it first (`bicsi volume detach {name}`, or Detach in the web UI) to attach it at {}",
            rec.target_path.display(),
            if rec.block {
                "block device"
            } else {
                "filesystem"
            },
            target.display()
        )));
    }
    let dir = attach_dir(endpoint)?;
    let staging = dir.join(&volume_id).join("staging");
    let node_id = c
        .node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .node_id;
    let pb_cap = crate::csi::capability_to_pb(&a.capability);
    let publish_context = publish(pb::ControllerPublishVolumeRequest {
        volume_id: volume_id.clone(),
        node_id: node_id.clone(),
        volume_capability: Some(pb_cap.clone()),
        readonly: a.read_only,
        ..Default::default()
    })
    .await?;
    std::fs::create_dir_all(&staging)
        .map_err(|e| Error::Internal(format!("{}: {e}", staging.display())))?;
    let record = AttachRecord {
        volume_id: volume_id.clone(),
        node_id,
        staging_path: staging.clone(),
        target_path: target.clone(),
        block: a.capability.is_block(),
        capability: a.capability.clone(),
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
                readonly: a.read_only,
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
        return Err(match undo_attach(c, &record, staged, endpoint).await {
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
    Ok(record)
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

/// What [`detach`] did.
#[derive(Debug)]
pub enum Detached {
    /// Nothing was attached through this endpoint, and the volume is published nowhere.
    NotAttached,
    /// Undone: the attachment at `record.target_path`, and the paths an older bicsi left
    /// published (a second attach at another path replaced its record then).
    Detached {
        record: AttachRecord,
        also_unpublished: Vec<String>,
    },
}

/// Undoes what [`attach`] did (through either the CLI or the HTTP API): NodeUnpublish,
/// NodeUnstage, ControllerUnpublish, the record. Idempotent: a volume attached nowhere is
/// [`Detached::NotAttached`]; one attached by someone else (a kubelet) is refused.
pub async fn detach(c: &mut CsiClient, endpoint: &str, name: &str) -> Result<Detached> {
    let volume_id = crate::controller::volume_id_for(name);
    let Some(rec) = attach_record(endpoint, &volume_id)? else {
        // Nothing attached here this way: fine when the volume is attached nowhere (detach is
        // idempotent, and a failed attach undoes itself), an error when someone else attached it.
        let nodes = published_nodes(c, &volume_id).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "volume {name:?} not found; `bicsi get volumes` lists them"
            ))
        })?;
        if nodes.is_empty() {
            return Ok(Detached::NotAttached);
        }
        return Err(Error::FailedPrecondition(format!(
            "volume {name:?} is attached to {} but not with `bicsi volume attach` or the web UI through this endpoint; detach it where it was attached",
            nodes.join(", ")
        )));
    };
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
    Ok(Detached::Detached {
        record: rec,
        also_unpublished: stranded,
    })
}

/// The nodes a volume is published to, or None when there is no such volume.
pub async fn published_nodes(c: &mut CsiClient, volume_id: &str) -> Result<Option<Vec<String>>> {
    Ok(c.all_volumes()
        .await?
        .into_iter()
        .find(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == volume_id))
        .map(|e| e.status.unwrap_or_default().published_node_ids))
}
