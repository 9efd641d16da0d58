//! The `bicsi` binary: parse flags, set up logging, run the chosen command from the library.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = bicsi::cli::Cli::parse();
    bicsi::logs::init(cli.log_format);
    if let Err(e) = bicsi::cli::run(cli).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
