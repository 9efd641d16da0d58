//! Attach and detach on this node for clients without a shell (the web UI): `POST
//! /v1/volumes/{id}/attach` `{"mode":"filesystem"|"block"}`, `POST /v1/volumes/{id}/detach`,
//! `GET /v1/attachments`. They call what `bicsi volume attach|detach` calls
//! (`crate::client::attach`), through this process's own CSI socket and with the same records,
//! so the CLI and the UI see and undo each other's attachments.
//!
//! The API is open without a token on loopback, so it never takes a path from the request: a
//! volume is mounted at `<data-dir>/attached/<volume>/mount`, or its block device put at
//! `<data-dir>/attached/<volume>/block`, and the answer says where. Only `bicsi serve` can do
//! this; the split mode's controller runs no node and refuses, saying so.

use std::path::PathBuf;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};

use super::{ApiResult, ApiState, body};
use crate::client::CsiClient;
use crate::client::attach::{self, Attach, AttachRecord, Detached};
use crate::error::{Error, Result};
use crate::model::{AccessMode, AccessType, Capability};

/// Where this process attaches volumes for the HTTP API: its own CSI socket (serving both the
/// controller and the node) and its data directory, under which the attachments go.
#[derive(Clone, Debug)]
pub struct LocalAttach {
    pub csi_endpoint: String,
    pub data_dir: PathBuf,
}

impl LocalAttach {
    /// The bicsi-owned path a volume is attached at in `mode`; never one from a request.
    fn target(&self, volume_id: &str, block: bool) -> PathBuf {
        self.data_dir
            .join("attached")
            .join(volume_id)
            .join(if block { "block" } else { "mount" })
    }
}

/// Why the split mode's controller cannot attach: it has no node.
const NO_NODE: &str = "this is the split mode's controller (`bicsi controller`): it runs no node, so it cannot attach volumes on a machine; attach on the node with `bicsi volume attach NAME --mount PATH` against that node's CSI socket, or through Kubernetes";

fn local(s: &ApiState) -> ApiResult<&LocalAttach> {
    if s.controller.is_none() {
        return Err(Error::NotFound(
            "this is a node agent; ask the controller's HTTP API".into(),
        ));
    }
    s.attach
        .as_ref()
        .ok_or_else(|| Error::FailedPrecondition(NO_NODE.into()))
}

/// An attachment as the API answers it.
#[derive(serde::Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub(super) struct Attachment {
    volume: String,
    /// `filesystem` or `block`.
    mode: &'static str,
    /// Where it is: the mount point, or the block device's file.
    path: PathBuf,
    read_only: bool,
    node: String,
}

impl From<&AttachRecord> for Attachment {
    fn from(r: &AttachRecord) -> Attachment {
        Attachment {
            volume: r.volume_id.clone(),
            mode: r.mode(),
            path: r.target_path.clone(),
            read_only: r.capability.mode == AccessMode::SingleNodeReaderOnly,
            node: r.node_id.clone(),
        }
    }
}

/// `POST /v1/volumes/{id}/attach`.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct AttachRequest {
    /// `filesystem` (the default) or `block`.
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    read_only: bool,
}

fn is_block(mode: Option<&str>) -> Result<bool> {
    match mode.map(str::trim) {
        None | Some("") | Some("filesystem") => Ok(false),
        Some("block") => Ok(true),
        Some(other) => Err(Error::InvalidArgument(format!(
            "attach mode {other:?} is not known; use \"filesystem\" or \"block\""
        ))),
    }
}

/// Attaches the volume on this node (idempotent; at the other mode it is refused with the path
/// it is at). While its files are prepared for this node the answer is 503 with the progress:
/// ask again.
pub(super) async fn attach(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Attachment>> {
    let local = local(&s)?.clone();
    let req: AttachRequest = if bytes.is_empty() {
        AttachRequest {
            mode: None,
            read_only: false,
        }
    } else {
        body(
            &bytes,
            "attach request ({\"mode\":\"filesystem\"|\"block\"})",
        )?
    };
    let block = is_block(req.mode.as_deref())?;
    let controller = s.controller()?.clone();
    let volume_id = crate::model::volume_id_for(&id);
    if controller.get(&volume_id)?.is_none() {
        return Err(Error::NotFound(format!(
            "volume {id:?} not found; GET /v1/volumes lists them"
        )));
    }
    let mode = if req.read_only {
        AccessMode::SingleNodeReaderOnly
    } else {
        AccessMode::SingleNodeWriter
    };
    let capability = Capability {
        access: if block {
            AccessType::Block
        } else {
            AccessType::Mount {
                fs_type: String::new(),
                mount_flags: vec![],
            }
        },
        mode,
    };
    let request = Attach {
        name: id,
        target: local.target(&volume_id, block),
        capability,
        read_only: req.read_only,
    };
    // Runs to its end even if the caller goes away, as a CSI call does: a half-made attach is
    // undone by the shared code, not left by a dropped connection.
    let rec = tokio::spawn(async move {
        let mut c = CsiClient::connect(&local.csi_endpoint).await?;
        let ctl = c.controller.clone();
        attach::attach(&mut c, &local.csi_endpoint, &request, |req| async move {
            crate::client::retry_aborted(|| {
                let (mut ctl, req) = (ctl.clone(), req.clone());
                async move { ctl.controller_publish_volume(req).await }
            })
            .await
            .map(|r| r.into_inner().publish_context)
            .map_err(crate::client::status_error)
        })
        .await
    })
    .await
    .map_err(|e| Error::Internal(format!("attach task failed: {e}")))??;
    Ok(Json(Attachment::from(&rec)))
}

/// What `POST /v1/volumes/{id}/detach` answers.
#[derive(serde::Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub(super) struct DetachAnswer {
    volume: String,
    /// False: it was attached nowhere (detach is idempotent).
    detached: bool,
    /// Where it was attached.
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<PathBuf>,
}

/// Detaches what the CLI or the UI attached on this node; a volume attached nowhere is fine.
pub(super) async fn detach(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<DetachAnswer>> {
    let local = local(&s)?.clone();
    let volume = crate::model::volume_id_for(&id);
    let dir = local.data_dir.join("attached").join(&volume);
    let done = tokio::spawn(async move {
        let mut c = CsiClient::connect(&local.csi_endpoint).await?;
        let done = attach::detach(&mut c, &local.csi_endpoint, &id).await?;
        // The directory the API attached under; remove_dir leaves anything but an empty one.
        let _ = std::fs::remove_dir(&dir);
        Ok::<_, Error>(done)
    })
    .await
    .map_err(|e| Error::Internal(format!("detach task failed: {e}")))??;
    Ok(Json(match done {
        Detached::NotAttached => DetachAnswer {
            volume,
            detached: false,
            path: None,
        },
        Detached::Detached { record, .. } => DetachAnswer {
            volume,
            detached: true,
            path: Some(record.target_path),
        },
    }))
}

/// `GET /v1/attachments`: what is attached on this node through its CSI socket, by the CLI or
/// the UI.
pub(super) async fn list(State(s): State<ApiState>) -> ApiResult<Json<Vec<Attachment>>> {
    let local = local(&s)?;
    Ok(Json(
        attach::attach_records(&local.csi_endpoint)?
            .iter()
            .map(Attachment::from)
            .collect(),
    ))
}
