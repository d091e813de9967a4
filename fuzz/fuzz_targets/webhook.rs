//! libFuzzer target: `payretry::provider::signature::verify` on arbitrary headers, payloads,
//! secrets and clocks, and `payretry::webhook::event::parse` on arbitrary bodies (raw bytes
//! and Stripe-shaped JSON). Neither may panic, and `verify` may accept only a header that a
//! configured secret really signed within the tolerance. The checks are in `src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    payretry_fuzz::webhook(data);
});
