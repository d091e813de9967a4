//! The OpenAPI document served at `/openapi.json`, generated from the handlers.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

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
        super::error::Problem,
    )),
    modifiers(&BearerAuth)
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
