//! Black-box tests: a real server on a loopback port, real tonic clients, both backends.
//! Every test ends with `TestApp::finish`, which checks the ledger invariants.
#![allow(
    clippy::missing_panics_doc,
    clippy::too_many_lines,
    clippy::many_single_char_names
)]
#![allow(clippy::cast_possible_wrap)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod bench;
mod billing;
mod cli;
mod client;
mod console;
mod credit;
mod edges;
mod events;
mod faults;
mod grpc_web;
mod operator;
mod ops;
mod pricing;
mod process;
mod production;
mod stripe;
mod stripe_facts;
mod tls;
mod watch;

use tally::pb;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// The `ErrorInfo.reason` of a status (every Tally error has one).
pub fn reason(s: &Status) -> String {
    let info = s
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo on {s:?}"));
    assert_eq!(info.domain, "tally.v1");
    info.reason
}

/// A fresh idempotency key.
pub fn key() -> String {
    format!("k-{}", uuid::Uuid::now_v7().simple())
}

/// `message` with `authorization: Bearer <token>`.
pub fn with<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

pub fn expect_error(s: &Status, code: Code, why: &str) {
    assert_eq!((s.code(), reason(s).as_str()), (code, why), "{s:?}");
}

pub fn reserve_req(account: &str, amount: i64, key: &str) -> pb::ReserveRequest {
    pb::ReserveRequest {
        account_id: account.into(),
        cost: Some(pb::reserve_request::Cost::Amount(amount)),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

pub fn grant_req(account: &str, amount: i64, key: &str) -> pb::GrantRequest {
    pb::GrantRequest {
        account_id: account.into(),
        amount,
        reason: "test".into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}
