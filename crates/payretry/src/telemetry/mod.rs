//! Telemetry: metrics with the contract's names (DESIGN.md §6) and log set-up.

pub mod analytics;
pub mod logs;
pub mod metrics;
