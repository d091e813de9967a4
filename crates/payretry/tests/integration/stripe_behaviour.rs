//! Stripe as it really behaves, through the real server and the fake Stripe API: payments
//! that settle later (bank debits), checkouts closed once nobody should pay them, 409s while
//! a create with the same key is still running, 500s Stripe saves and replays under the key,
//! and `Stripe-Should-Retry`.

use crate::support::app::{
    Database, Options, Queue, TestApp, assert_problem, declined_event, text,
};
use crate::support::fake_stripe::{CreateMode, FailureMode, FakeStripe};
use payretry::provider::stripe::StripeProvider;
use payretry::provider::{CheckoutRequest, PaymentProvider, ProviderError, checkout_expires_at};
use payretry_domain::{Amount, AttemptNumber, Currency, Money, PaymentSessionId};
use reqwest::StatusCode;
use serde_json::Value;
use std::time::Duration;

/// The fake Stripe API with 1 s retry delays and `vars` on top, on `database`.
async fn stripe_app(database: Database, vars: &[(&'static str, &str)]) -> TestApp {
    let mut all = vec![("PAYRETRY_RETRY_DELAYS", "1s,1s,1s".to_owned())];
    all.extend(vars.iter().map(|(k, v)| (*k, (*v).to_owned())));
    TestApp::spawn_with(Options {
        stripe: true,
        vars: all,
        ..Options::on(database, Queue::Embedded)
    })
    .await
}

fn stripe(app: &TestApp) -> &FakeStripe {
    app.stripe
        .as_ref()
        .expect("the app runs on the fake Stripe")
}

/// A new session and its first checkout's id.
async fn session(app: &TestApp) -> (String, String) {
    let created = app.create_checkout(&app.buyer()).await;
    (
        text(&created, "sessionId"),
        text(&created, "providerSessionId"),
    )
}

/// Sends the event Stripe would send about `checkout` now, and expects its 200.
async fn deliver(app: &TestApp, kind: &str, checkout: &str) {
    let response = app.send_event(&stripe(app).event(kind, checkout)).await;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "{kind}: {body}");
}

/// Declines the current attempt by card and waits for the retry's checkout to open.
async fn retried(app: &TestApp, id: &str, attempt: u32) -> Value {
    app.decline(id, attempt - 1, "card_declined").await;
    let response = app
        .retry(&app.buyer(), id, &format!("retry-{id}-{attempt}"))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let status = app.wait_for_status(id, "open").await;
    assert_eq!(status["retryAttempts"], attempt);
    status
}

/// The bank-debit double charge of issue 12: a card decline, then a bank debit completed on
/// the same page. While the debit settles the session is `processing`, nothing offers or
/// accepts a retry, a late card decline changes nothing, and the debit's success ends it
/// with the one checkout ever created: one charge.
async fn a_bank_debit_after_a_card_decline_is_charged_once(database: Database) {
    let app = stripe_app(database, &[]).await;
    let (id, checkout) = session(&app).await;
    app.decline(&id, 0, "card_declined").await;
    let failed = app.wait_for_status(&id, "failed").await;
    assert_eq!(failed["retryAvailable"], true);

    stripe(&app).mark_complete_unpaid(&checkout);
    deliver(&app, "checkout.session.completed", &checkout).await;
    let processing = app.wait_for_status(&id, "processing").await;
    assert_eq!(processing["retryAvailable"], false);
    assert_eq!(processing["retryUnavailableReason"], "payment_processing");
    let refused = app.retry(&app.buyer(), &id, "retry-while-processing").await;
    assert_problem(refused, 409, "payment_processing").await;

    // The card decline's event, delivered late and out of order, does not reopen retries.
    let late = app
        .send_event(&declined_event(&id, 0, "insufficient_funds"))
        .await;
    assert_eq!(late.status(), StatusCode::OK);
    assert_eq!(app.status(&app.admin(), &id).await["status"], "processing");

    stripe(&app).mark_paid(&checkout);
    deliver(&app, "checkout.session.async_payment_succeeded", &checkout).await;
    let paid = app.wait_for_status(&id, "succeeded").await;
    assert_eq!(paid["retryAttempts"], 0);
    assert_eq!(
        stripe(&app).checkouts().len(),
        1,
        "one checkout, one charge"
    );
    let actions = app.audit_actions(&id).await;
    assert!(
        actions.contains(&"payment_processing".to_owned()),
        "{actions:?}"
    );
    assert_eq!(stripe(&app).violations(), Vec::<String>::new());
}

#[tokio::test]
async fn a_bank_debit_after_a_card_decline_is_charged_once_on_sqlite() {
    a_bank_debit_after_a_card_decline_is_charged_once(Database::Sqlite).await;
}

#[tokio::test]
async fn a_bank_debit_after_a_card_decline_is_charged_once_on_postgres() {
    a_bank_debit_after_a_card_decline_is_charged_once(Database::Postgres).await;
}

#[tokio::test]
async fn a_debit_that_does_not_settle_hands_the_session_back_for_a_retry() {
    let app = stripe_app(Database::Sqlite, &[]).await;
    let (id, checkout) = session(&app).await;
    stripe(&app).mark_complete_unpaid(&checkout);
    deliver(&app, "checkout.session.completed", &checkout).await;
    app.wait_for_status(&id, "processing").await;

    stripe(&app).mark_debit_failed(&checkout);
    deliver(&app, "checkout.session.async_payment_failed", &checkout).await;
    let failed = app.wait_for_status(&id, "failed").await;
    assert_eq!(failed["failureReason"], "async_payment_failed");
    assert_eq!(failed["retryAvailable"], true);
    let accepted = app.retry(&app.buyer(), &id, "retry-after-debit").await;
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    let open = app.wait_for_status(&id, "open").await;
    assert_ne!(text(&open, "providerSessionId"), checkout);
}

/// Money may still move after the window: the sweeper leaves a processing session alone, and
/// a debit that then fails ends it `expired`.
#[tokio::test]
async fn a_processing_payment_outlives_the_window_until_its_outcome() {
    let app = stripe_app(Database::Sqlite, &[("PAYRETRY_PAYMENT_WINDOW", "2s")]).await;
    let (id, checkout) = session(&app).await;
    stripe(&app).mark_complete_unpaid(&checkout);
    deliver(&app, "checkout.session.completed", &checkout).await;
    let processing = app.wait_for_status(&id, "processing").await;
    let window_end = chrono::DateTime::parse_from_rfc3339(&text(&processing, "expiresAt")).unwrap();
    while chrono::Utc::now() <= window_end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.payments.expire_due_sessions().await.unwrap(), 0);
    let after = app.status(&app.admin(), &id).await;
    assert_eq!(after["status"], "processing");
    assert_eq!(after["retryUnavailableReason"], "payment_processing");

    stripe(&app).mark_debit_failed(&checkout);
    deliver(&app, "checkout.session.async_payment_failed", &checkout).await;
    let expired = app.wait_for_status(&id, "expired").await;
    assert_eq!(expired["retryAvailable"], false);
}

/// The completion webhook was lost: when the retry job comes due, the worker asks Stripe
/// about the current checkout, finds it complete but unpaid, and records `processing`
/// instead of opening a second checkout the buyer could pay by card.
#[tokio::test]
async fn the_worker_finds_a_processing_payment_before_opening_a_retry() {
    let app = stripe_app(Database::Sqlite, &[]).await;
    let (id, checkout) = session(&app).await;
    app.decline(&id, 0, "card_declined").await;
    let accepted = app.retry(&app.buyer(), &id, "retry-1").await;
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    stripe(&app).mark_complete_unpaid(&checkout);

    let processing = app.wait_for_status(&id, "processing").await;
    assert_eq!(processing["retryAvailable"], false);
    assert_eq!(stripe(&app).create_count(&id, 1), 0, "no retry checkout");
}

/// Paid through attempt 1's checkout while attempt 2's is live: attempt 2's is closed, so
/// the buyer cannot pay twice.
#[tokio::test]
async fn a_payment_on_an_older_checkout_closes_the_current_one() {
    let app = stripe_app(Database::Sqlite, &[]).await;
    let (id, _) = session(&app).await;
    let first = retried(&app, &id, 1).await;
    let second = retried(&app, &id, 2).await;
    let (older, current) = (
        text(&first, "providerSessionId"),
        text(&second, "providerSessionId"),
    );

    stripe(&app).mark_paid(&older);
    deliver(&app, "checkout.session.completed", &older).await;
    app.wait_for_status(&id, "succeeded").await;
    // The payment's commit wakes the sweeper, which closes it (a bounded wait, no fixed sleep).
    let closed = stripe(&app).wait_for_checkout(&current, "expired").await;
    assert_eq!(
        closed.status, "expired",
        "the current checkout can no longer be paid"
    );
    assert!(stripe(&app).expired_ids().contains(&current));
    assert_eq!(
        app.settled_count("SELECT COUNT(*) FROM checkout_closures", 0)
            .await,
        0,
        "nothing left to close"
    );
}

/// A checkout to close while Stripe is down stays recorded, and the sweeper closes it once
/// Stripe answers, after its backoff; nothing is left behind.
#[tokio::test]
async fn a_checkout_that_could_not_be_closed_is_closed_later() {
    let app = stripe_app(Database::Sqlite, &[]).await;
    let (id, checkout) = session(&app).await;
    let unwanted = [payretry_domain::ProviderSessionId::new(checkout.clone())];
    // The first close and its two retries inside the Stripe client.
    stripe(&app).fail_next(3, FailureMode::Status(503));
    app.payments
        .storage
        .schedule_checkout_closures(&PaymentSessionId::parse(&id).unwrap(), &unwanted)
        .await
        .unwrap();
    let tried = app
        .settled_count("SELECT COUNT(*) FROM checkout_closures WHERE tries = 1", 1)
        .await;
    assert_eq!(tried, 1, "the first close failed and was kept for later");
    assert_eq!(stripe(&app).checkout(&checkout).unwrap().status, "open");

    let closed = stripe(&app).wait_for_checkout(&checkout, "expired").await;
    assert_eq!(closed.status, "expired");
    assert_eq!(
        app.settled_count("SELECT COUNT(*) FROM checkout_closures", 0)
            .await,
        0
    );
}

/// Polls the fake until `checkout` reads `status` (15 s at most: a closure's first backoff is
/// 5 s), and returns it as last read.
/// payretry's own timeout (2 s here) fires while Stripe is still creating the checkout; every
/// retry meanwhile meets 409 `idempotency_key_in_use`. Not one job is dead-lettered, and each
/// attempt gets exactly one checkout once the running create finishes.
#[tokio::test]
async fn a_storm_of_409s_dead_letters_nothing() {
    const SESSIONS: usize = 6;
    let app = stripe_app(Database::Sqlite, &[("PAYRETRY_MAX_RECEIVES", "10")]).await;
    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        let (id, _) = session(&app).await;
        app.decline(&id, 0, "card_declined").await;
        ids.push(id);
    }
    stripe(&app).next_creates(SESSIONS, CreateMode::InFlight(Duration::from_millis(2500)));
    for id in &ids {
        let accepted = app.retry(&app.buyer(), id, &format!("retry-{id}")).await;
        assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    }
    for id in &ids {
        app.wait_for_status(id, "open").await;
        assert_eq!(stripe(&app).create_count(id, 1), 1, "one checkout for {id}");
    }
    assert!(stripe(&app).conflicts() > 0, "the storm happened");
    assert_eq!(
        app.admin_list("/admin/dead-letters", "deadLetters").await,
        Vec::<Value>::new()
    );
    assert_eq!(stripe(&app).violations(), Vec::<String>::new());
}

/// Stripe saved a 500 under the attempt's key and says not to retry: the job is
/// dead-lettered at once (no hammering), the buyer gets the session back, and an admin's
/// redrive repeats the very same request (no key reused with other parameters), which Stripe
/// answers with the saved failure again. The buyer's own retry is a new attempt and works.
#[tokio::test]
async fn a_saved_server_error_dead_letters_and_a_redrive_repeats_the_same_request() {
    let app = stripe_app(Database::Sqlite, &[]).await;
    let (id, _) = session(&app).await;
    app.decline(&id, 0, "card_declined").await;
    stripe(&app).next_creates(1, CreateMode::SavedServerError);
    let accepted = app.retry(&app.buyer(), &id, "retry-1").await;
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    let failed = app.wait_for_status(&id, "failed").await;
    assert_eq!(failed["failureReason"], "retry_processing_failed");
    let key = format!("payretry-{id}-attempt-1");
    let sent = |app: &TestApp| {
        stripe(app)
            .requests()
            .iter()
            .filter(|r| r.idempotency_key.as_deref() == Some(key.as_str()))
            .count()
    };
    assert_eq!(sent(&app), 1, "Stripe-Should-Retry: false is not retried");

    let dead = app.admin_list("/admin/dead-letters", "deadLetters").await;
    assert_eq!(dead.len(), 1);
    let redrive = app
        .request(
            reqwest::Method::POST,
            &format!("/admin/dead-letters/{}/redrive", text(&dead[0], "id")),
            Some(&app.admin()),
            None,
            None,
        )
        .await;
    assert_eq!(redrive.status(), StatusCode::ACCEPTED);
    let mut again = Vec::new();
    for _ in 0..200 {
        again = app.admin_list("/admin/dead-letters", "deadLetters").await;
        if !again.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        again.len(),
        1,
        "the replayed failure dead-letters the job again"
    );
    assert!(
        text(&again[0], "lastError").contains("replays"),
        "{}",
        again[0]
    );
    assert_eq!(sent(&app), 2);
    let requests: Vec<_> = stripe(&app)
        .requests()
        .into_iter()
        .filter(|r| r.idempotency_key.as_deref() == Some(key.as_str()))
        .collect();
    assert_eq!(
        requests[0].body, requests[1].body,
        "the redrive repeats the request"
    );
    assert_eq!(stripe(&app).violations(), Vec::<String>::new());

    let status = app.wait_for_status(&id, "failed").await;
    assert_eq!(status["retryAvailable"], true);
    let second = app.retry(&app.buyer(), &id, "retry-2").await;
    assert_eq!(second.status(), StatusCode::ACCEPTED);
    let open = app.wait_for_status(&id, "open").await;
    assert_eq!(open["retryAttempts"], 2);
    assert_eq!(stripe(&app).create_count(&id, 2), 1);
}

fn checkout_request() -> CheckoutRequest {
    let session_id = PaymentSessionId::from_random(rand::random());
    let now = chrono::Utc::now();
    CheckoutRequest {
        success_url: format!("https://payretry.example/pay/{session_id}?result=success"),
        cancel_url: format!("https://payretry.example/pay/{session_id}"),
        session_id,
        attempt: AttemptNumber::new(1),
        money: Money {
            amount: Amount::new(2500).unwrap(),
            currency: Currency::parse("usd").unwrap(),
        },
        description: "Order 123".to_owned(),
        expires_at: checkout_expires_at(now + chrono::TimeDelta::hours(24), now),
    }
}

#[tokio::test]
async fn a_conflict_is_retried_under_the_same_key() {
    let fake = FakeStripe::start().await;
    let provider = StripeProvider::new(fake.provider_config()).unwrap();
    fake.fail_next(2, FailureMode::Status(409));
    let request = checkout_request();
    provider.create_checkout(&request).await.unwrap();
    assert_eq!(fake.create_requests(), 3);
    assert_eq!(fake.create_count(&request.session_id, 1), 1);
}

#[tokio::test]
async fn stripe_should_retry_decides_when_present() {
    let fake = FakeStripe::start().await;
    let provider = StripeProvider::new(fake.provider_config()).unwrap();
    fake.fail_next(1, FailureMode::StatusWithShouldRetry(503, false));
    let result = provider.create_checkout(&checkout_request()).await;
    assert!(
        matches!(result, Err(ProviderError::Permanent(_))),
        "{result:?}"
    );
    assert_eq!(fake.create_requests(), 1, "not retried");

    fake.fail_next(1, FailureMode::StatusWithShouldRetry(400, true));
    provider.create_checkout(&checkout_request()).await.unwrap();
    assert_eq!(
        fake.create_requests(),
        3,
        "a 400 marked retryable is retried once"
    );
}

#[tokio::test]
async fn a_replayed_server_error_is_final_under_its_key() {
    let fake = FakeStripe::start().await;
    let provider = StripeProvider::new(fake.provider_config()).unwrap();
    fake.next_creates(1, CreateMode::SavedServerError);
    let request = checkout_request();
    let first = provider.create_checkout(&request).await;
    assert!(
        matches!(first, Err(ProviderError::Permanent(_))),
        "{first:?}"
    );
    let replayed = provider.create_checkout(&request).await;
    match replayed {
        Err(ProviderError::Permanent(message)) => {
            assert!(message.contains("replays"), "{message}");
        }
        other => panic!("expected the replayed failure, got {other:?}"),
    }
    assert_eq!(
        fake.create_requests(),
        2,
        "one request per call: no retries"
    );
    assert_eq!(fake.create_count(&request.session_id, 1), 0);
}
