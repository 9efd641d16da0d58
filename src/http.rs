//! The HTTP API on loopback: backing images, StorageClasses, volumes (read-only) and health.
//! Handlers are thin: parse, call the domain, map errors with `Error::http_status`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::de::DeserializeOwned;

use crate::backing::BackingImages;
use crate::backing::object::BackingImage;
use crate::controller::Controller;
use crate::error::Error;
use crate::files::FileManagers;
use crate::storageclass::{self, StorageClass};
use crate::store::{Kind, Store, StoreExt};

#[derive(Clone)]
pub struct ApiState {
    /// Absent on a node agent alone: it serves only files and health.
    pub controller: Option<Arc<Controller>>,
    pub backing: Option<Arc<BackingImages>>,
    /// This node's backing image files, served to other nodes (absent on a controller alone).
    pub files: Option<Arc<FileManagers>>,
    pub store: Arc<dyn Store>,
    pub driver_name: String,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(serde_json::json!({ "error": self.to_string(), "code": format!("{:?}", self.code()) })),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, Error>;

impl ApiState {
    fn controller(&self) -> ApiResult<&Arc<Controller>> {
        self.controller.as_ref().ok_or_else(|| {
            Error::NotFound("this is a node agent; ask the controller's HTTP API".into())
        })
    }

    fn backing(&self) -> ApiResult<&Arc<BackingImages>> {
        self.backing.as_ref().ok_or_else(|| {
            Error::NotFound("this is a node agent; ask the controller's HTTP API".into())
        })
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/volumes", get(list_volumes))
        .route(
            "/v1/backingimages",
            get(list_backing_images).post(create_backing_image),
        )
        .route(
            "/v1/backingimages/{name}",
            get(get_backing_image).delete(delete_backing_image),
        )
        .route(
            "/v1/storageclasses",
            get(list_storage_classes).post(apply_storage_class),
        )
        .route(
            "/v1/storageclasses/{name}",
            get(get_storage_class).delete(delete_storage_class),
        )
        .route("/v1/files/{dir}", get(transfer_file))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/disks", get(list_disks))
        .with_state(state)
}

async fn list_nodes(State(s): State<ApiState>) -> ApiResult<Json<Vec<crate::model::NodeRecord>>> {
    let cluster = s.controller()?.cluster().clone();
    let mut nodes: Vec<crate::model::NodeRecord> = s.store.list(Kind::Node)?;
    for n in &mut nodes {
        n.up = cluster.is_up(&n.node_id);
    }
    Ok(Json(nodes))
}

async fn list_disks(State(s): State<ApiState>) -> ApiResult<Json<Vec<crate::agent::DiskSpace>>> {
    Ok(Json(s.controller()?.cluster().disks().await?))
}

/// Streams a ready backing image file of this node to another node: data extents only, in the
/// framed format of `sync`. The receiver verifies the SHA-512 itself.
async fn transfer_file(State(s): State<ApiState>, Path(dir): Path<String>) -> ApiResult<Response> {
    let files = s
        .files
        .as_ref()
        .ok_or_else(|| Error::NotFound("this process holds no backing image files".into()))?;
    if dir.contains('/') || dir.contains("..") {
        return Err(Error::InvalidArgument(format!(
            "{dir:?} is not a backing image file"
        )));
    }
    let path = files
        .disks()
        .iter()
        .map(|d| d.path.join("backing-images").join(&dir).join("backing"))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::NotFound(format!("no ready file {dir:?} on this node")))?;
    let body = axum::body::Body::from_stream(crate::sync::extent_stream(path));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response())
}

/// Parses a JSON body with our error format (axum's own rejection is plain text).
fn body<T: DeserializeOwned>(bytes: &Bytes, what: &str) -> ApiResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::InvalidArgument(format!("the request body is not a valid {what}: {e}")))
}

async fn list_volumes(State(s): State<ApiState>) -> ApiResult<Json<serde_json::Value>> {
    let (volumes, _) = s.controller()?.list_volumes(0, "")?;
    Ok(Json(serde_json::to_value(volumes)?))
}

async fn list_backing_images(State(s): State<ApiState>) -> ApiResult<Json<Vec<BackingImage>>> {
    Ok(Json(s.backing()?.list()?))
}

async fn create_backing_image(
    State(s): State<ApiState>,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<BackingImage>)> {
    let bi: BackingImage = body(&bytes, "BackingImage")?;
    let (bi, created) = s.backing()?.create(bi).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(bi)))
}

async fn get_backing_image(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<BackingImage>> {
    Ok(Json(s.backing()?.must_get(&name)?))
}

async fn delete_backing_image(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    s.backing()?.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_storage_classes(State(s): State<ApiState>) -> ApiResult<Json<Vec<StorageClass>>> {
    Ok(Json(s.store.list(Kind::StorageClass)?))
}

async fn apply_storage_class(
    State(s): State<ApiState>,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<StorageClass>)> {
    let sc: StorageClass = body(&bytes, "StorageClass")?;
    storageclass::validate(&sc, &s.driver_name)?;
    let name = sc.metadata.name.clone();
    if let Some(existing) = s.store.get::<StorageClass>(Kind::StorageClass, &name)? {
        if existing.parameters != sc.parameters || existing.provisioner != sc.provisioner {
            return Err(Error::AlreadyExists(format!(
                "StorageClass {name:?} exists with other parameters ({:?}); StorageClass parameters cannot change: delete it first",
                existing.parameters
            )));
        }
        return Ok((StatusCode::OK, Json(existing)));
    }
    s.store.put(Kind::StorageClass, &name, &sc)?;
    Ok((StatusCode::CREATED, Json(sc)))
}

async fn get_storage_class(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<StorageClass>> {
    s.store
        .get(Kind::StorageClass, &name)?
        .map(Json)
        .ok_or_else(|| Error::NotFound(format!("StorageClass {name:?} not found")))
}

async fn delete_storage_class(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    s.store.delete(Kind::StorageClass, &name)?;
    Ok(StatusCode::NO_CONTENT)
}
