//! How the CLI waits for work it started: polling with `--no-wait` and `--timeout`, shown by
//! `output`'s progress displays, and Ctrl-C that stops the waiting and never the work.
//!
//! Ctrl-C is caught around every client command (`cli::run`): the command's future is dropped,
//! the files it registered with [`remove_on_interrupt`] are removed, the note it set with
//! [`on_interrupt`] is printed, and the process exits 130. A command sets a note that says what
//! keeps running on the server, so the message never promises work that nothing will do.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::output::Progress;
use crate::client::status_error;
use crate::error::{Error, Result};

/// What the user should know if Ctrl-C lands now; empty: the generic note.
static NOTE: Mutex<String> = Mutex::new(String::new());
/// Files a command is writing that must not survive an interrupt (`FILE.part`).
static PARTIAL: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
pub const INTERRUPTED_EXIT: i32 = 130;

/// Sets what Ctrl-C prints from now on (say what keeps running, and how to look at it).
pub fn on_interrupt(note: impl Into<String>) {
    *NOTE.lock().unwrap_or_else(|e| e.into_inner()) = note.into();
}

/// Removes `path` if Ctrl-C lands before [`keep`] is called for it.
pub fn remove_on_interrupt(path: PathBuf) {
    PARTIAL.lock().unwrap_or_else(|e| e.into_inner()).push(path);
}

/// `path` is no longer removed on Ctrl-C (renamed into place, or removed already).
pub fn keep(path: &std::path::Path) {
    PARTIAL
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| p != path);
}

/// Runs `command` until it ends or Ctrl-C; on Ctrl-C removes the registered partial files,
/// prints the note and exits 130.
pub async fn interruptible<T>(command: impl Future<Output = T>) -> T {
    tokio::select! {
        r = command => r,
        _ = tokio::signal::ctrl_c() => interrupted(),
    }
}

fn interrupted() -> ! {
    super::output::clear_bars();
    for p in PARTIAL.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        let _ = std::fs::remove_file(&p);
    }
    let note = NOTE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let note = if note.is_empty() {
        "a request already sent may still complete on the server; check with `bicsi get …`"
            .to_string()
    } else {
        note
    };
    // On a terminal the "^C" echo is left on the line: start on a fresh one.
    let fresh = if std::io::stderr().is_terminal() {
        "\n"
    } else {
        ""
    };
    eprintln!("{fresh}interrupted: {note}");
    std::process::exit(INTERRUPTED_EXIT)
}

/// A `--timeout` value: `0` waits forever; `90`, `90s`, `5m`, `1h`.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: use 90, 90s, 5m or 1h (0: no limit)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => {
            return Err(format!(
                "{text:?} is not a duration: use 90, 90s, 5m or 1h (0: no limit)"
            ));
        }
    };
    Ok(Duration::from_secs(secs))
}

/// The flags of a command that waits for the work it started.
#[derive(clap::Args, Debug, Clone)]
pub struct WaitArgs {
    /// Do not wait: return at once, saying what bicsi is still preparing.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this long (90s, 5m, 1h; 0: no limit); the work goes on.
    #[arg(long, default_value = "0", value_parser = parse_timeout)]
    pub timeout: Duration,
}

impl WaitArgs {
    /// The instant waiting ends, if any.
    pub fn deadline(&self) -> Option<Instant> {
        (!self.timeout.is_zero()).then(|| Instant::now() + self.timeout)
    }
}

/// How long to sleep between two polls.
pub const POLL: Duration = Duration::from_millis(500);

/// Another operation on the same volume is waited out, as a CO does (shared with the HTTP
/// API's attach: `crate::client`).
pub(super) use crate::client::retry_aborted;

/// Calls `call` until it answers anything but Unavailable, showing the reason it gives as the
/// progress of `label`. `--no-wait` stops at the first Unavailable and `--timeout` at the
/// deadline, with "`not_done`: why; hint".
pub(super) async fn retry_unavailable<T, F, Fut>(
    wait: &WaitArgs,
    label: String,
    not_done: &str,
    no_wait_hint: &str,
    timeout_hint: &str,
    mut call: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = wait.deadline();
    let mut progress: Option<Progress> = None;
    loop {
        match call().await {
            Ok(r) => {
                if let Some(p) = progress {
                    p.finish();
                }
                return Ok(r.into_inner());
            }
            Err(s) if s.code() == tonic::Code::Unavailable => {
                // Servers that make CreateVolume wait for the image add that "the volume is
                // created when it is ready": only a retry does that, so it is not repeated here.
                let why = s
                    .message()
                    .trim_end_matches("; the volume is created when it is ready")
                    .to_string();
                if wait.no_wait {
                    return Err(Error::Unavailable(format!(
                        "{not_done}: {why}; {no_wait_hint}"
                    )));
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(Error::Unavailable(format!(
                        "gave up waiting (--timeout): {not_done}: {why}; {timeout_hint}"
                    )));
                }
                progress
                    .get_or_insert_with(|| Progress::new(label.clone()))
                    .update(&why, percent_in(&why));
                tokio::time::sleep(POLL).await;
            }
            Err(s) => return Err(status_error(s)),
        }
    }
}

/// The first `NN%` in a progress message (the furthest file's progress).
fn percent_in(message: &str) -> Option<u64> {
    let bytes = message.as_bytes();
    let pos = message.find('%')?;
    let start = bytes[..pos]
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |i| i + 1);
    message[start..pos].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percents_in_progress_messages() {
        assert_eq!(
            percent_in(
                "volume \"v\" is being prepared for node \"n\": backing image \"b\" is being prepared on disk d1: in-progress 45%; retry shortly"
            ),
            Some(45)
        );
        assert_eq!(percent_in("d1: pending 0%"), Some(0));
        assert_eq!(percent_in("100% done"), Some(100));
        assert_eq!(percent_in("no number %"), None);
        assert_eq!(percent_in("nothing"), None);
    }

    #[test]
    fn timeouts() {
        for (text, secs) in [("0", 0), ("90", 90), ("90s", 90), ("5m", 300), ("1h", 3600)] {
            assert_eq!(parse_timeout(text), Ok(Duration::from_secs(secs)), "{text}");
        }
        for bad in ["", "m", "5x", "-1", "1.5m"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }
}
