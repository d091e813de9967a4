//! The HTTP contract of DESIGN.md §2–§3, through the real server: every error status and
//! code, the problem+json shape, that refused input writes nothing, idempotency, the retry
//! race, the status and retry objects, and the operations routes.

use crate::support::app::{JWT_SECRET, Options, TestApp, WEBHOOK_SECRET, assert_problem};
use chrono::{DateTime, TimeDelta, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use payretry::app::ServeRole;
use payretry_domain::Role;
use reqwest::header::HeaderValue;
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

const MAX_BODY: usize = 64 * 1024;
const UNKNOWN_SESSION: &str = "ps_00000000000000000000000000000000";

/// An app whose retries stay `retry_scheduled` for the whole test (the worker does not
/// pick the job up), so the outbox row can be counted.
async fn app_with_long_delays() -> TestApp {
    TestApp::spawn_with(Options {
        vars: vec![("PAYRETRY_RETRY_DELAYS", "60s".into())],
        ..Default::default()
    })
    .await
}

/// A session of `token`'s buyer whose first checkout was declined for insufficient funds.
async fn failed_session(app: &TestApp, token: &str) -> String {
    let created = app.create_checkout(token).await;
    let id = created["sessionId"].as_str().unwrap().to_owned();
    app.decline(&id, 0, "insufficient_funds").await;
    id
}

/// Row counts of every table a request could write to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Writes {
    sessions: i64,
    idempotency_keys: i64,
    retry_jobs: i64,
    attempts: i64,
    audit: i64,
}

async fn writes(app: &TestApp) -> Writes {
    Writes {
        sessions: app.count("SELECT COUNT(*) FROM payment_sessions").await,
        idempotency_keys: app.count("SELECT COUNT(*) FROM idempotency_keys").await,
        retry_jobs: app.count("SELECT COUNT(*) FROM retry_jobs").await,
        attempts: app.count("SELECT COUNT(*) FROM payment_attempts").await,
        audit: app.count("SELECT COUNT(*) FROM audit_log").await,
    }
}

/// Posts raw bytes as JSON.
async fn post_raw(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> Response {
    let mut request = app
        .http
        .post(app.url(path))
        .header("content-type", "application/json")
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.expect("request")
}

/// Posts a retry with an arbitrary `Idempotency-Key` header value.
async fn retry_with_key_bytes(app: &TestApp, token: &str, id: &str, key: &[u8]) -> Response {
    app.http
        .post(app.url(&format!("/payments/retry/{id}")))
        .bearer_auth(token)
        .header("Idempotency-Key", HeaderValue::from_bytes(key).unwrap())
        .send()
        .await
        .expect("request")
}

async fn get(app: &TestApp, path: &str, token: Option<&str>) -> Response {
    app.request(Method::GET, path, token, None, None).await
}

fn now_secs() -> i64 {
    Utc::now().timestamp()
}

/// An HS-family JWT over arbitrary claims.
fn sign(claims: &Value, algorithm: Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn buyer_claims() -> Value {
    json!({"sub": "buyer-1", "role": "buyer", "exp": now_secs() + 600})
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Every token the contract says is not a valid bearer (DESIGN.md §3: missing, malformed,
/// expired, wrong algorithm or signature), as `Authorization` header values.
fn invalid_authorizations() -> Vec<(&'static str, String)> {
    let valid = sign(&buyer_claims(), Algorithm::HS256, JWT_SECRET);
    let (head, rest) = valid.split_once('.').unwrap();
    let signature = rest.split_once('.').unwrap().1;
    let tampered_claims = base64url(br#"{"sub":"admin-1","role":"admin","exp":4102444800}"#);
    vec![
        ("garbage token", "Bearer not-a-jwt".to_owned()),
        ("three garbage segments", "Bearer aaa.bbb.ccc".to_owned()),
        ("empty bearer", "Bearer ".to_owned()),
        (
            "basic scheme",
            format!("Basic {}", base64url(b"buyer-1:pw")),
        ),
        ("token without scheme", valid.clone()),
        (
            "expired",
            format!(
                "Bearer {}",
                sign(
                    &json!({"sub": "buyer-1", "role": "buyer", "exp": now_secs() - 30}),
                    Algorithm::HS256,
                    JWT_SECRET
                )
            ),
        ),
        (
            "wrong key",
            format!(
                "Bearer {}",
                sign(
                    &buyer_claims(),
                    Algorithm::HS256,
                    "another-secret-that-is-at-least-32-characters"
                )
            ),
        ),
        (
            "alg none",
            format!(
                "Bearer {}.{}.",
                base64url(br#"{"alg":"none","typ":"JWT"}"#),
                base64url(buyer_claims().to_string().as_bytes())
            ),
        ),
        (
            "HS512 with the right key",
            format!(
                "Bearer {}",
                sign(&buyer_claims(), Algorithm::HS512, JWT_SECRET)
            ),
        ),
        (
            "tampered claims",
            format!("Bearer {head}.{tampered_claims}.{signature}"),
        ),
        (
            "missing sub",
            format!(
                "Bearer {}",
                sign(
                    &json!({"role": "buyer", "exp": now_secs() + 600}),
                    Algorithm::HS256,
                    JWT_SECRET
                )
            ),
        ),
        (
            "empty sub",
            format!(
                "Bearer {}",
                sign(
                    &json!({"sub": " ", "role": "buyer", "exp": now_secs() + 600}),
                    Algorithm::HS256,
                    JWT_SECRET
                )
            ),
        ),
        (
            "missing exp",
            format!(
                "Bearer {}",
                sign(
                    &json!({"sub": "buyer-1", "role": "buyer"}),
                    Algorithm::HS256,
                    JWT_SECRET
                )
            ),
        ),
        (
            "missing role",
            format!(
                "Bearer {}",
                sign(
                    &json!({"sub": "buyer-1", "exp": now_secs() + 600}),
                    Algorithm::HS256,
                    JWT_SECRET
                )
            ),
        ),
        (
            "unknown role",
            format!(
                "Bearer {}",
                sign(
                    &json!({"sub": "buyer-1", "role": "root", "exp": now_secs() + 600}),
                    Algorithm::HS256,
                    JWT_SECRET
                )
            ),
        ),
    ]
}

/// The fingerprint of crates/payretry/src/http/idempotency.rs: sha256 hex of
/// "{method} {path}\n{body}".
fn retry_fingerprint(id: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(format!("POST /payments/retry/{id}\n").as_bytes());
    hasher.update(body);
    hex::encode(hasher.finalize())
}

/// Inserts an idempotency record that is still in flight (no response stored yet).
async fn insert_in_flight_key(app: &TestApp, caller: &str, key: &str, fingerprint: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", app.db_path.display()))
        .await
        .unwrap();
    let now = Utc::now().timestamp_millis();
    sqlx::query(
        "INSERT INTO idempotency_keys
            (caller, idempotency_key, fingerprint, response_status, response_body, locked_at, created_at)
         VALUES (?, ?, ?, NULL, NULL, ?, ?)",
    )
    .bind(caller)
    .bind(key)
    .bind(fingerprint)
    .bind(now)
    .bind(now)
    .execute(&mut conn)
    .await
    .unwrap();
}

fn keys_of(object: &Value) -> BTreeSet<String> {
    object.as_object().unwrap().keys().cloned().collect()
}

fn rfc3339_utc(value: &Value) -> DateTime<Utc> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{value} is not a string"));
    assert!(
        text.ends_with('Z') || text.ends_with("+00:00"),
        "{text} is not UTC"
    );
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

/// Nothing internal (SQL, stack, secrets) in a problem body.
fn assert_nothing_internal(problem: &Value) {
    let text = problem.to_string();
    for needle in [
        "sqlx",
        "sqlite",
        "SELECT",
        "INSERT",
        "panicked",
        "src/",
        JWT_SECRET,
        WEBHOOK_SECRET,
    ] {
        assert!(!text.contains(needle), "{needle:?} leaked in {text}");
    }
}

// ---------------------------------------------------------------------------------------
// Operations routes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn healthz_and_readyz_answer_200() {
    let app = TestApp::spawn().await;

    let health = get(&app, "/healthz", None).await;
    let ready = get(&app, "/readyz", None).await;

    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(ready.status(), StatusCode::OK);
}

#[tokio::test]
async fn metrics_answers_200_prometheus_text() {
    let app = TestApp::spawn().await;

    let response = get(&app, "/metrics", None).await;

    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    response.text().await.expect("a text body");
}

#[tokio::test]
async fn openapi_document_lists_every_api_path_of_the_contract() {
    let app = TestApp::spawn().await;

    let response = get(&app, "/openapi.json", None).await;

    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with('3'), "{doc}");
    for (path, method) in [
        ("/payments/checkout", "post"),
        ("/payments/checkout/{sessionId}/status", "get"),
        ("/payments/retry/{sessionId}", "post"),
        ("/payments/checkout/{sessionId}/audit", "get"),
        ("/webhooks/stripe", "post"),
        ("/admin/dead-letters", "get"),
        ("/admin/dead-letters/{id}/redrive", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is missing from /openapi.json"
        );
    }
}

#[tokio::test]
async fn unknown_route_is_a_404_problem() {
    let app = TestApp::spawn().await;

    let response = get(&app, "/no/such/route", Some(&app.buyer())).await;

    let problem = assert_problem(response, 404, "not_found").await;
    assert_nothing_internal(&problem);
}

#[tokio::test]
async fn wrong_method_on_a_known_route_is_a_problem() {
    let app = TestApp::spawn().await;

    let response = get(&app, "/payments/checkout", Some(&app.buyer())).await;

    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap()),
        Some("application/problem+json")
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["status"], 405);
    assert!(
        problem["code"].is_string()
            && problem["title"].is_string()
            && problem["detail"].is_string()
    );
}

#[tokio::test]
async fn webhook_with_a_bad_signature_is_400_invalid_signature() {
    let app = TestApp::spawn().await;
    let body = br#"{"id": "evt_1", "type": "checkout.session.completed"}"#;

    let unsigned = post_raw(&app, "/webhooks/stripe", None, None, body.to_vec()).await;
    let forged = app
        .http
        .post(app.url("/webhooks/stripe"))
        .header(
            "Stripe-Signature",
            format!("t={},v1={}", now_secs(), "0".repeat(64)),
        )
        .body(body.to_vec())
        .send()
        .await
        .unwrap();

    assert_problem(unsigned, 400, "invalid_signature").await;
    assert_problem(forged, 400, "invalid_signature").await;
}

// ---------------------------------------------------------------------------------------
// The status object and the retry object
// ---------------------------------------------------------------------------------------

const STATUS_FIELDS: [&str; 15] = [
    "sessionId",
    "status",
    "amount",
    "currency",
    "failureReason",
    "retryAttempts",
    "maxRetryAttempts",
    "retryAttemptsRemaining",
    "retryAvailable",
    "retryUnavailableReason",
    "nextRetryAt",
    "lastRetryAt",
    "expiresAt",
    "checkoutUrl",
    "providerSessionId",
];

const RETRY_FIELDS: [&str; 6] = [
    "sessionId",
    "attemptNumber",
    "delaySeconds",
    "delayMinutes",
    "scheduledFor",
    "retryAttemptsRemaining",
];

fn field_set(fields: &[&str]) -> BTreeSet<String> {
    fields.iter().map(|f| (*f).to_owned()).collect()
}

#[tokio::test]
async fn created_session_answers_201_with_exactly_the_status_object() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let before = Utc::now();

    let response = app
        .request(
            Method::POST,
            "/payments/checkout",
            Some(&buyer),
            None,
            Some(
                json!({"amount": 2500, "currency": "usd", "description": "Order 123",
                "metadata": {"orderId": "123"}}),
            ),
        )
        .await;

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let created: Value = response.json().await.unwrap();
    assert_eq!(keys_of(&created), field_set(&STATUS_FIELDS), "{created}");
    let id = created["sessionId"].as_str().unwrap();
    assert!(id.starts_with("ps_"), "{id}");
    assert_eq!(created["status"], "open");
    assert_eq!(created["amount"], 2500);
    assert_eq!(created["currency"], "usd");
    assert_eq!(created["failureReason"], Value::Null);
    assert_eq!(created["retryAttempts"], 0);
    assert_eq!(created["maxRetryAttempts"], 3);
    assert_eq!(created["retryAttemptsRemaining"], 3);
    assert_eq!(created["retryAvailable"], false);
    assert_eq!(created["retryUnavailableReason"], "payment_not_failed");
    assert_eq!(created["nextRetryAt"], Value::Null);
    assert_eq!(created["lastRetryAt"], Value::Null);
    let window = rfc3339_utc(&created["expiresAt"]) - before;
    assert!(
        window > TimeDelta::hours(24) - TimeDelta::minutes(1)
            && window <= TimeDelta::hours(24) + TimeDelta::seconds(5),
        "expiresAt is not 24h ahead: {window}"
    );
    assert!(
        created["checkoutUrl"]
            .as_str()
            .is_some_and(|u| u.starts_with("http"))
    );
    assert!(
        created["providerSessionId"]
            .as_str()
            .is_some_and(|p| p.starts_with("cs_"))
    );
    assert_eq!(app.status(&buyer, id).await, created, "GET status agrees");
}

#[tokio::test]
async fn status_object_follows_the_session_through_failure_and_retry() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;

    let failed = app.status(&buyer, &id).await;
    let accepted: Value = app.retry(&buyer, &id, "k-1").await.json().await.unwrap();
    let scheduled = app.status(&buyer, &id).await;

    assert_eq!(keys_of(&failed), field_set(&STATUS_FIELDS));
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["failureReason"], "insufficient_funds");
    assert_eq!(failed["retryAvailable"], true);
    assert_eq!(failed["retryUnavailableReason"], Value::Null);
    assert_eq!(failed["retryAttempts"], 0);

    assert_eq!(keys_of(&scheduled), field_set(&STATUS_FIELDS));
    assert_eq!(scheduled["status"], "retry_scheduled");
    assert_eq!(scheduled["retryAttempts"], 1);
    assert_eq!(scheduled["retryAttemptsRemaining"], 2);
    assert_eq!(scheduled["retryAvailable"], false);
    assert_eq!(scheduled["retryUnavailableReason"], "retry_scheduled");
    let last_retry = rfc3339_utc(&scheduled["lastRetryAt"]);
    assert!((Utc::now() - last_retry).abs() < TimeDelta::seconds(10));
    let next = rfc3339_utc(&scheduled["nextRetryAt"]);
    let due = rfc3339_utc(&accepted["scheduledFor"]);
    assert!(
        (next - due).abs() < TimeDelta::milliseconds(1),
        "nextRetryAt {next} != scheduledFor {due}"
    );
}

#[tokio::test]
async fn accepted_retry_answers_202_with_exactly_the_retry_object() {
    let app = TestApp::spawn_with(Options {
        vars: vec![("PAYRETRY_RETRY_DELAYS", "90s".into())],
        ..Default::default()
    })
    .await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;
    let before = Utc::now();

    let response = app.retry(&buyer, &id, "k-1").await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    assert!(response.headers().get("idempotent-replayed").is_none());
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(keys_of(&accepted), field_set(&RETRY_FIELDS), "{accepted}");
    assert_eq!(accepted["sessionId"], id.as_str());
    assert_eq!(accepted["attemptNumber"], 1);
    assert_eq!(accepted["delaySeconds"], 90);
    assert_eq!(accepted["delayMinutes"].as_f64(), Some(1.5));
    assert_eq!(accepted["retryAttemptsRemaining"], 2);
    let due = rfc3339_utc(&accepted["scheduledFor"]) - before;
    assert!(
        due >= TimeDelta::seconds(90) && due < TimeDelta::seconds(100),
        "scheduledFor is {due} ahead"
    );
}

#[tokio::test]
async fn retry_object_scheduled_for_is_the_status_objects_next_retry_at() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;

    let accepted: Value = app.retry(&buyer, &id, "k").await.json().await.unwrap();
    let scheduled = app.status(&buyer, &id).await;

    assert_eq!(accepted["scheduledFor"], scheduled["nextRetryAt"]);
}

#[tokio::test]
async fn delay_minutes_is_a_number_for_whole_and_partial_minutes() {
    let app = TestApp::spawn_with(Options {
        vars: vec![("PAYRETRY_RETRY_DELAYS", "60s".into())],
        ..Default::default()
    })
    .await;
    let sub_minute = TestApp::spawn().await; // delays of 1s
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;
    let other_id = failed_session(&sub_minute, &buyer).await;

    let whole: Value = app.retry(&buyer, &id, "k").await.json().await.unwrap();
    let partial: Value = sub_minute
        .retry(&buyer, &other_id, "k")
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(whole["delaySeconds"], 60);
    assert_eq!(whole["delayMinutes"].as_f64(), Some(1.0));
    assert_eq!(partial["delaySeconds"], 1);
    let minutes = partial["delayMinutes"].as_f64().expect("a number");
    assert!((minutes - 1.0 / 60.0).abs() < 1e-9, "{minutes}");
}

// ---------------------------------------------------------------------------------------
// 400: bad input writes nothing
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_json_and_wrong_types_are_400_and_write_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let baseline = writes(&app).await;
    let bodies: [&[u8]; 12] = [
        b"",
        b"{",
        b"not json",
        b"null",
        b"[2500, \"usd\"]",
        br#"{"amount": "2500", "currency": "usd"}"#,
        br#"{"amount": 25.5, "currency": "usd"}"#,
        br#"{"amount": 2500, "currency": 840}"#,
        br#"{"amount": 2500}"#,
        br#"{"currency": "usd"}"#,
        br#"{"amount": 1e20, "currency": "usd"}"#,
        br#"{"amount": 99999999999999999999, "currency": "usd"}"#,
    ];

    for body in bodies {
        let response = post_raw(
            &app,
            "/payments/checkout",
            Some(&buyer),
            Some("bad-body"),
            body.to_vec(),
        )
        .await;

        let problem = assert_problem(response, 400, "invalid_request").await;
        assert_nothing_internal(&problem);
    }
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn amount_outside_1_to_99_999_999_is_400_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let baseline = writes(&app).await;

    for amount in [json!(0), json!(-1), json!(-2500), json!(100_000_000)] {
        let response = app
            .request(
                Method::POST,
                "/payments/checkout",
                Some(&buyer),
                Some(&format!("amount-{amount}")),
                Some(json!({"amount": amount, "currency": "usd"})),
            )
            .await;

        assert_problem(response, 400, "invalid_request").await;
    }
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn amount_bounds_1_and_99_999_999_are_accepted() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();

    for amount in [1, 99_999_999] {
        let response = app
            .request(
                Method::POST,
                "/payments/checkout",
                Some(&buyer),
                None,
                Some(json!({"amount": amount, "currency": "usd"})),
            )
            .await;

        assert_eq!(response.status(), StatusCode::CREATED, "amount {amount}");
        let created: Value = response.json().await.unwrap();
        assert_eq!(created["amount"], amount);
    }
}

#[tokio::test]
async fn currency_other_than_three_lowercase_letters_is_400_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let baseline = writes(&app).await;

    for currency in ["USD", "Usd", "us", "usdd", "", "u$d", "€ur"] {
        let response = app
            .request(
                Method::POST,
                "/payments/checkout",
                Some(&buyer),
                None,
                Some(json!({"amount": 2500, "currency": currency})),
            )
            .await;

        assert_problem(response, 400, "invalid_request").await;
    }
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn metadata_that_is_not_an_object_is_400_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let baseline = writes(&app).await;

    for metadata in [json!([1, 2]), json!("order 123"), json!(42), json!(true)] {
        let response = app
            .request(
                Method::POST,
                "/payments/checkout",
                Some(&buyer),
                None,
                Some(json!({"amount": 2500, "currency": "usd", "metadata": metadata})),
            )
            .await;

        assert_problem(response, 400, "invalid_request").await;
    }
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn retry_without_idempotency_key_is_400_missing_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;
    let baseline = writes(&app).await;

    let response = app
        .request(
            Method::POST,
            &format!("/payments/retry/{id}"),
            Some(&buyer),
            None,
            None,
        )
        .await;

    assert_problem(response, 400, "idempotency_key_missing").await;
    assert_eq!(writes(&app).await, baseline);
    assert_eq!(app.status(&buyer, &id).await["retryAttempts"], 0);
}

#[tokio::test]
async fn invalid_idempotency_keys_are_400_invalid_and_write_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;
    let baseline = writes(&app).await;
    let too_long = "k".repeat(256);
    let keys: [&[u8]; 5] = [
        b"",
        too_long.as_bytes(),
        b"tab\tkey",
        "cl\u{e9}".as_bytes(),
        b"\x80\xff",
    ];

    for key in keys {
        let retry = retry_with_key_bytes(&app, &buyer, &id, key).await;
        let checkout = app
            .http
            .post(app.url("/payments/checkout"))
            .bearer_auth(&buyer)
            .header("Idempotency-Key", HeaderValue::from_bytes(key).unwrap())
            .json(&json!({"amount": 2500, "currency": "usd"}))
            .send()
            .await
            .unwrap();

        assert_problem(retry, 400, "idempotency_key_invalid").await;
        assert_problem(checkout, 400, "idempotency_key_invalid").await;
    }
    assert_eq!(writes(&app).await, baseline);
    assert_eq!(app.status(&buyer, &id).await["retryAttempts"], 0);
}

#[tokio::test]
async fn idempotency_key_of_255_printable_characters_is_accepted() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;
    let key = format!("~ !{}", "k".repeat(252));
    assert_eq!(key.len(), 255);

    let response = app.retry(&buyer, &id, &key).await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

// ---------------------------------------------------------------------------------------
// 413
// ---------------------------------------------------------------------------------------

fn padded_checkout_body(total_len: usize) -> Vec<u8> {
    let mut body = br#"{"amount": 2500, "currency": "usd"}"#.to_vec();
    body.resize(total_len, b' ');
    body
}

#[tokio::test]
async fn headers_over_16_kib_are_431_and_write_nothing() {
    let app = TestApp::spawn().await;
    let baseline = writes(&app).await;

    let response = app
        .http
        .post(app.url("/payments/checkout"))
        .bearer_auth(app.buyer())
        .header("X-Padding", "p".repeat(20 * 1024))
        .json(&json!({"amount": 2500, "currency": "usd"}))
        .send()
        .await
        .unwrap();

    assert_problem(response, 431, "headers_too_large").await;
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn body_over_64_kib_is_413_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;
    let baseline = writes(&app).await;

    let checkout = post_raw(
        &app,
        "/payments/checkout",
        Some(&buyer),
        Some("big"),
        padded_checkout_body(MAX_BODY + 1),
    )
    .await;
    let retry = post_raw(
        &app,
        &format!("/payments/retry/{id}"),
        Some(&buyer),
        Some("big"),
        vec![b' '; 200 * 1024],
    )
    .await;

    assert_problem(checkout, 413, "payload_too_large").await;
    assert_problem(retry, 413, "payload_too_large").await;
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn body_of_exactly_64_kib_is_accepted() {
    let app = TestApp::spawn().await;

    let response = post_raw(
        &app,
        "/payments/checkout",
        Some(&app.buyer()),
        None,
        padded_checkout_body(MAX_BODY),
    )
    .await;

    assert_eq!(response.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn chunked_body_over_64_kib_without_content_length_is_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn().await;
    let baseline = writes(&app).await;
    let body = padded_checkout_body(MAX_BODY + 1024);
    let mut request = format!(
        "POST /payments/checkout HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        app.buyer()
    )
    .into_bytes();
    for chunk in body.chunks(8 * 1024) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");

    let mut stream = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    // The server may answer and close before reading everything.
    let _ = stream.write_all(&request).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;

    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"code\":\"payload_too_large\""),
        "{answer}"
    );
    assert_eq!(writes(&app).await, baseline);
}

// ---------------------------------------------------------------------------------------
// 401
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_authorization_is_401_on_every_protected_route() {
    let app = TestApp::spawn().await;
    let id = app.create_checkout(&app.buyer()).await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let baseline = writes(&app).await;
    let routes = [
        (Method::POST, "/payments/checkout".to_owned()),
        (Method::GET, format!("/payments/checkout/{id}/status")),
        (Method::POST, format!("/payments/retry/{id}")),
        (Method::GET, format!("/payments/checkout/{id}/audit")),
        (Method::GET, "/admin/dead-letters".to_owned()),
        (Method::POST, "/admin/dead-letters/1/redrive".to_owned()),
    ];

    for (method, path) in routes {
        let response = app
            .request(
                method.clone(),
                &path,
                None,
                Some("k"),
                Some(json!({"amount": 2500, "currency": "usd"})),
            )
            .await;

        let problem = assert_problem(response, 401, "unauthenticated").await;
        assert_nothing_internal(&problem);
    }
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn malformed_expired_or_forged_tokens_are_401_and_write_nothing() {
    let app = TestApp::spawn().await;
    let id = app.create_checkout(&app.buyer()).await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    app.decline(&id, 0, "insufficient_funds").await;
    let baseline = writes(&app).await;

    for (case, authorization) in invalid_authorizations() {
        let checkout = app
            .http
            .post(app.url("/payments/checkout"))
            .header("Authorization", &authorization)
            .header("Idempotency-Key", format!("auth-{case}"))
            .json(&json!({"amount": 2500, "currency": "usd"}))
            .send()
            .await
            .unwrap();
        let status = app
            .http
            .get(app.url(&format!("/payments/checkout/{id}/status")))
            .header("Authorization", &authorization)
            .send()
            .await
            .unwrap();
        let retry = app
            .http
            .post(app.url(&format!("/payments/retry/{id}")))
            .header("Authorization", &authorization)
            .header("Idempotency-Key", format!("auth-{case}"))
            .send()
            .await
            .unwrap();

        for response in [checkout, status, retry] {
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{case}");
            assert_problem(response, 401, "unauthenticated").await;
        }
    }
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn freshly_signed_hs256_token_is_accepted() {
    // The control for the 401 cases: the same claims, correctly signed, work.
    let app = TestApp::spawn().await;
    let token = sign(&buyer_claims(), Algorithm::HS256, JWT_SECRET);

    let created = app.create_checkout(&token).await;

    assert_eq!(created["status"], "open");
}

// ---------------------------------------------------------------------------------------
// 403
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn only_buyers_may_create_checkouts() {
    let app = TestApp::spawn().await;
    let baseline = writes(&app).await;

    for role in [Role::Support, Role::Admin] {
        let token = app.token("staff-1", role);
        let response = app
            .request(
                Method::POST,
                "/payments/checkout",
                Some(&token),
                Some("staff"),
                Some(json!({"amount": 2500, "currency": "usd"})),
            )
            .await;

        assert_problem(response, 403, "forbidden").await;
    }
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn buyer_may_not_read_the_audit_log_but_support_may() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;
    let path = format!("/payments/checkout/{id}/audit");

    let as_buyer = get(&app, &path, Some(&buyer)).await;
    let as_support = get(&app, &path, Some(&app.token("support-1", Role::Support))).await;

    assert_problem(as_buyer, 403, "forbidden").await;
    assert_eq!(as_support.status(), StatusCode::OK);
    let log: Value = as_support.json().await.unwrap();
    let entries = log["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{log}");
    for entry in entries {
        assert_eq!(
            keys_of(entry),
            field_set(&["at", "action", "attemptNumber", "actor", "details"]),
            "{entry}"
        );
        rfc3339_utc(&entry["at"]);
    }
    assert_eq!(entries[0]["action"], "checkout_created");
    assert_eq!(entries[1]["action"], "payment_failed");
}

#[tokio::test]
async fn only_admins_may_use_dead_letters() {
    let app = TestApp::spawn().await;

    for role in [Role::Buyer, Role::Support] {
        let token = app.token("someone", role);
        let list = get(&app, "/admin/dead-letters", Some(&token)).await;
        let redrive = app
            .request(
                Method::POST,
                "/admin/dead-letters/1/redrive",
                Some(&token),
                None,
                None,
            )
            .await;

        assert_problem(list, 403, "forbidden").await;
        assert_problem(redrive, 403, "forbidden").await;
    }
    let as_admin = get(&app, "/admin/dead-letters", Some(&app.admin())).await;
    assert_eq!(as_admin.status(), StatusCode::OK);
    let body: Value = as_admin.json().await.unwrap();
    assert_eq!(body, json!({"deadLetters": [], "nextCursor": null}));
}

// ---------------------------------------------------------------------------------------
// 404
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn redrive_of_an_unknown_dead_letter_is_404() {
    let app = TestApp::spawn().await;

    for id in ["999999", "not-a-dead-letter"] {
        let response = app
            .request(
                Method::POST,
                &format!("/admin/dead-letters/{id}/redrive"),
                Some(&app.admin()),
                None,
                None,
            )
            .await;

        assert_problem(response, 404, "dead_letter_not_found").await;
    }
}

#[tokio::test]
async fn unknown_or_malformed_session_id_is_404_session_not_found() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let admin = app.admin();

    for id in [UNKNOWN_SESSION, "not-a-session", "ps_", "ps_a-b", "cs_123"] {
        let status = get(
            &app,
            &format!("/payments/checkout/{id}/status"),
            Some(&buyer),
        )
        .await;
        let retry = app.retry(&buyer, id, &format!("unknown-{id}")).await;
        let audit = get(
            &app,
            &format!("/payments/checkout/{id}/audit"),
            Some(&admin),
        )
        .await;

        assert_problem(status, 404, "session_not_found").await;
        assert_problem(retry, 404, "session_not_found").await;
        assert_problem(audit, 404, "session_not_found").await;
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 0);
}

#[tokio::test]
async fn another_buyers_session_is_404_not_403_and_is_left_alone() {
    let app = TestApp::spawn().await;
    let owner = app.buyer();
    let stranger = app.token("buyer-2", Role::Buyer);
    let id = failed_session(&app, &owner).await;
    let unknown = get(
        &app,
        &format!("/payments/checkout/{UNKNOWN_SESSION}/status"),
        Some(&stranger),
    )
    .await;
    let unknown = assert_problem(unknown, 404, "session_not_found").await;

    let status = get(
        &app,
        &format!("/payments/checkout/{id}/status"),
        Some(&stranger),
    )
    .await;
    let retry = app.retry(&stranger, &id, "steal").await;

    let status = assert_problem(status, 404, "session_not_found").await;
    let retry = assert_problem(retry, 404, "session_not_found").await;
    assert_eq!(
        status, unknown,
        "a foreign session looks exactly like a missing one"
    );
    assert_eq!(
        retry, unknown,
        "a foreign session looks exactly like a missing one"
    );
    let seen_by_owner = app.status(&owner, &id).await;
    assert_eq!(seen_by_owner["status"], "failed");
    assert_eq!(seen_by_owner["retryAttempts"], 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 0);
}

#[tokio::test]
async fn support_and_admin_may_read_and_retry_a_buyers_session() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let first = failed_session(&app, &buyer).await;
    let second = failed_session(&app, &buyer).await;
    let support = app.token("support-1", Role::Support);

    let seen = app.status(&support, &first).await;
    let by_support = app.retry(&support, &first, "staff-retry").await;
    let by_admin = app.retry(&app.admin(), &second, "staff-retry").await;

    assert_eq!(seen["sessionId"], first.as_str());
    assert_eq!(by_support.status(), StatusCode::ACCEPTED);
    assert_eq!(by_admin.status(), StatusCode::ACCEPTED);
}

// ---------------------------------------------------------------------------------------
// 409 / 410: eligibility (DESIGN.md §2)
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn retry_of_an_open_session_is_409_payment_not_failed() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let id = app.create_checkout(&buyer).await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();

    let response = app.retry(&buyer, &id, "k").await;

    assert_problem(response, 409, "payment_not_failed").await;
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 0);
}

#[tokio::test]
async fn retry_of_a_paid_session_is_409_payment_already_succeeded() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let created = app.create_checkout(&buyer).await;
    let id = created["sessionId"].as_str().unwrap();
    app.pay(id, 0, created["providerSessionId"].as_str().unwrap())
        .await;

    let response = app.retry(&buyer, id, "k").await;

    assert_problem(response, 409, "payment_already_succeeded").await;
    let status = app.status(&buyer, id).await;
    assert_eq!(status["status"], "succeeded");
    assert_eq!(status["retryUnavailableReason"], "payment_succeeded");
}

#[tokio::test]
async fn second_retry_while_one_is_scheduled_is_409_retry_already_scheduled() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;
    assert_eq!(
        app.retry(&buyer, &id, "first").await.status(),
        StatusCode::ACCEPTED
    );

    let response = app.retry(&buyer, &id, "second").await;

    assert_problem(response, 409, "retry_already_scheduled").await;
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 1);
    assert_eq!(app.status(&buyer, &id).await["retryAttempts"], 1);
}

#[tokio::test]
async fn retry_after_a_stolen_card_decline_is_409_failure_not_retryable() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let id = app.create_checkout(&buyer).await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    app.decline(&id, 0, "stolen_card").await;

    let response = app.retry(&buyer, &id, "k").await;

    assert_problem(response, 409, "failure_not_retryable").await;
    let status = app.status(&buyer, &id).await;
    assert_eq!(status["status"], "failed");
    assert_eq!(status["failureReason"], "stolen_card");
    assert_eq!(status["retryAvailable"], false);
    assert_eq!(status["retryUnavailableReason"], "failure_not_retryable");
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 0);
}

#[tokio::test]
async fn the_latest_decline_decides_whether_a_retry_is_possible() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let first = failed_session(&app, &buyer).await; // insufficient_funds
    let second = app.create_checkout(&buyer).await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    app.decline(&first, 0, "stolen_card").await;
    app.decline(&second, 0, "stolen_card").await;
    app.decline(&second, 0, "insufficient_funds").await;

    let refused = app.retry(&buyer, &first, "k-first").await;
    let accepted = app.retry(&buyer, &second, "k-second").await;

    assert_problem(refused, 409, "failure_not_retryable").await;
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn retry_past_the_attempt_limit_is_409_retry_limit_reached() {
    let app = TestApp::spawn_with(Options {
        vars: vec![
            ("PAYRETRY_RETRY_DELAYS", "1s".into()),
            ("PAYRETRY_MAX_ATTEMPTS", "1".into()),
        ],
        ..Default::default()
    })
    .await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;
    assert_eq!(
        app.retry(&buyer, &id, "only").await.status(),
        StatusCode::ACCEPTED
    );
    app.wait_for_status(&id, "open").await;
    // Both the limit and a non-retryable reason apply: the limit is checked first.
    app.decline(&id, 1, "stolen_card").await;

    let response = app.retry(&buyer, &id, "one-more").await;

    assert_problem(response, 409, "retry_limit_reached").await;
    let status = app.status(&buyer, &id).await;
    assert_eq!(status["status"], "failed");
    assert_eq!(status["retryAttempts"], 1);
    assert_eq!(status["retryAttemptsRemaining"], 0);
    assert_eq!(status["retryUnavailableReason"], "limit_reached");
}

fn short_window() -> Options {
    Options {
        vars: vec![
            ("PAYRETRY_PAYMENT_WINDOW", "2s".into()),
            ("PAYRETRY_RETRY_DELAYS", "5s".into()),
        ],
        ..Default::default()
    }
}

#[tokio::test]
async fn retry_that_could_not_start_inside_the_window_is_410() {
    let app = TestApp::spawn_with(short_window()).await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;
    let before = app.status(&buyer, &id).await;

    let response = app.retry(&buyer, &id, "k").await;

    assert_eq!(before["status"], "failed");
    assert_eq!(before["retryAvailable"], false);
    assert_eq!(before["retryUnavailableReason"], "window_expired");
    assert_problem(response, 410, "payment_window_expired").await;
    assert_eq!(app.status(&buyer, &id).await["retryAttempts"], 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 0);
}

#[tokio::test]
async fn after_the_window_retry_is_410_and_status_is_expired() {
    let app = TestApp::spawn_with(short_window()).await;
    let buyer = app.buyer();
    let failed = failed_session(&app, &buyer).await;
    let open = app.create_checkout(&buyer).await;
    let paid = app.create_checkout(&buyer).await;
    let open_id = open["sessionId"].as_str().unwrap();
    let paid_id = paid["sessionId"].as_str().unwrap();
    app.pay(paid_id, 0, paid["providerSessionId"].as_str().unwrap())
        .await;
    let closes = rfc3339_utc(&open["expiresAt"]);
    let wait = (closes - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(300);
    tokio::time::sleep(wait).await;

    let failed_retry = app.retry(&buyer, &failed, "late-1").await;
    let open_retry = app.retry(&buyer, open_id, "late-2").await;
    let paid_retry = app.retry(&buyer, paid_id, "late-3").await;

    assert_problem(failed_retry, 410, "payment_window_expired").await;
    assert_problem(open_retry, 410, "payment_window_expired").await;
    // Succeeded is checked before the window.
    assert_problem(paid_retry, 409, "payment_already_succeeded").await;
    for id in [failed.as_str(), open_id] {
        let status = app.status(&buyer, id).await;
        assert_eq!(status["status"], "expired", "{status}");
        assert_eq!(status["retryAvailable"], false);
        assert_eq!(status["retryUnavailableReason"], "window_expired");
    }
    assert_eq!(app.status(&buyer, paid_id).await["status"], "succeeded");
}

#[tokio::test]
async fn window_passing_while_a_retry_is_scheduled_is_410_before_the_sweeper_runs() {
    // API only: no worker picks the job up and no sweeper expires the session, so the
    // stored status stays `retry_scheduled` after the window.
    let app = TestApp::spawn_with(Options {
        vars: vec![
            ("PAYRETRY_PAYMENT_WINDOW", "2s".into()),
            ("PAYRETRY_RETRY_DELAYS", "1s".into()),
        ],
        role: ServeRole::Api,
        ..Default::default()
    })
    .await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;
    assert_eq!(
        app.retry(&buyer, &id, "in-time").await.status(),
        StatusCode::ACCEPTED
    );
    let closes = rfc3339_utc(&app.status(&buyer, &id).await["expiresAt"]);
    let wait = (closes - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(300);
    tokio::time::sleep(wait).await;

    let response = app.retry(&buyer, &id, "too-late").await;

    // The window is checked before retry_scheduled.
    assert_problem(response, 410, "payment_window_expired").await;
    let status = app.status(&buyer, &id).await;
    assert_eq!(status["status"], "expired", "{status}");
    assert_eq!(status["retryUnavailableReason"], "window_expired");
    assert_eq!(status["nextRetryAt"], Value::Null);
    assert_eq!(status["checkoutUrl"], Value::Null);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM payment_sessions WHERE status = 'retry_scheduled'")
            .await,
        1,
        "the sweeper has not run"
    );
}

// ---------------------------------------------------------------------------------------
// 429
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_description_with_control_characters_is_400_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let baseline = writes(&app).await;
    for description in ["a\u{0}b", "tab\there", "   "] {
        let response = app
            .request(
                Method::POST,
                "/payments/checkout",
                Some(&buyer),
                None,
                Some(json!({"amount": 2500, "currency": "usd", "description": description})),
            )
            .await;
        assert_problem(response, 400, "invalid_request").await;
    }
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn one_address_cannot_spread_card_testing_over_many_tokens() {
    // Arrange: one request a minute per principal, so ten per client IP.
    let app = TestApp::spawn_with(Options {
        vars: vec![("PAYRETRY_RATE_LIMIT_PER_MINUTE", "1".into())],
        ..Default::default()
    })
    .await;
    for n in 0..10 {
        app.create_checkout(&app.token(&format!("tester-{n}"), Role::Buyer))
            .await;
    }
    let baseline = writes(&app).await;

    // Act: an eleventh token from the same address.
    let fresh = app.token("tester-fresh", Role::Buyer);
    let response = app
        .request(
            Method::POST,
            "/payments/checkout",
            Some(&fresh),
            None,
            Some(json!({"amount": 2500, "currency": "usd"})),
        )
        .await;

    // Assert
    assert!(response.headers().contains_key("retry-after"));
    assert_problem(response, 429, "rate_limited").await;
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn over_the_per_principal_budget_is_429_with_retry_after() {
    let app = TestApp::spawn_with(Options {
        vars: vec![
            ("PAYRETRY_RETRY_DELAYS", "1s".into()),
            ("PAYRETRY_RATE_LIMIT_PER_MINUTE", "3".into()),
        ],
        ..Default::default()
    })
    .await;
    let buyer = app.buyer();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.create_checkout(&buyer).await["sessionId"].clone());
    }
    let baseline = writes(&app).await;

    let checkout = app
        .request(
            Method::POST,
            "/payments/checkout",
            Some(&buyer),
            None,
            Some(json!({"amount": 2500, "currency": "usd"})),
        )
        .await;
    let retry = app
        .retry(&buyer, ids[0].as_str().unwrap(), "over-budget")
        .await;

    for response in [checkout, retry] {
        let retry_after: u64 = response
            .headers()
            .get("retry-after")
            .expect("a Retry-After header")
            .to_str()
            .unwrap()
            .parse()
            .expect("Retry-After in seconds");
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        assert_problem(response, 429, "rate_limited").await;
    }
    assert_eq!(writes(&app).await, baseline);
    let other_buyer = app.token("buyer-2", Role::Buyer);
    app.create_checkout(&other_buyer).await; // another principal has its own budget
}

// ---------------------------------------------------------------------------------------
// Idempotency
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn replayed_retry_is_byte_identical_and_spends_no_attempt() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;
    let first = app.retry(&buyer, &id, "replay-me").await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first = first.bytes().await.unwrap();
    let after_first = writes(&app).await;

    let replay = app.retry(&buyer, &id, "replay-me").await;

    assert_eq!(replay.status(), StatusCode::ACCEPTED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["content-type"], "application/json");
    assert_eq!(replay.bytes().await.unwrap(), first, "byte for byte");
    assert_eq!(writes(&app).await, after_first);
    assert_eq!(after_first.retry_jobs, 1);
    let status = app.status(&buyer, &id).await;
    assert_eq!(status["retryAttempts"], 1);
    assert_eq!(
        app.audit_actions(&id)
            .await
            .iter()
            .filter(|a| *a == "retry_requested")
            .count(),
        1
    );
}

#[tokio::test]
async fn same_key_for_a_different_request_is_422_and_writes_nothing() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let first = failed_session(&app, &buyer).await;
    let second = failed_session(&app, &buyer).await;
    assert_eq!(
        app.retry(&buyer, &first, "reused").await.status(),
        StatusCode::ACCEPTED
    );
    let baseline = writes(&app).await;

    let other_path = app.retry(&buyer, &second, "reused").await;
    let other_body = post_raw(
        &app,
        &format!("/payments/retry/{first}"),
        Some(&buyer),
        Some("reused"),
        br#"{"note": "again"}"#.to_vec(),
    )
    .await;
    let other_route = app
        .request(
            Method::POST,
            "/payments/checkout",
            Some(&buyer),
            Some("reused"),
            Some(json!({"amount": 2500, "currency": "usd"})),
        )
        .await;

    assert_problem(other_path, 422, "idempotency_key_reused").await;
    assert_problem(other_body, 422, "idempotency_key_reused").await;
    assert_problem(other_route, 422, "idempotency_key_reused").await;
    assert_eq!(writes(&app).await, baseline);
    let untouched = app.status(&buyer, &second).await;
    assert_eq!(untouched["status"], "failed");
    assert_eq!(untouched["retryAttempts"], 0);
}

#[tokio::test]
async fn replayed_checkout_creation_returns_the_same_session() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let body = json!({"amount": 2500, "currency": "usd", "description": "Order 123"});
    let first = app
        .request(
            Method::POST,
            "/payments/checkout",
            Some(&buyer),
            Some("order-123"),
            Some(body.clone()),
        )
        .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first = first.bytes().await.unwrap();

    let replay = app
        .request(
            Method::POST,
            "/payments/checkout",
            Some(&buyer),
            Some("order-123"),
            Some(body),
        )
        .await;
    let changed = app
        .request(
            Method::POST,
            "/payments/checkout",
            Some(&buyer),
            Some("order-123"),
            Some(json!({"amount": 9900, "currency": "usd", "description": "Order 123"})),
        )
        .await;

    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.bytes().await.unwrap(), first, "byte for byte");
    assert_problem(changed, 422, "idempotency_key_reused").await;
    assert_eq!(app.count("SELECT COUNT(*) FROM payment_sessions").await, 1);
    let created: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(created["amount"], 2500);
}

#[tokio::test]
async fn refused_retry_is_stored_and_replayed() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let id = app.create_checkout(&buyer).await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused = app.retry(&buyer, &id, "too-early").await;
    assert!(refused.headers().get("idempotent-replayed").is_none());
    let refused = refused.bytes().await.unwrap();
    app.decline(&id, 0, "insufficient_funds").await;

    let replay = app.retry(&buyer, &id, "too-early").await;
    let fresh = app.retry(&buyer, &id, "now-failed").await;

    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["content-type"], "application/problem+json");
    assert_eq!(replay.status(), StatusCode::CONFLICT);
    assert_eq!(replay.bytes().await.unwrap(), refused, "byte for byte");
    let problem: Value = serde_json::from_slice(&refused).unwrap();
    assert_eq!(problem["code"], "payment_not_failed");
    assert_eq!(
        fresh.status(),
        StatusCode::ACCEPTED,
        "a new key sees the session as it is now"
    );
}

#[tokio::test]
async fn idempotency_keys_are_scoped_to_the_caller() {
    let app = app_with_long_delays().await;
    let alice = app.buyer();
    let bob = app.token("buyer-2", Role::Buyer);
    let alices = failed_session(&app, &alice).await;
    let bobs = failed_session(&app, &bob).await;

    let alice_retry = app.retry(&alice, &alices, "shared-key").await;
    let bob_retry = app.retry(&bob, &bobs, "shared-key").await;
    let alice_again = app.retry(&alice, &alices, "probe").await;
    let bob_probe = app.retry(&bob, &alices, "probe").await;

    assert_eq!(alice_retry.status(), StatusCode::ACCEPTED);
    assert_eq!(bob_retry.status(), StatusCode::ACCEPTED);
    assert!(bob_retry.headers().get("idempotent-replayed").is_none());
    let bobs_body: Value = bob_retry.json().await.unwrap();
    assert_eq!(bobs_body["sessionId"], bobs.as_str());
    assert_problem(alice_again, 409, "retry_already_scheduled").await;
    // Same key, same request, another caller: no replay of Alice's answer.
    assert!(bob_probe.headers().get("idempotent-replayed").is_none());
    assert_problem(bob_probe, 404, "session_not_found").await;
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 2);
}

#[tokio::test]
async fn key_still_in_flight_is_409_idempotency_key_in_use() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;
    insert_in_flight_key(&app, "buyer-1", "in-flight", &retry_fingerprint(&id, b"")).await;
    let baseline = writes(&app).await;

    let response = app.retry(&buyer, &id, "in-flight").await;

    assert_problem(response, 409, "idempotency_key_in_use").await;
    assert_eq!(writes(&app).await, baseline);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM idempotency_keys WHERE response_status IS NULL")
            .await,
        1,
        "the in-flight claim is left as it was"
    );
    assert_eq!(app.status(&buyer, &id).await["retryAttempts"], 0);
}

#[tokio::test]
async fn twenty_concurrent_retries_schedule_exactly_one() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;
    let url = app.url(&format!("/payments/retry/{id}"));

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let request = app
            .http
            .post(&url)
            .bearer_auth(&buyer)
            .header("Idempotency-Key", format!("race-{i}"));
        tasks.spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (status, body)
        });
    }
    let answers = tasks.join_all().await;

    let accepted: Vec<_> = answers.iter().filter(|(s, _)| *s == 202).collect();
    assert_eq!(accepted.len(), 1, "{answers:?}");
    for (status, body) in answers.iter().filter(|(s, _)| *s != 202) {
        assert_eq!(*status, 409, "{body}");
        assert_eq!(body["code"], "retry_already_scheduled", "{body}");
    }
    assert_eq!(accepted[0].1["attemptNumber"], 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 1);
    assert_eq!(app.status(&buyer, &id).await["retryAttempts"], 1);
}

#[tokio::test]
async fn concurrent_retries_with_one_key_spend_one_attempt() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let id = failed_session(&app, &buyer).await;
    let url = app.url(&format!("/payments/retry/{id}"));

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let request = app
            .http
            .post(&url)
            .bearer_auth(&buyer)
            .header("Idempotency-Key", "same-click");
        tasks.spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let replayed = response.headers().contains_key("idempotent-replayed");
            let body = response.bytes().await.unwrap();
            (status, replayed, body)
        });
    }
    let answers = tasks.join_all().await;

    // The retry stores its response in its own transaction, so a request that lost the race
    // (its commit found the key answered, or the session already scheduled) replays the
    // winner's answer instead of refusing.
    let originals: Vec<_> = answers.iter().filter(|(s, r, _)| *s == 202 && !r).collect();
    assert_eq!(originals.len(), 1, "{answers:?}");
    for (status, replayed, body) in &answers {
        assert_eq!(*status, 202, "{body:?}");
        assert_eq!(body, &originals[0].2, "a replay is the original's bytes");
        if !std::ptr::eq(body, &originals[0].2) {
            assert!(replayed, "every other answer is marked as a replay");
        }
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 1);
    assert_eq!(app.status(&buyer, &id).await["retryAttempts"], 1);
}
