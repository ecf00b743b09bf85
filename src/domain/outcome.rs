//! What a successful command returns. Outcomes of mutating commands are also what the
//! idempotency record stores and replays, so they serialize (JSON, in the database).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::hold::Hold;

/// An account's balance as callers see it at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Balance {
    /// The account.
    pub account_id: String,
    /// Credits a reserve can take.
    pub available: i64,
    /// Credits held by open, unexpired holds.
    pub held: i64,
    /// Credits owed (claw-backs the grants could not cover), already taken off `available`.
    pub debt: i64,
    /// Open, unexpired holds.
    pub open_holds: i64,
    /// The account's plan.
    pub plan: String,
    /// Available credits per grant source.
    pub by_source: std::collections::BTreeMap<super::book::Source, i64>,
    /// The soonest expiry among available credits, and how many expire then.
    pub next_expiry: Option<(DateTime<Utc>, i64)>,
    /// What is left of this period's allowance (`None` when the plan has none).
    pub allowance_left: Option<i64>,
    /// The instant (database clock) the balance was read at.
    pub as_of: DateTime<Utc>,
    /// The account row's version: it moves up with every committed change of the account, so
    /// of two reads the one with the higher version is the newer state.
    pub version: i64,
}

/// An account as support staff see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountSummary {
    /// The balance now (with the plan).
    pub balance: Balance,
    /// When the account was created.
    pub created_at: DateTime<Utc>,
}

/// One ledger entry as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryRecord {
    /// Sequence number (increasing in commit order per backend).
    pub entry_id: i64,
    /// The account changed.
    pub account_id: String,
    /// The hold involved, if any.
    pub hold_id: Option<String>,
    /// The grant involved, if any.
    pub grant_id: Option<String>,
    /// What happened.
    pub kind: super::rules::EntryKind,
    /// Change to available.
    pub available_delta: i64,
    /// Change to held.
    pub held_delta: i64,
    /// Free text from the request.
    pub reason: String,
    /// When (database clock).
    pub created_at: DateTime<Utc>,
}

/// Result of changing an account's plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanOutcome {
    /// The account.
    pub account_id: String,
    /// The plan before.
    pub previous_plan: String,
    /// The plan now.
    pub plan: String,
}

/// Result of a reserve.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveOutcome {
    /// The new, open hold.
    pub hold: Hold,
    /// Available credits right after.
    pub available: i64,
}

/// Result of committing a hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitOutcome {
    /// The hold, now committed.
    pub hold: Hold,
    /// Held credits that went back to available.
    pub released: i64,
    /// Credits drawn from available beyond the hold.
    pub extra_drawn: i64,
    /// Available credits right after.
    pub available: i64,
}

/// Result of a refund.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundOutcome {
    /// The hold after the refund.
    pub hold: Hold,
    /// Credits this refund returned to available.
    pub refunded: i64,
    /// Available credits right after.
    pub available: i64,
}

/// Result of extending a hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtendOutcome {
    /// The hold with its new expiry.
    pub hold: Hold,
}

/// Result of a grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantOutcome {
    /// The account credited (created if new).
    pub account_id: String,
    /// The grant (bucket) created.
    pub grant_id: String,
    /// Available credits right after.
    pub available: i64,
}

/// Result of an adjustment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdjustOutcome {
    /// The account.
    pub account_id: String,
    /// The signed change.
    pub delta: i64,
    /// Available credits right after.
    pub available: i64,
}

/// Result of a transfer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferOutcome {
    /// Debited account and its available credits after.
    pub from: (String, i64),
    /// Credited account and its available credits after.
    pub to: (String, i64),
    /// Credits moved.
    pub amount: i64,
}

/// Result of opening an account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenOutcome {
    /// The account.
    pub account_id: String,
    /// Its plan.
    pub plan: String,
    /// Sign-up bonus granted.
    pub bonus: i64,
    /// Available credits right after (bonus and the first allowance).
    pub available: i64,
}

/// Any stored outcome, as the idempotency record keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Outcome {
    /// A reserve.
    Reserve(ReserveOutcome),
    /// A commit.
    Commit(CommitOutcome),
    /// A refund.
    Refund(RefundOutcome),
    /// An extension.
    Extend(ExtendOutcome),
    /// A grant.
    Grant(GrantOutcome),
    /// A plan change.
    Plan(PlanOutcome),
    /// An adjustment.
    Adjust(AdjustOutcome),
    /// A transfer.
    Transfer(TransferOutcome),
    /// An account opening.
    Open(OpenOutcome),
}

macro_rules! outcome_conversions {
    ($($variant:ident => $ty:ty),* $(,)?) => {$(
        impl From<$ty> for Outcome {
            fn from(o: $ty) -> Self {
                Self::$variant(o)
            }
        }
        impl TryFrom<Outcome> for $ty {
            type Error = Outcome;
            fn try_from(o: Outcome) -> Result<Self, Outcome> {
                match o {
                    Outcome::$variant(x) => Ok(x),
                    other => Err(other),
                }
            }
        }
    )*};
}

outcome_conversions!(
    Reserve => ReserveOutcome,
    Commit => CommitOutcome,
    Refund => RefundOutcome,
    Extend => ExtendOutcome,
    Grant => GrantOutcome,
    Plan => PlanOutcome,
    Adjust => AdjustOutcome,
    Transfer => TransferOutcome,
    Open => OpenOutcome,
);

/// Stored outcomes are replayed for as long as their idempotency records live: the JSON written
/// today must read back the same tomorrow. `outcome.golden.jsonl` holds one record per kind as
/// this version writes it; renaming a field or a variant fails here before it breaks replays.
#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod golden {
    use super::*;
    use crate::domain::{HoldState, Metadata};
    use chrono::TimeZone as _;

    fn samples() -> Vec<Outcome> {
        let t = Utc.with_ymd_and_hms(2026, 12, 7, 10, 0, 0).unwrap();
        let hold = Hold {
            hold_id: "hold_0190f3a0000070008000000000000001".into(),
            account_id: "user_1".into(),
            amount: 36,
            state: HoldState::Committed,
            committed_amount: 30,
            refunded_amount: 5,
            created_at: t,
            expires_at: t + chrono::TimeDelta::minutes(10),
            resolved_at: Some(t + chrono::TimeDelta::minutes(2)),
            metadata: Metadata::parse([("job".to_owned(), "j1".to_owned())]).unwrap(),
        };
        vec![
            Outcome::Reserve(ReserveOutcome {
                hold: hold.clone(),
                available: 69,
            }),
            Outcome::Commit(CommitOutcome {
                hold: hold.clone(),
                released: 6,
                extra_drawn: 0,
                available: 75,
            }),
            Outcome::Refund(RefundOutcome {
                hold: hold.clone(),
                refunded: 5,
                available: 80,
            }),
            Outcome::Extend(ExtendOutcome { hold }),
            Outcome::Grant(GrantOutcome {
                account_id: "user_1".into(),
                grant_id: "grt_0190f3a0000070008000000000000002".into(),
                available: 100,
            }),
            Outcome::Plan(PlanOutcome {
                account_id: "user_1".into(),
                previous_plan: "free".into(),
                plan: "pro".into(),
            }),
            Outcome::Adjust(AdjustOutcome {
                account_id: "user_1".into(),
                delta: -20,
                available: 80,
            }),
            Outcome::Transfer(TransferOutcome {
                from: ("user_1".into(), 60),
                to: ("user_2".into(), 20),
                amount: 20,
            }),
            Outcome::Open(OpenOutcome {
                account_id: "user_3".into(),
                plan: "free".into(),
                bonus: 100,
                available: 105,
            }),
        ]
    }

    #[test]
    fn stored_outcomes_read_back_as_written() {
        let golden = include_str!("outcome.golden.jsonl");
        let lines: Vec<&str> = golden.lines().collect();
        let samples = samples();
        assert_eq!(
            lines.len(),
            samples.len(),
            "one golden record per outcome kind"
        );
        for (line, sample) in lines.iter().zip(&samples) {
            let read: Outcome = serde_json::from_str(line).unwrap();
            assert_eq!(
                &read, sample,
                "a stored record no longer reads back: {line}"
            );
            // A new kind or field: its line is `serde_json::to_string(&sample)`; old records
            // must still read, so a new field comes with a serde default.
            assert_eq!(serde_json::to_string(sample).unwrap(), *line);
        }
    }
}
