//! The retry worker, the window sweeper and dead letters through the real server, against
//! the fake Stripe API (DESIGN.md §1, §2, §4, §5): the attempt cap, the window, success on an
//! older checkout, duplicate deliveries, reconciliation, provider outages and redrive, and the
//! provider contract of every checkout created.
//!
//! Where what a delivery leads to is the point, a test drives a [`Worker`] of its own, one
//! delivery at a time, beside an API-only server ([`driven`]): no polling of a running worker.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::app::{Options, Session, TestApp, assert_problem, text, with_action};
use crate::support::fake_stripe::{FailureMode, FakeStripe, TEST_SECRET_KEY};
use payretry::app::ServeRole;
use payretry::queue::{Delivery, JobQueue};
use payretry::storage::sqlite::SqliteStorage;
use payretry::worker::{Outcome, Worker, WorkerSettings};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::sync::Arc;

/// How long the polling helpers wait before failing the test.
const POLL_LIMIT: Duration = Duration::from_secs(10);
const POLL_EVERY: Duration = Duration::from_millis(50);

/// Calls through the Stripe client per failed delivery: `max_tries` of the default config.
const STRIPE_TRIES_PER_CALL: usize = 3;

async fn stripe_app(vars: Vec<(&'static str, String)>) -> TestApp {
    TestApp::spawn_with(Options {
        vars,
        stripe: true,
        ..Options::default()
    })
    .await
}

/// An API-only server on the fake Stripe API, so no worker and no sweeper of its own, and a
/// worker the test drives itself over the same embedded queue.
struct Driven {
    app: TestApp,
    queue: Arc<SqliteStorage>,
    worker: Worker,
}

async fn driven(vars: Vec<(&'static str, String)>) -> Driven {
    let app = TestApp::spawn_with(Options {
        vars,
        stripe: true,
        role: ServeRole::Api,
        ..Options::default()
    })
    .await;
    let queue = Arc::new(SqliteStorage::connect(&app.db.url).await.unwrap());
    let worker = Worker::new(
        app.payments.clone(),
        queue.clone(),
        WorkerSettings::default(),
    );
    Driven { app, queue, worker }
}

/// Receives from `queue` until a job falls due (within [`POLL_LIMIT`]); returns its delivery.
async fn next_delivery(queue: &dyn JobQueue) -> Delivery {
    let deadline = tokio::time::Instant::now() + POLL_LIMIT;
    loop {
        let mut deliveries = queue.receive(1, Duration::from_secs(60)).await.unwrap();
        if let Some(delivery) = deliveries.pop() {
            return delivery;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retry job fell due"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

fn delays(value: &str) -> (&'static str, String) {
    ("PAYRETRY_RETRY_DELAYS", value.to_owned())
}

fn fake(app: &TestApp) -> &FakeStripe {
    app.stripe
        .as_ref()
        .expect("started with the fake Stripe API")
}

/// Polls the audit log until it holds `action`; returns the whole log.
async fn wait_for_audit(app: &TestApp, id: &str, action: &str) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + POLL_LIMIT;
    loop {
        let entries = app.audit_entries(id).await;
        if !with_action(&entries, action).is_empty() {
            return entries;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {action} in the audit log of {id}: {entries:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls the fake until `done` holds.
async fn wait_for_fake(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + POLL_LIMIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(POLL_EVERY).await;
    }
}

async fn dead_letters(app: &TestApp) -> Vec<Value> {
    let response = app
        .request(
            Method::GET,
            "/admin/dead-letters",
            Some(&app.admin()),
            None,
            None,
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["deadLetters"].as_array().unwrap().clone()
}

async fn redrive(app: &TestApp, dead_letter_id: &str) -> reqwest::Response {
    app.request(
        Method::POST,
        &format!("/admin/dead-letters/{dead_letter_id}/redrive"),
        Some(&app.admin()),
        None,
        None,
    )
    .await
}

/// Declines attempt 0, makes every delivery of retry 1 fail at the provider, and waits until
/// the job is dead-lettered (`PAYRETRY_MAX_RECEIVES=2`). Returns the session, its first
/// checkout and the dead letter's id. The injected failures are used up on return.
async fn dead_lettered_session(app: &TestApp) -> (String, String, String) {
    let Session { id, checkout } = app.declined_session(&app.buyer()).await;
    // Each delivery asks the provider for the current checkout first and gives up after
    // `STRIPE_TRIES_PER_CALL` transient answers; two deliveries use exactly this many.
    fake(app).fail_next(2 * STRIPE_TRIES_PER_CALL, FailureMode::Status(500));
    assert_eq!(app.retry(&app.buyer(), &id, "key-1").await.status(), 202);
    app.wait_for_status(&id, "failed").await;
    let dead = dead_letters(app).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    (id, checkout, text(&dead[0], "id"))
}

fn dead_letter_app_vars() -> Vec<(&'static str, String)> {
    vec![delays("1s"), ("PAYRETRY_MAX_RECEIVES", "2".to_owned())]
}

/// What every checkout created at the fake must satisfy (DESIGN.md §4), and no contract
/// violation seen by the fake.
fn assert_provider_contract(fake: &FakeStripe) {
    assert_eq!(fake.violations(), Vec::<String>::new());
    for checkout in fake.checkouts() {
        let attempt = checkout.retry_attempt.to_string();
        let session = &checkout.payment_session_id;
        assert_eq!(checkout.form["metadata[retry_attempt]"], attempt);
        assert_eq!(
            checkout.form["payment_intent_data[metadata][retry_attempt]"],
            attempt
        );
        assert_eq!(checkout.form["metadata[payment_session_id]"], *session);
        assert_eq!(checkout.form["client_reference_id"], *session);
        assert_eq!(
            checkout.idempotency_key,
            format!("payretry-{session}-attempt-{attempt}")
        );
    }
}

#[tokio::test]
async fn the_fourth_retry_is_refused_and_the_last_decline_abandons_the_retry() {
    // Arrange
    let app = stripe_app(vec![delays("1s")]).await;
    let buyer = app.buyer();
    let Session {
        id,
        checkout: first_checkout,
    } = app.declined_session(&app.buyer()).await;
    let mut checkouts = vec![first_checkout];

    // Act: three retries, each declined.
    for attempt in 1..=3u32 {
        let accepted = app.retry(&buyer, &id, &format!("key-{attempt}")).await;
        assert_eq!(accepted.status(), 202);
        let accepted: Value = accepted.json().await.unwrap();
        assert_eq!(accepted["attemptNumber"], attempt);
        assert_eq!(accepted["retryAttemptsRemaining"], 3 - attempt);
        let open = app.wait_for_status(&id, "open").await;
        let checkout = text(&open, "providerSessionId");
        assert!(
            !checkouts.contains(&checkout),
            "attempt {attempt} reused a checkout"
        );
        checkouts.push(checkout);
        app.decline(&id, attempt, "insufficient_funds").await;
    }
    let refused = app.retry(&buyer, &id, "key-4").await;

    // Assert
    assert_problem(refused, 409, "retry_limit_reached").await;
    let status = app.status(&buyer, &id).await;
    assert_eq!(status["status"], "failed");
    assert_eq!(status["retryAttempts"], 3);
    assert_eq!(status["retryAttemptsRemaining"], 0);
    assert_eq!(status["retryAvailable"], false);
    assert_eq!(status["retryUnavailableReason"], "limit_reached");
    let entries = app.audit_entries(&id).await;
    assert_eq!(with_action(&entries, "retry_initiated").len(), 3);
    assert_eq!(with_action(&entries, "payment_failed").len(), 4);
    let abandoned = with_action(&entries, "retry_abandoned");
    assert_eq!(abandoned.len(), 1, "{entries:?}");
    assert_eq!(abandoned[0]["attemptNumber"], 3);
    assert_eq!(abandoned[0]["details"]["reason"], "attempts_exhausted");
    assert_eq!(
        entries.last().unwrap()["action"],
        "retry_abandoned",
        "abandoned with the last decline"
    );
    let fake = fake(&app);
    for attempt in 0..=3u32 {
        assert_eq!(fake.create_count(&id, attempt), 1, "attempt {attempt}");
    }
    // Each superseded checkout is closed; the last one is not superseded.
    wait_for_fake("three superseded checkouts expired", || {
        fake.expired_ids().len() == 3
    })
    .await;
    assert_eq!(
        fake.expired_ids().into_iter().collect::<BTreeSet<_>>(),
        checkouts[..3].iter().cloned().collect::<BTreeSet<_>>()
    );
    assert_provider_contract(fake);
}

#[tokio::test]
async fn the_worker_abandons_a_retry_that_comes_due_after_the_window() {
    // Arrange: a 2 s window and a 1 s delay; no sweeper runs, so only the worker can notice
    // the window closing. The job falls due inside the window and is handled after it.
    let d = driven(vec![
        ("PAYRETRY_PAYMENT_WINDOW", "2s".to_owned()),
        delays("1s"),
    ])
    .await;
    let app = &d.app;
    let Session {
        id,
        checkout: first_checkout,
    } = app.declined_session(&app.buyer()).await;
    let accepted = app.retry(&app.buyer(), &id, "key-1").await;
    assert_eq!(accepted.status(), 202);
    let delivery = next_delivery(d.queue.as_ref()).await;
    app.wait_for_status(&id, "expired").await;

    // Act: the worker's handling, then the closing the sweeper would do (none runs here).
    let outcome = d.worker.handle(delivery).await.unwrap();
    let closed = app.payments.close_due_checkouts(chrono::Utc::now()).await;

    // Assert
    assert_eq!(outcome, Outcome::Abandoned);
    assert_eq!(
        closed.unwrap(),
        1,
        "the expiry left the live checkout to close"
    );
    let entries = app.audit_entries(&id).await;
    let status = app.status(&app.buyer(), &id).await;
    assert_eq!(status["status"], "expired");
    assert_eq!(status["retryAttempts"], 1);
    assert_eq!(status["retryUnavailableReason"], "window_expired");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM payment_sessions WHERE status = 'expired'")
            .await,
        1,
        "the stored status, not only the reported one"
    );
    let abandoned = with_action(&entries, "retry_abandoned");
    assert_eq!(abandoned.len(), 1, "{entries:?}");
    assert_eq!(abandoned[0]["attemptNumber"], 1);
    assert_eq!(abandoned[0]["details"]["reason"], "window_expired");
    let expired = with_action(&entries, "session_expired");
    assert_eq!(expired.len(), 1, "{entries:?}");
    assert_eq!(expired[0]["details"]["previousStatus"], "retry_scheduled");
    // Expired by the worker's handling, after the window's end.
    let at = |entry: &Value| chrono::DateTime::parse_from_rfc3339(&text(entry, "at")).unwrap();
    let window_end = chrono::DateTime::parse_from_rfc3339(&text(&status, "expiresAt")).unwrap();
    assert!(
        at(expired[0]) >= window_end,
        "expired at {} before the window's end {window_end}",
        at(expired[0])
    );
    assert!(with_action(&entries, "retry_initiated").is_empty());
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 0);
    let fake = fake(app);
    assert_eq!(
        fake.create_count(&id, 1),
        0,
        "no retry checkout after the window"
    );
    assert!(
        fake.expired_ids().contains(&first_checkout),
        "the live checkout is closed"
    );
    assert_provider_contract(fake);
}

#[tokio::test]
async fn the_sweeper_expires_a_session_whose_window_closed_and_closes_its_checkout() {
    // Arrange
    let app = stripe_app(vec![("PAYRETRY_PAYMENT_WINDOW", "2s".to_owned())]).await;
    let created = app.create_checkout(&app.buyer()).await;
    let id = text(&created, "sessionId");
    let checkout = text(&created, "providerSessionId");

    // Act
    let entries = wait_for_audit(&app, &id, "session_expired").await;

    // Assert
    let status = app.status(&app.buyer(), &id).await;
    assert_eq!(status["status"], "expired");
    assert_eq!(status["checkoutUrl"], Value::Null);
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["checkout_created", "session_expired"]);
    assert_eq!(entries[1]["details"]["previousStatus"], "open");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM payment_sessions WHERE status = 'expired'")
            .await,
        1
    );
    let fake = fake(&app);
    wait_for_fake("the checkout closed at the window's end", || {
        fake.expired_ids().contains(&checkout)
    })
    .await;
    assert_eq!(fake.checkout(&checkout).unwrap().status, "expired");
    assert_provider_contract(fake);
}

#[tokio::test]
async fn a_payment_on_the_older_checkout_drops_the_pending_retry() {
    // Arrange
    let d = driven(vec![delays("1s")]).await;
    let app = &d.app;
    let Session {
        id,
        checkout: first_checkout,
    } = app.declined_session(&app.buyer()).await;
    let accepted = app.retry(&app.buyer(), &id, "key-1").await;
    assert_eq!(accepted.status(), 202);

    // Act: the buyer pays the original checkout before the retry is due.
    app.pay(&id, 0, &first_checkout).await;
    let paid = app.status(&app.buyer(), &id).await;
    // The worker receives the job when it comes due, and drops it.
    let outcome = d.worker.handle(next_delivery(d.queue.as_ref()).await).await;

    // Assert
    assert!(matches!(outcome, Ok(Outcome::Dropped(_))), "{outcome:?}");
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 0);
    assert_eq!(paid["status"], "succeeded");
    let status = app.status(&app.buyer(), &id).await;
    assert_eq!(status["status"], "succeeded");
    assert_eq!(status["providerSessionId"], first_checkout.as_str());
    let fake = fake(app);
    assert_eq!(fake.create_count(&id, 1), 0);
    assert_eq!(
        fake.requests().len(),
        1,
        "only the original create reached Stripe"
    );
    let entries = app.audit_entries(&id).await;
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "checkout_created",
            "payment_failed",
            "retry_requested",
            "payment_succeeded"
        ]
    );
    assert_eq!(entries[3]["attemptNumber"], 0);
    assert_eq!(entries[3]["details"]["droppedScheduledRetry"], 1);
    assert_provider_contract(fake);
}

#[tokio::test]
async fn a_redelivered_job_after_processing_creates_no_second_checkout() {
    // Arrange
    let d = driven(vec![delays("1s")]).await;
    let app = &d.app;
    let id = app.declined_session(&app.buyer()).await.id;
    assert_eq!(app.retry(&app.buyer(), &id, "key-1").await.status(), 202);
    let delivery = next_delivery(d.queue.as_ref()).await;
    assert_eq!(d.worker.process(&delivery).await, Outcome::CheckoutCreated);
    let open = app.status(&app.buyer(), &id).await;
    assert_eq!(open["status"], "open");

    // Act: the queue delivers the same message again.
    let again = d.worker.process(&delivery).await;

    // Assert
    assert!(matches!(again, Outcome::Dropped(_)), "{again:?}");
    let fake = fake(app);
    assert_eq!(fake.create_count(&id, 1), 1);
    let entries = app.audit_entries(&id).await;
    assert_eq!(with_action(&entries, "retry_initiated").len(), 1);
    let status = app.status(&app.buyer(), &id).await;
    assert_eq!(status["status"], "open");
    assert_eq!(status["providerSessionId"], open["providerSessionId"]);
    let current = text(&status, "providerSessionId");
    assert_eq!(fake.checkout(&current).unwrap().status, "open");
    assert_provider_contract(fake);
}

#[tokio::test]
async fn a_job_delivered_twenty_minutes_late_still_asks_for_a_checkout_stripe_accepts() {
    // Arrange: a 10-minute window, and a job that fell due 20 minutes ago and is delivered
    // only now (a backlog, an outage). Its checkout must still close at least 30 minutes
    // after the request (Stripe's minimum, which the fake enforces with a 400).
    let d = driven(vec![
        ("PAYRETRY_PAYMENT_WINDOW", "10m".to_owned()),
        delays("1s"),
    ])
    .await;
    let app = &d.app;
    let id = app.declined_session(&app.buyer()).await.id;
    assert_eq!(app.retry(&app.buyer(), &id, "key-1").await.status(), 202);
    let due = chrono::Utc::now() - chrono::TimeDelta::minutes(20);
    app.db
        .execute(&format!(
            "UPDATE retry_jobs SET run_at = {},
                payload = json_set(payload, '$.scheduledFor', '{}')",
            due.timestamp_millis(),
            due.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        ))
        .await;
    let delivery = next_delivery(d.queue.as_ref()).await;
    assert_eq!(
        delivery.job.scheduled_for.timestamp_millis(),
        due.timestamp_millis()
    );
    let sent_at = chrono::Utc::now().timestamp();

    // Act
    let outcome = d.worker.handle(delivery).await.unwrap();

    // Assert
    assert_eq!(outcome, Outcome::CheckoutCreated);
    let fake = fake(app);
    let retry = fake
        .checkouts()
        .into_iter()
        .find(|c| c.retry_attempt == 1)
        .expect("the retry's checkout");
    assert!(
        retry.expires_at - sent_at >= 30 * 60,
        "expires {} s after the request",
        retry.expires_at - sent_at
    );
    assert_eq!(app.status(&app.buyer(), &id).await["status"], "open");
    assert!(dead_letters(app).await.is_empty());
    assert_provider_contract(fake);
}

#[tokio::test]
async fn two_concurrent_deliveries_of_one_job_create_one_checkout_and_leave_it_live() {
    // Arrange: two deliveries of one job processed at once; the provider answers each one's
    // first request slowly, so both pass the session check before either commits.
    let d = driven(vec![delays("1s")]).await;
    let app = &d.app;
    let Session {
        id,
        checkout: first_checkout,
    } = app.declined_session(&app.buyer()).await;
    assert_eq!(app.retry(&app.buyer(), &id, "key-1").await.status(), 202);
    let delivery = next_delivery(d.queue.as_ref()).await;
    let fake = fake(app);
    fake.fail_next(2, FailureMode::Hang(Duration::from_millis(300)));

    // Act: both deliveries, then the closing the sweeper would do (none runs here).
    let (first, second) = tokio::join!(d.worker.process(&delivery), d.worker.process(&delivery));
    let closed = app.payments.close_due_checkouts(chrono::Utc::now()).await;

    // Assert
    let mut outcomes = [first, second];
    outcomes.sort_by_key(|o| o != &Outcome::CheckoutCreated);
    assert_eq!(
        outcomes,
        [
            Outcome::CheckoutCreated,
            Outcome::Dropped("session moved on during checkout creation")
        ]
    );
    let open = app.status(&app.buyer(), &id).await;
    assert_eq!(open["status"], "open");
    let current = text(&open, "providerSessionId");
    assert_eq!(fake.create_count(&id, 1), 1);
    let entries = app.audit_entries(&id).await;
    assert_eq!(with_action(&entries, "retry_initiated").len(), 1);
    assert_eq!(closed.unwrap(), 1);
    assert_eq!(
        fake.expired_ids(),
        [first_checkout],
        "only the superseded checkout is closed"
    );
    assert_eq!(
        fake.checkout(&current).unwrap().status,
        "open",
        "the buyer's current checkout stays payable"
    );
    assert_provider_contract(fake);
}

#[tokio::test]
async fn a_payment_the_provider_never_reported_is_found_before_retrying() {
    // Arrange: the original checkout was paid, but no webhook said so.
    let d = driven(vec![delays("1s")]).await;
    let app = &d.app;
    let Session {
        id,
        checkout: first_checkout,
    } = app.declined_session(&app.buyer()).await;
    let fake = fake(app);
    fake.mark_paid(&first_checkout);
    let accepted = app.retry(&app.buyer(), &id, "key-1").await;
    assert_eq!(accepted.status(), 202);

    // Act
    let outcome = d.worker.handle(next_delivery(d.queue.as_ref()).await).await;

    // Assert
    assert_eq!(outcome.unwrap(), Outcome::Reconciled);
    let status = app.status(&app.buyer(), &id).await;
    assert_eq!(status["status"], "succeeded");
    assert_eq!(status["retryAttempts"], 1);
    assert_eq!(status["providerSessionId"], first_checkout.as_str());
    assert_eq!(
        fake.create_count(&id, 1),
        0,
        "no retry checkout for a paid session"
    );
    let entries = app.audit_entries(&id).await;
    let succeeded = with_action(&entries, "payment_succeeded");
    assert_eq!(succeeded.len(), 1, "{entries:?}");
    assert_eq!(succeeded[0]["attemptNumber"], 0);
    assert_eq!(succeeded[0]["details"]["reconciled"], true);
    assert!(with_action(&entries, "retry_initiated").is_empty());
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 0);
    assert_provider_contract(fake);
}

#[tokio::test]
async fn a_job_the_provider_keeps_failing_is_dead_lettered_and_can_be_redriven_once() {
    // Arrange
    let app = TestApp::spawn_with(Options {
        vars: dead_letter_app_vars(),
        stripe: true,
        ..Options::default()
    })
    .await;

    // Act: two failed deliveries.
    let (id, first_checkout, dead_letter_id) = dead_lettered_session(&app).await;

    // Assert: the buyer is handed the session back, the attempt stays spent.
    let failed = app.status(&app.buyer(), &id).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["failureReason"], "retry_processing_failed");
    assert_eq!(failed["retryAttempts"], 1);
    assert_eq!(failed["retryAttemptsRemaining"], 2);
    assert_eq!(failed["retryAvailable"], true);
    assert_eq!(failed["nextRetryAt"], Value::Null);
    let dead = &dead_letters(&app).await[0];
    assert_eq!(dead["paymentSessionId"], id.as_str());
    assert_eq!(dead["attemptNumber"], 1);
    assert_eq!(dead["receiveCount"], 2);
    let last_error = text(dead, "lastError");
    assert!(!last_error.is_empty());
    assert!(!last_error.contains(TEST_SECRET_KEY), "{last_error}");
    chrono::DateTime::parse_from_rfc3339(&text(dead, "deadAt")).expect("deadAt is RFC 3339");
    let entries = app.audit_entries(&id).await;
    let dead_lettered = with_action(&entries, "retry_dead_lettered");
    assert_eq!(dead_lettered.len(), 1, "{entries:?}");
    assert_eq!(dead_lettered[0]["attemptNumber"], 1);
    assert_eq!(dead_lettered[0]["details"]["receiveCount"], 2);
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 0);
    let fake = fake(&app);
    assert_eq!(fake.create_count(&id, 1), 0);

    // Act: redrive, with the provider answering slowly enough to see the session scheduled.
    fake.fail_next(1, FailureMode::Hang(Duration::from_millis(500)));
    let redriven = redrive(&app, &dead_letter_id).await;

    // Assert
    assert_eq!(redriven.status(), StatusCode::ACCEPTED);
    let redriven: Value = redriven.json().await.unwrap();
    assert_eq!(redriven["id"], dead_letter_id.as_str());
    assert_eq!(redriven["paymentSessionId"], id.as_str());
    assert_eq!(redriven["attemptNumber"], 1);
    let scheduled = app.status(&app.buyer(), &id).await;
    assert_eq!(scheduled["status"], "retry_scheduled");
    assert_eq!(scheduled["retryAttempts"], 1, "a redrive spends no attempt");
    let open = app.wait_for_status(&id, "open").await;
    assert_ne!(open["providerSessionId"], first_checkout.as_str());
    assert_eq!(open["retryAttempts"], 1);
    assert_eq!(fake.create_count(&id, 1), 1);
    assert!(dead_letters(&app).await.is_empty());
    let entries = app.audit_entries(&id).await;
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "checkout_created",
            "payment_failed",
            "retry_requested",
            "retry_dead_lettered",
            "retry_redriven",
            "retry_initiated"
        ]
    );

    // Act + Assert: the dead letter is gone.
    assert_problem(
        redrive(&app, &dead_letter_id).await,
        404,
        "dead_letter_not_found",
    )
    .await;
    wait_for_fake("the superseded checkout closed", || {
        fake.expired_ids().contains(&first_checkout)
    })
    .await;
    assert_provider_contract(fake);
}

#[tokio::test]
async fn a_redrive_after_the_session_was_paid_is_refused() {
    // Arrange
    let app = TestApp::spawn_with(Options {
        vars: dead_letter_app_vars(),
        stripe: true,
        ..Options::default()
    })
    .await;
    let (id, first_checkout, dead_letter_id) = dead_lettered_session(&app).await;
    app.pay(&id, 0, &first_checkout).await;

    // Act
    let refused = redrive(&app, &dead_letter_id).await;

    // Assert
    assert_problem(refused, 409, "payment_already_succeeded").await;
    assert_eq!(app.status(&app.buyer(), &id).await["status"], "succeeded");
    assert_eq!(dead_letters(&app).await.len(), 1, "the dead letter stays");
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 0);
    assert!(with_action(&app.audit_entries(&id).await, "retry_redriven").is_empty());
    assert_provider_contract(fake(&app));
}

#[tokio::test]
async fn a_redrive_after_the_buyer_retried_again_is_refused() {
    // Arrange
    let app = TestApp::spawn_with(Options {
        vars: dead_letter_app_vars(),
        stripe: true,
        ..Options::default()
    })
    .await;
    let (id, _, dead_letter_id) = dead_lettered_session(&app).await;
    let again = app.retry(&app.buyer(), &id, "key-2").await;
    assert_eq!(again.status(), 202);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["attemptNumber"], 2);

    // Act
    let refused = redrive(&app, &dead_letter_id).await;

    // Assert
    assert_problem(refused, 409, "retry_already_scheduled").await;
    let open = app.wait_for_status(&id, "open").await;
    assert_eq!(open["retryAttempts"], 2);
    let fake = fake(&app);
    assert_eq!(
        fake.create_count(&id, 1),
        0,
        "the dead-lettered attempt never ran"
    );
    assert_eq!(fake.create_count(&id, 2), 1);
    assert!(with_action(&app.audit_entries(&id).await, "retry_redriven").is_empty());
    assert_provider_contract(fake);
}

#[tokio::test]
async fn the_retry_checkout_is_created_before_the_previous_one_is_closed() {
    // Arrange
    let d = driven(vec![delays("1s")]).await;
    let app = &d.app;
    let Session {
        id,
        checkout: first_checkout,
    } = app.declined_session(&app.buyer()).await;
    assert_eq!(app.retry(&app.buyer(), &id, "key-1").await.status(), 202);

    // Act: the worker's job, then the closing the sweeper would do (none runs here).
    let outcome = d
        .worker
        .process(&next_delivery(d.queue.as_ref()).await)
        .await;
    let closed = app.payments.close_due_checkouts(chrono::Utc::now()).await;

    // Assert
    assert_eq!(outcome, Outcome::CheckoutCreated);
    assert_eq!(
        closed.unwrap(),
        1,
        "the retry left the superseded checkout to close"
    );
    let open = app.status(&app.buyer(), &id).await;
    assert_eq!(open["status"], "open");
    let fake = fake(app);
    let retry_checkout = fake
        .checkout(&text(&open, "providerSessionId"))
        .expect("the session points at a checkout the fake created");
    assert_eq!(retry_checkout.payment_session_id, id);
    assert_eq!(retry_checkout.retry_attempt, 1);
    assert_eq!(retry_checkout.status, "open");
    assert_eq!(
        retry_checkout.idempotency_key,
        format!("payretry-{id}-attempt-1")
    );
    assert_eq!(fake.checkout(&first_checkout).unwrap().status, "expired");
    let requests = fake.requests();
    let position = |method: &str, path: &str| {
        requests
            .iter()
            .position(|r| r.method == method && r.path == path)
            .unwrap_or_else(|| panic!("no {method} {path} in {requests:?}"))
    };
    let retry_create = requests
        .iter()
        .rposition(|r| r.method == "POST" && r.path == "/v1/checkout/sessions")
        .unwrap();
    let expire = position(
        "POST",
        &format!("/v1/checkout/sessions/{first_checkout}/expire"),
    );
    assert!(retry_create < expire, "{requests:?}");
    assert_eq!(fake.expired_ids(), [first_checkout]);
    assert_provider_contract(fake);
}

/// The embedded queue behind a counter of separate acknowledgements.
struct CountingQueue {
    inner: payretry::storage::sqlite::SqliteStorage,
    acks: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl payretry::queue::JobQueue for CountingQueue {
    async fn receive(
        &self,
        max: u32,
        lease: Duration,
    ) -> Result<Vec<payretry::queue::Delivery>, payretry::queue::QueueError> {
        self.inner.receive(max, lease).await
    }
    async fn ack(
        &self,
        delivery: &payretry::queue::Delivery,
    ) -> Result<(), payretry::queue::QueueError> {
        self.acks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.ack(delivery).await
    }
    fn settles_in_transition(&self) -> bool {
        self.inner.settles_in_transition()
    }
    async fn release(
        &self,
        delivery: &payretry::queue::Delivery,
        error: &str,
        delay: Duration,
    ) -> Result<(), payretry::queue::QueueError> {
        self.inner.release(delivery, error, delay).await
    }
    async fn postpone(
        &self,
        delivery: &payretry::queue::Delivery,
        reason: &str,
        delay: Duration,
    ) -> Result<(), payretry::queue::QueueError> {
        self.inner.postpone(delivery, reason, delay).await
    }
    async fn extend(
        &self,
        delivery: &payretry::queue::Delivery,
        lease: Duration,
    ) -> Result<(), payretry::queue::QueueError> {
        self.inner.extend(delivery, lease).await
    }
    async fn defer(
        &self,
        delivery: &payretry::queue::Delivery,
    ) -> Result<(), payretry::queue::QueueError> {
        self.inner.defer(delivery).await
    }
    async fn ping(&self) -> Result<(), payretry::queue::QueueError> {
        self.inner.ping().await
    }
    async fn next_due(
        &self,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, payretry::queue::QueueError> {
        self.inner.next_due().await
    }
    async fn enqueued(&self) {
        self.inner.enqueued().await
    }
}

#[tokio::test]
async fn on_the_embedded_queue_the_checkout_and_its_acknowledgement_commit_together() {
    // Arrange: an API-only server, so this test's worker is the only consumer.
    let app = TestApp::spawn_with(Options {
        vars: vec![delays("1s")],
        stripe: true,
        role: ServeRole::Api,
        ..Options::default()
    })
    .await;
    let id = app.declined_session(&app.buyer()).await.id;
    assert_eq!(app.retry(&app.buyer(), &id, "key-1").await.status(), 202);
    let queue = std::sync::Arc::new(CountingQueue {
        inner: payretry::storage::sqlite::SqliteStorage::connect(&app.db.url)
            .await
            .unwrap(),
        acks: std::sync::atomic::AtomicUsize::new(0),
    });
    let worker = Worker::new(
        app.payments.clone(),
        queue.clone(),
        WorkerSettings::default(),
    );
    let delivery = next_delivery(queue.as_ref()).await;

    // Act
    let outcome = worker.handle(delivery).await.unwrap();

    // Assert: recorded and acknowledged by one commit, with no separate acknowledgement.
    assert_eq!(outcome, Outcome::CheckoutCreated);
    assert_eq!(queue.acks.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 0);
    assert_eq!(app.status(&app.buyer(), &id).await["status"], "open");
    assert_eq!(fake(&app).create_count(&id, 1), 1);
}
