//! `tally bench` against a real server: what it reports is what the ledger holds afterwards.

use std::process::Output;

use serde_json::Value;
use tally::domain::HoldState;

use crate::support::{Backend, TestApp, holds_of};

/// `tally bench --prefix b ARGS` against `app` (the CLI tests' runner), which must succeed.
async fn bench(app: &TestApp, args: &[&str]) -> Output {
    let o = crate::cli::tally(app, &[&["bench", "--prefix", "b"], args].concat()).await;
    assert!(
        o.status.success(),
        "tally bench failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap()
}

fn ordered(l: &Value) {
    let (p50, p90, p99, max) = (
        l["p50"].as_f64().unwrap(),
        l["p90"].as_f64().unwrap(),
        l["p99"].as_f64().unwrap(),
        l["max"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= max, "{l}");
}

/// Every pair the report counts is one committed hold of 4 in the ledger, and no more: a
/// benchmark that miscounted (or skipped a write) would show here.
async fn a_counted_run_reports_what_the_ledger_holds(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let r = json(
        &bench(
            &app,
            &[
                "--workload",
                "reserve-commit",
                "--clients",
                "6",
                "--connections",
                "2",
                "--accounts",
                "3",
                "--count",
                "150",
                "--warmup",
                "0s",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(
        (
            r["workload"].as_str(),
            r["unit"].as_str(),
            r["accounts"].as_u64()
        ),
        (Some("reserve-commit"), Some("pairs"), Some(3))
    );
    assert_eq!(r["errors"], serde_json::json!({}));
    let ops = r["ops"].as_u64().unwrap();
    // Clients stop at the count; the ones with a pair in flight finish it.
    assert!((150..150 + 6).contains(&ops), "{r}");
    assert!(r["ops_per_s"].as_f64().unwrap() > 0.0);
    ordered(&r["latency_ms"]);
    ordered(&r["rpc_latency_ms"]["Reserve"]);
    ordered(&r["rpc_latency_ms"]["Commit"]);

    let mut committed = 0;
    for i in 0..3 {
        let holds = holds_of(&app.store, &format!("b-{i}")).await;
        assert!(
            holds
                .iter()
                .all(|h| h.state == HoldState::Committed && h.committed_amount == 4)
        );
        committed += holds.len() as u64;
    }
    assert_eq!(committed, ops, "one committed hold per reported pair");

    // The accounts exist now: a hot reserve-refund run without setup leaves no credits moved.
    let r = json(
        &bench(
            &app,
            &[
                "--workload",
                "reserve-refund",
                "--hot",
                "--no-setup",
                "--clients",
                "4",
                "--count",
                "40",
                "--warmup",
                "0s",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(
        (r["hot"].as_bool(), r["accounts"].as_u64()),
        (Some(true), Some(1))
    );
    let refunded = r["ops"].as_u64().unwrap();
    let holds = holds_of(&app.store, "b-0").await;
    let released = holds
        .iter()
        .filter(|h| h.state == HoldState::Released)
        .count() as u64;
    assert_eq!(released, refunded);
    app.finish().await;
}

/// Text mode: a progress line each second while it runs, then the report; a refusal is
/// counted under its code, not hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_mode_shows_progress_and_counts_errors_by_code() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    // Accounts never funded (--no-setup): every Reserve is refused for want of credits.
    let o = bench(
        &app,
        &[
            "--workload",
            "reserve-commit",
            "--clients",
            "2",
            "--accounts",
            "2",
            "--no-setup",
            "--duration",
            "1500ms",
            "--warmup",
            "0s",
        ],
    )
    .await;
    let (out, err) = (
        String::from_utf8(o.stdout).unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    );
    assert!(
        err.contains("ops/s") && err.contains(" errors  max "),
        "{err}"
    );
    assert!(out.contains("reserve-commit x2 on 2 account(s)"), "{out}");
    assert!(out.contains("latency ms  p50"), "{out}");
    // Accounts that were never opened or funded: NOT_FOUND or FAILED_PRECONDITION, by name.
    assert!(
        out.contains("errors      {\"NotFound\": ")
            || out.contains("errors      {\"FailedPrecondition\": "),
        "{out}"
    );
    app.fund("b-0", 10).await;
    app.fund("b-1", 10).await;
    let check = json(
        &bench(
            &app,
            &[
                "--workload",
                "check-balance",
                "--accounts",
                "2",
                "--clients",
                "2",
                "--count",
                "20",
                "--warmup",
                "0s",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(check["unit"].as_str(), Some("calls"));
    assert!(check["rpc_latency_ms"]["CheckBalance"].is_object());
    assert!(check["ops"].as_u64().unwrap() >= 20);
    app.finish().await;
}

crate::on_both_backends!(a_counted_run_reports_what_the_ledger_holds);
