//! What an operator relies on: callers and roles, tenant isolation (also by hold id), rate
//! limits and load shedding that write nothing, request size limits, readiness that follows
//! the database, and the metrics Prometheus scrapes.

use std::time::Duration;

use tally::pb;
use tokio::task::JoinSet;
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

use crate::support::{Backend, TestApp, TestCaller, UNLIMITED, callers};
use crate::{expect_error, grant_req, reserve_req, with};

const VIDEO: &str = "tok-video-generation";
const IMAGE: &str = "tok-image-generation";
const ADMIN: &str = "tok-admin";
const LIMITED: &str = "tok-limited";

async fn secured(backend: Backend) -> TestApp {
    TestApp::spawn_with(backend, |s| {
        s.auth = callers(
            &[
                TestCaller {
                    name: "video",
                    roles: &["generation"],
                    prefixes: &["video:"],
                    token: VIDEO,
                    extra: "",
                },
                TestCaller {
                    name: "image",
                    roles: &["generation", "billing"],
                    prefixes: &["image:"],
                    token: IMAGE,
                    extra: "",
                },
                TestCaller {
                    name: "ops",
                    roles: &["admin"],
                    prefixes: &[],
                    token: ADMIN,
                    extra: "",
                },
                TestCaller {
                    name: "limited",
                    roles: &["generation"],
                    prefixes: &[],
                    token: LIMITED,
                    extra: "rate_limit_rps = 1\nrate_limit_burst = 3",
                },
            ],
            tally::auth::RateLimits {
                sensitive: tally::auth::Rate {
                    per_second: 1,
                    burst: 2,
                },
                ..UNLIMITED
            },
        );
    })
    .await
}

async fn balance(app: &TestApp, account: &str) -> i64 {
    app.store
        .balance(&tally::domain::AccountId::parse("a", account).unwrap())
        .await
        .map_or(0, |b| b.available)
}

async fn tokens_roles_and_tenants_are_enforced_even_by_hold_id(backend: Backend) {
    let app = secured(backend).await;
    let mut credit = app.credit().await;
    let mut admin = app.admin().await;

    // No token, an unknown token: UNAUTHENTICATED; health needs none.
    let r = credit
        .check_balance(pb::CheckBalanceRequest {
            account_id: "video:u1".into(),
        })
        .await
        .unwrap_err();
    expect_error(&r, Code::Unauthenticated, "UNAUTHENTICATED");
    let r = credit
        .check_balance(with(
            pb::CheckBalanceRequest {
                account_id: "video:u1".into(),
            },
            "tok-nobody",
        ))
        .await
        .unwrap_err();
    expect_error(&r, Code::Unauthenticated, "UNAUTHENTICATED");
    let mut health = HealthClient::new(app.channel().await);
    let h = health
        .check(HealthCheckRequest {
            service: "liveness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status(), ServingStatus::Serving);

    // Roles: generation cannot grant, admin cannot reserve.
    let r = admin
        .grant(with(grant_req("video:u1", 100, "g-video"), VIDEO))
        .await
        .unwrap_err();
    expect_error(&r, Code::PermissionDenied, "PERMISSION_DENIED");
    for (account, key) in [("video:u1", "g1"), ("image:u1", "g2")] {
        admin
            .grant(with(grant_req(account, 100, key), ADMIN))
            .await
            .unwrap();
    }
    let r = credit
        .reserve(with(reserve_req("video:u1", 5, "r-admin"), ADMIN))
        .await
        .unwrap_err();
    expect_error(&r, Code::PermissionDenied, "PERMISSION_DENIED");

    // Tenants: the video service cannot see or spend image accounts...
    let r = credit
        .reserve(with(reserve_req("image:u1", 5, "r-cross"), VIDEO))
        .await
        .unwrap_err();
    expect_error(&r, Code::PermissionDenied, "PERMISSION_DENIED");
    // ...nor touch the image service's holds by id.
    let hold = credit
        .reserve(with(reserve_req("image:u1", 30, "r-image"), IMAGE))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    let id = hold.hold_id.clone();
    let denied = [
        credit
            .commit(with(
                pb::CommitRequest {
                    hold_id: id.clone(),
                    amount: 1,
                    idempotency_key: "c-cross".into(),
                },
                VIDEO,
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
        credit
            .refund(with(
                pb::RefundRequest {
                    hold_id: id.clone(),
                    idempotency_key: "f-cross".into(),
                    ..Default::default()
                },
                VIDEO,
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
        credit
            .extend_hold(with(
                pb::ExtendHoldRequest {
                    hold_id: id.clone(),
                    ttl: Some(prost_types::Duration {
                        seconds: 60,
                        nanos: 0,
                    }),
                    idempotency_key: "e-cross".into(),
                },
                VIDEO,
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
        credit
            .get_hold(with(
                pb::GetHoldRequest {
                    hold_id: id.clone(),
                },
                VIDEO,
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
    ];
    for s in &denied {
        expect_error(s, Code::PermissionDenied, "PERMISSION_DENIED");
    }
    let still = credit
        .get_hold(with(
            pb::GetHoldRequest {
                hold_id: id.clone(),
            },
            IMAGE,
        ))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    assert_eq!(still, hold, "the hold is untouched");
    assert_eq!(balance(&app, "image:u1").await, 70);
    // The owner settles it.
    credit
        .commit(with(
            pb::CommitRequest {
                hold_id: id,
                amount: 10,
                idempotency_key: "c-own".into(),
            },
            IMAGE,
        ))
        .await
        .unwrap();
    assert_eq!(balance(&app, "image:u1").await, 90);

    // Idempotency keys are scoped per caller: the same key from two callers is two requests.
    credit
        .reserve(with(reserve_req("video:u1", 1, "shared-key"), VIDEO))
        .await
        .unwrap();
    credit
        .reserve(with(reserve_req("image:u1", 1, "shared-key"), IMAGE))
        .await
        .unwrap();

    // Billing endpoints: the billing role and the caller's prefixes.
    let http = reqwest::Client::new();
    let billing = |account: &str, token: &str| {
        http.get(format!("http://{}/v1/accounts/{account}/billing", app.http))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(billing("image:u1", IMAGE).await.unwrap().status(), 200);
    assert_eq!(billing("video:u1", IMAGE).await.unwrap().status(), 403);
    assert_eq!(billing("video:u1", VIDEO).await.unwrap().status(), 403);
    let r = http
        .get(format!("http://{}/v1/accounts/image:u1/billing", app.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    app.finish().await;
}

async fn rate_limits_refuse_with_retry_info_and_write_nothing(backend: Backend) {
    let app = secured(backend).await;
    let mut credit = app.credit().await;
    let mut admin = app.admin().await;
    // The admin tier is lower (burst 2 at 1/s here): two grants pass, the third at once does not.
    admin
        .grant(with(grant_req("acct", 1000, "g"), ADMIN))
        .await
        .unwrap();
    admin
        .grant(with(grant_req("video:x", 10, "g2"), ADMIN))
        .await
        .unwrap();
    let r = admin
        .grant(with(grant_req("acct", 1, "g3"), ADMIN))
        .await
        .unwrap_err();
    expect_error(&r, Code::ResourceExhausted, "RATE_LIMITED");
    assert_eq!(
        balance(&app, "acct").await,
        1000,
        "the refused grant wrote nothing"
    );
    // Burst 3 at 1/s: of 10 quick reserves, 3 (perhaps 4 on a slow machine) pass.
    let mut ok = 0;
    let mut limited = 0;
    for i in 0..10 {
        match credit
            .reserve(with(reserve_req("acct", 1, &format!("r{i}")), LIMITED))
            .await
        {
            Ok(_) => ok += 1,
            Err(s) => {
                expect_error(&s, Code::ResourceExhausted, "RATE_LIMITED");
                let retry = s.get_details_retry_info().unwrap().retry_delay.unwrap();
                assert!(retry > Duration::ZERO && retry <= Duration::from_secs(1));
                limited += 1;
            }
        }
    }
    // 3 from the burst, plus one per second the loop took (a slow machine).
    assert!((3..=5).contains(&ok) && limited >= 5, "{ok} passed");
    assert_eq!(ok + limited, 10);
    let holds = crate::support::holds_of(&app.store, "acct").await;
    assert_eq!(holds.len(), ok, "a refused call writes nothing");
    assert_eq!(
        balance(&app, "acct").await,
        1000 - i64::try_from(ok).unwrap()
    );
    // Another caller is unaffected.
    credit
        .reserve(with(reserve_req("video:x", 1, "v1"), VIDEO))
        .await
        .unwrap();
    // Checkout creation counts in the lower tier too: 429 with Retry-After.
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = http
            .post(format!("http://{}/v1/checkout/sessions", app.http))
            .bearer_auth(IMAGE)
            .json(
                &serde_json::json!({"account_id": "image:u9", "pack_id": "starter",
                "success_url": "https://x.example/ok", "cancel_url": "https://x.example/no"}),
            )
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            assert!(
                r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    >= 1
            );
        }
        statuses.push(r.status().as_u16());
    }
    // No Stripe key is configured: admitted calls get 503; the rest are limited.
    assert_eq!(&statuses[..2], &[503, 503], "{statuses:?}");
    assert!(statuses[2..].iter().all(|s| *s == 429), "{statuses:?}");
    // So do the portal and both syncs (they call Stripe too): the tier is spent.
    for path in [
        "/v1/billing/portal",
        "/v1/checkout/sessions/cs_test_1/sync",
        "/v1/accounts/image:u9/billing/sync",
    ] {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let r = http
                .post(format!("http://{}{path}", app.http))
                .bearer_auth(IMAGE)
                .json(&serde_json::json!({"account_id": "image:u9", "return_url": "https://x.example/"}))
                .send()
                .await
                .unwrap();
            seen.push(r.status().as_u16());
        }
        assert!(seen.contains(&429), "{path}: {seen:?}");
    }
    app.finish().await;
}

async fn overload_is_shed_fast_and_writes_nothing(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.max_concurrent_requests = 2).await;
    let mut admin = app.admin().await;
    admin.grant(grant_req("acct", 10_000, "g")).await.unwrap();
    let mut set = JoinSet::new();
    for i in 0..200 {
        let mut c = app.credit().await;
        set.spawn(async move { c.reserve(reserve_req("acct", 1, &format!("r{i}"))).await });
    }
    let (mut ok, mut shed) = (0usize, 0usize);
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => {
                expect_error(&s, Code::Unavailable, "OVERLOADED");
                assert!(s.get_details_retry_info().is_some());
                shed += 1;
            }
        }
    }
    assert_eq!(ok + shed, 200);
    assert!(shed > 0 && ok > 0, "ok {ok}, shed {shed}");
    assert_eq!(
        balance(&app, "acct").await,
        10_000 - i64::try_from(ok).unwrap()
    );
    app.finish().await;
}

async fn oversized_requests_are_refused_before_the_database(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut credit = app.credit().await;
    let mut req = reserve_req("big", 1, "k");
    req.metadata.insert("blob".into(), "x".repeat(1024 * 1024));
    let s = credit.reserve(req).await.unwrap_err();
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    // A 64 KiB header: refused by HTTP/2 (the header list limit is 16 KiB).
    let mut r = Request::new(reserve_req("big", 1, "k2"));
    r.metadata_mut()
        .insert("x-padding", "p".repeat(64 * 1024).parse().unwrap());
    assert!(app.credit().await.reserve(r).await.is_err());
    assert!(
        app.store
            .balance(&tally::domain::AccountId::parse("a", "big").unwrap())
            .await
            .is_err(),
        "no account was created"
    );
    // A billing body over 16 KiB: 413.
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/billing/portal", app.http))
        .header("content-type", "application/json")
        .body(format!("{{\"account_id\":\"{}\"}}", "a".repeat(20 * 1024)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    app.finish().await;
}

async fn scrape(app: &TestApp) -> String {
    reqwest::get(format!("http://{}/metrics", app.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the sample `series` (name with labels, as rendered) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn metrics_have_the_documented_names_and_no_account_labels(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.audit_interval = Duration::from_millis(100);
    })
    .await;
    let mut credit = app.credit().await;
    let mut admin = app.admin().await;
    for i in 0..20 {
        let account = format!("acct-secret-{i}");
        admin
            .grant(grant_req(&account, 10, &format!("g{i}")))
            .await
            .unwrap();
        credit
            .reserve(reserve_req(&account, 3, &format!("r{i}")))
            .await
            .unwrap();
    }
    let e = credit
        .reserve(reserve_req("acct-secret-0", 1000, "too-much"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let (status, _) = app.post_webhook(b"{\"id\":\"evt_m\",\"type\":\"product.created\",\"livemode\":false,\"data\":{\"object\":{}}}").await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = scrape(&app).await;
    for name in [
        "tally_rpc_requests_total",
        "tally_rpc_request_duration_seconds_bucket",
        "tally_http_requests_total",
        "tally_holds_open",
        "tally_hold_expirations_total",
        "tally_webhook_events_total",
        "tally_grants_total",
        "tally_credits_granted_total",
        "tally_db_pool_connections",
        "tally_db_pool_max_connections",
        "tally_db_group_commands_bucket",
        "tally_db_group_wait_seconds_bucket",
        "tally_db_group_duration_seconds_bucket",
        "tally_ledger_invariant_violations_total",
        "tally_ledger_audits_total",
        "tally_build_info",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing from\n{text}"
        );
    }
    assert_eq!(
        sample(
            &text,
            "tally_rpc_requests_total{rpc=\"tally.v1.CreditService/Reserve\",code=\"OK\",reason=\"OK\"}"
        ),
        Some(20.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "tally_rpc_requests_total{rpc=\"tally.v1.CreditService/Reserve\",code=\"FAILED_PRECONDITION\",reason=\"INSUFFICIENT_CREDITS\"}"
        ),
        Some(1.0)
    );
    assert_eq!(sample(&text, "tally_holds_open"), Some(20.0));
    // Every job-path call waited for a worker once, and every group was timed once.
    let commands = sample(&text, "tally_db_group_commands_sum").unwrap();
    assert!(commands >= 21.0, "{text}");
    assert_eq!(
        sample(&text, "tally_db_group_wait_seconds_count"),
        Some(commands)
    );
    assert_eq!(
        sample(&text, "tally_db_group_duration_seconds_count"),
        sample(&text, "tally_db_group_commands_count")
    );
    assert!(sample(&text, "tally_db_group_duration_seconds_sum").unwrap() > 0.0);
    assert_eq!(
        sample(&text, "tally_credits_granted_total{source=\"adjustment\"}"),
        Some(200.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "tally_webhook_events_total{type=\"product.created\",result=\"processed\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "tally_ledger_invariant_violations_total"),
        Some(0.0)
    );
    assert!(sample(&text, "tally_ledger_audits_total{result=\"ok\"}").unwrap() >= 1.0);
    assert!(!text.contains("acct-secret"), "no account ids in labels");
    app.finish().await;
}

async fn the_reconciliation_counts_an_injected_imbalance() {
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.audit_interval = Duration::from_millis(100);
    })
    .await;
    app.fund("acct", 5).await;
    let forged = "INSERT INTO entry (account_id, kind, available_delta, held_delta, reason, created_at) \
                  VALUES ('acct', 'grant', 7, 0, 'forged', 0)";
    sqlx::query(forged)
        .execute(app.db.sqlite().await.pool())
        .await
        .unwrap();
    let mut seen = 0.0;
    for _ in 0..50 {
        seen = sample(
            &scrape(&app).await,
            "tally_ledger_invariant_violations_total",
        )
        .unwrap_or(0.0);
        if seen > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen >= 1.0, "the forged entry was detected");
}

/// The PostgreSQL database stops accepting connections: readiness goes NOT_SERVING (gRPC and
/// /readyz) while liveness stays SERVING; when it comes back, readiness returns by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_follows_the_database_and_liveness_does_not() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let health = HealthClient::new(app.channel().await);
    let status = |service: &'static str| {
        let mut h = health.clone();
        async move {
            h.check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status()
        }
    };
    let readyz = || async {
        reqwest::get(format!("http://{}/readyz", app.metrics))
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let wait_for = |want: ServingStatus| async move {
        for _ in 0..100 {
            if status("readiness").await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("readiness never became {want:?}");
    };
    assert_eq!(status("readiness").await, ServingStatus::Serving);
    assert_eq!(status("").await, ServingStatus::Serving);
    assert_eq!(readyz().await, 200);

    crate::support::set_database_reachable(&app.db, false).await;
    wait_for(ServingStatus::NotServing).await;
    assert_eq!(status("").await, ServingStatus::NotServing);
    assert_eq!(status("liveness").await, ServingStatus::Serving);
    assert_eq!(readyz().await, 503);
    let healthz = reqwest::get(format!("http://{}/healthz", app.metrics))
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200, "still live");
    // Calls fail fast and retryably meanwhile.
    let started = std::time::Instant::now();
    let e = app
        .credit()
        .await
        .check_balance(pb::CheckBalanceRequest {
            account_id: "a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10));

    crate::support::set_database_reachable(&app.db, true).await;
    wait_for(ServingStatus::Serving).await;
    assert_eq!(readyz().await, 200);
    app.fund("a", 5).await;
    app.finish().await;
}

crate::on_both_backends!(
    tokens_roles_and_tenants_are_enforced_even_by_hold_id,
    rate_limits_refuse_with_retry_info_and_write_nothing,
    overload_is_shed_fast_and_writes_nothing,
    oversized_requests_are_refused_before_the_database,
    metrics_have_the_documented_names_and_no_account_labels,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_injected_imbalance_is_counted_by_the_reconciliation() {
    the_reconciliation_counts_an_injected_imbalance().await;
}

async fn list_services(app: &TestApp) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(app.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let reply = stream.message().await?.unwrap();
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            Ok(l.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("{other:?}"),
    }
}

/// Reflection lists our services when on, and is not served when turned off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_is_switchable() {
    let on = TestApp::spawn(Backend::Sqlite).await;
    let services = list_services(&on).await.unwrap();
    assert!(
        services.iter().any(|s| s == "tally.v1.CreditService"),
        "{services:?}"
    );
    on.finish().await;
    let off = TestApp::spawn_with(Backend::Sqlite, |s| s.reflection = false).await;
    let e = list_services(&off).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    off.finish().await;
}
