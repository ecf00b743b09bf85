//! Who may call what: callers, their token hashes, roles, account prefixes and rate limits.
//!
//! Callers are configured in a TOML file (`--callers-file`, usually a Kubernetes Secret):
//!
//! ```toml
//! [callers.video-gen]
//! roles = ["generation"]
//! account_prefixes = ["video:"]        # optional: only these accounts (and their holds)
//! token_sha256 = ["<64 hex>", "<64 hex>"] # one or two (rotation); never the token itself
//! rate_limit_rps = 500                 # optional, overrides --rate-limit-rps
//! ```
//!
//! A request presents `authorization: Bearer <token>`; the token's SHA-256 is compared in
//! constant time with every configured hash. Tokens are never stored, logged or echoed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::Caller;

/// Largest callers file: 1 MiB.
pub const CALLERS_FILE_MAX_BYTES: u64 = 1024 * 1024;
/// Token hashes per caller: two (the current one and the one being rotated out).
pub const TOKENS_PER_CALLER_MAX: usize = 2;
/// Account prefixes per caller.
pub const PREFIXES_PER_CALLER_MAX: usize = 64;
/// Longest caller name.
pub const CALLER_NAME_MAX_LEN: usize = 64;
/// Longest bearer token accepted (longer ones are refused before hashing).
pub const TOKEN_MAX_LEN: usize = 1024;

/// A permission a caller holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `tally.v1.CreditService`: balances, holds, pricing.
    Generation,
    /// The HTTP billing endpoints: Checkout, portal, billing view.
    Billing,
    /// `tally.v1.AdminService`.
    Admin,
}

impl Role {
    /// The name used in configuration and errors.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Generation => "generation",
            Self::Billing => "billing",
            Self::Admin => "admin",
        }
    }
}

/// A GCRA limiter (governor) for one caller and one tier.
pub type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// Requests per second and burst of a limiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Sustained requests per second (0: unlimited).
    pub per_second: u32,
    /// Requests allowed at once above the sustained rate.
    pub burst: u32,
}

impl Rate {
    fn limiter(self) -> Option<Arc<Limiter>> {
        let per_second = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        Some(Arc::new(RateLimiter::direct(
            Quota::per_second(per_second).allow_burst(burst),
        )))
    }
}

/// Rate limits of the server: the normal tier, and the lower one for AdminService and
/// Checkout creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    /// Per caller, every authenticated call.
    pub normal: Rate,
    /// Per caller, AdminService calls and Checkout Session creation (counted in both tiers).
    pub sensitive: Rate,
}

/// An authenticated (or, with auth off, the anonymous) caller and what it may do.
pub struct Principal {
    /// Name (idempotency keys are scoped by it; logged).
    pub caller: Caller,
    roles: BTreeSet<Role>,
    /// Empty: every account.
    prefixes: Vec<String>,
    normal: Option<Arc<Limiter>>,
    sensitive: Option<Arc<Limiter>>,
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("caller", &self.caller.as_str())
            .field("roles", &self.roles)
            .field("prefixes", &self.prefixes)
            .finish_non_exhaustive()
    }
}

/// Why a call is refused before it reaches a handler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No or an unknown token (UNAUTHENTICATED / 401).
    Unauthenticated,
    /// The caller lacks the role (PERMISSION_DENIED / 403).
    Role(Role),
    /// The account is outside the caller's prefixes (PERMISSION_DENIED / 403).
    Account,
    /// Over the caller's rate: retry after this long (RESOURCE_EXHAUSTED / 429).
    RateLimited(Duration),
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unauthenticated => {
                f.write_str("a valid bearer token is required (authorization: Bearer <token>)")
            }
            Self::Role(r) => write!(f, "this caller lacks the {} role", r.as_str()),
            Self::Account => f.write_str("this caller may not access that account"),
            Self::RateLimited(d) => write!(
                f,
                "rate limit exceeded; retry in {} ms",
                d.as_millis().max(1)
            ),
        }
    }
}

impl Principal {
    /// The caller of a server without configured callers: every role, every account.
    #[must_use]
    pub fn open(limits: RateLimits) -> Self {
        Self {
            caller: Caller::anonymous(),
            roles: [Role::Generation, Role::Billing, Role::Admin].into(),
            prefixes: Vec::new(),
            normal: limits.normal.limiter(),
            sensitive: limits.sensitive.limiter(),
        }
    }

    /// Whether the caller holds `role`.
    #[must_use]
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Whether the caller may touch every account (no prefixes configured).
    #[must_use]
    pub fn unrestricted(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// Whether the caller may touch `account`.
    #[must_use]
    pub fn may_access(&self, account: &str) -> bool {
        self.unrestricted()
            || self
                .prefixes
                .iter()
                .any(|p| account.starts_with(p.as_str()))
    }

    /// `Ok` when the caller holds `role`.
    ///
    /// # Errors
    /// [`Denied::Role`].
    pub fn require(&self, role: Role) -> Result<(), Denied> {
        if self.has(role) {
            Ok(())
        } else {
            Err(Denied::Role(role))
        }
    }

    /// Takes one call from the caller's budget (both tiers when `sensitive`).
    ///
    /// # Errors
    /// [`Denied::RateLimited`] with the wait until the next call would pass; nothing is taken
    /// from the budget then.
    pub fn admit(&self, sensitive: bool) -> Result<(), Denied> {
        let check = |l: &Option<Arc<Limiter>>| match l {
            Some(l) => l.check().map_err(|not_until| {
                Denied::RateLimited(not_until.wait_time_from(DefaultClock::default().now()))
            }),
            None => Ok(()),
        };
        if sensitive {
            check(&self.sensitive)?;
        }
        check(&self.normal)
    }
}

/// How requests authenticate.
pub enum Auth {
    /// No callers configured: every request is the open caller (loopback only unless
    /// `--insecure`).
    Open(Arc<Principal>),
    /// Configured callers.
    Tokens(Callers),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Open(_) => f.write_str("Auth::Open"),
            Self::Tokens(c) => write!(f, "Auth::Tokens({} callers)", c.entries.len()),
        }
    }
}

impl Auth {
    /// The caller presenting `authorization` (the header's value, if any).
    ///
    /// # Errors
    /// [`Denied::Unauthenticated`] for a missing, malformed or unknown token.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Arc<Principal>, Denied> {
        match self {
            Self::Open(p) => Ok(Arc::clone(p)),
            Self::Tokens(callers) => {
                let token = authorization
                    .and_then(|v| {
                        v.strip_prefix(b"Bearer ")
                            .or_else(|| v.strip_prefix(b"bearer "))
                    })
                    .filter(|t| !t.is_empty() && t.len() <= TOKEN_MAX_LEN)
                    .ok_or(Denied::Unauthenticated)?;
                callers.find(token).ok_or(Denied::Unauthenticated)
            }
        }
    }

    /// Signs a caller in with its token (the admin console): the caller and the session
    /// subject that names it (a prefix of the token's hash, `open` without configured callers).
    /// A token rotated out of the callers file ends every session signed in with it.
    ///
    /// # Errors
    /// [`Denied::Unauthenticated`] for an empty, oversized or unknown token.
    pub fn sign_in(&self, token: &str) -> Result<(String, Arc<Principal>), Denied> {
        match self {
            Self::Open(p) => Ok((OPEN_SUBJECT.to_owned(), Arc::clone(p))),
            Self::Tokens(callers) => {
                let token = token.trim().as_bytes();
                if token.is_empty() || token.len() > TOKEN_MAX_LEN {
                    return Err(Denied::Unauthenticated);
                }
                let digest: [u8; 32] = Sha256::digest(token).into();
                let p = callers.find(token).ok_or(Denied::Unauthenticated)?;
                Ok((subject_of(&digest), p))
            }
        }
    }

    /// The caller a session subject names, if it is still configured.
    #[must_use]
    pub fn by_subject(&self, subject: &str) -> Option<Arc<Principal>> {
        match self {
            Self::Open(p) => (subject == OPEN_SUBJECT).then(|| Arc::clone(p)),
            Self::Tokens(callers) => {
                let prefix = hex::decode(subject).ok()?;
                callers
                    .entries
                    .iter()
                    .find(|(hash, _)| hash.get(..16) == Some(prefix.as_slice()))
                    .map(|(_, p)| Arc::clone(p))
            }
        }
    }

    /// Whether callers must authenticate.
    #[must_use]
    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open(_))
    }
}

/// The session subject of a server without configured callers.
const OPEN_SUBJECT: &str = "open";

/// A session's subject: the first 16 bytes of the token's SHA-256, in hex (names the token
/// without being usable as one).
fn subject_of(digest: &[u8; 32]) -> String {
    hex::encode(digest.get(..16).unwrap_or_default())
}

/// The configured callers.
pub struct Callers {
    /// (token hash, caller): a caller appears once per hash.
    entries: Vec<([u8; 32], Arc<Principal>)>,
}

impl Callers {
    fn find(&self, token: &[u8]) -> Option<Arc<Principal>> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        // Compare with every hash, whatever matched, so timing says nothing about which.
        let mut found = None;
        for (hash, principal) in &self.entries {
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(Arc::clone(principal));
            }
        }
        found
    }

    /// Reads and validates a callers file.
    ///
    /// # Errors
    /// A message naming the file, the field and the reason (never a token or hash).
    pub fn load(path: &Path, limits: RateLimits) -> Result<Self, String> {
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| format!("callers file {shown}: {e}"))?;
        if meta.len() > CALLERS_FILE_MAX_BYTES {
            return Err(format!("callers file {shown}: larger than 1 MiB"));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("callers file {shown}: {e}"))?;
        Self::parse(&text, limits).map_err(|e| format!("callers file {shown}: {e}"))
    }

    /// Parses and validates the callers TOML.
    ///
    /// # Errors
    /// A message naming the field and the reason.
    pub fn parse(text: &str, limits: RateLimits) -> Result<Self, String> {
        let file: CallersFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        if file.callers.is_empty() {
            return Err("no [callers.NAME] tables".into());
        }
        let mut entries = Vec::new();
        let mut seen: HashMap<[u8; 32], String> = HashMap::new();
        for (name, c) in file.callers {
            let field = |f: &str| format!("callers.{name}.{f}");
            let name_ok = !name.is_empty()
                && name.len() <= CALLER_NAME_MAX_LEN
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !name_ok {
                return Err(format!(
                    "callers.{name}: a caller name is 1..={CALLER_NAME_MAX_LEN} characters of [A-Za-z0-9_.-]"
                ));
            }
            if c.roles.is_empty() {
                return Err(format!(
                    "{}: at least one of generation, billing, admin",
                    field("roles")
                ));
            }
            if c.token_sha256.is_empty() || c.token_sha256.len() > TOKENS_PER_CALLER_MAX {
                return Err(format!(
                    "{}: one or two SHA-256 hashes (hex); make one with `tally auth hash-token`",
                    field("token_sha256")
                ));
            }
            if c.account_prefixes.len() > PREFIXES_PER_CALLER_MAX
                || c.account_prefixes.iter().any(|p| {
                    p.is_empty()
                        || p.len() > crate::domain::ids::ACCOUNT_ID_MAX_LEN
                        || !p.bytes().all(crate::domain::ids::is_account_id_byte)
                })
            {
                return Err(format!(
                    "{}: at most {PREFIXES_PER_CALLER_MAX} non-empty prefixes of account-id characters",
                    field("account_prefixes")
                ));
            }
            let normal = Rate {
                per_second: c.rate_limit_rps.unwrap_or(limits.normal.per_second),
                burst: c.rate_limit_burst.unwrap_or(limits.normal.burst),
            };
            let principal = Arc::new(Principal {
                caller: Caller::new(name.clone()),
                roles: c.roles.into_iter().collect(),
                prefixes: c.account_prefixes,
                normal: normal.limiter(),
                sensitive: limits.sensitive.limiter(),
            });
            for (i, h) in c.token_sha256.iter().enumerate() {
                let hash = parse_hash(h)
                    .ok_or_else(|| format!("{}[{i}]: not 64 hex digits", field("token_sha256")))?;
                if let Some(other) = seen.insert(hash, name.clone()) {
                    return Err(format!(
                        "{}[{i}]: the same token hash is configured for caller {other:?}",
                        field("token_sha256")
                    ));
                }
                entries.push((hash, Arc::clone(&principal)));
            }
        }
        Ok(Self { entries })
    }
}

fn parse_hash(h: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(h.trim()).ok()?;
    bytes.try_into().ok()
}

/// The SHA-256 (hex) a callers file stores for `token`.
#[must_use]
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// A new random token: `tly_` and 64 hex digits (244 random bits from two UUIDv4s).
#[must_use]
pub fn new_token() -> String {
    format!(
        "tly_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallersFile {
    #[serde(default)]
    callers: BTreeMap<String, CallerConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerConfig {
    roles: Vec<Role>,
    #[serde(default)]
    account_prefixes: Vec<String>,
    #[serde(default)]
    token_sha256: Vec<String>,
    rate_limit_rps: Option<u32>,
    rate_limit_burst: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RateLimits = RateLimits {
        normal: Rate {
            per_second: 0,
            burst: 0,
        },
        sensitive: Rate {
            per_second: 0,
            burst: 0,
        },
    };

    fn callers(extra: &str) -> Result<Callers, String> {
        Callers::parse(
            &format!(
                "[callers.video]\nroles = [\"generation\"]\naccount_prefixes = [\"video:\"]\n\
                 token_sha256 = [\"{}\", \"{}\"]\n{extra}",
                hash_token("old-token"),
                hash_token("new-token")
            ),
            LIMITS,
        )
    }

    #[test]
    fn both_rotation_tokens_authenticate_and_others_do_not() {
        let auth = Auth::Tokens(callers("").unwrap());
        for t in ["old-token", "new-token"] {
            let p = auth
                .authenticate(Some(format!("Bearer {t}").as_bytes()))
                .unwrap();
            assert_eq!(p.caller.as_str(), "video");
            assert!(p.has(Role::Generation) && !p.has(Role::Admin));
            assert!(p.may_access("video:u1") && !p.may_access("image:u1"));
        }
        for bad in [
            None,
            Some(&b"Bearer other"[..]),
            Some(b"new-token"),
            Some(b"Bearer "),
            Some(b"Basic bmV3LXRva2Vu"),
        ] {
            assert_eq!(auth.authenticate(bad).unwrap_err(), Denied::Unauthenticated);
        }
    }

    #[test]
    fn bad_files_name_the_field() {
        let e = callers("unknown = 1").err().unwrap();
        assert!(e.contains("unknown"), "{e}");
        let e = Callers::parse(
            "[callers.x]\nroles = [\"root\"]\ntoken_sha256 = [\"00\"]",
            LIMITS,
        )
        .err()
        .unwrap();
        assert!(e.contains("root"), "{e}");
        let e = Callers::parse(
            "[callers.x]\nroles = [\"admin\"]\ntoken_sha256 = [\"00\"]",
            LIMITS,
        )
        .err()
        .unwrap();
        assert!(e.contains("callers.x.token_sha256[0]"), "{e}");
        let h = hash_token("t");
        let e = Callers::parse(
            &format!(
                "[callers.a]\nroles=[\"admin\"]\ntoken_sha256=[\"{h}\"]\n[callers.b]\nroles=[\"admin\"]\ntoken_sha256=[\"{h}\"]"
            ),
            LIMITS,
        )
        .err()
        .unwrap();
        assert!(e.contains("same token hash"), "{e}");
        assert!(!e.contains(&h), "no hash in errors: {e}");
    }

    #[test]
    fn rate_limits_refuse_past_the_burst_and_say_when_to_retry() {
        let c = callers("rate_limit_rps = 1\nrate_limit_burst = 3").unwrap();
        let p = Auth::Tokens(c)
            .authenticate(Some(b"Bearer new-token"))
            .unwrap();
        for _ in 0..3 {
            p.admit(false).unwrap();
        }
        match p.admit(false) {
            Err(Denied::RateLimited(d)) => assert!(d <= Duration::from_secs(1) && !d.is_zero()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn new_tokens_are_long_and_distinct() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 64);
        assert_eq!(hash_token(&a).len(), 64);
    }
}
