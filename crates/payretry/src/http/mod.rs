//! The HTTP edge (DESIGN.md §3): routes, authentication, idempotency, and the one error
//! type. Each handler parses its input into domain values, calls the service, and maps
//! the outcome; no business rule lives here.

pub mod admin;
pub mod admin_sessions;
pub mod auth;
pub mod client_ip;
pub mod console;
pub mod error;
pub mod form;
pub mod health;
pub mod idempotency;
pub mod openapi;
pub mod page;
pub mod pagination;
pub mod pay_page;
pub mod payments;
pub mod rate_limit;
pub mod retry_stats;
pub mod sandbox;
pub mod server;
pub mod webhook_deliveries;
pub mod webhooks;

use crate::secret::Secret;
use crate::service::Payments;
use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use error::ApiError;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// Request bodies larger than this are refused with 413 `payload_too_large`.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub payments: Arc<Payments>,
    /// The queue the worker consumes, checked by `/readyz`.
    pub queue: Arc<dyn crate::queue::JobQueue>,
    pub jwt: Arc<auth::JwtKeys>,
    /// Verify incoming provider webhooks (several while a secret rotates).
    pub webhook_secrets: Arc<Vec<Secret>>,
    /// The sandbox's hosted pages: `Some` only with the `sandbox` provider.
    pub sandbox: Option<Arc<sandbox::SandboxPages>>,
    pub prometheus: PrometheusHandle,
    pub limiter: Arc<rate_limit::RateLimiter>,
    /// Whose `X-Forwarded-For` names the client, for the rate limits.
    pub trusted_proxies: Arc<client_ip::TrustedProxies>,
}

/// The raw body, with the size limit and read errors mapped to the contract.
pub struct RequestBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RequestBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(RequestBody)
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge
                } else if caused_by_body_timeout(&rejection) {
                    ApiError::RequestTimeout
                } else {
                    ApiError::InvalidRequest("the request body could not be read".to_owned())
                }
            })
    }
}

/// A request body must arrive within this long of its head: with the head's own timeout
/// (see `server`), what bounds a client trickling its body to hold a connection.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn caused_by_body_timeout(rejection: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(rejection);
    while let Some(error) = cause {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// A body a JSON route reads: [`RequestBody`], refused with 415 `unsupported_media_type`
/// unless it is empty or declared `application/json` (see [`require_json`]).
pub struct JsonBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let headers = req.headers().clone();
        let RequestBody(body) = RequestBody::from_request(req, state).await?;
        require_json(&headers, &body)?;
        Ok(JsonBody(body))
    }
}

/// A non-empty body must be declared `application/json`; parameters such as
/// `; charset=utf-8` are allowed and the media type is matched without regard to case. An
/// empty body (a retry carries none) needs no `Content-Type`.
pub fn require_json(headers: &axum::http::HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    if body.is_empty() {
        return Ok(());
    }
    let declared = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    match declared {
        Some(media) if media.eq_ignore_ascii_case("application/json") => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType),
    }
}

/// Requests whose headers add up to more than this are refused with 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Refuses oversize headers, and an oversize body before reading it when its length is
/// declared.
async fn limit_declared_length(request: Request, next: Next) -> Response {
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return ApiError::HeadersTooLarge.into_response();
    }
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return ApiError::PayloadTooLarge.into_response();
    }
    next.run(request).await
}

/// One span per request with method, route, status and latency; echoes `x-request-id`.
async fn trace_request(request: Request, next: Next) -> Response {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let span = tracing::info_span!("request", method = %request.method(), route = %route, request_id = %request_id);
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::info!(
            status = response.status().as_u16(),
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    });
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn not_found() -> ApiError {
    ApiError::RouteNotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Routes every process serves: health, readiness, metrics, the OpenAPI document.
fn operations() -> Router<AppState> {
    health::router().merge(openapi::router())
}

/// The full API.
pub fn router(state: AppState) -> Router {
    payments::router()
        .merge(webhooks::router())
        .merge(admin::router())
        .merge(webhook_deliveries::router())
        .merge(admin_sessions::router())
        .merge(retry_stats::router())
        .merge(pay_page::router())
        .merge(console::router())
        .merge(match &state.sandbox {
            Some(pages) => sandbox::router(pages.clone(), &state),
            None => Router::new(),
        })
        .merge(operations())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            BODY_READ_TIMEOUT,
        ))
        .layer(middleware::from_fn(limit_declared_length))
        .route_layer(middleware::from_fn(trace_request))
        .with_state(state)
}

/// A worker-only process serves just the operations routes.
pub fn operations_router(state: AppState) -> Router {
    operations().fallback(not_found).with_state(state)
}
