//! The reference ledger: every rule in [`super::rules`] applied to in-memory state.
//!
//! It is the specification the storage backends are tested against (the conformance suite
//! replays random command sequences on a backend and on this model and compares them), and the
//! subject of the property tests below. It is not used to serve requests.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use super::amount::MAX_BALANCE;
use super::command::{CommitHold, ExtendHold, Grant, Idempotency, Refund, Reserve};
use super::error::LedgerError;
use super::hold::{Hold, HoldState};
use super::outcome::{
    Balance, CommitOutcome, ExtendOutcome, GrantOutcome, Outcome, RefundOutcome, ReserveOutcome,
};
use super::rules::{self, EntryKind, RefundPlan};

/// Stored balance columns of one account.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccountState {
    /// Credits available.
    pub available: i64,
    /// Credits held by holds stored as open.
    pub held: i64,
}

/// One ledger line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Sequence number.
    pub entry_id: i64,
    /// The account changed.
    pub account_id: String,
    /// The hold involved, if any.
    pub hold_id: Option<String>,
    /// What happened.
    pub kind: EntryKind,
    /// Change to available.
    pub available_delta: i64,
    /// Change to held.
    pub held_delta: i64,
}

/// The whole reference state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    accounts: BTreeMap<String, AccountState>,
    holds: BTreeMap<String, Hold>,
    entries: Vec<Entry>,
    keys: HashMap<(String, String), ([u8; 32], Outcome)>,
}

type Res<T> = Result<T, LedgerError>;

impl Ledger {
    /// An empty ledger.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Stored columns of an account.
    #[must_use]
    pub fn account(&self, account_id: &str) -> Option<AccountState> {
        self.accounts.get(account_id).copied()
    }

    /// A hold as stored.
    #[must_use]
    pub fn hold(&self, hold_id: &str) -> Option<&Hold> {
        self.holds.get(hold_id)
    }

    /// Every entry, oldest first.
    #[must_use]
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The balance a caller sees at `now`: overdue open holds count as released.
    ///
    /// # Errors
    /// `AccountNotFound`.
    pub fn balance(&self, account_id: &str, now: DateTime<Utc>) -> Res<Balance> {
        let a = self
            .account(account_id)
            .ok_or(LedgerError::AccountNotFound)?;
        let (mut due, mut open) = (0i64, 0i64);
        for h in self
            .holds
            .values()
            .filter(|h| h.account_id == account_id && h.state == HoldState::Open)
        {
            if h.expires_at <= now {
                due = due.saturating_add(h.amount);
            } else {
                open = open.saturating_add(1);
            }
        }
        Ok(Balance {
            account_id: account_id.to_owned(),
            available: a.available.saturating_add(due),
            held: a.held.saturating_sub(due),
            open_holds: open,
            plan: "free".to_owned(),
            as_of: now,
        })
    }

    /// Applies `op` atomically under an idempotency key: a stored outcome is replayed, a key
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

    fn push_entry(
        &mut self,
        account_id: &str,
        hold_id: Option<&str>,
        kind: EntryKind,
        avail: i64,
        held: i64,
    ) -> i64 {
        let entry_id = i64::try_from(self.entries.len())
            .unwrap_or(i64::MAX)
            .saturating_add(1);
        self.entries.push(Entry {
            entry_id,
            account_id: account_id.to_owned(),
            hold_id: hold_id.map(str::to_owned),
            kind,
            available_delta: avail,
            held_delta: held,
        });
        entry_id
    }

    fn account_mut(&mut self, account_id: &str) -> Res<&mut AccountState> {
        self.accounts
            .get_mut(account_id)
            .ok_or(LedgerError::AccountNotFound)
    }

    /// Moves `amount` between held and available (positive: held → available).
    fn shift(&mut self, account_id: &str, to_available: i64, from_held: i64) -> Res<AccountState> {
        let a = self.account_mut(account_id)?;
        a.available = a.available.saturating_add(to_available);
        a.held = a.held.saturating_sub(from_held);
        if a.available.saturating_add(a.held) > MAX_BALANCE {
            return Err(LedgerError::BalanceLimitExceeded { limit: MAX_BALANCE });
        }
        Ok(*a)
    }

    fn expire_hold(&mut self, hold_id: &str) {
        let Some(h) = self.holds.get_mut(hold_id) else {
            return;
        };
        h.state = HoldState::Expired;
        h.resolved_at = Some(h.expires_at);
        let (account, amount) = (h.account_id.clone(), h.amount);
        // The hold was open, so its amount is in `held`: this cannot fail.
        let _ = self.shift(&account, amount, amount);
        self.push_entry(
            &account,
            Some(hold_id),
            EntryKind::Expire,
            amount,
            amount.saturating_neg(),
        );
    }

    fn due_holds(&self, account_id: Option<&str>, now: DateTime<Utc>) -> Vec<String> {
        self.holds
            .values()
            .filter(|h| h.state == HoldState::Open && h.expires_at <= now)
            .filter(|h| account_id.is_none_or(|a| h.account_id == a))
            .map(|h| h.hold_id.clone())
            .collect()
    }

    /// Expires every overdue open hold (what the sweeper does). Returns how many.
    pub fn expire_due(&mut self, now: DateTime<Utc>) -> usize {
        let due = self.due_holds(None, now);
        for id in &due {
            self.expire_hold(id);
        }
        due.len()
    }

    /// Adds credits, creating the account.
    ///
    /// # Errors
    /// `IdempotencyKeyReused`, `BalanceLimitExceeded`.
    pub fn grant(&mut self, idem: &Idempotency, cmd: &Grant) -> Res<GrantOutcome> {
        self.idempotent(idem, |l| {
            let id = cmd.account_id.as_str();
            let a = l.accounts.entry(id.to_owned()).or_default();
            rules::check_grant(a.available.saturating_add(a.held), cmd.amount)?;
            let after = l.shift(id, cmd.amount.get(), 0)?;
            let entry_id = l.push_entry(id, None, EntryKind::Grant, cmd.amount.get(), 0);
            Ok(GrantOutcome {
                account_id: id.to_owned(),
                entry_id,
                available: after.available,
            })
        })
    }

    /// Creates a hold, first expiring the account's overdue holds.
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
            let id = cmd.account_id.as_str();
            l.account_mut(id)?;
            for due in l.due_holds(Some(id), now) {
                l.expire_hold(&due);
            }
            let available = l.account_mut(id)?.available;
            rules::check_reserve(available, cmd.amount)?;
            let amount = cmd.amount.get();
            let after = l.shift(id, amount.saturating_neg(), amount.saturating_neg())?;
            let hold = Hold {
                hold_id: cmd.hold_id.as_str().to_owned(),
                account_id: id.to_owned(),
                amount,
                state: HoldState::Open,
                committed_amount: 0,
                refunded_amount: 0,
                created_at: now,
                expires_at: now.checked_add_signed(cmd.ttl).unwrap_or(now),
                resolved_at: None,
                metadata: cmd.metadata.clone(),
            };
            l.holds.insert(hold.hold_id.clone(), hold.clone());
            l.push_entry(
                id,
                Some(&hold.hold_id),
                EntryKind::Reserve,
                amount.saturating_neg(),
                amount,
            );
            Ok(ReserveOutcome {
                hold,
                available: after.available,
            })
        })
    }

    fn stored_hold(&self, hold_id: &str) -> Res<Hold> {
        self.holds
            .get(hold_id)
            .cloned()
            .ok_or(LedgerError::HoldNotFound)
    }

    /// Settles a hold.
    ///
    /// # Errors
    /// `IdempotencyKeyReused`, `HoldNotFound`, the not-open refusals, `InsufficientCredits`
    /// for an extra the account cannot cover.
    pub fn commit_hold(
        &mut self,
        idem: &Idempotency,
        cmd: &CommitHold,
        now: DateTime<Utc>,
    ) -> Res<CommitOutcome> {
        self.idempotent(idem, |l| {
            let mut hold = l.stored_hold(cmd.hold_id.as_str())?;
            let plan = rules::plan_commit(&hold, cmd.amount, now)?;
            let available = l.account_mut(&hold.account_id)?.available;
            if available < plan.extra_drawn {
                return Err(LedgerError::InsufficientCredits {
                    available,
                    requested: plan.extra_drawn,
                });
            }
            let after = l.shift(&hold.account_id, plan.available_delta(), plan.held)?;
            hold.state = HoldState::Committed;
            hold.committed_amount = plan.committed;
            hold.resolved_at = Some(now);
            l.holds.insert(hold.hold_id.clone(), hold.clone());
            l.push_entry(
                &hold.account_id,
                Some(&hold.hold_id),
                EntryKind::Commit,
                plan.available_delta(),
                plan.held.saturating_neg(),
            );
            Ok(CommitOutcome {
                hold,
                released: plan.released,
                extra_drawn: plan.extra_drawn,
                available: after.available,
            })
        })
    }

    /// Releases an open hold or returns committed credits.
    ///
    /// # Errors
    /// `IdempotencyKeyReused`, `HoldNotFound`, and the refusals of [`rules::plan_refund`].
    pub fn refund(
        &mut self,
        idem: &Idempotency,
        cmd: &Refund,
        now: DateTime<Utc>,
    ) -> Res<RefundOutcome> {
        self.idempotent(idem, |l| {
            let mut hold = l.stored_hold(cmd.hold_id.as_str())?;
            let plan = rules::plan_refund(&hold, cmd.amount, now)?;
            let (after, kind, held_delta) = match plan {
                RefundPlan::Release { amount } => {
                    hold.state = HoldState::Released;
                    hold.resolved_at = Some(now);
                    (
                        l.shift(&hold.account_id, amount, amount)?,
                        EntryKind::Release,
                        amount.saturating_neg(),
                    )
                }
                RefundPlan::Return { amount } => {
                    hold.refunded_amount = hold.refunded_amount.saturating_add(amount);
                    (l.shift(&hold.account_id, amount, 0)?, EntryKind::Refund, 0)
                }
            };
            l.holds.insert(hold.hold_id.clone(), hold.clone());
            l.push_entry(
                &hold.account_id,
                Some(&hold.hold_id),
                kind,
                plan.amount(),
                held_delta,
            );
            Ok(RefundOutcome {
                hold,
                refunded: plan.amount(),
                available: after.available,
            })
        })
    }

    /// Moves an open hold's expiry to `now + ttl`.
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
            let mut hold = l.stored_hold(cmd.hold_id.as_str())?;
            rules::check_extend(&hold, now)?;
            hold.expires_at = now.checked_add_signed(cmd.ttl).unwrap_or(now);
            l.holds.insert(hold.hold_id.clone(), hold.clone());
            Ok(ExtendOutcome { hold })
        })
    }

    /// Checks the ledger's invariants; returns the first broken one.
    ///
    /// # Errors
    /// A description of the violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (id, a) in &self.accounts {
            let (mut avail, mut held) = (0i64, 0i64);
            for e in self.entries.iter().filter(|e| &e.account_id == id) {
                avail = avail.saturating_add(e.available_delta);
                held = held.saturating_add(e.held_delta);
            }
            let open: i64 = self
                .holds
                .values()
                .filter(|h| &h.account_id == id && h.state == HoldState::Open)
                .map(|h| h.amount)
                .sum();
            if (avail, held) != (a.available, a.held) {
                return Err(format!(
                    "{id}: entries say ({avail}, {held}), columns ({}, {})",
                    a.available, a.held
                ));
            }
            if open != a.held {
                return Err(format!(
                    "{id}: held {} but open holds sum to {open}",
                    a.held
                ));
            }
            if a.available < 0 || a.held < 0 {
                return Err(format!("{id}: negative balance {a:?}"));
            }
        }
        for h in self.holds.values() {
            if h.refunded_amount > h.committed_amount || h.refunded_amount < 0 {
                return Err(format!(
                    "{}: refunded {} of {}",
                    h.hold_id, h.refunded_amount, h.committed_amount
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)] // test arithmetic on small numbers
mod tests {
    use chrono::TimeDelta;
    use proptest::prelude::*;

    use super::*;
    use crate::domain::{AccountId, Caller, Credits, HoldId, IdempotencyKey, Metadata};

    #[derive(Clone, Debug)]
    enum Op {
        Grant {
            account: u8,
            amount: i64,
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
            2 => (0u8..3, 1i64..200).prop_map(|(account, amount)| Op::Grant { account, amount }),
            4 => (0u8..3, 1i64..120, 1i64..120).prop_map(|(account, amount, ttl_secs)| Op::Reserve { account, amount, ttl_secs }),
            3 => (any::<usize>(), 1i64..150).prop_map(|(hold, amount)| Op::Commit { hold, amount }),
            2 => (any::<usize>(), proptest::option::of(1i64..60)).prop_map(|(hold, amount)| Op::Refund { hold, amount }),
            1 => (any::<usize>(), 1i64..120).prop_map(|(hold, ttl_secs)| Op::Extend { hold, ttl_secs }),
            2 => (1i64..90).prop_map(|secs| Op::Advance { secs }),
            1 => Just(Op::Sweep),
            2 => any::<usize>().prop_map(|back| Op::Retry { back }),
            1 => any::<usize>().prop_map(|back| Op::ReuseKeyWithOtherRequest { back }),
        ]
    }

    /// A mutating command as sent, so it can be retried.
    #[derive(Clone, Debug)]
    enum Sent {
        Grant(Grant),
        Reserve(Reserve),
        Commit(CommitHold),
        Refund(Refund),
        Extend(ExtendHold),
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
        }
    }

    fn send(l: &mut Ledger, key: &str, cmd: &Sent, now: DateTime<Utc>) -> Answer {
        let r: Res<Outcome> = match cmd {
            Sent::Grant(c) => l.grant(&idem(key, c.fingerprint()), c).map(Into::into),
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
        };
        match r {
            Ok(o) => Answer::Ok(o),
            Err(e) => Answer::Err(e),
        }
    }

    fn credits(n: i64) -> Credits {
        Credits::new("amount", n).unwrap()
    }

    /// Net credits that entered accounts: grants − commits + refunds, from the outcomes alone.
    fn net_flow(answer: &Answer) -> i64 {
        match answer {
            Answer::Ok(Outcome::Commit(c)) => -c.hold.committed_amount,
            Answer::Ok(Outcome::Refund(r)) if r.hold.state == HoldState::Committed => r.refunded,
            Answer::Ok(
                Outcome::Grant(_)
                | Outcome::Reserve(_)
                | Outcome::Extend(_)
                | Outcome::Refund(_)
                | Outcome::Plan(_),
            )
            | Answer::Err(_) => 0,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn random_command_sequences_keep_every_invariant(ops in proptest::collection::vec(op(), 1..80)) {
            let mut l = Ledger::new();
            let mut now = DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(20_000);
            let mut sent: Vec<(String, Sent, Answer)> = Vec::new();
            let mut hold_ids: Vec<String> = Vec::new();
            let mut granted = 0i64;
            let mut net = 0i64;
            for (step, op) in ops.into_iter().enumerate() {
                let key = format!("k{step}");
                let pick = |i: usize| hold_ids.get(i % hold_ids.len().max(1)).cloned();
                let cmd = match op {
                    Op::Grant { account, amount } => Some(Sent::Grant(Grant {
                        account_id: AccountId::parse("a", &format!("acct{account}")).unwrap(),
                        amount: credits(amount), reason: "test".into() })),
                    Op::Reserve { account, amount, ttl_secs } => {
                        let mut b = [0u8; 16];
                        b[..8].copy_from_slice(&u64::try_from(step).unwrap().to_be_bytes());
                        Some(Sent::Reserve(Reserve {
                            account_id: AccountId::parse("a", &format!("acct{account}")).unwrap(),
                            amount: credits(amount), ttl: TimeDelta::seconds(ttl_secs),
                            metadata: Metadata::default(), hold_id: HoldId::from_bytes(b), priced: None }))
                    }
                    Op::Commit { hold, amount } => pick(hold).map(|h| Sent::Commit(CommitHold {
                        hold_id: HoldId::parse("h", &h).unwrap(), amount: credits(amount) })),
                    Op::Refund { hold, amount } => pick(hold).map(|h| Sent::Refund(Refund {
                        hold_id: HoldId::parse("h", &h).unwrap(), amount: amount.map(credits), reason: String::new() })),
                    Op::Extend { hold, ttl_secs } => pick(hold).map(|h| Sent::Extend(ExtendHold {
                        hold_id: HoldId::parse("h", &h).unwrap(), ttl: TimeDelta::seconds(ttl_secs) })),
                    Op::Advance { secs } => { now += TimeDelta::seconds(secs); None }
                    Op::Sweep => {
                        let before: Vec<_> = ["acct0", "acct1", "acct2"].iter().map(|a| l.balance(a, now).ok()).collect();
                        l.expire_due(now);
                        let after: Vec<_> = ["acct0", "acct1", "acct2"].iter().map(|a| l.balance(a, now).ok()).collect();
                        prop_assert_eq!(before, after, "sweeping changes no balance a caller sees");
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
                            let other = Sent::Grant(Grant { account_id: AccountId::parse("a", "acct0").unwrap(),
                                amount: credits(1), reason: format!("other {step}") });
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
                        Answer::Ok(Outcome::Reserve(r)) => hold_ids.push(r.hold.hold_id.clone()),
                        Answer::Ok(Outcome::Grant(_)) => {
                            if let Sent::Grant(g) = &cmd { granted += g.amount.get(); }
                        }
                        Answer::Ok(_) => {}
                    }
                    if let (Answer::Ok(Outcome::Commit(_)), Some(prev)) = (&answer, before.hold(&hold_of(&cmd))) {
                        prop_assert_eq!(prev.state_at(now), HoldState::Open, "only an open hold commits");
                    }
                    net += net_flow(&answer);
                    sent.push((key, cmd, answer));
                }
                prop_assert_eq!(l.check_invariants(), Ok(()));
                let total: i64 = ["acct0", "acct1", "acct2"].iter().filter_map(|a| l.account(a)).map(|a| a.available + a.held).sum();
                prop_assert_eq!(total, granted + net, "credits are neither lost nor invented");
            }
        }
    }

    fn hold_of(cmd: &Sent) -> String {
        match cmd {
            Sent::Commit(c) => c.hold_id.as_str().to_owned(),
            Sent::Refund(c) => c.hold_id.as_str().to_owned(),
            Sent::Extend(c) => c.hold_id.as_str().to_owned(),
            Sent::Grant(_) | Sent::Reserve(_) => String::new(),
        }
    }

    #[test]
    fn a_hold_resolves_at_most_once() {
        let mut l = Ledger::new();
        let now = DateTime::<Utc>::UNIX_EPOCH;
        let g = Grant {
            account_id: AccountId::parse("a", "u").unwrap(),
            amount: credits(100),
            reason: String::new(),
        };
        l.grant(&idem("g", g.fingerprint()), &g).unwrap();
        let r = Reserve {
            account_id: g.account_id.clone(),
            amount: credits(40),
            ttl: TimeDelta::seconds(60),
            metadata: Metadata::default(),
            hold_id: HoldId::from_bytes([1; 16]),
            priced: None,
        };
        l.reserve(&idem("r", r.fingerprint()), &r, now).unwrap();
        let c = CommitHold {
            hold_id: r.hold_id.clone(),
            amount: credits(35),
        };
        let out = l.commit_hold(&idem("c", c.fingerprint()), &c, now).unwrap();
        assert_eq!((out.released, out.available), (5, 65));
        let again = CommitHold {
            hold_id: r.hold_id.clone(),
            amount: credits(35),
        };
        assert_eq!(
            l.commit_hold(&idem("c2", again.fingerprint()), &again, now),
            Err(LedgerError::HoldAlreadyCommitted)
        );
        let rel = Refund {
            hold_id: r.hold_id.clone(),
            amount: None,
            reason: String::new(),
        };
        assert_eq!(
            l.refund(&idem("f", rel.fingerprint()), &rel, now)
                .unwrap()
                .refunded,
            35
        );
        assert_eq!(l.balance("u", now).unwrap().available, 100);
    }
}
