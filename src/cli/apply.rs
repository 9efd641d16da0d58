//! `bicsi apply -f FILE`: the BackingImages and StorageClasses of a YAML manifest created, or
//! checked against what exists, and optionally waited for.

use std::io::Read;

use serde::Deserialize;
use serde_json::Value;

use super::api::{client, send, url};
use crate::error::{Error, Result};

/// The documents of a YAML manifest (`---`-separated), empty ones left out. The whole file must
/// be valid YAML, so that nothing of a broken file is applied.
pub fn manifest_documents(file: &str, text: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(doc)
            .map_err(|e| Error::InvalidArgument(format!("{file}: not valid YAML: {e}")))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// `bicsi apply -f FILE`: every YAML document is created, or checked against what exists.
/// With `wait`, then waits until every BackingImage applied has a ready file (or `deadline`).
pub(super) async fn apply(
    server: &str,
    file: &str,
    wait: bool,
    deadline: Option<std::time::Instant>,
) -> Result<()> {
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
    let mut images = Vec::new();
    for value in manifest_documents(file, &text)? {
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
        if result.is_ok() && kind == "BackingImage" {
            images.push(name.clone());
        }
        match result {
            Ok(resp) if resp.status() == reqwest::StatusCode::CREATED => {
                crate::outln!("{lower}/{name} created")
            }
            Ok(_) => crate::outln!("{lower}/{name} unchanged"),
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
    if wait {
        for name in &images {
            super::wait::on_interrupt(format!(
                "stopped waiting; {file} is applied and bicsi goes on preparing backing image {name:?} (`bicsi get backingimages` shows how it goes)"
            ));
            super::image::wait_for_image(server, name, deadline).await?;
            crate::outln!("backingimage/{name} ready");
        }
    }
    Ok(())
}
