//! Volume group snapshots (CSI's GroupController): several volumes captured at one instant, kept
//! as one member snapshot per volume that carries the group's id. The group has no record of its
//! own: it is its members, which are written together once every member has been captured, so a
//! group is either complete or absent. This module decides which node captures which volume and
//! enforces CSI's rules (idempotency by name, AlreadyExists, members deleted only with their
//! group); how a node holds writes for the one instant is `snapshot::capture_group`'s.

use std::collections::{BTreeMap, BTreeSet};

use super::snapshot::now;
use super::{Controller, MAX_NAME_LEN, volume_id_for};
use crate::error::{Error, Result};
use crate::guard::Guard;
use crate::snapshot::{GroupMember, Snapshot, SnapshotFile};
use crate::store::{Kind, StoreExt};

/// A CreateVolumeGroupSnapshot request in domain terms.
#[derive(Clone, Debug, Default)]
pub struct CreateGroupSnapshot {
    pub name: String,
    pub source_volume_ids: Vec<String>,
    pub parameters: BTreeMap<String, String>,
}

/// A volume group snapshot: its id, when it was cut, and its member snapshots (by volume id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSnapshot {
    pub id: String,
    pub creation_secs: u64,
    pub creation_nanos: u32,
    pub snapshots: Vec<Snapshot>,
}

/// The group snapshot id for a name: deterministic, so a repeated call finds its group.
pub fn group_id_for(name: &str) -> String {
    format!("group-{}", volume_id_for(name))
}

/// The id of the member snapshot of `volume_id` in group `group_id`. '+' never appears in an id
/// `volume_id_for` makes, so a member id is never a stand-alone snapshot's.
pub fn member_id(group_id: &str, volume_id: &str) -> String {
    format!("{group_id}+{volume_id}")
}

impl Controller {
    /// The group's members, ordered by id; empty when there is no such group.
    fn group_members(&self, group_id: &str) -> Result<Vec<Snapshot>> {
        let all: Vec<Snapshot> = self.store.list(Kind::Snapshot)?;
        Ok(all
            .into_iter()
            .filter(|s| s.group_snapshot_id.as_deref() == Some(group_id))
            .collect())
    }

    fn group_of(group_id: &str, members: Vec<Snapshot>) -> GroupSnapshot {
        let (secs, nanos) = members
            .first()
            .map_or((0, 0), |s| (s.creation_secs, s.creation_nanos));
        GroupSnapshot {
            id: group_id.to_string(),
            creation_secs: secs,
            creation_nanos: nanos,
            snapshots: members,
        }
    }

    /// Refuses `snapshot_ids` that are not exactly the group's members (CSI: "Snapshot list
    /// mismatch | 3 INVALID_ARGUMENT"). An empty list is not checked: bicsi knows the members.
    fn check_member_ids(
        group_id: &str,
        members: &[Snapshot],
        snapshot_ids: &[String],
    ) -> Result<()> {
        if snapshot_ids.is_empty() {
            return Ok(());
        }
        let want: BTreeSet<&str> = members.iter().map(|s| s.id.as_str()).collect();
        let got: BTreeSet<&str> = snapshot_ids.iter().map(String::as_str).collect();
        if want != got {
            return Err(Error::InvalidArgument(format!(
                "snapshot_ids {got:?} are not the members of volume group snapshot {group_id:?}, which are {want:?}"
            )));
        }
        Ok(())
    }

    /// Takes a snapshot of every volume of the request at one instant, or returns the group of
    /// that name and the same volumes and parameters.
    pub async fn create_group_snapshot(&self, req: CreateGroupSnapshot) -> Result<GroupSnapshot> {
        if req.name.is_empty() {
            return Err(Error::InvalidArgument("name is required".into()));
        }
        if req.name.len() > MAX_NAME_LEN {
            return Err(Error::InvalidArgument(format!(
                "group snapshot name is {} characters long; CSI allows at most {MAX_NAME_LEN}",
                req.name.len()
            )));
        }
        if req.source_volume_ids.is_empty() {
            return Err(Error::InvalidArgument(
                "source_volume_ids is required: name the volumes to snapshot together".into(),
            ));
        }
        let mut sources = BTreeSet::new();
        for v in &req.source_volume_ids {
            if v.is_empty() {
                return Err(Error::InvalidArgument(
                    "source_volume_ids has an empty volume id".into(),
                ));
            }
            if !sources.insert(v.clone()) {
                return Err(Error::InvalidArgument(format!(
                    "source_volume_ids names volume {v:?} twice"
                )));
            }
        }
        if crate::snapshot::parse_parameters(&req.parameters)?.is_some() {
            return Err(Error::InvalidArgument(format!(
                "group snapshots are kept on the volumes' disks; the snapshot parameter {:?}: {:?} (export as a backing image) is for single snapshots",
                crate::snapshot::TYPE,
                crate::snapshot::TYPE_BACKING_IMAGE
            )));
        }
        let id = group_id_for(&req.name);
        let _group_guard = self
            .guards
            .try_take(&format!("group/{id}"), "group snapshot")?;
        let existing = self.group_members(&id)?;
        if !existing.is_empty() {
            let had: BTreeSet<String> = existing
                .iter()
                .map(|s| s.source_volume_id.clone())
                .collect();
            if had != sources {
                return Err(Error::AlreadyExists(format!(
                    "volume group snapshot {:?} already exists of volumes {had:?}, not of {sources:?}; use another name or delete the group snapshot first",
                    req.name
                )));
            }
            if existing[0].parameters != req.parameters {
                return Err(Error::AlreadyExists(format!(
                    "volume group snapshot {:?} already exists with other parameters ({:?}, requested {:?}); use another name or delete the group snapshot first",
                    req.name, existing[0].parameters, req.parameters
                )));
            }
            return Ok(Self::group_of(&id, existing));
        }

        let mut volumes = Vec::with_capacity(sources.len());
        for v in &sources {
            volumes.push(self.must_get(v)?);
        }
        // No member attaches, detaches, grows or is deleted until every member is captured.
        let mut volume_guards: Vec<Guard> = Vec::with_capacity(volumes.len());
        for v in &volumes {
            volume_guards.push(self.guards.try_take(&v.id, "volume")?);
        }
        // The writes bicsi can hold are those of one node (its filesystems' freeze); members
        // attached to several nodes cannot be cut at one instant.
        let attached: BTreeSet<&str> = volumes
            .iter()
            .filter_map(|v| v.publication.as_ref().map(|p| p.node_id.as_str()))
            .collect();
        if attached.len() > 1 {
            return Err(Error::FailedPrecondition(format!(
                "the volumes of group snapshot {:?} are attached to nodes {attached:?}: bicsi can hold the writes of one node at a time for a write-order consistent group snapshot; attach them to one node or detach all but one node's",
                req.name
            )));
        }
        // One call per node: the members of the attaching node are cut together while their
        // writes are held; the others are at rest (their guards keep them detached).
        let mut by_node: BTreeMap<String, Vec<(usize, GroupMember)>> = BTreeMap::new();
        for (i, v) in volumes.iter().enumerate() {
            let (node, replicas) = Self::capture_node(v)?;
            by_node.entry(node).or_default().push((
                i,
                GroupMember {
                    snapshot_id: member_id(&id, &v.id),
                    replicas,
                    backing_image: v.spec.backing_image.clone(),
                },
            ));
        }
        let (secs, nanos) = now();
        let mut files: Vec<Vec<SnapshotFile>> = vec![Vec::new(); volumes.len()];
        for (node, members) in &by_node {
            let list: Vec<GroupMember> = members.iter().map(|(_, m)| m.clone()).collect();
            let captured = match self.cluster.agent(node) {
                Ok(agent) => agent.snapshot_group(&list).await,
                Err(e) => Err(e),
            };
            match captured {
                Ok(got) if got.len() == members.len() => {
                    for ((i, _), f) in members.iter().zip(got) {
                        files[*i] = f;
                    }
                }
                other => {
                    let e = match other {
                        Err(e) => e,
                        Ok(got) => {
                            let _ = self.delete_files(&got.concat()).await;
                            Error::Internal(format!(
                                "node {node:?} captured {} volumes of the {} asked",
                                got.len(),
                                members.len()
                            ))
                        }
                    };
                    // "SP SHOULD also do clean up and make sure no snapshots are leaked."
                    let _ = self.delete_files(&files.concat()).await;
                    return Err(e);
                }
            }
        }
        let mut members = Vec::with_capacity(volumes.len());
        for (v, f) in volumes.iter().zip(files) {
            let sid = member_id(&id, &v.id);
            members.push(Snapshot {
                id: sid.clone(),
                name: sid,
                source_volume_id: v.id.clone(),
                size_bytes: v.spec.capacity_bytes,
                creation_secs: secs,
                creation_nanos: nanos,
                backing_image: v.spec.backing_image.clone(),
                parameters: req.parameters.clone(),
                files: f,
                exported: None,
                group_snapshot_id: Some(id.clone()),
            });
        }
        for (n, s) in members.iter().enumerate() {
            if let Err(e) = self.store.put(Kind::Snapshot, &s.id, s) {
                for written in &members[..n] {
                    let _ = self.store.delete(Kind::Snapshot, &written.id);
                }
                let all: Vec<SnapshotFile> = members.iter().flat_map(|m| m.files.clone()).collect();
                let _ = self.delete_files(&all).await;
                return Err(e);
            }
        }
        tracing::info!(group = %id, volumes = ?sources, "volume group snapshot created");
        Ok(Self::group_of(&id, members))
    }

    /// The group snapshot `id`; NotFound when it does not exist.
    pub fn get_group_snapshot(&self, id: &str, snapshot_ids: &[String]) -> Result<GroupSnapshot> {
        let members = self.group_members(id)?;
        if members.is_empty() {
            return Err(Error::NotFound(format!(
                "volume group snapshot {id:?} not found"
            )));
        }
        Self::check_member_ids(id, &members, snapshot_ids)?;
        Ok(Self::group_of(id, members))
    }

    /// Deletes a group snapshot and all of its members; an unknown id is Ok.
    pub async fn delete_group_snapshot(&self, id: &str, snapshot_ids: &[String]) -> Result<()> {
        let _group_guard = self
            .guards
            .try_take(&format!("group/{id}"), "group snapshot")?;
        let members = self.group_members(id)?;
        if members.is_empty() {
            return Ok(());
        }
        Self::check_member_ids(id, &members, snapshot_ids)?;
        for s in &members {
            let _guard = self
                .guards
                .try_take(&format!("snapshot/{}", s.id), "snapshot")?;
            self.delete_files(&s.files).await?;
            self.store.delete(Kind::Snapshot, &s.id)?;
        }
        tracing::info!(group = %id, members = members.len(), "volume group snapshot deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_ids_never_collide_with_single_snapshot_ids() {
        let g = group_id_for("pg-backup");
        assert_eq!(g, "group-pg-backup");
        let m = member_id(&g, "pvc-1");
        assert_eq!(m, "group-pg-backup+pvc-1");
        // A snapshot named like a member gets a digest id, never the member's.
        assert_ne!(volume_id_for(&m), m);
        assert_eq!(group_id_for("a/b"), group_id_for("a/b"));
    }
}
