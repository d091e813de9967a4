//! The states of a payment session (DESIGN.md §2) and why a retry may be unavailable.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where a payment session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// A provider checkout is live, awaiting the buyer.
    Open,
    /// The last checkout failed; a retry may be possible.
    Failed,
    /// A retry is queued; the new checkout is due at `nextRetryAt`.
    RetryScheduled,
    /// A checkout was completed with a payment method that settles later (a bank debit):
    /// money may still move, so no retry until the provider reports the outcome.
    Processing,
    /// Paid. Terminal.
    Succeeded,
    /// The window closed unpaid. Terminal.
    Expired,
}

impl SessionStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Failed => "failed",
            Self::RetryScheduled => "retry_scheduled",
            Self::Processing => "processing",
            Self::Succeeded => "succeeded",
            Self::Expired => "expired",
        }
    }

    /// Terminal states never change again.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Expired)
    }
}

impl fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown session status `{0}`")]
pub struct UnknownStatus(pub String);

impl FromStr for SessionStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "open" => Self::Open,
            "failed" => Self::Failed,
            "retry_scheduled" => Self::RetryScheduled,
            "processing" => Self::Processing,
            "succeeded" => Self::Succeeded,
            "expired" => Self::Expired,
            other => return Err(UnknownStatus(other.to_owned())),
        })
    }
}

/// The status object's `retryUnavailableReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryUnavailableReason {
    LimitReached,
    WindowExpired,
    PaymentSucceeded,
    RetryScheduled,
    PaymentProcessing,
    PaymentNotFailed,
    FailureNotRetryable,
}

impl RetryUnavailableReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::LimitReached => "limit_reached",
            Self::WindowExpired => "window_expired",
            Self::PaymentSucceeded => "payment_succeeded",
            Self::RetryScheduled => "retry_scheduled",
            Self::PaymentProcessing => "payment_processing",
            Self::PaymentNotFailed => "payment_not_failed",
            Self::FailureNotRetryable => "failure_not_retryable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for s in [
            SessionStatus::Open,
            SessionStatus::Failed,
            SessionStatus::RetryScheduled,
            SessionStatus::Processing,
            SessionStatus::Succeeded,
            SessionStatus::Expired,
        ] {
            assert_eq!(s.as_str().parse::<SessionStatus>(), Ok(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        assert!("paid".parse::<SessionStatus>().is_err());
    }
}
