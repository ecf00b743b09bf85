//! Races that must have exactly one winner.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::TimeDelta;
use tally::domain::{Caller, HoldState, IdempotencyKey, LedgerError};
use tally::ledger::Engine;
use tally::ledger::ServiceError;
use tokio::task::JoinSet;

use crate::support::{Backend, TestDb, assert_ledger_balances};
use crate::{commit_cmd, grant, ledger, reserve_cmd};

fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::parse("k", s).unwrap()
}

async fn concurrent_reserves_never_overdraw(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    grant(&store, "acct", 100).await;
    let ledger = ledger(&store);
    let mut set = JoinSet::new();
    for i in 0..64 {
        let ledger = ledger.clone();
        set.spawn(async move {
            ledger
                .reserve(
                    &Caller::anonymous(),
                    key(&format!("r{i}")),
                    &reserve_cmd("acct", 7, TimeDelta::minutes(5)),
                )
                .await
        });
    }
    let (mut ok, mut refused) = (0, 0);
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(ServiceError::Rejected(LedgerError::InsufficientCredits {
                requested: 7, ..
            })) => refused += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!((ok, refused), (14, 50));
    let b = store.balance(&crate::account("acct")).await.unwrap();
    assert_eq!((b.available, b.held, b.open_holds), (2, 98, 14));
    assert_ledger_balances(&store).await;
}

async fn identical_concurrent_reserves_make_one_hold(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    grant(&store, "acct", 1_000).await;
    let ledger = ledger(&store);
    let mut set = JoinSet::new();
    for _ in 0..50 {
        let ledger = ledger.clone();
        // Each attempt gets its own server-generated hold id, as separate RPCs would.
        set.spawn(async move {
            ledger
                .reserve(
                    &Caller::anonymous(),
                    key("job-42"),
                    &reserve_cmd("acct", 30, TimeDelta::minutes(5)),
                )
                .await
        });
    }
    let mut outcomes = Vec::new();
    while let Some(r) = set.join_next().await {
        outcomes.push(r.unwrap().unwrap());
    }
    assert_eq!(
        outcomes.iter().filter(|a| !a.replayed).count(),
        1,
        "exactly one attempt did the work"
    );
    let first = &outcomes[0].outcome;
    assert!(
        outcomes.iter().all(|a| &a.outcome == first),
        "all 50 responses are identical"
    );
    let b = store.balance(&crate::account("acct")).await.unwrap();
    assert_eq!((b.available, b.held, b.open_holds), (970, 30, 1));
    assert_ledger_balances(&store).await;
}

async fn commit_racing_the_sweeper_has_one_outcome(backend: Backend) {
    const ROUNDS: usize = 500;
    const WAVE: usize = 50;
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    // Ten accounts, so the race is between each commit and the sweeper, not a queue on one row.
    let start = ROUNDS as i64;
    for a in 0..10 {
        grant(&store, &format!("acct{a}"), start).await;
    }
    let ledger = ledger(&store);

    let stop = Arc::new(AtomicBool::new(false));
    let sweeper = {
        let (store, stop) = (store.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut swept = 0;
            while !stop.load(Ordering::Relaxed) {
                swept += store.expire_due(100).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            swept
        })
    };
    let (mut committed, mut expired, mut charged) = (0, 0, 0i64);
    for wave in 0..ROUNDS / WAVE {
        let mut set = JoinSet::new();
        for i in 0..WAVE {
            let ledger = ledger.clone();
            set.spawn(async move {
                let n = wave * WAVE + i;
                let r = ledger
                    .reserve(
                        &Caller::anonymous(),
                        key(&format!("r{n}")),
                        &reserve_cmd(&format!("acct{}", n % 10), 5, TimeDelta::milliseconds(150)),
                    )
                    .await
                    .unwrap();
                // Commit somewhere around the expiry (150 ms): sometimes before, sometimes after.
                tokio::time::sleep(Duration::from_millis(75 + (n as u64 * 7) % 150)).await;
                let hold_id = r.outcome.hold.hold_id.clone();
                let c = ledger
                    .commit_hold(
                        &Caller::anonymous(),
                        key(&format!("c{n}")),
                        &commit_cmd(&hold_id, 3),
                    )
                    .await;
                (hold_id, c)
            });
        }
        while let Some(r) = set.join_next().await {
            let (hold_id, c) = r.unwrap();
            let hold = store
                .hold(&tally::domain::HoldId::parse("h", &hold_id).unwrap())
                .await
                .unwrap();
            match c {
                Ok(a) => {
                    assert_eq!(a.outcome.hold.state, HoldState::Committed);
                    assert_eq!(
                        hold.state,
                        HoldState::Committed,
                        "a committed hold stays committed"
                    );
                    committed += 1;
                    charged += 3;
                }
                Err(ServiceError::Rejected(LedgerError::HoldExpired)) => {
                    assert_eq!(
                        hold.state,
                        HoldState::Expired,
                        "an expired hold stays expired"
                    );
                    expired += 1;
                }
                Err(e) => panic!("unexpected error: {e:?}"),
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swept = sweeper.await.unwrap();
    while store.expire_due(1_000).await.unwrap() > 0 {}
    assert_eq!(committed + expired, ROUNDS);
    assert!(
        committed > 0 && expired > 0 && swept > 0,
        "the race was real: {committed} committed, {expired} expired, {swept} swept"
    );
    let mut total = 0;
    for a in 0..10 {
        let b = store
            .balance(&crate::account(&format!("acct{a}")))
            .await
            .unwrap();
        assert_eq!((b.held, b.open_holds), (0, 0));
        total += b.available;
    }
    assert_eq!(total, 10 * start - charged);
    assert_ledger_balances(&store).await;
}

async fn two_sweepers_expire_each_hold_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let other: Engine = db.store().await; // a second replica on the same database
    for a in 0..20 {
        grant(&store, &format!("a{a}"), 100).await;
        for i in 0..10 {
            let cmd = reserve_cmd(&format!("a{a}"), 1 + i, TimeDelta::milliseconds(500));
            store
                .reserve(
                    &crate::idem("t", &format!("r{a}-{i}"), cmd.fingerprint()),
                    &cmd,
                )
                .await
                .unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (x, y) = tokio::join!(
        async {
            let mut n = 0;
            loop {
                let k = store.expire_due(7).await.unwrap();
                n += k;
                if k == 0 {
                    break n;
                }
            }
        },
        async {
            let mut n = 0;
            loop {
                let k = other.expire_due(7).await.unwrap();
                n += k;
                if k == 0 {
                    break n;
                }
            }
        },
    );
    // A sweeper stops at its first empty pass, which can come while the other is still
    // settling the accounts it picked; a last pass picks up whatever both left.
    let mut rest = 0;
    loop {
        let k = store.expire_due(1_000).await.unwrap();
        rest += k;
        if k == 0 {
            break;
        }
    }
    assert_eq!(
        x + y + rest,
        200,
        "each of the 200 holds expired exactly once"
    );
    assert!(x + y > 0, "the two sweepers did the work");
    for a in 0..20 {
        let b = store
            .balance(&crate::account(&format!("a{a}")))
            .await
            .unwrap();
        assert_eq!((b.available, b.held), (100, 0));
    }
    assert_ledger_balances(&store).await;
}

crate::on_both_backends!(
    concurrent_reserves_never_overdraw,
    identical_concurrent_reserves_make_one_hold,
    commit_racing_the_sweeper_has_one_outcome,
    two_sweepers_expire_each_hold_once,
);
