//! What users ask for through the Kubernetes API rather than through bicsi (with
//! `--store kubernetes`): a BackingImage created with `kubectl apply` is taken up (uuid, first
//! file), and one deleted with `kubectl delete` is deleted by the domain, which refuses while a
//! volume uses it and removes the files before the store releases the object's finalizer. Driven
//! by the store's watch; a periodic pass retries what was refused. This module only calls the
//! domain; it must not write records itself.

use std::sync::Arc;
use std::time::Duration;

use crate::backing::BackingImages;
use crate::store::Kind;
use crate::store::kubernetes::KubeStore;

/// How often refused deletions and failed take-ups are tried again without a change.
const RETRY: Duration = Duration::from_secs(30);

/// One pass over the backing images.
pub async fn backing_images_once(kube: &KubeStore, backing: &Arc<BackingImages>) {
    for name in kube.terminating(Kind::BackingImage) {
        if let Err(e) = backing.delete(&name).await {
            tracing::warn!(image = %name, error = %e, "kubectl delete of a backing image waits");
        }
    }
    let terminating = kube.terminating(Kind::BackingImage);
    match backing.list() {
        Ok(images) => {
            for bi in images {
                if bi.status.uuid.is_empty() && !terminating.iter().any(|t| t == bi.name()) {
                    if let Err(e) = backing.adopt(bi.name()).await {
                        tracing::warn!(image = %bi.name(), error = %e, "cannot take up a backing image");
                    }
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list backing images"),
    }
}

/// Runs [`backing_images_once`] at every change of the BackingImage resources, and every
/// [`RETRY`].
pub fn spawn(kube: Arc<KubeStore>, backing: Arc<BackingImages>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut changes = kube.subscribe(Kind::BackingImage);
        loop {
            backing_images_once(&kube, &backing).await;
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::kubernetes::tests::{FakeApi, NS, runtime};
    use crate::store::{Store, StoreExt};
    use serde_json::json;

    fn wait(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn kubectl_created_images_are_taken_up_and_deleted_ones_released() {
        runtime().block_on(async {
            let (fake, client) = FakeApi::start().await;
            let kube = Arc::new(KubeStore::new(client, NS).await.unwrap());
            let store: Arc<dyn Store> = kube.clone();
            let backing = BackingImages::new(store.clone(), crate::cluster::Cluster::new(store));
            tokio::task::block_in_place(|| {
                let rt = tokio::runtime::Handle::current();
                // `kubectl apply` of an upload image (no disk needed until the upload).
                fake.kubectl_create(
                    "backingimages",
                    json!({"apiVersion": "longhorn.io/v1beta2", "kind": "BackingImage",
                           "metadata": {"name": "bi-up", "namespace": NS},
                           "spec": {"sourceType": "upload"}}),
                );
                wait("the watch delivers bi-up", || {
                    backing.get("bi-up").unwrap().is_some()
                });
                rt.block_on(backing_images_once(&kube, &backing));
                let obj = fake.object("backingimages", "bi-up").unwrap();
                let uuid = obj["status"]["uuid"].as_str().unwrap_or("");
                assert_eq!(uuid.len(), 8, "not taken up: {obj}");
                // Taking it up also puts bicsi's finalizer on it.
                assert_eq!(
                    obj["metadata"]["finalizers"],
                    json!([crate::store::kubernetes::FINALIZER])
                );

                // A volume uses it: `kubectl delete` waits, the object stays.
                kube.put_raw(
                    Kind::Volume,
                    "vol-1",
                    &serde_json::to_vec(&json!({"id": "vol-1", "spec": {"name": "vol-1",
                        "capacityBytes": 1, "numberOfReplicas": 1, "staleReplicaTimeoutMinutes": null,
                        "fsType": null, "backingImage": "bi-up", "parameters": {}, "capabilities": []},
                        "replicas": [], "publication": null, "createdAt": ""}))
                    .unwrap(),
                )
                .unwrap();
                assert_eq!(backing.users("bi-up").unwrap(), ["vol-1"]);
                fake.kubectl_delete("backingimages", "bi-up");
                wait("the deletion is seen", || kube.terminating(Kind::BackingImage) == ["bi-up"]);
                rt.block_on(backing_images_once(&kube, &backing));
                assert!(fake.object("backingimages", "bi-up").is_some(), "deleted while in use");

                // The volume goes: the next pass deletes the image and the object with it.
                kube.delete(Kind::Volume, "vol-1").unwrap();
                rt.block_on(backing_images_once(&kube, &backing));
                assert!(fake.object("backingimages", "bi-up").is_none());
                assert!(kube.get::<serde_json::Value>(Kind::BackingImage, "bi-up").unwrap().is_none());
            });
        });
    }
}
