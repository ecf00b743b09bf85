//! Failures an operator can act on (issue 24): each names what failed and what to do, and none
//! is INTERNAL.

use std::time::Duration;

use tally::app::App;
use tally::pb;

use crate::support::{Backend, TestApp, TestDb, settings};

/// A listener address in use names its option and address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_in_use_names_its_option() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    for (flag, set) in [
        (
            "--listen",
            (|s: &mut tally::app::Settings, a| s.listen = a) as fn(&mut _, _),
        ),
        ("--http-listen", |s, a| s.http_listen = a),
        ("--metrics-listen", |s, a| s.metrics_listen = a),
    ] {
        let db = TestDb::new(Backend::Sqlite).await;
        let mut s = settings(&db);
        set(&mut s, addr);
        let e = App::build(s).await.err().expect("refused").to_string();
        assert!(
            e.contains(flag) && e.contains(&addr.to_string()) && e.contains("in use"),
            "{e}"
        );
    }
}

/// SQLite: a missing directory, a damaged file; each error names the path and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_files_that_cannot_serve_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir/tally.db");
    let db = TestDb::from_url(format!("sqlite://{}", missing.display()));
    let e = App::build(settings(&db))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains(&missing.display().to_string()) && e.contains("directory exists"),
        "{e}"
    );
    let damaged = dir.path().join("damaged.db");
    std::fs::write(&damaged, vec![0x5a; 8192]).unwrap();
    let db = TestDb::from_url(format!("sqlite://{}", damaged.display()));
    let e = App::build(settings(&db))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains(&damaged.display().to_string()) && e.contains("backup"),
        "{e}"
    );
}

/// A database the server may read but not write: not ready, and writes are
/// DATABASE_UNAVAILABLE (retry elsewhere), never INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_sqlite_file_is_not_ready_and_never_internal() {
    let db = TestDb::new(Backend::Sqlite).await;
    let url = db.url.clone();
    let app = TestApp::spawn_on(db).await;
    app.fund("ro", 10).await;
    let db = app.finish().await;
    let ro = TestDb::from_url(format!("{url}?mode=ro"));
    let app = TestApp::spawn_on_with(ro, |s| s.auto_migrate = false).await;
    let mut ready = true;
    for _ in 0..40 {
        let r = reqwest::get(format!("http://{}/readyz", app.http))
            .await
            .unwrap();
        ready = r.status().is_success();
        if !ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!ready, "a read-only database is not ready");
    let mut credit = app.credit().await;
    let e = credit
        .reserve(crate::reserve_req("ro", 1, "r1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert_eq!(crate::reason(&e), "DATABASE_UNAVAILABLE");
    // Reads still answer.
    let b = credit
        .check_balance(pb::CheckBalanceRequest {
            account_id: "ro".into(),
        })
        .await;
    assert!(
        b.as_ref().is_ok_and(|b| b.get_ref().available == 10)
            || b.as_ref()
                .is_err_and(|e| e.code() == tonic::Code::Unavailable),
        "{b:?}"
    );
    drop(db);
}

/// PostgreSQL unreachable at start: the address and the cause, never the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_postgres_names_its_address_and_the_cause() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let db = TestDb::from_url(format!(
        "postgres://tally:pw_SECRET_9f@127.0.0.1:{port}/ledger"
    ));
    let e = App::build(settings(&db))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("refused") && e.contains("ledger"),
        "{e}"
    );
    assert!(!e.contains("pw_SECRET"), "{e}");
}

/// Metrics an operator can alert on: every documented series at 0 from the start, the
/// ErrorInfo reason on request counters, a client that gave up counted as CANCELLED (never
/// INTERNAL), and the process_* series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_say_what_happened_from_the_start() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let scrape = || async {
        reqwest::get(format!("http://{}/metrics", app.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let text = scrape().await;
    for series in [
        "tally_requests_refused_total{reason=\"overloaded\"} 0",
        "tally_clawbacks_total{kind=\"dispute\"} ",
        "tally_ledger_audits_total{result=\"violations\"} ",
        "tally_db_group_fallbacks_total ",
        "tally_sweeper_account_failures_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_cpu_seconds_total ",
    ] {
        assert!(text.contains(series), "{series} missing");
    }
    app.fund("m", 1).await;
    let mut credit = app.credit().await;
    let e = credit
        .reserve(crate::reserve_req("m", 5, "too-much"))
        .await
        .unwrap_err();
    assert_eq!(crate::reason(&e), "INSUFFICIENT_CREDITS");
    // Clients that give up before the server answers.
    for i in 0..20 {
        let mut req = tonic::Request::new(crate::reserve_req("m", 1, &format!("late{i}")));
        req.set_timeout(Duration::from_micros(1));
        let _ = credit.reserve(req).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = scrape().await;
    let line = |needle: &str| {
        text.lines()
            .filter(|l| l.starts_with("tally_rpc_requests_total") && l.contains(needle))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    assert!(line("reason=\"INSUFFICIENT_CREDITS\"") >= 1.0, "{text}");
    assert!(line("code=\"INTERNAL\"") < 0.5, "{text}");
    assert!(
        line("rpc=\"tally.v1.CreditService/Reserve\"") >= 2.0,
        "the late calls are counted as what they were: {text}"
    );
    app.finish().await;
}

/// Corruption deeper in a file than its header: the start-up quick_check finds it and names
/// the file, instead of a READY server answering INTERNAL on the damaged pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_deep_in_a_sqlite_file_is_found_at_start() {
    let db = TestDb::new(Backend::Sqlite).await;
    let url = db.url.clone();
    let app = TestApp::spawn_on(db).await;
    for i in 0..200 {
        app.fund(&format!("deep-{i}"), 10).await;
    }
    let db = app.finish().await;
    let path = url.trim_start_matches("sqlite://").to_owned();
    // Checkpoint the WAL into the file, then damage pages past the first.
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 16 * 4096, "{} bytes", bytes.len());
    for b in &mut bytes[8 * 4096..12 * 4096] {
        *b = 0xa5;
    }
    std::fs::write(&path, bytes).unwrap();
    let e = App::build(settings(&db))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains(&path) && e.contains("backup"), "{e}");
}
