//! The application layer: every use case, for every transport. gRPC and HTTP call
//! [`Ledger`]; neither touches storage.
//!
//! - [`Ledger`] (here): what a request needs around a use case: its idempotency scope and
//!   fingerprint, hold ids, the bounded retry on contention, the background sweeper.
//! - [`engine`]: the transaction scripts, one attempt each: claim the key, lock, load,
//!   settle, let the domain decide, write, store the outcome.
//! - [`stripe`]: Stripe effects, applied exactly once in any order.

pub mod engine;
pub mod stripe;
pub mod watch;

/// The page requests and rows of the reads, as the transports build and show them.
pub use crate::storage::{
    AccountQuery, AccountRow, Dashboard, DashboardQuery, EntryCursor, EntryQuery, EventQuery,
    EventRow, HoldQuery, SalesRow, StoreStats, StripeEventRow, UsageRow, Violation,
};
pub use engine::Engine;

use std::time::Duration;

use chrono::TimeDelta;
use tracing::{debug, warn};

use crate::domain::book::Grant;
use crate::domain::command::{
    Adjust, CommitHold, ExtendHold, GrantCredits, Idempotency, OpenAccount, Refund, Reserve,
    SetPlan, Transfer,
};
use crate::domain::payment::{StripeEffect, StripeEvent, StripeRecord, Subscription};
use crate::domain::{
    AccountId, AccountSummary, AdjustOutcome, Balance, Caller, CommitOutcome, EntryRecord,
    ExtendOutcome, FieldViolation, GrantOutcome, Hold, HoldId, IdempotencyKey, LedgerError,
    OpenOutcome, PlanOutcome, RefundOutcome, ReserveOutcome, TransferOutcome,
};
use crate::storage::{Applied, StorageError};

/// Attempts per call when the database reports contention (then ABORTED).
pub const CONTENTION_ATTEMPTS: u32 = 3;
/// Holds the sweeper expires per batch.
pub const SWEEP_BATCH: u32 = 500;
/// Idempotency records purged per batch.
pub const PURGE_BATCH: u32 = 1_000;

/// Everything a call can fail with, as the transports see it.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed; nothing was looked at.
    #[error("invalid request: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldViolation>),
    /// The ledger refused the command; nothing changed.
    #[error(transparent)]
    Rejected(#[from] LedgerError),
    /// Contention persisted through [`CONTENTION_ATTEMPTS`] attempts; retry with the same key.
    #[error("the account is busy; retry with the same idempotency key")]
    Contended,
    /// The database is unreachable; nothing was written; retry with the same key.
    #[error("the database is unavailable")]
    Unavailable(String),
    /// The connection was lost while the transaction committed: it may have been stored.
    /// Retry with the same key: a stored call replays, an unstored one is applied.
    #[error(
        "the database connection was lost while committing; the outcome is unknown: retry with the same idempotency key"
    )]
    InDoubt(String),
    /// A bug or a broken invariant. Details are logged, not sent.
    #[error("internal error")]
    Internal(String),
    /// A balance stream over a cap (the message names it); nothing was opened.
    #[error("{0}")]
    TooManyStreams(String),
    /// The server is stopping: a stream ends so its caller reconnects (to another replica).
    #[error("the server is shutting down; reconnect (with after_version / Last-Event-ID)")]
    ShuttingDown,
}

impl From<StorageError> for ServiceError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Rejected(r) => Self::Rejected(r),
            StorageError::Contended => Self::Contended,
            StorageError::Unavailable(m) => Self::Unavailable(m),
            StorageError::InDoubt(m) => Self::InDoubt(m),
            StorageError::Other(m) => Self::Internal(m),
        }
    }
}

impl From<FieldViolation> for ServiceError {
    fn from(v: FieldViolation) -> Self {
        Self::Invalid(vec![v])
    }
}

/// Result alias for service calls.
pub type ServiceResult<T> = Result<T, ServiceError>;

/// Numbers that shape requests, from configuration.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// TTL of a hold when the request gives none.
    pub hold_ttl_default: TimeDelta,
    /// Longest TTL a reserve or extension may ask for.
    pub hold_ttl_max: TimeDelta,
}

/// Shortest TTL a request may ask for.
pub const HOLD_TTL_MIN: TimeDelta = TimeDelta::seconds(1);

impl Limits {
    /// Resolves a requested TTL: `None` means the default; otherwise it must be in
    /// `HOLD_TTL_MIN..=hold_ttl_max`. Sub-millisecond parts are dropped.
    ///
    /// # Errors
    /// A violation on `ttl` when out of range.
    pub fn ttl(&self, requested: Option<TimeDelta>) -> Result<TimeDelta, FieldViolation> {
        let Some(ttl) = requested else {
            return Ok(self.hold_ttl_default);
        };
        let ttl = TimeDelta::milliseconds(ttl.num_milliseconds());
        if ttl < HOLD_TTL_MIN || ttl > self.hold_ttl_max {
            return Err(FieldViolation::new(
                "ttl",
                format!(
                    "must be between 1s and {}s, got {}ms",
                    self.hold_ttl_max.num_seconds(),
                    ttl.num_milliseconds()
                ),
            ));
        }
        Ok(ttl)
    }
}

/// The ledger service.
#[derive(Clone)]
pub struct Ledger {
    engine: Engine,
    limits: Limits,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Runs `op` again on contention, up to [`CONTENTION_ATTEMPTS`] times with a short backoff.
async fn with_retry<T, F, Fut>(mut op: F) -> ServiceResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    let mut attempt = 1u32;
    loop {
        match op().await {
            Err(StorageError::Contended) if attempt < CONTENTION_ATTEMPTS => {
                debug!(attempt, "contention; retrying");
                tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 5)).await;
                attempt = attempt.saturating_add(1);
            }
            other => return other.map_err(ServiceError::from),
        }
    }
}

fn idem(caller: &Caller, key: IdempotencyKey, fingerprint: [u8; 32]) -> Idempotency {
    Idempotency {
        caller: caller.clone(),
        key,
        fingerprint,
        legacy: None,
    }
}

/// A fresh, time-ordered hold id.
#[must_use]
pub fn new_hold_id() -> HoldId {
    HoldId::from_bytes(uuid::Uuid::now_v7().into_bytes())
}

impl Ledger {
    /// The use cases over `engine`.
    pub fn new(engine: Engine, limits: Limits) -> Self {
        Self { engine, limits }
    }

    /// The configured limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The engine (health checks, audits, metrics).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Balance of an account.
    pub async fn check_balance(&self, account_id: &AccountId) -> ServiceResult<Balance> {
        with_retry(|| self.engine.balance(account_id)).await
    }

    /// Reserve credits.
    pub async fn reserve(
        &self,
        caller: &Caller,
        key: IdempotencyKey,
        cmd: &Reserve,
    ) -> ServiceResult<Applied<ReserveOutcome>> {
        let idem = Idempotency {
            legacy: Some(cmd.legacy_fingerprint()),
            ..idem(caller, key, cmd.fingerprint())
        };
        with_retry(|| self.engine.reserve(&idem, cmd)).await
    }

    /// Commit a hold.
    pub async fn commit_hold(
        &self,
        caller: &Caller,
        key: IdempotencyKey,
        cmd: &CommitHold,
    ) -> ServiceResult<Applied<CommitOutcome>> {
        let idem = idem(caller, key, cmd.fingerprint());
        with_retry(|| self.engine.commit_hold(&idem, cmd)).await
    }

    /// Refund a hold.
    pub async fn refund(
        &self,
        caller: &Caller,
        key: IdempotencyKey,
        cmd: &Refund,
    ) -> ServiceResult<Applied<RefundOutcome>> {
        let idem = idem(caller, key, cmd.fingerprint());
        with_retry(|| self.engine.refund(&idem, cmd)).await
    }

    /// Extend a hold.
    pub async fn extend_hold(
        &self,
        caller: &Caller,
        key: IdempotencyKey,
        cmd: &ExtendHold,
    ) -> ServiceResult<Applied<ExtendOutcome>> {
        let idem = idem(caller, key, cmd.fingerprint());
        with_retry(|| self.engine.extend_hold(&idem, cmd)).await
    }

    /// Grant credits.
    pub async fn grant(
        &self,
        caller: &Caller,
        key: IdempotencyKey,
        cmd: &GrantCredits,
    ) -> ServiceResult<Applied<GrantOutcome>> {
        let idem = idem(caller, key, cmd.fingerprint());
        with_retry(|| self.engine.grant(&idem, cmd)).await
    }

    /// One hold.
    pub async fn hold(&self, hold_id: &HoldId) -> ServiceResult<Hold> {
        with_retry(|| self.engine.hold(hold_id)).await
    }

    /// A page of holds.
    pub async fn list_holds(&self, query: &HoldQuery) -> ServiceResult<Vec<Hold>> {
        with_retry(|| self.engine.list_holds(query)).await
    }

    /// Move an account to another plan.
    pub async fn set_plan(
        &self,
        caller: &Caller,
        key: IdempotencyKey,
        cmd: &SetPlan,
    ) -> ServiceResult<Applied<PlanOutcome>> {
        let idem = idem(caller, key, cmd.fingerprint());
        with_retry(|| self.engine.set_plan(&idem, cmd)).await
    }

    /// Open an account with its bonus.
    pub async fn open_account(
        &self,
        caller: &Caller,
        key: IdempotencyKey,
        cmd: &OpenAccount,
    ) -> ServiceResult<Applied<OpenOutcome>> {
        let idem = idem(caller, key, cmd.fingerprint());
        with_retry(|| self.engine.open_account(&idem, cmd)).await
    }

    /// A signed correction.
    pub async fn adjust(
        &self,
        caller: &Caller,
        key: IdempotencyKey,
        cmd: &Adjust,
    ) -> ServiceResult<Applied<AdjustOutcome>> {
        let idem = idem(caller, key, cmd.fingerprint());
        with_retry(|| self.engine.adjust(&idem, cmd)).await
    }

    /// Move credits between accounts.
    pub async fn transfer(
        &self,
        caller: &Caller,
        key: IdempotencyKey,
        cmd: &Transfer,
    ) -> ServiceResult<Applied<TransferOutcome>> {
        let idem = idem(caller, key, cmd.fingerprint());
        with_retry(|| self.engine.transfer(&idem, cmd)).await
    }

    /// Credits charged since `since`.
    pub async fn used_since(
        &self,
        account_id: &AccountId,
        since: chrono::DateTime<chrono::Utc>,
    ) -> ServiceResult<i64> {
        with_retry(|| self.engine.used_since(account_id, since)).await
    }

    /// An account's live grants.
    pub async fn grants(&self, account_id: &AccountId) -> ServiceResult<Vec<Grant>> {
        with_retry(|| self.engine.grants(account_id)).await
    }

    /// An account summary.
    pub async fn account(&self, account_id: &AccountId) -> ServiceResult<AccountSummary> {
        with_retry(|| self.engine.account(account_id)).await
    }

    /// A page of accounts.
    pub async fn list_accounts(&self, query: &AccountQuery) -> ServiceResult<Vec<AccountRow>> {
        with_retry(|| self.engine.list_accounts(query)).await
    }

    /// The admin console's dashboard numbers.
    pub async fn dashboard(&self, query: &DashboardQuery) -> ServiceResult<Dashboard> {
        with_retry(|| self.engine.dashboard(query)).await
    }

    /// A page of received Stripe events, newest first.
    pub async fn stripe_events(
        &self,
        before: Option<(chrono::DateTime<chrono::Utc>, String)>,
        limit: u32,
    ) -> ServiceResult<Vec<StripeEventRow>> {
        with_retry(|| self.engine.stripe_events(before.clone(), limit)).await
    }

    /// Runs the reconciliation now: every broken invariant found.
    pub async fn audit(&self) -> ServiceResult<Vec<Violation>> {
        Ok(self.engine.audit().await?)
    }

    /// A page of entries.
    pub async fn list_entries(&self, query: &EntryQuery) -> ServiceResult<Vec<EntryRecord>> {
        with_retry(|| self.engine.list_entries(query)).await
    }

    /// A page of outbound event deliveries.
    pub async fn list_events(&self, query: &EventQuery) -> ServiceResult<Vec<EventRow>> {
        with_retry(|| self.engine.list_events(query)).await
    }

    /// Queues an event again; the deliveries queued.
    pub async fn redeliver_event(
        &self,
        event_id: &str,
        endpoint: Option<&str>,
    ) -> ServiceResult<u64> {
        with_retry(|| self.engine.redeliver_event(event_id, endpoint)).await
    }

    /// Endpoints a 410 Gone disabled: name, when, why.
    pub async fn disabled_endpoints(
        &self,
    ) -> ServiceResult<Vec<(String, chrono::DateTime<chrono::Utc>, String)>> {
        with_retry(|| self.engine.disabled_endpoints()).await
    }

    /// Enables a disabled endpoint; false if it was not disabled.
    pub async fn enable_endpoint(&self, name: &str) -> ServiceResult<bool> {
        with_retry(|| self.engine.enable_endpoint(name)).await
    }

    /// Records a verified Stripe event and applies its effect, once.
    pub async fn record_stripe_event(
        &self,
        event: &StripeEvent,
        effect: &StripeEffect,
    ) -> ServiceResult<StripeRecord> {
        with_retry(|| self.engine.record_stripe_event(event, effect)).await
    }

    /// The Stripe customer linked to an account.
    pub async fn customer_of(&self, account_id: &AccountId) -> ServiceResult<Option<String>> {
        with_retry(|| self.engine.customer_of(account_id)).await
    }

    /// Links an account to a Stripe customer; the first link wins and is returned.
    pub async fn link_customer(
        &self,
        account_id: &AccountId,
        customer_id: &str,
    ) -> ServiceResult<String> {
        with_retry(|| self.engine.link_customer(account_id, customer_id)).await
    }

    /// The newest purchases granted to an account (business key, credits, when).
    pub async fn purchases(
        &self,
        account_id: &AccountId,
        limit: u32,
    ) -> ServiceResult<Vec<(String, i64, chrono::DateTime<chrono::Utc>)>> {
        with_retry(|| self.engine.purchases(account_id, limit)).await
    }

    /// An account's mirrored subscriptions (any status).
    pub async fn subscriptions(&self, account_id: &AccountId) -> ServiceResult<Vec<Subscription>> {
        with_retry(|| self.engine.subscriptions(account_id)).await
    }

    /// Gauges for metrics: open holds and the connection pool.
    pub async fn stats(&self) -> ServiceResult<StoreStats> {
        Ok(self.engine.stats().await?)
    }

    /// One sweeper pass: expire overdue holds in batches until none are left.
    pub async fn sweep_once(&self) -> ServiceResult<u64> {
        let mut total = 0u64;
        loop {
            let n = self.engine.expire_due(SWEEP_BATCH).await?;
            total = total.saturating_add(n);
            if n < u64::from(SWEEP_BATCH) {
                return Ok(total);
            }
        }
    }

    /// Runs the sweeper and the idempotency purge until `stop` resolves.
    pub async fn run_background(
        &self,
        sweep_every: Duration,
        retention: TimeDelta,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut tick = tokio::time::interval(sweep_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {}
            }
            match self.sweep_once().await {
                Ok(0) => {}
                Ok(n) => {
                    metrics::counter!("tally_hold_expirations_total").increment(n);
                    debug!(expired = n, "sweeper expired holds");
                }
                Err(e) => warn!(error.message = %e, "sweeper pass failed"),
            }
            // Purge about once a minute at the default one-second sweep interval.
            ticks = ticks.wrapping_add(1);
            if ticks % 60 == 1
                && let Err(e) = self.engine.purge_idempotency(retention, PURGE_BATCH).await
            {
                warn!(error.message = %e, "idempotency purge failed");
            }
        }
    }
}
