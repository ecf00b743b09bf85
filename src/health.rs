//! Liveness and readiness, for gRPC health (`grpc.health.v1`) and HTTP (`/healthz`, `/readyz`).
//!
//! - Liveness (`liveness`; `/healthz`) never looks at the database: a database blip must not
//!   make Kubernetes restart every pod.
//! - Readiness (`readiness`, `""`, `tally.v1.CreditService`, `tally.v1.AdminService`;
//!   `/readyz`) follows a database round trip made every `--readiness-interval` (bounded by
//!   a 2 s timeout), and turns NOT_SERVING for good when shutdown begins.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::ledger::Engine;

/// Health service names a probe may ask for.
pub const LIVENESS: &str = "liveness";
/// The readiness service name (Kubernetes' recommended style).
pub const READINESS: &str = "readiness";
/// Services whose status follows readiness.
const READY_SERVICES: &[&str] = &[
    READINESS,
    "",
    "tally.v1.CreditService",
    "tally.v1.AdminService",
];
/// Longest a readiness round trip may take before it counts as a failure.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Shared readiness: database reachable and not draining.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<Flags>);

#[derive(Debug, Default)]
struct Flags {
    database: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    /// Whether the server should get traffic.
    #[must_use]
    pub fn ready(&self) -> bool {
        self.0.database.load(Ordering::Acquire) && !self.0.draining.load(Ordering::Acquire)
    }

    /// Whether the last database check succeeded.
    #[must_use]
    pub fn database(&self) -> bool {
        self.0.database.load(Ordering::Acquire)
    }

    /// Whether shutdown has begun.
    #[must_use]
    pub fn draining(&self) -> bool {
        self.0.draining.load(Ordering::Acquire)
    }

    fn set_database(&self, ok: bool) -> bool {
        self.0.database.swap(ok, Ordering::AcqRel) != ok
    }

    /// Shutdown began: not ready from now on.
    pub fn drain(&self) {
        self.0.draining.store(true, Ordering::Release);
    }
}

/// Publishes readiness to every service name that follows it.
pub async fn publish(health: &HealthReporter, ready: bool) {
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for name in READY_SERVICES {
        health.set_service_status(*name, status).await;
    }
}

/// One readiness check: a database round trip, published to `health` when it changed (or
/// always, when `force`).
pub async fn check(store: &Engine, readiness: &Readiness, health: &HealthReporter, force: bool) {
    let ok = match tokio::time::timeout(PING_TIMEOUT, store.ping()).await {
        Ok(Ok(())) => true,
        // No answer in time is not a refusal: under load the check may queue behind busy
        // connections. Keep the last state (a refused connection answers at once).
        Err(_) if !force => return,
        Ok(Err(_)) | Err(_) => false,
    };
    if readiness.draining() {
        return;
    }
    if readiness.set_database(ok) || force {
        if ok {
            info!("database reachable: READY");
        } else {
            warn!("database unreachable: NOT READY (still live)");
        }
        publish(health, ok).await;
    }
}

/// Liveness SERVING and a first readiness check; call before serving.
pub async fn start(store: &Engine, readiness: &Readiness, health: &HealthReporter) {
    health
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    check(store, readiness, health, true).await;
}

/// Checks the database every `every`, publishing changes to `health`, until `stop`; then
/// everything but liveness turns NOT_SERVING.
pub async fn watch(
    store: Engine,
    readiness: Readiness,
    health: HealthReporter,
    every: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            () = tokio::time::sleep(every) => {}
        }
        check(&store, &readiness, &health, false).await;
    }
    readiness.drain();
    publish(&health, false).await;
}
