//! The Stripe webhook endpoint: signatures, the shared real fixtures, exactly-once grants.

use std::path::PathBuf;

use serde_json::{Value, json};
use tally::pb;
use tally::stripe::WebhookSecret;
use tally::stripe::signature::sign;
use tokio::task::JoinSet;

use crate::support::{Backend, TestApp, WEBHOOK_SECRET, WEBHOOK_SECRET_OLD};

/// The real Stripe payloads kept in the repository (`tests/fixtures/stripe/events`, with their
/// origins in `SOURCES.md`).
fn fixtures() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stripe/events");
    assert!(dir.is_dir(), "Stripe fixtures missing at {}", dir.display());
    dir
}

/// A `checkout.session.completed` for a session Tally created (its metadata names the account
/// and the pack), shaped like Stripe's real payloads.
pub fn tally_session_event(
    event_id: &str,
    kind: &str,
    session: &str,
    payment_status: &str,
) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": event_id, "object": "event", "api_version": "2026-09-30.endive", "created": 1_764_000_000,
        "livemode": false, "pending_webhooks": 1, "type": kind,
        "data": {"object": {
            "id": session, "object": "checkout.session", "mode": "payment", "payment_status": payment_status,
            "status": "complete", "client_reference_id": "buyer", "customer": "cus_T1",
            "payment_intent": "pi_T1", "amount_total": 1900, "currency": "usd",
            "metadata": {"account_id": "buyer", "pack_id": "starter"}
        }}
    }))
    .unwrap()
}

async fn available(app: &TestApp, account: &str) -> Option<i64> {
    let mut c = app.credit().await;
    c.check_balance(pb::CheckBalanceRequest {
        account_id: account.into(),
    })
    .await
    .ok()
    .map(|r| r.into_inner().available)
}

async fn refused_deliveries_write_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let body = tally_session_event("evt_sig", "checkout.session.completed", "cs_sig", "paid");
    let now = chrono::Utc::now().timestamp();
    let good = sign(&body, &WebhookSecret::new(WEBHOOK_SECRET), now);
    let old = sign(&body, &WebhookSecret::new(WEBHOOK_SECRET_OLD), now);
    let wrong = sign(&body, &WebhookSecret::new("whsec_wrong"), now);
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let stale = now - 301;
    // 5 s past the tolerance: the server reads its clock a moment after the test did.
    let future = now + 305;
    let cases: Vec<(Vec<u8>, String, &str)> = vec![
        (body.clone(), format!("t={now},v1={wrong}"), "wrong secret"),
        (tampered, format!("t={now},v1={good}"), "tampered body"),
        (
            body.clone(),
            format!(
                "t={stale},v1={}",
                sign(&body, &WebhookSecret::new(WEBHOOK_SECRET), stale)
            ),
            "stale",
        ),
        (
            body.clone(),
            format!(
                "t={future},v1={}",
                sign(&body, &WebhookSecret::new(WEBHOOK_SECRET), future)
            ),
            "future",
        ),
        (body.clone(), "v1=abc".to_owned(), "malformed"),
        (
            vec![b' '; 300 * 1024],
            format!("t={now},v1={good}"),
            "oversized",
        ),
    ];
    for (b, header, what) in cases {
        let (status, _) = app.post_webhook_signed(&b, &header).await;
        assert_eq!(status, 400, "{what}");
    }
    let resp = reqwest::Client::new()
        .post(format!("http://{}/stripe/webhook", app.http))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400, "missing header");
    assert_eq!(available(&app, "buyer").await, None, "nothing was granted");
    // Rotation: the old secret alone, and both values in either order, are accepted. The event
    // was never recorded by the refused deliveries, so the first accepted one grants.
    let (status, reply) = app
        .post_webhook_signed(&body, &format!("t={now},v1={old},v1={good}"))
        .await;
    assert_eq!((status, reply["granted"].as_bool()), (200, Some(true)));
    let (status, reply) = app
        .post_webhook_signed(&body, &format!("t={now},v1={good},v1={old}"))
        .await;
    assert_eq!((status, reply["duplicate"].as_bool()), (200, Some(true)));
    let (status, _) = app
        .post_webhook_signed(&body, &format!("t={now},v1={old}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(available(&app, "buyer").await, Some(500));
    app.finish().await;
}

async fn a_paid_session_grants_its_pack_exactly_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let completed = tally_session_event("evt_c1", "checkout.session.completed", "cs_once", "paid");
    for _ in 0..10 {
        assert_eq!(app.post_webhook(&completed).await.0, 200);
    }
    let mut set = JoinSet::new();
    let app = std::sync::Arc::new(app);
    for i in 0..10 {
        let app = std::sync::Arc::clone(&app);
        // The same fact through other event ids, concurrently: a resend and the async event.
        let body = if i % 2 == 0 {
            tally_session_event(
                &format!("evt_resend{i}"),
                "checkout.session.completed",
                "cs_once",
                "paid",
            )
        } else {
            tally_session_event(
                &format!("evt_async{i}"),
                "checkout.session.async_payment_succeeded",
                "cs_once",
                "paid",
            )
        };
        set.spawn(async move { app.post_webhook(&body).await.0 });
    }
    while let Some(s) = set.join_next().await {
        assert_eq!(s.unwrap(), 200);
    }
    assert_eq!(
        available(&app, "buyer").await,
        Some(500),
        "one starter pack"
    );
    // A late failure notice does not take a granted purchase back.
    let failed = tally_session_event(
        "evt_f",
        "checkout.session.async_payment_failed",
        "cs_once",
        "unpaid",
    );
    assert_eq!(app.post_webhook(&failed).await.0, 200);
    assert_eq!(available(&app, "buyer").await, Some(500));

    // Delayed payment: unpaid first (pending, nothing granted), then succeeded (granted once).
    let pending = tally_session_event(
        "evt_p1",
        "checkout.session.completed",
        "cs_delayed",
        "unpaid",
    );
    let (status, reply) = app.post_webhook(&pending).await;
    assert_eq!((status, reply["granted"].as_bool()), (200, Some(false)));
    assert_eq!(available(&app, "buyer").await, Some(500));
    let settled = tally_session_event(
        "evt_p2",
        "checkout.session.async_payment_succeeded",
        "cs_delayed",
        "paid",
    );
    assert_eq!(
        app.post_webhook(&settled).await.1["granted"].as_bool(),
        Some(true)
    );
    assert_eq!(available(&app, "buyer").await, Some(1000));
    let app = std::sync::Arc::into_inner(app).unwrap();
    app.finish().await;
}

async fn every_shared_fixture_is_accepted_and_grants_nothing_it_should_not(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut seen = 0;
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let raw = std::fs::read(&path).unwrap();
        let mut event: Value = serde_json::from_slice(&raw).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let body = if event.get("type").is_none() {
            // The data-only subscription session: wrap it in an envelope (SOURCES.md note 1).
            event = json!({"id": "evt_wrapped_subscription_session", "type": "checkout.session.completed",
                           "livemode": false, "data": event});
            serde_json::to_vec(&event).unwrap()
        } else {
            raw
        };
        let (status, reply) = app.post_webhook(&body).await;
        let live = event
            .get("livemode")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if live {
            assert_eq!(
                status, 400,
                "{name}: a live-mode event is refused by a test-mode server"
            );
        } else {
            assert_eq!(status, 200, "{name}: {reply}");
            assert_ne!(
                reply["granted"].as_bool(),
                Some(true),
                "{name}: no fixture carries a tally account and pack"
            );
        }
        seen += 1;
    }
    assert!(seen >= 12, "read {seen} fixtures");
    let mut admin = app.admin().await;
    let accounts = admin
        .list_accounts(pb::ListAccountsRequest {
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .accounts;
    assert!(
        accounts.is_empty(),
        "no fixture created an account: {accounts:?}"
    );
    app.finish().await;
}

async fn http_health_endpoints_answer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for path in ["healthz", "readyz"] {
        let r = reqwest::get(format!("http://{}/{path}", app.http))
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
    app.finish().await;
}

fn event(id: &str, kind: &str, created: i64, object: &Value) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"id": id, "object": "event", "type": kind, "created": created, "livemode": false,
                               "data": {"object": object}}),
    )
    .unwrap()
}

/// The end of the period paid for: a month from now (credits expire then).
fn period_end() -> i64 {
    chrono::Utc::now().timestamp() + 30 * 86_400
}

fn subscription(status: &str, cancel: bool) -> Value {
    json!({"id": "sub_T1", "object": "subscription", "customer": "cus_T9", "status": status,
           "cancel_at_period_end": cancel, "metadata": {"account_id": "subber"},
           "items": {"data": [{"price": {"id": "price_pro_placeholder"}, "current_period_end": 1_766_000_000}]}})
}

async fn billing_view(app: &TestApp) -> Value {
    crate::stripe_facts::billing(app, "subber").await
}

async fn subscriptions_mirror_state_and_paid_invoices_grant_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let session = json!({"id": "cs_sub", "object": "checkout.session", "mode": "subscription", "payment_status": "paid",
                         "customer": "cus_T9", "subscription": "sub_T1", "client_reference_id": "subber",
                         "metadata": {"account_id": "subber", "plan_id": "pro"}});
    assert_eq!(
        app.post_webhook(&event(
            "evt_s0",
            "checkout.session.completed",
            100,
            &session
        ))
        .await
        .0,
        200
    );
    assert_eq!(
        available(&app, "subber").await,
        Some(0),
        "a subscription checkout links; invoices grant"
    );
    assert_eq!(
        app.post_webhook(&event(
            "evt_s1",
            "customer.subscription.created",
            200,
            &subscription("active", false)
        ))
        .await
        .0,
        200
    );
    let b = billing_view(&app).await;
    assert_eq!(
        (b["plan"].as_str(), b["subscription"]["status"].as_str()),
        (Some("pro"), Some("active")),
        "{b}"
    );

    let invoice = json!({"id": "in_T1", "object": "invoice", "customer": "cus_T9", "subscription": "sub_T1",
                         "billing_reason": "subscription_create", "amount_paid": 1900, "status": "paid",
                         "lines": {"data": [{"price": {"id": "price_pro_placeholder"}, "period": {"start": 1_764_000_000, "end": period_end()}}]}});
    for id in ["evt_i1", "evt_i1", "evt_i1_resend"] {
        let (status, reply) = app
            .post_webhook(&event(id, "invoice.paid", 300, &invoice))
            .await;
        assert_eq!(status, 200, "{reply}");
    }
    assert_eq!(
        available(&app, "subber").await,
        Some(500),
        "one period's credits"
    );
    let mut proration = invoice.clone();
    proration["id"] = json!("in_T2");
    proration["billing_reason"] = json!("subscription_update");
    app.post_webhook(&event("evt_i2", "invoice.paid", 310, &proration))
        .await;
    assert_eq!(
        available(&app, "subber").await,
        Some(500),
        "a proration invoice grants nothing"
    );
    // The basil shape: subscription and price moved under `parent` and `pricing`.
    let basil = json!({"id": "in_T3", "object": "invoice", "customer": "cus_T9", "billing_reason": "subscription_cycle",
                       "parent": {"subscription_details": {"subscription": "sub_T1"}},
                       "lines": {"data": [{"pricing": {"price_details": {"price": "price_pro_placeholder"}}, "period": {"end": period_end() + 86_400}}]}});
    app.post_webhook(&event("evt_i3", "invoice.paid", 400, &basil))
        .await;
    assert_eq!(available(&app, "subber").await, Some(1000));

    // Out of order: an older state never overwrites a newer one.
    app.post_webhook(&event(
        "evt_old",
        "customer.subscription.updated",
        150,
        &subscription("past_due", false),
    ))
    .await;
    assert_eq!(billing_view(&app).await["subscription"]["status"], "active");
    app.post_webhook(&event(
        "evt_new",
        "customer.subscription.updated",
        500,
        &subscription("active", true),
    ))
    .await;
    assert_eq!(
        billing_view(&app).await["subscription"]["cancel_at_period_end"],
        true
    );
    let failed = json!({"id": "in_T4", "customer": "cus_T9", "subscription": "sub_T1", "billing_reason": "subscription_cycle"});
    app.post_webhook(&event("evt_f1", "invoice.payment_failed", 600, &failed))
        .await;
    let b = billing_view(&app).await;
    assert_eq!(
        (
            b["subscription"]["status"].as_str(),
            b["balance"]["available"].as_i64()
        ),
        (Some("past_due"), Some(1000))
    );
    app.post_webhook(&event(
        "evt_d",
        "customer.subscription.deleted",
        700,
        &subscription("canceled", false),
    ))
    .await;
    let b = billing_view(&app).await;
    assert_eq!(
        (b["plan"].as_str(), b["balance"]["available"].as_i64()),
        (Some("free"), Some(1000)),
        "{b}"
    );
    app.finish().await;
}

fn purchase(event_id: &str, session: &str, payment_intent: &str) -> Vec<u8> {
    let mut e: Value = serde_json::from_slice(&tally_session_event(
        event_id,
        "checkout.session.completed",
        session,
        "paid",
    ))
    .unwrap();
    e["data"]["object"]["payment_intent"] = json!(payment_intent);
    serde_json::to_vec(&e).unwrap()
}

fn refund(event_id: &str, refunded: i64) -> Vec<u8> {
    event(
        event_id,
        "charge.refunded",
        900,
        &json!({"id": "ch_T1", "object": "charge", "payment_intent": "pi_T1",
                                                     "amount": 1900, "amount_refunded": refunded}),
    )
}

async fn refunds_and_disputes_claw_back_into_debt_and_wins_restore(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut credit = app.credit().await;
    assert_eq!(
        app.post_webhook(&purchase("evt_b1", "cs_T1", "pi_T1"))
            .await
            .1["granted"],
        true
    );
    let h = credit
        .reserve(crate::reserve_req("buyer", 300, "r1"))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    credit
        .commit(pb::CommitRequest {
            hold_id: h.hold_id,
            amount: 300,
            idempotency_key: "c1".into(),
        })
        .await
        .unwrap();
    assert_eq!(available(&app, "buyer").await, Some(200));
    // Half refunded: 250 credits back, but only 200 are left: 50 become debt.
    assert_eq!(app.post_webhook(&refund("evt_r1", 950)).await.0, 200);
    assert_eq!(available(&app, "buyer").await, Some(-50));
    let e = credit
        .reserve(crate::reserve_req("buyer", 1, "r2"))
        .await
        .unwrap_err();
    crate::expect_error(&e, tonic::Code::FailedPrecondition, "INSUFFICIENT_CREDITS");
    // The same refund state again changes nothing; the rest refunded claws only the delta.
    app.post_webhook(&refund("evt_r1_again", 950)).await;
    assert_eq!(available(&app, "buyer").await, Some(-50));
    app.post_webhook(&refund("evt_r2", 1900)).await;
    assert_eq!(
        available(&app, "buyer").await,
        Some(-300),
        "never more than was bought: 500 in all"
    );
    app.post_webhook(&refund("evt_r3", 1900)).await;
    assert_eq!(available(&app, "buyer").await, Some(-300));
    // New credits pay the debt first.
    let mut admin = app.admin().await;
    admin
        .grant(crate::grant_req("buyer", 1_000, "g1"))
        .await
        .unwrap();
    assert_eq!(available(&app, "buyer").await, Some(700));

    assert_eq!(
        app.post_webhook(&purchase("evt_b2", "cs_T2", "pi_T2"))
            .await
            .1["granted"],
        true
    );
    assert_eq!(available(&app, "buyer").await, Some(1_200));
    let dispute = |status: &str| {
        json!({"id": "dp_T1", "object": "dispute", "charge": "ch_T2", "payment_intent": "pi_T2",
                                          "amount": 1900, "status": status})
    };
    app.post_webhook(&event(
        "evt_d1",
        "charge.dispute.created",
        1000,
        &dispute("needs_response"),
    ))
    .await;
    app.post_webhook(&event(
        "evt_d1_again",
        "charge.dispute.created",
        1001,
        &dispute("needs_response"),
    ))
    .await;
    assert_eq!(
        available(&app, "buyer").await,
        Some(700),
        "the disputed purchase is clawed once"
    );
    app.post_webhook(&event(
        "evt_d2",
        "charge.dispute.closed",
        1100,
        &dispute("won"),
    ))
    .await;
    app.post_webhook(&event(
        "evt_d2_again",
        "charge.dispute.closed",
        1101,
        &dispute("won"),
    ))
    .await;
    assert_eq!(
        available(&app, "buyer").await,
        Some(1_200),
        "a won dispute restores it once"
    );
    app.finish().await;
}

crate::on_both_backends!(
    refunds_and_disputes_claw_back_into_debt_and_wins_restore,
    subscriptions_mirror_state_and_paid_invoices_grant_once,
    refused_deliveries_write_nothing,
    a_paid_session_grants_its_pack_exactly_once,
    every_shared_fixture_is_accepted_and_grants_nothing_it_should_not,
    http_health_endpoints_answer,
);

/// PostgreSQL stops accepting connections for this app's database mid-delivery; the webhook
/// answers 5xx so Stripe retries, and the redelivery after recovery applies exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_down_during_a_webhook_is_a_5xx_and_the_redelivery_applies_once() {
    let app = TestApp::spawn(Backend::Postgres).await;
    crate::support::set_database_reachable(&app.db, false).await;
    let body = tally_session_event("evt_down", "checkout.session.completed", "cs_down", "paid");
    let (status, reply) = app.post_webhook(&body).await;
    assert!((500..600).contains(&status), "{status} {reply}");
    crate::support::set_database_reachable(&app.db, true).await;
    let (status, reply) = app.post_webhook(&body).await;
    assert_eq!(
        (status, reply["granted"].as_bool()),
        (200, Some(true)),
        "{reply}"
    );
    let (status, reply) = app.post_webhook(&body).await;
    assert_eq!((status, reply["duplicate"].as_bool()), (200, Some(true)));
    // gRPC calls fail fast while readiness still marks the database down: that lasts until
    // the next readiness check (100 ms here), as a retrying client sees it.
    let mut seen = None;
    for _ in 0..40 {
        seen = available(&app, "buyer").await;
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(seen, Some(500));
    app.finish().await;
}
