//! Holds: a reservation of credits for one job, and its state machine.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::error::FieldViolation;

/// Most metadata pairs on one hold.
pub const METADATA_MAX_PAIRS: usize = 16;
/// Longest metadata key, in characters of `[A-Za-z0-9_.-]`.
pub const METADATA_KEY_MAX_LEN: usize = 64;
/// Longest metadata value, in bytes of UTF-8.
pub const METADATA_VALUE_MAX_BYTES: usize = 256;

/// The life of a hold: `Open`, then exactly one of the others, once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldState {
    /// Credits are held.
    Open,
    /// Settled by a commit.
    Committed,
    /// Released by a refund before commit.
    Released,
    /// Passed `expires_at` while open.
    Expired,
}

impl HoldState {
    /// The name stored in the database.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Committed => "committed",
            Self::Released => "released",
            Self::Expired => "expired",
        }
    }

    /// Parses a stored name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "open" => Some(Self::Open),
            "committed" => Some(Self::Committed),
            "released" => Some(Self::Released),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }
}

/// Caller labels stored with a hold. Validated: see the `METADATA_*` limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata(BTreeMap<String, String>);

impl Metadata {
    /// These labels with `key` set to `value` unless already set (a server label; the pair
    /// limits are for callers).
    #[must_use]
    pub fn with_default(&self, key: &str, value: &str) -> Self {
        let mut m = self.0.clone();
        m.entry(key.to_owned()).or_insert_with(|| value.to_owned());
        Self(m)
    }

    /// Validates caller metadata.
    ///
    /// # Errors
    /// A [`FieldViolation`] on `metadata` when a limit is exceeded or a key has a character
    /// outside `[A-Za-z0-9_.-]`.
    pub fn parse(
        pairs: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, FieldViolation> {
        let map: BTreeMap<String, String> = pairs.into_iter().collect();
        if map.len() > METADATA_MAX_PAIRS {
            return Err(FieldViolation::new(
                "metadata",
                format!("at most {METADATA_MAX_PAIRS} pairs, got {}", map.len()),
            ));
        }
        for (k, v) in &map {
            let key_ok = !k.is_empty()
                && k.len() <= METADATA_KEY_MAX_LEN
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !key_ok {
                return Err(FieldViolation::new(
                    "metadata",
                    format!("keys are 1..={METADATA_KEY_MAX_LEN} characters of [A-Za-z0-9_.-]"),
                ));
            }
            if v.len() > METADATA_VALUE_MAX_BYTES {
                return Err(FieldViolation::new(
                    "metadata",
                    format!("values are at most {METADATA_VALUE_MAX_BYTES} bytes (key {k:?})"),
                ));
            }
            if let Some(c) = v
                .chars()
                .find(|c| super::text::is_refused(*c, super::text::Lines::Many))
            {
                return Err(FieldViolation::new(
                    "metadata",
                    format!(
                        "values must not contain control characters other than tab and newline (key {k:?}: U+{:04X})",
                        u32::from(c)
                    ),
                ));
            }
        }
        Ok(Self(map))
    }

    /// The pairs, sorted by key.
    #[must_use]
    pub fn pairs(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

/// A hold as stored. `state` is the stored state; use [`Hold::state_at`] for what it is now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The hold's id.
    pub hold_id: String,
    /// The account the credits are held on.
    pub account_id: String,
    /// Credits held at creation.
    pub amount: i64,
    /// Stored state.
    pub state: HoldState,
    /// Credits charged by the commit (0 unless committed).
    pub committed_amount: i64,
    /// Credits refunded after the commit.
    pub refunded_amount: i64,
    /// Creation time (database clock).
    pub created_at: DateTime<Utc>,
    /// When an open hold expires.
    pub expires_at: DateTime<Utc>,
    /// When the hold left `Open`.
    pub resolved_at: Option<DateTime<Utc>>,
    /// Caller labels.
    pub metadata: Metadata,
}

impl Hold {
    /// The state at `now`: an open hold past its expiry is `Expired`, swept or not.
    #[must_use]
    pub fn state_at(&self, now: DateTime<Utc>) -> HoldState {
        super::rules::effective_state(self.state, self.expires_at, now)
    }

    /// The hold as a caller should see it at `now` (an overdue open hold shows as expired).
    #[must_use]
    pub fn observed_at(mut self, now: DateTime<Utc>) -> Self {
        if self.state_at(now) == HoldState::Expired && self.state == HoldState::Open {
            self.state = HoldState::Expired;
            self.resolved_at = Some(self.expires_at);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn metadata_limits_are_enforced() {
        assert!(Metadata::parse([pair("job_id", "j-1"), pair("model", "veo-3")]).is_ok());
        let seventeen = (0..17).map(|i| pair(&format!("k{i}"), "v"));
        assert!(Metadata::parse(seventeen).is_err());
        assert!(Metadata::parse([pair("", "v")]).is_err());
        assert!(Metadata::parse([pair("bad key", "v")]).is_err());
        assert!(Metadata::parse([pair(&"k".repeat(65), "v")]).is_err());
        assert!(Metadata::parse([pair("k", &"v".repeat(257))]).is_err());
        assert!(Metadata::parse([pair("k", &"v".repeat(256))]).is_ok());
    }

    #[test]
    fn state_names_round_trip() {
        for s in [
            HoldState::Open,
            HoldState::Committed,
            HoldState::Released,
            HoldState::Expired,
        ] {
            assert_eq!(HoldState::parse(s.as_str()), Some(s));
        }
        assert_eq!(HoldState::parse("pending"), None);
    }
}
