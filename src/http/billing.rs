//! The product backend's billing endpoints: Checkout for packs and plans, the customer portal,
//! an account's billing view, and the success-page sync.
//!
//! Callers need the `billing` role (a bearer token from the callers file) and may only name
//! accounts within their prefixes; every endpoint that calls Stripe (Checkout, the portal and
//! both syncs) also counts against the lower rate tier.
#![allow(clippy::result_large_err)] // a handler step fails with the `Response` to send

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

use crate::auth::{Principal, Role};

use super::{HttpState, apply_event};
use crate::domain::AccountId;
use crate::stripe::Envelope;
use crate::stripe::client::{NewCheckout, StripeApi, StripeCallError};

/// Longest URL accepted in a request: 2 KiB.
pub const URL_MAX_LEN: usize = 2048;
/// Purchases listed by the billing view.
pub const RECENT_PURCHASES: u32 = 10;

/// The billing routes (merged into the sidecar's router).
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v1/checkout/sessions", post(create_checkout))
        .route("/v1/checkout/sessions/{id}/sync", post(sync_checkout))
        .route("/v1/billing/portal", post(portal))
        .route("/v1/accounts/{id}/billing", get(billing))
        .route("/v1/accounts/{id}/billing/sync", post(sync_subscription))
}

pub(super) fn error(status: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"reason": reason, "message": message.into()}})),
    )
        .into_response()
}

pub(super) fn invalid(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message)
}

/// How a failed Stripe call is answered: 404 for an id Stripe does not know; 503 with
/// `Retry-After` when Stripe is busy (429) or the same request is still in flight there (409);
/// 502 when Stripe refuses Tally's own API key (401/403: the operator's configuration, never the
/// caller's fault) or cannot be reached; 400 for the rest of Stripe's refusals.
fn stripe_error(e: &StripeCallError) -> Response {
    match e {
        StripeCallError::Refused { status: 404, .. } => {
            error(StatusCode::NOT_FOUND, "STRIPE_NOT_FOUND", e.to_string())
        }
        StripeCallError::Refused {
            status: 409 | 429, ..
        } => {
            let mut resp = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "STRIPE_BUSY",
                format!("{e}; retry with the same Idempotency-Key"),
            );
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(STRIPE_RETRY_AFTER_SECS),
            );
            resp
        }
        StripeCallError::Refused {
            status: 401 | 403, ..
        } => {
            tracing::error!(
                "Stripe refused Tally's API key: check --stripe-api-key-file (its mode and permissions)"
            );
            error(
                StatusCode::BAD_GATEWAY,
                "STRIPE_MISCONFIGURED",
                "Stripe refused the server's API key; the operator must fix it",
            )
        }
        StripeCallError::Refused { .. } => {
            error(StatusCode::BAD_REQUEST, "STRIPE_REFUSED", e.to_string())
        }
        StripeCallError::Unavailable(_) => {
            error(StatusCode::BAD_GATEWAY, "STRIPE_UNAVAILABLE", e.to_string())
        }
    }
}

/// `Retry-After` when Stripe is busy: 2 s.
pub const STRIPE_RETRY_AFTER_SECS: &str = "2";

/// Longest `Idempotency-Key` header accepted on Checkout creation: 200 characters.
pub const IDEMPOTENCY_HEADER_MAX_LEN: usize = 200;

/// Creating an account's Stripe customer is serialised per account in this process (striped
/// locks), so concurrent first Checkouts create one customer; across replicas the customer's
/// idempotency key (derived from the account) does the same at Stripe.
static CUSTOMER_LOCKS: [tokio::sync::Mutex<()>; 64] =
    [const { tokio::sync::Mutex::const_new(()) }; 64];

fn customer_lock(account_id: &AccountId) -> &'static tokio::sync::Mutex<()> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    account_id.as_str().hash(&mut h);
    let i = usize::try_from(h.finish() % 64).unwrap_or(0);
    CUSTOMER_LOCKS.get(i).unwrap_or(&CUSTOMER_LOCKS[0])
}

pub(super) fn ledger_error(e: &crate::ledger::ServiceError) -> Response {
    match e {
        crate::ledger::ServiceError::Rejected(r) => {
            error(StatusCode::NOT_FOUND, r.reason(), r.to_string())
        }
        crate::ledger::ServiceError::TooManyStreams(m) => {
            metrics::counter!("tally_requests_refused_total", "reason" => "streams").increment(1);
            error(StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_STREAMS", m.clone())
        }
        crate::ledger::ServiceError::ShuttingDown => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SHUTTING_DOWN",
            e.to_string(),
        ),
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
            "the database is unavailable",
        ),
    }
}

/// The HTTP answer to a refusal: 401 (with `WWW-Authenticate`), 403, or 429 with
/// `Retry-After` (whole seconds, rounded up).
pub fn denied_response(d: &crate::auth::Denied) -> Response {
    use crate::auth::Denied;
    let (status, reason, reason_label) = match d {
        Denied::Unauthenticated => (
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "unauthenticated",
        ),
        Denied::Role(_) | Denied::Account => {
            (StatusCode::FORBIDDEN, "PERMISSION_DENIED", "permission")
        }
        Denied::RateLimited(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            "rate_limited",
        ),
    };
    metrics::counter!("tally_requests_refused_total", "reason" => reason_label).increment(1);
    let mut resp = error(status, reason, d.to_string());
    let headers = resp.headers_mut();
    match d {
        Denied::Unauthenticated => {
            headers.insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        Denied::RateLimited(wait) => {
            let secs = wait.as_millis().div_ceil(1000).max(1);
            if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                headers.insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        Denied::Role(_) | Denied::Account => {}
    }
    resp
}

/// Authenticates the caller (billing role), takes from its rate budget (`sensitive`: the lower
/// tier too) and checks `account` against its prefixes. Nothing is read or written before.
pub(super) fn authorize(
    s: &HttpState,
    headers: &HeaderMap,
    account: Option<&str>,
    sensitive: bool,
) -> Result<Arc<Principal>, Response> {
    let p = s
        .auth
        .authenticate(
            headers
                .get(axum::http::header::AUTHORIZATION)
                .map(axum::http::HeaderValue::as_bytes),
        )
        .map_err(|d| denied_response(&d))?;
    p.require(Role::Billing).map_err(|d| denied_response(&d))?;
    p.admit(sensitive).map_err(|d| denied_response(&d))?;
    if let Some(a) = account
        && !p.may_access(a)
    {
        return Err(denied_response(&crate::auth::Denied::Account));
    }
    Ok(p)
}

/// The Stripe client, or 503 when none is configured.
fn stripe_api(s: &HttpState) -> Result<&StripeApi, Response> {
    s.stripe.as_ref().ok_or_else(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "STRIPE_NOT_CONFIGURED",
            "no Stripe API key is configured",
        )
    })
}

fn url(field: &str, value: &str) -> Result<String, Response> {
    let ok = value.len() <= URL_MAX_LEN
        && (value.starts_with("https://") || value.starts_with("http://"));
    if ok {
        Ok(value.to_owned())
    } else {
        Err(invalid(format!(
            "{field} must be an http(s) URL of at most {URL_MAX_LEN} characters"
        )))
    }
}

pub(super) fn account(value: &str) -> Result<AccountId, Response> {
    AccountId::parse("account_id", value).map_err(|v| invalid(v.to_string()))
}

/// Request of `POST /v1/checkout/sessions`.
#[derive(Deserialize)]
pub struct CheckoutRequest {
    account_id: String,
    pack_id: Option<String>,
    plan_id: Option<String>,
    success_url: String,
    cancel_url: String,
}

async fn customer_for(
    s: &HttpState,
    api: &StripeApi,
    account_id: &AccountId,
) -> Result<String, Response> {
    let stored = || async {
        s.ledger
            .customer_of(account_id)
            .await
            .map_err(|e| ledger_error(&e))
    };
    if let Some(c) = stored().await? {
        return Ok(c);
    }
    // Checked again under the account's lock: a concurrent first Checkout may have linked it.
    let _serialised = customer_lock(account_id).lock().await;
    if let Some(c) = stored().await? {
        return Ok(c);
    }
    let created = api
        .create_customer(account_id.as_str())
        .await
        .map_err(|e| stripe_error(&e))?;
    s.ledger
        .link_customer(account_id, &created)
        .await
        .map_err(|e| ledger_error(&e))
}

async fn create_checkout(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Json(r): Json<CheckoutRequest>,
) -> Response {
    let api = match authorize(&s, &headers, Some(&r.account_id), true).and_then(|_| stripe_api(&s))
    {
        Ok(api) => api,
        Err(resp) => return resp,
    };
    let parsed = (|| {
        let account_id = account(&r.account_id)?;
        let (subscription, price, item) = match (&r.pack_id, &r.plan_id) {
            (Some(pack), None) => {
                let p = s
                    .catalog
                    .packs
                    .get(pack)
                    .ok_or_else(|| invalid(format!("unknown pack {pack:?}")))?;
                (false, p.stripe_price_id.clone(), ("pack_id", pack.clone()))
            }
            (None, Some(plan)) => {
                let p = s
                    .catalog
                    .plans
                    .get(plan)
                    .ok_or_else(|| invalid(format!("unknown plan {plan:?}")))?;
                let price = p
                    .stripe_price_id
                    .clone()
                    .ok_or_else(|| invalid(format!("plan {plan:?} is not sold")))?;
                (true, price, ("plan_id", plan.clone()))
            }
            _ => return Err(invalid("give exactly one of pack_id and plan_id")),
        };
        Ok((
            account_id,
            subscription,
            price,
            item,
            url("success_url", &r.success_url)?,
            url("cancel_url", &r.cancel_url)?,
        ))
    })();
    let (account_id, subscription, price, item, success_url, cancel_url) = match parsed {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let idempotency_key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => uuid::Uuid::new_v4().simple().to_string(),
        Some(Ok(k))
            if !k.is_empty()
                && k.len() <= IDEMPOTENCY_HEADER_MAX_LEN
                && k.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            k.to_owned()
        }
        Some(_) => {
            return invalid(format!(
                "Idempotency-Key must be 1 to {IDEMPOTENCY_HEADER_MAX_LEN} printable ASCII characters"
            ));
        }
    };
    if subscription {
        match s.ledger.subscriptions(&account_id).await {
            Ok(subs) => {
                if let Some(live) = subs.iter().find(|x| x.is_live()) {
                    return error(
                        StatusCode::CONFLICT,
                        "SUBSCRIPTION_EXISTS",
                        format!(
                            "the account already has a live subscription ({}, plan {}): change or cancel it in the customer portal (POST /v1/billing/portal)",
                            live.subscription_id, live.plan
                        ),
                    );
                }
            }
            Err(e) => return ledger_error(&e),
        }
    }
    let customer = match customer_for(&s, api, &account_id).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let n = NewCheckout {
        customer,
        account_id: account_id.as_str().to_owned(),
        subscription,
        price,
        item,
        success_url,
        cancel_url,
        idempotency_key,
    };
    match api.create_checkout(&n).await {
        Ok((id, url)) => (StatusCode::OK, Json(json!({"id": id, "url": url}))).into_response(),
        Err(e) => stripe_error(&e),
    }
}

/// Request of `POST /v1/billing/portal`.
#[derive(Deserialize)]
pub struct PortalRequest {
    account_id: String,
    return_url: String,
}

async fn portal(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Json(r): Json<PortalRequest>,
) -> Response {
    let api = match authorize(&s, &headers, Some(&r.account_id), true).and_then(|_| stripe_api(&s))
    {
        Ok(api) => api,
        Err(resp) => return resp,
    };
    let (account_id, return_url) = match (account(&r.account_id), url("return_url", &r.return_url))
    {
        (Ok(a), Ok(u)) => (a, u),
        (Err(resp), _) | (_, Err(resp)) => return resp,
    };
    let customer = match s.ledger.customer_of(&account_id).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "NO_STRIPE_CUSTOMER",
                "the account has never been to Checkout",
            );
        }
        Err(e) => return ledger_error(&e),
    };
    match api.portal(&customer, &return_url).await {
        Ok(url) => (StatusCode::OK, Json(json!({"url": url}))).into_response(),
        Err(e) => stripe_error(&e),
    }
}

async fn sync_checkout(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (principal, api) = match authorize(&s, &headers, None, true)
        .and_then(|p| stripe_api(&s).map(|api| (p, api)))
    {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    if id.is_empty()
        || id.len() > 255
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return invalid("not a Checkout Session id");
    }
    // Never trust the redirect: the session is read back from Stripe.
    let (object, livemode) = match api.checkout_session(&id).await {
        Ok(x) => x,
        Err(e) => return stripe_error(&e),
    };
    // A tenant may only sync its own accounts' sessions.
    let owner = object["metadata"]["account_id"]
        .as_str()
        .or_else(|| object["client_reference_id"].as_str());
    if !principal.unrestricted() && !owner.is_some_and(|a| principal.may_access(a)) {
        return denied_response(&crate::auth::Denied::Account);
    }
    let event = Envelope {
        id: format!("sync:{id}:{}", uuid::Uuid::now_v7().simple()),
        kind: "checkout.session.completed".into(),
        livemode: Some(livemode),
        created: Some(chrono::Utc::now().timestamp()),
        api_version: None,
        data: crate::stripe::event::Data { object },
    };
    apply_event(&s, &event).await
}

async fn billing(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(resp) = authorize(&s, &headers, Some(&id), false) {
        return resp;
    }
    let account_id = match account(&id) {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let b = match s.ledger.check_balance(&account_id).await {
        Ok(b) => b,
        Err(e) => return ledger_error(&e),
    };
    let period = s
        .catalog
        .plans
        .get(&b.plan)
        .and_then(|p| p.allowance.as_ref())
        .map_or(crate::domain::plan::Period::Monthly, |a| a.period);
    let since = crate::domain::plan::period_start(period, b.as_of);
    let used = match s.ledger.used_since(&account_id, since).await {
        Ok(u) => u,
        Err(e) => return ledger_error(&e),
    };
    let subscription = match s.ledger.subscriptions(&account_id).await {
        Ok(subs) => crate::domain::payment::Subscription::current(&subs).map(|sub| {
            json!({"id": sub.subscription_id, "status": sub.status, "plan": sub.plan, "current_period_end": sub.period_end
                .and_then(|t| chrono::DateTime::from_timestamp(t, 0)).map(|t| t.to_rfc3339()), "cancel_at_period_end": sub.cancel_at_period_end})
        }),
        Err(e) => return ledger_error(&e),
    };
    let purchases = match s.ledger.purchases(&account_id, RECENT_PURCHASES).await {
        Ok(p) => p,
        Err(e) => return ledger_error(&e),
    };
    let (by_source, next_expiry) = super::balance::breakdown_json(&b);
    Json(json!({
        "account_id": b.account_id,
        "plan": b.plan,
        "balance": {
            "available": b.available, "held": b.held, "debt": b.debt, "by_source": by_source,
            "next_expiry": next_expiry,
            "allowance_left": b.allowance_left,
        },
        "used_this_period": used,
        "subscription": subscription,
        "recent_purchases": purchases.into_iter().map(|(key, credits, at)| json!({"key": key, "credits": credits, "at": at.to_rfc3339()})).collect::<Vec<_>>(),
    }))
    .into_response()
}

/// Re-reads an account's subscription from Stripe and applies it as the newest state (repair
/// after missed events). Shared by `POST /v1/accounts/{id}/billing/sync` and `tally stripe sync`.
///
/// # Errors
/// A message for people: no customer, Stripe or the database failed.
pub async fn resync_subscription(
    s: &HttpState,
    api: &StripeApi,
    account_id: &AccountId,
) -> Result<serde_json::Value, String> {
    let customer = s
        .ledger
        .customer_of(account_id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            "the account has no Stripe customer (it never went to Checkout)".to_owned()
        })?;
    let Some(object) = api
        .latest_subscription(&customer)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(json!({"account_id": account_id.as_str(), "subscription": null}));
    };
    let now = chrono::Utc::now().timestamp();
    let event = Envelope {
        id: format!(
            "resync:{}:{}",
            account_id.as_str(),
            uuid::Uuid::now_v7().simple()
        ),
        kind: "customer.subscription.updated".into(),
        livemode: Some(s.livemode),
        // Read from Stripe just now: newer than any event received so far.
        created: Some(now),
        api_version: None,
        data: crate::stripe::event::Data {
            object: object.clone(),
        },
    };
    let response = apply_event(s, &event).await;
    if !response.status().is_success() {
        return Err(format!(
            "could not apply the subscription ({})",
            response.status()
        ));
    }
    let plan = s
        .ledger
        .check_balance(account_id)
        .await
        .map_err(|e| e.to_string())?
        .plan;
    Ok(
        json!({"account_id": account_id.as_str(), "plan": plan, "subscription": {
        "id": object["id"], "status": object["status"], "cancel_at_period_end": object["cancel_at_period_end"]}}),
    )
}

async fn sync_subscription(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let api = match authorize(&s, &headers, Some(&id), true).and_then(|_| stripe_api(&s)) {
        Ok(api) => api,
        Err(resp) => return resp,
    };
    let account_id = match account(&id) {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    match resync_subscription(&s, api, &account_id).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, "SYNC_FAILED", e),
    }
}
