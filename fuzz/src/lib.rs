//! The checks behind `fuzz_targets/webhook.rs`, kept in a library so that the same code
//! runs under libFuzzer (`cargo +nightly fuzz run webhook`) and as a plain stable
//! `cargo test` smoke (`tests/smoke.rs`).
//!
//! Properties checked on every input (any violation panics, which libFuzzer reports):
//! - `signature::verify` never panics, on any header (or none), payload, secret list,
//!   clock and tolerance;
//! - whatever it accepts was really signed: `Ok(t)` only with a non-empty secret, with
//!   `|now - t| <= max(tolerance, 0)`, and with a `v1` entry equal to HMAC(secret, t.payload);
//! - a header made by `signature::sign` verifies inside the tolerance (also when the header
//!   is padded with other schemes or a second, foreign `v1`), and fails once the payload is
//!   changed, the secret is another one, or the clock is outside the tolerance;
//! - `event::parse` never panics, on raw bytes and on JSON shaped like Stripe events; what it
//!   returns is sane: the event id is the body's `id`, the session id is a valid `ps_…` id
//!   taken from the body, a failure reason is normalised (`[a-z0-9_]{1,64}`).

use arbitrary::{Arbitrary, Result, Unstructured};
use payretry::webhook::event::{self, EventKind};
use payretry::provider::signature::{self, SignatureError};
use payretry_domain::PaymentSessionId;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// Runs every check on one fuzzer input. Never returns an error for "not enough bytes".
pub fn webhook(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = arbitrary_verify(&mut u);
    let _ = round_trip(&mut u);
    let _ = structured_event(&mut u);
    // The raw input itself, as a webhook body.
    check_parse(data);
}

/// Arbitrary header, payload, secrets and clock straight into `verify`.
fn arbitrary_verify(u: &mut Unstructured<'_>) -> Result<()> {
    let header: Option<&str> = u.arbitrary()?;
    let payload: &[u8] = u.arbitrary()?;
    let secrets: Vec<&str> = u.arbitrary()?;
    let now: i64 = u.arbitrary()?;
    let tolerance: i64 = u.arbitrary()?;
    let result = signature::verify(header, payload, &secrets, now, tolerance);
    if let Ok(t) = result {
        assert_authentic(header, payload, &secrets, now, tolerance, t);
    }
    if header.is_none() {
        assert_eq!(result, Err(SignatureError::Missing));
    }
    if header.is_some_and(|h| h.len() > signature::MAX_HEADER_LEN) {
        assert_eq!(result, Err(SignatureError::Malformed));
    }
    Ok(())
}

/// `Ok(t)` must mean: some non-empty secret signed `t.payload`, and `t` is within tolerance.
fn assert_authentic(
    header: Option<&str>,
    payload: &[u8],
    secrets: &[&str],
    now: i64,
    tolerance: i64,
    t: i64,
) {
    let header = header.expect("verified without a header");
    assert!(
        now.abs_diff(t) <= tolerance.max(0).unsigned_abs(),
        "verified a timestamp outside the tolerance: t={t} now={now} tolerance={tolerance}"
    );
    let signed_by_a_secret = secrets.iter().filter(|s| !s.is_empty()).any(|secret| {
        let expected = signature::sign(payload, secret, t);
        let expected_v1 = expected.split_once(",v1=").expect("sign's shape").1;
        header.split(',').any(|item| {
            item.split_once('=').is_some_and(|(scheme, value)| {
                scheme.trim() == "v1" && value.trim().eq_ignore_ascii_case(expected_v1)
            })
        })
    });
    assert!(
        signed_by_a_secret,
        "verified a header that no configured secret signed: {header:?}"
    );
}

#[derive(Debug, Arbitrary)]
struct RoundTrip<'a> {
    payload: &'a [u8],
    secret: &'a str,
    other_secret: &'a str,
    t: i64,
    skew: i64,
    tolerance: u32,
    /// Other schemes and a foreign `v1` around the real one (Stripe rolling its secret).
    padding: Vec<(u8, [u8; 32])>,
    foreign_first: bool,
    flip_at: usize,
    flip: u8,
}

/// A header made by `sign` verifies, inside the tolerance only, and only for its payload and
/// secret.
fn round_trip(u: &mut Unstructured<'_>) -> Result<()> {
    let case: RoundTrip = u.arbitrary()?;
    let tolerance = i64::from(case.tolerance);
    let mut header = signature::sign(case.payload, case.secret, case.t);
    if !case.padding.is_empty() {
        let (t, v1) = header.split_once(",v1=").expect("sign's shape");
        let extra: Vec<String> = case
            .padding
            .iter()
            .take(8)
            .map(|(scheme, tag)| {
                let name = match scheme % 3 {
                    0 => "v0",
                    1 => "v1",
                    _ => "x",
                };
                format!("{name}={}", payretry_hex(tag))
            })
            .collect();
        header = if case.foreign_first {
            format!("{t},{},v1={v1}", extra.join(","))
        } else {
            format!("{t}, v1={v1} ,{}", extra.join(","))
        };
    }
    let now = case.t.saturating_add(case.skew);
    let within = now.abs_diff(case.t) <= u64::from(case.tolerance);
    let result = signature::verify(Some(&header), case.payload, &[case.secret], now, tolerance);
    if case.secret.is_empty() {
        assert_eq!(
            result,
            Err(SignatureError::NoMatch),
            "an empty secret verified"
        );
        return Ok(());
    }
    if header.len() > signature::MAX_HEADER_LEN {
        assert_eq!(result, Err(SignatureError::Malformed));
        return Ok(());
    }
    if within {
        assert_eq!(
            result,
            Ok(case.t),
            "a genuine header was refused: {header:?}"
        );
    } else {
        assert_eq!(result, Err(SignatureError::StaleTimestamp), "{header:?}");
    }

    // Another secret never verifies (unless it is the same secret).
    if case.other_secret != case.secret {
        let other = signature::verify(
            Some(&header),
            case.payload,
            &[case.other_secret],
            case.t,
            tolerance,
        );
        assert!(
            other.is_err() || hmac_equivalent_keys(case.secret, case.other_secret),
            "verified with the wrong secret: {other:?} secret={:?} other={:?}",
            case.secret,
            case.other_secret
        );
        // Rotation: the right secret anywhere in the list verifies.
        let both = signature::verify(
            Some(&header),
            case.payload,
            &[case.other_secret, case.secret],
            case.t,
            tolerance,
        );
        assert_eq!(both, Ok(case.t));
    }

    // One changed byte of the payload never verifies.
    if !case.payload.is_empty() && case.flip != 0 {
        let mut tampered = case.payload.to_vec();
        let i = case.flip_at % tampered.len();
        tampered[i] ^= case.flip;
        let result = signature::verify(Some(&header), &tampered, &[case.secret], case.t, tolerance);
        assert_eq!(
            result,
            Err(SignatureError::NoMatch),
            "a tampered payload verified"
        );
    }
    Ok(())
}

/// Whether two secrets are the same HMAC-SHA256 key. HMAC zero-pads keys up to the 64-byte
/// block and hashes longer ones, so `"k"` and `"k\0"` (or a long key and its SHA-256) sign
/// alike: that is HMAC, not a flaw of `verify`, and an attacker who can choose our secret has
/// won anyway.
fn hmac_equivalent_keys(a: &str, b: &str) -> bool {
    fn block(key: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        if key.len() > 64 {
            out[..32].copy_from_slice(&Sha256::digest(key)[..]);
        } else {
            out[..key.len()].copy_from_slice(key);
        }
        out
    }
    block(a.as_bytes()) == block(b.as_bytes())
}

/// Lowercase hex, as Stripe sends it.
fn payretry_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `event::parse` on raw bytes: never panics, and what it returns is consistent with the body.
fn check_parse(body: &[u8]) {
    let Ok(Some(event)) = event::parse(body) else {
        return;
    };
    let value: Value = serde_json::from_slice(body).expect("parse accepted invalid JSON");
    assert_eq!(
        value.get("id").and_then(Value::as_str),
        Some(event.id.as_str()),
        "the event id is not the body's id"
    );
    assert!(
        PaymentSessionId::parse(event.session_id.as_str()).is_ok(),
        "an invalid session id got through: {:?}",
        event.session_id
    );
    let object = value
        .pointer("/data/object")
        .cloned()
        .unwrap_or(Value::Null);
    let from_body = ["/metadata/payment_session_id", "/client_reference_id"]
        .iter()
        .any(|p| object.pointer(p).and_then(Value::as_str) == Some(event.session_id.as_str()));
    assert!(from_body, "the session id was not taken from the body");
    if let EventKind::Failed(reason) = &event.kind {
        let r = reason.as_str();
        assert!(
            !r.is_empty()
                && r.len() <= 64
                && r.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "a failure reason was not normalised: {r:?}"
        );
    }
    if let Some(provider) = &event.provider_session_id {
        assert_eq!(
            object.get("id").and_then(Value::as_str),
            Some(provider.as_str())
        );
    }
}

const TYPES: &[&str] = &[
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
    "payment_intent.payment_failed",
    "customer.created",
];

/// A JSON value from a few fuzzer bytes: mostly strings, sometimes other kinds.
fn loose(u: &mut Unstructured<'_>, likely: &[&str]) -> Result<Value> {
    Ok(match u.int_in_range(0u8..=9)? {
        0 => Value::Null,
        1 => json!(u.arbitrary::<i64>()?),
        2 => json!(u.arbitrary::<bool>()?),
        3 => json!([u.arbitrary::<&str>()?]),
        4 => json!({ "x": u.arbitrary::<&str>()? }),
        5 | 6 => json!(u.arbitrary::<&str>()?),
        _ if !likely.is_empty() => json!(*u.choose(likely)?),
        _ => json!(u.arbitrary::<&str>()?),
    })
}

/// Stripe-shaped events with fuzzed fields, so that every branch of `parse` is reached.
fn structured_event(u: &mut Unstructured<'_>) -> Result<()> {
    let session = match u.int_in_range(0u8..=3)? {
        0 => format!("ps_{:032x}", u.arbitrary::<u128>()?),
        1 => format!("ps_{}", u.arbitrary::<&str>()?),
        _ => u.arbitrary::<&str>()?.to_owned(),
    };
    let mut metadata = Map::new();
    if u.arbitrary()? {
        metadata.insert("payment_session_id".into(), json!(session));
    }
    if u.arbitrary()? {
        metadata.insert(
            "retry_attempt".into(),
            loose(u, &["0", "1", "3", "4294967296", "-1", "+2"])?,
        );
    }
    let mut object = Map::new();
    if u.arbitrary()? {
        object.insert("metadata".into(), Value::Object(metadata));
    }
    if u.arbitrary()? {
        object.insert("client_reference_id".into(), json!(session));
    }
    if u.arbitrary()? {
        object.insert(
            "object".into(),
            loose(u, &["checkout.session", "payment_intent"])?,
        );
    }
    if u.arbitrary()? {
        object.insert("id".into(), loose(u, &["cs_test_1", ""])?);
    }
    if u.arbitrary()? {
        object.insert(
            "payment_status".into(),
            loose(u, &["paid", "no_payment_required", "unpaid"])?,
        );
    }
    if u.arbitrary()? {
        let mut error = Map::new();
        error.insert(
            "decline_code".into(),
            loose(u, &["insufficient_funds", "", "  ", "STOLEN card!"])?,
        );
        error.insert("code".into(), loose(u, &["card_declined", "expired_card"])?);
        object.insert("last_payment_error".into(), Value::Object(error));
    }
    let mut event = Map::new();
    if u.ratio(15u8, 16u8)? {
        event.insert("id".into(), loose(u, &["evt_1"])?);
    }
    if u.ratio(15u8, 16u8)? {
        event.insert("type".into(), loose(u, TYPES)?);
    }
    event.insert(
        "data".into(),
        match u.int_in_range(0u8..=7)? {
            0 => Value::Null,
            1 => json!({}),
            _ => json!({ "object": Value::Object(object) }),
        },
    );
    let body = serde_json::to_vec(&Value::Object(event)).expect("serialisable");
    check_parse(&body);
    Ok(())
}
