//! Dead letters: retry jobs that kept failing (DESIGN.md §2). Redrive puts the session back
//! into `retry_scheduled` for the same attempt and queues the job again, in one commit that
//! also removes the dead letter.

use super::{Payments, ServiceError, ServiceResult};
use crate::storage::{
    AttemptChange, AttemptStatus, DeadLetter, NewAuditEntry, Page, Paged, SessionState, Transition,
};
use payretry_domain::{
    AuditAction, PaymentSessionId, Principal, RetryJob, RetryRefusal, SessionStatus,
    eligibility::effective_status,
};
use serde_json::json;

impl Payments {
    /// One page of the dead letters, oldest first.
    pub async fn dead_letters(&self, page: Page) -> ServiceResult<Paged<DeadLetter>> {
        Ok(self.storage.dead_letters(page).await?)
    }

    /// Re-enqueues a dead-lettered job for immediate processing.
    pub async fn redrive(&self, id: &str, admin: &Principal) -> ServiceResult<DeadLetter> {
        let dead = self
            .storage
            .dead_letter(id)
            .await?
            .ok_or(ServiceError::DeadLetterNotFound)?;
        let session_id: PaymentSessionId = dead.job.payment_session_id.clone();
        let attempt = dead.job.attempt_number;
        self.transition(&session_id, |session, now| {
            match effective_status(&session.snapshot(), now) {
                SessionStatus::Succeeded => {
                    return Err(RetryRefusal::PaymentAlreadySucceeded.into());
                }
                SessionStatus::Expired => return Err(RetryRefusal::WindowExpired.into()),
                _ => {}
            }
            let state = &session.state;
            if state.status != SessionStatus::Failed || state.retry_attempts != attempt.get() {
                return Err(RetryRefusal::RetryAlreadyScheduled.into());
            }
            let mut t = Transition::new(
                session,
                SessionState {
                    status: SessionStatus::RetryScheduled,
                    next_retry_at: Some(now),
                    failure_reason: state.retry_reason.clone(),
                    ..state.clone()
                },
            );
            t.attempt = Some(AttemptChange {
                attempt,
                status: AttemptStatus::Scheduled,
                provider_session_id: None,
                failure_reason: None,
                scheduled_for: Some(now),
            });
            t.audit.push(NewAuditEntry {
                action: AuditAction::RetryRedriven,
                attempt: Some(attempt),
                actor: admin.actor().to_string(),
                details: json!({"deadLetterId": dead.id, "lastError": dead.last_error}),
            });
            t.enqueue = Some(RetryJob::new(session.id.clone(), attempt, 0, now, now));
            t.redrive = Some(dead.id.clone());
            Ok(Some((t, ())))
        })
        .await?
        .ok_or(ServiceError::Contended)?;
        Ok(dead)
    }
}
