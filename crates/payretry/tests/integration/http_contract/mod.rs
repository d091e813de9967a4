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

mod bad_input;
mod eligibility;
mod forbidden;
mod idempotency;
mod not_found;
mod objects;
mod operations;
mod rate_limits;
mod too_large;
mod unauthenticated;

// ---------------------------------------------------------------------------------------
// Helpers shared by the sections
// ---------------------------------------------------------------------------------------

/// An app whose retries stay `retry_scheduled` for the whole test (the worker does not
/// pick the job up), so the outbox row can be counted.
async fn app_with_long_delays() -> TestApp {
    TestApp::spawn_with(Options {
        vars: vec![("PAYRETRY_RETRY_DELAYS", "60s".into())],
        ..Default::default()
    })
    .await
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

async fn get(app: &TestApp, path: &str, token: Option<&str>) -> Response {
    app.request(Method::GET, path, token, None, None).await
}

fn now_secs() -> i64 {
    Utc::now().timestamp()
}

fn field_set(fields: &[&str]) -> BTreeSet<String> {
    fields.iter().map(|f| (*f).to_owned()).collect()
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
