//! StorageClass parameters of a volume: parsed, validated, and refused by name when unknown, so a
//! typo in a StorageClass fails at provisioning with the list of keys bicsi accepts.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

pub const NUMBER_OF_REPLICAS: &str = "numberOfReplicas";
pub const STALE_REPLICA_TIMEOUT: &str = "staleReplicaTimeout";
pub const FS_TYPE: &str = "fsType";

/// Every parameter key bicsi accepts (besides the `csi.storage.k8s.io/` keys the sidecars add).
pub const ACCEPTED: &[&str] = &[NUMBER_OF_REPLICAS, STALE_REPLICA_TIMEOUT, FS_TYPE];

/// Keys the Kubernetes sidecars add (`--extra-create-metadata`); accepted and not kept as spec.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

pub const DEFAULT_REPLICAS: u32 = 3;
pub const MAX_REPLICAS: u32 = 20;
pub const FS_TYPES: &[&str] = &["ext4", "xfs"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeParams {
    pub number_of_replicas: u32,
    pub stale_replica_timeout_minutes: Option<u32>,
    pub fs_type: Option<String>,
    /// The parameters that define the volume (sidecar metadata removed), for idempotency checks.
    pub kept: BTreeMap<String, String>,
}

pub fn parse(params: &BTreeMap<String, String>) -> Result<VolumeParams> {
    let mut out = VolumeParams {
        number_of_replicas: DEFAULT_REPLICAS,
        stale_replica_timeout_minutes: None,
        fs_type: None,
        kept: BTreeMap::new(),
    };
    for (key, value) in params {
        if key.starts_with(SIDECAR_PREFIX) {
            continue;
        }
        match key.as_str() {
            NUMBER_OF_REPLICAS => out.number_of_replicas = parse_replicas(value)?,
            STALE_REPLICA_TIMEOUT => {
                out.stale_replica_timeout_minutes = Some(value.trim().parse().map_err(|_| {
                    Error::InvalidArgument(format!(
                        "parameter {STALE_REPLICA_TIMEOUT}={value:?} is not a whole number of minutes (for example \"2880\")"
                    ))
                })?)
            }
            FS_TYPE => out.fs_type = Some(parse_fs_type(value)?),
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown parameter {other:?}; accepted parameters are: {}",
                    ACCEPTED.join(", ")
                )));
            }
        }
        out.kept.insert(key.clone(), value.clone());
    }
    Ok(out)
}

pub fn parse_replicas(value: &str) -> Result<u32> {
    match value.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_REPLICAS).contains(&n) => Ok(n),
        _ => Err(Error::InvalidArgument(format!(
            "parameter {NUMBER_OF_REPLICAS}={value:?} must be a whole number from 1 to {MAX_REPLICAS}"
        ))),
    }
}

pub fn parse_fs_type(value: &str) -> Result<String> {
    let v = value.trim();
    if FS_TYPES.contains(&v) {
        Ok(v.to_string())
    } else {
        Err(Error::InvalidArgument(format!(
            "filesystem type {value:?} is not supported; use one of: {}",
            FS_TYPES.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_parameters() {
        let p = parse(&map(&[
            ("numberOfReplicas", "3"),
            ("staleReplicaTimeout", "2880"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]))
        .unwrap();
        assert_eq!(p.number_of_replicas, 3);
        assert_eq!(p.stale_replica_timeout_minutes, Some(2880));
        assert!(!p.kept.contains_key("csi.storage.k8s.io/pvc/name"));
        assert_eq!(
            parse(&map(&[])).unwrap().number_of_replicas,
            DEFAULT_REPLICAS
        );
    }

    #[test]
    fn refuses_bad_parameters_by_name() {
        let table: &[(&[(&str, &str)], &str)] = &[
            (&[("numberOfReplicas", "0")], "numberOfReplicas"),
            (&[("numberOfReplicas", "three")], "numberOfReplicas"),
            (&[("numberOfReplicas", "21")], "1 to 20"),
            (&[("staleReplicaTimeout", "-1")], "staleReplicaTimeout"),
            (&[("fsType", "btrfs")], "ext4, xfs"),
            (&[("replicas", "3")], "unknown parameter \"replicas\""),
            (
                &[("replicas", "3")],
                "numberOfReplicas, staleReplicaTimeout, fsType",
            ),
        ];
        for (input, want) in table {
            let err = parse(&map(input)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.to_string().contains(want), "{input:?}: {err}");
        }
    }
}
