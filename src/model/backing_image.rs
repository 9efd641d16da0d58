//! The BackingImage record, shaped like the `longhorn.io/v1beta2` manifests users already have:
//! spec (what the user asked) and status (what bicsi observed) are separate types; only bicsi
//! writes the status. Plain data; its validation is `backing::object`'s (which re-exports these),
//! and the rules of a file's state are [`super::file_state`]'s.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::SourceType;
use super::file_state::FileState;

pub const API_VERSION: &str = "longhorn.io/v1beta2";
pub const KIND: &str = "BackingImage";
pub const DEFAULT_NAMESPACE: &str = "longhorn-system";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackingImageSpec {
    pub source_type: SourceType,
    #[serde(default)]
    pub source_parameters: BTreeMap<String, String>,
    /// Expected SHA-512 (lower-case hex) of the whole file; empty when not given.
    #[serde(default)]
    pub checksum: String,
    #[serde(default = "one")]
    pub min_number_of_copies: u32,
}

fn one() -> u32 {
    1
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// The state of the image's file on one disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskFileStatus {
    pub state: FileState,
    pub progress: u8,
    #[serde(default)]
    pub message: String,
    pub last_state_transition_time: String,
    /// The last report on the file (progress counts as life for an in-progress file).
    #[serde(default)]
    pub last_update_time: String,
    /// The node the disk belongs to.
    #[serde(default)]
    pub node_id: String,
    /// Since when no replica on the disk uses the file (RFC 3339); empty while one does. The
    /// cleanup wait is measured from it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unused_since: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackingImageStatus {
    #[serde(default)]
    pub uuid: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub virtual_size: u64,
    /// `raw` or `qcow2`, once the first file is ready.
    #[serde(default)]
    pub format: String,
    /// The image's checksum, fixed once known (given in the spec, or the first ready file's).
    #[serde(default)]
    pub checksum: String,
    /// Disk id → the file's state on that disk.
    #[serde(default)]
    pub disk_file_status_map: BTreeMap<String, DiskFileStatus>,
    /// The virtual size learned before the first file was ready (from the head of the download,
    /// or the size of the volume to export), which volumes made meanwhile were sized for: the
    /// first ready file must have it. 0 while nothing was learned.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub expected_virtual_size: u64,
    /// Where `expected_virtual_size` was learned, for messages ("the qcow2 header at the URL").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub expected_virtual_size_from: String,
    /// Failures of the data source in a row that trying again soon cannot fix (a checksum
    /// mismatch, a 4xx answer, a file that is no disk image); 0 again once a file is ready.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub source_failures: u32,
    /// When the source is tried again after such a failure (RFC 3339; the wait doubles from a
    /// minute to six hours); empty when no such wait is on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub next_source_retry_time: String,
    /// What a user must know about the image as a whole (an uploaded image that cannot be
    /// recovered, for one); empty when all is well.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Of an image whose source is polled (`pollInterval`): what the poll saw and made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll: Option<PollStatus>,
    /// Of a version the poll made: the polled image it is a version of; empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version_of: String,
}

/// The poll of an image that updates (see [`crate::backing::poll`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PollStatus {
    /// The source's validator the image or its newest version was made from (`etag:"…"`,
    /// `last-modified:…`, or a registry manifest's `sha256:…`); empty before the first check.
    #[serde(default)]
    pub validator: String,
    /// When the source was last checked (RFC 3339).
    #[serde(default)]
    pub last_check_time: String,
    /// When it is checked next (RFC 3339); empty: at once.
    #[serde(default)]
    pub next_check_time: String,
    /// Why the last check failed; empty when it did not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    /// The image new volumes naming this one get: the newest version with a ready file; empty
    /// while that is this image itself.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub current: String,
    /// The versions made, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<PolledVersion>,
}

/// One version the poll made of an image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolledVersion {
    /// `NAME-<short digest>`, a BackingImage of its own.
    pub name: String,
    /// The validator the source had when the version was made.
    pub validator: String,
    /// When it was made (RFC 3339).
    pub created_time: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackingImage {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: BackingImageSpec,
    #[serde(default)]
    pub status: BackingImageStatus,
}

impl BackingImage {
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// The directory name of this image's file on a disk: `<name>-<uuid>`.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.metadata.name, self.status.uuid)
    }

    /// A one-line summary of where an image stands, for retryable errors and tables.
    pub fn describe(&self) -> String {
        if self.status.disk_file_status_map.is_empty() {
            return match self.spec.source_type {
                SourceType::Upload => "waiting for an upload".to_string(),
                _ => "no file yet".to_string(),
            };
        }
        self.status
            .disk_file_status_map
            .iter()
            .map(|(disk, f)| {
                let mut s = format!("{disk}: {} {}%", f.state, f.progress);
                if !f.message.is_empty() {
                    s.push_str(&format!(" ({})", f.message));
                }
                s
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Whether some disk holds a ready file.
    pub fn has_ready_file(&self) -> bool {
        self.status
            .disk_file_status_map
            .values()
            .any(|f| f.state == FileState::Ready)
    }
}

/// The facts of a ready file, in `backing.cfg` beside it (`Disk::image_meta`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileMeta {
    pub name: String,
    pub uuid: String,
    pub size: u64,
    pub virtual_size: u64,
    pub format: String,
    pub checksum: String,
    pub source_type: String,
}

/// A spec of `source_type` with `params`, no checksum and one copy (for tests).
#[cfg(test)]
pub(crate) fn spec_of(source_type: SourceType, params: &[(&str, &str)]) -> BackingImageSpec {
    BackingImageSpec {
        source_type,
        source_parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        checksum: String::new(),
        min_number_of_copies: 1,
    }
}
