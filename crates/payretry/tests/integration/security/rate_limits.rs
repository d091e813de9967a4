//! Rate limits as an outsider meets them: one caller cannot spend its neighbours' budget, a
//! forged `X-Forwarded-For` buys nothing, the anonymous sandbox pages have a budget too, and
//! a bad `PAYRETRY_TRUSTED_PROXIES` stops start-up.

use crate::support::app::{Options, TestApp, assert_problem};
use payretry_domain::Role;
use reqwest::{Method, Response, StatusCode};
use serde_json::json;

/// With one request a minute per principal, each client address gets ten.
const ADDRESS_BUDGET: usize = 10;

async fn spawn(vars: Vec<(&'static str, String)>) -> TestApp {
    TestApp::spawn_with(Options {
        vars,
        ..Default::default()
    })
    .await
}

/// `POST /payments/checkout` for `buyer`, optionally with an `X-Forwarded-For`.
async fn checkout(app: &TestApp, buyer: &str, forwarded_for: Option<&str>) -> Response {
    let token = app.token(buyer, Role::Buyer);
    let mut request = app
        .http
        .post(app.url("/payments/checkout"))
        .bearer_auth(token)
        .json(&json!({"amount": 2500, "currency": "usd"}));
    if let Some(value) = forwarded_for {
        request = request.header("X-Forwarded-For", value);
    }
    request.send().await.expect("request")
}

async fn assert_rate_limited(response: Response) {
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .expect("a Retry-After header")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_problem(response, 429, "rate_limited").await;
}

#[tokio::test]
async fn one_principal_over_its_budget_does_not_lock_out_its_address() {
    // Arrange: three a minute per principal, so thirty per address.
    let app = spawn(vec![("PAYRETRY_RATE_LIMIT_PER_MINUTE", "3".into())]).await;
    let greedy = app.token("greedy-buyer", Role::Buyer);
    for _ in 0..3 {
        app.create_checkout(&greedy).await;
    }

    // Act: the same principal keeps going, far past the address's thirty.
    for _ in 0..40 {
        assert_rate_limited(checkout(&app, "greedy-buyer", None).await).await;
    }

    // Assert: its neighbours on the same address still have their budgets.
    for n in 0..3 {
        for _ in 0..3 {
            let response = checkout(&app, &format!("neighbour-{n}"), None).await;
            assert_eq!(response.status(), StatusCode::CREATED);
        }
    }
}

#[tokio::test]
async fn unauthenticated_requests_are_charged_to_their_address() {
    let app = spawn(vec![("PAYRETRY_RATE_LIMIT_PER_MINUTE", "1".into())]).await;
    let body = json!({"amount": 2500, "currency": "usd"});
    for _ in 0..ADDRESS_BUDGET {
        let response = app
            .request(
                Method::POST,
                "/payments/checkout",
                None,
                None,
                Some(body.clone()),
            )
            .await;
        assert_problem(response, 401, "unauthenticated").await;
    }
    let response = app
        .request(
            Method::POST,
            "/payments/retry/ps_x",
            Some("not-a-jwt"),
            Some("k"),
            None,
        )
        .await;
    assert_rate_limited(response).await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget() {
    // Arrange: the test client (127.0.0.1) is the trusted proxy.
    let app = spawn(vec![
        ("PAYRETRY_RATE_LIMIT_PER_MINUTE", "1".into()),
        ("PAYRETRY_TRUSTED_PROXIES", "127.0.0.1/32".into()),
    ])
    .await;
    for n in 0..ADDRESS_BUDGET {
        let response = checkout(&app, &format!("a-{n}"), Some("203.0.113.10")).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    assert_rate_limited(checkout(&app, "a-fresh", Some("203.0.113.10")).await).await;
    // A forged entry left of the proxy's own changes nothing for that client.
    let forged = "198.51.100.99, 203.0.113.10";
    assert_rate_limited(checkout(&app, "a-forged", Some(forged)).await).await;

    // Act and assert: another client behind the same proxy is counted on its own.
    for n in 0..ADDRESS_BUDGET {
        let response = checkout(&app, &format!("b-{n}"), Some("203.0.113.20")).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    // A chain through a second trusted hop still names the client.
    let chained = "203.0.113.30, 127.0.0.1";
    let response = checkout(&app, "c-0", Some(chained)).await;
    assert_eq!(response.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn without_trusted_proxies_a_forged_forwarded_for_changes_nothing() {
    let app = spawn(vec![("PAYRETRY_RATE_LIMIT_PER_MINUTE", "1".into())]).await;
    for n in 0..ADDRESS_BUDGET {
        let forged = format!("203.0.113.{n}");
        let response = checkout(&app, &format!("rotating-{n}"), Some(&forged)).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }

    // A fresh principal claiming a fresh address is still counted on the TCP peer.
    let response = checkout(&app, "rotating-fresh", Some("198.51.100.1")).await;
    assert_rate_limited(response).await;
    assert_rate_limited(checkout(&app, "rotating-bare", None).await).await;
}

#[tokio::test]
async fn anonymous_sandbox_requests_have_a_per_address_budget() {
    let app = spawn(vec![("PAYRETRY_RATE_LIMIT_PER_MINUTE", "1".into())]).await;
    let session = app.create_checkout(&app.buyer()).await;
    let checkout_url = session["checkoutUrl"].as_str().unwrap();
    let page = checkout_url
        .strip_prefix(&app.base)
        .expect("a sandbox checkout on this server")
        .to_owned();
    for _ in 0..ADDRESS_BUDGET {
        let response = app.request(Method::GET, &page, None, None, None).await;
        assert_eq!(response.status(), StatusCode::OK);
    }

    // Each of the sandbox's routes is refused once the address's budget is spent, before
    // anything is delivered.
    for path in [
        page.clone(),
        format!("{page}/pay"),
        format!("{page}/decline"),
    ] {
        let method = if path == page {
            Method::GET
        } else {
            Method::POST
        };
        let response = app
            .http
            .request(method, app.url(&path))
            .form(&[("reason", "insufficient_funds")])
            .send()
            .await
            .expect("request");
        assert_rate_limited(response).await;
    }
    let id = session["sessionId"].as_str().unwrap();
    assert_eq!(app.status(&app.buyer(), id).await["status"], "open");

    // Authenticated routes have their own budgets.
    app.create_checkout(&app.token("another-buyer", Role::Buyer))
        .await;
}

#[test]
fn a_bad_trusted_proxies_setting_stops_start_up_naming_it() {
    for bad in ["localhost", "10.0.0.0/33", "10.0.0.0/8;::1/128"] {
        super::settings::assert_refused(
            &[("PAYRETRY_TRUSTED_PROXIES", bad)],
            "PAYRETRY_TRUSTED_PROXIES",
        );
    }
}
