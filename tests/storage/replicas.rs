//! Kept books (`storage::cache`) across replicas: two engines on one PostgreSQL, each keeping
//! the books it wrote in memory, write the same accounts at once. A book another replica moved
//! is stale; the one-statement write checks the account's version, so a stale book never
//! decides: no update is lost, no refusal is made on credits that are there, no credits are
//! spent twice.

use std::sync::Arc;

use chrono::TimeDelta;
use tally::domain::LedgerError;
use tally::ledger::Engine;
use tally::storage::StorageError;
use tally::storage::batch::Batching;
use tally::storage::postgres::PgStore;

use crate::support::{Backend, TestDb, assert_ledger_balances};
use crate::{commit_cmd, grant, idem, reserve_cmd};

/// Pairs each replica starts on each account in a round.
const PAIRS: usize = 8;

/// A replica: its own pool, group workers and book cache.
async fn replica(db: &TestDb) -> Engine {
    let pg = PgStore::connect_with(&db.url, 4, Arc::default(), Batching::default())
        .await
        .unwrap();
    pg.migrate().await.unwrap();
    Engine::new(Arc::new(pg)).unwrap()
}

/// Reserve 5 on `replica_a`, commit 4 on `replica_b`; retried with the same keys while the
/// store reports contention or an unknown outcome, as a client does.
async fn pair(a: &Engine, b: &Engine, acct: &str, key: &str) -> Result<(), StorageError> {
    let cmd = reserve_cmd(acct, 5, TimeDelta::minutes(5));
    let k = idem("svc", &format!("r-{key}"), cmd.fingerprint());
    let hold = loop {
        match a.reserve(&k, &cmd).await {
            Ok(r) => break r.outcome.hold.hold_id,
            Err(StorageError::Contended | StorageError::InDoubt(_)) => {}
            Err(e) => return Err(e),
        }
    };
    let c = commit_cmd(&hold, 4);
    let k = idem("svc", &format!("c-{key}"), c.fingerprint());
    loop {
        match b.commit_hold(&k, &c).await {
            Ok(_) => return Ok(()),
            Err(StorageError::Contended | StorageError::InDoubt(_)) => {}
            Err(e) => return Err(e),
        }
    }
}

async fn balance(pool: &sqlx::PgPool, acct: &str) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT available, held,
                (SELECT count(*) FROM hold WHERE account_id = $1 AND state = 'committed')
         FROM account WHERE account_id = $1",
    )
    .bind(acct)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// 20 rounds, each on a new account (created by the round's first grant: nothing kept, nothing
/// stored) and on one account both replicas have kept since the first round: 8 pairs from
/// each replica at once, half of them reserving on one replica and committing on the other.
/// Every pair lands once: the balance is the grants less 4 a pair, nothing stays held, the
/// ledger audit holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_writing_one_account_never_lose_an_update() {
    let db = TestDb::new(Backend::Postgres).await;
    let (a, b) = (replica(&db).await, replica(&db).await);
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    grant(&a, "warm", 10_000).await;
    for round in 0..20 {
        let cold = format!("cold-{round}");
        grant(if round % 2 == 0 { &a } else { &b }, &cold, 1_000).await;
        let mut tasks = tokio::task::JoinSet::new();
        for acct in [cold.clone(), "warm".to_owned()] {
            for i in 0..PAIRS {
                for (side, (x, y)) in [(&a, &b), (&b, &a)].into_iter().enumerate() {
                    let (x, y) = if i % 2 == 0 { (x, x) } else { (x, y) };
                    let (x, y, acct) = (x.clone(), y.clone(), acct.clone());
                    let key = format!("{acct}-{round}-{i}-{side}");
                    tasks.spawn(async move { pair(&x, &y, &acct, &key).await });
                }
            }
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
        }
        let pairs = i64::try_from(2 * PAIRS).unwrap();
        assert_eq!(
            balance(&pool, &cold).await,
            (1_000 - 4 * pairs, 0, pairs),
            "round {round}, new account"
        );
        let rounds = i64::from(round + 1);
        assert_eq!(
            balance(&pool, "warm").await,
            (10_000 - 4 * pairs * rounds, 0, pairs * rounds),
            "round {round}, kept account"
        );
    }
    assert_ledger_balances(&a).await;
}

/// A replica whose kept book is stale decides nothing on it: credits another replica granted
/// are reservable at once, and credits another replica reserved are not reserved twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_kept_book_neither_refuses_nor_overdraws() {
    let db = TestDb::new(Backend::Postgres).await;
    let (a, b) = (replica(&db).await, replica(&db).await);
    let reserve = |e: &Engine, acct: &str, amount: i64, key: &str| {
        let (e, cmd) = (e.clone(), reserve_cmd(acct, amount, TimeDelta::minutes(5)));
        let k = idem("svc", key, cmd.fingerprint());
        async move { e.reserve(&k, &cmd).await }
    };
    for round in 0..20 {
        // A keeps "empty-N" with nothing available; B grants 50: A's Reserve of 30 succeeds.
        let empty = format!("empty-{round}");
        grant(&a, &empty, 10).await;
        reserve(&a, &empty, 10, &format!("e0-{round}"))
            .await
            .unwrap();
        grant(&b, &empty, 50).await;
        reserve(&a, &empty, 30, &format!("e1-{round}"))
            .await
            .expect("the credits B granted are there");

        // A keeps "full-N" with 100 available; B reserves all of it: A's Reserve is refused.
        let full = format!("full-{round}");
        grant(&a, &full, 100).await;
        reserve(&a, &full, 1, &format!("f0-{round}")).await.unwrap();
        reserve(&b, &full, 99, &format!("f1-{round}"))
            .await
            .unwrap();
        match reserve(&a, &full, 30, &format!("f2-{round}")).await {
            Err(StorageError::Rejected(LedgerError::InsufficientCredits { .. })) => {}
            other => panic!("round {round}: B reserved everything, yet A got {other:?}"),
        }
    }
    assert_ledger_balances(&a).await;
}
