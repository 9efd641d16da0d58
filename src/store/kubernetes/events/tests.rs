//! Events through the Kubernetes store against the fake API server (`super::super::tests`):
//! the domain's image, volume and rebuild work leaves Events on the BackingImage, the node and
//! the PVC, as `kubectl describe` would find them (namespace, kind, name, uid); repeats become
//! series, similar notes one combined event, and a burst stays bounded.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::backing::BackingImages;
use crate::backing::object::{
    BackingImage, BackingImageSpec, BackingImageStatus, DiskFileStatus, ObjectMeta, SourceType,
};
use crate::backing::state::FileState;
use crate::cluster::Cluster;
use crate::events::{BURST, COMBINED, Event, Regarding, SIMILAR_MAX, reason};
use crate::files::{FileReport, ReadyFile};
use crate::health::{ReplicaHealth, ReplicaMode};
use crate::model::{ClaimRef, Disk, Replica, Volume, VolumeSpec};
use crate::store::kubernetes::KubeStore;
use crate::store::kubernetes::tests::{FakeApi, NS};
use crate::store::{Kind, Store, StoreExt};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A cluster with PVC apps/data and Node n1, and a store on it.
async fn cluster() -> (FakeApi, Arc<dyn Store>) {
    let (fake, client) = FakeApi::start().await;
    fake.kubectl_create(
        "persistentvolumeclaims.apps",
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "data", "namespace": "apps"}}),
    );
    fake.kubectl_create(
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}),
    );
    let store: Arc<dyn Store> = Arc::new(KubeStore::new(client, NS).await.unwrap());
    (fake, store)
}

/// Waits (the publisher runs in the background) until `done` holds for the events stored.
async fn events_until(fake: &FakeApi, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events = fake.events();
        if done(&events) {
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events never reached the expected set: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn about<'a>(events: &'a [Value], kind: &str, name: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["regarding"]["kind"] == kind && e["regarding"]["name"] == name)
        .collect()
}

fn notes(events: &[&Value], reason: &str) -> Vec<String> {
    let mut n: Vec<String> = events
        .iter()
        .filter(|e| e["reason"] == reason)
        .map(|e| e["note"].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

fn image() -> BackingImage {
    BackingImage {
        api_version: crate::backing::object::API_VERSION.into(),
        kind: crate::backing::object::KIND.into(),
        metadata: ObjectMeta {
            name: "img".into(),
            namespace: NS.into(),
        },
        spec: BackingImageSpec {
            source_type: SourceType::Download,
            source_parameters: [("url".to_string(), "http://127.0.0.1/x".to_string())].into(),
            checksum: String::new(),
            min_number_of_copies: 1,
        },
        status: BackingImageStatus {
            uuid: "0123abcd".into(),
            checksum: "aa".repeat(64),
            disk_file_status_map: [(
                "d1".to_string(),
                DiskFileStatus {
                    state: FileState::Pending,
                    progress: 0,
                    message: String::new(),
                    last_state_transition_time: crate::model::rfc3339(crate::model::now_secs()),
                    last_update_time: String::new(),
                    node_id: "n1".into(),
                    unused_since: String::new(),
                },
            )]
            .into(),
            ..Default::default()
        },
    }
}

/// Volume vol-a of PVC apps/data, made from "img", one rw replica of the two it wants.
fn volume() -> Volume {
    Volume {
        id: "vol-a".into(),
        spec: VolumeSpec {
            name: "vol-a".into(),
            capacity_bytes: 1 << 20,
            number_of_replicas: 2,
            stale_replica_timeout_minutes: None,
            fs_type: None,
            backing_image: Some("img".into()),
            parameters: Default::default(),
            capabilities: vec![],
            source: None,
            engine: Default::default(),
            claim: Some(ClaimRef {
                namespace: "apps".into(),
                name: "data".into(),
            }),
        },
        replicas: vec![Replica {
            id: "r0".into(),
            node_id: "n1".into(),
            disk_id: "d1".into(),
            path: "/d1/replicas/vol-a-r0/volume.qcow2".into(),
            format: crate::os::ImageFormat::Qcow2,
            deferred: false,
            cluster_bytes: None,
            health: ReplicaHealth {
                mode: ReplicaMode::Rw,
                ..Default::default()
            },
        }],
        publication: None,
        created_at: String::new(),
        attach_epoch: None,
        fault: None,
    }
}

#[test]
fn image_progress_a_failing_checksum_and_a_degraded_volume_show_on_the_objects() {
    runtime().block_on(async {
        let (fake, store) = cluster().await;
        tokio::task::block_in_place(|| {
            store.put(Kind::BackingImage, "img", &image()).unwrap();
            store.put(Kind::Volume, "vol-a", &volume()).unwrap();
        });
        let cluster = Cluster::new(store.clone());
        let images = BackingImages::new(store.clone(), cluster.clone());
        let disk = Disk {
            id: "d1".into(),
            node_id: "n1".into(),
            path: "/d1".into(),
        };
        images
            .apply_report("img", &disk, FileReport::new(FileState::Starting, 0, ""))
            .await
            .unwrap();
        for progress in [5, 20, 30, 60, 80, 90] {
            images
                .apply_report(
                    "img",
                    &disk,
                    FileReport::new(FileState::InProgress, progress, ""),
                )
                .await
                .unwrap();
        }
        // The file came with another SHA-512 than the image's.
        let mut done = FileReport::new(FileState::Ready, 100, "");
        done.ready = Some(ReadyFile {
            size: 4096,
            virtual_size: 4096,
            format: "raw".into(),
            checksum: "bb".repeat(64),
        });
        images.apply_report("img", &disk, done).await.unwrap();
        // The volume has one replica of two: degraded, told twice (two controllers, as after a
        // restart): one Event with a series of 2.
        for _ in 0..2 {
            let controller =
                crate::controller::Controller::new(store.clone(), cluster.clone(), images.clone());
            controller.rebuild_pass().await.unwrap();
        }

        let events = events_until(&fake, |e| {
            about(e, "PersistentVolumeClaim", "data")
                .iter()
                .any(|e| e["reason"] == "VolumeDegraded" && e["series"]["count"] == 2)
                && about(e, "Node", "n1").len() >= 2
                && about(e, "BackingImage", "img").len() >= 5
        })
        .await;

        let bi_uid = fake.object("backingimages", "img").unwrap()["metadata"]["uid"].clone();
        let image_events = about(&events, "BackingImage", "img");
        for e in &image_events {
            assert_eq!(e["metadata"]["namespace"], NS);
            assert_eq!(e["regarding"]["uid"], bi_uid);
            assert_eq!(e["regarding"]["apiVersion"], "longhorn.io/v1beta2");
            assert_eq!(e["reportingController"], "bicsi");
        }
        assert_eq!(notes(&image_events, "BackingImagePreparing").len(), 1);
        let progress = notes(&image_events, "BackingImageProgress");
        assert_eq!(progress.len(), 3, "{progress:?}");
        for (note, step) in progress.iter().zip(["25%", "50%", "75%"]) {
            assert!(note.ends_with(&format!("is {step} prepared")), "{note}");
        }
        let failed: Vec<&&Value> = image_events
            .iter()
            .filter(|e| e["reason"] == "BackingImageFailed")
            .collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0]["type"], "Warning");
        assert!(
            failed[0]["note"]
                .as_str()
                .unwrap()
                .contains("checksum mismatch"),
            "{}",
            failed[0]["note"]
        );

        // The node: started and failed (not the progress), in "default" with the Node's uid.
        let node_uid = fake.object("nodes", "n1").unwrap()["metadata"]["uid"].clone();
        let node_events = about(&events, "Node", "n1");
        let mut reasons: Vec<&str> = node_events
            .iter()
            .map(|e| e["reason"].as_str().unwrap())
            .collect();
        reasons.sort();
        assert_eq!(reasons, ["BackingImageFailed", "BackingImagePreparing"]);
        for e in &node_events {
            assert_eq!(e["metadata"]["namespace"], "default");
            assert_eq!(e["regarding"]["uid"], node_uid);
        }

        // The claim: the image's story and the volume's health, in its namespace.
        let pvc_uid =
            fake.object("persistentvolumeclaims.apps", "data").unwrap()["metadata"]["uid"].clone();
        let claim_events = about(&events, "PersistentVolumeClaim", "data");
        for e in &claim_events {
            assert_eq!(e["metadata"]["namespace"], "apps");
            assert_eq!(e["regarding"]["uid"], pvc_uid);
        }
        assert_eq!(notes(&claim_events, "BackingImageProgress").len(), 3);
        assert_eq!(notes(&claim_events, "BackingImageFailed").len(), 1);
        let degraded = notes(&claim_events, "VolumeDegraded");
        assert_eq!(degraded, ["1 of 2 replicas placed"]);
        // The repeat was a PATCH of the series, not a second object.
        let patches: Vec<_> = fake
            .log()
            .into_iter()
            .filter(|l| {
                l.method == "PATCH"
                    && l.path
                        .starts_with("/apis/events.k8s.io/v1/namespaces/apps/")
            })
            .collect();
        assert_eq!(patches.len(), 1, "{patches:?}");
        assert_eq!(patches[0].status, 200);
        assert_eq!(patches[0].body["series"]["count"], 2);
        // Every Event call the store made was accepted.
        for l in fake.log().iter().filter(|l| l.path.contains("/events")) {
            assert!(
                l.status < 300,
                "{} {} -> {}: {}",
                l.method,
                l.path,
                l.status,
                l.body
            );
        }
    });
}

#[test]
fn repeats_are_series_similar_notes_are_combined_and_a_burst_is_bounded() {
    runtime().block_on(async {
        let (fake, store) = cluster().await;
        let node = |reason: (&'static str, &'static str), note: String| {
            Event::normal(Regarding::Node("n1".into()), reason, note)
        };
        // Twelve different notes of one reason: nine Events, then one combined Event whose
        // series counts the other three.
        for i in 0..SIMILAR_MAX + 2 {
            store.record_event(node(reason::CLEANED_UP, format!("file {i}")));
        }
        // A burst of one note on a claim: the first BURST are written (one Event, a series of
        // BURST), the rest dropped.
        let claim = Regarding::Claim {
            namespace: "apps".into(),
            name: "data".into(),
        };
        for _ in 0..BURST + 20 {
            store.record_event(Event::warning(
                claim.clone(),
                reason::DEGRADED,
                "1 of 2 replicas placed".into(),
            ));
        }
        let events = events_until(&fake, |e| {
            about(e, "Node", "n1").len() == SIMILAR_MAX
                && about(e, "Node", "n1")
                    .iter()
                    .any(|e| e["series"]["count"] == 3)
                && about(e, "PersistentVolumeClaim", "data")
                    .iter()
                    .any(|e| e["series"]["count"] == BURST)
        })
        .await;
        let node_events = about(&events, "Node", "n1");
        let combined: Vec<_> = node_events
            .iter()
            .filter(|e| e["note"].as_str().unwrap().starts_with(COMBINED))
            .collect();
        assert_eq!(combined.len(), 1);
        assert_eq!(combined[0]["note"], format!("{COMBINED}file 11"));
        let claim_events = about(&events, "PersistentVolumeClaim", "data");
        assert_eq!(claim_events.len(), 1);
        assert_eq!(claim_events[0]["type"], "Warning");
        // Nothing more comes: the rest of the burst was dropped.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            about(&fake.events(), "PersistentVolumeClaim", "data")[0]["series"]["count"],
            BURST
        );
        // A volume without a claim has nothing in the cluster: no request at all.
        let before = fake.log().len();
        store.record_event(Event::normal(
            Regarding::Volume("plain".into()),
            reason::HEALTHY,
            "x".into(),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(fake.log().len(), before);
    });
}

#[test]
fn the_fake_api_server_refuses_what_the_real_one_would() {
    runtime().block_on(async {
        let (fake, client) = FakeApi::start().await;
        let api: kube::Api<k8s_openapi::api::events::v1::Event> =
            kube::Api::namespaced(client, "apps");
        let bad = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "x.1", "namespace": "apps"},
            "regarding": {"kind": "PersistentVolumeClaim", "name": "data", "namespace": "apps"},
            "reason": "R", "action": "A", "type": "Normal",
            "reportingController": "bicsi", "reportingInstance": "i"});
        let ev: k8s_openapi::api::events::v1::Event = serde_json::from_value(bad).unwrap();
        let err = api.create(&Default::default(), &ev).await.unwrap_err();
        assert!(err.to_string().contains("eventTime"), "{err}");
        assert!(fake.events().is_empty());
    });
}
