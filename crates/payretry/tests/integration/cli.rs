//! The client commands `payretry status|retry` against a real server.

use crate::support::app::TestApp;
use std::process::Command;

fn payretry(args: &[&str], token: &str) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_payretry"))
        .args(args)
        .env("PAYRETRY_TOKEN", token)
        .output()
        .expect("run payretry");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_retry_commands_speak_the_contract() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let id = app.declined_session(&buyer).await.id;

    let (ok, out, err) = payretry(&["status", &id, "--url", &app.base], &buyer);
    assert!(ok, "{err}");
    assert!(
        out.contains("status    failed") && out.contains("failure   insufficient_funds"),
        "{out}"
    );
    assert!(out.contains("retry     available"), "{out}");

    let (ok, out, err) = payretry(&["retry", &id, "--url", &app.base, "--json"], &buyer);
    assert!(ok, "{err}");
    let accepted: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(accepted["attemptNumber"], 1);
    assert_eq!(accepted["sessionId"], id.as_str());

    let (ok, _, err) = payretry(&["retry", &id, "--url", &app.base], &buyer);
    assert!(!ok, "a second retry while one is scheduled must fail");
    assert!(err.contains("retry_already_scheduled"), "{err}");

    let (ok, out, _) = payretry(&["status", &id, "--url", &app.base, "--json"], &buyer);
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["status"], "retry_scheduled");
    assert_eq!(status["retryAttempts"], 1);
}
