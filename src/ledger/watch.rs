//! Live balances: `CreditService.WatchBalance` and the SSE stream read them here.
//!
//! One [`Watcher`] per replica. It hears every committed change of an account from the
//! store's feed ([`crate::storage::Changes`]: PostgreSQL `LISTEN`, SQLite in process) and
//! keeps, per watched account, only the latest balance read (a `tokio::sync::watch` slot): one
//! read per change however many streams watch the account, and a stream that does not read
//! holds one slot, not a queue of what it missed. Each stream sends a balance whose version is
//! higher than the last it sent, so versions strictly increase and a skipped number only means
//! changes were folded into the state sent (every message is the whole balance).
//!
//! A lost feed (the listening connection dropped, or this replica fell behind it) re-reads
//! every watched account; so does an idle account every `resync_interval`, which also shows
//! what time alone changes (a new allowance period). Streams are capped in total and per
//! caller, and end with UNAVAILABLE (`SHUTTING_DOWN`) when the server stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, broadcast, watch};
use tracing::warn;

use super::{Engine, ServiceError, ServiceResult, with_retry};
use crate::domain::{AccountId, Balance};
use crate::storage::Change;

/// Streams a replica serves at once, by default: 10,000.
pub const MAX_STREAMS_DEFAULT: usize = 10_000;
/// Streams one caller may hold open on a replica, by default: 5,000 (a product backend proxies
/// its users' streams under one token).
pub const MAX_STREAMS_PER_CALLER_DEFAULT: usize = 5_000;
/// How often an idle watched account is read again, by default: 60 s.
pub const RESYNC_INTERVAL_DEFAULT: Duration = Duration::from_mins(1);
/// Wait before reading an account again after a failed read; it doubles with each failure in
/// a row, up to [`READ_RETRY_MAX`], so an outage does not turn every watched account into a
/// read every half second.
pub const READ_RETRY: Duration = Duration::from_millis(500);
/// Longest wait between reads of an account whose reads fail.
pub const READ_RETRY_MAX: Duration = Duration::from_secs(10);
/// Reads of watched balances in flight at once on a replica: a re-read of every watched
/// account (after a lost listening connection) queues here instead of taking the whole
/// connection pool from the job path.
pub const READS_IN_FLIGHT: usize = 8;

/// The caps and timers of a [`Watcher`].
#[derive(Clone, Copy, Debug)]
pub struct WatchLimits {
    /// Streams at once on this replica.
    pub max_streams: usize,
    /// Streams at once of one caller on this replica.
    pub max_streams_per_caller: usize,
    /// How often an idle watched account is read again.
    pub resync_interval: Duration,
}

impl Default for WatchLimits {
    fn default() -> Self {
        Self {
            max_streams: MAX_STREAMS_DEFAULT,
            max_streams_per_caller: MAX_STREAMS_PER_CALLER_DEFAULT,
            resync_interval: RESYNC_INTERVAL_DEFAULT,
        }
    }
}

/// A balance a stream sends.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The balance, with its version.
    pub balance: Arc<Balance>,
    /// When this replica heard of the change the balance shows (`None` for a first read or a
    /// periodic one): the notification lag is measured from here to the send.
    pub noticed: Option<Instant>,
}

/// The live balances of one replica. Cheap to clone.
#[derive(Clone)]
pub struct Watcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

struct Inner {
    engine: Engine,
    limits: WatchLimits,
    state: Mutex<State>,
    stop: watch::Receiver<bool>,
    reads: Arc<tokio::sync::Semaphore>,
}

#[derive(Default)]
struct State {
    accounts: HashMap<String, Arc<Watched>>,
    callers: HashMap<String, usize>,
    streams: usize,
}

/// One watched account: its latest balance and the refresher's wake-up.
struct Watched {
    latest: watch::Sender<Snapshot>,
    dirty: Notify,
    /// When the oldest change not yet read was heard of.
    noticed: Mutex<Option<Instant>>,
}

impl Watched {
    fn touch(&self, at: Instant) {
        self.noticed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(at);
        self.dirty.notify_one();
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[allow(clippy::cast_precision_loss)] // gauges; exact far beyond any count here
fn gauges(state: &State) {
    metrics::gauge!("tally_watch_streams").set(state.streams as f64);
    metrics::gauge!("tally_watch_accounts").set(state.accounts.len() as f64);
}

impl Watcher {
    /// Starts hearing `engine`'s changes until `stop` turns true (or the last clone is dropped).
    #[must_use]
    pub fn start(engine: Engine, limits: WatchLimits, stop: watch::Receiver<bool>) -> Self {
        let changes = engine.changes();
        let inner = Arc::new(Inner {
            engine,
            limits,
            state: Mutex::new(State::default()),
            stop: stop.clone(),
            reads: Arc::new(tokio::sync::Semaphore::new(READS_IN_FLIGHT)),
        });
        tokio::spawn(hear(Arc::downgrade(&inner), changes, stop));
        Self { inner }
    }

    /// The caps and timers.
    #[must_use]
    pub fn limits(&self) -> WatchLimits {
        self.inner.limits
    }

    /// A stream of `account`'s balance for `caller`: first the current balance (unless its
    /// version is `after_version`), then one balance per committed change, newest only.
    ///
    /// # Errors
    /// `TooManyStreams` over a cap, `AccountNotFound`, or the database's error.
    pub async fn watch(
        &self,
        caller: &str,
        account: &AccountId,
        after_version: Option<i64>,
    ) -> ServiceResult<Watch> {
        let permit = self.admit(caller)?;
        let engine = &self.inner.engine;
        let balance = with_retry(|| engine.balance(account)).await?;
        let rx = self.join(account, balance);
        Ok(Watch {
            rx,
            sent: after_version,
            first: true,
            stop: self.inner.stop.clone(),
            ended: false,
            _permit: permit,
        })
    }

    /// Counts a stream against the caps, or refuses it.
    fn admit(&self, caller: &str) -> ServiceResult<Permit> {
        let limits = self.inner.limits;
        let mut st = lock(&self.inner.state);
        if *self.inner.stop.borrow() {
            return Err(ServiceError::ShuttingDown);
        }
        if st.streams >= limits.max_streams {
            return Err(ServiceError::TooManyStreams(format!(
                "this server has {} balance streams open, its limit (--watch-max-streams)",
                limits.max_streams
            )));
        }
        let mine = st.callers.entry(caller.to_owned()).or_default();
        if *mine >= limits.max_streams_per_caller {
            return Err(ServiceError::TooManyStreams(format!(
                "this caller has {} balance streams open on this server, its limit (--watch-max-streams-per-caller)",
                limits.max_streams_per_caller
            )));
        }
        *mine = mine.saturating_add(1);
        st.streams = st.streams.saturating_add(1);
        gauges(&st);
        Ok(Permit {
            inner: Arc::clone(&self.inner),
            caller: caller.to_owned(),
        })
    }

    /// Subscribes to `account`'s slot, creating it (and its refresher) if nobody watched it.
    /// `balance` was read before: it replaces the slot's if newer.
    fn join(&self, account: &AccountId, balance: Balance) -> watch::Receiver<Snapshot> {
        let mut st = lock(&self.inner.state);
        if let Some(w) = st.accounts.get(account.as_str()) {
            let rx = w.latest.subscribe();
            w.latest.send_if_modified(|cur| {
                let newer = balance.version > cur.balance.version;
                if newer {
                    *cur = Snapshot {
                        balance: Arc::new(balance),
                        noticed: None,
                    };
                }
                newer
            });
            return rx;
        }
        let (tx, rx) = watch::channel(Snapshot {
            balance: Arc::new(balance),
            noticed: None,
        });
        let w = Arc::new(Watched {
            latest: tx,
            dirty: Notify::new(),
            noticed: Mutex::new(None),
        });
        // A change heard between the read above and now reached nobody: read once more.
        w.dirty.notify_one();
        st.accounts
            .insert(account.as_str().to_owned(), Arc::clone(&w));
        gauges(&st);
        tokio::spawn(refresh(Arc::downgrade(&self.inner), account.clone(), w));
        rx
    }
}

/// A stream's place under the caps; dropping it frees the place.
struct Permit {
    inner: Arc<Inner>,
    caller: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = lock(&self.inner.state);
        st.streams = st.streams.saturating_sub(1);
        if let Some(n) = st.callers.get_mut(&self.caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.callers.remove(&self.caller);
            }
        }
        gauges(&st);
    }
}

/// One caller's stream of one account's balance.
pub struct Watch {
    rx: watch::Receiver<Snapshot>,
    /// The version last sent (or the caller's `after_version`).
    sent: Option<i64>,
    first: bool,
    stop: watch::Receiver<bool>,
    ended: bool,
    _permit: Permit,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl Watch {
    /// The next balance to send; an error (`ShuttingDown`) once when the server stops, then
    /// `None`.
    pub async fn next(&mut self) -> Option<ServiceResult<Snapshot>> {
        if self.ended {
            return None;
        }
        loop {
            let snap = self.rx.borrow_and_update().clone();
            let v = snap.balance.version;
            let fresh = match self.sent {
                None => true,
                // A reconnecting caller gets the state whenever it is not the one it has.
                Some(s) if self.first => v != s,
                Some(s) => v > s,
            };
            self.first = false;
            if fresh {
                self.sent = Some(v);
                metrics::counter!("tally_watch_messages_total").increment(1);
                if let Some(at) = snap.noticed {
                    metrics::histogram!("tally_watch_lag_seconds").record(at.elapsed());
                }
                return Some(Ok(snap));
            }
            tokio::select! {
                r = self.rx.changed() => {
                    if r.is_err() {
                        // The slot is gone: only when the watcher itself stops.
                        self.ended = true;
                        return Some(Err(ServiceError::ShuttingDown));
                    }
                }
                _ = self.stop.wait_for(|s| *s) => {
                    self.ended = true;
                    return Some(Err(ServiceError::ShuttingDown));
                }
            }
        }
    }
}

/// Hears the store's changes and wakes the refreshers of watched accounts.
async fn hear(
    inner: Weak<Inner>,
    mut changes: crate::storage::Changes,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let change = tokio::select! {
            r = changes.rx.recv() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        let st = lock(&inner.state);
        match change {
            Ok(Change::Account {
                account_id,
                version,
            }) => {
                if let Some(w) = st.accounts.get(&account_id)
                    && version.is_none_or(|v| v > w.latest.borrow().balance.version)
                {
                    w.touch(now);
                }
            }
            Ok(Change::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                metrics::counter!("tally_watch_resyncs_total").increment(1);
                for w in st.accounts.values() {
                    w.touch(now);
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Reads `account` again whenever a change is heard (or every `resync_interval`), and puts
/// the balance in its slot if newer; ends when no stream watches it any more.
async fn refresh(inner: Weak<Inner>, id: AccountId, w: Arc<Watched>) {
    let account = id.as_str();
    let (engine, resync, mut stop, reads) = match inner.upgrade() {
        Some(i) => (
            i.engine.clone(),
            i.limits.resync_interval,
            i.stop.clone(),
            Arc::clone(&i.reads),
        ),
        None => return,
    };
    let mut retry = READ_RETRY;
    loop {
        tokio::select! {
            () = w.dirty.notified() => {}
            () = tokio::time::sleep(resync) => {}
            () = w.latest.closed() => {
                let Some(inner) = inner.upgrade() else { return };
                let mut st = lock(&inner.state);
                // Under the lock no stream can join: retire the slot if nobody came back.
                if w.latest.receiver_count() == 0 {
                    if st.accounts.get(account).is_some_and(|x| Arc::ptr_eq(x, &w)) {
                        st.accounts.remove(account);
                        gauges(&st);
                    }
                    return;
                }
                continue;
            }
            _ = stop.wait_for(|s| *s) => return,
        }
        let noticed = w
            .noticed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let read = {
            let Ok(_permit) = reads.acquire().await else {
                return;
            };
            engine.balance(&id).await
        };
        match read {
            Ok(b) => {
                retry = READ_RETRY;
                w.latest.send_if_modified(|cur| {
                    let newer = b.version > cur.balance.version;
                    if newer {
                        *cur = Snapshot {
                            balance: Arc::new(b),
                            noticed,
                        };
                    }
                    newer
                });
            }
            Err(e) => {
                metrics::counter!("tally_watch_read_failures_total").increment(1);
                warn!(account_id = %account, error.message = %e, "could not read a watched balance; trying again");
                if let Some(at) = noticed {
                    w.touch(at);
                } else {
                    w.dirty.notify_one();
                }
                tokio::time::sleep(retry).await;
                retry = retry.saturating_mul(2).min(READ_RETRY_MAX);
            }
        }
    }
}
