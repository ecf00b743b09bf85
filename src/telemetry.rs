//! Logs, traces and metrics.
//!
//! - Logs: `tracing` to stderr, text or JSON (`--log-format`), filtered by `RUST_LOG`
//!   (default `info`). One line per request (target `tally::request`): caller, method, code,
//!   duration.
//! - Traces: OpenTelemetry over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the SDK
//!   also reads `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_BSP_*`). W3C trace
//!   context (`traceparent`) is taken from incoming gRPC metadata and HTTP headers. Span names
//!   and attributes follow the OpenTelemetry RPC semantic conventions in their current
//!   (post-v1.37, release-candidate) form — `rpc.system.name`, fully qualified `rpc.method`,
//!   string `rpc.response.status_code` — and the stable HTTP conventions (`{method} {route}`,
//!   `http.request.method`, `http.route`, `http.response.status_code`).
//! - Metrics: Prometheus text on `/metrics` (see [`describe`] for every name). Labels never
//!   carry account ids, hold ids, keys or tokens.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Histogram buckets of every `_seconds` metric: 0.5 ms to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Keeps the trace exporter alive; dropping it flushes and stops it.
pub struct TelemetryGuard(Option<SdkTracerProvider>);

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs logging (and OTLP trace export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set).
/// Call once, inside the Tokio runtime.
///
/// # Errors
/// When the OTLP exporter cannot be built from the environment.
pub fn init(log_format: &str) -> Result<TelemetryGuard, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal, and never with NO_COLOR set (https://no-color.org).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = if log_format == "json" {
        fmt.json().with_current_span(false).boxed()
    } else {
        fmt.boxed()
    };
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty());
    let Some(_) = endpoint else {
        tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .init();
        return Ok(TelemetryGuard(None));
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT: {e}"))?;
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "tally".into());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    // Only Tally's own spans are exported (not those of libraries).
    let spans =
        tracing_subscriber::filter::Targets::new().with_target("tally", tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("tally"))
                .with_filter(spans),
        )
        .init();
    Ok(TelemetryGuard(Some(provider)))
}

/// Reads W3C trace context from HTTP headers (gRPC metadata are HTTP/2 headers).
pub struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Makes `span` a child of the trace context in `headers`, if any.
pub fn adopt_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(cx);
}

/// Histogram buckets of `tally_db_group_commands`: commands per group transaction.
pub const GROUP_BUCKETS: [f64; 7] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = || {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("tally_db_group_commands".into()),
                        &GROUP_BUCKETS,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new())
        };
        let handle = builder()
            .install_recorder()
            .unwrap_or_else(|_| builder().build_recorder().handle());
        describe();
        handle
    })
}

/// Every metric Tally exports, with its help text.
#[allow(clippy::too_many_lines)] // one description per metric
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "tally_rpc_requests_total",
        "gRPC calls by method (rpc) and status code (code)."
    );
    describe_histogram!(
        "tally_db_group_commands",
        "Job-path commands (Reserve, Commit, Refund, ExtendHold) per group transaction."
    );
    describe_histogram!(
        "tally_db_group_wait_seconds",
        Unit::Seconds,
        "How long a job-path command waited in the queue for a group worker."
    );
    describe_histogram!(
        "tally_db_group_duration_seconds",
        Unit::Seconds,
        "One group transaction, from a worker taking its commands to their answers (with any \
         retry or one-by-one fallback). The rate of its sum over --db-group-workers is the \
         workers' busy share."
    );
    describe_counter!(
        "tally_db_group_retries_total",
        "Group transactions run once more after contention (a deadlock, or a key recorded by \
         another transaction meanwhile)."
    );
    describe_counter!(
        "tally_db_group_fallbacks_total",
        "Group transactions that failed as a whole; their commands then ran one by one."
    );
    describe_counter!(
        "tally_db_group_reloads_total",
        "PostgreSQL group transactions that loaded their accounts again: another transaction \
         changed one while the group waited for its lock."
    );
    describe_counter!(
        "tally_events_created_total",
        "Outbound events by type, counted at their first attempt."
    );
    describe_counter!(
        "tally_events_delivered_total",
        "Outbound events an endpoint answered 2xx to, by type and endpoint."
    );
    describe_counter!(
        "tally_events_failed_total",
        "Outbound events whose retry schedule is spent, by type and endpoint."
    );
    describe_counter!(
        "tally_event_attempts_total",
        "Delivery attempts by endpoint and outcome (delivered, retry, failed, gone)."
    );
    describe_histogram!(
        "tally_event_delivery_latency_seconds",
        Unit::Seconds,
        "From the change's commit to the 2xx of its event."
    );
    describe_gauge!(
        "tally_events_pending",
        "Outbound event deliveries not yet delivered (configured endpoints)."
    );
    describe_gauge!(
        "tally_events_failed",
        "Outbound event deliveries whose schedule is spent, kept until retention."
    );
    describe_gauge!(
        "tally_events_oldest_pending_age_seconds",
        "Age of the oldest undelivered event: the alert to page on."
    );
    describe_gauge!(
        "tally_event_endpoints_disabled",
        "Configured event endpoints a 410 Gone disabled."
    );
    describe_gauge!(
        "tally_watch_streams",
        "Live balance streams open (WatchBalance and SSE) on this replica."
    );
    describe_gauge!(
        "tally_watch_accounts",
        "Accounts with at least one live balance stream on this replica."
    );
    describe_counter!(
        "tally_watch_messages_total",
        "Balances sent on live balance streams."
    );
    describe_histogram!(
        "tally_watch_lag_seconds",
        Unit::Seconds,
        "From a change's notification reaching this replica to its balance sent on a stream."
    );
    describe_counter!(
        "tally_watch_resyncs_total",
        "Times every watched account was read again (the listening connection came back, or this replica fell behind its feed)."
    );
    describe_counter!(
        "tally_watch_reconnects_total",
        "Times the PostgreSQL listening connection was lost and made again."
    );
    describe_counter!(
        "tally_watch_read_failures_total",
        "Reads of a watched balance that failed (retried every 500 ms; streams keep the last balance)."
    );
    describe_histogram!(
        "tally_rpc_request_duration_seconds",
        Unit::Seconds,
        "gRPC call duration by method and code."
    );
    describe_counter!(
        "tally_http_requests_total",
        "HTTP requests by route template, method and status."
    );
    describe_histogram!(
        "tally_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request duration by route template, method and status."
    );
    describe_gauge!(
        "tally_holds_open",
        "Holds in state open (some may be past expiry and not yet swept)."
    );
    describe_counter!(
        "tally_hold_expirations_total",
        "Expiry entries written by the sweeper (holds and grants)."
    );
    describe_counter!(
        "tally_sweeper_account_failures_total",
        "Accounts the sweeper could not settle (logged with the account; the pass goes on)."
    );
    describe_counter!(
        "tally_webhook_events_total",
        "Stripe webhook deliveries by event type and result."
    );
    describe_counter!(
        "tally_grants_total",
        "Grants made through the API and Stripe, by source."
    );
    describe_counter!(
        "tally_credits_granted_total",
        "Credits granted through the API and Stripe, by source."
    );
    describe_counter!(
        "tally_clawbacks_total",
        "Stripe claw-backs applied, by kind (refund, dispute, purchase: one that arrived before its purchase)."
    );
    describe_counter!(
        "tally_credits_clawed_total",
        "Credits taken back by Stripe refunds and disputes, by kind."
    );
    describe_gauge!(
        "tally_db_pool_connections",
        "Database pool connections by state (idle, in_use)."
    );
    describe_gauge!(
        "tally_db_pool_max_connections",
        "The database pool's maximum size."
    );
    describe_counter!(
        "tally_ledger_invariant_violations_total",
        "Accounts whose entries, grants, balance or holds disagreed in a reconciliation (must stay 0)."
    );
    describe_counter!(
        "tally_ledger_audits_total",
        "Reconciliation passes by result (ok, violations, error)."
    );
    describe_counter!(
        "tally_requests_refused_total",
        "Calls refused before a handler, by reason (unauthenticated, permission, rate_limited, overloaded)."
    );
    describe_gauge!(
        "tally_build_info",
        "Build metadata (version label); always 1."
    );
    metrics::gauge!("tally_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Every documented series exists from the start, at 0, with each value of its bounded
    // labels: a rate() or an alert on a series that has not happened yet sees 0, not nothing.
    for name in [
        "tally_ledger_invariant_violations_total",
        "tally_hold_expirations_total",
        "tally_sweeper_account_failures_total",
        "tally_db_group_fallbacks_total",
        "tally_db_group_retries_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    for reason in [
        "unauthenticated",
        "permission",
        "rate_limited",
        "overloaded",
        "database_down",
    ] {
        metrics::counter!("tally_requests_refused_total", "reason" => reason).absolute(0);
    }
    for kind in ["refund", "dispute", "purchase"] {
        metrics::counter!("tally_clawbacks_total", "kind" => kind).absolute(0);
        metrics::counter!("tally_credits_clawed_total", "kind" => kind).absolute(0);
    }
    for source in crate::domain::book::Source::ALL.map(crate::domain::book::Source::as_str) {
        metrics::counter!("tally_grants_total", "source" => source).absolute(0);
        metrics::counter!("tally_credits_granted_total", "source" => source).absolute(0);
    }
    for result in ["ok", "violations", "error"] {
        metrics::counter!("tally_ledger_audits_total", "result" => result).absolute(0);
    }
    for result in ["processed", "duplicate", "refused", "rejected", "error"] {
        metrics::counter!("tally_webhook_events_total", "type" => "checkout.session.completed", "result" => result)
            .absolute(0);
    }
}

/// Sets the `process_*` series (Prometheus' standard names) from `/proc` at scrape time:
/// CPU seconds, resident and virtual memory, open and maximum file descriptors, start time.
/// Elsewhere than Linux they are absent.
#[allow(clippy::cast_precision_loss)] // gauges; exact below 2^53
pub fn process_metrics() {
    // USER_HZ: the kernel reports CPU time to user space in hundredths of a second.
    const TICKS_PER_SECOND: f64 = 100.0;
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name (which may hold spaces), from field 3 (state) on.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let field = |n: usize| {
        fields
            .get(n.saturating_sub(3))
            .and_then(|v| v.parse::<f64>().ok())
    };
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        metrics::gauge!("process_cpu_seconds_total").set((utime + stime) / TICKS_PER_SECOND);
    }
    if let Some(vsize) = field(23) {
        metrics::gauge!("process_virtual_memory_bytes").set(vsize);
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    if let (Some(boot), Some(start)) = (boot, field(22)) {
        metrics::gauge!("process_start_time_seconds").set(boot + start / TICKS_PER_SECOND);
    }
    if let Some(kb) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
    {
        metrics::gauge!("process_resident_memory_bytes").set(kb * 1024.0);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(fds.count() as f64);
    }
    if let Some(max) = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<f64>().ok())
        })
    {
        metrics::gauge!("process_max_fds").set(max);
    }
}

/// Counts a grant of `credits` from `source`.
#[allow(clippy::cast_sign_loss)] // credits are positive (validated)
pub fn count_grant(source: &'static str, credits: i64) {
    metrics::counter!("tally_grants_total", "source" => source).increment(1);
    metrics::counter!("tally_credits_granted_total", "source" => source)
        .increment(credits.max(0) as u64);
}

/// Counts a claw-back (a refund or dispute taking credits back) and its credits.
#[allow(clippy::cast_sign_loss)] // clamped at zero first
pub fn count_clawback(cause: &'static str, credits: i64) {
    metrics::counter!("tally_clawbacks_total", "kind" => cause).increment(1);
    metrics::counter!("tally_credits_clawed_total", "kind" => cause)
        .increment(credits.max(0) as u64);
}

#[cfg(test)]
mod tests {
    #[test]
    fn alerting_counters_exist_at_zero_from_the_start() {
        let text = super::metrics().render();
        for name in [
            "tally_ledger_invariant_violations_total 0",
            "tally_hold_expirations_total 0",
            "tally_sweeper_account_failures_total 0",
            "tally_build_info{version=",
        ] {
            assert!(text.contains(name), "{name} in\n{text}");
        }
    }
}
