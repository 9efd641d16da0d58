//! The controller's view of the nodes: their agents, disks and liveness. A node is up while it
//! sends heartbeats; one silent for longer than [`DOWN_AFTER`] is marked down, and its backing
//! image files become `unknown` until it returns. In the all-in-one mode the one node is this
//! process and is always up.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::agent::{Agent, DiskSpace};
use crate::error::{Error, Result};
use crate::model::NodeRecord;
use crate::store::{Kind, Store, StoreExt};

/// How often node agents send heartbeats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// A node silent for this long is down.
pub const DOWN_AFTER: Duration = Duration::from_secs(10);

struct Entry {
    agent: Arc<dyn Agent>,
    last_seen: Instant,
    /// The local agent of an all-in-one process never goes down.
    local: bool,
}

pub struct Cluster {
    store: Arc<dyn Store>,
    nodes: RwLock<BTreeMap<String, Entry>>,
    down_after: Duration,
}

impl Cluster {
    pub fn new(store: Arc<dyn Store>) -> Arc<Cluster> {
        Cluster::with_down_after(store, DOWN_AFTER)
    }

    /// A cluster that marks nodes down after `down_after` without a heartbeat.
    pub fn with_down_after(store: Arc<dyn Store>, down_after: Duration) -> Arc<Cluster> {
        Arc::new(Cluster {
            store,
            nodes: RwLock::new(BTreeMap::new()),
            down_after,
        })
    }

    /// Adds (or replaces) a node and records it in the store as up.
    pub fn register(&self, record: NodeRecord, agent: Arc<dyn Agent>, local: bool) -> Result<()> {
        let mut record = record;
        record.up = true;
        record.last_heartbeat = crate::model::now_rfc3339();
        // Under the nodes lock, so a sweep that found this node silent a moment ago cannot
        // record it down after this registration (see `sweep`).
        let mut nodes = self.nodes.write().expect("nodes poisoned");
        self.store.put(Kind::Node, &record.node_id, &record)?;
        nodes.insert(
            record.node_id.clone(),
            Entry {
                agent,
                last_seen: Instant::now(),
                local,
            },
        );
        tracing::info!(node = %record.node_id, disks = record.disks.len(), "node registered");
        Ok(())
    }

    /// Records a heartbeat; Err NotFound when the node must register (again).
    pub fn heartbeat(&self, node_id: &str) -> Result<()> {
        let mut nodes = self.nodes.write().expect("nodes poisoned");
        let entry = nodes.get_mut(node_id).ok_or_else(|| {
            Error::NotFound(format!(
                "node {node_id:?} is not registered; register first"
            ))
        })?;
        entry.last_seen = Instant::now();
        Ok(())
    }

    pub fn is_up(&self, node_id: &str) -> bool {
        self.nodes
            .read()
            .expect("nodes poisoned")
            .get(node_id)
            .is_some_and(|e| e.local || e.last_seen.elapsed() < self.down_after)
    }

    pub fn known(&self, node_id: &str) -> bool {
        self.nodes
            .read()
            .expect("nodes poisoned")
            .contains_key(node_id)
            || self
                .store
                .get_raw(Kind::Node, node_id)
                .ok()
                .flatten()
                .is_some()
    }

    pub fn node_ids(&self) -> Vec<String> {
        self.nodes
            .read()
            .expect("nodes poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// The agent of an up node.
    pub fn agent(&self, node_id: &str) -> Result<Arc<dyn Agent>> {
        let nodes = self.nodes.read().expect("nodes poisoned");
        match nodes.get(node_id) {
            Some(e) if e.local || e.last_seen.elapsed() < self.down_after => Ok(e.agent.clone()),
            Some(_) => Err(Error::Unavailable(format!(
                "node {node_id:?} is down (no heartbeat for {} s); retry when it is back",
                self.down_after.as_secs()
            ))),
            None => Err(Error::Unavailable(format!(
                "node {node_id:?} has not registered with the controller"
            ))),
        }
    }

    /// Free space of every disk of every up node.
    pub async fn disks(&self) -> Result<Vec<DiskSpace>> {
        let agents: Vec<(String, Arc<dyn Agent>)> = {
            let nodes = self.nodes.read().expect("nodes poisoned");
            nodes
                .iter()
                .filter(|(_, e)| e.local || e.last_seen.elapsed() < self.down_after)
                .map(|(id, e)| (id.clone(), e.agent.clone()))
                .collect()
        };
        let mut out = Vec::new();
        for (id, agent) in agents {
            match agent.disk_space().await {
                Ok(d) => out.extend(d),
                Err(e) => {
                    tracing::warn!(node = %id, error = %e, "cannot read the node's disk space")
                }
            }
        }
        Ok(out)
    }

    /// Marks silent nodes down in the store; returns the ids that went down now.
    pub fn sweep(&self) -> Result<Vec<String>> {
        // The nodes lock is held until the records are written: a node registering again
        // meanwhile (its agent restarted) waits, and is not recorded down after it is back.
        let nodes = self.nodes.read().expect("nodes poisoned");
        let silent: Vec<String> = nodes
            .iter()
            .filter(|(_, e)| !e.local && e.last_seen.elapsed() >= self.down_after)
            .map(|(id, _)| id.clone())
            .collect();
        let mut went_down = Vec::new();
        for id in silent {
            if let Some(mut rec) = self.store.get::<NodeRecord>(Kind::Node, &id)?
                && rec.up
            {
                rec.up = false;
                self.store.put(Kind::Node, &id, &rec)?;
                tracing::warn!(node = %id, "node is down: no heartbeat");
                went_down.push(id);
            }
        }
        Ok(went_down)
    }
}
