//! Attach and detach through the HTTP API (the web UI's Attach and Detach) on the real binary,
//! with real mounts and loop devices: a filesystem mounted under bicsi's data directory (never
//! a path from the request) and written through, a block device there, idempotent calls, a
//! second attach at the other mode refused with the path it is at, and the CLI and the API
//! seeing and undoing each other's attachments. The split mode's controller refuses, saying
//! why. The browser side is tests/ui.

#[path = "kit/mod.rs"]
mod kit;

use std::path::{Path, PathBuf};

use kit::{Proc, cli, controller_args, csi_endpoint, free_port, serve_args, temp_dir};
use reqwest::Method;

async fn wait_healthz(http: &reqwest::Client, base: &str) {
    for _ in 0..300 {
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{base} did not answer /healthz");
}

fn is_mount_point(p: &Path) -> bool {
    kit::mounts_under(p.parent().unwrap())
        .iter()
        .any(|m| m == p)
}

fn error_of(v: &serde_json::Value) -> String {
    v["error"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn attach_and_detach_over_http_share_the_clis_records() {
    if !kit::root_or_skip("attach over HTTP (mounts, loop devices)") {
        return;
    }
    let dir = temp_dir("bicsi-http-attach-");
    let base = format!("http://127.0.0.1:{}", free_port());
    let mut proc = Proc::spawn(
        serve_args(dir.path(), "att-node", base.trim_start_matches("http://")),
        dir.path().join("bicsi.log"),
    );
    let http = reqwest::Client::new();
    wait_healthz(&http, &base).await;
    let endpoint = csi_endpoint(dir.path());
    let run = |args: &[&str]| cli(&base, Some(&endpoint), args);
    let attach = |v: &str| format!("{base}/v1/volumes/{v}/attach");
    let detach = |v: &str| format!("{base}/v1/volumes/{v}/detach");
    let attachments = format!("{base}/v1/attachments");

    let (status, v) = kit::send(
        &http,
        Method::POST,
        format!("{base}/v1/volumes"),
        Some(serde_json::json!({"name": "ua", "size": "64Mi", "parameters": {"numberOfReplicas": "1"}})),
    )
    .await;
    assert_eq!(status, 201, "{v}");

    // Refused before anything happens: an unknown volume, an unknown mode, a path (the API
    // chooses where).
    let (status, e) = kit::send(&http, Method::POST, attach("nope"), None).await;
    assert_eq!(status, 404, "{e}");
    assert!(error_of(&e).contains("\"nope\""), "{e}");
    let (status, e) = kit::send(
        &http,
        Method::POST,
        attach("ua"),
        Some(serde_json::json!({"mode": "sideways"})),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert!(
        error_of(&e).contains("filesystem") && error_of(&e).contains("block"),
        "{e}"
    );
    let (status, e) = kit::send(
        &http,
        Method::POST,
        attach("ua"),
        Some(serde_json::json!({"mode": "filesystem", "path": "/etc"})),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    let (_, list) = kit::send(&http, Method::GET, attachments.clone(), None).await;
    assert_eq!(list, serde_json::json!([]));

    // A filesystem under the data directory, written through; the same call again is the same.
    let mount = dir.path().join("data/attached/ua/mount");
    for _ in 0..2 {
        let (status, a) = kit::send(
            &http,
            Method::POST,
            attach("ua"),
            Some(serde_json::json!({"mode": "filesystem"})),
        )
        .await;
        assert_eq!(status, 200, "{a}");
        assert_eq!(a["mode"], "filesystem", "{a}");
        assert_eq!(PathBuf::from(a["path"].as_str().unwrap()), mount, "{a}");
        assert_eq!(a["node"], "att-node", "{a}");
    }
    assert!(is_mount_point(&mount), "{} is not mounted", mount.display());
    std::fs::write(mount.join("hello"), b"from the api").unwrap();
    let (_, list) = kit::send(&http, Method::GET, attachments.clone(), None).await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["volume"], "ua");
    assert_eq!(list[0]["mode"], "filesystem");
    let (_, vols) = kit::send(&http, Method::GET, format!("{base}/v1/volumes"), None).await;
    assert_eq!(vols[0]["publication"]["nodeId"], "att-node", "{vols}");

    // The other mode, by the API or the CLI: refused with the path it is at.
    let (status, e) = kit::send(
        &http,
        Method::POST,
        attach("ua"),
        Some(serde_json::json!({"mode": "block"})),
    )
    .await;
    assert_eq!(status, 409, "{e}");
    assert!(error_of(&e).contains(&mount.display().to_string()), "{e}");
    let elsewhere = dir.path().join("ua.dev");
    let (ok, _, err) = run(&[
        "volume",
        "attach",
        "ua",
        "--block",
        elsewhere.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains(&mount.display().to_string()), "{err}");
    assert!(is_mount_point(&mount));

    // The CLI's detach undoes the API's attach.
    let (ok, out, err) = run(&["volume", "detach", "ua"]);
    assert!(ok, "{out}{err}");
    assert!(!is_mount_point(&mount));
    assert!(!mount.exists());
    let (_, list) = kit::send(&http, Method::GET, attachments.clone(), None).await;
    assert_eq!(list, serde_json::json!([]));

    // The API's detach undoes the CLI's attach, at the CLI's own path.
    let cli_mount = dir.path().join("cli-mnt");
    let (ok, out, err) = run(&[
        "volume",
        "attach",
        "ua",
        "--mount",
        cli_mount.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        std::fs::read(cli_mount.join("hello")).unwrap(),
        b"from the api"
    );
    let (_, list) = kit::send(&http, Method::GET, attachments.clone(), None).await;
    assert_eq!(
        PathBuf::from(list[0]["path"].as_str().unwrap()),
        cli_mount,
        "{list}"
    );
    let (status, d) = kit::send(&http, Method::POST, detach("ua"), None).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["detached"], true, "{d}");
    assert_eq!(PathBuf::from(d["path"].as_str().unwrap()), cli_mount);
    assert!(!is_mount_point(&cli_mount));
    let (ok, out, _) = run(&["volume", "detach", "ua"]);
    assert!(ok && out.contains("nothing to detach"), "{out}");
    // Detach is idempotent.
    let (status, d) = kit::send(&http, Method::POST, detach("ua"), None).await;
    assert_eq!(
        (status, &d["detached"]),
        (200, &serde_json::json!(false)),
        "{d}"
    );
    let (_, vols) = kit::send(&http, Method::GET, format!("{base}/v1/volumes"), None).await;
    assert!(vols[0]["publication"].is_null(), "{vols}");

    // A block device under the data directory: the same volume (its ext4 superblock).
    let (status, a) = kit::send(
        &http,
        Method::POST,
        attach("ua"),
        Some(serde_json::json!({"mode": "block"})),
    )
    .await;
    assert_eq!(status, 200, "{a}");
    let dev = PathBuf::from(a["path"].as_str().unwrap());
    assert_eq!(dev, dir.path().join("data/attached/ua/block"), "{a}");
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&dev).unwrap();
        f.seek(SeekFrom::Start(1024 + 56)).unwrap();
        let mut magic = [0u8; 2];
        f.read_exact(&mut magic).unwrap();
        assert_eq!(magic, [0x53, 0xEF], "ext4 magic through {}", dev.display());
    }
    let (status, d) = kit::send(&http, Method::POST, detach("ua"), None).await;
    assert_eq!(
        (status, &d["detached"]),
        (200, &serde_json::json!(true)),
        "{d}"
    );
    assert!(!dev.exists());
    assert!(!dir.path().join("data/attached/ua").exists());
    let (status, e) = kit::send(&http, Method::DELETE, format!("{base}/v1/volumes/ua"), None).await;
    assert_eq!(status, 204, "{e}");
    proc.stop();
}

#[tokio::test]
async fn the_split_mode_controller_refuses_to_attach_and_says_why() {
    let dir = temp_dir("bicsi-http-attach-ctl-");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut proc = Proc::spawn(
        controller_args(dir.path(), port, free_port()),
        dir.path().join("controller.log"),
    );
    let http = reqwest::Client::new();
    wait_healthz(&http, &base).await;
    for (method, url) in [
        (Method::POST, format!("{base}/v1/volumes/any/attach")),
        (Method::POST, format!("{base}/v1/volumes/any/detach")),
        (Method::GET, format!("{base}/v1/attachments")),
    ] {
        let (status, e) = kit::send(&http, method, url.clone(), None).await;
        assert_eq!(status, 409, "{url}: {e}");
        assert!(
            error_of(&e).contains("split mode") && error_of(&e).contains("bicsi volume attach"),
            "{url}: {e}"
        );
    }
    proc.stop();
}
