//! Live balances: `CreditService.WatchBalance` and `GET /v1/accounts/{id}/balance/stream`.
//! Every committed change reaches the watchers, through any replica, with strictly rising
//! versions; a lost listening connection heals; slow readers cost no memory per missed change;
//! auth, tenant prefixes and caps hold on both transports.

use std::time::{Duration, Instant};

use tally::pb;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::support::{Backend, TestApp, TestCaller, TestDb, UNLIMITED, callers};
use crate::{expect_error, grant_req, key, reserve_req, with};

fn watch_req(account: &str, after: Option<i64>) -> pb::WatchBalanceRequest {
    pb::WatchBalanceRequest {
        account_id: account.into(),
        after_version: after,
    }
}

async fn open(app: &TestApp, account: &str) -> Streaming<pb::WatchBalanceResponse> {
    app.credit()
        .await
        .watch_balance(watch_req(account, None))
        .await
        .unwrap()
        .into_inner()
}

/// The next message, within `wait`.
async fn next_within(
    s: &mut Streaming<pb::WatchBalanceResponse>,
    wait: Duration,
) -> Option<pb::WatchBalanceResponse> {
    match tokio::time::timeout(wait, s.message()).await {
        Ok(r) => Some(
            r.unwrap_or_else(|e| panic!("the stream failed: {e:?}"))
                .expect("the stream ended"),
        ),
        Err(_) => None,
    }
}

async fn next(s: &mut Streaming<pb::WatchBalanceResponse>) -> pb::WatchBalanceResponse {
    next_within(s, Duration::from_secs(5))
        .await
        .expect("a message within 5 s")
}

/// Reads until a message shows `available`, checking that versions strictly rise.
async fn until_available(
    s: &mut Streaming<pb::WatchBalanceResponse>,
    last: &mut i64,
    available: i64,
    wait: Duration,
) -> pb::WatchBalanceResponse {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = next_within(s, left)
            .await
            .unwrap_or_else(|| panic!("no message with available = {available} within {wait:?}"));
        assert!(m.version > *last, "version {} after {}", m.version, last);
        *last = m.version;
        if m.balance.as_ref().unwrap().available == available {
            return m;
        }
    }
}

/// Every kind of change reaches the stream, each message equal to CheckBalance then, with
/// strictly rising versions; a reconnect with `after_version` gets nothing it already has.
async fn every_change_reaches_the_stream(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut credit, mut admin) = (app.credit().await, app.admin().await);
    let err = credit
        .watch_balance(watch_req("nobody", None))
        .await
        .unwrap_err();
    expect_error(&err, Code::NotFound, "ACCOUNT_NOT_FOUND");
    let err = credit
        .watch_balance(watch_req("bad id!", Some(-1)))
        .await
        .unwrap_err();
    expect_error(&err, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert!(err.message().contains("after_version"), "{err:?}");

    app.fund("w1", 1_000).await;
    let mut s = open(&app, "w1").await;
    let first = next(&mut s).await;
    assert_eq!(
        first.balance.clone().unwrap(),
        app.check_balance("w1").await
    );
    let mut last = first.version;

    let hold = credit
        .reserve(reserve_req("w1", 100, &key()))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    let m = until_available(&mut s, &mut last, 900, Duration::from_secs(5)).await;
    assert_eq!(m.balance.as_ref().unwrap().held, 100);
    assert_eq!(m.balance.clone().unwrap(), app.check_balance("w1").await);
    credit
        .commit(pb::CommitRequest {
            hold_id: hold.hold_id.clone(),
            amount: 60,
            idempotency_key: key(),
        })
        .await
        .unwrap();
    until_available(&mut s, &mut last, 940, Duration::from_secs(5)).await;
    credit
        .refund(pb::RefundRequest {
            hold_id: hold.hold_id,
            amount: Some(20),
            idempotency_key: key(),
            ..Default::default()
        })
        .await
        .unwrap();
    until_available(&mut s, &mut last, 960, Duration::from_secs(5)).await;
    admin.grant(grant_req("w1", 40, &key())).await.unwrap();
    until_available(&mut s, &mut last, 1_000, Duration::from_secs(5)).await;
    admin
        .adjust(pb::AdjustRequest {
            account_id: "w1".into(),
            delta: -10,
            reason: "test".into(),
            operator: "ops@example.com".into(),
            idempotency_key: key(),
        })
        .await
        .unwrap();
    until_available(&mut s, &mut last, 990, Duration::from_secs(5)).await;
    admin
        .set_plan(pb::SetPlanRequest {
            account_id: "w1".into(),
            plan: "pro".into(),
            idempotency_key: key(),
        })
        .await
        .unwrap();
    let m = next(&mut s).await;
    assert!(m.version > last);
    last = m.version;
    assert_eq!(m.balance.as_ref().unwrap().plan, "pro");
    // Expiry: the sweeper (50 ms in tests) releases a 1 s hold; nobody calls anything.
    let mut short = reserve_req("w1", 90, &key());
    short.ttl = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    credit.reserve(short).await.unwrap();
    until_available(&mut s, &mut last, 900, Duration::from_secs(5)).await;
    let m = until_available(&mut s, &mut last, 990, Duration::from_secs(5)).await;
    assert_eq!(m.balance.as_ref().unwrap().held, 0);

    // A reconnect that has the newest version gets nothing until the next change; one that
    // has an older one gets the state at once.
    let mut again = credit
        .watch_balance(watch_req("w1", Some(last)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        next_within(&mut again, Duration::from_millis(300))
            .await
            .is_none()
    );
    let mut behind = credit
        .watch_balance(watch_req("w1", Some(first.version)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut behind).await.version, last);
    admin.grant(grant_req("w1", 1, &key())).await.unwrap();
    let m = next(&mut again).await;
    assert!(m.version > last);
    assert_eq!(m.balance.unwrap().available, 991);
    drop((s, again, behind));
    app.finish().await;
}

/// Streams over a cap are refused with RESOURCE_EXHAUSTED and open nothing; a closed stream
/// frees its place. A stopping server ends its streams with UNAVAILABLE (SHUTTING_DOWN).
async fn caps_and_shutdown(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.watch.limits.max_streams = 3;
        s.watch.limits.max_streams_per_caller = 2;
        s.auth = callers(
            &[
                TestCaller {
                    name: "a",
                    roles: &["generation"],
                    prefixes: &[],
                    token: "tok-a",
                    extra: "",
                },
                TestCaller {
                    name: "b",
                    roles: &["generation", "admin"],
                    prefixes: &[],
                    token: "tok-b",
                    extra: "",
                },
            ],
            UNLIMITED,
        );
    })
    .await;
    let ch = app.channel().await;
    let mut credit = pb::credit_service_client::CreditServiceClient::new(ch.clone());
    let mut admin = pb::admin_service_client::AdminServiceClient::new(ch);
    admin
        .grant(with(grant_req("c1", 10, &key()), "tok-b"))
        .await
        .unwrap();
    let open_as = |token: &'static str| {
        let mut credit = credit.clone();
        async move {
            credit
                .watch_balance(with(watch_req("c1", None), token))
                .await
        }
    };
    let a1 = open_as("tok-a").await.unwrap().into_inner();
    let a2 = open_as("tok-a").await.unwrap().into_inner();
    let e = open_as("tok-a").await.unwrap_err();
    expect_error(&e, Code::ResourceExhausted, "TOO_MANY_STREAMS");
    assert!(e.message().contains("this caller"), "{e:?}");
    let mut b1 = open_as("tok-b").await.unwrap().into_inner();
    let e = open_as("tok-b").await.unwrap_err();
    expect_error(&e, Code::ResourceExhausted, "TOO_MANY_STREAMS");
    assert!(e.message().contains("this server"), "{e:?}");
    drop(a1);
    // The place is freed when the server sees the stream gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut a3 = loop {
        match open_as("tok-a").await {
            Ok(s) => break s.into_inner(),
            Err(e) if Instant::now() < deadline => {
                expect_error(&e, Code::ResourceExhausted, "TOO_MANY_STREAMS");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the closed stream's place was not freed: {e:?}"),
        }
    };
    next(&mut b1).await;
    next(&mut a3).await;
    credit
        .check_balance(with(
            pb::CheckBalanceRequest {
                account_id: "c1".into(),
            },
            "tok-a",
        ))
        .await
        .unwrap();
    drop(a2);
    let mut credit2 = credit.clone();
    let db = app.finish().await;
    for mut s in [b1, a3] {
        let end = tokio::time::timeout(Duration::from_secs(5), s.message())
            .await
            .expect("the stream ends at shutdown");
        match end {
            Err(status) => expect_error(&status, Code::Unavailable, "SHUTTING_DOWN"),
            other => panic!("expected UNAVAILABLE, got {other:?}"),
        }
    }
    assert!(
        credit2
            .watch_balance(with(watch_req("c1", None), "tok-a"))
            .await
            .is_err()
    );
    drop(db);
}

const SHOP: &str = "tok-shop";
const VIDEO: &str = "tok-video";

async fn tenants(backend: Backend) -> TestApp {
    TestApp::spawn_with(backend, |s| {
        s.watch.heartbeat = Duration::from_millis(200);
        s.auth = callers(
            &[
                TestCaller {
                    name: "shop",
                    roles: &["billing"],
                    prefixes: &["shop:"],
                    token: SHOP,
                    extra: "",
                },
                TestCaller {
                    name: "video",
                    roles: &["generation"],
                    prefixes: &["video:"],
                    token: VIDEO,
                    extra: "",
                },
                TestCaller {
                    name: "ops",
                    roles: &["admin", "generation"],
                    prefixes: &[],
                    token: "tok-ops",
                    extra: "",
                },
            ],
            UNLIMITED,
        );
    })
    .await
}

/// An SSE response being read: events (`event`, `id`, `data`) and heartbeat comments.
struct Sse {
    resp: reqwest::Response,
    buf: String,
    comments: usize,
}

#[derive(Debug)]
struct SseEvent {
    event: String,
    id: Option<i64>,
    data: serde_json::Value,
}

impl Sse {
    async fn open(
        app: &TestApp,
        account: &str,
        token: Option<&str>,
        last: Option<&str>,
    ) -> reqwest::Response {
        let mut req = reqwest::Client::new().get(format!(
            "http://{}/v1/accounts/{account}/balance/stream",
            app.http
        ));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(l) = last {
            req = req.header("last-event-id", l);
        }
        req.send().await.unwrap()
    }

    fn new(resp: reqwest::Response) -> Self {
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            resp,
            buf: String::new(),
            comments: 0,
        }
    }

    /// The next event within `wait` (heartbeats are counted, not returned).
    async fn event_within(&mut self, wait: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + wait;
        loop {
            while let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                let (mut event, mut id, mut data) = (String::new(), None, String::new());
                for line in block.lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        v.clone_into(&mut event);
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if !event.is_empty() {
                    return Some(SseEvent {
                        event,
                        id,
                        data: serde_json::from_str(&data).unwrap(),
                    });
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.resp.chunk()).await {
                Ok(Ok(Some(c))) => self.buf.push_str(std::str::from_utf8(&c).unwrap()),
                Ok(Err(e)) => panic!("{e}"),
                Ok(Ok(None)) | Err(_) => return None,
            }
        }
    }
}

/// gRPC and SSE both check the caller, its role and its prefixes before anything is read;
/// SSE resumes from `Last-Event-ID` and sends heartbeats.
async fn auth_tenants_and_sse_resume(backend: Backend) {
    let app = tenants(backend).await;
    let ch = app.channel().await;
    let mut credit = pb::credit_service_client::CreditServiceClient::new(ch.clone());
    let mut admin = pb::admin_service_client::AdminServiceClient::new(ch);
    for a in ["shop:1", "video:1"] {
        admin
            .grant(with(grant_req(a, 100, &key()), "tok-ops"))
            .await
            .unwrap();
    }
    // gRPC: no token, another tenant's account, a role without CreditService.
    let e = credit
        .watch_balance(watch_req("video:1", None))
        .await
        .unwrap_err();
    expect_error(&e, Code::Unauthenticated, "UNAUTHENTICATED");
    let e = credit
        .watch_balance(with(watch_req("shop:1", None), VIDEO))
        .await
        .unwrap_err();
    expect_error(&e, Code::PermissionDenied, "PERMISSION_DENIED");
    let e = credit
        .watch_balance(with(watch_req("shop:1", None), SHOP))
        .await
        .unwrap_err();
    expect_error(&e, Code::PermissionDenied, "PERMISSION_DENIED");
    let mut s = credit
        .watch_balance(with(watch_req("video:1", None), VIDEO))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut s).await.balance.unwrap().available, 100);

    // SSE: the same refusals as HTTP statuses.
    for (account, token, status) in [
        ("shop:1", None, 401),
        ("shop:1", Some(VIDEO), 403),
        ("video:1", Some(SHOP), 403),
        ("shop:nobody", Some(SHOP), 404),
        ("shop:bad id", Some(SHOP), 400),
    ] {
        let r = Sse::open(&app, account, token, None).await;
        assert_eq!(r.status().as_u16(), status, "{account} {token:?}");
    }
    let r = Sse::open(&app, "shop:1", Some(SHOP), Some("abc")).await;
    assert_eq!(r.status().as_u16(), 400);

    let mut sse = Sse::new(Sse::open(&app, "shop:1", Some(SHOP), None).await);
    let first = sse.event_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.event, "balance");
    assert_eq!(first.data["available"], 100);
    assert_eq!(first.data["account_id"], "shop:1");
    let v0 = first.id.unwrap();
    assert_eq!(first.data["version"], v0);
    admin
        .grant(with(grant_req("shop:1", 5, &key()), "tok-ops"))
        .await
        .unwrap();
    let e = sse.event_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.data["available"], 105);
    let v1 = e.id.unwrap();
    assert!(v1 > v0);
    drop(sse);

    // Resume with the newest id: heartbeats only, until the next change.
    let mut sse = Sse::new(Sse::open(&app, "shop:1", Some(SHOP), Some(&v1.to_string())).await);
    assert!(sse.event_within(Duration::from_millis(700)).await.is_none());
    assert!(sse.comments >= 2, "heartbeats: {}", sse.comments);
    admin
        .grant(with(grant_req("shop:1", 5, &key()), "tok-ops"))
        .await
        .unwrap();
    let e = sse.event_within(Duration::from_secs(5)).await.unwrap();
    assert!(e.id.unwrap() > v1);
    assert_eq!(e.data["available"], 110);
    // Resume with an older id: the current state at once.
    let mut behind = Sse::new(Sse::open(&app, "shop:1", Some(SHOP), Some(&v0.to_string())).await);
    let e = behind.event_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.data["available"], 110);
    // A stopping server ends the stream with `event: shutdown`, then the end of the body.
    drop((s, sse));
    app.finish().await;
    let last = behind.event_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!(last.event, "shutdown");
    assert_eq!(last.data["reason"], "SHUTTING_DOWN");
    assert!(behind.event_within(Duration::from_secs(5)).await.is_none());
}

crate::on_both_backends!(
    every_change_reaches_the_stream,
    caps_and_shutdown,
    auth_tenants_and_sse_resume
);

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// Two replicas on one PostgreSQL: a watcher on B sees every change made through A, each
/// message the state right after it (versions strictly rising), commit → receipt p99 under
/// 100 ms over 1,000 changes. Then 20 rounds from nothing (a new account, watched on B as
/// soon as it exists) and 20 on a warm account, reserves through A and commits through B.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_through_one_replica_reaches_watchers_on_another() {
    let a = TestApp::spawn(Backend::Postgres).await;
    let b = TestApp::spawn_on(TestDb::from_url(a.db.url.clone())).await;
    let (mut credit_a, mut admin_a) = (a.credit().await, a.admin().await);
    let mut credit_b = b.credit().await;
    a.fund("hot", 1_000_000).await;
    let mut s = open(&b, "hot").await;
    let mut last = next(&mut s).await.version;
    let mut lags = Vec::with_capacity(1_000);
    for i in 0..1_000 {
        let r = if i % 2 == 0 {
            credit_a
                .reserve(reserve_req("hot", 1, &key()))
                .await
                .unwrap()
                .into_inner()
                .available
        } else {
            admin_a
                .grant(grant_req("hot", 3, &key()))
                .await
                .unwrap()
                .into_inner()
                .available
        };
        let committed = Instant::now();
        until_available(&mut s, &mut last, r, Duration::from_secs(2)).await;
        lags.push(committed.elapsed());
    }
    lags.sort();
    let (p50, p99) = (percentile(&lags, 50), percentile(&lags, 99));
    eprintln!(
        "replica A commit -> replica B receipt over 1000 changes: p50 {p50:?}, p99 {p99:?}, max {:?}",
        lags[lags.len() - 1]
    );
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?}");

    for round in 0..20 {
        for account in [format!("cold-{round}"), "warm".to_owned()] {
            if account == "warm" && round > 0 {
                // warm: the account and its watchers exist from round 0 on.
            } else {
                admin_a
                    .grant(grant_req(&account, 100, &key()))
                    .await
                    .unwrap();
            }
            let mut w = open(&b, &account).await;
            let mut last = next(&mut w).await.version;
            let start = b.check_balance(&account).await.available;
            let hold = credit_a
                .reserve(reserve_req(&account, 10, &key()))
                .await
                .unwrap()
                .into_inner()
                .hold
                .unwrap();
            until_available(&mut w, &mut last, start - 10, Duration::from_secs(2)).await;
            credit_b
                .commit(pb::CommitRequest {
                    hold_id: hold.hold_id,
                    amount: 4,
                    idempotency_key: key(),
                })
                .await
                .unwrap();
            let m = until_available(&mut w, &mut last, start - 4, Duration::from_secs(2)).await;
            assert_eq!(m.balance.unwrap(), a.check_balance(&account).await);
        }
    }
    drop(s);
    b.finish().await;
    a.finish().await;
}

/// The listening connection is terminated in PostgreSQL mid-stream and a change is made at
/// once (its notification goes nowhere): the watcher still converges within 2 s, because
/// the listener reconnects and re-reads every watched account. 10 rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_listening_connection_loses_no_update() {
    let a = TestApp::spawn(Backend::Postgres).await;
    let b = TestApp::spawn_on(TestDb::from_url(a.db.url.clone())).await;
    let mut admin_a = a.admin().await;
    a.fund("k1", 1_000).await;
    let mut s = open(&b, "k1").await;
    let mut last = next(&mut s).await.version;
    let pool = sqlx::PgPool::connect(&a.db.url).await.unwrap();
    let listeners = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tally-listen'
               AND datname = current_database()",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while listeners().await < 2 {
        assert!(Instant::now() < deadline, "both replicas listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut available = 1_000;
    for round in 0..10 {
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = 'tally-listen' AND datname = current_database()",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(killed.len(), 2, "round {round}");
        available += 7;
        admin_a.grant(grant_req("k1", 7, &key())).await.unwrap();
        let t = Instant::now();
        until_available(&mut s, &mut last, available, Duration::from_secs(2)).await;
        eprintln!(
            "round {round}: converged {:?} after the change",
            t.elapsed()
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while listeners().await < 2 {
            assert!(Instant::now() < deadline, "the listeners came back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(b.check_balance("k1").await.available, available);
    drop(s);
    pool.close().await;
    b.finish().await;
    a.finish().await;
}

/// Jobs on `accounts` by 4 writers for `how_long`, each a Reserve and its Commit (two
/// changes); returns how many changes were made.
async fn write_for(ch: &Channel, accounts: &[String], how_long: Duration) -> u64 {
    let stop_at = Instant::now() + how_long;
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let ch = ch.clone();
        let accounts = accounts.to_vec();
        writers.spawn(async move {
            let mut credit = pb::credit_service_client::CreditServiceClient::new(ch);
            let mut n = 0usize;
            while Instant::now() < stop_at {
                let a = &accounts[(n + w) % accounts.len()];
                let hold = credit
                    .reserve(reserve_req(a, 2, &key()))
                    .await
                    .unwrap()
                    .into_inner()
                    .hold
                    .unwrap();
                credit
                    .commit(pb::CommitRequest {
                        hold_id: hold.hold_id,
                        amount: 1,
                        idempotency_key: key(),
                    })
                    .await
                    .unwrap();
                n += 2;
            }
            n
        });
    }
    let mut changes = 0u64;
    while let Some(n) = writers.join_next().await {
        changes += n.unwrap() as u64;
    }
    changes
}

/// Resident memory of a process (kB).
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 1,000 watchers (2 accounts, 500 each, over 16 connections) on one `tally serve` process:
/// the server's memory per watcher is measured and bounded. Then none of them reads for 30 s
/// while the accounts change thousands of times: the server's memory does not grow with the
/// messages they missed, and when they read again each gets the newest state at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_slow_watchers_cost_bounded_memory() {
    const WATCHERS: usize = 1_000;
    const ACCOUNTS: usize = 2;
    let db = TestDb::new(Backend::Postgres).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--database-url", &db.url])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--admin-rate-limit-rps", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let connect = || async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // A 1 KiB window per stream (tonic's default is 2 MiB), as the README advises for
            // watch connections: a stream nobody reads holds a dozen messages in flight, not
            // thousands (h2 ≥ 0.4.20 closes a connection whose unread small DATA frames pass
            // half of its connection window: GOAWAY ENHANCE_YOUR_CALM, too_many_data_frames).
            match Channel::from_shared(url.clone())
                .unwrap()
                .initial_stream_window_size(1024)
                .initial_connection_window_size(1024 * 1024)
                .connect()
                .await
            {
                Ok(c) => return c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "the server did not start: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    // Watchers on 16 connections of their own: HTTP/2 flow control is per connection, and
    // streams nobody reads fill theirs.
    let mut channels = Vec::new();
    for _ in 0..16 {
        channels.push(connect().await);
    }
    let work = connect().await;
    let mut admin = pb::admin_service_client::AdminServiceClient::new(work.clone());
    let accounts: Vec<String> = (0..ACCOUNTS).map(|i| format!("m{i}")).collect();
    for a in &accounts {
        admin
            .grant(grant_req(a, 100_000_000, &key()))
            .await
            .unwrap();
    }
    // The same work for 10 s first, watched by nobody: the server's own working set (pools,
    // caches, the allocator's) grows to its size under this load before anything is measured.
    let warm = write_for(&work, &accounts, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kb(pid);
    eprintln!("warm-up: {warm} changes in 10 s, server RSS {before} kB");
    let mut streams = Vec::with_capacity(WATCHERS);
    for i in 0..WATCHERS {
        let mut c = pb::credit_service_client::CreditServiceClient::new(channels[i % 16].clone());
        let mut s = c
            .watch_balance(watch_req(&accounts[i % ACCOUNTS], None))
            .await
            .unwrap()
            .into_inner();
        next(&mut s).await;
        streams.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let open = rss_kb(pid);
    let per_watcher = (open.saturating_sub(before)) * 1024 / WATCHERS as u64;
    eprintln!(
        "server RSS: {before} kB idle, {open} kB with {WATCHERS} watchers ({per_watcher} bytes each)"
    );
    assert!(per_watcher < 64 * 1024, "{per_watcher} bytes per watcher");

    // 30 s of changes nobody reads: 4 writers, jobs.
    let changes = write_for(&work, &accounts, Duration::from_secs(30)).await;
    let after = rss_kb(pid);
    let missed = changes * (WATCHERS / ACCOUNTS) as u64;
    eprintln!(
        "{changes} changes in 30 s ({missed} messages the watchers missed): server RSS {open} kB -> {after} kB"
    );
    assert!(changes > 1_000, "only {changes} changes");
    // A queue per watcher would hold every missed message (tens of bytes each, encoded, and
    // more as structs); the server grows by less than 16 MiB, and by less than 2 bytes per
    // missed message.
    assert!(
        after.saturating_sub(open) < 16 * 1024 && after.saturating_sub(open) * 1024 < missed * 2,
        "the server grew by {} kB while {missed} messages were missed",
        after.saturating_sub(open)
    );

    // They read again: each reaches its account's newest version within seconds, after at
    // most what the connection's flow-control window held.
    let mut credit = pb::credit_service_client::CreditServiceClient::new(work.clone());
    let mut newest = Vec::new();
    for a in &accounts {
        newest.push(
            credit
                .watch_balance(watch_req(a, None))
                .await
                .unwrap()
                .into_inner()
                .message()
                .await
                .unwrap()
                .unwrap()
                .version,
        );
    }
    let mut most = 0;
    let mut set = tokio::task::JoinSet::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        let want = newest[i % ACCOUNTS];
        set.spawn(async move {
            let mut got = 0usize;
            loop {
                let m = next(&mut s).await;
                got += 1;
                if m.version >= want {
                    return got;
                }
            }
        });
    }
    while let Some(n) = set.join_next().await {
        most = most.max(n.unwrap());
    }
    eprintln!(
        "after 30 s unread, a watcher read at most {most} messages to reach the newest state"
    );
    assert!(
        (most as u64) < changes / ACCOUNTS as u64,
        "{most} messages: a queue"
    );
    child.kill().await.unwrap();
}

async fn json_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> serde_json::Value {
    let l = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("a line within 10 s")
        .unwrap()
        .expect("tally watch ended");
    serde_json::from_str(&l).unwrap()
}

/// `tally watch ACCOUNT --json`: a line now, a line per change, for longer than the CLI's
/// per-call `--timeout` (a stream is not a call with a deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_watch_prints_a_line_per_change() {
    use tokio::io::AsyncBufReadExt as _;
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.fund("cli", 50).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["watch", "cli", "--json", "--timeout", "1s"])
        .env("TALLY_SERVER", app.url())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = json_line(&mut lines).await;
    assert_eq!(first["available"], 50);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    app.credit()
        .await
        .reserve(reserve_req("cli", 20, &key()))
        .await
        .unwrap();
    let next = json_line(&mut lines).await;
    assert_eq!(
        (next["available"].as_i64(), next["held"].as_i64()),
        (Some(30), Some(20))
    );
    assert!(next["version"].as_i64() > first["version"].as_i64());
    child.kill().await.unwrap();
    app.finish().await;
}

/// The database goes away for 3 s under 20 open streams (10 accounts) and comes back: the
/// streams stay open, nothing is sent that did not happen, and a change made after the outage
/// reaches every one of them (the listener reconnects, every watched account is read again,
/// failed reads back off instead of hammering the pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_outlive_a_database_outage() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let accounts: Vec<String> = (0..10).map(|i| format!("o{i}")).collect();
    let mut streams = Vec::new();
    for a in &accounts {
        app.fund(a, 100).await;
        for _ in 0..2 {
            let mut s = open(&app, a).await;
            let v = next(&mut s).await.version;
            streams.push((a.clone(), s, v));
        }
    }
    crate::support::set_database_reachable(&app.db, false).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    crate::support::set_database_reachable(&app.db, true).await;
    let mut admin = app.admin().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    for a in &accounts {
        loop {
            match admin.grant(grant_req(a, 5, &key())).await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the database did not come back: {e:?}"),
            }
        }
    }
    for (a, mut s, mut last) in streams {
        let m = until_available(&mut s, &mut last, 105, Duration::from_secs(15)).await;
        assert_eq!(m.balance.unwrap().account_id, a);
    }
    app.finish().await;
}
