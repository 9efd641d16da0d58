//! Path: the control plane. CreateVolume and DeleteVolume over the real CSI unix socket of one
//! `bicsi serve` (embedded store), at 1 and at 32 concurrent clients, each client on its own
//! connection. The reference does by hand what one create must do at least: a directory and a
//! qcow2 overlay on the same backing file, made durable (`qemu-img create` + `sync FILE`), and
//! `rm -r` of those directories for delete, at the same concurrency (`xargs -P`).

use super::*;

/// Client counts of the rows.
const CLIENTS: [usize; 2] = [1, 32];
/// The throughput target for CreateVolume at 32 clients.
const CREATE_TARGET: f64 = 200.0;

/// Operations per batch: enough that 32 clients each make several calls.
fn batch(clients: usize, quick: bool) -> usize {
    match (clients, quick) {
        (1, true) => 16,
        (1, false) => 64,
        (_, true) => 64,
        (_, false) => 256,
    }
}

/// Latencies and wall times of one operation at one concurrency, over the runs.
#[derive(Default)]
struct OpStats {
    wall: Stats,
    latencies: Vec<f64>,
}

impl OpStats {
    fn percentile(&self, p: f64) -> f64 {
        let mut v = self.latencies.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    }
}

pub(crate) async fn control(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    let len = attach_unit(b.size);
    let quick = b.quick;
    println!(
        "control: {} runs; one `bicsi serve` (embedded store) with a {} image ready on its disk; \
         bicsi = CreateVolume (1 replica, an overlay on the image) then DeleteVolume of a batch \
         of new volumes, at {:?} concurrent clients (one CSI connection each); reference = \
         `mkdir` + `qemu-img create -f qcow2 -b IMAGE` + `sync FILE` per volume, then `rm -r`, \
         at the same concurrency (`xargs -P`)",
        b.runs,
        fmt_bytes(len),
        CLIENTS
    );
    let dir = b.work.join("control");
    let disk = dir.join("disk");
    std::fs::create_dir_all(&disk)?;
    let guard = SweepOnDrop(dir.clone());
    let serve = Serve::start(&b.bicsi, &dir, &disk, &b.http).await?;
    let result = control_runs(b, checks, &serve, &dir, len, quick).await;
    let result = serve.stop_after(result).await;
    drop(guard);
    let (stats, refs, peak) = result?;
    let mut rows = Vec::new();
    for (ci, clients) in CLIENTS.iter().enumerate() {
        let n = batch(*clients, quick);
        for (oi, op) in ["CreateVolume", "DeleteVolume"].iter().enumerate() {
            let s = &stats[ci][oi];
            let rate = n as f64 / s.wall.median();
            let mut note = format!(
                "{rate:.0}/s (median run; reference {:.0}/s); latency p50 {:.1} ms, p99 {:.1} ms \
                 over {} calls",
                n as f64 / refs[ci][oi].median(),
                s.percentile(0.5) * 1e3,
                s.percentile(0.99) * 1e3,
                s.latencies.len()
            );
            if oi == 0 && *clients == 32 {
                let _ = write!(
                    note,
                    "; target ≥ {CREATE_TARGET:.0}/s at 32 clients: {}",
                    if rate >= CREATE_TARGET { "met" } else { "OVER" }
                );
            }
            rows.push(Row {
                path: format!(
                    "{op} ×{n}, {clients} client{}",
                    if *clients == 1 { "" } else { "s" }
                ),
                bicsi: s.wall.clone(),
                reference: refs[ci][oi].clone(),
                ref_name: if oi == 0 {
                    format!("qemu-img create + sync, -P{clients}")
                } else {
                    format!("rm -r, -P{clients}")
                },
                peak_rss: peak,
                note: Some(note),
            });
        }
    }
    Ok(rows)
}

type ControlResult = ([[OpStats; 2]; 2], [[Stats; 2]; 2], Option<u64>);

async fn control_runs(
    b: &Bench,
    checks: &mut Checks,
    serve: &Serve,
    dir: &Path,
    len: u64,
    quick: bool,
) -> Res<ControlResult> {
    let src = b.sparse_image(len)?;
    create_image(
        &b.http,
        &serve.api,
        "control",
        &b.sparse_url(len),
        &src.sha512,
        len,
    )
    .await?;
    let backing = ready_file(&dir.join("disk"), "control")
        .ok_or("the control image has no ready file on the disk")?;
    let hwm_reset = reset_hwm(serve.pid);
    let mut stats: [[OpStats; 2]; 2] = Default::default();
    let mut refs: [[Stats; 2]; 2] = Default::default();
    for run in 0..b.runs {
        let mut notes = Vec::new();
        for (ci, &clients) in CLIENTS.iter().enumerate() {
            let n = batch(clients, quick);
            for k in 0..2 {
                if (run + k) % 2 == 0 {
                    let names: Vec<String> =
                        (0..n).map(|i| format!("ctl-{run}-{clients}-{i}")).collect();
                    let (create, ids) = calls(&serve.csi, clients, names, Op::Create).await?;
                    let on_disk = replicas_on_disk(&dir.join("disk"));
                    checks.check(
                        on_disk == n,
                        format!(
                            "control run {}: {n} CreateVolume calls left {on_disk} replicas on \
                             the disk",
                            run + 1
                        ),
                    );
                    let (delete, _) = calls(&serve.csi, clients, ids, Op::Delete).await?;
                    let left = replicas_on_disk(&dir.join("disk"));
                    checks.check(
                        left == 0,
                        format!(
                            "control run {}: {left} replicas left after DeleteVolume",
                            run + 1
                        ),
                    );
                    notes.push(format!(
                        "bicsi {clients} client(s): {n} creates {:.2} s, {n} deletes {:.2} s",
                        create.0.as_secs_f64(),
                        delete.0.as_secs_f64()
                    ));
                    stats[ci][0].wall.push(create.0);
                    stats[ci][0].latencies.extend(create.1);
                    stats[ci][1].wall.push(delete.0);
                    stats[ci][1].latencies.extend(delete.1);
                } else {
                    let (c, d) = reference(dir, &backing, len, n, clients).await?;
                    notes.push(format!(
                        "reference -P{clients}: {n} creates {:.2} s, {n} deletes {:.2} s",
                        c.as_secs_f64(),
                        d.as_secs_f64()
                    ));
                    refs[ci][0].push(c);
                    refs[ci][1].push(d);
                }
            }
        }
        println!("  run {}: {}", run + 1, notes.join("\n         "));
    }
    let peak = vm_hwm(serve.pid);
    if !hwm_reset {
        println!("  (peak RSS includes the image download: VmHWM could not be reset)");
    }
    Ok((stats, refs, peak))
}

#[derive(Clone, Copy)]
enum Op {
    Create,
    Delete,
}

/// Runs `op` on every item (volume names for Create, ids for Delete) from `clients` concurrent
/// clients, each on its own connection; returns the wall time with each call's latency (s), and
/// the volume ids (Create).
async fn calls(
    endpoint: &str,
    clients: usize,
    items: Vec<String>,
    op: Op,
) -> Res<((Duration, Vec<f64>), Vec<String>)> {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(csi_connect(endpoint).await?);
    }
    let queue = Arc::new(std::sync::Mutex::new(items.into_iter()));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut c in conns {
        let queue = queue.clone();
        tasks.spawn(async move {
            let cap = block_capability();
            let mut lat = Vec::new();
            let mut ids = Vec::new();
            loop {
                let Some(item) = queue.lock().expect("queue").next() else {
                    return Ok::<_, Box<dyn std::error::Error + Send + Sync>>((lat, ids));
                };
                let t = Instant::now();
                match op {
                    Op::Create => ids.push(create_volume(&mut c, &item, "control", 1, &cap).await?),
                    Op::Delete => {
                        c.controller
                            .delete_volume(pb::DeleteVolumeRequest {
                                volume_id: item,
                                ..Default::default()
                            })
                            .await
                            .map_err(|s| rpc_err("DeleteVolume", s))?;
                    }
                }
                lat.push(t.elapsed().as_secs_f64());
            }
        });
    }
    let mut lat = Vec::new();
    let mut ids = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (l, i) = r??;
        lat.extend(l);
        ids.extend(i);
    }
    Ok(((started.elapsed(), lat), ids))
}

/// Replica files under `<disk>/replicas`: `volume.qcow2`, `volume.raw` or `volume.cow`, whichever
/// the engine the volume got asks for (the mirror engine over copy-on-write replicas on ext4 in
/// one `bicsi serve`, by default since session 11).
fn replicas_on_disk(disk: &Path) -> usize {
    let Ok(dirs) = std::fs::read_dir(disk.join("replicas")) else {
        return 0;
    };
    dirs.flatten()
        .filter_map(|d| std::fs::read_dir(d.path()).ok())
        .flatten()
        .flatten()
        .filter(|f| {
            let name = f.file_name();
            ["volume.qcow2", "volume.raw", "volume.cow"]
                .iter()
                .any(|n| name == std::ffi::OsStr::new(n))
        })
        .count()
}

/// The reference's batch: `n` overlays of `backing` made durable, then removed, `clients` at a
/// time; returns both wall times.
async fn reference(
    dir: &Path,
    backing: &Path,
    len: u64,
    n: usize,
    clients: usize,
) -> Res<(Duration, Duration)> {
    let base = dir.join("reference");
    std::fs::create_dir_all(&base)?;
    let (n_s, c_s, len_s) = (n.to_string(), clients.to_string(), len.to_string());
    // $1 = base dir, $2 = backing file, $3 = size, $4 = count, $5 = concurrency; xargs hands
    // each number to sh as its $0.
    let c = run_script(
        "seq \"$4\" | xargs -P \"$5\" -I{} sh -c 'mkdir \"$1/$0\" && qemu-img create -q \
         -f qcow2 -b \"$2\" -F raw \"$1/$0/volume.qcow2\" \"$3\" && sync \"$1/$0/volume.qcow2\"' \
         {} \"$1\" \"$2\" \"$3\"",
        &[
            base.as_os_str(),
            backing.as_os_str(),
            len_s.as_ref(),
            n_s.as_ref(),
            c_s.as_ref(),
        ],
    )
    .await?;
    let d = run_script(
        "seq \"$2\" | xargs -P \"$3\" -I{} rm -r \"$1/{}\"",
        &[base.as_os_str(), n_s.as_ref(), c_s.as_ref()],
    )
    .await?;
    Ok((c, d))
}
