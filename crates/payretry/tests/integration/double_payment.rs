//! The double-payment guard: a session already paid through one attempt's checkout is paid
//! through another's too (an old checkout completing late). The first payment stands; the
//! second is audited, counted, listed for support and, with
//! `PAYRETRY_AUTO_REFUND_DUPLICATES=true`, refunded through the provider exactly once (by the
//! refund runner, after the webhook's answer: tests wait for the refund's outcome).

use crate::support::app::{
    Database, Options, Queue, TestApp, assert_problem, paid_event_with_intent, text, with_action,
};
use crate::support::fake_stripe::FailureMode;
use payretry::provider::RefundRequest;
use payretry::provider::sandbox::{SandboxCheckoutStatus, events};
use payretry_domain::{AttemptNumber, PaymentSessionId, ProviderSessionId, Role};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// The fake Stripe API, with automatic refunds on or off, on `database`.
async fn stripe_app(auto_refund: bool, database: Database) -> TestApp {
    TestApp::spawn_with(Options {
        stripe: true,
        vars: vec![
            ("PAYRETRY_RETRY_DELAYS", "1s,1s,1s".to_owned()),
            ("PAYRETRY_AUTO_REFUND_DUPLICATES", auto_refund.to_string()),
        ],
        ..Options::on(database, Queue::Embedded)
    })
    .await
}

/// A session paid through attempt 1's checkout, whose attempt 0 checkout was paid as well
/// (not yet reported).
struct PaidTwice {
    id: String,
    /// Attempt 0's checkout, and its charge: the duplicate.
    late_checkout: String,
    late_intent: String,
    /// Attempt 1's checkout: the payment that stands.
    paid_checkout: String,
}

impl PaidTwice {
    /// The provider's late report of attempt 0's payment (a fresh event id each call).
    fn late_event(&self) -> Value {
        paid_event_with_intent(&self.id, 0, &self.late_checkout, &self.late_intent)
    }
}

/// Attempt 0 declined, retried, attempt 1's checkout paid and reported; then the buyer's
/// earlier payment on attempt 0's checkout goes through at the provider.
async fn paid_twice(app: &TestApp) -> PaidTwice {
    let stripe = app.stripe.as_ref().expect("the fake Stripe API");
    let created = app.create_checkout(&app.buyer()).await;
    let id = text(&created, "sessionId");
    let late_checkout = text(&created, "providerSessionId");
    app.decline(&id, 0, "insufficient_funds").await;
    assert_eq!(app.retry(&app.buyer(), &id, "retry-1").await.status(), 202);
    let open = app.wait_for_status(&id, "open").await;
    let paid_checkout = text(&open, "providerSessionId");
    assert_ne!(paid_checkout, late_checkout);
    // The worker closes the older checkout after opening the new one; wait for it, so no
    // Stripe call of the retry is still in flight when a test injects failures.
    for _ in 0..100 {
        if stripe.expired_ids().contains(&late_checkout) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let paid_intent = stripe.mark_paid(&paid_checkout);
    let paid = paid_event_with_intent(&id, 1, &paid_checkout, &paid_intent);
    assert_eq!(app.send_event(&paid).await.status(), StatusCode::OK);
    assert_eq!(app.status(&app.buyer(), &id).await["status"], "succeeded");
    let late_intent = stripe.mark_paid(&late_checkout);
    PaidTwice {
        id,
        late_checkout,
        late_intent,
        paid_checkout,
    }
}

/// `GET /admin/duplicate-payments` as `token`'s caller.
async fn list_duplicates(app: &TestApp, token: &str) -> reqwest::Response {
    app.request(
        Method::GET,
        "/admin/duplicate-payments",
        Some(token),
        None,
        None,
    )
    .await
}

/// The listed double payments of session `id`.
async fn duplicates_of(app: &TestApp, id: &str) -> Vec<Value> {
    let response = list_duplicates(app, &app.token("support-1", Role::Support)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["duplicatePayments"]
        .as_array()
        .unwrap_or_else(|| panic!("no duplicatePayments array in {body}"))
        .iter()
        .filter(|d| d["paymentSessionId"] == id)
        .cloned()
        .collect()
}

/// Session `id`'s one double payment once its status is `wanted` (10 s at most): the refund
/// runner makes the refund after the webhook has been answered.
async fn wait_for_duplicate(app: &TestApp, id: &str, wanted: &str) -> Value {
    let mut listed = Vec::new();
    for _ in 0..200 {
        listed = duplicates_of(app, id).await;
        if listed.len() == 1 && listed[0]["status"] == wanted {
            return listed.remove(0);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the double payment of {id} never became {wanted}: {listed:?}");
}

/// Waits (10 s at most) until the fake Stripe API received `n` refund requests.
async fn wait_for_refund_requests(app: &TestApp, n: usize) {
    let stripe = app.stripe.as_ref().unwrap();
    for _ in 0..200 {
        if stripe.refund_requests() >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{} refund requests, not {n}", stripe.refund_requests());
}

/// The first payment stands: succeeded, attempt 1's checkout, one `payment_succeeded`.
async fn assert_first_payment_stands(app: &TestApp, case: &PaidTwice) {
    let status = app.status(&app.buyer(), &case.id).await;
    assert_eq!(status["status"], "succeeded");
    assert_eq!(status["providerSessionId"], case.paid_checkout.as_str());
    let entries = app.audit_entries(&case.id).await;
    let succeeded = with_action(&entries, "payment_succeeded");
    assert_eq!(succeeded.len(), 1, "{entries:?}");
    assert_eq!(succeeded[0]["attemptNumber"], 1);
}

#[tokio::test]
async fn a_late_payment_of_an_older_checkout_is_recorded_as_a_double_payment() {
    // Arrange
    let app = stripe_app(false, Database::Sqlite).await;
    let case = paid_twice(&app).await;

    // Act
    let response = app.send_event(&case.late_event()).await;

    // Assert
    assert_eq!(response.status(), StatusCode::OK);
    assert_first_payment_stands(&app, &case).await;
    let entries = app.audit_entries(&case.id).await;
    let detected = with_action(&entries, "double_payment_detected");
    assert_eq!(detected.len(), 1, "{entries:?}");
    assert_eq!(detected[0]["attemptNumber"], 0);
    assert_eq!(detected[0]["actor"], "system");
    let details = &detected[0]["details"];
    assert_eq!(details["paidAttempt"], 1);
    assert_eq!(details["duplicateAttempt"], 0);
    assert_eq!(details["providerSessionId"], case.late_checkout.as_str());
    assert_eq!(details["paymentIntent"], case.late_intent.as_str());
    assert_eq!(details["refundRequested"], false);

    let listed = duplicates_of(&app, &case.id).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let record = &listed[0];
    assert!(record["id"].is_string(), "{record}");
    assert_eq!(record["paidAttempt"], 1);
    assert_eq!(record["duplicateAttempt"], 0);
    assert_eq!(record["paymentIntent"], case.late_intent.as_str());
    assert_eq!(record["status"], "detected");
    let detected_at = record["detectedAt"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(detected_at).is_ok());

    let stripe = app.stripe.as_ref().unwrap();
    assert_eq!(stripe.refund_requests(), 0, "no refund without the setting");
    assert!(stripe.refunds().is_empty());
    assert!(stripe.violations().is_empty(), "{:?}", stripe.violations());

    let metrics = app
        .request(Method::GET, "/metrics", None, None, None)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("payments_retry_double_payment_count{retry_attempt=\"0\"}")),
        "{metrics}"
    );
}

#[tokio::test]
async fn support_and_admins_may_list_double_payments_and_buyers_may_not() {
    // Arrange
    let app = stripe_app(false, Database::Sqlite).await;
    let case = paid_twice(&app).await;
    assert_eq!(
        app.send_event(&case.late_event()).await.status(),
        StatusCode::OK
    );

    // Act
    let as_support = list_duplicates(&app, &app.token("support-1", Role::Support)).await;
    let as_admin = list_duplicates(&app, &app.admin()).await;
    let as_buyer = list_duplicates(&app, &app.buyer()).await;
    let anonymous = app
        .request(Method::GET, "/admin/duplicate-payments", None, None, None)
        .await;

    // Assert
    assert_eq!(as_support.status(), StatusCode::OK);
    assert_eq!(as_admin.status(), StatusCode::OK);
    assert_problem(as_buyer, 403, "forbidden").await;
    assert_problem(anonymous, 401, "unauthenticated").await;
}

#[tokio::test]
async fn the_same_event_delivered_twice_records_one_double_payment() {
    // Arrange
    let app = stripe_app(true, Database::Sqlite).await;
    let case = paid_twice(&app).await;
    let late = case.late_event();

    // Act
    let first = app.send_event(&late).await;
    let again = app.send_event(&late).await;

    // Assert
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(again.status(), StatusCode::OK);
    wait_for_duplicate(&app, &case.id, "refunded").await;
    let entries = app.audit_entries(&case.id).await;
    assert_eq!(with_action(&entries, "double_payment_detected").len(), 1);
    assert_eq!(with_action(&entries, "duplicate_refunded").len(), 1);
    assert_eq!(app.stripe.as_ref().unwrap().refunds().len(), 1);
}

/// With automatic refunds on: the duplicate's charge is refunded once, even when the provider
/// reports the payment twice under different event ids.
async fn a_double_payment_is_refunded_exactly_once(database: Database) {
    // Arrange
    let app = stripe_app(true, database).await;
    let stripe = app.stripe.as_ref().unwrap();
    let case = paid_twice(&app).await;
    let mut async_succeeded = case.late_event();
    async_succeeded["type"] = json!("checkout.session.async_payment_succeeded");

    // Act
    let first = app.send_event(&case.late_event()).await;
    let second = app.send_event(&case.late_event()).await;
    let third = app.send_event(&async_succeeded).await;

    // Assert
    for response in [first, second, third] {
        assert_eq!(response.status(), StatusCode::OK);
    }
    wait_for_duplicate(&app, &case.id, "refunded").await;
    let refunds = stripe.refunds();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0].payment_intent, case.late_intent);
    assert_eq!(refunds[0].reason.as_deref(), Some("duplicate"));
    assert_eq!(
        refunds[0].idempotency_key,
        format!("payretry-{}-refund-attempt-0", case.id)
    );
    assert_eq!(stripe.refund_requests(), 1);
    assert!(stripe.violations().is_empty(), "{:?}", stripe.violations());

    let listed = duplicates_of(&app, &case.id).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["status"], "refunded");
    assert_eq!(listed[0]["refundId"], refunds[0].id.as_str());

    assert_first_payment_stands(&app, &case).await;
    let entries = app.audit_entries(&case.id).await;
    let detected = with_action(&entries, "double_payment_detected");
    assert_eq!(detected.len(), 1, "{entries:?}");
    assert_eq!(detected[0]["details"]["refundRequested"], true);
    let refunded = with_action(&entries, "duplicate_refunded");
    assert_eq!(refunded.len(), 1, "{entries:?}");
    assert_eq!(refunded[0]["attemptNumber"], 0);
    assert_eq!(
        refunded[0]["details"]["paymentIntent"],
        case.late_intent.as_str()
    );
    assert_eq!(refunded[0]["details"]["refundId"], refunds[0].id.as_str());
    assert_eq!(
        app.count("SELECT COUNT(*) FROM duplicate_payments").await,
        1
    );
}

#[tokio::test]
async fn a_double_payment_is_refunded_exactly_once_on_sqlite() {
    a_double_payment_is_refunded_exactly_once(Database::Sqlite).await;
}

#[tokio::test]
async fn a_double_payment_is_refunded_exactly_once_on_postgres() {
    a_double_payment_is_refunded_exactly_once(Database::Postgres).await;
}

#[tokio::test]
async fn a_refund_the_provider_could_not_take_is_retried_later_and_made_once() {
    // Arrange: Stripe is down while the double payment is reported (3 tries, all 503).
    let app = stripe_app(true, Database::Sqlite).await;
    let stripe = app.stripe.as_ref().unwrap();
    let case = paid_twice(&app).await;
    stripe.fail_next(3, FailureMode::Status(503));
    assert_eq!(
        app.send_event(&case.late_event()).await.status(),
        StatusCode::OK
    );
    // The refund runner's attempt (3 tries) met the outage.
    wait_for_refund_requests(&app, 3).await;
    assert!(stripe.refunds().is_empty());
    assert_eq!(
        duplicates_of(&app, &case.id).await[0]["status"],
        "refund_requested"
    );

    // Act: the periodic retry (the sweeper's, without its grace period).
    let settled = app
        .payments
        .retry_owed_refunds(chrono::Utc::now())
        .await
        .unwrap();
    let settled_again = app
        .payments
        .retry_owed_refunds(chrono::Utc::now())
        .await
        .unwrap();

    // Assert
    assert_eq!((settled, settled_again), (1, 0));
    assert_eq!(stripe.refunds().len(), 1);
    assert_eq!(duplicates_of(&app, &case.id).await[0]["status"], "refunded");
    let entries = app.audit_entries(&case.id).await;
    assert_eq!(with_action(&entries, "duplicate_refunded").len(), 1);
    assert!(stripe.violations().is_empty(), "{:?}", stripe.violations());
}

#[tokio::test]
async fn a_refund_made_before_a_crash_is_not_made_again_by_the_retry() {
    // Arrange: the refund is owed (Stripe was unreachable), then a process sends it and dies
    // before recording the answer.
    let app = stripe_app(true, Database::Sqlite).await;
    let stripe = app.stripe.as_ref().unwrap();
    let case = paid_twice(&app).await;
    stripe.fail_next(3, FailureMode::Status(503));
    assert_eq!(
        app.send_event(&case.late_event()).await.status(),
        StatusCode::OK
    );
    wait_for_refund_requests(&app, 3).await;
    let request = RefundRequest {
        session_id: PaymentSessionId::parse(&case.id).unwrap(),
        duplicate_attempt: AttemptNumber::new(0),
        payment_intent: case.late_intent.clone(),
    };
    let lost = app
        .payments
        .provider
        .refund(&request)
        .await
        .expect("the refund that reached Stripe");

    // Act
    let settled = app
        .payments
        .retry_owed_refunds(chrono::Utc::now())
        .await
        .unwrap();

    // Assert: the retry's request was answered with the first refund.
    assert_eq!(settled, 1);
    assert_eq!(stripe.refunds().len(), 1);
    assert_eq!(stripe.refund_requests(), 3 + 2);
    let listed = duplicates_of(&app, &case.id).await;
    assert_eq!(listed[0]["status"], "refunded");
    assert_eq!(listed[0]["refundId"], json!(lost.id));
}

#[tokio::test]
async fn a_refund_the_provider_refuses_is_marked_failed_for_support() {
    // Arrange
    let app = stripe_app(true, Database::Sqlite).await;
    let stripe = app.stripe.as_ref().unwrap();
    let case = paid_twice(&app).await;
    stripe.fail_next(1, FailureMode::Status(402));

    // Act
    let response = app.send_event(&case.late_event()).await;

    // Assert
    assert_eq!(response.status(), StatusCode::OK);
    let listed = wait_for_duplicate(&app, &case.id, "refund_failed").await;
    assert!(stripe.refunds().is_empty());
    assert!(listed["lastError"].is_string(), "{listed:?}");
    let entries = app.audit_entries(&case.id).await;
    assert!(with_action(&entries, "duplicate_refunded").is_empty());
    // Settled: the periodic retry leaves it to support.
    let settled = app
        .payments
        .retry_owed_refunds(chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(settled, 0);
    assert_eq!(stripe.refund_requests(), 1);
}

#[tokio::test]
async fn the_sandbox_refunds_a_duplicate_by_its_payment_intent() {
    // Arrange: the sandbox provider; attempt 1 paid on its page, attempt 0's checkout paid
    // late (its page was still open in another tab).
    let app = TestApp::spawn_with(Options {
        vars: vec![
            ("PAYRETRY_RETRY_DELAYS", "1s,1s,1s".to_owned()),
            ("PAYRETRY_AUTO_REFUND_DUPLICATES", "true".to_owned()),
        ],
        ..Options::default()
    })
    .await;
    let created = app.create_checkout(&app.buyer()).await;
    let id = text(&created, "sessionId");
    let first = ProviderSessionId::new(text(&created, "providerSessionId"));
    app.decline(&id, 0, "insufficient_funds").await;
    assert_eq!(app.retry(&app.buyer(), &id, "retry-1").await.status(), 202);
    let open = app.wait_for_status(&id, "open").await;
    let second = text(&open, "providerSessionId");
    let paid = app
        .http
        .post(app.url(&format!("/sandbox/checkout/{second}/pay")))
        .send()
        .await
        .unwrap();
    assert!(paid.status().is_redirection() || paid.status().is_success());
    app.wait_for_status(&id, "succeeded").await;
    let storage = &app.payments.storage;
    // The first checkout was closed by its decline; the buyer's bank pays it late anyway.
    let closed = storage.sandbox_checkout(&first).await.unwrap().unwrap();
    assert!(
        storage
            .set_sandbox_checkout_status(&first, closed.status, SandboxCheckoutStatus::Paid)
            .await
            .unwrap()
    );
    let late = storage.sandbox_checkout(&first).await.unwrap().unwrap();
    let late_event = events::paid(&late);
    assert_eq!(
        late_event["data"]["object"]["payment_intent"],
        events::payment_intent(&late).as_str()
    );

    // Act
    let response = app.send_event(&late_event).await;

    // Assert
    assert_eq!(response.status(), StatusCode::OK);
    let listed = wait_for_duplicate(&app, &id, "refunded").await;
    assert_eq!(listed["duplicateAttempt"], 0);
    let refunded = storage.sandbox_checkout(&first).await.unwrap().unwrap();
    assert_eq!(refunded.status, SandboxCheckoutStatus::Refunded);
    let second = storage
        .sandbox_checkout(&ProviderSessionId::new(second))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        second.status,
        SandboxCheckoutStatus::Paid,
        "the payment that stands is kept"
    );
}

#[tokio::test]
async fn the_openapi_document_describes_the_listing() {
    // Arrange
    let app = TestApp::spawn().await;

    // Act
    let document: Value = app
        .request(Method::GET, "/openapi.json", None, None, None)
        .await
        .json()
        .await
        .unwrap();

    // Assert
    assert!(
        document["paths"]["/admin/duplicate-payments"]["get"].is_object(),
        "{}",
        document["paths"]
    );
    let schema = &document["components"]["schemas"]["DuplicatePaymentView"]["properties"];
    for field in [
        "id",
        "paymentSessionId",
        "paidAttempt",
        "duplicateAttempt",
        "paymentIntent",
        "status",
        "detectedAt",
    ] {
        assert!(schema[field].is_object(), "{field} missing from {schema}");
    }
}
