//! The settings: `bicsi get settings` and `bicsi set setting NAME VALUE`.

use clap::Subcommand;

use super::Server;
use super::api::{client, json, send, url};
use super::output::{self, Output};
use crate::error::{Error, Result};

#[derive(Subcommand, Debug)]
pub enum SetCommand {
    /// Set a setting (`bicsi get settings` lists them); it applies without a restart.
    Setting {
        /// The setting's name, as `bicsi get settings` lists it.
        name: String,
        /// The new value, in the unit `bicsi get settings` shows.
        value: String,
        #[command(flatten)]
        server: Server,
    },
}

pub(super) async fn run(cmd: SetCommand) -> Result<()> {
    match cmd {
        SetCommand::Setting {
            name,
            value,
            server,
        } => set_setting(&server.server, &name, &value).await,
    }
}

/// `bicsi get settings`: NAME VALUE DEFAULT DESCRIPTION (`-o json|yaml`: the records).
pub(super) async fn get_settings(server: &str, output: Option<Output>) -> Result<()> {
    let list: Vec<crate::settings::SettingView> = super::api::get(server, "v1/settings").await?;
    if let Some(output) = output {
        return output::print(&list, output);
    }
    crate::outln!("{:<42} {:>8} {:>8} DESCRIPTION", "NAME", "VALUE", "DEFAULT");
    for s in list {
        crate::outln!(
            "{:<42} {:>8} {:>8} ({}) {}",
            s.name,
            s.value,
            s.default,
            s.unit,
            s.description
        );
    }
    Ok(())
}

/// `bicsi set setting NAME VALUE`: checked here first (the server checks again).
pub(super) async fn set_setting(server: &str, name: &str, value: &str) -> Result<()> {
    crate::settings::check(name, value).map_err(|e| match e {
        Error::NotFound(m) => Error::InvalidArgument(m),
        other => other,
    })?;
    let s: crate::settings::SettingView = json(
        send(
            client()
                .put(url(server, &format!("v1/settings/{name}")))
                .json(&serde_json::json!({ "value": value })),
            server,
        )
        .await?,
    )
    .await?;
    crate::outln!("setting {} = {} ({})", s.name, s.value, s.unit);
    Ok(())
}
