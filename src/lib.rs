//! bicsi: a Kubernetes CSI driver whose volumes can start from verified backing images.
//!
//! The library holds all logic; `main.rs` only parses flags. Layers, from the outside in:
//! `cli` and `server` (processes), `csi` and `http` (protocol adapters), `controller` and `node`
//! (the domain), `store` (records), `replicas`, `disks` and `os` (files, processes, mounts).

// `deny`, not `forbid`: the one FICLONE ioctl in `sync::reflink` allows it, with its reasons.
#![deny(unsafe_code)]

pub mod agent;
pub mod auth;
pub mod authority;
pub mod backing;
pub mod backup;
pub mod certs;
pub mod cli;
pub mod cli_api;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod controller;
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
