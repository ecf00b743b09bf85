//! The `tally` command line: `serve`, `migrate`, and a client for a running server.
#![allow(clippy::print_stdout)] // printing results is this module's job

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::app::Settings;
use crate::auth::{Auth, Callers, Principal, Rate, RateLimits};
use crate::catalog::Catalog;
use crate::config::{Secret, secret_from};
use crate::ledger::Limits;
use crate::pb;
use crate::pb::admin_service_client::AdminServiceClient;
use crate::pb::credit_service_client::CreditServiceClient;

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

/// Options of `tally serve`.
#[allow(clippy::struct_excessive_bools)] // independent on/off options, as the command line has them
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file of these options (keys are the option names with `_`); flags and TALLY_*
    /// variables win over it. `tally config print-default` prints an example.
    #[arg(long, env = "TALLY_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "TALLY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// gRPC listen address.
    #[arg(long, env = "TALLY_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// `sqlite://PATH` (created if missing) or `postgres://USER:PASSWORD@HOST/DB`.
    #[arg(
        long,
        env = "TALLY_DATABASE_URL",
        default_value = "sqlite://tally.db",
        hide_env_values = true,
        value_parser = Secret::parse
    )]
    pub database_url: Secret,
    /// File holding the database URL (a mounted Secret); preferred over the value.
    #[arg(long, env = "TALLY_DATABASE_URL_FILE")]
    pub database_url_file: Option<std::path::PathBuf>,
    /// Apply database migrations at start (turn off when a migration Job runs `tally migrate`).
    #[arg(long, env = "TALLY_AUTO_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_migrate: bool,
    /// Callers file (TOML: names, roles, account prefixes, token hashes). Without one,
    /// authentication is off and only loopback addresses may be bound (unless --insecure).
    #[arg(long, env = "TALLY_CALLERS_FILE")]
    pub callers_file: Option<std::path::PathBuf>,
    /// Allow serving without callers on non-loopback addresses (never in production).
    #[arg(long, env = "TALLY_INSECURE")]
    pub insecure: bool,
    /// PEM certificate chain of the gRPC listener (TLS; with --tls-key).
    #[arg(long, env = "TALLY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of the gRPC listener.
    #[arg(long, env = "TALLY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// PEM CA bundle: clients must present a certificate signed by it (mutual TLS).
    #[arg(long, env = "TALLY_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// Operator listen address: /metrics (Prometheus), /healthz, /readyz.
    #[arg(long, env = "TALLY_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    pub metrics_listen: SocketAddr,
    /// Serve gRPC reflection (v1 and v1alpha) to authenticated callers.
    #[arg(long, env = "TALLY_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub reflection: bool,
    /// Calls per second per caller (0: unlimited); a caller's `rate_limit_rps` overrides it.
    #[arg(long, env = "TALLY_RATE_LIMIT_RPS", default_value_t = 5000)]
    pub rate_limit_rps: u32,
    /// Calls a caller may make at once above its rate.
    #[arg(long, env = "TALLY_RATE_LIMIT_BURST", default_value_t = 10000)]
    pub rate_limit_burst: u32,
    /// Calls per second per caller to AdminService and Checkout creation (0: unlimited).
    #[arg(long, env = "TALLY_ADMIN_RATE_LIMIT_RPS", default_value_t = 20)]
    pub admin_rate_limit_rps: u32,
    /// Burst of the admin and Checkout tier.
    #[arg(long, env = "TALLY_ADMIN_RATE_LIMIT_BURST", default_value_t = 40)]
    pub admin_rate_limit_burst: u32,
    /// gRPC calls in flight at once; more are refused at once with UNAVAILABLE (OVERLOADED).
    #[arg(long, env = "TALLY_MAX_CONCURRENT_REQUESTS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrent_requests: u32,
    /// How often the ledger reconciliation checks entries against balances (0s: never).
    #[arg(long, env = "TALLY_AUDIT_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub audit_interval: Duration,
    /// How often readiness checks the database.
    #[arg(long, env = "TALLY_READINESS_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub readiness_interval: Duration,
    /// Database pool size.
    #[arg(long, env = "TALLY_DB_MAX_CONNECTIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub db_max_connections: u32,
    /// Group commit: most Reserve/Commit/Refund/ExtendHold calls that share one transaction
    /// (1 = each call alone). Calls never wait to fill a group.
    #[arg(long, env = "TALLY_DB_GROUP_MAX", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub db_group_max: u16,
    /// Group commit on PostgreSQL: group transactions in flight at once, each on a connection
    /// of its own outside the pool (PostgreSQL sees up to --db-max-connections plus this many).
    /// SQLite runs one.
    #[arg(long, env = "TALLY_DB_GROUP_WORKERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub db_group_workers: u16,
    /// Hold TTL when a Reserve gives none.
    #[arg(long, env = "TALLY_HOLD_TTL_DEFAULT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub hold_ttl_default: Duration,
    /// Longest hold TTL a Reserve or ExtendHold may ask for (at most 7 days).
    #[arg(long, env = "TALLY_HOLD_TTL_MAX", default_value = "24h", value_parser = humantime::parse_duration)]
    pub hold_ttl_max: Duration,
    /// How long idempotency keys are kept (at least 24h).
    #[arg(long, env = "TALLY_IDEMPOTENCY_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub idempotency_retention: Duration,
    /// How often the sweeper releases expired holds.
    #[arg(long, env = "TALLY_SWEEP_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,
    /// Server-side cap on a call's duration.
    #[arg(long, env = "TALLY_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// HTTP sidecar listen address (Stripe webhooks, /healthz, /readyz).
    #[arg(long, env = "TALLY_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// Stripe webhook signing secret(s), comma-separated (at most two, for rotation).
    #[arg(
        long,
        env = "TALLY_STRIPE_WEBHOOK_SECRET",
        hide_env_values = true,
        hide_default_value = true,
        value_parser = Secret::parse
    )]
    pub stripe_webhook_secret: Option<Secret>,
    /// File holding the webhook secret(s) (for Kubernetes Secrets); preferred over the value.
    #[arg(long, env = "TALLY_STRIPE_WEBHOOK_SECRET_FILE")]
    pub stripe_webhook_secret_file: Option<std::path::PathBuf>,
    /// The Stripe account key is live mode (test-mode events are then refused, and vice versa).
    #[arg(long, env = "TALLY_STRIPE_LIVEMODE")]
    pub stripe_livemode: bool,
    /// Stripe secret API key (billing endpoints answer 503 without one).
    #[arg(
        long,
        env = "TALLY_STRIPE_API_KEY",
        hide_env_values = true,
        hide_default_value = true,
        value_parser = Secret::parse
    )]
    pub stripe_api_key: Option<Secret>,
    /// File holding the Stripe API key; preferred over the value.
    #[arg(long, env = "TALLY_STRIPE_API_KEY_FILE")]
    pub stripe_api_key_file: Option<std::path::PathBuf>,
    /// Stripe API base URL (a local fake or stripe-mock in tests).
    #[arg(long, env = "TALLY_STRIPE_API_BASE", default_value = crate::stripe::client::DEFAULT_BASE_URL)]
    pub stripe_api_base: String,
    /// Deadline of each Stripe call.
    #[arg(long, env = "TALLY_STRIPE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub stripe_timeout: Duration,
    /// Catalog file: plans, packs and prices (the built-in default when omitted).
    #[arg(long, env = "TALLY_CATALOG")]
    pub catalog: Option<std::path::PathBuf>,
    /// How long shutdown waits for in-flight calls.
    #[arg(long, env = "TALLY_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

/// Longest hold TTL the server may be configured with.
pub const HOLD_TTL_MAX_LIMIT: Duration = Duration::from_hours(7 * 24);
/// Shortest idempotency retention.
pub const IDEMPOTENCY_RETENTION_MIN: Duration = Duration::from_hours(24);

fn delta(field: &str, d: Duration) -> Result<chrono::TimeDelta, String> {
    chrono::TimeDelta::from_std(d).map_err(|_| format!("{field}: out of range"))
}

impl ServeArgs {
    fn stripe_api(&self) -> Result<Option<crate::stripe::client::StripeApi>, String> {
        let Some(key) = secret_from(
            "--stripe-api-key",
            self.stripe_api_key_file.as_deref(),
            self.stripe_api_key.as_ref(),
        )?
        else {
            return Ok(None);
        };
        if self.stripe_timeout.is_zero() || self.stripe_timeout > Duration::from_mins(1) {
            return Err("--stripe-timeout: must be between 1ms and 60s".into());
        }
        crate::stripe::client::StripeApi::new(&key, &self.stripe_api_base, self.stripe_timeout)
            .map(Some)
            .map_err(|e| format!("--stripe-api-key: {e}"))
    }

    fn webhook_secrets(&self) -> Result<Vec<crate::stripe::WebhookSecret>, String> {
        let raw = secret_from(
            "--stripe-webhook-secret",
            self.stripe_webhook_secret_file.as_deref(),
            self.stripe_webhook_secret.as_ref(),
        )?
        .unwrap_or_default();
        let secrets: Vec<_> = raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(crate::stripe::WebhookSecret::new)
            .collect();
        if secrets.len() > crate::stripe::signature::SECRETS_MAX {
            return Err(
                "--stripe-webhook-secret: at most two secrets (old and new, during rotation)"
                    .into(),
            );
        }
        Ok(secrets)
    }

    /// The database URL: from `--database-url-file` when given, else `--database-url`.
    ///
    /// # Errors
    /// The file cannot be read, or is empty.
    pub fn database_url(&self) -> Result<String, String> {
        secret_from(
            "--database-url",
            self.database_url_file.as_deref(),
            Some(&self.database_url),
        )?
        .ok_or_else(|| "--database-url-file: the file is empty".to_owned())
    }

    fn tls(&self) -> Result<Option<crate::app::TlsFiles>, String> {
        let read = |flag: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("{flag} {}: {e}", p.display()))
        };
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        Ok(Some(crate::app::TlsFiles {
            cert: read("--tls-cert", cert)?,
            key: read("--tls-key", key)?,
            client_ca: self
                .tls_client_ca
                .as_deref()
                .map(|p| read("--tls-client-ca", p))
                .transpose()?,
        }))
    }

    fn auth(&self) -> Result<Auth, String> {
        let limits = RateLimits {
            normal: Rate {
                per_second: self.rate_limit_rps,
                burst: self.rate_limit_burst,
            },
            sensitive: Rate {
                per_second: self.admin_rate_limit_rps,
                burst: self.admin_rate_limit_burst,
            },
        };
        let auth = match &self.callers_file {
            Some(path) => Auth::Tokens(Callers::load(path, limits)?),
            None => Auth::Open(std::sync::Arc::new(Principal::open(limits))),
        };
        // Without callers, only loopback addresses — except that gRPC under mutual TLS (a
        // client certificate from --tls-client-ca is the authentication) may bind beyond it. The
        // HTTP sidecar has no client certificates, so it never may.
        let mutual_tls =
            self.tls_cert.is_some() && self.tls_key.is_some() && self.tls_client_ca.is_some();
        if auth.is_open() && !self.insecure {
            for (flag, addr, beyond_loopback) in [
                ("--listen", self.listen, mutual_tls),
                ("--http-listen", self.http_listen, false),
            ] {
                if !addr.ip().is_loopback() && !beyond_loopback {
                    let mtls = if flag == "--listen" {
                        ", or require client certificates (--tls-cert, --tls-key and --tls-client-ca)"
                    } else {
                        ""
                    };
                    return Err(format!(
                        "{flag} {addr}: refusing to serve without authentication on a non-loopback \
                         address; configure --callers-file (see the README, \"Callers\"){mtls} or pass --insecure"
                    ));
                }
            }
        }
        Ok(auth)
    }

    /// Validates the options into [`Settings`].
    ///
    /// # Errors
    /// A message naming the option and the reason.
    pub fn settings(&self) -> Result<Settings, String> {
        if self.hold_ttl_max > HOLD_TTL_MAX_LIMIT || self.hold_ttl_max < Duration::from_secs(1) {
            return Err("--hold-ttl-max: must be between 1s and 7days".into());
        }
        if self.hold_ttl_default > self.hold_ttl_max
            || self.hold_ttl_default < Duration::from_secs(1)
        {
            return Err("--hold-ttl-default: must be between 1s and --hold-ttl-max".into());
        }
        if self.idempotency_retention < IDEMPOTENCY_RETENTION_MIN {
            return Err("--idempotency-retention: must be at least 24h".into());
        }
        if self.readiness_interval < Duration::from_millis(10)
            || self.readiness_interval > Duration::from_mins(1)
        {
            return Err("--readiness-interval: must be between 10ms and 1m".into());
        }
        if self.sweep_interval < Duration::from_millis(10)
            || self.sweep_interval > Duration::from_hours(1)
        {
            return Err("--sweep-interval: must be between 10ms and 1h".into());
        }
        let catalog = match &self.catalog {
            Some(path) => Catalog::load(path),
            None => Catalog::builtin(),
        }
        .map_err(|e| format!("--catalog: {e}"))?;
        let stripe = self.stripe_api()?;
        let placeholders = catalog.placeholder_prices();
        if stripe.is_some() && !placeholders.is_empty() {
            // A live key selling stand-in prices would fail every Checkout: refuse to start.
            if self.stripe_livemode {
                return Err(format!(
                    "--stripe-livemode: the catalog sells placeholder Stripe Prices ({}): set real price ids with --catalog",
                    placeholders.join(", ")
                ));
            }
            tracing::warn!(
                fields = %placeholders.join(", "),
                "the catalog has placeholder Stripe Price ids: Checkout for them will fail; set real ones with --catalog"
            );
        }
        Ok(Settings {
            listen: self.listen,
            database_url: self.database_url()?,
            db_max_connections: self.db_max_connections,
            db_group: crate::storage::batch::Batching {
                max: usize::from(self.db_group_max),
                workers: usize::from(self.db_group_workers),
            },
            limits: Limits {
                hold_ttl_default: delta("--hold-ttl-default", self.hold_ttl_default)?,
                hold_ttl_max: delta("--hold-ttl-max", self.hold_ttl_max)?,
            },
            idempotency_retention: delta("--idempotency-retention", self.idempotency_retention)?,
            sweep_interval: self.sweep_interval,
            request_timeout: self.request_timeout,
            shutdown_grace: self.shutdown_grace,
            http_listen: self.http_listen,
            webhook_secrets: self.webhook_secrets()?,
            stripe_livemode: self.stripe_livemode,
            stripe,
            auth: std::sync::Arc::new(self.auth()?),
            metrics_listen: self.metrics_listen,
            reflection: self.reflection,
            max_concurrent_requests: self.max_concurrent_requests as usize,
            audit_interval: self.audit_interval,
            readiness_interval: self.readiness_interval,
            auto_migrate: self.auto_migrate,
            tls: self.tls()?,
            catalog: std::sync::Arc::new(catalog),
        })
    }
}

/// Options shared by client commands.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Address of a running tally server.
    #[arg(long, env = "TALLY_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Deadline of the call.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// PEM CA bundle to verify an https:// server with.
    #[arg(long, env = "TALLY_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate, for a server that requires mutual TLS (with --tls-client-key).
    #[arg(long, env = "TALLY_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<std::path::PathBuf>,
    /// PEM key of the client certificate.
    #[arg(long, env = "TALLY_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<std::path::PathBuf>,
    /// Bearer token of this caller (when the server has a callers file).
    #[arg(long, env = "TALLY_TOKEN", hide_env_values = true, value_parser = Secret::parse)]
    pub token: Option<Secret>,
}

/// The idempotency key option of mutating commands.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// Idempotency key (generated if omitted; reuse it to retry safely).
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

impl KeyArgs {
    fn key(&self) -> String {
        self.idempotency_key
            .clone()
            .unwrap_or_else(|| format!("cli-{}", uuid::Uuid::now_v7()))
    }
}

fn parse_time(s: &str) -> Result<prost_types::Timestamp, String> {
    let t = chrono::DateTime::parse_from_rfc3339(s)
        .map_err(|e| format!("{s:?}: {e} (use RFC 3339, e.g. 2026-11-01T00:00:00Z)"))?;
    Ok(prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// A client command's failure, printed as one line (or JSON) by `main`.
#[derive(Debug)]
pub struct ClientError {
    /// The stable reason (`INSUFFICIENT_CREDITS`, `UNAVAILABLE`, ...).
    pub reason: String,
    /// What happened.
    pub message: String,
    /// Extra lines (field violations, retry hints).
    pub details: Vec<String>,
    /// The gRPC code's name (`FAILED_PRECONDITION`), when the server answered.
    pub code: Option<&'static str>,
    /// The ErrorInfo metadata (`available`, `requested`, ...).
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl ClientError {
    fn new(reason: &str, message: impl Into<String>, details: Vec<String>) -> Self {
        Self {
            reason: reason.to_owned(),
            message: message.into(),
            details,
            code: None,
            metadata: std::collections::BTreeMap::new(),
        }
    }

    /// The error as `--json` prints it on stderr:
    /// `{"code", "reason", "message", "metadata", "details"}`.
    #[must_use]
    pub fn to_json(&self) -> Value {
        json!({
            "code": self.code,
            "reason": self.reason,
            "message": self.message,
            "metadata": self.metadata,
            "details": self.details,
        })
    }
}

/// Writes a line to stdout; a closed pipe (`tally entries u1 | head -1`) ends the command
/// quietly with status 0, as `ls` does.
pub fn out(text: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)?;
        for d in &self.details {
            write!(f, "\n  {d}")?;
        }
        Ok(())
    }
}

fn status_error(s: &Status, key: Option<&str>) -> ClientError {
    let details = s.get_error_details();
    let reason = details.error_info().map_or_else(
        || crate::grpc::gate::code_name(s.code()).to_owned(),
        |i| i.reason.clone(),
    );
    // The message already lists the violations of an INVALID_ARGUMENT; other codes get them here.
    let mut lines: Vec<String> = details
        .bad_request()
        .filter(|_| s.code() != Code::InvalidArgument)
        .map(|b| {
            b.field_violations
                .iter()
                .map(|v| format!("{}: {}", v.field, v.description))
                .collect()
        })
        .unwrap_or_default();
    if let (Some(key), Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Unknown) =
        (key, s.code())
    {
        lines.push(format!(
            "the outcome may be unknown: retry with --idempotency-key {key}"
        ));
    }
    // A gRPC client pointed at an HTTP port gets an HTTP answer: say so.
    if s.message().contains("grpc-status header missing") {
        return ClientError::new(
            "NOT_GRPC",
            "that address speaks HTTP, not Tally's gRPC (did you mean --server http://HOST:50051?)",
            vec![s.message().to_owned()],
        );
    }
    ClientError {
        reason,
        message: s.message().to_owned(),
        details: lines,
        code: Some(crate::grpc::gate::code_name(s.code())),
        metadata: details
            .error_info()
            .map(|i| i.metadata.clone().into_iter().collect())
            .unwrap_or_default(),
    }
}

async fn channel(c: &ClientArgs) -> Result<Channel, ClientError> {
    // `host:port` alone means plaintext HTTP/2; any scheme but http and https is named.
    let server = match c.server.split_once("://") {
        None => format!("http://{}", c.server),
        Some(("http" | "https", _)) => c.server.clone(),
        Some((scheme, _)) => {
            return Err(ClientError::new(
                "INVALID_ARGUMENT",
                format!("--server {}: {scheme}:// is not Tally's protocol", c.server),
                vec!["use http://HOST:PORT (plaintext) or https://HOST:PORT (TLS)".into()],
            ));
        }
    };
    let tls = server.starts_with("https://");
    let unreachable = |e: &dyn std::error::Error| {
        let hint = if tls {
            "is it running, and does it speak TLS? A plaintext server needs http://; check --tls-ca"
        } else {
            "start one with `tally serve`, or pass --server; a TLS server needs https://"
        };
        ClientError::new(
            "UNAVAILABLE",
            format!("cannot reach tally at {server}: {}", source_chain(e)),
            vec![hint.into()],
        )
    };
    let mut endpoint = Endpoint::from_shared(server.clone())
        .map_err(|e| unreachable(&e))?
        .connect_timeout(Duration::from_secs(5));
    if tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| {
                ClientError::new("INVALID_ARGUMENT", format!("{}: {e}", p.display()), vec![])
            })
        };
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &c.tls_ca {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&c.tls_client_cert, &c.tls_client_key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| unreachable(&e))?;
    }
    endpoint.connect().await.map_err(|e| unreachable(&e))
}

/// An error with its causes (tonic's transport error says only "transport error").
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Sends a mutating call, waiting and sending it again (same request, same idempotency key)
/// while the server answers RESOURCE_EXHAUSTED or UNAVAILABLE with a RetryInfo — a rate limit,
/// an overloaded or briefly unavailable server — as `tally::client` does: at most
/// [`CLI_ATTEMPTS`] attempts, never waiting past `--timeout` in all.
async fn send<Q, R, F, Fut>(
    client: &ClientArgs,
    key: Option<&str>,
    message: Q,
    mut call: F,
) -> Result<R, ClientError>
where
    Q: Clone,
    F: FnMut(Request<Q>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
{
    let deadline = tokio::time::Instant::now() + client.timeout;
    let mut attempt = 1;
    loop {
        match call(request(message.clone(), client)?).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) => {
                let wait = s
                    .get_details_retry_info()
                    .and_then(|r| r.retry_delay)
                    .filter(|_| matches!(s.code(), Code::ResourceExhausted | Code::Unavailable));
                match wait {
                    Some(w)
                        if attempt < CLI_ATTEMPTS && tokio::time::Instant::now() + w < deadline =>
                    {
                        tokio::time::sleep(w.max(Duration::from_millis(5))).await;
                        attempt += 1;
                    }
                    _ => return Err(status_error(&s, key)),
                }
            }
        }
    }
}

/// Most attempts of one CLI call that the server asked to retry: 8.
pub const CLI_ATTEMPTS: u32 = 8;

fn request<T>(message: T, client: &ClientArgs) -> Result<Request<T>, ClientError> {
    let mut r = Request::new(message);
    r.set_timeout(client.timeout);
    if let Some(token) = &client.token {
        let value = format!("Bearer {}", token.expose()).parse().map_err(|_| {
            ClientError::new(
                "INVALID_ARGUMENT",
                "--token: not a valid header value",
                Vec::new(),
            )
        })?;
        r.metadata_mut().insert("authorization", value);
    }
    Ok(r)
}

fn time(t: Option<&prost_types::Timestamp>) -> Value {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map_or(Value::Null, |t| {
            Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        })
}

fn state_name(s: i32) -> String {
    pb::HoldState::try_from(s).map_or_else(
        |_| "unknown".into(),
        |s| {
            s.as_str_name()
                .trim_start_matches("HOLD_STATE_")
                .to_lowercase()
        },
    )
}

fn hold_json(h: &pb::Hold) -> Value {
    json!({
        "hold_id": h.hold_id, "account_id": h.account_id, "amount": h.amount, "state": state_name(h.state),
        "committed_amount": h.committed_amount, "refunded_amount": h.refunded_amount,
        "created_at": time(h.created_at.as_ref()), "expires_at": time(h.expires_at.as_ref()),
        "resolved_at": time(h.resolved_at.as_ref()), "metadata": h.metadata,
    })
}

fn hold_line(h: &pb::Hold) -> String {
    let when = match pb::HoldState::try_from(h.state) {
        Ok(pb::HoldState::Open) => format!(
            "expires {}",
            time(h.expires_at.as_ref()).as_str().unwrap_or("?")
        ),
        Ok(pb::HoldState::Committed) => format!(
            "committed {} refunded {}",
            h.committed_amount, h.refunded_amount
        ),
        _ => format!(
            "at {}",
            time(h.resolved_at.as_ref()).as_str().unwrap_or("?")
        ),
    };
    format!(
        "{}  {:<9}  {:>8}  {}  {when}",
        h.hold_id,
        state_name(h.state),
        h.amount,
        h.account_id
    )
}

/// Prints `value` as JSON or `text` as text.
fn print(json: bool, value: &Value, text: &str) {
    if json {
        out(&format!("{value:#}"));
    } else {
        out(text);
    }
}

/// Runs a client command.
///
/// # Errors
/// [`ClientError`] for an unreachable server or an error status.
#[allow(clippy::too_many_lines, clippy::many_single_char_names)] // one arm per command: decode → call → print
pub async fn run_client(command: Command) -> Result<(), ClientError> {
    match command {
        Command::Serve(_)
        | Command::Migrate { .. }
        | Command::Config { .. }
        | Command::Bench(_)
        | Command::Auth { .. }
        | Command::Catalog { .. }
        | Command::Stripe { .. } => Ok(()),
        Command::Estimate {
            operation,
            params,
            client,
        } => {
            let mut svc = CreditServiceClient::new(channel(&client).await?);
            let req = pb::EstimateCostRequest {
                operation,
                params: params.into_iter().collect(),
            };
            let e = svc
                .estimate_cost(request(req, &client)?)
                .await
                .map_err(|s| status_error(&s, None))?
                .into_inner();
            let factors: Vec<Value> = e
                .factors
                .iter()
                .map(|f| json!({"name": f.name, "value": f.value, "detail": f.detail}))
                .collect();
            let v = json!({"cost": e.cost, "exact": e.exact, "factors": factors});
            let mut text = format!("{} credits", e.cost);
            for f in &e.factors {
                let _ = write!(text, "\n  {:<12} {}", f.name, f.detail);
            }
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Balance { account, client } => {
            let mut svc = CreditServiceClient::new(channel(&client).await?);
            let b = svc
                .check_balance(request(
                    pb::CheckBalanceRequest {
                        account_id: account,
                    },
                    &client,
                )?)
                .await
                .map_err(|s| status_error(&s, None))?
                .into_inner();
            let next = b
                .next_expiry
                .as_ref()
                .map(|e| json!({"at": time(e.at.as_ref()), "amount": e.amount}));
            let v = json!({
                "account_id": b.account_id, "plan": b.plan, "available": b.available, "held": b.held,
                "debt": b.debt,
                "open_holds": b.open_holds, "low_balance": b.low_balance, "by_source": b.by_source,
                "next_expiry": next, "allowance_left": b.allowance_left,
            });
            let mut text = format!(
                "account     {}\nplan        {}\navailable   {}{}\nheld        {}\nopen holds  {}",
                b.account_id,
                b.plan,
                b.available,
                match (b.debt, b.low_balance) {
                    (0, false) => String::new(),
                    (0, true) => "  (low)".to_owned(),
                    (d, _) => format!("  (after {d} owed)"),
                },
                b.held,
                b.open_holds
            );
            let mut sources: Vec<_> = b.by_source.iter().collect();
            sources.sort();
            for (s, n) in sources {
                let _ = write!(text, "\n  {s:<14} {n}");
            }
            if let Some(left) = b.allowance_left {
                let _ = write!(text, "\nallowance left this period  {left}");
            }
            if let Some(e) = &b.next_expiry {
                let _ = write!(
                    text,
                    "\nnext expiry  {} at {}",
                    e.amount,
                    time(e.at.as_ref()).as_str().unwrap_or("?")
                );
            }
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Reserve {
            account,
            amount,
            operation,
            params,
            ttl,
            metadata,
            key,
            client,
        } => {
            let svc = CreditServiceClient::new(channel(&client).await?);
            let k = key.key();
            let ttl = ttl.map(|d| prost_types::Duration {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
            });
            let req = pb::ReserveRequest {
                account_id: account,
                amount: amount.unwrap_or(0),
                idempotency_key: k.clone(),
                ttl,
                metadata: metadata.into_iter().collect(),
                operation: operation.map(|operation| pb::PricedOperation {
                    operation,
                    params: params.into_iter().collect(),
                }),
            };
            let r = send(&client, Some(&k), req, |r| {
                let mut svc = svc.clone();
                async move { svc.reserve(r).await }
            })
            .await?;
            let h = r.hold.unwrap_or_default();
            let v = json!({"hold": hold_json(&h), "available": r.available});
            let text = format!(
                "{}  reserved {} on {}, expires {} (available now {})",
                h.hold_id,
                h.amount,
                h.account_id,
                time(h.expires_at.as_ref()).as_str().unwrap_or("?"),
                r.available
            );
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Commit {
            hold,
            amount,
            key,
            client,
        } => {
            let svc = CreditServiceClient::new(channel(&client).await?);
            let k = key.key();
            let req = pb::CommitRequest {
                hold_id: hold,
                amount,
                idempotency_key: k.clone(),
            };
            let r = send(&client, Some(&k), req, |r| {
                let mut svc = svc.clone();
                async move { svc.commit(r).await }
            })
            .await?;
            let h = r.hold.unwrap_or_default();
            let v = json!({"hold": hold_json(&h), "released": r.released, "extra_drawn": r.extra_drawn, "available": r.available});
            let text = format!(
                "{}  committed {} (released {}, extra drawn {}; available now {})",
                h.hold_id, h.committed_amount, r.released, r.extra_drawn, r.available
            );
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Refund {
            hold,
            amount,
            reason,
            key,
            client,
        } => {
            let svc = CreditServiceClient::new(channel(&client).await?);
            let k = key.key();
            let req = pb::RefundRequest {
                hold_id: hold,
                amount,
                reason,
                idempotency_key: k.clone(),
            };
            let r = send(&client, Some(&k), req, |r| {
                let mut svc = svc.clone();
                async move { svc.refund(r).await }
            })
            .await?;
            let h = r.hold.unwrap_or_default();
            let v =
                json!({"hold": hold_json(&h), "refunded": r.refunded, "available": r.available});
            let text = format!(
                "{}  refunded {} ({}; available now {})",
                h.hold_id,
                r.refunded,
                state_name(h.state),
                r.available
            );
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Extend {
            hold,
            ttl,
            key,
            client,
        } => {
            let svc = CreditServiceClient::new(channel(&client).await?);
            let k = key.key();
            let ttl = prost_types::Duration {
                seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
                nanos: 0,
            };
            let req = pb::ExtendHoldRequest {
                hold_id: hold,
                ttl: Some(ttl),
                idempotency_key: k.clone(),
            };
            let r = send(&client, Some(&k), req, |r| {
                let mut svc = svc.clone();
                async move { svc.extend_hold(r).await }
            })
            .await?;
            let h = r.hold.unwrap_or_default();
            let text = format!(
                "{}  expires {}",
                h.hold_id,
                time(h.expires_at.as_ref()).as_str().unwrap_or("?")
            );
            print(client.json, &json!({"hold": hold_json(&h)}), &text);
            Ok(())
        }
        Command::Hold { hold, client } => {
            let mut svc = CreditServiceClient::new(channel(&client).await?);
            let r = svc
                .get_hold(request(pb::GetHoldRequest { hold_id: hold }, &client)?)
                .await
                .map_err(|s| status_error(&s, None))?
                .into_inner();
            let h = r.hold.unwrap_or_default();
            print(client.json, &hold_json(&h), &hold_line(&h));
            Ok(())
        }
        Command::Holds {
            account,
            all,
            page_size,
            client,
        } => {
            let mut svc = CreditServiceClient::new(channel(&client).await?);
            let states = if all {
                vec![]
            } else {
                vec![pb::HoldState::Open.into()]
            };
            let mut holds = Vec::new();
            let mut page_token = String::new();
            loop {
                let req = pb::ListHoldsRequest {
                    account_id: account.clone(),
                    states: states.clone(),
                    page_size,
                    page_token,
                };
                let r = svc
                    .list_holds(request(req, &client)?)
                    .await
                    .map_err(|s| status_error(&s, None))?
                    .into_inner();
                holds.extend(r.holds);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            let v = Value::Array(holds.iter().map(hold_json).collect());
            let text = if holds.is_empty() {
                format!("no {}holds on {account}", if all { "" } else { "open " })
            } else {
                holds.iter().map(hold_line).collect::<Vec<_>>().join("\n")
            };
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Account {
            action: AccountCommand::Show { account, client },
        } => {
            let mut svc = AdminServiceClient::new(channel(&client).await?);
            let r = svc
                .get_account(request(
                    pb::GetAccountRequest {
                        account_id: account,
                    },
                    &client,
                )?)
                .await
                .map_err(|s| status_error(&s, None))?
                .into_inner();
            let a = r.account.unwrap_or_default();
            let v = json!({
                "account_id": a.account_id, "plan": a.plan, "available": a.available, "held": a.held,
                "debt": a.debt,
                "open_holds": a.open_holds, "low_balance": a.low_balance,
                "low_balance_threshold": a.low_balance_threshold, "entitlements": a.entitlements,
                "created_at": time(a.created_at.as_ref()),
                "holds": r.open_holds.iter().map(hold_json).collect::<Vec<_>>(),
                "grants": r.grants.iter().map(|g| json!({
                    "grant_id": g.grant_id, "source": g.source, "granted": g.granted, "remaining": g.remaining,
                    "held": g.held, "expired": g.expired, "expires_at": time(g.expires_at.as_ref()), "priority": g.priority,
                })).collect::<Vec<_>>(),
            });
            let mut text = format!(
                "account     {}\nplan        {} ({})\navailable   {}{}\nheld        {}\nopen holds  {}",
                a.account_id,
                a.plan,
                a.plan_display_name,
                a.available,
                if a.low_balance {
                    format!("  (low: under {})", a.low_balance_threshold)
                } else {
                    String::new()
                },
                a.held,
                a.open_holds
            );
            let mut ents: Vec<_> = a.entitlements.iter().collect();
            ents.sort();
            for (k, v) in ents {
                let _ = write!(text, "\n  {k} = {v}");
            }
            for g in &r.grants {
                let expiry = g.expires_at.as_ref().map_or_else(
                    || "never expires".to_owned(),
                    |t| format!("expires {}", time(Some(t)).as_str().unwrap_or("?")),
                );
                let _ = write!(
                    text,
                    "\n{}  {:<12} {:>8} of {:<8} held {:<6} priority {:<3} {expiry}",
                    g.grant_id, g.source, g.remaining, g.granted, g.held, g.priority
                );
            }
            for h in &r.open_holds {
                let _ = write!(text, "\n{}", hold_line(h));
            }
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Account {
            action:
                AccountCommand::SetPlan {
                    account,
                    plan,
                    key,
                    client,
                },
        } => {
            let svc = AdminServiceClient::new(channel(&client).await?);
            let k = key.key();
            let req = pb::SetPlanRequest {
                account_id: account,
                plan,
                idempotency_key: k.clone(),
            };
            let r = send(&client, Some(&k), req, |r| {
                let mut svc = svc.clone();
                async move { svc.set_plan(r).await }
            })
            .await?;
            let v = json!({"account_id": r.account_id, "previous_plan": r.previous_plan, "plan": r.plan});
            print(
                client.json,
                &v,
                &format!("{}: plan {} → {}", r.account_id, r.previous_plan, r.plan),
            );
            Ok(())
        }
        Command::Account {
            action:
                AccountCommand::List {
                    plan,
                    low_balance,
                    client,
                },
        } => {
            let mut svc = AdminServiceClient::new(channel(&client).await?);
            let mut rows = Vec::new();
            let mut page_token = String::new();
            loop {
                let req = pb::ListAccountsRequest {
                    plan: plan.clone().unwrap_or_default(),
                    low_balance_only: low_balance,
                    page_size: 500,
                    page_token,
                };
                let r = svc
                    .list_accounts(request(req, &client)?)
                    .await
                    .map_err(|s| status_error(&s, None))?
                    .into_inner();
                rows.extend(r.accounts);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            let v = Value::Array(rows.iter().map(|a| json!({"account_id": a.account_id, "plan": a.plan, "available": a.available, "held": a.held, "debt": a.debt, "low_balance": a.low_balance})).collect());
            let text = rows
                .iter()
                .map(|a| {
                    format!(
                        "{:<32} {:<12} {:>10} {:>8}{}",
                        a.account_id,
                        a.plan,
                        a.available,
                        a.held,
                        if a.low_balance { "  low" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            print(
                client.json,
                &v,
                if rows.is_empty() {
                    "no accounts"
                } else {
                    &text
                },
            );
            Ok(())
        }
        Command::Entries {
            account,
            kinds,
            since,
            until,
            limit,
            client,
        } => {
            let mut svc = AdminServiceClient::new(channel(&client).await?);
            let mut entries = Vec::new();
            let mut page_token = String::new();
            while entries.len() < limit {
                let req = pb::ListEntriesRequest {
                    account_id: account.clone().unwrap_or_default(),
                    kinds: kinds.clone(),
                    since,
                    until,
                    page_size: i32::try_from(limit.saturating_sub(entries.len()).min(500))
                        .unwrap_or(500),
                    page_token,
                };
                let r = svc
                    .list_entries(request(req, &client)?)
                    .await
                    .map_err(|s| status_error(&s, None))?
                    .into_inner();
                entries.extend(r.entries);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            let v = Value::Array(entries.iter().map(|e| json!({
                "entry_id": e.entry_id, "account_id": e.account_id, "hold_id": e.hold_id, "kind": e.kind,
                "available_delta": e.available_delta, "held_delta": e.held_delta, "reason": e.reason,
                "created_at": time(e.created_at.as_ref()),
            })).collect());
            let text = entries
                .iter()
                .map(|e| {
                    format!(
                        "{:>8}  {}  {:<8} {:<24} available {:+} held {:+} {}",
                        e.entry_id,
                        time(e.created_at.as_ref()).as_str().unwrap_or("?"),
                        e.kind,
                        e.account_id,
                        e.available_delta,
                        e.held_delta,
                        e.reason
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            print(
                client.json,
                &v,
                if entries.is_empty() {
                    "no entries"
                } else {
                    &text
                },
            );
            Ok(())
        }
        Command::Export {
            since,
            until,
            account,
            client,
        } => {
            let mut svc = AdminServiceClient::new(channel(&client).await?);
            let req = pb::ExportUsageRequest {
                since: Some(since),
                until: Some(until),
                account_id: account.unwrap_or_default(),
            };
            let mut stream = svc
                .export_usage(request(req, &client)?)
                .await
                .map_err(|s| status_error(&s, None))?
                .into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = stream.message().await.map_err(|s| status_error(&s, None))? {
                if let Err(e) = std::io::Write::write_all(&mut out, &chunk.csv) {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        // `tally export ... | head`: the reader has what it wanted.
                        std::process::exit(0);
                    }
                    return Err(ClientError::new("IO", e.to_string(), vec![]));
                }
            }
            Ok(())
        }
        Command::Account {
            action:
                AccountCommand::Grant {
                    account,
                    amount,
                    reason,
                    source,
                    expires_in,
                    priority,
                    key,
                    client,
                },
        } => {
            let svc = AdminServiceClient::new(channel(&client).await?);
            let k = key.key();
            let expires_at = expires_in
                .and_then(|d| chrono::TimeDelta::from_std(d).ok())
                .and_then(|d| chrono::Utc::now().checked_add_signed(d))
                .map(|t| prost_types::Timestamp {
                    seconds: t.timestamp(),
                    nanos: 0,
                });
            let req = pb::GrantRequest {
                account_id: account,
                amount,
                reason,
                idempotency_key: k.clone(),
                source,
                expires_at,
                priority,
            };
            let r = send(&client, Some(&k), req, |r| {
                let mut svc = svc.clone();
                async move { svc.grant(r).await }
            })
            .await?;
            let v = json!({"account_id": r.account_id, "grant_id": r.grant_id, "available": r.available});
            let text = format!(
                "granted {amount} to {} ({}; available now {})",
                r.account_id, r.grant_id, r.available
            );
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Account {
            action:
                AccountCommand::Open {
                    account,
                    plan,
                    key,
                    client,
                },
        } => {
            let svc = AdminServiceClient::new(channel(&client).await?);
            let k = key.key();
            let req = pb::OpenAccountRequest {
                account_id: account,
                plan,
                idempotency_key: k.clone(),
            };
            let r = send(&client, Some(&k), req, |r| {
                let mut svc = svc.clone();
                async move { svc.open_account(r).await }
            })
            .await?;
            let v = json!({"account_id": r.account_id, "plan": r.plan, "bonus": r.bonus, "available": r.available});
            let text = format!(
                "opened {} on {} (bonus {}; available now {})",
                r.account_id, r.plan, r.bonus, r.available
            );
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Account {
            action:
                AccountCommand::Adjust {
                    account,
                    delta,
                    reason,
                    operator,
                    key,
                    client,
                },
        } => {
            let svc = AdminServiceClient::new(channel(&client).await?);
            let k = key.key();
            let req = pb::AdjustRequest {
                account_id: account,
                delta,
                reason,
                operator,
                idempotency_key: k.clone(),
            };
            let r = send(&client, Some(&k), req, |r| {
                let mut svc = svc.clone();
                async move { svc.adjust(r).await }
            })
            .await?;
            let v = json!({"account_id": r.account_id, "delta": r.delta, "available": r.available});
            print(
                client.json,
                &v,
                &format!(
                    "adjusted {} by {:+} (available now {})",
                    r.account_id, r.delta, r.available
                ),
            );
            Ok(())
        }
        Command::Account {
            action:
                AccountCommand::Transfer {
                    from,
                    to,
                    amount,
                    reason,
                    key,
                    client,
                },
        } => {
            let svc = AdminServiceClient::new(channel(&client).await?);
            let k = key.key();
            let req = pb::TransferRequest {
                from_account_id: from.clone(),
                to_account_id: to.clone(),
                amount,
                reason,
                idempotency_key: k.clone(),
            };
            let r = send(&client, Some(&k), req, |r| {
                let mut svc = svc.clone();
                async move { svc.transfer(r).await }
            })
            .await?;
            let v = json!({"from": from, "to": to, "amount": r.amount, "from_available": r.from_available, "to_available": r.to_available});
            let text = format!(
                "moved {} from {from} (now {}) to {to} (now {})",
                r.amount, r.from_available, r.to_available
            );
            print(client.json, &v, &text);
            Ok(())
        }
    }
}

/// Runs `tally catalog ...`.
///
/// # Errors
/// The validation error of the file.
pub fn run_catalog(action: &CatalogCommand) -> Result<(), String> {
    match action {
        CatalogCommand::PrintDefault => {
            print!("{}", crate::catalog::DEFAULT_TOML);
            Ok(())
        }
        CatalogCommand::Check { path } => {
            let c = Catalog::load(path).map_err(|e| e.to_string())?;
            println!(
                "ok: {} plans ({}), {} packs, {} priced operations ({})",
                c.plans.len(),
                c.plans.keys().cloned().collect::<Vec<_>>().join(", "),
                c.packs.len(),
                c.pricing.len(),
                c.pricing.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            Ok(())
        }
    }
}

/// Runs `tally config ...`.
pub fn run_config(action: &ConfigCommand) {
    match action {
        ConfigCommand::PrintDefault => {
            print!(
                "{}",
                crate::config::print_default(&<Cli as clap::CommandFactory>::command())
            );
        }
    }
}

/// Runs `tally auth ...`.
///
/// # Errors
/// Standard input cannot be read or is empty.
pub fn run_auth(action: &AuthCommand) -> Result<(), String> {
    match action {
        AuthCommand::NewToken => {
            let token = crate::auth::new_token();
            println!("token        {token}");
            println!("token_sha256 {}", crate::auth::hash_token(&token));
        }
        AuthCommand::HashToken => {
            let mut token = String::new();
            std::io::stdin()
                .read_line(&mut token)
                .map_err(|e| format!("standard input: {e}"))?;
            if token.trim().is_empty() {
                return Err("give the token on standard input".into());
            }
            println!("{}", crate::auth::hash_token(&token));
        }
    }
    Ok(())
}

/// Runs `tally stripe sync ACCOUNT`.
///
/// # Errors
/// A message for people.
pub async fn run_stripe(action: StripeCommand) -> Result<(), String> {
    let StripeCommand::Sync { account, serve } = action;
    let settings = serve.settings()?;
    let api = settings
        .stripe
        .clone()
        .ok_or("no Stripe API key: set TALLY_STRIPE_API_KEY or --stripe-api-key")?;
    let account_id =
        crate::domain::AccountId::parse("account", &account).map_err(|e| e.to_string())?;
    let engine = crate::app::open_store(
        &settings.database_url,
        2,
        std::sync::Arc::new(settings.catalog.policy()),
    )
    .await
    .map_err(|e| e.to_string())?;
    let state = crate::http::HttpState {
        ledger: crate::ledger::Ledger::new(engine, settings.limits),
        catalog: settings.catalog.clone(),
        webhook_secrets: std::sync::Arc::new(Vec::new()),
        livemode: settings.stripe_livemode,
        stripe: Some(api.clone()),
        auth: std::sync::Arc::clone(&settings.auth),
        readiness: crate::health::Readiness::default(),
    };
    let v = crate::http::billing::resync_subscription(&state, &api, &account_id).await?;
    println!("{v:#}");
    Ok(())
}
