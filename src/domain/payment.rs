//! The Stripe fact machine: what one verified Stripe event does to the facts Tally keeps about a
//! payment (its purchase, charges and disputes) and about subscriptions, and which credits move.
//!
//! Pure, like [`super::book::Book`]: storage loads the facts of one payment under a lock that
//! exists whether or not any fact does yet, calls [`Payment::apply`], writes the facts back and
//! books the [`Decision`]; the reference model ([`super::model::Stripe`]) runs the same code.
//!
//! The rule that makes every order of events end in the same books: what a purchase has lost to
//! refunds and disputes is a *function of the facts* ([`Payment::claw_target`]), and each event
//! only moves the purchase from what it has lost so far (`clawed`) to that target. A refund that
//! arrives before its purchase is a fact like any other: the purchase claws it when it lands.
#![allow(clippy::arithmetic_side_effects)] // i128 products of non-negative i64s cannot overflow

use std::cmp::Ordering;

/// Where a purchase stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PurchaseState {
    /// Checkout completed, payment not yet confirmed (asynchronous methods).
    Pending,
    /// The asynchronous payment failed.
    Failed,
    /// Paid: its credits were granted (once).
    Granted,
}

impl PurchaseState {
    /// The stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Failed => "failed",
            Self::Granted => "granted",
        }
    }

    /// Parses a stored name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "failed" => Some(Self::Failed),
            "granted" => Some(Self::Granted),
            _ => None,
        }
    }
}

/// A purchase: one paid Checkout Session of a pack (`checkout_session:<id>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Purchase {
    /// `checkout_session:cs_...`: one grant per key.
    pub business_key: String,
    /// The account credited (known once paid).
    pub account_id: Option<String>,
    /// Where it stands.
    pub state: PurchaseState,
    /// Credits granted.
    pub credits: i64,
    /// The PaymentIntent that paid it (refunds and disputes name it).
    pub payment_intent: Option<String>,
    /// What was paid, in the currency's minor units (0: unknown).
    pub amount_paid: i64,
    /// Credits taken back so far by refunds and disputes, net of give-backs.
    pub clawed: i64,
    /// The grant that credited it.
    pub grant_id: Option<String>,
}

/// A charge as its refund events describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Charge {
    /// `ch_...`.
    pub charge_id: String,
    /// Its PaymentIntent, when known.
    pub payment_intent: Option<String>,
    /// Its amount (minor units).
    pub amount: i64,
    /// Refunded so far: the highest cumulative `amount_refunded` seen (events may come in any
    /// order; Stripe's refunds only ever grow).
    pub amount_refunded: i64,
}

/// Where a dispute stands, as far as credits go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DisputeStatus {
    /// Opened (an inquiry or a formal dispute): the credits are taken back meanwhile.
    Open,
    /// Lost: the money is gone, so are the credits.
    Lost,
    /// Won, or an inquiry closed without a dispute: the merchant keeps the money, the buyer
    /// gets the credits back.
    Won,
}

impl DisputeStatus {
    /// The status of a dispute object (`status`) or a `charge.dispute.closed`.
    #[must_use]
    pub fn of_stripe(status: &str) -> Self {
        match status {
            "won" | "warning_closed" => Self::Won,
            "lost" => Self::Lost,
            _ => Self::Open,
        }
    }

    /// The stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Lost => "lost",
            Self::Won => "won",
        }
    }

    /// Parses a stored name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "open" => Some(Self::Open),
            "lost" => Some(Self::Lost),
            "won" => Some(Self::Won),
            _ => None,
        }
    }

    /// Whether it takes the credits back.
    #[must_use]
    pub fn takes_back(self) -> bool {
        matches!(self, Self::Open | Self::Lost)
    }

    /// The newer of two states: a closed dispute never reopens (a late `created` after its
    /// `closed` changes nothing).
    #[must_use]
    pub fn merge(self, incoming: Self) -> Self {
        if self == Self::Open { incoming } else { self }
    }
}

/// A dispute (or inquiry) of a charge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispute {
    /// `dp_...`.
    pub dispute_id: String,
    /// The disputed charge.
    pub charge_id: String,
    /// Its PaymentIntent, when the event or a refund of the charge told us.
    pub payment_intent: Option<String>,
    /// The disputed amount (minor units); `None` means the whole charge.
    pub amount: Option<i64>,
    /// Where it stands.
    pub status: DisputeStatus,
}

/// One Stripe fact about a payment, as an event (or the success-page sync) reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fact {
    /// The Checkout Session is paid: grant `credits` to `account_id` once.
    Paid {
        /// The account credited.
        account_id: String,
        /// Credits of the pack.
        credits: i64,
        /// Its PaymentIntent.
        payment_intent: Option<String>,
        /// What was paid (minor units; 0 unknown).
        amount_paid: i64,
    },
    /// Completed but not yet paid (an asynchronous payment method).
    Pending,
    /// The asynchronous payment failed.
    Failed,
    /// A charge's refund state (cumulative).
    Refund(Charge),
    /// A dispute's state.
    Dispute(Dispute),
}

impl Fact {
    /// What a fact names — its PaymentIntent, charge and dispute — by which storage and the
    /// model load the rest of its payment.
    #[must_use]
    pub fn names(&self) -> (Option<&str>, Option<&str>, Option<&str>) {
        match self {
            Self::Paid { payment_intent, .. } => (payment_intent.as_deref(), None, None),
            Self::Pending | Self::Failed => (None, None, None),
            Self::Refund(c) => (c.payment_intent.as_deref(), Some(&c.charge_id), None),
            Self::Dispute(d) => (
                d.payment_intent.as_deref(),
                Some(&d.charge_id),
                Some(&d.dispute_id),
            ),
        }
    }
}

/// What the books must do for one event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Grant the purchase's credits to this account (the first time it is paid).
    pub grant: Option<(String, i64)>,
    /// Take back (positive) or give back (negative) this many credits from the purchase's
    /// account, after the grant.
    pub claw: i64,
}

impl Decision {
    /// Whether credits move.
    #[must_use]
    pub fn moves(&self) -> bool {
        self.grant.is_some() || self.claw != 0
    }
}

/// Everything known about one payment: its purchase (once it landed), its charges and the
/// disputes of those charges. Storage loads it by business key, PaymentIntent or charge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Payment {
    /// The purchase, once any event about it arrived.
    pub purchase: Option<Purchase>,
    /// Charges of its PaymentIntent (normally one).
    pub charges: Vec<Charge>,
    /// Disputes of those charges.
    pub disputes: Vec<Dispute>,
}

/// `credits × part ÷ whole`, rounded down (in the buyer's favour), within `0..=credits`;
/// the whole of `credits` when `whole` is unknown.
fn share(credits: i64, part: i64, whole: i64) -> i64 {
    if whole <= 0 {
        return credits;
    }
    let s = i128::from(credits) * i128::from(part.clamp(0, whole)) / i128::from(whole);
    i64::try_from(s).unwrap_or(credits).clamp(0, credits.max(0))
}

impl Payment {
    /// The PaymentIntent the facts agree on.
    #[must_use]
    pub fn payment_intent(&self) -> Option<&str> {
        self.purchase
            .as_ref()
            .and_then(|p| p.payment_intent.as_deref())
            .or_else(|| {
                self.charges
                    .iter()
                    .find_map(|c| c.payment_intent.as_deref())
            })
            .or_else(|| {
                self.disputes
                    .iter()
                    .find_map(|d| d.payment_intent.as_deref())
            })
    }

    /// Credits the refunds and disputes known so far take back from the purchase: each
    /// charge's refunded share plus each open or lost dispute's share, never more than the
    /// purchase. A refund after an inquiry takes only what the dispute has not; a dispute won
    /// after a refund gives back only what the refund did not take.
    #[must_use]
    pub fn claw_target(&self) -> i64 {
        let Some(p) = self
            .purchase
            .as_ref()
            .filter(|p| p.state == PurchaseState::Granted)
        else {
            return 0;
        };
        let refunded = self
            .charges
            .iter()
            .map(|c| share(p.credits, c.amount_refunded, c.amount))
            .fold(0i64, i64::saturating_add);
        let disputed = self
            .disputes
            .iter()
            .filter(|d| d.status.takes_back())
            .map(|d| {
                d.amount
                    .map_or(p.credits, |a| share(p.credits, a, p.amount_paid))
            })
            .fold(0i64, i64::saturating_add);
        refunded.saturating_add(disputed).clamp(0, p.credits.max(0))
    }

    /// Applies one fact: merges it into what is known and decides what credits move. The
    /// same fact twice decides nothing the second time; any order of the same facts ends in
    /// the same state and the same net credits.
    pub fn apply(&mut self, business_key: Option<&str>, fact: Fact) -> Decision {
        let mut decision = Decision::default();
        match fact {
            Fact::Paid {
                account_id,
                credits,
                payment_intent,
                amount_paid,
            } => {
                let key = business_key.unwrap_or_default().to_owned();
                let p = self.purchase.get_or_insert(Purchase {
                    business_key: key,
                    account_id: None,
                    state: PurchaseState::Pending,
                    credits: 0,
                    payment_intent: None,
                    amount_paid: 0,
                    clawed: 0,
                    grant_id: None,
                });
                if p.state == PurchaseState::Granted {
                    // What an earlier report did not know (the success-page sync may land
                    // first with less): fill it in, the credits stay.
                    if p.amount_paid == 0 {
                        p.amount_paid = amount_paid.max(0);
                    }
                    if p.payment_intent.is_none() {
                        p.payment_intent = payment_intent;
                    }
                } else {
                    p.state = PurchaseState::Granted;
                    p.account_id = Some(account_id.clone());
                    p.credits = credits.max(0);
                    p.payment_intent = payment_intent.or_else(|| p.payment_intent.take());
                    p.amount_paid = amount_paid.max(0);
                    p.clawed = 0;
                    decision.grant = Some((account_id, p.credits));
                }
            }
            Fact::Pending | Fact::Failed => {
                let state = if fact == Fact::Pending {
                    PurchaseState::Pending
                } else {
                    PurchaseState::Failed
                };
                match &mut self.purchase {
                    // A granted purchase stays granted: a late `async_payment_failed` (or a
                    // stale `completed … unpaid`) does not undo it.
                    Some(p) if p.state == PurchaseState::Granted => {}
                    // Failed is final for an unpaid session; pending never overwrites it.
                    Some(p) if p.state == PurchaseState::Failed => {}
                    Some(p) => p.state = state,
                    None => {
                        self.purchase = Some(Purchase {
                            business_key: business_key.unwrap_or_default().to_owned(),
                            account_id: None,
                            state,
                            credits: 0,
                            payment_intent: None,
                            amount_paid: 0,
                            clawed: 0,
                            grant_id: None,
                        });
                    }
                }
            }
            Fact::Refund(c) => match self.charges.iter_mut().find(|k| k.charge_id == c.charge_id) {
                // A charge reported in other units (a record carried over from before the
                // charge facts, in credits) gives way to the charge's own report, whose
                // cumulative refund includes what the record counted.
                Some(k) if k.amount != c.amount => *k = c,
                Some(k) => {
                    k.amount_refunded = k.amount_refunded.max(c.amount_refunded);
                    if k.payment_intent.is_none() {
                        k.payment_intent = c.payment_intent;
                    }
                }
                None => self.charges.push(c),
            },
            Fact::Dispute(d) => match self
                .disputes
                .iter_mut()
                .find(|k| k.dispute_id == d.dispute_id)
            {
                Some(k) => {
                    k.status = k.status.merge(d.status);
                    if k.amount.is_none() {
                        k.amount = d.amount;
                    }
                    if k.payment_intent.is_none() {
                        k.payment_intent = d.payment_intent;
                    }
                }
                None => self.disputes.push(d),
            },
        }
        self.link();
        if let Some(target) = self
            .purchase
            .as_ref()
            .filter(|p| p.state == PurchaseState::Granted)
            .map(|_| self.claw_target())
            && let Some(p) = self.purchase.as_mut()
        {
            decision.claw = target.saturating_sub(p.clawed);
            p.clawed = target;
        }
        decision
    }

    /// Folds in what the ledger recorded before charges and disputes were facts of their own
    /// (migration 0009): a refund of `charge` that took `refunded` credits, a dispute that took
    /// `disputed` credits (or took and gave back: `given_back`). They count as already clawed,
    /// and become the charge and dispute rows they would be today, so the next event of the
    /// same charge or dispute moves from there instead of taking them again.
    /// Returns false (nothing folded) when the payment has no granted purchase to fold into.
    pub fn fold_legacy(
        &mut self,
        charge: &str,
        refunded: Option<i64>,
        dispute: Option<(&str, i64, bool)>,
    ) -> bool {
        let pi = self.payment_intent().map(str::to_owned);
        let Some(p) = self
            .purchase
            .as_mut()
            .filter(|p| p.state == PurchaseState::Granted)
        else {
            return false;
        };
        if let Some(r) = refunded.filter(|r| *r > 0) {
            p.clawed = p.clawed.saturating_add(r);
            if !self.charges.iter().any(|c| c.charge_id == charge) {
                // In credits: the share it gives is exactly what was taken.
                self.charges.push(Charge {
                    charge_id: charge.to_owned(),
                    payment_intent: pi.clone(),
                    amount: p.credits.max(1),
                    amount_refunded: r,
                });
            }
        }
        if let Some((dispute_id, took, given_back)) = dispute {
            if !given_back {
                p.clawed = p.clawed.saturating_add(took.max(0));
            }
            if !self.disputes.iter().any(|d| d.dispute_id == dispute_id) {
                self.disputes.push(Dispute {
                    dispute_id: dispute_id.to_owned(),
                    charge_id: charge.to_owned(),
                    payment_intent: pi,
                    // The old rule took what the refunds had left.
                    amount: None,
                    status: if given_back {
                        DisputeStatus::Won
                    } else {
                        DisputeStatus::Open
                    },
                });
            }
        }
        true
    }

    /// Fills in the PaymentIntent on charges and disputes that did not name it (older API
    /// versions render disputes with their charge only).
    fn link(&mut self) {
        let Some(pi) = self.payment_intent().map(str::to_owned) else {
            return;
        };
        for c in &mut self.charges {
            c.payment_intent.get_or_insert_with(|| pi.clone());
        }
        for d in &mut self.disputes {
            d.payment_intent.get_or_insert_with(|| pi.clone());
        }
    }
}

/// A subscription's state as one event reports it (before it is matched to an account).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionState {
    /// The customer.
    pub customer: String,
    /// The account, when the subscription carries it (metadata from Tally's Checkout).
    pub account_hint: Option<String>,
    /// `sub_...`.
    pub subscription: String,
    /// Stripe's status (`active`, `past_due`, `canceled`, ...).
    pub status: String,
    /// The plan its price maps to (the default plan when the subscription ended or the price
    /// is not in the catalog).
    pub plan: String,
    /// End of the current period (unix seconds).
    pub period_end: Option<i64>,
    /// Whether it ends at the period's end.
    pub cancel_at_period_end: bool,
    /// The event's `created`, so older states never overwrite newer ones.
    pub as_of: i64,
    /// The subscription's own `created`: the newest live subscription sets the plan.
    pub started: i64,
}

impl SubscriptionState {
    /// The subscription this state describes, for `account`.
    #[must_use]
    pub fn to_subscription(&self, account: String) -> Subscription {
        Subscription {
            subscription_id: self.subscription.clone(),
            account_id: account,
            customer: self.customer.clone(),
            status: self.status.clone(),
            plan: self.plan.clone(),
            period_end: self.period_end,
            cancel_at_period_end: self.cancel_at_period_end,
            as_of: self.as_of,
            started: self.started,
        }
    }
}

/// A subscription as mirrored from its events, one row per subscription id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// `sub_...`.
    pub subscription_id: String,
    /// The account it pays for.
    pub account_id: String,
    /// The customer billed.
    pub customer: String,
    /// Stripe's status.
    pub status: String,
    /// The catalog plan its price sells (the default plan once it ended).
    pub plan: String,
    /// End of the current period (unix s).
    pub period_end: Option<i64>,
    /// Whether it ends at the period's end.
    pub cancel_at_period_end: bool,
    /// `created` of the event that set this state: an older event never overwrites it.
    pub as_of: i64,
    /// When the subscription itself was created (unix s): the newest live one sets the plan.
    pub started: i64,
}

impl Subscription {
    /// Whether it still sells its plan (not ended).
    #[must_use]
    pub fn is_live(&self) -> bool {
        // `incomplete`: the first payment has not gone through; `unpaid`: retries are
        // exhausted. Neither sells the plan.
        matches!(self.status.as_str(), "active" | "trialing" | "past_due")
    }

    /// Takes `incoming` if it is at least as new as what is stored; true if it did. A
    /// subscription stays on the account it was first stored for, whatever a later event names.
    pub fn accept(stored: &mut Option<Self>, incoming: Self) -> bool {
        match stored {
            Some(s) if incoming.as_of < s.as_of => false,
            Some(s) => {
                let account_id = std::mem::take(&mut s.account_id);
                *s = Self {
                    account_id,
                    ..incoming
                };
                true
            }
            None => {
                *stored = Some(incoming);
                true
            }
        }
    }

    /// A failed renewal invoice: past due, if the failure is newer than the stored state.
    pub fn payment_failed(&mut self, as_of: i64) -> bool {
        if as_of <= self.as_of || !self.is_live() {
            return false;
        }
        "past_due".clone_into(&mut self.status);
        self.as_of = as_of;
        true
    }

    /// The plan an account is on given its subscriptions: the newest live one's, else `default`.
    #[must_use]
    pub fn plan_of(subscriptions: &[Self], default: &str) -> String {
        subscriptions
            .iter()
            .filter(|s| s.is_live())
            .max_by(|a, b| newest(a, b))
            .map_or_else(|| default.to_owned(), |s| s.plan.clone())
    }

    /// The one the billing view shows: the newest live one, else the newest.
    #[must_use]
    pub fn current(subscriptions: &[Self]) -> Option<&Self> {
        subscriptions
            .iter()
            .filter(|s| s.is_live())
            .max_by(|a, b| newest(a, b))
            .or_else(|| subscriptions.iter().max_by(|a, b| newest(a, b)))
    }
}

fn newest(a: &Subscription, b: &Subscription) -> Ordering {
    (a.started, a.as_of, &a.subscription_id).cmp(&(b.started, b.as_of, &b.subscription_id))
}

// What the application layer records and applies for one verified Stripe event (plain data:
// the transport parses it, `ledger::stripe` runs it, storage stores its rows).

/// A verified Stripe event as recorded.
#[derive(Clone, Debug)]
pub struct StripeEvent {
    /// `evt_...`.
    pub event_id: String,
    /// Its type.
    pub kind: String,
    /// Test or live mode.
    pub livemode: bool,
    /// Stripe's `created` (unix seconds).
    pub created: Option<i64>,
    /// What we did with it (for operators).
    pub effect: String,
    /// The business fact it concerns (`checkout_session:…`, `invoice:…`, `sub_…`), if any.
    pub business_key: Option<String>,
}

/// A Stripe effect, resolved against the catalog.
#[derive(Clone, Debug)]
pub enum StripeEffect {
    /// Nothing beyond recording the event.
    None,
    /// A fact about a payment: a purchase paid, pending or failed, a refund, a dispute. What
    /// it does is decided by [`Payment::apply`].
    Payment {
        /// `checkout_session:<id>` for facts of a purchase.
        business_key: Option<String>,
        /// The fact.
        fact: Fact,
        /// How a first paid purchase is granted.
        grant: Option<PackGrant>,
        /// Reason on the ledger lines.
        reason: String,
    },
    /// Link an account (created if new) to its Stripe customer.
    Link {
        /// The account.
        account_id: super::AccountId,
        /// The customer.
        customer: String,
    },
    /// Mirror a subscription onto its account if newer than what is stored for it.
    Subscription(SubscriptionState),
    /// Grant a paid subscription invoice's credits once.
    InvoiceGrant {
        /// `invoice:<id>`.
        business_key: String,
        /// The customer billed.
        customer: String,
        /// The account named by the invoice, if any.
        account_hint: Option<super::AccountId>,
        /// Credits.
        amount: super::Credits,
        /// When they expire (end of the period paid for).
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
        /// Reason on the grant.
        reason: String,
    },
    /// A renewal failed: that subscription is past due, if the event is newer than its state.
    PaymentFailed {
        /// `sub_...`.
        subscription: String,
        /// The event's `created`.
        as_of: i64,
    },
}

impl StripeEffect {
    /// The business fact an effect concerns, for the events log: a purchase's or an invoice's
    /// key, a subscription's id, a linked customer.
    #[must_use]
    pub fn business_key(&self) -> Option<&str> {
        match self {
            Self::None => None,
            Self::Payment { business_key, .. } => business_key.as_deref(),
            Self::Link { customer, .. } => Some(customer),
            Self::Subscription(s) => Some(&s.subscription),
            Self::InvoiceGrant { business_key, .. } => Some(business_key),
            Self::PaymentFailed { subscription, .. } => Some(subscription),
        }
    }
}

/// How a paid pack is granted.
#[derive(Clone, Debug)]
pub struct PackGrant {
    /// Source of the grant.
    pub source: super::book::Source,
    /// Lifetime of the credits.
    pub expires_in: Option<chrono::TimeDelta>,
}

/// What recording an event did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StripeRecord {
    /// The event id was recorded before: nothing changed.
    DuplicateEvent,
    /// Recorded, with the credits it moved (none when the fact was already applied through
    /// another event or the sync path).
    Recorded(Moved),
}

/// Credits one Stripe event moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Granted (a purchase or a paid invoice).
    pub granted: i64,
    /// Taken back (refunds and disputes).
    pub clawed: i64,
    /// Given back (a dispute won).
    pub given_back: i64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn paid(credits: i64) -> Fact {
        Fact::Paid {
            account_id: "a".into(),
            credits,
            payment_intent: Some("pi".into()),
            amount_paid: 1000,
        }
    }

    fn refund(refunded: i64) -> Fact {
        Fact::Refund(Charge {
            charge_id: "ch".into(),
            payment_intent: Some("pi".into()),
            amount: 1000,
            amount_refunded: refunded,
        })
    }

    fn dispute(id: &str, status: DisputeStatus, pi: bool) -> Fact {
        Fact::Dispute(Dispute {
            dispute_id: id.into(),
            charge_id: "ch".into(),
            payment_intent: pi.then(|| "pi".into()),
            amount: Some(1000),
            status,
        })
    }

    fn run(facts: &[Fact]) -> (Payment, i64, i64) {
        let mut p = Payment::default();
        let (mut granted, mut clawed) = (0, 0);
        for f in facts {
            let d = p.apply(Some("checkout_session:cs"), f.clone());
            granted += d.grant.map_or(0, |g| g.1);
            clawed += d.claw;
        }
        (p, granted, clawed)
    }

    #[test]
    fn a_refund_after_an_inquiry_takes_only_what_the_dispute_has_not() {
        let (_, g, c) = run(&[
            paid(500),
            dispute("dp", DisputeStatus::Open, true),
            refund(1000),
        ]);
        assert_eq!((g, c), (500, 500));
        // Won afterwards: the refund still holds, nothing comes back.
        let (_, _, c) = run(&[
            paid(500),
            dispute("dp", DisputeStatus::Open, true),
            refund(1000),
            dispute("dp", DisputeStatus::Won, true),
        ]);
        assert_eq!(c, 500);
        let (_, _, c) = run(&[
            paid(500),
            refund(500),
            dispute("dp", DisputeStatus::Open, true),
            dispute("dp", DisputeStatus::Won, true),
        ]);
        assert_eq!(
            c, 250,
            "the won dispute gives back its part, not the refund's"
        );
    }

    #[test]
    fn claw_backs_before_their_purchase_apply_when_it_lands() {
        let (p, g, c) = run(&[refund(500), paid(500)]);
        assert_eq!((g, c, p.purchase.unwrap().clawed), (500, 250, 250));
        let (_, g, c) = run(&[
            dispute("dp", DisputeStatus::Open, false),
            refund(0),
            paid(500),
        ]);
        assert_eq!((g, c), (500, 500), "a dispute named by charge only");
    }

    #[test]
    fn a_closed_dispute_never_reopens_and_failed_never_undoes_a_grant() {
        let (_, _, c) = run(&[
            paid(500),
            dispute("dp", DisputeStatus::Won, true),
            dispute("dp", DisputeStatus::Open, true),
        ]);
        assert_eq!(c, 0);
        let (p, g, _) = run(&[paid(500), Fact::Failed, Fact::Pending, paid(500)]);
        assert_eq!(
            (g, p.purchase.unwrap().state),
            (500, PurchaseState::Granted)
        );
    }

    #[test]
    fn plans_come_from_the_newest_live_subscription() {
        let sub = |id: &str, status: &str, plan: &str, started: i64| Subscription {
            subscription_id: id.into(),
            account_id: "a".into(),
            customer: "c".into(),
            status: status.into(),
            plan: plan.into(),
            period_end: None,
            cancel_at_period_end: false,
            as_of: 1,
            started,
        };
        let subs = [
            sub("sub_old", "canceled", "free", 1),
            sub("sub_new", "active", "pro", 2),
        ];
        assert_eq!(Subscription::plan_of(&subs, "free"), "pro");
        let subs = [
            sub("sub_old", "active", "pro", 1),
            sub("sub_new", "active", "team", 2),
        ];
        assert_eq!(Subscription::plan_of(&subs, "free"), "team");
        let mut s = Some(sub("sub", "active", "pro", 1));
        assert!(!Subscription::accept(
            &mut s,
            sub("sub", "canceled", "free", 1).with_as_of(0)
        ));
        let mut s = s.unwrap();
        assert!(!s.payment_failed(1), "not newer than the stored state");
        assert!(s.payment_failed(2));
        assert_eq!(s.status, "past_due");
    }

    impl Subscription {
        fn with_as_of(mut self, as_of: i64) -> Self {
            self.as_of = as_of;
            self
        }
    }

    fn fact() -> impl Strategy<Value = Fact> {
        prop_oneof![
            Just(paid(500)),
            Just(Fact::Pending),
            Just(Fact::Failed),
            (0..=1000i64).prop_map(refund),
            (0..2usize, 0..3u8, any::<bool>()).prop_map(|(d, s, pi)| {
                let status =
                    [DisputeStatus::Open, DisputeStatus::Lost, DisputeStatus::Won][usize::from(s)];
                dispute(["dp1", "dp2"][d], status, pi)
            }),
        ]
    }

    proptest! {
        /// Any order and any duplicates of the same facts end with the same credits granted and
        /// taken back, never more taken than granted, and one grant at most.
        #[test]
        fn the_books_do_not_depend_on_the_order(
            facts in proptest::collection::vec(fact(), 0..12),
            seed in any::<u64>(),
        ) {
            let (a, ga, ca) = run(&facts);
            let mut shuffled = facts.clone();
            // A seeded shuffle with duplicates.
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, usize::try_from(x % (u64::try_from(i).unwrap() + 1)).unwrap());
            }
            if let Some(f) = shuffled.first().cloned() { shuffled.push(f); }
            let (b, gb, cb) = run(&shuffled);
            prop_assert!(ga <= 500 && ca <= ga && ca >= 0);
            // Dispute statuses are only order-independent up to "a closed dispute stays
            // closed": a Won and a Lost of one dispute is not a history Stripe sends.
            let consistent = |p: &Payment| p.disputes.iter().all(|d| d.status != DisputeStatus::Open
                || !facts.iter().any(|f| matches!(f, Fact::Dispute(x) if x.dispute_id == d.dispute_id && x.status != DisputeStatus::Open)));
            let closed_once = ["dp1", "dp2"].iter().all(|id| {
                let closed: std::collections::BTreeSet<_> = facts.iter().filter_map(|f| match f {
                    Fact::Dispute(x) if x.dispute_id == *id && x.status != DisputeStatus::Open => Some(x.status),
                    _ => None,
                }).collect();
                closed.len() <= 1
            });
            if closed_once {
                prop_assert!(consistent(&a) && consistent(&b));
                prop_assert_eq!((ga, ca), (gb, cb));
                prop_assert_eq!(a.claw_target(), b.claw_target());
            }
        }
    }
}
