//! The Kubernetes store: bicsi's records as `longhorn.io/v1beta2` custom resources, so state
//! lives in the cluster's API server (etcd) and no home-made consensus is needed.
//!
//! Reads are served from a watch-backed cache (one `kube::runtime::watcher` per kind: a list,
//! then a watch, relisting when the watch expires), never by polling. Writes go to the API server
//! with the cached object's `resourceVersion` (optimistic concurrency) and return only once the
//! watch has delivered them, so a read after a write sees it. A write that meets a conflict (409)
//! re-reads the object: when only status or metadata moved under it, or the other writer already
//! wrote the same spec, it is retried; when someone else changed the spec, the put fails with
//! `Aborted` naming the object (nothing of it is written). BackingImage status is written through
//! the status subresource only, as a merge patch of what changed.
//!
//! Every object carries the finalizer [`FINALIZER`], so `kubectl delete` of a BackingImage or a
//! volume only marks it: the object stays (with its deletion timestamp) until bicsi has removed
//! its files or replicas and deletes the record, which removes the finalizer last.
//!
//! Keys that are not valid Kubernetes names are stored under a digest of the key; the key itself
//! is kept in the [`KEY_ANNOTATION`] annotation. This module must not interpret the documents
//! beyond splitting a BackingImage into spec and status.

pub mod crd;
pub mod events;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams,
};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::runtime::watcher::Event;
use serde_json::{Value, json};

use super::{Kind, Store};
use crate::error::{Error, Result};
pub use crate::model::object_name;

/// Held by every object bicsi writes; removed by bicsi only when the record is deleted.
pub const FINALIZER: &str = "longhorn.io/bicsi";
/// The store key of an object whose key is not a valid Kubernetes name.
pub const KEY_ANNOTATION: &str = "bicsi.longhorn.io/key";

/// How long a write waits for the watch to deliver it before it updates the cache itself.
const SEEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long start-up waits for the first list of every kind.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Conflicts retried per write before giving up with `Aborted`.
const CONFLICT_RETRIES: usize = 5;
/// Applied watch events remembered so writers can find theirs.
const RECENT: usize = 4096;

/// The cache of one kind, fed by its watcher.
#[derive(Default)]
struct CacheState {
    /// Objects by Kubernetes name, as last delivered.
    objects: BTreeMap<String, DynamicObject>,
    /// Objects of a relist in progress, swapped in at its end.
    relist: Option<BTreeMap<String, DynamicObject>>,
    ready: bool,
    /// Counts applied events; `recent` holds the last ones as (seq, name, resourceVersion or
    /// None for a deletion).
    seq: u64,
    recent: VecDeque<(u64, String, Option<String>)>,
    last_error: Option<String>,
}

impl CacheState {
    fn note(&mut self, name: &str, rv: Option<String>) {
        self.seq += 1;
        self.recent.push_back((self.seq, name.to_string(), rv));
        if self.recent.len() > RECENT {
            self.recent.pop_front();
        }
    }

    fn apply(&mut self, event: Event<DynamicObject>) {
        match event {
            Event::Apply(obj) => {
                let name = obj.metadata.name.clone().unwrap_or_default();
                let rv = obj.metadata.resource_version.clone();
                self.objects.insert(name.clone(), obj);
                self.note(&name, rv);
            }
            Event::Delete(obj) => {
                let name = obj.metadata.name.clone().unwrap_or_default();
                self.objects.remove(&name);
                self.note(&name, None);
            }
            Event::Init => self.relist = Some(BTreeMap::new()),
            Event::InitApply(obj) => {
                let name = obj.metadata.name.clone().unwrap_or_default();
                self.relist.get_or_insert_default().insert(name, obj);
            }
            Event::InitDone => {
                let new = self.relist.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .objects
                    .keys()
                    .filter(|k| !new.contains_key(*k))
                    .cloned()
                    .collect();
                for name in gone {
                    self.note(&name, None);
                }
                for (name, obj) in &new {
                    let rv = obj.metadata.resource_version.clone();
                    self.note(name, rv);
                }
                self.objects = new;
                self.ready = true;
                self.last_error = None;
            }
        }
    }

    /// Whether an event after `since` delivered `name` at `rv` (or its deletion for None).
    fn seen(&self, since: u64, name: &str, rv: Option<&str>) -> bool {
        self.recent
            .iter()
            .rev()
            .take_while(|(seq, _, _)| *seq > since)
            .any(|(_, n, r)| n == name && r.as_deref() == rv)
    }
}

struct Cache {
    state: Mutex<CacheState>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Cache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct KubeStore {
    namespace: String,
    /// For the Secrets and ConfigMaps sources name (read once per use, never cached or logged).
    client: kube::Client,
    apis: HashMap<Kind, Api<DynamicObject>>,
    caches: HashMap<Kind, Arc<Cache>>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
    handle: tokio::runtime::Handle,
    /// The queue of the Event publisher (`events`), which runs until the store is dropped.
    events: tokio::sync::mpsc::Sender<events::Queued>,
}

impl Drop for KubeStore {
    fn drop(&mut self) {
        for w in &self.watchers {
            w.abort();
        }
    }
}

fn key_of(obj: &DynamicObject) -> String {
    obj.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(KEY_ANNOTATION))
        .cloned()
        .or_else(|| obj.metadata.name.clone())
        .unwrap_or_default()
}

/// Not marked for deletion and without bicsi's finalizer (finalizers cannot be added once
/// deletion started).
fn lacks_finalizer(obj: &DynamicObject) -> bool {
    obj.metadata.deletion_timestamp.is_none()
        && !obj
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}

fn type_meta(kind: Kind) -> kube::api::TypeMeta {
    let ar = crd::api_resource(kind);
    kube::api::TypeMeta {
        api_version: ar.api_version,
        kind: ar.kind,
    }
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

fn unavailable(kind: Kind, what: &str, e: kube::Error) -> Error {
    Error::Unavailable(format!(
        "Kubernetes store: cannot {what} {}: {e}",
        crd::api_resource(kind).plural
    ))
}

/// RFC 7386 merge patch that turns `old` into `new` (removed keys become null).
fn merge_diff(old: &Value, new: &Value) -> Value {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut patch = serde_json::Map::new();
            for k in o.keys() {
                if !n.contains_key(k) {
                    patch.insert(k.clone(), Value::Null);
                }
            }
            for (k, v) in n {
                match o.get(k) {
                    Some(ov) if ov == v => {}
                    Some(ov) if ov.is_object() && v.is_object() => {
                        patch.insert(k.clone(), merge_diff(ov, v));
                    }
                    _ => {
                        patch.insert(k.clone(), v.clone());
                    }
                }
            }
            Value::Object(patch)
        }
        _ => new.clone(),
    }
}

impl KubeStore {
    /// Connects with the in-cluster or kubeconfig credentials, in their default namespace.
    pub async fn connect() -> Result<KubeStore> {
        let client = kube::Client::try_default().await.map_err(|e| {
            Error::Unavailable(format!(
                "--store kubernetes: cannot reach the Kubernetes API ({e}); run in a pod with a service account, or set KUBECONFIG"
            ))
        })?;
        let ns = client.default_namespace().to_string();
        KubeStore::new(client, &ns).await
    }

    /// Starts one watcher per kind in `namespace` and waits for their first lists.
    pub async fn new(client: kube::Client, namespace: &str) -> Result<KubeStore> {
        KubeStore::start(client, namespace, READY_TIMEOUT).await
    }

    async fn start(
        client: kube::Client,
        namespace: &str,
        ready_timeout: Duration,
    ) -> Result<KubeStore> {
        let mut apis = HashMap::new();
        let mut caches = HashMap::new();
        let mut watchers = Vec::new();
        for kind in Kind::ALL {
            let ar: ApiResource = crd::api_resource(kind);
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
            let cache = Arc::new(Cache {
                state: Mutex::new(CacheState::default()),
                changed: tokio::sync::watch::channel(0).0,
            });
            watchers.push(tokio::spawn(run_watcher(api.clone(), cache.clone())));
            apis.insert(kind, api);
            caches.insert(kind, cache);
        }
        let (events_tx, events_rx) = tokio::sync::mpsc::channel(events::QUEUE);
        watchers.push(tokio::spawn(events::run(client.clone(), events_rx)));
        let store = KubeStore {
            namespace: namespace.to_string(),
            client: client.clone(),
            apis,
            caches,
            watchers,
            events: events_tx,
            handle: tokio::runtime::Handle::current(),
        };
        for kind in Kind::ALL {
            let cache = &store.caches[&kind];
            let mut rx = cache.changed.subscribe();
            let ready =
                tokio::time::timeout(ready_timeout, rx.wait_for(|_| cache.lock().ready)).await;
            if !matches!(ready, Ok(Ok(_))) {
                let why = cache.lock().last_error.clone().unwrap_or_default();
                return Err(Error::Unavailable(format!(
                    "--store kubernetes: cannot list {}.{} in namespace {namespace:?} ({why}); apply deploy/crds.yaml and check the RBAC rules",
                    crd::api_resource(kind).plural,
                    crd::GROUP
                )));
            }
        }
        Ok(store)
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Keys of the objects of `kind` someone asked Kubernetes to delete (they have a deletion
    /// timestamp and wait for bicsi to release them).
    pub fn terminating(&self, kind: Kind) -> Vec<String> {
        self.caches[&kind]
            .lock()
            .objects
            .values()
            .filter(|o| o.metadata.deletion_timestamp.is_some())
            .map(key_of)
            .collect()
    }

    /// A receiver that changes whenever the cache of `kind` does.
    pub fn subscribe(&self, kind: Kind) -> tokio::sync::watch::Receiver<u64> {
        self.caches[&kind].changed.subscribe()
    }

    /// Runs `f` to completion from the synchronous `Store` methods.
    fn block<T>(&self, f: impl Future<Output = T>) -> T {
        match tokio::runtime::Handle::try_current() {
            Ok(h) => tokio::task::block_in_place(|| h.block_on(f)),
            Err(_) => self.handle.block_on(f),
        }
    }

    fn cached(&self, kind: Kind, name: &str) -> Option<DynamicObject> {
        self.caches[&kind].lock().objects.get(name).cloned()
    }

    /// The document the domain stored, rebuilt from an object.
    fn document(&self, kind: Kind, obj: &DynamicObject) -> Result<Vec<u8>> {
        let doc = if kind == Kind::BackingImage {
            let mut doc = json!({
                "apiVersion": format!("{}/{}", crd::GROUP, crd::VERSION),
                "kind": "BackingImage",
                "metadata": {
                    "name": key_of(obj),
                    "namespace": obj.metadata.namespace.clone().unwrap_or_else(|| self.namespace.clone()),
                },
                "spec": obj.data.get("spec").cloned().unwrap_or_else(|| json!({})),
            });
            if let Some(status) = obj.data.get("status") {
                doc["status"] = status.clone();
            }
            doc
        } else {
            obj.data.get("spec").cloned().unwrap_or_else(|| json!({}))
        };
        Ok(serde_json::to_vec(&doc)?)
    }

    /// Waits until the watch has delivered `name` at `rv` (None: its deletion) after `since`;
    /// when it does not come in time, puts `fallback` into the cache itself.
    async fn await_seen(
        &self,
        kind: Kind,
        since: u64,
        name: &str,
        rv: Option<&str>,
        fallback: Option<DynamicObject>,
    ) {
        let cache = &self.caches[&kind];
        let mut rx = cache.changed.subscribe();
        let seen = tokio::time::timeout(
            SEEN_TIMEOUT,
            rx.wait_for(|_| cache.lock().seen(since, name, rv)),
        )
        .await;
        if !matches!(seen, Ok(Ok(_))) {
            tracing::warn!(
                kind = kind.name(),
                name,
                "the watch did not deliver a write in time; caching it directly"
            );
            let mut st = cache.lock();
            match fallback {
                Some(obj) => {
                    st.objects.insert(name.to_string(), obj);
                }
                None => {
                    st.objects.remove(name);
                }
            }
        }
    }

    fn since(&self, kind: Kind) -> u64 {
        self.caches[&kind].lock().seq
    }

    async fn fetch(&self, kind: Kind, name: &str) -> Result<Option<DynamicObject>> {
        self.apis[&kind]
            .get_opt(name)
            .await
            .map_err(|e| unavailable(kind, "read", e))
    }

    fn conflict(kind: Kind, key: &str) -> Error {
        Error::Aborted(format!(
            "{} {key:?} was changed by someone else while bicsi updated it; retry",
            crd::api_resource(kind).kind
        ))
    }

    async fn put_async(&self, kind: Kind, key: &str, value: &[u8]) -> Result<()> {
        let doc: Value = serde_json::from_slice(value)?;
        if !doc.is_object() {
            return Err(Error::InvalidArgument(format!(
                "{} {key:?}: a record must be a JSON object",
                kind.name()
            )));
        }
        let (spec, status) = if kind == Kind::BackingImage {
            (
                doc.get("spec").cloned().unwrap_or_else(|| json!({})),
                doc.get("status").cloned(),
            )
        } else {
            (doc, None)
        };
        let name = object_name(key);
        let api = &self.apis[&kind];
        let since = self.since(kind);
        let origin = self.cached(kind, &name);
        let origin_spec = origin.as_ref().and_then(|o| o.data.get("spec").cloned());
        let mut base = origin;
        let mut last: Option<DynamicObject> = None;
        let mut wrote = false;
        for _ in 0..CONFLICT_RETRIES {
            // The spec: create, or replace when it differs.
            let current = match base.take() {
                None => {
                    let obj = DynamicObject {
                        types: Some(type_meta(kind)),
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            namespace: Some(self.namespace.clone()),
                            annotations: Some(
                                [(KEY_ANNOTATION.to_string(), key.to_string())].into(),
                            ),
                            finalizers: Some(vec![FINALIZER.to_string()]),
                            ..Default::default()
                        },
                        data: json!({ "spec": spec }),
                    };
                    match api.create(&PostParams::default(), &obj).await {
                        Ok(created) => {
                            wrote = true;
                            created
                        }
                        Err(e) if api_code(&e) == Some(409) => {
                            let fresh = self.fetch(kind, &name).await?;
                            if let Some(f) = &fresh
                                && f.data.get("spec") != Some(&spec)
                            {
                                return Err(KubeStore::conflict(kind, key));
                            }
                            base = fresh;
                            continue;
                        }
                        Err(e) => return Err(unavailable(kind, "create", e)),
                    }
                }
                // Also an object someone else created (kubectl apply): it gets the finalizer.
                Some(cur) if cur.data.get("spec") != Some(&spec) || lacks_finalizer(&cur) => {
                    let mut obj = cur.clone();
                    obj.types = Some(type_meta(kind));
                    obj.data["spec"] = spec.clone();
                    let fins = obj.metadata.finalizers.get_or_insert_default();
                    if !fins.iter().any(|f| f == FINALIZER)
                        && cur.metadata.deletion_timestamp.is_none()
                    {
                        fins.push(FINALIZER.to_string());
                    }
                    obj.metadata
                        .annotations
                        .get_or_insert_default()
                        .insert(KEY_ANNOTATION.to_string(), key.to_string());
                    match api.replace(&name, &PostParams::default(), &obj).await {
                        Ok(replaced) => {
                            wrote = true;
                            replaced
                        }
                        Err(e) if matches!(api_code(&e), Some(409) | Some(404)) => {
                            let fresh = self.fetch(kind, &name).await?;
                            let moved = fresh.as_ref().and_then(|f| f.data.get("spec"));
                            if moved != origin_spec.as_ref() && moved != Some(&spec) {
                                return Err(KubeStore::conflict(kind, key));
                            }
                            base = fresh;
                            continue;
                        }
                        Err(e) => return Err(unavailable(kind, "update", e)),
                    }
                }
                Some(cur) => cur,
            };
            // The status, through its subresource, as a merge patch of what changed.
            let current = match &status {
                Some(status)
                    if crd::has_status(kind) && current.data.get("status") != Some(status) =>
                {
                    let old = current
                        .data
                        .get("status")
                        .cloned()
                        .unwrap_or_else(|| json!({}));
                    let patch = json!({
                        "metadata": { "resourceVersion": current.metadata.resource_version },
                        "status": merge_diff(&old, status),
                    });
                    match api
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        Ok(patched) => {
                            wrote = true;
                            patched
                        }
                        // bicsi alone writes status: take the newer object and write it again.
                        Err(e) if api_code(&e) == Some(409) => {
                            base = self.fetch(kind, &name).await?;
                            continue;
                        }
                        Err(e) => return Err(unavailable(kind, "update the status of", e)),
                    }
                }
                _ => current,
            };
            last = Some(current);
            break;
        }
        let Some(written) = last else {
            return Err(KubeStore::conflict(kind, key));
        };
        if wrote {
            let rv = written.metadata.resource_version.clone();
            self.await_seen(kind, since, &name, rv.as_deref(), Some(written))
                .await;
        }
        Ok(())
    }

    async fn delete_async(&self, kind: Kind, key: &str) -> Result<()> {
        let name = object_name(key);
        let api = &self.apis[&kind];
        let since = self.since(kind);
        let mut obj = match self.cached(kind, &name) {
            Some(o) => o,
            None => return Ok(()),
        };
        // Ask Kubernetes to delete it first: with the finalizer it stays, terminating.
        if obj.metadata.deletion_timestamp.is_none() {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(answer) => match answer.left() {
                    Some(terminating) => obj = terminating,
                    None => {
                        self.await_seen(kind, since, &name, None, None).await;
                        return Ok(());
                    }
                },
                Err(e) if api_code(&e) == Some(404) => {
                    self.await_seen(kind, since, &name, None, None).await;
                    return Ok(());
                }
                Err(e) => return Err(unavailable(kind, "delete", e)),
            }
        }
        // Then release it: removing the finalizer lets it go.
        for _ in 0..CONFLICT_RETRIES {
            let fins: Vec<String> = obj
                .metadata
                .finalizers
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|f| f != FINALIZER)
                .collect();
            let patch = json!({
                "metadata": {
                    "resourceVersion": obj.metadata.resource_version,
                    "finalizers": fins,
                }
            });
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(left) => {
                    // Other finalizers may still hold it; it is no longer bicsi's to keep.
                    let rv = if fins.is_empty() {
                        None
                    } else {
                        left.metadata.resource_version.clone()
                    };
                    let fallback = rv.is_some().then_some(left);
                    self.await_seen(kind, since, &name, rv.as_deref(), fallback)
                        .await;
                    return Ok(());
                }
                Err(e) if api_code(&e) == Some(404) => {
                    self.await_seen(kind, since, &name, None, None).await;
                    return Ok(());
                }
                Err(e) if api_code(&e) == Some(409) => match self.fetch(kind, &name).await? {
                    Some(fresh) => obj = fresh,
                    None => return Ok(()),
                },
                Err(e) => return Err(unavailable(kind, "release", e)),
            }
        }
        Err(KubeStore::conflict(kind, key))
    }
}

/// Feeds one kind's cache from its watcher until the store is dropped.
async fn run_watcher(api: Api<DynamicObject>, cache: Arc<Cache>) {
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let mut st = cache.lock();
        match event {
            Ok(event) => st.apply(event),
            Err(e) => {
                tracing::warn!(error = %e, "Kubernetes store: watch failed; retrying");
                st.last_error = Some(e.to_string());
            }
        }
        let seq = st.seq;
        drop(st);
        cache.changed.send_replace(seq);
    }
}

impl Store for KubeStore {
    fn get_raw(&self, kind: Kind, key: &str) -> Result<Option<Vec<u8>>> {
        match self.cached(kind, &object_name(key)) {
            Some(obj) => Ok(Some(self.document(kind, &obj)?)),
            None => Ok(None),
        }
    }

    fn list_raw(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>> {
        let objects: Vec<DynamicObject> = self.caches[&kind]
            .lock()
            .objects
            .values()
            .cloned()
            .collect();
        let mut out = Vec::with_capacity(objects.len());
        for obj in &objects {
            out.push((key_of(obj), self.document(kind, obj)?));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn put_raw(&self, kind: Kind, key: &str, value: &[u8]) -> Result<()> {
        self.block(self.put_async(kind, key, value))
    }

    fn delete(&self, kind: Kind, key: &str) -> Result<()> {
        self.block(self.delete_async(kind, key))
    }

    fn record_event(&self, event: crate::events::Event) {
        // A volume without a claim has no object in the cluster to carry its events.
        if matches!(event.regarding, crate::events::Regarding::Volume(_)) {
            return;
        }
        let uid = match &event.regarding {
            crate::events::Regarding::BackingImage(key) => self
                .cached(Kind::BackingImage, &object_name(key))
                .and_then(|o| o.metadata.uid),
            _ => None,
        };
        let reference = events::reference(&event.regarding, &self.namespace, uid);
        if let Err(e) = self.events.try_send(events::Queued { event, reference }) {
            tracing::warn!(error = %e, "event queue full; the event is only logged");
        }
    }

    fn cluster_namespace(&self) -> Option<String> {
        Some(self.namespace.clone())
    }

    fn read_secret(&self, namespace: &str, name: &str) -> Result<BTreeMap<String, Vec<u8>>> {
        use k8s_openapi::api::core::v1::Secret;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = self
            .block(api.get_opt(name))
            .map_err(|e| cluster_read_error("Secret", "secrets", namespace, name, e))?
            .ok_or_else(|| not_found("Secret", namespace, name))?;
        let mut data: BTreeMap<String, Vec<u8>> = secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        // stringData is write-only in a real API server; a fake or an old object may carry it.
        for (k, v) in secret.string_data.unwrap_or_default() {
            data.entry(k).or_insert_with(|| v.into_bytes());
        }
        Ok(data)
    }

    fn read_config_map(&self, namespace: &str, name: &str) -> Result<BTreeMap<String, String>> {
        use k8s_openapi::api::core::v1::ConfigMap;
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let map = self
            .block(api.get_opt(name))
            .map_err(|e| cluster_read_error("ConfigMap", "configmaps", namespace, name, e))?
            .ok_or_else(|| not_found("ConfigMap", namespace, name))?;
        Ok(map.data.unwrap_or_default())
    }
}

fn not_found(kind: &str, namespace: &str, name: &str) -> Error {
    Error::FailedPrecondition(format!(
        "{kind} {namespace}/{name} does not exist; create it, or fix the source parameters that name it"
    ))
}

/// A Secret or ConfigMap that could not be read: forbidden says which RBAC rule is missing.
fn cluster_read_error(
    kind: &str,
    plural: &str,
    namespace: &str,
    name: &str,
    e: kube::Error,
) -> Error {
    match api_code(&e) {
        Some(403) => Error::FailedPrecondition(format!(
            "{kind} {namespace}/{name}: bicsi may not read it (403); give its service account `get` on {plural} in namespace {namespace} (deploy/rbac)"
        )),
        _ => Error::Unavailable(format!(
            "{kind} {namespace}/{name}: cannot read it from the Kubernetes API ({e})"
        )),
    }
}
