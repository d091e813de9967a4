//! The merchant webhook relay: takes due deliveries from the outbox under a lease, sends each
//! signed, and records the outcome.
//!
//! - Nothing lost: a delivery leaves `pending` only when the receiver answered 2xx
//!   (`delivered`) or its schedule ran out (`failed`, for an admin to redeliver). A process
//!   that dies mid-try leaves its lease to run out, and a relay (in any process) tries again.
//! - The same bytes each time: the body was fixed when the event was written, and the
//!   `webhook-id` is the event's; only `webhook-timestamp` and the signature are per try.
//! - Isolated: the relay is its own task with its own HTTP client and at most
//!   [`WebhookRelay::concurrency`] tries in flight; a receiver that hangs costs each try its
//!   timeout, never a request, a retry job or another outbox.
//! - Bounded: redirects are not followed, response bodies are not read, and the error kept
//!   is one line without the URL.

use super::MerchantWebhook;
use super::signature::signature_header;
use crate::shutdown::Shutdown;
use crate::storage::{DeliveryOutcome, LeasedDelivery, WebhookOutbox};
use crate::telemetry::metrics::{self, WebhookOutcome};
use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// Longest the relay sleeps when nothing wakes it (events written by other processes).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How long the relay waits after its database failed.
const STORAGE_BACKOFF: Duration = Duration::from_secs(1);

pub struct WebhookRelay {
    pub outbox: Arc<dyn WebhookOutbox>,
    pub endpoint: Arc<MerchantWebhook>,
    pub http: reqwest::Client,
    /// Most tries in flight at once.
    pub concurrency: usize,
}

impl WebhookRelay {
    /// The relay's HTTP client: no redirects, the configured timeout per try.
    pub fn client(endpoint: &MerchantWebhook) -> reqwest::Result<reqwest::Client> {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(endpoint.timeout)
            .user_agent(concat!("payretry-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
    }

    /// How long a try holds its delivery: past its timeout with room to record the outcome,
    /// so a live relay never loses the lease to another one mid-try.
    fn lease(&self) -> Duration {
        self.endpoint.timeout * 2 + Duration::from_secs(5)
    }

    pub async fn run(self, mut shutdown: Shutdown) {
        let mut inflight = JoinSet::new();
        let me = Arc::new(self);
        loop {
            let free = me.concurrency.saturating_sub(inflight.len());
            let mut wait = IDLE_POLL;
            if !shutdown.is_triggered() && free > 0 {
                match me.claim(free).await {
                    Ok(claimed) => {
                        let full = claimed.len() == free;
                        for delivery in claimed {
                            let relay = me.clone();
                            inflight.spawn(async move { relay.deliver(delivery).await });
                        }
                        if full && inflight.len() < me.concurrency {
                            continue;
                        }
                        if !full {
                            wait = me.until_next_due().await;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "webhook outbox unavailable");
                        wait = STORAGE_BACKOFF;
                    }
                }
            }
            if shutdown.is_triggered() {
                // Tries in flight end within their timeout; their leases cover the rest.
                while inflight.join_next().await.is_some() {}
                return;
            }
            tokio::select! {
                Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
                _ = me.outbox.webhooks_written() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait() => {}
            }
        }
    }

    async fn claim(&self, max: usize) -> crate::storage::StorageResult<Vec<LeasedDelivery>> {
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        self.outbox
            .claim_webhook_deliveries(max, self.lease())
            .await
    }

    /// How long until the next pending delivery is due, at most [`IDLE_POLL`].
    async fn until_next_due(&self) -> Duration {
        match self.outbox.next_webhook_due().await {
            Ok(Some(at)) => (at - Utc::now())
                .to_std()
                .unwrap_or_default()
                .min(IDLE_POLL),
            _ => IDLE_POLL,
        }
    }

    /// One try of `delivery`, and its outcome recorded.
    async fn deliver(&self, delivery: LeasedDelivery) {
        crate::crash_point!("webhook-before-send");
        let outcome = match self.send(&delivery).await {
            Ok(()) => {
                crate::crash_point!("webhook-after-delivered");
                DeliveryOutcome::Delivered
            }
            Err(error) => self.after_failure(&delivery, error),
        };
        let (tag, lag) = match &outcome {
            DeliveryOutcome::Delivered => {
                let lag = (Utc::now() - delivery.created_at).num_milliseconds() as f64 / 1e3;
                (WebhookOutcome::Delivered, Some(lag))
            }
            DeliveryOutcome::Retry { at, error } => {
                tracing::warn!(event_id = %delivery.event_id, %error, retry_at = %at,
                    "merchant webhook not accepted");
                (WebhookOutcome::Retried, None)
            }
            DeliveryOutcome::Failed { error } => {
                tracing::error!(event_id = %delivery.event_id, %error,
                    "merchant webhook failed for good; an admin may redeliver it");
                (WebhookOutcome::Failed, None)
            }
        };
        metrics::webhook_delivery(tag, lag);
        match self
            .outbox
            .settle_webhook_delivery(&delivery, &outcome)
            .await
        {
            Ok(true) => {}
            Ok(false) => tracing::warn!(event_id = %delivery.event_id,
                "webhook lease lost before its outcome was recorded"),
            // The lease runs out and the delivery is tried again, same id and body.
            Err(error) => tracing::warn!(event_id = %delivery.event_id, %error,
                "webhook outcome not recorded"),
        }
    }

    /// Sends one try: `Ok` on a 2xx, otherwise why not (one line, no URL).
    async fn send(&self, delivery: &LeasedDelivery) -> Result<(), String> {
        let timestamp = Utc::now().timestamp();
        let signature = signature_header(
            &self.endpoint.keys,
            &delivery.event_id,
            timestamp,
            delivery.body.as_bytes(),
        );
        let response = self
            .http
            .post(&self.endpoint.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &delivery.event_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(delivery.body.clone())
            .send()
            .await;
        match response {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("the receiver answered {}", r.status().as_u16())),
            Err(e) if e.is_timeout() => Err(format!(
                "no answer within {} s",
                self.endpoint.timeout.as_secs_f64()
            )),
            Err(e) => Err(format!("the receiver is unreachable: {}", e.without_url())),
        }
    }

    /// What a failed try leads to: the next one on the schedule, or `failed`.
    fn after_failure(&self, delivery: &LeasedDelivery, error: String) -> DeliveryOutcome {
        let tries = delivery.attempts as usize + 1;
        match self.endpoint.retry_delays.get(tries - 1) {
            Some(delay) if !delivery.redelivery => DeliveryOutcome::Retry {
                at: Utc::now() + chrono::TimeDelta::from_std(*delay).unwrap_or_default(),
                error,
            },
            _ => DeliveryOutcome::Failed { error },
        }
    }
}
