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

use super::engine::Engine;
use super::one_statement;
use super::sql::{self, Backend, Write};
use super::*;
use super::{reads, rows};
use crate::provider::budget::{Reserved, Schedule, ScheduleChange, ScheduleStore};
use crate::queue::{Delivery, Outbox, QueueResult};
use crate::telemetry::analytics::{AnalyticsResult, AnalyticsRow};
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
        // Every statement payretry runs is an index lookup by design, and each is prepared
        // once per connection. PostgreSQL may cache a generic plan made while a table was
        // nearly empty (after a deploy: `idempotency_keys`), a sequential scan that the
        // connection then keeps running on the grown table (`payretry-bench` saw 4 605 scans
        // reading 46 M rows in 20 s). With scans priced out, that plan is never chosen while an
        // index exists, and no statement has to be planned afresh each time (replanning the
        // retry's read cost about 10 % of PostgreSQL's CPU per retry: BENCHMARKS.md).
        let options = options.options([("enable_seqscan", "off")]);
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
    sqlx::query_as::<_, IdempotencyColumns>(sqlx::AssertSqlSafe(sql))
        .bind(scope.caller.as_str())
        .bind(&scope.key)
        .fetch_optional(conn)
        .await?
        .map(IdempotencyRecord::from_columns)
        .transpose()
}

#[async_trait]
impl Engine for PostgresStorage {
    type Db = Postgres;

    fn reader(&self) -> &sqlx::Pool<Postgres> {
        &self.pool
    }

    fn wakeups(&self) -> &Wakeups {
        &self.wakeups
    }

    /// One round trip: a single write as itself, several as one statement
    /// ([`one_statement`]), which commits or rolls back whole.
    async fn write(&self, writes: Vec<Write>) -> StorageResult<Committed> {
        match writes.as_slice() {
            [] => Ok(Committed::Applied),
            [write] => {
                if sql::execute(&self.pool, write).await? == 0
                    && let Some(outcome) = write.if_none.missed()?
                {
                    return Ok(outcome);
                }
                Ok(Committed::Applied)
            }
            writes => {
                let statement = one_statement::combine(writes);
                let query = Postgres::query_owned(statement.sql, &statement.args);
                match query.execute(&self.pool).await {
                    Ok(_) => Ok(Committed::Applied),
                    Err(error) => match one_statement::stopped(&error) {
                        Some(outcome) => outcome,
                        None => Err(error.into()),
                    },
                }
            }
        }
    }

    async fn write_counted(&self, writes: Vec<Write>) -> StorageResult<u64> {
        let mut touched = 0;
        for write in &writes {
            touched += sql::execute(&self.pool, write).await?;
        }
        Ok(touched)
    }

    async fn run_migrations(&self) -> StorageResult<()> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    async fn claim_key(
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

    async fn find_key(
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

    async fn claim_jobs(
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
             UPDATE retry_jobs SET locked_until = $1, receive_count = receive_count + 1,
                first_delivered_at = COALESCE(first_delivered_at, $3)
             FROM claimed WHERE retry_jobs.id = claimed.id
             RETURNING retry_jobs.id, retry_jobs.payload, retry_jobs.receive_count,
                retry_jobs.first_delivered_at",
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

    async fn claim_webhooks(
        &self,
        now: i64,
        lease_end: i64,
        max: u32,
    ) -> StorageResult<Vec<LeasedDelivery>> {
        // As `claim_jobs`: one statement, a CTE locked with SKIP LOCKED, so relays in other
        // processes take other rows without waiting.
        let claimed = sqlx::query(
            "WITH claimed AS (
                SELECT id FROM webhook_deliveries
                WHERE status = 'pending' AND next_attempt_at <= $2
                ORDER BY next_attempt_at LIMIT $3
                FOR UPDATE SKIP LOCKED)
             UPDATE webhook_deliveries SET next_attempt_at = $1
             FROM claimed WHERE webhook_deliveries.id = claimed.id
             RETURNING webhook_deliveries.id, event_id, body, attempts, redelivery, created_at,
                next_attempt_at",
        )
        .bind(lease_end)
        .bind(now)
        .bind(i64::from(max))
        .fetch_all(&self.pool)
        .await?;
        claimed.iter().map(rows::leased_delivery).collect()
    }
}

/// The shared provider budget's schedule: one row per provider, changed under its lock in a
/// short transaction (insert-if-missing, read for update, write) per call to the provider.
#[async_trait]
impl ScheduleStore for PostgresStorage {
    async fn apply_to_schedule(
        &self,
        name: &str,
        fresh: Schedule,
        change: ScheduleChange,
        now: Duration,
    ) -> Result<Reserved, Box<dyn std::error::Error + Send + Sync>> {
        let micros = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        let from_micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
        let mut tx = self.pool.begin().await?;
        // Created by the first call of the deployment; a concurrent first call waits here.
        sqlx::query(
            "INSERT INTO provider_schedules
                (name, max_rate, rate, next_slot_us, paused_until_us, rate_since_us)
             VALUES ($1, $2, $2, $3, $3, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(fresh.max_rate)
        .bind(micros(now))
        .execute(&mut *tx)
        .await?;
        let (rate, next_slot, paused_until, rate_since): (f64, i64, i64, i64) = sqlx::query_as(
            "SELECT rate, next_slot_us, paused_until_us, rate_since_us
             FROM provider_schedules WHERE name = $1 FOR UPDATE",
        )
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
        // This process's configured rate is the deployment's (they share one setting).
        let mut schedule = Schedule {
            max_rate: fresh.max_rate,
            rate: rate.min(fresh.max_rate),
            next_slot: from_micros(next_slot),
            paused_until: from_micros(paused_until),
            rate_since: from_micros(rate_since),
        };
        let at = schedule.apply(change, now);
        sqlx::query(
            "UPDATE provider_schedules SET max_rate = $2, rate = $3, next_slot_us = $4,
                paused_until_us = $5, rate_since_us = $6
             WHERE name = $1",
        )
        .bind(name)
        .bind(schedule.max_rate)
        .bind(schedule.rate)
        .bind(micros(schedule.next_slot))
        .bind(micros(schedule.paused_until))
        .bind(micros(schedule.rate_since))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(at)
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

#[async_trait]
impl Outbox for PostgresStorage {
    async fn claim_outbox(&self, max: u32, lease: Duration) -> QueueResult<Vec<Delivery>> {
        Ok(self.claim_jobs(max, lease, false).await?)
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
