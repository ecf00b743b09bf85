//! Plan switches (issue 23, item 1): an account moved between plans of different allowance
//! periods gets at most one allowance per period key, and never locks up; the sweeper goes on
//! past an account it cannot settle.

use chrono::TimeDelta;
use tally::domain::book::Source;
use tally::domain::command::SetPlan;
use tally::domain::plan::{Allowance, Period, Policy, Rollover};
use tally::storage::Store;

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
    }
}

async fn set_plan(store: &dyn Store, acct: &str, plan: &str, key: &str) {
    let cmd = SetPlan {
        account_id: account(acct),
        plan: plan.into(),
    };
    store
        .set_plan(&idem("ops", key, cmd.fingerprint()), &cmd)
        .await
        .unwrap_or_else(|e| panic!("set_plan {plan}: {e}"));
}

async fn available(store: &dyn Store, acct: &str) -> i64 {
    store
        .balance(&account(acct))
        .await
        .unwrap_or_else(|e| panic!("balance: {e}"))
        .available
}

async fn allowances(store: &dyn Store, acct: &str) -> usize {
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
    let s = store.as_ref();
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
    let s = store.as_ref();
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

crate::on_both_backends!(
    switching_plans_back_and_forth_never_locks_an_account,
    the_sweeper_goes_on_past_an_account_it_cannot_settle,
);
