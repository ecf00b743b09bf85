//! The PostgreSQL side of group commit ([`crate::storage::batch`]): a batch of job-path
//! commands in one transaction, with one statement per step for the whole batch.
//!
//! One statement looks the idempotency keys up, locks every account row the batch touches, in
//! id order (so two batches cannot deadlock on accounts), and loads the books
//! ([`LOOKUP_LOCK_LOAD`], which tells when its loads are stale). The domain's rules run per
//! command, in arrival order, on the locked books. The write ([`write_statement`]) inserts the
//! records of the keys with their outcomes: unlike one command's claim-then-update, a key
//! gets one row version, and a duplicate in flight elsewhere is caught by the primary key
//! there (the group then runs again). Four round trips: BEGIN, the first statement, the
//! write, COMMIT.
//!
//! That locked transaction is the fallback. First, a group runs on kept books
//! ([`crate::storage::cache`], [`PgStore::kept_group`]): the books this process wrote, with their
//! account row's version, written back in one statement in autocommit that checks each
//! version ([`write_statement`], checked): one round trip for a group whose accounts are kept.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{
    CONNECT_TIMEOUT, Columns, PgStore, bucket_from, col, commit_err, draw_from, hold_from, map_err,
    metadata_json,
};
use crate::domain::LedgerError;
use crate::domain::book::{Book, Draw, Grant};
use crate::domain::command::Target;
use crate::storage::batch::{Answer, Executor, Job, JobSteps};
use crate::storage::cache::{Cached, Lease};
use crate::storage::{Applied, RandomIds, StorageError, StorageResult, replay};

/// The loads' common expressions: live grants of the accounts in `accounts`, their open holds
/// (every one, not only those past expiry: a book kept in memory must know them all, to expire
/// them and to find their account) and the holds in `named`, their draws, the grants those
/// name, and each account's current allowance grant (`periods`). (`= ANY(ARRAY(...))` rather than `IN (SELECT ...)`:
/// the planner cannot estimate a CTE's rows and chose sequential scans of `draw` and `bucket`
/// for the latter.)
macro_rules! load_ctes {
    () => {
        "
h AS (
  SELECT * FROM hold WHERE account_id = ANY((SELECT account_ids FROM accounts)::text[])
    AND state = 'open'
  UNION ALL
  SELECT * FROM hold WHERE hold_id = ANY((SELECT hold_ids FROM named)::text[])),
d AS (SELECT * FROM draw WHERE hold_id = ANY(ARRAY(SELECT hold_id FROM h))),
b AS (
  SELECT * FROM bucket WHERE account_id = ANY((SELECT account_ids FROM accounts)::text[]) AND live
  UNION ALL
  SELECT b.* FROM bucket b JOIN periods p ON b.account_id = p.account_id AND b.period = p.period
  WHERE NOT b.live
  UNION ALL
  SELECT * FROM bucket WHERE bucket_id = ANY(ARRAY(SELECT bucket_id FROM d)) AND NOT live)"
    };
}

/// The loaded rows, one per grant (`t` = 'b'), hold ('h') and draw ('d'), in one layout: five
/// text, four bigint, one integer and three timestamp columns, used as [`Rows`] uses them for
/// writes. A hold can come twice, and so can a grant. (The names count where these rows come
/// first; after [`LOOKUP_LOCK_LOAD`]'s own rows they are ignored.)
macro_rules! load_rows {
    () => {
        "
SELECT 'b' AS t, bucket_id AS s1, account_id AS s2, source AS s3, period AS s4, reason AS s5,
       granted AS i1, remaining AS i2, held AS i3, expired AS i4, priority AS n,
       expires_at AS t1, created_at AS t2, NULL::timestamptz AS t3
  FROM b
UNION ALL
SELECT 'h', hold_id, account_id, metadata, state, NULL, amount, committed_amount,
       refunded_amount, NULL, NULL, created_at, expires_at, resolved_at
  FROM h
UNION ALL
SELECT 'd', hold_id, bucket_id, NULL, NULL, NULL, held, consumed, refunded, NULL, seq, NULL,
       NULL, NULL
  FROM d"
    };
}

/// Looks the keys up (`$1`, `$2`), locks the accounts (`$3`, and those of the holds `$4`) in
/// id order and loads what their commands need, in one statement and one round trip. Rows (the
/// layout of `load_rows!`): one per key already recorded (`t` = 'k': caller, key, response and
/// the fingerprint in hex in `s1..s4`), one per locked account ('a': id, plan and allowance
/// period in `s1..s3`, available, held, debt and version in `i1..i4`), each with the transaction's clock
/// in `t1`, then the loaded grants, holds and draws.
///
/// A key is not claimed here: the write inserts its record, with the response, once the
/// command has run (one row version instead of an insert and an update). A key that another
/// transaction records meanwhile (a client's retry racing its first try in another group)
/// makes that insert fail on the primary key: the group is then run again, and finds the
/// record ([`Executor::group`]'s caller retries a [`StorageError::Contended`] once).
///
/// The loads read the statement's snapshot, taken before the locks were granted: if another
/// transaction changed an account and committed in between (this one waited for its lock),
/// they are stale. The lock returns the account row's newest version, the snapshot its
/// version then; `n` = 1 says they are the same tuple (same `ctid`). Every writer of an
/// account's grants, holds or draws also writes its account row ([`Dirty::any`]), so the
/// same tuple means nothing the loads read has moved; otherwise the caller loads again
/// ([`LOAD_BOOKS`], a new snapshot under the locks now held).
///
/// [`Dirty::any`]: crate::domain::book::Dirty::any
const LOOKUP_LOCK_LOAD: &str = concat!(
    "
WITH found AS MATERIALIZED (
  SELECT r.caller, r.idempotency_key, r.response, r.fingerprint
  FROM UNNEST($1::text[], $2::text[]) AS k(caller, idempotency_key)
  JOIN idempotency_record r ON r.caller = k.caller AND r.idempotency_key = k.idempotency_key),
named AS (SELECT $4::text[] AS hold_ids),
accounts AS MATERIALIZED (
  SELECT $3::text[] || ARRAY(SELECT account_id FROM hold WHERE hold_id = ANY($4)) AS account_ids),
locked AS MATERIALIZED (
  SELECT account_id, plan, allowance_period, available, held, debt, version, ctid AS c FROM account
  WHERE account_id = ANY((SELECT account_ids FROM accounts)::text[])
  ORDER BY account_id FOR UPDATE),
periods AS MATERIALIZED (
  SELECT account_id, allowance_period AS period, ctid AS c FROM account
  WHERE account_id = ANY((SELECT account_ids FROM accounts)::text[])),",
    load_ctes!(),
    "
SELECT 'k' AS t, caller AS s1, idempotency_key AS s2, response AS s3,
       encode(fingerprint, 'hex') AS s4, NULL::text AS s5, NULL::int8 AS i1, NULL::int8 AS i2,
       NULL::int8 AS i3, NULL::int8 AS i4, NULL::int4 AS n, now() AS t1, NULL::timestamptz AS t2,
       NULL::timestamptz AS t3
  FROM found
UNION ALL
SELECT 'a', l.account_id, l.plan, l.allowance_period, NULL, NULL, l.available, l.held, l.debt,
       l.version, COALESCE(p.c = l.c, false)::int4, now(), NULL, NULL
  FROM locked l LEFT JOIN periods p ON p.account_id = l.account_id
UNION ALL",
    load_rows!()
);

/// How a worker's connection plans. The job path's statements look rows up by key, so an
/// index scan and a nested loop are right for them at any table size; planning them anew on
/// every call cost a third of the database's CPU at 64 clients (perf: `GetCachedPlan`), and a
/// generic plan left to the planner and cached while the tables were small kept sequential
/// scans and hash joins as they grew (the load took 5.3-7.1 ms a call instead of 1.5 ms).
/// So: one generic plan per statement, with sequential scans and hash and merge joins ruled
/// out (bitmap scans stay: a grant lookup ORs two partial indexes), and no JIT (a plan that
/// must still scan a table costs more than the JIT threshold). Measured, four alternating
/// runs at 64 clients: 836 and 963 pairs/s against 693 and 565 with custom plans. Re-planning
/// ([`FIRST_REPLAN`]) does not make the rules redundant: generic plans from real table sizes
/// but without them gave 796 and 868 pairs/s against 3,009 and 2,862 (1.8 against 0.33 ms of
/// PostgreSQL's CPU per pair; why those plans are worse was not looked into).
const WORKER_SESSION: &str = "SET plan_cache_mode = force_generic_plan;
SET enable_seqscan = off; SET enable_hashjoin = off; SET enable_mergejoin = off; SET jit = off";

/// A key's record found by the lookup: its fingerprint and stored outcome.
type Recorded<'r> = (Vec<u8>, Option<&'r str>);

#[async_trait]
impl Executor for PgStore {
    async fn group(
        &self,
        worker: usize,
        jobs: &[Job],
        _steps: JobSteps,
    ) -> StorageResult<Vec<Answer>> {
        let mut session = self.session(worker).await?;
        let conn = &mut session.as_mut().ok_or_else(no_session)?.conn;
        let jobs: Vec<&Job> = jobs.iter().collect();
        let result = if self.books.enabled() && !self.contention.bypassing() {
            self.kept_group(conn, &jobs).await
        } else {
            self.group_tx(conn, &jobs).await
        };
        match &result {
            // The transaction was dropped, its ROLLBACK queued ahead of the connection's next
            // statement: the connection stays for the retry.
            Ok(_) | Err(StorageError::Contended) => {}
            // Closed (with its transaction); the next group opens another.
            Err(_) => *session = None,
        }
        result
    }

    /// The fallback when a group fails as a whole: the one-call path, each job in its own
    /// transaction.
    async fn alone(&self, worker: usize, job: &Job, steps: JobSteps) -> Answer {
        let mut session = self.session(worker).await?;
        let conn = &mut session.as_mut().ok_or_else(no_session)?.conn;
        let result = match sqlx::Connection::begin(&mut *conn).await {
            Ok(tx) => {
                let tx: Box<dyn crate::storage::Tx + '_> = Box::new(super::PgTx {
                    tx,
                    policy: std::sync::Arc::clone(&self.policy),
                    wake: std::sync::Arc::clone(&self.wake),
                    emitted: false,
                    announcer: std::sync::Arc::clone(&self.announcer),
                    changed: Vec::new(),
                });
                crate::storage::batch::one(tx, job, steps, &self.policy).await
            }
            Err(e) => Err(map_err(e)),
        };
        // A transaction dropped without COMMIT (a refusal, a replay, an error) leaves its
        // ROLLBACK queued on the connection, unsent: until it goes, the transaction keeps
        // its row locks. Send it now; a connection that cannot take it is replaced.
        let open = !matches!(&result, Ok(a) if !a.replayed);
        if open && sqlx::Connection::ping(&mut *conn).await.is_err() {
            *session = None;
        }
        result
    }
}

fn no_session() -> StorageError {
    StorageError::Other("group worker without a connection".into())
}

/// A group worker's connection and when its statements were last planned.
#[derive(Debug)]
pub(super) struct Session {
    conn: sqlx::PgConnection,
    planned: Instant,
    /// Time until the next re-plan: doubles from [`FIRST_REPLAN`] up to [`REPLAN_EVERY`].
    replan_after: Duration,
}

/// A generic plan is made once, from the table sizes of that moment, and kept for the
/// connection's life. Made while a table was empty (a new database, whose empty tables
/// autovacuum has analyzed), it looked holds up by scanning a whole index, or joined the
/// updates with a table as the outer side: each group read every hold and draw ever made, and
/// throughput fell the longer a run went (1,039 pairs/s over 3 s, 779 over 10 s, against
/// 2,600-2,840 with plans made again). So each worker drops its cached statements after 1 s,
/// 2 s, 4 s, ... and then every [`REPLAN_EVERY`]: a handful of prepares each time. (The
/// updates also name their rows with `= ANY`, so even such a plan finds them by index.)
const FIRST_REPLAN: Duration = Duration::from_secs(1);
const REPLAN_EVERY: Duration = Duration::from_mins(1);

impl PgStore {
    /// Worker `worker`'s connection, opened on first use or after an error, its cached plans
    /// dropped when they are due to be made again.
    async fn session(
        &self,
        worker: usize,
    ) -> StorageResult<tokio::sync::MutexGuard<'_, Option<Session>>> {
        let mut slot = self.sessions[worker % self.sessions.len()].lock().await;
        if let Some(s) = slot
            .as_mut()
            .filter(|s| s.planned.elapsed() >= s.replan_after)
        {
            let cleared = sqlx::Connection::clear_cached_statements(&mut s.conn).await;
            s.planned = Instant::now();
            s.replan_after = (s.replan_after * 2).min(REPLAN_EVERY);
            if cleared.is_err() {
                *slot = None;
            }
        }
        if slot.is_none() {
            // Opened here, not taken from the pool, so its socket belongs to the worker's own
            // runtime (see `Batcher::spawn`).
            let mut conn = tokio::time::timeout(
                CONNECT_TIMEOUT,
                <sqlx::PgConnection as sqlx::Connection>::connect_with(&self.options),
            )
            .await
            .map_err(|_| StorageError::Unavailable("connecting a group worker timed out".into()))?
            .map_err(map_err)?;
            sqlx::raw_sql(WORKER_SESSION)
                .execute(&mut conn)
                .await
                .map_err(map_err)?;
            *slot = Some(Session {
                conn,
                planned: Instant::now(),
                replan_after: FIRST_REPLAN,
            });
        }
        Ok(slot)
    }

    /// Runs the batch in one transaction; per-job answers, or an error for the whole batch
    /// (then nothing was written).
    #[allow(clippy::too_many_lines)] // the steps of one transaction, in order
    async fn group_tx(
        &self,
        conn: &mut sqlx::PgConnection,
        jobs: &[&Job],
    ) -> StorageResult<Vec<Answer>> {
        let mut tx = sqlx::Connection::begin(conn).await.map_err(map_err)?;

        // 1. Look every key up, lock every account named or owning a hold named, and load
        // their books, in one statement ([`LOOKUP_LOCK_LOAD`]).
        let callers: Vec<&str> = jobs.iter().map(|j| j.idem.caller.as_str()).collect();
        let keys: Vec<&str> = jobs.iter().map(|j| j.idem.key.as_str()).collect();
        let mut accounts: Vec<&str> = Vec::new();
        let mut holds: Vec<&str> = Vec::new();
        for j in jobs {
            match j.cmd.target() {
                Target::Account { id, .. } | Target::PlanSwitch(id) => accounts.push(id),
                Target::Hold(h) => holds.push(h),
            }
        }
        let rows = sqlx::query(LOOKUP_LOCK_LOAD)
            .bind(&callers)
            .bind(&keys)
            .bind(&accounts)
            .bind(&holds)
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?;
        // Recorded keys, borrowed from the rows.
        let mut found: HashMap<(&str, &str), Recorded<'_>> = HashMap::new();
        let mut books: BTreeMap<String, Book> = BTreeMap::new();
        let mut versions: HashMap<String, i64> = HashMap::new();
        let mut now: Option<DateTime<Utc>> = None;
        let mut stale = false;
        for row in &rows {
            let k = kind(row);
            if k == b'k' {
                now = Some(col(row, "t1")?);
                let print = hex::decode(col::<&str>(row, "s4")?).map_err(|_| {
                    StorageError::Other("unreadable idempotency fingerprint".into())
                })?;
                found.insert((col(row, "s1")?, col(row, "s2")?), (print, col(row, "s3")?));
            } else if k == b'a' {
                stale |= col::<i32>(row, "n")? == 0;
                now = Some(take_account(row, &mut books, &mut versions)?);
            }
        }

        // 3. What the commands need: loaded with the locks, or again if that was stale.
        let now = match now {
            Some(n) => n,
            None => sqlx::query_scalar("SELECT now()")
                .fetch_one(&mut *tx)
                .await
                .map_err(map_err)?,
        };
        if stale {
            metrics::counter!("tally_db_group_reloads_total").increment(1);
            self.load_books(&mut tx, &mut books, &holds).await?;
        } else {
            place_loaded(&mut books, &rows)?;
        }
        let hold_accounts: HashMap<String, String> = books
            .values()
            .flat_map(|b| b.holds.values())
            .map(|h| (h.hold_id.clone(), h.account_id.clone()))
            .collect();

        // 4. The rules, per command in arrival order; a rejected command is undone.
        let mut answers: Vec<Answer> = Vec::with_capacity(jobs.len());
        let mut stored: Vec<(usize, String)> = Vec::new();
        for (i, j) in jobs.iter().enumerate() {
            if let Some((f, r)) = found.get(&(j.idem.caller.as_str(), j.idem.key.as_str())) {
                answers.push(replay(&j.idem, f, *r));
                continue;
            }
            let account = match j.cmd.target() {
                Target::Account { id, .. } | Target::PlanSwitch(id) => Some(id.to_owned()),
                Target::Hold(h) => hold_accounts.get(h).cloned(),
            };
            let result = match account {
                None => Err(LedgerError::HoldNotFound),
                Some(a) => match books.get_mut(&a) {
                    None => Err(LedgerError::AccountNotFound),
                    Some(book) => {
                        let allowance = self.policy.for_plan(&book.plan);
                        j.cmd.settle_and_apply(book, allowance, now, &mut RandomIds)
                    }
                },
            };
            match result {
                Ok(out) => {
                    stored.push((i, crate::storage::to_record(out.clone())?));
                    answers.push(Ok(Applied::fresh(out)));
                }
                // A rejection leaves no record, as if the call had run alone and rolled back.
                Err(e) => answers.push(Err(e.into())),
            }
        }

        // 5. Write every book's changes and the outcomes' records, in one statement.
        let responses = records_of(jobs, &mut stored);
        let written: Vec<(&Book, i64)> = books.values().map(|b| (b, 0)).collect();
        let emitted = write_books(&mut tx, &written, now, &responses, false, &self.policy).await?;
        tx.commit().await.map_err(commit_err)?;
        if emitted {
            self.wake.notify_one();
        }
        self.clock.observe(now);
        // What was read and written under the locks is the stored book: keep it. (A written
        // account row moved its version once.)
        for (id, mut book) in books {
            let version =
                versions.get(&id).copied().unwrap_or_default() + i64::from(book.dirty.any());
            if book.dirty.account {
                self.announcer.changed(&id, Some(version));
            }
            book.trim_to_loaded();
            self.books.offer(Cached { version, book });
        }
        Ok(answers)
    }

    /// A group on kept books ([`crate::storage::cache::BookCache`]): the accounts' books taken out of the cache, or
    /// read without locks ([`READ_BOOKS`]) when not kept, the rules applied, and every change
    /// written in one statement in autocommit that updates each account only at the version its
    /// book was read at ([`write_statement`], checked). On a warm cache a group is that one statement: one
    /// round trip and one WAL flush. A command the rules refuse, or whose hold no book knows,
    /// runs after it in a locked transaction ([`PgStore::group_tx`]), where a refusal is
    /// confirmed on the stored rows; when the write finds a version moved (another replica,
    /// the sweeper) or a key already recorded (a retry), nothing of it stays and the whole
    /// group runs there instead.
    async fn kept_group(
        &self,
        conn: &mut sqlx::PgConnection,
        jobs: &[&Job],
    ) -> StorageResult<Vec<Answer>> {
        let (mut lease, hold_account, now) = self.lease_books(conn, jobs).await?;

        // 2. The rules, per command in arrival order, on the leased books.
        let mut answers: Vec<Option<Answer>> = Vec::with_capacity(jobs.len());
        let mut later: Vec<usize> = Vec::new();
        let mut stored: Vec<(usize, String)> = Vec::new();
        let mut used: BTreeSet<String> = BTreeSet::new();
        for (i, j) in jobs.iter().enumerate() {
            let account = match j.cmd.target() {
                Target::Account { id, .. } | Target::PlanSwitch(id) => Some(id.to_owned()),
                Target::Hold(h) => hold_account.get(h).cloned().or_else(|| {
                    // Made by an earlier command of this group.
                    lease
                        .books
                        .iter()
                        .find(|(_, c)| c.book.holds.contains_key(h))
                        .map(|(a, _)| a.clone())
                }),
            };
            let applied = account.and_then(|a| {
                let c = lease.books.get_mut(&a)?;
                let allowance = self.policy.for_plan(&c.book.plan);
                let out = j
                    .cmd
                    .settle_and_apply(&mut c.book, allowance, now, &mut RandomIds)
                    .ok()?;
                Some((a, out))
            });
            if let Some((a, out)) = applied {
                let record = match crate::storage::to_record(out.clone()) {
                    Ok(r) => r,
                    Err(e) => {
                        // The books hold changes that will not be written: forget them, or
                        // the next group on them would write those changes too.
                        lease.forget();
                        return Err(e);
                    }
                };
                stored.push((i, record));
                answers.push(Some(Ok(Applied::fresh(out))));
                used.insert(a);
            } else {
                answers.push(None);
                later.push(i);
            }
        }

        // 3. One statement, checked against the versions read.
        if !stored.is_empty() {
            let responses = records_of(jobs, &mut stored);
            let written: Vec<(&Book, i64)> = used
                .iter()
                .filter_map(|a| lease.books.get(a).map(|c| (&c.book, c.version)))
                .collect();
            let written_result =
                write_books(conn, &written, now, &responses, true, &self.policy).await;
            self.contention
                .record(matches!(written_result, Err(StorageError::Contended)));
            match written_result {
                Ok(emitted) => {
                    if emitted {
                        self.wake.notify_one();
                    }
                    for a in &used {
                        if let Some(c) = lease.books.get_mut(a) {
                            c.version += 1;
                            if c.book.dirty.account {
                                self.announcer.changed(a, Some(c.version));
                            }
                        }
                    }
                }
                Err(e) => {
                    lease.forget();
                    drop(lease);
                    return match e {
                        StorageError::Contended => {
                            metrics::counter!("tally_db_book_conflicts_total").increment(1);
                            self.group_tx(conn, jobs).await
                        }
                        e => Err(e),
                    };
                }
            }
        }
        for c in lease.books.values_mut() {
            c.book.trim_to_loaded();
        }
        drop(lease);

        // 4. The rest under row locks.
        if !later.is_empty() {
            let rest: Vec<&Job> = later.iter().map(|&i| jobs[i]).collect();
            for (i, answer) in later.into_iter().zip(self.group_tx(conn, &rest).await?) {
                answers[i] = Some(answer);
            }
        }
        answers
            .into_iter()
            .map(|a| a.ok_or_else(|| StorageError::Other("a group command went unanswered".into())))
            .collect()
    }

    /// The books of a group's accounts (named, or owning a kept open hold) on a lease: those
    /// kept, and the others, with the accounts of holds no kept book knows, read in one
    /// statement ([`READ_BOOKS`]). Also each known hold's account, and the clock to run at.
    async fn lease_books(
        &self,
        conn: &mut sqlx::PgConnection,
        jobs: &[&Job],
    ) -> StorageResult<(Lease<'_>, HashMap<String, String>, DateTime<Utc>)> {
        let mut accounts: Vec<&str> = Vec::new();
        let mut holds: Vec<&str> = Vec::new();
        for j in jobs {
            match j.cmd.target() {
                Target::Account { id, .. } | Target::PlanSwitch(id) => accounts.push(id),
                Target::Hold(h) => holds.push(h),
            }
        }
        let mut unknown: Vec<&str> = Vec::new();
        let mut hold_account: HashMap<String, String> = HashMap::new();
        for (h, a) in holds.iter().zip(self.books.hold_accounts(&holds)) {
            match a {
                Some(a) => {
                    hold_account.insert((*h).to_owned(), a);
                }
                None => unknown.push(h),
            }
        }
        accounts.extend(hold_account.values().map(String::as_str));
        accounts.sort_unstable();
        accounts.dedup();
        let mut lease = self.books.lease(&accounts).await;
        let missing: Vec<&str> = accounts
            .iter()
            .copied()
            .filter(|a| !lease.books.contains_key(*a))
            .collect();
        let mut now = None;
        if !missing.is_empty() || !unknown.is_empty() {
            metrics::counter!("tally_db_book_reads_total").increment(1);
            let rows = sqlx::query(READ_BOOKS)
                .bind(&missing)
                .bind(&unknown)
                .fetch_all(&mut *conn)
                .await
                .map_err(map_err)?;
            let mut books: BTreeMap<String, Book> = BTreeMap::new();
            let mut versions: HashMap<String, i64> = HashMap::new();
            for row in rows.iter().filter(|r| kind(r) == b'a') {
                now = Some(take_account(row, &mut books, &mut versions)?);
            }
            place_loaded(&mut books, &rows)?;
            for (id, book) in books {
                // Read now, so newer than a kept one; an account out on another worker's
                // lease (found through a hold) is left to the locked transaction.
                if lease.try_add(&id) {
                    for h in book.holds.keys() {
                        hold_account.insert(h.clone(), id.clone());
                    }
                    let version = versions.get(&id).copied().unwrap_or_default();
                    lease.books.insert(id, Cached { version, book });
                }
            }
        }
        let now = match now {
            Some(n) => {
                self.clock.observe(n);
                n
            }
            None => self.clock.now(),
        };
        Ok((lease, hold_account, now))
    }

    /// Loads the books again, under the locks this transaction holds ([`LOAD_BOOKS`]).
    async fn load_books(
        &self,
        tx: &mut sqlx::PgConnection,
        books: &mut BTreeMap<String, Book>,
        named: &[&str],
    ) -> StorageResult<()> {
        let ids: Vec<&str> = books.keys().map(String::as_str).collect();
        let (pa, pp): (Vec<&str>, Vec<&str>) = books
            .values()
            .filter_map(|b| {
                b.allowance_period
                    .as_deref()
                    .map(|p| (b.account_id.as_str(), p))
            })
            .unzip();
        let rows = sqlx::query(LOAD_BOOKS)
            .bind(&ids)
            .bind(named)
            .bind(&pa)
            .bind(&pp)
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?;
        place_loaded(books, &rows)
    }
}

/// Puts loaded grants, holds and draws (rows of `load_rows!`) into their books; other rows and rows
/// of accounts not locked are passed over.
fn place_loaded(
    books: &mut BTreeMap<String, Book>,
    rows: &[sqlx::postgres::PgRow],
) -> StorageResult<()> {
    // Holds first: a draw belongs to a book through its hold.
    let mut hold_account: HashMap<String, String> = HashMap::new();
    for r in rows.iter().filter(|r| kind(r) == b'h') {
        let h = hold_from(r, &LOADED_HOLD)?;
        if let Some(book) = books.get_mut(&h.account_id) {
            hold_account.insert(h.hold_id.clone(), h.account_id.clone());
            book.holds.entry(h.hold_id.clone()).or_insert(h);
        }
    }
    for r in rows {
        match kind(r) {
            b'b' => {
                let b = bucket_from(r, &LOADED_BUCKET)?;
                if let Some(book) = books.get_mut(&b.account_id) {
                    book.grants.insert(b.grant_id.clone(), b);
                }
            }
            b'd' => {
                let d = draw_from(r, &LOADED_DRAW)?;
                if let Some(book) = hold_account.get(&d.hold_id).and_then(|a| books.get_mut(a)) {
                    book.draws.insert((d.hold_id.clone(), d.seq), d);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The loads alone, for books already locked ([`LOOKUP_LOCK_LOAD`] found them stale): accounts
/// `$1`, named holds `$2`, allowance periods `$3` (accounts) and `$4` (periods).
const LOAD_BOOKS: &str = concat!(
    "
WITH accounts AS (SELECT $1::text[] AS account_ids),
named AS (SELECT $2::text[] AS hold_ids),
periods AS (SELECT * FROM UNNEST($3::text[], $4::text[]) AS p(account_id, period)),",
    load_ctes!(),
    load_rows!()
);

fn kind(r: &sqlx::postgres::PgRow) -> u8 {
    r.try_get::<&str, _>("t")
        .ok()
        .and_then(|t| t.bytes().next())
        .unwrap_or(0)
}

/// Where group commit's load puts each table's columns (`load_rows!`).
const LOADED_HOLD: Columns<10> =
    Columns(["s1", "s2", "s3", "s4", "i1", "i2", "i3", "t1", "t2", "t3"]);
const LOADED_BUCKET: Columns<12> = Columns([
    "s1", "s2", "s3", "s4", "s5", "i1", "i2", "i3", "i4", "n", "t1", "t2",
]);
const LOADED_DRAW: Columns<6> = Columns(["s1", "s2", "i1", "i2", "i3", "n"]);

/// The idempotency records of the commands that ran (`stored`: job index and outcome), in key
/// order, so two groups that race for two keys wait in the same order.
fn records_of<'a>(jobs: &[&'a Job], stored: &'a mut [(usize, String)]) -> Responses<'a> {
    stored.sort_unstable_by(|(a, _), (b, _)| {
        let (a, b) = (&jobs[*a].idem, &jobs[*b].idem);
        (a.caller.as_str(), a.key.as_str()).cmp(&(b.caller.as_str(), b.key.as_str()))
    });
    let mut responses = Responses::default();
    for (i, r) in stored.iter() {
        let idem = &jobs[*i].idem;
        responses.caller.push(idem.caller.as_str());
        responses.key.push(idem.key.as_str());
        responses.fingerprint.push(&idem.fingerprint[..]);
        responses.response.push(r.as_str());
    }
    responses
}

/// An account row of a load ('a': id, plan, allowance period in `s1..s3`; available, held,
/// debt, version in `i1..i4`; the statement's clock in `t1`): its book, empty of grants and
/// holds, goes into `books` and its version into `versions`. Returns the clock.
fn take_account(
    row: &sqlx::postgres::PgRow,
    books: &mut BTreeMap<String, Book>,
    versions: &mut HashMap<String, i64>,
) -> StorageResult<DateTime<Utc>> {
    let mut book = Book::new(col(row, "s1")?, col(row, "s2")?);
    book.allowance_period = col(row, "s3")?;
    book.available = col(row, "i1")?;
    book.held = col(row, "i2")?;
    book.debt = col(row, "i3")?;
    versions.insert(book.account_id.clone(), col(row, "i4")?);
    books.insert(book.account_id.clone(), book);
    col(row, "t1")
}

/// The books of accounts `$1` and of the accounts of holds `$2`, read without locks in one
/// snapshot, each account row ('a', as [`LOOKUP_LOCK_LOAD`] lays it out) with its version and
/// the statement's clock, then the rows of `load_rows!`.
const READ_BOOKS: &str = concat!(
    "
WITH named AS (SELECT $2::text[] AS hold_ids),
accounts AS MATERIALIZED (
  SELECT $1::text[] || ARRAY(SELECT account_id FROM hold WHERE hold_id = ANY($2)) AS account_ids),
read AS MATERIALIZED (
  SELECT account_id, plan, allowance_period, available, held, debt, version FROM account
  WHERE account_id = ANY((SELECT account_ids FROM accounts)::text[])),
periods AS MATERIALIZED (SELECT account_id, allowance_period AS period FROM read),",
    load_ctes!(),
    "
SELECT 'a' AS t, account_id AS s1, plan AS s2, allowance_period AS s3, NULL::text AS s4,
       NULL::text AS s5, available AS i1, held AS i2, debt AS i3, version AS i4, NULL::int4 AS n,
       now() AS t1, NULL::timestamptz AS t2, NULL::timestamptz AS t3
  FROM read
UNION ALL",
    load_rows!()
);

/// How often kept books turn out stale. Replicas that write the same accounts (no affinity of
/// accounts to replicas) make most books stale, and a stale book costs a failed statement
/// before the locked transaction: measured, two replicas on uniform accounts did 0.67× one
/// replica's peak. So when more than a fifth of the checked writes of a window
/// ([`CONTENTION_WINDOW`], at least 10 writes) failed, groups go straight to the locked
/// transaction for [`CONTENTION_BYPASS`] (which keeps the books fresh meanwhile), then try
/// again.
#[derive(Debug)]
pub(super) struct Contention {
    state: std::sync::Mutex<ContentionWindow>,
}

#[derive(Debug)]
struct ContentionWindow {
    started: Instant,
    writes: u32,
    stale: u32,
    bypass_until: Option<Instant>,
}

/// See [`Contention`].
const CONTENTION_WINDOW: Duration = Duration::from_millis(500);
/// See [`Contention`].
const CONTENTION_BYPASS: Duration = Duration::from_secs(5);

impl Default for Contention {
    fn default() -> Self {
        Self {
            state: std::sync::Mutex::new(ContentionWindow {
                started: Instant::now(),
                writes: 0,
                stale: 0,
                bypass_until: None,
            }),
        }
    }
}

impl Contention {
    fn lock(&self) -> std::sync::MutexGuard<'_, ContentionWindow> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bypassing(&self) -> bool {
        let mut w = self.lock();
        match w.bypass_until {
            Some(t) if t > Instant::now() => true,
            Some(_) => {
                w.bypass_until = None;
                w.started = Instant::now();
                w.writes = 0;
                w.stale = 0;
                false
            }
            None => false,
        }
    }

    fn record(&self, stale: bool) {
        let mut w = self.lock();
        w.writes += 1;
        w.stale += u32::from(stale);
        if w.started.elapsed() >= CONTENTION_WINDOW {
            if w.writes >= 10 && w.stale * 5 > w.writes {
                w.bypass_until = Some(Instant::now() + CONTENTION_BYPASS);
                metrics::counter!("tally_db_book_bypasses_total").increment(1);
            }
            w.started = Instant::now();
            w.writes = 0;
            w.stale = 0;
        }
    }
}

/// The database's clock as this process sees it: the offset of PostgreSQL's `now()` from the
/// local clock, taken at each read, so a group on kept books (which reads nothing) still runs
/// its rules at the database's time.
#[derive(Debug, Default)]
pub(super) struct DbClock {
    offset_micros: std::sync::atomic::AtomicI64,
}

impl DbClock {
    fn observe(&self, db_now: DateTime<Utc>) {
        let offset = (db_now - Utc::now()).num_microseconds().unwrap_or(0);
        self.offset_micros
            .store(offset, std::sync::atomic::Ordering::Relaxed);
    }

    fn now(&self) -> DateTime<Utc> {
        Utc::now()
            + chrono::TimeDelta::microseconds(
                self.offset_micros
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
    }
}

/// Writes what the books' commands changed: each table's new rows in one INSERT and changed
/// rows in one UPDATE, in foreign-key order. New rows go in with their final values and are
/// left out of the updates. `checked`: every book's account row is written, only at the
/// version paired with it, or nothing is; otherwise the rows of the books that changed (under
/// the locks of a transaction). See [`write_statement`].
async fn write_books(
    tx: &mut sqlx::PgConnection,
    books: &[(&Book, i64)],
    now: DateTime<Utc>,
    responses: &Responses<'_>,
    checked: bool,
    policy: &crate::domain::plan::Policy,
) -> StorageResult<bool> {
    let mut events = super::EventColumns::default();
    let mut nb = Rows::default();
    let mut ub = Rows::default();
    let mut nh = Rows::default();
    let mut uh = Rows::default();
    let mut nd = Rows::default();
    let mut ud = Rows::default();
    let mut ne = Rows::default();
    let mut ua = Rows::default();
    let mut versions: Vec<i64> = Vec::new();
    for &(book, version) in books {
        let d = &book.dirty;
        for (b, new) in created_or_changed(&d.new_grants, &d.grants, &book.grants) {
            if new { nb.bucket(b) } else { ub.bucket(b) }
        }
        for (h, new) in created_or_changed(&d.new_holds, &d.holds, &book.holds) {
            if new { nh.hold(h)? } else { uh.hold(h)? }
        }
        for (w, new) in created_or_changed(&d.new_draws, &d.draws, &book.draws) {
            if new { nd.draw(w) } else { ud.draw(w) }
        }
        for e in &book.entries {
            ne.text[0].push(Some(book.account_id.clone()));
            ne.text[1].push(e.hold_id.clone());
            ne.text[2].push(e.grant_id.clone());
            ne.text[3].push(Some(e.kind.as_str().to_owned()));
            ne.text[4].push(Some(e.reason.clone()));
            ne.int[0].push(e.available_delta);
            ne.int[1].push(e.held_delta);
            ne.int[2].push(e.debt_delta);
        }
        events.push(
            policy,
            &crate::domain::event::of_book(book, &policy.events, now, &mut RandomIds),
        );
        if d.any() || checked {
            // Also when only a hold moved: see [`LOOKUP_LOCK_LOAD`].
            versions.push(version);
            ua.text[0].push(Some(book.account_id.clone()));
            ua.text[1].push(Some(book.plan.clone()));
            ua.text[2].push(book.allowance_period.clone());
            ua.int[0].push(book.available);
            ua.int[1].push(book.held);
            ua.int[2].push(book.debt);
        }
    }
    // One statement of the parts that have rows (a part without rows would still open its
    // table and every index of it: executor start-up was a fifth of PostgreSQL's CPU at one
    // client). Foreign keys are checked at the end of the statement, when every part's rows
    // exist. The records' insert is the statement's main part, always there.
    let present = [
        !nb.text[0].is_empty(),
        !nh.text[0].is_empty(),
        !nd.text[0].is_empty(),
        !uh.text[0].is_empty(),
        !ud.text[0].is_empty(),
        !ub.text[0].is_empty(),
        checked || !ua.text[0].is_empty(),
        !ne.text[0].is_empty(),
        !events.is_empty(),
    ];
    let mut q = sqlx::query(write_statement(checked, present));
    if present[0] {
        q = bind_new_grants(q, &nb);
    }
    if present[1] {
        q = bind_new_holds(q, &nh);
    }
    if present[2] {
        q = bind_new_draws(q, &nd);
    }
    if present[3] {
        q = bind_hold_updates(q, &uh);
    }
    if present[4] {
        q = bind_draw_updates(q, &ud);
    }
    if present[5] {
        q = bind_bucket_updates(q, &ub);
    }
    if present[6] {
        q = bind_account_updates(q, &ua, now);
        if checked {
            q = q.bind(&versions);
        }
    }
    if present[7] {
        q = bind_entries(q, &ne);
    }
    if present[8] {
        q = events.bind(q);
    }
    let q = bind_records(q, responses);
    if checked {
        // Autocommit: this statement is the commit.
        q.bind(i64::try_from(versions.len()).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await
            .map_err(commit_err)?;
    } else {
        q.execute(&mut *tx).await.map_err(map_err)?;
    }
    Ok(present[8])
}

/// A table's dirty rows, each once: the created ones (`true`, inserted with their final values)
/// and the changed ones that were not created (`false`, updated).
fn created_or_changed<'a, K: Ord, V>(
    created: &'a BTreeSet<K>,
    changed: &'a BTreeSet<K>,
    rows: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = (&'a V, bool)> + 'a {
    let new = created.iter().map(|k| (k, true));
    let old = changed
        .iter()
        .filter(|k| !created.contains(*k))
        .map(|k| (k, false));
    new.chain(old)
        .filter_map(|(k, n)| rows.get(k).map(|v| (v, n)))
}

type Q<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

const INSERT_BUCKETS: &str =
    "INSERT INTO bucket (bucket_id, account_id, source, period, reason, granted, remaining, held,
                     expired, priority, expires_at, created_at)
 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[],
                      $7::int8[], $8::int8[], $9::int8[], $10::int4[], $11::timestamptz[],
                      $12::timestamptz[])";
fn bind_new_grants<'q>(q: Q<'q>, r: &'q Rows) -> Q<'q> {
    q.bind(&r.text[0])
        .bind(&r.text[1])
        .bind(&r.text[2])
        .bind(&r.text[3])
        .bind(&r.text[4])
        .bind(&r.int[0])
        .bind(&r.int[1])
        .bind(&r.int[2])
        .bind(&r.int[3])
        .bind(&r.int4)
        .bind(&r.time[0])
        .bind(&r.time[1])
}

const INSERT_HOLDS: &str =
    "INSERT INTO hold (hold_id, account_id, metadata, state, amount, committed_amount,
                   refunded_amount, created_at, expires_at, resolved_at)
 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[],
                      $7::int8[], $8::timestamptz[], $9::timestamptz[], $10::timestamptz[])";
fn bind_new_holds<'q>(q: Q<'q>, r: &'q Rows) -> Q<'q> {
    q.bind(&r.text[0])
        .bind(&r.text[1])
        .bind(&r.text[2])
        .bind(&r.text[3])
        .bind(&r.int[0])
        .bind(&r.int[1])
        .bind(&r.int[2])
        .bind(&r.time[0])
        .bind(&r.time[1])
        .bind(&r.time[2])
}

const INSERT_DRAWS: &str = "INSERT INTO draw (hold_id, bucket_id, seq, held, consumed, refunded)
 SELECT * FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::int8[], $5::int8[], $6::int8[])";
fn bind_new_draws<'q>(q: Q<'q>, r: &'q Rows) -> Q<'q> {
    q.bind(&r.text[0])
        .bind(&r.text[1])
        .bind(&r.int4)
        .bind(&r.int[0])
        .bind(&r.int[1])
        .bind(&r.int[2])
}

const UPDATE_HOLDS: &str = "UPDATE hold h SET state = u.state, committed_amount = u.committed,
                  refunded_amount = u.refunded, expires_at = u.expires_at, resolved_at = u.resolved_at
 FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::timestamptz[], $6::timestamptz[])
      AS u(id, state, committed, refunded, expires_at, resolved_at)
 WHERE h.hold_id = u.id AND h.hold_id = ANY($1)";
fn bind_hold_updates<'q>(q: Q<'q>, r: &'q Rows) -> Q<'q> {
    q.bind(&r.text[0])
        .bind(&r.text[3])
        .bind(&r.int[1])
        .bind(&r.int[2])
        .bind(&r.time[1])
        .bind(&r.time[2])
}

const UPDATE_DRAWS: &str = "UPDATE draw w SET consumed = u.consumed, refunded = u.refunded
 FROM UNNEST($1::text[], $2::int4[], $3::int8[], $4::int8[]) AS u(hold_id, seq, consumed, refunded)
 WHERE w.hold_id = u.hold_id AND w.seq = u.seq AND w.hold_id = ANY($1)";
fn bind_draw_updates<'q>(q: Q<'q>, r: &'q Rows) -> Q<'q> {
    q.bind(&r.text[0])
        .bind(&r.int4)
        .bind(&r.int[1])
        .bind(&r.int[2])
}

const UPDATE_BUCKETS: &str =
    "UPDATE bucket b SET remaining = u.remaining, held = u.held, expired = u.expired
 FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[]) AS u(id, remaining, held, expired)
 WHERE b.bucket_id = u.id AND b.bucket_id = ANY($1)";
fn bind_bucket_updates<'q>(q: Q<'q>, r: &'q Rows) -> Q<'q> {
    q.bind(&r.text[0])
        .bind(&r.int[1])
        .bind(&r.int[2])
        .bind(&r.int[3])
}

const UPDATE_ACCOUNTS: &str =
    "UPDATE account a SET plan = u.plan, allowance_period = u.period, available = u.available,
                     held = u.held, debt = u.debt, updated_at = $7
 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[])
      AS u(id, plan, period, available, held, debt)
 WHERE a.account_id = u.id AND a.account_id = ANY($1)";
fn bind_account_updates<'q>(q: Q<'q>, r: &'q Rows, now: DateTime<Utc>) -> Q<'q> {
    q.bind(&r.text[0])
        .bind(&r.text[1])
        .bind(&r.text[2])
        .bind(&r.int[0])
        .bind(&r.int[1])
        .bind(&r.int[2])
        .bind(now)
}

const INSERT_ENTRIES: &str = "INSERT INTO entry (account_id, hold_id, bucket_id, kind, reason, available_delta, held_delta,
                    debt_delta)
 SELECT e.account_id, e.hold_id, e.bucket_id, e.kind, e.reason, e.available_delta, e.held_delta,
        e.debt_delta
 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[],
             $8::int8[]) WITH ORDINALITY
      AS e(account_id, hold_id, bucket_id, kind, reason, available_delta, held_delta, debt_delta, ord)
 ORDER BY e.ord";
fn bind_entries<'q>(q: Q<'q>, r: &'q Rows) -> Q<'q> {
    q.bind(&r.text[0])
        .bind(&r.text[1])
        .bind(&r.text[2])
        .bind(&r.text[3])
        .bind(&r.text[4])
        .bind(&r.int[0])
        .bind(&r.int[1])
        .bind(&r.int[2])
}

const INSERT_RECORDS: &str =
    "INSERT INTO idempotency_record (caller, idempotency_key, fingerprint, response)
 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::text[])";
fn bind_records<'q>(q: Q<'q>, r: &'q Responses<'q>) -> Q<'q> {
    q.bind(&r.caller)
        .bind(&r.key)
        .bind(&r.fingerprint)
        .bind(&r.response)
}

/// The idempotency records of the commands that ran: key, fingerprint and outcome.
#[derive(Default)]
struct Responses<'a> {
    caller: Vec<&'a str>,
    key: Vec<&'a str>,
    fingerprint: Vec<&'a [u8]>,
    response: Vec<&'a str>,
}

/// A batch's writes as one statement, in foreign-key order: new grants, new holds, their
/// draws, changed holds, draws, grants and accounts, entries (in order), outbox events, then the idempotency
/// records of the commands that ran (true if it wrote outbox rows); only the parts `present` says have rows (the records'
/// insert always: it is the main statement). `checked`: the account updates are
/// [`UPDATE_ACCOUNTS_AT_VERSION`] and the records' insert [`INSERT_RECORDS_CHECKED`], for a
/// group on kept books in autocommit: the accounts still at the versions read, or a
/// serialization failure (`tally_expect_accounts`, migration 0010) and nothing stays. The
/// records' insert reads the account updates first, so account rows are locked before any
/// other row, in id order (the books are), as [`LOOKUP_LOCK_LOAD`] locks them. Each shape is
/// built once and kept: its text is what each connection's statement cache keys on (at most
/// 2 × 2^9 shapes; a few in practice).
fn write_statement(checked: bool, present: [bool; 9]) -> &'static str {
    static SHAPES: [OnceLock<String>; 1024] = [const { OnceLock::new() }; 1024];
    let shape = present.iter().fold(usize::from(checked), |bits, &here| {
        (bits << 1) | usize::from(here)
    });
    SHAPES[shape].get_or_init(|| {
        let parts: [(&str, &str); 9] = [
            ("new_grants", INSERT_BUCKETS),
            ("new_holds", INSERT_HOLDS),
            ("new_draws", INSERT_DRAWS),
            ("moved_holds", UPDATE_HOLDS),
            ("moved_draws", UPDATE_DRAWS),
            ("moved_grants", UPDATE_BUCKETS),
            (
                "moved_accounts",
                if checked {
                    UPDATE_ACCOUNTS_AT_VERSION
                } else {
                    UPDATE_ACCOUNTS
                },
            ),
            ("new_entries", INSERT_ENTRIES),
            ("new_events", super::INSERT_EVENTS),
        ];
        let mut chosen: Vec<(&str, &str)> = parts
            .into_iter()
            .zip(present)
            .filter_map(|(p, here)| here.then_some(p))
            .collect();
        chosen.push((
            "records",
            if checked {
                INSERT_RECORDS_CHECKED
            } else {
                INSERT_RECORDS
            },
        ));
        chain(&chosen)
    })
}

/// [`UPDATE_ACCOUNTS`] for rows still at version `$8`, one row out per account updated.
const UPDATE_ACCOUNTS_AT_VERSION: &str =
    "UPDATE account a SET plan = u.plan, allowance_period = u.period, available = u.available,
                     held = u.held, debt = u.debt, updated_at = $7
 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[], $8::int8[])
      AS u(id, plan, period, available, held, debt, version)
 WHERE a.account_id = u.id AND a.account_id = ANY($1) AND a.version = u.version
 RETURNING 1";

/// [`INSERT_RECORDS`] once `moved_accounts` ([`UPDATE_ACCOUNTS_AT_VERSION`]) updated `$5`
/// accounts.
const INSERT_RECORDS_CHECKED: &str =
    "INSERT INTO idempotency_record (caller, idempotency_key, fingerprint, response)
 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::text[])
 WHERE tally_expect_accounts($5::int8, (SELECT count(*) FROM moved_accounts))";

/// Statements as one, `WITH a AS (..), b AS (..) main` (the last is the main statement; alone,
/// it is returned as it is), each one's parameters numbered after those of the ones before it.
fn chain(parts: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let mut offset = 0;
    let n = parts.len();
    for (i, (name, p)) in parts.iter().enumerate() {
        if i + 1 == n {
            if i > 0 {
                out.push('\n');
            }
        } else {
            out.push_str(if i == 0 { "WITH " } else { ",\n" });
            out.push_str(name);
            out.push_str(" AS (");
        }
        out.push_str(&renumber(p, offset));
        if i + 1 < n {
            out.push(')');
        }
        offset += params(p);
    }
    out
}

/// Renumbers `$n` placeholders by `offset`.
fn renumber(sql: &str, offset: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '$' {
            let mut n = String::new();
            while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                n.push(d);
                chars.next();
            }
            match n.parse::<usize>() {
                Ok(k) => out.push_str(&(k + offset).to_string()),
                Err(_) => out.push_str(&n),
            }
        }
    }
    out
}

/// Highest `$n` in a statement.
fn params(sql: &str) -> usize {
    sql.split('$')
        .skip(1)
        .filter_map(|t| {
            let d: String = t.chars().take_while(char::is_ascii_digit).collect();
            d.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

/// Column arrays of one statement's rows.
#[derive(Default)]
struct Rows {
    text: [Vec<Option<String>>; 5],
    int: [Vec<i64>; 4],
    int4: Vec<i32>,
    time: [Vec<Option<DateTime<Utc>>>; 3],
}

impl Rows {
    /// text: id, account, source, period, reason; int: granted, remaining, held, expired;
    /// int4: priority; time: expires_at, created_at.
    fn bucket(&mut self, b: &Grant) {
        self.text[0].push(Some(b.grant_id.clone()));
        self.text[1].push(Some(b.account_id.clone()));
        self.text[2].push(Some(b.source.as_str().to_owned()));
        self.text[3].push(b.period.clone());
        self.text[4].push(Some(b.reason.clone()));
        self.int[0].push(b.granted);
        self.int[1].push(b.remaining);
        self.int[2].push(b.held);
        self.int[3].push(b.expired);
        self.int4.push(b.priority);
        self.time[0].push(b.expires_at);
        self.time[1].push(Some(b.created_at));
    }

    /// text: id, account, metadata, state; int: amount, committed, refunded;
    /// time: created_at, expires_at, resolved_at.
    fn hold(&mut self, h: &crate::domain::Hold) -> StorageResult<()> {
        self.text[0].push(Some(h.hold_id.clone()));
        self.text[1].push(Some(h.account_id.clone()));
        self.text[2].push(Some(metadata_json(&h.metadata)?));
        self.text[3].push(Some(h.state.as_str().to_owned()));
        self.int[0].push(h.amount);
        self.int[1].push(h.committed_amount);
        self.int[2].push(h.refunded_amount);
        self.time[0].push(Some(h.created_at));
        self.time[1].push(Some(h.expires_at));
        self.time[2].push(h.resolved_at);
        Ok(())
    }

    /// text: hold, bucket; int4: seq; int: held, consumed, refunded.
    fn draw(&mut self, w: &Draw) {
        self.text[0].push(Some(w.hold_id.clone()));
        self.text[1].push(Some(w.grant_id.clone()));
        self.int4.push(w.seq);
        self.int[0].push(w.held);
        self.int[1].push(w.consumed);
        self.int[2].push(w.refunded);
    }
}

#[cfg(test)]
mod tests {
    use super::{chain, params, renumber};

    #[test]
    fn chained_statements_number_each_ones_parameters_after_those_before_it() {
        assert_eq!(params("UPDATE t SET a = $2 WHERE id = $1 AND b = $10"), 10);
        assert_eq!(params("SELECT 1"), 0);
        assert_eq!(
            renumber("a = $1, b = $12, c = $", 4),
            "a = $5, b = $16, c = $"
        );
        assert_eq!(
            chain(&[
                ("w1", "UPDATE x SET a = $1 WHERE id = $2"),
                ("w2", "INSERT INTO z SELECT $1"),
                ("main", "UPDATE y SET b = $1 WHERE id = $2")
            ]),
            "WITH w1 AS (UPDATE x SET a = $1 WHERE id = $2),\nw2 AS (INSERT INTO z SELECT $3)\n\
             UPDATE y SET b = $4 WHERE id = $5"
        );
        assert_eq!(chain(&[("main", "SELECT $1")]), "SELECT $1");
    }
}
