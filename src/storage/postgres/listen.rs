//! The balance watchers' feed on PostgreSQL: one connection that `LISTEN`s on
//! `tally_balance` (see `migrations/postgres/0012_balance_notify.sql`), reconnecting when it is
//! lost. Notifications sent while it was away are gone for good, so every (re)connection is
//! followed by [`Change::Resync`]: the watchers re-read every account they watch.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
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

/// A notification's payload, `<version> <account_id>`, as a change (`None` if malformed).
#[must_use]
pub fn parse(payload: &str) -> Option<Change> {
    let (version, account_id) = payload.split_once(' ')?;
    let version = version.parse::<i64>().ok()?;
    (!account_id.is_empty()).then(|| Change::Account {
        account_id: account_id.to_owned(),
        version: Some(version),
    })
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
        for bad in ["", "42", "x user", "42 ", " user"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
