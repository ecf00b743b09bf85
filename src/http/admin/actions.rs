//! The console's actions: grant, adjust, set plan, transfer, release a hold, refund a
//! committed hold. Each is a form (with a CSRF token and an idempotency key minted when it was
//! drawn), then a confirmation page, then the same parsing and ledger call as the AdminService
//! RPC. A form submitted twice carries the same key and is applied once.
#![allow(clippy::many_single_char_names)] // s: state, f: form, c: command, as in every handler

use axum::Form;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::NaiveDate;
use maud::{Markup, html};
use serde::Deserialize;

use super::{
    Session, credits, enc, error_page, html_response, nonce, page, service_error, session,
};
use crate::catalog::Catalog;
use crate::domain::FieldViolation;
use crate::domain::book::Source;
use crate::grpc::convert;
use crate::http::HttpState;
use crate::ledger::ServiceError;
use crate::pb;

/// Sources an operator may grant from (purchases, subscriptions and allowances come from
/// Stripe and the plans).
const GRANT_SOURCES: [Source; 4] = [
    Source::Adjustment,
    Source::Promotion,
    Source::SignupBonus,
    Source::Refund,
];

/// Draws an account's action forms, each with a fresh idempotency key.
pub(super) struct Forms<'a> {
    s: &'a Session,
    account: &'a str,
}

impl<'a> Forms<'a> {
    pub(super) fn new(s: &'a Session, account: &'a str) -> Self {
        Self { s, account }
    }

    fn open(&self, action: &str, class: &str, body: &Markup) -> Markup {
        html! {
            form class={ "action " (class) } method="post" action={ "/admin/accounts/" (enc(self.account)) "/actions/" (action) } {
                input type="hidden" name="csrf" value=(self.s.csrf);
                input type="hidden" name="key" value={ "console-" (nonce()) };
                input type="hidden" name="step" value="review";
                (body)
            }
        }
    }

    fn reason() -> Markup {
        html! { label { "Reason " input type="text" name="reason" required maxlength=(crate::domain::command::REASON_MAX_LEN) placeholder="required, kept in the ledger"; } }
    }

    /// Every account-level action.
    pub(super) fn all(&self, catalog: &Catalog) -> Markup {
        html! {
            details open {
                summary { "Grant credits" }
                (self.open("grant", "grant", &html! {
                    label { "Credits " input type="number" name="amount" min="1" max=(crate::domain::Credits::MAX) required; }
                    label { "Source "
                        select name="source" { @for src in GRANT_SOURCES { option value=(src.as_str()) { (src.as_str()) } } }
                    }
                    label { "Expires on " input type="date" name="expires"; span.note { " (empty: never; at 00:00 UTC)" } }
                    (Self::reason())
                    button type="submit" { "Review grant…" }
                }))
            }
            details {
                summary { "Adjust" }
                (self.open("adjust", "adjust", &html! {
                    label { "Credits (negative to remove) " input type="number" name="delta" required; }
                    (Self::reason())
                    button type="submit" { "Review adjustment…" }
                }))
            }
            details {
                summary { "Set plan" }
                (self.open("set_plan", "set-plan", &html! {
                    label { "Plan "
                        select name="plan" { @for (name, p) in &catalog.plans { option value=(name) { (p.display_name) " (" (name) ")" } } }
                    }
                    (Self::reason())
                    button type="submit" { "Review plan change…" }
                }))
            }
            details {
                summary { "Transfer" }
                (self.open("transfer", "transfer", &html! {
                    label { "To account " input type="text" name="to" required maxlength="128"; }
                    label { "Credits " input type="number" name="amount" min="1" required; }
                    (Self::reason())
                    button type="submit" { "Review transfer…" }
                }))
            }
        }
    }

    /// Release an open hold.
    pub(super) fn release(&self, hold_id: &str) -> Markup {
        self.open("release", "release inline", &html! {
            input type="hidden" name="hold_id" value=(hold_id);
            input type="text" name="reason" required maxlength=(crate::domain::command::REASON_MAX_LEN) placeholder="reason" aria-label="Reason";
            button type="submit" { "Release…" }
        })
    }

    /// Refund (part of) a committed hold.
    pub(super) fn refund(&self, hold_id: &str, left: i64) -> Markup {
        self.open("refund", "refund inline", &html! {
            input type="hidden" name="hold_id" value=(hold_id);
            input type="number" name="amount" min="1" max=(left) placeholder={ "all " (left) } aria-label="Credits to refund";
            input type="text" name="reason" required maxlength=(crate::domain::command::REASON_MAX_LEN) placeholder="reason" aria-label="Reason";
            button type="submit" { "Refund…" }
        })
    }
}

/// Every field any action form has.
#[derive(Clone, Debug, Default, Deserialize)]
pub(super) struct ActionForm {
    csrf: Option<String>,
    #[serde(default)]
    key: String,
    #[serde(default)]
    step: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    amount: String,
    #[serde(default)]
    delta: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    expires: String,
    #[serde(default)]
    plan: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    hold_id: String,
}

/// A parsed action, ready to apply.
enum Action {
    Grant(
        crate::domain::IdempotencyKey,
        crate::domain::command::GrantCredits,
    ),
    Adjust(
        crate::domain::IdempotencyKey,
        crate::domain::command::Adjust,
    ),
    SetPlan(
        crate::domain::IdempotencyKey,
        crate::domain::command::SetPlan,
    ),
    Transfer(
        crate::domain::IdempotencyKey,
        crate::domain::command::Transfer,
    ),
    Refund(
        crate::domain::IdempotencyKey,
        crate::domain::command::Refund,
        &'static str,
    ),
}

fn invalid(field: &'static str, why: &str) -> ServiceError {
    ServiceError::Invalid(vec![FieldViolation::new(field, why)])
}

/// A whole number from a form field (spaces and thousands separators allowed).
fn number(field: &'static str, v: &str) -> Result<i64, ServiceError> {
    let t: String = v
        .chars()
        .filter(|c| !matches!(c, ' ' | ',' | '_'))
        .collect();
    let t = t.replace('−', "-");
    t.parse::<i64>()
        .map_err(|_| invalid(field, "must be a whole number"))
}

/// Parses a form into the command the RPC would build (same checks, same limits).
fn parse(
    account: &str,
    action: &str,
    f: &ActionForm,
    catalog: &Catalog,
    operator: &str,
) -> Result<Action, ServiceError> {
    let reason = f.reason.trim();
    if reason.is_empty() {
        return Err(invalid("reason", "is required"));
    }
    match action {
        "grant" => {
            let source = Source::parse(&f.source)
                .filter(|s| GRANT_SOURCES.contains(s))
                .ok_or_else(|| {
                    invalid(
                        "source",
                        "must be adjustment, promotion, signup_bonus or refund",
                    )
                })?;
            let expires_at = if f.expires.trim().is_empty() {
                None
            } else {
                let d = NaiveDate::parse_from_str(f.expires.trim(), "%Y-%m-%d")
                    .map_err(|_| invalid("expires", "must be a date (YYYY-MM-DD)"))?;
                d.and_hms_opt(0, 0, 0).map(|t| convert::ts(t.and_utc()))
            };
            let (k, c) = convert::grant(&pb::GrantRequest {
                account_id: account.to_owned(),
                amount: number("amount", &f.amount)?,
                reason: reason.to_owned(),
                idempotency_key: f.key.clone(),
                source: convert::source_to_pb(source).into(),
                expires_at,
                priority: None,
            })?;
            Ok(Action::Grant(k, c))
        }
        "adjust" => {
            let (k, c) = convert::adjust(&pb::AdjustRequest {
                account_id: account.to_owned(),
                delta: number("delta", &f.delta)?,
                reason: reason.to_owned(),
                operator: operator.to_owned(),
                idempotency_key: f.key.clone(),
            })?;
            Ok(Action::Adjust(k, c))
        }
        "set_plan" => {
            let (k, c) = convert::set_plan(
                &pb::SetPlanRequest {
                    account_id: account.to_owned(),
                    plan: f.plan.clone(),
                    idempotency_key: f.key.clone(),
                },
                catalog,
            )?;
            crate::domain::text::check(
                "reason",
                reason,
                crate::domain::command::REASON_MAX_LEN,
                crate::domain::text::Lines::Many,
            )
            .map_err(|v| ServiceError::Invalid(vec![v]))?;
            Ok(Action::SetPlan(k, c))
        }
        "transfer" => {
            let (k, c) = convert::transfer(&pb::TransferRequest {
                from_account_id: account.to_owned(),
                to_account_id: f.to.trim().to_owned(),
                amount: number("amount", &f.amount)?,
                reason: reason.to_owned(),
                idempotency_key: f.key.clone(),
            })?;
            Ok(Action::Transfer(k, c))
        }
        "release" | "refund" => {
            let amount = if action == "refund" && !f.amount.trim().is_empty() {
                Some(number("amount", &f.amount)?)
            } else {
                None
            };
            let (k, c) = convert::refund(&pb::RefundRequest {
                hold_id: f.hold_id.clone(),
                amount,
                reason: reason.to_owned(),
                idempotency_key: f.key.clone(),
            })?;
            Ok(Action::Refund(
                k,
                c,
                if action == "release" {
                    "release"
                } else {
                    "refund"
                },
            ))
        }
        _ => Err(invalid("action", "unknown action")),
    }
}

/// What an action will do, in words (escaped by maud).
fn describe(account: &str, a: &Action) -> Markup {
    match a {
        Action::Grant(_, c) => html! {
            "Grant " strong { (credits(c.amount.get())) } " credits to " strong { (account) }
            " from source " strong { (c.source.as_str()) } ", "
            @if let Some(t) = c.expires_at { "expiring " (super::when(t)) " UTC" } @else { "never expiring" } "."
        },
        Action::Adjust(_, c) => html! {
            @if c.delta > 0 { "Add " } @else { "Remove " } strong { (credits(c.delta.abs())) } " credits "
            @if c.delta > 0 { "to " } @else { "from " } strong { (account) } "."
        },
        Action::SetPlan(_, c) => {
            html! { "Move " strong { (account) } " to plan " strong { (c.plan) } "." }
        }
        Action::Transfer(_, c) => html! {
            "Move " strong { (credits(c.amount.get())) } " credits from " strong { (account) } " to " strong { (c.to.as_str()) } "."
        },
        Action::Refund(_, c, "release") => {
            html! { "Release open hold " strong.mono { (c.hold_id.as_str()) } ": its credits return to " strong { (account) } "." }
        }
        Action::Refund(_, c, _) => html! {
            "Refund " @if let Some(n) = c.amount { strong { (credits(n.get())) } " credits" } @else { "everything not yet refunded" }
            " of committed hold " strong.mono { (c.hold_id.as_str()) } " to " strong { (account) } "."
        },
    }
}

/// `POST /admin/accounts/{id}/actions/{action}`: review (`step=review`) or apply
/// (`step=confirm`).
#[allow(clippy::too_many_lines)] // one arm per action
pub(super) async fn act(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Form(f): Form<ActionForm>,
) -> Response {
    let sess = match session(&s, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    // The CSRF check comes first: a forged form learns nothing and changes nothing.
    if let Err(r) = sess
        .check_csrf(f.csrf.as_deref())
        .and_then(|()| sess.may_access(&id))
        .and_then(|()| sess.admit(true))
    {
        return r;
    }
    // The operator recorded on an adjustment is the signed-in caller.
    let parsed = match parse(&id, &action, &f, &s.catalog, sess.operator()) {
        Ok(a) => a,
        Err(e) => return service_error(&sess, &e),
    };
    // Holds must belong to this account; transfers may only reach the operator's accounts.
    match &parsed {
        Action::Refund(_, c, kind) => match s.ledger.hold(&c.hold_id).await {
            Ok(h) if h.account_id == id => {
                // Release is for an open hold, refund for a committed one: the confirmation
                // page says which, so the form must not do the other.
                let want = if *kind == "release" {
                    crate::domain::HoldState::Open
                } else {
                    crate::domain::HoldState::Committed
                };
                if h.state != want {
                    return error_page(
                        Some(&sess),
                        StatusCode::CONFLICT,
                        "Not done",
                        &format!(
                            "That hold is {}, not {}. Nothing was changed.",
                            h.state.as_str(),
                            want.as_str()
                        ),
                    );
                }
            }
            Ok(_) => {
                return error_page(
                    Some(&sess),
                    StatusCode::BAD_REQUEST,
                    "Wrong hold",
                    "That hold belongs to another account. Nothing was changed.",
                );
            }
            Err(e) => return service_error(&sess, &e),
        },
        Action::Transfer(_, c) => {
            if let Err(r) = sess.may_access(c.to.as_str()) {
                return r;
            }
        }
        _ => {}
    }
    if f.step != "confirm" {
        let body = html! {
            p.confirm { (describe(&id, &parsed)) }
            p { "Reason: " q { (f.reason.trim()) } }
            p.note { "Recorded as operator " strong { (sess.operator()) } "." }
            form method="post" action={ "/admin/accounts/" (enc(&id)) "/actions/" (enc(&action)) } {
                input type="hidden" name="csrf" value=(sess.csrf);
                input type="hidden" name="key" value=(f.key);
                input type="hidden" name="step" value="confirm";
                input type="hidden" name="reason" value=(f.reason);
                input type="hidden" name="amount" value=(f.amount);
                input type="hidden" name="delta" value=(f.delta);
                input type="hidden" name="source" value=(f.source);
                input type="hidden" name="expires" value=(f.expires);
                input type="hidden" name="plan" value=(f.plan);
                input type="hidden" name="to" value=(f.to);
                input type="hidden" name="hold_id" value=(f.hold_id);
                button.primary type="submit" { "Confirm" }
                " "
                a href={ "/admin/accounts/" (enc(&id)) } { "Cancel" }
            }
        };
        return html_response(StatusCode::OK, &page(Some(&sess), "Confirm", &body));
    }
    let caller = sess.principal.caller.clone();
    let l = &s.ledger;
    let op = sess.operator().to_owned();
    let reason = f.reason.trim();
    let replayed = match parsed {
        Action::Grant(k, c) => l.grant(&caller, k, &c).await.map(|a| {
            if !a.replayed {
                crate::telemetry::count_grant(c.source.as_str(), c.amount.get());
            }
            a.replayed
        }),
        Action::Adjust(k, c) => l.adjust(&caller, k, &c).await.map(|a| a.replayed),
        Action::SetPlan(k, c) => l.set_plan(&caller, k, &c).await.map(|a| a.replayed),
        Action::Transfer(k, c) => l.transfer(&caller, k, &c).await.map(|a| a.replayed),
        Action::Refund(k, c, _) => l.refund(&caller, k, &c).await.map(|a| a.replayed),
    };
    match replayed {
        Ok(replayed) => {
            tracing::info!(target: "tally::audit", operator = %op, action = %action, account_id = %id, reason = %reason, replayed, "admin console action");
            let done = if replayed {
                "replayed"
            } else {
                action.as_str()
            };
            Redirect::to(&format!("/admin/accounts/{}?done={}", enc(&id), enc(done)))
                .into_response()
        }
        Err(e) => {
            tracing::warn!(target: "tally::audit", operator = %op, action = %action, account_id = %id, error.message = %e, "admin console action refused");
            service_error(&sess, &e)
        }
    }
}
