//! The one error type at the HTTP edge. Every refusal becomes an RFC 9457
//! `application/problem+json` body with the contract's `code` (DESIGN.md §3). Internal
//! errors are logged here and answered with a generic body: no SQL, stack or secret leaves.

use crate::service::ServiceError;
use crate::storage::StorageError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use payretry_domain::RetryRefusal;
use serde::Serialize;
use utoipa::ToSchema;

/// Each variant documents its status and code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid_request`: the body or a parameter is malformed.
    #[error("{0}")]
    InvalidRequest(String),
    /// 400 `idempotency_key_missing`.
    #[error("this request needs an Idempotency-Key header")]
    IdempotencyKeyMissing,
    /// 400 `idempotency_key_invalid`.
    #[error("the Idempotency-Key must be 1 to 255 printable ASCII characters")]
    IdempotencyKeyInvalid,
    /// 400 `invalid_signature`: a webhook whose signature does not verify.
    #[error("the webhook signature could not be verified")]
    InvalidSignature,
    /// 401 `unauthenticated`.
    #[error("a valid bearer token is required")]
    Unauthenticated,
    /// 403 `forbidden`.
    #[error("your role may not use this route")]
    Forbidden,
    /// 404 `session_not_found` (also for sessions the caller may not see).
    #[error("no such payment session")]
    SessionNotFound,
    /// 404 `dead_letter_not_found`.
    #[error("no such dead letter")]
    DeadLetterNotFound,
    /// 404 `delivery_not_found`.
    #[error("no such webhook delivery")]
    DeliveryNotFound,
    /// 404 `not_found`: no such route.
    #[error("no such route")]
    RouteNotFound,
    /// 405 `method_not_allowed`: the route exists, the method does not.
    #[error("this route does not accept that method")]
    MethodNotAllowed,
    /// 408 `request_timeout`: the request's head or body did not arrive in time.
    #[error("the request headers were not received in time")]
    RequestTimeout,
    /// 409 / 410: the retry refusals of DESIGN.md §2.
    #[error("{0}")]
    Refused(RetryRefusal),
    /// 409 `idempotency_key_in_use`.
    #[error("a request with this Idempotency-Key is still being processed")]
    IdempotencyKeyInUse,
    /// 431 `headers_too_large`: the request's headers exceed 16 KiB in all.
    #[error("the request headers are larger than 16 KiB")]
    HeadersTooLarge,
    /// 431 `headers_too_large`: more request headers than the server reads.
    #[error("the request has more than 100 headers")]
    TooManyHeaders,
    /// 415 `unsupported_media_type`: a JSON route was sent a body that is not JSON.
    #[error("the request body must be application/json")]
    UnsupportedMediaType,
    /// 413 `payload_too_large`.
    #[error("the request body is larger than 64 KiB")]
    PayloadTooLarge,
    /// 422 `idempotency_key_reused`.
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyKeyReused,
    /// 429 `rate_limited`, with `Retry-After` in seconds.
    #[error("too many requests; try again later")]
    RateLimited { retry_after_secs: u64 },
    /// 502 `provider_error`: the payment provider refused or failed.
    #[error("the payment provider could not be reached; try again")]
    Provider(String),
    /// 503 `unavailable`, with `Retry-After`: every connection the server keeps is busy
    /// with a request (`http::server`).
    #[error("the server is at its connection limit; try again")]
    AtCapacity,
    /// 503 `unavailable`, with `Retry-After`: storage is unreachable or contended.
    #[error("the service is temporarily unavailable; try again")]
    Unavailable(String),
}

/// The problem+json body.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// Always `about:blank`: `code` carries the machine-readable kind.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    pub code: &'static str,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_)
            | Self::IdempotencyKeyMissing
            | Self::IdempotencyKeyInvalid
            | Self::InvalidSignature => StatusCode::BAD_REQUEST,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::SessionNotFound
            | Self::DeadLetterNotFound
            | Self::DeliveryNotFound
            | Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::Refused(refusal) => {
                StatusCode::from_u16(refusal.http_status()).unwrap_or(StatusCode::CONFLICT)
            }
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::IdempotencyKeyInUse => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadersTooLarge | Self::TooManyHeaders => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Provider(_) => StatusCode::BAD_GATEWAY,
            Self::Unavailable(_) | Self::AtCapacity => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::IdempotencyKeyMissing => "idempotency_key_missing",
            Self::IdempotencyKeyInvalid => "idempotency_key_invalid",
            Self::InvalidSignature => "invalid_signature",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::SessionNotFound => "session_not_found",
            Self::DeadLetterNotFound => "dead_letter_not_found",
            Self::DeliveryNotFound => "delivery_not_found",
            Self::RouteNotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::RequestTimeout => "request_timeout",
            Self::Refused(refusal) => refusal.code(),
            Self::IdempotencyKeyInUse => "idempotency_key_in_use",
            Self::PayloadTooLarge => "payload_too_large",
            Self::HeadersTooLarge | Self::TooManyHeaders => "headers_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::RateLimited { .. } => "rate_limited",
            Self::Provider(_) => "provider_error",
            Self::Unavailable(_) | Self::AtCapacity => "unavailable",
        }
    }

    fn title(&self) -> &'static str {
        match self.status() {
            StatusCode::BAD_REQUEST => "Bad request",
            StatusCode::UNAUTHORIZED => "Unauthenticated",
            StatusCode::FORBIDDEN => "Forbidden",
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::METHOD_NOT_ALLOWED => "Method not allowed",
            StatusCode::REQUEST_TIMEOUT => "Request timeout",
            StatusCode::CONFLICT => "Conflict",
            StatusCode::GONE => "Payment window expired",
            StatusCode::PAYLOAD_TOO_LARGE => "Payload too large",
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "Request headers too large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "Unsupported media type",
            StatusCode::UNPROCESSABLE_ENTITY => "Idempotency key reused",
            StatusCode::TOO_MANY_REQUESTS => "Too many requests",
            StatusCode::BAD_GATEWAY => "Payment provider error",
            _ => "Service unavailable",
        }
    }

    /// The body, also used when a refusal is stored for idempotent replay.
    pub fn problem(&self) -> Problem {
        Problem {
            kind: "about:blank",
            title: self.title(),
            status: self.status().as_u16(),
            detail: self.to_string(),
            code: self.code(),
        }
    }
}

pub const PROBLEM_JSON: &str = "application/problem+json";

/// `Retry-After` of [`ApiError::AtCapacity`]: connections free up within seconds.
pub const AT_CAPACITY_RETRY_SECS: u64 = 1;

/// `Retry-After` of [`ApiError::Unavailable`]: a database failover or a contended session
/// settles within seconds, and clients should not hammer it sooner.
pub const UNAVAILABLE_RETRY_SECS: u64 = 2;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Provider(internal) => tracing::warn!(error = %internal, "provider failure"),
            Self::Unavailable(internal) => tracing::error!(error = %internal, "storage failure"),
            _ => {}
        }
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (self.status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Self::RateLimited { retry_after_secs } = self {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        if let Self::AtCapacity = self {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(AT_CAPACITY_RETRY_SECS),
            );
        }
        if let Self::Unavailable(_) = self {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(UNAVAILABLE_RETRY_SECS),
            );
        }
        response
    }
}

impl From<StorageError> for ApiError {
    fn from(error: StorageError) -> Self {
        match error {
            // Normally answered by replaying the other request's response
            // (`idempotency::finish`); anywhere else, the key is in use.
            StorageError::IdempotencyKeyTaken => Self::IdempotencyKeyInUse,
            other => Self::Unavailable(other.to_string()),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::SessionNotFound => Self::SessionNotFound,
            ServiceError::DeadLetterNotFound => Self::DeadLetterNotFound,
            ServiceError::DeliveryNotFound => Self::DeliveryNotFound,
            ServiceError::Refused(refusal) => Self::Refused(refusal),
            ServiceError::Provider(e) => Self::Provider(e.to_string()),
            ServiceError::Storage(e) => e.into(),
            ServiceError::Contended => Self::Unavailable("contended".to_owned()),
        }
    }
}
