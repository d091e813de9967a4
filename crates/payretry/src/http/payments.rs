//! The buyer-facing routes: create a checkout, read its status, ask for a retry, and (for
//! support) read the audit log.

use super::auth::Caller;
use super::client_ip::ClientIp;
use super::error::ApiError;
use super::idempotency;
use super::pagination::{self, PageParams, PageQuery};
use super::{AppState, JsonBody};
use crate::service::checkout::NewCheckout;
use crate::service::views::{RetryAcceptedView, StatusView};
use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use payretry_domain::{Amount, Currency, Money, PaymentSessionId, Role};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// The buyer-facing payment routes: checkout, status, retry and the audit log.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/payments/checkout", post(create_checkout))
        .route("/payments/checkout/{session_id}/status", get(status))
        .route("/payments/checkout/{session_id}/audit", get(audit))
        .route("/payments/retry/{session_id}", post(retry))
}

/// `POST /payments/checkout` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateCheckoutBody {
    /// Minor units (cents; whole units for zero-decimal currencies such as `jpy`),
    /// 1..=99999999. With the `stripe` provider, also what Stripe will charge: at least the
    /// currency's minimum charge (e.g. 50 for `usd` and `eur`, 30 for `gbp`, 50 for `jpy`),
    /// a multiple of 10 for three-decimal currencies (`bhd`, `jod`, `kwd`, `omr`, `tnd`) and
    /// a multiple of 100 for `isk`; otherwise 400 `invalid_request` naming the limit,
    /// before anything is written or sent to Stripe.
    #[schema(minimum = 1, maximum = 99_999_999, example = 2500)]
    #[serde(deserialize_with = "whole_number")]
    pub amount: i64,
    /// Three lowercase letters.
    #[schema(pattern = "^[a-z]{3}$", example = "usd")]
    pub currency: String,
    /// 1–500 characters, not blank, no control characters.
    #[schema(
        example = "Order 123",
        min_length = 1,
        max_length = 500,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub description: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

const MAX_DESCRIPTION: usize = 500;

/// A JSON integer, also written as a float with no fraction (`2500.0`): JSON Schema's
/// `integer` accepts both, and so do we. Anything fractional is refused.
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    if let Some(n) = number.as_i64() {
        return Ok(n);
    }
    match number.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => Ok(f as i64),
        _ => Err(serde::de::Error::custom(
            "amount must be a whole number of minor units",
        )),
    }
}

impl TryFrom<CreateCheckoutBody> for NewCheckout {
    type Error = ApiError;

    fn try_from(body: CreateCheckoutBody) -> Result<Self, ApiError> {
        let amount =
            Amount::new(body.amount).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
        let currency =
            Currency::parse(&body.currency).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
        let description = body.description.unwrap_or_else(|| "Payment".to_owned());
        let unprintable = description.chars().any(char::is_control);
        if unprintable
            || description.trim().is_empty()
            || description.chars().count() > MAX_DESCRIPTION
        {
            return Err(ApiError::InvalidRequest(format!(
                "description must be 1 to {MAX_DESCRIPTION} characters, without control characters"
            )));
        }
        let metadata = match body.metadata {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(Value::Object(map)) => Value::Object(map),
            Some(_) => {
                return Err(ApiError::InvalidRequest(
                    "metadata must be an object".into(),
                ));
            }
        };
        Ok(Self {
            money: Money { amount, currency },
            description,
            metadata,
        })
    }
}

fn session_id(raw: &str) -> Result<PaymentSessionId, ApiError> {
    PaymentSessionId::parse(raw).map_err(|_| ApiError::SessionNotFound)
}

/// Create a payment session and its first provider checkout.
#[utoipa::path(post, path = "/payments/checkout", tag = "payments",
    request_body = CreateCheckoutBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "optional; 1–255 printable ASCII", min_length = 1, max_length = 255, pattern = r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")),
    responses(
        (status = 201, body = StatusView),
        (status = 400, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 401, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 403, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 409, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 413, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 422, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 429, body = super::error::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create_checkout(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let caller = state.limiter.authenticated(ip, caller)?;
    let buyer = caller.require(&[Role::Buyer])?;
    state.limiter.check(ip, buyer.user.as_str())?;
    let key = idempotency::key_from(&headers)?;
    let parsed: CreateCheckoutBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid JSON body: {e}")))?;
    let request = NewCheckout::try_from(parsed)?;
    state
        .payments
        .check_charge(&request.money)
        .map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    let storage = state.payments.storage.as_ref();
    let Some(key) = key else {
        let (_, response) = state.payments.create_checkout(buyer, request, None).await?;
        return Ok(idempotency::stored(&response));
    };
    let scope = idempotency::scope(buyer, &key, &Method::POST, "/payments/checkout", &body);
    if let Some(answer) = idempotency::claim(storage, &scope).await? {
        return Ok(answer);
    }
    let outcome = state
        .payments
        .create_checkout(buyer, request, Some(&scope))
        .await
        .map(|(_, response)| response);
    idempotency::finish(storage, &scope, outcome).await
}

/// The status object of a session.
#[utoipa::path(get, path = "/payments/checkout/{sessionId}/status", tag = "payments",
    params(("sessionId" = String, Path)),
    responses(
        (status = 200, body = StatusView),
        (status = 401, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 404, body = super::error::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn status(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw_id): Path<String>,
) -> Result<Json<StatusView>, ApiError> {
    let caller = caller.require(&[Role::Buyer, Role::Support, Role::Admin])?;
    let id = session_id(&raw_id)?;
    let session = state.payments.visible_session(&id, caller).await?;
    Ok(Json(StatusView::of(
        &session,
        &state.payments.policy,
        chrono::Utc::now(),
    )))
}

/// Schedule a retry of a failed payment.
#[utoipa::path(post, path = "/payments/retry/{sessionId}", tag = "payments",
    params(("sessionId" = String, Path),
        ("Idempotency-Key" = String, Header, description = "required; 1–255 printable ASCII", min_length = 1, max_length = 255, pattern = r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")),
    responses(
        (status = 202, body = RetryAcceptedView),
        (status = 400, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 401, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 404, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 409, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 410, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 422, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 429, body = super::error::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn retry(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    caller: Result<Caller, ApiError>,
    Path(raw_id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let caller = state.limiter.authenticated(ip, caller)?;
    let caller = caller.require(&[Role::Buyer, Role::Support, Role::Admin])?;
    state.limiter.check(ip, caller.user.as_str())?;
    let key = idempotency::key_from(&headers)?.ok_or(ApiError::IdempotencyKeyMissing)?;
    let id = session_id(&raw_id)?;
    let storage = state.payments.storage.as_ref();
    let path = format!("/payments/retry/{id}");
    let scope = idempotency::scope(caller, &key, &Method::POST, &path, &body);
    // No claim: the retry's one transaction stores the response with its effect. What the
    // key has recorded and the session are read together, in one round trip.
    let (found, session) = storage
        .lookup_idempotent_with_session(&scope, &id, chrono::Utc::now())
        .await?;
    if let Some(answer) = idempotency::answer(found)? {
        return Ok(answer);
    }
    let outcome = state
        .payments
        .schedule_retry(&id, session, caller, &scope)
        .await;
    idempotency::finish(storage, &scope, outcome).await
}

/// One audit log entry.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntryView {
    pub at: chrono::DateTime<chrono::Utc>,
    pub action: String,
    pub attempt_number: Option<u32>,
    pub actor: String,
    #[schema(value_type = Object)]
    pub details: Value,
}

/// One page of a session's audit log.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditLogView {
    pub entries: Vec<AuditEntryView>,
    /// Pass as `cursor` for the next page; null on the last page. Opaque.
    pub next_cursor: Option<String>,
}

/// A session's audit log, oldest first, one page at a time (support and admin).
#[utoipa::path(get, path = "/payments/checkout/{sessionId}/audit", tag = "payments",
    params(("sessionId" = String, Path), PageParams),
    responses(
        (status = 200, body = AuditLogView),
        (status = 400, description = "`limit` or `cursor` is not valid (`invalid_request`)",
            body = super::error::Problem, content_type = "application/problem+json"),
        (status = 401, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 403, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 404, body = super::error::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn audit(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw_id): Path<String>,
    page: Result<PageQuery, ApiError>,
) -> Result<Json<AuditLogView>, ApiError> {
    let caller = caller.require(&[Role::Support, Role::Admin])?;
    let PageQuery(page) = page?;
    let id = session_id(&raw_id)?;
    state.payments.visible_session(&id, caller).await?;
    let entries = state.payments.storage.audit_log(&id, page).await?;
    Ok(Json(AuditLogView {
        next_cursor: pagination::next_cursor(entries.next),
        entries: entries
            .items
            .into_iter()
            .map(|e| AuditEntryView {
                at: e.at,
                action: e.action,
                attempt_number: e.attempt.map(|a| a.get()),
                actor: e.actor,
                details: e.details,
            })
            .collect(),
    }))
}

impl IntoResponse for AuditLogView {
    fn into_response(self) -> Response {
        Json(self).into_response()
    }
}
