//! The HTTP sidecar (axum): Stripe webhooks and HTTP health checks.
//!
//! Statuses are for Stripe: 400 for a delivery we refuse (bad signature, stale, oversized,
//! wrong mode — nothing is written), 200 for processed, duplicate and ignored events, 5xx when
//! the database failed, so Stripe retries.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tracing::{info, warn};

pub mod admin;
pub mod balance;
pub mod billing;

use crate::catalog::Catalog;
use crate::domain::book::Source;
use crate::domain::payment::{
    Charge, Dispute, Fact, Moved, PackGrant, StripeEffect, StripeEvent, StripeRecord,
};
use crate::domain::{AccountId, Credits};
use crate::ledger::{Ledger, ServiceError};
use crate::stripe::{self, Effect, Envelope, WebhookSecret};

/// Largest webhook body accepted: 256 KiB (Stripe events are a few KiB).
pub const WEBHOOK_BODY_MAX_BYTES: usize = 256 * 1024;

/// What the sidecar needs.
#[derive(Clone)]
pub struct HttpState {
    /// The use cases.
    pub ledger: Ledger,
    /// Plans, packs and prices.
    pub catalog: Arc<Catalog>,
    /// Up to two webhook secrets (rotation).
    pub webhook_secrets: Arc<Vec<WebhookSecret>>,
    /// Whether the configured Stripe key is live (events of the other mode are refused).
    pub livemode: bool,
    /// The Stripe API client (billing endpoints answer 503 without one).
    pub stripe: Option<crate::stripe::client::StripeApi>,
    /// Who may call the billing endpoints.
    pub auth: Arc<crate::auth::Auth>,
    /// Readiness (database reachable, not draining).
    pub readiness: crate::health::Readiness,
    /// Live balances (none: the stream answers 503).
    pub balances: Option<crate::ledger::watch::Watcher>,
    /// The balance stream's heartbeat interval.
    pub heartbeat: std::time::Duration,
    /// The admin console (none: `/admin` is not served).
    pub admin: Option<Arc<admin::Console>>,
}

/// Largest JSON body of a billing request: 16 KiB.
pub const BILLING_BODY_MAX_BYTES: usize = 16 * 1024;

/// The sidecar's routes.
pub fn router(state: HttpState) -> Router {
    let console = if state.admin.is_some() {
        admin::routes()
    } else {
        Router::new()
    };
    Router::new()
        .route(
            "/stripe/webhook",
            // The webhook reads its body itself, stopping at the limit, so an oversized
            // delivery is a 400 like every other refusal.
            post(webhook).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .merge(
            billing::routes().layer(axum::extract::DefaultBodyLimit::max(BILLING_BODY_MAX_BYTES)),
        )
        .merge(balance::routes())
        .merge(console)
        .layer(axum::middleware::from_fn(observe))
        .with_state(state)
}

/// The operator port: `/metrics` (Prometheus text), `/healthz`, `/readyz`. Unauthenticated:
/// bind it where only the cluster (Prometheus, the kubelet) can reach it.
pub fn metrics_router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

async fn metrics(State(s): State<HttpState>) -> Response {
    // Gauges read at scrape time, so they are never staler than the scrape.
    crate::telemetry::process_metrics();
    if let Ok(Ok(st)) = tokio::time::timeout(crate::health::PING_TIMEOUT, s.ledger.stats()).await {
        #[allow(clippy::cast_precision_loss)] // gauges; exact below 2^53
        {
            metrics::gauge!("tally_holds_open").set(st.open_holds as f64);
            metrics::gauge!("tally_db_pool_connections", "state" => "idle")
                .set(f64::from(st.pool_idle));
            metrics::gauge!("tally_db_pool_connections", "state" => "in_use")
                .set(f64::from(st.pool_size.saturating_sub(st.pool_idle)));
            metrics::gauge!("tally_db_pool_max_connections").set(f64::from(st.pool_max));
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::telemetry::metrics().render(),
    )
        .into_response()
}

async fn ready(State(s): State<HttpState>) -> Response {
    if s.readiness.ready() {
        (StatusCode::OK, "ready").into_response()
    } else if s.readiness.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
    }
}

/// Per-request telemetry: a SERVER span `{method} {route}` (W3C parent from the headers),
/// `tally_http_requests_total` and `_duration_seconds` by route template, one log line.
async fn observe(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument as _;
    let start = std::time::Instant::now();
    // Bounded labels: the route template (never the raw path) and the standard methods.
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => m.to_owned(),
        _ => "_OTHER".to_owned(),
    };
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "_OTHER".to_owned(), |p| p.as_str().to_owned());
    let span = tracing::info_span!(
        target: "tally::http",
        "http",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        "http.request.method" = method.as_str(),
        "http.route" = route.as_str(),
        "url.scheme" = "http",
        "http.response.status_code" = tracing::field::Empty,
    );
    crate::telemetry::adopt_parent(&span, req.headers());
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    let elapsed = start.elapsed();
    let status_label = status.to_string();
    metrics::counter!("tally_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status_label.clone()).increment(1);
    metrics::histogram!("tally_http_request_duration_seconds", "route" => route.clone(), "method" => method.clone(), "status" => status_label)
        .record(elapsed.as_secs_f64());
    let ms = elapsed.as_secs_f64() * 1000.0;
    if route == "/healthz" || route == "/readyz" {
        tracing::debug!(target: "tally::request", method, route, status, duration_ms = ms, "http request");
    } else {
        info!(target: "tally::request", method, route, status, duration_ms = ms, "http request");
    }
    resp
}

fn webhook_metric(kind: &str, result: &'static str) {
    metrics::counter!("tally_webhook_events_total", "type" => kind.to_owned(), "result" => result)
        .increment(1);
}

fn refuse(why: &str) -> Response {
    warn!(reason = why, "stripe webhook refused");
    webhook_metric("unverified", "refused");
    (StatusCode::BAD_REQUEST, Json(json!({"error": why}))).into_response()
}

/// Counts what an event moved: `tally_grants_total` / `tally_credits_granted_total` by source
/// (a dispute's give-back as `refund`), `tally_clawbacks_total` / `tally_credits_clawed_total`
/// by what caused them (`refund`, `dispute`, or `purchase` when a claw-back that arrived first
/// is applied as its purchase lands).
fn count_moved(effect: &Effect, resolved: &StripeEffect, moved: Moved) {
    if moved.granted > 0 {
        let source = match resolved {
            StripeEffect::InvoiceGrant { .. } => "subscription",
            _ => "purchase",
        };
        crate::telemetry::count_grant(source, moved.granted);
    }
    if moved.given_back > 0 {
        crate::telemetry::count_grant("refund", moved.given_back);
    }
    if moved.clawed > 0 {
        let cause = match effect {
            Effect::Refunded { .. } => "refund",
            Effect::Dispute { .. } => "dispute",
            _ => "purchase",
        };
        crate::telemetry::count_clawback(cause, moved.clawed);
    }
}

#[allow(clippy::too_many_lines)] // one arm per effect
fn resolve(
    effect: &Effect,
    catalog: &Catalog,
    event: &Envelope,
) -> Result<StripeEffect, &'static str> {
    match effect {
        Effect::Nothing(_) => Ok(StripeEffect::None),
        Effect::Link {
            account_id,
            customer,
        } => Ok(StripeEffect::Link {
            account_id: AccountId::parse("account_id", account_id)
                .map_err(|_| "invalid account id in the session")?,
            customer: customer.clone(),
        }),
        Effect::Subscription(state) => {
            let mut state = state.clone();
            state.account_hint = state
                .account_hint
                .filter(|a| AccountId::parse("account_id", a).is_ok());
            Ok(StripeEffect::Subscription(state))
        }
        Effect::PaymentFailed {
            subscription,
            as_of,
        } => Ok(StripeEffect::PaymentFailed {
            subscription: subscription.clone(),
            as_of: *as_of,
        }),
        Effect::InvoicePaid {
            business_key,
            customer,
            account_hint,
            plan,
            period_end,
        } => {
            let p = catalog.plans.get(plan).ok_or("unknown plan")?;
            let credits = p
                .subscription_credits
                .ok_or("the plan grants no subscription credits")?;
            Ok(StripeEffect::InvoiceGrant {
                business_key: business_key.clone(),
                customer: customer.clone(),
                account_hint: account_hint
                    .as_deref()
                    .and_then(|a| AccountId::parse("account_id", a).ok()),
                amount: Credits::new("credits", credits).map_err(|_| "invalid plan credits")?,
                expires_at: period_end.and_then(|t| chrono::DateTime::from_timestamp(t, 0)),
                reason: format!(
                    "{} subscription ({}; {})",
                    p.display_name, business_key, event.id
                ),
            })
        }
        Effect::Record {
            business_key,
            state,
        } => Ok(StripeEffect::Payment {
            business_key: Some(business_key.clone()),
            fact: if *state == "failed" {
                Fact::Failed
            } else {
                Fact::Pending
            },
            grant: None,
            reason: format!("{business_key} {state} ({})", event.id),
        }),
        Effect::GrantPack {
            business_key,
            account_id,
            pack_id,
            payment_intent,
            amount_paid,
        } => {
            let pack = catalog.packs.get(pack_id).ok_or("unknown pack")?;
            let account_id = AccountId::parse("account_id", account_id)
                .map_err(|_| "invalid account id in the session")?;
            let credits = Credits::new("credits", pack.credits).map_err(|_| "invalid pack")?;
            Ok(StripeEffect::Payment {
                business_key: Some(business_key.clone()),
                fact: Fact::Paid {
                    account_id: account_id.as_str().to_owned(),
                    credits: credits.get(),
                    payment_intent: payment_intent.clone(),
                    amount_paid: amount_paid.unwrap_or(0),
                },
                grant: Some(PackGrant {
                    source: Source::Purchase,
                    expires_in: pack
                        .expires_in
                        .and_then(|d| chrono::TimeDelta::from_std(d).ok()),
                }),
                reason: format!("{} ({}; {})", pack.display_name, business_key, event.id),
            })
        }
        Effect::Refunded {
            charge,
            payment_intent,
            amount,
            amount_refunded,
        } => Ok(StripeEffect::Payment {
            business_key: None,
            fact: Fact::Refund(Charge {
                charge_id: charge.clone(),
                payment_intent: payment_intent.clone(),
                amount: *amount,
                amount_refunded: *amount_refunded,
            }),
            grant: None,
            reason: format!("refund of {charge} ({})", event.id),
        }),
        Effect::Dispute {
            dispute,
            charge,
            payment_intent,
            amount,
            status,
        } => Ok(StripeEffect::Payment {
            business_key: None,
            fact: Fact::Dispute(Dispute {
                dispute_id: dispute.clone(),
                charge_id: charge.clone(),
                payment_intent: payment_intent.clone(),
                amount: *amount,
                status: *status,
            }),
            grant: None,
            reason: format!("dispute {dispute} {} ({})", status.as_str(), event.id),
        }),
    }
}

async fn webhook(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let Ok(body) = axum::body::to_bytes(body, WEBHOOK_BODY_MAX_BYTES).await else {
        return refuse("body larger than 256 KiB");
    };
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    if let Err(e) = stripe::verify(
        header,
        &body,
        &s.webhook_secrets,
        chrono::Utc::now().timestamp(),
    ) {
        return refuse(&e.to_string());
    }
    let Ok(event) = serde_json::from_slice::<Envelope>(&body) else {
        return refuse("body is not a JSON event");
    };
    if [&event.id, &event.kind]
        .iter()
        .any(|s| s.len() > 255 || s.chars().any(char::is_control))
    {
        return refuse("event id or type with a control character or over 255 bytes");
    }
    if event.id.is_empty() {
        return refuse("event without an id");
    }
    apply_event(&s, &event).await
}

/// Applies a verified event (from the webhook or the success-page sync): the same path for
/// both, so a purchase is granted once whichever arrives first.
pub(crate) async fn apply_event(s: &HttpState, event: &Envelope) -> Response {
    let livemode = event.livemode.unwrap_or(false);
    if livemode != s.livemode {
        return refuse("event mode (live/test) differs from the configured Stripe key");
    }
    let mut effect = stripe::decide(event, &s.catalog);
    // A dispute rendered without its PaymentIntent (older API versions): ask Stripe for the
    // charge's; if Stripe cannot say now, answer 503 so it delivers the event again. Without a
    // Stripe key the dispute is stored by charge and applies once a refund of the charge names
    // the PaymentIntent.
    if let (
        Effect::Dispute {
            charge,
            payment_intent: pi @ None,
            ..
        },
        Some(api),
    ) = (&mut effect, &s.stripe)
    {
        match api.charge_payment_intent(charge).await {
            Ok(found) => *pi = found,
            Err(e) => {
                // Not recorded: Stripe delivers it again later, when the lookup may succeed.
                warn!(event_id = %event.id, error.message = %e, "the disputed charge could not be read from Stripe; answering 503 so Stripe retries");
                webhook_metric(&event.kind, "error");
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"error": "the disputed charge could not be read from Stripe"})),
                )
                    .into_response();
            }
        }
    }
    let why = match &effect {
        Effect::Nothing(why) => *why,
        Effect::Record { state, .. } => state,
        Effect::GrantPack { .. } => "grant pack",
        Effect::Link { .. } => "link customer",
        Effect::Subscription(_) => "mirror subscription",
        Effect::InvoicePaid { .. } => "grant subscription credits",
        Effect::PaymentFailed { .. } => "past due",
        Effect::Refunded { .. } => "refund: its share of the purchase is taken back",
        Effect::Dispute { .. } => "dispute: its share of the purchase follows its status",
    };
    let resolved = match resolve(&effect, &s.catalog, event) {
        Ok(r) => r,
        Err(e) => {
            warn!(event_id = %event.id, error = e, "stripe event cannot be applied; recorded only");
            StripeEffect::None
        }
    };
    let record = StripeEvent {
        event_id: event.id.clone(),
        kind: event.kind.clone(),
        livemode,
        created: event.created,
        effect: why.to_owned(),
        business_key: resolved.business_key().map(str::to_owned),
    };
    match s.ledger.record_stripe_event(&record, &resolved).await {
        Ok(StripeRecord::DuplicateEvent) => {
            webhook_metric(&event.kind, "duplicate");
            info!(event_id = %event.id, kind = %event.kind, "stripe event already processed");
            (
                StatusCode::OK,
                Json(json!({"received": true, "duplicate": true})),
            )
                .into_response()
        }
        Ok(StripeRecord::Recorded(moved)) => {
            webhook_metric(&event.kind, "processed");
            count_moved(&effect, &resolved, moved);
            let granted = moved.granted > 0;
            info!(event_id = %event.id, kind = %event.kind, effect = why, granted = moved.granted,
                  clawed = moved.clawed, given_back = moved.given_back, "stripe event processed");
            (
                StatusCode::OK,
                Json(json!({"received": true, "effect": why, "granted": granted,
                            "credits": {"granted": moved.granted, "clawed": moved.clawed, "given_back": moved.given_back}})),
            )
                .into_response()
        }
        Err(ServiceError::Rejected(r)) => {
            // A business refusal (e.g. the balance limit): retrying will not help; keep the
            // event for redelivery after an operator fixes it.
            webhook_metric(&event.kind, "rejected");
            warn!(event_id = %event.id, reason = r.reason(), "stripe event refused by the ledger");
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": r.reason()})),
            )
                .into_response()
        }
        Err(e) => {
            webhook_metric(&event.kind, "error");
            warn!(event_id = %event.id, error.message = %e, "stripe event not stored; Stripe will retry");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "storage unavailable"})),
            )
                .into_response()
        }
    }
}
