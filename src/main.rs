//! The `sandboxd` binary: parse, set up crypto and logging, dispatch.

use std::process::ExitCode;

use clap::Parser;
use sandboxd::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS crypto provider for every client and server in the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Err(e) = sandboxd::telemetry::init_logging(&cli.log) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Operator(args) => sandboxd::operator::run(args).await,
        Command::Webhook(args) => sandboxd::webhook::run(args).await,
        Command::Caa(args) => sandboxd::caa::run(args).await,
        Command::Version => {
            println!(
                "sandboxd {} ({}-{})",
                sandboxd::VERSION,
                std::env::consts::ARCH,
                std::env::consts::OS
            );
            Ok(())
        }
    }
}
