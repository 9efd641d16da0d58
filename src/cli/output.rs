//! How the CLI prints: tables on stdout, `-o json|yaml` records (YAML as its JSON reads) and
//! `-o wide`, the progress displays on stderr (an indicatif bar or spinner on a terminal, plain
//! lines otherwise), and the output macros that turn a closed stdout (`| head -1`) into a quiet
//! exit.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The output of a `get` of one object.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Output {
    Json,
    Yaml,
}

/// The output of a `get` that prints a table: JSON or YAML records, or a wider table.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListOutput {
    Json,
    Yaml,
    Wide,
}

/// Prints a value as pretty JSON on stdout.
pub(super) fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<()> {
    crate::outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints a value as YAML on stdout.
pub(super) fn print_yaml<T: serde::Serialize + ?Sized>(value: &T) -> Result<()> {
    crate::out!("{}", to_yaml(value)?);
    Ok(())
}

/// YAML of a value as its JSON reads (an enum variant is a key, `mount: {fs_type: ext4}`), not
/// with serde_yaml's `!mount` tags, which kubectl-minded readers and YAML tools without tag
/// support trip on.
pub(super) fn to_yaml<T: serde::Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_yaml::to_string(&serde_json::to_value(value)?).map_err(|e| Error::Internal(e.to_string()))
}

/// Prints one record as `output` asks.
pub(super) fn print<T: serde::Serialize + ?Sized>(value: &T, output: Output) -> Result<()> {
    match output {
        Output::Json => print_json(value),
        Output::Yaml => print_yaml(value),
    }
}

/// Prints `value` as JSON or YAML records and answers true, or answers false for a table.
pub(super) fn print_records<T: serde::Serialize + ?Sized>(
    value: &T,
    output: Option<ListOutput>,
) -> Result<bool> {
    match output {
        Some(ListOutput::Json) => print_json(value).map(|()| true),
        Some(ListOutput::Yaml) => print_yaml(value).map(|()| true),
        None | Some(ListOutput::Wide) => Ok(false),
    }
}

/// Writes a line to stdout; a closed stdout (the reader went away, EPIPE) ends the process
/// quietly with status 0, as `head` expects of the commands it reads.
#[macro_export]
#[doc(hidden)]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// [`outln!`] without the newline.
#[macro_export]
#[doc(hidden)]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::write_out(format_args!($($arg)*))
    };
}

#[doc(hidden)]
pub fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// The bars on the terminal, cleared before an interrupt note is printed.
static BARS: Mutex<Vec<indicatif::ProgressBar>> = Mutex::new(Vec::new());

fn show(bar: &indicatif::ProgressBar) {
    let mut bars = BARS.lock().unwrap_or_else(|e| e.into_inner());
    bars.retain(|b| !b.is_finished());
    bars.push(bar.clone());
}

/// Clears every bar from the terminal (Ctrl-C, before its note).
pub(super) fn clear_bars() {
    for b in BARS.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        b.finish_and_clear();
    }
}

/// How often a plain progress line repeats an unchanged message.
const PLAIN_REPEAT: Duration = Duration::from_secs(10);
/// The least time between two plain progress lines.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// A progress display for one wait: a bar (with a percentage) or spinner on a terminal, plain
/// `WHAT: MESSAGE` lines on stderr otherwise (at most one every 2 s, and only when the message
/// changed or 10 s passed).
pub struct Progress {
    what: String,
    bar: Option<indicatif::ProgressBar>,
    last: Option<(String, Instant)>,
}

impl Progress {
    /// A display that draws a bar when stderr is a terminal.
    pub fn new(what: impl Into<String>) -> Progress {
        Progress::with_terminal(what, std::io::stderr().is_terminal())
    }

    fn with_terminal(what: impl Into<String>, terminal: bool) -> Progress {
        let what = what.into();
        let bar = terminal.then(|| {
            let bar = indicatif::ProgressBar::new(100);
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {wide_msg}")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(what.clone());
            bar.enable_steady_tick(Duration::from_millis(120));
            show(&bar);
            bar
        });
        Progress {
            what,
            bar,
            last: None,
        }
    }

    /// Shows `message`, and `percent` on the bar when known.
    pub fn update(&mut self, message: &str, percent: Option<u64>) {
        if let Some(bar) = &self.bar {
            if let Some(p) = percent {
                bar.set_position(p.min(100));
            }
            bar.set_message(message.to_string());
            return;
        }
        let line = match percent {
            Some(p) => format!("{}: {p}%: {message}", self.what),
            None => format!("{}: {message}", self.what),
        };
        if let Some(text) = self.plain_line(line, Instant::now()) {
            eprintln!("{text}");
        }
    }

    /// The plain line to print now, if any (rate-limited, repeats only after a while).
    fn plain_line(&mut self, line: String, now: Instant) -> Option<String> {
        let due = match &self.last {
            None => true,
            Some((prev, at)) => {
                let since = now.saturating_duration_since(*at);
                (since >= PLAIN_EVERY && *prev != line) || since >= PLAIN_REPEAT
            }
        };
        if !due {
            return None;
        }
        self.last = Some((line.clone(), now));
        Some(line)
    }

    /// Removes the bar (plain output needs nothing).
    pub fn finish(self) {
        // Drop clears the bar.
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A transfer's progress in bytes: indicatif's bar with rate and ETA on a terminal, plain
/// `VERB: N%: DONE of TOTAL` lines otherwise. Clones share the count (a stream updates it).
#[derive(Clone)]
pub struct ByteProgress {
    bar: indicatif::ProgressBar,
    plain: Option<std::sync::Arc<Mutex<Progress>>>,
    total: Option<u64>,
}

impl ByteProgress {
    pub fn new(total: Option<u64>, verb: &str) -> ByteProgress {
        let terminal = std::io::stderr().is_terminal();
        let bar = match (terminal, total) {
            (false, _) => indicatif::ProgressBar::hidden(),
            (true, Some(t)) => indicatif::ProgressBar::new(t),
            (true, None) => indicatif::ProgressBar::no_length(),
        };
        if let Some(t) = total {
            bar.set_length(t);
        }
        let template = if total.is_some() {
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}"
        } else {
            "{msg} {bytes} {binary_bytes_per_sec}"
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(verb.to_string());
        if terminal {
            show(&bar);
        }
        ByteProgress {
            bar,
            plain: (!terminal)
                .then(|| std::sync::Arc::new(Mutex::new(Progress::with_terminal(verb, false)))),
            total,
        }
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        if let Some(plain) = &self.plain {
            let done = self.bar.position();
            let (text, percent) = match self.total {
                Some(t) if t > 0 => (
                    format!(
                        "{} of {}",
                        crate::quantity::human(done),
                        crate::quantity::human(t)
                    ),
                    Some(done.saturating_mul(100) / t),
                ),
                _ => (crate::quantity::human(done), None),
            };
            plain
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .update(&text, percent);
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_output_has_no_enum_tags() {
        let cap = crate::model::AccessType::Mount {
            fs_type: "ext4".into(),
            mount_flags: vec![],
        };
        let yaml = to_yaml(&cap).unwrap();
        assert!(!yaml.contains('!'), "{yaml}");
        assert!(
            yaml.starts_with("mount:\n") && yaml.contains("fs_type: ext4"),
            "{yaml}"
        );
        let block = to_yaml(&crate::model::AccessType::Block).unwrap();
        assert_eq!(block.trim(), "block");
    }

    #[test]
    fn plain_lines_are_rate_limited_and_repeat_after_a_while() {
        let mut p = Progress::with_terminal("waiting", false);
        let t0 = Instant::now();
        assert_eq!(p.plain_line("a".into(), t0).as_deref(), Some("a"));
        // Too soon for a change, and never a repeat right away.
        assert_eq!(p.plain_line("b".into(), t0 + Duration::from_secs(1)), None);
        assert_eq!(p.plain_line("a".into(), t0 + Duration::from_secs(3)), None);
        assert_eq!(
            p.plain_line("b".into(), t0 + Duration::from_secs(3))
                .as_deref(),
            Some("b")
        );
        assert_eq!(
            p.plain_line("b".into(), t0 + Duration::from_secs(13))
                .as_deref(),
            Some("b")
        );
    }
}
