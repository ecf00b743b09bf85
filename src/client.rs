//! A client for generation services that makes the right thing the easy thing.
//!
//! - Every call has a deadline (sent as `grpc-timeout`), and retries `UNAVAILABLE`, `ABORTED`
//!   and rate-limited calls with exponential backoff and full jitter — honouring the server's
//!   `RetryInfo` — inside that deadline. The idempotency key is made once per operation and
//!   reused by every attempt, so a retry can never reserve twice.
//! - [`Job`] is the generation-job pattern: `reserve` holds the credits and keeps the hold alive
//!   with `ExtendHold` heartbeats while the job runs; `commit(actual)` settles it; a job that
//!   is dropped or fails without a commit is refunded (released). A commit whose outcome is
//!   unknown (the reply was lost) is finished with its own key, never refunded.
//!
//! ```no_run
//! # async fn run() -> Result<(), tally::client::Error> {
//! use tally::client::Client;
//! let client = Client::connect("http://127.0.0.1:50051", Some("tly_...")).await?;
//! let job = client.reserve("user_1", 36).await?;   // the estimated cost
//! // ... render the video; the hold is extended in the background ...
//! let settled = job.commit(30).await?;              // what it really cost
//! println!("available now {}", settled.available);
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::pb;
use crate::pb::credit_service_client::CreditServiceClient;

/// How calls are made.
#[derive(Clone, Debug)]
pub struct Config {
    /// Budget of one logical call, retries included.
    pub deadline: Duration,
    /// Attempts per call, the first included.
    pub attempts: u32,
    /// First backoff (doubles per attempt, full jitter).
    pub initial_backoff: Duration,
    /// Longest backoff between attempts.
    pub max_backoff: Duration,
    /// Hold lifetime a [`Job`] asks for; heartbeats extend it every third of it.
    pub hold_ttl: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(5),
            attempts: 6,
            initial_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_secs(1),
            hold_ttl: Duration::from_mins(1),
        }
    }
}

/// What a call can end with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not enough credits: top up; retrying will not help.
    #[error("insufficient credits: {available} available, {requested} requested")]
    InsufficientCredits {
        /// Available now.
        available: i64,
        /// Asked for.
        requested: i64,
    },
    /// A refusal that retrying will not change (the `ErrorInfo.reason`, e.g. `HOLD_EXPIRED`).
    #[error("{reason}: {message}")]
    Rejected {
        /// gRPC code.
        code: Code,
        /// Stable reason.
        reason: String,
        /// The server's message.
        message: String,
    },
    /// Still failing after the retries the deadline allowed. The outcome of a mutating call is
    /// unknown: retry it with the same idempotency key (see [`Error::key`]).
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// The last status.
        last: Status,
        /// The operation's idempotency key, if it has one.
        key: Option<String>,
    },
    /// The server could not be reached or the address is invalid.
    #[error("cannot connect: {0}")]
    Connect(String),
}

impl Error {
    /// The `ErrorInfo.reason`, when the server gave one.
    #[must_use]
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::InsufficientCredits { .. } => Some("INSUFFICIENT_CREDITS"),
            Self::Rejected { reason, .. } => Some(reason),
            Self::Exhausted { .. } | Self::Connect(_) => None,
        }
    }

    /// The idempotency key to retry an unknown outcome with.
    #[must_use]
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Exhausted { key, .. } => key.as_deref(),
            _ => None,
        }
    }

    fn from_status(s: &Status) -> Self {
        let info = s.get_details_error_info();
        let reason = info
            .as_ref()
            .map_or_else(|| format!("{:?}", s.code()), |i| i.reason.clone());
        if reason == "INSUFFICIENT_CREDITS" {
            let num = |k: &str| {
                info.as_ref()
                    .and_then(|i| i.metadata.get(k))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            return Self::InsufficientCredits {
                available: num("available"),
                requested: num("requested"),
            };
        }
        Self::Rejected {
            code: s.code(),
            reason,
            message: s.message().to_owned(),
        }
    }
}

/// Whether an attempt's failure is worth another attempt.
fn retryable(s: &Status) -> bool {
    match s.code() {
        // UNKNOWN and CANCELLED: Tally never sends them; they are a connection broken mid-call
        // (a server killed, a proxy restarted). The outcome is unknown and a retry with the
        // same key is safe. (Our own caller cancelling drops this future: nothing retries.)
        Code::Unavailable | Code::Aborted | Code::Unknown | Code::Cancelled => true,
        // Rate limited (not an empty wallet: that is FAILED_PRECONDITION).
        Code::ResourceExhausted => s.get_details_retry_info().is_some(),
        _ => false,
    }
}

/// A random duration in `0..=max` (full jitter), from the OS generator behind UUIDv4.
pub(crate) fn jitter(max: Duration) -> Duration {
    let bits = uuid::Uuid::new_v4().as_u128();
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(u64::try_from(bits % u128::from(nanos)).unwrap_or(0))
}

/// A Tally client (cheap to clone; clones share the connection).
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    token: Option<Arc<MetadataValue<tonic::metadata::Ascii>>>,
    config: Config,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.config)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `url` (`http://host:50051`) with an optional bearer token.
    ///
    /// # Errors
    /// [`Error::Connect`] for a bad URL, token or an unreachable server.
    pub async fn connect(url: &str, token: Option<&str>) -> Result<Self, Error> {
        let channel = Endpoint::from_shared(url.to_owned())
            .map_err(|e| Error::Connect(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| Error::Connect(e.to_string()))?;
        Self::new(channel, token, Config::default())
    }

    /// A client over an existing channel (lazy channels reconnect by themselves).
    ///
    /// # Errors
    /// [`Error::Connect`] when the token is not a valid header value.
    pub fn new(channel: Channel, token: Option<&str>, config: Config) -> Result<Self, Error> {
        let token = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Error::Connect("the token is not a valid header value".into()))
            })
            .transpose()?
            .map(Arc::new);
        Ok(Self {
            channel,
            token,
            config,
        })
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runs `call` until it succeeds, fails for good, or the deadline allows no more attempts.
    async fn retry<M, R, F, Fut>(&self, message: M, key: Option<&str>, call: F) -> Result<R, Error>
    where
        M: Clone,
        F: Fn(CreditServiceClient<Channel>, Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        self.attempts(message, |channel, r| {
            call(CreditServiceClient::new(channel), r)
        })
        .await
        .map_err(|(status, attempts)| {
            if retryable(&status) || status.code() == Code::DeadlineExceeded {
                Error::Exhausted {
                    attempts,
                    last: status,
                    key: key.map(str::to_owned),
                }
            } else {
                Error::from_status(&status)
            }
        })
    }

    /// Any RPC of any Tally service, with this client's token, deadline and retries (the same
    /// message, so the same idempotency key, on every attempt); the last status when it fails.
    /// What the `tally` command line's client commands are built on.
    ///
    /// ```no_run
    /// # async fn run(client: tally::client::Client) -> Result<(), tonic::Status> {
    /// use tally::pb::admin_service_client::AdminServiceClient;
    /// let m = tally::pb::GetAccountRequest { account_id: "user_1".into() };
    /// let account = client
    ///     .call(m, |ch, r| async move { AdminServiceClient::new(ch).get_account(r).await })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The status that ended the call: a refusal, or the last of the attempts.
    pub async fn call<M, R, F, Fut>(&self, message: M, call: F) -> Result<R, Status>
    where
        M: Clone,
        F: Fn(Channel, Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        self.attempts(message, call).await.map_err(|(s, _)| s)
    }

    /// The attempts of one call: its result, or the status that ended it and how many were
    /// made.
    async fn attempts<M, R, F, Fut>(&self, message: M, call: F) -> Result<R, (Status, u32)>
    where
        M: Clone,
        F: Fn(Channel, Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let deadline = Instant::now() + self.config.deadline;
        let mut backoff = self.config.initial_backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let mut req = Request::new(message.clone());
            req.set_timeout(remaining.max(Duration::from_millis(1)));
            if let Some(t) = &self.token {
                req.metadata_mut().insert("authorization", (**t).clone());
            }
            let status = match call(self.channel.clone(), req).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => s,
            };
            if !retryable(&status)
                || status.code() == Code::DeadlineExceeded
                || attempt >= self.config.attempts
            {
                return Err((status, attempt));
            }
            let hint = status
                .get_details_retry_info()
                .and_then(|r| r.retry_delay)
                .unwrap_or_default();
            let wait = jitter(backoff).max(hint);
            if Instant::now() + wait >= deadline {
                return Err((status, attempt));
            }
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    /// The account's balance.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn check_balance(&self, account: &str) -> Result<pb::CheckBalanceResponse, Error> {
        let m = pb::CheckBalanceRequest {
            account_id: account.to_owned(),
        };
        self.retry(m, None, |mut c, r| async move { c.check_balance(r).await })
            .await
    }

    /// Reserves with a request of your own (its `idempotency_key` is used for every attempt;
    /// one is generated when empty).
    ///
    /// # Errors
    /// [`Error`].
    pub async fn reserve_request(
        &self,
        mut m: pb::ReserveRequest,
    ) -> Result<pb::ReserveResponse, Error> {
        if m.idempotency_key.is_empty() {
            m.idempotency_key = new_key("reserve");
        }
        let key = m.idempotency_key.clone();
        self.retry(m, Some(&key), |mut c, r| async move { c.reserve(r).await })
            .await
    }

    /// Commits `hold_id` with `amount`, under `key`.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn commit(
        &self,
        hold_id: &str,
        amount: i64,
        key: &str,
    ) -> Result<pb::CommitResponse, Error> {
        let m = pb::CommitRequest {
            hold_id: hold_id.to_owned(),
            amount,
            idempotency_key: key.to_owned(),
        };
        self.retry(m, Some(key), |mut c, r| async move { c.commit(r).await })
            .await
    }

    /// Refunds `hold_id` (all of an open hold; `amount` or the rest of a committed one).
    ///
    /// # Errors
    /// [`Error`].
    pub async fn refund(
        &self,
        hold_id: &str,
        amount: Option<i64>,
        reason: &str,
        key: &str,
    ) -> Result<pb::RefundResponse, Error> {
        let m = pb::RefundRequest {
            hold_id: hold_id.to_owned(),
            amount,
            reason: reason.to_owned(),
            idempotency_key: key.to_owned(),
        };
        self.retry(m, Some(key), |mut c, r| async move { c.refund(r).await })
            .await
    }

    /// Extends an open hold to now + `ttl`.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn extend(
        &self,
        hold_id: &str,
        ttl: Duration,
        key: &str,
    ) -> Result<pb::ExtendHoldResponse, Error> {
        let m = pb::ExtendHoldRequest {
            hold_id: hold_id.to_owned(),
            ttl: Some(duration_pb(ttl)),
            idempotency_key: key.to_owned(),
        };
        self.retry(
            m,
            Some(key),
            |mut c, r| async move { c.extend_hold(r).await },
        )
        .await
    }

    /// Reserves `amount` for a job and starts its heartbeat.
    ///
    /// # Errors
    /// [`Error`] (nothing is held then, or — for [`Error::Exhausted`] — retry with its key).
    pub async fn reserve(&self, account: &str, amount: i64) -> Result<Job, Error> {
        self.reserve_job(pb::ReserveRequest {
            account_id: account.to_owned(),
            cost: Some(pb::reserve_request::Cost::Amount(amount)),
            ..Default::default()
        })
        .await
    }

    /// Reserves a job from a request of your own (a priced operation, metadata); the TTL is the
    /// client's `hold_ttl` unless the request has one.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn reserve_job(&self, mut m: pb::ReserveRequest) -> Result<Job, Error> {
        let base = new_key("job");
        if m.idempotency_key.is_empty() {
            m.idempotency_key = format!("{base}:reserve");
        }
        let ttl = m.ttl.as_ref().map_or(self.config.hold_ttl, |d| {
            Duration::new(
                u64::try_from(d.seconds).unwrap_or(0),
                u32::try_from(d.nanos).unwrap_or(0),
            )
        });
        m.ttl = Some(duration_pb(ttl));
        let r = self.reserve_request(m).await?;
        let hold = r.hold.unwrap_or_default();
        let heartbeat = tokio::spawn(heartbeat(
            self.clone(),
            hold.hold_id.clone(),
            base.clone(),
            ttl,
        ));
        Ok(Job {
            client: self.clone(),
            hold,
            base,
            ttl,
            heartbeat: Some(heartbeat),
            settle: Settle::Release(DROPPED.into()),
        })
    }
}

fn duration_pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// `<what>-<uuidv7>`: unique, time-ordered, ≤ 255 characters.
fn new_key(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::now_v7().simple())
}

/// Extends the hold every third of its TTL until the job ends or the hold is gone.
async fn heartbeat(client: Client, hold_id: String, base: String, ttl: Duration) {
    let every = (ttl / 3).max(Duration::from_millis(100));
    let mut beat = 0u64;
    loop {
        tokio::time::sleep(every).await;
        beat += 1;
        match client
            .extend(&hold_id, ttl, &format!("{base}:extend:{beat}"))
            .await
        {
            Ok(_) => tracing::debug!(hold_id, beat, "hold extended"),
            Err(e @ Error::Rejected { .. }) => {
                tracing::warn!(hold_id, error = %e, "hold can no longer be extended");
                return;
            }
            Err(e) => tracing::warn!(hold_id, error = %e, "heartbeat failed; retrying next beat"),
        }
    }
}

/// The reason a dropped job's release records.
const DROPPED: &str = "job dropped without a commit";

/// What a [`Job`] still owes the ledger when it is dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Settle {
    /// Settled, or nothing is left to do.
    Done,
    /// Unsettled: release the whole hold, with this reason (a failed `fail` sends its own again,
    /// so a stored release replays instead of clashing with its key).
    Release(String),
    /// A commit of this amount was sent under this key and may or may not be stored: send it
    /// again with the same key (a stored commit replays; an unstored one is applied; a hold
    /// gone meanwhile refuses it). Never a refund: refunding a hold whose commit was stored
    /// would hand back what the job cost.
    Commit(i64, String),
}

impl Settle {
    /// What is left after a commit of `actual` ended with `e`. Sending the same commit again is
    /// right whenever it could still be stored or applied; a release only when the commit can
    /// never succeed; nothing when the hold has already left `Open` or the caller may not act.
    fn after_failed_commit(e: &Error, actual: i64, key: &str) -> Self {
        match e {
            Error::InsufficientCredits { .. } => Self::Release(DROPPED.into()),
            Error::Rejected { reason, .. } if reason == "INVALID_ARGUMENT" => {
                Self::Release(DROPPED.into())
            }
            // Retries exhausted, INTERNAL, UNKNOWN, a reset stream, rate limited, ...
            e if unknown_or_transient(e) => Self::Commit(actual, key.to_owned()),
            _ => Self::Done,
        }
    }
}

/// A settled job: the server's answer, and what it could not charge.
#[derive(Clone, Debug, PartialEq)]
pub struct Committed {
    /// The commit as the server answered it.
    pub response: pb::CommitResponse,
    /// Credits the job cost beyond what was charged: the hold plus what the account had left
    /// did not cover it. 0 when the whole cost was charged.
    pub shortfall: i64,
}

impl std::ops::Deref for Committed {
    type Target = pb::CommitResponse;

    fn deref(&self) -> &pb::CommitResponse {
        &self.response
    }
}

/// A running job's hold. Settle it with [`Job::commit`] or [`Job::fail`]; dropped unsettled,
/// it is released in the background (and would expire at its TTL if even that failed).
#[derive(Debug)]
pub struct Job {
    client: Client,
    hold: pb::Hold,
    base: String,
    ttl: Duration,
    heartbeat: Option<JoinHandle<()>>,
    settle: Settle,
}

impl Job {
    /// The hold as reserved.
    #[must_use]
    pub fn hold(&self) -> &pb::Hold {
        &self.hold
    }

    /// The hold's id.
    #[must_use]
    pub fn hold_id(&self) -> &str {
        &self.hold.hold_id
    }

    fn stop_heartbeat(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }

    /// The job finished: charge what it cost (the rest is released; more is drawn if
    /// available). A job that cost more than its hold when the account cannot cover the rest
    /// is charged what can be covered — the hold plus what the account has left, else the
    /// hold — and [`Committed::shortfall`] says how much was not charged (the product decides:
    /// bill it, block the user, or let it go). A job is never charged nothing for running over.
    ///
    /// # Errors
    /// [`Error`]. The guard is consumed either way, and never refunds a commit that may be
    /// stored:
    /// - an unknown outcome ([`Error::Exhausted`], INTERNAL, a broken stream) — or this future
    ///   dropped while the call was in flight: the guard keeps sending the same commit (same
    ///   idempotency key) in the background until it is answered or the hold's TTL has passed;
    /// - a commit that can never succeed (an invalid amount): nothing changed, and the hold is
    ///   released in the background, as for a dropped job;
    /// - a hold that already left `Open` (`HOLD_EXPIRED`, `HOLD_ALREADY_COMMITTED`, ...) or a
    ///   refusal of the caller: nothing more is done.
    pub async fn commit(mut self, actual: i64) -> Result<Committed, Error> {
        self.stop_heartbeat();
        let held = self.hold.amount;
        let mut amount = actual;
        let mut key = self.key("commit");
        loop {
            // Set before the call: if this future is dropped mid-call, the commit may be stored.
            self.settle = Settle::Commit(amount, key.clone());
            let r = self.client.commit(&self.hold.hold_id, amount, &key).await;
            match r {
                Ok(response) => {
                    self.settle = Settle::Done;
                    return Ok(Committed {
                        response,
                        shortfall: actual.saturating_sub(amount),
                    });
                }
                // Over the hold, and the account cannot cover the rest: charge what it can (a
                // refused commit stored nothing, so a new amount takes a new key).
                Err(Error::InsufficientCredits { available, .. }) if amount > held => {
                    let covered = held.saturating_add(available.max(0));
                    amount = if covered < amount && covered > held {
                        key = self.key("commit-covered");
                        covered
                    } else {
                        key = self.key("commit-held");
                        held
                    };
                }
                Err(e) => {
                    self.settle = Settle::after_failed_commit(&e, amount, &key);
                    return Err(e);
                }
            }
        }
    }

    /// The job failed: release the whole hold.
    ///
    /// # Errors
    /// [`Error`]; for an unknown outcome (or this future dropped mid-call) the guard sends the
    /// same release again in the background; after a refusal (the hold already left `Open`)
    /// there is nothing left to do.
    pub async fn fail(mut self, reason: &str) -> Result<pb::RefundResponse, Error> {
        self.stop_heartbeat();
        self.settle = Settle::Release(reason.to_owned());
        let r = self
            .client
            .refund(&self.hold.hold_id, None, reason, &self.key("refund"))
            .await;
        if !matches!(&r, Err(Error::Exhausted { .. } | Error::Connect(_))) {
            self.settle = Settle::Done; // answered: released, or refused for good
        }
        r
    }

    fn key(&self, what: &str) -> String {
        format!("{}:{what}", self.base)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.stop_heartbeat();
        if self.settle == Settle::Done {
            return;
        }
        // Dropped unsettled (a panic, an early return, a cancelled task) or with a call whose
        // outcome is unknown. Needs a runtime; without one the hold expires at its TTL.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let action = std::mem::replace(&mut self.settle, Settle::Done);
        let key = match &action {
            Settle::Commit(_, key) => key.clone(),
            _ => self.key("refund"),
        };
        rt.spawn(settle_in_background(
            self.client.clone(),
            std::mem::take(&mut self.hold.hold_id),
            action,
            key,
            self.ttl,
        ));
    }
}

/// An error after which the same call may still be stored, or may succeed later.
fn unknown_or_transient(e: &Error) -> bool {
    match e {
        Error::Exhausted { .. } | Error::Connect(_) => true,
        Error::Rejected { code, .. } => matches!(
            code,
            Code::Internal
                | Code::Unknown
                | Code::DataLoss
                | Code::Unavailable
                | Code::Aborted
                | Code::Cancelled
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
        ),
        Error::InsufficientCredits { .. } => false,
    }
}

/// Sends a dropped job's release, or its unanswered commit, until the server answers, refuses,
/// or the hold's TTL (plus one call deadline) has passed: by then an unsettled hold has expired.
async fn settle_in_background(
    client: Client,
    hold_id: String,
    action: Settle,
    key: String,
    ttl: Duration,
) {
    let give_up = Instant::now() + ttl + client.config.deadline;
    let mut backoff = client.config.initial_backoff;
    loop {
        let r = match &action {
            Settle::Done => return,
            Settle::Release(reason) => client.refund(&hold_id, None, reason, &key).await.map(drop),
            Settle::Commit(amount, _) => client.commit(&hold_id, *amount, &key).await.map(drop),
        };
        match r {
            Ok(()) => {
                tracing::debug!(hold_id, ?action, "dropped job settled");
                return;
            }
            Err(e) if unknown_or_transient(&e) => {
                if Instant::now() >= give_up {
                    tracing::warn!(hold_id, ?action, error = %e, "gave up settling a dropped job; an open hold expires at its TTL");
                    return;
                }
                tracing::debug!(hold_id, ?action, error = %e, "settling a dropped job; retrying");
            }
            Err(e) => {
                tracing::warn!(hold_id, ?action, error = %e, "a dropped job could not be settled; an open hold expires at its TTL");
                return;
            }
        }
        tokio::time::sleep(jitter(backoff)).await;
        backoff = (backoff * 2).min(client.config.max_backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(code: Code, reason: &str) -> Error {
        Error::Rejected {
            code,
            reason: reason.into(),
            message: String::new(),
        }
    }

    /// A commit that may be stored is sent again, never refunded; one that can never succeed
    /// is released; one on a hold that left `Open` is left alone.
    #[test]
    fn a_failed_commit_is_finished_released_or_left_by_what_the_error_says() {
        let exhausted = Error::Exhausted {
            attempts: 6,
            last: Status::unavailable("down"),
            key: Some("k".into()),
        };
        let cases = [
            (exhausted, Settle::Commit(7, "k".into())),
            (
                rejected(Code::Internal, "INTERNAL"),
                Settle::Commit(7, "k".into()),
            ),
            (
                rejected(Code::Internal, "Internal"),
                Settle::Commit(7, "k".into()),
            ), // a reset stream
            (
                rejected(Code::Unknown, "Unknown"),
                Settle::Commit(7, "k".into()),
            ),
            (
                rejected(Code::ResourceExhausted, "RATE_LIMITED"),
                Settle::Commit(7, "k".into()),
            ),
            (
                Error::InsufficientCredits {
                    available: 1,
                    requested: 7,
                },
                Settle::Release(DROPPED.into()),
            ),
            (
                rejected(Code::InvalidArgument, "INVALID_ARGUMENT"),
                Settle::Release(DROPPED.into()),
            ),
            (
                rejected(Code::FailedPrecondition, "HOLD_EXPIRED"),
                Settle::Done,
            ),
            (
                rejected(Code::FailedPrecondition, "HOLD_ALREADY_COMMITTED"),
                Settle::Done,
            ),
            (rejected(Code::NotFound, "HOLD_NOT_FOUND"), Settle::Done),
            (
                rejected(Code::PermissionDenied, "PERMISSION_DENIED"),
                Settle::Done,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(Settle::after_failed_commit(&e, 7, "k"), want, "{e:?}");
        }
        assert!(unknown_or_transient(&rejected(Code::Internal, "INTERNAL")));
        assert!(!unknown_or_transient(&rejected(
            Code::FailedPrecondition,
            "HOLD_EXPIRED"
        )));
    }
}
