//! `kill -9` of the receiving node agent, or of the sending one, while a backing image file
//! travels between two nodes (slowed by the sender's proxy so the kills land mid-transfer).

use std::time::{Duration, Instant};

use bicsi::client::CsiClient;

use crate::checks::*;
use crate::harness::{MIB, cpublish_req, create_req, mount_cap};
use crate::images::{create_retrying, sha512};
use crate::procs::Cluster;
use crate::throttle::ImageServer;

/// ControllerPublish once; it answers Unavailable while files move, and may fail while a node
/// is down: the orchestrator retries, and so do the tests.
async fn publish_once(ctl: &mut CsiClient, node: &str) -> Result<(), tonic::Status> {
    let mut req = cpublish_req("vol-sync", mount_cap(), false);
    req.node_id = node.into();
    ctl.controller
        .controller_publish_volume(req)
        .await
        .map(|_| ())
}

struct Setup {
    c: Cluster,
    ctl: CsiClient,
    server: ImageServer,
    want: String,
    /// The node that holds the first file (sends) and the other one (receives).
    sender: usize,
    receiver: usize,
}

/// Two nodes, an image ready on one of them, a two-replica volume, the sender slowed to
/// 2 MiB/s, and an attach under way that brings the file to the receiver (2 MiB received).
async fn transfer_under_way() -> Setup {
    let c = Cluster::start(2).await;
    let raw = crate::kit::noise(16 << 20, 4);
    let want = sha512(&raw);
    let server = ImageServer::start([("img.raw".to_string(), raw)].into()).await;
    let mut ctl = CsiClient::connect(&c.endpoint).await.unwrap();
    let req = create_req(
        "vol-sync",
        16 * MIB,
        &[
            ("numberOfReplicas", "2"),
            ("backingImage", "bi-sync"),
            ("backingImageDataSourceType", "download"),
            (
                "backingImageDataSourceParameters",
                &format!("{{\"url\": \"{}\"}}", server.url("img.raw")),
            ),
        ],
    );
    create_retrying(&mut ctl, req).await.unwrap();
    // CreateVolume does not wait for the first file; this setup needs it.
    wait_ready_without_failing(&c.http, "bi-sync", || c.logs()).await;
    let v = image(&c.http, "bi-sync").await.unwrap();
    let holder = v["status"]["diskFileStatusMap"]
        .as_object()
        .unwrap()
        .values()
        .find(|f| f["state"] == "ready")
        .map(|f| f["nodeId"].as_str().unwrap().to_string())
        .unwrap();
    let sender = c.node_index(&holder);
    let receiver = 1 - sender;
    // 16 MiB at 2 MiB/s from the sender: eight seconds on the wire.
    c.nodes[sender].transfer.set_rate(2 << 20);
    // The publish starts the copy and waits for it in the call (up to 10 s): stop waiting after
    // a moment, the copy goes on, and the faults below cut it while it runs.
    let _ = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        publish_once(&mut ctl, &holder),
    )
    .await;
    wait_part(&c.nodes[receiver].disk, 2 << 20, || c.logs()).await;
    Setup {
        c,
        ctl,
        server,
        want,
        sender,
        receiver,
    }
}

/// Retries the attach until it succeeds, then checks both files ready with the right bytes,
/// nothing left in tmp/, and the image downloaded only once.
async fn attach_and_settle(s: &mut Setup) {
    let holder = s.c.nodes[s.sender].id.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match publish_once(&mut s.ctl, &holder).await {
            Ok(()) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "attach never succeeded: {e:?}\n{}\n{}",
                image(&s.c.http, "bi-sync").await.unwrap_or_default(),
                s.c.logs()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expected = [("bi-sync", s.want.as_str())];
    let all = settle(&s.c.http, &s.c.disks(), &expected, || s.c.logs()).await;
    let v = all
        .iter()
        .find(|v| v["metadata"]["name"] == "bi-sync")
        .unwrap();
    let f = files(v);
    assert_eq!(f.len(), 2, "{v}");
    assert!(f.iter().all(|(_, st, _)| st == "ready"), "{v}");
    assert_eq!(
        s.server.hits("img.raw"),
        1,
        "synced between nodes, not downloaded again"
    );
}

#[tokio::test]
async fn kill9_of_the_sender_during_a_cross_node_sync_fails_the_copy_then_the_retry_succeeds() {
    let mut s = transfer_under_way().await;
    let watch = Watch::start(&s.c.http, &s.c.disks(), &[("bi-sync", &s.want)]);
    let receiver_disk = s.c.nodes[s.receiver].disk.clone();
    s.c.nodes[s.sender].proc.kill9();
    // The receiver sees its stream end early: its file fails, saying why, and is never ready.
    let msg = wait_for(
        "the receiver's file to fail",
        Duration::from_secs(30),
        || s.c.logs(),
        || async {
            let v = image(&s.c.http, "bi-sync").await?;
            files(&v)
                .into_iter()
                .find(|(_, st, _)| st == "failed")
                .map(|(_, _, m)| m)
        },
    )
    .await;
    assert!(!msg.is_empty(), "a failed file says why");
    assert!(backing_files(&receiver_disk).is_empty());
    s.c.nodes[s.sender].proc.start();
    s.c.wait_up(2).await;
    s.c.nodes[s.sender].transfer.set_rate(0);
    attach_and_settle(&mut s).await;
    watch.finish().await;
}

#[tokio::test]
async fn kill9_of_the_receiver_during_a_cross_node_sync_restarts_the_copy_after_it_returns() {
    let mut s = transfer_under_way().await;
    let watch = Watch::start(&s.c.http, &s.c.disks(), &[("bi-sync", &s.want)]);
    let receiver_disk = s.c.nodes[s.receiver].disk.clone();
    s.c.nodes[s.receiver].proc.kill9();
    assert!(backing_files(&receiver_disk).is_empty());
    s.c.nodes[s.receiver].proc.start();
    s.c.wait_up(2).await;
    s.c.nodes[s.sender].transfer.set_rate(0);
    attach_and_settle(&mut s).await;
    watch.finish().await;
}
