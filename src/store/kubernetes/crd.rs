//! The custom resources the Kubernetes store keeps, as Rust types, and the CRD manifests derived
//! from them (`bicsi crd`, committed as `deploy/crds.yaml`).
//!
//! BackingImage reuses Longhorn's `backingimages.longhorn.io`: its spec is the shape of the seed's
//! manifests (the domain's own [`BackingImageSpec`] is the schema), and its status is what bicsi
//! observes, written only through the status subresource. The other records (volumes, node
//! volumes, nodes, storage classes, settings) are bicsi's own documents, whose shape is not
//! Longhorn's `volumes`/`nodes`/`settings`: they get their own `Bicsi*` kinds so a cluster never
//! sees two meanings for one name, and their spec is the record as the domain wrote it (the
//! domain's serde types validate it; the CRD keeps it whole).

use std::borrow::Cow;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::model::backing_image::{BackingImageSpec, BackingImageStatus};
use crate::store::Kind;

pub const GROUP: &str = "longhorn.io";
pub const VERSION: &str = "v1beta2";

/// The spec of a `longhorn.io/v1beta2` BackingImage: exactly the domain's spec.
// Several print columns share a type; clippy takes the repeated `type_` for a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "longhorn.io",
    version = "v1beta2",
    kind = "BackingImage",
    root = "BackingImageResource",
    namespaced,
    status = "BackingImageStatus",
    shortname = "lhbi",
    doc = "A RAW or QCOW2 image that bicsi volumes start from (downloaded, uploaded or exported from a volume), checked by SHA-512 and stored once per disk.",
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.sourceType"),
    printcolumn(
        name = "Checksum",
        type_ = "string",
        json_path = ".status.checksum",
        priority = "1"
    ),
    printcolumn(name = "Size", type_ = "integer", json_path = ".status.size"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct BackingImageResourceSpec {
    #[serde(flatten)]
    pub spec: BackingImageSpec,
}

/// One bicsi record, kept whole as a custom resource's spec.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Record(pub serde_json::Map<String, serde_json::Value>);

impl JsonSchema for Record {
    fn schema_name() -> Cow<'static, str> {
        "Record".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A bicsi record as the domain wrote it; bicsi's own types validate it.",
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}

// rustfmt re-indents attributes inside macro_rules on every run; keep this one as written.
#[rustfmt::skip]
macro_rules! record_kind {
    ($spec:ident, $kind:literal, $short:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema)]
        #[kube(
            group = "longhorn.io",
            version = "v1beta2",
            kind = $kind,
            namespaced,
            shortname = $short,
            doc = $doc
        )]
        pub struct $spec(pub Record);
    };
}

record_kind!(
    BicsiVolumeSpec,
    "BicsiVolume",
    "bvol",
    "A bicsi volume: its spec, replicas and attachment."
);
record_kind!(
    BicsiNodeVolumeSpec,
    "BicsiNodeVolume",
    "bnvol",
    "What a bicsi node agent has staged and published of a volume."
);
record_kind!(
    BicsiNodeSpec,
    "BicsiNode",
    "bnode",
    "A bicsi node agent: its addresses, disks and heartbeat."
);
record_kind!(
    BicsiStorageClassSpec,
    "BicsiStorageClass",
    "bsc",
    "A StorageClass applied through bicsi (bicsi apply), for volumes created by name."
);
record_kind!(BicsiSettingSpec, "BicsiSetting", "bset", "A bicsi setting.");
record_kind!(
    BicsiSnapshotSpec,
    "BicsiSnapshot",
    "bsnap",
    "A CSI snapshot of a bicsi volume: where its files sit and the backing image it keeps."
);

record_kind!(
    BicsiBackupSpec,
    "BicsiBackup",
    "bbak",
    "A backup of a bicsi volume to the backup target: its state, progress and bytes uploaded."
);
record_kind!(
    BicsiRestoreSpec,
    "BicsiRestore",
    "brst",
    "A bicsi volume being restored from a backup, kept until the volume exists."
);

/// The CRD that holds one kind of record.
pub fn crd(kind: Kind) -> CustomResourceDefinition {
    match kind {
        Kind::BackingImage => BackingImageResource::crd(),
        Kind::Volume => BicsiVolume::crd(),
        Kind::NodeVolume => BicsiNodeVolume::crd(),
        Kind::Node => BicsiNode::crd(),
        Kind::StorageClass => BicsiStorageClass::crd(),
        Kind::Setting => BicsiSetting::crd(),
        Kind::Snapshot => BicsiSnapshot::crd(),
        Kind::Backup => BicsiBackup::crd(),
        Kind::Restore => BicsiRestore::crd(),
    }
}

/// The API resource (group, version, kind, plural) of one kind of record.
pub fn api_resource(kind: Kind) -> kube::api::ApiResource {
    match kind {
        Kind::BackingImage => kube::api::ApiResource::erase::<BackingImageResource>(&()),
        Kind::Volume => kube::api::ApiResource::erase::<BicsiVolume>(&()),
        Kind::NodeVolume => kube::api::ApiResource::erase::<BicsiNodeVolume>(&()),
        Kind::Node => kube::api::ApiResource::erase::<BicsiNode>(&()),
        Kind::StorageClass => kube::api::ApiResource::erase::<BicsiStorageClass>(&()),
        Kind::Setting => kube::api::ApiResource::erase::<BicsiSetting>(&()),
        Kind::Snapshot => kube::api::ApiResource::erase::<BicsiSnapshot>(&()),
        Kind::Backup => kube::api::ApiResource::erase::<BicsiBackup>(&()),
        Kind::Restore => kube::api::ApiResource::erase::<BicsiRestore>(&()),
    }
}

/// Whether the kind's status lives in a status subresource.
pub fn has_status(kind: Kind) -> bool {
    kind == Kind::BackingImage
}

/// Every CRD as one multi-document YAML stream, in `Kind::ALL` order: what `bicsi crd` prints
/// and `deploy/crds.yaml` holds.
pub fn manifests() -> String {
    let mut out = String::from(
        "# Generated by `bicsi crd` from the Rust types in src/store/kubernetes/crd.rs; do not edit.\n",
    );
    for kind in Kind::ALL {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd(kind)).expect("a CRD serializes to YAML"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crds_match_the_rust_types() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/crds.yaml");
        let committed = std::fs::read_to_string(path).expect("deploy/crds.yaml");
        assert!(
            committed == manifests(),
            "deploy/crds.yaml differs from the Rust types; regenerate it: cargo run -- crd > deploy/crds.yaml"
        );
    }

    #[test]
    fn backing_image_is_longhorns_resource_with_a_status_subresource() {
        let bi = crd(Kind::BackingImage);
        assert_eq!(
            bi.metadata.name.as_deref(),
            Some("backingimages.longhorn.io")
        );
        let v = &bi.spec.versions[0];
        assert_eq!(v.name, VERSION);
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let schema = serde_json::to_value(v.schema.as_ref().unwrap()).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["sourceType"]));
        assert_eq!(
            spec["properties"]["sourceType"]["enum"],
            serde_json::json!(["download", "upload", "export-from-volume", "restore"])
        );
        // No other kind reuses a Longhorn name whose meaning differs.
        for kind in Kind::ALL {
            let name = crd(kind).metadata.name.unwrap();
            assert!(
                kind == Kind::BackingImage || name.starts_with("bicsi"),
                "{name}"
            );
        }
    }
}
