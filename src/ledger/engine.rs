//! The transaction scripts: each use case as one run of the backend's primitives — claim the
//! idempotency key, lock the account, load its book, apply time (`settle`), let the domain
//! decide, write, store the outcome, commit — the same on both backends. [`Engine`] runs them;
//! [`super::Ledger`] adds what a request needs around them (keys, limits, retries).

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::domain::book::{Book, Grant, Ids};
use crate::domain::command::{
    Adjust, CommitHold, ExtendHold, GrantCredits, HoldCmd, Idempotency, OpenAccount, Refund,
    Reserve, SetPlan, Target, Transfer,
};
use crate::domain::outcome::{AdjustOutcome, OpenOutcome, Outcome, TransferOutcome};
use crate::domain::payment::{StripeEffect, StripeEvent, StripeRecord};
use crate::domain::plan::Policy;
use crate::domain::rules::EntryKind;
use crate::domain::{
    AccountId, AccountSummary, Balance, CommitOutcome, ExtendOutcome, GrantOutcome, LedgerError,
    PlanOutcome, RefundOutcome, ReserveOutcome,
};
use crate::storage::batch::{Answer, Batcher, GroupStats, JobSteps};
use crate::storage::{Applied, Backend, Claim, RandomIds, StorageError, StorageResult, Tx, replay};

/// Runs every use case on a backend: one attempt each (no retries; [`super::Ledger`] retries
/// on contention). Reads that need no decision go straight to the backend
/// (`engine.list_holds(..)` through `Deref`); those that first apply time do not.
#[derive(Clone)]
pub struct Engine {
    backend: Arc<dyn Backend>,
    /// Group commit for the job path (None: one transaction per command). Dropping the last
    /// engine stops its workers.
    batcher: Option<Arc<Batcher>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("group_commit", &self.batcher.is_some())
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for Engine {
    type Target = dyn Backend;

    fn deref(&self) -> &Self::Target {
        self.backend.as_ref()
    }
}

impl Engine {
    /// An engine over `backend`, starting its group-commit workers if it has them.
    ///
    /// # Errors
    /// `Other` when a group worker's thread or runtime cannot be started.
    pub fn new(backend: Arc<dyn Backend>) -> StorageResult<Self> {
        let batcher = match backend.group_commit() {
            Some((executor, batching)) if batching.max > 1 => {
                Some(Arc::new(Batcher::spawn(&executor, batching, job_steps)?))
            }
            _ => None,
        };
        Ok(Self { backend, batcher })
    }

    /// The plans' allowances and the events' rules.
    pub fn policy(&self) -> &Policy {
        self.backend.policy()
    }

    /// What group commit has done (None when it is off).
    pub fn group_stats(&self) -> Option<GroupStats> {
        self.batcher.as_ref().map(|b| b.stats())
    }

    /// The balance as callers see it now, with its breakdown. If time has done something
    /// (an overdue hold or grant, a new allowance period), it is applied first.
    ///
    /// # Errors
    /// `AccountNotFound`, or what the backend reports.
    pub async fn balance(&self, account_id: &AccountId) -> StorageResult<Balance> {
        let policy = self.policy();
        let mut stored = self.backend.read_balance(account_id.as_str()).await?;
        if stored.due(policy) {
            settle(self.backend.begin().await?, account_id.as_str(), policy).await?;
            stored = self.backend.read_balance(account_id.as_str()).await?;
        }
        let allowance = policy.for_plan(&stored.plan);
        Ok(stored.balance(allowance))
    }

    /// An account's balance, plan and creation time, time applied first.
    ///
    /// # Errors
    /// `AccountNotFound`, or what the backend reports.
    pub async fn account(&self, account_id: &AccountId) -> StorageResult<AccountSummary> {
        let balance = self.balance(account_id).await?;
        let created_at = self.backend.created_at(account_id).await?;
        Ok(AccountSummary {
            balance,
            created_at,
        })
    }

    /// An account's grants that still hold credits, in consumption order, time applied first.
    ///
    /// # Errors
    /// `AccountNotFound`, or what the backend reports.
    pub async fn grants(&self, account_id: &AccountId) -> StorageResult<Vec<Grant>> {
        self.balance(account_id).await?;
        self.backend.grants(account_id).await
    }

    /// Creates a hold drawn from the account's grants in consumption order.
    ///
    /// # Errors
    /// The rules' refusal, or what the backend reports.
    pub async fn reserve(
        &self,
        idem: &Idempotency,
        cmd: &Reserve,
    ) -> StorageResult<Applied<ReserveOutcome>> {
        narrow(self.job(idem, HoldCmd::Reserve(cmd.clone())).await?)
    }

    /// Settles a hold.
    ///
    /// # Errors
    /// The rules' refusal, or what the backend reports.
    pub async fn commit_hold(
        &self,
        idem: &Idempotency,
        cmd: &CommitHold,
    ) -> StorageResult<Applied<CommitOutcome>> {
        narrow(self.job(idem, HoldCmd::Commit(cmd.clone())).await?)
    }

    /// Releases an open hold or returns committed credits.
    ///
    /// # Errors
    /// The rules' refusal, or what the backend reports.
    pub async fn refund(
        &self,
        idem: &Idempotency,
        cmd: &Refund,
    ) -> StorageResult<Applied<RefundOutcome>> {
        narrow(self.job(idem, HoldCmd::Refund(cmd.clone())).await?)
    }

    /// Moves an open hold's expiry.
    ///
    /// # Errors
    /// The rules' refusal, or what the backend reports.
    pub async fn extend_hold(
        &self,
        idem: &Idempotency,
        cmd: &ExtendHold,
    ) -> StorageResult<Applied<ExtendOutcome>> {
        narrow(self.job(idem, HoldCmd::Extend(cmd.clone())).await?)
    }

    /// A job-path command through group commit, or (turned off) in a transaction of its own.
    async fn job(&self, idem: &Idempotency, cmd: HoldCmd) -> StorageResult<Applied<Outcome>> {
        if let Some(b) = &self.batcher {
            return b.submit(idem, cmd).await;
        }
        self.on_book(idem, cmd.target(), |b, now, _| cmd.apply(b, now))
            .await
    }

    /// [`book_op`] in a transaction of its own.
    async fn on_book<T>(
        &self,
        idem: &Idempotency,
        target: Target<'_>,
        op: impl FnOnce(&mut Book, DateTime<Utc>, &mut dyn Ids) -> Result<T, LedgerError> + Send,
    ) -> StorageResult<Applied<T>>
    where
        T: Clone + Into<Outcome> + TryFrom<Outcome> + Send,
    {
        book_op(self.backend.begin().await?, idem, target, self.policy(), op).await
    }

    /// Adds a grant, creating the account.
    ///
    /// # Errors
    /// The rules' refusal, or what the backend reports.
    pub async fn grant(
        &self,
        idem: &Idempotency,
        cmd: &GrantCredits,
    ) -> StorageResult<Applied<GrantOutcome>> {
        let target = Target::Account {
            id: cmd.account_id.as_str(),
            create: true,
        };
        self.on_book(idem, target, |b, now, ids| cmd.apply(b, now, ids))
            .await
    }

    /// An operator's signed correction.
    ///
    /// # Errors
    /// The rules' refusal, or what the backend reports.
    pub async fn adjust(
        &self,
        idem: &Idempotency,
        cmd: &Adjust,
    ) -> StorageResult<Applied<AdjustOutcome>> {
        let target = Target::Account {
            id: cmd.account_id.as_str(),
            create: false,
        };
        self.on_book(idem, target, |b, now, ids| cmd.apply(b, now, ids))
            .await
    }

    /// Moves an account to another plan, once per idempotency key.
    ///
    /// # Errors
    /// The rules' refusal, or what the backend reports.
    pub async fn set_plan(
        &self,
        idem: &Idempotency,
        cmd: &SetPlan,
    ) -> StorageResult<Applied<PlanOutcome>> {
        let policy = self.policy();
        let target = Target::PlanSwitch(cmd.account_id.as_str());
        self.on_book(idem, target, |b, now, ids| {
            cmd.apply(b, policy.for_plan(&cmd.plan), now, ids)
        })
        .await
    }

    /// Creates an account with its sign-up bonus.
    ///
    /// # Errors
    /// `AccountExists`, or what the backend reports.
    pub async fn open_account(
        &self,
        idem: &Idempotency,
        cmd: &OpenAccount,
    ) -> StorageResult<Applied<OpenOutcome>> {
        open_account(self.backend.begin().await?, idem, cmd, self.policy()).await
    }

    /// Moves credits between two accounts.
    ///
    /// # Errors
    /// The rules' refusal, or what the backend reports.
    pub async fn transfer(
        &self,
        idem: &Idempotency,
        cmd: &Transfer,
    ) -> StorageResult<Applied<TransferOutcome>> {
        transfer(self.backend.begin().await?, idem, cmd, self.policy()).await
    }

    /// Records a verified Stripe event and applies its effect, in one transaction: a known
    /// event id, or a business fact already granted, changes nothing.
    ///
    /// # Errors
    /// What the backend reports.
    pub async fn record_stripe_event(
        &self,
        event: &StripeEvent,
        effect: &StripeEffect,
    ) -> StorageResult<StripeRecord> {
        super::stripe::record(self.backend.begin().await?, event, effect, self.policy()).await
    }

    /// Applies time to up to `limit` accounts with overdue holds or grants, one short
    /// transaction each (the same settle every operation does first); safe to run on many
    /// replicas at once. Returns the number of expiry entries written.
    ///
    /// # Errors
    /// An unavailable database, contention or a commit in doubt ends the pass ([`sweep_failed`]).
    pub async fn expire_due(&self, limit: u32) -> StorageResult<u64> {
        let mut total = 0u64;
        for account in self.backend.due_accounts(limit).await? {
            let settled = match self.backend.begin().await {
                Ok(tx) => settle(tx, &account, self.policy()).await,
                Err(e) => Err(e),
            };
            match settled {
                Ok(n) => total = total.saturating_add(n),
                Err(e) => sweep_failed(&account, e)?,
            }
        }
        Ok(total)
    }
}

/// What the sweeper does when settling one account fails: a database that is unavailable
/// (or a commit in doubt, or contention) ends the pass, to be tried again on the next tick;
/// anything else is that account's own problem: it is logged with the account and counted
/// (`tally_sweeper_account_failures_total`), and the pass goes on with the other accounts.
fn sweep_failed(account: &str, e: StorageError) -> StorageResult<()> {
    match e {
        StorageError::Unavailable(_) | StorageError::InDoubt(_) | StorageError::Contended => Err(e),
        e => {
            metrics::counter!("tally_sweeper_account_failures_total").increment(1);
            tracing::warn!(account_id = account, error.message = %e, "sweeper could not settle an account; the others go on");
            Ok(())
        }
    }
}

/// One idempotent operation on one account's book, in one transaction.
async fn book_op<T>(
    mut tx: Box<dyn Tx + '_>,
    idem: &Idempotency,
    target: Target<'_>,
    policy: &Policy,
    op: impl FnOnce(&mut Book, DateTime<Utc>, &mut dyn Ids) -> Result<T, LedgerError> + Send,
) -> StorageResult<Applied<T>>
where
    T: Clone + Into<Outcome> + TryFrom<Outcome> + Send,
{
    let applied = book_steps(tx.as_mut(), idem, target, policy, op).await?;
    if !applied.replayed {
        tx.commit().await?;
    }
    Ok(applied)
}

/// What an operation loads besides the account's live grants and due holds.
#[derive(Clone, Copy, Default)]
pub(super) struct Load<'a> {
    /// Create the account (on this plan) if it does not exist.
    pub create: Option<&'a str>,
    /// The hold operated on.
    pub hold: Option<&'a str>,
    /// The grants of the allowance periods current now (a plan switch must see them).
    pub periods: bool,
}

/// Locks an account's row, loads its book and applies time to it: the first steps of every
/// write. `None` when the account does not exist (and `load.create` is not set).
pub(super) async fn open_book(
    tx: &mut dyn Tx,
    account: &str,
    load: Load<'_>,
    policy: &Policy,
    now: DateTime<Utc>,
) -> StorageResult<Option<Book>> {
    let Some((mut book, _)) = tx.lock_book(account, load.create, now).await? else {
        return Ok(None);
    };
    fill_book(tx, &mut book, load, policy, now).await?;
    Ok(Some(book))
}

/// [`open_book`] of a book already locked: its rows loaded, time applied.
pub(super) async fn fill_book(
    tx: &mut dyn Tx,
    book: &mut Book,
    load: Load<'_>,
    policy: &Policy,
    now: DateTime<Utc>,
) -> StorageResult<()> {
    tx.load(book, load.hold, now).await?;
    if load.periods {
        tx.load_periods(book, &crate::domain::plan::period_keys_at(now))
            .await?;
    }
    book.settle(now, policy.for_plan(&book.plan), &mut RandomIds)?;
    Ok(())
}

/// The steps of [`book_op`] inside a transaction the caller ends.
pub(super) async fn book_steps<T>(
    tx: &mut dyn Tx,
    idem: &Idempotency,
    target: Target<'_>,
    policy: &Policy,
    op: impl FnOnce(&mut Book, DateTime<Utc>, &mut dyn Ids) -> Result<T, LedgerError> + Send,
) -> StorageResult<Applied<T>>
where
    T: Clone + Into<Outcome> + TryFrom<Outcome> + Send,
{
    let now = tx.now().await?;
    if let Claim::Existing {
        fingerprint,
        response,
    } = tx.claim(idem, now).await?
    {
        return replay(idem, &fingerprint, response.as_deref());
    }
    let (account, hold, create) = match target {
        Target::Account { id, create } => (id.to_owned(), None, create),
        Target::PlanSwitch(id) => (id.to_owned(), None, false),
        Target::Hold(h) => (
            tx.hold_account(h).await?.ok_or(LedgerError::HoldNotFound)?,
            Some(h),
            false,
        ),
    };
    let load = Load {
        create: create.then_some(crate::domain::DEFAULT_PLAN),
        hold,
        periods: matches!(target, Target::PlanSwitch(_)),
    };
    let mut book = open_book(tx, &account, load, policy, now)
        .await?
        .ok_or(LedgerError::AccountNotFound)?;
    let out = op(&mut book, now, &mut RandomIds)?;
    tx.write(&book, now).await?;
    tx.store_outcome(idem, &out.clone().into()).await?;
    Ok(Applied::fresh(out))
}

/// [`book_steps`] for a job-path command: what group commit runs in the transactions it
/// opens ([`JobSteps`]).
fn job_steps<'a>(
    tx: &'a mut (dyn Tx + 'a),
    idem: &'a Idempotency,
    cmd: &'a HoldCmd,
    policy: &'a Policy,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send + 'a>> {
    Box::pin(book_steps(
        tx,
        idem,
        cmd.target(),
        policy,
        move |b, now, _| cmd.apply(b, now),
    ))
}

const _: JobSteps = job_steps;

/// An outcome as the operation's own type; another operation's outcome means the key was
/// used for a different request.
fn narrow<T: TryFrom<Outcome>>(a: Applied<Outcome>) -> StorageResult<Applied<T>> {
    let replayed = a.replayed;
    T::try_from(a.outcome)
        .map(|outcome| Applied { outcome, replayed })
        .map_err(|_| LedgerError::IdempotencyKeyReused.into())
}

/// Creates an account with its sign-up bonus, once.
async fn open_account(
    mut tx: Box<dyn Tx>,
    idem: &Idempotency,
    cmd: &OpenAccount,
    policy: &Policy,
) -> StorageResult<Applied<OpenOutcome>> {
    let now = tx.now().await?;
    if let Claim::Existing {
        fingerprint,
        response,
    } = tx.claim(idem, now).await?
    {
        return replay(idem, &fingerprint, response.as_deref());
    }
    let (mut book, created) = tx
        .lock_book(cmd.account_id.as_str(), Some(&cmd.plan), now)
        .await?
        .ok_or(LedgerError::AccountNotFound)?;
    if !created {
        return Err(LedgerError::AccountExists.into());
    }
    book.settle(now, policy.for_plan(&book.plan), &mut RandomIds)?;
    let out = cmd.apply(&mut book, now, &mut RandomIds)?;
    tx.write(&book, now).await?;
    tx.store_outcome(idem, &out.clone().into()).await?;
    tx.commit().await?;
    Ok(Applied::fresh(out))
}

/// Moves credits between two accounts: both rows locked in id order, so concurrent transfers
/// cannot deadlock; the credits keep their source and expiry.
async fn transfer(
    mut tx: Box<dyn Tx>,
    idem: &Idempotency,
    cmd: &Transfer,
    policy: &Policy,
) -> StorageResult<Applied<TransferOutcome>> {
    let now = tx.now().await?;
    if let Claim::Existing {
        fingerprint,
        response,
    } = tx.claim(idem, now).await?
    {
        return replay(idem, &fingerprint, response.as_deref());
    }
    let (from_id, to_id) = (cmd.from.as_str(), cmd.to.as_str());
    let mut books = Vec::with_capacity(2);
    let mut order = [(from_id, false), (to_id, true)];
    order.sort_by_key(|(id, _)| *id);
    for (id, create) in order {
        let load = Load {
            create: create.then_some(crate::domain::DEFAULT_PLAN),
            ..Load::default()
        };
        let book = open_book(tx.as_mut(), id, load, policy, now)
            .await?
            .ok_or(LedgerError::AccountNotFound)?;
        books.push(book);
    }
    let (mut from, mut to) = match (books.pop(), books.pop()) {
        (Some(b), Some(a)) if a.account_id == from_id => (a, b),
        (Some(b), Some(a)) => (b, a),
        _ => return Err(StorageError::Other("transfer lost a book".into())),
    };
    let pieces = from.take(cmd.amount.get(), EntryKind::TransferOut, &cmd.reason, now)?;
    to.give(
        &pieces,
        EntryKind::TransferIn,
        &cmd.reason,
        now,
        &mut RandomIds,
    )?;
    let out = TransferOutcome {
        from: (from.account_id.clone(), from.net_available()),
        to: (to.account_id.clone(), to.net_available()),
        amount: cmd.amount.get(),
    };
    tx.write(&from, now).await?;
    tx.write(&to, now).await?;
    tx.store_outcome(idem, &out.clone().into()).await?;
    tx.commit().await?;
    Ok(Applied::fresh(out))
}

/// Applies time to one account (overdue holds and grants, a new allowance period) without an
/// idempotency key: what reads and the sweeper do. Returns the expiry entries written.
pub(super) async fn settle(
    mut tx: Box<dyn Tx>,
    account_id: &str,
    policy: &Policy,
) -> StorageResult<u64> {
    let now = tx.now().await?;
    let Some(book) = open_book(tx.as_mut(), account_id, Load::default(), policy, now).await? else {
        return Ok(0);
    };
    let expiries = book
        .entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Expire | EntryKind::Expiration))
        .count();
    tx.write(&book, now).await?;
    tx.commit().await?;
    Ok(u64::try_from(expiries).unwrap_or(u64::MAX))
}
