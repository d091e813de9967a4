//! `/readyz` tells a load balancer the truth: 503 while the database is unreachable, with
//! nothing internal in the body, while `/healthz` (the process is alive) stays 200.

use crate::support::app::{Database, Options, Queue, TestApp, assert_problem};
use reqwest::Method;
use serde_json::Value;

#[tokio::test]
async fn readyz_answers_503_while_the_database_is_gone() {
    // Arrange: a healthy app on its own PostgreSQL database.
    let app = TestApp::spawn_with(Options::on(Database::Postgres, Queue::Embedded)).await;
    let buyer = app.buyer();
    let id = app.open_session(&buyer).await.id;
    assert_eq!(
        app.request(Method::GET, "/readyz", None, None, None)
            .await
            .status(),
        200
    );

    // Act: the database goes away.
    app.db.drop_now();

    // Assert
    let ready = app.request(Method::GET, "/readyz", None, None, None).await;
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "unavailable");
    assert_eq!(
        app.request(Method::GET, "/healthz", None, None, None)
            .await
            .status(),
        200
    );
    let status = app
        .request(
            Method::GET,
            &format!("/payments/checkout/{id}/status"),
            Some(&buyer),
            None,
            None,
        )
        .await;
    assert_eq!(
        status
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("2"),
        "a 503 says when to come back"
    );
    let problem = assert_problem(status, 503, "unavailable").await;
    let text = problem.to_string().to_lowercase();
    for internal in ["sql", "database", "postgres", "payretry_t_", "connection"] {
        assert!(
            !text.contains(internal),
            "the 503 body leaks {internal:?}: {problem}"
        );
    }
}
