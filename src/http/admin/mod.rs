//! The admin console: support and finance work in a browser, under `/admin` on the HTTP
//! sidecar (`--admin-console`).
//!
//! Server-rendered HTML (maud: every value is escaped), usable with JavaScript off; one
//! vendored script (`assets/console.js`) only adds conveniences. Sign-in exchanges an
//! admin-role token for a session cookie signed with the session key (HMAC-SHA256): nothing is
//! stored server-side, so every replica sharing the key (`--admin-session-key`) accepts it, and
//! a token removed from the callers file ends its sessions at once. Every form carries a CSRF
//! token derived from the session; every page a strict Content-Security-Policy (no inline
//! script or style), `X-Frame-Options: DENY` and `Cache-Control: no-store`.
//!
//! Actions go through the same parsing, ledger calls and idempotency as the gRPC AdminService:
//! the form's idempotency key is minted when the form is drawn, so a double-submitted form is
//! applied once.
#![allow(clippy::result_large_err)] // a handler step fails with the `Response` to send

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use hmac::{KeyInit as _, Mac as _};
use maud::{DOCTYPE, Markup, html};
use sha2::{Digest as _, Sha256};

use super::HttpState;
use crate::auth::{Denied, Principal, Role};
use crate::ledger::{Dashboard, ServiceError, Violation};

mod actions;
mod chart;
mod pages;

/// How long a session lasts by default: 8 hours.
pub const SESSION_TTL_DEFAULT: Duration = Duration::from_hours(8);
/// The longest session: 24 hours.
pub const SESSION_TTL_MAX: Duration = Duration::from_hours(24);
/// Shortest session key accepted: 32 bytes.
pub const SESSION_KEY_MIN_LEN: usize = 32;
/// Largest form body: 16 KiB.
pub const FORM_BODY_MAX_BYTES: usize = 16 * 1024;
/// Rows per page of every list.
pub const PAGE_SIZE: u32 = 50;
/// How long the dashboard's numbers are served as they are: 60 seconds. Older numbers are
/// still served at once while one background read replaces them (their aggregation reads every
/// commit of the 30 days: about a second at 1 M entries).
pub const DASHBOARD_FRESH: Duration = Duration::from_mins(1);
/// Days the dashboard covers.
pub const DASHBOARD_DAYS: i64 = 30;
/// How long the sign-in form stays valid: 10 minutes.
const LOGIN_TTL_SECS: i64 = 600;

const SESSION_COOKIE: &str = "tally_admin";
const LOGIN_COOKIE: &str = "tally_admin_login";

/// The policy on every console page: only this origin's script, style, images and forms; no
/// inline script or style, no framing, no plugins.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

/// The key sessions and CSRF tokens are signed with.
#[derive(Clone)]
pub struct SessionKey([u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(…)")
    }
}

impl SessionKey {
    /// A random key: sessions last until this process stops and only it accepts them.
    #[must_use]
    pub fn random() -> Self {
        let mut k = [0u8; 32];
        k[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        k[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        Self(k)
    }

    /// A key from a configured secret (every replica given the same secret accepts the same
    /// sessions).
    ///
    /// # Errors
    /// A message (never the secret) when it is shorter than [`SESSION_KEY_MIN_LEN`] bytes.
    pub fn from_secret(secret: &str) -> Result<Self, String> {
        if secret.trim().len() < SESSION_KEY_MIN_LEN {
            return Err(format!(
                "--admin-session-key must be at least {SESSION_KEY_MIN_LEN} bytes (e.g. `openssl rand -hex 32`)"
            ));
        }
        let mut h = Sha256::new();
        h.update(b"tally admin session key\n");
        h.update(secret.trim().as_bytes());
        Ok(Self(h.finalize().into()))
    }

    /// HMAC-SHA256 of the parts (length-prefixed), base64url.
    fn mac(&self, parts: &[&str]) -> String {
        let Ok(mut m) = hmac::Hmac::<Sha256>::new_from_slice(&self.0) else {
            return String::new();
        };
        for p in parts {
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p.as_bytes());
        }
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
    }

    /// Whether `mac` is the MAC of `parts` (constant time).
    fn verify(&self, parts: &[&str], mac: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        let want = self.mac(parts);
        want.len() == mac.len() && bool::from(want.as_bytes().ct_eq(mac.as_bytes()))
    }
}

/// What the last reconciliation found (the periodic one, or one an operator started).
#[derive(Clone, Debug)]
pub struct AuditResult {
    /// When it finished.
    pub at: DateTime<Utc>,
    /// How long it took.
    pub took: Duration,
    /// The violations, or why it failed.
    pub outcome: Result<Vec<Violation>, String>,
}

/// The last reconciliation's result, shared by the audit loop and the console.
#[derive(Clone, Debug, Default)]
pub struct AuditStatus(Arc<Mutex<Option<AuditResult>>>);

impl AuditStatus {
    /// Stores a result.
    pub fn record(&self, result: AuditResult) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some(result);
        }
    }

    /// The last result.
    #[must_use]
    pub fn last(&self) -> Option<AuditResult> {
        self.0.lock().ok().and_then(|g| g.clone())
    }
}

/// The dashboard's numbers as last read.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    /// When they were read (for freshness).
    pub at: Instant,
    /// When they were read (shown).
    pub as_of: DateTime<Utc>,
    /// The numbers.
    pub data: Arc<Dashboard>,
}

/// The console's state.
#[derive(Debug)]
pub struct Console {
    key: SessionKey,
    ttl: Duration,
    audit: AuditStatus,
    dashboard: Mutex<Option<Snapshot>>,
    /// Held by the one read of the dashboard's numbers in flight.
    refresh: Arc<tokio::sync::Mutex<()>>,
}

impl Console {
    /// A console signing sessions with `key`, each lasting `ttl`.
    #[must_use]
    pub fn new(key: SessionKey, ttl: Duration, audit: AuditStatus) -> Self {
        Self {
            key,
            ttl,
            audit,
            dashboard: Mutex::new(None),
            refresh: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The dashboard's last numbers.
    pub(crate) fn snapshot(&self) -> Option<Snapshot> {
        self.dashboard.lock().ok().and_then(|g| g.clone())
    }

    /// Keeps new numbers.
    pub(crate) fn keep(&self, data: Dashboard) -> Snapshot {
        let snap = Snapshot {
            at: Instant::now(),
            as_of: Utc::now(),
            data: Arc::new(data),
        };
        if let Ok(mut g) = self.dashboard.lock() {
            *g = Some(snap.clone());
        }
        snap
    }

    /// The lock of the read in flight.
    pub(crate) fn refresh_lock(&self) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(&self.refresh)
    }

    /// The reconciliation status it shows.
    #[must_use]
    pub fn audit(&self) -> &AuditStatus {
        &self.audit
    }
}

/// The console's routes (merged into the sidecar's router when enabled).
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/admin", get(|| async { Redirect::to("/admin/accounts") }))
        .route("/admin/", get(|| async { Redirect::to("/admin/accounts") }))
        .route("/admin/login", get(pages::login_form).post(pages::login))
        .route("/admin/logout", post(pages::logout))
        .route("/admin/accounts", get(pages::accounts))
        .route("/admin/accounts/{id}", get(pages::account))
        .route("/admin/accounts/{id}/actions/{action}", post(actions::act))
        .route("/admin/dashboard", get(pages::dashboard))
        .route("/admin/dashboard.csv", get(pages::dashboard_csv))
        .route("/admin/stripe", get(pages::stripe))
        .route("/admin/reconcile", post(pages::reconcile))
        .route("/admin/assets/console.css", get(css))
        .route("/admin/assets/console.js", get(js))
        .layer(axum::extract::DefaultBodyLimit::max(FORM_BODY_MAX_BYTES))
        .layer(axum::middleware::from_fn(secure_headers))
}

/// The headers every console response carries.
async fn secure_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("assets/console.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("assets/console.js"),
    )
        .into_response()
}

/// A signed-in operator.
pub(crate) struct Session {
    /// The caller (its name is the operator recorded on adjustments).
    pub principal: Arc<Principal>,
    /// The token every form of this session carries.
    pub csrf: String,
    /// The console.
    pub console: Arc<Console>,
}

impl Session {
    /// The operator's name.
    pub fn operator(&self) -> &str {
        self.principal.caller.as_str()
    }

    /// `Ok` when the CSRF token is this session's.
    pub fn check_csrf(&self, token: Option<&str>) -> Result<(), Response> {
        use subtle::ConstantTimeEq as _;
        match token {
            Some(t)
                if t.len() == self.csrf.len()
                    && bool::from(t.as_bytes().ct_eq(self.csrf.as_bytes())) =>
            {
                Ok(())
            }
            _ => Err(error_page(
                Some(self),
                StatusCode::FORBIDDEN,
                "Form expired",
                "This form's security token is missing or belongs to another session. Nothing was changed. Go back, reload the page and try again.",
            )),
        }
    }

    /// Takes one request from the caller's rate budget (`sensitive`: the lower admin tier too).
    pub fn admit(&self, sensitive: bool) -> Result<(), Response> {
        self.principal.admit(sensitive).map_err(|d| {
            error_page(
                Some(self),
                StatusCode::TOO_MANY_REQUESTS,
                "Slow down",
                &d.to_string(),
            )
        })
    }

    /// `Ok` when the operator may see or change `account`.
    pub fn may_access(&self, account: &str) -> Result<(), Response> {
        self.allowed(
            self.principal.may_access(account),
            &Denied::Account.to_string(),
        )
    }

    /// `Ok` when the operator may see every account (the dashboard, the Stripe log).
    pub fn unrestricted(&self) -> Result<(), Response> {
        self.allowed(
            self.principal.unrestricted(),
            "This page covers every account; your token is limited to some.",
        )
    }

    /// `Ok` when `allowed`, else a 403 page saying `why`.
    fn allowed(&self, allowed: bool, why: &str) -> Result<(), Response> {
        if allowed {
            Ok(())
        } else {
            Err(error_page(
                Some(self),
                StatusCode::FORBIDDEN,
                "Not yours",
                why,
            ))
        }
    }
}

/// The console, or 404 when it is off.
fn console(s: &HttpState) -> Result<Arc<Console>, Response> {
    s.admin
        .clone()
        .ok_or_else(|| (StatusCode::NOT_FOUND, "the admin console is off").into_response())
}

/// The value of cookie `name`.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether the browser reached us over TLS (a terminating proxy says so in
/// `X-Forwarded-Proto`; the sidecar itself speaks plain HTTP). Only ever adds `Secure`.
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, path `/admin`, `Secure` over TLS.
fn set_cookie(name: &str, value: &str, max_age: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Max-Age={max_age}; Path=/admin; HttpOnly; SameSite=Strict{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("tally_admin=; Max-Age=0; Path=/admin"))
}

/// A new random value for nonces and idempotency keys (32 hex digits).
fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A session cookie's value: `expiry.subject.nonce.mac`.
fn mint_session(c: &Console, subject: &str, now: DateTime<Utc>) -> String {
    let ttl = i64::try_from(c.ttl.as_secs()).unwrap_or(i64::MAX);
    let exp = now.timestamp().saturating_add(ttl).to_string();
    let n = nonce();
    let mac = c.key.mac(&["session", &exp, subject, &n]);
    format!("{exp}.{subject}.{n}.{mac}")
}

/// The signed-in operator of a request, or the sign-in page to send.
pub(crate) fn session(s: &HttpState, headers: &HeaderMap) -> Result<Session, Response> {
    let console = console(s)?;
    let to_login = || Redirect::to("/admin/login").into_response();
    let value = cookie(headers, SESSION_COOKIE).ok_or_else(to_login)?;
    let mut parts = value.splitn(4, '.');
    let (Some(exp), Some(subject), Some(n), Some(mac)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(to_login());
    };
    if !console.key.verify(&["session", exp, subject, n], mac) {
        return Err(to_login());
    }
    let exp: i64 = exp.parse().map_err(|_| to_login())?;
    if exp <= Utc::now().timestamp() {
        return Err(to_login());
    }
    let principal = s.auth.by_subject(subject).ok_or_else(to_login)?;
    if !principal.has(Role::Admin) {
        return Err(to_login());
    }
    let csrf = console.key.mac(&["csrf", n]);
    Ok(Session {
        principal,
        csrf,
        console,
    })
}

/// A page in the console's frame.
pub(crate) fn page(s: Option<&Session>, title: &str, body: &Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Tally admin" }
                link rel="stylesheet" href="/admin/assets/console.css";
                script src="/admin/assets/console.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/admin/accounts" { "Tally" }
                    @if let Some(s) = s {
                        nav {
                            a href="/admin/accounts" { "Accounts" }
                            a href="/admin/dashboard" { "Dashboard" }
                            a href="/admin/stripe" { "Stripe" }
                        }
                        form.signout method="post" action="/admin/logout" {
                            span.who { "Signed in as " strong { (s.operator()) } }
                            input type="hidden" name="csrf" value=(s.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

/// An HTML response.
pub(crate) fn html_response(status: StatusCode, m: &Markup) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        m.0.clone(),
    )
        .into_response()
}

/// An error page (the message is escaped like everything else).
pub(crate) fn error_page(
    s: Option<&Session>,
    status: StatusCode,
    title: &str,
    message: &str,
) -> Response {
    let body = html! {
        p.error { (message) }
        p { a href="/admin/accounts" { "Back to accounts" } }
    };
    html_response(status, &page(s, title, &body))
}

/// The page for a failed ledger call.
pub(crate) fn service_error(s: &Session, e: &ServiceError) -> Response {
    let (status, title) = match e {
        ServiceError::Invalid(_) => (StatusCode::BAD_REQUEST, "Check the form"),
        ServiceError::Rejected(crate::domain::LedgerError::AccountNotFound) => {
            (StatusCode::NOT_FOUND, "No such account")
        }
        ServiceError::Rejected(crate::domain::LedgerError::HoldNotFound) => {
            (StatusCode::NOT_FOUND, "No such hold")
        }
        ServiceError::Rejected(_) => (StatusCode::CONFLICT, "Not done"),
        ServiceError::Contended
        | ServiceError::Unavailable(_)
        | ServiceError::InDoubt(_)
        | ServiceError::TooManyStreams(_)
        | ServiceError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "Try again"),
        ServiceError::Internal(m) => {
            tracing::error!(error.message = %m, "admin console: internal error");
            (StatusCode::INTERNAL_SERVER_ERROR, "Internal error")
        }
    };
    let text = match e {
        ServiceError::Invalid(v) => v
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    };
    let note = match e {
        ServiceError::Contended | ServiceError::Unavailable(_) | ServiceError::InDoubt(_) => {
            " Submitting the same form again is safe: it is applied at most once."
        }
        _ => " Nothing was changed.",
    };
    error_page(Some(s), status, title, &format!("{text}.{note}"))
}

/// Percent-encodes a query or form value.
pub fn enc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':' | b'@') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Formats credits with thousands separators.
pub(crate) fn credits(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("−{out}") } else { out }
}

/// A time as the console shows it (UTC, to the second).
pub(crate) fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_bind_every_part_and_the_key() {
        let k = SessionKey::from_secret(&"x".repeat(32)).expect("key");
        let m = k.mac(&["session", "1", "ab", "n"]);
        assert!(k.verify(&["session", "1", "ab", "n"], &m));
        assert!(!k.verify(&["session", "1a", "b", "n"], &m));
        assert!(!SessionKey::random().verify(&["session", "1", "ab", "n"], &m));
        assert!(SessionKey::from_secret("short").is_err());
    }

    #[test]
    fn numbers_and_queries_format() {
        assert_eq!(credits(1_234_567), "1,234,567");
        assert_eq!(credits(-50), "−50");
        assert_eq!(credits(0), "0");
        assert_eq!(enc("a b&<"), "a%20b%26%3C");
    }
}
