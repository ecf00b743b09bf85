//! The ledger's decisions as pure functions of state, command and time.
//!
//! Storage backends call these inside their transactions; the in-memory model calls the same
//! ones, so the rules exist once.

use chrono::{DateTime, Utc};

use super::amount::{Credits, MAX_BALANCE};
use super::error::LedgerError;
use super::hold::{Hold, HoldState};

/// An open hold whose expiry has passed is expired, whatever a sweeper has done.
#[must_use]
pub fn effective_state(
    stored: HoldState,
    expires_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> HoldState {
    if stored == HoldState::Open && expires_at <= now {
        HoldState::Expired
    } else {
        stored
    }
}

/// The refusal for acting on a hold that is no longer open.
#[must_use]
pub const fn not_open(state: HoldState) -> Option<LedgerError> {
    match state {
        HoldState::Open => None,
        HoldState::Committed => Some(LedgerError::HoldAlreadyCommitted),
        HoldState::Released => Some(LedgerError::HoldReleased),
        HoldState::Expired => Some(LedgerError::HoldExpired),
    }
}

fn require_open(hold: &Hold, now: DateTime<Utc>) -> Result<(), LedgerError> {
    not_open(hold.state_at(now)).map_or(Ok(()), Err)
}

/// A reserve needs `amount` available.
///
/// # Errors
/// [`LedgerError::InsufficientCredits`] when `available < amount`.
pub const fn check_reserve(available: i64, amount: Credits) -> Result<(), LedgerError> {
    if available >= amount.get() {
        Ok(())
    } else {
        Err(LedgerError::InsufficientCredits {
            available,
            requested: amount.get(),
        })
    }
}

/// A grant may not take the balance (available + held) past [`MAX_BALANCE`].
///
/// # Errors
/// [`LedgerError::BalanceLimitExceeded`].
pub fn check_grant(balance: i64, amount: Credits) -> Result<(), LedgerError> {
    match balance.checked_add(amount.get()) {
        Some(total) if total <= MAX_BALANCE => Ok(()),
        _ => Err(LedgerError::BalanceLimitExceeded { limit: MAX_BALANCE }),
    }
}

/// How a commit moves credits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitPlan {
    /// Credits leaving `held` (the whole hold).
    pub held: i64,
    /// Credits charged.
    pub committed: i64,
    /// Held credits returned to available (`held - committed` when positive).
    pub released: i64,
    /// Credits drawn from available beyond the hold (`committed - held` when positive).
    pub extra_drawn: i64,
}

impl CommitPlan {
    /// The change to available: `held - committed` (negative when drawing extra).
    #[must_use]
    pub const fn available_delta(&self) -> i64 {
        self.released.wrapping_sub(self.extra_drawn)
    }
}

/// Decides a commit of `amount` on `hold`. Whether `extra_drawn` is available is checked by
/// the caller against the account (with [`check_reserve`]-like logic), atomically with the write.
///
/// # Errors
/// `HoldAlreadyCommitted`, `HoldReleased` or `HoldExpired` when the hold is not open.
pub fn plan_commit(
    hold: &Hold,
    amount: Credits,
    now: DateTime<Utc>,
) -> Result<CommitPlan, LedgerError> {
    require_open(hold, now)?;
    // From here on the commit is decided; only the extra's availability remains to check.
    let committed = amount.get();
    let released = hold.amount.saturating_sub(committed).max(0);
    let extra_drawn = committed.saturating_sub(hold.amount).max(0);
    Ok(CommitPlan {
        held: hold.amount,
        committed,
        released,
        extra_drawn,
    })
}

/// What a refund does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefundPlan {
    /// Release a whole open hold back to available.
    Release {
        /// The hold's amount.
        amount: i64,
    },
    /// Return committed credits to available.
    Return {
        /// Credits returned.
        amount: i64,
    },
}

impl RefundPlan {
    /// Credits that go back to available.
    #[must_use]
    pub const fn amount(&self) -> i64 {
        match *self {
            Self::Release { amount } | Self::Return { amount } => amount,
        }
    }
}

/// Decides a refund on `hold`.
///
/// # Errors
/// `HoldReleased`/`HoldExpired` for holds that left open without a commit; `HoldNotCommitted`
/// for a partial amount on an open hold; `RefundExceedsCharge` when more than the committed,
/// not yet refunded credits is asked (or nothing is left).
pub fn plan_refund(
    hold: &Hold,
    requested: Option<Credits>,
    now: DateTime<Utc>,
) -> Result<RefundPlan, LedgerError> {
    match hold.state_at(now) {
        HoldState::Open => match requested {
            Some(a) if a.get() != hold.amount => Err(LedgerError::HoldNotCommitted),
            _ => Ok(RefundPlan::Release {
                amount: hold.amount,
            }),
        },
        HoldState::Committed => {
            let refundable = hold.committed_amount.saturating_sub(hold.refunded_amount);
            let asked = requested.map_or(refundable, Credits::get);
            if refundable <= 0 || asked > refundable {
                return Err(LedgerError::RefundExceedsCharge {
                    refundable,
                    requested: asked,
                });
            }
            Ok(RefundPlan::Return { amount: asked })
        }
        HoldState::Released => Err(LedgerError::HoldReleased),
        HoldState::Expired => Err(LedgerError::HoldExpired),
    }
}

/// An extension needs an open, unexpired hold.
///
/// # Errors
/// `HoldAlreadyCommitted`, `HoldReleased` or `HoldExpired`.
pub fn check_extend(hold: &Hold, now: DateTime<Utc>) -> Result<(), LedgerError> {
    require_open(hold, now)
}

/// What a ledger entry records. Every balance change is one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Credits added: available +amount.
    Grant,
    /// A hold created: available −amount, held +amount.
    Reserve,
    /// A hold settled: held −hold, available +(hold − committed).
    Commit,
    /// An open hold released by a refund: held −hold, available +hold.
    Release,
    /// An open hold expired: held −hold, available +hold.
    Expire,
    /// Committed credits returned: available +amount.
    Refund,
    /// Credits of a grant that expired unused: available −amount.
    Expiration,
    /// An operator's signed correction (one entry per grant touched).
    Adjustment,
    /// Credits moved out to another account (one entry per grant touched).
    TransferOut,
    /// Credits moved in from another account (one entry per new grant).
    TransferIn,
    /// Credits taken back after a payment was refunded or disputed (one entry per grant
    /// touched; what no grant could cover becomes debt).
    Clawback,
    /// Incoming credits paying off debt (one entry per grant touched).
    DebtPayment,
}

impl EntryKind {
    /// Every kind, for exhaustive tests.
    pub const ALL: [Self; 12] = [
        Self::Grant,
        Self::Reserve,
        Self::Commit,
        Self::Release,
        Self::Expire,
        Self::Refund,
        Self::Expiration,
        Self::Adjustment,
        Self::TransferOut,
        Self::TransferIn,
        Self::Clawback,
        Self::DebtPayment,
    ];

    /// Parses a stored name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The name stored in the database.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Grant => "grant",
            Self::Reserve => "reserve",
            Self::Commit => "commit",
            Self::Release => "release",
            Self::Expire => "expire",
            Self::Refund => "refund",
            Self::Expiration => "expiration",
            Self::Adjustment => "adjustment",
            Self::TransferOut => "transfer_out",
            Self::TransferIn => "transfer_in",
            Self::Clawback => "clawback",
            Self::DebtPayment => "debt_payment",
        }
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)] // test arithmetic on small numbers
mod tests {
    use chrono::TimeDelta;

    use super::*;
    use crate::domain::hold::Metadata;

    fn hold(state: HoldState, amount: i64, committed: i64, refunded: i64) -> Hold {
        let t0 = DateTime::<Utc>::UNIX_EPOCH;
        Hold {
            hold_id: "hold_x".into(),
            account_id: "a".into(),
            amount,
            state,
            committed_amount: committed,
            refunded_amount: refunded,
            created_at: t0,
            expires_at: t0 + TimeDelta::seconds(60),
            resolved_at: None,
            metadata: Metadata::default(),
        }
    }

    fn c(n: i64) -> Credits {
        Credits::new("amount", n).unwrap()
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + TimeDelta::seconds(secs)
    }

    #[test]
    fn every_hold_transition_has_one_documented_result() {
        use HoldState::{Committed, Expired, Open, Released};
        use LedgerError as E;
        // (stored state, now, commit result, refund-all result)
        type Case = (HoldState, i64, Result<(), E>, Result<RefundPlan, E>);
        let cases: [Case; 6] = [
            (Open, 10, Ok(()), Ok(RefundPlan::Release { amount: 40 })),
            (Open, 60, Err(E::HoldExpired), Err(E::HoldExpired)),
            (
                Committed,
                10,
                Err(E::HoldAlreadyCommitted),
                Ok(RefundPlan::Return { amount: 30 }),
            ),
            (Released, 10, Err(E::HoldReleased), Err(E::HoldReleased)),
            (Expired, 10, Err(E::HoldExpired), Err(E::HoldExpired)),
            (Expired, 99, Err(E::HoldExpired), Err(E::HoldExpired)),
        ];
        for (state, now, commit, refund) in cases {
            let h = hold(state, 40, if state == Committed { 35 } else { 0 }, 5);
            assert_eq!(
                plan_commit(&h, c(1), at(now)).map(|_| ()),
                commit,
                "{state:?} at {now}"
            );
            assert_eq!(plan_refund(&h, None, at(now)), refund, "{state:?} at {now}");
            assert_eq!(check_extend(&h, at(now)), commit, "{state:?} at {now}");
        }
    }

    #[test]
    fn commit_of_less_releases_the_rest_and_of_more_draws_extra() {
        let h = hold(HoldState::Open, 40, 0, 0);
        let less = plan_commit(&h, c(35), at(1)).unwrap();
        assert_eq!(
            (less.released, less.extra_drawn, less.available_delta()),
            (5, 0, 5)
        );
        let more = plan_commit(&h, c(50), at(1)).unwrap();
        assert_eq!(
            (more.released, more.extra_drawn, more.available_delta()),
            (0, 10, -10)
        );
    }

    #[test]
    fn refunds_never_exceed_the_charge() {
        let h = hold(HoldState::Committed, 40, 35, 30);
        assert_eq!(
            plan_refund(&h, Some(c(5)), at(1)),
            Ok(RefundPlan::Return { amount: 5 })
        );
        assert_eq!(
            plan_refund(&h, Some(c(6)), at(1)),
            Err(LedgerError::RefundExceedsCharge {
                refundable: 5,
                requested: 6
            })
        );
        let done = hold(HoldState::Committed, 40, 35, 35);
        assert!(matches!(
            plan_refund(&done, None, at(1)),
            Err(LedgerError::RefundExceedsCharge { .. })
        ));
    }

    #[test]
    fn a_partial_refund_of_an_open_hold_is_refused() {
        let h = hold(HoldState::Open, 40, 0, 0);
        assert_eq!(
            plan_refund(&h, Some(c(10)), at(1)),
            Err(LedgerError::HoldNotCommitted)
        );
        assert_eq!(
            plan_refund(&h, Some(c(40)), at(1)),
            Ok(RefundPlan::Release { amount: 40 })
        );
    }

    #[test]
    fn grants_stop_at_the_balance_limit() {
        assert!(check_grant(MAX_BALANCE - 5, c(5)).is_ok());
        assert!(check_grant(MAX_BALANCE - 5, c(6)).is_err());
    }
}
