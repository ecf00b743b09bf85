//! Tally meters credits for expensive generation jobs: generation services Reserve credits
//! before a job, Commit what it really cost, and Refund when it fails.
//!
//! # Layout
//! - [`domain`]: amounts, ids, holds, the rules (pure functions) and the reference model.
//!   No I/O, no async, no database or transport types.
//! - [`storage`]: the `Store` port and its PostgreSQL and SQLite backends. Backends load
//!   state, call the domain rules and write guarded SQL; they never decide business rules.
//! - [`service`]: use cases over the port: fingerprints, hold ids, bounded retries, sweeper.
//! - [`grpc`]: tonic handlers (decode → service → encode) and the error → status mapping.
//! - [`app`]: wiring: store, listener, health, reflection, shutdown.
//! - [`cli`]: the `tally` command line (server and client).
//! - [`pb`]: generated code.
//!
//! # Invariants
//! - Every balance change is a ledger entry written in the same transaction as the change and
//!   its idempotency record; per account, entries sum to `available` and `held`.
//! - `held` equals the sum of open holds; `available` and `held` are never negative.
//! - A hold leaves `open` once. An open hold past `expires_at` is expired for every operation,
//!   whether or not the sweeper has run.
//! - A refused request changes nothing.
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod app;
pub mod cli;
pub mod domain;
pub mod grpc;
pub mod pb;
pub mod service;
pub mod storage;
