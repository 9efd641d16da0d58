//! `bicsi get replicas [VOLUME]` and `bicsi volume rebuild NAME [--from REPLICA]`: the replicas'
//! modes as the controller's records hold them, and a rebuild started by hand with its progress.
//! It shapes requests, waits and prints; the rules live in `crate::health` and
//! `crate::controller::rebuild`.

use std::time::Duration;

use serde::Serialize;

use super::Server;
use super::api::{client, json, send, url};
use super::output::{self, ListOutput, Progress};
use super::wait;
use crate::error::{Error, Result};
use crate::health::{ReplicaMode, volume_health};
use crate::model::{Volume, rfc3339};
use crate::outln;

/// A replica as `bicsi get replicas` shows it.
#[derive(Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaView {
    pub volume: String,
    pub replica: String,
    pub node: String,
    pub disk: String,
    pub mode: ReplicaMode,
    pub mode_since: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub mode_reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<crate::health::RebuildProgress>,
    pub path: std::path::PathBuf,
}

/// The replicas of `volumes` (of the one named by `only`, when given).
pub fn replica_views(volumes: &[Volume], only: Option<&str>) -> Vec<ReplicaView> {
    let id = only.map(crate::controller::volume_id_for);
    volumes
        .iter()
        .filter(|v| id.as_ref().is_none_or(|id| v.id == *id))
        .flat_map(|v| {
            v.replicas.iter().map(|r| ReplicaView {
                volume: v.id.clone(),
                replica: r.id.clone(),
                node: r.node_id.clone(),
                disk: r.disk_id.clone(),
                mode: r.health.mode,
                mode_since: r.health.mode_since,
                mode_reason: r.health.mode_reason.clone(),
                rebuild: r.health.rebuild.clone(),
                path: r.path.clone(),
            })
        })
        .collect()
}

fn since(secs: u64) -> String {
    if secs == 0 { "-".into() } else { rfc3339(secs) }
}

fn rebuild_text(r: &ReplicaView) -> String {
    match &r.rebuild {
        Some(p) if p.total_bytes == 0 => format!("from {} (copying)", p.source),
        Some(p) => format!("from {} {}%", p.source, p.percent()),
        None => "-".into(),
    }
}

/// `bicsi get replicas [VOLUME] [-o json|yaml|wide]`.
pub async fn get_replicas(
    volume: Option<&str>,
    server: &Server,
    output: Option<ListOutput>,
) -> Result<()> {
    let volumes = super::volume::records(&server.server).await?;
    if let Some(name) = volume
        && !volumes
            .iter()
            .any(|v| v.id == crate::controller::volume_id_for(name))
    {
        return Err(Error::NotFound(format!("volume {name:?} not found")));
    }
    let views = replica_views(&volumes, volume);
    if output::print_records(&views, output)? {
        return Ok(());
    }
    outln!(
        "{:<32} {:<10} {:<16} {:<16} {:<5} {:<21} {:<16} REASON",
        "VOLUME",
        "REPLICA",
        "NODE",
        "DISK",
        "MODE",
        "SINCE",
        "REBUILD"
    );
    for r in &views {
        let reason = if r.mode_reason.is_empty() {
            "-"
        } else {
            &r.mode_reason
        };
        outln!(
            "{:<32} {:<10} {:<16} {:<16} {:<5} {:<21} {:<16} {reason}",
            r.volume,
            r.replica,
            r.node,
            r.disk,
            r.mode.as_str(),
            since(r.mode_since),
            rebuild_text(r)
        );
    }
    Ok(())
}

/// `bicsi volume rebuild NAME [--from REPLICA]`: asks the server to rebuild, showing the
/// replicas' progress from the records while it runs.
pub async fn rebuild(name: &str, from: Option<&str>, server: &Server) -> Result<()> {
    let id = crate::controller::volume_id_for(name);
    wait::on_interrupt(format!(
        "the rebuild of volume {name} goes on in bicsi; follow it with `bicsi get replicas {name}`"
    ));
    let mut progress = Progress::new(format!("rebuild of volume {name}"));
    let call = rebuild_volume(&server.server, &id, from);
    tokio::pin!(call);
    let answer = loop {
        tokio::select! {
            r = &mut call => break r,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Ok(volumes) = super::volume::records(&server.server).await {
                    let views = replica_views(&volumes, Some(name));
                    if let Some(r) = views.iter().find(|r| r.mode == ReplicaMode::Wo) {
                        let pct = r.rebuild.as_ref().map(|p| p.percent());
                        progress.update(&format!("replica {} {}", r.replica, rebuild_text(r)), pct);
                    }
                }
            }
        }
    }?;
    progress.finish();
    for r in &answer.rebuilt {
        outln!("replica {r} rebuilt and verified");
    }
    for s in &answer.skipped {
        outln!("not rebuilt: {s}");
    }
    let (h, why) = volume_health(&answer.volume);
    if why.is_empty() {
        outln!("volume {name} is {h}");
    } else {
        outln!("volume {name} is {h}: {why}");
    }
    if !answer.skipped.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "volume {name:?}: {} replica(s) could not be rebuilt",
            answer.skipped.len()
        )));
    }
    let _ = id;
    Ok(())
}

/// Rebuilds a detached volume's replicas that are not rw (`POST /v1/volumes/ID/rebuild`).
async fn rebuild_volume(
    server: &str,
    id: &str,
    from: Option<&str>,
) -> Result<crate::http::RebuildAnswer> {
    json(
        send(
            client()
                .post(url(server, &format!("v1/volumes/{id}/rebuild")))
                .json(&serde_json::json!({ "from": from })),
            server,
        )
        .await?,
    )
    .await
}
