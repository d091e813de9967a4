//! SQLite storage: the embedded default. One file, WAL with `synchronous=FULL` so a commit
//! survives power loss. All writes go through a single-connection writer pool that opens
//! transactions with `BEGIN IMMEDIATE`: SQLite has one writer anyway, and queueing writers
//! in-process avoids `SQLITE_BUSY` reaching a caller. Reads use a separate pool.

use super::engine::Engine;
use super::sql::{self, Write};
use super::*;
use super::{reads, rows};
use crate::queue::{Delivery, Outbox, QueueResult};
use crate::telemetry::analytics::{AnalyticsResult, AnalyticsRow};
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
impl Engine for SqliteStorage {
    type Db = Sqlite;

    fn reader(&self) -> &sqlx::Pool<Sqlite> {
        &self.reader
    }

    fn latest(&self) -> &sqlx::Pool<Sqlite> {
        &self.writer
    }

    fn wakeups(&self) -> &Wakeups {
        &self.wakeups
    }

    async fn write(&self, writes: Vec<Write>) -> StorageResult<Committed> {
        let mut tx = self.begin_write().await?;
        let committed = sql::apply::<Sqlite>(&mut tx, &writes).await?;
        if committed == Committed::Applied {
            tx.commit().await?;
        }
        Ok(committed)
    }

    async fn run_migrations(&self) -> StorageResult<()> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.writer)
            .await?;
        Ok(())
    }

    async fn claim_key(
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

    async fn find_key(
        &self,
        scope: &IdempotencyScope,
        now: DateTime<Utc>,
    ) -> StorageResult<IdempotencyBegin> {
        let existing = idempotency_record(&self.reader, scope).await?;
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

#[async_trait]
impl Outbox for SqliteStorage {
    async fn claim_outbox(&self, max: u32, lease: Duration) -> QueueResult<Vec<Delivery>> {
        Ok(self.claim_jobs(max, lease, false).await?)
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
