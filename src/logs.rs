//! How the processes log (`--log-format`, or `BICSI_LOG_FORMAT`): `text` for people, or `json`,
//! one object a line with the event's fields at the top level and the fields of the spans it
//! ran in (`span`: the innermost, e.g. a CSI call's `method` and `volume`; `spans`: all of them,
//! outermost first), for log collectors. `BICSI_LOG` filters as before (default `info`); lines
//! go to stderr. This module sets up the subscriber once per process; it must not decide what is
//! logged.

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The `BICSI_LOG` filter, `info` by default.
fn filter() -> EnvFilter {
    EnvFilter::try_from_env("BICSI_LOG").unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the process's subscriber, writing `format` to stderr.
pub fn init(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr);
    match format {
        // Colour only for a person at a terminal; log files and container logs stay plain.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}
