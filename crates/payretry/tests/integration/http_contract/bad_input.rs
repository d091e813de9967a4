//! 400: bad input is refused with its code and writes nothing.

use super::*;

/// Posts a retry with an arbitrary `Idempotency-Key` header value.
async fn retry_with_key_bytes(app: &TestApp, token: &str, id: &str, key: &[u8]) -> Response {
    app.http
        .post(app.url(&format!("/payments/retry/{id}")))
        .bearer_auth(token)
        .header("Idempotency-Key", HeaderValue::from_bytes(key).unwrap())
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn malformed_json_and_wrong_types_are_400_and_write_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let baseline = writes(&app).await;
    let bodies: [&[u8]; 12] = [
        b"",
        b"{",
        b"not json",
        b"null",
        b"[2500, \"usd\"]",
        br#"{"amount": "2500", "currency": "usd"}"#,
        br#"{"amount": 25.5, "currency": "usd"}"#,
        br#"{"amount": 2500, "currency": 840}"#,
        br#"{"amount": 2500}"#,
        br#"{"currency": "usd"}"#,
        br#"{"amount": 1e20, "currency": "usd"}"#,
        br#"{"amount": 99999999999999999999, "currency": "usd"}"#,
    ];

    for body in bodies {
        let response = post_raw(
            &app,
            "/payments/checkout",
            Some(&buyer),
            Some("bad-body"),
            body.to_vec(),
        )
        .await;

        let problem = assert_problem(response, 400, "invalid_request").await;
        assert_nothing_internal(&problem);
    }
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn amount_outside_1_to_99_999_999_is_400_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let baseline = writes(&app).await;

    for amount in [json!(0), json!(-1), json!(-2500), json!(100_000_000)] {
        let response = app
            .request(
                Method::POST,
                "/payments/checkout",
                Some(&buyer),
                Some(&format!("amount-{amount}")),
                Some(json!({"amount": amount, "currency": "usd"})),
            )
            .await;

        assert_problem(response, 400, "invalid_request").await;
    }
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn amount_bounds_1_and_99_999_999_are_accepted() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();

    for amount in [1, 99_999_999] {
        let response = app
            .request(
                Method::POST,
                "/payments/checkout",
                Some(&buyer),
                None,
                Some(json!({"amount": amount, "currency": "usd"})),
            )
            .await;

        assert_eq!(response.status(), StatusCode::CREATED, "amount {amount}");
        let created: Value = response.json().await.unwrap();
        assert_eq!(created["amount"], amount);
    }
}

#[tokio::test]
async fn currency_other_than_three_lowercase_letters_is_400_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let baseline = writes(&app).await;

    for currency in ["USD", "Usd", "us", "usdd", "", "u$d", "€ur"] {
        let response = app
            .request(
                Method::POST,
                "/payments/checkout",
                Some(&buyer),
                None,
                Some(json!({"amount": 2500, "currency": currency})),
            )
            .await;

        assert_problem(response, 400, "invalid_request").await;
    }
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn metadata_that_is_not_an_object_is_400_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let baseline = writes(&app).await;

    for metadata in [json!([1, 2]), json!("order 123"), json!(42), json!(true)] {
        let response = app
            .request(
                Method::POST,
                "/payments/checkout",
                Some(&buyer),
                None,
                Some(json!({"amount": 2500, "currency": "usd", "metadata": metadata})),
            )
            .await;

        assert_problem(response, 400, "invalid_request").await;
    }
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn retry_without_idempotency_key_is_400_missing_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let id = app.declined_session(&buyer).await.id;
    let baseline = writes(&app).await;

    let response = app
        .request(
            Method::POST,
            &format!("/payments/retry/{id}"),
            Some(&buyer),
            None,
            None,
        )
        .await;

    assert_problem(response, 400, "idempotency_key_missing").await;
    assert_eq!(writes(&app).await, baseline);
    assert_eq!(app.status(&buyer, &id).await["retryAttempts"], 0);
}

#[tokio::test]
async fn invalid_idempotency_keys_are_400_invalid_and_write_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let id = app.declined_session(&buyer).await.id;
    let baseline = writes(&app).await;
    let too_long = "k".repeat(256);
    let keys: [&[u8]; 5] = [
        b"",
        too_long.as_bytes(),
        b"tab\tkey",
        "cl\u{e9}".as_bytes(),
        b"\x80\xff",
    ];

    for key in keys {
        let retry = retry_with_key_bytes(&app, &buyer, &id, key).await;
        let checkout = app
            .http
            .post(app.url("/payments/checkout"))
            .bearer_auth(&buyer)
            .header("Idempotency-Key", HeaderValue::from_bytes(key).unwrap())
            .json(&json!({"amount": 2500, "currency": "usd"}))
            .send()
            .await
            .unwrap();

        assert_problem(retry, 400, "idempotency_key_invalid").await;
        assert_problem(checkout, 400, "idempotency_key_invalid").await;
    }
    assert_eq!(writes(&app).await, baseline);
    assert_eq!(app.status(&buyer, &id).await["retryAttempts"], 0);
}

#[tokio::test]
async fn idempotency_key_of_255_printable_characters_is_accepted() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let id = app.declined_session(&buyer).await.id;
    let key = format!("~ !{}", "k".repeat(252));
    assert_eq!(key.len(), 255);

    let response = app.retry(&buyer, &id, &key).await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_description_with_control_characters_is_400_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let baseline = writes(&app).await;
    for description in ["a\u{0}b", "tab\there", "   "] {
        let response = app
            .request(
                Method::POST,
                "/payments/checkout",
                Some(&buyer),
                None,
                Some(json!({"amount": 2500, "currency": "usd", "description": description})),
            )
            .await;
        assert_problem(response, 400, "invalid_request").await;
    }
    assert_eq!(writes(&app).await, baseline);
}
