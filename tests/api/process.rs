//! The real binary as an operator runs it: start, serve, and stop on SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let p = Process::start(&["--database-url", &db, "--shutdown-grace", "5s"], &[]).await;
    let mut health = HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", p.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let r = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status(), ServingStatus::Serving);
    assert_eq!(
        reqwest::get(format!("http://{}/readyz", p.http))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    // A Watch stream on readiness: SERVING now, NOT_SERVING as soon as shutdown begins.
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    p.sigterm().await;
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the watch hears of the shutdown");
    if let Ok(Some(m)) = next {
        assert_eq!(m.status(), ServingStatus::NotServing);
    } else {
        panic!("the stream ended before NOT_SERVING: {next:?}");
    }
    let log = tokio::time::timeout(Duration::from_secs(20), p.finish())
        .await
        .expect("exits within the grace period");
    assert!(log.iter().any(|l| l.contains("shutting down")), "{log:#?}");
}

/// A started `tally serve` with its stderr collected line by line.
struct Process {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    log: Vec<String>,
    grpc: String,
    http: String,
}

impl Process {
    async fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["serve", "--log-format", "json", "--listen", "127.0.0.1:0"])
            .args([
                "--http-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (mut grpc, mut http, mut log) = (None, None, Vec::new());
        while grpc.is_none() || http.is_none() {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .unwrap()
                .unwrap()
                .unwrap_or_else(|| panic!("exited early: {log:#?}"));
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            let addr = v["fields"]["addr"].as_str().map(str::to_owned);
            match v["fields"]["message"].as_str() {
                Some("tally serving gRPC") => grpc = addr,
                Some(m) if m.starts_with("tally serving HTTP") => http = addr,
                _ => {}
            }
            log.push(line);
        }
        Self {
            child,
            lines,
            log,
            grpc: grpc.unwrap(),
            http: http.unwrap(),
        }
    }

    async fn sigterm(&self) {
        let pid = self.child.id().unwrap().to_string();
        assert!(
            tokio::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .await
                .unwrap()
                .success()
        );
    }

    /// SIGTERM, then the rest of the log; asserts exit 0 within the grace period.
    async fn stop(self) -> Vec<String> {
        self.sigterm().await;
        self.finish().await
    }

    /// The rest of the log once the process exits; asserts exit 0.
    async fn finish(mut self) -> Vec<String> {
        while let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_secs(20), self.lines.next_line()).await
        {
            self.log.push(line);
        }
        let status = self.child.wait().await.unwrap();
        assert_eq!(status.code(), Some(0), "{:#?}", self.log);
        self.log
    }
}

#[derive(Clone, Default)]
struct Collector(
    std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let mut spans = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse::default(),
        ))
    }
}

fn attr(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            V::StringValue(s) => Some(s.clone()),
            V::IntValue(i) => Some(i.to_string()),
            V::BoolValue(b) => Some(b.to_string()),
            _ => None,
        }
    })
}

/// A real process with callers, Stripe secrets and an OTLP collector on loopback: spans of a
/// Reserve arrive with the caller's W3C trace as parent and the RPC attributes; each request
/// logs one line; no token, key or secret appears anywhere in the (debug-level) log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_request_logs_and_no_secrets_in_a_real_process() {
    use tally::pb;
    const TOKEN: &str = "tok_SECRET_caller_5d1c";
    const WRONG: &str = "tok_SECRET_wrong_77aa";
    const STRIPE_KEY: &str = "sk_test_SECRET_stripe_9f3e";
    const WEBHOOK: &str = "whsec_SECRET_webhook_41b0";
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let c = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(
                opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(c),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let dir = tempfile::tempdir().unwrap();
    let callers = dir.path().join("callers.toml");
    std::fs::write(
        &callers,
        format!(
            "[callers.ops]\nroles = [\"generation\", \"admin\", \"billing\"]\ntoken_sha256 = [\"{}\"]\n",
            tally::auth::hash_token(TOKEN)
        ),
    )
    .unwrap();
    let key_file = dir.path().join("stripe-key");
    std::fs::write(&key_file, STRIPE_KEY).unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let endpoint = format!("http://{otlp}");
    let p = Process::start(
        &["--database-url", &db, "--shutdown-grace", "5s"],
        &[
            ("TALLY_CALLERS_FILE", callers.to_str().unwrap()),
            ("TALLY_STRIPE_API_KEY_FILE", key_file.to_str().unwrap()),
            ("TALLY_STRIPE_API_BASE", "http://127.0.0.1:9"),
            ("TALLY_STRIPE_TIMEOUT", "1s"),
            ("TALLY_STRIPE_WEBHOOK_SECRET", WEBHOOK),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_SERVICE_NAME", "tally-test"),
            ("RUST_LOG", "debug"),
        ],
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", p.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let auth = |token: &str| {
        format!("Bearer {token}")
            .parse::<tonic::metadata::MetadataValue<_>>()
            .unwrap()
    };
    let mut admin = tally::pb::admin_service_client::AdminServiceClient::new(channel.clone());
    let mut req = tonic::Request::new(crate::grant_req("u1", 100, "g1"));
    req.metadata_mut().insert("authorization", auth(TOKEN));
    admin.grant(req).await.unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let mut credit = tally::pb::credit_service_client::CreditServiceClient::new(channel);
    let mut req = tonic::Request::new(crate::reserve_req("u1", 10, "r1"));
    req.metadata_mut().insert("authorization", auth(TOKEN));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent}-01").parse().unwrap(),
    );
    credit.reserve(req).await.unwrap();
    let mut req = tonic::Request::new(pb::CheckBalanceRequest {
        account_id: "u1".into(),
    });
    req.metadata_mut().insert("authorization", auth(WRONG));
    assert_eq!(
        credit.check_balance(req).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let http = reqwest::Client::new();
    let r = http
        .post(format!("http://{}/stripe/webhook", p.http))
        .header("stripe-signature", "t=1,v1=00")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Stripe unreachable: a clear 502, and the key is not in it.
    let r = http
        .post(format!("http://{}/v1/checkout/sessions", p.http))
        .bearer_auth(TOKEN)
        .json(
            &serde_json::json!({"account_id": "u1", "pack_id": "starter",
            "success_url": "https://x.example/ok", "cancel_url": "https://x.example/no"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert!(!body.contains("SECRET"), "{body}");

    // The spans arrive (batch delay 100 ms).
    let mut reserve = None;
    for _ in 0..100 {
        reserve = collector
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.name == "tally.v1.CreditService/Reserve" && s.kind == 2)
            .cloned();
        if reserve.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = p.stop().await;
    let reserve = reserve.expect("a SERVER span for the Reserve");
    assert_eq!(hex::encode(&reserve.trace_id), trace_id);
    assert_eq!(hex::encode(&reserve.parent_span_id), parent);
    assert_eq!(attr(&reserve, "rpc.system.name").as_deref(), Some("grpc"));
    assert_eq!(
        attr(&reserve, "rpc.method").as_deref(),
        Some("tally.v1.CreditService/Reserve")
    );
    assert_eq!(
        attr(&reserve, "rpc.response.status_code").as_deref(),
        Some("OK")
    );
    let spans = collector.0.lock().unwrap().clone();
    let exported = format!("{spans:?}");
    assert!(!exported.contains("SECRET"), "no secret in any span");
    assert!(
        spans.iter().any(|s| s.name == "POST /stripe/webhook"
            && attr(s, "http.response.status_code").as_deref() == Some("400")),
        "{:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );

    // One line per request, with the caller, method, code and duration.
    let request_lines: Vec<Value> = log
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "tally::request")
        .collect();
    assert!(
        request_lines.iter().any(|v| v["fields"]["caller"] == "ops"
            && v["fields"]["rpc"] == "tally.v1.CreditService/Reserve"
            && v["fields"]["code"] == "OK"
            && v["fields"]["reason"] == "OK"
            && v["fields"]["trace_id"] == trace_id
            && v["fields"]["duration_ms"].is_number()),
        "with the reason and the trace id: {request_lines:#?}"
    );
    assert!(
        request_lines
            .iter()
            .any(|v| v["fields"]["code"] == "UNAUTHENTICATED"
                && v["fields"]["reason"] == "UNAUTHENTICATED")
    );
    for secret in [TOKEN, WRONG, STRIPE_KEY, WEBHOOK, "SECRET"] {
        assert!(
            !log.iter().any(|l| l.contains(secret)),
            "{secret} leaked into the log: {:#?}",
            log.iter()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
        );
    }
}

/// Without callers, a non-loopback address is refused at start (unless --insecure); a
/// database password never reaches the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_at_start_name_the_option_and_hide_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let run = |args: Vec<String>| async move {
        tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
                .args(args)
                .output(),
        )
        .await
        .unwrap()
        .unwrap()
    };
    let out = run(vec![
        "serve".into(),
        "--listen".into(),
        "0.0.0.0:0".into(),
        "--database-url".into(),
        db.clone(),
    ])
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--listen") && err.contains("--callers-file"),
        "{err}"
    );

    let out = run(vec![
        "serve".into(),
        "--database-url".into(),
        "postgres://tally:pw_SECRET_db_0c1d@127.0.0.1:9/tally".into(),
    ])
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("pw_SECRET"), "{err}");

    let cfg = dir.path().join("tally.toml");
    std::fs::write(&cfg, "db_max_connections = 0\n").unwrap();
    let out = run(vec![
        "serve".into(),
        "--config".into(),
        cfg.display().to_string(),
    ])
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("db-max-connections"), "{err}");
}

/// Text logs carry no colour codes when stderr is not a terminal (a file, a pipe, a log
/// collector).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_without_a_terminal_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--log-format", "text", "--database-url", &db])
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await
    {
        let done = line.contains("serving gRPC");
        seen.push(line);
        if done {
            break;
        }
    }
    assert!(seen.iter().any(|l| l.contains("serving gRPC")), "{seen:#?}");
    assert!(!seen.iter().any(|l| l.contains('\u{1b}')), "{seen:#?}");
    child.kill().await.unwrap();
}
