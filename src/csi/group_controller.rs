//! CSI GroupController service: volume group snapshots. Validates requests and hands them to
//! [`crate::controller::Controller`] (`controller::group_snapshot`).

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::controller::snapshot_to_pb;
use super::pb::group_controller_server::GroupController;
use super::{pb, required, rpc_span};
use crate::controller::Controller;
use crate::controller::group_snapshot::{CreateGroupSnapshot, GroupSnapshot};
use crate::error::Error;

pub struct GroupControllerService {
    pub controller: Arc<Controller>,
}

impl GroupControllerService {
    fn group_to_pb(&self, g: &GroupSnapshot) -> Result<pb::VolumeGroupSnapshot, Error> {
        let snapshots = g
            .snapshots
            .iter()
            .map(|s| snapshot_to_pb(&self.controller, s))
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(pb::VolumeGroupSnapshot {
            group_snapshot_id: g.id.clone(),
            ready_to_use: snapshots.iter().all(|s| s.ready_to_use),
            snapshots,
            creation_time: Some(prost_types::Timestamp {
                seconds: g.creation_secs.min(i64::MAX as u64) as i64,
                nanos: g.creation_nanos as i32,
            }),
        })
    }
}

#[tonic::async_trait]
impl GroupController for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<pb::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::GroupControllerGetCapabilitiesResponse>, Status> {
        use pb::group_controller_service_capability::{Rpc, Type, rpc::Type as R};
        Ok(Response::new(pb::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![pb::GroupControllerServiceCapability {
                r#type: Some(Type::Rpc(Rpc {
                    r#type: R::CreateDeleteGetVolumeGroupSnapshot as i32,
                })),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<pb::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::CreateVolumeGroupSnapshotResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.name, "name")?;
            if r.source_volume_ids.is_empty() {
                return Err(Error::InvalidArgument("source_volume_ids is required".into()).into());
            }
            let g = self
                .controller
                .create_group_snapshot(CreateGroupSnapshot {
                    name: r.name.clone(),
                    source_volume_ids: r.source_volume_ids.clone(),
                    parameters: r.parameters.clone().into_iter().collect(),
                })
                .await?;
            Ok(Response::new(pb::CreateVolumeGroupSnapshotResponse {
                group_snapshot: Some(self.group_to_pb(&g)?),
            }))
        }
        .instrument(rpc_span("CreateVolumeGroupSnapshot", &r.name))
        .await
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<pb::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::DeleteVolumeGroupSnapshotResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.group_snapshot_id, "group_snapshot_id")?;
            self.controller
                .delete_group_snapshot(&r.group_snapshot_id, &r.snapshot_ids)
                .await?;
            Ok(Response::new(pb::DeleteVolumeGroupSnapshotResponse {}))
        }
        .instrument(rpc_span("DeleteVolumeGroupSnapshot", ""))
        .await
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<pb::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::GetVolumeGroupSnapshotResponse>, Status> {
        let r = request.into_inner();
        async {
            required(&r.group_snapshot_id, "group_snapshot_id")?;
            let g = self
                .controller
                .get_group_snapshot(&r.group_snapshot_id, &r.snapshot_ids)?;
            Ok(Response::new(pb::GetVolumeGroupSnapshotResponse {
                group_snapshot: Some(self.group_to_pb(&g)?),
            }))
        }
        .instrument(rpc_span("GetVolumeGroupSnapshot", ""))
        .await
    }
}
