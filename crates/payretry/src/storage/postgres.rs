//! PostgreSQL storage: for running several API and worker processes on one database.
//!
//! The behaviour is the SQLite backend's (`sqlite.rs`), statement for statement, and the
//! storage conformance suite (`tests/integration/storage_conformance.rs`) runs the same
//! tests against both. What differs is how exclusivity is obtained: SQLite has one writer, so every
//! write transaction is serial; PostgreSQL runs them concurrently at READ COMMITTED and
//! relies on row locks instead:
//!
//! - a transition's compare-and-set `UPDATE … WHERE version = $n` blocks on a concurrent
//!   writer of the same row and then re-checks `version` against the committed row, so the
//!   second writer gets [`Committed::Conflict`];
//! - the webhook event id is inserted first with `ON CONFLICT DO NOTHING`, which waits for
//!   a concurrent insert of the same id to commit or roll back, so an event is applied once;
//! - an idempotency key is claimed by insert-or-lock (`ON CONFLICT DO NOTHING`, then
//!   `SELECT … FOR UPDATE`), so two concurrent begins of one key cannot both start;
//! - queue claims lock the rows they take with `FOR UPDATE SKIP LOCKED`, so concurrent
//!   receivers (in any process) take disjoint jobs without waiting on each other; an
//!   outbox relay ([`Outbox`]) claims with the same statement, minus the due-time bound.
//!
//! Like SQLite's, `analytics_batch` reads without claiming, so relays in two processes may
//! send one event twice; Segment drops the repeat by its stable `messageId`.
//!
//! Timestamps are the application's clock (`Utc::now()`), as with SQLite, not the
//! database's: the processes sharing a database are expected to run NTP-synchronised.

use super::sql::{self, Write};
use super::*;
use super::{plan, reads, rows};
use crate::provider::sandbox::{
    SandboxCheckout, SandboxCheckoutResult, SandboxCheckoutStatus, SandboxCheckouts,
};
use crate::queue::{Delivery, JobQueue, Outbox, QueueResult};
use crate::telemetry::analytics::{AnalyticsResult, AnalyticsRow};
use payretry_domain::DeadLetterId;
use sqlx::Postgres;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;

/// The pool size to use when none is configured. Throughput on the project's machines
/// stops growing at about 16 connections and falls beyond, as backends contend for CPU and
/// locks; more callers than that queue in the pool instead.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;

/// How long a caller waits for a free pooled connection before the operation fails (and,
/// for example, `/readyz` reports the database as unavailable).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct PostgresStorage {
    pool: PgPool,
    /// Wakes this process's worker, outbox relay and analytics relay after a commit. Jobs
    /// enqueued by other processes are found by the worker's idle poll.
    wakeups: Wakeups,
}

impl PostgresStorage {
    /// Runs `writes` in one write transaction and commits it when every write went through;
    /// otherwise drops it (rolling back) and answers what stopped it.
    async fn write(&self, writes: &[Write]) -> StorageResult<Committed> {
        let mut tx = self.pool.begin().await?;
        let committed = sql::apply::<Postgres>(&mut tx, writes).await?;
        if committed == Committed::Applied {
            tx.commit().await?;
        }
        Ok(committed)
    }

    /// Connects to the database at `url` (`postgres://user@host:port/db`) with a pool of at
    /// most `max_connections` (see [`DEFAULT_MAX_CONNECTIONS`]). The database must exist;
    /// [`Storage::migrate`] creates the tables.
    pub async fn connect(url: &str, max_connections: u32) -> StorageResult<Self> {
        Self::connect_with(PgConnectOptions::from_str(url)?, max_connections).await
    }

    /// Like [`PostgresStorage::connect`], with options built in code.
    pub async fn connect_with(
        options: PgConnectOptions,
        max_connections: u32,
    ) -> StorageResult<Self> {
        // Named in pg_stat_activity, unless the URL names it already.
        let options = match options.get_application_name() {
            Some(_) => options,
            None => options.application_name("payretry"),
        };
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(Self {
            pool,
            wakeups: Wakeups::default(),
        })
    }
}

/// The idempotency record of `scope`, if any (`FOR UPDATE` when `lock`).
async fn idempotency_record(
    conn: &mut sqlx::PgConnection,
    scope: &IdempotencyScope,
    lock: bool,
) -> StorageResult<Option<IdempotencyRecord>> {
    let lock = if lock { " FOR UPDATE" } else { "" };
    let sql = format!("{IDEMPOTENCY_COLUMNS} WHERE caller = $1 AND idempotency_key = $2{lock}");
    // Planned afresh each time (not a cached prepared statement): the table starts empty
    // after a deploy and grows by one row per request, and a plan cached while it was empty
    // is a sequential scan that each connection would keep running on the grown table until
    // the next autovacuum ANALYZE (`payretry-bench` saw 4 605 scans reading 46 M rows in a
    // 20-second run).
    sqlx::query_as::<_, IdempotencyColumns>(sqlx::AssertSqlSafe(sql))
        .persistent(false)
        .bind(scope.caller.as_str())
        .bind(&scope.key)
        .fetch_optional(conn)
        .await?
        .map(IdempotencyRecord::from_columns)
        .transpose()
}

#[async_trait]
impl Storage for PostgresStorage {
    async fn migrate(&self) -> StorageResult<()> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> StorageResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn insert_session(&self, s: NewSession) -> StorageResult<()> {
        self.write(&plan::new_session(&s)).await?;
        Ok(())
    }

    async fn session(&self, id: &PaymentSessionId) -> StorageResult<Option<SessionRecord>> {
        reads::session(&self.pool, id).await
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
        reads::audit_log(&self.pool, id, page).await
    }

    async fn sessions_past_window(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<SessionRecord>> {
        reads::sessions_past_window(&self.pool, now, limit).await
    }

    async fn next_window_end(&self) -> StorageResult<Option<DateTime<Utc>>> {
        reads::next_window_end(&self.pool).await
    }

    async fn begin_idempotent(
        &self,
        scope: &IdempotencyScope,
        now: DateTime<Utc>,
    ) -> StorageResult<IdempotencyBegin> {
        let now = to_millis(now);
        let mut tx = self.pool.begin().await?;
        // A new key: claimed by this insert. A concurrent insert of the same key waits here
        // until the first commits, then inserts nothing and reads the first one's claim.
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (caller, idempotency_key, fingerprint, locked_at, created_at)
             VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (caller, idempotency_key) DO NOTHING",
        )
        .bind(scope.caller.as_str())
        .bind(&scope.key)
        .bind(&scope.fingerprint)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 1 {
            tx.commit().await?;
            return Ok(IdempotencyBegin::Started);
        }
        // A known key: lock its row so that of two requests taking over an expired or
        // abandoned claim, the second sees the first's fresh claim (InFlight).
        let existing = idempotency_record(&mut tx, scope, true).await?;
        if let Some(verdict) = existing.and_then(|e| e.verdict(&scope.fingerprint, now)) {
            return Ok(verdict);
        }
        // Expired, abandoned, or deleted since the insert above: claim it afresh.
        sqlx::query(
            "INSERT INTO idempotency_keys (caller, idempotency_key, fingerprint, locked_at, created_at)
             VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (caller, idempotency_key) DO UPDATE SET
                fingerprint = excluded.fingerprint, response_status = NULL,
                response_body = NULL, locked_at = excluded.locked_at,
                created_at = excluded.created_at",
        )
        .bind(scope.caller.as_str())
        .bind(&scope.key)
        .bind(&scope.fingerprint)
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
        let mut conn = self.pool.acquire().await?;
        let existing = idempotency_record(&mut conn, scope, false).await?;
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
        reads::due_checkout_closures(&self.pool, now, limit).await
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
        let keys = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        let events = sqlx::query("DELETE FROM processed_webhook_events WHERE processed_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(keys.rows_affected() + events.rows_affected())
    }

    async fn dead_letters(&self, page: Page) -> StorageResult<Paged<DeadLetter>> {
        reads::dead_letters(&self.pool, page).await
    }

    async fn dead_letter(&self, id: DeadLetterId) -> StorageResult<Option<DeadLetter>> {
        reads::dead_letter(&self.pool, id).await
    }

    async fn service_secret(
        &self,
        name: &str,
        generate: &(dyn Fn() -> String + Sync),
    ) -> StorageResult<String> {
        // On PostgreSQL a concurrent first insert of the same name makes this one wait for
        // its commit, so the read below sees whichever value was stored first.
        self.write(&[plan::first_secret(name, generate())]).await?;
        reads::secret(&self.pool, name)
            .await?
            .ok_or_else(|| corrupt(format!("service secret {name} vanished")))
    }

    async fn refund_owed(&self) {
        self.wakeups.refund_owed().await;
    }

    async fn duplicate_payments(&self, page: Page) -> StorageResult<Paged<DuplicatePayment>> {
        reads::duplicate_payments(&self.pool, page).await
    }

    async fn duplicate_payment(
        &self,
        session_id: &PaymentSessionId,
        attempt: AttemptNumber,
    ) -> StorageResult<Option<DuplicatePayment>> {
        reads::duplicate_payment(&self.pool, session_id, attempt).await
    }

    async fn duplicate_payment_by_intent(
        &self,
        payment_intent: &str,
    ) -> StorageResult<Option<DuplicatePayment>> {
        reads::duplicate_payment_by_intent(&self.pool, payment_intent).await
    }

    async fn duplicate_refunds_owed(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<DuplicatePayment>> {
        reads::duplicate_refunds_owed(&self.pool, before, limit).await
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
        reads::checkout_attempt(&self.pool, session, checkout).await
    }
}

impl PostgresStorage {
    /// Runs `sql` over the `(id, lease)` pairs of `deliveries`, bound as two arrays.
    async fn settle_outbox(&self, sql: &'static str, deliveries: &[Delivery]) -> StorageResult<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let (ids, leases) = parse_receipts(deliveries)?;
        sqlx::query(sql)
            .bind(ids)
            .bind(leases)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// The embedded queue: the outbox table itself, claimed with a lease, as with SQLite.
#[async_trait]
impl JobQueue for PostgresStorage {
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
        sqlx::query(
            "UPDATE retry_jobs SET run_at = $1, locked_until = NULL, last_error = $2
             WHERE id = $3 AND locked_until = $4",
        )
        .bind(run_at)
        .bind(error)
        .bind(id)
        .bind(lease)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn extend(&self, _delivery: &Delivery, _lease: Duration) -> QueueResult<()> {
        // As with SQLite: the lease token is the lease's end, so it cannot move without
        // invalidating the receipt; the embedded lease is sized above the provider's worst
        // case instead.
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
        // run_at). Two indexed lookups instead of a scan of the whole table; LEAST ignores
        // NULLs.
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT LEAST(
                (SELECT MIN(run_at) FROM retry_jobs WHERE locked_until IS NULL),
                (SELECT MIN(locked_until) FROM retry_jobs WHERE locked_until IS NOT NULL))",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(opt_time(next)?)
    }

    async fn enqueued(&self) {
        self.wakeups.job_due_soon().await;
    }
}

impl PostgresStorage {
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
        // One statement, so a claim is atomic without an explicit transaction. `SKIP LOCKED`
        // passes over rows another receiver is claiming right now instead of waiting for
        // it. The claim is a CTE rather than `WHERE id IN (SELECT … LIMIT)`: a CTE with a
        // locking clause is evaluated exactly once, whereas a subquery may be re-scanned by
        // the plan, and with SKIP LOCKED each scan can lock different rows (more than `max`).
        let claimed = sqlx::query(
            "WITH claimed AS (
                SELECT id FROM retry_jobs
                WHERE run_at <= $2 AND (locked_until IS NULL OR locked_until <= $3)
                ORDER BY run_at LIMIT $4
                FOR UPDATE SKIP LOCKED)
             UPDATE retry_jobs SET locked_until = $1, receive_count = receive_count + 1
             FROM claimed WHERE retry_jobs.id = claimed.id
             RETURNING retry_jobs.id, retry_jobs.payload, retry_jobs.receive_count",
        )
        .bind(locked_until)
        .bind(due_before)
        .bind(now)
        .bind(i64::from(max))
        .fetch_all(&self.pool)
        .await?;
        claimed
            .iter()
            .map(|row| rows::delivery(row, locked_until))
            .collect()
    }
}

/// The outbox seen from a relay to an external queue (SQS): the same table and leases.
#[async_trait]
impl Outbox for PostgresStorage {
    async fn claim_outbox(&self, max: u32, lease: Duration) -> QueueResult<Vec<Delivery>> {
        Ok(self.claim(max, lease, false).await?)
    }

    async fn delete_outbox(&self, deliveries: &[Delivery]) -> QueueResult<()> {
        Ok(self
            .settle_outbox(
                "DELETE FROM retry_jobs WHERE (id, locked_until) IN (
                SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[]))",
                deliveries,
            )
            .await?)
    }

    async fn release_outbox(&self, deliveries: &[Delivery]) -> QueueResult<()> {
        Ok(self
            .settle_outbox(
                "UPDATE retry_jobs SET locked_until = NULL WHERE (id, locked_until) IN (
                SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[]))",
                deliveries,
            )
            .await?)
    }

    async fn outbox_written(&self) {
        self.wakeups.outbox_written().await
    }
}

#[async_trait]
impl AnalyticsOutbox for PostgresStorage {
    async fn analytics_batch(&self, limit: u32) -> AnalyticsResult<Vec<AnalyticsRow>> {
        Ok(reads::analytics_batch(&self.pool, Utc::now(), limit).await?)
    }

    async fn analytics_delivered(&self, ids: &[i64]) -> AnalyticsResult<()> {
        sqlx::query("DELETE FROM analytics_events WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn analytics_park(&self, ids: &[i64], error: &str) -> AnalyticsResult<()> {
        // Due "never" (i64::MAX), as with SQLite: kept for review, skipped by the relay.
        sqlx::query(
            "UPDATE analytics_events SET next_attempt_at = $1, attempts = attempts + 1,
                last_error = $2 WHERE id = ANY($3)",
        )
        .bind(i64::MAX)
        .bind(error)
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn analytics_enqueued(&self) {
        self.wakeups.analytics_written().await;
    }
}

#[async_trait]
impl SandboxCheckouts for PostgresStorage {
    async fn put_sandbox_checkout(&self, c: &SandboxCheckout) -> SandboxCheckoutResult<()> {
        self.write(&[plan::put_sandbox_checkout(c, to_millis(Utc::now()))])
            .await?;
        Ok(())
    }

    async fn sandbox_checkout(
        &self,
        id: &ProviderSessionId,
    ) -> SandboxCheckoutResult<Option<SandboxCheckout>> {
        Ok(reads::sandbox_checkout(&self.pool, id).await?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_round_trip() {
        assert_eq!(
            parse_receipt("42:1700000000000").unwrap(),
            (42, 1700000000000)
        );
        assert!(parse_receipt("42").is_err());
    }
}
