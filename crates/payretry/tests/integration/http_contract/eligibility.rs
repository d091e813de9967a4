//! 409 / 410: eligibility (DESIGN.md §2), the refusals in the contract's order.

use super::*;

#[tokio::test]
async fn retry_of_an_open_session_is_409_payment_not_failed() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let id = app.open_session(&buyer).await.id;

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
    let id = app.declined_session(&buyer).await.id;
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
    let id = app.open_session(&buyer).await.id;
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
    let first = app.declined_session(&buyer).await.id; // insufficient_funds
    let second = app.open_session(&buyer).await.id;
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
    let id = app.declined_session(&buyer).await.id;
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
    let id = app.declined_session(&buyer).await.id;
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
    let failed = app.declined_session(&buyer).await.id;
    let open = app.create_checkout(&buyer).await;
    let paid = app.create_checkout(&buyer).await;
    let open_id = open["sessionId"].as_str().unwrap();
    let paid_id = paid["sessionId"].as_str().unwrap();
    app.pay(paid_id, 0, paid["providerSessionId"].as_str().unwrap())
        .await;
    // Until the window has passed for both.
    app.wait_for_status(open_id, "expired").await;
    app.wait_for_status(&failed, "expired").await;

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
    let id = app.declined_session(&buyer).await.id;
    assert_eq!(
        app.retry(&buyer, &id, "in-time").await.status(),
        StatusCode::ACCEPTED
    );
    // Until the window has passed: the status reports it before anything is stored.
    app.wait_for_status(&id, "expired").await;

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
