//! The merchant events of a change (DESIGN.md §6b): what the merchant's own systems are told
//! about a payment session, derived from the audit notes of the change, so that every entry
//! the audit log gains is considered here and no rule has to remember to announce itself.
//!
//! One audit entry gives at most one event:
//! - `payment_failed` → `payment_session.failed`; a dead-lettered retry too, because it puts
//!   the session back to `failed` (`retry_processing_failed`) and the buyer may retry again;
//! - `retry_requested` and `retry_redriven` → `payment_session.retry_scheduled`;
//! - `retry_initiated` → `payment_session.retry_ready`, with the new checkout's URL;
//! - `payment_succeeded` → `payment_session.succeeded`;
//! - `session_expired` → `payment_session.expired`;
//! - `retry_abandoned` → `payment_session.retry_abandoned`;
//! - `double_payment_detected` → `payment_session.double_payment`.
//!
//! The first checkout (`checkout_created`) is the merchant's own request, and a payment that
//! settles later (`payment_processing`) has no event type in the contract: neither is sent.

use crate::ids::{AttemptNumber, ProviderSessionId};
use crate::lifecycle::{AbandonReason, AuditDetails, Change};
use chrono::{DateTime, Utc};

/// An event's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MerchantEventType {
    Failed,
    RetryScheduled,
    RetryReady,
    Succeeded,
    Expired,
    RetryAbandoned,
    DoublePayment,
}

impl MerchantEventType {
    pub const ALL: [Self; 7] = [
        Self::Failed,
        Self::RetryScheduled,
        Self::RetryReady,
        Self::Succeeded,
        Self::Expired,
        Self::RetryAbandoned,
        Self::DoublePayment,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "payment_session.failed",
            Self::RetryScheduled => "payment_session.retry_scheduled",
            Self::RetryReady => "payment_session.retry_ready",
            Self::Succeeded => "payment_session.succeeded",
            Self::Expired => "payment_session.expired",
            Self::RetryAbandoned => "payment_session.retry_abandoned",
            Self::DoublePayment => "payment_session.double_payment",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == raw)
    }
}

/// One event and the fields of its own (the status object is added by the service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MerchantEvent {
    /// A checkout of `attempt` failed (the reason is the status object's `failureReason`).
    Failed {
        attempt: AttemptNumber,
    },
    /// Retry `attempt` is queued; its checkout is due at `scheduled_for`.
    RetryScheduled {
        attempt: AttemptNumber,
        scheduled_for: DateTime<Utc>,
    },
    /// Retry `attempt`'s checkout is live at `checkout_url`: send it to the buyer.
    RetryReady {
        attempt: AttemptNumber,
        checkout_url: String,
    },
    Succeeded {
        paid_attempt: AttemptNumber,
    },
    Expired,
    RetryAbandoned {
        attempt: Option<AttemptNumber>,
        reason: AbandonReason,
    },
    /// The checkout of `duplicate_attempt` was paid too.
    DoublePayment {
        paid_attempt: AttemptNumber,
        duplicate_attempt: AttemptNumber,
        provider_session_id: Option<ProviderSessionId>,
        /// A refund is owed and being made; otherwise support decides.
        refund_requested: bool,
    },
}

impl MerchantEvent {
    pub const fn event_type(&self) -> MerchantEventType {
        match self {
            Self::Failed { .. } => MerchantEventType::Failed,
            Self::RetryScheduled { .. } => MerchantEventType::RetryScheduled,
            Self::RetryReady { .. } => MerchantEventType::RetryReady,
            Self::Succeeded { .. } => MerchantEventType::Succeeded,
            Self::Expired => MerchantEventType::Expired,
            Self::RetryAbandoned { .. } => MerchantEventType::RetryAbandoned,
            Self::DoublePayment { .. } => MerchantEventType::DoublePayment,
        }
    }
}

/// The events `change` announces, in the order its audit entries are written.
pub fn merchant_events(change: &Change) -> Vec<MerchantEvent> {
    let state = &change.state;
    change
        .effects
        .audit
        .iter()
        .filter_map(|note| {
            let attempt = note.attempt.unwrap_or(state.current_attempt);
            Some(match &note.details {
                AuditDetails::CheckoutCreated { .. } | AuditDetails::PaymentProcessing { .. } => {
                    return None;
                }
                AuditDetails::PaymentFailed { .. } | AuditDetails::RetryDeadLettered { .. } => {
                    MerchantEvent::Failed { attempt }
                }
                AuditDetails::RetryRequested { scheduled_for, .. } => {
                    MerchantEvent::RetryScheduled {
                        attempt,
                        scheduled_for: *scheduled_for,
                    }
                }
                AuditDetails::RetryRedriven { .. } => MerchantEvent::RetryScheduled {
                    attempt,
                    scheduled_for: state.next_retry_at?,
                },
                AuditDetails::RetryInitiated { .. } => MerchantEvent::RetryReady {
                    attempt,
                    checkout_url: state.checkout_url.clone()?,
                },
                AuditDetails::PaymentSucceeded { .. } => MerchantEvent::Succeeded {
                    paid_attempt: state.paid_attempt.unwrap_or(attempt),
                },
                AuditDetails::SessionExpired { .. } => MerchantEvent::Expired,
                AuditDetails::RetryAbandoned { reason } => MerchantEvent::RetryAbandoned {
                    attempt: note.attempt,
                    reason: *reason,
                },
                AuditDetails::DoublePaymentDetected {
                    paid_attempt,
                    duplicate_attempt,
                    provider_session_id,
                    refund_requested,
                    ..
                } => MerchantEvent::DoublePayment {
                    paid_attempt: *paid_attempt,
                    duplicate_attempt: *duplicate_attempt,
                    provider_session_id: provider_session_id.clone(),
                    refund_requested: *refund_requested,
                },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Actor;
    use crate::failure::FailureReason;
    use crate::ids::PaymentSessionId;
    use crate::lifecycle::{Lifecycle, ProviderCheckout, SessionState};
    use crate::policy::RetryPolicy;
    use chrono::TimeDelta;
    use std::time::Duration;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(
            vec![Duration::from_secs(60)],
            1,
            Duration::from_secs(3600),
            vec![],
        )
        .unwrap()
    }

    fn types(change: &Change) -> Vec<&'static str> {
        merchant_events(change)
            .iter()
            .map(|e| e.event_type().as_str())
            .collect()
    }

    #[test]
    fn each_outcome_announces_its_event_and_the_first_checkout_none() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let id = PaymentSessionId::parse("ps_abc").unwrap();
        let first = ProviderCheckout {
            id: ProviderSessionId::new("cs_0"),
            url: "https://pay.example/cs_0".to_owned(),
            expires_at: now + TimeDelta::hours(1),
        };
        let opened = crate::lifecycle::open_checkout(
            &first,
            &crate::money::Money {
                amount: crate::money::Amount::new(2500).unwrap(),
                currency: crate::money::Currency::parse("usd").unwrap(),
            },
            now + TimeDelta::hours(1),
            Actor::System,
        );
        assert!(types(&opened).is_empty());
        let open = SessionState::opened(&first);
        let expires = now + TimeDelta::hours(1);
        let session = Lifecycle::new(&id, expires, &open);
        let (failed, _) = session
            .failed(
                Some(AttemptNumber::ORIGINAL),
                &FailureReason::from_code("card_declined"),
                1,
            )
            .unwrap();
        assert_eq!(types(&failed), ["payment_session.failed"]);

        let session = Lifecycle::new(&id, expires, &failed.state);
        let (scheduled, plan) = session
            .request_retry(&policy(), now, Actor::System)
            .unwrap();
        assert_eq!(
            merchant_events(&scheduled),
            [MerchantEvent::RetryScheduled {
                attempt: AttemptNumber::new(1),
                scheduled_for: plan.scheduled_for,
            }]
        );

        // The window closes with the retry still scheduled: abandoned, then expired.
        let session = Lifecycle::new(&id, expires, &scheduled.state);
        let closed = session.window_closed(expires).unwrap();
        assert_eq!(
            types(&closed),
            ["payment_session.retry_abandoned", "payment_session.expired"]
        );
    }

    #[test]
    fn type_names_round_trip() {
        for t in MerchantEventType::ALL {
            assert_eq!(MerchantEventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(MerchantEventType::parse("payment_session.unknown"), None);
    }
}
