//! Creating a payment session: the provider's first checkout (attempt 0), then the session,
//! its attempt row, the audit entry and the idempotent response in one transaction. If the
//! provider call fails nothing is written; the orphan checkout, if any, expires on its own.

use super::views::StatusView;
use super::{Payments, ServiceResult, completion, json_response, record};
use crate::provider::{CheckoutRequest, checkout_expires_at};
use crate::storage::{IdempotencyScope, NewSession, SessionRecord, StoredResponse};
use chrono::{TimeDelta, Utc};
use payretry_domain::{AttemptNumber, Money, PaymentSessionId, Principal, lifecycle};
use serde_json::Value;

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
        let mut opened =
            lifecycle::open_checkout(&checkout, &request.money, expires_at, buyer.actor());
        let audit = record::audit_entry(&opened.effects.audit.remove(0));
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
            event_sequence: 0,
            state: opened.state,
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
                audit,
                idempotency: completion(idempotency, &response),
            })
            .await?;
        Ok((session, response))
    }
}
