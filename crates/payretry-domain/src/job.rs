//! The queue message (DESIGN.md §5), identical for every queue backend.

use crate::ids::{AttemptNumber, PaymentSessionId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// "Create the checkout for retry `attemptNumber` of this session at `scheduledFor`."
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryJob {
    pub payment_session_id: PaymentSessionId,
    pub attempt_number: AttemptNumber,
    pub delay_seconds: u64,
    /// `delaySeconds / 60`, a number (0.5 for a 30 s delay).
    #[serde(serialize_with = "minutes_as_number")]
    pub delay_minutes: f64,
    pub scheduled_for: DateTime<Utc>,
    pub enqueued_at: DateTime<Utc>,
}

impl RetryJob {
    pub fn new(
        payment_session_id: PaymentSessionId,
        attempt_number: AttemptNumber,
        delay_seconds: u64,
        scheduled_for: DateTime<Utc>,
        enqueued_at: DateTime<Utc>,
    ) -> Self {
        Self {
            payment_session_id,
            attempt_number,
            delay_seconds,
            delay_minutes: delay_seconds as f64 / 60.0,
            scheduled_for,
            enqueued_at,
        }
    }
}

/// Whole minutes are written as integers (`5`, not `5.0`), as in the contract's examples.
pub fn minutes_as_number<S: serde::Serializer>(minutes: &f64, s: S) -> Result<S::Ok, S::Error> {
    if minutes.fract() == 0.0 && *minutes >= 0.0 && *minutes < u64::MAX as f64 {
        s.serialize_u64(*minutes as u64)
    } else {
        s.serialize_f64(*minutes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_body_has_the_contract_fields() {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let job = RetryJob::new(
            PaymentSessionId::parse("ps_abc").unwrap(),
            AttemptNumber::new(2),
            300,
            at,
            at,
        );
        let body = serde_json::to_value(&job).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "paymentSessionId": "ps_abc", "attemptNumber": 2, "delaySeconds": 300,
                "delayMinutes": 5, "scheduledFor": "2027-01-15T08:00:00Z", "enqueuedAt": "2027-01-15T08:00:00Z"
            })
        );
        let back: RetryJob = serde_json::from_value(body).unwrap();
        assert_eq!(back, job);
    }

    #[test]
    fn a_job_with_an_invalid_session_id_is_refused() {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let job = RetryJob::new(
            PaymentSessionId::parse("ps_abc").unwrap(),
            AttemptNumber::new(2),
            300,
            at,
            at,
        );
        let mut body = serde_json::to_value(&job).unwrap();
        body["paymentSessionId"] = serde_json::json!("ps_a b");
        let refused = serde_json::from_value::<RetryJob>(body).unwrap_err();
        assert!(
            refused.to_string().contains("payment session id"),
            "{refused}"
        );
    }
}
