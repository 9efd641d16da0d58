//! What every scenario checks: while it runs, no `backing` file on any disk ever holds bytes
//! other than its image's, and no file the API calls ready is missing or wrong; when it ends,
//! every file of every image is in a final state within a deadline, ready files hold the image's
//! SHA-512, and `tmp/` is empty.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a scenario's files may take to reach a final state after the last fault.
pub const SETTLE: Duration = Duration::from_secs(60);

/// The id bicsi gave a disk directory (`<disk>/disk.json`).
pub fn disk_id(disk: &Path) -> String {
    let v: Value = serde_json::from_slice(
        &std::fs::read(disk.join("disk.json"))
            .unwrap_or_else(|e| panic!("{}/disk.json: {e}", disk.display())),
    )
    .unwrap();
    v["id"].as_str().unwrap().to_string()
}

pub async fn image(http: &str, name: &str) -> Option<Value> {
    let r = reqwest::get(format!("{http}/v1/backingimages/{name}"))
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

pub async fn images(http: &str) -> Option<Vec<Value>> {
    reqwest::get(format!("{http}/v1/backingimages"))
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// (disk id, state, message) of each disk file of an image.
pub fn files(v: &Value) -> Vec<(String, String, String)> {
    v["status"]["diskFileStatusMap"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(d, f)| {
                    (
                        d.clone(),
                        f["state"].as_str().unwrap_or_default().to_string(),
                        f["message"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The `backing` files under a disk, by image directory name (`<name>-<uuid>`).
pub fn backing_files(disk: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(disk.join("backing-images"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let f = e.path().join("backing");
        if f.is_file() {
            out.push((e.file_name().to_string_lossy().into_owned(), f));
        }
    }
    out
}

pub fn tmp_entries(disk: &Path) -> Vec<String> {
    std::fs::read_dir(disk.join("tmp"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The image name of a directory `<name>-<8 hex>`.
fn image_of(dir: &str) -> &str {
    dir.rsplit_once('-').map(|(n, _)| n).unwrap_or(dir)
}

pub fn sha512_file(p: &Path) -> Option<String> {
    std::fs::read(p).ok().map(|b| crate::images::sha512(&b))
}

/// Polls until `f` gives `Some`, or panics saying `what` (and `log()`) after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, log: impl Fn() -> String, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until a temp file of `disk` has at least `bytes`: the transfer is under way.
pub async fn wait_part(disk: &Path, bytes: u64, log: impl Fn() -> String) {
    let tmp = disk.join("tmp");
    wait_for("a temp file to grow", Duration::from_secs(30), log, || {
        let tmp = tmp.clone();
        async move {
            std::fs::read_dir(&tmp)
                .ok()?
                .flatten()
                .any(|e| e.metadata().is_ok_and(|m| m.len() >= bytes))
                .then_some(())
        }
    })
    .await
}

/// Watches disks (and the API's ready files) in the background for the whole scenario.
pub struct Watch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Watch {
    /// `expected`: image name → SHA-512. Files of other images are not judged.
    pub fn start(http: &str, disks: &[PathBuf], expected: &[(&str, &str)]) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let expected: HashMap<String, String> = expected
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .collect();
        let (http, disks, s) = (http.to_string(), disks.to_vec(), stop.clone());
        let task = tokio::spawn(async move {
            let mut checked = 0usize;
            let mut bad = Vec::new();
            // Hashes by (path, inode, size, mtime): a file is hashed once unless it changes.
            let mut known: HashMap<(PathBuf, u64, u64, i64, i64), String> = HashMap::new();
            let mut hash = |p: &Path| -> Option<String> {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(p).ok()?;
                let key = (
                    p.to_path_buf(),
                    m.ino(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec(),
                );
                if let Some(h) = known.get(&key) {
                    return Some(h.clone());
                }
                let h = sha512_file(p)?;
                known.insert(key, h.clone());
                Some(h)
            };
            loop {
                // One last look after the scenario ended, so its final files are judged too.
                let last = s.load(Ordering::Relaxed);
                let ids: HashMap<String, PathBuf> = disks
                    .iter()
                    .filter(|d| d.join("disk.json").exists())
                    .map(|d| (disk_id(d), d.clone()))
                    .collect();
                for d in &disks {
                    for (dir, f) in backing_files(d) {
                        let Some(want) = expected.get(image_of(&dir)) else {
                            continue;
                        };
                        if let Some(got) = hash(&f)
                            && &got != want
                        {
                            bad.push(format!("{} holds wrong bytes ({got})", f.display()));
                        }
                        checked += 1;
                    }
                }
                for v in images(&http).await.unwrap_or_default() {
                    let name = v["metadata"]["name"].as_str().unwrap_or_default();
                    let Some(want) = expected.get(name) else {
                        continue;
                    };
                    let dir = format!("{name}-{}", v["status"]["uuid"].as_str().unwrap_or(""));
                    for (disk, state, _) in files(&v) {
                        let Some(path) = ids.get(&disk) else { continue };
                        if state != "ready" {
                            continue;
                        }
                        let f = path.join("backing-images").join(&dir).join("backing");
                        match hash(&f) {
                            Some(got) if &got == want => {}
                            got => bad.push(format!(
                                "{name} is ready on disk {disk} but {} holds {got:?}",
                                f.display()
                            )),
                        }
                        checked += 1;
                    }
                }
                if last {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            (checked, bad)
        });
        Watch { stop, task }
    }

    /// Stops watching; panics if anything wrong was seen, or nothing was looked at.
    pub async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let (checked, bad) = self.task.await.unwrap();
        assert!(
            bad.is_empty(),
            "seen while the scenario ran:\n{}",
            bad.join("\n")
        );
        assert!(checked > 0, "the watch never saw a file");
    }
}

/// Waits until every file of every image is `ready` or `failed` (the final states) and every
/// image of `expected` has a ready file, then checks that every ready file on `disks` holds its
/// image's SHA-512 (from `expected`) and that the disks' `tmp/` are empty. Returns the images.
pub async fn settle(
    http: &str,
    disks: &[PathBuf],
    expected: &[(&str, &str)],
    log: impl Fn() -> String,
) -> Vec<Value> {
    let what = "every file in a final state, a ready file for each image that must recover";
    let all = wait_for(what, SETTLE, &log, || async {
        let all = images(http).await?;
        let settled = all
            .iter()
            .flat_map(files)
            .all(|(_, s, _)| s == "ready" || s == "failed");
        let recovered = expected.iter().all(|(name, _)| {
            all.iter()
                .find(|v| v["metadata"]["name"] == *name)
                .is_some_and(|v| files(v).iter().any(|(_, s, _)| s == "ready"))
        });
        (settled && recovered).then_some(all)
    })
    .await;
    let ids: HashMap<String, PathBuf> = disks.iter().map(|d| (disk_id(d), d.clone())).collect();
    for v in &all {
        let name = v["metadata"]["name"].as_str().unwrap();
        let Some((_, want)) = expected.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        assert_eq!(v["status"]["checksum"], *want, "{name}: {v}");
        let dir = format!("{name}-{}", v["status"]["uuid"].as_str().unwrap());
        for (disk, state, _) in files(v) {
            if state != "ready" {
                continue;
            }
            let Some(path) = ids.get(&disk) else { continue };
            let f = path.join("backing-images").join(&dir).join("backing");
            assert_eq!(
                sha512_file(&f).as_deref(),
                Some(*want),
                "{name}: the ready file {} holds other bytes",
                f.display()
            );
        }
    }
    for d in disks {
        // Temp files go when the work they belong to ends: poll briefly for the last removal.
        wait_for(
            &format!("{}/tmp to be empty", d.display()),
            Duration::from_secs(10),
            || format!("{:?}\n{}", tmp_entries(d), log()),
            || async { tmp_entries(d).is_empty().then_some(()) },
        )
        .await;
    }
    all
}

/// Creates a backing image through the HTTP API (what `bicsi apply -f` sends).
pub async fn create_image(http: &str, name: &str, source_type: &str, params: Value) {
    let resp = reqwest::Client::new()
        .post(format!("{http}/v1/backingimages"))
        .json(&serde_json::json!({
            "apiVersion": "longhorn.io/v1beta2",
            "kind": "BackingImage",
            "metadata": { "name": name },
            "spec": { "sourceType": source_type, "sourceParameters": params },
        }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
}

/// Waits until `name` has a ready file; panics if one of its files fails meanwhile (work that
/// restarted after a fault must not fail on its own leftovers).
pub async fn wait_ready_without_failing(http: &str, name: &str, log: impl Fn() -> String) {
    wait_for(&format!("{name} ready"), SETTLE, &log, || async {
        let v = image(http, name).await?;
        let f = files(&v);
        if let Some((disk, _, message)) = f.iter().find(|(_, s, _)| s == "failed") {
            panic!(
                "{name}: the restarted work failed on disk {disk}: {message}\n{}",
                log()
            );
        }
        f.iter().any(|(_, s, _)| s == "ready").then_some(())
    })
    .await
}
