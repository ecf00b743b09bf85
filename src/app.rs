//! Wiring: open the store, bind the listener, serve gRPC with health and reflection, run the
//! sweeper, and stop everything on one shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::catalog::Catalog;
use crate::domain::plan::Policy;
use crate::grpc::{AdminApi, CreditApi, MAX_MESSAGE_BYTES};
use crate::pb::admin_service_server::AdminServiceServer;
use crate::pb::credit_service_server::CreditServiceServer;
use crate::service::{Ledger, Limits};
use crate::storage::postgres::PgStore;
use crate::storage::sqlite::SqliteStore;
use crate::storage::{StorageError, Store};

/// Largest header list a client may send: 16 KiB.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Everything `serve` needs, already validated.
#[derive(Clone, Debug)]
pub struct Settings {
    /// gRPC listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// `sqlite://path` or `postgres://...`. Never logged as is: see [`redact_url`].
    pub database_url: String,
    /// Pool size.
    pub db_max_connections: u32,
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
    /// HTTP sidecar listen address (Stripe webhooks, /healthz, /readyz).
    pub http_listen: SocketAddr,
    /// Stripe webhook endpoint secrets (at most two, for rotation). Never logged.
    pub webhook_secrets: Vec<crate::stripe::WebhookSecret>,
    /// Whether the Stripe key is live mode (events of the other mode are refused).
    pub stripe_livemode: bool,
    /// Stripe API client (none: billing endpoints answer 503).
    pub stripe: Option<crate::stripe::client::StripeApi>,
    /// Bearer token of the billing endpoints. Never logged.
    pub billing_token: Option<String>,
}

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The database could not be opened or migrated.
    #[error("database: {0}")]
    Storage(#[from] StorageError),
    /// The listener could not be bound or served.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not be built from the descriptor set.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
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

/// Opens the store named by `url` and applies its migrations.
///
/// # Errors
/// `StorageError` when the URL scheme is unknown or the database cannot be opened or migrated.
pub async fn open_store(
    url: &str,
    max_connections: u32,
    policy: Arc<Policy>,
) -> Result<Arc<dyn Store>, StorageError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = PgStore::connect(url, max_connections, policy).await?;
        store.migrate().await?;
        Ok(Arc::new(store))
    } else if url.starts_with("sqlite:") {
        let store = SqliteStore::connect(url, max_connections, policy).await?;
        store.migrate().await?;
        Ok(Arc::new(store))
    } else {
        Err(StorageError::Other(format!(
            "unsupported database URL {:?}: use sqlite://PATH or postgres://...",
            redact_url(url)
        )))
    }
}

/// Serves the HTTP sidecar until `stop` turns true.
fn spawn_http(
    listener: TcpListener,
    ledger: &Ledger,
    settings: &Settings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let state = crate::http::HttpState {
        store: Arc::clone(ledger.store()),
        catalog: Arc::clone(&settings.catalog),
        webhook_secrets: Arc::new(settings.webhook_secrets.clone()),
        livemode: settings.stripe_livemode,
        stripe: settings.stripe.clone(),
        billing_token: settings.billing_token.clone(),
    };
    info!(addr = %listener.local_addr()?, "tally serving HTTP (Stripe webhooks, /healthz, /readyz)");
    Ok(tokio::spawn(async move {
        axum::serve(listener, crate::http::router(state))
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    }))
}

/// A built, bound, not yet serving application.
pub struct App {
    listener: TcpListener,
    http_listener: TcpListener,
    ledger: Ledger,
    settings: Settings,
}

impl App {
    /// Opens the store (migrating it) and binds the listener.
    ///
    /// # Errors
    /// [`AppError`] when the database or the address is unusable.
    pub async fn build(settings: Settings) -> Result<Self, AppError> {
        let store = open_store(
            &settings.database_url,
            settings.db_max_connections,
            Arc::new(settings.catalog.policy()),
        )
        .await?;
        let listener = TcpListener::bind(settings.listen).await?;
        let http_listener = TcpListener::bind(settings.http_listen).await?;
        Ok(Self {
            listener,
            http_listener,
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
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let Self {
            listener,
            http_listener,
            ledger,
            settings,
        } = self;
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<CreditServiceServer<CreditApi>>().await;
        health.set_serving::<AdminServiceServer<AdminApi>>().await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        // One stop flag: set when `shutdown` resolves; the sweeper and the grace timer watch it.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stop_tx = Arc::new(stop_tx);
        let background = {
            let ledger = ledger.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                ledger
                    .run_background(
                        settings.sweep_interval,
                        settings.idempotency_retention,
                        async move {
                            let _ = stop.wait_for(|s| *s).await;
                        },
                    )
                    .await;
            })
        };
        let signal = {
            let health = health.clone();
            let stop_tx = Arc::clone(&stop_tx);
            async move {
                shutdown.await;
                info!("shutting down: NOT_SERVING, draining in-flight calls");
                stop_tx.send_replace(true);
                health
                    .set_not_serving::<CreditServiceServer<CreditApi>>()
                    .await;
                health
                    .set_not_serving::<AdminServiceServer<AdminApi>>()
                    .await;
            }
        };

        let http = spawn_http(http_listener, &ledger, &settings, stop_tx.subscribe())?;
        let addr = listener.local_addr()?;
        info!(%addr, database = %redact_url(&settings.database_url), "tally serving gRPC");
        let server = Server::builder()
            .timeout(settings.request_timeout)
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                CreditServiceServer::new(CreditApi::new(
                    ledger.clone(),
                    Arc::clone(&settings.catalog),
                ))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                AdminServiceServer::new(AdminApi::new(ledger, Arc::clone(&settings.catalog)))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
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
        match tokio::time::timeout(grace, http).await {
            Ok(Ok(Err(e))) => warn!(error.message = %e, "HTTP sidecar failed"),
            Ok(_) => {}
            Err(_) => warn!("HTTP sidecar did not drain within the grace period"),
        }
        result
    }
}
