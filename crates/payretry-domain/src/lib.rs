//! payretry's domain: the rules of a payment retry, with no I/O.
//!
//! Layout:
//! - [`ids`]: newtypes for every identifier and key that crosses a boundary.
//! - [`money`]: amounts in integer minor units with their currency.
//! - [`charge_limits`]: amounts Stripe refuses to charge (per-currency minimums, decimal rules).
//! - [`status`]: the session state machine's states and the reasons a retry is unavailable.
//! - [`failure`]: provider failure reasons (decline codes) as a value.
//! - [`policy`]: the retry policy (delays, attempt cap, window, non-retryable reasons).
//! - [`eligibility`]: the single place that decides whether a retry may be scheduled.
//! - [`lifecycle`]: the session's state and what each event does to it, with its effects.
//! - [`merchant_event`]: what the merchant's systems are told about each change.
//! - [`audit`]: roles, actors and the audit log's actions.
//! - [`job`]: the queue message shared by every queue backend.
//! - [`backoff`]: the exponential backoff every "try again later" uses.
//!
//! This crate must never depend on tokio, sqlx or reqwest: everything with I/O lives in the
//! service crate behind traits this crate does not know.

pub mod audit;
pub mod backoff;
pub mod charge_limits;
pub mod eligibility;
pub mod failure;
pub mod ids;
pub mod job;
pub mod lifecycle;
pub mod merchant_event;
pub mod money;
pub mod policy;
pub mod status;

pub use audit::{Actor, AuditAction, Principal, Role};
pub use backoff::{Backoff, Jitter};
pub use eligibility::{RetryPlan, RetryRefusal, SessionSnapshot, check_retry};
pub use failure::FailureReason;
pub use ids::{
    AttemptNumber, DeadLetterId, DeliveryId, IdempotencyKey, PaymentSessionId, ProviderSessionId,
    UserId,
};
pub use job::RetryJob;
pub use lifecycle::{Change, Effects, Lifecycle, SessionState};
pub use money::{Amount, Currency, Money};
pub use policy::RetryPolicy;
pub use status::{RetryUnavailableReason, SessionStatus};
