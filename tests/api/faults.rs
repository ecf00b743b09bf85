//! The fault campaign: `kill -9` of a real server under load (clients retry with their keys),
//! PostgreSQL stopped and started under load, and clients cancelling Reserves at random
//! points. Afterwards every acknowledged operation exists exactly once and the ledger audit
//! passes. Bounded in count and time, loopback only; stops only what it started.

#![allow(clippy::cast_possible_truncation)] // random test timings
#![allow(clippy::print_stdout)] // the campaign's numbers, shown with --no-capture

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally::client::{Client, Config};
use tally::pb;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{Backend, TestApp, TestDb, assert_ledger_balances};
use crate::{grant_req, reserve_req};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_server(port: u16, url: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--database-url", url, "--sweep-interval", "100ms"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn wait_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(ch) = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
        {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            if let Ok(r) = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "readiness".into(),
                })
                .await
                && r.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the server did not become ready");
}

/// What the clients saw acknowledged.
#[derive(Default)]
struct Acked {
    /// reserve key → hold id
    reserves: HashMap<String, String>,
    /// hold ids whose commit was acknowledged, with the amount
    commits: HashMap<String, i64>,
}

async fn crash_campaign(backend: Backend) {
    let db = TestDb::new(backend).await;
    let port = free_port();
    let mut server = spawn_server(port, &db.url);
    wait_ready(port).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_lazy();
    let mut admin = pb::admin_service_client::AdminServiceClient::new(channel.clone());
    for a in 0..4 {
        admin
            .grant(grant_req(&format!("acct-{a}"), 1_000_000, &format!("g{a}")))
            .await
            .unwrap();
    }
    let client = Client::new(
        channel,
        None,
        Config {
            deadline: Duration::from_mins(1),
            attempts: 10_000,
            max_backoff: Duration::from_millis(100),
            ..Config::default()
        },
    )
    .unwrap();
    let acked = Arc::new(Mutex::new(Acked::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = JoinSet::new();
    for w in 0..6 {
        let (client, acked, stop) = (client.clone(), Arc::clone(&acked), Arc::clone(&stop));
        load.spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let key = format!("w{w}-r{i}");
                let r = client
                    .reserve_request(pb::ReserveRequest {
                        account_id: format!("acct-{}", i % 4),
                        cost: Some(pb::reserve_request::Cost::Amount(3)),
                        idempotency_key: key.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("reserve {key}: {e}"));
                let hold = r.hold.unwrap().hold_id;
                acked
                    .lock()
                    .unwrap()
                    .reserves
                    .insert(key.clone(), hold.clone());
                if i % 3 != 0 {
                    client
                        .commit(&hold, 2, &format!("{key}-commit"))
                        .await
                        .unwrap_or_else(|e| panic!("commit {key}: {e}"));
                    acked.lock().unwrap().commits.insert(hold, 2);
                }
            }
        });
    }
    // 12 kills at random moments, each followed by a restart on the same port.
    for _ in 0..12 {
        let pause = 150 + (uuid::Uuid::new_v4().as_u128() % 350) as u64;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        server.start_kill().unwrap(); // SIGKILL
        server.wait().await.unwrap();
        server = spawn_server(port, &db.url);
        wait_ready(port).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(r) = load.join_next().await {
        r.unwrap();
    }
    server.start_kill().unwrap();
    server.wait().await.unwrap();

    let store = db.store().await;
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    println!(
        "crash campaign ({backend:?}): 12 kill -9, {} reserves and {} commits acknowledged",
        acked.reserves.len(),
        acked.commits.len()
    );
    assert!(
        acked.reserves.len() > 50,
        "load ran: {}",
        acked.reserves.len()
    );
    let mut stored = HashSet::new();
    for a in 0..4 {
        let holds = crate::support::holds_of(&store, &format!("acct-{a}")).await;
        for h in holds {
            if let Some(amount) = acked.commits.get(&h.hold_id) {
                assert_eq!(
                    h.state,
                    tally::domain::HoldState::Committed,
                    "{}",
                    h.hold_id
                );
                assert_eq!(h.committed_amount, *amount);
            }
            assert!(stored.insert(h.hold_id));
        }
    }
    let acked_ids: HashSet<String> = acked.reserves.values().cloned().collect();
    assert_eq!(acked_ids.len(), acked.reserves.len(), "one hold per key");
    // Every acknowledged hold exists exactly once, and nothing exists that no key produced
    // (a client's unacknowledged last call is retried until acknowledged, so none is left).
    assert_eq!(stored, acked_ids);
    assert_ledger_balances(&store).await;
}

/// Cancels the client at random points during 500 Reserves, then retries each with its key:
/// each resolves to exactly one hold.
async fn cancelled_reserves_resolve_to_one_hold_each(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.fund("acct", 10_000).await;
    let mut set = JoinSet::new();
    for i in 0..500u32 {
        let mut c = app.credit().await;
        set.spawn(async move {
            let cut =
                Duration::from_micros(u64::from((uuid::Uuid::new_v4().as_u128() % 4000) as u16));
            let _ = tokio::time::timeout(cut, c.reserve(reserve_req("acct", 1, &format!("k{i}"))))
                .await;
        });
    }
    while set.join_next().await.is_some() {}
    let mut c = app.credit().await;
    let mut ids = HashSet::new();
    for i in 0..500u32 {
        let r = c
            .reserve(reserve_req("acct", 1, &format!("k{i}")))
            .await
            .unwrap()
            .into_inner();
        ids.insert(r.hold.unwrap().hold_id);
    }
    assert_eq!(ids.len(), 500);
    let holds = crate::support::holds_of(&app.store, "acct").await;
    assert_eq!(holds.len(), 500, "no key made two holds, and none was lost");
    assert_eq!(
        c.check_balance(pb::CheckBalanceRequest {
            account_id: "acct".into()
        })
        .await
        .unwrap()
        .into_inner()
        .available,
        9_500
    );
    app.finish().await;
}

/// A PostgreSQL cluster of this test's own (so it can be stopped), from the machine's server
/// binaries, run as `postgres` when we are root.
struct OwnCluster {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
    root: bool,
}

impl OwnCluster {
    fn cmd(&self, tool: &str) -> std::process::Command {
        let path = self.bin.join(tool);
        if self.root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            std::process::Command::new(path)
        }
    }

    fn start() -> Self {
        let bin = std::env::var_os("PGBIN").map_or_else(
            || {
                let out = std::process::Command::new("pg_config")
                    .arg("--bindir")
                    .output()
                    .unwrap();
                std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
            },
            std::path::PathBuf::from,
        );
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .unwrap()
            .stdout
            == b"0\n";
        let dir = tempfile::tempdir().unwrap();
        if root {
            assert!(
                std::process::Command::new("chown")
                    .arg("postgres")
                    .arg(dir.path())
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let c = Self {
            dir,
            bin,
            port: free_port(),
            root,
        };
        let data = c.dir.path().join("data");
        let ok = c
            .cmd("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "initdb");
        c.pg_ctl("start");
        c
    }

    fn pg_ctl(&self, action: &str) {
        let data = self.dir.path().join("data");
        let mut cmd = self.cmd("pg_ctl");
        cmd.arg("-D").arg(&data).args(["-w", "-t", "30"]);
        match action {
            "start" => {
                cmd.args(["-l"])
                    .arg(self.dir.path().join("log"))
                    .arg("start")
                    .arg("-o")
                    .arg(format!(
                        "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                        self.port,
                        self.dir.path().display()
                    ));
            }
            _ => {
                cmd.args(["-m", "immediate", "stop"]);
            }
        }
        let ok = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "pg_ctl {action}");
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        if self.dir.path().join("data/postmaster.pid").exists() {
            self.pg_ctl("stop");
        }
    }
}

/// One call of the database-loss load: its key, the hold id or (code, ErrorInfo reason), and
/// how long it took.
type Outcome = (String, Result<String, (Code, String)>, Duration);

/// PostgreSQL stopped mid-load: calls fail fast with UNAVAILABLE (never past their deadline),
/// nothing unstored is acknowledged; started again, the same server recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_loss_fails_fast_and_recovers_without_a_restart() {
    let pg = OwnCluster::start();
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    let app = TestApp::spawn_on(TestDb::from_url(url)).await;
    app.fund("acct", 1_000_000).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let mut load = JoinSet::new();
    let deadline = Duration::from_secs(2);
    for w in 0..4 {
        let (mut c, stop, outcomes) =
            (app.credit().await, Arc::clone(&stop), Arc::clone(&outcomes));
        load.spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let key = format!("w{w}-{i}");
                let mut req = tonic::Request::new(reserve_req("acct", 1, &key));
                req.set_timeout(deadline);
                let t = Instant::now();
                let r = c.reserve(req).await;
                let out = r
                    .map(|r| r.into_inner().hold.unwrap().hold_id)
                    .map_err(|s| {
                        let why = s.get_details_error_info().map(|i| i.reason);
                        (s.code(), why.unwrap_or_default())
                    });
                let failed = out.is_err();
                outcomes.lock().unwrap().push((key, out, t.elapsed()));
                if failed {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    pg.pg_ctl("stop");
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.pg_ctl("start");
    // Recovery without restarting Tally: readiness returns and Reserves succeed again.
    let mut recovered = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ok_tail = {
            let o = outcomes.lock().unwrap();
            o.iter().rev().take(8).filter(|x| x.1.is_ok()).count()
        };
        if ok_tail >= 8 {
            recovered = true;
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(r) = load.join_next().await {
        r.unwrap();
    }
    assert!(recovered, "reserves succeed again after PostgreSQL is back");
    let o = std::mem::take(&mut *outcomes.lock().unwrap());
    let failures: Vec<_> = o.iter().filter(|x| x.1.is_err()).collect();
    assert!(!failures.is_empty(), "the outage was seen");
    // Nothing was written: the only answer that promises it.
    let not_written = |x: &Outcome| {
        x.1.as_ref().unwrap_err() == &(Code::Unavailable, "DATABASE_UNAVAILABLE".to_owned())
    };
    let in_flight_at_the_stop = failures.iter().filter(|x| !not_written(x)).count();
    for (key, out, took) in &failures {
        let (code, why) = out.as_ref().unwrap_err();
        // OUTCOME_UNKNOWN (also UNAVAILABLE): the connection went while COMMIT was in flight.
        assert!(
            *code != Code::Unavailable
                || ["DATABASE_UNAVAILABLE", "OUTCOME_UNKNOWN"].contains(&why.as_str()),
            "{key}: UNAVAILABLE {why}"
        );
        // CANCELLED is how tonic's server reports an expired deadline ("Timeout expired"): a
        // call caught mid-transaction by the stop may wait for its deadline, never longer.
        assert!(
            matches!(
                code,
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
            ),
            "{key}: {code:?}"
        );
        assert!(
            *took < deadline + Duration::from_millis(500),
            "{key} took {took:?}"
        );
        // Refused fast: the gate knows the database is down (measured: all within 24 ms).
        assert!(
            *code != Code::Unavailable || *took < Duration::from_secs(1),
            "{key}: UNAVAILABLE after {took:?}"
        );
    }
    let fast = failures
        .iter()
        .filter(|x| {
            x.1.as_ref().unwrap_err().0 == Code::Unavailable && x.2 < Duration::from_millis(100)
        })
        .count();
    assert!(
        fast * 10 >= (failures.len() - in_flight_at_the_stop) * 9,
        "UNAVAILABLE within 100 ms: {fast} of {} refusals",
        failures.len() - in_flight_at_the_stop
    );
    // Only the calls in flight when PostgreSQL stopped (one per load worker) may end otherwise:
    // outcome unknown (OUTCOME_UNKNOWN, or their deadline).
    assert!(
        in_flight_at_the_stop <= 4,
        "{in_flight_at_the_stop} of {} failures were not UNAVAILABLE",
        failures.len()
    );
    // Nothing acknowledged was lost; nothing failed was stored.
    let acked: HashSet<&String> = o.iter().filter_map(|x| x.1.as_ref().ok()).collect();
    let holds = crate::support::holds_of(&app.store, "acct").await;
    let stored: HashSet<&String> = holds.iter().map(|h| &h.hold_id).collect();
    assert!(
        acked.is_subset(&stored),
        "every acknowledged hold is stored"
    );
    // A call whose outcome is unknown may have committed (it replays now or is applied); a
    // DATABASE_UNAVAILABLE one never did: its key retried now must create a new hold.
    let mut c = app.credit().await;
    let unavailable: Vec<_> = failures.iter().filter(|x| not_written(x)).collect();
    assert!(!unavailable.is_empty());
    for (key, _, _) in unavailable {
        let r = c.reserve(reserve_req("acct", 1, key)).await.unwrap();
        assert_ne!(
            r.metadata()
                .get("tally-idempotent-replay")
                .map(|v| v.to_str().unwrap()),
            Some("true"),
            "{key} was not stored"
        );
    }
    app.finish().await;
}

crate::on_both_backends!(crash_campaign, cancelled_reserves_resolve_to_one_hold_each);
