//! The retry-job queue. Jobs are written to the outbox inside the transaction that schedules
//! them (see `storage`); a queue backend delivers them to workers at least once, after their
//! due time. Workers are idempotent, so at-least-once delivery gives exactly-once effects.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use payretry_domain::RetryJob;
use std::time::Duration;

pub mod relay;
pub mod sqs;

/// Queue failures. Details are logged, never shown to API callers.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// SQS refused or could not be reached.
    #[error("queue error: {0}")]
    Sqs(String),
    /// The database of the embedded queue (or of the outbox) failed.
    #[error(transparent)]
    Storage(Box<dyn std::error::Error + Send + Sync>),
}

pub type QueueResult<T> = Result<T, QueueError>;

/// One delivery of a job to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub job: RetryJob,
    /// Backend-specific handle to acknowledge or release this delivery.
    pub receipt: String,
    /// How many times the job has been delivered, this one included.
    pub receive_count: u32,
    /// When the job was first delivered (this delivery, or an earlier one of the same job),
    /// kept by the queue: the reference for the provider checkout's `expires_at`
    /// ([`Delivery::checkout_reference`]).
    pub first_delivered_at: DateTime<Utc>,
}

impl Delivery {
    /// The time a retry checkout's `expires_at` is computed from: the job's due time, or its
    /// first delivery when that was later (a backlog, an outage). Fixed per job, so every
    /// redelivery sends the provider the same parameters under the same Idempotency-Key, and
    /// however late the job came, the checkout closes inside the provider's bounds.
    pub fn checkout_reference(&self) -> DateTime<Utc> {
        self.job.scheduled_for.max(self.first_delivered_at)
    }
}

/// A queue backend, seen from the worker.
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Takes up to `max` due jobs, hiding each from other workers for `lease`.
    async fn receive(&self, max: u32, lease: Duration) -> QueueResult<Vec<Delivery>>;

    /// The job is done (or deliberately dropped): delete it.
    async fn ack(&self, delivery: &Delivery) -> QueueResult<()>;

    /// Whether a delivery can be acknowledged inside the storage transition that records its
    /// outcome ([`crate::storage::Transition::settles`]): true for the embedded queue, whose
    /// jobs live in the same database; an external queue is acknowledged on its own.
    fn settles_in_transition(&self) -> bool {
        false
    }

    /// The job failed: deliver it again after `delay`.
    async fn release(&self, delivery: &Delivery, error: &str, delay: Duration) -> QueueResult<()>;

    /// The job could not run for a reason that is not its failure (the provider's rate
    /// limit): deliver it again after `delay`, and do not count this delivery towards
    /// `PAYRETRY_MAX_RECEIVES`.
    async fn postpone(&self, delivery: &Delivery, reason: &str, delay: Duration)
    -> QueueResult<()>;

    /// The job runs long: keep it hidden from other workers for another `lease`.
    async fn extend(&self, delivery: &Delivery, lease: Duration) -> QueueResult<()>;

    /// The job arrived before its due time (SQS delays are capped at 15 minutes): queue it
    /// again for the rest of its delay, without counting this as a failed delivery.
    async fn defer(&self, delivery: &Delivery) -> QueueResult<()>;

    /// Answers when the queue is reachable (for `/readyz`).
    async fn ping(&self) -> QueueResult<()>;

    /// When the worker should look again if nothing wakes it: the next due job, if any.
    async fn next_due(&self) -> QueueResult<Option<DateTime<Utc>>>;

    /// Resolves when a job was enqueued by this process (so the worker need not poll).
    async fn enqueued(&self);
}

/// A queue's dead-letter queue, where the queue itself moves jobs whose deliveries never
/// settled (SQS's redrive policy); the worker drains it into payretry's dead letters.
#[async_trait]
pub trait DeadLetterQueue: Send + Sync + 'static {
    /// Up to `max` messages that were moved to the dead-letter queue.
    async fn receive_dead(&self, max: u32) -> QueueResult<Vec<Delivery>>;

    /// Deletes a message from the dead-letter queue once it was recorded.
    async fn delete_dead(&self, delivery: &Delivery) -> QueueResult<()>;
}

/// The transactional outbox, seen from a relay that forwards its rows to an external queue.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Claims up to `max` rows whatever their due time, hiding them from other relays for
    /// `lease` (a relay that dies mid-send leaves them to be claimed again).
    async fn claim_outbox(&self, max: u32, lease: Duration) -> QueueResult<Vec<Delivery>>;

    /// The external queue accepted these rows: delete them, in one statement. Each delete
    /// is guarded by its claim's lease, so a row claimed again since is kept.
    async fn delete_outbox(&self, deliveries: &[Delivery]) -> QueueResult<()>;

    /// The external queue did not take these rows: make them claimable again at once.
    async fn release_outbox(&self, deliveries: &[Delivery]) -> QueueResult<()>;

    /// Resolves when this process wrote to the outbox.
    async fn outbox_written(&self);
}
