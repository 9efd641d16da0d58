//! The state of a backing image file on one disk, and the one function that moves it.
//!
//! ```text
//!   pending ──▶ starting ──▶ in-progress ──▶ ready
//!      │            │             │            │
//!      └────────────┴─────────────┴──▶ failed ◀┘
//!   failed ──▶ pending                (recovery: prepare the file again)
//!   any ──▶ unknown ──▶ ready         (its node came back and the file verified)
//!                   └──▶ failed | pending
//! ```
//! Every state but `ready` and `failed` has a deadline: a file that sits in it longer without
//! progress fails with a message saying so, so nothing stays stuck.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FileState {
    Pending,
    Starting,
    InProgress,
    Ready,
    Failed,
    Unknown,
}

impl FileState {
    pub fn as_str(self) -> &'static str {
        match self {
            FileState::Pending => "pending",
            FileState::Starting => "starting",
            FileState::InProgress => "in-progress",
            FileState::Ready => "ready",
            FileState::Failed => "failed",
            FileState::Unknown => "unknown",
        }
    }

    /// Final states need nothing to happen; the others have a deadline.
    pub fn is_final(self) -> bool {
        matches!(self, FileState::Ready | FileState::Failed)
    }

    /// How long a file may stay in this state without progress before it fails.
    pub fn deadline(self) -> Option<Duration> {
        match self {
            FileState::Pending => Some(Duration::from_secs(10 * 60)),
            FileState::Starting => Some(Duration::from_secs(2 * 60)),
            // Measured from the last progress, not from the start: big images take long.
            FileState::InProgress => Some(Duration::from_secs(10 * 60)),
            FileState::Unknown => Some(Duration::from_secs(5 * 60)),
            FileState::Ready | FileState::Failed => None,
        }
    }
}

impl std::fmt::Display for FileState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a file in `state` is past its deadline at `now` (seconds since the epoch), if it is:
/// measured from its last report while in progress, else from when it entered the state.
pub fn overdue(state: FileState, entered: u64, last_update: u64, now: u64) -> Option<String> {
    overdue_after(state, state.deadline(), entered, last_update, now)
}

/// [`overdue`] with the deadline given (a setting can change a state's deadline).
pub fn overdue_after(
    state: FileState,
    deadline: Option<Duration>,
    entered: u64,
    last_update: u64,
    now: u64,
) -> Option<String> {
    let deadline = deadline?;
    let since = if state == FileState::InProgress {
        last_update.max(entered)
    } else {
        entered
    };
    let waited = now.saturating_sub(since);
    (waited > deadline.as_secs()).then(|| {
        format!(
            "no progress for {waited} s while {state} (the limit is {} s); it will be prepared again",
            deadline.as_secs()
        )
    })
}

/// Checks a move from `from` to `to`; staying in a state (progress updates) is allowed.
pub fn transition(from: FileState, to: FileState) -> Result<FileState> {
    use FileState::*;
    let ok = from == to
        || matches!(
            (from, to),
            (Pending, Starting | Failed)
                | (Starting, InProgress | Failed)
                | (InProgress, Ready | Failed)
                | (Ready, Failed)
                | (Failed, Pending)
                | (Unknown, Ready | Failed | Pending)
                | (_, Unknown)
        );
    if ok {
        Ok(to)
    } else {
        Err(Error::Internal(format!(
            "backing image file cannot go from {from} to {to}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::FileState::*;
    use super::*;

    #[test]
    fn legal_and_illegal_moves() {
        let legal = [
            (Pending, Starting),
            (Starting, InProgress),
            (InProgress, InProgress),
            (InProgress, Ready),
            (InProgress, Failed),
            (Ready, Failed),
            (Failed, Pending),
            (Ready, Unknown),
            (InProgress, Unknown),
            (Unknown, Ready),
            (Unknown, Pending),
        ];
        for (a, b) in legal {
            assert_eq!(transition(a, b).unwrap(), b, "{a} -> {b}");
        }
        let illegal = [
            (Pending, Ready),
            (Starting, Ready),
            (Failed, Ready),
            (Ready, InProgress),
            (Failed, InProgress),
            (Ready, Pending),
        ];
        for (a, b) in illegal {
            let e = transition(a, b).unwrap_err();
            assert!(e.to_string().contains(&format!("from {a} to {b}")), "{e}");
        }
    }

    #[test]
    fn every_non_final_state_has_a_deadline() {
        for s in [Pending, Starting, InProgress, Ready, Failed, Unknown] {
            assert_eq!(s.deadline().is_none(), s.is_final(), "{s}");
        }
    }

    #[test]
    fn deadlines_fail_stuck_files_and_spare_working_ones() {
        let t0 = 1_000_000;
        // Pending for 11 minutes: past the 10-minute deadline.
        assert!(overdue(Pending, t0, t0, t0 + 11 * 60).is_some());
        assert!(overdue(Pending, t0, t0, t0 + 9 * 60).is_none());
        // In progress for an hour but reporting progress a minute ago: alive.
        assert!(overdue(InProgress, t0, t0 + 59 * 60, t0 + 60 * 60).is_none());
        // In progress with the last report 11 minutes ago: stuck.
        let why = overdue(InProgress, t0, t0 + 60, t0 + 12 * 60).unwrap();
        assert!(
            why.contains("in-progress") && why.contains("600 s"),
            "{why}"
        );
        // Unknown past the recovery wait, starting past its 2 minutes.
        assert!(overdue(Unknown, t0, t0, t0 + 6 * 60).is_some());
        assert!(overdue(Starting, t0, t0, t0 + 3 * 60).is_some());
        // Final states have none.
        assert!(overdue(Ready, t0, t0, u64::MAX).is_none());
        assert!(overdue(Failed, t0, t0, u64::MAX).is_none());
    }

    #[test]
    fn serialises_like_the_manifests() {
        assert_eq!(
            serde_json::to_string(&InProgress).unwrap(),
            "\"in-progress\""
        );
        assert_eq!(
            serde_json::from_str::<FileState>("\"ready\"").unwrap(),
            Ready
        );
    }
}
