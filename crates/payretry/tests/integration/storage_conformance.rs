//! Storage conformance: the same tests against every `Storage` + `JobQueue` backend, so
//! SQLite and PostgreSQL cannot drift apart.
//!
//! Each test is one async fn over a [`Store`]; [`conformance!`] instantiates every one of
//! them as `sqlite::<name>` (a fresh temporary file) and `postgres::<name>` (a fresh
//! database `payretry_t_<random>`, dropped afterwards). The PostgreSQL server is
//! `postgres://postgres@127.0.0.1:5432/postgres`, or `PAYRETRY_TEST_POSTGRES_URL`. When it
//! cannot be reached the PostgreSQL tests fail, they never skip: a green run must mean both
//! backends were tested.

use crate::support::services::TempDatabase;
use chrono::{DateTime, Duration as TimeDelta, Utc};
use payretry::provider::sandbox::{SandboxCheckout, SandboxCheckoutStatus};
use payretry::queue::{Delivery, JobQueue, Outbox};
use payretry::storage::{
    AttemptChange, AttemptStatus, Committed, DuplicatePaymentStatus, IdempotencyBegin,
    IdempotencyCompletion, IdempotencyScope, NewAuditEntry, NewDeadLetter, NewDuplicatePayment,
    NewSession, Page, Paged, RefundSettlement, SessionRecord, SessionState, Storage,
    StoredResponse, Transition,
};
use payretry::telemetry::analytics::AnalyticsEvent;
use payretry_domain::{
    Amount, AttemptNumber, AuditAction, Currency, DeadLetterId, FailureReason, Money,
    PaymentSessionId, ProviderSessionId, RetryJob, SessionStatus, UserId,
};
use serde_json::json;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Barrier;

/// Every trait of a backend, behind one pointer.
trait Backend: Storage + JobQueue + Outbox {}
impl<T: Storage + JobQueue + Outbox> Backend for T {}

type Store = Arc<dyn Backend>;

/// Pool size per test database: enough for the concurrency tests, small enough that the
/// tests cargo runs in parallel stay well under the server's `max_connections`.
const TEST_POOL_SIZE: u32 = 8;

macro_rules! conformance {
    ($($test:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::on_sqlite(super::$test).await;
                }
            )+
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::on_postgres(super::$test).await;
                }
            )+
        }
    };
}

conformance!(
    session_round_trip,
    stale_version_conflicts_and_writes_nothing,
    duplicate_webhook_event_writes_nothing,
    concurrent_commits_have_one_winner,
    idempotency_lifecycle,
    idempotent_transition_stores_its_response_without_a_claim,
    a_second_response_for_one_key_rolls_its_transaction_back,
    concurrent_idempotent_transitions_store_one_response,
    concurrent_transitions_fail_only_their_own,
    the_session_and_its_key_are_read_together,
    concurrent_idempotent_begins_start_once,
    enqueued_job_is_received_once_due,
    lease_hides_job_until_it_expires,
    stale_ack_keeps_the_released_job,
    a_transition_settles_the_delivery_it_records,
    release_moves_run_at_and_clears_the_lease,
    concurrent_receivers_claim_each_job_once,
    extend_keeps_the_receipt_valid,
    defer_requeues_until_scheduled_for,
    outbox_relay_claims_jobs_before_they_are_due,
    outbox_rows_are_deleted_and_released_in_batches,
    next_due_follows_run_at_and_leases,
    dead_letter_and_redrive,
    window_queries_see_live_sessions_only,
    service_secret_is_stable,
    sandbox_checkouts,
    purge_expired_removes_old_records,
    analytics_outbox,
    audit_log_pages_by_id,
    dead_letters_page_by_id,
    duplicate_payments_page_by_id,
    duplicate_refunds_are_claimed_once_and_only_move_forward,
);

// ----- backends --------------------------------------------------------------------------

async fn on_sqlite<F, Fut>(test: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let db = TempDatabase::sqlite();
    test(Arc::new(db.sqlite_storage().await)).await;
}

async fn on_postgres<F, Fut>(test: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    // Dropped, pool connections and all, even when the test panics.
    let db = TempDatabase::postgres().await;
    test(Arc::new(db.postgres_storage(TEST_POOL_SIZE).await)).await;
}

// ----- fixtures --------------------------------------------------------------------------

/// A page large enough for every list these tests build (each holds fewer than 100 rows).
const ALL: Page = Page::first(Page::MAX_LIMIT);

/// Now, at the millisecond precision the backends store.
fn now_ms() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).expect("now")
}

fn new_session_id() -> PaymentSessionId {
    PaymentSessionId::from_random(uuid::Uuid::new_v4().as_u128())
}

fn audit(action: AuditAction, attempt: u32) -> NewAuditEntry {
    NewAuditEntry {
        action,
        attempt: Some(AttemptNumber::new(attempt)),
        actor: "system".to_owned(),
        details: json!({"test": true}),
    }
}

fn new_session(expires_at: DateTime<Utc>) -> NewSession {
    let id = new_session_id();
    NewSession {
        provider_session_id: ProviderSessionId::new(format!("cs_{}", id.as_str())),
        checkout_url: format!("https://checkout.example/{}", id.as_str()),
        id,
        buyer: UserId::new("buyer-1"),
        money: Money {
            amount: Amount::new(2500).expect("amount"),
            currency: Currency::parse("usd").expect("currency"),
        },
        description: "Commande n° 123 — ☕".to_owned(),
        metadata: json!({"order": "123", "nested": {"list": [1, 2.5, null, "x"]}}),
        expires_at,
        created_at: now_ms(),
        audit: audit(AuditAction::CheckoutCreated, 0),
        idempotency: None,
    }
}

/// A stored open session whose window ends in 24 h.
async fn open_session(db: &Store) -> SessionRecord {
    session_expiring(db, now_ms() + TimeDelta::hours(24)).await
}

async fn session_expiring(db: &Store, expires_at: DateTime<Utc>) -> SessionRecord {
    let new = new_session(expires_at);
    let id = new.id.clone();
    db.insert_session(new).await.expect("insert session");
    reload(db, &id).await
}

async fn reload(db: &Store, id: &PaymentSessionId) -> SessionRecord {
    db.session(id)
        .await
        .expect("read session")
        .expect("session exists")
}

/// `session`'s state with the status and failure reason changed.
fn with_status(session: &SessionRecord, status: SessionStatus, reason: &str) -> SessionState {
    SessionState {
        status,
        failure_reason: Some(FailureReason::from_code(reason)),
        ..session.state.clone()
    }
}

fn job(session: &PaymentSessionId, attempt: u32, due: DateTime<Utc>) -> RetryJob {
    RetryJob::new(
        session.clone(),
        AttemptNumber::new(attempt),
        60,
        due,
        now_ms(),
    )
}

/// Commits a transition that only enqueues `job`, on top of the session's current version.
async fn enqueue(db: &Store, job: RetryJob) {
    let session = reload(db, &job.payment_session_id).await;
    let mut t = Transition::new(&session, session.state.clone());
    t.enqueue = Some(job);
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
}

/// A session with one job due now (one second ago).
async fn due_job(db: &Store) -> RetryJob {
    let session = open_session(db).await;
    let job = job(&session.id, 1, now_ms() - TimeDelta::seconds(1));
    enqueue(db, job.clone()).await;
    job
}

/// Receives until something is delivered (a job falling due, a lease running out), for up to
/// five seconds.
async fn receive_once_delivered(db: &Store, lease: Duration) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let deliveries = receive(db, 10, lease).await;
        if !deliveries.is_empty() {
            return deliveries;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing was delivered within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn receive(db: &Store, max: u32, lease: Duration) -> Vec<Delivery> {
    db.receive(max, lease).await.expect("receive")
}

/// The scope of `key` for the request `POST /x {}`.
fn scope(caller: &str, key: &str) -> IdempotencyScope {
    IdempotencyScope {
        caller: UserId::new(caller),
        key: key.to_owned(),
        fingerprint: "POST /x {}".to_owned(),
    }
}

/// The same key, sent with the request `fp`.
fn with_fingerprint(scope: &IdempotencyScope, fp: &str) -> IdempotencyScope {
    IdempotencyScope {
        fingerprint: fp.to_owned(),
        ..scope.clone()
    }
}

/// Claims `scope`'s key for the request `fp`.
async fn begin(
    db: &Store,
    scope: &IdempotencyScope,
    fp: &str,
    at: DateTime<Utc>,
) -> IdempotencyBegin {
    db.begin_idempotent(&with_fingerprint(scope, fp), at)
        .await
        .expect("begin idempotent")
}

/// Reads what `scope`'s key holds for the request `fp`, without claiming it.
async fn lookup(
    db: &Store,
    scope: &IdempotencyScope,
    fp: &str,
    at: DateTime<Utc>,
) -> IdempotencyBegin {
    db.lookup_idempotent(&with_fingerprint(scope, fp), at)
        .await
        .expect("lookup idempotent")
}

fn assert_between(at: DateTime<Utc>, low: DateTime<Utc>, high: DateTime<Utc>) {
    assert!(
        low <= at && at <= high,
        "{at} is not within {low} ..= {high}"
    );
}

// ----- sessions and transitions ---------------------------------------------------------

async fn session_round_trip(db: Store) {
    db.migrate().await.expect("migrating twice is a no-op");
    Storage::ping(db.as_ref()).await.expect("ping the database");
    JobQueue::ping(db.as_ref()).await.expect("ping the queue");

    let new = new_session(now_ms() + TimeDelta::hours(24));
    db.insert_session(new.clone()).await.expect("insert");
    let stored = reload(&db, &new.id).await;
    assert_eq!(stored.id, new.id);
    assert_eq!(stored.buyer, new.buyer);
    assert_eq!(stored.money, new.money);
    assert_eq!(stored.description, new.description);
    assert_eq!(stored.metadata, new.metadata);
    assert_eq!(stored.expires_at, new.expires_at);
    assert_eq!(stored.created_at, new.created_at);
    assert_eq!(stored.updated_at, new.created_at);
    assert_eq!(stored.version, 0);
    assert_eq!(
        stored.state,
        SessionState {
            status: SessionStatus::Open,
            failure_reason: None,
            retry_attempts: 0,
            last_retry_at: None,
            retry_reason: None,
            next_retry_at: None,
            current_attempt: AttemptNumber::ORIGINAL,
            provider_session_id: Some(new.provider_session_id.clone()),
            checkout_url: Some(new.checkout_url.clone()),
            paid_attempt: None,
        }
    );
    let log = db.audit_log(&new.id, ALL).await.expect("audit log").items;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].at, new.created_at);
    assert_eq!(log[0].action, "checkout_created");
    assert_eq!(log[0].attempt, Some(AttemptNumber::ORIGINAL));
    assert_eq!(log[0].actor, "system");
    assert_eq!(log[0].details, json!({"test": true}));
    assert!(db.session(&new_session_id()).await.expect("read").is_none());

    // Every state field survives a transition, including the optional ones.
    let at = now_ms();
    let state = SessionState {
        status: SessionStatus::RetryScheduled,
        failure_reason: Some(FailureReason::from_code("insufficient_funds")),
        retry_attempts: 2,
        last_retry_at: Some(at),
        retry_reason: Some(FailureReason::from_code("card_declined")),
        next_retry_at: Some(at + TimeDelta::minutes(5)),
        current_attempt: AttemptNumber::new(2),
        provider_session_id: None,
        checkout_url: None,
        paid_attempt: Some(AttemptNumber::new(1)),
    };
    let mut t = Transition::new(&stored, state.clone());
    t.attempt = Some(AttemptChange {
        attempt: AttemptNumber::new(2),
        status: AttemptStatus::Scheduled,
        provider_session_id: None,
        failure_reason: None,
        scheduled_for: Some(at + TimeDelta::minutes(5)),
    });
    t.audit = vec![
        audit(AuditAction::RetryRequested, 2),
        audit(AuditAction::RetryInitiated, 2),
    ];
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
    let after = reload(&db, &new.id).await;
    assert_eq!(after.state, state);
    assert_eq!(after.version, 1);
    assert_eq!(after.created_at, new.created_at);
    let actions: Vec<String> = db
        .audit_log(&new.id, ALL)
        .await
        .expect("audit log")
        .items
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        ["checkout_created", "retry_requested", "retry_initiated"]
    );

    // The attempt row is an upsert: updating attempt 2 again is not a duplicate key.
    let mut t = Transition::new(&after, after.state.clone());
    t.attempt = Some(AttemptChange {
        attempt: AttemptNumber::new(2),
        status: AttemptStatus::Open,
        provider_session_id: Some(ProviderSessionId::new("cs_retry_2")),
        failure_reason: None,
        scheduled_for: None,
    });
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
}

async fn stale_version_conflicts_and_writes_nothing(db: Store) {
    let session = open_session(&db).await;
    let mut first = Transition::new(
        &session,
        with_status(&session, SessionStatus::Failed, "first"),
    );
    first.audit.push(audit(AuditAction::PaymentFailed, 0));
    assert_eq!(db.commit(first).await.expect("commit"), Committed::Applied);

    // Decided on version 0, which is gone: nothing of it may be written.
    let mut stale = Transition::new(
        &session,
        with_status(&session, SessionStatus::Failed, "stale"),
    );
    stale.audit.push(audit(AuditAction::PaymentFailed, 0));
    stale.enqueue = Some(job(&session.id, 1, now_ms() - TimeDelta::seconds(1)));
    stale.dead_letter = Some(NewDeadLetter {
        job: job(&session.id, 1, now_ms()),
        receive_count: 5,
        last_error: "stale".to_owned(),
    });
    stale.webhook_event_id = Some("evt_stale".to_owned());
    stale.analytics.push(AnalyticsEvent {
        message_id: "msg_stale".to_owned(),
        payload: json!({"event": "stale"}),
    });
    assert_eq!(db.commit(stale).await.expect("commit"), Committed::Conflict);

    let now = reload(&db, &session.id).await;
    assert_eq!(now.version, 1);
    assert_eq!(
        now.state.failure_reason,
        Some(FailureReason::from_code("first"))
    );
    assert_eq!(
        db.audit_log(&session.id, ALL)
            .await
            .expect("audit")
            .items
            .len(),
        2
    );
    assert_eq!(db.next_due().await.expect("next due"), None);
    assert!(receive(&db, 10, Duration::from_secs(30)).await.is_empty());
    assert!(
        db.dead_letters(ALL)
            .await
            .expect("dead letters")
            .items
            .is_empty()
    );
    assert!(db.analytics_batch(10).await.expect("analytics").is_empty());
    // The event id was rolled back with the rest, so the event can still be applied.
    let mut retry = Transition::new(&now, now.state.clone());
    retry.webhook_event_id = Some("evt_stale".to_owned());
    assert_eq!(db.commit(retry).await.expect("commit"), Committed::Applied);
}

async fn duplicate_webhook_event_writes_nothing(db: Store) {
    let session = open_session(&db).await;
    let mut first = Transition::new(
        &session,
        with_status(&session, SessionStatus::Failed, "first"),
    );
    first.webhook_event_id = Some("evt_1".to_owned());
    first.audit.push(audit(AuditAction::PaymentFailed, 0));
    assert_eq!(db.commit(first).await.expect("commit"), Committed::Applied);

    let current = reload(&db, &session.id).await;
    let mut again = Transition::new(
        &current,
        with_status(&current, SessionStatus::Failed, "again"),
    );
    again.webhook_event_id = Some("evt_1".to_owned());
    again.audit.push(audit(AuditAction::PaymentFailed, 0));
    again.enqueue = Some(job(&session.id, 1, now_ms() - TimeDelta::seconds(1)));
    assert_eq!(
        db.commit(again).await.expect("commit"),
        Committed::DuplicateEvent
    );

    let after = reload(&db, &session.id).await;
    assert_eq!(after.version, 1);
    assert_eq!(after.state, current.state);
    assert_eq!(
        db.audit_log(&session.id, ALL)
            .await
            .expect("audit")
            .items
            .len(),
        2
    );
    assert_eq!(db.next_due().await.expect("next due"), None);

    // Event ids are global: the same id on another session is a duplicate as well.
    let other = open_session(&db).await;
    let mut elsewhere = Transition::new(&other, with_status(&other, SessionStatus::Failed, "x"));
    elsewhere.webhook_event_id = Some("evt_1".to_owned());
    assert_eq!(
        db.commit(elsewhere).await.expect("commit"),
        Committed::DuplicateEvent
    );
    assert_eq!(reload(&db, &other.id).await.version, 0);
}

async fn concurrent_commits_have_one_winner(db: Store) {
    const WRITERS: usize = 20;
    let session = open_session(&db).await;
    let start = Arc::new(Barrier::new(WRITERS));
    let mut tasks = Vec::new();
    for i in 0..WRITERS {
        let (db, session, start) = (db.clone(), session.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            let state = with_status(&session, SessionStatus::Failed, &format!("writer_{i}"));
            let mut t = Transition::new(&session, state);
            t.audit.push(audit(AuditAction::PaymentFailed, 0));
            start.wait().await;
            (i, db.commit(t).await.expect("commit"))
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (i, outcome) = task.await.expect("writer task");
        match outcome {
            Committed::Applied => winners.push(i),
            Committed::Conflict => {}
            Committed::DuplicateEvent => panic!("no event id was given"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer wins: {winners:?}");
    let after = reload(&db, &session.id).await;
    assert_eq!(after.version, 1);
    assert_eq!(
        after.state.failure_reason,
        Some(FailureReason::from_code(&format!("writer_{}", winners[0])))
    );
    assert_eq!(
        db.audit_log(&session.id, ALL)
            .await
            .expect("audit")
            .items
            .len(),
        2
    );
}

// ----- idempotency -----------------------------------------------------------------------

async fn idempotency_lifecycle(db: Store) {
    let now = now_ms();
    let done = scope("buyer-1", "key-done");
    assert_eq!(
        begin(&db, &done, "POST /x {}", now).await,
        IdempotencyBegin::Started
    );
    // Not valid UTF-8 on purpose: the body is bytes and must come back byte for byte.
    let response = StoredResponse {
        status: 202,
        body: vec![0x7b, 0x00, 0xff, 0xfe, b'"', b'\n', 0x7d],
    };
    db.complete_idempotent(&IdempotencyCompletion {
        scope: done.clone(),
        response: response.clone(),
    })
    .await
    .expect("complete");
    assert_eq!(
        begin(&db, &done, "POST /x {}", now + TimeDelta::minutes(1)).await,
        IdempotencyBegin::Replay(response.clone())
    );
    assert_eq!(
        begin(&db, &done, "POST /y {}", now + TimeDelta::minutes(1)).await,
        IdempotencyBegin::Mismatch
    );
    // A completed response is never abandoned.
    db.abandon_idempotent(&done).await.expect("abandon");
    assert_eq!(
        begin(&db, &done, "POST /x {}", now + TimeDelta::minutes(2)).await,
        IdempotencyBegin::Replay(response)
    );
    // After 24 h the key is free again, whatever the request.
    assert_eq!(
        begin(&db, &done, "POST /y {}", now + TimeDelta::hours(25)).await,
        IdempotencyBegin::Started
    );

    // Keys are scoped to the caller.
    assert_eq!(
        begin(&db, &scope("buyer-2", "key-done"), "POST /x {}", now).await,
        IdempotencyBegin::Started
    );

    let pending = scope("buyer-1", "key-pending");
    assert_eq!(
        begin(&db, &pending, "POST /x {}", now).await,
        IdempotencyBegin::Started
    );
    assert_eq!(
        begin(&db, &pending, "POST /x {}", now + TimeDelta::seconds(1)).await,
        IdempotencyBegin::InFlight
    );
    assert_eq!(
        begin(&db, &pending, "POST /z {}", now + TimeDelta::seconds(1)).await,
        IdempotencyBegin::Mismatch
    );
    db.abandon_idempotent(&pending).await.expect("abandon");
    assert_eq!(
        begin(&db, &pending, "POST /x {}", now + TimeDelta::seconds(2)).await,
        IdempotencyBegin::Started
    );
    // A claim whose process died (no completion, no abandon) is taken over after a while.
    assert_eq!(
        begin(&db, &pending, "POST /x {}", now + TimeDelta::minutes(5)).await,
        IdempotencyBegin::Started
    );

    // Completed inside a transition (and with a new session): commits with the effect.
    let new = new_session(now + TimeDelta::hours(24));
    let created = with_fingerprint(&scope("buyer-1", "key-create"), "POST /c {}");
    assert_eq!(
        begin(&db, &created, "POST /c {}", now).await,
        IdempotencyBegin::Started
    );
    let created_response = StoredResponse {
        status: 201,
        body: b"{\"created\":true}".to_vec(),
    };
    db.insert_session(NewSession {
        idempotency: Some(IdempotencyCompletion {
            scope: created.clone(),
            response: created_response.clone(),
        }),
        ..new.clone()
    })
    .await
    .expect("insert");
    assert_eq!(
        begin(&db, &created, "POST /c {}", now).await,
        IdempotencyBegin::Replay(created_response)
    );

    let retried = with_fingerprint(&scope("buyer-1", "key-retry"), "POST /r {}");
    assert_eq!(
        begin(&db, &retried, "POST /r {}", now).await,
        IdempotencyBegin::Started
    );
    let session = reload(&db, &new.id).await;
    let mut t = Transition::new(&session, session.state.clone());
    let retried_response = StoredResponse {
        status: 202,
        body: b"{\"attemptNumber\":1}".to_vec(),
    };
    t.idempotency = Some(IdempotencyCompletion {
        scope: retried.clone(),
        response: retried_response.clone(),
    });
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
    assert_eq!(
        begin(&db, &retried, "POST /r {}", now).await,
        IdempotencyBegin::Replay(retried_response)
    );
}

async fn idempotent_transition_stores_its_response_without_a_claim(db: Store) {
    let now = now_ms();
    let key = with_fingerprint(&scope("buyer-1", "unclaimed"), "POST /r {}");
    assert_eq!(
        lookup(&db, &key, "POST /r {}", now).await,
        IdempotencyBegin::Started,
        "a key never seen"
    );
    let session = open_session(&db).await;
    let mut t = Transition::new(&session, session.state.clone());
    let response = StoredResponse {
        status: 202,
        body: b"{\"attemptNumber\":1}".to_vec(),
    };
    t.idempotency = Some(IdempotencyCompletion {
        scope: key.clone(),
        response: response.clone(),
    });
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
    assert_eq!(
        lookup(&db, &key, "POST /r {}", now).await,
        IdempotencyBegin::Replay(response.clone())
    );
    assert_eq!(
        lookup(&db, &key, "POST /other {}", now).await,
        IdempotencyBegin::Mismatch
    );
    assert_eq!(
        begin(&db, &key, "POST /r {}", now).await,
        IdempotencyBegin::Replay(response),
        "a claim sees the stored response too"
    );
    // A lookup claims nothing: a claimed key reads as in flight, a fresh one stays fresh.
    let claimed = scope("buyer-1", "claimed");
    assert_eq!(
        begin(&db, &claimed, "POST /x {}", now).await,
        IdempotencyBegin::Started
    );
    assert_eq!(
        lookup(&db, &claimed, "POST /x {}", now).await,
        IdempotencyBegin::InFlight
    );
    let fresh = scope("buyer-1", "fresh");
    assert_eq!(
        lookup(&db, &fresh, "POST /x {}", now).await,
        IdempotencyBegin::Started
    );
    assert_eq!(
        lookup(&db, &fresh, "POST /x {}", now).await,
        IdempotencyBegin::Started
    );
    // An expired record (not yet purged) is replaced by the next response under the key.
    let old = scope("buyer-1", "old");
    db.complete_idempotent(&IdempotencyCompletion {
        scope: old.clone(),
        response: response_with(422),
    })
    .await
    .expect("complete");
    let later = Utc::now() + TimeDelta::hours(25);
    assert_eq!(
        lookup(&db, &old, "POST /y {}", later).await,
        IdempotencyBegin::Started
    );
}

fn response_with(status: u16) -> StoredResponse {
    StoredResponse {
        status,
        body: format!("{{\"status\":{status}}}").into_bytes(),
    }
}

async fn a_second_response_for_one_key_rolls_its_transaction_back(db: Store) {
    let now = now_ms();
    let key = scope("buyer-1", "answered");
    db.complete_idempotent(&IdempotencyCompletion {
        scope: key.clone(),
        response: response_with(409),
    })
    .await
    .expect("the first response is stored");

    let session = open_session(&db).await;
    let audit_before = db
        .audit_log(&session.id, ALL)
        .await
        .expect("audit")
        .items
        .len();
    let mut t = Transition::new(
        &session,
        SessionState {
            status: SessionStatus::Failed,
            ..session.state.clone()
        },
    );
    t.audit.push(NewAuditEntry {
        action: AuditAction::PaymentFailed,
        attempt: Some(AttemptNumber::new(0)),
        actor: "system".to_owned(),
        details: json!({}),
    });
    t.enqueue = Some(job(&session.id, 1, now));
    t.idempotency = Some(IdempotencyCompletion {
        scope: key.clone(),
        response: response_with(202),
    });
    let error = db.commit(t).await.expect_err("the key is answered");
    assert!(
        matches!(error, payretry::storage::StorageError::IdempotencyKeyTaken),
        "{error:?}"
    );
    let after = reload(&db, &session.id).await;
    assert_eq!(after.version, session.version, "the session did not change");
    assert_eq!(after.state, session.state);
    assert_eq!(
        db.audit_log(&session.id, ALL)
            .await
            .expect("audit")
            .items
            .len(),
        audit_before,
        "no audit entry"
    );
    assert!(
        receive(&db, 10, Duration::from_secs(30)).await.is_empty(),
        "no job queued"
    );
    assert_eq!(
        lookup(&db, &key, "POST /x {}", now).await,
        IdempotencyBegin::Replay(response_with(409)),
        "the first response stands"
    );
    // The same holds for a response stored on its own, and for another request's key.
    let again = db
        .complete_idempotent(&IdempotencyCompletion {
            scope: key.clone(),
            response: response_with(400),
        })
        .await;
    assert!(matches!(
        again,
        Err(payretry::storage::StorageError::IdempotencyKeyTaken)
    ));
    let other_request = db
        .complete_idempotent(&IdempotencyCompletion {
            scope: with_fingerprint(&key, "POST /y {}"),
            response: response_with(400),
        })
        .await;
    assert!(matches!(
        other_request,
        Err(payretry::storage::StorageError::IdempotencyKeyTaken)
    ));
}

/// Eight transitions of eight sessions race to store a response under one key: exactly
/// one commits, the others roll back whole.
async fn concurrent_idempotent_transitions_store_one_response(db: Store) {
    const CALLERS: usize = 8;
    let key = scope("buyer-1", "raced");
    let start = Arc::new(Barrier::new(CALLERS));
    let mut tasks = Vec::new();
    for n in 0..CALLERS {
        let session = open_session(&db).await;
        let (db, start, key) = (db.clone(), start.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut t = Transition::new(&session, session.state.clone());
            t.idempotency = Some(IdempotencyCompletion {
                scope: key,
                response: response_with(200 + u16::try_from(n).unwrap()),
            });
            start.wait().await;
            let outcome = db.commit(t).await;
            (session, outcome)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (session, outcome) = task.await.expect("commit task");
        let after = reload(&db, &session.id).await;
        match outcome {
            Ok(Committed::Applied) => {
                assert_eq!(after.version, session.version + 1);
                winners.push(session.id);
            }
            Err(payretry::storage::StorageError::IdempotencyKeyTaken) => {
                assert_eq!(after.version, session.version, "a loser wrote nothing");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one response is stored");
}

/// Transitions committed together (on SQLite, in one group commit) succeed or fail each on
/// its own: a stale compare-and-set writes none of its rows, and takes nobody else's with it.
async fn concurrent_transitions_fail_only_their_own(db: Store) {
    const CALLERS: usize = 16;
    let start = Arc::new(Barrier::new(CALLERS));
    let mut tasks = Vec::new();
    for n in 0..CALLERS {
        let session = open_session(&db).await;
        let (db, start) = (db.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            let stale = n % 2 == 1;
            let mut t = Transition::new(
                &session,
                with_status(&session, SessionStatus::Failed, "card_declined"),
            );
            if stale {
                t.expected_version += 5;
            }
            t.audit.push(audit(AuditAction::PaymentFailed, 0));
            start.wait().await;
            (session, stale, db.commit(t).await.expect("commit"))
        }));
    }
    for task in tasks {
        let (session, stale, outcome) = task.await.expect("commit task");
        let after = reload(&db, &session.id).await;
        let entries = db.audit_log(&session.id, ALL).await.expect("audit").items;
        if stale {
            assert_eq!(outcome, Committed::Conflict);
            assert_eq!(after, session, "a lost compare-and-set changed nothing");
            assert_eq!(
                entries.len(),
                1,
                "only the creation is audited: {entries:?}"
            );
        } else {
            assert_eq!(outcome, Committed::Applied);
            assert_eq!(after.version, session.version + 1);
            assert_eq!(after.state.status, SessionStatus::Failed);
            assert_eq!(entries.len(), 2, "creation and failure: {entries:?}");
        }
    }
}

/// The retry's reads in one round trip mean what the two separate reads meant.
async fn the_session_and_its_key_are_read_together(db: Store) {
    let now = now_ms();
    let key = scope("buyer-1", "together");
    let missing = new_session_id();
    let (found, session) = db
        .lookup_idempotent_with_session(&key, &missing, now)
        .await
        .expect("read");
    assert_eq!((found, session), (IdempotencyBegin::Started, None));

    let stored = open_session(&db).await;
    let (found, session) = db
        .lookup_idempotent_with_session(&key, &stored.id, now)
        .await
        .expect("read");
    assert_eq!(
        found,
        IdempotencyBegin::Started,
        "no record under the key yet"
    );
    assert_eq!(session.as_ref(), Some(&stored));

    let mut t = Transition::new(&stored, stored.state.clone());
    t.idempotency = Some(IdempotencyCompletion {
        scope: key.clone(),
        response: response_with(202),
    });
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
    let (found, session) = db
        .lookup_idempotent_with_session(&key, &stored.id, now)
        .await
        .expect("read");
    assert_eq!(found, IdempotencyBegin::Replay(response_with(202)));
    assert_eq!(session.expect("the session").version, stored.version + 1);
    // The same answers as the key's own lookup, for another request under the key too.
    let other = with_fingerprint(&key, "POST /y {}");
    let (found, _) = db
        .lookup_idempotent_with_session(&other, &stored.id, now)
        .await
        .expect("read");
    assert_eq!(found, IdempotencyBegin::Mismatch);
    assert_eq!(
        found,
        db.lookup_idempotent(&other, now).await.expect("lookup")
    );
    // A key of the session read for a session that does not exist.
    let (found, session) = db
        .lookup_idempotent_with_session(&key, &missing, now)
        .await
        .expect("read");
    assert_eq!(
        (found, session),
        (IdempotencyBegin::Replay(response_with(202)), None)
    );
}

async fn concurrent_idempotent_begins_start_once(db: Store) {
    // Several rounds, so the pool has warmed up and the requests really overlap.
    const ROUNDS: usize = 10;
    let now = now_ms();
    for round in 0..ROUNDS {
        let key = scope("buyer-1", &format!("key-{round}"));
        assert_eq!(
            race_begins(&db, &key, now).await,
            1,
            "round {round}: exactly one of the first requests may start"
        );
        // The claim is presumed dead after a while; again only one request may take it over.
        assert_eq!(
            race_begins(&db, &key, now + TimeDelta::minutes(5)).await,
            1,
            "round {round}: exactly one request may take over a stale claim"
        );
    }
}

/// Begins `scope` from 8 tasks at once; returns how many got `Started` (the rest must be
/// `InFlight`).
async fn race_begins(db: &Store, scope: &IdempotencyScope, at: DateTime<Utc>) -> usize {
    const CALLERS: usize = 8;
    let start = Arc::new(Barrier::new(CALLERS));
    let mut tasks = Vec::new();
    for _ in 0..CALLERS {
        let (db, start, scope) = (db.clone(), start.clone(), scope.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            begin(&db, &scope, "POST /x {}", at).await
        }));
    }
    let mut started = 0;
    for task in tasks {
        match task.await.expect("begin task") {
            IdempotencyBegin::Started => started += 1,
            IdempotencyBegin::InFlight => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    started
}

// ----- the embedded queue ----------------------------------------------------------------

async fn enqueued_job_is_received_once_due(db: Store) {
    let session = open_session(&db).await;
    let due = now_ms() + TimeDelta::milliseconds(700);
    let job = job(&session.id, 1, due);
    enqueue(&db, job.clone()).await;
    // This process's worker is woken by the commit.
    tokio::time::timeout(Duration::from_secs(5), db.enqueued())
        .await
        .expect("enqueued() resolves after a commit that enqueued");

    assert!(receive(&db, 10, Duration::from_secs(30)).await.is_empty());
    assert_eq!(db.next_due().await.expect("next due"), Some(due));

    let deliveries = receive_once_delivered(&db, Duration::from_secs(30)).await;
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].job, job);
    assert_eq!(deliveries[0].receive_count, 1);
}

async fn lease_hides_job_until_it_expires(db: Store) {
    let job = due_job(&db).await;
    let first = receive(&db, 10, Duration::from_millis(300)).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].job, job);
    assert_eq!(first[0].receive_count, 1);
    assert!(
        receive(&db, 10, Duration::from_secs(30)).await.is_empty(),
        "a leased job is hidden"
    );

    let second = receive_once_delivered(&db, Duration::from_secs(30)).await;
    assert_eq!(second.len(), 1, "redelivered after the lease expired");
    assert_eq!(second[0].job, job);
    assert_eq!(second[0].receive_count, 2);
    assert_ne!(second[0].receipt, first[0].receipt);
}

async fn stale_ack_keeps_the_released_job(db: Store) {
    due_job(&db).await;
    let first = receive(&db, 10, Duration::from_millis(200)).await;
    assert_eq!(first.len(), 1);
    let second = receive_once_delivered(&db, Duration::from_secs(60)).await;
    assert_eq!(second.len(), 1);

    // The first worker finishes late: its receipt no longer matches the lease.
    db.ack(&first[0]).await.expect("stale ack");
    assert!(
        db.next_due().await.expect("next due").is_some(),
        "job still queued"
    );
    db.release(&first[0], "late", Duration::ZERO)
        .await
        .expect("stale release");
    assert!(
        receive(&db, 10, Duration::from_secs(60)).await.is_empty(),
        "the current lease is untouched"
    );

    db.ack(&second[0]).await.expect("ack");
    assert_eq!(db.next_due().await.expect("next due"), None);
    assert!(receive(&db, 10, Duration::from_secs(60)).await.is_empty());
}

async fn a_transition_settles_the_delivery_it_records(db: Store) {
    assert!(
        db.settles_in_transition(),
        "the embedded queue shares the database"
    );
    let job = due_job(&db).await;
    let stale = receive(&db, 10, Duration::from_millis(200)).await;
    assert_eq!(stale.len(), 1);
    let current = receive_once_delivered(&db, Duration::from_secs(60)).await;
    assert_eq!(current.len(), 1);

    // A worker whose lease ran out records its outcome, but the job stays with the worker
    // that holds it now.
    let session = reload(&db, &job.payment_session_id).await;
    let mut t = Transition::new(&session, session.state.clone());
    t.settles = Some(stale[0].receipt.clone());
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
    assert!(
        db.next_due().await.expect("next due").is_some(),
        "the job is still queued"
    );

    // A conflicting transition deletes nothing.
    let mut t = Transition::new(&session, session.state.clone());
    t.settles = Some(current[0].receipt.clone());
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Conflict);
    assert!(db.next_due().await.expect("next due").is_some());

    // The holder's transition commits its outcome and the acknowledgement together.
    let session = reload(&db, &job.payment_session_id).await;
    let mut t = Transition::new(&session, session.state.clone());
    t.settles = Some(current[0].receipt.clone());
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
    assert_eq!(db.next_due().await.expect("next due"), None, "job deleted");
    assert!(receive(&db, 10, Duration::from_secs(60)).await.is_empty());
}

async fn release_moves_run_at_and_clears_the_lease(db: Store) {
    let job = due_job(&db).await;
    let first = receive(&db, 1, Duration::from_secs(60)).await;
    assert_eq!(first.len(), 1);

    db.release(&first[0], "provider down", Duration::ZERO)
        .await
        .expect("release");
    let second = receive(&db, 1, Duration::from_secs(60)).await;
    assert_eq!(second.len(), 1, "released with no delay: due again at once");
    assert_eq!(second[0].job, job);
    assert_eq!(second[0].receive_count, 2);

    let before = now_ms();
    db.release(&second[0], "provider down", Duration::from_secs(3600))
        .await
        .expect("release");
    let after = now_ms();
    assert!(receive(&db, 1, Duration::from_secs(60)).await.is_empty());
    let next = db.next_due().await.expect("next due").expect("job queued");
    assert_between(
        next,
        before + TimeDelta::hours(1),
        after + TimeDelta::hours(1),
    );
}

async fn concurrent_receivers_claim_each_job_once(db: Store) {
    const JOBS: u32 = 200;
    const RECEIVERS: usize = 4;
    let session = open_session(&db).await;
    let due = now_ms() - TimeDelta::seconds(1);
    for attempt in 1..=JOBS {
        enqueue(&db, job(&session.id, attempt, due)).await;
    }

    let start = Arc::new(Barrier::new(RECEIVERS));
    let mut tasks = Vec::new();
    for _ in 0..RECEIVERS {
        let (db, start) = (db.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut claimed = Vec::new();
            loop {
                let batch = receive(&db, 7, Duration::from_secs(60)).await;
                if batch.is_empty() {
                    return claimed;
                }
                claimed.extend(batch);
            }
        }));
    }
    let mut seen = BTreeSet::new();
    for task in tasks {
        for delivery in task.await.expect("receiver task") {
            assert_eq!(delivery.receive_count, 1);
            let attempt = delivery.job.attempt_number.get();
            assert!(seen.insert(attempt), "job {attempt} was claimed twice");
        }
    }
    assert_eq!(seen, (1..=JOBS).collect::<BTreeSet<_>>());
    assert!(receive(&db, 10, Duration::from_secs(60)).await.is_empty());
}

async fn extend_keeps_the_receipt_valid(db: Store) {
    due_job(&db).await;
    let delivery = receive(&db, 1, Duration::from_secs(60)).await;
    assert_eq!(delivery.len(), 1);
    db.extend(&delivery[0], Duration::from_secs(600))
        .await
        .expect("extend");
    assert!(receive(&db, 1, Duration::from_secs(60)).await.is_empty());
    db.ack(&delivery[0]).await.expect("ack after extend");
    assert_eq!(db.next_due().await.expect("next due"), None);
}

async fn defer_requeues_until_scheduled_for(db: Store) {
    let session = open_session(&db).await;
    let due = now_ms() + TimeDelta::minutes(10);
    enqueue(&db, job(&session.id, 1, due)).await;
    // Only a relay takes a job early (an external queue caps its delay).
    let early = db
        .claim_outbox(10, Duration::from_secs(60))
        .await
        .expect("claim");
    assert_eq!(early.len(), 1);
    db.defer(&early[0]).await.expect("defer");
    let next = db.next_due().await.expect("next due").expect("job queued");
    assert_between(next, due - TimeDelta::seconds(5), due);
    assert!(receive(&db, 10, Duration::from_secs(60)).await.is_empty());
}

async fn outbox_relay_claims_jobs_before_they_are_due(db: Store) {
    let session = open_session(&db).await;
    let later = job(&session.id, 1, now_ms() + TimeDelta::hours(1));
    enqueue(&db, later.clone()).await;
    tokio::time::timeout(Duration::from_secs(5), db.outbox_written())
        .await
        .expect("outbox_written() resolves after a commit that enqueued");
    assert!(receive(&db, 10, Duration::from_secs(60)).await.is_empty());

    let claimed = db
        .claim_outbox(10, Duration::from_secs(60))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].job, later);
    assert!(
        db.claim_outbox(10, Duration::from_secs(60))
            .await
            .expect("claim")
            .is_empty(),
        "a claimed row is leased to its relay"
    );
    db.delete_outbox(&claimed).await.expect("delete");
    assert_eq!(db.next_due().await.expect("next due"), None);
}

async fn outbox_rows_are_deleted_and_released_in_batches(db: Store) {
    let session = open_session(&db).await;
    for attempt in 1..=4 {
        enqueue(
            &db,
            job(&session.id, attempt, now_ms() + TimeDelta::hours(1)),
        )
        .await;
    }
    let attempts = |rows: &[Delivery]| {
        let mut numbers: Vec<u32> = rows.iter().map(|d| d.job.attempt_number.get()).collect();
        numbers.sort_unstable();
        numbers
    };
    let claimed = db
        .claim_outbox(10, Duration::from_secs(60))
        .await
        .expect("claim");
    assert_eq!(attempts(&claimed), [1, 2, 3, 4]);

    // Act: the external queue took two rows and refused two.
    db.delete_outbox(&claimed[..2]).await.expect("delete");
    db.release_outbox(&claimed[2..]).await.expect("release");

    // Assert: the refused rows are claimable at once, the taken ones are gone.
    let again = db
        .claim_outbox(10, Duration::from_secs(61))
        .await
        .expect("claim again");
    assert_eq!(attempts(&again), attempts(&claimed[2..]));
    // The first claim's receipts are stale now: they delete and release nothing.
    db.delete_outbox(&claimed[2..]).await.expect("stale delete");
    db.release_outbox(&claimed[2..])
        .await
        .expect("stale release");
    assert!(
        db.claim_outbox(10, Duration::from_secs(60))
            .await
            .expect("claim")
            .is_empty(),
        "still leased to the second claim"
    );
    db.delete_outbox(&again).await.expect("delete");
    db.delete_outbox(&[]).await.expect("nothing to delete");
    db.release_outbox(&[]).await.expect("nothing to release");
    assert_eq!(db.next_due().await.expect("next due"), None);
}

async fn next_due_follows_run_at_and_leases(db: Store) {
    assert_eq!(db.next_due().await.expect("next due"), None);
    let session = open_session(&db).await;
    let in_1h = now_ms() + TimeDelta::hours(1);
    enqueue(&db, job(&session.id, 1, now_ms() + TimeDelta::hours(2))).await;
    enqueue(&db, job(&session.id, 2, in_1h)).await;
    assert_eq!(db.next_due().await.expect("next due"), Some(in_1h));

    let overdue = now_ms() - TimeDelta::seconds(5);
    enqueue(&db, job(&session.id, 3, overdue)).await;
    assert_eq!(db.next_due().await.expect("next due"), Some(overdue));

    // A leased job is next due when its lease runs out, not at its (past) run_at.
    let before = now_ms();
    assert_eq!(receive(&db, 10, Duration::from_secs(600)).await.len(), 1);
    let after = now_ms();
    let next = db.next_due().await.expect("next due").expect("jobs queued");
    assert_between(
        next,
        before + TimeDelta::minutes(10),
        after + TimeDelta::minutes(10),
    );
}

// ----- dead letters ----------------------------------------------------------------------

async fn dead_letter_and_redrive(db: Store) {
    let session = open_session(&db).await;
    let dead_job = job(&session.id, 1, now_ms() - TimeDelta::minutes(5));
    let mut t = Transition::new(
        &session,
        with_status(&session, SessionStatus::Failed, "retry_processing_failed"),
    );
    t.dead_letter = Some(NewDeadLetter {
        job: dead_job.clone(),
        receive_count: 5,
        last_error: "provider unavailable".to_owned(),
    });
    t.audit.push(audit(AuditAction::RetryDeadLettered, 1));
    let before = now_ms();
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
    let after = now_ms();

    let listed = db.dead_letters(ALL).await.expect("dead letters").items;
    assert_eq!(listed.len(), 1);
    let dead = &listed[0];
    assert_eq!(dead.job, dead_job);
    assert_eq!(dead.receive_count, 5);
    assert_eq!(dead.last_error, "provider unavailable");
    assert_between(dead.dead_at, before, after);
    assert_eq!(
        db.dead_letter(dead.id).await.expect("dead letter"),
        Some(dead.clone())
    );
    let unknown = DeadLetterId::parse("987654321").expect("id");
    assert_eq!(db.dead_letter(unknown).await.expect("dead letter"), None);

    // Redrive: the dead letter goes, the job comes back, in one commit.
    let current = reload(&db, &session.id).await;
    let mut t = Transition::new(
        &current,
        with_status(
            &current,
            SessionStatus::RetryScheduled,
            "retry_processing_failed",
        ),
    );
    t.redrive = Some(dead.id);
    t.enqueue = Some(job(&session.id, 1, now_ms() - TimeDelta::seconds(1)));
    t.audit.push(audit(AuditAction::RetryRedriven, 1));
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);

    // The same dead letter again (a second admin, a lost answer): it is gone, so the whole
    // commit is refused and nothing more is queued or recorded.
    let current = reload(&db, &session.id).await;
    let mut again = Transition::new(&current, current.state.clone());
    again.redrive = Some(dead.id);
    again.enqueue = Some(job(&session.id, 1, now_ms() - TimeDelta::seconds(1)));
    again.audit.push(audit(AuditAction::RetryRedriven, 1));
    assert_eq!(db.commit(again).await.expect("commit"), Committed::Conflict);
    assert_eq!(reload(&db, &session.id).await, current);
    assert!(
        db.dead_letters(ALL)
            .await
            .expect("dead letters")
            .items
            .is_empty()
    );
    assert_eq!(db.dead_letter(dead.id).await.expect("dead letter"), None);
    let redelivered = receive(&db, 10, Duration::from_secs(60)).await;
    assert_eq!(redelivered.len(), 1);
    assert_eq!(redelivered[0].job.attempt_number, AttemptNumber::new(1));
}

// ----- the window sweeper ----------------------------------------------------------------

async fn window_queries_see_live_sessions_only(db: Store) {
    assert_eq!(db.next_window_end().await.expect("next window end"), None);
    let now = now_ms();
    let paid = session_expiring(&db, now - TimeDelta::hours(3)).await;
    let mut t = Transition::new(&paid, with_status(&paid, SessionStatus::Succeeded, "none"));
    t.state.paid_attempt = Some(AttemptNumber::ORIGINAL);
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
    let open = session_expiring(&db, now - TimeDelta::hours(2)).await;
    let failed = session_expiring(&db, now - TimeDelta::hours(1)).await;
    let t = Transition::new(
        &failed,
        with_status(&failed, SessionStatus::Failed, "card_declined"),
    );
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
    let scheduled = session_expiring(&db, now - TimeDelta::minutes(30)).await;
    let t = Transition::new(
        &scheduled,
        with_status(&scheduled, SessionStatus::RetryScheduled, "card_declined"),
    );
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
    let future = session_expiring(&db, now + TimeDelta::hours(1)).await;

    let ids = |sessions: Vec<SessionRecord>| sessions.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(
        ids(db.sessions_past_window(now, 10).await.expect("past window")),
        [open.id.clone(), failed.id.clone(), scheduled.id.clone()]
    );
    assert_eq!(
        ids(db.sessions_past_window(now, 1).await.expect("past window")),
        std::slice::from_ref(&open.id)
    );
    assert_eq!(
        db.next_window_end().await.expect("next window end"),
        Some(open.expires_at)
    );

    // Once expired, a session no longer counts.
    let t = Transition::new(&open, with_status(&open, SessionStatus::Expired, "none"));
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
    assert_eq!(
        db.next_window_end().await.expect("next window end"),
        Some(failed.expires_at)
    );
    assert_eq!(
        ids(db
            .sessions_past_window(now + TimeDelta::hours(2), 10)
            .await
            .expect("past window")),
        [failed.id, scheduled.id, future.id]
    );
}

// ----- service secrets and the sandbox ---------------------------------------------------

async fn service_secret_is_stable(db: Store) {
    let first = db
        .service_secret("jwt_hs256", &|| "alpha".to_owned())
        .await
        .expect("secret");
    assert_eq!(first, "alpha");
    let again = db
        .service_secret("jwt_hs256", &|| "beta".to_owned())
        .await
        .expect("secret");
    assert_eq!(again, "alpha", "generated once, then kept");
    let other = db
        .service_secret("webhook_signing", &|| "beta".to_owned())
        .await
        .expect("secret");
    assert_eq!(other, "beta");
}

async fn sandbox_checkouts(db: Store) {
    let checkout = SandboxCheckout {
        id: ProviderSessionId::new("cs_sandbox_1"),
        session_id: new_session_id(),
        attempt: AttemptNumber::new(2),
        amount: 2500,
        currency: "usd".to_owned(),
        description: "Order 123".to_owned(),
        success_url: "http://127.0.0.1/pay/ps_x?paid=1".to_owned(),
        cancel_url: "http://127.0.0.1/pay/ps_x".to_owned(),
        expires_at: now_ms() + TimeDelta::hours(1),
        status: SandboxCheckoutStatus::Open,
    };
    db.put_sandbox_checkout(&checkout).await.expect("put");
    assert_eq!(
        db.sandbox_checkout(&checkout.id).await.expect("get"),
        Some(checkout.clone())
    );
    // Creating the same checkout again (a retried provider call) keeps the first.
    db.put_sandbox_checkout(&SandboxCheckout {
        amount: 9999,
        ..checkout.clone()
    })
    .await
    .expect("put again");
    assert_eq!(
        db.sandbox_checkout(&checkout.id).await.expect("get"),
        Some(checkout.clone())
    );
    let pay =
        |from| db.set_sandbox_checkout_status(&checkout.id, from, SandboxCheckoutStatus::Paid);
    assert!(pay(SandboxCheckoutStatus::Open).await.expect("status"));
    assert_eq!(
        db.sandbox_checkout(&checkout.id).await.expect("get"),
        Some(SandboxCheckout {
            status: SandboxCheckoutStatus::Paid,
            ..checkout.clone()
        })
    );
    // Only from the status it is in: a second press finds it closed and changes nothing.
    assert!(!pay(SandboxCheckoutStatus::Open).await.expect("status"));
    assert!(
        db.set_sandbox_checkout_status(
            &checkout.id,
            SandboxCheckoutStatus::Paid,
            SandboxCheckoutStatus::Refunded
        )
        .await
        .expect("status")
    );
    for status in ["declined", "expired"] {
        let other = SandboxCheckout {
            id: ProviderSessionId::new(format!("cs_sandbox_{status}")),
            status: status.parse().expect("a status"),
            ..checkout.clone()
        };
        db.put_sandbox_checkout(&other).await.expect("put");
        assert_eq!(
            db.sandbox_checkout(&other.id).await.expect("get"),
            Some(other)
        );
    }
    assert_eq!(
        db.sandbox_checkout(&ProviderSessionId::new("cs_unknown"))
            .await
            .expect("get"),
        None
    );
}

// ----- housekeeping and analytics --------------------------------------------------------

async fn purge_expired_removes_old_records(db: Store) {
    let now = now_ms();
    let old = scope("buyer-1", "old");
    let fresh = scope("buyer-1", "fresh");
    assert_eq!(
        begin(&db, &old, "POST /x {}", now - TimeDelta::days(2)).await,
        IdempotencyBegin::Started
    );
    assert_eq!(
        begin(&db, &fresh, "POST /x {}", now).await,
        IdempotencyBegin::Started
    );
    let session = open_session(&db).await;
    let mut t = Transition::new(&session, session.state.clone());
    t.webhook_event_id = Some("evt_purge".to_owned());
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);

    assert_eq!(
        db.purge_expired(now - TimeDelta::days(1))
            .await
            .expect("purge"),
        1
    );
    assert_eq!(
        begin(&db, &fresh, "POST /x {}", now).await,
        IdempotencyBegin::InFlight,
        "a fresh key survives"
    );
    assert_eq!(
        db.purge_expired(now + TimeDelta::minutes(1))
            .await
            .expect("purge"),
        2
    );
    assert_eq!(
        begin(&db, &fresh, "POST /x {}", now).await,
        IdempotencyBegin::Started
    );
    // The event id is forgotten, so the same event would be applied again.
    let current = reload(&db, &session.id).await;
    let mut t = Transition::new(&current, current.state.clone());
    t.webhook_event_id = Some("evt_purge".to_owned());
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
}

async fn analytics_outbox(db: Store) {
    let session = open_session(&db).await;
    let event = |id: &str| AnalyticsEvent {
        message_id: id.to_owned(),
        payload: json!({"event": "payments.retry.scheduled", "messageId": id}),
    };
    let mut t = Transition::new(&session, session.state.clone());
    t.analytics = vec![event("msg-1"), event("msg-2")];
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
    tokio::time::timeout(Duration::from_secs(5), db.analytics_enqueued())
        .await
        .expect("analytics_enqueued() resolves after a commit with events");
    // The same message id again (a replayed change) is stored once.
    let current = reload(&db, &session.id).await;
    let mut t = Transition::new(&current, current.state.clone());
    t.analytics = vec![event("msg-1")];
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);

    let batch = db.analytics_batch(10).await.expect("batch");
    let payloads: Vec<_> = batch.iter().map(|row| row.payload.clone()).collect();
    assert_eq!(payloads, [event("msg-1").payload, event("msg-2").payload]);
    assert_eq!(db.analytics_batch(1).await.expect("batch").len(), 1);

    db.analytics_park(&[batch[0].id], "400 bad request")
        .await
        .expect("park");
    let rest = db.analytics_batch(10).await.expect("batch");
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].id, batch[1].id);
    db.analytics_delivered(&[rest[0].id])
        .await
        .expect("delivered");
    assert!(db.analytics_batch(10).await.expect("batch").is_empty());
}

// ----- paging ----------------------------------------------------------------------------

/// Reads a list page by page (`limit` rows each) until a page says none follow; returns
/// every page. Each page but the last must be full and name the id to continue after.
async fn all_pages<T, F, Fut>(limit: u32, mut read: F) -> Vec<Vec<T>>
where
    F: FnMut(Page) -> Fut,
    Fut: Future<Output = Paged<T>>,
{
    let mut page = Page::first(limit);
    let mut pages = Vec::new();
    loop {
        let paged = read(page).await;
        assert!(paged.items.len() <= limit as usize, "a page over its limit");
        pages.push(paged.items);
        match paged.next {
            Some(after) => {
                assert_eq!(pages.last().map(Vec::len), Some(limit as usize));
                assert!(page.after < Some(after), "the cursor moves forward");
                page.after = Some(after);
            }
            None => return pages,
        }
        assert!(pages.len() < 100, "paging never ends");
    }
}

async fn audit_log_pages_by_id(db: Store) {
    let mine = open_session(&db).await;
    let theirs = open_session(&db).await;
    // Interleave another session's entries: a page holds this session's only.
    let commit = |session: SessionRecord, attempts: std::ops::RangeInclusive<u32>| {
        let db = db.clone();
        async move {
            let mut t = Transition::new(&session, session.state.clone());
            t.audit = attempts
                .map(|n| audit(AuditAction::RetryRequested, n))
                .collect();
            assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
        }
    };
    commit(reload(&db, &mine.id).await, 1..=3).await;
    commit(reload(&db, &theirs.id).await, 1..=2).await;
    commit(reload(&db, &mine.id).await, 4..=6).await;

    // 7 entries (checkout_created, then attempts 1 to 6) in pages of 3: 3, 3, 1.
    let pages = all_pages(3, |page| {
        let db = db.clone();
        let id = mine.id.clone();
        async move { db.audit_log(&id, page).await.expect("audit page") }
    })
    .await;
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [3, 3, 1]);
    let attempts: Vec<u32> = pages
        .iter()
        .flatten()
        .map(|e| e.attempt.expect("attempt").get())
        .collect();
    assert_eq!(attempts, [0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(
        pages.concat(),
        db.audit_log(&mine.id, ALL).await.expect("audit").items
    );

    // A list that fills its last page exactly ends there, without an empty page after it.
    let pages = all_pages(3, |page| {
        let db = db.clone();
        let id = theirs.id.clone();
        async move { db.audit_log(&id, page).await.expect("audit page") }
    })
    .await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3]);
    let only = db
        .audit_log(&theirs.id, Page::first(1))
        .await
        .expect("audit");
    assert_eq!(only.items.len(), 1);
    assert!(only.next.is_some());
    let empty = db
        .audit_log(&new_session_id(), Page::first(10))
        .await
        .expect("audit");
    assert_eq!(
        empty,
        Paged {
            items: Vec::new(),
            next: None
        }
    );
}

async fn dead_letters_page_by_id(db: Store) {
    let mut expected = Vec::new();
    for n in 1..=5u32 {
        let session = open_session(&db).await;
        let mut t = Transition::new(
            &session,
            with_status(&session, SessionStatus::Failed, "retry_processing_failed"),
        );
        t.dead_letter = Some(NewDeadLetter {
            job: job(&session.id, 1, now_ms()),
            receive_count: n,
            last_error: format!("failure {n}"),
        });
        assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
        expected.push(n);
    }

    let pages = all_pages(2, |page| {
        let db = db.clone();
        async move { db.dead_letters(page).await.expect("dead letters page") }
    })
    .await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    let seen: Vec<u32> = pages.iter().flatten().map(|d| d.receive_count).collect();
    assert_eq!(seen, expected, "every dead letter once, oldest first");
    let ids: Vec<i64> = pages.iter().flatten().map(|d| d.id.get()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        pages.concat(),
        db.dead_letters(ALL).await.expect("dead letters").items
    );
}

async fn duplicate_payments_page_by_id(db: Store) {
    let mut sessions = Vec::new();
    for _ in 0..5 {
        let session = open_session(&db).await;
        let mut t = Transition::new(&session, session.state.clone());
        t.duplicate_payment = Some(NewDuplicatePayment {
            paid_attempt: AttemptNumber::new(1),
            duplicate_attempt: AttemptNumber::ORIGINAL,
            provider_session_id: None,
            payment_intent: Some(format!("pi_{}", session.id.as_str())),
            status: DuplicatePaymentStatus::Detected,
        });
        assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
        sessions.push(session.id);
    }

    let pages = all_pages(2, |page| {
        let db = db.clone();
        async move { db.duplicate_payments(page).await.expect("duplicates page") }
    })
    .await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    let seen: Vec<PaymentSessionId> = pages
        .iter()
        .flatten()
        .map(|d| d.session_id.clone())
        .collect();
    assert_eq!(seen, sessions, "every double payment once, oldest first");
    assert_eq!(
        pages.concat(),
        db.duplicate_payments(ALL).await.expect("duplicates").items
    );
}

/// An owed refund's provider call is claimed by one of several concurrent runners; a claim
/// keeps it from the others until it is older than their `before`; each settlement moves the
/// record only from the states it may come from, once, with its audit entry; and a provider
/// event id settles at most once.
async fn duplicate_refunds_are_claimed_once_and_only_move_forward(db: Store) {
    let session = open_session(&db).await;
    let mut t = Transition::new(&session, session.state.clone());
    let payment_intent = format!("pi_{}", session.id.as_str());
    t.duplicate_payment = Some(NewDuplicatePayment {
        paid_attempt: AttemptNumber::new(1),
        duplicate_attempt: AttemptNumber::ORIGINAL,
        provider_session_id: None,
        payment_intent: Some(payment_intent.clone()),
        status: DuplicatePaymentStatus::RefundRequested,
    });
    assert_eq!(db.commit(t).await.expect("commit"), Committed::Applied);
    let id = session.id.clone();
    let attempt = AttemptNumber::ORIGINAL;
    let now = Utc::now();
    let grace = TimeDelta::minutes(2);

    // Never tried: owed at once, even to a runner that leaves recent claims alone.
    let owed = db.duplicate_refunds_owed(now - grace, 10).await.unwrap();
    assert_eq!(owed.len(), 1);
    let start = Arc::new(Barrier::new(8));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (db, id, start) = (db.clone(), id.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            db.claim_duplicate_refund(&id, attempt, now - grace, now)
                .await
                .expect("claim")
        }));
    }
    let mut claims = Vec::new();
    for task in tasks {
        claims.push(task.await.expect("claim task"));
    }
    assert_eq!(claims.iter().filter(|c| **c).count(), 1, "{claims:?}");
    assert!(
        db.duplicate_refunds_owed(now - grace, 10)
            .await
            .unwrap()
            .is_empty(),
        "a fresh claim is left alone"
    );
    let later = now + TimeDelta::minutes(3);
    assert_eq!(
        db.duplicate_refunds_owed(later - grace, 10)
            .await
            .unwrap()
            .len(),
        1,
        "an old claim is owed again"
    );

    let audit = |action| NewAuditEntry {
        action,
        attempt: Some(attempt),
        actor: "system".to_owned(),
        details: json!({}),
    };
    let pending = RefundSettlement::Pending {
        refund_id: "re_1".to_owned(),
    };
    let refunded = RefundSettlement::Refunded { refund_id: None };
    let failed = RefundSettlement::Failed {
        refund_id: Some("re_1".to_owned()),
        failure_reason: Some("expired_or_canceled_card".to_owned()),
        error: "failed at the bank".to_owned(),
    };
    let settle = |settlement: RefundSettlement, action, event: Option<&'static str>| {
        let (db, id) = (db.clone(), id.clone());
        async move {
            db.settle_duplicate_refund(&id, attempt, &settlement, Some(&audit(action)), event)
                .await
                .expect("settle")
        }
    };
    assert!(settle(pending.clone(), AuditAction::DuplicateRefundPending, None).await);
    assert!(
        !settle(pending, AuditAction::DuplicateRefundPending, None).await,
        "pending only from requested"
    );
    assert!(
        db.duplicate_refunds_owed(later, 10)
            .await
            .unwrap()
            .is_empty(),
        "a pending refund is not owed"
    );
    assert!(
        !db.claim_duplicate_refund(&id, attempt, later, later)
            .await
            .unwrap()
    );
    assert!(
        settle(
            refunded.clone(),
            AuditAction::DuplicateRefunded,
            Some("evt_1")
        )
        .await
    );
    let record = db.duplicate_payment(&id, attempt).await.unwrap().unwrap();
    assert_eq!(record.status, DuplicatePaymentStatus::Refunded);
    assert_eq!(
        record.refund_id.as_deref(),
        Some("re_1"),
        "the recorded id is kept"
    );
    assert!(!settle(refunded, AuditAction::DuplicateRefunded, None).await);
    assert!(
        !settle(
            failed.clone(),
            AuditAction::DuplicateRefundFailed,
            Some("evt_1")
        )
        .await,
        "an event id already processed changes nothing"
    );
    assert!(
        settle(
            failed.clone(),
            AuditAction::DuplicateRefundFailed,
            Some("evt_2")
        )
        .await
    );
    assert!(!settle(failed, AuditAction::DuplicateRefundFailed, Some("evt_3")).await);
    let record = db
        .duplicate_payment_by_intent(&payment_intent)
        .await
        .unwrap()
        .expect("found by its charge");
    assert_eq!(record.status, DuplicatePaymentStatus::RefundFailed);
    assert_eq!(
        record.failure_reason.as_deref(),
        Some("expired_or_canceled_card")
    );
    assert_eq!(record.last_error.as_deref(), Some("failed at the bank"));
    assert_eq!(record.refund_id.as_deref(), Some("re_1"));
    assert!(
        db.duplicate_payment_by_intent("pi_other")
            .await
            .unwrap()
            .is_none()
    );
    let actions: Vec<String> = db
        .audit_log(&id, ALL)
        .await
        .expect("audit")
        .items
        .into_iter()
        .map(|e| e.action)
        .filter(|a| a.starts_with("duplicate_refund"))
        .collect();
    assert_eq!(
        actions,
        [
            "duplicate_refund_pending",
            "duplicate_refunded",
            "duplicate_refund_failed"
        ]
    );
}
