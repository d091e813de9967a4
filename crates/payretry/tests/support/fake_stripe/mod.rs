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
//! Realistic conditions: [`FakeStripe::set_latency`] delays every API answer (Stripe takes
//! 100–500 ms), and [`FakeStripe::set_rate_limit`] answers 429 `rate_limit` (Stripe sends no
//! `Retry-After`) to a request past N in the last second, as Stripe's per-account limiter
//! does (25/s in test mode, 100/s live, shared with the merchant's own traffic); what was
//! refused and when requests arrived are kept for the test ([`FakeStripe::rate_limited`],
//! [`FakeStripe::busiest`]).
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
//!
//! Its parts: this module holds the server, its shared ledger and the controls a test uses;
//! `checkouts` the Checkout Session routes and their checks; `refunds` the refund route,
//! pending refunds and refund events; `wire` Stripe's error envelope, injected failures and
//! the header and number formats.

mod checkouts;
mod refunds;
mod wire;

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

use checkouts::{checkout_json, create, expire, expire_if_due, pay_page, retrieve};
use refunds::{RefundDesk, refund};
use wire::*;

// Only the refund tests name these; the other test binaries link the module too.
#[allow(unused_imports)]
pub use refunds::{RefundAnswer, RefundEventStyle, RefundOutcome, refund_event};

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
    /// 10 ms initial backoff, and a budget no test reaches by accident.
    pub fn provider_config(&self) -> StripeConfig {
        StripeConfig {
            api_base: self.base_url().to_owned(),
            secret_key: Secret::new(TEST_SECRET_KEY),
            request_timeout: Duration::from_secs(2),
            max_tries: 3,
            initial_backoff: Duration::from_millis(10),
            // Unpaced: the tests of pacing set their own budget.
            max_rps: 10_000,
            rate_limited_patience: Duration::from_secs(2),
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

    /// Checkout `id` once its status is `status`, or as it stands after 15 s (the caller
    /// asserts): payretry closes superseded checkouts in the background.
    pub async fn wait_for_checkout(&self, id: &str, status: &str) -> FakeCheckout {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let checkout = self.checkout(id).expect("a checkout the fake created");
            if checkout.status == status || tokio::time::Instant::now() >= deadline {
                return checkout;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

    /// Every API answer comes this much later (after the request was recorded).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.ledger().latency = latency;
    }

    /// Answer 429 to any API request past `per_second` admitted in the last second.
    pub fn set_rate_limit(&self, per_second: usize) {
        self.shared.ledger().rate_limit = Some(per_second);
    }

    /// Requests refused with 429 by [`FakeStripe::set_rate_limit`].
    pub fn rate_limited(&self) -> usize {
        self.shared.ledger().rate_limited
    }

    /// The most API requests that arrived within any `window` (refused ones included).
    pub fn busiest(&self, window: Duration) -> usize {
        let ledger = self.shared.ledger();
        let arrivals = &ledger.arrivals;
        let mut busiest = 0;
        let mut start = 0;
        for end in 0..arrivals.len() {
            while arrivals[end].duration_since(arrivals[start]) >= window {
                start += 1;
            }
            busiest = busiest.max(end - start + 1);
        }
        busiest
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
        let (injected, latency, over_limit) = {
            let mut ledger = self.ledger();
            let now = std::time::Instant::now();
            ledger.arrivals.push(now);
            while ledger
                .admitted
                .front()
                .is_some_and(|at| now.duration_since(*at) >= Duration::from_secs(1))
            {
                ledger.admitted.pop_front();
            }
            let over_limit = ledger
                .rate_limit
                .is_some_and(|limit| ledger.admitted.len() >= limit);
            if over_limit {
                ledger.rate_limited += 1;
            } else {
                ledger.admitted.push_back(now);
            }
            ledger.requests.push(RecordedRequest {
                method: method.to_string(),
                path: uri.path().to_owned(),
                authorization: header_text(headers, header::AUTHORIZATION.as_str()),
                stripe_version: header_text(headers, "stripe-version"),
                idempotency_key: header_text(headers, "idempotency-key"),
                content_type: header_text(headers, header::CONTENT_TYPE.as_str()),
                body: String::from_utf8_lossy(body).into_owned(),
            });
            (ledger.failures.pop_front(), ledger.latency, over_limit)
        };
        tokio::time::sleep(latency).await;
        if over_limit {
            return Some(rate_limit_refusal());
        }
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
}

#[derive(Default)]
struct Ledger {
    /// When every API request arrived, in order.
    arrivals: Vec<std::time::Instant>,
    /// Admitted requests of the last second, for the rate limit.
    admitted: VecDeque<std::time::Instant>,
    rate_limit: Option<usize>,
    rate_limited: usize,
    latency: Duration,
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

impl Ledger {
    /// Stripe's idempotency layer for a request under `key`: the saved 500 or the stored
    /// success replayed when the parameters are the same, a 400 `idempotency_error` (and a
    /// violation) when they differ, `None` for a key not seen before.
    fn replay(
        &mut self,
        what: &str,
        key: &str,
        form: &BTreeMap<String, String>,
    ) -> Option<Response> {
        let (params, answer) = if let Some(saved) = self.saved_failures.get(key) {
            (&saved.params, saved_server_error(saved.body.clone(), true))
        } else if let Some(stored) = self.idempotency.get(key) {
            let mut response = stripe_json(StatusCode::OK, stored.body.clone());
            response
                .headers_mut()
                .insert("Idempotent-Replayed", HeaderValue::from_static("true"));
            (&stored.params, response)
        } else {
            return None;
        };
        if params == form {
            return Some(answer);
        }
        self.violations.push(format!(
            "{what}: Idempotency-Key {key} reused with different parameters"
        ));
        Some(stripe_error(
            StatusCode::BAD_REQUEST,
            "idempotency_error",
            None,
            &format!(
                "Keys for idempotent requests can only be used with the same parameters they \
                 were first used with. Try using a key other than '{key}' if you meant to \
                 execute a different request."
            ),
        ))
    }
}
