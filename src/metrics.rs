//! Prometheus metrics: `GET /metrics` in the text format 0.0.4, on the controller's HTTP API
//! and on each node agent's HTTP listener (behind the same bearer token as the routes beside it).
//!
//! Two kinds of metrics, kept apart on purpose:
//! - what happens (transfers, checksum failures, recoveries, cleanups, CSI calls) is counted
//!   where the work happens, through the few functions of [`crate::counters`] (the bottom
//!   floor, so a hook deep in the file code needs no handle passed down to it);
//! - what *is* (files per state, volumes and their health, disks, the I/O of attached volumes)
//!   is read at scrape time from the records and the machine by [`collect`], for the
//!   [`Sources`] each listener is given, so it is never out of date and never double-counts.
//!
//! Names follow Prometheus's conventions: `bicsi_` prefix, base units (`_bytes`, `_seconds`),
//! counters end in `_total`; the process's own are the standard `process_*` names. This
//! module records and renders; it must not change records, nor decide anything.

mod collect;
pub mod csi;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use prometheus::TextEncoder;

use crate::model::Disk;
use crate::store::Store;

pub use collect::Sources;

/// The whole scrape for `sources`: this process's counters, then what the records and the
/// machine say now. Families are sorted by name; empty ones are left out.
pub fn render(sources: &Sources) -> String {
    let mut families = crate::counters::gather();
    families.extend(collect::collect(sources));
    families.retain(|f| !f.get_metric().is_empty());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    TextEncoder::new()
        .encode_to_string(&families)
        .unwrap_or_else(|e| format!("# cannot encode the metrics: {e}\n"))
}

/// `GET /metrics` for `sources`, to merge into a listener's router (before its token layer).
pub fn routes(sources: Sources) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(Arc::new(sources))
}

async fn scrape(State(sources): State<Arc<Sources>>) -> impl IntoResponse {
    // Reading records, statvfs and walking the disks' directories block: off the runtime.
    let body = tokio::task::spawn_blocking(move || render(&sources))
        .await
        .unwrap_or_else(|e| format!("# the scrape failed: {e}\n"));
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body)
}

/// A volume was staged on `device`: its I/O is counted from here (see `collect::io_families`).
pub fn volume_staged(volume_id: &str, device: &std::path::Path) {
    collect::note_staged(volume_id, device);
}

/// The sources of a process that owns the cluster state (serve, controller).
pub fn controller_sources(store: Arc<dyn Store>, cluster: Arc<crate::cluster::Cluster>) -> Sources {
    Sources {
        records: Some(store),
        cluster: Some(cluster),
        ..Sources::default()
    }
}

/// Adds a node's disks and its own records (staged volumes) to `sources`.
pub fn with_node(
    mut sources: Sources,
    node_id: &str,
    disks: Vec<Disk>,
    node_records: Arc<dyn Store>,
) -> Sources {
    sources.node_id = node_id.to_string();
    sources.disks = disks;
    sources.node_records = Some(node_records);
    sources
}

#[cfg(test)]
mod tests;
