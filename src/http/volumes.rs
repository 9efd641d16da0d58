//! Volume and snapshot routes for clients without a CSI socket (the web UI): create a volume
//! (empty, with a backing image, from a snapshot or a volume), delete it, and take, list and
//! delete snapshots. Each is the controller call the CSI adapter makes for the same CSI RPC,
//! with the same rules and errors; a volume is created for a mount with the filesystem its
//! `fsType` parameter names, as `bicsi volume create` does. Attaching is `attach` (on `bicsi
//! serve`'s own node, at paths bicsi chooses).

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;

use super::{ApiResult, ApiState, body};
use crate::controller::CreateVolume;
use crate::controller::snapshot::CreateSnapshot;
use crate::error::Error;
use crate::model::{AccessMode, AccessType, Capability, Volume};
use crate::snapshot::Snapshot;
use crate::storageclass::StorageClass;
use crate::store::{Kind, StoreExt};

/// `POST /v1/volumes`.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct CreateVolumeRequest {
    name: String,
    /// A Kubernetes quantity (`256Mi`) or bytes; a restore from a snapshot may leave it out.
    #[serde(default)]
    size: Option<serde_json::Value>,
    /// Take the parameters of this StorageClass (kept by bicsi); `parameters` override them.
    #[serde(default)]
    storage_class: Option<String>,
    #[serde(default)]
    parameters: BTreeMap<String, String>,
    /// Restore this snapshot (its backing image unless `parameters.backingImage` overrides it).
    #[serde(default)]
    from_snapshot: Option<String>,
    /// Clone this volume.
    #[serde(default)]
    from_volume: Option<String>,
}

fn size_of(value: Option<&serde_json::Value>) -> ApiResult<u64> {
    match value {
        None => Ok(0),
        Some(serde_json::Value::Number(n)) => n.as_u64().ok_or_else(|| {
            Error::InvalidArgument(format!("volume size {n} is not a whole number of bytes"))
        }),
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => Ok(0),
        Some(serde_json::Value::String(s)) => crate::quantity::parse(s.trim()).map_err(|e| {
            Error::InvalidArgument(format!("volume size {s:?}: {e}; use 256Mi or 10Gi"))
        }),
        Some(other) => Err(Error::InvalidArgument(format!(
            "volume size {other} is neither a quantity (\"256Mi\") nor bytes"
        ))),
    }
}

/// Creates the volume (idempotent by name, as CreateVolume is): 201 with its record. While its
/// backing image is being prepared the controller answers 503 with the progress; ask again.
pub(super) async fn create(
    State(s): State<ApiState>,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Volume>)> {
    let req: CreateVolumeRequest = body(
        &bytes,
        "volume request ({\"name\":\"NAME\",\"size\":\"1Gi\"})",
    )?;
    let controller = s.controller()?.clone();
    let mut parameters = BTreeMap::new();
    if let Some(sc) = req.storage_class.as_deref().filter(|n| !n.is_empty()) {
        let sc: StorageClass = s.store.get(Kind::StorageClass, sc)?.ok_or_else(|| {
            Error::NotFound(format!(
                "StorageClass {sc:?} not found; apply it first (bicsi apply -f) or give the parameters"
            ))
        })?;
        parameters.extend(sc.parameters);
    }
    parameters.extend(req.parameters);
    let required_bytes = size_of(req.size.as_ref())?;
    if required_bytes == 0 && req.from_snapshot.is_none() && req.from_volume.is_none() {
        return Err(Error::InvalidArgument(format!(
            "volume {:?}: give its size (256Mi, 10Gi)",
            req.name
        )));
    }
    let fs_type = parameters
        .get("fsType")
        .or_else(|| parameters.get("csi.storage.k8s.io/fstype"))
        .cloned()
        .unwrap_or_default();
    let create = CreateVolume {
        name: req.name,
        required_bytes,
        limit_bytes: 0,
        parameters,
        mutable_parameters: BTreeMap::new(),
        capabilities: vec![Capability {
            access: AccessType::Mount {
                fs_type,
                mount_flags: vec![],
            },
            mode: AccessMode::SingleNodeWriter,
        }],
        source_volume: req.from_volume.filter(|v| !v.is_empty()),
        source_snapshot: req.from_snapshot.filter(|v| !v.is_empty()),
        source_backup: None,
    };
    // Runs to its end even if the caller goes away, as a CSI call does.
    let v = tokio::spawn(async move { controller.create_volume(create).await })
        .await
        .map_err(|e| Error::Internal(format!("create volume task failed: {e}")))??;
    Ok((StatusCode::CREATED, Json(v)))
}

/// Deletes a volume (idempotent: an unknown one is gone already).
pub(super) async fn delete(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let controller = s.controller()?.clone();
    tokio::spawn(async move { controller.delete_volume(&id).await })
        .await
        .map_err(|e| Error::Internal(format!("delete volume task failed: {e}")))??;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(serde::Deserialize)]
pub(super) struct SnapshotQuery {
    #[serde(default)]
    volume: Option<String>,
}

pub(super) async fn list_snapshots(
    State(s): State<ApiState>,
    Query(q): Query<SnapshotQuery>,
) -> ApiResult<Json<Vec<Snapshot>>> {
    let (list, _) =
        s.controller()?
            .list_snapshots(0, "", q.volume.as_deref().unwrap_or_default(), "")?;
    Ok(Json(list))
}

/// `POST /v1/snapshots`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateSnapshotRequest {
    name: String,
    volume: String,
    /// type=snap|bi, export-type=raw|qcow2 (as `bicsi snapshot create -p`).
    #[serde(default)]
    parameters: BTreeMap<String, String>,
}

pub(super) async fn create_snapshot(
    State(s): State<ApiState>,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Snapshot>)> {
    let req: CreateSnapshotRequest = body(
        &bytes,
        "snapshot request ({\"name\":\"NAME\",\"volume\":\"VOLUME\"})",
    )?;
    let controller = s.controller()?.clone();
    let snap = tokio::spawn(async move {
        controller
            .create_snapshot(CreateSnapshot {
                name: req.name,
                source_volume_id: req.volume,
                parameters: req.parameters,
            })
            .await
    })
    .await
    .map_err(|e| Error::Internal(format!("snapshot task failed: {e}")))??;
    Ok((StatusCode::CREATED, Json(snap)))
}

pub(super) async fn delete_snapshot(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let controller = s.controller()?.clone();
    tokio::spawn(async move { controller.delete_snapshot(&id).await })
        .await
        .map_err(|e| Error::Internal(format!("delete snapshot task failed: {e}")))??;
    Ok(StatusCode::NO_CONTENT)
}
