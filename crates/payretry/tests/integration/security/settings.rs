//! Settings an operator could get dangerously wrong stop start-up, naming the variable.

use std::process::{Command, Stdio};

/// Runs `payretry serve` with only `vars` set; returns its exit code and stderr lines.
fn start_with(vars: &[(&str, &str)]) -> (Option<i32>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_payretry"));
    command
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PAYRETRY_LISTEN", "127.0.0.1:0")
        .env(
            "PAYRETRY_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("payretry.db").display()),
        )
        .stdin(Stdio::null());
    for (name, value) in vars {
        command.env(name, value);
    }
    let output = command.output().expect("run payretry");
    assert!(
        !dir.path().join("payretry.db").exists(),
        "a refused setting must stop start-up before anything is opened"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    (
        output.status.code(),
        stderr.lines().map(str::to_owned).collect(),
    )
}

/// Asserts that start-up with `vars` stops with exit code 2 and one line naming `var`.
pub(crate) fn assert_refused(vars: &[(&str, &str)], var: &str) {
    let (code, lines) = start_with(vars);
    assert_eq!(code, Some(2), "{vars:?}: {lines:?}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("payretry: configuration error: {var}: ")),
        "{lines:?}"
    );
}

#[test]
fn a_payment_window_too_large_to_mean_anything_stops_start_up() {
    for window in ["99999999999999h", "721h", "0s"] {
        assert_refused(
            &[("PAYRETRY_PAYMENT_WINDOW", window)],
            "PAYRETRY_PAYMENT_WINDOW",
        );
    }
}

#[test]
fn retry_delays_keep_a_floor() {
    // No backoff at all is refused everywhere.
    assert_refused(&[("PAYRETRY_RETRY_DELAYS", "0s")], "PAYRETRY_RETRY_DELAYS");
    assert_refused(
        &[("PAYRETRY_RETRY_DELAYS", "1m,0s")],
        "PAYRETRY_RETRY_DELAYS",
    );
    // With a live key, real card networks are behind the endpoint: 10 s at least.
    assert_refused(
        &[
            ("PAYRETRY_PROVIDER", "stripe"),
            ("STRIPE_SECRET_KEY", "sk_live_payretry_test"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_payretry_test"),
            ("PAYRETRY_PUBLIC_URL", "https://pay.example.com"),
            ("PAYRETRY_RETRY_DELAYS", "5s,1m"),
        ],
        "PAYRETRY_RETRY_DELAYS",
    );
}

#[test]
fn merchant_webhook_settings_are_checked_before_start_up() {
    let secret = payretry::merchant_events::signature::SigningKey::encode(&[5; 32]);
    let url = (
        "PAYRETRY_MERCHANT_WEBHOOK_URL",
        "https://orders.example/hooks",
    );
    let key = ("PAYRETRY_MERCHANT_WEBHOOK_SECRET", secret.as_str());
    assert_refused(&[url], "PAYRETRY_MERCHANT_WEBHOOK_SECRET");
    assert_refused(&[key], "PAYRETRY_MERCHANT_WEBHOOK_URL");
    for bad in ["orders.example/hooks", "ftp://orders.example", "https://"] {
        assert_refused(
            &[("PAYRETRY_MERCHANT_WEBHOOK_URL", bad), key],
            "PAYRETRY_MERCHANT_WEBHOOK_URL",
        );
    }
    for bad in [
        "shh",
        "whsec_not base64",
        "whsec_c2hvcnQ=",
        &format!("{secret},x"),
    ] {
        let (code, lines) = start_with(&[url, ("PAYRETRY_MERCHANT_WEBHOOK_SECRET", bad)]);
        assert_eq!(code, Some(2), "{lines:?}");
        assert!(
            lines[0]
                .starts_with("payretry: configuration error: PAYRETRY_MERCHANT_WEBHOOK_SECRET: "),
            "{lines:?}"
        );
        assert!(
            !lines[0].contains(&secret[6..]),
            "no secret echoed: {lines:?}"
        );
    }
    for (var, bad) in [
        ("PAYRETRY_MERCHANT_WEBHOOK_RETRY_DELAYS", "5s,soon"),
        ("PAYRETRY_MERCHANT_WEBHOOK_TIMEOUT", "0s"),
    ] {
        assert_refused(&[url, key, (var, bad)], var);
    }
}
