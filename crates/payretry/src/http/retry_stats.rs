//! `GET /admin/stats/retries` (DESIGN.md §3, §6c): the retry funnel, for support and admins.

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use crate::service::funnel::{self, RetryFunnel};
use crate::service::now_millis;
use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::routing::get;
use payretry_domain::Role;
use serde::Deserialize;
use utoipa::IntoParams;

pub fn router() -> Router<AppState> {
    Router::new().route("/admin/stats/retries", get(retries))
}

/// Which period the funnel covers.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FunnelParams {
    /// Where the period starts: a duration back from now, from `1m` to `31d`, in minutes,
    /// hours or days (`90m`, `24h`, `7d`), or an RFC 3339 time no more than 31 days ago and
    /// not in the future (percent-encode a `+` offset, or use `Z`). `24h` when absent. The
    /// pattern documents the durations (each one the server accepts); a time is accepted
    /// besides, when it lies in the last 31 days.
    #[param(
        example = "7d",
        pattern = "^(?:[1-9][0-9]{0,3}m|[1-9][0-9]?h|[1-6][0-9]{2}h|[1-9]d|[12][0-9]d|3[01]d)$"
    )]
    pub since: Option<String>,
}

/// The retry funnel: of the retries accepted from `since` until now, per attempt number, how
/// many got a provider checkout, were paid, failed again, were abandoned (the window closed
/// before their checkout), were dead-lettered, or are still in progress (scheduled, with a
/// checkout open, or with a payment settling), and what the paid ones recovered per currency
/// (the sessions' amounts in minor units; different currencies are never added). A retry is
/// counted in the period in which it was accepted, where it stands now. `totals` adds up every
/// attempt number; an attempt number with no retry in the period is absent from `attempts`.
#[utoipa::path(get, path = "/admin/stats/retries", tag = "admin", operation_id = "retry_funnel",
    params(FunnelParams),
    responses((status = 200, description = "The retry funnel of the period", body = RetryFunnel),
        (status = 400, description = "`since` is not valid (`invalid_request`)",
            body = super::error::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token (`unauthenticated`)",
            body = super::error::Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only support and admins (`forbidden`)",
            body = super::error::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn retries(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<FunnelParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RetryFunnel>, ApiError> {
    caller.require(&[Role::Support, Role::Admin])?;
    let Query(params) = params.map_err(|_| {
        ApiError::InvalidRequest(
            "the query string is malformed (`since` may appear once)".to_owned(),
        )
    })?;
    let until = now_millis();
    let since = funnel::parse_since(params.since.as_deref(), until)
        .map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    Ok(Json(state.payments.retry_funnel(since, until).await?))
}
