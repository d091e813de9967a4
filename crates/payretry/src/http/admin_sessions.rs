//! `GET /admin/sessions` (DESIGN.md §3, §6c): payment sessions for support and admins, newest
//! first, optionally one buyer's or those in one status, one page at a time.

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::pagination::{self, SessionPageParams, SessionPageQuery};
use crate::service::views::StatusView;
use crate::storage::{SessionFilter, SessionRecord};
use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::routing::get;
use chrono::{DateTime, Utc};
use payretry_domain::{RetryPolicy, Role, SessionStatus, UserId};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

pub fn router() -> Router<AppState> {
    Router::new().route("/admin/sessions", get(list))
}

/// The longest buyer id the filter takes.
const MAX_BUYER_CHARS: usize = 255;

/// A session as an operator sees it: the status object, with whose it is and when it began.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminSessionView {
    #[serde(flatten)]
    pub status: StatusView,
    /// The buyer's user id (the `sub` of the token that created the session).
    #[schema(example = "buyer-1")]
    pub buyer: String,
    pub created_at: DateTime<Utc>,
}

impl AdminSessionView {
    fn of(session: &SessionRecord, policy: &RetryPolicy, now: DateTime<Utc>) -> Self {
        Self {
            status: StatusView::of(session, policy, now),
            buyer: session.buyer.to_string(),
            created_at: session.created_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminSessionsView {
    pub sessions: Vec<AdminSessionView>,
    /// Pass as `cursor` for the next page; null on the last page. Opaque.
    pub next_cursor: Option<String>,
}

/// Which sessions to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SessionParams {
    /// Only this buyer's sessions: the buyer's user id, exactly (1 to 255 characters).
    #[param(min_length = 1, max_length = 255)]
    pub buyer: Option<String>,
    /// Only sessions stored in this status. A session whose window has passed but which the
    /// window sweeper has not expired yet is listed under its stored status (`open`, `failed`
    /// or `retry_scheduled`), while its status object already reads `expired`.
    #[param(pattern = "^(open|failed|retry_scheduled|processing|succeeded|expired)$")]
    pub status: Option<String>,
}

impl SessionParams {
    fn filter(&self) -> Result<SessionFilter, ApiError> {
        let buyer = match self.buyer.as_deref() {
            None => None,
            Some(raw) if (1..=MAX_BUYER_CHARS).contains(&raw.chars().count()) => {
                Some(UserId::new(raw))
            }
            Some(_) => {
                return Err(ApiError::InvalidRequest(format!(
                    "`buyer` must be a buyer's user id of 1 to {MAX_BUYER_CHARS} characters"
                )));
            }
        };
        let status = match self.status.as_deref() {
            None => None,
            Some(raw) => Some(raw.parse::<SessionStatus>().map_err(|_| {
                ApiError::InvalidRequest(
                    "`status` must be `open`, `failed`, `retry_scheduled`, `processing`, `succeeded` or `expired`"
                        .to_owned(),
                )
            })?),
        };
        Ok(SessionFilter { buyer, status })
    }
}

/// Payment sessions, newest first (by creation time), one page at a time, for support and
/// admins: all of them, one buyer's (`buyer`), or those in one status (`status`), or both.
///
/// `status` filters on the status the session is stored in. A session whose payment window
/// has passed but which the window sweeper has not expired yet is still stored (and listed)
/// under `open`, `failed` or `retry_scheduled`, while its status object already reads
/// `expired` (see `GET /payments/checkout/{sessionId}/status`); `status=expired` lists it once
/// the sweeper has run.
#[utoipa::path(get, path = "/admin/sessions", tag = "admin", operation_id = "list_sessions",
    params(SessionParams, SessionPageParams),
    responses((status = 200, description = "One page of sessions, newest first: each the status object with `buyer` and `createdAt`", body = AdminSessionsView),
        (status = 400, description = "`buyer`, `status`, `limit` or `cursor` is not valid (`invalid_request`)",
            body = super::error::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token (`unauthenticated`)",
            body = super::error::Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only support and admins (`forbidden`)",
            body = super::error::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<SessionParams>, axum::extract::rejection::QueryRejection>,
    page: Result<SessionPageQuery, ApiError>,
) -> Result<Json<AdminSessionsView>, ApiError> {
    caller.require(&[Role::Support, Role::Admin])?;
    let Query(params) = params.map_err(|_| {
        ApiError::InvalidRequest(
            "the query string is malformed (each parameter may appear once)".to_owned(),
        )
    })?;
    let filter = params.filter()?;
    let SessionPageQuery(page) = page?;
    let found = state.payments.sessions(&filter, &page).await?;
    let now = Utc::now();
    let policy = &state.payments.policy;
    Ok(Json(AdminSessionsView {
        sessions: found
            .items
            .iter()
            .map(|session| AdminSessionView::of(session, policy, now))
            .collect(),
        next_cursor: pagination::next_session_cursor(found.next.as_ref()),
    }))
}
