//! A typed async client for payretry's buyer and support routes (DESIGN.md §3).
//!
//! One method per route, each returning the contract's body or a [`ClientError`] whose
//! problem+json `code` the caller can branch on. The client makes exactly one HTTP request
//! per call: asking again (and with which idempotency key) is a decision for the caller,
//! see [`crate::schedule_payment_retry`].

use crate::api::{AuditLog, CreateCheckout, PaymentStatus, Problem, RetryScheduled};
use crate::error::ClientError;
use payretry_domain::{IdempotencyKey, PaymentSessionId};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{RequestBuilder, Url};
use serde::de::DeserializeOwned;
use std::time::Duration;

/// The header that makes a retry (or a checkout creation) safe to send twice.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// Why a [`Client`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error(
        "the base URL must be an absolute http or https URL, e.g. `https://pay.example.com`: {0}"
    )]
    BaseUrl(String),
    #[error("the bearer token must be non-empty visible ASCII (a JWT)")]
    Token,
    #[error("could not build the HTTP client: {0}")]
    Http(#[source] reqwest::Error),
}

/// The payretry HTTP API, authenticated as one principal.
#[derive(Debug, Clone)]
pub struct Client {
    /// Shared connection pool; cloning the client shares it.
    http: reqwest::Client,
    /// Where the API lives; may carry a path prefix (`https://host/api`).
    base_url: Url,
    /// `Bearer <JWT>`, prebuilt and marked sensitive so it never shows in `Debug` output.
    authorization: HeaderValue,
}

impl Client {
    /// Bounds a whole request, so a hung server cannot hang a buyer's page.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
    /// Bounds connecting, so an unreachable server fails fast and can be retried.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// A client for the API at `base_url`, sending `Authorization: Bearer <token>`.
    pub fn new(base_url: &str, token: &str) -> Result<Self, ClientBuildError> {
        let http = reqwest::Client::builder()
            .timeout(Self::DEFAULT_TIMEOUT)
            .connect_timeout(Self::DEFAULT_CONNECT_TIMEOUT)
            .build()
            .map_err(ClientBuildError::Http)?;
        Self::with_http_client(http, base_url, token)
    }

    /// Like [`Client::new`], on a caller-configured `reqwest::Client` (timeouts, proxy, TLS).
    pub fn with_http_client(
        http: reqwest::Client,
        base_url: &str,
        token: &str,
    ) -> Result<Self, ClientBuildError> {
        let base_url =
            Url::parse(base_url).map_err(|e| ClientBuildError::BaseUrl(e.to_string()))?;
        if !matches!(base_url.scheme(), "http" | "https") || base_url.cannot_be_a_base() {
            return Err(ClientBuildError::BaseUrl(format!(
                "`{base_url}` is not an http(s) base"
            )));
        }
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClientBuildError::Token);
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| ClientBuildError::Token)?;
        authorization.set_sensitive(true);
        Ok(Self {
            http,
            base_url,
            authorization,
        })
    }

    /// `POST /payments/checkout`: opens a payment session and its first checkout (201).
    /// The key is optional here; pass one to make a double-submitted form harmless.
    pub async fn create_checkout(
        &self,
        request: &CreateCheckout,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<PaymentStatus, ClientError> {
        let mut builder = self
            .http
            .post(self.url(&["payments", "checkout"]))
            .json(request);
        if let Some(key) = idempotency_key {
            builder = builder.header(IDEMPOTENCY_KEY_HEADER, key.as_str());
        }
        self.send(builder).await
    }

    /// `GET /payments/checkout/{sessionId}/status` (200).
    pub async fn status(
        &self,
        session_id: &PaymentSessionId,
    ) -> Result<PaymentStatus, ClientError> {
        let url = self.url(&["payments", "checkout", session_id.as_str(), "status"]);
        self.send(self.http.get(url)).await
    }

    /// `POST /payments/retry/{sessionId}` with the press's `Idempotency-Key` (202).
    /// Sending the same key again never spends a second attempt: the server replays its
    /// first answer.
    pub async fn retry(
        &self,
        session_id: &PaymentSessionId,
        idempotency_key: &IdempotencyKey,
    ) -> Result<RetryScheduled, ClientError> {
        let url = self.url(&["payments", "retry", session_id.as_str()]);
        let builder = self
            .http
            .post(url)
            .header(IDEMPOTENCY_KEY_HEADER, idempotency_key.as_str());
        self.send(builder).await
    }

    /// The whole audit log of a session (support and admin only), oldest first: every page
    /// of `GET /payments/checkout/{sessionId}/audit`, 100 entries at a time, followed to the
    /// end. The result's `next_cursor` is `None`.
    pub async fn audit(&self, session_id: &PaymentSessionId) -> Result<AuditLog, ClientError> {
        let mut log = self.audit_page(session_id, Some(100), None).await?;
        while let Some(cursor) = log.next_cursor.take() {
            let mut page = self
                .audit_page(session_id, Some(100), Some(&cursor))
                .await?;
            log.entries.append(&mut page.entries);
            log.next_cursor = page.next_cursor;
        }
        Ok(log)
    }

    /// One page of `GET /payments/checkout/{sessionId}/audit?limit=&cursor=` (support and
    /// admin only), oldest first. `limit` is 1 to 100 (the server's default is 50); `cursor`
    /// is the `next_cursor` of the previous page, absent for the first.
    pub async fn audit_page(
        &self,
        session_id: &PaymentSessionId,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<AuditLog, ClientError> {
        let mut url = self.url(&["payments", "checkout", session_id.as_str(), "audit"]);
        {
            let mut query = url.query_pairs_mut();
            if let Some(limit) = limit {
                query.append_pair("limit", &limit.to_string());
            }
            if let Some(cursor) = cursor {
                query.append_pair("cursor", cursor);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        self.send(self.http.get(url)).await
    }

    /// The base URL with `segments` appended, each percent-encoded as one path segment.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base_url.clone();
        url.path_segments_mut()
            .expect("checked in the constructor: the base URL can be a base")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// Sends with auth, then reads a 2xx body as `T` and anything else as a problem.
    async fn send<T: DeserializeOwned>(&self, builder: RequestBuilder) -> Result<T, ClientError> {
        let response = builder
            .header(AUTHORIZATION, self.authorization.clone())
            .send()
            .await?;
        let status = response.status().as_u16();
        let success = response.status().is_success();
        let body = response.bytes().await?;
        if success {
            return serde_json::from_slice(&body)
                .map_err(|source| ClientError::Decode { status, source });
        }
        match serde_json::from_slice::<Problem>(&body) {
            Ok(problem) => Err(ClientError::Api {
                // The status line is authoritative; the body's copy is informative.
                status,
                code: problem.code,
                detail: problem.detail,
            }),
            Err(source) => Err(ClientError::Decode { status, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_appended_to_the_base_including_a_prefix() {
        let id = PaymentSessionId::parse("ps_abc").unwrap();
        for (base, expected) in [
            (
                "http://127.0.0.1:8080",
                "http://127.0.0.1:8080/payments/retry/ps_abc",
            ),
            (
                "https://pay.example/api/",
                "https://pay.example/api/payments/retry/ps_abc",
            ),
            (
                "https://pay.example/api",
                "https://pay.example/api/payments/retry/ps_abc",
            ),
        ] {
            let client = Client::new(base, "t0k3n").unwrap();
            assert_eq!(
                client.url(&["payments", "retry", id.as_str()]).as_str(),
                expected
            );
        }
    }

    #[test]
    fn bad_bases_and_tokens_are_refused_up_front() {
        for base in ["", "pay.example", "mailto:a@b.c", "ftp://pay.example"] {
            assert!(
                matches!(Client::new(base, "t"), Err(ClientBuildError::BaseUrl(_))),
                "{base:?}"
            );
        }
        for token in ["", "two words", "line\nbreak"] {
            assert!(
                matches!(
                    Client::new("http://127.0.0.1", token),
                    Err(ClientBuildError::Token)
                ),
                "{token:?}"
            );
        }
    }

    #[test]
    fn the_token_never_appears_in_debug_output() {
        let client = Client::new("http://127.0.0.1", "secret.jwt.value").unwrap();
        assert!(!format!("{client:?}").contains("secret.jwt.value"));
    }
}
