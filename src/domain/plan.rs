//! Plan allowances: periods on the UTC calendar and what rolls over.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::Deserialize;

/// How often an allowance is granted (at UTC boundaries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// Every day at 00:00 UTC.
    Daily,
    /// On the first of each month at 00:00 UTC.
    Monthly,
}

/// What happens to unused allowance at the end of a period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rollover {
    /// It expires.
    None,
    /// Up to this many unused credits carry into the next period.
    Capped(i64),
}

/// A plan's periodic allowance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowance {
    /// Credits per period.
    pub amount: i64,
    /// The period.
    pub period: Period,
    /// Rollover rule.
    pub rollover: Rollover,
}

/// The plan of an account that was given none.
pub const DEFAULT_PLAN: &str = "free";

/// Allowances by plan name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Plan name → its allowance (plans without one are absent).
    pub allowances: std::collections::BTreeMap<String, Allowance>,
    /// Which outbound events changes make, and for which endpoints.
    pub events: super::event::EventRules,
}

impl Policy {
    /// The allowance of `plan`, if it has one.
    #[must_use]
    pub fn for_plan(&self, plan: &str) -> Option<&Allowance> {
        self.allowances.get(plan)
    }

    /// Whether an account on `plan` whose last allowance period is `granted` is owed one at `now`.
    #[must_use]
    pub fn allowance_due(&self, plan: &str, granted: Option<&str>, now: DateTime<Utc>) -> bool {
        self.for_plan(plan)
            .is_some_and(|a| granted != Some(period_at(a.period, now).0.as_str()))
    }
}

/// The period containing `now`: its key (stored on the account and the allowance bucket, so a
/// period's allowance is granted once) and its end.
#[must_use]
pub fn period_at(period: Period, now: DateTime<Utc>) -> (String, DateTime<Utc>) {
    let day = now.date_naive();
    let (key, next) = match period {
        Period::Daily => (format!("daily:{day}"), day.succ_opt()),
        Period::Monthly => {
            let (y, m) = (day.year(), day.month());
            let next = if m == 12 {
                NaiveDate::from_ymd_opt(y.saturating_add(1), 1, 1)
            } else {
                NaiveDate::from_ymd_opt(y, m.saturating_add(1), 1)
            };
            (format!("monthly:{y:04}-{m:02}"), next)
        }
    };
    let end = next
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(DateTime::<Utc>::MAX_UTC, |t| Utc.from_utc_datetime(&t));
    (key, end)
}

/// The allowance period keys current at `now`, for every period kind: the grants a plan
/// switch must see to give at most one allowance per key.
#[must_use]
pub fn period_keys_at(now: DateTime<Utc>) -> [String; 2] {
    [
        period_at(Period::Daily, now).0,
        period_at(Period::Monthly, now).0,
    ]
}

/// When the period containing `now` began.
#[must_use]
pub fn period_start(period: Period, now: DateTime<Utc>) -> DateTime<Utc> {
    let day = now.date_naive();
    let start = match period {
        Period::Daily => day,
        Period::Monthly => day.with_day(1).unwrap_or(day),
    };
    start
        .and_hms_opt(0, 0, 0)
        .map_or(now, |t| Utc.from_utc_datetime(&t))
}

/// The key of the period just before the one containing `now`.
#[must_use]
pub fn previous_period(period: Period, now: DateTime<Utc>) -> String {
    let day = now.date_naive();
    let start = match period {
        Period::Daily => day,
        Period::Monthly => day.with_day(1).unwrap_or(day),
    };
    let before = start.pred_opt().unwrap_or(start);
    let at = before
        .and_hms_opt(0, 0, 0)
        .map_or(now, |t| Utc.from_utc_datetime(&t));
    period_at(period, at).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_follow_the_utc_calendar() {
        let t = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).unwrap();
        let (k, end) = period_at(Period::Daily, t);
        assert_eq!(
            (k.as_str(), end),
            (
                "daily:2026-12-31",
                Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
            )
        );
        let (k, end) = period_at(Period::Monthly, t);
        assert_eq!(
            (k.as_str(), end),
            (
                "monthly:2026-12",
                Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
            )
        );
        let (k, _) = period_at(
            Period::Daily,
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap(),
        );
        assert_eq!(k, "daily:2027-01-01");
        assert_eq!(previous_period(Period::Daily, t), "daily:2026-12-30");
        assert_eq!(previous_period(Period::Monthly, t), "monthly:2026-11");
        let jan = Utc.with_ymd_and_hms(2027, 1, 15, 0, 0, 0).unwrap();
        assert_eq!(previous_period(Period::Monthly, jan), "monthly:2026-12");
    }
}
