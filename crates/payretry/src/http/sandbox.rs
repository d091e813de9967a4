//! The sandbox provider's hosted checkout page: Pay, or Decline with a chosen reason. Each
//! button delivers a signed Stripe-format webhook to this service, then returns the buyer
//! to the status page, exactly as a real provider would.
//!
//! These routes exist only with the `sandbox` provider ([`SandboxPages`] is built only
//! then): under `stripe`, nothing but Stripe may sign a Stripe event, and a sandbox checkout
//! left in a database that later went live must not be payable by anyone.
//!
//! Pay and Decline each close the checkout (compare-and-set from `open`), so a checkout is
//! paid or declined once, whatever a visitor sends.

use super::AppState;
use super::form::Form;
use super::page::{STYLE, escape, nonce, page_headers};
use super::rate_limit;
use crate::provider::sandbox::{
    SandboxCheckout, SandboxCheckoutStatus, SandboxCheckouts, deliver, events,
};
use crate::secret::Secret;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use payretry_domain::ProviderSessionId;
use serde::Deserialize;
use std::sync::Arc;

/// What the sandbox's hosted pages need; exists only when the provider is the sandbox.
pub struct SandboxPages {
    pub checkouts: Arc<dyn SandboxCheckouts>,
    /// Signs the events the pages deliver to this service's own webhook endpoint.
    pub signing_secret: Secret,
    /// Where those events are delivered (`{public_url}/webhooks/stripe`).
    pub public_url: String,
    pub http: reqwest::Client,
}

/// The sandbox's routes, each request charged to the caller's anonymous per-address budget.
pub fn router(pages: Arc<SandboxPages>, app: &AppState) -> Router<AppState> {
    Router::new()
        .route("/sandbox/checkout/{id}", get(show))
        .route("/sandbox/checkout/{id}/pay", post(pay))
        .route("/sandbox/checkout/{id}/decline", post(decline))
        .route_layer(middleware::from_fn_with_state(
            app.clone(),
            rate_limit::anonymous,
        ))
        .with_state(pages)
}

type Pages = State<Arc<SandboxPages>>;

/// Decline codes the page offers, with the words a tester sees.
pub const DECLINE_REASONS: [(&str, &str); 6] = [
    ("insufficient_funds", "Insufficient funds"),
    ("card_declined", "Generic decline"),
    ("expired_card", "Expired card"),
    ("incorrect_cvc", "Incorrect CVC"),
    ("processing_error", "Processing error"),
    ("stolen_card", "Stolen card (not retryable)"),
];

async fn load(pages: &SandboxPages, id: &str) -> Result<SandboxCheckout, Response> {
    let id = ProviderSessionId::new(id);
    match pages.checkouts.sandbox_checkout(&id).await {
        Ok(Some(checkout)) => Ok(checkout),
        Ok(None) => Err((
            StatusCode::NOT_FOUND,
            page(
                "Checkout not found",
                r#"<h1>Checkout not found</h1><div class="card"><p>This checkout does not exist.</p></div>"#,
            ),
        )
            .into_response()),
        Err(_) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            page(
                "Unavailable",
                r#"<h1>Unavailable</h1><div class="card"><p>Try again in a moment.</p></div>"#,
            ),
        )
            .into_response()),
    }
}

/// A sandbox page in the buyer page's look ([`STYLE`]), with its security headers.
fn page(title: &str, body: &str) -> (HeaderArray, Html<String>) {
    let nonce = nonce();
    let html = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>{title}</title>
<style nonce="{nonce}">{STYLE}</style></head><body><main>
<p class="banner"><strong>Test mode.</strong> This is the sandbox provider: no real card is charged.</p>
{body}</main></body></html>"#,
        title = escape(title),
    );
    (page_headers(&nonce, false), Html(html))
}

type HeaderArray = [(HeaderName, HeaderValue); 5];

/// `12.34 USD`; zero-decimal currencies (Stripe's list) have no minor unit.
fn format_amount(minor: i64, currency: &str) -> String {
    const ZERO_DECIMAL: [&str; 16] = [
        "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
        "xaf", "xof", "xpf",
    ];
    let code = escape(&currency.to_uppercase());
    if ZERO_DECIMAL.contains(&currency.to_ascii_lowercase().as_str()) {
        format!("{minor} {code}")
    } else {
        format!("{}.{:02} {code}", minor / 100, (minor % 100).abs())
    }
}

/// `GET /sandbox/checkout/{id}`.
pub async fn show(State(pages): Pages, Path(id): Path<String>) -> Response {
    let checkout = match load(&pages, &id).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let amount = format_amount(checkout.amount, &checkout.currency);
    let id = escape(checkout.id.as_str());
    let attempt = if !checkout.attempt.is_retry() {
        "First checkout".to_owned()
    } else {
        format!("Retry {}", checkout.attempt)
    };
    let body = if checkout.status == SandboxCheckoutStatus::Open {
        let options: String = DECLINE_REASONS
            .iter()
            .map(|(code, label)| format!(r#"<option value="{code}">{label}</option>"#))
            .collect();
        format!(
            r#"<h1>Sandbox checkout</h1>
<div class="card">
<p class="status">{description}</p>
<p class="amount">Amount: <strong>{amount}</strong></p>
<p class="muted">{attempt} for this payment.</p>
<form method="post" action="/sandbox/checkout/{id}/pay">
<button class="primary" type="submit">Pay {amount}</button>
</form>
<form method="post" action="/sandbox/checkout/{id}/decline">
<fieldset><legend>Simulate a declined card</legend>
<label for="reason">Decline reason</label>
<select id="reason" name="reason">{options}</select>
<button class="danger" type="submit">Decline</button>
</fieldset>
</form>
</div>"#,
            description = escape(&checkout.description),
        )
    } else {
        format!(
            r#"<h1>Sandbox checkout</h1><div class="card"><p class="status">This checkout is {status}.</p>
<a class="button primary" href="{back}">Back to your payment</a></div>"#,
            status = checkout.status,
            back = escape(&checkout.cancel_url),
        )
    };
    page("Sandbox checkout", &body).into_response()
}

#[derive(Deserialize)]
pub struct DeclineForm {
    reason: String,
}

/// `POST /sandbox/checkout/{id}/pay`.
pub async fn pay(State(pages): Pages, Path(id): Path<String>) -> Response {
    let checkout = match close(&pages, &id, SandboxCheckoutStatus::Paid).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    send(&pages, &events::paid(&checkout)).await;
    Redirect::to(&checkout.success_url).into_response()
}

/// `POST /sandbox/checkout/{id}/decline`.
pub async fn decline(
    State(pages): Pages,
    Path(id): Path<String>,
    Form(form): Form<DeclineForm>,
) -> Response {
    let reason = DECLINE_REASONS
        .iter()
        .find(|(code, _)| *code == form.reason)
        .map_or("card_declined", |(code, _)| code);
    let checkout = match close(&pages, &id, SandboxCheckoutStatus::Declined).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    send(&pages, &events::declined(&checkout, reason)).await;
    Redirect::to(&checkout.cancel_url).into_response()
}

/// Closes an open checkout as `to`; 409 when it is not open (any more).
async fn close(
    pages: &SandboxPages,
    id: &str,
    to: SandboxCheckoutStatus,
) -> Result<SandboxCheckout, Response> {
    let checkout = load(pages, id).await?;
    let closed = pages
        .checkouts
        .set_sandbox_checkout_status(&checkout.id, SandboxCheckoutStatus::Open, to)
        .await;
    match closed {
        Ok(true) => Ok(checkout),
        Ok(false) => Err((
            StatusCode::CONFLICT,
            page(
                "Closed",
                r#"<h1>Checkout closed</h1><div class="card"><p>This checkout is closed.</p></div>"#,
            ),
        )
            .into_response()),
        Err(_) => Err(StatusCode::SERVICE_UNAVAILABLE.into_response()),
    }
}

async fn send(pages: &SandboxPages, event: &serde_json::Value) {
    if let Err(error) = deliver(&pages.http, &pages.public_url, &pages.signing_secret, event).await
    {
        tracing::error!(%error, "sandbox webhook delivery failed");
    }
}
