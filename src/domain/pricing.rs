//! Prices of operations, so generation services do not hard-code them.
//!
//! An operation's cost is
//!
//! ```text
//! cost = ceil( (base + per_unit × units) × multiplier₁ × … × multiplierₙ )
//! ```
//!
//! where `units` is a numeric request parameter (seconds of video, images, …) and each
//! multiplier is looked up by the value of an enumerated parameter (resolution, complexity, …).
//! Every number is a decimal with at most three fraction digits, computed exactly in integers;
//! only the final result is rounded, **up** to the next whole credit (a job is never
//! under-charged by rounding), and a positive cost is at least 1 credit.

use std::collections::BTreeMap;
use std::fmt;

use super::amount::Credits;
use super::error::FieldViolation;

/// Fraction digits of every pricing decimal.
pub const DECIMAL_PLACES: u32 = 3;
const SCALE: i128 = 1_000;
/// Most multiplier parameters on one operation (keeps the exact arithmetic far inside `i128`).
pub const MULTIPLIERS_MAX: usize = 4;
/// Largest multiplier a catalog may give a parameter value: 1,000,000.
pub const MULTIPLIER_MAX: Decimal = Decimal::whole(1_000_000);
/// Largest numeric parameter value (units) a request may give: 10^9.
pub const UNITS_MAX: i64 = 1_000_000_000;
/// Most parameters a request may carry.
pub const PARAMS_MAX: usize = 16;

/// A non-negative decimal with three fraction digits, stored as thousandths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Decimal(i64);

impl Decimal {
    /// Largest value: 10^12.
    pub const MAX: Self = Self(1_000_000_000_000_000);

    /// Parses `"12"`, `"1.5"`, `"0.125"`.
    ///
    /// # Errors
    /// A message when the text is not a non-negative decimal with at most three fraction digits
    /// or exceeds [`Decimal::MAX`].
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad =
            || format!("{text:?} is not a non-negative decimal with at most 3 fraction digits");
        let (whole, frac) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
        if whole.is_empty()
            || frac.len() > 3
            || !whole
                .bytes()
                .chain(frac.bytes())
                .all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let whole: i64 = whole.parse().map_err(|_| bad())?;
        let frac_value: i64 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<3}").parse().map_err(|_| bad())?
        };
        whole
            .checked_mul(1_000)
            .and_then(|w| w.checked_add(frac_value))
            .filter(|v| *v <= Self::MAX.0)
            .map(Self)
            .ok_or_else(bad)
    }

    /// From whole units.
    #[must_use]
    pub const fn whole(n: i64) -> Self {
        Self(n.saturating_mul(1_000))
    }

    /// Thousandths.
    #[must_use]
    pub const fn thousandths(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0.div_euclid(1_000), self.0.rem_euclid(1_000));
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let digits = format!("{frac:03}");
            write!(f, "{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

/// How one operation is priced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Price {
    /// Credits charged once per job.
    pub base: Decimal,
    /// The numeric parameter counted (`seconds`, `images`), with its price per unit.
    pub per_unit: Option<(String, Decimal)>,
    /// Enumerated parameters and the multiplier of each allowed value.
    pub multipliers: BTreeMap<String, BTreeMap<String, Decimal>>,
}

/// One line of a cost breakdown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Factor {
    /// What it is (`base`, `seconds`, `resolution`).
    pub name: String,
    /// Its value in the formula, as a decimal string.
    pub value: String,
    /// A sentence for people (`2 credits × 12 seconds`).
    pub detail: String,
}

/// A priced request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// Whole credits to charge.
    pub cost: Credits,
    /// The exact cost before rounding, as a decimal string.
    pub exact: String,
    /// How it was computed, in order.
    pub factors: Vec<Factor>,
}

fn violation(field: &'static str, description: impl Into<String>) -> FieldViolation {
    FieldViolation::new(field, description)
}

/// A parameter of a priced operation, described for clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamInfo {
    /// A count (`seconds`, `images`): `0..=UNITS_MAX`, priced per unit.
    Number {
        /// Its name.
        name: String,
        /// Credits per unit.
        per_unit: Decimal,
    },
    /// One of a set of values, each a multiplier.
    Choice {
        /// Its name.
        name: String,
        /// Value → multiplier.
        values: BTreeMap<String, Decimal>,
    },
}

impl Price {
    /// The parameters a request must give, counts first, then choices by name.
    #[must_use]
    pub fn params(&self) -> Vec<ParamInfo> {
        self.per_unit
            .iter()
            .map(|(name, per)| ParamInfo::Number {
                name: name.clone(),
                per_unit: *per,
            })
            .chain(
                self.multipliers
                    .iter()
                    .map(|(name, values)| ParamInfo::Choice {
                        name: name.clone(),
                        values: values.clone(),
                    }),
            )
            .collect()
    }

    /// The formula in words: `ceil((1 + 2 × seconds) × resolution) credits`.
    #[must_use]
    pub fn formula(&self) -> String {
        let mut sum = self.base.to_string();
        if let Some((unit, per)) = &self.per_unit {
            sum = if self.base == Decimal::whole(0) {
                format!("{per} × {unit}")
            } else {
                format!("({sum} + {per} × {unit})")
            };
        }
        let factors: Vec<&str> = self.multipliers.keys().map(String::as_str).collect();
        if factors.is_empty() {
            format!("ceil({sum}) credits")
        } else {
            format!("ceil({sum} × {}) credits", factors.join(" × "))
        }
    }

    /// Prices a request's parameters.
    ///
    /// # Errors
    /// Violations on `params` for an unknown, missing or malformed parameter, and on
    /// `operation` when the cost is zero or beyond [`Credits::MAX`].
    #[allow(clippy::arithmetic_side_effects, clippy::too_many_lines)] // exact i128 arithmetic, each product checked
    pub fn estimate(&self, params: &BTreeMap<String, String>) -> Result<Estimate, FieldViolation> {
        if params.len() > PARAMS_MAX {
            return Err(violation(
                "params",
                format!("at most {PARAMS_MAX} parameters"),
            ));
        }
        for name in params.keys() {
            let known = self.per_unit.as_ref().is_some_and(|(u, _)| u == name)
                || self.multipliers.contains_key(name);
            if !known {
                return Err(violation(
                    "params",
                    format!("unknown parameter {name:?} for this operation"),
                ));
            }
        }
        let mut factors = vec![Factor {
            name: "base".into(),
            value: self.base.to_string(),
            detail: format!("{} credits per job", self.base),
        }];
        // Sum in thousandths of a credit: base + per_unit × units (scale² → scale). Every step
        // is checked: a product past i128 is a refusal, never a wrapped price.
        let overflow = || {
            violation(
                "operation",
                format!("the cost is beyond the limit of {} credits", Credits::MAX),
            )
        };
        let mut scaled = i128::from(self.base.thousandths()) * SCALE;
        let mut scale = SCALE * SCALE;
        if let Some((unit, per)) = &self.per_unit {
            let raw = params
                .get(unit)
                .ok_or_else(|| violation("params", format!("{unit:?} is required")))?;
            let units =
                Decimal::parse(raw).map_err(|e| violation("params", format!("{unit}: {e}")))?;
            if units > Decimal::whole(UNITS_MAX) {
                return Err(violation("params", format!("{unit}: at most {UNITS_MAX}")));
            }
            scaled = i128::from(per.thousandths())
                .checked_mul(i128::from(units.thousandths()))
                .and_then(|p| p.checked_add(scaled))
                .ok_or_else(overflow)?;
            factors.push(Factor {
                name: unit.clone(),
                value: units.to_string(),
                detail: format!("{per} credits × {units} {unit}"),
            });
        }
        for (param, table) in &self.multipliers {
            let value = params
                .get(param)
                .ok_or_else(|| violation("params", format!("{param:?} is required")))?;
            let m = table.get(value).ok_or_else(|| {
                let allowed: Vec<&str> = table.keys().map(String::as_str).collect();
                violation(
                    "params",
                    format!("{param}: {value:?} is not one of {}", allowed.join(", ")),
                )
            })?;
            scaled = scaled
                .checked_mul(i128::from(m.thousandths()))
                .ok_or_else(overflow)?;
            scale = scale.checked_mul(SCALE).ok_or_else(overflow)?;
            factors.push(Factor {
                name: param.clone(),
                value: m.to_string(),
                detail: format!("× {m} ({param}={value})"),
            });
        }
        let whole = scaled
            .checked_add(scale - 1)
            .ok_or_else(overflow)?
            .div_euclid(scale); // ceil for non-negative values
        let exact_thousandths = scaled.checked_mul(SCALE).ok_or_else(overflow)? / scale;
        let exact = i64::try_from(exact_thousandths)
            .map_or_else(|_| "huge".to_owned(), |t| Decimal(t).to_string());
        let cost = i64::try_from(whole)
            .ok()
            .filter(|c| *c >= 1 && *c <= Credits::MAX)
            .ok_or_else(|| {
                violation(
                    "operation",
                    format!(
                        "the cost ({exact} credits) must be between 1 and {} credits",
                        Credits::MAX
                    ),
                )
            })?;
        if whole * scale != scaled {
            factors.push(Factor {
                name: "rounding".into(),
                value: cost.to_string(),
                detail: format!("{exact} rounded up to {cost}"),
            });
        }
        let cost = Credits::new("operation", cost)?;
        Ok(Estimate {
            cost,
            exact,
            factors,
        })
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::parse(s).unwrap()
    }

    fn video() -> Price {
        Price {
            base: d("0"),
            per_unit: Some(("seconds".into(), d("2"))),
            multipliers: [(
                "resolution".to_owned(),
                [("720p", "1"), ("1080p", "1.5"), ("4k", "4")]
                    .map(|(k, v)| (k.to_owned(), d(v)))
                    .into_iter()
                    .collect(),
            )]
            .into_iter()
            .collect(),
        }
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn decimals_parse_exactly_and_print_back() {
        assert_eq!(d("1.5").thousandths(), 1_500);
        assert_eq!(d("0.125").thousandths(), 125);
        assert_eq!(d("12").to_string(), "12");
        assert_eq!(d("0.120").to_string(), "0.12");
        for bad in [
            "",
            "-1",
            "1.2345",
            "1e3",
            ".5",
            "x",
            "1.5.1",
            "1000000000001",
        ] {
            assert!(Decimal::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_documented_examples_price_as_written() {
        let p = video();
        // 12 s of 1080p: 2 × 12 × 1.5 = 36 exactly.
        let e = p
            .estimate(&params(&[("seconds", "12"), ("resolution", "1080p")]))
            .unwrap();
        assert_eq!((e.cost.get(), e.exact.as_str()), (36, "36"));
        assert_eq!(
            e.factors
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>(),
            ["base", "seconds", "resolution"]
        );
        // 7.3 s of 1080p: 21.9 → rounded up to 22.
        let e = p
            .estimate(&params(&[("seconds", "7.3"), ("resolution", "1080p")]))
            .unwrap();
        assert_eq!((e.cost.get(), e.exact.as_str()), (22, "21.9"));
        assert_eq!(e.factors.last().unwrap().name, "rounding");
        // 0.001 s of 720p: 0.002 → at least one credit.
        assert_eq!(
            p.estimate(&params(&[("seconds", "0.001"), ("resolution", "720p")]))
                .unwrap()
                .cost
                .get(),
            1
        );
    }

    #[test]
    fn bad_params_are_named() {
        let p = video();
        let err = |ps: &[(&str, &str)]| p.estimate(&params(ps)).unwrap_err().description;
        assert!(err(&[("resolution", "1080p")]).contains("\"seconds\" is required"));
        assert!(
            err(&[("seconds", "3"), ("resolution", "8k")]).contains("not one of 1080p, 4k, 720p")
        );
        assert!(
            err(&[("seconds", "3"), ("resolution", "4k"), ("fps", "60")])
                .contains("unknown parameter")
        );
        assert!(err(&[("seconds", "-3"), ("resolution", "4k")]).contains("seconds"));
        assert!(err(&[("seconds", "0"), ("resolution", "4k")]).contains("between 1"));
    }

    proptest! {
        #[test]
        fn the_cost_is_the_exact_price_rounded_up(secs in 0i64..100_000_000, base in 0i64..10_000, res in 0usize..3) {
            let mut p = video();
            p.base = Decimal(base);
            let name = ["720p", "1080p", "4k"][res];
            let mult = [1_000i128, 1_500, 4_000][res];
            let r = p.estimate(&params(&[("seconds", &Decimal(secs).to_string()), ("resolution", name)]));
            // exact value in thousandths³: (base×1000 + 2000×secs) × mult
            let exact = (i128::from(base) * 1_000 + 2_000 * i128::from(secs)) * mult;
            let ceil = (exact + 999_999_999) / 1_000_000_000;
            if ceil == 0 {
                prop_assert!(r.is_err());
            } else {
                let e = r.unwrap();
                prop_assert_eq!(i128::from(e.cost.get()), ceil);
                prop_assert!(i128::from(e.cost.get()) * 1_000_000_000 >= exact, "never under-charges");
                prop_assert!(i128::from(e.cost.get() - 1) * 1_000_000_000 < exact, "never over-charges by a credit");
            }
        }
    }

    /// Issue 23, item 6: the largest prices a catalog allows, the largest request: a refusal
    /// on `operation`, never a wrapped price.
    #[test]
    fn an_overflowing_cost_is_a_refusal_not_a_price() {
        let table: BTreeMap<String, Decimal> = [("x".to_owned(), MULTIPLIER_MAX)].into();
        let price = Price {
            base: Decimal::MAX,
            per_unit: Some(("seconds".into(), Decimal::MAX)),
            multipliers: ["a", "b", "c", "d"]
                .iter()
                .map(|p| ((*p).to_owned(), table.clone()))
                .collect(),
        };
        let mut params: BTreeMap<String, String> = ["a", "b", "c", "d"]
            .iter()
            .map(|p| ((*p).to_owned(), "x".to_owned()))
            .collect();
        params.insert("seconds".into(), UNITS_MAX.to_string());
        let e = price.estimate(&params).unwrap_err();
        assert_eq!(e.field, "operation", "{e}");
        assert!(e.to_string().contains("limit"), "{e}");
    }
}
