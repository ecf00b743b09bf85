//! The `tally` binary as a client of a running server.

use std::process::Output;

use serde_json::Value;

use crate::support::{Backend, TestApp};

/// Runs the `tally` binary with `args` as a client of `app` (`TALLY_SERVER`).
pub(crate) async fn tally(app: &TestApp, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"));
    cmd.args(args).env("TALLY_SERVER", app.url());
    cmd.output().await.unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_a_whole_job_and_reports_errors_plainly() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let out = stdout(
        &tally(
            &app,
            &["account", "grant", "user_1", "500", "--reason", "welcome"],
        )
        .await,
    );
    assert!(out.contains("granted 500 to user_1"), "{out}");
    let bal: Value = serde_json::from_str(&stdout(
        &tally(&app, &["balance", "user_1", "--json"]).await,
    ))
    .unwrap();
    assert_eq!(bal["available"], 500);
    let r: Value = serde_json::from_str(&stdout(
        &tally(
            &app,
            &[
                "reserve", "user_1", "40", "--ttl", "10m", "--meta", "job=j1", "--json",
            ],
        )
        .await,
    ))
    .unwrap();
    let hold = r["hold"]["hold_id"].as_str().unwrap().to_owned();
    assert_eq!(
        (
            r["available"].as_i64(),
            r["hold"]["metadata"]["job"].as_str()
        ),
        (Some(460), Some("j1"))
    );
    let holds: Value =
        serde_json::from_str(&stdout(&tally(&app, &["holds", "user_1", "--json"]).await)).unwrap();
    assert_eq!(holds.as_array().unwrap().len(), 1);
    let out = stdout(&tally(&app, &["commit", &hold, "35"]).await);
    assert!(out.contains("committed 35 (released 5"), "{out}");
    let out = stdout(&tally(&app, &["refund", &hold, "--amount", "5"]).await);
    assert!(out.contains("refunded 5"), "{out}");
    let text = stdout(&tally(&app, &["balance", "user_1"]).await);
    assert!(text.contains("available   470"), "{text}");

    let out = stdout(
        &tally(
            &app,
            &[
                "estimate",
                "video_export",
                "--param",
                "seconds=12",
                "--param",
                "resolution=1080p",
            ],
        )
        .await,
    );
    assert!(out.starts_with("36 credits"), "{out}");
    let r: Value = serde_json::from_str(&stdout(
        &tally(
            &app,
            &[
                "reserve",
                "user_1",
                "--operation",
                "image_generation",
                "--param",
                "images=2",
                "--param",
                "complexity=low",
                "--json",
            ],
        )
        .await,
    ))
    .unwrap();
    assert_eq!(r["hold"]["amount"], 2);

    let failed = tally(&app, &["reserve", "user_1", "100000"]).await;
    assert_eq!(failed.status.code(), Some(1));
    let err = String::from_utf8(failed.stderr).unwrap();
    assert!(err.starts_with("error: INSUFFICIENT_CREDITS"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    let failed = tally(&app, &["commit", &hold, "1"]).await;
    assert!(
        String::from_utf8(failed.stderr)
            .unwrap()
            .contains("HOLD_ALREADY_COMMITTED")
    );
    app.finish().await;
}

#[tokio::test]
async fn the_catalog_commands_print_and_check_files() {
    let exe = env!("CARGO_BIN_EXE_tally");
    let default = tokio::process::Command::new(exe)
        .args(["catalog", "print-default"])
        .output()
        .await
        .unwrap();
    assert!(default.status.success());
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("catalog.toml");
    std::fs::write(&good, &default.stdout).unwrap();
    let ok = tokio::process::Command::new(exe)
        .args(["catalog", "check"])
        .arg(&good)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(ok.stdout).unwrap();
    assert!(
        text.starts_with("ok: 3 plans (enterprise, free, pro)"),
        "{text}"
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[plans.free]\nallowance = { amount = -1, period = \"daily\" }\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(exe)
        .args(["catalog", "check"])
        .arg(&bad)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("plans.free.allowance.amount"), "{err}");
}

#[tokio::test]
async fn the_cli_says_plainly_when_no_server_is_running() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["balance", "x", "--server", "http://127.0.0.1:9"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("cannot reach tally at http://127.0.0.1:9"),
        "{err}"
    );
}

/// Issue 22, item 9: a live Stripe key with a catalog that sells placeholder prices refuses to
/// start and names the fields; a test key only warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_key_refuses_a_catalog_of_placeholder_prices() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["stripe", "sync", "someone", "--database-url", &db])
        .args([
            "--stripe-api-key",
            "sk_live_not_a_real_key",
            "--stripe-livemode",
        ])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--stripe-livemode") && err.contains("packs.starter.stripe_price_id"),
        "{err}"
    );
    assert!(
        !err.contains("sk_live_not_a_real_key"),
        "the key never reaches errors"
    );
}
