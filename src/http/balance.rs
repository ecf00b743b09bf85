//! `GET /v1/accounts/{id}/balance/stream`: an account's live balance as Server-Sent Events,
//! for a product's backend to pass on to its pages (billing role, tenant prefixes as
//! everywhere).
//!
//! Each event is `event: balance`, `id: <version>`, and the balance as JSON in `data`; the
//! first comes at once (unless `Last-Event-ID` already names the current version), then one per
//! committed change (the newest state, never a queue: see [`crate::ledger::watch`]). A comment
//! line every heartbeat (15 s by default) keeps proxies from closing an idle stream. When the
//! server stops, a last `event: shutdown` and the end of the stream: `EventSource` reconnects
//! (after `retry`, 1 s) with `Last-Event-ID` and misses nothing.

use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::HttpState;
use super::billing::{account, authorize, error, invalid, ledger_error};
use crate::catalog::Catalog;
use crate::domain::Balance;

/// How long a browser's `EventSource` waits before reconnecting: 1 s.
pub const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// Longest `Last-Event-ID` header accepted: 19 characters (a version is 0..=2^63-1).
pub const LAST_EVENT_ID_MAX_LEN: usize = 19;

/// The balance stream's route (merged into the sidecar's router).
pub fn routes() -> Router<HttpState> {
    Router::new().route("/v1/accounts/{id}/balance/stream", get(stream))
}

/// A balance's credits per source and next expiry as JSON (the stream's and the billing
/// view's).
#[must_use]
pub fn breakdown_json(b: &Balance) -> (Value, Value) {
    let by_source: serde_json::Map<String, Value> = b
        .by_source
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), json!(v)))
        .collect();
    let next_expiry = b
        .next_expiry
        .map(|(at, amount)| json!({"at": at.to_rfc3339(), "amount": amount}));
    (Value::Object(by_source), json!(next_expiry))
}

/// A balance as the stream's JSON (the fields of `CheckBalance`, plus `version`).
#[must_use]
pub fn balance_json(catalog: &Catalog, b: &Balance) -> Value {
    let (by_source, next_expiry) = breakdown_json(b);
    let low = catalog.is_low(&b.plan, b.available);
    json!({
        "account_id": b.account_id,
        "version": b.version,
        "plan": b.plan,
        "available": b.available,
        "held": b.held,
        "debt": b.debt,
        "open_holds": b.open_holds,
        "low_balance": low,
        "by_source": by_source,
        "next_expiry": next_expiry,
        "allowance_left": b.allowance_left,
    })
}

/// The version a reconnecting `EventSource` sends, if any.
#[allow(clippy::result_large_err)] // a ready answer, as the billing handlers do
fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>, Response> {
    let Some(v) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or_default().trim();
    if text.is_empty() {
        return Ok(None);
    }
    match text.parse::<i64>() {
        Ok(n) if n >= 0 && text.len() <= LAST_EVENT_ID_MAX_LEN => Ok(Some(n)),
        _ => Err(invalid(
            "Last-Event-ID must be a version this stream sent (a whole number, 0 or more)",
        )),
    }
}

async fn stream(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let principal = match authorize(&s, &headers, Some(&id), false) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let account_id = match account(&id) {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let after = match last_event_id(&headers) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let Some(balances) = &s.balances else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "live balances are not served here",
        );
    };
    let watch = match balances
        .watch(principal.caller.as_str(), &account_id, after)
        .await
    {
        Ok(w) => w,
        Err(e) => return ledger_error(&e),
    };
    let catalog = s.catalog;
    let events = futures_util::stream::unfold((watch, true), move |(mut w, first)| {
        let catalog = std::sync::Arc::clone(&catalog);
        async move {
            let event = match w.next().await? {
                Ok(snap) => {
                    let e = Event::default()
                        .event("balance")
                        .id(snap.balance.version.to_string())
                        .data(balance_json(&catalog, &snap.balance).to_string());
                    if first { e.retry(RECONNECT_AFTER) } else { e }
                }
                Err(e) => Event::default()
                    .event("shutdown")
                    .retry(RECONNECT_AFTER)
                    .data(json!({"reason": "SHUTTING_DOWN", "message": e.to_string()}).to_string()),
            };
            Some((Ok::<_, std::convert::Infallible>(event), (w, false)))
        }
    });
    let mut resp = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(s.heartbeat).text("heartbeat"))
        .into_response();
    // Proxies that buffer responses (nginx) would hold the events back.
    resp.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    resp
}
