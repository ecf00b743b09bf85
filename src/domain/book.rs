//! An account's book: its grants, the holds being worked on, and the rules that move credits
//! between them.
//!
//! A balance is the sum of grants. Each grant ([`Grant`]; the table is still called `bucket`,
//! as `GRANT` is an SQL keyword) has a source, an optional expiry
//! and a priority; `remaining` is its available part and `held` the part reserved by open
//! holds. Reserves and commits consume grants in one documented order (see
//! [`consumption_order`]), and every hold remembers its draws, so commits, releases and
//! refunds put credits back into the grants they came from. A credit returned into a grant
//! that has expired meanwhile expires at once (an `expiration` entry): credits never outlive
//! their grant, and promotional credits cannot be laundered through a hold.
//!
//! Storage loads a book under the account's lock, calls these methods, and writes what they
//! changed (`dirty`, `entries`). The in-memory model keeps whole books. Every change of
//! `available`/`held` goes through [`Book::entry`], so entries explain the balance by
//! construction.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use super::amount::{Credits, MAX_BALANCE};
use super::error::LedgerError;
use super::hold::{Hold, HoldState, Metadata};
use super::outcome::{CommitOutcome, ExtendOutcome, GrantOutcome, RefundOutcome, ReserveOutcome};
use super::plan::{Allowance, Rollover, period_at, previous_period};
use super::rules::{self, EntryKind, RefundPlan};

/// Priority of a grant when none is given. Lower values are consumed first (0..=100).
pub const PRIORITY_DEFAULT: i32 = 50;
/// Largest priority value.
pub const PRIORITY_MAX: i32 = 100;

/// Where a grant's credits came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A purchased pack.
    Purchase,
    /// A subscription's period credits.
    Subscription,
    /// A plan's periodic allowance.
    Allowance,
    /// The one-time sign-up bonus.
    SignupBonus,
    /// Promotional credits.
    Promotion,
    /// An operator's correction.
    Adjustment,
    /// Credits given back by support.
    Refund,
    /// Credits moved in from another account (source and expiry of the originals are kept
    /// when known; this is used only when they are not).
    Transfer,
}

impl Source {
    /// Every source.
    pub const ALL: [Self; 8] = [
        Self::Purchase,
        Self::Subscription,
        Self::Allowance,
        Self::SignupBonus,
        Self::Promotion,
        Self::Adjustment,
        Self::Refund,
        Self::Transfer,
    ];

    /// The stored name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Purchase => "purchase",
            Self::Subscription => "subscription",
            Self::Allowance => "allowance",
            Self::SignupBonus => "signup_bonus",
            Self::Promotion => "promotion",
            Self::Adjustment => "adjustment",
            Self::Refund => "refund",
            Self::Transfer => "transfer",
        }
    }

    /// Parses a stored name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// A grant: credits from one source with one expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Id (`grt_` + 32 hex digits).
    pub grant_id: String,
    /// The account.
    pub account_id: String,
    /// Where the credits came from.
    pub source: Source,
    /// Credits granted.
    pub granted: i64,
    /// Credits available.
    pub remaining: i64,
    /// Credits reserved by open holds.
    pub held: i64,
    /// Credits that expired unused.
    pub expired: i64,
    /// When the remaining credits expire (never if `None`).
    pub expires_at: Option<DateTime<Utc>>,
    /// Consumption priority among grants with the same expiry; lower first.
    pub priority: i32,
    /// For allowance grants, the period key (one allowance grant per account and period).
    pub period: Option<String>,
    /// Free text from the grant request.
    pub reason: String,
    /// When granted.
    pub created_at: DateTime<Utc>,
}

impl Grant {
    /// Whether the bucket's expiry has passed at `now`.
    #[must_use]
    pub fn expired_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }
}

/// The documented consumption order: soonest-expiring first (grants that never expire last),
/// then lower priority value, then oldest, then by id.
#[must_use]
pub fn consumption_order(a: &Grant, b: &Grant) -> Ordering {
    let key = |x: &Grant| {
        (
            x.expires_at.is_none(),
            x.expires_at,
            x.priority,
            x.created_at,
        )
    };
    key(a)
        .cmp(&key(b))
        .then_with(|| a.grant_id.cmp(&b.grant_id))
}

/// Available credits per source, the next expiry (time, amount), and the allowance left.
pub type Breakdown = (
    BTreeMap<Source, i64>,
    Option<(DateTime<Utc>, i64)>,
    Option<i64>,
);

/// An account's balance as stored: its row, its grants that hold credits (and those of its
/// current allowance period), and whether one of its holds or grants is past its expiry. What
/// both backends read, turned into the [`super::Balance`] callers see by one rule.
#[derive(Clone, Debug)]
pub struct StoredBalance {
    /// The account.
    pub account_id: String,
    /// The `available` column less debt.
    pub available: i64,
    /// The `held` column.
    pub held: i64,
    /// The `debt` column.
    pub debt: i64,
    /// Holds in state open.
    pub open_holds: i64,
    /// The plan.
    pub plan: String,
    /// The allowance period last granted.
    pub allowance_period: Option<String>,
    /// Grants that hold credits, and those of `allowance_period`.
    pub grants: Vec<Grant>,
    /// An open hold or a grant with credits is past its expiry.
    pub overdue: bool,
    /// When it was read (the database clock).
    pub now: DateTime<Utc>,
    /// The account row's version: every committed change of the account moves it up.
    pub version: i64,
}

impl StoredBalance {
    /// Whether time has work to do on the account: something past its expiry, or a new
    /// allowance period of its plan (`policy`) has begun.
    #[must_use]
    pub fn due(&self, policy: &super::plan::Policy) -> bool {
        self.overdue || policy.allowance_due(&self.plan, self.allowance_period.as_deref(), self.now)
    }

    /// The balance callers see; `allowance` is the plan's (none: no allowance left to show).
    #[must_use]
    pub fn balance(self, allowance: Option<&Allowance>) -> super::Balance {
        let (by_source, next_expiry, allowance_left) =
            breakdown(&self.grants, self.allowance_period.as_deref(), self.now);
        super::Balance {
            account_id: self.account_id,
            available: self.available,
            held: self.held,
            debt: self.debt,
            open_holds: self.open_holds,
            allowance_left: allowance.and(allowance_left.or(Some(0))),
            plan: self.plan,
            by_source,
            next_expiry,
            as_of: self.now,
            version: self.version,
        }
    }
}

/// A balance's breakdown from its live grants: available credits per source, the next expiry
/// (time and amount), and what is left of the allowance granted for `allowance_period`.
#[must_use]
pub fn breakdown<'b>(
    grants: impl IntoIterator<Item = &'b Grant>,
    allowance_period: Option<&str>,
    now: DateTime<Utc>,
) -> Breakdown {
    let mut by_source = BTreeMap::new();
    let mut next: Option<(DateTime<Utc>, i64)> = None;
    let mut allowance = None;
    for b in grants {
        if allowance_period.is_some() && b.period.as_deref() == allowance_period {
            allowance = Some(if b.expired_at(now) { 0 } else { b.remaining });
        }
        if b.remaining <= 0 || b.expired_at(now) {
            continue;
        }
        let e = by_source.entry(b.source).or_insert(0i64);
        *e = e.saturating_add(b.remaining);
        if let Some(at) = b.expires_at {
            next = match next {
                Some((t, n)) if t == at => Some((t, n.saturating_add(b.remaining))),
                Some((t, n)) if t < at => Some((t, n)),
                _ => Some((at, b.remaining)),
            };
        }
    }
    (by_source, next, allowance)
}

/// What one hold took from one bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draw {
    /// The hold.
    pub hold_id: String,
    /// Order of the draw within the hold (consumption order).
    pub seq: i32,
    /// The bucket.
    pub grant_id: String,
    /// Credits held from the bucket when the hold was created (0 for a commit's extra draw).
    pub held: i64,
    /// Credits of this draw charged by the commit.
    pub consumed: i64,
    /// Credits of `consumed` given back by refunds.
    pub refunded: i64,
}

/// A ledger line written by an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEntry {
    /// The hold involved.
    pub hold_id: Option<String>,
    /// The bucket involved.
    pub grant_id: Option<String>,
    /// What happened.
    pub kind: EntryKind,
    /// Change to available.
    pub available_delta: i64,
    /// Change to held.
    pub held_delta: i64,
    /// Change to debt.
    pub debt_delta: i64,
    /// Free text.
    pub reason: String,
}

/// What an operation changed, for storage to write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Buckets updated.
    pub grants: BTreeSet<String>,
    /// Buckets created.
    pub new_grants: BTreeSet<String>,
    /// Holds updated.
    pub holds: BTreeSet<String>,
    /// Holds created.
    pub new_holds: BTreeSet<String>,
    /// Draws updated, by (hold, seq).
    pub draws: BTreeSet<(String, i32)>,
    /// Draws created.
    pub new_draws: BTreeSet<(String, i32)>,
    /// Account columns changed.
    pub account: bool,
}

impl Dirty {
    /// Whether anything of the book changed: its account row must then be written too, even
    /// with the same values, so that a concurrent reader can tell from that row alone that the
    /// account's grants or holds moved (an ExtendHold changes a hold and no balance).
    #[must_use]
    pub fn any(&self) -> bool {
        self.account
            || !self.grants.is_empty()
            || !self.new_grants.is_empty()
            || !self.holds.is_empty()
            || !self.new_holds.is_empty()
            || !self.draws.is_empty()
            || !self.new_draws.is_empty()
    }
}

/// A slice of credits moved between accounts, keeping its source and expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Source of the credits.
    pub source: Source,
    /// Their expiry.
    pub expires_at: Option<DateTime<Utc>>,
    /// How many.
    pub amount: i64,
}

/// Makes ids for rows an operation creates (storage: random UUIDv7; the model: a counter).
pub trait Ids {
    /// A new grant id.
    fn grant_id(&mut self) -> String;
    /// A new event id (the `webhook-id`): by default derived from a new grant id.
    fn event_id(&mut self) -> String {
        let g = self.grant_id();
        format!("evt_{}", g.strip_prefix("grt_").unwrap_or(&g))
    }
}

/// One account's state as an operation sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Book {
    /// The account.
    pub account_id: String,
    /// Its plan.
    pub plan: String,
    /// The last allowance period granted.
    pub allowance_period: Option<String>,
    /// Sum of `remaining` over the grants.
    pub available: i64,
    /// Sum of `held` over the grants (= amounts of open holds).
    pub held: i64,
    /// Credits owed after a claw-back larger than the balance. Incoming credits pay it off
    /// first, and while it is positive no grant has credits left to reserve.
    pub debt: i64,
    /// Buckets with credits in them, and any others an operation needs.
    pub grants: BTreeMap<String, Grant>,
    /// Holds an operation needs (its target, and open holds past their expiry).
    pub holds: BTreeMap<String, Hold>,
    /// Draws of the loaded holds, by (hold, seq).
    pub draws: BTreeMap<(String, i32), Draw>,
    /// Entries written by this operation, in order.
    pub entries: Vec<NewEntry>,
    /// What this operation changed.
    pub dirty: Dirty,
    /// This operation created the account (`account.opened`).
    pub opened: bool,
    /// The business fact (a purchase's or an invoice's key) this operation books, named in
    /// its events.
    pub fact: Option<String>,
}

type Res<T> = Result<T, LedgerError>;

impl Book {
    /// A new, empty account.
    #[must_use]
    pub fn new(account_id: &str, plan: &str) -> Self {
        Self {
            account_id: account_id.to_owned(),
            plan: plan.to_owned(),
            allowance_period: None,
            available: 0,
            held: 0,
            debt: 0,
            grants: BTreeMap::new(),
            holds: BTreeMap::new(),
            draws: BTreeMap::new(),
            entries: Vec::new(),
            dirty: Dirty::default(),
            opened: false,
            fact: None,
        }
    }

    /// The book as the next load of its account would find it, once this operation's changes
    /// are stored: no entries or dirty marks, only open holds and their draws, and only grants
    /// with credits left or held plus the current allowance period's. (A load returns those,
    /// and more only when a command names a resolved hold: a book kept between commands keeps
    /// exactly what every command needs.)
    pub fn trim_to_loaded(&mut self) {
        // New, empty collections rather than cleared ones: an emptied map keeps its node (a
        // B-tree leaf has room for 11 entries), and a book kept in memory should cost what it
        // holds.
        self.entries = Vec::new();
        self.dirty = Dirty::default();
        self.opened = false;
        self.fact = None;
        self.holds.retain(|_, h| h.state == HoldState::Open);
        if self.holds.is_empty() {
            self.holds = BTreeMap::new();
        }
        let holds = &self.holds;
        self.draws.retain(|(hold, _), _| holds.contains_key(hold));
        if self.draws.is_empty() {
            self.draws = BTreeMap::new();
        }
        let period = self.allowance_period.as_deref();
        self.grants.retain(|_, g| {
            g.remaining > 0 || g.held > 0 || (g.period.is_some() && g.period.as_deref() == period)
        });
    }

    /// Appends an entry and applies it to the balance columns: the only way they change.
    fn entry(
        &mut self,
        kind: EntryKind,
        hold: Option<&str>,
        bucket: Option<&str>,
        deltas: (i64, i64),
        reason: &str,
    ) {
        let (available_delta, held_delta) = deltas;
        if available_delta == 0 && held_delta == 0 {
            return;
        }
        self.available = self.available.saturating_add(available_delta);
        self.held = self.held.saturating_add(held_delta);
        self.dirty.account = true;
        self.entries.push(NewEntry {
            hold_id: hold.map(str::to_owned),
            grant_id: bucket.map(str::to_owned),
            kind,
            available_delta,
            held_delta,
            debt_delta: 0,
            reason: reason.to_owned(),
        });
    }

    /// Available credits net of debt: what callers see (negative while in debt).
    #[must_use]
    pub fn net_available(&self) -> i64 {
        self.available.saturating_sub(self.debt)
    }

    /// Takes credits back (a refunded or disputed payment): from the grants in consumption
    /// order, and what they cannot cover becomes debt. Returns the debt added.
    pub fn claw_back(&mut self, amount: i64, reason: &str, now: DateTime<Utc>) -> i64 {
        let usable: i64 = self
            .usable(now)
            .iter()
            .map(|b| b.remaining)
            .fold(0i64, i64::saturating_add);
        let from_grants = amount.min(usable);
        if from_grants > 0 {
            // `take` cannot fail for at most what is usable.
            let _ = self.take(from_grants, EntryKind::Clawback, reason, now);
        }
        let owed = amount.saturating_sub(from_grants);
        if owed > 0 {
            self.debt = self.debt.saturating_add(owed);
            self.dirty.account = true;
            self.entries.push(NewEntry {
                hold_id: None,
                grant_id: None,
                kind: EntryKind::Clawback,
                available_delta: 0,
                held_delta: 0,
                debt_delta: owed,
                reason: reason.to_owned(),
            });
        }
        owed
    }

    /// Pays debt from the grants' available credits (called after credits come in).
    fn pay_debt(&mut self, now: DateTime<Utc>) {
        if self.debt <= 0 {
            return;
        }
        let mut left = self.debt;
        let mut plan: Vec<(String, i64)> = Vec::new();
        for b in self.usable(now) {
            if left == 0 {
                break;
            }
            let x = left.min(b.remaining);
            left = left.saturating_sub(x);
            plan.push((b.grant_id.clone(), x));
        }
        for (id, x) in plan {
            if let Ok(b) = self.bucket_mut(&id) {
                b.remaining = b.remaining.saturating_sub(x);
            }
            self.available = self.available.saturating_sub(x);
            self.debt = self.debt.saturating_sub(x);
            self.dirty.account = true;
            self.entries.push(NewEntry {
                hold_id: None,
                grant_id: Some(id),
                kind: EntryKind::DebtPayment,
                available_delta: x.saturating_neg(),
                held_delta: 0,
                debt_delta: x.saturating_neg(),
                reason: String::new(),
            });
        }
    }

    fn bucket_mut(&mut self, id: &str) -> Res<&mut Grant> {
        if !self.dirty.new_grants.contains(id) {
            self.dirty.grants.insert(id.to_owned());
        }
        // A draw always names a loaded bucket; a missing one is a corrupt book.
        self.grants.get_mut(id).ok_or(LedgerError::HoldNotFound)
    }

    fn hold_mut(&mut self, id: &str) -> Res<&mut Hold> {
        if !self.dirty.new_holds.contains(id) {
            self.dirty.holds.insert(id.to_owned());
        }
        self.holds.get_mut(id).ok_or(LedgerError::HoldNotFound)
    }

    fn draw_mut(&mut self, key: &(String, i32)) -> Res<&mut Draw> {
        if !self.dirty.new_draws.contains(key) {
            self.dirty.draws.insert(key.clone());
        }
        self.draws.get_mut(key).ok_or(LedgerError::HoldNotFound)
    }

    fn draws_of(&self, hold_id: &str) -> Vec<(String, i32)> {
        self.draws
            .keys()
            .filter(|(h, _)| h == hold_id)
            .cloned()
            .collect()
    }

    fn next_seq(&self, hold_id: &str) -> i32 {
        self.draws
            .keys()
            .filter(|(h, _)| h == hold_id)
            .map(|(_, s)| *s)
            .max()
            .map_or(0, |s| s.saturating_add(1))
    }

    /// Puts credits back into a bucket; if it has expired, they expire at once.
    fn return_to_bucket(
        &mut self,
        grant_id: &str,
        amount: i64,
        hold: Option<&str>,
        now: DateTime<Utc>,
    ) -> Res<()> {
        let b = self.bucket_mut(grant_id)?;
        if b.expired_at(now) {
            b.expired = b.expired.saturating_add(amount);
            self.entry(
                EntryKind::Expiration,
                hold,
                Some(grant_id),
                (amount.saturating_neg(), 0),
                "",
            );
        } else {
            b.remaining = b.remaining.saturating_add(amount);
        }
        Ok(())
    }

    /// Buckets usable at `now`, in consumption order.
    fn usable(&self, now: DateTime<Utc>) -> Vec<&Grant> {
        let mut v: Vec<&Grant> = self
            .grants
            .values()
            .filter(|b| b.remaining > 0 && !b.expired_at(now))
            .collect();
        v.sort_by(|a, b| consumption_order(a, b));
        v
    }

    /// Which grants `amount` would come from, in consumption order.
    ///
    /// # Errors
    /// `InsufficientCredits` when the usable grants hold less.
    pub fn plan_draw(&self, amount: i64, now: DateTime<Utc>) -> Res<Vec<(String, i64)>> {
        let mut left = amount;
        let mut out = Vec::new();
        for b in self.usable(now) {
            if left == 0 {
                break;
            }
            let take = left.min(b.remaining);
            out.push((b.grant_id.clone(), take));
            left = left.saturating_sub(take);
        }
        if left > 0 {
            let available = self
                .usable(now)
                .iter()
                .map(|b| b.remaining)
                .fold(0i64, i64::saturating_add);
            return Err(LedgerError::InsufficientCredits {
                available: available.saturating_sub(self.debt),
                requested: amount,
            });
        }
        Ok(out)
    }

    /// Applies what time has done: open holds past expiry are expired, grants past expiry
    /// lose their remaining credits, and a new allowance period grants its allowance (once).
    ///
    /// # Errors
    /// Only on a corrupt book (a draw naming a bucket that was not loaded).
    pub fn settle(
        &mut self,
        now: DateTime<Utc>,
        allowance: Option<&Allowance>,
        ids: &mut dyn Ids,
    ) -> Res<()> {
        let due: Vec<String> = self
            .holds
            .values()
            .filter(|h| h.state == HoldState::Open && h.expires_at <= now)
            .map(|h| h.hold_id.clone())
            .collect();
        for id in due {
            self.release(&id, EntryKind::Expire, "", now)?;
        }
        let expiring: Vec<String> = self
            .grants
            .values()
            .filter(|b| b.remaining > 0 && b.expired_at(now))
            .map(|b| b.grant_id.clone())
            .collect();
        for id in expiring {
            let b = self.bucket_mut(&id)?;
            let amount = b.remaining;
            b.remaining = 0;
            b.expired = b.expired.saturating_add(amount);
            self.entry(
                EntryKind::Expiration,
                None,
                Some(&id),
                (amount.saturating_neg(), 0),
                "",
            );
        }
        if let Some(a) = allowance {
            self.grant_allowance(a, now, ids)?;
        }
        self.pay_debt(now);
        Ok(())
    }

    /// Books what a Stripe fact decided ([`super::payment::Decision`]): the grant `(source,
    /// amount, expiry)`, then `claw` credits taken back (positive; debt for what the grants
    /// cannot cover) or given back (negative: a `refund` grant). Returns the grant's id.
    ///
    /// # Errors
    /// `BalanceLimitExceeded`.
    pub fn book_decision(
        &mut self,
        grant: Option<(Source, Credits, Option<DateTime<Utc>>)>,
        claw: i64,
        reason: &str,
        now: DateTime<Utc>,
        ids: &mut dyn Ids,
    ) -> Res<Option<String>> {
        let granted = match grant {
            Some((source, amount, expires_at)) => {
                let id = ids.grant_id();
                self.grant(
                    &id,
                    source,
                    amount,
                    expires_at,
                    PRIORITY_DEFAULT,
                    reason,
                    now,
                )?;
                Some(id)
            }
            None => None,
        };
        if claw > 0 {
            self.claw_back(claw, reason, now);
        } else if claw < 0 {
            let back = Credits::new("credits", claw.saturating_neg())
                .map_err(|_| LedgerError::BalanceLimitExceeded { limit: MAX_BALANCE })?;
            let id = ids.grant_id();
            self.grant(
                &id,
                Source::Refund,
                back,
                None,
                PRIORITY_DEFAULT,
                reason,
                now,
            )?;
        }
        Ok(granted)
    }

    /// Moves the book to another plan, settled under its old plan first by the caller: the new
    /// plan's allowance is granted at once if its current period has none yet. An account gets
    /// at most one allowance per period key (`daily:2026-12-07`, `monthly:2026-12`), whatever
    /// plans it moves between: the caller loads the grants of the keys current at `now`
    /// ([`super::plan::period_keys_at`]), and one already granted counts as this period's.
    /// Returns the previous plan.
    ///
    /// # Errors
    /// Only on a corrupt book.
    pub fn switch_plan(
        &mut self,
        plan: &str,
        allowance: Option<&Allowance>,
        now: DateTime<Utc>,
        ids: &mut dyn Ids,
    ) -> Res<String> {
        let previous = std::mem::replace(&mut self.plan, plan.to_owned());
        self.dirty.account = true;
        if let Some(a) = allowance {
            self.grant_allowance(a, now, ids)?;
        }
        Ok(previous)
    }

    fn grant_allowance(&mut self, a: &Allowance, now: DateTime<Utc>, ids: &mut dyn Ids) -> Res<()> {
        let (key, end) = period_at(a.period, now);
        if self.allowance_period.as_deref() == Some(key.as_str()) {
            return Ok(());
        }
        // Granted already this period, under another plan of the same period kind (the
        // account left and came back): that grant is this period's.
        if self
            .grants
            .values()
            .any(|b| b.period.as_deref() == Some(key.as_str()))
        {
            self.allowance_period = Some(key);
            self.dirty.account = true;
            return Ok(());
        }
        // Only the period right before this one rolls over.
        let previous = previous_period(a.period, now);
        let carry = match a.rollover {
            Rollover::None => 0,
            Rollover::Capped(cap) => self
                .grants
                .values()
                .find(|b| {
                    b.period.as_deref() == Some(previous.as_str())
                        && self.allowance_period.as_deref() == Some(previous.as_str())
                })
                .map_or(0, |b| b.expired.min(cap)),
        };
        // An allowance never takes the balance past the limit: it is capped to the room left,
        // and skipped (the period counted as granted) when there is none, so an account at the
        // limit keeps working.
        let room = MAX_BALANCE.saturating_sub(self.available.saturating_add(self.held));
        let wanted = a.amount.saturating_add(carry);
        let amount = wanted.min(room);
        if amount <= 0 {
            self.allowance_period = Some(key);
            self.dirty.account = true;
            return Ok(());
        }
        let rolled = if carry > 0 {
            format!(" (+{carry} rolled over)")
        } else {
            String::new()
        };
        let capped = if amount < wanted {
            format!(" (capped at the balance limit: {amount} of {wanted})")
        } else {
            String::new()
        };
        let reason = format!("allowance {key}{rolled}{capped}");
        let id = ids.grant_id();
        self.add_bucket(
            &id,
            Source::Allowance,
            amount,
            Some(end),
            PRIORITY_DEFAULT,
            Some(key.clone()),
            &reason,
            now,
            EntryKind::Grant,
        )?;
        self.allowance_period = Some(key);
        self.dirty.account = true;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn add_bucket(
        &mut self,
        id: &str,
        source: Source,
        amount: i64,
        expires_at: Option<DateTime<Utc>>,
        priority: i32,
        period: Option<String>,
        reason: &str,
        now: DateTime<Utc>,
        kind: EntryKind,
    ) -> Res<()> {
        match self.available.saturating_add(self.held).checked_add(amount) {
            Some(total) if total <= MAX_BALANCE => {}
            _ => return Err(LedgerError::BalanceLimitExceeded { limit: MAX_BALANCE }),
        }
        self.grants.insert(
            id.to_owned(),
            Grant {
                grant_id: id.to_owned(),
                account_id: self.account_id.clone(),
                source,
                granted: amount,
                remaining: amount,
                held: 0,
                expired: 0,
                expires_at,
                priority,
                period,
                reason: reason.to_owned(),
                created_at: now,
            },
        );
        self.dirty.new_grants.insert(id.to_owned());
        self.entry(kind, None, Some(id), (amount, 0), reason);
        self.pay_debt(now);
        Ok(())
    }

    /// Adds a grant.
    ///
    /// # Errors
    /// `BalanceLimitExceeded`.
    #[allow(clippy::too_many_arguments)]
    pub fn grant(
        &mut self,
        grant_id: &str,
        source: Source,
        amount: Credits,
        expires_at: Option<DateTime<Utc>>,
        priority: i32,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Res<GrantOutcome> {
        self.add_bucket(
            grant_id,
            source,
            amount.get(),
            expires_at,
            priority,
            None,
            reason,
            now,
            EntryKind::Grant,
        )?;
        Ok(GrantOutcome {
            account_id: self.account_id.clone(),
            grant_id: grant_id.to_owned(),
            available: self.net_available(),
        })
    }

    /// Creates a hold drawn from the grants in consumption order.
    ///
    /// # Errors
    /// `InsufficientCredits`.
    pub fn reserve(
        &mut self,
        hold_id: &str,
        amount: Credits,
        ttl: TimeDelta,
        metadata: Metadata,
        now: DateTime<Utc>,
    ) -> Res<ReserveOutcome> {
        let draws = self.plan_draw(amount.get(), now)?;
        for (seq, (grant_id, take)) in draws.into_iter().enumerate() {
            let b = self.bucket_mut(&grant_id)?;
            b.remaining = b.remaining.saturating_sub(take);
            b.held = b.held.saturating_add(take);
            let key = (hold_id.to_owned(), i32::try_from(seq).unwrap_or(i32::MAX));
            self.draws.insert(
                key.clone(),
                Draw {
                    hold_id: hold_id.to_owned(),
                    seq: key.1,
                    grant_id,
                    held: take,
                    consumed: 0,
                    refunded: 0,
                },
            );
            self.dirty.new_draws.insert(key);
        }
        let hold = Hold {
            hold_id: hold_id.to_owned(),
            account_id: self.account_id.clone(),
            amount: amount.get(),
            state: HoldState::Open,
            committed_amount: 0,
            refunded_amount: 0,
            created_at: now,
            expires_at: now.checked_add_signed(ttl).unwrap_or(now),
            resolved_at: None,
            metadata,
        };
        self.holds.insert(hold_id.to_owned(), hold.clone());
        self.dirty.new_holds.insert(hold_id.to_owned());
        self.entry(
            EntryKind::Reserve,
            Some(hold_id),
            None,
            (amount.get().saturating_neg(), amount.get()),
            "",
        );
        Ok(ReserveOutcome {
            hold,
            available: self.net_available(),
        })
    }

    fn loaded_hold(&self, hold_id: &str) -> Res<Hold> {
        self.holds
            .get(hold_id)
            .cloned()
            .ok_or(LedgerError::HoldNotFound)
    }

    /// Releases an open hold's draws back into their grants (a refund before commit, or
    /// expiry), resolving it with `kind`.
    fn release(
        &mut self,
        hold_id: &str,
        kind: EntryKind,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Res<Hold> {
        let amount = self.loaded_hold(hold_id)?.amount;
        self.entry(
            kind,
            Some(hold_id),
            None,
            (amount, amount.saturating_neg()),
            reason,
        );
        for key in self.draws_of(hold_id) {
            let (grant_id, held) = {
                let d = self.draws.get(&key).ok_or(LedgerError::HoldNotFound)?;
                (d.grant_id.clone(), d.held)
            };
            let b = self.bucket_mut(&grant_id)?;
            b.held = b.held.saturating_sub(held);
            self.return_to_bucket(&grant_id, held, Some(hold_id), now)?;
        }
        let h = self.hold_mut(hold_id)?;
        if kind == EntryKind::Expire {
            h.state = HoldState::Expired;
            h.resolved_at = Some(h.expires_at);
        } else {
            h.state = HoldState::Released;
            h.resolved_at = Some(now);
        }
        Ok(h.clone())
    }

    /// Settles a hold with what the job cost.
    ///
    /// # Errors
    /// `HoldNotFound`, the not-open refusals, `InsufficientCredits` for an extra the grants
    /// cannot cover (nothing changes then).
    pub fn commit_hold(
        &mut self,
        hold_id: &str,
        amount: Credits,
        now: DateTime<Utc>,
    ) -> Res<CommitOutcome> {
        let hold = self.loaded_hold(hold_id)?;
        let plan = rules::plan_commit(&hold, amount, now)?;
        let extra = if plan.extra_drawn > 0 {
            self.plan_draw(plan.extra_drawn, now).map_err(|e| match e {
                LedgerError::InsufficientCredits { available, .. } => {
                    LedgerError::InsufficientCredits {
                        available,
                        requested: plan.extra_drawn,
                    }
                }
                other => other,
            })?
        } else {
            Vec::new()
        };
        // From here on the commit succeeds.
        self.entry(
            EntryKind::Commit,
            Some(hold_id),
            None,
            (plan.available_delta(), plan.held.saturating_neg()),
            "",
        );
        let mut left = plan.committed.min(plan.held);
        let mut keys = self.draws_of(hold_id);
        keys.sort_by_key(|(_, s)| *s);
        for key in keys {
            let d = self.draw_mut(&key)?;
            let consumed = left.min(d.held);
            d.consumed = consumed;
            left = left.saturating_sub(consumed);
            let (grant_id, drawn) = (d.grant_id.clone(), d.held);
            let b = self.bucket_mut(&grant_id)?;
            b.held = b.held.saturating_sub(drawn);
            let back = drawn.saturating_sub(consumed);
            if back > 0 {
                self.return_to_bucket(&grant_id, back, Some(hold_id), now)?;
            }
        }
        let mut seq = self.next_seq(hold_id);
        for (grant_id, take) in extra {
            let b = self.bucket_mut(&grant_id)?;
            b.remaining = b.remaining.saturating_sub(take);
            let key = (hold_id.to_owned(), seq);
            self.draws.insert(
                key.clone(),
                Draw {
                    hold_id: hold_id.to_owned(),
                    seq,
                    grant_id,
                    held: 0,
                    consumed: take,
                    refunded: 0,
                },
            );
            self.dirty.new_draws.insert(key);
            seq = seq.saturating_add(1);
        }
        self.pay_debt(now);
        let h = self.hold_mut(hold_id)?;
        h.state = HoldState::Committed;
        h.committed_amount = plan.committed;
        h.resolved_at = Some(now);
        let hold = h.clone();
        Ok(CommitOutcome {
            hold,
            released: plan.released,
            extra_drawn: plan.extra_drawn,
            available: self.net_available(),
        })
    }

    /// Releases an open hold, or returns committed credits to the grants they came from
    /// (latest-consumed first).
    ///
    /// # Errors
    /// `HoldNotFound` and the refusals of [`rules::plan_refund`]; `BalanceLimitExceeded`.
    pub fn refund(
        &mut self,
        hold_id: &str,
        amount: Option<Credits>,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Res<RefundOutcome> {
        let hold = self.loaded_hold(hold_id)?;
        let plan = rules::plan_refund(&hold, amount, now)?;
        let hold = match plan {
            RefundPlan::Release { .. } => self.release(hold_id, EntryKind::Release, reason, now)?,
            RefundPlan::Return { amount } => {
                rules::check_grant(
                    self.available.saturating_add(self.held),
                    Credits::new("amount", amount).map_err(|_| LedgerError::HoldNotFound)?,
                )?;
                self.entry(EntryKind::Refund, Some(hold_id), None, (amount, 0), reason);
                let mut left = amount;
                let mut keys = self.draws_of(hold_id);
                keys.sort_by_key(|(_, s)| std::cmp::Reverse(*s));
                for key in keys {
                    if left == 0 {
                        break;
                    }
                    let d = self.draw_mut(&key)?;
                    let take = left.min(d.consumed.saturating_sub(d.refunded));
                    if take == 0 {
                        continue;
                    }
                    d.refunded = d.refunded.saturating_add(take);
                    left = left.saturating_sub(take);
                    let grant_id = d.grant_id.clone();
                    self.return_to_bucket(&grant_id, take, Some(hold_id), now)?;
                }
                let h = self.hold_mut(hold_id)?;
                h.refunded_amount = h.refunded_amount.saturating_add(amount);
                h.clone()
            }
        };
        self.pay_debt(now);
        Ok(RefundOutcome {
            hold,
            refunded: plan.amount(),
            available: self.net_available(),
        })
    }

    /// Moves an open hold's expiry to `now + ttl`.
    ///
    /// # Errors
    /// `HoldNotFound` and the not-open refusals.
    pub fn extend_hold(
        &mut self,
        hold_id: &str,
        ttl: TimeDelta,
        now: DateTime<Utc>,
    ) -> Res<ExtendOutcome> {
        let hold = self.loaded_hold(hold_id)?;
        rules::check_extend(&hold, now)?;
        let h = self.hold_mut(hold_id)?;
        h.expires_at = now.checked_add_signed(ttl).unwrap_or(now);
        Ok(ExtendOutcome { hold: h.clone() })
    }

    /// Takes `amount` from the usable grants in consumption order, one entry of `kind` per
    /// bucket touched, and returns the pieces (source, expiry, amount) taken.
    ///
    /// # Errors
    /// `InsufficientCredits`.
    pub fn take(
        &mut self,
        amount: i64,
        kind: EntryKind,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Res<Vec<Piece>> {
        let draws = self.plan_draw(amount, now)?;
        let mut pieces = Vec::new();
        for (grant_id, take) in draws {
            let b = self.bucket_mut(&grant_id)?;
            b.remaining = b.remaining.saturating_sub(take);
            pieces.push(Piece {
                source: b.source,
                expires_at: b.expires_at,
                amount: take,
            });
            self.entry(
                kind,
                None,
                Some(&grant_id),
                (take.saturating_neg(), 0),
                reason,
            );
        }
        Ok(pieces)
    }

    /// Adds credits as new grants (one per piece) with an entry of `kind` each.
    ///
    /// # Errors
    /// `BalanceLimitExceeded`.
    pub fn give(
        &mut self,
        pieces: &[Piece],
        kind: EntryKind,
        reason: &str,
        now: DateTime<Utc>,
        ids: &mut dyn Ids,
    ) -> Res<()> {
        for p in pieces {
            let id = ids.grant_id();
            self.add_bucket(
                &id,
                p.source,
                p.amount,
                p.expires_at,
                PRIORITY_DEFAULT,
                None,
                reason,
                now,
                kind,
            )?;
        }
        Ok(())
    }

    /// An operator's signed correction: a new `adjustment` grant for a positive delta; for a
    /// negative one, credits taken from the grants in consumption order.
    ///
    /// # Errors
    /// `InsufficientCredits` (a correction never takes the balance negative),
    /// `BalanceLimitExceeded`.
    pub fn adjust(
        &mut self,
        delta: i64,
        reason: &str,
        now: DateTime<Utc>,
        ids: &mut dyn Ids,
    ) -> Res<()> {
        if delta > 0 {
            let id = ids.grant_id();
            self.add_bucket(
                &id,
                Source::Adjustment,
                delta,
                None,
                PRIORITY_DEFAULT,
                None,
                reason,
                now,
                EntryKind::Adjustment,
            )
        } else {
            self.take(delta.saturating_neg(), EntryKind::Adjustment, reason, now)
                .map(|_| ())
        }
    }

    /// Checks the book's own invariants (sums of grants and draws).
    ///
    /// # Errors
    /// A description of the first violation.
    pub fn check(&self) -> Result<(), String> {
        if self.debt < 0 || (self.debt > 0 && self.available > 0) {
            return Err(format!(
                "{}: debt {} while {} credits are available",
                self.account_id, self.debt, self.available
            ));
        }
        let remaining = self
            .grants
            .values()
            .map(|b| b.remaining)
            .fold(0i64, i64::saturating_add);
        let held = self
            .grants
            .values()
            .map(|b| b.held)
            .fold(0i64, i64::saturating_add);
        if (remaining, held) != (self.available, self.held) {
            return Err(format!(
                "{}: buckets hold ({remaining}, {held}), columns say ({}, {})",
                self.account_id, self.available, self.held
            ));
        }
        for b in self.grants.values() {
            if b.remaining < 0 || b.held < 0 || b.expired < 0 {
                return Err(format!("{}: negative bucket {b:?}", b.grant_id));
            }
        }
        for h in self.holds.values() {
            let draws: Vec<&Draw> = self
                .draws
                .values()
                .filter(|d| d.hold_id == h.hold_id)
                .collect();
            let held: i64 = draws.iter().map(|d| d.held).sum();
            let consumed: i64 = draws.iter().map(|d| d.consumed).sum();
            let refunded: i64 = draws.iter().map(|d| d.refunded).sum();
            if held != h.amount {
                return Err(format!("{}: draws hold {held} of {}", h.hold_id, h.amount));
            }
            if h.state == HoldState::Committed
                && (consumed, refunded) != (h.committed_amount, h.refunded_amount)
            {
                return Err(format!(
                    "{}: draws consumed {consumed} refunded {refunded}, hold says {} {}",
                    h.hold_id, h.committed_amount, h.refunded_amount
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod plan_switch_tests {
    use super::*;
    use crate::domain::plan::{Period, Policy, period_at};
    use chrono::TimeZone;
    use proptest::prelude::*;

    struct Seq(u64);

    impl Ids for Seq {
        fn grant_id(&mut self) -> String {
            self.0 = self.0.saturating_add(1);
            format!("grt_{:04}", self.0)
        }
    }

    fn policy() -> Policy {
        let a = |amount, period| Allowance {
            amount,
            period,
            rollover: Rollover::Capped(3),
        };
        Policy {
            allowances: [
                ("free".to_owned(), a(5, Period::Daily)),
                ("team".to_owned(), a(7, Period::Daily)),
                ("monthly".to_owned(), a(100, Period::Monthly)),
            ]
            .into_iter()
            .collect(),
            ..Policy::default()
        }
    }

    proptest! {
        /// Random plan switches interleaved with time: one allowance grant per period key at
        /// most, the current plan's current period always has its allowance, books add up.
        #[test]
        fn plan_switches_give_one_allowance_per_period_key(
            ops in proptest::collection::vec((0usize..4, 0i64..40), 1..40),
        ) {
            let plans = ["free", "team", "monthly", "none"];
            let p = policy();
            let mut now = Utc.with_ymd_and_hms(2026, 11, 29, 22, 0, 0).unwrap();
            let mut book = Book::new("a", "free");
            let mut ids = Seq(0);
            book.settle(now, p.for_plan("free"), &mut ids).unwrap();
            for (plan, hours) in ops {
                now += chrono::TimeDelta::hours(hours);
                book.settle(now, p.for_plan(&book.plan), &mut ids).unwrap();
                book.switch_plan(plans[plan], p.for_plan(plans[plan]), now, &mut ids).unwrap();
                let mut keys: Vec<&str> = book.grants.values().filter_map(|b| b.period.as_deref()).collect();
                let n = keys.len();
                keys.sort_unstable();
                keys.dedup();
                prop_assert_eq!(keys.len(), n, "a period key granted twice");
                if let Some(a) = p.for_plan(&book.plan) {
                    let key = period_at(a.period, now).0;
                    prop_assert!(keys.contains(&key.as_str()), "no allowance for {}", key);
                    prop_assert_eq!(book.allowance_period.as_deref(), Some(key.as_str()));
                }
                book.check().map_err(TestCaseError::fail)?;
            }
        }
    }
}
