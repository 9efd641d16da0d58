//! The Kubernetes store against a small in-memory API server on 127.0.0.1: it keeps objects,
//! numbers resourceVersions, answers 409 to a stale update, honours finalizers and the status
//! subresource, serves list and watch streams, and records every request so the tests can check
//! what the store asked for. As the real server does, it compacts its history (a watch from a
//! version older than the compaction gets `410 Gone`, and the client must list again), tells a
//! JSON merge patch from a strategic merge patch (which custom resources refuse with 415), and
//! prunes the fields a custom resource's schema does not know.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};

use super::*;
use crate::store::StoreExt;

pub const NS: &str = "longhorn-system";

#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
    pub status: u16,
    /// The request's content type (a PATCH says which kind of patch it is).
    pub content_type: String,
}

#[derive(Default)]
struct FakeState {
    rv: u64,
    /// (plural, name) → object.
    objects: BTreeMap<(String, String), Value>,
    /// (rv, plural, event type, object) for watches that start in the past.
    history: Vec<(u64, String, String, Value)>,
    /// The history before this version was compacted away: a watch from older gets 410.
    compacted: u64,
    log: Vec<Logged>,
}

/// The media types of the three kinds of PATCH.
const MERGE_PATCH: &str = "application/merge-patch+json";
const STRATEGIC_PATCH: &str = "application/strategic-merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";
/// What a live watch receives to end, as the server ends watches when it likes.
const CLOSE: &str = "CLOSE";

/// The OpenAPI schema of the custom resource kept under `plural`, None for built-in kinds.
fn crd_schema(plural: &str) -> Option<Value> {
    // Made once: every request asks, and generating the CRDs is not free in a debug build.
    static SCHEMAS: std::sync::OnceLock<BTreeMap<String, Value>> = std::sync::OnceLock::new();
    SCHEMAS
        .get_or_init(|| {
            Kind::ALL
                .iter()
                .map(|k| {
                    let crd = super::crd::crd(*k);
                    let schema = crd.spec.versions[0]
                        .schema
                        .as_ref()
                        .and_then(|s| s.open_api_v3_schema.as_ref())
                        .expect("a CRD with a schema");
                    (crd.spec.names.plural, serde_json::to_value(schema).unwrap())
                })
                .collect()
        })
        .get(plural)
        .cloned()
}

/// Drops what `schema` does not know, as the API server prunes a custom resource (structural
/// schemas): unknown fields of an object go unless it preserves them
/// (`x-kubernetes-preserve-unknown-fields`) or is a map (`additionalProperties`).
fn prune(value: &mut Value, schema: &Value) {
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == json!(true);
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                if !preserve {
                    map.retain(|k, _| props.contains_key(k));
                }
                for (k, v) in map.iter_mut() {
                    if let Some(s) = props.get(k) {
                        prune(v, s);
                    }
                }
            } else if let Some(items) = schema.get("additionalProperties").filter(|a| a.is_object())
            {
                for v in map.values_mut() {
                    prune(v, items);
                }
            } else if !preserve && schema["type"] == json!("object") {
                map.clear();
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for v in items {
                    prune(v, s);
                }
            }
        }
        _ => {}
    }
}

/// A custom resource as the API server keeps it: its root fields other than apiVersion, kind
/// and metadata pruned by its CRD's schema.
fn pruned(plural: &str, mut obj: Value) -> Value {
    if let Some(schema) = crd_schema(plural)
        && let Some(map) = obj.as_object_mut()
    {
        let props = schema["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        map.retain(|k, _| {
            matches!(k.as_str(), "apiVersion" | "kind" | "metadata") || props.contains_key(k)
        });
        for (k, v) in map.iter_mut() {
            if let Some(s) = props.get(k) {
                prune(v, s);
            }
        }
    }
    obj
}

#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<FakeState>>,
    events: tokio::sync::broadcast::Sender<(u64, String, String, Value)>,
}

fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// RFC 7386.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn has_status_subresource(plural: &str) -> bool {
    plural == "backingimages"
}

/// The apiVersion of the objects kept under `plural` (see [`FakeApi::resource`]).
fn api_version_of(plural: &str) -> &'static str {
    if plural.starts_with("events.") {
        "events.k8s.io/v1"
    } else if plural.starts_with("persistentvolumeclaims.") || plural == "nodes" {
        "v1"
    } else {
        "longhorn.io/v1beta2"
    }
}

impl FakeApi {
    /// Starts the server; returns it and a client for it.
    pub async fn start() -> (FakeApi, kube::Client) {
        let fake = FakeApi {
            state: Arc::default(),
            events: tokio::sync::broadcast::channel(1024).0,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let f = fake.clone();
        let app = axum::Router::new().fallback(move |req: Request<Body>| {
            let f = f.clone();
            async move { f.handle(req).await }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        config.default_namespace = NS.to_string();
        (fake, kube::Client::try_from(config).unwrap())
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }

    /// Writes (not through the store) as another client would; `silent` leaves the watchers
    /// unaware, as a watch that lags behind.
    pub fn modify(&self, plural: &str, name: &str, silent: bool, f: impl FnOnce(&mut Value)) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let obj = st
            .objects
            .get_mut(&(plural.to_string(), name.to_string()))
            .expect("object to modify");
        f(obj);
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let obj = obj.clone();
        if !silent {
            st.history
                .push((rv, plural.to_string(), "MODIFIED".into(), obj.clone()));
            let _ = self
                .events
                .send((rv, plural.into(), "MODIFIED".into(), obj));
        }
    }

    /// `kubectl apply` of a new object.
    pub fn kubectl_create(&self, plural: &str, manifest: Value) {
        let mut st = self.state.lock().unwrap();
        let (code, v) = self.route(
            &mut st,
            &Method::POST,
            &[plural.to_string()],
            &manifest,
            "application/json",
        );
        assert_eq!(code, 201, "{v}");
    }

    /// `kubectl apply` of a core object (`secrets`, `configmaps`) in namespace `ns`.
    pub fn put_core(&self, ns: &str, plural: &str, name: &str, obj: Value) {
        self.state
            .lock()
            .unwrap()
            .objects
            .insert((format!("core/{ns}/{plural}"), name.to_string()), obj);
    }

    /// `kubectl delete`.
    pub fn kubectl_delete(&self, plural: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        let (code, v) = self.route(
            &mut st,
            &Method::DELETE,
            &[plural.to_string(), name.to_string()],
            &Value::Null,
            "application/json",
        );
        assert_eq!(code, 200, "{v}");
    }

    /// Compacts the history (a watch from before now gets 410 Gone) and ends every live watch,
    /// as the API server does: its watchers come back from where they were and must list again.
    pub fn compact_and_end_watches(&self) {
        let mut st = self.state.lock().unwrap();
        st.compacted = st.rv;
        st.history.clear();
        let _ = self
            .events
            .send((u64::MAX, String::new(), CLOSE.into(), Value::Null));
    }

    pub fn object(&self, plural: &str, name: &str) -> Option<Value> {
        let st = self.state.lock().unwrap();
        st.objects
            .get(&(plural.to_string(), name.to_string()))
            .cloned()
    }

    /// Records a change and tells the watchers.
    fn emit(&self, st: &mut FakeState, plural: &str, kind: &str, obj: Value) {
        let rv: u64 = obj["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        st.history
            .push((rv, plural.to_string(), kind.to_string(), obj.clone()));
        let _ = self
            .events
            .send((rv, plural.to_string(), kind.to_string(), obj));
    }

    /// Stores `obj` as the new state of (plural, name): deleted when it is terminating and
    /// holds no finalizer.
    fn commit(&self, st: &mut FakeState, plural: &str, name: &str, mut obj: Value) -> Value {
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let key = (plural.to_string(), name.to_string());
        let terminating = obj["metadata"]["deletionTimestamp"].is_string();
        let fins = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if terminating && !fins {
            st.objects.remove(&key);
            self.emit(st, plural, "DELETED", obj.clone());
        } else {
            st.objects.insert(key, obj.clone());
            self.emit(st, plural, "MODIFIED", obj.clone());
        }
        obj
    }

    async fn handle(&self, req: Request<Body>) -> Response {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = axum::body::to_bytes(req.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let entry = Logged {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            body: body.clone(),
            status: 0,
            content_type,
        };
        // Core objects (Secrets, ConfigMaps) a source names: read only, by name.
        if let Some(rest) = path.strip_prefix("/api/v1/namespaces/")
            && let parts = rest.split('/').collect::<Vec<&str>>()
            && matches!(parts.get(1), Some(&"secrets") | Some(&"configmaps"))
        {
            let (code, v) = match (method.clone(), parts.as_slice()) {
                (Method::GET, [ns, plural, name]) => {
                    let st = self.state.lock().unwrap();
                    match st
                        .objects
                        .get(&(format!("core/{ns}/{plural}"), name.to_string()))
                    {
                        Some(o) => (200, o.clone()),
                        None => status(404, "NotFound", format!("{plural} {name:?} not found")),
                    }
                }
                _ => status(405, "MethodNotAllowed", format!("no route {method} {path}")),
            };
            return self.answer(entry, code, v);
        }
        let Some(parts) = FakeApi::resource(&path) else {
            let (code, v) = status(404, "NotFound", format!("no route {path}"));
            return self.answer(entry, code, v);
        };
        let plural = parts[0].clone();
        if method == Method::GET && parts.len() == 1 && query.contains("watch=") {
            return self.watch(&plural, entry);
        }
        let (code, v) = {
            let mut st = self.state.lock().unwrap();
            self.route(&mut st, &method, &parts, &body, &entry.content_type)
        };
        self.answer(entry, code, v)
    }

    /// The path's resource as [plural, name, subresource]: bicsi's kinds in [`NS`] by their
    /// plural; Events (`events.k8s.io/v1`) and PVCs of any namespace as `events.NS` and
    /// `persistentvolumeclaims.NS`; Nodes as `nodes`.
    fn resource(path: &str) -> Option<Vec<String>> {
        let split = |rest: &str| rest.split('/').map(String::from).collect::<Vec<_>>();
        if let Some(rest) =
            path.strip_prefix(&format!("/apis/longhorn.io/v1beta2/namespaces/{NS}/"))
        {
            return Some(split(rest));
        }
        let namespaced = |prefix: &str, plural: &str| {
            let rest = path.strip_prefix(prefix)?;
            let (ns, rest) = rest.split_once('/')?;
            let rest = rest.strip_prefix(plural)?;
            let mut parts = vec![format!("{plural}.{ns}")];
            parts.extend(rest.split('/').filter(|p| !p.is_empty()).map(String::from));
            Some(parts)
        };
        if let Some(parts) = namespaced("/apis/events.k8s.io/v1/namespaces/", "events") {
            return Some(parts);
        }
        if let Some(parts) = namespaced("/api/v1/namespaces/", "persistentvolumeclaims") {
            return Some(parts);
        }
        path.strip_prefix("/api/v1/")
            .filter(|r| r.starts_with("nodes"))
            .map(split)
    }

    /// Every Event (`events.k8s.io/v1`) stored, in any namespace.
    pub fn events(&self) -> Vec<Value> {
        let st = self.state.lock().unwrap();
        st.objects
            .iter()
            .filter(|((p, _), _)| p.starts_with("events."))
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Logs the request with the status it got and answers it.
    fn answer(&self, mut entry: Logged, code: u16, v: Value) -> Response {
        entry.status = code;
        self.state.lock().unwrap().log.push(entry);
        (
            StatusCode::from_u16(code).unwrap(),
            [("content-type", "application/json")],
            v.to_string(),
        )
            .into_response()
    }

    fn route(
        &self,
        st: &mut FakeState,
        method: &Method,
        parts: &[String],
        body: &Value,
        content_type: &str,
    ) -> (u16, Value) {
        let plural = parts[0].as_str();
        let name = parts.get(1).cloned().unwrap_or_default();
        let key = (plural.to_string(), name.clone());
        let sub_status = parts.get(2).map(String::as_str) == Some("status");
        match (method.clone(), parts.len()) {
            (Method::GET, 1) => {
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|((p, _), _)| p == plural)
                    .map(|(_, o)| o.clone())
                    .collect();
                (
                    200,
                    json!({"apiVersion": "longhorn.io/v1beta2", "kind": "List",
                           "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
                )
            }
            (Method::POST, 1) => {
                if body["apiVersion"] != api_version_of(plural) || !body["kind"].is_string() {
                    return status(400, "BadRequest", "Object 'Kind' is missing".into());
                }
                if plural.starts_with("events.") {
                    let ns = plural.trim_start_matches("events.");
                    if body["metadata"]["namespace"]
                        .as_str()
                        .is_some_and(|n| n != ns)
                    {
                        return status(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request".into());
                    }
                    if let Err(why) = crate::events::validate(body) {
                        return status(
                            422,
                            "Invalid",
                            format!("Event {:?} is invalid: {why}", body["metadata"]["name"]),
                        );
                    }
                }
                let name = body["metadata"]["name"].as_str().unwrap_or("").to_string();
                if st.objects.contains_key(&(plural.to_string(), name.clone())) {
                    return status(
                        409,
                        "AlreadyExists",
                        format!("{plural} {name:?} already exists"),
                    );
                }
                let mut obj = pruned(plural, body.clone());
                if has_status_subresource(plural) {
                    obj.as_object_mut().unwrap().remove("status");
                }
                obj["metadata"]["uid"] = json!(format!("uid-{}", st.rv + 1));
                obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                st.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                st.objects.insert((plural.to_string(), name), obj.clone());
                self.emit(st, plural, "ADDED", obj.clone());
                (201, obj)
            }
            (Method::GET, 2) => match st.objects.get(&key) {
                Some(o) => (200, o.clone()),
                None => status(404, "NotFound", format!("{plural} {name:?} not found")),
            },
            (Method::PUT, 2) => {
                let Some(old) = st.objects.get(&key).cloned() else {
                    return status(404, "NotFound", format!("{plural} {name:?} not found"));
                };
                if body["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"] {
                    return status(
                        409,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {plural} {name:?}: the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    );
                }
                let mut obj = pruned(plural, body.clone());
                if has_status_subresource(plural) {
                    match old.get("status") {
                        Some(s) => obj["status"] = s.clone(),
                        None => {
                            obj.as_object_mut().unwrap().remove("status");
                        }
                    }
                }
                for f in ["uid", "creationTimestamp", "deletionTimestamp"] {
                    if let Some(v) = old["metadata"].get(f) {
                        obj["metadata"][f] = v.clone();
                    }
                }
                (200, self.commit(st, plural, &name, obj))
            }
            (Method::PATCH, 2) | (Method::PATCH, 3) => {
                let Some(old) = st.objects.get(&key).cloned() else {
                    return status(404, "NotFound", format!("{plural} {name:?} not found"));
                };
                if let Some(rv) = body["metadata"].get("resourceVersion")
                    && *rv != old["metadata"]["resourceVersion"]
                {
                    return status(
                        409,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {plural} {name:?}: the object has been modified"
                        ),
                    );
                }
                let custom = crd_schema(plural).is_some();
                match content_type.split(';').next().unwrap_or("").trim() {
                    MERGE_PATCH => {}
                    // Built-in kinds take a strategic merge patch; for the kinds these tests
                    // keep (Events, Nodes, PVCs) it merges maps as a JSON merge patch does.
                    STRATEGIC_PATCH if !custom => {}
                    STRATEGIC_PATCH => {
                        return status(
                            415,
                            "UnsupportedMediaType",
                            format!(
                                "the body of the request was in an unknown format - accepted media types include: {JSON_PATCH}, {MERGE_PATCH}, application/apply-patch+yaml"
                            ),
                        );
                    }
                    other => {
                        return status(
                            415,
                            "UnsupportedMediaType",
                            format!(
                                "the fake API server takes a JSON merge patch ({MERGE_PATCH}) or, for built-in kinds, a strategic merge patch, not {other:?}"
                            ),
                        );
                    }
                }
                let mut obj = old.clone();
                merge(&mut obj, body);
                let obj_pruned = pruned(plural, obj);
                let mut obj = obj_pruned;
                if plural.starts_with("events.")
                    && let Err(why) = crate::events::validate(&obj)
                {
                    return status(422, "Invalid", format!("Event {name:?} is invalid: {why}"));
                }
                if sub_status {
                    let status = obj.get("status").cloned();
                    obj = old.clone();
                    if let Some(s) = status {
                        obj["status"] = s;
                    }
                } else if has_status_subresource(plural) {
                    match old.get("status") {
                        Some(s) => obj["status"] = s.clone(),
                        None => {
                            obj.as_object_mut().unwrap().remove("status");
                        }
                    }
                }
                (200, self.commit(st, plural, &name, obj))
            }
            (Method::DELETE, 2) => {
                let Some(old) = st.objects.get(&key).cloned() else {
                    return status(404, "NotFound", format!("{plural} {name:?} not found"));
                };
                let fins = old["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty());
                if fins {
                    let mut obj = old.clone();
                    if !obj["metadata"]["deletionTimestamp"].is_string() {
                        obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:01Z");
                        return (200, self.commit(st, plural, &name, obj));
                    }
                    return (200, obj);
                }
                st.objects.remove(&key);
                st.rv += 1;
                let mut obj = old;
                obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                self.emit(st, plural, "DELETED", obj);
                (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                )
            }
            _ => status(405, "MethodNotAllowed", format!("{method} {parts:?}")),
        }
    }

    /// A watch from the resourceVersion in the query: past events, then live ones.
    /// Logged with the status the watcher sees: 200, or 410 for a version compacted away.
    fn watch(&self, plural: &str, mut entry: Logged) -> Response {
        let from: u64 = entry
            .query
            .split('&')
            .find_map(|kv| kv.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (past, live) = {
            let mut st = self.state.lock().unwrap();
            let gone = from != 0 && from < st.compacted;
            entry.status = if gone { 410 } else { 200 };
            st.log.push(entry);
            if gone {
                // The real server answers 200 and sends one ERROR event with a 410 Status.
                let (_, gone) = status(
                    410,
                    "Expired",
                    format!("too old resource version: {from} ({})", st.compacted),
                );
                let line = format!("{}\n", json!({"type": "ERROR", "object": gone}));
                return (StatusCode::OK, [("content-type", "application/json")], line)
                    .into_response();
            }
            let live = self.events.subscribe();
            let past: Vec<(u64, String, String, Value)> = st
                .history
                .iter()
                .filter(|(rv, p, _, _)| *rv > from && p == plural)
                .cloned()
                .collect();
            (past, live)
        };
        let last = past.last().map(|e| e.0).unwrap_or(from);
        let plural = plural.to_string();
        let line = |(_, _, t, o): (u64, String, String, Value)| {
            Ok::<_, std::io::Error>(format!("{}\n", json!({"type": t, "object": o})))
        };
        let live = futures::stream::unfold(live, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(e) => return Some((e, rx)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return None,
                }
            }
        })
        .take_while(|(_, _, t, _)| std::future::ready(t != CLOSE))
        .filter(move |(rv, p, _, _)| std::future::ready(*rv > last && *p == plural));
        let stream = futures::stream::iter(past).chain(live).map(line);
        (
            StatusCode::OK,
            [("content-type", "application/json")],
            Body::from_stream(stream),
        )
            .into_response()
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn store() -> (FakeApi, KubeStore) {
    let (fake, client) = FakeApi::start().await;
    let store = KubeStore::new(client, NS).await.unwrap();
    (fake, store)
}

/// Runs a synchronous test body (the `Store` trait is synchronous) on a multi-threaded runtime.
fn with_store(body: impl FnOnce(&FakeApi, &KubeStore) + Send) {
    runtime().block_on(async {
        let (fake, store) = store().await;
        tokio::task::block_in_place(|| body(&fake, &store));
    });
}

fn requests(fake: &FakeApi, method: &str) -> Vec<Logged> {
    fake.log()
        .into_iter()
        .filter(|l| l.method == method)
        .collect()
}

/// The requests made other than the store's watches, as (method, status).
fn calls(fake: &FakeApi) -> Vec<(String, u16)> {
    fake.log()
        .into_iter()
        .filter(|l| !l.query.contains("watch"))
        .map(|l| (l.method, l.status))
        .collect()
}

#[test]
fn passes_store_conformance() {
    let rt = runtime();
    rt.block_on(async {
        tokio::task::block_in_place(|| {
            crate::store::conformance::run_all(&|| {
                let (_fake, store) = tokio::runtime::Handle::current().block_on(store());
                Box::new(store)
            });
        });
    });
}

#[test]
fn create_carries_the_finalizer_and_the_key() {
    with_store(|fake, s| {
        s.put_raw(Kind::Volume, "pvc-1", br#"{"id":"pvc-1"}"#)
            .unwrap();
        let posts = requests(fake, "POST");
        assert_eq!(posts.len(), 1, "{posts:?}");
        assert!(
            posts[0].path.ends_with("/bicsivolumes"),
            "{}",
            posts[0].path
        );
        assert_eq!(posts[0].body["kind"], "BicsiVolume");
        assert_eq!(posts[0].body["metadata"]["finalizers"], json!([FINALIZER]));
        assert_eq!(posts[0].body["spec"], json!({"id": "pvc-1"}));
        // Keys Kubernetes does not accept as names are stored under a digest.
        s.put_raw(Kind::Volume, "Data_Vol", br#"{"id":"Data_Vol"}"#)
            .unwrap();
        let name = object_name("Data_Vol");
        assert!(name.starts_with("k-"), "{name}");
        let obj = fake.object("bicsivolumes", &name).unwrap();
        assert_eq!(obj["metadata"]["annotations"][KEY_ANNOTATION], "Data_Vol");
        let keys: Vec<String> = s
            .list_raw(Kind::Volume)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["Data_Vol", "pvc-1"]);
        // A second identical put writes nothing.
        fake.clear_log();
        s.put_raw(Kind::Volume, "pvc-1", br#"{"id":"pvc-1"}"#)
            .unwrap();
        assert!(fake.log().is_empty(), "{:?}", fake.log());
    });
}

#[test]
fn reads_come_from_the_watch_not_from_requests() {
    with_store(|fake, s| {
        s.put_raw(Kind::Setting, "interval", br#"{"value":"60"}"#)
            .unwrap();
        let watches: Vec<Logged> = fake
            .log()
            .into_iter()
            .filter(|l| l.query.contains("watch=true") && l.path.ends_with("/bicsisettings"))
            .collect();
        assert!(
            !watches.is_empty(),
            "no watch of bicsisettings: {:?}",
            fake.log()
        );
        fake.clear_log();
        // Another client changes it: the store learns it from the watch alone.
        fake.modify("bicsisettings", "interval", false, |o| {
            o["spec"]["value"] = json!("90")
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let v: Value = s.get(Kind::Setting, "interval").unwrap().unwrap();
            if v["value"] == "90" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the watch never delivered the change"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // The store's watches of every kind start (and restart) in the background on their
        // own schedule: a watch of another kind that opens now is not a read. Seen in a full
        // run: the bicsirestores watch's first request landed after clear_log.
        let requests: Vec<Logged> = fake
            .log()
            .into_iter()
            .filter(|l| !l.query.contains("watch=true"))
            .collect();
        assert!(requests.is_empty(), "reads made requests: {requests:?}");
    });
}

#[test]
fn a_stale_update_is_retried_when_only_metadata_moved() {
    with_store(|fake, s| {
        s.put_raw(Kind::Volume, "v", br#"{"size":1}"#).unwrap();
        // Someone adds a label; the store's watch has not seen it yet.
        fake.modify("bicsivolumes", "v", true, |o| {
            o["metadata"]["labels"] = json!({"team": "a"})
        });
        fake.clear_log();
        s.put_raw(Kind::Volume, "v", br#"{"size":2}"#).unwrap();
        let log = calls(fake);
        assert_eq!(
            log,
            [
                ("PUT".into(), 409),
                ("GET".into(), 200),
                ("PUT".into(), 200)
            ]
        );
        let obj = fake.object("bicsivolumes", "v").unwrap();
        assert_eq!(obj["spec"], json!({"size": 2}));
        assert_eq!(obj["metadata"]["labels"]["team"], "a");
        assert_eq!(
            s.get::<Value>(Kind::Volume, "v").unwrap().unwrap()["size"],
            2
        );
    });
}

#[test]
fn a_stale_update_over_someone_elses_spec_is_a_conflict() {
    with_store(|fake, s| {
        s.put_raw(Kind::Volume, "v", br#"{"size":1}"#).unwrap();
        fake.modify("bicsivolumes", "v", true, |o| {
            o["spec"] = json!({"size": 5})
        });
        let err = s.put_raw(Kind::Volume, "v", br#"{"size":2}"#).unwrap_err();
        assert!(matches!(err, Error::Aborted(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("BicsiVolume \"v\" was changed by someone else"),
            "{err}"
        );
        // Nothing of the losing write reached the object.
        assert_eq!(
            fake.object("bicsivolumes", "v").unwrap()["spec"],
            json!({"size": 5})
        );
    });
}

fn image(status: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "longhorn.io/v1beta2",
        "kind": "BackingImage",
        "metadata": {"name": "bi-download", "namespace": NS},
        "spec": {"sourceType": "download", "sourceParameters": {"url": "http://x/parrot.raw"},
                 "checksum": "", "minNumberOfCopies": 1},
        "status": status,
    }))
    .unwrap()
}

#[test]
fn backing_image_status_goes_through_the_status_subresource() {
    with_store(|fake, s| {
        let two = json!({"uuid": "u1", "diskFileStatusMap": {
            "d1": {"state": "ready", "progress": 100, "lastStateTransitionTime": "t"},
            "d2": {"state": "in-progress", "progress": 40, "lastStateTransitionTime": "t"}}});
        s.put_raw(Kind::BackingImage, "bi-download", &image(two.clone()))
            .unwrap();
        let post = &requests(fake, "POST")[0];
        assert!(post.path.ends_with("/backingimages"));
        assert!(
            post.body.get("status").is_none(),
            "status sent with the spec: {:?}",
            post.body
        );
        let patches = requests(fake, "PATCH");
        assert_eq!(patches.len(), 1, "{patches:?}");
        assert!(
            patches[0]
                .path
                .ends_with("/backingimages/bi-download/status"),
            "{}",
            patches[0].path
        );
        assert!(patches[0].body["metadata"]["resourceVersion"].is_string());
        assert_eq!(patches[0].body["status"], two);
        let back: crate::backing::object::BackingImage =
            s.get(Kind::BackingImage, "bi-download").unwrap().unwrap();
        assert_eq!(back.status.uuid, "u1");
        assert_eq!(back.metadata.namespace, NS);

        // A disk's file goes away: the patch says so with null, and the spec is not rewritten.
        fake.clear_log();
        let one = json!({"uuid": "u1", "diskFileStatusMap": {"d1": {"state": "ready", "progress": 100, "lastStateTransitionTime": "t"}}});
        s.put_raw(Kind::BackingImage, "bi-download", &image(one.clone()))
            .unwrap();
        assert!(requests(fake, "PUT").is_empty(), "{:?}", fake.log());
        let patches = requests(fake, "PATCH");
        assert_eq!(patches.len(), 1);
        assert_eq!(
            patches[0].body["status"],
            json!({"diskFileStatusMap": {"d2": null}})
        );
        assert_eq!(
            fake.object("backingimages", "bi-download").unwrap()["status"],
            one
        );

        // A stale status write (the watch lags a user's label) is retried on the fresh object.
        fake.modify("backingimages", "bi-download", true, |o| {
            o["metadata"]["labels"] = json!({"x": "y"})
        });
        fake.clear_log();
        let later = json!({"uuid": "u1", "size": 7, "diskFileStatusMap": {"d1": {"state": "ready", "progress": 100, "lastStateTransitionTime": "t"}}});
        s.put_raw(Kind::BackingImage, "bi-download", &image(later.clone()))
            .unwrap();
        let statuses: Vec<u16> = requests(fake, "PATCH").iter().map(|l| l.status).collect();
        assert_eq!(statuses, [409, 200]);
        assert_eq!(
            fake.object("backingimages", "bi-download").unwrap()["status"]["size"],
            7
        );
    });
}

#[test]
fn the_seeds_manifest_created_by_kubectl_reads_as_a_backing_image() {
    with_store(|fake, s| {
        // What `kubectl apply` of the seed's bi-download sends, straight to the API server.
        let manifest = json!({
            "apiVersion": "longhorn.io/v1beta2", "kind": "BackingImage",
            "metadata": {"name": "bi-download", "namespace": NS},
            "spec": {"sourceType": "download",
                     "sourceParameters": {"url": "https://longhorn-backing-image.s3-us-west-1.amazonaws.com/parrot.raw"},
                     "checksum": "304f3ed30ca6878e9056ee6f1b02b328239f0d0c2c1272840998212f9734b196371560b3b939037e4f4c2884ce457c2cbc9f0621f4f5d1ca983983c8cdf8cd9a"}
        });
        let mut st = fake.state.lock().unwrap();
        let obj = fake.commit(&mut st, "backingimages", "bi-download", manifest);
        drop(st);
        let rv = obj["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let bi = loop {
            if let Some(bi) = s
                .get::<crate::backing::object::BackingImage>(Kind::BackingImage, "bi-download")
                .unwrap()
            {
                break bi;
            }
            assert!(std::time::Instant::now() < deadline, "never seen (rv {rv})");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(
            bi.spec.source_type,
            crate::backing::object::SourceType::Download
        );
        assert!(bi.spec.checksum.starts_with("304f3ed3"));
        assert_eq!(bi.spec.min_number_of_copies, 1);
        assert!(bi.status.uuid.is_empty());
    });
}

#[test]
fn delete_removes_the_finalizer_last() {
    with_store(|fake, s| {
        s.put_raw(Kind::Volume, "v", br#"{"size":1}"#).unwrap();
        fake.clear_log();
        s.delete(Kind::Volume, "v").unwrap();
        let log = calls(fake);
        assert_eq!(log, [("DELETE".into(), 200), ("PATCH".into(), 200)]);
        let patch = &requests(fake, "PATCH")[0];
        assert_eq!(patch.body["metadata"]["finalizers"], json!([]));
        assert!(fake.object("bicsivolumes", "v").is_none());
        assert_eq!(s.get_raw(Kind::Volume, "v").unwrap(), None);
    });
}

#[test]
fn kubectl_delete_leaves_the_object_until_bicsi_releases_it() {
    with_store(|fake, s| {
        s.put_raw(Kind::Volume, "v", br#"{"size":1}"#).unwrap();
        // `kubectl delete`: the finalizer keeps the object, marked for deletion.
        let mut st = fake.state.lock().unwrap();
        let (code, _) = fake.route(
            &mut st,
            &Method::DELETE,
            &["bicsivolumes".into(), "v".into()],
            &Value::Null,
            "application/json",
        );
        drop(st);
        assert_eq!(code, 200);
        assert!(fake.object("bicsivolumes", "v").is_some());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.terminating(Kind::Volume) != ["v"] {
            assert!(
                std::time::Instant::now() < deadline,
                "the deletion was never seen"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // The record is still readable while its replicas are being removed.
        assert!(s.get_raw(Kind::Volume, "v").unwrap().is_some());
        fake.clear_log();
        s.delete(Kind::Volume, "v").unwrap();
        let log: Vec<String> = calls(fake).into_iter().map(|(m, _)| m).collect();
        assert_eq!(
            log,
            ["PATCH"],
            "already terminating: only the finalizer goes"
        );
        assert!(fake.object("bicsivolumes", "v").is_none());
        assert!(s.terminating(Kind::Volume).is_empty());
    });
}

#[test]
fn start_fails_clearly_without_the_crds() {
    runtime().block_on(async {
        // A server that knows no longhorn.io resources.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(|| async {
            (StatusCode::NOT_FOUND, [("content-type", "application/json")],
             r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","code":404}"#)
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        config.default_namespace = NS.to_string();
        let client = kube::Client::try_from(config).unwrap();
        let err = KubeStore::start(client, NS, std::time::Duration::from_secs(2))
            .await
            .err()
            .expect("must fail");
        let msg = err.to_string();
        assert!(msg.contains("apply deploy/crds.yaml"), "{msg}");
        assert!(matches!(err, Error::Unavailable(_)));
    });
}

#[test]
fn merge_diff_nulls_removed_keys_and_skips_equal_ones() {
    let cases = [
        (json!({"a": 1, "b": 2}), json!({"a": 1}), json!({"b": null})),
        (
            json!({"m": {"x": 1, "y": 2}}),
            json!({"m": {"x": 1, "y": 3}}),
            json!({"m": {"y": 3}}),
        ),
        (json!({}), json!({"a": [1]}), json!({"a": [1]})),
        (json!({"a": {"x": 1}}), json!({"a": 5}), json!({"a": 5})),
    ];
    for (old, new, want) in cases {
        assert_eq!(merge_diff(&old, &new), want, "{old} -> {new}");
        let mut applied = old.clone();
        merge(&mut applied, &merge_diff(&old, &new));
        assert_eq!(applied, new);
    }
}

#[test]
fn object_names_are_valid_kubernetes_names() {
    for (key, same) in [
        ("pvc-0a1b", true),
        ("node-1.example.com", true),
        ("Vol", false),
        ("a_b", false),
        ("-a", false),
        ("", false),
    ] {
        let name = object_name(key);
        assert_eq!(name == key, same, "{key:?} -> {name}");
        assert!(name.len() <= 253 && !name.is_empty());
    }
    assert_ne!(object_name("Vol"), object_name("vol-x"));
}

/// The server compacts its history and ends its watches: the store's watcher comes back from
/// the version it had seen, gets 410 Gone, and lists again, so it learns a change no watch
/// event carried (one made while it was away, whose event the compaction dropped).
#[test]
fn a_watch_from_a_compacted_version_gets_gone_and_the_store_lists_again() {
    with_store(|fake, s| {
        s.put_raw(Kind::Setting, "interval", br#"{"value":"60"}"#)
            .unwrap();
        fake.modify("bicsisettings", "interval", true, |o| {
            o["spec"]["value"] = json!("90")
        });
        fake.clear_log();
        fake.compact_and_end_watches();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let v: Value = s.get(Kind::Setting, "interval").unwrap().unwrap();
            if v["value"] == "90" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the store never listed again: {:?}",
                fake.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let of_settings: Vec<(bool, u16)> = fake
            .log()
            .into_iter()
            .filter(|l| l.method == "GET" && l.path.ends_with("/bicsisettings"))
            .map(|l| (l.query.contains("watch="), l.status))
            .collect();
        let gone = of_settings
            .iter()
            .position(|c| *c == (true, 410))
            .unwrap_or_else(|| panic!("no watch answered 410: {of_settings:?}"));
        assert!(
            of_settings[gone..].contains(&(false, 200)),
            "no list after the 410: {of_settings:?}"
        );
    });
}

/// The store patches with JSON merge patches (RFC 7386), the only merge patch a custom
/// resource takes: the fake refuses a strategic merge patch on one with 415, as the real
/// server does, and would fail every test of the store's patches if it sent one.
#[test]
fn patches_are_json_merge_patches_as_custom_resources_need() {
    with_store(|fake, s| {
        s.put_raw(Kind::BackingImage, "bi-download", &image(json!({})))
            .unwrap();
        s.put_raw(
            Kind::BackingImage,
            "bi-download",
            &image(json!({"uuid": "u-1", "size": 5})),
        )
        .unwrap();
        s.delete(Kind::BackingImage, "bi-download").unwrap();
        let patches = requests(fake, "PATCH");
        assert!(!patches.is_empty(), "{:?}", fake.log());
        for p in &patches {
            assert!(
                p.content_type.starts_with(MERGE_PATCH),
                "{} {}: {:?}",
                p.path,
                p.status,
                p.content_type
            );
            assert_eq!(p.status, 200, "{p:?}");
        }
    });
    runtime().block_on(async {
        let (fake, client) = FakeApi::start().await;
        fake.kubectl_create(
            "bicsivolumes",
            json!({"apiVersion": "longhorn.io/v1beta2", "kind": "BicsiVolume",
                   "metadata": {"name": "v", "namespace": NS, "finalizers": ["a", "b"]},
                   "spec": {"size": 1}}),
        );
        let api: Api<DynamicObject> =
            Api::namespaced_with(client, NS, &super::crd::api_resource(Kind::Volume));
        let strategic = api
            .patch(
                "v",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"size": 2}})),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&strategic, kube::Error::Api(s) if s.code == 415),
            "{strategic:?}"
        );
        // A JSON merge patch replaces a list whole.
        api.patch(
            "v",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["b"]}, "spec": {"size": 2}})),
        )
        .await
        .unwrap();
        let obj = fake.object("bicsivolumes", "v").unwrap();
        assert_eq!(obj["metadata"]["finalizers"], json!(["b"]));
        assert_eq!(obj["spec"], json!({"size": 2}));
    });
}

/// The server prunes what a custom resource's schema does not know: a manifest's unknown
/// fields are gone from what is stored and the store reads the rest; what the store itself
/// writes (a record kept whole, a backing image's spec and status) is all kept.
#[test]
fn unknown_fields_are_pruned_by_the_schema_and_the_store_keeps_what_it_writes() {
    with_store(|fake, s| {
        fake.kubectl_create(
            "backingimages",
            json!({"apiVersion": "longhorn.io/v1beta2", "kind": "BackingImage",
                   "metadata": {"name": "bi-x", "namespace": NS},
                   "extra": true,
                   "spec": {"sourceType": "download",
                            "sourceParameters": {"url": "http://x/a.raw"},
                            "checksum": "", "minNumberOfCopies": 2,
                            "notAField": {"deep": 1}}}),
        );
        let stored = fake.object("backingimages", "bi-x").unwrap();
        assert!(stored.get("extra").is_none(), "{stored}");
        assert!(stored["spec"].get("notAField").is_none(), "{stored}");
        assert_eq!(stored["spec"]["minNumberOfCopies"], 2);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let bi = loop {
            if let Some(bi) = s
                .get::<crate::backing::object::BackingImage>(Kind::BackingImage, "bi-x")
                .unwrap()
            {
                break bi;
            }
            assert!(std::time::Instant::now() < deadline, "never seen");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(bi.spec.min_number_of_copies, 2);

        let record = json!({"id": "v", "nested": {"any": [1, {"x": null}]}, "size": 3});
        s.put_raw(Kind::Volume, "v", &serde_json::to_vec(&record).unwrap())
            .unwrap();
        assert_eq!(fake.object("bicsivolumes", "v").unwrap()["spec"], record);
        let status = json!({"uuid": "u-1", "size": 5});
        s.put_raw(Kind::BackingImage, "bi-download", &image(json!({})))
            .unwrap();
        s.put_raw(Kind::BackingImage, "bi-download", &image(status.clone()))
            .unwrap();
        let written: Value = serde_json::from_slice(&image(status)).unwrap();
        let stored = fake.object("backingimages", "bi-download").unwrap();
        for (k, v) in written["status"].as_object().unwrap() {
            assert_eq!(&stored["status"][k], v, "status.{k} was pruned: {stored}");
        }
        for (k, v) in written["spec"].as_object().unwrap() {
            assert_eq!(&stored["spec"][k], v, "spec.{k} was pruned: {stored}");
        }
    });
}
