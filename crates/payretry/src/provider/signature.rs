//! Stripe-format webhook signatures (`Stripe-Signature: t=…,v1=…`).
//!
//! The signed string is `"{t}.{raw body}"`, the MAC is HMAC-SHA256 with the endpoint secret,
//! hex-encoded. Rules held here:
//! - A header may carry several `v1=` entries (Stripe rolls its secret) and other schemes
//!   (`v0=`) that are ignored; payretry may also be configured with several secrets (rolling
//!   ours). Any `v1` matching any secret verifies.
//! - Signatures are compared in constant time (`Mac::verify_slice`), never as strings.
//! - The timestamp must lie within the tolerance of now, in both directions, so a captured
//!   event cannot be replayed later. It is checked after the signature, so `StaleTimestamp`
//!   only ever describes an authentic event.
//! - Parsing never panics and its work is bounded: headers over [`MAX_HEADER_LEN`] are
//!   refused before they are looked at.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The tolerance DESIGN.md §4 asks for: five minutes either side of now.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// Longest `Stripe-Signature` header looked at (Stripe's are ~100 bytes per signature).
pub const MAX_HEADER_LEN: usize = 8 * 1024;

/// Length in bytes of an HMAC-SHA256 tag.
const TAG_LEN: usize = 32;

/// Why a webhook's signature was not accepted. The HTTP edge answers all of them with 400
/// `invalid_signature`; the variants exist for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is missing")]
    Missing,
    #[error("the Stripe-Signature header is malformed")]
    Malformed,
    #[error("the Stripe-Signature timestamp is outside the tolerance")]
    StaleTimestamp,
    #[error("no Stripe-Signature v1 signature matches a configured secret")]
    NoMatch,
}

/// The `Stripe-Signature` header value for `payload` signed with `secret` at `timestamp`
/// (unix seconds): `t={timestamp},v1={hex hmac}`. Used by the sandbox and by tests.
pub fn sign(payload: &[u8], secret: &str, timestamp: i64) -> String {
    let tag = mac(payload, secret, timestamp).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(tag))
}

/// Checks a `Stripe-Signature` header against the raw request body and returns the signed
/// timestamp `t` (unix seconds).
///
/// `secrets` are every secret currently accepted (several while rolling one); empty ones are
/// ignored. `now_unix` is the receiver's clock; `|now_unix - t|` must not exceed
/// `tolerance_secs` (a negative tolerance counts as 0).
pub fn verify(
    header: Option<&str>,
    payload: &[u8],
    secrets: &[&str],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<i64, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let parsed = parse(header)?;

    // An empty secret is a misconfiguration, and anyone can sign with it: never accept it.
    let authentic = secrets.iter().filter(|s| !s.is_empty()).any(|secret| {
        let mac = mac(payload, secret, parsed.timestamp);
        parsed
            .v1
            .iter()
            .flatten()
            .any(|candidate| mac.clone().verify_slice(candidate).is_ok())
    });
    if !authentic {
        return Err(SignatureError::NoMatch);
    }

    // `abs_diff` cannot overflow, whatever the two clocks say.
    let tolerance = tolerance_secs.max(0).unsigned_abs();
    if now_unix.abs_diff(parsed.timestamp) > tolerance {
        return Err(SignatureError::StaleTimestamp);
    }
    Ok(parsed.timestamp)
}

/// HMAC-SHA256 of `"{timestamp}.{payload}"`, ready to finalize or verify.
fn mac(payload: &[u8], secret: &str, timestamp: i64) -> HmacSha256 {
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac
}

/// A header's timestamp and its `v1` signatures. A `v1` entry that is not 64 hex digits is
/// kept as `None`: it can never match, but it does not hide a valid entry beside it.
#[derive(Debug)]
struct Parsed {
    timestamp: i64,
    v1: Vec<Option<[u8; TAG_LEN]>>,
}

fn parse(header: &str) -> Result<Parsed, SignatureError> {
    if header.len() > MAX_HEADER_LEN {
        return Err(SignatureError::Malformed);
    }
    let mut timestamp = None;
    let mut v1 = Vec::new();
    for item in header.split(',') {
        let (scheme, value) = item.split_once('=').ok_or(SignatureError::Malformed)?;
        let value = value.trim();
        match scheme.trim() {
            "t" => {
                // Two timestamps would make the signed string ambiguous.
                if timestamp.is_some() {
                    return Err(SignatureError::Malformed);
                }
                let digits = value.strip_prefix('-').unwrap_or(value);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(SignatureError::Malformed);
                }
                timestamp = Some(
                    value
                        .parse::<i64>()
                        .map_err(|_| SignatureError::Malformed)?,
                );
            }
            "v1" => {
                let mut tag = [0u8; TAG_LEN];
                v1.push(hex::decode_to_slice(value, &mut tag).ok().map(|()| tag));
            }
            // Other schemes (`v0` test signatures, future versions) are not ours to check.
            _ => {}
        }
    }
    match timestamp {
        Some(timestamp) if !v1.is_empty() => Ok(Parsed { timestamp, v1 }),
        _ => Err(SignatureError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "whsec_test_current";
    const OLD_SECRET: &str = "whsec_test_previous";
    const NOW: i64 = 1_800_000_000;
    const BODY: &[u8] = br#"{"id":"evt_1","type":"checkout.session.completed"}"#;

    fn check(header: &str) -> Result<i64, SignatureError> {
        verify(Some(header), BODY, &[SECRET], NOW, DEFAULT_TOLERANCE_SECS)
    }

    #[test]
    fn sign_produces_stripe_shaped_header() {
        let header = sign(BODY, SECRET, NOW);
        let (t, v1) = header.split_once(",v1=").unwrap();
        assert_eq!(t, format!("t={NOW}"));
        assert_eq!(v1.len(), 64);
        assert!(
            v1.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }

    #[test]
    fn matches_a_known_vector() {
        // printf '%s' '1800000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_test_current
        assert_eq!(
            sign(br#"{"a":1}"#, SECRET, NOW),
            "t=1800000000,v1=8ab7ea752c5b909cedb6d86aa83990d15826d2b70cec82335341619c70bf055b"
        );
    }

    #[test]
    fn verifies_its_own_signature_and_returns_the_timestamp() {
        assert_eq!(check(&sign(BODY, SECRET, NOW - 10)), Ok(NOW - 10));
    }

    #[test]
    fn missing_header_is_missing() {
        assert_eq!(
            verify(None, BODY, &[SECRET], NOW, 300),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn malformed_headers_are_malformed() {
        let good_v1 = sign(BODY, SECRET, NOW)
            .split_once(",v1=")
            .unwrap()
            .1
            .to_owned();
        for header in [
            String::new(),
            "garbage".to_owned(),
            format!("v1={good_v1}"),
            format!("t={NOW}"),
            format!("t={NOW},v0={good_v1}"),
            format!("t=,v1={good_v1}"),
            format!("t=+{NOW},v1={good_v1}"),
            format!("t=1e9,v1={good_v1}"),
            format!("t=99999999999999999999,v1={good_v1}"),
            format!("t={NOW},t={NOW},v1={good_v1}"),
            format!("t={NOW},,v1={good_v1}"),
            format!("t={NOW},{}v1={good_v1}", "v0=00,".repeat(2000)),
        ] {
            assert_eq!(check(&header), Err(SignatureError::Malformed), "{header:?}");
        }
    }

    #[test]
    fn ignores_other_schemes_and_tolerates_spaces() {
        let header = sign(BODY, SECRET, NOW);
        let v1 = header.split_once(",v1=").unwrap().1;
        let with_v0 = format!("t={NOW}, v0=deadbeef, v1={v1}");
        assert_eq!(check(&with_v0), Ok(NOW));
    }

    #[test]
    fn a_garbage_v1_does_not_hide_a_valid_one() {
        let header = sign(BODY, SECRET, NOW);
        let v1 = header.split_once(",v1=").unwrap().1;
        assert_eq!(check(&format!("t={NOW},v1=zz,v1={v1}")), Ok(NOW));
        assert_eq!(
            check(&format!("t={NOW},v1=zz")),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn wrong_secret_or_body_does_not_match() {
        assert_eq!(
            check(&sign(BODY, "whsec_someone_else", NOW)),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            check(&sign(b"{}", SECRET, NOW)),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            verify(Some(&sign(BODY, SECRET, NOW)), BODY, &[], NOW, 300),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            verify(Some(&sign(BODY, "", NOW)), BODY, &["", SECRET], NOW, 300),
            Err(SignatureError::NoMatch),
            "an empty secret never verifies"
        );
    }

    #[test]
    fn tolerance_is_inclusive_and_applies_both_ways() {
        assert_eq!(check(&sign(BODY, SECRET, NOW - 300)), Ok(NOW - 300));
        assert_eq!(check(&sign(BODY, SECRET, NOW + 300)), Ok(NOW + 300));
        assert_eq!(
            check(&sign(BODY, SECRET, NOW - 301)),
            Err(SignatureError::StaleTimestamp)
        );
        assert_eq!(
            check(&sign(BODY, SECRET, NOW + 301)),
            Err(SignatureError::StaleTimestamp)
        );
    }

    #[test]
    fn extreme_timestamps_do_not_overflow() {
        let at = |t: i64, now: i64, tolerance: i64| {
            verify(
                Some(&sign(BODY, SECRET, t)),
                BODY,
                &[SECRET],
                now,
                tolerance,
            )
        };
        assert_eq!(at(i64::MAX, NOW, i64::MAX), Ok(i64::MAX));
        assert_eq!(at(0, NOW, i64::MAX), Ok(0));
        assert_eq!(
            at(i64::MIN, NOW, i64::MAX),
            Err(SignatureError::StaleTimestamp)
        );
        assert_eq!(
            at(i64::MIN, i64::MAX, 300),
            Err(SignatureError::StaleTimestamp)
        );
        assert_eq!(
            at(i64::MAX, i64::MIN, 300),
            Err(SignatureError::StaleTimestamp)
        );
        assert_eq!(at(i64::MIN, i64::MIN, 0), Ok(i64::MIN));
        assert_eq!(
            at(NOW, NOW, -5),
            Ok(NOW),
            "a negative tolerance means exact"
        );
        assert_eq!(at(NOW - 1, NOW, -5), Err(SignatureError::StaleTimestamp));
    }

    #[test]
    fn a_long_but_bounded_header_still_verifies() {
        let header = sign(BODY, SECRET, NOW);
        let (t, v1) = header.split_once(",v1=").unwrap();
        let padded = format!("{t},{}v1={v1}", "v0=00,".repeat(1300));
        assert!(padded.len() <= MAX_HEADER_LEN);
        assert_eq!(check(&padded), Ok(NOW));
    }

    #[test]
    fn forged_signature_is_checked_before_the_timestamp() {
        // A forgery learns nothing about our clock: it is NoMatch, never StaleTimestamp.
        assert_eq!(
            check(&sign(BODY, "whsec_forger", NOW - 10_000)),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn rotation_on_either_side_verifies() {
        let old = sign(BODY, OLD_SECRET, NOW);
        let new = sign(BODY, SECRET, NOW);
        let old_v1 = old.split_once(",v1=").unwrap().1;
        let new_v1 = new.split_once(",v1=").unwrap().1;

        // Stripe rolling its secret: both signatures sent, we know only the new one.
        let both = format!("t={NOW},v1={old_v1},v1={new_v1}");
        assert_eq!(check(&both), Ok(NOW));

        // Us rolling ours: one signature sent, we accept both secrets.
        for header in [&old, &new] {
            assert_eq!(
                verify(Some(header), BODY, &[SECRET, OLD_SECRET], NOW, 300),
                Ok(NOW)
            );
        }
        assert_eq!(check(&old), Err(SignatureError::NoMatch));
    }

    /// Splices extra `v1` entries into a header made by [`sign`].
    fn with_extra_v1(header: &str, extra: &[u8; TAG_LEN]) -> String {
        let (t, v1) = header.split_once(",v1=").unwrap();
        format!("{t},v1={},v1={v1}", hex::encode(extra))
    }

    proptest! {
        #[test]
        fn sign_then_verify_round_trips(
            payload in proptest::collection::vec(any::<u8>(), 0..512),
            secret in "\\PC{1,64}",
            t in 0i64..4_000_000_000,
            skew in -300i64..=300,
        ) {
            let header = sign(&payload, &secret, t);
            prop_assert_eq!(verify(Some(&header), &payload, &[&secret], t + skew, 300), Ok(t));
        }

        #[test]
        fn any_single_byte_change_fails(
            payload in proptest::collection::vec(any::<u8>(), 1..512),
            index in any::<proptest::sample::Index>(),
            flip in 1u8..=255,
            secret in "\\PC{1,64}",
        ) {
            let header = sign(&payload, &secret, NOW);
            let mut tampered = payload.clone();
            let i = index.index(tampered.len());
            tampered[i] ^= flip;
            prop_assert_eq!(
                verify(Some(&header), &tampered, &[&secret], NOW, 300),
                Err(SignatureError::NoMatch)
            );
        }

        #[test]
        fn any_timestamp_outside_tolerance_fails(
            payload in proptest::collection::vec(any::<u8>(), 0..128),
            tolerance in 0i64..100_000,
            beyond in 1i64..1_000_000_000,
            future in any::<bool>(),
        ) {
            let t = if future { NOW + tolerance + beyond } else { NOW - tolerance - beyond };
            let header = sign(&payload, SECRET, t);
            prop_assert_eq!(
                verify(Some(&header), &payload, &[SECRET], NOW, tolerance),
                Err(SignatureError::StaleTimestamp)
            );
        }

        #[test]
        fn arbitrary_headers_never_panic(header in "\\PC{0,300}", payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = verify(Some(&header), &payload, &[SECRET, ""], NOW, 300);
        }

        #[test]
        fn header_shaped_noise_never_panics_or_verifies(
            header in "((t|v1|v0|x| t)=(-?[0-9]{0,22}|[0-9a-f]{0,70}|=|)|,| ){0,12}",
        ) {
            // No real signature was ever made for this payload, so nothing may verify.
            let result = verify(Some(&header), b"payload", &[SECRET], NOW, i64::MAX);
            prop_assert!(result.is_err(), "{:?} verified", header);
        }

        #[test]
        fn a_rotated_pair_of_signatures_verifies(
            payload in proptest::collection::vec(any::<u8>(), 0..256),
            other in any::<[u8; TAG_LEN]>(),
            old_first in any::<bool>(),
        ) {
            let header = sign(&payload, SECRET, NOW);
            let header = if old_first {
                with_extra_v1(&header, &other)
            } else {
                format!("{header},v1={}", hex::encode(other))
            };
            prop_assert_eq!(verify(Some(&header), &payload, &[SECRET], NOW, 300), Ok(NOW));
            prop_assert_eq!(
                verify(Some(&header), &payload, &["whsec_unrelated", SECRET], NOW, 300),
                Ok(NOW)
            );
        }
    }
}
