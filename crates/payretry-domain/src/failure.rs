//! Failure reasons: the provider's decline code (e.g. `insufficient_funds`) or one of
//! payretry's own reasons. The set is open because card networks add codes.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FailureReason(String);

impl FailureReason {
    /// The provider kept failing while recreating the checkout; the job was dead-lettered.
    pub const RETRY_PROCESSING_FAILED: &'static str = "retry_processing_failed";
    /// The checkout expired before the buyer paid.
    pub const CHECKOUT_EXPIRED: &'static str = "checkout_expired";
    /// An asynchronous payment method (e.g. a bank debit) failed.
    pub const ASYNC_PAYMENT_FAILED: &'static str = "async_payment_failed";
    /// A failure the provider did not explain.
    pub const UNKNOWN: &'static str = "unknown";

    /// Normalises a provider code: lowercase, `[a-z0-9_]`, at most 64 characters, so a
    /// hostile webhook cannot plant arbitrary text in metrics tags or the status page.
    pub fn from_code(raw: &str) -> Self {
        let cleaned: String = raw
            .trim()
            .chars()
            .take(64)
            .map(|c| c.to_ascii_lowercase())
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if cleaned.is_empty() {
            Self(Self::UNKNOWN.to_owned())
        } else {
            Self(cleaned)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is one of the codes Stripe documents (its decline codes and the
    /// `card_declined` error code) or one of payretry's own. The set of codes is open, but a
    /// metric tag must not be: telemetry tags anything else `other`.
    pub fn is_known(&self) -> bool {
        KNOWN_CODES.binary_search(&self.as_str()).is_ok()
    }
}

/// Stripe's documented decline codes, its `card_declined` error code, and payretry's own
/// reasons; sorted, for [`FailureReason::is_known`].
const KNOWN_CODES: [&str; 54] = [
    "approve_with_id",
    "async_payment_failed",
    "authentication_required",
    "call_issuer",
    "card_declined",
    "card_not_supported",
    "card_velocity_exceeded",
    "checkout_expired",
    "currency_not_supported",
    "do_not_honor",
    "do_not_try_again",
    "duplicate_transaction",
    "expired_card",
    "expired_or_canceled_card",
    "fraudulent",
    "generic_decline",
    "highest_risk_level",
    "incorrect_cvc",
    "incorrect_number",
    "incorrect_pin",
    "incorrect_zip",
    "insufficient_funds",
    "invalid_account",
    "invalid_amount",
    "invalid_cvc",
    "invalid_expiry_month",
    "invalid_expiry_year",
    "invalid_number",
    "invalid_pin",
    "issuer_not_available",
    "lost_card",
    "merchant_blacklist",
    "new_account_information_available",
    "no_action_taken",
    "not_permitted",
    "offline_pin_required",
    "online_or_offline_pin_required",
    "pickup_card",
    "pin_try_exceeded",
    "processing_error",
    "reenter_transaction",
    "restricted_card",
    "retry_processing_failed",
    "revocation_of_all_authorizations",
    "revocation_of_authorization",
    "security_violation",
    "service_not_allowed",
    "stolen_card",
    "stop_payment_order",
    "testmode_decline",
    "transaction_not_allowed",
    "try_again_later",
    "unknown",
    "withdrawal_count_limit_exceeded",
];

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes_are_sorted_for_binary_search() {
        assert!(KNOWN_CODES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn codes_are_normalised() {
        assert_eq!(
            FailureReason::from_code("insufficient_funds").as_str(),
            "insufficient_funds"
        );
        assert_eq!(
            FailureReason::from_code(" Card-Declined ").as_str(),
            "card_declined"
        );
        assert_eq!(FailureReason::from_code("").as_str(), "unknown");
        assert!(FailureReason::from_code("insufficient_funds").is_known());
        assert!(FailureReason::from_code(FailureReason::RETRY_PROCESSING_FAILED).is_known());
        assert!(!FailureReason::from_code("made_up_by_an_attacker").is_known());
        assert_eq!(
            FailureReason::from_code(&"x".repeat(100)).as_str().len(),
            64
        );
    }
}
