//! A local HTTP server standing in for Segment's `/v1/batch`, recording what it receives
//! and able to fail on demand.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::Value;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct Call {
    pub authorization: Option<String>,
    pub body: Value,
    pub accepted: bool,
}

#[derive(Default)]
struct Shared {
    /// Every batch call: its Authorization header, body, and whether it was accepted.
    calls: Mutex<Vec<Call>>,
    /// How many upcoming calls answer 500.
    failures_left: Mutex<usize>,
}

pub struct FakeSegment {
    shared: Arc<Shared>,
    pub base_url: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeSegment {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn batch(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> StatusCode {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut failures = shared.failures_left.lock().unwrap();
    let accepted = *failures == 0;
    *failures = failures.saturating_sub(1);
    shared.calls.lock().unwrap().push(Call {
        authorization: auth,
        body,
        accepted,
    });
    if accepted {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}

impl FakeSegment {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/v1/batch", post(batch))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            shared,
            base_url,
            server,
        }
    }

    /// The next `n` calls answer 500.
    pub fn fail_next(&self, n: usize) {
        *self.shared.failures_left.lock().unwrap() = n;
    }

    /// Every call received, accepted or not.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.lock().unwrap().clone()
    }

    /// The events of the accepted calls, in order.
    pub fn accepted_events(&self) -> Vec<Value> {
        self.calls()
            .iter()
            .filter(|c| c.accepted)
            .flat_map(|c| c.body["batch"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}
