//! In-process signals from a committed write to the loops that consume what it wrote, so
//! none of them polls the database in a tight loop.

use super::Transition;
use chrono::{DateTime, Utc};
use std::time::Duration;
use tokio::sync::Notify;

/// The worker looks at the queue at least this often anyway (its idle poll), so only a job
/// due sooner needs to wake it. Waking it for every enqueue would cost the API one empty
/// claim per scheduled retry (on SQLite, a write transaction on the single writer).
pub const WAKE_WORKER_WITHIN: Duration = Duration::from_secs(1);

/// The signals one storage backend raises after its commits.
#[derive(Default)]
pub struct Wakeups {
    /// A job was enqueued that is due within [`WAKE_WORKER_WITHIN`].
    job_due_soon: Notify,
    /// A job was written to the outbox (the SQS relay forwards it at once, whatever its due
    /// time: SQS holds the delay).
    outbox_written: Notify,
    /// Segment events were written to the analytics outbox.
    analytics_written: Notify,
    /// Merchant events were written to the webhook outbox.
    webhooks_written: Notify,
    /// A double payment was recorded with a refund owed (the refund runner makes the call).
    refund_owed: Notify,
    /// Checkouts were recorded for closing (the sweeper closes them).
    checkouts_to_close: Notify,
}

impl Wakeups {
    /// Raises what `t`, just committed at `now`, calls for.
    pub fn committed(&self, t: &Transition, now: DateTime<Utc>) {
        if let Some(job) = &t.enqueue {
            self.outbox_written.notify_one();
            let soon = chrono::TimeDelta::from_std(WAKE_WORKER_WITHIN).unwrap_or_default();
            if job.scheduled_for - now < soon {
                self.job_due_soon.notify_one();
            }
        }
        if !t.analytics.is_empty() {
            self.analytics_written.notify_one();
        }
        if !t.merchant_events.is_empty() {
            self.webhooks_written.notify_one();
        }
        if t.duplicate_payment
            .as_ref()
            .is_some_and(|d| d.status == super::DuplicatePaymentStatus::RefundRequested)
        {
            self.refund_owed.notify_one();
        }
        if !t.close_checkouts.is_empty() {
            self.checkouts_to_close.notify_one();
        }
    }

    /// Checkouts were recorded for closing outside a transition.
    pub fn checkouts_scheduled(&self) {
        self.checkouts_to_close.notify_one();
    }

    pub async fn checkouts_to_close(&self) {
        self.checkouts_to_close.notified().await;
    }

    pub async fn job_due_soon(&self) {
        self.job_due_soon.notified().await;
    }

    pub async fn outbox_written(&self) {
        self.outbox_written.notified().await;
    }

    pub async fn analytics_written(&self) {
        self.analytics_written.notified().await;
    }

    /// A delivery was queued again outside a transition (an admin's redelivery).
    pub fn webhooks_queued(&self) {
        self.webhooks_written.notify_one();
    }

    pub async fn webhooks_written(&self) {
        self.webhooks_written.notified().await;
    }

    pub async fn refund_owed(&self) {
        self.refund_owed.notified().await;
    }
}
