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

use super::*;
use crate::provider::sandbox::{
    SandboxCheckout, SandboxCheckoutResult, SandboxCheckoutStatus, SandboxCheckouts,
};
use crate::queue::{Delivery, JobQueue, Outbox, QueueResult};
use crate::telemetry::analytics::{AnalyticsResult, AnalyticsRow};
use payretry_domain::{Amount, Currency, DeadLetterId, FailureReason};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use std::str::FromStr;
use std::sync::LazyLock;
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

fn count(n: i64) -> StorageResult<u32> {
    u32::try_from(n).map_err(corrupt)
}

fn session_from_row(row: &PgRow) -> StorageResult<SessionRecord> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let metadata: String = row.try_get("metadata")?;
    let currency: String = row.try_get("currency")?;
    Ok(SessionRecord {
        id: PaymentSessionId::parse(&id).map_err(corrupt)?,
        buyer: UserId::new(row.try_get::<String, _>("buyer_id")?),
        money: Money {
            amount: Amount::new(row.try_get("amount")?).map_err(corrupt)?,
            currency: Currency::parse(&currency).map_err(corrupt)?,
        },
        description: row.try_get("description")?,
        metadata: serde_json::from_str(&metadata).map_err(corrupt)?,
        expires_at: from_millis(row.try_get("expires_at")?)?,
        created_at: from_millis(row.try_get("created_at")?)?,
        updated_at: from_millis(row.try_get("updated_at")?)?,
        version: row.try_get("version")?,
        state: SessionState {
            status: status.parse().map_err(corrupt)?,
            failure_reason: row
                .try_get::<Option<String>, _>("failure_reason")?
                .map(|r| FailureReason::from_code(&r)),
            retry_attempts: count(row.try_get("retry_attempts")?)?,
            last_retry_at: opt_time(row.try_get("last_retry_at")?)?,
            retry_reason: row
                .try_get::<Option<String>, _>("retry_reason")?
                .map(|r| FailureReason::from_code(&r)),
            next_retry_at: opt_time(row.try_get("next_retry_at")?)?,
            current_attempt: attempt(row.try_get("current_attempt")?),
            provider_session_id: row
                .try_get::<Option<String>, _>("provider_session_id")?
                .map(ProviderSessionId::new),
            checkout_url: row.try_get("checkout_url")?,
            paid_attempt: row.try_get::<Option<i64>, _>("paid_attempt")?.map(attempt),
        },
    })
}

fn dead_letter_from_row(row: &PgRow) -> StorageResult<DeadLetter> {
    let payload: String = row.try_get("payload")?;
    Ok(DeadLetter {
        id: DeadLetterId::from_row(row.try_get("id")?).map_err(corrupt)?,
        job: serde_json::from_str(&payload).map_err(corrupt)?,
        receive_count: count(row.try_get("receive_count")?)?,
        last_error: row.try_get("last_error")?,
        dead_at: from_millis(row.try_get("dead_at")?)?,
    })
}

fn sandbox_checkout_from_row(row: &PgRow) -> StorageResult<SandboxCheckout> {
    let session_id: String = row.try_get("session_id")?;
    Ok(SandboxCheckout {
        id: ProviderSessionId::new(row.try_get::<String, _>("id")?),
        session_id: PaymentSessionId::parse(&session_id).map_err(corrupt)?,
        attempt: attempt(row.try_get("attempt_number")?),
        amount: row.try_get("amount")?,
        currency: row.try_get("currency")?,
        description: row.try_get("description")?,
        success_url: row.try_get("success_url")?,
        cancel_url: row.try_get("cancel_url")?,
        expires_at: from_millis(row.try_get("expires_at")?)?,
        status: row
            .try_get::<String, _>("status")?
            .parse()
            .map_err(corrupt)?,
    })
}

fn duplicate_payment_from_row(row: &PgRow) -> StorageResult<DuplicatePayment> {
    let session_id: String = row.try_get("session_id")?;
    let status: String = row.try_get("status")?;
    Ok(DuplicatePayment {
        id: row.try_get::<i64, _>("id")?.to_string(),
        session_id: PaymentSessionId::parse(&session_id).map_err(corrupt)?,
        paid_attempt: attempt(row.try_get("paid_attempt")?),
        duplicate_attempt: attempt(row.try_get("duplicate_attempt")?),
        provider_session_id: row
            .try_get::<Option<String>, _>("provider_session_id")?
            .map(ProviderSessionId::new),
        payment_intent: row.try_get("payment_intent")?,
        status: status.parse().map_err(corrupt)?,
        refund_id: row.try_get("refund_id")?,
        last_error: row.try_get("last_error")?,
        failure_reason: row.try_get("failure_reason")?,
        detected_at: from_millis(row.try_get("detected_at")?)?,
        updated_at: from_millis(row.try_get("updated_at")?)?,
    })
}

/// Records checkouts to close, due at `now`; one already recorded keeps its schedule.
async fn insert_checkout_closures(
    tx: &mut Transaction<'static, Postgres>,
    session_id: &PaymentSessionId,
    checkouts: &[ProviderSessionId],
    now: i64,
) -> StorageResult<()> {
    for checkout in checkouts {
        sqlx::query(
            "INSERT INTO checkout_closures (provider_session_id, session_id, run_at, created_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT (provider_session_id) DO NOTHING",
        )
        .bind(checkout.as_str())
        .bind(session_id.as_str())
        .bind(now)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

fn checkout_closure(row: &PgRow) -> StorageResult<CheckoutClosure> {
    let session: String = row.try_get("session_id")?;
    let tries: i64 = row.try_get("tries")?;
    Ok(CheckoutClosure {
        provider_session_id: ProviderSessionId::new(
            row.try_get::<String, _>("provider_session_id")?,
        ),
        session_id: PaymentSessionId::parse(&session).map_err(corrupt)?,
        tries: u32::try_from(tries).unwrap_or(u32::MAX),
        created_at: from_millis(row.try_get("created_at")?)?,
    })
}

async fn append_audit(
    tx: &mut Transaction<'static, Postgres>,
    session_id: &PaymentSessionId,
    at: i64,
    entry: &NewAuditEntry,
) -> StorageResult<()> {
    sqlx::query(
        "INSERT INTO audit_log (session_id, at, action, attempt_number, actor, details)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(session_id.as_str())
    .bind(at)
    .bind(entry.action.as_str())
    .bind(entry.attempt.map(|a| i64::from(a.get())))
    .bind(&entry.actor)
    .bind(entry.details.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Deletes the job of the delivery with `receipt` (an ack). Guarded by the lease: after this
/// delivery's lease expired and the job was delivered again, `locked_until` differs and the
/// new delivery keeps its job.
async fn delete_delivered_job(conn: &mut sqlx::PgConnection, receipt: &str) -> StorageResult<()> {
    let (id, lease) = parse_receipt(receipt)?;
    sqlx::query("DELETE FROM retry_jobs WHERE id = $1 AND locked_until = $2")
        .bind(id)
        .bind(lease)
        .execute(conn)
        .await?;
    Ok(())
}

/// Stores `completion` in the transaction; see [`store_response_sql`].
async fn store_response(
    tx: &mut Transaction<'static, Postgres>,
    completion: &IdempotencyCompletion,
    now: i64,
) -> StorageResult<()> {
    static SQL: LazyLock<String> = LazyLock::new(|| store_response_sql('$'));
    let stored = sqlx::query(SQL.as_str())
        .bind(completion.scope.caller.as_str())
        .bind(&completion.scope.key)
        .bind(&completion.scope.fingerprint)
        .bind(i64::from(completion.response.status))
        .bind(&completion.response.body)
        .bind(now)
        .bind(now - IDEMPOTENCY_TTL_MS)
        .execute(&mut **tx)
        .await?;
    if stored.rows_affected() == 0 {
        return Err(StorageError::IdempotencyKeyTaken);
    }
    Ok(())
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

async fn enqueue_job(
    tx: &mut Transaction<'static, Postgres>,
    job: &RetryJob,
    now: i64,
) -> StorageResult<()> {
    let payload = serde_json::to_string(job).map_err(corrupt)?;
    sqlx::query(
        "INSERT INTO retry_jobs (session_id, attempt_number, payload, run_at, created_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(job.payment_session_id.as_str())
    .bind(i64::from(job.attempt_number.get()))
    .bind(payload)
    .bind(to_millis(job.scheduled_for))
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
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
        let now = to_millis(s.created_at);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO payment_sessions (id, buyer_id, status, amount, currency, description,
                metadata, current_attempt, provider_session_id, checkout_url, expires_at,
                created_at, updated_at)
             VALUES ($1, $2, 'open', $3, $4, $5, $6, 0, $7, $8, $9, $10, $10)",
        )
        .bind(s.id.as_str())
        .bind(s.buyer.as_str())
        .bind(s.money.amount.minor_units())
        .bind(s.money.currency.as_str())
        .bind(&s.description)
        .bind(s.metadata.to_string())
        .bind(s.provider_session_id.as_str())
        .bind(&s.checkout_url)
        .bind(to_millis(s.expires_at))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO payment_attempts (session_id, attempt_number, status, provider_session_id,
                created_at, updated_at)
             VALUES ($1, 0, 'open', $2, $3, $3)",
        )
        .bind(s.id.as_str())
        .bind(s.provider_session_id.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        append_audit(&mut tx, &s.id, now, &s.audit).await?;
        if let Some(completion) = &s.idempotency {
            store_response(&mut tx, completion, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn session(&self, id: &PaymentSessionId) -> StorageResult<Option<SessionRecord>> {
        let row = sqlx::query("SELECT * FROM payment_sessions WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn commit(&self, t: Transition) -> StorageResult<Committed> {
        let now = to_millis(Utc::now());
        // Returning early drops `tx`, which rolls back whatever it wrote.
        let mut tx = self.pool.begin().await?;
        if let Some(event_id) = &t.webhook_event_id {
            let inserted = sqlx::query(
                "INSERT INTO processed_webhook_events (event_id, processed_at) VALUES ($1, $2)
                 ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(event_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                return Ok(Committed::DuplicateEvent);
            }
        }
        let s = &t.state;
        let updated = sqlx::query(
            "UPDATE payment_sessions SET status = $1, failure_reason = $2, retry_attempts = $3,
                last_retry_at = $4, retry_reason = $5, next_retry_at = $6, current_attempt = $7,
                provider_session_id = $8, checkout_url = $9, paid_attempt = $10, updated_at = $11,
                version = version + 1
             WHERE id = $12 AND version = $13",
        )
        .bind(s.status.as_str())
        .bind(s.failure_reason.as_ref().map(|r| r.as_str()))
        .bind(i64::from(s.retry_attempts))
        .bind(s.last_retry_at.map(to_millis))
        .bind(s.retry_reason.as_ref().map(|r| r.as_str()))
        .bind(s.next_retry_at.map(to_millis))
        .bind(i64::from(s.current_attempt.get()))
        .bind(s.provider_session_id.as_ref().map(|p| p.as_str()))
        .bind(s.checkout_url.as_deref())
        .bind(s.paid_attempt.map(|a| i64::from(a.get())))
        .bind(now)
        .bind(t.session_id.as_str())
        .bind(t.expected_version)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(Committed::Conflict);
        }
        if let Some(d) = &t.duplicate_payment {
            // One row per session and duplicate attempt, as with SQLite. The session row is
            // locked by the update above, so a concurrent record of the same payment waits
            // here and then finds the row.
            let inserted = sqlx::query(
                "INSERT INTO duplicate_payments (session_id, paid_attempt, duplicate_attempt,
                    provider_session_id, payment_intent, status, detected_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
                 ON CONFLICT (session_id, duplicate_attempt) DO NOTHING",
            )
            .bind(t.session_id.as_str())
            .bind(i64::from(d.paid_attempt.get()))
            .bind(i64::from(d.duplicate_attempt.get()))
            .bind(d.provider_session_id.as_ref().map(|p| p.as_str()))
            .bind(d.payment_intent.as_deref())
            .bind(d.status.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                return Ok(Committed::DuplicateEvent);
            }
        }
        if let Some(a) = &t.attempt {
            // Unlike SQLite, PostgreSQL needs the target columns qualified: an unqualified
            // name is ambiguous next to `excluded`.
            sqlx::query(
                "INSERT INTO payment_attempts AS a (session_id, attempt_number, status,
                    provider_session_id, failure_reason, scheduled_for, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
                 ON CONFLICT (session_id, attempt_number) DO UPDATE SET
                    status = excluded.status,
                    provider_session_id = COALESCE(excluded.provider_session_id, a.provider_session_id),
                    failure_reason = COALESCE(excluded.failure_reason, a.failure_reason),
                    scheduled_for = COALESCE(excluded.scheduled_for, a.scheduled_for),
                    updated_at = excluded.updated_at",
            )
            .bind(t.session_id.as_str())
            .bind(i64::from(a.attempt.get()))
            .bind(a.status.as_str())
            .bind(a.provider_session_id.as_ref().map(|p| p.as_str()))
            .bind(a.failure_reason.as_ref().map(|r| r.as_str()))
            .bind(a.scheduled_for.map(to_millis))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        for entry in &t.audit {
            append_audit(&mut tx, &t.session_id, now, entry).await?;
        }
        insert_checkout_closures(&mut tx, &t.session_id, &t.close_checkouts, now).await?;
        if let Some(job) = &t.enqueue {
            enqueue_job(&mut tx, job, now).await?;
        }
        if let Some(dead) = &t.dead_letter {
            sqlx::query(
                "INSERT INTO dead_letters (session_id, attempt_number, payload, receive_count,
                    last_error, dead_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(dead.job.payment_session_id.as_str())
            .bind(i64::from(dead.job.attempt_number.get()))
            .bind(serde_json::to_string(&dead.job).map_err(corrupt)?)
            .bind(i64::from(dead.receive_count))
            .bind(&dead.last_error)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(receipt) = &t.settles {
            delete_delivered_job(&mut tx, receipt).await?;
        }
        if let Some(id) = t.redrive {
            let removed = sqlx::query("DELETE FROM dead_letters WHERE id = $1")
                .bind(id.get())
                .execute(&mut *tx)
                .await?;
            // Gone already: another redrive of it committed first. Nothing is written, and
            // the caller reloads the session and finds it moved on.
            if removed.rows_affected() == 0 {
                return Ok(Committed::Conflict);
            }
        }
        if let Some(completion) = &t.idempotency {
            store_response(&mut tx, completion, now).await?;
        }
        for event in &t.analytics {
            sqlx::query(
                "INSERT INTO analytics_events (message_id, payload, created_at, next_attempt_at)
                 VALUES ($1, $2, $3, $3) ON CONFLICT (message_id) DO NOTHING",
            )
            .bind(&event.message_id)
            .bind(event.payload.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.wakeups.committed(&t, Utc::now());
        Ok(Committed::Applied)
    }

    async fn audit_log(
        &self,
        id: &PaymentSessionId,
        page: Page,
    ) -> StorageResult<Paged<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, action, attempt_number, actor, details FROM audit_log
             WHERE session_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(id.as_str())
        .bind(page.after_id())
        .bind(page.fetch())
        .fetch_all(&self.pool)
        .await?;
        let rows = rows
            .iter()
            .map(|row| {
                let details: String = row.try_get("details")?;
                let entry = AuditEntry {
                    at: from_millis(row.try_get("at")?)?,
                    action: row.try_get("action")?,
                    attempt: row
                        .try_get::<Option<i64>, _>("attempt_number")?
                        .map(attempt),
                    actor: row.try_get("actor")?,
                    details: serde_json::from_str(&details).map_err(corrupt)?,
                };
                Ok((row.try_get::<i64, _>("id")?, entry))
            })
            .collect::<StorageResult<Vec<_>>>()?;
        Ok(Paged::from_rows(page, rows))
    }

    async fn sessions_past_window(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<SessionRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM payment_sessions
             WHERE status IN ('open', 'failed', 'retry_scheduled') AND expires_at <= $1
             ORDER BY expires_at LIMIT $2",
        )
        .bind(to_millis(now))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(session_from_row).collect()
    }

    async fn next_window_end(&self) -> StorageResult<Option<DateTime<Utc>>> {
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(expires_at) FROM payment_sessions
             WHERE status IN ('open', 'failed', 'retry_scheduled')",
        )
        .fetch_one(&self.pool)
        .await?;
        opt_time(next)
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
        let mut tx = self.pool.begin().await?;
        store_response(&mut tx, completion, to_millis(Utc::now())).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn abandon_idempotent(&self, scope: &IdempotencyScope) -> StorageResult<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys
             WHERE caller = $1 AND idempotency_key = $2 AND response_status IS NULL",
        )
        .bind(scope.caller.as_str())
        .bind(&scope.key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn schedule_checkout_closures(
        &self,
        session: &PaymentSessionId,
        checkouts: &[ProviderSessionId],
    ) -> StorageResult<()> {
        let mut tx = self.pool.begin().await?;
        insert_checkout_closures(&mut tx, session, checkouts, to_millis(Utc::now())).await?;
        tx.commit().await?;
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
        let rows = sqlx::query(
            "SELECT provider_session_id, session_id, tries, created_at FROM checkout_closures
             WHERE run_at <= $1 ORDER BY run_at LIMIT $2",
        )
        .bind(to_millis(now))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(checkout_closure).collect()
    }

    async fn checkout_closed(&self, checkout: &ProviderSessionId) -> StorageResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM checkout_closures WHERE provider_session_id = $1")
            .bind(checkout.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn checkout_close_failed(
        &self,
        checkout: &ProviderSessionId,
        retry_at: DateTime<Utc>,
        error: &str,
    ) -> StorageResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE checkout_closures SET run_at = $1, tries = tries + 1, last_error = $2
             WHERE provider_session_id = $3",
        )
        .bind(to_millis(retry_at))
        .bind(error)
        .bind(checkout.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
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
        let rows = sqlx::query("SELECT * FROM dead_letters WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(page.after_id())
            .bind(page.fetch())
            .fetch_all(&self.pool)
            .await?;
        let rows = rows
            .iter()
            .map(|row| Ok((row.try_get::<i64, _>("id")?, dead_letter_from_row(row)?)))
            .collect::<StorageResult<Vec<_>>>()?;
        Ok(Paged::from_rows(page, rows))
    }

    async fn dead_letter(&self, id: DeadLetterId) -> StorageResult<Option<DeadLetter>> {
        let row = sqlx::query("SELECT * FROM dead_letters WHERE id = $1")
            .bind(id.get())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(dead_letter_from_row).transpose()
    }

    async fn service_secret(
        &self,
        name: &str,
        generate: &(dyn Fn() -> String + Sync),
    ) -> StorageResult<String> {
        // A concurrent first insert of the same name makes this one wait for its commit, so
        // the read below sees whichever value was stored first.
        sqlx::query(
            "INSERT INTO service_secrets (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(generate())
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM service_secrets WHERE name = $1")
                .bind(name)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn refund_owed(&self) {
        self.wakeups.refund_owed().await;
    }

    async fn duplicate_payments(&self, page: Page) -> StorageResult<Paged<DuplicatePayment>> {
        let rows =
            sqlx::query("SELECT * FROM duplicate_payments WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(page.after_id())
                .bind(page.fetch())
                .fetch_all(&self.pool)
                .await?;
        let rows = rows
            .iter()
            .map(|row| {
                Ok((
                    row.try_get::<i64, _>("id")?,
                    duplicate_payment_from_row(row)?,
                ))
            })
            .collect::<StorageResult<Vec<_>>>()?;
        Ok(Paged::from_rows(page, rows))
    }

    async fn duplicate_payment(
        &self,
        session_id: &PaymentSessionId,
        attempt: AttemptNumber,
    ) -> StorageResult<Option<DuplicatePayment>> {
        let row = sqlx::query(
            "SELECT * FROM duplicate_payments WHERE session_id = $1 AND duplicate_attempt = $2",
        )
        .bind(session_id.as_str())
        .bind(i64::from(attempt.get()))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(duplicate_payment_from_row).transpose()
    }

    async fn duplicate_payment_by_intent(
        &self,
        payment_intent: &str,
    ) -> StorageResult<Option<DuplicatePayment>> {
        let row = sqlx::query(
            "SELECT * FROM duplicate_payments WHERE payment_intent = $1 ORDER BY id LIMIT 1",
        )
        .bind(payment_intent)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(duplicate_payment_from_row).transpose()
    }

    async fn duplicate_refunds_owed(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<DuplicatePayment>> {
        let rows = sqlx::query(
            "SELECT * FROM duplicate_payments
             WHERE status = 'refund_requested'
               AND (refund_attempted_at IS NULL OR refund_attempted_at <= $1)
             ORDER BY updated_at, id LIMIT $2",
        )
        .bind(to_millis(before))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(duplicate_payment_from_row).collect()
    }

    async fn claim_duplicate_refund(
        &self,
        session_id: &PaymentSessionId,
        attempt: AttemptNumber,
        before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StorageResult<bool> {
        // Re-checked after a concurrent claim's commit (READ COMMITTED): one claim wins.
        let claimed = sqlx::query(
            "UPDATE duplicate_payments SET refund_attempted_at = $1
             WHERE session_id = $2 AND duplicate_attempt = $3 AND status = 'refund_requested'
               AND (refund_attempted_at IS NULL OR refund_attempted_at <= $4)",
        )
        .bind(to_millis(now))
        .bind(session_id.as_str())
        .bind(i64::from(attempt.get()))
        .bind(to_millis(before))
        .execute(&self.pool)
        .await?;
        Ok(claimed.rows_affected() == 1)
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
        let (status, refund_id, error, failure_reason) = settlement_columns(settlement);
        let [from_a, from_b, from_c] = settlement_from(settlement);
        // Returning early drops `tx`, which rolls back whatever it wrote.
        let mut tx = self.pool.begin().await?;
        if let Some(event_id) = event_id {
            let inserted = sqlx::query(
                "INSERT INTO processed_webhook_events (event_id, processed_at) VALUES ($1, $2)
                 ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(event_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                return Ok(false);
            }
        }
        // The status condition is re-checked after a concurrent settler's commit (READ
        // COMMITTED), so only one of two settlers updates the row and appends the audit entry.
        let updated = sqlx::query(
            "UPDATE duplicate_payments SET status = $1, refund_id = COALESCE($2, refund_id),
                last_error = $3, failure_reason = $4, updated_at = $5
             WHERE session_id = $6 AND duplicate_attempt = $7 AND status IN ($8, $9, $10)",
        )
        .bind(status.as_str())
        .bind(refund_id)
        .bind(error)
        .bind(failure_reason)
        .bind(now)
        .bind(session_id.as_str())
        .bind(i64::from(attempt.get()))
        .bind(from_a)
        .bind(from_b)
        .bind(from_c)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(false);
        }
        if let Some(entry) = audit {
            append_audit(&mut tx, session_id, now, entry).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn checkout_attempt(
        &self,
        session: &PaymentSessionId,
        checkout: &ProviderSessionId,
    ) -> StorageResult<Option<AttemptNumber>> {
        let number: Option<i64> = sqlx::query_scalar(
            "SELECT attempt_number FROM payment_attempts
             WHERE session_id = $1 AND provider_session_id = $2",
        )
        .bind(session.as_str())
        .bind(checkout.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(number.map(attempt))
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
        let mut conn = self.pool.acquire().await?;
        Ok(delete_delivered_job(&mut conn, &delivery.receipt).await?)
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
        let rows = sqlx::query(
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
        rows.iter()
            .map(|row| {
                let id: i64 = row.try_get("id")?;
                let payload: String = row.try_get("payload")?;
                Ok(Delivery {
                    job: serde_json::from_str(&payload).map_err(corrupt)?,
                    receipt: format!("{id}:{locked_until}"),
                    receive_count: count(row.try_get("receive_count")?)?,
                })
            })
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
        let rows = sqlx::query(
            "SELECT id, payload FROM analytics_events
             WHERE next_attempt_at <= $1 ORDER BY id LIMIT $2",
        )
        .bind(to_millis(Utc::now()))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let payload: String = row.try_get("payload")?;
                Ok(AnalyticsRow {
                    id: row.try_get("id")?,
                    payload: serde_json::from_str(&payload).map_err(corrupt)?,
                })
            })
            .collect()
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
        sqlx::query(
            "INSERT INTO sandbox_checkouts (id, session_id, attempt_number, amount, currency,
                description, success_url, cancel_url, expires_at, status, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (id) DO NOTHING",
        )
        .bind(c.id.as_str())
        .bind(c.session_id.as_str())
        .bind(i64::from(c.attempt.get()))
        .bind(c.amount)
        .bind(&c.currency)
        .bind(&c.description)
        .bind(&c.success_url)
        .bind(&c.cancel_url)
        .bind(to_millis(c.expires_at))
        .bind(c.status.as_str())
        .bind(to_millis(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn sandbox_checkout(
        &self,
        id: &ProviderSessionId,
    ) -> SandboxCheckoutResult<Option<SandboxCheckout>> {
        let row = sqlx::query("SELECT * FROM sandbox_checkouts WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(sandbox_checkout_from_row).transpose()?)
    }

    async fn set_sandbox_checkout_status(
        &self,
        id: &ProviderSessionId,
        from: SandboxCheckoutStatus,
        to: SandboxCheckoutStatus,
    ) -> SandboxCheckoutResult<bool> {
        let done =
            sqlx::query("UPDATE sandbox_checkouts SET status = $1 WHERE id = $2 AND status = $3")
                .bind(to.as_str())
                .bind(id.as_str())
                .bind(from.as_str())
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
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
