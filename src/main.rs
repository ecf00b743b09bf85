//! `tally`: the server (`tally serve`) and its command-line client.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use tally::app::App;
use tally::cli::{Cli, Command};

/// mimalloc instead of glibc's malloc: under load the server spent about a quarter of its CPU
/// in glibc's allocator (perf, 64-client reserve-commit).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Parses the command line, adding the `--config` file's values below flags and TALLY_*.
fn parse() -> Result<Cli, String> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cmd = Cli::command();
    let first = cmd.clone().get_matches_from(&argv);
    let layered = tally::config::layer_file(&cmd, &first, &argv)?;
    let matches = cmd.try_get_matches_from(layered).map_err(|e| {
        let text = e.to_string();
        let first_line = text.lines().next().unwrap_or_default();
        format!(
            "in the config file: {}",
            first_line.trim_start_matches("error: ")
        )
    })?;
    Cli::from_arg_matches(&matches).map_err(|e| e.to_string())
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

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => return fail(&e),
    };
    // The closed-loop load generator runs on one thread: it then never hands a socket's
    // readiness or a reply from one worker thread to another, and takes less of the CPU it
    // shares with the server it measures (0.053-0.062 against 0.077-0.080 ms per pair). Paced
    // (`--rate`) it keeps both threads: its latency counts from each call's scheduled send, and
    // one thread descheduled on a busy machine sends late (half-load Reserve p99 12.8-326 ms
    // in five runs, against 9.0-17.5 ms with two threads).
    let mut runtime = if matches!(&cli.command, Command::Bench(b) if b.rate <= 0.0) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    match runtime.enable_all().build() {
        Ok(rt) => rt.block_on(run(cli)),
        Err(e) => fail(&e),
    }
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => {
            let _telemetry = match tally::telemetry::init(&args.log_format) {
                Ok(t) => t,
                Err(e) => return fail(&e),
            };
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
        Command::Migrate {
            database_url,
            database_url_file,
        } => {
            let url = match tally::config::secret_from(
                "--database-url",
                database_url_file.as_deref(),
                Some(&database_url),
            ) {
                Ok(Some(u)) => u,
                Ok(None) => return fail(&"--database-url-file: the file is empty"),
                Err(e) => return fail(&e),
            };
            match tally::app::open_store(&url, 2, std::sync::Arc::default()).await {
                Ok(_) => {
                    eprintln!("migrations applied to {}", tally::app::redact_url(&url));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Config { action } => {
            tally::cli::run_config(&action);
            ExitCode::SUCCESS
        }
        Command::Bench(args) => match tally::bench::run(&args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Auth { action } => match tally::cli::run_auth(&action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Stripe { action } => match tally::cli::run_stripe(action).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Catalog { action } => match tally::cli::run_catalog(&action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        command => {
            // `--json` is a flag of every client command: errors then go to stderr as JSON too.
            let json = std::env::args().any(|a| a == "--json");
            match tally::cli::run_client(command).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if json => {
                    eprintln!("{}", e.to_json());
                    ExitCode::FAILURE
                }
                Err(e) => fail(&e),
            }
        }
    }
}
