//! Every business rejection the ledger can make, and input validation failures.

use std::fmt;

/// One invalid request field, reported to callers as a `google.rpc.BadRequest` violation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    /// The request field, as named in the proto (`amount`, `metadata`, ...).
    pub field: &'static str,
    /// What is wrong, in a sentence a caller can act on.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    #[must_use]
    pub fn new(field: &'static str, description: impl Into<String>) -> Self {
        Self {
            field,
            description: description.into(),
        }
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

/// A command the ledger refuses. A refused command changes nothing.
///
/// Variants are listed in the order the rules check them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The same idempotency key was used earlier with a different request.
    #[error("the idempotency key was already used for a different request")]
    IdempotencyKeyReused,
    /// No account with that id (accounts are created by their first grant).
    #[error("account not found")]
    AccountNotFound,
    /// OpenAccount for an account that exists already.
    #[error("the account already exists")]
    AccountExists,
    /// No hold with that id.
    #[error("hold not found")]
    HoldNotFound,
    /// The hold was already committed.
    #[error("the hold is already committed")]
    HoldAlreadyCommitted,
    /// The hold was released by a refund.
    #[error("the hold was released")]
    HoldReleased,
    /// The hold passed its `expires_at` while open.
    #[error("the hold has expired")]
    HoldExpired,
    /// A partial refund was asked of a hold that is still open.
    #[error("the hold is open: a refund releases it whole; commit the part that was used instead")]
    HoldNotCommitted,
    /// Not enough available credits.
    #[error("insufficient credits: {available} available, {requested} requested")]
    InsufficientCredits {
        /// Credits available at the time of the request.
        available: i64,
        /// Credits the request needed from available.
        requested: i64,
    },
    /// The refund would return more than was committed and not yet refunded.
    #[error("refund exceeds charge: {refundable} refundable, {requested} requested")]
    RefundExceedsCharge {
        /// Committed credits not yet refunded.
        refundable: i64,
        /// Credits the refund asked for.
        requested: i64,
    },
    /// The account would exceed [`super::MAX_BALANCE`].
    #[error("the account balance would exceed the limit of {limit} credits")]
    BalanceLimitExceeded {
        /// The limit.
        limit: i64,
    },
}

impl LedgerError {
    /// The stable `ErrorInfo.reason` for this rejection.
    #[must_use]
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Self::AccountNotFound => "ACCOUNT_NOT_FOUND",
            Self::AccountExists => "ACCOUNT_EXISTS",
            Self::HoldNotFound => "HOLD_NOT_FOUND",
            Self::HoldAlreadyCommitted => "HOLD_ALREADY_COMMITTED",
            Self::HoldReleased => "HOLD_RELEASED",
            Self::HoldExpired => "HOLD_EXPIRED",
            Self::HoldNotCommitted => "HOLD_NOT_COMMITTED",
            Self::InsufficientCredits { .. } => "INSUFFICIENT_CREDITS",
            Self::RefundExceedsCharge { .. } => "REFUND_EXCEEDS_CHARGE",
            Self::BalanceLimitExceeded { .. } => "BALANCE_LIMIT_EXCEEDED",
        }
    }
}
