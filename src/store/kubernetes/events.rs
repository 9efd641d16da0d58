//! Publishes the domain's events (`crate::events`) as `events.k8s.io/v1` Events, from one
//! background task per Kubernetes store: the store's `record_event` only queues (a full queue
//! drops the event, logged), so no domain call ever waits for the API server. The task runs
//! each event through the [`Correlator`] (series, combined similar events, per-object budget)
//! and creates the Event or merge-patches its `series`, in the regarding object's namespace
//! (`default` for a Node, as client-go does). The PVC's and the Node's uid, which `kubectl
//! describe` matches events on, is read once per object (`get` on persistentvolumeclaims and
//! nodes); a BackingImage's comes from the store's cache. Failures are logged, never retried
//! into a loop: an event is information, not state.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Node, ObjectReference, PersistentVolumeClaim};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::events::{Correlator, Decision, Event, MAX_SHORT, Regarding, truncate, validate};

/// Events waiting for the publisher; more are dropped (and logged).
pub const QUEUE: usize = 1024;
/// `reportingController` of every Event bicsi writes.
pub const CONTROLLER: &str = "bicsi";

/// An event and the reference to the object it regards.
pub struct Queued {
    pub event: Event,
    pub reference: ObjectReference,
}

/// This process's `reportingInstance`: the pod's name (`POD_NAME`, else `HOSTNAME`).
pub fn instance() -> String {
    let name = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| CONTROLLER.to_string());
    truncate(&name, MAX_SHORT)
}

/// The reference for `regarding`, as far as it is known without asking (no uid for a PVC or a
/// Node yet).
pub fn reference(regarding: &Regarding, namespace: &str, uid: Option<String>) -> ObjectReference {
    let (api_version, kind, ns, name) = match regarding {
        Regarding::BackingImage(key) => (
            super::crd::api_resource(crate::store::Kind::BackingImage).api_version,
            "BackingImage",
            Some(namespace.to_string()),
            super::object_name(key),
        ),
        Regarding::Claim { namespace, name } => (
            "v1".to_string(),
            "PersistentVolumeClaim",
            Some(namespace.clone()),
            name.clone(),
        ),
        Regarding::Node(name) => ("v1".to_string(), "Node", None, name.clone()),
        Regarding::Volume(id) => (String::new(), "Volume", None, id.clone()),
    };
    ObjectReference {
        api_version: Some(api_version),
        kind: Some(kind.to_string()),
        namespace: ns,
        name: Some(name),
        uid,
        ..Default::default()
    }
}

struct Publisher {
    client: kube::Client,
    instance: String,
    correlator: Correlator,
    /// uids of PVCs and Nodes read so far.
    uids: HashMap<Regarding, String>,
}

/// Runs until the store (the queue's sender) is dropped.
pub async fn run(client: kube::Client, mut queue: tokio::sync::mpsc::Receiver<Queued>) {
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let mut p = Publisher {
        client,
        instance: instance(),
        correlator: Correlator::new(base),
        uids: HashMap::new(),
    };
    while let Some(q) = queue.recv().await {
        p.publish(q).await;
    }
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

impl Publisher {
    async fn uid(&mut self, regarding: &Regarding, reference: &ObjectReference) -> Option<String> {
        if reference.uid.is_some() {
            return reference.uid.clone();
        }
        if let Some(uid) = self.uids.get(regarding) {
            return Some(uid.clone());
        }
        let got = match regarding {
            Regarding::Claim { namespace, name } => {
                Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), namespace)
                    .get(name)
                    .await
                    .map(|o| o.metadata.uid)
            }
            Regarding::Node(name) => Api::<Node>::all(self.client.clone())
                .get(name)
                .await
                .map(|o| o.metadata.uid),
            Regarding::BackingImage(_) | Regarding::Volume(_) => return None,
        };
        match got {
            Ok(Some(uid)) => {
                self.uids.insert(regarding.clone(), uid.clone());
                Some(uid)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(object = %regarding, error = %e, "event: cannot read the object's uid; the event names it without");
                None
            }
        }
    }

    async fn publish(&mut self, q: Queued) {
        let Queued {
            event,
            mut reference,
        } = q;
        let mut decision = self.correlator.observe(&event, tokio::time::Instant::now());
        if decision == Decision::Drop {
            tracing::debug!(object = %event.regarding, reason = event.reason, "event over the object's budget; logged only");
            return;
        }
        reference.uid = self.uid(&event.regarding, &reference).await;
        let namespace = reference
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        if let Decision::Update { name, count, note } = &decision {
            let patch = json!({
                "series": { "count": count, "lastObservedTime": now },
                "note": note,
            });
            match api
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return,
                // Expired (the API server keeps events an hour): start a new one.
                Err(e) if api_code(&e) == Some(404) => {
                    self.correlator.forget(name);
                    decision = self.correlator.observe(&event, tokio::time::Instant::now());
                }
                Err(e) => {
                    tracing::warn!(object = %event.regarding, reason = event.reason, error = %e, "cannot update the event's series");
                    return;
                }
            }
        }
        let Decision::Create { name, note } = decision else {
            return;
        };
        let k8s = K8sEvent {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(namespace),
                ..Default::default()
            },
            event_time: Some(now),
            regarding: Some(reference),
            reason: Some(event.reason.to_string()),
            action: Some(event.action.to_string()),
            note: Some(note),
            type_: Some(event.type_.as_str().to_string()),
            reporting_controller: Some(CONTROLLER.to_string()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        let doc = serde_json::to_value(&k8s).unwrap_or_default();
        if let Err(why) = validate(&doc) {
            tracing::warn!(object = %event.regarding, reason = event.reason, "event not written, the API server would refuse it: {why}");
            return;
        }
        if let Err(e) = api.create(&PostParams::default(), &k8s).await {
            tracing::warn!(object = %event.regarding, reason = event.reason, error = %e, "cannot create the event (RBAC: create and patch events.k8s.io events)");
        }
    }
}

#[cfg(test)]
mod tests;
