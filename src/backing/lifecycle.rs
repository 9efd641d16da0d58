//! What happens to backing image files over time, run by the controller at every lifecycle tick
//! (`--lifecycle-tick-ms`): deadlines ([`BackingImages::expire`]), recovery of failed files and
//! cleanup of unused ones, and the manual cleanup of chosen disks. The rules are the seed's:
//!
//! - "Longhorn automatically cleans up the unused backing image files in the disks based on the
//!   setting Backing Image Cleanup Wait Interval. But Longhorn will retain at least one file in a
//!   disk for each backing image anyway": at least `minNumberOfCopies` files, ready ones first.
//! - "Once there is one replica in a disk using a backing image, no matter what the replica's
//!   current state is, the backing image file in this disk cannot be cleaned up."
//! - "If there is still a ready backing image file in one disk, Longhorn will automatically clean
//!   up the failed backing image files then re-launch these files from the ready one."
//! - "If somehow all files of a backing image become failed": a download downloads again, an
//!   export exports again, an upload cannot be recovered and says so.
//!
//! Time comes from the images' [`Clock`](crate::clock::Clock); the node does the file work.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::object::{BackingImage, SourceType};
use super::state::FileState;
use super::{BackingImages, set_file};
use crate::error::Result;
use crate::model::{Disk, Volume, parse_rfc3339, rfc3339};
use crate::store::{Kind, StoreExt};

/// A failed file is recovered once it has been failed this long, so a source that fails at
/// once (a full disk, a dead URL) is retried every few seconds rather than at every tick, and
/// the failed state with its message stays visible meanwhile.
pub const RECOVERY_BACKOFF: u64 = 5;

/// The first wait after a failure of a download's source that trying again soon cannot fix;
/// it doubles with each further one, up to [`SOURCE_BACKOFF_MAX`]. Other failures keep
/// [`RECOVERY_BACKOFF`].
pub const SOURCE_BACKOFF_FIRST: u64 = 60;
pub const SOURCE_BACKOFF_MAX: u64 = 6 * 3600;

/// The wait before the source is tried again after its `failures`-th such failure in a row.
pub fn source_backoff(failures: u32) -> u64 {
    let doublings = failures.saturating_sub(1).min(20);
    (SOURCE_BACKOFF_FIRST << doublings).min(SOURCE_BACKOFF_MAX)
}

/// `90 s`, `4 min`, `2 h 8 min`: a wait as a person reads it.
pub fn human_secs(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s % 3600 < 60 => format!("{} h", s / 3600),
        s => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// The answer of a manual cleanup.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupResult {
    /// Disk ids whose file was removed.
    pub cleaned: Vec<String>,
    pub refused: Vec<Refusal>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The disk as the user named it (id or path).
    pub disk: String,
    pub reason: String,
}

/// The message of an uploaded image whose files have all failed.
pub fn unrecoverable_upload(name: &str) -> String {
    format!(
        "backing image {name:?} was uploaded and all its files have failed: it cannot be recovered; delete it (bicsi delete backingimage {name}) and upload the file again"
    )
}

/// `message` followed by the cause a failed file reported, unless it has none or already
/// carries `message` (recovery says it once; a later round must not repeat it).
fn with_cause(message: &str, cause: &str) -> String {
    if cause.is_empty() || cause.starts_with(message) {
        message.to_string()
    } else {
        format!("{message}; it failed with: {cause}")
    }
}

/// Which of `candidates` (disk ids) may go, keeping at least `min_copies` files of the image,
/// ready ones before others. `files` are all the image's files (disk id → state).
pub fn removable(
    files: &BTreeMap<String, FileState>,
    candidates: &BTreeSet<String>,
    min_copies: u32,
) -> BTreeSet<String> {
    let min = min_copies.max(1) as usize;
    let staying = files.keys().filter(|d| !candidates.contains(*d));
    let mut kept = staying.clone().count();
    let mut ready_kept = staying.filter(|d| files[*d] == FileState::Ready).count();
    let mut spared = BTreeSet::new();
    // Ready files are kept first, until `min` ready ones stay (or there are no more)...
    for d in candidates.iter().filter(|d| files[*d] == FileState::Ready) {
        if ready_kept < min {
            spared.insert(d.clone());
            ready_kept += 1;
            kept += 1;
        }
    }
    // ...then any file, until `min` files stay.
    for d in candidates.iter().filter(|d| files[*d] != FileState::Ready) {
        if kept < min {
            spared.insert(d.clone());
            kept += 1;
        }
    }
    candidates.difference(&spared).cloned().collect()
}

impl BackingImages {
    /// One lifecycle round: deadlines, recovery, cleanup.
    pub async fn tick(&self) -> Result<()> {
        let now = self.now();
        self.expire(now).await?;
        self.recover().await?;
        self.cleanup(now).await?;
        Ok(())
    }

    /// Disk id → the volumes with a replica on that disk that use the image (any replica
    /// state, deferred ones too).
    fn disks_in_use(&self, name: &str) -> Result<BTreeMap<String, Vec<String>>> {
        let volumes: Vec<Volume> = self.store.list(Kind::Volume)?;
        let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for v in volumes
            .iter()
            .filter(|v| v.spec.backing_image.as_deref() == Some(name))
        {
            for r in &v.replicas {
                let list = used.entry(r.disk_id.clone()).or_default();
                if !list.contains(&v.spec.name) {
                    list.push(v.spec.name.clone());
                }
            }
        }
        Ok(used)
    }

    /// Removes the image's file on one disk (through its node) and its entry in the status.
    async fn remove_file(&self, name: &str, disk_id: &str, node_id: &str) -> Result<()> {
        self.cluster
            .agent(node_id)?
            .delete_image_file(name, disk_id)
            .await?;
        self.update(name, |bi| {
            bi.status.disk_file_status_map.remove(disk_id);
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Automatic cleanup at `now`: records since when each file is unused, and removes the
    /// files unused for longer than `backing-image-cleanup-wait-interval`, within the rules.
    /// Returns the (image, disk) pairs removed.
    pub async fn cleanup(&self, now: u64) -> Result<Vec<(String, String)>> {
        let wait = self.settings.cleanup_wait().as_secs();
        let mut removed = Vec::new();
        for bi in self.list()? {
            let name = bi.name().to_string();
            let used = self.disks_in_use(&name)?;
            // Since when each file is unused: set when first seen unused, cleared when used.
            let marks: Vec<(String, String)> = bi
                .status
                .disk_file_status_map
                .iter()
                .filter_map(|(d, f)| {
                    let want = if used.contains_key(d) {
                        String::new()
                    } else if f.unused_since.is_empty() {
                        rfc3339(now)
                    } else {
                        return None;
                    };
                    (want != f.unused_since).then(|| (d.clone(), want))
                })
                .collect();
            let bi = if marks.is_empty() {
                bi
            } else {
                self.update(&name, |bi| {
                    for (d, since) in &marks {
                        if let Some(f) = bi.status.disk_file_status_map.get_mut(d) {
                            f.unused_since = since.clone();
                        }
                    }
                    Ok(())
                })
                .await?
            };
            let candidates: BTreeSet<String> = bi
                .status
                .disk_file_status_map
                .iter()
                .filter(|(d, f)| {
                    !used.contains_key(*d)
                        && matches!(f.state, FileState::Ready | FileState::Failed)
                        && self.cluster.is_up(&f.node_id)
                        && parse_rfc3339(&f.unused_since)
                            .is_some_and(|since| now.saturating_sub(since) >= wait)
                })
                .map(|(d, _)| d.clone())
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let files = states(&bi);
            for disk in removable(&files, &candidates, bi.spec.min_number_of_copies) {
                let node = bi.status.disk_file_status_map[&disk].node_id.clone();
                match self.remove_file(&name, &disk, &node).await {
                    Ok(()) => {
                        tracing::info!(image = %name, disk = %disk, "unused backing image file cleaned up");
                        crate::counters::cleanup("automatic");
                        super::events::cleaned_up(&*self.store, &name, &disk, &node, "automatic");
                        removed.push((name.clone(), disk));
                    }
                    Err(e) => {
                        tracing::warn!(image = %name, disk = %disk, error = %e, "cannot clean up the file; retrying at the next tick")
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Manual cleanup of the image's files on `disks` (ids or paths), now, by the same rules
    /// as the automatic one but without its wait. Says which disks were cleaned and which were
    /// refused and why.
    pub async fn cleanup_disks(&self, name: &str, disks: &[String]) -> Result<CleanupResult> {
        let bi = self.must_get(name)?;
        if disks.is_empty() {
            return Err(crate::error::Error::InvalidArgument(format!(
                "backing image {name:?}: name at least one disk to clean up (its id or path, as `bicsi get disks` shows)"
            )));
        }
        let known: Vec<Disk> = self
            .store
            .list::<crate::model::NodeRecord>(Kind::Node)?
            .into_iter()
            .flat_map(|n| n.disks)
            .collect();
        let used = self.disks_in_use(name)?;
        let mut result = CleanupResult::default();
        let mut chosen: BTreeMap<String, String> = BTreeMap::new();
        for asked in disks {
            let refuse = |reason: String| Refusal {
                disk: asked.clone(),
                reason,
            };
            let Some(disk) = known
                .iter()
                .find(|d| d.id == *asked || d.path.as_os_str() == asked.as_str())
            else {
                result.refused.push(refuse(
                    "no node has this disk; name a disk by the id or path `bicsi get disks` shows"
                        .into(),
                ));
                continue;
            };
            let Some(f) = bi.status.disk_file_status_map.get(&disk.id) else {
                result.refused.push(refuse(format!(
                    "disk {} holds no file of backing image {name:?}",
                    disk.id
                )));
                continue;
            };
            if let Some(volumes) = used.get(&disk.id) {
                result.refused.push(refuse(format!(
                    "replicas of volumes {} on disk {} use the file; a file that replicas use is never cleaned up",
                    volumes.join(", "),
                    disk.id
                )));
                continue;
            }
            if !matches!(f.state, FileState::Ready | FileState::Failed) {
                result.refused.push(refuse(format!(
                    "the file on disk {} is {}; wait until it is ready or failed",
                    disk.id, f.state
                )));
                continue;
            }
            if !self.cluster.is_up(&f.node_id) {
                result.refused.push(refuse(format!(
                    "node {} of disk {} is down; clean up when it is back",
                    f.node_id, disk.id
                )));
                continue;
            }
            chosen.insert(disk.id.clone(), asked.clone());
        }
        let candidates: BTreeSet<String> = chosen.keys().cloned().collect();
        let allowed = removable(&states(&bi), &candidates, bi.spec.min_number_of_copies);
        for (disk, asked) in &chosen {
            if !allowed.contains(disk) {
                result.refused.push(Refusal {
                    disk: asked.clone(),
                    reason: format!(
                        "backing image {name:?} keeps at least {} file(s) (minNumberOfCopies), ready ones first; the file on disk {disk} is one of them",
                        bi.spec.min_number_of_copies.max(1)
                    ),
                });
                continue;
            }
            let node = bi.status.disk_file_status_map[disk].node_id.clone();
            match self.remove_file(name, disk, &node).await {
                Ok(()) => {
                    tracing::info!(image = %name, disk = %disk, "backing image file cleaned up on request");
                    crate::counters::cleanup("manual");
                    super::events::cleaned_up(&*self.store, name, disk, &node, "manual");
                    result.cleaned.push(disk.clone());
                }
                Err(e) => result.refused.push(Refusal {
                    disk: asked.clone(),
                    reason: format!("cannot remove the file: {e}"),
                }),
            }
        }
        Ok(result)
    }

    /// Recovery of failed files, per image: from a ready file when there is one, else from the
    /// data source (an upload cannot be, and says so).
    pub async fn recover(&self) -> Result<()> {
        for bi in self.list()? {
            if let Err(e) = self.recover_image(&bi).await {
                tracing::warn!(image = %bi.name(), error = %e, "cannot recover backing image files yet; retrying at the next tick");
            }
        }
        Ok(())
    }

    async fn recover_image(&self, bi: &BackingImage) -> Result<()> {
        let name = bi.name();
        let files = &bi.status.disk_file_status_map;
        if files.is_empty() {
            return Ok(());
        }
        let now = self.now();
        let failed_long_enough = |f: &super::object::DiskFileStatus| {
            f.state == FileState::Failed
                && parse_rfc3339(&f.last_state_transition_time)
                    .is_none_or(|t| now.saturating_sub(t) >= RECOVERY_BACKOFF)
        };
        if bi.has_ready_file() {
            for (disk, f) in files {
                if !failed_long_enough(f) || !self.cluster.is_up(&f.node_id) {
                    continue;
                }
                tracing::info!(image = %name, disk = %disk, "failed file: removing it and syncing it again from a ready one");
                crate::counters::recovery("ready_file");
                self.remove_file(name, disk, &f.node_id).await?;
                self.cluster
                    .agent(&f.node_id)?
                    .sync_image_file(name, disk)
                    .await?;
            }
            return Ok(());
        }
        // "All files failed": unknown ones count once past the recovery wait, when `expire`
        // has failed them.
        if !files.values().all(failed_long_enough) {
            return Ok(());
        }
        // A source that failed for good is not fetched again in full at every round: it waits
        // for its backoff (the failed file's message says until when).
        if parse_rfc3339(&bi.status.next_source_retry_time).is_some_and(|t| now < t) {
            return Ok(());
        }
        match bi.spec.source_type {
            SourceType::Upload => {
                let message = unrecoverable_upload(name);
                if bi.status.message == message {
                    return Ok(());
                }
                tracing::warn!(image = %name, "{message}");
                self.update(name, |bi| {
                    bi.status.message = message.clone();
                    // Each file keeps what made it fail (a full disk, a cut connection)
                    // beside what to do now.
                    let disks: Vec<(Disk, String)> = bi
                        .status
                        .disk_file_status_map
                        .iter()
                        .map(|(id, f)| {
                            let disk = Disk {
                                id: id.clone(),
                                node_id: f.node_id.clone(),
                                path: Default::default(),
                            };
                            (disk, with_cause(&message, &f.message))
                        })
                        .collect();
                    for (d, text) in disks {
                        set_file(bi, &d, FileState::Failed, 0, text, now)?;
                    }
                    Ok(())
                })
                .await?;
            }
            SourceType::Download | SourceType::ExportFromVolume | SourceType::Restore => {
                // Prepared again on the disk of a failed file of an up node with the most free
                // space; the others follow from it once it is ready.
                let space = self.cluster.disks().await?;
                let target = space
                    .iter()
                    .filter(|s| files.contains_key(&s.disk.id))
                    .max_by_key(|s| s.free_bytes)
                    .or_else(|| space.iter().max_by_key(|s| s.free_bytes))
                    .map(|s| s.disk.clone());
                let Some(disk) = target else {
                    return Ok(());
                };
                let verb = match bi.spec.source_type {
                    SourceType::Download => "downloading",
                    SourceType::Restore => "restoring",
                    _ => "exporting",
                };
                tracing::info!(image = %name, disk = %disk.id, "all files failed: {verb} again");
                let agent = self.cluster.agent(&disk.node_id)?;
                if files.contains_key(&disk.id) {
                    agent.delete_image_file(name, &disk.id).await?;
                }
                let message = format!("all files failed; {verb} again");
                self.update(name, |bi| {
                    // The wait is over; the count stays until a file is ready, so a further
                    // failure of the same kind waits twice as long.
                    bi.status.next_source_retry_time.clear();
                    set_file(bi, &disk, FileState::Pending, 0, message.clone(), now)
                })
                .await?;
                let bi = self.must_get(name)?;
                let source = super::first_file_source(&*self.store, &bi)?;
                let credentials = self.source_credentials(&bi)?;
                agent
                    .prepare_first_file(name, &disk.id, &source, credentials.as_ref())
                    .await?;
                crate::counters::recovery("source");
            }
        }
        Ok(())
    }
}

fn states(bi: &BackingImage) -> BTreeMap<String, FileState> {
    bi.status
        .disk_file_status_map
        .iter()
        .map(|(d, f)| (d.clone(), f.state))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::agent::{Agent, DiskSpace};
    use crate::backing::object::{
        self, BackingImageSpec, BackingImageStatus, DiskFileStatus, ObjectMeta,
    };
    use crate::clock::{Clock, ManualClock};
    use crate::cluster::Cluster;
    use crate::error::{Error, Result};
    use crate::files::FileReport;
    use crate::model::{NodeRecord, Replica, VolumeSpec};
    use crate::os::ReplicaTarget;
    use crate::settings::{CLEANUP_WAIT_INTERVAL, RECOVERY_WAIT_INTERVAL};
    use crate::snapshot::SnapshotFile;
    use crate::store::Store;
    use crate::store::embedded::EmbeddedStore;

    const T0: u64 = 2_000_000_000;

    /// An agent that records what the controller asks of it.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        disks: Vec<&'static str>,
    }

    fn unused() -> Error {
        Error::Internal("not used by these tests".into())
    }

    #[tonic::async_trait]
    impl Agent for Recorder {
        async fn disk_space(&self) -> Result<Vec<DiskSpace>> {
            Ok(self
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| DiskSpace {
                    disk: Disk {
                        id: d.to_string(),
                        node_id: "n1".into(),
                        path: PathBuf::from(format!("/disks/{d}")),
                    },
                    free_bytes: 1000 + i as u64,
                    manager: true,
                    shares_blocks: false,
                })
                .collect())
        }
        async fn create_replica(&self, _: &Replica, _: u64, _: Option<&str>) -> Result<bool> {
            Err(unused())
        }
        async fn delete_replica(&self, _: &Replica) -> Result<()> {
            Err(unused())
        }
        async fn replica_exists(&self, _: &Replica) -> Result<bool> {
            Err(unused())
        }
        async fn resize_replica(&self, _: &Replica, _: u64) -> Result<()> {
            Err(unused())
        }
        async fn copy_replica(&self, _: &Replica, _: &Replica) -> Result<()> {
            Err(unused())
        }
        async fn prepare_first_file(
            &self,
            image: &str,
            disk_id: &str,
            _source: &crate::files::source::ImageSource,
            _credentials: Option<&crate::download::Credentials>,
        ) -> Result<()> {
            self.record(format!("first {image} {disk_id}"))
        }
        async fn delete_image_files(&self, image: &str) -> Result<()> {
            self.record(format!("delete-all {image}"))
        }
        async fn delete_image_file(&self, image: &str, disk_id: &str) -> Result<()> {
            self.record(format!("delete {image} {disk_id}"))
        }
        async fn sync_image_file(&self, image: &str, disk_id: &str) -> Result<()> {
            self.record(format!("sync {image} {disk_id}"))
        }
        async fn prepare_replica(
            &self,
            _: &Replica,
            _: u64,
            _: Option<&str>,
            _: &str,
        ) -> Result<ReplicaTarget> {
            Err(unused())
        }
        async fn release_replica(&self, _: &Replica) -> Result<()> {
            Err(unused())
        }
        async fn snapshot_replicas(
            &self,
            _: &str,
            _: &[Replica],
            _: Option<&str>,
        ) -> Result<Vec<SnapshotFile>> {
            Err(unused())
        }
        async fn restore_replica(
            &self,
            _: &SnapshotFile,
            _: Option<&str>,
            _: &Replica,
            _: u64,
            _: Option<&str>,
        ) -> Result<()> {
            Err(unused())
        }
        async fn delete_snapshot_files(&self, _: &[SnapshotFile]) -> Result<()> {
            Err(unused())
        }
        async fn clean_volume(&self, _: &str, _: &[Replica]) -> Result<()> {
            Err(unused())
        }
    }

    impl Recorder {
        fn record(&self, call: String) -> Result<()> {
            self.calls.lock().unwrap().push(call);
            Ok(())
        }

        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    struct World {
        _dir: tempfile::TempDir,
        store: Arc<dyn Store>,
        clock: Arc<ManualClock>,
        images: Arc<BackingImages>,
        agent: Arc<Recorder>,
    }

    fn world() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let cluster = Cluster::new(store.clone());
        let agent = Arc::new(Recorder {
            calls: Mutex::new(vec![]),
            disks: vec!["d1", "d2", "d3"],
        });
        let disks = ["d1", "d2", "d3"]
            .iter()
            .map(|d| Disk {
                id: d.to_string(),
                node_id: "n1".into(),
                path: PathBuf::from(format!("/disks/{d}")),
            })
            .collect();
        cluster
            .register(
                NodeRecord {
                    max_volumes_per_node: 0,
                    node_id: "n1".into(),
                    agent_url: String::new(),
                    transfer_url: String::new(),
                    disks,
                    up: true,
                    last_heartbeat: String::new(),
                },
                agent.clone(),
                true,
            )
            .unwrap();
        let clock = ManualClock::new(T0);
        let images = BackingImages::with_clock(store.clone(), cluster, clock.clone());
        World {
            _dir: dir,
            store,
            clock,
            images,
            agent,
        }
    }

    fn file(state: FileState, since: u64) -> DiskFileStatus {
        DiskFileStatus {
            state,
            progress: if state == FileState::Ready { 100 } else { 0 },
            message: String::new(),
            last_state_transition_time: rfc3339(since),
            last_update_time: rfc3339(since),
            node_id: "n1".into(),
            unused_since: String::new(),
        }
    }

    impl World {
        fn image(&self, source: SourceType, min: u32, files: &[(&str, FileState)]) {
            // The parameters a valid spec of each source type has (its typed source is parsed
            // from them when a first file is asked for).
            let params: &[(&str, &str)] = match source {
                SourceType::Download => &[("url", "http://127.0.0.1/x")],
                SourceType::ExportFromVolume => &[("volume-name", "v"), ("export-type", "qcow2")],
                SourceType::Restore => &[("backup-url", "s3://bucket/backups#img")],
                SourceType::Upload => &[],
            };
            let bi = BackingImage {
                api_version: object::API_VERSION.into(),
                kind: object::KIND.into(),
                metadata: ObjectMeta {
                    name: "img".into(),
                    namespace: object::DEFAULT_NAMESPACE.into(),
                },
                spec: BackingImageSpec {
                    min_number_of_copies: min,
                    ..crate::model::backing_image::spec_of(source, params)
                },
                status: BackingImageStatus {
                    uuid: "0123abcd".into(),
                    disk_file_status_map: files
                        .iter()
                        .map(|(d, s)| (d.to_string(), file(*s, T0)))
                        .collect(),
                    ..Default::default()
                },
            };
            self.store.put(Kind::BackingImage, "img", &bi).unwrap();
        }

        /// A volume using the image with a (deferred, never created) replica on `disk`.
        fn volume_on(&self, name: &str, disk: &str) {
            let v = Volume {
                id: name.into(),
                spec: VolumeSpec {
                    name: name.into(),
                    capacity_bytes: 1 << 20,
                    number_of_replicas: 1,
                    stale_replica_timeout_minutes: None,
                    fs_type: None,
                    backing_image: Some("img".into()),
                    parameters: Default::default(),
                    capabilities: vec![],
                    source: None,
                    engine: Default::default(),
                    claim: None,
                },
                replicas: vec![Replica {
                    id: "r1".into(),
                    node_id: "n1".into(),
                    disk_id: disk.into(),
                    path: PathBuf::from("/nowhere"),
                    format: crate::os::ImageFormat::Qcow2,
                    deferred: true,
                    cluster_bytes: None,
                    health: Default::default(),
                }],
                publication: None,
                created_at: rfc3339(T0),
                attach_epoch: None,
                fault: None,
            };
            self.store.put(Kind::Volume, name, &v).unwrap();
        }

        fn files(&self) -> BTreeMap<String, DiskFileStatus> {
            self.images
                .must_get("img")
                .unwrap()
                .status
                .disk_file_status_map
        }

        fn set(&self, name: &str, value: &str) {
            self.images.settings().set(name, value).unwrap();
        }
    }

    #[test]
    fn removable_keeps_min_copies_ready_first() {
        use FileState::*;
        let files: BTreeMap<String, FileState> = [("a", Failed), ("b", Ready), ("c", Ready)]
            .iter()
            .map(|(d, s)| (d.to_string(), *s))
            .collect();
        let all: BTreeSet<String> = files.keys().cloned().collect();
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(removable(&files, &all, 1), set(&["a", "c"]));
        assert_eq!(removable(&files, &all, 2), set(&["a"]));
        assert_eq!(removable(&files, &all, 3), set(&[]));
        // A failed file that stays (in use) does not stand in for a ready one.
        assert_eq!(removable(&files, &set(&["b", "c"]), 1), set(&["c"]));
        // Only failed files left: one of them stays.
        let failed: BTreeMap<String, FileState> =
            [("a".to_string(), Failed), ("b".to_string(), Failed)].into();
        assert_eq!(removable(&failed, &set(&["a", "b"]), 1).len(), 1);
    }

    #[tokio::test]
    async fn unused_files_are_cleaned_up_after_the_wait_and_not_before() {
        use FileState::*;
        let w = world();
        w.image(
            SourceType::Download,
            1,
            &[("d1", Ready), ("d2", Ready), ("d3", Ready)],
        );
        // The first look marks the files unused; the default wait is 60 minutes.
        assert!(
            w.images
                .cleanup(w.clock.now_secs())
                .await
                .unwrap()
                .is_empty()
        );
        w.clock.advance(59 * 60 + 59);
        assert!(
            w.images
                .cleanup(w.clock.now_secs())
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(w.files().len(), 3);
        assert!(w.agent.take().is_empty());
        w.clock.advance(1);
        let removed = w.images.cleanup(w.clock.now_secs()).await.unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        // One file stays anyway (minNumberOfCopies 1).
        assert_eq!(w.files().len(), 1);
        assert_eq!(w.agent.take().len(), 2);
        // The setting applies at once: 0 cleans up at the next round, but never the last file.
        w.set(CLEANUP_WAIT_INTERVAL, "0");
        assert!(
            w.images
                .cleanup(w.clock.now_secs())
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(w.files().len(), 1);
    }

    #[tokio::test]
    async fn the_wait_restarts_when_a_file_is_used_again() {
        use FileState::*;
        let w = world();
        w.image(SourceType::Download, 1, &[("d1", Ready), ("d2", Ready)]);
        w.volume_on("v1", "d2");
        w.images.cleanup(w.clock.now_secs()).await.unwrap();
        w.clock.advance(30 * 60);
        // v1 goes away: d2 is unused from now on, d1 since 30 minutes.
        w.store.delete(Kind::Volume, "v1").unwrap();
        w.images.cleanup(w.clock.now_secs()).await.unwrap();
        w.clock.advance(30 * 60);
        let removed = w.images.cleanup(w.clock.now_secs()).await.unwrap();
        assert_eq!(removed, [("img".to_string(), "d1".to_string())]);
        assert!(w.files().contains_key("d2"));
    }

    #[tokio::test]
    async fn min_number_of_copies_are_kept_ready_ones_first() {
        use FileState::*;
        let w = world();
        w.set(CLEANUP_WAIT_INTERVAL, "0");
        w.image(
            SourceType::Download,
            2,
            &[("d1", Failed), ("d2", Ready), ("d3", Ready)],
        );
        let removed = w.images.cleanup(w.clock.now_secs()).await.unwrap();
        assert_eq!(removed, [("img".to_string(), "d1".to_string())]);
        let files = w.files();
        assert_eq!(files.keys().collect::<Vec<_>>(), ["d2", "d3"]);
        assert_eq!(w.agent.take(), ["delete img d1"]);
        // minNumberOfCopies 1: the failed file goes, a ready one stays.
        w.image(SourceType::Download, 1, &[("d1", Failed), ("d2", Ready)]);
        w.images.cleanup(w.clock.now_secs()).await.unwrap();
        assert_eq!(w.files().keys().collect::<Vec<_>>(), ["d2"]);
    }

    #[tokio::test]
    async fn a_file_that_any_replica_uses_is_never_removed() {
        use FileState::*;
        let w = world();
        w.set(CLEANUP_WAIT_INTERVAL, "0");
        // The used file is failed and its replica deferred: still never removed, automatically
        // or manually, however long it waits.
        w.image(
            SourceType::Download,
            1,
            &[("d1", Failed), ("d2", Ready), ("d3", Ready)],
        );
        w.volume_on("v1", "d1");
        for _ in 0..3 {
            w.images.cleanup(w.clock.now_secs()).await.unwrap();
            w.clock.advance(365 * 24 * 3600);
        }
        let files = w.files();
        assert!(files.contains_key("d1"));
        // The ready file is kept before the unused one on d3 goes.
        assert_eq!(files.len(), 2, "{files:?}");
        let r = w
            .images
            .cleanup_disks("img", &["d1".into(), "/disks/d2".into(), "d9".into()])
            .await
            .unwrap();
        assert!(r.cleaned.is_empty(), "{r:?}");
        let reason = |d: &str| {
            r.refused
                .iter()
                .find(|f| f.disk == d)
                .map(|f| f.reason.clone())
                .unwrap_or_default()
        };
        assert!(reason("d1").contains("volumes v1"), "{r:?}");
        assert!(reason("/disks/d2").contains("minNumberOfCopies"), "{r:?}");
        assert!(reason("d9").contains("no node has this disk"), "{r:?}");
    }

    #[tokio::test]
    async fn manual_cleanup_removes_now_and_says_what_it_refused() {
        use FileState::*;
        let w = world();
        w.image(SourceType::Download, 1, &[("d1", Ready), ("d2", Ready)]);
        let r = w
            .images
            .cleanup_disks("img", &["d2".into(), "d3".into()])
            .await
            .unwrap();
        assert_eq!(r.cleaned, ["d2"]);
        assert_eq!(r.refused.len(), 1);
        assert!(r.refused[0].reason.contains("holds no file"), "{r:?}");
        assert_eq!(w.agent.take(), ["delete img d2"]);
        assert_eq!(w.files().keys().collect::<Vec<_>>(), ["d1"]);
    }

    #[tokio::test]
    async fn failed_files_are_synced_again_from_a_ready_one() {
        use FileState::*;
        let w = world();
        w.image(SourceType::Download, 1, &[("d1", Ready), ("d2", Failed)]);
        w.clock.advance(RECOVERY_BACKOFF - 1);
        w.images.recover().await.unwrap();
        assert!(w.agent.take().is_empty(), "failed just now: not yet");
        w.clock.advance(1);
        w.images.recover().await.unwrap();
        assert_eq!(w.agent.take(), ["delete img d2", "sync img d2"]);
        assert!(!w.files().contains_key("d2"));
    }

    #[tokio::test]
    async fn unknown_files_count_as_failed_after_the_recovery_wait_then_download_again() {
        use FileState::*;
        let w = world();
        w.set(RECOVERY_WAIT_INTERVAL, "120");
        w.image(SourceType::Download, 1, &[("d1", Unknown), ("d2", Failed)]);
        w.clock.advance(120);
        w.images.tick().await.unwrap();
        assert_eq!(w.files()["d1"].state, Unknown);
        assert!(w.agent.take().is_empty(), "nothing before the wait");
        w.clock.advance(1);
        w.images.tick().await.unwrap();
        assert_eq!(w.files()["d1"].state, Failed);
        w.clock.advance(RECOVERY_BACKOFF);
        w.images.tick().await.unwrap();
        // d2 has more free space in the recorder: the download starts again there.
        assert_eq!(w.agent.take(), ["delete img d2", "first img d2"]);
        let files = w.files();
        assert_eq!(files["d1"].state, Failed);
        assert_eq!(files["d2"].state, Pending);
        assert!(
            files["d2"].message.contains("downloading again"),
            "{files:?}"
        );
        // Under way: the next round does not start it twice.
        w.images.tick().await.unwrap();
        assert!(w.agent.take().is_empty());
    }

    #[test]
    fn source_backoff_doubles_from_a_minute_to_six_hours() {
        let waits: Vec<u64> = (1..=11).map(source_backoff).collect();
        assert_eq!(
            waits,
            [
                60, 120, 240, 480, 960, 1920, 3840, 7680, 15360, 21600, 21600
            ]
        );
        assert_eq!(source_backoff(u32::MAX), SOURCE_BACKOFF_MAX);
        assert_eq!(human_secs(90), "90 s");
        assert_eq!(human_secs(240), "4 min");
        assert_eq!(human_secs(7680), "2 h 8 min");
        assert_eq!(human_secs(21600), "6 h");
    }

    #[tokio::test]
    async fn a_source_that_fails_for_good_is_retried_with_a_growing_backoff_not_every_round() {
        use FileState::*;
        let w = world();
        w.image(SourceType::Download, 1, &[("d1", InProgress)]);
        let d1 = Disk {
            id: "d1".into(),
            node_id: "n1".into(),
            path: PathBuf::from("/disks/d1"),
        };
        let fail = |permanent: bool| {
            let mut r = FileReport::new(
                Failed,
                0,
                if permanent {
                    "GET http://127.0.0.1/x: HTTP 404 Not Found"
                } else {
                    "GET http://127.0.0.1/x: HTTP 503 Service Unavailable"
                },
            );
            r.permanent = permanent;
            r
        };
        for (round, wait) in [(1u32, 60u64), (2, 120), (3, 240)] {
            w.images.apply_report("img", &d1, fail(true)).await.unwrap();
            let bi = w.images.must_get("img").unwrap();
            assert_eq!(bi.status.source_failures, round);
            let next = rfc3339(w.clock.now_secs() + wait);
            assert_eq!(bi.status.next_source_retry_time, next);
            let msg = &bi.status.disk_file_status_map["d1"].message;
            assert!(
                msg.contains("404") && msg.contains(&next) && msg.contains("tried again"),
                "{msg}"
            );
            // Every round until the wait is over leaves the source alone.
            for _ in 0..3 {
                w.clock.advance(wait / 3 - 1);
                w.images.tick().await.unwrap();
                assert!(w.agent.take().is_empty(), "round {round}: too early");
            }
            w.clock.advance(3);
            w.images.tick().await.unwrap();
            assert_eq!(
                w.agent.take(),
                ["delete img d1", "first img d1"],
                "round {round}"
            );
            w.images
                .apply_report("img", &d1, FileReport::new(Starting, 0, "starting"))
                .await
                .unwrap();
        }
        // A transient failure keeps the short retry.
        w.images
            .apply_report("img", &d1, fail(false))
            .await
            .unwrap();
        assert!(
            w.images
                .must_get("img")
                .unwrap()
                .status
                .next_source_retry_time
                .is_empty()
        );
        w.clock.advance(RECOVERY_BACKOFF);
        w.images.tick().await.unwrap();
        assert_eq!(w.agent.take(), ["delete img d1", "first img d1"]);
    }

    #[tokio::test]
    async fn an_exported_image_exports_again() {
        use FileState::*;
        let w = world();
        w.image(SourceType::ExportFromVolume, 1, &[("d1", Failed)]);
        w.clock.advance(RECOVERY_BACKOFF);
        w.images.recover().await.unwrap();
        assert_eq!(w.agent.take(), ["delete img d1", "first img d1"]);
        assert!(w.files()["d1"].message.contains("exporting again"));
    }

    #[tokio::test]
    async fn an_uploaded_image_whose_files_all_failed_says_it_cannot_be_recovered() {
        use FileState::*;
        let w = world();
        w.image(SourceType::Upload, 1, &[("d1", Failed), ("d2", Failed)]);
        let cause = "writing the upload to disk d1: No space left on device (os error 28)";
        let mut bi = w.images.must_get("img").unwrap();
        bi.status
            .disk_file_status_map
            .get_mut("d1")
            .unwrap()
            .message = cause.into();
        w.store.put(Kind::BackingImage, "img", &bi).unwrap();
        w.clock.advance(RECOVERY_BACKOFF);
        w.images.tick().await.unwrap();
        assert!(w.agent.take().is_empty(), "nothing to recover from");
        let bi = w.images.must_get("img").unwrap();
        let files = &bi.status.disk_file_status_map;
        for text in [
            bi.status.message.as_str(),
            files["d1"].message.as_str(),
            files["d2"].message.as_str(),
        ] {
            assert!(
                text.contains("cannot be recovered") && text.contains("delete it"),
                "{text}"
            );
        }
        // The cause stays beside what to do, and later rounds do not repeat it.
        assert!(files["d1"].message.ends_with(cause), "{files:?}");
        assert!(!files["d2"].message.contains("failed with"), "{files:?}");
        w.clock.advance(RECOVERY_BACKOFF);
        w.images.tick().await.unwrap();
        let again = w
            .images
            .must_get("img")
            .unwrap()
            .status
            .disk_file_status_map;
        assert_eq!(again["d1"].message, files["d1"].message);
    }
}
