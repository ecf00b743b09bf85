//! The catalog: plans, packs, the sign-up bonus and operation prices, from a TOML file.
//!
//! Parsing and validation live here; the pricing arithmetic is pure domain code
//! ([`crate::domain::pricing`]). Every validation error names the field it is about.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::domain::Credits;
use crate::domain::pricing::{Decimal, MULTIPLIERS_MAX, Price};

/// The built-in catalog, printed by `tally catalog print-default`.
pub const DEFAULT_TOML: &str = include_str!("catalog.default.toml");
pub use crate::domain::DEFAULT_PLAN;
/// Longest catalog file read: 1 MiB.
pub const FILE_MAX_BYTES: u64 = 1024 * 1024;

pub use crate::domain::plan::{Allowance, Period, Rollover};

/// A tier with an allowance and entitlements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Name shown to people.
    pub display_name: String,
    /// The allowance, if the plan has one.
    pub allowance: Option<Allowance>,
    /// Under this many available credits an account is "low on balance".
    pub low_balance_threshold: i64,
    /// Free-form key/value strings returned to callers.
    pub entitlements: BTreeMap<String, String>,
    /// The Stripe Price of the plan's subscription (plans without one are not sold).
    pub stripe_price_id: Option<String>,
    /// Credits granted for each paid subscription invoice.
    pub subscription_credits: Option<i64>,
}

/// A purchasable bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pack {
    /// Name shown to people.
    pub display_name: String,
    /// Credits granted.
    pub credits: i64,
    /// The Stripe Price that sells it.
    pub stripe_price_id: String,
    /// Lifetime of the granted credits, if they expire.
    pub expires_in: Option<Duration>,
}

/// Whether a Stripe Price id is a stand-in (the built-in catalog's `price_*_placeholder`, or
/// anything that is not a `price_`/`plan_` id).
#[must_use]
pub fn is_placeholder_price(id: &str) -> bool {
    let id = id.trim();
    id.to_ascii_lowercase().contains("placeholder")
        || !(id.starts_with("price_") || id.starts_with("plan_"))
        || id.len() <= "price_".len()
}

impl Catalog {
    /// Whether `available` credits are under `plan`'s low-balance threshold (an unknown plan
    /// has none).
    #[must_use]
    pub fn is_low(&self, plan: &str, available: i64) -> bool {
        self.plans
            .get(plan)
            .is_some_and(|p| available < p.low_balance_threshold)
    }

    /// The catalog fields whose Stripe Price is a placeholder, as `packs.x.stripe_price_id`.
    #[must_use]
    pub fn placeholder_prices(&self) -> Vec<String> {
        let packs = self
            .packs
            .iter()
            .filter(|(_, p)| is_placeholder_price(&p.stripe_price_id))
            .map(|(name, _)| format!("packs.{name}.stripe_price_id"));
        let plans = self
            .plans
            .iter()
            .filter(|(_, p)| {
                p.stripe_price_id
                    .as_deref()
                    .is_some_and(is_placeholder_price)
            })
            .map(|(name, _)| format!("plans.{name}.stripe_price_id"));
        packs.chain(plans).collect()
    }
}

/// A one-time grant for new accounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bonus {
    /// Credits.
    pub amount: i64,
    /// Lifetime, if they expire.
    pub expires_in: Option<Duration>,
}

/// A priced operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// What it is, for people.
    pub description: String,
    /// How it is priced.
    pub price: Price,
}

/// The validated catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Catalog {
    /// Sign-up bonus (none if absent).
    pub signup_bonus: Option<Bonus>,
    /// Plans by name; always has [`DEFAULT_PLAN`].
    pub plans: BTreeMap<String, Plan>,
    /// Packs by id.
    pub packs: BTreeMap<String, Pack>,
    /// Operations by name.
    pub pricing: BTreeMap<String, Operation>,
    /// Outbound events: where they go.
    pub events: Events,
}

/// The `[events]` table: endpoints that receive Tally's outbound events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Events {
    /// Endpoints by name.
    pub endpoints: BTreeMap<String, Endpoint>,
    /// `credits.expiring` is sent this long before a grant expires (default 7 days).
    pub expiring_horizon: Option<Duration>,
}

/// An endpoint of `[events.endpoints.<name>]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Where events are POSTed (`https://`, or `http://` only for private addresses allowed
    /// with `--events-allow-private`).
    pub url: String,
    /// Type filters (`credits.low_balance`, `credits.*`, `*`); empty: every type.
    pub types: Vec<String>,
    /// Where its signing secret(s) are read from (`whsec_…`, two separated by a space during
    /// a rotation). The secret itself is never in the catalog.
    pub secret: SecretSource,
}

/// Where an endpoint's signing secret is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable (`secret_env`).
    Env(String),
    /// A file, e.g. a mounted Kubernetes Secret (`secret_file`).
    File(std::path::PathBuf),
}

/// Most endpoints a catalog may name.
pub const ENDPOINTS_MAX: usize = 16;
/// Longest endpoint URL, in bytes.
pub const ENDPOINT_URL_MAX: usize = 2048;

// --- the file format -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDecimal {
    Int(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawRollover {
    Named(String),
    Capped { capped: i64 },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllowance {
    amount: i64,
    period: Period,
    #[serde(default)]
    rollover: Option<RawRollover>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    display_name: Option<String>,
    allowance: Option<RawAllowance>,
    #[serde(default)]
    low_balance_threshold: i64,
    #[serde(default)]
    entitlements: BTreeMap<String, String>,
    stripe_price_id: Option<String>,
    subscription_credits: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPack {
    display_name: Option<String>,
    credits: i64,
    stripe_price_id: String,
    expires_in: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBonus {
    amount: i64,
    expires_in: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPerUnit {
    param: String,
    credits: RawDecimal,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperation {
    #[serde(default)]
    description: String,
    base: Option<RawDecimal>,
    per_unit: Option<RawPerUnit>,
    #[serde(default)]
    multipliers: BTreeMap<String, BTreeMap<String, RawDecimal>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    url: String,
    #[serde(default)]
    types: Vec<String>,
    secret_env: Option<String>,
    secret_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEvents {
    #[serde(default)]
    endpoints: BTreeMap<String, RawEndpoint>,
    expiring_horizon: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    events: RawEvents,
    signup_bonus: Option<RawBonus>,
    #[serde(default)]
    plans: BTreeMap<String, RawPlan>,
    #[serde(default)]
    packs: BTreeMap<String, RawPack>,
    #[serde(default)]
    pricing: BTreeMap<String, RawOperation>,
}

/// A catalog that does not validate: the field and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("catalog: {field}: {reason}")]
pub struct CatalogError {
    /// Dotted path of the field (`plans.pro.allowance.amount`).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> CatalogError {
    CatalogError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn name_ok(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn credits(field: &str, n: i64) -> Result<i64, CatalogError> {
    Credits::new("amount", n)
        .map(Credits::get)
        .map_err(|_| err(field, format!("must be 1..={} credits", Credits::MAX)))
}

fn decimal(field: &str, d: &RawDecimal) -> Result<Decimal, CatalogError> {
    match d {
        RawDecimal::Int(n) => Decimal::parse(&n.to_string()),
        RawDecimal::Text(t) => Decimal::parse(t),
    }
    .map_err(|e| err(field, e))
}

fn lifetime(field: &str, s: Option<&String>) -> Result<Option<Duration>, CatalogError> {
    s.map(|s| humantime::parse_duration(s).map_err(|e| err(field, format!("{s:?}: {e}"))))
        .transpose()
}

fn parse_plans(raw: BTreeMap<String, RawPlan>) -> Result<BTreeMap<String, Plan>, CatalogError> {
    let mut plans = BTreeMap::new();
    for (name, p) in raw {
        let at = |f: &str| format!("plans.{name}.{f}");
        if !name_ok(&name) {
            return Err(err(
                format!("plans.{name}"),
                "names are 1..=64 of [a-z0-9_-]",
            ));
        }
        let allowance = p
            .allowance
            .map(|a| {
                let rollover = match a.rollover {
                    None => Rollover::None,
                    Some(RawRollover::Named(n)) if n == "none" => Rollover::None,
                    Some(RawRollover::Named(n)) => {
                        return Err(err(
                            at("allowance.rollover"),
                            format!("{n:?}: use \"none\" or {{ capped = N }}"),
                        ));
                    }
                    Some(RawRollover::Capped { capped }) => {
                        Rollover::Capped(credits(&at("allowance.rollover.capped"), capped)?)
                    }
                };
                Ok(Allowance {
                    amount: credits(&at("allowance.amount"), a.amount)?,
                    period: a.period,
                    rollover,
                })
            })
            .transpose()?;
        if !(0..=Credits::MAX).contains(&p.low_balance_threshold) {
            return Err(err(
                at("low_balance_threshold"),
                format!("must be 0..={}", Credits::MAX),
            ));
        }
        let display_name = p.display_name.unwrap_or_else(|| name.clone());
        let subscription_credits = p
            .subscription_credits
            .map(|n| credits(&at("subscription_credits"), n))
            .transpose()?;
        plans.insert(
            name,
            Plan {
                stripe_price_id: p.stripe_price_id.filter(|s| !s.trim().is_empty()),
                subscription_credits,
                display_name,
                allowance,
                low_balance_threshold: p.low_balance_threshold,
                entitlements: p.entitlements,
            },
        );
    }
    Ok(plans)
}

fn parse_packs(raw: BTreeMap<String, RawPack>) -> Result<BTreeMap<String, Pack>, CatalogError> {
    let mut packs = BTreeMap::new();
    for (id, p) in raw {
        let at = |f: &str| format!("packs.{id}.{f}");
        if !name_ok(&id) {
            return Err(err(format!("packs.{id}"), "ids are 1..=64 of [a-z0-9_-]"));
        }
        if p.stripe_price_id.trim().is_empty() {
            return Err(err(at("stripe_price_id"), "is required"));
        }
        let pack = Pack {
            display_name: p.display_name.unwrap_or_else(|| id.clone()),
            credits: credits(&at("credits"), p.credits)?,
            stripe_price_id: p.stripe_price_id,
            expires_in: lifetime(&at("expires_in"), p.expires_in.as_ref())?,
        };
        packs.insert(id, pack);
    }
    Ok(packs)
}

fn parse_pricing(
    raw: BTreeMap<String, RawOperation>,
) -> Result<BTreeMap<String, Operation>, CatalogError> {
    let mut pricing = BTreeMap::new();
    for (name, o) in raw {
        let at = |f: &str| format!("pricing.{name}.{f}");
        if !name_ok(&name) {
            return Err(err(
                format!("pricing.{name}"),
                "names are 1..=64 of [a-z0-9_-]",
            ));
        }
        if o.multipliers.len() > MULTIPLIERS_MAX {
            return Err(err(
                at("multipliers"),
                format!("at most {MULTIPLIERS_MAX} parameters"),
            ));
        }
        let base = o
            .base
            .as_ref()
            .map_or(Ok(Decimal::whole(0)), |b| decimal(&at("base"), b))?;
        let per_unit = o
            .per_unit
            .map(|u| {
                Ok::<_, CatalogError>((
                    u.param.clone(),
                    decimal(&at("per_unit.credits"), &u.credits)?,
                ))
            })
            .transpose()?;
        let mut multipliers = BTreeMap::new();
        for (param, table) in o.multipliers {
            if table.is_empty() {
                return Err(err(
                    at(&format!("multipliers.{param}")),
                    "needs at least one value",
                ));
            }
            let mut values = BTreeMap::new();
            for (value, m) in table {
                let field = at(&format!("multipliers.{param}.{value}"));
                let m = decimal(&field, &m)?;
                if m > crate::domain::pricing::MULTIPLIER_MAX {
                    return Err(err(
                        field,
                        format!("must be at most {}", crate::domain::pricing::MULTIPLIER_MAX),
                    ));
                }
                values.insert(value.clone(), m);
            }
            multipliers.insert(param, values);
        }
        if per_unit
            .as_ref()
            .is_some_and(|(p, _)| multipliers.contains_key(p))
        {
            return Err(err(at("per_unit.param"), "is also a multiplier parameter"));
        }
        if base == Decimal::whole(0) && per_unit.is_none() {
            return Err(err(
                at("base"),
                "an operation needs a base or a per_unit price",
            ));
        }
        pricing.insert(
            name,
            Operation {
                description: o.description,
                price: Price {
                    base,
                    per_unit,
                    multipliers,
                },
            },
        );
    }
    Ok(pricing)
}

fn parse_events(raw: RawEvents) -> Result<Events, CatalogError> {
    if raw.endpoints.len() > ENDPOINTS_MAX {
        return Err(err(
            "events.endpoints",
            format!("at most {ENDPOINTS_MAX} endpoints"),
        ));
    }
    let mut endpoints = BTreeMap::new();
    for (name, e) in raw.endpoints {
        let at = |f: &str| format!("events.endpoints.{name}.{f}");
        if !name_ok(&name) {
            return Err(err(
                format!("events.endpoints.{name}"),
                "names are 1..=64 of [a-z0-9_-]",
            ));
        }
        let url = e.url.trim().to_owned();
        if url.len() > ENDPOINT_URL_MAX {
            return Err(err(
                at("url"),
                format!("longer than {ENDPOINT_URL_MAX} bytes"),
            ));
        }
        let uri: http::Uri = url
            .parse()
            .map_err(|e| err(at("url"), format!("not a URL: {e}")))?;
        if !matches!(uri.scheme_str(), Some("https" | "http")) || uri.host().is_none() {
            return Err(err(
                at("url"),
                "must be an http:// or https:// URL with a host",
            ));
        }
        for f in &e.types {
            crate::domain::event::check_filter(f).map_err(|r| err(at("types"), r))?;
        }
        let secret = match (e.secret_env, e.secret_file) {
            (Some(env), None) => {
                let ok = !env.is_empty()
                    && env.len() <= 128
                    && env
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
                if !ok {
                    return Err(err(
                        at("secret_env"),
                        "the name of an environment variable ([A-Z0-9_], up to 128)",
                    ));
                }
                SecretSource::Env(env)
            }
            (None, Some(file)) if !file.trim().is_empty() && file.len() <= 4096 => {
                SecretSource::File(file.into())
            }
            _ => {
                return Err(err(
                    format!("events.endpoints.{name}"),
                    "needs secret_env (a variable's name) or secret_file (a path), not both",
                ));
            }
        };
        endpoints.insert(
            name,
            Endpoint {
                url,
                types: e.types,
                secret,
            },
        );
    }
    let expiring_horizon = lifetime("events.expiring_horizon", raw.expiring_horizon.as_ref())?;
    if expiring_horizon.is_some_and(|h| h > Duration::from_hours(366 * 24)) {
        return Err(err("events.expiring_horizon", "at most 366 days"));
    }
    Ok(Events {
        endpoints,
        expiring_horizon,
    })
}

impl Catalog {
    /// The plans' allowances and the events' rules, for storage.
    #[must_use]
    pub fn policy(&self) -> crate::domain::plan::Policy {
        use crate::domain::event::{EXPIRING_HORIZON_DEFAULT, EventRules, Subscriber};
        crate::domain::plan::Policy {
            allowances: self
                .plans
                .iter()
                .filter_map(|(name, p)| p.allowance.clone().map(|a| (name.clone(), a)))
                .collect(),
            events: EventRules {
                subscribers: self
                    .events
                    .endpoints
                    .iter()
                    .map(|(name, e)| Subscriber {
                        name: name.clone(),
                        types: e.types.clone(),
                    })
                    .collect(),
                low_balance: self
                    .plans
                    .iter()
                    .map(|(name, p)| (name.clone(), p.low_balance_threshold))
                    .collect(),
                expiring_horizon: self
                    .events
                    .expiring_horizon
                    .and_then(|h| chrono::TimeDelta::from_std(h).ok())
                    .unwrap_or(EXPIRING_HORIZON_DEFAULT),
            },
        }
    }

    /// The built-in catalog.
    ///
    /// # Errors
    /// Never for the shipped file (a unit test parses it); kept fallible for symmetry.
    pub fn builtin() -> Result<Self, CatalogError> {
        Self::parse(DEFAULT_TOML)
    }

    /// Reads and validates a catalog file.
    ///
    /// # Errors
    /// [`CatalogError`] naming the file problem or the invalid field.
    pub fn load(path: &std::path::Path) -> Result<Self, CatalogError> {
        let field = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| err(&field, e.to_string()))?;
        if meta.len() > FILE_MAX_BYTES {
            return Err(err(field, format!("larger than {FILE_MAX_BYTES} bytes")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(&field, e.to_string()))?;
        Self::parse(&text)
    }

    /// Parses and validates catalog TOML.
    ///
    /// # Errors
    /// [`CatalogError`] naming the invalid field.
    pub fn parse(text: &str) -> Result<Self, CatalogError> {
        let raw: RawCatalog =
            toml::from_str(text).map_err(|e| err("(file)", e.message().to_owned()))?;
        let signup_bonus = raw
            .signup_bonus
            .map(|b| {
                Ok::<_, CatalogError>(Bonus {
                    amount: credits("signup_bonus.amount", b.amount)?,
                    expires_in: lifetime("signup_bonus.expires_in", b.expires_in.as_ref())?,
                })
            })
            .transpose()?;
        let plans = parse_plans(raw.plans)?;
        if !plans.contains_key(DEFAULT_PLAN) {
            return Err(err(
                "plans",
                format!("a plan named {DEFAULT_PLAN:?} is required (every account starts on it)"),
            ));
        }
        let packs = parse_packs(raw.packs)?;
        let pricing = parse_pricing(raw.pricing)?;
        let events = parse_events(raw.events)?;
        Ok(Self {
            signup_bonus,
            plans,
            packs,
            pricing,
            events,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_catalog_has_the_documented_defaults() {
        let c = Catalog::builtin().unwrap();
        let daily = |p: &str| c.plans[p].allowance.as_ref().map(|a| (a.amount, a.period));
        assert_eq!(daily("free"), Some((5, Period::Daily)));
        assert_eq!(daily("pro"), Some((20, Period::Daily)));
        assert_eq!(daily("enterprise"), Some((50, Period::Daily)));
        assert_eq!(
            c.plans["enterprise"].allowance.as_ref().unwrap().rollover,
            Rollover::Capped(100)
        );
        assert_eq!(c.plans["free"].entitlements["watermark"], "true");
        assert_eq!(c.signup_bonus.as_ref().unwrap().amount, 100);
        assert_eq!(c.packs["starter"].credits, 500);
        assert!(
            c.pricing.contains_key("video_export") && c.pricing.contains_key("image_generation")
        );
    }

    #[test]
    fn invalid_catalogs_name_the_field() {
        let bad = |toml: &str, field: &str| {
            let e = Catalog::parse(toml).unwrap_err();
            assert!(e.field.contains(field), "{e} (wanted {field})");
        };
        bad("[plans.pro]\n", "plans");
        bad(
            "[plans.free]\nallowance = { amount = 0, period = \"daily\" }\n",
            "plans.free.allowance.amount",
        );
        bad(
            "[plans.free]\nallowance = { amount = 5, period = \"hourly\" }\n",
            "(file)",
        );
        bad(
            "[plans.free]\nallowance = { amount = 5, period = \"daily\", rollover = \"all\" }\n",
            "rollover",
        );
        bad(
            "[plans.free]\n[packs.x]\ncredits = 5\nstripe_price_id = \"\"\n",
            "packs.x.stripe_price_id",
        );
        bad(
            "[plans.free]\n[pricing.op]\nbase = \"1.2345\"\n",
            "pricing.op.base",
        );
        bad(
            "[plans.free]\n[pricing.op]\ndescription = \"nothing\"\n",
            "pricing.op.base",
        );
        bad("[plans.free]\n[pricing.Op]\nbase = 1\n", "pricing.Op");
        bad(
            "[plans.free]\n[pricing.op]\nbase = 1\nmultipliers = { res = { \"8k\" = \"1000001\" } }\n",
            "pricing.op.multipliers.res.8k",
        );
        bad("[plans.free]\nsurprise = 1\n", "(file)");
        let ep = |body: &str| format!("[plans.free]\n[events.endpoints.app]\n{body}\n");
        bad(
            &ep("url = \"ftp://x\"\nsecret_env = \"S\""),
            "events.endpoints.app.url",
        );
        bad(
            &ep("url = \"https://x\"\nsecret_env = \"S\"\ntypes = [\"credits.nope\"]"),
            "events.endpoints.app.types",
        );
        bad(
            &ep("url = \"https://x\"\nsecret_env = \"whsec_x\""),
            "secret_env",
        );
        let ok = Catalog::parse(&ep(
            "url = \"https://app.example/hooks\"\nsecret_env = \"APP_SECRET\"\ntypes = [\"credits.*\"]",
        ))
        .unwrap();
        let rules = ok.policy().events;
        assert!(rules.enabled());
        assert_eq!(rules.subscribers[0].types, ["credits.*"]);
    }
}
