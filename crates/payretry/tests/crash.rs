//! Crash safety of the real binary (DESIGN.md §5, transactional outbox): a SIGKILL between
//! accepting a retry and its due time loses nothing and does nothing twice, and SIGTERM
//! stops the process gracefully with exit code 0.
//!
//! These tests run `payretry serve` as a child process, exactly as an operator would, on a
//! temporary SQLite file with the sandbox provider.
#![cfg(unix)]

mod support;

use payretry::http::auth::JwtKeys;
use payretry::secret::Secret;
use payretry_domain::Role;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::process::ServeProcess as Server;

const JWT_SECRET: &str = "crash-test-jwt-secret-with-more-than-32-chars";
const WEBHOOK_SECRET: &str = "whsec_x";

/// `payretry serve` on the sandbox provider and the SQLite file `db`, ready.
async fn start(dir: &Path, db: &Path, name: &str) -> Server {
    let env: Vec<(String, String)> = [
        (
            "PAYRETRY_DATABASE_URL",
            format!("sqlite://{}", db.display()),
        ),
        ("PAYRETRY_RETRY_DELAYS", "3s".to_owned()),
        ("PAYRETRY_JWT_SECRET", JWT_SECRET.to_owned()),
        ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut server = Server::spawn(env!("CARGO_BIN_EXE_payretry"), &["serve"], &env, dir, name);
    server.wait_ready().await;
    server
}

/// A client for one server, with tokens minted from the shared secret.
struct Api {
    http: reqwest::Client,
    base: String,
    buyer: String,
    admin: String,
}

impl Api {
    fn new(server: &Server) -> Self {
        let keys = JwtKeys::new(&Secret::new(JWT_SECRET));
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            base: server.base.clone(),
            buyer: keys.issue("buyer-1", Role::Buyer, 600),
            admin: keys.issue("admin-1", Role::Admin, 600),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("request")
    }

    async fn status(&self, id: &str) -> Value {
        let response = self
            .call(
                Method::GET,
                &format!("/payments/checkout/{id}/status"),
                &self.buyer,
                None,
                None,
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK, "status of {id}");
        response.json().await.unwrap()
    }

    async fn audit_actions(&self, id: &str) -> Vec<String> {
        let response = self
            .call(
                Method::GET,
                &format!("/payments/checkout/{id}/audit"),
                &self.admin,
                None,
                None,
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK, "audit of {id}");
        let body: Value = response.json().await.unwrap();
        body["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| e["action"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// The provider reports that `attempt`'s checkout was declined (signed webhook).
    async fn decline(&self, id: &str, attempt: u32, reason: &str) {
        let event = json!({
            "id": format!("evt_crash_{:032x}", rand::random::<u128>()), "object": "event",
            "type": "payment_intent.payment_failed",
            "data": {"object": {"id": "pi_crash", "object": "payment_intent",
                "metadata": {"payment_session_id": id, "retry_attempt": attempt.to_string()},
                "last_payment_error": {"code": "card_declined", "decline_code": reason}}}
        });
        let body = serde_json::to_vec(&event).unwrap();
        let signature = payretry::provider::signature::sign(
            &body,
            WEBHOOK_SECRET,
            chrono::Utc::now().timestamp(),
        );
        let response = self
            .http
            .post(format!("{}/webhooks/stripe", self.base))
            .header("Stripe-Signature", signature)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .expect("webhook");
        assert_eq!(response.status(), StatusCode::OK, "decline webhook");
    }
}

/// One number read straight from the database file.
async fn count(db: &Path, sql: &'static str) -> i64 {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .expect("open the database");
    let n = sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(&mut conn)
        .await
        .expect(sql);
    let _ = conn.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_accepting_a_retry_and_its_due_time_loses_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("p.db");

    // First life: a checkout, a decline, a retry accepted, then SIGKILL.
    let mut first = start(dir.path(), &db, "first").await;
    let api = Api::new(&first);
    let created = api
        .call(
            Method::POST,
            "/payments/checkout",
            &api.buyer,
            None,
            Some(json!({"amount": 2500, "currency": "usd", "description": "Order 123"})),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    let id = created["sessionId"].as_str().expect("sessionId").to_owned();
    let first_checkout = created["providerSessionId"]
        .as_str()
        .expect("providerSessionId")
        .to_owned();

    api.decline(&id, 0, "insufficient_funds").await;
    let failed = api.status(&id).await;
    assert_eq!(failed["status"], "failed", "{failed}");

    let retry = api
        .call(
            Method::POST,
            &format!("/payments/retry/{id}"),
            &api.buyer,
            Some("crash-retry-1"),
            None,
        )
        .await;
    assert_eq!(retry.status(), StatusCode::ACCEPTED);
    let retry_bytes = retry.bytes().await.unwrap();
    let killed = first.sigkill();
    assert_eq!(killed.signal(), Some(9), "the child died of SIGKILL");

    let retry: Value = serde_json::from_slice(&retry_bytes).unwrap();
    assert_eq!(retry["attemptNumber"], 1, "{retry}");
    assert_eq!(retry["delaySeconds"], 3, "{retry}");
    let due: chrono::DateTime<chrono::Utc> = retry["scheduledFor"]
        .as_str()
        .expect("scheduledFor")
        .parse()
        .expect("scheduledFor is RFC 3339");

    // Second life on the same database: the accepted retry is still there and runs once.
    let second = start(dir.path(), &db, "second").await;
    let api = Api::new(&second);
    let before_due = api.status(&id).await;
    if chrono::Utc::now() < due {
        assert_eq!(before_due["status"], "retry_scheduled", "{before_due}");
        assert_eq!(before_due["retryAttempts"], 1, "{before_due}");
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    let open = loop {
        let status = api.status(&id).await;
        if status["status"] == "open" {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the retry never ran after the restart; last status {status}; log:\n{}",
            second.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        chrono::Utc::now() >= due,
        "the retry checkout appeared before its due time {due}"
    );
    let new_checkout = open["providerSessionId"]
        .as_str()
        .expect("providerSessionId");
    assert_ne!(new_checkout, first_checkout, "a NEW provider checkout");
    assert_eq!(open["retryAttempts"], 1, "{open}");
    assert_eq!(open["sessionId"], id.as_str(), "same payment session");

    let actions = api.audit_actions(&id).await;
    let n = |action: &str| actions.iter().filter(|a| *a == action).count();
    assert_eq!(n("retry_requested"), 1, "{actions:?}");
    assert_eq!(n("retry_initiated"), 1, "{actions:?}");

    // The job is acknowledged (deleted) just after the session update commits.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let jobs = count(&db, "SELECT COUNT(*) FROM retry_jobs").await;
        if jobs == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retry_jobs still holds {jobs} row(s)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count(&db, "SELECT COUNT(*) FROM dead_letters").await, 0);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM sandbox_checkouts WHERE attempt_number = 1"
        )
        .await,
        1,
        "exactly one provider checkout for attempt 1"
    );

    // The retry accepted before the crash replays across it, byte for byte, with no
    // second attempt spent.
    let replay = api
        .call(
            Method::POST,
            &format!("/payments/retry/{id}"),
            &api.buyer,
            Some("crash-retry-1"),
            None,
        )
        .await;
    assert_eq!(replay.status(), StatusCode::ACCEPTED);
    assert_eq!(
        replay
            .headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    assert_eq!(replay.bytes().await.unwrap(), retry_bytes);
    let after = api.status(&id).await;
    assert_eq!(after["status"], "open", "{after}");
    assert_eq!(after["retryAttempts"], 1, "{after}");
    assert_eq!(after["providerSessionId"], new_checkout, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_process_gracefully_with_exit_code_0() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("p.db");
    let mut server = start(dir.path(), &db, "term").await;

    let sent = Command::new("kill")
        .arg("-TERM")
        .arg(server.pid().to_string())
        .status()
        .expect("run kill -TERM");
    assert!(sent.success(), "kill -TERM failed: {sent}");

    let status = server
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| {
            panic!(
                "payretry serve did not exit within 10 s of SIGTERM; log:\n{}",
                server.log_text()
            )
        });
    assert!(
        status.success(),
        "exit after SIGTERM was {status}, expected 0; log:\n{}",
        server.log_text()
    );
    assert_eq!(status.signal(), None, "it exited, not killed by the signal");
    assert!(
        server.log_text().contains("shutting down"),
        "the shutdown was logged; log:\n{}",
        server.log_text()
    );
}
