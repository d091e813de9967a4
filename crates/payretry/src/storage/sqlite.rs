//! SQLite storage: the embedded default. One file, WAL with `synchronous=FULL` so a commit
//! survives power loss. Every write goes to one thread that owns the write connection and
//! commits what is waiting together ([`GroupCommit`]): SQLite has one writer anyway, queueing
//! writers in-process keeps `SQLITE_BUSY` from reaching a caller, and one fsync serves a
//! whole batch. Reads use a pool of their own.

use super::engine::Engine;
use super::group_commit::{self, GroupCommit};
use super::sql::{Columns, Write};
use super::*;
use super::{reads, rows};
use crate::queue::{Delivery, Outbox, QueueResult};
use crate::telemetry::analytics::{AnalyticsResult, AnalyticsRow};
use sqlx::Sqlite;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::str::FromStr;
use std::time::Duration;

pub struct SqliteStorage {
    /// Every transition and write of the service, committed in groups by one thread.
    committer: GroupCommit,
    reader: SqlitePool,
    /// How to open a connection of its own, for migrations.
    options: SqliteConnectOptions,
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
        let reader = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options.clone())
            .await?;
        Ok(Self {
            committer: GroupCommit::open(options.get_filename())?,
            reader,
            options,
            wakeups: Wakeups::default(),
        })
    }
}

/// The idempotency record of one key (`$1` caller, `$2` key), as [`IdempotencyColumns`].
const IDEMPOTENCY_RECORD: &str = "SELECT fingerprint, response_status, response_body, locked_at,
        created_at FROM idempotency_keys WHERE caller = $1 AND idempotency_key = $2";

/// Claims a key afresh: a new one, or one whose record expired or was abandoned.
const CLAIM_KEY: &str = "INSERT INTO idempotency_keys (caller, idempotency_key, fingerprint,
        locked_at, created_at)
     VALUES ($1, $2, $3, $4, $4)
     ON CONFLICT (caller, idempotency_key) DO UPDATE SET
        fingerprint = excluded.fingerprint, response_status = NULL, response_body = NULL,
        locked_at = excluded.locked_at, created_at = excluded.created_at";

/// Leases up to `$4` jobs due by `$2` whose lease (if any) ended by `$3`, until `$1`.
const CLAIM_JOBS: &str =
    "UPDATE retry_jobs SET locked_until = $1, receive_count = receive_count + 1,
        first_delivered_at = COALESCE(first_delivered_at, $3)
     WHERE id IN (
        SELECT id FROM retry_jobs
        WHERE run_at <= $2 AND (locked_until IS NULL OR locked_until <= $3)
        ORDER BY run_at LIMIT $4)
     RETURNING id, payload, receive_count, first_delivered_at";

/// Leases up to `$3` merchant webhook deliveries due by `$2` until `$1`.
const CLAIM_WEBHOOKS: &str = "UPDATE webhook_deliveries SET next_attempt_at = $1
     WHERE id IN (
        SELECT id FROM webhook_deliveries
        WHERE status = 'pending' AND next_attempt_at <= $2
        ORDER BY next_attempt_at LIMIT $3)
     RETURNING id, event_id, body, attempts, redelivery, created_at, next_attempt_at";

/// The idempotency record of `scope`, if any.
async fn idempotency_record<'c>(
    conn: impl sqlx::SqliteExecutor<'c>,
    scope: &IdempotencyScope,
) -> StorageResult<Option<IdempotencyRecord>> {
    sqlx::query_as::<_, IdempotencyColumns>(IDEMPOTENCY_RECORD)
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

    fn wakeups(&self) -> &Wakeups {
        &self.wakeups
    }

    async fn write(&self, writes: Vec<Write>) -> StorageResult<Committed> {
        self.committer.write(writes).await
    }

    async fn write_counted(&self, writes: Vec<Write>) -> StorageResult<u64> {
        self.committer
            .run(move |conn| {
                let mut touched = 0;
                for write in &writes {
                    touched += group_commit::execute(conn, write)?;
                }
                Ok((u64::try_from(touched).unwrap_or(u64::MAX), true))
            })
            .await
    }

    async fn run_migrations(&self) -> StorageResult<()> {
        // A connection of its own, closed after: the writer thread owns every other write.
        let migrator = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(self.options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&migrator).await?;
        migrator.close().await;
        Ok(())
    }

    async fn claim_key(
        &self,
        scope: &IdempotencyScope,
        now: DateTime<Utc>,
    ) -> StorageResult<IdempotencyBegin> {
        let now = to_millis(now);
        let scope = scope.clone();
        // Read and claim in one piece of work on the one writer: no other claim of the key
        // can come between them.
        self.committer
            .run(move |conn| {
                let key = [scope.caller.as_str().into(), scope.key.as_str().into()];
                let existing = group_commit::query(conn, IDEMPOTENCY_RECORD, &key, |row| {
                    IdempotencyRecord::from_columns((
                        row.text("fingerprint")?,
                        row.opt_int("response_status")?,
                        row.opt_bytes("response_body")?,
                        row.int("locked_at")?,
                        row.int("created_at")?,
                    ))
                })?;
                let verdict = existing
                    .into_iter()
                    .next()
                    .and_then(|record| record.verdict(&scope.fingerprint, now));
                if let Some(verdict) = verdict {
                    return Ok((verdict, false));
                }
                let claim = Write::new(
                    CLAIM_KEY,
                    [
                        scope.caller.as_str().into(),
                        scope.key.as_str().into(),
                        scope.fingerprint.as_str().into(),
                        now.into(),
                    ],
                );
                group_commit::execute(conn, &claim)?;
                Ok((IdempotencyBegin::Started, true))
            })
            .await
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
        let args = [
            locked_until.into(),
            due_before.into(),
            now.into(),
            i64::from(max).into(),
        ];
        self.committer
            .run(move |conn| {
                let claimed = group_commit::query(conn, CLAIM_JOBS, &args, |row| {
                    rows::delivery(row, locked_until)
                })?;
                Ok((claimed, true))
            })
            .await
    }

    async fn claim_webhooks(
        &self,
        now: i64,
        lease_end: i64,
        max: u32,
    ) -> StorageResult<Vec<LeasedDelivery>> {
        let args = [lease_end.into(), now.into(), i64::from(max).into()];
        self.committer
            .run(move |conn| {
                let claimed = group_commit::query(conn, CLAIM_WEBHOOKS, &args, |row| {
                    rows::leased_delivery(row)
                })?;
                Ok((claimed, true))
            })
            .await
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
        self.write(vec![Write::new(sql, [pairs.into()])]).await?;
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
                SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each($1))",
                deliveries,
            )
            .await?)
    }

    async fn release_outbox(&self, deliveries: &[Delivery]) -> QueueResult<()> {
        Ok(self
            .settle_outbox(
                "UPDATE retry_jobs SET locked_until = NULL WHERE (id, locked_until) IN (
                SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each($1))",
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
        let deletes = ids
            .iter()
            .map(|&id| Write::new("DELETE FROM analytics_events WHERE id = $1", [id.into()]));
        self.write(deletes.collect()).await?;
        Ok(())
    }

    async fn analytics_park(&self, ids: &[i64], error: &str) -> AnalyticsResult<()> {
        // Due "never" (i64::MAX): kept for review, skipped by the relay.
        let parks = ids.iter().map(|&id| {
            Write::new(
                "UPDATE analytics_events SET next_attempt_at = $1, attempts = attempts + 1,
                    last_error = $2 WHERE id = $3",
                [i64::MAX.into(), error.into(), id.into()],
            )
        });
        self.write(parks.collect()).await?;
        Ok(())
    }

    async fn analytics_enqueued(&self) {
        self.wakeups.analytics_written().await;
    }
}
