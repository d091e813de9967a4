//! payretry: safe, bounded retries of failed card payments inside the payment window.
//! The rules themselves (eligibility, delays, the session lifecycle) are the pure crate
//! `payretry_domain`; this crate runs them.
//!
//! Layout:
//! - [`app`]: wiring: builds storage, queue, provider and service from the configuration,
//!   then serves the API and runs the background tasks until shutdown.
//! - [`cli`]: the `payretry` command line (`serve`, `migrate`, `token`, `dead-letters`, `webhooks`, `sqs`, `demo`).
//! - [`config`]: configuration from the environment, validated at start-up.
//! - [`demo`]: `payretry demo`, the whole retry story end to end on the embedded default.
//! - [`http`]: the HTTP edge: routes, authentication, idempotency, rate limits, the error
//!   type and the server-rendered pages.
//! - [`merchant_events`]: signed callbacks (Standard Webhooks) to the merchant's systems,
//!   and the relay that delivers them.
//! - [`provider`]: the payment provider trait, with the built-in `sandbox` and `stripe`,
//!   and the provider's webhook signature format.
//! - [`queue`]: the retry-job queue traits, the SQS backend and its outbox relay.
//! - [`refund_runner`]: makes the refunds of double payments, outside any request.
//! - [`secret`]: secrets that cannot be printed by accident.
//! - [`service`]: the business operations, each ending in one atomic storage transition.
//! - [`shutdown`]: the shutdown signal shared by the server and the background tasks.
//! - [`storage`]: durable state and its transitions, on SQLite or PostgreSQL (also the
//!   embedded queue, the analytics and webhook outboxes and the sandbox's checkouts).
//! - [`sweeper`]: expires sessions whose window closed, closes the checkouts nobody should
//!   pay any more, and purges old records.
//! - [`telemetry`]: metrics, logs, and Segment analytics with their relay.
//! - [`webhook`]: the provider's webhook events, parsed.
//! - [`worker`]: the retry worker that turns a due job into a new checkout.

pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod http;
/// A point where the fault-injection tests kill the process, to prove that a crash there
/// loses and duplicates nothing. Compiled to nothing unless the `failpoints` feature is on;
/// armed with `FAILPOINTS=<name>=return`.
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| std::process::abort())
    };
}

pub mod merchant_events;
pub mod provider;
pub mod queue;
pub mod refund_runner;
pub mod secret;
pub mod service;
pub mod shutdown;
pub mod storage;
pub mod sweeper;
pub mod telemetry;
pub mod webhook;
pub mod worker;
