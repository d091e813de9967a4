//! What a transition writes, as statements: pure, and the same for both backends.
//!
//! [`transition`] turns a [`Transition`] into its [`Write`]s in the order that keeps its
//! guarantees: the event id first (a redelivered event stops before it changes anything),
//! then the compare-and-set on the session (a lost race stops before anything else is
//! written), then what the change brings with it. A backend commits them as one unit
//! (SQLite in a savepoint of a group commit, PostgreSQL as one statement); each statement
//! here is the only copy of itself.

use super::sql::{Arg, IfNone, Refusal, Write};
use super::{
    Committed, DuplicatePaymentStatus, IDEMPOTENCY_TTL_MS, IdempotencyCompletion, IdempotencyScope,
    NewAuditEntry, NewSession, RefundSettlement, StorageResult, Transition, corrupt, parse_receipt,
    to_millis,
};
use crate::provider::sandbox::{SandboxCheckout, SandboxCheckoutStatus};
use payretry_domain::{AttemptNumber, PaymentSessionId, ProviderSessionId, RetryJob};

const RECORD_EVENT: &str = "INSERT INTO processed_webhook_events (event_id, processed_at)
     VALUES ($1, $2) ON CONFLICT (event_id) DO NOTHING";

const UPDATE_SESSION: &str = "UPDATE payment_sessions SET status = $1, failure_reason = $2,
        retry_attempts = $3, last_retry_at = $4, retry_reason = $5, next_retry_at = $6,
        current_attempt = $7, provider_session_id = $8, checkout_url = $9, paid_attempt = $10,
        updated_at = $11, version = version + 1, event_sequence = event_sequence + $14
     WHERE id = $12 AND version = $13";

/// One row per session and duplicate attempt: another event about the same payment (a
/// different event id) finds it, and the whole commit is dropped. On PostgreSQL the session
/// row is locked by the update before it, so a concurrent record of the same payment waits
/// here and then finds the row.
const RECORD_DUPLICATE_PAYMENT: &str = "INSERT INTO duplicate_payments (session_id,
        paid_attempt, duplicate_attempt, provider_session_id, payment_intent, status,
        detected_at, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
     ON CONFLICT (session_id, duplicate_attempt) DO NOTHING";

/// The target is aliased: PostgreSQL finds an unqualified column ambiguous next to
/// `excluded`, and SQLite accepts the alias too.
const UPSERT_ATTEMPT: &str = "INSERT INTO payment_attempts AS a (session_id, attempt_number,
        status, provider_session_id, failure_reason, scheduled_for, created_at, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
     ON CONFLICT (session_id, attempt_number) DO UPDATE SET
        status = excluded.status,
        provider_session_id = COALESCE(excluded.provider_session_id, a.provider_session_id),
        failure_reason = COALESCE(excluded.failure_reason, a.failure_reason),
        scheduled_for = COALESCE(excluded.scheduled_for, a.scheduled_for),
        updated_at = excluded.updated_at";

const APPEND_AUDIT: &str = "INSERT INTO audit_log (session_id, at, action, attempt_number,
        actor, details)
     VALUES ($1, $2, $3, $4, $5, $6)";

/// A checkout already recorded keeps its schedule.
const SCHEDULE_CLOSURE: &str = "INSERT INTO checkout_closures (provider_session_id, session_id,
        run_at, created_at)
     VALUES ($1, $2, $3, $3) ON CONFLICT (provider_session_id) DO NOTHING";

const ENQUEUE_JOB: &str = "INSERT INTO retry_jobs (session_id, attempt_number, payload, run_at,
        created_at)
     VALUES ($1, $2, $3, $4, $5)";

const DEAD_LETTER: &str = "INSERT INTO dead_letters (session_id, attempt_number, payload,
        receive_count, last_error, dead_at)
     VALUES ($1, $2, $3, $4, $5, $6)";

/// Guarded by the lease: after this delivery's lease expired and the job was delivered
/// again, `locked_until` differs and the new delivery keeps its job.
const DELETE_DELIVERED_JOB: &str = "DELETE FROM retry_jobs WHERE id = $1 AND locked_until = $2";

const REMOVE_DEAD_LETTER: &str = "DELETE FROM dead_letters WHERE id = $1";

/// Writes over a claim of the same request (a row with no response and the same fingerprint)
/// or an expired record, and over nothing else: zero rows touched means another response
/// stands. `$6` is now, `$7` the expiry cut-off.
const STORE_RESPONSE: &str = "INSERT INTO idempotency_keys (caller, idempotency_key,
        fingerprint, response_status, response_body, locked_at, created_at)
     VALUES ($1, $2, $3, $4, $5, $6, $6)
     ON CONFLICT (caller, idempotency_key) DO UPDATE SET
        fingerprint = excluded.fingerprint,
        response_status = excluded.response_status,
        response_body = excluded.response_body,
        created_at = CASE WHEN idempotency_keys.created_at <= $7
                          THEN excluded.created_at ELSE idempotency_keys.created_at END
     WHERE (idempotency_keys.response_status IS NULL
            AND idempotency_keys.fingerprint = excluded.fingerprint)
        OR idempotency_keys.created_at <= $7";

const QUEUE_ANALYTICS: &str = "INSERT INTO analytics_events (message_id, payload, created_at,
        next_attempt_at)
     VALUES ($1, $2, $3, $3) ON CONFLICT (message_id) DO NOTHING";

const QUEUE_MERCHANT_EVENT: &str = "INSERT INTO webhook_deliveries (event_id, session_id,
        event_type, sequence, body, next_attempt_at, created_at, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6, $6, $6)";

const INSERT_SESSION: &str = "INSERT INTO payment_sessions (id, buyer_id, status, amount,
        currency, description, metadata, current_attempt, provider_session_id, checkout_url,
        expires_at, created_at, updated_at)
     VALUES ($1, $2, 'open', $3, $4, $5, $6, 0, $7, $8, $9, $10, $10)";

const INSERT_FIRST_ATTEMPT: &str = "INSERT INTO payment_attempts (session_id, attempt_number,
        status, provider_session_id, created_at, updated_at)
     VALUES ($1, 0, 'open', $2, $3, $3)";

/// The writes of `t`, committed at `now` (ms).
pub(crate) fn transition(t: &Transition, now: i64) -> StorageResult<Vec<Write>> {
    let session = t.session_id.as_str();
    let mut writes = Vec::new();
    if let Some(event_id) = &t.webhook_event_id {
        writes.push(
            Write::new(RECORD_EVENT, [event_id.as_str().into(), now.into()])
                .or(IfNone::Stop(Committed::DuplicateEvent)),
        );
    }
    let s = &t.state;
    writes.push(
        Write::new(
            UPDATE_SESSION,
            [
                s.status.as_str().into(),
                s.failure_reason.as_ref().map(|r| r.as_str()).into(),
                i64::from(s.retry_attempts).into(),
                s.last_retry_at.map(to_millis).into(),
                s.retry_reason.as_ref().map(|r| r.as_str()).into(),
                s.next_retry_at.map(to_millis).into(),
                i64::from(s.current_attempt.get()).into(),
                s.provider_session_id.as_ref().map(|p| p.as_str()).into(),
                s.checkout_url.as_deref().into(),
                s.paid_attempt.map(|a| i64::from(a.get())).into(),
                now.into(),
                session.into(),
                t.expected_version.into(),
                i64::try_from(t.merchant_events.len()).unwrap_or(0).into(),
            ],
        )
        .or(IfNone::Stop(Committed::Conflict)),
    );
    if let Some(d) = &t.duplicate_payment {
        writes.push(
            Write::new(
                RECORD_DUPLICATE_PAYMENT,
                [
                    session.into(),
                    i64::from(d.paid_attempt.get()).into(),
                    i64::from(d.duplicate_attempt.get()).into(),
                    d.provider_session_id.as_ref().map(|p| p.as_str()).into(),
                    d.payment_intent.as_deref().into(),
                    d.status.as_str().into(),
                    now.into(),
                ],
            )
            .or(IfNone::Stop(Committed::DuplicateEvent)),
        );
    }
    if let Some(a) = &t.attempt {
        writes.push(Write::new(
            UPSERT_ATTEMPT,
            [
                session.into(),
                i64::from(a.attempt.get()).into(),
                a.status.as_str().into(),
                a.provider_session_id.as_ref().map(|p| p.as_str()).into(),
                a.failure_reason.as_ref().map(|r| r.as_str()).into(),
                a.scheduled_for.map(to_millis).into(),
                now.into(),
            ],
        ));
    }
    writes.extend(t.audit.iter().map(|entry| audit(&t.session_id, now, entry)));
    writes.extend(closures(&t.session_id, &t.close_checkouts, now));
    if let Some(job) = &t.enqueue {
        writes.push(enqueue(job, now)?);
    }
    if let Some(dead) = &t.dead_letter {
        writes.push(Write::new(
            DEAD_LETTER,
            [
                dead.job.payment_session_id.as_str().into(),
                i64::from(dead.job.attempt_number.get()).into(),
                serde_json::to_string(&dead.job).map_err(corrupt)?.into(),
                i64::from(dead.receive_count).into(),
                dead.last_error.as_str().into(),
                now.into(),
            ],
        ));
    }
    if let Some(receipt) = &t.settles {
        writes.push(delete_delivered_job(receipt)?);
    }
    if let Some(id) = t.redrive {
        // Gone already: another redrive of it committed first. Nothing is written, and the
        // caller reloads the session and finds it moved on.
        writes.push(
            Write::new(REMOVE_DEAD_LETTER, [id.get().into()]).or(IfNone::Stop(Committed::Conflict)),
        );
    }
    if let Some(completion) = &t.idempotency {
        writes.push(store_response(completion, now));
    }
    writes.extend(t.analytics.iter().map(|event| {
        Write::new(
            QUEUE_ANALYTICS,
            [
                event.message_id.as_str().into(),
                event.payload.to_string().into(),
                now.into(),
            ],
        )
    }));
    writes.extend(t.merchant_events.iter().map(|event| {
        Write::new(
            QUEUE_MERCHANT_EVENT,
            [
                event.event_id.as_str().into(),
                session.into(),
                event.event_type.as_str().into(),
                event.sequence.into(),
                event.body.as_str().into(),
                now.into(),
            ],
        )
    }));
    Ok(writes)
}

/// The writes of a new session: the session, its first attempt, its audit entry and, when
/// the request was idempotent, the stored response.
pub(crate) fn new_session(s: &NewSession) -> Vec<Write> {
    let now = to_millis(s.created_at);
    let mut writes = vec![
        Write::new(
            INSERT_SESSION,
            [
                s.id.as_str().into(),
                s.buyer.as_str().into(),
                s.money.amount.minor_units().into(),
                s.money.currency.as_str().into(),
                s.description.as_str().into(),
                s.metadata.to_string().into(),
                s.provider_session_id.as_str().into(),
                s.checkout_url.as_str().into(),
                to_millis(s.expires_at).into(),
                now.into(),
            ],
        ),
        Write::new(
            INSERT_FIRST_ATTEMPT,
            [
                s.id.as_str().into(),
                s.provider_session_id.as_str().into(),
                now.into(),
            ],
        ),
        audit(&s.id, now, &s.audit),
    ];
    if let Some(completion) = &s.idempotency {
        writes.push(store_response(completion, now));
    }
    writes
}

/// An audit entry of `session` at `at` (ms).
pub(crate) fn audit(session: &PaymentSessionId, at: i64, entry: &NewAuditEntry) -> Write {
    Write::new(
        APPEND_AUDIT,
        [
            session.as_str().into(),
            at.into(),
            entry.action.as_str().into(),
            entry.attempt.map(|a| i64::from(a.get())).into(),
            entry.actor.as_str().into(),
            entry.details.to_string().into(),
        ],
    )
}

/// Checkouts of `session` to close, due at `now` (ms).
pub(crate) fn closures<'a>(
    session: &'a PaymentSessionId,
    checkouts: &'a [ProviderSessionId],
    now: i64,
) -> impl Iterator<Item = Write> + 'a {
    checkouts.iter().map(move |checkout| {
        Write::new(
            SCHEDULE_CLOSURE,
            [
                checkout.as_str().into(),
                session.as_str().into(),
                now.into(),
            ],
        )
    })
}

/// `job` into the embedded queue's table (the outbox of the SQS relay too), due at its
/// `scheduled_for`.
pub(crate) fn enqueue(job: &RetryJob, now: i64) -> StorageResult<Write> {
    Ok(Write::new(
        ENQUEUE_JOB,
        [
            job.payment_session_id.as_str().into(),
            i64::from(job.attempt_number.get()).into(),
            serde_json::to_string(job).map_err(corrupt)?.into(),
            to_millis(job.scheduled_for).into(),
            now.into(),
        ],
    ))
}

/// Deletes the job of the delivery with `receipt` (an acknowledgement), if that delivery
/// still holds it.
pub(crate) fn delete_delivered_job(receipt: &str) -> StorageResult<Write> {
    let (id, lease) = parse_receipt(receipt)?;
    Ok(Write::new(DELETE_DELIVERED_JOB, [id.into(), lease.into()]))
}

/// Stores `completion`'s response under its key; another response already standing fails
/// the transaction with [`super::StorageError::IdempotencyKeyTaken`].
pub(crate) fn store_response(completion: &IdempotencyCompletion, now: i64) -> Write {
    Write::new(
        STORE_RESPONSE,
        [
            completion.scope.caller.as_str().into(),
            completion.scope.key.as_str().into(),
            completion.scope.fingerprint.as_str().into(),
            i64::from(completion.response.status).into(),
            Arg::Bytes(completion.response.body.clone()),
            now.into(),
            (now - IDEMPOTENCY_TTL_MS).into(),
        ],
    )
    .or(IfNone::Fail(Refusal::IdempotencyKeyTaken))
}

const SETTLE_REFUND: &str = "UPDATE duplicate_payments SET status = $1,
        refund_id = COALESCE($2, refund_id), last_error = $3, failure_reason = $4,
        updated_at = $5
     WHERE session_id = $6 AND duplicate_attempt = $7 AND status IN ($8, $9, $10)";

/// The writes that settle the refund of `session`'s duplicate `attempt`: the provider event
/// that reported it (a redelivery stops with [`Committed::DuplicateEvent`]), the move of the
/// row (a row no longer in a state the settlement moves from stops with
/// [`Committed::Conflict`]) and its audit entry.
pub(crate) fn settle_refund(
    session: &PaymentSessionId,
    attempt: AttemptNumber,
    settlement: &RefundSettlement,
    audit_entry: Option<&NewAuditEntry>,
    event_id: Option<&str>,
    now: i64,
) -> Vec<Write> {
    let (status, refund_id, error, failure_reason) = settlement_columns(settlement);
    let mut writes = Vec::new();
    if let Some(event_id) = event_id {
        writes.push(
            Write::new(RECORD_EVENT, [event_id.into(), now.into()])
                .or(IfNone::Stop(Committed::DuplicateEvent)),
        );
    }
    let mut args: Vec<Arg> = vec![
        status.as_str().into(),
        refund_id.into(),
        error.into(),
        failure_reason.into(),
        now.into(),
        session.as_str().into(),
        i64::from(attempt.get()).into(),
    ];
    args.extend(settlement_from(settlement).map(Arg::from));
    writes.push(Write::new(SETTLE_REFUND, args).or(IfNone::Stop(Committed::Conflict)));
    writes.extend(audit_entry.map(|entry| audit(session, now, entry)));
    writes
}

/// The columns a settlement writes: `status`, `refund_id` (`None` keeps the recorded one),
/// `last_error` and `failure_reason`.
fn settlement_columns(
    settlement: &RefundSettlement,
) -> (
    DuplicatePaymentStatus,
    Option<&str>,
    Option<&str>,
    Option<&str>,
) {
    match settlement {
        RefundSettlement::Pending { refund_id } => (
            DuplicatePaymentStatus::RefundPending,
            Some(refund_id),
            None,
            None,
        ),
        RefundSettlement::Refunded { refund_id } => (
            DuplicatePaymentStatus::Refunded,
            refund_id.as_deref(),
            None,
            None,
        ),
        RefundSettlement::Failed {
            refund_id,
            failure_reason,
            error,
        } => (
            DuplicatePaymentStatus::RefundFailed,
            refund_id.as_deref(),
            Some(error),
            failure_reason.as_deref(),
        ),
    }
}

/// [`RefundSettlement::moves_from`] as exactly three values for `status IN ($8, $9, $10)`
/// (repeating the first), so the statement text is fixed.
fn settlement_from(settlement: &RefundSettlement) -> [&'static str; 3] {
    let from = settlement.moves_from();
    let at = |i: usize| from.get(i).unwrap_or(&from[0]).as_str();
    [at(0), at(1), at(2)]
}

/// The checkout is closed (or no longer open): nothing more to do for it.
pub(crate) fn checkout_closed(checkout: &ProviderSessionId) -> Write {
    Write::new(
        "DELETE FROM checkout_closures WHERE provider_session_id = $1",
        [checkout.as_str().into()],
    )
}

/// Closing the checkout failed: it is tried again at `retry_at` (ms).
pub(crate) fn checkout_close_failed(
    checkout: &ProviderSessionId,
    retry_at: i64,
    error: &str,
) -> Write {
    Write::new(
        "UPDATE checkout_closures SET run_at = $1, tries = tries + 1, last_error = $2
         WHERE provider_session_id = $3",
        [retry_at.into(), error.into(), checkout.as_str().into()],
    )
}

/// Releases a claim on an idempotency key that never got a response, so the key can be
/// used afresh; a stored response stays.
pub(crate) fn abandon_idempotent(scope: &IdempotencyScope) -> Write {
    Write::new(
        "DELETE FROM idempotency_keys
         WHERE caller = $1 AND idempotency_key = $2 AND response_status IS NULL",
        [scope.caller.as_str().into(), scope.key.as_str().into()],
    )
}

/// Stores a service secret unless one of that name exists: the first stored value stands.
pub(crate) fn first_secret(name: &str, value: String) -> Write {
    Write::new(
        "INSERT INTO service_secrets (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        [name.into(), value.into()],
    )
}

/// A sandbox checkout, unless one with its id exists (a redelivered create).
pub(crate) fn put_sandbox_checkout(c: &SandboxCheckout, now: i64) -> Write {
    Write::new(
        "INSERT INTO sandbox_checkouts (id, session_id, attempt_number, amount, currency,
            description, success_url, cancel_url, expires_at, status, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (id) DO NOTHING",
        [
            c.id.as_str().into(),
            c.session_id.as_str().into(),
            i64::from(c.attempt.get()).into(),
            c.amount.into(),
            c.currency.as_str().into(),
            c.description.as_str().into(),
            c.success_url.as_str().into(),
            c.cancel_url.as_str().into(),
            to_millis(c.expires_at).into(),
            c.status.as_str().into(),
            now.into(),
        ],
    )
}

/// Moves a sandbox checkout from `from` to `to`; one no longer in `from` stops with
/// [`Committed::Conflict`].
pub(crate) fn sandbox_checkout_status(
    id: &ProviderSessionId,
    from: SandboxCheckoutStatus,
    to: SandboxCheckoutStatus,
) -> Write {
    Write::new(
        "UPDATE sandbox_checkouts SET status = $1 WHERE id = $2 AND status = $3",
        [to.as_str().into(), id.as_str().into(), from.as_str().into()],
    )
    .or(IfNone::Stop(Committed::Conflict))
}

/// Claims the owed refund of `session`'s duplicate `attempt` at `now` (ms), unless another
/// claim after `before` (ms) holds it; a lost claim stops with [`Committed::Conflict`]. On
/// PostgreSQL the condition is re-checked after a concurrent claim's commit (READ
/// COMMITTED), so one claim wins.
pub(crate) fn claim_refund(
    session: &PaymentSessionId,
    attempt: AttemptNumber,
    before: i64,
    now: i64,
) -> Write {
    Write::new(
        "UPDATE duplicate_payments SET refund_attempted_at = $1
         WHERE session_id = $2 AND duplicate_attempt = $3 AND status = 'refund_requested'
           AND (refund_attempted_at IS NULL OR refund_attempted_at <= $4)",
        [
            now.into(),
            session.as_str().into(),
            i64::from(attempt.get()).into(),
            before.into(),
        ],
    )
    .or(IfNone::Stop(Committed::Conflict))
}

/// Whether a released delivery counts towards the job's receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// It failed (or ran out of time): it counts.
    Counted,
    /// It did not run for a reason that is not the job's (the provider's rate limit): as if
    /// it never happened.
    Uncounted,
}

/// Puts the job of the delivery with `receipt` back, due at `run_at` (ms), if that delivery
/// still holds it.
pub(crate) fn release_job(
    receipt: &str,
    run_at: i64,
    error: &str,
    delivered: Delivered,
) -> StorageResult<Write> {
    let (id, lease) = parse_receipt(receipt)?;
    let uncount = i64::from(delivered == Delivered::Uncounted);
    Ok(Write::new(
        "UPDATE retry_jobs SET run_at = $1, locked_until = NULL, last_error = $2,
            receive_count = receive_count - $5
         WHERE id = $3 AND locked_until = $4",
        [
            run_at.into(),
            error.into(),
            id.into(),
            lease.into(),
            uncount.into(),
        ],
    ))
}

/// Forgets idempotency records and processed event ids older than `before` (ms).
pub(crate) fn purge(before: i64) -> [Write; 2] {
    [
        Write::new(
            "DELETE FROM idempotency_keys WHERE created_at < $1",
            [before.into()],
        ),
        Write::new(
            "DELETE FROM processed_webhook_events WHERE processed_at < $1",
            [before.into()],
        ),
    ]
}

/// Written only while the row still holds the lease it was claimed with (`$7`), and only for
/// a pending row, so a relay whose lease ran out writes nothing.
const SETTLE_DELIVERY: &str = "UPDATE webhook_deliveries SET status = $1, attempts = attempts + 1,
        next_attempt_at = $2, last_error = $3, delivered_at = $4, redelivery = 0,
        updated_at = $5
     WHERE id = $6 AND next_attempt_at = $7 AND status = 'pending'";

/// A failed or delivered delivery, due again at once for one try.
const REDELIVER: &str = "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $1,
        redelivery = 1, updated_at = $1
     WHERE id = $2 AND status IN ('failed', 'delivered')";

/// Records the `outcome` of the leased try of `delivery`, at `now` (ms). Touching no row means
/// the lease was lost ([`Committed::Conflict`]).
pub(crate) fn settle_delivery(
    delivery: &super::LeasedDelivery,
    outcome: &super::DeliveryOutcome,
    now: i64,
) -> Write {
    use super::{DeliveryOutcome, DeliveryStatus};
    let (status, next, error, delivered_at) = match outcome {
        DeliveryOutcome::Delivered => (DeliveryStatus::Delivered, now, None, Some(now)),
        DeliveryOutcome::Retry { at, error } => (
            DeliveryStatus::Pending,
            to_millis(*at),
            Some(error.as_str()),
            None,
        ),
        DeliveryOutcome::Failed { error } => {
            (DeliveryStatus::Failed, now, Some(error.as_str()), None)
        }
    };
    Write::new(
        SETTLE_DELIVERY,
        [
            status.as_str().into(),
            next.into(),
            error.into(),
            delivered_at.into(),
            now.into(),
            delivery.id.get().into(),
            delivery.lease.into(),
        ],
    )
    .or(IfNone::Stop(Committed::Conflict))
}

/// Queues delivery `id` again at `now` (ms); touching no row means it is pending already or
/// does not exist ([`Committed::Conflict`]).
pub(crate) fn redeliver(id: payretry_domain::DeliveryId, now: i64) -> Write {
    Write::new(REDELIVER, [now.into(), id.get().into()]).or(IfNone::Stop(Committed::Conflict))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{NewDeadLetter, NewDuplicatePayment, StoredResponse};
    use crate::telemetry::analytics::AnalyticsEvent;
    use chrono::{TimeZone, Utc};
    use payretry_domain::lifecycle::{
        AttemptChange, AttemptStatus, ProviderCheckout, SessionState,
    };
    use payretry_domain::{AuditAction, DeadLetterId, FailureReason, UserId};
    use serde_json::json;

    const NOW: i64 = 1_800_000_000_000;

    fn session_id() -> PaymentSessionId {
        PaymentSessionId::parse("ps_1").unwrap()
    }

    fn job() -> RetryJob {
        let at = Utc.timestamp_millis_opt(NOW).unwrap();
        RetryJob::new(session_id(), AttemptNumber::new(2), 300, at, at)
    }

    fn entry() -> NewAuditEntry {
        NewAuditEntry {
            action: AuditAction::RetryRequested,
            attempt: Some(AttemptNumber::new(1)),
            actor: "buyer_1:buyer".into(),
            details: json!({"n": 1}),
        }
    }

    fn completion() -> IdempotencyCompletion {
        IdempotencyCompletion {
            scope: IdempotencyScope {
                caller: UserId::new("buyer_1"),
                key: "k1".into(),
                fingerprint: "f1".into(),
            },
            response: StoredResponse {
                status: 202,
                body: b"{}".to_vec(),
            },
        }
    }

    /// A transition carrying one of everything a transition can carry.
    fn everything() -> Transition {
        let checkout = ProviderCheckout {
            id: ProviderSessionId::new("cs_2"),
            url: "https://checkout.example/cs_2".into(),
            expires_at: Utc.timestamp_millis_opt(NOW).unwrap(),
        };
        Transition {
            session_id: session_id(),
            expected_version: 7,
            state: SessionState::opened(&checkout),
            attempt: Some(AttemptChange {
                attempt: AttemptNumber::new(2),
                status: AttemptStatus::Scheduled,
                provider_session_id: None,
                failure_reason: Some(FailureReason::from_code("card_declined")),
                scheduled_for: Some(Utc.timestamp_millis_opt(NOW).unwrap()),
            }),
            audit: vec![entry(), entry()],
            enqueue: Some(job()),
            dead_letter: Some(NewDeadLetter {
                job: job(),
                receive_count: 5,
                last_error: "boom".into(),
            }),
            redrive: Some(DeadLetterId::parse("9").unwrap()),
            webhook_event_id: Some("evt_1".into()),
            idempotency: Some(completion()),
            analytics: vec![AnalyticsEvent {
                message_id: "m1".into(),
                payload: json!({"event": "x"}),
            }],
            merchant_events: vec![super::super::NewMerchantEvent {
                event_id: "msg_ps_1_8".into(),
                event_type: payretry_domain::merchant_event::MerchantEventType::Failed,
                sequence: 8,
                body: "{}".into(),
            }],
            duplicate_payment: Some(NewDuplicatePayment {
                paid_attempt: AttemptNumber::new(0),
                duplicate_attempt: AttemptNumber::new(1),
                provider_session_id: Some(ProviderSessionId::new("cs_1")),
                payment_intent: Some("pi_1".into()),
                status: DuplicatePaymentStatus::Detected,
            }),
            close_checkouts: vec![
                ProviderSessionId::new("cs_0"),
                ProviderSessionId::new("cs_1"),
            ],
            settles: Some("41:1800000060000".into()),
        }
    }

    /// The highest `$n` a statement names.
    fn placeholders(sql: &str) -> usize {
        sql.split('$')
            .skip(1)
            .filter_map(|rest| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn every_write_binds_exactly_the_placeholders_its_statement_names() {
        let mut writes = transition(&everything(), NOW).unwrap();
        writes.extend(new_session(&NewSession {
            id: session_id(),
            buyer: UserId::new("buyer_1"),
            money: payretry_domain::Money {
                amount: payretry_domain::Amount::new(1999).unwrap(),
                currency: payretry_domain::Currency::parse("usd").unwrap(),
            },
            description: "order".into(),
            metadata: json!({}),
            expires_at: Utc.timestamp_millis_opt(NOW).unwrap(),
            created_at: Utc.timestamp_millis_opt(NOW).unwrap(),
            provider_session_id: ProviderSessionId::new("cs_0"),
            checkout_url: "https://checkout.example/cs_0".into(),
            audit: entry(),
            idempotency: Some(completion()),
        }));
        writes.extend(settle_refund(
            &session_id(),
            AttemptNumber::new(1),
            &RefundSettlement::Failed {
                refund_id: Some("re_1".into()),
                failure_reason: Some("expired_or_canceled_card".into()),
                error: "declined".into(),
            },
            Some(&entry()),
            Some("evt_2"),
            NOW,
        ));
        let leased = super::super::LeasedDelivery {
            id: payretry_domain::DeliveryId::parse("3").unwrap(),
            event_id: "msg_ps_1_1".into(),
            body: "{}".into(),
            attempts: 1,
            redelivery: false,
            created_at: Utc.timestamp_millis_opt(NOW).unwrap(),
            lease: NOW + 25_000,
        };
        for outcome in [
            super::super::DeliveryOutcome::Delivered,
            super::super::DeliveryOutcome::Failed {
                error: "500".into(),
            },
        ] {
            writes.push(settle_delivery(&leased, &outcome, NOW));
        }
        writes.push(redeliver(leased.id, NOW));
        for write in &writes {
            assert_eq!(placeholders(write.sql), write.args.len(), "{}", write.sql);
        }
    }

    #[test]
    fn a_transition_writes_its_event_first_and_its_compare_and_set_second() {
        let writes = transition(&everything(), NOW).unwrap();
        assert_eq!(writes[0].sql, RECORD_EVENT);
        assert_eq!(writes[0].if_none, IfNone::Stop(Committed::DuplicateEvent));
        assert_eq!(writes[1].sql, UPDATE_SESSION);
        assert_eq!(writes[1].if_none, IfNone::Stop(Committed::Conflict));
        assert_eq!(writes[1].args[12], Arg::from(7), "the version compared");
        assert_eq!(
            writes[1].args[13],
            Arg::from(1),
            "the sequence advanced by the events written"
        );
        assert_eq!(
            writes[1].args[11],
            Arg::from("ps_1"),
            "the session compared"
        );
    }

    #[test]
    fn a_transition_writes_one_of_each_thing_it_carries() {
        let writes = transition(&everything(), NOW).unwrap();
        let count = |sql: &str| writes.iter().filter(|w| w.sql == sql).count();
        assert_eq!(count(RECORD_DUPLICATE_PAYMENT), 1);
        assert_eq!(count(UPSERT_ATTEMPT), 1);
        assert_eq!(count(APPEND_AUDIT), 2);
        assert_eq!(count(SCHEDULE_CLOSURE), 2);
        assert_eq!(count(ENQUEUE_JOB), 1);
        assert_eq!(count(DEAD_LETTER), 1);
        assert_eq!(count(DELETE_DELIVERED_JOB), 1);
        assert_eq!(count(REMOVE_DEAD_LETTER), 1);
        assert_eq!(count(STORE_RESPONSE), 1);
        assert_eq!(count(QUEUE_ANALYTICS), 1);
        assert_eq!(count(QUEUE_MERCHANT_EVENT), 1);
        assert_eq!(writes.len(), 15);
    }

    #[test]
    fn what_touching_no_row_means_is_stated_per_write() {
        let writes = transition(&everything(), NOW).unwrap();
        let if_none = |sql: &str| writes.iter().find(|w| w.sql == sql).unwrap().if_none;
        assert_eq!(
            if_none(RECORD_DUPLICATE_PAYMENT),
            IfNone::Stop(Committed::DuplicateEvent)
        );
        assert_eq!(
            if_none(REMOVE_DEAD_LETTER),
            IfNone::Stop(Committed::Conflict)
        );
        assert_eq!(
            if_none(STORE_RESPONSE),
            IfNone::Fail(Refusal::IdempotencyKeyTaken)
        );
        // An already-closing checkout, a repeated analytics id, an acknowledgement whose
        // lease ran out: none of these undoes the change.
        for sql in [
            SCHEDULE_CLOSURE,
            QUEUE_ANALYTICS,
            QUEUE_MERCHANT_EVENT,
            DELETE_DELIVERED_JOB,
            UPSERT_ATTEMPT,
        ] {
            assert_eq!(if_none(sql), IfNone::Continue, "{sql}");
        }
    }

    #[test]
    fn a_bare_transition_is_only_its_compare_and_set() {
        let mut t = everything();
        t.webhook_event_id = None;
        t.attempt = None;
        t.audit.clear();
        t.enqueue = None;
        t.dead_letter = None;
        t.redrive = None;
        t.idempotency = None;
        t.analytics.clear();
        t.merchant_events.clear();
        t.duplicate_payment = None;
        t.close_checkouts.clear();
        t.settles = None;
        let writes = transition(&t, NOW).unwrap();
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].sql, UPDATE_SESSION);
    }

    #[test]
    fn a_receipt_that_does_not_parse_is_refused_before_anything_is_written() {
        let mut t = everything();
        t.settles = Some("not-a-receipt".into());
        assert!(transition(&t, NOW).is_err());
    }
}
