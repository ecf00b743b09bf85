//! Tally meters credits for expensive generation jobs: generation services Reserve credits
//! before a job, Commit what it really cost, and Refund when it fails.
//!
//! # Layout
//! - [`domain`]: amounts, ids, holds, the rules (pure functions) and the reference model.
//!   No I/O, no async, no database or transport types.
//! - [`ledger`]: the application layer: every use case (idempotency, lock, load, settle,
//!   decide, write, retry on contention, the sweeper, Stripe effects). Transports call it.
//! - [`storage`]: the backend port (a transaction's primitives and reads) and its
//!   PostgreSQL and SQLite backends. Backends load rows and write guarded SQL; they never
//!   decide business rules.
//! - [`grpc`]: tonic handlers (decode → ledger → encode) and the error → status mapping.
//! - [`http`]: the axum sidecar: Stripe webhooks, Checkout, the portal.
//! - [`stripe`]: webhook signatures, event parsing, the Stripe API client.
//! - [`app`]: wiring: backend, engine, listeners, health, reflection, shutdown.
//! - [`auth`], [`catalog`], [`config`], [`health`], [`telemetry`]: callers and roles; plans,
//!   packs and prices; configuration values; readiness; traces, logs and metrics.
//! - [`client`]: the Rust client (`tally::client`); [`bench`]: the load generator.
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
pub mod events;
pub mod grpc;
pub mod health;
pub mod http;
pub mod ledger;
pub mod pb;

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
                "crate::ledger",
                "crate::stripe",
                "crate::http",
                "crate::catalog",
                "axum",
            ],
        );
    }

    #[test]
    fn the_transports_go_through_the_ledger_never_storage() {
        for dir in ["src/grpc", "src/http"] {
            check(dir, &["crate::storage", "sqlx"]);
        }
    }

    #[test]
    fn the_ledger_knows_no_transport_and_no_sql() {
        check(
            "src/ledger",
            &[
                "crate::grpc",
                "crate::pb",
                "tonic",
                "crate::http",
                "axum",
                "crate::stripe",
                "sqlx",
            ],
        );
    }

    #[test]
    fn one_module_file_style() {
        // Modules with children live in `name/mod.rs` (clippy's `self_named_module_files`
        // denies `name.rs` beside `name/`); this says so for the reader too.
        let mut files = Vec::new();
        sources(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        for (path, _) in files {
            let p = Path::new(&path);
            if p.file_name().is_some_and(|n| n != "mod.rs") {
                let dir = p.with_extension("");
                assert!(
                    !dir.is_dir(),
                    "{path} has children in {}: move it to mod.rs",
                    dir.display()
                );
            }
        }
    }
}
