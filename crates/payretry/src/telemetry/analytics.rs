//! Segment analytics (DESIGN.md §6): track events written to an outbox in the same
//! transaction as the state change, and a relay that delivers them in batches.
//!
//! Nothing lost: a row is deleted only after Segment accepted its batch. Nothing twice (for
//! Segment, which deduplicates by `messageId`): every event's `messageId` is derived from
//! what happened (`payretry-{session}-{attempt}-{event}`), so a re-sent batch repeats ids.
//!
//! The outbox is a table of the database: storage writes [`AnalyticsEvent`]s with the
//! transition they describe, and implements [`AnalyticsOutbox`] for the relay.

use crate::secret::Secret;
use crate::shutdown::Shutdown;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use payretry_domain::{AttemptNumber, Backoff, PaymentSessionId, UserId};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// The event names of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackEvent {
    /// The buyer's retry was accepted.
    Scheduled,
    /// The retry checkout was created.
    Initiated,
    /// A retried checkout ended (`success` boolean).
    Completed,
    /// A retry was dropped (`reason`).
    Abandoned,
}

impl TrackEvent {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Scheduled => "payments.retry.scheduled",
            Self::Initiated => "payments.retry.initiated",
            Self::Completed => "payments.retry.completed",
            Self::Abandoned => "payments.retry.abandoned",
        }
    }

    const fn slug(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Initiated => "initiated",
            Self::Completed => "completed",
            Self::Abandoned => "abandoned",
        }
    }
}

/// One Segment track call, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyticsEvent {
    pub message_id: String,
    /// The Segment `track` object as sent.
    pub payload: Value,
}

impl AnalyticsEvent {
    /// `properties` gets `paymentSessionId` and `attemptNumber` added.
    pub fn track(
        event: TrackEvent,
        buyer: &UserId,
        session: &PaymentSessionId,
        attempt: AttemptNumber,
        mut properties: Value,
        at: DateTime<Utc>,
    ) -> Self {
        let message_id = format!("payretry-{session}-{attempt}-{}", event.slug());
        properties["paymentSessionId"] = json!(session.as_str());
        properties["attemptNumber"] = json!(attempt.get());
        Self {
            payload: json!({
                "type": "track",
                "event": event.name(),
                "userId": buyer.as_str(),
                "messageId": message_id,
                "timestamp": at,
                "properties": properties,
                "context": {"library": {"name": "payretry", "version": env!("CARGO_PKG_VERSION")}},
            }),
            message_id,
        }
    }
}

/// An analytics outbox row awaiting delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyticsRow {
    pub id: i64,
    /// The Segment track object.
    pub payload: Value,
}

/// The analytics outbox could not be read or updated (its database failed).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct AnalyticsOutboxError(pub Box<dyn std::error::Error + Send + Sync>);

pub type AnalyticsResult<T> = Result<T, AnalyticsOutboxError>;

/// The analytics outbox, seen from the relay that delivers it to Segment.
#[async_trait]
pub trait AnalyticsOutbox: Send + Sync + 'static {
    /// The oldest undelivered analytics events that are due, at most `limit`.
    async fn analytics_batch(&self, limit: u32) -> AnalyticsResult<Vec<AnalyticsRow>>;

    /// Segment accepted these events: delete them.
    async fn analytics_delivered(&self, ids: &[i64]) -> AnalyticsResult<()>;

    /// Segment refused these events for good: keep them for review, out of the relay's way.
    async fn analytics_park(&self, ids: &[i64], error: &str) -> AnalyticsResult<()>;

    /// Resolves when this process committed analytics events (so the relay need not poll).
    async fn analytics_enqueued(&self);
}

/// Segment's limits: at most 100 events and 500 KB per batch call.
const MAX_BATCH_EVENTS: u32 = 100;
const MAX_BATCH_BYTES: usize = 500 * 1024;
/// Longest the relay sleeps when nothing wakes it (events from other processes).
const IDLE_POLL: Duration = Duration::from_secs(2);

/// Delivers the analytics outbox to `{endpoint}/v1/batch`.
pub struct SegmentRelay {
    pub outbox: Arc<dyn AnalyticsOutbox>,
    pub endpoint: String,
    pub write_key: Secret,
    pub http: reqwest::Client,
    /// First delay after a failed delivery; doubles per failure up to a minute.
    pub backoff: Duration,
}

/// What one delivery attempt came to.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    Sent(usize),
    Idle,
    /// 429, 5xx or a network error: keep the rows, try again later.
    Failed(String),
}

impl SegmentRelay {
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut failures = 0u32;
        while !shutdown.is_triggered() {
            let wait = match self.deliver_once().await {
                Delivery::Sent(_) => {
                    failures = 0;
                    continue;
                }
                Delivery::Idle => IDLE_POLL,
                Delivery::Failed(error) => {
                    failures += 1;
                    let delay = Backoff::doubling(self.backoff, 10, Duration::from_secs(60))
                        .delay(failures);
                    tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "segment delivery failed");
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.outbox.analytics_enqueued(), if failures == 0 => {}
                _ = shutdown.wait() => {}
            }
        }
    }

    async fn deliver_once(&self) -> Delivery {
        let rows = match self.outbox.analytics_batch(MAX_BATCH_EVENTS).await {
            Ok(rows) if rows.is_empty() => return Delivery::Idle,
            Ok(rows) => rows,
            Err(error) => return Delivery::Failed(error.to_string()),
        };
        let batch = fit_batch(&rows);
        let body = json!({"batch": batch.iter().map(|r| &r.payload).collect::<Vec<_>>(), "sentAt": Utc::now()});
        let response = self
            .http
            .post(format!("{}/v1/batch", self.endpoint))
            .basic_auth(self.write_key.expose(), Some(""))
            .json(&body)
            .send()
            .await;
        let ids: Vec<i64> = batch.iter().map(|r| r.id).collect();
        match response {
            Ok(r) if r.status().is_success() => match self.delivered(&ids).await {
                Ok(()) => Delivery::Sent(ids.len()),
                Err(error) => Delivery::Failed(error.to_string()),
            },
            Ok(r) if r.status().as_u16() == 429 || r.status().is_server_error() => {
                Delivery::Failed(format!("segment answered {}", r.status()))
            }
            Ok(r) => {
                // Segment refuses this batch for good (a 4xx): keep the events for review,
                // but out of the way of the ones behind them.
                let error = format!("segment refused the batch: {}", r.status());
                tracing::error!(%error, events = ids.len(), "analytics events parked");
                match self.outbox.analytics_park(&ids, &error).await {
                    Ok(()) => Delivery::Sent(0),
                    Err(e) => Delivery::Failed(e.to_string()),
                }
            }
            Err(error) => Delivery::Failed(format!("segment unreachable: {error}")),
        }
    }
}

impl SegmentRelay {
    /// Segment accepted the batch: forget its rows.
    async fn delivered(&self, ids: &[i64]) -> AnalyticsResult<()> {
        crate::crash_point!("segment-after-send");
        self.outbox.analytics_delivered(ids).await
    }
}

/// The longest prefix of `rows` within Segment's byte limit (always at least one row).
fn fit_batch(rows: &[AnalyticsRow]) -> &[AnalyticsRow] {
    let mut bytes = 64;
    for (i, row) in rows.iter().enumerate() {
        bytes += row.payload.to_string().len() + 1;
        if bytes > MAX_BATCH_BYTES && i > 0 {
            return &rows[..i];
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_stable_and_distinct_per_event() {
        let s = PaymentSessionId::parse("ps_abc").unwrap();
        let u = UserId::new("buyer-1");
        let at = Utc::now();
        let a = AnalyticsEvent::track(
            TrackEvent::Initiated,
            &u,
            &s,
            AttemptNumber::new(2),
            json!({}),
            at,
        );
        let b = AnalyticsEvent::track(
            TrackEvent::Initiated,
            &u,
            &s,
            AttemptNumber::new(2),
            json!({}),
            at,
        );
        let c = AnalyticsEvent::track(
            TrackEvent::Completed,
            &u,
            &s,
            AttemptNumber::new(2),
            json!({}),
            at,
        );
        assert_eq!(a.message_id, b.message_id);
        assert_ne!(a.message_id, c.message_id);
        assert_eq!(a.payload["event"], "payments.retry.initiated");
        assert_eq!(a.payload["properties"]["attemptNumber"], 2);
        assert_eq!(a.payload["userId"], "buyer-1");
    }

    #[test]
    fn batches_respect_the_byte_limit() {
        let big = json!({"x": "y".repeat(200 * 1024)});
        let rows: Vec<AnalyticsRow> = (0..4)
            .map(|id| AnalyticsRow {
                id,
                payload: big.clone(),
            })
            .collect();
        assert_eq!(fit_batch(&rows).len(), 2);
        assert_eq!(fit_batch(&rows[..1]).len(), 1);
    }
}
