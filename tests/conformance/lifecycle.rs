//! The lifecycle of backing image files with the real binary: settings through the CLI and the
//! HTTP API, manual and automatic cleanup, recovery of a failed file from a ready one, a new
//! download when every file failed, the scrub catching a flipped byte, and an uploaded image
//! that cannot be recovered. bicsi runs with `--lifecycle-tick-ms 200`; tests poll with a
//! deadline instead of sleeping fixed times.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tonic::Code;

use super::harness::*;
use super::images::*;

const TICK: &[&str] = &["--lifecycle-tick-ms", "200"];

async fn http_json(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Polls `f` until it returns Some, for at most 60 s.
async fn until<T>(b: &Bicsi, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn files_of(img: &Value) -> serde_json::Map<String, Value> {
    img["status"]["diskFileStatusMap"]
        .as_object()
        .cloned()
        .unwrap_or_default()
}

/// The image's files on disk (the `backing` file in each disk that has one).
fn backing_files(b: &Bicsi, name: &str) -> Vec<PathBuf> {
    b.disks
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(d.join("backing-images"))
                .into_iter()
                .flatten()
        })
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{name}-"))
        })
        .map(|e| e.path().join("backing"))
        .filter(|p| p.is_file())
        .collect()
}

fn flip_a_byte(path: &Path) {
    let mut data = std::fs::read(path).unwrap();
    data[8192] ^= 0x5a;
    std::fs::write(path, data).unwrap();
}

fn set(b: &Bicsi, name: &str, value: &str) {
    let (ok, _, err) = b.cli(&["set", "setting", name, value]);
    assert!(ok, "set {name} {value}: {err}");
}

/// Creates a download image and a volume on it with `replicas` replicas, publishes it so
/// every replica's disk gets a file, and waits until they are all ready.
async fn image_on_every_disk(b: &Bicsi, name: &str, raw: &[u8], replicas: usize) -> String {
    let server = ImageServer::start([("img.raw".to_string(), raw.to_vec())].into()).await;
    // The server's task lives as long as the test's runtime.
    let url = server.url("img.raw");
    let mut c = b.client().await;
    let n = replicas.to_string();
    let params = [
        ("numberOfReplicas", n.as_str()),
        ("backingImage", name),
        ("backingImageDataSourceType", "download"),
        (
            "backingImageDataSourceParameters",
            &format!("{{\"url\": \"{url}\"}}"),
        ),
    ];
    let vol = format!("{name}-vol");
    create_retrying(&mut c, create_req(&vol, 64 * MIB, &params))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c
            .controller
            .controller_publish_volume(cpublish_req(&vol, mount_cap(), false))
            .await
        {
            Ok(_) => break,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("publish {vol}: {s:?}\n{}", b.log()),
        }
    }
    let img = wait_final(b, name).await;
    let files = files_of(&img);
    assert_eq!(files.len(), replicas, "{img}");
    assert!(files.values().all(|f| f["state"] == "ready"), "{img}");
    vol
}

#[tokio::test]
async fn settings_through_the_cli_and_http_apply_and_persist() {
    let mut b = Bicsi::start_with(1, TICK).await;
    let (ok, out, err) = b.cli(&["get", "settings"]);
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap();
    for col in ["NAME", "VALUE", "DEFAULT", "DESCRIPTION"] {
        assert!(header.contains(col), "{out}");
    }
    for (name, default) in [
        ("backing-image-cleanup-wait-interval", "60"),
        ("backing-image-recovery-wait-interval", "300"),
        ("concurrent-backing-image-syncs-per-node", "3"),
        ("backing-image-scrub-interval", "86400"),
    ] {
        let line = out.lines().find(|l| l.starts_with(name)).expect(name);
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&cols[1..3], [default, default], "{line}");
    }

    set(&b, "backing-image-cleanup-wait-interval", "5");
    let (status, v) = http_json(
        reqwest::Method::GET,
        format!("{}/v1/settings/backing-image-cleanup-wait-interval", b.http),
        None,
    )
    .await;
    assert_eq!((status, v["value"].as_str()), (200, Some("5")), "{v}");
    let (status, v) = http_json(
        reqwest::Method::PUT,
        format!(
            "{}/v1/settings/concurrent-backing-image-syncs-per-node",
            b.http
        ),
        Some(serde_json::json!({"value": "2"})),
    )
    .await;
    assert_eq!((status, v["value"].as_str()), (200, Some("2")), "{v}");

    // Bad values and names: refused, naming the setting and the accepted form, nothing stored.
    let (ok, _, err) = b.cli(&[
        "set",
        "setting",
        "concurrent-backing-image-syncs-per-node",
        "0",
    ]);
    assert!(
        !ok && err.contains("concurrent-backing-image-syncs-per-node")
            && err.contains("at least 1"),
        "{err}"
    );
    let (ok, _, err) = b.cli(&[
        "set",
        "setting",
        "backing-image-cleanup-wait-interval",
        "soon",
    ]);
    assert!(!ok && err.contains("whole number of minutes"), "{err}");
    let (ok, _, err) = b.cli(&["set", "setting", "no-such-setting", "1"]);
    assert!(
        !ok && err.contains("no-such-setting") && err.contains("backing-image-scrub-interval"),
        "{err}"
    );
    let (status, v) = http_json(
        reqwest::Method::PUT,
        format!("{}/v1/settings/backing-image-scrub-interval", b.http),
        Some(serde_json::json!({"value": "-1"})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("backing-image-scrub-interval"),
        "{v}"
    );
    let (status, _) = http_json(
        reqwest::Method::PUT,
        format!("{}/v1/settings/nope", b.http),
        Some(serde_json::json!({"value": "1"})),
    )
    .await;
    assert_eq!(status, 404);

    // Kept across a restart; `-o json` shows the records.
    b.restart().await;
    let (ok, out, err) = b.cli(&["get", "settings", "-o", "json"]);
    assert!(ok, "{err}");
    let list: Vec<Value> = serde_json::from_str(&out).unwrap();
    let value = |n: &str| {
        list.iter().find(|s| s["name"] == n).unwrap()["value"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(value("backing-image-cleanup-wait-interval"), "5");
    assert_eq!(value("concurrent-backing-image-syncs-per-node"), "2");
    assert_eq!(value("backing-image-scrub-interval"), "86400");
}

#[tokio::test]
async fn cleanup_by_hand_and_after_the_wait_keeps_used_files_and_one_copy() {
    let b = Bicsi::start_with(3, TICK).await;
    let work = b.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = ext4_image(&work, 8);
    let vol = image_on_every_disk(&b, "bi-clean", &raw, 3).await;
    let disk = |i: usize| b.disks[i].display().to_string();

    // In use: refused with the volume named, over the CLI and HTTP.
    let (ok, _, err) = b.cli(&["image", "cleanup", "bi-clean", "--disk", &disk(0)]);
    assert!(
        !ok && err.contains("refused") && err.contains(&vol),
        "{err}"
    );
    let (status, r) = http_json(
        reqwest::Method::POST,
        format!("{}/v1/backingimages/bi-clean/cleanup", b.http),
        Some(serde_json::json!({"disks": [disk(1), "/no/such/disk"]})),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["cleaned"], serde_json::json!([]), "{r}");
    let refused = r["refused"].as_array().unwrap();
    assert!(refused[0]["reason"].as_str().unwrap().contains(&vol), "{r}");
    assert!(
        refused[1]["reason"]
            .as_str()
            .unwrap()
            .contains("no node has this disk"),
        "{r}"
    );
    assert_eq!(backing_files(&b, "bi-clean").len(), 3);
    // Deleting the image is refused while a volume uses it; the error lists the volumes.
    let (ok, _, err) = b.cli(&["delete", "backingimage", "bi-clean"]);
    assert!(
        !ok && err.contains("used by volumes") && err.contains(&vol),
        "{err}"
    );
    assert_eq!(backing_files(&b, "bi-clean").len(), 3);

    // Unused now; the default wait (60 minutes) keeps them, a manual cleanup does not wait.
    unpublish_and_delete(&mut b.client().await, &vol).await;
    let (ok, out, err) = b.cli(&["image", "cleanup", "bi-clean", "--disk", &disk(0)]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("cleaned up"), "{out}");
    assert!(
        !b.disks[0]
            .join("backing-images")
            .read_dir()
            .unwrap()
            .any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("bi-clean-"))
    );
    let (ok, _, err) = b.cli(&["image", "cleanup", "bi-clean", "--disk", &disk(0)]);
    assert!(!ok && err.contains("holds no file"), "{err}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(backing_files(&b, "bi-clean").len(), 2, "the wait holds");

    // A wait of 0: the next tick removes one more, and the last one stays.
    set(&b, "backing-image-cleanup-wait-interval", "0");
    until(&b, "automatic cleanup", async || {
        let img = get_image(&b, "bi-clean").await.unwrap();
        (files_of(&img).len() == 1 && backing_files(&b, "bi-clean").len() == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let left = backing_files(&b, "bi-clean");
    assert_eq!(left.len(), 1, "minNumberOfCopies 1 stays");
    assert_eq!(sha512(&std::fs::read(&left[0]).unwrap()), sha512(&raw));
    let last = b
        .disks
        .iter()
        .find(|d| left[0].starts_with(d))
        .unwrap()
        .display()
        .to_string();
    let (ok, _, err) = b.cli(&["image", "cleanup", "bi-clean", "--disk", &last]);
    assert!(!ok && err.contains("minNumberOfCopies"), "{err}");
    // Unused, the image can be deleted, with its last file.
    let (ok, _, err) = b.cli(&["delete", "backingimage", "bi-clean"]);
    assert!(ok, "{err}");
    assert!(backing_files(&b, "bi-clean").is_empty());
    assert!(get_image(&b, "bi-clean").await.is_none());
}

#[tokio::test]
async fn a_changed_file_fails_at_start_up_and_is_synced_again_from_a_ready_one() {
    let mut b = Bicsi::start_with(2, TICK).await;
    let work = b.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = ext4_image(&work, 8);
    image_on_every_disk(&b, "bi-rec", &raw, 2).await;
    b.stop();
    let files = backing_files(&b, "bi-rec");
    assert_eq!(files.len(), 2);
    flip_a_byte(&files[1]);
    // What a crash leaves: a temp file, and the directory of an image deleted meanwhile.
    let stray = b.disks[0].join("tmp").join("bi-rec-0badc0de.part");
    std::fs::create_dir_all(stray.parent().unwrap()).unwrap();
    std::fs::write(&stray, b"half a download").unwrap();
    let gone = b.disks[1].join("backing-images").join("gone-0badc0de");
    std::fs::create_dir_all(&gone).unwrap();
    std::fs::write(gone.join("backing"), b"old").unwrap();
    b.restart().await;
    assert!(!stray.exists() && !gone.exists(), "removed at start-up");
    // Start-up verification fails it, recovery removes it and copies it from the ready one.
    until(&b, "the changed file recovered", async || {
        let img = get_image(&b, "bi-rec").await.unwrap();
        let f = files_of(&img);
        let ready = f.len() == 2 && f.values().all(|f| f["state"] == "ready");
        (ready && sha512(&std::fs::read(&files[1]).ok()?) == sha512(&raw)).then_some(())
    })
    .await;
    let log = b.log();
    assert!(
        log.contains("start-up verification: checksum mismatch on disk"),
        "{log}"
    );
    assert!(log.contains("syncing it again from a ready one"), "{log}");
}

#[tokio::test]
async fn the_scrub_catches_a_flipped_byte_and_the_image_downloads_again() {
    let b = Bicsi::start_with(1, TICK).await;
    let work = b.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = ext4_image(&work, 8);
    image_on_every_disk(&b, "bi-scrub", &raw, 1).await;
    let file = backing_files(&b, "bi-scrub").remove(0);
    flip_a_byte(&file);
    set(&b, "backing-image-scrub-interval", "1");
    // The only file fails: all files failed, so the image downloads again.
    until(&b, "the scrub to fail the file", async || {
        let img = get_image(&b, "bi-scrub").await.unwrap();
        let f = files_of(&img);
        f.values()
            .any(|f| {
                f["state"] == "failed" || f["message"].as_str().unwrap_or("").contains("again")
            })
            .then_some(())
    })
    .await;
    until(&b, "a new download", async || {
        let img = get_image(&b, "bi-scrub").await.unwrap();
        let f = files_of(&img);
        let ready = f.values().all(|f| f["state"] == "ready");
        (ready && sha512(&std::fs::read(&file).ok()?) == sha512(&raw)).then_some(())
    })
    .await;
    let log = b.log();
    assert!(log.contains("scrub: checksum mismatch on disk"), "{log}");
    assert!(log.contains("all files failed: downloading again"), "{log}");
}

#[tokio::test]
async fn an_uploaded_image_whose_only_file_changed_cannot_be_recovered_and_says_so() {
    let b = Bicsi::start_with(1, TICK).await;
    let work = b.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = ext4_image(&work, 8);
    let src = work.join("up.raw");
    std::fs::write(&src, &raw).unwrap();
    let (ok, _, err) = b.cli(&["image", "upload", "bi-up", src.to_str().unwrap()]);
    assert!(ok, "{err}");
    let file = backing_files(&b, "bi-up").remove(0);
    flip_a_byte(&file);
    set(&b, "backing-image-scrub-interval", "1");
    let img = until(&b, "the unrecoverable message", async || {
        let img = get_image(&b, "bi-up").await.unwrap();
        img["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot be recovered"))
            .then_some(img)
    })
    .await;
    let message = img["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("delete it") && message.contains("upload the file again"),
        "{message}"
    );
    assert!(
        files_of(&img).values().all(|f| f["state"] == "failed"),
        "{img}"
    );
    // Nothing downloads or copies it back; deleting it works and removes the file.
    let (ok, _, err) = b.cli(&["delete", "backingimage", "bi-up"]);
    assert!(ok, "{err}");
    assert!(backing_files(&b, "bi-up").is_empty());
}

/// Issue 19's download guard on the embedded `bicsi serve`: loopback is allowed by default (the
/// image servers of every other test are on 127.0.0.1), link-local (the cloud metadata address)
/// is refused without a connection, and a denied list set through the CLI applies at once.
#[tokio::test]
async fn the_download_guard_refuses_link_local_and_what_the_denied_setting_names() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let create = |name: &str, url: &str| {
        let source = format!("{{\"url\": \"{url}\"}}");
        create_req(
            name,
            0,
            &[
                ("backingImage", name),
                ("backingImageDataSourceType", "download"),
                ("backingImageDataSourceParameters", &source),
            ],
        )
    };
    let started = Instant::now();
    let s = c
        .controller
        .create_volume(create(
            "bi-meta",
            "http://169.254.169.254/latest/meta-data/",
        ))
        .await
        .expect_err("the metadata address");
    assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
    assert!(
        s.message().contains("169.254.0.0/16 (link-local)"),
        "{}",
        s.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it tried to connect"
    );

    // A bad list is refused naming the entry; a good one applies to the next download.
    let (ok, _, err) = b.cli(&[
        "set",
        "setting",
        "backing-image-download-denied-networks",
        "loopback,10.0.0.0/33",
    ]);
    assert!(!ok && err.contains("\"10.0.0.0/33\""), "{err}");
    set(&b, "backing-image-download-denied-networks", "loopback");
    let raw = ext4_image(b.dir.path(), 8);
    let server = ImageServer::start([("img.raw".to_string(), raw)].into()).await;
    let s = c
        .controller
        .create_volume(create("bi-lo", &server.url("img.raw")))
        .await
        .expect_err("loopback is denied now");
    assert!(
        s.message().contains("127.0.0.0/8 (loopback)"),
        "{}",
        s.message()
    );
    assert_eq!(server.hits(), 0);
    // The refused image waits out its backoff (as any failed source does); a new one downloads
    // at once.
    set(&b, "backing-image-download-denied-networks", "");
    c.controller
        .create_volume(create("bi-lo2", &server.url("img.raw")))
        .await
        .unwrap_or_else(|s| panic!("loopback allowed again: {s:?}"));
}
