//! `Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...]` over `"<t>.<raw body>"` with
//! HMAC-SHA256; any `v1` may match any configured secret (rotation); timestamps more than
//! [`TOLERANCE_SECS`] away from now, in either direction, are refused.

use std::fmt;

use hmac::{KeyInit, Mac};
use sha2::Sha256;

/// Largest clock difference accepted: 300 s, both directions (Stripe's default tolerance).
pub const TOLERANCE_SECS: i64 = 300;
/// Most secrets configured at once (old and new, during rotation).
pub const SECRETS_MAX: usize = 2;
/// Longest header parsed: 4 KiB.
pub const HEADER_MAX_BYTES: usize = 4096;

/// A webhook endpoint secret (`whsec_...`). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    /// Wraps a secret.
    #[must_use]
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(***)")
    }
}

/// Why a delivery was refused (each is a 400; nothing is written).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `Stripe-Signature` header.
    #[error("missing Stripe-Signature header")]
    Missing,
    /// The header is not `t=...,v1=...`.
    #[error("malformed Stripe-Signature header")]
    Malformed,
    /// The timestamp is outside the tolerance.
    #[error("timestamp outside the 300 s tolerance")]
    Stale,
    /// No `v1` matches any configured secret.
    #[error("no signature matches")]
    Mismatch,
    /// No secret is configured.
    #[error("no webhook secret configured")]
    NoSecret,
}

type HmacSha256 = hmac::Hmac<Sha256>;

/// Verifies a delivery at `now` (unix seconds).
///
/// # Errors
/// A [`SignatureError`] saying why it is refused.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secrets: &[WebhookSecret],
    now: i64,
) -> Result<(), SignatureError> {
    if secrets.is_empty() {
        return Err(SignatureError::NoSecret);
    }
    let header = header.ok_or(SignatureError::Missing)?;
    if header.len() > HEADER_MAX_BYTES {
        return Err(SignatureError::Malformed);
    }
    let mut t: Option<i64> = None;
    let mut signatures: Vec<Vec<u8>> = Vec::new();
    for part in header.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            continue;
        };
        match k {
            "t" => t = Some(v.parse().map_err(|_| SignatureError::Malformed)?),
            "v1" => {
                if let Ok(bytes) = hex::decode(v) {
                    signatures.push(bytes);
                }
            }
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if now.checked_sub(t).is_none_or(|d| d.abs() > TOLERANCE_SECS) {
        return Err(SignatureError::Stale);
    }
    for secret in secrets {
        for sig in &signatures {
            let Ok(mut mac) = HmacSha256::new_from_slice(secret.0.as_bytes()) else {
                continue;
            };
            mac.update(t.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            // Constant-time comparison.
            if mac.verify_slice(sig).is_ok() {
                return Ok(());
            }
        }
    }
    Err(SignatureError::Mismatch)
}

/// Signs `body` at `t` as Stripe does (for tests and local tooling).
#[must_use]
pub fn sign(body: &[u8], secret: &WebhookSecret, t: i64) -> String {
    // HMAC takes keys of any length, so this never returns early.
    let Ok(mut mac) = HmacSha256::new_from_slice(secret.0.as_bytes()) else {
        return String::new();
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn s(x: &str) -> WebhookSecret {
        WebhookSecret::new(x)
    }

    const BODY: &[u8] = br#"{"id":"evt_1","type":"product.created"}"#;

    #[test]
    fn a_valid_signature_passes_and_any_change_fails() {
        let (old, new) = (s("whsec_old"), s("whsec_new"));
        let now = 1_700_000_000;
        let v_old = sign(BODY, &old, now);
        let v_new = sign(BODY, &new, now);
        let both = [old.clone(), new.clone()];
        assert_eq!(
            verify(Some(&format!("t={now},v1={v_new}")), BODY, &both, now),
            Ok(())
        );
        // Rotation: either secret, either order of v1 values.
        assert_eq!(
            verify(
                Some(&format!("t={now},v1={v_old},v1={v_new}")),
                BODY,
                std::slice::from_ref(&new),
                now
            ),
            Ok(())
        );
        assert_eq!(
            verify(
                Some(&format!("t={now},v1={v_new},v1={v_old}")),
                BODY,
                std::slice::from_ref(&old),
                now
            ),
            Ok(())
        );
        assert_eq!(
            verify(
                Some(&format!("t={now},v1={v_old}")),
                b"{tampered}",
                &both,
                now
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(
                Some(&format!("t={now},v1={v_old}")),
                BODY,
                &[s("whsec_other")],
                now
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(verify(None, BODY, &both, now), Err(SignatureError::Missing));
        assert_eq!(
            verify(Some("garbage"), BODY, &both, now),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(Some(&format!("t={now}")), BODY, &both, now),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(Some(&format!("t={now},v1={v_old}")), BODY, &[], now),
            Err(SignatureError::NoSecret)
        );
        assert!(!format!("{old:?}").contains("old"));
    }

    #[test]
    fn the_tolerance_is_300_seconds_both_ways() {
        let k = s("whsec_k");
        let now = 1_700_000_000;
        for (t, ok) in [
            (now - 301, false),
            (now + 301, false),
            (now - 299, true),
            (now + 299, true),
        ] {
            let h = format!("t={t},v1={}", sign(BODY, &k, t));
            assert_eq!(
                verify(Some(&h), BODY, std::slice::from_ref(&k), now).is_ok(),
                ok,
                "t = now {:+}",
                t - now
            );
        }
    }

    proptest! {
        #[test]
        fn any_header_is_refused_cleanly_never_panics(header in ".{0,300}", body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let r = verify(Some(&header), &body, &[s("whsec_k")], 1_700_000_000);
            prop_assert!(r.is_err());
        }
    }
}
