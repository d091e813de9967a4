//! Scheduling a buyer's retry (DESIGN.md §1–§2): eligibility, then one transaction that
//! spends the attempt, records why, queues the job and stores the idempotent response.
//! The commit is a compare-and-set on the session version, so of many concurrent requests
//! exactly one wins; the losers re-read and get the refusal the new state implies.

use super::views::RetryAcceptedView;
use super::{Payments, ServiceError, ServiceResult, completion, json_response, record};
use crate::storage::{IdempotencyScope, SessionRecord, StoredResponse};
use payretry_domain::{PaymentSessionId, Principal};

impl Payments {
    /// Schedules the next retry of a failed session; returns the 202 response, already
    /// stored under the caller's idempotency key. `read` is the session as the caller read
    /// it (`None`: not read, or not found; it is read here, and a missing one is
    /// [`ServiceError::SessionNotFound`]).
    pub async fn schedule_retry(
        &self,
        id: &PaymentSessionId,
        read: Option<SessionRecord>,
        caller: &Principal,
        idempotency: &IdempotencyScope,
    ) -> ServiceResult<StoredResponse> {
        let outcome = self
            .transition_on(id, read, |session, now| {
                if !caller.can_see(&session.buyer) {
                    return Err(ServiceError::SessionNotFound);
                }
                let (change, plan) =
                    session
                        .lifecycle()
                        .request_retry(&self.policy, now, caller.actor())?;
                let response = json_response(202, &RetryAcceptedView::of(session, &plan));
                let (mut t, _) = record::transition(session, change, now);
                t.idempotency = completion(Some(idempotency), &response);
                Ok(Some((t, response)))
            })
            .await?;
        let (_, response) = outcome.ok_or(ServiceError::Contended)?;
        Ok(response)
    }
}
