//! Path: download + decompress + verify (issue 20). The sparse image of `--size` (1 MiB of
//! random data at every 4th MiB: 256 MiB of data in 1 GiB) compressed with gzip, xz and zstd
//! (untimed, before the runs), each served by a file server of its own; bicsi (a POST of a
//! BackingImage with the decompressed image's checksum, until its file is `ready`, on a fresh
//! `bicsi serve`) against `curl URL | <decompressor> > FILE && sha512sum FILE`, alternating
//! their order from run to run. The issue's target: bicsi ≤ 0.8× the reference.

use super::*;

/// The formats: (name, file suffix, compress command with `$1` = input and `$2` = output,
/// the reference's decompressor).
const FORMATS: [(&str, &str, &str, &str); 3] = [
    ("gzip", "gz", r#"gzip -c -6 "$1" > "$2""#, "gzip -d"),
    ("xz", "xz", r#"xz -c -6 -T2 "$1" > "$2""#, "xz -d"),
    (
        "zstd",
        "zst",
        r#"zstd -q -c -3 -T2 "$1" > "$2""#,
        "zstd -d -q",
    ),
];

pub(crate) async fn download_decompress(b: &Bench, checks: &mut Checks) -> Res<Vec<Row>> {
    let image = b
        .sparse
        .get(&b.size)
        .ok_or("no sparse image of --size was generated")?;
    let mut served = Vec::new();
    let mut formats = Vec::new();
    for (name, suffix, compress, decompress) in FORMATS {
        let tool = compress.split_whitespace().next().unwrap_or(name);
        if !have_tool(tool) {
            println!("download + decompress ({name}): skipped, no {tool} on the PATH");
            continue;
        }
        let path = b.work.join(format!("image.raw.{suffix}"));
        let started = Instant::now();
        run_script_output(compress, &[image.path.as_os_str(), path.as_os_str()]).await?;
        let len = std::fs::metadata(&path)?.len();
        println!(
            "image:    {} sparse, {name}-compressed to {} in {:.1} s (untimed)",
            fmt_bytes(b.size),
            fmt_bytes(len),
            started.elapsed().as_secs_f64()
        );
        served.push((format!("image.{suffix}"), path.clone(), len));
        formats.push((name, suffix, decompress, path));
    }
    let files = start_file_server(served).await?;
    let mut rows = Vec::new();
    for (name, suffix, decompress, path) in formats {
        let url = format!("{files}/image.{suffix}");
        let reference_name = format!("curl URL | {decompress} > FILE && sha512sum FILE");
        let script = format!(
            r#"curl -sS --fail --noproxy '*' "$2" | {decompress} > "$1" && sha512sum "$1""#
        );
        println!(
            "download + decompress ({name}): {} runs; bicsi = POST /v1/backingimages (with the \
             decompressed image's checksum) until state ready, fresh `bicsi serve` per run",
            b.runs
        );
        let (mut bicsi, mut reference_stats) = (Stats::default(), Stats::default());
        let mut peak: Option<u64> = None;
        for run in 0..b.runs {
            let mut notes = Vec::new();
            for k in 0..2 {
                if (run + k) % 2 == 0 {
                    let r = bicsi_download_of(b, run, &url, &image.sha512, b.size).await?;
                    bicsi.push(r.elapsed);
                    peak = peak.max(r.vm_hwm);
                    checks.check(
                        r.checksum == image.sha512,
                        format!(
                            "{name} run {}: bicsi's checksum {} != the image's {}",
                            run + 1,
                            r.checksum,
                            image.sha512
                        ),
                    );
                    notes.push(r.describe(b.size));
                } else {
                    let file = b.work.join("reference.out");
                    sync().await;
                    let out = run_script_output(&script, &[file.as_os_str(), url.as_ref()]).await;
                    let _ = std::fs::remove_file(&file);
                    let (elapsed, stdout) = out?;
                    let sha = stdout.split_whitespace().next().unwrap_or("").to_string();
                    reference_stats.push(elapsed);
                    checks.check(
                        sha == image.sha512,
                        format!("{name} run {}: `{reference_name}` gave {sha}", run + 1),
                    );
                    notes.push(format!("`{reference_name}` {:.2} s", elapsed.as_secs_f64()));
                }
            }
            println!("  run {}: {}", run + 1, notes.join("\n         "));
        }
        let _ = std::fs::remove_file(&path);
        rows.push(Row {
            path: format!("download + decompress ({name})"),
            bicsi,
            reference: reference_stats,
            ref_name: reference_name,
            peak_rss: peak,
            note: Some(format!(
                "{} sparse image ({} of data), {name}-compressed; target bicsi/ref ≤ 0.8",
                fmt_bytes(b.size),
                fmt_bytes(image.allocated)
            )),
        });
    }
    Ok(rows)
}
