//! `bicsi backup create|list|delete|restore` and `bicsi get backupvolumes`: the HTTP API's backup
//! routes, with progress while a backup or a restore runs. It only shapes requests and prints
//! answers; the rules live in the controller (`crate::controller::backup`).

use std::time::Instant;

use clap::Subcommand;

use super::Server;
use super::api::{client, json, send, url};
use super::output::{self, ListOutput, Progress};
use super::wait::{self, WaitArgs};
use crate::backup::layout::BackupVolumeMeta;
use crate::backup::{Backup, BackupState, Restore};
use crate::error::{Error, Result};
use crate::outln;
use crate::quantity;

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Back up a volume to the backup target (setting backup-target): only the blocks the
    /// target does not hold yet are uploaded.
    Create {
        /// The volume to back up.
        volume: String,
        /// The backup's name (default: VOLUME-<random>).
        #[arg(long)]
        name: Option<String>,
        /// Upload every block again, even those the target holds.
        #[arg(long)]
        full: bool,
        /// Compress this backup's new blocks with zstd, lz4 or none (default: the volume's
        /// backupCompression parameter, else zstd). Restores read any mix.
        #[arg(long)]
        compression: Option<String>,
        /// Read this existing snapshot (its id) instead of taking one.
        #[arg(long)]
        snapshot: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        server: Server,
    },
    /// List backups (of one volume), those in progress and failed ones too.
    List {
        /// Only the backups of this volume.
        volume: Option<String>,
        /// json|yaml: the records (wide: the table).
        #[arg(short = 'o', long, value_enum)]
        output: Option<ListOutput>,
        #[command(flatten)]
        server: Server,
    },
    /// Delete a backup, and the blocks no other backup of its volume uses.
    Delete {
        /// The backup, as `bicsi backup list` shows it.
        name: String,
        #[command(flatten)]
        server: Server,
    },
    /// Back up a backing image's file into the backup target (once per target; the first volume
    /// backup over an image does it too), so restores work where the image does not exist.
    Image {
        /// The backing image.
        name: String,
        #[command(flatten)]
        server: Server,
    },
    /// Restore a backup into a new volume, over the backup's backing image (or another one).
    Restore {
        /// The backup, as `bicsi backup list` shows it.
        backup: String,
        /// The new volume's name.
        volume: String,
        /// Restore over this backing image instead of the backup's own.
        #[arg(long)]
        backing_image: Option<String>,
        /// Size (256Mi, 10Gi); default: the backup's.
        #[arg(long)]
        size: Option<String>,
        /// A StorageClass parameter KEY=VALUE of the new volume (repeatable); by default the
        /// volume takes the backed-up volume's replica count and parameters.
        #[arg(short = 'p', long = "parameter")]
        parameters: Vec<String>,
        /// Take the parameters of this StorageClass (applied with `bicsi apply`); -p overrides.
        #[arg(long)]
        storage_class: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        server: Server,
    },
}

impl BackupCommand {
    pub fn server(&self) -> &Server {
        match self {
            BackupCommand::Create { server, .. }
            | BackupCommand::List { server, .. }
            | BackupCommand::Delete { server, .. }
            | BackupCommand::Image { server, .. }
            | BackupCommand::Restore { server, .. } => server,
        }
    }
}

fn describe(b: &Backup) -> String {
    format!(
        "{} {}%: {}/{} blocks, {} uploaded",
        b.state.as_str(),
        b.progress,
        b.blocks_done,
        b.blocks_total,
        quantity::human(b.bytes_uploaded)
    )
}

async fn get_backup(server: &str, name: &str) -> Result<Backup> {
    super::api::get(server, &format!("v1/backups/{name}")).await
}

async fn get_restore(server: &str, volume: &str) -> Result<Restore> {
    super::api::get(server, &format!("v1/restores/{volume}")).await
}

pub async fn run(cmd: BackupCommand) -> Result<()> {
    match cmd {
        BackupCommand::Create {
            volume,
            name,
            full,
            compression,
            snapshot,
            wait,
            server,
        } => {
            let s = &server.server;
            let started: Backup = json(
                send(
                    client()
                        .post(url(s, "v1/backups"))
                        .json(&serde_json::json!({
                            "volume": volume, "name": name, "full": full, "snapshot": snapshot,
                            "compression": compression,
                        })),
                    s,
                )
                .await?,
            )
            .await?;
            let name = started.name.clone();
            outln!("backup {name} of volume {volume} started");
            if wait.no_wait {
                return Ok(());
            }
            wait::on_interrupt(format!(
                "stopped waiting; backup {name} goes on in bicsi: `bicsi backup list {volume}` shows it"
            ));
            let deadline = wait.deadline();
            let mut progress = Progress::new(format!("backup {name}"));
            loop {
                let b = get_backup(s, &name).await?;
                match b.state {
                    BackupState::Completed => {
                        progress.finish();
                        outln!(
                            "backup {name} completed: {} uploaded ({} blocks new of {} read)",
                            quantity::human(b.bytes_uploaded),
                            b.blocks_uploaded,
                            b.blocks_total
                        );
                        return Ok(());
                    }
                    BackupState::Error => {
                        progress.finish();
                        return Err(Error::FailedPrecondition(format!(
                            "backup {name} failed: {}",
                            b.message
                        )));
                    }
                    BackupState::InProgress => progress.update(&describe(&b), Some(b.progress)),
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(Error::Unavailable(format!(
                        "backup {name} is still running ({}); it goes on in bicsi",
                        describe(&b)
                    )));
                }
                tokio::time::sleep(wait::POLL).await;
            }
        }
        BackupCommand::List {
            volume,
            output,
            server,
        } => {
            let s = &server.server;
            let path = match &volume {
                Some(v) => {
                    crate::backup::layout::check_name("volume", v)?;
                    format!("v1/backups?volume={v}")
                }
                None => "v1/backups".to_string(),
            };
            let list: Vec<Backup> = super::api::get(s, &path).await?;
            if !output::print_records(&list, output)? {
                outln!(
                    "{:<40} {:<24} {:<12} {:>5} {:>10} {:>10} {:<20} CREATED",
                    "NAME",
                    "VOLUME",
                    "STATE",
                    "PROG",
                    "SIZE",
                    "UPLOADED",
                    "BACKING-IMAGE"
                );
                for b in &list {
                    outln!(
                        "{:<40} {:<24} {:<12} {:>4}% {:>10} {:>10} {:<20} {}",
                        b.name,
                        b.volume,
                        b.state.as_str(),
                        b.progress,
                        quantity::human(b.size_bytes),
                        quantity::human(b.bytes_uploaded),
                        b.backing_image.as_deref().unwrap_or("-"),
                        b.created
                    );
                    if b.state == BackupState::Error {
                        outln!("  error: {}", b.message);
                    }
                }
            }
            Ok(())
        }
        BackupCommand::Image { name, server } => {
            let s = &server.server;
            let m: crate::backup::image::ImageMeta = json(
                send(
                    client().post(url(s, &format!("v1/backingimages/{name}/backup"))),
                    s,
                )
                .await?,
            )
            .await?;
            outln!(
                "backing image {name} is in the backup target: {} in {} blocks, {} uploaded now, SHA-512 {}",
                quantity::human(m.size),
                m.blocks.len(),
                quantity::human(m.uploaded_bytes),
                m.checksum
            );
            Ok(())
        }
        BackupCommand::Delete { name, server } => {
            let s = &server.server;
            send(client().delete(url(s, &format!("v1/backups/{name}"))), s).await?;
            outln!("backup {name} deleted");
            Ok(())
        }
        BackupCommand::Restore {
            backup,
            volume,
            backing_image,
            size,
            parameters,
            storage_class,
            wait,
            server,
        } => {
            let s = &server.server;
            let merged =
                super::storageclass::parameters(s, storage_class.as_deref(), &parameters).await?;
            let size_bytes = match &size {
                Some(t) => quantity::parse(t).map_err(|e| {
                    Error::InvalidArgument(format!("--size {t:?}: {e}; use 256Mi or 10Gi"))
                })?,
                None => 0,
            };
            let _: Restore = json(
                send(
                    client()
                        .post(url(s, &format!("v1/backups/{backup}/restore")))
                        .json(&serde_json::json!({
                            "volume": volume, "backingImage": backing_image, "sizeBytes": size_bytes,
                            "parameters": merged,
                        })),
                    s,
                )
                .await?,
            )
            .await?;
            outln!("restore of backup {backup} into volume {volume} started");
            if wait.no_wait {
                return Ok(());
            }
            wait::on_interrupt(format!(
                "stopped waiting; the restore into {volume} goes on in bicsi (`bicsi get volume {volume}` shows the volume once it exists)"
            ));
            let deadline = wait.deadline();
            let mut progress = Progress::new(format!("restore {volume}"));
            loop {
                let r = get_restore(s, &volume).await?;
                match r.state {
                    BackupState::Completed => {
                        progress.finish();
                        outln!("volume {volume} restored from backup {backup}");
                        return Ok(());
                    }
                    BackupState::Error => {
                        progress.finish();
                        return Err(Error::FailedPrecondition(format!(
                            "restore of backup {backup} into volume {volume} failed: {}",
                            r.message
                        )));
                    }
                    BackupState::InProgress => progress.update(
                        &format!(
                            "{}/{} blocks, {} fetched{}",
                            r.blocks_done,
                            r.blocks_total,
                            quantity::human(r.bytes_fetched),
                            if r.attempts > 1 {
                                format!(" (attempt {}, continued)", r.attempts)
                            } else {
                                String::new()
                            }
                        ),
                        Some(r.progress),
                    ),
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(Error::Unavailable(format!(
                        "the restore into {volume} is still running ({}%); it goes on in bicsi",
                        r.progress
                    )));
                }
                tokio::time::sleep(wait::POLL).await;
            }
        }
    }
}

/// `bicsi get backupvolumes`.
pub async fn get_backup_volumes(server: &str, output: Option<ListOutput>) -> Result<()> {
    let list: Vec<BackupVolumeMeta> = super::api::get(server, "v1/backupvolumes").await?;
    if !output::print_records(&list, output)? {
        outln!(
            "{:<32} {:>10} {:>8} {:<20} {:<40} LAST-BACKUP-AT",
            "NAME",
            "SIZE",
            "BLOCK",
            "BACKING-IMAGE",
            "LAST-BACKUP"
        );
        for v in &list {
            outln!(
                "{:<32} {:>10} {:>8} {:<20} {:<40} {}",
                v.name,
                quantity::human(v.size_bytes),
                quantity::human(v.block_size),
                v.backing_image.as_ref().map_or("-", |b| b.name.as_str()),
                v.last_backup,
                v.last_backup_at
            );
        }
    }
    Ok(())
}
