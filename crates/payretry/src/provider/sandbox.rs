//! The built-in sandbox provider: the whole flow with no account. Its hosted page
//! `/sandbox/checkout/{id}` (served by this service) has Pay and Decline buttons; pressing one
//! delivers a Stripe-format, correctly signed webhook to this service's own
//! `/webhooks/stripe`, exercising exactly the path a real provider's webhook takes.
//! Checkouts live in the database, so every process on it (api, worker) sees them.
//!
//! A checkout id is the capability to pay or decline it (the page needs no login, as a
//! provider's hosted page), so it is keyed with a secret kept in the database: knowing a
//! session id and an attempt number is not enough to compute it. Keyed, not random, so a
//! redelivered create for the same attempt finds the same checkout, as Stripe's
//! Idempotency-Key guarantees.

use super::{
    CheckoutRequest, CheckoutState, PaymentProvider, ProviderCheckout, ProviderError, Refund,
    RefundRequest, RefundState,
};
use crate::secret::Secret;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hmac::{KeyInit, Mac};
use payretry_domain::{AttemptNumber, PaymentSessionId, ProviderSessionId};
use serde_json::{Value, json};
use sha2::Sha256;
use std::sync::Arc;

/// A checkout of the built-in sandbox provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxCheckout {
    pub id: ProviderSessionId,
    pub session_id: PaymentSessionId,
    pub attempt: AttemptNumber,
    pub amount: i64,
    pub currency: String,
    pub description: String,
    pub success_url: String,
    pub cancel_url: String,
    pub expires_at: DateTime<Utc>,
    pub status: SandboxCheckoutStatus,
}

/// Where a sandbox checkout stands. Only `Open` can be paid or declined, and only once: a
/// declined checkout is closed, so an anonymous visitor cannot append declines without end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxCheckoutStatus {
    Open,
    Paid,
    /// The buyer pressed Decline: the card was refused and this checkout is closed.
    Declined,
    Expired,
    /// Paid, then refunded (a duplicate payment).
    Refunded,
}

impl SandboxCheckoutStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Paid => "paid",
            Self::Declined => "declined",
            Self::Expired => "expired",
            Self::Refunded => "refunded",
        }
    }
}

impl std::fmt::Display for SandboxCheckoutStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SandboxCheckoutStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(Self::Open),
            "paid" => Ok(Self::Paid),
            "declined" => Ok(Self::Declined),
            "expired" => Ok(Self::Expired),
            "refunded" => Ok(Self::Refunded),
            other => Err(format!("unknown sandbox checkout status `{other}`")),
        }
    }
}

/// The sandbox checkouts could not be read or written (their database failed).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct SandboxCheckoutError(pub Box<dyn std::error::Error + Send + Sync>);

pub type SandboxCheckoutResult<T> = Result<T, SandboxCheckoutError>;

/// Where the sandbox keeps its checkouts: the service's database (storage implements this).
#[async_trait]
pub trait SandboxCheckouts: Send + Sync + 'static {
    async fn put_sandbox_checkout(&self, checkout: &SandboxCheckout) -> SandboxCheckoutResult<()>;

    async fn sandbox_checkout(
        &self,
        id: &ProviderSessionId,
    ) -> SandboxCheckoutResult<Option<SandboxCheckout>>;

    /// Moves a sandbox checkout from `from` to `to`; `false` when it was not in `from` (it
    /// moved on, or does not exist), so of two concurrent presses exactly one wins.
    async fn set_sandbox_checkout_status(
        &self,
        id: &ProviderSessionId,
        from: SandboxCheckoutStatus,
        to: SandboxCheckoutStatus,
    ) -> SandboxCheckoutResult<bool>;
}

pub struct SandboxProvider {
    storage: Arc<dyn SandboxCheckouts>,
    public_url: String,
    /// Keys checkout ids (see the module doc); shared by every process on the database.
    id_key: Secret,
}

impl SandboxProvider {
    /// The name of the id key among the service secrets.
    pub const ID_KEY_NAME: &'static str = "sandbox_checkout_ids";

    pub fn new(storage: Arc<dyn SandboxCheckouts>, public_url: String, id_key: Secret) -> Self {
        Self {
            storage,
            public_url,
            id_key,
        }
    }

    /// The checkout id of the attempt with `idempotency_key`: 128 bits of
    /// HMAC-SHA256(id key, idempotency key).
    fn checkout_id(&self, idempotency_key: &str) -> ProviderSessionId {
        let mut mac =
            <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(self.id_key.expose().as_bytes())
                .expect("HMAC takes a key of any length");
        mac.update(idempotency_key.as_bytes());
        let digest = mac.finalize().into_bytes();
        ProviderSessionId::new(format!("{CHECKOUT_PREFIX}{}", hex::encode(&digest[..16])))
    }
}

fn unavailable(error: impl std::fmt::Display) -> ProviderError {
    ProviderError::Transient(format!("sandbox storage: {error}"))
}

#[async_trait]
impl PaymentProvider for SandboxProvider {
    async fn create_checkout(
        &self,
        request: &CheckoutRequest,
    ) -> Result<ProviderCheckout, ProviderError> {
        let id = self.checkout_id(&request.idempotency_key());
        let checkout = SandboxCheckout {
            id: id.clone(),
            session_id: request.session_id.clone(),
            attempt: request.attempt,
            amount: request.money.amount.minor_units(),
            currency: request.money.currency.to_string(),
            description: request.description.clone(),
            success_url: request.success_url.clone(),
            cancel_url: request.cancel_url.clone(),
            expires_at: request.expires_at,
            status: SandboxCheckoutStatus::Open,
        };
        self.storage
            .put_sandbox_checkout(&checkout)
            .await
            .map_err(unavailable)?;
        let stored = self
            .storage
            .sandbox_checkout(&id)
            .await
            .map_err(unavailable)?;
        let stored = stored.ok_or_else(|| unavailable("checkout vanished"))?;
        Ok(ProviderCheckout {
            url: format!("{}/sandbox/checkout/{id}", self.public_url),
            id,
            expires_at: stored.expires_at,
        })
    }

    async fn retrieve_checkout(
        &self,
        id: &ProviderSessionId,
    ) -> Result<CheckoutState, ProviderError> {
        let checkout = self
            .storage
            .sandbox_checkout(id)
            .await
            .map_err(unavailable)?;
        match checkout.as_ref().map(|c| c.status) {
            // A refunded checkout was paid: the money moved, and moved back.
            Some(SandboxCheckoutStatus::Paid | SandboxCheckoutStatus::Refunded) => {
                Ok(CheckoutState::Paid)
            }
            // A declined sandbox checkout is closed without payment.
            Some(SandboxCheckoutStatus::Expired | SandboxCheckoutStatus::Declined) => {
                Ok(CheckoutState::Expired)
            }
            Some(_)
                if checkout
                    .as_ref()
                    .is_some_and(|c| c.expires_at <= Utc::now()) =>
            {
                Ok(CheckoutState::Expired)
            }
            Some(_) => Ok(CheckoutState::Open),
            None => Err(ProviderError::Permanent(format!("no such checkout: {id}"))),
        }
    }

    async fn expire_checkout(&self, id: &ProviderSessionId) -> Result<(), ProviderError> {
        let checkout = self
            .storage
            .sandbox_checkout(id)
            .await
            .map_err(unavailable)?;
        if checkout.is_some_and(|c| c.status == SandboxCheckoutStatus::Open) {
            // Lost to a concurrent pay or decline: the checkout is closed either way.
            self.storage
                .set_sandbox_checkout_status(
                    id,
                    SandboxCheckoutStatus::Open,
                    SandboxCheckoutStatus::Expired,
                )
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn refund(&self, request: &RefundRequest) -> Result<Refund, ProviderError> {
        let payment_intent = request.payment_intent.as_str();
        // A sandbox payment intent is named after its checkout (see `events::payment_intent`),
        // and a checkout is paid at most once, so the checkout's status is the idempotency.
        let no_such = || ProviderError::Permanent(format!("no such payment: {payment_intent}"));
        let suffix = payment_intent
            .strip_prefix(PAYMENT_INTENT_PREFIX)
            .ok_or_else(no_such)?;
        let id = ProviderSessionId::new(format!("{CHECKOUT_PREFIX}{suffix}"));
        let checkout = self
            .storage
            .sandbox_checkout(&id)
            .await
            .map_err(unavailable)?
            .ok_or_else(no_such)?;
        match checkout.status {
            SandboxCheckoutStatus::Paid => {
                // `false`: a concurrent refund won, which is this refund done.
                self.storage
                    .set_sandbox_checkout_status(
                        &id,
                        SandboxCheckoutStatus::Paid,
                        SandboxCheckoutStatus::Refunded,
                    )
                    .await
                    .map_err(unavailable)?;
            }
            SandboxCheckoutStatus::Refunded => {}
            other => {
                return Err(ProviderError::Permanent(format!(
                    "checkout {id} is {other}, not paid: nothing to refund"
                )));
            }
        }
        // The sandbox settles at once: no pending refunds, no refund events.
        Ok(Refund {
            id: Some(format!("re_sandbox_{suffix}")),
            state: RefundState::Succeeded,
        })
    }
}

/// Sandbox checkout ids: this prefix and 32 hex digits.
const CHECKOUT_PREFIX: &str = "cs_sandbox_";
/// Sandbox payment intent ids: this prefix and the same digits as their checkout.
const PAYMENT_INTENT_PREFIX: &str = "pi_sandbox_";

/// The Stripe-format events the sandbox page sends.
pub mod events {
    use super::*;

    fn metadata(c: &SandboxCheckout) -> Value {
        json!({"payment_session_id": c.session_id.as_str(), "retry_attempt": c.attempt.to_string()})
    }

    fn envelope(kind: &str, object: Value) -> Value {
        json!({
            "id": format!("evt_sandbox_{:032x}", rand::random::<u128>()),
            "object": "event",
            "type": kind,
            "created": Utc::now().timestamp(),
            "livemode": false,
            "data": {"object": object},
        })
    }

    /// The checkout's payment intent, named after it so a refund can find the checkout.
    pub fn payment_intent(c: &SandboxCheckout) -> String {
        let suffix =
            c.id.as_str()
                .strip_prefix(CHECKOUT_PREFIX)
                .unwrap_or(c.id.as_str());
        format!("{PAYMENT_INTENT_PREFIX}{suffix}")
    }

    /// `checkout.session.completed` with `payment_status: paid` and the `payment_intent`
    /// a refund of this payment needs.
    pub fn paid(c: &SandboxCheckout) -> Value {
        envelope(
            "checkout.session.completed",
            json!({
                "id": c.id.as_str(), "object": "checkout.session", "status": "complete",
                "payment_status": "paid", "amount_total": c.amount, "currency": c.currency,
                "client_reference_id": c.session_id.as_str(), "metadata": metadata(c),
                "payment_intent": payment_intent(c),
            }),
        )
    }

    /// `payment_intent.payment_failed` with the chosen decline code.
    pub fn declined(c: &SandboxCheckout, decline_code: &str) -> Value {
        envelope(
            "payment_intent.payment_failed",
            json!({
                "id": payment_intent(c), "object": "payment_intent",
                "amount": c.amount, "currency": c.currency, "metadata": metadata(c),
                "last_payment_error": {"type": "card_error", "code": "card_declined", "decline_code": decline_code},
            }),
        )
    }
}

/// Sends a signed event to this service's webhook endpoint, as the provider would.
pub async fn deliver(
    client: &reqwest::Client,
    public_url: &str,
    secret: &Secret,
    event: &Value,
) -> Result<(), ProviderError> {
    let body = serde_json::to_vec(event).map_err(|e| ProviderError::Permanent(e.to_string()))?;
    let signature =
        crate::provider::signature::sign(&body, secret.expose(), Utc::now().timestamp());
    let response = client
        .post(format!("{public_url}/webhooks/stripe"))
        .header("Stripe-Signature", signature)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| ProviderError::Transient(format!("webhook delivery: {e}")))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(ProviderError::Transient(format!(
            "webhook answered {}",
            response.status()
        )))
    }
}
