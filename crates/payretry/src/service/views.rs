//! The status object and the retry object of DESIGN.md §3, computed from a session.

use crate::storage::SessionRecord;
use chrono::{DateTime, Utc};
use payretry_domain::eligibility::{effective_status, retry_unavailable_reason};
use payretry_domain::{RetryPlan, RetryPolicy, RetryUnavailableReason, SessionStatus};
use serde::Serialize;
use utoipa::ToSchema;

/// A session as the buyer and support see it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    #[schema(example = "ps_4f1c2a9b0d8e7f6a5b4c3d2e1f0a9b8c")]
    pub session_id: String,
    /// `open`, `failed`, `retry_scheduled`, `processing` (a payment that settles later, such
    /// as a bank debit, is in progress: no retry until its outcome), `succeeded` or `expired`.
    #[schema(value_type = String, example = "failed")]
    pub status: SessionStatus,
    /// Minor units.
    pub amount: i64,
    pub currency: String,
    pub failure_reason: Option<String>,
    pub retry_attempts: u32,
    pub max_retry_attempts: u32,
    pub retry_attempts_remaining: u32,
    pub retry_available: bool,
    /// `limit_reached`, `window_expired`, `payment_succeeded`, `payment_processing`,
    /// `retry_scheduled`, `payment_not_failed` or `failure_not_retryable`.
    #[schema(value_type = Option<String>, example = "limit_reached")]
    pub retry_unavailable_reason: Option<RetryUnavailableReason>,
    pub next_retry_at: Option<DateTime<Utc>>,
    pub last_retry_at: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
    pub checkout_url: Option<String>,
    pub provider_session_id: Option<String>,
}

impl StatusView {
    pub fn of(session: &SessionRecord, policy: &RetryPolicy, now: DateTime<Utc>) -> Self {
        let snapshot = session.snapshot();
        let status = effective_status(&snapshot, now);
        let unavailable = retry_unavailable_reason(&snapshot, policy, now);
        let state = &session.state;
        Self {
            session_id: session.id.to_string(),
            status,
            amount: session.money.amount.minor_units(),
            currency: session.money.currency.to_string(),
            failure_reason: state.failure_reason.as_ref().map(ToString::to_string),
            retry_attempts: state.retry_attempts,
            max_retry_attempts: policy.max_attempts,
            retry_attempts_remaining: policy.max_attempts.saturating_sub(state.retry_attempts),
            retry_available: unavailable.is_none(),
            retry_unavailable_reason: unavailable,
            next_retry_at: state
                .next_retry_at
                .filter(|_| status == SessionStatus::RetryScheduled),
            last_retry_at: state.last_retry_at,
            expires_at: session.expires_at,
            // An expired session has no payable checkout.
            checkout_url: state
                .checkout_url
                .clone()
                .filter(|_| status != SessionStatus::Expired),
            provider_session_id: state.provider_session_id.as_ref().map(ToString::to_string),
        }
    }
}

/// The answer to an accepted retry (202).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryAcceptedView {
    pub session_id: String,
    pub attempt_number: u32,
    pub delay_seconds: u64,
    /// `delaySeconds / 60`.
    #[serde(serialize_with = "payretry_domain::job::minutes_as_number")]
    pub delay_minutes: f64,
    pub scheduled_for: DateTime<Utc>,
    pub retry_attempts_remaining: u32,
}

impl RetryAcceptedView {
    pub fn of(session: &SessionRecord, plan: &RetryPlan) -> Self {
        let delay_seconds = plan.delay.as_secs();
        Self {
            session_id: session.id.to_string(),
            attempt_number: plan.attempt.get(),
            delay_seconds,
            delay_minutes: delay_seconds as f64 / 60.0,
            scheduled_for: plan.scheduled_for,
            retry_attempts_remaining: plan.remaining_after,
        }
    }
}
