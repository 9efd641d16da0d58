//! The split mode's wire: the controller's Cluster service and the node agents' Agent service
//! (`proto/bicsi.proto`), and the client side of each, implementing the same traits as the
//! in-process versions (`Agent`, `Store`, `FileReports`), so the domain runs unchanged in both
//! modes. Records travel as the JSON documents the store keeps.
//!
//! The roles (see `agent`'s doc): [`RemoteAgent`] is the controller's handle on a node over
//! gRPC, [`AgentService`] the node's end that answers it through its `LocalAgent`;
//! [`RemoteStore`] and [`RemoteReports`] are the node's view of the controller's records and
//! the way its file reports go back.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::agent::{Agent, DiskSpace, LocalAgent};
use crate::backing::BackingImages;
use crate::cluster::{Cluster, HEARTBEAT_INTERVAL};
use crate::error::{Error, Result};
use crate::files::source::ImageSource;
use crate::files::{FileReport, FileReports};
use crate::model::{Disk, NodeRecord, Replica};
use crate::os::ReplicaTarget;
use crate::snapshot::{GroupMember, SnapshotFile};
use crate::store::{Kind, Store};

/// The generated types of `proto/bicsi.proto`, under the name this module's callers use.
pub use crate::proto as pb;

use pb::agent_client::AgentClient;
use pb::agent_server::Agent as AgentRpc;
use pb::cluster_client::ClusterClient;
use pb::cluster_server::Cluster as ClusterRpc;

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(v)?)
}

fn from_json<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::InvalidArgument(format!("malformed {what} record: {e}")))
}

/// Backups' server-streamed answers (`BackupStep`): progress messages, then the result.
type Steps = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = std::result::Result<pb::BackupStep, Status>> + Send>,
>;

/// Runs `work` in a task of its own, streaming each progress it reports and then its result
/// (or its error as the stream's final status). The work finishes even when the caller goes
/// away: a backup's metadata is put last, a restore's file renamed into place last.
fn stream_steps<T, F>(work: impl FnOnce(crate::backup::blocks::ProgressFn) -> F) -> Response<Steps>
where
    T: Serialize,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let progress_tx = tx.clone();
    let progress: crate::backup::blocks::ProgressFn = Arc::new(move |p| {
        if let Ok(progress_json) = serde_json::to_vec(&p) {
            let _ = progress_tx.send(Ok(pb::BackupStep {
                progress_json,
                result_json: Vec::new(),
            }));
        }
    });
    let fut = work(progress);
    tokio::spawn(async move {
        let step = fut
            .await
            .and_then(|v| to_json(&v))
            .map(|result_json| pb::BackupStep {
                progress_json: Vec::new(),
                result_json,
            });
        let _ = tx.send(step.map_err(Status::from));
    });
    Response::new(Box::pin(
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
    ))
}

/// Follows a `BackupStep` stream to its result, handing each progress to `progress`.
async fn follow_steps<T: DeserializeOwned>(
    answer: std::result::Result<Response<tonic::Streaming<pb::BackupStep>>, Status>,
    progress: Option<&crate::backup::blocks::ProgressFn>,
    what: &str,
) -> Result<T> {
    let mut steps = answer.map_err(status_error)?.into_inner();
    while let Some(step) = steps.message().await.map_err(status_error)? {
        if !step.result_json.is_empty() {
            return from_json(&step.result_json, what);
        }
        if let Some(f) = progress {
            f(from_json(&step.progress_json, "backup progress")?);
        }
    }
    Err(Error::Unavailable(format!(
        "the node agent's answer ended without the {what}; it may have restarted: try again"
    )))
}

fn status_error(s: Status) -> Error {
    Error::from_code(s.code(), s.message().to_string())
}

fn kind(name: &str) -> Result<Kind> {
    Kind::parse(name).ok_or_else(|| Error::InvalidArgument(format!("unknown record kind {name:?}")))
}

/// A lazily connecting plain-TCP channel to `url` (`http://host:port`); the split mode's
/// processes connect through their [`crate::tls::Transport`] instead.
pub fn channel(url: &str) -> Result<Channel> {
    crate::tls::Transport::Insecure.channel(url, crate::tls::Role::Node)
}

fn disk_infos(disks: &[DiskSpace]) -> Result<Vec<pb::DiskInfo>> {
    disks
        .iter()
        .map(|d| {
            Ok(pb::DiskInfo {
                disk_json: to_json(&d.disk)?,
                free_bytes: d.free_bytes,
                manager: d.manager,
                shares_blocks: d.shares_blocks,
            })
        })
        .collect()
}

fn disk_spaces(infos: &[pb::DiskInfo]) -> Result<Vec<DiskSpace>> {
    infos
        .iter()
        .map(|i| {
            Ok(DiskSpace {
                disk: from_json(&i.disk_json, "disk")?,
                free_bytes: i.free_bytes,
                manager: i.manager,
                shares_blocks: i.shares_blocks,
            })
        })
        .collect()
}

// ---- controller side: the Cluster service -----------------------------------------------------

pub struct ClusterService {
    pub cluster: Arc<Cluster>,
    pub store: Arc<dyn Store>,
    pub backing: Arc<BackingImages>,
    /// How the controller reaches the agents that register (mutual TLS or plain TCP).
    pub transport: crate::tls::Transport,
}

#[tonic::async_trait]
impl ClusterRpc for ClusterService {
    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> std::result::Result<Response<pb::RegisterNodeResponse>, Status> {
        let r = request.into_inner();
        crate::csi::required(&r.node_id, "node_id")?;
        crate::csi::required(&r.agent_url, "agent_url")?;
        let disks: Vec<Disk> = disk_spaces(&r.disks)?.into_iter().map(|d| d.disk).collect();
        let record = NodeRecord {
            node_id: r.node_id.clone(),
            agent_url: r.agent_url.clone(),
            transfer_url: r.transfer_url,
            disks,
            up: true,
            last_heartbeat: String::new(),
            // 0 from a node that predates the field: no limit, as before.
            max_volumes_per_node: r.max_volumes_per_node,
        };
        let agent = Arc::new(RemoteAgent {
            client: AgentClient::new(
                self.transport
                    .channel(&r.agent_url, crate::tls::Role::Node)?,
            ),
        });
        self.cluster.register(record, agent, false)?;
        Ok(Response::new(pb::RegisterNodeResponse {
            heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> std::result::Result<Response<pb::HeartbeatResponse>, Status> {
        self.cluster.heartbeat(&request.into_inner().node_id)?;
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    async fn store_get(
        &self,
        request: Request<pb::StoreKey>,
    ) -> std::result::Result<Response<pb::StoreValue>, Status> {
        let r = request.into_inner();
        let v = self.store.get_raw(kind(&r.kind)?, &r.key)?;
        Ok(Response::new(pb::StoreValue {
            found: v.is_some(),
            value: v.unwrap_or_default(),
        }))
    }

    async fn store_list(
        &self,
        request: Request<pb::StoreKind>,
    ) -> std::result::Result<Response<pb::StoreEntries>, Status> {
        let r = request.into_inner();
        let entries = self
            .store
            .list_raw(kind(&r.kind)?)?
            .into_iter()
            .map(|(key, value)| pb::StoreEntry {
                kind: r.kind.clone(),
                key,
                value,
            })
            .collect();
        Ok(Response::new(pb::StoreEntries { entries }))
    }

    async fn store_put(
        &self,
        request: Request<pb::StoreEntry>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        self.store.put_raw(kind(&r.kind)?, &r.key, &r.value)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn store_delete(
        &self,
        request: Request<pb::StoreKey>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        self.store.delete(kind(&r.kind)?, &r.key)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn report_file(
        &self,
        request: Request<pb::ReportFileRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        let disk: Disk = from_json(&r.disk_json, "disk")?;
        let report: FileReport = from_json(&r.report_json, "file report")?;
        self.backing.apply_report(&r.image, &disk, report).await?;
        Ok(Response::new(pb::Empty {}))
    }
}

/// The controller's handle on a node agent in another process.
pub struct RemoteAgent {
    client: AgentClient<Channel>,
}

fn replica_request(
    replica: &Replica,
    size: u64,
    backing_image: Option<&str>,
) -> Result<pb::ReplicaRequest> {
    Ok(pb::ReplicaRequest {
        replica_json: to_json(replica)?,
        size,
        backing_image: backing_image.unwrap_or_default().to_string(),
        volume_id: String::new(),
    })
}

#[tonic::async_trait]
impl Agent for RemoteAgent {
    async fn disk_space(&self) -> Result<Vec<DiskSpace>> {
        let r = self
            .client
            .clone()
            .disk_space(pb::Empty {})
            .await
            .map_err(status_error)?;
        disk_spaces(&r.into_inner().disks)
    }

    async fn create_replica(
        &self,
        replica: &Replica,
        size: u64,
        backing_image: Option<&str>,
    ) -> Result<bool> {
        let r = self
            .client
            .clone()
            .create_replica(replica_request(replica, size, backing_image)?)
            .await
            .map_err(status_error)?;
        Ok(r.into_inner().exists)
    }

    async fn delete_replica(&self, replica: &Replica) -> Result<()> {
        self.client
            .clone()
            .delete_replica(replica_request(replica, 0, None)?)
            .await
            .map_err(status_error)?;
        Ok(())
    }

    async fn replica_exists(&self, replica: &Replica) -> Result<bool> {
        let r = self
            .client
            .clone()
            .replica_exists(replica_request(replica, 0, None)?)
            .await
            .map_err(status_error)?;
        Ok(r.into_inner().exists)
    }

    async fn resize_replica(&self, replica: &Replica, size: u64) -> Result<()> {
        self.client
            .clone()
            .resize_replica(replica_request(replica, size, None)?)
            .await
            .map_err(status_error)?;
        Ok(())
    }

    async fn copy_replica(&self, _source: &Replica, replica: &Replica) -> Result<()> {
        Err(Error::FailedPrecondition(format!(
            "adding replica {} by copying is only supported in the all-in-one mode for now",
            replica.id
        )))
    }

    async fn prepare_first_file(
        &self,
        image: &str,
        disk_id: &str,
        source: &ImageSource,
        credentials: Option<&crate::download::Credentials>,
    ) -> Result<()> {
        self.client
            .clone()
            .prepare_first_file(pb::FileRequest {
                image: image.to_string(),
                disk_id: disk_id.to_string(),
                credentials_json: credentials.map(to_json).transpose()?.unwrap_or_default(),
                source_json: to_json(source)?,
            })
            .await
            .map_err(status_error)?;
        Ok(())
    }

    async fn delete_image_files(&self, image: &str) -> Result<()> {
        self.client
            .clone()
            .delete_image_files(pb::FileRequest {
                image: image.to_string(),
                disk_id: String::new(),
                credentials_json: Vec::new(),
                source_json: Vec::new(),
            })
            .await
            .map_err(status_error)?;
        Ok(())
    }

    async fn delete_image_file(&self, image: &str, disk_id: &str) -> Result<()> {
        self.client
            .clone()
            .delete_image_files(pb::FileRequest {
                image: image.to_string(),
                disk_id: disk_id.to_string(),
                credentials_json: Vec::new(),
                source_json: Vec::new(),
            })
            .await
            .map_err(status_error)?;
        Ok(())
    }

    async fn sync_image_file(&self, image: &str, disk_id: &str) -> Result<()> {
        self.client
            .clone()
            .sync_image_file(pb::FileRequest {
                image: image.to_string(),
                disk_id: disk_id.to_string(),
                credentials_json: Vec::new(),
                source_json: Vec::new(),
            })
            .await
            .map_err(status_error)?;
        Ok(())
    }

    async fn prepare_replica(
        &self,
        replica: &Replica,
        size: u64,
        backing_image: Option<&str>,
        attach_node: &str,
    ) -> Result<ReplicaTarget> {
        let r = self
            .client
            .clone()
            .prepare_replica(pb::PrepareReplicaRequest {
                volume_id: String::new(),
                replica_json: to_json(replica)?,
                size,
                backing_image: backing_image.unwrap_or_default().to_string(),
                attach_node_id: attach_node.to_string(),
            })
            .await
            .map_err(status_error)?;
        from_json(&r.into_inner().target_json, "replica target")
    }

    async fn release_replica(&self, replica: &Replica) -> Result<()> {
        self.client
            .clone()
            .release_replica(replica_request(replica, 0, None)?)
            .await
            .map_err(status_error)?;
        Ok(())
    }

    async fn copy_replica_from(
        &self,
        source: &ReplicaTarget,
        replica: &Replica,
        backing_image: Option<&str>,
    ) -> Result<bool> {
        let r = self
            .client
            .clone()
            .copy_replica_from(pb::CopyReplicaFromRequest {
                source_json: to_json(source)?,
                replica_json: to_json(replica)?,
                backing_image: backing_image.unwrap_or_default().to_string(),
            })
            .await
            .map_err(status_error)?;
        Ok(r.into_inner().identical)
    }

    async fn start_online_rebuild(
        &self,
        volume_id: &str,
        replica: &Replica,
        target: &ReplicaTarget,
        size: u64,
        backing_image: Option<&str>,
    ) -> Result<()> {
        let mut req = online_request(volume_id, replica, target)?;
        req.size = size;
        req.backing_image = backing_image.unwrap_or_default().to_string();
        self.client
            .clone()
            .start_online_rebuild(req)
            .await
            .map_err(status_error)?;
        Ok(())
    }

    async fn online_rebuild_status(
        &self,
        volume_id: &str,
        replica: &Replica,
        target: &ReplicaTarget,
    ) -> Result<crate::agent::OnlineRebuild> {
        let r = self
            .client
            .clone()
            .online_rebuild_status(online_request(volume_id, replica, target)?)
            .await
            .map_err(status_error)?;
        from_json(&r.into_inner().status_json, "online rebuild status")
    }

    async fn finish_online_rebuild(
        &self,
        volume_id: &str,
        replica: &Replica,
        target: &ReplicaTarget,
    ) -> Result<()> {
        self.client
            .clone()
            .finish_online_rebuild(online_request(volume_id, replica, target)?)
            .await
            .map_err(status_error)?;
        Ok(())
    }

    async fn cancel_online_rebuild(
        &self,
        volume_id: &str,
        replica: &Replica,
        target: &ReplicaTarget,
    ) -> Result<()> {
        self.client
            .clone()
            .cancel_online_rebuild(online_request(volume_id, replica, target)?)
            .await
            .map_err(status_error)?;
        Ok(())
    }

    async fn compare_replicas(&self, a: &Replica, b: &Replica) -> Result<bool> {
        let r = self
            .client
            .clone()
            .compare_replicas(pb::CompareReplicasRequest {
                a_json: to_json(a)?,
                b_json: to_json(b)?,
            })
            .await
            .map_err(status_error)?;
        Ok(r.into_inner().identical)
    }
    async fn snapshot_replicas(
        &self,
        snapshot_id: &str,
        replicas: &[Replica],
        backing_image: Option<&str>,
    ) -> Result<Vec<SnapshotFile>> {
        let r = self
            .client
            .clone()
            .snapshot_replicas(pb::SnapshotReplicasRequest {
                snapshot_id: snapshot_id.to_string(),
                replicas_json: to_json(&replicas)?,
                backing_image: backing_image.unwrap_or_default().to_string(),
            })
            .await
            .map_err(status_error)?;
        from_json(&r.into_inner().files_json, "snapshot files")
    }

    async fn snapshot_group(&self, members: &[GroupMember]) -> Result<Vec<Vec<SnapshotFile>>> {
        let r = self
            .client
            .clone()
            .snapshot_group(pb::SnapshotGroupRequest {
                members_json: to_json(&members)?,
            })
            .await
            .map_err(status_error)?;
        from_json(&r.into_inner().files_json, "group snapshot files")
    }

    async fn restore_replica(
        &self,
        source: &SnapshotFile,
        source_image: Option<&str>,
        replica: &Replica,
        size: u64,
        backing_image: Option<&str>,
    ) -> Result<()> {
        self.client
            .clone()
            .restore_replica(pb::RestoreReplicaRequest {
                source_json: to_json(source)?,
                source_image: source_image.unwrap_or_default().to_string(),
                replica_json: to_json(replica)?,
                size,
                backing_image: backing_image.unwrap_or_default().to_string(),
            })
            .await
            .map_err(status_error)?;
        Ok(())
    }

    async fn delete_snapshot_files(&self, files: &[SnapshotFile]) -> Result<()> {
        self.client
            .clone()
            .delete_snapshot_files(pb::SnapshotFiles {
                files_json: to_json(&files)?,
            })
            .await
            .map_err(status_error)?;
        Ok(())
    }

    async fn backup_file(
        &self,
        req: crate::backup::blocks::BackupFileRequest,
        progress: crate::backup::blocks::ProgressFn,
    ) -> Result<crate::backup::layout::BackupMeta> {
        let answer = self
            .client
            .clone()
            .backup_file(pb::BackupFileRpc {
                request_json: to_json(&req)?,
            })
            .await;
        follow_steps(answer, Some(&progress), "backup metadata").await
    }

    async fn backup_image(
        &self,
        target_url: &str,
        credential_file: Option<std::path::PathBuf>,
        template: crate::backup::image::ImageMeta,
    ) -> Result<crate::backup::image::ImageMeta> {
        let answer = self
            .client
            .clone()
            .backup_image(pb::BackupImageRpc {
                target_url: target_url.to_string(),
                credential_file: match credential_file {
                    Some(p) => crate::os::utf8_path(&p)?.to_string(),
                    None => String::new(),
                },
                template_json: to_json(&template)?,
            })
            .await;
        follow_steps(answer, None, "backing image backup metadata").await
    }

    async fn restore_backup_file(
        &self,
        req: crate::backup::blocks::RestoreFileRequest,
        progress: crate::backup::blocks::ProgressFn,
    ) -> Result<SnapshotFile> {
        let answer = self
            .client
            .clone()
            .restore_backup_file(pb::RestoreBackupFileRpc {
                request_json: to_json(&req)?,
            })
            .await;
        follow_steps(answer, Some(&progress), "restored snapshot file").await
    }

    async fn clean_volume(&self, volume_id: &str, replicas: &[Replica]) -> Result<()> {
        let answer = self
            .client
            .clone()
            .clean_volume(pb::CleanVolumeRequest {
                volume_id: volume_id.to_string(),
                replicas_json: to_json(&replicas)?,
            })
            .await;
        match answer {
            Ok(_) => Ok(()),
            // An agent of an older version (a rolling upgrade) has no CleanVolume: its attaches
            // undid nothing either, so there is nothing it could clean; that must not fail
            // DeleteVolume or ControllerUnpublishVolume.
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                tracing::info!(volume = %volume_id, "the node's agent predates CleanVolume; nothing to clean there");
                Ok(())
            }
            Err(s) => Err(status_error(s)),
        }
    }
}

// ---- node side: the Agent service and the clients of the controller -------------------------

pub struct AgentService {
    pub local: Arc<LocalAgent>,
}

#[tonic::async_trait]
impl AgentRpc for AgentService {
    async fn disk_space(
        &self,
        _: Request<pb::Empty>,
    ) -> std::result::Result<Response<pb::DiskSpaceResponse>, Status> {
        let disks = self.local.disk_space().await?;
        Ok(Response::new(pb::DiskSpaceResponse {
            disks: disk_infos(&disks)?,
        }))
    }

    async fn create_replica(
        &self,
        request: Request<pb::ReplicaRequest>,
    ) -> std::result::Result<Response<pb::ReplicaExistsResponse>, Status> {
        let r = request.into_inner();
        let replica: Replica = from_json(&r.replica_json, "replica")?;
        let backing = (!r.backing_image.is_empty()).then_some(r.backing_image.as_str());
        let exists = self.local.create_replica(&replica, r.size, backing).await?;
        Ok(Response::new(pb::ReplicaExistsResponse { exists }))
    }

    async fn delete_replica(
        &self,
        request: Request<pb::ReplicaRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let replica: Replica = from_json(&request.into_inner().replica_json, "replica")?;
        self.local.delete_replica(&replica).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn replica_exists(
        &self,
        request: Request<pb::ReplicaRequest>,
    ) -> std::result::Result<Response<pb::ReplicaExistsResponse>, Status> {
        let replica: Replica = from_json(&request.into_inner().replica_json, "replica")?;
        let exists = self.local.replica_exists(&replica).await?;
        Ok(Response::new(pb::ReplicaExistsResponse { exists }))
    }

    async fn resize_replica(
        &self,
        request: Request<pb::ReplicaRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        let replica: Replica = from_json(&r.replica_json, "replica")?;
        self.local.resize_replica(&replica, r.size).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn prepare_first_file(
        &self,
        request: Request<pb::FileRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        let credentials: Option<crate::download::Credentials> = (!r.credentials_json.is_empty())
            .then(|| from_json(&r.credentials_json, "source credentials"))
            .transpose()?;
        let source: Option<ImageSource> = (!r.source_json.is_empty())
            .then(|| from_json(&r.source_json, "image source"))
            .transpose()?;
        self.local
            .files
            .prepare_first_file_with(&r.image, &r.disk_id, source, credentials)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn prepare_replica(
        &self,
        request: Request<pb::PrepareReplicaRequest>,
    ) -> std::result::Result<Response<pb::PrepareReplicaResponse>, Status> {
        let r = request.into_inner();
        let replica: Replica = from_json(&r.replica_json, "replica")?;
        let backing = (!r.backing_image.is_empty()).then_some(r.backing_image.as_str());
        let target = self
            .local
            .prepare_replica(&replica, r.size, backing, &r.attach_node_id)
            .await?;
        Ok(Response::new(pb::PrepareReplicaResponse {
            target_json: to_json(&target)?,
        }))
    }

    async fn release_replica(
        &self,
        request: Request<pb::ReplicaRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let replica: Replica = from_json(&request.into_inner().replica_json, "replica")?;
        self.local.release_replica(&replica).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn copy_replica_from(
        &self,
        request: Request<pb::CopyReplicaFromRequest>,
    ) -> std::result::Result<Response<pb::CompareReplicasResponse>, Status> {
        let r = request.into_inner();
        let source: ReplicaTarget = from_json(&r.source_json, "replica target")?;
        let replica: Replica = from_json(&r.replica_json, "replica")?;
        let image = (!r.backing_image.is_empty()).then_some(r.backing_image.as_str());
        let identical = self
            .local
            .copy_replica_from(&source, &replica, image)
            .await?;
        Ok(Response::new(pb::CompareReplicasResponse { identical }))
    }

    async fn start_online_rebuild(
        &self,
        request: Request<pb::OnlineRebuildRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        let (replica, target) = online_parts(&r)?;
        let image = (!r.backing_image.is_empty()).then_some(r.backing_image.as_str());
        self.local
            .start_online_rebuild(&r.volume_id, &replica, &target, r.size, image)
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn online_rebuild_status(
        &self,
        request: Request<pb::OnlineRebuildRequest>,
    ) -> std::result::Result<Response<pb::OnlineRebuildStatusResponse>, Status> {
        let r = request.into_inner();
        let (replica, target) = online_parts(&r)?;
        let status = self
            .local
            .online_rebuild_status(&r.volume_id, &replica, &target)
            .await?;
        Ok(Response::new(pb::OnlineRebuildStatusResponse {
            status_json: to_json(&status)?,
        }))
    }

    async fn finish_online_rebuild(
        &self,
        request: Request<pb::OnlineRebuildRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        let (replica, target) = online_parts(&r)?;
        self.local
            .finish_online_rebuild(&r.volume_id, &replica, &target)
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn cancel_online_rebuild(
        &self,
        request: Request<pb::OnlineRebuildRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        let (replica, target) = online_parts(&r)?;
        self.local
            .cancel_online_rebuild(&r.volume_id, &replica, &target)
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn compare_replicas(
        &self,
        request: Request<pb::CompareReplicasRequest>,
    ) -> std::result::Result<Response<pb::CompareReplicasResponse>, Status> {
        let r = request.into_inner();
        let a: Replica = from_json(&r.a_json, "replica")?;
        let b: Replica = from_json(&r.b_json, "replica")?;
        let identical = self.local.compare_replicas(&a, &b).await?;
        Ok(Response::new(pb::CompareReplicasResponse { identical }))
    }

    async fn delete_image_files(
        &self,
        request: Request<pb::FileRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        if r.disk_id.is_empty() {
            self.local.delete_image_files(&r.image).await?;
        } else {
            self.local.delete_image_file(&r.image, &r.disk_id).await?;
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn sync_image_file(
        &self,
        request: Request<pb::FileRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        self.local.sync_image_file(&r.image, &r.disk_id).await?;
        Ok(Response::new(pb::Empty {}))
    }
    async fn snapshot_replicas(
        &self,
        request: Request<pb::SnapshotReplicasRequest>,
    ) -> std::result::Result<Response<pb::SnapshotFiles>, Status> {
        let r = request.into_inner();
        let replicas: Vec<Replica> = from_json(&r.replicas_json, "replicas")?;
        let backing = (!r.backing_image.is_empty()).then_some(r.backing_image.as_str());
        let files = self
            .local
            .snapshot_replicas(&r.snapshot_id, &replicas, backing)
            .await?;
        Ok(Response::new(pb::SnapshotFiles {
            files_json: to_json(&files)?,
        }))
    }

    async fn snapshot_group(
        &self,
        request: Request<pb::SnapshotGroupRequest>,
    ) -> std::result::Result<Response<pb::SnapshotGroupFiles>, Status> {
        let members: Vec<GroupMember> =
            from_json(&request.into_inner().members_json, "group members")?;
        let files = self.local.snapshot_group(&members).await?;
        Ok(Response::new(pb::SnapshotGroupFiles {
            files_json: to_json(&files)?,
        }))
    }

    async fn restore_replica(
        &self,
        request: Request<pb::RestoreReplicaRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        let source: SnapshotFile = from_json(&r.source_json, "snapshot file")?;
        let replica: Replica = from_json(&r.replica_json, "replica")?;
        let source_image = (!r.source_image.is_empty()).then_some(r.source_image.as_str());
        let backing = (!r.backing_image.is_empty()).then_some(r.backing_image.as_str());
        self.local
            .restore_replica(&source, source_image, &replica, r.size, backing)
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn delete_snapshot_files(
        &self,
        request: Request<pb::SnapshotFiles>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let files: Vec<SnapshotFile> =
            from_json(&request.into_inner().files_json, "snapshot files")?;
        self.local.delete_snapshot_files(&files).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn backup_file(
        &self,
        request: Request<pb::BackupFileRpc>,
    ) -> std::result::Result<Response<Steps>, Status> {
        let req: crate::backup::blocks::BackupFileRequest =
            from_json(&request.into_inner().request_json, "backup request")?;
        let local = self.local.clone();
        Ok(stream_steps(move |progress| async move {
            local.backup_file(req, progress).await
        }))
    }

    async fn backup_image(
        &self,
        request: Request<pb::BackupImageRpc>,
    ) -> std::result::Result<Response<Steps>, Status> {
        let r = request.into_inner();
        let template: crate::backup::image::ImageMeta =
            from_json(&r.template_json, "backing image backup metadata")?;
        let credential_file =
            (!r.credential_file.is_empty()).then(|| std::path::PathBuf::from(&r.credential_file));
        let local = self.local.clone();
        Ok(stream_steps(move |_| async move {
            local
                .backup_image(&r.target_url, credential_file, template)
                .await
        }))
    }

    async fn restore_backup_file(
        &self,
        request: Request<pb::RestoreBackupFileRpc>,
    ) -> std::result::Result<Response<Steps>, Status> {
        let req: crate::backup::blocks::RestoreFileRequest =
            from_json(&request.into_inner().request_json, "restore request")?;
        let local = self.local.clone();
        Ok(stream_steps(move |progress| async move {
            local.restore_backup_file(req, progress).await
        }))
    }

    async fn clean_volume(
        &self,
        request: Request<pb::CleanVolumeRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = request.into_inner();
        let replicas: Vec<Replica> = from_json(&r.replicas_json, "replicas")?;
        self.local.clean_volume(&r.volume_id, &replicas).await?;
        Ok(Response::new(pb::Empty {}))
    }
}

/// The controller's store, seen from a node agent. The `Store` trait is synchronous (the
/// embedded store is), so each call blocks its worker thread on the RPC; node agents run on the
/// multi-threaded runtime, where that is allowed.
pub struct RemoteStore {
    client: ClusterClient<Channel>,
}

impl RemoteStore {
    pub fn new(channel: Channel) -> RemoteStore {
        RemoteStore {
            client: ClusterClient::new(channel),
        }
    }

    fn call<T>(
        &self,
        f: impl AsyncFnOnce(ClusterClient<Channel>) -> std::result::Result<T, Status>,
    ) -> Result<T> {
        let client = self.client.clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move { f(client).await })
        })
        .map_err(|s| Error::Unavailable(format!("controller store: {}", s.message())))
    }
}

impl Store for RemoteStore {
    fn get_raw(&self, kind: Kind, key: &str) -> Result<Option<Vec<u8>>> {
        let req = pb::StoreKey {
            kind: kind.name().to_string(),
            key: key.to_string(),
        };
        let v = self
            .call(async move |mut c| c.store_get(req).await)?
            .into_inner();
        Ok(v.found.then_some(v.value))
    }

    fn list_raw(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>> {
        let req = pb::StoreKind {
            kind: kind.name().to_string(),
        };
        let v = self
            .call(async move |mut c| c.store_list(req).await)?
            .into_inner();
        Ok(v.entries.into_iter().map(|e| (e.key, e.value)).collect())
    }

    fn put_raw(&self, kind: Kind, key: &str, value: &[u8]) -> Result<()> {
        let req = pb::StoreEntry {
            kind: kind.name().to_string(),
            key: key.to_string(),
            value: value.to_vec(),
        };
        self.call(async move |mut c| c.store_put(req).await)?;
        Ok(())
    }

    fn delete(&self, kind: Kind, key: &str) -> Result<()> {
        let req = pb::StoreKey {
            kind: kind.name().to_string(),
            key: key.to_string(),
        };
        self.call(async move |mut c| c.store_delete(req).await)?;
        Ok(())
    }
}

/// File reports of a node agent, sent to the controller.
pub struct RemoteReports {
    pub client: ClusterClient<Channel>,
}

#[tonic::async_trait]
impl FileReports for RemoteReports {
    async fn report(&self, image: &str, disk: &Disk, report: FileReport) -> Result<()> {
        self.client
            .clone()
            .report_file(pb::ReportFileRequest {
                image: image.to_string(),
                disk_json: to_json(disk)?,
                report_json: to_json(&report)?,
            })
            .await
            .map_err(status_error)?;
        Ok(())
    }
}

/// The request of the four online-rebuild calls.
fn online_request(
    volume_id: &str,
    replica: &Replica,
    target: &ReplicaTarget,
) -> Result<pb::OnlineRebuildRequest> {
    Ok(pb::OnlineRebuildRequest {
        volume_id: volume_id.to_string(),
        replica_json: to_json(replica)?,
        size: 0,
        backing_image: String::new(),
        target_json: to_json(target)?,
    })
}

/// The replica and its typed target of an online-rebuild request; a request without a target
/// comes from a controller older than this node agent (it put an address in the replica's
/// path), which this agent no longer reads.
fn online_parts(r: &pb::OnlineRebuildRequest) -> Result<(Replica, ReplicaTarget)> {
    let replica: Replica = from_json(&r.replica_json, "replica")?;
    if r.target_json.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "online rebuild of replica {} without its target (target_json): the controller is \
             older than this node agent; upgrade the controller",
            replica.id
        )));
    }
    let target: ReplicaTarget = from_json(&r.target_json, "replica target")?;
    Ok((replica, target))
}

/// Registers the node with the controller and keeps sending heartbeats (registering again
/// when the controller lost track of it, after its restart for example). Runs until dropped.
pub async fn keep_registered(
    mut client: ClusterClient<Channel>,
    register: pb::RegisterNodeRequest,
    local: Arc<LocalAgent>,
) {
    let mut registered = false;
    loop {
        if !registered {
            let mut req = register.clone();
            if let Ok(d) = local.disk_space().await
                && let Ok(infos) = disk_infos(&d)
            {
                req.disks = infos;
            }
            match client.register_node(req).await {
                Ok(_) => {
                    registered = true;
                    tracing::info!(node = %register.node_id, "registered with the controller");
                    // Cut-off work starts again and files marked unknown while away are
                    // verified; until the controller answers, the next round retries.
                    if let Err(e) = local.files.resume().await {
                        tracing::warn!(error = %e, "cannot resume backing image work yet");
                        registered = false;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e.message(), "cannot register with the controller; retrying")
                }
            }
        } else {
            let req = pb::HeartbeatRequest {
                node_id: register.node_id.clone(),
                disks: vec![],
            };
            match client.heartbeat(req).await {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::NotFound => registered = false,
                Err(e) => tracing::warn!(error = %e.message(), "heartbeat failed"),
            }
        }
        tokio::time::sleep(if registered {
            HEARTBEAT_INTERVAL
        } else {
            std::time::Duration::from_millis(500)
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gRPC server without the Agent service answers Unimplemented to every Agent call, as an
    /// agent of a version before CleanVolume answers that call.
    async fn server_without_agent() -> String {
        use crate::csi::identity::IdentityService;
        use crate::csi::pb::identity_server::IdentityServer;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let router =
            tonic::transport::Server::builder().add_service(IdentityServer::new(IdentityService {
                driver_name: "bicsi.test".into(),
                controller: true,
            }));
        tokio::spawn(router.serve_with_incoming(incoming));
        url
    }

    #[tokio::test]
    async fn clean_volume_on_an_older_agent_is_nothing_to_clean() {
        let agent = RemoteAgent {
            client: AgentClient::new(channel(&server_without_agent().await).unwrap()),
        };
        agent.clean_volume("pvc-1", &[]).await.unwrap();
        // Other calls still fail: only CleanVolume may be missing on a node.
        let err = agent.disk_space().await.unwrap_err();
        assert!(matches!(err, Error::Internal(_)), "{err:?}");
    }

    /// The four online-rebuild calls carry the typed target over the wire (the split mode):
    /// what the controller sends is what the node agent gets, and a request without one (an
    /// older controller, which put an address in the replica's path) is refused by name.
    #[test]
    fn an_online_rebuild_request_carries_its_typed_target() {
        let replica = crate::model::Replica {
            id: "r1".into(),
            node_id: "n2".into(),
            disk_id: "d1".into(),
            path: "/d1/replicas/v-r1/volume.raw".into(),
            format: crate::os::ImageFormat::Raw,
            deferred: false,
            health: Default::default(),
            cluster_bytes: None,
        };
        for target in [
            ReplicaTarget::Local(replica.path.clone()),
            ReplicaTarget::Nbd {
                host: "::1".into(),
                port: 10809,
                export: "r1".into(),
            },
        ] {
            let req = online_request("v", &replica, &target).unwrap();
            let (r, t) = online_parts(&req).unwrap();
            assert_eq!((r, t), (replica.clone(), target));
        }
        let mut old = online_request("v", &replica, &ReplicaTarget::Local("/x".into())).unwrap();
        old.target_json.clear();
        let e = online_parts(&old).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert!(e.to_string().contains("upgrade the controller"), "{e}");
    }
}
