//! bicsi's APIs as the paths call them: backing images over HTTP, volumes over CSI (create,
//! publish until ready, stage, publish, and the way back). It must not time anything.

use super::*;

/// A BackingImage that downloads `url` with its SHA-512, as the HTTP API takes it.
pub(crate) fn download_image(name: &str, url: &str, sha512: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "longhorn.io/v1beta2",
        "kind": "BackingImage",
        "metadata": { "name": name },
        "spec": {
            "sourceType": "download",
            "sourceParameters": { "url": url },
            "checksum": sha512,
        },
    })
}

/// POSTs a download BackingImage of `url` with its checksum and waits until a file of it is
/// ready on some disk; returns the object.
pub(crate) async fn create_image(
    http: &reqwest::Client,
    api: &str,
    name: &str,
    url: &str,
    sha512: &str,
    len: u64,
) -> Res<serde_json::Value> {
    let body = download_image(name, url, sha512);
    let resp = http
        .post(format!("{api}/v1/backingimages"))
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(format!(
            "POST backing image {name}: {status}: {}",
            resp.text().await?
        )
        .into());
    }
    let deadline = file_deadline(len);
    let started = Instant::now();
    loop {
        let obj = api_get(http, api, &format!("/v1/backingimages/{name}")).await?;
        let files = obj["status"]["diskFileStatusMap"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        if files.values().any(|f| f["state"] == "ready") {
            return Ok(obj);
        }
        if let Some(f) = files.values().find(|f| f["state"] == "failed") {
            return Err(format!("backing image {name} failed: {}", f["message"]).into());
        }
        if started.elapsed() > deadline {
            return Err(format!("backing image {name} not ready after {deadline:?}: {obj}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn rpc_err(what: &str, s: tonic::Status) -> Box<dyn std::error::Error + Send + Sync> {
    format!("{what}: {:?}: {}", s.code(), s.message()).into()
}

/// Connects to a CSI endpoint, retrying for 30 s while its socket is not there yet.
pub(crate) async fn csi_connect(endpoint: &str) -> Res<CsiClient> {
    let started = Instant::now();
    loop {
        match CsiClient::connect(endpoint).await {
            Ok(c) => return Ok(c),
            Err(e) if started.elapsed() > Duration::from_secs(30) => {
                return Err(format!("CSI endpoint {endpoint}: {e}").into());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

pub(crate) fn capability(access: pb::volume_capability::AccessType) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(access),
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

pub(crate) fn mount_capability() -> pb::VolumeCapability {
    capability(pb::volume_capability::AccessType::Mount(
        pb::volume_capability::MountVolume::default(),
    ))
}

pub(crate) fn block_capability() -> pb::VolumeCapability {
    capability(pb::volume_capability::AccessType::Block(
        pb::volume_capability::BlockVolume {},
    ))
}

/// CreateVolume of `name` from backing image `image` with `replicas` replicas and the image's
/// size; returns the volume id.
pub(crate) async fn create_volume(
    c: &mut CsiClient,
    name: &str,
    image: &str,
    replicas: u32,
    cap: &pb::VolumeCapability,
) -> Res<String> {
    let parameters = HashMap::from([
        ("backingImage".to_string(), image.to_string()),
        ("numberOfReplicas".to_string(), replicas.to_string()),
    ]);
    let req = pb::CreateVolumeRequest {
        name: name.into(),
        volume_capabilities: vec![cap.clone()],
        parameters,
        ..Default::default()
    };
    Ok(create(c, req, "CreateVolume").await?.volume_id)
}

/// CreateVolume of `req`; an error names the call as `what`.
pub(crate) async fn create(
    c: &mut CsiClient,
    req: pb::CreateVolumeRequest,
    what: &str,
) -> Res<pb::Volume> {
    Ok(c.controller
        .create_volume(req)
        .await
        .map_err(|s| rpc_err(what, s))?
        .into_inner()
        .volume
        .ok_or("CreateVolume answered no volume")?)
}

/// A new empty volume `name` of `len` bytes with one replica, as a block capability asks.
pub(crate) fn one_replica_block(name: &str, len: u64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: len as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block_capability()],
        parameters: HashMap::from([("numberOfReplicas".to_string(), "1".to_string())]),
        ..Default::default()
    }
}

/// A volume published as a block device at `target` (staged at `staging`), paths as strings.
pub(crate) struct BlockVolume {
    pub(crate) id: String,
    pub(crate) staging: String,
    pub(crate) target: String,
}

/// Creates a new empty block volume `name` of `len` bytes with one replica and publishes it
/// (ControllerPublish until ready, NodeStage, NodePublish) under `dir` (`staging`, `target`).
pub(crate) async fn publish_block_volume(
    csi: &mut CsiClient,
    name: &str,
    len: u64,
    dir: &Path,
) -> Res<BlockVolume> {
    let cap = block_capability();
    let id = create(csi, one_replica_block(name, len), "CreateVolume")
        .await?
        .volume_id;
    let p = publish_until_ready(csi, &id, "bench", &cap, Duration::from_secs(60)).await?;
    let staging = dir.join("staging");
    std::fs::create_dir_all(&staging)?;
    let staging = staging.display().to_string();
    let target = dir.join("target").display().to_string();
    node_stage(csi, &id, &p, &staging, &cap).await?;
    node_publish(csi, &id, &p, &staging, &target, &cap).await?;
    Ok(BlockVolume {
        id,
        staging,
        target,
    })
}

pub(crate) struct Published {
    pub(crate) elapsed: Duration,
    pub(crate) calls: usize,
    /// How long the first call (which starts the work) and the last (successful) one took.
    pub(crate) first_call: Duration,
    pub(crate) last_call: Duration,
    pub(crate) context: HashMap<String, String>,
}

/// ControllerPublishVolume, called again every [`POLL`] while it answers Unavailable (the
/// backing image's file is on its way to a replica's disk); timed from the first call.
pub(crate) async fn publish_until_ready(
    c: &mut CsiClient,
    volume_id: &str,
    node_id: &str,
    cap: &pb::VolumeCapability,
    deadline: Duration,
) -> Res<Published> {
    let req = pb::ControllerPublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node_id.into(),
        volume_capability: Some(cap.clone()),
        readonly: false,
        ..Default::default()
    };
    let started = Instant::now();
    let mut calls = 0;
    let mut first_call = Duration::ZERO;
    loop {
        calls += 1;
        let call = Instant::now();
        let result = c.controller.controller_publish_volume(req.clone()).await;
        let took = call.elapsed();
        if calls == 1 {
            first_call = took;
        }
        match result {
            Ok(r) => {
                return Ok(Published {
                    elapsed: started.elapsed(),
                    calls,
                    first_call,
                    last_call: took,
                    context: r.into_inner().publish_context,
                });
            }
            Err(s) if s.code() == tonic::Code::Unavailable => {
                if started.elapsed() > deadline {
                    return Err(format!(
                        "ControllerPublishVolume still Unavailable after {deadline:?}: {}",
                        s.message()
                    )
                    .into());
                }
                tokio::time::sleep(POLL).await;
            }
            Err(s) => return Err(rpc_err("ControllerPublishVolume", s)),
        }
    }
}

/// CreateVolume of a block volume `name` of `len` bytes with `parameters`: its id.
pub(crate) async fn create_block_volume(
    csi: &mut CsiClient,
    name: &str,
    len: u64,
    parameters: &[(&str, &str)],
) -> Res<String> {
    Ok(csi
        .controller
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: len as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![block_capability()],
            parameters: parameters
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_err("CreateVolume", s))?
        .into_inner()
        .volume
        .ok_or("CreateVolume answered no volume")?
        .volume_id)
}

/// Unpublishes and unstages `volume_id` on the node (node "bench"), then unpublishes and deletes it.
/// NodeStageVolume of a published volume at `staging`.
pub(crate) async fn node_stage(
    c: &mut CsiClient,
    volume_id: &str,
    published: &Published,
    staging: &str,
    cap: &pb::VolumeCapability,
) -> Res<()> {
    c.node
        .node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: volume_id.into(),
            publish_context: published.context.clone(),
            staging_target_path: staging.into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_err("NodeStageVolume", s))?;
    Ok(())
}

/// NodePublishVolume of a staged volume at `target`, read-write.
pub(crate) async fn node_publish(
    c: &mut CsiClient,
    volume_id: &str,
    published: &Published,
    staging: &str,
    target: &str,
    cap: &pb::VolumeCapability,
) -> Res<()> {
    c.node
        .node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: volume_id.into(),
            publish_context: published.context.clone(),
            staging_target_path: staging.into(),
            target_path: target.into(),
            volume_capability: Some(cap.clone()),
            readonly: false,
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_err("NodePublishVolume", s))?;
    Ok(())
}

pub(crate) async fn detach_and_delete(
    c: &mut CsiClient,
    volume_id: &str,
    target_path: String,
    staging_target_path: String,
) -> Res<()> {
    node_detach(c, volume_id, target_path, staging_target_path).await?;
    unpublish_and_delete(c, volume_id, "bench").await
}

/// NodeUnpublishVolume and NodeUnstageVolume on the node `c` talks to.
pub(crate) async fn node_detach(
    c: &mut CsiClient,
    volume_id: &str,
    target_path: String,
    staging_target_path: String,
) -> Res<()> {
    c.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            target_path,
        })
        .await
        .map_err(|s| rpc_err("NodeUnpublishVolume", s))?;
    c.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path,
        })
        .await
        .map_err(|s| rpc_err("NodeUnstageVolume", s))?;
    Ok(())
}

pub(crate) async fn unpublish_and_delete(
    c: &mut CsiClient,
    volume_id: &str,
    node_id: &str,
) -> Res<()> {
    c.controller
        .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            node_id: node_id.into(),
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_err("ControllerUnpublishVolume", s))?;
    c.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: volume_id.into(),
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_err("DeleteVolume", s))?;
    Ok(())
}
