//! The ledger's vocabulary and rules: pure and synchronous.
//!
//! Nothing here does I/O, awaits, reads a clock or knows a database or transport: callers pass
//! the current time in. Storage backends and the service call these rules; the in-memory
//! [`model::Ledger`] composes them into the reference state machine that property tests and the
//! storage conformance suite check the real backends against.
#![deny(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

pub mod amount;
pub mod book;
pub mod command;
pub mod error;
pub mod event;
pub mod hold;
pub mod ids;
pub mod model;
pub mod outcome;
pub mod payment;
pub mod plan;
pub mod pricing;
pub mod rules;
pub mod text;
pub mod webhook;

pub use amount::{Credits, MAX_BALANCE};
pub use error::{FieldViolation, LedgerError};
pub use hold::{Hold, HoldState, Metadata};
pub use ids::{AccountId, Caller, HoldId, IdempotencyKey};
pub use outcome::{
    AccountSummary, AdjustOutcome, Balance, CommitOutcome, EntryRecord, ExtendOutcome,
    GrantOutcome, OpenOutcome, PlanOutcome, RefundOutcome, ReserveOutcome, TransferOutcome,
};
pub use plan::DEFAULT_PLAN;
