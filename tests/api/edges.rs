//! The ledger's edges (issue 23), over the real server on both backends: text rules, the
//! balance limit, request fingerprints, the CSV export and `available`.

use std::collections::{BTreeMap, HashSet};

use tally::pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{Backend, TestApp};
use crate::{expect_error, grant_req, reserve_req};

fn violated(e: &tonic::Status) -> HashSet<String> {
    e.get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

async fn available(app: &TestApp, account: &str) -> i64 {
    app.credit()
        .await
        .check_balance(pb::CheckBalanceRequest {
            account_id: account.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .available
}

/// Item 2: NUL and other control characters in a reason, an operator or a metadata value are
/// INVALID_ARGUMENT with a field violation on both backends, and change nothing.
async fn control_characters_in_text_are_invalid_arguments(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.fund("texty", 100).await;
    let mut admin = app.admin().await;
    let mut credit = app.credit().await;
    for bad in ["nul\0byte", "bell\u{7}", "c1\u{85}", "cr\r"] {
        let mut g = grant_req("texty", 5, &format!("g-{}", bad.len()));
        g.reason = bad.into();
        let e = admin.grant(g).await.unwrap_err();
        expect_error(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
        assert_eq!(
            violated(&e),
            HashSet::from(["reason".to_owned()]),
            "{bad:?}"
        );
        let e = admin
            .adjust(pb::AdjustRequest {
                account_id: "texty".into(),
                delta: 1,
                reason: "fine".into(),
                operator: format!("ops{bad}"),
                idempotency_key: "a1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(violated(&e), HashSet::from(["operator".to_owned()]));
        let mut r = reserve_req("texty", 1, "r1");
        r.metadata = BTreeMap::from([("job".to_owned(), bad.to_owned())])
            .into_iter()
            .collect();
        let e = credit.reserve(r).await.unwrap_err();
        assert_eq!(violated(&e), HashSet::from(["metadata".to_owned()]));
    }
    // Tab and newline are text in reasons and metadata values.
    let mut g = grant_req("texty", 5, "g-lines");
    g.reason = "two\nlines\tand a tab".into();
    admin.grant(g).await.unwrap();
    assert_eq!(available(&app, "texty").await, 105);
    app.finish().await;
}

/// Item 2: a request whose string field is not UTF-8 does not decode: INVALID_ARGUMENT on
/// `request`, not INTERNAL.
async fn a_request_that_does_not_decode_is_an_invalid_argument(backend: Backend) {
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawCheckBalance {
        #[prost(bytes = "vec", tag = "1")]
        account_id: Vec<u8>,
    }
    let app = TestApp::spawn(backend).await;
    let mut grpc = tonic::client::Grpc::new(app.channel().await);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/tally.v1.CreditService/CheckBalance");
    let e = grpc
        .unary::<_, pb::CheckBalanceResponse, _>(
            tonic::Request::new(RawCheckBalance {
                account_id: vec![b'a', 0xff, 0xfe],
            }),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    expect_error(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(violated(&e), HashSet::from(["request".to_owned()]));
    app.finish().await;
}

crate::on_both_backends!(
    control_characters_in_text_are_invalid_arguments,
    a_request_that_does_not_decode_is_an_invalid_argument,
);
