//! A stand-in for Stripe's Checkout Sessions API: answers create, retrieve and expire with
//! valid JSON, checks nothing, and records when requests arrived (the drain timeline and the
//! schedule lateness are read from here). By default it answers at once; [`Stub::realistic`]
//! answers as Stripe does under load: after a latency, and with a 429 `rate_limit` (no
//! `Retry-After`) to any request past its limit in the last second.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Stub {
    pub base: String,
    started: Instant,
    creates: AtomicU64,
    retrieves: AtomicU64,
    expires: AtomicU64,
    /// Milliseconds since `started` of every create.
    created_at: Mutex<Vec<u32>>,
    /// First retrieve of a checkout id: wall clock, ms since the epoch.
    first_retrieve: Mutex<HashMap<String, i64>>,
    latency: Duration,
    /// Requests admitted per second before 429s; `None`: no limit.
    limit: Option<usize>,
    admitted: Mutex<VecDeque<Instant>>,
    refused: AtomicU64,
    /// Idempotency keys of the creates, to find a checkout created twice.
    create_keys: Mutex<HashMap<String, u32>>,
}

impl Stub {
    pub async fn start() -> anyhow::Result<Arc<Self>> {
        Self::start_with(Duration::ZERO, None).await
    }

    /// A stub that answers after `latency` and refuses with 429 past `limit` requests a
    /// second.
    pub async fn realistic(latency: Duration, limit: usize) -> anyhow::Result<Arc<Self>> {
        Self::start_with(latency, Some(limit)).await
    }

    async fn start_with(latency: Duration, limit: Option<usize>) -> anyhow::Result<Arc<Self>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let stub = Arc::new(Self {
            base: format!("http://{}", listener.local_addr()?),
            started: Instant::now(),
            creates: AtomicU64::new(0),
            retrieves: AtomicU64::new(0),
            expires: AtomicU64::new(0),
            created_at: Mutex::new(Vec::new()),
            first_retrieve: Mutex::new(HashMap::new()),
            latency,
            limit,
            admitted: Mutex::new(VecDeque::new()),
            refused: AtomicU64::new(0),
            create_keys: Mutex::new(HashMap::new()),
        });
        let router = Router::new()
            .route("/v1/checkout/sessions", post(create))
            .route("/v1/checkout/sessions/{id}", get(retrieve))
            .route("/v1/checkout/sessions/{id}/expire", post(expire))
            .with_state(stub.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(stub)
    }

    pub fn creates(&self) -> u64 {
        self.creates.load(Ordering::Relaxed)
    }

    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.creates.load(Ordering::Relaxed),
            self.retrieves.load(Ordering::Relaxed),
            self.expires.load(Ordering::Relaxed),
        )
    }

    /// Milliseconds since the stub started.
    pub fn now_ms(&self) -> u32 {
        self.started.elapsed().as_millis() as u32
    }

    /// Creates recorded so far (ms since start), and clears the record.
    pub fn take_creates(&self) -> Vec<u32> {
        std::mem::take(&mut *self.created_at.lock().unwrap())
    }

    pub fn take_first_retrieves(&self) -> HashMap<String, i64> {
        std::mem::take(&mut *self.first_retrieve.lock().unwrap())
    }

    /// Requests refused with 429.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Idempotency keys sent with more than one successful create.
    pub fn keys_created_twice(&self) -> usize {
        self.create_keys
            .lock()
            .unwrap()
            .values()
            .filter(|n| **n > 1)
            .count()
    }

    /// Waits out the latency, then admits the request or refuses it for the rate limit.
    async fn admit(&self) -> Option<Response> {
        tokio::time::sleep(self.latency).await;
        let limit = self.limit?;
        let now = Instant::now();
        let mut admitted = self.admitted.lock().unwrap();
        while admitted
            .front()
            .is_some_and(|at| now.duration_since(*at) >= Duration::from_secs(1))
        {
            admitted.pop_front();
        }
        if admitted.len() >= limit {
            self.refused.fetch_add(1, Ordering::Relaxed);
            let body = json!({"error": {"type": "invalid_request_error", "code": "rate_limit",
                "message": "Request rate limit exceeded."}});
            return Some(
                (axum::http::StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response(),
            );
        }
        admitted.push_back(now);
        None
    }

    pub fn reset(&self) {
        self.take_creates();
        self.take_first_retrieves();
    }
}

fn checkout(base: &str, id: &str, status: &str, expires_at: i64) -> Response {
    axum::Json(json!({
        "id": id,
        "object": "checkout.session",
        "url": format!("{base}/pay/{id}"),
        "mode": "payment",
        "status": status,
        "payment_status": "unpaid",
        "expires_at": expires_at,
        "livemode": false,
    }))
    .into_response()
}

async fn create(State(stub): State<Arc<Stub>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = stub.admit().await {
        return refused;
    }
    if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        *stub
            .create_keys
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_insert(0) += 1;
    }
    let n = stub.creates.fetch_add(1, Ordering::Relaxed);
    let at = stub.now_ms();
    stub.created_at.lock().unwrap().push(at);
    let expires_at = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "expires_at")
        .and_then(|(_, v)| v.parse::<i64>().ok())
        .unwrap_or_else(|| chrono::Utc::now().timestamp() + 3600);
    checkout(&stub.base, &format!("cs_test_b{n:x}"), "open", expires_at)
}

async fn retrieve(State(stub): State<Arc<Stub>>, Path(id): Path<String>) -> Response {
    if let Some(refused) = stub.admit().await {
        return refused;
    }
    stub.retrieves.fetch_add(1, Ordering::Relaxed);
    let now = chrono::Utc::now().timestamp_millis();
    stub.first_retrieve
        .lock()
        .unwrap()
        .entry(id.clone())
        .or_insert(now);
    let expires_at = chrono::Utc::now().timestamp() + 3600;
    checkout(&stub.base, &id, "open", expires_at)
}

async fn expire(State(stub): State<Arc<Stub>>, Path(id): Path<String>) -> Response {
    if let Some(refused) = stub.admit().await {
        return refused;
    }
    stub.expires.fetch_add(1, Ordering::Relaxed);
    let expires_at = chrono::Utc::now().timestamp();
    checkout(&stub.base, &id, "expired", expires_at)
}
