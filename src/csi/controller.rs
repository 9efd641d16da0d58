//! CSI Controller service: validates requests and hands them to [`crate::controller::Controller`].

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::controller_server::Controller as CsiController;
use super::{Rpc, capability_from_pb, capability_to_pb, pb, required, required_capability};
use crate::controller::snapshot::CreateSnapshot;
use crate::controller::{Controller, CreateVolume};
use crate::error::Error;
use crate::model::Volume;
use crate::snapshot::Snapshot;

pub struct ControllerService {
    pub controller: Arc<Controller>,
}

fn volume_to_pb(v: &Volume) -> pb::Volume {
    pb::Volume {
        capacity_bytes: v.spec.capacity_bytes as i64,
        volume_id: v.id.clone(),
        volume_context: Default::default(),
        content_source: None,
        accessible_topology: vec![],
    }
}

/// A snapshot as CSI shows it; a member of a volume group snapshot carries the group's id.
pub(crate) fn snapshot_to_pb(controller: &Controller, s: &Snapshot) -> Result<pb::Snapshot, Error> {
    Ok(pb::Snapshot {
        size_bytes: s.size_bytes.min(i64::MAX as u64) as i64,
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.creation_secs.min(i64::MAX as u64) as i64,
            nanos: s.creation_nanos as i32,
        }),
        ready_to_use: controller.snapshot_ready(s)?,
        group_snapshot_id: s.group_snapshot_id.clone().unwrap_or_default(),
    })
}

fn capabilities(caps: &[pb::VolumeCapability]) -> Result<Vec<crate::model::Capability>, Error> {
    caps.iter().map(capability_from_pb).collect()
}

fn nonneg(v: i64, field: &str) -> Result<u64, Error> {
    u64::try_from(v).map_err(|_| Error::InvalidArgument(format!("{field} must not be negative")))
}

impl ControllerService {
    async fn condition(&self, v: &Volume) -> Result<pb::VolumeCondition, Error> {
        let c = self.controller.condition(v).await?;
        Ok(pb::VolumeCondition {
            abnormal: c.abnormal,
            message: c.message,
        })
    }
}

#[tonic::async_trait]
impl CsiController for ControllerService {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.name, "name")?;
            if r.volume_capabilities.is_empty() {
                return Err(
                    Error::InvalidArgument("volume_capabilities is required".into()).into(),
                );
            }
            let (required_bytes, limit_bytes) = match &r.capacity_range {
                Some(c) => (
                    nonneg(c.required_bytes, "capacity_range.required_bytes")?,
                    nonneg(c.limit_bytes, "capacity_range.limit_bytes")?,
                ),
                None => (0, 0),
            };
            use pb::volume_content_source::Type;
            let (source_volume, source_snapshot) = match r
                .volume_content_source
                .as_ref()
                .and_then(|s| s.r#type.as_ref())
            {
                Some(Type::Volume(v)) => (Some(v.volume_id.clone()), None),
                Some(Type::Snapshot(s)) => (None, Some(s.snapshot_id.clone())),
                None => (None, None),
            };
            let v = self
                .controller
                .create_volume(CreateVolume {
                    name: r.name.clone(),
                    required_bytes,
                    limit_bytes,
                    parameters: r.parameters.clone().into_iter().collect(),
                    mutable_parameters: r.mutable_parameters.clone().into_iter().collect(),
                    capabilities: capabilities(&r.volume_capabilities)?,
                    source_volume,
                    source_snapshot,
                    source_backup: None,
                })
                .await?;
            let mut volume = volume_to_pb(&v);
            volume.content_source = r.volume_content_source.clone();
            Ok(Response::new(pb::CreateVolumeResponse {
                volume: Some(volume),
            }))
        }
        .rpc("CreateVolume", &r.name)
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.volume_id, "volume_id")?;
            self.controller.delete_volume(&r.volume_id).await?;
            Ok(Response::new(pb::DeleteVolumeResponse {}))
        }
        .rpc("DeleteVolume", &r.volume_id)
        .await
    }

    async fn controller_publish_volume(
        &self,
        request: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.volume_id, "volume_id")?;
            required(&r.node_id, "node_id")?;
            let cap = required_capability(&r.volume_capability, "volume_capability")?;
            let publish_context = self
                .controller
                .publish(&r.volume_id, &r.node_id, cap, r.readonly)
                .await?;
            Ok(Response::new(pb::ControllerPublishVolumeResponse {
                publish_context: publish_context.into_iter().collect(),
            }))
        }
        .rpc("ControllerPublishVolume", &r.volume_id)
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.volume_id, "volume_id")?;
            self.controller.unpublish(&r.volume_id, &r.node_id).await?;
            Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}))
        }
        .rpc("ControllerUnpublishVolume", &r.volume_id)
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.volume_id, "volume_id")?;
            if r.volume_capabilities.is_empty() {
                return Err(
                    Error::InvalidArgument("volume_capabilities is required".into()).into(),
                );
            }
            let caps = capabilities(&r.volume_capabilities)?;
            let problem = self.controller.validate_capabilities(&r.volume_id, &caps)?;
            let response = match problem {
                None => pb::ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                        volume_context: r.volume_context.clone(),
                        volume_capabilities: caps.iter().map(capability_to_pb).collect(),
                        parameters: r.parameters.clone(),
                        mutable_parameters: r.mutable_parameters.clone(),
                    }),
                    message: String::new(),
                },
                Some(message) => pb::ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message,
                },
            };
            Ok(Response::new(response))
        }
        .rpc("ValidateVolumeCapabilities", &r.volume_id)
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = request.into_inner();
        async {
            let max = nonneg(r.max_entries as i64, "max_entries")? as usize;
            let (page, next_token) = self.controller.list_volumes(max, &r.starting_token)?;
            let mut entries = Vec::with_capacity(page.len());
            for v in &page {
                entries.push(pb::list_volumes_response::Entry {
                    volume: Some(volume_to_pb(v)),
                    status: Some(pb::list_volumes_response::VolumeStatus {
                        published_node_ids: v
                            .publication
                            .iter()
                            .map(|p| p.node_id.clone())
                            .collect(),
                        volume_condition: Some(self.condition(v).await?),
                    }),
                });
            }
            Ok(Response::new(pb::ListVolumesResponse {
                entries,
                next_token,
            }))
        }
        .rpc("ListVolumes", "")
        .await
    }

    async fn get_capacity(
        &self,
        request: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let r = request.into_inner();
        async {
            let caps = capabilities(&r.volume_capabilities)?;
            let supported = caps.iter().all(|c| c.mode.is_supported());
            let available = if supported {
                self.controller.capacity().await?
            } else {
                0
            };
            Ok(Response::new(pb::GetCapacityResponse {
                available_capacity: available.min(i64::MAX as u64) as i64,
                maximum_volume_size: Some(crate::controller::MAX_VOLUME_SIZE as i64),
                minimum_volume_size: Some(512),
            }))
        }
        .rpc("GetCapacity", "")
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use pb::controller_service_capability::{Rpc, Type, rpc::Type as R};
        let rpcs = [
            R::CreateDeleteVolume,
            R::PublishUnpublishVolume,
            R::ListVolumes,
            R::GetCapacity,
            R::ExpandVolume,
            R::ListVolumesPublishedNodes,
            R::VolumeCondition,
            R::GetVolume,
            R::ModifyVolume,
            R::CreateDeleteSnapshot,
            R::ListSnapshots,
            R::CloneVolume,
            // The readonly flag of ControllerPublishVolume is honoured: NodePublishVolume
            // mounts such a volume read-only, and a republish with the other flag is refused.
            R::PublishReadonly,
        ];
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities: rpcs
                .into_iter()
                .map(|t| pb::ControllerServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.name, "name")?;
            required(&r.source_volume_id, "source_volume_id")?;
            let s = self
                .controller
                .create_snapshot(CreateSnapshot {
                    name: r.name.clone(),
                    source_volume_id: r.source_volume_id.clone(),
                    parameters: r.parameters.clone().into_iter().collect(),
                })
                .await?;
            Ok(Response::new(pb::CreateSnapshotResponse {
                snapshot: Some(snapshot_to_pb(&self.controller, &s)?),
            }))
        }
        .rpc("CreateSnapshot", &r.source_volume_id)
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.snapshot_id, "snapshot_id")?;
            self.controller.delete_snapshot(&r.snapshot_id).await?;
            Ok(Response::new(pb::DeleteSnapshotResponse {}))
        }
        .rpc("DeleteSnapshot", "")
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        async {
            let max = nonneg(r.max_entries as i64, "max_entries")? as usize;
            let (page, next_token) = self.controller.list_snapshots(
                max,
                &r.starting_token,
                &r.source_volume_id,
                &r.snapshot_id,
            )?;
            let mut entries = Vec::with_capacity(page.len());
            for s in &page {
                entries.push(pb::list_snapshots_response::Entry {
                    snapshot: Some(snapshot_to_pb(&self.controller, s)?),
                });
            }
            Ok(Response::new(pb::ListSnapshotsResponse {
                entries,
                next_token,
            }))
        }
        .rpc("ListSnapshots", &r.source_volume_id)
        .await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.volume_id, "volume_id")?;
            let range = r
                .capacity_range
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("capacity_range is required".into()))?;
            let is_block = match &r.volume_capability {
                Some(c) => capability_from_pb(c)?.is_block(),
                None => false,
            };
            let (size, node_expansion_required) = self
                .controller
                .expand(
                    &r.volume_id,
                    nonneg(range.required_bytes, "capacity_range.required_bytes")?,
                    nonneg(range.limit_bytes, "capacity_range.limit_bytes")?,
                    is_block,
                )
                .await?;
            Ok(Response::new(pb::ControllerExpandVolumeResponse {
                capacity_bytes: size as i64,
                node_expansion_required,
            }))
        }
        .rpc("ControllerExpandVolume", &r.volume_id)
        .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.volume_id, "volume_id")?;
            let v = self
                .controller
                .get(&r.volume_id)?
                .ok_or_else(|| Error::NotFound(format!("volume {:?} not found", r.volume_id)))?;
            Ok(Response::new(pb::ControllerGetVolumeResponse {
                volume: Some(volume_to_pb(&v)),
                status: Some(pb::controller_get_volume_response::VolumeStatus {
                    published_node_ids: v.publication.iter().map(|p| p.node_id.clone()).collect(),
                    volume_condition: Some(self.condition(&v).await?),
                }),
            }))
        }
        .rpc("ControllerGetVolume", &r.volume_id)
        .await
    }

    async fn controller_modify_volume(
        &self,
        request: Request<pb::ControllerModifyVolumeRequest>,
    ) -> Result<Response<pb::ControllerModifyVolumeResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.volume_id, "volume_id")?;
            let params = r.mutable_parameters.clone().into_iter().collect();
            self.controller.modify(&r.volume_id, &params).await?;
            Ok(Response::new(pb::ControllerModifyVolumeResponse {}))
        }
        .rpc("ControllerModifyVolume", &r.volume_id)
        .await
    }
}
