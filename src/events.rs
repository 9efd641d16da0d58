//! What bicsi tells the cluster about the objects users look at: Kubernetes Events on the
//! PersistentVolumeClaim of a volume, on a BackingImage and on a node (image preparation
//! started, its progress at 25/50/75 %, ready, failed with the reason, cleanup; a volume
//! degraded, faulted or healthy again; a rebuild started or finished).
//!
//! The domain calls [`emit`] once per event with the store it already holds. Every event is
//! logged (the only place it goes with the embedded store); the Kubernetes store also
//! publishes it (`crate::store::kubernetes::events`) after the [`Correlator`] here has decided
//! what to write, as client-go's recorder does: a repeat of the same reason and note on the
//! same object updates one Event's `series` (count, last seen) instead of creating another;
//! more than [`SIMILAR_MAX`] different notes with one reason on one object within
//! [`SIMILAR_WINDOW`] are folded into one "combined from similar events" Event; and each object
//! has a token bucket ([`BURST`] events, one more every [`REFILL`]) past which events are
//! dropped, so a burst is bounded. [`validate`] holds the API server's rules for an
//! `events.k8s.io/v1` Event; the publisher and the tests' fake API server both call it.
//!
//! This module decides nothing about volumes or images and must not block the caller: it
//! only logs, and hands the event to the store.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::model::{ClaimRef, Volume};

/// Events per object before the bucket runs dry (client-go's spam filter: 25).
pub const BURST: u32 = 25;
/// One more event per object each this long once the bucket ran dry (client-go: 5 minutes).
pub const REFILL: Duration = Duration::from_secs(300);
/// Different notes of one reason on one object before they are combined (client-go: 10).
pub const SIMILAR_MAX: usize = 10;
/// The window in which different notes count as similar (client-go: 10 minutes).
pub const SIMILAR_WINDOW: Duration = Duration::from_secs(600);
/// How long after its last occurrence a repeat still updates the same Event.
pub const SERIES_TTL: Duration = Duration::from_secs(1800);
/// The prefix of a combined event's note (client-go's words).
pub const COMBINED: &str = "(combined from similar events): ";
/// The API server's limits.
pub const MAX_NOTE: usize = 1024;
pub const MAX_SHORT: usize = 128;

/// The object an event is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Regarding {
    /// A BackingImage, by its store key.
    BackingImage(String),
    /// The PersistentVolumeClaim a volume was created for.
    Claim { namespace: String, name: String },
    /// A node (a Kubernetes Node of the same name).
    Node(String),
    /// A volume made without a claim (not through Kubernetes): its events are only logged.
    Volume(String),
}

impl std::fmt::Display for Regarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Regarding::BackingImage(n) => write!(f, "backingimage/{n}"),
            Regarding::Claim { namespace, name } => {
                write!(f, "persistentvolumeclaim/{namespace}/{name}")
            }
            Regarding::Node(n) => write!(f, "node/{n}"),
            Regarding::Volume(v) => write!(f, "volume/{v}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// The reasons bicsi writes (`kubectl describe`'s Reason column) and their actions.
pub mod reason {
    pub const PREPARING: (&str, &str) = ("BackingImagePreparing", "Prepare");
    pub const PROGRESS: (&str, &str) = ("BackingImageProgress", "Prepare");
    pub const READY: (&str, &str) = ("BackingImageReady", "Prepare");
    pub const FAILED: (&str, &str) = ("BackingImageFailed", "Prepare");
    pub const CLEANED_UP: (&str, &str) = ("BackingImageCleanedUp", "Cleanup");
    pub const DEGRADED: (&str, &str) = ("VolumeDegraded", "CheckHealth");
    pub const FAULTED: (&str, &str) = ("VolumeFaulted", "CheckHealth");
    pub const HEALTHY: (&str, &str) = ("VolumeHealthy", "CheckHealth");
    pub const REBUILD_STARTED: (&str, &str) = ("RebuildStarted", "Rebuild");
    pub const REBUILD_FINISHED: (&str, &str) = ("RebuildFinished", "Rebuild");
    pub const REBUILD_FAILED: (&str, &str) = ("RebuildFailed", "Rebuild");
}

/// One event, as the domain states it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub regarding: Regarding,
    pub type_: EventType,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
}

impl Event {
    /// A `Normal` event of `what` (one of [`reason`]'s pairs).
    pub fn normal(regarding: Regarding, what: (&'static str, &'static str), note: String) -> Self {
        Event {
            regarding,
            type_: EventType::Normal,
            reason: what.0,
            action: what.1,
            note,
        }
    }

    /// A `Warning` event of `what`.
    pub fn warning(regarding: Regarding, what: (&'static str, &'static str), note: String) -> Self {
        Event {
            type_: EventType::Warning,
            ..Event::normal(regarding, what, note)
        }
    }
}

/// Where [`emit`] hands an event once logged: every `crate::store::Store` is one (the store
/// implements this for them all), so the domain passes the store it holds, and this module
/// needs nothing of the store's floor.
pub trait EventSink {
    /// Publishes the event, without waiting (only the Kubernetes store does anything).
    fn publish(&self, event: Event);
}

/// Logs `event` and hands it to the store, which publishes it when it is the Kubernetes one.
pub fn emit<S: EventSink + ?Sized>(store: &S, event: Event) {
    match event.type_ {
        EventType::Normal => tracing::info!(
            object = %event.regarding, reason = event.reason, note = %event.note, "event"
        ),
        EventType::Warning => tracing::warn!(
            object = %event.regarding, reason = event.reason, note = %event.note, "event"
        ),
    }
    store.publish(event);
}

/// The volume's claim, from the parameters the external-provisioner adds with
/// `--extra-create-metadata`.
pub fn claim_of(parameters: &std::collections::BTreeMap<String, String>) -> Option<ClaimRef> {
    let name = parameters.get("csi.storage.k8s.io/pvc/name")?;
    let namespace = parameters.get("csi.storage.k8s.io/pvc/namespace")?;
    (!name.is_empty() && !namespace.is_empty()).then(|| ClaimRef {
        namespace: namespace.clone(),
        name: name.clone(),
    })
}

/// Where a volume's events go: its claim, else the volume itself (logged only).
pub fn of_volume(volume: &Volume) -> Regarding {
    match &volume.spec.claim {
        Some(c) => Regarding::Claim {
            namespace: c.namespace.clone(),
            name: c.name.clone(),
        },
        None => Regarding::Volume(volume.id.clone()),
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// What to write for one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// A new Event object named `name`.
    Create { name: String, note: String },
    /// The Event `name` seen again: its series is now `count` (≥ 2), its note `note`.
    Update {
        name: String,
        count: u32,
        note: String,
    },
    /// Over the object's budget: not written (logged only).
    Drop,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    regarding: Regarding,
    type_: EventType,
    reason: &'static str,
    /// The note, or None for the combined event of the reason.
    note: Option<String>,
}

struct Seen {
    name: String,
    count: u32,
    last: Instant,
}

struct Similar {
    since: Instant,
    notes: BTreeSet<String>,
}

struct Bucket {
    tokens: u32,
    last_refill: Instant,
}

/// client-go's correlation of events (dedupe into series, aggregation of similar ones, the
/// per-object spam filter), as a pure function of the events and the time given.
pub struct Correlator {
    series: HashMap<SeriesKey, Seen>,
    similar: HashMap<(Regarding, EventType, &'static str), Similar>,
    buckets: HashMap<Regarding, Bucket>,
    /// Makes Event names unique across processes (client-go: the time in nanoseconds).
    base: u64,
    seq: u64,
}

impl Correlator {
    /// `base`: a number unique to this process (the start time in nanoseconds).
    pub fn new(base: u64) -> Correlator {
        Correlator {
            series: HashMap::new(),
            similar: HashMap::new(),
            buckets: HashMap::new(),
            base,
            seq: 0,
        }
    }

    /// Decides what to write for `event` at `now`.
    pub fn observe(&mut self, event: &Event, now: Instant) -> Decision {
        self.forget_old(now);
        // The spam filter: every event, repeats included, takes a token of its object.
        let bucket = self
            .buckets
            .entry(event.regarding.clone())
            .or_insert(Bucket {
                tokens: BURST,
                last_refill: now,
            });
        if bucket.tokens >= BURST {
            bucket.last_refill = now;
        } else {
            let refills = (now.saturating_duration_since(bucket.last_refill).as_secs()
                / REFILL.as_secs()) as u32;
            if refills > 0 {
                bucket.tokens = (bucket.tokens + refills).min(BURST);
                bucket.last_refill += REFILL * refills;
            }
        }
        if bucket.tokens == 0 {
            return Decision::Drop;
        }
        bucket.tokens -= 1;

        // Aggregation: past SIMILAR_MAX different notes, the reason's combined event.
        let similar = self
            .similar
            .entry((event.regarding.clone(), event.type_, event.reason))
            .or_insert_with(|| Similar {
                since: now,
                notes: BTreeSet::new(),
            });
        similar.notes.insert(event.note.clone());
        let combined = similar.notes.len() >= SIMILAR_MAX;
        let (key_note, note) = if combined {
            (None, format!("{COMBINED}{}", event.note))
        } else {
            (Some(event.note.clone()), event.note.clone())
        };
        let note = truncate(&note, MAX_NOTE);
        let key = SeriesKey {
            regarding: event.regarding.clone(),
            type_: event.type_,
            reason: event.reason,
            note: key_note,
        };
        // Dedupe: a repeat updates the series of the Event written first.
        if let Some(seen) = self.series.get_mut(&key) {
            seen.count += 1;
            seen.last = now;
            return Decision::Update {
                name: seen.name.clone(),
                count: seen.count,
                note,
            };
        }
        self.seq += 1;
        let object = match &event.regarding {
            Regarding::BackingImage(n) | Regarding::Node(n) | Regarding::Volume(n) => n.as_str(),
            Regarding::Claim { name, .. } => name.as_str(),
        };
        let suffix = format!(".{:x}", self.base.wrapping_add(self.seq));
        let name = format!(
            "{}{suffix}",
            crate::model::object_name(&truncate(object, 253 - suffix.len()))
        );
        self.series.insert(
            key,
            Seen {
                name: name.clone(),
                count: 1,
                last: now,
            },
        );
        Decision::Create { name, note }
    }

    /// The Event `name` is gone from the API server (expired): the next repeat creates one.
    pub fn forget(&mut self, name: &str) {
        self.series.retain(|_, s| s.name != name);
    }

    fn forget_old(&mut self, now: Instant) {
        self.series
            .retain(|_, s| now.saturating_duration_since(s.last) < SERIES_TTL);
        self.similar
            .retain(|_, s| now.saturating_duration_since(s.since) < SIMILAR_WINDOW);
        self.buckets.retain(|_, b| {
            b.tokens < BURST || now.saturating_duration_since(b.last_refill) < REFILL
        });
    }
}

fn dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// The API server's checks of an `events.k8s.io/v1` Event (as JSON), as its validation
/// states them: a name, the regarding object's namespace (or `default` for a cluster-scoped
/// one), `eventTime`, reporting controller and instance, action and reason of at most 128
/// characters, a note of at most 1 kB, type Normal or Warning, a series counted from 2.
pub fn validate(ev: &serde_json::Value) -> Result<(), String> {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let name = s(&ev["metadata"]["name"]);
    if !dns_subdomain(&name) {
        return Err(format!("metadata.name: Invalid value: {name:?}"));
    }
    let ns = s(&ev["metadata"]["namespace"]);
    let regarding = &ev["regarding"];
    if s(&regarding["kind"]).is_empty() || s(&regarding["name"]).is_empty() {
        return Err("regarding: Required value: kind and name".into());
    }
    let rns = s(&regarding["namespace"]);
    if (rns.is_empty() && ns != "default") || (!rns.is_empty() && rns != ns) {
        return Err(format!(
            "regarding.namespace: Invalid value: {rns:?}: does not match event.namespace {ns:?}"
        ));
    }
    if s(&ev["eventTime"]).is_empty() {
        return Err("eventTime: Required value".into());
    }
    for field in [
        "reportingController",
        "reportingInstance",
        "action",
        "reason",
    ] {
        let v = s(&ev[field]);
        if v.is_empty() {
            return Err(format!("{field}: Required value"));
        }
        if v.len() > MAX_SHORT {
            return Err(format!("{field}: Too long: must have at most 128 bytes"));
        }
    }
    if s(&ev["note"]).len() > MAX_NOTE {
        return Err("note: Too long: must have at most 1024 bytes".into());
    }
    if !matches!(s(&ev["type"]).as_str(), "Normal" | "Warning") {
        return Err(format!("type: Unsupported value: {:?}", ev["type"]));
    }
    if let Some(series) = ev.get("series").filter(|v| !v.is_null()) {
        if series["count"].as_u64().unwrap_or(0) < 2 {
            return Err("series.count: Invalid value: should be at least 2".into());
        }
        if s(&series["lastObservedTime"]).is_empty() {
            return Err("series.lastObservedTime: Required value".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(note: &str) -> Event {
        Event::normal(
            Regarding::BackingImage("img".into()),
            reason::PROGRESS,
            note.into(),
        )
    }

    #[test]
    fn a_repeat_updates_the_series_and_a_new_note_creates_an_event() {
        let mut c = Correlator::new(0x100);
        let t = Instant::now();
        let first = c.observe(&ev("25%"), t);
        let Decision::Create { name, note } = first else {
            panic!("{first:?}")
        };
        assert_eq!((name.as_str(), note.as_str()), ("img.101", "25%"));
        assert_eq!(
            c.observe(&ev("25%"), t + Duration::from_secs(1)),
            Decision::Update {
                name: "img.101".into(),
                count: 2,
                note: "25%".into()
            }
        );
        assert_eq!(
            c.observe(&ev("25%"), t + Duration::from_secs(2)),
            Decision::Update {
                name: "img.101".into(),
                count: 3,
                note: "25%".into()
            }
        );
        assert!(matches!(
            c.observe(&ev("50%"), t + Duration::from_secs(3)),
            Decision::Create { .. }
        ));
        // Another object, the same note: its own event.
        let other = Event::normal(Regarding::Node("n1".into()), reason::PROGRESS, "25%".into());
        assert!(matches!(c.observe(&other, t), Decision::Create { .. }));
        // Long after, the series is over: a new Event.
        let later = t + SERIES_TTL + Duration::from_secs(10);
        assert!(matches!(
            c.observe(&ev("25%"), later),
            Decision::Create { .. }
        ));
    }

    #[test]
    fn similar_notes_are_combined_past_ten() {
        let mut c = Correlator::new(0);
        let t = Instant::now();
        let mut creates = 0;
        for i in 0..SIMILAR_MAX - 1 {
            assert!(matches!(
                c.observe(&ev(&format!("file {i}")), t),
                Decision::Create { .. }
            ));
            creates += 1;
        }
        assert_eq!(creates, 9);
        let Decision::Create { name, note } = c.observe(&ev("file 9"), t) else {
            panic!("the tenth note starts the combined event")
        };
        assert_eq!(note, format!("{COMBINED}file 9"));
        assert_eq!(
            c.observe(&ev("file 10"), t),
            Decision::Update {
                name,
                count: 2,
                note: format!("{COMBINED}file 10")
            }
        );
    }

    #[test]
    fn a_burst_is_bounded_per_object_and_refills_slowly() {
        let mut c = Correlator::new(0);
        let t = Instant::now();
        let written = (0..100)
            .filter(|_| c.observe(&ev("same"), t) != Decision::Drop)
            .count();
        assert_eq!(written, BURST as usize);
        // Another object has its own budget.
        let other = Event::normal(Regarding::Node("n".into()), reason::PROGRESS, "x".into());
        assert_ne!(c.observe(&other, t), Decision::Drop);
        assert_eq!(
            c.observe(&ev("same"), t + REFILL - Duration::from_secs(1)),
            Decision::Drop
        );
        assert_ne!(c.observe(&ev("same"), t + REFILL), Decision::Drop);
        assert_eq!(c.observe(&ev("same"), t + REFILL), Decision::Drop);
    }

    #[test]
    fn validation_table() {
        let good = serde_json::json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "img.1", "namespace": "ns"},
            "regarding": {"kind": "BackingImage", "name": "img", "namespace": "ns"},
            "eventTime": "2026-12-03T10:00:00.000000Z",
            "reportingController": "bicsi", "reportingInstance": "c-0",
            "action": "Prepare", "reason": "BackingImageReady", "note": "ok", "type": "Normal",
            "series": null,
        });
        assert_eq!(validate(&good), Ok(()));
        let bad: &[(&str, serde_json::Value, &str)] = &[
            ("/metadata/name", "Img_1".into(), "metadata.name"),
            ("/metadata/namespace", "other".into(), "regarding.namespace"),
            ("/eventTime", serde_json::Value::Null, "eventTime"),
            ("/reportingInstance", "".into(), "reportingInstance"),
            ("/reason", "x".repeat(129).into(), "reason: Too long"),
            ("/note", "x".repeat(1025).into(), "note: Too long"),
            ("/type", "Info".into(), "type"),
            (
                "/series",
                serde_json::json!({"count": 1, "lastObservedTime": "t"}),
                "series.count",
            ),
        ];
        for (pointer, value, want) in bad {
            let mut e = good.clone();
            *e.pointer_mut(pointer)
                .unwrap_or_else(|| panic!("{pointer}")) = value.clone();
            let err = validate(&e).expect_err(pointer);
            assert!(err.contains(want), "{pointer}: {err}");
        }
        // A cluster-scoped object's events live in "default".
        let mut node = good.clone();
        node["regarding"] = serde_json::json!({"kind": "Node", "name": "n1"});
        assert!(validate(&node).is_err());
        node["metadata"]["namespace"] = "default".into();
        assert_eq!(validate(&node), Ok(()));
    }

    #[test]
    fn claim_from_the_provisioner_parameters() {
        let p: std::collections::BTreeMap<String, String> = [
            (
                "csi.storage.k8s.io/pvc/name".to_string(),
                "data".to_string(),
            ),
            (
                "csi.storage.k8s.io/pvc/namespace".to_string(),
                "apps".to_string(),
            ),
        ]
        .into();
        assert_eq!(
            claim_of(&p),
            Some(ClaimRef {
                namespace: "apps".into(),
                name: "data".into()
            })
        );
        assert_eq!(claim_of(&Default::default()), None);
    }
}
