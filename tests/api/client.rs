//! `tally::client` against a real server: heartbeats keep a job's hold alive past its TTL, a
//! dropped job is refunded, a commit whose reply was lost is finished and never refunded,
//! retries ride out load shedding without reserving twice, and refusals come back typed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use tally::client::{Client, Config, Error};
use tally::pb;
use tokio::task::JoinSet;

use crate::support::{Backend, TestApp};

async fn client(app: &TestApp, config: Config) -> Client {
    Client::new(app.channel().await, None, config).unwrap()
}

async fn a_job_outlives_its_ttl_by_heartbeats_and_a_dropped_one_is_refunded(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.fund("acct", 100).await;
    let c = client(
        &app,
        Config {
            hold_ttl: Duration::from_millis(1500),
            ..Config::default()
        },
    )
    .await;
    let job = c.reserve("acct", 30).await.unwrap();
    // Twice the TTL: without the heartbeat the hold would have expired.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settled = job.commit(20).await.unwrap();
    assert_eq!(settled.available, 80);
    assert_eq!(
        settled.hold.as_ref().unwrap().state(),
        pb::HoldState::Committed
    );
    assert_eq!(settled.shortfall, 0);

    let job = c.reserve("acct", 50).await.unwrap();
    let hold_id = job.hold_id().to_owned();
    assert_eq!(c.check_balance("acct").await.unwrap().available, 30);
    drop(job); // e.g. the render task panicked
    let mut available = 0;
    for _ in 0..50 {
        available = c.check_balance("acct").await.unwrap().available;
        if available == 80 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(available, 80, "the dropped job's hold was given back");
    let hold = hold_of(&app, &hold_id).await;
    assert_eq!(hold.state(), pb::HoldState::Released);

    // A failed job, explicitly.
    let job = c.reserve("acct", 10).await.unwrap();
    let r = job.fail("render failed").await.unwrap();
    assert_eq!(r.available, 80);

    match c.reserve("acct", 1_000_000).await.unwrap_err() {
        Error::InsufficientCredits {
            available,
            requested,
        } => assert_eq!((available, requested), (80, 1_000_000)),
        e => panic!("{e:?}"),
    }
    app.finish().await;
}

async fn retries_ride_out_shedding_without_reserving_twice(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.max_concurrent_requests = 1).await;
    app.fund("acct", 1000).await;
    let c = client(
        &app,
        Config {
            deadline: Duration::from_secs(20),
            attempts: 50,
            ..Config::default()
        },
    )
    .await;
    let mut set = JoinSet::new();
    for _ in 0..40 {
        let c = c.clone();
        set.spawn(async move {
            c.reserve_request(pb::ReserveRequest {
                account_id: "acct".into(),
                cost: Some(pb::reserve_request::Cost::Amount(1)),
                ..Default::default()
            })
            .await
        });
    }
    let mut ids = std::collections::HashSet::new();
    while let Some(r) = set.join_next().await {
        let r = r.unwrap().unwrap();
        ids.insert(r.hold.unwrap().hold_id);
    }
    assert_eq!(ids.len(), 40);
    assert_eq!(c.check_balance("acct").await.unwrap().available, 960);
    let text = reqwest::get(format!("http://{}/metrics", app.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("tally_requests_refused_total{reason=\"overloaded\"}"),
        "the server did shed, and the client retried through it"
    );
    app.finish().await;
}

/// A loopback TCP proxy in front of the server that can lose what crosses it: every request
/// (the server never sees the call) or every reply (the server acts, the client never hears).
/// [`Cut::heal`] passes everything again and breaks the connections open until then, as a
/// restarted proxy or a network that comes back would, so HTTP/2 starts over cleanly.
struct Cut {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    epoch: Arc<AtomicU64>,
}

const PASS: u8 = 0;
const LOSE_REQUESTS: u8 = 1;
const LOSE_REPLIES: u8 = 2;

impl Cut {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, epoch) = (Arc::new(AtomicU8::new(PASS)), Arc::new(AtomicU64::new(0)));
        let (m, e) = (Arc::clone(&mode), Arc::clone(&epoch));
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let up = TcpStream::connect(upstream).await.unwrap();
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                let born = e.load(Ordering::SeqCst);
                for (from, to, lost_in) in [(dr, uw, LOSE_REQUESTS), (ur, dw, LOSE_REPLIES)] {
                    tokio::spawn(pipe(
                        from,
                        to,
                        lost_in,
                        Arc::clone(&m),
                        Arc::clone(&e),
                        born,
                    ));
                }
            }
        });
        Self { addr, mode, epoch }
    }

    fn lose(&self, what: u8) {
        self.mode.store(what, Ordering::SeqCst);
    }

    fn heal(&self) {
        self.mode.store(PASS, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

/// Copies one direction until either side closes or the proxy heals (which closes it).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    lost_in: u8,
    mode: Arc<AtomicU8>,
    epoch: Arc<AtomicU64>,
    born: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            () = tokio::time::sleep(Duration::from_millis(20)) => 0,
        };
        if epoch.load(Ordering::SeqCst) != born {
            return; // healed: this connection is over
        }
        if n > 0 && mode.load(Ordering::SeqCst) != lost_in && to.write_all(&buf[..n]).await.is_err()
        {
            return;
        }
    }
}

async fn hold_of(app: &TestApp, hold_id: &str) -> pb::Hold {
    app.credit()
        .await
        .get_hold(pb::GetHoldRequest {
            hold_id: hold_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap()
}

/// A commit the server stored but whose reply was lost must stay a commit: the guard sends it
/// again with its key (a replay) and never refunds it. A commit that never reached the server
/// is applied when the network is back. Either way the job costs what it cost.
async fn a_commit_with_an_unknown_outcome_is_finished_not_refunded(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.fund("acct", 100).await;
    let cut = Cut::start(app.addr).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cut.addr))
        .unwrap()
        .connect_lazy();
    let c = Client::new(
        channel,
        None,
        Config {
            deadline: Duration::from_millis(800),
            hold_ttl: Duration::from_secs(30),
            ..Config::default()
        },
    )
    .unwrap();

    let cases = [
        (LOSE_REPLIES, "reply", false),
        (LOSE_REQUESTS, "request", false),
        // The caller stops waiting mid-call (a timeout, a cancelled task): same duty.
        (LOSE_REPLIES, "reply, and the caller gave up", true),
    ];
    for (lost, what, give_up) in cases {
        let job = c.reserve("acct", 30).await.unwrap();
        let hold_id = job.hold_id().to_owned();
        cut.lose(lost);
        if give_up {
            let r = tokio::time::timeout(Duration::from_millis(300), job.commit(20)).await;
            assert!(r.is_err(), "{what}: the commit was still waiting");
        } else {
            let err = job.commit(20).await.unwrap_err();
            assert!(
                matches!(err, Error::Exhausted { .. }),
                "{what} lost: {err:?}"
            );
        }
        let before = hold_of(&app, &hold_id).await.state();
        let expected = if lost == LOSE_REPLIES {
            pb::HoldState::Committed
        } else {
            pb::HoldState::Open
        };
        assert_eq!(before, expected, "{what} lost: the server's view while cut");
        tokio::time::sleep(Duration::from_millis(300)).await; // the guard keeps trying, cut off
        cut.heal();
        let mut hold = hold_of(&app, &hold_id).await;
        for _ in 0..100 {
            if hold.state() == pb::HoldState::Committed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            hold = hold_of(&app, &hold_id).await;
        }
        // Give a wrong refund every chance to land before looking.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let hold = hold_of(&app, &hold_id).await;
        assert_eq!(hold.state(), pb::HoldState::Committed, "{what} lost");
        assert_eq!(
            (hold.committed_amount, hold.refunded_amount),
            (20, 0),
            "{what} lost: charged once, refunded nothing"
        );
    }
    let direct = Client::new(app.channel().await, None, Config::default()).unwrap();
    assert_eq!(direct.check_balance("acct").await.unwrap().available, 40);
    app.finish().await;
}

/// Issue 23, item 5: a job that ran over its hold on an account that cannot cover the rest
/// is charged what can be covered, and the shortfall is reported; never charged nothing.
async fn a_job_that_ran_over_is_charged_what_can_be_covered(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.fund("over", 12).await;
    let c = client(&app, Config::default()).await;
    // Held 10, 2 left on the account, cost 20: 12 charged, 8 short.
    let job = c.reserve("over", 10).await.unwrap();
    let settled = job.commit(20).await.unwrap();
    assert_eq!((settled.shortfall, settled.available), (8, 0));
    assert_eq!(
        settled.hold.as_ref().unwrap().committed_amount,
        12,
        "{settled:?}"
    );
    // Nothing left beyond the hold: the hold is charged.
    app.fund("over", 10).await;
    let job = c.reserve("over", 10).await.unwrap();
    let settled = job.commit(25).await.unwrap();
    assert_eq!((settled.shortfall, settled.available), (15, 0));
    assert_eq!(settled.hold.as_ref().unwrap().committed_amount, 10);
    assert_eq!(c.check_balance("over").await.unwrap().available, 0);
    app.finish().await;
}

crate::on_both_backends!(
    a_job_that_ran_over_is_charged_what_can_be_covered,
    a_commit_with_an_unknown_outcome_is_finished_not_refunded,
    a_job_outlives_its_ttl_by_heartbeats_and_a_dropped_one_is_refunded,
    retries_ride_out_shedding_without_reserving_twice,
);
