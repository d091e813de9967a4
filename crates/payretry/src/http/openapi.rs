//! The OpenAPI document served at `/openapi.json`, generated from the handlers.

use super::AppState;
use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// `GET /openapi.json`: the document of this API.
pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(openapi_json))
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[derive(OpenApi)]
#[openapi(
    info(title = "payretry", description = "Safe, bounded retries of failed card payments inside the payment window."),
    paths(
        super::payments::create_checkout,
        super::payments::status,
        super::payments::retry,
        super::payments::audit,
        super::webhooks::stripe,
        super::admin::list,
        super::admin::redrive,
        super::admin::duplicate_payments,
        super::webhook_deliveries::list,
        super::webhook_deliveries::redeliver,
        super::admin_sessions::list,
        super::retry_stats::retries,
        super::health::healthz,
        super::health::readyz,
        super::health::metrics,
    ),
    components(schemas(
        crate::service::views::StatusView,
        crate::service::views::RetryAcceptedView,
        super::payments::CreateCheckoutBody,
        super::payments::AuditLogView,
        super::payments::AuditEntryView,
        super::admin::DeadLettersView,
        super::admin::DeadLetterView,
        super::admin::DuplicatePaymentsView,
        super::admin::DuplicatePaymentView,
        super::admin::DuplicatePaymentStatusView,
        super::webhook_deliveries::DeliveriesView,
        super::webhook_deliveries::DeliveryView,
        super::admin_sessions::AdminSessionsView,
        super::admin_sessions::AdminSessionView,
        crate::service::funnel::RetryFunnel,
        crate::service::funnel::AttemptFunnel,
        crate::service::funnel::FunnelStage,
        crate::service::funnel::RecoveredAmount,
        super::error::Problem,
    )),
    modifiers(&BearerAuth, &CommonResponses, &ResponseDescriptions)
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Answers every operation can give besides its own: 503 while storage or the queue is
/// unreachable (or every connection is busy), 408 when the request headers do not arrive
/// within 10 s, 431 for headers over 16 KiB or more than 100 of them, 413 for a body over
/// 64 KiB on routes that take one, 415 for a body that is not `application/json` on the
/// routes that read JSON, 502 when the payment provider fails a checkout. Declared here
/// once rather than on every handler.
struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let problem = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/problem+json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Problem")))
                        .build(),
                )
                .build()
        };
        let operational = ["/healthz", "/readyz", "/metrics"];
        let json_bodies = [
            "/payments/checkout",
            "/payments/retry/{sessionId}",
            "/webhooks/stripe",
        ];
        for (path, item) in openapi.paths.paths.iter_mut() {
            if operational.contains(&path.as_str()) {
                continue;
            }
            let operations = [&mut item.get, &mut item.post].into_iter().flatten();
            for operation in operations {
                let responses = &mut operation.responses.responses;
                responses
                    .entry("503".to_owned())
                    .or_insert_with(|| problem("storage or queue unavailable; try again").into());
                responses
                    .entry("431".to_owned())
                    .or_insert_with(|| problem("request headers over 16 KiB, or over 100").into());
                responses
                    .entry("408".to_owned())
                    .or_insert_with(|| problem("request headers not received within 10 s").into());
            }
            if let Some(post) = item.post.as_mut() {
                post.responses
                    .responses
                    .entry("413".to_owned())
                    .or_insert_with(|| problem("body over 64 KiB").into());
                if json_bodies.contains(&path.as_str()) {
                    post.responses
                        .responses
                        .entry("415".to_owned())
                        .or_insert_with(|| problem("a body that is not application/json").into());
                }
                if path == "/payments/checkout" {
                    post.responses
                        .responses
                        .entry("502".to_owned())
                        .or_insert_with(|| problem("the payment provider failed").into());
                }
            }
        }
    }
}

/// OpenAPI requires a `description` on every response: where a handler declared none, the
/// contract's meaning of that status (DESIGN.md §3) is filled in.
struct ResponseDescriptions;

impl ResponseDescriptions {
    fn for_status(status: &str) -> &'static str {
        match status {
            "200" => "OK",
            "201" => "the payment session, created",
            "202" => "accepted",
            "400" => {
                "invalid request (`code` says what: invalid_request, idempotency_key_missing, idempotency_key_invalid, invalid_signature)"
            }
            "401" => "unauthenticated: a missing, malformed, expired or forged bearer token",
            "403" => "forbidden: the caller's role may not use this route",
            "404" => "not found (a session the caller may not see is not found either)",
            "409" => {
                "refused: the state of the session or of the Idempotency-Key does not allow it"
            }
            "410" => "payment_window_expired",
            "422" => "idempotency_key_reused: the same key was used for a different request",
            "429" => "rate_limited, with Retry-After",
            "503" => "unavailable, with Retry-After",
            _ => "see the problem's code",
        }
    }
}

impl Modify for ResponseDescriptions {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        for item in openapi.paths.paths.values_mut() {
            let operations = [&mut item.get, &mut item.post].into_iter().flatten();
            for operation in operations {
                for (status, response) in operation.responses.responses.iter_mut() {
                    if let RefOr::T(response) = response
                        && response.description.is_empty()
                    {
                        response.description = Self::for_status(status).to_owned();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_response_has_a_description() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                for (status, response) in operation["responses"].as_object().unwrap() {
                    let description = response["description"].as_str().unwrap_or("");
                    assert!(!description.is_empty(), "{method} {path} {status}");
                }
            }
        }
    }
}
