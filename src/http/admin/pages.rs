//! The console's pages: sign-in, accounts, an account, the dashboard, the Stripe log.
#![allow(clippy::many_single_char_names)] // s: state, q: query, f: form, as in every handler

use std::fmt::Write as _;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use maud::{Markup, html};
use serde::Deserialize;

use super::{
    AuditResult, DASHBOARD_DAYS, DASHBOARD_FRESH, LOGIN_COOKIE, LOGIN_TTL_SECS, PAGE_SIZE,
    SESSION_COOKIE, chart, console, cookie, credits, enc, error_page, html_response, mint_session,
    nonce, over_tls, page, service_error, session, set_cookie, when,
};
use crate::domain::rules::EntryKind;
use crate::domain::{AccountId, HoldState};
use crate::grpc::convert::thresholds;
use crate::http::HttpState;
use crate::ledger::{
    AccountQuery, Dashboard, DashboardQuery, EntryCursor, EntryQuery, EventQuery, HoldQuery,
    ServiceError,
};

/// Open holds shown on an account page.
pub const OPEN_HOLDS_SHOWN: u32 = 50;
/// Committed holds shown (refundable).
pub const COMMITTED_HOLDS_SHOWN: u32 = 20;
/// Purchases and outbound events shown on an account page.
pub const RECENT_SHOWN: u32 = 20;
/// Accounts in the dashboard's top list.
pub const TOP_ACCOUNTS: u32 = 10;

#[derive(Deserialize)]
pub(super) struct LoginForm {
    token: String,
    csrf: Option<String>,
}

pub(super) async fn login_form(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let c = match console(&s) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if session(&s, &headers).is_ok() {
        return Redirect::to("/admin/accounts").into_response();
    }
    login_page(&s, &c, StatusCode::OK, None, over_tls(&headers))
}

/// The sign-in form, with a fresh CSRF token bound to the cookie set with it.
fn login_page(
    s: &HttpState,
    c: &super::Console,
    status: StatusCode,
    problem: Option<&str>,
    secure: bool,
) -> Response {
    let n = nonce();
    let exp = (Utc::now().timestamp() + LOGIN_TTL_SECS).to_string();
    let csrf = c.key.mac(&["login", &exp, &n]);
    let body = login_body(s, &csrf, problem);
    let mut res = html_response(status, &page(None, "Sign in", &body));
    res.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(LOGIN_COOKIE, &format!("{exp}.{n}"), LOGIN_TTL_SECS, secure),
    );
    res
}

fn login_body(s: &HttpState, csrf: &str, problem: Option<&str>) -> Markup {
    html! {
        @if let Some(p) = problem { p.error { (p) } }
        form.login method="post" action="/admin/login" {
            input type="hidden" name="csrf" value=(csrf);
            @if s.auth.is_open() {
                p.note { "No callers are configured: this loopback server signs you in as the open caller. Leave the token empty." }
            }
            label { "Admin token " input type="password" name="token" autocomplete="off" autofocus; }
            button type="submit" { "Sign in" }
        }
        p.note { "Use a token of a caller with the " code { "admin" } " role. The token is exchanged for a session cookie and never stored." }
    }
}

pub(super) async fn login(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let c = match console(&s) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let secure = over_tls(&headers);
    // The sign-in form's own CSRF check: its token is bound to the cookie set with the form.
    let fresh = cookie(&headers, LOGIN_COOKIE)
        .and_then(|v| v.split_once('.'))
        .is_some_and(|(exp, n)| {
            exp.parse::<i64>().is_ok_and(|e| e > Utc::now().timestamp())
                && f.csrf
                    .as_deref()
                    .is_some_and(|t| c.key.verify(&["login", exp, n], t))
        });
    if !fresh {
        return error_page(
            None,
            StatusCode::FORBIDDEN,
            "Sign-in form expired",
            "The sign-in form's security token is missing or expired. Open the sign-in page again.",
        );
    }
    let retry = |problem: &str| login_page(&s, &c, StatusCode::UNAUTHORIZED, Some(problem), secure);
    let Ok((subject, principal)) = s.auth.sign_in(&f.token) else {
        tracing::warn!(target: "tally::audit", "admin console: sign-in refused (unknown token)");
        return retry("That token is not valid.");
    };
    if !principal.has(crate::auth::Role::Admin) {
        tracing::warn!(target: "tally::audit", caller = %principal.caller.as_str(), "admin console: sign-in refused (no admin role)");
        return retry("That caller lacks the admin role.");
    }
    tracing::info!(target: "tally::audit", operator = %principal.caller.as_str(), "admin console: signed in");
    let value = mint_session(&c, &subject, Utc::now());
    let ttl = i64::try_from(c.ttl.as_secs()).unwrap_or(i64::MAX);
    let mut res = Redirect::to("/admin/accounts").into_response();
    res.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, &value, ttl, secure),
    );
    res.headers_mut()
        .append(header::SET_COOKIE, set_cookie(LOGIN_COOKIE, "", 0, secure));
    res
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    csrf: Option<String>,
}

pub(super) async fn logout(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    let sess = match session(&s, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(r) = sess.check_csrf(f.csrf.as_deref()) {
        return r;
    }
    tracing::info!(target: "tally::audit", operator = %sess.operator(), "admin console: signed out");
    let mut res = Redirect::to("/admin/login").into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, "", 0, over_tls(&headers)),
    );
    res
}

#[derive(Deserialize, Default)]
pub(super) struct AccountsQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    plan: String,
    #[serde(default)]
    low: Option<String>,
    #[serde(default)]
    after: Option<String>,
}

pub(super) async fn accounts(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<AccountsQuery>,
) -> Response {
    let sess = match session(&s, &headers).and_then(|x| x.admit(false).map(|()| x)) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let prefix = q.q.trim();
    if prefix.len() > crate::domain::ids::ACCOUNT_ID_MAX_LEN {
        return error_page(
            Some(&sess),
            StatusCode::BAD_REQUEST,
            "Check the search",
            "An account id is at most 128 characters.",
        );
    }
    let low = q.low.as_deref().is_some_and(|v| !v.is_empty());
    let query = AccountQuery {
        plan: (!q.plan.is_empty()).then(|| q.plan.clone()),
        low_balance: low.then(|| thresholds(&s.catalog)),
        prefix: (!prefix.is_empty()).then(|| prefix.to_owned()),
        after: q.after.clone().filter(|a| !a.is_empty()),
        limit: PAGE_SIZE,
    };
    let rows = match s.ledger.list_accounts(&query).await {
        Ok(r) => r,
        Err(e) => return service_error(&sess, &e),
    };
    let full = rows.len() == usize::try_from(PAGE_SIZE).unwrap_or(usize::MAX);
    let next = full
        .then(|| rows.last().map(|r| r.account_id.clone()))
        .flatten();
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|r| sess.principal.may_access(&r.account_id))
        .collect();
    let plans: Vec<&String> = s.catalog.plans.keys().collect();
    let body = html! {
        form.filters method="get" action="/admin/accounts" {
            label { "Account id starts with " input type="search" name="q" value=(prefix) maxlength="128" autofocus; }
            label { "Plan "
                select name="plan" data-autosubmit {
                    option value="" { "any" }
                    @for p in &plans {
                        option value=(p) selected[**p == q.plan] { (p) }
                    }
                }
            }
            label.check { input type="checkbox" name="low" value="1" checked[low] data-autosubmit; " low balance only" }
            button type="submit" { "Search" }
        }
        table.list #accounts {
            thead { tr { th { "Account" } th { "Plan" } th.num { "Balance" } th.num { "Held" } th.num { "Debt" } th { "Last activity (UTC)" } } }
            tbody {
                @for r in &rows {
                    tr {
                        td { a href={ "/admin/accounts/" (enc(&r.account_id)) } { (r.account_id) } }
                        td { (r.plan) }
                        td.num { (credits(r.available)) }
                        td.num { (credits(r.held)) }
                        td.num { (credits(r.debt)) }
                        td { (when(r.updated_at)) }
                    }
                }
                @if rows.is_empty() { tr { td colspan="6" { "No accounts match." } } }
            }
        }
        @if let Some(n) = next {
            p.pager { a rel="next" href={ "/admin/accounts?q=" (enc(prefix)) "&plan=" (enc(&q.plan)) @if low { "&low=1" } "&after=" (enc(&n)) } { "Next page →" } }
        }
    };
    html_response(StatusCode::OK, &page(Some(&sess), "Accounts", &body))
}

#[derive(Deserialize, Default)]
pub(super) struct AccountPageQuery {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    #[serde(default)]
    before: String,
    #[serde(default)]
    done: String,
}

/// A `YYYY-MM-DD` date as midnight UTC (`None` when empty).
fn day(field: &str, v: &str) -> Result<Option<DateTime<Utc>>, String> {
    if v.trim().is_empty() {
        return Ok(None);
    }
    NaiveDate::parse_from_str(v.trim(), "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| Some(t.and_utc()))
        .ok_or_else(|| format!("{field} must be a date (YYYY-MM-DD)"))
}

/// What a finished action says on the account page (a fixed text per action: nothing from the
/// request is echoed).
fn done_text(done: &str) -> Option<&'static str> {
    Some(match done {
        "grant" => "Granted.",
        "adjust" => "Adjusted.",
        "set_plan" => "Plan changed.",
        "transfer" => "Transferred.",
        "release" => "Hold released.",
        "refund" => "Refunded.",
        "replayed" => "Already done: this form was submitted before, and was applied once.",
        _ => return None,
    })
}

#[allow(clippy::too_many_lines)] // one page, many sections
pub(super) async fn account(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<AccountPageQuery>,
) -> Response {
    let sess = match session(&s, &headers).and_then(|x| x.admit(false).map(|()| x)) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let account_id = match AccountId::parse("account_id", &id) {
        Ok(a) => a,
        Err(v) => {
            return error_page(
                Some(&sess),
                StatusCode::BAD_REQUEST,
                "Check the account id",
                &v.to_string(),
            );
        }
    };
    if let Err(r) = sess.may_access(account_id.as_str()) {
        return r;
    }
    let kinds = match q.kind.as_str() {
        "" => Vec::new(),
        k => match EntryKind::parse(k) {
            Some(k) => vec![k],
            None => {
                return error_page(
                    Some(&sess),
                    StatusCode::BAD_REQUEST,
                    "Check the filter",
                    "Unknown entry kind.",
                );
            }
        },
    };
    let (since, until) = match (day("since", &q.since), day("until", &q.until)) {
        (Ok(a), Ok(b)) => (a, b.map(|t| t + TimeDelta::days(1))),
        (Err(e), _) | (_, Err(e)) => {
            return error_page(Some(&sess), StatusCode::BAD_REQUEST, "Check the filter", &e);
        }
    };
    let before = match q.before.trim() {
        "" => None,
        b => match b.parse::<i64>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                return error_page(
                    Some(&sess),
                    StatusCode::BAD_REQUEST,
                    "Check the page",
                    "Bad page position.",
                );
            }
        },
    };
    let l = &s.ledger;
    let summary = match l.account(&account_id).await {
        Ok(x) => x,
        Err(e) => return service_error(&sess, &e),
    };
    let entry_query = EntryQuery {
        account_id: Some(account_id.clone()),
        kinds,
        since,
        until,
        cursor: EntryCursor::Before(before),
        limit: PAGE_SIZE,
    };
    let holds = |states: Vec<HoldState>, limit| HoldQuery {
        account_id: account_id.clone(),
        states,
        before: None,
        limit,
    };
    let open_q = holds(vec![HoldState::Open], OPEN_HOLDS_SHOWN);
    let committed_q = holds(vec![HoldState::Committed], COMMITTED_HOLDS_SHOWN);
    let events_q = EventQuery {
        account_id: Some(account_id.as_str().to_owned()),
        limit: RECENT_SHOWN,
        ..EventQuery::default()
    };
    let read = tokio::try_join!(
        l.grants(&account_id),
        l.list_entries(&entry_query),
        l.list_holds(&open_q),
        l.list_holds(&committed_q),
        l.customer_of(&account_id),
        l.subscriptions(&account_id),
        l.purchases(&account_id, RECENT_SHOWN),
        l.list_events(&events_q),
    );
    let (grants, entries, open, committed, customer, subs, purchases, events) = match read {
        Ok(r) => r,
        Err(e) => return service_error(&sess, &e),
    };
    let b = &summary.balance;
    let next_entries = (entries.len() == usize::try_from(PAGE_SIZE).unwrap_or(usize::MAX))
        .then(|| entries.last().map(|e| e.entry_id))
        .flatten();
    let aid = account_id.as_str();
    let base = format!("/admin/accounts/{}", enc(aid));
    let low = crate::grpc::convert::is_low(&s.catalog, &b.plan, b.available);
    let forms = super::actions::Forms::new(&sess, aid);
    let body = html! {
        @if let Some(t) = done_text(&q.done) { p.notice role="status" { (t) } }
        section.balance {
            dl.figures {
                div { dt { "Available" } dd #available { (credits(b.available)) } }
                div { dt { "Held" } dd #held { (credits(b.held)) } }
                div { dt { "Debt" } dd #debt { (credits(b.debt)) } }
                div { dt { "Open holds" } dd { (b.open_holds) } }
                div { dt { "Plan" } dd #plan { (b.plan) } }
                @if let Some(left) = b.allowance_left { div { dt { "Allowance left" } dd { (credits(left)) } } }
            }
            @if low { p.warn { "Below the plan's low-balance threshold." } }
            p.note { "Created " (when(summary.created_at)) " UTC · version " (b.version) }
            h2 { "By source" }
            table.list #by-source {
                thead { tr { th { "Source" } th.num { "Credits" } } }
                tbody { @for (src, n) in &b.by_source { tr { td { (src.as_str()) } td.num { (credits(*n)) } } } }
            }
            @if let Some((at, n)) = b.next_expiry { p.note { (credits(n)) " credits expire " (when(at)) " UTC" } }
        }
        section.actions {
            h2 { "Actions" }
            (forms.all(&s.catalog))
        }
        section {
            h2 { "Grants, in consumption order" }
            table.list #grants {
                thead { tr { th { "Grant" } th { "Source" } th.num { "Granted" } th.num { "Left" } th.num { "Held" } th { "Expires (UTC)" } th.num { "Priority" } th { "Reason" } } }
                tbody {
                    @for g in &grants {
                        tr {
                            td.mono { (g.grant_id) }
                            td { (g.source.as_str()) }
                            td.num { (credits(g.granted)) }
                            td.num { (credits(g.remaining)) }
                            td.num { (credits(g.held)) }
                            td { @if let Some(t) = g.expires_at { (when(t)) } @else { "never" } }
                            td.num { (g.priority) }
                            td { (g.reason) }
                        }
                    }
                    @if grants.is_empty() { tr { td colspan="8" { "No live grants." } } }
                }
            }
        }
        section {
            h2 { "Open holds" }
            table.list #open-holds {
                thead { tr { th { "Hold" } th.num { "Amount" } th { "Created (UTC)" } th { "Expires (UTC)" } th { "Labels" } th { "" } } }
                tbody {
                    @for h in &open {
                        tr {
                            td.mono { (h.hold_id) }
                            td.num { (credits(h.amount)) }
                            td { (when(h.created_at)) }
                            td { (when(h.expires_at)) }
                            td { (labels(&h.metadata)) }
                            td { (forms.release(&h.hold_id)) }
                        }
                    }
                    @if open.is_empty() { tr { td colspan="6" { "No open holds." } } }
                }
            }
            h2 { "Recently committed holds" }
            table.list #committed-holds {
                thead { tr { th { "Hold" } th.num { "Charged" } th.num { "Refunded" } th { "Settled (UTC)" } th { "Labels" } th { "" } } }
                tbody {
                    @for h in &committed {
                        tr {
                            td.mono { (h.hold_id) }
                            td.num { (credits(h.committed_amount)) }
                            td.num { (credits(h.refunded_amount)) }
                            td { @if let Some(t) = h.resolved_at { (when(t)) } }
                            td { (labels(&h.metadata)) }
                            td { @if h.refunded_amount < h.committed_amount { (forms.refund(&h.hold_id, h.committed_amount - h.refunded_amount)) } }
                        }
                    }
                    @if committed.is_empty() { tr { td colspan="6" { "None." } } }
                }
            }
        }
        section {
            h2 #entries-heading { "Ledger entries" }
            form.filters method="get" action=(base) {
                label { "Kind "
                    select name="kind" data-autosubmit {
                        option value="" { "any" }
                        @for k in EntryKind::ALL { option value=(k.as_str()) selected[k.as_str() == q.kind] { (k.as_str()) } }
                    }
                }
                label { "From " input type="date" name="since" value=(q.since); }
                label { "To " input type="date" name="until" value=(q.until); }
                button type="submit" { "Filter" }
            }
            table.list #entries {
                thead { tr { th.num { "#" } th { "When (UTC)" } th { "Kind" } th.num { "Available" } th.num { "Held" } th { "Hold / grant" } th { "Reason" } } }
                tbody {
                    @for e in &entries {
                        tr {
                            td.num { (e.entry_id) }
                            td { (when(e.created_at)) }
                            td { (e.kind.as_str()) }
                            td.num { (signed(e.available_delta)) }
                            td.num { (signed(e.held_delta)) }
                            td.mono { (e.hold_id.as_deref().or(e.grant_id.as_deref()).unwrap_or("")) }
                            td { (e.reason) }
                        }
                    }
                    @if entries.is_empty() { tr { td colspan="7" { "No entries match." } } }
                }
            }
            @if let Some(n) = next_entries {
                p.pager { a rel="next" href={ (base) "?kind=" (enc(&q.kind)) "&since=" (enc(&q.since)) "&until=" (enc(&q.until)) "&before=" (n) "#entries-heading" } { "Older entries →" } }
            }
        }
        section {
            h2 { "Stripe" }
            p { "Customer: " @if let Some(c) = &customer { span.mono #customer { (c) } } @else { "none linked" } }
            table.list #subscriptions {
                thead { tr { th { "Subscription" } th { "Status" } th { "Plan" } th { "Period ends (UTC)" } th { "Cancels at period end" } } }
                tbody {
                    @for sub in &subs {
                        tr {
                            td.mono { (sub.subscription_id) }
                            td { (sub.status) }
                            td { (sub.plan) }
                            td { @if let Some(t) = sub.period_end.and_then(|t| DateTime::from_timestamp(t, 0)) { (when(t)) } }
                            td { @if sub.cancel_at_period_end { "yes" } @else { "no" } }
                        }
                    }
                    @if subs.is_empty() { tr { td colspan="5" { "No subscriptions." } } }
                }
            }
            table.list #purchases {
                thead { tr { th { "Purchase" } th.num { "Credits" } th { "When (UTC)" } } }
                tbody {
                    @for (key, n, at) in &purchases { tr { td.mono { (key) } td.num { (credits(*n)) } td { (when(*at)) } } }
                    @if purchases.is_empty() { tr { td colspan="3" { "No purchases." } } }
                }
            }
        }
        @if !events.is_empty() {
            section {
                h2 { "Outbound events" }
                table.list #events {
                    thead { tr { th { "Event" } th { "Type" } th { "Endpoint" } th { "State" } th.num { "Attempts" } th { "Created (UTC)" } } }
                    tbody {
                        @for e in &events {
                            tr {
                                td.mono { (e.event_id) }
                                td { (e.kind) }
                                td { (e.endpoint) }
                                td { (e.state.as_str()) }
                                td.num { (e.attempts) }
                                td { (when(e.created_at)) }
                            }
                        }
                    }
                }
            }
        }
    };
    html_response(
        StatusCode::OK,
        &page(Some(&sess), &format!("Account {aid}"), &body),
    )
}

fn signed(n: i64) -> String {
    if n > 0 {
        format!("+{}", credits(n))
    } else {
        credits(n)
    }
}

fn labels(m: &crate::domain::hold::Metadata) -> Markup {
    html! { @for (k, v) in m.pairs() { span.label { (k) "=" (v) } " " } }
}

/// The dashboard's numbers: fresh ones as they are; stale ones at once while one background
/// read replaces them; none yet: read now (one read at a time per replica).
async fn numbers(s: &HttpState, c: &Arc<super::Console>) -> Result<super::Snapshot, ServiceError> {
    match c.snapshot() {
        Some(snap) if snap.at.elapsed() < DASHBOARD_FRESH => Ok(snap),
        Some(snap) => {
            if let Ok(guard) = c.refresh_lock().try_lock_owned() {
                let (s, c) = (s.clone(), Arc::clone(c));
                tokio::spawn(async move {
                    let _guard = guard;
                    match read_numbers(&s).await {
                        Ok(d) => {
                            c.keep(d);
                        }
                        Err(e) => {
                            tracing::warn!(error.message = %e, "admin console: dashboard refresh failed");
                        }
                    }
                });
            }
            Ok(snap)
        }
        None => {
            let lock = c.refresh_lock();
            let _guard = lock.lock().await;
            if let Some(snap) = c.snapshot() {
                return Ok(snap);
            }
            Ok(c.keep(read_numbers(s).await?))
        }
    }
}

async fn read_numbers(s: &HttpState) -> Result<Dashboard, ServiceError> {
    let query = DashboardQuery {
        since: window_start(Utc::now()),
        thresholds: thresholds(&s.catalog),
        top: TOP_ACCOUNTS,
    };
    s.ledger.dashboard(&query).await
}

/// Midnight UTC, `DASHBOARD_DAYS - 1` days ago: the window is today and the 29 days before.
fn window_start(now: DateTime<Utc>) -> DateTime<Utc> {
    let today = now.date_naive();
    (today - TimeDelta::days(DASHBOARD_DAYS - 1))
        .and_hms_opt(0, 0, 0)
        .map_or(now, |t| t.and_utc())
}

/// The window's days, oldest first.
fn days(now: DateTime<Utc>) -> Vec<String> {
    let first = window_start(now).date_naive();
    (0..DASHBOARD_DAYS)
        .map(|i| (first + TimeDelta::days(i)).format("%Y-%m-%d").to_string())
        .collect()
}

/// Per day of the window, the sum of `value` over rows of that day.
fn per_day<'a>(
    days: &[String],
    rows: impl IntoIterator<Item = (&'a str, i64)>,
) -> Vec<(String, i64)> {
    let mut by: BTreeMap<&str, i64> = BTreeMap::new();
    for (day, value) in rows {
        let e = by.entry(day).or_default();
        *e = e.saturating_add(value);
    }
    days.iter()
        .map(|d| (d.clone(), by.get(d.as_str()).copied().unwrap_or(0)))
        .collect()
}

/// Most operations charted one by one (the rest are in the table and the CSV).
const OPERATIONS_CHARTED: usize = 6;

#[allow(clippy::too_many_lines)] // one page, many charts
pub(super) async fn dashboard(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let sess = match overview(&s, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let (d, as_of) = match numbers(&s, &sess.console).await {
        Ok(snap) => (snap.data, snap.as_of),
        Err(e) => return service_error(&sess, &e),
    };
    let now = Utc::now();
    let days = days(now);
    let usage = per_day(&days, d.usage.iter().map(|r| (r.day.as_str(), r.credits)));
    let purchases = per_day(&days, d.purchases.iter().map(|r| (r.day.as_str(), r.count)));
    // Operations by credits used, most first.
    let mut ops: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for r in &d.usage {
        let e = ops.entry(r.operation.as_str()).or_default();
        e.0 = e.0.saturating_add(r.credits);
        e.1 = e.1.saturating_add(r.jobs);
    }
    let mut ops: Vec<(&str, i64, i64)> = ops.into_iter().map(|(o, (c, j))| (o, c, j)).collect();
    ops.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut packs: BTreeMap<&str, (i64, i64, i64)> = BTreeMap::new();
    for r in &d.purchases {
        let e = packs.entry(r.pack.as_str()).or_default();
        e.0 = e.0.saturating_add(r.count);
        e.1 = e.1.saturating_add(r.credits);
        e.2 = e.2.saturating_add(r.paid);
    }
    let total_used: i64 = usage.iter().map(|(_, v)| *v).sum();
    let total_jobs: i64 = ops.iter().map(|o| o.2).sum();
    let revenue: i64 = packs.values().map(|p| p.2).sum();
    let body = html! {
        p.note #as-of { "The last " (DASHBOARD_DAYS) " days (UTC), from " (days.first().map_or("", String::as_str)) " to today; numbers as of " (when(as_of)) " UTC (read again in the background when over " (DASHBOARD_FRESH.as_secs()) " s old)." }
        dl.figures {
            div { dt { "Credits used" } dd #total-used { (credits(total_used)) } }
            div { dt { "Jobs" } dd { (credits(total_jobs)) } }
            div { dt { "Revenue" } dd { (money(revenue)) } }
            div { dt { "Low-balance accounts" } dd #low-count { a href="/admin/accounts?low=1" { (d.low_accounts) } } }
        }
        section {
            h2 { "Credits used per day" }
            (chart::bars("usage", &usage))
            p.csv { a href="/admin/dashboard.csv?table=usage" { "CSV" } }
        }
        section {
            h2 { "Per operation" }
            div.multiples {
                @for (op, ..) in ops.iter().take(OPERATIONS_CHARTED) {
                    figure {
                        figcaption { (op_name(op)) }
                        (chart::bars(&format!("op-{op}"), &per_day(&days, d.usage.iter().filter(|r| r.operation == *op).map(|r| (r.day.as_str(), r.credits)))))
                    }
                }
            }
            table.list #operations {
                thead { tr { th { "Operation" } th.num { "Credits" } th.num { "Jobs" } th.num { "Average credits per job" } } }
                tbody {
                    @for (op, c, j) in &ops {
                        tr { td { (op_name(op)) } td.num { (credits(*c)) } td.num { (credits(*j)) } td.num { @if *j > 0 { (format!("{:.1}", ratio(*c, *j))) } @else { "–" } } }
                    }
                    @if ops.is_empty() { tr { td colspan="4" { "No jobs in the window." } } }
                }
            }
        }
        section {
            h2 { "Purchases per day" }
            (chart::bars("purchases", &purchases))
            table.list #packs {
                thead { tr { th { "Pack" } th.num { "Purchases" } th.num { "Credits" } th.num { "Revenue" } } }
                tbody {
                    @for (pack, (n, c, paid)) in &packs {
                        tr { td { @if pack.is_empty() { "(unknown)" } @else { (pack) } } td.num { (n) } td.num { (credits(*c)) } td.num { (money(*paid)) } }
                    }
                    @if packs.is_empty() { tr { td colspan="4" { "No purchases in the window." } } }
                }
            }
            p.csv { a href="/admin/dashboard.csv?table=purchases" { "CSV" } }
        }
        section {
            h2 { "Top accounts by usage" }
            table.list #top {
                thead { tr { th { "Account" } th.num { "Credits used" } } }
                tbody {
                    @for (a, n) in &d.top { tr { td { a href={ "/admin/accounts/" (enc(a)) } { (a) } } td.num { (credits(*n)) } } }
                    @if d.top.is_empty() { tr { td colspan="2" { "None." } } }
                }
            }
            p.csv { a href="/admin/dashboard.csv?table=top" { "CSV" } }
        }
    };
    html_response(StatusCode::OK, &page(Some(&sess), "Dashboard", &body))
}

/// The operator of a page over every account (the dashboard, the Stripe log).
fn overview(s: &HttpState, headers: &HeaderMap) -> Result<super::Session, Response> {
    let sess = session(s, headers)?;
    sess.admit(false)?;
    sess.unrestricted()?;
    Ok(sess)
}

fn op_name(op: &str) -> &str {
    if op.is_empty() { "(by amount)" } else { op }
}

#[allow(clippy::cast_precision_loss)] // display only
fn ratio(a: i64, b: i64) -> f64 {
    a as f64 / b as f64
}

/// Minor units as a decimal amount (the catalog's prices are in one currency).
fn money(minor: i64) -> String {
    let sign = if minor < 0 { "−" } else { "" };
    let m = minor.unsigned_abs();
    format!(
        "{sign}{}.{:02}",
        credits(i64::try_from(m / 100).unwrap_or(i64::MAX)),
        m % 100
    )
}

#[derive(Deserialize)]
pub(super) struct CsvQuery {
    #[serde(default)]
    table: String,
}

/// A CSV cell: quoted when needed; a leading `= + - @` is made inert for spreadsheets.
fn cell(v: &str) -> String {
    let v = if v.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{v}")
    } else {
        v.to_owned()
    };
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v
    }
}

pub(super) async fn dashboard_csv(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<CsvQuery>,
) -> Response {
    let sess = match overview(&s, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let d = match numbers(&s, &sess.console).await {
        Ok(snap) => snap.data,
        Err(e) => return service_error(&sess, &e),
    };
    let mut out = String::new();
    match q.table.as_str() {
        "usage" => {
            out.push_str("day,operation,credits,jobs\n");
            for r in &d.usage {
                let _ = writeln!(
                    out,
                    "{},{},{},{}",
                    r.day,
                    cell(&r.operation),
                    r.credits,
                    r.jobs
                );
            }
        }
        "purchases" => {
            out.push_str("day,pack,purchases,credits,paid_minor_units\n");
            for r in &d.purchases {
                let _ = writeln!(
                    out,
                    "{},{},{},{},{}",
                    r.day,
                    cell(&r.pack),
                    r.count,
                    r.credits,
                    r.paid
                );
            }
        }
        "top" => {
            out.push_str("account_id,credits_used\n");
            for (a, n) in &d.top {
                let _ = writeln!(out, "{},{n}", cell(a));
            }
        }
        _ => {
            return error_page(
                Some(&sess),
                StatusCode::BAD_REQUEST,
                "Which table?",
                "table must be usage, purchases or top.",
            );
        }
    }
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"tally-{}.csv\"", q.table),
            ),
        ],
        out,
    )
        .into_response()
}

#[derive(Deserialize, Default)]
pub(super) struct StripeQuery {
    /// `micros.event_id` of the last row shown.
    #[serde(default)]
    before: String,
}

pub(super) async fn stripe(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<StripeQuery>,
) -> Response {
    let sess = match overview(&s, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let before = match q.before.split_once('.') {
        None if q.before.is_empty() => None,
        Some((t, id)) if id.len() <= 255 => match t
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_micros)
        {
            Some(t) => Some((t, id.to_owned())),
            None => {
                return error_page(
                    Some(&sess),
                    StatusCode::BAD_REQUEST,
                    "Check the page",
                    "Bad page position.",
                );
            }
        },
        _ => {
            return error_page(
                Some(&sess),
                StatusCode::BAD_REQUEST,
                "Check the page",
                "Bad page position.",
            );
        }
    };
    let rows = match s.ledger.stripe_events(before, PAGE_SIZE).await {
        Ok(r) => r,
        Err(e) => return service_error(&sess, &e),
    };
    let next = (rows.len() == usize::try_from(PAGE_SIZE).unwrap_or(usize::MAX))
        .then(|| {
            rows.last()
                .map(|r| format!("{}.{}", r.received_at.timestamp_micros(), r.event_id))
        })
        .flatten();
    let audit = sess.console.audit().last();
    let body = html! {
        section #reconciliation {
            h2 { "Reconciliation" }
            p.note { "Entries and grants against balances, held against open holds, and the Stripe facts: one grant per purchase, claw-backs within what was paid." }
            (audit_status(audit.as_ref()))
            form method="post" action="/admin/reconcile" {
                input type="hidden" name="csrf" value=(sess.csrf);
                button type="submit" { "Run now" }
            }
        }
        section {
            h2 { "Events received" }
            table.list #stripe-events {
                thead { tr { th { "Received (UTC)" } th { "Type" } th { "Effect" } th { "Business key" } th { "Event" } } }
                tbody {
                    @for r in &rows {
                        tr {
                            td { (when(r.received_at)) }
                            td { (r.kind) }
                            td { (r.effect) }
                            td.mono { (r.business_key.as_deref().unwrap_or("")) }
                            td.mono { (r.event_id) }
                        }
                    }
                    @if rows.is_empty() { tr { td colspan="5" { "No Stripe events received yet." } } }
                }
            }
            @if let Some(n) = next { p.pager { a rel="next" href={ "/admin/stripe?before=" (enc(&n)) } { "Older events →" } } }
        }
    };
    html_response(StatusCode::OK, &page(Some(&sess), "Stripe", &body))
}

fn audit_status(a: Option<&AuditResult>) -> Markup {
    html! {
        @match a {
            None => p #audit-status { "Not run yet in this process (it runs every --audit-interval; “Run now” runs it here)." },
            Some(r) => @match &r.outcome {
                Ok(v) if v.is_empty() => p.ok #audit-status { "All reconciled at " (when(r.at)) " UTC (" (r.took.as_millis()) " ms)." },
                Ok(v) => div #audit-status {
                    p.error { (v.len()) " violations at " (when(r.at)) " UTC:" }
                    ul { @for x in v.iter().take(50) { li { span.mono { (x.account_id) } ": " (x.detail) } } }
                },
                Err(e) => p.error #audit-status { "The last run failed at " (when(r.at)) " UTC: " (e) },
            },
        }
    }
}

pub(super) async fn reconcile(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    let sess = match session(&s, &headers)
        .and_then(|x| x.unrestricted().map(|()| x))
        .and_then(|x| x.check_csrf(f.csrf.as_deref()).map(|()| x))
        .and_then(|x| x.admit(true).map(|()| x))
    {
        Ok(x) => x,
        Err(r) => return r,
    };
    let start = Instant::now();
    let outcome = s.ledger.audit().await.map_err(|e| e.to_string());
    tracing::info!(target: "tally::audit", operator = %sess.operator(), violations = outcome.as_ref().map_or(-1, |v| i64::try_from(v.len()).unwrap_or(i64::MAX)), "admin console: reconciliation run");
    sess.console.audit().record(AuditResult {
        at: Utc::now(),
        took: start.elapsed(),
        outcome,
    });
    Redirect::to("/admin/stripe#reconciliation").into_response()
}
