//! Paths: same-node sync. A second disk of the same node made ready from the first, on ext4 (the
//! work dir's filesystem) against `cp --sparse=always`, and on XFS with reflink (loop-mounted,
//! root) against `cp --reflink=always`.

use super::*;

/// Smallest XFS filesystem mkfs.xfs makes (it refuses under 300 MB).
pub(crate) const XFS_MIN: u64 = 512 * MIB;

impl Bench {
    pub(crate) fn sparse_image(&self, len: u64) -> Res<&Source> {
        Ok(self
            .sparse
            .get(&len)
            .ok_or_else(|| format!("no sparse image of {len} bytes was generated"))?)
    }

    pub(crate) fn sparse_url(&self, len: u64) -> String {
        format!("{}/sparse-{len}", self.files)
    }
}

/// How long a file of `len` bytes may take to get ready anywhere.
pub(crate) fn file_deadline(len: u64) -> Duration {
    Duration::from_secs(120 + len / (5 * MIB))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SameNode {
    Ext4,
    XfsReflink,
}

impl SameNode {
    pub(crate) fn label(self) -> &'static str {
        match self {
            SameNode::Ext4 => "same-node sync, ext4",
            SameNode::XfsReflink => "same-node sync, XFS reflink",
        }
    }

    /// The reference's name and script (`$1` = SRC, `$2` = DST).
    pub(crate) fn reference(self) -> (&'static str, &'static str) {
        match self {
            SameNode::Ext4 => (
                "cp --sparse=always SRC DST && sync DST",
                r#"cp --sparse=always "$1" "$2" && sync "$2""#,
            ),
            SameNode::XfsReflink => (
                "cp --reflink=always SRC DST && sync DST",
                r#"cp --reflink=always "$1" "$2" && sync "$2""#,
            ),
        }
    }
}

pub(crate) async fn sync_ext4(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    let fs = fs_type(&b.work).await;
    if fs != "ext4" {
        println!(
            "{}: note: the work dir is on {fs}, not ext4; measuring there anyway",
            SameNode::Ext4.label()
        );
    }
    same_node_sync(b, checks, &b.work.join("sync-ext4"), SameNode::Ext4).await
}

pub(crate) async fn sync_xfs(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    let label = SameNode::XfsReflink.label();
    if !is_root() {
        println!("{label}: skipped: needs root");
        return Ok(vec![]);
    }
    for (tool, package) in [
        ("mkfs.xfs", "xfsprogs"),
        ("losetup", "mount"),
        ("mount", "mount"),
        ("umount", "mount"),
    ] {
        if !have_tool(tool) {
            println!("{label}: skipped: {tool} is missing (Debian package {package})");
            return Ok(vec![]);
        }
    }
    let len = (2 * b.size).max(XFS_MIN);
    let started = Instant::now();
    let fs = LoopMount::xfs(&b.work.join("xfs.img"), &b.work.join("xfs"), len).await?;
    println!(
        "{label}: XFS (mkfs.xfs -q -m reflink=1) in a {} sparse file on {}, mounted at {} \
         in {:.2} s",
        fmt_bytes(len),
        fs.dev,
        fs.mnt.display(),
        started.elapsed().as_secs_f64()
    );
    let rows = same_node_sync(b, checks, &fs.mnt.clone(), SameNode::XfsReflink).await;
    drop(fs); // unmount, losetup -d, remove the file
    rows
}

/// What one run of a sync path measured, both sides.
#[derive(Default)]
pub(crate) struct SyncRun {
    pub(crate) bicsi: Duration,
    pub(crate) reference: Duration,
    pub(crate) vm_hwm: Option<u64>,
    /// Whether VmHWM was reset (`/proc/PID/clear_refs`) just before the publish.
    pub(crate) hwm_reset: bool,
    /// Cross-node: bytes on the wire (the extent stream) and data bytes the receiver logged,
    /// the manifest's bytes it fetched besides, how it verified, bytes curl received.
    pub(crate) wire: Option<u64>,
    pub(crate) data: Option<u64>,
    pub(crate) manifest: Option<u64>,
    pub(crate) verified: Option<String>,
    pub(crate) curl_bytes: u64,
    pub(crate) notes: Vec<String>,
}

/// What the runs of a sync path add up to.
pub(crate) struct SyncTotals {
    pub(crate) bicsi: Stats,
    pub(crate) reference: Stats,
    pub(crate) peak: Option<u64>,
    /// Whether VmHWM was reset before every run's publish.
    pub(crate) hwm_reset: bool,
}

impl SyncTotals {
    pub(crate) fn new() -> SyncTotals {
        SyncTotals {
            bicsi: Stats::default(),
            reference: Stats::default(),
            peak: None,
            hwm_reset: true,
        }
    }

    pub(crate) fn add(&mut self, r: &SyncRun) {
        self.bicsi.push(r.bicsi);
        self.reference.push(r.reference);
        self.peak = self.peak.max(r.vm_hwm);
        self.hwm_reset &= r.hwm_reset;
    }

    /// (bicsi, reference, peak RSS, whether VmHWM was reset every run).
    pub(crate) fn into_parts(self) -> (Stats, Stats, Option<u64>, bool) {
        (self.bicsi, self.reference, self.peak, self.hwm_reset)
    }
}

/// Same-node sync: a fresh `bicsi serve` with disks A and B under `base` per run, the image
/// downloaded to one of them (untimed), then ControllerPublishVolume of a 2-replica volume until
/// it succeeds (the file on the other disk ready) against the reference's copy of that file.
pub(crate) async fn same_node_sync(
    b: &Bench,
    checks: &mut Checks,
    base: &Path,
    kind: SameNode,
) -> Res<Vec<Row>> {
    let src = b.sparse_image(b.size)?;
    let (ref_name, _) = kind.reference();
    println!(
        "{}: {} runs; fresh `bicsi serve` per run with two disks on one filesystem; the {} sparse \
         image ({} allocated) is downloaded to one disk (untimed) and a 2-replica volume created \
         (the other disk's replica deferred); bicsi = ControllerPublishVolume (retried every {} \
         ms while Unavailable) from the first call until it succeeds, i.e. the file is ready on \
         the second disk; reference = `{ref_name}` of the same ready file; the source's page \
         cache is dropped before each side",
        kind.label(),
        b.runs,
        fmt_bytes(src.len),
        fmt_bytes(src.allocated),
        POLL.as_millis()
    );
    let mut totals = SyncTotals::new();
    for run in 0..b.runs {
        let dir = base.join(format!("run-{run}"));
        let r = in_swept_dir(&dir, same_node_run(b, checks, &dir, run, kind, src)).await?;
        totals.add(&r);
        println!("  run {}: {}", run + 1, r.notes.join("\n         "));
    }
    let _ = std::fs::remove_dir(base);
    let (bicsi, reference, peak, hwm_reset) = totals.into_parts();
    let rss = if hwm_reset {
        "peak RSS = bicsi serve's VmHWM during the publish (reset just before it)"
    } else {
        "peak RSS = bicsi serve's VmHWM since its start (could not reset it: not root?), \
         the download included"
    };
    let note = match kind {
        SameNode::Ext4 => format!(
            "bound: a sparse copy of the data extents only ({} of {}); bicsi fsyncs its copy \
             (so does the reference: `sync DST`), and its time also holds the publish round \
             trips and the deferred replica's qcow2 overlay; {rss}",
            fmt_bytes(src.allocated),
            fmt_bytes(src.len)
        ),
        SameNode::XfsReflink => format!(
            "bound: O(1), one FICLONE (the node log's method=Reflink is checked); target well \
             under 0.1 s whatever the size: median {:.1} ms, max {:.1} ms ({}); bicsi fsyncs \
             its copy (so does the reference); {rss}",
            bicsi.median() * 1e3,
            bicsi.max() * 1e3,
            if bicsi.max() < 0.1 { "met" } else { "OVER" }
        ),
    };
    Ok(vec![Row {
        path: kind.label().into(),
        bicsi,
        reference,
        ref_name: ref_name.into(),
        peak_rss: peak,
        note: Some(note),
    }])
}

pub(crate) async fn same_node_run(
    b: &Bench,
    checks: &mut Checks,
    dir: &Path,
    run: usize,
    kind: SameNode,
    src: &Source,
) -> Res<SyncRun> {
    let disks = [dir.join("disk-a"), dir.join("disk-b")];
    for d in &disks {
        std::fs::create_dir_all(d)?;
    }
    let serve = Serve::start_disks(&b.bicsi, dir, &disks, &b.http).await?;
    let result = same_node_sides(b, checks, dir, run, kind, src, &serve, &disks).await;
    serve.stop_after(result).await
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn same_node_sides(
    b: &Bench,
    checks: &mut Checks,
    dir: &Path,
    run: usize,
    kind: SameNode,
    src: &Source,
    serve: &Serve,
    disks: &[PathBuf; 2],
) -> Res<SyncRun> {
    let name = format!("sync-{run}");
    let url = b.sparse_url(src.len);
    create_image(&b.http, &serve.api, &name, &url, &src.sha512, src.len).await?;
    let (from, to) = match (ready_file(&disks[0], &name), ready_file(&disks[1], &name)) {
        (Some(f), None) => (f, &disks[1]),
        (None, Some(f)) => (f, &disks[0]),
        other => {
            return Err(format!(
                "expected the image's ready file on exactly one disk, found {other:?}"
            )
            .into());
        }
    };
    let from_alloc = allocated(&from)?;
    let mut csi = csi_connect(&serve.csi).await?;
    let cap = mount_capability();
    let vol = create_volume(&mut csi, &format!("sync-vol-{run}"), &name, 2, &cap).await?;
    let (ref_name, script) = kind.reference();
    let mut out = SyncRun::default();
    for k in 0..2 {
        if (run + k) % 2 == 0 {
            sync().await;
            drop_page_cache(&from);
            out.hwm_reset = reset_hwm(serve.pid);
            let p =
                publish_until_ready(&mut csi, &vol, "bench", &cap, file_deadline(src.len)).await?;
            out.bicsi = p.elapsed;
            out.vm_hwm = vm_hwm(serve.pid);
            let copy = ready_file(to, &name)
                .ok_or("the publish succeeded, but no ready file is on the second disk")?;
            let copy_alloc = allocated(&copy)?;
            let sha = sha512_file(&copy).await?;
            checks.check(
                sha == src.sha512,
                format!("run {}: bicsi's copy hashes to {sha}", run + 1),
            );
            checks.check(
                copy_alloc <= from_alloc + from_alloc / 20 + MIB,
                format!(
                    "run {}: bicsi's copy allocates {} for a source of {}: holes were filled",
                    run + 1,
                    fmt_bytes(copy_alloc),
                    fmt_bytes(from_alloc)
                ),
            );
            let log = serve.log_text();
            let method = logged(&log, "copied backing image file between disks", "method");
            let copy_secs = logged(&log, "local copy done", "secs")
                .and_then(|s| s.parse::<f64>().ok())
                .map_or("?".into(), |s| format!("{:.1} ms", s * 1e3));
            if kind == SameNode::XfsReflink {
                checks.check(
                    method.as_deref() == Some("Reflink"),
                    format!(
                        "run {}: the node log says method={}, not Reflink",
                        run + 1,
                        method.as_deref().unwrap_or("(no line)")
                    ),
                );
            }
            out.notes.push(format!(
                "bicsi {:.1} ms ({} ControllerPublish calls, the first {:.1} ms, the last {:.1} \
                 ms; node log: \"copied backing image file between disks ... method={}\", the \
                 copy itself {copy_secs}); copy allocated {} vs source {}; VmHWM {}",
                p.elapsed.as_secs_f64() * 1e3,
                p.calls,
                p.first_call.as_secs_f64() * 1e3,
                p.last_call.as_secs_f64() * 1e3,
                method.as_deref().unwrap_or("?"),
                fmt_bytes(copy_alloc),
                fmt_bytes(from_alloc),
                out.vm_hwm.map_or("n/a".into(), fmt_bytes)
            ));
            unpublish_and_delete(&mut csi, &vol, "bench").await?;
        } else {
            let dst = dir.join("reference.copy");
            sync().await;
            drop_page_cache(&from);
            let t = run_script(script, &[from.as_os_str(), dst.as_os_str()]).await?;
            let alloc = allocated(&dst)?;
            let _ = std::fs::remove_file(&dst);
            out.reference = t;
            out.notes.push(format!(
                "`{ref_name}` {:.1} ms, copy allocated {}",
                t.as_secs_f64() * 1e3,
                fmt_bytes(alloc)
            ));
        }
    }
    Ok(out)
}
