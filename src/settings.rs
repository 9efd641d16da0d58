//! Settings: values an operator changes at run time (`bicsi set setting NAME VALUE`, `PUT
//! /v1/settings/{name}`), kept in the store (`Kind::Setting`) and read where they are used on
//! every use, so a change takes effect without a restart. Node agents read them through the
//! controller's store (`RemoteStore`) like any other record. This module owns the definitions
//! (name, unit, default, description, validation); it must not act on the values.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::{Kind, Store, StoreExt};

pub const CLEANUP_WAIT_INTERVAL: &str = "backing-image-cleanup-wait-interval";
pub const RECOVERY_WAIT_INTERVAL: &str = "backing-image-recovery-wait-interval";
pub const CONCURRENT_SYNCS_PER_NODE: &str = "concurrent-backing-image-syncs-per-node";
pub const SCRUB_INTERVAL: &str = "backing-image-scrub-interval";
pub const CONCURRENT_REBUILDS_PER_NODE: &str = "concurrent-replica-rebuilds-per-node";
pub const REPLICA_TIMEOUT: &str = "replica-timeout";
/// Where backups go: `file:///PATH` or `s3://BUCKET/PREFIX?endpoint=…&region=…&path-style=true`
/// (empty: backups are off). Parsed and reached by `crate::backup::target`.
pub const BACKUP_TARGET: &str = "backup-target";
/// A file with the backup target's credentials (`AWS_ACCESS_KEY_ID=…` and
/// `AWS_SECRET_ACCESS_KEY=…` lines, as a Secret mounted as a file would give them); empty: none.
pub const BACKUP_TARGET_CREDENTIAL_FILE: &str = "backup-target-credential-file";

/// A setting whose value is text (a URL, a path) rather than a number.
#[derive(Clone, Copy, Debug)]
pub struct TextDefinition {
    pub name: &'static str,
    pub description: &'static str,
    /// Checks a value's form (not whether what it names is reachable); the trimmed value.
    pub check: fn(&str) -> Result<String>,
}

/// Networks backing image downloads never connect to (empty: the default of where bicsi runs).
pub const DOWNLOAD_DENIED_NETWORKS: &str = crate::download::guard::DENIED_SETTING;
/// Networks downloads may connect to even inside a denied one.
pub const DOWNLOAD_ALLOWED_NETWORKS: &str = crate::download::guard::ALLOWED_SETTING;

pub const TEXT_DEFINITIONS: [TextDefinition; 4] = [
    TextDefinition {
        name: BACKUP_TARGET,
        description: "Where backups are stored: file:///PATH (a mounted filesystem, NFS) or s3://BUCKET/PREFIX with ?endpoint=URL&region=R&path-style=true for self-hosted stores; empty: no backups.",
        check: check_backup_target,
    },
    TextDefinition {
        name: BACKUP_TARGET_CREDENTIAL_FILE,
        description: "A file holding the backup target's credentials as AWS_ACCESS_KEY_ID=… and AWS_SECRET_ACCESS_KEY=… lines (an s3:// target); empty: none.",
        check: check_absolute_path,
    },
    TextDefinition {
        name: DOWNLOAD_DENIED_NETWORKS,
        description: "Networks a backing image download never connects to, checked on every address a URL or a redirect resolves to: CIDRs, addresses, or the names loopback, link-local and node (this node's own addresses), separated by commas. Empty: link-local on the embedded bicsi serve; link-local, loopback and node in a cluster (split mode, --store kubernetes). Link-local (cloud metadata) is always denied.",
        check: check_denied_networks,
    },
    TextDefinition {
        name: DOWNLOAD_ALLOWED_NETWORKS,
        description: "Networks a backing image download may connect to even when a denied network holds them (a hole, e.g. an image server on this node in a cluster): CIDRs, addresses, or the names loopback, link-local and node, separated by commas. Empty: none.",
        check: check_allowed_networks,
    },
];

fn check_networks(name: &str, value: &str) -> Result<String> {
    let v = value.trim();
    crate::download::guard::parse_networks(name, v).map_err(Error::InvalidArgument)?;
    Ok(v.to_string())
}

fn check_denied_networks(value: &str) -> Result<String> {
    check_networks(DOWNLOAD_DENIED_NETWORKS, value)
}

fn check_allowed_networks(value: &str) -> Result<String> {
    check_networks(DOWNLOAD_ALLOWED_NETWORKS, value)
}

fn check_backup_target(value: &str) -> Result<String> {
    let v = value.trim();
    let ok = v.is_empty()
        || v.strip_prefix("file://")
            .is_some_and(|p| p.starts_with('/') && p.len() > 1)
        || v.strip_prefix("s3://")
            .is_some_and(|b| !b.is_empty() && !b.starts_with('/'));
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "setting {BACKUP_TARGET:?}: {v:?} is not a backup target; use file:///PATH or s3://BUCKET/PREFIX (empty: none)"
        )));
    }
    Ok(v.to_string())
}

fn check_absolute_path(value: &str) -> Result<String> {
    let v = value.trim();
    if !v.is_empty() && !v.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "setting {BACKUP_TARGET_CREDENTIAL_FILE:?}: {v:?} is not an absolute path; give the file's full path (empty: none)"
        )));
    }
    Ok(v.to_string())
}

/// The definition of a text setting, if `name` is one.
pub fn text_definition(name: &str) -> Option<&'static TextDefinition> {
    TEXT_DEFINITIONS.iter().find(|d| d.name == name)
}

/// Checks a value for any setting, number or text, as `set` would store it.
pub fn check(name: &str, value: &str) -> Result<String> {
    match text_definition(name) {
        Some(t) => (t.check)(value),
        None => definition(name)?.parse(value).map(|n| n.to_string()),
    }
}

/// One setting: what it is called, what it counts, its default and the values it takes.
#[derive(Clone, Copy, Debug)]
pub struct Definition {
    pub name: &'static str,
    pub unit: &'static str,
    pub default: u64,
    /// The smallest value accepted.
    pub min: u64,
    pub description: &'static str,
}

impl Definition {
    /// The accepted form, for error messages.
    pub fn accepted(&self) -> String {
        format!(
            "a whole number of {} that is at least {}",
            self.unit, self.min
        )
    }

    /// Parses and checks a value given by a user.
    pub fn parse(&self, value: &str) -> Result<u64> {
        let v = value.trim();
        let n: u64 = v.parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "setting {:?}: value {value:?} is not valid; use {}",
                self.name,
                self.accepted()
            ))
        })?;
        if n < self.min {
            return Err(Error::InvalidArgument(format!(
                "setting {:?}: value {n} is too small; use {}",
                self.name,
                self.accepted()
            )));
        }
        Ok(n)
    }
}

pub const DEFINITIONS: [Definition; 6] = [
    Definition {
        name: CLEANUP_WAIT_INTERVAL,
        unit: "minutes",
        default: 60,
        min: 0,
        description: "How long a backing image file no replica on its disk uses is kept before it is removed (0: at the next lifecycle tick). Every image keeps at least minNumberOfCopies files.",
    },
    Definition {
        name: RECOVERY_WAIT_INTERVAL,
        unit: "seconds",
        default: 300,
        min: 0,
        description: "How long a backing image file may stay unknown (its node unreachable) before it counts as failed and is recovered.",
    },
    Definition {
        name: CONCURRENT_SYNCS_PER_NODE,
        unit: "syncs",
        default: 3,
        min: 1,
        description: "At most this many backing image file syncs (sending or receiving) run at once on a node; the others wait in pending.",
    },
    Definition {
        name: SCRUB_INTERVAL,
        unit: "seconds",
        default: 86_400,
        min: 0,
        description: "How often a node re-hashes its ready backing image files (SHA-512) to catch bytes changed on disk (0: never).",
    },
    Definition {
        name: CONCURRENT_REBUILDS_PER_NODE,
        unit: "rebuilds",
        default: 1,
        min: 1,
        description: "At most this many replica rebuilds (copy and verification) run at once on a node; the others wait for the next pass.",
    },
    Definition {
        name: REPLICA_TIMEOUT,
        unit: "seconds",
        default: 8,
        min: 1,
        description: "A remote replica whose node does not answer a new connection within this many seconds (a stalled node) has its connections cut and is marked err, so it stops blocking the volume's writes. Checked every 2 seconds.",
    },
];

/// The definition of a setting, or an error listing the known ones.
pub fn definition(name: &str) -> Result<&'static Definition> {
    DEFINITIONS.iter().find(|d| d.name == name).ok_or_else(|| {
        Error::NotFound(format!(
            "unknown setting {name:?}; the settings are: {}",
            DEFINITIONS
                .iter()
                .map(|d| d.name)
                .chain(TEXT_DEFINITIONS.iter().map(|d| d.name))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// What the store keeps for a setting that was set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub name: String,
    pub value: String,
}

/// A setting as the CLI and HTTP API show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingView {
    pub name: String,
    pub value: String,
    pub default: String,
    pub unit: String,
    pub description: String,
}

/// The settings in a store.
#[derive(Clone)]
pub struct Settings {
    store: Arc<dyn Store>,
}

impl Settings {
    pub fn new(store: Arc<dyn Store>) -> Settings {
        Settings { store }
    }

    /// The current value: the stored one, or the default when none is stored (or the stored one
    /// no longer validates, which a store edited by hand could hold).
    pub fn value(&self, name: &str) -> Result<u64> {
        let def = definition(name)?;
        let stored: Option<Stored> = self.store.get(Kind::Setting, name)?;
        Ok(match stored {
            Some(s) => def.parse(&s.value).unwrap_or_else(|e| {
                tracing::warn!(setting = name, error = %e, "stored value ignored; using the default");
                def.default
            }),
            None => def.default,
        })
    }

    /// The current value, or the default when the store cannot be read right now (a node agent
    /// whose controller is unreachable keeps working with the defaults).
    pub fn value_or_default(&self, name: &str) -> u64 {
        self.value(name).unwrap_or_else(|e| {
            tracing::debug!(setting = name, error = %e, "cannot read the setting; using the default");
            definition(name).map(|d| d.default).unwrap_or(0)
        })
    }

    pub fn cleanup_wait(&self) -> Duration {
        Duration::from_secs(
            self.value_or_default(CLEANUP_WAIT_INTERVAL)
                .saturating_mul(60),
        )
    }

    pub fn recovery_wait(&self) -> Duration {
        Duration::from_secs(self.value_or_default(RECOVERY_WAIT_INTERVAL))
    }

    pub fn concurrent_syncs(&self) -> usize {
        self.value_or_default(CONCURRENT_SYNCS_PER_NODE).max(1) as usize
    }

    /// None: the periodic scrub is off.
    pub fn scrub_interval(&self) -> Option<Duration> {
        let s = self.value_or_default(SCRUB_INTERVAL);
        (s > 0).then(|| Duration::from_secs(s))
    }

    /// The current value of a text setting: the stored one, or "" when none is stored.
    pub fn text(&self, name: &str) -> Result<String> {
        let def = text_definition(name)
            .ok_or_else(|| Error::Internal(format!("setting {name:?} is not a text setting")))?;
        let stored: Option<Stored> = self.store.get(Kind::Setting, def.name)?;
        Ok(stored.map(|s| s.value).unwrap_or_default())
    }

    /// The backup target's credential file; `None` while the setting is empty.
    pub fn backup_credential_file(&self) -> Result<Option<std::path::PathBuf>> {
        let creds = self.text(BACKUP_TARGET_CREDENTIAL_FILE)?;
        Ok((!creds.is_empty()).then(|| std::path::PathBuf::from(creds)))
    }

    /// The download guard these settings make, for this process (see
    /// [`crate::download::guard`]).
    pub fn download_guard(&self) -> Result<crate::download::guard::NetworkGuard> {
        use crate::download::guard;
        guard::NetworkGuard::from_settings(
            &self.text(DOWNLOAD_DENIED_NETWORKS)?,
            &self.text(DOWNLOAD_ALLOWED_NETWORKS)?,
            guard::in_cluster(),
            &guard::node_addresses(),
        )
        .map_err(Error::FailedPrecondition)
    }

    pub fn get(&self, name: &str) -> Result<SettingView> {
        if let Some(t) = text_definition(name) {
            return Ok(SettingView {
                name: t.name.to_string(),
                value: self.text(name)?,
                default: String::new(),
                unit: "text".to_string(),
                description: t.description.to_string(),
            });
        }
        let def = definition(name)?;
        Ok(SettingView {
            name: def.name.to_string(),
            value: self.value(name)?.to_string(),
            default: def.default.to_string(),
            unit: def.unit.to_string(),
            description: def.description.to_string(),
        })
    }

    pub fn list(&self) -> Result<Vec<SettingView>> {
        DEFINITIONS
            .iter()
            .map(|d| d.name)
            .chain(TEXT_DEFINITIONS.iter().map(|d| d.name))
            .map(|n| self.get(n))
            .collect()
    }

    /// Validates and stores a value; it applies from the next use on.
    pub fn set(&self, name: &str, value: &str) -> Result<SettingView> {
        if text_definition(name).is_some() {
            let v = check(name, value)?;
            self.store.put(
                Kind::Setting,
                name,
                &Stored {
                    name: name.to_string(),
                    value: v.clone(),
                },
            )?;
            tracing::info!(setting = name, value = %v, "setting changed");
            return self.get(name);
        }
        let def = definition(name)?;
        let n = def.parse(value)?;
        self.store.put(
            Kind::Setting,
            name,
            &Stored {
                name: name.to_string(),
                value: n.to_string(),
            },
        )?;
        tracing::info!(setting = name, value = n, "setting changed");
        self.get(name)
    }
}

/// The file managers follow these settings (`files` defines what it reads of them).
impl crate::files::FileSettings for Settings {
    fn concurrent_syncs(&self) -> usize {
        Settings::concurrent_syncs(self)
    }

    fn scrub_interval(&self) -> Option<Duration> {
        Settings::scrub_interval(self)
    }

    fn download_guard(&self) -> Result<crate::download::guard::NetworkGuard> {
        Settings::download_guard(self)
    }

    fn backup_credential_file(&self) -> Result<Option<std::path::PathBuf>> {
        Settings::backup_credential_file(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    fn settings() -> (tempfile::TempDir, Settings) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        (dir, Settings::new(store))
    }

    #[test]
    fn defaults_until_set_then_the_stored_value() {
        let (_d, s) = settings();
        assert_eq!(s.cleanup_wait(), Duration::from_secs(3600));
        assert_eq!(s.recovery_wait(), Duration::from_secs(300));
        assert_eq!(s.concurrent_syncs(), 3);
        assert_eq!(s.scrub_interval(), Some(Duration::from_secs(86_400)));
        s.set(CLEANUP_WAIT_INTERVAL, "0").unwrap();
        s.set(SCRUB_INTERVAL, "0").unwrap();
        s.set(CONCURRENT_SYNCS_PER_NODE, " 1 ").unwrap();
        assert_eq!(s.cleanup_wait(), Duration::ZERO);
        assert_eq!(s.scrub_interval(), None);
        assert_eq!(s.concurrent_syncs(), 1);
        let all = s.list().unwrap();
        assert_eq!(all.len(), DEFINITIONS.len() + TEXT_DEFINITIONS.len());
        let named = |n: &str| all.iter().find(|v| v.name == n).unwrap().value.clone();
        assert_eq!(named(CONCURRENT_REBUILDS_PER_NODE), "1");
        assert_eq!(named(REPLICA_TIMEOUT), "8");
        assert_eq!(DEFINITIONS.len(), 6);
        assert_eq!(all[0].name, CLEANUP_WAIT_INTERVAL);
        assert_eq!(all[0].value, "0");
        assert_eq!(all[0].default, "60");
    }

    #[test]
    fn bad_names_and_values_are_refused_naming_the_setting_and_the_form() {
        let (_d, s) = settings();
        let cases = [
            (CONCURRENT_SYNCS_PER_NODE, "0", "at least 1"),
            (CONCURRENT_SYNCS_PER_NODE, "-2", "whole number of syncs"),
            (CLEANUP_WAIT_INTERVAL, "ten", "whole number of minutes"),
            (RECOVERY_WAIT_INTERVAL, "1.5", "whole number of seconds"),
            (SCRUB_INTERVAL, "", "whole number of seconds"),
        ];
        for (name, value, want) in cases {
            let e = s.set(name, value).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains(want), "{name}={value}: {e}");
        }
        let e = s.set("no-such-setting", "1").unwrap_err().to_string();
        assert!(
            e.contains("no-such-setting") && e.contains(CLEANUP_WAIT_INTERVAL),
            "{e}"
        );
        for (name, value, want) in [
            (BACKUP_TARGET, "nfs://host/x", "file:///PATH"),
            (BACKUP_TARGET, "file://relative", "file:///PATH"),
            (BACKUP_TARGET, "s3:///no-bucket", "s3://BUCKET"),
            (BACKUP_TARGET_CREDENTIAL_FILE, "creds.env", "absolute"),
        ] {
            let e = s.set(name, value).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains(want), "{name}={value}: {e}");
        }
        assert_eq!(s.text(BACKUP_TARGET).unwrap(), "");
        s.set(BACKUP_TARGET, " file:///mnt/backups ").unwrap();
        assert_eq!(s.text(BACKUP_TARGET).unwrap(), "file:///mnt/backups");
        assert_eq!(s.get(BACKUP_TARGET).unwrap().value, "file:///mnt/backups");
        // Nothing was stored by the refused calls.
        assert_eq!(s.concurrent_syncs(), 3);
        assert_eq!(s.cleanup_wait(), Duration::from_secs(3600));
    }
}
