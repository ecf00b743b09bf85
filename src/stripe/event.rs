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

/// A string member; empty, or with a control character (no Stripe id or status has one, and
/// PostgreSQL refuses NUL), counts as absent.
fn text<'v>(o: &'v Value, key: &str) -> Option<&'v str> {
    o.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && !s.chars().any(char::is_control))
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
        /// The PaymentIntent that paid it (refunds and disputes name it).
        payment_intent: Option<String>,
        /// What was paid, in the currency's minor units.
        amount_paid: Option<i64>,
    },
    /// A charge was refunded (cumulatively `amount_refunded` of `amount`): its purchase loses
    /// that share, whenever the purchase lands.
    Refunded {
        /// `ch_...`.
        charge: String,
        /// The PaymentIntent of the purchase, when the charge names it.
        payment_intent: Option<String>,
        /// The charge's amount.
        amount: i64,
        /// Refunded so far (cumulative).
        amount_refunded: i64,
    },
    /// A dispute (or inquiry) was opened, changed or closed.
    Dispute {
        /// `dp_...`.
        dispute: String,
        /// The disputed charge.
        charge: String,
        /// The PaymentIntent of the purchase (older API versions do not name it).
        payment_intent: Option<String>,
        /// The disputed amount (minor units).
        amount: Option<i64>,
        /// Where it stands.
        status: crate::domain::payment::DisputeStatus,
    },
    /// Record a fact without moving credits (a pending or failed payment).
    Record {
        /// `checkout_session:<id>`.
        business_key: String,
        /// `pending` or `failed`.
        state: &'static str,
    },
    /// Link an account to its Stripe customer (a subscription Checkout completed).
    Link {
        /// The account (from the session).
        account_id: String,
        /// The customer.
        customer: String,
    },
    /// Mirror a subscription's state onto the account (plan by price), if newer.
    Subscription(SubscriptionState),
    /// Grant a paid subscription invoice's plan credits, once per invoice.
    InvoicePaid {
        /// `invoice:<id>`.
        business_key: String,
        /// The customer billed.
        customer: String,
        /// The account, when the invoice carries it (subscription metadata).
        account_hint: Option<String>,
        /// The plan whose price was paid.
        plan: String,
        /// End of the period paid for (unix seconds).
        period_end: Option<i64>,
    },
    /// A subscription invoice failed: mark the subscription past due (credits stay), if the
    /// event is newer than the subscription's stored state.
    PaymentFailed {
        /// `sub_...`.
        subscription: String,
        /// The event's `created`.
        as_of: i64,
    },
    /// Nothing to do (logged with the reason); the event is still recorded as received.
    Nothing(&'static str),
}

pub use crate::domain::payment::SubscriptionState;

/// Decides what an event does. Only Checkout Sessions that Tally created carry the account and
/// pack (`metadata.account_id` / `client_reference_id` and `metadata.pack_id`).
#[must_use]
pub fn decide(event: &Envelope, catalog: &Catalog) -> Effect {
    let o = &event.data.object;
    match event.kind.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            checkout_paid(o, catalog)
        }
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted" => subscription(o, event, catalog),
        "invoice.paid" => invoice_paid(o, catalog),
        "charge.refunded" => match (text(o, "id"), o.get("amount").and_then(Value::as_i64)) {
            (Some(charge), Some(amount)) if amount > 0 => Effect::Refunded {
                charge: charge.to_owned(),
                payment_intent: text(o, "payment_intent").map(str::to_owned),
                amount,
                amount_refunded: o
                    .get("amount_refunded")
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
                    .clamp(0, amount),
            },
            _ => Effect::Nothing("refund without a charge or amount"),
        },
        "charge.dispute.created"
        | "charge.dispute.updated"
        | "charge.dispute.closed"
        | "charge.dispute.funds_withdrawn"
        | "charge.dispute.funds_reinstated" => match (text(o, "id"), text(o, "charge")) {
            (Some(d), Some(c)) => Effect::Dispute {
                dispute: d.to_owned(),
                charge: c.to_owned(),
                payment_intent: text(o, "payment_intent").map(str::to_owned),
                amount: o.get("amount").and_then(Value::as_i64).filter(|a| *a > 0),
                status: crate::domain::payment::DisputeStatus::of_stripe(
                    text(o, "status").unwrap_or("needs_response"),
                ),
            },
            _ => Effect::Nothing("dispute without an id or charge"),
        },
        "invoice.payment_failed" => match invoice_subscription(o) {
            Some(sub) => Effect::PaymentFailed {
                subscription: sub.to_owned(),
                as_of: event.created.unwrap_or(0),
            },
            None => Effect::Nothing("a failed invoice without a subscription"),
        },
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

fn metadata_of(o: &Value) -> BTreeMap<String, String> {
    o.get("metadata")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// The plan sold at `price`.
fn plan_of_price(catalog: &Catalog, price: Option<&str>) -> Option<String> {
    let price = price?;
    catalog
        .plans
        .iter()
        .find(|(_, p)| p.stripe_price_id.as_deref() == Some(price))
        .map(|(name, _)| name.clone())
}

/// Where the invoice's subscription lives: `subscription` before API 2025-03-31 (basil),
/// `parent.subscription_details.subscription` after.
fn invoice_subscription(o: &Value) -> Option<&str> {
    text(o, "subscription").or_else(|| {
        o.pointer("/parent/subscription_details/subscription")
            .and_then(Value::as_str)
    })
}

fn subscription(o: &Value, event: &Envelope, catalog: &Catalog) -> Effect {
    let (Some(id), Some(customer)) = (text(o, "id"), text(o, "customer")) else {
        return Effect::Nothing("subscription without an id or customer");
    };
    let items: &[Value] = o
        .pointer("/items/data")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let item = items.first();
    // The first item whose price is a catalog plan; payloads of old API versions carry the
    // price as a top-level `plan` instead.
    let sold = items
        .iter()
        .filter_map(|i| {
            i.pointer("/price/id")
                .or_else(|| i.pointer("/plan/id"))
                .and_then(Value::as_str)
        })
        .chain(o.pointer("/plan/id").and_then(Value::as_str))
        .find_map(|price| plan_of_price(catalog, Some(price)));
    let mut status = text(o, "status").unwrap_or("unknown").to_owned();
    if event.kind == "customer.subscription.deleted"
        && !matches!(status.as_str(), "canceled" | "incomplete_expired")
    {
        "canceled".clone_into(&mut status);
    }
    let ended = matches!(status.as_str(), "canceled" | "incomplete_expired");
    let plan = if ended { None } else { sold };
    // The period moved onto the items in API basil; read both.
    let period_end = o
        .get("current_period_end")
        .and_then(Value::as_i64)
        .or_else(|| {
            item.and_then(|i| i.get("current_period_end"))
                .and_then(Value::as_i64)
        });
    Effect::Subscription(SubscriptionState {
        customer: customer.to_owned(),
        account_hint: metadata_of(o).get("account_id").cloned(),
        subscription: id.to_owned(),
        status,
        plan: plan.unwrap_or_else(|| crate::domain::DEFAULT_PLAN.to_owned()),
        period_end,
        cancel_at_period_end: o
            .get("cancel_at_period_end")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        as_of: event.created.unwrap_or(0),
        started: o
            .get("created")
            .and_then(Value::as_i64)
            .unwrap_or_else(|| event.created.unwrap_or(0)),
    })
}

fn invoice_paid(o: &Value, catalog: &Catalog) -> Effect {
    let (Some(id), Some(customer)) = (text(o, "id"), text(o, "customer")) else {
        return Effect::Nothing("invoice without an id or customer");
    };
    if invoice_subscription(o).is_none() {
        return Effect::Nothing("not a subscription invoice");
    }
    match text(o, "billing_reason") {
        Some("subscription_create" | "subscription_cycle") => {}
        // A mid-period plan change is prorated money, not a new period: it grants nothing; the
        // next cycle grants the new plan's credits.
        Some("subscription_update") => return Effect::Nothing("proration invoice: no credits"),
        _ => return Effect::Nothing("not a subscription period invoice"),
    }
    let line = o.pointer("/lines/data/0");
    let price = line
        .and_then(|l| {
            l.pointer("/price/id")
                .or_else(|| l.pointer("/pricing/price_details/price"))
        })
        .and_then(Value::as_str);
    let Some(plan) = plan_of_price(catalog, price) else {
        return Effect::Nothing("invoice price is not a catalog plan");
    };
    let account_hint = o
        .pointer("/parent/subscription_details/metadata/account_id")
        .or_else(|| o.pointer("/subscription_details/metadata/account_id"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    Effect::InvoicePaid {
        business_key: format!("invoice:{id}"),
        customer: customer.to_owned(),
        account_hint,
        plan,
        period_end: line
            .and_then(|l| l.pointer("/period/end"))
            .and_then(Value::as_i64),
    }
}

fn checkout_paid(o: &Value, catalog: &Catalog) -> Effect {
    let Some(id) = text(o, "id") else {
        return Effect::Nothing("checkout session without an id");
    };
    match text(o, "mode") {
        Some("payment") => {}
        Some("subscription") => {
            // Credits come from paid invoices; the session links account and customer.
            let account = metadata_of(o)
                .get("account_id")
                .cloned()
                .or_else(|| text(o, "client_reference_id").map(str::to_owned));
            return match (account, text(o, "customer")) {
                (Some(account_id), Some(customer)) => Effect::Link {
                    account_id,
                    customer: customer.to_owned(),
                },
                _ => Effect::Nothing("subscription session without a tally account or customer"),
            };
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
        payment_intent: text(o, "payment_intent").map(str::to_owned),
        amount_paid: o.get("amount_total").and_then(Value::as_i64),
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
            payment_intent: None,
            amount_paid: None,
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
