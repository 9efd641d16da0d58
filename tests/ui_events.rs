//! The web UI's side of the HTTP API on the real binary: `/` and its files are served by
//! `bicsi serve` and by the split mode's controller, and `GET /v1/events` streams the lists the
//! pages show as server-sent events: each topic at once, again when it changes (a setting set,
//! a backing image created), an unknown topic refused with the known ones named; and the volume
//! and snapshot routes the Volumes page uses (create, idempotent by name, restore from a
//! snapshot, delete). The pages themselves are tested in a browser by tests/ui (scripts/test
//! runs them).

#[path = "kit/mod.rs"]
mod kit;

use std::time::Duration;

use futures::StreamExt;
use kit::{Proc, controller_args, free_port, serve_args, temp_dir};

/// The next server-sent event (name, data) from `body`, buffering partial reads in `buf`.
async fn next_event(
    body: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buf: &mut String,
) -> (String, serde_json::Value) {
    loop {
        if let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut name = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = n.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            if data.is_empty() {
                continue; // a keep-alive comment
            }
            return (name, serde_json::from_str(&data).unwrap());
        }
        let chunk = tokio::time::timeout(Duration::from_secs(20), body.next())
            .await
            .expect("an event within 20 s")
            .expect("the stream stays open")
            .unwrap();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

/// Waits until `base/healthz` answers 200.
fn wait_healthz(proc: &mut Proc, base: &str) {
    let host = base.trim_start_matches("http://").to_string();
    proc.wait_ready_blocking("bicsi", || {
        use std::io::{Read, Write};
        let Ok(mut c) = std::net::TcpStream::connect(&host) else {
            return false;
        };
        let asked = write!(
            c,
            "GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        );
        let mut answer = String::new();
        asked.is_ok() && c.read_to_string(&mut answer).is_ok() && answer.starts_with("HTTP/1.1 200")
    });
}

#[tokio::test]
async fn events_stream_each_list_and_its_changes() {
    let dir = temp_dir("bicsi-events-");
    let base = format!("http://127.0.0.1:{}", free_port());
    let mut proc = Proc::spawn(
        serve_args(
            dir.path(),
            "events-node",
            base.trim_start_matches("http://"),
        ),
        dir.path().join("bicsi.log"),
    );
    wait_healthz(&mut proc, &base);
    let http = reqwest::Client::new();

    // The UI's page and files, with a policy that keeps the page on this origin.
    let page = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(page.text().await.unwrap().contains("/ui/app.js"));
    for f in ["app.js", "api.js", "sha512.js", "style.css"] {
        let r = http.get(format!("{base}/ui/{f}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{f}");
    }
    let missing = http.get(format!("{base}/ui/nope.js")).send().await.unwrap();
    assert_eq!(missing.status(), 404);

    // An unknown topic: 400 naming the known ones.
    let bad = http
        .get(format!("{base}/v1/events?topics=settings,nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let text = bad.text().await.unwrap();
    assert!(
        text.contains("nope") && text.contains("backingimages"),
        "{text}"
    );

    let resp = http
        .get(format!("{base}/v1/events?topics=settings,backingimages"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = Box::pin(resp.bytes_stream());
    let mut buf = String::new();
    // Each topic at once, in the order asked.
    let (name, settings) = next_event(&mut body, &mut buf).await;
    assert_eq!(name, "settings");
    let wait = settings
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "backing-image-cleanup-wait-interval")
        .unwrap();
    assert_eq!(wait["value"], "60");
    let (name, images) = next_event(&mut body, &mut buf).await;
    assert_eq!(name, "backingimages");
    assert_eq!(images, serde_json::json!([]));

    // A change is sent; what did not change is not sent again.
    let put = http
        .put(format!(
            "{base}/v1/settings/backing-image-cleanup-wait-interval"
        ))
        .json(&serde_json::json!({"value": "7"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let (name, settings) = next_event(&mut body, &mut buf).await;
    assert_eq!(name, "settings");
    assert!(
        settings
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "backing-image-cleanup-wait-interval" && s["value"] == "7"),
        "{settings}"
    );
    let created = http
        .post(format!("{base}/v1/backingimages"))
        .json(&serde_json::json!({
            "apiVersion": "longhorn.io/v1beta2",
            "kind": "BackingImage",
            "metadata": {"name": "ev-img"},
            "spec": {"sourceType": "upload"},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let (name, images) = next_event(&mut body, &mut buf).await;
    assert_eq!(
        name, "backingimages",
        "settings did not change: not sent again"
    );
    assert_eq!(images[0]["metadata"]["name"], "ev-img", "{images}");
    drop(body);
    proc.stop();
}

#[tokio::test]
async fn the_split_mode_controller_serves_the_ui_and_its_events() {
    let dir = temp_dir("bicsi-events-ctl-");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut proc = Proc::spawn(
        controller_args(dir.path(), port, free_port()),
        dir.path().join("controller.log"),
    );
    wait_healthz(&mut proc, &base);
    let http = reqwest::Client::new();
    let page = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("/ui/app.js"));
    let resp = http
        .get(format!("{base}/v1/events?topics=nodes,disks"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = Box::pin(resp.bytes_stream());
    let mut buf = String::new();
    let (name, nodes) = next_event(&mut body, &mut buf).await;
    assert_eq!((name.as_str(), nodes), ("nodes", serde_json::json!([])));
    let (name, disks) = next_event(&mut body, &mut buf).await;
    assert_eq!((name.as_str(), disks), ("disks", serde_json::json!([])));
    drop(body);
    proc.stop();
}

#[tokio::test]
async fn volumes_and_snapshots_over_http_as_the_ui_makes_them() {
    use reqwest::Method;
    let dir = temp_dir("bicsi-http-vol-");
    let base = format!("http://127.0.0.1:{}", free_port());
    let mut proc = Proc::spawn(
        serve_args(dir.path(), "vol-node", base.trim_start_matches("http://")),
        dir.path().join("bicsi.log"),
    );
    wait_healthz(&mut proc, &base);
    let http = reqwest::Client::new();
    let volumes = format!("{base}/v1/volumes");

    // Bad requests: named, nothing created.
    let (status, e) = kit::send(
        &http,
        Method::POST,
        volumes.clone(),
        Some(serde_json::json!({"name": "hv"})),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("give its size"),
        "{e}"
    );
    let (status, e) = kit::send(
        &http,
        Method::POST,
        volumes.clone(),
        Some(serde_json::json!({"name": "hv", "size": "lots"})),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("\"lots\""), "{e}");
    let (status, e) = kit::send(
        &http,
        Method::POST,
        volumes.clone(),
        Some(serde_json::json!({"name": "hv", "size": "64Mi", "storageClass": "nope"})),
    )
    .await;
    assert_eq!(status, 404, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("StorageClass \"nope\""),
        "{e}"
    );
    let (_, list) = kit::send(&http, Method::GET, volumes.clone(), None).await;
    assert_eq!(list, serde_json::json!([]));

    // Created, and the same request again gives the same volume.
    let req =
        serde_json::json!({"name": "hv", "size": "64Mi", "parameters": {"numberOfReplicas": "1"}});
    let (status, v) = kit::send(&http, Method::POST, volumes.clone(), Some(req.clone())).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["id"], "hv");
    assert_eq!(v["spec"]["capacityBytes"], 64 << 20);
    let (status, again) = kit::send(&http, Method::POST, volumes.clone(), Some(req)).await;
    assert_eq!((status, &again["id"]), (201, &v["id"]));
    let (status, e) = kit::send(
        &http,
        Method::POST,
        volumes.clone(),
        Some(serde_json::json!({"name": "hv", "size": "128Mi"})),
    )
    .await;
    assert_eq!(status, 409, "another request for the same name: {e}");

    // A snapshot, listed by volume, restored into a new volume, then deleted.
    let (status, s) = kit::send(
        &http,
        Method::POST,
        format!("{base}/v1/snapshots"),
        Some(serde_json::json!({"name": "hs", "volume": "hv"})),
    )
    .await;
    assert_eq!(status, 201, "{s}");
    let snap = s["id"].as_str().unwrap().to_string();
    let (_, list) = kit::send(
        &http,
        Method::GET,
        format!("{base}/v1/snapshots?volume=hv"),
        None,
    )
    .await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let (_, none) = kit::send(
        &http,
        Method::GET,
        format!("{base}/v1/snapshots?volume=other"),
        None,
    )
    .await;
    assert_eq!(none, serde_json::json!([]));
    let (status, r) = kit::send(
        &http,
        Method::POST,
        volumes.clone(),
        Some(serde_json::json!({"name": "hv-restored", "fromSnapshot": snap})),
    )
    .await;
    assert_eq!(status, 201, "{r}");
    assert_eq!(
        r["spec"]["source"],
        serde_json::json!({"snapshot": {"id": snap}})
    );
    assert_eq!(r["spec"]["capacityBytes"], 64 << 20, "the snapshot's size");
    for _ in 0..2 {
        let (status, e) = kit::send(
            &http,
            Method::DELETE,
            format!("{base}/v1/snapshots/{snap}"),
            None,
        )
        .await;
        assert_eq!(status, 204, "{e}");
    }
    for id in ["hv-restored", "hv", "hv"] {
        let (status, e) = kit::send(&http, Method::DELETE, format!("{volumes}/{id}"), None).await;
        assert_eq!(status, 204, "{id}: {e}");
    }
    let (_, list) = kit::send(&http, Method::GET, volumes, None).await;
    assert_eq!(list, serde_json::json!([]));
    proc.stop();
}
