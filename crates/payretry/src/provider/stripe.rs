//! Stripe Checkout Sessions through Stripe's REST API: a small hand-written reqwest client
//! (DEPENDENCIES.md explains why not `async-stripe`).
//!
//! Rules held here:
//! - Every create carries `Idempotency-Key: payretry-{sessionId}-attempt-{N}`, and every retry
//!   of that request reuses it, so neither a redelivered queue message nor a retried timeout
//!   can create a second checkout for one attempt. Refunds of a duplicate payment carry
//!   `payretry-{sessionId}-refund-attempt-{N}` for the same reason: one refund per charge.
//! - A refund counts as done only when Stripe says `succeeded`; `pending` and
//!   `requires_action` are taken but unsettled (the outcome arrives as a refund event).
//! - Transient failures (timeouts, connection errors, 409, 429, 5xx, and anything Stripe marks
//!   `Stripe-Should-Retry: true`) are retried up to `max_tries` with exponential backoff and
//!   jitter, honouring `Retry-After` up to [`MAX_RETRY_WAIT`]. Other 4xx, anything marked
//!   `Stripe-Should-Retry: false`, and a 5xx Stripe replays under the idempotency key
//!   (`Idempotent-Replayed: true`) are permanent at once: trying again cannot change them.
//!   See [`classify`].
//! - Every try waits for a slot of the provider budget ([`ProviderBudget`], DESIGN.md §4). A
//!   429 for the rate limit (not an object's `lock_timeout`) tells the budget, which slows
//!   down and pauses for the `Retry-After`; such a try is not counted against `max_tries`
//!   (it did nothing), and only after [`MAX_RATE_LIMITED`] of them does the call give up as
//!   [`ProviderError::RateLimited`], which no caller counts as a failure of its job.
//! - Stripe's vocabulary (`status`, `payment_status`) is mapped into [`CheckoutState`] here
//!   and goes no further.
//! - The secret key travels only in the `Authorization` header. No error, log line or `Debug`
//!   output contains it.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use payretry_domain::{Backoff, Jitter, ProviderSessionId};
use rand::Rng;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Client, Method, StatusCode, Url};
use serde::Deserialize;

use super::budget::{LocalBudget, ProviderBudget};
use super::{
    CheckoutRequest, CheckoutState, PaymentProvider, ProviderCheckout, ProviderError, Refund,
    RefundRequest, RefundState,
};
use crate::secret::Secret;
use std::sync::Arc;

/// The Stripe API version payretry is written against. Pinned on every request so a change of
/// the account's default version cannot change the shapes parsed here. Events follow the
/// webhook endpoint's version instead, so the endpoint is created with this `api_version`
/// (README, "Using Stripe"; `tests/integration/stripe_limits.rs` keeps the docs naming this value).
pub const STRIPE_VERSION: &str = "2024-06-20";

/// The public Stripe API (`STRIPE_API_BASE` default).
pub const DEFAULT_API_BASE: &str = "https://api.stripe.com";

/// Longest single wait between two tries: caps both the exponential backoff and a
/// `Retry-After` header. Longer outages are the queue's business (the job is redelivered).
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);

/// How long one call keeps trying, by default, while Stripe answers 429 for its rate limit,
/// before it gives up as [`ProviderError::RateLimited`] (the job is then postponed,
/// uncounted). Well inside a queue job's lease.
pub const MAX_RATE_LIMITED: Duration = Duration::from_secs(20);

/// Stripe's default rate limits are 25 requests/s in test mode and 100 in live mode, per
/// account and shared with the merchant's own traffic: payretry takes at most 80 % of them
/// unless `PAYRETRY_PROVIDER_MAX_RPS` says otherwise.
pub const DEFAULT_TEST_MAX_RPS: u32 = 20;
pub const DEFAULT_LIVE_MAX_RPS: u32 = 80;

/// The default budget for `key`: a test-mode key (`sk_test_`, `rk_test_`) gets
/// [`DEFAULT_TEST_MAX_RPS`], any other [`DEFAULT_LIVE_MAX_RPS`].
pub fn default_max_rps(key: &Secret) -> u32 {
    let key = key.expose();
    if key.starts_with("sk_test_") || key.starts_with("rk_test_") {
        DEFAULT_TEST_MAX_RPS
    } else {
        DEFAULT_LIVE_MAX_RPS
    }
}

/// Longest error text kept from a Stripe response.
const MAX_MESSAGE_LEN: usize = 300;

/// How to reach Stripe and how hard to try.
#[derive(Debug, Clone)]
pub struct StripeConfig {
    /// `https://api.stripe.com`, or a local fake in tests. A path prefix is kept.
    pub api_base: String,
    /// `sk_live_…` / `sk_test_…` (a restricted `rk_…` key works too).
    pub secret_key: Secret,
    /// Per try, from connecting to the last byte of the response.
    pub request_timeout: Duration,
    /// Tries per operation, the first included (0 is treated as 1).
    pub max_tries: u32,
    /// Wait before the second try; doubled for each further one, plus jitter.
    pub initial_backoff: Duration,
    /// Calls per second this process may make ([`LocalBudget`]); a deployment of several
    /// processes shares one budget instead ([`StripeProvider::with_budget`]).
    pub max_rps: u32,
    /// How long one call keeps trying while Stripe's rate limit refuses it
    /// ([`MAX_RATE_LIMITED`] by default).
    pub rate_limited_patience: Duration,
}

impl StripeConfig {
    /// Defaults: 10 s per try, 3 tries, 250 ms initial backoff (worst case ≈ 31 s, well
    /// inside a queue job's lease).
    pub fn new(api_base: impl Into<String>, secret_key: Secret) -> Self {
        Self {
            api_base: api_base.into(),
            request_timeout: Duration::from_secs(10),
            max_tries: 3,
            initial_backoff: Duration::from_millis(250),
            max_rps: default_max_rps(&secret_key),
            rate_limited_patience: MAX_RATE_LIMITED,
            secret_key,
        }
    }
}

/// A [`StripeConfig`] that cannot work, found at start-up rather than at the first payment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StripeConfigError {
    #[error("STRIPE_API_BASE must be an absolute http(s) URL such as https://api.stripe.com")]
    ApiBase,
    #[error("STRIPE_SECRET_KEY must be a non-empty key of printable ASCII characters")]
    SecretKey,
    #[error("could not build the HTTP client for Stripe: {0}")]
    Client(String),
}

/// [`PaymentProvider`] backed by Stripe Checkout Sessions.
#[derive(Clone)]
pub struct StripeProvider {
    client: Client,
    /// `api_base` parsed once; endpoints are built by appending path segments.
    base: Url,
    /// `Bearer {secret}`, marked sensitive so reqwest and `http` never print it.
    authorization: HeaderValue,
    /// Kept only to scrub it out of any text that leaves this module.
    secret_key: Secret,
    max_tries: u32,
    initial_backoff: Duration,
    /// Paces every try (DESIGN.md §4).
    budget: Arc<dyn ProviderBudget>,
    rate_limited_patience: Duration,
}

impl fmt::Debug for StripeProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeProvider")
            .field("base", &self.base.as_str())
            .field("max_tries", &self.max_tries)
            .field("initial_backoff", &self.initial_backoff)
            .finish_non_exhaustive()
    }
}

impl StripeProvider {
    /// Checks the config and builds the HTTP client; sends nothing yet.
    pub fn new(config: StripeConfig) -> Result<Self, StripeConfigError> {
        let base = Url::parse(&config.api_base).map_err(|_| StripeConfigError::ApiBase)?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(StripeConfigError::ApiBase);
        }
        let key = config.secret_key.expose();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(StripeConfigError::SecretKey);
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| StripeConfigError::SecretKey)?;
        authorization.set_sensitive(true);
        let client = Client::builder()
            .timeout(config.request_timeout)
            .user_agent(concat!("payretry/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StripeConfigError::Client(e.to_string()))?;
        Ok(Self {
            client,
            base,
            authorization,
            secret_key: config.secret_key,
            max_tries: config.max_tries.max(1),
            initial_backoff: config.initial_backoff,
            budget: Arc::new(LocalBudget::new(f64::from(config.max_rps.max(1)))),
            rate_limited_patience: config.rate_limited_patience,
        })
    }

    /// The same provider, paced by `budget` (one shared by every process of a deployment)
    /// instead of its own.
    pub fn with_budget(mut self, budget: Arc<dyn ProviderBudget>) -> Self {
        self.budget = budget;
        self
    }

    /// `{base}/v1/checkout/sessions[/{id}[/{action}]]`.
    fn sessions_url(&self, rest: &[&str]) -> Result<Url, ProviderError> {
        if let Some(id) = rest.first() {
            // Stripe ids are `cs_` plus letters, digits and `_`; anything else is refused
            // before it can become a different path (`..`) or reach the network.
            let valid = !id.is_empty()
                && id.len() <= 255
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(ProviderError::Permanent(format!(
                    "{id:?} is not a Stripe checkout session id"
                )));
            }
        }
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| ProviderError::Permanent("Stripe API base cannot take a path".into()))?
            .pop_if_empty()
            .extend(["v1", "checkout", "sessions"])
            .extend(rest);
        Ok(url)
    }

    /// `{base}/v1/refunds`.
    fn refunds_url(&self) -> Result<Url, ProviderError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| ProviderError::Permanent("Stripe API base cannot take a path".into()))?
            .pop_if_empty()
            .extend(["v1", "refunds"]);
        Ok(url)
    }

    /// Sends one logical request, retrying transient failures under the same idempotency key.
    async fn call(&self, call: &Call<'_>) -> Result<Vec<u8>, CallError> {
        let mut tries = 1;
        let started = tokio::time::Instant::now();
        loop {
            self.budget.acquire().await;
            let (message, retry_after) = match self.try_once(call).await {
                Ok(body) => return Ok(body),
                Err(TryError::Refused { status, message }) => {
                    return Err(CallError::Refused { status, message });
                }
                Err(TryError::RateLimited {
                    message,
                    retry_after,
                }) => {
                    // Not a failed try: Stripe did nothing. The budget slows down and pauses.
                    self.budget.throttled(retry_after).await;
                    if started.elapsed() >= self.rate_limited_patience {
                        return Err(CallError::RateLimited(message));
                    }
                    tracing::warn!(
                        operation = call.operation,
                        rate = self.budget.current_rate(),
                        error = %message,
                        "Stripe's rate limit reached; slowing down"
                    );
                    continue;
                }
                Err(TryError::Transient {
                    message,
                    retry_after,
                }) => (message, retry_after),
            };
            if tries >= self.max_tries {
                return Err(CallError::Transient(format!(
                    "{message} (gave up after {tries} tries)"
                )));
            }
            let wait = retry_after.map_or_else(
                || backoff_delay(self.initial_backoff, tries, rand::rng().random::<f64>()),
                |asked| asked.min(MAX_RETRY_WAIT),
            );
            tracing::warn!(
                operation = call.operation,
                tries,
                wait_ms = wait.as_millis() as u64,
                error = %message,
                "Stripe request failed transiently; retrying"
            );
            tokio::time::sleep(wait).await;
            tries += 1;
        }
    }

    async fn try_once(&self, call: &Call<'_>) -> Result<Vec<u8>, TryError> {
        let mut request = self
            .client
            .request(call.method.clone(), call.url.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .header("Stripe-Version", STRIPE_VERSION);
        if let Some(key) = call.idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(form) = call.form {
            request = request.form(form);
        }

        let transient = |what: &str, error: reqwest::Error| TryError::Transient {
            message: self.redact(format!("{}: {what}: {}", call.operation, describe(&error))),
            retry_after: None,
        };
        let response = request
            .send()
            .await
            .map_err(|e| transient("no response", e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| transient("response body unreadable", e))?;
        if status.is_success() {
            return Ok(body.to_vec());
        }

        let message = self.redact(format!(
            "{}: {}",
            call.operation,
            error_summary(status, &headers, &body)
        ));
        match classify(status, &headers) {
            Answer::TryAgain if is_rate_limit(status, &body) => Err(TryError::RateLimited {
                message,
                retry_after: retry_after(&headers, Utc::now()),
            }),
            Answer::TryAgain => Err(TryError::Transient {
                message,
                retry_after: retry_after(&headers, Utc::now()),
            }),
            Answer::Final => Err(TryError::Refused { status, message }),
            Answer::ReplayedFailure => Err(TryError::Refused {
                status,
                message: format!(
                    "{message} [a failure Stripe saved under this Idempotency-Key and replays \
                     for 24 h: this request cannot succeed again under the key]"
                ),
            }),
        }
    }

    /// Belt and braces: no text leaves this module with the secret key in it, even if a proxy
    /// or a fake echoes the `Authorization` header back.
    fn redact(&self, text: String) -> String {
        let key = self.secret_key.expose();
        if key.is_empty() || !text.contains(key) {
            text
        } else {
            text.replace(key, "[redacted]")
        }
    }

    fn parse_session(&self, operation: &str, body: &[u8]) -> Result<SessionBody, ProviderError> {
        serde_json::from_slice(body).map_err(|e| {
            ProviderError::Permanent(
                self.redact(format!("{operation}: unexpected response from Stripe: {e}")),
            )
        })
    }
}

#[async_trait]
impl PaymentProvider for StripeProvider {
    async fn create_checkout(
        &self,
        request: &CheckoutRequest,
    ) -> Result<ProviderCheckout, ProviderError> {
        const OPERATION: &str = "create checkout session";
        let form = checkout_form(request);
        let key = request.idempotency_key();
        let call = Call {
            operation: OPERATION,
            method: Method::POST,
            url: self.sessions_url(&[])?,
            form: Some(&form),
            idempotency_key: Some(&key),
        };
        let body = self.call(&call).await?;
        let session = self.parse_session(OPERATION, &body)?;
        let url = session.url.ok_or_else(|| {
            ProviderError::Permanent(format!("{OPERATION}: Stripe returned no checkout url"))
        })?;
        let expires_at = session
            .expires_at
            .and_then(|secs| DateTime::<Utc>::from_timestamp(secs, 0))
            .ok_or_else(|| {
                ProviderError::Permanent(format!(
                    "{OPERATION}: Stripe returned no valid expires_at"
                ))
            })?;
        tracing::debug!(
            payment_session_id = %request.session_id,
            attempt = request.attempt.get(),
            checkout_id = %session.id,
            "Stripe checkout session created"
        );
        Ok(ProviderCheckout {
            id: ProviderSessionId::new(session.id),
            url,
            expires_at,
        })
    }

    async fn retrieve_checkout(
        &self,
        id: &ProviderSessionId,
    ) -> Result<CheckoutState, ProviderError> {
        const OPERATION: &str = "retrieve checkout session";
        let call = Call {
            operation: OPERATION,
            method: Method::GET,
            url: {
                let mut url = self.sessions_url(&[id.as_str()])?;
                url.query_pairs_mut()
                    .append_pair("expand[]", "payment_intent");
                url
            },
            form: None,
            idempotency_key: None,
        };
        let body = self.call(&call).await?;
        let session = self.parse_session(OPERATION, &body)?;
        let status = session.status.as_deref().unwrap_or("");
        let payment_status = session.payment_status.as_deref().unwrap_or("");
        let intent = session
            .payment_intent
            .as_ref()
            .and_then(|pi| pi.get("status"))
            .and_then(serde_json::Value::as_str);
        checkout_state(status, payment_status, intent).ok_or_else(|| {
            ProviderError::Permanent(format!(
                "{OPERATION}: unknown Stripe state status={status:?} payment_status={payment_status:?}"
            ))
        })
    }

    async fn expire_checkout(&self, id: &ProviderSessionId) -> Result<(), ProviderError> {
        let call = Call {
            operation: "expire checkout session",
            method: Method::POST,
            url: self.sessions_url(&[id.as_str(), "expire"])?,
            form: None,
            idempotency_key: None,
        };
        match self.call(&call).await {
            Ok(_) => Ok(()),
            // Stripe answers 400 when the session is no longer open. Its message is prose, so
            // ask for the state instead of parsing it: closed (expired or completed) is done.
            Err(CallError::Refused {
                status: StatusCode::BAD_REQUEST,
                message,
            }) => match self.retrieve_checkout(id).await? {
                CheckoutState::Open => Err(ProviderError::Permanent(message)),
                CheckoutState::Expired
                | CheckoutState::Paid
                | CheckoutState::Processing
                | CheckoutState::CompleteUnpaid => Ok(()),
            },
            Err(other) => Err(other.into()),
        }
    }

    async fn refund(&self, request: &RefundRequest) -> Result<Refund, ProviderError> {
        self.refund_payment(request).await
    }
}

impl StripeProvider {
    async fn refund_payment(&self, request: &RefundRequest) -> Result<Refund, ProviderError> {
        const OPERATION: &str = "refund payment";
        let payment_intent = request.payment_intent.as_str();
        let valid = payment_intent.starts_with("pi_")
            && payment_intent.len() <= 255
            && payment_intent
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(ProviderError::Permanent(format!(
                "{OPERATION}: {payment_intent:?} is not a Stripe payment intent id"
            )));
        }
        let form = refund_form(request);
        let key = request.idempotency_key();
        let call = Call {
            operation: OPERATION,
            method: Method::POST,
            url: self.refunds_url()?,
            form: Some(&form),
            idempotency_key: Some(&key),
        };
        let body = match self.call(&call).await {
            Ok(body) => body,
            // The charge is refunded already: an earlier try got through after its key
            // expired at Stripe (24 h). The money is back; that is the outcome wanted.
            Err(CallError::Refused {
                status: StatusCode::BAD_REQUEST,
                message,
            }) if message.contains("charge_already_refunded") => {
                return Ok(Refund {
                    id: None,
                    state: RefundState::Succeeded,
                });
            }
            Err(other) => return Err(other.into()),
        };
        let refund: RefundBody = serde_json::from_slice(&body).map_err(|e| {
            ProviderError::Permanent(
                self.redact(format!("{OPERATION}: unexpected response from Stripe: {e}")),
            )
        })?;
        Ok(Refund {
            state: refund_state(refund.status.as_deref(), refund.failure_reason),
            id: Some(refund.id),
        })
    }
}

/// A Refund's `status` as payretry sees it. Only `succeeded` is done; a status this API
/// version does not define is treated as unsettled (its outcome arrives as an event).
pub fn refund_state(status: Option<&str>, failure_reason: Option<String>) -> RefundState {
    match status {
        Some("succeeded") => RefundState::Succeeded,
        Some("failed" | "canceled") => RefundState::Failed {
            reason: failure_reason.or_else(|| status.map(str::to_owned)),
        },
        // `pending`, `requires_action`.
        _ => RefundState::Pending,
    }
}

/// One logical Stripe request, sent once per try.
struct Call<'a> {
    /// For messages and logs: "create checkout session".
    operation: &'static str,
    method: Method,
    url: Url,
    form: Option<&'a [(&'static str, String)]>,
    idempotency_key: Option<&'a str>,
}

/// What an error answer from Stripe means for trying the same request again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Try again under the same key: a 429, a 409 (another request with this key is still
    /// running; Stripe saves nothing for it), a 5xx Stripe did not save, or anything Stripe
    /// marks `Stripe-Should-Retry: true`.
    TryAgain,
    /// The request is refused as it stands: other 4xx, or `Stripe-Should-Retry: false`.
    Final,
    /// A 5xx that Stripe saved under the idempotency key and replays (`Idempotent-Replayed:
    /// true`): every further try with this key gets the same failure for 24 h.
    ReplayedFailure,
}

/// Classifies an error answer as Stripe documents it: `Stripe-Should-Retry` decides when
/// present; otherwise 409, 429 and 5xx may be retried, except a replayed 5xx, and every other
/// 4xx is final.
fn classify(status: StatusCode, headers: &HeaderMap) -> Answer {
    let flag = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase())
    };
    if status.is_server_error() && flag("Idempotent-Replayed").as_deref() == Some("true") {
        return Answer::ReplayedFailure;
    }
    match flag("Stripe-Should-Retry").as_deref() {
        Some("true") => Answer::TryAgain,
        Some("false") => Answer::Final,
        _ if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::CONFLICT =>
        {
            Answer::TryAgain
        }
        _ => Answer::Final,
    }
}

/// Whether an answer is Stripe's rate limiter refusing the request: a 429 other than a
/// `lock_timeout` (contention on one object, which a slower rate does not cure).
fn is_rate_limit(status: StatusCode, body: &[u8]) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        && serde_json::from_slice::<ErrorEnvelope>(body)
            .map_or(true, |e| e.error.code.as_deref() != Some("lock_timeout"))
}

/// The outcome of one try.
enum TryError {
    /// Refused by the provider's rate limiter: nothing was done.
    RateLimited {
        message: String,
        retry_after: Option<Duration>,
    },
    Transient {
        message: String,
        /// What the server asked for with `Retry-After`, uncapped.
        retry_after: Option<Duration>,
    },
    Refused {
        status: StatusCode,
        message: String,
    },
}

/// The outcome of a whole call; keeps the status so `expire` can tell a 400 apart.
enum CallError {
    RateLimited(String),
    Transient(String),
    Refused { status: StatusCode, message: String },
}

impl From<CallError> for ProviderError {
    fn from(error: CallError) -> Self {
        match error {
            CallError::RateLimited(message) => ProviderError::RateLimited(message),
            CallError::Transient(message) => ProviderError::Transient(message),
            CallError::Refused { message, .. } => ProviderError::Permanent(message),
        }
    }
}

/// The fields of a Checkout Session payretry reads.
#[derive(Debug, Deserialize)]
struct SessionBody {
    id: String,
    url: Option<String>,
    expires_at: Option<i64>,
    status: Option<String>,
    payment_status: Option<String>,
    /// An id, or the object when expanded (`retrieve` asks for it).
    payment_intent: Option<serde_json::Value>,
}

/// The fields of a Refund payretry reads.
#[derive(Debug, Deserialize)]
struct RefundBody {
    id: String,
    status: Option<String>,
    failure_reason: Option<String>,
}

/// Stripe's error envelope: `{"error": {"type", "code", "message", …}}`.
#[derive(Debug, Deserialize)]
struct ErrorEnvelope {
    error: StripeErrorBody,
}

#[derive(Debug, Deserialize)]
struct StripeErrorBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<String>,
    message: Option<String>,
}

/// Exactly the fields of DESIGN.md §4, in a stable order.
fn checkout_form(request: &CheckoutRequest) -> Vec<(&'static str, String)> {
    let session = request.session_id.to_string();
    let attempt = request.attempt.get().to_string();
    vec![
        ("mode", "payment".to_owned()),
        (
            "line_items[0][price_data][currency]",
            request.money.currency.as_str().to_owned(),
        ),
        (
            "line_items[0][price_data][unit_amount]",
            request.money.amount.minor_units().to_string(),
        ),
        (
            "line_items[0][price_data][product_data][name]",
            request.description.clone(),
        ),
        ("line_items[0][quantity]", "1".to_owned()),
        ("success_url", request.success_url.clone()),
        ("cancel_url", request.cancel_url.clone()),
        ("client_reference_id", session.clone()),
        ("metadata[payment_session_id]", session.clone()),
        ("metadata[retry_attempt]", attempt.clone()),
        ("payment_intent_data[metadata][payment_session_id]", session),
        ("payment_intent_data[metadata][retry_attempt]", attempt),
        ("expires_at", request.expires_at.timestamp().to_string()),
    ]
}

/// A full refund of the payment intent's charge, marked as a duplicate in Stripe's records,
/// with metadata naming the double payment, so a refund event finds it even before the
/// refund's id is recorded.
fn refund_form(request: &RefundRequest) -> Vec<(&'static str, String)> {
    vec![
        ("payment_intent", request.payment_intent.clone()),
        ("reason", "duplicate".to_owned()),
        (
            "metadata[payment_session_id]",
            request.session_id.to_string(),
        ),
        (
            "metadata[duplicate_attempt]",
            request.duplicate_attempt.get().to_string(),
        ),
    ]
}

/// Stripe's `status` × `payment_status` as payretry sees it; `None` for a state this API
/// version does not define. A completed, unpaid checkout looks the same while its debit
/// settles and after the debit failed; its payment intent's status (`intent`, from
/// `expand[]=payment_intent`) tells them apart, and without it the checkout counts as still
/// processing (money may move).
fn checkout_state(
    status: &str,
    payment_status: &str,
    intent: Option<&str>,
) -> Option<CheckoutState> {
    match (status, payment_status) {
        ("open", _) => Some(CheckoutState::Open),
        ("complete", "paid" | "no_payment_required") => Some(CheckoutState::Paid),
        ("complete", "unpaid") => Some(match intent {
            None | Some("processing") => CheckoutState::Processing,
            Some(_) => CheckoutState::CompleteUnpaid,
        }),
        ("expired", _) => Some(CheckoutState::Expired),
        _ => None,
    }
}

/// Wait after the `failed_tries`-th failure: `initial × 2^(failed_tries-1)` plus up to half of
/// that again as jitter (`jitter` in `0.0..1.0`), never above [`MAX_RETRY_WAIT`].
fn backoff_delay(initial: Duration, failed_tries: u32, jitter: f64) -> Duration {
    Backoff::doubling(initial, 31, MAX_RETRY_WAIT)
        .with_jitter(Jitter::AddUpTo { fraction: 0.5 })
        .jittered(failed_tries.saturating_sub(1), jitter)
}

/// `Retry-After` as delta-seconds or an HTTP date, uncapped; `None` if absent or unreadable.
fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// `HTTP 400 invalid_request_error/parameter_missing: Missing required param: … (request req_…)`.
fn error_summary(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> String {
    let mut summary = format!("HTTP {}", status.as_u16());
    match serde_json::from_slice::<ErrorEnvelope>(body) {
        Ok(ErrorEnvelope { error }) => {
            let kind = [error.kind, error.code]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("/");
            if !kind.is_empty() {
                summary.push(' ');
                summary.push_str(&kind);
            }
            if let Some(message) = error.message {
                summary.push_str(": ");
                summary.push_str(&message);
            }
        }
        Err(_) if !body.is_empty() => {
            summary.push_str(": ");
            summary.push_str(&String::from_utf8_lossy(body));
        }
        Err(_) => {}
    }
    let mut summary = truncate(summary, MAX_MESSAGE_LEN);
    if let Some(request_id) = headers.get("Request-Id").and_then(|v| v.to_str().ok()) {
        summary.push_str(&format!(
            " (request {})",
            truncate(request_id.to_owned(), 64)
        ));
    }
    summary
}

/// A reqwest error with its causes but without the URL (which carries ids, not secrets, but
/// is noise next to the operation name).
fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut text = kind.to_owned();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    truncate(text, MAX_MESSAGE_LEN)
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use payretry_domain::{Amount, AttemptNumber, Currency, Money, PaymentSessionId};
    use std::collections::BTreeMap;

    fn request(attempt: u32) -> CheckoutRequest {
        CheckoutRequest {
            session_id: PaymentSessionId::parse("ps_abc123").unwrap(),
            attempt: AttemptNumber::new(attempt),
            money: Money {
                amount: Amount::new(2500).unwrap(),
                currency: Currency::parse("usd").unwrap(),
            },
            description: "Order 123".to_owned(),
            success_url: "https://pay.example/pay/ps_abc123?result=success".to_owned(),
            cancel_url: "https://pay.example/pay/ps_abc123?result=cancel".to_owned(),
            expires_at: DateTime::from_timestamp(1_800_003_600, 0).unwrap(),
        }
    }

    fn provider(base: &str, key: &str) -> Result<StripeProvider, StripeConfigError> {
        StripeProvider::new(StripeConfig::new(base, Secret::new(key)))
    }

    #[test]
    fn form_has_exactly_the_contract_fields() {
        let form: BTreeMap<_, _> = checkout_form(&request(2)).into_iter().collect();
        let expected: BTreeMap<_, _> = [
            ("mode", "payment"),
            ("line_items[0][price_data][currency]", "usd"),
            ("line_items[0][price_data][unit_amount]", "2500"),
            ("line_items[0][price_data][product_data][name]", "Order 123"),
            ("line_items[0][quantity]", "1"),
            (
                "success_url",
                "https://pay.example/pay/ps_abc123?result=success",
            ),
            (
                "cancel_url",
                "https://pay.example/pay/ps_abc123?result=cancel",
            ),
            ("client_reference_id", "ps_abc123"),
            ("metadata[payment_session_id]", "ps_abc123"),
            ("metadata[retry_attempt]", "2"),
            (
                "payment_intent_data[metadata][payment_session_id]",
                "ps_abc123",
            ),
            ("payment_intent_data[metadata][retry_attempt]", "2"),
            ("expires_at", "1800003600"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .collect();
        assert_eq!(form, expected);
        assert_eq!(checkout_form(&request(0)).len(), 13, "no duplicate fields");
    }

    #[test]
    fn original_checkout_is_attempt_zero() {
        let form = checkout_form(&request(0));
        assert!(form.contains(&("metadata[retry_attempt]", "0".to_owned())));
        assert_eq!(request(0).idempotency_key(), "payretry-ps_abc123-attempt-0");
    }

    #[test]
    fn stripe_states_map_into_checkout_state() {
        use CheckoutState::*;
        for (status, payment_status, intent, expected) in [
            ("open", "unpaid", None, Some(Open)),
            ("complete", "paid", Some("succeeded"), Some(Paid)),
            ("complete", "no_payment_required", None, Some(Paid)),
            ("complete", "unpaid", Some("processing"), Some(Processing)),
            ("complete", "unpaid", None, Some(Processing)),
            (
                "complete",
                "unpaid",
                Some("requires_payment_method"),
                Some(CompleteUnpaid),
            ),
            ("expired", "unpaid", None, Some(Expired)),
            ("complete", "", None, None),
            ("requires_capture", "paid", None, None),
        ] {
            assert_eq!(
                checkout_state(status, payment_status, intent),
                expected,
                "{status}/{payment_status}"
            );
        }
    }

    #[test]
    fn backoff_doubles_with_bounded_jitter_and_a_ceiling() {
        let initial = Duration::from_millis(100);
        assert_eq!(backoff_delay(initial, 1, 0.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(initial, 2, 0.0), Duration::from_millis(200));
        assert_eq!(backoff_delay(initial, 3, 0.0), Duration::from_millis(400));
        assert_eq!(backoff_delay(initial, 3, 1.0), Duration::from_millis(600));
        assert_eq!(backoff_delay(initial, 3, 0.5), Duration::from_millis(500));
        assert_eq!(backoff_delay(initial, 40, 0.9), MAX_RETRY_WAIT);
        assert_eq!(backoff_delay(initial, u32::MAX, 1.0), MAX_RETRY_WAIT);
        assert_eq!(backoff_delay(initial, 0, f64::NAN), initial);
    }

    #[test]
    fn error_answers_are_classified_as_stripe_documents_them() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, HeaderValue::from_static(value));
            }
            map
        };
        let none = headers(&[]);
        let retry = headers(&[("Stripe-Should-Retry", "true")]);
        let stop = headers(&[("Stripe-Should-Retry", "false")]);
        let replayed = headers(&[("Idempotent-Replayed", "true")]);
        let replayed_stop = headers(&[
            ("Idempotent-Replayed", "true"),
            ("Stripe-Should-Retry", "false"),
        ]);
        for (status, headers, expected) in [
            (409, &none, Answer::TryAgain),
            (429, &none, Answer::TryAgain),
            (500, &none, Answer::TryAgain),
            (503, &none, Answer::TryAgain),
            (400, &none, Answer::Final),
            (402, &none, Answer::Final),
            (404, &none, Answer::Final),
            (400, &retry, Answer::TryAgain),
            (500, &stop, Answer::Final),
            (409, &stop, Answer::Final),
            (429, &stop, Answer::Final),
            (500, &replayed, Answer::ReplayedFailure),
            (500, &replayed_stop, Answer::ReplayedFailure),
            // A replayed 4xx is an ordinary refusal.
            (400, &replayed, Answer::Final),
        ] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(classify(status, headers), expected, "{status} {headers:?}");
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
            retry_after(&headers, now)
        };
        assert_eq!(with("3"), Some(Duration::from_secs(3)));
        assert_eq!(with(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            with(&(now + chrono::TimeDelta::seconds(7)).to_rfc2822()),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            with("Fri, 15 Jan 2027 08:01:00 GMT"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(with("Thu, 01 Jan 1970 00:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(with("soon"), None);
        assert_eq!(with("-5"), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn error_summary_keeps_stripes_codes_and_request_id() {
        let mut headers = HeaderMap::new();
        headers.insert("Request-Id", HeaderValue::from_static("req_123"));
        let body = br#"{"error":{"type":"invalid_request_error","code":"parameter_missing","message":"Missing required param: mode."}}"#;
        assert_eq!(
            error_summary(StatusCode::BAD_REQUEST, &headers, body),
            "HTTP 400 invalid_request_error/parameter_missing: Missing required param: mode. (request req_123)"
        );
        assert_eq!(
            error_summary(StatusCode::BAD_GATEWAY, &HeaderMap::new(), b"upstream"),
            "HTTP 502: upstream"
        );
        let long = "é".repeat(400);
        assert!(
            error_summary(StatusCode::BAD_GATEWAY, &HeaderMap::new(), long.as_bytes()).len()
                <= MAX_MESSAGE_LEN + '…'.len_utf8()
        );
    }

    #[test]
    fn config_is_checked_up_front() {
        assert!(provider(DEFAULT_API_BASE, "sk_test_123").is_ok());
        assert!(provider("http://127.0.0.1:12111/stripe/", "sk_test_123").is_ok());
        for base in ["", "api.stripe.com", "ftp://api.stripe.com", "mailto:x@y"] {
            assert_eq!(
                provider(base, "sk_test_123").unwrap_err(),
                StripeConfigError::ApiBase,
                "{base:?}"
            );
        }
        for key in ["", "sk_test 123", "sk_test_\n123", "sk_tést"] {
            assert_eq!(
                provider(DEFAULT_API_BASE, key).unwrap_err(),
                StripeConfigError::SecretKey,
                "{key:?}"
            );
        }
    }

    #[test]
    fn endpoints_keep_a_path_prefix_and_escape_ids() {
        let stripe = provider("http://127.0.0.1:1/prefix/", "sk_test_1").unwrap();
        assert_eq!(
            stripe.sessions_url(&[]).unwrap().as_str(),
            "http://127.0.0.1:1/prefix/v1/checkout/sessions"
        );
        assert_eq!(
            stripe
                .sessions_url(&["cs_test_a1", "expire"])
                .unwrap()
                .as_str(),
            "http://127.0.0.1:1/prefix/v1/checkout/sessions/cs_test_a1/expire"
        );
        for id in ["", "..", "cs_../x", "cs_1?expand=x", "cs 1"] {
            assert!(stripe.sessions_url(&[id]).is_err(), "{id:?}");
        }
    }

    #[test]
    fn secret_is_never_printed_or_echoed() {
        let stripe = provider(DEFAULT_API_BASE, "sk_test_hush").unwrap();
        assert!(!format!("{stripe:?}").contains("sk_test_hush"));
        assert_eq!(
            stripe.redact("Invalid API Key provided: sk_test_hush".to_owned()),
            "Invalid API Key provided: [redacted]"
        );
    }
}
