//! The retry service: the business operations of payretry, each ending in one atomic
//! storage transition. HTTP handlers, the worker and the sweeper call these; none of them
//! touches storage state directly.
//!
//! - [`checkout`]: create a payment session with its first checkout.
//! - [`closures`]: closing provider checkouts nobody should pay any more, durably.
//! - [`retry`]: eligibility and scheduling of a buyer's retry.
//! - [`events`]: provider events (paid, failed, expired) applied to sessions.
//! - [`expiry`]: closing sessions whose window passed.
//! - [`dead_letters`]: listing and redriving jobs that kept failing.
//! - [`duplicates`]: double payments for support, and refunding them.
//! - [`sessions`] and [`funnel`]: what the operator console reads: sessions newest first,
//!   and the retry funnel.
//! - [`views`]: the status and retry objects of the HTTP contract.
//!
//! What each operation does to a session is decided by the domain's lifecycle rules
//! ([`payretry_domain::lifecycle`]); `record` turns a decision into a storage transition.

pub mod checkout;
pub mod closures;
pub mod dead_letters;
pub mod deliveries;
pub mod duplicates;
pub mod events;
pub mod expiry;
pub mod funnel;
pub(crate) mod record;
pub mod retry;
pub mod sessions;
pub mod views;

use crate::provider::{PaymentProvider, ProviderError};
use crate::storage::{
    Committed, IdempotencyCompletion, IdempotencyScope, SessionRecord, Storage, StorageError,
    StoredResponse, Transition,
};
use chrono::{DateTime, Utc};
use payretry_domain::charge_limits::{ChargeLimitError, check_stripe_charge};
use payretry_domain::{Money, PaymentSessionId, Principal, RetryPolicy, RetryRefusal};
use serde::Serialize;
use std::sync::Arc;

/// How often a transition is re-decided after losing a compare-and-set race before giving up.
const MAX_CONFLICT_ROUNDS: usize = 8;

/// Why an operation did not happen. The HTTP edge maps each to the contract.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("session not found")]
    SessionNotFound,
    #[error("dead letter not found")]
    DeadLetterNotFound,
    #[error("webhook delivery not found")]
    DeliveryNotFound,
    #[error(transparent)]
    Refused(#[from] RetryRefusal),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the session kept changing while being updated")]
    Contended,
}

pub type ServiceResult<T> = Result<T, ServiceError>;

/// The operations and what they need.
pub struct Payments {
    pub storage: Arc<dyn Storage>,
    pub provider: Arc<dyn PaymentProvider>,
    pub policy: RetryPolicy,
    /// Base for the links handed to the provider (`/pay/{id}`).
    pub public_url: String,
    /// Whether Segment events are recorded (a write key is configured). When off, no
    /// analytics rows are written at all, so none pile up.
    pub analytics: bool,
    /// Whether merchant events are recorded (`PAYRETRY_MERCHANT_WEBHOOK_URL` is set). When
    /// off, no delivery rows are written at all.
    pub merchant_events: bool,
    /// Whether a detected double payment is refunded through the provider
    /// (`PAYRETRY_AUTO_REFUND_DUPLICATES`); otherwise it is only recorded for support.
    pub auto_refund_duplicates: bool,
    /// Whether new checkouts must respect Stripe's charge limits (the `stripe` provider):
    /// per-currency minimums and decimal rules, checked before anything is written or sent.
    pub stripe_charge_limits: bool,
}

impl Payments {
    /// A session the caller may see; anyone else's is reported as missing.
    pub async fn visible_session(
        &self,
        id: &PaymentSessionId,
        caller: &Principal,
    ) -> ServiceResult<SessionRecord> {
        match self.storage.session(id).await? {
            Some(session) if caller.can_see(&session.buyer) => Ok(session),
            _ => Err(ServiceError::SessionNotFound),
        }
    }

    pub(crate) async fn load(&self, id: &PaymentSessionId) -> ServiceResult<SessionRecord> {
        self.storage
            .session(id)
            .await?
            .ok_or(ServiceError::SessionNotFound)
    }

    /// Refuses an amount the provider would refuse to charge (with `stripe`: below the
    /// currency's minimum, or breaking its decimal rules). The sandbox takes any amount the
    /// contract allows.
    pub fn check_charge(&self, money: &Money) -> Result<(), ChargeLimitError> {
        if self.stripe_charge_limits {
            check_stripe_charge(money)?;
        }
        Ok(())
    }

    /// The buyer-facing page of a session, also the provider's return URL.
    pub fn pay_url(&self, id: &PaymentSessionId) -> String {
        format!("{}/pay/{id}", self.public_url)
    }

    /// The transition recording `change` of `session` at `now` (with its merchant events
    /// when they are on), and the metrics to emit once it is committed.
    pub(crate) fn record(
        &self,
        session: &SessionRecord,
        change: payretry_domain::Change,
        now: DateTime<Utc>,
    ) -> (Transition, Vec<payretry_domain::lifecycle::MetricNote>) {
        record::transition(
            session,
            change,
            now,
            self.merchant_events.then_some(&self.policy),
        )
    }

    /// Decides and commits a transition, re-deciding on a lost compare-and-set race.
    /// `decide` returns `None` when there is nothing to do for the session as it now is.
    pub(crate) async fn transition<T>(
        &self,
        id: &PaymentSessionId,
        decide: impl FnMut(&SessionRecord, DateTime<Utc>) -> ServiceResult<Option<(Transition, T)>>,
    ) -> ServiceResult<Option<(SessionRecord, T)>> {
        self.transition_on(id, None, decide).await
    }

    /// Like [`Payments::transition`], deciding first on `read`, the session as the caller
    /// already read it (saving a read); only a lost race reads it again.
    pub(crate) async fn transition_on<T>(
        &self,
        id: &PaymentSessionId,
        mut read: Option<SessionRecord>,
        mut decide: impl FnMut(&SessionRecord, DateTime<Utc>) -> ServiceResult<Option<(Transition, T)>>,
    ) -> ServiceResult<Option<(SessionRecord, T)>> {
        for _ in 0..MAX_CONFLICT_ROUNDS {
            let session = match read.take() {
                Some(session) => session,
                None => self.load(id).await?,
            };
            let Some((mut transition, value)) = decide(&session, now_millis())? else {
                return Ok(None);
            };
            if !self.analytics {
                transition.analytics.clear();
            }
            match self.storage.commit(transition).await? {
                Committed::Applied => return Ok(Some((session, value))),
                Committed::DuplicateEvent => return Ok(None),
                Committed::Conflict => continue,
            }
        }
        Err(ServiceError::Contended)
    }
}

/// Now, at the millisecond precision timestamps are stored with, so a time in a response
/// (e.g. `scheduledFor`) equals the same time read back later (`nextRetryAt`).
pub fn now_millis() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

/// Serialises a response body once, so the bytes stored for idempotent replay are exactly
/// the bytes sent.
pub fn json_response(status: u16, body: &impl Serialize) -> StoredResponse {
    StoredResponse {
        status,
        body: serde_json::to_vec(body).expect("views serialise"),
    }
}

pub(crate) fn completion(
    scope: Option<&IdempotencyScope>,
    response: &StoredResponse,
) -> Option<IdempotencyCompletion> {
    scope.map(|scope| IdempotencyCompletion {
        scope: scope.clone(),
        response: response.clone(),
    })
}
