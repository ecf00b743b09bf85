//! Test harness shared by the suites: fresh databases on both backends, an in-process server
//! on a loopback port, and the ledger invariant check.
//!
//! PostgreSQL comes from `DATABASE_URL` (scripts/test starts a throwaway cluster and sets it).
//! Without it the PostgreSQL half fails loudly instead of skipping.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::missing_panics_doc
)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use sqlx::Connection;
use tally::app::{App, Settings};
use tally::domain::plan::Policy;
use tally::ledger::Engine;
use tally::ledger::Limits;
use tally::pb::admin_service_client::AdminServiceClient;
use tally::pb::credit_service_client::CreditServiceClient;
use tally::storage::postgres::PgStore;
use tally::storage::sqlite::SqliteStore;
use tonic::transport::Channel;

/// Which database a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database created for one test. SQLite files live in a temp dir removed on drop;
/// PostgreSQL databases live in the throwaway cluster.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

fn admin_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "the PostgreSQL half of the suite needs DATABASE_URL (a superuser URL of a disposable \
             server). Run `scripts/test`, which starts a throwaway PostgreSQL and sets it."
        )
    })
}

/// Replaces the database name in a PostgreSQL URL.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

impl TestDb {
    /// A database at `url` that the caller owns (nothing is removed on drop).
    pub fn from_url(url: String) -> Self {
        Self { url, _dir: None }
    }

    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("tally.db").display());
                Self {
                    url,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let admin = admin_url();
                let name = format!("tally_test_{}", uuid::Uuid::now_v7().simple());
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .unwrap_or_else(|e| panic!("cannot reach the PostgreSQL of DATABASE_URL: {e}"));
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.unwrap();
                Self {
                    url: with_database(&admin, &name),
                    _dir: None,
                }
            }
        }
    }

    /// Opens and migrates a store on this database (plans grant no allowance).
    pub async fn store(&self) -> Engine {
        self.store_with(Policy::default()).await
    }

    /// Opens and migrates a store whose plans grant the allowances of `policy`.
    pub async fn store_with(&self, policy: Policy) -> Engine {
        tally::app::open_store(&self.url, 32, Arc::new(policy))
            .await
            .unwrap()
    }

    /// A typed SQLite store (for SQL-level checks).
    pub async fn sqlite(&self) -> SqliteStore {
        let s = SqliteStore::connect(&self.url, 4, Arc::default())
            .await
            .unwrap();
        s.migrate().await.unwrap();
        s
    }

    /// A typed PostgreSQL store (for SQL-level checks).
    pub async fn postgres(&self) -> PgStore {
        let s = PgStore::connect(&self.url, 4, Arc::default())
            .await
            .unwrap();
        s.migrate().await.unwrap();
        s
    }
}

/// Every hold of `account` (any state, newest first).
pub async fn holds_of(store: &Engine, account: &str) -> Vec<tally::domain::Hold> {
    store
        .list_holds(&tally::storage::HoldQuery {
            account_id: tally::domain::AccountId::parse("account", account).unwrap(),
            states: vec![],
            before: None,
            limit: 100_000,
        })
        .await
        .unwrap()
}

/// Makes this test's PostgreSQL database refuse (`false`: and drops its connections) or accept
/// connections again: the database "goes down" for this app only, not for other tests.
pub async fn set_database_reachable(db: &TestDb, reachable: bool) {
    let name = db
        .url
        .rsplit('/')
        .next()
        .and_then(|n| n.split('?').next())
        .unwrap()
        .to_owned();
    let mut admin = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS {reachable}"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    if !reachable {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )))
        .execute(&mut admin)
        .await
        .unwrap();
    }
    admin.close().await.unwrap();
}

/// Fails the test if any account's entries, balance columns and open holds disagree.
pub async fn assert_ledger_balances(store: &Engine) {
    let violations = store.audit().await.unwrap();
    assert!(
        violations.is_empty(),
        "ledger invariant violated: {violations:#?}"
    );
}

pub fn limits() -> Limits {
    Limits {
        hold_ttl_default: TimeDelta::minutes(10),
        hold_ttl_max: TimeDelta::hours(24),
    }
}

/// A server running in this process on a loopback port.
pub struct TestApp {
    pub addr: SocketAddr,
    pub http: SocketAddr,
    pub metrics: SocketAddr,
    pub db: TestDb,
    pub store: Engine,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

/// The webhook secrets every test server accepts (the current one and the one being rotated out).
pub const WEBHOOK_SECRET: &str = "whsec_test_current";
pub const WEBHOOK_SECRET_OLD: &str = "whsec_test_previous";

/// The built-in catalog with the allowances taken out, so balances in tests are exactly what
/// the tests grant. Tests of allowances use the built-in catalog as it is.
pub fn catalog_without_allowances() -> tally::catalog::Catalog {
    let mut c = tally::catalog::Catalog::builtin().unwrap();
    for p in c.plans.values_mut() {
        p.allowance = None;
    }
    c
}

/// No rate limits (tests of limits set their own).
pub const UNLIMITED: tally::auth::RateLimits = tally::auth::RateLimits {
    normal: tally::auth::Rate {
        per_second: 0,
        burst: 0,
    },
    sensitive: tally::auth::Rate {
        per_second: 0,
        burst: 0,
    },
};

/// A caller for [`callers`]: name, roles, account prefixes, token, extra TOML lines.
pub struct TestCaller<'a> {
    pub name: &'a str,
    pub roles: &'a [&'a str],
    pub prefixes: &'a [&'a str],
    pub token: &'a str,
    pub extra: &'a str,
}

/// Authentication from a callers file made of `list` (tokens hashed as in production).
pub fn callers(list: &[TestCaller<'_>], limits: tally::auth::RateLimits) -> Arc<tally::auth::Auth> {
    let mut toml = String::new();
    for c in list {
        let _ = writeln!(
            toml,
            "[callers.{}]\nroles = {:?}\naccount_prefixes = {:?}\ntoken_sha256 = [{:?}]\n{}",
            c.name,
            c.roles,
            c.prefixes,
            tally::auth::hash_token(c.token),
            c.extra
        );
    }
    Arc::new(tally::auth::Auth::Tokens(
        tally::auth::Callers::parse(&toml, limits).unwrap(),
    ))
}

pub fn settings(db: &TestDb) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: db.url.clone(),
        db_max_connections: 16,
        db_group: tally::storage::batch::Batching::default(),
        limits: limits(),
        idempotency_retention: TimeDelta::hours(24),
        sweep_interval: Duration::from_millis(50),
        request_timeout: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(5),
        catalog: Arc::new(catalog_without_allowances()),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        webhook_secrets: vec![
            tally::stripe::WebhookSecret::new(WEBHOOK_SECRET),
            tally::stripe::WebhookSecret::new(WEBHOOK_SECRET_OLD),
        ],
        stripe_livemode: false,
        stripe: None,
        auth: Arc::new(tally::auth::Auth::Open(Arc::new(
            tally::auth::Principal::open(UNLIMITED),
        ))),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        reflection: true,
        grpc_web_origins: Vec::new(),
        max_concurrent_requests: 512,
        overload_latency_target: Some(std::time::Duration::ZERO),
        audit_interval: Duration::ZERO,
        readiness_interval: Duration::from_millis(100),
        auto_migrate: true,
        tls: None,
        events: tally::app::EventSettings::default(),
        watch: tally::app::WatchSettings::default(),
        admin: None,
    }
}

impl TestApp {
    /// Starts a server on a fresh database.
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_on(TestDb::new(backend).await).await
    }

    /// Starts a server whose settings `edit` adjusts first.
    pub async fn spawn_with(backend: Backend, edit: impl FnOnce(&mut Settings)) -> Self {
        let db = TestDb::new(backend).await;
        let mut s = settings(&db);
        edit(&mut s);
        Self::start(db, s).await
    }

    /// Starts a server with the built-in catalog as it is (allowances included).
    pub async fn spawn_with_builtin_catalog(backend: Backend) -> Self {
        let db = TestDb::new(backend).await;
        let mut s = settings(&db);
        s.catalog = Arc::new(tally::catalog::Catalog::builtin().unwrap());
        Self::start(db, s).await
    }

    /// Starts a server on an existing database with settings `edit` adjusts (a restart with
    /// a changed configuration).
    pub async fn spawn_on_with(db: TestDb, edit: impl FnOnce(&mut Settings)) -> Self {
        let mut s = settings(&db);
        edit(&mut s);
        Self::start(db, s).await
    }

    /// Starts a server on an existing database (a "restart").
    pub async fn spawn_on(db: TestDb) -> Self {
        let s = settings(&db);
        Self::start(db, s).await
    }

    async fn start(db: TestDb, settings: Settings) -> Self {
        let app = App::build(settings).await.unwrap();
        let addr = app.local_addr().unwrap();
        let http = app.http_addr().unwrap();
        let metrics = app.metrics_addr().unwrap();
        let store = app.ledger().engine().clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(async move {
            app.run_until_stopped(async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            http,
            metrics,
            db,
            store,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// Signs `body` with `secret` at `t` and posts it to the webhook endpoint.
    pub async fn post_webhook_signed(&self, body: &[u8], header: &str) -> (u16, serde_json::Value) {
        let resp = reqwest::Client::new()
            .post(format!("http://{}/stripe/webhook", self.http))
            .header("stripe-signature", header)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let json = resp.json().await.unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    /// Posts `body` signed now with the current test secret.
    pub async fn post_webhook(&self, body: &[u8]) -> (u16, serde_json::Value) {
        let t = chrono::Utc::now().timestamp();
        let v1 = tally::stripe::signature::sign(
            body,
            &tally::stripe::WebhookSecret::new(WEBHOOK_SECRET),
            t,
        );
        self.post_webhook_signed(body, &format!("t={t},v1={v1}"))
            .await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn credit(&self) -> CreditServiceClient<Channel> {
        CreditServiceClient::new(self.channel().await)
    }

    /// Grants `amount` credits to `account` (creating it), as an operator would.
    pub async fn fund(&self, account: &str, amount: i64) {
        self.admin()
            .await
            .grant(tally::pb::GrantRequest {
                account_id: account.into(),
                amount,
                reason: "test funding".into(),
                idempotency_key: format!("fund-{}", uuid::Uuid::now_v7().simple()),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// The account's balance (CheckBalance; the open caller).
    pub async fn check_balance(&self, account: &str) -> tally::pb::CheckBalanceResponse {
        self.credit()
            .await
            .check_balance(tally::pb::CheckBalanceRequest {
                account_id: account.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel().await)
    }

    /// Checks the ledger invariants, stops the server and returns its database.
    pub async fn finish(mut self) -> TestDb {
        assert_ledger_balances(&self.store).await;
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap();
        }
        self.db
    }
}

/// Expands test bodies `async fn name(backend: Backend)` into one test per backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::support::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::support::Backend::Postgres).await;
                }
            )*
        }
    };
}
