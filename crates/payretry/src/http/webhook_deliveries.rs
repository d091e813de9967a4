//! Merchant webhook deliveries for admins (DESIGN.md §3): list them, and redeliver one.

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::pagination::{self, PageParams, PageQuery};
use crate::storage::{DeliveryFilter, DeliveryStatus, WebhookDelivery};
use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use payretry_domain::{DeliveryId, PaymentSessionId, Role};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/webhook-deliveries", get(list))
        .route("/admin/webhook-deliveries/{id}/redeliver", post(redeliver))
}

/// One merchant event and where its delivery stands.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryView {
    pub id: String,
    /// The `webhook-id` every delivery of this event carries (the receiver's idempotency key).
    pub event_id: String,
    /// `payment_session.failed`, `.retry_scheduled`, `.retry_ready`, `.succeeded`, `.expired`,
    /// `.retry_abandoned` or `.double_payment`.
    #[serde(rename = "type")]
    pub event_type: String,
    pub payment_session_id: String,
    /// The event's `sequence` in its session.
    pub sequence: i64,
    /// `pending` (waiting for a try), `delivered`, or `failed` (the schedule ran out: an admin
    /// may redeliver it).
    #[schema(example = "failed")]
    pub status: String,
    /// Tries made so far.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// When the next try is due; null unless `pending`.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

impl From<&WebhookDelivery> for DeliveryView {
    fn from(d: &WebhookDelivery) -> Self {
        Self {
            id: d.id.to_string(),
            event_id: d.event_id.clone(),
            event_type: d.event_type.clone(),
            payment_session_id: d.session_id.to_string(),
            sequence: d.sequence,
            status: d.status.as_str().to_owned(),
            attempts: d.attempts,
            last_error: d.last_error.clone(),
            next_attempt_at: d.next_attempt_at,
            created_at: d.created_at,
            delivered_at: d.delivered_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveriesView {
    pub deliveries: Vec<DeliveryView>,
    /// Pass as `cursor` for the next page; null on the last page. Opaque.
    pub next_cursor: Option<String>,
}

/// Which deliveries to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryParams {
    /// `pending`, `delivered` or `failed`.
    #[param(pattern = "^(pending|delivered|failed)$")]
    pub status: Option<String>,
    /// Only this session's deliveries.
    #[param(pattern = "^ps_[A-Za-z0-9_]{1,64}$")]
    pub session_id: Option<String>,
}

impl DeliveryParams {
    fn filter(&self) -> Result<DeliveryFilter, ApiError> {
        let status = match self.status.as_deref() {
            None => None,
            Some(raw) => Some(DeliveryStatus::parse(raw).ok_or_else(|| {
                ApiError::InvalidRequest(
                    "`status` must be `pending`, `delivered` or `failed`".to_owned(),
                )
            })?),
        };
        let session = match self.session_id.as_deref() {
            None => None,
            Some(raw) => Some(PaymentSessionId::parse(raw).map_err(|_| {
                ApiError::InvalidRequest("`sessionId` is not a payment session id".to_owned())
            })?),
        };
        Ok(DeliveryFilter { status, session })
    }
}

/// Merchant webhook deliveries, oldest first, one page at a time.
#[utoipa::path(get, path = "/admin/webhook-deliveries", tag = "admin",
    operation_id = "list_webhook_deliveries",
    params(DeliveryParams, PageParams),
    responses((status = 200, description = "One page of deliveries", body = DeliveriesView),
        (status = 400, description = "`status`, `sessionId`, `limit` or `cursor` is not valid (`invalid_request`)",
            body = super::error::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token (`unauthenticated`)",
            body = super::error::Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only admins (`forbidden`)",
            body = super::error::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<DeliveryParams>, axum::extract::rejection::QueryRejection>,
    page: Result<PageQuery, ApiError>,
) -> Result<Json<DeliveriesView>, ApiError> {
    caller.require(&[Role::Admin])?;
    let Query(params) = params.map_err(|_| {
        ApiError::InvalidRequest(
            "the query string is malformed (each parameter may appear once)".to_owned(),
        )
    })?;
    let filter = params.filter()?;
    let PageQuery(page) = page?;
    let found = state.payments.webhook_deliveries(&filter, page).await?;
    Ok(Json(DeliveriesView {
        deliveries: found.items.iter().map(DeliveryView::from).collect(),
        next_cursor: pagination::next_cursor(found.next),
    }))
}

/// Queue a delivery again, at once, with the same `webhook-id` and body: a `failed` one (or a
/// `delivered` one the receiver lost) gets one more try; a `pending` one is already queued and
/// is left as it is.
#[utoipa::path(post, path = "/admin/webhook-deliveries/{id}/redeliver", tag = "admin",
    operation_id = "redeliver_webhook",
    params(("id" = String, Path, description = "The delivery's `id`")),
    responses((status = 202, description = "Queued; the delivery as it now stands", body = DeliveryView),
        (status = 401, description = "No valid token (`unauthenticated`)",
            body = super::error::Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only admins (`forbidden`)",
            body = super::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such delivery (`delivery_not_found`)",
            body = super::error::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn redeliver(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DeliveryView>), ApiError> {
    let admin = caller.require(&[Role::Admin])?;
    // A malformed id names no delivery: the same 404 as an unknown one.
    let id = DeliveryId::parse(&id).map_err(|_| ApiError::DeliveryNotFound)?;
    let delivery = state.payments.redeliver_webhook(id, admin).await?;
    Ok((StatusCode::ACCEPTED, Json(DeliveryView::from(&delivery))))
}
