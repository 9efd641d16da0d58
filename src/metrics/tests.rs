use super::collect::{
    BlockStat, images_families, io_families, note_staged_in, parse_block_stat, volume_families,
};
use super::csi::{answer_code, csi_method};
use super::*;
use crate::backing::object::BackingImage;
use crate::counters::{Transfer, TransferKind, csi_call, rebuild_finished, rebuild_started};
use crate::model::{NodeVolume, Volume};
use prometheus::proto::MetricFamily;

/// name{labels} value lines of `families`, label pairs in order, for assertions.
fn lines(families: &[MetricFamily]) -> Vec<String> {
    TextEncoder::new()
        .encode_to_string(
            &families
                .iter()
                .filter(|f| !f.get_metric().is_empty())
                .cloned()
                .collect::<Vec<_>>(),
        )
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn image(json: serde_json::Value) -> BackingImage {
    serde_json::from_value(json).unwrap()
}

#[test]
fn csi_paths_name_their_method() {
    let cases = [
        ("/csi.v1.Node/NodeStageVolume", Some("NodeStageVolume")),
        ("/csi.v1.Controller/CreateVolume", Some("CreateVolume")),
        ("/csi.v1.Identity/Probe", Some("Probe")),
        ("/bicsi.v1.Cluster/Heartbeat", None),
        ("/csi.v1.Node/", None),
        ("/", None),
    ];
    for (path, want) in cases {
        assert_eq!(csi_method(path), want, "{path}");
    }
}

#[test]
fn answer_codes_come_from_grpc_status_or_are_ok() {
    let mut h = axum::http::HeaderMap::new();
    assert_eq!(answer_code(&h), tonic::Code::Ok);
    h.insert("grpc-status", "5".parse().unwrap());
    assert_eq!(answer_code(&h), tonic::Code::NotFound);
    h.insert("grpc-status", "0".parse().unwrap());
    assert_eq!(answer_code(&h), tonic::Code::Ok);
}

#[test]
fn block_stat_fields() {
    let text = "     120        3     9600       40      250        0    20480      800        0      500      840        0        0        0        0\n";
    assert_eq!(
        parse_block_stat(text),
        Some(BlockStat {
            reads: 120,
            read_sectors: 9600,
            read_ms: 40,
            writes: 250,
            write_sectors: 20480,
            write_ms: 800,
        })
    );
    assert_eq!(parse_block_stat("1 2 3"), None);
    assert_eq!(parse_block_stat("a b c d e f g h"), None);
}

#[test]
fn volume_io_is_the_loop_devices_stat_since_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    let sys = dir.path().join("sys");
    std::fs::create_dir_all(sys.join("loop7")).unwrap();
    // reads, sectors read, ms reading, writes, sectors written: the kernel keeps them for the
    // device's life, so what earlier volumes on the reused device did is there too.
    let stat = |reads: u64, sectors: u64, ms: u64, writes: u64, written: u64| {
        std::fs::write(
            sys.join("loop7/stat"),
            format!("{reads} 0 {sectors} {ms} {writes} 0 {written} 2 0 0 0 0 0 0 0\n"),
        )
        .unwrap()
    };
    stat(1000, 80000, 500, 7000, 90000);
    let dev = dir.path().join("loop7");
    std::fs::write(&dev, "").unwrap();
    let staged: NodeVolume = serde_json::from_value(serde_json::json!({
        "volumeId": "v1", "stagingPath": "/s", "engineDir": "/e",
        "device": dev, "replicas": [], "publications": [],
        "capability": {"access": "block", "mode": "singleNodeWriter"},
    }))
    .unwrap();
    let bases = Default::default();
    note_staged_in(&bases, "v1", &dev, &sys);
    stat(1010, 80008, 505, 7004, 90016);
    let got = lines(&io_families(
        "n1",
        std::slice::from_ref(&staged),
        &sys,
        &bases,
    ));
    for want in [
        r#"bicsi_volume_read_bytes_total{node="n1",volume="v1"} 4096"#,
        r#"bicsi_volume_written_bytes_total{node="n1",volume="v1"} 8192"#,
        r#"bicsi_volume_reads_total{node="n1",volume="v1"} 10"#,
        r#"bicsi_volume_writes_total{node="n1",volume="v1"} 4"#,
        r#"bicsi_volume_read_time_seconds_total{node="n1",volume="v1"} 0.005"#,
    ] {
        assert!(got.iter().any(|l| l == want), "{want} not in {got:#?}");
    }
    // Unstaged: its zero is forgotten. Seen again without a stage (this process restarted):
    // counted from that first sight.
    let _ = io_families("n1", &[], &sys, &bases);
    let got = lines(&io_families(
        "n1",
        std::slice::from_ref(&staged),
        &sys,
        &bases,
    ));
    assert!(
        got.iter()
            .any(|l| l == r#"bicsi_volume_reads_total{node="n1",volume="v1"} 0"#),
        "{got:#?}"
    );
}

#[test]
fn files_per_state_per_disk_and_time_in_state() {
    let now = 1_800_000_000;
    let at = |secs_ago: u64| crate::model::rfc3339(now - secs_ago);
    let a = image(serde_json::json!({
        "apiVersion": "longhorn.io/v1beta2", "kind": "BackingImage",
        "metadata": {"name": "a"},
        "spec": {"sourceType": "download", "sourceParameters": {"url": "http://x/a"}},
        "status": {"size": 4096, "diskFileStatusMap": {
            "d1": {"state": "ready", "progress": 100, "lastStateTransitionTime": at(500), "nodeId": "n1"},
            "d2": {"state": "in-progress", "progress": 40, "lastStateTransitionTime": at(90), "nodeId": "n2"},
        }},
    }));
    let b = image(serde_json::json!({
        "apiVersion": "longhorn.io/v1beta2", "kind": "BackingImage",
        "metadata": {"name": "b"},
        "spec": {"sourceType": "upload"},
        "status": {"diskFileStatusMap": {
            "d1": {"state": "ready", "progress": 100, "lastStateTransitionTime": at(5), "nodeId": "n1"},
        }},
    }));
    let got = lines(&images_families(&[a, b], now));
    for want in [
        r#"bicsi_backing_image_files{disk="d1",node="n1",state="ready"} 2"#,
        r#"bicsi_backing_image_files{disk="d1",node="n1",state="failed"} 0"#,
        r#"bicsi_backing_image_files{disk="d2",node="n2",state="in-progress"} 1"#,
        r#"bicsi_backing_image_file_state_seconds{disk="d2",image="a",node="n2",state="in-progress"} 90"#,
        r#"bicsi_backing_image_size_bytes{image="a"} 4096"#,
        r#"bicsi_backing_image_size_bytes{image="b"} 0"#,
    ] {
        assert!(got.iter().any(|l| l == want), "{want} not in {got:#?}");
    }
    // Final states have no time-in-state series.
    assert!(
        !got.iter()
            .any(|l| l.starts_with("bicsi_backing_image_file_state_seconds") && l.contains("ready")),
        "{got:#?}"
    );
}

#[test]
fn volume_health_replicas_and_rebuilds() {
    let v: Volume = serde_json::from_value(serde_json::json!({
        "id": "v1", "createdAt": "",
        "spec": {"name": "v1", "capacityBytes": 1048576, "numberOfReplicas": 2,
                 "staleReplicaTimeoutMinutes": null, "fsType": null, "backingImage": null,
                 "parameters": {}, "capabilities": []},
        "replicas": [
            {"id": "r1", "nodeId": "n1", "diskId": "d1", "path": "/r1", "mode": "rw"},
            {"id": "r2", "nodeId": "n1", "diskId": "d2", "path": "/r2", "mode": "wo",
             "rebuild": {"source": "r1", "doneBytes": 256, "totalBytes": 1024, "started": 1}},
        ],
        "publication": {"nodeId": "n1", "readOnly": false,
                        "capability": {"access": "block", "mode": "singleNodeWriter"}},
    }))
    .unwrap();
    let got = lines(&volume_families(&[v]));
    for want in [
        r#"bicsi_volume_capacity_bytes{volume="v1"} 1048576"#,
        r#"bicsi_volume_health{health="degraded",volume="v1"} 1"#,
        r#"bicsi_volume_health{health="healthy",volume="v1"} 0"#,
        r#"bicsi_volume_attached{node="n1",volume="v1"} 1"#,
        r#"bicsi_volume_replicas{mode="rw",volume="v1"} 1"#,
        r#"bicsi_volume_replicas{mode="wo",volume="v1"} 1"#,
        r#"bicsi_volume_replicas{mode="err",volume="v1"} 0"#,
        r#"bicsi_volume_replicas_wanted{volume="v1"} 2"#,
        r#"bicsi_volume_rebuild_progress_ratio{replica="r2",source="r1",volume="v1"} 0.25"#,
    ] {
        assert!(got.iter().any(|l| l == want), "{want} not in {got:#?}");
    }
}

/// The value of the series `name{labels}` (labels as the encoder writes them) in a scrape.
fn value(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_transfer_dropped_without_ok_counts_as_failed() {
    let s = Sources::default();
    let before = render(&s);
    let ok = r#"bicsi_backing_image_transfers_total{kind="restore",result="ok"}"#;
    let failed = r#"bicsi_backing_image_transfers_total{kind="restore",result="failed"}"#;
    let bytes = r#"bicsi_backing_image_transfer_bytes_total{kind="restore"}"#;
    let prepared = r#"bicsi_backing_image_prepared_bytes_total{kind="restore"}"#;
    drop(Transfer::start(TransferKind::Restore));
    let mut t = Transfer::start(TransferKind::Restore);
    t.moved(100);
    t.ok(300);
    let after = render(&s);
    assert_eq!(value(&after, failed) - value(&before, failed), 1.0);
    assert_eq!(value(&after, ok) - value(&before, ok), 1.0);
    assert_eq!(value(&after, bytes) - value(&before, bytes), 100.0);
    assert_eq!(value(&after, prepared) - value(&before, prepared), 300.0);
    assert!(after.contains("# TYPE bicsi_backing_image_transfer_duration_seconds histogram"));
    assert!(after.contains("process_resident_memory_bytes "), "{after}");
    assert!(after.contains("process_open_fds "), "{after}");
    assert!(after.contains(&format!(
        "bicsi_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
}

#[test]
fn csi_calls_are_counted_and_stage_is_the_attach() {
    let s = Sources::default();
    let before = render(&s);
    csi_call("NodeStageVolume", tonic::Code::Ok, 0.2);
    csi_call("NodeStageVolume", tonic::Code::Unavailable, 0.01);
    let after = render(&s);
    let d = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(
        d(r#"bicsi_csi_requests_total{code="OK",method="NodeStageVolume"}"#),
        1.0
    );
    assert_eq!(
        d(r#"bicsi_csi_requests_total{code="UNAVAILABLE",method="NodeStageVolume"}"#),
        1.0
    );
    // Only the call that attached is an attach.
    assert_eq!(
        d(r#"bicsi_volume_attach_duration_seconds_count{operation="attach"}"#),
        1.0
    );
}

/// The rebuild counters count by mode and result, and their names pass promtool's lint when it
/// is installed (the integration tests' scrapes never hold a rebuild).
#[test]
fn rebuild_counters_count_and_pass_promtool() {
    rebuild_started("offline");
    rebuild_started("offline");
    rebuild_started("online");
    rebuild_finished("offline", true);
    rebuild_finished("offline", false);
    let text = render(&Sources::default());
    for want in [
        r#"bicsi_volume_rebuilds_started_total{mode="offline"} 2"#,
        r#"bicsi_volume_rebuilds_started_total{mode="online"} 1"#,
        r#"bicsi_volume_rebuilds_finished_total{mode="offline",result="ok"} 1"#,
        r#"bicsi_volume_rebuilds_finished_total{mode="offline",result="failed"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == want), "{want} not in\n{text}");
    }
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool is not installed: the lint is left to tests/metrics.rs");
        return;
    };
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
