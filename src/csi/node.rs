//! CSI Node service: validates requests and hands them to [`crate::node::NodeAgent`].

use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::node_server::Node as CsiNode;
use super::{Rpc, pb, required, required_capability};
use crate::error::Error;
use crate::node::{NodeAgent, TOPOLOGY_KEY};

pub struct NodeService {
    pub agent: Arc<NodeAgent>,
}

#[tonic::async_trait]
impl CsiNode for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.volume_id, "volume_id")?;
            required(&r.staging_target_path, "staging_target_path")?;
            let cap = required_capability(&r.volume_capability, "volume_capability")?;
            let context = r.publish_context.clone().into_iter().collect();
            self.agent
                .stage(
                    &r.volume_id,
                    Path::new(&r.staging_target_path),
                    cap,
                    &context,
                )
                .await?;
            Ok(Response::new(pb::NodeStageVolumeResponse {}))
        }
        .rpc("NodeStageVolume", &r.volume_id)
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.volume_id, "volume_id")?;
            required(&r.staging_target_path, "staging_target_path")?;
            self.agent
                .unstage(&r.volume_id, Path::new(&r.staging_target_path))
                .await?;
            Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
        }
        .rpc("NodeUnstageVolume", &r.volume_id)
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.volume_id, "volume_id")?;
            required(&r.target_path, "target_path")?;
            let cap = required_capability(&r.volume_capability, "volume_capability")?;
            if r.staging_target_path.is_empty() {
                // We advertise STAGE_UNSTAGE_VOLUME, so the CO must stage first.
                return Err(Error::FailedPrecondition(
                    "staging_target_path is required: this plugin stages volumes (STAGE_UNSTAGE_VOLUME)"
                        .into(),
                )
                .into());
            }
            self.agent
                .publish(
                    &r.volume_id,
                    Path::new(&r.staging_target_path),
                    Path::new(&r.target_path),
                    cap,
                    // A volume ControllerPublishVolume published read-only is read-only in
                    // every mount, whatever this call's own flag says.
                    r.readonly
                        || r.publish_context
                            .get(crate::model::READ_ONLY_CONTEXT_KEY)
                            .is_some_and(|v| v == "true"),
                )
                .await?;
            Ok(Response::new(pb::NodePublishVolumeResponse {}))
        }
        .rpc("NodePublishVolume", &r.volume_id)
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.volume_id, "volume_id")?;
            required(&r.target_path, "target_path")?;
            self.agent
                .unpublish(&r.volume_id, Path::new(&r.target_path))
                .await?;
            Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
        }
        .rpc("NodeUnpublishVolume", &r.volume_id)
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.volume_id, "volume_id")?;
            required(&r.volume_path, "volume_path")?;
            let s = self
                .agent
                .stats(&r.volume_id, Path::new(&r.volume_path))
                .await?;
            use pb::volume_usage::Unit;
            let mut usage = vec![pb::VolumeUsage {
                available: s.available_bytes as i64,
                total: s.total_bytes as i64,
                used: s.used_bytes as i64,
                unit: Unit::Bytes as i32,
            }];
            if let Some((total, free, used)) = s.inodes {
                usage.push(pb::VolumeUsage {
                    available: free as i64,
                    total: total as i64,
                    used: used as i64,
                    unit: Unit::Inodes as i32,
                });
            }
            Ok(Response::new(pb::NodeGetVolumeStatsResponse {
                usage,
                volume_condition: Some(pb::VolumeCondition {
                    abnormal: s.abnormal,
                    message: s.message,
                }),
            }))
        }
        .rpc("NodeGetVolumeStats", &r.volume_id)
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.volume_id, "volume_id")?;
            required(&r.volume_path, "volume_path")?;
            let size = self
                .agent
                .expand(&r.volume_id, Path::new(&r.volume_path))
                .await?;
            Ok(Response::new(pb::NodeExpandVolumeResponse {
                capacity_bytes: size as i64,
            }))
        }
        .rpc("NodeExpandVolume", &r.volume_id)
        .await
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::{Rpc, Type, rpc::Type as R};
        let rpcs = [
            R::StageUnstageVolume,
            R::GetVolumeStats,
            R::ExpandVolume,
            R::VolumeCondition,
        ];
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities: rpcs
                .into_iter()
                .map(|t| pb::NodeServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        let node_id = self.agent.node_id().to_string();
        Ok(Response::new(pb::NodeGetInfoResponse {
            accessible_topology: Some(pb::Topology {
                segments: [(TOPOLOGY_KEY.to_string(), node_id.clone())]
                    .into_iter()
                    .collect(),
            }),
            node_id,
            max_volumes_per_node: self.agent.max_volumes().min(i64::MAX as u64) as i64,
        }))
    }
}
