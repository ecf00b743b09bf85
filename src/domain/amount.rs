//! Credit amounts: whole credits in an `i64`, never floats.

use std::fmt;

use super::error::FieldViolation;

/// The largest balance an account may reach (available + held): 10^15 credits.
///
/// Chosen so that a balance plus any request amount, and the sum of two balances, stays far
/// inside `i64`; the databases enforce it with a `CHECK` constraint.
pub const MAX_BALANCE: i64 = 1_000_000_000_000_000;

/// A strictly positive request amount in `1..=Credits::MAX`.
///
/// The field is private: the only way to get one is [`Credits::new`], which validates.
/// There is deliberately no `Add`/`Sub`: callers use `i64` checked arithmetic and decide what
/// overflow means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Credits(i64);

impl Credits {
    /// Largest amount one request may move: 10^12 credits.
    pub const MAX: i64 = 1_000_000_000_000;

    /// Validates a request amount.
    ///
    /// # Errors
    /// A [`FieldViolation`] on `field` when `value` is not in `1..=Credits::MAX`.
    pub fn new(field: &'static str, value: i64) -> Result<Self, FieldViolation> {
        if (1..=Self::MAX).contains(&value) {
            Ok(Self(value))
        } else {
            Err(FieldViolation::new(
                field,
                format!("must be between 1 and {} credits, got {value}", Self::MAX),
            ))
        }
    }

    /// The amount as an integer.
    #[must_use]
    pub const fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

// A balance at the limit plus two maximal requests must not overflow i64.
const _: () = assert!(MAX_BALANCE.checked_add(Credits::MAX).is_some());
const _: () = assert!(MAX_BALANCE.checked_mul(4).is_some());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_outside_the_range_are_rejected() {
        assert!(Credits::new("amount", 0).is_err());
        assert!(Credits::new("amount", -5).is_err());
        assert!(Credits::new("amount", Credits::MAX + 1).is_err());
        assert_eq!(Credits::new("amount", 1).unwrap().get(), 1);
        assert_eq!(
            Credits::new("amount", Credits::MAX).unwrap().get(),
            Credits::MAX
        );
    }
}
