//! With the `stripe` provider, amounts Stripe would refuse are refused by payretry first:
//! `400 invalid_request` naming the limit, nothing written, no call to Stripe. The sandbox
//! keeps accepting the contract's whole range.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::app::{Options, TestApp};

async fn stripe_app() -> TestApp {
    TestApp::spawn_with(Options {
        stripe: true,
        ..Options::default()
    })
    .await
}

/// Rows in every table a checkout writes.
async fn writes(app: &TestApp) -> [i64; 4] {
    [
        app.count("SELECT COUNT(*) FROM payment_sessions").await,
        app.count("SELECT COUNT(*) FROM idempotency_keys").await,
        app.count("SELECT COUNT(*) FROM payment_attempts").await,
        app.count("SELECT COUNT(*) FROM audit_log").await,
    ]
}

async fn checkout(
    app: &TestApp,
    key: Option<&str>,
    amount: i64,
    currency: &str,
) -> (StatusCode, String, Value) {
    let response = app
        .request(
            Method::POST,
            "/payments/checkout",
            Some(&app.buyer()),
            key,
            Some(json!({"amount": amount, "currency": currency, "description": "Order 123"})),
        )
        .await;
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, content_type, response.json().await.unwrap())
}

/// Asserts a 400 `invalid_request` problem whose detail contains `limit`.
fn assert_refused(answer: &(StatusCode, String, Value), limit: &str) {
    let (status, content_type, problem) = answer;
    assert_eq!(*status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(problem["status"], 400);
    assert_eq!(problem["code"], "invalid_request");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(limit), "{detail:?} should name {limit:?}");
}

#[tokio::test]
async fn an_amount_below_the_currencys_minimum_is_refused_before_stripe_is_called() {
    let app = stripe_app().await;
    let stripe = app.stripe.as_ref().unwrap();
    let baseline = writes(&app).await;

    for (amount, currency, limit) in [
        (49, "usd", "at least 50 for `usd`"),
        (29, "gbp", "at least 30 for `gbp`"),
        (1, "eur", "at least 50 for `eur`"),
        (49, "jpy", "at least 50 for `jpy`"),
    ] {
        // With and without an Idempotency-Key: a refused request stores nothing either way.
        for key in [None, Some(format!("tiny-{currency}"))] {
            let answer = checkout(&app, key.as_deref(), amount, currency).await;
            assert_refused(&answer, limit);
        }
    }

    assert_eq!(stripe.requests().len(), 0, "Stripe must not be asked");
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn a_three_decimal_amount_must_end_in_zero_and_isk_must_be_whole_kronur() {
    let app = stripe_app().await;
    let stripe = app.stripe.as_ref().unwrap();
    let baseline = writes(&app).await;

    for currency in ["kwd", "bhd", "jod", "omr", "tnd"] {
        let answer = checkout(&app, None, 5124, currency).await;
        assert_refused(&answer, "multiple of 10");
    }
    let answer = checkout(&app, None, 4010, "isk").await;
    assert_refused(&answer, "multiple of 100");

    assert_eq!(stripe.requests().len(), 0, "Stripe must not be asked");
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn amounts_stripe_accepts_create_a_checkout() {
    let app = stripe_app().await;
    let stripe = app.stripe.as_ref().unwrap();

    for (amount, currency) in [
        (50, "usd"),
        (30, "gbp"),
        (50, "jpy"),
        (5120, "kwd"),
        (4000, "isk"),
        (17_501, "huf"),
        (1, "krw"),
        (2500, "usd"),
    ] {
        let (status, _, created) = checkout(&app, None, amount, currency).await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "{amount} {currency}: {created}"
        );
        assert_eq!(created["amount"], amount);
        assert_eq!(created["currency"], currency);
    }
    assert_eq!(stripe.create_requests(), 8);
    assert!(stripe.violations().is_empty(), "{:?}", stripe.violations());
}

#[tokio::test]
async fn the_sandbox_keeps_the_whole_contract_range() {
    let app = TestApp::spawn().await;
    for (amount, currency) in [(1, "usd"), (29, "gbp"), (5124, "kwd"), (4010, "isk")] {
        let (status, _, created) = checkout(&app, None, amount, currency).await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "{amount} {currency}: {created}"
        );
    }
}
