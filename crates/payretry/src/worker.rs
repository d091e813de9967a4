//! The retry worker (DESIGN.md §1, §5): one testable [`Worker::process`] that decides what a
//! delivered job means, wrapped by [`Worker::run`], a loop that sleeps until the next job is
//! due or one is enqueued — it never polls the database in a tight loop.
//!
//! Every step is idempotent: a stale, duplicate or after-success job does nothing; the
//! checkout is created under the key `payretry-{session}-attempt-{N}`, so a redelivered job
//! cannot create a second checkout; the session update is a compare-and-set on the attempt.

use crate::provider::{CheckoutRequest, CheckoutState, ProviderError, checkout_expires_at};
use crate::queue::{DeadLetterQueue, Delivery, JobQueue, QueueError};
use crate::service::{Payments, ServiceError, record};
use crate::shutdown::Shutdown;
use crate::storage::{SessionRecord, StorageError};
use crate::telemetry::metrics;
use chrono::{DateTime, Utc};
use payretry_domain::lifecycle::{self, JobStep};
use payretry_domain::{Backoff, Jitter, ProviderSessionId};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tracing::Instrument;

/// Longest the worker sleeps without looking at the queue, for jobs enqueued by another
/// process (this process's own enqueues of jobs due sooner wake it at once).
const IDLE_POLL: Duration = crate::storage::wakeups::WAKE_WORKER_WITHIN;

/// How many leases one job may run for before it is abandoned to redelivery.
const MAX_LEASES_PER_JOB: u32 = 5;

/// What processing a job amounted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The retry checkout exists and the session is open on it.
    CheckoutCreated,
    /// The provider said the current checkout was completed (paid, or with a payment that
    /// settles later): recorded as success or processing, no retry.
    Reconciled,
    /// Nothing to do: the session moved on (paid, another attempt, already processed).
    Dropped(&'static str),
    /// The window closed before the retry could start.
    Abandoned,
    /// The provider is unavailable: deliver again later.
    RetryLater(String),
    /// The provider's rate limit kept refusing: deliver again later, and count this
    /// delivery as if it never happened (DESIGN.md §4: not a failure).
    Throttled(String),
    /// The provider refused for good: no redelivery will help.
    Permanent(String),
    /// Delivered before its due time (an SQS delay is at most 15 minutes): queued again.
    NotDue,
}

/// Why a delivery could not be settled: recording its outcome or telling the queue failed.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Tuning of the worker loop.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Deliveries before a job is dead-lettered.
    pub max_receives: u32,
    /// Jobs processed at once.
    pub concurrency: usize,
    /// How long a delivery is hidden from other workers while it runs.
    pub lease: Duration,
    /// First redelivery delay after a failure; doubles per delivery, capped at 15 minutes.
    pub backoff: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            max_receives: 5,
            concurrency: 16,
            lease: Duration::from_secs(60),
            backoff: Duration::from_secs(10),
        }
    }
}

pub struct Worker {
    payments: Arc<Payments>,
    queue: Arc<dyn JobQueue>,
    settings: WorkerSettings,
}

impl Worker {
    pub fn new(
        payments: Arc<Payments>,
        queue: Arc<dyn JobQueue>,
        settings: WorkerSettings,
    ) -> Self {
        Self {
            payments,
            queue,
            settings,
        }
    }

    /// Decides and performs what one delivery asks for. Does not acknowledge it (for a
    /// caller that settles deliveries itself, such as another job queue).
    pub async fn process(&self, delivery: &Delivery) -> Outcome {
        self.process_settling(delivery, false).await
    }

    /// Like [`Worker::process`]; with `in_transition`, a created checkout is recorded and
    /// the delivery acknowledged in one commit ([`JobQueue::settles_in_transition`]).
    async fn process_settling(&self, delivery: &Delivery, in_transition: bool) -> Outcome {
        match self.try_process(delivery, in_transition).await {
            Ok(outcome) => outcome,
            Err(ServiceError::Provider(ProviderError::Permanent(e))) => Outcome::Permanent(e),
            Err(ServiceError::Provider(ProviderError::RateLimited(e))) => Outcome::Throttled(e),
            Err(error) => Outcome::RetryLater(error.to_string()),
        }
    }

    /// The decision is [`lifecycle::plan_job`]'s; this only reads the session and performs it.
    async fn try_process(
        &self,
        delivery: &Delivery,
        settle_in_transition: bool,
    ) -> Result<Outcome, ServiceError> {
        let job = &delivery.job;
        let now = Utc::now();
        if !lifecycle::job_is_due(job, now) {
            return Ok(Outcome::NotDue);
        }
        metrics::schedule_lag((now - job.scheduled_for).num_milliseconds() as f64 / 1000.0);
        let session = self
            .payments
            .storage
            .session(&job.payment_session_id)
            .await?;
        let read = session.as_ref().map(SessionRecord::lifecycle);
        match (lifecycle::plan_job(job, read.as_ref(), now), session) {
            (JobStep::Drop(why), _) => Ok(Outcome::Dropped(why)),
            (JobStep::Abandon, _) => {
                self.payments
                    .expire_if_window_passed(&job.payment_session_id)
                    .await?;
                Ok(Outcome::Abandoned)
            }
            (JobStep::OpenCheckout { check_paid }, Some(session)) => {
                if let Some(current) = &check_paid
                    && let Some(settled) = self.completed_meanwhile(current).await?
                {
                    self.payments
                        .record_reconciled_checkout(&session, settled)
                        .await?;
                    return Ok(Outcome::Reconciled);
                }
                self.open_retry_checkout(delivery, session, settle_in_transition)
                    .await
            }
            (JobStep::OpenCheckout { .. }, None) => Ok(Outcome::Dropped("unknown session")),
        }
    }

    /// Whether the provider says `checkout` was completed without telling us: paid, or
    /// completed with a payment that settles later (then no retry may start: money may
    /// still move). Only a transient failure to ask is an error (retry later); a permanent
    /// one means "not completed".
    async fn completed_meanwhile(
        &self,
        checkout: &ProviderSessionId,
    ) -> Result<Option<CheckoutState>, ServiceError> {
        match self.payments.provider.retrieve_checkout(checkout).await {
            Ok(state @ (CheckoutState::Paid | CheckoutState::Processing)) => Ok(Some(state)),
            Ok(CheckoutState::Open | CheckoutState::Expired | CheckoutState::CompleteUnpaid)
            | Err(ProviderError::Permanent(_)) => Ok(None),
            Err(transient) => Err(transient.into()),
        }
    }

    /// Creates the retry's checkout and opens the session on it
    /// ([`Lifecycle::retry_checkout_opened`]); whichever checkout is left unused is recorded
    /// for closing.
    ///
    /// [`Lifecycle::retry_checkout_opened`]: payretry_domain::Lifecycle::retry_checkout_opened
    async fn open_retry_checkout(
        &self,
        delivery: &Delivery,
        session: SessionRecord,
        settle_in_transition: bool,
    ) -> Result<Outcome, ServiceError> {
        let job = &delivery.job;
        let checkout = self
            .payments
            .provider
            .create_checkout(&CheckoutRequest {
                session_id: session.id.clone(),
                attempt: job.attempt_number,
                money: session.money.clone(),
                description: session.description.clone(),
                success_url: format!("{}?result=success", self.payments.pay_url(&session.id)),
                cancel_url: self.payments.pay_url(&session.id),
                expires_at: checkout_expires_at(session.expires_at, delivery.checkout_reference()),
            })
            .await?;
        crate::crash_point!("worker-after-checkout-created");
        let id = session.id.clone();
        let committed = self
            .payments
            .transition_on(&id, Some(session), |s, now| {
                let opened =
                    s.lifecycle()
                        .retry_checkout_opened(job, &checkout, delivery.receive_count);
                Ok(opened.map(|change| {
                    let (mut t, metrics) = self.payments.record(s, change, now);
                    if settle_in_transition {
                        t.settles = Some(delivery.receipt.clone());
                    }
                    (t, metrics)
                }))
            })
            .await?;
        let Some((_, metrics)) = committed else {
            // Another delivery of this same job may have won with this very checkout (the
            // idempotency key makes the provider return it again): it is live, keep it.
            // Otherwise the session was paid or expired meanwhile: close the unused one.
            let current = self.payments.storage.session(&id).await?;
            let still_live =
                current.is_some_and(|s| s.state.provider_session_id.as_ref() == Some(&checkout.id));
            if !still_live {
                self.payments
                    .storage
                    .schedule_checkout_closures(&id, std::slice::from_ref(&checkout.id))
                    .await?;
            }
            return Ok(Outcome::Dropped(
                "session moved on during checkout creation",
            ));
        };
        // The previous checkout was recorded for closing in the commit; the sweeper, woken by
        // it, closes it.
        record::emit(&metrics);
        Ok(Outcome::CheckoutCreated)
    }

    /// Processes one delivery and settles it with the queue.
    pub async fn handle(&self, delivery: Delivery) -> Result<Outcome, SettleError> {
        let outcome = if delivery.receive_count > self.settings.max_receives {
            // Earlier deliveries ended without settling (the process died): give up on it.
            Outcome::RetryLater("the worker stopped while processing this job".to_owned())
        } else {
            self.process_with_heartbeat(&delivery).await
        };
        match &outcome {
            Outcome::NotDue => self.queue.defer(&delivery).await?,
            Outcome::Throttled(error) => {
                let delay = throttled_delay(self.settings.backoff, rand::random::<f64>());
                tracing::warn!(%error, delay_ms = delay.as_millis() as u64, "provider rate limit; job postponed, not counted");
                self.queue.postpone(&delivery, error, delay).await?;
            }
            Outcome::RetryLater(error) if delivery.receive_count < self.settings.max_receives => {
                let delay = self.backoff(delivery.receive_count);
                tracing::warn!(%error, receive_count = delivery.receive_count, "retry job failed; will redeliver");
                self.queue.release(&delivery, error, delay).await?;
            }
            Outcome::RetryLater(error) | Outcome::Permanent(error) => {
                self.dead_letter(&delivery, error).await?;
                self.queue.ack(&delivery).await?;
            }
            // Already acknowledged by the transition that recorded the checkout.
            Outcome::CheckoutCreated if self.queue.settles_in_transition() => {}
            _ => self.queue.ack(&delivery).await?,
        }
        Ok(outcome)
    }

    /// Processes while keeping the delivery hidden from other workers, extending its lease
    /// every half lease for as long as the provider takes.
    async fn process_with_heartbeat(&self, delivery: &Delivery) -> Outcome {
        let lease = self.settings.lease;
        let heartbeat = async {
            loop {
                tokio::time::sleep(lease / 2).await;
                if let Err(error) = self.queue.extend(delivery, lease).await {
                    tracing::warn!(%error, "could not extend a job's lease");
                }
            }
        };
        // A job that hangs (a stuck connection) must not hold its message forever by
        // extending the lease: past this bound it is given up and redelivered.
        let limit = lease.saturating_mul(MAX_LEASES_PER_JOB);
        tokio::select! {
            outcome = self.process_settling(delivery, self.queue.settles_in_transition()) => outcome,
            () = heartbeat => unreachable!("the heartbeat never ends"),
            () = tokio::time::sleep(limit) => Outcome::RetryLater(format!("processing took longer than {} s", limit.as_secs())),
        }
    }

    fn backoff(&self, receive_count: u32) -> Duration {
        // ±20% jitter so a provider outage does not end in a synchronized stampede.
        Backoff::doubling(self.settings.backoff, 16, Duration::from_secs(900))
            .with_jitter(Jitter::Scale { min: 0.8, max: 1.2 })
            .jittered(receive_count.saturating_sub(1), rand::random::<f64>())
    }

    /// Moves a job aside and hands the session back to the buyer: the attempt stays spent,
    /// the session is `failed` with `retry_processing_failed`, never stuck scheduled.
    pub(crate) async fn dead_letter(
        &self,
        delivery: &Delivery,
        error: &str,
    ) -> Result<(), StorageError> {
        let job = &delivery.job;
        let result = self
            .payments
            .transition(&job.payment_session_id, |s, now| {
                Ok(s.lifecycle()
                    .dead_lettered(job, delivery.receive_count, error)
                    .map(|change| self.payments.record(s, change, now)))
            })
            .await;
        match result {
            Ok(Some((_, metrics))) => {
                record::emit(&metrics);
                tracing::error!(session_id = %job.payment_session_id, attempt = %job.attempt_number, %error, "retry job dead-lettered");
                Ok(())
            }
            Ok(None) | Err(ServiceError::SessionNotFound) => Ok(()),
            Err(ServiceError::Storage(e)) => Err(e),
            Err(other) => Err(StorageError::Corrupt(other.to_string())),
        }
    }

    /// Runs until `shutdown`, then lets in-flight jobs finish.
    ///
    /// Claims jobs in batches (see [`Worker::wants_more`]). Only when the queue runs dry (a claim returns fewer jobs than asked) does it ask when the
    /// next job is due, and it sleeps until then, or until this process enqueues a job due
    /// soon or a running job finishes.
    pub async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut running: JoinSet<()> = JoinSet::new();
        let mut next_look = tokio::time::Instant::now();
        let mut receive_failures = 0u32;
        while !shutdown.is_triggered() {
            let free = self.settings.concurrency.saturating_sub(running.len());
            if self.wants_more(running.len()) && tokio::time::Instant::now() >= next_look {
                let deliveries = match self.queue.receive(free as u32, self.settings.lease).await {
                    Ok(deliveries) => {
                        receive_failures = 0;
                        deliveries
                    }
                    Err(error) => {
                        // The queue is down: look again later, backing off, rather than
                        // spinning on a connection that is refused at once.
                        receive_failures += 1;
                        let wait = Backoff::doubling(Duration::from_millis(100), 6, IDLE_POLL * 5)
                            .delay(receive_failures);
                        tracing::error!(%error, retry_in_ms = wait.as_millis() as u64, "could not receive retry jobs");
                        next_look = tokio::time::Instant::now() + wait;
                        self.wait_for_room_or(&mut running, next_look, &mut shutdown)
                            .await;
                        continue;
                    }
                };
                let drained = deliveries.len() < free;
                for delivery in deliveries {
                    self.spawn(&mut running, delivery);
                }
                if !drained {
                    continue;
                }
                next_look = tokio::time::Instant::now() + self.next_wake().await;
            }
            let wants_more = self.wants_more(running.len());
            tokio::select! {
                _ = tokio::time::sleep_until(next_look), if wants_more => {}
                _ = self.queue.enqueued() => next_look = tokio::time::Instant::now(),
                Some(_) = running.join_next(), if !running.is_empty() => {}
                _ = shutdown.wait() => {}
            }
        }
        while running.join_next().await.is_some() {}
    }

    /// Whether to claim more jobs with `running` in flight: when a quarter of the slots are
    /// free, or all of them. One claim per finished job would cost the queue a transaction
    /// per job; a batch costs one per quarter, while the other slots keep working.
    fn wants_more(&self, running: usize) -> bool {
        let free = self.settings.concurrency.saturating_sub(running);
        let batch = (self.settings.concurrency / 4).max(1);
        free >= batch || (free > 0 && running == 0)
    }

    /// Sleeps until `until`, or until a running job finishes or shutdown begins.
    async fn wait_for_room_or(
        &self,
        running: &mut JoinSet<()>,
        until: tokio::time::Instant,
        shutdown: &mut Shutdown,
    ) {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
            _ = shutdown.wait() => {}
        }
    }

    fn spawn(self: &Arc<Self>, running: &mut JoinSet<()>, delivery: Delivery) {
        let worker = Arc::clone(self);
        let span = tracing::info_span!(
            "job",
            session_id = %delivery.job.payment_session_id,
            attempt = %delivery.job.attempt_number,
        );
        running.spawn(
            async move {
                match worker.handle(delivery).await {
                    Ok(outcome) => tracing::info!(?outcome, "retry job processed"),
                    Err(error) => tracing::error!(%error, "could not settle retry job"),
                }
            }
            .instrument(span),
        );
    }

    async fn next_wake(&self) -> Duration {
        let next: Option<DateTime<Utc>> = self.queue.next_due().await.unwrap_or(None);
        next.map(|at| (at - Utc::now()).to_std().unwrap_or(Duration::ZERO))
            .map_or(IDLE_POLL, |d| d.min(IDLE_POLL))
    }
}

/// How long a job the provider's rate limit refused waits before its next delivery: one to
/// two first backoffs (10–20 s by default; `jitter` in `0.0..1.0`), so the jobs of one 429
/// storm come back spread out. Not doubled: the job did not fail.
fn throttled_delay(backoff: Duration, jitter: f64) -> Duration {
    backoff.mul_f64(1.0 + jitter.clamp(0.0, 1.0))
}

impl Worker {
    /// Drains a queue's dead-letter queue (SQS's) into payretry's dead letters: a message
    /// lands there when deliveries never settled (workers kept dying), and the session must
    /// not stay `retry_scheduled`. Each message is recorded, then deleted from the queue.
    pub async fn drain_sqs_dead_letters(
        self: Arc<Self>,
        sqs: Arc<dyn DeadLetterQueue>,
        mut shutdown: Shutdown,
    ) {
        while !shutdown.is_triggered() {
            match sqs.receive_dead(10).await {
                Ok(dead) => {
                    for delivery in &dead {
                        let error = format!(
                            "moved to the dead-letter queue after {} receives",
                            delivery.receive_count
                        );
                        match self.dead_letter(delivery, &error).await {
                            Ok(()) => {
                                if let Err(e) = sqs.delete_dead(delivery).await {
                                    tracing::warn!(error = %e, "could not delete a drained dead letter");
                                }
                            }
                            Err(e) => tracing::error!(error = %e, "could not record a dead letter"),
                        }
                    }
                    if !dead.is_empty() {
                        continue;
                    }
                }
                Err(error) => tracing::warn!(%error, "could not read the dead-letter queue"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = shutdown.wait() => {}
            }
        }
    }
}
