//! bicsi: a Kubernetes CSI driver whose volumes can start from verified backing images.
//!
//! The library holds all logic; `main.rs` only parses flags. The modules stand on floors; a
//! module imports from its own floor (without a loop) and the floors below, never above
//! (`tests/floors.rs` reads `src/` and keeps this list true). From the bottom:
//!
//! 0. Model, records, the error and pure rules: `error` (with `OsError`), `model` (volumes,
//!    replicas, their formats, targets and health records; the BackingImage record and its
//!    files' states; the layout under a disk; the volume id rule), `health` (replica modes),
//!    `proto` (the generated bicsi gRPC types), `messages`, `clock`, `fsutil`, `quantity`,
//!    `guard`, `imagefmt`, `tls`, `certs`, `nbd_wire`, `nbd_tls`, `authority`, `logs`,
//!    `counters` (what happens, counted where it happens: transfers, checksum failures...).
//! 1. The OS seams: `os` (qemu processes and QMP, the volume engines' command lines, the
//!    replica servers' control, loop devices, mounts, filesystems, images: qcow2, raw, cow, and
//!    file extents).
//! 2. The per-disk and per-replica domain: `sync`, `download`, `disks`, `replica_file`,
//!    `mirror` (the mirror engine), `replica_server`, `snapshot`, `backup`, `volume_engine`,
//!    `files` (a node's backing image files; it reads the records and settings through the
//!    traits it defines, `files::ImageRecords` and `files::FileSettings`, and gets an image's
//!    typed source, `files::source::ImageSource`, in the request).
//! 3. The node and controller domain, from the bottom: `events`, `store`, `settings`, `params`,
//!    `agent` (the controller's handle on a node), `cluster`, `backing` (the images as the
//!    controller keeps them; it implements the file managers' traits over the store),
//!    `storageclass`, `metrics` (renders the counters with what the records say), `node`,
//!    `controller`, `reconcile`.
//! 4. The wire: `csi`, `client` (the CSI client), `http`, `remote`, `auth`, `ui`.
//! 5. The processes: `server`.
//! 6. The CLI: `cli` (and `fuzzing`'s entry points).
//!
//! Imports that still run up are listed, each with its reason, in `tests/floors.rs`
//! (`KNOWN_BACK_EDGES`): none is left.

// `deny`, not `forbid`: the one FICLONE ioctl in `sync::reflink` allows it, with its reasons.
#![deny(unsafe_code)]

pub mod agent;
pub mod auth;
pub mod authority;
pub mod backing;
pub mod backup;
pub mod certs;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod controller;
pub mod counters;
pub mod csi;
pub mod disks;
pub mod download;
pub mod error;
pub mod events;
pub mod files;
pub mod fsutil;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod guard;
pub mod health;
pub mod http;
pub mod imagefmt;
pub mod logs;
pub mod messages;
pub mod metrics;
pub mod mirror;
pub mod model;
pub mod nbd_tls;
pub mod nbd_wire;
pub mod node;
pub mod os;
pub mod params;
pub mod proto;
pub mod quantity;
pub mod reconcile;
pub mod remote;
pub mod replica_file;
pub mod replica_server;
pub mod server;
pub mod settings;
pub mod snapshot;
pub mod storageclass;
pub mod store;
pub mod sync;
pub mod tls;
pub mod ui;
pub mod volume_engine;

// The test kit's machine side (root, tools, ports, sweeping mounts, loops and engines), shared
// with the integration tests and the benchmark; see tests/kit/mod.rs.
#[cfg(test)]
#[path = "../tests/kit/host.rs"]
mod kit;
