//! `ServiceError` → `tonic::Status`, with `google.rpc.ErrorInfo` on every error and
//! `BadRequest` field violations on validation errors.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation as PbViolation, StatusExt};
use tracing::error;

use crate::domain::LedgerError;
use crate::ledger::ServiceError;

/// `ErrorInfo.domain` of every Tally error.
pub const ERROR_DOMAIN: &str = "tally.v1";

/// The gRPC code of a ledger refusal.
#[must_use]
pub const fn ledger_code(e: &LedgerError) -> Code {
    match e {
        LedgerError::AccountNotFound | LedgerError::HoldNotFound => Code::NotFound,
        LedgerError::IdempotencyKeyReused | LedgerError::AccountExists => Code::AlreadyExists,
        LedgerError::HoldAlreadyCommitted
        | LedgerError::HoldReleased
        | LedgerError::HoldExpired
        | LedgerError::HoldNotCommitted
        | LedgerError::InsufficientCredits { .. }
        | LedgerError::RefundExceedsCharge { .. }
        | LedgerError::BalanceLimitExceeded { .. } => Code::FailedPrecondition,
    }
}

fn ledger_metadata(e: &LedgerError) -> HashMap<String, String> {
    let pairs: Vec<(&str, i64)> = match *e {
        LedgerError::InsufficientCredits {
            available,
            requested,
        } => vec![("available", available), ("requested", requested)],
        LedgerError::RefundExceedsCharge {
            refundable,
            requested,
        } => vec![("refundable", refundable), ("requested", requested)],
        LedgerError::BalanceLimitExceeded { limit } => vec![("limit", limit)],
        _ => vec![],
    };
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_string()))
        .collect()
}

/// Builds the status a caller receives. Internal details are logged here, once, and not sent.
#[must_use]
pub fn to_status(e: &ServiceError) -> Status {
    let (code, reason, message, metadata) = match e {
        ServiceError::Invalid(violations) => {
            let mut details =
                ErrorDetails::with_error_info("INVALID_ARGUMENT", ERROR_DOMAIN, HashMap::new());
            details.set_bad_request(
                violations
                    .iter()
                    .map(|v| PbViolation::new(v.field, v.description.clone()))
                    .collect::<Vec<_>>(),
            );
            return Status::with_error_details(Code::InvalidArgument, e.to_string(), details);
        }
        ServiceError::Rejected(r) => (
            ledger_code(r),
            r.reason(),
            r.to_string(),
            ledger_metadata(r),
        ),
        ServiceError::Contended => {
            let mut details = ErrorDetails::with_error_info(
                "CONCURRENT_MODIFICATION",
                ERROR_DOMAIN,
                HashMap::new(),
            );
            details.set_retry_info(Some(Duration::from_millis(50)));
            return Status::with_error_details(Code::Aborted, e.to_string(), details);
        }
        ServiceError::Unavailable(detail) => {
            error!(error.message = %detail, "database unavailable");
            return unavailable("DATABASE_UNAVAILABLE", e);
        }
        ServiceError::InDoubt(detail) => {
            error!(error.message = %detail, "database connection lost during commit");
            return unavailable("OUTCOME_UNKNOWN", e);
        }
        ServiceError::Internal(detail) => {
            error!(error.message = %detail, "internal error");
            (Code::Internal, "INTERNAL", e.to_string(), HashMap::new())
        }
        ServiceError::TooManyStreams(_) => (
            Code::ResourceExhausted,
            "TOO_MANY_STREAMS",
            e.to_string(),
            HashMap::new(),
        ),
        ServiceError::ShuttingDown => {
            let mut details =
                ErrorDetails::with_error_info("SHUTTING_DOWN", ERROR_DOMAIN, HashMap::new());
            details.set_retry_info(Some(Duration::from_millis(100)));
            return Status::with_error_details(Code::Unavailable, e.to_string(), details);
        }
    };
    let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
    if let ServiceError::Rejected(LedgerError::InsufficientCredits { .. }) = e {
        details.add_precondition_failure_violation(
            "CREDITS",
            "account",
            "not enough available credits",
        );
    }
    Status::with_error_details(code, message, details)
}

/// UNAVAILABLE with `reason` and a 200 ms RetryInfo: retry with the same key.
fn unavailable(reason: &str, e: &ServiceError) -> Status {
    let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new());
    details.set_retry_info(Some(Duration::from_millis(200)));
    Status::with_error_details(Code::Unavailable, e.to_string(), details)
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        to_status(&e)
    }
}
