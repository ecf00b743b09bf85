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
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod app;
pub mod auth;
pub mod bench;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod health;
pub mod http;
pub mod pb;
pub mod service;
pub mod storage;
pub mod stripe;
pub mod telemetry;

#[cfg(test)]
mod fuzz;

/// Architecture checks that keep the layers honest (TigerBeetle's "tidy", scaled down).
#[cfg(test)]
mod tidy {
    use std::fs;
    use std::path::Path;

    fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = fs::read_to_string(&path).unwrap();
                // Only production code: stop at the test module.
                let code = text
                    .split("#[cfg(test)]")
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                out.push((path.display().to_string(), code));
            }
        }
    }

    fn check(dir: &str, forbidden: &[&str]) {
        let mut files = Vec::new();
        sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join(dir), &mut files);
        assert!(!files.is_empty());
        for (path, code) in files {
            for word in forbidden {
                assert!(!code.contains(word), "{path} must not use `{word}`");
            }
        }
    }

    #[test]
    fn the_domain_does_no_io_and_knows_no_transport_or_database() {
        check(
            "src/domain",
            &[
                "sqlx", "tonic", "axum", "tokio", "async fn", ".await", "f64", "f32", "Utc::now",
                "std::fs", "std::net",
            ],
        );
    }

    #[test]
    fn storage_knows_nothing_of_transports() {
        check(
            "src/storage",
            &[
                "crate::grpc",
                "crate::pb",
                "tonic",
                "crate::service",
                "crate::stripe",
                "crate::http",
            ],
        );
    }
}
