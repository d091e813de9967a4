//! Idempotency: replays, key conflicts, keys in flight and the retry race.

use super::*;

/// The fingerprint of crates/payretry/src/http/idempotency.rs: sha256 hex of
/// "{method} {path}\n{body}".
fn retry_fingerprint(id: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(format!("POST /payments/retry/{id}\n").as_bytes());
    hasher.update(body);
    hex::encode(hasher.finalize())
}

/// Inserts an idempotency record that is still in flight (no response stored yet).
async fn insert_in_flight_key(app: &TestApp, caller: &str, key: &str, fingerprint: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&app.db.url).await.unwrap();
    let now = Utc::now().timestamp_millis();
    sqlx::query(
        "INSERT INTO idempotency_keys
            (caller, idempotency_key, fingerprint, response_status, response_body, locked_at, created_at)
         VALUES (?, ?, ?, NULL, NULL, ?, ?)",
    )
    .bind(caller)
    .bind(key)
    .bind(fingerprint)
    .bind(now)
    .bind(now)
    .execute(&mut conn)
    .await
    .unwrap();
}

#[tokio::test]
async fn replayed_retry_is_byte_identical_and_spends_no_attempt() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let id = app.declined_session(&buyer).await.id;
    let first = app.retry(&buyer, &id, "replay-me").await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first = first.bytes().await.unwrap();
    let after_first = writes(&app).await;

    let replay = app.retry(&buyer, &id, "replay-me").await;

    assert_eq!(replay.status(), StatusCode::ACCEPTED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["content-type"], "application/json");
    assert_eq!(replay.bytes().await.unwrap(), first, "byte for byte");
    assert_eq!(writes(&app).await, after_first);
    assert_eq!(after_first.retry_jobs, 1);
    let status = app.status(&buyer, &id).await;
    assert_eq!(status["retryAttempts"], 1);
    assert_eq!(
        app.audit_actions(&id)
            .await
            .iter()
            .filter(|a| *a == "retry_requested")
            .count(),
        1
    );
}

#[tokio::test]
async fn same_key_for_a_different_request_is_422_and_writes_nothing() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let first = app.declined_session(&buyer).await.id;
    let second = app.declined_session(&buyer).await.id;
    assert_eq!(
        app.retry(&buyer, &first, "reused").await.status(),
        StatusCode::ACCEPTED
    );
    let baseline = writes(&app).await;

    let other_path = app.retry(&buyer, &second, "reused").await;
    let other_body = post_raw(
        &app,
        &format!("/payments/retry/{first}"),
        Some(&buyer),
        Some("reused"),
        br#"{"note": "again"}"#.to_vec(),
    )
    .await;
    let other_route = app
        .request(
            Method::POST,
            "/payments/checkout",
            Some(&buyer),
            Some("reused"),
            Some(json!({"amount": 2500, "currency": "usd"})),
        )
        .await;

    assert_problem(other_path, 422, "idempotency_key_reused").await;
    assert_problem(other_body, 422, "idempotency_key_reused").await;
    assert_problem(other_route, 422, "idempotency_key_reused").await;
    assert_eq!(writes(&app).await, baseline);
    let untouched = app.status(&buyer, &second).await;
    assert_eq!(untouched["status"], "failed");
    assert_eq!(untouched["retryAttempts"], 0);
}

#[tokio::test]
async fn replayed_checkout_creation_returns_the_same_session() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let body = json!({"amount": 2500, "currency": "usd", "description": "Order 123"});
    let first = app
        .request(
            Method::POST,
            "/payments/checkout",
            Some(&buyer),
            Some("order-123"),
            Some(body.clone()),
        )
        .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first = first.bytes().await.unwrap();

    let replay = app
        .request(
            Method::POST,
            "/payments/checkout",
            Some(&buyer),
            Some("order-123"),
            Some(body),
        )
        .await;
    let changed = app
        .request(
            Method::POST,
            "/payments/checkout",
            Some(&buyer),
            Some("order-123"),
            Some(json!({"amount": 9900, "currency": "usd", "description": "Order 123"})),
        )
        .await;

    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.bytes().await.unwrap(), first, "byte for byte");
    assert_problem(changed, 422, "idempotency_key_reused").await;
    assert_eq!(app.count("SELECT COUNT(*) FROM payment_sessions").await, 1);
    let created: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(created["amount"], 2500);
}

#[tokio::test]
async fn refused_retry_is_stored_and_replayed() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let id = app.open_session(&buyer).await.id;
    let refused = app.retry(&buyer, &id, "too-early").await;
    assert!(refused.headers().get("idempotent-replayed").is_none());
    let refused = refused.bytes().await.unwrap();
    app.decline(&id, 0, "insufficient_funds").await;

    let replay = app.retry(&buyer, &id, "too-early").await;
    let fresh = app.retry(&buyer, &id, "now-failed").await;

    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["content-type"], "application/problem+json");
    assert_eq!(replay.status(), StatusCode::CONFLICT);
    assert_eq!(replay.bytes().await.unwrap(), refused, "byte for byte");
    let problem: Value = serde_json::from_slice(&refused).unwrap();
    assert_eq!(problem["code"], "payment_not_failed");
    assert_eq!(
        fresh.status(),
        StatusCode::ACCEPTED,
        "a new key sees the session as it is now"
    );
}

#[tokio::test]
async fn idempotency_keys_are_scoped_to_the_caller() {
    let app = app_with_long_delays().await;
    let alice = app.buyer();
    let bob = app.token("buyer-2", Role::Buyer);
    let alices = app.declined_session(&alice).await.id;
    let bobs = app.declined_session(&bob).await.id;

    let alice_retry = app.retry(&alice, &alices, "shared-key").await;
    let bob_retry = app.retry(&bob, &bobs, "shared-key").await;
    let alice_again = app.retry(&alice, &alices, "probe").await;
    let bob_probe = app.retry(&bob, &alices, "probe").await;

    assert_eq!(alice_retry.status(), StatusCode::ACCEPTED);
    assert_eq!(bob_retry.status(), StatusCode::ACCEPTED);
    assert!(bob_retry.headers().get("idempotent-replayed").is_none());
    let bobs_body: Value = bob_retry.json().await.unwrap();
    assert_eq!(bobs_body["sessionId"], bobs.as_str());
    assert_problem(alice_again, 409, "retry_already_scheduled").await;
    // Same key, same request, another caller: no replay of Alice's answer.
    assert!(bob_probe.headers().get("idempotent-replayed").is_none());
    assert_problem(bob_probe, 404, "session_not_found").await;
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 2);
}

#[tokio::test]
async fn key_still_in_flight_is_409_idempotency_key_in_use() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let id = app.declined_session(&buyer).await.id;
    insert_in_flight_key(&app, "buyer-1", "in-flight", &retry_fingerprint(&id, b"")).await;
    let baseline = writes(&app).await;

    let response = app.retry(&buyer, &id, "in-flight").await;

    assert_problem(response, 409, "idempotency_key_in_use").await;
    assert_eq!(writes(&app).await, baseline);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM idempotency_keys WHERE response_status IS NULL")
            .await,
        1,
        "the in-flight claim is left as it was"
    );
    assert_eq!(app.status(&buyer, &id).await["retryAttempts"], 0);
}

#[tokio::test]
async fn twenty_concurrent_retries_schedule_exactly_one() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let id = app.declined_session(&buyer).await.id;
    let url = app.url(&format!("/payments/retry/{id}"));

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let request = app
            .http
            .post(&url)
            .bearer_auth(&buyer)
            .header("Idempotency-Key", format!("race-{i}"));
        tasks.spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (status, body)
        });
    }
    let answers = tasks.join_all().await;

    let accepted: Vec<_> = answers.iter().filter(|(s, _)| *s == 202).collect();
    assert_eq!(accepted.len(), 1, "{answers:?}");
    for (status, body) in answers.iter().filter(|(s, _)| *s != 202) {
        assert_eq!(*status, 409, "{body}");
        assert_eq!(body["code"], "retry_already_scheduled", "{body}");
    }
    assert_eq!(accepted[0].1["attemptNumber"], 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 1);
    assert_eq!(app.status(&buyer, &id).await["retryAttempts"], 1);
}

#[tokio::test]
async fn concurrent_retries_with_one_key_spend_one_attempt() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let id = app.declined_session(&buyer).await.id;
    let url = app.url(&format!("/payments/retry/{id}"));

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let request = app
            .http
            .post(&url)
            .bearer_auth(&buyer)
            .header("Idempotency-Key", "same-click");
        tasks.spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let replayed = response.headers().contains_key("idempotent-replayed");
            let body = response.bytes().await.unwrap();
            (status, replayed, body)
        });
    }
    let answers = tasks.join_all().await;

    // The retry stores its response in its own transaction, so a request that lost the race
    // (its commit found the key answered, or the session already scheduled) replays the
    // winner's answer instead of refusing.
    let originals: Vec<_> = answers.iter().filter(|(s, r, _)| *s == 202 && !r).collect();
    assert_eq!(originals.len(), 1, "{answers:?}");
    for (status, replayed, body) in &answers {
        assert_eq!(*status, 202, "{body:?}");
        assert_eq!(body, &originals[0].2, "a replay is the original's bytes");
        if !std::ptr::eq(body, &originals[0].2) {
            assert!(replayed, "every other answer is marked as a replay");
        }
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 1);
    assert_eq!(app.status(&buyer, &id).await["retryAttempts"], 1);
}
