//! Creating a payment session: the provider's first checkout (attempt 0), then the session,
//! its attempt row, the audit entry and the idempotent response in one transaction. If the
//! provider call fails nothing is written; the orphan checkout, if any, expires on its own.

use super::views::StatusView;
use super::{Payments, ServiceResult, completion, json_response};
use crate::provider::{CheckoutRequest, checkout_expires_at};
use crate::storage::{
    IdempotencyScope, NewAuditEntry, NewSession, SessionRecord, SessionState, StoredResponse,
};
use chrono::{TimeDelta, Utc};
use payretry_domain::{
    AttemptNumber, AuditAction, Money, PaymentSessionId, Principal, SessionStatus,
};
use serde_json::{Value, json};

/// A validated checkout request.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCheckout {
    pub money: Money,
    pub description: String,
    pub metadata: Value,
}

impl Payments {
    /// Creates the session; returns it with the 201 response (already stored for replay).
    pub async fn create_checkout(
        &self,
        buyer: &Principal,
        request: NewCheckout,
        idempotency: Option<&IdempotencyScope>,
    ) -> ServiceResult<(SessionRecord, StoredResponse)> {
        let now = Utc::now();
        let window = TimeDelta::from_std(self.policy.window).unwrap_or(TimeDelta::hours(24));
        let id = PaymentSessionId::from_random(rand::random());
        let expires_at = now + window;
        let checkout = self
            .provider
            .create_checkout(&CheckoutRequest {
                session_id: id.clone(),
                attempt: AttemptNumber::ORIGINAL,
                money: request.money.clone(),
                description: request.description.clone(),
                success_url: format!("{}?result=success", self.pay_url(&id)),
                cancel_url: self.pay_url(&id),
                expires_at: checkout_expires_at(expires_at, now),
            })
            .await?;
        // Stored times have millisecond precision; the response must match what is stored.
        let now = crate::storage::from_millis(now.timestamp_millis())?;
        let expires_at = crate::storage::from_millis(expires_at.timestamp_millis())?;
        let session = SessionRecord {
            id: id.clone(),
            buyer: buyer.user.clone(),
            money: request.money,
            description: request.description,
            metadata: request.metadata,
            expires_at,
            created_at: now,
            updated_at: now,
            version: 0,
            state: SessionState {
                status: SessionStatus::Open,
                failure_reason: None,
                retry_attempts: 0,
                last_retry_at: None,
                retry_reason: None,
                next_retry_at: None,
                current_attempt: AttemptNumber::ORIGINAL,
                provider_session_id: Some(checkout.id.clone()),
                checkout_url: Some(checkout.url.clone()),
                paid_attempt: None,
            },
        };
        let response = json_response(201, &StatusView::of(&session, &self.policy, now));
        self.storage
            .insert_session(NewSession {
                id,
                buyer: session.buyer.clone(),
                money: session.money.clone(),
                description: session.description.clone(),
                metadata: session.metadata.clone(),
                expires_at,
                created_at: now,
                provider_session_id: checkout.id.clone(),
                checkout_url: checkout.url,
                audit: NewAuditEntry {
                    action: AuditAction::CheckoutCreated,
                    attempt: Some(AttemptNumber::ORIGINAL),
                    actor: buyer.actor().to_string(),
                    details: json!({
                        "providerSessionId": checkout.id.as_str(),
                        "amount": session.money.amount.minor_units(),
                        "currency": session.money.currency.as_str(),
                        "expiresAt": expires_at,
                    }),
                },
                idempotency: completion(idempotency, &response),
            })
            .await?;
        Ok((session, response))
    }
}
