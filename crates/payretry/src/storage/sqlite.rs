//! SQLite storage: the embedded default. One file, WAL with `synchronous=FULL` so a commit
//! survives power loss. All writes go through a single-connection writer pool that opens
//! transactions with `BEGIN IMMEDIATE`: SQLite has one writer anyway, and queueing writers
//! in-process avoids `SQLITE_BUSY` reaching a caller. Reads use a separate pool.

use super::sql::{self, Write};
use super::*;
use super::{plan, reads, rows};
use crate::provider::sandbox::{
    SandboxCheckout, SandboxCheckoutResult, SandboxCheckoutStatus, SandboxCheckouts,
};
use crate::queue::{Delivery, JobQueue, Outbox, QueueResult};
use crate::telemetry::analytics::{AnalyticsResult, AnalyticsRow};
use payretry_domain::DeadLetterId;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

pub struct SqliteStorage {
    writer: SqlitePool,
    reader: SqlitePool,
    /// Wakes this process's worker, outbox relay and analytics relay after a commit. Jobs
    /// enqueued by other processes are found by the worker's idle poll.
    wakeups: Wakeups,
}

impl SqliteStorage {
    /// Opens (creating if missing) the database at `url` (`sqlite://path`).
    pub async fn connect(url: &str) -> StorageResult<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        Ok(Self {
            writer,
            reader,
            wakeups: Wakeups::default(),
        })
    }

    async fn begin_write(&self) -> StorageResult<Transaction<'static, Sqlite>> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Runs `writes` in one write transaction and commits it when every write went through;
    /// otherwise drops it (rolling back) and answers what stopped it.
    async fn write(&self, writes: &[Write]) -> StorageResult<Committed> {
        let mut tx = self.begin_write().await?;
        let committed = sql::apply::<Sqlite>(&mut tx, writes).await?;
        if committed == Committed::Applied {
            tx.commit().await?;
        }
        Ok(committed)
    }
}

/// The idempotency record of `scope`, if any.
async fn idempotency_record<'c>(
    conn: impl sqlx::SqliteExecutor<'c>,
    scope: &IdempotencyScope,
) -> StorageResult<Option<IdempotencyRecord>> {
    static SQL: LazyLock<String> =
        LazyLock::new(|| format!("{IDEMPOTENCY_COLUMNS} WHERE caller = ? AND idempotency_key = ?"));
    sqlx::query_as::<_, IdempotencyColumns>(SQL.as_str())
        .bind(scope.caller.as_str())
        .bind(&scope.key)
        .fetch_optional(conn)
        .await?
        .map(IdempotencyRecord::from_columns)
        .transpose()
}

#[async_trait]
impl Storage for SqliteStorage {
    async fn migrate(&self) -> StorageResult<()> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.writer)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> StorageResult<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn insert_session(&self, s: NewSession) -> StorageResult<()> {
        self.write(&plan::new_session(&s)).await?;
        Ok(())
    }

    async fn session(&self, id: &PaymentSessionId) -> StorageResult<Option<SessionRecord>> {
        reads::session(&self.reader, id).await
    }

    async fn commit(&self, t: Transition) -> StorageResult<Committed> {
        let committed = self
            .write(&plan::transition(&t, to_millis(Utc::now()))?)
            .await?;
        if committed == Committed::Applied {
            self.wakeups.committed(&t, Utc::now());
        }
        Ok(committed)
    }

    async fn audit_log(
        &self,
        id: &PaymentSessionId,
        page: Page,
    ) -> StorageResult<Paged<AuditEntry>> {
        reads::audit_log(&self.reader, id, page).await
    }

    async fn sessions_past_window(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<SessionRecord>> {
        reads::sessions_past_window(&self.reader, now, limit).await
    }

    async fn next_window_end(&self) -> StorageResult<Option<DateTime<Utc>>> {
        reads::next_window_end(&self.reader).await
    }

    async fn begin_idempotent(
        &self,
        scope: &IdempotencyScope,
        now: DateTime<Utc>,
    ) -> StorageResult<IdempotencyBegin> {
        let now = to_millis(now);
        let mut tx = self.begin_write().await?;
        let existing = idempotency_record(&mut *tx, scope).await?;
        if let Some(verdict) = existing.and_then(|e| e.verdict(&scope.fingerprint, now)) {
            return Ok(verdict);
        }
        sqlx::query(
            "INSERT INTO idempotency_keys (caller, idempotency_key, fingerprint, locked_at, created_at)
             VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (caller, idempotency_key) DO UPDATE SET
                fingerprint = excluded.fingerprint, response_status = NULL,
                response_body = NULL, locked_at = excluded.locked_at,
                created_at = excluded.created_at",
        )
        .bind(scope.caller.as_str())
        .bind(&scope.key)
        .bind(&scope.fingerprint)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(IdempotencyBegin::Started)
    }

    async fn lookup_idempotent(
        &self,
        scope: &IdempotencyScope,
        now: DateTime<Utc>,
    ) -> StorageResult<IdempotencyBegin> {
        let existing = idempotency_record(&self.reader, scope).await?;
        Ok(existing
            .and_then(|e| e.verdict(&scope.fingerprint, to_millis(now)))
            .unwrap_or(IdempotencyBegin::Started))
    }

    async fn complete_idempotent(&self, completion: &IdempotencyCompletion) -> StorageResult<()> {
        self.write(&[plan::store_response(completion, to_millis(Utc::now()))])
            .await?;
        Ok(())
    }

    async fn abandon_idempotent(&self, scope: &IdempotencyScope) -> StorageResult<()> {
        self.write(&[plan::abandon_idempotent(scope)]).await?;
        Ok(())
    }

    async fn schedule_checkout_closures(
        &self,
        session: &PaymentSessionId,
        checkouts: &[ProviderSessionId],
    ) -> StorageResult<()> {
        let writes: Vec<Write> =
            plan::closures(session, checkouts, to_millis(Utc::now())).collect();
        self.write(&writes).await?;
        self.wakeups.checkouts_scheduled();
        Ok(())
    }

    async fn checkouts_to_close(&self) {
        self.wakeups.checkouts_to_close().await;
    }

    async fn due_checkout_closures(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<CheckoutClosure>> {
        reads::due_checkout_closures(&self.reader, now, limit).await
    }

    async fn checkout_closed(&self, checkout: &ProviderSessionId) -> StorageResult<()> {
        self.write(&[plan::checkout_closed(checkout)]).await?;
        Ok(())
    }

    async fn checkout_close_failed(
        &self,
        checkout: &ProviderSessionId,
        retry_at: DateTime<Utc>,
        error: &str,
    ) -> StorageResult<()> {
        self.write(&[plan::checkout_close_failed(
            checkout,
            to_millis(retry_at),
            error,
        )])
        .await?;
        Ok(())
    }

    async fn purge_expired(&self, before: DateTime<Utc>) -> StorageResult<u64> {
        let before = to_millis(before);
        let keys = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < ?")
            .bind(before)
            .execute(&self.writer)
            .await?;
        let events = sqlx::query("DELETE FROM processed_webhook_events WHERE processed_at < ?")
            .bind(before)
            .execute(&self.writer)
            .await?;
        Ok(keys.rows_affected() + events.rows_affected())
    }

    async fn dead_letters(&self, page: Page) -> StorageResult<Paged<DeadLetter>> {
        reads::dead_letters(&self.reader, page).await
    }

    async fn dead_letter(&self, id: DeadLetterId) -> StorageResult<Option<DeadLetter>> {
        reads::dead_letter(&self.reader, id).await
    }

    async fn service_secret(
        &self,
        name: &str,
        generate: &(dyn Fn() -> String + Sync),
    ) -> StorageResult<String> {
        // On PostgreSQL a concurrent first insert of the same name makes this one wait for
        // its commit, so the read below sees whichever value was stored first.
        self.write(&[plan::first_secret(name, generate())]).await?;
        reads::secret(&self.writer, name)
            .await?
            .ok_or_else(|| corrupt(format!("service secret {name} vanished")))
    }

    async fn refund_owed(&self) {
        self.wakeups.refund_owed().await;
    }

    async fn duplicate_payments(&self, page: Page) -> StorageResult<Paged<DuplicatePayment>> {
        reads::duplicate_payments(&self.reader, page).await
    }

    async fn duplicate_payment(
        &self,
        session_id: &PaymentSessionId,
        attempt: AttemptNumber,
    ) -> StorageResult<Option<DuplicatePayment>> {
        reads::duplicate_payment(&self.reader, session_id, attempt).await
    }

    async fn duplicate_payment_by_intent(
        &self,
        payment_intent: &str,
    ) -> StorageResult<Option<DuplicatePayment>> {
        reads::duplicate_payment_by_intent(&self.reader, payment_intent).await
    }

    async fn duplicate_refunds_owed(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<DuplicatePayment>> {
        reads::duplicate_refunds_owed(&self.reader, before, limit).await
    }

    async fn claim_duplicate_refund(
        &self,
        session_id: &PaymentSessionId,
        attempt: AttemptNumber,
        before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StorageResult<bool> {
        let claim = plan::claim_refund(session_id, attempt, to_millis(before), to_millis(now));
        Ok(self.write(&[claim]).await? == Committed::Applied)
    }

    async fn settle_duplicate_refund(
        &self,
        session_id: &PaymentSessionId,
        attempt: AttemptNumber,
        settlement: &RefundSettlement,
        audit: Option<&NewAuditEntry>,
        event_id: Option<&str>,
    ) -> StorageResult<bool> {
        let writes = plan::settle_refund(
            session_id,
            attempt,
            settlement,
            audit,
            event_id,
            to_millis(Utc::now()),
        );
        Ok(self.write(&writes).await? == Committed::Applied)
    }

    async fn checkout_attempt(
        &self,
        session: &PaymentSessionId,
        checkout: &ProviderSessionId,
    ) -> StorageResult<Option<AttemptNumber>> {
        reads::checkout_attempt(&self.reader, session, checkout).await
    }
}

impl SqliteStorage {
    /// Runs `sql` over the `(id, lease)` pairs of `deliveries`, bound as one JSON array
    /// (`[[id, lease], …]`), in one write transaction.
    async fn settle_outbox(&self, sql: &'static str, deliveries: &[Delivery]) -> StorageResult<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let (ids, leases) = parse_receipts(deliveries)?;
        let pairs: Vec<[i64; 2]> = ids
            .into_iter()
            .zip(leases)
            .map(|(id, lease)| [id, lease])
            .collect();
        let pairs = serde_json::to_string(&pairs).map_err(corrupt)?;
        let mut tx = self.begin_write().await?;
        sqlx::query(sql).bind(pairs).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The embedded queue: the outbox table itself, claimed with a lease.
#[async_trait]
impl JobQueue for SqliteStorage {
    async fn receive(&self, max: u32, lease: Duration) -> QueueResult<Vec<Delivery>> {
        Ok(self.claim(max, lease, true).await?)
    }

    fn settles_in_transition(&self) -> bool {
        true
    }

    async fn ack(&self, delivery: &Delivery) -> QueueResult<()> {
        self.write(&[plan::delete_delivered_job(&delivery.receipt)?])
            .await?;
        Ok(())
    }

    async fn release(&self, delivery: &Delivery, error: &str, delay: Duration) -> QueueResult<()> {
        let (id, lease) = parse_receipt(&delivery.receipt)?;
        let run_at = to_millis(Utc::now()) + i64::try_from(delay.as_millis()).unwrap_or(0);
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE retry_jobs SET run_at = ?, locked_until = NULL, last_error = ?
             WHERE id = ? AND locked_until = ?",
        )
        .bind(run_at)
        .bind(error)
        .bind(id)
        .bind(lease)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
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
        // A leased job is next due when its lease runs out (a lease always ends after its
        // run_at). Two indexed lookups instead of a scan of the whole table.
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(t) FROM (
                SELECT MIN(run_at) AS t FROM retry_jobs WHERE locked_until IS NULL
                UNION ALL
                SELECT MIN(locked_until) AS t FROM retry_jobs WHERE locked_until IS NOT NULL)",
        )
        .fetch_one(&self.reader)
        .await?;
        Ok(opt_time(next)?)
    }

    async fn enqueued(&self) {
        self.wakeups.job_due_soon().await;
    }
}

impl SqliteStorage {
    /// Leases up to `max` jobs: only due ones for the embedded queue's consumers, any for
    /// an outbox relay (which hands the remaining delay to the external queue).
    async fn claim(
        &self,
        max: u32,
        lease: Duration,
        due_only: bool,
    ) -> StorageResult<Vec<Delivery>> {
        let now = to_millis(Utc::now());
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
        let locked_until = now + lease_ms;
        let due_before = if due_only { now } else { i64::MAX };
        let mut tx = self.begin_write().await?;
        let claimed = sqlx::query(
            "UPDATE retry_jobs SET locked_until = ?, receive_count = receive_count + 1
             WHERE id IN (
                SELECT id FROM retry_jobs
                WHERE run_at <= ? AND (locked_until IS NULL OR locked_until <= ?)
                ORDER BY run_at LIMIT ?)
             RETURNING id, payload, receive_count",
        )
        .bind(locked_until)
        .bind(due_before)
        .bind(now)
        .bind(i64::from(max))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        claimed
            .iter()
            .map(|row| rows::delivery(row, locked_until))
            .collect()
    }
}

#[async_trait]
impl Outbox for SqliteStorage {
    async fn claim_outbox(&self, max: u32, lease: Duration) -> QueueResult<Vec<Delivery>> {
        Ok(self.claim(max, lease, false).await?)
    }

    async fn delete_outbox(&self, deliveries: &[Delivery]) -> QueueResult<()> {
        Ok(self
            .settle_outbox(
                "DELETE FROM retry_jobs WHERE (id, locked_until) IN (
                SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))",
                deliveries,
            )
            .await?)
    }

    async fn release_outbox(&self, deliveries: &[Delivery]) -> QueueResult<()> {
        Ok(self
            .settle_outbox(
                "UPDATE retry_jobs SET locked_until = NULL WHERE (id, locked_until) IN (
                SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))",
                deliveries,
            )
            .await?)
    }

    async fn outbox_written(&self) {
        self.wakeups.outbox_written().await
    }
}

#[async_trait]
impl AnalyticsOutbox for SqliteStorage {
    async fn analytics_batch(&self, limit: u32) -> AnalyticsResult<Vec<AnalyticsRow>> {
        Ok(reads::analytics_batch(&self.reader, Utc::now(), limit).await?)
    }

    async fn analytics_delivered(&self, ids: &[i64]) -> AnalyticsResult<()> {
        let mut tx = self.begin_write().await?;
        for id in ids {
            sqlx::query("DELETE FROM analytics_events WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn analytics_park(&self, ids: &[i64], error: &str) -> AnalyticsResult<()> {
        let mut tx = self.begin_write().await?;
        for id in ids {
            sqlx::query(
                "UPDATE analytics_events SET next_attempt_at = ?, attempts = attempts + 1,
                    last_error = ? WHERE id = ?",
            )
            .bind(i64::MAX)
            .bind(error)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn analytics_enqueued(&self) {
        self.wakeups.analytics_written().await;
    }
}

#[async_trait]
impl SandboxCheckouts for SqliteStorage {
    async fn put_sandbox_checkout(&self, c: &SandboxCheckout) -> SandboxCheckoutResult<()> {
        self.write(&[plan::put_sandbox_checkout(c, to_millis(Utc::now()))])
            .await?;
        Ok(())
    }

    async fn sandbox_checkout(
        &self,
        id: &ProviderSessionId,
    ) -> SandboxCheckoutResult<Option<SandboxCheckout>> {
        Ok(reads::sandbox_checkout(&self.writer, id).await?)
    }

    async fn set_sandbox_checkout_status(
        &self,
        id: &ProviderSessionId,
        from: SandboxCheckoutStatus,
        to: SandboxCheckoutStatus,
    ) -> SandboxCheckoutResult<bool> {
        let moved = self
            .write(&[plan::sandbox_checkout_status(id, from, to)])
            .await?;
        Ok(moved == Committed::Applied)
    }
}
