//! The retry-job queue. Jobs are written to the outbox inside the transaction that schedules
//! them (see `storage`); a queue backend delivers them to workers at least once, after their
//! due time. Workers are idempotent, so at-least-once delivery gives exactly-once effects.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use payretry_domain::RetryJob;
use std::time::Duration;

use crate::storage::StorageError;

/// One delivery of a job to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub job: RetryJob,
    /// Backend-specific handle to acknowledge or release this delivery.
    pub receipt: String,
    /// How many times the job has been delivered, this one included.
    pub receive_count: u32,
}

/// A queue backend, seen from the worker.
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Takes up to `max` due jobs, hiding each from other workers for `lease`.
    async fn receive(&self, max: u32, lease: Duration) -> Result<Vec<Delivery>, StorageError>;

    /// The job is done (or deliberately dropped): delete it.
    async fn ack(&self, delivery: &Delivery) -> Result<(), StorageError>;

    /// The job failed: deliver it again after `delay`.
    async fn release(
        &self,
        delivery: &Delivery,
        error: &str,
        delay: Duration,
    ) -> Result<(), StorageError>;

    /// When the worker should look again if nothing wakes it: the next due job, if any.
    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StorageError>;

    /// Resolves when a job was enqueued by this process (so the worker need not poll).
    async fn enqueued(&self);
}
