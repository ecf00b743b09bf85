//! `tally`: the server (`tally serve`) and its command-line client.

use std::process::ExitCode;

use clap::Parser;
use tally::app::App;
use tally::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

fn fail(message: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_logging(&cli.log_format);
            let settings = match args.settings() {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            let app = match App::build(settings).await {
                Ok(app) => app,
                Err(e) => return fail(&e),
            };
            match app.run_until_stopped(shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Migrate { database_url } => {
            match tally::app::open_store(&database_url, 2, std::sync::Arc::default()).await {
                Ok(_) => {
                    eprintln!(
                        "migrations applied to {}",
                        tally::app::redact_url(&database_url)
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Stripe { action } => match tally::cli::run_stripe(action).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Catalog { action } => match tally::cli::run_catalog(&action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        command => match tally::cli::run_client(command).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
    }
}
