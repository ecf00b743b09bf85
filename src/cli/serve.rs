//! `tally serve` and `tally migrate`: the server's options and how they become [`Settings`].

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use crate::app::Settings;
use crate::auth::{Auth, Callers, Principal, Rate, RateLimits};
use crate::catalog::Catalog;
use crate::config::{Secret, secret_from};
use crate::ledger::Limits;

/// Options of `tally serve` (also read by `migrate` and `stripe`): flags, TALLY_* variables
/// and an optional TOML file.
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
    /// Browser origins allowed to call the gRPC port with gRPC-Web (CORS), comma-separated,
    /// e.g. `https://app.example.com` (at most 32; none by default: server-side callers such as
    /// Next.js routes and Edge functions need no CORS).
    #[arg(long, env = "TALLY_GRPC_WEB_ORIGINS", value_delimiter = ',')]
    pub grpc_web_origins: Vec<String>,
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
    /// The mean CreditService call latency the adaptive concurrency limit keeps (0s: off,
    /// only --max-concurrent-requests). Past the limit, calls that start work (Reserve,
    /// CheckBalance) are refused at once with UNAVAILABLE (OVERLOADED) and a retry delay;
    /// Commit, Refund and ExtendHold are never refused by it.
    /// Default: 20ms on PostgreSQL, 250ms on SQLite.
    #[arg(long, env = "TALLY_OVERLOAD_LATENCY_TARGET", value_parser = humantime::parse_duration)]
    pub overload_latency_target: Option<Duration>,
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
    /// Group commit on PostgreSQL: account books kept in memory between calls (0 = none), so a
    /// call on a known account is one statement in one round trip, checked against the
    /// account's version (another replica's write makes it run again under row locks). About
    /// 4 KB of memory a book.
    #[arg(long, env = "TALLY_DB_BOOK_CACHE", default_value_t = 50_000, value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub db_book_cache: u32,
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
    /// Outbound events: the delay before each attempt (the first is the first attempt's);
    /// after the last one fails, the event is failed. Each delay is spread by ±20 %.
    #[arg(
        long,
        env = "TALLY_EVENTS_RETRY_SCHEDULE",
        default_value = "0s,5s,5m,30m,2h,5h,10h,10h"
    )]
    pub events_retry_schedule: String,
    /// Outbound events: one attempt's limit (connect, send, answer), 1s..=60s.
    #[arg(long, env = "TALLY_EVENTS_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub events_timeout: Duration,
    /// Outbound events: allow endpoints on loopback and private addresses (refused by default:
    /// SSRF). For tests and in-cluster receivers.
    #[arg(long, env = "TALLY_EVENTS_ALLOW_PRIVATE")]
    pub events_allow_private: bool,
    /// Outbound events: delivered and failed events are deleted this long after their last
    /// attempt (1h..=3650days).
    #[arg(long, env = "TALLY_EVENTS_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub events_retention: Duration,
    /// Outbound events: how often an idle dispatcher looks for due events (10ms..=10s).
    #[arg(long, env = "TALLY_EVENTS_POLL_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub events_poll_interval: Duration,
    /// Outbound events: requests in flight at once.
    #[arg(long, env = "TALLY_EVENTS_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub events_concurrency: u32,
    /// Outbound events: how often `credits.expiring`, retention and the outbox gauges run
    /// (100ms..=1h).
    #[arg(long, env = "TALLY_EVENTS_HOUSEKEEPING_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub events_housekeeping_interval: Duration,
    /// Live balances: WatchBalance and SSE streams open at once on this server (1..=1000000);
    /// more are refused with RESOURCE_EXHAUSTED (TOO_MANY_STREAMS) / 429.
    #[arg(long, env = "TALLY_WATCH_MAX_STREAMS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub watch_max_streams: u32,
    /// Live balances: streams one caller may hold open at once on this server (1..=1000000).
    #[arg(long, env = "TALLY_WATCH_MAX_STREAMS_PER_CALLER", default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub watch_max_streams_per_caller: u32,
    /// Live balances: how often an idle watched account is read again (1s..=1h), which also
    /// shows what time alone changes (a new allowance period).
    #[arg(long, env = "TALLY_WATCH_RESYNC_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub watch_resync_interval: Duration,
    /// Live balances: the SSE stream's heartbeat comment interval (1s..=5m), so proxies keep
    /// an idle stream open.
    #[arg(long, env = "TALLY_WATCH_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub watch_heartbeat_interval: Duration,
    /// Serve the admin console under /admin on the HTTP sidecar (sign in with an admin-role
    /// token; off by default).
    #[arg(long, env = "TALLY_ADMIN_CONSOLE")]
    pub admin_console: bool,
    /// Key signing console sessions (≥ 32 bytes; the same on every replica). Unset: a random
    /// key per process, so sessions end at restart and stick to one replica.
    #[arg(
        long,
        env = "TALLY_ADMIN_SESSION_KEY",
        hide_env_values = true,
        hide_default_value = true,
        value_parser = Secret::parse
    )]
    pub admin_session_key: Option<Secret>,
    /// File holding the session key (for Kubernetes Secrets); preferred over the value.
    #[arg(long, env = "TALLY_ADMIN_SESSION_KEY_FILE")]
    pub admin_session_key_file: Option<std::path::PathBuf>,
    /// How long a console session lasts (1s..=24h).
    #[arg(long, env = "TALLY_ADMIN_SESSION_TTL", default_value = "8h", value_parser = humantime::parse_duration)]
    pub admin_session_ttl: Duration,
}

/// Longest hold TTL the server may be configured with.
pub const HOLD_TTL_MAX_LIMIT: Duration = Duration::from_hours(7 * 24);
/// Shortest idempotency retention.
pub const IDEMPOTENCY_RETENTION_MIN: Duration = Duration::from_hours(24);

fn delta(field: &str, d: Duration) -> Result<chrono::TimeDelta, String> {
    chrono::TimeDelta::from_std(d).map_err(|_| format!("{field}: out of range"))
}

/// `d` if within `lo..=hi`, else a message naming `flag`.
fn between(flag: &str, d: Duration, lo: Duration, hi: Duration) -> Result<Duration, String> {
    if d < lo || d > hi {
        Err(format!("{flag}: must be between {lo:?} and {hi:?}"))
    } else {
        Ok(d)
    }
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

    fn admin(&self) -> Result<Option<crate::app::AdminSettings>, String> {
        if !self.admin_console {
            return Ok(None);
        }
        let session_ttl = between(
            "--admin-session-ttl",
            self.admin_session_ttl,
            Duration::from_secs(1),
            crate::http::admin::SESSION_TTL_MAX,
        )?;
        let session_key = if let Some(k) = secret_from(
            "--admin-session-key",
            self.admin_session_key_file.as_deref(),
            self.admin_session_key.as_ref(),
        )? {
            crate::http::admin::SessionKey::from_secret(&k)?
        } else {
            tracing::warn!(
                "--admin-session-key is not set: console sessions use a random key, end at restart and work on this replica only"
            );
            crate::http::admin::SessionKey::random()
        };
        Ok(Some(crate::app::AdminSettings {
            session_key,
            session_ttl,
        }))
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

    /// The events dispatcher's settings and endpoints (secrets from the environment variables
    /// the catalog names).
    fn events(&self, catalog: &Catalog) -> Result<crate::app::EventSettings, String> {
        let config = crate::events::Config {
            schedule: crate::events::parse_schedule(&self.events_retry_schedule)
                .map_err(|e| format!("--events-retry-schedule: {e}"))?,
            timeout: between(
                "--events-timeout",
                self.events_timeout,
                Duration::from_secs(1),
                Duration::from_mins(1),
            )?,
            allow_private: self.events_allow_private,
            retention: delta(
                "--events-retention",
                between(
                    "--events-retention",
                    self.events_retention,
                    Duration::from_hours(1),
                    Duration::from_hours(3650 * 24),
                )?,
            )?,
            poll: between(
                "--events-poll-interval",
                self.events_poll_interval,
                Duration::from_millis(10),
                Duration::from_secs(10),
            )?,
            concurrency: self.events_concurrency as usize,
            housekeeping: between(
                "--events-housekeeping-interval",
                self.events_housekeeping_interval,
                Duration::from_millis(100),
                Duration::from_hours(1),
            )?,
        };
        let mut targets = Vec::new();
        for (name, e) in &catalog.events.endpoints {
            let url: http::Uri = e
                .url
                .parse()
                .map_err(|err| format!("--catalog: events.endpoints.{name}.url: {err}"))?;
            crate::events::check_target(name, &url, self.events_allow_private)?;
            let (raw, from) = match &e.secret {
                crate::catalog::SecretSource::Env(var) => (
                    std::env::var(var).map_err(|_| {
                        format!(
                            "events endpoint {name}: the environment variable {var} (its signing secret, whsec_…) is not set"
                        )
                    })?,
                    var.clone(),
                ),
                crate::catalog::SecretSource::File(path) => (
                    std::fs::read_to_string(path).map_err(|err| {
                        format!(
                            "events endpoint {name}: its secret_file {}: {err}",
                            path.display()
                        )
                    })?,
                    path.display().to_string(),
                ),
            };
            let secrets = raw
                .split_whitespace()
                .map(crate::domain::webhook::Secret::parse)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| format!("events endpoint {name}: {from}: {err}"))?;
            if secrets.is_empty() || secrets.len() > 2 {
                return Err(format!(
                    "events endpoint {name}: {from} holds one secret, or two (space-separated) during a rotation"
                ));
            }
            targets.push(crate::events::Target {
                name: name.clone(),
                url,
                secrets,
            });
        }
        Ok(crate::app::EventSettings { config, targets })
    }

    fn watch(&self) -> Result<crate::app::WatchSettings, String> {
        Ok(crate::app::WatchSettings {
            limits: crate::ledger::watch::WatchLimits {
                max_streams: self.watch_max_streams as usize,
                max_streams_per_caller: self.watch_max_streams_per_caller as usize,
                resync_interval: between(
                    "--watch-resync-interval",
                    self.watch_resync_interval,
                    Duration::from_secs(1),
                    Duration::from_hours(1),
                )?,
            },
            heartbeat: between(
                "--watch-heartbeat-interval",
                self.watch_heartbeat_interval,
                Duration::from_secs(1),
                Duration::from_mins(5),
            )?,
        })
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
                books: self.db_book_cache as usize,
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
            grpc_web_origins: crate::app::web_origins(&self.grpc_web_origins)?,
            max_concurrent_requests: self.max_concurrent_requests as usize,
            overload_latency_target: self.overload_latency_target,
            audit_interval: self.audit_interval,
            readiness_interval: self.readiness_interval,
            auto_migrate: self.auto_migrate,
            tls: self.tls()?,
            events: self.events(&catalog)?,
            watch: self.watch()?,
            admin: self.admin()?,
            catalog: std::sync::Arc::new(catalog),
        })
    }
}
