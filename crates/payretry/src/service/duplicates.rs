//! Double payments (a session paid through two attempts' checkouts) for support, and their
//! refund when `PAYRETRY_AUTO_REFUND_DUPLICATES=true`.
//!
//! The refund is a provider call, so it is never made inside the detecting transaction, nor
//! inside the webhook request that detected it (the provider expects a fast 2xx): the refund
//! runner (`crate::refund_runner`) makes it, woken as soon as the detection commits. What
//! makes that safe:
//!
//! - The decision to refund is durable first: the detecting commit writes the record as
//!   `refund_requested`. If the process dies before the refund (or before its outcome is
//!   recorded), the row stays `refund_requested` and any process's runner finds it.
//! - Before calling the provider, a runner claims the row (a conditional update of its
//!   `refund_attempted_at`), so runners of several processes do not send the same refund at
//!   once; a row claimed less than [`REFUND_RETRY_GRACE`] ago is left alone.
//! - Every attempt for one duplicate sends the same idempotency key
//!   (`payretry-{session}-refund-attempt-{N}`) and the same parameters, so a re-attempt of a
//!   refund that did get through is answered with the first refund, never a second one.
//! - Each move is recorded by a conditional update (`refund_requested` → `refund_pending` /
//!   `refunded` / `refund_failed`, `refund_pending` → `refunded` / `refund_failed`,
//!   `refunded` → `refund_failed`), so of two settlers exactly one writes it and its audit
//!   entry.
//!
//! A transient provider failure (and Stripe's 409 for a key still in flight elsewhere) leaves
//! the row owed, retried after the grace; a permanent refusal marks it `refund_failed` for
//! support. A refund the provider takes but settles later (Stripe `pending`,
//! `requires_action`) is `refund_pending`, not done: the provider's refund event
//! ([`Payments::apply_refund_event`]) makes it `refunded` when it succeeds, or
//! `refund_failed` (with the provider's reason) when it fails or is canceled.

use super::{Payments, ServiceResult};
use crate::provider::{ProviderError, RefundRequest, RefundState};
use crate::storage::{
    DuplicatePayment, DuplicatePaymentStatus, NewAuditEntry, Page, Paged, RefundSettlement,
};
use crate::webhook::refund_event::RefundEvent;
use chrono::{DateTime, TimeDelta, Utc};
use payretry_domain::{Actor, AuditAction};
use serde_json::json;

/// How long a claimed refund call is left to the process that claimed it before another
/// runner may try again: longer than one refund call can take (Stripe's defaults: 3 tries of
/// at most 10 s plus backoff, about 31 s), so two runners seldom send the same key at once.
/// When they still do (a process stalled past the grace), Stripe answers the second with 409,
/// which is "still owed, try later". It is also the wait after a transient failure.
pub const REFUND_RETRY_GRACE: TimeDelta = TimeDelta::minutes(2);

/// Owed refunds tried per pass, so one pass stays short even after a long outage.
pub(crate) const REFUND_RETRY_BATCH: u32 = 20;

/// What one refund attempt ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundAttempt {
    /// The provider refunded the charge; recorded as `refunded`.
    Refunded,
    /// The provider took the refund and settles it later; recorded as `refund_pending`.
    Pending,
    /// The provider refused for good; recorded as `refund_failed`.
    Failed,
    /// The provider could not be reached (or the call is in flight elsewhere); still owed,
    /// retried later.
    StillOwed,
    /// Nothing owed (already settled, not a refund candidate, or claimed by another runner).
    NotOwed,
}

/// What a refund event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundEventEffect {
    Refunded,
    Pending,
    Failed,
    /// About one of our refunds, but nothing moved (a repeat, or an older state).
    Unchanged,
    /// Not about a refund payretry made.
    Ignored,
}

impl Payments {
    /// One page of the recorded double payments, oldest first.
    pub async fn duplicate_payments(&self, page: Page) -> ServiceResult<Paged<DuplicatePayment>> {
        Ok(self.storage.duplicate_payments(page).await?)
    }

    /// Makes the refunds still owed whose call was never tried or last claimed at or before
    /// `before` (the refund runner passes now minus [`REFUND_RETRY_GRACE`]). Returns how many
    /// the provider answered (refunded, pending or refused). Does nothing while automatic
    /// refunds are off: an operator who turns them off stops money moving, and the owed rows
    /// stay visible to support.
    pub async fn retry_owed_refunds(&self, before: DateTime<Utc>) -> ServiceResult<usize> {
        if !self.auto_refund_duplicates {
            return Ok(0);
        }
        let owed = self
            .storage
            .duplicate_refunds_owed(before, REFUND_RETRY_BATCH)
            .await?;
        let mut answered = 0;
        for record in &owed {
            if matches!(
                self.refund_duplicate(record, before).await?,
                RefundAttempt::Refunded | RefundAttempt::Pending | RefundAttempt::Failed
            ) {
                answered += 1;
            }
        }
        Ok(answered)
    }

    /// One refund attempt for `record` if it is owed and this process claims it (not claimed
    /// after `before`), and its outcome recorded.
    async fn refund_duplicate(
        &self,
        record: &DuplicatePayment,
        before: DateTime<Utc>,
    ) -> ServiceResult<RefundAttempt> {
        if record.status != DuplicatePaymentStatus::RefundRequested {
            return Ok(RefundAttempt::NotOwed);
        }
        let session_id = &record.session_id;
        let attempt = record.duplicate_attempt;
        crate::crash_point!("refund-before-claim");
        let claimed = self
            .storage
            .claim_duplicate_refund(session_id, attempt, before, Utc::now())
            .await?;
        if !claimed {
            return Ok(RefundAttempt::NotOwed);
        }
        let Some(payment_intent) = record.payment_intent.clone() else {
            // Not written so (a refund is requested only with a payment intent); settle it
            // rather than retry it forever.
            let failed = RefundSettlement::Failed {
                refund_id: None,
                failure_reason: None,
                error: "no payment intent to refund".to_owned(),
            };
            self.settle(record, &failed, None).await?;
            return Ok(RefundAttempt::Failed);
        };
        let request = RefundRequest {
            session_id: session_id.clone(),
            duplicate_attempt: attempt,
            payment_intent,
        };
        match self.provider.refund(&request).await {
            Ok(refund) => {
                let (settlement, outcome) = match refund.state {
                    RefundState::Succeeded => (
                        RefundSettlement::Refunded {
                            refund_id: refund.id,
                        },
                        RefundAttempt::Refunded,
                    ),
                    RefundState::Pending => match refund.id {
                        Some(refund_id) => (
                            RefundSettlement::Pending { refund_id },
                            RefundAttempt::Pending,
                        ),
                        // A pending refund always has an id; without one nothing could match
                        // its outcome, so ask again later (the same key replays the refund).
                        None => return Ok(RefundAttempt::StillOwed),
                    },
                    RefundState::Failed { reason } => (
                        RefundSettlement::Failed {
                            error: format!(
                                "the provider's refund {} failed: {}",
                                refund.id.as_deref().unwrap_or("(no id)"),
                                reason.as_deref().unwrap_or("no reason given")
                            ),
                            refund_id: refund.id,
                            failure_reason: reason,
                        },
                        RefundAttempt::Failed,
                    ),
                };
                self.settle(record, &settlement, None).await?;
                Ok(outcome)
            }
            Err(ProviderError::Transient(error) | ProviderError::RateLimited(error)) => {
                tracing::warn!(
                    %session_id,
                    duplicate_attempt = attempt.get(),
                    %error,
                    "duplicate refund not reached; will retry"
                );
                Ok(RefundAttempt::StillOwed)
            }
            Err(ProviderError::Permanent(error)) => {
                let settlement = RefundSettlement::Failed {
                    refund_id: None,
                    failure_reason: None,
                    error,
                };
                self.settle(record, &settlement, None).await?;
                Ok(RefundAttempt::Failed)
            }
        }
    }

    /// Applies a verified refund event: the refund of a duplicate payment moved at the
    /// provider. Matched to the double payment by the refund's metadata (set on create), else
    /// by its charge; a refund payretry did not make (another refund of the same charge, or of
    /// a charge payretry never saw) is ignored.
    pub async fn apply_refund_event(
        &self,
        event: &RefundEvent,
    ) -> ServiceResult<RefundEventEffect> {
        let by_metadata = match (&event.session_id, event.duplicate_attempt) {
            (Some(session_id), Some(attempt)) => {
                self.storage.duplicate_payment(session_id, attempt).await?
            }
            _ => None,
        };
        let named_by_metadata = by_metadata.is_some();
        let record = match (by_metadata, &event.payment_intent) {
            (Some(record), _) => Some(record),
            (None, Some(payment_intent)) => {
                self.storage
                    .duplicate_payment_by_intent(payment_intent)
                    .await?
            }
            (None, None) => None,
        };
        let Some(record) = record else {
            tracing::debug!(refund_id = %event.refund_id, "refund event about no double payment: ignored");
            return Ok(RefundEventEffect::Ignored);
        };
        let same_charge = match (&record.payment_intent, &event.payment_intent) {
            (Some(ours), Some(theirs)) => ours == theirs,
            _ => true,
        };
        let our_refund = match &record.refund_id {
            Some(recorded) => recorded == &event.refund_id,
            // The call's answer is not recorded yet: only our metadata proves it ours.
            None => named_by_metadata,
        };
        if !same_charge || !our_refund {
            tracing::warn!(
                session_id = %record.session_id,
                duplicate_attempt = record.duplicate_attempt.get(),
                refund_id = %event.refund_id,
                "refund event about a refund payretry did not make: ignored"
            );
            return Ok(RefundEventEffect::Ignored);
        }
        let refund_id = event.refund_id.clone();
        let (settlement, effect) = match &event.state {
            RefundState::Succeeded => (
                RefundSettlement::Refunded {
                    refund_id: Some(refund_id),
                },
                RefundEventEffect::Refunded,
            ),
            RefundState::Pending => (
                RefundSettlement::Pending { refund_id },
                RefundEventEffect::Pending,
            ),
            RefundState::Failed { reason } => (
                RefundSettlement::Failed {
                    error: format!(
                        "the provider's refund {refund_id} failed: {}",
                        reason.as_deref().unwrap_or("no reason given")
                    ),
                    refund_id: Some(refund_id),
                    failure_reason: reason.clone(),
                },
                RefundEventEffect::Failed,
            ),
        };
        let moved = self.settle(&record, &settlement, Some(&event.id)).await?;
        Ok(if moved {
            effect
        } else {
            RefundEventEffect::Unchanged
        })
    }

    /// Records `settlement` for `record` with its audit entry, if the record may still move
    /// so; returns whether it did.
    async fn settle(
        &self,
        record: &DuplicatePayment,
        settlement: &RefundSettlement,
        event_id: Option<&str>,
    ) -> ServiceResult<bool> {
        let session_id = &record.session_id;
        let attempt = record.duplicate_attempt;
        let mut details = json!({
            "duplicatePaymentId": record.id,
            "paidAttempt": record.paid_attempt.get(),
            "duplicateAttempt": attempt.get(),
            "paymentIntent": record.payment_intent,
        });
        let action = match settlement {
            RefundSettlement::Refunded { refund_id } => {
                details["refundId"] = json!(refund_id.as_ref().or(record.refund_id.as_ref()));
                AuditAction::DuplicateRefunded
            }
            RefundSettlement::Pending { refund_id } => {
                details["refundId"] = json!(refund_id);
                AuditAction::DuplicateRefundPending
            }
            RefundSettlement::Failed {
                refund_id,
                failure_reason,
                error,
            } => {
                details["refundId"] = json!(refund_id.as_ref().or(record.refund_id.as_ref()));
                details["failureReason"] = json!(failure_reason);
                details["error"] = json!(error);
                AuditAction::DuplicateRefundFailed
            }
        };
        if let Some(event_id) = event_id {
            details["eventId"] = json!(event_id);
        }
        let audit = NewAuditEntry {
            action,
            attempt: Some(attempt),
            actor: Actor::System.to_string(),
            details,
        };
        let moved = self
            .storage
            .settle_duplicate_refund(session_id, attempt, settlement, Some(&audit), event_id)
            .await?;
        if moved {
            match settlement {
                RefundSettlement::Refunded { .. } => tracing::info!(
                    %session_id,
                    duplicate_attempt = attempt.get(),
                    "duplicate payment refunded"
                ),
                RefundSettlement::Pending { refund_id } => tracing::info!(
                    %session_id,
                    duplicate_attempt = attempt.get(),
                    %refund_id,
                    "duplicate refund pending at the provider"
                ),
                RefundSettlement::Failed { error, .. } => tracing::error!(
                    %session_id,
                    duplicate_attempt = attempt.get(),
                    %error,
                    "duplicate refund failed; support must act"
                ),
            }
        }
        Ok(moved)
    }
}
