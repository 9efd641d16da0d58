//! Backups of volumes to a backup target off the cluster, and restores from them.
//!
//! - `target`: the object-store seam (`file://`, `s3://`) and its errors.
//! - `layout`: the keys and metadata documents in the target.
//! - `blocks`: the node's file work (cut a snapshot into blocks and store them; write a backup's
//!   blocks back over a backing image).
//! - `image`: backing images in the target, and their restore (source type `restore`).
//! - `record`: the Backup and Restore records the controller keeps in the store.
//!
//! The controller decides what to back up and restore (`crate::controller::backup`); this module
//! must not read or write volume, snapshot or backing image records.

pub mod blocks;
pub mod image;
pub mod layout;
pub mod record;
pub mod target;

pub use record::{Backup, BackupState, Restore};
pub use target::Target;
