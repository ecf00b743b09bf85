//! Standard Webhooks signatures (<https://www.standardwebhooks.com>), the format of Tally's
//! outbound events (issue 28): `webhook-id`, `webhook-timestamp` and `webhook-signature`
//! headers, the signature `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` under a secret
//! `whsec_<base64 key>`. Pure: the caller gives the time.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

/// A secret's prefix.
pub const SECRET_PREFIX: &str = "whsec_";
/// Shortest and longest key, in bytes after base64 decoding.
pub const KEY_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// A signing secret, its key decoded.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Why a secret was refused (the secret itself is never in it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Not `whsec_` and base64.
    #[error("a webhook secret is whsec_ followed by base64")]
    Format,
    /// A key outside [`KEY_BYTES`].
    #[error("a webhook secret's key is 24 to 64 bytes")]
    Length,
}

impl Secret {
    /// Parses `whsec_<base64>`.
    ///
    /// # Errors
    /// [`SecretError`] when the prefix or the base64 is wrong or the key's length is out of
    /// [`KEY_BYTES`].
    pub fn parse(s: &str) -> Result<Self, SecretError> {
        let b64 = s.strip_prefix(SECRET_PREFIX).ok_or(SecretError::Format)?;
        let key = STANDARD.decode(b64).map_err(|_| SecretError::Format)?;
        if !KEY_BYTES.contains(&key.len()) {
            return Err(SecretError::Length);
        }
        Ok(Self(key))
    }

    /// `v1,<base64 signature>` of a message.
    #[must_use]
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC takes a key of any length: the error arm cannot happen.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            return String::new();
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// The `webhook-signature` header: one signature per secret, space-separated (two during a
/// rotation).
#[must_use]
pub fn signature_header(secrets: &[Secret], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|s| s.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::{Secret, SecretError, signature_header};

    /// The specification's example (the Standard Webhooks reference libraries' test vector).
    #[test]
    fn signs_as_the_specification_example() {
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            s.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert_eq!(format!("{s:?}"), "Secret(***)");
    }

    #[test]
    fn two_secrets_sign_twice_and_bad_secrets_are_refused() {
        let a = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let b = Secret::parse("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap();
        let h = signature_header(&[a, b], "msg_1", 1, b"{}");
        assert_eq!(h.split(' ').count(), 2);
        assert_eq!(Secret::parse("MfKQ9r8").unwrap_err(), SecretError::Format);
        assert_eq!(Secret::parse("whsec_!!").unwrap_err(), SecretError::Format);
        assert_eq!(
            Secret::parse("whsec_AAAA").unwrap_err(),
            SecretError::Length
        );
    }
}
