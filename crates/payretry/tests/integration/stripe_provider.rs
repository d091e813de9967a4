//! `StripeProvider` against a real local HTTP server that behaves like the Stripe API
//! (`support::fake_stripe`): the request contract, idempotency under retries, the
//! transient / permanent split, state mapping, and that the secret key never leaks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::support::fake_stripe::{FailureMode, FakeStripe, TEST_SECRET_KEY};
use chrono::{TimeDelta, Utc};
use payretry::provider::stripe::{STRIPE_VERSION, StripeConfig, StripeProvider};
use payretry::provider::{
    CheckoutRequest, CheckoutState, PaymentProvider, ProviderError, checkout_expires_at,
};
use payretry::secret::Secret;
use payretry_domain::{
    Amount, AttemptNumber, Currency, Money, PaymentSessionId, ProviderSessionId,
};

fn checkout_request(attempt: u32) -> CheckoutRequest {
    let session_id = PaymentSessionId::from_random(rand::random());
    let now = Utc::now();
    CheckoutRequest {
        success_url: format!("https://payretry.example/pay/{session_id}?result=success"),
        cancel_url: format!("https://payretry.example/pay/{session_id}?result=cancel"),
        session_id,
        attempt: AttemptNumber::new(attempt),
        money: Money {
            amount: Amount::new(2500).unwrap(),
            currency: Currency::parse("usd").unwrap(),
        },
        description: "Order 123".to_owned(),
        expires_at: checkout_expires_at(now + TimeDelta::hours(24), now),
    }
}

fn provider(config: StripeConfig) -> StripeProvider {
    StripeProvider::new(config).expect("a valid Stripe config")
}

fn transient(result: Result<impl std::fmt::Debug, ProviderError>) -> String {
    match result {
        Err(ProviderError::Transient(message)) => message,
        other => panic!("expected a transient error, got {other:?}"),
    }
}

fn permanent(result: Result<impl std::fmt::Debug, ProviderError>) -> String {
    match result {
        Err(ProviderError::Permanent(message)) => message,
        other => panic!("expected a permanent error, got {other:?}"),
    }
}

#[tokio::test]
async fn create_sends_exactly_the_contract_fields_and_headers() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config());
    let request = checkout_request(0);

    let checkout = provider.create_checkout(&request).await.unwrap();

    assert!(checkout.id.as_str().starts_with("cs_test_"), "{checkout:?}");
    assert_eq!(
        checkout.url,
        format!("{}/pay/{}", stripe.base_url(), checkout.id)
    );
    assert_eq!(
        checkout.expires_at.timestamp(),
        request.expires_at.timestamp()
    );

    let sid = request.session_id.to_string();
    let expected: BTreeMap<String, String> = [
        ("mode", "payment".to_owned()),
        ("line_items[0][price_data][currency]", "usd".to_owned()),
        ("line_items[0][price_data][unit_amount]", "2500".to_owned()),
        (
            "line_items[0][price_data][product_data][name]",
            "Order 123".to_owned(),
        ),
        ("line_items[0][quantity]", "1".to_owned()),
        ("success_url", request.success_url.clone()),
        ("cancel_url", request.cancel_url.clone()),
        ("client_reference_id", sid.clone()),
        ("metadata[payment_session_id]", sid.clone()),
        ("metadata[retry_attempt]", "0".to_owned()),
        (
            "payment_intent_data[metadata][payment_session_id]",
            sid.clone(),
        ),
        (
            "payment_intent_data[metadata][retry_attempt]",
            "0".to_owned(),
        ),
        ("expires_at", request.expires_at.timestamp().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let checkouts = stripe.checkouts();
    assert_eq!(checkouts.len(), 1);
    assert_eq!(checkouts[0].form, expected);
    assert_eq!(checkouts[0].id, checkout.id.as_str());
    assert_eq!(checkouts[0].payment_session_id, sid);
    assert_eq!(checkouts[0].retry_attempt, 0);

    let requests = stripe.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!(
        (sent.method.as_str(), sent.path.as_str()),
        ("POST", "/v1/checkout/sessions")
    );
    assert_eq!(
        sent.authorization.as_deref(),
        Some(format!("Bearer {TEST_SECRET_KEY}").as_str())
    );
    assert_eq!(sent.stripe_version.as_deref(), Some(STRIPE_VERSION));
    assert_eq!(
        sent.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        sent.idempotency_key.as_deref(),
        Some(format!("payretry-{sid}-attempt-0").as_str())
    );
    assert_eq!(stripe.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn a_retry_attempt_carries_its_number_in_metadata_and_key() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config());
    let request = checkout_request(2);

    provider.create_checkout(&request).await.unwrap();

    let checkout = &stripe.checkouts()[0];
    let sid = request.session_id.as_str();
    assert_eq!(
        checkout.idempotency_key,
        format!("payretry-{sid}-attempt-2")
    );
    assert_eq!(checkout.retry_attempt, 2);
    assert_eq!(checkout.form["metadata[retry_attempt]"], "2");
    assert_eq!(
        checkout.form["payment_intent_data[metadata][retry_attempt]"],
        "2"
    );
    assert_eq!(stripe.create_count(&request.session_id, request.attempt), 1);
    assert_eq!(stripe.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn creating_the_same_attempt_twice_returns_the_same_checkout() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config());
    let request = checkout_request(1);

    let first = provider.create_checkout(&request).await.unwrap();
    let second = provider.create_checkout(&request).await.unwrap();

    assert_eq!(first, second);
    assert_eq!(stripe.create_count(&request.session_id, 1), 1);
    assert_eq!(stripe.create_requests(), 2);
    assert_eq!(stripe.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn each_attempt_gets_its_own_checkout() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config());
    let original = checkout_request(0);
    let retry = CheckoutRequest {
        attempt: AttemptNumber::new(1),
        ..original.clone()
    };

    let a = provider.create_checkout(&original).await.unwrap();
    let b = provider.create_checkout(&retry).await.unwrap();

    assert_ne!(a.id, b.id);
    assert_eq!(stripe.create_count(&original.session_id, 0), 1);
    assert_eq!(stripe.create_count(&original.session_id, 1), 1);
    assert_eq!(stripe.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn a_server_error_is_retried_under_the_same_key_and_creates_one_checkout() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config());
    let request = checkout_request(1);
    stripe.fail_next(1, FailureMode::Status(500));

    let checkout = provider.create_checkout(&request).await.unwrap();

    assert_eq!(stripe.create_count(&request.session_id, 1), 1);
    assert_eq!(stripe.checkouts()[0].id, checkout.id.as_str());
    let requests = stripe.requests();
    assert_eq!(requests.len(), 2);
    let key = Some(request.idempotency_key());
    assert!(
        requests.iter().all(|r| r.idempotency_key == key),
        "{requests:?}"
    );
    assert_eq!(
        requests[0].body, requests[1].body,
        "the retry sends the same form"
    );
    assert_eq!(stripe.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn a_rate_limit_without_retry_after_backs_off_and_succeeds() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config());
    stripe.fail_next(2, FailureMode::Status(429));

    provider
        .create_checkout(&checkout_request(0))
        .await
        .unwrap();

    assert_eq!(stripe.create_requests(), 3);
    assert_eq!(stripe.checkouts().len(), 1);
}

#[tokio::test]
async fn retry_after_on_a_rate_limit_is_honoured() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config()); // 10 ms initial backoff
    stripe.fail_next(
        1,
        FailureMode::StatusWithRetryAfter(429, Duration::from_secs(1)),
    );

    let started = Instant::now();
    provider
        .create_checkout(&checkout_request(0))
        .await
        .unwrap();
    let elapsed = started.elapsed();

    assert!(elapsed >= Duration::from_secs(1), "waited only {elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "waited {elapsed:?}");
    assert_eq!(stripe.create_requests(), 2);
    assert_eq!(stripe.checkouts().len(), 1);
}

#[tokio::test]
async fn server_errors_until_max_tries_end_transient() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config()); // 3 tries
    stripe.fail_next(5, FailureMode::Status(503));

    let message = transient(provider.create_checkout(&checkout_request(0)).await);

    assert!(message.contains("503"), "{message}");
    assert_eq!(stripe.create_requests(), 3);
    assert!(stripe.checkouts().is_empty());
}

#[tokio::test]
async fn a_hang_longer_than_the_timeout_is_retried_then_transient() {
    let stripe = FakeStripe::start().await;
    let provider = provider(StripeConfig {
        request_timeout: Duration::from_millis(200),
        max_tries: 3,
        ..stripe.provider_config()
    });
    let request = checkout_request(1);
    stripe.fail_next(3, FailureMode::Hang(Duration::from_secs(5)));

    let started = Instant::now();
    let message = transient(provider.create_checkout(&request).await);
    let elapsed = started.elapsed();

    assert!(message.contains("timed out"), "{message}");
    assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
    let requests = stripe.requests();
    assert_eq!(requests.len(), 3);
    let key = Some(request.idempotency_key());
    assert!(
        requests.iter().all(|r| r.idempotency_key == key),
        "{requests:?}"
    );
}

#[tokio::test]
async fn a_single_hang_is_retried_and_still_creates_one_checkout() {
    let stripe = FakeStripe::start().await;
    let provider = provider(StripeConfig {
        request_timeout: Duration::from_millis(200),
        ..stripe.provider_config()
    });
    let request = checkout_request(0);
    // The hung request may still be handled after the client gave up, as at Stripe;
    // the idempotency key makes it a replay, not a second checkout.
    stripe.fail_next(1, FailureMode::Hang(Duration::from_millis(400)));

    let checkout = provider.create_checkout(&request).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;

    assert_eq!(stripe.create_count(&request.session_id, 0), 1);
    assert_eq!(stripe.checkouts()[0].id, checkout.id.as_str());
    assert_eq!(stripe.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn a_bad_request_is_permanent_without_retries() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config());
    stripe.fail_next(1, FailureMode::Status(400));

    let message = permanent(provider.create_checkout(&checkout_request(0)).await);

    assert!(message.contains("400"), "{message}");
    assert_eq!(stripe.create_requests(), 1);
    assert!(stripe.checkouts().is_empty());
}

#[tokio::test]
async fn a_request_stripe_rejects_is_permanent_and_names_the_problem() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config());
    let now = Utc::now();
    let too_soon = CheckoutRequest {
        // Not clamped with `checkout_expires_at`: Stripe refuses under 30 minutes.
        expires_at: now + TimeDelta::minutes(10),
        ..checkout_request(0)
    };

    let message = permanent(provider.create_checkout(&too_soon).await);

    assert!(message.contains("expires_at"), "{message}");
    assert!(message.contains("invalid_request_error"), "{message}");
    assert_eq!(stripe.create_requests(), 1);
    assert!(stripe.checkouts().is_empty());
    assert_eq!(stripe.violations().len(), 1, "{:?}", stripe.violations());
}

#[tokio::test]
async fn retrieve_maps_every_checkout_state() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config());
    let mut ids = Vec::new();
    for attempt in 0..4 {
        ids.push(
            provider
                .create_checkout(&checkout_request(attempt))
                .await
                .unwrap()
                .id,
        );
    }
    stripe.mark_paid(ids[1].as_str());
    stripe.mark_complete_unpaid(ids[2].as_str());
    provider.expire_checkout(&ids[3]).await.unwrap();
    let failed_debit = provider
        .create_checkout(&checkout_request(4))
        .await
        .unwrap()
        .id;
    stripe.mark_complete_unpaid(failed_debit.as_str());
    stripe.mark_debit_failed(failed_debit.as_str());
    ids.push(failed_debit);

    let mut states = Vec::new();
    for id in &ids {
        states.push(provider.retrieve_checkout(id).await.unwrap());
    }

    assert_eq!(
        states,
        [
            CheckoutState::Open,
            CheckoutState::Paid,
            CheckoutState::Processing,
            CheckoutState::Expired,
            CheckoutState::CompleteUnpaid,
        ]
    );
    let gets = stripe
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET")
        .count();
    assert_eq!(gets, 5);
    assert_eq!(stripe.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn retrieve_retries_a_transient_failure() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config());
    let id = provider
        .create_checkout(&checkout_request(0))
        .await
        .unwrap()
        .id;
    stripe.mark_paid(id.as_str());
    stripe.fail_next(1, FailureMode::Status(502));

    assert_eq!(
        provider.retrieve_checkout(&id).await,
        Ok(CheckoutState::Paid)
    );
}

#[tokio::test]
async fn retrieve_of_an_unknown_checkout_is_permanent() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config());

    let message = permanent(
        provider
            .retrieve_checkout(&ProviderSessionId::new("cs_test_nope"))
            .await,
    );

    assert!(
        message.contains("404") && message.contains("resource_missing"),
        "{message}"
    );
    assert_eq!(stripe.requests().len(), 1);
}

#[tokio::test]
async fn expire_closes_an_open_checkout_and_closing_it_again_is_ok() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config());
    let id = provider
        .create_checkout(&checkout_request(0))
        .await
        .unwrap()
        .id;

    provider.expire_checkout(&id).await.unwrap();
    provider.expire_checkout(&id).await.unwrap();

    assert_eq!(stripe.expired_ids(), vec![id.to_string()]);
    assert_eq!(stripe.checkout(id.as_str()).unwrap().status, "expired");
    assert_eq!(stripe.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn expiring_a_paid_checkout_is_ok_and_leaves_it_paid() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config());
    let id = provider
        .create_checkout(&checkout_request(0))
        .await
        .unwrap()
        .id;
    stripe.mark_paid(id.as_str());

    provider.expire_checkout(&id).await.unwrap();

    assert!(stripe.expired_ids().is_empty());
    assert_eq!(
        provider.retrieve_checkout(&id).await,
        Ok(CheckoutState::Paid)
    );
}

#[tokio::test]
async fn expiring_an_unknown_checkout_is_permanent() {
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config());

    permanent(
        provider
            .expire_checkout(&ProviderSessionId::new("cs_test_nope"))
            .await,
    );
}

#[tokio::test]
async fn the_secret_key_never_appears_in_errors() {
    let stripe = FakeStripe::start().await;
    // The fake echoes a rejected key verbatim in its 401 message (real Stripe masks it).
    let live_key = "sk_live_51TopSecretDoNotLeak";
    let test_key = "sk_test_51TopSecretDoNotLeak";
    let with_key = |key: &str| StripeConfig {
        secret_key: Secret::new(key),
        request_timeout: Duration::from_millis(200),
        max_tries: 2,
        ..stripe.provider_config()
    };
    let mut errors = Vec::new();

    let rejected = provider(with_key(live_key));
    errors.push(
        rejected
            .create_checkout(&checkout_request(0))
            .await
            .unwrap_err(),
    );
    errors.push(
        rejected
            .retrieve_checkout(&ProviderSessionId::new("cs_test_x"))
            .await
            .unwrap_err(),
    );

    let accepted = provider(with_key(test_key));
    stripe.fail_next(2, FailureMode::Status(500));
    errors.push(
        accepted
            .create_checkout(&checkout_request(0))
            .await
            .unwrap_err(),
    );
    stripe.fail_next(2, FailureMode::Hang(Duration::from_secs(2)));
    errors.push(
        accepted
            .create_checkout(&checkout_request(0))
            .await
            .unwrap_err(),
    );
    stripe.fail_next(1, FailureMode::Status(400));
    errors.push(
        accepted
            .create_checkout(&checkout_request(0))
            .await
            .unwrap_err(),
    );
    errors.push(
        accepted
            .expire_checkout(&ProviderSessionId::new("cs_test_missing"))
            .await
            .unwrap_err(),
    );

    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let unreachable = provider(StripeConfig {
        api_base: format!("http://127.0.0.1:{closed_port}"),
        ..with_key(test_key)
    });
    errors.push(
        unreachable
            .create_checkout(&checkout_request(0))
            .await
            .unwrap_err(),
    );

    assert!(errors[0].to_string().contains("401"), "{}", errors[0]);
    assert!(
        errors[0].to_string().contains("[redacted]"),
        "the echoed key is scrubbed: {}",
        errors[0]
    );
    assert!(errors[6].is_transient(), "{:?}", errors[6]);
    for error in &errors {
        let shown = format!("{error} {error:?}");
        assert!(!shown.contains("TopSecretDoNotLeak"), "{shown}");
    }
    for printed in [format!("{accepted:?}"), format!("{:?}", with_key(test_key))] {
        assert!(!printed.contains("TopSecretDoNotLeak"), "{printed}");
    }
}

#[tokio::test]
async fn concurrent_creates_for_one_attempt_make_one_checkout() {
    // A redelivered queue message racing the original delivery.
    let stripe = FakeStripe::start().await;
    let provider = provider(stripe.provider_config());
    let request = checkout_request(1);

    let (a, b) = tokio::join!(
        provider.create_checkout(&request),
        provider.create_checkout(&request)
    );

    assert_eq!(a.unwrap(), b.unwrap());
    assert_eq!(stripe.create_count(&request.session_id, 1), 1);
    assert_eq!(stripe.violations(), Vec::<String>::new());
}

/// The fake is only worth something if it refuses what Stripe or the contract would: these
/// talk to it directly, without the provider.
mod fake_stripe_itself {
    use super::*;

    async fn raw_create(
        stripe: &FakeStripe,
        key: Option<&str>,
        version: Option<&str>,
        form: &[(&str, String)],
    ) -> (u16, serde_json::Value) {
        let mut request = reqwest::Client::new()
            .post(format!("{}/v1/checkout/sessions", stripe.base_url()))
            .bearer_auth(TEST_SECRET_KEY)
            .form(form);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(version) = version {
            request = request.header("Stripe-Version", version);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    fn contract_form(request: &CheckoutRequest) -> Vec<(&'static str, String)> {
        let sid = request.session_id.to_string();
        let attempt = request.attempt.to_string();
        vec![
            ("mode", "payment".to_owned()),
            ("line_items[0][price_data][currency]", "usd".to_owned()),
            ("line_items[0][price_data][unit_amount]", "2500".to_owned()),
            (
                "line_items[0][price_data][product_data][name]",
                "Order 123".to_owned(),
            ),
            ("line_items[0][quantity]", "1".to_owned()),
            ("success_url", request.success_url.clone()),
            ("cancel_url", request.cancel_url.clone()),
            ("client_reference_id", sid.clone()),
            ("metadata[payment_session_id]", sid.clone()),
            ("metadata[retry_attempt]", attempt.clone()),
            ("payment_intent_data[metadata][payment_session_id]", sid),
            ("payment_intent_data[metadata][retry_attempt]", attempt),
            ("expires_at", request.expires_at.timestamp().to_string()),
        ]
    }

    #[tokio::test]
    async fn replays_a_key_and_refuses_it_with_other_parameters() {
        let stripe = FakeStripe::start().await;
        let request = checkout_request(0);
        let key = request.idempotency_key();
        let form = contract_form(&request);

        let (first_status, first) =
            raw_create(&stripe, Some(&key), Some(STRIPE_VERSION), &form).await;
        let (replay_status, replay) =
            raw_create(&stripe, Some(&key), Some(STRIPE_VERSION), &form).await;
        let mut other = form.clone();
        other[2].1 = "9999".to_owned();
        let (conflict_status, conflict) =
            raw_create(&stripe, Some(&key), Some(STRIPE_VERSION), &other).await;

        assert_eq!((first_status, replay_status), (200, 200));
        assert_eq!(first, replay);
        assert_eq!(conflict_status, 400);
        assert_eq!(conflict["error"]["type"], "idempotency_error");
        assert_eq!(stripe.create_count(&request.session_id, 0), 1);
        assert_eq!(stripe.create_requests(), 3);
        assert_eq!(stripe.violations().len(), 1, "{:?}", stripe.violations());
    }

    #[tokio::test]
    async fn flags_missing_extra_and_malformed_fields() {
        let stripe = FakeStripe::start().await;
        let request = checkout_request(0);
        let mut form = contract_form(&request);
        form.retain(|(name, _)| *name != "cancel_url");
        form.push(("customer_email", "a@b.example".to_owned()));
        form[1].1 = "USD".to_owned();

        let (status, body) = raw_create(
            &stripe,
            Some(&request.idempotency_key()),
            Some(STRIPE_VERSION),
            &form,
        )
        .await;

        assert_eq!(status, 400);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let violations = stripe.violations().join("\n");
        for expected in [
            "missing parameter cancel_url",
            "unexpected parameter customer_email",
            "currency must be three lowercase letters",
        ] {
            assert!(violations.contains(expected), "{violations}");
        }
        assert!(stripe.checkouts().is_empty());
    }

    #[tokio::test]
    async fn flags_a_missing_version_or_a_wrong_idempotency_key() {
        let stripe = FakeStripe::start().await;
        let request = checkout_request(3);
        let form = contract_form(&request);

        let (no_version, _) =
            raw_create(&stripe, Some(&request.idempotency_key()), None, &form).await;
        let (no_key, _) = raw_create(&stripe, None, Some(STRIPE_VERSION), &form).await;
        let (wrong_key, _) = raw_create(
            &stripe,
            Some("payretry-ps_x-attempt-3"),
            Some(STRIPE_VERSION),
            &form,
        )
        .await;

        assert_eq!((no_version, no_key, wrong_key), (400, 400, 400));
        let violations = stripe.violations().join("\n");
        assert!(violations.contains("Stripe-Version"), "{violations}");
        assert!(
            violations.contains("Idempotency-Key header missing"),
            "{violations}"
        );
        assert!(
            violations.contains("expected \"payretry-ps_"),
            "{violations}"
        );
        assert!(stripe.checkouts().is_empty());
    }
}
