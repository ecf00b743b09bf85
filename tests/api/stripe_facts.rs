//! Money at the Stripe boundary (issue 22): every purchase granted once whatever the
//! concurrency, claw-backs that never exceed the purchase whatever the order, subscriptions
//! keyed by id. Each regression here failed on the main before the Stripe fact machine.

use std::sync::Arc;

use serde_json::{Value, json};
use tally::pb;
use tokio::task::JoinSet;

use crate::support::{Backend, TestApp};

/// Rounds of every race: each starts from nothing (a new session, a new account).
pub const ROUNDS: usize = 20;

fn event(id: &str, kind: &str, created: i64, object: &Value) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"id": id, "object": "event", "api_version": "2026-09-30.endive",
        "type": kind, "created": created, "livemode": false, "data": {"object": object}}),
    )
    .unwrap()
}

/// A paid `checkout.session.completed` of a starter pack (500 credits, paid 1900).
pub fn paid_session(event_id: &str, session: &str, account: &str, pi: &str) -> Vec<u8> {
    event(
        event_id,
        "checkout.session.completed",
        1_764_000_000,
        &json!({"id": session, "object": "checkout.session", "mode": "payment", "payment_status": "paid",
            "status": "complete", "client_reference_id": account, "customer": "cus_F1",
            "payment_intent": pi, "amount_total": 1900, "currency": "usd",
            "metadata": {"account_id": account, "pack_id": "starter"}}),
    )
}

pub fn refund(event_id: &str, charge: &str, pi: Option<&str>, refunded: i64) -> Vec<u8> {
    event(
        event_id,
        "charge.refunded",
        1_764_000_100,
        &json!({"id": charge, "object": "charge", "payment_intent": pi, "amount": 1900,
            "amount_refunded": refunded, "refunded": refunded == 1900}),
    )
}

fn dispute(event_id: &str, kind: &str, charge: &str, pi: Option<&str>, status: &str) -> Vec<u8> {
    event(
        event_id,
        kind,
        1_764_000_200,
        &json!({"id": format!("dp_{charge}"), "object": "dispute", "charge": charge,
            "payment_intent": pi, "amount": 1900, "status": status}),
    )
}

pub async fn available(app: &TestApp, account: &str) -> Option<i64> {
    let mut c = app.credit().await;
    c.check_balance(pb::CheckBalanceRequest {
        account_id: account.into(),
    })
    .await
    .ok()
    .map(|r| r.into_inner().available)
}

async fn deliver_all(app: &Arc<TestApp>, bodies: Vec<Vec<u8>>) -> Vec<(u16, Value)> {
    let mut set = JoinSet::new();
    for body in bodies {
        let app = Arc::clone(app);
        set.spawn(async move { app.post_webhook(&body).await });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    out
}

/// Item 1: 2, 8 and 16 first deliveries of one paid session (distinct event ids) at the same
/// instant grant one pack, each round from nothing: no fact, no account.
async fn race_cold_first_deliveries_of_one_paid_session_grant_once(backend: Backend) {
    let app = Arc::new(TestApp::spawn(backend).await);
    for n in [2usize, 8, 16] {
        for round in 0..ROUNDS {
            let account = format!("cold-{n}-{round}");
            let session = format!("cs_cold_{n}_{round}");
            let pi = format!("pi_cold_{n}_{round}");
            let bodies = (0..n)
                .map(|i| paid_session(&format!("evt_{session}_{i}"), &session, &account, &pi))
                .collect();
            let replies = deliver_all(&app, bodies).await;
            let granted = replies
                .iter()
                .filter(|(s, r)| *s == 200 && r["granted"] == true)
                .count();
            assert!(
                replies.iter().all(|(s, _)| *s == 200),
                "{n} deliveries, round {round}: {replies:?}"
            );
            assert_eq!(granted, 1, "{n} deliveries, round {round}");
            assert_eq!(
                available(&app, &account).await,
                Some(500),
                "{n} deliveries, round {round}: one starter pack"
            );
        }
    }
    Arc::into_inner(app).unwrap().finish().await;
}

/// Item 2: two `charge.refunded` of one charge (cumulative 50 % and 100 %) at once take back
/// exactly the purchase, warm (purchase first) and cold (refunds racing the purchase itself).
async fn race_concurrent_partial_refunds_claw_back_exactly(backend: Backend) {
    let app = Arc::new(TestApp::spawn(backend).await);
    for round in 0..ROUNDS {
        let account = format!("refunded-{round}");
        let (session, pi, ch) = (
            format!("cs_r_{round}"),
            format!("pi_r_{round}"),
            format!("ch_r_{round}"),
        );
        assert_eq!(
            app.post_webhook(&paid_session(
                &format!("evt_buy_{round}"),
                &session,
                &account,
                &pi
            ))
            .await
            .0,
            200
        );
        let replies = deliver_all(
            &app,
            vec![
                refund(&format!("evt_half_{round}"), &ch, Some(&pi), 950),
                refund(&format!("evt_full_{round}"), &ch, Some(&pi), 1900),
            ],
        )
        .await;
        assert!(replies.iter().all(|(s, _)| *s == 200), "{replies:?}");
        assert_eq!(available(&app, &account).await, Some(0), "round {round}");
        // Cold: the purchase and both refunds at once, nothing stored before.
        let account = format!("cold-refunded-{round}");
        let (session, pi, ch) = (
            format!("cs_cr_{round}"),
            format!("pi_cr_{round}"),
            format!("ch_cr_{round}"),
        );
        let replies = deliver_all(
            &app,
            vec![
                refund(&format!("evt_chalf_{round}"), &ch, Some(&pi), 950),
                paid_session(&format!("evt_cbuy_{round}"), &session, &account, &pi),
                refund(&format!("evt_cfull_{round}"), &ch, Some(&pi), 1900),
                paid_session(&format!("evt_cbuy2_{round}"), &session, &account, &pi),
            ],
        )
        .await;
        assert!(replies.iter().all(|(s, _)| *s == 200), "{replies:?}");
        assert_eq!(
            available(&app, &account).await,
            Some(0),
            "cold round {round}"
        );
    }
    Arc::into_inner(app).unwrap().finish().await;
}

/// Item 3: an inquiry, then a refund of the whole charge: the purchase is taken back once.
async fn a_dispute_and_a_refund_of_one_charge_claw_back_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.post_webhook(&paid_session("evt_p", "cs_inq", "inq", "pi_inq"))
        .await;
    app.fund("inq", 5).await;
    assert_eq!(available(&app, "inq").await, Some(505));
    let (s, r) = app
        .post_webhook(&dispute(
            "evt_d",
            "charge.dispute.created",
            "ch_inq",
            Some("pi_inq"),
            "warning_needs_response",
        ))
        .await;
    assert_eq!((s, r["credits"]["clawed"].as_i64()), (200, Some(500)));
    assert_eq!(available(&app, "inq").await, Some(5));
    let (s, r) = app
        .post_webhook(&refund("evt_r", "ch_inq", Some("pi_inq"), 1900))
        .await;
    assert_eq!((s, r["credits"]["clawed"].as_i64()), (200, Some(0)));
    assert_eq!(available(&app, "inq").await, Some(5), "no phantom debt");
    // The inquiry closes (the merchant refunded): nothing comes back, the refund stands.
    app.post_webhook(&dispute(
        "evt_dc",
        "charge.dispute.closed",
        "ch_inq",
        Some("pi_inq"),
        "warning_closed",
    ))
    .await;
    assert_eq!(available(&app, "inq").await, Some(5));
    app.finish().await;
}

/// Item 4: a refund and a dispute that arrive before their purchase are applied when it lands.
async fn claw_backs_before_their_purchase_apply_when_it_lands(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (s, r) = app
        .post_webhook(&refund("evt_r_early", "ch_early", Some("pi_early"), 950))
        .await;
    assert_eq!((s, r["granted"].as_bool()), (200, Some(false)));
    assert_eq!(
        available(&app, "early").await,
        None,
        "nothing to take from yet"
    );
    let (s, r) = app
        .post_webhook(&paid_session("evt_p_late", "cs_late", "early", "pi_early"))
        .await;
    assert_eq!(
        (
            s,
            r["credits"]["granted"].as_i64(),
            r["credits"]["clawed"].as_i64()
        ),
        (200, Some(500), Some(250)),
        "{r}"
    );
    assert_eq!(available(&app, "early").await, Some(250));
    // A dispute first, then its purchase.
    app.post_webhook(&dispute(
        "evt_d_early",
        "charge.dispute.created",
        "ch_early2",
        Some("pi_early2"),
        "needs_response",
    ))
    .await;
    app.post_webhook(&paid_session(
        "evt_p_late2",
        "cs_late2",
        "early2",
        "pi_early2",
    ))
    .await;
    assert_eq!(available(&app, "early2").await, Some(0));
    // Won later: the credits come back once.
    for id in ["evt_d_won", "evt_d_won_again"] {
        app.post_webhook(&dispute(
            id,
            "charge.dispute.closed",
            "ch_early2",
            Some("pi_early2"),
            "won",
        ))
        .await;
    }
    assert_eq!(available(&app, "early2").await, Some(500));
    app.finish().await;
}

/// Item 5: a dispute that names only its charge (older API versions) is matched through the
/// charge once a refund of it names the PaymentIntent, and claws then.
async fn a_dispute_naming_only_its_charge_claws_back(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.post_webhook(&paid_session("evt_p", "cs_old", "oldapi", "pi_old"))
        .await;
    let (s, _) = app
        .post_webhook(&dispute(
            "evt_d",
            "charge.dispute.created",
            "ch_old",
            None,
            "needs_response",
        ))
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        available(&app, "oldapi").await,
        Some(500),
        "no Stripe client here to read the charge: the dispute waits for its PaymentIntent"
    );
    // A refund of 10 % names the charge's PaymentIntent: the dispute applies with it, and
    // together they never take more than the purchase.
    app.post_webhook(&refund("evt_r", "ch_old", Some("pi_old"), 190))
        .await;
    assert_eq!(available(&app, "oldapi").await, Some(0));
    app.finish().await;
}

fn subscription(id: &str, status: &str, price: &str, created: i64) -> Value {
    json!({"id": id, "object": "subscription", "customer": "cus_S1", "status": status, "created": created,
           "cancel_at_period_end": false, "metadata": {"account_id": "subs"},
           "items": {"data": [{"price": {"id": price}, "current_period_end": 1_766_000_000}]}})
}

async fn plan_of(app: &TestApp, account: &str) -> String {
    billing(app, account).await["plan"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The billing view of an account.
pub async fn billing(app: &TestApp, account: &str) -> Value {
    reqwest::get(format!("http://{}/v1/accounts/{account}/billing", app.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Item 6: an older `invoice.payment_failed` does not overwrite a newer subscription state.
async fn an_older_payment_failure_does_not_overwrite_a_newer_state(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let sub = subscription("sub_A", "active", "price_pro_placeholder", 100);
    app.post_webhook(&event("evt_s1", "customer.subscription.updated", 500, &sub))
        .await;
    let invoice =
        json!({"id": "in_1", "object": "invoice", "customer": "cus_S1", "subscription": "sub_A"});
    app.post_webhook(&event("evt_f_old", "invoice.payment_failed", 400, &invoice))
        .await;
    assert_eq!(
        billing(&app, "subs").await["subscription"]["status"],
        "active"
    );
    app.post_webhook(&event("evt_f_new", "invoice.payment_failed", 600, &invoice))
        .await;
    assert_eq!(
        billing(&app, "subs").await["subscription"]["status"],
        "past_due"
    );
    assert_eq!(
        plan_of(&app, "subs").await,
        "pro",
        "past due keeps the plan"
    );
    app.finish().await;
}

/// Item 8: subscriptions are kept by id; deleting an older one leaves the newer live one's
/// plan, in either order; legacy payloads carry the price as a top-level `plan`.
async fn subscriptions_are_kept_by_id_and_the_newest_live_one_sets_the_plan(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let old = subscription("sub_old", "active", "price_pro_placeholder", 100);
    let new = subscription("sub_new", "active", "price_enterprise_placeholder", 200);
    app.post_webhook(&event("e1", "customer.subscription.created", 1000, &old))
        .await;
    app.post_webhook(&event("e2", "customer.subscription.created", 2000, &new))
        .await;
    assert_eq!(plan_of(&app, "subs").await, "enterprise");
    let mut gone = old.clone();
    gone["status"] = json!("canceled");
    app.post_webhook(&event("e3", "customer.subscription.deleted", 3000, &gone))
        .await;
    assert_eq!(
        plan_of(&app, "subs").await,
        "enterprise",
        "the newer one stays"
    );
    let b = billing(&app, "subs").await;
    assert_eq!(b["subscription"]["id"], "sub_new", "{b}");
    // An old update of the deleted one, delivered late, changes nothing.
    app.post_webhook(&event("e4", "customer.subscription.updated", 1500, &old))
        .await;
    assert_eq!(billing(&app, "subs").await["subscription"]["id"], "sub_new");
    let mut ended = new.clone();
    ended["status"] = json!("canceled");
    app.post_webhook(&event("e5", "customer.subscription.deleted", 4000, &ended))
        .await;
    assert_eq!(plan_of(&app, "subs").await, "free");

    // A legacy payload: no price on the items, the price as `plan`.
    let legacy = json!({"id": "sub_legacy", "object": "subscription", "customer": "cus_L1", "status": "active",
        "created": 10, "cancel_at_period_end": false, "metadata": {"account_id": "legacy"},
        "plan": {"id": "price_pro_placeholder", "object": "plan"}, "items": {"data": [{"id": "si_1"}]}});
    app.post_webhook(&event("e6", "customer.subscription.created", 10, &legacy))
        .await;
    assert_eq!(plan_of(&app, "legacy").await, "pro");
    app.finish().await;
}

/// Item 9 (metrics): claw-backs and the give-back of a won dispute are counted.
async fn claw_backs_and_give_backs_are_counted(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.post_webhook(&paid_session("evt_p", "cs_m", "metered", "pi_m"))
        .await;
    app.post_webhook(&dispute(
        "evt_d",
        "charge.dispute.created",
        "ch_m",
        Some("pi_m"),
        "needs_response",
    ))
    .await;
    app.post_webhook(&dispute(
        "evt_w",
        "charge.dispute.closed",
        "ch_m",
        Some("pi_m"),
        "won",
    ))
    .await;
    let text = reqwest::get(format!("http://{}/metrics", app.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(
        line("tally_clawbacks_total{kind=\"dispute\"}") >= 1.0,
        "{text}"
    );
    assert!(line("tally_credits_clawed_total{kind=\"dispute\"}") >= 500.0);
    assert!(
        line("tally_grants_total{source=\"refund\"}") >= 1.0,
        "{text}"
    );
    assert_eq!(available(&app, "metered").await, Some(500));
    app.finish().await;
}

crate::on_both_backends!(
    race_cold_first_deliveries_of_one_paid_session_grant_once,
    race_concurrent_partial_refunds_claw_back_exactly,
    a_dispute_and_a_refund_of_one_charge_claw_back_once,
    claw_backs_before_their_purchase_apply_when_it_lands,
    a_dispute_naming_only_its_charge_claws_back,
    an_older_payment_failure_does_not_overwrite_a_newer_state,
    subscriptions_are_kept_by_id_and_the_newest_live_one_sets_the_plan,
    claw_backs_and_give_backs_are_counted,
);

/// The audit finds what the old code left behind: a second grant of one Checkout Session that
/// no fact owns, and a purchase that lost more than it granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_reconciles_stripe_facts_with_the_books() {
    let app = TestApp::spawn(Backend::Postgres).await;
    app.post_webhook(&paid_session("evt_p", "cs_audit", "audited", "pi_a"))
        .await;
    let store = app.store.clone();
    assert!(store.audit().await.unwrap().is_empty());
    let pool = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    // What the cold race used to leave: a second purchase grant named after the session.
    sqlx::query(
        "INSERT INTO bucket (bucket_id, account_id, source, granted, remaining, held, expired, priority, reason, created_at)
         VALUES ('grt_dup', 'audited', 'purchase', 500, 0, 0, 0, 50, 'Starter (checkout_session:cs_audit; evt_q)', now())",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE stripe_fact SET clawed = credits + 1 WHERE business_key = 'checkout_session:cs_audit'")
        .execute(&pool)
        .await
        .unwrap();
    let found = store.audit().await.unwrap();
    let details: Vec<&str> = found.iter().map(|v| v.detail.as_str()).collect();
    assert!(
        details
            .iter()
            .any(|d| d.contains("grt_dup") && d.contains("no fact owns")),
        "{details:?}"
    );
    assert!(
        details.iter().any(|d| d.contains("clawed 501 of 500")),
        "{details:?}"
    );
    // A second grant tagged with the key is refused by the database itself.
    let dup = sqlx::query(
        "UPDATE bucket SET business_key = 'checkout_session:cs_audit' WHERE bucket_id = 'grt_dup'",
    )
    .execute(&pool)
    .await;
    assert!(dup.is_err(), "bucket_one_grant_per_business_key");
    pool.close().await;
}
