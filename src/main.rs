//! The `bicsi` binary: parse flags, set up logging, run the chosen command from the library.

use clap::Parser;

fn main() {
    let cli = bicsi::cli::Cli::parse();
    // The control and transfer processes get one allocator arena (see the module's
    // measurement), set before the runtime starts its threads. The data-path processes (the
    // mirror engine's FUSE threads, the replica server's workers) keep one per thread: their
    // threads allocate in parallel on every request.
    if !matches!(
        cli.command,
        bicsi::cli::Command::EngineMirror(_) | bicsi::cli::Command::ReplicaServer(_)
    ) {
        bicsi::os::malloc::one_arena();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
        .block_on(run(cli));
}

async fn run(cli: bicsi::cli::Cli) {
    bicsi::logs::init(cli.log_format);
    if let Err(e) = bicsi::cli::run(cli).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
