//! An adaptive concurrency limit on CreditService calls: in-flight work bounded by what the
//! database takes at the latency operators asked for, refusals early and cheap.
//!
//! Every CreditService call counts while in flight; only calls that start work (Reserve,
//! CheckBalance, ...) are refused at the limit. Commit, Refund and ExtendHold finish work an
//! admitted Reserve began, and refusing them would leave credits held. Each window (every
//! [`WINDOW`]) in which the limit was reached (calls refused, or as many in flight), it moves
//! by the mean latency of the calls that ended in it: above the target it shrinks by a tenth
//! (multiplicative decrease), below it it grows by a sixteenth, at least one (additive
//! increase). Below the limit nothing is refused, so the limit stays. Between
//! [`MIN_LIMIT`] and the hard cap (`--max-concurrent-requests`). A refusal carries a retry
//! delay, jittered so the callers do not come back together, that grows by half each window
//! in which refusals were more than a quarter of the calls served and shrinks once they are
//! under a sixteenth, between [`BASE_RETRY`] and [`MAX_RETRY`]: a crowd of waiting callers
//! then costs the server a bounded share of refusals, however large it is.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the limit moves.
pub const WINDOW: Duration = Duration::from_millis(100);
/// The limit never goes below this.
pub const MIN_LIMIT: usize = 8;
/// Where the limit starts (or the hard cap, if lower).
pub const INITIAL_LIMIT: usize = 128;
/// Shortest and longest retry delay suggested to a refused caller.
pub const BASE_RETRY: Duration = Duration::from_millis(50);
/// See [`BASE_RETRY`].
pub const MAX_RETRY: Duration = Duration::from_secs(2);

/// The limit and its measurements.
#[derive(Debug)]
pub struct AdaptiveLimit {
    limit: AtomicUsize,
    in_flight: AtomicUsize,
    max: usize,
    target: Duration,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    latency_sum: Duration,
    ended: u64,
    refused: u64,
    full: bool,
    /// The retry delay the last window's refusals call for.
    retry: Duration,
}

/// A call in flight; dropping it ends it (its latency is measured then).
#[derive(Debug)]
pub struct InFlight {
    limit: Arc<AdaptiveLimit>,
    start: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.limit.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.limit.record(Some(self.start.elapsed()), false);
    }
}

impl AdaptiveLimit {
    /// A limit aiming at a mean call latency of `target`, never above `max` calls.
    #[must_use]
    pub fn new(target: Duration, max: usize) -> Self {
        let max = max.max(MIN_LIMIT);
        Self {
            limit: AtomicUsize::new(INITIAL_LIMIT.min(max)),
            in_flight: AtomicUsize::new(0),
            max,
            target,
            window: Mutex::new(Window {
                started: Instant::now(),
                latency_sum: Duration::ZERO,
                ended: 0,
                refused: 0,
                full: false,
                retry: BASE_RETRY,
            }),
        }
    }

    /// The limit now.
    #[must_use]
    pub fn current(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Admits a call (`refusable`: one that starts work), or says how long to wait.
    ///
    /// # Errors
    /// The retry delay for a refused call.
    pub fn admit(self: &Arc<Self>, refusable: bool) -> Result<InFlight, Duration> {
        let limit = self.limit.load(Ordering::Relaxed);
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if refusable && before >= limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            // 0.5x to 1.5x of the delay.
            let retry = self.record(None, true);
            return Err(retry / 2 + crate::client::jitter(retry));
        }
        if before + 1 >= limit {
            self.lock().full = true;
        }
        Ok(InFlight {
            limit: Arc::clone(self),
            start: Instant::now(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records an ended call's latency or a refusal, moves the limit when a window closed,
    /// and returns the retry delay a refusal now carries (before jitter).
    fn record(&self, latency: Option<Duration>, refused: bool) -> Duration {
        let mut w = self.lock();
        if let Some(l) = latency {
            w.latency_sum += l;
            w.ended += 1;
        }
        if refused {
            w.refused += 1;
            w.full = true;
        }
        if w.started.elapsed() >= WINDOW && w.ended > 0 {
            let mean = w.latency_sum / u32::try_from(w.ended).unwrap_or(u32::MAX);
            let limit = self.limit.load(Ordering::Relaxed);
            // Latency counts against the limit only when the limit was reached: a slow
            // window below it (a re-plan, a checkpoint) is not this queue's doing.
            let next = if mean > self.target && w.full {
                limit.saturating_sub((limit / 10).max(1)).max(MIN_LIMIT)
            } else if w.full {
                (limit + (limit / 16).max(1)).min(self.max)
            } else {
                limit
            };
            self.limit.store(next, Ordering::Relaxed);
            metrics::gauge!("tally_concurrency_limit")
                .set(f64::from(u32::try_from(next).unwrap_or(u32::MAX)));
            // The delay grows while refusals outnumber a quarter of the calls served (each
            // refusal is work that serves no one) and shrinks once they are rare.
            if w.refused > w.ended / 4 {
                w.retry = w.retry.mul_f64(1.5).min(MAX_RETRY);
            } else if w.refused < w.ended / 16 {
                w.retry = w.retry.div_f64(1.5).max(BASE_RETRY);
            }
            w.started = Instant::now();
            w.latency_sum = Duration::ZERO;
            w.ended = 0;
            w.refused = 0;
            w.full = false;
        }
        w.retry
    }
}

#[cfg(test)]
mod tests {
    use super::{AdaptiveLimit, INITIAL_LIMIT, MIN_LIMIT, WINDOW};
    use std::time::Duration;

    #[test]
    fn work_past_the_limit_is_refused_but_finishing_work_is_not() {
        let l = std::sync::Arc::new(AdaptiveLimit::new(Duration::from_secs(1), 1000));
        let held: Vec<_> = (0..INITIAL_LIMIT).map(|_| l.admit(true).unwrap()).collect();
        let wait = l.admit(true).expect_err("at the limit");
        assert!(wait >= Duration::from_millis(10) && wait <= super::MAX_RETRY);
        let commit = l.admit(false).expect("a call finishing work is admitted");
        drop(commit);
        drop(held);
        assert!(l.admit(true).is_ok());
    }

    #[test]
    fn the_limit_shrinks_above_the_target_and_grows_below_it_under_demand() {
        let l = std::sync::Arc::new(AdaptiveLimit::new(Duration::from_millis(5), 1000));
        // Slow calls below the limit: it stays.
        for _ in 0..3 {
            let c = l.admit(true).unwrap();
            std::thread::sleep(WINDOW / 10);
            drop(c);
            std::thread::sleep(WINDOW);
        }
        assert_eq!(l.current(), INITIAL_LIMIT);
        // Slow calls at the limit: down (128 to 8 in 31 windows), never under the floor.
        for _ in 0..36 {
            let held: Vec<_> = (0..l.current()).map(|_| l.admit(true).unwrap()).collect();
            std::thread::sleep(WINDOW + WINDOW / 10);
            drop(held);
        }
        assert_eq!(l.current(), MIN_LIMIT);
        // Fast calls with callers refused: up again.
        let l2 = std::sync::Arc::new(AdaptiveLimit::new(Duration::from_secs(1), 1000));
        for _ in 0..5 {
            let held: Vec<_> = (0..l2.current()).map(|_| l2.admit(true).unwrap()).collect();
            assert!(l2.admit(true).is_err());
            std::thread::sleep(WINDOW);
            drop(held);
        }
        assert!(l2.current() > INITIAL_LIMIT, "{}", l2.current());
    }
}
