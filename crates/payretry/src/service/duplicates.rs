//! Double payments (a session paid through two attempts' checkouts) for support, and their
//! refund when `PAYRETRY_AUTO_REFUND_DUPLICATES=true`.
//!
//! The refund is a provider call, so it is made after the detecting transaction commits,
//! never inside it. What makes that safe:
//!
//! - The decision to refund is durable first: the detecting commit writes the record as
//!   `refund_requested`. If the process dies before the refund (or before its outcome is
//!   recorded), the row stays `refund_requested`.
//! - The sweeper retries such rows ([`Payments::retry_owed_refunds`]) once they are older than
//!   [`REFUND_RETRY_GRACE`], so it does not race the webhook's own attempt.
//! - Every attempt for one duplicate sends the same idempotency key
//!   (`payretry-{session}-refund-attempt-{N}`), so a re-attempt of a refund that did get
//!   through is answered with the first refund, never a second one.
//! - The outcome is recorded by a conditional update (`refund_requested` → `refunded` /
//!   `refund_failed`), so of two settlers exactly one writes it and its audit entry.
//!
//! A transient provider failure leaves the row owed (retried later); a permanent refusal
//! marks it `refund_failed` for support.

use super::{Payments, ServiceResult};
use crate::provider::{ProviderError, duplicate_refund_key};
use crate::storage::{
    DuplicatePayment, DuplicatePaymentStatus, NewAuditEntry, Page, Paged, RefundSettlement,
};
use chrono::{DateTime, TimeDelta, Utc};
use payretry_domain::{Actor, AttemptNumber, AuditAction, PaymentSessionId};
use serde_json::json;

/// How old an owed refund must be before the periodic retry takes it: longer than one refund
/// call can take (Stripe's defaults: 3 tries of at most 10 s plus backoff, about 31 s), so the
/// retry never sends the same key while the webhook's own attempt is still in flight (Stripe
/// would answer 409 to the second).
pub const REFUND_RETRY_GRACE: TimeDelta = TimeDelta::minutes(2);

/// Owed refunds retried per sweep, so one sweep stays short even after a long outage.
const REFUND_RETRY_BATCH: u32 = 20;

/// What one refund attempt ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundAttempt {
    /// The provider refunded the charge; recorded as `refunded`.
    Refunded,
    /// The provider refused for good; recorded as `refund_failed`.
    Failed,
    /// The provider could not be reached; still owed, retried later.
    StillOwed,
    /// Nothing owed (already settled, or not a refund candidate).
    NotOwed,
}

impl Payments {
    /// One page of the recorded double payments, oldest first.
    pub async fn duplicate_payments(&self, page: Page) -> ServiceResult<Paged<DuplicatePayment>> {
        Ok(self.storage.duplicate_payments(page).await?)
    }

    /// Refunds the duplicate charge of `session_id`'s `attempt` if a refund is owed. Called
    /// right after the detecting commit; failures are logged, never returned, because the
    /// detection is committed and the owed row is retried by the sweeper.
    pub(crate) async fn refund_owed_duplicate(
        &self,
        session_id: &PaymentSessionId,
        attempt: AttemptNumber,
    ) {
        let record = match self.storage.duplicate_payment(session_id, attempt).await {
            Ok(Some(record)) => record,
            Ok(None) => return,
            Err(error) => {
                tracing::error!(
                    %session_id,
                    %error,
                    "loading a double payment failed; its refund will be retried"
                );
                return;
            }
        };
        if let Err(error) = self.refund_duplicate(&record).await {
            tracing::error!(
                %session_id,
                %error,
                "recording a duplicate refund failed; it will be retried"
            );
        }
    }

    /// Retries refunds still owed that were last touched before `before` (the sweeper passes
    /// now minus [`REFUND_RETRY_GRACE`]). Returns how many were settled. Does nothing while
    /// automatic refunds are off: an operator who turns them off stops money moving, and the
    /// owed rows stay visible to support.
    pub async fn retry_owed_refunds(&self, before: DateTime<Utc>) -> ServiceResult<usize> {
        if !self.auto_refund_duplicates {
            return Ok(0);
        }
        let owed = self
            .storage
            .duplicate_refunds_owed(before, REFUND_RETRY_BATCH)
            .await?;
        let mut settled = 0;
        for record in &owed {
            if matches!(
                self.refund_duplicate(record).await?,
                RefundAttempt::Refunded | RefundAttempt::Failed
            ) {
                settled += 1;
            }
        }
        Ok(settled)
    }

    /// One refund attempt for `record`, and its outcome recorded.
    pub async fn refund_duplicate(
        &self,
        record: &DuplicatePayment,
    ) -> ServiceResult<RefundAttempt> {
        if record.status != DuplicatePaymentStatus::RefundRequested {
            return Ok(RefundAttempt::NotOwed);
        }
        let session_id = &record.session_id;
        let attempt = record.duplicate_attempt;
        let Some(payment_intent) = record.payment_intent.as_deref() else {
            // Not written so (a refund is requested only with a payment intent); settle it
            // rather than retry it forever.
            let failed = RefundSettlement::Failed {
                error: "no payment intent to refund".to_owned(),
            };
            self.storage
                .settle_duplicate_refund(session_id, attempt, &failed, None)
                .await?;
            return Ok(RefundAttempt::Failed);
        };
        let key = duplicate_refund_key(session_id, attempt);
        match self.provider.refund(payment_intent, &key).await {
            Ok(refund) => {
                let audit = NewAuditEntry {
                    action: AuditAction::DuplicateRefunded,
                    attempt: Some(attempt),
                    actor: Actor::System.to_string(),
                    details: json!({
                        "duplicatePaymentId": record.id,
                        "paidAttempt": record.paid_attempt.get(),
                        "duplicateAttempt": attempt.get(),
                        "paymentIntent": payment_intent,
                        "refundId": refund.id,
                    }),
                };
                let settlement = RefundSettlement::Refunded {
                    refund_id: refund.id,
                };
                let recorded = self
                    .storage
                    .settle_duplicate_refund(session_id, attempt, &settlement, Some(&audit))
                    .await?;
                if recorded {
                    tracing::info!(
                        %session_id,
                        duplicate_attempt = attempt.get(),
                        "duplicate payment refunded"
                    );
                }
                Ok(RefundAttempt::Refunded)
            }
            Err(ProviderError::Transient(error)) => {
                tracing::warn!(
                    %session_id,
                    duplicate_attempt = attempt.get(),
                    %error,
                    "duplicate refund not reached; will retry"
                );
                Ok(RefundAttempt::StillOwed)
            }
            Err(ProviderError::Permanent(error)) => {
                tracing::error!(
                    %session_id,
                    duplicate_attempt = attempt.get(),
                    %error,
                    "duplicate refund refused; support must act"
                );
                let settlement = RefundSettlement::Failed { error };
                self.storage
                    .settle_duplicate_refund(session_id, attempt, &settlement, None)
                    .await?;
                Ok(RefundAttempt::Failed)
            }
        }
    }
}
