//! The sandbox's hosted checkout: absent under `stripe`, unguessable ids, one outcome each.

use crate::support::app::{Options, TestApp, assert_problem, session_id};
use chrono::{TimeDelta, Utc};
use payretry::provider::CheckoutRequest;
use payretry::provider::sandbox::{SandboxCheckout, SandboxCheckoutStatus};
use payretry_domain::{AttemptNumber, PaymentSessionId, ProviderSessionId};
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};

fn stripe() -> Options {
    Options {
        stripe: true,
        ..Options::default()
    }
}

/// Presses Decline on the sandbox page, as a browser posts the form.
async fn press_decline(http: reqwest::Client, url: String) -> StatusCode {
    http.post(url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("reason=insufficient_funds")
        .send()
        .await
        .expect("decline")
        .status()
}

#[tokio::test]
async fn under_stripe_the_sandbox_routes_do_not_exist_even_for_a_stored_sandbox_checkout() {
    // Arrange: a live deployment whose database once held a sandbox checkout of a session
    // (a staging database promoted).
    let app = TestApp::spawn_with(stripe()).await;
    let buyer = app.buyer();
    let id = session_id(&app.create_checkout(&buyer).await);
    let leftover = ProviderSessionId::new("cs_sandbox_0123456789abcdef0123456789abcdef");
    app.payments
        .storage
        .put_sandbox_checkout(&SandboxCheckout {
            id: leftover.clone(),
            session_id: PaymentSessionId::parse(&id).unwrap(),
            attempt: AttemptNumber::new(0),
            amount: 2500,
            currency: "usd".to_owned(),
            description: "Order 123".to_owned(),
            success_url: app.url(&format!("/pay/{id}")),
            cancel_url: app.url(&format!("/pay/{id}")),
            expires_at: Utc::now() + TimeDelta::hours(1),
            status: SandboxCheckoutStatus::Open,
        })
        .await
        .unwrap();

    // Act + Assert: every sandbox route is an unknown route.
    for (method, action) in [
        (Method::GET, ""),
        (Method::POST, "/pay"),
        (Method::POST, "/decline"),
    ] {
        let response = app
            .http
            .request(
                method.clone(),
                app.url(&format!("/sandbox/checkout/{leftover}{action}")),
            )
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("reason=insufficient_funds")
            .send()
            .await
            .unwrap();
        assert_problem(response, 404, "not_found").await;
    }

    // Nothing was signed or recorded: the session is still open, unpaid.
    assert_eq!(app.status(&buyer, &id).await["status"], "open");
    let actions = app.audit_actions(&id).await;
    assert_eq!(actions, ["checkout_created"], "{actions:?}");
    let stored = app
        .payments
        .storage
        .sandbox_checkout(&leftover)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, SandboxCheckoutStatus::Open);
}

#[tokio::test]
async fn sandbox_checkout_ids_are_keyed_yet_repeat_for_a_redelivered_create() {
    // Arrange
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let status = app.create_checkout(&buyer).await;
    let id = session_id(&status);
    let checkout = status["providerSessionId"].as_str().unwrap().to_owned();

    // Assert: not the unkeyed digest of what every `/pay` link reveals.
    let unkeyed = hex::encode(Sha256::digest(format!("payretry-{id}-attempt-0")));
    let suffix = checkout.strip_prefix("cs_sandbox_").expect("a sandbox id");
    assert_eq!(suffix.len(), 32, "{checkout}");
    assert!(suffix.bytes().all(|b| b.is_ascii_hexdigit()), "{checkout}");
    assert!(!unkeyed.starts_with(suffix), "{checkout} is computable");
    assert!(
        !suffix.starts_with(&unkeyed[..24]),
        "{checkout} is computable"
    );

    // A redelivered create for the same attempt finds the same checkout; the next attempt
    // gets another.
    let session = app
        .payments
        .storage
        .session(&PaymentSessionId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    let request = |attempt| CheckoutRequest {
        session_id: session.id.clone(),
        attempt: AttemptNumber::new(attempt),
        money: session.money.clone(),
        description: session.description.clone(),
        success_url: app.url("/ok"),
        cancel_url: app.url("/cancel"),
        expires_at: Utc::now() + TimeDelta::hours(1),
    };
    let again = app
        .payments
        .provider
        .create_checkout(&request(0))
        .await
        .unwrap();
    assert_eq!(again.id.as_str(), checkout);
    let next = app
        .payments
        .provider
        .create_checkout(&request(1))
        .await
        .unwrap();
    assert_ne!(next.id.as_str(), checkout);
}

#[tokio::test]
async fn a_declined_sandbox_checkout_is_closed_and_declines_once() {
    // Arrange
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let status = app.create_checkout(&buyer).await;
    let id = session_id(&status);
    let checkout = status["providerSessionId"].as_str().unwrap().to_owned();

    // Act: many presses of Decline (and of Pay) at once.
    let url = app.url(&format!("/sandbox/checkout/{checkout}/decline"));
    let presses: Vec<_> = (0..20)
        .map(|_| tokio::spawn(press_decline(app.http.clone(), url.clone())))
        .collect();
    let mut answers = Vec::new();
    for press in presses {
        answers.push(press.await.unwrap());
    }
    let pay = app
        .http
        .post(app.url(&format!("/sandbox/checkout/{checkout}/pay")))
        .send()
        .await
        .unwrap();

    // Assert: one decline went through, the rest found the checkout closed.
    let redirected = answers
        .iter()
        .filter(|s| **s == StatusCode::SEE_OTHER)
        .count();
    let conflicts = answers
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    assert_eq!((redirected, conflicts), (1, 19));
    assert_eq!(pay.status(), StatusCode::CONFLICT);
    app.wait_for_status(&id, "failed").await;
    let actions = app.audit_actions(&id).await;
    assert_eq!(
        actions,
        ["checkout_created", "payment_failed"],
        "{actions:?}"
    );
    let page = app
        .http
        .get(app.url(&format!("/sandbox/checkout/{checkout}")))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("This checkout is declined."), "{html}");
    assert!(
        !html.contains("<form"),
        "a closed checkout offers no buttons"
    );
}
