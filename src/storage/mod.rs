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
use chrono::TimeDelta;

use crate::domain::command::{
    CommitHold, ExtendHold, Grant, Idempotency, Refund, Reserve, SetPlan,
};
use crate::domain::outcome::Outcome;
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

pub mod postgres;
pub mod sqlite;

/// What a backend can report.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The ledger refused the command; nothing was written.
    #[error(transparent)]
    Rejected(#[from] LedgerError),
    /// A serialization failure, deadlock or busy database: retrying the whole call is safe.
    #[error("the database reported contention")]
    Contended,
    /// The database cannot be reached (connect failure, pool timeout, shutting down).
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
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
    /// Available credits (stored column: holds past expiry count once swept).
    pub available: i64,
    /// Held credits (stored column).
    pub held: i64,
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
    /// The balance as callers see it now (overdue open holds count as released).
    async fn balance(&self, account_id: &AccountId) -> StorageResult<Balance>;
    /// Creates a hold after expiring the account's overdue holds.
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
    /// Adds credits, creating the account.
    async fn grant(&self, idem: &Idempotency, cmd: &Grant) -> StorageResult<Applied<GrantOutcome>>;
    /// One hold, as observed now.
    async fn hold(&self, hold_id: &HoldId) -> StorageResult<Hold>;
    /// A page of an account's holds, as observed now.
    async fn list_holds(&self, query: &HoldQuery) -> StorageResult<Vec<Hold>>;
    /// Expires up to `limit` overdue open holds; safe to run on many replicas at once.
    async fn expire_due(&self, limit: u32) -> StorageResult<u64>;
    /// Moves an account to another plan.
    async fn set_plan(
        &self,
        idem: &Idempotency,
        cmd: &SetPlan,
    ) -> StorageResult<Applied<PlanOutcome>>;
    /// An account's balance, plan and creation time, as observed now.
    async fn account(&self, account_id: &AccountId) -> StorageResult<AccountSummary>;
    /// A page of accounts by id.
    async fn list_accounts(&self, query: &AccountQuery) -> StorageResult<Vec<AccountRow>>;
    /// A page of ledger entries.
    async fn list_entries(&self, query: &EntryQuery) -> StorageResult<Vec<EntryRecord>>;
    /// Deletes up to `limit` idempotency records older than `retention`.
    async fn purge_idempotency(&self, retention: TimeDelta, limit: u32) -> StorageResult<u64>;
    /// Checks every account: entries sum to the balance columns, held equals open holds.
    async fn audit(&self) -> StorageResult<Vec<Violation>>;
    /// Round trip to the database (readiness).
    async fn ping(&self) -> StorageResult<()>;
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
    if fingerprint != idem.fingerprint {
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

/// A decided change to one hold and its account, ready for a backend to write.
///
/// Built from the domain rules by [`HoldChange::commit`], [`HoldChange::refund`] and
/// [`HoldChange::extend`], so both backends write exactly what the rules decided.
pub(crate) struct HoldChange {
    /// Added to the account's available (negative when a commit draws extra).
    pub available_delta: i64,
    /// Added to the account's held.
    pub held_delta: i64,
    /// The hold as it will be stored.
    pub hold: Hold,
    /// The ledger entry to append, if credits move.
    pub entry: Option<crate::domain::rules::EntryKind>,
    /// Reason stored on the entry.
    pub reason: String,
    /// The outcome to return and store; its `available` is filled in by [`HoldChange::finish`].
    pub outcome: Outcome,
}

impl HoldChange {
    /// A commit of `cmd.amount`.
    pub fn commit(
        mut hold: Hold,
        cmd: &CommitHold,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Self, LedgerError> {
        use crate::domain::rules::{EntryKind, plan_commit};
        let plan = plan_commit(&hold, cmd.amount, now)?;
        hold.state = HoldState::Committed;
        hold.committed_amount = plan.committed;
        hold.resolved_at = Some(now);
        Ok(Self {
            available_delta: plan.available_delta(),
            held_delta: plan.held.saturating_neg(),
            entry: Some(EntryKind::Commit),
            reason: String::new(),
            outcome: Outcome::Commit(CommitOutcome {
                hold: hold.clone(),
                released: plan.released,
                extra_drawn: plan.extra_drawn,
                available: 0,
            }),
            hold,
        })
    }

    /// A refund: a release of an open hold, or a return of committed credits.
    pub fn refund(
        mut hold: Hold,
        cmd: &Refund,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Self, LedgerError> {
        use crate::domain::rules::{EntryKind, RefundPlan, plan_refund};
        let plan = plan_refund(&hold, cmd.amount, now)?;
        let (held_delta, entry) = match plan {
            RefundPlan::Release { amount } => {
                hold.state = HoldState::Released;
                hold.resolved_at = Some(now);
                (amount.saturating_neg(), EntryKind::Release)
            }
            RefundPlan::Return { amount } => {
                hold.refunded_amount = hold.refunded_amount.saturating_add(amount);
                (0, EntryKind::Refund)
            }
        };
        Ok(Self {
            available_delta: plan.amount(),
            held_delta,
            entry: Some(entry),
            reason: cmd.reason.clone(),
            outcome: Outcome::Refund(RefundOutcome {
                hold: hold.clone(),
                refunded: plan.amount(),
                available: 0,
            }),
            hold,
        })
    }

    /// An extension to `now + ttl`.
    pub fn extend(
        mut hold: Hold,
        cmd: &ExtendHold,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Self, LedgerError> {
        crate::domain::rules::check_extend(&hold, now)?;
        hold.expires_at = now.checked_add_signed(cmd.ttl).unwrap_or(now);
        Ok(Self {
            available_delta: 0,
            held_delta: 0,
            entry: None,
            reason: String::new(),
            outcome: Outcome::Extend(ExtendOutcome { hold: hold.clone() }),
            hold,
        })
    }

    /// The outcome with the account's available credits after the change.
    pub fn finish(&self, available: i64) -> Outcome {
        with_available(self.outcome.clone(), available)
    }
}

/// Sets the `available` of an outcome (the one figure only the database knows).
pub(crate) fn with_available(mut outcome: Outcome, available: i64) -> Outcome {
    match &mut outcome {
        Outcome::Reserve(o) => o.available = available,
        Outcome::Commit(o) => o.available = available,
        Outcome::Refund(o) => o.available = available,
        Outcome::Grant(o) => o.available = available,
        Outcome::Extend(_) | Outcome::Plan(_) => {}
    }
    outcome
}

/// Converts a generic applied outcome into the operation's own type.
pub(crate) fn narrow<T: TryFrom<Outcome>>(applied: Applied<Outcome>) -> StorageResult<Applied<T>> {
    let Applied { outcome, replayed } = applied;
    T::try_from(outcome)
        .map(|outcome| Applied { outcome, replayed })
        .map_err(|_| LedgerError::IdempotencyKeyReused.into())
}

/// Finds accounts whose balance columns disagree with their entries or open holds.
/// Portable SQL (both dialects).
pub(crate) const AUDIT_SQL: &str = "
SELECT a.account_id, a.available, a.held,
       CAST(COALESCE(e.av, 0) AS BIGINT) AS entries_available,
       CAST(COALESCE(e.he, 0) AS BIGINT) AS entries_held,
       CAST(COALESCE(h.open_amount, 0) AS BIGINT) AS open_held
FROM account a
LEFT JOIN (SELECT account_id, SUM(available_delta) AS av, SUM(held_delta) AS he
           FROM entry GROUP BY account_id) e ON e.account_id = a.account_id
LEFT JOIN (SELECT account_id, SUM(amount) AS open_amount
           FROM hold WHERE state = 'open' GROUP BY account_id) h ON h.account_id = a.account_id
WHERE a.available <> COALESCE(e.av, 0) OR a.held <> COALESCE(e.he, 0)
   OR a.held <> COALESCE(h.open_amount, 0)
ORDER BY a.account_id";

/// A row of [`AUDIT_SQL`]: account, columns (available, held), entry sums (available, held),
/// and the sum of open holds.
pub(crate) type AuditRow = (String, i64, i64, i64, i64, i64);

/// Turns a row of [`AUDIT_SQL`] into a violation.
pub(crate) fn violation(row: AuditRow) -> Violation {
    let (account_id, available, held, entries_available, entries_held, open_held) = row;
    Violation {
        account_id,
        detail: format!(
            "columns available={available} held={held}; entries available={entries_available} \
             held={entries_held}; open holds={open_held}"
        ),
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
