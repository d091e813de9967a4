//! Provider events about refunds (the refund of a duplicate payment settling), mapped into
//! what payretry acts on.
//!
//! Stripe reports a Refund's status changes as `refund.updated` and `refund.failed`; with API
//! versions before `2024-10-28` (payretry pins `2024-06-20`) a refund of a charge — every
//! refund payretry makes — is reported as `charge.refund.updated` instead. All three carry the
//! Refund object, and its `status` (not the event type) says where the refund stands, so the
//! three are read alike.

use super::event::EventError;
use crate::provider::RefundState;
use crate::provider::stripe::refund_state;
use payretry_domain::{AttemptNumber, PaymentSessionId};
use serde_json::Value;

/// The event types read here.
pub const REFUND_EVENT_TYPES: [&str; 3] =
    ["refund.updated", "refund.failed", "charge.refund.updated"];

/// Longest provider text kept (a failure reason is a short code).
const MAX_REASON_LEN: usize = 100;

/// A verified provider event about a refund.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundEvent {
    /// The provider's event id, for deduplication.
    pub id: String,
    /// `re_…`
    pub refund_id: String,
    pub state: RefundState,
    /// The refunded charge's payment intent, when the refund names one.
    pub payment_intent: Option<String>,
    /// From the refund's `metadata.payment_session_id` (payretry sets it on create).
    pub session_id: Option<PaymentSessionId>,
    /// From the refund's `metadata.duplicate_attempt`.
    pub duplicate_attempt: Option<AttemptNumber>,
}

/// Parses a refund event. `Ok(None)`: a well-formed event of another type, or about no
/// refund.
pub fn parse(body: &[u8]) -> Result<Option<RefundEvent>, EventError> {
    let event: Value = serde_json::from_slice(body).map_err(|_| EventError::Malformed)?;
    let id = event
        .get("id")
        .and_then(Value::as_str)
        .ok_or(EventError::Malformed)?;
    let kind = event
        .get("type")
        .and_then(Value::as_str)
        .ok_or(EventError::Malformed)?;
    if !REFUND_EVENT_TYPES.contains(&kind) {
        return Ok(None);
    }
    let object = event.pointer("/data/object").unwrap_or(&Value::Null);
    let text = |pointer: &str| object.pointer(pointer).and_then(Value::as_str);
    if text("/object") != Some("refund") {
        return Ok(None);
    }
    let Some(refund_id) = text("/id").filter(|id| is_stripe_id(id, "re_")) else {
        return Ok(None);
    };
    let failure_reason = text("/failure_reason")
        .filter(|r| r.len() <= MAX_REASON_LEN && r.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned);
    let payment_intent = text("/payment_intent")
        .or_else(|| text("/payment_intent/id"))
        .filter(|pi| is_stripe_id(pi, "pi_"));
    let session_id =
        text("/metadata/payment_session_id").and_then(|s| PaymentSessionId::parse(s).ok());
    let duplicate_attempt = text("/metadata/duplicate_attempt")
        .and_then(|a| a.parse::<u32>().ok())
        .map(AttemptNumber::new);
    Ok(Some(RefundEvent {
        id: id.to_owned(),
        refund_id: refund_id.to_owned(),
        state: refund_state(text("/status"), failure_reason),
        payment_intent: payment_intent.map(str::to_owned),
        session_id,
        duplicate_attempt,
    }))
}

/// `{prefix}` followed by letters, digits and underscores, at most 255 bytes.
fn is_stripe_id(id: &str, prefix: &str) -> bool {
    id.len() <= 255
        && id.strip_prefix(prefix).is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(kind: &str, refund: Value) -> Option<RefundEvent> {
        let body =
            json!({"id": "evt_r", "object": "event", "type": kind, "data": {"object": refund}});
        parse(body.to_string().as_bytes()).unwrap()
    }

    fn refund(status: &str) -> Value {
        json!({"id": "re_1", "object": "refund", "status": status, "payment_intent": "pi_1",
            "metadata": {"payment_session_id": "ps_a", "duplicate_attempt": "0"}})
    }

    #[test]
    fn the_refunds_status_says_where_it_stands() {
        for kind in REFUND_EVENT_TYPES {
            let succeeded = event(kind, refund("succeeded")).unwrap();
            assert_eq!(succeeded.state, RefundState::Succeeded, "{kind}");
            assert_eq!(succeeded.refund_id, "re_1");
            assert_eq!(succeeded.payment_intent.as_deref(), Some("pi_1"));
            assert_eq!(
                succeeded.session_id,
                Some(PaymentSessionId::parse("ps_a").unwrap())
            );
            assert_eq!(succeeded.duplicate_attempt, Some(AttemptNumber::new(0)));
        }
        assert_eq!(
            event("refund.updated", refund("pending")).unwrap().state,
            RefundState::Pending
        );
        assert_eq!(
            event("refund.updated", refund("requires_action"))
                .unwrap()
                .state,
            RefundState::Pending
        );
        let mut failed = refund("failed");
        failed["failure_reason"] = json!("expired_or_canceled_card");
        assert_eq!(
            event("refund.failed", failed).unwrap().state,
            RefundState::Failed {
                reason: Some("expired_or_canceled_card".to_owned())
            }
        );
        assert_eq!(
            event("charge.refund.updated", refund("canceled"))
                .unwrap()
                .state,
            RefundState::Failed {
                reason: Some("canceled".to_owned())
            }
        );
    }

    #[test]
    fn other_events_and_objects_are_not_refund_events() {
        assert_eq!(event("charge.refunded", refund("succeeded")), None);
        assert_eq!(
            event("checkout.session.completed", refund("succeeded")),
            None
        );
        let mut charge = refund("succeeded");
        charge["object"] = json!("charge");
        assert_eq!(event("refund.updated", charge), None);
        let mut bad_id = refund("succeeded");
        bad_id["id"] = json!("re_../x");
        assert_eq!(event("refund.updated", bad_id), None);
        assert_eq!(parse(b"[]"), Err(EventError::Malformed));
    }

    #[test]
    fn a_refund_without_payretrys_metadata_still_names_its_charge() {
        let mut foreign = refund("succeeded");
        foreign["metadata"] = json!({});
        let parsed = event("refund.updated", foreign).unwrap();
        assert_eq!(parsed.session_id, None);
        assert_eq!(parsed.duplicate_attempt, None);
        assert_eq!(parsed.payment_intent.as_deref(), Some("pi_1"));
        let mut odd_reason = refund("failed");
        odd_reason["failure_reason"] = json!("no spaces allowed");
        assert_eq!(
            event("refund.failed", odd_reason).unwrap().state,
            RefundState::Failed {
                reason: Some("failed".to_owned())
            }
        );
    }
}
