//! The HTTP API on loopback: backing images, StorageClasses, volumes and snapshots (`volumes`),
//! attach and detach on this node (`attach`),
//! backups, settings, nodes and disks, health, the live stream of the lists the web UI watches
//! (`events`), and the web UI itself (`crate::ui`).
//! Handlers are thin: parse, call the domain, map errors with `Error::http_status`.

mod attach;
mod events;
mod volumes;

pub use attach::LocalAttach;

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
    /// Attach and detach on this machine (`bicsi serve` only: its CSI socket serves a node).
    pub attach: Option<LocalAttach>,
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
    crate::ui::routes()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/events", get(events::stream))
        .route("/v1/volumes", get(list_volumes).post(volumes::create))
        .route("/v1/volumes/{id}", axum::routing::delete(volumes::delete))
        .route(
            "/v1/volumes/{id}/attach",
            axum::routing::post(attach::attach),
        )
        .route(
            "/v1/volumes/{id}/detach",
            axum::routing::post(attach::detach),
        )
        .route("/v1/attachments", get(attach::list))
        .route(
            "/v1/snapshots",
            get(volumes::list_snapshots).post(volumes::create_snapshot),
        )
        .route(
            "/v1/snapshots/{id}",
            axum::routing::delete(volumes::delete_snapshot),
        )
        .route(
            "/v1/volumes/{id}/rebuild",
            axum::routing::post(rebuild_volume),
        )
        .route(
            "/v1/backingimages",
            get(list_backing_images).post(create_backing_image),
        )
        .route(
            "/v1/backingimages/{name}",
            get(get_backing_image).delete(delete_backing_image),
        )
        .route(
            "/v1/backingimages/{name}/file",
            get(download_file)
                .put(upload_file)
                // An upload is as large as the image; only the disk's free space bounds it.
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/storageclasses",
            get(list_storage_classes).post(apply_storage_class),
        )
        .route(
            "/v1/storageclasses/{name}",
            get(get_storage_class).delete(delete_storage_class),
        )
        .route(
            "/v1/backingimages/{name}/cleanup",
            axum::routing::post(cleanup_backing_image),
        )
        .route("/v1/settings", get(list_settings))
        .route("/v1/settings/{name}", get(get_setting).put(put_setting))
        .route("/v1/files/{dir}", get(transfer_file))
        .route("/v1/files/{dir}/manifest", get(transfer_manifest))
        .route("/v1/backups", get(list_backups).post(create_backup))
        .route("/v1/backups/{name}", get(get_backup).delete(delete_backup))
        .route(
            "/v1/backups/{name}/restore",
            axum::routing::post(restore_backup),
        )
        .route("/v1/restores/{volume}", get(get_restore))
        .route("/v1/backupvolumes", get(list_backup_volumes))
        .route(
            "/v1/backingimages/{name}/backup",
            axum::routing::post(backup_backing_image),
        )
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/disks", get(list_disks))
        .with_state(state)
}

async fn list_nodes(State(s): State<ApiState>) -> ApiResult<Json<Vec<crate::model::NodeRecord>>> {
    Ok(Json(nodes(&s)?))
}

/// The nodes the controller knows, each with whether it is up now.
fn nodes(s: &ApiState) -> ApiResult<Vec<crate::model::NodeRecord>> {
    let cluster = s.controller()?.cluster().clone();
    let mut nodes: Vec<crate::model::NodeRecord> = s.store.list(Kind::Node)?;
    for n in &mut nodes {
        n.up = cluster.is_up(&n.node_id);
    }
    Ok(nodes)
}

async fn list_disks(State(s): State<ApiState>) -> ApiResult<Json<Vec<crate::agent::DiskSpace>>> {
    Ok(Json(s.controller()?.cluster().disks().await?))
}

/// Streams a ready backing image file of this node to another node: data extents only, in the
/// framed format of `sync`. The receiver verifies the SHA-512 itself.
async fn transfer_file(State(s): State<ApiState>, Path(dir): Path<String>) -> ApiResult<Response> {
    let (files, ready) = ready_files(&s, &dir)?;
    let path = ready
        .into_iter()
        .next()
        .ok_or_else(|| Error::NotFound(format!("no ready file {dir:?} on this node")))?;
    // Sending counts against this node's concurrent syncs too; a receiver that waits too long
    // fails its sync, which recovery starts again.
    let slots = files.syncs();
    let slot = tokio::time::timeout(
        SENDER_SLOT_WAIT,
        slots.take(|| files.sync_limit()),
    )
    .await
    .map_err(|_| {
        Error::Unavailable(format!(
            "{} backing image file syncs run on this node (concurrent-backing-image-syncs-per-node); retry later",
            slots.running()
        ))
    })?;
    let body = axum::body::Body::from_stream(futures::StreamExt::map(
        crate::sync::extent_stream(path),
        move |chunk| {
            // The slot is held until the stream is dropped (sent or broken off).
            let _held = &slot;
            chunk
        },
    ));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response())
}

/// Serves the chunk manifest beside a ready backing image file of this node (404 without one),
/// for a receiver to check a transfer chunk by chunk. The receiver checks its seal and that it
/// names the SHA-512 it expects; a bad one only makes it verify the whole SHA-512.
async fn transfer_manifest(
    State(s): State<ApiState>,
    Path(dir): Path<String>,
) -> ApiResult<Response> {
    let (_, ready) = ready_files(&s, &dir)?;
    let paths: Vec<std::path::PathBuf> = ready
        .iter()
        .map(|p| crate::model::manifest_path(p))
        .collect();
    let bytes =
        crate::fsutil::blocking(move || Ok(paths.iter().find_map(|p| std::fs::read(p).ok())))
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!("no manifest of a ready file {dir:?} on this node"))
            })?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        bytes,
    )
        .into_response())
}

/// This process's file managers and the ready `backing` files of the backing image file
/// directory `dir` on its disks (a name from another node's sync request, checked to be one
/// path component).
fn ready_files<'a>(
    s: &'a ApiState,
    dir: &str,
) -> ApiResult<(&'a Arc<FileManagers>, Vec<std::path::PathBuf>)> {
    let files = s
        .files
        .as_ref()
        .ok_or_else(|| Error::NotFound("this process holds no backing image files".into()))?;
    if dir.contains('/') || dir.contains("..") {
        return Err(Error::InvalidArgument(format!(
            "{dir:?} is not a backing image file"
        )));
    }
    let ready = files
        .disks()
        .iter()
        .map(|d| d.image_file_in(dir))
        .filter(|p| p.is_file())
        .collect();
    Ok((files, ready))
}

/// How long a sender waits for a free sync slot before answering 503.
const SENDER_SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The header with the SHA-512 of an uploaded or downloaded file.
pub const CHECKSUM_HEADER: &str = "x-bicsi-checksum";

/// 501: what this process does not do (yet), with the error body of every other error.
fn not_implemented(message: &str) -> Response {
    (
        StatusCode::NOT_IMPLEMENTED,
        Json(serde_json::json!({ "error": message, "code": "Unimplemented" })),
    )
        .into_response()
}

/// `PUT /v1/backingimages/{name}/file`: the body (raw, streamed, any size) becomes the first
/// file of an image created with sourceType upload. `X-Bicsi-Checksum` (SHA-512) is checked
/// besides the image's own checksum. Answers the image once its file is ready.
async fn upload_file(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let (Some(backing), Some(files)) = (s.backing.clone(), s.files.clone()) else {
        return Ok(not_implemented(
            "upload through the node that should hold the file is not supported yet: upload to `bicsi serve`, which holds both the images and the disks",
        ));
    };
    let checksum = headers
        .get(CHECKSUM_HEADER)
        .map(|v| {
            v.to_str()
                .map_err(|_| Error::InvalidArgument("X-Bicsi-Checksum is not text".into()))
                .and_then(|t| crate::files::parse_checksum(t, "X-Bicsi-Checksum"))
        })
        .transpose()?;
    let length = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let req = crate::files::UploadRequest { length, checksum };
    // The upload runs as a task of its own: a client that goes away mid-body drops this handler,
    // and the task still sees the broken body, fails the file and removes the temp file.
    let task = {
        let name = name.clone();
        tokio::spawn(async move { files.upload(&name, body.into_data_stream(), req).await })
    };
    task.await
        .map_err(|e| Error::Internal(format!("upload task failed: {e}")))??;
    Ok((StatusCode::OK, Json(backing.must_get(&name)?)).into_response())
}

/// A single `Range: bytes=...` of a file of `size` bytes: `Ok(None)` for no (or an ignorable)
/// Range, `Ok(Some((first, last)))` inclusive, `Err(())` when unsatisfiable.
fn parse_range(value: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    // Several ranges: served whole (allowed by RFC 9110 §14.2).
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // The last b bytes.
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || size == 0 {
            return Err(());
        }
        return Ok(Some((size.saturating_sub(n), size - 1)));
    }
    let Ok(first) = a.parse::<u64>() else {
        return Ok(None);
    };
    let last = if b.is_empty() {
        size.saturating_sub(1)
    } else {
        match b.parse::<u64>() {
            Ok(l) if l >= first => l.min(size.saturating_sub(1)),
            _ => return Ok(None),
        }
    };
    if first >= size {
        return Err(());
    }
    Ok(Some((first, last)))
}

/// `len` bytes of `path` from `offset`, in 256 KiB chunks.
fn file_stream(
    file: tokio::fs::File,
    len: u64,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send {
    use tokio::io::AsyncReadExt;
    futures::stream::unfold((file, len), |(mut f, left)| async move {
        if left == 0 {
            return None;
        }
        let mut buf = vec![0u8; left.min(256 * 1024) as usize];
        match f.read(&mut buf).await {
            Ok(0) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file ended early",
                )),
                (f, 0),
            )),
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), (f, left - n as u64)))
            }
            Err(e) => Some((Err(e), (f, 0))),
        }
    })
}

/// `GET /v1/backingimages/{name}/file`: the image's ready file on this process's disks, whole or
/// one byte range, with its checksum in `X-Bicsi-Checksum`.
async fn download_file(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
) -> ApiResult<Response> {
    use axum::http::header;
    let Some(files) = s.files.as_ref() else {
        return Ok(not_implemented(
            "download through the controller of the split mode is not supported yet: ask the HTTP API of a node that holds a ready file",
        ));
    };
    let (bi, path) = files.ready_file(&name)?;
    let open = path.clone();
    let file = tokio::fs::File::open(&open)
        .await
        .map_err(|e| Error::Internal(format!("{}: {e}", open.display())))?;
    let size = file
        .metadata()
        .await
        .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?
        .len();
    let range = parse_range(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        size,
    );
    let common = [
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::ACCEPT_RANGES, "bytes".to_string()),
        (
            header::HeaderName::from_static(CHECKSUM_HEADER),
            bi.status.checksum.clone(),
        ),
    ];
    match range {
        Err(()) => Ok((
            StatusCode::RANGE_NOT_SATISFIABLE,
            common,
            [(header::CONTENT_RANGE, format!("bytes */{size}"))],
        )
            .into_response()),
        Ok(None) => Ok((
            StatusCode::OK,
            common,
            [(header::CONTENT_LENGTH, size.to_string())],
            axum::body::Body::from_stream(file_stream(file, size)),
        )
            .into_response()),
        Ok(Some((first, last))) => {
            use tokio::io::AsyncSeekExt;
            let mut file = file;
            file.seek(std::io::SeekFrom::Start(first))
                .await
                .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
            let len = last - first + 1;
            Ok((
                StatusCode::PARTIAL_CONTENT,
                common,
                [
                    (header::CONTENT_LENGTH, len.to_string()),
                    (
                        header::CONTENT_RANGE,
                        format!("bytes {first}-{last}/{size}"),
                    ),
                ],
                axum::body::Body::from_stream(file_stream(file, len)),
            )
                .into_response())
        }
    }
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

#[derive(serde::Deserialize, Default)]
struct RebuildRequest {
    #[serde(default)]
    from: Option<String>,
}

/// Rebuilds a detached volume's replicas; runs to its end even if the caller goes away.
async fn rebuild_volume(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<RebuildAnswer>> {
    let req: RebuildRequest = if bytes.is_empty() {
        RebuildRequest::default()
    } else {
        body(&bytes, "rebuild request ({\"from\":\"REPLICA\"})")?
    };
    let controller = s.controller()?.clone();
    let (volume, report) =
        tokio::spawn(async move { controller.rebuild(&id, req.from.as_deref()).await })
            .await
            .map_err(|e| Error::Internal(format!("rebuild task failed: {e}")))??;
    Ok(Json(RebuildAnswer {
        volume,
        rebuilt: report.rebuilt,
        skipped: report.skipped,
    }))
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

#[derive(serde::Deserialize)]
struct CleanupRequest {
    disks: Vec<String>,
}

/// `POST /v1/backingimages/{name}/cleanup` `{"disks":[...]}`: which disks were cleaned, which
/// were refused and why.
async fn cleanup_backing_image(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<crate::backing::lifecycle::CleanupResult>> {
    let req: CleanupRequest = body(&bytes, "cleanup request ({\"disks\":[\"DISK\"]})")?;
    Ok(Json(s.backing()?.cleanup_disks(&name, &req.disks).await?))
}

/// Settings live in the controller's store: a node agent alone sends callers there.
fn settings(s: &ApiState) -> ApiResult<&crate::settings::Settings> {
    Ok(s.backing()?.settings())
}

async fn list_settings(
    State(s): State<ApiState>,
) -> ApiResult<Json<Vec<crate::settings::SettingView>>> {
    Ok(Json(settings(&s)?.list()?))
}

async fn get_setting(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<crate::settings::SettingView>> {
    Ok(Json(settings(&s)?.get(&name)?))
}

#[derive(serde::Deserialize)]
struct SettingValue {
    value: serde_json::Value,
}

/// `PUT /v1/settings/{name}` `{"value":"..."}` (a JSON number is taken too).
async fn put_setting(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<crate::settings::SettingView>> {
    let req: SettingValue = body(&bytes, "setting value ({\"value\":\"...\"})")?;
    let value = match req.value {
        serde_json::Value::String(v) => v,
        serde_json::Value::Number(n) => n.to_string(),
        other => {
            return Err(Error::InvalidArgument(format!(
                "setting {name:?}: value must be a string, got {other}"
            )));
        }
    };
    let settings = settings(&s)?;
    // A backup target is reached before it is stored: a wrong path or store fails here, not
    // at the first backup.
    if name == crate::settings::BACKUP_TARGET {
        let checked = crate::settings::check(&name, &value)?;
        let creds = settings.backup_credential_file()?;
        crate::backup::target::check_new_target(&checked, creds.as_deref()).await?;
    }
    Ok(Json(settings.set(&name, &value)?))
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

#[derive(serde::Deserialize)]
struct BackupQuery {
    volume: Option<String>,
}

async fn list_backups(
    State(s): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<BackupQuery>,
) -> ApiResult<Json<Vec<crate::backup::Backup>>> {
    Ok(Json(
        s.controller()?
            .list_backups(q.volume.as_deref().filter(|v| !v.is_empty()))
            .await?,
    ))
}

/// `POST /v1/backups` `{"volume":"V","name":"B","full":false,"compression":"lz4"}`: starts the
/// backup (202); its record shows the progress.
async fn create_backup(
    State(s): State<ApiState>,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<crate::backup::Backup>)> {
    let req: crate::controller::backup::CreateBackup =
        body(&bytes, "backup request ({\"volume\":\"VOLUME\"})")?;
    Ok((
        StatusCode::ACCEPTED,
        Json(s.controller()?.start_backup(req)?),
    ))
}

async fn get_backup(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<crate::backup::Backup>> {
    let c = s.controller()?;
    if let Some(b) = c.get_backup_record(&name)? {
        return Ok(Json(b));
    }
    c.list_backups(None)
        .await?
        .into_iter()
        .find(|b| b.name == name)
        .map(Json)
        .ok_or_else(|| Error::NotFound(format!("backup {name:?} not found")))
}

async fn delete_backup(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    s.controller()?.delete_backup(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RestoreRequest {
    volume: String,
    #[serde(default)]
    backing_image: Option<String>,
    #[serde(default)]
    size_bytes: u64,
    #[serde(default)]
    parameters: std::collections::BTreeMap<String, String>,
}

/// `POST /v1/backups/{name}/restore` `{"volume":"NEW","backingImage":"IMG","parameters":{..}}`:
/// starts the restore (202); `GET /v1/restores/{volume}` shows it. Without parameters the
/// volume takes those the backup recorded (replica count, engine, ...); given ones win.
async fn restore_backup(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<crate::backup::Restore>)> {
    let req: RestoreRequest = body(&bytes, "restore request ({\"volume\":\"NEW-VOLUME\"})")?;
    let rec = s
        .controller()?
        .start_restore(crate::controller::backup::RestoreBackup {
            backup: name,
            volume: req.volume,
            backing_image: req.backing_image.filter(|b| !b.is_empty()),
            size_bytes: req.size_bytes,
            parameters: req.parameters,
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(rec)))
}

async fn get_restore(
    State(s): State<ApiState>,
    Path(volume): Path<String>,
) -> ApiResult<Json<crate::backup::Restore>> {
    s.controller()?
        .get_restore(&volume)?
        .map(Json)
        .ok_or_else(|| Error::NotFound(format!("no restore into volume {volume:?}")))
}

/// `POST /v1/backingimages/{name}/backup`: puts the image's file into the backup target (once
/// per target) and answers its metadata there.
async fn backup_backing_image(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<crate::backup::image::ImageMeta>> {
    Ok(Json(s.controller()?.backup_image(&name).await?))
}

async fn list_backup_volumes(
    State(s): State<ApiState>,
) -> ApiResult<Json<Vec<crate::backup::layout::BackupVolumeMeta>>> {
    Ok(Json(s.controller()?.backup_volumes().await?))
}

/// What `POST /v1/volumes/{id}/rebuild` answers.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct RebuildAnswer {
    pub volume: crate::model::Volume,
    pub rebuilt: Vec<String>,
    pub skipped: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=2-5"), 10), Ok(Some((2, 5))));
        assert_eq!(parse_range(Some("bytes=2-"), 10), Ok(Some((2, 9))));
        assert_eq!(parse_range(Some("bytes=2-100"), 10), Ok(Some((2, 9))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Ok(None));
        assert_eq!(parse_range(Some("items=0-1"), 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Ok(None));
    }
}

/// Fuzzing entry (feature `fuzzing`, `fuzz/`): any Range header against any file size (the
/// first 8 bytes) gives no range, an unsatisfiable one, or one inside the file.
#[cfg(feature = "fuzzing")]
pub fn fuzz_range(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let Ok(header) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    if let Ok(Some((first, last))) = parse_range(Some(header), size) {
        assert!(
            first <= last && last < size,
            "{header:?} of {size}: {first}-{last}"
        );
    }
}
