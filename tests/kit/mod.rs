//! The one test kit of bicsi's integration tests: each test binary includes it with
//! `#[path = "…/kit/mod.rs"] mod kit;` at its root. `host.rs` (may a test run here, free ports,
//! what a run leaves under its directory and sweeping it) is also included on its own by the
//! benchmark (`bench/bench.rs`) and by the crate's real-system unit tests (`src/lib.rs`, under
//! `cfg(test)`), which is why it names nothing of the crate; `procs.rs` (the `bicsi` binary as a
//! child process, the CLI, temp dirs) needs the test-only `CARGO_BIN_EXE_bicsi` and `tempfile`.
//!
//! A module included by `#[path]`, not a crate: a dev-only crate cannot serve the benchmark (a
//! binary of the main crate, which has no dev-dependencies) nor the crate's own unit tests
//! without a cycle, and a cargo feature would ship the kit in the library. It is `mod.rs` in a
//! folder because a file directly in `tests/` would be built as a test binary of its own. It
//! must not hold one suite's setup: that stays in the suite (`conformance/harness.rs`,
//! `faults/procs.rs`, …), built on this.

#![allow(dead_code, unused_imports)] // each test binary uses its own part

pub mod host;
pub mod procs;

pub use host::*;
pub use procs::*;
