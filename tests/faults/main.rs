//! Fault injection on the real processes: `kill -9` of bicsi or of a node agent in the middle of
//! a download, a cross-node sync, an upload and an export; bytes flipped in a ready file and a
//! ready file deleted; a disk that fills up (a small loop-mounted filesystem); a node agent
//! stopped and started again. Each scenario watches the disks while it runs (no `backing` file
//! with wrong bytes, ever) and ends with every file of every image in a final state, every ready
//! file holding the image's SHA-512, and nothing left under `tmp/`.
//!
//! Downloads come from a throttled HTTP server in this process so a kill lands mid-transfer;
//! cross-node syncs go through a throttling TCP proxy (on a port of its own on 127.0.0.1, which
//! the node agents advertise with `--advertise-agent-url`/`--advertise-transfer-url`) for the
//! same reason. Waits poll with deadlines (the processes run with a small `--lifecycle-tick-ms`): no fixed sleeps.

#[path = "../kit/mod.rs"]
mod kit;

#[path = "../conformance/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "../conformance/images.rs"]
#[allow(dead_code)]
mod images;

mod checks;
mod procs;
mod throttle;

mod disk_full;
mod download;
mod export;
mod node;
mod online;
mod online_cow;
mod replicas;
mod scrub;
mod sync;
mod upload;
