//! Plan switches (issue 23, item 1): an account moved between plans of different allowance
//! periods gets at most one allowance per period key, and never locks up; the sweeper goes on
//! past an account it cannot settle.

use chrono::TimeDelta;
use tally::domain::book::Source;
use tally::domain::command::SetPlan;
use tally::domain::plan::{Allowance, Period, Policy, Rollover};
use tally::ledger::Engine;

use crate::support::{Backend, TestDb, assert_ledger_balances};
use crate::{account, grant, idem, reserve_cmd};

/// `free`: 5 a day; `monthly`: 100 a month; `team`: 7 a day.
fn policy() -> Policy {
    let a = |amount, period| Allowance {
        amount,
        period,
        rollover: Rollover::None,
    };
    Policy {
        allowances: [
            ("free".to_owned(), a(5, Period::Daily)),
            ("monthly".to_owned(), a(100, Period::Monthly)),
            ("team".to_owned(), a(7, Period::Daily)),
        ]
        .into_iter()
        .collect(),
        ..Policy::default()
    }
}

async fn set_plan(store: &Engine, acct: &str, plan: &str, key: &str) {
    let cmd = SetPlan {
        account_id: account(acct),
        plan: plan.into(),
    };
    store
        .set_plan(&idem("ops", key, cmd.fingerprint()), &cmd)
        .await
        .unwrap_or_else(|e| panic!("set_plan {plan}: {e}"));
}

async fn available(store: &Engine, acct: &str) -> i64 {
    store
        .balance(&account(acct))
        .await
        .unwrap_or_else(|e| panic!("balance: {e}"))
        .available
}

async fn allowances(store: &Engine, acct: &str) -> usize {
    // Every allowance grant of the account, live or not, by its ledger entries.
    let q = tally::storage::EntryQuery {
        account_id: Some(account(acct)),
        kinds: vec![tally::domain::rules::EntryKind::Grant],
        since: None,
        until: None,
        cursor: tally::storage::EntryCursor::Before(None),
        limit: 500,
    };
    store
        .list_entries(&q)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.reason.starts_with("allowance "))
        .count()
}

async fn switching_plans_back_and_forth_never_locks_an_account(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store_with(policy()).await;
    let s = &store;
    grant(s, "a1", 10).await;
    assert_eq!(available(s, "a1").await, 15, "10 + today's 5");
    set_plan(s, "a1", "monthly", "p1").await;
    assert_eq!(available(s, "a1").await, 115, "this month's 100 at once");
    // Back to the daily plan the same day: today's daily allowance was granted already.
    set_plan(s, "a1", "free", "p2").await;
    assert_eq!(available(s, "a1").await, 115);
    let r = reserve_cmd("a1", 1, TimeDelta::minutes(5));
    s.reserve(&idem("c", "r1", r.fingerprint()), &r)
        .await
        .unwrap();
    grant(s, "a1", 10).await;
    set_plan(s, "a1", "monthly", "p3").await;
    // Another daily plan: the same daily key, no second allowance today.
    set_plan(s, "a1", "team", "p4").await;
    set_plan(s, "a1", "monthly", "p5").await;
    assert_eq!(available(s, "a1").await, 124, "115 - 1 held + 10");
    assert_eq!(allowances(s, "a1").await, 2, "one per period key");
    let grants = s.grants(&account("a1")).await.unwrap();
    assert!(grants.iter().any(|g| g.source == Source::Allowance));
    assert_ledger_balances(s).await;
}

/// One account the sweeper cannot settle (here a trigger refuses its holds' updates, as a
/// corrupt row would) is logged and counted; the other accounts' expired holds still expire.
async fn the_sweeper_goes_on_past_an_account_it_cannot_settle(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let s = &store;
    for acct in ["bad", "good"] {
        grant(s, acct, 10).await;
        let r = reserve_cmd(acct, 2, TimeDelta::seconds(1));
        s.reserve(&idem("c", &format!("r-{acct}"), r.fingerprint()), &r)
            .await
            .unwrap();
    }
    match backend {
        Backend::Postgres => {
            let pool = db.postgres().await.pool().clone();
            for sql in [
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'refused for the test'; END $$",
                "CREATE TRIGGER refuse_bad BEFORE UPDATE ON hold FOR EACH ROW
                 WHEN (NEW.account_id = 'bad') EXECUTE FUNCTION refuse()",
            ] {
                sqlx::query(sql).execute(&pool).await.unwrap();
            }
        }
        Backend::Sqlite => {
            let pool = db.sqlite().await.pool().clone();
            sqlx::query(
                "CREATE TRIGGER refuse_bad BEFORE UPDATE ON hold WHEN NEW.account_id = 'bad'
                 BEGIN SELECT RAISE(ABORT, 'refused for the test'); END",
            )
            .execute(&pool)
            .await
            .unwrap();
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    // "bad" sorts first: before, its failure ended every pass there.
    for _ in 0..2 {
        s.expire_due(100).await.expect("the pass goes on");
    }
    let expired = |acct: &'static str| async move {
        let q = tally::storage::EntryQuery {
            account_id: Some(account(acct)),
            kinds: vec![tally::domain::rules::EntryKind::Expire],
            since: None,
            until: None,
            cursor: tally::storage::EntryCursor::Before(None),
            limit: 10,
        };
        s.list_entries(&q).await.unwrap().len()
    };
    assert_eq!(expired("good").await, 1, "the good account's hold expired");
    assert_eq!(expired("bad").await, 0, "the refused one is left as it was");
}

/// Item 3: an account at the balance limit on a plan without an allowance, moved to a plan
/// with one, keeps working: the allowance is skipped (no room), reads, reserves, negative
/// adjustments and plan switches succeed; with room for part of it, it is capped.
async fn an_account_at_the_balance_limit_keeps_working(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store_with(policy()).await;
    let s = &store;
    grant(s, "rich", 1).await;
    set_plan(s, "rich", "none", "n1").await;
    let max = tally::domain::MAX_BALANCE;
    // 1 + 5 (today's allowance, before the switch), then one grant raised to the limit in
    // SQL (a thousand grants of the largest amount would take the test 20 s): the grant, its
    // entry and the account's column move together, as the audit checks.
    let g = grant(s, "rich", 1).await.grant_id;
    let more = max - 7;
    let sql = [
        format!(
            "UPDATE bucket SET granted = granted + {more}, remaining = remaining + {more} WHERE bucket_id = '{g}'"
        ),
        format!("UPDATE account SET available = available + {more} WHERE account_id = 'rich'"),
        match backend {
            Backend::Postgres => format!(
                "INSERT INTO entry (account_id, kind, available_delta, held_delta, reason, bucket_id) VALUES ('rich', 'grant', {more}, 0, 'test', '{g}')"
            ),
            Backend::Sqlite => format!(
                "INSERT INTO entry (account_id, kind, available_delta, held_delta, reason, created_at, bucket_id) VALUES ('rich', 'grant', {more}, 0, 'test', 0, '{g}')"
            ),
        },
    ];
    for q in sql {
        match backend {
            Backend::Postgres => {
                let pool = db.postgres().await.pool().clone();
                sqlx::query(sqlx::AssertSqlSafe(q))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            Backend::Sqlite => {
                let pool = db.sqlite().await.pool().clone();
                sqlx::query(sqlx::AssertSqlSafe(q))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        }
    }
    assert_ledger_balances(s).await;
    assert_eq!(available(s, "rich").await, max);
    set_plan(s, "rich", "monthly", "m1").await;
    assert_eq!(
        available(s, "rich").await,
        max,
        "no room: the allowance is skipped"
    );
    let r = reserve_cmd("rich", 1, TimeDelta::minutes(5));
    s.reserve(&idem("c", "r-rich", r.fingerprint()), &r)
        .await
        .unwrap();
    let adj = tally::domain::command::Adjust {
        account_id: account("rich"),
        delta: -1000,
        reason: "correction".into(),
        operator: "ops".into(),
    };
    s.adjust(&idem("ops", "adj-rich", adj.fingerprint()), &adj)
        .await
        .unwrap();
    set_plan(s, "rich", "free", "f1").await;
    assert_eq!(
        available(s, "rich").await,
        max - 1 - 1000,
        "today's daily was granted"
    );
    // Back on the monthly plan with room now: this month's allowance, which never was granted.
    set_plan(s, "rich", "monthly", "m2").await;
    assert_eq!(available(s, "rich").await, max - 1 - 1000 + 100);
    assert_ledger_balances(s).await;
}

crate::on_both_backends!(
    an_account_at_the_balance_limit_keeps_working,
    switching_plans_back_and_forth_never_locks_an_account,
    the_sweeper_goes_on_past_an_account_it_cannot_settle,
);
