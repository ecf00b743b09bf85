//! What operators and tools rely on: health, reflection, limits, restarts, concurrency over the wire.

use tally::pb;
use tokio::task::JoinSet;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::support::{Backend, TestApp};
use crate::{expect_error, grant_req, reserve_req};

async fn health_and_reflection_are_served(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut health = HealthClient::new(app.channel().await);
    for service in ["", "tally.v1.CreditService", "tally.v1.AdminService"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let e = health
        .check(HealthCheckRequest {
            service: "bogus".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let mut reflection = ServerReflectionClient::new(app.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "tally.v1.CreditService",
        "tally.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    app.finish().await;
}

async fn oversized_messages_are_refused_before_the_database(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut admin, mut credit) = (app.admin().await, app.credit().await);
    admin.grant(grant_req("acct", 100, "g")).await.unwrap();
    let mut big = reserve_req("acct", 10, "big");
    big.metadata.insert("blob".into(), "x".repeat(20 * 1024));
    let e = credit.reserve(big).await.unwrap_err();
    // tonic refuses a message over the 16 KiB limit while decoding, with OUT_OF_RANGE.
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let b = credit
        .check_balance(pb::CheckBalanceRequest {
            account_id: "acct".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((b.available, b.held), (100, 0));
    app.finish().await;
}

async fn idempotency_survives_a_restart(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.admin()
        .await
        .grant(grant_req("acct", 100, "g"))
        .await
        .unwrap();
    let first = app
        .credit()
        .await
        .reserve(reserve_req("acct", 25, "job-1"))
        .await
        .unwrap()
        .into_inner();
    let db = app.finish().await;
    let app = TestApp::spawn_on(db).await;
    let again = app
        .credit()
        .await
        .reserve(reserve_req("acct", 25, "job-1"))
        .await
        .unwrap();
    assert_eq!(
        again.metadata().get(tally::grpc::REPLAY_HEADER).unwrap(),
        "true"
    );
    assert_eq!(again.into_inner(), first);
    let e = app
        .credit()
        .await
        .reserve(reserve_req("acct", 26, "job-1"))
        .await
        .unwrap_err();
    expect_error(&e, Code::AlreadyExists, "IDEMPOTENCY_KEY_REUSED");
    app.finish().await;
}

async fn concurrent_reserves_over_grpc_never_overdraw(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.admin()
        .await
        .grant(grant_req("acct", 100, "g"))
        .await
        .unwrap();
    let credit = app.credit().await;
    let mut set = JoinSet::new();
    for i in 0..64 {
        let mut c = credit.clone();
        set.spawn(async move { c.reserve(reserve_req("acct", 7, &format!("job-{i}"))).await });
    }
    let (mut ok, mut refused) = (0, 0);
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                expect_error(&e, Code::FailedPrecondition, "INSUFFICIENT_CREDITS");
                refused += 1;
            }
        }
    }
    assert_eq!((ok, refused), (14, 50));
    let mut c = credit.clone();
    let b = c
        .check_balance(pb::CheckBalanceRequest {
            account_id: "acct".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((b.available, b.held, b.open_holds), (2, 98, 14));
    app.finish().await;
}

crate::on_both_backends!(
    health_and_reflection_are_served,
    oversized_messages_are_refused_before_the_database,
    idempotency_survives_a_restart,
    concurrent_reserves_over_grpc_never_overdraw,
);
