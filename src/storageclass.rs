//! StorageClasses kept by `bicsi serve` for people without Kubernetes: a named set of CSI
//! parameters that `bicsi volume create --storage-class NAME` uses. Applied from the same YAML
//! a cluster takes; the provisioner must be this driver.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::backing::object::ObjectMeta;
use crate::error::{Error, Result};

pub const API_VERSION: &str = "storage.k8s.io/v1";
pub const KIND: &str = "StorageClass";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageClass {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub provisioner: String,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_volume_expansion: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reclaim_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_binding_mode: Option<String>,
}

/// Checks a StorageClass given by a user: kind, name, provisioner and every parameter.
pub fn validate(sc: &StorageClass, driver_name: &str) -> Result<()> {
    let name = &sc.metadata.name;
    if sc.api_version != API_VERSION || sc.kind != KIND {
        return Err(Error::InvalidArgument(format!(
            "expected apiVersion {API_VERSION} and kind {KIND}, got {} {}",
            sc.api_version, sc.kind
        )));
    }
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !name_ok {
        return Err(Error::InvalidArgument(format!(
            "StorageClass name {name:?} is invalid: use lower-case letters, digits, '-' and '.'"
        )));
    }
    if sc.provisioner != driver_name {
        return Err(Error::InvalidArgument(format!(
            "StorageClass {name:?} has provisioner {:?}, but this bicsi is {driver_name:?}; set provisioner: {driver_name}",
            sc.provisioner
        )));
    }
    crate::params::parse(&sc.parameters)
        .map_err(|e| Error::InvalidArgument(format!("StorageClass {name:?}: {e}")))?;
    Ok(())
}
