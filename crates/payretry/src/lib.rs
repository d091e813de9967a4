//! payretry: safe, bounded retries of failed card payments inside the payment window.
//!
//! Layout:
//! - `provider`: the payment provider trait, with the built-in `sandbox` and `stripe`.
//! - `webhook`: provider webhook signatures and event parsing.
//! - `secret`: secrets that cannot be printed by accident.

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
