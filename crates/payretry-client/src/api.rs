//! The contract's JSON bodies (DESIGN.md §3), field for field, in camelCase.
//!
//! These are a mirror of the wire format rather than the service's own types, so the client
//! never pulls the service crate (sqlx, axum) into a buyer-side build, and a drift in the
//! contract shows up here as a decode error instead of a silently missing field. Values use
//! payretry-domain's newtypes and enums, so a status or an id never travels inward as a
//! bare string.

use crate::error::ApiErrorCode;
use chrono::{DateTime, Utc};
use payretry_domain::job::minutes_as_number;
use payretry_domain::{
    Amount, AttemptNumber, AuditAction, Currency, FailureReason, PaymentSessionId,
    ProviderSessionId, RetryUnavailableReason, SessionStatus,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The status object returned by `POST /payments/checkout` (201) and
/// `GET /payments/checkout/{sessionId}/status` (200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentStatus {
    /// Our payment session id; the same across every retry.
    pub session_id: PaymentSessionId,
    /// Where the session stands (DESIGN.md §2). The server already reports `expired` once
    /// `expiresAt` has passed, so the client never compares clocks to decide it.
    pub status: SessionStatus,
    /// In the currency's minor units.
    pub amount: Amount,
    pub currency: Currency,
    /// The latest decline (the last failure event wins); null until a checkout fails.
    pub failure_reason: Option<FailureReason>,
    /// Retries already spent.
    pub retry_attempts: u32,
    pub max_retry_attempts: u32,
    pub retry_attempts_remaining: u32,
    /// The server's verdict on whether a retry may be requested now. The client's retry
    /// button follows this and nothing else, so client and server can never disagree on
    /// eligibility.
    pub retry_available: bool,
    /// Why `retry_available` is false; null when it is true.
    pub retry_unavailable_reason: Option<RetryUnavailableReason>,
    /// When the scheduled retry's checkout is due; set while `status` is `retry_scheduled`.
    pub next_retry_at: Option<DateTime<Utc>>,
    pub last_retry_at: Option<DateTime<Utc>>,
    /// The end of the payment window.
    pub expires_at: DateTime<Utc>,
    /// The live provider checkout to send the buyer to, when there is one.
    pub checkout_url: Option<String>,
    pub provider_session_id: Option<ProviderSessionId>,
}

/// The 202 body of `POST /payments/retry/{sessionId}`: the retry that was queued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryScheduled {
    pub session_id: PaymentSessionId,
    /// Which retry this is (1 for the first retry; 0 is the original checkout).
    pub attempt_number: AttemptNumber,
    /// The minimum wait between the press and the new checkout.
    pub delay_seconds: u64,
    /// `delaySeconds / 60`, a number (0.5 for a 30 s delay); whole minutes are written as
    /// integers, as in the contract's examples.
    #[serde(serialize_with = "minutes_as_number")]
    pub delay_minutes: f64,
    /// When the new checkout is due.
    pub scheduled_for: DateTime<Utc>,
    /// Retries left after this one.
    pub retry_attempts_remaining: u32,
}

/// The body of `POST /payments/checkout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateCheckout {
    /// In minor units; [`Amount`] already enforces the contract's 1..=99_999_999.
    pub amount: Amount,
    /// Three lowercase letters, enforced by [`Currency`].
    pub currency: Currency,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Free-form string pairs kept with the session (and passed to the provider, whose
    /// metadata values are strings, hence not arbitrary JSON).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

impl CreateCheckout {
    /// A checkout for `amount` in `currency`, with no description or metadata.
    pub fn new(amount: Amount, currency: Currency) -> Self {
        Self {
            amount,
            currency,
            description: None,
            metadata: BTreeMap::new(),
        }
    }
}

/// The body of `GET /payments/checkout/{sessionId}/audit`: one page of the log, oldest
/// entry first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditLog {
    pub entries: Vec<AuditEntry>,
    /// The opaque cursor of the next page; `None` on the last page. Send it back as it is.
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// One line of a session's append-only audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    pub action: AuditAction,
    /// The attempt the entry is about, when it is about one.
    pub attempt_number: Option<AttemptNumber>,
    /// `sub:role`, `provider` or `system`, as the service writes it.
    pub actor: String,
    /// Action-specific detail; its shape is the service's and may grow.
    #[serde(default)]
    pub details: serde_json::Value,
}

/// An `application/problem+json` error body (RFC 9457) with the contract's stable `code`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// The HTTP status, repeated in the body.
    pub status: u16,
    /// The machine-readable reason: what a client branches on.
    pub code: ApiErrorCode,
    /// A short human summary of the `code`.
    #[serde(default)]
    pub title: String,
    /// A human explanation of this occurrence; never internal details.
    #[serde(default)]
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn contract_status() -> serde_json::Value {
        json!({
            "sessionId": "ps_abc", "status": "failed", "amount": 2500, "currency": "usd",
            "failureReason": "insufficient_funds", "retryAttempts": 1, "maxRetryAttempts": 3,
            "retryAttemptsRemaining": 2, "retryAvailable": true, "retryUnavailableReason": null,
            "nextRetryAt": null, "lastRetryAt": "2027-01-15T08:00:00Z",
            "expiresAt": "2027-01-16T08:00:00Z", "checkoutUrl": "https://pay.example/cs_1",
            "providerSessionId": "cs_1"
        })
    }

    #[test]
    fn status_object_round_trips_the_contract_example() {
        let status: PaymentStatus = serde_json::from_value(contract_status()).unwrap();

        assert_eq!(status.session_id.as_str(), "ps_abc");
        assert_eq!(status.status, SessionStatus::Failed);
        assert_eq!(status.amount.minor_units(), 2500);
        assert_eq!(
            status.failure_reason,
            Some(FailureReason::from_code("insufficient_funds"))
        );
        assert!(status.retry_available);
        assert_eq!(status.retry_attempts_remaining, 2);
        assert_eq!(serde_json::to_value(&status).unwrap(), contract_status());
    }

    #[test]
    fn status_object_reads_every_unavailable_reason() {
        for reason in [
            "limit_reached",
            "window_expired",
            "payment_succeeded",
            "retry_scheduled",
            "payment_not_failed",
            "failure_not_retryable",
        ] {
            let mut body = contract_status();
            body["retryAvailable"] = json!(false);
            body["retryUnavailableReason"] = json!(reason);
            let status: PaymentStatus = serde_json::from_value(body).unwrap();
            assert_eq!(status.retry_unavailable_reason.unwrap().as_str(), reason);
        }
    }

    #[test]
    fn an_unknown_status_is_a_decode_error_not_a_guess() {
        let mut body = contract_status();
        body["status"] = json!("paid");
        assert!(serde_json::from_value::<PaymentStatus>(body).is_err());
    }

    #[test]
    fn retry_object_writes_whole_minutes_as_integers() {
        let body = json!({
            "sessionId": "ps_abc", "attemptNumber": 2, "delaySeconds": 300, "delayMinutes": 5,
            "scheduledFor": "2027-01-15T08:05:00Z", "retryAttemptsRemaining": 1
        });
        let retry: RetryScheduled = serde_json::from_value(body.clone()).unwrap();

        assert_eq!(retry.attempt_number, AttemptNumber::new(2));
        assert_eq!(retry.delay_minutes, 5.0);
        assert_eq!(serde_json::to_value(&retry).unwrap(), body);
    }

    #[test]
    fn retry_object_keeps_fractional_minutes() {
        let body = json!({
            "sessionId": "ps_abc", "attemptNumber": 1, "delaySeconds": 30, "delayMinutes": 0.5,
            "scheduledFor": "2027-01-15T08:00:30Z", "retryAttemptsRemaining": 2
        });
        let retry: RetryScheduled = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(serde_json::to_value(&retry).unwrap(), body);
    }

    #[test]
    fn create_checkout_omits_empty_optional_fields() {
        let mut request =
            CreateCheckout::new(Amount::new(2500).unwrap(), Currency::parse("usd").unwrap());
        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            json!({"amount": 2500, "currency": "usd"})
        );

        request.description = Some("Order 123".into());
        request.metadata.insert("orderId".into(), "123".into());
        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            json!({"amount": 2500, "currency": "usd", "description": "Order 123", "metadata": {"orderId": "123"}})
        );
    }

    #[test]
    fn problem_reads_known_and_unknown_codes() {
        let problem: Problem = serde_json::from_value(json!({
            "type": "about:blank", "status": 409, "code": "retry_limit_reached",
            "title": "Retry limit reached", "detail": "No retries are left for this payment."
        }))
        .unwrap();
        assert_eq!(problem.code, ApiErrorCode::RetryLimitReached);
        assert_eq!(problem.status, 409);

        let future: Problem =
            serde_json::from_value(json!({"status": 400, "code": "brand_new_code"})).unwrap();
        assert_eq!(future.code, ApiErrorCode::Other("brand_new_code".into()));
    }

    #[test]
    fn audit_log_reads_entries_oldest_first() {
        let log: AuditLog = serde_json::from_value(json!({"entries": [
            {"at": "2027-01-15T08:00:00Z", "action": "checkout_created", "attemptNumber": 0, "actor": "u1:buyer", "details": {}},
            {"at": "2027-01-15T08:01:00Z", "action": "retry_requested", "attemptNumber": 1, "actor": "u1:buyer", "details": {"delayMinutes": 1}},
            {"at": "2027-01-15T09:00:00Z", "action": "session_expired", "attemptNumber": null, "actor": "system"}
        ]}))
        .unwrap();

        let actions: Vec<AuditAction> = log.entries.iter().map(|e| e.action).collect();
        assert_eq!(
            actions,
            [
                AuditAction::CheckoutCreated,
                AuditAction::RetryRequested,
                AuditAction::SessionExpired
            ]
        );
        assert_eq!(log.entries[1].attempt_number, Some(AttemptNumber::new(1)));
        assert_eq!(log.entries[2].details, serde_json::Value::Null);
        assert_eq!(log.next_cursor, None);

        let page: AuditLog =
            serde_json::from_value(json!({"entries": [], "nextCursor": "v1.42"})).unwrap();
        assert_eq!(page.next_cursor.as_deref(), Some("v1.42"));
    }
}
