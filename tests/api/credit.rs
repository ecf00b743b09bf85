//! CreditService semantics over the wire.

use std::collections::HashSet;
use std::time::Duration;

use tally::pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{Backend, TestApp};
use crate::{expect_error, grant_req, reason, reserve_req};

async fn a_job_reserves_commits_and_refunds(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut admin, mut credit) = (app.admin().await, app.credit().await);
    let g = admin
        .grant(grant_req("user_1", 500, "g1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.available, 500);
    let mut req = reserve_req("user_1", 40, "job-1");
    req.ttl = Some(prost_types::Duration {
        seconds: 600,
        nanos: 0,
    });
    req.metadata.insert("job_id".into(), "j-1".into());
    let r = credit.reserve(req).await.unwrap().into_inner();
    let hold = r.hold.unwrap();
    assert_eq!(
        (hold.amount, hold.state, r.available),
        (40, pb::HoldState::Open as i32, 460)
    );
    assert_eq!(hold.metadata["job_id"], "j-1");
    let ttl = hold.expires_at.unwrap().seconds - hold.created_at.unwrap().seconds;
    assert!((599..=601).contains(&ttl), "ttl {ttl}");
    let b = credit
        .check_balance(pb::CheckBalanceRequest {
            account_id: "user_1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((b.available, b.held, b.open_holds), (460, 40, 1));

    let c = credit
        .commit(pb::CommitRequest {
            hold_id: hold.hold_id.clone(),
            amount: 35,
            idempotency_key: "job-1-commit".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((c.released, c.extra_drawn, c.available), (5, 0, 465));
    let f = credit
        .refund(pb::RefundRequest {
            hold_id: hold.hold_id.clone(),
            amount: Some(5),
            reason: "bad frames".into(),
            idempotency_key: "job-1-refund".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (f.refunded, f.available, f.hold.unwrap().refunded_amount),
        (5, 470, 5)
    );
    let got = credit
        .get_hold(pb::GetHoldRequest {
            hold_id: hold.hold_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    assert_eq!(
        (got.state, got.committed_amount, got.refunded_amount),
        (pb::HoldState::Committed as i32, 35, 5)
    );
    let b = credit
        .check_balance(pb::CheckBalanceRequest {
            account_id: "user_1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((b.available, b.held, b.open_holds), (470, 0, 0));
    app.finish().await;
}

async fn refused_calls_carry_error_info_and_change_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut admin, mut credit) = (app.admin().await, app.credit().await);
    admin.grant(grant_req("acct", 100, "g")).await.unwrap();
    let balance = |mut c: tally::pb::credit_service_client::CreditServiceClient<
        tonic::transport::Channel,
    >| async move {
        let b = c
            .check_balance(pb::CheckBalanceRequest {
                account_id: "acct".into(),
            })
            .await
            .unwrap()
            .into_inner();
        (b.available, b.held, b.open_holds)
    };
    let before = balance(credit.clone()).await;

    let e = credit
        .reserve(reserve_req("acct", 101, "k1"))
        .await
        .unwrap_err();
    expect_error(&e, Code::FailedPrecondition, "INSUFFICIENT_CREDITS");
    let info = e.get_details_error_info().unwrap();
    assert_eq!(
        (
            info.metadata["available"].as_str(),
            info.metadata["requested"].as_str()
        ),
        ("100", "101")
    );

    let e = credit
        .reserve(reserve_req("nobody", 1, "k2"))
        .await
        .unwrap_err();
    expect_error(&e, Code::NotFound, "ACCOUNT_NOT_FOUND");
    let e = credit
        .check_balance(pb::CheckBalanceRequest {
            account_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::NotFound, "ACCOUNT_NOT_FOUND");

    let e = credit
        .reserve(reserve_req("bad id!", 0, "has space"))
        .await
        .unwrap_err();
    expect_error(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
    let fields: HashSet<String> = e
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(
        fields,
        ["account_id", "amount", "idempotency_key"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    let e = credit
        .reserve(reserve_req("acct", 1, ""))
        .await
        .unwrap_err();
    expect_error(&e, Code::InvalidArgument, "INVALID_ARGUMENT");

    let mut long = reserve_req("acct", 1, "k3");
    long.ttl = Some(prost_types::Duration {
        seconds: 25 * 3600,
        nanos: 0,
    });
    let e = credit.reserve(long).await.unwrap_err();
    assert_eq!(
        e.get_details_bad_request().unwrap().field_violations[0].field,
        "ttl"
    );
    let mut crowded = reserve_req("acct", 1, "k4");
    crowded.metadata = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
    let e = credit.reserve(crowded).await.unwrap_err();
    assert_eq!(
        e.get_details_bad_request().unwrap().field_violations[0].field,
        "metadata"
    );
    assert_eq!(
        balance(credit.clone()).await,
        before,
        "refused calls change nothing"
    );

    // Key reuse with another request, and hold state refusals.
    let h = credit
        .reserve(reserve_req("acct", 10, "job"))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    let e = credit
        .reserve(reserve_req("acct", 11, "job"))
        .await
        .unwrap_err();
    expect_error(&e, Code::AlreadyExists, "IDEMPOTENCY_KEY_REUSED");
    credit
        .commit(pb::CommitRequest {
            hold_id: h.hold_id.clone(),
            amount: 10,
            idempotency_key: "c1".into(),
        })
        .await
        .unwrap();
    let e = credit
        .commit(pb::CommitRequest {
            hold_id: h.hold_id.clone(),
            amount: 10,
            idempotency_key: "c2".into(),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::FailedPrecondition, "HOLD_ALREADY_COMMITTED");
    let e = credit
        .refund(pb::RefundRequest {
            hold_id: h.hold_id.clone(),
            amount: Some(11),
            reason: String::new(),
            idempotency_key: "f1".into(),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::FailedPrecondition, "REFUND_EXCEEDS_CHARGE");

    let h2 = credit
        .reserve(reserve_req("acct", 10, "job2"))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    credit
        .refund(pb::RefundRequest {
            hold_id: h2.hold_id.clone(),
            amount: None,
            reason: "failed".into(),
            idempotency_key: "f2".into(),
        })
        .await
        .unwrap();
    let e = credit
        .commit(pb::CommitRequest {
            hold_id: h2.hold_id.clone(),
            amount: 1,
            idempotency_key: "c3".into(),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::FailedPrecondition, "HOLD_RELEASED");

    let mut short = reserve_req("acct", 10, "job3");
    short.ttl = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    let h3 = credit
        .reserve(short)
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let e = credit
        .commit(pb::CommitRequest {
            hold_id: h3.hold_id.clone(),
            amount: 1,
            idempotency_key: "c4".into(),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::FailedPrecondition, "HOLD_EXPIRED");
    let e = credit
        .get_hold(pb::GetHoldRequest {
            hold_id: "hold_nope".into(),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
    let e = credit
        .get_hold(pb::GetHoldRequest {
            hold_id: format!("hold_{}", "0".repeat(32)),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::NotFound, "HOLD_NOT_FOUND");
    assert_eq!(balance(credit.clone()).await, (90, 0, 0));
    app.finish().await;
}

async fn a_retried_call_gets_the_same_response_flagged_as_replay(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut admin, mut credit) = (app.admin().await, app.credit().await);
    admin.grant(grant_req("acct", 100, "g")).await.unwrap();
    let first = credit
        .reserve(reserve_req("acct", 30, "job-7"))
        .await
        .unwrap();
    assert!(first.metadata().get(tally::grpc::REPLAY_HEADER).is_none());
    let second = credit
        .reserve(reserve_req("acct", 30, "job-7"))
        .await
        .unwrap();
    assert_eq!(
        second.metadata().get(tally::grpc::REPLAY_HEADER).unwrap(),
        "true"
    );
    assert_eq!(first.into_inner(), second.into_inner());
    // A grant retried is one grant.
    admin.grant(grant_req("acct", 100, "g")).await.unwrap();
    let b = credit
        .check_balance(pb::CheckBalanceRequest {
            account_id: "acct".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((b.available, b.held), (70, 30));
    app.finish().await;
}

async fn extend_hold_is_a_heartbeat_within_the_max_ttl(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut admin, mut credit) = (app.admin().await, app.credit().await);
    admin.grant(grant_req("acct", 100, "g")).await.unwrap();
    let mut req = reserve_req("acct", 10, "r");
    req.ttl = Some(prost_types::Duration {
        seconds: 5,
        nanos: 0,
    });
    let h = credit
        .reserve(req)
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    let ext = |ttl: i64, key: &str| pb::ExtendHoldRequest {
        hold_id: h.hold_id.clone(),
        ttl: Some(prost_types::Duration {
            seconds: ttl,
            nanos: 0,
        }),
        idempotency_key: key.into(),
    };
    let x = credit
        .extend_hold(ext(3600, "x1"))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    let gained = x.expires_at.unwrap().seconds - h.expires_at.unwrap().seconds;
    assert!((3590..=3600).contains(&gained), "{gained}");
    let e = credit
        .extend_hold(ext(24 * 3600 + 1, "x2"))
        .await
        .unwrap_err();
    expect_error(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
    let e = credit
        .extend_hold(pb::ExtendHoldRequest {
            ttl: None,
            ..ext(1, "x3")
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "INVALID_ARGUMENT");
    app.finish().await;
}

async fn listing_holds_pages_without_gaps_while_holds_are_added(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut admin, mut credit) = (app.admin().await, app.credit().await);
    admin.grant(grant_req("acct", 1_000, "g")).await.unwrap();
    let mut made = Vec::new();
    for i in 0..25 {
        made.push(
            credit
                .reserve(reserve_req("acct", 1, &format!("r{i}")))
                .await
                .unwrap()
                .into_inner()
                .hold
                .unwrap()
                .hold_id,
        );
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = credit
            .list_holds(pb::ListHoldsRequest {
                account_id: "acct".into(),
                states: vec![],
                page_size: 7,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.holds.into_iter().map(|h| h.hold_id));
        // Holds added mid-walk are newer than the cursor: they never shift later pages.
        credit
            .reserve(reserve_req("acct", 1, &format!("late{pages}")))
            .await
            .unwrap();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    made.reverse();
    assert_eq!(seen, made, "every hold once, newest first");
    assert_eq!(pages, 4);
    let e = credit
        .list_holds(pb::ListHoldsRequest {
            account_id: "other".into(),
            states: vec![],
            page_size: 7,
            page_token: "00ff".into(),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
    let open = credit
        .list_holds(pb::ListHoldsRequest {
            account_id: "acct".into(),
            states: vec![pb::HoldState::Committed as i32],
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(open.holds.is_empty());
    app.finish().await;
}

crate::on_both_backends!(
    a_job_reserves_commits_and_refunds,
    refused_calls_carry_error_info_and_change_nothing,
    a_retried_call_gets_the_same_response_flagged_as_replay,
    extend_hold_is_a_heartbeat_within_the_max_ttl,
    listing_holds_pages_without_gaps_while_holds_are_added,
);
