//! CSI Identity: who the plugin is, what it offers, and whether it is ready.

use tonic::{Request, Response, Status};

use super::pb;
use super::pb::identity_server::Identity;

pub struct IdentityService {
    pub driver_name: String,
    /// Whether this process serves the Controller service (not a node agent alone).
    pub controller: bool,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        use pb::plugin_capability::{Service, Type, VolumeExpansion, service, volume_expansion};
        let mut caps = vec![
            // Quorum-backed volumes grow while detached; the filesystem then grows online.
            Type::VolumeExpansion(VolumeExpansion {
                r#type: volume_expansion::Type::Offline as i32,
            }),
        ];
        if self.controller {
            caps.push(Type::Service(Service {
                r#type: service::Type::ControllerService as i32,
            }));
            // Volume group snapshots, served with the Controller service.
            caps.push(Type::Service(Service {
                r#type: service::Type::GroupControllerService as i32,
            }));
        }
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities: caps
                .into_iter()
                .map(|t| pb::PluginCapability { r#type: Some(t) })
                .collect(),
        }))
    }

    async fn probe(
        &self,
        _: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        Ok(Response::new(pb::ProbeResponse { ready: Some(true) }))
    }
}
