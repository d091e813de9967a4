//! Dead-letter review for admins, and double payments for support.

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::pagination::{self, PageParams, PageQuery};
use crate::storage::{DeadLetter, DuplicatePayment, DuplicatePaymentStatus};
use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use payretry_domain::{DeadLetterId, Role};
use serde::Serialize;
use utoipa::ToSchema;

/// The admin routes: dead letters and double payments.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/dead-letters", get(list))
        .route("/admin/dead-letters/{id}/redrive", post(redrive))
        .route("/admin/duplicate-payments", get(duplicate_payments))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    pub id: String,
    pub payment_session_id: String,
    pub attempt_number: u32,
    pub receive_count: u32,
    pub last_error: String,
    pub dead_at: chrono::DateTime<chrono::Utc>,
}

impl From<&DeadLetter> for DeadLetterView {
    fn from(d: &DeadLetter) -> Self {
        Self {
            id: d.id.to_string(),
            payment_session_id: d.job.payment_session_id.to_string(),
            attempt_number: d.job.attempt_number.get(),
            receive_count: d.receive_count,
            last_error: d.last_error.clone(),
            dead_at: d.dead_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLettersView {
    pub dead_letters: Vec<DeadLetterView>,
    /// Pass as `cursor` for the next page; null on the last page. Opaque.
    pub next_cursor: Option<String>,
}

/// Retry jobs that kept failing, oldest first, one page at a time.
#[utoipa::path(get, path = "/admin/dead-letters", tag = "admin",
    params(PageParams),
    responses((status = 200, body = DeadLettersView),
        (status = 400, description = "`limit` or `cursor` is not valid (`invalid_request`)",
            body = super::error::Problem, content_type = "application/problem+json"),
        (status = 401, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 403, body = super::error::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    page: Result<PageQuery, ApiError>,
) -> Result<Json<DeadLettersView>, ApiError> {
    caller.require(&[Role::Admin])?;
    let PageQuery(page) = page?;
    let dead = state.payments.dead_letters(page).await?;
    Ok(Json(DeadLettersView {
        dead_letters: dead.items.iter().map(DeadLetterView::from).collect(),
        next_cursor: pagination::next_cursor(dead.next),
    }))
}

/// Queue a dead-lettered retry again.
#[utoipa::path(post, path = "/admin/dead-letters/{id}/redrive", tag = "admin",
    params(("id" = String, Path)),
    responses((status = 202, body = DeadLetterView),
        (status = 401, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 403, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 404, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 409, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 410, body = super::error::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn redrive(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DeadLetterView>), ApiError> {
    let admin = caller.require(&[Role::Admin])?;
    // A malformed id names no dead letter: the same 404 as an unknown one.
    let id = DeadLetterId::parse(&id).map_err(|_| ApiError::DeadLetterNotFound)?;
    let dead = state.payments.redrive(id, admin).await?;
    Ok((StatusCode::ACCEPTED, Json(DeadLetterView::from(&dead))))
}

/// A session paid through two checkouts: who was charged twice and where the refund stands.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DuplicatePaymentView {
    pub id: String,
    pub payment_session_id: String,
    /// The attempt whose payment stands.
    pub paid_attempt: u32,
    /// The attempt whose checkout was paid as well.
    pub duplicate_attempt: u32,
    /// The duplicate charge's payment intent (`pi_…`), for finding it at the provider.
    pub payment_intent: Option<String>,
    pub status: DuplicatePaymentStatusView,
    pub detected_at: chrono::DateTime<chrono::Utc>,
    /// When the status (or the record) last changed.
    pub updated_at: chrono::DateTime<chrono::Utc>,
    /// The provider's refund id, once the provider took the refund (`refund_pending` and
    /// later).
    pub refund_id: Option<String>,
    /// Why the refund failed, when it did.
    pub last_error: Option<String>,
    /// The provider's reason for a failed refund (Stripe's `failure_reason`, e.g.
    /// `expired_or_canceled_card`), when it gave one.
    pub failure_reason: Option<String>,
}

/// Where a double payment's refund stands.
///
/// - `detected`: recorded for support; no automatic refund (off, or no charge to refund).
/// - `refund_requested`: a refund is owed; payretry is making it (or will retry it).
/// - `refund_pending`: the provider took the refund but has not settled it (Stripe `pending`
///   or `requires_action`); no money moved yet.
/// - `refunded`: the provider says the refund succeeded.
/// - `refund_failed`: the provider refused the refund, or it failed or was canceled
///   (`failureReason`, `lastError`): support must act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DuplicatePaymentStatusView {
    Detected,
    RefundRequested,
    RefundPending,
    Refunded,
    RefundFailed,
}

impl From<DuplicatePaymentStatus> for DuplicatePaymentStatusView {
    fn from(status: DuplicatePaymentStatus) -> Self {
        match status {
            DuplicatePaymentStatus::Detected => Self::Detected,
            DuplicatePaymentStatus::RefundRequested => Self::RefundRequested,
            DuplicatePaymentStatus::RefundPending => Self::RefundPending,
            DuplicatePaymentStatus::Refunded => Self::Refunded,
            DuplicatePaymentStatus::RefundFailed => Self::RefundFailed,
        }
    }
}

impl From<&DuplicatePayment> for DuplicatePaymentView {
    fn from(d: &DuplicatePayment) -> Self {
        Self {
            id: d.id.clone(),
            payment_session_id: d.session_id.to_string(),
            paid_attempt: d.paid_attempt.get(),
            duplicate_attempt: d.duplicate_attempt.get(),
            payment_intent: d.payment_intent.clone(),
            status: d.status.into(),
            detected_at: d.detected_at,
            updated_at: d.updated_at,
            refund_id: d.refund_id.clone(),
            last_error: d.last_error.clone(),
            failure_reason: d.failure_reason.clone(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DuplicatePaymentsView {
    pub duplicate_payments: Vec<DuplicatePaymentView>,
    /// Pass as `cursor` for the next page; null on the last page. Opaque.
    pub next_cursor: Option<String>,
}

/// Buyers charged twice (a late payment of an older checkout), oldest first, one page at a
/// time, each with where its refund stands (`status`): a `refund_pending` refund is not done
/// yet, a `refund_failed` one needs support (`failureReason`, `lastError`).
#[utoipa::path(get, path = "/admin/duplicate-payments", tag = "admin",
    params(PageParams),
    responses((status = 200, body = DuplicatePaymentsView),
        (status = 400, description = "`limit` or `cursor` is not valid (`invalid_request`)",
            body = super::error::Problem, content_type = "application/problem+json"),
        (status = 401, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 403, body = super::error::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn duplicate_payments(
    State(state): State<AppState>,
    caller: Caller,
    page: Result<PageQuery, ApiError>,
) -> Result<Json<DuplicatePaymentsView>, ApiError> {
    caller.require(&[Role::Support, Role::Admin])?;
    let PageQuery(page) = page?;
    let duplicates = state.payments.duplicate_payments(page).await?;
    Ok(Json(DuplicatePaymentsView {
        duplicate_payments: duplicates
            .items
            .iter()
            .map(DuplicatePaymentView::from)
            .collect(),
        next_cursor: pagination::next_cursor(duplicates.next),
    }))
}
