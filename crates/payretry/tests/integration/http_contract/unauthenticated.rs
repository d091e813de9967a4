//! 401: a missing, malformed, expired or forged token is refused and writes nothing.

use super::*;

/// Every token the contract says is not a valid bearer (DESIGN.md §3: missing, malformed,
/// expired, wrong algorithm or signature), as `Authorization` header values.
fn invalid_authorizations() -> Vec<(&'static str, String)> {
    let valid = sign(&buyer_claims(), Algorithm::HS256, JWT_SECRET);
    let (head, rest) = valid.split_once('.').unwrap();
    let signature = rest.split_once('.').unwrap().1;
    let tampered_claims = base64url(br#"{"sub":"admin-1","role":"admin","exp":4102444800}"#);
    vec![
        ("garbage token", "Bearer not-a-jwt".to_owned()),
        ("three garbage segments", "Bearer aaa.bbb.ccc".to_owned()),
        ("empty bearer", "Bearer ".to_owned()),
        (
            "basic scheme",
            format!("Basic {}", base64url(b"buyer-1:pw")),
        ),
        ("token without scheme", valid.clone()),
        (
            "expired",
            format!(
                "Bearer {}",
                sign(
                    &json!({"sub": "buyer-1", "role": "buyer", "exp": now_secs() - 30}),
                    Algorithm::HS256,
                    JWT_SECRET
                )
            ),
        ),
        (
            "wrong key",
            format!(
                "Bearer {}",
                sign(
                    &buyer_claims(),
                    Algorithm::HS256,
                    "another-secret-that-is-at-least-32-characters"
                )
            ),
        ),
        (
            "alg none",
            format!(
                "Bearer {}.{}.",
                base64url(br#"{"alg":"none","typ":"JWT"}"#),
                base64url(buyer_claims().to_string().as_bytes())
            ),
        ),
        (
            "HS512 with the right key",
            format!(
                "Bearer {}",
                sign(&buyer_claims(), Algorithm::HS512, JWT_SECRET)
            ),
        ),
        (
            "tampered claims",
            format!("Bearer {head}.{tampered_claims}.{signature}"),
        ),
        (
            "missing sub",
            format!(
                "Bearer {}",
                sign(
                    &json!({"role": "buyer", "exp": now_secs() + 600}),
                    Algorithm::HS256,
                    JWT_SECRET
                )
            ),
        ),
        (
            "empty sub",
            format!(
                "Bearer {}",
                sign(
                    &json!({"sub": " ", "role": "buyer", "exp": now_secs() + 600}),
                    Algorithm::HS256,
                    JWT_SECRET
                )
            ),
        ),
        (
            "missing exp",
            format!(
                "Bearer {}",
                sign(
                    &json!({"sub": "buyer-1", "role": "buyer"}),
                    Algorithm::HS256,
                    JWT_SECRET
                )
            ),
        ),
        (
            "missing role",
            format!(
                "Bearer {}",
                sign(
                    &json!({"sub": "buyer-1", "exp": now_secs() + 600}),
                    Algorithm::HS256,
                    JWT_SECRET
                )
            ),
        ),
        (
            "unknown role",
            format!(
                "Bearer {}",
                sign(
                    &json!({"sub": "buyer-1", "role": "root", "exp": now_secs() + 600}),
                    Algorithm::HS256,
                    JWT_SECRET
                )
            ),
        ),
    ]
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn buyer_claims() -> Value {
    json!({"sub": "buyer-1", "role": "buyer", "exp": now_secs() + 600})
}

/// An HS-family JWT over arbitrary claims.
fn sign(claims: &Value, algorithm: Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn missing_authorization_is_401_on_every_protected_route() {
    let app = TestApp::spawn().await;
    let id = app.open_session(&app.buyer()).await.id;
    let baseline = writes(&app).await;
    let routes = [
        (Method::POST, "/payments/checkout".to_owned()),
        (Method::GET, format!("/payments/checkout/{id}/status")),
        (Method::POST, format!("/payments/retry/{id}")),
        (Method::GET, format!("/payments/checkout/{id}/audit")),
        (Method::GET, "/admin/dead-letters".to_owned()),
        (Method::POST, "/admin/dead-letters/1/redrive".to_owned()),
    ];

    for (method, path) in routes {
        let response = app
            .request(
                method.clone(),
                &path,
                None,
                Some("k"),
                Some(json!({"amount": 2500, "currency": "usd"})),
            )
            .await;

        let problem = assert_problem(response, 401, "unauthenticated").await;
        assert_nothing_internal(&problem);
    }
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn malformed_expired_or_forged_tokens_are_401_and_write_nothing() {
    let app = TestApp::spawn().await;
    let id = app.open_session(&app.buyer()).await.id;
    app.decline(&id, 0, "insufficient_funds").await;
    let baseline = writes(&app).await;

    for (case, authorization) in invalid_authorizations() {
        let checkout = app
            .http
            .post(app.url("/payments/checkout"))
            .header("Authorization", &authorization)
            .header("Idempotency-Key", format!("auth-{case}"))
            .json(&json!({"amount": 2500, "currency": "usd"}))
            .send()
            .await
            .unwrap();
        let status = app
            .http
            .get(app.url(&format!("/payments/checkout/{id}/status")))
            .header("Authorization", &authorization)
            .send()
            .await
            .unwrap();
        let retry = app
            .http
            .post(app.url(&format!("/payments/retry/{id}")))
            .header("Authorization", &authorization)
            .header("Idempotency-Key", format!("auth-{case}"))
            .send()
            .await
            .unwrap();

        for response in [checkout, status, retry] {
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{case}");
            assert_problem(response, 401, "unauthenticated").await;
        }
    }
    assert_eq!(writes(&app).await, baseline);
}

#[tokio::test]
async fn freshly_signed_hs256_token_is_accepted() {
    // The control for the 401 cases: the same claims, correctly signed, work.
    let app = TestApp::spawn().await;
    let token = sign(&buyer_claims(), Algorithm::HS256, JWT_SECRET);

    let created = app.create_checkout(&token).await;

    assert_eq!(created["status"], "open");
}
