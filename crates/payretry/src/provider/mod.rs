//! Payment providers: who hosts the checkout page and moves the money.
//!
//! The rest of payretry talks to a provider only through [`PaymentProvider`]; provider
//! vocabulary (Stripe's `payment_status`, `cs_…` ids) is mapped into these types at the edge.

pub mod sandbox;
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

/// A checkout the provider created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderCheckout {
    pub id: ProviderSessionId,
    /// The hosted page the buyer pays on.
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

/// What the provider says about an existing checkout (used to reconcile before retrying).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckoutState {
    /// Still payable.
    Open,
    /// The money moved.
    Paid,
    /// Completed, but the payment has not (yet) cleared.
    CompleteUnpaid,
    /// Closed without payment.
    Expired,
}

/// Provider failures, split by what the caller should do about them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Timeouts, 429, 5xx, connection errors: try again later with the same idempotency key.
    #[error("provider temporarily unavailable: {0}")]
    Transient(String),
    /// A request the provider will never accept (4xx other than 429).
    #[error("provider refused the request: {0}")]
    Permanent(String),
}

impl ProviderError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
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
}

/// Stripe accepts `expires_at` from 30 minutes to 24 hours ahead. A checkout for a retry late
/// in the window gets `max(window end, now + 31 min)`; payretry closes it itself at the
/// window's end.
pub fn checkout_expires_at(window_end: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
    let earliest = now + chrono::TimeDelta::minutes(31);
    let latest = now + chrono::TimeDelta::hours(24) - chrono::TimeDelta::minutes(1);
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
            now + TimeDelta::minutes(31)
        );
        assert_eq!(
            checkout_expires_at(now + TimeDelta::hours(30), now),
            now + TimeDelta::hours(24) - TimeDelta::minutes(1)
        );
    }
}
