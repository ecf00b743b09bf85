//! Stripe webhooks: signature verification and lenient event parsing, pure (no I/O).
//!
//! We verify `Stripe-Signature` ourselves (async-stripe keeps only the last `v1` and rejects
//! events whose object does not match its pinned schema; see shared/docs/stripe.md) and read
//! only the fields we use, every one optional, so old and new API versions both work.

pub mod client;
pub mod event;
pub mod signature;

pub use event::{Effect, Envelope, decide};
pub use signature::{SignatureError, WebhookSecret, verify};
