//! The reference ledger: whole [`Book`]s in memory, with idempotency, exactly as the storage
//! backends apply them (settle, then the operation, atomically).
//!
//! It is the oracle of the storage conformance suite (random command sequences run on a
//! backend and on this model must agree) and the subject of the property tests below. It is
//! not used to serve requests.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use super::book::{Book, Ids, Source};
use super::command::{
    Adjust, CommitHold, ExtendHold, GrantCredits, Idempotency, OpenAccount, Refund, Reserve,
    SetPlan, Transfer,
};
use super::error::LedgerError;
use super::hold::Hold;
use super::outcome::{
    AdjustOutcome, Balance, CommitOutcome, ExtendOutcome, GrantOutcome, OpenOutcome, Outcome,
    PlanOutcome, RefundOutcome, ReserveOutcome, TransferOutcome,
};
use super::payment::{
    Charge, Decision, Dispute, Fact, Payment, Purchase, PurchaseState, Subscription,
};
use super::plan::Allowance;
use super::rules::EntryKind;

/// One ledger line with its sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Sequence number.
    pub entry_id: i64,
    /// The account changed.
    pub account_id: String,
    /// What happened.
    pub kind: EntryKind,
    /// Change to available.
    pub available_delta: i64,
    /// Change to held.
    pub held_delta: i64,
    /// Change to debt.
    pub debt_delta: i64,
}

struct Counter<'a>(&'a mut u64);

impl Ids for Counter<'_> {
    fn grant_id(&mut self) -> String {
        *self.0 = self.0.saturating_add(1);
        format!("grt_{:032x}", *self.0)
    }
}

/// The whole reference state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    books: BTreeMap<String, Book>,
    hold_account: BTreeMap<String, String>,
    keys: HashMap<(String, String), ([u8; 32], Outcome)>,
    entries: Vec<Entry>,
    /// The allowance every account's plan grants (one plan is enough for the model).
    allowance: Option<Allowance>,
    next_id: u64,
}

type Res<T> = Result<T, LedgerError>;

impl Ledger {
    /// An empty ledger whose accounts get `allowance` each period.
    #[must_use]
    pub fn new(allowance: Option<Allowance>) -> Self {
        Self {
            allowance,
            ..Self::default()
        }
    }

    /// An account's book.
    #[must_use]
    pub fn book(&self, account_id: &str) -> Option<&Book> {
        self.books.get(account_id)
    }

    /// A hold as stored.
    #[must_use]
    pub fn hold(&self, hold_id: &str) -> Option<&Hold> {
        self.hold_account
            .get(hold_id)
            .and_then(|a| self.books.get(a))
            .and_then(|b| b.holds.get(hold_id))
    }

    /// Every entry, oldest first.
    #[must_use]
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// A grant id the next grant will not collide with (for tests that build grants).
    pub fn next_grant_id(&mut self) -> String {
        Counter(&mut self.next_id).grant_id()
    }

    /// The balance a caller sees at `now` (time applied first, as CheckBalance does).
    ///
    /// # Errors
    /// `AccountNotFound`.
    pub fn balance(&self, account_id: &str, now: DateTime<Utc>) -> Res<Balance> {
        let mut book = self
            .books
            .get(account_id)
            .cloned()
            .ok_or(LedgerError::AccountNotFound)?;
        let mut n = self.next_id;
        book.settle(now, self.allowance.as_ref(), &mut Counter(&mut n))?;
        let open = book
            .holds
            .values()
            .filter(|h| h.state == super::hold::HoldState::Open)
            .count();
        let stored = super::book::StoredBalance {
            account_id: account_id.to_owned(),
            available: book.net_available(),
            held: book.held,
            debt: book.debt,
            open_holds: i64::try_from(open).unwrap_or(i64::MAX),
            allowance_period: book.allowance_period.clone(),
            grants: book.grants.into_values().collect(),
            plan: book.plan,
            overdue: false,
            now,
            version: 0,
        };
        Ok(stored.balance(self.allowance.as_ref()))
    }

    /// Runs `op` atomically under an idempotency key: a stored outcome is replayed, a key
    /// reused for another request is refused, and a refused command leaves no trace.
    fn idempotent<T>(&mut self, idem: &Idempotency, op: impl FnOnce(&mut Self) -> Res<T>) -> Res<T>
    where
        T: Clone + Into<Outcome> + TryFrom<Outcome>,
    {
        let slot = (
            idem.caller.as_str().to_owned(),
            idem.key.as_str().to_owned(),
        );
        if let Some((fp, stored)) = self.keys.get(&slot) {
            if *fp != idem.fingerprint {
                return Err(LedgerError::IdempotencyKeyReused);
            }
            return T::try_from(stored.clone()).map_err(|_| LedgerError::IdempotencyKeyReused);
        }
        let mut next = self.clone();
        let out = op(&mut next)?;
        next.keys
            .insert(slot, (idem.fingerprint, out.clone().into()));
        *self = next;
        Ok(out)
    }

    /// Settles `account`'s book at `now`, runs `op` on it, and files its entries.
    fn with_book<T>(
        &mut self,
        account: &str,
        now: DateTime<Utc>,
        create: bool,
        op: impl FnOnce(&mut Book, &mut dyn Ids) -> Res<T>,
    ) -> Res<T> {
        if create && !self.books.contains_key(account) {
            self.books
                .insert(account.to_owned(), Book::new(account, "free"));
        }
        let mut book = self
            .books
            .remove(account)
            .ok_or(LedgerError::AccountNotFound)?;
        let mut ids = Counter(&mut self.next_id);
        book.settle(now, self.allowance.as_ref(), &mut ids)?;
        let out = op(&mut book, &mut ids)?;
        self.file(&mut book);
        self.books.insert(account.to_owned(), book);
        Ok(out)
    }

    fn file(&mut self, book: &mut Book) {
        for e in book.entries.drain(..) {
            let entry_id = i64::try_from(self.entries.len())
                .unwrap_or(i64::MAX)
                .saturating_add(1);
            self.entries.push(Entry {
                entry_id,
                account_id: book.account_id.clone(),
                kind: e.kind,
                available_delta: e.available_delta,
                held_delta: e.held_delta,
                debt_delta: e.debt_delta,
            });
        }
        for h in &book.dirty.new_holds {
            self.hold_account.insert(h.clone(), book.account_id.clone());
        }
        book.dirty = super::book::Dirty::default();
    }

    fn account_of(&self, hold_id: &str) -> Res<String> {
        self.hold_account
            .get(hold_id)
            .cloned()
            .ok_or(LedgerError::HoldNotFound)
    }

    /// Applies time to one account (what every operation does first).
    pub fn settle(&mut self, account: &str, now: DateTime<Utc>) {
        let _ = self.with_book(account, now, false, |_, _| Ok(()));
    }

    /// Applies time to every account (what the sweeper does).
    pub fn expire_due(&mut self, now: DateTime<Utc>) {
        let accounts: Vec<String> = self.books.keys().cloned().collect();
        for a in accounts {
            let _ = self.with_book(&a, now, false, |_, _| Ok(()));
        }
    }

    /// Adds a grant, creating the account.
    ///
    /// # Errors
    /// `IdempotencyKeyReused`, `BalanceLimitExceeded`.
    pub fn grant(
        &mut self,
        idem: &Idempotency,
        cmd: &GrantCredits,
        now: DateTime<Utc>,
    ) -> Res<GrantOutcome> {
        self.idempotent(idem, |l| {
            l.with_book(cmd.account_id.as_str(), now, true, |b, ids| {
                cmd.apply(b, now, ids)
            })
        })
    }

    /// Opens an account with its bonus.
    ///
    /// # Errors
    /// `IdempotencyKeyReused`, `AccountExists`.
    pub fn open_account(
        &mut self,
        idem: &Idempotency,
        cmd: &OpenAccount,
        now: DateTime<Utc>,
    ) -> Res<OpenOutcome> {
        self.idempotent(idem, |l| {
            let id = cmd.account_id.as_str();
            if l.books.contains_key(id) {
                return Err(LedgerError::AccountExists);
            }
            l.books.insert(id.to_owned(), Book::new(id, &cmd.plan));
            l.with_book(id, now, false, |b, ids| cmd.apply(b, now, ids))
        })
    }

    /// Creates a hold.
    ///
    /// # Errors
    /// `IdempotencyKeyReused`, `AccountNotFound`, `InsufficientCredits`.
    pub fn reserve(
        &mut self,
        idem: &Idempotency,
        cmd: &Reserve,
        now: DateTime<Utc>,
    ) -> Res<ReserveOutcome> {
        self.idempotent(idem, |l| {
            l.with_book(cmd.account_id.as_str(), now, false, |b, _| {
                b.reserve(cmd.hold_id.as_str(), cmd.amount, cmd.ttl, cmd.labels(), now)
            })
        })
    }

    /// Settles a hold.
    ///
    /// # Errors
    /// `IdempotencyKeyReused`, `HoldNotFound`, the not-open refusals, `InsufficientCredits`.
    pub fn commit_hold(
        &mut self,
        idem: &Idempotency,
        cmd: &CommitHold,
        now: DateTime<Utc>,
    ) -> Res<CommitOutcome> {
        self.idempotent(idem, |l| {
            let account = l.account_of(cmd.hold_id.as_str())?;
            l.with_book(&account, now, false, |b, _| {
                b.commit_hold(cmd.hold_id.as_str(), cmd.amount, now)
            })
        })
    }

    /// Releases an open hold or returns committed credits.
    ///
    /// # Errors
    /// `IdempotencyKeyReused`, `HoldNotFound`, the refusals of the refund rules.
    pub fn refund(
        &mut self,
        idem: &Idempotency,
        cmd: &Refund,
        now: DateTime<Utc>,
    ) -> Res<RefundOutcome> {
        self.idempotent(idem, |l| {
            let account = l.account_of(cmd.hold_id.as_str())?;
            l.with_book(&account, now, false, |b, _| {
                b.refund(cmd.hold_id.as_str(), cmd.amount, &cmd.reason, now)
            })
        })
    }

    /// Moves an open hold's expiry.
    ///
    /// # Errors
    /// `IdempotencyKeyReused`, `HoldNotFound`, the not-open refusals.
    pub fn extend_hold(
        &mut self,
        idem: &Idempotency,
        cmd: &ExtendHold,
        now: DateTime<Utc>,
    ) -> Res<ExtendOutcome> {
        self.idempotent(idem, |l| {
            let account = l.account_of(cmd.hold_id.as_str())?;
            l.with_book(&account, now, false, |b, _| {
                b.extend_hold(cmd.hold_id.as_str(), cmd.ttl, now)
            })
        })
    }

    /// A signed correction.
    ///
    /// # Errors
    /// `IdempotencyKeyReused`, `AccountNotFound`, `InsufficientCredits`, `BalanceLimitExceeded`.
    pub fn adjust(
        &mut self,
        idem: &Idempotency,
        cmd: &Adjust,
        now: DateTime<Utc>,
    ) -> Res<AdjustOutcome> {
        self.idempotent(idem, |l| {
            l.with_book(cmd.account_id.as_str(), now, false, |b, ids| {
                cmd.apply(b, now, ids)
            })
        })
    }

    /// Moves an account to another plan (every plan of the model grants its one allowance).
    ///
    /// # Errors
    /// `IdempotencyKeyReused`, `AccountNotFound`.
    pub fn set_plan(
        &mut self,
        idem: &Idempotency,
        cmd: &SetPlan,
        now: DateTime<Utc>,
    ) -> Res<PlanOutcome> {
        let allowance = self.allowance.clone();
        self.idempotent(idem, |l| {
            l.with_book(cmd.account_id.as_str(), now, false, |b, ids| {
                cmd.apply(b, allowance.as_ref(), now, ids)
            })
        })
    }

    /// Moves credits between accounts.
    ///
    /// # Errors
    /// `IdempotencyKeyReused`, `AccountNotFound` (the debited account), `InsufficientCredits`,
    /// `BalanceLimitExceeded`.
    pub fn transfer(
        &mut self,
        idem: &Idempotency,
        cmd: &Transfer,
        now: DateTime<Utc>,
    ) -> Res<TransferOutcome> {
        self.idempotent(idem, |l| {
            let pieces = l.with_book(cmd.from.as_str(), now, false, |b, _| {
                b.take(cmd.amount.get(), EntryKind::TransferOut, &cmd.reason, now)
            })?;
            let to_available = l.with_book(cmd.to.as_str(), now, true, |b, ids| {
                b.give(&pieces, EntryKind::TransferIn, &cmd.reason, now, ids)?;
                Ok(b.net_available())
            })?;
            let from_available = l
                .books
                .get(cmd.from.as_str())
                .map_or(0, Book::net_available);
            Ok(TransferOutcome {
                from: (cmd.from.as_str().to_owned(), from_available),
                to: (cmd.to.as_str().to_owned(), to_available),
                amount: cmd.amount.get(),
            })
        })
    }

    /// Takes credits back from an account (a refunded or disputed payment); what its grants
    /// cannot cover becomes debt.
    ///
    /// # Errors
    /// `AccountNotFound`.
    pub fn claw_back(&mut self, account: &str, amount: i64, now: DateTime<Utc>) -> Res<i64> {
        self.with_book(account, now, false, |b, _| {
            Ok(b.claw_back(amount, "clawback", now))
        })
    }

    /// Books what a Stripe fact decided (see [`Stripe`]): a grant of `grant` credits (creating
    /// the account), then `claw` credits taken back (positive) or given back (negative).
    ///
    /// # Errors
    /// `AccountNotFound` (a claw-back without a grant), `BalanceLimitExceeded`.
    pub fn book_fact(
        &mut self,
        account: &str,
        grant: Option<(i64, Source)>,
        claw: i64,
        now: DateTime<Utc>,
    ) -> Res<()> {
        self.with_book(account, now, grant.is_some(), |b, ids| {
            let booked = match grant {
                Some((amount, source)) => Some((
                    source,
                    super::Credits::new("credits", amount).map_err(|_| {
                        LedgerError::BalanceLimitExceeded {
                            limit: super::MAX_BALANCE,
                        }
                    })?,
                    None,
                )),
                None => None,
            };
            b.book_decision(booked, claw, "stripe", now, ids)?;
            Ok(())
        })
    }

    /// Checks every book, and that entries explain every balance.
    ///
    /// # Errors
    /// A description of the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (id, book) in &self.books {
            book.check()?;
            let (avail, held, debt) = self.entries.iter().filter(|e| &e.account_id == id).fold(
                (0i64, 0i64, 0i64),
                |(a, h, d), e| {
                    (
                        a.saturating_add(e.available_delta),
                        h.saturating_add(e.held_delta),
                        d.saturating_add(e.debt_delta),
                    )
                },
            );
            if debt != book.debt {
                return Err(format!(
                    "{id}: entries say debt {debt}, column {}",
                    book.debt
                ));
            }
            if (avail, held) != (book.available, book.held) {
                return Err(format!(
                    "{id}: entries say ({avail}, {held}), columns ({}, {})",
                    book.available, book.held
                ));
            }
            if book.available < 0 || book.held < 0 {
                return Err(format!("{id}: negative balance"));
            }
        }
        Ok(())
    }
}

/// The Stripe facts as the reference model keeps them: each fact in a map of its own, loaded
/// for an event the way storage loads them (by business key, PaymentIntent, charge, dispute),
/// decided by the same [`Payment::apply`] and booked on a [`Ledger`].
#[derive(Clone, Debug, Default)]
pub struct Stripe {
    events: std::collections::BTreeSet<String>,
    purchases: BTreeMap<String, Purchase>,
    charges: BTreeMap<String, Charge>,
    disputes: BTreeMap<String, Dispute>,
    subscriptions: BTreeMap<String, Subscription>,
    invoices: std::collections::BTreeSet<String>,
}

impl Stripe {
    /// A subscription state (its account created if new): stored if at least as new as the
    /// stored one, then the account is put on its newest live subscription's plan.
    ///
    /// # Errors
    /// What [`Ledger::book_fact`] refuses.
    pub fn record_subscription(
        &mut self,
        ledger: &mut Ledger,
        event_id: &str,
        incoming: Subscription,
        now: DateTime<Utc>,
    ) -> Res<()> {
        if !self.events.insert(event_id.to_owned()) {
            return Ok(());
        }
        ledger.with_book(&incoming.account_id, now, true, |_, _| Ok(()))?;
        let mut stored = self.subscriptions.get(&incoming.subscription_id).cloned();
        if Subscription::accept(&mut stored, incoming)
            && let Some(s) = stored
        {
            let account = s.account_id.clone();
            self.subscriptions.insert(s.subscription_id.clone(), s);
            self.replan(ledger, &account, now)?;
        }
        Ok(())
    }

    /// A failed renewal of a known subscription, if newer than its state.
    ///
    /// # Errors
    /// What [`Ledger::book_fact`] refuses.
    pub fn record_payment_failed(
        &mut self,
        ledger: &mut Ledger,
        event_id: &str,
        subscription_id: &str,
        as_of: i64,
        now: DateTime<Utc>,
    ) -> Res<()> {
        if !self.events.insert(event_id.to_owned()) {
            return Ok(());
        }
        if let Some(s) = self.subscriptions.get_mut(subscription_id)
            && s.payment_failed(as_of)
        {
            let account = s.account_id.clone();
            self.replan(ledger, &account, now)?;
        }
        Ok(())
    }

    /// A paid subscription invoice: its credits once per business key.
    ///
    /// # Errors
    /// What [`Ledger::book_fact`] refuses.
    pub fn record_invoice(
        &mut self,
        ledger: &mut Ledger,
        event_id: &str,
        business_key: &str,
        account: &str,
        credits: i64,
        now: DateTime<Utc>,
    ) -> Res<()> {
        if !self.events.insert(event_id.to_owned()) || self.invoices.contains(business_key) {
            return Ok(());
        }
        ledger.book_fact(account, Some((credits, Source::Subscription)), 0, now)?;
        self.invoices.insert(business_key.to_owned());
        Ok(())
    }

    /// The subscription with this id, as stored.
    #[must_use]
    pub fn subscription(&self, subscription_id: &str) -> Option<&Subscription> {
        self.subscriptions.get(subscription_id)
    }

    fn replan(&self, ledger: &mut Ledger, account: &str, now: DateTime<Utc>) -> Res<()> {
        let subs: Vec<Subscription> = self
            .subscriptions
            .values()
            .filter(|s| s.account_id == account)
            .cloned()
            .collect();
        let plan = Subscription::plan_of(&subs, super::DEFAULT_PLAN);
        ledger.with_book(account, now, false, |b, _| {
            if b.plan != plan {
                b.plan = plan;
            }
            Ok(())
        })
    }

    /// Records one event's fact (a known event id changes nothing) and books its decision.
    ///
    /// # Errors
    /// What [`Ledger::book_fact`] refuses.
    pub fn record(
        &mut self,
        ledger: &mut Ledger,
        event_id: &str,
        business_key: Option<&str>,
        fact: &Fact,
        now: DateTime<Utc>,
    ) -> Res<Decision> {
        if !self.events.insert(event_id.to_owned()) {
            return Ok(Decision::default());
        }
        let mut payment = self.load(business_key, fact);
        let decision = payment.apply(business_key, fact.clone());
        if decision.moves()
            && let Some(account) = payment.purchase.as_ref().and_then(|p| p.account_id.clone())
        {
            let grant = decision.grant.as_ref().map(|(_, n)| (*n, Source::Purchase));
            if let Err(e) = ledger.book_fact(&account, grant, decision.claw, now) {
                self.events.remove(event_id);
                return Err(e);
            }
        }
        if let Some(p) = payment.purchase {
            self.purchases.insert(p.business_key.clone(), p);
        }
        for c in payment.charges {
            self.charges.insert(c.charge_id.clone(), c);
        }
        for d in payment.disputes {
            self.disputes.insert(d.dispute_id.clone(), d);
        }
        Ok(decision)
    }

    fn load(&self, business_key: Option<&str>, fact: &Fact) -> Payment {
        let (pi, charge, dispute) = fact.names();
        let (mut pi, charge, dispute) = (
            pi.map(str::to_owned),
            charge.map(str::to_owned),
            dispute.map(str::to_owned),
        );
        let purchase = business_key.and_then(|k| self.purchases.get(k).cloned());
        if pi.is_none() {
            pi = purchase.as_ref().and_then(|p| p.payment_intent.clone());
        }
        if pi.is_none() {
            pi = charge
                .as_ref()
                .and_then(|c| self.charges.get(c))
                .and_then(|c| c.payment_intent.clone());
        }
        let purchase = purchase.or_else(|| {
            let pi = pi.as_deref()?;
            let mut found: Vec<&Purchase> = self
                .purchases
                .values()
                .filter(|p| p.payment_intent.as_deref() == Some(pi))
                .collect();
            found.sort_by_key(|p| p.state != PurchaseState::Granted);
            found.first().map(|p| (*p).clone())
        });
        let of_pi: Vec<String> = self
            .charges
            .values()
            .filter(|c| pi.is_some() && c.payment_intent == pi)
            .map(|c| c.charge_id.clone())
            .collect();
        let charges = self
            .charges
            .values()
            .filter(|c| {
                (pi.is_some() && c.payment_intent == pi) || Some(&c.charge_id) == charge.as_ref()
            })
            .cloned()
            .collect();
        let disputes = self
            .disputes
            .values()
            .filter(|d| {
                (pi.is_some() && d.payment_intent == pi)
                    || Some(&d.charge_id) == charge.as_ref()
                    || Some(&d.dispute_id) == dispute.as_ref()
                    || of_pi.contains(&d.charge_id)
            })
            .cloned()
            .collect();
        Payment {
            purchase,
            charges,
            disputes,
        }
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)] // test arithmetic on small numbers
mod tests {
    use chrono::TimeDelta;
    use proptest::prelude::*;

    use super::*;
    use crate::domain::book::consumption_order;
    use crate::domain::hold::HoldState;
    use crate::domain::plan::{Period, Rollover};
    use crate::domain::{AccountId, Caller, Credits, HoldId, IdempotencyKey, Metadata};

    #[derive(Clone, Debug)]
    enum Op {
        ClawBack {
            account: u8,
            amount: i64,
        },
        Grant {
            account: u8,
            amount: i64,
            expires_in: Option<i64>,
            priority: i32,
        },
        Reserve {
            account: u8,
            amount: i64,
            ttl_secs: i64,
        },
        Commit {
            hold: usize,
            amount: i64,
        },
        Refund {
            hold: usize,
            amount: Option<i64>,
        },
        Extend {
            hold: usize,
            ttl_secs: i64,
        },
        Adjust {
            account: u8,
            delta: i64,
        },
        Transfer {
            from: u8,
            to: u8,
            amount: i64,
        },
        Advance {
            secs: i64,
        },
        Sweep,
        Retry {
            back: usize,
        },
        ReuseKeyWithOtherRequest {
            back: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..3, 1i64..200, proptest::option::of(1i64..200), 0i32..3).prop_map(|(account, amount, expires_in, priority)| Op::Grant { account, amount, expires_in, priority: priority * 25 }),
            4 => (0u8..3, 1i64..120, 1i64..120).prop_map(|(account, amount, ttl_secs)| Op::Reserve { account, amount, ttl_secs }),
            3 => (any::<usize>(), 1i64..150).prop_map(|(hold, amount)| Op::Commit { hold, amount }),
            2 => (any::<usize>(), proptest::option::of(1i64..60)).prop_map(|(hold, amount)| Op::Refund { hold, amount }),
            1 => (any::<usize>(), 1i64..120).prop_map(|(hold, ttl_secs)| Op::Extend { hold, ttl_secs }),
            1 => (0u8..3, -80i64..80).prop_filter("non-zero", |(_, d)| *d != 0).prop_map(|(account, delta)| Op::Adjust { account, delta }),
            1 => (0u8..3, 0u8..3, 1i64..80).prop_filter("two accounts", |(f, t, _)| f != t).prop_map(|(from, to, amount)| Op::Transfer { from, to, amount }),
            2 => (1i64..40_000).prop_map(|secs| Op::Advance { secs }),
            1 => Just(Op::Sweep),
            1 => (0u8..3, 1i64..150).prop_map(|(account, amount)| Op::ClawBack { account, amount }),
            2 => any::<usize>().prop_map(|back| Op::Retry { back }),
            1 => any::<usize>().prop_map(|back| Op::ReuseKeyWithOtherRequest { back }),
        ]
    }

    /// A mutating command as sent, so it can be retried.
    #[derive(Clone, Debug)]
    enum Sent {
        Grant(GrantCredits),
        Reserve(Reserve),
        Commit(CommitHold),
        Refund(Refund),
        Extend(ExtendHold),
        Adjust(Adjust),
        Transfer(Transfer),
    }

    #[derive(Debug, PartialEq)]
    enum Answer {
        Ok(Outcome),
        Err(LedgerError),
    }

    fn idem(key: &str, fingerprint: [u8; 32]) -> Idempotency {
        Idempotency {
            caller: Caller::anonymous(),
            key: IdempotencyKey::parse("k", key).unwrap(),
            fingerprint,
            legacy: None,
        }
    }

    fn send(l: &mut Ledger, key: &str, cmd: &Sent, now: DateTime<Utc>) -> Answer {
        let r: Res<Outcome> = match cmd {
            Sent::Grant(c) => l.grant(&idem(key, c.fingerprint()), c, now).map(Into::into),
            Sent::Reserve(c) => l
                .reserve(&idem(key, c.fingerprint()), c, now)
                .map(Into::into),
            Sent::Commit(c) => l
                .commit_hold(&idem(key, c.fingerprint()), c, now)
                .map(Into::into),
            Sent::Refund(c) => l
                .refund(&idem(key, c.fingerprint()), c, now)
                .map(Into::into),
            Sent::Extend(c) => l
                .extend_hold(&idem(key, c.fingerprint()), c, now)
                .map(Into::into),
            Sent::Adjust(c) => l
                .adjust(&idem(key, c.fingerprint()), c, now)
                .map(Into::into),
            Sent::Transfer(c) => l
                .transfer(&idem(key, c.fingerprint()), c, now)
                .map(Into::into),
        };
        match r {
            Ok(o) => Answer::Ok(o),
            Err(e) => Answer::Err(e),
        }
    }

    fn credits(n: i64) -> Credits {
        Credits::new("amount", n).unwrap()
    }

    fn acct(n: u8) -> AccountId {
        AccountId::parse("a", &format!("acct{n}")).unwrap()
    }

    const ACCOUNTS: [&str; 3] = ["acct0", "acct1", "acct2"];

    /// After a reserve, its draws follow the consumption order: every usable bucket ordered
    /// before the last one drawn was emptied.
    fn draws_follow_the_order(
        l: &Ledger,
        hold: &Hold,
        before: &Book,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        let book = l.book(&hold.account_id).ok_or("no book")?;
        let drawn: Vec<&String> = book
            .draws
            .values()
            .filter(|d| d.hold_id == hold.hold_id)
            .map(|d| &d.grant_id)
            .collect();
        let mut usable: Vec<&crate::domain::book::Grant> = before
            .grants
            .values()
            .filter(|b| b.remaining > 0 && !b.expired_at(now))
            .collect();
        usable.sort_by(|a, b| consumption_order(a, b));
        let last = usable
            .iter()
            .rposition(|b| drawn.contains(&&b.grant_id))
            .ok_or("drew from nothing usable")?;
        for b in &usable[..last] {
            let after = &book.grants[&b.grant_id];
            if after.remaining != 0 {
                return Err(format!(
                    "bucket {} ordered earlier still has {}",
                    b.grant_id, after.remaining
                ));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn random_command_sequences_keep_every_invariant(ops in proptest::collection::vec(op(), 1..80)) {
            let allowance = Allowance { amount: 5, period: Period::Daily, rollover: Rollover::Capped(3) };
            let mut l = Ledger::new(Some(allowance));
            let mut now = DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(20_000);
            let mut sent: Vec<(String, Sent, Answer)> = Vec::new();
            let mut hold_ids: Vec<String> = Vec::new();
            for (step, op) in ops.into_iter().enumerate() {
                let key = format!("k{step}");
                let pick = |i: usize| hold_ids.get(i % hold_ids.len().max(1)).cloned();
                let cmd = match op {
                    Op::Grant { account, amount, expires_in, priority } => Some(Sent::Grant(GrantCredits {
                        account_id: acct(account), amount: credits(amount), reason: "test".into(), source: Source::Promotion,
                        expires_at: expires_in.map(|s| now + TimeDelta::seconds(s)), priority })),
                    Op::Reserve { account, amount, ttl_secs } => {
                        let mut b = [0u8; 16];
                        b[..8].copy_from_slice(&u64::try_from(step).unwrap().to_be_bytes());
                        Some(Sent::Reserve(Reserve {
                            account_id: acct(account), amount: credits(amount), ttl: TimeDelta::seconds(ttl_secs), ttl_given: true,
                            metadata: Metadata::default(), hold_id: HoldId::from_bytes(b), priced: None }))
                    }
                    Op::Commit { hold, amount } => pick(hold).map(|h| Sent::Commit(CommitHold {
                        hold_id: HoldId::parse("h", &h).unwrap(), amount: credits(amount) })),
                    Op::Refund { hold, amount } => pick(hold).map(|h| Sent::Refund(Refund {
                        hold_id: HoldId::parse("h", &h).unwrap(), amount: amount.map(credits), reason: String::new() })),
                    Op::Extend { hold, ttl_secs } => pick(hold).map(|h| Sent::Extend(ExtendHold {
                        hold_id: HoldId::parse("h", &h).unwrap(), ttl: TimeDelta::seconds(ttl_secs) })),
                    Op::Adjust { account, delta } => Some(Sent::Adjust(Adjust {
                        account_id: acct(account), delta, reason: "fix".into(), operator: "ops".into() })),
                    Op::Transfer { from, to, amount } => Some(Sent::Transfer(Transfer {
                        from: acct(from), to: acct(to), amount: credits(amount), reason: "gift".into() })),
                    Op::Advance { secs } => { now += TimeDelta::seconds(secs); None }
                    Op::ClawBack { account, amount } => {
                        let name = format!("acct{account}");
                        if l.book(&name).is_some() {
                            let before = l.balance(&name, now).unwrap();
                            l.claw_back(&name, amount, now).unwrap();
                            let after = l.balance(&name, now).unwrap();
                            prop_assert_eq!(after.available, before.available - amount, "a claw-back takes exactly its amount");
                            if after.available < 0 {
                                let r = Reserve { account_id: acct(account), amount: credits(1), ttl: TimeDelta::seconds(60), ttl_given: true,
                                    metadata: Metadata::default(), hold_id: HoldId::from_bytes([0xee; 16]), priced: None };
                                let mut probe = l.clone();
                                prop_assert!(probe.reserve(&idem("probe", r.fingerprint()), &r, now).is_err(), "debt blocks reserves");
                            }
                        }
                        None
                    }
                    Op::Sweep => {
                        let before: Vec<_> = ACCOUNTS.iter().map(|a| l.balance(a, now).ok().map(|b| (b.available, b.held))).collect();
                        l.expire_due(now);
                        let after: Vec<_> = ACCOUNTS.iter().map(|a| l.balance(a, now).ok().map(|b| (b.available, b.held))).collect();
                        prop_assert_eq!(before, after, "sweeping changes no balance a caller sees");
                        for a in ACCOUNTS {
                            if let Some(book) = l.book(a) {
                                for b in book.grants.values() {
                                    prop_assert!(!(b.expired_at(now) && b.remaining > 0), "no credit outlives its bucket: {:?}", b);
                                }
                            }
                        }
                        None
                    }
                    Op::Retry { back } if !sent.is_empty() => {
                        let (k, c, first) = &sent[back % sent.len()];
                        if let Answer::Ok(_) = first {
                            let before = l.clone();
                            let again = send(&mut l, k, c, now);
                            prop_assert_eq!(&again, first, "a retry replays the stored outcome");
                            prop_assert_eq!(&l, &before, "a replay changes nothing");
                        }
                        None
                    }
                    Op::ReuseKeyWithOtherRequest { back } if !sent.is_empty() => {
                        let (k, _, first) = &sent[back % sent.len()];
                        if let Answer::Ok(_) = first {
                            let before = l.clone();
                            let other = Sent::Grant(GrantCredits::simple(acct(0), credits(1), Source::Adjustment, &format!("other {step}")));
                            prop_assert_eq!(send(&mut l, k, &other, now), Answer::Err(LedgerError::IdempotencyKeyReused));
                            prop_assert_eq!(&l, &before, "a reused key changes nothing");
                        }
                        None
                    }
                    Op::Retry { .. } | Op::ReuseKeyWithOtherRequest { .. } => None,
                };
                if let Some(cmd) = cmd {
                    let before = l.clone();
                    let answer = send(&mut l, &key, &cmd, now);
                    match &answer {
                        Answer::Err(_) => prop_assert_eq!(&l, &before, "a refused command changes nothing"),
                        Answer::Ok(Outcome::Reserve(r)) => {
                            hold_ids.push(r.hold.hold_id.clone());
                            let mut settled = before.clone();
                            settled.settle(&r.hold.account_id, now);
                            if let Some(b) = settled.book(&r.hold.account_id) {
                                prop_assert_eq!(draws_follow_the_order(&l, &r.hold, b, now), Ok(()));
                            }
                        }
                        Answer::Ok(Outcome::Commit(c)) => {
                            let prev = before.hold(&c.hold.hold_id).unwrap();
                            prop_assert_eq!(prev.state_at(now), HoldState::Open, "only an open hold commits");
                        }
                        Answer::Ok(_) => {}
                    }
                    sent.push((key, cmd, answer));
                }
                prop_assert_eq!(l.check_invariants(), Ok(()));
            }
        }
    }

    fn g(
        l: &mut Ledger,
        key: &str,
        acct_: &str,
        amount: i64,
        expires_at: Option<DateTime<Utc>>,
        priority: i32,
    ) -> String {
        let cmd = GrantCredits {
            account_id: AccountId::parse("a", acct_).unwrap(),
            amount: credits(amount),
            reason: String::new(),
            source: Source::Promotion,
            expires_at,
            priority,
        };
        l.grant(
            &idem(key, cmd.fingerprint()),
            &cmd,
            DateTime::<Utc>::UNIX_EPOCH,
        )
        .unwrap()
        .grant_id
    }

    #[test]
    fn buckets_are_consumed_soonest_expiry_then_priority_then_oldest() {
        let mut l = Ledger::new(None);
        let t0 = DateTime::<Utc>::UNIX_EPOCH;
        let never_old = g(&mut l, "g1", "u", 10, None, 50);
        let never_urgent = g(&mut l, "g2", "u", 10, None, 0);
        let late = g(&mut l, "g3", "u", 10, Some(t0 + TimeDelta::days(30)), 50);
        let soon = g(&mut l, "g4", "u", 10, Some(t0 + TimeDelta::days(1)), 90);
        let r = Reserve {
            account_id: AccountId::parse("a", "u").unwrap(),
            amount: credits(35),
            ttl: TimeDelta::hours(1),
            ttl_given: true,
            metadata: Metadata::default(),
            hold_id: HoldId::from_bytes([7; 16]),
            priced: None,
        };
        l.reserve(&idem("r", r.fingerprint()), &r, t0).unwrap();
        let book = l.book("u").unwrap();
        let order: Vec<(&str, i64)> = book
            .draws
            .values()
            .map(|d| (d.grant_id.as_str(), d.held))
            .collect();
        assert_eq!(
            order,
            [
                (soon.as_str(), 10),
                (late.as_str(), 10),
                (never_urgent.as_str(), 10),
                (never_old.as_str(), 5)
            ]
        );
    }

    #[test]
    fn a_refund_after_the_bucket_expired_expires_at_once() {
        let mut l = Ledger::new(None);
        let t0 = DateTime::<Utc>::UNIX_EPOCH;
        g(&mut l, "g", "u", 10, Some(t0 + TimeDelta::hours(1)), 50);
        let r = Reserve {
            account_id: AccountId::parse("a", "u").unwrap(),
            amount: credits(10),
            ttl: TimeDelta::minutes(10),
            ttl_given: true,
            metadata: Metadata::default(),
            hold_id: HoldId::from_bytes([1; 16]),
            priced: None,
        };
        l.reserve(&idem("r", r.fingerprint()), &r, t0).unwrap();
        let c = CommitHold {
            hold_id: r.hold_id.clone(),
            amount: credits(10),
        };
        l.commit_hold(&idem("c", c.fingerprint()), &c, t0).unwrap();
        let f = Refund {
            hold_id: r.hold_id.clone(),
            amount: None,
            reason: "job failed".into(),
        };
        let out = l
            .refund(&idem("f", f.fingerprint()), &f, t0 + TimeDelta::hours(2))
            .unwrap();
        assert_eq!(
            (out.refunded, out.available),
            (10, 0),
            "the promo credits went back and expired"
        );
        let kinds: Vec<EntryKind> = l.entries().iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                EntryKind::Grant,
                EntryKind::Reserve,
                EntryKind::Commit,
                EntryKind::Refund,
                EntryKind::Expiration
            ]
        );
        l.check_invariants().unwrap();
    }

    #[test]
    fn allowances_are_granted_once_per_period_and_roll_over_up_to_the_cap() {
        let allowance = Allowance {
            amount: 5,
            period: Period::Daily,
            rollover: Rollover::Capped(3),
        };
        let mut l = Ledger::new(Some(allowance));
        let day0 = DateTime::<Utc>::UNIX_EPOCH + TimeDelta::hours(10);
        let o = OpenAccount {
            account_id: AccountId::parse("a", "u").unwrap(),
            plan: "free".into(),
            bonus: Some((credits(100), Some(TimeDelta::days(30)))),
        };
        assert_eq!(
            l.open_account(&idem("o", o.fingerprint()), &o, day0)
                .unwrap()
                .available,
            105
        );
        assert_eq!(
            l.open_account(&idem("o2", o.fingerprint()), &o, day0),
            Err(LedgerError::AccountExists)
        );
        assert_eq!(
            l.balance("u", day0 + TimeDelta::hours(5))
                .unwrap()
                .available,
            105,
            "same day: no second allowance"
        );
        // Next day: yesterday's 5 unused expire, 3 roll over, 5 new.
        assert_eq!(
            l.balance("u", day0 + TimeDelta::days(1)).unwrap().available,
            108
        );
        // Three days later: only the period right before rolls over (none was granted then).
        assert_eq!(
            l.balance("u", day0 + TimeDelta::days(4)).unwrap().available,
            105
        );
    }
}
