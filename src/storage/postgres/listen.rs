//! The balance watchers' feed on PostgreSQL. Writers announce the accounts they changed on
//! channel `tally_balance` after their COMMIT ([`Announcer`]: batched, on a connection with
//! `synchronous_commit = off`, so no caller's commit waits for it — see
//! `migrations/postgres/0013_balance_notify_after_commit.sql` for why not a trigger); every
//! replica has one connection that `LISTEN`s ([`run`]), reconnecting when it is lost.
//! Notifications sent while it was away are gone for good, so every (re)connection is followed
//! by [`Change::Resync`]: the watchers re-read every account they watch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::storage::Change;

/// The channel the account trigger notifies.
pub const CHANNEL: &str = "tally_balance";
/// `application_name` of the listening connection (find it in `pg_stat_activity`).
pub const APPLICATION_NAME: &str = "tally-listen";
/// First wait before connecting again after a failure; it doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait between attempts to connect again.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Notifications sent in one statement, at most.
pub const ANNOUNCE_BATCH: usize = 1_000;

/// A notification's payload, `<version> <account_id>` (`-` for a version the writer did not
/// know), as a change (`None` if malformed).
#[must_use]
pub fn parse(payload: &str) -> Option<Change> {
    let (version, account_id) = payload.split_once(' ')?;
    let version = match version {
        "-" => None,
        v => Some(v.parse::<i64>().ok()?),
    };
    (!account_id.is_empty()).then(|| Change::Account {
        account_id: account_id.to_owned(),
        version,
    })
}

/// The payload announcing `account_id` at `version`.
#[must_use]
pub fn payload(account_id: &str, version: Option<i64>) -> String {
    match version {
        Some(v) => format!("{v} {account_id}"),
        None => format!("- {account_id}"),
    }
}

/// Accounts this process's commits changed, waiting to be announced on `tally_balance`. An
/// account changed twice before the next batch is announced once, at its newest version.
#[derive(Debug, Default)]
pub struct Announcer {
    pending: Mutex<HashMap<String, Option<i64>>>,
    wake: tokio::sync::Notify,
}

impl Announcer {
    /// Starts announcing on `pool` (connections with `synchronous_commit = off`) until every
    /// handle is dropped.
    #[must_use]
    pub fn start(pool: PgPool) -> Arc<Self> {
        let a = Arc::new(Self::default());
        tokio::spawn(announce(Arc::downgrade(&a), pool));
        a
    }

    /// `account_id` changed (to `version`, if known) in a transaction that committed.
    pub fn changed(&self, account_id: &str, version: Option<i64>) {
        {
            let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            let v = p.entry(account_id.to_owned()).or_insert(version);
            *v = match (*v, version) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
        self.wake.notify_one();
    }
}

/// Sends what is pending, in batches, until the announcer is dropped. A batch that fails is
/// dropped: the database is unreachable then, so the listeners lose their connections too and
/// every watcher re-reads when they are back.
async fn announce(a: Weak<Announcer>, pool: PgPool) {
    loop {
        let batch: Vec<String> = {
            let Some(a) = a.upgrade() else { return };
            // Woken by a change, or every second to see whether the store is gone.
            let _ = tokio::time::timeout(Duration::from_secs(1), a.wake.notified()).await;
            let pending =
                std::mem::take(&mut *a.pending.lock().unwrap_or_else(PoisonError::into_inner));
            pending.iter().map(|(id, v)| payload(id, *v)).collect()
        };
        for chunk in batch.chunks(ANNOUNCE_BATCH) {
            let sent =
                sqlx::query("SELECT pg_notify('tally_balance', p) FROM unnest($1::text[]) AS p")
                    .bind(chunk)
                    .execute(&pool)
                    .await;
            if let Err(e) = sent {
                metrics::counter!("tally_watch_announce_failures_total").increment(1);
                warn!(error.message = %e, accounts = chunk.len(), "could not announce balance changes");
            }
        }
    }
}

/// Listens until aborted, sending what it hears to `tx`.
pub async fn run(options: PgConnectOptions, tx: broadcast::Sender<Change>) {
    // A pool of one, used only here, so the listening connection never takes one of the
    // pool's and a lost one is replaced by the same options.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(super::CONNECT_TIMEOUT)
        .connect_lazy_with(options.application_name(APPLICATION_NAME));
    let mut backoff = BACKOFF_MIN;
    let mut connected_before = false;
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(mut l) => match l.listen(CHANNEL).await {
                Ok(()) => l,
                Err(e) => {
                    warn!(error.message = %e, "could not LISTEN for balance changes; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2).min(BACKOFF_MAX);
                    continue;
                }
            },
            Err(e) => {
                warn!(error.message = %e, "could not connect to listen for balance changes; retrying");
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        if connected_before {
            info!("listening for balance changes again; watchers re-read their accounts");
            metrics::counter!("tally_watch_reconnects_total").increment(1);
        }
        connected_before = true;
        // Whatever changed before LISTEN took effect was not heard: read everything again.
        let _ = tx.send(Change::Resync);
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    if let Some(change) = parse(n.payload()) {
                        // No receiver is not an error: the feed's owner is going away.
                        let _ = tx.send(change);
                    }
                }
                Ok(None) => {
                    warn!("the connection listening for balance changes was lost; reconnecting");
                    break;
                }
                Err(e) => {
                    warn!(error.message = %e, "listening for balance changes failed; reconnecting");
                    break;
                }
            }
        }
        drop(listener);
        tokio::time::sleep(BACKOFF_MIN).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse() {
        assert_eq!(
            parse("42 user:7"),
            Some(Change::Account {
                account_id: "user:7".into(),
                version: Some(42)
            })
        );
        assert_eq!(
            parse(&payload("u:1", None)),
            Some(Change::Account {
                account_id: "u:1".into(),
                version: None
            })
        );
        assert_eq!(
            parse(&payload("u", Some(7))).unwrap(),
            parse("7 u").unwrap()
        );
        for bad in ["", "42", "x user", "42 ", " user", "- "] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
