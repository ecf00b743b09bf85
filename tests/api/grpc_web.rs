//! gRPC-Web on the gRPC port: an HTTP/1.1 request with `content-type:
//! application/grpc-web+proto` (what connect-es's `createGrpcWebTransport` sends from an Edge
//! runtime, a serverless `fetch` or a browser) gets the same answers, auth and errors as gRPC,
//! with `grpc-status` in its trailers; CORS headers only for the configured origins.
use std::collections::HashMap;

use prost::Message;
use tally::pb;

use crate::support::{Backend, TestApp, TestCaller, UNLIMITED, callers};
use crate::{grant_req, reserve_req};

const TOKEN: &str = "tok-web-app";
const CHECK: &str = "/tally.v1.CreditService/CheckBalance";

/// A gRPC-Web answer: its messages and its trailers (the trailer frame, or the headers of a
/// trailers-only answer).
struct Answer {
    messages: Vec<Vec<u8>>,
    trailers: HashMap<String, String>,
}

impl Answer {
    fn status(&self) -> &str {
        self.trailers.get("grpc-status").map_or("", String::as_str)
    }

    fn one<M: Message + Default>(&self) -> M {
        assert_eq!(self.status(), "0", "trailers {:?}", self.trailers);
        assert_eq!(self.messages.len(), 1);
        M::decode(self.messages[0].as_slice()).unwrap()
    }
}

/// Posts one message to `path` (`/tally.v1.CreditService/Reserve`) as gRPC-Web over HTTP/1.1.
async fn call(app: &TestApp, path: &str, message: &impl Message, token: Option<&str>) -> Answer {
    let body = message.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend(u32::try_from(body.len()).unwrap().to_be_bytes());
    framed.extend(body);
    let client = reqwest::Client::builder().http1_only().build().unwrap();
    let mut req = client
        .post(format!("http://{}{path}", app.addr))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(framed);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert_eq!(
        resp.status(),
        200,
        "gRPC-Web answers HTTP 200 and puts the outcome in grpc-status"
    );
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("application/grpc-web"),
        "{content_type}"
    );
    let mut trailers: HashMap<String, String> = resp
        .headers()
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("grpc-"))
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
        .collect();
    let bytes = resp.bytes().await.unwrap();
    let mut left = &bytes[..];
    let mut messages = Vec::new();
    while !left.is_empty() {
        let flag = left[0];
        let len = usize::try_from(u32::from_be_bytes(left[1..5].try_into().unwrap())).unwrap();
        let data = &left[5..5 + len];
        if flag & 0x80 == 0 {
            messages.push(data.to_vec());
        } else {
            for line in std::str::from_utf8(data).unwrap().split("\r\n") {
                if let Some((k, v)) = line.split_once(':') {
                    trailers.insert(k.trim().to_lowercase(), v.trim().to_owned());
                }
            }
        }
        left = &left[5 + len..];
    }
    Answer { messages, trailers }
}

async fn secured(backend: Backend, origins: &[&str]) -> TestApp {
    let origins =
        tally::app::web_origins(&origins.iter().map(|o| (*o).to_owned()).collect::<Vec<_>>())
            .unwrap();
    TestApp::spawn_with(backend, |s| {
        s.grpc_web_origins = origins;
        s.auth = callers(
            &[TestCaller {
                name: "web",
                roles: &["generation", "admin"],
                prefixes: &[],
                token: TOKEN,
                extra: "",
            }],
            UNLIMITED,
        );
    })
    .await
}

async fn grpc_web_gets_real_answers_with_the_same_auth_and_errors(backend: Backend) {
    let app = secured(backend, &[]).await;
    let balance = pb::CheckBalanceRequest {
        account_id: "web:u1".into(),
    };

    // No token, a wrong one: UNAUTHENTICATED (16), as over gRPC.
    assert_eq!(call(&app, CHECK, &balance, None).await.status(), "16");
    assert_eq!(
        call(&app, CHECK, &balance, Some("tok-nobody"))
            .await
            .status(),
        "16"
    );

    // Grant, reserve, commit, and the balance, all over gRPC-Web.
    let g = call(
        &app,
        "/tally.v1.AdminService/Grant",
        &grant_req("web:u1", 100, "web-grant"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(g.one::<pb::GrantResponse>().available, 100);
    let r = call(
        &app,
        "/tally.v1.CreditService/Reserve",
        &reserve_req("web:u1", 30, "web-reserve"),
        Some(TOKEN),
    )
    .await
    .one::<pb::ReserveResponse>();
    let hold = r.hold.unwrap();
    assert_eq!((hold.amount, r.available), (30, 70));
    let c = call(
        &app,
        "/tally.v1.CreditService/Commit",
        &pb::CommitRequest {
            hold_id: hold.hold_id.clone(),
            amount: 25,
            idempotency_key: "web-commit".into(),
        },
        Some(TOKEN),
    )
    .await
    .one::<pb::CommitResponse>();
    assert_eq!(c.available, 75);
    let b = call(&app, CHECK, &balance, Some(TOKEN))
        .await
        .one::<pb::CheckBalanceResponse>();
    assert_eq!((b.available, b.held), (75, 0));

    // A refusal: FAILED_PRECONDITION (9) with its ErrorInfo, which clients decode.
    let short = call(
        &app,
        "/tally.v1.CreditService/Reserve",
        &reserve_req("web:u1", 1_000, "web-short"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(short.status(), "9", "{:?}", short.trailers);
    assert!(short.messages.is_empty());
    // The trailers as tonic reads them (it decodes grpc-status-details-bin).
    let mut headers = http::HeaderMap::new();
    for (k, v) in &short.trailers {
        headers.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let status = tonic::Status::from_header_map(&headers).unwrap();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let info = tonic_types::StatusExt::get_details_error_info(&status).unwrap();
    assert_eq!(info.reason, "INSUFFICIENT_CREDITS");
    assert_eq!(info.metadata["available"], "75");
    app.finish().await;
}

crate::on_both_backends!(grpc_web_gets_real_answers_with_the_same_auth_and_errors);

/// A browser's preflight: answered for a configured origin (without a token), not for another,
/// and not at all when no origin is configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_only_the_configured_origins() {
    let preflight = |app: &TestApp, origin: &str| {
        let url = format!("http://{}/tally.v1.CreditService/CheckBalance", app.addr);
        let origin = origin.to_owned();
        async move {
            reqwest::Client::builder()
                .http1_only()
                .build()
                .unwrap()
                .request(reqwest::Method::OPTIONS, url)
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "authorization,content-type,x-grpc-web",
                )
                .send()
                .await
                .unwrap()
        }
    };
    let app = secured(Backend::Sqlite, &["https://app.example.com"]).await;
    let ok = preflight(&app, "https://app.example.com").await;
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let allowed = ok.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("x-grpc-web"),
        "{allowed}"
    );
    let other = preflight(&app, "https://evil.example").await;
    assert!(other.headers().get("access-control-allow-origin").is_none());
    app.finish().await;

    let closed = secured(Backend::Sqlite, &[]).await;
    let none = preflight(&closed, "https://app.example.com").await;
    assert!(none.headers().get("access-control-allow-origin").is_none());
    closed.finish().await;
}
