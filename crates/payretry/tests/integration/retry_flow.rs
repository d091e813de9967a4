//! The story end to end through HTTP: create → decline → retry → new checkout → pay.

use crate::support::app::{Database, Options, Queue, TestApp, session_id};

#[tokio::test]
async fn failed_payment_is_retried_on_a_new_checkout_and_then_paid() {
    the_story(Options::default()).await;
}

#[tokio::test]
async fn the_story_holds_on_postgresql() {
    the_story(Options::on(Database::Postgres, Queue::Embedded)).await;
}

#[tokio::test]
async fn the_story_holds_on_postgresql_and_sqs() {
    the_story(Options::on(Database::Postgres, Queue::Sqs)).await;
}

#[tokio::test]
async fn the_story_holds_on_sqlite_and_sqs() {
    the_story(Options::on(Database::Sqlite, Queue::Sqs)).await;
}

async fn the_story(options: Options) {
    let app = TestApp::spawn_with(options).await;
    let buyer = app.buyer();
    let created = app.create_checkout(&buyer).await;
    let id = session_id(&created);
    assert_eq!(created["status"], "open");
    assert_eq!(created["retryAttemptsRemaining"], 3);
    assert_eq!(created["retryUnavailableReason"], "payment_not_failed");

    app.decline(&id, 0, "insufficient_funds").await;
    let failed = app.status(&buyer, &id).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["failureReason"], "insufficient_funds");
    assert_eq!(failed["retryAvailable"], true);

    let accepted = app.retry(&buyer, &id, "key-1").await;
    assert_eq!(accepted.status(), 202);
    let accepted: serde_json::Value = accepted.json().await.unwrap();
    assert_eq!(accepted["attemptNumber"], 1);
    assert_eq!(accepted["delaySeconds"], 1);
    assert_eq!(accepted["retryAttemptsRemaining"], 2);
    let scheduled = app.status(&buyer, &id).await;
    assert_eq!(scheduled["status"], "retry_scheduled");
    assert_eq!(scheduled["retryUnavailableReason"], "retry_scheduled");
    assert!(scheduled["nextRetryAt"].is_string());

    let reopened = app.wait_for_status(&id, "open").await;
    let new_checkout = reopened["providerSessionId"].as_str().unwrap().to_owned();
    assert_ne!(new_checkout, created["providerSessionId"].as_str().unwrap());
    assert_eq!(
        reopened["sessionId"],
        id.as_str(),
        "the payment session id is preserved"
    );

    app.pay(&id, 1, &new_checkout).await;
    let paid = app.status(&buyer, &id).await;
    assert_eq!(paid["status"], "succeeded");
    assert_eq!(paid["retryUnavailableReason"], "payment_succeeded");
    assert_eq!(
        app.audit_actions(&id).await,
        [
            "checkout_created",
            "payment_failed",
            "retry_requested",
            "retry_initiated",
            "payment_succeeded"
        ]
    );
}
