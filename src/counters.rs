//! What happens, counted where it happens: backing image transfers, checksum failures,
//! recoveries, cleanups, rebuilds and CSI calls. These counters and histograms are the process's
//! (one set per process, like its resident memory), so a hook deep in the file code needs no
//! handle passed down to it, and they sit on the bottom floor so any floor may count.
//! `metrics` renders them with what it reads at scrape time ([`gather`]). This module counts; it
//! must not read records, nor decide anything.

use std::sync::LazyLock;
use std::time::Instant;

use prometheus::proto::MetricFamily;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::model::SourceType;

/// Buckets of the transfer histograms: a small image in a fraction of a second to large ones
/// over an hour.
const TRANSFER_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
/// Buckets of the CSI call and attach histograms: most calls take milliseconds, an attach that
/// starts an engine a few hundred, one that waits for a file up to the sidecars' timeouts.
const CALL_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The counters and histograms of this process.
struct Recorded {
    registry: Registry,
    transfers: IntCounterVec,
    transfer_bytes: IntCounterVec,
    prepared_bytes: IntCounterVec,
    transfer_seconds: HistogramVec,
    checksum_failures: IntCounterVec,
    recoveries: IntCounterVec,
    cleanups: IntCounterVec,
    rebuilds_started: IntCounterVec,
    rebuilds_finished: IntCounterVec,
    csi_requests: IntCounterVec,
    csi_seconds: HistogramVec,
    attach_seconds: HistogramVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid counter");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("a valid histogram");
    r.register(Box::new(h.clone())).expect("registered once");
    h
}

static RECORDED: LazyLock<Recorded> = LazyLock::new(|| {
    let r = Registry::new();
    Recorded {
        transfers: counter(
            &r,
            "bicsi_backing_image_transfers_total",
            "Backing image file transfers that ended, by kind and result (ok, failed).",
            &["kind", "result"],
        ),
        transfer_bytes: counter(
            &r,
            "bicsi_backing_image_transfer_bytes_total",
            "Bytes moved by backing image file transfers that succeeded (received over the network, copied between disks, written by an export).",
            &["kind"],
        ),
        prepared_bytes: counter(
            &r,
            "bicsi_backing_image_prepared_bytes_total",
            "Bytes of backing image files made ready on this node, by how they were made.",
            &["kind"],
        ),
        transfer_seconds: histogram(
            &r,
            "bicsi_backing_image_transfer_duration_seconds",
            "How long backing image file transfers took, by kind and result.",
            &["kind", "result"],
            TRANSFER_BUCKETS,
        ),
        checksum_failures: counter(
            &r,
            "bicsi_backing_image_checksum_failures_total",
            "Backing image files whose SHA-512 did not match, by the check that found it (download, upload, transfer, prepared, verify).",
            &["check"],
        ),
        recoveries: counter(
            &r,
            "bicsi_backing_image_recoveries_total",
            "Failed backing image files prepared again by the controller, from a ready file or from the image's source.",
            &["from"],
        ),
        cleanups: counter(
            &r,
            "bicsi_backing_image_cleanups_total",
            "Unused backing image files removed, automatically or on request.",
            &["trigger"],
        ),
        rebuilds_started: counter(
            &r,
            "bicsi_volume_rebuilds_started_total",
            "Replica rebuilds started by the controller, offline (detached volume) or online (attached, mirror engine).",
            &["mode"],
        ),
        rebuilds_finished: counter(
            &r,
            "bicsi_volume_rebuilds_finished_total",
            "Replica rebuilds that ended, by mode and result (ok: the replica is rw again; failed: it is err).",
            &["mode", "result"],
        ),
        csi_requests: counter(
            &r,
            "bicsi_csi_requests_total",
            "CSI calls answered, by method and gRPC code.",
            &["method", "code"],
        ),
        csi_seconds: histogram(
            &r,
            "bicsi_csi_request_duration_seconds",
            "How long CSI calls took to answer, by method and gRPC code.",
            &["method", "code"],
            CALL_BUCKETS,
        ),
        attach_seconds: histogram(
            &r,
            "bicsi_volume_attach_duration_seconds",
            "How long attaching (NodeStageVolume) and detaching (NodeUnstageVolume) a volume on this node took, successful calls only.",
            &["operation"],
            CALL_BUCKETS,
        ),
        registry: r,
    }
});

/// How a backing image file was made: the label `kind` of the transfer metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferKind {
    Download,
    Upload,
    Export,
    /// From a backup in the backup target.
    Restore,
    /// Copied from another disk of the same node.
    SyncSameNode,
    /// Transferred from another node.
    SyncCrossNode,
}

impl TransferKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferKind::Download => "download",
            TransferKind::Upload => "upload",
            TransferKind::Export => "export",
            TransferKind::Restore => "restore",
            TransferKind::SyncSameNode => "sync_same_node",
            TransferKind::SyncCrossNode => "sync_cross_node",
        }
    }

    /// The kind of a first file made from an image's data source.
    pub fn of_source(t: SourceType) -> TransferKind {
        match t {
            SourceType::Download => TransferKind::Download,
            SourceType::Upload => TransferKind::Upload,
            SourceType::ExportFromVolume => TransferKind::Export,
            SourceType::Restore => TransferKind::Restore,
        }
    }
}

/// One transfer under way: [`Transfer::ok`] records it as succeeded; dropped without it (an
/// error returned early, a cancellation), it counts as failed. Either way its duration is kept.
pub struct Transfer {
    kind: TransferKind,
    started: Instant,
    moved: u64,
    done: bool,
}

impl Transfer {
    pub fn start(kind: TransferKind) -> Transfer {
        Transfer {
            kind,
            started: Instant::now(),
            moved: 0,
            done: false,
        }
    }

    /// The bytes that actually moved (less than the file when holes were skipped or a download
    /// went on from a partial file).
    pub fn moved(&mut self, bytes: u64) {
        self.moved = bytes;
    }

    /// The file of `size` bytes is ready.
    pub fn ok(mut self, size: u64) {
        self.done = true;
        let m = &*RECORDED;
        let kind = self.kind.as_str();
        m.transfer_bytes
            .with_label_values(&[kind])
            .inc_by(self.moved);
        m.prepared_bytes.with_label_values(&[kind]).inc_by(size);
        self.record("ok");
    }

    fn record(&self, result: &str) {
        let m = &*RECORDED;
        let labels = [self.kind.as_str(), result];
        m.transfers.with_label_values(&labels).inc();
        m.transfer_seconds
            .with_label_values(&labels)
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        if !self.done {
            self.record("failed");
        }
    }
}

/// A file's SHA-512 did not match, found by `check`: `download` (while downloading, against
/// the image's checksum), `upload`, `transfer` (a file from another node), `prepared` (a
/// finished file against the image's checksum), `verify` (a ready file checked again).
pub fn checksum_failure(check: &'static str) {
    RECORDED.checksum_failures.with_label_values(&[check]).inc();
}

/// The controller prepares a failed file again, `from` a ready file or the image's `source`.
pub fn recovery(from: &'static str) {
    RECORDED.recoveries.with_label_values(&[from]).inc();
}

/// An unused file was removed, by the `automatic` cleanup or a `manual` one.
pub fn cleanup(trigger: &'static str) {
    RECORDED.cleanups.with_label_values(&[trigger]).inc();
}

/// The controller starts rebuilding a replica, `offline` or `online`.
pub fn rebuild_started(mode: &'static str) {
    RECORDED.rebuilds_started.with_label_values(&[mode]).inc();
}

/// A rebuild `mode` ended: `ok` (the replica is rw again) or `failed`.
pub fn rebuild_finished(mode: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    RECORDED
        .rebuilds_finished
        .with_label_values(&[mode, result])
        .inc();
}

/// A CSI call answered with `code` after `seconds`.
pub fn csi_call(method: &str, code: tonic::Code, seconds: f64) {
    let m = &*RECORDED;
    let code_name = code_name(code);
    m.csi_requests.with_label_values(&[method, code_name]).inc();
    m.csi_seconds
        .with_label_values(&[method, code_name])
        .observe(seconds);
    if code == tonic::Code::Ok {
        let op = match method {
            "NodeStageVolume" => "attach",
            "NodeUnstageVolume" => "detach",
            _ => return,
        };
        m.attach_seconds.with_label_values(&[op]).observe(seconds);
    }
}

/// gRPC's names of the codes, as other gRPC metrics label them (`OK`, `NOT_FOUND`, ...).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The families of this process's counters and histograms, for a scrape.
pub fn gather() -> Vec<MetricFamily> {
    RECORDED.registry.gather()
}
