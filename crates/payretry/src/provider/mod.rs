//! Payment providers: who hosts the checkout page and moves the money.
//!
//! The rest of payretry talks to a provider only through [`PaymentProvider`]; provider
//! vocabulary (Stripe's `payment_status`, `cs_…` ids) is mapped into these types at the edge.

pub mod budget;
pub mod sandbox;
pub mod signature;
pub mod stripe;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use payretry_domain::{AttemptNumber, Money, PaymentSessionId, ProviderSessionId};

/// What payretry asks the provider to create: one hosted checkout for one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckoutRequest {
    /// Preserved across every retry; only `attempt` changes.
    pub session_id: PaymentSessionId,
    pub attempt: AttemptNumber,
    pub money: Money,
    pub description: String,
    /// Where the provider sends the buyer after paying.
    pub success_url: String,
    /// Where the provider sends the buyer who gives up.
    pub cancel_url: String,
    /// When the provider should close the checkout (already clamped to its bounds).
    pub expires_at: DateTime<Utc>,
}

impl CheckoutRequest {
    /// `payretry-{sessionId}-attempt-{N}`: a redelivered queue message can never create a
    /// second checkout for one attempt.
    pub fn idempotency_key(&self) -> String {
        format!("payretry-{}-attempt-{}", self.session_id, self.attempt)
    }
}

/// A checkout the provider created (a domain value: the lifecycle records it).
pub use payretry_domain::lifecycle::ProviderCheckout;

/// What the provider says about an existing checkout (used to reconcile before retrying).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckoutState {
    /// Still payable.
    Open,
    /// The money moved.
    Paid,
    /// Completed with a payment that settles later (a bank debit), still settling: money
    /// may move.
    Processing,
    /// Completed, but its payment did not go through (a debit that failed to settle):
    /// closed unpaid.
    CompleteUnpaid,
    /// Closed without payment.
    Expired,
}

/// What payretry asks the provider to refund: the whole duplicate charge of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub session_id: PaymentSessionId,
    /// The attempt whose checkout was paid as well (the duplicate).
    pub duplicate_attempt: AttemptNumber,
    /// The duplicate charge's payment intent (`pi_…`).
    pub payment_intent: String,
}

impl RefundRequest {
    /// See [`duplicate_refund_key`].
    pub fn idempotency_key(&self) -> String {
        duplicate_refund_key(&self.session_id, self.duplicate_attempt)
    }
}

/// A refund the provider took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    /// The provider's refund id (`re_…`); `None` when the provider reports the charge as
    /// refunded already (an earlier try got through but its answer was lost).
    pub id: Option<String>,
    pub state: RefundState,
}

/// Where a refund the provider took stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundState {
    /// The money is on its way back (Stripe `succeeded`).
    Succeeded,
    /// Taken but not settled (Stripe `pending`, `requires_action`); the provider reports the
    /// outcome later by webhook. Not done.
    Pending,
    /// The refund failed or was canceled at once (Stripe `failed`, `canceled`).
    Failed {
        /// The provider's reason (Stripe's `failure_reason`), if any.
        reason: Option<String>,
    },
}

/// `payretry-{sessionId}-refund-attempt-{N}`: the refund of attempt N's duplicate charge.
/// Derived from what was recorded, never random, so a re-attempt after a crash or a lost
/// answer is the same request to the provider and cannot refund twice.
pub fn duplicate_refund_key(session_id: &PaymentSessionId, attempt: AttemptNumber) -> String {
    format!("payretry-{session_id}-refund-attempt-{attempt}")
}

/// Provider failures, split by what the caller should do about them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Timeouts, 5xx, connection errors: try again later with the same idempotency key.
    #[error("provider temporarily unavailable: {0}")]
    Transient(String),
    /// The provider's rate limit kept refusing (429): nothing was done, and nothing failed.
    /// Try again later, without counting it against the job (DESIGN.md §4).
    #[error("provider rate limit reached: {0}")]
    RateLimited(String),
    /// A request the provider will never accept (4xx other than 429).
    #[error("provider refused the request: {0}")]
    Permanent(String),
}

impl ProviderError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_) | Self::RateLimited(_))
    }
}

/// A payment provider's checkout API.
#[async_trait]
pub trait PaymentProvider: Send + Sync + 'static {
    /// Creates the hosted checkout for `request.attempt`. Idempotent per attempt: calling it
    /// twice for the same session and attempt returns the same checkout.
    async fn create_checkout(
        &self,
        request: &CheckoutRequest,
    ) -> Result<ProviderCheckout, ProviderError>;

    /// Reads a checkout's state, to learn whether a payment went through unreported.
    async fn retrieve_checkout(
        &self,
        id: &ProviderSessionId,
    ) -> Result<CheckoutState, ProviderError>;

    /// Closes a checkout so it can no longer be paid. Closing a closed one is not an error.
    async fn expire_checkout(&self, id: &ProviderSessionId) -> Result<(), ProviderError>;

    /// Refunds the whole duplicate charge of `request`. Idempotent per request (its
    /// [`RefundRequest::idempotency_key`]): repeating the call refunds once. A refund the
    /// provider settles later comes back [`RefundState::Pending`].
    async fn refund(&self, request: &RefundRequest) -> Result<Refund, ProviderError>;
}

/// How far under Stripe's 24-hour `expires_at` maximum a checkout stays. Stripe measures
/// the 24 hours from its own clock when the request arrives: the margin absorbs clock skew
/// between payretry and Stripe and the request's time in flight, so a create sent right
/// at `reference` is not refused for closing "more than 24 hours" ahead.
pub const STRIPE_EXPIRY_MARGIN: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// When a checkout should close: the window's end, within Stripe's bounds (30 minutes to
/// 24 hours after the request). A checkout for a retry late in the window gets
/// `max(window end, reference + 45 min)`; payretry closes it itself at the window's end.
/// The latest is `reference + 24 h − 5 min` ([`STRIPE_EXPIRY_MARGIN`]).
///
/// `reference` must be fixed per attempt (the job's `scheduledFor`, not the clock): a
/// redelivered job re-sends the create under the same Idempotency-Key, and Stripe refuses a
/// key reused with different parameters. The 45 minutes leave a job 15 minutes of lateness
/// before Stripe's 30-minute minimum is reached.
pub fn checkout_expires_at(window_end: DateTime<Utc>, reference: DateTime<Utc>) -> DateTime<Utc> {
    let earliest = reference + chrono::TimeDelta::minutes(45);
    let latest = reference + chrono::TimeDelta::hours(24) - STRIPE_EXPIRY_MARGIN;
    window_end.max(earliest).min(latest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    #[test]
    fn expires_at_stays_inside_stripe_bounds() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        assert_eq!(
            checkout_expires_at(now + TimeDelta::hours(3), now),
            now + TimeDelta::hours(3)
        );
        assert_eq!(
            checkout_expires_at(now + TimeDelta::minutes(5), now),
            now + TimeDelta::minutes(45)
        );
        assert_eq!(
            checkout_expires_at(now + TimeDelta::hours(30), now),
            now + TimeDelta::hours(24) - TimeDelta::minutes(5)
        );
        // The default 24 h window ends past the cap: it is capped, 5 minutes short.
        assert_eq!(
            checkout_expires_at(now + TimeDelta::hours(24), now),
            now + TimeDelta::hours(24) - TimeDelta::minutes(5)
        );
        assert_eq!(
            checkout_expires_at(now + TimeDelta::hours(24) - TimeDelta::minutes(5), now),
            now + TimeDelta::hours(24) - TimeDelta::minutes(5)
        );
        assert_eq!(
            checkout_expires_at(now + TimeDelta::hours(23), now),
            now + TimeDelta::hours(23)
        );
    }

    #[test]
    fn expires_at_is_a_function_of_the_attempt_alone() {
        let reference = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        for hours in [0, 1, 12, 23, 24, 25, 48, 720] {
            let window_end = reference + TimeDelta::hours(hours);
            let first = checkout_expires_at(window_end, reference);
            // Same window end and reference, same answer: a redelivered create repeats itself.
            assert_eq!(checkout_expires_at(window_end, reference), first);
            // Inside Stripe's bounds, with the margin below its maximum.
            assert!(first - reference >= TimeDelta::minutes(45), "{hours}h");
            assert!(
                first - reference <= TimeDelta::hours(24) - STRIPE_EXPIRY_MARGIN,
                "{hours}h"
            );
        }
    }
}
