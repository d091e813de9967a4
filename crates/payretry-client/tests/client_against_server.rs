//! `Client` and the retry use case against a real local HTTP server: an axum fake of the
//! payretry API bound to 127.0.0.1:0 that records the headers it receives, answers with
//! contract-shaped bodies, and keeps idempotency records like the real service.

use axum::extract::{Path, Query, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use payretry_client::schedule_payment_retry::{Backoff, SchedulePaymentRetry, TokioSleeper};
use payretry_client::{ApiErrorCode, Client, ClientError, CreateCheckout};
use payretry_domain::{
    Amount, AttemptNumber, AuditAction, Currency, IdempotencyKey, PaymentSessionId, SessionStatus,
};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TOKEN: &str = "test.jwt.token";

// ---------------------------------------------------------------- the fake server

/// One request as the fake saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: Option<String>,
    authorization: Option<String>,
    idempotency_key: Option<String>,
}

#[derive(Default)]
struct FakeState {
    seen: Vec<Seen>,
    checkout_bodies: Vec<Value>,
    /// Retries actually scheduled: what a duplicate must never increase.
    attempts_spent: u32,
    /// Idempotency records: key → the stored 202 body.
    stored: HashMap<String, Value>,
    /// When set, the first retry is scheduled and stored, but its answer is held this long
    /// (longer than the client's timeout): the answer is lost, the side effect is not.
    stall_first_retry: Option<Duration>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().seen.clone()
    }

    fn seen_at(&self, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.path == path).collect()
    }

    fn attempts_spent(&self) -> u32 {
        self.0.lock().unwrap().attempts_spent
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| v.to_str().unwrap_or("<non-ascii>").to_owned())
}

/// Records every request, then enforces the bearer token like the real service.
async fn record_and_authenticate(
    State(fake): State<Fake>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let seen = Seen {
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
        query: request.uri().query().map(str::to_owned),
        authorization: header(headers, "authorization"),
        idempotency_key: header(headers, "idempotency-key"),
    };
    let authorized = seen.authorization.as_deref() == Some(&format!("Bearer {TOKEN}"));
    fake.0.lock().unwrap().seen.push(seen);
    if !authorized {
        return problem(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "Unauthenticated",
            "A valid bearer token is required.",
        );
    }
    next.run(request).await
}

fn problem(status: StatusCode, code: &str, title: &str, detail: &str) -> Response {
    let body = json!({
        "type": "about:blank", "status": status.as_u16(), "code": code,
        "title": title, "detail": detail
    });
    (
        status,
        [(CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

fn status_body(session_id: &str, status: &str, amount: i64, currency: &str) -> Value {
    let failed = status == "failed";
    json!({
        "sessionId": session_id, "status": status, "amount": amount, "currency": currency,
        "failureReason": if failed { json!("insufficient_funds") } else { Value::Null },
        "retryAttempts": 0, "maxRetryAttempts": 3, "retryAttemptsRemaining": 3,
        "retryAvailable": failed,
        "retryUnavailableReason": if failed { Value::Null } else { json!("payment_not_failed") },
        "nextRetryAt": null, "lastRetryAt": null, "expiresAt": "2027-01-16T08:00:00Z",
        "checkoutUrl": "http://127.0.0.1/sandbox/checkout/cs_0", "providerSessionId": "cs_0"
    })
}

async fn create_checkout(State(fake): State<Fake>, Json(body): Json<Value>) -> Response {
    fake.0.lock().unwrap().checkout_bodies.push(body.clone());
    let amount = body["amount"].as_i64().unwrap();
    let currency = body["currency"].as_str().unwrap();
    let status = status_body("ps_new", "open", amount, currency);
    (StatusCode::CREATED, Json(status)).into_response()
}

async fn status(Path(id): Path<String>) -> Response {
    match id.as_str() {
        "ps_missing" => problem(
            StatusCode::NOT_FOUND,
            "session_not_found",
            "Session not found",
            "No payment session with this id is visible to you.",
        ),
        // A load balancer's page, not the contract's problem+json.
        "ps_gateway" => (
            StatusCode::BAD_GATEWAY,
            [(CONTENT_TYPE, "text/html")],
            "<html><body>502 Bad Gateway</body></html>",
        )
            .into_response(),
        _ => Json(status_body(&id, "failed", 2500, "usd")).into_response(),
    }
}

async fn retry(State(fake): State<Fake>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let Some(key) = header(&headers, "idempotency-key") else {
        return problem(
            StatusCode::BAD_REQUEST,
            "idempotency_key_missing",
            "Idempotency-Key missing",
            "POST /payments/retry requires an Idempotency-Key header.",
        );
    };
    if id == "ps_exhausted" {
        return problem(
            StatusCode::CONFLICT,
            "retry_limit_reached",
            "Retry limit reached",
            "No retries are left for this payment.",
        );
    }
    let (body, stall) = {
        let mut state = fake.0.lock().unwrap();
        if let Some(stored) = state.stored.get(&key) {
            let replay = [("Idempotent-Replayed", "true")];
            return (StatusCode::ACCEPTED, replay, Json(stored.clone())).into_response();
        }
        state.attempts_spent += 1;
        let attempt = state.attempts_spent;
        let body = json!({
            "sessionId": id, "attemptNumber": attempt, "delaySeconds": 60, "delayMinutes": 1,
            "scheduledFor": "2027-01-15T08:01:00Z", "retryAttemptsRemaining": 3 - attempt
        });
        state.stored.insert(key, body.clone());
        (body, state.stall_first_retry.take())
    };
    if let Some(stall) = stall {
        tokio::time::sleep(stall).await;
    }
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

/// The audit log in two pages, as the service pages it: the first ends with a cursor.
async fn audit(
    Path(_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Json<Value> {
    match query.get("cursor").map(String::as_str) {
        None => Json(json!({"entries": [
            {"at": "2027-01-15T08:00:00Z", "action": "checkout_created", "attemptNumber": 0, "actor": "buyer-1:buyer", "details": {}},
            {"at": "2027-01-15T08:00:30Z", "action": "payment_failed", "attemptNumber": 0, "actor": "provider", "details": {"failureReason": "insufficient_funds"}}
        ], "nextCursor": "v1.2"})),
        Some("v1.2") => Json(json!({"entries": [
            {"at": "2027-01-15T08:01:00Z", "action": "retry_requested", "attemptNumber": 1, "actor": "buyer-1:buyer", "details": {"delayMinutes": 1}}
        ], "nextCursor": null})),
        Some(_) => Json(json!({"entries": [], "nextCursor": null})),
    }
}

fn app(fake: Fake) -> Router {
    Router::new()
        .route("/payments/checkout", post(create_checkout))
        .route("/payments/checkout/{id}/status", get(status))
        .route("/payments/retry/{id}", post(retry))
        .route("/payments/checkout/{id}/audit", get(audit))
        .layer(middleware::from_fn_with_state(
            fake.clone(),
            record_and_authenticate,
        ))
        .with_state(fake)
}

/// Serves `router` on 127.0.0.1:0 for the rest of the test.
async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

async fn spawn_fake() -> (Fake, Client) {
    let fake = Fake::default();
    let addr = serve(app(fake.clone())).await;
    let client = Client::new(&format!("http://{addr}"), TOKEN).unwrap();
    (fake, client)
}

fn id(raw: &str) -> PaymentSessionId {
    PaymentSessionId::parse(raw).unwrap()
}

// ---------------------------------------------------------------- Client

#[tokio::test]
async fn status_sends_the_bearer_token_and_reads_the_status_object() {
    let (fake, client) = spawn_fake().await;

    let status = client.status(&id("ps_abc")).await.unwrap();

    assert_eq!(status.session_id, id("ps_abc"));
    assert_eq!(status.status, SessionStatus::Failed);
    assert!(status.retry_available);
    assert_eq!(status.retry_attempts_remaining, 3);
    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path, "/payments/checkout/ps_abc/status");
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer test.jwt.token")
    );
    assert_eq!(seen[0].idempotency_key, None);
}

#[tokio::test]
async fn create_checkout_posts_the_contract_body_with_an_optional_key() {
    let (fake, client) = spawn_fake().await;
    let mut request =
        CreateCheckout::new(Amount::new(2500).unwrap(), Currency::parse("usd").unwrap());
    request.description = Some("Order 123".into());
    request.metadata.insert("orderId".into(), "123".into());
    let key = IdempotencyKey::parse("checkout-form-1").unwrap();

    let status = client.create_checkout(&request, Some(&key)).await.unwrap();

    assert_eq!(status.status, SessionStatus::Open);
    assert_eq!(status.amount, Amount::new(2500).unwrap());
    assert!(!status.retry_available);
    let body = fake.0.lock().unwrap().checkout_bodies[0].clone();
    assert_eq!(
        body,
        json!({"amount": 2500, "currency": "usd", "description": "Order 123", "metadata": {"orderId": "123"}})
    );
    let seen = fake.seen_at("/payments/checkout");
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].idempotency_key.as_deref(), Some("checkout-form-1"));
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer test.jwt.token")
    );

    client.create_checkout(&request, None).await.unwrap();
    assert_eq!(fake.seen_at("/payments/checkout")[1].idempotency_key, None);
}

#[tokio::test]
async fn retry_sends_the_idempotency_key_and_reads_the_202() {
    let (fake, client) = spawn_fake().await;
    let key = IdempotencyKey::parse("press-1").unwrap();

    let retry = client.retry(&id("ps_abc"), &key).await.unwrap();

    assert_eq!(retry.session_id, id("ps_abc"));
    assert_eq!(retry.attempt_number, AttemptNumber::new(1));
    assert_eq!(retry.delay_seconds, 60);
    assert_eq!(retry.delay_minutes, 1.0);
    assert_eq!(retry.retry_attempts_remaining, 2);
    let seen = fake.seen_at("/payments/retry/ps_abc");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].idempotency_key.as_deref(), Some("press-1"));
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer test.jwt.token")
    );
}

#[tokio::test]
async fn a_problem_refusal_becomes_an_api_error_with_its_code() {
    let (_fake, client) = spawn_fake().await;
    let key = IdempotencyKey::parse("press-1").unwrap();

    let error = client.retry(&id("ps_exhausted"), &key).await.unwrap_err();

    let ClientError::Api {
        status,
        code,
        detail,
    } = &error
    else {
        panic!("expected an API error, got {error:?}");
    };
    assert_eq!(*status, 409);
    assert_eq!(*code, ApiErrorCode::RetryLimitReached);
    assert_eq!(detail, "No retries are left for this payment.");
    assert!(!error.is_transient(), "a refusal is final");
}

#[tokio::test]
async fn an_unknown_session_is_session_not_found() {
    let (_fake, client) = spawn_fake().await;

    let error = client.status(&id("ps_missing")).await.unwrap_err();

    assert!(matches!(
        error,
        ClientError::Api {
            status: 404,
            code: ApiErrorCode::SessionNotFound,
            ..
        }
    ));
}

#[tokio::test]
async fn a_wrong_token_is_unauthenticated() {
    let fake = Fake::default();
    let addr = serve(app(fake.clone())).await;
    let client = Client::new(&format!("http://{addr}"), "someone.elses.token").unwrap();

    let error = client.status(&id("ps_abc")).await.unwrap_err();

    assert!(matches!(
        error,
        ClientError::Api {
            status: 401,
            code: ApiErrorCode::Unauthenticated,
            ..
        }
    ));
    assert_eq!(
        fake.seen()[0].authorization.as_deref(),
        Some("Bearer someone.elses.token")
    );
}

#[tokio::test]
async fn a_gateway_page_is_a_transient_decode_error() {
    let (_fake, client) = spawn_fake().await;

    let error = client.status(&id("ps_gateway")).await.unwrap_err();

    assert!(
        matches!(error, ClientError::Decode { status: 502, .. }),
        "{error:?}"
    );
    assert!(error.is_transient());
}

#[tokio::test]
async fn an_unreachable_server_is_a_transient_transport_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = Client::new(&format!("http://{addr}"), TOKEN).unwrap();

    let error = client.status(&id("ps_abc")).await.unwrap_err();

    assert!(matches!(error, ClientError::Transport(_)), "{error:?}");
    assert!(error.is_transient());
}

#[tokio::test]
async fn audit_reads_the_entries_oldest_first() {
    let (fake, client) = spawn_fake().await;

    let log = client.audit(&id("ps_abc")).await.unwrap();

    let actions: Vec<AuditAction> = log.entries.iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        [
            AuditAction::CheckoutCreated,
            AuditAction::PaymentFailed,
            AuditAction::RetryRequested
        ]
    );
    assert_eq!(log.entries[2].attempt_number, Some(AttemptNumber::new(1)));
    assert_eq!(log.entries[1].actor, "provider");
    assert_eq!(log.next_cursor, None);
    let seen = fake.seen();
    assert_eq!(seen.len(), 2, "both pages were read");
    assert_eq!(seen[0].path, "/payments/checkout/ps_abc/audit");
    assert_eq!(seen[0].query.as_deref(), Some("limit=100"));
    assert_eq!(seen[1].path, "/payments/checkout/ps_abc/audit");
    assert_eq!(seen[1].query.as_deref(), Some("limit=100&cursor=v1.2"));
}

#[tokio::test]
async fn audit_page_reads_one_page_and_its_cursor() {
    let (fake, client) = spawn_fake().await;

    let first = client.audit_page(&id("ps_abc"), None, None).await.unwrap();
    let next = first.next_cursor.clone().expect("a next page");
    let last = client
        .audit_page(&id("ps_abc"), Some(2), Some(&next))
        .await
        .unwrap();

    assert_eq!(first.entries.len(), 2);
    assert_eq!(last.entries.len(), 1);
    assert_eq!(last.next_cursor, None);
    let queries: Vec<Option<String>> = fake.seen().into_iter().map(|s| s.query).collect();
    assert_eq!(queries, [None, Some("limit=2&cursor=v1.2".to_owned())]);
}

#[tokio::test]
async fn a_base_url_with_a_path_prefix_is_kept() {
    let fake = Fake::default();
    let addr = serve(Router::new().nest("/api", app(fake.clone()))).await;
    let client = Client::new(&format!("http://{addr}/api/"), TOKEN).unwrap();

    client.status(&id("ps_abc")).await.unwrap();

    assert_eq!(fake.seen()[0].path, "/payments/checkout/ps_abc/status");
}

// ---------------------------------------------------------------- the use case over HTTP

#[tokio::test]
async fn a_lost_answer_is_asked_again_with_the_same_key_and_spends_one_attempt() {
    let fake = Fake::default();
    fake.0.lock().unwrap().stall_first_retry = Some(Duration::from_secs(5));
    let addr = serve(app(fake.clone())).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let client = Client::with_http_client(http, &format!("http://{addr}"), TOKEN).unwrap();
    let backoff = Backoff {
        max_tries: 3,
        first_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
    };
    let use_case = SchedulePaymentRetry::with(client, TokioSleeper, backoff);

    let first = use_case.press(&id("ps_abc")).await;

    // The first try timed out after the server had scheduled the retry; the second, with
    // the same key, got the stored answer back.
    let retry = first.result.unwrap();
    assert_eq!(retry.attempt_number, AttemptNumber::new(1));
    assert_eq!(fake.attempts_spent(), 1);
    let keys: Vec<Option<String>> = fake
        .seen_at("/payments/retry/ps_abc")
        .into_iter()
        .map(|s| s.idempotency_key)
        .collect();
    let first_key = Some(first.idempotency_key.as_str().to_owned());
    assert_eq!(keys, [first_key.clone(), first_key.clone()]);

    // A new press is a new request: a new key, a new attempt.
    let second = use_case.press(&id("ps_abc")).await;

    assert_ne!(second.idempotency_key, first.idempotency_key);
    assert_eq!(second.result.unwrap().attempt_number, AttemptNumber::new(2));
    assert_eq!(fake.attempts_spent(), 2);
    let seen = fake.seen_at("/payments/retry/ps_abc");
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[2].idempotency_key.as_deref(),
        Some(second.idempotency_key.as_str())
    );
}

#[tokio::test]
async fn a_refusal_over_http_is_not_retried() {
    let (fake, client) = spawn_fake().await;
    let use_case = SchedulePaymentRetry::new(client);

    let outcome = use_case.press(&id("ps_exhausted")).await;

    assert!(matches!(
        outcome.result,
        Err(ClientError::Api {
            code: ApiErrorCode::RetryLimitReached,
            ..
        })
    ));
    assert_eq!(fake.seen_at("/payments/retry/ps_exhausted").len(), 1);
}
