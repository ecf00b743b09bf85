//! The outbound events' dispatcher (issue 28): leases due rows of the outbox (written by the
//! backends in the same transaction as each change), POSTs them signed as Standard Webhooks,
//! and records the result. Each account's rows go out in order per endpoint (the outbox leases
//! only an account's oldest pending row); accounts go in parallel, up to
//! [`Config::concurrency`] requests at once. Redirects are never followed and connections go
//! only to addresses [`crate::domain::event::address_allowed`] allows, checked after DNS
//! resolution (the connection uses the checked addresses, so a name cannot be re-pointed
//! between check and connect).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;

use crate::domain::event::{RETRY_SCHEDULE_DEFAULT, address_allowed, expiring, next_attempt};
use crate::domain::webhook::{Secret, signature_header};
use crate::ledger::Engine;
use crate::storage::{AttemptEnd, Delivery, RandomIds, StorageError};

/// An endpoint as the dispatcher posts to it.
#[derive(Clone)]
pub struct Target {
    /// Its name (the catalog's key).
    pub name: String,
    /// Where to POST.
    pub url: http::Uri,
    /// Signing secrets (two during a rotation).
    pub secrets: Vec<Secret>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

/// How the dispatcher works.
#[derive(Clone, Debug)]
pub struct Config {
    /// Delays before each attempt (the first is the first attempt's); then failed.
    pub schedule: Vec<Duration>,
    /// One attempt's limit (connect, send, answer).
    pub timeout: Duration,
    /// Connect to loopback and private ranges too (tests, in-cluster receivers).
    pub allow_private: bool,
    /// Delivered and failed rows are deleted this long after their last attempt.
    pub retention: TimeDelta,
    /// How often an idle dispatcher looks for due rows.
    pub poll: Duration,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// `credits.expiring`, retention and the gauges run this often.
    pub housekeeping: Duration,
}

/// Longest schedule accepted (attempts).
pub const SCHEDULE_MAX: usize = 20;
/// Rows leased per round, at most.
const LEASE_BATCH: u32 = 64;
/// Grants looked at per `credits.expiring` pass, and rows purged per pass.
const HOUSEKEEPING_BATCH: u32 = 500;

impl Default for Config {
    fn default() -> Self {
        Self {
            schedule: RETRY_SCHEDULE_DEFAULT.to_vec(),
            timeout: Duration::from_secs(10),
            allow_private: false,
            retention: TimeDelta::days(30),
            poll: Duration::from_millis(100),
            concurrency: 32,
            housekeeping: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// A lease outlives an attempt: the timeout and 5 s; a replica that dies mid-attempt
    /// holds its rows no longer than that.
    fn lease(&self) -> TimeDelta {
        TimeDelta::from_std(self.timeout.saturating_add(Duration::from_secs(5)))
            .unwrap_or(TimeDelta::MAX)
    }
}

/// Parses a retry schedule (`0s,5s,5m,30m,2h,5h,10h,10h`).
///
/// # Errors
/// A duration that does not parse, none, or more than [`SCHEDULE_MAX`].
pub fn parse_schedule(s: &str) -> Result<Vec<Duration>, String> {
    let v = s
        .split(',')
        .map(|p| humantime::parse_duration(p.trim()).map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if v.is_empty() || v.len() > SCHEDULE_MAX {
        return Err(format!("1 to {SCHEDULE_MAX} delays"));
    }
    Ok(v)
}

/// Why an endpoint cannot be used as configured.
///
/// # Errors
/// A URL whose host is a private address literal (or `localhost`) while private addresses
/// are not allowed.
pub fn check_target(name: &str, url: &http::Uri, allow_private: bool) -> Result<(), String> {
    let host = url.host().unwrap_or_default();
    let literal = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .ok();
    let private = match literal {
        Some(ip) => !address_allowed(ip, false),
        None => host.eq_ignore_ascii_case("localhost") || host.ends_with(".localhost"),
    };
    if private && !allow_private {
        return Err(format!(
            "events endpoint {name}: {host} is a loopback or private address; refused (SSRF) \
             unless --events-allow-private is set"
        ));
    }
    Ok(())
}

/// A resolver that drops the addresses deliveries may not connect to, and fails when none is
/// left.
#[derive(Clone)]
struct Guarded {
    allow_private: bool,
}

type Resolving =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, std::io::Error>> + Send>>;

impl tower::Service<Name> for Guarded {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow = self.allow_private;
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let ok: Vec<SocketAddr> = all
                .into_iter()
                .filter(|a| address_allowed(a.ip(), allow))
                .collect();
            if ok.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "{} resolves only to loopback or private addresses (refused)",
                        name.as_str()
                    ),
                ));
            }
            Ok(ok.into_iter())
        })
    }
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector<Guarded>>, Full<Bytes>>;

fn client(allow_private: bool, timeout: Duration) -> HttpClient {
    let mut http = HttpConnector::new_with_resolver(Guarded { allow_private });
    http.enforce_http(false);
    http.set_connect_timeout(Some(timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https)
}

/// What one POST came to.
enum Answer {
    Status(u16),
    Error(String),
}

/// Posts one event: the body as stored, signed now.
async fn post(client: &HttpClient, target: &Target, d: &Delivery, cfg: &Config) -> Answer {
    if let Err(e) = check_target(&target.name, &target.url, cfg.allow_private) {
        return Answer::Error(e);
    }
    let ts = Utc::now().timestamp();
    let signature = signature_header(&target.secrets, &d.event_id, ts, d.body.as_bytes());
    let request = http::Request::post(target.url.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("tally/", env!("CARGO_PKG_VERSION")),
        )
        .header("webhook-id", &d.event_id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(Full::new(Bytes::from(d.body.clone())));
    let request = match request {
        Ok(r) => r,
        Err(e) => return Answer::Error(format!("request: {e}")),
    };
    match tokio::time::timeout(cfg.timeout, client.request(request)).await {
        Err(_) => Answer::Error(format!("no answer within {:?}", cfg.timeout)),
        Ok(Err(e)) => Answer::Error(chain(&e)),
        Ok(Ok(response)) => Answer::Status(response.status().as_u16()),
    }
}

/// An error and its causes, one line (the URL's host at most: never a secret).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// What an attempt's answer means for the row (the schedule decides when to try again).
fn end_of(answer: Answer, d: &Delivery, cfg: &Config) -> AttemptEnd {
    let (status, error) = match answer {
        Answer::Status(s) if (200..300).contains(&s) => {
            return AttemptEnd::Delivered { status: s };
        }
        Answer::Status(410) => {
            return AttemptEnd::EndpointGone {
                endpoint: d.endpoint.clone(),
            };
        }
        Answer::Status(s) if (300..400).contains(&s) => {
            (Some(s), format!("answered {s}: redirects are not followed"))
        }
        Answer::Status(s) => (Some(s), format!("answered {s}")),
        Answer::Error(e) => (None, e),
    };
    let jitter =
        u32::try_from(crate::client::jitter(Duration::from_micros(1)).as_nanos()).unwrap_or(500);
    match next_attempt(&cfg.schedule, d.attempts.saturating_add(1), jitter) {
        Some(delay) => AttemptEnd::Retry {
            at: Utc::now() + delay,
            status,
            error,
        },
        None => AttemptEnd::Failed { status, error },
    }
}

/// The dispatcher: its endpoints, client and settings.
pub struct Dispatcher {
    engine: Engine,
    targets: Arc<BTreeMap<String, Target>>,
    names: Vec<String>,
    client: HttpClient,
    cfg: Arc<Config>,
}

impl Dispatcher {
    /// A dispatcher for these endpoints (none: [`Dispatcher::run`] only purges).
    #[must_use]
    pub fn new(engine: Engine, targets: Vec<Target>, cfg: Config) -> Self {
        let names = targets.iter().map(|t| t.name.clone()).collect();
        let client = client(cfg.allow_private, cfg.timeout);
        Self {
            engine,
            targets: Arc::new(targets.into_iter().map(|t| (t.name.clone(), t)).collect()),
            names,
            client,
            cfg: Arc::new(cfg),
        }
    }

    /// Runs until `stop` resolves: leases due rows while requests are free, posts them,
    /// records each result; housekeeping every [`Config::housekeeping`].
    pub async fn run(self, stop: impl Future<Output = ()> + Send) {
        tokio::pin!(stop);
        let this = Arc::new(self);
        // Housekeeping on a task of its own: a slow pass never delays a delivery.
        let keeper = {
            let this = Arc::clone(&this);
            tokio::spawn(async move {
                loop {
                    this.housekeeping().await;
                    tokio::time::sleep(this.cfg.housekeeping).await;
                }
            })
        };
        this.deliver(stop).await;
        keeper.abort();
    }

    async fn deliver(&self, mut stop: Pin<&mut impl Future<Output = ()>>) {
        let wake = self.engine.outbox_written();
        let mut in_flight: JoinSet<()> = JoinSet::new();
        loop {
            let free = self.cfg.concurrency.saturating_sub(in_flight.len());
            let mut leased = 0;
            if free > 0 && !self.names.is_empty() {
                let limit = u32::try_from(free).unwrap_or(LEASE_BATCH).min(LEASE_BATCH);
                match self
                    .engine
                    .lease_events(&self.names, limit, self.cfg.lease())
                    .await
                {
                    Ok(rows) => {
                        leased = rows.len();
                        for d in rows {
                            self.spawn(&mut in_flight, d);
                        }
                    }
                    Err(e) => log_storage("lease events", &e),
                }
            }
            if leased > 0 && in_flight.len() < self.cfg.concurrency {
                // More may be due (an account's next row, a backlog): look again at once.
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                () = &mut stop => break,
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {
                    // Every attempt that ended meanwhile, so one lease follows them all.
                    while in_flight.try_join_next().is_some() {}
                }
                () = wake.notified() => {}
                () = tokio::time::sleep(self.cfg.poll) => {}
            }
        }
        // Attempts in flight end on their own timeout; their leases run out if cut off.
        in_flight.abort_all();
    }

    fn spawn(&self, set: &mut JoinSet<()>, d: Delivery) {
        let engine = self.engine.clone();
        let client = self.client.clone();
        let cfg = Arc::clone(&self.cfg);
        let target = self.targets.get(&d.endpoint).cloned();
        set.spawn(async move {
            let Some(target) = target else { return };
            if d.attempts == 0 {
                metrics::counter!("tally_events_created_total", "type" => d.kind.clone())
                    .increment(1);
            }
            let answer = post(&client, &target, &d, &cfg).await;
            let end = end_of(answer, &d, &cfg);
            record(&d, &end);
            if let Err(e) = engine.end_attempt(d.seq, &end).await {
                log_storage("record a delivery attempt", &e);
            }
        });
    }

    /// `credits.expiring` for grants entering the horizon, retention, and the gauges.
    #[allow(clippy::cast_precision_loss)] // gauges of row counts: exact far beyond any outbox
    async fn housekeeping(&self) {
        let rules = &self.engine.policy().events;
        let wanted = rules
            .endpoints_for(crate::domain::event::EventType::CreditsExpiring)
            .next()
            .is_some();
        if wanted && !self.names.is_empty() {
            let horizon = rules.expiring_horizon;
            match self
                .engine
                .expiring_grants(horizon, HOUSEKEEPING_BATCH)
                .await
            {
                Ok(grants) if !grants.is_empty() => {
                    let now = Utc::now();
                    let events: Vec<_> = grants
                        .iter()
                        .map(|g| expiring(g, now, &mut RandomIds))
                        .collect();
                    let written = async {
                        let mut tx = self.engine.begin().await?;
                        tx.emit(&events).await?;
                        tx.commit().await
                    };
                    if let Err(e) = written.await {
                        log_storage("write credits.expiring", &e);
                    }
                }
                Ok(_) => {}
                Err(e) => log_storage("find expiring grants", &e),
            }
        }
        if let Err(e) = self
            .engine
            .purge_events(self.cfg.retention, HOUSEKEEPING_BATCH)
            .await
        {
            log_storage("purge delivered events", &e);
        }
        match self.engine.outbox_stats(&self.names).await {
            Ok(s) => {
                let age = s
                    .oldest_pending
                    .map_or(0.0, |t| (Utc::now() - t).as_seconds_f64().max(0.0));
                metrics::gauge!("tally_events_oldest_pending_age_seconds").set(age);
                metrics::gauge!("tally_events_pending").set(s.pending as f64);
                metrics::gauge!("tally_events_failed").set(s.failed as f64);
            }
            Err(e) => log_storage("outbox stats", &e),
        }
        match self.engine.disabled_endpoints().await {
            Ok(d) => {
                let configured = d
                    .iter()
                    .filter(|(n, ..)| self.targets.contains_key(n))
                    .count();
                metrics::gauge!("tally_event_endpoints_disabled").set(configured as f64);
            }
            Err(e) => log_storage("disabled endpoints", &e),
        }
    }
}

/// Metrics and a log line for one attempt (the host only: a URL's path or query may carry a
/// token).
fn record(d: &Delivery, end: &AttemptEnd) {
    let outcome = match end {
        AttemptEnd::Delivered { .. } => "delivered",
        AttemptEnd::Retry { .. } => "retry",
        AttemptEnd::Failed { .. } => "failed",
        AttemptEnd::EndpointGone { .. } => "gone",
    };
    metrics::counter!("tally_event_attempts_total", "endpoint" => d.endpoint.clone(), "outcome" => outcome)
        .increment(1);
    match end {
        AttemptEnd::Delivered { .. } => {
            metrics::counter!("tally_events_delivered_total", "type" => d.kind.clone(), "endpoint" => d.endpoint.clone())
                .increment(1);
            let latency = (Utc::now() - d.created_at).as_seconds_f64().max(0.0);
            metrics::histogram!("tally_event_delivery_latency_seconds").record(latency);
        }
        AttemptEnd::Failed { error, .. } => {
            metrics::counter!("tally_events_failed_total", "type" => d.kind.clone(), "endpoint" => d.endpoint.clone())
                .increment(1);
            tracing::warn!(event_id = %d.event_id, endpoint = %d.endpoint, %error, "event failed: its schedule is spent");
        }
        AttemptEnd::Retry { error, at, .. } => {
            tracing::info!(event_id = %d.event_id, endpoint = %d.endpoint, %error, next_attempt_at = %at, "event delivery failed; will retry");
        }
        AttemptEnd::EndpointGone { endpoint } => {
            tracing::warn!(%endpoint, "events endpoint answered 410 Gone: disabled until `tally events enable`");
        }
    }
}

fn log_storage(what: &str, e: &StorageError) {
    tracing::warn!(error.message = %e, "events: could not {what}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_on_private_literals_and_localhost_are_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:8080/x",
            "http://10.0.0.7/x",
            "http://[::1]/x",
            "http://localhost/x",
            "https://api.localhost/x",
            "http://169.254.169.254/latest/meta-data",
        ] {
            let u: http::Uri = url.parse().unwrap();
            assert!(check_target("app", &u, false).is_err(), "{url}");
            assert!(check_target("app", &u, true).is_ok(), "{url}");
        }
        let public: http::Uri = "https://hooks.example.com/tally".parse().unwrap();
        assert!(check_target("app", &public, false).is_ok());
    }

    /// The check after DNS: a name that resolves only to loopback is refused, with its own
    /// error, unless private addresses are allowed.
    #[tokio::test]
    async fn the_resolver_refuses_names_that_resolve_to_private_addresses() {
        use std::str::FromStr as _;
        use tower::Service as _;
        let name = Name::from_str("localhost").unwrap();
        let refused = Guarded {
            allow_private: false,
        }
        .call(name.clone())
        .await
        .unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(refused.to_string().contains("refused"));
        let allowed: Vec<SocketAddr> = Guarded {
            allow_private: true,
        }
        .call(name)
        .await
        .unwrap()
        .collect();
        assert!(allowed.iter().all(|a| a.ip().is_loopback()) && !allowed.is_empty());
    }

    #[test]
    fn schedules_parse_with_limits() {
        assert_eq!(
            parse_schedule("0s, 5s,5m").unwrap(),
            [
                Duration::ZERO,
                Duration::from_secs(5),
                Duration::from_mins(5)
            ]
        );
        assert!(parse_schedule("").is_err());
        assert!(parse_schedule("5 parsecs").is_err());
        assert!(parse_schedule(&vec!["1s"; SCHEDULE_MAX + 1].join(",")).is_err());
    }

    fn delivery(attempts: u32) -> Delivery {
        Delivery {
            seq: 1,
            event_id: "evt_1".into(),
            endpoint: "app".into(),
            account_id: "u1".into(),
            kind: "credits.granted".into(),
            body: "{}".into(),
            attempts,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn answers_map_to_delivered_retry_failed_and_gone() {
        let cfg = Config {
            schedule: vec![Duration::ZERO, Duration::from_secs(5)],
            ..Config::default()
        };
        assert!(matches!(
            end_of(Answer::Status(204), &delivery(0), &cfg),
            AttemptEnd::Delivered { status: 204 }
        ));
        assert!(matches!(
            end_of(Answer::Status(410), &delivery(0), &cfg),
            AttemptEnd::EndpointGone { .. }
        ));
        match end_of(Answer::Status(302), &delivery(0), &cfg) {
            AttemptEnd::Retry { status, error, at } => {
                assert_eq!(status, Some(302));
                assert!(error.contains("redirect"));
                assert!(at > Utc::now() + TimeDelta::seconds(3));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            end_of(Answer::Error("reset".into()), &delivery(1), &cfg),
            AttemptEnd::Failed { status: None, .. }
        ));
    }
}
