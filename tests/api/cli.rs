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

/// Issue 24, the CLI in scripts: a closed pipe ends quietly, `--json` errors are JSON on
/// stderr, the documented reason for a too-large request, `host:port` without a scheme, an
/// unknown scheme and an HTTP port named, client help without server options.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_is_safe_in_scripts() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    for i in 0..30 {
        let out = tally(
            &app,
            &[
                "account",
                "grant",
                "piped",
                "1",
                "--reason",
                &format!("r{i}"),
            ],
        )
        .await;
        assert!(out.status.success());
    }
    // `tally entries piped | head -0`: the reader is gone before the output.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["entries", "piped"])
        .env("TALLY_SERVER", app.url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // --json: the error is a JSON object on stderr, exit 1.
    let out = tally(&app, &["reserve", "piped", "1000", "--json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let e: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(
        (e["code"].as_str(), e["reason"].as_str()),
        (Some("FAILED_PRECONDITION"), Some("INSUFFICIENT_CREDITS"))
    );
    assert_eq!(e["metadata"]["available"], "30");

    // A 20 KB metadata value: the request is too large, named as the README spells it.
    let big = format!("k={}", "x".repeat(20_000));
    let out = tally(&app, &["reserve", "piped", "1", "--meta", &big]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("OUT_OF_RANGE"), "{err}");

    // host:port without a scheme is plaintext HTTP/2; ftp:// is named.
    let bare = app.url().trim_start_matches("http://").to_owned();
    let out = tally(&app, &["balance", "piped", "--server", &bare]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tally(
        &app,
        &["balance", "piped", "--server", "ftp://127.0.0.1:21"],
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ftp:// is not Tally's protocol"), "{err}");
    // The HTTP sidecar's port: said plainly.
    let http = format!("http://{}", app.http);
    let out = tally(&app, &["balance", "piped", "--server", &http]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("speaks HTTP, not Tally's gRPC"), "{err}");

    // Client commands list client options only.
    let out = tally(&app, &["entries", "--help"]).await;
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--server") && !help.contains("--log-format"),
        "{help}"
    );
    app.finish().await;
}

/// Every `tally ...` example in the help texts runs as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_in_help_texts_run() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.fund("u1", 100).await;
    let mut ran = 0;
    for path in [vec!["account"], vec!["account", "adjust"], vec!["serve"]] {
        let mut args = path.clone();
        args.push("--help");
        let help = String::from_utf8(tally(&app, &args).await.stdout).unwrap();
        for example in help.split('`').skip(1).step_by(2) {
            let Some(rest) = example.strip_prefix("tally ") else {
                continue;
            };
            // Split like a shell: double quotes group words.
            let words: Vec<String> = rest
                .split('"')
                .enumerate()
                .flat_map(|(i, part)| {
                    if i % 2 == 1 {
                        vec![part.to_owned()]
                    } else {
                        part.split_whitespace().map(str::to_owned).collect()
                    }
                })
                .collect();
            let words: Vec<&str> = words.iter().map(String::as_str).collect();
            let out = tally(&app, &words).await;
            assert!(
                out.status.success(),
                "`{example}` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            ran += 1;
        }
    }
    assert!(ran >= 2, "examples found: {ran}");
    app.finish().await;
}

/// A rate-limited call waits as the server's RetryInfo says and is sent again with the same
/// key, as `tally::client` does: quick successive grants all succeed, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_waits_out_a_rate_limit() {
    const TOKEN: &str = "ops-token-for-the-rate-limit-test";
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.auth = crate::support::callers(
            &[crate::support::TestCaller {
                name: "ops",
                roles: &["admin", "generation"],
                prefixes: &[],
                token: TOKEN,
                extra: "",
            }],
            tally::auth::RateLimits {
                sensitive: tally::auth::Rate {
                    per_second: 4,
                    burst: 1,
                },
                ..crate::support::UNLIMITED
            },
        );
    })
    .await;
    for i in 0..6 {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["account", "grant", "limited", "10", "--reason", "batch"])
            .args(["--idempotency-key", &format!("batch-{i}"), "--token", TOKEN])
            .env("TALLY_SERVER", app.url())
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "grant {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let b = app
        .store
        .balance(&tally::domain::AccountId::parse("a", "limited").unwrap())
        .await
        .unwrap();
    assert_eq!(b.available, 60, "each grant once");
    app.finish().await;
}
