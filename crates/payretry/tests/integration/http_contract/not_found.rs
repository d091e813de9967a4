//! 404: unknown, malformed and other buyers' sessions, unknown dead letters.

use super::*;

const UNKNOWN_SESSION: &str = "ps_00000000000000000000000000000000";

#[tokio::test]
async fn redrive_of_an_unknown_dead_letter_is_404() {
    let app = TestApp::spawn().await;

    for id in [
        "999999",
        "not-a-dead-letter",
        "0",
        "-1",
        "1.5",
        "99999999999999999999",
    ] {
        let response = app
            .request(
                Method::POST,
                &format!("/admin/dead-letters/{id}/redrive"),
                Some(&app.admin()),
                None,
                None,
            )
            .await;

        assert_problem(response, 404, "dead_letter_not_found").await;
    }
}

#[tokio::test]
async fn unknown_or_malformed_session_id_is_404_session_not_found() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let admin = app.admin();

    for id in [UNKNOWN_SESSION, "not-a-session", "ps_", "ps_a-b", "cs_123"] {
        let status = get(
            &app,
            &format!("/payments/checkout/{id}/status"),
            Some(&buyer),
        )
        .await;
        let retry = app.retry(&buyer, id, &format!("unknown-{id}")).await;
        let audit = get(
            &app,
            &format!("/payments/checkout/{id}/audit"),
            Some(&admin),
        )
        .await;

        assert_problem(status, 404, "session_not_found").await;
        assert_problem(retry, 404, "session_not_found").await;
        assert_problem(audit, 404, "session_not_found").await;
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 0);
}

#[tokio::test]
async fn another_buyers_session_is_404_not_403_and_is_left_alone() {
    let app = TestApp::spawn().await;
    let owner = app.buyer();
    let stranger = app.token("buyer-2", Role::Buyer);
    let id = app.declined_session(&owner).await.id;
    let unknown = get(
        &app,
        &format!("/payments/checkout/{UNKNOWN_SESSION}/status"),
        Some(&stranger),
    )
    .await;
    let unknown = assert_problem(unknown, 404, "session_not_found").await;

    let status = get(
        &app,
        &format!("/payments/checkout/{id}/status"),
        Some(&stranger),
    )
    .await;
    let retry = app.retry(&stranger, &id, "steal").await;

    let status = assert_problem(status, 404, "session_not_found").await;
    let retry = assert_problem(retry, 404, "session_not_found").await;
    assert_eq!(
        status, unknown,
        "a foreign session looks exactly like a missing one"
    );
    assert_eq!(
        retry, unknown,
        "a foreign session looks exactly like a missing one"
    );
    let seen_by_owner = app.status(&owner, &id).await;
    assert_eq!(seen_by_owner["status"], "failed");
    assert_eq!(seen_by_owner["retryAttempts"], 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM retry_jobs").await, 0);
}

#[tokio::test]
async fn support_and_admin_may_read_and_retry_a_buyers_session() {
    let app = app_with_long_delays().await;
    let buyer = app.buyer();
    let first = app.declined_session(&buyer).await.id;
    let second = app.declined_session(&buyer).await.id;
    let support = app.token("support-1", Role::Support);

    let seen = app.status(&support, &first).await;
    let by_support = app.retry(&support, &first, "staff-retry").await;
    let by_admin = app.retry(&app.admin(), &second, "staff-retry").await;

    assert_eq!(seen["sessionId"], first.as_str());
    assert_eq!(by_support.status(), StatusCode::ACCEPTED);
    assert_eq!(by_admin.status(), StatusCode::ACCEPTED);
}
