//! Provider events applied to sessions (DESIGN.md §4).
//!
//! - A payment from ANY attempt's checkout wins: the session succeeds and a pending retry is
//!   dropped (the worker sees the session moved on and does nothing).
//! - A payment from another attempt's checkout of a session already paid is a double payment
//!   (an old checkout completing late): the first payment stands, and the second is audited
//!   (`double_payment_detected`), counted, recorded for support in the same transaction, and,
//!   with `PAYRETRY_AUTO_REFUND_DUPLICATES`, refunded after the commit (see `duplicates`).
//! - A failure counts only for the attempt whose checkout is current; an older attempt's
//!   failure is ignored. A later failure of the current attempt updates the reason.
//! - Each event id is applied once, recorded in the same transaction as its effect.
//! - An event about a checkout is matched to the attempt that created that checkout: a
//!   checkout payretry never made, or one whose `retry_attempt` metadata names another
//!   attempt, is ignored. A payment always names its checkout. So even a correctly signed
//!   event cannot invent an attempt (a success "for attempt 4294967295").

use super::{Payments, ServiceError, ServiceResult};
use crate::storage::{
    AttemptChange, AttemptStatus, DuplicatePaymentStatus, NewAuditEntry, NewDuplicatePayment,
    SessionRecord, SessionState, Transition,
};
use crate::telemetry::analytics::{AnalyticsEvent, TrackEvent};
use crate::telemetry::metrics::{self, AbandonReason};
use crate::webhook::event::{EventKind, ProviderEvent};
use chrono::{DateTime, Utc};
use payretry_domain::{
    Actor, AttemptNumber, AuditAction, FailureReason, ProviderSessionId, SessionStatus,
};
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
    /// A double payment through this attempt's checkout; `true`: a refund is owed.
    DoublePayment(AttemptNumber, bool),
}

/// The payment an event (or reconciliation) reports.
struct PaidBy<'a> {
    /// `None`: the provider did not echo the attempt; the current one is assumed.
    attempt: Option<AttemptNumber>,
    provider_session_id: Option<&'a ProviderSessionId>,
    payment_intent: Option<&'a str>,
}

impl Payments {
    /// Applies a verified provider event.
    pub async fn apply_event(&self, event: &ProviderEvent) -> ServiceResult<EventEffect> {
        let Some(event) = self.match_to_attempt(event).await? else {
            return Ok(EventEffect::Ignored);
        };
        let event = &event;
        let outcome = self
            .transition(&event.session_id, |session, now| {
                let decided = match &event.kind {
                    EventKind::Paid => decide_paid(
                        session,
                        &PaidBy {
                            attempt: event.attempt,
                            provider_session_id: event.provider_session_id.as_ref(),
                            payment_intent: event.payment_intent.as_deref(),
                        },
                        now,
                        &Actor::System,
                        self.auto_refund_duplicates,
                    ),
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
            .await;
        let outcome = match outcome {
            // Not one of our sessions (or not any more): nothing to do, and the provider
            // must get its 200 so it stops resending.
            Err(ServiceError::SessionNotFound) => return Ok(EventEffect::Ignored),
            other => other?,
        };
        let Some((_, (effect, followup))) = outcome else {
            return Ok(EventEffect::Ignored);
        };
        if let Followup::DoublePayment(attempt, true) = followup {
            // After the commit, never inside it: a provider call must not hold the database
            // transaction, and the committed `refund_requested` row is what makes a crash
            // right here safe (the periodic retry finds it).
            self.refund_owed_duplicate(&event.session_id, attempt).await;
        }
        emit(followup);
        Ok(effect)
    }

    /// The event with its attempt taken from the checkout it is about; `None` when it is
    /// about no checkout of this session that payretry created.
    async fn match_to_attempt(
        &self,
        event: &ProviderEvent,
    ) -> ServiceResult<Option<ProviderEvent>> {
        let Some(checkout) = &event.provider_session_id else {
            // Payment intent events name no checkout; they only ever count for the current
            // attempt (see `decide_failed`). A payment must name its checkout.
            return Ok((event.kind != EventKind::Paid).then(|| event.clone()));
        };
        let created_by = self
            .storage
            .checkout_attempt(&event.session_id, checkout)
            .await?;
        match created_by {
            Some(attempt) if event.attempt.is_none_or(|claimed| claimed == attempt) => {
                Ok(Some(ProviderEvent {
                    attempt: Some(attempt),
                    ..event.clone()
                }))
            }
            _ => {
                tracing::warn!(
                    session_id = %event.session_id,
                    provider_session_id = %checkout,
                    claimed_attempt = event.attempt.map(|a| a.get()),
                    "event about a checkout no attempt of this session created: ignored"
                );
                Ok(None)
            }
        }
    }

    /// Records a payment the worker found by asking the provider (reconciliation).
    pub(crate) async fn record_reconciled_payment(
        &self,
        session: &SessionRecord,
    ) -> ServiceResult<bool> {
        let attempt = Some(session.state.current_attempt);
        let outcome = self
            .transition(&session.id, |s, now| {
                let paid = PaidBy {
                    attempt,
                    provider_session_id: s.state.provider_session_id.as_ref(),
                    payment_intent: None,
                };
                Ok(
                    decide_paid(s, &paid, now, &Actor::System, false).map(|(mut t, effect, f)| {
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
    match followup {
        Followup::None => {}
        Followup::RetryFinished(attempt, failure, exhausted) => {
            metrics::retry_finished(attempt, failure.as_ref());
            if exhausted {
                metrics::retry_abandoned(AbandonReason::AttemptsExhausted);
            }
        }
        Followup::DoublePayment(attempt, _) => metrics::double_payment_detected(attempt),
    }
}

type Decision = Option<(Transition, EventEffect, Followup)>;

fn decide_paid(
    session: &SessionRecord,
    paid: &PaidBy<'_>,
    now: DateTime<Utc>,
    actor: &Actor,
    auto_refund: bool,
) -> Decision {
    let attempt = paid.attempt.unwrap_or(session.state.current_attempt);
    let state = &session.state;
    if state.status == SessionStatus::Succeeded {
        return decide_double_payment(session, attempt, paid, actor, auto_refund);
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

/// Money moved twice: the first success stands, the second is made visible to support and,
/// when asked, refunded. The refund is only decided here (`refund_requested`, in the same
/// commit as the detection); it is made after the commit.
fn decide_double_payment(
    session: &SessionRecord,
    attempt: AttemptNumber,
    paid: &PaidBy<'_>,
    actor: &Actor,
    auto_refund: bool,
) -> Decision {
    let state = &session.state;
    let paid_attempt = state.paid_attempt.unwrap_or(state.current_attempt);
    if paid_attempt == attempt {
        // The payment already recorded, reported again.
        return None;
    }
    // Without the payment intent there is nothing to refund by: support must find the charge.
    let refund = auto_refund && paid.payment_intent.is_some();
    if auto_refund && !refund {
        tracing::warn!(
            session_id = %session.id,
            duplicate_attempt = attempt.get(),
            "double payment without a payment intent: recorded, not refunded"
        );
    }
    let mut t = Transition::new(session, state.clone());
    t.audit.push(NewAuditEntry {
        action: AuditAction::DoublePaymentDetected,
        attempt: Some(attempt),
        actor: actor.to_string(),
        details: json!({
            "paidAttempt": paid_attempt.get(),
            "duplicateAttempt": attempt.get(),
            "providerSessionId": paid.provider_session_id.map(ProviderSessionId::as_str),
            "paymentIntent": paid.payment_intent,
            "refundRequested": refund,
        }),
    });
    t.duplicate_payment = Some(NewDuplicatePayment {
        paid_attempt,
        duplicate_attempt: attempt,
        provider_session_id: paid.provider_session_id.cloned(),
        payment_intent: paid.payment_intent.map(str::to_owned),
        status: if refund {
            DuplicatePaymentStatus::RefundRequested
        } else {
            DuplicatePaymentStatus::Detected
        },
    });
    Some((
        t,
        EventEffect::DuplicatePayment,
        Followup::DoublePayment(attempt, refund),
    ))
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
