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

    pub fn get(&self, name: &str) -> Result<SettingView> {
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
        DEFINITIONS.iter().map(|d| self.get(d.name)).collect()
    }

    /// Validates and stores a value; it applies from the next use on.
    pub fn set(&self, name: &str, value: &str) -> Result<SettingView> {
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
        assert_eq!(all.len(), DEFINITIONS.len());
        let named = |n: &str| all.iter().find(|v| v.name == n).unwrap().value.clone();
        assert_eq!(named(CONCURRENT_REBUILDS_PER_NODE), "1");
        assert_eq!(named(REPLICA_TIMEOUT), "8");
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
        // Nothing was stored by the refused calls.
        assert_eq!(s.concurrent_syncs(), 3);
        assert_eq!(s.cleanup_wait(), Duration::from_secs(3600));
    }
}
