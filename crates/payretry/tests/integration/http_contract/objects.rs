//! The status object and the retry object: exactly their fields, through failure and retry.

use super::*;
use chrono::SubsecRound;

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
    let id = app.declined_session(&buyer).await.id;

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
    let id = app.declined_session(&buyer).await.id;
    // To the millisecond, as `scheduledFor` is written: a finer `before` can fall after the
    // truncated instant the server computed later.
    let before = Utc::now().trunc_subsecs(3);

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
    let id = app.declined_session(&buyer).await.id;

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
    let id = app.declined_session(&buyer).await.id;
    let other_id = sub_minute.declined_session(&buyer).await.id;

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
