//! The sandbox provider's hosted checkout page: Pay, or Decline with a chosen reason. Each
//! button delivers a signed Stripe-format webhook to this service, then returns the buyer
//! to the status page, exactly as a real provider would.

use super::AppState;
use crate::provider::sandbox::{deliver, events};
use crate::storage::SandboxCheckout;
use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use payretry_domain::ProviderSessionId;
use serde::Deserialize;

/// Decline codes the page offers, with the words a tester sees.
pub const DECLINE_REASONS: [(&str, &str); 6] = [
    ("insufficient_funds", "Insufficient funds"),
    ("card_declined", "Generic decline"),
    ("expired_card", "Expired card"),
    ("incorrect_cvc", "Incorrect CVC"),
    ("processing_error", "Processing error"),
    ("stolen_card", "Stolen card (not retryable)"),
];

pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

async fn load(state: &AppState, id: &str) -> Result<SandboxCheckout, Response> {
    let id = ProviderSessionId::new(id);
    match state.payments.storage.sandbox_checkout(&id).await {
        Ok(Some(checkout)) => Ok(checkout),
        Ok(None) => Err((
            StatusCode::NOT_FOUND,
            Html(page(
                "Checkout not found",
                "<p>This checkout does not exist.</p>",
            )),
        )
            .into_response()),
        Err(_) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            Html(page("Unavailable", "<p>Try again in a moment.</p>")),
        )
            .into_response()),
    }
}

fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:28rem;margin:2rem auto;padding:0 1rem;color:#1a1a1a}}
.card{{border:1px solid #ccc;border-radius:.5rem;padding:1.25rem}}
button{{font-size:1rem;padding:.7rem 1.2rem;border-radius:.4rem;border:0;cursor:pointer;margin:.4rem 0;width:100%}}
.pay{{background:#0a6b2d;color:#fff}} .decline{{background:#8b1a1a;color:#fff}}
label{{display:block;margin:.8rem 0 .3rem}} select{{font-size:1rem;width:100%;padding:.4rem}}
.note{{color:#555;font-size:.9rem}}
</style></head><body><main>{body}</main></body></html>"#
    )
}

/// `GET /sandbox/checkout/{id}`.
pub async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let checkout = match load(&state, &id).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let amount = format!(
        "{}.{:02} {}",
        checkout.amount / 100,
        checkout.amount % 100,
        checkout.currency.to_uppercase()
    );
    let id = escape(checkout.id.as_str());
    let body = if checkout.status == "open" {
        let options: String = DECLINE_REASONS
            .iter()
            .map(|(code, label)| format!(r#"<option value="{code}">{label}</option>"#))
            .collect();
        format!(
            r#"<h1>Sandbox checkout</h1><div class="card">
<p><strong>{description}</strong></p><p>Amount: <strong>{amount}</strong></p>
<p class="note">Attempt {attempt}. No real card is charged.</p>
<form method="post" action="/sandbox/checkout/{id}/pay"><button class="pay" type="submit">Pay {amount}</button></form>
<form method="post" action="/sandbox/checkout/{id}/decline">
<label for="reason">Decline reason</label>
<select id="reason" name="reason">{options}</select>
<button class="decline" type="submit">Decline</button></form></div>"#,
            description = escape(&checkout.description),
            attempt = checkout.attempt,
        )
    } else {
        format!(
            r#"<h1>Sandbox checkout</h1><div class="card"><p>This checkout is {status}.</p>
<p><a href="{back}">Back to the payment</a></p></div>"#,
            status = escape(&checkout.status),
            back = escape(&checkout.cancel_url),
        )
    };
    Html(page("Sandbox checkout", &body)).into_response()
}

#[derive(Deserialize)]
pub struct DeclineForm {
    reason: String,
}

/// `POST /sandbox/checkout/{id}/pay`.
pub async fn pay(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let checkout = match load(&state, &id).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    if checkout.status != "open" {
        return (
            StatusCode::CONFLICT,
            Html(page("Closed", "<p>This checkout is closed.</p>")),
        )
            .into_response();
    }
    if state
        .payments
        .storage
        .set_sandbox_checkout_status(&checkout.id, "paid")
        .await
        .is_err()
    {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    send(&state, &events::paid(&checkout)).await;
    Redirect::to(&checkout.success_url).into_response()
}

/// `POST /sandbox/checkout/{id}/decline`.
pub async fn decline(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Form(form): Form<DeclineForm>,
) -> Response {
    let checkout = match load(&state, &id).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    if checkout.status != "open" {
        return (
            StatusCode::CONFLICT,
            Html(page("Closed", "<p>This checkout is closed.</p>")),
        )
            .into_response();
    }
    let reason = DECLINE_REASONS
        .iter()
        .find(|(code, _)| *code == form.reason)
        .map_or("card_declined", |(code, _)| code);
    send(&state, &events::declined(&checkout, reason)).await;
    Redirect::to(&checkout.cancel_url).into_response()
}

async fn send(state: &AppState, event: &serde_json::Value) {
    let Some(secret) = state.webhook_secrets.first() else {
        return;
    };
    if let Err(error) = deliver(&state.http, &state.payments.public_url, secret, event).await {
        tracing::error!(%error, "sandbox webhook delivery failed");
    }
}
