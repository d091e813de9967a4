//! Refunds of duplicate payments through the real server and the fake Stripe API: the
//! refund is made by the refund runner after the webhook that detected the double payment
//! was answered; a refund Stripe answers `pending` (or `requires_action`) is not done until
//! Stripe's refund event says `succeeded`, and one that fails is listed for support with
//! Stripe's reason.

use crate::support::app::{
    Database, Options, Queue, TestApp, WEBHOOK_SECRET, paid_event_with_intent, text, with_action,
};
use crate::support::fake_stripe::{FakeStripe, RefundAnswer, RefundEventStyle, RefundOutcome};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

/// Polls `probe` every 50 ms until it returns `Some` (10 s at most).
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..200 {
        if let Some(value) = probe().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within 10 s");
}

/// The stripe provider against the fake Stripe API, automatic refunds on, the fake's refund
/// events delivered to this app's webhook.
async fn refunding_app(database: Database) -> TestApp {
    let app = TestApp::spawn_with(Options {
        stripe: true,
        vars: vec![
            ("PAYRETRY_RETRY_DELAYS", "1s,1s,1s".to_owned()),
            ("PAYRETRY_AUTO_REFUND_DUPLICATES", "true".to_owned()),
        ],
        ..Options::on(database, Queue::Embedded)
    })
    .await;
    stripe(&app).deliver_webhooks_to(&app.url("/webhooks/stripe"), WEBHOOK_SECRET);
    app
}

fn stripe(app: &TestApp) -> &FakeStripe {
    app.stripe.as_ref().expect("the fake Stripe API")
}

/// A session paid through attempt 1's checkout whose attempt 0 checkout was paid as well;
/// the late report of that payment is `late`, not sent yet.
struct PaidTwice {
    id: String,
    late_intent: String,
    late: Value,
}

async fn paid_twice(app: &TestApp) -> PaidTwice {
    let stripe = stripe(app);
    let created = app.create_checkout(&app.buyer()).await;
    let id = text(&created, "sessionId");
    let late_checkout = text(&created, "providerSessionId");
    app.decline(&id, 0, "insufficient_funds").await;
    assert_eq!(app.retry(&app.buyer(), &id, "retry-1").await.status(), 202);
    let open = app.wait_for_status(&id, "open").await;
    let paid_checkout = text(&open, "providerSessionId");
    // The worker closes the older checkout after opening the new one: wait for that, so the
    // next Stripe request is the refund.
    eventually("the older checkout closed", || async {
        stripe.expired_ids().contains(&late_checkout).then_some(())
    })
    .await;
    let paid_intent = stripe.mark_paid(&paid_checkout);
    let paid = paid_event_with_intent(&id, 1, &paid_checkout, &paid_intent);
    assert_eq!(app.send_event(&paid).await.status(), StatusCode::OK);
    assert_eq!(app.status(&app.buyer(), &id).await["status"], "succeeded");
    let late_intent = stripe.mark_paid(&late_checkout);
    let late = paid_event_with_intent(&id, 0, &late_checkout, &late_intent);
    PaidTwice {
        id,
        late_intent,
        late,
    }
}

/// Session `id`'s one listed double payment, as support reads it.
async fn duplicate_of(app: &TestApp, id: &str) -> Value {
    let listed = app
        .admin_list("/admin/duplicate-payments?limit=100", "duplicatePayments")
        .await;
    let mine: Vec<Value> = listed
        .into_iter()
        .filter(|d| d["paymentSessionId"] == id)
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    mine.into_iter().next().unwrap()
}

/// Session `id`'s double payment once its status is `wanted`.
async fn wait_for_duplicate(app: &TestApp, id: &str, wanted: &str) -> Value {
    eventually(&format!("the double payment becoming {wanted}"), || async {
        let record = duplicate_of(app, id).await;
        (record["status"] == wanted).then_some(record)
    })
    .await
}

/// Stripe answers the refund `pending`: recorded as `refund_pending` with its id, not as
/// refunded; Stripe's `refund.updated` (`succeeded`) then makes it `refunded`, once.
async fn a_pending_refund_is_refunded_when_stripe_reports_it_succeeded(database: Database) {
    // Arrange
    let app = refunding_app(database).await;
    let stripe = stripe(&app);
    stripe.answer_refunds_with(RefundAnswer::Pending);
    let case = paid_twice(&app).await;
    assert_eq!(app.send_event(&case.late).await.status(), StatusCode::OK);
    let pending = wait_for_duplicate(&app, &case.id, "refund_pending").await;
    let refunds = stripe.refunds();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    let refund = &refunds[0];
    assert_eq!(pending["refundId"], refund.id.as_str());
    assert_eq!(refund.payment_intent, case.late_intent);
    assert_eq!(refund.metadata["payment_session_id"], case.id);
    assert_eq!(refund.metadata["duplicate_attempt"], "0");
    let entries = app.audit_entries(&case.id).await;
    assert_eq!(with_action(&entries, "duplicate_refund_pending").len(), 1);
    assert!(with_action(&entries, "duplicate_refunded").is_empty());

    // Act
    let delivered = stripe
        .settle_refund(&refund.id, RefundOutcome::Succeeded)
        .await;

    // Assert
    assert_eq!(delivered, 200);
    let refunded = wait_for_duplicate(&app, &case.id, "refunded").await;
    assert_eq!(refunded["refundId"], refund.id.as_str());
    assert_eq!(refunded["failureReason"], Value::Null);
    let entries = app.audit_entries(&case.id).await;
    let done = with_action(&entries, "duplicate_refunded");
    assert_eq!(done.len(), 1, "{entries:?}");
    assert_eq!(done[0]["attemptNumber"], 0);
    assert_eq!(done[0]["details"]["refundId"], refund.id.as_str());
    assert!(done[0]["details"]["eventId"].is_string());
    assert_eq!(stripe.refund_requests(), 1, "one refund call, no retry");
    assert!(stripe.violations().is_empty(), "{:?}", stripe.violations());
}

#[tokio::test]
async fn a_pending_refund_is_refunded_when_stripe_reports_it_succeeded_on_sqlite() {
    a_pending_refund_is_refunded_when_stripe_reports_it_succeeded(Database::Sqlite).await;
}

#[tokio::test]
async fn a_pending_refund_is_refunded_when_stripe_reports_it_succeeded_on_postgres() {
    a_pending_refund_is_refunded_when_stripe_reports_it_succeeded(Database::Postgres).await;
}

/// A pending refund that fails at the bank: `refund_failed` with Stripe's `failure_reason`,
/// listed for support, audited, and not retried.
async fn a_pending_refund_that_fails_is_listed_for_support_with_its_reason(database: Database) {
    // Arrange
    let app = refunding_app(database).await;
    let stripe = stripe(&app);
    stripe.answer_refunds_with(RefundAnswer::Pending);
    let case = paid_twice(&app).await;
    assert_eq!(app.send_event(&case.late).await.status(), StatusCode::OK);
    let pending = wait_for_duplicate(&app, &case.id, "refund_pending").await;
    let refund_id = text(&pending, "refundId");

    // Act
    let delivered = stripe
        .settle_refund(
            &refund_id,
            RefundOutcome::Failed("expired_or_canceled_card".to_owned()),
        )
        .await;

    // Assert
    assert_eq!(delivered, 200);
    let failed = wait_for_duplicate(&app, &case.id, "refund_failed").await;
    assert_eq!(failed["failureReason"], "expired_or_canceled_card");
    assert_eq!(failed["refundId"], refund_id.as_str());
    assert!(
        text(&failed, "lastError").contains("expired_or_canceled_card"),
        "{failed}"
    );
    let entries = app.audit_entries(&case.id).await;
    let audited = with_action(&entries, "duplicate_refund_failed");
    assert_eq!(audited.len(), 1, "{entries:?}");
    assert_eq!(
        audited[0]["details"]["failureReason"],
        "expired_or_canceled_card"
    );
    assert!(with_action(&entries, "duplicate_refunded").is_empty());
    // Settled: nothing is owed any more, so no runner tries again.
    let answered = app
        .payments
        .retry_owed_refunds(chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(answered, 0);
    assert_eq!(stripe.refund_requests(), 1);
    assert!(stripe.violations().is_empty(), "{:?}", stripe.violations());
}

#[tokio::test]
async fn a_pending_refund_that_fails_is_listed_for_support_with_its_reason_on_sqlite() {
    a_pending_refund_that_fails_is_listed_for_support_with_its_reason(Database::Sqlite).await;
}

#[tokio::test]
async fn a_pending_refund_that_fails_is_listed_for_support_with_its_reason_on_postgres() {
    a_pending_refund_that_fails_is_listed_for_support_with_its_reason(Database::Postgres).await;
}

#[tokio::test]
async fn the_pinned_api_versions_charge_refund_updated_settles_a_refund_too() {
    // Arrange: `requires_action` is taken but not done, like `pending`.
    let app = refunding_app(Database::Sqlite).await;
    let stripe = stripe(&app);
    stripe.answer_refunds_with(RefundAnswer::RequiresAction);
    let case = paid_twice(&app).await;
    assert_eq!(app.send_event(&case.late).await.status(), StatusCode::OK);
    let pending = wait_for_duplicate(&app, &case.id, "refund_pending").await;
    let refund_id = text(&pending, "refundId");

    // Act
    let delivered = stripe
        .settle_refund_as(
            &refund_id,
            RefundOutcome::Succeeded,
            RefundEventStyle::ChargeRefund,
        )
        .await;

    // Assert
    assert_eq!(delivered, 200);
    wait_for_duplicate(&app, &case.id, "refunded").await;
    assert!(stripe.violations().is_empty(), "{:?}", stripe.violations());
}

#[tokio::test]
async fn a_refund_event_delivered_twice_or_late_changes_nothing_more() {
    // Arrange: a refund settled as succeeded.
    let app = refunding_app(Database::Sqlite).await;
    let stripe = stripe(&app);
    stripe.answer_refunds_with(RefundAnswer::Pending);
    let case = paid_twice(&app).await;
    assert_eq!(app.send_event(&case.late).await.status(), StatusCode::OK);
    let pending = wait_for_duplicate(&app, &case.id, "refund_pending").await;
    let refund_id = text(&pending, "refundId");
    let refund = stripe
        .refunds()
        .into_iter()
        .find(|r| r.id == refund_id)
        .unwrap();
    let stale = crate::support::fake_stripe::refund_event("refund.updated", &refund);
    stripe
        .settle_refund(&refund_id, RefundOutcome::Succeeded)
        .await;
    wait_for_duplicate(&app, &case.id, "refunded").await;
    let settled = stripe
        .refunds()
        .into_iter()
        .find(|r| r.id == refund_id)
        .unwrap();
    let succeeded = crate::support::fake_stripe::refund_event("refund.updated", &settled);
    let url = app.url("/webhooks/stripe");

    // Act: the same success again, and the older `pending` arriving late.
    let again = stripe.deliver(&url, WEBHOOK_SECRET, &succeeded).await;
    let replayed = stripe.deliver(&url, WEBHOOK_SECRET, &succeeded).await;
    let late = stripe.deliver(&url, WEBHOOK_SECRET, &stale).await;

    // Assert
    assert_eq!((again, replayed, late), (200, 200, 200));
    assert_eq!(duplicate_of(&app, &case.id).await["status"], "refunded");
    let entries = app.audit_entries(&case.id).await;
    assert_eq!(with_action(&entries, "duplicate_refunded").len(), 1);
    assert_eq!(with_action(&entries, "duplicate_refund_pending").len(), 1);
}

#[tokio::test]
async fn refund_events_about_refunds_payretry_did_not_make_are_answered_and_ignored() {
    // Arrange: one double payment, refunded as pending.
    let app = refunding_app(Database::Sqlite).await;
    let stripe = stripe(&app);
    stripe.answer_refunds_with(RefundAnswer::Pending);
    let case = paid_twice(&app).await;
    assert_eq!(app.send_event(&case.late).await.status(), StatusCode::OK);
    wait_for_duplicate(&app, &case.id, "refund_pending").await;
    let event = |refund: Value| {
        json!({"id": format!("evt_test_{}", uuid::Uuid::new_v4().simple()), "object": "event",
            "type": "refund.updated", "data": {"object": refund}})
    };
    // A refund of a charge payretry never saw, and another refund of the duplicate's charge
    // (made by hand at Stripe), with no metadata.
    let unknown = event(json!({"id": "re_test_unknown", "object": "refund",
        "status": "succeeded", "payment_intent": "pi_test_unknown", "metadata": {}}));
    let by_hand = event(json!({"id": "re_test_by_hand", "object": "refund",
        "status": "failed", "failure_reason": "unknown", "payment_intent": case.late_intent,
        "metadata": {}}));

    // Act
    let answers = [
        app.send_event(&unknown).await,
        app.send_event(&by_hand).await,
    ];

    // Assert
    for answer in answers {
        assert_eq!(answer.status(), StatusCode::OK);
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["effect"], "Ignored", "{body}");
    }
    assert_eq!(
        duplicate_of(&app, &case.id).await["status"],
        "refund_pending"
    );
}

#[tokio::test]
async fn the_webhook_that_detects_a_double_payment_answers_before_the_refund_is_made() {
    // Arrange: Stripe's refund endpoint holds every request until released.
    let app = refunding_app(Database::Sqlite).await;
    let stripe = stripe(&app);
    let case = paid_twice(&app).await;
    stripe.hold_refunds();

    // Act: the answer must come while the refund call is held (well within the provider's
    // 2 s per try), so the call cannot be part of the request.
    let answer = tokio::time::timeout(Duration::from_millis(1500), app.send_event(&case.late))
        .await
        .expect("the webhook answered without waiting for the refund");

    // Assert
    assert_eq!(answer.status(), StatusCode::OK);
    eventually("the refund call reaching Stripe", || async {
        (stripe.refund_requests() == 1).then_some(())
    })
    .await;
    assert!(stripe.refunds().is_empty(), "the refund is still held");
    assert_eq!(
        duplicate_of(&app, &case.id).await["status"],
        "refund_requested"
    );
    stripe.release_refunds();
    let refunded = wait_for_duplicate(&app, &case.id, "refunded").await;
    let refunds = stripe.refunds();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunded["refundId"], refunds[0].id.as_str());
    assert_eq!(stripe.refund_requests(), 1);
    assert!(stripe.violations().is_empty(), "{:?}", stripe.violations());
}

#[tokio::test]
async fn the_openapi_document_lists_every_refund_state() {
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
    let schemas = &document["components"]["schemas"];
    let states: Vec<&str> = schemas["DuplicatePaymentStatusView"]["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("no status enum in {schemas}"))
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        [
            "detected",
            "refund_requested",
            "refund_pending",
            "refunded",
            "refund_failed"
        ]
    );
    let view = &schemas["DuplicatePaymentView"]["properties"];
    for field in [
        "status",
        "refundId",
        "failureReason",
        "lastError",
        "updatedAt",
    ] {
        assert!(view[field].is_object(), "{field} missing from {view}");
    }
}
