//! `TestApp`: the real payretry server on an ephemeral port, with its own temporary database
//! (SQLite or PostgreSQL), optionally backed by the fake Stripe API instead of the sandbox.

use super::fake_stripe::FakeStripe;
pub use super::services::Database;
use super::services::TempDatabase;
use payretry::app::{App, ServeRole, Tuning};
use payretry::config::Config;
use payretry::http::auth::JwtKeys;
use payretry::service::Payments;
use payretry::shutdown::{self, ShutdownTrigger};
use payretry_domain::Role;
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub const WEBHOOK_SECRET: &str = "whsec_test_payretry_integration";
pub const JWT_SECRET: &str = "test-jwt-secret-with-at-least-32-characters!";

/// How to start the app under test.
pub struct Options {
    /// Environment-style settings (DESIGN.md §7 names).
    pub vars: Vec<(&'static str, String)>,
    /// Run against the fake Stripe API instead of the sandbox.
    pub stripe: bool,
    pub role: ServeRole,
    pub sweep_interval: Duration,
    /// First redelivery delay after a failed job.
    pub backoff: Duration,
    /// Where state lives.
    pub database: Database,
    /// Which queue carries retry jobs.
    pub queue: Queue,
    /// The HTTP server's timeouts and connection cap.
    pub http: payretry::http::server::Limits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    Embedded,
    /// moto's SQS server, with queues unique to this app.
    Sqs,
}

impl Options {
    /// The default options on another database and queue.
    pub fn on(database: Database, queue: Queue) -> Self {
        Self {
            database,
            queue,
            ..Self::default()
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            vars: vec![("PAYRETRY_RETRY_DELAYS", "1s,1s,1s".to_owned())],
            stripe: false,
            role: ServeRole::All,
            sweep_interval: Duration::from_millis(200),
            backoff: Duration::from_millis(100),
            database: Database::Sqlite,
            queue: Queue::Embedded,
            http: payretry::http::server::Limits::default(),
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub jwt: Arc<JwtKeys>,
    pub payments: Arc<Payments>,
    pub stripe: Option<FakeStripe>,
    /// The app's database, dropped with the app.
    pub db: TempDatabase,
    trigger: Option<ShutdownTrigger>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> Self {
        let db = TempDatabase::create(options.database).await;
        let stripe = if options.stripe {
            Some(FakeStripe::start().await)
        } else {
            None
        };
        let mut vars: HashMap<&str, String> = HashMap::new();
        vars.insert("PAYRETRY_DATABASE_URL", db.url.clone());
        vars.insert("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned());
        vars.insert("PAYRETRY_JWT_SECRET", JWT_SECRET.to_owned());
        if let Some(fake) = &stripe {
            vars.insert("PAYRETRY_PROVIDER", "stripe".to_owned());
            vars.insert("STRIPE_API_BASE", fake.base_url().to_owned());
            vars.insert(
                "STRIPE_SECRET_KEY",
                super::fake_stripe::TEST_SECRET_KEY.to_owned(),
            );
        }
        if options.queue == Queue::Sqs {
            let endpoint = super::services::sqs_endpoint();
            let env = super::services::unique_env();
            let client = payretry::queue::sqs::client(Some(&endpoint)).await;
            payretry::queue::sqs::setup(&client, &env, 5)
                .await
                .expect("create the test queues");
            vars.insert("PAYRETRY_QUEUE", "sqs".to_owned());
            vars.insert("PAYRETRY_SQS_ENDPOINT", endpoint);
            vars.insert("PAYRETRY_ENV", env);
        }
        for (k, v) in options.vars {
            vars.insert(k, v);
        }
        let config = Config::from_lookup(|k| vars.get(k).cloned()).expect("test config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let mut tuning = Tuning::from_config(&config);
        tuning.sweep_interval = options.sweep_interval;
        tuning.worker.backoff = options.backoff;
        tuning.analytics_backoff = Duration::from_millis(50);
        tuning.stripe = stripe.as_ref().map(FakeStripe::provider_config);
        tuning.http = options.http;
        let app = App::build(&config, base.clone(), tuning)
            .await
            .expect("build app");
        let jwt = app.state.jwt.clone();
        let payments = app.state.payments.clone();
        let (trigger, shutdown) = shutdown::channel();
        let server = tokio::spawn(app.serve(listener, options.role, shutdown));
        Self {
            base,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            jwt,
            payments,
            stripe,
            db,
            trigger: Some(trigger),
            server: Some(server),
        }
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(&mut self) {
        if let Some(trigger) = self.trigger.take() {
            trigger.trigger();
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server result");
        }
    }

    pub fn token(&self, sub: &str, role: Role) -> String {
        self.jwt.issue(sub, role, 600)
    }

    pub fn buyer(&self) -> String {
        self.token("buyer-1", Role::Buyer)
    }

    pub fn admin(&self) -> String {
        self.token("admin-1", Role::Admin)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Response {
        let mut r = self.http.request(method, self.url(path));
        if let Some(token) = token {
            r = r.bearer_auth(token);
        }
        if let Some(key) = key {
            r = r.header("Idempotency-Key", key);
        }
        if let Some(body) = body {
            r = r.json(&body);
        }
        r.send().await.expect("request")
    }

    /// Creates a 25.00 USD session for `token`'s buyer; returns the status object.
    pub async fn create_checkout(&self, token: &str) -> Value {
        let body = json!({"amount": 2500, "currency": "usd", "description": "Order 123"});
        let response = self
            .request(
                Method::POST,
                "/payments/checkout",
                Some(token),
                None,
                Some(body),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }

    /// A new session of `token`'s buyer with its first checkout live.
    pub async fn open_session(&self, token: &str) -> Session {
        let created = self.create_checkout(token).await;
        Session {
            id: session_id(&created),
            checkout: text(&created, "providerSessionId"),
        }
    }

    /// A new session of `token`'s buyer whose first checkout (attempt 0) the provider
    /// declined for insufficient funds: a retry is possible.
    pub async fn declined_session(&self, token: &str) -> Session {
        let session = self.open_session(token).await;
        self.decline(&session.id, 0, "insufficient_funds").await;
        session
    }

    pub async fn status(&self, token: &str, id: &str) -> Value {
        let response = self
            .request(
                Method::GET,
                &format!("/payments/checkout/{id}/status"),
                Some(token),
                None,
                None,
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK, "status of {id}");
        response.json().await.unwrap()
    }

    pub async fn retry(&self, token: &str, id: &str, key: &str) -> Response {
        self.request(
            Method::POST,
            &format!("/payments/retry/{id}"),
            Some(token),
            Some(key),
            None,
        )
        .await
    }

    /// Signs and posts a provider event to `/webhooks/stripe`.
    pub async fn send_event(&self, event: &Value) -> Response {
        let body = serde_json::to_vec(event).unwrap();
        let signature = payretry::provider::signature::sign(
            &body,
            WEBHOOK_SECRET,
            chrono::Utc::now().timestamp(),
        );
        self.http
            .post(self.url("/webhooks/stripe"))
            .header("Stripe-Signature", signature)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .expect("webhook")
    }

    /// The provider reports a decline of `attempt`'s checkout.
    pub async fn decline(&self, id: &str, attempt: u32, reason: &str) {
        let response = self.send_event(&declined_event(id, attempt, reason)).await;
        assert_eq!(response.status(), StatusCode::OK);
    }

    /// The provider reports `attempt`'s checkout paid.
    pub async fn pay(&self, id: &str, attempt: u32, checkout: &str) {
        let response = self.send_event(&paid_event(id, attempt, checkout)).await;
        assert_eq!(response.status(), StatusCode::OK);
    }

    /// Polls the status until it is `wanted` (10 s at most).
    pub async fn wait_for_status(&self, id: &str, wanted: &str) -> Value {
        let token = self.admin();
        let mut last = Value::Null;
        for _ in 0..200 {
            last = self.status(&token, id).await;
            if last["status"] == wanted {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("session {id} never became {wanted}; last status {last}");
    }

    /// One admin list route's items (`field` of its body), as an admin reads them.
    pub async fn admin_list(&self, path: &str, field: &str) -> Vec<Value> {
        let response = self
            .request(Method::GET, path, Some(&self.admin()), None, None)
            .await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let body: Value = response.json().await.unwrap();
        body[field].as_array().expect(field).clone()
    }

    /// Polls `/admin/webhook-deliveries{query}` until its first delivery is `status` (20 s
    /// at most), and returns that delivery.
    pub async fn wait_until_delivery(&self, query: &str, status: &str) -> Value {
        let path = format!("/admin/webhook-deliveries{query}");
        let mut last = Vec::new();
        for _ in 0..400 {
            last = self.admin_list(&path, "deliveries").await;
            if let Some(first) = last.first()
                && first["status"] == status
            {
                return first.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no delivery of {path} became {status}; last {last:?}");
    }

    /// The session's audit entries, oldest first, as an admin reads them: every page,
    /// followed to the end.
    pub async fn audit_entries(&self, id: &str) -> Vec<Value> {
        let mut entries = Vec::new();
        let mut path = format!("/payments/checkout/{id}/audit?limit=100");
        loop {
            let response = self
                .request(Method::GET, &path, Some(&self.admin()), None, None)
                .await;
            assert_eq!(response.status(), StatusCode::OK);
            let body: Value = response.json().await.unwrap();
            entries.extend(body["entries"].as_array().unwrap().iter().cloned());
            match body["nextCursor"].as_str() {
                Some(cursor) => {
                    path = format!("/payments/checkout/{id}/audit?limit=100&cursor={cursor}");
                }
                None => return entries,
            }
        }
    }

    /// The audit log's actions, oldest first.
    pub async fn audit_actions(&self, id: &str) -> Vec<String> {
        self.audit_entries(id)
            .await
            .iter()
            .map(|e| e["action"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Polls [`TestApp::count`] until it reads `wanted` (for up to five seconds)
    /// and returns the last value read, for work that finishes just after the
    /// observable effect a test waited on.
    pub async fn settled_count(&self, sql: &'static str, wanted: i64) -> i64 {
        let mut value = self.count(sql).await;
        for _ in 0..100 {
            if value == wanted {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            value = self.count(sql).await;
        }
        value
    }

    /// Reads one number straight from the database (SQLite file or PostgreSQL).
    pub async fn count(&self, sql: &'static str) -> i64 {
        self.db.count(sql).await
    }
}

/// A payment session the tests made: its id and the id of its first checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    pub checkout: String,
}

/// A string field of a JSON object, or a panic naming the field and the object.
/// The audit entries with `action`.
pub fn with_action<'a>(entries: &'a [Value], action: &str) -> Vec<&'a Value> {
    entries.iter().filter(|e| e["action"] == action).collect()
}

pub fn text(value: &Value, field: &str) -> String {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {value}"))
        .to_owned()
}

/// The `sessionId` of a status object (a created checkout, a status read).
pub fn session_id(status: &Value) -> String {
    text(status, "sessionId")
}

fn unique_event_id() -> String {
    format!("evt_test_{:032x}", rand::random::<u128>())
}

pub fn paid_event(id: &str, attempt: u32, checkout: &str) -> Value {
    json!({
        "id": unique_event_id(), "object": "event", "type": "checkout.session.completed",
        "data": {"object": {"id": checkout, "object": "checkout.session", "status": "complete",
            "payment_status": "paid", "client_reference_id": id,
            "metadata": {"payment_session_id": id, "retry_attempt": attempt.to_string()}}}
    })
}

/// [`paid_event`] with the charge's `payment_intent`, as Stripe sends it: what a refund of
/// a duplicate payment needs.
pub fn paid_event_with_intent(
    id: &str,
    attempt: u32,
    checkout: &str,
    payment_intent: &str,
) -> Value {
    let mut event = paid_event(id, attempt, checkout);
    event["data"]["object"]["payment_intent"] = json!(payment_intent);
    event
}

pub fn declined_event(id: &str, attempt: u32, reason: &str) -> Value {
    json!({
        "id": unique_event_id(), "object": "event", "type": "payment_intent.payment_failed",
        "data": {"object": {"id": "pi_test", "object": "payment_intent",
            "metadata": {"payment_session_id": id, "retry_attempt": attempt.to_string()},
            "last_payment_error": {"code": "card_declined", "decline_code": reason}}}
    })
}

/// Asserts a problem+json answer with `status` and `code`.
pub async fn assert_problem(response: Response, status: u16, code: &str) -> Value {
    assert_eq!(
        response.status().as_u16(),
        status,
        "expected {status} {code}"
    );
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status);
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    body
}
