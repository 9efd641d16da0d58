//! The `bicsi` binary: parse flags, set up logging, run the chosen command from the library.

use clap::Parser;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BICSI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal; log files and container logs stay plain.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = bicsi::cli::Cli::parse();
    if let Err(e) = bicsi::cli::run(cli).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
