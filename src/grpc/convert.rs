//! Protobuf requests → validated domain commands (collecting every violation), and domain
//! outcomes → protobuf messages.

use std::fmt::Write as _;

use chrono::{DateTime, TimeDelta, Utc};

use crate::catalog::Catalog;
use crate::domain::EntryRecord;
use crate::domain::book::{Grant, PRIORITY_DEFAULT, PRIORITY_MAX, Source};
use crate::domain::command::{
    Adjust, CommitHold, ExtendHold, GrantCredits, OpenAccount, REASON_MAX_LEN, Refund, Reserve,
    SetPlan, Transfer,
};
use crate::domain::pricing::Estimate;
use crate::domain::rules::EntryKind;
use crate::domain::{
    AccountId, Credits, FieldViolation, Hold, HoldId, HoldState, IdempotencyKey, Metadata,
};
use crate::ledger::{AccountQuery, EntryCursor, EntryQuery, EventQuery, EventRow, HoldQuery};
use crate::ledger::{Limits, ServiceError, new_hold_id};
use crate::pb;

/// Default page size of list calls.
pub const PAGE_SIZE_DEFAULT: u32 = 50;
/// Largest page size of list calls; larger requests are clamped.
pub const PAGE_SIZE_MAX: u32 = 500;

/// Collects violations while fields are parsed, so a caller learns every problem at once.
#[derive(Default)]
struct Check(Vec<FieldViolation>);

impl Check {
    fn field<T>(&mut self, r: Result<T, FieldViolation>) -> Option<T> {
        r.map_err(|v| self.0.push(v)).ok()
    }

    fn done<T>(self, value: Option<T>) -> Result<T, ServiceError> {
        match value {
            Some(v) if self.0.is_empty() => Ok(v),
            _ => Err(ServiceError::Invalid(self.0)),
        }
    }
}

fn duration(
    field: &'static str,
    d: Option<prost_types::Duration>,
) -> Result<Option<TimeDelta>, FieldViolation> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(FieldViolation::new(field, "must not be negative"));
    }
    TimeDelta::new(d.seconds, d.nanos.unsigned_abs())
        .map(Some)
        .ok_or_else(|| FieldViolation::new(field, "is out of range"))
}

fn reason(field: &'static str, s: &str, required: bool) -> Result<String, FieldViolation> {
    if required && s.trim().is_empty() {
        return Err(FieldViolation::new(field, "is required"));
    }
    crate::domain::text::check(field, s, REASON_MAX_LEN, crate::domain::text::Lines::Many)?;
    Ok(s.to_owned())
}

/// The CheckBalance answer for a balance (also each WatchBalance message's).
#[must_use]
pub fn balance_to_pb(catalog: &Catalog, b: &crate::domain::Balance) -> pb::CheckBalanceResponse {
    let (by_source, next_expiry) = breakdown_to_pb(b);
    pb::CheckBalanceResponse {
        by_source,
        next_expiry,
        allowance_left: b.allowance_left,
        entitlements: catalog
            .plans
            .get(&b.plan)
            .map(|p| p.entitlements.clone().into_iter().collect())
            .unwrap_or_default(),
        low_balance: is_low(catalog, &b.plan, b.available),
        plan: b.plan.clone(),
        account_id: b.account_id.clone(),
        available: b.available,
        held: b.held,
        debt: b.debt,
        open_holds: b.open_holds,
    }
}

/// Parses a WatchBalance request: the account and the version the caller has.
///
/// # Errors
/// `Invalid` for a bad account id or a negative `after_version`.
pub fn watch_balance(
    r: &pb::WatchBalanceRequest,
) -> Result<(AccountId, Option<i64>), ServiceError> {
    let account = AccountId::parse("account_id", &r.account_id);
    let after = match r.after_version {
        Some(v) if v < 0 => Err(FieldViolation::new(
            "after_version",
            format!("must be 0 or more (a version received), got {v}"),
        )),
        v => Ok(v),
    };
    match (account, after) {
        (Ok(a), Ok(v)) => Ok((a, v)),
        (a, v) => Err(ServiceError::Invalid(
            [a.err(), v.err()].into_iter().flatten().collect(),
        )),
    }
}

/// Parses a CheckBalance request.
pub fn account(account_id: &str) -> Result<AccountId, ServiceError> {
    AccountId::parse("account_id", account_id).map_err(ServiceError::from)
}

/// Parses a hold id.
pub fn hold_id(hold_id: &str) -> Result<HoldId, ServiceError> {
    HoldId::parse("hold_id", hold_id).map_err(ServiceError::from)
}

/// The credits a Reserve asks for by number (0 for a priced operation), for its span.
pub fn amount_asked(r: &pb::ReserveRequest) -> i64 {
    match r.cost {
        Some(pb::reserve_request::Cost::Amount(n)) => n,
        _ => 0,
    }
}

/// Parses a Reserve request.
pub fn reserve(
    r: pb::ReserveRequest,
    limits: &Limits,
    catalog: &Catalog,
) -> Result<(IdempotencyKey, Reserve), ServiceError> {
    let mut c = Check::default();
    let account_id = c.field(AccountId::parse("account_id", &r.account_id));
    let (amount, priced) = match r.cost {
        Some(pb::reserve_request::Cost::Operation(op)) => {
            match price(catalog, &op.name, &op.params) {
                Ok(e) => (Some(e.cost), Some(canonical(&op.name, &op.params))),
                Err(v) => (c.field(Err(v)), None),
            }
        }
        Some(pb::reserve_request::Cost::Amount(n)) => (c.field(Credits::new("amount", n)), None),
        // Neither: the amount's own violation (required, 1..=10^12).
        None => (c.field(Credits::new("amount", 0)), None),
    };
    let key = c.field(IdempotencyKey::parse("idempotency_key", &r.idempotency_key));
    let ttl = c.field(duration("ttl", r.ttl).and_then(|t| limits.ttl(t)));
    let metadata = c.field(Metadata::parse(r.metadata));
    let value = (|| {
        Some((
            key?,
            Reserve {
                account_id: account_id?,
                amount: amount?,
                ttl: ttl?,
                ttl_given: r.ttl.is_some(),
                metadata: metadata?,
                hold_id: new_hold_id(),
                priced,
            },
        ))
    })();
    c.done(value)
}

/// Parses a Commit request.
pub fn commit(r: &pb::CommitRequest) -> Result<(IdempotencyKey, CommitHold), ServiceError> {
    let mut c = Check::default();
    let hold_id = c.field(HoldId::parse("hold_id", &r.hold_id));
    let amount = c.field(Credits::new("amount", r.amount));
    let key = c.field(IdempotencyKey::parse("idempotency_key", &r.idempotency_key));
    let value = (|| {
        Some((
            key?,
            CommitHold {
                hold_id: hold_id?,
                amount: amount?,
            },
        ))
    })();
    c.done(value)
}

/// Parses a Refund request.
pub fn refund(r: &pb::RefundRequest) -> Result<(IdempotencyKey, Refund), ServiceError> {
    let mut c = Check::default();
    let hold_id = c.field(HoldId::parse("hold_id", &r.hold_id));
    let amount = c.field(r.amount.map(|a| Credits::new("amount", a)).transpose());
    let why = c.field(reason("reason", &r.reason, false));
    let key = c.field(IdempotencyKey::parse("idempotency_key", &r.idempotency_key));
    let value = (|| {
        Some((
            key?,
            Refund {
                hold_id: hold_id?,
                amount: amount?,
                reason: why?,
            },
        ))
    })();
    c.done(value)
}

/// Parses an ExtendHold request.
pub fn extend(
    r: &pb::ExtendHoldRequest,
    limits: &Limits,
) -> Result<(IdempotencyKey, ExtendHold), ServiceError> {
    let mut c = Check::default();
    let hold_id = c.field(HoldId::parse("hold_id", &r.hold_id));
    let ttl = c.field(duration("ttl", r.ttl).and_then(|t| {
        t.ok_or_else(|| FieldViolation::new("ttl", "is required"))
            .and_then(|t| limits.ttl(Some(t)))
    }));
    let key = c.field(IdempotencyKey::parse("idempotency_key", &r.idempotency_key));
    let value = (|| {
        Some((
            key?,
            ExtendHold {
                hold_id: hold_id?,
                ttl: ttl?,
            },
        ))
    })();
    c.done(value)
}

/// Parses a Grant request.
pub fn grant(r: &pb::GrantRequest) -> Result<(IdempotencyKey, GrantCredits), ServiceError> {
    let mut c = Check::default();
    let account_id = c.field(AccountId::parse("account_id", &r.account_id));
    let amount = c.field(Credits::new("amount", r.amount));
    let why = c.field(reason("reason", &r.reason, true));
    let key = c.field(IdempotencyKey::parse("idempotency_key", &r.idempotency_key));
    let src = c.field(match pb::GrantSource::try_from(r.source) {
        Ok(pb::GrantSource::Unspecified) => Ok(Source::Adjustment),
        Ok(known) => Ok(source_from_pb(known)),
        Err(_) => Err(FieldViolation::new(
            "source",
            format!("unknown grant source {}", r.source),
        )),
    });
    let expires_at = c.field(
        time("expires_at", r.expires_at.as_ref()).and_then(|t| match t {
            Some(t) if t <= Utc::now() => {
                Err(FieldViolation::new("expires_at", "must be in the future"))
            }
            t => Ok(t),
        }),
    );
    let priority = c.field(match r.priority {
        None => Ok(PRIORITY_DEFAULT),
        Some(p) if (0..=PRIORITY_MAX).contains(&p) => Ok(p),
        Some(_) => Err(FieldViolation::new(
            "priority",
            format!("must be 0..={PRIORITY_MAX}"),
        )),
    });
    let value = (|| {
        Some((
            key?,
            GrantCredits {
                account_id: account_id?,
                amount: amount?,
                reason: why?,
                source: src?,
                expires_at: expires_at?,
                priority: priority?,
            },
        ))
    })();
    c.done(value)
}

/// Longest operator name on an adjustment.
pub const OPERATOR_MAX_LEN: usize = 128;

/// Parses an Adjust request.
pub fn adjust(r: &pb::AdjustRequest) -> Result<(IdempotencyKey, Adjust), ServiceError> {
    let mut c = Check::default();
    let account_id = c.field(AccountId::parse("account_id", &r.account_id));
    let delta = c.field(
        if r.delta != 0 && r.delta.unsigned_abs() <= Credits::MAX.unsigned_abs() {
            Ok(r.delta)
        } else {
            Err(FieldViolation::new(
                "delta",
                format!(
                    "must be non-zero and at most {} credits either way",
                    Credits::MAX
                ),
            ))
        },
    );
    let why = c.field(reason("reason", &r.reason, true));
    let operator = c.field(if r.operator.trim().is_empty() {
        Err(FieldViolation::new(
            "operator",
            format!("is required, at most {OPERATOR_MAX_LEN} characters"),
        ))
    } else {
        crate::domain::text::check(
            "operator",
            &r.operator,
            OPERATOR_MAX_LEN,
            crate::domain::text::Lines::One,
        )
        .map(|()| r.operator.clone())
    });
    let key = c.field(IdempotencyKey::parse("idempotency_key", &r.idempotency_key));
    let value = (|| {
        Some((
            key?,
            Adjust {
                account_id: account_id?,
                delta: delta?,
                reason: why?,
                operator: operator?,
            },
        ))
    })();
    c.done(value)
}

/// Parses a Transfer request.
pub fn transfer(r: &pb::TransferRequest) -> Result<(IdempotencyKey, Transfer), ServiceError> {
    let mut c = Check::default();
    let from = c.field(AccountId::parse("from_account_id", &r.from_account_id));
    let to = c.field(
        AccountId::parse("to_account_id", &r.to_account_id).and_then(|to| {
            if to.as_str() == r.from_account_id {
                Err(FieldViolation::new(
                    "to_account_id",
                    "must differ from from_account_id",
                ))
            } else {
                Ok(to)
            }
        }),
    );
    let amount = c.field(Credits::new("amount", r.amount));
    let why = c.field(reason("reason", &r.reason, false));
    let key = c.field(IdempotencyKey::parse("idempotency_key", &r.idempotency_key));
    let value = (|| {
        Some((
            key?,
            Transfer {
                from: from?,
                to: to?,
                amount: amount?,
                reason: why?,
            },
        ))
    })();
    c.done(value)
}

/// Parses an OpenAccount request; the plan must be in the catalog, the bonus comes from it.
pub fn open_account(
    r: &pb::OpenAccountRequest,
    catalog: &Catalog,
) -> Result<(IdempotencyKey, OpenAccount), ServiceError> {
    let mut c = Check::default();
    let account_id = c.field(AccountId::parse("account_id", &r.account_id));
    let plan_name = if r.plan.is_empty() {
        crate::domain::DEFAULT_PLAN
    } else {
        r.plan.as_str()
    };
    let plan = c.field(known_plan(catalog, plan_name));
    let key = c.field(IdempotencyKey::parse("idempotency_key", &r.idempotency_key));
    let bonus = catalog.signup_bonus.as_ref().and_then(|b| {
        let ttl = b.expires_in.and_then(|d| TimeDelta::from_std(d).ok());
        Credits::new("amount", b.amount).ok().map(|a| (a, ttl))
    });
    let value = (|| {
        Some((
            key?,
            OpenAccount {
                account_id: account_id?,
                plan: plan?,
                bonus,
            },
        ))
    })();
    c.done(value)
}

fn known_plan(catalog: &Catalog, plan: &str) -> Result<String, FieldViolation> {
    if catalog.plans.contains_key(plan) {
        Ok(plan.to_owned())
    } else {
        let known: Vec<&str> = catalog.plans.keys().map(String::as_str).collect();
        Err(FieldViolation::new(
            "plan",
            format!("unknown plan {plan:?}; known: {}", known.join(", ")),
        ))
    }
}

/// A grant as a protobuf message.
#[must_use]
pub fn grant_to_pb(b: Grant) -> pb::CreditGrant {
    pb::CreditGrant {
        grant_id: b.grant_id,
        source: source_to_pb(b.source).into(),
        granted: b.granted,
        remaining: b.remaining,
        held: b.held,
        expired: b.expired,
        expires_at: b.expires_at.map(ts),
        priority: b.priority,
        reason: b.reason,
        created_at: Some(ts(b.created_at)),
    }
}

/// A balance's breakdown as protobuf fields.
#[must_use]
pub fn breakdown_to_pb(
    b: &crate::domain::Balance,
) -> (std::collections::HashMap<String, i64>, Option<pb::Expiry>) {
    let by_source = b
        .by_source
        .iter()
        .map(|(s, n)| (s.as_str().to_owned(), *n))
        .collect();
    let next = b.next_expiry.map(|(at, amount)| pb::Expiry {
        at: Some(ts(at)),
        amount,
    });
    (by_source, next)
}

fn state_from_pb(s: i32) -> Result<HoldState, FieldViolation> {
    match pb::HoldState::try_from(s) {
        Ok(pb::HoldState::Open) => Ok(HoldState::Open),
        Ok(pb::HoldState::Committed) => Ok(HoldState::Committed),
        Ok(pb::HoldState::Released) => Ok(HoldState::Released),
        Ok(pb::HoldState::Expired) => Ok(HoldState::Expired),
        _ => Err(FieldViolation::new(
            "states",
            format!("unknown hold state {s}"),
        )),
    }
}

fn state_to_pb(s: HoldState) -> pb::HoldState {
    match s {
        HoldState::Open => pb::HoldState::Open,
        HoldState::Committed => pb::HoldState::Committed,
        HoldState::Released => pb::HoldState::Released,
        HoldState::Expired => pb::HoldState::Expired,
    }
}

fn states_tag(states: &[HoldState]) -> String {
    states
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// An opaque page token: hex of `v1|<binding>|<last>`, where the binding encodes the filters
/// of the request that produced it, so a token only continues the listing it came from.
#[must_use]
pub fn page_token(binding: &str, last: &str) -> String {
    hex::encode(format!("v1|{binding}|{last}"))
}

/// The position a page token continues from, if it belongs to a listing with `binding`.
fn token_position<'t>(
    binding: &str,
    token: &'t str,
    decoded: &'t mut String,
) -> Result<Option<&'t str>, ServiceError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        ServiceError::from(FieldViolation::new(
            "page_token",
            "is not a token from this listing",
        ))
    };
    *decoded = hex::decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(bad)?;
    let expected = format!("v1|{binding}|");
    decoded.strip_prefix(&expected).map(Some).ok_or_else(bad)
}

/// The binding of a hold listing.
#[must_use]
pub fn holds_binding(q: &HoldQuery) -> String {
    format!("holds|{}|{}", q.account_id.as_str(), states_tag(&q.states))
}

fn page_size(c: &mut Check, requested: i32) -> Option<u32> {
    match u32::try_from(requested) {
        Ok(0) => Some(PAGE_SIZE_DEFAULT),
        Ok(n) => Some(n.min(PAGE_SIZE_MAX)),
        Err(_) => c.field(Err(FieldViolation::new(
            "page_size",
            "must not be negative",
        ))),
    }
}

/// Parses a ListHolds request.
pub fn list_holds(r: &pb::ListHoldsRequest) -> Result<HoldQuery, ServiceError> {
    let mut c = Check::default();
    let account_id = c.field(AccountId::parse("account_id", &r.account_id));
    let states: Option<Vec<HoldState>> =
        c.field(r.states.iter().map(|s| state_from_pb(*s)).collect());
    let limit = page_size(&mut c, r.page_size);
    let mut query = c.done((|| {
        Some(HoldQuery {
            account_id: account_id?,
            states: states?,
            before: None,
            limit: limit?,
        })
    })())?;
    let mut buf = String::new();
    if let Some(last) = token_position(&holds_binding(&query), &r.page_token, &mut buf)? {
        query.before =
            Some(HoldId::parse("page_token", last).map_err(|_| {
                FieldViolation::new("page_token", "is not a token from this listing")
            })?);
    }
    Ok(query)
}

/// Parses a SetPlan request; the plan must be in the catalog.
pub fn set_plan(
    r: &pb::SetPlanRequest,
    catalog: &Catalog,
) -> Result<(IdempotencyKey, SetPlan), ServiceError> {
    let mut c = Check::default();
    let account_id = c.field(AccountId::parse("account_id", &r.account_id));
    let plan = c.field(known_plan(catalog, &r.plan));
    let key = c.field(IdempotencyKey::parse("idempotency_key", &r.idempotency_key));
    let value = (|| {
        Some((
            key?,
            SetPlan {
                account_id: account_id?,
                plan: plan?,
            },
        ))
    })();
    c.done(value)
}

/// Plan thresholds of the catalog, for low-balance filters.
#[must_use]
pub fn thresholds(catalog: &Catalog) -> Vec<(String, i64)> {
    catalog
        .plans
        .iter()
        .map(|(name, p)| (name.clone(), p.low_balance_threshold))
        .collect()
}

/// Whether `available` is under the threshold of `plan`.
#[must_use]
pub fn is_low(catalog: &Catalog, plan: &str, available: i64) -> bool {
    catalog.is_low(plan, available)
}

/// Parses a ListAccounts request.
pub fn list_accounts(
    r: &pb::ListAccountsRequest,
    catalog: &Catalog,
) -> Result<AccountQuery, ServiceError> {
    let mut c = Check::default();
    let limit = page_size(&mut c, r.page_size);
    let limit = c.done(limit)?;
    let plan = (!r.plan.is_empty()).then(|| r.plan.clone());
    let mut buf = String::new();
    let after = token_position(&accounts_binding(r), &r.page_token, &mut buf)?.map(str::to_owned);
    Ok(AccountQuery {
        plan,
        low_balance: r.low_balance_only.then(|| thresholds(catalog)),
        prefix: None,
        after,
        limit,
    })
}

/// The binding of an account listing.
#[must_use]
pub fn accounts_binding(r: &pb::ListAccountsRequest) -> String {
    format!("accounts|{}|{}", r.plan, r.low_balance_only)
}

fn time(
    field: &'static str,
    t: Option<&prost_types::Timestamp>,
) -> Result<Option<DateTime<Utc>>, FieldViolation> {
    t.map(|t| {
        u32::try_from(t.nanos)
            .ok()
            .and_then(|n| DateTime::from_timestamp(t.seconds, n))
            .ok_or_else(|| FieldViolation::new(field, "is not a valid time"))
    })
    .transpose()
}

fn kinds(values: &[i32]) -> Result<Vec<EntryKind>, FieldViolation> {
    values
        .iter()
        .map(|v| {
            pb::EntryKind::try_from(*v)
                .ok()
                .and_then(kind_from_pb)
                .ok_or_else(|| FieldViolation::new("kinds", format!("unknown entry kind {v}")))
        })
        .collect()
}

/// A grant source as the API names it.
#[must_use]
pub fn source_to_pb(s: Source) -> pb::GrantSource {
    match s {
        Source::Purchase => pb::GrantSource::Purchase,
        Source::Subscription => pb::GrantSource::Subscription,
        Source::Allowance => pb::GrantSource::Allowance,
        Source::SignupBonus => pb::GrantSource::SignupBonus,
        Source::Promotion => pb::GrantSource::Promotion,
        Source::Adjustment => pb::GrantSource::Adjustment,
        Source::Refund => pb::GrantSource::Refund,
        Source::Transfer => pb::GrantSource::Transfer,
    }
}

/// A known, set grant source of the API as the domain's (unspecified: adjustment).
fn source_from_pb(s: pb::GrantSource) -> Source {
    match s {
        pb::GrantSource::Purchase => Source::Purchase,
        pb::GrantSource::Subscription => Source::Subscription,
        pb::GrantSource::Allowance => Source::Allowance,
        pb::GrantSource::SignupBonus => Source::SignupBonus,
        pb::GrantSource::Promotion => Source::Promotion,
        pb::GrantSource::Unspecified | pb::GrantSource::Adjustment => Source::Adjustment,
        pb::GrantSource::Refund => Source::Refund,
        pb::GrantSource::Transfer => Source::Transfer,
    }
}

/// An entry kind as the API names it.
#[must_use]
pub fn kind_to_pb(k: EntryKind) -> pb::EntryKind {
    match k {
        EntryKind::Grant => pb::EntryKind::Grant,
        EntryKind::Reserve => pb::EntryKind::Reserve,
        EntryKind::Commit => pb::EntryKind::Commit,
        EntryKind::Release => pb::EntryKind::Release,
        EntryKind::Expire => pb::EntryKind::Expire,
        EntryKind::Refund => pb::EntryKind::Refund,
        EntryKind::Expiration => pb::EntryKind::Expiration,
        EntryKind::Adjustment => pb::EntryKind::Adjustment,
        EntryKind::TransferOut => pb::EntryKind::TransferOut,
        EntryKind::TransferIn => pb::EntryKind::TransferIn,
        EntryKind::Clawback => pb::EntryKind::Clawback,
        EntryKind::DebtPayment => pb::EntryKind::DebtPayment,
    }
}

fn kind_from_pb(k: pb::EntryKind) -> Option<EntryKind> {
    EntryKind::ALL.into_iter().find(|d| kind_to_pb(*d) == k)
}

/// The binding of an entry listing.
#[must_use]
pub fn entries_binding(r: &pb::ListEntriesRequest) -> String {
    let t = |t: Option<&prost_types::Timestamp>| {
        t.map(|t| format!("{}.{}", t.seconds, t.nanos))
            .unwrap_or_default()
    };
    format!(
        "entries|{}|{}|{}|{}",
        r.account_id,
        r.kinds
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        t(r.since.as_ref()),
        t(r.until.as_ref())
    )
}

/// Parses a ListEntries request.
pub fn list_entries(r: &pb::ListEntriesRequest) -> Result<EntryQuery, ServiceError> {
    let mut c = Check::default();
    let account_id = if r.account_id.is_empty() {
        Some(None)
    } else {
        c.field(AccountId::parse("account_id", &r.account_id))
            .map(Some)
    };
    let kinds = c.field(kinds(&r.kinds));
    let since = c.field(time("since", r.since.as_ref()));
    let until = c.field(time("until", r.until.as_ref()));
    let limit = page_size(&mut c, r.page_size);
    let mut query = c.done((|| {
        Some(EntryQuery {
            account_id: account_id?,
            kinds: kinds?,
            since: since?,
            until: until?,
            cursor: EntryCursor::Before(None),
            limit: limit?,
        })
    })())?;
    let mut buf = String::new();
    if let Some(last) = token_position(&entries_binding(r), &r.page_token, &mut buf)? {
        let id = last
            .parse()
            .map_err(|_| FieldViolation::new("page_token", "is not a token from this listing"))?;
        query.cursor = EntryCursor::Before(Some(id));
    }
    Ok(query)
}

/// Longest ExportUsage window: 366 days.
pub const EXPORT_WINDOW_MAX: TimeDelta = TimeDelta::days(366);

/// Parses an ExportUsage request.
pub fn export_usage(r: &pb::ExportUsageRequest) -> Result<EntryQuery, ServiceError> {
    let mut c = Check::default();
    let account_id = if r.account_id.is_empty() {
        Some(None)
    } else {
        c.field(AccountId::parse("account_id", &r.account_id))
            .map(Some)
    };
    let since = c.field(
        time("since", r.since.as_ref())
            .and_then(|t| t.ok_or_else(|| FieldViolation::new("since", "is required"))),
    );
    let until = c.field(
        time("until", r.until.as_ref())
            .and_then(|t| t.ok_or_else(|| FieldViolation::new("until", "is required"))),
    );
    if let (Some(s), Some(u)) = (since, until)
        && (u <= s || u.signed_duration_since(s) > EXPORT_WINDOW_MAX)
    {
        c.field::<()>(Err(FieldViolation::new(
            "until",
            "must be after since, at most 366 days later",
        )));
    }
    let value = (|| {
        Some(EntryQuery {
            account_id: account_id?,
            kinds: vec![],
            since: Some(since?),
            until: Some(until?),
            cursor: EntryCursor::After(None),
            limit: EXPORT_PAGE,
        })
    })();
    c.done(value)
}

/// Entries read per page while exporting.
pub const EXPORT_PAGE: u32 = 1_000;

/// An entry as a protobuf message.
#[must_use]
pub fn entry_to_pb(e: EntryRecord) -> pb::Entry {
    pb::Entry {
        entry_id: e.entry_id,
        account_id: e.account_id,
        hold_id: e.hold_id.unwrap_or_default(),
        grant_id: e.grant_id.unwrap_or_default(),
        kind: kind_to_pb(e.kind).into(),
        available_delta: e.available_delta,
        held_delta: e.held_delta,
        reason: e.reason,
        created_at: Some(ts(e.created_at)),
    }
}

/// The price table as ListOperations describes it, by operation name.
#[must_use]
pub fn operations_to_pb(catalog: &Catalog) -> pb::ListOperationsResponse {
    use crate::domain::pricing::{Decimal, ParamInfo, UNITS_MAX};
    let operations = catalog
        .pricing
        .iter()
        .map(|(name, op)| pb::PricedOperationInfo {
            name: name.clone(),
            description: op.description.clone(),
            formula: op.price.formula(),
            base: op.price.base.to_string(),
            params: op
                .price
                .params()
                .into_iter()
                .map(|p| match p {
                    ParamInfo::Number { name, per_unit } => pb::OperationParam {
                        kind: "number".into(),
                        min: "0".into(),
                        max: Decimal::whole(UNITS_MAX).to_string(),
                        unit: name.clone(),
                        per_unit: per_unit.to_string(),
                        name,
                        required: true,
                        ..Default::default()
                    },
                    ParamInfo::Choice { name, values } => pb::OperationParam {
                        kind: "choice".into(),
                        allowed_values: values
                            .into_iter()
                            .map(|(v, m)| (v, m.to_string()))
                            .collect(),
                        name,
                        required: true,
                        ..Default::default()
                    },
                })
                .collect(),
        })
        .collect();
    pb::ListOperationsResponse { operations }
}

/// The CSV header of ExportUsage.
pub const CSV_HEADER: &str =
    "entry_id,created_at,account_id,kind,hold_id,available_delta,held_delta,reason\n";

/// A text cell: RFC 4180 quoting, and OWASP's CSV-injection rule — a cell that begins with
/// `=`, `+`, `-`, `@`, a tab or a carriage return gets a leading `'` (and quotes), so a
/// spreadsheet shows it as text instead of running it as a formula.
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    let formula = s.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if formula || s.contains([',', '"', '\n', '\r']) {
        let quote = if formula { "'" } else { "" };
        std::borrow::Cow::Owned(format!("\"{quote}{}\"", s.replace('"', "\"\"")))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// One entry as a CSV line (RFC 4180 quoting).
#[must_use]
pub fn csv_line(e: &EntryRecord) -> String {
    format!(
        "{},{},{},{},{},{},{},{}\n",
        e.entry_id,
        e.created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        csv_field(&e.account_id),
        e.kind.as_str(),
        e.hold_id.as_deref().unwrap_or_default(),
        e.available_delta,
        e.held_delta,
        csv_field(&e.reason)
    )
}

/// A time as a protobuf Timestamp.
#[must_use]
pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A domain hold as a protobuf message.
#[must_use]
pub fn hold_to_pb(h: Hold) -> pb::Hold {
    pb::Hold {
        hold_id: h.hold_id,
        account_id: h.account_id,
        amount: h.amount,
        state: state_to_pb(h.state).into(),
        committed_amount: h.committed_amount,
        refunded_amount: h.refunded_amount,
        created_at: Some(ts(h.created_at)),
        expires_at: Some(ts(h.expires_at)),
        resolved_at: h.resolved_at.map(ts),
        metadata: h.metadata.pairs().clone().into_iter().collect(),
    }
}

/// Prices `operation` with `params` from the catalog.
///
/// # Errors
/// A violation on `operation` (unknown) or `params` (unknown, missing or malformed).
pub fn price<S: std::hash::BuildHasher>(
    catalog: &Catalog,
    operation: &str,
    params: &std::collections::HashMap<String, String, S>,
) -> Result<Estimate, FieldViolation> {
    let op = catalog.pricing.get(operation).ok_or_else(|| {
        let known: Vec<&str> = catalog.pricing.keys().map(String::as_str).collect();
        FieldViolation::new(
            "operation",
            format!(
                "unknown operation {operation:?}; known: {}",
                known.join(", ")
            ),
        )
    })?;
    op.price
        .estimate(&params.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// The canonical text of a priced request (sorted params), for its fingerprint.
fn canonical<S: std::hash::BuildHasher>(
    operation: &str,
    params: &std::collections::HashMap<String, String, S>,
) -> String {
    let sorted: std::collections::BTreeMap<&String, &String> = params.iter().collect();
    let mut text = operation.to_owned();
    for (k, v) in sorted {
        let _ = write!(text, "\n{}:{k}={v}", k.len());
    }
    text
}

/// An estimate as a protobuf message.
#[must_use]
pub fn estimate_to_pb(e: Estimate) -> pb::EstimateCostResponse {
    pb::EstimateCostResponse {
        cost: e.cost.get(),
        exact: e.exact,
        factors: e
            .factors
            .into_iter()
            .map(|f| pb::CostFactor {
                name: f.name,
                value: f.value,
                detail: f.detail,
            })
            .collect(),
    }
}

/// Longest event id, endpoint name or type accepted in an event filter: 128 bytes.
pub const EVENT_FIELD_MAX: usize = 128;

fn event_field(c: &mut Check, field: &'static str, v: &str) -> Option<String> {
    if v.is_empty() {
        return None;
    }
    if v.len() > EVENT_FIELD_MAX || v.chars().any(char::is_control) {
        c.0.push(FieldViolation::new(
            field,
            "must be at most 128 bytes without control characters",
        ));
        return None;
    }
    Some(v.to_owned())
}

/// The binding of an event listing.
#[must_use]
pub fn events_binding(r: &pb::ListEventDeliveriesRequest) -> String {
    format!(
        "events|{}|{}|{}|{}|{}",
        hex::encode(&r.account_id),
        hex::encode(&r.r#type),
        r.state,
        hex::encode(&r.endpoint),
        hex::encode(&r.event_id)
    )
}

/// Parses a ListEventDeliveries request.
pub fn list_events(r: &pb::ListEventDeliveriesRequest) -> Result<EventQuery, ServiceError> {
    use crate::domain::event::{DeliveryState, EventType};
    let mut c = Check::default();
    let account_id = event_field(&mut c, "account_id", &r.account_id);
    let kind = event_field(&mut c, "type", &r.r#type);
    if let Some(k) = &kind
        && EventType::parse(k).is_none()
    {
        c.0.push(FieldViolation::new("type", "is not an event type"));
    }
    let state = match pb::EventDeliveryState::try_from(r.state) {
        Ok(pb::EventDeliveryState::Unspecified) => None,
        Ok(pb::EventDeliveryState::Pending) => Some(DeliveryState::Pending),
        Ok(pb::EventDeliveryState::Delivered) => Some(DeliveryState::Delivered),
        Ok(pb::EventDeliveryState::Failed) => Some(DeliveryState::Failed),
        Err(_) => {
            c.0.push(FieldViolation::new("state", "is not a delivery state"));
            None
        }
    };
    let endpoint = event_field(&mut c, "endpoint", &r.endpoint);
    let event_id = event_field(&mut c, "event_id", &r.event_id);
    let limit = page_size(&mut c, r.page_size);
    let mut decoded = String::new();
    let before = match token_position(&events_binding(r), &r.page_token, &mut decoded) {
        Ok(p) => p
            .map(|p| {
                p.parse::<i64>().map_err(|_| {
                    FieldViolation::new("page_token", "is not a token from this listing")
                })
            })
            .transpose()
            .map_err(|v| c.0.push(v))
            .ok()
            .flatten(),
        Err(ServiceError::Invalid(v)) => {
            c.0.extend(v);
            None
        }
        Err(e) => return Err(e),
    };
    let query = limit.map(|limit| EventQuery {
        account_id,
        kind,
        state,
        endpoint,
        event_id,
        before,
        limit,
    });
    c.done(query)
}

/// An outbox row as the API shows it.
#[must_use]
pub fn event_to_pb(e: EventRow) -> pb::EventDelivery {
    use crate::domain::event::DeliveryState;
    pb::EventDelivery {
        event_id: e.event_id,
        endpoint: e.endpoint,
        account_id: e.account_id,
        r#type: e.kind,
        state: match e.state {
            DeliveryState::Pending => pb::EventDeliveryState::Pending,
            DeliveryState::Delivered => pb::EventDeliveryState::Delivered,
            DeliveryState::Failed => pb::EventDeliveryState::Failed,
        }
        .into(),
        attempts: i32::try_from(e.attempts).unwrap_or(i32::MAX),
        created_at: Some(ts(e.created_at)),
        next_attempt_at: (e.state == DeliveryState::Pending).then(|| ts(e.next_attempt_at)),
        last_attempt_at: e.last_attempt_at.map(ts),
        last_status: e.last_status.unwrap_or(0),
        last_error: e.last_error.unwrap_or_default(),
        delivered_at: e.delivered_at.map(ts),
        body: e.body,
    }
}

/// Parses a RedeliverEvent request: the event id and the endpoint, if one.
pub fn redeliver(r: &pb::RedeliverEventRequest) -> Result<(String, Option<String>), ServiceError> {
    let mut c = Check::default();
    let id = event_field(&mut c, "event_id", &r.event_id);
    if id.is_none() && c.0.is_empty() {
        c.0.push(FieldViolation::new("event_id", "is required"));
    }
    let endpoint = event_field(&mut c, "endpoint", &r.endpoint);
    c.done(id.map(|id| (id, endpoint)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every domain kind and source has its API value, named as the domain stores it
    /// (`TRANSFER_OUT` ↔ `transfer_out`: the words the CLI and `by_source` use), and back.
    #[test]
    fn entry_kinds_and_grant_sources_map_one_to_one_by_name() {
        for k in EntryKind::ALL {
            let pb = kind_to_pb(k);
            assert_eq!(
                pb.as_str_name(),
                format!("ENTRY_KIND_{}", k.as_str().to_uppercase())
            );
            assert_eq!(kind_from_pb(pb), Some(k));
        }
        for s in Source::ALL {
            let pb = source_to_pb(s);
            assert_eq!(
                pb.as_str_name(),
                format!("GRANT_SOURCE_{}", s.as_str().to_uppercase())
            );
            assert_eq!(source_from_pb(pb), s);
        }
        let api_kinds = (1..256)
            .filter(|n| pb::EntryKind::try_from(*n).is_ok())
            .count();
        let api_sources = (1..256)
            .filter(|n| pb::GrantSource::try_from(*n).is_ok())
            .count();
        assert_eq!(
            (api_kinds, api_sources),
            (EntryKind::ALL.len(), Source::ALL.len())
        );
    }
}
