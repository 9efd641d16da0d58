//! Backing images end to end: the seed's manifests applied with `bicsi apply`, downloads from a
//! real HTTP server in this process (127.0.0.1 only), checksums, the StorageClass parameters of
//! CreateVolume, and volumes that show the image's content.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tonic::Code;

use super::harness::*;
use super::images::*;
use bicsi::csi::pb;

fn file_states(v: &serde_json::Value) -> Vec<(String, String)> {
    v["status"]["diskFileStatusMap"]
        .as_object()
        .unwrap()
        .values()
        .map(|f| {
            (
                f["state"].as_str().unwrap().to_string(),
                f["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

const SEED_DOWNLOAD: &str = "apiVersion: longhorn.io/v1beta2
kind: BackingImage
metadata:
  name: bi-download
  namespace: longhorn-system
spec:
  sourceType: download
  sourceParameters:
    url: https://longhorn-backing-image.s3-us-west-1.amazonaws.com/parrot.raw
  checksum: 304f3ed30ca6878e9056ee6f1b02b328239f0d0c2c1272840998212f9734b196371560b3b939037e4f4c2884ce457c2cbc9f0621f4f5d1ca983983c8cdf8cd9a
";

/// The seed's manifest with only its URL (and the checksum of the file served there) changed.
fn seed_download(url: &str, checksum: &str) -> String {
    SEED_DOWNLOAD
        .replace("https://longhorn-backing-image.s3-us-west-1.amazonaws.com/parrot.raw", url)
        .replace(
            "304f3ed30ca6878e9056ee6f1b02b328239f0d0c2c1272840998212f9734b196371560b3b939037e4f4c2884ce457c2cbc9f0621f4f5d1ca983983c8cdf8cd9a",
            checksum,
        )
}

#[tokio::test]
async fn seed_download_manifest_becomes_a_ready_verified_file() {
    let b = Bicsi::start(1).await;
    let work = b.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = ext4_image(&work, 16);
    let want = sha512(&raw);
    let server = ImageServer::start([("parrot.raw".to_string(), raw.clone())].into()).await;
    let manifest = b.path("bi.yaml");
    std::fs::write(&manifest, seed_download(&server.url("parrot.raw"), &want)).unwrap();

    let (ok, out, err) = b.cli(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("backingimage/bi-download created"), "{out}");
    let v = wait_final(&b, "bi-download").await;
    assert_eq!(
        file_states(&v),
        [("ready".to_string(), String::new())],
        "{v}"
    );
    assert_eq!(v["status"]["checksum"], want);
    assert_eq!(v["status"]["format"], "raw");
    assert_eq!(v["status"]["size"], raw.len() as u64);
    assert_eq!(v["status"]["virtualSize"], raw.len() as u64);
    assert_eq!(v["metadata"]["namespace"], "longhorn-system");

    // The file on disk is what `shasum -a 512` checks, beside its metadata; nothing in tmp/.
    let uuid = v["status"]["uuid"].as_str().unwrap();
    let file = b.disks[0].join(format!("backing-images/bi-download-{uuid}/backing"));
    let sum = Command::new("sha512sum").arg(&file).output().unwrap();
    assert!(String::from_utf8_lossy(&sum.stdout).starts_with(&want));
    assert!(file.with_file_name("backing.cfg").is_file());
    // And its chunk manifest, built from the bytes that hashed to the checksum.
    let chunks = std::fs::read(file.with_file_name("backing.manifest")).unwrap();
    let chunks = bicsi::sync::Manifest::parse(&chunks).unwrap();
    assert_eq!(chunks.sha512, want);
    assert_eq!(chunks.size, raw.len() as u64);
    assert!(files_under(&b.disks[0].join("tmp")).is_empty());

    let (ok, out, _) = b.cli(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(
        ok && out.contains("backingimage/bi-download unchanged"),
        "{out}"
    );
    let (ok, table, _) = b.cli(&["get", "backingimages"]);
    assert!(ok);
    let row = table
        .lines()
        .find(|l| l.starts_with("bi-download"))
        .expect("row");
    assert!(
        row.contains("download") && row.contains("ready 100%") && row.contains(&want[..16]),
        "{row}"
    );
    let (ok, yaml, _) = b.cli(&["get", "backingimage", "bi-download", "-o", "yaml"]);
    assert!(
        ok && yaml.contains("sourceType: download") && yaml.contains(&want),
        "{yaml}"
    );
    let (ok, json, _) = b.cli(&["get", "backingimage", "bi-download", "-o", "json"]);
    assert!(ok);
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["status"]["checksum"], want);

    // The same name with another spec is refused and names what differs.
    std::fs::write(&manifest, seed_download(&server.url("other.raw"), &want)).unwrap();
    let (ok, _, err) = b.cli(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(!ok && err.contains("sourceParameters"), "{err}");

    // The disk's backing image manager runs while the disk holds a file, and stops after.
    let (_, disks, _) = b.cli(&["get", "disks"]);
    assert!(disks.lines().nth(1).unwrap().contains("running"), "{disks}");
    let (ok, out, err) = b.cli(&["delete", "backingimage", "bi-download"]);
    assert!(ok, "{out}{err}");
    assert!(get_image(&b, "bi-download").await.is_none());
    assert!(!file.exists(), "files removed with the image");
    let (_, disks, _) = b.cli(&["get", "disks"]);
    assert!(
        !disks.lines().nth(1).unwrap().contains("running"),
        "{disks}"
    );
}

#[tokio::test]
async fn checksums_urls_and_formats() {
    let b = Bicsi::start(1).await;
    let work = b.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = ext4_image(&work, 8);
    let qcow = to_qcow2(&work, &raw);
    let server = ImageServer::start(
        [
            ("a.raw".to_string(), raw.clone()),
            ("a.qcow2".to_string(), qcow.clone()),
        ]
        .into(),
    )
    .await;
    let apply = |name: &str, url: &str, checksum: &str| {
        let yaml = format!(
            "apiVersion: longhorn.io/v1beta2\nkind: BackingImage\nmetadata:\n  name: {name}\nspec:\n  sourceType: download\n  sourceParameters:\n    url: {url}\n  checksum: \"{checksum}\"\n"
        );
        let f = b.path(&format!("{name}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        b.cli(&["apply", "-f", f.to_str().unwrap()])
    };

    // Wrong checksum: the file fails with both values and leaves nothing behind.
    let wrong = "0".repeat(128);
    assert!(apply("wrong-sum", &server.url("a.raw"), &wrong).0);
    let v = wait_final(&b, "wrong-sum").await;
    let (state, msg) = file_states(&v).remove(0);
    assert_eq!(state, "failed");
    assert!(msg.contains(&wrong) && msg.contains(&sha512(&raw)), "{msg}");
    // No checksum: the first file's becomes the image's.
    assert!(apply("no-sum", &server.url("a.raw"), "").0);
    let v = wait_final(&b, "no-sum").await;
    assert_eq!(v["status"]["checksum"], sha512(&raw));
    // A malformed checksum is refused at creation.
    let (ok, _, err) = apply("bad-sum", &server.url("a.raw"), "abc123");
    assert!(!ok && err.contains("128 hexadecimal"), "{err}");
    assert!(get_image(&b, "bad-sum").await.is_none());
    // 404 fails with the status; a redirect is followed.
    assert!(apply("missing", &server.url("nope.raw"), "").0);
    let (state, msg) = file_states(&wait_final(&b, "missing").await).remove(0);
    assert_eq!(state, "failed");
    assert!(msg.contains("404"), "{msg}");
    assert!(apply("redirected", &format!("{}/redirect/a.raw", server.base), "").0);
    assert_eq!(
        file_states(&wait_final(&b, "redirected").await)[0].0,
        "ready"
    );
    // Other schemes are refused at creation.
    let (ok, _, err) = apply("ftp", "ftp://127.0.0.1/a.raw", "");
    assert!(!ok && err.contains("only http and https"), "{err}");
    // A qcow2 image: format and virtual size from its header; size is the file's.
    assert!(apply("q", &server.url("a.qcow2"), &sha512(&qcow)).0);
    let v = wait_final(&b, "q").await;
    assert_eq!(file_states(&v)[0].0, "ready");
    assert_eq!(v["status"]["format"], "qcow2");
    assert_eq!(v["status"]["virtualSize"], 8 << 20);
    assert_eq!(v["status"]["size"], qcow.len() as u64);
    // Bad names are refused.
    let (ok, _, err) = apply("Bad_Name", &server.url("a.raw"), "");
    assert!(!ok && err.contains("DNS-1123"), "{err}");

    assert!(
        files_under(&b.disks[0].join("tmp")).is_empty(),
        "no temp file left"
    );
    let failed_dirs: Vec<_> = files_under(&b.disks[0].join("backing-images"))
        .into_iter()
        .filter(|p| {
            p.to_string_lossy().contains("wrong-sum") || p.to_string_lossy().contains("missing")
        })
        .collect();
    assert!(
        failed_dirs.is_empty(),
        "failed files are never in place: {failed_dirs:?}"
    );
}

pub(super) fn create_with(
    name: &str,
    bytes: i64,
    params: &[(String, String)],
    cap: pb::VolumeCapability,
) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: (bytes > 0).then_some(pb::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        parameters: params.iter().cloned().collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn create_volume_with_the_seed_storage_class_parameters() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let work = b.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = ext4_image(&work, 16);
    let server = ImageServer::start([("img.raw".to_string(), raw.clone())].into()).await;
    let params = seed_sc_params(&server.url("img.raw"), "bi-sc");

    // The image does not exist: CreateVolume creates it, then the volume.
    let v = create_retrying(&mut c, create_with("pvc-1", 64 * MIB, &params, mount_cap()))
        .await
        .unwrap();
    assert_eq!(v.capacity_bytes, 64 * MIB);
    assert!(
        get_image(&b, "bi-sc").await.is_some(),
        "image created by CreateVolume"
    );
    let img = wait_final(&b, "bi-sc").await;
    assert_eq!(img["status"]["checksum"], sha512(&raw));
    // Again: the same volume.
    let again = create_retrying(&mut c, create_with("pvc-1", 64 * MIB, &params, mount_cap()))
        .await
        .unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    // Without capacity: the image's virtual size (16 MiB).
    let v2 = create_retrying(&mut c, create_with("pvc-2", 0, &params, mount_cap()))
        .await
        .unwrap();
    assert_eq!(v2.capacity_bytes, 16 * MIB);
    // Smaller than the image: OutOfRange.
    assert_code(
        c.controller
            .create_volume(create_with("pvc-small", 8 * MIB, &params, mount_cap()))
            .await,
        Code::OutOfRange,
        "virtual size",
    );
    // Existing image, parameters that differ: InvalidArgument naming the field.
    let mut other_url = params.clone();
    other_url[4].1 = format!("{{\"url\": \"{}\"}}", server.url("other.raw"));
    assert_code(
        c.controller
            .create_volume(create_with("pvc-3", 64 * MIB, &other_url, mount_cap()))
            .await,
        Code::InvalidArgument,
        "backingImageDataSourceParameters",
    );
    let mut other_type = params.clone();
    other_type[3].1 = "export-from-volume".into();
    other_type[4].1 = r#"{"volume-name": "v", "export-type": "raw"}"#.into();
    assert_code(
        c.controller
            .create_volume(create_with("pvc-3", 64 * MIB, &other_type, mount_cap()))
            .await,
        Code::InvalidArgument,
        "backingImageDataSourceType",
    );
    let mut other_sum = params.clone();
    other_sum.push(("backingImageChecksum".into(), "a".repeat(128)));
    assert_code(
        c.controller
            .create_volume(create_with("pvc-3", 64 * MIB, &other_sum, mount_cap()))
            .await,
        Code::InvalidArgument,
        "backingImageChecksum",
    );
    // Only the name of an existing image: used as it is.
    let by_name = vec![("backingImage".to_string(), "bi-sc".to_string())];
    create_retrying(
        &mut c,
        create_with("pvc-4", 32 * MIB, &by_name, mount_cap()),
    )
    .await
    .unwrap();
    // A missing image without a source: NotFound naming it.
    let missing = vec![("backingImage".to_string(), "no-such-image".to_string())];
    assert_code(
        c.controller
            .create_volume(create_with("pvc-5", 32 * MIB, &missing, mount_cap()))
            .await,
        Code::NotFound,
        "no-such-image",
    );
    // Upload through a StorageClass: refused with how to upload instead.
    let upload = vec![
        ("backingImage".to_string(), "up".to_string()),
        (
            "backingImageDataSourceType".to_string(),
            "upload".to_string(),
        ),
    ];
    assert_code(
        c.controller
            .create_volume(create_with("pvc-6", 32 * MIB, &upload, mount_cap()))
            .await,
        Code::InvalidArgument,
        "upload it first",
    );
    // Malformed JSON, unknown source type, missing url / volume-name / export-type.
    let bad: &[(&str, &str, &str)] = &[
        ("download", "{url: nope}", "not valid JSON"),
        ("fetch", "{}", "unknown backing image source type"),
        ("download", "{}", "\"url\""),
        (
            "export-from-volume",
            r#"{"export-type": "raw"}"#,
            "\"volume-name\"",
        ),
        (
            "export-from-volume",
            r#"{"volume-name": "v"}"#,
            "\"export-type\"",
        ),
    ];
    for (ty, json, want) in bad {
        let p = vec![
            ("backingImage".to_string(), "fresh".to_string()),
            ("backingImageDataSourceType".to_string(), ty.to_string()),
            (
                "backingImageDataSourceParameters".to_string(),
                json.to_string(),
            ),
        ];
        assert_code(
            c.controller
                .create_volume(create_with("pvc-bad", 32 * MIB, &p, mount_cap()))
                .await,
            Code::InvalidArgument,
            want,
        );
    }
    assert!(
        get_image(&b, "fresh").await.is_none(),
        "refused requests create no image"
    );

    // The image cannot be deleted while volumes use it; the error lists them.
    let (ok, _, err) = b.cli(&["delete", "backingimage", "bi-sc"]);
    assert!(
        !ok && err.contains("pvc-1") && err.contains("pvc-2") && err.contains("pvc-4"),
        "{err}"
    );
    for id in ["pvc-1", "pvc-2", "pvc-4"] {
        c.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let (ok, out, err) = b.cli(&["delete", "backingimage", "bi-sc"]);
    assert!(ok, "{out}{err}");
    assert!(files_under(&b.disks[0].join("backing-images")).is_empty());
}

#[tokio::test]
async fn storage_classes_apply_and_name_the_parameters() {
    let b = Bicsi::start(1).await;
    let f = b.path("sc.yaml");
    std::fs::write(
        &f,
        "kind: StorageClass
apiVersion: storage.k8s.io/v1
metadata:
  name: longhorn-backing-image-example
provisioner: driver.longhorn.io
allowVolumeExpansion: true
reclaimPolicy: Delete
volumeBindingMode: Immediate
parameters:
  numberOfReplicas: \"1\"
  staleReplicaTimeout: \"2880\"
---
kind: StorageClass
apiVersion: storage.k8s.io/v1
metadata:
  name: someone-else
provisioner: other.csi.io
parameters: {}
---
kind: ConfigMap
apiVersion: v1
metadata:
  name: cm
",
    )
    .unwrap();
    let (ok, out, err) = b.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert!(!ok, "two of three documents are refused");
    assert!(
        out.contains("storageclass/longhorn-backing-image-example created"),
        "{out}"
    );
    assert!(err.contains("provisioner \"other.csi.io\""), "{err}");
    assert!(err.contains("kind \"ConfigMap\""), "{err}");
    let (ok, list, _) = b.cli(&["get", "storageclasses"]);
    assert!(ok && list.contains("numberOfReplicas=1"), "{list}");
    let (ok, out, err) = b.cli(&[
        "volume",
        "create",
        "from-sc",
        "--size",
        "16Mi",
        "--storage-class",
        "longhorn-backing-image-example",
    ]);
    assert!(ok, "{out}{err}");
    let mut c = b.client().await;
    let vol = c
        .controller
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: "from-sc".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // One replica (from the StorageClass), so the volume is not degraded on one disk.
    assert_eq!(
        vol.status.unwrap().volume_condition.unwrap().message,
        "healthy"
    );
    let (ok, _, err) = b.cli(&[
        "volume",
        "create",
        "x",
        "--size",
        "16Mi",
        "--storage-class",
        "nope",
    ]);
    assert!(
        !ok && err.contains("StorageClass \"nope\" not found"),
        "{err}"
    );
}

pub(super) async fn attach(
    c: &mut bicsi::client::CsiClient,
    b: &Bicsi,
    id: &str,
    cap: pb::VolumeCapability,
) -> (PathBuf, PathBuf) {
    let (st, tg) = (b.path(&format!("st-{id}")), b.path(&format!("tg-{id}")));
    // The image file may still be coming to a replica's disk: the calls say so and are retried,
    // as the CSI sidecars do.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c
            .controller
            .controller_publish_volume(cpublish_req(id, cap.clone(), false))
            .await
        {
            Ok(_) => break,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                assert!(s.message().contains("being prepared"), "{}", s.message());
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("publish {id}: {s:?}"),
        }
    }
    loop {
        match c
            .node
            .node_stage_volume(stage_req(id, &st, cap.clone()))
            .await
        {
            Ok(_) => break,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("stage {id}: {s:?}"),
        }
    }
    c.node
        .node_publish_volume(publish_req(id, &st, &tg, cap, false))
        .await
        .unwrap();
    (st, tg)
}

pub(super) async fn detach(c: &mut bicsi::client::CsiClient, id: &str, st: &Path, tg: &Path) {
    c.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: tg.display().to_string(),
        })
        .await
        .unwrap();
    c.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: st.display().to_string(),
        })
        .await
        .unwrap();
    c.controller
        .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: id.into(),
            node_id: NODE_ID.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn volumes_show_the_image_content_raw_qcow2_and_block() {
    let Some((b, mut c)) =
        Bicsi::start_as_root("volumes_show_the_image_content_raw_qcow2_and_block", 2).await
    else {
        return;
    };
    let work = b.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = ext4_image(&work, 32);
    let qcow = to_qcow2(&work, &raw);
    let server = ImageServer::start(
        [
            ("fs.raw".to_string(), raw.clone()),
            ("fs.qcow2".to_string(), qcow),
        ]
        .into(),
    )
    .await;
    for (image, file) in [("img-raw", "fs.raw"), ("img-qcow2", "fs.qcow2")] {
        let params = seed_sc_params(&server.url(file), image);
        // Two replicas on two disks: the second disk gets the file copied at attach.
        let id = format!("vol-{image}");
        create_retrying(&mut c, create_with(&id, 96 * MIB, &params, mount_cap()))
            .await
            .unwrap();
        let (st, tg) = attach(&mut c, &b, &id, mount_cap()).await;
        assert_eq!(
            std::fs::read_to_string(tg.join("hello.txt")).unwrap(),
            "hello from the backing image\n",
            "{image}: the image's filesystem is mounted, not formatted"
        );
        let st_fs = nix::sys::statvfs::statvfs(&tg).unwrap();
        let total = st_fs.blocks() as u64 * st_fs.fragment_size() as u64;
        assert!(
            total > 64 << 20,
            "{image}: filesystem grown to the volume size, got {total}"
        );
        std::fs::write(tg.join("mine.txt"), b"written through the volume").unwrap();
        detach(&mut c, &id, &st, &tg).await;
        // Both disks now hold the image file once, and it is never written by the volume.
        let img = get_image(&b, image).await.unwrap();
        assert_eq!(
            file_states(&img)
                .iter()
                .filter(|(s, _)| s == "ready")
                .count(),
            2,
            "{img}"
        );
        let uuid = img["status"]["uuid"].as_str().unwrap();
        for d in &b.disks {
            let f = d.join(format!("backing-images/{image}-{uuid}/backing"));
            let sum = Command::new("sha512sum").arg(&f).output().unwrap();
            assert!(
                String::from_utf8_lossy(&sum.stdout)
                    .starts_with(img["status"]["checksum"].as_str().unwrap()),
                "the shared file is unchanged on {}",
                d.display()
            );
        }
        let (st, tg) = attach(&mut c, &b, &id, mount_cap()).await;
        assert_eq!(
            std::fs::read(tg.join("mine.txt")).unwrap(),
            b"written through the volume"
        );
        detach(&mut c, &id, &st, &tg).await;
    }
    // Block mode reads back the image's bytes, and a second volume reuses the files.
    let params = seed_sc_params(&server.url("fs.raw"), "img-raw");
    create_retrying(&mut c, create_with("blk", 32 * MIB, &params, block_cap()))
        .await
        .unwrap();
    let (st, tg) = attach(&mut c, &b, "blk", block_cap()).await;
    let mut head = vec![0u8; 1 << 20];
    std::io::Read::read_exact(&mut std::fs::File::open(&tg).unwrap(), &mut head).unwrap();
    assert!(
        head == raw[..1 << 20],
        "block volume shows the image's bytes"
    );
    detach(&mut c, "blk", &st, &tg).await;
    for d in &b.disks {
        let n = files_under(&d.join("backing-images"))
            .iter()
            .filter(|p| p.file_name().is_some_and(|n| n == "backing"))
            .count();
        assert_eq!(
            n,
            2,
            "one file per image on {} (img-raw, img-qcow2)",
            d.display()
        );
    }
}

#[tokio::test]
async fn seed_export_manifest_exports_a_detached_volume() {
    let Some((b, mut c)) =
        Bicsi::start_as_root("seed_export_manifest_exports_a_detached_volume", 1).await
    else {
        return;
    };
    c.controller
        .create_volume(create_req(
            "vol-export-src",
            64 * MIB,
            &[("numberOfReplicas", "1")],
        ))
        .await
        .unwrap();
    let (st, tg) = attach(&mut c, &b, "vol-export-src", mount_cap()).await;
    std::fs::write(tg.join("exported.txt"), b"from the source volume").unwrap();
    detach(&mut c, "vol-export-src", &st, &tg).await;

    let f = b.path("export.yaml");
    std::fs::write(
        &f,
        "apiVersion: longhorn.io/v1beta2
kind: BackingImage
metadata:
  name: bi-export
  namespace: longhorn-system
spec:
  sourceType: export-from-volume
  sourceParameters:
    volume-name: vol-export-src
    export-type: qcow2
",
    )
    .unwrap();
    let (ok, out, err) = b.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let v = wait_final(&b, "bi-export").await;
    assert_eq!(file_states(&v)[0].0, "ready", "{v}");
    assert_eq!(v["status"]["format"], "qcow2");
    let uuid = v["status"]["uuid"].as_str().unwrap();
    let file = b.disks[0].join(format!("backing-images/bi-export-{uuid}/backing"));
    let check = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    let params = vec![
        ("backingImage".to_string(), "bi-export".to_string()),
        ("numberOfReplicas".to_string(), "1".to_string()),
    ];
    create_retrying(
        &mut c,
        create_with("from-export", 64 * MIB, &params, mount_cap()),
    )
    .await
    .unwrap();
    let (st, tg) = attach(&mut c, &b, "from-export", mount_cap()).await;
    assert_eq!(
        std::fs::read(tg.join("exported.txt")).unwrap(),
        b"from the source volume"
    );
    detach(&mut c, "from-export", &st, &tg).await;
}

/// The seed's StorageClass parameters with one replica (one disk here).
fn one_replica_params(url: &str, image: &str) -> Vec<(String, String)> {
    let mut p = seed_sc_params(url, image);
    p[0].1 = "1".into();
    p
}

/// ControllerPublishVolume once, from the test's node.
async fn publish_once(
    c: &mut bicsi::client::CsiClient,
    id: &str,
) -> Result<tonic::Response<pb::ControllerPublishVolumeResponse>, tonic::Status> {
    c.controller
        .controller_publish_volume(cpublish_req(id, mount_cap(), false))
        .await
}

#[tokio::test]
async fn create_volume_answers_at_once_while_the_image_downloads_and_attach_waits() {
    let Some((b, mut c)) = Bicsi::start_as_root(
        "create_volume_answers_at_once_while_the_image_downloads_and_attach_waits",
        1,
    )
    .await
    else {
        return;
    };
    let work = b.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = ext4_image(&work, 24);
    let qcow = to_qcow2(&work, &raw);
    let server = ImageServer::start(
        [
            ("slow.raw".to_string(), raw.clone()),
            ("slow.qcow2".to_string(), qcow.clone()),
        ]
        .into(),
    )
    .await;
    // Minutes at this rate: both images are still downloading while the test looks, past the
    // 10 s ControllerPublishVolume waits in the call for a volume's files.
    server.set_rate(32 * 1024);
    for (image, file) in [("slow-raw", "slow.raw"), ("slow-qcow2", "slow.qcow2")] {
        let id = format!("vol-{image}");
        let params = one_replica_params(&server.url(file), image);
        let started = Instant::now();
        let v = c
            .controller
            .create_volume(create_with(&id, 0, &params, mount_cap()))
            .await
            .unwrap_or_else(|s| panic!("CreateVolume {id}: {s:?}"))
            .into_inner()
            .volume
            .unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "{image}: took {took:?}");
        assert_eq!(v.capacity_bytes, 24 * MIB, "{image}: the virtual size");
        let img = get_image(&b, image).await.unwrap();
        assert!(
            file_states(&img).iter().all(|(s, _)| s != "ready"),
            "{image} still downloading: {img}"
        );
        assert_eq!(img["status"]["expectedVirtualSize"], 24 * MIB, "{img}");
        // Again: the same volume, answered from what was learned.
        let again = c
            .controller
            .create_volume(create_with(&id, 0, &params, mount_cap()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(again.volume_id, v.volume_id);
        // Attach is where the waiting is: Unavailable with the progress.
        let s = publish_once(&mut c, &id).await.unwrap_err();
        assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
        assert!(
            s.message().contains("being prepared") && s.message().contains('%'),
            "{}",
            s.message()
        );
    }
    server.set_rate(0);
    for image in ["slow-raw", "slow-qcow2"] {
        let id = format!("vol-{image}");
        let (st, tg) = attach(&mut c, &b, &id, mount_cap()).await;
        assert_eq!(
            std::fs::read_to_string(tg.join("hello.txt")).unwrap(),
            "hello from the backing image\n",
            "{image}"
        );
        detach(&mut c, &id, &st, &tg).await;
        let img = wait_final(&b, image).await;
        assert_eq!(img["status"]["virtualSize"], 24 * MIB, "{img}");
    }
}

#[tokio::test]
async fn a_file_whose_virtual_size_differs_from_its_head_fails_the_image_and_its_volumes() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let work = b.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = ext4_image(&work, 16);
    let q = work.join("head.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&q)
        .arg("64M")
        .output()
        .unwrap();
    assert!(out.status.success());
    let head = std::fs::read(&q).unwrap();
    let server = ImageServer::start(
        [
            ("head.qcow2".to_string(), head),
            ("body.raw".to_string(), raw),
        ]
        .into(),
    )
    .await;
    let url = format!("{}/liar/head.qcow2/body.raw", server.base);
    let params = one_replica_params(&url, "bi-liar");
    let v = c
        .controller
        .create_volume(create_with("vol-liar", 0, &params, mount_cap()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 64 * MIB, "the size the head announced");
    let img = wait_final(&b, "bi-liar").await;
    let (state, msg) = file_states(&img).remove(0);
    assert_eq!(state, "failed", "{img}");
    let (want, got) = ((64 * MIB).to_string(), (16 * MIB).to_string());
    assert!(
        msg.contains("virtual size mismatch") && msg.contains(&want) && msg.contains(&got),
        "{msg}"
    );
    assert!(
        img["status"]["message"].as_str().unwrap().contains(&got),
        "{img}"
    );
    assert_code(
        publish_once(&mut c, "vol-liar").await,
        Code::FailedPrecondition,
        "backing image \"bi-liar\"",
    );
    let (_, yaml, _) = b.cli(&["get", "backingimage", "bi-liar", "-o", "yaml"]);
    assert!(yaml.contains("virtual size mismatch"), "{yaml}");
}

#[tokio::test]
async fn a_source_that_gives_no_size_answers_unavailable_saying_why() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let work = b.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = ext4_image(&work, 8);
    let mut gz = vec![0x1f, 0x8b, 8, 0];
    gz.extend(std::iter::repeat_n(7u8, 100_000));
    let server = ImageServer::start(
        [
            ("plain.raw".to_string(), raw.clone()),
            ("disk.raw.gz".to_string(), gz),
        ]
        .into(),
    )
    .await;
    server.set_rate(64 * 1024);
    // RAW without Content-Length: nothing says the size until the whole file is in.
    let url = format!("{}/nolength/plain.raw", server.base);
    let params = one_replica_params(&url, "bi-nolength");
    assert_code(
        c.controller
            .create_volume(create_with("vol-nolength", 0, &params, mount_cap()))
            .await,
        Code::Unavailable,
        "neither the file's length",
    );
    // A compressed file is stored decompressed (issue 20): with no qcow2 header in its first
    // bytes, its size is known only when the download is done.
    let params_gz = one_replica_params(&server.url("disk.raw.gz"), "bi-gz");
    assert_code(
        c.controller
            .create_volume(create_with("vol-gz", 0, &params_gz, mount_cap()))
            .await,
        Code::Unavailable,
        "gzip-compressed",
    );
    // An image that waits for its upload has no size yet either.
    let f = b.path("up.yaml");
    std::fs::write(
        &f,
        "apiVersion: longhorn.io/v1beta2\nkind: BackingImage\nmetadata:\n  name: bi-up\nspec:\n  sourceType: upload\n",
    )
    .unwrap();
    let (ok, out, err) = b.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let by_name = vec![
        ("backingImage".to_string(), "bi-up".to_string()),
        ("numberOfReplicas".to_string(), "1".to_string()),
    ];
    assert_code(
        c.controller
            .create_volume(create_with("vol-up", 0, &by_name, mount_cap()))
            .await,
        Code::Unavailable,
        "waits for its upload",
    );
    // Once the file is ready its size is known.
    server.set_rate(0);
    let img = wait_final(&b, "bi-nolength").await;
    assert_eq!(file_states(&img)[0].0, "ready", "{img}");
    let v = c
        .controller
        .create_volume(create_with("vol-nolength", 0, &params, mount_cap()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 8 * MIB);
}

/// A snapshot taken right after CreateVolume, while the image still downloads (what csi-sanity
/// does with volumes from a backing image): the call waits for the image's file instead of
/// answering Unavailable at once, and the snapshot restores to the image's content.
#[tokio::test]
async fn a_snapshot_right_after_create_waits_for_the_image_and_is_taken() {
    let Some((b, mut c)) = Bicsi::start_as_root(
        "a_snapshot_right_after_create_waits_for_the_image_and_is_taken",
        1,
    )
    .await
    else {
        return;
    };
    let work = b.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = ext4_image(&work, 8);
    let server = ImageServer::start([("snap.raw".to_string(), raw)].into()).await;
    // About 4 s for 8 MiB: still downloading when the snapshot is asked for.
    server.set_rate(2 << 20);
    let params = one_replica_params(&server.url("snap.raw"), "bi-snap-early");
    let v = c
        .controller
        .create_volume(create_with("vol-snap-early", 0, &params, mount_cap()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let img = get_image(&b, "bi-snap-early").await.unwrap();
    assert!(
        file_states(&img).iter().all(|(s, _)| s != "ready"),
        "still downloading: {img}"
    );
    let started = Instant::now();
    let snap = c
        .controller
        .create_snapshot(pb::CreateSnapshotRequest {
            name: "snap-early".into(),
            source_volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("CreateSnapshot while the image downloads: {s:?}"))
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use, "{snap:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // The snapshot holds the image's content.
    let restored = c
        .controller
        .create_volume(pb::CreateVolumeRequest {
            volume_content_source: Some(pb::VolumeContentSource {
                r#type: Some(pb::volume_content_source::Type::Snapshot(
                    pb::volume_content_source::SnapshotSource {
                        snapshot_id: snap.snapshot_id.clone(),
                    },
                )),
            }),
            ..create_with("vol-snap-restored", 0, &params, mount_cap())
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (st, tg) = attach(&mut c, &b, &restored.volume_id, mount_cap()).await;
    assert_eq!(
        std::fs::read_to_string(tg.join("hello.txt")).unwrap(),
        "hello from the backing image\n"
    );
    detach(&mut c, &restored.volume_id, &st, &tg).await;
}

/// `tool -c FILE` (gzip, xz, zstd, bzip2): compressed the way distributions publish images.
fn compress_with(tool: &str, dir: &Path, data: &[u8]) -> Vec<u8> {
    let f = dir.join(format!("to-{tool}"));
    std::fs::write(&f, data).unwrap();
    let out = Command::new(tool).arg("-c").arg(&f).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[tokio::test]
async fn compressed_sources_are_stored_decompressed_and_checked_by_source_checksum() {
    let b = Bicsi::start(1).await;
    let mut c = b.client().await;
    let work = b.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = ext4_image(&work, 8);
    let qcow = to_qcow2(&work, &raw);
    let mut files = std::collections::HashMap::new();
    for tool in ["gzip", "xz", "zstd", "bzip2"] {
        files.insert(format!("a.raw.{tool}"), compress_with(tool, &work, &raw));
        files.insert(format!("a.qcow2.{tool}"), compress_with(tool, &work, &qcow));
    }
    let server = ImageServer::start(files.clone()).await;
    let sha256 = |d: &[u8]| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(d));
    let apply = |name: &str, url: &str, source_checksum: &str, checksum: &str| {
        let yaml = format!(
            "apiVersion: longhorn.io/v1beta2\nkind: BackingImage\nmetadata:\n  name: {name}\nspec:\n  sourceType: download\n  sourceParameters:\n    url: {url}\n    sourceChecksum: \"{source_checksum}\"\n  checksum: \"{checksum}\"\n"
        );
        let f = b.path(&format!("{name}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        b.cli(&["apply", "-f", f.to_str().unwrap()])
    };

    // Each compression of a RAW and a qcow2 image: stored decompressed, the image's checksum
    // is the SHA-512 of the decompressed file, the source checksum of the bytes served.
    for tool in ["gzip", "xz", "zstd", "bzip2"] {
        for (kind, image) in [("raw", &raw), ("qcow2", &qcow)] {
            let name = format!("{kind}-{tool}");
            let file = format!("a.{kind}.{tool}");
            let (ok, _, err) = apply(
                &name,
                &server.url(&file),
                &format!("sha256:{}", sha256(&files[&file])),
                &sha512(image),
            );
            assert!(ok, "{err}");
            let v = wait_final(&b, &name).await;
            assert_eq!(file_states(&v)[0].0, "ready", "{name}: {v}");
            assert_eq!(v["status"]["checksum"], sha512(image), "{name}");
            assert_eq!(v["status"]["format"], kind, "{name}");
            assert_eq!(v["status"]["virtualSize"], 8 << 20, "{name}");
            assert_eq!(v["status"]["size"], image.len() as u64, "{name}");
        }
    }
    let uuid = get_image(&b, "raw-xz").await.unwrap()["status"]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let stored = b.disks[0].join(format!("backing-images/raw-xz-{uuid}/backing"));
    let sum = Command::new("sha512sum").arg(&stored).output().unwrap();
    assert!(String::from_utf8_lossy(&sum.stdout).starts_with(&sha512(&raw)));
    let blocks = nix::sys::stat::stat(&stored).unwrap().st_blocks as u64 * 512;
    assert!(
        blocks < raw.len() as u64,
        "the ext4 image's zeros stay holes: {blocks} bytes allocated of {}",
        raw.len()
    );

    // A wrong source checksum fails the file naming both; a malformed one is refused at once.
    let wrong = format!("sha256:{}", "0".repeat(64));
    assert!(apply("wrong-src", &server.url("a.raw.xz"), &wrong, "").0);
    let (state, msg) = file_states(&wait_final(&b, "wrong-src").await).remove(0);
    assert_eq!(state, "failed");
    assert!(
        msg.contains(&wrong) && msg.contains(&sha256(&files["a.raw.xz"])),
        "{msg}"
    );
    let (ok, _, err) = apply("bad-src", &server.url("a.raw.xz"), "md5:abc", "");
    assert!(!ok && err.contains("sha256 or sha512"), "{err}");
    assert!(get_image(&b, "bad-src").await.is_none());
    // The private-URL parameters are checked at creation too (paths, never contents).
    let yaml = format!(
        "apiVersion: longhorn.io/v1beta2\nkind: BackingImage\nmetadata:\n  name: bad-auth\nspec:\n  sourceType: download\n  sourceParameters:\n    url: {}\n    usernameFile: /etc/user\n",
        server.url("a.raw.xz")
    );
    let f = b.path("bad-auth.yaml");
    std::fs::write(&f, yaml).unwrap();
    let (ok, _, err) = b.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert!(!ok && err.contains("passwordFile"), "{err}");

    // The StorageClass path takes the same parameter; the volume's size comes from the head
    // of the compressed qcow2 before the download is done.
    let mut params = seed_sc_params(&server.url("a.qcow2.zstd"), "sc-zstd");
    params[4].1 = format!(
        "{{\"url\": \"{}\", \"sourceChecksum\": \"sha512:{}\"}}",
        server.url("a.qcow2.zstd"),
        sha512(&files["a.qcow2.zstd"])
    );
    let v = create_retrying(&mut c, create_with("pvc-zstd", 0, &params, mount_cap()))
        .await
        .unwrap();
    assert_eq!(v.capacity_bytes, 8 * MIB);
    let img = wait_final(&b, "sc-zstd").await;
    assert_eq!(img["status"]["checksum"], sha512(&qcow));

    assert!(
        files_under(&b.disks[0].join("tmp")).is_empty(),
        "no temp file left"
    );
}
