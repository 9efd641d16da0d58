//! `kill -9` of bicsi while a client uploads an image: the upload fails with a message (it can
//! never go on, its client is gone), and a new upload of the same image succeeds.

use crate::checks::*;
use crate::images::sha512;
use crate::procs::Serve;

const MIB: usize = 1 << 20;

#[tokio::test]
async fn kill9_during_an_upload_fails_it_with_a_message_and_a_new_upload_succeeds() {
    let dir = tempfile::Builder::new()
        .prefix("bicsi-faults-")
        .tempdir()
        .unwrap();
    let raw = crate::kit::noise(6 * MIB, 2);
    let want = sha512(&raw);
    let disk = dir.path().join("disk");
    let mut b = Serve::start(dir.path(), vec![disk.clone()]).await;
    let watch = Watch::start(&b.http, &b.disks, &[("bi-up", &want)]);
    create_image(&b.http, "bi-up", "upload", serde_json::json!({})).await;

    // A client that sends 3 MiB, then nothing: bicsi is killed while it waits for the rest.
    let first = bytes::Bytes::copy_from_slice(&raw[..3 * MIB]);
    let body = futures::StreamExt::chain(
        futures::stream::iter([Ok::<_, std::io::Error>(first)]),
        futures::stream::pending(),
    );
    let put = tokio::spawn(
        reqwest::Client::new()
            .put(format!("{}/v1/backingimages/bi-up/file", b.http))
            .header("content-length", raw.len())
            .body(reqwest::Body::wrap_stream(body))
            .send(),
    );
    wait_part(&disk, 2 * MIB as u64, || b.log()).await;
    let v = image(&b.http, "bi-up").await.unwrap();
    assert_eq!(files(&v)[0].1, "in-progress", "{v}");
    b.kill9();
    assert!(put.await.unwrap().is_err(), "the cut upload must fail");
    assert!(
        backing_files(&disk).is_empty(),
        "{:?}",
        backing_files(&disk)
    );

    b.restart().await;
    // Failed at once, saying what to do: never in progress forever. ("If somehow all files
    // of a backing image become failed, and the first file is uploaded from user local env,
    // there is no way to recover it. Users need to delete this backing image then re-create a
    // new one by re-uploading the file.")
    let v = image(&b.http, "bi-up").await.unwrap();
    let (_, state, message) = files(&v).remove(0);
    assert_eq!(state, "failed", "{v}");
    assert!(message.contains("upload"), "{message}");
    let all = settle(&b.http, &b.disks, &[], || b.log()).await;
    let (_, state, message) = files(&all[0]).remove(0);
    assert_eq!(state, "failed", "{:?}", all[0]);
    assert!(
        message.contains("upload") && message.contains("again"),
        "{message}"
    );
    let (ok, out, err) = b.cli(&["delete", "backingimage", "bi-up"]);
    assert!(ok, "stdout: {out}\nstderr: {err}");

    let path = dir.path().join("upload.raw");
    std::fs::write(&path, &raw).unwrap();
    let (ok, out, err) = b.cli(&["image", "upload", "bi-up", path.to_str().unwrap()]);
    assert!(ok, "stdout: {out}\nstderr: {err}\n{}", b.log());
    let all = settle(&b.http, &b.disks, &[("bi-up", &want)], || b.log()).await;
    let v = all
        .iter()
        .find(|v| v["metadata"]["name"] == "bi-up")
        .unwrap();
    assert_eq!(files(v)[0].1, "ready", "{v}");
    watch.finish().await;
}
