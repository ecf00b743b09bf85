//! Group commit: commands coalesced into one transaction keep their own outcomes.
//! A rejected command changes nothing and leaves no idempotency record while its neighbours
//! commit; duplicates replay; the books balance.

use std::sync::Arc;

use chrono::TimeDelta;
use tally::domain::command::Refund;
use tally::domain::{HoldId, LedgerError};
use tally::ledger::Engine;
use tally::storage::StorageError;
use tally::storage::batch::Batching;
use tally::storage::batch::GroupStats;
use tally::storage::postgres::PgStore;
use tally::storage::sqlite::SqliteStore;
use tokio::task::JoinSet;

use crate::support::{Backend, TestDb, assert_ledger_balances};
use crate::{commit_cmd, grant, idem, reserve_cmd};

#[derive(Debug)]
enum Got {
    Fresh(String),
    Replayed,
    Refused(LedgerError),
}

fn got<T>(r: Result<tally::storage::Applied<T>, StorageError>, hold: impl Fn(&T) -> String) -> Got {
    match r {
        Ok(a) if a.replayed => Got::Replayed,
        Ok(a) => Got::Fresh(hold(&a.outcome)),
        Err(StorageError::Rejected(e)) => Got::Refused(e),
        Err(e) => panic!("unexpected storage error: {e:?}"),
    }
}

/// A store with one group worker: while it runs a transaction, everything else queues and
/// goes in the next. Also returns how to read its counters.
async fn grouped(db: &TestDb, backend: Backend) -> (Engine, Box<dyn Fn() -> GroupStats>) {
    let batching = Batching {
        max: 64,
        workers: 1,
        ..Batching::default()
    };
    match backend {
        Backend::Postgres => {
            let pg = PgStore::connect_with(&db.url, 8, Arc::default(), batching)
                .await
                .unwrap();
            pg.migrate().await.unwrap();
            let engine = Engine::new(Arc::new(pg)).unwrap();
            let stats = engine.clone();
            (engine, Box::new(move || stats.group_stats().unwrap()))
        }
        Backend::Sqlite => {
            let lite = SqliteStore::connect_with(&db.url, 8, Arc::default(), batching)
                .await
                .unwrap();
            lite.migrate().await.unwrap();
            let engine = Engine::new(Arc::new(lite)).unwrap();
            let stats = engine.clone();
            (engine, Box::new(move || stats.group_stats().unwrap()))
        }
    }
}

async fn coalesced_commands_keep_their_own_outcomes(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (store, stats) = grouped(&db, backend).await;
    for a in 0..4 {
        grant(&store, &format!("a{a}"), 1_000).await;
    }
    let ttl = TimeDelta::minutes(5);

    // Wave 1: 40 affordable reserves (the first 10 sent twice), 4 too large, 2 on no account.
    let mut set = JoinSet::new();
    for i in 0..46 {
        let (acct, amount) = match i {
            0..40 => (format!("a{}", i % 4), 50),
            40..44 => (format!("a{}", i % 4), 5_000),
            _ => ("ghost".to_owned(), 1),
        };
        let cmd = reserve_cmd(&acct, amount, ttl);
        let id = idem("svc", &format!("r{i}"), cmd.fingerprint());
        for _ in 0..if i < 10 { 2 } else { 1 } {
            let (store, cmd, id) = (store.clone(), cmd.clone(), id.clone());
            set.spawn(async move {
                let r = store.reserve(&id, &cmd).await;
                (i, got(r, |o| o.hold.hold_id.clone()))
            });
        }
    }
    let mut holds: Vec<Option<String>> = vec![None; 40];
    let mut replays = 0;
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            (i @ 0..40, Got::Fresh(h)) => {
                assert!(
                    holds[i].replace(h).is_none(),
                    "reserve {i} did the work twice"
                );
            }
            (0..10, Got::Replayed) => replays += 1,
            (40..44, Got::Refused(LedgerError::InsufficientCredits { requested, .. })) => {
                assert_eq!(requested, 5_000);
            }
            (44..46, Got::Refused(LedgerError::AccountNotFound)) => {}
            other => panic!("unexpected outcome: {other:?}"),
        }
    }
    assert_eq!(replays, 10, "each duplicate replayed its first attempt");
    let holds: Vec<String> = holds.into_iter().map(Option::unwrap).collect();

    // Wave 2: commit even holds (30 of 50), release odd ones, a commit of no hold, a key reused
    // for another request, and the refused reserves' keys again with affordable requests: a
    // refusal left no record, so they run fresh.
    let mut set = JoinSet::new();
    for (i, h) in holds.iter().enumerate() {
        let store = store.clone();
        let h = h.clone();
        set.spawn(async move {
            if i % 2 == 0 {
                let cmd = commit_cmd(&h, 30);
                let r = store
                    .commit_hold(&idem("svc", &format!("c{i}"), cmd.fingerprint()), &cmd)
                    .await;
                (format!("commit {i}"), got(r, |o| o.hold.hold_id.clone()))
            } else {
                let cmd = Refund {
                    hold_id: HoldId::parse("h", &h).unwrap(),
                    amount: None,
                    reason: "job failed".into(),
                };
                let r = store
                    .refund(&idem("svc", &format!("f{i}"), cmd.fingerprint()), &cmd)
                    .await;
                (format!("refund {i}"), got(r, |o| o.hold.hold_id.clone()))
            }
        });
    }
    {
        let store = store.clone();
        set.spawn(async move {
            let cmd = commit_cmd(tally::ledger::new_hold_id().as_str(), 1);
            let r = store
                .commit_hold(&idem("svc", "c-none", cmd.fingerprint()), &cmd)
                .await;
            (
                "commit of no hold".to_owned(),
                got(r, |o| o.hold.hold_id.clone()),
            )
        });
    }
    {
        let store = store.clone();
        set.spawn(async move {
            let cmd = reserve_cmd("a0", 1, ttl);
            let r = store
                .reserve(&idem("svc", "r0", cmd.fingerprint()), &cmd)
                .await;
            ("key reused".to_owned(), got(r, |o| o.hold.hold_id.clone()))
        });
    }
    for i in 40..44 {
        let store = store.clone();
        set.spawn(async move {
            let cmd = reserve_cmd(&format!("a{}", i % 4), 10, ttl);
            let r = store
                .reserve(&idem("svc", &format!("r{i}"), cmd.fingerprint()), &cmd)
                .await;
            (
                format!("retried reserve {i}"),
                got(r, |o| o.hold.hold_id.clone()),
            )
        });
    }
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            (what, Got::Fresh(_)) if !what.starts_with("commit of") && what != "key reused" => {}
            (what, Got::Refused(LedgerError::HoldNotFound)) if what == "commit of no hold" => {}
            (what, Got::Refused(LedgerError::IdempotencyKeyReused)) if what == "key reused" => {}
            other => panic!("unexpected outcome: {other:?}"),
        }
    }

    // Each account: 10 holds of 50 (all committed at 30 on a0 and a2, all released on a1 and
    // a3), and one open hold of 10 from the retried key.
    for a in 0..4 {
        let b = store
            .balance(&crate::account(&format!("a{a}")))
            .await
            .unwrap();
        let charged = if a % 2 == 0 { 300 } else { 0 };
        assert_eq!(
            (b.available, b.held, b.open_holds),
            (1_000 - charged - 10, 10, 1),
            "a{a}"
        );
    }
    assert_ledger_balances(&store).await;
    let stats = stats();
    assert!(
        stats.largest > 1 && stats.transactions < stats.commands,
        "commands shared transactions: {stats:?}"
    );
    assert_eq!(stats.fallbacks, 0, "no group failed as a whole: {stats:?}");
}

/// With coalescing off, the same store runs each command alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_can_be_turned_off() {
    let db = TestDb::new(Backend::Postgres).await;
    let batching = Batching {
        max: 1,
        workers: 1,
        ..Batching::default()
    };
    let pg = PgStore::connect_with(&db.url, 4, Arc::default(), batching)
        .await
        .unwrap();
    pg.migrate().await.unwrap();
    let pg = Engine::new(Arc::new(pg)).unwrap();
    assert_eq!(pg.group_stats(), None);
    let lite_db = TestDb::new(Backend::Sqlite).await;
    let lite = SqliteStore::connect_with(&lite_db.url, 4, Arc::default(), batching)
        .await
        .unwrap();
    let lite = Engine::new(Arc::new(lite)).unwrap();
    assert_eq!(lite.group_stats(), None);
    let store: Engine = pg;
    grant(&store, "a", 100).await;
    let cmd = reserve_cmd("a", 60, TimeDelta::minutes(1));
    store
        .reserve(&idem("svc", "k", cmd.fingerprint()), &cmd)
        .await
        .unwrap();
    let b = store.balance(&crate::account("a")).await.unwrap();
    assert_eq!((b.available, b.held), (40, 60));
}

crate::on_both_backends!(coalesced_commands_keep_their_own_outcomes);

/// Index and heap tuples read from `hold` so far, as far as the statistics have been flushed.
async fn hold_tuples_read(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(idx_tup_read), 0)::int8 + (SELECT coalesce(seq_tup_read, 0)
                FROM pg_stat_user_tables WHERE relname = 'hold')
         FROM pg_stat_user_indexes WHERE relname = 'hold'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A group worker plans its statements once and keeps them; made while the tables were empty,
/// those plans scanned every hold for what is one key lookup. The worker plans again as the
/// tables grow: after 30,000 holds appear, a Reserve and Commit on another account read a
/// handful of them, not all (a stale plan reads every one, in each of several statements).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_plans_are_made_again_as_the_tables_grow() {
    let db = TestDb::new(Backend::Postgres).await;
    let (store, _) = grouped(&db, Backend::Postgres).await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    grant(&store, "a", 1_000_000).await;
    // Statistics of the new tables, as autovacuum takes them on a new database: no holds.
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();
    let pair = |n: u32| {
        let store = store.clone();
        async move {
            let cmd = reserve_cmd("a", 10, TimeDelta::minutes(5));
            let held = store
                .reserve(&idem("svc", &format!("r{n}"), cmd.fingerprint()), &cmd)
                .await
                .unwrap();
            let cmd = commit_cmd(&held.outcome.hold.hold_id, 7);
            store
                .commit_hold(&idem("svc", &format!("c{n}"), cmd.fingerprint()), &cmd)
                .await
                .unwrap();
        }
    };
    pair(0).await; // the worker's statements are planned on (nearly) empty tables

    sqlx::query("INSERT INTO account (account_id) VALUES ('bulk')")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO hold (hold_id, account_id, amount, state, created_at, expires_at, resolved_at)
         SELECT 'hld_bulk_' || i, 'bulk', 1, 'released', now(), now(), now()
         FROM generate_series(1, 30000) AS i",
    )
    .execute(&pool)
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let before = hold_tuples_read(&pool).await;

    pair(1).await;
    // A backend flushes its statistics at a transaction's end once a second has passed since
    // its last flush: wait, and run one more pair to carry the first one's counts out.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    pair(2).await;
    let read = hold_tuples_read(&pool).await - before;
    assert!(
        read < 3_000,
        "two Reserve+Commit pairs read {read} hold tuples among 30,000 holds"
    );
    assert_ledger_balances(&store).await;
}

/// Returns once some session waits for a lock (within 5 s, or the test fails).
async fn wait_for_a_lock_wait(pool: &sqlx::PgPool) {
    for _ in 0..200 {
        let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE NOT granted")
            .fetch_one(pool)
            .await
            .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the Reserve never waited for the account's lock");
}

/// A group looks its keys up, locks and loads in one statement, whose reads see the database as it was
/// when the statement began. A writer that held an account's lock and committed while the
/// group waited for it changed what those reads saw, so the group loads again. Here the writer
/// (raw SQL shaped as Tally's own: lock, grant, entry, account row) adds 500 to an account of
/// 100 while a Reserve of 400 waits; the Reserve must see the new grant and draw on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_waited_for_an_account_lock_loads_what_the_holder_wrote() {
    let db = TestDb::new(Backend::Postgres).await;
    let (store, stats) = grouped(&db, Backend::Postgres).await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    grant(&store, "a", 100).await;

    let mut tx = pool.begin().await.unwrap();
    for sql in [
        "SELECT 1 FROM account WHERE account_id = 'a' FOR UPDATE",
        "INSERT INTO bucket (bucket_id, account_id, source, granted, remaining, held, expired,
                             priority, reason, created_at)
         VALUES ('bkt_late', 'a', 'adjustment', 500, 500, 0, 0, 0, 'late', now())",
        "INSERT INTO entry (account_id, bucket_id, kind, available_delta, held_delta, debt_delta,
                            reason)
         VALUES ('a', 'bkt_late', 'grant', 500, 0, 0, 'late')",
        "UPDATE account SET available = available + 500, updated_at = now()
         WHERE account_id = 'a'",
    ] {
        sqlx::query(sql).execute(&mut *tx).await.unwrap();
    }
    let reserve = {
        let store = store.clone();
        tokio::spawn(async move {
            let cmd = reserve_cmd("a", 400, TimeDelta::minutes(5));
            store
                .reserve(&idem("svc", "late", cmd.fingerprint()), &cmd)
                .await
        })
    };
    // Commit only once the group is waiting for the account's lock.
    wait_for_a_lock_wait(&pool).await;
    tx.commit().await.unwrap();

    let reserved = reserve
        .await
        .unwrap()
        .expect("the Reserve sees the new grant");
    let hold = reserved.outcome.hold.hold_id;
    let (all, late): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(sum(held), 0)::int8,
                COALESCE(sum(held) FILTER (WHERE bucket_id = 'bkt_late'), 0)::int8
         FROM draw WHERE hold_id = $1",
    )
    .bind(&hold)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(all, 400);
    assert!(
        late >= 300,
        "the first grant has 100: {late} came from the new one"
    );
    let (available, on_hold): (i64, i64) =
        sqlx::query_as("SELECT available, held FROM account WHERE account_id = 'a'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((available, on_hold), (200, 400));
    assert_eq!(
        stats().fallbacks,
        0,
        "the group itself answered, not the one-call path"
    );
    assert_ledger_balances(&store).await;
}

/// A group does not claim its keys up front: it looks them up, and its write inserts the
/// records. A key that another transaction records after that lookup (a client's retry that
/// went to another group and committed first) makes the insert fail: the group must then run
/// again and replay that record, not commit a second hold. Here the other transaction (raw
/// SQL) holds the account's lock and records the key, with a first Reserve's outcome, while
/// the Reserve under that key waits for the lock (on a kept book, its one-statement write
/// waits for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_recorded_while_its_group_waited_replays_that_record() {
    let db = TestDb::new(Backend::Postgres).await;
    let (store, stats) = grouped(&db, Backend::Postgres).await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    grant(&store, "a", 100).await;
    let cmd = reserve_cmd("a", 10, TimeDelta::minutes(5));
    let first = store
        .reserve(&idem("svc", "first", cmd.fingerprint()), &cmd)
        .await
        .unwrap();
    assert!(!first.replayed);

    let mut tx = pool.begin().await.unwrap();
    for sql in [
        "SELECT 1 FROM account WHERE account_id = 'a' FOR UPDATE",
        "INSERT INTO idempotency_record (caller, idempotency_key, fingerprint, response)
         SELECT caller, 'retry', fingerprint, response FROM idempotency_record
         WHERE idempotency_key = 'first'",
    ] {
        assert_eq!(
            sqlx::query(sql)
                .execute(&mut *tx)
                .await
                .unwrap()
                .rows_affected(),
            1
        );
    }
    let retry = {
        let (store, cmd) = (store.clone(), cmd.clone());
        tokio::spawn(async move {
            store
                .reserve(&idem("svc", "retry", cmd.fingerprint()), &cmd)
                .await
        })
    };
    wait_for_a_lock_wait(&pool).await;
    tx.commit().await.unwrap();

    let retried = retry.await.unwrap().expect("the retry replays");
    assert!(retried.replayed, "the key's record answers");
    assert_eq!(retried.outcome.hold.hold_id, first.outcome.hold.hold_id);
    let (holds, available, on_hold): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM hold WHERE account_id = 'a'), available, held
         FROM account WHERE account_id = 'a'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (holds, available, on_hold),
        (1, 90, 10),
        "one hold, reserved once"
    );
    // On the kept book the write failed on the key and the group ran again under locks
    // inside the same worker call; from cold books the locked group failed and ran again.
    let s = stats();
    assert!(
        s.retries <= 1 && s.fallbacks == 0,
        "the group ran again as a group: {s:?}"
    );
    assert_ledger_balances(&store).await;
}

/// ExtendHold moves a hold and no balance, yet writes its account row, grouped or alone: that
/// row is how a group's one-statement load knows whether what it read is still current (the
/// test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_hold_writes_its_account_row() {
    let db = TestDb::new(Backend::Postgres).await;
    let (grouped_store, stats) = grouped(&db, Backend::Postgres).await;
    let alone = PgStore::connect_with(
        &db.url,
        4,
        Arc::default(),
        Batching {
            max: 1,
            workers: 1,
            ..Batching::default()
        },
    )
    .await
    .unwrap();
    let alone = Engine::new(Arc::new(alone)).unwrap();
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    grant(&grouped_store, "a", 100).await;
    let cmd = reserve_cmd("a", 10, TimeDelta::minutes(5));
    let reserved = grouped_store
        .reserve(&idem("svc", "r", cmd.fingerprint()), &cmd)
        .await
        .unwrap();
    let hold = HoldId::parse("h", &reserved.outcome.hold.hold_id).unwrap();
    let version = || async {
        sqlx::query_scalar::<_, String>("SELECT ctid::text FROM account WHERE account_id = 'a'")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let stores: [&Engine; 2] = [&grouped_store, &alone];
    for (n, store) in stores.into_iter().enumerate() {
        let before = version().await;
        let x = tally::domain::command::ExtendHold {
            hold_id: hold.clone(),
            ttl: TimeDelta::minutes(10 + i64::try_from(n).unwrap()),
        };
        store
            .extend_hold(&idem("svc", &format!("x{n}"), x.fingerprint()), &x)
            .await
            .unwrap();
        assert_ne!(
            version().await,
            before,
            "ExtendHold {n} left the account row as it was"
        );
    }
    assert_eq!(stats().fallbacks, 0);
}
