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
    app.check_balance(account).await.available
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

/// Item 4: two different Reserves whose metadata used to encode alike are a reused key; a
/// Reserve without a TTL replays after the server's default TTL changed.
async fn reserve_fingerprints_are_injective_and_ignore_the_default_ttl(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.fund("keys", 100).await;
    let mut credit = app.credit().await;
    let mut a = reserve_req("keys", 5, "same-key");
    a.metadata = [("k1".to_owned(), "a\n3:xyz=b".to_owned())]
        .into_iter()
        .collect();
    let mut b = reserve_req("keys", 5, "same-key");
    b.metadata = [
        ("k1".to_owned(), "a".to_owned()),
        ("xyz".to_owned(), "b".to_owned()),
    ]
    .into_iter()
    .collect();
    credit.reserve(a.clone()).await.unwrap();
    let e = credit.reserve(b).await.unwrap_err();
    expect_error(&e, Code::AlreadyExists, "IDEMPOTENCY_KEY_REUSED");
    // No TTL given: the server's default is not part of the request.
    let c = reserve_req("keys", 3, "no-ttl");
    let first = credit.reserve(c.clone()).await.unwrap().into_inner();
    drop(credit);
    let db = app.finish().await;
    let app = TestApp::spawn_on_with(db, |s| {
        s.limits.hold_ttl_default = chrono::TimeDelta::minutes(3);
    })
    .await;
    let mut credit = app.credit().await;
    let again = credit.reserve(c).await.unwrap().into_inner();
    assert_eq!(
        again.hold.unwrap().hold_id,
        first.hold.unwrap().hold_id,
        "the retry replays"
    );
    credit.reserve(a).await.unwrap();
    app.finish().await;
}

/// Item 7: text cells that a spreadsheet would run as a formula are exported with a leading
/// `'`; the export still parses, and numbers stay numbers.
async fn the_csv_export_neutralises_formulas(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut admin = app.admin().await;
    let start = chrono::Utc::now() - chrono::TimeDelta::seconds(1);
    let reasons = [
        "=HYPERLINK(\"http://x.example\",\"x\")",
        "+1+1",
        "-2",
        "@SUM(A1)",
        "\tindented",
        "plain",
    ];
    for (i, r) in reasons.iter().enumerate() {
        let mut g = grant_req("-sheet", 1, &format!("csv{i}"));
        g.reason = (*r).into();
        admin.grant(g).await.unwrap();
    }
    let end = chrono::Utc::now() + chrono::TimeDelta::seconds(1);
    let ts = |t: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    };
    let mut stream = admin
        .export_usage(pb::ExportUsageRequest {
            since: Some(ts(start)),
            until: Some(ts(end)),
            account_id: "-sheet".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(c) = stream.message().await.unwrap() {
        bytes.extend(c.csv);
    }
    let rows: Vec<csv::StringRecord> = csv::Reader::from_reader(bytes.as_slice())
        .records()
        .map(Result::unwrap)
        .collect();
    let cells: Vec<(&str, &str)> = rows.iter().map(|r| (&r[2], &r[7])).collect();
    for (account, reason) in &cells {
        assert_eq!(*account, "'-sheet");
        assert!(
            !reason.starts_with(['=', '+', '-', '@', '\t', '\r']),
            "{reason:?} would run as a formula"
        );
    }
    let got: Vec<&str> = cells.iter().map(|(_, r)| *r).collect();
    assert_eq!(
        got,
        [
            "'=HYPERLINK(\"http://x.example\",\"x\")",
            "'+1+1",
            "'-2",
            "'@SUM(A1)",
            "'\tindented",
            "plain"
        ]
    );
    assert!(rows.iter().all(|r| r[5].parse::<i64>().is_ok()));
    app.finish().await;
}

/// Item 8: `available` is credits less debt in every response — CheckBalance, Adjust,
/// Transfer, GetAccount, ListAccounts and the billing view — with `debt` beside it.
async fn available_means_one_thing_everywhere(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.post_webhook(&crate::stripe_facts::paid_session(
        "evt_p", "cs_debt", "owes", "pi_debt",
    ))
    .await;
    let mut credit = app.credit().await;
    let mut admin = app.admin().await;
    let h = credit
        .reserve(reserve_req("owes", 300, "r1"))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    credit
        .commit(pb::CommitRequest {
            hold_id: h.hold_id,
            amount: 300,
            idempotency_key: "c1".into(),
        })
        .await
        .unwrap();
    let refund = serde_json::to_vec(
        &serde_json::json!({"id": "evt_r", "type": "charge.refunded",
        "created": 5, "livemode": false, "data": {"object": {"id": "ch_debt", "object": "charge",
        "payment_intent": "pi_debt", "amount": 1900, "amount_refunded": 1900}}}),
    )
    .unwrap();
    app.post_webhook(&refund).await;
    let b = credit
        .check_balance(pb::CheckBalanceRequest {
            account_id: "owes".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((b.available, b.debt), (-300, 300));
    let adj = admin
        .adjust(pb::AdjustRequest {
            account_id: "owes".into(),
            delta: 10,
            reason: "goodwill".into(),
            operator: "ops".into(),
            idempotency_key: "a1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(adj.available, -290, "net, as CheckBalance");
    app.fund("giver", 100).await;
    let t = admin
        .transfer(pb::TransferRequest {
            from_account_id: "giver".into(),
            to_account_id: "owes".into(),
            amount: 5,
            reason: "gift".into(),
            idempotency_key: "t1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.to_available, -285, "{t:?}");
    let a = admin
        .get_account(pb::GetAccountRequest {
            account_id: "owes".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    assert_eq!((a.available, a.debt), (-285, 285));
    let listed = admin
        .list_accounts(pb::ListAccountsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .accounts;
    let row = listed.iter().find(|r| r.account_id == "owes").unwrap();
    assert_eq!(
        (row.available, row.debt, row.low_balance),
        (-285, 285, true)
    );
    let view: serde_json::Value =
        reqwest::get(format!("http://{}/v1/accounts/owes/billing", app.http))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(
        (&view["balance"]["available"], &view["balance"]["debt"]),
        (&serde_json::json!(-285), &serde_json::json!(285))
    );
    app.finish().await;
}

crate::on_both_backends!(
    available_means_one_thing_everywhere,
    the_csv_export_neutralises_formulas,
    reserve_fingerprints_are_injective_and_ignore_the_default_ttl,
    control_characters_in_text_are_invalid_arguments,
    a_request_that_does_not_decode_is_an_invalid_argument,
);
