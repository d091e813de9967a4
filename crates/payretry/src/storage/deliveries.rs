//! Merchant webhook deliveries (DESIGN.md §6b): the outbox of merchant events, as the relay
//! and the admin routes see it.
//!
//! An event is a row written with the transition it announces ([`NewMerchantEvent`] in
//! [`super::Transition::merchant_events`]), so none is lost and none blocks a request. The
//! row stays after delivery: admins list deliveries and redeliver failed ones. A relay leases
//! due rows ([`WebhookOutbox::claim_webhook_deliveries`]) by moving their due time to the
//! lease's end, which doubles as the lease token: its outcome is written only while the row
//! still holds that token, so relays in several processes never settle each other's work.

use super::{Page, Paged, StorageResult};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use payretry_domain::merchant_event::MerchantEventType;
use payretry_domain::{DeliveryId, PaymentSessionId};
use std::time::Duration;

/// A merchant event to record with its transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMerchantEvent {
    /// The Standard Webhooks `webhook-id`, stable across redeliveries.
    pub event_id: String,
    pub event_type: MerchantEventType,
    /// Per session, increasing by one per event (see [`super::SessionRecord::event_sequence`]).
    pub sequence: i64,
    /// The request body, exactly as every delivery sends it.
    pub body: String,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Waiting for its first or next try.
    Pending,
    Delivered,
    /// The schedule ran out (or a redelivery failed): waiting for an admin.
    Failed,
}

impl DeliveryStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [Self::Pending, Self::Delivered, Self::Failed]
            .into_iter()
            .find(|s| s.as_str() == raw)
    }
}

/// A delivery as the admin routes show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDelivery {
    pub id: DeliveryId,
    pub event_id: String,
    pub event_type: String,
    pub session_id: PaymentSessionId,
    pub sequence: i64,
    pub status: DeliveryStatus,
    /// Tries made so far.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// When the next try is due (a try in flight: when its lease ends); `None` unless pending.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// A delivery a relay leased: what it sends, and the token its outcome is written under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedDelivery {
    pub id: DeliveryId,
    pub event_id: String,
    pub body: String,
    /// Tries made before this one.
    pub attempts: u32,
    /// An admin asked for this try: if it fails, the delivery is `failed` again at once.
    pub redelivery: bool,
    pub created_at: DateTime<Utc>,
    /// The lease's end (ms), its token.
    pub lease: i64,
}

/// What one try came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Delivered,
    /// Try again at `at`.
    Retry {
        at: DateTime<Utc>,
        error: String,
    },
    /// No tries left.
    Failed {
        error: String,
    },
}

/// Which deliveries an admin lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryFilter {
    pub status: Option<DeliveryStatus>,
    pub session: Option<PaymentSessionId>,
}

/// What an admin's redelivery found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    /// Queued again (it was `failed` or `delivered`).
    Queued,
    /// Already waiting for a try: nothing changed.
    AlreadyPending,
    NotFound,
}

/// The merchant events' outbox, for the relay and the admin routes.
#[async_trait]
pub trait WebhookOutbox: Send + Sync {
    /// Leases up to `max` due deliveries for `lease`, the most overdue first.
    async fn claim_webhook_deliveries(
        &self,
        max: u32,
        lease: Duration,
    ) -> StorageResult<Vec<LeasedDelivery>>;

    /// Records the outcome of a leased try; `false` when the lease was lost meanwhile (the
    /// row was taken by another relay) and nothing was written.
    async fn settle_webhook_delivery(
        &self,
        delivery: &LeasedDelivery,
        outcome: &DeliveryOutcome,
    ) -> StorageResult<bool>;

    /// When the next pending delivery is due, so the relay can sleep until then.
    async fn next_webhook_due(&self) -> StorageResult<Option<DateTime<Utc>>>;

    /// Resolves when this process committed merchant events (so the relay need not poll).
    async fn webhooks_written(&self);

    /// One page of deliveries, oldest first.
    async fn webhook_deliveries(
        &self,
        filter: &DeliveryFilter,
        page: Page,
    ) -> StorageResult<Paged<WebhookDelivery>>;

    async fn webhook_delivery(&self, id: DeliveryId) -> StorageResult<Option<WebhookDelivery>>;

    /// Queues a `failed` or `delivered` delivery for one more try, at once.
    async fn redeliver_webhook(&self, id: DeliveryId) -> StorageResult<Redelivery>;
}
