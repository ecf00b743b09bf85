//! Validated identifiers. Each is a distinct type so a hold id can never be passed as an
//! account id.

use std::fmt;

use super::error::FieldViolation;

/// Longest account id: 128 characters.
pub const ACCOUNT_ID_MAX_LEN: usize = 128;
/// Longest idempotency key: 255 characters (Stripe's limit).
pub const IDEMPOTENCY_KEY_MAX_LEN: usize = 255;
/// Prefix of every hold id.
pub const HOLD_ID_PREFIX: &str = "hold_";

fn is_account_char(c: char) -> bool {
    u8::try_from(c).is_ok_and(is_account_id_byte)
}

/// Whether `b` may appear in an account id (`[A-Za-z0-9_.:@-]`).
#[must_use]
pub fn is_account_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-')
}

/// An account id: 1..=128 characters of `[A-Za-z0-9_.:@-]`, chosen by the product
/// (a user id, `team:42`, ...).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccountId(String);

impl AccountId {
    /// Validates an account id.
    ///
    /// # Errors
    /// A [`FieldViolation`] on `field` when empty, too long or with a character outside the
    /// alphabet.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, FieldViolation> {
        if value.is_empty() {
            return Err(FieldViolation::new(field, "is required"));
        }
        if value.len() > ACCOUNT_ID_MAX_LEN {
            return Err(FieldViolation::new(
                field,
                format!("must be at most {ACCOUNT_ID_MAX_LEN} characters"),
            ));
        }
        if !value.chars().all(is_account_char) {
            return Err(FieldViolation::new(
                field,
                "may only contain letters, digits and _ . : @ -",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A hold id: `hold_` followed by 32 lowercase hex digits of a UUIDv7 (time-ordered).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HoldId(String);

impl HoldId {
    /// Validates a hold id.
    ///
    /// # Errors
    /// A [`FieldViolation`] on `field` when it is not `hold_` and 32 lowercase hex digits.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, FieldViolation> {
        let ok = value.strip_prefix(HOLD_ID_PREFIX).is_some_and(|hex| {
            hex.len() == 32
                && hex
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        });
        if ok {
            Ok(Self(value.to_owned()))
        } else if value.is_empty() {
            Err(FieldViolation::new(field, "is required"))
        } else {
            Err(FieldViolation::new(
                field,
                "must be \"hold_\" followed by 32 lowercase hex digits",
            ))
        }
    }

    /// Builds a hold id from 16 random-or-time-ordered bytes (a UUID).
    #[must_use]
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        let mut s = String::with_capacity(HOLD_ID_PREFIX.len().saturating_add(32));
        s.push_str(HOLD_ID_PREFIX);
        s.push_str(&hex::encode(bytes));
        Self(s)
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A client-chosen idempotency key: 1..=255 printable ASCII characters without spaces.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Validates a key.
    ///
    /// # Errors
    /// A [`FieldViolation`] on `field` when empty, too long or not printable ASCII.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, FieldViolation> {
        if value.is_empty() {
            return Err(FieldViolation::new(
                field,
                "is required on every mutating call",
            ));
        }
        if value.len() > IDEMPOTENCY_KEY_MAX_LEN {
            return Err(FieldViolation::new(
                field,
                format!("must be at most {IDEMPOTENCY_KEY_MAX_LEN} characters"),
            ));
        }
        if !value.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(FieldViolation::new(
                field,
                "must be printable ASCII without spaces",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// The key as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// Keys are logged as a short hash, never verbatim: a caller might put something sensitive in one.
impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey(len={})", self.0.len())
    }
}

/// Who is calling. Idempotency keys are scoped per caller. Until callers authenticate, every
/// request is the caller `default`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Caller(String);

impl Caller {
    /// A caller name (taken from configuration, not from the request).
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The caller used when no authentication is configured.
    #[must_use]
    pub fn anonymous() -> Self {
        Self::new("default")
    }

    /// The name as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_follow_the_documented_alphabet_and_length() {
        assert!(AccountId::parse("a", "user_42").is_ok());
        assert!(AccountId::parse("a", "team:acme@eu-1.x").is_ok());
        assert!(AccountId::parse("a", "").is_err());
        assert!(AccountId::parse("a", "has space").is_err());
        assert!(AccountId::parse("a", "ünïcode").is_err());
        assert!(AccountId::parse("a", &"x".repeat(128)).is_ok());
        assert!(AccountId::parse("a", &"x".repeat(129)).is_err());
    }

    #[test]
    fn hold_ids_round_trip_and_reject_lookalikes() {
        let id = HoldId::from_bytes([0xab; 16]);
        assert_eq!(HoldId::parse("h", id.as_str()).unwrap(), id);
        assert!(HoldId::parse("h", "hold_XYZ").is_err());
        assert!(HoldId::parse("h", &format!("hold_{}", "A".repeat(32))).is_err());
        assert!(HoldId::parse("h", "").is_err());
    }

    #[test]
    fn idempotency_keys_are_bounded_printable_ascii() {
        assert!(IdempotencyKey::parse("k", "job-1234:reserve").is_ok());
        assert!(IdempotencyKey::parse("k", "").is_err());
        assert!(IdempotencyKey::parse("k", "a b").is_err());
        assert!(IdempotencyKey::parse("k", &"k".repeat(255)).is_ok());
        assert!(IdempotencyKey::parse("k", &"k".repeat(256)).is_err());
        assert!(!format!("{:?}", IdempotencyKey::parse("k", "secret").unwrap()).contains("secret"));
    }
}
