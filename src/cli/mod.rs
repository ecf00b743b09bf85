//! The `tally` command line: `serve`, `migrate`, and a client for a running server.
//!
//! - this file: the commands and their arguments ([`Cli`], [`Command`]) and the client dispatch;
//! - `serve`: the server's options; `remote`: the connection, errors and output of client
//!   commands (over `tally::client`); `jobs` and `accounts`: the client commands by subject;
//!   `local`: commands that need no server.

use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Secret;

/// Tally: credits for expensive generation jobs.
#[derive(Debug, Parser)]
#[command(name = "tally", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[allow(missing_docs)] // flattened option groups are documented on their own types
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server (SQLite file ./tally.db by default).
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate {
        /// Database to migrate.
        #[arg(long, env = "TALLY_DATABASE_URL", default_value = "sqlite://tally.db", value_parser = Secret::parse, hide_env_values = true)]
        database_url: Secret,
        /// File holding the database URL (a mounted Secret); preferred over the value.
        #[arg(long, env = "TALLY_DATABASE_URL_FILE")]
        database_url_file: Option<std::path::PathBuf>,
    },
    /// The server's configuration file.
    Config {
        #[command(subcommand)]
        action: ConfigCommand,
    },
    /// Load-test a running server (throughput, latency percentiles, errors by code).
    Bench(Box<crate::bench::BenchArgs>),
    /// Caller tokens for the callers file.
    Auth {
        #[command(subcommand)]
        action: AuthCommand,
    },
    /// Follow an account's balance live (WatchBalance): one line per committed change, until
    /// interrupted. Reconnects by itself when the server restarts, missing nothing.
    Watch {
        /// The account.
        account: String,
        /// Start after this version (print the balance at once only if it moved since).
        #[arg(long)]
        after_version: Option<i64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show an account's balance.
    Balance {
        /// Account id.
        account: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Hold credits for a job: an amount, or an operation priced by the server.
    Reserve {
        /// Account id.
        account: String,
        /// Credits to hold (omit with --operation).
        #[arg(required_unless_present = "operation")]
        amount: Option<i64>,
        /// Price the hold from the server's price table instead (e.g. video_export).
        #[arg(long, conflicts_with = "amount")]
        operation: Option<String>,
        /// Operation parameter KEY=VALUE (repeatable), e.g. --param seconds=12.
        #[arg(long = "param", value_parser = parse_pair, requires = "operation")]
        params: Vec<(String, String)>,
        /// Hold lifetime (e.g. 90s, 10m, 2h); server default if omitted.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Metadata pair KEY=VALUE (repeatable).
        #[arg(long = "meta", value_parser = parse_pair)]
        metadata: Vec<(String, String)>,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Settle a hold with what the job cost.
    Commit {
        /// Hold id.
        hold: String,
        /// Credits the job cost.
        amount: i64,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Release an open hold, or return credits of a committed one.
    Refund {
        /// Hold id.
        hold: String,
        /// Credits to return (committed holds; default: all not yet refunded).
        #[arg(long)]
        amount: Option<i64>,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Extend an open hold to now + TTL.
    Extend {
        /// Hold id.
        hold: String,
        /// New lifetime from now.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one hold.
    Hold {
        /// Hold id.
        hold: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List an account's holds, newest first (open ones unless --all).
    Holds {
        /// Account id.
        account: String,
        /// Every state, not only open holds.
        #[arg(long)]
        all: bool,
        /// Holds per page (the CLI follows every page).
        #[arg(long, default_value_t = 100)]
        page_size: i32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Ledger history, newest first (all accounts unless ACCOUNT is given).
    Entries {
        /// Account id.
        account: Option<String>,
        /// Only these kinds (repeatable): grant, reserve, commit, release, expire, refund.
        #[arg(long = "kind")]
        kinds: Vec<String>,
        /// Entries at or after this RFC 3339 time.
        #[arg(long, value_parser = parse_time)]
        since: Option<prost_types::Timestamp>,
        /// Entries before this RFC 3339 time.
        #[arg(long, value_parser = parse_time)]
        until: Option<prost_types::Timestamp>,
        /// Most entries to show (the CLI follows pages up to this).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Ledger entries of a time window as CSV on stdout (for finance).
    Export {
        /// Window start (RFC 3339, inclusive).
        #[arg(long, value_parser = parse_time)]
        since: prost_types::Timestamp,
        /// Window end (RFC 3339, exclusive; at most 366 days after --since).
        #[arg(long, value_parser = parse_time)]
        until: prost_types::Timestamp,
        /// Only this account.
        #[arg(long)]
        account: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Price an operation with the server's price table (nothing is reserved).
    Estimate {
        /// Operation name (e.g. video_export).
        operation: String,
        /// Parameter KEY=VALUE (repeatable), e.g. --param seconds=12 --param resolution=1080p.
        #[arg(long = "param", value_parser = parse_pair)]
        params: Vec<(String, String)>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The catalog file (plans, packs, prices).
    Catalog {
        #[command(subcommand)]
        action: CatalogCommand,
    },
    /// Stripe operator tools (run against the database and Stripe directly).
    Stripe {
        #[command(subcommand)]
        action: StripeCommand,
    },
    /// Account administration.
    Account {
        #[command(subcommand)]
        action: AccountCommand,
    },
    /// Outbound events: deliveries, redelivery, endpoints.
    Events {
        #[command(subcommand)]
        action: EventsCommand,
    },
}

/// `tally events ...`.
#[allow(missing_docs)]
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Deliveries, newest first (one per event and endpoint).
    List {
        /// Only this account's.
        #[arg(long)]
        account: Option<String>,
        /// Only this type (credits.low_balance, ...).
        #[arg(long = "type")]
        kind: Option<String>,
        /// Only this state: pending, delivered or failed.
        #[arg(long, value_parser = ["pending", "delivered", "failed"])]
        state: Option<String>,
        /// Only this endpoint.
        #[arg(long)]
        endpoint: Option<String>,
        /// Most deliveries to show (the CLI follows pages up to this).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One event's deliveries, with the body sent.
    Show {
        /// The event id (webhook-id, evt_...).
        event_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Queue an event again (same webhook-id), to every endpoint or one.
    Redeliver {
        /// The event id.
        event_id: String,
        /// Only to this endpoint.
        #[arg(long)]
        endpoint: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The configured endpoints, and whether a 410 Gone disabled them.
    Endpoints {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Enable an endpoint a 410 Gone disabled.
    Enable {
        /// The endpoint's name.
        endpoint: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `tally account ...`
#[allow(missing_docs)] // flattened option groups are documented on their own types
#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Balance, plan, entitlements and open holds of an account.
    Show {
        /// Account id.
        account: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Move an account to another plan.
    SetPlan {
        /// Account id.
        account: String,
        /// Plan name from the catalog.
        plan: String,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List accounts by id (follows every page).
    List {
        /// Only this plan.
        #[arg(long)]
        plan: Option<String>,
        /// Only accounts under their plan's low-balance threshold.
        #[arg(long)]
        low_balance: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add credits (creates the account on its first grant).
    Grant {
        /// Account id.
        account: String,
        /// Credits to add.
        amount: i64,
        /// Why (recorded in the ledger).
        #[arg(long)]
        reason: String,
        /// purchase, subscription, allowance, signup_bonus, promotion, adjustment, refund, transfer.
        #[arg(long, default_value = "adjustment")]
        source: String,
        /// The credits expire after this long (e.g. 30days); never if omitted.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
        /// Consumption priority 0..=100 (lower first; default 50).
        #[arg(long)]
        priority: Option<i32>,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Create an account on a plan with the sign-up bonus.
    Open {
        /// Account id.
        account: String,
        /// Plan (default free).
        #[arg(long, default_value = "")]
        plan: String,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A signed correction, e.g. `tally account adjust u1 -20 --reason "double charge"`.
    Adjust {
        /// Account id.
        account: String,
        /// Credits to add (positive) or remove (negative).
        #[arg(allow_negative_numbers = true)]
        delta: i64,
        /// Why (required).
        #[arg(long)]
        reason: String,
        /// Who is acting (default: $USER).
        #[arg(long, env = "USER", default_value = "operator")]
        operator: String,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Move credits from one account to another.
    Transfer {
        /// Debited account.
        from: String,
        /// Credited account.
        to: String,
        /// Credits.
        amount: i64,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `tally stripe ...`
#[derive(Debug, Subcommand)]
pub enum StripeCommand {
    /// Re-read an account's subscription from Stripe and apply it (repair after missed events).
    Sync {
        /// Account id.
        account: String,
        /// The server's options (database, Stripe key, catalog) — the same flags and TALLY_* variables.
        #[command(flatten)]
        serve: Box<ServeArgs>,
    },
}

/// `tally config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print every server option as a commented TOML example with its default.
    PrintDefault,
}

/// `tally auth ...`
#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Make a new random token; prints the token (give it to the caller) and its hash (put it
    /// in the callers file).
    NewToken,
    /// Print the SHA-256 a callers file stores for a token read from standard input.
    HashToken,
}

/// `tally catalog ...`
#[derive(Debug, Subcommand)]
pub enum CatalogCommand {
    /// Print the built-in catalog (a commented example to start from).
    PrintDefault,
    /// Validate a catalog file and summarize it.
    Check {
        /// The file.
        path: std::path::PathBuf,
    },
}

mod accounts;
mod events;
mod jobs;
mod local;
mod remote;
mod serve;
mod watch;

pub use local::{run_auth, run_catalog, run_config, run_stripe};
pub use remote::{CLI_ATTEMPTS, ClientArgs, ClientError, KeyArgs, out};
use remote::{parse_pair, parse_time};
pub use serve::{HOLD_TTL_MAX_LIMIT, IDEMPOTENCY_RETENTION_MIN, ServeArgs};

/// Runs a client command.
///
/// # Errors
/// [`ClientError`] for an unreachable server or an error status.
pub async fn run_client(command: Command) -> Result<(), ClientError> {
    match command {
        Command::Account { .. } | Command::Entries { .. } | Command::Export { .. } => {
            accounts::run(command).await
        }
        Command::Events { action } => events::run(action).await,
        Command::Watch {
            account,
            after_version,
            client,
        } => watch::run(account, after_version, client).await,
        command => jobs::run(command).await,
    }
}
