//! Identifiers and keys. Each is a newtype so a session id can never be passed where a
//! provider checkout id is expected, and each parsed value is known to be valid.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why an identifier or key was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("a payment session id starts with `ps_` followed by 1 to 64 letters, digits or `_`")]
    SessionId,
    #[error("an Idempotency-Key is 1 to 255 printable ASCII characters")]
    IdempotencyKey,
    #[error("a dead letter id is a positive whole number")]
    DeadLetterId,
    #[error("a delivery id is a positive whole number")]
    DeliveryId,
}

/// Our payment session id (`ps_…`). It is preserved across every retry: only the provider
/// checkout changes. Deserialised through [`PaymentSessionId::parse`], so JSON cannot build
/// an invalid one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PaymentSessionId(String);

impl PaymentSessionId {
    pub const PREFIX: &'static str = "ps_";

    /// A new id from 128 random bits given by the caller (the domain has no randomness).
    pub fn from_random(bits: u128) -> Self {
        Self(format!("{}{bits:032x}", Self::PREFIX))
    }

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let rest = raw.strip_prefix(Self::PREFIX).ok_or(IdError::SessionId)?;
        let valid = !rest.is_empty()
            && rest.len() <= 64
            && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if valid {
            Ok(Self(raw.to_owned()))
        } else {
            Err(IdError::SessionId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PaymentSessionId {
    type Error = IdError;

    fn try_from(raw: String) -> Result<Self, IdError> {
        Self::parse(&raw)
    }
}

impl From<PaymentSessionId> for String {
    fn from(id: PaymentSessionId) -> Self {
        id.0
    }
}

impl fmt::Display for PaymentSessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The provider's checkout session id (`cs_…` at Stripe). One per attempt.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProviderSessionId(String);

impl ProviderSessionId {
    pub fn new(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProviderSessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A user, as named by the JWT's `sub` claim.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub fn new(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client-chosen `Idempotency-Key`: 1–255 printable ASCII characters (space to `~`).
/// Deserialised through [`IdempotencyKey::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 255;

    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let valid = !raw.is_empty()
            && raw.len() <= Self::MAX_LEN
            && raw.bytes().all(|b| (0x20..=0x7e).contains(&b));
        if valid {
            Ok(Self(raw.to_owned()))
        } else {
            Err(IdError::IdempotencyKey)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = IdError;

    fn try_from(raw: String) -> Result<Self, IdError> {
        Self::parse(&raw)
    }
}

impl From<IdempotencyKey> for String {
    fn from(key: IdempotencyKey) -> Self {
        key.0
    }
}

/// An id that is the positive row id storage gave out, written as a string in JSON and in
/// paths. Parsed once where it comes in (a path, the CLI), so a malformed id is refused
/// there and never reaches a write that would silently touch nothing.
macro_rules! row_id {
    ($(#[$doc:meta])* $name:ident, $error:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(i64);

        impl $name {
            pub fn parse(raw: &str) -> Result<Self, IdError> {
                // Digits only: `i64::from_str` would also take a sign.
                if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(IdError::$error);
                }
                match raw.parse::<i64>() {
                    Ok(id) if id > 0 => Ok(Self(id)),
                    _ => Err(IdError::$error),
                }
            }

            /// The id as storage holds it: only ids storage gave out are built from a row.
            pub fn from_row(id: i64) -> Result<Self, IdError> {
                if id > 0 {
                    Ok(Self(id))
                } else {
                    Err(IdError::$error)
                }
            }

            pub const fn get(self) -> i64 {
                self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;

            fn try_from(raw: String) -> Result<Self, IdError> {
                Self::parse(&raw)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> Self {
                id.0.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

row_id!(
    /// A dead letter's id.
    DeadLetterId,
    DeadLetterId
);

row_id!(
    /// A merchant webhook delivery's id (one per event).
    DeliveryId,
    DeliveryId
);

/// Which checkout of a session: 0 is the original, 1..=max the retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AttemptNumber(u32);

impl AttemptNumber {
    /// The first checkout, created with the session.
    pub const ORIGINAL: Self = Self(0);

    pub const fn new(n: u32) -> Self {
        Self(n)
    }

    pub const fn get(self) -> u32 {
        self.0
    }

    pub const fn next(self) -> Self {
        Self(self.0 + 1)
    }

    pub const fn is_retry(self) -> bool {
        self.0 > 0
    }
}

impl fmt::Display for AttemptNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dead_letter_id_takes_only_positive_whole_numbers() {
        assert_eq!(DeadLetterId::parse("42").map(DeadLetterId::get), Ok(42));
        for raw in [
            "",
            "0",
            "-1",
            "+1",
            "1.5",
            "abc",
            " 1",
            "99999999999999999999",
        ] {
            assert_eq!(
                DeadLetterId::parse(raw),
                Err(IdError::DeadLetterId),
                "{raw:?}"
            );
        }
        let json: Result<DeadLetterId, _> = serde_json::from_str("\"x1\"");
        assert!(json.is_err());
        assert_eq!(serde_json::to_string(&DeadLetterId(7)).unwrap(), "\"7\"");
    }

    #[test]
    fn session_id_round_trips_from_random_bits() {
        let id = PaymentSessionId::from_random(0xdead_beef);
        assert_eq!(PaymentSessionId::parse(id.as_str()), Ok(id));
    }

    #[test]
    fn session_id_rejects_foreign_shapes() {
        for raw in [
            "",
            "ps_",
            "cs_abc",
            "ps_a/b",
            "ps_a b",
            &format!("ps_{}", "a".repeat(65)),
        ] {
            assert_eq!(
                PaymentSessionId::parse(raw),
                Err(IdError::SessionId),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn idempotency_key_bounds() {
        assert!(IdempotencyKey::parse("a").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
        assert!(IdempotencyKey::parse("tab\tkey").is_err());
        assert!(IdempotencyKey::parse("clé").is_err());
    }

    #[test]
    fn session_id_deserialises_only_through_parse() {
        let id: PaymentSessionId = serde_json::from_str(r#""ps_abc""#).unwrap();
        assert_eq!(id.as_str(), "ps_abc");
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""ps_abc""#);
        let too_long = format!("\"ps_{}\"", "a".repeat(65));
        for raw in [
            r#""""#,
            r#""ps_""#,
            r#""cs_abc""#,
            r#""ps_a/b""#,
            "42",
            "null",
            &too_long,
        ] {
            let refused = serde_json::from_str::<PaymentSessionId>(raw);
            assert!(refused.is_err(), "{raw} is refused: {refused:?}");
        }
    }

    #[test]
    fn idempotency_key_deserialises_only_through_parse() {
        let key: IdempotencyKey = serde_json::from_str(r#""key-1""#).unwrap();
        assert_eq!(key.as_str(), "key-1");
        assert_eq!(serde_json::to_string(&key).unwrap(), r#""key-1""#);
        let too_long = format!("\"{}\"", "k".repeat(256));
        for raw in [r#""""#, r#""tab\tkey""#, r#""clé""#, "7", &too_long] {
            let refused = serde_json::from_str::<IdempotencyKey>(raw);
            assert!(refused.is_err(), "{raw} is refused: {refused:?}");
        }
    }

    proptest! {
        #[test]
        fn idempotency_key_accepts_exactly_printable_ascii(raw in "\\PC{0,300}") {
            let expected = !raw.is_empty() && raw.len() <= 255 && raw.bytes().all(|b| (0x20..=0x7e).contains(&b));
            prop_assert_eq!(IdempotencyKey::parse(&raw).is_ok(), expected);
        }
    }
}
