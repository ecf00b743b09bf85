//! Outbound events (issue 28): each change's events, in order per account, signed, delivered
//! at least once with the same webhook-id, none for a change that did not commit; the retry
//! schedule, 410, redirects, private addresses, two replicas, and `kill -9` of the binary.
//! (`tests/webhooks/` checks the signatures with the independent `standardwebhooks` package.)

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tally::app::{EventSettings, Settings};
use tally::domain::webhook::Secret;
use tally::pb;

use crate::key;
use crate::support::{Backend, TestApp, TestDb};

/// The secret every test endpoint signs with (`whsec_` + base64 of 32 bytes).
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYo=";

/// What the receiver answers next.
#[derive(Clone, Debug)]
pub enum Reply {
    Ok,
    Status(u16),
    /// Answers 200 after this long (longer than the events timeout: a timeout).
    Slow(Duration),
    /// 302 to `/elsewhere`.
    Redirect,
}

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Got {
    pub path: String,
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: String,
    pub at: Instant,
}

impl Got {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }

    pub fn kind(&self) -> String {
        self.json()["type"].as_str().unwrap().to_owned()
    }

    pub fn account(&self) -> String {
        self.json()["data"]["account_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Checks the Standard Webhooks signature with our signer (the Python test uses an
    /// independent one).
    pub fn verify(&self) {
        let s = Secret::parse(SECRET).unwrap();
        let expected = s.sign(
            &self.id,
            self.timestamp.parse().unwrap(),
            self.body.as_bytes(),
        );
        assert!(
            self.signature.split(' ').any(|v| v == expected),
            "bad signature on {}",
            self.id
        );
    }
}

#[derive(Default)]
struct State {
    got: Mutex<Vec<Got>>,
    script: Mutex<VecDeque<Reply>>,
    up: Mutex<bool>,
}

/// A webhook receiver on a loopback port: records every request, answers as scripted.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Receiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let r = Self {
            addr,
            state: Arc::new(State::default()),
            task: Mutex::new(None),
        };
        r.serve(listener);
        r
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        *self.state.up.lock().unwrap() = true;
        let state = Arc::clone(&self.state);
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
                let state = Arc::clone(&state);
                async move {
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    state.got.lock().unwrap().push(Got {
                        path: uri.path().to_owned(),
                        id: h("webhook-id"),
                        timestamp: h("webhook-timestamp"),
                        signature: h("webhook-signature"),
                        body,
                        at: Instant::now(),
                    });
                    let reply = state
                        .script
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or(Reply::Ok);
                    match reply {
                        Reply::Ok => (axum::http::StatusCode::NO_CONTENT, [("location", "")]),
                        Reply::Status(s) => (
                            axum::http::StatusCode::from_u16(s).unwrap(),
                            [("location", "")],
                        ),
                        Reply::Slow(d) => {
                            tokio::time::sleep(d).await;
                            (axum::http::StatusCode::OK, [("location", "")])
                        }
                        Reply::Redirect => {
                            (axum::http::StatusCode::FOUND, [("location", "/elsewhere")])
                        }
                    }
                }
            },
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// Stops listening (connections are refused) until [`Receiver::restart`].
    pub fn stop(&self) {
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
        *self.state.up.lock().unwrap() = false;
    }

    /// Listens again on the same port.
    pub async fn restart(&self) {
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.serve(listener);
    }

    pub fn url(&self) -> String {
        format!("http://{}/hooks/tally", self.addr)
    }

    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    pub fn got(&self) -> Vec<Got> {
        self.state.got.lock().unwrap().clone()
    }

    /// Requests for one account, in arrival order.
    pub fn of(&self, account: &str) -> Vec<Got> {
        self.got()
            .into_iter()
            .filter(|g| g.path != "/elsewhere" && g.account() == account)
            .collect()
    }

    /// The account's distinct events in order of first arrival: (id, type, data).
    pub fn events_of(&self, account: &str) -> Vec<(String, String, Value)> {
        let mut seen = std::collections::BTreeSet::new();
        self.of(account)
            .into_iter()
            .filter(|g| seen.insert(g.id.clone()))
            .map(|g| (g.id.clone(), g.kind(), g.json()["data"].clone()))
            .collect()
    }

    /// Waits until `done` holds (at most `limit`).
    pub async fn wait(&self, limit: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < limit,
                "timed out waiting for {what}; got: {:#?}",
                self.got()
                    .iter()
                    .map(|g| (g.path.clone(), g.body.clone()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// A fast schedule for tests: attempts at 0, 300 ms, 600 ms, 900 ms (±20 %), then failed.
pub const FAST: &str = "0s,300ms,600ms,900ms";

/// The events' settings of a test server posting to `url`.
pub fn event_settings(url: &str, schedule: &str, allow_private: bool) -> EventSettings {
    EventSettings {
        config: tally::events::Config {
            schedule: tally::events::parse_schedule(schedule).unwrap(),
            timeout: Duration::from_secs(1),
            allow_private,
            poll: Duration::from_millis(20),
            housekeeping: Duration::from_millis(100),
            ..tally::events::Config::default()
        },
        targets: vec![tally::events::Target {
            name: "app".into(),
            url: url.parse().unwrap(),
            secrets: vec![Secret::parse(SECRET).unwrap()],
        }],
    }
}

/// Settings with the endpoint `app` at `url` in the catalog (free plan's threshold 100).
pub fn with_endpoint(s: &mut Settings, url: &str, schedule: &str, allow_private: bool) {
    let mut c = (*s.catalog).clone();
    c.plans.get_mut("free").unwrap().low_balance_threshold = 100;
    c.events.endpoints.insert(
        "app".into(),
        tally::catalog::Endpoint {
            url: url.into(),
            types: Vec::new(),
            secret: tally::catalog::SecretSource::Env("UNUSED_IN_TESTS".into()),
        },
    );
    s.catalog = Arc::new(c);
    s.events = event_settings(url, schedule, allow_private);
}

async fn app_for(backend: Backend, r: &Receiver, schedule: &str) -> TestApp {
    let url = r.url();
    TestApp::spawn_with(backend, |s| with_endpoint(s, &url, schedule, true)).await
}

fn ts(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap(),
    }
}

async fn deliveries(app: &TestApp, account: &str) -> Vec<pb::EventDelivery> {
    app.admin()
        .await
        .list_event_deliveries(pb::ListEventDeliveriesRequest {
            account_id: account.into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries
}

/// The account's first delivery to reach `failed`, waiting up to 6 s.
async fn first_failed(app: &TestApp, account: &str) -> Option<pb::EventDelivery> {
    for _ in 0..300 {
        let listed = deliveries(app, account).await;
        if let Some(d) = listed
            .iter()
            .find(|d| d.state() == pb::EventDeliveryState::Failed)
        {
            return Some(d.clone());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn kinds(events: &[(String, String, Value)]) -> Vec<&str> {
    events.iter().map(|(_, k, _)| k.as_str()).collect()
}

/// An opened account, a grant that expires, a low-balance crossing, a hold that expires, a
/// purchase and its refund: exactly the documented events, in order per account, signed.
async fn changes_make_their_documented_events_in_order(backend: Backend) {
    let r = Receiver::start().await;
    let app = app_for(backend, &r, FAST).await;
    let mut admin = app.admin().await;
    let mut credit = app.credit().await;
    admin
        .open_account(pb::OpenAccountRequest {
            account_id: "u1".into(),
            plan: "free".into(),
            idempotency_key: key(),
        })
        .await
        .unwrap();
    r.wait(Duration::from_secs(10), "opened", |r| {
        r.events_of("u1").len() >= 2
    })
    .await;
    let expires = chrono::Utc::now() + chrono::TimeDelta::milliseconds(1500);
    admin
        .grant(pb::GrantRequest {
            account_id: "u1".into(),
            amount: 50,
            reason: "promo".into(),
            idempotency_key: key(),
            source: pb::GrantSource::Promotion.into(),
            expires_at: Some(ts(expires)),
            ..Default::default()
        })
        .await
        .unwrap();
    r.wait(Duration::from_secs(15), "expired", |r| {
        kinds(&r.events_of("u1")).contains(&"credits.expired")
    })
    .await;
    // 100 → 70: under the threshold of 100, once; 70 → 60 is no second crossing.
    for amount in [30, 10] {
        credit
            .reserve(pb::ReserveRequest {
                ttl: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..crate::reserve_req("u1", amount, &key())
            })
            .await
            .unwrap();
    }
    r.wait(Duration::from_secs(15), "two holds expired", |r| {
        kinds(&r.events_of("u1"))
            .iter()
            .filter(|k| **k == "hold.expired")
            .count()
            == 2
    })
    .await;
    // A purchase and its full refund, through Stripe's webhook.
    let buy = crate::stripe_facts::paid_session("evt_ev_buy", "cs_ev1", "buyer", "pi_ev1");
    assert_eq!(app.post_webhook(&buy).await.0, 200);
    let refund = crate::stripe_facts::refund("evt_ev_ref", "ch_ev1", Some("pi_ev1"), 1900);
    assert_eq!(app.post_webhook(&refund).await.0, 200);
    // The claw-back and the crossing it causes (one transaction, two events).
    r.wait(Duration::from_secs(15), "clawed back", |r| {
        kinds(&r.events_of("buyer")).contains(&"credits.low_balance")
    })
    .await;

    let u1 = r.events_of("u1");
    assert_eq!(
        kinds(&u1),
        [
            "account.opened",
            "credits.granted",
            "credits.granted",
            "credits.expiring",
            "credits.expired",
            "credits.low_balance",
            "hold.expired",
            "hold.expired"
        ],
        "{u1:#?}"
    );
    let d = |i: usize| &u1[i].2;
    assert_eq!(d(0)["plan"], "free");
    assert_eq!(d(0)["bonus"], 100);
    assert_eq!(d(0)["available"], 100);
    assert_eq!(d(1)["source"], "signup_bonus");
    assert_eq!(d(1)["amount"], 100);
    assert_eq!(d(2)["source"], "promotion");
    assert_eq!(d(2)["amount"], 50);
    assert_eq!(d(2)["available"], 150);
    assert!(d(2)["expires_at"].is_string());
    assert_eq!(d(3)["grant_id"], d(2)["grant_id"]);
    assert_eq!(d(3)["remaining"], 50);
    assert_eq!(d(4)["grant_id"], d(2)["grant_id"]);
    assert_eq!(d(4)["amount"], 50);
    assert_eq!(d(4)["available"], 100);
    assert_eq!(d(5)["available"], 70);
    assert_eq!(d(5)["threshold"], 100);
    assert_eq!(d(6)["amount"], 30);
    assert_eq!(d(7)["amount"], 10);
    assert_eq!(d(7)["available"], 100);

    let buyer = r.events_of("buyer");
    assert_eq!(
        kinds(&buyer),
        [
            "account.opened",
            "credits.granted",
            "purchase.completed",
            "credits.clawed_back",
            "credits.low_balance"
        ],
        "{buyer:#?}"
    );
    assert_eq!(buyer[1].2["source"], "purchase");
    assert_eq!(buyer[1].2["amount"], 500);
    assert_eq!(buyer[1].2["business_key"], "checkout_session:cs_ev1");
    assert_eq!(buyer[2].2["business_key"], "checkout_session:cs_ev1");
    assert_eq!(buyer[2].2["credits"], 500);
    assert_eq!(buyer[2].2["amount_paid"], 1900);
    assert_eq!(buyer[2].2["grant_id"], buyer[1].2["grant_id"]);
    assert_eq!(buyer[3].2["amount"], 500);
    assert_eq!(buyer[3].2["debt"], 0);
    assert_eq!(buyer[3].2["available"], 0);
    assert_eq!(buyer[3].2["business_key"], "checkout_session:cs_ev1");
    // 500 → 0 crossed the threshold of 100.
    assert_eq!(buyer[4].2["available"], 0);

    for g in r.got() {
        g.verify();
        let body = g.json();
        assert!(g.id.starts_with("evt_"), "{}", g.id);
        assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    }
    // The operators' view: every delivery delivered, in one attempt.
    let listed = deliveries(&app, "u1").await;
    assert_eq!(listed.len(), 8);
    assert!(
        listed
            .iter()
            .all(|d| d.state() == pb::EventDeliveryState::Delivered && d.attempts == 1),
        "{listed:#?}"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", app.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "tally_events_delivered_total",
        "tally_event_delivery_latency_seconds",
        "tally_events_oldest_pending_age_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    app.finish().await;
}

/// A refused command writes no event; nor does one with no endpoint configured.
async fn refused_changes_make_no_event(backend: Backend) {
    let r = Receiver::start().await;
    let app = app_for(backend, &r, FAST).await;
    app.fund("poor", 10).await;
    r.wait(Duration::from_secs(10), "grant", |r| {
        r.events_of("poor").len() == 2
    })
    .await;
    let refused = app
        .credit()
        .await
        .reserve(crate::reserve_req("poor", 11, &key()))
        .await;
    assert!(refused.is_err());
    // A rejected command in a group of accepted ones: the group commits, its events do not.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut c = app.credit().await;
        set.spawn(async move {
            c.reserve(crate::reserve_req(
                "poor",
                if i % 2 == 0 { 1 } else { 1000 },
                &key(),
            ))
            .await
            .is_ok()
        });
    }
    let mut ok = 0;
    while let Some(done) = set.join_next().await {
        ok += usize::from(done.unwrap());
    }
    assert_eq!(ok, 10);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 10 → 0 never crosses 100 downwards (it started under): no event at all.
    assert_eq!(
        kinds(&r.events_of("poor")),
        ["account.opened", "credits.granted"]
    );
    assert_eq!(deliveries(&app, "poor").await.len(), 2);
    app.finish().await;

    // No endpoint: the outbox stays empty.
    let app = TestApp::spawn(backend).await;
    app.fund("quiet", 10).await;
    let all = app
        .admin()
        .await
        .list_event_deliveries(pb::ListEventDeliveriesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(all.deliveries.is_empty());
    app.finish().await;
}

/// 500, a timeout, 503, then 204: four attempts with growing gaps, one webhook-id, one body.
async fn receiver_failures_back_off_then_deliver(backend: Backend) {
    let r = Receiver::start().await;
    r.script([
        Reply::Status(500),
        Reply::Slow(Duration::from_millis(1500)),
        Reply::Status(503),
    ]);
    let app = app_for(backend, &r, "0s,400ms,800ms,1200ms,1600ms").await;
    app.fund("flaky", 10).await;
    r.wait(Duration::from_secs(20), "delivery", |r| {
        r.of("flaky").len() >= 5
    })
    .await;
    let got = r.of("flaky");
    // account.opened: four attempts; its successor waited for it (per-account order).
    let first = &got[0];
    let attempts: Vec<&Got> = got.iter().filter(|g| g.id == first.id).collect();
    assert_eq!(attempts.len(), 4, "{got:#?}");
    assert!(attempts.iter().all(|g| g.body == first.body));
    assert_eq!(first.kind(), "account.opened");
    let gaps: Vec<Duration> = attempts
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect();
    // Scheduled 400, 800, 1200 ms (±20 %); the timeout adds its 1 s to the second gap.
    assert!(gaps[0] >= Duration::from_millis(300), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(1600), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(900), "{gaps:?}");
    let second = got.iter().position(|g| g.id != first.id).unwrap();
    assert!(second > 3, "the next event waited: {got:#?}");
    let listed = deliveries(&app, "flaky").await;
    let opened = listed.iter().find(|d| d.event_id == first.id).unwrap();
    assert_eq!(opened.attempts, 4);
    assert_eq!(opened.state(), pb::EventDeliveryState::Delivered);
    app.finish().await;
}

/// A 60 s outage (connections refused) is waited out on the schedule, then delivered.
async fn an_outage_is_waited_out(backend: Backend) {
    let r = Receiver::start().await;
    r.stop();
    let app = app_for(backend, &r, "0s,5s,10s,20s,30s,30s,30s").await;
    app.fund("outage", 10).await;
    let down = Instant::now();
    tokio::time::sleep(Duration::from_mins(1)).await;
    let during = deliveries(&app, "outage").await;
    let opened = during
        .iter()
        .find(|d| d.r#type == "account.opened")
        .unwrap();
    assert_eq!(opened.state(), pb::EventDeliveryState::Pending);
    // Attempts at 0, 5, 15, 35 and 65 s (±20 % each).
    assert!((3..=5).contains(&opened.attempts), "{opened:#?}");
    assert!(!opened.last_error.is_empty());
    r.restart().await;
    r.wait(Duration::from_mins(1), "delivery after the outage", |r| {
        r.events_of("outage").len() == 2
    })
    .await;
    assert!(down.elapsed() >= Duration::from_mins(1));
    let after = deliveries(&app, "outage").await;
    assert!(
        after
            .iter()
            .all(|d| d.state() == pb::EventDeliveryState::Delivered)
    );
    app.finish().await;
}

/// 410 Gone disables the endpoint: nothing more is posted until an operator enables it.
async fn gone_disables_the_endpoint(backend: Backend) {
    let r = Receiver::start().await;
    r.script([Reply::Status(410)]);
    let app = app_for(backend, &r, FAST).await;
    app.fund("gone", 10).await;
    r.wait(Duration::from_secs(10), "the 410", |r| {
        r.of("gone").len() == 1
    })
    .await;
    let mut admin = app.admin().await;
    let mut disabled = false;
    for _ in 0..100 {
        let e = admin
            .list_event_endpoints(pb::ListEventEndpointsRequest {})
            .await
            .unwrap()
            .into_inner();
        if e.endpoints[0].disabled {
            disabled = true;
            assert_eq!(e.endpoints[0].name, "app");
            assert_eq!(e.endpoints[0].disabled_reason, "410 Gone");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(disabled);
    app.fund("gone2", 10).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(r.got().len(), 1, "a disabled endpoint got more");
    let enabled = admin
        .enable_event_endpoint(pb::EnableEventEndpointRequest { name: "app".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(enabled.was_disabled);
    r.wait(Duration::from_secs(10), "everything after enabling", |r| {
        r.events_of("gone").len() == 2 && r.events_of("gone2").len() == 2
    })
    .await;
    app.finish().await;
}

/// A redirect is a failure (never followed); the schedule ends in `failed`.
async fn redirects_are_not_followed(backend: Backend) {
    let r = Receiver::start().await;
    r.script(std::iter::repeat_n(Reply::Redirect, 4));
    let app = app_for(backend, &r, FAST).await;
    app.fund("moved", 10).await;
    let failed = first_failed(&app, "moved").await;
    let failed = failed.expect("the redirected event fails after its schedule");
    assert_eq!(failed.attempts, 4);
    assert_eq!(failed.last_status, 302);
    assert!(failed.last_error.contains("redirect"), "{failed:#?}");
    assert!(r.got().iter().all(|g| g.path == "/hooks/tally"));
    // A failed event no longer holds the account's later ones back.
    r.wait(Duration::from_secs(10), "the next event", |r| {
        r.events_of("moved").len() == 2
    })
    .await;
    // An operator sends it again: same id.
    let again = app
        .admin()
        .await
        .redeliver_event(pb::RedeliverEventRequest {
            event_id: failed.event_id.clone(),
            endpoint: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.queued, 1);
    r.wait(Duration::from_secs(10), "the redelivery", |r| {
        r.of("moved")
            .iter()
            .filter(|g| g.id == failed.event_id)
            .count()
            == 5
    })
    .await;
    let unknown = app
        .admin()
        .await
        .redeliver_event(pb::RedeliverEventRequest {
            event_id: "evt_nope".into(),
            endpoint: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
    app.finish().await;
}

/// Loopback and private addresses are refused unless allowed: nothing reaches the receiver.
async fn private_addresses_are_refused(backend: Backend) {
    let r = Receiver::start().await;
    let url = format!("http://localhost:{}/hooks/tally", r.addr.port());
    let app = TestApp::spawn_with(backend, |s| with_endpoint(s, &url, "0s,100ms", false)).await;
    app.fund("ssrf", 10).await;
    let failed = first_failed(&app, "ssrf").await;
    let failed = failed.expect("a refused address fails");
    assert!(failed.last_error.contains("refused"), "{failed:#?}");
    assert!(r.got().is_empty(), "a request reached a private address");
    app.finish().await;
}

/// Two replicas on one PostgreSQL: every event posted once between them, in order per
/// account; 20 rounds, each on new accounts (no row yet) and on warm ones, the calls of one
/// account spread over both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_deliver_each_event_once() {
    let r = Receiver::start().await;
    let url = r.url();
    let a = TestApp::spawn_with(Backend::Postgres, |s| with_endpoint(s, &url, FAST, true)).await;
    let db_b = TestDb::from_url(a.db.url.clone());
    let b = TestApp::spawn_on_with(db_b, |s| with_endpoint(s, &url, FAST, true)).await;
    let admins = [a.admin().await, b.admin().await];
    let warm: Vec<String> = (0..4).map(|i| format!("warm{i}")).collect();
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..20 {
        let cold: Vec<String> = (0..2).map(|i| format!("cold{round}-{i}")).collect();
        let mut set = tokio::task::JoinSet::new();
        for (i, account) in cold.iter().chain(&warm).enumerate() {
            for n in 0..2 {
                let mut admin = admins[(i + n + round) % 2].clone();
                let account = account.clone();
                set.spawn(async move {
                    admin
                        .grant(crate::grant_req(&account, 10, &key()))
                        .await
                        .unwrap();
                });
            }
            // account.opened once, then a credits.granted per grant.
            *expected.entry(account.clone()).or_insert(1) += 2;
        }
        while let Some(done) = set.join_next().await {
            done.unwrap();
        }
    }
    let total: usize = expected.values().sum();
    r.wait(Duration::from_mins(1), "every event", |r| {
        expected.iter().all(|(a, n)| r.events_of(a).len() == *n)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut posts: BTreeMap<String, usize> = BTreeMap::new();
    for g in r.got() {
        g.verify();
        *posts.entry(g.id).or_default() += 1;
    }
    assert_eq!(posts.len(), total);
    assert!(
        posts.values().all(|n| *n == 1),
        "double dispatch: {:?}",
        posts.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    for account in expected.keys() {
        let events = r.events_of(account);
        assert_eq!(events[0].1, "account.opened", "{account}");
        let avail: Vec<i64> = events
            .iter()
            .skip(1)
            .map(|(_, _, d)| d["available"].as_i64().unwrap())
            .collect();
        let want: Vec<i64> = (1..=avail.len() as i64).map(|k| 10 * k).collect();
        assert_eq!(avail, want, "{account}: out of order");
    }
    b.finish().await;
    a.finish().await;
}

crate::on_both_backends!(
    changes_make_their_documented_events_in_order,
    refused_changes_make_no_event,
    receiver_failures_back_off_then_deliver,
    an_outage_is_waited_out,
    gone_disables_the_endpoint,
    redirects_are_not_followed,
    private_addresses_are_refused,
    kill_nine_during_deliveries,
);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `tally serve` as a child process (its log appended to `log`).
struct Child {
    child: tokio::process::Child,
    grpc: String,
}

async fn spawn_serve(db_url: &str, catalog: &std::path::Path, log: &std::path::Path) -> Child {
    let (grpc, http, metrics) = (free_port(), free_port(), free_port());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TALLY_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .args(["serve", "--log-format", "json"])
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .args(["--database-url", db_url])
        .arg("--catalog")
        .arg(catalog)
        .args(["--events-allow-private", "--events-timeout", "1s"])
        .args([
            "--events-poll-interval",
            "20ms",
            "--sweep-interval",
            "100ms",
        ])
        .args([
            "--events-retry-schedule",
            "0s,100ms,200ms,300ms,400ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms",
        ])
        .env("TALLY_TEST_EVENTS_SECRET", SECRET)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ready = format!("http://127.0.0.1:{metrics}/readyz");
    let start = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(&ready).await
            && r.status().as_u16() == 200
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "tally serve did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Child {
        child,
        grpc: format!("http://127.0.0.1:{grpc}"),
    }
}

/// `kill -9` of `tally serve` while it writes and delivers, 10 times: every event whose
/// change committed is delivered at least once with one webhook-id and one body, none that
/// is not stored, each account's in order; a grant's event exists exactly when its grant does.
async fn kill_nine_during_deliveries(backend: Backend) {
    let r = Receiver::start().await;
    // Some 500s and slow answers, so kills land mid-attempt and mid-retry.
    r.script((0..20_000).map(|i| match i % 7 {
        0 => Reply::Status(500),
        3 => Reply::Slow(Duration::from_millis(40)),
        _ => Reply::Ok,
    }));
    let db = TestDb::new(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(
        &catalog,
        format!(
            "{}\n[events.endpoints.app]\nurl = \"{}\"\nsecret_env = \"TALLY_TEST_EVENTS_SECRET\"\n",
            tally::catalog::DEFAULT_TOML,
            r.url()
        ),
    )
    .unwrap();
    let log = dir.path().join("serve.log");
    let accounts: Vec<String> = (0..8).map(|i| format!("k{i}")).collect();
    let mut acked: BTreeMap<String, usize> = BTreeMap::new();
    for cycle in 0..10u64 {
        let mut serve = spawn_serve(&db.url, &catalog, &log).await;
        let channel = tonic::transport::Channel::from_shared(serve.grpc.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut set = tokio::task::JoinSet::new();
        for account in &accounts {
            let mut admin = pb::admin_service_client::AdminServiceClient::new(channel.clone());
            let account = account.clone();
            set.spawn(async move {
                let mut ok = 0;
                loop {
                    let done = admin.grant(crate::grant_req(&account, 1, &key())).await;
                    if done.is_err() {
                        return (account, ok);
                    }
                    ok += 1;
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(300 + (cycle * 97) % 400)).await;
        serve.child.start_kill().unwrap();
        let _ = serve.child.wait().await;
        while let Some(done) = set.join_next().await {
            let (account, ok) = done.unwrap();
            *acked.entry(account).or_default() += ok;
        }
    }
    // The last start delivers what is left.
    let mut serve = spawn_serve(&db.url, &catalog, &log).await;
    let store = tally::app::open_store(&db.url, 4, Arc::default())
        .await
        .unwrap();
    let all = || tally::storage::EventQuery {
        limit: 100_000,
        ..Default::default()
    };
    let start = Instant::now();
    loop {
        let rows = store.list_events(&all()).await.unwrap();
        if rows
            .iter()
            .all(|e| e.state != tally::domain::event::DeliveryState::Pending)
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_mins(1),
            "undelivered after the last start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    serve.child.start_kill().unwrap();
    let _ = serve.child.wait().await;

    let rows = store.list_events(&all()).await.unwrap();
    assert!(
        rows.iter()
            .all(|e| e.state == tally::domain::event::DeliveryState::Delivered),
        "{:?}",
        rows.iter()
            .filter(|e| e.state != tally::domain::event::DeliveryState::Delivered)
            .collect::<Vec<_>>()
    );
    let stored: BTreeMap<String, String> = rows
        .iter()
        .map(|e| (e.event_id.clone(), e.body.clone()))
        .collect();
    let got = r.got();
    let mut received: BTreeMap<String, String> = BTreeMap::new();
    for g in &got {
        g.verify();
        if let Some(first) = received.insert(g.id.clone(), g.body.clone()) {
            assert_eq!(first, g.body, "{}: another body on a retry", g.id);
        }
    }
    assert_eq!(
        received.keys().collect::<Vec<_>>(),
        stored.keys().collect::<Vec<_>>(),
        "received ≠ stored events"
    );
    assert_eq!(received, stored);
    let retried = got.len() - received.len();
    let mut total_grants = 0;
    for account in &accounts {
        let id = tally::domain::AccountId::parse("account_id", account).unwrap();
        let grants: std::collections::BTreeSet<String> = store
            .grants(&id)
            .await
            .unwrap()
            .into_iter()
            .map(|g| g.grant_id)
            .collect();
        total_grants += grants.len();
        assert!(
            grants.len() >= acked[account],
            "{account}: an acknowledged grant is missing"
        );
        let events = r.events_of(account);
        assert_eq!(events[0].1, "account.opened", "{account}");
        let granted: Vec<&Value> = events
            .iter()
            .filter(|(_, k, _)| k == "credits.granted")
            .map(|(_, _, d)| d)
            .collect();
        let ids: std::collections::BTreeSet<String> = granted
            .iter()
            .map(|d| d["grant_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, grants, "{account}: grants and their events differ");
        let order: Vec<i64> = granted
            .iter()
            .map(|d| d["available"].as_i64().unwrap())
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "{account}: out of order {order:?}"
        );
    }
    assert!(
        total_grants >= 80,
        "too little happened: {total_grants} grants"
    );
    eprintln!(
        "kill -9 ×10: {total_grants} grants, {} events, {} posts ({retried} repeated)",
        stored.len(),
        got.len()
    );
}

/// `tally serve` refuses an endpoint on a private address literal unless allowed.
#[tokio::test]
async fn serve_refuses_a_private_endpoint_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(
        &catalog,
        format!(
            "{}\n[events.endpoints.app]\nurl = \"http://10.1.2.3/hooks\"\nsecret_env = \"TALLY_TEST_EVENTS_SECRET\"\n",
            tally::catalog::DEFAULT_TOML
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--metrics-listen", "127.0.0.1:0", "--database-url"])
        .arg(format!("sqlite://{}", dir.path().join("t.db").display()))
        .arg("--catalog")
        .arg(&catalog)
        .env("TALLY_TEST_EVENTS_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SSRF") && err.contains("10.1.2.3"), "{err}");
    assert!(!err.contains(SECRET));
}
