//! The Kubernetes Events of a backing image's files (`crate::events`), read off the change one
//! update made to the image: a file starting to be prepared, passing 25, 50 and 75 %, ready,
//! failed (with its message), and cleaned up. Each goes to the BackingImage; all but progress
//! to the node of the file's disk; all but cleanup to the claims of the volumes made from the
//! image. This module only compares and tells; it must not change the image.

use crate::events::{Event, Regarding, reason};
use crate::model::Volume;
use crate::store::{Kind, Store, StoreExt};

use super::object::BackingImage;
use super::state::FileState;

/// The progress steps told as events.
pub const STEPS: [u8; 3] = [25, 50, 75];

/// One thing that happened to a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEvent {
    pub what: (&'static str, &'static str),
    pub warning: bool,
    pub disk: String,
    pub node: String,
    pub note: String,
}

fn working(s: Option<FileState>) -> bool {
    matches!(s, Some(FileState::Starting | FileState::InProgress))
}

/// What changed in the files of `before` to make `after`.
pub fn file_events(before: &BackingImage, after: &BackingImage) -> Vec<FileEvent> {
    let name = after.name();
    let mut out = Vec::new();
    for (disk, f) in &after.status.disk_file_status_map {
        let old = before.status.disk_file_status_map.get(disk);
        let old_state = old.map(|o| o.state);
        let mut tell = |what, warning, note: String| {
            out.push(FileEvent {
                what,
                warning,
                disk: disk.clone(),
                node: f.node_id.clone(),
                note,
            })
        };
        let at = format!("disk {disk} of node {}", f.node_id);
        if working(Some(f.state)) && !working(old_state) {
            tell(
                reason::PREPARING,
                false,
                format!(
                    "preparing the file of backing image {name:?} on {at} ({})",
                    after.spec.source_type.as_str()
                ),
            );
        }
        if f.state == FileState::InProgress {
            let from = match old {
                Some(o) if working(Some(o.state)) => o.progress,
                _ => 0,
            };
            // One event for the highest step passed, however far a report jumped.
            if let Some(step) = STEPS.iter().rev().find(|s| from < **s && f.progress >= **s) {
                tell(
                    reason::PROGRESS,
                    false,
                    format!("the file of backing image {name:?} on {at} is {step}% prepared"),
                );
            }
        }
        if f.state == FileState::Ready && old_state != Some(FileState::Ready) {
            tell(
                reason::READY,
                false,
                format!(
                    "the file of backing image {name:?} on {at} is ready ({} bytes)",
                    after.status.size
                ),
            );
        }
        if f.state == FileState::Failed && old_state != Some(FileState::Failed) {
            tell(
                reason::FAILED,
                true,
                format!(
                    "the file of backing image {name:?} on {at} failed: {}",
                    f.message
                ),
            );
        }
    }
    out
}

/// Emits `events` of image `name` on the image, the nodes and the claims of its volumes.
pub fn announce(store: &dyn Store, name: &str, events: Vec<FileEvent>) {
    if events.is_empty() {
        return;
    }
    let claims: Vec<Regarding> = store
        .list::<Volume>(Kind::Volume)
        .unwrap_or_default()
        .iter()
        .filter(|v| v.spec.backing_image.as_deref() == Some(name) && v.spec.claim.is_some())
        .map(crate::events::of_volume)
        .collect();
    for e in events {
        let mut to = vec![Regarding::BackingImage(name.to_string())];
        if e.what != reason::PROGRESS && !e.node.is_empty() {
            to.push(Regarding::Node(e.node.clone()));
        }
        if e.what != reason::CLEANED_UP {
            to.extend(claims.iter().cloned());
        }
        for regarding in to {
            let event = if e.warning {
                Event::warning(regarding, e.what, e.note.clone())
            } else {
                Event::normal(regarding, e.what, e.note.clone())
            };
            crate::events::emit(store, event);
        }
    }
}

/// The file of image `name` on `disk` of `node` was removed by the `trigger` cleanup.
pub fn cleaned_up(store: &dyn Store, name: &str, disk: &str, node: &str, trigger: &str) {
    announce(
        store,
        name,
        vec![FileEvent {
            what: reason::CLEANED_UP,
            warning: false,
            disk: disk.to_string(),
            node: node.to_string(),
            note: format!(
                "removed the unused file of backing image {name:?} on disk {disk} of node {node} ({trigger} cleanup)"
            ),
        }],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::object::{
        BackingImageSpec, BackingImageStatus, DiskFileStatus, ObjectMeta, SourceType,
    };

    fn image(files: &[(&str, FileState, u8)]) -> BackingImage {
        BackingImage {
            api_version: crate::backing::object::API_VERSION.into(),
            kind: crate::backing::object::KIND.into(),
            metadata: ObjectMeta {
                name: "img".into(),
                namespace: "ns".into(),
            },
            spec: BackingImageSpec {
                source_type: SourceType::Download,
                source_parameters: Default::default(),
                checksum: String::new(),
                min_number_of_copies: 1,
            },
            status: BackingImageStatus {
                disk_file_status_map: files
                    .iter()
                    .map(|(d, state, progress)| {
                        (
                            d.to_string(),
                            DiskFileStatus {
                                state: *state,
                                progress: *progress,
                                message: "boom".into(),
                                last_state_transition_time: String::new(),
                                last_update_time: String::new(),
                                node_id: "n1".into(),
                                unused_since: String::new(),
                            },
                        )
                    })
                    .collect(),
                ..Default::default()
            },
        }
    }

    /// (disk, state, progress) of each file.
    type Files<'a> = &'a [(&'a str, FileState, u8)];

    fn reasons(before: Files, after: Files) -> Vec<String> {
        file_events(&image(before), &image(after))
            .into_iter()
            .map(|e| {
                if e.what == reason::PROGRESS {
                    e.note
                        .split(' ')
                        .find(|w| w.ends_with('%'))
                        .unwrap()
                        .to_string()
                } else {
                    e.what.0.to_string()
                }
            })
            .collect()
    }

    #[test]
    fn table() {
        use FileState::*;
        let cases: &[(Files, Files, &[&str])] = &[
            (
                &[("d", Pending, 0)],
                &[("d", InProgress, 0)],
                &["BackingImagePreparing"],
            ),
            (&[], &[("d", Starting, 0)], &["BackingImagePreparing"]),
            (&[("d", Starting, 0)], &[("d", InProgress, 3)], &[]),
            (&[("d", InProgress, 10)], &[("d", InProgress, 24)], &[]),
            (&[("d", InProgress, 10)], &[("d", InProgress, 25)], &["25%"]),
            (&[("d", InProgress, 25)], &[("d", InProgress, 40)], &[]),
            (&[("d", InProgress, 40)], &[("d", InProgress, 90)], &["75%"]),
            (&[("d", InProgress, 75)], &[("d", InProgress, 76)], &[]),
            (
                &[("d", InProgress, 90)],
                &[("d", Ready, 100)],
                &["BackingImageReady"],
            ),
            (&[("d", Ready, 100)], &[("d", Ready, 100)], &[]),
            (
                &[("d", InProgress, 30)],
                &[("d", Failed, 0)],
                &["BackingImageFailed"],
            ),
            (&[("d", Failed, 0)], &[("d", Failed, 0)], &[]),
            // Started again after a failure: progress counts from 0 again.
            (
                &[("d", Failed, 60)],
                &[("d", InProgress, 60)],
                &["BackingImagePreparing", "50%"],
            ),
        ];
        for (before, after, want) in cases {
            assert_eq!(reasons(before, after), *want, "{before:?} → {after:?}");
        }
    }
}
