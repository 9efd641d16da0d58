//! `bicsi get nodes` and `bicsi get disks`: the nodes with their state, and the disks of the up
//! nodes with their free space.

use super::output::{self, ListOutput};
use crate::error::Result;

pub(super) async fn get_nodes(server: &str, output: Option<ListOutput>) -> Result<()> {
    let nodes: Vec<crate::model::NodeRecord> = super::api::get(server, "v1/nodes").await?;
    if output::print_records(&nodes, output)? {
        return Ok(());
    }
    let wide = output == Some(ListOutput::Wide);
    crate::outln!(
        "{:<24} {:<6} {:>5} {:<28} AGENT{}",
        "NODE",
        "STATE",
        "DISKS",
        "LAST HEARTBEAT",
        if wide { "  TRANSFER" } else { "" }
    );
    for n in nodes {
        let agent = if n.agent_url.is_empty() {
            "(in process)"
        } else {
            &n.agent_url
        };
        let transfer = if wide {
            format!(
                "  {}",
                if n.transfer_url.is_empty() {
                    "-"
                } else {
                    &n.transfer_url
                }
            )
        } else {
            String::new()
        };
        crate::outln!(
            "{:<24} {:<6} {:>5} {:<28} {agent}{transfer}",
            n.node_id,
            if n.up { "up" } else { "down" },
            n.disks.len(),
            n.last_heartbeat,
        );
    }
    Ok(())
}

pub(super) async fn get_disks(server: &str, output: Option<ListOutput>) -> Result<()> {
    let disks: Vec<crate::agent::DiskSpace> = super::api::get(server, "v1/disks").await?;
    if output::print_records(&disks, output)? {
        return Ok(());
    }
    crate::outln!(
        "{:<14} {:<24} {:>10} {:<8} PATH",
        "DISK",
        "NODE",
        "FREE",
        "MANAGER"
    );
    for d in disks {
        crate::outln!(
            "{:<14} {:<24} {:>10} {:<8} {}",
            d.disk.id,
            d.disk.node_id,
            crate::quantity::human(d.free_bytes),
            if d.manager { "running" } else { "-" },
            d.disk.path.display()
        );
    }
    Ok(())
}
