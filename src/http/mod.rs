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

pub mod billing;

use crate::catalog::Catalog;
use crate::domain::book::Source;
use crate::domain::{AccountId, Credits};
use crate::storage::{StorageError, Store, StripeEffect, StripeEvent, StripeRecord};
use crate::stripe::{self, Effect, Envelope, WebhookSecret};

/// Largest webhook body accepted: 256 KiB (Stripe events are a few KiB).
pub const WEBHOOK_BODY_MAX_BYTES: usize = 256 * 1024;

/// What the sidecar needs.
#[derive(Clone)]
pub struct HttpState {
    /// The storage port.
    pub store: Arc<dyn Store>,
    /// Plans, packs and prices.
    pub catalog: Arc<Catalog>,
    /// Up to two webhook secrets (rotation).
    pub webhook_secrets: Arc<Vec<WebhookSecret>>,
    /// Whether the configured Stripe key is live (events of the other mode are refused).
    pub livemode: bool,
    /// The Stripe API client (billing endpoints answer 503 without one).
    pub stripe: Option<crate::stripe::client::StripeApi>,
    /// The bearer token of the billing endpoints (open when unset).
    pub billing_token: Option<String>,
}

/// The sidecar's routes.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/stripe/webhook", post(webhook))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .merge(billing::routes())
        // The webhook reads its body itself, stopping at the limit, so an oversized delivery is
        // a 400 like every other refusal.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

async fn ready(State(s): State<HttpState>) -> Response {
    match s.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response(),
    }
}

fn refuse(why: &str) -> Response {
    warn!(reason = why, "stripe webhook refused");
    (StatusCode::BAD_REQUEST, Json(json!({"error": why}))).into_response()
}

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
        Effect::PaymentFailed { customer } => Ok(StripeEffect::PaymentFailed {
            customer: customer.clone(),
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
        } => Ok(StripeEffect::Mark {
            business_key: business_key.clone(),
            state,
        }),
        Effect::GrantPack {
            business_key,
            account_id,
            pack_id,
            payment_intent,
            amount_paid,
        } => {
            let pack = catalog.packs.get(pack_id).ok_or("unknown pack")?;
            Ok(StripeEffect::Grant {
                business_key: business_key.clone(),
                account_id: AccountId::parse("account_id", account_id)
                    .map_err(|_| "invalid account id in the session")?,
                amount: Credits::new("credits", pack.credits).map_err(|_| "invalid pack")?,
                source: Source::Purchase,
                expires_in: pack
                    .expires_in
                    .and_then(|d| chrono::TimeDelta::from_std(d).ok()),
                reason: format!("{} ({}; {})", pack.display_name, business_key, event.id),
                payment: payment_intent
                    .clone()
                    .map(|pi| (pi, amount_paid.unwrap_or(0))),
            })
        }
        Effect::Refunded {
            charge,
            payment_intent,
            amount,
            amount_refunded,
        } => Ok(StripeEffect::ClawRefund {
            charge: charge.clone(),
            payment_intent: payment_intent.clone(),
            amount: *amount,
            amount_refunded: *amount_refunded,
        }),
        Effect::Disputed {
            dispute,
            charge,
            payment_intent,
        } => Ok(StripeEffect::ClawDispute {
            dispute: dispute.clone(),
            charge: charge.clone(),
            payment_intent: payment_intent.clone(),
        }),
        Effect::DisputeWon { dispute } => Ok(StripeEffect::RestoreDispute {
            dispute: dispute.clone(),
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
    let effect = stripe::decide(event, &s.catalog);
    let why = match &effect {
        Effect::Nothing(why) => *why,
        Effect::Record { state, .. } => state,
        Effect::GrantPack { .. } => "grant pack",
        Effect::Link { .. } => "link customer",
        Effect::Subscription(_) => "mirror subscription",
        Effect::InvoicePaid { .. } => "grant subscription credits",
        Effect::PaymentFailed { .. } => "past due",
        Effect::Refunded { .. } => "claw back refund",
        Effect::Disputed { .. } => "claw back dispute",
        Effect::DisputeWon { .. } => "restore dispute",
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
    };
    match s.store.record_stripe_event(&record, &resolved).await {
        Ok(StripeRecord::DuplicateEvent) => {
            info!(event_id = %event.id, kind = %event.kind, "stripe event already processed");
            (
                StatusCode::OK,
                Json(json!({"received": true, "duplicate": true})),
            )
                .into_response()
        }
        Ok(StripeRecord::Recorded { granted }) => {
            info!(event_id = %event.id, kind = %event.kind, effect = why, granted, "stripe event processed");
            (
                StatusCode::OK,
                Json(json!({"received": true, "effect": why, "granted": granted})),
            )
                .into_response()
        }
        Err(StorageError::Rejected(r)) => {
            // A business refusal (e.g. the balance limit): retrying will not help; keep the
            // event for redelivery after an operator fixes it.
            warn!(event_id = %event.id, reason = r.reason(), "stripe event refused by the ledger");
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": r.reason()})),
            )
                .into_response()
        }
        Err(e) => {
            warn!(event_id = %event.id, error.message = %e, "stripe event not stored; Stripe will retry");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "storage unavailable"})),
            )
                .into_response()
        }
    }
}
