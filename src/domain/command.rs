//! Validated commands, and the fingerprint that ties an idempotency key to one request.

use chrono::{DateTime, TimeDelta, Utc};
use sha2::{Digest, Sha256};

use super::amount::Credits;
use super::book::{Book, Ids};
use super::book::{PRIORITY_DEFAULT, Source};
use super::error::LedgerError;
use super::hold::Metadata;
use super::ids::{AccountId, Caller, HoldId, IdempotencyKey};
use super::outcome::{AdjustOutcome, GrantOutcome, OpenOutcome, Outcome, PlanOutcome};

/// Longest free-text reason on a grant or refund: 512 characters.
pub const REASON_MAX_LEN: usize = 512;

/// The idempotency scope of one mutating request.
#[derive(Clone, Debug)]
pub struct Idempotency {
    /// Who called (keys are per caller).
    pub caller: Caller,
    /// The caller's key.
    pub key: IdempotencyKey,
    /// SHA-256 of the request's canonical form; a reused key must carry the same one.
    pub fingerprint: [u8; 32],
    /// The same request's fingerprint under an earlier encoding, for the commands whose
    /// encoding changed: a record stored before the upgrade still replays (until it ages out
    /// after `--idempotency-retention`).
    pub legacy: Option<[u8; 32]>,
}

/// Hash of a request's canonical form: the operation name and each field, length-prefixed so
/// that no two different requests share a form.
fn fingerprint(op: &str, fields: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in std::iter::once(op).chain(fields.iter().copied()) {
        h.update(part.len().to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

/// Put `amount` credits on hold for a job.
#[derive(Clone, Debug)]
pub struct Reserve {
    /// The account to hold credits on.
    pub account_id: AccountId,
    /// Credits to hold.
    pub amount: Credits,
    /// Lifetime of the hold (already defaulted and range-checked by the caller of the domain).
    pub ttl: TimeDelta,
    /// Whether the caller gave `ttl` (else it is the server's default, which the fingerprint
    /// leaves out: a retry matches even after `--hold-ttl-default` changed).
    pub ttl_given: bool,
    /// Caller labels.
    pub metadata: Metadata,
    /// The id the hold will get (generated before the request is applied).
    pub hold_id: HoldId,
    /// For a priced reserve, the canonical operation and params the amount was computed from.
    /// The fingerprint covers these instead of the amount, so a retry after a price change
    /// still matches the original request.
    pub priced: Option<String>,
}

impl Reserve {
    /// The labels stored on the hold: the caller's metadata, plus `operation` for a priced
    /// reserve when the caller did not set one (the dashboard's usage per operation reads it).
    #[must_use]
    pub fn labels(&self) -> Metadata {
        match self.priced.as_deref().and_then(|p| p.lines().next()) {
            Some(op) => self.metadata.with_default("operation", op),
            None => self.metadata.clone(),
        }
    }

    /// The request fingerprint: account, amount (or the priced operation), the TTL the caller
    /// gave (or "default"), the number of metadata pairs, then each key and value — every part
    /// length-prefixed, so two different requests never share it. The server-generated hold id
    /// is not part of it.
    #[must_use]
    pub fn fingerprint(&self) -> [u8; 32] {
        let amount = self
            .priced
            .as_ref()
            .map_or_else(|| self.amount.to_string(), |p| format!("priced:{p}"));
        let ttl = if self.ttl_given {
            self.ttl.num_milliseconds().to_string()
        } else {
            "default".to_owned()
        };
        let pairs = self.metadata.pairs();
        let count = pairs.len().to_string();
        let mut parts: Vec<&str> = vec![self.account_id.as_str(), &amount, &ttl, &count];
        for (k, v) in pairs {
            parts.push(k);
            parts.push(v);
        }
        fingerprint("reserve/2", &parts)
    }

    /// The fingerprint under the first encoding (metadata values not length-prefixed, the
    /// defaulted TTL hashed): records stored before the upgrade still replay.
    #[must_use]
    pub fn legacy_fingerprint(&self) -> [u8; 32] {
        let meta: Vec<String> = self
            .metadata
            .pairs()
            .iter()
            .map(|(k, v)| format!("{}:{k}={v}", k.len()))
            .collect();
        fingerprint(
            "reserve",
            &[
                self.account_id.as_str(),
                &self
                    .priced
                    .as_ref()
                    .map_or_else(|| self.amount.to_string(), |p| format!("priced:{p}")),
                &self.ttl.num_milliseconds().to_string(),
                &meta.join("\n"),
            ],
        )
    }
}

/// Settle a hold with what the job really cost.
#[derive(Clone, Debug)]
pub struct CommitHold {
    /// The hold.
    pub hold_id: HoldId,
    /// What the job cost.
    pub amount: Credits,
}

impl CommitHold {
    /// The request fingerprint.
    #[must_use]
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint("commit", &[self.hold_id.as_str(), &self.amount.to_string()])
    }
}

/// Release an open hold or return committed credits.
#[derive(Clone, Debug)]
pub struct Refund {
    /// The hold.
    pub hold_id: HoldId,
    /// Credits to return (committed holds only); `None` means all not yet refunded.
    pub amount: Option<Credits>,
    /// Why.
    pub reason: String,
}

impl Refund {
    /// The request fingerprint.
    #[must_use]
    pub fn fingerprint(&self) -> [u8; 32] {
        let amount = self
            .amount
            .map_or_else(|| "all".to_owned(), |a| a.to_string());
        fingerprint("refund", &[self.hold_id.as_str(), &amount, &self.reason])
    }
}

/// Move an open hold's expiry to now + ttl.
#[derive(Clone, Debug)]
pub struct ExtendHold {
    /// The hold.
    pub hold_id: HoldId,
    /// New lifetime from now.
    pub ttl: TimeDelta,
}

impl ExtendHold {
    /// The request fingerprint.
    #[must_use]
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(
            "extend",
            &[
                self.hold_id.as_str(),
                &self.ttl.num_milliseconds().to_string(),
            ],
        )
    }
}

/// Add credits to an account as a new grant (creating the account on its first grant).
#[derive(Clone, Debug)]
pub struct GrantCredits {
    /// The account.
    pub account_id: AccountId,
    /// Credits to add.
    pub amount: Credits,
    /// Why.
    pub reason: String,
    /// Where the credits come from.
    pub source: Source,
    /// When they expire (never if `None`).
    pub expires_at: Option<DateTime<Utc>>,
    /// Consumption priority (0..=100, lower first).
    pub priority: i32,
}

impl GrantCredits {
    /// A grant of `amount` from `source` that never expires, at the default priority.
    #[must_use]
    pub fn simple(account_id: AccountId, amount: Credits, source: Source, reason: &str) -> Self {
        Self {
            account_id,
            amount,
            reason: reason.to_owned(),
            source,
            expires_at: None,
            priority: PRIORITY_DEFAULT,
        }
    }

    /// The request fingerprint.
    #[must_use]
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(
            "grant",
            &[
                self.account_id.as_str(),
                &self.amount.to_string(),
                &self.reason,
                self.source.as_str(),
                &self
                    .expires_at
                    .map(|t| t.timestamp_micros().to_string())
                    .unwrap_or_default(),
                &self.priority.to_string(),
            ],
        )
    }
}

/// An operator's signed correction.
#[derive(Clone, Debug)]
pub struct Adjust {
    /// The account.
    pub account_id: AccountId,
    /// Credits to add (positive) or remove (negative); never 0, |delta| ≤ `Credits::MAX`.
    pub delta: i64,
    /// Why (required).
    pub reason: String,
    /// Who did it (the authenticated operator, or the CLI user's name).
    pub operator: String,
}

impl Adjust {
    /// The request fingerprint.
    #[must_use]
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(
            "adjust",
            &[
                self.account_id.as_str(),
                &self.delta.to_string(),
                &self.reason,
                &self.operator,
            ],
        )
    }
}

/// Move credits between two accounts atomically.
#[derive(Clone, Debug)]
pub struct Transfer {
    /// Debited account.
    pub from: AccountId,
    /// Credited account (created if new).
    pub to: AccountId,
    /// Credits.
    pub amount: Credits,
    /// Why.
    pub reason: String,
}

impl Transfer {
    /// The request fingerprint.
    #[must_use]
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(
            "transfer",
            &[
                self.from.as_str(),
                self.to.as_str(),
                &self.amount.to_string(),
                &self.reason,
            ],
        )
    }
}

/// Create an account on a plan, with the sign-up bonus.
#[derive(Clone, Debug)]
pub struct OpenAccount {
    /// The new account.
    pub account_id: AccountId,
    /// Its plan (validated against the catalog).
    pub plan: String,
    /// The sign-up bonus and its lifetime, from the catalog.
    pub bonus: Option<(Credits, Option<TimeDelta>)>,
}

impl OpenAccount {
    /// The request fingerprint (the bonus is configuration, not part of the request).
    #[must_use]
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint("open_account", &[self.account_id.as_str(), &self.plan])
    }
}

/// Move an account to another plan.
#[derive(Clone, Debug)]
pub struct SetPlan {
    /// The account.
    pub account_id: AccountId,
    /// The new plan (validated against the catalog by the caller).
    pub plan: String,
}

impl SetPlan {
    /// The request fingerprint.
    #[must_use]
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint("set_plan", &[self.account_id.as_str(), &self.plan])
    }
}

impl GrantCredits {
    /// Books the grant on a loaded, settled book.
    ///
    /// # Errors
    /// `BalanceLimitExceeded`.
    pub fn apply(
        &self,
        b: &mut Book,
        now: DateTime<Utc>,
        ids: &mut dyn Ids,
    ) -> Result<GrantOutcome, LedgerError> {
        let id = ids.grant_id();
        b.grant(
            &id,
            self.source,
            self.amount,
            self.expires_at,
            self.priority,
            &self.reason,
            now,
        )
    }
}

impl Adjust {
    /// Books the correction on a loaded, settled book; its entries name the operator.
    ///
    /// # Errors
    /// `InsufficientCredits`, `BalanceLimitExceeded`.
    pub fn apply(
        &self,
        b: &mut Book,
        now: DateTime<Utc>,
        ids: &mut dyn Ids,
    ) -> Result<AdjustOutcome, LedgerError> {
        b.adjust(
            self.delta,
            &format!("{} (by {})", self.reason, self.operator),
            now,
            ids,
        )?;
        Ok(AdjustOutcome {
            account_id: b.account_id.clone(),
            delta: self.delta,
            available: b.net_available(),
        })
    }
}

impl OpenAccount {
    /// Books the sign-up bonus (if the catalog gives one) on the new account's settled book.
    ///
    /// # Errors
    /// `BalanceLimitExceeded`.
    pub fn apply(
        &self,
        b: &mut Book,
        now: DateTime<Utc>,
        ids: &mut dyn Ids,
    ) -> Result<OpenOutcome, LedgerError> {
        let mut bonus = 0;
        if let Some((amount, ttl)) = self.bonus {
            let id = ids.grant_id();
            let expires_at = ttl.and_then(|t| now.checked_add_signed(t));
            b.grant(
                &id,
                Source::SignupBonus,
                amount,
                expires_at,
                PRIORITY_DEFAULT,
                "sign-up bonus",
                now,
            )?;
            bonus = amount.get();
        }
        Ok(OpenOutcome {
            account_id: b.account_id.clone(),
            plan: b.plan.clone(),
            bonus,
            available: b.net_available(),
        })
    }
}

impl SetPlan {
    /// Switches the loaded book (with the current periods' grants) to the plan, whose
    /// allowance is `allowance`.
    ///
    /// # Errors
    /// What [`Book::switch_plan`] refuses.
    pub fn apply(
        &self,
        b: &mut Book,
        allowance: Option<&super::plan::Allowance>,
        now: DateTime<Utc>,
        ids: &mut dyn Ids,
    ) -> Result<PlanOutcome, LedgerError> {
        let previous_plan = b.switch_plan(&self.plan, allowance, now, ids)?;
        Ok(PlanOutcome {
            account_id: b.account_id.clone(),
            previous_plan,
            plan: self.plan.clone(),
        })
    }
}

/// What a book operation acts on.
pub enum Target<'a> {
    /// An account, created (on the default plan) if `create`.
    Account {
        /// The account.
        id: &'a str,
        /// Whether a missing account is created.
        create: bool,
    },
    /// The account of a hold, with that hold loaded.
    Hold(&'a str),
    /// An account about to switch plans: the grants of the allowance periods current now are
    /// loaded too ([`super::plan::period_keys_at`]), so the switch gives at most one
    /// allowance per period key.
    PlanSwitch(&'a str),
}

/// A job-path command: what generation services send around every job, and what the
/// backends coalesce into group transactions (`storage::batch`).
#[derive(Clone, Debug)]
pub enum HoldCmd {
    /// Reserve credits (a new hold).
    Reserve(Reserve),
    /// Settle a hold.
    Commit(CommitHold),
    /// Release or refund a hold.
    Refund(Refund),
    /// Move a hold's expiry.
    Extend(ExtendHold),
}

impl HoldCmd {
    /// The book the command acts on.
    pub fn target(&self) -> Target<'_> {
        match self {
            Self::Reserve(c) => Target::Account {
                id: c.account_id.as_str(),
                create: false,
            },
            Self::Commit(c) => Target::Hold(c.hold_id.as_str()),
            Self::Refund(c) => Target::Hold(c.hold_id.as_str()),
            Self::Extend(c) => Target::Hold(c.hold_id.as_str()),
        }
    }

    /// Applies time, then the command, to a loaded book (`allowance`: its plan's); a command
    /// the rules refuse leaves the book as it was, as if it had run alone and rolled back.
    /// What group commit runs per command on books it shares.
    ///
    /// # Errors
    /// The rules' refusal.
    pub fn settle_and_apply(
        &self,
        b: &mut Book,
        allowance: Option<&super::plan::Allowance>,
        now: DateTime<Utc>,
        ids: &mut dyn Ids,
    ) -> Result<Outcome, LedgerError> {
        let before = b.clone();
        let result = b
            .settle(now, allowance, ids)
            .and_then(|()| self.apply(b, now));
        if result.is_err() {
            *b = before;
        }
        result
    }

    /// Applies the command to a loaded, settled book (pure: the domain's rules decide).
    pub fn apply(&self, b: &mut Book, now: DateTime<Utc>) -> Result<Outcome, LedgerError> {
        Ok(match self {
            Self::Reserve(c) => b
                .reserve(c.hold_id.as_str(), c.amount, c.ttl, c.labels(), now)?
                .into(),
            Self::Commit(c) => b.commit_hold(c.hold_id.as_str(), c.amount, now)?.into(),
            Self::Refund(c) => b
                .refund(c.hold_id.as_str(), c.amount, &c.reason, now)?
                .into(),
            Self::Extend(c) => b.extend_hold(c.hold_id.as_str(), c.ttl, now)?.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_differ_when_any_field_differs() {
        let a = GrantCredits::simple(
            AccountId::parse("a", "u1").unwrap(),
            Credits::new("n", 5).unwrap(),
            Source::Adjustment,
            "ab",
        );
        let mut b = a.clone();
        b.reason = "a".into();
        assert_ne!(a.fingerprint(), b.fingerprint());
        let mut c = a.clone();
        c.amount = Credits::new("n", 6).unwrap();
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
    }

    fn reserve(metadata: &[(&str, &str)], ttl: Option<i64>, priced: Option<&str>) -> Reserve {
        Reserve {
            account_id: AccountId::parse("a", "u1").unwrap(),
            amount: Credits::new("n", 5).unwrap(),
            ttl: TimeDelta::seconds(ttl.unwrap_or(600)),
            ttl_given: ttl.is_some(),
            metadata: Metadata::parse(
                metadata
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
            )
            .unwrap(),
            hold_id: HoldId::parse("h", "hold_0190f3a0000070008000000000000001").unwrap(),
            priced: priced.map(str::to_owned),
        }
    }

    #[test]
    fn a_priced_hold_is_labelled_with_its_operation_unless_the_caller_did() {
        let plain = reserve(&[("job", "j1")], None, None);
        assert_eq!(plain.labels(), plain.metadata);
        let priced = reserve(&[("job", "j1")], None, Some("video_export\n7:seconds=12"));
        let labels = priced.labels();
        assert_eq!(
            labels.pairs().get("operation").map(String::as_str),
            Some("video_export")
        );
        assert_eq!(labels.pairs().get("job").map(String::as_str), Some("j1"));
        // The fingerprint is the caller's request, not the server's label.
        assert_eq!(priced.fingerprint(), priced.clone().fingerprint());
        let own = reserve(&[("operation", "mine")], None, Some("video_export"));
        assert_eq!(own.labels(), own.metadata);
    }

    #[test]
    fn metadata_that_used_to_collide_does_not() {
        let a = reserve(&[("k1", "a\n3:xyz=b")], None, None);
        let b = reserve(&[("k1", "a"), ("xyz", "b")], None, None);
        assert_eq!(
            a.legacy_fingerprint(),
            b.legacy_fingerprint(),
            "the old encoding collided"
        );
        assert_ne!(a.fingerprint(), b.fingerprint());
        // Without a TTL the server's default is not hashed; a given TTL is.
        let mut c = reserve(&[], None, None);
        let d = c.clone();
        c.ttl = TimeDelta::seconds(5);
        assert_eq!(c.fingerprint(), d.fingerprint());
        assert_ne!(reserve(&[], Some(600), None).fingerprint(), d.fingerprint());
    }

    fn text() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::string::string_regex("[a-z0-9=:\n]{0,6}").unwrap()
    }

    proptest::proptest! {
        /// Distinct Reserve requests never share a fingerprint; equal ones always do.
        #[test]
        fn distinct_reserves_never_share_a_fingerprint(
            ma in proptest::collection::btree_map("[a-z]{1,3}", text(), 0..4),
            mb in proptest::collection::btree_map("[a-z]{1,3}", text(), 0..4),
            ta in proptest::option::of(1i64..3),
            tb in proptest::option::of(1i64..3),
            pa in proptest::option::of("[a-z:=]{0,4}"),
            pb in proptest::option::of("[a-z:=]{0,4}"),
        ) {
            let pairs = |m: &std::collections::BTreeMap<String, String>| -> Vec<(String, String)> {
                m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
            };
            let build = |m: &std::collections::BTreeMap<String, String>, t: Option<i64>, p: &Option<String>| {
                let pairs = pairs(m);
                let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                reserve(&refs, t, p.as_deref())
            };
            let (a, b) = (build(&ma, ta, &pa), build(&mb, tb, &pb));
            let same = ma == mb && ta == tb && pa == pb;
            proptest::prop_assert_eq!(a.fingerprint() == b.fingerprint(), same);
        }
    }
}
