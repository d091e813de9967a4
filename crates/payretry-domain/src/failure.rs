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
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            FailureReason::from_code(&"x".repeat(100)).as_str().len(),
            64
        );
    }
}
