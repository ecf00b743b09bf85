//! Idempotency records written under the first Reserve fingerprint encoding (issue 23, item 4)
//! still replay after the upgrade, on both backends and through the group commit.

use chrono::TimeDelta;
use tally::domain::command::Idempotency;
use tally::domain::{Caller, IdempotencyKey};

use crate::support::{Backend, TestDb};
use crate::{grant, reserve_cmd};

async fn records_of_the_old_fingerprint_encoding_still_replay(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let s = &store;
    grant(s, "old", 100).await;
    let cmd = reserve_cmd("old", 7, TimeDelta::minutes(5));
    let key = |fingerprint, legacy| Idempotency {
        caller: Caller::new("c"),
        key: IdempotencyKey::parse("k", "before-upgrade").unwrap(),
        fingerprint,
        legacy,
    };
    // What the previous version stored: the old encoding only.
    let first = s
        .reserve(&key(cmd.legacy_fingerprint(), None), &cmd)
        .await
        .unwrap();
    // The upgraded server sends the new fingerprint and the old one beside it.
    let again = s
        .reserve(
            &key(cmd.fingerprint(), Some(cmd.legacy_fingerprint())),
            &cmd,
        )
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.outcome.hold.hold_id, first.outcome.hold.hold_id);
    // A different request under that key is still refused.
    let other = reserve_cmd("old", 8, TimeDelta::minutes(5));
    let e = s
        .reserve(
            &key(other.fingerprint(), Some(other.legacy_fingerprint())),
            &other,
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("already used"),
        "IDEMPOTENCY_KEY_REUSED: {e}"
    );
}

crate::on_both_backends!(records_of_the_old_fingerprint_encoding_still_replay);
