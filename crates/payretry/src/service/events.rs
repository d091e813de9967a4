//! Provider events applied to sessions (DESIGN.md §4).
//!
//! - A payment from ANY attempt's checkout wins: the session succeeds and a pending retry is
//!   dropped (the worker sees the session moved on and does nothing).
//! - A failure counts only for the attempt whose checkout is current; an older attempt's
//!   failure is ignored. A later failure of the current attempt updates the reason.
//! - Each event id is applied once, recorded in the same transaction as its effect.

use super::{Payments, ServiceResult};
use crate::storage::{
    AttemptChange, AttemptStatus, NewAuditEntry, SessionRecord, SessionState, Transition,
};
use crate::telemetry::analytics::{AnalyticsEvent, TrackEvent};
use crate::telemetry::metrics::{self, AbandonReason};
use crate::webhook::event::{EventKind, ProviderEvent};
use chrono::{DateTime, Utc};
use payretry_domain::{Actor, AttemptNumber, AuditAction, FailureReason, SessionStatus};
use serde_json::json;

/// What an event did, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventEffect {
    Succeeded,
    Failed,
    /// A later decline of an already failed attempt: only the reason changed.
    ReasonUpdated,
    /// A second payment on a session already paid by another attempt's checkout.
    DuplicatePayment,
    Expired,
    /// Nothing to do: an older attempt, an unknown session, a repeated event.
    Ignored,
}

/// Metrics to emit once a transition is committed (never for a lost race).
enum Followup {
    None,
    RetryFinished(AttemptNumber, Option<FailureReason>, bool),
}

impl Payments {
    /// Applies a verified provider event.
    pub async fn apply_event(&self, event: &ProviderEvent) -> ServiceResult<EventEffect> {
        if self.storage.session(&event.session_id).await?.is_none() {
            return Ok(EventEffect::Ignored);
        }
        let outcome = self
            .transition(&event.session_id, |session, now| {
                let decided = match &event.kind {
                    EventKind::Paid => decide_paid(session, event.attempt, now, &Actor::System),
                    EventKind::Failed(reason) => decide_failed(
                        session,
                        event.attempt,
                        reason,
                        self.policy.max_attempts,
                        now,
                    ),
                    EventKind::CheckoutExpired => {
                        decide_checkout_expired(session, event.attempt, now)
                    }
                };
                Ok(decided.map(|(mut t, effect, followup)| {
                    t.webhook_event_id = Some(event.id.clone());
                    for entry in &mut t.audit {
                        entry.details["eventId"] = json!(event.id);
                    }
                    (t, (effect, followup))
                }))
            })
            .await?;
        let Some((_, (effect, followup))) = outcome else {
            return Ok(EventEffect::Ignored);
        };
        emit(followup);
        Ok(effect)
    }

    /// Records a payment the worker found by asking the provider (reconciliation).
    pub(crate) async fn record_reconciled_payment(
        &self,
        session: &SessionRecord,
    ) -> ServiceResult<bool> {
        let attempt = Some(session.state.current_attempt);
        let outcome = self
            .transition(&session.id, |s, now| {
                Ok(
                    decide_paid(s, attempt, now, &Actor::System).map(|(mut t, effect, f)| {
                        for entry in &mut t.audit {
                            entry.details["reconciled"] = json!(true);
                        }
                        (t, (effect, f))
                    }),
                )
            })
            .await?;
        Ok(match outcome {
            Some((_, (_, followup))) => {
                emit(followup);
                true
            }
            None => false,
        })
    }
}

fn emit(followup: Followup) {
    if let Followup::RetryFinished(attempt, failure, exhausted) = followup {
        metrics::retry_finished(attempt, failure.as_ref());
        if exhausted {
            metrics::retry_abandoned(AbandonReason::AttemptsExhausted);
        }
    }
}

type Decision = Option<(Transition, EventEffect, Followup)>;

fn decide_paid(
    session: &SessionRecord,
    attempt: Option<AttemptNumber>,
    now: DateTime<Utc>,
    actor: &Actor,
) -> Decision {
    let attempt = attempt.unwrap_or(session.state.current_attempt);
    let state = &session.state;
    if state.status == SessionStatus::Succeeded {
        if state.paid_attempt == Some(attempt) {
            return None;
        }
        // Money moved twice: keep the first success, make the second visible to support.
        let mut t = Transition::new(session, state.clone());
        t.audit.push(NewAuditEntry {
            action: AuditAction::PaymentSucceeded,
            attempt: Some(attempt),
            actor: actor.to_string(),
            details: json!({"duplicatePayment": true, "paidAttempt": state.paid_attempt.map(AttemptNumber::get)}),
        });
        return Some((t, EventEffect::DuplicatePayment, Followup::None));
    }
    let after_window = now >= session.expires_at;
    let new_state = SessionState {
        status: SessionStatus::Succeeded,
        next_retry_at: None,
        paid_attempt: Some(attempt),
        ..state.clone()
    };
    let mut t = Transition::new(session, new_state);
    t.attempt = Some(AttemptChange {
        attempt,
        status: AttemptStatus::Succeeded,
        provider_session_id: None,
        failure_reason: None,
        scheduled_for: None,
    });
    t.audit.push(NewAuditEntry {
        action: AuditAction::PaymentSucceeded,
        attempt: Some(attempt),
        actor: actor.to_string(),
        details: json!({
            "afterWindow": after_window,
            "droppedScheduledRetry": (state.status == SessionStatus::RetryScheduled)
                .then_some(state.retry_attempts),
        }),
    });
    let followup = if attempt.is_retry() {
        t.analytics.push(AnalyticsEvent::track(
            TrackEvent::Completed,
            &session.buyer,
            &session.id,
            attempt,
            json!({"success": true, "failureReason": state.retry_reason.as_ref().map(ToString::to_string)}),
            now,
        ));
        Followup::RetryFinished(attempt, None, false)
    } else {
        Followup::None
    };
    Some((t, EventEffect::Succeeded, followup))
}

fn decide_failed(
    session: &SessionRecord,
    attempt: Option<AttemptNumber>,
    reason: &FailureReason,
    max_attempts: u32,
    now: DateTime<Utc>,
) -> Decision {
    let state = &session.state;
    let attempt = attempt?;
    if attempt != state.current_attempt {
        return None;
    }
    let entry = NewAuditEntry {
        action: AuditAction::PaymentFailed,
        attempt: Some(attempt),
        actor: Actor::System.to_string(),
        details: json!({"failureReason": reason.as_str()}),
    };
    match state.status {
        SessionStatus::Open => {
            let new_state = SessionState {
                status: SessionStatus::Failed,
                failure_reason: Some(reason.clone()),
                ..state.clone()
            };
            let mut t = Transition::new(session, new_state);
            t.attempt = Some(AttemptChange {
                attempt,
                status: AttemptStatus::Failed,
                provider_session_id: None,
                failure_reason: Some(reason.clone()),
                scheduled_for: None,
            });
            t.audit.push(entry);
            let exhausted = attempt.is_retry() && state.retry_attempts >= max_attempts;
            if exhausted {
                t.audit.push(NewAuditEntry {
                    action: AuditAction::RetryAbandoned,
                    attempt: Some(attempt),
                    actor: Actor::System.to_string(),
                    details: json!({"reason": AbandonReason::AttemptsExhausted.as_str()}),
                });
            }
            if attempt.is_retry() {
                let track = |event, properties| {
                    AnalyticsEvent::track(
                        event,
                        &session.buyer,
                        &session.id,
                        attempt,
                        properties,
                        now,
                    )
                };
                t.analytics.push(track(
                    TrackEvent::Completed,
                    json!({"success": false, "failureReason": reason.as_str()}),
                ));
                if exhausted {
                    t.analytics.push(track(
                        TrackEvent::Abandoned,
                        json!({"reason": AbandonReason::AttemptsExhausted.as_str(), "failureReason": reason.as_str()}),
                    ));
                }
            }
            let followup = if attempt.is_retry() {
                Followup::RetryFinished(attempt, Some(reason.clone()), exhausted)
            } else {
                Followup::None
            };
            Some((t, EventEffect::Failed, followup))
        }
        SessionStatus::Failed => {
            // The latest decline stands.
            let new_state = SessionState {
                failure_reason: Some(reason.clone()),
                ..state.clone()
            };
            let mut t = Transition::new(session, new_state);
            t.audit.push(entry);
            Some((t, EventEffect::ReasonUpdated, Followup::None))
        }
        _ => None,
    }
}

fn decide_checkout_expired(
    session: &SessionRecord,
    attempt: Option<AttemptNumber>,
    now: DateTime<Utc>,
) -> Decision {
    let state = &session.state;
    if attempt != Some(state.current_attempt) || state.status != SessionStatus::Open {
        return None;
    }
    if now >= session.expires_at {
        // The window closed: the sweeper expires the session with its own audit entries.
        return None;
    }
    let reason = FailureReason::from_code(FailureReason::CHECKOUT_EXPIRED);
    let new_state = SessionState {
        status: SessionStatus::Failed,
        failure_reason: Some(reason.clone()),
        ..state.clone()
    };
    let mut t = Transition::new(session, new_state);
    t.attempt = Some(AttemptChange {
        attempt: state.current_attempt,
        status: AttemptStatus::Failed,
        provider_session_id: None,
        failure_reason: Some(reason.clone()),
        scheduled_for: None,
    });
    t.audit.push(NewAuditEntry {
        action: AuditAction::PaymentFailed,
        attempt: Some(state.current_attempt),
        actor: Actor::System.to_string(),
        details: json!({"failureReason": reason.as_str()}),
    });
    Some((t, EventEffect::Expired, Followup::None))
}
