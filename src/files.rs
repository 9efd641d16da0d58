//! Backing image files on this node's disks: one manager per disk, started when the disk first
//! needs a file and retired when it holds none and has no work running.
//!
//! A manager prepares files (from the image's data source, from another disk of this node, or
//! from another node over HTTP), and reports each file's state to the controller through
//! [`FileReports`]. Work happens under `<disk>/tmp/`; a file is renamed to
//! `<disk>/backing-images/<name>-<uuid>/backing` only after its SHA-512 matched the image's
//! checksum, so nothing half-written is ever ready. Beside it go `backing.cfg` (its facts) and,
//! when one was built from the same bytes as that SHA-512, `backing.manifest` (its chunk
//! manifest, see [`crate::sync::manifest`], which lets other nodes check a transfer chunk by
//! chunk); verification and the scrub rebuild a missing or wrong manifest (the paths are
//! `model::Disk`'s layout). It must not change image objects itself: the controller owns them
//! and applies the reports.
//!
//! It stands below the controller domain and imports nothing of it: what it reads of the
//! records and settings comes through the traits it defines here ([`ImageRecords`],
//! [`FileSettings`]), an image's source comes typed in the request ([`source`]), and what
//! happens is counted through `counters`.
//!
//! This module holds what every job shares: the reports, the [`FileManagers`] state and those
//! traits. One job a file below it:
//! - [`managers`]: the registry of disk managers, their tasks, look-ups and deleting files;
//! - [`slots`]: the sync slots that bound the syncs running on the node;
//! - [`source`]: an image's data source, typed, as the requests carry it;
//! - [`first_file`]: the first file from a download, and [`export`] from a volume;
//! - [`upload`]: the first file from an upload;
//! - [`finish`]: finishing a prepared file, verification and the scrub;
//! - [`sync`]: copying a ready file to another disk or from another node;
//! - [`resume`]: what is done with the files after a restart or a return;
//! - [`progress`]: progress reports while work runs.

mod export;
mod finish;
mod first_file;
mod managers;
mod progress;
mod resume;
mod slots;
pub mod source;
mod sync;
mod upload;

pub use slots::{SyncSlot, SyncSlots};
pub use upload::{UploadRequest, parse_checksum};

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::error::Result;
use crate::model::backing_image::BackingImage;
use crate::model::file_state::FileState;
use crate::model::{Disk, NodeRecord, Volume, manifest_path};
use crate::os::Os;
use source::ImageSource;

/// The facts of a ready file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadyFile {
    pub size: u64,
    pub virtual_size: u64,
    pub format: String,
    pub checksum: String,
}

/// What a node says about a file on one of its disks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileReport {
    pub state: FileState,
    pub progress: u8,
    pub message: String,
    pub ready: Option<ReadyFile>,
    /// The work on the file was cut off by a restart of bicsi and starts again: the file goes
    /// back to pending from where it was (through failed, as its states require) in one update
    /// of the image, so no one ever sees it failed for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart: bool,
    /// With a failed state: the source failed in a way that trying again soon cannot fix (a
    /// checksum mismatch, a 4xx answer, a file that is no disk image), so it is retried with a
    /// backoff that grows to hours.
    #[serde(default)]
    pub permanent: bool,
}

impl FileReport {
    pub fn new(state: FileState, progress: u8, message: impl Into<String>) -> FileReport {
        FileReport {
            state,
            progress,
            message: message.into(),
            ready: None,
            restart: false,
            permanent: false,
        }
    }

    /// Pending again after a restart cut off the work (see `restart`).
    pub fn restarting(message: impl Into<String>) -> FileReport {
        FileReport {
            restart: true,
            ..FileReport::new(FileState::Pending, 0, message)
        }
    }
}

/// Where a node's reports go: the controller's image objects.
#[tonic::async_trait]
pub trait FileReports: Send + Sync {
    async fn report(&self, image: &str, disk: &Disk, report: FileReport) -> Result<()>;
}

/// What the file managers read of the controller's records (its store, local or remote): the
/// images, the other nodes (where to fetch a file from), the volume an export reads, and the
/// typed source of an image for the first file a node starts again by itself after a restart
/// (the controller's requests carry it). The node implements it over its store
/// (`backing::StoreRecords`); only reads, never writes: the reports go through [`FileReports`].
pub trait ImageRecords: Send + Sync {
    fn image(&self, name: &str) -> Result<Option<BackingImage>>;
    fn images(&self) -> Result<Vec<BackingImage>>;
    fn node(&self, node_id: &str) -> Result<Option<NodeRecord>>;
    fn volume(&self, volume_id: &str) -> Result<Option<Volume>>;
    /// The image's source as the controller would send it (`backing::first_file_source`).
    fn source(&self, bi: &BackingImage) -> Result<ImageSource>;
}

/// The settings the file managers follow, read on every use so changes apply without a
/// restart (`settings::Settings` implements it over the controller's store).
pub trait FileSettings: Send + Sync {
    /// `concurrent-backing-image-syncs-per-node`.
    fn concurrent_syncs(&self) -> usize;
    /// `backing-image-scrub-interval`; `None`: no scrub.
    fn scrub_interval(&self) -> Option<std::time::Duration>;
    /// The networks a download may and may not reach.
    fn download_guard(&self) -> Result<crate::download::guard::NetworkGuard>;
    /// The backup target's credential file, for a restore; `None` when not set.
    fn backup_credential_file(&self) -> Result<Option<PathBuf>>;
}

/// One disk's manager: the work running on it, by image name.
pub struct DiskManager {
    pub disk: Disk,
    tasks: Mutex<HashMap<String, CancellationToken>>,
}

pub struct FileManagers {
    node_id: String,
    disks: Vec<Disk>,
    os: Os,
    /// Image, volume and node records (the controller's store, local or remote).
    records: Arc<dyn ImageRecords>,
    reports: Arc<dyn FileReports>,
    managers: Mutex<HashMap<String, Arc<DiskManager>>>,
    /// Images being uploaded through this process now.
    uploads: Mutex<HashSet<String>>,
    /// "Now" for the scrub.
    clock: Arc<dyn Clock>,
    /// Read on every use, from the controller's store: changes apply without a restart.
    settings: Arc<dyn FileSettings>,
    /// File syncs (sending or receiving) running on this node.
    syncs: SyncSlots,
    /// (image directory, disk id) → when its ready file was last verified (seconds).
    verified: Mutex<HashMap<(String, String), u64>>,
    /// Ready files are verified once per process start, at the first `resume`.
    verified_at_start: AtomicBool,
    /// When this process started (seconds): the scrub's first round counts from it.
    started: u64,
    /// The TLS client identity for fetching from other nodes (`bicsi node --tls-dir`); unset:
    /// plain HTTP (`--insecure`, or `bicsi serve`, which has no other nodes).
    peer_tls: std::sync::OnceLock<Arc<rustls::ClientConfig>>,
}

/// The manifest beside a ready file, if there is one, it is intact and it names `sha512`.
fn read_manifest(file: &Path, sha512: &str) -> Option<crate::sync::Manifest> {
    let bytes = std::fs::read(manifest_path(file)).ok()?;
    crate::sync::Manifest::parse(&bytes)
        .ok()
        .filter(|m| m.sha512 == sha512)
}

/// Whether the image says `disk` holds a ready file.
fn ready_on(bi: &BackingImage, disk_id: &str) -> bool {
    bi.status
        .disk_file_status_map
        .get(disk_id)
        .is_some_and(|f| f.state == FileState::Ready)
}

impl FileManagers {
    pub fn new(
        node_id: String,
        disks: Vec<Disk>,
        os: Os,
        records: Arc<dyn ImageRecords>,
        settings: Arc<dyn FileSettings>,
        reports: Arc<dyn FileReports>,
        clock: Arc<dyn Clock>,
    ) -> Arc<FileManagers> {
        Arc::new(FileManagers {
            node_id,
            disks,
            os,
            settings,
            records,
            reports,
            managers: Mutex::new(HashMap::new()),
            uploads: Mutex::new(HashSet::new()),
            started: clock.now_secs(),
            clock,
            syncs: SyncSlots::default(),
            verified: Mutex::new(HashMap::new()),
            verified_at_start: AtomicBool::new(false),
            peer_tls: std::sync::OnceLock::new(),
        })
    }

    /// Fetches from other nodes with this TLS client identity from now on (set once, at start).
    pub fn use_peer_tls(&self, config: Arc<rustls::ClientConfig>) {
        let _ = self.peer_tls.set(config);
    }
}

#[cfg(test)]
mod lifecycle_tests;
