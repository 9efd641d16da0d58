//! fio, as the I/O paths run it: one job with direct I/O through libaio on a block device, its
//! JSON answer read for the side (read or write) the job does. The paths choose the jobs and
//! what to make of the numbers; this module must not print or judge them.

use super::*;

/// One fio job: `--rw`, `--bs`, `--iodepth` over `size` bytes; with `runtime`, time-based for
/// that many seconds instead of until `size` is moved.
pub(crate) struct FioJob<'a> {
    pub rw: &'a str,
    pub bs: &'a str,
    pub iodepth: u32,
    pub size: u64,
    pub runtime: Option<u64>,
}

impl FioJob<'_> {
    /// The fio command line of the job without `--filename`, as the paths print it.
    pub(crate) fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--name=bench".into(),
            format!("--rw={}", self.rw),
            format!("--bs={}", self.bs),
            format!("--iodepth={}", self.iodepth),
            "--direct=1".into(),
            "--ioengine=libaio".into(),
            format!("--size={}", self.size),
        ];
        if let Some(secs) = self.runtime {
            args.extend([format!("--runtime={secs}"), "--time_based".into()]);
        }
        args.extend(["--randrepeat=1".into(), "--output-format=json".into()]);
        args
    }

    /// Runs the job on `dev`.
    pub(crate) async fn run(&self, dev: &str) -> Res<FioOutcome> {
        let mut args = self.args();
        args.push(format!("--filename={dev}"));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = capture_checked("fio", &argv).await?;
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| format!("fio printed no JSON ({e}): {out}"))?;
        let side = if self.rw.contains("read") {
            "read"
        } else {
            "write"
        };
        let job = &v["jobs"][0][side];
        let missing = |field: &str| format!("fio's JSON has no jobs[0].{side}.{field}: {out}");
        Ok(FioOutcome {
            iops: job["iops"].as_f64().ok_or_else(|| missing("iops"))?,
            bw_bytes: job["bw_bytes"].as_f64().unwrap_or(0.0),
            runtime_ms: job["runtime"].as_u64().ok_or_else(|| missing("runtime"))?,
            io_bytes: job["io_bytes"].as_u64().unwrap_or(0),
        })
    }
}

/// What fio reports of one job's side.
pub(crate) struct FioOutcome {
    pub iops: f64,
    pub bw_bytes: f64,
    pub runtime_ms: u64,
    pub io_bytes: u64,
}
