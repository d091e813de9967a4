//! payretry's integration tests: one test binary, one module per area, each driving the real
//! server (or the real binary) through `support`'s harness.
//!
//! The tests that must run alone stay separate binaries: `crash`, `failpoints`, `scale`,
//! `outage_postgres` and `outage_sqs` (they kill processes, restart servers or load the
//! machine). Everything here can share a binary; a few tests touch process-wide state (the
//! metrics recorder in `dogstatsd`), which is why the suite runs under cargo-nextest, one
//! process per test (scripts/test.sh runs the `cargo test` fallback so that `dogstatsd` runs
//! alone too).

#[path = "../support/mod.rs"]
mod support;

mod admin_console_data;
mod cli;
mod dogstatsd;
mod double_payment;
mod http_contract;
mod logs;
mod merchant_events;
mod postgres_plans;
mod provider_budget;
mod queue_conformance;
mod readiness;
mod refunds;
mod retry_flow;
mod security;
mod segment;
mod sqs;
mod storage_conformance;
mod stripe_behaviour;
mod stripe_limits;
mod stripe_provider;
mod webhooks;
mod worker;
