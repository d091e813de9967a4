//! SQLite storage: the embedded default. One file, WAL with `synchronous=FULL` so a commit
//! survives power loss. All writes go through a single-connection writer pool that opens
//! transactions with `BEGIN IMMEDIATE`: SQLite has one writer anyway, and queueing writers
//! in-process avoids `SQLITE_BUSY` reaching a caller. Reads use a separate pool.

use super::*;
use crate::provider::sandbox::{
    SandboxCheckout, SandboxCheckoutResult, SandboxCheckoutStatus, SandboxCheckouts,
};
use crate::queue::{Delivery, JobQueue, Outbox, QueueResult};
use crate::telemetry::analytics::{AnalyticsResult, AnalyticsRow};
use payretry_domain::{Amount, Currency, DeadLetterId, FailureReason};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
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

fn session_from_row(row: &SqliteRow) -> StorageResult<SessionRecord> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let metadata: String = row.try_get("metadata")?;
    let amount: i64 = row.try_get("amount")?;
    let currency: String = row.try_get("currency")?;
    Ok(SessionRecord {
        id: PaymentSessionId::parse(&id).map_err(corrupt)?,
        buyer: UserId::new(row.try_get::<String, _>("buyer_id")?),
        money: Money {
            amount: Amount::new(amount).map_err(corrupt)?,
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
            retry_attempts: u32::try_from(row.try_get::<i64, _>("retry_attempts")?)
                .map_err(corrupt)?,
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

fn dead_letter_from_row(row: &SqliteRow) -> StorageResult<DeadLetter> {
    let payload: String = row.try_get("payload")?;
    Ok(DeadLetter {
        id: DeadLetterId::from_row(row.try_get("id")?).map_err(corrupt)?,
        job: serde_json::from_str(&payload).map_err(corrupt)?,
        receive_count: u32::try_from(row.try_get::<i64, _>("receive_count")?).map_err(corrupt)?,
        last_error: row.try_get("last_error")?,
        dead_at: from_millis(row.try_get("dead_at")?)?,
    })
}

fn duplicate_payment_from_row(row: &SqliteRow) -> StorageResult<DuplicatePayment> {
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
    tx: &mut Transaction<'static, Sqlite>,
    session_id: &PaymentSessionId,
    checkouts: &[ProviderSessionId],
    now: i64,
) -> StorageResult<()> {
    for checkout in checkouts {
        sqlx::query(
            "INSERT INTO checkout_closures (provider_session_id, session_id, run_at, created_at)
             VALUES (?, ?, ?, ?) ON CONFLICT (provider_session_id) DO NOTHING",
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

fn checkout_closure(row: &sqlx::sqlite::SqliteRow) -> StorageResult<CheckoutClosure> {
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
    tx: &mut Transaction<'static, Sqlite>,
    session_id: &PaymentSessionId,
    at: i64,
    entry: &NewAuditEntry,
) -> StorageResult<()> {
    sqlx::query(
        "INSERT INTO audit_log (session_id, at, action, attempt_number, actor, details)
         VALUES (?, ?, ?, ?, ?, ?)",
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
async fn delete_delivered_job(
    tx: &mut Transaction<'static, Sqlite>,
    receipt: &str,
) -> StorageResult<()> {
    let (id, lease) = parse_receipt(receipt)?;
    sqlx::query("DELETE FROM retry_jobs WHERE id = ? AND locked_until = ?")
        .bind(id)
        .bind(lease)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Stores `completion` in the transaction; see [`store_response_sql`].
async fn store_response(
    tx: &mut Transaction<'static, Sqlite>,
    completion: &IdempotencyCompletion,
    now: i64,
) -> StorageResult<()> {
    static SQL: LazyLock<String> = LazyLock::new(|| store_response_sql('?'));
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

async fn enqueue_job(
    tx: &mut Transaction<'static, Sqlite>,
    job: &RetryJob,
    now: i64,
) -> StorageResult<()> {
    let payload = serde_json::to_string(job).map_err(corrupt)?;
    sqlx::query(
        "INSERT INTO retry_jobs (session_id, attempt_number, payload, run_at, created_at)
         VALUES (?, ?, ?, ?, ?)",
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
        let now = to_millis(s.created_at);
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO payment_sessions (id, buyer_id, status, amount, currency, description,
                metadata, current_attempt, provider_session_id, checkout_url, expires_at,
                created_at, updated_at)
             VALUES (?, ?, 'open', ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)",
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
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO payment_attempts (session_id, attempt_number, status, provider_session_id,
                created_at, updated_at)
             VALUES (?, 0, 'open', ?, ?, ?)",
        )
        .bind(s.id.as_str())
        .bind(s.provider_session_id.as_str())
        .bind(now)
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
        let row = sqlx::query("SELECT * FROM payment_sessions WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn commit(&self, t: Transition) -> StorageResult<Committed> {
        let now = to_millis(Utc::now());
        let mut tx = self.begin_write().await?;
        if let Some(event_id) = &t.webhook_event_id {
            let inserted = sqlx::query(
                "INSERT INTO processed_webhook_events (event_id, processed_at) VALUES (?, ?)
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
            "UPDATE payment_sessions SET status = ?, failure_reason = ?, retry_attempts = ?,
                last_retry_at = ?, retry_reason = ?, next_retry_at = ?, current_attempt = ?,
                provider_session_id = ?, checkout_url = ?, paid_attempt = ?, updated_at = ?,
                version = version + 1
             WHERE id = ? AND version = ?",
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
            // One row per session and duplicate attempt: another event about the same
            // payment (a different event id) finds it and the whole commit is dropped.
            let inserted = sqlx::query(
                "INSERT INTO duplicate_payments (session_id, paid_attempt, duplicate_attempt,
                    provider_session_id, payment_intent, status, detected_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (session_id, duplicate_attempt) DO NOTHING",
            )
            .bind(t.session_id.as_str())
            .bind(i64::from(d.paid_attempt.get()))
            .bind(i64::from(d.duplicate_attempt.get()))
            .bind(d.provider_session_id.as_ref().map(|p| p.as_str()))
            .bind(d.payment_intent.as_deref())
            .bind(d.status.as_str())
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                return Ok(Committed::DuplicateEvent);
            }
        }
        if let Some(a) = &t.attempt {
            sqlx::query(
                "INSERT INTO payment_attempts (session_id, attempt_number, status,
                    provider_session_id, failure_reason, scheduled_for, created_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (session_id, attempt_number) DO UPDATE SET
                    status = excluded.status,
                    provider_session_id = COALESCE(excluded.provider_session_id, provider_session_id),
                    failure_reason = COALESCE(excluded.failure_reason, failure_reason),
                    scheduled_for = COALESCE(excluded.scheduled_for, scheduled_for),
                    updated_at = excluded.updated_at",
            )
            .bind(t.session_id.as_str())
            .bind(i64::from(a.attempt.get()))
            .bind(a.status.as_str())
            .bind(a.provider_session_id.as_ref().map(|p| p.as_str()))
            .bind(a.failure_reason.as_ref().map(|r| r.as_str()))
            .bind(a.scheduled_for.map(to_millis))
            .bind(now)
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
                 VALUES (?, ?, ?, ?, ?, ?)",
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
            let removed = sqlx::query("DELETE FROM dead_letters WHERE id = ?")
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
                 VALUES (?, ?, ?, ?) ON CONFLICT (message_id) DO NOTHING",
            )
            .bind(&event.message_id)
            .bind(event.payload.to_string())
            .bind(now)
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
             WHERE session_id = ? AND id > ? ORDER BY id LIMIT ?",
        )
        .bind(id.as_str())
        .bind(page.after_id())
        .bind(page.fetch())
        .fetch_all(&self.reader)
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
             WHERE status IN ('open', 'failed', 'retry_scheduled') AND expires_at <= ?
             ORDER BY expires_at LIMIT ?",
        )
        .bind(to_millis(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(session_from_row).collect()
    }

    async fn next_window_end(&self) -> StorageResult<Option<DateTime<Utc>>> {
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(expires_at) FROM payment_sessions
             WHERE status IN ('open', 'failed', 'retry_scheduled')",
        )
        .fetch_one(&self.reader)
        .await?;
        opt_time(next)
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
        let mut tx = self.begin_write().await?;
        store_response(&mut tx, completion, to_millis(Utc::now())).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn abandon_idempotent(&self, scope: &IdempotencyScope) -> StorageResult<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys
             WHERE caller = ? AND idempotency_key = ? AND response_status IS NULL",
        )
        .bind(scope.caller.as_str())
        .bind(&scope.key)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn schedule_checkout_closures(
        &self,
        session: &PaymentSessionId,
        checkouts: &[ProviderSessionId],
    ) -> StorageResult<()> {
        let mut tx = self.begin_write().await?;
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
             WHERE run_at <= ? ORDER BY run_at LIMIT ?",
        )
        .bind(to_millis(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(checkout_closure).collect()
    }

    async fn checkout_closed(&self, checkout: &ProviderSessionId) -> StorageResult<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM checkout_closures WHERE provider_session_id = ?")
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
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE checkout_closures SET run_at = ?, tries = tries + 1, last_error = ?
             WHERE provider_session_id = ?",
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
        let rows = sqlx::query("SELECT * FROM dead_letters WHERE id > ? ORDER BY id LIMIT ?")
            .bind(page.after_id())
            .bind(page.fetch())
            .fetch_all(&self.reader)
            .await?;
        let rows = rows
            .iter()
            .map(|row| Ok((row.try_get::<i64, _>("id")?, dead_letter_from_row(row)?)))
            .collect::<StorageResult<Vec<_>>>()?;
        Ok(Paged::from_rows(page, rows))
    }

    async fn dead_letter(&self, id: DeadLetterId) -> StorageResult<Option<DeadLetter>> {
        let row = sqlx::query("SELECT * FROM dead_letters WHERE id = ?")
            .bind(id.get())
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(dead_letter_from_row).transpose()
    }

    async fn service_secret(
        &self,
        name: &str,
        generate: &(dyn Fn() -> String + Sync),
    ) -> StorageResult<String> {
        sqlx::query(
            "INSERT INTO service_secrets (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(generate())
        .execute(&self.writer)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM service_secrets WHERE name = ?")
                .bind(name)
                .fetch_one(&self.writer)
                .await?,
        )
    }

    async fn refund_owed(&self) {
        self.wakeups.refund_owed().await;
    }

    async fn duplicate_payments(&self, page: Page) -> StorageResult<Paged<DuplicatePayment>> {
        let rows = sqlx::query("SELECT * FROM duplicate_payments WHERE id > ? ORDER BY id LIMIT ?")
            .bind(page.after_id())
            .bind(page.fetch())
            .fetch_all(&self.reader)
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
            "SELECT * FROM duplicate_payments WHERE session_id = ? AND duplicate_attempt = ?",
        )
        .bind(session_id.as_str())
        .bind(i64::from(attempt.get()))
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(duplicate_payment_from_row).transpose()
    }

    async fn duplicate_payment_by_intent(
        &self,
        payment_intent: &str,
    ) -> StorageResult<Option<DuplicatePayment>> {
        let row = sqlx::query(
            "SELECT * FROM duplicate_payments WHERE payment_intent = ? ORDER BY id LIMIT 1",
        )
        .bind(payment_intent)
        .fetch_optional(&self.reader)
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
               AND (refund_attempted_at IS NULL OR refund_attempted_at <= ?)
             ORDER BY updated_at, id LIMIT ?",
        )
        .bind(to_millis(before))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
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
        let claimed = sqlx::query(
            "UPDATE duplicate_payments SET refund_attempted_at = ?
             WHERE session_id = ? AND duplicate_attempt = ? AND status = 'refund_requested'
               AND (refund_attempted_at IS NULL OR refund_attempted_at <= ?)",
        )
        .bind(to_millis(now))
        .bind(session_id.as_str())
        .bind(i64::from(attempt.get()))
        .bind(to_millis(before))
        .execute(&self.writer)
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
        let mut tx = self.begin_write().await?;
        if let Some(event_id) = event_id {
            let inserted = sqlx::query(
                "INSERT INTO processed_webhook_events (event_id, processed_at) VALUES (?, ?)
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
        let updated = sqlx::query(
            "UPDATE duplicate_payments SET status = ?, refund_id = COALESCE(?, refund_id),
                last_error = ?, failure_reason = ?, updated_at = ?
             WHERE session_id = ? AND duplicate_attempt = ? AND status IN (?, ?, ?)",
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
             WHERE session_id = ? AND provider_session_id = ?",
        )
        .bind(session.as_str())
        .bind(checkout.as_str())
        .fetch_optional(&self.reader)
        .await?;
        Ok(number.map(attempt))
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
        let mut tx = self.begin_write().await?;
        delete_delivered_job(&mut tx, &delivery.receipt).await?;
        tx.commit().await?;
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
        let rows = sqlx::query(
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
        rows.iter()
            .map(|row| {
                let id: i64 = row.try_get("id")?;
                let payload: String = row.try_get("payload")?;
                Ok(Delivery {
                    job: serde_json::from_str(&payload).map_err(corrupt)?,
                    receipt: format!("{id}:{locked_until}"),
                    receive_count: u32::try_from(row.try_get::<i64, _>("receive_count")?)
                        .map_err(corrupt)?,
                })
            })
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
        let rows = sqlx::query(
            "SELECT id, payload FROM analytics_events
             WHERE next_attempt_at <= ? ORDER BY id LIMIT ?",
        )
        .bind(to_millis(Utc::now()))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
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
        sqlx::query(
            "INSERT INTO sandbox_checkouts (id, session_id, attempt_number, amount, currency,
                description, success_url, cancel_url, expires_at, status, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
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
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn sandbox_checkout(
        &self,
        id: &ProviderSessionId,
    ) -> SandboxCheckoutResult<Option<SandboxCheckout>> {
        let row = sqlx::query("SELECT * FROM sandbox_checkouts WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.writer)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let session_id: String = row.try_get("session_id")?;
        Ok(Some(SandboxCheckout {
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
        }))
    }

    async fn set_sandbox_checkout_status(
        &self,
        id: &ProviderSessionId,
        from: SandboxCheckoutStatus,
        to: SandboxCheckoutStatus,
    ) -> SandboxCheckoutResult<bool> {
        let done =
            sqlx::query("UPDATE sandbox_checkouts SET status = ? WHERE id = ? AND status = ?")
                .bind(to.as_str())
                .bind(id.as_str())
                .bind(from.as_str())
                .execute(&self.writer)
                .await?;
        Ok(done.rows_affected() == 1)
    }
}
