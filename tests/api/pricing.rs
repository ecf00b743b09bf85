//! Priced operations: EstimateCost and Reserve by operation.

use tally::pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{Backend, TestApp};
use crate::{expect_error, grant_req, reserve_req};

fn op(name: &str, params: &[(&str, &str)]) -> pb::PricedOperation {
    pb::PricedOperation {
        name: name.into(),
        params: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

async fn operations_are_priced_by_the_server(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (mut admin, mut credit) = (app.admin().await, app.credit().await);
    admin.grant(grant_req("acct", 100, "g")).await.unwrap();

    let video = op(
        "video_export",
        &[("seconds", "7.3"), ("resolution", "1080p")],
    );
    let e = credit
        .estimate_cost(pb::EstimateCostRequest {
            operation: video.name.clone(),
            params: video.params.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((e.cost, e.exact.as_str()), (22, "21.9"));
    let names: Vec<&str> = e.factors.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["base", "seconds", "resolution", "rounding"]);

    let mut req = reserve_req("acct", 0, "job-1");
    req.cost = Some(pb::reserve_request::Cost::Operation(video.clone()));
    let r = credit.reserve(req.clone()).await.unwrap().into_inner();
    assert_eq!((r.hold.as_ref().unwrap().amount, r.available), (22, 78));
    let again = credit.reserve(req).await.unwrap();
    assert_eq!(
        again.metadata().get(tally::grpc::REPLAY_HEADER).unwrap(),
        "true"
    );
    assert_eq!(again.into_inner(), r);

    let images = op(
        "image_generation",
        &[("images", "3"), ("complexity", "high")],
    );
    let mut req = reserve_req("acct", 0, "job-2");
    req.cost = Some(pb::reserve_request::Cost::Operation(images));
    assert_eq!(
        credit
            .reserve(req)
            .await
            .unwrap()
            .into_inner()
            .hold
            .unwrap()
            .amount,
        12
    );

    let field = |e: &tonic::Status| {
        e.get_details_bad_request().unwrap().field_violations[0]
            .field
            .clone()
    };
    let e = credit
        .estimate_cost(pb::EstimateCostRequest {
            operation: "teleport".into(),
            params: std::collections::HashMap::default(),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(field(&e), "operation");
    assert!(
        e.message().contains("video_export"),
        "names the known operations: {}",
        e.message()
    );
    let bad = op("video_export", &[("seconds", "3"), ("resolution", "8k")]);
    let e = credit
        .estimate_cost(pb::EstimateCostRequest {
            operation: bad.name,
            params: bad.params,
        })
        .await
        .unwrap_err();
    assert_eq!(field(&e), "params");
    // Neither an amount nor an operation (the oneof unset): the amount is required.
    let mut neither = reserve_req("acct", 5, "job-3");
    neither.cost = None;
    let e = credit.reserve(neither).await.unwrap_err();
    assert_eq!(field(&e), "amount");
    let b = credit
        .check_balance(pb::CheckBalanceRequest {
            account_id: "acct".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((b.available, b.held), (66, 34));
    app.finish().await;
}

crate::on_both_backends!(operations_are_priced_by_the_server);

/// ListOperations describes every priced operation well enough to build a request without
/// trial and error: every parameter, its kind and allowed values or range, and the formula;
/// a request built from it alone is priced by EstimateCost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_operations_describes_the_price_table() {
    let app = crate::support::TestApp::spawn(crate::support::Backend::Sqlite).await;
    let mut credit = app.credit().await;
    let ops = credit
        .list_operations(tally::pb::ListOperationsRequest {})
        .await
        .unwrap()
        .into_inner()
        .operations;
    let video = ops.iter().find(|o| o.name == "video_export").unwrap();
    assert_eq!(video.formula, "ceil(2 × seconds × resolution) credits");
    let kinds: Vec<(&str, &str)> = video
        .params
        .iter()
        .map(|p| (p.name.as_str(), p.kind.as_str()))
        .collect();
    assert_eq!(kinds, [("seconds", "number"), ("resolution", "choice")]);
    assert_eq!(video.params[1].allowed_values["1080p"], "1.5");
    assert_eq!(video.params[0].max, "1000000000");
    assert!(video.params.iter().all(|p| p.required));
    for op in &ops {
        // The first allowed value of each choice, 1 of each number.
        let params = op
            .params
            .iter()
            .map(|p| {
                let v = if p.kind == "number" {
                    "1".to_owned()
                } else {
                    p.allowed_values.keys().next().unwrap().clone()
                };
                (p.name.clone(), v)
            })
            .collect();
        let cost = credit
            .estimate_cost(tally::pb::EstimateCostRequest {
                operation: op.name.clone(),
                params,
            })
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", op.name))
            .into_inner();
        assert!(cost.cost >= 1, "{}", op.name);
    }
    app.finish().await;
}
