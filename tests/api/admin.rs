//! AdminService: plans, account views, listings and the usage export.

use std::collections::HashSet;

use tally::pb;
use tokio::task::JoinSet;
use tonic::Code;

use crate::support::{Backend, TestApp};
use crate::{expect_error, grant_req, reserve_req};

fn ts(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap(),
    }
}

async fn plans_set_entitlements_and_low_balance(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut admin, mut credit) = (app.admin().await, app.credit().await);
    admin.grant(grant_req("low", 1, "g1")).await.unwrap();
    admin.grant(grant_req("rich", 1_000, "g2")).await.unwrap();
    let b = credit
        .check_balance(pb::CheckBalanceRequest {
            account_id: "low".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (b.plan.as_str(), b.low_balance),
        ("free", true),
        "free's threshold is 2"
    );

    let set = |plan: &str, key: &str| pb::SetPlanRequest {
        account_id: "rich".into(),
        plan: plan.into(),
        idempotency_key: key.into(),
    };
    let r = admin.set_plan(set("pro", "p1")).await.unwrap().into_inner();
    assert_eq!((r.previous_plan.as_str(), r.plan.as_str()), ("free", "pro"));
    let e = admin.set_plan(set("platinum", "p2")).await.unwrap_err();
    expect_error(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
    let e = admin
        .set_plan(pb::SetPlanRequest {
            account_id: "ghost".into(),
            plan: "pro".into(),
            idempotency_key: "p3".into(),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::NotFound, "ACCOUNT_NOT_FOUND");

    credit
        .reserve(reserve_req("rich", 995, "r1"))
        .await
        .unwrap();
    let a = admin
        .get_account(pb::GetAccountRequest {
            account_id: "rich".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let acct = a.account.unwrap();
    assert_eq!(
        (
            acct.plan.as_str(),
            acct.available,
            acct.held,
            acct.low_balance,
            acct.low_balance_threshold
        ),
        ("pro", 5, 995, true, 10)
    );
    assert_eq!(acct.entitlements["max_resolution"], "1080p");
    assert_eq!(a.open_holds.len(), 1);

    let list = |plan: &str, low: bool| pb::ListAccountsRequest {
        plan: plan.into(),
        low_balance_only: low,
        page_size: 0,
        page_token: String::new(),
    };
    let ids = |r: pb::ListAccountsResponse| {
        r.accounts
            .into_iter()
            .map(|a| a.account_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(admin
            .list_accounts(list("", false))
            .await
            .unwrap()
            .into_inner()),
        ["low", "rich"]
    );
    assert_eq!(
        ids(admin
            .list_accounts(list("pro", false))
            .await
            .unwrap()
            .into_inner()),
        ["rich"]
    );
    assert_eq!(
        ids(admin
            .list_accounts(list("", true))
            .await
            .unwrap()
            .into_inner()),
        ["low", "rich"]
    );
    assert_eq!(
        ids(admin
            .list_accounts(list("free", true))
            .await
            .unwrap()
            .into_inner()),
        ["low"]
    );
    admin.grant(grant_req("rich", 100, "g3")).await.unwrap();
    assert_eq!(
        ids(admin
            .list_accounts(list("", true))
            .await
            .unwrap()
            .into_inner()),
        ["low"]
    );
    app.finish().await;
}

async fn account_listing_pages_by_id(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut admin = app.admin().await;
    for i in 0..23 {
        admin
            .grant(grant_req(&format!("user_{i:02}"), 10, &format!("g{i}")))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let r = admin
            .list_accounts(pb::ListAccountsRequest {
                plan: String::new(),
                low_balance_only: false,
                page_size: 5,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(r.accounts.into_iter().map(|a| a.account_id));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(
        seen,
        (0..23).map(|i| format!("user_{i:02}")).collect::<Vec<_>>()
    );
    app.finish().await;
}

async fn entry_pages_have_no_gaps_or_duplicates_under_concurrent_appends(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut admin, credit) = (app.admin().await, app.credit().await);
    admin
        .grant(grant_req("acct", 1_000_000, "g"))
        .await
        .unwrap();
    for i in 0..40 {
        credit
            .clone()
            .reserve(reserve_req("acct", 1, &format!("before{i}")))
            .await
            .unwrap();
    }
    let existing: Vec<i64> = {
        let r = admin
            .list_entries(pb::ListEntriesRequest {
                page_size: 500,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        r.entries.iter().map(|e| e.entry_id).collect()
    };
    assert_eq!(existing.len(), 41);
    // Writers append while the walk pages through.
    let mut writers = JoinSet::new();
    for w in 0..4 {
        let mut c = credit.clone();
        writers.spawn(async move {
            for i in 0..15 {
                c.reserve(reserve_req("acct", 1, &format!("during{w}-{i}")))
                    .await
                    .unwrap();
            }
        });
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let r = admin
            .list_entries(pb::ListEntriesRequest {
                account_id: "acct".into(),
                page_size: 6,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(r.entries.into_iter().map(|e| e.entry_id));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    while writers.join_next().await.is_some() {}
    let unique: HashSet<i64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "no entry twice");
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "newest first");
    for id in &existing {
        assert!(
            unique.contains(id),
            "entry {id} that existed before the walk is missing"
        );
    }
    let reserves = admin
        .list_entries(pb::ListEntriesRequest {
            kinds: vec![pb::EntryKind::Grant.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reserves.entries.len(), 1);
    let e = admin
        .list_entries(pb::ListEntriesRequest {
            // A kind this server does not know (a newer client's).
            kinds: vec![999],
            ..Default::default()
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
    let e = admin
        .list_entries(pb::ListEntriesRequest {
            account_id: "other".into(),
            page_token: "7631".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
    app.finish().await;
}

async fn usage_export_round_trips_through_a_csv_parser(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut admin, mut credit) = (app.admin().await, app.credit().await);
    let start = chrono::Utc::now() - chrono::TimeDelta::seconds(1);
    admin
        .grant(pb::GrantRequest {
            account_id: "acct".into(),
            amount: 3_000,
            reason: "promo, \"winter\"\nline two".into(),
            idempotency_key: "g".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..1_200 {
        // Enough rows for several pages and chunks.
        credit
            .reserve(reserve_req("acct", 1, &format!("r{i}")))
            .await
            .unwrap();
    }
    let end = chrono::Utc::now() + chrono::TimeDelta::seconds(1);
    let mut stream = admin
        .export_usage(pb::ExportUsageRequest {
            since: Some(ts(start)),
            until: Some(ts(end)),
            account_id: "acct".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    let mut chunks = 0;
    while let Some(c) = stream.message().await.unwrap() {
        bytes.extend(c.csv);
        chunks += 1;
    }
    assert!(chunks >= 2, "streamed in chunks: {chunks}");
    let mut reader = csv::Reader::from_reader(bytes.as_slice());
    assert_eq!(
        reader.headers().unwrap().iter().collect::<Vec<_>>(),
        [
            "entry_id",
            "created_at",
            "account_id",
            "kind",
            "hold_id",
            "available_delta",
            "held_delta",
            "reason"
        ]
    );
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 1_201);
    assert_eq!(&rows[0][3], "grant");
    assert_eq!(&rows[0][7], "promo, \"winter\"\nline two");
    let sum: i64 = rows.iter().map(|r| r[5].parse::<i64>().unwrap()).sum();
    assert_eq!(sum, 3_000 - 1_200, "the export explains the balance");
    let ids: Vec<i64> = rows.iter().map(|r| r[0].parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));

    let e = admin
        .export_usage(pb::ExportUsageRequest {
            since: Some(ts(end)),
            until: Some(ts(start)),
            account_id: String::new(),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
    app.finish().await;
}

crate::on_both_backends!(
    plans_set_entitlements_and_low_balance,
    account_listing_pages_by_id,
    entry_pages_have_no_gaps_or_duplicates_under_concurrent_appends,
    usage_export_round_trips_through_a_csv_parser,
    a_new_user_gets_bonus_allowance_and_a_breakdown,
);

async fn a_new_user_gets_bonus_allowance_and_a_breakdown(backend: Backend) {
    let app = TestApp::spawn_with_builtin_catalog(backend).await;
    let (mut admin, mut credit) = (app.admin().await, app.credit().await);
    let open = |key: &str| pb::OpenAccountRequest {
        account_id: "new_user".into(),
        plan: String::new(),
        idempotency_key: key.into(),
    };
    let o = admin.open_account(open("o1")).await.unwrap().into_inner();
    assert_eq!(
        (o.plan.as_str(), o.bonus, o.available),
        ("free", 100, 105),
        "bonus plus the first daily allowance"
    );
    let e = admin.open_account(open("o2")).await.unwrap_err();
    expect_error(&e, Code::AlreadyExists, "ACCOUNT_EXISTS");
    credit
        .reserve(reserve_req("new_user", 3, "r1"))
        .await
        .unwrap();
    let b = credit
        .check_balance(pb::CheckBalanceRequest {
            account_id: "new_user".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (b.available, b.held, b.allowance_left),
        (102, 3, Some(2)),
        "the allowance expires first, so it is used first"
    );
    assert_eq!(
        (
            b.by_source.get("allowance"),
            b.by_source.get("signup_bonus")
        ),
        (Some(&2), Some(&100))
    );
    assert_eq!(b.next_expiry.unwrap().amount, 2);

    let a = admin
        .get_account(pb::GetAccountRequest {
            account_id: "new_user".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let sources: Vec<pb::GrantSource> = a.grants.iter().map(pb::CreditGrant::source).collect();
    assert_eq!(
        sources,
        [pb::GrantSource::Allowance, pb::GrantSource::SignupBonus],
        "in consumption order"
    );

    let adj = pb::AdjustRequest {
        account_id: "new_user".into(),
        delta: -2,
        reason: "correction".into(),
        operator: "ops".into(),
        idempotency_key: "a1".into(),
    };
    assert_eq!(admin.adjust(adj).await.unwrap().into_inner().available, 100);
    let e = admin
        .adjust(pb::AdjustRequest {
            account_id: "new_user".into(),
            delta: 5,
            reason: String::new(),
            operator: String::new(),
            idempotency_key: "a2".into(),
        })
        .await
        .unwrap_err();
    let fields: HashSet<String> = tonic_types::StatusExt::get_details_bad_request(&e)
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(
        fields,
        ["reason", "operator"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    let t = pb::TransferRequest {
        from_account_id: "new_user".into(),
        to_account_id: "friend".into(),
        amount: 40,
        reason: "gift".into(),
        idempotency_key: "t1".into(),
    };
    let t = admin.transfer(t).await.unwrap().into_inner();
    // The friend's account is new: it gets the free plan's allowance on its first operation too.
    assert_eq!((t.from_available, t.to_available), (60, 45));
    let mut g = grant_req("friend", 10, "g1");
    g.source = pb::GrantSource::Promotion.into();
    g.expires_at = Some(ts(chrono::Utc::now() + chrono::TimeDelta::days(7)));
    g.priority = Some(10);
    let grant = admin.grant(g).await.unwrap().into_inner();
    assert!(grant.grant_id.starts_with("grt_"), "{}", grant.grant_id);
    let mut bad = grant_req("friend", 10, "g2");
    bad.source = 999; // not a source this server knows
    bad.priority = Some(101);
    let e = admin.grant(bad).await.unwrap_err();
    assert_eq!(
        tonic_types::StatusExt::get_details_bad_request(&e)
            .unwrap()
            .field_violations
            .len(),
        2
    );
    app.finish().await;
}
