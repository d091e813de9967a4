//! Idempotency (DESIGN.md §3, after the IETF Idempotency-Key draft and Stripe). The key is
//! scoped to the caller's `sub`; the fingerprint is method + path + body. The first request
//! that reaches the business logic has its response stored (in the same transaction as its
//! effect when it has one); a repeat gets those bytes back with `Idempotent-Replayed: true`.
//!
//! Two ways in: a request whose work calls the provider (checkout creation) [`claim`]s the
//! key first, so a repeat meanwhile is refused with 409; a request whose effect is a single
//! transaction (a retry) only reads what is [`recorded`] and lets that transaction store
//! the response — one write per request, and of two concurrent requests with one key the
//! second replays the first's answer.

use super::error::ApiError;
use crate::service::{ServiceError, ServiceResult};
use crate::storage::{
    IdempotencyBegin, IdempotencyCompletion, IdempotencyScope, IdempotencyStore, StorageError,
    StoredResponse,
};
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

/// The idempotency scope of `key` for this request.
pub fn scope(
    caller: &Principal,
    key: &IdempotencyKey,
    method: &Method,
    path: &str,
    body: &[u8],
) -> IdempotencyScope {
    IdempotencyScope {
        caller: caller.user.clone(),
        key: key.as_str().to_owned(),
        fingerprint: fingerprint(method, path, body),
    }
}

/// Claims the key for a request whose work is long (it calls the provider), so a repeat
/// sent meanwhile gets 409 rather than doing the work twice. `Some` is the answer already
/// known; `None` means go ahead.
pub async fn claim(
    storage: &dyn IdempotencyStore,
    scope: &IdempotencyScope,
) -> Result<Option<Response>, ApiError> {
    answer(storage.begin_idempotent(scope, chrono::Utc::now()).await?)
}

/// What is already recorded under the key, read without claiming it, for a request whose
/// effect is one transaction that stores its response itself. `Some` is the answer already
/// known; `None` means go ahead.
pub async fn recorded(
    storage: &dyn IdempotencyStore,
    scope: &IdempotencyScope,
) -> Result<Option<Response>, ApiError> {
    answer(storage.lookup_idempotent(scope, chrono::Utc::now()).await?)
}

/// What a request finds under its key: `Some` is the answer already known (a replay), an
/// error the refusal (in flight, or reused for another request); `None` means go ahead.
pub fn answer(found: IdempotencyBegin) -> Result<Option<Response>, ApiError> {
    match found {
        IdempotencyBegin::Started => Ok(None),
        IdempotencyBegin::Replay(stored) => Ok(Some(replay(&stored))),
        IdempotencyBegin::InFlight => Err(ApiError::IdempotencyKeyInUse),
        IdempotencyBegin::Mismatch => Err(ApiError::IdempotencyKeyReused),
    }
}

/// Answers a request whose business logic ran under `scope`: its response (already stored
/// with its effect), or its error settled under the key. When another request with the same
/// key stored its response first, that response is replayed instead, so every request with
/// one key gets one answer.
pub async fn finish(
    storage: &dyn IdempotencyStore,
    scope: &IdempotencyScope,
    outcome: ServiceResult<StoredResponse>,
) -> Result<Response, ApiError> {
    match outcome {
        Ok(response) => Ok(stored(&response)),
        Err(ServiceError::Storage(StorageError::IdempotencyKeyTaken)) => {
            replay_winner(storage, scope).await
        }
        Err(error) => settle_error(storage, scope, error.into()).await,
    }
}

async fn replay_winner(
    storage: &dyn IdempotencyStore,
    scope: &IdempotencyScope,
) -> Result<Response, ApiError> {
    recorded(storage, scope)
        .await?
        .ok_or(ApiError::IdempotencyKeyInUse)
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

/// Settles a request whose business logic ended in `error`: client errors are stored (a
/// repeat gets the same refusal); server errors release any claim so the client can try
/// again.
async fn settle_error(
    storage: &dyn IdempotencyStore,
    scope: &IdempotencyScope,
    error: ApiError,
) -> Result<Response, ApiError> {
    let settled = if error.status().is_server_error() {
        storage.abandon_idempotent(scope).await
    } else {
        let response = StoredResponse {
            status: error.status().as_u16(),
            body: serde_json::to_vec(&error.problem()).unwrap_or_default(),
        };
        let completion = IdempotencyCompletion {
            scope: scope.clone(),
            response,
        };
        storage.complete_idempotent(&completion).await
    };
    match settled {
        Ok(()) => {}
        Err(StorageError::IdempotencyKeyTaken) => return replay_winner(storage, scope).await,
        Err(e) => tracing::error!(error = %e, "could not settle an idempotency key"),
    }
    Ok(error.into_response())
}
