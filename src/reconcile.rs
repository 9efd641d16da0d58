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
