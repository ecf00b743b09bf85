//! Wiring: open the store, bind the listener, serve gRPC with health and reflection, run the
//! sweeper, and stop everything on one shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::catalog::Catalog;
use crate::domain::plan::Policy;
use crate::grpc::{AdminApi, CreditApi, MAX_MESSAGE_BYTES};
use crate::ledger::Engine;
use crate::ledger::{Ledger, Limits};
use crate::pb::admin_service_server::AdminServiceServer;
use crate::pb::credit_service_server::CreditServiceServer;
use crate::storage::StorageError;
use crate::storage::batch::Batching;
use crate::storage::postgres::PgStore;
use crate::storage::sqlite::SqliteStore;

/// Largest header list a client may send: 16 KiB.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// The outbound events' dispatcher and its endpoints.
#[derive(Clone, Debug, Default)]
pub struct EventSettings {
    /// How it delivers.
    pub config: crate::events::Config,
    /// Where (from the catalog, with their secrets).
    pub targets: Vec<crate::events::Target>,
}

/// How live balances are served (WatchBalance, the SSE stream).
#[derive(Clone, Copy, Debug)]
pub struct WatchSettings {
    /// Caps on open streams and the idle re-read.
    pub limits: crate::ledger::watch::WatchLimits,
    /// The SSE heartbeat comment interval.
    pub heartbeat: Duration,
}

/// The SSE heartbeat interval by default: 15 s.
pub const WATCH_HEARTBEAT_DEFAULT: Duration = Duration::from_secs(15);

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            limits: crate::ledger::watch::WatchLimits::default(),
            heartbeat: WATCH_HEARTBEAT_DEFAULT,
        }
    }
}

/// Everything `serve` needs, already validated.
#[derive(Clone, Debug)]
pub struct Settings {
    /// gRPC listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// `sqlite://path` or `postgres://...`. Never logged as is: see [`redact_url`].
    pub database_url: String,
    /// Pool size.
    pub db_max_connections: u32,
    /// PostgreSQL group commit of job-path calls.
    pub db_group: Batching,
    /// TTL limits.
    pub limits: Limits,
    /// How long idempotency records are kept (at least 24 h).
    pub idempotency_retention: TimeDelta,
    /// How often the sweeper looks for expired holds.
    pub sweep_interval: Duration,
    /// Server-side cap on any call's duration (the client's deadline applies if shorter).
    pub request_timeout: Duration,
    /// How long shutdown waits for in-flight calls.
    pub shutdown_grace: Duration,
    /// Plans, packs and prices.
    pub catalog: Arc<Catalog>,
    /// Outbound events.
    pub events: EventSettings,
    /// Live balances.
    pub watch: WatchSettings,
    /// HTTP sidecar listen address (Stripe webhooks, /healthz, /readyz).
    pub http_listen: SocketAddr,
    /// Stripe webhook endpoint secrets (at most two, for rotation). Never logged.
    pub webhook_secrets: Vec<crate::stripe::WebhookSecret>,
    /// Whether the Stripe key is live mode (events of the other mode are refused).
    pub stripe_livemode: bool,
    /// Stripe API client (none: billing endpoints answer 503).
    pub stripe: Option<crate::stripe::client::StripeApi>,
    /// Who may call what (open, on loopback only, when no callers are configured).
    pub auth: Arc<crate::auth::Auth>,
    /// Operator listener: `/metrics`, `/healthz`, `/readyz`.
    pub metrics_listen: SocketAddr,
    /// Serve gRPC reflection (v1 and v1alpha).
    pub reflection: bool,
    /// Browser origins allowed to call with gRPC-Web (CORS); empty: no CORS headers at all.
    pub grpc_web_origins: Vec<http::HeaderValue>,
    /// gRPC calls in flight at once over all connections; more are shed with UNAVAILABLE.
    pub max_concurrent_requests: usize,
    /// The mean CreditService call latency the adaptive concurrency limit aims at (zero: no
    /// adaptive limit, only `max_concurrent_requests`; none: the backend's default,
    /// [`overload_latency_target`]).
    pub overload_latency_target: Option<Duration>,
    /// How often the ledger reconciliation runs (zero: never).
    pub audit_interval: Duration,
    /// How often readiness checks the database.
    pub readiness_interval: Duration,
    /// Apply migrations at start (off when a migration Job does it).
    pub auto_migrate: bool,
    /// TLS (and, with a client CA, mutual TLS) on the gRPC listener.
    pub tls: Option<TlsFiles>,
    /// The admin console on the HTTP sidecar (none: off).
    pub admin: Option<AdminSettings>,
}

/// PEM material of the gRPC listener's TLS. `Debug` never shows the key.
#[derive(Clone)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: Vec<u8>,
    /// Private key.
    pub key: Vec<u8>,
    /// CA bundle client certificates must chain to (mutual TLS); none: server TLS only.
    pub client_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("cert_bytes", &self.cert.len())
            .field("key", &"***")
            .field("mutual", &self.client_ca.is_some())
            .finish()
    }
}

impl TlsFiles {
    fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        let mut c = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key));
        if let Some(ca) = &self.client_ca {
            c = c.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        c
    }
}

/// HTTP/2 streams one gRPC connection may have open at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The database could not be opened or migrated.
    #[error("database: {0}")]
    Storage(#[from] StorageError),
    /// A listener could not be bound: its option, address and what to do.
    #[error("{flag} {addr} {why}")]
    Bind {
        /// The option that names the address.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// What went wrong, for people.
        why: String,
    },
    /// The listener could not be served.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not be built from the descriptor set.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Binds one of the three listeners, naming its option when that fails.
async fn bind(flag: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr).await.map_err(|e| AppError::Bind {
        flag,
        addr,
        why: match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "is in use: another process listens there; stop it or choose another address"
                    .to_owned()
            }
            std::io::ErrorKind::AddrNotAvailable => "is not an address of this machine".to_owned(),
            std::io::ErrorKind::PermissionDenied => {
                "needs privileges this process lacks (ports below 1024): choose a port above 1023"
                    .to_owned()
            }
            _ => format!("cannot be bound: {e}"),
        },
    })
}

/// The URL with any password and user removed, for logs and errors.
#[must_use]
pub fn redact_url(url: &str) -> String {
    match (url.split_once("://"), url.find('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            format!("{scheme}://***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// Most browser origins `--grpc-web-origins` may list: 32.
pub const GRPC_WEB_ORIGINS_MAX: usize = 32;

/// How long a browser may cache a gRPC-Web preflight answer: 10 minutes.
pub const GRPC_WEB_PREFLIGHT_MAX_AGE: Duration = Duration::from_mins(10);

/// Checks `--grpc-web-origins`: at most [`GRPC_WEB_ORIGINS_MAX`], each `http(s)://host[:port]`
/// with nothing after it (what a browser sends as `Origin`).
///
/// # Errors
/// A message naming the bad origin.
pub fn web_origins(origins: &[String]) -> Result<Vec<http::HeaderValue>, String> {
    if origins.len() > GRPC_WEB_ORIGINS_MAX {
        return Err(format!(
            "--grpc-web-origins: {} origins, at most {GRPC_WEB_ORIGINS_MAX}",
            origins.len()
        ));
    }
    origins
        .iter()
        .map(|o| {
            let o = o.trim();
            let rest = o
                .strip_prefix("https://")
                .or_else(|| o.strip_prefix("http://"));
            match rest {
                Some(host) if !host.is_empty() && !host.contains(['/', '?', '#', '*', ' ']) => {
                    http::HeaderValue::from_str(o).map_err(|_| format!("--grpc-web-origins: {o:?} is not a header value"))
                }
                _ => Err(format!(
                    "--grpc-web-origins: {o:?} is not an origin (scheme://host[:port], e.g. https://app.example.com)"
                )),
            }
        })
        .collect()
}

/// CORS for gRPC-Web from `origins`: the methods, request headers and exposed headers a
/// gRPC-Web client uses (connect-es, grpc-web), nothing else.
fn cors(origins: &[http::HeaderValue]) -> tower_http::cors::CorsLayer {
    use http::header::{AUTHORIZATION, CONTENT_TYPE};
    let name = http::HeaderName::from_static;
    tower_http::cors::CorsLayer::new()
        .allow_origin(origins.to_vec())
        .allow_methods([http::Method::POST, http::Method::OPTIONS])
        .allow_headers([
            AUTHORIZATION,
            CONTENT_TYPE,
            name("x-grpc-web"),
            name("x-user-agent"),
            name("grpc-timeout"),
            name("traceparent"),
            name("tracestate"),
        ])
        .expose_headers([
            name("grpc-status"),
            name("grpc-message"),
            name("grpc-status-details-bin"),
        ])
        .max_age(GRPC_WEB_PREFLIGHT_MAX_AGE)
}

fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The adaptive concurrency limit's default latency target: 20 ms on PostgreSQL, whose group
/// commit reaches its peak at about 17 ms a call (64 clients, `scripts/bench.sh`), and 250 ms
/// on SQLite, whose single writer reaches its peak only with a deeper queue (about 150 ms a
/// pair at 64 clients): a tighter target there would cut the peak itself.
#[must_use]
pub fn overload_latency_target(database_url: &str) -> Duration {
    if is_postgres_url(database_url) {
        Duration::from_millis(20)
    } else {
        Duration::from_millis(250)
    }
}

/// Opens the database named by `url`, applies its migrations, and starts an engine on it.
///
/// # Errors
/// `StorageError` when the URL scheme is unknown or the database cannot be opened or migrated.
pub async fn open_store(
    url: &str,
    max_connections: u32,
    policy: Arc<Policy>,
) -> Result<Engine, StorageError> {
    open_store_with(url, max_connections, policy, true).await
}

/// Opens the store named by `url`, applying its migrations when `migrate`.
///
/// # Errors
/// `StorageError` when the URL scheme is unknown or the database cannot be opened or migrated.
pub async fn open_store_with(
    url: &str,
    max_connections: u32,
    policy: Arc<Policy>,
    migrate: bool,
) -> Result<Engine, StorageError> {
    open_store_tuned(url, max_connections, policy, migrate, Batching::default()).await
}

/// [`open_store_with`] with PostgreSQL's group-commit settings.
///
/// # Errors
/// `StorageError` when the URL scheme is unknown or the database cannot be opened or migrated.
pub async fn open_store_tuned(
    url: &str,
    max_connections: u32,
    policy: Arc<Policy>,
    migrate: bool,
    group: Batching,
) -> Result<Engine, StorageError> {
    if is_postgres_url(url) {
        let store = PgStore::connect_with(url, max_connections, policy, group).await?;
        if migrate {
            store.migrate().await?;
        }
        Engine::new(Arc::new(store))
    } else if url.starts_with("sqlite:") {
        let store = SqliteStore::connect_with(url, max_connections, policy, group).await?;
        if migrate {
            store.migrate().await?;
        }
        Engine::new(Arc::new(store))
    } else {
        Err(StorageError::Other(format!(
            "unsupported database URL {:?}: use sqlite://PATH or postgres://...",
            redact_url(url)
        )))
    }
}

/// Serves `router` on `listener` until `stop` turns true.
fn spawn_http(
    listener: TcpListener,
    router: axum::Router,
    what: &'static str,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    info!(addr = %listener.local_addr()?, "tally serving {what}");
    Ok(tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    }))
}

/// Runs the ledger reconciliation every `every` until `stop`: every violation found counts in
/// `tally_ledger_invariant_violations_total` (which must stay 0) and is logged.
async fn run_audit(
    store: Engine,
    every: Duration,
    status: crate::http::admin::AuditStatus,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if every.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(every) => {}
        }
        let start = std::time::Instant::now();
        let found = store.audit().await;
        status.record(crate::http::admin::AuditResult {
            at: chrono::Utc::now(),
            took: start.elapsed(),
            outcome: found.clone().map_err(|e| e.to_string()),
        });
        match found {
            Ok(v) if v.is_empty() => {
                metrics::counter!("tally_ledger_audits_total", "result" => "ok").increment(1);
            }
            Ok(v) => {
                metrics::counter!("tally_ledger_audits_total", "result" => "violations")
                    .increment(1);
                metrics::counter!("tally_ledger_invariant_violations_total")
                    .increment(u64::try_from(v.len()).unwrap_or(u64::MAX));
                tracing::error!(violations = v.len(), first = ?v.first(), "ledger reconciliation found violations");
            }
            Err(e) => {
                metrics::counter!("tally_ledger_audits_total", "result" => "error").increment(1);
                warn!(error.message = %e, "ledger reconciliation failed");
            }
        }
    }
}

/// The admin console's settings (`--admin-console`).
#[derive(Clone, Debug)]
pub struct AdminSettings {
    /// Signs sessions and CSRF tokens (the same on every replica, or sessions stick to one).
    pub session_key: crate::http::admin::SessionKey,
    /// How long a session lasts.
    pub session_ttl: Duration,
}

/// A built, bound, not yet serving application.
pub struct App {
    listener: TcpListener,
    http_listener: TcpListener,
    metrics_listener: TcpListener,
    ledger: Ledger,
    settings: Settings,
}

impl App {
    /// Opens the store (migrating it) and binds the listener.
    ///
    /// # Errors
    /// [`AppError`] when the database or the address is unusable.
    pub async fn build(settings: Settings) -> Result<Self, AppError> {
        let store = open_store_tuned(
            &settings.database_url,
            settings.db_max_connections,
            Arc::new(settings.catalog.policy()),
            settings.auto_migrate,
            settings.db_group,
        )
        .await?;
        let listener = bind("--listen", settings.listen).await?;
        let http_listener = bind("--http-listen", settings.http_listen).await?;
        let metrics_listener = bind("--metrics-listen", settings.metrics_listen).await?;
        // Install the recorder before anything counts.
        let _ = crate::telemetry::metrics();
        Ok(Self {
            listener,
            http_listener,
            metrics_listener,
            ledger: Ledger::new(store, settings.limits),
            settings,
        })
    }

    /// The bound HTTP sidecar address.
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.http_listener.local_addr()
    }

    /// The bound operator (metrics) address.
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn metrics_addr(&self) -> std::io::Result<SocketAddr> {
        self.metrics_listener.local_addr()
    }

    /// The bound address (useful with port 0).
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The service (tests use it to audit the ledger).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Serves until `shutdown` resolves, then reports NOT_SERVING, stops taking calls, lets
    /// in-flight calls finish (at most `shutdown_grace`) and stops the sweeper.
    ///
    /// # Errors
    /// [`AppError`] when serving fails.
    #[allow(clippy::too_many_lines)] // one place wires every server and task, in shutdown order
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let Self {
            listener,
            http_listener,
            metrics_listener,
            ledger,
            settings,
        } = self;
        let store = ledger.engine().clone();
        let (health, health_service) = tonic_health::server::health_reporter();
        let readiness = crate::health::Readiness::default();
        crate::health::start(&store, &readiness, &health).await;
        let reflection = |v1: bool| {
            let b = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET);
            if v1 {
                b.build_v1().map(|s| (Some(s), None))
            } else {
                b.build_v1alpha().map(|s| (None, Some(s)))
            }
        };
        let (reflection_v1, reflection_v1alpha) = if settings.reflection {
            (reflection(true)?.0, reflection(false)?.1)
        } else {
            (None, None)
        };

        // One stop flag: set when `shutdown` resolves; background tasks and the grace timer
        // watch it.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stop_tx = Arc::new(stop_tx);
        let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let background = {
            let ledger = ledger.clone();
            let stop = until_stopped(stop_rx.clone());
            tokio::spawn(async move {
                ledger
                    .run_background(
                        settings.sweep_interval,
                        settings.idempotency_retention,
                        stop,
                    )
                    .await;
            })
        };
        let dispatcher = {
            let d = crate::events::Dispatcher::new(
                store.clone(),
                settings.events.targets.clone(),
                settings.events.config.clone(),
            );
            tokio::spawn(d.run(until_stopped(stop_rx.clone())))
        };
        let balances = crate::ledger::watch::Watcher::start(
            store.clone(),
            settings.watch.limits,
            stop_rx.clone(),
        );
        let watcher = tokio::spawn(crate::health::watch(
            store.clone(),
            readiness.clone(),
            health.clone(),
            settings.readiness_interval,
            until_stopped(stop_rx.clone()),
        ));
        let audit_status = crate::http::admin::AuditStatus::default();
        let audit = tokio::spawn(run_audit(
            store.clone(),
            settings.audit_interval,
            audit_status.clone(),
            stop_rx.clone(),
        ));
        let signal = {
            let stop_tx = Arc::clone(&stop_tx);
            let readiness = readiness.clone();
            let health = health.clone();
            async move {
                shutdown.await;
                info!("shutting down: NOT_SERVING, draining in-flight calls");
                readiness.drain();
                crate::health::publish(&health, false).await;
                stop_tx.send_replace(true);
            }
        };

        if settings.auth.is_open() {
            warn!(
                "no callers configured: authentication is off and every caller has every role (loopback only unless --insecure)"
            );
        }
        let http_state = crate::http::HttpState {
            ledger: ledger.clone(),
            catalog: Arc::clone(&settings.catalog),
            webhook_secrets: Arc::new(settings.webhook_secrets.clone()),
            livemode: settings.stripe_livemode,
            stripe: settings.stripe.clone(),
            auth: Arc::clone(&settings.auth),
            readiness: readiness.clone(),
            balances: Some(balances.clone()),
            heartbeat: settings.watch.heartbeat,
            admin: settings.admin.as_ref().map(|a| {
                Arc::new(crate::http::admin::Console::new(
                    a.session_key.clone(),
                    a.session_ttl,
                    audit_status.clone(),
                ))
            }),
        };
        let http = spawn_http(
            http_listener,
            crate::http::router(http_state.clone()),
            "HTTP (Stripe webhooks, billing, /healthz, /readyz)",
            stop_tx.subscribe(),
        )?;
        let metrics_http = spawn_http(
            metrics_listener,
            crate::http::metrics_router(http_state),
            "metrics (/metrics, /healthz, /readyz)",
            stop_tx.subscribe(),
        )?;
        let addr = listener.local_addr()?;
        info!(%addr, database = %redact_url(&settings.database_url), "tally serving gRPC");
        let gate = crate::grpc::gate::GateLayer::new(
            crate::grpc::gate::GateState::new(
                Arc::clone(&settings.auth),
                settings.max_concurrent_requests,
                readiness.clone(),
                addr.port(),
            )
            .with_latency_target(
                settings
                    .overload_latency_target
                    .unwrap_or_else(|| overload_latency_target(&settings.database_url)),
            ),
        );
        let mut builder = Server::builder();
        if let Some(tls) = &settings.tls {
            builder = builder.tls_config(tls.server_config())?;
            info!(mutual = tls.client_ca.is_some(), "gRPC listener uses TLS");
        }
        // gRPC-Web (HTTP/1.1 or HTTP/2) on the same port: CORS for the configured origins
        // (outermost, so a preflight needs no token), then the translation to gRPC, then the
        // gate, so auth, limits and metrics are exactly those of gRPC.
        let cors =
            (!settings.grpc_web_origins.is_empty()).then(|| cors(&settings.grpc_web_origins));
        let server = builder
            .accept_http1(true)
            .timeout(settings.request_timeout)
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .layer(tower::util::option_layer(cors))
            .layer(tonic_web::GrpcWebLayer::new())
            .layer(gate)
            .add_service(health_service)
            .add_optional_service(reflection_v1)
            .add_optional_service(reflection_v1alpha)
            .add_service(
                CreditServiceServer::new(CreditApi::new(
                    ledger.clone(),
                    Arc::clone(&settings.catalog),
                    balances,
                ))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                AdminServiceServer::new(AdminApi::new(ledger, Arc::clone(&settings.catalog)))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            // tonic's own TCP settings apply only to listeners it binds: without TCP_NODELAY a
            // response written while an earlier one is unacknowledged waits for the ACK.
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                signal,
            );
        // tonic waits for every connection to close; bound that by the grace period.
        let grace = settings.shutdown_grace;
        let mut stopped = stop_rx;
        let result = tokio::select! {
            r = server => r.map_err(AppError::from),
            () = async move {
                let _ = stopped.wait_for(|s| *s).await;
                tokio::time::sleep(grace).await;
            } => {
                warn!("shutdown grace period over; dropping remaining calls");
                Ok(())
            }
        };
        stop_tx.send_replace(true);
        let _ = background.await;
        let _ = watcher.await;
        let _ = dispatcher.await;
        let _ = audit.await;
        for (what, task) in [("HTTP sidecar", http), ("metrics listener", metrics_http)] {
            match tokio::time::timeout(grace, task).await {
                Ok(Ok(Err(e))) => warn!(error.message = %e, "{what} failed"),
                Ok(_) => {}
                Err(_) => warn!("{what} did not drain within the grace period"),
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_web_origins_are_checked() {
        let ok =
            |o: &[&str]| super::web_origins(&o.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(
            ok(&["https://app.example.com", "http://localhost:3000"])
                .unwrap()
                .len(),
            2
        );
        for bad in [
            "app.example.com",
            "https://",
            "https://a.example/path",
            "*",
            "https://*.example.com",
            "ftp://a",
        ] {
            assert!(
                ok(&[bad]).unwrap_err().contains("--grpc-web-origins"),
                "{bad}"
            );
        }
        let many: Vec<String> = (0..=super::GRPC_WEB_ORIGINS_MAX)
            .map(|i| format!("https://a{i}.example"))
            .collect();
        assert!(super::web_origins(&many).is_err());
    }
}
