//! Rows into domain values, once for both backends (through [`Columns`]). A value that does
//! not parse is [`StorageError::Corrupt`](super::StorageError::Corrupt): the database holds
//! something payretry never wrote.

use super::sql::Columns;
use super::{
    AuditEntry, CheckoutClosure, DeadLetter, DuplicatePayment, IdempotencyRecord, SessionRecord,
    StorageResult, attempt, corrupt, from_millis, opt_time,
};
use crate::provider::sandbox::SandboxCheckout;
use crate::queue::Delivery;
use crate::telemetry::analytics::AnalyticsRow;
use payretry_domain::{
    Amount, Currency, DeadLetterId, FailureReason, Money, PaymentSessionId, ProviderSessionId,
    SessionState, UserId,
};

fn count(row: &impl Columns, column: &str) -> StorageResult<u32> {
    u32::try_from(row.int(column)?).map_err(corrupt)
}

fn session_id(row: &impl Columns, column: &str) -> StorageResult<PaymentSessionId> {
    PaymentSessionId::parse(&row.text(column)?).map_err(corrupt)
}

fn reason(row: &impl Columns, column: &str) -> StorageResult<Option<FailureReason>> {
    Ok(row
        .opt_text(column)?
        .map(|code| FailureReason::from_code(&code)))
}

fn checkout(row: &impl Columns, column: &str) -> StorageResult<Option<ProviderSessionId>> {
    Ok(row.opt_text(column)?.map(ProviderSessionId::new))
}

/// The idempotency record in `row`, its columns named `{prefix}fingerprint` and so on;
/// `None` when the row holds none (a `LEFT JOIN` that found no key).
pub(crate) fn idempotency_record(
    row: &impl Columns,
    prefix: &str,
) -> StorageResult<Option<IdempotencyRecord>> {
    let column = |name: &str| format!("{prefix}{name}");
    let Some(fingerprint) = row.opt_text(&column("fingerprint"))? else {
        return Ok(None);
    };
    IdempotencyRecord::from_columns((
        fingerprint,
        row.opt_int(&column("response_status"))?,
        row.opt_bytes(&column("response_body"))?,
        row.int(&column("locked_at"))?,
        row.int(&column("created_at"))?,
    ))
    .map(Some)
}

/// A `payment_sessions` row.
pub(crate) fn session(row: &impl Columns) -> StorageResult<SessionRecord> {
    Ok(SessionRecord {
        id: session_id(row, "id")?,
        buyer: UserId::new(row.text("buyer_id")?),
        money: Money {
            amount: Amount::new(row.int("amount")?).map_err(corrupt)?,
            currency: Currency::parse(&row.text("currency")?).map_err(corrupt)?,
        },
        description: row.text("description")?,
        metadata: serde_json::from_str(&row.text("metadata")?).map_err(corrupt)?,
        expires_at: from_millis(row.int("expires_at")?)?,
        created_at: from_millis(row.int("created_at")?)?,
        updated_at: from_millis(row.int("updated_at")?)?,
        version: row.int("version")?,
        event_sequence: row.int("event_sequence")?,
        state: SessionState {
            status: row.text("status")?.parse().map_err(corrupt)?,
            failure_reason: reason(row, "failure_reason")?,
            retry_attempts: count(row, "retry_attempts")?,
            last_retry_at: opt_time(row.opt_int("last_retry_at")?)?,
            retry_reason: reason(row, "retry_reason")?,
            next_retry_at: opt_time(row.opt_int("next_retry_at")?)?,
            current_attempt: attempt(row.int("current_attempt")?),
            provider_session_id: checkout(row, "provider_session_id")?,
            checkout_url: row.opt_text("checkout_url")?,
            paid_attempt: row.opt_int("paid_attempt")?.map(attempt),
        },
    })
}

/// An `audit_log` row, with its id (the page cursor).
pub(crate) fn audit_entry(row: &impl Columns) -> StorageResult<(i64, AuditEntry)> {
    let entry = AuditEntry {
        at: from_millis(row.int("at")?)?,
        action: row.text("action")?,
        attempt: row.opt_int("attempt_number")?.map(attempt),
        actor: row.text("actor")?,
        details: serde_json::from_str(&row.text("details")?).map_err(corrupt)?,
    };
    Ok((row.int("id")?, entry))
}

/// A `dead_letters` row.
pub(crate) fn dead_letter(row: &impl Columns) -> StorageResult<DeadLetter> {
    Ok(DeadLetter {
        id: DeadLetterId::from_row(row.int("id")?).map_err(corrupt)?,
        job: serde_json::from_str(&row.text("payload")?).map_err(corrupt)?,
        receive_count: count(row, "receive_count")?,
        last_error: row.text("last_error")?,
        dead_at: from_millis(row.int("dead_at")?)?,
    })
}

/// A `dead_letters` row with its id (the page cursor).
pub(crate) fn paged_dead_letter(row: &impl Columns) -> StorageResult<(i64, DeadLetter)> {
    Ok((row.int("id")?, dead_letter(row)?))
}

/// A `duplicate_payments` row.
pub(crate) fn duplicate_payment(row: &impl Columns) -> StorageResult<DuplicatePayment> {
    Ok(DuplicatePayment {
        id: row.int("id")?.to_string(),
        session_id: session_id(row, "session_id")?,
        paid_attempt: attempt(row.int("paid_attempt")?),
        duplicate_attempt: attempt(row.int("duplicate_attempt")?),
        provider_session_id: checkout(row, "provider_session_id")?,
        payment_intent: row.opt_text("payment_intent")?,
        status: row.text("status")?.parse().map_err(corrupt)?,
        refund_id: row.opt_text("refund_id")?,
        last_error: row.opt_text("last_error")?,
        failure_reason: row.opt_text("failure_reason")?,
        detected_at: from_millis(row.int("detected_at")?)?,
        updated_at: from_millis(row.int("updated_at")?)?,
    })
}

/// A `duplicate_payments` row with its id (the page cursor).
pub(crate) fn paged_duplicate_payment(
    row: &impl Columns,
) -> StorageResult<(i64, DuplicatePayment)> {
    Ok((row.int("id")?, duplicate_payment(row)?))
}

/// A `checkout_closures` row.
pub(crate) fn checkout_closure(row: &impl Columns) -> StorageResult<CheckoutClosure> {
    Ok(CheckoutClosure {
        provider_session_id: ProviderSessionId::new(row.text("provider_session_id")?),
        session_id: session_id(row, "session_id")?,
        tries: u32::try_from(row.int("tries")?).unwrap_or(u32::MAX),
        created_at: from_millis(row.int("created_at")?)?,
    })
}

/// A `sandbox_checkouts` row.
pub(crate) fn sandbox_checkout(row: &impl Columns) -> StorageResult<SandboxCheckout> {
    Ok(SandboxCheckout {
        id: ProviderSessionId::new(row.text("id")?),
        session_id: session_id(row, "session_id")?,
        attempt: attempt(row.int("attempt_number")?),
        amount: row.int("amount")?,
        currency: row.text("currency")?,
        description: row.text("description")?,
        success_url: row.text("success_url")?,
        cancel_url: row.text("cancel_url")?,
        expires_at: from_millis(row.int("expires_at")?)?,
        status: row.text("status")?.parse().map_err(corrupt)?,
    })
}

/// An `analytics_events` row as the relay sends it.
pub(crate) fn analytics(row: &impl Columns) -> StorageResult<AnalyticsRow> {
    Ok(AnalyticsRow {
        id: row.int("id")?,
        payload: serde_json::from_str(&row.text("payload")?).map_err(corrupt)?,
    })
}

/// A claimed `retry_jobs` row (`id`, `payload`, `receive_count`, `first_delivered_at`) as the
/// delivery of a lease that ends at `locked_until` (ms): the receipt names both, see
/// [`super::parse_receipt`].
pub(crate) fn delivery(row: &impl Columns, locked_until: i64) -> StorageResult<Delivery> {
    let id = row.int("id")?;
    Ok(Delivery {
        job: serde_json::from_str(&row.text("payload")?).map_err(corrupt)?,
        receipt: format!("{id}:{locked_until}"),
        receive_count: count(row, "receive_count")?,
        first_delivered_at: super::from_millis(row.int("first_delivered_at")?)?,
    })
}

/// A `webhook_deliveries` row as the admin routes show it, with its id.
pub(crate) fn webhook_delivery(row: &impl Columns) -> StorageResult<(i64, super::WebhookDelivery)> {
    let id = row.int("id")?;
    let status = super::DeliveryStatus::parse(&row.text("status")?)
        .ok_or_else(|| corrupt("delivery status"))?;
    let delivery = super::WebhookDelivery {
        id: payretry_domain::DeliveryId::from_row(id).map_err(corrupt)?,
        event_id: row.text("event_id")?,
        event_type: row.text("event_type")?,
        session_id: session_id(row, "session_id")?,
        sequence: row.int("sequence")?,
        status,
        attempts: count(row, "attempts")?,
        last_error: row.opt_text("last_error")?,
        next_attempt_at: match status {
            super::DeliveryStatus::Pending => Some(from_millis(row.int("next_attempt_at")?)?),
            _ => None,
        },
        created_at: from_millis(row.int("created_at")?)?,
        delivered_at: opt_time(row.opt_int("delivered_at")?)?,
    };
    Ok((id, delivery))
}

/// A `webhook_deliveries` row a relay just leased; `next_attempt_at` holds the lease's end.
pub(crate) fn leased_delivery(row: &impl Columns) -> StorageResult<super::LeasedDelivery> {
    Ok(super::LeasedDelivery {
        id: payretry_domain::DeliveryId::from_row(row.int("id")?).map_err(corrupt)?,
        event_id: row.text("event_id")?,
        body: row.text("body")?,
        attempts: count(row, "attempts")?,
        redelivery: row.int("redelivery")? != 0,
        created_at: from_millis(row.int("created_at")?)?,
        lease: row.int("next_attempt_at")?,
    })
}

/// One group of the retry funnel (`reads::retry_funnel`).
pub(crate) fn funnel_row(row: &impl Columns) -> StorageResult<super::FunnelRow> {
    let total =
        |column: &str| -> StorageResult<u64> { u64::try_from(row.int(column)?).map_err(corrupt) };
    Ok(super::FunnelRow {
        attempt: attempt(row.int("attempt_number")?),
        currency: Currency::parse(&row.text("currency")?).map_err(corrupt)?,
        counts: super::FunnelCounts {
            scheduled: total("scheduled")?,
            checkout_created: total("checkout_created")?,
            paid: total("paid")?,
            failed_again: total("failed_again")?,
            abandoned: total("abandoned")?,
            dead_lettered: total("dead_lettered")?,
            in_progress: total("in_progress")?,
        },
        recovered: row.int("recovered")?,
    })
}
