//! Path: cross-node sync. Another node's disk made ready over HTTPS (mutual TLS) between two
//! node agents (with the sender's chunk manifest, or with it removed: the whole SHA-512)
//! against curl of the same stream with a node's certificate.

use super::*;

/// A `bicsi controller` and two `bicsi node` agents (n1, n2, one disk each) on 127.0.0.1.
pub(crate) struct Cluster {
    pub(crate) controller: Daemon,
    pub(crate) nodes: Vec<ClusterNode>,
    /// The controller's HTTP API.
    pub(crate) api: String,
    /// The controller's CSI endpoint.
    pub(crate) csi: String,
    /// `bicsi certs --out`: the CA and the `--tls-dir`s `controller` and `node`.
    pub(crate) certs: PathBuf,
}

pub(crate) struct ClusterNode {
    pub(crate) id: String,
    pub(crate) daemon: Daemon,
    pub(crate) disk: PathBuf,
    /// Where it serves its ready files to other nodes.
    pub(crate) http_port: u16,
}

impl Cluster {
    pub(crate) async fn start(b: &Bench, dir: &Path) -> Res<Cluster> {
        let (http_port, cluster_port) = (try_free_port()?, try_free_port()?);
        let csi = format!("unix://{}", dir.join("controller.sock").display());
        let s = |v: &str| v.to_string();
        // Mutual TLS on, as in a cluster: the transfers measured are HTTPS between the nodes.
        let certs = dir.join("certs");
        let made = std::process::Command::new(&b.bicsi)
            .arg("certs")
            .arg("--out")
            .arg(&certs)
            .output()?;
        if !made.status.success() {
            return Err(format!("bicsi certs: {}", String::from_utf8_lossy(&made.stderr)).into());
        }
        let tls_dir = |role: &str| certs.join(role).display().to_string();
        let controller = Daemon::spawn(
            &b.bicsi,
            &[
                s("controller"),
                s("--data-dir"),
                dir.join("controller").display().to_string(),
                s("--csi-endpoint"),
                csi.clone(),
                s("--http-listen"),
                format!("127.0.0.1:{http_port}"),
                s("--cluster-listen"),
                format!("127.0.0.1:{cluster_port}"),
                s("--tls-dir"),
                tls_dir("controller"),
            ],
            dir.join("controller.log"),
        )?;
        let mut nodes = Vec::new();
        for id in ["n1", "n2"] {
            let ndir = dir.join(id);
            let disk = ndir.join("disk");
            std::fs::create_dir_all(&disk)?;
            let node_http = try_free_port()?;
            let args = vec![
                s("node"),
                s("--node-id"),
                s(id),
                s("--data-dir"),
                ndir.join("data").display().to_string(),
                s("--csi-endpoint"),
                format!("unix://{}", ndir.join("csi.sock").display()),
                s("--disk"),
                disk.display().to_string(),
                s("--controller"),
                format!("http://127.0.0.1:{cluster_port}"),
                s("--agent-listen"),
                format!("127.0.0.1:{}", try_free_port()?),
                s("--http-listen"),
                format!("127.0.0.1:{node_http}"),
                s("--nbd-listen"),
                format!("127.0.0.1:{}", try_free_port()?),
                s("--tls-dir"),
                tls_dir("node"),
            ];
            let daemon = Daemon::spawn(&b.bicsi, &args, ndir.join("node.log"))?;
            nodes.push(ClusterNode {
                id: id.into(),
                daemon,
                disk,
                http_port: node_http,
            });
        }
        let mut c = Cluster {
            controller,
            nodes,
            api: format!("http://127.0.0.1:{http_port}"),
            csi,
            certs,
        };
        let started = Instant::now();
        loop {
            let up = match api_get(&b.http, &c.api, "/v1/nodes").await {
                Ok(v) => v.as_array().map_or(0, |a| {
                    a.iter()
                        .filter(|n| {
                            n["up"] == true && n["disks"].as_array().is_some_and(|d| !d.is_empty())
                        })
                        .count()
                }),
                Err(_) => 0,
            };
            if up == c.nodes.len() {
                // The bench's image server is on 127.0.0.1, which a cluster's downloads may not
                // reach by default: open the hole an operator would.
                let put = b
                    .http
                    .put(format!(
                        "{}/v1/settings/backing-image-download-allowed-networks",
                        c.api
                    ))
                    .json(&serde_json::json!({ "value": "127.0.0.1" }))
                    .send()
                    .await?;
                if !put.status().is_success() {
                    return Err(format!("set the download hole: {}", put.text().await?).into());
                }
                return Ok(c);
            }
            c.controller.check_alive()?;
            for n in &mut c.nodes {
                n.daemon.check_alive()?;
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("only {up} of 2 nodes up after 30 s").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the nodes, then the controller; returns the tails of their logs.
    pub(crate) async fn stop(self) -> String {
        let mut logs = String::new();
        for n in self.nodes {
            let log = n.daemon.stop().await;
            let _ = write!(logs, "--- node {} ---\n{}", n.id, log_tail(&log, 15));
        }
        let log = self.controller.stop().await;
        let _ = write!(logs, "--- controller ---\n{}", log_tail(&log, 15));
        logs
    }
}

/// Cross-node sync: per run a fresh controller and two nodes; the image is downloaded to one
/// node (untimed); ControllerPublishVolume of a 2-replica volume to that node until it succeeds
/// (the other node has received, verified and stored the file) against curl of the same stream
/// from the sending node, then `sync FILE`.
/// Which cross-node sync: with the sender's manifest or not, of the sparse or the dense image.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Variant {
    pub(crate) manifest: bool,
    pub(crate) dense: bool,
}

/// With `dense`, the image is the fully random one of --size (every chunk data: issue 22's dense
/// path) instead of the sparse one.
pub(crate) async fn sync_cross(
    b: &Bench,
    checks: &mut Checks,
    manifest: bool,
    dense: bool,
) -> Res<Vec<Row>> {
    const REF: &str = "curl --cert NODE.crt --key NODE.key -o FILE https://SENDER/v1/files/NAME-UUID && sync FILE";
    let src = if dense {
        &b.source
    } else {
        b.sparse_image(b.size)?
    };
    let title = match (manifest, dense) {
        (true, false) => "cross-node sync",
        (false, _) => "cross-node sync, no manifest",
        (true, true) => "cross-node sync, dense",
    };
    let variant = if manifest {
        ""
    } else {
        " the sender's backing.manifest is removed before each publish, so the receiver verifies \
         the whole SHA-512;"
    };
    println!(
        "{title}: {} runs;{variant} fresh `bicsi controller` + 2 `bicsi node` per run on \
         127.0.0.1; the {} {} image ({} allocated) is downloaded to one node (untimed) and a \
         2-replica volume created (one replica per node, the other node's deferred); bicsi = \
         ControllerPublishVolume to the node holding the file (retried every {} ms while \
         Unavailable) until it succeeds: the other node has pulled the data extents over HTTPS \
         (mutual TLS), hashed and fsynced them; reference = `{REF}` of the same stream from the sender; the \
         sender's page cache of the file is dropped before each side",
        b.runs,
        fmt_bytes(src.len),
        if dense { "random (dense)" } else { "sparse" },
        fmt_bytes(src.allocated),
        POLL.as_millis()
    );
    let mut totals = SyncTotals::new();
    let mut wire: Vec<(u64, u64)> = Vec::new();
    for run in 0..b.runs {
        let dir = b.work.join(format!("cross-{run}"));
        let r = in_swept_dir(
            &dir,
            cross_run(b, checks, &dir, run, src, Variant { manifest, dense }),
        )
        .await?;
        totals.add(&r);
        if let (Some(w), Some(a)) = (r.wire, r.data) {
            wire.push((w + r.manifest.unwrap_or(0), a));
        }
        println!("  run {}: {}", run + 1, r.notes.join("\n         "));
    }
    let (bicsi, reference, peak, hwm_reset) = totals.into_parts();
    let wire_note = match wire.last() {
        Some(&(w, _)) => {
            let over = w as f64 / src.allocated as f64 - 1.0;
            format!(
                "bytes on the wire (extent stream + manifest) {} vs the image's allocated {}: \
                 {:+.2}% (target within 5%: {})",
                fmt_bytes(w),
                fmt_bytes(src.allocated),
                over * 100.0,
                if over.abs() <= 0.05 { "met" } else { "OVER" }
            )
        }
        None => "bytes on the wire: not logged".into(),
    };
    let note = format!(
        "{wire_note}; bicsi checks each 1 MiB chunk that holds data against the sender's chunk \
         manifest (SHA-256; its SHA-512 is the image's, and all-zero chunks must arrive as \
         holes), or without a usable manifest hashes the whole logical size ({}, holes as \
         zeros) with SHA-512 on one core (about 0.5 GiB/s here), and fsyncs the file; its time \
         also holds the deferred replica's qcow2 overlay and its NBD export on the receiver; \
         peak RSS = the RECEIVING node's VmHWM{}",
        fmt_bytes(src.len),
        if hwm_reset {
            " during the publish (reset just before it)"
        } else {
            " since its start (could not reset it)"
        }
    );
    Ok(vec![Row {
        path: title.into(),
        bicsi,
        reference,
        ref_name: REF.into(),
        peak_rss: peak,
        note: Some(note),
    }])
}

pub(crate) async fn cross_run(
    b: &Bench,
    checks: &mut Checks,
    dir: &Path,
    run: usize,
    src: &Source,
    variant: Variant,
) -> Res<SyncRun> {
    let cluster = Cluster::start(b, dir).await?;
    let result = cross_sides(b, checks, dir, run, src, &cluster, variant).await;
    let logs = cluster.stop().await;
    if result.is_err() {
        eprintln!("bicsi logs (last lines):\n{logs}");
    }
    result
}

pub(crate) async fn cross_sides(
    b: &Bench,
    checks: &mut Checks,
    dir: &Path,
    run: usize,
    src: &Source,
    cluster: &Cluster,
    Variant { manifest, dense }: Variant,
) -> Res<SyncRun> {
    let name = format!("cross-{run}");
    let url = if dense {
        b.url.clone()
    } else {
        b.sparse_url(src.len)
    };
    let obj = create_image(&b.http, &cluster.api, &name, &url, &src.sha512, src.len).await?;
    let uuid = obj["status"]["uuid"]
        .as_str()
        .filter(|u| !u.is_empty())
        .ok_or("the backing image has no status.uuid")?
        .to_string();
    let holder = obj["status"]["diskFileStatusMap"]
        .as_object()
        .and_then(|m| m.values().find(|f| f["state"] == "ready"))
        .and_then(|f| f["nodeId"].as_str())
        .ok_or("no ready file with a nodeId")?
        .to_string();
    let s = cluster
        .nodes
        .iter()
        .position(|n| n.id == holder)
        .ok_or_else(|| format!("the image is ready on unknown node {holder:?}"))?;
    let (sender, receiver) = (&cluster.nodes[s], &cluster.nodes[1 - s]);
    let from = ready_file(&sender.disk, &name).ok_or("no ready file on the sending node")?;
    let from_alloc = allocated(&from)?;
    let mut csi = csi_connect(&cluster.csi).await?;
    let cap = mount_capability();
    let vol = create_volume(&mut csi, &format!("cross-vol-{run}"), &name, 2, &cap).await?;
    // The node certificates name bicsi-node, not the address: curl resolves that name.
    let stream_url = format!(
        "https://bicsi-node:{}/v1/files/{name}-{uuid}",
        sender.http_port
    );
    let resolve = format!("bicsi-node:{}:127.0.0.1", sender.http_port);
    let node_tls = cluster.certs.join("node");
    let mut out = SyncRun::default();
    for k in 0..2 {
        if (run + k) % 2 == 0 {
            let sender_manifest = from.with_file_name("backing.manifest");
            if !manifest {
                std::fs::remove_file(&sender_manifest)?;
            }
            checks.check(
                sender_manifest.is_file() == manifest,
                format!(
                    "run {}: the sender's file {} a manifest",
                    run + 1,
                    if manifest { "has" } else { "no longer has" }
                ),
            );
            sync().await;
            drop_page_cache(&from);
            let idle_map = MemMap::read(receiver.daemon.pid);
            out.hwm_reset = reset_hwm(receiver.daemon.pid);
            let sampler = MemSampler::start(receiver.daemon.pid);
            let p =
                publish_until_ready(&mut csi, &vol, &holder, &cap, file_deadline(src.len)).await?;
            out.bicsi = p.elapsed;
            out.vm_hwm = vm_hwm(receiver.daemon.pid);
            let peak_map = sampler.stop().await;
            let got = ready_file(&receiver.disk, &name)
                .ok_or("the publish succeeded, but the receiving node has no ready file")?;
            let got_alloc = allocated(&got)?;
            let sha = sha512_file(&got).await?;
            checks.check(
                sha == src.sha512,
                format!("run {}: the received file hashes to {sha}", run + 1),
            );
            let log = receiver.daemon.log_text();
            let msg = "received backing image file";
            out.wire = logged(&log, msg, "wire").and_then(|v| v.parse().ok());
            out.data = logged(&log, msg, "data").and_then(|v| v.parse().ok());
            out.manifest = logged(&log, msg, "manifest").and_then(|v| v.parse().ok());
            out.verified = logged(&log, msg, "verified");
            let want = if manifest { "manifest" } else { "sha512" };
            checks.check(
                out.verified.as_deref() == Some(want),
                format!(
                    "run {}: the receiver verified by {want} ({:?})",
                    run + 1,
                    out.verified
                ),
            );
            let stages = ["body_secs", "check_wait_secs", "settle_secs"]
                .map(|k| logged(&log, "sync receive stages", k).unwrap_or("?".into()));
            let recv = logged(&log, "sync receive done", "secs")
                .and_then(|s| s.parse::<f64>().ok())
                .map_or("?".into(), |s| format!("{s:.2} s"));
            out.notes.push(format!(
                "bicsi {:.2} s ({} ControllerPublish calls, the first {:.1} ms, the last {:.1} \
                 ms; {} → {}; receiver log: \"{msg} wire={} manifest={} data={} verified={}\", \
                 receive itself {recv}: body {} s, then waiting for the checks {} s, settle {} \
                 s); sender's file allocated {}, received file allocated {}; receiver VmHWM {}",
                p.elapsed.as_secs_f64(),
                p.calls,
                p.first_call.as_secs_f64() * 1e3,
                p.last_call.as_secs_f64() * 1e3,
                sender.id,
                receiver.id,
                out.wire.map_or("?".into(), |w| w.to_string()),
                out.manifest.map_or("?".into(), |m| m.to_string()),
                out.data.map_or("?".into(), |d| d.to_string()),
                out.verified.as_deref().unwrap_or("?"),
                stages[0],
                stages[1],
                stages[2],
                fmt_bytes(from_alloc),
                fmt_bytes(got_alloc),
                out.vm_hwm.map_or("n/a".into(), fmt_bytes)
            ));
            for (when, m) in [("at the sampled peak", peak_map), ("idle", idle_map)] {
                if let Some(m) = m {
                    out.notes
                        .push(format!("receiver resident {when} {}", m.describe()));
                }
            }
            unpublish_and_delete(&mut csi, &vol, &holder).await?;
        } else {
            let file = dir.join("reference.stream");
            sync().await;
            drop_page_cache(&from);
            let t = run_script(
                r#"curl -sS --fail --noproxy '*' --resolve "$3" --cacert "$4/ca.crt" --cert "$4/tls.crt" --key "$4/tls.key" -o "$1" "$2" && sync "$1""#,
                &[
                    file.as_os_str(),
                    std::ffi::OsStr::new(&stream_url),
                    std::ffi::OsStr::new(&resolve),
                    node_tls.as_os_str(),
                ],
            )
            .await?;
            out.curl_bytes = std::fs::metadata(&file)?.len();
            let _ = std::fs::remove_file(&file);
            out.reference = t;
            out.notes.push(format!(
                "`curl -o FILE {stream_url} && sync FILE` {:.2} s ({} bytes received)",
                t.as_secs_f64(),
                out.curl_bytes
            ));
        }
    }
    if let Some(w) = out.wire {
        checks.check(
            w == out.curl_bytes,
            format!(
                "run {}: bicsi logged {w} bytes on the wire, curl received {} of the same stream",
                run + 1,
                out.curl_bytes
            ),
        );
    }
    Ok(out)
}
