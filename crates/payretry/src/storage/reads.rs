//! The reads both backends make, each statement once. `db` is where the backend reads from:
//! SQLite's reader pool (or its writer, where a read must see the latest commit), or
//! PostgreSQL's pool.

use super::sql::{Backend, Columns, fetch_all, fetch_optional};
use super::{
    AuditEntry, CheckoutClosure, DeadLetter, DuplicatePayment, IdempotencyRecord, IdempotencyScope,
    Page, Paged, SessionRecord, StorageResult, attempt, opt_time, rows, to_millis,
};
use crate::provider::sandbox::SandboxCheckout;
use crate::telemetry::analytics::AnalyticsRow;
use chrono::{DateTime, Utc};
use payretry_domain::{AttemptNumber, DeadLetterId, PaymentSessionId, ProviderSessionId};
use sqlx::Executor;

/// The statuses a window can still close on; `payment_sessions_live_by_expiry` indexes them.
macro_rules! live {
    () => {
        "status IN ('open', 'failed', 'retry_scheduled')"
    };
}

pub(crate) async fn session<'e>(
    db: impl Executor<'e, Database: Backend>,
    id: &PaymentSessionId,
) -> StorageResult<Option<SessionRecord>> {
    fetch_optional(
        db,
        "SELECT * FROM payment_sessions WHERE id = $1",
        &[id.as_str().into()],
        rows::session,
    )
    .await
}

pub(crate) async fn audit_log<'e>(
    db: impl Executor<'e, Database: Backend>,
    id: &PaymentSessionId,
    page: Page,
) -> StorageResult<Paged<AuditEntry>> {
    let rows = fetch_all(
        db,
        "SELECT id, at, action, attempt_number, actor, details FROM audit_log
         WHERE session_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        &[
            id.as_str().into(),
            page.after_id().into(),
            page.fetch().into(),
        ],
        rows::audit_entry,
    )
    .await?;
    Ok(Paged::from_rows(page, rows))
}

pub(crate) async fn sessions_past_window<'e>(
    db: impl Executor<'e, Database: Backend>,
    now: DateTime<Utc>,
    limit: u32,
) -> StorageResult<Vec<SessionRecord>> {
    const SQL: &str = concat!(
        "SELECT * FROM payment_sessions WHERE ",
        live!(),
        " AND expires_at <= $1 ORDER BY expires_at LIMIT $2"
    );
    fetch_all(
        db,
        SQL,
        &[to_millis(now).into(), i64::from(limit).into()],
        rows::session,
    )
    .await
}

pub(crate) async fn next_window_end<'e>(
    db: impl Executor<'e, Database: Backend>,
) -> StorageResult<Option<DateTime<Utc>>> {
    const SQL: &str = concat!(
        "SELECT MIN(expires_at) AS next FROM payment_sessions WHERE ",
        live!()
    );
    let next = fetch_optional(db, SQL, &[], |row| row.opt_int("next")).await?;
    opt_time(next.flatten())
}

pub(crate) async fn due_checkout_closures<'e>(
    db: impl Executor<'e, Database: Backend>,
    now: DateTime<Utc>,
    limit: u32,
) -> StorageResult<Vec<CheckoutClosure>> {
    fetch_all(
        db,
        "SELECT provider_session_id, session_id, tries, created_at FROM checkout_closures
         WHERE run_at <= $1 ORDER BY run_at LIMIT $2",
        &[to_millis(now).into(), i64::from(limit).into()],
        rows::checkout_closure,
    )
    .await
}

pub(crate) async fn dead_letters<'e>(
    db: impl Executor<'e, Database: Backend>,
    page: Page,
) -> StorageResult<Paged<DeadLetter>> {
    let rows = fetch_all(
        db,
        "SELECT * FROM dead_letters WHERE id > $1 ORDER BY id LIMIT $2",
        &[page.after_id().into(), page.fetch().into()],
        rows::paged_dead_letter,
    )
    .await?;
    Ok(Paged::from_rows(page, rows))
}

pub(crate) async fn dead_letter<'e>(
    db: impl Executor<'e, Database: Backend>,
    id: DeadLetterId,
) -> StorageResult<Option<DeadLetter>> {
    fetch_optional(
        db,
        "SELECT * FROM dead_letters WHERE id = $1",
        &[id.get().into()],
        rows::dead_letter,
    )
    .await
}

pub(crate) async fn duplicate_payments<'e>(
    db: impl Executor<'e, Database: Backend>,
    page: Page,
) -> StorageResult<Paged<DuplicatePayment>> {
    let rows = fetch_all(
        db,
        "SELECT * FROM duplicate_payments WHERE id > $1 ORDER BY id LIMIT $2",
        &[page.after_id().into(), page.fetch().into()],
        rows::paged_duplicate_payment,
    )
    .await?;
    Ok(Paged::from_rows(page, rows))
}

pub(crate) async fn duplicate_payment<'e>(
    db: impl Executor<'e, Database: Backend>,
    session_id: &PaymentSessionId,
    attempt: AttemptNumber,
) -> StorageResult<Option<DuplicatePayment>> {
    fetch_optional(
        db,
        "SELECT * FROM duplicate_payments WHERE session_id = $1 AND duplicate_attempt = $2",
        &[session_id.as_str().into(), i64::from(attempt.get()).into()],
        rows::duplicate_payment,
    )
    .await
}

pub(crate) async fn duplicate_payment_by_intent<'e>(
    db: impl Executor<'e, Database: Backend>,
    payment_intent: &str,
) -> StorageResult<Option<DuplicatePayment>> {
    fetch_optional(
        db,
        "SELECT * FROM duplicate_payments WHERE payment_intent = $1 ORDER BY id LIMIT 1",
        &[payment_intent.into()],
        rows::duplicate_payment,
    )
    .await
}

pub(crate) async fn duplicate_refunds_owed<'e>(
    db: impl Executor<'e, Database: Backend>,
    before: DateTime<Utc>,
    limit: u32,
) -> StorageResult<Vec<DuplicatePayment>> {
    fetch_all(
        db,
        "SELECT * FROM duplicate_payments
         WHERE status = 'refund_requested'
           AND (refund_attempted_at IS NULL OR refund_attempted_at <= $1)
         ORDER BY updated_at, id LIMIT $2",
        &[to_millis(before).into(), i64::from(limit).into()],
        rows::duplicate_payment,
    )
    .await
}

pub(crate) async fn checkout_attempt<'e>(
    db: impl Executor<'e, Database: Backend>,
    session: &PaymentSessionId,
    checkout: &ProviderSessionId,
) -> StorageResult<Option<AttemptNumber>> {
    fetch_optional(
        db,
        "SELECT attempt_number FROM payment_attempts
         WHERE session_id = $1 AND provider_session_id = $2",
        &[session.as_str().into(), checkout.as_str().into()],
        |row| Ok(attempt(row.int("attempt_number")?)),
    )
    .await
}

pub(crate) async fn sandbox_checkout<'e>(
    db: impl Executor<'e, Database: Backend>,
    id: &ProviderSessionId,
) -> StorageResult<Option<SandboxCheckout>> {
    fetch_optional(
        db,
        "SELECT * FROM sandbox_checkouts WHERE id = $1",
        &[id.as_str().into()],
        rows::sandbox_checkout,
    )
    .await
}

/// The value of the service secret `name` (read where the latest commit is visible).
pub(crate) async fn secret<'e>(
    db: impl Executor<'e, Database: Backend>,
    name: &str,
) -> StorageResult<Option<String>> {
    fetch_optional(
        db,
        "SELECT value FROM service_secrets WHERE name = $1",
        &[name.into()],
        |row| row.text("value"),
    )
    .await
}

/// Analytics events due for delivery at `now`, oldest first.
pub(crate) async fn analytics_batch<'e>(
    db: impl Executor<'e, Database: Backend>,
    now: DateTime<Utc>,
    limit: u32,
) -> StorageResult<Vec<AnalyticsRow>> {
    fetch_all(
        db,
        "SELECT id, payload FROM analytics_events
         WHERE next_attempt_at <= $1 ORDER BY id LIMIT $2",
        &[to_millis(now).into(), i64::from(limit).into()],
        rows::analytics,
    )
    .await
}

/// When the embedded queue next has a job to hand out. A leased job is next due when its
/// lease runs out (a lease always ends after its run_at): two indexed lookups instead of a
/// scan of the whole table.
pub(crate) async fn next_due<'e>(
    db: impl Executor<'e, Database: Backend>,
) -> StorageResult<Option<DateTime<Utc>>> {
    let next = fetch_optional(
        db,
        "SELECT MIN(t) AS next FROM (
            SELECT MIN(run_at) AS t FROM retry_jobs WHERE locked_until IS NULL
            UNION ALL
            SELECT MIN(locked_until) AS t FROM retry_jobs WHERE locked_until IS NOT NULL) AS due",
        &[],
        |row| row.opt_int("next"),
    )
    .await?;
    opt_time(next.flatten())
}

/// The session `id` and the idempotency record of `scope`, in one round trip: what a retry
/// request reads before it decides. Prepared once per connection: on PostgreSQL the
/// connection's planner never picks a scan where an index serves (`postgres.rs`).
pub(crate) async fn session_and_key<'e, E>(
    db: E,
    id: &PaymentSessionId,
    scope: &IdempotencyScope,
) -> StorageResult<(Option<SessionRecord>, Option<IdempotencyRecord>)>
where
    E: Executor<'e, Database: Backend>,
{
    const SQL: &str = "SELECT s.*, k.fingerprint AS key_fingerprint,
            k.response_status AS key_response_status, k.response_body AS key_response_body,
            k.locked_at AS key_locked_at, k.created_at AS key_created_at
         FROM (SELECT 1 AS request) AS request
         LEFT JOIN payment_sessions AS s ON s.id = $1
         LEFT JOIN idempotency_keys AS k ON k.caller = $2 AND k.idempotency_key = $3";
    let args = [
        id.as_str().into(),
        scope.caller.as_str().into(),
        scope.key.as_str().into(),
    ];
    let row = <E::Database as Backend>::query(SQL, &args)
        .fetch_one(db)
        .await?;
    let session = match row.opt_text("id")? {
        Some(_) => Some(rows::session(&row)?),
        None => None,
    };
    Ok((session, rows::idempotency_record(&row, "key_")?))
}

/// The columns the admin routes show of a delivery.
macro_rules! delivery_columns {
    () => {
        "SELECT id, event_id, session_id, event_type, sequence, status, attempts, last_error,
            next_attempt_at, created_at, delivered_at FROM webhook_deliveries"
    };
}

/// One page of merchant webhook deliveries, oldest first. Each filter has its own statement,
/// so each is an index lookup (`webhook_deliveries_by_status`, the `(session_id, sequence)`
/// key) rather than one plan for every combination.
pub(crate) async fn webhook_deliveries<'e>(
    db: impl Executor<'e, Database: Backend>,
    filter: &super::DeliveryFilter,
    page: Page,
) -> StorageResult<Paged<super::WebhookDelivery>> {
    const ALL: &str = concat!(delivery_columns!(), " WHERE id > $1 ORDER BY id LIMIT $2");
    const BY_STATUS: &str = concat!(
        delivery_columns!(),
        " WHERE status = $3 AND id > $1 ORDER BY status, id LIMIT $2"
    );
    /// A session has a handful of events: its key finds them, the status filters them.
    const BY_SESSION: &str = concat!(
        delivery_columns!(),
        " WHERE session_id = $3 AND ($4 = '' OR status = $4) AND id > $1 ORDER BY id LIMIT $2"
    );
    let mut args = vec![page.after_id().into(), page.fetch().into()];
    let status = filter.status.map(super::DeliveryStatus::as_str);
    let sql = match (&filter.session, status) {
        (Some(session), status) => {
            args.push(session.as_str().into());
            args.push(status.unwrap_or("").into());
            BY_SESSION
        }
        (None, Some(status)) => {
            args.push(status.into());
            BY_STATUS
        }
        (None, None) => ALL,
    };
    let rows = fetch_all(db, sql, &args, rows::webhook_delivery).await?;
    Ok(Paged::from_rows(page, rows))
}

pub(crate) async fn webhook_delivery<'e>(
    db: impl Executor<'e, Database: Backend>,
    id: payretry_domain::DeliveryId,
) -> StorageResult<Option<super::WebhookDelivery>> {
    const SQL: &str = concat!(delivery_columns!(), " WHERE id = $1");
    let found = fetch_optional(db, SQL, &[id.get().into()], rows::webhook_delivery).await?;
    Ok(found.map(|(_, delivery)| delivery))
}

/// When the next pending delivery is due (a leased one: when its lease ends).
pub(crate) async fn next_webhook_due<'e>(
    db: impl Executor<'e, Database: Backend>,
) -> StorageResult<Option<DateTime<Utc>>> {
    let next = fetch_optional(
        db,
        "SELECT MIN(next_attempt_at) AS next FROM webhook_deliveries WHERE status = 'pending'",
        &[],
        |row| row.opt_int("next"),
    )
    .await?;
    opt_time(next.flatten())
}

/// The sessions below the page's key, newest first. Each filter has its own statement, so
/// each is one backwards range read of its index (`payment_sessions_by_created`, `_by_status`,
/// `_by_buyer`: migration 0014). A buyer has a handful of sessions: the buyer's index finds
/// them, the status (if asked for) filters them. The first page continues below a key no
/// session has (`created_at` at its maximum).
pub(crate) async fn sessions<'e>(
    db: impl Executor<'e, Database: Backend>,
    filter: &super::SessionFilter,
    page: &super::SessionPage,
) -> StorageResult<Paged<SessionRecord, super::SessionKey>> {
    const ALL: &str = "SELECT * FROM payment_sessions
         WHERE (created_at, id) < ($1, $2)
         ORDER BY created_at DESC, id DESC LIMIT $3";
    const BY_STATUS: &str = "SELECT * FROM payment_sessions
         WHERE status = $4 AND (created_at, id) < ($1, $2)
         ORDER BY created_at DESC, id DESC LIMIT $3";
    const BY_BUYER: &str = "SELECT * FROM payment_sessions
         WHERE buyer_id = $4 AND ($5 = '' OR status = $5) AND (created_at, id) < ($1, $2)
         ORDER BY created_at DESC, id DESC LIMIT $3";
    let (created_at, id) = match &page.before {
        Some(key) => (to_millis(key.created_at), key.id.as_str()),
        None => (i64::MAX, ""),
    };
    let mut args = vec![created_at.into(), id.into(), page.fetch().into()];
    let status = filter.status.map(payretry_domain::SessionStatus::as_str);
    let sql = match (&filter.buyer, status) {
        (Some(buyer), status) => {
            args.push(buyer.as_str().into());
            args.push(status.unwrap_or("").into());
            BY_BUYER
        }
        (None, Some(status)) => {
            args.push(status.into());
            BY_STATUS
        }
        (None, None) => ALL,
    };
    let rows = fetch_all(db, sql, &args, |row| {
        let session = rows::session(row)?;
        Ok((super::SessionKey::of(&session), session))
    })
    .await?;
    Ok(Paged::from_keyed_rows(page.limit, rows))
}

/// The retry funnel: retries (attempt rows past attempt 0) created from `$1` to `$2` (ms),
/// counted by where each stands, per attempt number and currency. One range read of
/// `payment_attempts_retries_by_created` (migration 0014), each row joined to its session
/// through the primary key for the currency and the amount (PostgreSQL may instead hash the
/// retries and read the key once, for a long period). `CAST`: PostgreSQL's `SUM` of a
/// `BIGINT` is a `NUMERIC`, and every number payretry reads is an `i64`.
pub(crate) async fn retry_funnel<'e>(
    db: impl Executor<'e, Database: Backend>,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> StorageResult<Vec<super::FunnelRow>> {
    fetch_all(
        db,
        RETRY_FUNNEL,
        &[to_millis(since).into(), to_millis(until).into()],
        rows::funnel_row,
    )
    .await
}

/// The statement [`retry_funnel`] runs, with `$1` the period's start and `$2` its end (ms).
/// A retry is in progress only while it is its session's latest and the session is live: a
/// retry left open when the session was paid through an older checkout, or when the window
/// closed, keeps its attempt row's status but is no longer in progress.
/// `scripts/funnel_bench.sh` times this text as it stands here.
pub(crate) const RETRY_FUNNEL: &str = "SELECT a.attempt_number, s.currency,
        COUNT(*) AS scheduled,
        COUNT(a.provider_session_id) AS checkout_created,
        COUNT(CASE WHEN a.status = 'succeeded' THEN 1 END) AS paid,
        COUNT(CASE WHEN a.status = 'failed' THEN 1 END) AS failed_again,
        COUNT(CASE WHEN a.status = 'abandoned' THEN 1 END) AS abandoned,
        COUNT(CASE WHEN a.status = 'dead_lettered' THEN 1 END) AS dead_lettered,
        COUNT(CASE WHEN a.status IN ('scheduled', 'open', 'processing')
            AND s.status IN ('open', 'retry_scheduled', 'processing')
            AND s.retry_attempts = a.attempt_number THEN 1 END) AS in_progress,
        CAST(COALESCE(SUM(CASE WHEN a.status = 'succeeded' THEN s.amount END), 0) AS BIGINT)
            AS recovered
     FROM payment_attempts AS a
     JOIN payment_sessions AS s ON s.id = a.session_id
     WHERE a.attempt_number > 0 AND a.created_at >= $1 AND a.created_at <= $2
     GROUP BY a.attempt_number, s.currency
     ORDER BY a.attempt_number, s.currency";
