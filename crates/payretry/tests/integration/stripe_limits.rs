//! Stripe's own rules, applied by payretry with the `stripe` provider.
//!
//! - Amounts Stripe would refuse are refused by payretry first: `400 invalid_request` naming
//!   the limit, nothing written, no call to Stripe. The sandbox keeps the contract's range.
//! - A payment Radar blocks for highest risk is read where Stripe puts its reason in a
//!   `payment_intent.payment_failed` event (`last_payment_error`).

use crate::support::app::{Options, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

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

/// `payment_intent.payment_failed` as Stripe sends it for a card payment Radar blocked as
/// highest risk: the charge's `outcome` (`type` `blocked`, `reason` `highest_risk_level`) is
/// not in the event; `last_payment_error` names the charge by id only.
fn radar_block(session: &str, decline_code: Option<&str>) -> Value {
    let mut error = json!({
        "type": "card_error", "code": "card_declined",
        "message": "Your card was declined.", "charge": "ch_test_radar",
        "payment_method": {"id": "pm_test_radar", "object": "payment_method", "type": "card"}
    });
    if let Some(code) = decline_code {
        error["decline_code"] = json!(code);
    }
    json!({
        "id": format!("evt_test_{:032x}", rand::random::<u128>()), "object": "event", "type": "payment_intent.payment_failed",
        "data": {"object": {"id": "pi_test_radar", "object": "payment_intent",
            "status": "requires_payment_method", "latest_charge": "ch_test_radar",
            "metadata": {"payment_session_id": session, "retry_attempt": "0"},
            "last_payment_error": error}}
    })
}

#[tokio::test]
async fn a_radar_block_is_judged_by_the_decline_code_the_failure_event_carries() {
    let app = stripe_app().await;
    let buyer = app.buyer();

    // Blocked with `decline_code` `fraudulent`: never retried.
    let blocked = app.create_checkout(&buyer).await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let answer = app
        .send_event(&radar_block(&blocked, Some("fraudulent")))
        .await;
    assert_eq!(answer.status(), StatusCode::OK);
    let status = app.wait_for_status(&blocked, "failed").await;
    assert_eq!(status["failureReason"], "fraudulent");
    assert_eq!(status["retryAvailable"], false);
    assert_eq!(status["retryUnavailableReason"], "failure_not_retryable");

    // Blocked with no decline code: the reason is the error code, and the default policy
    // (which no longer lists `highest_risk_level`, a reason no event carries) lets the buyer
    // try again.
    let bare = app.create_checkout(&buyer).await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let answer = app.send_event(&radar_block(&bare, None)).await;
    assert_eq!(answer.status(), StatusCode::OK);
    let status = app.wait_for_status(&bare, "failed").await;
    assert_eq!(status["failureReason"], "card_declined");
    assert_eq!(status["retryAvailable"], true);
    assert_eq!(status["retryUnavailableReason"], Value::Null);
}

/// `payretry serve --role {role}` with only `vars` set: its exit code and stderr lines.
fn serve_with(role: &str, vars: &[(&str, &str)]) -> (Option<i32>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_payretry"))
        .args(["serve", "--role", role])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PAYRETRY_LISTEN", "127.0.0.1:0")
        .env(
            "PAYRETRY_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("payretry.db").display()),
        )
        .envs(vars.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run payretry");
    assert!(
        !dir.path().join("payretry.db").exists(),
        "a refused setting must stop start-up before anything is opened"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    (
        output.status.code(),
        stderr.lines().map(str::to_owned).collect(),
    )
}

#[test]
fn stripe_without_a_public_url_stops_start_up_naming_the_variable() {
    let stripe = [
        ("PAYRETRY_PROVIDER", "stripe"),
        ("STRIPE_SECRET_KEY", "sk_test_payretry_limits"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_payretry_limits"),
    ];
    // Buyers would otherwise be sent back to http://127.0.0.1:…, even with one process.
    for role in ["all", "api", "worker"] {
        let (code, lines) = serve_with(role, &stripe);
        assert_eq!(code, Some(2), "{role}: {lines:?}");
        assert_eq!(lines.len(), 1, "{role}: {lines:?}");
        assert!(
            lines[0].starts_with("payretry: configuration error: PAYRETRY_PUBLIC_URL: ")
                && lines[0].contains("PAYRETRY_PROVIDER=stripe"),
            "{role}: {lines:?}"
        );
    }
}

/// Stripe renders events in the webhook endpoint's API version, not the request's: the
/// setup instructions must name the version payretry pins, and follow it when it changes.
#[tokio::test]
async fn the_webhook_endpoint_setup_names_the_pinned_stripe_version() {
    use payretry::provider::stripe::STRIPE_VERSION;

    let readme = include_str!("../../../../README.md");
    assert!(
        readme.contains(&format!("api_version={STRIPE_VERSION}")),
        "README's webhook endpoint setup must pass api_version={STRIPE_VERSION}"
    );

    let app = TestApp::spawn().await;
    let response = app
        .request(Method::GET, "/openapi.json", None, None, None)
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let document: Value = response.json().await.unwrap();
    let description = document["paths"]["/webhooks/stripe"]["post"]["description"]
        .as_str()
        .unwrap_or_default();
    assert!(
        description.contains(&format!("`api_version` `{STRIPE_VERSION}`")),
        "{description:?}"
    );
}
