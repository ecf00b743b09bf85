//! Differential test: random command sequences on a real backend and on the reference model
//! (`tally::domain::model::Ledger`) must give the same answers and the same balances.

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, TimeDelta, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tally::domain::book::Source;
use tally::domain::command::{
    Adjust, CommitHold, ExtendHold, GrantCredits, OpenAccount, Refund, Reserve, SetPlan, Transfer,
};
use tally::domain::model::Ledger as Model;
use tally::domain::outcome::Outcome;
use tally::domain::{HoldId, HoldState, LedgerError, Metadata};
use tally::ledger::Engine;
use tally::ledger::new_hold_id;
use tally::storage::StorageError;

use crate::support::{Backend, TestDb, assert_ledger_balances};
use crate::{account, credits, idem};

#[derive(Clone, Debug)]
enum Op {
    Grant(u8, i64, Option<i64>, i32),
    Adjust(u8, i64),
    Transfer(u8, u8, i64),
    Reserve(u8, i64),
    Commit(usize, i64),
    Refund(usize, Option<i64>),
    Extend(usize),
    Retry(usize),
    Open(u8, Option<i64>),
    SetPlan(u8, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u8..3, 1i64..150, proptest::option::of(1i64..5), 0i32..3).prop_map(|(a, n, d, p)| Op::Grant(a, n, d, p * 40)),
        1 => (0u8..3, -60i64..60).prop_filter("non-zero", |(_, d)| *d != 0).prop_map(|(a, d)| Op::Adjust(a, d)),
        1 => (0u8..3, 0u8..3, 1i64..60).prop_filter("two accounts", |(f, t, _)| f != t).prop_map(|(f, t, n)| Op::Transfer(f, t, n)),
        4 => (0u8..3, 1i64..100).prop_map(|(a, n)| Op::Reserve(a, n)),
        3 => (any::<usize>(), 1i64..130).prop_map(|(h, n)| Op::Commit(h, n)),
        2 => (any::<usize>(), proptest::option::of(1i64..50)).prop_map(|(h, n)| Op::Refund(h, n)),
        1 => any::<usize>().prop_map(Op::Extend),
        2 => any::<usize>().prop_map(Op::Retry),
        1 => (0u8..3, proptest::option::of(1i64..80)).prop_map(|(a, b)| Op::Open(a, b)),
        1 => (0u8..3, any::<bool>()).prop_map(|(a, pro)| Op::SetPlan(a, pro)),
    ]
}

#[derive(Clone, Debug)]
enum Cmd {
    Grant(GrantCredits),
    Adjust(Adjust),
    Transfer(Transfer),
    Reserve(Reserve),
    Commit(CommitHold),
    Refund(Refund),
    Extend(ExtendHold),
    Open(OpenAccount),
    SetPlan(SetPlan),
}

/// What must agree between model and backend: everything but ids and timestamps.
#[derive(Debug, PartialEq)]
enum Summary {
    Reserve {
        amount: i64,
        available: i64,
    },
    Commit {
        committed: i64,
        released: i64,
        extra: i64,
        available: i64,
    },
    Refund {
        refunded: i64,
        state: HoldState,
        total: i64,
        available: i64,
    },
    Extend {
        state: HoldState,
    },
    Grant {
        available: i64,
    },
    Plan {
        previous: String,
        plan: String,
    },
    Open {
        plan: String,
        bonus: i64,
        available: i64,
    },
    Moved {
        available: (i64, i64),
    },
    Refused(LedgerError),
}

fn summary(r: Result<Outcome, LedgerError>) -> Summary {
    match r {
        Ok(Outcome::Reserve(o)) => Summary::Reserve {
            amount: o.hold.amount,
            available: o.available,
        },
        Ok(Outcome::Commit(o)) => Summary::Commit {
            committed: o.hold.committed_amount,
            released: o.released,
            extra: o.extra_drawn,
            available: o.available,
        },
        Ok(Outcome::Refund(o)) => Summary::Refund {
            refunded: o.refunded,
            state: o.hold.state,
            total: o.hold.refunded_amount,
            available: o.available,
        },
        Ok(Outcome::Extend(o)) => Summary::Extend {
            state: o.hold.state,
        },
        Ok(Outcome::Plan(o)) => Summary::Plan {
            previous: o.previous_plan,
            plan: o.plan,
        },
        Ok(Outcome::Adjust(o)) => Summary::Grant {
            available: o.available,
        },
        Ok(Outcome::Open(o)) => Summary::Open {
            plan: o.plan,
            bonus: o.bonus,
            available: o.available,
        },
        Ok(Outcome::Transfer(o)) => Summary::Moved {
            available: (o.from.1, o.to.1),
        },
        Ok(Outcome::Grant(o)) => Summary::Grant {
            available: o.available,
        },
        Err(e) => Summary::Refused(e),
    }
}

fn rejected<T>(r: Result<T, StorageError>) -> Result<T, LedgerError> {
    r.map_err(|e| match e {
        StorageError::Rejected(e) => e,
        other => panic!("backend failed: {other:?}"),
    })
}

async fn on_store(store: &Engine, key: &str, cmd: &Cmd) -> Result<Outcome, LedgerError> {
    let i = |fp| idem("diff", key, fp);
    match cmd {
        Cmd::Grant(c) => {
            rejected(store.grant(&i(c.fingerprint()), c).await).map(|a| a.outcome.into())
        }
        Cmd::Adjust(c) => {
            rejected(store.adjust(&i(c.fingerprint()), c).await).map(|a| a.outcome.into())
        }
        Cmd::Transfer(c) => {
            rejected(store.transfer(&i(c.fingerprint()), c).await).map(|a| a.outcome.into())
        }
        Cmd::Reserve(c) => {
            rejected(store.reserve(&i(c.fingerprint()), c).await).map(|a| a.outcome.into())
        }
        Cmd::Commit(c) => {
            rejected(store.commit_hold(&i(c.fingerprint()), c).await).map(|a| a.outcome.into())
        }
        Cmd::Refund(c) => {
            rejected(store.refund(&i(c.fingerprint()), c).await).map(|a| a.outcome.into())
        }
        Cmd::Extend(c) => {
            rejected(store.extend_hold(&i(c.fingerprint()), c).await).map(|a| a.outcome.into())
        }
        Cmd::Open(c) => {
            rejected(store.open_account(&i(c.fingerprint()), c).await).map(|a| a.outcome.into())
        }
        Cmd::SetPlan(c) => {
            rejected(store.set_plan(&i(c.fingerprint()), c).await).map(|a| a.outcome.into())
        }
    }
}

fn on_model(
    model: &mut Model,
    key: &str,
    cmd: &Cmd,
    now: DateTime<Utc>,
) -> Result<Outcome, LedgerError> {
    let i = |fp| idem("diff", key, fp);
    match cmd {
        Cmd::Grant(c) => model.grant(&i(c.fingerprint()), c, now).map(Into::into),
        Cmd::Adjust(c) => model.adjust(&i(c.fingerprint()), c, now).map(Into::into),
        Cmd::Transfer(c) => model.transfer(&i(c.fingerprint()), c, now).map(Into::into),
        Cmd::Reserve(c) => model.reserve(&i(c.fingerprint()), c, now).map(Into::into),
        Cmd::Commit(c) => model
            .commit_hold(&i(c.fingerprint()), c, now)
            .map(Into::into),
        Cmd::Refund(c) => model.refund(&i(c.fingerprint()), c, now).map(Into::into),
        Cmd::Extend(c) => model
            .extend_hold(&i(c.fingerprint()), c, now)
            .map(Into::into),
        Cmd::Open(c) => model
            .open_account(&i(c.fingerprint()), c, now)
            .map(Into::into),
        Cmd::SetPlan(c) => model.set_plan(&i(c.fingerprint()), c, now).map(Into::into),
    }
}

static RUN: AtomicU64 = AtomicU64::new(0);

async fn run_case(store: &Engine, ops: Vec<Op>) -> Result<(), TestCaseError> {
    // Every case (and every shrink step) works on accounts and keys of its own.
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let acct = |a: u8| format!("r{run}-a{a}");
    let mut model = Model::new(None);
    // Holds live an hour: nothing expires during a case, so the model's clock does not matter.
    let now = Utc::now();
    let ttl = TimeDelta::hours(1);
    let mut holds: Vec<HoldId> = Vec::new();
    let mut sent: Vec<(String, Cmd)> = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        let pick = |i: usize| holds.get(i % holds.len().max(1)).cloned();
        let (key, cmd) = match op {
            Op::Grant(a, n, days, priority) => (
                format!("r{run}-{step}"),
                Cmd::Grant(GrantCredits {
                    account_id: account(&acct(a)),
                    amount: credits(n),
                    reason: "d".into(),
                    source: Source::Promotion,
                    expires_at: days.map(|d| now + TimeDelta::days(d)),
                    priority,
                }),
            ),
            Op::Adjust(a, d) => (
                format!("r{run}-{step}"),
                Cmd::Adjust(Adjust {
                    account_id: account(&acct(a)),
                    delta: d,
                    reason: "fix".into(),
                    operator: "ops".into(),
                }),
            ),
            Op::Transfer(f, t, n) => (
                format!("r{run}-{step}"),
                Cmd::Transfer(Transfer {
                    from: account(&acct(f)),
                    to: account(&acct(t)),
                    amount: credits(n),
                    reason: "gift".into(),
                }),
            ),
            Op::Reserve(a, n) => (
                format!("r{run}-{step}"),
                Cmd::Reserve(Reserve {
                    account_id: account(&acct(a)),
                    amount: credits(n),
                    ttl,
                    ttl_given: true,
                    metadata: Metadata::default(),
                    hold_id: new_hold_id(),
                    priced: None,
                }),
            ),
            Op::Commit(h, n) => match pick(h) {
                Some(h) => (
                    format!("r{run}-{step}"),
                    Cmd::Commit(CommitHold {
                        hold_id: h,
                        amount: credits(n),
                    }),
                ),
                None => continue,
            },
            Op::Refund(h, n) => match pick(h) {
                Some(h) => (
                    format!("r{run}-{step}"),
                    Cmd::Refund(Refund {
                        hold_id: h,
                        amount: n.map(credits),
                        reason: String::new(),
                    }),
                ),
                None => continue,
            },
            Op::Extend(h) => match pick(h) {
                Some(h) => (
                    format!("r{run}-{step}"),
                    Cmd::Extend(ExtendHold { hold_id: h, ttl }),
                ),
                None => continue,
            },
            Op::Open(a, bonus) => (
                format!("r{run}-{step}"),
                Cmd::Open(OpenAccount {
                    account_id: account(&acct(a)),
                    plan: "free".into(),
                    bonus: bonus.map(|n| (credits(n), Some(TimeDelta::days(30)))),
                }),
            ),
            Op::SetPlan(a, pro) => (
                format!("r{run}-{step}"),
                Cmd::SetPlan(SetPlan {
                    account_id: account(&acct(a)),
                    plan: if pro { "pro" } else { "free" }.into(),
                }),
            ),
            Op::Retry(back) if !sent.is_empty() => sent[back % sent.len()].clone(),
            Op::Retry(_) => continue,
        };
        let got = on_store(store, &key, &cmd).await;
        let want = on_model(&mut model, &key, &cmd, now);
        if let (Ok(Outcome::Reserve(o)), Cmd::Reserve(_)) = (&got, &cmd) {
            holds.push(HoldId::parse("h", &o.hold.hold_id).unwrap());
        }
        prop_assert_eq!(summary(got), summary(want), "step {} {:?}", step, cmd);
        for a in 0..3 {
            let b = store
                .balance(&account(&acct(a)))
                .await
                .ok()
                .map(|b| (b.available, b.held, b.open_holds, b.plan));
            let m = model
                .balance(&acct(a), now)
                .ok()
                .map(|b| (b.available, b.held, b.open_holds, b.plan));
            prop_assert_eq!(b, m, "balance of {} after step {}", acct(a), step);
        }
        sent.push((key, cmd));
    }
    Ok(())
}

async fn backend_agrees_with_the_reference_model(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store: Engine = db.store().await;
    let handle = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        tokio::task::block_in_place(|| handle.block_on(run_case(&store, ops)))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert_ledger_balances(&store).await;
}

crate::on_both_backends!(backend_agrees_with_the_reference_model);
