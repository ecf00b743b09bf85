//! Grants on both backends: allowances once per period, the sign-up bonus once, expiry,
//! corrections and transfers.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use tally::domain::book::Source;
use tally::domain::command::{Adjust, GrantCredits, OpenAccount, Refund, Transfer};
use tally::domain::plan::{Allowance, Period, Policy, Rollover};
use tally::domain::rules::EntryKind;
use tally::domain::{HoldId, LedgerError};
use tally::ledger::Engine;
use tally::storage::{EntryCursor, EntryQuery, StorageError};
use tokio::task::JoinSet;

use crate::support::{Backend, TestDb, assert_ledger_balances};
use crate::{account, commit_cmd, credits, grant, idem, reserve_cmd};

fn daily(amount: i64) -> Policy {
    Policy {
        allowances: [(
            "free".to_owned(),
            Allowance {
                amount,
                period: Period::Daily,
                rollover: Rollover::None,
            },
        )]
        .into_iter()
        .collect(),
        ..Policy::default()
    }
}

async fn entries(store: &Engine, acct: &str, kind: EntryKind) -> usize {
    let q = EntryQuery {
        account_id: Some(account(acct)),
        kinds: vec![kind],
        since: None,
        until: None,
        cursor: EntryCursor::Before(None),
        limit: 500,
    };
    store.list_entries(&q).await.unwrap().len()
}

async fn concurrent_first_calls_on_two_instances_grant_one_allowance(backend: Backend) {
    let db = TestDb::new(backend).await;
    // The account exists from before its plan had an allowance.
    grant(&db.store().await, "user", 10).await;
    let (a, b) = (db.store_with(daily(5)).await, db.store_with(daily(5)).await);
    let mut set = JoinSet::new();
    for i in 0..20 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        set.spawn(async move {
            if i % 3 == 0 {
                let r = reserve_cmd("user", 1, TimeDelta::minutes(5));
                store
                    .reserve(&idem("c", &format!("r{i}"), r.fingerprint()), &r)
                    .await
                    .map(|_| ())
            } else {
                store.balance(&account("user")).await.map(|_| ())
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    let grants: Vec<_> = a
        .grants(&account("user"))
        .await
        .unwrap()
        .into_iter()
        .filter(|g| g.source == Source::Allowance)
        .collect();
    assert_eq!(grants.len(), 1, "one allowance for the period: {grants:?}");
    assert_eq!(grants[0].granted, 5);
    let bal = a.balance(&account("user")).await.unwrap();
    assert_eq!(bal.available + bal.held, 15);
    assert_eq!(
        bal.allowance_left.map(|l| l + bal.held.min(5)),
        Some(5),
        "reserves drew the expiring allowance first"
    );
    assert_eq!(entries(&a, "user", EntryKind::Grant).await, 2);
    assert_ledger_balances(&a).await;
}

async fn open_account_raced_gives_one_bonus(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let open = OpenAccount {
        account_id: account("newbie"),
        plan: "free".into(),
        bonus: Some((credits(100), Some(TimeDelta::days(30)))),
    };
    let mut set = JoinSet::new();
    for i in 0..20 {
        let (store, open) = (store.clone(), open.clone());
        set.spawn(async move {
            store
                .open_account(&idem("c", &format!("o{i}"), open.fingerprint()), &open)
                .await
        });
    }
    let (mut ok, mut exists) = (0, 0);
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Ok(a) => {
                assert_eq!(a.outcome.bonus, 100);
                ok += 1;
            }
            Err(StorageError::Rejected(LedgerError::AccountExists)) => exists += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!((ok, exists), (1, 19));
    let bal = store.balance(&account("newbie")).await.unwrap();
    assert_eq!(
        (
            bal.available,
            bal.by_source.get(&Source::SignupBonus).copied()
        ),
        (100, Some(100))
    );
    let (at, amount) = bal.next_expiry.unwrap();
    assert_eq!(amount, 100);
    assert!((at - Utc::now() - TimeDelta::days(30)).num_seconds().abs() < 60);
    assert_ledger_balances(&store).await;
}

async fn expired_grants_leave_as_entries_and_refunds_into_them_expire(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let promo = GrantCredits {
        account_id: account("u"),
        amount: credits(30),
        reason: "winter promo".into(),
        source: Source::Promotion,
        expires_at: Some(Utc::now() + TimeDelta::milliseconds(400)),
        priority: 50,
    };
    store
        .grant(&idem("c", "promo", promo.fingerprint()), &promo)
        .await
        .unwrap();
    grant(&store, "u", 50).await;
    // The reserve takes the expiring promo credits first.
    let r = reserve_cmd("u", 40, TimeDelta::minutes(5));
    let hold = store
        .reserve(&idem("c", "r", r.fingerprint()), &r)
        .await
        .unwrap()
        .outcome
        .hold;
    let c = commit_cmd(&hold.hold_id, 40);
    store
        .commit_hold(&idem("c", "c", c.fingerprint()), &c)
        .await
        .unwrap();
    let before = store.balance(&account("u")).await.unwrap();
    assert_eq!(
        (before.available, before.by_source.get(&Source::Promotion)),
        (40, None),
        "30 promo then 10 of the rest"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let f = Refund {
        hold_id: HoldId::parse("h", &hold.hold_id).unwrap(),
        amount: None,
        reason: "job failed".into(),
    };
    let out = store
        .refund(&idem("c", "f", f.fingerprint()), &f)
        .await
        .unwrap()
        .outcome;
    assert_eq!(
        (out.refunded, out.available),
        (40, 50),
        "the 30 promo credits came back and expired at once"
    );
    assert_eq!(entries(&store, "u", EntryKind::Expiration).await, 1);

    // A grant that expires unused leaves by an `expiration` entry, seen on the next read.
    let short = GrantCredits {
        expires_at: Some(Utc::now() + TimeDelta::milliseconds(200)),
        ..promo.clone()
    };
    store
        .grant(&idem("c", "promo2", short.fingerprint()), &short)
        .await
        .unwrap();
    assert_eq!(store.balance(&account("u")).await.unwrap().available, 80);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.balance(&account("u")).await.unwrap().available, 50);
    assert_eq!(entries(&store, "u", EntryKind::Expiration).await, 2);
    assert_ledger_balances(&store).await;
}

async fn corrections_and_transfers_move_grants_with_their_expiry(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let expiry = Utc::now() + TimeDelta::days(3);
    let promo = GrantCredits {
        account_id: account("alice"),
        amount: credits(20),
        reason: String::new(),
        source: Source::Promotion,
        expires_at: Some(expiry),
        priority: 50,
    };
    store
        .grant(&idem("c", "g1", promo.fingerprint()), &promo)
        .await
        .unwrap();
    grant(&store, "alice", 30).await;
    let t = Transfer {
        from: account("alice"),
        to: account("bob"),
        amount: credits(25),
        reason: "gift".into(),
    };
    let out = store
        .transfer(&idem("c", "t", t.fingerprint()), &t)
        .await
        .unwrap()
        .outcome;
    assert_eq!((out.from.1, out.to.1), (25, 25));
    let bob = store.grants(&account("bob")).await.unwrap();
    let kept: Vec<_> = bob
        .iter()
        .map(|g| (g.source, g.remaining, g.expires_at.map(|e| e.timestamp())))
        .collect();
    assert_eq!(
        kept,
        [
            (Source::Promotion, 20, Some(expiry.timestamp())),
            (Source::Adjustment, 5, None)
        ]
    );
    let too_much = Transfer {
        amount: credits(26),
        ..t.clone()
    };
    let err = store
        .transfer(&idem("c", "t2", too_much.fingerprint()), &too_much)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Rejected(LedgerError::InsufficientCredits {
                available: 25,
                requested: 26
            })
        ),
        "{err:?}"
    );

    let fix = Adjust {
        account_id: account("bob"),
        delta: -7,
        reason: "double grant".into(),
        operator: "support@x".into(),
    };
    assert_eq!(
        store
            .adjust(&idem("c", "a1", fix.fingerprint()), &fix)
            .await
            .unwrap()
            .outcome
            .available,
        18
    );
    let over = Adjust {
        delta: -19,
        ..fix.clone()
    };
    let err = store
        .adjust(&idem("c", "a2", over.fingerprint()), &over)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Rejected(LedgerError::InsufficientCredits { .. })
        ),
        "{err:?}"
    );
    let q = EntryQuery {
        account_id: Some(account("bob")),
        kinds: vec![EntryKind::Adjustment],
        since: None,
        until: None,
        cursor: EntryCursor::Before(None),
        limit: 10,
    };
    let adj = store.list_entries(&q).await.unwrap();
    assert!(
        adj.iter()
            .all(|e| e.reason == "double grant (by support@x)" && e.grant_id.is_some()),
        "{adj:?}"
    );
    assert_ledger_balances(&store).await;
}

crate::on_both_backends!(
    concurrent_first_calls_on_two_instances_grant_one_allowance,
    open_account_raced_gives_one_bonus,
    expired_grants_leave_as_entries_and_refunds_into_them_expire,
    corrections_and_transfers_move_grants_with_their_expiry,
);
