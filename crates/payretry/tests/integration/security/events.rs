//! Provider events are matched to checkouts payretry created: a signed event cannot invent
//! an attempt, a duplicate payment, or a metric tag.

use crate::support::app::{TestApp, paid_event, session_id};
use reqwest::{Method, StatusCode};

#[tokio::test]
async fn a_signed_success_for_an_attempt_or_checkout_that_never_existed_is_ignored() {
    // Arrange: a session with its first checkout (attempt 0) open.
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let status = app.create_checkout(&buyer).await;
    let id = session_id(&status);
    let checkout = status["providerSessionId"].as_str().unwrap().to_owned();

    // Act: correctly signed successes naming attempts and checkouts that do not exist.
    for (attempt, provider_session) in [
        (u32::MAX, checkout.as_str()),
        (99, checkout.as_str()),
        (0, "cs_never_created_by_payretry"),
        (u32::MAX, "cs_never_created_by_payretry"),
    ] {
        let response = app
            .send_event(&paid_event(&id, attempt, provider_session))
            .await;
        // Assert: the provider gets its 200 (nothing to resend), and nothing changed.
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(app.status(&buyer, &id).await["status"], "open");
    assert_eq!(app.audit_actions(&id).await, ["checkout_created"]);

    // The real payment is recorded; a forged second one is not a double payment.
    app.pay(&id, 0, &checkout).await;
    assert_eq!(app.status(&buyer, &id).await["status"], "succeeded");
    app.pay(&id, 4_294_967_295, "cs_never_created_by_payretry")
        .await;
    app.pay(&id, 7, &checkout).await;
    assert!(
        app.admin_list("/admin/duplicate-payments", "duplicatePayments")
            .await
            .is_empty()
    );
    let metrics = app
        .request(Method::GET, "/metrics", None, None, None)
        .await
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("4294967295"), "{metrics}");
    assert!(!metrics.contains("retry_attempt=\"99\""), "{metrics}");
}
