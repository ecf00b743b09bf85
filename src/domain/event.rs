//! Outbound events (issue 28): which events a change makes, their bodies, where they go, and
//! the delivery schedule. Pure: the backends write what [`of_book`] returns in the same
//! transaction as the change (the transactional outbox), and the dispatcher (`events/`) asks
//! [`next_attempt`] when to try again and [`address_allowed`] where it may connect.

use core::net::IpAddr;
use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use serde_json::{Value, json};

use super::book::{Book, Grant, Ids, Source};
use super::rules::EntryKind;

/// An event's type: a versioned, dotted name (a new version of a body gets a new name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventType {
    /// An account was created (its plan and sign-up bonus).
    AccountOpened,
    /// Credits were added (a purchase, a subscription, the bonus, an allowance, a promotion,
    /// an operator's give-back).
    CreditsGranted,
    /// The balance fell under the plan's threshold (once per crossing).
    CreditsLowBalance,
    /// A grant with credits left expires within the horizon (once per grant).
    CreditsExpiring,
    /// A grant's unused credits expired.
    CreditsExpired,
    /// Credits were taken back after a refund or a dispute.
    CreditsClawedBack,
    /// A purchase was paid and its credits granted.
    PurchaseCompleted,
    /// A purchase's payment failed.
    PurchaseFailed,
    /// A subscription's status, plan, period end or cancellation changed.
    SubscriptionUpdated,
    /// A hold expired without being committed or refunded.
    HoldExpired,
}

impl EventType {
    /// Every type.
    pub const ALL: [Self; 10] = [
        Self::AccountOpened,
        Self::CreditsGranted,
        Self::CreditsLowBalance,
        Self::CreditsExpiring,
        Self::CreditsExpired,
        Self::CreditsClawedBack,
        Self::PurchaseCompleted,
        Self::PurchaseFailed,
        Self::SubscriptionUpdated,
        Self::HoldExpired,
    ];

    /// The wire name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::AccountOpened => "account.opened",
            Self::CreditsGranted => "credits.granted",
            Self::CreditsLowBalance => "credits.low_balance",
            Self::CreditsExpiring => "credits.expiring",
            Self::CreditsExpired => "credits.expired",
            Self::CreditsClawedBack => "credits.clawed_back",
            Self::PurchaseCompleted => "purchase.completed",
            Self::PurchaseFailed => "purchase.failed",
            Self::SubscriptionUpdated => "subscription.updated",
            Self::HoldExpired => "hold.expired",
        }
    }

    /// Parses a wire name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// Where a delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeliveryState {
    /// Not delivered yet: waiting for its turn, its next attempt or an endpoint re-enabled.
    Pending,
    /// A 2xx answer was received.
    Delivered,
    /// Every attempt of the schedule failed.
    Failed,
}

impl DeliveryState {
    /// Every state.
    pub const ALL: [Self; 3] = [Self::Pending, Self::Delivered, Self::Failed];

    /// The stored name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }

    /// Parses a stored name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// Which types an endpoint receives: exact names, `prefix.*`, or `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscriber {
    /// The endpoint's name (the catalog's key).
    pub name: String,
    /// Its filters; empty means every type.
    pub types: Vec<String>,
}

impl Subscriber {
    /// Whether the endpoint receives events of type `t`.
    #[must_use]
    pub fn wants(&self, t: EventType) -> bool {
        let name = t.as_str();
        self.types.is_empty()
            || self.types.iter().any(|f| {
                f == "*"
                    || f == name
                    || f.strip_suffix(".*").is_some_and(|prefix| {
                        name.strip_prefix(prefix)
                            .is_some_and(|r| r.starts_with('.'))
                    })
            })
    }
}

/// Checks an endpoint's type filter: each an event type, `family.*` of a known family, or `*`.
///
/// # Errors
/// The first filter that names nothing.
pub fn check_filter(f: &str) -> Result<(), String> {
    let known = f == "*"
        || EventType::parse(f).is_some()
        || f.strip_suffix(".*").is_some_and(|p| {
            EventType::ALL
                .iter()
                .any(|t| t.as_str().split('.').next() == Some(p))
        });
    if known {
        Ok(())
    } else {
        Err(format!(
            "{f:?} is not an event type, a family.* or *; types: {}",
            EventType::ALL.map(EventType::as_str).join(", ")
        ))
    }
}

/// What decides the events of a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRules {
    /// The endpoints and what they receive; none: no event is written at all.
    pub subscribers: Vec<Subscriber>,
    /// Plan name → its low-balance threshold (plans absent or at 0 never cross).
    pub low_balance: BTreeMap<String, i64>,
    /// `credits.expiring` is sent this long before a grant expires.
    pub expiring_horizon: TimeDelta,
}

/// `credits.expiring`'s default horizon: 7 days.
pub const EXPIRING_HORIZON_DEFAULT: TimeDelta = TimeDelta::days(7);

impl Default for EventRules {
    fn default() -> Self {
        Self {
            subscribers: Vec::new(),
            low_balance: BTreeMap::new(),
            expiring_horizon: EXPIRING_HORIZON_DEFAULT,
        }
    }
}

impl EventRules {
    /// Whether any endpoint is configured (else changes write no event).
    #[must_use]
    pub fn enabled(&self) -> bool {
        !self.subscribers.is_empty()
    }

    /// The endpoints that receive an event of type `t`.
    pub fn endpoints_for(&self, t: EventType) -> impl Iterator<Item = &str> {
        self.subscribers
            .iter()
            .filter(move |s| s.wants(t))
            .map(|s| s.name.as_str())
    }
}

/// An event as the outbox stores it: its id (the `webhook-id`, the same on every attempt and
/// for every endpoint), the account (deliveries keep each account's order), its type, the
/// signed body, and a key that makes it once-only where its cause can be seen twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    /// `evt_` + a UUIDv7 in hex.
    pub event_id: String,
    /// The account it concerns.
    pub account_id: String,
    /// Its type.
    pub kind: EventType,
    /// `{"type", "timestamp", "data"}`, exactly as sent.
    pub body: String,
    /// When the change happened.
    pub created_at: DateTime<Utc>,
    /// A second event with this key is not written (`credits.expiring:<grant>`).
    pub dedupe_key: Option<String>,
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Builds an event: the body is `{"type", "timestamp", "data"}` with `data.account_id` first.
#[must_use]
pub fn event(
    kind: EventType,
    account_id: &str,
    data: Value,
    now: DateTime<Utc>,
    ids: &mut dyn Ids,
) -> NewEvent {
    let mut fields = serde_json::Map::new();
    fields.insert("account_id".into(), Value::String(account_id.to_owned()));
    if let Value::Object(m) = data {
        fields.extend(m);
    }
    let body = json!({
        "type": kind.as_str(),
        "timestamp": time(now),
        "data": Value::Object(fields),
    });
    NewEvent {
        event_id: ids.event_id(),
        account_id: account_id.to_owned(),
        kind,
        body: body.to_string(),
        created_at: now,
        dedupe_key: None,
    }
}

fn grant_fields(g: &Grant) -> Value {
    json!({
        "grant_id": g.grant_id,
        "source": g.source.as_str(),
        "expires_at": g.expires_at.map(time),
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Value::Object(a), Value::Object(b)) = (&mut a, b) {
        a.extend(b);
    }
    a
}

/// The event of one entry (a grant, a grant's expiry, a hold's expiry) and its data, with the
/// balance right after it.
fn entry_event(book: &Book, e: &super::book::NewEntry, running: i64) -> Option<(EventType, Value)> {
    let grant = e.grant_id.as_ref().and_then(|id| book.grants.get(id));
    match (e.kind, grant) {
        (EntryKind::Grant, Some(g)) => {
            let key = matches!(g.source, Source::Purchase | Source::Subscription)
                .then(|| book.fact.clone())
                .flatten();
            Some((
                EventType::CreditsGranted,
                merge(
                    grant_fields(g),
                    json!({"amount": e.available_delta, "reason": g.reason,
                           "business_key": key, "available": running}),
                ),
            ))
        }
        (EntryKind::Expiration, Some(g)) => Some((
            EventType::CreditsExpired,
            merge(
                grant_fields(g),
                json!({"amount": e.available_delta.saturating_neg(), "available": running}),
            ),
        )),
        (EntryKind::Expire, _) => {
            let h = e.hold_id.as_ref().and_then(|id| book.holds.get(id))?;
            Some((
                EventType::HoldExpired,
                json!({"hold_id": h.hold_id, "amount": h.amount, "metadata": h.metadata,
                       "expired_at": time(h.expires_at), "available": running}),
            ))
        }
        _ => None,
    }
}

/// The events a change to `book` makes, in order, from its entries and the book after it
/// (nothing when no endpoint is configured):
/// - `account.opened` when the change created the account ([`Book::opened`]);
/// - `credits.granted` per grant entry; `credits.expired` per expired grant; `hold.expired`
///   per expired hold; one `credits.clawed_back` for the claw-back entries;
/// - `credits.low_balance` when the balance (available less debt) went from at or above the
///   plan's threshold to under it: once per crossing, again only after it rose above (an
///   account opened under it has not crossed it).
#[must_use]
pub fn of_book(
    book: &Book,
    rules: &EventRules,
    now: DateTime<Utc>,
    ids: &mut dyn Ids,
) -> Vec<NewEvent> {
    if !rules.enabled() || (book.entries.is_empty() && !book.opened) {
        return Vec::new();
    }
    let account = book.account_id.as_str();
    let after = book.net_available();
    let mut out = Vec::new();
    if book.opened {
        let bonus: i64 = book
            .grants
            .values()
            .filter(|g| g.source == Source::SignupBonus)
            .map(|g| g.granted)
            .fold(0, i64::saturating_add);
        out.push(event(
            EventType::AccountOpened,
            account,
            json!({"plan": book.plan, "bonus": bonus, "available": after}),
            now,
            ids,
        ));
    }
    // Each event tells the balance right after its own entry: a running sum from the balance
    // before the write.
    let moved: i64 = book.entries.iter().fold(0, |m, e| {
        m.saturating_add(e.available_delta)
            .saturating_sub(e.debt_delta)
    });
    let mut running = after.saturating_sub(moved);
    let mut clawed: i64 = 0;
    for e in &book.entries {
        running = running
            .saturating_add(e.available_delta)
            .saturating_sub(e.debt_delta);
        if e.kind == EntryKind::Clawback {
            clawed = clawed
                .saturating_sub(e.available_delta)
                .saturating_add(e.debt_delta);
        } else if let Some(data) = entry_event(book, e, running) {
            out.push(event(data.0, account, data.1, now, ids));
        }
    }
    if clawed > 0 {
        let reason = book
            .entries
            .iter()
            .find(|e| e.kind == EntryKind::Clawback)
            .map(|e| e.reason.clone())
            .unwrap_or_default();
        out.push(event(
            EventType::CreditsClawedBack,
            account,
            json!({"amount": clawed, "debt": book.debt, "reason": reason,
                   "business_key": book.fact, "available": after}),
            now,
            ids,
        ));
    }
    let threshold = rules.low_balance.get(&book.plan).copied().unwrap_or(0);
    // An account opened under its threshold has not crossed it (its `account.opened` tells
    // the balance); its first crossing is the first one downwards after that.
    let before = if book.opened {
        after
    } else {
        after.saturating_sub(moved)
    };
    if threshold > 0 && before >= threshold && after < threshold {
        out.push(event(
            EventType::CreditsLowBalance,
            account,
            json!({"plan": book.plan, "available": after, "threshold": threshold}),
            now,
            ids,
        ));
    }
    out
}

/// `credits.expiring` for a grant with credits left (once per grant: its dedupe key).
#[must_use]
pub fn expiring(g: &Grant, now: DateTime<Utc>, ids: &mut dyn Ids) -> NewEvent {
    let mut e = event(
        EventType::CreditsExpiring,
        &g.account_id,
        merge(grant_fields(g), json!({"remaining": g.remaining})),
        now,
        ids,
    );
    e.dedupe_key = Some(format!("credits.expiring:{}", g.grant_id));
    e
}

/// `purchase.completed` (granted) or `purchase.failed` for a purchase that reached that state.
#[must_use]
pub fn purchase(
    p: &super::payment::Purchase,
    now: DateTime<Utc>,
    ids: &mut dyn Ids,
) -> Option<NewEvent> {
    use super::payment::PurchaseState;
    let account = p.account_id.as_deref()?;
    let kind = match p.state {
        PurchaseState::Granted => EventType::PurchaseCompleted,
        PurchaseState::Failed => EventType::PurchaseFailed,
        PurchaseState::Pending => return None,
    };
    Some(event(
        kind,
        account,
        json!({"business_key": p.business_key, "credits": p.credits,
               "grant_id": p.grant_id, "amount_paid": p.amount_paid}),
        now,
        ids,
    ))
}

/// `subscription.updated` for a subscription state that was stored.
#[must_use]
pub fn subscription(
    s: &super::payment::Subscription,
    now: DateTime<Utc>,
    ids: &mut dyn Ids,
) -> NewEvent {
    let period_end = s
        .period_end
        .and_then(|t| DateTime::<Utc>::from_timestamp(t, 0))
        .map(time);
    event(
        EventType::SubscriptionUpdated,
        &s.account_id,
        json!({"subscription_id": s.subscription_id, "status": s.status, "plan": s.plan,
               "current_period_end": period_end,
               "cancel_at_period_end": s.cancel_at_period_end}),
        now,
        ids,
    )
}

/// The default retry schedule: the delay before each attempt after a failure (the first is
/// immediate), then the event is failed: 0, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
pub const RETRY_SCHEDULE_DEFAULT: [std::time::Duration; 8] = [
    std::time::Duration::ZERO,
    std::time::Duration::from_secs(5),
    std::time::Duration::from_mins(5),
    std::time::Duration::from_mins(30),
    std::time::Duration::from_hours(2),
    std::time::Duration::from_hours(5),
    std::time::Duration::from_hours(10),
    std::time::Duration::from_hours(10),
];

/// After `attempts` failed attempts, the delay before the next one (`jitter_permille` in
/// 0..=1000 spreads it over 80 %..120 %), or None when the schedule is spent and the event is
/// failed.
#[must_use]
pub fn next_attempt(
    schedule: &[std::time::Duration],
    attempts: u32,
    jitter_permille: u32,
) -> Option<TimeDelta> {
    let delay = schedule.get(usize::try_from(attempts).ok()?)?;
    let factor = 800u32.saturating_add(jitter_permille.min(1000).saturating_mul(400) / 1000);
    let ms = delay.as_millis().saturating_mul(u128::from(factor)) / 1000;
    TimeDelta::try_milliseconds(i64::try_from(ms).ok()?)
}

/// Whether a delivery may connect to `ip`: public unicast addresses only, unless private
/// ones (loopback, RFC 1918, link-local, unique-local, CGNAT, unspecified, multicast,
/// documentation and benchmarking ranges) are explicitly allowed.
#[must_use]
pub fn address_allowed(ip: IpAddr, allow_private: bool) -> bool {
    allow_private || !is_private(ip)
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let first = v6.segments().first().copied().unwrap_or(0);
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments().get(1) == Some(&0x0db8)
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::domain::Credits;

    struct Seq(u32);
    impl Ids for Seq {
        fn grant_id(&mut self) -> String {
            self.0 = self.0.saturating_add(1);
            format!("g{}", self.0)
        }
    }

    fn rules(threshold: i64) -> EventRules {
        EventRules {
            subscribers: vec![Subscriber {
                name: "app".into(),
                types: vec![],
            }],
            low_balance: [("free".to_owned(), threshold)].into(),
            ..EventRules::default()
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn kinds(v: &[NewEvent]) -> Vec<&'static str> {
        v.iter().map(|e| e.kind.as_str()).collect()
    }

    fn data(e: &NewEvent) -> Value {
        serde_json::from_str::<Value>(&e.body).unwrap()["data"].clone()
    }

    #[test]
    fn filters_match_names_families_and_everything() {
        let s = |t: &[&str]| Subscriber {
            name: "x".into(),
            types: t.iter().map(|s| (*s).to_owned()).collect(),
        };
        assert!(s(&[]).wants(EventType::HoldExpired));
        assert!(s(&["*"]).wants(EventType::HoldExpired));
        assert!(s(&["credits.*"]).wants(EventType::CreditsExpired));
        assert!(!s(&["credits.*"]).wants(EventType::HoldExpired));
        assert!(!s(&["credit.*"]).wants(EventType::CreditsExpired));
        assert!(s(&["hold.expired"]).wants(EventType::HoldExpired));
        assert!(check_filter("credits.*").is_ok());
        assert!(check_filter("credits.nope").is_err());
        assert!(check_filter("nope.*").is_err());
    }

    #[test]
    fn low_balance_fires_once_per_downward_crossing() {
        let r = rules(100);
        let mut ids = Seq(0);
        let mut b = Book::new("u1", "free");
        b.grant(
            "g0",
            Source::Promotion,
            Credits::new("a", 150).unwrap(),
            None,
            50,
            "p",
            now(),
        )
        .unwrap();
        assert_eq!(
            kinds(&of_book(&b, &r, now(), &mut ids)),
            ["credits.granted"]
        );
        b.entries.clear();
        // 150 → 60: crosses.
        b.reserve(
            "h1",
            Credits::new("a", 90).unwrap(),
            TimeDelta::minutes(5),
            crate::domain::Metadata::default(),
            now(),
        )
        .unwrap();
        let ev = of_book(&b, &r, now(), &mut ids);
        assert_eq!(kinds(&ev), ["credits.low_balance"]);
        assert_eq!(data(&ev[0])["available"], 60);
        assert_eq!(data(&ev[0])["threshold"], 100);
        b.entries.clear();
        // 60 → 50: already under, no second event.
        b.reserve(
            "h2",
            Credits::new("a", 10).unwrap(),
            TimeDelta::minutes(5),
            crate::domain::Metadata::default(),
            now(),
        )
        .unwrap();
        assert!(of_book(&b, &r, now(), &mut ids).is_empty());
        b.entries.clear();
        // Up above (a grant), then down again: a second crossing.
        b.grant(
            "g1",
            Source::Promotion,
            Credits::new("a", 100).unwrap(),
            None,
            50,
            "p",
            now(),
        )
        .unwrap();
        b.entries.clear();
        b.reserve(
            "h3",
            Credits::new("a", 60).unwrap(),
            TimeDelta::minutes(5),
            crate::domain::Metadata::default(),
            now(),
        )
        .unwrap();
        assert_eq!(
            kinds(&of_book(&b, &r, now(), &mut ids)),
            ["credits.low_balance"]
        );
        // No endpoint: nothing at all.
        assert!(of_book(&b, &EventRules::default(), now(), &mut ids).is_empty());
    }

    #[test]
    fn an_opened_account_and_its_bonus() {
        let mut b = Book::new("u1", "free");
        b.opened = true;
        b.grant(
            "g0",
            Source::SignupBonus,
            Credits::new("a", 50).unwrap(),
            None,
            50,
            "sign-up bonus",
            now(),
        )
        .unwrap();
        let ev = of_book(&b, &rules(100), now(), &mut Seq(0));
        assert_eq!(kinds(&ev), ["account.opened", "credits.granted"]);
        assert_eq!(data(&ev[0])["bonus"], 50);
        assert_eq!(data(&ev[1])["source"], "signup_bonus");
        let body: Value = serde_json::from_str(&ev[0].body).unwrap();
        assert_eq!(body["type"], "account.opened");
        assert_eq!(body["timestamp"], "2027-01-15T08:00:00.000Z");
        assert_eq!(body["data"]["account_id"], "u1");
    }

    #[test]
    fn schedule_ends_and_jitter_stays_within_a_fifth() {
        let s = RETRY_SCHEDULE_DEFAULT;
        assert_eq!(next_attempt(&s, 0, 500), Some(TimeDelta::zero()));
        assert_eq!(next_attempt(&s, 1, 500), Some(TimeDelta::seconds(5)));
        assert_eq!(next_attempt(&s, 2, 0), Some(TimeDelta::seconds(240)));
        assert_eq!(next_attempt(&s, 2, 1000), Some(TimeDelta::seconds(360)));
        assert_eq!(next_attempt(&s, 8, 500), None);
    }

    #[test]
    fn private_addresses_are_refused_unless_allowed() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "224.0.0.1",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert!(!address_allowed(ip, false), "{a}");
            assert!(address_allowed(ip, true), "{a}");
        }
        for a in ["8.8.8.8", "2606:4700::1111", "93.184.216.34"] {
            assert!(address_allowed(a.parse().unwrap(), false), "{a}");
        }
    }
}
