//! The event envelope and the fields we use, all optional; and what each event does.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::catalog::Catalog;

/// The envelope of a Stripe event. Missing fields default; unknown ones are ignored.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Envelope {
    /// `evt_...`.
    pub id: String,
    /// `checkout.session.completed`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// Test or live mode.
    pub livemode: Option<bool>,
    /// Unix seconds.
    pub created: Option<i64>,
    /// The API version the event was rendered with.
    pub api_version: Option<String>,
    /// `{ "object": ... }`.
    pub data: Data,
}

/// The `data` member.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Data {
    /// The object the event is about.
    pub object: Value,
}

fn text<'v>(o: &'v Value, key: &str) -> Option<&'v str> {
    o.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// What a verified event does to the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Grant a purchased pack, once per business key.
    GrantPack {
        /// `checkout_session:<id>`.
        business_key: String,
        /// The account credited.
        account_id: String,
        /// The pack bought.
        pack_id: String,
    },
    /// Record a fact without moving credits (a pending or failed payment).
    Record {
        /// `checkout_session:<id>`.
        business_key: String,
        /// `pending` or `failed`.
        state: &'static str,
    },
    /// Nothing to do (logged with the reason); the event is still recorded as received.
    Nothing(&'static str),
}

/// Decides what an event does. Only Checkout Sessions that Tally created carry the account and
/// pack (`metadata.account_id` / `client_reference_id` and `metadata.pack_id`).
#[must_use]
pub fn decide(event: &Envelope, catalog: &Catalog) -> Effect {
    let o = &event.data.object;
    match event.kind.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            checkout_paid(o, catalog)
        }
        "checkout.session.async_payment_failed" => match text(o, "id") {
            Some(id) => Effect::Record {
                business_key: format!("checkout_session:{id}"),
                state: "failed",
            },
            None => Effect::Nothing("checkout session without an id"),
        },
        _ => Effect::Nothing("event type not handled"),
    }
}

fn checkout_paid(o: &Value, catalog: &Catalog) -> Effect {
    let Some(id) = text(o, "id") else {
        return Effect::Nothing("checkout session without an id");
    };
    match text(o, "mode") {
        Some("payment") => {}
        Some("subscription") => {
            return Effect::Nothing("subscription credits come from paid invoices");
        }
        _ => return Effect::Nothing("not a payment-mode session"),
    }
    let business_key = format!("checkout_session:{id}");
    match text(o, "payment_status") {
        Some("paid") => {}
        Some("unpaid") => {
            return Effect::Record {
                business_key,
                state: "pending",
            };
        }
        _ => return Effect::Nothing("nothing to pay"),
    }
    let metadata: BTreeMap<String, String> = o
        .get("metadata")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let account = metadata
        .get("account_id")
        .map(String::as_str)
        .or_else(|| text(o, "client_reference_id"));
    let (Some(account), Some(pack)) = (account, metadata.get("pack_id")) else {
        return Effect::Nothing("session has no tally account or pack (not created by tally)");
    };
    if !catalog.packs.contains_key(pack) {
        return Effect::Nothing("unknown pack");
    }
    Effect::GrantPack {
        business_key,
        account_id: account.to_owned(),
        pack_id: pack.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(kind: &str, object: &Value) -> Envelope {
        Envelope {
            id: "evt_1".into(),
            kind: kind.into(),
            data: Data {
                object: object.clone(),
            },
            ..Envelope::default()
        }
    }

    #[test]
    fn paid_payment_sessions_made_by_tally_grant_their_pack() {
        let c = Catalog::builtin().unwrap();
        let paid = serde_json::json!({"id": "cs_1", "mode": "payment", "payment_status": "paid",
            "client_reference_id": "u1", "metadata": {"pack_id": "starter"}});
        let want = Effect::GrantPack {
            business_key: "checkout_session:cs_1".into(),
            account_id: "u1".into(),
            pack_id: "starter".into(),
        };
        assert_eq!(decide(&env("checkout.session.completed", &paid), &c), want);
        assert_eq!(
            decide(&env("checkout.session.async_payment_succeeded", &paid), &c),
            want
        );
        let unpaid = serde_json::json!({"id": "cs_1", "mode": "payment", "payment_status": "unpaid", "metadata": {"pack_id": "starter"}});
        assert_eq!(
            decide(&env("checkout.session.completed", &unpaid), &c),
            Effect::Record {
                business_key: "checkout_session:cs_1".into(),
                state: "pending"
            }
        );
        let foreign = serde_json::json!({"id": "cs_2", "mode": "payment", "payment_status": "paid", "metadata": {}});
        assert!(matches!(
            decide(&env("checkout.session.completed", &foreign), &c),
            Effect::Nothing(_)
        ));
        let unknown_pack = serde_json::json!({"id": "cs_3", "mode": "payment", "payment_status": "paid", "client_reference_id": "u1", "metadata": {"pack_id": "nope"}});
        assert_eq!(
            decide(&env("checkout.session.completed", &unknown_pack), &c),
            Effect::Nothing("unknown pack")
        );
        assert!(matches!(
            decide(&env("product.created", &serde_json::json!({})), &c),
            Effect::Nothing(_)
        ));
    }

    #[test]
    fn envelopes_parse_leniently() {
        let e: Envelope =
            serde_json::from_str(r#"{"type": "x", "data": {"object": {"id": 5}}, "extra": [1]}"#)
                .unwrap();
        assert_eq!(
            (e.id.as_str(), e.kind.as_str(), e.livemode),
            ("", "x", None)
        );
        let e: Envelope = serde_json::from_str("{}").unwrap();
        assert!(e.data.object.is_null());
    }
}
