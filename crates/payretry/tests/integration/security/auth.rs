//! Bearer tokens: `nbf`, one `Authorization` header, the scheme's case, an exact `sub`.

use crate::support::app::{JWT_SECRET, TestApp, assert_problem};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn now() -> u64 {
    chrono::Utc::now().timestamp() as u64
}

fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

async fn status_with(app: &TestApp, id: &str, authorization: &[&str]) -> reqwest::Response {
    let mut request = app
        .http
        .get(app.url(&format!("/payments/checkout/{id}/status")));
    for value in authorization {
        request = request.header("Authorization", *value);
    }
    request.send().await.unwrap()
}

async fn session_of(app: &TestApp, buyer: &str) -> String {
    let token = app.token(buyer, payretry_domain::Role::Buyer);
    app.open_session(&token).await.id
}

#[tokio::test]
async fn a_token_not_yet_valid_is_refused() {
    let app = TestApp::spawn().await;
    let id = session_of(&app, "buyer-1").await;
    let later =
        sign(&json!({"sub": "buyer-1", "role": "buyer", "exp": now() + 7200, "nbf": now() + 3600}));
    let earlier =
        sign(&json!({"sub": "buyer-1", "role": "buyer", "exp": now() + 7200, "nbf": now() - 60}));

    let refused = status_with(&app, &id, &[&format!("Bearer {later}")]).await;
    assert_problem(refused, 401, "unauthenticated").await;
    let admitted = status_with(&app, &id, &[&format!("Bearer {earlier}")]).await;
    assert_eq!(admitted.status(), StatusCode::OK);
}

#[tokio::test]
async fn two_authorization_headers_are_refused_whichever_comes_first() {
    let app = TestApp::spawn().await;
    let id = session_of(&app, "buyer-1").await;
    let owner = format!(
        "Bearer {}",
        app.token("buyer-1", payretry_domain::Role::Buyer)
    );
    let stranger = format!(
        "Bearer {}",
        app.token("buyer-2", payretry_domain::Role::Buyer)
    );

    for pair in [[&owner, &stranger], [&stranger, &owner], [&owner, &owner]] {
        let response = status_with(&app, &id, &[pair[0], pair[1]]).await;
        let body = assert_problem(response, 400, "invalid_request").await;
        assert!(
            body["detail"].as_str().unwrap().contains("Authorization"),
            "{body}"
        );
    }
    let one = status_with(&app, &id, &[&owner]).await;
    assert_eq!(one.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let app = TestApp::spawn().await;
    let id = session_of(&app, "buyer-1").await;
    let token = app.token("buyer-1", payretry_domain::Role::Buyer);
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let response = status_with(&app, &id, &[&format!("{scheme} {token}")]).await;
        assert_eq!(response.status(), StatusCode::OK, "{scheme}");
    }
    let basic = status_with(&app, &id, &[&format!("Basic {token}")]).await;
    assert_problem(basic, 401, "unauthenticated").await;
}

#[tokio::test]
async fn a_sub_with_surrounding_spaces_is_not_another_users_id() {
    // Arrange: buyer_a's session.
    let app = TestApp::spawn().await;
    let id = session_of(&app, "buyer_a").await;

    // Act + Assert: "  buyer_a  " is refused outright, for reading and for writing.
    for sub in ["  buyer_a  ", "buyer_a ", "\tbuyer_a"] {
        let token = sign(&json!({"sub": sub, "role": "buyer", "exp": now() + 600}));
        let read = status_with(&app, &id, &[&format!("Bearer {token}")]).await;
        assert_problem(read, 401, "unauthenticated").await;
        let retry = app
            .request(
                Method::POST,
                &format!("/payments/retry/{id}"),
                Some(&token),
                Some("key-1"),
                None,
            )
            .await;
        assert_problem(retry, 401, "unauthenticated").await;
    }
}
