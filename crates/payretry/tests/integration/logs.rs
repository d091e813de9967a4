//! Structured logs of the real binary (DESIGN.md §6): `payretry serve` with
//! `PAYRETRY_LOG_FORMAT=json` and `RUST_LOG=debug`, driven through a whole retry story
//! against the fake Stripe API. Every line is JSON; requests log method, route, status,
//! latency and request id; `x-request-id` is echoed and logged; job lines carry the session
//! id and attempt; and no secret (bearer tokens, the webhook secret, the Stripe key, the JWT
//! signing key) is ever written, even at debug level.
#![cfg(unix)]

use crate::support::app::session_id;
use crate::support::fake_stripe::{FakeStripe, TEST_SECRET_KEY};
use payretry::http::auth::JwtKeys;
use payretry::secret::Secret;
use payretry_domain::Role;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Distinctive values, so any appearance in the output is unmistakably a leak.
const JWT_SECRET: &str = "logs-test-jwt-signing-key-Zq7vK2pW9xR4mN8bT3";
const WEBHOOK_SECRET: &str = "whsec_logsTestWebhookSecret5Hd8Jk2Lp9Qr";
const REQUEST_ID: &str = "test-req-123";
/// Looks like a token, is not one: the 401 path must not log it either.
const BAD_TOKEN: &str =
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJmb3JnZWQtbG9ncy10ZXN0In0.bm90LWEtc2lnbmF0dXJl";

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// `payretry serve` as a child process, stdout and stderr both into `log`. Dropping it
/// kills the child, so a failing test leaves no server behind.
struct Server {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Server {
    fn start(dir: &std::path::Path, stripe_base: &str) -> Self {
        let port = free_port();
        let log = dir.join("payretry.log");
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_payretry"));
        command.arg("serve");
        // Nothing from the developer's environment may change what is tested.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if name.starts_with("PAYRETRY_") || name.starts_with("STRIPE_") || name == "RUST_LOG" {
                command.env_remove(name);
            }
        }
        let child = command
            .env("PAYRETRY_LOG_FORMAT", "json")
            .env("RUST_LOG", "debug")
            .env("PAYRETRY_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "PAYRETRY_DATABASE_URL",
                format!("sqlite://{}", dir.join("payretry.db").display()),
            )
            .env("PAYRETRY_RETRY_DELAYS", "1s")
            .env("PAYRETRY_PROVIDER", "stripe")
            .env("PAYRETRY_PUBLIC_URL", format!("http://127.0.0.1:{port}"))
            .env("STRIPE_API_BASE", stripe_base)
            .env("STRIPE_SECRET_KEY", TEST_SECRET_KEY)
            .env("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
            .env("PAYRETRY_JWT_SECRET", JWT_SECRET)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn payretry serve");
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_ready(&mut self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("payretry serve exited early ({status}):\n{}", self.output());
            }
            let ready = http
                .get(format!("{}/readyz", self.base))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK);
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "payretry serve never became ready:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then wait (10 s at most) for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill -TERM");
        assert!(sent.success(), "kill -TERM failed: {sent}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "payretry serve ignored SIGTERM:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn event_id() -> String {
    format!("evt_logs_{:032x}", rand::random::<u128>())
}

/// Signs `event` with `secret` and posts it to `/webhooks/stripe`.
async fn post_event(
    http: &reqwest::Client,
    base: &str,
    event: &Value,
    secret: &str,
) -> reqwest::Response {
    let body = serde_json::to_vec(event).unwrap();
    let signature =
        payretry::provider::signature::sign(&body, secret, chrono::Utc::now().timestamp());
    http.post(format!("{base}/webhooks/stripe"))
        .header("Stripe-Signature", signature)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .expect("webhook")
}

async fn status(http: &reqwest::Client, base: &str, token: &str, id: &str) -> Value {
    let response = http
        .get(format!("{base}/payments/checkout/{id}/status"))
        .bearer_auth(token)
        .send()
        .await
        .expect("status");
    assert_eq!(response.status(), StatusCode::OK, "status of {id}");
    response.json().await.unwrap()
}

/// Every log record, with the line it came from; panics on a line that is not JSON.
fn parse_lines(output: &str) -> Vec<Value> {
    output
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"))
        })
        .collect()
}

/// The innermost span named `name` that the record was logged in.
fn span<'a>(record: &'a Value, name: &str) -> Option<&'a Value> {
    record["spans"]
        .as_array()?
        .iter()
        .rev()
        .find(|s| s["name"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_request_and_job_context_and_never_a_secret() {
    let stripe = FakeStripe::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut server = Server::start(dir.path(), stripe.base_url());
    server.wait_ready(&http).await;
    let base = server.base.clone();

    let keys = JwtKeys::new(&Secret::new(JWT_SECRET));
    let buyer = keys.issue("buyer-logs", Role::Buyer, 600);
    let admin = keys.issue("admin-logs", Role::Admin, 600);

    // Create, with a caller-chosen request id that must be echoed and logged.
    let created = http
        .post(format!("{base}/payments/checkout"))
        .bearer_auth(&buyer)
        .header("x-request-id", REQUEST_ID)
        .json(&json!({"amount": 2500, "currency": "usd", "description": "Order 123"}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(
        created
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some(REQUEST_ID),
        "the caller's x-request-id is echoed"
    );
    let created: Value = created.json().await.unwrap();
    let id = session_id(&created);
    let first_checkout = created["providerSessionId"]
        .as_str()
        .expect("providerSessionId")
        .to_owned();

    // Without a caller's id, one is generated and still echoed.
    let generated = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("healthz");
    let generated_id = generated
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("a generated x-request-id")
        .to_owned();
    assert!(!generated_id.is_empty());

    // Declined (signed webhook), then the buyer's retry.
    let declined = json!({
        "id": event_id(), "object": "event", "type": "payment_intent.payment_failed",
        "data": {"object": {"id": "pi_logs", "object": "payment_intent",
            "metadata": {"payment_session_id": id, "retry_attempt": "0"},
            "last_payment_error": {"code": "card_declined", "decline_code": "insufficient_funds"}}}
    });
    let response = post_event(&http, &base, &declined, WEBHOOK_SECRET).await;
    assert_eq!(response.status(), StatusCode::OK, "decline webhook");
    assert_eq!(status(&http, &base, &buyer, &id).await["status"], "failed");

    let retry = http
        .post(format!("{base}/payments/retry/{id}"))
        .bearer_auth(&buyer)
        .header("Idempotency-Key", "logs-retry-1")
        .send()
        .await
        .expect("retry");
    assert_eq!(retry.status(), StatusCode::ACCEPTED);

    // The worker creates a new checkout at the fake Stripe.
    let deadline = Instant::now() + Duration::from_secs(20);
    let open = loop {
        let s = status(&http, &base, &admin, &id).await;
        if s["status"] == "open" && s["retryAttempts"] == 1 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the retry checkout never appeared; last {s}; log:\n{}",
            server.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let retry_checkout = open["providerSessionId"]
        .as_str()
        .expect("providerSessionId")
        .to_owned();
    assert_ne!(retry_checkout, first_checkout);

    // Paid (signed webhook).
    stripe.mark_paid(&retry_checkout);
    let paid = json!({
        "id": event_id(), "object": "event", "type": "checkout.session.completed",
        "data": {"object": {"id": retry_checkout, "object": "checkout.session",
            "status": "complete", "payment_status": "paid", "client_reference_id": id,
            "metadata": {"payment_session_id": id, "retry_attempt": "1"}}}
    });
    let response = post_event(&http, &base, &paid, WEBHOOK_SECRET).await;
    assert_eq!(response.status(), StatusCode::OK, "paid webhook");
    assert_eq!(
        status(&http, &base, &buyer, &id).await["status"],
        "succeeded"
    );

    // A forged token, and a webhook signed with the wrong secret.
    let refused = http
        .get(format!("{base}/payments/checkout/{id}/status"))
        .bearer_auth(BAD_TOKEN)
        .send()
        .await
        .expect("bad token");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let forged = post_event(
        &http,
        &base,
        &paid,
        "whsec_not_the_configured_secret_at_all",
    )
    .await;
    assert_eq!(forged.status(), StatusCode::BAD_REQUEST);

    let exit = server.terminate();
    let output = server.output();
    assert!(exit.success(), "exit after SIGTERM was {exit}:\n{output}");
    assert!(stripe.violations().is_empty(), "{:?}", stripe.violations());

    // 1. Every non-empty line is one JSON record.
    let records = parse_lines(&output);
    assert!(!records.is_empty(), "no output at all");

    // 2. Request lines: method, route, request_id from the span; status and latency_ms
    //    from the event.
    let requests: Vec<&Value> = records
        .iter()
        .filter(|r| r["message"] == "request" && r["target"] == "payretry::http")
        .collect();
    assert!(!requests.is_empty(), "no request log lines:\n{output}");
    for record in &requests {
        let span = span(record, "request").unwrap_or_else(|| panic!("no request span: {record}"));
        assert!(span["method"].is_string(), "{record}");
        assert!(span["route"].is_string(), "{record}");
        assert!(span["request_id"].is_string(), "{record}");
        assert!(record["status"].is_u64(), "{record}");
        assert!(record["latency_ms"].is_number(), "{record}");
        assert_eq!(record["span"]["name"], "request", "{record}");
    }
    let logged = |method: &str, route: &str, status: u64| {
        requests.iter().any(|r| {
            let s = &r["span"];
            s["method"] == method && s["route"] == route && r["status"] == status
        })
    };
    assert!(logged("POST", "/payments/checkout", 201), "{output}");
    assert!(
        logged("POST", "/payments/retry/{session_id}", 202),
        "the retry is logged with its route template, not its path:\n{output}"
    );
    assert!(logged("POST", "/webhooks/stripe", 200), "{output}");
    assert!(logged("POST", "/webhooks/stripe", 400), "{output}");
    assert!(
        logged("GET", "/payments/checkout/{session_id}/status", 401),
        "{output}"
    );
    assert!(
        !requests
            .iter()
            .any(|r| r["span"]["route"].as_str().is_some_and(|v| v.contains(&id))),
        "routes are templates; the session id is not in them"
    );

    // 3. The caller's request id and the generated one both reach the logs.
    let with_id = |rid: &str| {
        requests
            .iter()
            .filter(|r| r["span"]["request_id"] == rid)
            .collect::<Vec<_>>()
    };
    let mine = with_id(REQUEST_ID);
    assert_eq!(mine.len(), 1, "{output}");
    assert_eq!(mine[0]["span"]["route"], "/payments/checkout");
    assert_eq!(mine[0]["status"], 201);
    assert_eq!(with_id(&generated_id).len(), 1, "{output}");

    // 4. Job lines carry the session id and attempt.
    let jobs: Vec<&Value> = records
        .iter()
        .filter(|r| span(r, "job").is_some_and(|s| s["session_id"] == id.as_str()))
        .collect();
    assert!(!jobs.is_empty(), "no job log lines for {id}:\n{output}");
    for record in &jobs {
        let span = span(record, "job").unwrap();
        assert_eq!(span["attempt"], "1", "{record}");
    }
    assert!(
        jobs.iter().any(|r| r["message"] == "retry job processed"
            && r["outcome"]
                .as_str()
                .is_some_and(|o| o.contains("CheckoutCreated"))),
        "{output}"
    );

    // 5. No secret, anywhere, at debug level.
    let secrets = [
        ("the buyer's JWT", buyer.as_str()),
        ("the admin's JWT", admin.as_str()),
        ("the refused token", BAD_TOKEN),
        ("the JWT signing key", JWT_SECRET),
        ("the webhook secret", WEBHOOK_SECRET),
        ("the Stripe secret key", TEST_SECRET_KEY),
    ];
    // A token appearing in no line also means its `Authorization: Bearer …` value does not.
    // Also look for the parts that would survive truncation or masking of a prefix: each
    // token's signature segment and the Stripe key without its `sk_test_` prefix.
    let signature = |token: &str| token.rsplit('.').next().unwrap_or_default().to_owned();
    let (buyer_sig, admin_sig) = (signature(&buyer), signature(&admin));
    let partial = [
        ("the buyer's JWT signature", buyer_sig.as_str()),
        ("the admin's JWT signature", admin_sig.as_str()),
        (
            "the Stripe secret key's body",
            TEST_SECRET_KEY.trim_start_matches("sk_test_"),
        ),
    ];
    let leaks: Vec<String> = secrets
        .iter()
        .chain(partial.iter())
        .filter_map(|(what, secret)| {
            output
                .lines()
                .find(|l| l.contains(secret))
                .map(|line| format!("{what} leaked in: {line}"))
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "secrets in the logs:\n{}",
        leaks.join("\n")
    );
}
