//! The storage port: one trait of use-case-level atomic operations, two backends.
//!
//! Each mutating method runs one database transaction that claims the idempotency key, applies
//! the change (balance columns, hold row, ledger entries) and stores the outcome for replay, so
//! the three commit together or not at all. Business decisions come from [`crate::domain::rules`];
//! backends only load state, call the rules, and write guarded statements (`WHERE available >= n`,
//! row locks) so that concurrent requests cannot break what the rules decided.
//!
//! Because the trait speaks in commands and outcomes (never SQL or connections), a backend can
//! later coalesce concurrent commands into one transaction (group commit) without touching the
//! service or the API.

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};

use crate::domain::book::{Book, Bucket, Ids};
use crate::domain::command::{
    Adjust, CommitHold, ExtendHold, Grant, Idempotency, OpenAccount, Refund, Reserve, SetPlan,
    Transfer,
};
use crate::domain::outcome::{AdjustOutcome, OpenOutcome, Outcome, TransferOutcome};
use crate::domain::plan::Policy;
use crate::domain::rules::EntryKind;
use crate::domain::{
    AccountId, AccountSummary, Balance, CommitOutcome, EntryRecord, ExtendOutcome, GrantOutcome,
    Hold, HoldId, HoldState, LedgerError, PlanOutcome, RefundOutcome, ReserveOutcome,
};

/// The columns of a hold row, in the order both backends read them.
macro_rules! hold_columns {
    () => {
        "hold_id, account_id, amount, state, committed_amount, refunded_amount, metadata, \
         created_at, expires_at, resolved_at"
    };
}

/// The Store operations both backends implement the same way, on top of their `Tx`
/// primitives and reads (`begin`, `policy`, `read_balance`): expanded inside each
/// `impl Store`, so the logic exists once.
macro_rules! book_ops {
    ($ty:ty, { $($rest:tt)* }) => {
        #[async_trait::async_trait]
        impl $crate::storage::Store for $ty {
    async fn balance(&self, account_id: &$crate::domain::AccountId) -> $crate::storage::StorageResult<$crate::domain::Balance> {
        let (balance, due) = self.read_balance(account_id.as_str()).await?;
        if !due {
            return Ok(balance);
        }
        $crate::storage::settle(self.begin().await?, account_id.as_str(), &self.policy).await?;
        Ok(self.read_balance(account_id.as_str()).await?.0)
    }

    async fn reserve(
        &self,
        idem: &$crate::domain::command::Idempotency,
        cmd: &$crate::domain::command::Reserve,
    ) -> $crate::storage::StorageResult<$crate::storage::Applied<$crate::domain::ReserveOutcome>> {
        $crate::storage::narrow(
            $crate::storage::hold_cmd(self.batcher.as_deref(), self.begin(), idem, $crate::storage::Cmd::Reserve(cmd.clone()), &self.policy).await?,
        )
    }

    async fn commit_hold(
        &self,
        idem: &$crate::domain::command::Idempotency,
        cmd: &$crate::domain::command::CommitHold,
    ) -> $crate::storage::StorageResult<$crate::storage::Applied<$crate::domain::CommitOutcome>> {
        $crate::storage::narrow(
            $crate::storage::hold_cmd(self.batcher.as_deref(), self.begin(), idem, $crate::storage::Cmd::Commit(cmd.clone()), &self.policy).await?,
        )
    }

    async fn refund(
        &self,
        idem: &$crate::domain::command::Idempotency,
        cmd: &$crate::domain::command::Refund,
    ) -> $crate::storage::StorageResult<$crate::storage::Applied<$crate::domain::RefundOutcome>> {
        $crate::storage::narrow(
            $crate::storage::hold_cmd(self.batcher.as_deref(), self.begin(), idem, $crate::storage::Cmd::Refund(cmd.clone()), &self.policy).await?,
        )
    }

    async fn extend_hold(
        &self,
        idem: &$crate::domain::command::Idempotency,
        cmd: &$crate::domain::command::ExtendHold,
    ) -> $crate::storage::StorageResult<$crate::storage::Applied<$crate::domain::ExtendOutcome>> {
        $crate::storage::narrow(
            $crate::storage::hold_cmd(self.batcher.as_deref(), self.begin(), idem, $crate::storage::Cmd::Extend(cmd.clone()), &self.policy).await?,
        )
    }

    async fn grant(&self, idem: &$crate::domain::command::Idempotency, cmd: &$crate::domain::command::Grant) -> $crate::storage::StorageResult<$crate::storage::Applied<$crate::domain::GrantOutcome>> {
        let target = $crate::storage::Target::Account {
            id: cmd.account_id.as_str(),
            create: true,
        };
        $crate::storage::book_op(
            self.begin().await?,
            idem,
            target,
            &self.policy,
            |b, now, ids| {
                let id = ids.bucket_id();
                b.grant(
                    &id,
                    cmd.source,
                    cmd.amount,
                    cmd.expires_at,
                    cmd.priority,
                    &cmd.reason,
                    now,
                )
            },
        )
        .await
    }

    async fn open_account(
        &self,
        idem: &$crate::domain::command::Idempotency,
        cmd: &$crate::domain::command::OpenAccount,
    ) -> $crate::storage::StorageResult<$crate::storage::Applied<$crate::domain::OpenOutcome>> {
        $crate::storage::open_account(self.begin().await?, idem, cmd, &self.policy).await
    }

    async fn adjust(
        &self,
        idem: &$crate::domain::command::Idempotency,
        cmd: &$crate::domain::command::Adjust,
    ) -> $crate::storage::StorageResult<$crate::storage::Applied<$crate::domain::AdjustOutcome>> {
        let target = $crate::storage::Target::Account {
            id: cmd.account_id.as_str(),
            create: false,
        };
        $crate::storage::book_op(
            self.begin().await?,
            idem,
            target,
            &self.policy,
            |b, now, ids| {
                b.adjust(
                    cmd.delta,
                    &format!("{} (by {})", cmd.reason, cmd.operator),
                    now,
                    ids,
                )?;
                Ok($crate::domain::AdjustOutcome {
                    account_id: b.account_id.clone(),
                    delta: cmd.delta,
                    available: b.net_available(),
                })
            },
        )
        .await
    }

    async fn transfer(
        &self,
        idem: &$crate::domain::command::Idempotency,
        cmd: &$crate::domain::command::Transfer,
    ) -> $crate::storage::StorageResult<$crate::storage::Applied<$crate::domain::TransferOutcome>> {
        $crate::storage::transfer(self.begin().await?, idem, cmd, &self.policy).await
    }

    async fn set_plan(
        &self,
        idem: &$crate::domain::command::Idempotency,
        cmd: &$crate::domain::command::SetPlan,
    ) -> $crate::storage::StorageResult<$crate::storage::Applied<$crate::domain::PlanOutcome>> {
        $crate::storage::set_plan(self.begin().await?, idem, cmd, &self.policy).await
    }

    async fn record_stripe_event(
        &self,
        event: &$crate::storage::StripeEvent,
        effect: &$crate::storage::StripeEffect,
    ) -> $crate::storage::StorageResult<$crate::storage::StripeRecord> {
        $crate::storage::record_stripe_event(self.begin().await?, event, effect, &self.policy).await
    }

    async fn stats(&self) -> $crate::storage::StorageResult<$crate::storage::StoreStats> {
        let open_holds: i64 = sqlx::query_scalar("SELECT count(*) FROM hold WHERE state = 'open'")
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        Ok($crate::storage::StoreStats {
            open_holds,
            pool_size: self.pool.size(),
            pool_idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
            pool_max: self.pool.options().get_max_connections(),
        })
    }
            $($rest)*
        }
    };
}
pub(crate) use book_ops;

pub mod batch;
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

/// What the sweeper does when settling one account fails: a database that is unavailable
/// (or a commit in doubt, or contention) ends the pass, to be tried again on the next tick;
/// anything else is that account's own problem: it is logged with the account and counted
/// (`tally_sweeper_account_failures_total`), and the pass goes on with the other accounts.
pub(crate) fn sweep_failed(account: &str, e: StorageError) -> StorageResult<()> {
    match e {
        StorageError::Unavailable(_) | StorageError::InDoubt(_) | StorageError::Contended => Err(e),
        e => {
            metrics::counter!("tally_sweeper_account_failures_total").increment(1);
            tracing::warn!(account_id = account, error.message = %e, "sweeper could not settle an account; the others go on");
            Ok(())
        }
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
    /// Accounts after this id.
    pub after: Option<String>,
    /// Most accounts to return.
    pub limit: u32,
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
}

/// A broken ledger invariant found by [`Store::audit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The account concerned.
    pub account_id: String,
    /// What does not add up.
    pub detail: String,
}

/// The storage port. Implemented by [`postgres::PgStore`] and [`sqlite::SqliteStore`].
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The balance as callers see it now, with its breakdown. If time has done something
    /// (an overdue hold or grant, a new allowance period), it is applied first.
    async fn balance(&self, account_id: &AccountId) -> StorageResult<Balance>;
    /// Creates a hold drawn from the account's grants in consumption order.
    async fn reserve(
        &self,
        idem: &Idempotency,
        cmd: &Reserve,
    ) -> StorageResult<Applied<ReserveOutcome>>;
    /// Settles a hold.
    async fn commit_hold(
        &self,
        idem: &Idempotency,
        cmd: &CommitHold,
    ) -> StorageResult<Applied<CommitOutcome>>;
    /// Releases an open hold or returns committed credits.
    async fn refund(
        &self,
        idem: &Idempotency,
        cmd: &Refund,
    ) -> StorageResult<Applied<RefundOutcome>>;
    /// Moves an open hold's expiry.
    async fn extend_hold(
        &self,
        idem: &Idempotency,
        cmd: &ExtendHold,
    ) -> StorageResult<Applied<ExtendOutcome>>;
    /// Adds a grant, creating the account.
    async fn grant(&self, idem: &Idempotency, cmd: &Grant) -> StorageResult<Applied<GrantOutcome>>;
    /// Creates an account with its sign-up bonus.
    async fn open_account(
        &self,
        idem: &Idempotency,
        cmd: &OpenAccount,
    ) -> StorageResult<Applied<OpenOutcome>>;
    /// An operator's signed correction.
    async fn adjust(
        &self,
        idem: &Idempotency,
        cmd: &Adjust,
    ) -> StorageResult<Applied<AdjustOutcome>>;
    /// Moves credits between two accounts.
    async fn transfer(
        &self,
        idem: &Idempotency,
        cmd: &Transfer,
    ) -> StorageResult<Applied<TransferOutcome>>;
    /// Moves an account to another plan.
    async fn set_plan(
        &self,
        idem: &Idempotency,
        cmd: &SetPlan,
    ) -> StorageResult<Applied<PlanOutcome>>;
    /// One hold, as observed now.
    async fn hold(&self, hold_id: &HoldId) -> StorageResult<Hold>;
    /// A page of an account's holds, as observed now.
    async fn list_holds(&self, query: &HoldQuery) -> StorageResult<Vec<Hold>>;
    /// An account's balance, plan and creation time.
    async fn account(&self, account_id: &AccountId) -> StorageResult<AccountSummary>;
    /// An account's grants that still hold credits, in consumption order.
    async fn grants(&self, account_id: &AccountId) -> StorageResult<Vec<Bucket>>;
    /// Credits charged (commits less refunds) to an account since `since`.
    async fn used_since(&self, account_id: &AccountId, since: DateTime<Utc>) -> StorageResult<i64>;
    /// A page of accounts by id.
    async fn list_accounts(&self, query: &AccountQuery) -> StorageResult<Vec<AccountRow>>;
    /// A page of ledger entries.
    async fn list_entries(&self, query: &EntryQuery) -> StorageResult<Vec<EntryRecord>>;
    /// Applies time to up to `limit` accounts with overdue holds or grants; safe to run on many
    /// replicas at once. Returns the number of expiry entries written.
    async fn expire_due(&self, limit: u32) -> StorageResult<u64>;
    /// Deletes up to `limit` idempotency records older than `retention`.
    async fn purge_idempotency(&self, retention: TimeDelta, limit: u32) -> StorageResult<u64>;
    /// Checks every account: entries and grants sum to the balance columns, held equals
    /// open holds.
    async fn audit(&self) -> StorageResult<Vec<Violation>>;
    /// Records a verified Stripe event and applies its effect, in one transaction: a known
    /// event id, or a business fact already granted, changes nothing.
    async fn record_stripe_event(
        &self,
        event: &StripeEvent,
        effect: &StripeEffect,
    ) -> StorageResult<StripeRecord>;
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
    /// Round trip to the database (readiness).
    async fn ping(&self) -> StorageResult<()>;
    /// Gauges for metrics: open holds and the connection pool.
    async fn stats(&self) -> StorageResult<StoreStats>;
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

/// A verified Stripe event as recorded.
#[derive(Clone, Debug)]
pub struct StripeEvent {
    /// `evt_...`.
    pub event_id: String,
    /// Its type.
    pub kind: String,
    /// Test or live mode.
    pub livemode: bool,
    /// Stripe's `created` (unix seconds).
    pub created: Option<i64>,
    /// What we did with it (for operators).
    pub effect: String,
}

/// A Stripe effect, resolved against the catalog.
#[derive(Clone, Debug)]
pub enum StripeEffect {
    /// Nothing beyond recording the event.
    None,
    /// A fact about a payment: a purchase paid, pending or failed, a refund, a dispute. What
    /// it does is decided by [`crate::domain::payment::Payment::apply`].
    Payment {
        /// `checkout_session:<id>` for facts of a purchase.
        business_key: Option<String>,
        /// The fact.
        fact: crate::domain::payment::Fact,
        /// How a first paid purchase is granted.
        grant: Option<PackGrant>,
        /// Reason on the ledger lines.
        reason: String,
    },
    /// Link an account (created if new) to its Stripe customer.
    Link {
        /// The account.
        account_id: AccountId,
        /// The customer.
        customer: String,
    },
    /// Mirror a subscription onto its account if newer than what is stored for it.
    Subscription(crate::domain::payment::SubscriptionState),
    /// Grant a paid subscription invoice's credits once.
    InvoiceGrant {
        /// `invoice:<id>`.
        business_key: String,
        /// The customer billed.
        customer: String,
        /// The account named by the invoice, if any.
        account_hint: Option<AccountId>,
        /// Credits.
        amount: crate::domain::Credits,
        /// When they expire (end of the period paid for).
        expires_at: Option<DateTime<Utc>>,
        /// Reason on the grant.
        reason: String,
    },
    /// A renewal failed: that subscription is past due, if the event is newer than its state.
    PaymentFailed {
        /// `sub_...`.
        subscription: String,
        /// The event's `created`.
        as_of: i64,
    },
}

/// How a paid pack is granted.
#[derive(Clone, Debug)]
pub struct PackGrant {
    /// Source of the grant.
    pub source: crate::domain::book::Source,
    /// Lifetime of the credits.
    pub expires_in: Option<TimeDelta>,
}

/// What recording an event did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StripeRecord {
    /// The event id was recorded before: nothing changed.
    DuplicateEvent,
    /// Recorded, with the credits it moved (none when the fact was already applied through
    /// another event or the sync path).
    Recorded(Moved),
}

/// Credits one Stripe event moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Granted (a purchase or a paid invoice).
    pub granted: i64,
    /// Taken back (refunds and disputes).
    pub clawed: i64,
    /// Given back (a dispute won).
    pub given_back: i64,
}

/// The answer of an idempotency claim.
pub(crate) enum Claim<Now> {
    /// The key is ours now; the transaction's clock reads `Now`.
    New(Now),
    /// The key was used before: its fingerprint and stored outcome.
    Existing {
        fingerprint: Vec<u8>,
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
    fn bucket_id(&mut self) -> String {
        format!("grt_{}", uuid::Uuid::now_v7().simple())
    }
}

/// The primitive steps of one write transaction; each backend implements them, and the flows
/// below compose them the same way for both.
#[async_trait]
pub(crate) trait Tx: Send {
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
    /// Writes what the book's operation changed.
    async fn write(&mut self, book: &Book, now: DateTime<Utc>) -> StorageResult<()>;
    /// Serialises every Stripe effect (PostgreSQL: a transaction-scoped advisory lock;
    /// SQLite: its one writer already does). The lock exists whether or not any fact does, so
    /// no decision is made from an unlocked "not found".
    async fn lock_stripe(&mut self) -> StorageResult<()>;
    /// Inserts the event row unless its id exists; true if inserted.
    async fn insert_stripe_event(
        &mut self,
        event: &StripeEvent,
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
    async fn tag_grant(&mut self, bucket_id: &str, business_key: &str) -> StorageResult<()>;
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

/// The account of a customer: the stored link, else the account the event names (then linked).
async fn account_for(
    tx: &mut dyn Tx,
    customer: &str,
    hint: Option<&str>,
    now: DateTime<Utc>,
) -> StorageResult<Option<String>> {
    if let Some(a) = tx.account_of_customer(customer).await? {
        return Ok(Some(a));
    }
    let Some(account) = hint else { return Ok(None) };
    tx.lock_book(account, Some(crate::domain::DEFAULT_PLAN), now)
        .await?;
    tx.link(account, customer, now).await?;
    Ok(Some(account.to_owned()))
}

/// A grant the books make for a business fact.
struct FactGrant<'a> {
    business_key: &'a str,
    amount: i64,
    source: crate::domain::book::Source,
    expires_at: Option<DateTime<Utc>>,
}

/// Books what a Stripe fact decided on one account, in the caller's transaction: the grant
/// (named by its business key, so the database refuses a second one), then `claw` credits
/// taken back (positive; debt for what the grants cannot cover) or given back (negative).
/// Returns the new grant's id.
async fn book_fact(
    tx: &mut dyn Tx,
    account: &str,
    grant: Option<FactGrant<'_>>,
    claw: i64,
    reason: &str,
    policy: &Policy,
    now: DateTime<Utc>,
) -> StorageResult<Option<String>> {
    let create = grant.as_ref().map(|_| crate::domain::DEFAULT_PLAN);
    let (mut book, _) = tx
        .lock_book(account, create, now)
        .await?
        .ok_or(LedgerError::AccountNotFound)?;
    tx.load(&mut book, None, now).await?;
    book.settle(now, policy.for_plan(&book.plan), &mut RandomIds)?;
    let booked = match &grant {
        Some(g) => Some((
            g.source,
            crate::domain::Credits::new("credits", g.amount)
                .map_err(|v| StorageError::Other(v.to_string()))?,
            g.expires_at,
        )),
        None => None,
    };
    let granted = book.book_decision(booked, claw, reason, now, &mut RandomIds)?;
    tx.write(&book, now).await?;
    if let (Some(id), Some(g)) = (&granted, &grant) {
        tx.tag_grant(id, g.business_key).await?;
    }
    Ok(granted)
}

/// Loads everything known about the payment a fact concerns: its purchase (by business key,
/// else by PaymentIntent), the PaymentIntent's charges and their disputes, and the charge and
/// dispute the fact names. Called under [`Tx::lock_stripe`].
async fn load_payment(
    tx: &mut dyn Tx,
    business_key: Option<&str>,
    fact: &crate::domain::payment::Fact,
) -> StorageResult<crate::domain::payment::Payment> {
    use crate::domain::payment::Payment;
    let (pi, charge, dispute) = fact.names();
    let mut pi = pi.map(str::to_owned);
    let purchase = match business_key {
        Some(key) => tx.purchase(Some(key), None).await?,
        None => None,
    };
    if pi.is_none() {
        pi = purchase.as_ref().and_then(|p| p.payment_intent.clone());
    }
    // A dispute named by its charge only: the charge's refund events may know its PaymentIntent.
    if pi.is_none()
        && let Some(ch) = charge
    {
        pi = tx
            .charges(None, Some(ch))
            .await?
            .into_iter()
            .find_map(|c| c.payment_intent);
    }
    let purchase = match (purchase, pi.as_deref()) {
        (Some(p), _) => Some(p),
        (None, Some(pi)) => tx.purchase(None, Some(pi)).await?,
        (None, None) => None,
    };
    let charges = if pi.is_some() || charge.is_some() {
        tx.charges(pi.as_deref(), charge).await?
    } else {
        Vec::new()
    };
    let disputes = if pi.is_some() || charge.is_some() {
        tx.disputes(pi.as_deref(), charge, dispute).await?
    } else {
        Vec::new()
    };
    Ok(Payment {
        purchase,
        charges,
        disputes,
    })
}

/// Folds the pre-0009 claw-back facts of the fact's charge and dispute into the payment
/// ([`crate::domain::payment::Payment::fold_legacy`]), then forgets them: what they took is
/// not taken again, and a dispute won later gives it back.
async fn fold_legacy(
    tx: &mut dyn Tx,
    payment: &mut crate::domain::payment::Payment,
    fact: &crate::domain::payment::Fact,
) -> StorageResult<()> {
    let (_, charge, dispute) = fact.names();
    let Some(charge) = charge else {
        return Ok(());
    };
    let refund_key = format!("refund:{charge}");
    let refunded = tx
        .legacy_claw(&refund_key)
        .await?
        .map(|(_, credits)| credits);
    let dispute_key = dispute.map(|d| format!("dispute:{d}"));
    let disputed = match (&dispute_key, dispute) {
        (Some(key), Some(d)) => tx
            .legacy_claw(key)
            .await?
            .map(|(state, credits)| (d, credits, state == "restored")),
        _ => None,
    };
    if (refunded.is_some() || disputed.is_some()) && payment.fold_legacy(charge, refunded, disputed)
    {
        if refunded.is_some() {
            tx.forget_legacy(&refund_key).await?;
        }
        if let (Some(key), Some(_)) = (&dispute_key, disputed) {
            tx.forget_legacy(key).await?;
        }
    }
    Ok(())
}

/// Applies a fact about a payment: the domain decides, the books move, the facts are stored.
async fn apply_payment_fact(
    tx: &mut dyn Tx,
    business_key: Option<&str>,
    fact: &crate::domain::payment::Fact,
    grant: Option<&PackGrant>,
    reason: &str,
    policy: &Policy,
    now: DateTime<Utc>,
) -> StorageResult<Moved> {
    let mut payment = load_payment(tx, business_key, fact).await?;
    let before = payment.clone();
    fold_legacy(tx, &mut payment, fact).await?;
    let decision = payment.apply(business_key, fact.clone());
    let mut moved = Moved::default();
    let account = payment.purchase.as_ref().and_then(|p| p.account_id.clone());
    if decision.moves()
        && let Some(account) = account
    {
        let key = payment
            .purchase
            .as_ref()
            .map(|p| p.business_key.clone())
            .unwrap_or_default();
        let fact_grant = decision.grant.as_ref().map(|(_, amount)| FactGrant {
            business_key: &key,
            amount: *amount,
            source: grant.map_or(crate::domain::book::Source::Purchase, |g| g.source),
            expires_at: grant
                .and_then(|g| g.expires_in)
                .and_then(|t| now.checked_add_signed(t)),
        });
        let id = book_fact(tx, &account, fact_grant, decision.claw, reason, policy, now).await?;
        if let Some(p) = payment.purchase.as_mut()
            && id.is_some()
        {
            p.grant_id = id;
        }
        moved.granted = decision.grant.map_or(0, |(_, n)| n);
        moved.clawed = decision.claw.max(0);
        moved.given_back = decision.claw.min(0).saturating_neg();
    }
    if let Some(p) = &payment.purchase
        && before.purchase.as_ref() != Some(p)
    {
        tx.put_purchase(p, now).await?;
    }
    for c in &payment.charges {
        if !before.charges.contains(c) {
            tx.put_charge(c).await?;
        }
    }
    for d in &payment.disputes {
        if !before.disputes.contains(d) {
            tx.put_dispute(d).await?;
        }
    }
    Ok(moved)
}

/// Stores a subscription state if it is at least as new as the stored one, then puts the
/// account on the plan of its newest live subscription.
async fn apply_subscription(
    tx: &mut dyn Tx,
    incoming: Option<crate::domain::payment::Subscription>,
    failed: Option<(&str, i64)>,
    policy: &Policy,
    now: DateTime<Utc>,
) -> StorageResult<()> {
    use crate::domain::payment::Subscription;
    let account = match (incoming, failed) {
        (Some(incoming), _) => {
            let mut stored = tx.subscription(&incoming.subscription_id).await?;
            let account = stored
                .as_ref()
                .map_or_else(|| incoming.account_id.clone(), |s| s.account_id.clone());
            let incoming = Subscription {
                account_id: account.clone(),
                ..incoming
            };
            if !Subscription::accept(&mut stored, incoming) {
                return Ok(());
            }
            if let Some(s) = &stored {
                tx.put_subscription(s).await?;
            }
            account
        }
        (None, Some((id, as_of))) => {
            let Some(mut s) = tx.subscription(id).await? else {
                return Ok(());
            };
            if !s.payment_failed(as_of) {
                return Ok(());
            }
            tx.put_subscription(&s).await?;
            s.account_id
        }
        (None, None) => return Ok(()),
    };
    let subs = tx.subscriptions_of(&account).await?;
    let plan = Subscription::plan_of(&subs, crate::domain::DEFAULT_PLAN);
    let (mut book, _) = tx
        .lock_book(&account, None, now)
        .await?
        .ok_or(LedgerError::AccountNotFound)?;
    if book.plan != plan {
        // As SetPlan's `Target::PlanSwitch`: the current periods' grants too, so the switch
        // gives at most one allowance per period key.
        tx.load(&mut book, None, now).await?;
        tx.load_periods(&mut book, &crate::domain::plan::period_keys_at(now))
            .await?;
        book.settle(now, policy.for_plan(&book.plan), &mut RandomIds)?;
        book.switch_plan(&plan, policy.for_plan(&plan), now, &mut RandomIds)?;
        tx.write(&book, now).await?;
    }
    Ok(())
}

/// Records a Stripe event and applies its effect (see [`Store::record_stripe_event`]).
pub(crate) async fn record_stripe_event(
    mut tx: Box<dyn Tx>,
    event: &StripeEvent,
    effect: &StripeEffect,
    policy: &Policy,
) -> StorageResult<StripeRecord> {
    let now = tx.now().await?;
    tx.lock_stripe().await?;
    if !tx.insert_stripe_event(event, now).await? {
        return Ok(StripeRecord::DuplicateEvent);
    }
    let mut moved = Moved::default();
    match effect {
        StripeEffect::None => {}
        StripeEffect::Payment {
            business_key,
            fact,
            grant,
            reason,
        } => {
            moved = apply_payment_fact(
                tx.as_mut(),
                business_key.as_deref(),
                fact,
                grant.as_ref(),
                reason,
                policy,
                now,
            )
            .await?;
        }
        StripeEffect::Link {
            account_id,
            customer,
        } => {
            tx.lock_book(account_id.as_str(), Some(crate::domain::DEFAULT_PLAN), now)
                .await?;
            tx.link(account_id.as_str(), customer, now).await?;
        }
        StripeEffect::Subscription(state) => {
            if let Some(account) = account_for(
                tx.as_mut(),
                &state.customer,
                state.account_hint.as_deref(),
                now,
            )
            .await?
            {
                let incoming = crate::domain::payment::Subscription {
                    subscription_id: state.subscription.clone(),
                    account_id: account,
                    customer: state.customer.clone(),
                    status: state.status.clone(),
                    plan: state.plan.clone(),
                    period_end: state.period_end,
                    cancel_at_period_end: state.cancel_at_period_end,
                    as_of: state.as_of,
                    started: state.started,
                };
                apply_subscription(tx.as_mut(), Some(incoming), None, policy, now).await?;
            }
        }
        StripeEffect::PaymentFailed {
            subscription,
            as_of,
        } => {
            apply_subscription(tx.as_mut(), None, Some((subscription, *as_of)), policy, now)
                .await?;
        }
        StripeEffect::InvoiceGrant {
            business_key,
            customer,
            account_hint,
            amount,
            expires_at,
            reason,
        } => {
            let hint = account_hint.as_ref().map(AccountId::as_str);
            if tx.fact_state(business_key).await?.as_deref() != Some("granted")
                && let Some(account) = account_for(tx.as_mut(), customer, hint, now).await?
            {
                let grant = FactGrant {
                    business_key,
                    amount: amount.get(),
                    source: crate::domain::book::Source::Subscription,
                    expires_at: *expires_at,
                };
                let id =
                    book_fact(tx.as_mut(), &account, Some(grant), 0, reason, policy, now).await?;
                tx.put_fact(
                    business_key,
                    Some(&account),
                    "granted",
                    amount.get(),
                    id.as_deref(),
                    now,
                )
                .await?;
                moved.granted = amount.get();
            }
        }
    }
    tx.commit().await?;
    Ok(StripeRecord::Recorded(moved))
}

/// What a book operation acts on.
pub(crate) enum Target<'a> {
    /// An account, created (on the default plan) if `create`.
    Account { id: &'a str, create: bool },
    /// The account of a hold, with that hold loaded.
    Hold(&'a str),
    /// An account about to switch plans: the grants of the allowance periods current now are
    /// loaded too ([`crate::domain::plan::period_keys_at`]), so the switch gives at most one
    /// allowance per period key.
    PlanSwitch(&'a str),
}

/// One idempotent operation on one account's book, in one transaction.
pub(crate) async fn book_op<T>(
    mut tx: Box<dyn Tx + '_>,
    idem: &Idempotency,
    target: Target<'_>,
    policy: &Policy,
    op: impl FnOnce(&mut Book, DateTime<Utc>, &mut dyn Ids) -> Result<T, LedgerError> + Send,
) -> StorageResult<Applied<T>>
where
    T: Clone + Into<Outcome> + TryFrom<Outcome> + Send,
{
    let applied = book_steps(tx.as_mut(), idem, target, policy, op).await?;
    if !applied.replayed {
        tx.commit().await?;
    }
    Ok(applied)
}

/// The steps of [`book_op`] inside a transaction the caller ends.
async fn book_steps<T>(
    tx: &mut dyn Tx,
    idem: &Idempotency,
    target: Target<'_>,
    policy: &Policy,
    op: impl FnOnce(&mut Book, DateTime<Utc>, &mut dyn Ids) -> Result<T, LedgerError> + Send,
) -> StorageResult<Applied<T>>
where
    T: Clone + Into<Outcome> + TryFrom<Outcome> + Send,
{
    let now = tx.now().await?;
    if let Claim::Existing {
        fingerprint,
        response,
    } = tx.claim(idem, now).await?
    {
        return replay(idem, &fingerprint, response.as_deref());
    }
    let (account, hold, create) = match target {
        Target::Account { id, create } => (id.to_owned(), None, create),
        Target::PlanSwitch(id) => (id.to_owned(), None, false),
        Target::Hold(h) => (
            tx.hold_account(h).await?.ok_or(LedgerError::HoldNotFound)?,
            Some(h),
            false,
        ),
    };
    let plan = create.then_some(crate::domain::DEFAULT_PLAN);
    let (mut book, _) = tx
        .lock_book(&account, plan, now)
        .await?
        .ok_or(LedgerError::AccountNotFound)?;
    tx.load(&mut book, hold, now).await?;
    if matches!(target, Target::PlanSwitch(_)) {
        tx.load_periods(&mut book, &crate::domain::plan::period_keys_at(now))
            .await?;
    }
    book.settle(now, policy.for_plan(&book.plan), &mut RandomIds)?;
    let out = op(&mut book, now, &mut RandomIds)?;
    tx.write(&book, now).await?;
    tx.store_outcome(idem, &out.clone().into()).await?;
    Ok(Applied::fresh(out))
}

/// Job-path commands in one transaction, one savepoint each: a command the rules reject is
/// rolled back to its savepoint (nothing of it stays, not even its key's claim) while the others
/// commit together. Answers in job order; an error means nothing was committed.
pub(crate) async fn run_group(
    mut tx: Box<dyn Tx>,
    jobs: &[batch::Job],
    policy: &Policy,
) -> StorageResult<Vec<StorageResult<Applied<Outcome>>>> {
    let mut answers = Vec::with_capacity(jobs.len());
    for job in jobs {
        tx.savepoint().await?;
        let cmd = &job.cmd;
        match book_steps(tx.as_mut(), &job.idem, cmd.target(), policy, |b, now, _| {
            cmd.apply(b, now)
        })
        .await
        {
            Ok(applied) => {
                tx.release_savepoint().await?;
                answers.push(Ok(applied));
            }
            Err(StorageError::Rejected(e)) => {
                tx.rollback_to_savepoint().await?;
                answers.push(Err(StorageError::Rejected(e)));
            }
            Err(e) => return Err(e),
        }
    }
    tx.commit().await?;
    Ok(answers)
}

/// A job-path command: what generation services send around every job, and what the
/// PostgreSQL backend coalesces into group transactions (see [`batch`]).
#[derive(Clone, Debug)]
pub(crate) enum Cmd {
    /// Reserve credits (a new hold).
    Reserve(Reserve),
    /// Settle a hold.
    Commit(CommitHold),
    /// Release or refund a hold.
    Refund(Refund),
    /// Move a hold's expiry.
    Extend(ExtendHold),
}

impl Cmd {
    /// The book the command acts on.
    pub(crate) fn target(&self) -> Target<'_> {
        match self {
            Self::Reserve(c) => Target::Account {
                id: c.account_id.as_str(),
                create: false,
            },
            Self::Commit(c) => Target::Hold(c.hold_id.as_str()),
            Self::Refund(c) => Target::Hold(c.hold_id.as_str()),
            Self::Extend(c) => Target::Hold(c.hold_id.as_str()),
        }
    }

    /// Applies the command to a loaded, settled book (pure: the domain's rules decide).
    pub(crate) fn apply(&self, b: &mut Book, now: DateTime<Utc>) -> Result<Outcome, LedgerError> {
        Ok(match self {
            Self::Reserve(c) => b
                .reserve(c.hold_id.as_str(), c.amount, c.ttl, &c.metadata, now)?
                .into(),
            Self::Commit(c) => b.commit_hold(c.hold_id.as_str(), c.amount, now)?.into(),
            Self::Refund(c) => b
                .refund(c.hold_id.as_str(), c.amount, &c.reason, now)?
                .into(),
            Self::Extend(c) => b.extend_hold(c.hold_id.as_str(), c.ttl, now)?.into(),
        })
    }
}

/// A job-path command through the backend's group commit, or (turned off) in a transaction of
/// its own; `begin` is only awaited then.
pub(crate) async fn hold_cmd(
    batcher: Option<&batch::Batcher>,
    begin: impl std::future::Future<Output = StorageResult<Box<dyn Tx>>> + Send,
    idem: &Idempotency,
    cmd: Cmd,
    policy: &Policy,
) -> StorageResult<Applied<Outcome>> {
    match batcher {
        Some(b) => b.submit(idem, cmd).await,
        None => cmd_op(begin.await?, idem, &cmd, policy).await,
    }
}

/// One command in a transaction of its own.
pub(crate) async fn cmd_op(
    tx: Box<dyn Tx + '_>,
    idem: &Idempotency,
    cmd: &Cmd,
    policy: &Policy,
) -> StorageResult<Applied<Outcome>> {
    book_op(tx, idem, cmd.target(), policy, |b, now, _| {
        cmd.apply(b, now)
    })
    .await
}

/// An outcome as the operation's own type; another operation's outcome means the key was
/// used for a different request.
pub(crate) fn narrow<T: TryFrom<Outcome>>(a: Applied<Outcome>) -> StorageResult<Applied<T>> {
    let replayed = a.replayed;
    T::try_from(a.outcome)
        .map(|outcome| Applied { outcome, replayed })
        .map_err(|_| LedgerError::IdempotencyKeyReused.into())
}

/// Moves an account to another plan, once per idempotency key.
pub(crate) async fn set_plan(
    tx: Box<dyn Tx + '_>,
    idem: &Idempotency,
    cmd: &SetPlan,
    policy: &Policy,
) -> StorageResult<Applied<PlanOutcome>> {
    let target = Target::PlanSwitch(cmd.account_id.as_str());
    book_op(tx, idem, target, policy, |b, now, ids| {
        let previous_plan = b.switch_plan(&cmd.plan, policy.for_plan(&cmd.plan), now, ids)?;
        Ok(PlanOutcome {
            account_id: b.account_id.clone(),
            previous_plan,
            plan: cmd.plan.clone(),
        })
    })
    .await
}

/// Creates an account with its sign-up bonus, once.
pub(crate) async fn open_account(
    mut tx: Box<dyn Tx>,
    idem: &Idempotency,
    cmd: &OpenAccount,
    policy: &Policy,
) -> StorageResult<Applied<OpenOutcome>> {
    let now = tx.now().await?;
    if let Claim::Existing {
        fingerprint,
        response,
    } = tx.claim(idem, now).await?
    {
        return replay(idem, &fingerprint, response.as_deref());
    }
    let (mut book, created) = tx
        .lock_book(cmd.account_id.as_str(), Some(&cmd.plan), now)
        .await?
        .ok_or(LedgerError::AccountNotFound)?;
    if !created {
        return Err(LedgerError::AccountExists.into());
    }
    let mut bonus = 0;
    if let Some((amount, ttl)) = cmd.bonus {
        let id = RandomIds.bucket_id();
        let expires_at = ttl.and_then(|t| now.checked_add_signed(t));
        book.grant(
            &id,
            crate::domain::book::Source::SignupBonus,
            amount,
            expires_at,
            crate::domain::book::PRIORITY_DEFAULT,
            "sign-up bonus",
            now,
        )?;
        bonus = amount.get();
    }
    book.settle(now, policy.for_plan(&book.plan), &mut RandomIds)?;
    let out = OpenOutcome {
        account_id: book.account_id.clone(),
        plan: book.plan.clone(),
        bonus,
        available: book.net_available(),
    };
    tx.write(&book, now).await?;
    tx.store_outcome(idem, &out.clone().into()).await?;
    tx.commit().await?;
    Ok(Applied::fresh(out))
}

/// Moves credits between two accounts: both rows locked in id order, so concurrent transfers
/// cannot deadlock; the credits keep their source and expiry.
pub(crate) async fn transfer(
    mut tx: Box<dyn Tx>,
    idem: &Idempotency,
    cmd: &Transfer,
    policy: &Policy,
) -> StorageResult<Applied<TransferOutcome>> {
    let now = tx.now().await?;
    if let Claim::Existing {
        fingerprint,
        response,
    } = tx.claim(idem, now).await?
    {
        return replay(idem, &fingerprint, response.as_deref());
    }
    let (from_id, to_id) = (cmd.from.as_str(), cmd.to.as_str());
    let mut books = Vec::with_capacity(2);
    let mut order = [(from_id, false), (to_id, true)];
    order.sort_by_key(|(id, _)| *id);
    for (id, create) in order {
        let plan = create.then_some(crate::domain::DEFAULT_PLAN);
        let (mut book, _) = tx
            .lock_book(id, plan, now)
            .await?
            .ok_or(LedgerError::AccountNotFound)?;
        tx.load(&mut book, None, now).await?;
        book.settle(now, policy.for_plan(&book.plan), &mut RandomIds)?;
        books.push(book);
    }
    let (mut from, mut to) = match (books.pop(), books.pop()) {
        (Some(b), Some(a)) if a.account_id == from_id => (a, b),
        (Some(b), Some(a)) => (b, a),
        _ => return Err(StorageError::Other("transfer lost a book".into())),
    };
    let pieces = from.take(cmd.amount.get(), EntryKind::TransferOut, &cmd.reason, now)?;
    to.give(
        &pieces,
        EntryKind::TransferIn,
        &cmd.reason,
        now,
        &mut RandomIds,
    )?;
    let out = TransferOutcome {
        from: (from.account_id.clone(), from.net_available()),
        to: (to.account_id.clone(), to.net_available()),
        amount: cmd.amount.get(),
    };
    tx.write(&from, now).await?;
    tx.write(&to, now).await?;
    tx.store_outcome(idem, &out.clone().into()).await?;
    tx.commit().await?;
    Ok(Applied::fresh(out))
}

/// Applies time to one account (overdue holds and grants, a new allowance period) without an
/// idempotency key: what reads and the sweeper do. Returns the expiry entries written.
pub(crate) async fn settle(
    mut tx: Box<dyn Tx>,
    account_id: &str,
    policy: &Policy,
) -> StorageResult<u64> {
    let now = tx.now().await?;
    let Some((mut book, _)) = tx.lock_book(account_id, None, now).await? else {
        return Ok(0);
    };
    tx.load(&mut book, None, now).await?;
    book.settle(now, policy.for_plan(&book.plan), &mut RandomIds)?;
    let expiries = book
        .entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Expire | EntryKind::Expiration))
        .count();
    tx.write(&book, now).await?;
    tx.commit().await?;
    Ok(u64::try_from(expiries).unwrap_or(u64::MAX))
}

/// Ids of the holds a book has loaded, for loading their draws.
pub(crate) fn loaded_hold_ids(book: &Book) -> Vec<String> {
    book.holds.keys().cloned().collect()
}

/// Grant ids named by loaded draws but not loaded yet.
pub(crate) fn missing_buckets(book: &Book) -> Vec<String> {
    let mut v: Vec<String> = book
        .draws
        .values()
        .map(|d| d.bucket_id.clone())
        .filter(|b| !book.buckets.contains_key(b))
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
