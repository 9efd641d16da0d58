//! The records of backups and restores in the store: what the CLI, the HTTP API and CSI show
//! while the work runs and after it. The target's metadata is the truth about a finished backup;
//! these records add the work in progress, its progress and its failures. Plain data.
//!
//! ```text
//! Backup:  in-progress ──> completed
//!               └────────> error      (also: in progress when bicsi restarted)
//! Restore: in-progress ──> completed  (the volume exists)
//!               └────────> error      (a restart continues an in-progress one)
//! ```
//!
//! A restore started by `bicsi backup restore` (the HTTP API) is continued after a restart by
//! bicsi itself; one started by CSI CreateVolume (`csi`) by the CO's retry of the same
//! CreateVolume, which finds its disk here (also when the record says error: the retry is a new
//! attempt of the same restore).

use serde::{Deserialize, Serialize};

use super::blocks::Progress;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupState {
    InProgress,
    Completed,
    Error,
}

impl BackupState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupState::InProgress => "in-progress",
            BackupState::Completed => "completed",
            BackupState::Error => "error",
        }
    }

    /// The one transition function: in-progress ends completed or in error, nothing else moves.
    pub fn to(self, next: BackupState) -> Result<BackupState> {
        match (self, next) {
            (BackupState::InProgress, BackupState::Completed | BackupState::Error) => Ok(next),
            _ => Err(Error::Internal(format!(
                "backup state cannot go from {} to {}",
                self.as_str(),
                next.as_str()
            ))),
        }
    }
}

/// A backup of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backup {
    pub name: String,
    /// The source volume (its backup volume in the target has its name).
    pub volume: String,
    /// The snapshot it was read from (a temporary one when the backup took its own).
    pub snapshot: String,
    pub target: String,
    pub state: BackupState,
    pub progress: u64,
    #[serde(default)]
    pub blocks_total: u64,
    #[serde(default)]
    pub blocks_done: u64,
    #[serde(default)]
    pub blocks_uploaded: u64,
    /// Compressed bytes this backup put into the target.
    #[serde(default)]
    pub bytes_uploaded: u64,
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default)]
    pub backing_image: Option<String>,
    #[serde(default)]
    pub full: bool,
    #[serde(default)]
    pub message: String,
    pub created: String,
    #[serde(default)]
    pub completed: String,
}

impl Backup {
    pub fn set_progress(&mut self, p: &Progress) {
        self.progress = p.percent();
        self.blocks_total = p.blocks_total;
        self.blocks_done = p.blocks_done;
        self.blocks_uploaded = p.blocks_uploaded;
        self.bytes_uploaded = p.bytes_transferred;
    }
}

/// A volume being restored from a backup, keyed by the new volume's name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Restore {
    pub volume: String,
    pub backup: String,
    /// The backing image to restore over instead of the backup's own.
    #[serde(default)]
    pub backing_image: Option<String>,
    /// The requested size (0: the backup's).
    #[serde(default)]
    pub size_bytes: u64,
    pub state: BackupState,
    pub progress: u64,
    #[serde(default)]
    pub bytes_fetched: u64,
    #[serde(default)]
    pub message: String,
    pub created: String,
    /// How many times it was started (a restart of bicsi continues it from its checkpoint).
    #[serde(default)]
    pub attempts: u32,
    /// Blocks to write, and written (counting those an earlier attempt wrote).
    #[serde(default)]
    pub blocks_total: u64,
    #[serde(default)]
    pub blocks_done: u64,
    /// Blocks the latest attempt fetched from the target.
    #[serde(default)]
    pub blocks_fetched: u64,
    /// The disk the restore builds its file on (kept, so a continued restore finds its file).
    #[serde(default)]
    pub disk_id: String,
    /// StorageClass parameters of the new volume, over those the backup recorded.
    #[serde(default)]
    pub parameters: std::collections::BTreeMap<String, String>,
    /// Started by CSI CreateVolume from a `bak` snapshot: continued by the CO's retry of that
    /// call (same name), never by bicsi's resume at start, so it is not started twice.
    #[serde(default)]
    pub csi: bool,
}

impl Restore {
    pub fn set_progress(&mut self, p: &Progress) {
        self.progress = p.percent();
        self.bytes_fetched = p.bytes_transferred;
        self.blocks_total = p.blocks_total;
        self.blocks_done = p.blocks_done;
        self.blocks_fetched = p.blocks_fetched;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        use BackupState::*;
        for (from, to, ok) in [
            (InProgress, Completed, true),
            (InProgress, Error, true),
            (Completed, Error, false),
            (Error, Completed, false),
            (Completed, InProgress, false),
            (InProgress, InProgress, false),
        ] {
            assert_eq!(from.to(to).is_ok(), ok, "{from:?} -> {to:?}");
        }
    }
}
