//! Provider events applied to sessions (DESIGN.md §4).
//!
//! - A payment from ANY attempt's checkout wins: the session succeeds and a pending retry is
//!   dropped (the worker sees the session moved on and does nothing).
//! - A payment from another attempt's checkout of a session already paid is a double payment
//!   (an old checkout completing late): the first payment stands, and the second is audited
//!   (`double_payment_detected`), counted, recorded for support in the same transaction, and,
//!   with `PAYRETRY_AUTO_REFUND_DUPLICATES`, recorded as a refund owed: the refund runner makes
//!   the provider call after the commit, outside this request (see `duplicates`).
//! - A failure counts only for the attempt whose checkout is current; an older attempt's
//!   failure is ignored. A later failure of the current attempt updates the reason.
//! - A checkout completed with a payment that settles later makes the session `processing`
//!   until `async_payment_succeeded` (paid) or `async_payment_failed` (failed, or expired
//!   after the window); no retry is offered meanwhile, so a bank debit and a card retry can
//!   never both charge.
//! - Each event id is applied once, recorded in the same transaction as its effect.
//! - An event about a checkout is matched to the attempt that created that checkout: a
//!   checkout payretry never made, or one whose `retry_attempt` metadata names another
//!   attempt, is ignored. A payment always names its checkout. So even a correctly signed
//!   event cannot invent an attempt (a success "for attempt 4294967295").

use super::{Payments, ServiceError, ServiceResult, record};
use crate::provider::CheckoutState;
use crate::storage::SessionRecord;
use crate::webhook::event::{EventKind, ProviderEvent};
use payretry_domain::Change;
use payretry_domain::FailureReason;
use payretry_domain::lifecycle::Payment;
use serde_json::json;

/// What an event did, for logs and tests.
pub use payretry_domain::lifecycle::EventEffect;

impl Payments {
    /// Applies a verified provider event.
    pub async fn apply_event(&self, event: &ProviderEvent) -> ServiceResult<EventEffect> {
        let Some(event) = self.match_to_attempt(event).await? else {
            return Ok(EventEffect::Ignored);
        };
        let event = &event;
        let outcome = self
            .transition(&event.session_id, |session, now| {
                let lifecycle = session.lifecycle();
                let decided = match &event.kind {
                    EventKind::Paid => lifecycle.paid(
                        &Payment {
                            attempt: event.attempt,
                            provider_session_id: event.provider_session_id.as_ref(),
                            payment_intent: event.payment_intent.as_deref(),
                        },
                        now,
                        self.auto_refund_duplicates,
                    ),
                    EventKind::Processing => lifecycle.processing(event.attempt, now),
                    EventKind::AsyncPaymentFailed => lifecycle.async_payment_failed(
                        event.attempt,
                        &FailureReason::from_code(FailureReason::ASYNC_PAYMENT_FAILED),
                        self.policy.max_attempts,
                        now,
                    ),
                    EventKind::Failed(reason) => {
                        lifecycle.failed(event.attempt, reason, self.policy.max_attempts)
                    }
                    EventKind::CheckoutExpired => lifecycle.checkout_expired(event.attempt, now),
                };
                Ok(decided.map(|(change, effect)| {
                    warn_if_unrefundable(session, &change, self.auto_refund_duplicates);
                    let (mut t, metrics) = self.record(session, change, now);
                    t.webhook_event_id = Some(event.id.clone());
                    for entry in &mut t.audit {
                        entry.details["eventId"] = json!(event.id);
                    }
                    (t, (effect, metrics))
                }))
            })
            .await;
        let outcome = match outcome {
            // Not one of our sessions (or not any more): nothing to do, and the provider
            // must get its 200 so it stops resending.
            Err(ServiceError::SessionNotFound) => return Ok(EventEffect::Ignored),
            other => other?,
        };
        // A refund owed is made by the refund runner (woken by this commit), never here: the
        // provider must get its 2xx fast, whatever the refund call does.
        let Some((_, (effect, metrics))) = outcome else {
            return Ok(EventEffect::Ignored);
        };
        record::emit(&metrics);
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

    /// Records what the worker found by asking the provider about the current checkout
    /// (reconciliation): `Paid` as a success, `Processing` as a payment processing.
    /// Returns whether it changed the session.
    pub(crate) async fn record_reconciled_checkout(
        &self,
        session: &SessionRecord,
        found: CheckoutState,
    ) -> ServiceResult<bool> {
        let attempt = Some(session.state.current_attempt);
        let outcome = self
            .transition(&session.id, |s, now| {
                let lifecycle = s.lifecycle();
                let decided = match found {
                    CheckoutState::Paid => lifecycle.paid(
                        &Payment {
                            attempt,
                            provider_session_id: s.state.provider_session_id.as_ref(),
                            payment_intent: None,
                        },
                        now,
                        false,
                    ),
                    CheckoutState::Processing => lifecycle.processing(attempt, now),
                    CheckoutState::Open
                    | CheckoutState::Expired
                    | CheckoutState::CompleteUnpaid => None,
                };
                Ok(decided.map(|(change, _)| {
                    let (mut t, metrics) = self.record(s, change, now);
                    for entry in &mut t.audit {
                        entry.details["reconciled"] = json!(true);
                    }
                    (t, metrics)
                }))
            })
            .await?;
        Ok(match outcome {
            Some((_, metrics)) => {
                record::emit(&metrics);
                true
            }
            None => false,
        })
    }
}

/// A double payment that should be refunded but names no charge is only recorded, for
/// support to find the charge.
fn warn_if_unrefundable(session: &SessionRecord, change: &Change, auto_refund: bool) {
    if let Some(duplicate) = change.effects.duplicate.as_ref()
        && auto_refund
        && !duplicate.refund_requested
    {
        tracing::warn!(
            session_id = %session.id,
            duplicate_attempt = duplicate.duplicate_attempt.get(),
            "double payment without a payment intent: recorded, not refunded"
        );
    }
}
