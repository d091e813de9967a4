//! The buyer side of payretry: a typed client for the HTTP contract and the rules of the
//! retry button.
//!
//! Layout:
//! - [`api`]: the contract's JSON bodies (status object, retry object, checkout request,
//!   audit log, problem+json), built on payretry-domain's types.
//! - [`error`]: [`ApiErrorCode`] (every contract error code) and [`ClientError`] (answer,
//!   no answer, or unreadable answer).
//! - [`client`]: [`Client`], one async method per route, one HTTP request per call.
//! - [`retry_machine`]: the pure state machine behind the payment status page:
//!   `transition(state, event) -> (state, effects)` and the retry button's [`RetryAction`].
//! - [`schedule_payment_retry`]: the use case that sends one press with one idempotency key,
//!   asking again (same key) only when the answer was lost or the server failed.
//!
//! The machine is the only place that decides what the buyer may do, and it decides by the
//! server's `retryAvailable`, never by its own reading of attempts or clocks.

pub mod api;
pub mod client;
pub mod error;
pub mod retry_machine;
pub mod schedule_payment_retry;

pub use api::{AuditEntry, AuditLog, CreateCheckout, PaymentStatus, Problem, RetryScheduled};
pub use client::{Client, ClientBuildError};
pub use error::{ApiErrorCode, ClientError};
pub use retry_machine::{Effect, RetryAction, RetryEvent, RetryState, retry_action, transition};
pub use schedule_payment_retry::{
    Backoff, PressOutcome, RetryApi, SchedulePaymentRetry, Sleeper, TokioSleeper,
    new_idempotency_key,
};
