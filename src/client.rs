//! A CSI client over the unix socket, used by the `bicsi volume …` commands (people who run
//! `serve` without Kubernetes), by the HTTP API's attach (`attach`) and by the tests.

pub mod attach;

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::csi::pb;
use crate::csi::pb::controller_client::ControllerClient;
use crate::csi::pb::group_controller_client::GroupControllerClient;
use crate::csi::pb::identity_client::IdentityClient;
use crate::csi::pb::node_client::NodeClient;
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct CsiClient {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    /// Volume group snapshots.
    pub group: GroupControllerClient<Channel>,
}

impl CsiClient {
    /// Connects to `unix:///path` (or a plain path).
    pub async fn connect(endpoint: &str) -> Result<CsiClient> {
        let path: PathBuf = crate::csi::socket_path(endpoint)?;
        let p = path.clone();
        // The URI is required by tonic but unused: the connector below opens the socket.
        let channel = Endpoint::try_from("http://[::]:50051")
            .map_err(|e| Error::Internal(e.to_string()))?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let p = p.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
                }
            }))
            .await
            .map_err(|e| {
                Error::Unavailable(format!(
                    "cannot connect to bicsi at {}: {e}; is `bicsi serve` running with this --csi-endpoint?",
                    path.display()
                ))
            })?;
        Ok(CsiClient {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            group: GroupControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        })
    }

    /// Every volume (ListVolumes, page after page).
    pub async fn all_volumes(&mut self) -> Result<Vec<pb::list_volumes_response::Entry>> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .controller
                .list_volumes(pb::ListVolumesRequest {
                    max_entries: 100,
                    starting_token: token,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            all.extend(page.entries);
            if page.next_token.is_empty() {
                return Ok(all);
            }
            token = page.next_token;
        }
    }

    /// Every snapshot, or those of `source_volume_id` (ListSnapshots, page after page).
    pub async fn all_snapshots(&mut self, source_volume_id: &str) -> Result<Vec<pb::Snapshot>> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .controller
                .list_snapshots(pb::ListSnapshotsRequest {
                    max_entries: 100,
                    starting_token: token,
                    source_volume_id: source_volume_id.to_string(),
                    ..Default::default()
                })
                .await
                .map_err(status_error)?
                .into_inner();
            all.extend(page.entries.into_iter().filter_map(|e| e.snapshot));
            if page.next_token.is_empty() {
                return Ok(all);
            }
            token = page.next_token;
        }
    }
}

/// Converts a gRPC status from bicsi back into a domain error for display.
pub fn status_error(s: tonic::Status) -> Error {
    Error::from_code(s.code(), s.message().to_string())
}

/// How long a volume command waits out another operation on the same volume (Aborted: a
/// rebuild pass, the node's replica watcher writing a mark, another attach): the CSI rule is
/// that the caller retries, as a CO does.
pub const ABORTED_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// How often an Aborted call is tried again.
const ABORTED_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Calls `call` again while it answers Aborted ("another operation in progress"), for up to
/// [`ABORTED_WAIT`]; any other answer, or Aborted after that, is returned as it is.
pub async fn retry_aborted<T, F, Fut>(
    mut call: F,
) -> std::result::Result<tonic::Response<T>, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = std::time::Instant::now() + ABORTED_WAIT;
    loop {
        match call().await {
            Err(s) if s.code() == tonic::Code::Aborted && std::time::Instant::now() < deadline => {
                tracing::debug!(why = %s.message(), "retrying after Aborted");
                tokio::time::sleep(ABORTED_POLL).await;
            }
            other => return other,
        }
    }
}
