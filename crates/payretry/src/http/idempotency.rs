//! Idempotency (DESIGN.md §3, after the IETF Idempotency-Key draft and Stripe). The key is
//! scoped to the caller's `sub`; the fingerprint is method + path + body. The first request
//! that reaches the business logic has its response stored (in the same transaction as its
//! effect when it has one); a repeat gets those bytes back with `Idempotent-Replayed: true`.

use super::error::ApiError;
use crate::storage::{IdempotencyBegin, IdempotencyScope, Storage, StoredResponse};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use payretry_domain::{IdempotencyKey, Principal};
use sha2::{Digest, Sha256};

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED: &str = "idempotent-replayed";

/// Reads the `Idempotency-Key` header, if any.
pub fn key_from(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::IdempotencyKeyInvalid)?;
    IdempotencyKey::parse(text)
        .map(Some)
        .map_err(|_| ApiError::IdempotencyKeyInvalid)
}

fn fingerprint(method: &Method, path: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(method.as_str().as_bytes());
    hasher.update(b" ");
    hasher.update(path.as_bytes());
    hasher.update(b"\n");
    hasher.update(body);
    hex::encode(hasher.finalize())
}

/// Either the request goes ahead under `scope`, or the answer is already known.
pub enum Claim {
    Proceed(IdempotencyScope),
    Answer(Response),
}

/// Claims `key` for this request.
pub async fn claim(
    storage: &dyn Storage,
    caller: &Principal,
    key: &IdempotencyKey,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Result<Claim, ApiError> {
    let scope = IdempotencyScope {
        caller: caller.user.clone(),
        key: key.as_str().to_owned(),
    };
    let begin = storage
        .begin_idempotent(&scope, &fingerprint(method, path, body), chrono::Utc::now())
        .await?;
    match begin {
        IdempotencyBegin::Started => Ok(Claim::Proceed(scope)),
        IdempotencyBegin::Replay(stored) => Ok(Claim::Answer(replay(&stored))),
        IdempotencyBegin::InFlight => Err(ApiError::IdempotencyKeyInUse),
        IdempotencyBegin::Mismatch => Err(ApiError::IdempotencyKeyReused),
    }
}

/// A stored response, as first sent.
pub fn stored(response: &StoredResponse) -> Response {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::OK);
    let content_type = if status.is_success() {
        "application/json"
    } else {
        super::error::PROBLEM_JSON
    };
    let mut r = (status, response.body.clone()).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn replay(response: &StoredResponse) -> Response {
    let mut r = stored(response);
    r.headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    r
}

/// Settles a claim whose business logic ended without storing a response itself: client
/// errors are stored (a repeat gets the same refusal); server errors release the key so the
/// client can try again.
pub async fn settle_error(
    storage: &dyn Storage,
    scope: &IdempotencyScope,
    error: ApiError,
) -> Response {
    let settled = if error.status().is_server_error() {
        storage.abandon_idempotent(scope).await
    } else {
        let response = StoredResponse {
            status: error.status().as_u16(),
            body: serde_json::to_vec(&error.problem()).unwrap_or_default(),
        };
        let completion = crate::storage::IdempotencyCompletion {
            scope: scope.clone(),
            response,
        };
        storage.complete_idempotent(&completion).await
    };
    if let Err(e) = settled {
        tracing::error!(error = %e, "could not settle an idempotency key");
    }
    error.into_response()
}
