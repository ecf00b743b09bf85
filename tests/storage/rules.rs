//! The same rules on both backends: idempotency across restarts, expiry, constraints, history.

use std::time::Duration;

use chrono::TimeDelta;
use tally::domain::command::{ExtendHold, Refund};
use tally::domain::{HoldId, HoldState, LedgerError};
use tally::storage::StorageError;

use crate::support::{Backend, TestDb, assert_ledger_balances};
use crate::{account, commit_cmd, credits, grant, idem, reserve_cmd};

async fn a_retry_after_restart_replays_and_a_reused_key_changes_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let cmd = reserve_cmd("acct", 40, TimeDelta::minutes(5));
    let first = {
        let store = db.store().await;
        grant(&store, "acct", 100).await;
        store
            .reserve(&idem("svc-a", "job-1", cmd.fingerprint()), &cmd)
            .await
            .unwrap()
    };
    assert!(!first.replayed);
    // A new pool on the same database: what a restarted process sees.
    let store = db.store().await;
    let mut retry = cmd.clone();
    retry.hold_id = tally::ledger::new_hold_id();
    let again = store
        .reserve(&idem("svc-a", "job-1", retry.fingerprint()), &retry)
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.outcome, first.outcome);

    let other = reserve_cmd("acct", 41, TimeDelta::minutes(5));
    let err = store
        .reserve(&idem("svc-a", "job-1", other.fingerprint()), &other)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Rejected(LedgerError::IdempotencyKeyReused)
        ),
        "{err:?}"
    );
    // The same key from another caller is another request.
    let b = store
        .reserve(&idem("svc-b", "job-1", other.fingerprint()), &other)
        .await
        .unwrap();
    assert!(!b.replayed);
    let bal = store.balance(&account("acct")).await.unwrap();
    assert_eq!((bal.available, bal.held), (19, 81));
    assert_ledger_balances(&store).await;
}

async fn a_refused_call_stores_no_key_so_it_can_be_retried(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    grant(&store, "acct", 10).await;
    let cmd = reserve_cmd("acct", 40, TimeDelta::minutes(5));
    let err = store
        .reserve(&idem("c", "job-9", cmd.fingerprint()), &cmd)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Rejected(LedgerError::InsufficientCredits {
                available: 10,
                requested: 40
            })
        ),
        "{err:?}"
    );
    grant(&store, "acct", 30).await;
    let ok = store
        .reserve(&idem("c", "job-9", cmd.fingerprint()), &cmd)
        .await
        .unwrap();
    assert!(!ok.replayed);
    assert_eq!(ok.outcome.available, 0);
    assert_ledger_balances(&store).await;
}

async fn overdue_holds_are_expired_for_every_operation_before_any_sweep(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    grant(&store, "acct", 100).await;
    let short = reserve_cmd("acct", 60, TimeDelta::milliseconds(50));
    let h = store
        .reserve(&idem("c", "r1", short.fingerprint()), &short)
        .await
        .unwrap()
        .outcome
        .hold;
    tokio::time::sleep(Duration::from_millis(120)).await;
    let bal = store.balance(&account("acct")).await.unwrap();
    assert_eq!(
        (bal.available, bal.held, bal.open_holds),
        (100, 0, 0),
        "an overdue hold holds nothing"
    );
    let id = HoldId::parse("h", &h.hold_id).unwrap();
    assert_eq!(store.hold(&id).await.unwrap().state, HoldState::Expired);
    let c = commit_cmd(&h.hold_id, 10);
    let err = store
        .commit_hold(&idem("c", "c1", c.fingerprint()), &c)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Rejected(LedgerError::HoldExpired)),
        "{err:?}"
    );
    let x = ExtendHold {
        hold_id: id.clone(),
        ttl: TimeDelta::minutes(1),
    };
    let err = store
        .extend_hold(&idem("c", "x1", x.fingerprint()), &x)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Rejected(LedgerError::HoldExpired)),
        "{err:?}"
    );
    let f = Refund {
        hold_id: id,
        amount: None,
        reason: String::new(),
    };
    let err = store
        .refund(&idem("c", "f1", f.fingerprint()), &f)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Rejected(LedgerError::HoldExpired)),
        "{err:?}"
    );
    // A reserve of the whole balance works: it expires the overdue hold in its own transaction.
    let all = reserve_cmd("acct", 100, TimeDelta::minutes(5));
    let r = store
        .reserve(&idem("c", "r2", all.fingerprint()), &all)
        .await
        .unwrap();
    assert_eq!(r.outcome.available, 0);
    assert_eq!(
        store.expire_due(100).await.unwrap(),
        0,
        "nothing left for the sweeper"
    );
    assert_ledger_balances(&store).await;
}

async fn commit_of_more_than_held_draws_extra_or_leaves_the_hold_open(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    grant(&store, "acct", 50).await;
    let r = reserve_cmd("acct", 40, TimeDelta::minutes(5));
    let h = store
        .reserve(&idem("c", "r", r.fingerprint()), &r)
        .await
        .unwrap()
        .outcome
        .hold;
    let too_much = commit_cmd(&h.hold_id, 61);
    let err = store
        .commit_hold(&idem("c", "c1", too_much.fingerprint()), &too_much)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Rejected(LedgerError::InsufficientCredits {
                available: 10,
                requested: 21
            })
        ),
        "{err:?}"
    );
    let id = HoldId::parse("h", &h.hold_id).unwrap();
    assert_eq!(
        store.hold(&id).await.unwrap().state,
        HoldState::Open,
        "the hold stays as it was"
    );
    let fits = commit_cmd(&h.hold_id, 50);
    let c = store
        .commit_hold(&idem("c", "c2", fits.fingerprint()), &fits)
        .await
        .unwrap()
        .outcome;
    assert_eq!((c.released, c.extra_drawn, c.available), (0, 10, 0));
    // Refunds: partial, then the rest by default, then nothing left.
    let part = Refund {
        hold_id: id.clone(),
        amount: Some(credits(20)),
        reason: "partial".into(),
    };
    assert_eq!(
        store
            .refund(&idem("c", "f1", part.fingerprint()), &part)
            .await
            .unwrap()
            .outcome
            .refunded,
        20
    );
    let rest = Refund {
        hold_id: id.clone(),
        amount: None,
        reason: "rest".into(),
    };
    assert_eq!(
        store
            .refund(&idem("c", "f2", rest.fingerprint()), &rest)
            .await
            .unwrap()
            .outcome
            .refunded,
        30
    );
    let err = store
        .refund(&idem("c", "f3", rest.fingerprint()), &rest)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Rejected(LedgerError::RefundExceedsCharge { refundable: 0, .. })
        ),
        "{err:?}"
    );
    assert_eq!(store.balance(&account("acct")).await.unwrap().available, 50);
    assert_ledger_balances(&store).await;
}

async fn the_balance_limit_is_a_typed_refusal(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    for _ in 0..1_000 {
        grant(&store, "rich", tally::domain::Credits::MAX).await;
    }
    let cmd = tally::domain::command::GrantCredits::simple(
        account("rich"),
        credits(1),
        tally::domain::book::Source::Adjustment,
        "one more",
    );
    let err = store
        .grant(&idem("c", "g", cmd.fingerprint()), &cmd)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Rejected(LedgerError::BalanceLimitExceeded { .. })
        ),
        "{err:?}"
    );
    assert_eq!(
        store.balance(&account("rich")).await.unwrap().available,
        tally::domain::MAX_BALANCE
    );
    assert_ledger_balances(&store).await;
}

async fn entries_are_append_only(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    grant(&store, "acct", 5).await;
    let (update, delete) = match backend {
        Backend::Sqlite => {
            let s = db.sqlite().await;
            (
                sqlx::query("UPDATE entry SET available_delta = 500")
                    .execute(s.pool())
                    .await
                    .map(|_| ()),
                sqlx::query("DELETE FROM entry")
                    .execute(s.pool())
                    .await
                    .map(|_| ()),
            )
        }
        Backend::Postgres => {
            let s = db.postgres().await;
            (
                sqlx::query("UPDATE entry SET available_delta = 500")
                    .execute(s.pool())
                    .await
                    .map(|_| ()),
                sqlx::query("DELETE FROM entry")
                    .execute(s.pool())
                    .await
                    .map(|_| ()),
            )
        }
    };
    assert!(update.unwrap_err().to_string().contains("append-only"));
    assert!(delete.unwrap_err().to_string().contains("append-only"));
    assert_ledger_balances(&store).await;
}

async fn unknown_accounts_and_holds_are_not_found(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let err = store.balance(&account("ghost")).await.unwrap_err();
    assert!(
        matches!(err, StorageError::Rejected(LedgerError::AccountNotFound)),
        "{err:?}"
    );
    let r = reserve_cmd("ghost", 1, TimeDelta::minutes(1));
    let err = store
        .reserve(&idem("c", "r", r.fingerprint()), &r)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Rejected(LedgerError::AccountNotFound)),
        "{err:?}"
    );
    let c = commit_cmd(tally::ledger::new_hold_id().as_str(), 1);
    let err = store
        .commit_hold(&idem("c", "c", c.fingerprint()), &c)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Rejected(LedgerError::HoldNotFound)),
        "{err:?}"
    );
}

async fn purged_keys_are_forgotten(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    grant(&store, "acct", 100).await;
    let cmd = reserve_cmd("acct", 10, TimeDelta::minutes(5));
    store
        .reserve(&idem("c", "old", cmd.fingerprint()), &cmd)
        .await
        .unwrap();
    assert_eq!(
        store
            .purge_idempotency(TimeDelta::hours(24), 100)
            .await
            .unwrap(),
        0,
        "young keys are kept"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        store
            .purge_idempotency(TimeDelta::milliseconds(10), 100)
            .await
            .unwrap()
            >= 2
    );
    // A key past retention is a new request (as with Stripe): the retry makes a second hold.
    let mut retry = cmd.clone();
    retry.hold_id = tally::ledger::new_hold_id();
    let again = store
        .reserve(&idem("c", "old", retry.fingerprint()), &retry)
        .await
        .unwrap();
    assert!(!again.replayed);
    assert_eq!(store.balance(&account("acct")).await.unwrap().open_holds, 2);
    assert_ledger_balances(&store).await;
}

async fn the_audit_finds_an_injected_imbalance(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    grant(&store, "acct", 5).await;
    assert!(store.audit().await.unwrap().is_empty());
    // An entry written behind the ledger's back: the balance columns no longer agree.
    let sql = "INSERT INTO entry (account_id, kind, available_delta, held_delta, reason, created_at) \
               VALUES ('acct', 'grant', 7, 0, 'forged', 0)";
    match backend {
        Backend::Sqlite => {
            sqlx::query(sql)
                .execute(db.sqlite().await.pool())
                .await
                .unwrap();
        }
        Backend::Postgres => {
            let sql = sql.replace(", 0)", ", now())");
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(db.postgres().await.pool())
                .await
                .unwrap();
        }
    }
    let found = store.audit().await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].account_id, "acct");
    assert!(
        found[0].detail.contains("entries available=12"),
        "{}",
        found[0].detail
    );
}

crate::on_both_backends!(
    a_retry_after_restart_replays_and_a_reused_key_changes_nothing,
    a_refused_call_stores_no_key_so_it_can_be_retried,
    overdue_holds_are_expired_for_every_operation_before_any_sweep,
    commit_of_more_than_held_draws_extra_or_leaves_the_hold_open,
    the_balance_limit_is_a_typed_refusal,
    entries_are_append_only,
    unknown_accounts_and_holds_are_not_found,
    purged_keys_are_forgotten,
    the_audit_finds_an_injected_imbalance,
);
