//! What can go wrong talking to payretry, split the way a caller has to decide.
//!
//! [`ClientError::Api`] is the server's answer (a contract `code` to branch on);
//! [`ClientError::Transport`] means the answer never arrived, so the request may or may not
//! have taken effect; [`ClientError::Decode`] means an answer arrived in a shape the
//! contract does not allow. [`ClientError::is_transient`] is the one place that says which
//! of these are worth asking again with the same idempotency key.

use payretry_domain::{RetryRefusal, RetryUnavailableReason};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Every error `code` of the contract (DESIGN.md §3), plus [`ApiErrorCode::Other`] so a
/// code added to the server later still reaches the caller instead of failing to decode.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ApiErrorCode {
    /// 400: the body or a parameter is malformed.
    InvalidRequest,
    /// 400: `POST /payments/retry/{id}` without an `Idempotency-Key`.
    IdempotencyKeyMissing,
    /// 400: the key is not 1–255 printable ASCII characters.
    IdempotencyKeyInvalid,
    /// 400: a webhook's signature did not verify.
    InvalidSignature,
    /// 401: missing, malformed, expired or wrongly signed token.
    Unauthenticated,
    /// 403: the caller's role may not use this route.
    Forbidden,
    /// 404: no such session, or not the caller's (never 403, so nothing leaks).
    SessionNotFound,
    /// 404: no such dead letter.
    DeadLetterNotFound,
    /// 409: every allowed retry is spent.
    RetryLimitReached,
    /// 409: the session is paid.
    PaymentAlreadySucceeded,
    /// 409: a payment that settles later (a bank debit) is in progress.
    PaymentProcessing,
    /// 409: a retry is queued already.
    RetryAlreadyScheduled,
    /// 409: the session's checkout is still open.
    PaymentNotFailed,
    /// 409: the decline needs a different payment method, not a retry.
    FailureNotRetryable,
    /// 409: the first request with this key is still being processed.
    IdempotencyKeyInUse,
    /// 410: the window closed, or the retry could not start inside it.
    PaymentWindowExpired,
    /// 413: the body is over 64 KiB.
    PayloadTooLarge,
    /// 422: the key was used before for a different request.
    IdempotencyKeyReused,
    /// 429: the caller's rate limit; see `Retry-After`.
    RateLimited,
    /// A code this client does not know yet, kept verbatim.
    Other(String),
}

impl ApiErrorCode {
    /// Every code the contract defines, in its table's order.
    pub const ALL_KNOWN: [Self; 19] = [
        Self::InvalidRequest,
        Self::IdempotencyKeyMissing,
        Self::IdempotencyKeyInvalid,
        Self::InvalidSignature,
        Self::Unauthenticated,
        Self::Forbidden,
        Self::SessionNotFound,
        Self::DeadLetterNotFound,
        Self::RetryLimitReached,
        Self::PaymentAlreadySucceeded,
        Self::PaymentProcessing,
        Self::RetryAlreadyScheduled,
        Self::PaymentNotFailed,
        Self::FailureNotRetryable,
        Self::IdempotencyKeyInUse,
        Self::PaymentWindowExpired,
        Self::PayloadTooLarge,
        Self::IdempotencyKeyReused,
        Self::RateLimited,
    ];

    /// The wire form, e.g. `retry_limit_reached`.
    pub fn as_str(&self) -> &str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::IdempotencyKeyMissing => "idempotency_key_missing",
            Self::IdempotencyKeyInvalid => "idempotency_key_invalid",
            Self::InvalidSignature => "invalid_signature",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::SessionNotFound => "session_not_found",
            Self::DeadLetterNotFound => "dead_letter_not_found",
            Self::RetryLimitReached => "retry_limit_reached",
            Self::PaymentAlreadySucceeded => "payment_already_succeeded",
            Self::PaymentProcessing => "payment_processing",
            Self::RetryAlreadyScheduled => "retry_already_scheduled",
            Self::PaymentNotFailed => "payment_not_failed",
            Self::FailureNotRetryable => "failure_not_retryable",
            Self::IdempotencyKeyInUse => "idempotency_key_in_use",
            Self::PaymentWindowExpired => "payment_window_expired",
            Self::PayloadTooLarge => "payload_too_large",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::RateLimited => "rate_limited",
            Self::Other(code) => code,
        }
    }

    /// Reads a wire code; unknown codes become [`ApiErrorCode::Other`].
    pub fn parse(code: &str) -> Self {
        Self::ALL_KNOWN
            .into_iter()
            .find(|known| known.as_str() == code)
            .unwrap_or_else(|| Self::Other(code.to_owned()))
    }

    /// The HTTP status the contract pairs with this code; `None` for an unknown code.
    pub fn http_status(&self) -> Option<u16> {
        Some(match self {
            Self::InvalidRequest
            | Self::IdempotencyKeyMissing
            | Self::IdempotencyKeyInvalid
            | Self::InvalidSignature => 400,
            Self::Unauthenticated => 401,
            Self::Forbidden => 403,
            Self::SessionNotFound | Self::DeadLetterNotFound => 404,
            Self::RetryLimitReached
            | Self::PaymentAlreadySucceeded
            | Self::PaymentProcessing
            | Self::RetryAlreadyScheduled
            | Self::PaymentNotFailed
            | Self::FailureNotRetryable
            | Self::IdempotencyKeyInUse => 409,
            Self::PaymentWindowExpired => 410,
            Self::PayloadTooLarge => 413,
            Self::IdempotencyKeyReused => 422,
            Self::RateLimited => 429,
            Self::Other(_) => return None,
        })
    }

    /// For a refused retry, the status object's matching `retryUnavailableReason`: what the
    /// refusal says about the session. `None` for codes that say nothing about eligibility.
    pub fn retry_unavailable_reason(&self) -> Option<RetryUnavailableReason> {
        match self {
            Self::RetryLimitReached => Some(RetryUnavailableReason::LimitReached),
            Self::PaymentWindowExpired => Some(RetryUnavailableReason::WindowExpired),
            Self::PaymentAlreadySucceeded => Some(RetryUnavailableReason::PaymentSucceeded),
            Self::PaymentProcessing => Some(RetryUnavailableReason::PaymentProcessing),
            Self::RetryAlreadyScheduled => Some(RetryUnavailableReason::RetryScheduled),
            Self::PaymentNotFailed => Some(RetryUnavailableReason::PaymentNotFailed),
            Self::FailureNotRetryable => Some(RetryUnavailableReason::FailureNotRetryable),
            _ => None,
        }
    }
}

impl From<RetryRefusal> for ApiErrorCode {
    /// The domain's refusal and the client's code are the same contract seen from both ends.
    fn from(refusal: RetryRefusal) -> Self {
        Self::parse(refusal.code())
    }
}

impl fmt::Display for ApiErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ApiErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ApiErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let code = String::deserialize(d)?;
        Ok(Self::parse(&code))
    }
}

/// Why a [`crate::Client`] call did not return its success body.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a problem+json error: act on `code`.
    #[error("payretry answered {status} {code}: {detail}")]
    Api {
        /// The HTTP status of the response.
        status: u16,
        code: ApiErrorCode,
        /// The server's human explanation, for logs and support, not for branching.
        detail: String,
    },
    /// No answer arrived (connection refused or dropped, timeout): the request may or may
    /// not have reached the business logic.
    #[error("could not reach payretry: {0}")]
    Transport(#[from] reqwest::Error),
    /// An answer arrived whose body is not what the contract promises for its status (for
    /// example a proxy's HTML error page).
    #[error("payretry answered {status} with a body that does not match the contract: {source}")]
    Decode {
        status: u16,
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The contract code, when the server sent one.
    pub fn code(&self) -> Option<&ApiErrorCode> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether asking again, with the same idempotency key, may give a different answer:
    /// a lost answer, a server-side failure (5xx, including a gateway's non-contract page),
    /// or `idempotency_key_in_use` (the first request with this key is still running; its
    /// stored answer will be replayed). A contract refusal (any other 4xx) is final, and so
    /// is a request that could not even be built.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport(error) => !error.is_builder(),
            Self::Api { status, code, .. } => Self::is_api_transient(*status, code),
            Self::Decode { status, .. } => *status >= 500,
        }
    }

    /// [`Self::is_transient`] for a problem+json answer.
    pub(crate) fn is_api_transient(status: u16, code: &ApiErrorCode) -> bool {
        status >= 500 || *code == ApiErrorCode::IdempotencyKeyInUse
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_code_round_trips_through_its_wire_form() {
        for code in ApiErrorCode::ALL_KNOWN {
            assert_eq!(ApiErrorCode::parse(code.as_str()), code);
            let json = serde_json::to_value(&code).unwrap();
            assert_eq!(json, serde_json::json!(code.as_str()));
            assert_eq!(serde_json::from_value::<ApiErrorCode>(json).unwrap(), code);
        }
    }

    #[test]
    fn codes_carry_the_contract_status() {
        let expected = [
            ("invalid_request", 400),
            ("idempotency_key_missing", 400),
            ("idempotency_key_invalid", 400),
            ("invalid_signature", 400),
            ("unauthenticated", 401),
            ("forbidden", 403),
            ("session_not_found", 404),
            ("dead_letter_not_found", 404),
            ("retry_limit_reached", 409),
            ("payment_already_succeeded", 409),
            ("payment_processing", 409),
            ("retry_already_scheduled", 409),
            ("payment_not_failed", 409),
            ("failure_not_retryable", 409),
            ("idempotency_key_in_use", 409),
            ("payment_window_expired", 410),
            ("payload_too_large", 413),
            ("idempotency_key_reused", 422),
            ("rate_limited", 429),
        ];
        for (wire, status) in expected {
            let code = ApiErrorCode::parse(wire);
            assert!(!matches!(code, ApiErrorCode::Other(_)), "{wire} is known");
            assert_eq!(code.http_status(), Some(status), "{wire}");
        }
        assert_eq!(expected.len(), ApiErrorCode::ALL_KNOWN.len());
        assert_eq!(ApiErrorCode::parse("teapot").http_status(), None);
    }

    #[test]
    fn domain_refusals_map_to_the_same_codes_and_reasons() {
        for refusal in [
            RetryRefusal::PaymentAlreadySucceeded,
            RetryRefusal::PaymentProcessing,
            RetryRefusal::WindowExpired,
            RetryRefusal::RetryAlreadyScheduled,
            RetryRefusal::PaymentNotFailed,
            RetryRefusal::RetryLimitReached,
            RetryRefusal::FailureNotRetryable,
            RetryRefusal::WouldStartAfterWindow,
        ] {
            let code = ApiErrorCode::from(refusal);
            assert_eq!(code.http_status(), Some(refusal.http_status()));
            assert_eq!(
                code.retry_unavailable_reason(),
                Some(refusal.unavailable_reason())
            );
        }
    }

    fn api(status: u16, code: ApiErrorCode) -> ClientError {
        ClientError::Api {
            status,
            code,
            detail: String::new(),
        }
    }

    #[test]
    fn only_server_failures_and_in_flight_keys_are_transient() {
        assert!(api(503, ApiErrorCode::Other("unavailable".into())).is_transient());
        assert!(api(409, ApiErrorCode::IdempotencyKeyInUse).is_transient());
        for code in ApiErrorCode::ALL_KNOWN {
            if code != ApiErrorCode::IdempotencyKeyInUse {
                let status = code.http_status().unwrap();
                assert!(!api(status, code).is_transient());
            }
        }
        let html = serde_json::from_str::<serde_json::Value>("<html>").unwrap_err();
        assert!(
            ClientError::Decode {
                status: 502,
                source: html
            }
            .is_transient()
        );
        let garbled = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        assert!(
            !ClientError::Decode {
                status: 202,
                source: garbled
            }
            .is_transient()
        );
    }
}
