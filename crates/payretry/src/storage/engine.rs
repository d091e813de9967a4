//! [`Storage`] (every role of it), the embedded [`JobQueue`] and [`SandboxCheckouts`], written
//! once over an [`Engine`]: what SQLite and PostgreSQL do differently is only how they run a
//! transaction's writes, where a read goes, and the three things each does its own way
//! (claiming an idempotency key, claiming due jobs, migrating).

use super::sql::{self, Backend, Write};
use super::wakeups::Wakeups;
use super::{
    AuditEntry, CheckoutClosure, ClosureStore, Committed, DeadLetter, DeadLetterStore,
    DuplicatePayment, DuplicateStore, IdempotencyBegin, IdempotencyCompletion, IdempotencyScope,
    IdempotencyStore, NewAuditEntry, NewSession, Page, Paged, RefundSettlement, SecretStore,
    SessionRecord, SessionStore, Storage, StorageResult, Transition, corrupt, plan, reads,
    to_millis,
};
use super::{ConsoleReads, FunnelRow, SessionFilter, SessionKey, SessionPage};
use super::{
    DeliveryFilter, DeliveryOutcome, LeasedDelivery, Redelivery, WebhookDelivery, WebhookOutbox,
};
use crate::provider::sandbox::{
    SandboxCheckout, SandboxCheckoutResult, SandboxCheckoutStatus, SandboxCheckouts,
};
use crate::queue::{Delivery, JobQueue, QueueResult};
use crate::telemetry::analytics::AnalyticsOutbox;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use payretry_domain::{
    AttemptNumber, DeadLetterId, DeliveryId, PaymentSessionId, ProviderSessionId,
};
use sqlx::{Database, Executor, Pool};
use std::time::Duration;

/// A SQL database payretry keeps its state in.
#[async_trait]
pub(crate) trait Engine: AnalyticsOutbox + Send + Sync + 'static {
    type Db: Backend;

    /// Where reads go (SQLite: its reader pool; in WAL mode every read there sees every
    /// commit that was answered before it).
    fn reader(&self) -> &Pool<Self::Db>;

    /// Wakes this process's worker, relays and sweepers after a commit.
    fn wakeups(&self) -> &Wakeups;

    /// Runs `writes` in one transaction and commits it when every write went through;
    /// otherwise rolls it back and answers what stopped it ([`sql::IfNone`]).
    async fn write(&self, writes: Vec<Write>) -> StorageResult<Committed>;

    /// Runs `writes` (deletes that need no compare-and-set) and answers how many rows they
    /// touched in all.
    async fn write_counted(&self, writes: Vec<Write>) -> StorageResult<u64>;

    /// Applies pending migrations.
    async fn run_migrations(&self) -> StorageResult<()>;

    /// [`Storage::begin_idempotent`]: claims the key unless a live record stands.
    async fn claim_key(
        &self,
        scope: &IdempotencyScope,
        now: DateTime<Utc>,
    ) -> StorageResult<IdempotencyBegin>;

    /// [`Storage::lookup_idempotent`]: what a live record of the key says, claiming nothing.
    async fn find_key(
        &self,
        scope: &IdempotencyScope,
        now: DateTime<Utc>,
    ) -> StorageResult<IdempotencyBegin>;

    /// Leases up to `max` jobs: only due ones for the embedded queue's consumers, any for
    /// an outbox relay (which hands the remaining delay to the external queue).
    async fn claim_jobs(
        &self,
        max: u32,
        lease: Duration,
        due_only: bool,
    ) -> StorageResult<Vec<Delivery>>;

    /// Leases up to `max` merchant webhook deliveries due at `now` (ms) until `lease_end`
    /// (ms), the most overdue first; concurrent claimers take disjoint rows.
    async fn claim_webhooks(
        &self,
        now: i64,
        lease_end: i64,
        max: u32,
    ) -> StorageResult<Vec<LeasedDelivery>>;
}

/// Rows a single statement outside a transaction touched.
async fn execute<'e>(db: impl Executor<'e, Database: Backend>, write: Write) -> StorageResult<u64> {
    sql::execute(db, &write).await
}

#[async_trait]
impl<E> SessionStore for E
where
    E: Engine + SandboxCheckouts,
    for<'c> &'c mut <E::Db as Database>::Connection: Executor<'c, Database = E::Db>,
{
    async fn insert_session(&self, s: NewSession) -> StorageResult<()> {
        self.write(plan::new_session(&s)).await?;
        Ok(())
    }

    async fn session(&self, id: &PaymentSessionId) -> StorageResult<Option<SessionRecord>> {
        reads::session(self.reader(), id).await
    }

    async fn commit(&self, t: Transition) -> StorageResult<Committed> {
        let committed = self
            .write(plan::transition(&t, to_millis(Utc::now()))?)
            .await?;
        if committed == Committed::Applied {
            self.wakeups().committed(&t, Utc::now());
        }
        Ok(committed)
    }

    async fn audit_log(
        &self,
        id: &PaymentSessionId,
        page: Page,
    ) -> StorageResult<Paged<AuditEntry>> {
        reads::audit_log(self.reader(), id, page).await
    }

    async fn sessions_past_window(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<SessionRecord>> {
        reads::sessions_past_window(self.reader(), now, limit).await
    }

    async fn next_window_end(&self) -> StorageResult<Option<DateTime<Utc>>> {
        reads::next_window_end(self.reader()).await
    }

    async fn checkout_attempt(
        &self,
        session: &PaymentSessionId,
        checkout: &ProviderSessionId,
    ) -> StorageResult<Option<AttemptNumber>> {
        reads::checkout_attempt(self.reader(), session, checkout).await
    }
}

#[async_trait]
impl<E> IdempotencyStore for E
where
    E: Engine + SandboxCheckouts,
    for<'c> &'c mut <E::Db as Database>::Connection: Executor<'c, Database = E::Db>,
{
    async fn begin_idempotent(
        &self,
        scope: &IdempotencyScope,
        now: DateTime<Utc>,
    ) -> StorageResult<IdempotencyBegin> {
        self.claim_key(scope, now).await
    }

    async fn lookup_idempotent(
        &self,
        scope: &IdempotencyScope,
        now: DateTime<Utc>,
    ) -> StorageResult<IdempotencyBegin> {
        self.find_key(scope, now).await
    }

    async fn lookup_idempotent_with_session(
        &self,
        scope: &IdempotencyScope,
        id: &PaymentSessionId,
        now: DateTime<Utc>,
    ) -> StorageResult<(IdempotencyBegin, Option<SessionRecord>)> {
        let (session, record) = reads::session_and_key(self.reader(), id, scope).await?;
        let found = record
            .and_then(|record| record.verdict(&scope.fingerprint, to_millis(now)))
            .unwrap_or(IdempotencyBegin::Started);
        Ok((found, session))
    }

    async fn complete_idempotent(&self, completion: &IdempotencyCompletion) -> StorageResult<()> {
        self.write(vec![plan::store_response(
            completion,
            to_millis(Utc::now()),
        )])
        .await?;
        Ok(())
    }

    async fn abandon_idempotent(&self, scope: &IdempotencyScope) -> StorageResult<()> {
        self.write(vec![plan::abandon_idempotent(scope)]).await?;
        Ok(())
    }

    async fn purge_expired(&self, before: DateTime<Utc>) -> StorageResult<u64> {
        self.write_counted(plan::purge(to_millis(before)).into())
            .await
    }
}

#[async_trait]
impl<E> ClosureStore for E
where
    E: Engine + SandboxCheckouts,
    for<'c> &'c mut <E::Db as Database>::Connection: Executor<'c, Database = E::Db>,
{
    async fn schedule_checkout_closures(
        &self,
        session: &PaymentSessionId,
        checkouts: &[ProviderSessionId],
    ) -> StorageResult<()> {
        self.write(plan::closures(session, checkouts, to_millis(Utc::now())).collect())
            .await?;
        self.wakeups().checkouts_scheduled();
        Ok(())
    }

    async fn due_checkout_closures(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<CheckoutClosure>> {
        reads::due_checkout_closures(self.reader(), now, limit).await
    }

    async fn checkouts_to_close(&self) {
        self.wakeups().checkouts_to_close().await;
    }

    async fn checkout_closed(&self, checkout: &ProviderSessionId) -> StorageResult<()> {
        self.write(vec![plan::checkout_closed(checkout)]).await?;
        Ok(())
    }

    async fn checkout_close_failed(
        &self,
        checkout: &ProviderSessionId,
        retry_at: DateTime<Utc>,
        error: &str,
    ) -> StorageResult<()> {
        let failed = plan::checkout_close_failed(checkout, to_millis(retry_at), error);
        self.write(vec![failed]).await?;
        Ok(())
    }
}

#[async_trait]
impl<E> DeadLetterStore for E
where
    E: Engine + SandboxCheckouts,
    for<'c> &'c mut <E::Db as Database>::Connection: Executor<'c, Database = E::Db>,
{
    async fn dead_letters(&self, page: Page) -> StorageResult<Paged<DeadLetter>> {
        reads::dead_letters(self.reader(), page).await
    }

    async fn dead_letter(&self, id: DeadLetterId) -> StorageResult<Option<DeadLetter>> {
        reads::dead_letter(self.reader(), id).await
    }
}

#[async_trait]
impl<E> DuplicateStore for E
where
    E: Engine + SandboxCheckouts,
    for<'c> &'c mut <E::Db as Database>::Connection: Executor<'c, Database = E::Db>,
{
    async fn refund_owed(&self) {
        self.wakeups().refund_owed().await;
    }

    async fn duplicate_payments(&self, page: Page) -> StorageResult<Paged<DuplicatePayment>> {
        reads::duplicate_payments(self.reader(), page).await
    }

    async fn duplicate_payment(
        &self,
        session_id: &PaymentSessionId,
        attempt: AttemptNumber,
    ) -> StorageResult<Option<DuplicatePayment>> {
        reads::duplicate_payment(self.reader(), session_id, attempt).await
    }

    async fn duplicate_payment_by_intent(
        &self,
        payment_intent: &str,
    ) -> StorageResult<Option<DuplicatePayment>> {
        reads::duplicate_payment_by_intent(self.reader(), payment_intent).await
    }

    async fn duplicate_refunds_owed(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<DuplicatePayment>> {
        reads::duplicate_refunds_owed(self.reader(), before, limit).await
    }

    async fn claim_duplicate_refund(
        &self,
        session_id: &PaymentSessionId,
        attempt: AttemptNumber,
        before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StorageResult<bool> {
        let claim = plan::claim_refund(session_id, attempt, to_millis(before), to_millis(now));
        Ok(self.write(vec![claim]).await? == Committed::Applied)
    }

    async fn settle_duplicate_refund(
        &self,
        session_id: &PaymentSessionId,
        attempt: AttemptNumber,
        settlement: &RefundSettlement,
        audit: Option<&NewAuditEntry>,
        event_id: Option<&str>,
    ) -> StorageResult<bool> {
        let now = to_millis(Utc::now());
        let writes = plan::settle_refund(session_id, attempt, settlement, audit, event_id, now);
        Ok(self.write(writes).await? == Committed::Applied)
    }
}

#[async_trait]
impl<E> WebhookOutbox for E
where
    E: Engine + SandboxCheckouts,
    for<'c> &'c mut <E::Db as Database>::Connection: Executor<'c, Database = E::Db>,
{
    async fn claim_webhook_deliveries(
        &self,
        max: u32,
        lease: Duration,
    ) -> StorageResult<Vec<LeasedDelivery>> {
        let now = to_millis(Utc::now());
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
        self.claim_webhooks(now, now + lease_ms, max).await
    }

    async fn settle_webhook_delivery(
        &self,
        delivery: &LeasedDelivery,
        outcome: &DeliveryOutcome,
    ) -> StorageResult<bool> {
        let settle = plan::settle_delivery(delivery, outcome, to_millis(Utc::now()));
        Ok(self.write(vec![settle]).await? == Committed::Applied)
    }

    async fn next_webhook_due(&self) -> StorageResult<Option<DateTime<Utc>>> {
        reads::next_webhook_due(self.reader()).await
    }

    async fn webhooks_written(&self) {
        self.wakeups().webhooks_written().await;
    }

    async fn webhook_deliveries(
        &self,
        filter: &DeliveryFilter,
        page: Page,
    ) -> StorageResult<Paged<WebhookDelivery>> {
        reads::webhook_deliveries(self.reader(), filter, page).await
    }

    async fn webhook_delivery(&self, id: DeliveryId) -> StorageResult<Option<WebhookDelivery>> {
        reads::webhook_delivery(self.reader(), id).await
    }

    async fn redeliver_webhook(&self, id: DeliveryId) -> StorageResult<Redelivery> {
        let queued = self
            .write(vec![plan::redeliver(id, to_millis(Utc::now()))])
            .await?;
        if queued == Committed::Applied {
            self.wakeups().webhooks_queued();
            return Ok(Redelivery::Queued);
        }
        Ok(match reads::webhook_delivery(self.reader(), id).await? {
            Some(_) => Redelivery::AlreadyPending,
            None => Redelivery::NotFound,
        })
    }
}

#[async_trait]
impl<E> ConsoleReads for E
where
    E: Engine + SandboxCheckouts,
    for<'c> &'c mut <E::Db as Database>::Connection: Executor<'c, Database = E::Db>,
{
    async fn sessions(
        &self,
        filter: &SessionFilter,
        page: &SessionPage,
    ) -> StorageResult<Paged<SessionRecord, SessionKey>> {
        reads::sessions(self.reader(), filter, page).await
    }

    async fn retry_funnel(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StorageResult<Vec<FunnelRow>> {
        reads::retry_funnel(self.reader(), since, until).await
    }
}

#[async_trait]
impl<E> SecretStore for E
where
    E: Engine + SandboxCheckouts,
    for<'c> &'c mut <E::Db as Database>::Connection: Executor<'c, Database = E::Db>,
{
    async fn service_secret(
        &self,
        name: &str,
        generate: &(dyn Fn() -> String + Sync),
    ) -> StorageResult<String> {
        // On PostgreSQL a concurrent first insert of the same name makes this one wait for
        // its commit, so the read below sees whichever value was stored first.
        self.write(vec![plan::first_secret(name, generate())])
            .await?;
        reads::secret(self.reader(), name)
            .await?
            .ok_or_else(|| corrupt(format!("service secret {name} vanished")))
    }
}

#[async_trait]
impl<E> Storage for E
where
    E: Engine + SandboxCheckouts,
    for<'c> &'c mut <E::Db as Database>::Connection: Executor<'c, Database = E::Db>,
{
    async fn migrate(&self) -> StorageResult<()> {
        self.run_migrations().await
    }

    async fn ping(&self) -> StorageResult<()> {
        execute(self.reader(), Write::new("SELECT 1", [])).await?;
        Ok(())
    }
}

/// Puts a delivered job back, due after `delay`, if the delivery still holds it.
async fn put_back<E: Engine>(
    engine: &E,
    delivery: &Delivery,
    error: &str,
    delay: Duration,
    delivered: plan::Delivered,
) -> QueueResult<()> {
    let run_at = to_millis(Utc::now()) + i64::try_from(delay.as_millis()).unwrap_or(0);
    engine
        .write(vec![plan::release_job(
            &delivery.receipt,
            run_at,
            error,
            delivered,
        )?])
        .await?;
    Ok(())
}

/// The embedded queue: the outbox table itself, claimed with a lease.
#[async_trait]
impl<E> JobQueue for E
where
    E: Engine + SandboxCheckouts,
    for<'c> &'c mut <E::Db as Database>::Connection: Executor<'c, Database = E::Db>,
{
    async fn receive(&self, max: u32, lease: Duration) -> QueueResult<Vec<Delivery>> {
        Ok(self.claim_jobs(max, lease, true).await?)
    }

    fn settles_in_transition(&self) -> bool {
        true
    }

    async fn ack(&self, delivery: &Delivery) -> QueueResult<()> {
        self.write(vec![plan::delete_delivered_job(&delivery.receipt)?])
            .await?;
        Ok(())
    }

    async fn release(&self, delivery: &Delivery, error: &str, delay: Duration) -> QueueResult<()> {
        put_back(self, delivery, error, delay, plan::Delivered::Counted).await
    }

    async fn postpone(
        &self,
        delivery: &Delivery,
        reason: &str,
        delay: Duration,
    ) -> QueueResult<()> {
        put_back(self, delivery, reason, delay, plan::Delivered::Uncounted).await
    }

    async fn extend(&self, _delivery: &Delivery, _lease: Duration) -> QueueResult<()> {
        // The lease token is the lease's end, so it cannot move without invalidating the
        // receipt. The embedded lease (see `WorkerSettings::lease`) is sized above the
        // provider's worst case instead.
        Ok(())
    }

    async fn defer(&self, delivery: &Delivery) -> QueueResult<()> {
        let remaining = (delivery.job.scheduled_for - Utc::now())
            .to_std()
            .unwrap_or_default();
        self.release(delivery, "not due yet", remaining).await
    }

    async fn ping(&self) -> QueueResult<()> {
        Ok(Storage::ping(self).await?)
    }

    async fn next_due(&self) -> QueueResult<Option<DateTime<Utc>>> {
        Ok(reads::next_due(self.reader()).await?)
    }

    async fn enqueued(&self) {
        self.wakeups().job_due_soon().await;
    }
}

/// The sandbox provider's checkouts, kept in the database so every process on it sees them.
#[async_trait]
impl<E> SandboxCheckouts for E
where
    E: Engine,
    for<'c> &'c mut <E::Db as Database>::Connection: Executor<'c, Database = E::Db>,
{
    async fn put_sandbox_checkout(&self, c: &SandboxCheckout) -> SandboxCheckoutResult<()> {
        self.write(vec![plan::put_sandbox_checkout(c, to_millis(Utc::now()))])
            .await?;
        Ok(())
    }

    async fn sandbox_checkout(
        &self,
        id: &ProviderSessionId,
    ) -> SandboxCheckoutResult<Option<SandboxCheckout>> {
        Ok(reads::sandbox_checkout(self.reader(), id).await?)
    }

    async fn set_sandbox_checkout_status(
        &self,
        id: &ProviderSessionId,
        from: SandboxCheckoutStatus,
        to: SandboxCheckoutStatus,
    ) -> SandboxCheckoutResult<bool> {
        let moved = self
            .write(vec![plan::sandbox_checkout_status(id, from, to)])
            .await?;
        Ok(moved == Committed::Applied)
    }
}
