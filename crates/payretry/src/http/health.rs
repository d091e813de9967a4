//! Liveness, readiness and metrics.

use super::AppState;
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{Value, json};

/// Liveness, readiness and metrics, served by every process.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// How long `/readyz` waits for the database and queue to answer.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200)))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// The process can reach its database and queue.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200), (status = 503)))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    // A database that is down makes a pool wait for a connection; a load balancer needs its
    // answer now, so no answer within a second counts as unreachable.
    let checks = async {
        state
            .payments
            .storage
            .ping()
            .await
            .map_err(|e| e.to_string())?;
        state.queue.ping().await.map_err(|e| e.to_string())
    };
    let reachable = match tokio::time::timeout(READY_TIMEOUT, checks).await {
        Ok(result) => result,
        Err(_) => Err("readiness check timed out".to_owned()),
    };
    match reachable {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ready"}))),
        Err(error) => {
            tracing::warn!(%error, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable"})),
            )
        }
    }
}

/// Prometheus text exposition (metric names with dots as underscores).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
}
