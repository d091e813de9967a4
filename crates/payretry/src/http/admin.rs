//! Dead-letter review for admins.

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use crate::storage::DeadLetter;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use payretry_domain::Role;
use serde::Serialize;
use utoipa::ToSchema;

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
            id: d.id.clone(),
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
}

/// Retry jobs that kept failing.
#[utoipa::path(get, path = "/admin/dead-letters", tag = "admin",
    responses((status = 200, body = DeadLettersView),
        (status = 401, body = super::error::Problem, content_type = "application/problem+json"),
        (status = 403, body = super::error::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<DeadLettersView>, ApiError> {
    caller.require(&[Role::Admin])?;
    let dead = state.payments.dead_letters().await?;
    Ok(Json(DeadLettersView {
        dead_letters: dead.iter().map(DeadLetterView::from).collect(),
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
    let dead = state.payments.redrive(&id, admin).await?;
    Ok((StatusCode::ACCEPTED, Json(DeadLetterView::from(&dead))))
}
