//! `bicsi serve`: the all-in-one mode. Opens the embedded store and the disks, builds the
//! controller and the node agent, and serves CSI on a unix socket and the HTTP API on loopback
//! until `shutdown` resolves. Takes everything as arguments (no globals), so tests can run several.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;

use crate::backing::BackingImages;
use crate::controller::Controller;
use crate::csi::controller::ControllerService;
use crate::csi::identity::IdentityService;
use crate::csi::node::NodeService;
use crate::csi::pb::controller_server::ControllerServer;
use crate::csi::pb::identity_server::IdentityServer;
use crate::csi::pb::node_server::NodeServer;
use crate::error::{Error, Result};
use crate::node::NodeAgent;
use crate::os::Os;
use crate::replicas::LocalReplicas;
use crate::store::embedded::EmbeddedStore;
use crate::store::{Kind, Store, StoreExt};

/// How long in-flight calls may run after a shutdown signal.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub csi_endpoint: String,
    pub node_id: String,
    pub disks: Vec<PathBuf>,
    pub driver_name: String,
    pub http_listen: String,
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

/// The default endpoint for a data directory.
pub fn default_endpoint(data_dir: &Path) -> String {
    format!("unix://{}", data_dir.join("csi.sock").display())
}

/// Binds the unix socket, replacing a stale socket file but never a live server's.
async fn bind_unix(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(Error::FailedPrecondition(format!(
                "another process is serving on {}; stop it or choose another --csi-endpoint",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path)
        .map_err(|e| Error::Internal(format!("cannot listen on {}: {e}", path.display())))
}

/// Runs bicsi until `shutdown` resolves.
pub async fn serve(
    cfg: Config,
    os: Os,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        Error::Internal(format!(
            "cannot create data directory {}: {e}",
            cfg.data_dir.display()
        ))
    })?;
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&cfg.data_dir.join("state.redb"))?);

    let disk_paths = if cfg.disks.is_empty() {
        vec![cfg.data_dir.join("disks").join("default")]
    } else {
        cfg.disks.clone()
    };
    let mut disks = Vec::new();
    for path in &disk_paths {
        let disk = crate::disks::open_disk(&cfg.node_id, path)?;
        store.put(Kind::Disk, &disk.id, &disk)?;
        tracing::info!(disk = %disk.id, path = %disk.path.display(), "disk ready");
        disks.push(disk);
    }

    let backing = BackingImages::new(store.clone(), disks.clone(), os.clone());
    backing.resume().await?;
    let controller = Arc::new(Controller::new(
        store.clone(),
        LocalReplicas::new(disks.clone(), os.clone()),
        backing.clone(),
    ));
    controller.register_node(&cfg.node_id);
    let agent = Arc::new(NodeAgent::new(
        cfg.node_id.clone(),
        cfg.data_dir.clone(),
        os,
        store.clone(),
        store.clone(),
        backing.clone(),
        disks,
    ));
    agent.readopt().await?;

    let sock = socket_path(&cfg.csi_endpoint)?;
    let unix = bind_unix(&sock).await?;
    let http = TcpListener::bind(&cfg.http_listen).await.map_err(|e| {
        Error::FailedPrecondition(format!(
            "cannot listen for HTTP on {}: {e}; choose another --http-listen",
            cfg.http_listen
        ))
    })?;
    let http_addr: SocketAddr = http
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    tracing::info!(
        csi = %sock.display(),
        http = %http_addr,
        node = %cfg.node_id,
        driver = %cfg.driver_name,
        "bicsi serving"
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let grpc = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService {
            driver_name: cfg.driver_name.clone(),
        }))
        .add_service(ControllerServer::new(ControllerService {
            controller: controller.clone(),
        }))
        .add_service(NodeServer::new(NodeService { agent }))
        .serve_with_incoming_shutdown(UnixListenerStream::new(unix), wait(stop_rx.clone()));
    let api = crate::http::router(crate::http::ApiState {
        controller,
        backing,
        store: store.clone(),
        driver_name: cfg.driver_name.clone(),
    });
    let http_server = axum::serve(http, api).with_graceful_shutdown(wait(stop_rx.clone()));

    let grpc = tokio::spawn(grpc);
    let http_server = tokio::spawn(async move { http_server.await });
    wait(stop_rx.clone()).await;
    // Sidecars and the kubelet keep their connections open; give in-flight calls a grace period,
    // then stop regardless, so SIGTERM always ends the process.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let g = grpc.await;
        let h = http_server.await;
        (g, h)
    })
    .await;
    let _ = std::fs::remove_file(&sock);
    match drained {
        Ok((g, h)) => {
            g.map_err(|e| Error::Internal(format!("gRPC server task: {e}")))?
                .map_err(|e| Error::Internal(format!("gRPC server: {e}")))?;
            h.map_err(|e| Error::Internal(format!("HTTP server task: {e}")))?
                .map_err(|e| Error::Internal(format!("HTTP server: {e}")))?;
        }
        Err(_) => tracing::warn!(
            grace = ?SHUTDOWN_GRACE,
            "clients kept connections open past the grace period; stopping anyway"
        ),
    }
    tracing::info!("bicsi stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            socket_path("unix:///run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert_eq!(
            socket_path("/run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://").is_err());
    }
}
