//! The CLI commands that talk to the HTTP API of a running bicsi: `apply`, `get` and `delete` of
//! backing images and StorageClasses. Errors from the server are shown as it words them.

use std::collections::HashMap;
use std::io::Read;

use serde::Deserialize;
use serde_json::Value;

use crate::backing::object::BackingImage;
use crate::cli::Output;
use crate::error::{Error, Result};
use crate::storageclass::StorageClass;

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn url(server: &str, path: &str) -> String {
    format!(
        "{}/{}",
        server.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// Sends a request and turns a non-2xx answer into the server's own error message.
async fn send(req: reqwest::RequestBuilder, server: &str) -> Result<reqwest::Response> {
    let resp = req.send().await.map_err(|e| {
        Error::Unavailable(format!(
            "cannot reach bicsi at {server}: {e}; is `bicsi serve` running with this --server address?"
        ))
    })?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or(text);
    Err(match status.as_u16() {
        400 => Error::InvalidArgument(message),
        404 => Error::NotFound(message),
        409 => Error::FailedPrecondition(message),
        503 => Error::Unavailable(message),
        _ => Error::Internal(format!("HTTP {status}: {message}")),
    })
}

async fn json<T: for<'de> Deserialize<'de>>(resp: reqwest::Response) -> Result<T> {
    resp.json()
        .await
        .map_err(|e| Error::Internal(format!("unexpected answer from bicsi: {e}")))
}

/// `bicsi apply -f FILE`: every YAML document is created, or checked against what exists.
pub async fn apply(server: &str, file: &str) -> Result<()> {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Error::InvalidArgument(format!("reading stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| Error::InvalidArgument(format!("cannot read {file}: {e}")))?
    };
    let mut failed = 0;
    let mut seen = 0;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(doc)
            .map_err(|e| Error::InvalidArgument(format!("{file}: not valid YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        seen += 1;
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let path = match kind.as_str() {
            "BackingImage" => "v1/backingimages",
            "StorageClass" => "v1/storageclasses",
            other => {
                eprintln!(
                    "error: {file}: kind {other:?} (object {name:?}) is not handled by bicsi apply; it takes BackingImage and StorageClass"
                );
                failed += 1;
                continue;
            }
        };
        let result = send(client().post(url(server, path)).json(&value), server).await;
        let lower = kind.to_ascii_lowercase();
        match result {
            Ok(resp) if resp.status() == reqwest::StatusCode::CREATED => {
                println!("{lower}/{name} created")
            }
            Ok(_) => println!("{lower}/{name} unchanged"),
            Err(e) => {
                eprintln!("error: {lower}/{name}: {e}");
                failed += 1;
            }
        }
    }
    if seen == 0 {
        return Err(Error::InvalidArgument(format!("{file}: no objects found")));
    }
    if failed > 0 {
        return Err(Error::InvalidArgument(format!(
            "{failed} of {seen} objects were not applied"
        )));
    }
    Ok(())
}

pub async fn get_backing_images(server: &str) -> Result<()> {
    let list: Vec<BackingImage> =
        json(send(client().get(url(server, "v1/backingimages")), server).await?).await?;
    println!(
        "{:<24} {:<19} {:<36} {:>10} {:>12} CHECKSUM",
        "NAME", "SOURCE", "STATE (DISK: STATE PROGRESS)", "SIZE", "VIRTUAL"
    );
    for bi in list {
        let states = if bi.status.disk_file_status_map.is_empty() {
            "-".to_string()
        } else {
            bi.status
                .disk_file_status_map
                .iter()
                .map(|(d, f)| format!("{d}: {} {}%", f.state, f.progress))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let size = |n: u64| {
            if n == 0 {
                "-".to_string()
            } else {
                crate::quantity::human(n)
            }
        };
        println!(
            "{:<24} {:<19} {:<36} {:>10} {:>12} {}",
            bi.metadata.name,
            bi.spec.source_type.as_str(),
            states,
            size(bi.status.size),
            size(bi.status.virtual_size),
            if bi.status.checksum.is_empty() {
                "-".to_string()
            } else {
                format!("{}…", &bi.status.checksum[..16])
            }
        );
    }
    Ok(())
}

pub async fn get_backing_image(server: &str, name: &str, output: Output) -> Result<()> {
    let bi: BackingImage = json(
        send(
            client().get(url(server, &format!("v1/backingimages/{name}"))),
            server,
        )
        .await?,
    )
    .await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&bi)?),
        Output::Yaml => print!(
            "{}",
            serde_yaml::to_string(&bi).map_err(|e| Error::Internal(e.to_string()))?
        ),
    }
    Ok(())
}

pub async fn get_storage_classes(server: &str) -> Result<()> {
    let list: Vec<StorageClass> =
        json(send(client().get(url(server, "v1/storageclasses")), server).await?).await?;
    println!("{:<40} {:<24} PARAMETERS", "NAME", "PROVISIONER");
    for sc in list {
        println!(
            "{:<40} {:<24} {}",
            sc.metadata.name,
            sc.provisioner,
            sc.parameters
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

pub async fn storage_class_parameters(server: &str, name: &str) -> Result<HashMap<String, String>> {
    let sc: StorageClass = json(
        send(
            client().get(url(server, &format!("v1/storageclasses/{name}"))),
            server,
        )
        .await?,
    )
    .await?;
    Ok(sc.parameters.into_iter().collect())
}

pub async fn delete(server: &str, collection: &str, name: &str) -> Result<()> {
    send(
        client().delete(url(server, &format!("v1/{collection}/{name}"))),
        server,
    )
    .await?;
    println!("{}/{name} deleted", collection.trim_end_matches('s'));
    Ok(())
}

pub async fn get_nodes(server: &str) -> Result<()> {
    let nodes: Vec<crate::model::NodeRecord> =
        json(send(client().get(url(server, "v1/nodes")), server).await?).await?;
    println!(
        "{:<24} {:<6} {:>5} {:<28} AGENT",
        "NODE", "STATE", "DISKS", "LAST HEARTBEAT"
    );
    for n in nodes {
        println!(
            "{:<24} {:<6} {:>5} {:<28} {}",
            n.node_id,
            if n.up { "up" } else { "down" },
            n.disks.len(),
            n.last_heartbeat,
            if n.agent_url.is_empty() {
                "(in process)"
            } else {
                &n.agent_url
            }
        );
    }
    Ok(())
}

pub async fn get_disks(server: &str) -> Result<()> {
    let disks: Vec<crate::agent::DiskSpace> =
        json(send(client().get(url(server, "v1/disks")), server).await?).await?;
    println!(
        "{:<14} {:<24} {:>10} {:<8} PATH",
        "DISK", "NODE", "FREE", "MANAGER"
    );
    for d in disks {
        println!(
            "{:<14} {:<24} {:>10} {:<8} {}",
            d.disk.id,
            d.disk.node_id,
            crate::quantity::human(d.free_bytes),
            if d.manager { "running" } else { "-" },
            d.disk.path.display()
        );
    }
    Ok(())
}
