//! Turning a lifecycle [`Change`] (the domain's decision, plain data) into the storage
//! [`Transition`] that commits it, and its metrics into the telemetry facade. The only place
//! the domain's audit details, analytics events and merchant events become JSON.

use super::views::StatusView;
use crate::storage::{
    DuplicatePaymentStatus, NewAuditEntry, NewDeadLetter, NewDuplicatePayment, NewMerchantEvent,
    SessionRecord, Transition,
};
use crate::telemetry::analytics::{AnalyticsEvent, TrackEvent};
use crate::telemetry::metrics;
use chrono::{DateTime, Utc};
use payretry_domain::lifecycle::{AuditDetails, AuditNote, MetricNote, Track};
use payretry_domain::merchant_event::{MerchantEvent, merchant_events};
use payretry_domain::{Change, FailureReason, ProviderSessionId, RetryPolicy};
use serde_json::{Value, json};

/// The transition recording `change` of `session` at `now`, and the metrics to emit once it
/// is committed. With `merchant` (merchant events are on), the change's merchant events go
/// with it, their status objects computed under that policy.
pub(crate) fn transition(
    session: &SessionRecord,
    change: Change,
    now: DateTime<Utc>,
    merchant: Option<&RetryPolicy>,
) -> (Transition, Vec<MetricNote>) {
    let events = match merchant {
        Some(policy) => merchant_bodies(session, &change, policy, now),
        None => Vec::new(),
    };
    let Change { state, effects } = change;
    let mut t = Transition::new(session, state);
    t.merchant_events = events;
    t.attempt = effects.attempt;
    t.audit = effects.audit.iter().map(audit_entry).collect();
    t.analytics = effects
        .analytics
        .iter()
        .map(|track| analytics_event(session, track, now))
        .collect();
    t.enqueue = effects.enqueue;
    t.duplicate_payment = effects.duplicate.map(|d| NewDuplicatePayment {
        paid_attempt: d.paid_attempt,
        duplicate_attempt: d.duplicate_attempt,
        provider_session_id: d.provider_session_id,
        payment_intent: d.payment_intent,
        status: if d.refund_requested {
            DuplicatePaymentStatus::RefundRequested
        } else {
            DuplicatePaymentStatus::Detected
        },
    });
    t.dead_letter = effects.dead_letter.map(|d| NewDeadLetter {
        job: d.job,
        receive_count: d.receive_count,
        last_error: d.last_error,
    });
    t.redrive = effects.redrive;
    t.close_checkouts = effects.close_checkouts;
    (t, effects.metrics)
}

/// Emits the metrics of a committed change.
pub(crate) fn emit(notes: &[MetricNote]) {
    for note in notes {
        match note {
            MetricNote::RetryCheckoutCreated { attempt, reason } => {
                metrics::retry_checkout_created(*attempt, reason.as_ref());
            }
            MetricNote::RetryFinished { attempt, failure } => {
                metrics::retry_finished(*attempt, failure.as_ref());
            }
            MetricNote::RetryAbandoned(reason) => metrics::retry_abandoned(*reason),
            MetricNote::RetryDeadLettered => metrics::retry_dead_lettered(),
            MetricNote::DoublePaymentDetected { duplicate_attempt } => {
                metrics::double_payment_detected(*duplicate_attempt);
            }
        }
    }
}

/// The audit entry of a note, its details as the audit log's JSON.
pub(crate) fn audit_entry(note: &AuditNote) -> NewAuditEntry {
    NewAuditEntry {
        action: note.details.action(),
        attempt: note.attempt,
        actor: note.actor.to_string(),
        details: audit_details(&note.details),
    }
}

fn reason(reason: Option<&FailureReason>) -> Option<String> {
    reason.map(ToString::to_string)
}

fn audit_details(details: &AuditDetails) -> Value {
    match details {
        AuditDetails::CheckoutCreated {
            provider_session_id,
            money,
            expires_at,
        } => json!({
            "providerSessionId": provider_session_id.as_str(),
            "amount": money.amount.minor_units(),
            "currency": money.currency.as_str(),
            "expiresAt": expires_at,
        }),
        AuditDetails::PaymentFailed { failure_reason } => {
            json!({"failureReason": failure_reason.as_str()})
        }
        AuditDetails::RetryRequested {
            failure_reason,
            delay_seconds,
            scheduled_for,
        } => json!({
            "failureReason": reason(failure_reason.as_ref()),
            "delaySeconds": delay_seconds,
            "scheduledFor": scheduled_for,
        }),
        AuditDetails::RetryInitiated {
            provider_session_id,
            retry_reason,
            checkout_expires_at,
            receive_count,
        } => json!({
            "providerSessionId": provider_session_id.as_str(),
            "retryReason": reason(retry_reason.as_ref()),
            "checkoutExpiresAt": checkout_expires_at,
            "receiveCount": receive_count,
        }),
        AuditDetails::RetryAbandoned { reason } => json!({"reason": reason.as_str()}),
        AuditDetails::PaymentSucceeded {
            after_window,
            dropped_scheduled_retry,
        }
        | AuditDetails::PaymentProcessing {
            after_window,
            dropped_scheduled_retry,
        } => json!({
            "afterWindow": after_window,
            "droppedScheduledRetry": dropped_scheduled_retry,
        }),
        AuditDetails::RetryDeadLettered {
            last_error,
            receive_count,
        } => json!({"lastError": last_error, "receiveCount": receive_count}),
        AuditDetails::RetryRedriven {
            dead_letter_id,
            last_error,
        } => json!({"deadLetterId": dead_letter_id, "lastError": last_error}),
        AuditDetails::SessionExpired {
            expires_at,
            previous_status,
        } => json!({"expiresAt": expires_at, "previousStatus": previous_status.as_str()}),
        AuditDetails::DoublePaymentDetected {
            paid_attempt,
            duplicate_attempt,
            provider_session_id,
            payment_intent,
            refund_requested,
        } => json!({
            "paidAttempt": paid_attempt.get(),
            "duplicateAttempt": duplicate_attempt.get(),
            "providerSessionId": provider_session_id.as_ref().map(ProviderSessionId::as_str),
            "paymentIntent": payment_intent,
            "refundRequested": refund_requested,
        }),
    }
}

fn analytics_event(session: &SessionRecord, track: &Track, now: DateTime<Utc>) -> AnalyticsEvent {
    let (event, attempt, properties) = match track {
        Track::Scheduled {
            attempt,
            failure_reason,
            delay_minutes,
        } => (
            TrackEvent::Scheduled,
            attempt,
            json!({"failureReason": reason(failure_reason.as_ref()), "delayMinutes": delay_minutes}),
        ),
        Track::Initiated {
            attempt,
            failure_reason,
            delay_minutes,
        } => (
            TrackEvent::Initiated,
            attempt,
            json!({"failureReason": reason(failure_reason.as_ref()), "delayMinutes": delay_minutes}),
        ),
        Track::Completed {
            attempt,
            success,
            failure_reason,
        } => (
            TrackEvent::Completed,
            attempt,
            json!({"success": success, "failureReason": reason(failure_reason.as_ref())}),
        ),
        Track::Abandoned {
            attempt,
            reason: why,
            failure_reason,
        } => (
            TrackEvent::Abandoned,
            attempt,
            json!({"reason": why.as_str(), "failureReason": reason(failure_reason.as_ref())}),
        ),
    };
    AnalyticsEvent::track(
        event,
        &session.buyer,
        &session.id,
        *attempt,
        properties,
        now,
    )
}

/// The merchant events of `change`, numbered on from the session's last one, each with the
/// body every delivery of it sends (DESIGN.md §6b): `type`, `timestamp` and `data`, the
/// status object as the change leaves the session plus `buyer`, `sequence` and the event's
/// own fields.
fn merchant_bodies(
    session: &SessionRecord,
    change: &Change,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
) -> Vec<NewMerchantEvent> {
    let events = merchant_events(change);
    if events.is_empty() {
        return Vec::new();
    }
    let after = SessionRecord {
        state: change.state.clone(),
        ..session.clone()
    };
    let status = serde_json::to_value(StatusView::of(&after, policy, now)).unwrap_or_default();
    events
        .iter()
        .zip(session.event_sequence + 1..)
        .map(|(event, sequence)| {
            let mut data = status.clone();
            data["buyer"] = json!(session.buyer.as_str());
            data["sequence"] = json!(sequence);
            for (field, value) in own_fields(event) {
                data[field] = value;
            }
            let event_type = event.event_type();
            NewMerchantEvent {
                event_id: format!("msg_{}_{sequence}", session.id),
                event_type,
                sequence,
                body: json!({"type": event_type.as_str(), "timestamp": now, "data": data})
                    .to_string(),
            }
        })
        .collect()
}

/// The fields an event adds to the status object.
fn own_fields(event: &MerchantEvent) -> Vec<(&'static str, Value)> {
    match event {
        MerchantEvent::Failed { attempt } => vec![("attemptNumber", json!(attempt.get()))],
        MerchantEvent::RetryScheduled {
            attempt,
            scheduled_for,
        } => vec![
            ("attemptNumber", json!(attempt.get())),
            ("scheduledFor", json!(scheduled_for)),
        ],
        MerchantEvent::RetryReady {
            attempt,
            checkout_url,
        } => vec![
            ("attemptNumber", json!(attempt.get())),
            ("checkoutUrl", json!(checkout_url)),
        ],
        MerchantEvent::Succeeded { paid_attempt } => {
            vec![("paidAttempt", json!(paid_attempt.get()))]
        }
        MerchantEvent::Expired => Vec::new(),
        MerchantEvent::RetryAbandoned { attempt, reason } => vec![
            ("attemptNumber", json!(attempt.map(|a| a.get()))),
            ("reason", json!(reason.as_str())),
        ],
        MerchantEvent::DoublePayment {
            paid_attempt,
            duplicate_attempt,
            provider_session_id,
            refund_requested,
        } => vec![
            ("paidAttempt", json!(paid_attempt.get())),
            ("duplicateAttempt", json!(duplicate_attempt.get())),
            (
                "duplicateProviderSessionId",
                json!(provider_session_id.as_ref().map(ProviderSessionId::as_str)),
            ),
            (
                "refundStatus",
                json!(
                    if *refund_requested {
                        DuplicatePaymentStatus::RefundRequested
                    } else {
                        DuplicatePaymentStatus::Detected
                    }
                    .as_str()
                ),
            ),
        ],
    }
}
