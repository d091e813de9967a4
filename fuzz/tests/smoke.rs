//! The fuzz checks on stable Rust, without libFuzzer: deterministic pseudo-random inputs,
//! a few hand-made ones, and every file in `corpus/webhook` and `artifacts/webhook` if a
//! fuzzing run left some. `cargo test --manifest-path fuzz/Cargo.toml` (scripts/fuzz.sh
//! runs it when no nightly toolchain is available).

use std::path::Path;

/// xorshift64*: no dependency, same inputs on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn pseudo_random_inputs_never_break_the_webhook_checks() {
    let cases: u64 = std::env::var("FUZZ_SMOKE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut buf = Vec::new();
    for _ in 0..cases {
        let len = (rng.next() % 1024) as usize;
        buf.clear();
        buf.extend((0..len).map(|_| rng.next() as u8));
        payretry_fuzz::webhook(&buf);
    }
}

#[test]
fn hand_made_inputs() {
    for input in [
        &b""[..],
        b"{}",
        b"null",
        br#"{"id":"evt_1","type":"checkout.session.completed","data":{"object":{"payment_status":"paid","client_reference_id":"ps_abc"}}}"#,
        br#"{"id":"evt_2","type":"payment_intent.payment_failed","data":{"object":{"metadata":{"payment_session_id":"ps_x","retry_attempt":"99999999999"},"last_payment_error":{"decline_code":"  "}}}}"#,
        b"t=1,v1=00",
        &[0xff; 4096][..],
    ] {
        payretry_fuzz::webhook(input);
    }
}

#[test]
fn replays_saved_corpus_and_artifacts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["corpus/webhook", "artifacts/webhook"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Ok(data) = std::fs::read(entry.path()) {
                payretry_fuzz::webhook(&data);
            }
        }
    }
}
