//! Stripe histories in any order (issue 22): random histories of one account's payments —
//! purchases (completed, pending, async succeeded or failed), cumulative partial and full
//! refunds, disputes and inquiries opened, won or lost (some naming only their charge) —
//! delivered in a random order with random duplicates, on a real backend and on the reference
//! model. After every event the balances agree; at the end they equal what the facts say
//! (computed here from the history itself, independently of any order) and the audit is clean.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::Utc;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tally::domain::book::Source;
use tally::domain::model::{Ledger as Model, Stripe as StripeModel};
use tally::domain::payment::{Charge, Dispute, DisputeStatus, Fact};
use tally::storage::{PackGrant, StorageError, Store, StripeEffect, StripeEvent};

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

/// One delivery: event id, business key, fact.
type Delivery = (String, Option<String>, Fact);

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
        out.push((id("pending"), Some(key.clone()), Fact::Pending));
    }
    if h.paid {
        out.push((id("paid"), Some(key.clone()), paid.clone()));
        // The success-page sync and an async success: the same fact through other ids.
        out.push((id("sync"), Some(key.clone()), paid));
    } else {
        out.push((id("failed"), Some(key.clone()), Fact::Failed));
    }
    for (i, r) in h.refunds.iter().enumerate() {
        out.push((
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
        out.push((id("dispute"), None, d(DisputeStatus::Open)));
        if let Some(end) = end {
            out.push((id("closed"), None, d(end)));
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

async fn balance(store: &dyn Store, account: &str) -> Option<i64> {
    match store.balance(&crate::account(account)).await {
        Ok(b) => Some(b.available),
        Err(StorageError::Rejected(_)) => None,
        Err(e) => panic!("{e}"),
    }
}

async fn run_case(
    store: &dyn Store,
    run: u64,
    histories: Vec<History>,
    order: Vec<usize>,
) -> Result<(), TestCaseError> {
    let account = format!("acct_{run}");
    let mut all: Vec<Delivery> = histories
        .iter()
        .enumerate()
        .flat_map(|(n, h)| deliveries(run, n, h))
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
    for (step, (event_id, key, fact)) in sequence.iter().enumerate() {
        let event = StripeEvent {
            event_id: event_id.clone(),
            kind: "test".into(),
            livemode: false,
            created: Some(1),
            effect: "property test".into(),
        };
        store
            .record_stripe_event(&event, &effect(key.as_ref(), fact))
            .await
            .map_err(|e| TestCaseError::fail(format!("step {step}: {e}")))?;
        stripe
            .record(&mut model, event_id, key.as_deref(), fact, now)
            .map_err(|e| TestCaseError::fail(format!("model, step {step}: {e}")))?;
        let want = model.balance(&account, now).ok().map(|b| b.available);
        prop_assert_eq!(
            balance(store, &account).await,
            want,
            "step {} {:?}",
            step,
            fact
        );
    }
    let any_paid = histories.iter().any(|h| h.paid);
    let got = balance(store, &account).await;
    prop_assert_eq!(
        got,
        any_paid.then(|| expected(&histories)),
        "histories {:?}",
        histories
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
    let store: Arc<dyn Store> = db.store().await;
    let handle = tokio::runtime::Handle::current();
    let runs = AtomicU64::new(1);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::vec(history(), 1..4),
        proptest::collection::vec(any::<usize>(), 0..8),
    );
    let result = runner.run(&strategy, |(histories, order)| {
        let run = runs.fetch_add(1, Ordering::Relaxed);
        tokio::task::block_in_place(|| {
            handle.block_on(run_case(store.as_ref(), run, histories, order))
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert_ledger_balances(store.as_ref()).await;
}

crate::on_both_backends!(stripe_histories_in_any_order_agree_with_the_model_and_the_facts);
