//! The CLI commands that talk to the HTTP API of a running bicsi: `apply`, `get` and `delete` of
//! backing images and StorageClasses. Errors from the server are shown as it words them.

use std::collections::HashMap;
use std::io::Read;

use serde::Deserialize;
use serde_json::Value;

use crate::backing::object::BackingImage;
use crate::cli::{ListOutput, Output};
use crate::error::{Error, Result};
use crate::storageclass::StorageClass;

/// The API token of this CLI invocation (`--token` or `BICSI_TOKEN`), sent on every request.
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the token the HTTP commands send; called once by `cli::run`.
pub fn set_token(token: Option<String>) {
    if let Some(t) = token.filter(|t| !t.trim().is_empty()) {
        let _ = TOKEN.set(t.trim().to_string());
    }
}

/// The CA certificates `--ca-cert` adds to the system's (an https API of a private CA).
static CA_CERTS: std::sync::OnceLock<Vec<reqwest::Certificate>> = std::sync::OnceLock::new();

/// Trusts the PEM certificate(s) in `path` for the HTTP API; called once by `cli::run`.
pub fn set_ca_cert(path: &std::path::Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| {
        Error::InvalidArgument(format!(
            "--ca-cert {}: {e}; give the PEM CA certificate of the API's --tls-cert",
            path.display()
        ))
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&bytes)
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "--ca-cert {}: no PEM certificate in it",
                path.display()
            ))
        })?;
    let _ = CA_CERTS.set(certs);
    Ok(())
}

pub(crate) fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = TOKEN.get()
        && let Ok(mut v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
    {
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    let mut builder = reqwest::Client::builder().default_headers(headers);
    if let Some(certs) = CA_CERTS.get() {
        builder = builder.tls_certs_merge(certs.iter().cloned());
    }
    builder.build().unwrap_or_default()
}

pub(crate) fn url(server: &str, path: &str) -> String {
    format!(
        "{}/{}",
        server.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// Sends a request and turns a non-2xx answer into the server's own error message.
pub(crate) async fn send(req: reqwest::RequestBuilder, server: &str) -> Result<reqwest::Response> {
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
        401 => Error::InvalidArgument(format!("bicsi at {server} refused the request: {message}")),
        404 => Error::NotFound(message),
        409 => Error::FailedPrecondition(message),
        503 => Error::Unavailable(message),
        _ => Error::Internal(format!("HTTP {status}: {message}")),
    })
}

pub(crate) async fn json<T: for<'de> Deserialize<'de>>(resp: reqwest::Response) -> Result<T> {
    resp.json()
        .await
        .map_err(|e| Error::Internal(format!("unexpected answer from bicsi: {e}")))
}

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
pub async fn apply(
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
            crate::cli::wait::on_interrupt(format!(
                "stopped waiting; {file} is applied and bicsi goes on preparing backing image {name:?} (`bicsi get backingimages` shows how it goes)"
            ));
            wait_for_image(server, name, deadline).await?;
            crate::outln!("backingimage/{name} ready");
        }
    }
    Ok(())
}

/// Prints `list` as JSON or YAML and answers true, or answers false for a table.
fn print_records<T: serde::Serialize>(list: &[T], output: Option<ListOutput>) -> Result<bool> {
    match output {
        Some(ListOutput::Json) => crate::cli::print_json(list).map(|()| true),
        Some(ListOutput::Yaml) => crate::cli::print_yaml(list).map(|()| true),
        None | Some(ListOutput::Wide) => Ok(false),
    }
}

/// The controller's volume records (`GET /v1/volumes`).
pub async fn volumes(server: &str) -> Result<Vec<crate::model::Volume>> {
    json(send(client().get(url(server, "v1/volumes")), server).await?).await
}

pub use crate::http::RebuildAnswer;

/// Rebuilds a detached volume's replicas that are not rw (`bicsi volume rebuild`).
pub async fn rebuild_volume(server: &str, id: &str, from: Option<&str>) -> Result<RebuildAnswer> {
    json(
        send(
            client()
                .post(url(server, &format!("v1/volumes/{id}/rebuild")))
                .json(&serde_json::json!({ "from": from })),
            server,
        )
        .await?,
    )
    .await
}

pub async fn get_backing_images(server: &str, output: Option<ListOutput>) -> Result<()> {
    let list: Vec<BackingImage> =
        json(send(client().get(url(server, "v1/backingimages")), server).await?).await?;
    if print_records(&list, output)? {
        return Ok(());
    }
    let wide = output == Some(ListOutput::Wide);
    let names: Vec<String> = list.iter().map(|b| b.metadata.name.clone()).collect();
    crate::outln!(
        "{:<24} {:<19} {:<36} {:>10} {:>12} CHECKSUM",
        "NAME",
        "SOURCE",
        "STATE (DISK: STATE PROGRESS)",
        "SIZE",
        "VIRTUAL"
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
        crate::outln!(
            "{:<24} {:<19} {:<36} {:>10} {:>12} {}",
            bi.metadata.name,
            bi.spec.source_type.as_str(),
            states,
            size(bi.status.size),
            size(bi.status.virtual_size),
            if bi.status.checksum.is_empty() {
                "-".to_string()
            } else if wide {
                bi.status.checksum.clone()
            } else {
                format!("{}…", &bi.status.checksum[..16])
            }
        );
        if wide && !bi.status.message.is_empty() {
            crate::outln!("    message: {}", bi.status.message);
        }
        if let Some(line) = poll_line(&bi, &names) {
            crate::outln!("    {line}");
        }
    }
    Ok(())
}

/// The line under a polled image (its alias and versions) or a version (whose version it is).
fn poll_line(bi: &BackingImage, names: &[String]) -> Option<String> {
    if !bi.status.version_of.is_empty() {
        return Some(format!("version of {}", bi.status.version_of));
    }
    let p = bi.status.poll.as_ref()?;
    let current = if p.current.is_empty() {
        &bi.metadata.name
    } else {
        &p.current
    };
    let versions = if p.versions.is_empty() {
        "none yet".to_string()
    } else {
        p.versions
            .iter()
            .map(|v| {
                if names.contains(&v.name) {
                    v.name.clone()
                } else {
                    format!("{} (gone)", v.name)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut line = format!(
        "alias: {} -> {current}; versions: {versions}; next check {}",
        bi.metadata.name,
        if p.next_check_time.is_empty() {
            "now"
        } else {
            &p.next_check_time
        }
    );
    if !p.last_error.is_empty() {
        line.push_str(&format!("; last check failed: {}", p.last_error));
    }
    Some(line)
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
        Output::Json => crate::cli::print_json(&bi),
        Output::Yaml => crate::cli::print_yaml(&bi),
    }
}

pub async fn get_storage_classes(server: &str, output: Option<ListOutput>) -> Result<()> {
    let list: Vec<StorageClass> =
        json(send(client().get(url(server, "v1/storageclasses")), server).await?).await?;
    if print_records(&list, output)? {
        return Ok(());
    }
    crate::outln!("{:<40} {:<24} PARAMETERS", "NAME", "PROVISIONER");
    for sc in list {
        crate::outln!(
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

/// `bicsi delete KIND NAME`: like `kubectl delete`, a missing object is an error (NotFound,
/// exit 1) unless `ignore_not_found`, which exits 0 quietly. The server's DELETE is idempotent,
/// so the CLI asks first; `kind` is the singular the messages use (`storageclass`).
pub async fn delete(
    server: &str,
    collection: &str,
    kind: &str,
    name: &str,
    ignore_not_found: bool,
) -> Result<()> {
    let path = format!("v1/{collection}/{name}");
    match send(client().get(url(server, &path)), server).await {
        Ok(_) => {}
        Err(Error::NotFound(_)) if ignore_not_found => return Ok(()),
        Err(Error::NotFound(_)) => {
            return Err(Error::NotFound(format!(
                "{kind} {name:?} not found (--ignore-not-found exits 0 when it is missing)"
            )));
        }
        Err(e) => return Err(e),
    }
    send(client().delete(url(server, &path)), server).await?;
    crate::outln!("{kind}/{name} deleted");
    Ok(())
}

/// One backing image as the HTTP API shows it.
pub async fn backing_image(server: &str, name: &str) -> Result<BackingImage> {
    json(
        send(
            client().get(url(server, &format!("v1/backingimages/{name}"))),
            server,
        )
        .await?,
    )
    .await
}

/// Whether a backing image can be used now, judged from its status.
#[derive(Debug, PartialEq)]
pub enum Readiness {
    Ready,
    /// Every file failed; the text says what recovers it, if anything.
    Failed(String),
    /// On its way: the furthest file's progress, and every file's state.
    Preparing {
        percent: Option<u64>,
        text: String,
    },
}

pub fn readiness(bi: &BackingImage) -> Readiness {
    use crate::backing::state::FileState;
    let files = &bi.status.disk_file_status_map;
    if bi.has_ready_file() {
        return Readiness::Ready;
    }
    let text = crate::backing::BackingImages::describe(bi);
    if !files.is_empty() && files.values().all(|f| f.state == FileState::Failed) {
        let next = if bi.spec.source_type == crate::backing::object::SourceType::Upload {
            "an uploaded image cannot be recovered: delete it and upload it again".to_string()
        } else {
            format!(
                "bicsi prepares it again from its source; `bicsi get backingimage {}` shows how it goes",
                bi.metadata.name
            )
        };
        let message = if bi.status.message.is_empty() {
            String::new()
        } else {
            format!("{}; ", bi.status.message)
        };
        return Readiness::Failed(format!(
            "backing image {:?} failed: {message}{text}; {next}",
            bi.metadata.name
        ));
    }
    let percent = files
        .values()
        .filter(|f| f.state != FileState::Failed)
        .map(|f| u64::from(f.progress))
        .max();
    Readiness::Preparing { percent, text }
}

/// Polls a backing image until it has a ready file, showing its progress: Ok when ready, an
/// error when every file failed or `deadline` passed (the work goes on either way).
pub async fn wait_for_image(
    server: &str,
    name: &str,
    deadline: Option<std::time::Instant>,
) -> Result<()> {
    let mut progress = crate::cli::wait::Progress::new(format!("backing image {name}"));
    loop {
        let bi = backing_image(server, name).await?;
        match readiness(&bi) {
            Readiness::Ready => {
                progress.finish();
                return Ok(());
            }
            Readiness::Failed(why) => {
                progress.finish();
                return Err(Error::FailedPrecondition(why));
            }
            Readiness::Preparing { percent, text } => {
                if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    progress.finish();
                    return Err(Error::Unavailable(format!(
                        "gave up waiting (--timeout) for backing image {name:?}: {text}; bicsi goes on preparing it"
                    )));
                }
                progress.update(&text, percent);
            }
        }
        tokio::time::sleep(crate::cli::wait::POLL).await;
    }
}

pub async fn get_nodes(server: &str, output: Option<ListOutput>) -> Result<()> {
    let nodes: Vec<crate::model::NodeRecord> =
        json(send(client().get(url(server, "v1/nodes")), server).await?).await?;
    if print_records(&nodes, output)? {
        return Ok(());
    }
    let wide = output == Some(ListOutput::Wide);
    crate::outln!(
        "{:<24} {:<6} {:>5} {:<28} AGENT{}",
        "NODE",
        "STATE",
        "DISKS",
        "LAST HEARTBEAT",
        if wide { "  TRANSFER" } else { "" }
    );
    for n in nodes {
        let agent = if n.agent_url.is_empty() {
            "(in process)"
        } else {
            &n.agent_url
        };
        let transfer = if wide {
            format!(
                "  {}",
                if n.transfer_url.is_empty() {
                    "-"
                } else {
                    &n.transfer_url
                }
            )
        } else {
            String::new()
        };
        crate::outln!(
            "{:<24} {:<6} {:>5} {:<28} {agent}{transfer}",
            n.node_id,
            if n.up { "up" } else { "down" },
            n.disks.len(),
            n.last_heartbeat,
        );
    }
    Ok(())
}

pub async fn get_disks(server: &str, output: Option<ListOutput>) -> Result<()> {
    let disks: Vec<crate::agent::DiskSpace> =
        json(send(client().get(url(server, "v1/disks")), server).await?).await?;
    if print_records(&disks, output)? {
        return Ok(());
    }
    crate::outln!(
        "{:<14} {:<24} {:>10} {:<8} PATH",
        "DISK",
        "NODE",
        "FREE",
        "MANAGER"
    );
    for d in disks {
        crate::outln!(
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

/// `bicsi image upload NAME FILE`: creates the image (sourceType upload) when missing, then
/// streams the file to it; the server answers once the file is ready.
pub async fn upload_image(
    server: &str,
    name: &str,
    file: &std::path::Path,
    checksum: Option<String>,
) -> Result<()> {
    use futures::StreamExt;
    use tokio::io::AsyncReadExt;
    let checksum = checksum
        .map(|c| crate::files::parse_checksum(&c, "--checksum"))
        .transpose()?;
    let f = tokio::fs::File::open(file)
        .await
        .map_err(|e| Error::InvalidArgument(format!("cannot read {}: {e}", file.display())))?;
    let len = f
        .metadata()
        .await
        .map_err(|e| Error::InvalidArgument(format!("cannot read {}: {e}", file.display())))?
        .len();
    let image_url = url(server, &format!("v1/backingimages/{name}"));
    match send(client().get(&image_url), server).await {
        Ok(resp) => {
            let bi: BackingImage = json(resp).await?;
            if bi.spec.source_type != crate::backing::object::SourceType::Upload {
                return Err(Error::FailedPrecondition(format!(
                    "backing image {name:?} exists with source type {}: only an image with sourceType upload takes an upload",
                    bi.spec.source_type.as_str()
                )));
            }
            // The server refuses these too, but before reading the body: a client still sending
            // may then see a broken connection instead of the answer. Say it before sending.
            if bi.has_ready_file() {
                return Err(Error::FailedPrecondition(format!(
                    "backing image {name:?} already has a ready file; to upload another file, delete the image and create it again"
                )));
            }
            use crate::backing::state::FileState;
            if bi.status.disk_file_status_map.values().any(|f| {
                matches!(
                    f.state,
                    FileState::Pending | FileState::Starting | FileState::InProgress
                )
            }) {
                return Err(Error::Aborted(format!(
                    "backing image {name:?} is being uploaded already ({}); wait for that upload to finish or fail",
                    crate::backing::BackingImages::describe(&bi)
                )));
            }
        }
        Err(Error::NotFound(_)) => {
            let object = serde_json::json!({
                "apiVersion": crate::backing::object::API_VERSION,
                "kind": crate::backing::object::KIND,
                "metadata": { "name": name, "namespace": crate::backing::object::DEFAULT_NAMESPACE },
                "spec": { "sourceType": "upload" },
            });
            send(
                client().post(url(server, "v1/backingimages")).json(&object),
                server,
            )
            .await?;
            eprintln!("backingimage/{name} created");
        }
        Err(e) => return Err(e),
    }
    crate::cli::wait::on_interrupt(format!(
        "the upload of {} stopped; an upload cannot resume, so backing image {name:?} gets a failed file: run `bicsi image upload` again",
        file.display()
    ));
    let bar = crate::cli::wait::ByteProgress::new(Some(len), "uploading");
    let b = bar.clone();
    let chunks = futures::stream::unfold(f, |mut f| async move {
        let mut buf = vec![0u8; 1 << 20];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
    .inspect(move |c| {
        if let Ok(c) = c {
            b.inc(c.len() as u64);
        }
    });
    let mut req = client()
        .put(url(server, &format!("v1/backingimages/{name}/file")))
        .header(reqwest::header::CONTENT_LENGTH, len)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(reqwest::Body::wrap_stream(chunks));
    if let Some(c) = &checksum {
        req = req.header(crate::http::CHECKSUM_HEADER, c);
    }
    let result = send(req, server).await;
    bar.finish();
    let bi: BackingImage = json(result?).await?;
    crate::outln!(
        "backingimage/{name} uploaded: {} ({}), sha512 {}",
        crate::quantity::human(bi.status.size),
        if bi.status.format.is_empty() {
            "-"
        } else {
            &bi.status.format
        },
        bi.status.checksum
    );
    Ok(())
}

/// `bicsi image download NAME -o FILE`: writes `FILE.part` while hashing it, and renames it to
/// FILE only when its SHA-512 is the image's.
pub async fn download_image(server: &str, name: &str, output: &std::path::Path) -> Result<()> {
    use futures::StreamExt;
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    let resp = send(
        client().get(url(server, &format!("v1/backingimages/{name}/file"))),
        server,
    )
    .await?;
    let expected = resp
        .headers()
        .get(crate::http::CHECKSUM_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let total = resp.content_length();
    let mut part = output.as_os_str().to_owned();
    part.push(".part");
    let part = std::path::PathBuf::from(part);
    let io = |e: std::io::Error| Error::Internal(format!("{}: {e}", part.display()));
    let mut f = tokio::fs::File::create(&part).await.map_err(io)?;
    // Ctrl-C drops this future: the interrupt handler removes what was written so far.
    crate::cli::wait::remove_on_interrupt(part.clone());
    crate::cli::wait::on_interrupt(format!(
        "the download of {name:?} stopped; {} was removed",
        part.display()
    ));
    let bar = crate::cli::wait::ByteProgress::new(total, "downloading");
    let mut hasher = sha2::Sha512::new();
    let mut received = 0u64;
    let mut body = resp.bytes_stream();
    let outcome: Result<()> = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                Error::Unavailable(format!(
                    "the download of {name:?} broke off after {received} bytes: {e}; download again"
                ))
            })?;
            hasher.update(&chunk);
            f.write_all(&chunk).await.map_err(io)?;
            received += chunk.len() as u64;
            bar.inc(chunk.len() as u64);
        }
        f.flush().await.map_err(io)?;
        f.sync_all().await.map_err(io)?;
        if let Some(t) = total
            && t != received
        {
            return Err(Error::Unavailable(format!(
                "the download of {name:?} ended at {received} of {t} bytes; download again"
            )));
        }
        let got = hex::encode(hasher.finalize());
        if expected.is_empty() {
            return Err(Error::Internal(format!(
                "the server sent no X-Bicsi-Checksum for {name:?}; the file (sha512 {got}) is not verified"
            )));
        }
        if got != expected {
            return Err(Error::FailedPrecondition(format!(
                "checksum mismatch downloading {name:?}: expected {expected}, got {got}; the file was removed"
            )));
        }
        Ok(())
    }
    .await;
    bar.finish();
    drop(f);
    let outcome = outcome.and_then(|()| {
        std::fs::rename(&part, output).map_err(|e| {
            Error::Internal(format!(
                "cannot move {} to {}: {e}",
                part.display(),
                output.display()
            ))
        })
    });
    if outcome.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    crate::cli::wait::keep(&part);
    outcome?;
    crate::outln!(
        "backingimage/{name} downloaded to {}: {}, sha512 {expected}",
        output.display(),
        crate::quantity::human(received)
    );
    Ok(())
}

/// `bicsi get settings`: NAME VALUE DEFAULT DESCRIPTION (`-o json|yaml`: the records).
pub async fn get_settings(server: &str, output: Option<Output>) -> Result<()> {
    let list: Vec<crate::settings::SettingView> =
        json(send(client().get(url(server, "v1/settings")), server).await?).await?;
    match output {
        Some(Output::Json) => crate::outln!("{}", serde_json::to_string_pretty(&list)?),
        Some(Output::Yaml) => crate::out!("{}", crate::cli::to_yaml(&list)?),
        None => {
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
        }
    }
    Ok(())
}

/// `bicsi set setting NAME VALUE`: checked here first (the server checks again).
pub async fn set_setting(server: &str, name: &str, value: &str) -> Result<()> {
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

/// `bicsi image cleanup NAME --disk D...`: prints the disks cleaned and those refused with
/// their reasons; fails when any was refused.
pub async fn cleanup_image(server: &str, name: &str, disks: &[String]) -> Result<()> {
    let r: crate::backing::lifecycle::CleanupResult = json(
        send(
            client()
                .post(url(server, &format!("v1/backingimages/{name}/cleanup")))
                .json(&serde_json::json!({ "disks": disks })),
            server,
        )
        .await?,
    )
    .await?;
    for d in &r.cleaned {
        crate::outln!("disk {d}: cleaned up");
    }
    for f in &r.refused {
        eprintln!("disk {}: refused: {}", f.disk, f.reason);
    }
    if r.refused.is_empty() {
        Ok(())
    } else {
        Err(Error::FailedPrecondition(format!(
            "backing image {name:?}: {} of {} disks were refused",
            r.refused.len(),
            r.refused.len() + r.cleaned.len()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(source: &str, files: &[(&str, &str, u8)], message: &str) -> BackingImage {
        let map: serde_json::Map<String, Value> = files
            .iter()
            .map(|(disk, state, progress)| {
                (
                    disk.to_string(),
                    serde_json::json!({
                        "state": state,
                        "progress": progress,
                        "lastStateTransitionTime": "",
                    }),
                )
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "longhorn.io/v1beta2",
            "kind": "BackingImage",
            "metadata": { "name": "bi" },
            "spec": { "sourceType": source },
            "status": { "diskFileStatusMap": map, "message": message },
        }))
        .unwrap()
    }

    #[test]
    fn readiness_of_images() {
        assert_eq!(
            readiness(&image(
                "download",
                &[("d1", "failed", 0), ("d2", "ready", 100)],
                ""
            )),
            Readiness::Ready
        );
        match readiness(&image(
            "download",
            &[
                ("d1", "in-progress", 40),
                ("d2", "failed", 90),
                ("d3", "pending", 0),
            ],
            "",
        )) {
            // A failed file's progress is not the image's.
            Readiness::Preparing { percent, text } => {
                assert_eq!(percent, Some(40));
                assert!(text.contains("d1: in-progress 40%"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            readiness(&image("download", &[], "")),
            Readiness::Preparing {
                percent: None,
                text: "no file yet".into()
            }
        );
        let Readiness::Failed(why) = readiness(&image("download", &[("d1", "failed", 3)], ""))
        else {
            panic!("not failed")
        };
        assert!(why.contains("prepares it again from its source"), "{why}");
        let Readiness::Failed(why) = readiness(&image(
            "upload",
            &[("d1", "failed", 3)],
            "cannot be recovered",
        )) else {
            panic!("not failed")
        };
        assert!(why.contains("cannot be recovered; "), "{why}");
        assert!(why.contains("delete it and upload it again"), "{why}");
    }
}
