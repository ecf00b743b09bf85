//! PostgreSQL backend: the production store.
//!
//! READ COMMITTED throughout. Correctness rests on row locks and constraints, never on
//! SERIALIZABLE: the idempotency claim (`INSERT .. ON CONFLICT DO NOTHING`) makes a concurrent
//! duplicate wait for the first transaction, and every operation locks its account row
//! (`SELECT .. FOR UPDATE`) before it reads the account's grants and holds, so it decides on the
//! latest committed state. A transaction locks one account (a transfer two, in id order), so
//! transactions cannot deadlock each other. `CHECK` constraints back the rules up. `now()` (the
//! transaction's start time on the database clock) is the only clock.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

use super::SubscriptionRow;
use super::{
    AUDIT_SQL, AccountQuery, AccountRow, AuditRow, Claim, EntryCursor, EntryQuery, HoldQuery,
    StorageError, StorageResult, StripeEvent, Tx, Violation, constraint_rejection, entry_kind,
    kind_names, loaded_hold_ids, missing_buckets, source, state_names, thresholds_json, to_record,
    violation,
};
use crate::domain::book::{Book, Bucket, Draw, breakdown, consumption_order};
use crate::domain::command::Idempotency;
use crate::domain::outcome::Outcome;
use crate::domain::plan::Policy;
use crate::domain::{
    AccountId, AccountSummary, Balance, EntryRecord, Hold, HoldId, HoldState, LedgerError, Metadata,
};

/// The PostgreSQL store.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    policy: Arc<Policy>,
    /// For readiness pings on their own connection, so a busy pool never looks like a dead
    /// database.
    options: PgConnectOptions,
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
                // connection exceptions, admin shutdown, crash shutdown, cannot connect now, too
                // many connections, the database refusing connections (55000 at connect:
                // ALLOW_CONNECTIONS false), authentication failures (a rotated password)
                c if c.starts_with("08")
                    || c.starts_with("28")
                    || matches!(c, "57P01" | "57P02" | "57P03" | "53300" | "55000") =>
                {
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

/// One statement writes a book's changes: `$1..$12` new buckets, `$13..$16` bucket updates,
/// `$17..$26` new holds, `$27..$32` hold updates, `$33..$38` new draws, `$39..$42` draw
/// updates, `$43` the account, `$44..$50` entries (inserted in order), `$51..$56` the account
/// columns, written when `$57`.
const WRITE_BOOK_SQL: &str = "
WITH
nb AS (
  INSERT INTO bucket (bucket_id, account_id, source, granted, remaining, held, expired, expires_at,
                      priority, period, reason, created_at)
  SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[],
                       $7::int8[], $8::timestamptz[], $9::int4[], $10::text[], $11::text[],
                       $12::timestamptz[])),
ub AS (
  UPDATE bucket b SET remaining = u.remaining, held = u.held, expired = u.expired
  FROM UNNEST($13::text[], $14::int8[], $15::int8[], $16::int8[]) AS u(id, remaining, held, expired)
  WHERE b.bucket_id = u.id),
nh AS (
  INSERT INTO hold (hold_id, account_id, amount, metadata, created_at, expires_at, state,
                    committed_amount, refunded_amount, resolved_at)
  SELECT * FROM UNNEST($17::text[], $18::text[], $19::int8[], $20::text[], $21::timestamptz[],
                       $22::timestamptz[], $23::text[], $24::int8[], $25::int8[],
                       $26::timestamptz[])),
uh AS (
  UPDATE hold h SET state = u.state, committed_amount = u.committed, refunded_amount = u.refunded,
                    expires_at = u.expires_at, resolved_at = u.resolved_at
  FROM UNNEST($27::text[], $28::text[], $29::int8[], $30::int8[], $31::timestamptz[],
              $32::timestamptz[]) AS u(id, state, committed, refunded, expires_at, resolved_at)
  WHERE h.hold_id = u.id),
nd AS (
  INSERT INTO draw (hold_id, seq, bucket_id, held, consumed, refunded)
  SELECT * FROM UNNEST($33::text[], $34::int4[], $35::text[], $36::int8[], $37::int8[],
                       $38::int8[])),
ud AS (
  UPDATE draw w SET consumed = u.consumed, refunded = u.refunded
  FROM UNNEST($39::text[], $40::int4[], $41::int8[], $42::int8[]) AS u(hold_id, seq, consumed, refunded)
  WHERE w.hold_id = u.hold_id AND w.seq = u.seq),
ne AS (
  INSERT INTO entry (account_id, hold_id, bucket_id, kind, available_delta, held_delta, reason,
                     debt_delta)
  SELECT $43, e.hold_id, e.bucket_id, e.kind, e.available_delta, e.held_delta, e.reason, e.debt_delta
  FROM UNNEST($44::text[], $45::text[], $46::text[], $47::int8[], $48::int8[], $49::text[],
              $50::int8[]) WITH ORDINALITY
       AS e(hold_id, bucket_id, kind, available_delta, held_delta, reason, debt_delta, ord)
  ORDER BY e.ord),
ua AS (
  UPDATE account SET available = $51, held = $52, plan = $53, allowance_period = $54,
                     updated_at = $55, debt = $56
  WHERE account_id = $43 AND $57)
SELECT 1";

/// Columns of new buckets, as arrays for [`WRITE_BOOK_SQL`].
#[derive(Default)]
struct BucketRows<'a> {
    id: Vec<&'a str>,
    account: Vec<&'a str>,
    source: Vec<&'static str>,
    granted: Vec<i64>,
    remaining: Vec<i64>,
    held: Vec<i64>,
    expired: Vec<i64>,
    expires_at: Vec<Option<DateTime<Utc>>>,
    priority: Vec<i32>,
    period: Vec<Option<&'a str>>,
    reason: Vec<&'a str>,
    created_at: Vec<DateTime<Utc>>,
}

impl<'a> BucketRows<'a> {
    fn push(&mut self, b: &'a Bucket) {
        self.id.push(&b.bucket_id);
        self.account.push(&b.account_id);
        self.source.push(b.source.as_str());
        self.granted.push(b.granted);
        self.remaining.push(b.remaining);
        self.held.push(b.held);
        self.expired.push(b.expired);
        self.expires_at.push(b.expires_at);
        self.priority.push(b.priority);
        self.period.push(b.period.as_deref());
        self.reason.push(&b.reason);
        self.created_at.push(b.created_at);
    }
}

/// Columns of holds, as arrays for [`WRITE_BOOK_SQL`].
#[derive(Default)]
struct HoldRows<'a> {
    id: Vec<&'a str>,
    account: Vec<&'a str>,
    amount: Vec<i64>,
    metadata: Vec<String>,
    created_at: Vec<DateTime<Utc>>,
    expires_at: Vec<DateTime<Utc>>,
    state: Vec<&'static str>,
    committed: Vec<i64>,
    refunded: Vec<i64>,
    resolved_at: Vec<Option<DateTime<Utc>>>,
}

impl<'a> HoldRows<'a> {
    fn push(&mut self, h: &'a Hold) -> StorageResult<()> {
        self.id.push(&h.hold_id);
        self.account.push(&h.account_id);
        self.amount.push(h.amount);
        self.metadata.push(metadata_json(&h.metadata)?);
        self.created_at.push(h.created_at);
        self.expires_at.push(h.expires_at);
        self.state.push(h.state.as_str());
        self.committed.push(h.committed_amount);
        self.refunded.push(h.refunded_amount);
        self.resolved_at.push(h.resolved_at);
        Ok(())
    }
}

/// Columns of draws, as arrays for [`WRITE_BOOK_SQL`].
#[derive(Default)]
struct DrawRows<'a> {
    hold: Vec<&'a str>,
    seq: Vec<i32>,
    bucket: Vec<&'a str>,
    held: Vec<i64>,
    consumed: Vec<i64>,
    refunded: Vec<i64>,
}

impl<'a> DrawRows<'a> {
    fn push(&mut self, w: &'a Draw) {
        self.hold.push(&w.hold_id);
        self.seq.push(w.seq);
        self.bucket.push(&w.bucket_id);
        self.held.push(w.held);
        self.consumed.push(w.consumed);
        self.refunded.push(w.refunded);
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

fn bucket_from_row(row: &PgRow) -> StorageResult<Bucket> {
    let kind: String = row.try_get("source").map_err(map_err)?;
    Ok(Bucket {
        bucket_id: row.try_get("bucket_id").map_err(map_err)?,
        account_id: row.try_get("account_id").map_err(map_err)?,
        source: source(&kind)?,
        granted: row.try_get("granted").map_err(map_err)?,
        remaining: row.try_get("remaining").map_err(map_err)?,
        held: row.try_get("held").map_err(map_err)?,
        expired: row.try_get("expired").map_err(map_err)?,
        expires_at: row.try_get("expires_at").map_err(map_err)?,
        priority: row.try_get("priority").map_err(map_err)?,
        period: row.try_get("period").map_err(map_err)?,
        reason: row.try_get("reason").map_err(map_err)?,
        created_at: row.try_get("created_at").map_err(map_err)?,
    })
}

fn metadata_json(m: &Metadata) -> StorageResult<String> {
    serde_json::to_string(m).map_err(StorageError::other)
}

impl PgStore {
    /// Connects a pool of at most `max_connections`; `policy` gives plans their allowances.
    ///
    /// # Errors
    /// `Unavailable` when the server cannot be reached; `Other` for a malformed URL.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        policy: Arc<Policy>,
    ) -> StorageResult<Self> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|_| StorageError::Other("the PostgreSQL URL could not be parsed".into()))?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await
            .map_err(map_err)?;
        Ok(Self {
            pool,
            policy,
            options,
        })
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

    async fn begin(&self) -> StorageResult<Box<dyn Tx>> {
        let tx = self.pool.begin().await.map_err(map_err)?;
        Ok(Box::new(PgTx { tx }))
    }

    /// Columns of the balance read, and whether time has work to do on the account.
    async fn read_balance(&self, account_id: &str) -> StorageResult<(Balance, bool)> {
        let row = sqlx::query(
            "SELECT a.available - a.debt AS available, a.held, a.plan, a.allowance_period, now() AS now,
                    EXISTS (SELECT 1 FROM hold h WHERE h.account_id = a.account_id
                              AND h.state = 'open' AND h.expires_at <= now()) AS due_holds,
                    EXISTS (SELECT 1 FROM bucket b WHERE b.account_id = a.account_id
                              AND b.remaining > 0 AND b.expires_at <= now()) AS due_grants,
                    (SELECT count(*) FROM hold h WHERE h.account_id = a.account_id
                       AND h.state = 'open') AS open_holds
             FROM account a WHERE a.account_id = $1",
        )
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?
        .ok_or(LedgerError::AccountNotFound)?;
        let now: DateTime<Utc> = row.try_get("now").map_err(map_err)?;
        let plan: String = row.try_get("plan").map_err(map_err)?;
        let period: Option<String> = row.try_get("allowance_period").map_err(map_err)?;
        let due = row.try_get::<bool, _>("due_holds").map_err(map_err)?
            || row.try_get::<bool, _>("due_grants").map_err(map_err)?
            || self.policy.allowance_due(&plan, period.as_deref(), now);
        let buckets: Vec<Bucket> = sqlx::query(
            "SELECT * FROM bucket WHERE account_id = $1 AND (remaining > 0 OR period = $2)",
        )
        .bind(account_id)
        .bind(period.as_deref())
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?
        .iter()
        .map(bucket_from_row)
        .collect::<StorageResult<_>>()?;
        let (by_source, next_expiry, allowance_left) = breakdown(&buckets, period.as_deref(), now);
        let balance = Balance {
            account_id: account_id.to_owned(),
            available: row.try_get("available").map_err(map_err)?,
            held: row.try_get("held").map_err(map_err)?,
            open_holds: row.try_get("open_holds").map_err(map_err)?,
            allowance_left: self.policy.for_plan(&plan).and(allowance_left.or(Some(0))),
            plan,
            by_source,
            next_expiry,
            as_of: now,
        };
        Ok((balance, due))
    }
}

/// One PostgreSQL write transaction.
struct PgTx {
    tx: Transaction<'static, Postgres>,
}

#[async_trait]
#[allow(clippy::too_many_lines)] // `write`: one statement per changed row, in foreign-key order
impl Tx for PgTx {
    async fn now(&mut self) -> StorageResult<DateTime<Utc>> {
        sqlx::query_scalar("SELECT now()")
            .fetch_one(&mut *self.tx)
            .await
            .map_err(map_err)
    }

    async fn claim(&mut self, idem: &Idempotency, _now: DateTime<Utc>) -> StorageResult<Claim<()>> {
        // A concurrent duplicate blocks here until the first transaction ends, then sees its row.
        let claimed = sqlx::query(
            "INSERT INTO idempotency_record (caller, idempotency_key, fingerprint) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING RETURNING 1",
        )
        .bind(idem.caller.as_str())
        .bind(idem.key.as_str())
        .bind(&idem.fingerprint[..])
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(map_err)?;
        if claimed.is_some() {
            return Ok(Claim::New(()));
        }
        let row = sqlx::query(
            "SELECT fingerprint, response FROM idempotency_record WHERE caller = $1 AND idempotency_key = $2",
        )
        .bind(idem.caller.as_str())
        .bind(idem.key.as_str())
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(map_err)?;
        // Purged between the two statements: let the service retry.
        let row = row.ok_or(StorageError::Contended)?;
        Ok(Claim::Existing {
            fingerprint: row.try_get("fingerprint").map_err(map_err)?,
            response: row.try_get("response").map_err(map_err)?,
        })
    }

    async fn store_outcome(&mut self, idem: &Idempotency, outcome: &Outcome) -> StorageResult<()> {
        sqlx::query("UPDATE idempotency_record SET response = $3 WHERE caller = $1 AND idempotency_key = $2")
            .bind(idem.caller.as_str())
            .bind(idem.key.as_str())
            .bind(to_record(outcome.clone())?)
            .execute(&mut *self.tx)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn hold_account(&mut self, hold_id: &str) -> StorageResult<Option<String>> {
        sqlx::query_scalar("SELECT account_id FROM hold WHERE hold_id = $1")
            .bind(hold_id)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(map_err)
    }

    async fn lock_book(
        &mut self,
        account_id: &str,
        create: Option<&str>,
        now: DateTime<Utc>,
    ) -> StorageResult<Option<(Book, bool)>> {
        let mut created = false;
        if let Some(plan) = create {
            created = sqlx::query(
                "INSERT INTO account (account_id, plan, created_at, updated_at) VALUES ($1, $2, $3, $3)
                 ON CONFLICT DO NOTHING RETURNING 1",
            )
            .bind(account_id)
            .bind(plan)
            .bind(now)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(map_err)?
            .is_some();
        }
        let row = sqlx::query(
            "SELECT plan, allowance_period, available, held, debt FROM account WHERE account_id = $1 FOR UPDATE",
        )
        .bind(account_id)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let mut book = Book::new(
            account_id,
            &row.try_get::<String, _>("plan").map_err(map_err)?,
        );
        book.allowance_period = row.try_get("allowance_period").map_err(map_err)?;
        book.available = row.try_get("available").map_err(map_err)?;
        book.held = row.try_get("held").map_err(map_err)?;
        book.debt = row.try_get("debt").map_err(map_err)?;
        Ok(Some((book, created)))
    }

    async fn load(
        &mut self,
        book: &mut Book,
        hold: Option<&str>,
        now: DateTime<Utc>,
    ) -> StorageResult<()> {
        let rows = sqlx::query(
            "SELECT * FROM bucket WHERE account_id = $1
               AND (remaining > 0 OR held > 0 OR (period IS NOT NULL AND period = $2))",
        )
        .bind(&book.account_id)
        .bind(book.allowance_period.as_deref())
        .fetch_all(&mut *self.tx)
        .await
        .map_err(map_err)?;
        for r in &rows {
            let b = bucket_from_row(r)?;
            book.buckets.insert(b.bucket_id.clone(), b);
        }
        let sql = concat!(
            "SELECT ",
            hold_columns!(),
            " FROM hold WHERE account_id = $1
               AND ((state = 'open' AND expires_at <= $2) OR hold_id = $3)"
        );
        let rows = sqlx::query(sql)
            .bind(&book.account_id)
            .bind(now)
            .bind(hold)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(map_err)?;
        for r in &rows {
            let h = hold_from_row(r)?;
            book.holds.insert(h.hold_id.clone(), h);
        }
        let rows = sqlx::query("SELECT * FROM draw WHERE hold_id = ANY($1)")
            .bind(loaded_hold_ids(book))
            .fetch_all(&mut *self.tx)
            .await
            .map_err(map_err)?;
        for r in &rows {
            let d = Draw {
                hold_id: r.try_get("hold_id").map_err(map_err)?,
                seq: r.try_get("seq").map_err(map_err)?,
                bucket_id: r.try_get("bucket_id").map_err(map_err)?,
                held: r.try_get("held").map_err(map_err)?,
                consumed: r.try_get("consumed").map_err(map_err)?,
                refunded: r.try_get("refunded").map_err(map_err)?,
            };
            book.draws.insert((d.hold_id.clone(), d.seq), d);
        }
        let missing = missing_buckets(book);
        if !missing.is_empty() {
            let rows = sqlx::query("SELECT * FROM bucket WHERE bucket_id = ANY($1)")
                .bind(missing)
                .fetch_all(&mut *self.tx)
                .await
                .map_err(map_err)?;
            for r in &rows {
                let b = bucket_from_row(r)?;
                book.buckets.insert(b.bucket_id.clone(), b);
            }
        }
        Ok(())
    }

    async fn write(&mut self, book: &Book, now: DateTime<Utc>) -> StorageResult<()> {
        // Every changed row in one statement (a data-modifying CTE over UNNEST arrays): one
        // round trip instead of one per row. New rows are inserted with their final values and
        // left out of the updates (sibling CTEs share one snapshot, so an update would not see
        // them). Foreign keys are checked at the end of the statement, when all rows exist.
        let d = &book.dirty;
        let mut nb = BucketRows::default();
        for b in d.new_buckets.iter().filter_map(|id| book.buckets.get(id)) {
            nb.push(b);
        }
        let (mut ub_id, mut ub_rem, mut ub_held, mut ub_exp) = (vec![], vec![], vec![], vec![]);
        for b in d
            .buckets
            .iter()
            .filter(|id| !d.new_buckets.contains(*id))
            .filter_map(|id| book.buckets.get(id))
        {
            ub_id.push(b.bucket_id.as_str());
            ub_rem.push(b.remaining);
            ub_held.push(b.held);
            ub_exp.push(b.expired);
        }
        let mut nh = HoldRows::default();
        for h in d.new_holds.iter().filter_map(|id| book.holds.get(id)) {
            nh.push(h)?;
        }
        let mut uh = HoldRows::default();
        for h in d
            .holds
            .iter()
            .filter(|id| !d.new_holds.contains(*id))
            .filter_map(|id| book.holds.get(id))
        {
            uh.push(h)?;
        }
        let mut nd = DrawRows::default();
        for w in d.new_draws.iter().filter_map(|k| book.draws.get(k)) {
            nd.push(w);
        }
        let mut ud = DrawRows::default();
        for w in d
            .draws
            .iter()
            .filter(|k| !d.new_draws.contains(*k))
            .filter_map(|k| book.draws.get(k))
        {
            ud.push(w);
        }
        let (
            mut e_hold_id,
            mut e_bucket,
            mut e_kind,
            mut e_avail,
            mut e_held_delta,
            mut e_reason,
            mut e_debt,
        ) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for e in &book.entries {
            e_hold_id.push(e.hold_id.as_deref());
            e_bucket.push(e.bucket_id.as_deref());
            e_kind.push(e.kind.as_str());
            e_avail.push(e.available_delta);
            e_held_delta.push(e.held_delta);
            e_reason.push(e.reason.as_str());
            e_debt.push(e.debt_delta);
        }
        sqlx::query(WRITE_BOOK_SQL)
            .bind(nb.id)
            .bind(nb.account)
            .bind(nb.source)
            .bind(nb.granted)
            .bind(nb.remaining)
            .bind(nb.held)
            .bind(nb.expired)
            .bind(nb.expires_at)
            .bind(nb.priority)
            .bind(nb.period)
            .bind(nb.reason)
            .bind(nb.created_at)
            .bind(ub_id)
            .bind(ub_rem)
            .bind(ub_held)
            .bind(ub_exp)
            .bind(nh.id)
            .bind(nh.account)
            .bind(nh.amount)
            .bind(nh.metadata)
            .bind(nh.created_at)
            .bind(nh.expires_at)
            .bind(nh.state)
            .bind(nh.committed)
            .bind(nh.refunded)
            .bind(nh.resolved_at)
            .bind(uh.id)
            .bind(uh.state)
            .bind(uh.committed)
            .bind(uh.refunded)
            .bind(uh.expires_at)
            .bind(uh.resolved_at)
            .bind(nd.hold)
            .bind(nd.seq)
            .bind(nd.bucket)
            .bind(nd.held)
            .bind(nd.consumed)
            .bind(nd.refunded)
            .bind(ud.hold)
            .bind(ud.seq)
            .bind(ud.consumed)
            .bind(ud.refunded)
            .bind(&book.account_id)
            .bind(e_hold_id)
            .bind(e_bucket)
            .bind(e_kind)
            .bind(e_avail)
            .bind(e_held_delta)
            .bind(e_reason)
            .bind(e_debt)
            .bind(book.available)
            .bind(book.held)
            .bind(&book.plan)
            .bind(book.allowance_period.as_deref())
            .bind(now)
            .bind(book.debt)
            .bind(d.account)
            .execute(&mut *self.tx)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn insert_stripe_event(
        &mut self,
        event: &StripeEvent,
        _now: DateTime<Utc>,
    ) -> StorageResult<bool> {
        let inserted = sqlx::query(
            "INSERT INTO stripe_event (event_id, type, livemode, created, effect) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT DO NOTHING RETURNING 1",
        )
        .bind(&event.event_id)
        .bind(&event.kind)
        .bind(event.livemode)
        .bind(event.created)
        .bind(&event.effect)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(map_err)?;
        Ok(inserted.is_some())
    }

    async fn account_of_customer(&mut self, customer: &str) -> StorageResult<Option<String>> {
        sqlx::query_scalar("SELECT account_id FROM stripe_customer WHERE customer_id = $1")
            .bind(customer)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(map_err)
    }

    async fn link(
        &mut self,
        account_id: &str,
        customer: &str,
        now: DateTime<Utc>,
    ) -> StorageResult<()> {
        sqlx::query("INSERT INTO stripe_customer (account_id, customer_id, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(account_id)
            .bind(customer)
            .bind(now)
            .execute(&mut *self.tx)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn put_subscription(
        &mut self,
        account_id: &str,
        s: &crate::stripe::event::SubscriptionState,
    ) -> StorageResult<bool> {
        let done = sqlx::query(
            "UPDATE stripe_customer SET subscription_id = $2, status = $3, plan = $4, current_period_end = $5,
                    cancel_at_period_end = $6, state_as_of = $7
             WHERE account_id = $1 AND state_as_of <= $7",
        )
        .bind(account_id)
        .bind(&s.subscription)
        .bind(&s.status)
        .bind(&s.plan)
        .bind(s.period_end)
        .bind(s.cancel_at_period_end)
        .bind(s.as_of)
        .execute(&mut *self.tx)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn set_subscription_status(&mut self, customer: &str, status: &str) -> StorageResult<()> {
        sqlx::query("UPDATE stripe_customer SET status = $2 WHERE customer_id = $1")
            .bind(customer)
            .bind(status)
            .execute(&mut *self.tx)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn fact(
        &mut self,
        business_key: &str,
    ) -> StorageResult<Option<(String, i64, Option<String>)>> {
        sqlx::query_as(
            "SELECT state, credits, account_id FROM stripe_fact WHERE business_key = $1 FOR UPDATE",
        )
        .bind(business_key)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(map_err)
    }

    async fn purchase_by_payment_intent(
        &mut self,
        payment_intent: &str,
    ) -> StorageResult<Option<(String, i64)>> {
        sqlx::query_as(
            "SELECT account_id, credits FROM stripe_fact
             WHERE payment_intent = $1 AND state = 'granted' AND account_id IS NOT NULL LIMIT 1",
        )
        .bind(payment_intent)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(map_err)
    }

    async fn set_fact_payment(
        &mut self,
        business_key: &str,
        payment_intent: &str,
        amount_paid: i64,
    ) -> StorageResult<()> {
        sqlx::query(
            "UPDATE stripe_fact SET payment_intent = $2, amount_paid = $3 WHERE business_key = $1",
        )
        .bind(business_key)
        .bind(payment_intent)
        .bind(amount_paid)
        .execute(&mut *self.tx)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn fact_state(&mut self, business_key: &str) -> StorageResult<Option<String>> {
        sqlx::query_scalar("SELECT state FROM stripe_fact WHERE business_key = $1 FOR UPDATE")
            .bind(business_key)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(map_err)
    }

    async fn put_fact(
        &mut self,
        business_key: &str,
        account_id: Option<&str>,
        state: &str,
        credits: i64,
        grant_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> StorageResult<()> {
        sqlx::query(
            "INSERT INTO stripe_fact (business_key, account_id, state, credits, grant_id, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $6)
             ON CONFLICT (business_key) DO UPDATE SET account_id = COALESCE(EXCLUDED.account_id, stripe_fact.account_id),
                 state = EXCLUDED.state, credits = EXCLUDED.credits, grant_id = EXCLUDED.grant_id, updated_at = EXCLUDED.updated_at",
        )
        .bind(business_key)
        .bind(account_id)
        .bind(state)
        .bind(credits)
        .bind(grant_id)
        .bind(now)
        .execute(&mut *self.tx)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn commit(self: Box<Self>) -> StorageResult<()> {
        self.tx.commit().await.map_err(map_err)
    }
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
    Option<String>,
);

macro_rules! entries_sql {
    ($order:literal) => {
        concat!(
            "SELECT entry_id, account_id, hold_id, kind, available_delta, held_delta, reason, created_at, bucket_id
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

super::book_ops!(PgStore, {
    async fn used_since(&self, account_id: &AccountId, since: DateTime<Utc>) -> StorageResult<i64> {
        let used: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(-SUM(available_delta + held_delta), 0) AS BIGINT) FROM entry
             WHERE account_id = $1 AND created_at >= $2 AND kind IN ('commit', 'refund')",
        )
        .bind(account_id.as_str())
        .bind(since)
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(used)
    }

    async fn grants(&self, account_id: &AccountId) -> StorageResult<Vec<Bucket>> {
        self.balance(account_id).await?;
        let mut v: Vec<Bucket> = sqlx::query(
            "SELECT * FROM bucket WHERE account_id = $1 AND (remaining > 0 OR held > 0)",
        )
        .bind(account_id.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?
        .iter()
        .map(bucket_from_row)
        .collect::<StorageResult<_>>()?;
        v.sort_by(consumption_order);
        Ok(v)
    }

    async fn expire_due(&self, limit: u32) -> StorageResult<u64> {
        // One short transaction per account: the same settle every operation does first.
        let accounts: Vec<String> = sqlx::query_scalar(
            "SELECT account_id FROM hold WHERE state = 'open' AND expires_at <= now()
             UNION
             SELECT account_id FROM bucket WHERE remaining > 0 AND expires_at <= now()
             LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let mut total = 0u64;
        for account in accounts {
            total = total
                .saturating_add(super::settle(self.begin().await?, &account, &self.policy).await?);
        }
        Ok(total)
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
                    bucket_id,
                )| {
                    Ok(EntryRecord {
                        entry_id,
                        account_id,
                        hold_id,
                        bucket_id,
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

    async fn customer_of(&self, account_id: &AccountId) -> StorageResult<Option<String>> {
        sqlx::query_scalar("SELECT customer_id FROM stripe_customer WHERE account_id = $1")
            .bind(account_id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn link_customer(
        &self,
        account_id: &AccountId,
        customer_id: &str,
    ) -> StorageResult<String> {
        sqlx::query("INSERT INTO account (account_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(account_id.as_str())
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        sqlx::query("INSERT INTO stripe_customer (account_id, customer_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(account_id.as_str())
            .bind(customer_id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        self.customer_of(account_id)
            .await?
            .ok_or_else(|| StorageError::Other("customer link vanished".into()))
    }

    async fn purchases(
        &self,
        account_id: &AccountId,
        limit: u32,
    ) -> StorageResult<Vec<(String, i64, DateTime<Utc>)>> {
        sqlx::query_as(
            "SELECT business_key, credits, created_at FROM stripe_fact
             WHERE account_id = $1 AND state = 'granted' ORDER BY created_at DESC LIMIT $2",
        )
        .bind(account_id.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)
    }

    async fn subscription_of(
        &self,
        account_id: &AccountId,
    ) -> StorageResult<Option<SubscriptionRow>> {
        sqlx::query_as(
            "SELECT subscription_id, status, plan, current_period_end, cancel_at_period_end FROM stripe_customer
             WHERE account_id = $1 AND subscription_id IS NOT NULL",
        )
        .bind(account_id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)
    }

    async fn ping(&self) -> StorageResult<()> {
        use sqlx::Connection as _;
        // A connection of its own: under load every pooled connection may be busy, which is
        // not the database being down.
        let mut conn = sqlx::PgConnection::connect_with(&self.options)
            .await
            .map_err(map_err)?;
        sqlx::query("SELECT 1")
            .execute(&mut conn)
            .await
            .map_err(map_err)?;
        let _ = conn.close().await;
        Ok(())
    }

    async fn stats(&self) -> StorageResult<super::StoreStats> {
        let open_holds: i64 = sqlx::query_scalar("SELECT count(*) FROM hold WHERE state = 'open'")
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        let idle = u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX);
        Ok(super::StoreStats {
            open_holds,
            pool_size: self.pool.size(),
            pool_idle: idle,
            pool_max: self.pool.options().get_max_connections(),
        })
    }
});
