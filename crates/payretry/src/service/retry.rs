//! Scheduling a buyer's retry (DESIGN.md §1–§2): eligibility, then one transaction that
//! spends the attempt, records why, queues the job and stores the idempotent response.
//! The commit is a compare-and-set on the session version, so of many concurrent requests
//! exactly one wins; the losers re-read and get the refusal the new state implies.

use super::views::RetryAcceptedView;
use super::{Payments, ServiceError, ServiceResult, completion, json_response, record};
use crate::storage::{IdempotencyScope, SessionRecord, StoredResponse, Transition};
use chrono::{DateTime, Utc};
use payretry_domain::{PaymentSessionId, Principal, RetryPolicy};

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
                retry_transition(
                    &self.policy,
                    self.merchant_events,
                    session,
                    caller,
                    idempotency,
                    now,
                )
                .map(Some)
            })
            .await?;
        let (_, response) = outcome.ok_or(ServiceError::Contended)?;
        Ok(response)
    }
}

/// What `caller`'s retry of `session` at `now` commits, and the 202 response stored with it
/// under `idempotency` (with its merchant events when `merchant_events`). Public so that `payretry-bench` can run exactly these writes through
/// `pgbench` (its S2p ceiling).
pub fn retry_transition(
    policy: &RetryPolicy,
    merchant_events: bool,
    session: &SessionRecord,
    caller: &Principal,
    idempotency: &IdempotencyScope,
    now: DateTime<Utc>,
) -> ServiceResult<(Transition, StoredResponse)> {
    if !caller.can_see(&session.buyer) {
        return Err(ServiceError::SessionNotFound);
    }
    let (change, plan) = session
        .lifecycle()
        .request_retry(policy, now, caller.actor())?;
    let response = json_response(202, &RetryAcceptedView::of(session, &plan));
    let (mut t, _) = record::transition(session, change, now, merchant_events.then_some(policy));
    t.idempotency = completion(Some(idempotency), &response);
    Ok((t, response))
}
