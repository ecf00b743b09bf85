//! `tally::client` against a real server: heartbeats keep a job's hold alive past its TTL, a
//! dropped job is refunded, retries ride out load shedding without reserving twice, and
//! refusals come back typed.

use std::time::Duration;

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
    assert_eq!(settled.hold.unwrap().state(), pb::HoldState::Committed);

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
    let hold = app
        .credit()
        .await
        .get_hold(pb::GetHoldRequest { hold_id })
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
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
                amount: 1,
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

crate::on_both_backends!(
    a_job_outlives_its_ttl_by_heartbeats_and_a_dropped_one_is_refunded,
    retries_ride_out_shedding_without_reserving_twice,
);
