//! Protobuf requests → validated domain commands (collecting every violation), and domain
//! outcomes → protobuf messages.

use std::fmt::Write as _;

use chrono::{DateTime, TimeDelta, Utc};

use crate::catalog::Catalog;
use crate::domain::command::{CommitHold, ExtendHold, Grant, REASON_MAX_LEN, Refund, Reserve};
use crate::domain::pricing::Estimate;
use crate::domain::{
    AccountId, Credits, FieldViolation, Hold, HoldId, HoldState, IdempotencyKey, Metadata,
};
use crate::pb;
use crate::service::{Limits, ServiceError, new_hold_id};
use crate::storage::HoldQuery;

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
    if s.chars().count() > REASON_MAX_LEN {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {REASON_MAX_LEN} characters"),
        ));
    }
    Ok(s.to_owned())
}

/// Parses a CheckBalance request.
pub fn account(account_id: &str) -> Result<AccountId, ServiceError> {
    AccountId::parse("account_id", account_id).map_err(ServiceError::from)
}

/// Parses a hold id.
pub fn hold_id(hold_id: &str) -> Result<HoldId, ServiceError> {
    HoldId::parse("hold_id", hold_id).map_err(ServiceError::from)
}

/// Parses a Reserve request.
pub fn reserve(
    r: pb::ReserveRequest,
    limits: &Limits,
    catalog: &Catalog,
) -> Result<(IdempotencyKey, Reserve), ServiceError> {
    let mut c = Check::default();
    let account_id = c.field(AccountId::parse("account_id", &r.account_id));
    let (amount, priced) = match (r.amount, r.operation) {
        (0, Some(op)) => match price(catalog, &op.operation, &op.params) {
            Ok(e) => (Some(e.cost), Some(canonical(&op.operation, &op.params))),
            Err(v) => (c.field(Err(v)), None),
        },
        (n, None) => (c.field(Credits::new("amount", n)), None),
        (_, Some(_)) => (
            c.field(Err(FieldViolation::new(
                "amount",
                "set either amount or operation, not both",
            ))),
            None,
        ),
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
pub fn grant(r: &pb::GrantRequest) -> Result<(IdempotencyKey, Grant), ServiceError> {
    let mut c = Check::default();
    let account_id = c.field(AccountId::parse("account_id", &r.account_id));
    let amount = c.field(Credits::new("amount", r.amount));
    let why = c.field(reason("reason", &r.reason, true));
    let key = c.field(IdempotencyKey::parse("idempotency_key", &r.idempotency_key));
    let value = (|| {
        Some((
            key?,
            Grant {
                account_id: account_id?,
                amount: amount?,
                reason: why?,
            },
        ))
    })();
    c.done(value)
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

/// The opaque page token: hex of `v1|account|states|last hold id`. It is bound to the account
/// and filter of the request that produced it.
#[must_use]
pub fn page_token(q: &HoldQuery, last: &str) -> String {
    hex::encode(format!(
        "v1|{}|{}|{last}",
        q.account_id.as_str(),
        states_tag(&q.states)
    ))
}

/// Parses a ListHolds request.
pub fn list_holds(r: &pb::ListHoldsRequest) -> Result<HoldQuery, ServiceError> {
    let mut c = Check::default();
    let account_id = c.field(AccountId::parse("account_id", &r.account_id));
    let states: Option<Vec<HoldState>> =
        c.field(r.states.iter().map(|s| state_from_pb(*s)).collect());
    let limit = match u32::try_from(r.page_size) {
        Ok(0) => Some(PAGE_SIZE_DEFAULT),
        Ok(n) => Some(n.min(PAGE_SIZE_MAX)),
        Err(_) => c.field(Err(FieldViolation::new(
            "page_size",
            "must not be negative",
        ))),
    };
    let mut query = c.done((|| {
        Some(HoldQuery {
            account_id: account_id?,
            states: states?,
            before: None,
            limit: limit?,
        })
    })())?;
    if !r.page_token.is_empty() {
        let bad = || {
            ServiceError::from(FieldViolation::new(
                "page_token",
                "is not a token from this listing",
            ))
        };
        let text = hex::decode(&r.page_token)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(bad)?;
        let expected = format!(
            "v1|{}|{}|",
            query.account_id.as_str(),
            states_tag(&query.states)
        );
        let last = text.strip_prefix(&expected).ok_or_else(bad)?;
        query.before = Some(HoldId::parse("page_token", last).map_err(|_| bad())?);
    }
    Ok(query)
}

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
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
