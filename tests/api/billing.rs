//! The billing endpoints against a fake Stripe API on a loopback port (async-stripe's requests,
//! Stripe-shaped JSON responses), and the success-page sync racing the webhook.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde_json::{Value, json};
use tally::stripe::client::StripeApi;
use tokio::task::JoinSet;

use crate::support::{Backend, TestApp};

const TOKEN: &str = "billing-token-for-tests";

/// What the fake Stripe saw and holds.
#[derive(Default)]
struct Fake {
    subscription: Option<Value>,
    requests: Vec<(String, HashMap<String, String>)>,
    sessions: HashMap<String, Value>,
    paid: Vec<String>,
    /// `Idempotency-Key` of every POST, by path.
    keys: Vec<(String, Option<String>)>,
    /// Customers created, by idempotency key (Stripe replays the first answer for a key).
    customer_keys: HashMap<String, String>,
    /// Answer every POST with this status (Stripe's error body), when set.
    fail_with: Option<u16>,
    /// Charges and their PaymentIntents (`GET /v1/charges/{id}`).
    charges: HashMap<String, String>,
}

fn idempotency(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn injected_failure(f: &Fake) -> Option<axum::response::Response> {
    f.fail_with.map(|status| {
        (
            StatusCode::from_u16(status).unwrap(),
            Json(json!({"error": {"type": "api_error", "message": format!("injected {status}")}})),
        )
            .into_response()
    })
}

type Shared = Arc<Mutex<Fake>>;

fn session_json(id: &str, form: &HashMap<String, String>, paid: bool) -> Value {
    let metadata: HashMap<String, String> = form
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("metadata[")
                .and_then(|k| k.strip_suffix(']'))
                .map(|k| (k.to_owned(), v.clone()))
        })
        .collect();
    json!({
        "id": id, "object": "checkout.session", "automatic_tax": {"enabled": false}, "created": 1_764_000_000,
        "custom_fields": [], "custom_text": {}, "expires_at": 1_764_086_400, "livemode": false,
        "mode": form.get("mode").cloned().unwrap_or_default(),
        "payment_method_types": ["card"], "payment_status": if paid { "paid" } else { "unpaid" },
        "shipping_options": [], "status": if paid { "complete" } else { "open" },
        "client_reference_id": form.get("client_reference_id"), "customer": form.get("customer"),
        "metadata": metadata, "url": format!("https://checkout.stripe.test/c/pay/{id}"),
    })
}

async fn customers(
    State(f): State<Shared>,
    headers: axum::http::HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> axum::response::Response {
    let mut f = f.lock().unwrap();
    let key = idempotency(&headers);
    f.keys.push(("POST /v1/customers".into(), key.clone()));
    if let Some(resp) = injected_failure(&f) {
        return resp;
    }
    if let Some(id) = key.as_ref().and_then(|k| f.customer_keys.get(k)) {
        return Json(
            json!({"id": id, "object": "customer", "created": 1_764_000_000, "livemode": false}),
        )
        .into_response();
    }
    f.requests.push(("POST /v1/customers".into(), form));
    let n = f
        .requests
        .iter()
        .filter(|(p, _)| p == "POST /v1/customers")
        .count();
    let id = format!("cus_fake{n}");
    if let Some(k) = key {
        f.customer_keys.insert(k, id.clone());
    }
    Json(json!({"id": id, "object": "customer", "created": 1_764_000_000, "livemode": false}))
        .into_response()
}

async fn get_charge(State(f): State<Shared>, Path(id): Path<String>) -> axum::response::Response {
    let f = f.lock().unwrap();
    match f.charges.get(&id) {
        Some(pi) => Json(json!({"id": id, "object": "charge", "amount": 1900, "amount_captured": 1900,
            "amount_refunded": 0, "billing_details": {"address": null, "email": null, "name": null, "phone": null},
            "captured": true, "created": 1_764_000_000, "currency": "usd", "disputed": true, "livemode": false,
            "metadata": {}, "paid": true, "refunded": false, "status": "succeeded", "payment_intent": pi}))
        .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"type": "invalid_request_error", "message": format!("No such charge: '{id}'")}})),
        )
            .into_response(),
    }
}

async fn create_session(
    State(f): State<Shared>,
    headers: axum::http::HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> axum::response::Response {
    let mut f = f.lock().unwrap();
    f.keys
        .push(("POST /v1/checkout/sessions".into(), idempotency(&headers)));
    if let Some(resp) = injected_failure(&f) {
        return resp;
    }
    let id = format!("cs_test_{}", f.sessions.len() + 1);
    f.requests
        .push(("POST /v1/checkout/sessions".into(), form.clone()));
    let body = session_json(&id, &form, false);
    f.sessions.insert(id, body.clone());
    Json(body).into_response()
}

async fn get_session(State(f): State<Shared>, Path(id): Path<String>) -> axum::response::Response {
    let f = f.lock().unwrap();
    match f.sessions.get(&id) {
        Some(s) => {
            let mut s = s.clone();
            if f.paid.contains(&id) {
                s["payment_status"] = json!("paid");
                s["status"] = json!("complete");
            }
            Json(s).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"type": "invalid_request_error", "message": format!("No such checkout.session: '{id}'")}})),
        )
            .into_response(),
    }
}

async fn portal(
    State(f): State<Shared>,
    headers: axum::http::HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Json<Value> {
    let mut f = f.lock().unwrap();
    f.keys.push((
        "POST /v1/billing_portal/sessions".into(),
        idempotency(&headers),
    ));
    f.requests
        .push(("POST /v1/billing_portal/sessions".into(), form.clone()));
    Json(
        json!({"id": "bps_1", "object": "billing_portal.session", "configuration": "bpc_1", "created": 1_764_000_000,
        "customer": form.get("customer"), "livemode": false, "return_url": form.get("return_url"),
        "url": "https://billing.stripe.test/p/session/bps_1"}),
    )
}

/// A subscription as Stripe's API renders it (every field async-stripe requires).
fn subscription_json(status: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    let price = json!({"id": "price_pro_placeholder", "object": "price", "active": true, "billing_scheme": "per_unit",
        "created": 1, "currency": "usd", "livemode": false, "metadata": {}, "product": "prod_1", "type": "recurring"});
    let plan = json!({"id": "price_pro_placeholder", "object": "plan", "active": true, "billing_scheme": "per_unit",
        "created": 1, "currency": "usd", "interval": "month", "interval_count": 1, "livemode": false, "usage_type": "licensed"});
    json!({"id": "sub_fake1", "object": "subscription", "automatic_tax": {"enabled": false}, "billing_cycle_anchor": now,
        "billing_mode": {"type": "classic"}, "billing_schedules": [], "cancel_at_period_end": false,
        "collection_method": "charge_automatically", "created": now, "currency": "usd", "customer": "cus_fake1",
        "discounts": [], "invoice_settings": {"issuer": {"type": "self"}}, "livemode": false, "metadata": {},
        "start_date": now, "status": status,
        "items": {"object": "list", "has_more": false, "url": "/v1/subscription_items", "data": [{
            "id": "si_1", "object": "subscription_item", "created": now, "current_period_start": now,
            "current_period_end": now + 30 * 86_400, "discounts": [], "metadata": {}, "plan": plan, "price": price,
            "subscription": "sub_fake1"}]}})
}

async fn list_subscriptions(State(f): State<Shared>) -> Json<Value> {
    let f = f.lock().unwrap();
    let data: Vec<Value> = f.subscription.iter().cloned().collect();
    Json(json!({"object": "list", "has_more": false, "url": "/v1/subscriptions", "data": data}))
}

async fn fake_stripe() -> (SocketAddr, Shared) {
    let state: Shared = Arc::default();
    let app = Router::new()
        .route("/v1/customers", post(customers))
        .route("/v1/checkout/sessions", post(create_session))
        .route("/v1/checkout/sessions/{id}", get(get_session))
        .route("/v1/billing_portal/sessions", post(portal))
        .route("/v1/subscriptions", get(list_subscriptions))
        .route("/v1/charges/{id}", get(get_charge))
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, state)
}

async fn app_with_stripe(backend: Backend, stripe: SocketAddr) -> TestApp {
    TestApp::spawn_with(backend, |s| {
        s.stripe = Some(
            StripeApi::new(
                "sk_test_fake",
                &format!("http://{stripe}"),
                Duration::from_secs(2),
            )
            .unwrap(),
        );
        s.auth = crate::support::callers(
            &[crate::support::TestCaller {
                name: "shop",
                roles: &["billing"],
                prefixes: &[],
                token: TOKEN,
                extra: "",
            }],
            crate::support::UNLIMITED,
        );
    })
    .await
}

async fn call(app: &TestApp, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let url = format!("http://{}{path}", app.http);
    let req = if method == "GET" {
        client.get(url)
    } else {
        client.post(url)
    };
    let req = req.header("authorization", format!("Bearer {TOKEN}"));
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(b.to_string()),
        None => req,
    };
    let resp = req.send().await.unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

fn checkout(account: &str, item: (&str, &str)) -> Value {
    json!({"account_id": account, item.0: item.1, "success_url": "https://app.example/ok?s={CHECKOUT_SESSION_ID}",
           "cancel_url": "https://app.example/cancel"})
}

async fn checkout_sessions_carry_the_account_and_the_item(backend: Backend) {
    let (stripe, fake) = fake_stripe().await;
    let app = app_with_stripe(backend, stripe).await;
    let (status, r) = call(
        &app,
        "POST",
        "/v1/checkout/sessions",
        Some(checkout("buyer", ("pack_id", "starter"))),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert!(
        r["url"]
            .as_str()
            .unwrap()
            .starts_with("https://checkout.stripe.test/")
    );
    let (status, _) = call(
        &app,
        "POST",
        "/v1/checkout/sessions",
        Some(checkout("buyer", ("plan_id", "pro"))),
    )
    .await;
    assert_eq!(status, 200);
    {
        let f = fake.lock().unwrap();
        let customers: Vec<_> = f
            .requests
            .iter()
            .filter(|(p, _)| p == "POST /v1/customers")
            .collect();
        assert_eq!(customers.len(), 1, "one Stripe customer per account");
        assert_eq!(customers[0].1["metadata[account_id]"], "buyer");
        let sessions: Vec<&HashMap<String, String>> = f
            .requests
            .iter()
            .filter(|(p, _)| p == "POST /v1/checkout/sessions")
            .map(|(_, f)| f)
            .collect();
        let pack = sessions[0];
        for (k, v) in [
            ("mode", "payment"),
            ("customer", "cus_fake1"),
            ("client_reference_id", "buyer"),
            ("line_items[0][price]", "price_starter_placeholder"),
            ("line_items[0][quantity]", "1"),
            ("metadata[account_id]", "buyer"),
            ("metadata[pack_id]", "starter"),
            (
                "success_url",
                "https://app.example/ok?s={CHECKOUT_SESSION_ID}",
            ),
            ("cancel_url", "https://app.example/cancel"),
        ] {
            assert_eq!(pack.get(k).map(String::as_str), Some(v), "{k} in {pack:?}");
        }
        let plan = sessions[1];
        for (k, v) in [
            ("mode", "subscription"),
            ("line_items[0][price]", "price_pro_placeholder"),
            ("metadata[plan_id]", "pro"),
            ("subscription_data[metadata][account_id]", "buyer"),
        ] {
            assert_eq!(plan.get(k).map(String::as_str), Some(v), "{k} in {plan:?}");
        }
    }
    for (body, want) in [
        (checkout("buyer", ("pack_id", "mystery")), 400),
        (
            json!({"account_id": "buyer", "success_url": "https://a/", "cancel_url": "https://a/"}),
            400,
        ),
        (
            json!({"account_id": "buyer", "pack_id": "starter", "success_url": "javascript:x", "cancel_url": "https://a/"}),
            400,
        ),
        (checkout("bad id!", ("pack_id", "starter")), 400),
    ] {
        assert_eq!(
            call(&app, "POST", "/v1/checkout/sessions", Some(body.clone()))
                .await
                .0,
            want,
            "{body}"
        );
    }
    let unauthorized = reqwest::Client::new()
        .post(format!("http://{}/v1/checkout/sessions", app.http))
        .header("content-type", "application/json")
        .body(checkout("buyer", ("pack_id", "starter")).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status().as_u16(), 401);

    let (status, r) = call(
        &app,
        "POST",
        "/v1/billing/portal",
        Some(json!({"account_id": "buyer", "return_url": "https://app.example/account"})),
    )
    .await;
    assert_eq!(
        (status, r["url"].as_str()),
        (200, Some("https://billing.stripe.test/p/session/bps_1"))
    );
    let (status, _) = call(
        &app,
        "POST",
        "/v1/billing/portal",
        Some(json!({"account_id": "stranger", "return_url": "https://app.example/"})),
    )
    .await;
    assert_eq!(status, 404);
    app.finish().await;
}

async fn the_success_page_sync_and_the_webhook_grant_once(backend: Backend) {
    let (stripe, fake) = fake_stripe().await;
    let app = Arc::new(app_with_stripe(backend, stripe).await);
    let (_, r) = call(
        &app,
        "POST",
        "/v1/checkout/sessions",
        Some(checkout("buyer", ("pack_id", "starter"))),
    )
    .await;
    let id = r["id"].as_str().unwrap().to_owned();
    // Before payment: nothing to grant.
    let (status, r) = call(
        &app,
        "POST",
        &format!("/v1/checkout/sessions/{id}/sync"),
        None,
    )
    .await;
    assert_eq!((status, r["granted"].as_bool()), (200, Some(false)));
    // A forged session id grants nothing.
    let (status, _) = call(
        &app,
        "POST",
        "/v1/checkout/sessions/cs_test_forged/sync",
        None,
    )
    .await;
    assert_eq!(status, 404);
    fake.lock().unwrap().paid.push(id.clone());
    let webhook_body = {
        let session = fake.lock().unwrap().sessions[&id].clone();
        let mut session = session;
        session["payment_status"] = json!("paid");
        serde_json::to_vec(
            &json!({"id": "evt_race", "type": "checkout.session.completed", "livemode": false,
                                   "data": {"object": session}}),
        )
        .unwrap()
    };
    let mut set = JoinSet::new();
    for i in 0..6 {
        let (app, id, body) = (Arc::clone(&app), id.clone(), webhook_body.clone());
        set.spawn(async move {
            if i % 2 == 0 {
                call(
                    &app,
                    "POST",
                    &format!("/v1/checkout/sessions/{id}/sync"),
                    None,
                )
                .await
                .0
            } else {
                app.post_webhook(&body).await.0
            }
        });
    }
    while let Some(s) = set.join_next().await {
        assert_eq!(s.unwrap(), 200);
    }
    let (status, b) = call(&app, "GET", "/v1/accounts/buyer/billing", None).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["balance"]["available"], 500, "one starter pack: {b}");
    assert_eq!(b["balance"]["by_source"]["purchase"], 500);
    assert_eq!(
        b["recent_purchases"][0]["key"],
        format!("checkout_session:{id}")
    );
    assert_eq!(b["plan"], "free");
    let app = Arc::into_inner(app).unwrap();
    app.finish().await;
}

async fn stripe_outages_are_clear_errors_not_hangs(backend: Backend) {
    // A port nobody listens on.
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let app = app_with_stripe(backend, dead).await;
    let started = std::time::Instant::now();
    let (status, r) = call(
        &app,
        "POST",
        "/v1/checkout/sessions",
        Some(checkout("buyer", ("pack_id", "starter"))),
    )
    .await;
    assert_eq!(
        (status, r["error"]["reason"].as_str()),
        (502, Some("STRIPE_UNAVAILABLE")),
        "{r}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    app.finish().await;
}

async fn a_resync_applies_stripes_current_subscription(backend: Backend) {
    let (stripe, fake) = fake_stripe().await;
    let app = app_with_stripe(backend, stripe).await;
    call(
        &app,
        "POST",
        "/v1/checkout/sessions",
        Some(checkout("buyer", ("plan_id", "pro"))),
    )
    .await;
    let (status, r) = call(&app, "POST", "/v1/accounts/buyer/billing/sync", None).await;
    assert_eq!(
        (status, r["subscription"].is_null()),
        (200, true),
        "no subscription yet: {r}"
    );
    fake.lock().unwrap().subscription = Some(subscription_json("active"));
    let (status, r) = call(&app, "POST", "/v1/accounts/buyer/billing/sync", None).await;
    assert_eq!((status, r["plan"].as_str()), (200, Some("pro")), "{r}");
    let (_, b) = call(&app, "GET", "/v1/accounts/buyer/billing", None).await;
    assert_eq!(
        (b["plan"].as_str(), b["subscription"]["status"].as_str()),
        (Some("pro"), Some("active"))
    );
    // The operator tool does the same against the database and Stripe directly.
    fake.lock().unwrap().subscription = Some(subscription_json("canceled"));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "stripe",
            "sync",
            "buyer",
            "--database-url",
            &app.db.url,
            "--stripe-api-key",
            "sk_test_fake",
        ])
        .args(["--stripe-api-base", &format!("http://{stripe}")])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["plan"], "free", "{printed}");
    let (_, b) = call(&app, "GET", "/v1/accounts/buyer/billing", None).await;
    assert_eq!(b["subscription"]["status"], "canceled");
    app.finish().await;
}

/// Issue 22, item 1 through the sync endpoint: 2, 8 and 16 concurrent syncs of one paid
/// session, and 8 syncs mixed with 8 first webhook deliveries (distinct event ids), grant one
/// pack; every round from a new session and a new account.
async fn race_cold_syncs_and_webhooks_of_one_paid_session_grant_once(backend: Backend) {
    let (stripe, fake) = fake_stripe().await;
    let app = Arc::new(app_with_stripe(backend, stripe).await);
    for (syncs, hooks) in [(2, 0), (8, 0), (16, 0), (8, 8)] {
        for round in 0..crate::stripe_facts::ROUNDS {
            let account = format!("syncer-{syncs}-{hooks}-{round}");
            let (_, r) = call(
                &app,
                "POST",
                "/v1/checkout/sessions",
                Some(checkout(&account, ("pack_id", "starter"))),
            )
            .await;
            let id = r["id"].as_str().unwrap().to_owned();
            fake.lock().unwrap().paid.push(id.clone());
            let mut session = fake.lock().unwrap().sessions[&id].clone();
            session["payment_status"] = json!("paid");
            let mut set = JoinSet::new();
            for i in 0..syncs + hooks {
                let (app, id, session) = (Arc::clone(&app), id.clone(), session.clone());
                set.spawn(async move {
                    if i < syncs {
                        call(&app, "POST", &format!("/v1/checkout/sessions/{id}/sync"), None)
                            .await
                    } else {
                        let body = serde_json::to_vec(&json!({"id": format!("evt_{id}_{i}"),
                            "type": "checkout.session.completed", "livemode": false, "data": {"object": session}}))
                        .unwrap();
                        app.post_webhook(&body).await
                    }
                });
            }
            let mut granted = 0;
            while let Some(r) = set.join_next().await {
                let (status, reply) = r.unwrap();
                assert_eq!(status, 200, "{reply}");
                granted += usize::from(reply["granted"] == true);
            }
            assert_eq!(granted, 1, "{syncs} syncs, {hooks} webhooks, round {round}");
            let (_, b) = call(
                &app,
                "GET",
                &format!("/v1/accounts/{account}/billing"),
                None,
            )
            .await;
            assert_eq!(b["balance"]["available"], 500, "round {round}: {b}");
        }
    }
    Arc::into_inner(app).unwrap().finish().await;
}

/// Issue 22, item 7: ten concurrent first Checkouts of one account create one Stripe customer,
/// and every POST to Stripe carries an `Idempotency-Key` (the caller's, when it sends one).
async fn concurrent_first_checkouts_create_one_customer(backend: Backend) {
    let (stripe, fake) = fake_stripe().await;
    let app = Arc::new(app_with_stripe(backend, stripe).await);
    let mut set = JoinSet::new();
    for _ in 0..10 {
        let app = Arc::clone(&app);
        set.spawn(async move {
            call(
                &app,
                "POST",
                "/v1/checkout/sessions",
                Some(checkout("first-timer", ("pack_id", "starter"))),
            )
            .await
        });
    }
    while let Some(r) = set.join_next().await {
        let (status, reply) = r.unwrap();
        assert_eq!(status, 200, "{reply}");
    }
    // A retry with the caller's key sends the same key to Stripe.
    for _ in 0..2 {
        let resp = reqwest::Client::new()
            .post(format!("http://{}/v1/checkout/sessions", app.http))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("idempotency-key", "order-42")
            .header("content-type", "application/json")
            .body(checkout("first-timer", ("pack_id", "starter")).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
    }
    {
        let f = fake.lock().unwrap();
        let created: Vec<_> = f
            .requests
            .iter()
            .filter(|(p, _)| p == "POST /v1/customers")
            .collect();
        assert_eq!(created.len(), 1, "one customer for one account");
        let customers: std::collections::BTreeSet<_> = f
            .requests
            .iter()
            .filter(|(p, _)| p == "POST /v1/checkout/sessions")
            .filter_map(|(_, form)| form.get("customer").cloned())
            .collect();
        assert_eq!(customers.len(), 1, "{customers:?}");
        assert!(
            f.keys.iter().all(|(_, k)| k.is_some()),
            "every POST carries an Idempotency-Key: {:?}",
            f.keys
        );
        assert_eq!(
            f.keys
                .iter()
                .filter(|(_, k)| k.as_deref() == Some("tally-checkout-first-timer-order-42"))
                .count(),
            2
        );
    }
    Arc::into_inner(app).unwrap().finish().await;
}

/// Issue 22, items 8 and 9: a second subscription Checkout while one is live is a 409 that
/// points to the portal; Stripe's 429 and 409 are 503 with Retry-After, a refused API key is
/// the operator's 502, not the caller's 400.
async fn stripe_refusals_say_whose_fault_they_are(backend: Backend) {
    let (stripe, fake) = fake_stripe().await;
    let app = app_with_stripe(backend, stripe).await;
    let sub = json!({"id": "sub_live", "object": "subscription", "customer": "cus_fake1", "status": "active",
        "created": 1, "cancel_at_period_end": false, "metadata": {"account_id": "subscribed"},
        "items": {"data": [{"price": {"id": "price_pro_placeholder"}}]}});
    app.post_webhook(
        &serde_json::to_vec(
            &json!({"id": "evt_sub", "type": "customer.subscription.created",
            "created": 10, "livemode": false, "data": {"object": sub}}),
        )
        .unwrap(),
    )
    .await;
    let (status, r) = call(
        &app,
        "POST",
        "/v1/checkout/sessions",
        Some(checkout("subscribed", ("plan_id", "pro"))),
    )
    .await;
    assert_eq!(
        (status, r["error"]["reason"].as_str()),
        (409, Some("SUBSCRIPTION_EXISTS")),
        "{r}"
    );
    assert!(r["error"]["message"].as_str().unwrap().contains("portal"));
    for (injected, want, reason) in [
        (429, 503, "STRIPE_BUSY"),
        (409, 503, "STRIPE_BUSY"),
        (401, 502, "STRIPE_MISCONFIGURED"),
        (400, 400, "STRIPE_REFUSED"),
    ] {
        fake.lock().unwrap().fail_with = Some(injected);
        let resp = reqwest::Client::new()
            .post(format!("http://{}/v1/checkout/sessions", app.http))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(checkout(&format!("refused-{injected}"), ("pack_id", "starter")).to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let retry_after = resp.headers().get("retry-after").cloned();
        let r: Value = resp.json().await.unwrap();
        assert_eq!(
            (status, r["error"]["reason"].as_str()),
            (want, Some(reason)),
            "{injected}: {r}"
        );
        assert_eq!(retry_after.is_some(), want == 503, "{injected}");
        assert!(!r.to_string().contains("sk_test_fake"), "no key in errors");
    }
    fake.lock().unwrap().fail_with = None;
    app.finish().await;
}

/// Issue 22, item 5 with a Stripe client: a dispute that names only its charge is matched by
/// reading the charge's PaymentIntent from Stripe.
async fn a_dispute_naming_only_its_charge_is_matched_through_stripe(backend: Backend) {
    let (stripe, fake) = fake_stripe().await;
    let app = app_with_stripe(backend, stripe).await;
    fake.lock()
        .unwrap()
        .charges
        .insert("ch_lookup".into(), "pi_lookup".into());
    app.post_webhook(&crate::stripe_facts::paid_session(
        "evt_p",
        "cs_lookup",
        "looked-up",
        "pi_lookup",
    ))
    .await;
    let body = serde_json::to_vec(
        &json!({"id": "evt_d", "type": "charge.dispute.created", "created": 5,
        "livemode": false, "data": {"object": {"id": "dp_lookup", "object": "dispute",
        "charge": "ch_lookup", "amount": 1900, "status": "needs_response"}}}),
    )
    .unwrap();
    let (status, r) = app.post_webhook(&body).await;
    assert_eq!(
        (status, r["credits"]["clawed"].as_i64()),
        (200, Some(500)),
        "{r}"
    );
    let (_, b) = call(&app, "GET", "/v1/accounts/looked-up/billing", None).await;
    assert_eq!(b["balance"]["available"], 0, "{b}");
    app.finish().await;
}

crate::on_both_backends!(
    race_cold_syncs_and_webhooks_of_one_paid_session_grant_once,
    concurrent_first_checkouts_create_one_customer,
    stripe_refusals_say_whose_fault_they_are,
    a_dispute_naming_only_its_charge_is_matched_through_stripe,
    a_resync_applies_stripes_current_subscription,
    checkout_sessions_carry_the_account_and_the_item,
    the_success_page_sync_and_the_webhook_grant_once,
    stripe_outages_are_clear_errors_not_hangs,
);
