//! Which engine serves a volume: the StorageClass parameter `engine` (`auto`, the default;
//! `loop`; `qemu`) and the choice made from it when the volume is created, recorded in its spec.
//!
//! Why: issue 14 measured the candidates on the same fio jobs (README, "Volume engine
//! candidates"). qemu-storage-daemon 10.0's FUSE export serves one request at a time in its main
//! loop: 0.03–0.24× a plain loop device on random 4k at queue depth 32, whatever its knobs. A
//! raw replica file with a loop device straight on it is the plain loop device (0.6–1.1× on
//! every job, the differences being noise), and on a filesystem that shares blocks its replicas
//! still start as reflink clones of one per-disk raw expansion of the backing image (about 2 ms
//! per GiB), so the image stays stored once per disk and snapshots, clones and exports are
//! reflink copies too. So `auto` picks `loop` where it can do everything the volume needs, and
//! `qemu` elsewhere:
//!
//! - `loop` serves exactly one replica: a loop device has one backing file, so there is nothing
//!   to fan writes out to several replicas (qemu's quorum does that). A volume with several
//!   replicas stays on `qemu`, and its figures are not improved by this engine.
//! - `loop` needs the replica's disk to share blocks (FICLONE works there: XFS with reflink=1,
//!   btrfs; probed once per disk by its node agent): without it a replica over a backing image
//!   would be a full copy of the image, and a snapshot of an attached volume would not be one
//!   instant (only a FICLONE is atomic with respect to the writes going on).
//! - A `loop` volume attached on a node other than its replica's is served by `qemu` on the
//!   attaching node over NBD (the replica server opens the raw file with the raw driver), so it
//!   keeps working anywhere; the node record says which engine serves each attach.
//!
//! - `mirror` (bicsi's own engine process, `crate::mirror`) serves several raw replicas: writes
//!   go to every replica, reads to a local one, over a multi-threaded FUSE file with a
//!   direct-I/O loop device on it (README, volume-io-mirror). Replicas on the attaching node are
//!   files; those on other nodes are exported raw by their node's replica server and reached by
//!   the engine's own NBD client (README, volume-io-mirror-remote). `auto` gives it to a volume
//!   with several replicas when every replica landed on a disk that shares blocks, on one node
//!   or several (so that, as for `loop`, images are reflink clones and a snapshot of a replica is
//!   a FICLONE). Placement is not changed for it: replicas still go to distinct nodes first.
//!
//! - `mirror` over **copy-on-write replicas** (`crate::mirror::cow`, format `cow`) on disks that
//!   do not share blocks (ext4): each replica is a sparse data file and a cluster map over the
//!   disk's shared raw expansion of the backing image, so the image is still stored once per
//!   disk without reflink. The engine serves one replica too, so a pinned `mirror` with one
//!   replica is accepted. Such a volume keeps all its replicas on ONE node: a cow replica is
//!   read only by an engine on its own node (no replica server serves its view yet), so
//!   replicas spread over nodes are refused (pinned) or kept on `qemu` (auto); and a volume
//!   mixes no raw and cow replicas (pinned `mirror` then keeps the disks that share blocks when
//!   there are any, as before). `auto` gives it where the volume would otherwise get qemu's
//!   export (0.05–0.24× a plain loop device at queue depth 32, against 0.41–0.48× for the mirror
//!   engine over a cow replica: README, volume-io-cow) and where nothing it cannot do can be
//!   asked of the volume later: every replica placed, on disks that do not share blocks, all on
//!   ONE node, and that node the only one of the cluster (`bicsi serve`, a one-node cluster).
//!   In a cluster of several nodes a volume may be attached on any of them, and a cow replica is
//!   not served to another node yet, so `auto` keeps such volumes on `qemu` there. A node that
//!   joins later finds the cow volumes made before it attachable on the first node only
//!   (FailedPrecondition naming that node).
//!
//! It must not touch disks or processes: it decides from what the node agents report.

use crate::agent::DiskSpace;
use crate::error::{Error, Result};
use crate::model::EngineKind;
use crate::os::ImageFormat;

/// StorageClass parameter that pins the engine.
pub const PARAMETER: &str = "engine";

/// What the StorageClass asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineChoice {
    /// `loop` or `mirror` where they can serve the volume, else `qemu` (see the module doc).
    #[default]
    Auto,
    Pinned(EngineKind),
}

impl EngineChoice {
    /// The parameter's value; an unknown one is InvalidArgument naming the allowed values.
    pub fn parse(value: &str) -> Result<EngineChoice> {
        match value.trim() {
            "" | "auto" => Ok(EngineChoice::Auto),
            "loop" => Ok(EngineChoice::Pinned(EngineKind::Loop)),
            "qemu" => Ok(EngineChoice::Pinned(EngineKind::Qemu)),
            "mirror" => Ok(EngineChoice::Pinned(EngineKind::Mirror)),
            other => Err(Error::InvalidArgument(format!(
                "parameter {PARAMETER}={other:?} is not an engine; use auto (the default), loop, mirror or qemu"
            ))),
        }
    }
}

/// The disks a volume's replicas may go on: all of them, except for a volume pinned to `loop`,
/// whose single replica needs a disk that shares blocks (FailedPrecondition naming the disks
/// and the fix when there is none), and one pinned to `mirror`, whose replicas go on the disks
/// that share blocks when there are any (on any node: replicas of other nodes are reached over
/// NBD), else on the others as copy-on-write replicas.
pub fn candidate_disks(choice: EngineChoice, disks: Vec<DiskSpace>) -> Result<Vec<DiskSpace>> {
    let raw = [
        EngineChoice::Pinned(EngineKind::Loop),
        EngineChoice::Pinned(EngineKind::Mirror),
    ];
    if !raw.contains(&choice) || disks.is_empty() {
        return Ok(disks);
    }
    let names: Vec<String> = disks
        .iter()
        .map(|d| {
            format!(
                "{} ({} on node {})",
                d.disk.id,
                d.disk.path.display(),
                d.disk.node_id
            )
        })
        .collect();
    let sharing: Vec<DiskSpace> = disks.iter().filter(|d| d.shares_blocks).cloned().collect();
    if sharing.is_empty() && choice == EngineChoice::Pinned(EngineKind::Mirror) {
        // Copy-on-write replicas on the disks that do not share blocks.
        return Ok(disks);
    }
    let name = match choice {
        EngineChoice::Pinned(kind) => kind.as_str(),
        EngineChoice::Auto => "auto",
    };
    if sharing.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "{PARAMETER}: {name} needs a disk whose filesystem shares blocks (XFS made with reflink=1, or btrfs), and none of the disks does: {}; add such a disk, or use {PARAMETER}: qemu (or auto)",
            names.join(", ")
        )));
    }
    Ok(sharing)
}

/// The disks `auto` places a one-replica volume of `size` bytes on: those that share blocks
/// and have room for it, when there are any (so that it gets the loop engine where the node
/// offers one), else all of them. Several replicas, or a pinned engine, place as before.
pub fn preferred_disks(
    choice: EngineChoice,
    wanted: u32,
    size: u64,
    disks: Vec<DiskSpace>,
) -> Vec<DiskSpace> {
    if choice != EngineChoice::Auto || wanted != 1 {
        return disks;
    }
    let fits = |d: &DiskSpace| d.shares_blocks && d.free_bytes >= size;
    if disks.iter().any(fits) {
        disks.into_iter().filter(fits).collect()
    } else {
        disks
    }
}

/// The format of a replica of a volume of `engine` on `disk`: the engine's, except that the
/// mirror engine's replicas on a disk that does not share blocks use the copy-on-write layout.
pub fn replica_format(engine: EngineKind, disk: &DiskSpace) -> ImageFormat {
    match engine {
        EngineKind::Mirror if !disk.shares_blocks => ImageFormat::Cow,
        other => other.replica_format(),
    }
}

/// Whether `placed` are all on one node, as copy-on-write replicas must be (see the module doc).
fn on_one_node(placed: &[DiskSpace]) -> bool {
    placed
        .iter()
        .all(|d| d.disk.node_id == placed[0].disk.node_id)
}

/// How many nodes `disks` (every disk of the cluster) are on.
pub fn nodes_of(disks: &[DiskSpace]) -> usize {
    disks
        .iter()
        .map(|d| d.disk.node_id.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// The engine of a new volume with `wanted` replicas placed on `placed`, in a cluster whose
/// disks are on `nodes` nodes (see the module doc).
pub fn decide(
    choice: EngineChoice,
    wanted: u32,
    placed: &[DiskSpace],
    nodes: usize,
) -> Result<EngineKind> {
    let loop_fits = wanted == 1 && placed.len() == 1 && placed[0].shares_blocks;
    let mirror_fits =
        wanted >= 2 && placed.len() == wanted as usize && placed.iter().all(|d| d.shares_blocks);
    let cow_fits = !placed.is_empty()
        && placed.len() == wanted as usize
        && placed.iter().all(|d| !d.shares_blocks)
        && on_one_node(placed)
        && nodes <= 1;
    match choice {
        EngineChoice::Pinned(EngineKind::Qemu) => Ok(EngineKind::Qemu),
        EngineChoice::Auto if loop_fits => Ok(EngineKind::Loop),
        EngineChoice::Auto if mirror_fits => Ok(EngineKind::Mirror),
        EngineChoice::Auto if cow_fits => Ok(EngineKind::Mirror),
        EngineChoice::Auto => Ok(EngineKind::Qemu),
        EngineChoice::Pinned(EngineKind::Mirror)
            if !placed.is_empty() && placed.iter().all(|d| !d.shares_blocks) =>
        {
            if !on_one_node(placed) {
                let nodes: std::collections::BTreeSet<&str> =
                    placed.iter().map(|d| d.disk.node_id.as_str()).collect();
                return Err(Error::FailedPrecondition(format!(
                    "{PARAMETER}: mirror on disks that do not share blocks uses copy-on-write replicas, which are read on their own node only, and this volume's {wanted} replicas were placed on nodes {}; use numberOfReplicas: 1 (or as many as one node has disks), disks that share blocks (XFS with reflink=1, btrfs), or {PARAMETER}: qemu (or auto)",
                    nodes.into_iter().collect::<Vec<_>>().join(", ")
                )));
            }
            Ok(EngineKind::Mirror)
        }
        EngineChoice::Pinned(EngineKind::Mirror) => {
            if let Some(d) = placed.iter().find(|d| !d.shares_blocks) {
                return Err(Error::FailedPrecondition(format!(
                    "{PARAMETER}: mirror needs disks whose filesystem shares blocks, and disk {} ({} on node {}) does not (it is not XFS with reflink=1 or btrfs); move the disk to such a filesystem, or use {PARAMETER}: qemu (or auto)",
                    d.disk.id,
                    d.disk.path.display(),
                    d.disk.node_id
                )));
            }
            Ok(EngineKind::Mirror)
        }
        EngineChoice::Pinned(EngineKind::Loop) => {
            if wanted != 1 {
                return Err(Error::InvalidArgument(format!(
                    "{PARAMETER}: loop serves exactly one replica, but numberOfReplicas is {wanted}; set numberOfReplicas: 1, or use {PARAMETER}: qemu (or auto) for several replicas"
                )));
            }
            match placed.first() {
                Some(d) if !d.shares_blocks => Err(Error::FailedPrecondition(format!(
                    "{PARAMETER}: loop needs a disk whose filesystem shares blocks, and disk {} ({} on node {}) does not (it is not XFS with reflink=1 or btrfs); move the disk to such a filesystem, or use {PARAMETER}: qemu (or auto)",
                    d.disk.id,
                    d.disk.path.display(),
                    d.disk.node_id
                ))),
                _ => Ok(EngineKind::Loop),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Disk;

    fn disk(id: &str, shares: bool) -> DiskSpace {
        DiskSpace {
            disk: Disk {
                id: id.into(),
                node_id: "n1".into(),
                path: format!("/d/{id}").into(),
            },
            free_bytes: 1 << 30,
            manager: false,
            shares_blocks: shares,
        }
    }

    #[test]
    fn parses_the_parameter() {
        let table: &[(&str, Option<EngineChoice>)] = &[
            ("", Some(EngineChoice::Auto)),
            ("auto", Some(EngineChoice::Auto)),
            (" loop ", Some(EngineChoice::Pinned(EngineKind::Loop))),
            ("qemu", Some(EngineChoice::Pinned(EngineKind::Qemu))),
            ("mirror", Some(EngineChoice::Pinned(EngineKind::Mirror))),
            ("fuse", None),
            ("LOOP", None),
        ];
        for (value, want) in table {
            match (EngineChoice::parse(value), want) {
                (Ok(got), Some(want)) => assert_eq!(got, *want, "{value:?}"),
                (Err(e), None) => {
                    assert_eq!(e.code(), tonic::Code::InvalidArgument);
                    let text = e.to_string();
                    assert!(
                        text.contains("engine=")
                            && text.contains("auto (the default), loop, mirror or qemu"),
                        "{text}"
                    );
                }
                (got, want) => panic!("{value:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn decides_by_replicas_and_disk() {
        use EngineChoice::*;
        use EngineKind::*;
        let (xfs, ext4) = (disk("xfs", true), disk("ext4", false));
        let mut other_node = disk("xfs2", true);
        other_node.disk.node_id = "n2".into();
        let ok: &[(EngineChoice, u32, Vec<DiskSpace>, EngineKind)] = &[
            (Auto, 1, vec![xfs.clone()], Loop),
            (Auto, 1, vec![ext4.clone()], Qemu),
            (Auto, 2, vec![xfs.clone(), xfs.clone()], Mirror),
            (Auto, 3, vec![xfs.clone(), xfs.clone(), xfs.clone()], Mirror),
            (Auto, 2, vec![xfs.clone(), ext4.clone()], Qemu),
            // Replicas on several nodes: the mirror engine reaches the others over NBD.
            (Auto, 2, vec![xfs.clone(), other_node.clone()], Mirror),
            (Auto, 2, vec![other_node.clone(), ext4.clone()], Qemu),
            // Degraded at birth (fewer disks than replicas): still a quorum volume.
            (Auto, 2, vec![xfs.clone()], Qemu),
            (Pinned(Mirror), 2, vec![xfs.clone(), xfs.clone()], Mirror),
            (
                Pinned(Mirror),
                2,
                vec![xfs.clone(), other_node.clone()],
                Mirror,
            ),
            (Pinned(Qemu), 1, vec![xfs.clone()], Qemu),
            (Pinned(Loop), 1, vec![xfs.clone()], Loop),
        ];
        for (choice, wanted, placed, want) in ok {
            assert_eq!(
                decide(*choice, *wanted, placed, 2).unwrap(),
                *want,
                "{choice:?} {wanted}"
            );
        }
        let e = decide(Pinned(Loop), 2, &[xfs.clone(), xfs.clone()], 2).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("numberOfReplicas: 1"), "{e}");
        // The engine serves one replica (issue 14, copy-on-write wiring).
        assert_eq!(
            decide(Pinned(Mirror), 1, std::slice::from_ref(&xfs), 2).unwrap(),
            Mirror
        );
        let e = decide(Pinned(Mirror), 2, &[xfs.clone(), ext4.clone()], 2).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.to_string().contains("disk ext4 (/d/ext4"), "{e}");
        let e = decide(Pinned(Loop), 1, std::slice::from_ref(&ext4), 2).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.to_string().contains("disk ext4 (/d/ext4"), "{e}");
    }

    #[test]
    fn pinned_mirror_on_disks_without_reflink_gives_cow_replicas_on_one_node() {
        use EngineChoice::*;
        use EngineKind::*;
        let ext4 = disk("ext4", false);
        let mut ext4b = disk("ext4b", false);
        let mut far = disk("far", false);
        far.disk.node_id = "n2".into();
        for placed in [vec![ext4.clone()], vec![ext4.clone(), ext4b.clone()]] {
            let wanted = placed.len() as u32;
            assert_eq!(decide(Pinned(Mirror), wanted, &placed, 2).unwrap(), Mirror);
            for d in &placed {
                assert_eq!(replica_format(Mirror, d), ImageFormat::Cow);
            }
            // auto gives it in a one-node cluster only (see the module doc).
            assert_eq!(decide(Auto, wanted, &placed, 1).unwrap(), Mirror);
            assert_eq!(decide(Auto, wanted, &placed, 2).unwrap(), Qemu);
        }
        // Even in a one-node cluster, auto keeps qemu for a volume degraded at birth (fewer
        // disks than replicas) and one mixing disks that share blocks with disks that do not.
        assert_eq!(
            decide(Auto, 2, std::slice::from_ref(&ext4), 1).unwrap(),
            Qemu
        );
        let xfs = disk("xfs", true);
        assert_eq!(
            decide(Auto, 2, &[ext4.clone(), xfs.clone()], 1).unwrap(),
            Qemu
        );
        assert_eq!(nodes_of(&[ext4.clone(), xfs, far.clone()]), 2);
        assert_eq!(nodes_of(&[]), 0);
        ext4b.shares_blocks = true;
        assert_eq!(replica_format(Mirror, &ext4b), ImageFormat::Raw);
        assert_eq!(replica_format(Loop, &ext4b), ImageFormat::Raw);
        assert_eq!(replica_format(Qemu, &ext4), ImageFormat::Qcow2);
        // Across nodes: refused, naming the nodes and the fixes.
        let e = decide(Pinned(Mirror), 2, &[ext4.clone(), far], 2).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        let text = e.to_string();
        assert!(
            text.contains("nodes n1, n2") && text.contains("engine: qemu"),
            "{text}"
        );
        // No disk shares blocks: pinned mirror keeps them all (cow); loop still refuses.
        let all = vec![disk("a", false), disk("b", false)];
        assert_eq!(
            candidate_disks(Pinned(Mirror), all.clone()).unwrap().len(),
            2
        );
        assert!(candidate_disks(Pinned(Loop), all).is_err());
    }

    #[test]
    fn pinned_loop_keeps_only_disks_that_share_blocks() {
        let all = vec![disk("a", false), disk("b", true)];
        let got = candidate_disks(EngineChoice::Pinned(EngineKind::Loop), all.clone()).unwrap();
        assert_eq!(
            got.iter().map(|d| d.disk.id.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(candidate_disks(EngineChoice::Auto, all).unwrap().len(), 2);
        let e = candidate_disks(
            EngineChoice::Pinned(EngineKind::Loop),
            vec![disk("a", false)],
        )
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.to_string().contains("a (/d/a on node n1)"), "{e}");
    }

    #[test]
    fn pinned_mirror_keeps_the_disks_that_share_blocks_on_every_node() {
        let mut b = disk("b", true);
        b.disk.node_id = "n2".into();
        let mut c = disk("c", true);
        c.disk.node_id = "n2".into();
        let all = vec![disk("a", true), b, c, disk("d", false)];
        let got = candidate_disks(EngineChoice::Pinned(EngineKind::Mirror), all).unwrap();
        assert_eq!(
            got.iter().map(|d| d.disk.id.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn auto_places_one_replica_on_a_disk_that_shares_blocks_when_it_has_room() {
        let ids = |v: Vec<DiskSpace>| v.into_iter().map(|d| d.disk.id).collect::<Vec<_>>();
        let disks = || vec![disk("ext4", false), disk("xfs", true)];
        assert_eq!(
            ids(preferred_disks(EngineChoice::Auto, 1, 1 << 20, disks())),
            ["xfs"]
        );
        // Too small for it, several replicas, or a pinned engine: every disk as before.
        assert_eq!(
            ids(preferred_disks(EngineChoice::Auto, 1, 2 << 30, disks())).len(),
            2
        );
        assert_eq!(
            ids(preferred_disks(EngineChoice::Auto, 2, 1 << 20, disks())).len(),
            2
        );
        let qemu = EngineChoice::Pinned(EngineKind::Qemu);
        assert_eq!(ids(preferred_disks(qemu, 1, 1 << 20, disks())).len(), 2);
    }
}
