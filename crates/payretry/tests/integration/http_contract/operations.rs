//! The operations routes: health, readiness, metrics, the OpenAPI document, unknown routes and methods, the webhook signature.

use super::*;

#[tokio::test]
async fn healthz_and_readyz_answer_200() {
    let app = TestApp::spawn().await;

    let health = get(&app, "/healthz", None).await;
    let ready = get(&app, "/readyz", None).await;

    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(ready.status(), StatusCode::OK);
}

#[tokio::test]
async fn metrics_answers_200_prometheus_text() {
    let app = TestApp::spawn().await;

    let response = get(&app, "/metrics", None).await;

    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    response.text().await.expect("a text body");
}

#[tokio::test]
async fn openapi_document_lists_every_api_path_of_the_contract() {
    let app = TestApp::spawn().await;

    let response = get(&app, "/openapi.json", None).await;

    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with('3'), "{doc}");
    for (path, method) in [
        ("/payments/checkout", "post"),
        ("/payments/checkout/{sessionId}/status", "get"),
        ("/payments/retry/{sessionId}", "post"),
        ("/payments/checkout/{sessionId}/audit", "get"),
        ("/webhooks/stripe", "post"),
        ("/admin/dead-letters", "get"),
        ("/admin/dead-letters/{id}/redrive", "post"),
        ("/admin/duplicate-payments", "get"),
        ("/admin/webhook-deliveries", "get"),
        ("/admin/webhook-deliveries/{id}/redeliver", "post"),
        ("/admin/sessions", "get"),
        ("/admin/stats/retries", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is missing from /openapi.json"
        );
    }
}

/// The reference validator of the OpenAPI Initiative's ecosystem, `openapi-spec-validator`
/// from PyPI, accepts the document (unique operation ids, a description on every response…).
#[tokio::test]
async fn openapi_document_passes_the_reference_validator() {
    let app = TestApp::spawn().await;
    let document = get(&app, "/openapi.json", None).await.text().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, document).unwrap();
    let output = std::process::Command::new(crate::support::python::python())
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .expect("run openapi-spec-validator");
    assert!(
        output.status.success(),
        "openapi-spec-validator refused /openapi.json: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn unknown_route_is_a_404_problem() {
    let app = TestApp::spawn().await;

    let response = get(&app, "/no/such/route", Some(&app.buyer())).await;

    let problem = assert_problem(response, 404, "not_found").await;
    assert_nothing_internal(&problem);
}

#[tokio::test]
async fn wrong_method_on_a_known_route_is_a_problem() {
    let app = TestApp::spawn().await;

    let response = get(&app, "/payments/checkout", Some(&app.buyer())).await;

    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap()),
        Some("application/problem+json")
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["status"], 405);
    assert!(
        problem["code"].is_string()
            && problem["title"].is_string()
            && problem["detail"].is_string()
    );
}

#[tokio::test]
async fn webhook_with_a_bad_signature_is_400_invalid_signature() {
    let app = TestApp::spawn().await;
    let body = br#"{"id": "evt_1", "type": "checkout.session.completed"}"#;

    let unsigned = post_raw(&app, "/webhooks/stripe", None, None, body.to_vec()).await;
    let forged = app
        .http
        .post(app.url("/webhooks/stripe"))
        .header(
            "Stripe-Signature",
            format!("t={},v1={}", now_secs(), "0".repeat(64)),
        )
        .body(body.to_vec())
        .send()
        .await
        .unwrap();

    assert_problem(unsigned, 400, "invalid_signature").await;
    assert_problem(forged, 400, "invalid_signature").await;
}
