//! Test doubles shared by the integration tests. Each test binary uses only some of them.
#![allow(dead_code)]

pub mod app;
pub mod fake_segment;
pub mod fake_stripe;
pub mod merchant_receiver;
pub mod process;
pub mod python;
pub mod services;
