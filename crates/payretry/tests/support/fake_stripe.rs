//! A real local HTTP server standing in for the Stripe API's Checkout Sessions, so tests
//! exercise payretry's HTTP client end to end and never call the live API.
//!
//! What it does like Stripe:
//! - `POST /v1/checkout/sessions` (form-encoded), `GET /v1/checkout/sessions/{id}`,
//!   `POST /v1/checkout/sessions/{id}/expire`, with Stripe's error envelope and a
//!   `Request-Id` header; an open checkout past its `expires_at` reads as expired.
//! - `POST /v1/refunds` (`payment_intent`, optional `reason`, `metadata[…]`): refunds the
//!   charge of a paid checkout's payment intent (given by [`FakeStripe::mark_paid`]) once; a
//!   second refund of the same charge under another key is a 400 `charge_already_refunded`,
//!   an unknown payment intent a 404. A refund answers `succeeded`, or what
//!   [`FakeStripe::answer_refunds_with`] says (`pending`, `requires_action`, `failed`); a
//!   pending one is settled by [`FakeStripe::settle_refund`], which delivers the signed
//!   `refund.updated` / `refund.failed` (or `charge.refund.updated`) event to the webhook
//!   given by [`FakeStripe::deliver_webhooks_to`].
//! - `Idempotency-Key`: the same key with the same parameters replays the first response
//!   (`Idempotent-Replayed: true`, no second checkout); the same key with other parameters is
//!   a 400 `idempotency_error`. Only successful creates and refunds are remembered, as at
//!   Stripe.
//!
//! What it checks beyond Stripe (payretry's contract, DESIGN.md §4): every create carries
//! exactly the agreed fields, well-formed, `expires_at` 30 min to 24 h ahead, and the
//! `payretry-{sessionId}-attempt-{N}` idempotency key; every refund carries a
//! `payretry-{sessionId}-refund-attempt-{N}` key and the metadata `payment_session_id` and
//! `duplicate_attempt` naming the same session and attempt; every request carries
//! `Authorization: Bearer sk_test_…` and `Stripe-Version`. A violation is answered with 400
//! (401 for the key, as Stripe does) and recorded in [`FakeStripe::violations`], which a test
//! asserts empty.
//!
//! Failures are injected with [`FakeStripe::fail_next`] (before the request is looked at, as
//! a load balancer or an overloaded API would answer) and, for creates, with
//! [`FakeStripe::next_creates`] (Stripe's own idempotency behaviour: a create that keeps
//! running after the client gave up, with a 409 `idempotency_key_in_use` for every request
//! with its key meanwhile; a 500 saved under the key and replayed with
//! `Idempotent-Replayed: true` and `Stripe-Should-Retry: false`). The hosted page `/pay/{id}`
//! is a stub. [`FakeStripe::event`] builds the events Stripe sends about a checkout
//! (`checkout.session.completed`, `…async_payment_succeeded`, `…async_payment_failed`),
//! from the checkout as the fake holds it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Display;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use payretry::provider::stripe::StripeConfig;
use payretry::secret::Secret;
use payretry_domain::PaymentSessionId;
use serde_json::{Value, json};

/// A key the fake accepts. Any `sk_test_…` key is accepted.
pub const TEST_SECRET_KEY: &str = "sk_test_payretryFake4eC39HqLyjWDarjtT1zdp7dc";

/// Stripe's bounds for `expires_at`, in seconds from now.
pub const MIN_EXPIRES_IN_SECS: i64 = 30 * 60;
pub const MAX_EXPIRES_IN_SECS: i64 = 24 * 60 * 60;

/// Exactly the create fields of DESIGN.md §4.
pub const CREATE_FIELDS: [&str; 13] = [
    "mode",
    "line_items[0][price_data][currency]",
    "line_items[0][price_data][unit_amount]",
    "line_items[0][price_data][product_data][name]",
    "line_items[0][quantity]",
    "success_url",
    "cancel_url",
    "client_reference_id",
    "metadata[payment_session_id]",
    "metadata[retry_attempt]",
    "payment_intent_data[metadata][payment_session_id]",
    "payment_intent_data[metadata][retry_attempt]",
    "expires_at",
];

/// How an injected failure answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// This status with a Stripe error body, before the request is looked at.
    Status(u16),
    /// The same, plus `Retry-After: {whole seconds}`.
    StatusWithRetryAfter(u16, Duration),
    /// Hold the request this long, then handle it normally if the client is still waiting.
    Hang(Duration),
    /// This status with `Stripe-Should-Retry: true|false`.
    StatusWithShouldRetry(u16, bool),
}

/// How the next creates behave at Stripe's idempotency layer (see [`FakeStripe::next_creates`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateMode {
    /// The create runs this long and completes whether or not the client still waits (as at
    /// Stripe: a timeout on the client's side does not stop the server). Meanwhile every
    /// request with the same key is answered 409 `idempotency_key_in_use`.
    InFlight(Duration),
    /// The create fails with a 500 that is saved under its key: every later request with the
    /// key and the same parameters gets the same 500 back, replayed.
    SavedServerError,
}

/// A checkout the fake created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeCheckout {
    /// `cs_test_…`
    pub id: String,
    /// `{base}/pay/{id}`
    pub url: String,
    pub payment_session_id: String,
    pub retry_attempt: u32,
    pub idempotency_key: String,
    /// The create request's form, decoded.
    pub form: BTreeMap<String, String>,
    /// Stripe's `status`: `open`, `complete`, `expired`.
    pub status: String,
    /// Stripe's `payment_status`: `unpaid`, `paid`, `no_payment_required`.
    pub payment_status: String,
    pub expires_at: i64,
    pub created: i64,
    /// `pi_test_…`, given when the checkout is marked paid or complete-unpaid.
    pub payment_intent: Option<String>,
    /// The payment intent's `status`: `processing` while a debit settles,
    /// `requires_payment_method` after it failed, `succeeded` once paid.
    pub payment_intent_status: Option<String>,
}

/// A refund the fake made (replays excluded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeRefund {
    /// `re_test_…`
    pub id: String,
    pub payment_intent: String,
    pub idempotency_key: String,
    /// Stripe's `reason`, if sent.
    pub reason: Option<String>,
    pub created: i64,
    /// Stripe's `status`: `succeeded`, `pending`, `requires_action`, `failed`, `canceled`.
    pub status: String,
    /// Stripe's `failure_reason`, once failed.
    pub failure_reason: Option<String>,
    /// The `metadata[…]` sent on create.
    pub metadata: BTreeMap<String, String>,
}

/// The parameters a refund request may carry (besides `metadata[…]`).
pub const REFUND_FIELDS: [&str; 2] = ["payment_intent", "reason"];

/// The metadata payretry puts on every refund.
pub const REFUND_METADATA: [&str; 2] = ["payment_session_id", "duplicate_attempt"];

/// One API request as it arrived (including replays and injected failures).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub stripe_version: Option<String>,
    pub idempotency_key: Option<String>,
    pub content_type: Option<String>,
    pub body: String,
}

/// A running fake. The server stops when this is dropped.
pub struct FakeStripe {
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeStripe {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Stripe server");
        let addr = listener.local_addr().expect("fake Stripe address");
        let shared = Arc::new(Shared {
            base_url: format!("http://{addr}"),
            ledger: Mutex::default(),
        });
        let app = Router::new()
            .route("/v1/checkout/sessions", post(create))
            .route("/v1/checkout/sessions/{id}", get(retrieve))
            .route("/v1/checkout/sessions/{id}/expire", post(expire))
            .route("/v1/refunds", post(refund))
            .route("/pay/{id}", get(pay_page))
            .fallback(unknown_route)
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("fake Stripe server failed");
        });
        Self { shared, server }
    }

    /// `http://127.0.0.1:{port}`, for `STRIPE_API_BASE`.
    pub fn base_url(&self) -> &str {
        &self.shared.base_url
    }

    /// A provider config for this fake with test-speed timings: 2 s per try, 3 tries,
    /// 10 ms initial backoff.
    pub fn provider_config(&self) -> StripeConfig {
        StripeConfig {
            api_base: self.base_url().to_owned(),
            secret_key: Secret::new(TEST_SECRET_KEY),
            request_timeout: Duration::from_secs(2),
            max_tries: 3,
            initial_backoff: Duration::from_millis(10),
        }
    }

    /// Every checkout created, oldest first, in its current state.
    pub fn checkouts(&self) -> Vec<FakeCheckout> {
        let mut ledger = self.shared.ledger();
        let now = now_unix();
        for checkout in &mut ledger.checkouts {
            expire_if_due(checkout, now);
        }
        ledger.checkouts.clone()
    }

    pub fn checkout(&self, id: &str) -> Option<FakeCheckout> {
        self.checkouts().into_iter().find(|c| c.id == id)
    }

    /// Distinct checkouts created for one attempt of one payment session (replays excluded).
    pub fn create_count(&self, session_id: impl Display, attempt: impl Display) -> usize {
        let (session_id, attempt) = (session_id.to_string(), attempt.to_string());
        self.shared
            .ledger()
            .checkouts
            .iter()
            .filter(|c| {
                c.payment_session_id == session_id && c.retry_attempt.to_string() == attempt
            })
            .count()
    }

    /// Raw `POST /v1/checkout/sessions` requests received: replays, refusals and injected
    /// failures included.
    pub fn create_requests(&self) -> usize {
        self.shared
            .ledger()
            .requests
            .iter()
            .filter(|r| r.method == "POST" && r.path == "/v1/checkout/sessions")
            .count()
    }

    /// Every API request received, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.ledger().requests.clone()
    }

    /// Checkouts closed through `POST …/expire`, in order.
    pub fn expired_ids(&self) -> Vec<String> {
        self.shared.ledger().expired_ids.clone()
    }

    /// Every refund made, oldest first (idempotent replays are not new refunds).
    pub fn refunds(&self) -> Vec<FakeRefund> {
        self.shared.ledger().refunds.clone()
    }

    /// Raw `POST /v1/refunds` requests received: replays, refusals and injected failures
    /// included.
    pub fn refund_requests(&self) -> usize {
        self.shared
            .ledger()
            .requests
            .iter()
            .filter(|r| r.method == "POST" && r.path == "/v1/refunds")
            .count()
    }

    /// Contract violations seen so far; a well-behaved client leaves this empty.
    pub fn violations(&self) -> Vec<String> {
        self.shared.ledger().violations.clone()
    }

    /// The buyer paid: the checkout reads `complete` / `paid`, with a payment intent that
    /// can be refunded. Returns the payment intent's id.
    pub fn mark_paid(&self, checkout_id: &str) -> String {
        self.set_state(checkout_id, "complete", "paid");
        self.set_intent(checkout_id, "succeeded")
    }

    /// The buyer completed an asynchronous payment that has not cleared: `complete` / `unpaid`,
    /// its payment intent `processing`. Returns the payment intent's id.
    pub fn mark_complete_unpaid(&self, checkout_id: &str) -> String {
        self.set_state(checkout_id, "complete", "unpaid");
        self.set_intent(checkout_id, "processing")
    }

    /// That payment failed to settle: the checkout stays `complete` / `unpaid` (as at Stripe),
    /// its payment intent back to `requires_payment_method`.
    pub fn mark_debit_failed(&self, checkout_id: &str) {
        self.set_intent(checkout_id, "requires_payment_method");
    }

    fn set_intent(&self, checkout_id: &str, status: &str) -> String {
        let mut ledger = self.shared.ledger();
        let checkout = ledger
            .checkouts
            .iter_mut()
            .find(|c| c.id == checkout_id)
            .unwrap_or_else(|| panic!("fake Stripe has no checkout {checkout_id}"));
        checkout.payment_intent_status = Some(status.to_owned());
        checkout
            .payment_intent
            .get_or_insert_with(|| format!("pi_test_{}", uuid::Uuid::new_v4().simple()))
            .clone()
    }

    /// The next `n` checkout creates that get past [`FakeStripe::fail_next`] behave as `mode`
    /// says (each new create with a key takes one; replays and 409s take none).
    pub fn next_creates(&self, n: usize, mode: CreateMode) {
        self.shared
            .ledger()
            .create_modes
            .extend(std::iter::repeat_n(mode, n));
    }

    /// The event Stripe sends about `checkout_id` (`checkout.session.completed`,
    /// `checkout.session.async_payment_succeeded`, …), with the checkout as it now stands
    /// as its object. Mark it paid or complete-unpaid first.
    pub fn event(&self, kind: &str, checkout_id: &str) -> Value {
        let checkout = self
            .checkout(checkout_id)
            .unwrap_or_else(|| panic!("fake Stripe has no checkout {checkout_id}"));
        json!({
            "id": format!("evt_test_{}", uuid::Uuid::new_v4().simple()),
            "object": "event",
            "api_version": payretry::provider::stripe::STRIPE_VERSION,
            "created": now_unix(),
            "livemode": false,
            "type": kind,
            "data": {"object": checkout_json(&checkout)},
        })
    }

    /// Requests the fake answered 409 because another with the same key was running.
    pub fn conflicts(&self) -> usize {
        self.shared.ledger().conflicts
    }

    /// The next `n` API requests (create, retrieve, expire or refund) fail as `mode` says.
    /// Calls queue up: `fail_next(1, a); fail_next(1, b)` fails the next request with `a`, then
    /// one with `b`.
    pub fn fail_next(&self, n: usize, mode: FailureMode) {
        self.shared
            .ledger()
            .failures
            .extend(std::iter::repeat_n(mode, n));
    }

    fn set_state(&self, checkout_id: &str, status: &str, payment_status: &str) {
        let mut ledger = self.shared.ledger();
        let checkout = ledger
            .checkouts
            .iter_mut()
            .find(|c| c.id == checkout_id)
            .unwrap_or_else(|| panic!("fake Stripe has no checkout {checkout_id}"));
        checkout.status = status.to_owned();
        checkout.payment_status = payment_status.to_owned();
    }
}

struct Shared {
    base_url: String,
    ledger: Mutex<Ledger>,
}

impl Shared {
    /// Never held across an `.await`; a panicking test cannot wedge the server.
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What every API request goes through first: recorded, then any injected failure, then
    /// the `Authorization` and `Stripe-Version` checks. `Some` is the answer to send instead.
    async fn admit(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Option<Response> {
        let injected = {
            let mut ledger = self.ledger();
            ledger.requests.push(RecordedRequest {
                method: method.to_string(),
                path: uri.path().to_owned(),
                authorization: header_text(headers, header::AUTHORIZATION.as_str()),
                stripe_version: header_text(headers, "stripe-version"),
                idempotency_key: header_text(headers, "idempotency-key"),
                content_type: header_text(headers, header::CONTENT_TYPE.as_str()),
                body: String::from_utf8_lossy(body).into_owned(),
            });
            ledger.failures.pop_front()
        };
        match injected {
            Some(FailureMode::Status(status)) => return Some(injected_failure(status, None)),
            Some(FailureMode::StatusWithRetryAfter(status, after)) => {
                return Some(injected_failure(status, Some(after)));
            }
            Some(FailureMode::StatusWithShouldRetry(status, retry)) => {
                let mut response = injected_failure(status, None);
                response.headers_mut().insert(
                    "Stripe-Should-Retry",
                    HeaderValue::from_static(if retry { "true" } else { "false" }),
                );
                return Some(response);
            }
            Some(FailureMode::Hang(duration)) => tokio::time::sleep(duration).await,
            None => {}
        }

        let authorization = header_text(headers, header::AUTHORIZATION.as_str());
        let key = authorization
            .as_deref()
            .and_then(|v| v.strip_prefix("Bearer "));
        let key_ok = key
            .and_then(|k| k.strip_prefix("sk_test_"))
            .is_some_and(|rest| {
                !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            });
        if !key_ok {
            self.violation(format!(
                "{method} {}: Authorization is not `Bearer sk_test_…`",
                uri.path()
            ));
            // Unlike Stripe, the key is echoed unmasked, so tests prove the client scrubs it.
            return Some(stripe_error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("api_key_invalid"),
                &format!("Invalid API Key provided: {}", key.unwrap_or("(none)")),
            ));
        }

        let version = header_text(headers, "stripe-version");
        if !version.as_deref().is_some_and(is_stripe_version) {
            self.violation(format!(
                "{method} {}: Stripe-Version is missing or not YYYY-MM-DD: {version:?}",
                uri.path()
            ));
            return Some(stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                "Invalid Stripe API version",
            ));
        }
        None
    }

    fn violation(&self, text: String) {
        self.ledger().violations.push(text);
    }

    /// A create at Stripe's idempotency layer; `fail` makes it a 500 saved under its key.
    fn create(&self, headers: &HeaderMap, body: &Bytes, fail: bool) -> Response {
        let mut problems = Vec::new();
        let content_type = header_text(headers, header::CONTENT_TYPE.as_str()).unwrap_or_default();
        if !content_type.starts_with("application/x-www-form-urlencoded") {
            problems.push(format!("Content-Type is {content_type:?}, not a form"));
        }
        let mut form = BTreeMap::new();
        for (name, value) in form_urlencoded::parse(body) {
            if form.insert(name.to_string(), value.to_string()).is_some() {
                problems.push(format!("parameter {name} sent twice"));
            }
        }
        let key = header_text(headers, "idempotency-key");

        let mut ledger = self.ledger();
        if let Some(key) = &key
            && let Some(saved) = ledger.saved_failures.get(key)
        {
            if saved.params == form {
                let replay = saved.body.clone();
                drop(ledger);
                return saved_server_error(replay, true);
            }
            ledger.violations.push(format!(
                "create: Idempotency-Key {key} reused with different parameters"
            ));
            drop(ledger);
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "idempotency_error",
                None,
                "Keys for idempotent requests can only be used with the same parameters they \
                 were first used with.",
            );
        }
        if let Some(key) = &key
            && let Some(stored) = ledger.idempotency.get(key)
        {
            if stored.params == form {
                let replay = stored.body.clone();
                drop(ledger);
                let mut response = stripe_json(StatusCode::OK, replay);
                response
                    .headers_mut()
                    .insert("Idempotent-Replayed", HeaderValue::from_static("true"));
                return response;
            }
            ledger.violations.push(format!(
                "create: Idempotency-Key {key} reused with different parameters"
            ));
            drop(ledger);
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "idempotency_error",
                None,
                &format!(
                    "Keys for idempotent requests can only be used with the same parameters \
                     they were first used with. Try using a key other than '{key}' if you \
                     meant to execute a different request."
                ),
            );
        }

        let now = now_unix();
        problems.extend(validate_create(&form, key.as_deref(), now));
        if !problems.is_empty() {
            ledger
                .violations
                .extend(problems.iter().map(|p| format!("create: {p}")));
            drop(ledger);
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("parameter_invalid"),
                &problems.join("; "),
            );
        }

        if fail {
            let body = json!({"error": {"type": "api_error", "code": null,
                "message": "An unknown error occurred (saved under this Idempotency-Key)"}});
            if let Some(key) = key {
                ledger.saved_failures.insert(
                    key,
                    Stored {
                        params: form,
                        body: body.clone(),
                    },
                );
            }
            drop(ledger);
            return saved_server_error(body, false);
        }

        let id = format!("cs_test_{}", uuid::Uuid::new_v4().simple());
        let checkout = FakeCheckout {
            url: format!("{}/pay/{id}", self.base_url),
            id,
            payment_session_id: form["client_reference_id"].clone(),
            retry_attempt: form["metadata[retry_attempt]"].parse().unwrap_or_default(),
            idempotency_key: key.clone().unwrap_or_default(),
            status: "open".to_owned(),
            payment_status: "unpaid".to_owned(),
            expires_at: form["expires_at"].parse().unwrap_or_default(),
            created: now,
            form: form.clone(),
            payment_intent: None,
            payment_intent_status: None,
        };
        let body = checkout_json(&checkout);
        if let Some(key) = key {
            ledger.idempotency.insert(
                key,
                Stored {
                    params: form,
                    body: body.clone(),
                },
            );
        }
        ledger.checkouts.push(checkout);
        drop(ledger);
        stripe_json(StatusCode::OK, body)
    }
}

#[derive(Default)]
struct Ledger {
    checkouts: Vec<FakeCheckout>,
    refunds: Vec<FakeRefund>,
    /// Idempotency-Key → the parameters and response of the first successful create.
    idempotency: HashMap<String, Stored>,
    requests: Vec<RecordedRequest>,
    violations: Vec<String>,
    failures: VecDeque<FailureMode>,
    create_modes: VecDeque<CreateMode>,
    /// Idempotency-Key → a create's 500, saved and replayed as Stripe does.
    saved_failures: HashMap<String, Stored>,
    /// Idempotency keys whose create is still running.
    in_flight: std::collections::HashSet<String>,
    conflicts: usize,
    expired_ids: Vec<String>,
    refund_desk: RefundDesk,
}

struct Stored {
    params: BTreeMap<String, String>,
    body: Value,
}

async fn create(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refusal) = shared.admit(&method, &uri, &headers, &body).await {
        return refusal;
    }
    let key = header_text(&headers, "idempotency-key");
    let mode = {
        let mut ledger = shared.ledger();
        if let Some(key) = &key
            && ledger.in_flight.contains(key)
        {
            ledger.conflicts += 1;
            drop(ledger);
            return stripe_error(
                StatusCode::CONFLICT,
                "invalid_request_error",
                Some("idempotency_key_in_use"),
                "There is currently another in-progress request using this Idempotency-Key. \
                 Please try again later.",
            );
        }
        let fresh = key.as_ref().is_none_or(|k| {
            !ledger.idempotency.contains_key(k) && !ledger.saved_failures.contains_key(k)
        });
        if fresh {
            ledger.create_modes.pop_front()
        } else {
            None
        }
    };
    match mode {
        Some(CreateMode::InFlight(duration)) => {
            if let Some(key) = &key {
                shared.ledger().in_flight.insert(key.clone());
            }
            // Runs to the end even if the client hangs up and this handler is dropped.
            let running = tokio::spawn(async move {
                tokio::time::sleep(duration).await;
                let response = shared.create(&headers, &body, false);
                if let Some(key) = &key {
                    shared.ledger().in_flight.remove(key);
                }
                response
            });
            running.await.expect("the in-flight create")
        }
        Some(CreateMode::SavedServerError) => shared.create(&headers, &body, true),
        None => shared.create(&headers, &body, false),
    }
}

async fn retrieve(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refusal) = shared.admit(&method, &uri, &headers, &body).await {
        return refusal;
    }
    // `expand[]=payment_intent` (or `expand[0]=…`) turns the id into the object.
    let expand = form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .any(|(name, value)| name.starts_with("expand[") && value == "payment_intent");
    let mut ledger = shared.ledger();
    let now = now_unix();
    match ledger.checkouts.iter_mut().find(|c| c.id == id) {
        Some(checkout) => {
            expire_if_due(checkout, now);
            let mut body = checkout_json(checkout);
            if expand && let Some(intent) = &checkout.payment_intent {
                body["payment_intent"] = json!({"id": intent, "object": "payment_intent",
                    "status": checkout.payment_intent_status});
            }
            stripe_json(StatusCode::OK, body)
        }
        None => no_such_checkout(&id),
    }
}

async fn expire(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refusal) = shared.admit(&method, &uri, &headers, &body).await {
        return refusal;
    }
    let mut ledger = shared.ledger();
    let now = now_unix();
    let Some(checkout) = ledger.checkouts.iter_mut().find(|c| c.id == id) else {
        return no_such_checkout(&id);
    };
    expire_if_due(checkout, now);
    if checkout.status != "open" {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            &format!(
                "Only Checkout Sessions with a status in [\"open\"] can be expired. This \
                 Checkout Session has a status of \"{}\".",
                checkout.status
            ),
        );
    }
    checkout.status = "expired".to_owned();
    let body = checkout_json(checkout);
    ledger.expired_ids.push(id);
    stripe_json(StatusCode::OK, body)
}

async fn refund(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refusal) = shared.admit(&method, &uri, &headers, &body).await {
        return refusal;
    }
    let mut gate = shared.ledger().refund_desk.gate.subscribe();
    let _ = gate.wait_for(|held| !held).await;
    shared.refund(&headers, &body)
}

impl Shared {
    fn refund(&self, headers: &HeaderMap, body: &Bytes) -> Response {
        let mut problems = Vec::new();
        let content_type = header_text(headers, header::CONTENT_TYPE.as_str()).unwrap_or_default();
        if !content_type.starts_with("application/x-www-form-urlencoded") {
            problems.push(format!("Content-Type is {content_type:?}, not a form"));
        }
        let mut form = BTreeMap::new();
        for (name, value) in form_urlencoded::parse(body) {
            if form.insert(name.to_string(), value.to_string()).is_some() {
                problems.push(format!("parameter {name} sent twice"));
            }
        }
        let key = header_text(headers, "idempotency-key");

        let mut ledger = self.ledger();
        if let Some(key) = &key
            && let Some(stored) = ledger.idempotency.get(key)
        {
            if stored.params == form {
                let replay = stored.body.clone();
                drop(ledger);
                let mut response = stripe_json(StatusCode::OK, replay);
                response
                    .headers_mut()
                    .insert("Idempotent-Replayed", HeaderValue::from_static("true"));
                return response;
            }
            ledger.violations.push(format!(
                "refund: Idempotency-Key {key} reused with different parameters"
            ));
            drop(ledger);
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "idempotency_error",
                None,
                &format!(
                    "Keys for idempotent requests can only be used with the same parameters \
                     they were first used with. Try using a key other than '{key}'."
                ),
            );
        }

        problems.extend(validate_refund(&form, key.as_deref()));
        if !problems.is_empty() {
            ledger
                .violations
                .extend(problems.iter().map(|p| format!("refund: {p}")));
            drop(ledger);
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("parameter_invalid"),
                &problems.join("; "),
            );
        }

        let payment_intent = form["payment_intent"].clone();
        let paid = ledger.checkouts.iter().any(|c| {
            c.payment_intent.as_deref() == Some(payment_intent.as_str())
                && c.payment_status == "paid"
        });
        if !paid {
            ledger
                .violations
                .push(format!("refund: no paid charge for {payment_intent}"));
            drop(ledger);
            return stripe_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("resource_missing"),
                &format!("No such payment_intent: '{payment_intent}'"),
            );
        }
        if ledger.refunds.iter().any(|r| {
            r.payment_intent == payment_intent
                && !["failed", "canceled"].contains(&r.status.as_str())
        }) {
            drop(ledger);
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("charge_already_refunded"),
                &format!("Charge for {payment_intent} has already been refunded."),
            );
        }

        let (status, failure_reason) = ledger.refund_desk.answer.status();
        let refund = FakeRefund {
            id: format!("re_test_{}", uuid::Uuid::new_v4().simple()),
            payment_intent,
            idempotency_key: key.clone().unwrap_or_default(),
            reason: form.get("reason").cloned(),
            created: now_unix(),
            status: status.to_owned(),
            failure_reason: failure_reason.map(str::to_owned),
            metadata: refund_metadata(&form),
        };
        let body = refund_json(&refund);
        if let Some(key) = key {
            ledger.idempotency.insert(
                key,
                Stored {
                    params: form,
                    body: body.clone(),
                },
            );
        }
        ledger.refunds.push(refund);
        drop(ledger);
        stripe_json(StatusCode::OK, body)
    }
}

/// Every problem with a refund request's form and idempotency key.
fn validate_refund(form: &BTreeMap<String, String>, key: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    match form.get("payment_intent") {
        None => problems.push("missing parameter payment_intent".to_owned()),
        Some(pi) if !pi.starts_with("pi_") => {
            problems.push(format!("payment_intent {pi:?} is not a pi_… id"));
        }
        Some(_) => {}
    }
    for field in form.keys() {
        if !REFUND_FIELDS.contains(&field.as_str()) && metadata_key(field).is_none() {
            problems.push(format!("unexpected parameter {field}"));
        }
    }
    problems.extend(validate_refund_metadata(form, key));
    if let Some(reason) = form.get("reason")
        && !["duplicate", "fraudulent", "requested_by_customer"].contains(&reason.as_str())
    {
        problems.push(format!("reason {reason:?} is not one of Stripe's"));
    }
    let well_formed = key
        .and_then(|k| k.strip_prefix("payretry-"))
        .and_then(|rest| rest.split_once("-refund-attempt-"))
        .is_some_and(|(session, attempt)| {
            PaymentSessionId::parse(session).is_ok() && canonical_integer(attempt).is_some()
        });
    if !well_formed {
        problems.push(format!(
            "Idempotency-Key is {key:?}, expected payretry-{{sessionId}}-refund-attempt-{{N}}"
        ));
    }
    problems
}

// --- Refund settlement: pending refunds, their outcome, and the signed refund events. ---

/// How the fake answers a new refund.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RefundAnswer {
    /// `succeeded` (Stripe's usual answer for a card).
    #[default]
    Succeeded,
    /// `pending`: settled later by [`FakeStripe::settle_refund`].
    Pending,
    /// `requires_action`: settled later too.
    RequiresAction,
    /// `failed` at once, with this `failure_reason`.
    Failed(String),
}

impl RefundAnswer {
    fn status(&self) -> (&'static str, Option<&str>) {
        match self {
            Self::Succeeded => ("succeeded", None),
            Self::Pending => ("pending", None),
            Self::RequiresAction => ("requires_action", None),
            Self::Failed(reason) => ("failed", Some(reason)),
        }
    }
}

/// How a pending refund ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundOutcome {
    Succeeded,
    /// `failed` with this `failure_reason` (e.g. `expired_or_canceled_card`).
    Failed(String),
    /// `canceled` (a `requires_action` refund that timed out).
    Canceled,
}

/// Which event type reports a settled refund. Stripe sends `refund.updated` /
/// `refund.failed` for every refund from API version `2024-10-28`; before that (payretry pins
/// `2024-06-20`) a refund of a charge is reported as `charge.refund.updated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundEventStyle {
    /// `refund.updated`, or `refund.failed` for a failure.
    Refund,
    /// `charge.refund.updated` for every change.
    ChargeRefund,
}

/// The refund side of the ledger.
struct RefundDesk {
    answer: RefundAnswer,
    /// `true` while refund requests are held (they wait, already recorded, until released).
    gate: tokio::sync::watch::Sender<bool>,
    /// Where refund events go, and the secret they are signed with.
    webhook: Option<(String, String)>,
}

impl Default for RefundDesk {
    fn default() -> Self {
        Self {
            answer: RefundAnswer::default(),
            gate: tokio::sync::watch::Sender::new(false),
            webhook: None,
        }
    }
}

impl FakeStripe {
    /// How new refunds are answered from now on.
    pub fn answer_refunds_with(&self, answer: RefundAnswer) {
        self.shared.ledger().refund_desk.answer = answer;
    }

    /// Holds refund requests (recorded, not answered) until [`FakeStripe::release_refunds`]:
    /// a slow refund endpoint. Keep the hold shorter than the client's timeout.
    pub fn hold_refunds(&self) {
        self.shared.ledger().refund_desk.gate.send_replace(true);
    }

    pub fn release_refunds(&self) {
        self.shared.ledger().refund_desk.gate.send_replace(false);
    }

    /// Refund events go to `url` (payretry's `/webhooks/stripe`), signed with `secret` as
    /// Stripe signs them.
    pub fn deliver_webhooks_to(&self, url: &str, secret: &str) {
        self.shared.ledger().refund_desk.webhook = Some((url.to_owned(), secret.to_owned()));
    }

    /// Settles refund `id` and delivers its event ([`RefundEventStyle::Refund`]); returns the
    /// webhook's HTTP status.
    pub async fn settle_refund(&self, id: &str, outcome: RefundOutcome) -> u16 {
        self.settle_refund_as(id, outcome, RefundEventStyle::Refund)
            .await
    }

    /// [`FakeStripe::settle_refund`] with the event type of `style`.
    pub async fn settle_refund_as(
        &self,
        id: &str,
        outcome: RefundOutcome,
        style: RefundEventStyle,
    ) -> u16 {
        let (refund, (url, secret)) = {
            let mut ledger = self.shared.ledger();
            let webhook = ledger
                .refund_desk
                .webhook
                .clone()
                .expect("deliver_webhooks_to first");
            let refund = ledger
                .refunds
                .iter_mut()
                .find(|r| r.id == id)
                .unwrap_or_else(|| panic!("fake Stripe has no refund {id}"));
            assert!(
                ["pending", "requires_action"].contains(&refund.status.as_str()),
                "refund {id} is {}, not pending",
                refund.status
            );
            let (status, reason) = match &outcome {
                RefundOutcome::Succeeded => ("succeeded", None),
                RefundOutcome::Failed(reason) => ("failed", Some(reason.clone())),
                RefundOutcome::Canceled => ("canceled", None),
            };
            refund.status = status.to_owned();
            refund.failure_reason = reason;
            (refund.clone(), webhook)
        };
        let kind = match (style, &outcome) {
            (RefundEventStyle::ChargeRefund, _) => "charge.refund.updated",
            (RefundEventStyle::Refund, RefundOutcome::Failed(_)) => "refund.failed",
            (RefundEventStyle::Refund, _) => "refund.updated",
        };
        let event = refund_event(kind, &refund);
        self.deliver(&url, &secret, &event).await
    }

    /// Posts `event` to `url` signed with `secret` (the `Stripe-Signature` payretry checks).
    pub async fn deliver(&self, url: &str, secret: &str, event: &Value) -> u16 {
        let body = serde_json::to_vec(event).expect("event JSON");
        let signature =
            payretry::webhook::signature::sign(&body, secret, chrono::Utc::now().timestamp());
        reqwest::Client::new()
            .post(url)
            .header("Stripe-Signature", signature)
            .header("Content-Type", "application/json; charset=utf-8")
            .body(body)
            .send()
            .await
            .expect("deliver the refund event")
            .status()
            .as_u16()
    }
}

/// A Stripe event about `refund`, as the pinned API version shapes it.
pub fn refund_event(kind: &str, refund: &FakeRefund) -> Value {
    json!({
        "id": format!("evt_test_{}", uuid::Uuid::new_v4().simple()),
        "object": "event",
        "api_version": payretry::provider::stripe::STRIPE_VERSION,
        "created": now_unix(),
        "livemode": false,
        "type": kind,
        "data": {"object": refund_json(refund)},
    })
}

/// A Refund object.
fn refund_json(refund: &FakeRefund) -> Value {
    json!({
        "id": refund.id,
        "object": "refund",
        "amount": null,
        "currency": "usd",
        "payment_intent": refund.payment_intent,
        "reason": refund.reason,
        "status": refund.status,
        "failure_reason": refund.failure_reason,
        "metadata": refund.metadata,
        "created": refund.created,
    })
}

/// `metadata[key]` → `key`.
fn metadata_key(field: &str) -> Option<&str> {
    field.strip_prefix("metadata[")?.strip_suffix(']')
}

fn refund_metadata(form: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    form.iter()
        .filter_map(|(field, value)| metadata_key(field).map(|k| (k.to_owned(), value.clone())))
        .collect()
}

/// Stripe's metadata rules (up to 50 keys, names up to 40 characters without square
/// brackets, values up to 500 characters), and payretry's: exactly `payment_session_id` and
/// `duplicate_attempt`, naming the session and attempt of the idempotency key.
fn validate_refund_metadata(form: &BTreeMap<String, String>, key: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    let metadata = refund_metadata(form);
    if metadata.len() > 50 {
        problems.push("more than 50 metadata keys".to_owned());
    }
    for (name, value) in &metadata {
        if name.is_empty() || name.chars().count() > 40 || name.contains(['[', ']']) {
            problems.push(format!("metadata key {name:?} is not a valid key"));
        }
        if value.chars().count() > 500 {
            problems.push(format!("metadata[{name}] is longer than 500 characters"));
        }
        if !REFUND_METADATA.contains(&name.as_str()) {
            problems.push(format!("unexpected metadata[{name}]"));
        }
    }
    let keyed = key
        .and_then(|k| k.strip_prefix("payretry-"))
        .and_then(|rest| rest.split_once("-refund-attempt-"));
    match (
        metadata.get("payment_session_id"),
        metadata.get("duplicate_attempt"),
    ) {
        (Some(session), Some(attempt)) => {
            if canonical_integer(attempt).is_none_or(|n| n < 0) {
                problems.push(format!(
                    "metadata[duplicate_attempt] {attempt:?} is not a whole number"
                ));
            }
            if let Some((key_session, key_attempt)) = keyed
                && (key_session != session || key_attempt != attempt)
            {
                problems.push(format!(
                    "metadata names {session} attempt {attempt}, the Idempotency-Key another"
                ));
            }
        }
        _ => problems
            .push("missing metadata[payment_session_id] or metadata[duplicate_attempt]".to_owned()),
    }
    problems
}

async fn pay_page(Path(id): Path<String>) -> Html<String> {
    Html(format!(
        "<!doctype html><title>Fake Stripe checkout</title><p>Checkout {id}</p>"
    ))
}

async fn unknown_route(State(shared): State<Arc<Shared>>, method: Method, uri: Uri) -> Response {
    shared.violation(format!("unexpected request {method} {}", uri.path()));
    stripe_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("resource_missing"),
        &format!("Unrecognized request URL ({method}: {}).", uri.path()),
    )
}

/// Every problem with a create request's form and idempotency key.
fn validate_create(form: &BTreeMap<String, String>, key: Option<&str>, now: i64) -> Vec<String> {
    let mut problems = Vec::new();
    for field in CREATE_FIELDS {
        if !form.contains_key(field) {
            problems.push(format!("missing parameter {field}"));
        }
    }
    for field in form.keys() {
        if !CREATE_FIELDS.contains(&field.as_str()) {
            problems.push(format!("unexpected parameter {field}"));
        }
    }
    let field = |name: &str| form.get(name).map(String::as_str);
    let mut expect = |ok: bool, problem: &str| {
        if !ok {
            problems.push(problem.to_owned());
        }
    };

    expect(
        field("mode").is_none_or(|v| v == "payment"),
        "mode must be `payment`",
    );
    expect(
        field("line_items[0][price_data][currency]")
            .is_none_or(|v| v.len() == 3 && v.bytes().all(|b| b.is_ascii_lowercase())),
        "currency must be three lowercase letters",
    );
    expect(
        field("line_items[0][price_data][unit_amount]")
            .is_none_or(|v| canonical_integer(v).is_some_and(|n| (1..=99_999_999).contains(&n))),
        "unit_amount must be an integer from 1 to 99999999",
    );
    expect(
        field("line_items[0][price_data][product_data][name]").is_none_or(|v| !v.trim().is_empty()),
        "product_data[name] must not be empty",
    );
    expect(
        field("line_items[0][quantity]").is_none_or(|v| v == "1"),
        "quantity must be 1",
    );
    for name in ["success_url", "cancel_url"] {
        expect(
            field(name).is_none_or(|v| {
                reqwest::Url::parse(v).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
            }),
            &format!("{name} must be an absolute http(s) URL"),
        );
    }

    let session = field("client_reference_id");
    expect(
        session.is_none_or(|v| PaymentSessionId::parse(v).is_ok()),
        "client_reference_id must be a payment session id (ps_…)",
    );
    for name in [
        "metadata[payment_session_id]",
        "payment_intent_data[metadata][payment_session_id]",
    ] {
        expect(
            field(name).is_none_or(|v| Some(v) == session),
            &format!("{name} must equal client_reference_id"),
        );
    }
    let attempt = field("metadata[retry_attempt]");
    expect(
        attempt.is_none_or(|v| {
            canonical_integer(v).is_some_and(|n| (0..=i64::from(u32::MAX)).contains(&n))
        }),
        "metadata[retry_attempt] must be a whole number",
    );
    expect(
        field("payment_intent_data[metadata][retry_attempt]").is_none_or(|v| Some(v) == attempt),
        "payment_intent_data[metadata][retry_attempt] must equal metadata[retry_attempt]",
    );
    expect(
        field("expires_at").is_none_or(|v| {
            canonical_integer(v).is_some_and(|t| {
                (now + MIN_EXPIRES_IN_SECS..=now + MAX_EXPIRES_IN_SECS).contains(&t)
            })
        }),
        "expires_at must be unix seconds 30 minutes to 24 hours ahead",
    );

    match (key, session, attempt) {
        (None, _, _) => problems.push("Idempotency-Key header missing".to_owned()),
        (Some(key), Some(session), Some(attempt)) => {
            let expected = format!("payretry-{session}-attempt-{attempt}");
            if key != expected {
                problems.push(format!("Idempotency-Key is {key:?}, expected {expected:?}"));
            }
        }
        _ => {}
    }
    problems
}

/// A decimal integer written the one way (`"7"`, not `"07"`, `"+7"` or `"7.0"`).
fn canonical_integer(text: &str) -> Option<i64> {
    let n = text.parse::<i64>().ok()?;
    (n.to_string() == text).then_some(n)
}

/// `2024-06-20`, optionally with a release name (`2024-09-30.acacia`).
fn is_stripe_version(value: &str) -> bool {
    let date = value.split_once('.').map_or(value, |(date, _)| date);
    let bytes = date.as_bytes();
    bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        })
}

fn expire_if_due(checkout: &mut FakeCheckout, now: i64) {
    if checkout.status == "open" && now >= checkout.expires_at {
        checkout.status = "expired".to_owned();
    }
}

fn checkout_json(checkout: &FakeCheckout) -> Value {
    let form = &checkout.form;
    let amount = form
        .get("line_items[0][price_data][unit_amount]")
        .and_then(|v| v.parse::<i64>().ok());
    json!({
        "id": checkout.id,
        "object": "checkout.session",
        "url": checkout.url,
        "mode": "payment",
        "status": checkout.status,
        "payment_status": checkout.payment_status,
        "expires_at": checkout.expires_at,
        "created": checkout.created,
        "livemode": false,
        "client_reference_id": checkout.payment_session_id,
        "currency": form.get("line_items[0][price_data][currency]"),
        "amount_total": amount,
        "metadata": {
            "payment_session_id": checkout.payment_session_id,
            "retry_attempt": checkout.retry_attempt.to_string(),
        },
        "success_url": form.get("success_url"),
        "cancel_url": form.get("cancel_url"),
        "payment_intent": checkout.payment_intent,
    })
}

fn injected_failure(status: u16, retry_after: Option<Duration>) -> Response {
    let status = StatusCode::from_u16(status).expect("a valid HTTP status to inject");
    let (kind, code) = match status.as_u16() {
        429 => ("rate_limit_error", Some("rate_limit")),
        500.. => ("api_error", None),
        _ => ("invalid_request_error", None),
    };
    let mut response = stripe_error(
        status,
        kind,
        code,
        &format!("Injected failure (HTTP {})", status.as_u16()),
    );
    if let Some(after) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(after.as_secs()));
    }
    response
}

/// A 500 Stripe saved under the request's key: marked not worth retrying, and as a replay
/// when it is one.
fn saved_server_error(body: Value, replayed: bool) -> Response {
    let mut response = stripe_json(StatusCode::INTERNAL_SERVER_ERROR, body);
    let headers = response.headers_mut();
    headers.insert("Stripe-Should-Retry", HeaderValue::from_static("false"));
    if replayed {
        headers.insert("Idempotent-Replayed", HeaderValue::from_static("true"));
    }
    response
}

fn no_such_checkout(id: &str) -> Response {
    stripe_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("resource_missing"),
        &format!("No such checkout.session: '{id}'"),
    )
}

fn stripe_error(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    stripe_json(
        status,
        json!({"error": {"type": kind, "code": code, "message": message}}),
    )
}

fn stripe_json(status: StatusCode, body: Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    let request_id = format!("req_{}", &uuid::Uuid::new_v4().simple().to_string()[..14]);
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("Request-Id", value);
    }
    response
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}
