//! `POST /webhooks/stripe`: verified by signature (no JWT), deduplicated by event id.
//! Unknown event types and unknown sessions answer 200 so the provider stops resending.

use super::error::ApiError;
use super::{AppState, RequestBody};
use crate::provider::signature;
use crate::webhook::{event, refund_event};
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::{Value, json};

/// The provider's webhook endpoint.
pub fn router() -> Router<AppState> {
    Router::new().route("/webhooks/stripe", post(stripe))
}

/// Receive a provider event.
///
/// With the `stripe` provider, create the Stripe webhook endpoint for this URL with
/// `api_version` `2024-06-20`, the `Stripe-Version` payretry pins on its requests
/// (`STRIPE_VERSION`): Stripe renders an event in the endpoint's API version (else the
/// account's default), never in the version of the request that caused it. Events:
/// `checkout.session.completed`, `checkout.session.async_payment_succeeded`,
/// `checkout.session.async_payment_failed`, `checkout.session.expired`,
/// `payment_intent.payment_failed`. Its signing secret is `STRIPE_WEBHOOK_SECRET`.
#[utoipa::path(post, path = "/webhooks/stripe", tag = "webhooks",
    params(("Stripe-Signature" = String, Header)),
    request_body(content = Object, description = "a Stripe event"),
    responses(
        (status = 200, description = "accepted (or ignored)"),
        (status = 400, body = super::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn stripe(
    State(state): State<AppState>,
    headers: HeaderMap,
    RequestBody(body): RequestBody,
) -> Result<Json<Value>, ApiError> {
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let secrets: Vec<&str> = state.webhook_secrets.iter().map(|s| s.expose()).collect();
    let now = chrono::Utc::now().timestamp();
    if let Err(error) = signature::verify(
        header,
        &body,
        &secrets,
        now,
        signature::DEFAULT_TOLERANCE_SECS,
    ) {
        tracing::warn!(?error, "webhook signature refused");
        return Err(ApiError::InvalidSignature);
    }
    // After the signature: an outsider learns nothing before proving who it is.
    super::require_json(&headers, &body)?;
    let parsed = event::parse(&body).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    let Some(event) = parsed else {
        return refund(&state, &body).await;
    };
    crate::crash_point!("webhook-before-apply");
    let effect = state.payments.apply_event(&event).await?;
    crate::crash_point!("webhook-after-apply");
    tracing::info!(event_id = %event.id, session_id = %event.session_id, ?effect, "webhook applied");
    Ok(Json(
        json!({"received": true, "effect": format!("{effect:?}")}),
    ))
}

/// A refund event (a duplicate payment's refund settling), or an event payretry ignores.
async fn refund(state: &AppState, body: &[u8]) -> Result<Json<Value>, ApiError> {
    let parsed = refund_event::parse(body).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    let Some(event) = parsed else {
        return Ok(Json(json!({"received": true, "effect": "ignored"})));
    };
    let effect = state.payments.apply_refund_event(&event).await?;
    tracing::info!(event_id = %event.id, refund_id = %event.refund_id, ?effect, "refund webhook applied");
    Ok(Json(
        json!({"received": true, "effect": format!("{effect:?}")}),
    ))
}
