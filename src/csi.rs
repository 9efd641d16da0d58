//! The CSI services over gRPC: thin adapters that check required fields, convert protocol
//! messages to domain types, call the controller or node domain, and convert back. Status codes
//! come only from `From<Error> for Status`; no business logic lives here.

pub mod controller;
pub mod group_controller;
pub mod identity;
pub mod node;

/// The generated CSI v1 protocol types.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("csi.v1");
}

use std::path::PathBuf;

use pb::volume_capability::access_mode::Mode;

use crate::error::{Error, Result};
use crate::model::{AccessMode, AccessType, Capability};

/// Fails with InvalidArgument naming `field` when `value` is empty.
pub fn required<'a>(value: &'a str, field: &str) -> Result<&'a str> {
    if value.is_empty() {
        Err(Error::InvalidArgument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

pub fn capability_from_pb(cap: &pb::VolumeCapability) -> Result<Capability> {
    use pb::volume_capability::AccessType as Pb;
    let access = match &cap.access_type {
        Some(Pb::Mount(m)) => AccessType::Mount {
            fs_type: m.fs_type.clone(),
            mount_flags: m.mount_flags.clone(),
        },
        Some(Pb::Block(_)) => AccessType::Block,
        None => {
            return Err(Error::InvalidArgument(
                "volume capability has no access type; set mount or block".into(),
            ));
        }
    };
    let mode = match cap.access_mode.as_ref().map(|m| m.mode()) {
        Some(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Some(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Some(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Some(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Some(Mode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
        Some(Mode::MultiNodeSingleWriter) => AccessMode::MultiNodeSingleWriter,
        Some(Mode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
        Some(Mode::Unknown) | None => {
            return Err(Error::InvalidArgument(
                "volume capability has no access mode; set one such as SINGLE_NODE_WRITER".into(),
            ));
        }
    };
    Ok(Capability { access, mode })
}

pub fn capability_to_pb(cap: &Capability) -> pb::VolumeCapability {
    use pb::volume_capability::AccessType as Pb;
    let access_type = match &cap.access {
        AccessType::Mount {
            fs_type,
            mount_flags,
        } => Pb::Mount(pb::volume_capability::MountVolume {
            fs_type: fs_type.clone(),
            mount_flags: mount_flags.clone(),
            volume_mount_group: String::new(),
        }),
        AccessType::Block => Pb::Block(pb::volume_capability::BlockVolume {}),
    };
    let mode = match cap.mode {
        AccessMode::SingleNodeWriter => Mode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
        AccessMode::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
        AccessMode::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
        AccessMode::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
        AccessMode::MultiNodeSingleWriter => Mode::MultiNodeSingleWriter,
        AccessMode::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
        AccessMode::Unknown => Mode::Unknown,
    };
    pb::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

/// Converts a required single capability, naming the field when it is missing.
pub fn required_capability(cap: &Option<pb::VolumeCapability>, field: &str) -> Result<Capability> {
    match cap {
        Some(c) => capability_from_pb(c),
        None => Err(Error::InvalidArgument(format!("{field} is required"))),
    }
}

/// The span every RPC runs in, with the volume id when there is one.
fn rpc_span(method: &'static str, volume_id: &str) -> tracing::Span {
    tracing::info_span!("csi", method, volume = %volume_id)
}

/// How every CSI handler runs its body: inside the RPC's span (method and volume id), and a
/// failure is logged there once with its code, so a call that fails leaves a line in bicsi's log
/// even when the caller (a sidecar, the CLI) shows it nowhere.
pub trait Rpc: std::future::Future + Sized {
    fn rpc(
        self,
        method: &'static str,
        volume_id: &str,
    ) -> impl std::future::Future<Output = Self::Output>;
}

impl<T, F> Rpc for F
where
    F: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
{
    async fn rpc(self, method: &'static str, volume_id: &str) -> F::Output {
        use tracing::Instrument;
        let span = rpc_span(method, volume_id);
        let result = self.instrument(span.clone()).await;
        if let Err(status) = &result {
            span.in_scope(|| {
                // Callers retry Aborted and Unavailable by design: those are not worth a warning.
                match status.code() {
                    tonic::Code::Aborted | tonic::Code::Unavailable => tracing::info!(
                        code = ?status.code(),
                        error = %status.message(),
                        "call failed; the caller retries"
                    ),
                    _ => tracing::warn!(
                        code = ?status.code(),
                        error = %status.message(),
                        "call failed"
                    ),
                }
            });
        }
        result
    }
}

/// `unix:///run/csi.sock` (or a plain path) → the socket path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .unwrap_or(endpoint)
        .to_string();
    if path.is_empty() || endpoint.contains("://") && !endpoint.starts_with("unix://") {
        return Err(Error::InvalidArgument(format!(
            "CSI endpoint {endpoint:?} is not a unix socket; use unix:///path/to/csi.sock"
        )));
    }
    Ok(PathBuf::from(path))
}
