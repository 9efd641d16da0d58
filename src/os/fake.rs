//! Fakes of every OS trait, sharing one simulated machine, for domain tests that run without root.
//!
//! They keep the rules of the real layer, not just its signatures: an engine locks its replicas
//! (a second engine or a resize is refused while it runs), a stop is `Busy` while a loop device
//! sits on the export, a detach is `Busy` while the device is mounted, `mkfs` refuses a device
//! that holds a filesystem, a filesystem written through one engine is found again through the
//! next one, and a read-only engine gives read-only devices and mounts. What a test could not tell
//! apart lives on disk as on a real node, inside the test's temp dir: image files (a small JSON
//! description instead of qcow2 data), the engine's run directory and export file, and mount
//! targets. Processes, loop devices and mounts live in memory, so they survive a "restart" of the
//! domain that reuses the same `Fake`, as the real ones survive a restart of bicsi.
//!
//! Several machines share a `FakeNet` (`Fake::new_cluster`, `Fake::with_net`): a replica server
//! of one (`export_replica`) is reached by address from the engines of the others
//! (`ReplicaTarget::Nbd`), with qemu's measured behaviour: a write goes to every child that
//! answers and succeeds when one took it, a read comes from the first that answers, an export in
//! use is `Busy` to unexport, a child whose server died (`Fake::kill_replica_server`) or was cut
//! off misses the writes from then on and is reconnected silently at a later request once its
//! export is back, which `volume_status` reports as the real engine does.
//!
//! It is compiled for tests only (`cfg(test)`): no build of bicsi carries it. It must never touch
//! the machine beyond the paths it is given. Wherever the real layer refuses a request for what
//! the request itself says (a name, a size, a path, a spec), the fake calls the same `check_*`
//! function the real implementation calls (`super::image`, `super::rawfile`, `super::engine`,
//! `super::nbd`, `super::loopdev`, `super::mount`, `super::fs`), so the two cannot drift; what
//! only the machine can tell (a lock, a busy device, a filesystem on a device) is simulated here
//! and held to the real behaviour by the contract test (`contract`), which runs every trait
//! method on both.
//!
//! One file per trait (`images`, `engine`, `loops`, `mounts`, `filesystems`), the simulated
//! machine they share (`machine`: `Fake`, its `World` of engines, loop devices and mounts, the
//! fake image files) and the network between machines (`net`: `FakeNet`).

mod engine;
mod filesystems;
mod images;
mod loops;
mod machine;
mod mounts;
mod net;

mod contract;
mod tests;

pub use machine::{Fake, FakeFs, image_bytes};
pub use net::FakeNet;

// The vocabulary every part shares; each file takes it with `use super::*`.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::{
    Engine, EngineSpec, EngineState, Filesystems, FsStats, ImageFormat, ImageInfo, ImageTool,
    LoopDevices, MountInfo, Mounter, Os, OsError, OsResult, ReplicaExport, ReplicaTarget,
    VolumeEngineSpec, VolumeEngineState, resolve_parent,
};
use engine::FakeEngine;
use filesystems::FakeFilesystems;
use images::FakeImages;
use loops::FakeLoops;
use machine::*;
use mounts::FakeMounter;
use net::*;
