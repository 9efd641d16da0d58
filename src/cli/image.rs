//! `bicsi image` (upload, download, cleanup of a backing image's files) and the backing image
//! as the CLI shows and waits for it: `get backingimages`, `get backingimage`, its readiness.

use std::path::PathBuf;

use clap::Subcommand;

use super::Server;
use super::api::{client, json, send, url};
use super::output::{self, ListOutput, Output};
use crate::backing::object::BackingImage;
use crate::error::{Error, Result};

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Upload a local file as the file of a backing image (created with sourceType upload when
    /// it does not exist).
    Upload {
        /// The backing image (created with sourceType upload when missing).
        name: String,
        /// The local file to upload (raw or qcow2).
        file: PathBuf,
        /// The file's SHA-512 (`shasum -a 512 FILE`); the upload fails if what arrives differs.
        #[arg(long)]
        checksum: Option<String>,
        #[command(flatten)]
        server: Server,
    },
    /// Download a backing image's ready file, verified by its SHA-512.
    Download {
        /// The backing image to download.
        name: String,
        /// Where to write the file (default: NAME in the current directory).
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        #[command(flatten)]
        server: Server,
    },
    /// Remove a backing image's files from chosen disks now (never a file replicas use, and
    /// never below minNumberOfCopies files); says which disks were refused and why.
    Cleanup {
        /// The backing image whose files to remove.
        name: String,
        /// A disk id or path (repeatable), as `bicsi get disks` shows.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        #[command(flatten)]
        server: Server,
    },
}

pub(super) async fn run(cmd: ImageCommand) -> Result<()> {
    match cmd {
        ImageCommand::Upload {
            name,
            file,
            checksum,
            server,
        } => upload_image(&server.server, &name, &file, checksum).await,
        ImageCommand::Download {
            name,
            output,
            server,
        } => {
            let output = output.unwrap_or_else(|| PathBuf::from(&name));
            download_image(&server.server, &name, &output).await
        }
        ImageCommand::Cleanup {
            name,
            disks,
            server,
        } => cleanup_image(&server.server, &name, &disks).await,
    }
}

pub(super) async fn get_backing_images(server: &str, output: Option<ListOutput>) -> Result<()> {
    let list: Vec<BackingImage> = super::api::get(server, "v1/backingimages").await?;
    if output::print_records(&list, output)? {
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

pub(super) async fn get_backing_image(server: &str, name: &str, output: Output) -> Result<()> {
    let bi = backing_image(server, name).await?;
    output::print(&bi, output)
}

/// One backing image as the HTTP API shows it.
pub(super) async fn backing_image(server: &str, name: &str) -> Result<BackingImage> {
    super::api::get(server, &format!("v1/backingimages/{name}")).await
}

/// Whether a backing image can be used now, judged from its status.
#[derive(Debug, PartialEq)]
pub(super) enum Readiness {
    Ready,
    /// Every file failed; the text says what recovers it, if anything.
    Failed(String),
    /// On its way: the furthest file's progress, and every file's state.
    Preparing {
        percent: Option<u64>,
        text: String,
    },
}

pub(super) fn readiness(bi: &BackingImage) -> Readiness {
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
pub(super) async fn wait_for_image(
    server: &str,
    name: &str,
    deadline: Option<std::time::Instant>,
) -> Result<()> {
    let mut progress = output::Progress::new(format!("backing image {name}"));
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
        tokio::time::sleep(super::wait::POLL).await;
    }
}

/// `bicsi image upload NAME FILE`: creates the image (sourceType upload) when missing, then
/// streams the file to it; the server answers once the file is ready.
pub(super) async fn upload_image(
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
    super::wait::on_interrupt(format!(
        "the upload of {} stopped; an upload cannot resume, so backing image {name:?} gets a failed file: run `bicsi image upload` again",
        file.display()
    ));
    let bar = output::ByteProgress::new(Some(len), "uploading");
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
pub(super) async fn download_image(
    server: &str,
    name: &str,
    output: &std::path::Path,
) -> Result<()> {
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
    super::wait::remove_on_interrupt(part.clone());
    super::wait::on_interrupt(format!(
        "the download of {name:?} stopped; {} was removed",
        part.display()
    ));
    let bar = output::ByteProgress::new(total, "downloading");
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
    super::wait::keep(&part);
    outcome?;
    crate::outln!(
        "backingimage/{name} downloaded to {}: {}, sha512 {expected}",
        output.display(),
        crate::quantity::human(received)
    );
    Ok(())
}

/// `bicsi image cleanup NAME --disk D...`: prints the disks cleaned and those refused with
/// their reasons; fails when any was refused.
pub(super) async fn cleanup_image(server: &str, name: &str, disks: &[String]) -> Result<()> {
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
        let map: serde_json::Map<String, serde_json::Value> = files
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
