//! Stripe histories in any order (issue 22): random histories of one account's payments —
//! purchases (completed, pending, async succeeded or failed, the success-page sync), cumulative
//! partial and full refunds, disputes and inquiries opened, won or lost (some naming only their
//! charge) — and of its subscriptions (created, updated, a failed renewal, deleted, with their
//! `created` times; paid invoices), delivered in a random order with random duplicates, on a
//! real backend and on the reference model. After every event the balances and plans agree; at
//! the end they equal what the facts say (computed here from the history itself, independently
//! of any order) and the audit is clean.

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::Utc;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tally::domain::book::Source;
use tally::domain::model::{Ledger as Model, Stripe as StripeModel};
use tally::domain::payment::{Charge, Dispute, DisputeStatus, Fact, Subscription};
use tally::domain::payment::{PackGrant, StripeEffect, StripeEvent};
use tally::ledger::Engine;
use tally::storage::StorageError;
use tally::stripe::event::SubscriptionState;

use crate::support::{Backend, TestDb, assert_ledger_balances};

const CREDITS: i64 = 500;
const PAID: i64 = 1900;

/// What really happened to one payment, in Stripe's own order.
#[derive(Clone, Debug)]
struct History {
    /// Paid at last (else the async payment failed).
    paid: bool,
    /// Completed unpaid first (an asynchronous method).
    async_method: bool,
    /// Cumulative refunds, increasing.
    refunds: Vec<i64>,
    /// A dispute: how it ends (None: still open), and whether its events name the PaymentIntent.
    dispute: Option<(Option<DisputeStatus>, bool)>,
}

fn history() -> impl Strategy<Value = History> {
    (
        proptest::bool::weighted(0.85),
        any::<bool>(),
        proptest::collection::vec(1i64..=PAID, 0..3),
        proptest::option::of((
            proptest::option::of(prop_oneof![
                Just(DisputeStatus::Won),
                Just(DisputeStatus::Lost)
            ]),
            any::<bool>(),
        )),
    )
        .prop_map(|(paid, async_method, mut refunds, dispute)| {
            refunds.sort_unstable();
            History {
                paid,
                async_method,
                refunds,
                dispute,
            }
        })
}

/// One delivery: its event id and what it says.
#[derive(Clone, Debug)]
enum Delivery {
    Payment(String, Option<String>, Fact),
    Subscription(String, Subscription),
    PaymentFailed(String, String, i64),
    Invoice(String, String),
}

/// Credits of one paid subscription invoice.
const INVOICE_CREDITS: i64 = 100;

/// What really happened to one subscription: its plan, then (each optional, in this order) a
/// plan change, a failed renewal, its end; and how many periods were paid.
#[derive(Clone, Debug)]
struct SubHistory {
    plan: &'static str,
    changed_to: Option<&'static str>,
    failed: bool,
    ended: bool,
    invoices: u8,
}

fn sub_history() -> impl Strategy<Value = SubHistory> {
    (
        prop_oneof![Just("pro"), Just("enterprise")],
        proptest::option::of(prop_oneof![Just("pro"), Just("enterprise")]),
        any::<bool>(),
        any::<bool>(),
        0u8..3,
    )
        .prop_map(|(plan, changed_to, failed, ended, invoices)| SubHistory {
            plan,
            changed_to,
            failed,
            ended,
            invoices,
        })
}

/// Subscription `n` of run `run`: its events with increasing `created` times (Stripe sends a
/// `customer.subscription.updated` to `past_due` beside every failed renewal invoice).
fn sub_deliveries(run: u64, n: usize, h: &SubHistory) -> Vec<Delivery> {
    let id = format!("sub_{run}_{n}");
    let started = 1_000 * (i64::try_from(n).unwrap() + 1);
    let state = |status: &str, plan: &str, as_of: i64| Subscription {
        subscription_id: id.clone(),
        account_id: format!("acct_{run}"),
        customer: format!("cus_{run}"),
        status: status.to_owned(),
        plan: plan.to_owned(),
        period_end: None,
        cancel_at_period_end: false,
        as_of,
        started,
    };
    let ev = |s: &str| format!("evt_{run}_{id}_{s}");
    let mut out = vec![Delivery::Subscription(
        ev("created"),
        state("active", h.plan, started),
    )];
    let mut plan = h.plan;
    if let Some(p) = h.changed_to {
        plan = p;
        out.push(Delivery::Subscription(
            ev("updated"),
            state("active", p, started + 10),
        ));
    }
    if h.failed {
        out.push(Delivery::PaymentFailed(
            ev("failed"),
            id.clone(),
            started + 20,
        ));
        out.push(Delivery::Subscription(
            ev("past_due"),
            state("past_due", plan, started + 20),
        ));
    }
    if h.ended {
        out.push(Delivery::Subscription(
            ev("deleted"),
            state("canceled", "free", started + 30),
        ));
    }
    for i in 0..h.invoices {
        out.push(Delivery::Invoice(
            ev(&format!("invoice{i}")),
            format!("invoice:in_{run}_{n}_{i}"),
        ));
        // The same invoice's `invoice.paid` again, under another event id.
        out.push(Delivery::Invoice(
            ev(&format!("invoice{i}_again")),
            format!("invoice:in_{run}_{n}_{i}"),
        ));
    }
    out
}

/// The plan the subscription histories end on: the newest (last started) one not ended.
fn expected_plan(subs: &[SubHistory]) -> &'static str {
    subs.iter()
        .rev()
        .find(|h| !h.ended)
        .map_or("free", |h| h.changed_to.unwrap_or(h.plan))
}

fn deliveries(run: u64, n: usize, h: &History) -> Vec<Delivery> {
    let key = format!("checkout_session:cs_{run}_{n}");
    let pi = format!("pi_{run}_{n}");
    let ch = format!("ch_{run}_{n}");
    let paid = Fact::Paid {
        account_id: format!("acct_{run}"),
        credits: CREDITS,
        payment_intent: Some(pi.clone()),
        amount_paid: PAID,
    };
    let mut out: Vec<Delivery> = Vec::new();
    let id = |s: &str| format!("evt_{run}_{n}_{s}");
    if h.async_method {
        out.push(Delivery::Payment(
            id("pending"),
            Some(key.clone()),
            Fact::Pending,
        ));
    }
    if h.paid {
        out.push(Delivery::Payment(
            id("paid"),
            Some(key.clone()),
            paid.clone(),
        ));
        // The success-page sync and an async success: the same fact through other ids.
        out.push(Delivery::Payment(id("sync"), Some(key.clone()), paid));
    } else {
        out.push(Delivery::Payment(
            id("failed"),
            Some(key.clone()),
            Fact::Failed,
        ));
    }
    for (i, r) in h.refunds.iter().enumerate() {
        out.push(Delivery::Payment(
            id(&format!("refund{i}")),
            None,
            Fact::Refund(Charge {
                charge_id: ch.clone(),
                payment_intent: Some(pi.clone()),
                amount: PAID,
                amount_refunded: *r,
            }),
        ));
    }
    if let Some((end, names_pi)) = h.dispute {
        let d = |status| {
            Fact::Dispute(Dispute {
                dispute_id: format!("dp_{run}_{n}"),
                charge_id: ch.clone(),
                payment_intent: names_pi.then(|| pi.clone()),
                amount: Some(PAID),
                status,
            })
        };
        out.push(Delivery::Payment(
            id("dispute"),
            None,
            d(DisputeStatus::Open),
        ));
        if let Some(end) = end {
            out.push(Delivery::Payment(id("closed"), None, d(end)));
        }
    }
    out
}

/// What the history says the account must hold, whatever the order: each paid purchase's
/// credits less what its refunds and disputes take (refunded share, rounded down, plus the
/// whole purchase while a dispute is open or lost, never more than the purchase) — except that
/// a dispute naming only its charge is unmatched unless a refund names its PaymentIntent.
fn expected(histories: &[History]) -> i64 {
    histories
        .iter()
        .filter(|h| h.paid)
        .map(|h| {
            let refunded = h.refunds.last().map_or(0, |r| CREDITS * r / PAID);
            let disputed = match h.dispute {
                Some((end, names_pi))
                    if end != Some(DisputeStatus::Won) && (names_pi || !h.refunds.is_empty()) =>
                {
                    CREDITS
                }
                _ => 0,
            };
            CREDITS - (refunded + disputed).min(CREDITS)
        })
        .sum()
}

fn effect(key: Option<&String>, fact: &Fact) -> StripeEffect {
    StripeEffect::Payment {
        business_key: key.cloned(),
        fact: fact.clone(),
        grant: Some(PackGrant {
            source: Source::Purchase,
            expires_in: None,
        }),
        reason: "property test".into(),
    }
}

fn event(id: &str) -> StripeEvent {
    StripeEvent {
        event_id: id.to_owned(),
        kind: "test".into(),
        livemode: false,
        created: Some(1),
        effect: "property test".into(),
        business_key: None,
    }
}

/// Sends one delivery to the backend and to the model.
async fn deliver(
    store: &Engine,
    model: &mut Model,
    stripe: &mut StripeModel,
    d: &Delivery,
    now: chrono::DateTime<Utc>,
) -> Result<(), String> {
    match d {
        Delivery::Payment(id, key, fact) => {
            store
                .record_stripe_event(&event(id), &effect(key.as_ref(), fact))
                .await
                .map_err(|e| e.to_string())?;
            stripe
                .record(model, id, key.as_deref(), fact, now)
                .map(|_| ())
                .map_err(|e| format!("model: {e}"))
        }
        Delivery::Subscription(id, sub) => {
            let state = SubscriptionState {
                customer: sub.customer.clone(),
                account_hint: Some(sub.account_id.clone()),
                subscription: sub.subscription_id.clone(),
                status: sub.status.clone(),
                plan: sub.plan.clone(),
                period_end: sub.period_end,
                cancel_at_period_end: sub.cancel_at_period_end,
                as_of: sub.as_of,
                started: sub.started,
            };
            store
                .record_stripe_event(&event(id), &StripeEffect::Subscription(state))
                .await
                .map_err(|e| e.to_string())?;
            stripe
                .record_subscription(model, id, sub.clone(), now)
                .map_err(|e| format!("model: {e}"))
        }
        Delivery::PaymentFailed(id, sub, as_of) => {
            let effect = StripeEffect::PaymentFailed {
                subscription: sub.clone(),
                as_of: *as_of,
            };
            store
                .record_stripe_event(&event(id), &effect)
                .await
                .map_err(|e| e.to_string())?;
            stripe
                .record_payment_failed(model, id, sub, *as_of, now)
                .map_err(|e| format!("model: {e}"))
        }
        Delivery::Invoice(id, key) => {
            // Invoices name their customer and account: `sub_<run>_<n>` → `acct_<run>`.
            let run = key.split('_').nth(1).unwrap_or_default();
            let account = format!("acct_{run}");
            let effect = StripeEffect::InvoiceGrant {
                business_key: key.clone(),
                customer: format!("cus_{run}"),
                account_hint: Some(crate::account(&account)),
                amount: crate::credits(INVOICE_CREDITS),
                expires_at: None,
                reason: "property test".into(),
            };
            store
                .record_stripe_event(&event(id), &effect)
                .await
                .map_err(|e| e.to_string())?;
            stripe
                .record_invoice(model, id, key, &account, INVOICE_CREDITS, now)
                .map_err(|e| format!("model: {e}"))
        }
    }
}

async fn balance(store: &Engine, account: &str) -> Option<(i64, String)> {
    match store.balance(&crate::account(account)).await {
        Ok(b) => Some((b.available, b.plan)),
        Err(StorageError::Rejected(_)) => None,
        Err(e) => panic!("{e}"),
    }
}

async fn run_case(
    store: &Engine,
    run: u64,
    histories: Vec<History>,
    subs: Vec<SubHistory>,
    order: Vec<usize>,
) -> Result<(), TestCaseError> {
    let account = format!("acct_{run}");
    let mut all: Vec<Delivery> = histories
        .iter()
        .enumerate()
        .flat_map(|(n, h)| deliveries(run, n, h))
        .chain(
            subs.iter()
                .enumerate()
                .flat_map(|(n, h)| sub_deliveries(run, n, h)),
        )
        .collect();
    // A random order with duplicates: `order` picks deliveries (repeats allowed), and every
    // delivery is sent at least once after them.
    let mut sequence: Vec<Delivery> = order
        .iter()
        .filter(|_| !all.is_empty())
        .map(|i| all[i % all.len()].clone())
        .collect();
    let mut rest = std::mem::take(&mut all);
    let mut x = run | 1;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = usize::try_from(x % u64::try_from(rest.len()).unwrap()).unwrap();
        sequence.push(rest.swap_remove(i));
    }
    let mut model = Model::new(None);
    let mut stripe = StripeModel::default();
    let now = Utc::now();
    for (step, d) in sequence.iter().enumerate() {
        deliver(store, &mut model, &mut stripe, d, now)
            .await
            .map_err(|e| TestCaseError::fail(format!("step {step} {d:?}: {e}")))?;
        let want = model
            .balance(&account, now)
            .ok()
            .map(|b| (b.available, b.plan));
        prop_assert_eq!(
            balance(store, &account).await,
            want,
            "step {} {:?}",
            step,
            d
        );
    }
    let exists = histories.iter().any(|h| h.paid) || !subs.is_empty();
    let invoices: i64 = subs.iter().map(|h| i64::from(h.invoices)).sum();
    let want = exists.then(|| {
        (
            expected(&histories) + invoices * INVOICE_CREDITS,
            expected_plan(&subs).to_owned(),
        )
    });
    prop_assert_eq!(
        balance(store, &account).await,
        want,
        "histories {:?} {:?}",
        histories,
        subs
    );
    let violations = store
        .audit()
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(violations.is_empty(), "{:?}", violations);
    Ok(())
}

async fn stripe_histories_in_any_order_agree_with_the_model_and_the_facts(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store: Engine = db.store().await;
    let handle = tokio::runtime::Handle::current();
    let runs = AtomicU64::new(1);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::vec(history(), 0..4),
        proptest::collection::vec(sub_history(), 0..3),
        proptest::collection::vec(any::<usize>(), 0..8),
    );
    let result = runner.run(&strategy, |(histories, subs, order)| {
        let run = runs.fetch_add(1, Ordering::Relaxed);
        tokio::task::block_in_place(|| {
            handle.block_on(run_case(&store, run, histories, subs, order))
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert_ledger_balances(&store).await;
}

/// Claw-backs recorded before charges and disputes were facts of their own (before migration
/// 0009: a `refund:<charge>` or `dispute:<id>` fact, nothing on the purchase) are folded in by
/// the next event of the same charge or dispute: never taken twice, and given back when a
/// dispute is won.
async fn claw_backs_recorded_before_the_upgrade_are_not_taken_twice(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store: Engine = db.store().await;
    let s = &store;
    let deliver = |id: &'static str, key: Option<&str>, fact: Fact| {
        let key = key.map(str::to_owned);
        async move {
            s.record_stripe_event(&event(id), &effect(key.as_ref(), &fact))
                .await
                .unwrap();
        }
    };
    let paid = |account: &str, pi: &str| Fact::Paid {
        account_id: account.into(),
        credits: CREDITS,
        payment_intent: Some(pi.into()),
        amount_paid: PAID,
    };
    let refund = |ch: &str, pi: &str, refunded: i64| {
        Fact::Refund(Charge {
            charge_id: ch.into(),
            payment_intent: Some(pi.into()),
            amount: PAID,
            amount_refunded: refunded,
        })
    };
    let dispute = |status| {
        Fact::Dispute(Dispute {
            dispute_id: "dp_old".into(),
            charge_id: "ch_d".into(),
            payment_intent: Some("pi_d".into()),
            amount: Some(PAID),
            status,
        })
    };
    // Today's code books them, then the rows are turned into what the old code kept.
    deliver("e1", Some("checkout_session:cs_r"), paid("old_r", "pi_r")).await;
    deliver("e2", None, refund("ch_r", "pi_r", PAID / 2)).await;
    deliver("e3", Some("checkout_session:cs_d"), paid("old_d", "pi_d")).await;
    deliver("e4", None, dispute(DisputeStatus::Open)).await;
    let legacy = [
        "DELETE FROM stripe_charge",
        "DELETE FROM stripe_dispute",
        "UPDATE stripe_fact SET clawed = 0",
        "INSERT INTO stripe_fact (business_key, account_id, state, credits, created_at, updated_at)
         VALUES ('refund:ch_r', 'old_r', 'clawed', 250, 0, 0), ('dispute:dp_old', 'old_d', 'clawed', 500, 0, 0)",
    ];
    for q in legacy {
        match backend {
            Backend::Postgres => {
                let q = q.replace(", 0, 0)", ", now(), now())");
                sqlx::query(sqlx::AssertSqlSafe(q))
                    .execute(db.postgres().await.pool())
                    .await
                    .unwrap();
            }
            Backend::Sqlite => {
                sqlx::query(sqlx::AssertSqlSafe(q.to_owned()))
                    .execute(db.sqlite().await.pool())
                    .await
                    .unwrap();
            }
        }
    }
    assert_eq!(balance(s, "old_r").await.unwrap().0, 250);
    assert_eq!(balance(s, "old_d").await.unwrap().0, 0);
    // The rest of the charge refunded: 250 more, not 500.
    deliver("e5", None, refund("ch_r", "pi_r", PAID)).await;
    assert_eq!(balance(s, "old_r").await.unwrap().0, 0);
    // The old dispute won: what it took comes back, once.
    deliver("e6", None, dispute(DisputeStatus::Won)).await;
    deliver("e7", None, dispute(DisputeStatus::Won)).await;
    assert_eq!(balance(s, "old_d").await.unwrap().0, CREDITS);
    assert_ledger_balances(s).await;
}

crate::on_both_backends!(
    stripe_histories_in_any_order_agree_with_the_model_and_the_facts,
    claw_backs_recorded_before_the_upgrade_are_not_taken_twice,
);
