//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>), what any of its
//! published libraries verifies.
//!
//! A secret is `whsec_` followed by the base64 of its key (24 to 64 bytes here). The signed
//! content is `"{webhook-id}.{webhook-timestamp}.{body}"`; its HMAC-SHA256 is sent as
//! `v1,{base64}` in `webhook-signature`, one per secret, separated by spaces, so a receiver
//! rolling its secret accepts either while both are configured.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::fmt;

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// The shortest and longest key accepted, in bytes (the specification asks for 24 to 64).
pub const KEY_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// A signing key, decoded from its `whsec_` form. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Vec<u8>);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey([redacted])")
    }
}

/// Why a secret was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a secret starts with `whsec_`")]
    Prefix,
    #[error("the part after `whsec_` is not base64")]
    Base64,
    #[error("the key is not 24 to 64 bytes long")]
    Length,
}

impl SigningKey {
    /// A key from its `whsec_…` form.
    pub fn parse(secret: &str) -> Result<Self, SecretError> {
        let encoded = secret
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::Prefix)?;
        let key = STANDARD.decode(encoded).map_err(|_| SecretError::Base64)?;
        if !KEY_BYTES.contains(&key.len()) {
            return Err(SecretError::Length);
        }
        Ok(Self(key))
    }

    /// The `whsec_…` form of a key of raw bytes (for tests and examples).
    pub fn encode(key: &[u8]) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
    }

    /// The `v1,{base64}` signature of one delivery.
    fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// Parses a comma list of `whsec_` secrets (several while rotating); `None` names the first
/// refused one's position and why.
pub fn parse_secrets(list: &str) -> Result<Vec<SigningKey>, (usize, SecretError)> {
    let keys = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
        .map(|(i, secret)| SigningKey::parse(secret).map_err(|e| (i + 1, e)))
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err((1, SecretError::Prefix));
    }
    Ok(keys)
}

/// The `webhook-signature` header of one delivery: a signature per key, space-separated.
pub fn signature_header(keys: &[SigningKey], id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|key| key.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference test suites.
    #[test]
    fn matches_the_specification_example() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature_header(&[key], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn one_signature_per_key_while_rotating() {
        let keys = parse_secrets(&format!(
            "{}, {}",
            SigningKey::encode(&[1; 24]),
            SigningKey::encode(&[2; 32])
        ))
        .unwrap();
        let header = signature_header(&keys, "msg_1", 1, b"{}");
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.starts_with("v1,")));
        assert_ne!(parts[0], parts[1]);
    }

    #[test]
    fn bad_secrets_are_refused() {
        assert_eq!(SigningKey::parse("abc"), Err(SecretError::Prefix));
        assert_eq!(SigningKey::parse("whsec_!!!"), Err(SecretError::Base64));
        assert_eq!(
            SigningKey::parse(&SigningKey::encode(&[0; 16])),
            Err(SecretError::Length)
        );
        assert_eq!(
            SigningKey::parse(&SigningKey::encode(&[0; 65])),
            Err(SecretError::Length)
        );
        assert!(parse_secrets(" , ").is_err());
        assert_eq!(
            parse_secrets(&format!("{},nope", SigningKey::encode(&[0; 24]))).unwrap_err(),
            (2, SecretError::Prefix)
        );
        assert!(!format!("{:?}", SigningKey::parse(&SigningKey::encode(&[7; 24]))).contains('7'));
    }
}
