//! PostgreSQL backend: the production store.
//!
//! READ COMMITTED throughout. Correctness rests on row locks and guarded statements, never on
//! SERIALIZABLE: the idempotency claim (`INSERT .. ON CONFLICT DO NOTHING`) makes a concurrent
//! duplicate wait for the first transaction, holds are locked `FOR UPDATE` before a decision,
//! and balance updates carry their own guard (`WHERE available + $delta >= 0`), re-checked by
//! PostgreSQL against the latest row version. Locks are always taken hold(s) first, then the one
//! account, so transactions cannot deadlock each other. `now()` (the transaction's start time on
//! the database clock) is the only clock.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Postgres, Row, Transaction};

use super::{
    AUDIT_SQL, AccountQuery, AccountRow, Applied, AuditRow, Claim, EntryCursor, EntryQuery,
    HoldChange, HoldQuery, StorageError, StorageResult, Store, Violation, constraint_rejection,
    entry_kind, kind_names, narrow, replay, state_names, thresholds_json, to_record, violation,
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

/// The PostgreSQL store.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

/// Maps a sqlx error to what the service needs to know. Messages never include the URL.
#[allow(clippy::needless_pass_by_value)] // used as `.map_err(map_err)`
fn map_err(e: sqlx::Error) -> StorageError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match &*code {
                // serialization failure, deadlock, lock not available
                "40001" | "40P01" | "55P03" => StorageError::Contended,
                "23514" => db.constraint().and_then(constraint_rejection).map_or_else(
                    || StorageError::Other(db.message().to_owned()),
                    StorageError::Rejected,
                ),
                // connection exceptions, admin shutdown, crash shutdown, cannot connect now, too many connections
                c if c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03" | "53300") => {
                    StorageError::Unavailable(format!("{} ({c})", db.message()))
                }
                c => StorageError::Other(format!("{} ({c})", db.message())),
            }
        }
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => StorageError::Unavailable(e.to_string()),
        _ => StorageError::Other(e.to_string()),
    }
}

fn hold_from_row(row: &PgRow) -> StorageResult<Hold> {
    let get = |e: sqlx::Error| StorageError::Other(format!("unreadable hold row: {e}"));
    let state: String = row.try_get("state").map_err(get)?;
    let metadata: String = row.try_get("metadata").map_err(get)?;
    Ok(Hold {
        hold_id: row.try_get("hold_id").map_err(get)?,
        account_id: row.try_get("account_id").map_err(get)?,
        amount: row.try_get("amount").map_err(get)?,
        state: HoldState::parse(&state)
            .ok_or_else(|| StorageError::Other(format!("unknown hold state {state:?}")))?,
        committed_amount: row.try_get("committed_amount").map_err(get)?,
        refunded_amount: row.try_get("refunded_amount").map_err(get)?,
        created_at: row.try_get("created_at").map_err(get)?,
        expires_at: row.try_get("expires_at").map_err(get)?,
        resolved_at: row.try_get("resolved_at").map_err(get)?,
        metadata: serde_json::from_str::<Metadata>(&metadata).map_err(StorageError::other)?,
    })
}

fn metadata_json(m: &Metadata) -> StorageResult<String> {
    serde_json::to_string(m).map_err(StorageError::other)
}

/// A transaction that owns its idempotency key, or the stored answer for that key.
enum Started {
    New(Transaction<'static, Postgres>, DateTime<Utc>),
    Replay(Vec<u8>, Option<String>),
}

impl PgStore {
    /// Connects a pool of at most `max_connections`.
    ///
    /// # Errors
    /// `Unavailable` when the server cannot be reached; `Other` for a malformed URL.
    pub async fn connect(url: &str, max_connections: u32) -> StorageResult<Self> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|_| StorageError::Other("the PostgreSQL URL could not be parsed".into()))?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(map_err)?;
        Ok(Self { pool })
    }

    /// Applies `migrations/postgres` (sqlx takes an advisory lock, so replicas may race).
    ///
    /// # Errors
    /// `Other` when a migration fails.
    pub async fn migrate(&self) -> StorageResult<()> {
        sqlx::migrate!("migrations/postgres")
            .run(&self.pool)
            .await
            .map_err(StorageError::other)
    }

    /// The pool (for tests and tooling).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn begin_claimed(&self, idem: &Idempotency) -> StorageResult<Started> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        match claim(&mut tx, idem).await? {
            Claim::New(now) => Ok(Started::New(tx, now)),
            Claim::Existing {
                fingerprint,
                response,
            } => Ok(Started::Replay(fingerprint, response)),
        }
    }

    /// Claim, lock the hold, decide with `decide`, write the change: one transaction.
    async fn hold_op(
        &self,
        idem: &Idempotency,
        hold_id: &HoldId,
        decide: impl FnOnce(Hold, DateTime<Utc>) -> Result<HoldChange, LedgerError> + Send,
    ) -> StorageResult<Applied<Outcome>> {
        let (mut tx, now) = match self.begin_claimed(idem).await? {
            Started::New(tx, now) => (tx, now),
            Started::Replay(fp, response) => return replay(idem, &fp, response.as_deref()),
        };
        let sql = concat!(
            "SELECT ",
            hold_columns!(),
            " FROM hold WHERE hold_id = $1 FOR UPDATE"
        );
        let row = sqlx::query(sql)
            .bind(hold_id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        let hold = hold_from_row(&row.ok_or(LedgerError::HoldNotFound)?)?;
        let account_id = hold.account_id.clone();
        let change = decide(hold, now)?;
        let Some(available) = apply_hold_change(&mut tx, idem, &account_id, &change).await? else {
            return Err(insufficient(
                &mut tx,
                &account_id,
                0,
                change.available_delta.saturating_neg(),
            )
            .await);
        };
        tx.commit().await.map_err(map_err)?;
        Ok(Applied::fresh(change.finish(available)))
    }

    async fn expire_account(&self, account_id: &str, limit: u32) -> StorageResult<u64> {
        let row = sqlx::query(
            "WITH due AS (
                SELECT hold_id FROM hold
                WHERE account_id = $1 AND state = 'open' AND expires_at <= now()
                ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED
             ), expired AS (
                UPDATE hold h SET state = 'expired', resolved_at = h.expires_at
                FROM due WHERE h.hold_id = due.hold_id
                RETURNING h.hold_id, h.amount
             ), freed AS (
                SELECT COALESCE(sum(amount), 0)::bigint AS amount, count(*) AS n FROM expired
             ), acct AS (
                UPDATE account a SET available = a.available + freed.amount,
                       held = a.held - freed.amount, updated_at = now()
                FROM freed WHERE a.account_id = $1 AND freed.n > 0
             ), entries AS (
                INSERT INTO entry (account_id, hold_id, kind, available_delta, held_delta)
                SELECT $1, hold_id, 'expire', amount, -amount FROM expired
             )
             SELECT n FROM freed",
        )
        .bind(account_id)
        .bind(i64::from(limit))
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        let n: i64 = row.try_get("n").map_err(map_err)?;
        Ok(u64::try_from(n).unwrap_or_default())
    }
}

async fn claim(tx: &mut PgConnection, idem: &Idempotency) -> StorageResult<Claim<DateTime<Utc>>> {
    // A concurrent duplicate blocks here until the first transaction ends, then sees its row.
    let row = sqlx::query(
        "INSERT INTO idempotency_record (caller, idempotency_key, fingerprint) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING RETURNING created_at",
    )
    .bind(idem.caller.as_str())
    .bind(idem.key.as_str())
    .bind(&idem.fingerprint[..])
    .fetch_optional(&mut *tx)
    .await
    .map_err(map_err)?;
    if let Some(row) = row {
        return Ok(Claim::New(row.try_get("created_at").map_err(map_err)?));
    }
    let row = sqlx::query(
        "SELECT fingerprint, response FROM idempotency_record WHERE caller = $1 AND idempotency_key = $2",
    )
    .bind(idem.caller.as_str())
    .bind(idem.key.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(map_err)?;
    // Purged between the two statements: let the service retry.
    let row = row.ok_or(StorageError::Contended)?;
    Ok(Claim::Existing {
        fingerprint: row.try_get("fingerprint").map_err(map_err)?,
        response: row.try_get("response").map_err(map_err)?,
    })
}

/// The refusal for a guarded balance update that matched no row: no account, or too little.
async fn insufficient(
    tx: &mut PgConnection,
    account_id: &str,
    freed: i64,
    needed: i64,
) -> StorageError {
    let row = sqlx::query("SELECT available FROM account WHERE account_id = $1")
        .bind(account_id)
        .fetch_optional(&mut *tx)
        .await;
    match row {
        Ok(None) => LedgerError::AccountNotFound.into(),
        Ok(Some(row)) => match row.try_get::<i64, _>("available") {
            Ok(available) => LedgerError::InsufficientCredits {
                available: available.saturating_add(freed),
                requested: needed,
            }
            .into(),
            Err(e) => map_err(e),
        },
        Err(e) => map_err(e),
    }
}

/// Writes a decided hold change: guarded balance update, hold row, entry and stored outcome in
/// one statement. `None` when the guard failed (not enough available for a commit's extra).
async fn apply_hold_change(
    tx: &mut PgConnection,
    idem: &Idempotency,
    account_id: &str,
    change: &HoldChange,
) -> StorageResult<Option<i64>> {
    let h = &change.hold;
    let row = sqlx::query(
        "WITH acct AS (
            UPDATE account SET available = available + $2, held = held + $3, updated_at = now()
            WHERE account_id = $1 AND available + $2 >= 0
            RETURNING available
         ), h AS (
            UPDATE hold SET state = $5, committed_amount = $6, refunded_amount = $7,
                   expires_at = $8, resolved_at = $9
            WHERE hold_id = $4 AND EXISTS (SELECT 1 FROM acct)
         ), e AS (
            INSERT INTO entry (account_id, hold_id, kind, available_delta, held_delta, reason)
            SELECT $1, $4, $10, $2, $3, $11 FROM acct WHERE $10::text IS NOT NULL
         ), rec AS (
            UPDATE idempotency_record r
            SET response = jsonb_set($12::jsonb, '{available}', to_jsonb(acct.available))::text
            FROM acct WHERE r.caller = $13 AND r.idempotency_key = $14
         )
         SELECT (SELECT available FROM acct) AS available",
    )
    .bind(account_id)
    .bind(change.available_delta)
    .bind(change.held_delta)
    .bind(&h.hold_id)
    .bind(h.state.as_str())
    .bind(h.committed_amount)
    .bind(h.refunded_amount)
    .bind(h.expires_at)
    .bind(h.resolved_at)
    .bind(change.entry.map(rules::EntryKind::as_str))
    .bind(&change.reason)
    .bind(to_record(change.outcome.clone())?)
    .bind(idem.caller.as_str())
    .bind(idem.key.as_str())
    .fetch_one(&mut *tx)
    .await
    .map_err(map_err)?;
    row.try_get("available").map_err(map_err)
}

type PgEntryRow = (
    i64,
    String,
    Option<String>,
    String,
    i64,
    i64,
    String,
    DateTime<Utc>,
);

macro_rules! entries_sql {
    ($order:literal) => {
        concat!(
            "SELECT entry_id, account_id, hold_id, kind, available_delta, held_delta, reason, created_at
             FROM entry
             WHERE ($1::text IS NULL OR account_id = $1)
               AND (cardinality($2::text[]) = 0 OR kind = ANY($2::text[]))
               AND ($3::timestamptz IS NULL OR created_at >= $3)
               AND ($4::timestamptz IS NULL OR created_at < $4)
               AND ($5::bigint IS NULL OR entry_id < $5)
               AND ($6::bigint IS NULL OR entry_id > $6)
             ORDER BY entry_id ",
            $order,
            " LIMIT $7"
        )
    };
}
const ENTRIES_NEWEST_FIRST: &str = entries_sql!("DESC");
const ENTRIES_OLDEST_FIRST: &str = entries_sql!("ASC");

#[async_trait]
impl Store for PgStore {
    async fn balance(&self, account_id: &AccountId) -> StorageResult<Balance> {
        let row = sqlx::query(
            "SELECT a.available + d.amount AS available, a.held - d.amount AS held,
                    (SELECT count(*) FROM hold o WHERE o.account_id = a.account_id
                       AND o.state = 'open' AND o.expires_at > now()) AS open_holds,
                    now() AS as_of, a.plan
             FROM account a,
                  LATERAL (SELECT COALESCE(sum(amount), 0)::bigint AS amount FROM hold
                           WHERE account_id = a.account_id AND state = 'open'
                             AND expires_at <= now()) d
             WHERE a.account_id = $1",
        )
        .bind(account_id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?
        .ok_or(LedgerError::AccountNotFound)?;
        Ok(Balance {
            account_id: account_id.as_str().to_owned(),
            available: row.try_get("available").map_err(map_err)?,
            held: row.try_get("held").map_err(map_err)?,
            open_holds: row.try_get("open_holds").map_err(map_err)?,
            as_of: row.try_get("as_of").map_err(map_err)?,
            plan: row.try_get("plan").map_err(map_err)?,
        })
    }

    async fn reserve(
        &self,
        idem: &Idempotency,
        cmd: &Reserve,
    ) -> StorageResult<Applied<ReserveOutcome>> {
        let (mut tx, now) = match self.begin_claimed(idem).await? {
            Started::New(tx, now) => (tx, now),
            Started::Replay(fp, response) => return replay(idem, &fp, response.as_deref()),
        };
        let hold = Hold {
            hold_id: cmd.hold_id.as_str().to_owned(),
            account_id: cmd.account_id.as_str().to_owned(),
            amount: cmd.amount.get(),
            state: HoldState::Open,
            committed_amount: 0,
            refunded_amount: 0,
            created_at: now,
            expires_at: now.checked_add_signed(cmd.ttl).unwrap_or(now),
            resolved_at: None,
            metadata: cmd.metadata.clone(),
        };
        let record = to_record(ReserveOutcome {
            hold: hold.clone(),
            available: 0,
        })?;
        // Expire the account's overdue holds, then reserve against what that frees: holds are
        // locked before the account row, as everywhere else.
        let row = sqlx::query(
            "WITH due AS (
                SELECT hold_id FROM hold
                WHERE account_id = $1 AND state = 'open' AND expires_at <= now()
                FOR UPDATE SKIP LOCKED
             ), expired AS (
                UPDATE hold h SET state = 'expired', resolved_at = h.expires_at
                FROM due WHERE h.hold_id = due.hold_id
                RETURNING h.hold_id, h.amount
             ), freed AS (
                SELECT COALESCE(sum(amount), 0)::bigint AS amount FROM expired
             ), acct AS (
                UPDATE account a
                SET available = a.available + freed.amount - $2,
                    held = a.held - freed.amount + $2, updated_at = now()
                FROM freed
                WHERE a.account_id = $1 AND a.available + freed.amount >= $2
                RETURNING a.available
             ), new_hold AS (
                INSERT INTO hold (hold_id, account_id, amount, metadata, created_at, expires_at)
                SELECT $3, $1, $2, $4, $5, $6 FROM acct
                RETURNING hold_id
             ), entries AS (
                INSERT INTO entry (account_id, hold_id, kind, available_delta, held_delta)
                SELECT $1, x.hold_id, 'expire', x.amount, -x.amount FROM expired x, acct
                UNION ALL
                SELECT $1, n.hold_id, 'reserve', -$2::bigint, $2::bigint FROM new_hold n
             ), rec AS (
                UPDATE idempotency_record r
                SET response = jsonb_set($7::jsonb, '{available}', to_jsonb(acct.available))::text
                FROM acct WHERE r.caller = $8 AND r.idempotency_key = $9
             )
             SELECT (SELECT available FROM acct) AS available, (SELECT amount FROM freed) AS freed",
        )
        .bind(cmd.account_id.as_str())
        .bind(cmd.amount.get())
        .bind(&hold.hold_id)
        .bind(metadata_json(&hold.metadata)?)
        .bind(hold.created_at)
        .bind(hold.expires_at)
        .bind(record)
        .bind(idem.caller.as_str())
        .bind(idem.key.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(map_err)?;
        let available: Option<i64> = row.try_get("available").map_err(map_err)?;
        let Some(available) = available else {
            let freed: i64 = row.try_get("freed").map_err(map_err)?;
            return Err(
                insufficient(&mut tx, cmd.account_id.as_str(), freed, cmd.amount.get()).await,
            );
        };
        tx.commit().await.map_err(map_err)?;
        Ok(Applied::fresh(ReserveOutcome { hold, available }))
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
        let mut tx = match self.begin_claimed(idem).await? {
            Started::New(tx, _) => tx,
            Started::Replay(fp, response) => return replay(idem, &fp, response.as_deref()),
        };
        let record = to_record(GrantOutcome {
            account_id: cmd.account_id.as_str().to_owned(),
            entry_id: 0,
            available: 0,
        })?;
        // The balance limit is the account_balance_limit CHECK: a violation aborts the statement.
        let row = sqlx::query(
            "WITH acct AS (
                INSERT INTO account (account_id, available) VALUES ($1, $2)
                ON CONFLICT (account_id) DO UPDATE
                SET available = account.available + EXCLUDED.available, updated_at = now()
                RETURNING available
             ), e AS (
                INSERT INTO entry (account_id, kind, available_delta, held_delta, reason)
                SELECT $1, 'grant', $2, 0, $3 FROM acct
                RETURNING entry_id
             ), rec AS (
                UPDATE idempotency_record r
                SET response = jsonb_set(jsonb_set($4::jsonb, '{available}', to_jsonb(acct.available)),
                                         '{entry_id}', to_jsonb(e.entry_id))::text
                FROM acct, e WHERE r.caller = $5 AND r.idempotency_key = $6
             )
             SELECT (SELECT available FROM acct) AS available, (SELECT entry_id FROM e) AS entry_id",
        )
        .bind(cmd.account_id.as_str())
        .bind(cmd.amount.get())
        .bind(&cmd.reason)
        .bind(record)
        .bind(idem.caller.as_str())
        .bind(idem.key.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(map_err)?;
        let outcome = GrantOutcome {
            account_id: cmd.account_id.as_str().to_owned(),
            entry_id: row.try_get("entry_id").map_err(map_err)?,
            available: row.try_get("available").map_err(map_err)?,
        };
        tx.commit().await.map_err(map_err)?;
        Ok(Applied::fresh(outcome))
    }

    async fn hold(&self, hold_id: &HoldId) -> StorageResult<Hold> {
        let sql = concat!(
            "SELECT ",
            hold_columns!(),
            ", now() AS now FROM hold WHERE hold_id = $1"
        );
        let row = sqlx::query(sql)
            .bind(hold_id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?
            .ok_or(LedgerError::HoldNotFound)?;
        let now: DateTime<Utc> = row.try_get("now").map_err(map_err)?;
        Ok(hold_from_row(&row)?.observed_at(now))
    }

    async fn list_holds(&self, q: &HoldQuery) -> StorageResult<Vec<Hold>> {
        let sql = concat!(
            "SELECT ",
            hold_columns!(),
            ", now() AS now FROM hold
             WHERE account_id = $1 AND ($2::text IS NULL OR hold_id < $2)
               AND (cardinality($3::text[]) = 0 OR
                    (CASE WHEN state = 'open' AND expires_at <= now() THEN 'expired' ELSE state END)
                    = ANY($3::text[]))
             ORDER BY hold_id DESC LIMIT $4"
        );
        let rows = sqlx::query(sql)
            .bind(q.account_id.as_str())
            .bind(q.before.as_ref().map(HoldId::as_str))
            .bind(state_names(&q.states))
            .bind(i64::from(q.limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                let now: DateTime<Utc> = row.try_get("now").map_err(map_err)?;
                Ok(hold_from_row(row)?.observed_at(now))
            })
            .collect()
    }

    async fn expire_due(&self, limit: u32) -> StorageResult<u64> {
        // One short transaction per account keeps the lock order (holds, then one account).
        let rows = sqlx::query(
            "SELECT DISTINCT account_id FROM hold WHERE state = 'open' AND expires_at <= now() LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let mut total = 0u64;
        for row in rows {
            let account_id: String = row.try_get("account_id").map_err(map_err)?;
            total = total.saturating_add(self.expire_account(&account_id, limit).await?);
        }
        Ok(total)
    }

    async fn set_plan(
        &self,
        idem: &Idempotency,
        cmd: &SetPlan,
    ) -> StorageResult<Applied<PlanOutcome>> {
        let mut tx = match self.begin_claimed(idem).await? {
            Started::New(tx, _) => tx,
            Started::Replay(fp, response) => return replay(idem, &fp, response.as_deref()),
        };
        let previous: Option<String> =
            sqlx::query_scalar("SELECT plan FROM account WHERE account_id = $1 FOR UPDATE")
                .bind(cmd.account_id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err)?;
        let previous_plan = previous.ok_or(LedgerError::AccountNotFound)?;
        sqlx::query("UPDATE account SET plan = $2, updated_at = now() WHERE account_id = $1")
            .bind(cmd.account_id.as_str())
            .bind(&cmd.plan)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        let outcome = PlanOutcome {
            account_id: cmd.account_id.as_str().to_owned(),
            previous_plan,
            plan: cmd.plan.clone(),
        };
        sqlx::query(
            "UPDATE idempotency_record SET response = $3 WHERE caller = $1 AND idempotency_key = $2",
        )
        .bind(idem.caller.as_str())
        .bind(idem.key.as_str())
        .bind(to_record(outcome.clone())?)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(Applied::fresh(outcome))
    }

    async fn account(&self, account_id: &AccountId) -> StorageResult<AccountSummary> {
        let balance = self.balance(account_id).await?;
        let (created_at,): (DateTime<Utc>,) =
            sqlx::query_as("SELECT created_at FROM account WHERE account_id = $1")
                .bind(account_id.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err)?
                .ok_or(LedgerError::AccountNotFound)?;
        Ok(AccountSummary {
            balance,
            created_at,
        })
    }

    async fn list_accounts(&self, q: &AccountQuery) -> StorageResult<Vec<AccountRow>> {
        let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT a.account_id, a.plan, a.available, a.held FROM account a
             LEFT JOIN jsonb_to_recordset($3::jsonb) AS t(plan text, threshold bigint) ON t.plan = a.plan
             WHERE ($1::text IS NULL OR a.account_id > $1) AND ($2::text IS NULL OR a.plan = $2)
               AND (NOT $4 OR a.available < COALESCE(t.threshold, 0))
             ORDER BY a.account_id LIMIT $5",
        )
        .bind(q.after.as_deref())
        .bind(q.plan.as_deref())
        .bind(thresholds_json(q.low_balance.as_deref().unwrap_or_default())?)
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
        let rows: Vec<PgEntryRow> = sqlx::query_as(sql)
            .bind(q.account_id.as_ref().map(AccountId::as_str))
            .bind(kind_names(&q.kinds))
            .bind(q.since)
            .bind(q.until)
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
                        created_at,
                    })
                },
            )
            .collect()
    }

    async fn purge_idempotency(&self, retention: TimeDelta, limit: u32) -> StorageResult<u64> {
        let done = sqlx::query(
            "DELETE FROM idempotency_record WHERE (caller, idempotency_key) IN (
                SELECT caller, idempotency_key FROM idempotency_record
                WHERE created_at < now() - $1 * interval '1 millisecond' LIMIT $2)",
        )
        .bind(retention.num_milliseconds())
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
