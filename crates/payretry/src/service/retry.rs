//! Scheduling a buyer's retry (DESIGN.md §1–§2): eligibility, then one transaction that
//! spends the attempt, records why, queues the job and stores the idempotent response.
//! The commit is a compare-and-set on the session version, so of many concurrent requests
//! exactly one wins; the losers re-read and get the refusal the new state implies.

use super::views::RetryAcceptedView;
use super::{Payments, ServiceError, ServiceResult, completion, json_response};
use crate::storage::{
    AttemptChange, AttemptStatus, IdempotencyScope, NewAuditEntry, SessionState, StoredResponse,
    Transition,
};
use crate::telemetry::analytics::{AnalyticsEvent, TrackEvent};
use payretry_domain::{
    AuditAction, PaymentSessionId, Principal, RetryJob, SessionStatus, check_retry,
};
use serde_json::json;

impl Payments {
    /// Schedules the next retry of a failed session; returns the 202 response, already
    /// stored under the caller's idempotency key.
    pub async fn schedule_retry(
        &self,
        id: &PaymentSessionId,
        caller: &Principal,
        idempotency: &IdempotencyScope,
    ) -> ServiceResult<StoredResponse> {
        let outcome = self
            .transition(id, |session, now| {
                if !caller.can_see(&session.buyer) {
                    return Err(ServiceError::SessionNotFound);
                }
                let plan = check_retry(&session.snapshot(), &self.policy, now)?;
                let response = json_response(202, &RetryAcceptedView::of(session, &plan));
                let reason = session.state.failure_reason.clone();
                let state = SessionState {
                    status: SessionStatus::RetryScheduled,
                    retry_attempts: plan.attempt.get(),
                    last_retry_at: Some(now),
                    retry_reason: reason.clone(),
                    next_retry_at: Some(plan.scheduled_for),
                    ..session.state.clone()
                };
                let mut t = Transition::new(session, state);
                t.attempt = Some(AttemptChange {
                    attempt: plan.attempt,
                    status: AttemptStatus::Scheduled,
                    provider_session_id: None,
                    failure_reason: None,
                    scheduled_for: Some(plan.scheduled_for),
                });
                t.audit.push(NewAuditEntry {
                    action: AuditAction::RetryRequested,
                    attempt: Some(plan.attempt),
                    actor: caller.actor().to_string(),
                    details: json!({
                        "failureReason": reason.as_ref().map(ToString::to_string),
                        "delaySeconds": plan.delay.as_secs(),
                        "scheduledFor": plan.scheduled_for,
                    }),
                });
                t.enqueue = Some(RetryJob::new(
                    session.id.clone(),
                    plan.attempt,
                    plan.delay.as_secs(),
                    plan.scheduled_for,
                    now,
                ));
                t.idempotency = completion(Some(idempotency), &response);
                t.analytics.push(AnalyticsEvent::track(
                    TrackEvent::Scheduled,
                    &session.buyer,
                    &session.id,
                    plan.attempt,
                    json!({
                        "failureReason": reason.as_ref().map(ToString::to_string),
                        "delayMinutes": plan.delay.as_secs_f64() / 60.0,
                    }),
                    now,
                ));
                Ok(Some((t, response)))
            })
            .await?;
        let (_, response) = outcome.ok_or(ServiceError::Contended)?;
        Ok(response)
    }
}
