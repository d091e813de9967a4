//! 429: the per-principal and per-address budgets.

use super::*;

#[tokio::test]
async fn one_address_cannot_spread_card_testing_over_many_tokens() {
    // Arrange: one request a minute per principal, so ten per client IP.
    let app = TestApp::spawn_with(Options {
        vars: vec![("PAYRETRY_RATE_LIMIT_PER_MINUTE", "1".into())],
        ..Default::default()
    })
    .await;
    for n in 0..10 {
        app.create_checkout(&app.token(&format!("tester-{n}"), Role::Buyer))
            .await;
    }
    let baseline = writes(&app).await;

    // Act: an eleventh token from the same address.
    let fresh = app.token("tester-fresh", Role::Buyer);
    let response = app
        .request(
            Method::POST,
            "/payments/checkout",
            Some(&fresh),
            None,
            Some(json!({"amount": 2500, "currency": "usd"})),
        )
        .await;

    // Assert
    assert!(response.headers().contains_key("retry-after"));
    assert_problem(response, 429, "rate_limited").await;
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn over_the_per_principal_budget_is_429_with_retry_after() {
    let app = TestApp::spawn_with(Options {
        vars: vec![
            ("PAYRETRY_RETRY_DELAYS", "1s".into()),
            ("PAYRETRY_RATE_LIMIT_PER_MINUTE", "3".into()),
        ],
        ..Default::default()
    })
    .await;
    let buyer = app.buyer();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.create_checkout(&buyer).await["sessionId"].clone());
    }
    let baseline = writes(&app).await;

    let checkout = app
        .request(
            Method::POST,
            "/payments/checkout",
            Some(&buyer),
            None,
            Some(json!({"amount": 2500, "currency": "usd"})),
        )
        .await;
    let retry = app
        .retry(&buyer, ids[0].as_str().unwrap(), "over-budget")
        .await;

    for response in [checkout, retry] {
        let retry_after: u64 = response
            .headers()
            .get("retry-after")
            .expect("a Retry-After header")
            .to_str()
            .unwrap()
            .parse()
            .expect("Retry-After in seconds");
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        assert_problem(response, 429, "rate_limited").await;
    }
    assert_eq!(writes(&app).await, baseline);
    let other_buyer = app.token("buyer-2", Role::Buyer);
    app.create_checkout(&other_buyer).await; // another principal has its own budget
}
