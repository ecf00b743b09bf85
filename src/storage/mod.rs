//! The backend port: what a database must do for the ledger, and two backends.
//!
//! [`Backend`] is a small trait of primitives: open a write transaction ([`Tx`]: claim an
//! idempotency key, lock an account, load its rows into a [`Book`], write what changed, store
//! the outcome), group commit for the job path ([`batch`]), and reads. The use cases (which
//! steps, in which order, and what they decide) live in the ledger (`ledger/`); the decisions in
//! [`crate::domain`]. A backend writes guarded statements (`WHERE available >= n`, row locks)
//! so that concurrent transactions cannot break what the rules decided; it never decides a
//! business rule.

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};

use crate::domain::book::{Book, Grant, Ids};
use crate::domain::command::Idempotency;
use crate::domain::outcome::Outcome;
use crate::domain::plan::Policy;
use crate::domain::{AccountId, EntryRecord, Hold, HoldId, HoldState, LedgerError};

/// The columns of a hold row, in the order both backends read them.
macro_rules! hold_columns {
    () => {
        "hold_id, account_id, amount, state, committed_amount, refunded_amount, metadata, \
         created_at, expires_at, resolved_at"
    };
}

pub mod batch;
pub mod cache;
pub mod postgres;
pub mod sqlite;

/// What a backend can report.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StorageError {
    /// The ledger refused the command; nothing was written.
    #[error(transparent)]
    Rejected(#[from] LedgerError),
    /// A serialization failure, deadlock or busy database: retrying the whole call is safe.
    #[error("the database reported contention")]
    Contended,
    /// The database cannot be reached (connect failure, pool timeout, shutting down). Nothing
    /// was written.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The connection failed while COMMIT was in flight: the transaction may or may not be
    /// stored, and only a retry with the same idempotency key can tell (it replays if it was).
    #[error("the database connection failed during commit: {0}")]
    InDoubt(String),
    /// Anything else: a bug or a broken invariant. Logged, reported as INTERNAL.
    #[error("storage failure: {0}")]
    Other(String),
}

impl StorageError {
    /// Wraps an unexpected error, keeping only its message (never a connection string).
    pub fn other(e: impl std::fmt::Display) -> Self {
        Self::Other(e.to_string())
    }
}

/// Result alias for storage calls.
pub type StorageResult<T> = Result<T, StorageError>;

/// An outcome and whether it was replayed from an idempotency record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied<T> {
    /// The outcome (stored or fresh).
    pub outcome: T,
    /// True when an earlier call with the same key produced it.
    pub replayed: bool,
}

impl<T> Applied<T> {
    /// A fresh outcome.
    pub fn fresh(outcome: T) -> Self {
        Self {
            outcome,
            replayed: false,
        }
    }
}

/// A page request over an account's holds, newest first.
#[derive(Clone, Debug)]
pub struct HoldQuery {
    /// The account.
    pub account_id: AccountId,
    /// Observed states to include; empty means all.
    pub states: Vec<HoldState>,
    /// Return holds older than this one (keyset pagination).
    pub before: Option<HoldId>,
    /// Most holds to return.
    pub limit: u32,
}

/// A page request over accounts, by id.
#[derive(Clone, Debug, Default)]
pub struct AccountQuery {
    /// Only accounts on this plan.
    pub plan: Option<String>,
    /// Only accounts whose available credits are under their plan's threshold
    /// (plan name → threshold; plans not listed have threshold 0).
    pub low_balance: Option<Vec<(String, i64)>>,
    /// Only accounts whose id starts with this.
    pub prefix: Option<String>,
    /// Accounts after this id.
    pub after: Option<String>,
    /// Most accounts to return.
    pub limit: u32,
}

/// What the admin console's dashboard reads: everything since `since`.
#[derive(Clone, Debug)]
pub struct DashboardQuery {
    /// Start of the window (the console uses 30 days, from midnight UTC).
    pub since: DateTime<Utc>,
    /// Plan name → low-balance threshold (plans not listed: 0).
    pub thresholds: Vec<(String, i64)>,
    /// Most accounts in the top-usage list.
    pub top: u32,
}

/// Credits used on one day (UTC) by one operation: commits less refunds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRow {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// The hold's `operation` label (set by the server for a priced reserve); empty if none.
    pub operation: String,
    /// Credits charged less credits refunded.
    pub credits: i64,
    /// Holds committed.
    pub jobs: i64,
}

/// Purchases granted on one day (UTC) of one pack (or `subscription` for invoices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SalesRow {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// The pack's display name, `subscription`, or empty when unknown.
    pub pack: String,
    /// Purchases.
    pub count: i64,
    /// Credits granted.
    pub credits: i64,
    /// Amount paid, in the currency's minor unit.
    pub paid: i64,
}

/// The dashboard's numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dashboard {
    /// Usage per day and operation, by day.
    pub usage: Vec<UsageRow>,
    /// Purchases per day and pack, by day.
    pub purchases: Vec<SalesRow>,
    /// The accounts that used the most credits, most first: (account, credits).
    pub top: Vec<(String, i64)>,
    /// Accounts under their plan's low-balance threshold.
    pub low_accounts: i64,
}

/// The dashboard's numbers from their rows (day, operation, credits, jobs) and (day, pack,
/// count, credits, paid).
pub(crate) fn dashboard_from_rows(
    usage: Vec<(String, String, i64, i64)>,
    purchases: Vec<(String, String, i64, i64, i64)>,
    top: Vec<(String, i64)>,
    low_accounts: i64,
) -> Dashboard {
    Dashboard {
        usage: usage
            .into_iter()
            .map(|(day, operation, credits, jobs)| UsageRow {
                day,
                operation,
                credits,
                jobs,
            })
            .collect(),
        purchases: purchases
            .into_iter()
            .map(|(day, pack, count, credits, paid)| SalesRow {
                day,
                pack,
                count,
                credits,
                paid,
            })
            .collect(),
        top,
        low_accounts,
    }
}

/// A received Stripe event as logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripeEventRow {
    /// `evt_…`.
    pub event_id: String,
    /// Its type.
    pub kind: String,
    /// What Tally did with it.
    pub effect: String,
    /// The business fact it concerns.
    pub business_key: Option<String>,
    /// When Tally recorded it.
    pub received_at: DateTime<Utc>,
}

/// Which way an entry listing walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryCursor {
    /// Newest first, entries older than this id (`None`: from the newest).
    Before(Option<i64>),
    /// Oldest first, entries newer than this id (`None`: from the oldest).
    After(Option<i64>),
}

/// A page request over ledger entries.
#[derive(Clone, Debug)]
pub struct EntryQuery {
    /// Only this account's entries.
    pub account_id: Option<AccountId>,
    /// Only these kinds; empty means all.
    pub kinds: Vec<crate::domain::rules::EntryKind>,
    /// Entries at or after this time.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Entries before this time.
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Direction and position.
    pub cursor: EntryCursor,
    /// Most entries to return.
    pub limit: u32,
}

/// An account row as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountRow {
    /// The account.
    pub account_id: String,
    /// Its plan.
    pub plan: String,
    /// Available credits less debt, as everywhere (stored columns: holds past expiry count
    /// once swept).
    pub available: i64,
    /// Held credits (stored column).
    pub held: i64,
    /// Credits owed (claw-backs the grants could not cover).
    pub debt: i64,
    /// When its balance last changed.
    pub updated_at: DateTime<Utc>,
}

/// A broken ledger invariant found by [`Backend::audit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The account concerned.
    pub account_id: String,
    /// What does not add up.
    pub detail: String,
}

/// A database the ledger runs on. Implemented by [`postgres::PgStore`] and
/// [`sqlite::SqliteStore`]; used by the ledger (`ledger/`) only.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The plans' allowances (group commit settles books with them).
    fn policy(&self) -> &Policy;
    /// Opens a write transaction.
    async fn begin(&self) -> StorageResult<Box<dyn Tx>>;
    /// What runs job-path commands in shared transactions, and how (None: one transaction
    /// per command).
    fn group_commit(&self) -> Option<(std::sync::Arc<dyn batch::Executor>, batch::Batching)>;
    /// The account's balance as stored (its row, grants with credits, whether something is
    /// past its expiry).
    async fn read_balance(
        &self,
        account_id: &str,
    ) -> StorageResult<crate::domain::book::StoredBalance>;
    /// Up to `limit` accounts with an overdue hold or grant.
    async fn due_accounts(&self, limit: u32) -> StorageResult<Vec<String>>;
    /// One hold, as observed now.
    async fn hold(&self, hold_id: &HoldId) -> StorageResult<Hold>;
    /// A page of an account's holds, as observed now.
    async fn list_holds(&self, query: &HoldQuery) -> StorageResult<Vec<Hold>>;
    /// When an account was created.
    async fn created_at(&self, account_id: &AccountId) -> StorageResult<DateTime<Utc>>;
    /// An account's stored grants that still hold credits, in consumption order.
    async fn grants(&self, account_id: &AccountId) -> StorageResult<Vec<Grant>>;
    /// Credits charged (commits less refunds) to an account since `since`.
    async fn used_since(&self, account_id: &AccountId, since: DateTime<Utc>) -> StorageResult<i64>;
    /// A page of accounts by id.
    async fn list_accounts(&self, query: &AccountQuery) -> StorageResult<Vec<AccountRow>>;
    /// The admin console's dashboard numbers.
    async fn dashboard(&self, query: &DashboardQuery) -> StorageResult<Dashboard>;
    /// A page of received Stripe events, newest first, older than `before` (time, id).
    async fn stripe_events(
        &self,
        before: Option<(DateTime<Utc>, String)>,
        limit: u32,
    ) -> StorageResult<Vec<StripeEventRow>>;
    /// A page of ledger entries.
    async fn list_entries(&self, query: &EntryQuery) -> StorageResult<Vec<EntryRecord>>;
    /// Deletes up to `limit` idempotency records older than `retention`.
    async fn purge_idempotency(&self, retention: TimeDelta, limit: u32) -> StorageResult<u64>;
    /// Checks every account: entries and grants sum to the balance columns, held equals
    /// open holds; and the Stripe facts: one grant per purchase, claw-backs within it.
    async fn audit(&self) -> StorageResult<Vec<Violation>>;
    /// The Stripe customer linked to an account.
    async fn customer_of(&self, account_id: &AccountId) -> StorageResult<Option<String>>;
    /// Links an account to a Stripe customer (creating the account if new); if another
    /// customer was linked first, keeps and returns that one.
    async fn link_customer(
        &self,
        account_id: &AccountId,
        customer_id: &str,
    ) -> StorageResult<String>;
    /// The newest purchases granted to an account (business key, credits, when).
    async fn purchases(
        &self,
        account_id: &AccountId,
        limit: u32,
    ) -> StorageResult<Vec<(String, i64, DateTime<Utc>)>>;
    /// The account's mirrored subscriptions (any status).
    async fn subscriptions(
        &self,
        account_id: &AccountId,
    ) -> StorageResult<Vec<crate::domain::payment::Subscription>>;
    /// Leases up to `limit` deliveries that are due, for these endpoints (not disabled):
    /// each the oldest pending row of its account and endpoint, not leased by anyone (or its
    /// lease ran out). Leased rows are not leased again until `lease` has passed.
    async fn lease_events(
        &self,
        endpoints: &[String],
        limit: u32,
        lease: TimeDelta,
    ) -> StorageResult<Vec<Delivery>>;
    /// Stores what an attempt ended in, and ends the lease.
    async fn end_attempt(&self, seq: i64, end: &AttemptEnd) -> StorageResult<()>;
    /// A page of outbox rows, newest first.
    async fn list_events(&self, query: &EventQuery) -> StorageResult<Vec<EventRow>>;
    /// Queues an event again (every endpoint, or one): pending, attempts 0, due now. Returns
    /// the rows queued.
    async fn redeliver_event(&self, event_id: &str, endpoint: Option<&str>) -> StorageResult<u64>;
    /// Endpoints a receiver disabled (410 Gone): name, when, why.
    async fn disabled_endpoints(&self) -> StorageResult<Vec<(String, DateTime<Utc>, String)>>;
    /// Enables a disabled endpoint; false if it was not disabled.
    async fn enable_endpoint(&self, name: &str) -> StorageResult<bool>;
    /// Deletes up to `limit` delivered or failed outbox rows whose last attempt is older than
    /// `retention`.
    async fn purge_events(&self, retention: TimeDelta, limit: u32) -> StorageResult<u64>;
    /// Pending and failed rows of these endpoints, and when the oldest pending was created.
    async fn outbox_stats(&self, endpoints: &[String]) -> StorageResult<OutboxStats>;
    /// Up to `limit` grants with credits left that expire within `horizon` and have no
    /// `credits.expiring` event yet.
    async fn expiring_grants(&self, horizon: TimeDelta, limit: u32) -> StorageResult<Vec<Grant>>;
    /// Notified after a transaction of this process committed outbox rows (the dispatcher
    /// wakes on it instead of waiting for its next poll).
    fn outbox_written(&self) -> std::sync::Arc<tokio::sync::Notify>;
    /// Committed changes of accounts, from every writer of the database (PostgreSQL: every
    /// replica, through one listening connection per call; SQLite: this process).
    fn changes(&self) -> Changes;
    /// Round trip to the database (readiness).
    async fn ping(&self) -> StorageResult<()>;
    /// Gauges for metrics: open holds and the connection pool.
    async fn stats(&self) -> StorageResult<StoreStats>;
}

/// The dispatcher looks for accounts' next events among this many oldest pending deliveries:
/// an account whose next event is younger waits until older ones are delivered (a bounded
/// cost per lease, whatever the backlog).
pub const LEASE_WINDOW: i64 = 4096;

/// A delivery the dispatcher leased.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The outbox row.
    pub seq: i64,
    /// The `webhook-id`.
    pub event_id: String,
    /// Where it goes.
    pub endpoint: String,
    /// The account it concerns.
    pub account_id: String,
    /// Its type.
    pub kind: String,
    /// The signed body.
    pub body: String,
    /// Attempts made before this one.
    pub attempts: u32,
    /// When the change happened.
    pub created_at: DateTime<Utc>,
}

/// What an attempt ended in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptEnd {
    /// A 2xx answer.
    Delivered {
        /// Its status.
        status: u16,
    },
    /// Failed; try again at `at`.
    Retry {
        /// The next attempt.
        at: DateTime<Utc>,
        /// The answer's status, if one came.
        status: Option<u16>,
        /// What went wrong (never a secret).
        error: String,
    },
    /// Failed, and the schedule is spent.
    Failed {
        /// The answer's status, if one came.
        status: Option<u16>,
        /// What went wrong.
        error: String,
    },
    /// 410 Gone: the endpoint is disabled; the row stays pending, its attempt not counted.
    EndpointGone {
        /// The endpoint.
        endpoint: String,
    },
}

/// A page request over the outbox, newest first.
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    /// Only this account's events.
    pub account_id: Option<String>,
    /// Only this type.
    pub kind: Option<String>,
    /// Only rows in this state.
    pub state: Option<crate::domain::event::DeliveryState>,
    /// Only this endpoint's rows.
    pub endpoint: Option<String>,
    /// Only this event.
    pub event_id: Option<String>,
    /// Rows older than this one.
    pub before: Option<i64>,
    /// Most rows to return.
    pub limit: u32,
}

/// An outbox row as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRow {
    /// The row.
    pub seq: i64,
    /// The `webhook-id`.
    pub event_id: String,
    /// Where it goes.
    pub endpoint: String,
    /// The account.
    pub account_id: String,
    /// Its type.
    pub kind: String,
    /// The body sent.
    pub body: String,
    /// Where it stands.
    pub state: crate::domain::event::DeliveryState,
    /// Attempts made.
    pub attempts: u32,
    /// When the change happened.
    pub created_at: DateTime<Utc>,
    /// When it is tried next (pending rows).
    pub next_attempt_at: DateTime<Utc>,
    /// When it was last tried.
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// The last answer's status.
    pub last_status: Option<i32>,
    /// The last failure.
    pub last_error: Option<String>,
    /// When a 2xx came.
    pub delivered_at: Option<DateTime<Utc>>,
}

/// The outbox at a glance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Rows not delivered yet.
    pub pending: i64,
    /// Rows whose schedule is spent.
    pub failed: i64,
    /// When the oldest pending row's change happened.
    pub oldest_pending: Option<DateTime<Utc>>,
}

/// Parses a stored delivery state.
pub(crate) fn delivery_state(s: &str) -> StorageResult<crate::domain::event::DeliveryState> {
    crate::domain::event::DeliveryState::parse(s)
        .ok_or_else(|| StorageError::Other(format!("unknown delivery state {s:?}")))
}

/// The (endpoint, event) rows an event makes under the policy: one per endpoint that wants it.
pub(crate) fn outbox_rows<'a>(
    policy: &'a Policy,
    events: &'a [crate::domain::event::NewEvent],
) -> impl Iterator<Item = (&'a str, &'a crate::domain::event::NewEvent)> + 'a {
    events
        .iter()
        .flat_map(move |e| policy.events.endpoints_for(e.kind).map(move |n| (n, e)))
}

/// What `/metrics` reports about the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Holds in state `open` (some may be past expiry and not yet swept).
    pub open_holds: i64,
    /// Connections the pool holds now.
    pub pool_size: u32,
    /// Of those, idle.
    pub pool_idle: u32,
    /// The pool's maximum.
    pub pool_max: u32,
}

/// The answer of an idempotency claim.
pub enum Claim<Now> {
    /// The key is ours now; the transaction's clock reads `Now`.
    New(Now),
    /// The key was used before: its fingerprint and stored outcome.
    Existing {
        /// The fingerprint stored with the key.
        fingerprint: Vec<u8>,
        /// The outcome stored with it (JSON of [`Outcome`]).
        response: Option<String>,
    },
}

/// Replays a stored outcome if the fingerprint matches.
pub(crate) fn replay<T: TryFrom<Outcome>>(
    idem: &Idempotency,
    fingerprint: &[u8],
    response: Option<&str>,
) -> StorageResult<Applied<T>> {
    if fingerprint != idem.fingerprint && idem.legacy.is_none_or(|l| fingerprint != l) {
        return Err(LedgerError::IdempotencyKeyReused.into());
    }
    let stored: Outcome = serde_json::from_str(response.unwrap_or_default())
        .map_err(|e| StorageError::Other(format!("unreadable idempotency record: {e}")))?;
    // The same fingerprint under another operation cannot happen (the operation is hashed in).
    T::try_from(stored)
        .map(|outcome| Applied {
            outcome,
            replayed: true,
        })
        .map_err(|_| LedgerError::IdempotencyKeyReused.into())
}

/// Serializes an outcome for its idempotency record.
pub(crate) fn to_record(outcome: impl Into<Outcome>) -> StorageResult<String> {
    serde_json::to_string(&outcome.into()).map_err(StorageError::other)
}

/// States as stored names, for `IN` filters.
pub(crate) fn state_names(states: &[HoldState]) -> Vec<String> {
    states.iter().map(|s| s.as_str().to_owned()).collect()
}

/// Maps the names of constraints the ledger relies on to the rejection they mean.
pub(crate) fn constraint_rejection(constraint: &str) -> Option<LedgerError> {
    match constraint {
        "account_balance_limit" => Some(LedgerError::BalanceLimitExceeded {
            limit: crate::domain::MAX_BALANCE,
        }),
        _ => None,
    }
}

/// Finds accounts whose balance columns disagree with their entries or open holds.
/// Portable SQL (both dialects).
pub(crate) const AUDIT_SQL: &str = "
SELECT a.account_id, a.available, a.held,
       CAST(COALESCE(e.av, 0) AS BIGINT) AS entries_available,
       CAST(COALESCE(e.he, 0) AS BIGINT) AS entries_held,
       CAST(COALESCE(h.open_amount, 0) AS BIGINT) AS open_held,
       CAST(COALESCE(g.remaining, 0) AS BIGINT) AS grants_remaining,
       CAST(COALESCE(g.held, 0) AS BIGINT) AS grants_held,
       a.debt, CAST(COALESCE(e.de, 0) AS BIGINT) AS entries_debt
FROM account a
LEFT JOIN (SELECT account_id, SUM(available_delta) AS av, SUM(held_delta) AS he, SUM(debt_delta) AS de
           FROM entry GROUP BY account_id) e ON e.account_id = a.account_id
LEFT JOIN (SELECT account_id, SUM(amount) AS open_amount
           FROM hold WHERE state = 'open' GROUP BY account_id) h ON h.account_id = a.account_id
LEFT JOIN (SELECT account_id, SUM(remaining) AS remaining, SUM(held) AS held
           FROM bucket GROUP BY account_id) g ON g.account_id = a.account_id
WHERE a.available <> COALESCE(e.av, 0) OR a.held <> COALESCE(e.he, 0)
   OR a.held <> COALESCE(h.open_amount, 0)
   OR a.available <> COALESCE(g.remaining, 0) OR a.held <> COALESCE(g.held, 0)
   OR a.debt <> COALESCE(e.de, 0)
ORDER BY a.account_id";

/// A row of [`AUDIT_SQL`]: account, columns (available, held), entry sums (available, held),
/// the sum of open holds, and grant sums (remaining, held).
pub(crate) type AuditRow = (String, i64, i64, i64, i64, i64, i64, i64, i64, i64);

/// Turns a row of [`AUDIT_SQL`] into a violation.
pub(crate) fn violation(row: AuditRow) -> Violation {
    let (
        account_id,
        available,
        held,
        entries_available,
        entries_held,
        open_held,
        remaining,
        grants_held,
        debt,
        entries_debt,
    ) = row;
    Violation {
        account_id,
        detail: format!(
            "columns available={available} held={held}; entries available={entries_available} \
             held={entries_held}; open holds={open_held}; grants remaining={remaining} held={grants_held}; \
             debt={debt}, entries debt={entries_debt}"
        ),
    }
}

/// Finds Stripe facts that do not reconcile with the books: a purchase that lost more than it
/// granted, a grant made for a business fact that the fact does not record (a second grant of
/// one purchase), a granted fact whose grant is missing or differs, and purchase grants that
/// name a Checkout Session no fact owns. Rows: (account, detail). Portable SQL.
pub(crate) const STRIPE_AUDIT_SQL: &str = "
SELECT COALESCE(account_id, ''), 'purchase ' || business_key || ' clawed ' || CAST(clawed AS TEXT)
       || ' of ' || CAST(credits AS TEXT) || ' credits'
FROM stripe_fact WHERE clawed < 0 OR clawed > credits
UNION ALL
SELECT b.account_id, 'grant ' || b.bucket_id || ' for ' || b.business_key || ' is not the grant its fact records'
FROM bucket b LEFT JOIN stripe_fact f
  ON f.business_key = b.business_key AND f.grant_id = b.bucket_id AND f.state = 'granted'
WHERE b.business_key IS NOT NULL AND f.business_key IS NULL
UNION ALL
SELECT COALESCE(f.account_id, ''), 'fact ' || f.business_key || ' granted ' || CAST(f.credits AS TEXT)
       || ' credits but its grant is missing or differs'
FROM stripe_fact f LEFT JOIN bucket b ON b.bucket_id = f.grant_id
WHERE f.state = 'granted' AND f.grant_id IS NOT NULL
  AND (b.bucket_id IS NULL OR b.granted <> f.credits OR b.business_key IS NULL OR b.business_key <> f.business_key)
UNION ALL
SELECT account_id, 'purchase grant ' || bucket_id || ' names a Checkout Session that no fact owns'
FROM bucket WHERE source = 'purchase' AND business_key IS NULL AND reason LIKE '%checkout_session:%'";

/// A purchase row: key, account, state, credits, PaymentIntent, amount paid, clawed, grant.
pub(crate) type PurchaseRow = (
    String,
    Option<String>,
    String,
    i64,
    Option<String>,
    Option<i64>,
    i64,
    Option<String>,
);

/// Parses a [`PurchaseRow`].
pub(crate) fn purchase_from_row(r: PurchaseRow) -> StorageResult<crate::domain::payment::Purchase> {
    let (business_key, account_id, state, credits, payment_intent, amount_paid, clawed, grant_id) =
        r;
    Ok(crate::domain::payment::Purchase {
        state: crate::domain::payment::PurchaseState::parse(&state)
            .ok_or_else(|| StorageError::Other(format!("unknown purchase state {state:?}")))?,
        business_key,
        account_id,
        credits,
        payment_intent,
        amount_paid: amount_paid.unwrap_or(0),
        clawed,
        grant_id,
    })
}

/// A charge row: id, PaymentIntent, amount, refunded.
pub(crate) type ChargeRow = (String, Option<String>, i64, i64);

/// Parses a [`ChargeRow`].
pub(crate) fn charge_from_row(r: ChargeRow) -> crate::domain::payment::Charge {
    let (charge_id, payment_intent, amount, amount_refunded) = r;
    crate::domain::payment::Charge {
        charge_id,
        payment_intent,
        amount,
        amount_refunded,
    }
}

/// A dispute row: id, charge, PaymentIntent, amount, status.
pub(crate) type DisputeRow = (String, String, Option<String>, Option<i64>, String);

/// Parses a [`DisputeRow`].
pub(crate) fn dispute_from_row(r: DisputeRow) -> StorageResult<crate::domain::payment::Dispute> {
    let (dispute_id, charge_id, payment_intent, amount, status) = r;
    Ok(crate::domain::payment::Dispute {
        status: crate::domain::payment::DisputeStatus::parse(&status)
            .ok_or_else(|| StorageError::Other(format!("unknown dispute status {status:?}")))?,
        dispute_id,
        charge_id,
        payment_intent,
        amount,
    })
}

/// A subscription row: id, account, customer, status, plan, period end, cancel at period end,
/// state as of, started.
pub(crate) type SubscriptionRow = (
    String,
    String,
    String,
    String,
    String,
    Option<i64>,
    bool,
    i64,
    i64,
);

/// Parses a [`SubscriptionRow`].
pub(crate) fn subscription_from_row(r: SubscriptionRow) -> crate::domain::payment::Subscription {
    let (subscription_id, account_id, customer, status, plan, period_end, cancel, as_of, started) =
        r;
    crate::domain::payment::Subscription {
        subscription_id,
        account_id,
        customer,
        status,
        plan,
        period_end,
        cancel_at_period_end: cancel,
        as_of,
        started,
    }
}

/// Kinds as stored names, for `IN` filters.
pub(crate) fn kind_names(kinds: &[crate::domain::rules::EntryKind]) -> Vec<String> {
    kinds.iter().map(|k| k.as_str().to_owned()).collect()
}

/// Parses a stored entry kind.
pub(crate) fn entry_kind(s: &str) -> StorageResult<crate::domain::rules::EntryKind> {
    crate::domain::rules::EntryKind::parse(s)
        .ok_or_else(|| StorageError::Other(format!("unknown entry kind {s:?}")))
}

/// Plan thresholds as the JSON both dialects join against.
pub(crate) fn thresholds_json(t: &[(String, i64)]) -> StorageResult<String> {
    let rows: Vec<serde_json::Value> = t
        .iter()
        .map(|(plan, threshold)| serde_json::json!({"plan": plan, "threshold": threshold}))
        .collect();
    serde_json::to_string(&rows).map_err(StorageError::other)
}

/// Random, time-ordered grant ids (`grt_` + a UUIDv7 in hex).
pub(crate) struct RandomIds;

impl Ids for RandomIds {
    fn grant_id(&mut self) -> String {
        format!("grt_{}", uuid::Uuid::now_v7().simple())
    }

    fn event_id(&mut self) -> String {
        format!("evt_{}", uuid::Uuid::now_v7().simple())
    }
}

/// A committed change of an account, as the balance watchers hear of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The account's row moved (to `version`, when the notification says).
    Account {
        /// The account.
        account_id: String,
        /// Its row's version after the change (`None`: re-read to learn it).
        version: Option<i64>,
    },
    /// Changes may have been missed (the listening connection was lost and is back): every
    /// watched account is to be read again.
    Resync,
}

/// Changes announced after [`Change`]s: at most this many wait for a slow receiver before it
/// is told it lagged (and re-reads everything).
pub const CHANGES_BUFFER: usize = 4096;

/// A feed of [`Change`]s. Dropping it stops what it started (PostgreSQL: its listening
/// connection).
#[derive(Debug)]
pub struct Changes {
    /// The changes; `Lagged` means some were missed (treat it as [`Change::Resync`]).
    pub rx: tokio::sync::broadcast::Receiver<Change>,
    /// The listening task, aborted on drop.
    pub task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Changes {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The primitive steps of one write transaction; each backend implements them, and the
/// application layer (the ledger (`ledger/`)) composes them the same way for both.
#[async_trait]
pub trait Tx: Send {
    /// The transaction's clock (PostgreSQL `now()`; SQLite: the process clock).
    async fn now(&mut self) -> StorageResult<DateTime<Utc>>;
    /// Claims the idempotency key (a concurrent duplicate waits here), or returns its record.
    async fn claim(&mut self, idem: &Idempotency, now: DateTime<Utc>) -> StorageResult<Claim<()>>;
    /// Stores the outcome under the claimed key.
    async fn store_outcome(&mut self, idem: &Idempotency, outcome: &Outcome) -> StorageResult<()>;
    /// The account a hold belongs to.
    async fn hold_account(&mut self, hold_id: &str) -> StorageResult<Option<String>>;
    /// Locks an account row for the rest of the transaction (creating it on `create` with
    /// that plan) and returns its header as an empty book, and whether it was created now.
    async fn lock_book(
        &mut self,
        account_id: &str,
        create: Option<&str>,
        now: DateTime<Utc>,
    ) -> StorageResult<Option<(Book, bool)>>;
    /// Loads what operations on `book` need: live grants, the last allowance grant, open
    /// holds past expiry, the `hold` operated on, their draws and the grants they name.
    async fn load(
        &mut self,
        book: &mut Book,
        hold: Option<&str>,
        now: DateTime<Utc>,
    ) -> StorageResult<()>;
    /// Loads the book's grants of these allowance periods (a plan switch must see them), also
    /// those that hold nothing any more.
    async fn load_periods(&mut self, book: &mut Book, periods: &[String]) -> StorageResult<()>;
    /// Writes what the book's operation changed, and the events it makes
    /// ([`crate::domain::event::of_book`]) into the outbox.
    async fn write(&mut self, book: &Book, now: DateTime<Utc>) -> StorageResult<()>;
    /// Writes events into the outbox (a row per endpoint that wants each; a second event with
    /// the same dedupe key is skipped).
    async fn emit(&mut self, events: &[crate::domain::event::NewEvent]) -> StorageResult<()>;
    /// Serialises every Stripe effect (PostgreSQL: a transaction-scoped advisory lock;
    /// SQLite: its one writer already does). The lock exists whether or not any fact does, so
    /// no decision is made from an unlocked "not found".
    async fn lock_stripe(&mut self) -> StorageResult<()>;
    /// Inserts the event row unless its id exists; true if inserted.
    async fn insert_stripe_event(
        &mut self,
        event: &crate::domain::payment::StripeEvent,
        now: DateTime<Utc>,
    ) -> StorageResult<bool>;
    /// The state of a business fact.
    async fn fact_state(&mut self, business_key: &str) -> StorageResult<Option<String>>;
    /// The account linked to a Stripe customer.
    async fn account_of_customer(&mut self, customer: &str) -> StorageResult<Option<String>>;
    /// Links an existing account to a customer unless it has one.
    async fn link(
        &mut self,
        account_id: &str,
        customer: &str,
        now: DateTime<Utc>,
    ) -> StorageResult<()>;
    /// A purchase by its business key, or else by its PaymentIntent.
    async fn purchase(
        &mut self,
        business_key: Option<&str>,
        payment_intent: Option<&str>,
    ) -> StorageResult<Option<crate::domain::payment::Purchase>>;
    /// Stores a purchase.
    async fn put_purchase(
        &mut self,
        p: &crate::domain::payment::Purchase,
        now: DateTime<Utc>,
    ) -> StorageResult<()>;
    /// The charges of a PaymentIntent, and `charge` itself.
    async fn charges(
        &mut self,
        payment_intent: Option<&str>,
        charge: Option<&str>,
    ) -> StorageResult<Vec<crate::domain::payment::Charge>>;
    /// Stores a charge.
    async fn put_charge(&mut self, c: &crate::domain::payment::Charge) -> StorageResult<()>;
    /// The disputes of a PaymentIntent's charges, of `charge`, and `dispute` itself.
    async fn disputes(
        &mut self,
        payment_intent: Option<&str>,
        charge: Option<&str>,
        dispute: Option<&str>,
    ) -> StorageResult<Vec<crate::domain::payment::Dispute>>;
    /// Stores a dispute.
    async fn put_dispute(&mut self, d: &crate::domain::payment::Dispute) -> StorageResult<()>;
    /// A subscription by id.
    async fn subscription(
        &mut self,
        subscription_id: &str,
    ) -> StorageResult<Option<crate::domain::payment::Subscription>>;
    /// An account's subscriptions.
    async fn subscriptions_of(
        &mut self,
        account_id: &str,
    ) -> StorageResult<Vec<crate::domain::payment::Subscription>>;
    /// Stores a subscription.
    async fn put_subscription(
        &mut self,
        s: &crate::domain::payment::Subscription,
    ) -> StorageResult<()>;
    /// A claw-back fact written before migration 0009 (`refund:<charge>`, `dispute:<id>`):
    /// its state (`clawed` or `restored`) and credits.
    async fn legacy_claw(&mut self, key: &str) -> StorageResult<Option<(String, i64)>>;
    /// Forgets a folded pre-0009 claw-back fact (its ledger entries stay).
    async fn forget_legacy(&mut self, key: &str) -> StorageResult<()>;
    /// Names the business fact a grant was made for (unique: a second grant is refused).
    async fn tag_grant(&mut self, grant_id: &str, business_key: &str) -> StorageResult<()>;
    /// Creates or updates a business fact (invoices).
    async fn put_fact(
        &mut self,
        business_key: &str,
        account_id: Option<&str>,
        state: &str,
        credits: i64,
        grant_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> StorageResult<()>;
    /// Runs one statement without parameters or rows (both dialects' spelling).
    async fn run(&mut self, sql: &'static str) -> StorageResult<()>;
    /// Marks a point a later [`Tx::rollback_to_savepoint`] returns to (one at a time).
    async fn savepoint(&mut self) -> StorageResult<()> {
        self.run("SAVEPOINT job").await
    }
    /// Undoes everything since the savepoint, and forgets it.
    async fn rollback_to_savepoint(&mut self) -> StorageResult<()> {
        self.run("ROLLBACK TO SAVEPOINT job").await?;
        self.release_savepoint().await
    }
    /// Keeps everything since the savepoint, and forgets it.
    async fn release_savepoint(&mut self) -> StorageResult<()> {
        self.run("RELEASE SAVEPOINT job").await
    }
    /// Commits.
    async fn commit(self: Box<Self>) -> StorageResult<()>;
}

/// Ids of the holds a book has loaded, for loading their draws.
pub(crate) fn loaded_hold_ids(book: &Book) -> Vec<String> {
    book.holds.keys().cloned().collect()
}

/// Grant ids named by loaded draws but not loaded yet.
pub(crate) fn missing_grants(book: &Book) -> Vec<String> {
    let mut v: Vec<String> = book
        .draws
        .values()
        .map(|d| d.grant_id.clone())
        .filter(|b| !book.grants.contains_key(b))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Parses a stored grant source.
pub(crate) fn source(s: &str) -> StorageResult<crate::domain::book::Source> {
    crate::domain::book::Source::parse(s)
        .ok_or_else(|| StorageError::Other(format!("unknown grant source {s:?}")))
}
