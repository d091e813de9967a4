//! Provider webhook events, mapped into what payretry acts on. Stripe's vocabulary
//! (`payment_status`, event type strings) stops here.

use payretry_domain::{AttemptNumber, FailureReason, PaymentSessionId, ProviderSessionId};
use serde_json::Value;

/// What an event means for a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// The money moved.
    Paid,
    /// The checkout was completed with a payment method that settles later (Stripe:
    /// `checkout.session.completed` with `payment_status` `unpaid`, e.g. a bank debit).
    Processing,
    /// That payment did not settle (`checkout.session.async_payment_failed`). Kept apart
    /// from [`EventKind::Failed`] so a card decline arriving late cannot end `processing`.
    AsyncPaymentFailed,
    /// The payment was declined or failed.
    Failed(FailureReason),
    /// The checkout closed unpaid.
    CheckoutExpired,
}

/// A verified provider event about one of our sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderEvent {
    /// The provider's event id, for deduplication.
    pub id: String,
    pub kind: EventKind,
    pub session_id: PaymentSessionId,
    /// From `metadata.retry_attempt`; `None` if the provider did not echo it.
    pub attempt: Option<AttemptNumber>,
    pub provider_session_id: Option<ProviderSessionId>,
    /// The charge's payment intent (`pi_…`): what a refund of a duplicate payment needs.
    /// From a checkout session's `payment_intent` (an id, or the expanded object's `id`), or
    /// a payment intent event's own `id`.
    pub payment_intent: Option<String>,
}

/// Why an event body could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("the body is not a JSON event with `id` and `type`")]
    Malformed,
}

/// Parses a Stripe event. `Ok(None)`: a well-formed event payretry does not act on (an
/// unknown type, or not about one of our sessions).
pub fn parse(body: &[u8]) -> Result<Option<ProviderEvent>, EventError> {
    let event: Value = serde_json::from_slice(body).map_err(|_| EventError::Malformed)?;
    let id = event
        .get("id")
        .and_then(Value::as_str)
        .ok_or(EventError::Malformed)?;
    let kind = event
        .get("type")
        .and_then(Value::as_str)
        .ok_or(EventError::Malformed)?;
    let object = event.pointer("/data/object").unwrap_or(&Value::Null);
    let text = |pointer: &str| object.pointer(pointer).and_then(Value::as_str);
    let kind = match kind {
        "checkout.session.completed" => match text("/payment_status") {
            Some("paid" | "no_payment_required") => EventKind::Paid,
            Some("unpaid") => EventKind::Processing,
            _ => return Ok(None),
        },
        "checkout.session.async_payment_succeeded" => EventKind::Paid,
        "checkout.session.async_payment_failed" => EventKind::AsyncPaymentFailed,
        "checkout.session.expired" => EventKind::CheckoutExpired,
        "payment_intent.payment_failed" => {
            let code = text("/last_payment_error/decline_code")
                .or_else(|| text("/last_payment_error/code"))
                .unwrap_or(FailureReason::UNKNOWN);
            EventKind::Failed(FailureReason::from_code(code))
        }
        _ => return Ok(None),
    };
    let session = text("/metadata/payment_session_id").or_else(|| text("/client_reference_id"));
    let Some(session_id) = session.and_then(|s| PaymentSessionId::parse(s).ok()) else {
        return Ok(None);
    };
    let attempt = text("/metadata/retry_attempt")
        .and_then(|a| a.parse::<u32>().ok())
        .map(AttemptNumber::new);
    let (provider_session_id, payment_intent) = match text("/object") {
        Some("checkout.session") => (
            text("/id").map(ProviderSessionId::new),
            text("/payment_intent").or_else(|| text("/payment_intent/id")),
        ),
        Some("payment_intent") => (None, text("/id")),
        _ => (None, None),
    };
    Ok(Some(ProviderEvent {
        id: id.to_owned(),
        kind,
        session_id,
        attempt,
        provider_session_id,
        payment_intent: payment_intent.map(str::to_owned),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_json(v: Value) -> Option<ProviderEvent> {
        parse(v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn completed_and_paid_is_a_success_of_that_attempt() {
        let event = parse_json(json!({
            "id": "evt_1", "type": "checkout.session.completed",
            "data": {"object": {"object": "checkout.session", "id": "cs_1", "payment_status": "paid",
                "client_reference_id": "ps_a", "metadata": {"payment_session_id": "ps_a", "retry_attempt": "2"}}}
        }))
        .unwrap();
        assert_eq!(event.kind, EventKind::Paid);
        assert_eq!(event.attempt, Some(AttemptNumber::new(2)));
        assert_eq!(
            event.provider_session_id,
            Some(ProviderSessionId::new("cs_1"))
        );
    }

    #[test]
    fn a_paid_event_carries_its_payment_intent() {
        let object = |payment_intent: Value| {
            json!({"id": "evt_pi", "type": "checkout.session.async_payment_succeeded",
                "data": {"object": {"object": "checkout.session", "id": "cs_1",
                    "payment_status": "paid", "payment_intent": payment_intent,
                    "metadata": {"payment_session_id": "ps_a", "retry_attempt": "1"}}}})
        };
        let by_id = parse_json(object(json!("pi_123"))).unwrap();
        assert_eq!(by_id.kind, EventKind::Paid);
        assert_eq!(by_id.payment_intent.as_deref(), Some("pi_123"));
        let expanded = parse_json(object(json!({"id": "pi_456", "object": "payment_intent"})));
        assert_eq!(expanded.unwrap().payment_intent.as_deref(), Some("pi_456"));
        assert_eq!(
            parse_json(object(Value::Null)).unwrap().payment_intent,
            None
        );
    }

    #[test]
    fn completed_but_unpaid_is_a_payment_processing() {
        let event = parse_json(json!({"id": "evt", "type": "checkout.session.completed",
            "data": {"object": {"object": "checkout.session", "id": "cs_1",
                "payment_status": "unpaid", "client_reference_id": "ps_a"}}}))
        .unwrap();
        assert_eq!(event.kind, EventKind::Processing);
        let failed = parse_json(
            json!({"id": "evt", "type": "checkout.session.async_payment_failed",
            "data": {"object": {"object": "checkout.session", "id": "cs_1",
                "payment_status": "unpaid", "client_reference_id": "ps_a"}}}),
        )
        .unwrap();
        assert_eq!(failed.kind, EventKind::AsyncPaymentFailed);
        assert_eq!(
            parse_json(json!({"id": "evt", "type": "checkout.session.completed",
                "data": {"object": {"payment_status": "pending", "client_reference_id": "ps_a"}}})),
            None,
            "a payment status this API version does not define"
        );
    }

    #[test]
    fn payment_failed_prefers_the_decline_code() {
        let event = parse_json(json!({
            "id": "evt_2", "type": "payment_intent.payment_failed",
            "data": {"object": {"object": "payment_intent", "id": "pi_1",
                "metadata": {"payment_session_id": "ps_a", "retry_attempt": "0"},
                "last_payment_error": {"code": "card_declined", "decline_code": "insufficient_funds"}}}
        }))
        .unwrap();
        assert_eq!(
            event.kind,
            EventKind::Failed(FailureReason::from_code("insufficient_funds"))
        );
        let event = parse_json(json!({
            "id": "evt_3", "type": "payment_intent.payment_failed",
            "data": {"object": {"metadata": {"payment_session_id": "ps_a"},
                "last_payment_error": {"code": "expired_card"}}}
        }))
        .unwrap();
        assert_eq!(
            event.kind,
            EventKind::Failed(FailureReason::from_code("expired_card"))
        );
        assert_eq!(event.attempt, None);
    }

    #[test]
    fn unknown_types_and_foreign_sessions_are_ignored() {
        assert_eq!(
            parse_json(json!({"id": "e", "type": "customer.created", "data": {"object": {}}})),
            None
        );
        assert_eq!(
            parse_json(json!({"id": "e", "type": "checkout.session.expired",
                "data": {"object": {"client_reference_id": "order_17"}}})),
            None
        );
        assert_eq!(parse(b"not json"), Err(EventError::Malformed));
        assert_eq!(parse(b"{\"type\": \"x\"}"), Err(EventError::Malformed));
    }
}
