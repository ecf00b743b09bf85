//! SQLite backend: the embedded default, one file, no setup.
//!
//! WAL mode, `synchronous = FULL` (an acknowledged write survives power loss), foreign keys on.
//! Every write transaction starts with `BEGIN IMMEDIATE`, taking the single write lock up front:
//! writers queue (up to the busy timeout) instead of failing on a lock upgrade, and inside a
//! write transaction nothing else can change, so reads followed by writes are safe. SQLite runs
//! inside this process, so its clock is the process clock; times are stored as integer
//! microseconds since the Unix epoch.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqliteConnection, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::{
    AUDIT_SQL, AccountQuery, AccountRow, Applied, AuditRow, Claim, EntryCursor, EntryQuery,
    HoldChange, HoldQuery, StorageError, StorageResult, Store, Violation, constraint_rejection,
    entry_kind, kind_names, narrow, replay, state_names, thresholds_json, to_record, violation,
    with_available,
};
use crate::domain::command::{
    CommitHold, ExtendHold, Grant, Idempotency, Refund, Reserve, SetPlan,
};
use crate::domain::outcome::Outcome;
use crate::domain::{
    AccountId, AccountSummary, Balance, CommitOutcome, EntryRecord, ExtendOutcome, GrantOutcome,
    Hold, HoldId, HoldState, LedgerError, Metadata, PlanOutcome, RefundOutcome, ReserveOutcome,
    rules,
};

/// How long a writer waits for the write lock before the call reports contention.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite store.
///
/// Writers in this process queue on `write_lock` (FIFO) before `BEGIN IMMEDIATE`: SQLite's own
/// busy handler polls with sleeps of up to 100 ms, which turns a queue of writers into seconds
/// of latency. The busy timeout still covers other processes opening the same file.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    write_lock: Arc<Mutex<()>>,
}

#[allow(clippy::needless_pass_by_value)] // used as `.map_err(map_err)`
fn map_err(e: sqlx::Error) -> StorageError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            let message = db.message();
            match &*code {
                // SQLITE_BUSY and SQLITE_LOCKED (extended codes keep the primary code in the low byte)
                c if c.parse::<i32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6)) => {
                    StorageError::Contended
                }
                _ => message
                    .strip_prefix("CHECK constraint failed: ")
                    .and_then(constraint_rejection)
                    .map_or_else(
                        || StorageError::Other(format!("{message} ({code})")),
                        StorageError::Rejected,
                    ),
            }
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StorageError::Unavailable(e.to_string())
        }
        _ => StorageError::Other(e.to_string()),
    }
}

fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

fn to_time(micros: i64) -> StorageResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StorageError::Other(format!("bad time {micros}")))
}

fn hold_from_row(row: &SqliteRow) -> StorageResult<Hold> {
    let state: String = row.try_get("state").map_err(map_err)?;
    let metadata: String = row.try_get("metadata").map_err(map_err)?;
    let resolved: Option<i64> = row.try_get("resolved_at").map_err(map_err)?;
    Ok(Hold {
        hold_id: row.try_get("hold_id").map_err(map_err)?,
        account_id: row.try_get("account_id").map_err(map_err)?,
        amount: row.try_get("amount").map_err(map_err)?,
        state: HoldState::parse(&state)
            .ok_or_else(|| StorageError::Other(format!("unknown hold state {state:?}")))?,
        committed_amount: row.try_get("committed_amount").map_err(map_err)?,
        refunded_amount: row.try_get("refunded_amount").map_err(map_err)?,
        created_at: to_time(row.try_get("created_at").map_err(map_err)?)?,
        expires_at: to_time(row.try_get("expires_at").map_err(map_err)?)?,
        resolved_at: resolved.map(to_time).transpose()?,
        metadata: serde_json::from_str::<Metadata>(&metadata).map_err(StorageError::other)?,
    })
}

/// This process's write lock, held for the whole write transaction.
type WriteLock = OwnedMutexGuard<()>;

enum Started {
    New(WriteLock, Transaction<'static, Sqlite>, DateTime<Utc>),
    Replay(Vec<u8>, Option<String>),
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path` or `sqlite::memory:`).
    ///
    /// # Errors
    /// `Unavailable` or `Other` when the file cannot be opened.
    pub async fn connect(url: &str, max_connections: u32) -> StorageResult<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StorageError::Other(format!("bad SQLite URL: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(map_err)?;
        Ok(Self {
            pool,
            write_lock: Arc::new(Mutex::new(())),
        })
    }

    async fn begin_write(&self) -> StorageResult<(WriteLock, Transaction<'static, Sqlite>)> {
        let lock = Arc::clone(&self.write_lock).lock_owned().await;
        let tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err)?;
        Ok((lock, tx))
    }

    /// Applies `migrations/sqlite`.
    ///
    /// # Errors
    /// `Other` when a migration fails.
    pub async fn migrate(&self) -> StorageResult<()> {
        sqlx::migrate!("migrations/sqlite")
            .run(&self.pool)
            .await
            .map_err(StorageError::other)
    }

    /// The pool (for tests and tooling).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn begin_claimed(&self, idem: &Idempotency) -> StorageResult<Started> {
        let (lock, mut tx) = self.begin_write().await?;
        let now = to_time(now_micros())?;
        match claim(&mut tx, idem, now).await? {
            Claim::New(now) => Ok(Started::New(lock, tx, now)),
            Claim::Existing {
                fingerprint,
                response,
            } => Ok(Started::Replay(fingerprint, response)),
        }
    }

    async fn hold_op(
        &self,
        idem: &Idempotency,
        hold_id: &HoldId,
        decide: impl FnOnce(Hold, DateTime<Utc>) -> Result<HoldChange, LedgerError> + Send,
    ) -> StorageResult<Applied<Outcome>> {
        let (_lock, mut tx, now) = match self.begin_claimed(idem).await? {
            Started::New(lock, tx, now) => (lock, tx, now),
            Started::Replay(fp, response) => return replay(idem, &fp, response.as_deref()),
        };
        let sql = concat!("SELECT ", hold_columns!(), " FROM hold WHERE hold_id = ?1");
        let row = sqlx::query(sql)
            .bind(hold_id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        let hold = hold_from_row(&row.ok_or(LedgerError::HoldNotFound)?)?;
        let account_id = hold.account_id.clone();
        let change = decide(hold, now)?;
        let Some(available) = update_balance(
            &mut tx,
            &account_id,
            change.available_delta,
            change.held_delta,
            now,
        )
        .await?
        else {
            return Err(insufficient(
                &mut tx,
                &account_id,
                change.available_delta.saturating_neg(),
            )
            .await);
        };
        let h = &change.hold;
        sqlx::query(
            "UPDATE hold SET state = ?2, committed_amount = ?3, refunded_amount = ?4, expires_at = ?5,
                    resolved_at = ?6 WHERE hold_id = ?1",
        )
        .bind(&h.hold_id)
        .bind(h.state.as_str())
        .bind(h.committed_amount)
        .bind(h.refunded_amount)
        .bind(h.expires_at.timestamp_micros())
        .bind(h.resolved_at.map(|t| t.timestamp_micros()))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if let Some(kind) = change.entry {
            insert_entry(
                &mut tx,
                &account_id,
                Some(&h.hold_id),
                kind,
                (change.available_delta, change.held_delta),
                &change.reason,
                now,
            )
            .await?;
        }
        let outcome = change.finish(available);
        store_outcome(&mut tx, idem, &outcome).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Applied::fresh(outcome))
    }
}

async fn claim(
    tx: &mut SqliteConnection,
    idem: &Idempotency,
    now: DateTime<Utc>,
) -> StorageResult<Claim<DateTime<Utc>>> {
    let row = sqlx::query(
        "INSERT INTO idempotency_record (caller, idempotency_key, fingerprint, created_at)
         VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING RETURNING created_at",
    )
    .bind(idem.caller.as_str())
    .bind(idem.key.as_str())
    .bind(&idem.fingerprint[..])
    .bind(now.timestamp_micros())
    .fetch_optional(&mut *tx)
    .await
    .map_err(map_err)?;
    if row.is_some() {
        return Ok(Claim::New(now));
    }
    let row = sqlx::query(
        "SELECT fingerprint, response FROM idempotency_record WHERE caller = ?1 AND idempotency_key = ?2",
    )
    .bind(idem.caller.as_str())
    .bind(idem.key.as_str())
    .fetch_one(&mut *tx)
    .await
    .map_err(map_err)?;
    Ok(Claim::Existing {
        fingerprint: row.try_get("fingerprint").map_err(map_err)?,
        response: row.try_get("response").map_err(map_err)?,
    })
}

async fn store_outcome(
    tx: &mut SqliteConnection,
    idem: &Idempotency,
    outcome: &Outcome,
) -> StorageResult<()> {
    sqlx::query(
        "UPDATE idempotency_record SET response = ?3 WHERE caller = ?1 AND idempotency_key = ?2",
    )
    .bind(idem.caller.as_str())
    .bind(idem.key.as_str())
    .bind(to_record(outcome.clone())?)
    .execute(&mut *tx)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// Guarded balance update; `None` when the account is missing or available would go negative.
async fn update_balance(
    tx: &mut SqliteConnection,
    account_id: &str,
    available_delta: i64,
    held_delta: i64,
    now: DateTime<Utc>,
) -> StorageResult<Option<i64>> {
    let row = sqlx::query(
        "UPDATE account SET available = available + ?2, held = held + ?3, updated_at = ?4
         WHERE account_id = ?1 AND available + ?2 >= 0 RETURNING available",
    )
    .bind(account_id)
    .bind(available_delta)
    .bind(held_delta)
    .bind(now.timestamp_micros())
    .fetch_optional(&mut *tx)
    .await
    .map_err(map_err)?;
    row.map(|r| r.try_get("available").map_err(map_err))
        .transpose()
}

async fn insert_entry(
    tx: &mut SqliteConnection,
    account_id: &str,
    hold_id: Option<&str>,
    kind: rules::EntryKind,
    (available_delta, held_delta): (i64, i64),
    reason: &str,
    now: DateTime<Utc>,
) -> StorageResult<i64> {
    let row = sqlx::query(
        "INSERT INTO entry (account_id, hold_id, kind, available_delta, held_delta, reason, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING entry_id",
    )
    .bind(account_id)
    .bind(hold_id)
    .bind(kind.as_str())
    .bind(available_delta)
    .bind(held_delta)
    .bind(reason)
    .bind(now.timestamp_micros())
    .fetch_one(&mut *tx)
    .await
    .map_err(map_err)?;
    row.try_get("entry_id").map_err(map_err)
}

async fn insufficient(tx: &mut SqliteConnection, account_id: &str, needed: i64) -> StorageError {
    let row = sqlx::query("SELECT available FROM account WHERE account_id = ?1")
        .bind(account_id)
        .fetch_optional(&mut *tx)
        .await;
    match row {
        Ok(None) => LedgerError::AccountNotFound.into(),
        Ok(Some(row)) => match row.try_get::<i64, _>("available") {
            Ok(available) => LedgerError::InsufficientCredits {
                available,
                requested: needed,
            }
            .into(),
            Err(e) => map_err(e),
        },
        Err(e) => map_err(e),
    }
}

/// Expires up to `limit` overdue open holds of one account inside `tx`. Returns how many.
async fn expire_account(
    tx: &mut SqliteConnection,
    account_id: &str,
    now: DateTime<Utc>,
    limit: i64,
) -> StorageResult<u64> {
    let rows = sqlx::query(
        "UPDATE hold SET state = 'expired', resolved_at = expires_at
         WHERE hold_id IN (SELECT hold_id FROM hold WHERE account_id = ?1 AND state = 'open'
                           AND expires_at <= ?2 ORDER BY expires_at LIMIT ?3)
         RETURNING hold_id, amount",
    )
    .bind(account_id)
    .bind(now.timestamp_micros())
    .bind(limit)
    .fetch_all(&mut *tx)
    .await
    .map_err(map_err)?;
    let mut freed = 0i64;
    for row in &rows {
        let hold_id: String = row.try_get("hold_id").map_err(map_err)?;
        let amount: i64 = row.try_get("amount").map_err(map_err)?;
        freed = freed.saturating_add(amount);
        insert_entry(
            tx,
            account_id,
            Some(&hold_id),
            rules::EntryKind::Expire,
            (amount, amount.saturating_neg()),
            "",
            now,
        )
        .await?;
    }
    if freed > 0 {
        update_balance(tx, account_id, freed, freed.saturating_neg(), now)
            .await?
            .ok_or_else(|| StorageError::Other("expiry found no account row".into()))?;
    }
    Ok(u64::try_from(rows.len()).unwrap_or(u64::MAX))
}

type SqliteEntryRow = (i64, String, Option<String>, String, i64, i64, String, i64);

macro_rules! entries_sql {
    ($order:literal) => {
        concat!(
            "SELECT entry_id, account_id, hold_id, kind, available_delta, held_delta, reason, created_at
             FROM entry
             WHERE (?1 IS NULL OR account_id = ?1)
               AND (json_array_length(?2) = 0 OR kind IN (SELECT value FROM json_each(?2)))
               AND (?3 IS NULL OR created_at >= ?3)
               AND (?4 IS NULL OR created_at < ?4)
               AND (?5 IS NULL OR entry_id < ?5)
               AND (?6 IS NULL OR entry_id > ?6)
             ORDER BY entry_id ",
            $order,
            " LIMIT ?7"
        )
    };
}
const ENTRIES_NEWEST_FIRST: &str = entries_sql!("DESC");
const ENTRIES_OLDEST_FIRST: &str = entries_sql!("ASC");

#[async_trait]
impl Store for SqliteStore {
    async fn balance(&self, account_id: &AccountId) -> StorageResult<Balance> {
        let now = now_micros();
        let row = sqlx::query(
            "SELECT a.available + COALESCE(d.amount, 0) AS available, a.held - COALESCE(d.amount, 0) AS held,
                    (SELECT count(*) FROM hold o WHERE o.account_id = a.account_id
                       AND o.state = 'open' AND o.expires_at > ?2) AS open_holds, a.plan
             FROM account a
             LEFT JOIN (SELECT sum(amount) AS amount FROM hold
                        WHERE account_id = ?1 AND state = 'open' AND expires_at <= ?2) d
             WHERE a.account_id = ?1",
        )
        .bind(account_id.as_str())
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?
        .ok_or(LedgerError::AccountNotFound)?;
        Ok(Balance {
            account_id: account_id.as_str().to_owned(),
            available: row.try_get("available").map_err(map_err)?,
            held: row.try_get("held").map_err(map_err)?,
            open_holds: row.try_get("open_holds").map_err(map_err)?,
            as_of: to_time(now)?,
            plan: row.try_get("plan").map_err(map_err)?,
        })
    }

    async fn reserve(
        &self,
        idem: &Idempotency,
        cmd: &Reserve,
    ) -> StorageResult<Applied<ReserveOutcome>> {
        let (_lock, mut tx, now) = match self.begin_claimed(idem).await? {
            Started::New(lock, tx, now) => (lock, tx, now),
            Started::Replay(fp, response) => return replay(idem, &fp, response.as_deref()),
        };
        let account = cmd.account_id.as_str();
        expire_account(&mut tx, account, now, i64::MAX).await?;
        let amount = cmd.amount.get();
        let Some(available) =
            update_balance(&mut tx, account, amount.saturating_neg(), amount, now).await?
        else {
            return Err(insufficient(&mut tx, account, amount).await);
        };
        let hold = Hold {
            hold_id: cmd.hold_id.as_str().to_owned(),
            account_id: account.to_owned(),
            amount,
            state: HoldState::Open,
            committed_amount: 0,
            refunded_amount: 0,
            created_at: now,
            expires_at: now.checked_add_signed(cmd.ttl).unwrap_or(now),
            resolved_at: None,
            metadata: cmd.metadata.clone(),
        };
        sqlx::query(
            "INSERT INTO hold (hold_id, account_id, amount, metadata, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&hold.hold_id)
        .bind(account)
        .bind(amount)
        .bind(serde_json::to_string(&hold.metadata).map_err(StorageError::other)?)
        .bind(now.timestamp_micros())
        .bind(hold.expires_at.timestamp_micros())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_entry(
            &mut tx,
            account,
            Some(&hold.hold_id),
            rules::EntryKind::Reserve,
            (amount.saturating_neg(), amount),
            "",
            now,
        )
        .await?;
        let outcome = ReserveOutcome { hold, available };
        store_outcome(&mut tx, idem, &outcome.clone().into()).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Applied::fresh(outcome))
    }

    async fn commit_hold(
        &self,
        idem: &Idempotency,
        cmd: &CommitHold,
    ) -> StorageResult<Applied<CommitOutcome>> {
        narrow(
            self.hold_op(idem, &cmd.hold_id, |h, now| HoldChange::commit(h, cmd, now))
                .await?,
        )
    }

    async fn refund(
        &self,
        idem: &Idempotency,
        cmd: &Refund,
    ) -> StorageResult<Applied<RefundOutcome>> {
        narrow(
            self.hold_op(idem, &cmd.hold_id, |h, now| HoldChange::refund(h, cmd, now))
                .await?,
        )
    }

    async fn extend_hold(
        &self,
        idem: &Idempotency,
        cmd: &ExtendHold,
    ) -> StorageResult<Applied<ExtendOutcome>> {
        narrow(
            self.hold_op(idem, &cmd.hold_id, |h, now| HoldChange::extend(h, cmd, now))
                .await?,
        )
    }

    async fn grant(&self, idem: &Idempotency, cmd: &Grant) -> StorageResult<Applied<GrantOutcome>> {
        let (_lock, mut tx, now) = match self.begin_claimed(idem).await? {
            Started::New(lock, tx, now) => (lock, tx, now),
            Started::Replay(fp, response) => return replay(idem, &fp, response.as_deref()),
        };
        let account = cmd.account_id.as_str();
        let row = sqlx::query(
            "INSERT INTO account (account_id, available, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT (account_id) DO UPDATE
             SET available = available + excluded.available, updated_at = excluded.updated_at
             RETURNING available",
        )
        .bind(account)
        .bind(cmd.amount.get())
        .bind(now.timestamp_micros())
        .fetch_one(&mut *tx)
        .await
        .map_err(map_err)?;
        let available: i64 = row.try_get("available").map_err(map_err)?;
        let entry_id = insert_entry(
            &mut tx,
            account,
            None,
            rules::EntryKind::Grant,
            (cmd.amount.get(), 0),
            &cmd.reason,
            now,
        )
        .await?;
        let outcome = GrantOutcome {
            account_id: account.to_owned(),
            entry_id,
            available,
        };
        store_outcome(
            &mut tx,
            idem,
            &with_available(outcome.clone().into(), available),
        )
        .await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Applied::fresh(outcome))
    }

    async fn hold(&self, hold_id: &HoldId) -> StorageResult<Hold> {
        let sql = concat!("SELECT ", hold_columns!(), " FROM hold WHERE hold_id = ?1");
        let row = sqlx::query(sql)
            .bind(hold_id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?
            .ok_or(LedgerError::HoldNotFound)?;
        Ok(hold_from_row(&row)?.observed_at(Utc::now()))
    }

    async fn list_holds(&self, q: &HoldQuery) -> StorageResult<Vec<Hold>> {
        let now = now_micros();
        let sql = concat!(
            "SELECT ",
            hold_columns!(),
            " FROM hold
             WHERE account_id = ?1 AND (?2 IS NULL OR hold_id < ?2)
               AND (json_array_length(?3) = 0 OR
                    (CASE WHEN state = 'open' AND expires_at <= ?5 THEN 'expired' ELSE state END)
                    IN (SELECT value FROM json_each(?3)))
             ORDER BY hold_id DESC LIMIT ?4"
        );
        let rows = sqlx::query(sql)
            .bind(q.account_id.as_str())
            .bind(q.before.as_ref().map(HoldId::as_str))
            .bind(serde_json::to_string(&state_names(&q.states)).map_err(StorageError::other)?)
            .bind(i64::from(q.limit))
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        let now = to_time(now)?;
        rows.iter()
            .map(|row| Ok(hold_from_row(row)?.observed_at(now)))
            .collect()
    }

    async fn expire_due(&self, limit: u32) -> StorageResult<u64> {
        let (_lock, mut tx) = self.begin_write().await?;
        let now = to_time(now_micros())?;
        let accounts: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT account_id FROM hold WHERE state = 'open' AND expires_at <= ?1 LIMIT ?2",
        )
        .bind(now.timestamp_micros())
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        let mut total = 0u64;
        for account in &accounts {
            total = total
                .saturating_add(expire_account(&mut tx, account, now, i64::from(limit)).await?);
        }
        tx.commit().await.map_err(map_err)?;
        Ok(total)
    }

    async fn set_plan(
        &self,
        idem: &Idempotency,
        cmd: &SetPlan,
    ) -> StorageResult<Applied<PlanOutcome>> {
        let (_lock, mut tx, now) = match self.begin_claimed(idem).await? {
            Started::New(lock, tx, now) => (lock, tx, now),
            Started::Replay(fp, response) => return replay(idem, &fp, response.as_deref()),
        };
        let previous: Option<String> =
            sqlx::query_scalar("SELECT plan FROM account WHERE account_id = ?1")
                .bind(cmd.account_id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err)?;
        let previous_plan = previous.ok_or(LedgerError::AccountNotFound)?;
        sqlx::query("UPDATE account SET plan = ?2, updated_at = ?3 WHERE account_id = ?1")
            .bind(cmd.account_id.as_str())
            .bind(&cmd.plan)
            .bind(now.timestamp_micros())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        let outcome = PlanOutcome {
            account_id: cmd.account_id.as_str().to_owned(),
            previous_plan,
            plan: cmd.plan.clone(),
        };
        store_outcome(&mut tx, idem, &outcome.clone().into()).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Applied::fresh(outcome))
    }

    async fn account(&self, account_id: &AccountId) -> StorageResult<AccountSummary> {
        let balance = self.balance(account_id).await?;
        let (created_at,): (i64,) =
            sqlx::query_as("SELECT created_at FROM account WHERE account_id = ?1")
                .bind(account_id.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err)?
                .ok_or(LedgerError::AccountNotFound)?;
        Ok(AccountSummary {
            balance,
            created_at: to_time(created_at)?,
        })
    }

    async fn list_accounts(&self, q: &AccountQuery) -> StorageResult<Vec<AccountRow>> {
        let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT a.account_id, a.plan, a.available, a.held FROM account a
             LEFT JOIN (SELECT json_extract(value, '$.plan') AS plan,
                               json_extract(value, '$.threshold') AS threshold
                        FROM json_each(?3)) t ON t.plan = a.plan
             WHERE (?1 IS NULL OR a.account_id > ?1) AND (?2 IS NULL OR a.plan = ?2)
               AND (NOT ?4 OR a.available < COALESCE(t.threshold, 0))
             ORDER BY a.account_id LIMIT ?5",
        )
        .bind(q.after.as_deref())
        .bind(q.plan.as_deref())
        .bind(thresholds_json(
            q.low_balance.as_deref().unwrap_or_default(),
        )?)
        .bind(q.low_balance.is_some())
        .bind(i64::from(q.limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(rows
            .into_iter()
            .map(|(account_id, plan, available, held)| AccountRow {
                account_id,
                plan,
                available,
                held,
            })
            .collect())
    }

    async fn list_entries(&self, q: &EntryQuery) -> StorageResult<Vec<EntryRecord>> {
        let (sql, before, after) = match q.cursor {
            EntryCursor::Before(id) => (ENTRIES_NEWEST_FIRST, id, None),
            EntryCursor::After(id) => (ENTRIES_OLDEST_FIRST, None, id),
        };
        let rows: Vec<SqliteEntryRow> = sqlx::query_as(sql)
            .bind(q.account_id.as_ref().map(AccountId::as_str))
            .bind(serde_json::to_string(&kind_names(&q.kinds)).map_err(StorageError::other)?)
            .bind(q.since.map(|t| t.timestamp_micros()))
            .bind(q.until.map(|t| t.timestamp_micros()))
            .bind(before)
            .bind(after)
            .bind(i64::from(q.limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.into_iter()
            .map(
                |(
                    entry_id,
                    account_id,
                    hold_id,
                    kind,
                    available_delta,
                    held_delta,
                    reason,
                    created_at,
                )| {
                    Ok(EntryRecord {
                        entry_id,
                        account_id,
                        hold_id,
                        kind: entry_kind(&kind)?,
                        available_delta,
                        held_delta,
                        reason,
                        created_at: to_time(created_at)?,
                    })
                },
            )
            .collect()
    }

    async fn purge_idempotency(&self, retention: TimeDelta, limit: u32) -> StorageResult<u64> {
        let cutoff = now_micros().saturating_sub(retention.num_microseconds().unwrap_or(i64::MAX));
        let done = sqlx::query(
            "DELETE FROM idempotency_record WHERE rowid IN (
                SELECT rowid FROM idempotency_record WHERE created_at < ?1 LIMIT ?2)",
        )
        .bind(cutoff)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected())
    }

    async fn audit(&self) -> StorageResult<Vec<Violation>> {
        let rows: Vec<AuditRow> = sqlx::query_as(AUDIT_SQL)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(rows.into_iter().map(violation).collect())
    }

    async fn ping(&self) -> StorageResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(map_err)
            .map(|_| ())
    }
}
