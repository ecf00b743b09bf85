//! Fuzz targets, run as property tests (proptest): short fixed budgets in CI, longer runs with
//! `PROPTEST_CASES=1000000 cargo nextest run fuzz::` (proptest reads the variable). No
//! nightly toolchain or `cargo fuzz` needed; every failure is shrunk and saved under
//! `proptest-regressions/` so it replays first next time.
//!
//! Targets: the `Stripe-Signature` header parser and verifier, the webhook event parser with
//! the effect decision, and gRPC request validation.

use std::collections::HashMap;

use proptest::prelude::*;

use crate::catalog::Catalog;
use crate::ledger::Limits;
use crate::pb;
use crate::stripe::signature::{sign, verify};
use crate::stripe::{Envelope, WebhookSecret, decide};

const NOW: i64 = 1_764_000_000;

/// Header fragments that look like Stripe's, recombined and mutated.
fn header() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        Just("t=".to_owned()),
        Just("v1=".to_owned()),
        Just("v0=".to_owned()),
        Just(",".to_owned()),
        Just("=".to_owned()),
        (0i64..2_000_000_000).prop_map(|t| t.to_string()),
        "[0-9a-f]{0,70}",
        ".{0,8}",
    ];
    proptest::collection::vec(part, 0..12).prop_map(|p| p.concat())
}

/// Arbitrary JSON, nested up to a few levels.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        ".{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            proptest::collection::hash_map(
                prop_oneof![
                    Just("id".to_owned()),
                    Just("object".to_owned()),
                    Just("mode".to_owned()),
                    Just("payment_status".to_owned()),
                    Just("metadata".to_owned()),
                    Just("account_id".to_owned()),
                    Just("pack_id".to_owned()),
                    Just("amount".to_owned()),
                    Just("amount_refunded".to_owned()),
                    Just("subscription".to_owned()),
                    Just("status".to_owned()),
                    Just("customer".to_owned()),
                    Just("lines".to_owned()),
                    Just("items".to_owned()),
                    Just("data".to_owned()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

const TYPES: &[&str] = &[
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "invoice.paid",
    "invoice.payment_failed",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "charge.refunded",
    "charge.dispute.created",
    "charge.dispute.closed",
    "product.created",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, ..ProptestConfig::default() })]

    /// Any header: no panic, and only the exact signature of the exact body passes.
    #[test]
    fn fuzz_signature_header(h in header(), body in proptest::collection::vec(any::<u8>(), 0..64), flip in any::<usize>()) {
        let secret = WebhookSecret::new("whsec_fuzz");
        prop_assert!(verify(Some(&h), &body, std::slice::from_ref(&secret), NOW).is_err()
            || h.contains(&sign(&body, &secret, NOW)));
        // A valid header with one character of the signature changed never passes.
        let good = sign(&body, &secret, NOW);
        let mut bad: Vec<char> = good.chars().collect();
        let i = flip % bad.len();
        bad[i] = if bad[i] == '0' { '1' } else { '0' };
        let bad: String = bad.into_iter().collect();
        let bad_header = format!("t={NOW},v1={bad}");
        let good_header = format!("t={NOW},v1={good}");
        prop_assert!(verify(Some(&bad_header), &body, std::slice::from_ref(&secret), NOW).is_err());
        prop_assert!(verify(Some(&good_header), &body, std::slice::from_ref(&secret), NOW).is_ok());
    }

    /// Any event shape (as bytes and as JSON): parsing is lenient and deciding never panics.
    #[test]
    fn fuzz_webhook_event(kind in proptest::sample::select(TYPES), object in json(), extra in json(), raw in proptest::collection::vec(any::<u8>(), 0..128)) {
        let catalog = Catalog::builtin().unwrap();
        let _ = serde_json::from_slice::<Envelope>(&raw);
        let body = serde_json::json!({"id": "evt_fuzz", "type": kind, "livemode": false, "created": 1, "data": {"object": object}, "extra": extra});
        if let Ok(event) = serde_json::from_value::<Envelope>(body) {
            let _ = decide(&event, &catalog);
        }
    }

    /// Any Reserve / Commit / Refund / Grant request: validation answers (never panics); what
    /// it accepts is within the documented limits, and what it refuses names a field.
    #[test]
    fn fuzz_request_validation(
        account in prop_oneof![".{0,140}", "[A-Za-z0-9_.:@-]{1,130}"],
        key in prop_oneof![".{0,260}", "[!-~]{250,260}"],
        amount in prop_oneof![any::<i64>(), -2i64..3, (MAX - 2)..=(MAX + 2)],
        ttl_s in any::<i64>(), ttl_n in any::<i32>(), has_ttl in any::<bool>(),
        meta in proptest::collection::hash_map(prop_oneof![".{0,70}", "[A-Za-z0-9_.-]{60,66}"], prop_oneof![".{0,300}", "a{250,260}"], 0..20),
        op in proptest::option::of(("[a-z_]{0,14}", proptest::collection::hash_map("[a-z]{0,12}", ".{0,12}", 0..5))),
        hold in prop_oneof![".{0,40}", "hold_[0-9a-f]{31,33}"], refund in proptest::option::of(any::<i64>()),
        reason in prop_oneof![".{0,20}", ".{500,520}"],
    ) {
        let catalog = Catalog::builtin().unwrap();
        let limits = Limits { hold_ttl_default: chrono::TimeDelta::minutes(10), hold_ttl_max: chrono::TimeDelta::hours(24) };
        let r = pb::ReserveRequest {
            account_id: account.clone(), idempotency_key: key.clone(),
            ttl: has_ttl.then_some(prost_types::Duration { seconds: ttl_s, nanos: ttl_n }),
            metadata: meta.into_iter().collect::<HashMap<_, _>>(),
            cost: Some(match op {
                Some((name, params)) => pb::reserve_request::Cost::Operation(pb::PricedOperation { name, params: params.into_iter().collect() }),
                None => pb::reserve_request::Cost::Amount(amount),
            }),
        };
        match crate::grpc::convert::reserve(r, &limits, &catalog) {
            Ok((k, cmd)) => {
                prop_assert!(valid_amount(cmd.amount.get()));
                prop_assert!(valid_account(cmd.account_id.as_str()));
                prop_assert!(valid_key(k.as_str()));
                prop_assert!(cmd.ttl >= chrono::TimeDelta::seconds(1) && cmd.ttl <= limits.hold_ttl_max);
                let pairs = cmd.metadata.pairs();
                prop_assert!(pairs.len() <= 16);
                for (mk, mv) in pairs {
                    prop_assert!((1..=64).contains(&mk.len()) && mk.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)), "{mk:?}");
                    prop_assert!(mv.len() <= 256 && valid_text(mv, true), "{mv:?}");
                }
            }
            Err(e) => refused(&e)?,
        }
        // Commit: accepted exactly when every field is valid.
        let c = crate::grpc::convert::commit(&pb::CommitRequest { hold_id: hold.clone(), amount, idempotency_key: key.clone() });
        let ok = valid_hold(&hold) && valid_amount(amount) && valid_key(&key);
        prop_assert_eq!(c.is_ok(), ok, "commit {:?} {} {:?}", hold, amount, key);
        if let Err(e) = c { refused(&e)?; }
        let f = crate::grpc::convert::refund(&pb::RefundRequest { hold_id: hold.clone(), amount: refund, reason: reason.clone(), idempotency_key: key.clone() });
        let ok = valid_hold(&hold) && refund.is_none_or(valid_amount) && reason.chars().count() <= 512 && valid_text(&reason, true) && valid_key(&key);
        prop_assert_eq!(f.is_ok(), ok, "refund {:?} {:?} {} chars {:?}", hold, refund, reason.chars().count(), key);
        if let Err(e) = f { refused(&e)?; }
        let g = pb::GrantRequest { account_id: account.clone(), amount, reason: reason.clone(), idempotency_key: key.clone(), ..Default::default() };
        let ok = valid_account(&account) && valid_amount(amount) && !reason.trim().is_empty() && reason.chars().count() <= 512 && valid_text(&reason, true) && valid_key(&key);
        match crate::grpc::convert::grant(&g) {
            Ok((k, cmd)) => {
                prop_assert!(ok, "grant accepted {:?} {} {:?}", account, amount, key);
                prop_assert!(valid_amount(cmd.amount.get()) && valid_key(k.as_str()));
            }
            Err(e) => {
                prop_assert!(!ok, "grant refused {:?} {} {:?}: {}", account, amount, key, e);
                refused(&e)?;
            }
        }
    }
}

const MAX: i64 = crate::domain::Credits::MAX;

/// The README's limits, restated independently of the parsers under test.
fn valid_amount(a: i64) -> bool {
    (1..=MAX).contains(&a)
}

fn valid_account(a: &str) -> bool {
    (1..=128).contains(&a.len())
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:@-".contains(&b))
}

/// Free text: no C0 or C1 control character, except tab and newline where lines are allowed.
fn valid_text(t: &str, lines: bool) -> bool {
    t.chars().all(|c| {
        let control = c <= '\u{1f}' || ('\u{7f}'..='\u{9f}').contains(&c);
        !control || (lines && (c == '\t' || c == '\n'))
    })
}

fn valid_key(k: &str) -> bool {
    (1..=255).contains(&k.len()) && k.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn valid_hold(h: &str) -> bool {
    h.strip_prefix("hold_").is_some_and(|x| {
        x.len() == 32
            && x.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A refusal is INVALID_ARGUMENT naming at least one field.
fn refused(e: &crate::ledger::ServiceError) -> Result<(), TestCaseError> {
    match e {
        crate::ledger::ServiceError::Invalid(v) => {
            prop_assert!(!v.is_empty());
            Ok(())
        }
        other => Err(TestCaseError::fail(format!(
            "not a validation error: {other:?}"
        ))),
    }
}
