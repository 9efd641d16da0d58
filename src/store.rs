//! Where bicsi keeps its records, behind one trait so the embedded store (the default) and a
//! Kubernetes custom-resource store can be swapped without the domain noticing.
//!
//! The trait is deliberately small: objects are JSON documents addressed by kind and key, and
//! every write is one atomic, durable commit. Typed access (`get::<Volume>`) sits on top in
//! [`StoreExt`]. The store must not interpret the documents; validation belongs to the domain.

pub mod embedded;
pub mod kubernetes;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Result;

/// The kinds of object bicsi stores. Each is a table (embedded) or a resource type (Kubernetes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Volume,
    NodeVolume,
    BackingImage,
    StorageClass,
    Setting,
    Node,
    Snapshot,
    /// A backup of a volume to the backup target (`crate::backup::record`).
    Backup,
    /// A volume being restored from a backup, until its volume record exists.
    Restore,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Volume,
        Kind::NodeVolume,
        Kind::BackingImage,
        Kind::StorageClass,
        Kind::Setting,
        Kind::Node,
        Kind::Snapshot,
        Kind::Backup,
        Kind::Restore,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Volume => "volumes",
            Kind::NodeVolume => "node-volumes",
            Kind::BackingImage => "backing-images",
            Kind::StorageClass => "storage-classes",
            Kind::Setting => "settings",
            Kind::Node => "nodes",
            Kind::Snapshot => "snapshots",
            Kind::Backup => "backups",
            Kind::Restore => "restores",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// A durable map of JSON documents per kind. Every call is atomic; `put` and `delete` are
/// durable when they return.
pub trait Store: Send + Sync {
    fn get_raw(&self, kind: Kind, key: &str) -> Result<Option<Vec<u8>>>;
    /// All documents of a kind, ordered by key.
    fn list_raw(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>>;
    fn put_raw(&self, kind: Kind, key: &str, value: &[u8]) -> Result<()>;
    /// Removes the document; Ok when it was already gone.
    fn delete(&self, kind: Kind, key: &str) -> Result<()>;
    /// Publishes a Kubernetes Event (`crate::events`), without waiting: only the Kubernetes
    /// store does; the others leave it to the log `events::emit` already wrote.
    fn record_event(&self, _event: crate::events::Event) {}

    /// The namespace a source's Secret or ConfigMap is looked up in when none is given; `None`
    /// when the store does not live in a cluster (then it reads neither).
    fn cluster_namespace(&self) -> Option<String> {
        None
    }

    /// The data of the Kubernetes Secret `namespace/name` (key → bytes), for a source's
    /// credentials. Only a store that lives in a cluster has Secrets: the others refuse.
    fn read_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<std::collections::BTreeMap<String, Vec<u8>>> {
        Err(crate::error::Error::FailedPrecondition(format!(
            "Secret {namespace}/{name}: Secrets are read only with --store kubernetes; without a cluster give the credentials in files"
        )))
    }

    /// The data of the Kubernetes ConfigMap `namespace/name` (key → text); as
    /// [`Store::read_secret`].
    fn read_config_map(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<std::collections::BTreeMap<String, String>> {
        Err(crate::error::Error::FailedPrecondition(format!(
            "ConfigMap {namespace}/{name}: ConfigMaps are read only with --store kubernetes; without a cluster give the CA bundle in a file"
        )))
    }
}

/// Typed access to a [`Store`].
pub trait StoreExt: Store {
    fn get<T: DeserializeOwned>(&self, kind: Kind, key: &str) -> Result<Option<T>> {
        match self.get_raw(kind, key)? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    fn list<T: DeserializeOwned>(&self, kind: Kind) -> Result<Vec<T>> {
        self.list_raw(kind)?
            .into_iter()
            .map(|(_, bytes)| Ok(serde_json::from_slice(&bytes)?))
            .collect()
    }

    fn put<T: Serialize>(&self, kind: Kind, key: &str, value: &T) -> Result<()> {
        self.put_raw(kind, key, &serde_json::to_vec(value)?)
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

/// Every store is where `events::emit` hands its events (to `record_event`), so `events`, below
/// the store, needs nothing of it.
impl<S: Store + ?Sized> crate::events::EventSink for S {
    fn publish(&self, event: crate::events::Event) {
        self.record_event(event)
    }
}

/// The conformance tests every backend must pass; each backend's test module calls them.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;

    pub fn run_all(make: &dyn Fn() -> Box<dyn Store>) {
        put_get_delete(&*make());
        list_is_ordered_and_per_kind(&*make());
        delete_is_idempotent(&*make());
    }

    fn put_get_delete(s: &dyn Store) {
        assert_eq!(s.get_raw(Kind::Volume, "a").unwrap(), None);
        s.put_raw(Kind::Volume, "a", b"{\"x\":1}").unwrap();
        assert_eq!(
            s.get_raw(Kind::Volume, "a").unwrap().as_deref(),
            Some(&b"{\"x\":1}"[..])
        );
        s.put_raw(Kind::Volume, "a", b"{\"x\":2}").unwrap();
        assert_eq!(
            s.get_raw(Kind::Volume, "a").unwrap().as_deref(),
            Some(&b"{\"x\":2}"[..])
        );
        s.delete(Kind::Volume, "a").unwrap();
        assert_eq!(s.get_raw(Kind::Volume, "a").unwrap(), None);
    }

    fn list_is_ordered_and_per_kind(s: &dyn Store) {
        for k in ["c", "a", "b"] {
            s.put_raw(Kind::Volume, k, b"{}").unwrap();
        }
        s.put_raw(Kind::Node, "z", b"{}").unwrap();
        let keys: Vec<String> = s
            .list_raw(Kind::Volume)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(s.list_raw(Kind::Node).unwrap().len(), 1);
        assert!(s.list_raw(Kind::Setting).unwrap().is_empty());
    }

    fn delete_is_idempotent(s: &dyn Store) {
        s.delete(Kind::Volume, "never").unwrap();
        s.put_raw(Kind::Volume, "v", b"{}").unwrap();
        s.delete(Kind::Volume, "v").unwrap();
        s.delete(Kind::Volume, "v").unwrap();
    }
}
