//! `POST /webhooks/stripe` through the real server (DESIGN.md §4): the signature rules
//! (secret, tolerance, rotation on either side), deduplication by event id, and which events
//! change a session.

use crate::support::app::{
    Options, Session, TestApp, WEBHOOK_SECRET, assert_problem, declined_event, paid_event,
};
use payretry::provider::signature::sign;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Posts raw bytes with this `Stripe-Signature` header (none if `None`).
async fn post_webhook(app: &TestApp, body: &[u8], signature: Option<&str>) -> reqwest::Response {
    let mut request = app
        .http
        .post(app.url("/webhooks/stripe"))
        .header("Content-Type", "application/json")
        .body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header("Stripe-Signature", signature);
    }
    request.send().await.expect("webhook")
}

/// The hex signature of a `t=…,v1=…` header.
fn v1_of(header: &str) -> &str {
    header.split_once(",v1=").expect("a v1 entry").1
}

async fn audit_entries(app: &TestApp, id: &str) -> Vec<Value> {
    let response = app
        .request(
            Method::GET,
            &format!("/payments/checkout/{id}/audit"),
            Some(&app.admin()),
            None,
            None,
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["entries"].as_array().unwrap().clone()
}

fn count_of(actions: &[String], action: &str) -> usize {
    actions.iter().filter(|a| *a == action).count()
}

#[tokio::test]
async fn a_correctly_signed_event_is_accepted() {
    // Arrange
    let app = TestApp::spawn().await;
    let id = app.open_session(&app.buyer()).await.id;
    let body = serde_json::to_vec(&declined_event(&id, 0, "insufficient_funds")).unwrap();
    let signature = sign(&body, WEBHOOK_SECRET, now());

    // Act
    let response = post_webhook(&app, &body, Some(&signature)).await;

    // Assert
    assert_eq!(response.status(), StatusCode::OK);
    let status = app.status(&app.buyer(), &id).await;
    assert_eq!(status["status"], "failed");
    assert_eq!(status["failureReason"], "insufficient_funds");
}

#[tokio::test]
async fn an_event_signed_with_another_secret_is_refused() {
    // Arrange
    let app = TestApp::spawn().await;
    let id = app.open_session(&app.buyer()).await.id;
    let body = serde_json::to_vec(&declined_event(&id, 0, "insufficient_funds")).unwrap();
    let signature = sign(&body, "whsec_someone_else", now());

    // Act
    let response = post_webhook(&app, &body, Some(&signature)).await;

    // Assert
    assert_problem(response, 400, "invalid_signature").await;
    assert_eq!(app.status(&app.buyer(), &id).await["status"], "open");
    assert_eq!(app.audit_actions(&id).await, ["checkout_created"]);
}

#[tokio::test]
async fn an_event_signed_outside_the_five_minute_tolerance_is_refused() {
    // Arrange
    let app = TestApp::spawn().await;
    let id = app.open_session(&app.buyer()).await.id;
    let body = serde_json::to_vec(&declined_event(&id, 0, "insufficient_funds")).unwrap();

    for t in [now() - 301, now() + 301] {
        // Act
        let response = post_webhook(&app, &body, Some(&sign(&body, WEBHOOK_SECRET, t))).await;

        // Assert
        assert_problem(response, 400, "invalid_signature").await;
    }
    assert_eq!(app.status(&app.buyer(), &id).await["status"], "open");
}

#[tokio::test]
async fn an_event_without_a_signature_header_is_refused() {
    // Arrange
    let app = TestApp::spawn().await;
    let id = app.open_session(&app.buyer()).await.id;
    let body = serde_json::to_vec(&declined_event(&id, 0, "insufficient_funds")).unwrap();

    // Act
    let response = post_webhook(&app, &body, None).await;

    // Assert
    assert_problem(response, 400, "invalid_signature").await;
    assert_eq!(app.status(&app.buyer(), &id).await["status"], "open");
}

#[tokio::test]
async fn a_signature_over_another_body_is_refused() {
    // Arrange
    let app = TestApp::spawn().await;
    let id = app.open_session(&app.buyer()).await.id;
    let signed = serde_json::to_vec(&declined_event(&id, 0, "insufficient_funds")).unwrap();
    let sent = serde_json::to_vec(&declined_event(&id, 0, "do_not_honor")).unwrap();

    // Act
    let response = post_webhook(&app, &sent, Some(&sign(&signed, WEBHOOK_SECRET, now()))).await;

    // Assert
    assert_problem(response, 400, "invalid_signature").await;
    assert_eq!(app.status(&app.buyer(), &id).await["status"], "open");
}

#[tokio::test]
async fn a_header_whose_second_v1_entry_is_valid_is_accepted() {
    // Arrange: the provider is rolling its secret and sends both signatures.
    let app = TestApp::spawn().await;
    let id = app.open_session(&app.buyer()).await.id;
    let body = serde_json::to_vec(&declined_event(&id, 0, "insufficient_funds")).unwrap();
    let t = now();
    let stale = sign(&body, "whsec_retired_secret", t);
    let valid = sign(&body, WEBHOOK_SECRET, t);
    let header = format!("t={t},v1={},v1={}", v1_of(&stale), v1_of(&valid));

    // Act
    let response = post_webhook(&app, &body, Some(&header)).await;

    // Assert
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(app.status(&app.buyer(), &id).await["status"], "failed");
}

#[tokio::test]
async fn with_two_configured_secrets_either_one_verifies() {
    // Arrange: payretry is rolling its own secret.
    let app = TestApp::spawn_with(Options {
        vars: vec![("STRIPE_WEBHOOK_SECRET", "whsec_new,whsec_old".to_owned())],
        ..Options::default()
    })
    .await;
    let first = app.open_session(&app.buyer()).await.id;
    let second = app.open_session(&app.buyer()).await.id;
    let third = app.open_session(&app.buyer()).await.id;
    let body_for = |id: &str| serde_json::to_vec(&declined_event(id, 0, "card_declined")).unwrap();

    // Act
    let new_body = body_for(&first);
    let with_new = post_webhook(&app, &new_body, Some(&sign(&new_body, "whsec_new", now()))).await;
    let old_body = body_for(&second);
    let with_old = post_webhook(&app, &old_body, Some(&sign(&old_body, "whsec_old", now()))).await;
    let other_body = body_for(&third);
    let with_other = post_webhook(
        &app,
        &other_body,
        Some(&sign(&other_body, WEBHOOK_SECRET, now())),
    )
    .await;

    // Assert
    assert_eq!(with_new.status(), StatusCode::OK);
    assert_eq!(with_old.status(), StatusCode::OK);
    assert_problem(with_other, 400, "invalid_signature").await;
    assert_eq!(app.status(&app.buyer(), &first).await["status"], "failed");
    assert_eq!(app.status(&app.buyer(), &second).await["status"], "failed");
    assert_eq!(app.status(&app.buyer(), &third).await["status"], "open");
}

#[tokio::test]
async fn a_replayed_event_is_applied_once() {
    // Arrange
    let app = TestApp::spawn().await;
    let id = app.open_session(&app.buyer()).await.id;
    let event = declined_event(&id, 0, "insufficient_funds");

    // Act
    let first = app.send_event(&event).await;
    let replay = app.send_event(&event).await;

    // Assert
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(replay.status(), StatusCode::OK);
    let actions = app.audit_actions(&id).await;
    assert_eq!(actions, ["checkout_created", "payment_failed"]);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM processed_webhook_events")
            .await,
        1
    );
}

#[tokio::test]
async fn a_replayed_old_decline_does_not_overwrite_a_newer_one() {
    // Arrange
    let app = TestApp::spawn().await;
    let id = app.open_session(&app.buyer()).await.id;
    let older = declined_event(&id, 0, "insufficient_funds");
    assert_eq!(app.send_event(&older).await.status(), StatusCode::OK);
    app.decline(&id, 0, "do_not_honor").await;

    // Act: the provider resends the older event.
    let replay = app.send_event(&older).await;

    // Assert
    assert_eq!(replay.status(), StatusCode::OK);
    let status = app.status(&app.buyer(), &id).await;
    assert_eq!(status["failureReason"], "do_not_honor");
    assert_eq!(count_of(&app.audit_actions(&id).await, "payment_failed"), 2);
}

#[tokio::test]
async fn an_unknown_event_type_is_acknowledged_and_changes_nothing() {
    // Arrange
    let app = TestApp::spawn().await;
    let Session { id, checkout } = app.open_session(&app.buyer()).await;
    let before = app.status(&app.buyer(), &id).await;
    let event = json!({
        "id": "evt_test_unknown_type", "object": "event", "type": "customer.created",
        "data": {"object": {"id": checkout, "object": "checkout.session",
            "client_reference_id": id,
            "metadata": {"payment_session_id": id, "retry_attempt": "0"}}}
    });

    // Act
    let response = app.send_event(&event).await;

    // Assert
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(app.status(&app.buyer(), &id).await, before);
    assert_eq!(app.audit_actions(&id).await, ["checkout_created"]);
}

#[tokio::test]
async fn an_event_for_an_unknown_session_is_acknowledged() {
    // Arrange
    let app = TestApp::spawn().await;
    let id = app.open_session(&app.buyer()).await.id;
    let unknown = "ps_00000000000000000000000000000000";
    assert_ne!(unknown, id);

    // Act
    let ours_unknown = app
        .send_event(&declined_event(unknown, 0, "insufficient_funds"))
        .await;
    let not_ours = app
        .send_event(&declined_event("order_17", 0, "insufficient_funds"))
        .await;

    // Assert
    assert_eq!(ours_unknown.status(), StatusCode::OK);
    assert_eq!(not_ours.status(), StatusCode::OK);
    assert_eq!(app.status(&app.buyer(), &id).await["status"], "open");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM payment_sessions").await,
        1,
        "no session appears"
    );
}

#[tokio::test]
async fn an_older_attempts_failure_is_ignored_but_its_success_wins() {
    // Arrange: attempt 0 declined and retried; attempt 1's checkout is live.
    let app = TestApp::spawn().await;
    let Session {
        id,
        checkout: first_checkout,
    } = app.open_session(&app.buyer()).await;
    app.decline(&id, 0, "insufficient_funds").await;
    assert_eq!(app.retry(&app.buyer(), &id, "key-1").await.status(), 202);
    let open = app.wait_for_status(&id, "open").await;

    // Act: a late decline of attempt 0.
    app.decline(&id, 0, "do_not_honor").await;

    // Assert
    let status = app.status(&app.buyer(), &id).await;
    assert_eq!(status["status"], "open");
    assert_eq!(status["providerSessionId"], open["providerSessionId"]);
    assert_ne!(status["failureReason"], "do_not_honor");
    assert_eq!(count_of(&app.audit_actions(&id).await, "payment_failed"), 1);

    // Act: the buyer paid attempt 0's checkout after all.
    app.pay(&id, 0, &first_checkout).await;

    // Assert
    let status = app.status(&app.buyer(), &id).await;
    assert_eq!(status["status"], "succeeded");
    assert_eq!(status["retryUnavailableReason"], "payment_succeeded");
    let entries = audit_entries(&app, &id).await;
    let last = entries.last().unwrap();
    assert_eq!(last["action"], "payment_succeeded");
    assert_eq!(last["attemptNumber"], 0);
}

#[tokio::test]
async fn a_later_decline_of_the_current_attempt_updates_the_reason() {
    // Arrange
    let app = TestApp::spawn().await;
    let id = app.open_session(&app.buyer()).await.id;
    app.decline(&id, 0, "insufficient_funds").await;

    // Act
    app.decline(&id, 0, "do_not_honor").await;

    // Assert
    let status = app.status(&app.buyer(), &id).await;
    assert_eq!(status["status"], "failed");
    assert_eq!(status["failureReason"], "do_not_honor");
    assert_eq!(status["retryAttempts"], 0);
    let entries = audit_entries(&app, &id).await;
    let reasons: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "payment_failed")
        .map(|e| &e["details"]["failureReason"])
        .collect();
    assert_eq!(
        reasons,
        [&json!("insufficient_funds"), &json!("do_not_honor")]
    );
}

/// A checkout completed with a payment that settles later (a bank debit) is not paid yet,
/// but money may move: the session waits in `processing`, with no retry offered.
#[tokio::test]
async fn a_completed_but_unpaid_checkout_is_processing() {
    // Arrange
    let app = TestApp::spawn().await;
    let Session { id, checkout } = app.open_session(&app.buyer()).await;
    let mut event = paid_event(&id, 0, &checkout);
    event["data"]["object"]["payment_status"] = json!("unpaid");

    // Act
    let response = app.send_event(&event).await;

    // Assert
    assert_eq!(response.status(), StatusCode::OK);
    let status = app.status(&app.buyer(), &id).await;
    assert_eq!(status["status"], "processing");
    assert_eq!(status["failureReason"], Value::Null);
    assert_eq!(status["retryAvailable"], false);
    assert_eq!(status["retryUnavailableReason"], "payment_processing");
    assert_eq!(
        app.audit_actions(&id).await,
        ["checkout_created", "payment_processing"]
    );
}
