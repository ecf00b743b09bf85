//! The tower layer in front of every gRPC service: authentication, roles, rate limits, the
//! concurrency limit (load shedding), and per-call telemetry (a SERVER span with W3C parent,
//! metrics, one log line).
//!
//! Order, so that a refused call costs almost nothing and writes nothing: classify the path →
//! authenticate → check the role → take from the rate budget → take a concurrency permit →
//! handler. Health is open (kubelet probes carry no token) and neither limited nor counted
//! against callers. Refusals are answered here, before the request body is read.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};
use tracing::{Instrument as _, debug, field::Empty, info, info_span};

use super::status::ERROR_DOMAIN;
use crate::auth::{Auth, Denied, Principal, Role};

/// Tally's own methods, read from the compiled proto descriptors (`pb::FILE_DESCRIPTOR_SET`):
/// a new RPC in `proto/` is classified (role, rate tier, metric label) without a list to keep.
fn tally_methods() -> Vec<(String, String)> {
    use prost::Message as _;
    prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET)
        .map(|set| {
            set.file
                .iter()
                .flat_map(|f| {
                    let package = f.package().to_owned();
                    f.service.iter().flat_map(move |svc| {
                        let service = format!("{package}.{}", svc.name());
                        svc.method
                            .iter()
                            .map(move |m| (service.clone(), m.name().to_owned()))
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Retry delay suggested when the server sheds load.
pub const OVERLOAD_RETRY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Credit,
    Admin,
    Health,
    Reflection,
    Unknown,
}

fn classify(path: &str) -> (Kind, &'static str) {
    static KNOWN: std::sync::OnceLock<HashMap<String, (Kind, &'static str)>> =
        std::sync::OnceLock::new();
    let known = KNOWN.get_or_init(|| {
        let mut m = HashMap::new();
        let mut add = |service: &str, methods: &[&str], kind: Kind| {
            for method in methods {
                let name: &'static str = Box::leak(format!("{service}/{method}").into_boxed_str());
                m.insert(format!("/{name}"), (kind, name));
            }
        };
        for (service, method) in tally_methods() {
            let kind = match service.as_str() {
                "tally.v1.CreditService" => Kind::Credit,
                "tally.v1.AdminService" => Kind::Admin,
                // A service without a role of its own would be open to any caller: refuse it
                // until it has one.
                _ => continue,
            };
            add(&service, &[method.as_str()], kind);
        }
        add("grpc.health.v1.Health", &["Check", "Watch"], Kind::Health);
        add(
            "grpc.reflection.v1.ServerReflection",
            &["ServerReflectionInfo"],
            Kind::Reflection,
        );
        add(
            "grpc.reflection.v1alpha.ServerReflection",
            &["ServerReflectionInfo"],
            Kind::Reflection,
        );
        m
    });
    // Unknown methods share one label, so a scanner cannot grow the metric's label set.
    known
        .get(path)
        .copied()
        .unwrap_or((Kind::Unknown, "_OTHER"))
}

/// The status of a refusal, with ErrorInfo (and RetryInfo where waiting helps).
#[must_use]
pub fn denied_status(d: &Denied) -> Status {
    let (code, reason, retry) = match d {
        Denied::Unauthenticated => (Code::Unauthenticated, "UNAUTHENTICATED", None),
        Denied::Role(_) | Denied::Account => (Code::PermissionDenied, "PERMISSION_DENIED", None),
        Denied::RateLimited(wait) => (Code::ResourceExhausted, "RATE_LIMITED", Some(*wait)),
    };
    let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new());
    if let Some(wait) = retry {
        details.set_retry_info(Some(wait.max(Duration::from_millis(1))));
    }
    Status::with_error_details(code, d.to_string(), details)
}

fn overloaded(wait: Duration) -> Status {
    let mut details = ErrorDetails::with_error_info("OVERLOADED", ERROR_DOMAIN, HashMap::new());
    details.set_retry_info(Some(wait));
    Status::with_error_details(
        Code::Unavailable,
        "the server is at its concurrency limit; retry shortly with the same idempotency key",
        details,
    )
}

/// Shared by every connection.
pub struct GateState {
    auth: Arc<Auth>,
    permits: Arc<Semaphore>,
    /// The adaptive limit on CreditService calls ([`super::limit`]), when on.
    limit: Option<Arc<super::limit::AdaptiveLimit>>,
    readiness: crate::health::Readiness,
    /// The listener's port (a span attribute).
    port: u16,
}

impl GateState {
    /// `max_in_flight` calls at once over all connections (health excluded). While
    /// `readiness` knows the database is unreachable, calls that need it fail at once with
    /// UNAVAILABLE instead of waiting for a connection.
    #[must_use]
    pub fn new(
        auth: Arc<Auth>,
        max_in_flight: usize,
        readiness: crate::health::Readiness,
        port: u16,
    ) -> Self {
        Self {
            auth,
            permits: Arc::new(Semaphore::new(max_in_flight)),
            limit: None,
            readiness,
            port,
        }
    }

    /// Adds the adaptive limit on CreditService calls, aiming at a mean latency of `target`
    /// (zero: none, only the fixed cap).
    #[must_use]
    pub fn with_latency_target(mut self, target: Duration) -> Self {
        self.limit = (!target.is_zero()).then(|| {
            Arc::new(super::limit::AdaptiveLimit::new(
                target,
                self.permits.available_permits(),
            ))
        });
        self
    }
}

/// Calls that finish work an admitted Reserve began: never refused by the adaptive limit.
fn finishes_work(rpc: &str) -> bool {
    rpc.strip_prefix("tally.v1.CreditService/")
        .is_some_and(|m| matches!(m, "Commit" | "Refund" | "ExtendHold"))
}

fn database_down() -> Status {
    let mut details =
        ErrorDetails::with_error_info("DATABASE_UNAVAILABLE", ERROR_DOMAIN, HashMap::new());
    details.set_retry_info(Some(Duration::from_millis(200)));
    Status::with_error_details(
        Code::Unavailable,
        "the database is unavailable; retry with the same idempotency key",
        details,
    )
}

/// The layer (`Server::builder().layer(GateLayer::new(..))`).
#[derive(Clone)]
pub struct GateLayer(Arc<GateState>);

impl GateLayer {
    /// A layer over `state`.
    #[must_use]
    pub fn new(state: GateState) -> Self {
        Self(Arc::new(state))
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            state: Arc::clone(&self.0),
        }
    }
}

/// The service the layer makes.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    state: Arc<GateState>,
}

fn refuse(reason: &'static str, d: &Denied) -> Status {
    metrics::counter!("tally_requests_refused_total", "reason" => reason).increment(1);
    denied_status(d)
}

/// Decides whether a call may go on: its caller and, unless it is a health check, a permit.
fn admit(
    state: &GateState,
    kind: Kind,
    headers: &http::HeaderMap,
) -> Result<(Option<Arc<Principal>>, Option<OwnedSemaphorePermit>), Status> {
    if kind == Kind::Health {
        return Ok((None, None));
    }
    let principal = state
        .auth
        .authenticate(
            headers
                .get(http::header::AUTHORIZATION)
                .map(http::HeaderValue::as_bytes),
        )
        .map_err(|d| refuse("unauthenticated", &d))?;
    let role = match kind {
        Kind::Credit => Some(Role::Generation),
        Kind::Admin => Some(Role::Admin),
        Kind::Health | Kind::Reflection | Kind::Unknown => None,
    };
    if let Some(role) = role {
        principal
            .require(role)
            .map_err(|d| refuse("permission", &d))?;
    }
    principal
        .admit(kind == Kind::Admin)
        .map_err(|d| refuse("rate_limited", &d))?;
    if kind == Kind::Unknown {
        // Answered here so that it, too, carries ErrorInfo.
        return Err(Status::with_error_details(
            Code::Unimplemented,
            "no such method",
            ErrorDetails::with_error_info("UNIMPLEMENTED", ERROR_DOMAIN, HashMap::new()),
        ));
    }
    if matches!(kind, Kind::Credit | Kind::Admin) && !state.readiness.database() {
        metrics::counter!("tally_requests_refused_total", "reason" => "database_down").increment(1);
        return Err(database_down());
    }
    let permit = Arc::clone(&state.permits)
        .try_acquire_owned()
        .map_err(|_| {
            metrics::counter!("tally_requests_refused_total", "reason" => "overloaded")
                .increment(1);
            overloaded(OVERLOAD_RETRY)
        })?;
    Ok((Some(principal), Some(permit)))
}

fn code_of(resp: &http::Response<Body>) -> Code {
    // Unary errors are trailers-only responses: the status is in the headers. A response
    // without one is a success whose status follows in the trailers.
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

/// The name of a gRPC code as the spec spells it (`OUT_OF_RANGE`).
#[must_use]
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Server-side failures: the codes that mark a span as an error (client mistakes do not).
fn is_server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// Every `ErrorInfo.reason` Tally sends: the bounded set the `reason` label takes (anything
/// else, e.g. a status tonic made itself, is `OTHER`; a success is `OK`).
pub const REASONS: &[&str] = &[
    "INVALID_ARGUMENT",
    "ACCOUNT_NOT_FOUND",
    "HOLD_NOT_FOUND",
    "IDEMPOTENCY_KEY_REUSED",
    "ACCOUNT_EXISTS",
    "INSUFFICIENT_CREDITS",
    "HOLD_ALREADY_COMMITTED",
    "HOLD_RELEASED",
    "HOLD_EXPIRED",
    "HOLD_NOT_COMMITTED",
    "REFUND_EXCEEDS_CHARGE",
    "BALANCE_LIMIT_EXCEEDED",
    "CONCURRENT_MODIFICATION",
    "DATABASE_UNAVAILABLE",
    "OUTCOME_UNKNOWN",
    "INTERNAL",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "RATE_LIMITED",
    "OVERLOADED",
    "UNIMPLEMENTED",
    "CLIENT_GAVE_UP",
    "TOO_MANY_STREAMS",
    "SHUTTING_DOWN",
];

/// The ErrorInfo reason of an error response, within [`REASONS`].
fn reason_of(resp: &http::Response<Body>) -> &'static str {
    use tonic_types::StatusExt as _;
    tonic::Status::from_header_map(resp.headers())
        .and_then(|s| s.get_details_error_info())
        .and_then(|i| REASONS.iter().copied().find(|r| *r == i.reason))
        .unwrap_or("OTHER")
}

/// The trace id of the span's OpenTelemetry context, when traces are exported.
fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = span.context();
    let id = context.span().span_context().trace_id();
    (id != opentelemetry::trace::TraceId::INVALID).then(|| id.to_string())
}

fn finish(
    span: &tracing::Span,
    rpc: &'static str,
    kind: Kind,
    caller: &str,
    (code, reason): (Code, &'static str),
    start: Instant,
) {
    let elapsed = start.elapsed();
    let name = code_name(code);
    span.record("rpc.response.status_code", name);
    if is_server_error(code) {
        span.record("otel.status_code", "ERROR");
        span.record("error.type", name);
    }
    metrics::counter!("tally_rpc_requests_total", "rpc" => rpc, "code" => name, "reason" => reason)
        .increment(1);
    metrics::histogram!("tally_rpc_request_duration_seconds", "rpc" => rpc, "code" => name)
        .record(elapsed.as_secs_f64());
    let ms = elapsed.as_secs_f64() * 1000.0;
    // Field values are evaluated only when the line is logged (health checks are debug).
    if kind == Kind::Health {
        debug!(target: "tally::request", rpc, code = name, reason, duration_ms = ms,
               trace_id = trace_id(span).unwrap_or_default(), "grpc request");
    } else {
        info!(target: "tally::request", caller, rpc, code = name, reason, duration_ms = ms,
              trace_id = trace_id(span).unwrap_or_default(), "grpc request");
    }
}

/// tonic answers INTERNAL "Missing request message." when a call's stream ends before its
/// message arrived: the client gave up (its deadline passed, it reset the stream) or is broken.
/// Neither is a bug in Tally, which INTERNAL is kept for: that call is CANCELLED with reason
/// `CLIENT_GAVE_UP`, and counted so.
fn gave_up_is_not_internal(resp: http::Response<Body>) -> http::Response<Body> {
    let missing = code_of(&resp) == Code::Internal
        && resp
            .headers()
            .get("grpc-message")
            .is_some_and(|m| m.as_bytes() == b"Missing%20request%20message.");
    if !missing {
        return resp;
    }
    Status::with_error_details(
        Code::Cancelled,
        "the call ended before its request message arrived (the client gave up or reset the stream)",
        ErrorDetails::with_error_info("CLIENT_GAVE_UP", ERROR_DOMAIN, HashMap::new()),
    )
    .into_http()
}

/// Counts and logs a call whose future was dropped before it ended — the client gave up (its
/// deadline passed, or it reset the stream) — as CANCELLED, which is what it is.
struct Unfinished {
    span: tracing::Span,
    rpc: &'static str,
    kind: Kind,
    caller: String,
    start: Instant,
    armed: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if self.armed {
            finish(
                &self.span,
                self.rpc,
                self.kind,
                &self.caller,
                (Code::Cancelled, "CLIENT_GAVE_UP"),
                self.start,
            );
        }
    }
}

/// Most of a refused request's body read before answering: 64 KiB (a valid request is at most
/// 16 KiB), for at most 1 s.
pub const REFUSED_BODY_DRAIN_BYTES: usize = 64 * 1024;
const REFUSED_BODY_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads and drops a refused request's body, within [`REFUSED_BODY_DRAIN_BYTES`] and
/// [`REFUSED_BODY_DRAIN_TIME`].
async fn drain(mut body: Body) {
    use http_body::Body as _;
    let read = async {
        let mut seen = 0usize;
        while let Some(frame) =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
        {
            let Ok(frame) = frame else { return };
            seen = seen.saturating_add(frame.data_ref().map_or(0, axum::body::Bytes::len));
            if seen > REFUSED_BODY_DRAIN_BYTES {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(REFUSED_BODY_DRAIN_TIME, read).await;
}

impl<S> Service<http::Request<Body>> for Gate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let start = Instant::now();
        let (kind, rpc) = classify(req.uri().path());
        let span = info_span!(
            target: "tally::grpc",
            "grpc",
            otel.name = rpc,
            otel.kind = "server",
            otel.status_code = Empty,
            "rpc.system.name" = "grpc",
            "rpc.method" = rpc,
            "rpc.response.status_code" = Empty,
            "error.type" = Empty,
            "server.port" = self.state.port,
            "tally.caller" = Empty,
        );
        crate::telemetry::adopt_parent(&span, req.headers());
        let admitted = admit(&self.state, kind, req.headers()).and_then(|(principal, permit)| {
            let in_flight = match (&self.state.limit, kind) {
                (Some(limit), Kind::Credit) => {
                    Some(limit.admit(!finishes_work(rpc)).map_err(|wait| {
                        metrics::counter!("tally_requests_refused_total", "reason" => "overloaded")
                            .increment(1);
                        overloaded(wait)
                    })?)
                }
                _ => None,
            };
            Ok((principal, (permit, in_flight)))
        });
        let (principal, permit) = match admitted {
            Ok(admitted) => admitted,
            Err(status) => {
                let resp = status.into_http();
                finish(
                    &span,
                    rpc,
                    kind,
                    "-",
                    (code_of(&resp), reason_of(&resp)),
                    start,
                );
                // Read what the client is still sending first: over HTTP/1.1 (gRPC-Web), an
                // answer before the body was read makes the server close the connection while
                // the client writes, and the client sees a broken pipe instead of the refusal.
                return Box::pin(async move {
                    drain(req.into_body()).await;
                    Ok(resp)
                });
            }
        };
        let caller = principal
            .as_ref()
            .map_or_else(|| "-".to_owned(), |p| p.caller.as_str().to_owned());
        span.record("tally.caller", caller.as_str());
        if let Some(p) = principal {
            req.extensions_mut().insert(p.caller.clone());
            req.extensions_mut().insert(p);
        }
        // Take the service that was driven to readiness; leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let mut pending = Unfinished {
                span: span.clone(),
                rpc,
                kind,
                caller,
                start,
                armed: true,
            };
            let result = inner.call(req).instrument(span.clone()).await;
            pending.armed = false;
            drop(permit);
            let result = result.map(gave_up_is_not_internal);
            let outcome = match &result {
                Ok(resp) => match code_of(resp) {
                    Code::Ok => (Code::Ok, "OK"),
                    code => (code, reason_of(resp)),
                },
                // The routes never fail (their error type is Infallible in practice).
                Err(_) => (Code::Internal, "INTERNAL"),
            };
            finish(&span, rpc, kind, &pending.caller, outcome, start);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_a_bounded_set_of_labels() {
        assert_eq!(
            classify("/tally.v1.CreditService/Reserve"),
            (Kind::Credit, "tally.v1.CreditService/Reserve")
        );
        assert_eq!(classify("/tally.v1.AdminService/Grant").0, Kind::Admin);
        assert_eq!(classify("/grpc.health.v1.Health/Check").0, Kind::Health);
        assert_eq!(
            classify("/tally.v1.CreditService/Nope"),
            (Kind::Unknown, "_OTHER")
        );
        assert_eq!(classify("/x"), (Kind::Unknown, "_OTHER"));
    }

    /// Every method of Tally's services is reachable: classified from the descriptors, never
    /// `_OTHER` (which answers UNIMPLEMENTED).
    #[test]
    fn every_rpc_in_the_proto_is_reachable() {
        let methods = tally_methods();
        assert!(methods.len() >= 17, "{methods:?}");
        for (service, method) in methods {
            let (kind, label) = classify(&format!("/{service}/{method}"));
            assert!(
                matches!(kind, Kind::Credit | Kind::Admin),
                "{service}/{method} is {kind:?}"
            );
            assert_eq!(label, format!("{service}/{method}"));
        }
    }

    /// The proto's `ErrorReason` enum is the set of reasons the server sends, both ways: a
    /// client decoding ErrorInfo by it never meets a reason it does not know.
    #[test]
    fn the_proto_names_every_reason_the_server_sends() {
        let in_proto: std::collections::BTreeSet<&str> = (1..1_000)
            .filter_map(|n| crate::pb::ErrorReason::try_from(n).ok())
            .map(|r| r.as_str_name())
            .collect();
        let sent: std::collections::BTreeSet<&str> = REASONS.iter().copied().collect();
        assert_eq!(in_proto, sent);
    }
}
