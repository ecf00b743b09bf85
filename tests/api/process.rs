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
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--database-url", &db, "--shutdown-grace", "5s"])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut grpc, mut http) = (None, None);
    let mut log = Vec::new();
    while grpc.is_none() || http.is_none() {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        let addr = v["fields"]["addr"].as_str().map(str::to_owned);
        match v["fields"]["message"].as_str() {
            Some("tally serving gRPC") => grpc = addr,
            Some(m) if m.starts_with("tally serving HTTP") => http = addr,
            _ => {}
        }
        log.push(line);
    }
    let (grpc, http) = (grpc.unwrap(), http.unwrap());
    let mut health = HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{grpc}"))
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
        reqwest::get(format!("http://{http}/readyz"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );

    let pid = child.id().unwrap().to_string();
    let kill = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits within the grace period")
        .unwrap();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(1), lines.next_line()).await
    {
        log.push(line);
    }
    assert_eq!(status.code(), Some(0), "{log:#?}");
    assert!(log.iter().any(|l| l.contains("shutting down")), "{log:#?}");
}
