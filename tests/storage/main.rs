//! Storage conformance: both backends against the ledger's rules, under concurrency.
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
#![allow(
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

#[path = "../support/mod.rs"]
mod support;

mod concurrency;
mod differential;
mod grants;
mod group;
mod keys;
mod plans;
mod replicas;
mod rules;
mod sharding;
mod stripe;

use chrono::TimeDelta;
use tally::domain::book::Source;
use tally::domain::command::{CommitHold, GrantCredits, Idempotency, Reserve};
use tally::domain::{AccountId, Caller, Credits, GrantOutcome, HoldId, IdempotencyKey, Metadata};
use tally::ledger::Engine;
use tally::ledger::{Ledger, new_hold_id};

pub fn idem(caller: &str, key: &str, fingerprint: [u8; 32]) -> Idempotency {
    Idempotency {
        caller: Caller::new(caller),
        key: IdempotencyKey::parse("k", key).unwrap(),
        fingerprint,
        legacy: None,
    }
}

pub fn account(s: &str) -> AccountId {
    AccountId::parse("account_id", s).unwrap()
}

pub fn credits(n: i64) -> Credits {
    Credits::new("amount", n).unwrap()
}

pub fn reserve_cmd(acct: &str, amount: i64, ttl: TimeDelta) -> Reserve {
    Reserve {
        account_id: account(acct),
        amount: credits(amount),
        ttl,
        ttl_given: true,
        metadata: Metadata::default(),
        hold_id: new_hold_id(),
        priced: None,
    }
}

pub fn commit_cmd(hold: &str, amount: i64) -> CommitHold {
    CommitHold {
        hold_id: HoldId::parse("h", hold).unwrap(),
        amount: credits(amount),
    }
}

pub async fn grant(store: &Engine, acct: &str, amount: i64) -> GrantOutcome {
    let cmd = GrantCredits::simple(account(acct), credits(amount), Source::Adjustment, "test");
    store
        .grant(
            &idem(
                "test",
                &format!("grant-{}", uuid::Uuid::now_v7()),
                cmd.fingerprint(),
            ),
            &cmd,
        )
        .await
        .unwrap()
        .outcome
}

pub fn ledger(store: &Engine) -> Ledger {
    Ledger::new(store.clone(), support::limits())
}
