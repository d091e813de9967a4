//! Queue conformance (DESIGN.md §5): ONE set of tests, instantiated by [`queue_conformance!`]
//! for every backend that can carry retry jobs to the worker:
//!
//! - `embedded_sqlite`: the outbox table of a temporary SQLite file, leased in place;
//! - `embedded_postgres`: the same on a fresh PostgreSQL database (`TempDatabase`);
//! - `sqs`: moto's SQS server, queues unique to the test (`unique_env()`), fed the way
//!   production feeds it: jobs are committed to an outbox (SQLite) and moved by
//!   [`SqsRelay::relay_once`], since producers never send to SQS directly.
//!
//! Each test is one async fn over a [`Harness`]. Timings are in whole seconds because SQS
//! delays and visibility timeouts are; receives on SQS long-poll (up to 5 s), so every
//! "nothing arrives early" assertion is written as "what arrives, arrives no earlier than".
//! PostgreSQL and moto are required: these tests fail, never skip, when they are missing.

use crate::support::services::{TempDatabase, sqs_endpoint, unique_env};
use chrono::{DateTime, Duration as TimeDelta, Utc};
use payretry::queue::relay::SqsRelay;
use payretry::queue::sqs::{self as sqs_queue, SqsQueue};
use payretry::queue::{Delivery, JobQueue};
use payretry::storage::sqlite::SqliteStorage;
use payretry::storage::{Committed, NewAuditEntry, NewSession, SessionRecord, Storage, Transition};
use payretry_domain::{
    Amount, AttemptNumber, AuditAction, Currency, Money, PaymentSessionId, ProviderSessionId,
    RetryJob, UserId,
};
use serde_json::{Value, json};
use sqlx::Connection;
use std::any::Any;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Barrier;

macro_rules! queue_conformance {
    ($($test:ident),+ $(,)?) => {
        mod embedded_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::run(super::Harness::embedded_sqlite, super::$test).await;
                }
            )+
        }

        mod embedded_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::run(super::Harness::embedded_postgres, super::$test).await;
                }
            )+
        }

        mod sqs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::run(super::Harness::sqs, super::$test).await;
                }
            )+
        }
    };
}

queue_conformance!(
    due_job_is_received_once_with_the_message_body_of_the_design,
    job_not_yet_due_is_not_received_before_it_is_due,
    received_job_is_invisible_during_its_lease_and_redelivered_after_it,
    ack_deletes_the_job_for_good,
    release_redelivers_after_the_delay,
    postpone_redelivers_after_the_delay_without_counting_the_delivery,
    defer_requeues_a_job_that_is_not_due_without_losing_it,
    concurrent_receivers_get_each_job_exactly_once,
    ping_succeeds,
);

async fn run<H, HF, T, TF>(harness: H, test: T)
where
    H: FnOnce() -> HF,
    HF: Future<Output = Harness>,
    T: FnOnce(Harness) -> TF,
    TF: Future<Output = ()>,
{
    test(harness().await).await;
}

// ----- the harness -----------------------------------------------------------------------

/// One queue backend, seen the way the service sees it: jobs go in through a storage
/// transition (the outbox), come out through [`JobQueue`].
struct Harness {
    /// Where sessions and the outbox live.
    storage: Arc<dyn Storage>,
    /// What the worker consumes.
    queue: Arc<dyn JobQueue>,
    /// With SQS: the relay that moves outbox rows to the queue.
    relay: Option<SqsRelay>,
    /// How to read the raw message bodies behind the trait.
    raw: Raw,
    /// Temporary directories and databases, removed when the harness is dropped.
    _guards: Vec<Box<dyn Any + Send + Sync>>,
}

enum Raw {
    Sqlite(String),
    Postgres(String),
    Sqs {
        client: aws_sdk_sqs::Client,
        queue_url: String,
    },
}

async fn sqlite_storage() -> (Arc<SqliteStorage>, String, TempDatabase) {
    let db = TempDatabase::sqlite();
    (Arc::new(db.sqlite_storage().await), db.url.clone(), db)
}

impl Harness {
    async fn embedded_sqlite() -> Self {
        let (storage, url, dir) = sqlite_storage().await;
        Self {
            storage: storage.clone(),
            queue: storage,
            relay: None,
            raw: Raw::Sqlite(url),
            _guards: vec![Box::new(dir)],
        }
    }

    async fn embedded_postgres() -> Self {
        let db = TempDatabase::postgres().await;
        let storage = Arc::new(db.postgres_storage(8).await);
        Self {
            storage: storage.clone(),
            queue: storage,
            relay: None,
            raw: Raw::Postgres(db.url.clone()),
            _guards: vec![Box::new(db)],
        }
    }

    async fn sqs() -> Self {
        let endpoint = sqs_endpoint();
        let env = unique_env();
        let client = sqs_queue::client(Some(&endpoint)).await;
        let (queue_url, _) = sqs_queue::setup(&client, &env, 5)
            .await
            .expect("create the test queues");
        let queue = Arc::new(
            SqsQueue::connect(client.clone(), &env)
                .await
                .expect("connect to the test queues"),
        );
        let (outbox, _, dir) = sqlite_storage().await;
        Self {
            storage: outbox.clone(),
            queue: queue.clone(),
            relay: Some(SqsRelay {
                outbox,
                sqs: queue,
                lease: Duration::from_secs(30),
            }),
            raw: Raw::Sqs { client, queue_url },
            _guards: vec![Box::new(dir)],
        }
    }

    fn queue(&self) -> Arc<dyn JobQueue> {
        self.queue.clone()
    }

    /// A stored open session whose window ends in 24 h.
    async fn session(&self) -> SessionRecord {
        let id = PaymentSessionId::from_random(uuid::Uuid::new_v4().as_u128());
        self.storage
            .insert_session(NewSession {
                provider_session_id: ProviderSessionId::new(format!("cs_{}", id.as_str())),
                checkout_url: format!("https://checkout.example/{}", id.as_str()),
                id: id.clone(),
                buyer: UserId::new("buyer-1"),
                money: Money {
                    amount: Amount::new(2500).expect("amount"),
                    currency: Currency::parse("usd").expect("currency"),
                },
                description: "Order 123".to_owned(),
                metadata: json!({}),
                expires_at: now_ms() + TimeDelta::hours(24),
                created_at: now_ms(),
                audit: NewAuditEntry {
                    action: AuditAction::CheckoutCreated,
                    attempt: Some(AttemptNumber::ORIGINAL),
                    actor: "system".to_owned(),
                    details: json!({}),
                },
                idempotency: None,
            })
            .await
            .expect("insert session");
        self.storage
            .session(&id)
            .await
            .expect("read session")
            .expect("session exists")
    }

    /// Writes `job` the way the service does (a transition's outbox row) and, for SQS,
    /// relays it.
    async fn enqueue(&self, job: RetryJob) {
        self.enqueue_all(std::slice::from_ref(&job)).await;
    }

    async fn enqueue_all(&self, jobs: &[RetryJob]) {
        for job in jobs {
            let session = self
                .storage
                .session(&job.payment_session_id)
                .await
                .expect("read session")
                .expect("session exists");
            let mut t = Transition::new(&session, session.state.clone());
            t.enqueue = Some(job.clone());
            assert_eq!(
                self.storage.commit(t).await.expect("commit"),
                Committed::Applied
            );
        }
        if let Some(relay) = &self.relay {
            let sent = relay.relay_once().await.expect("relay the outbox to SQS");
            assert_eq!(sent, jobs.len(), "SQS accepted every outbox row");
        }
    }

    /// The message bodies waiting in the queue, read behind the trait: the outbox rows'
    /// payloads, or the SQS messages' bodies (received raw: use only at the end of a test).
    async fn raw_bodies(&self) -> Vec<String> {
        match &self.raw {
            Raw::Sqlite(url) => {
                let mut conn = sqlx::SqliteConnection::connect(url).await.expect("SQLite");
                sqlx::query_scalar("SELECT payload FROM retry_jobs")
                    .fetch_all(&mut conn)
                    .await
                    .expect("read payloads")
            }
            Raw::Postgres(url) => {
                let mut conn = sqlx::PgConnection::connect(url).await.expect("PostgreSQL");
                sqlx::query_scalar("SELECT payload FROM retry_jobs")
                    .fetch_all(&mut conn)
                    .await
                    .expect("read payloads")
            }
            Raw::Sqs { client, queue_url } => client
                .receive_message()
                .queue_url(queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(2)
                .visibility_timeout(30)
                .send()
                .await
                .expect("raw receive")
                .messages()
                .iter()
                .filter_map(|m| m.body().map(str::to_owned))
                .collect(),
        }
    }
}

// ----- fixtures --------------------------------------------------------------------------

/// Now, at the millisecond precision the backends store.
fn now_ms() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).expect("now")
}

/// Retry `attempt` of `session`, with a 60 s delay that ends at `due`.
fn job(session: &SessionRecord, attempt: u32, due: DateTime<Utc>) -> RetryJob {
    RetryJob::new(
        session.id.clone(),
        AttemptNumber::new(attempt),
        60,
        due,
        due - TimeDelta::seconds(60),
    )
}

/// A job due one second ago, enqueued.
async fn due_job(h: &Harness) -> RetryJob {
    let session = h.session().await;
    let job = job(&session, 1, now_ms() - TimeDelta::seconds(1));
    h.enqueue(job.clone()).await;
    job
}

/// Receives until something arrives (or `within` passes: a failure). Returns the
/// deliveries and when they arrived.
async fn receive_within(
    queue: &dyn JobQueue,
    lease: Duration,
    within: Duration,
) -> (Vec<Delivery>, Instant) {
    let deadline = Instant::now() + within;
    loop {
        let got = queue.receive(10, lease).await.expect("receive");
        if !got.is_empty() {
            return (got, Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "nothing was delivered within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SQS delays and visibility timeouts are whole seconds and the relay truncates the
/// remaining delay, so a job may arrive up to this much before its due time (the worker
/// treats a job at most 1 s early as due).
const EARLY_TOLERANCE: Duration = Duration::from_secs(1);

// ----- the tests -------------------------------------------------------------------------

async fn due_job_is_received_once_with_the_message_body_of_the_design(h: Harness) {
    let queue = h.queue();
    let session = h.session().await;
    let enqueued_at = now_ms() - TimeDelta::seconds(301);
    let scheduled_for = enqueued_at + TimeDelta::seconds(300);
    let job = RetryJob::new(
        session.id.clone(),
        AttemptNumber::new(2),
        300,
        scheduled_for,
        enqueued_at,
    );
    h.enqueue(job.clone()).await;

    let (deliveries, _) = receive_within(
        queue.as_ref(),
        Duration::from_secs(30),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].job, job);
    assert_eq!(deliveries[0].receive_count, 1);
    assert!(
        queue
            .receive(10, Duration::from_secs(30))
            .await
            .expect("receive")
            .is_empty(),
        "a job is received once while its lease holds"
    );

    // The body behind the trait: exactly the six fields of DESIGN.md §5.
    queue
        .release(&deliveries[0], "read the raw body", Duration::ZERO)
        .await
        .expect("release");
    let bodies = h.raw_bodies().await;
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let body: Value = serde_json::from_str(&bodies[0]).expect("the body is JSON");
    let keys: BTreeSet<&str> = body
        .as_object()
        .expect("the body is an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "paymentSessionId",
            "attemptNumber",
            "delaySeconds",
            "delayMinutes",
            "scheduledFor",
            "enqueuedAt"
        ]),
        "{body}"
    );
    assert_eq!(body["paymentSessionId"], json!(session.id.as_str()));
    assert!(
        session.id.as_str().starts_with("ps_"),
        "{}",
        session.id.as_str()
    );
    assert_eq!(body["attemptNumber"], json!(2));
    assert_eq!(body["delaySeconds"], json!(300));
    // A whole number of minutes is an integer (`5`, not `5.0`).
    assert_eq!(body["delayMinutes"], json!(5));
    for (field, expected) in [("scheduledFor", scheduled_for), ("enqueuedAt", enqueued_at)] {
        let text = body[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} is a string: {body}"));
        let at = DateTime::parse_from_rfc3339(text)
            .unwrap_or_else(|e| panic!("{field} {text} is not RFC 3339: {e}"));
        assert_eq!(at, expected, "{field}");
    }
}

async fn job_not_yet_due_is_not_received_before_it_is_due(h: Harness) {
    let queue = h.queue();
    let session = h.session().await;
    let due = now_ms() + TimeDelta::seconds(3);
    let due_instant = Instant::now() + Duration::from_secs(3);
    let job = job(&session, 1, due);
    h.enqueue(job.clone()).await;

    let (deliveries, at) = receive_within(
        queue.as_ref(),
        Duration::from_secs(30),
        Duration::from_secs(15),
    )
    .await;
    assert!(
        at + EARLY_TOLERANCE >= due_instant,
        "delivered {:?} before its due time",
        due_instant - at
    );
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].job, job);
    assert_eq!(deliveries[0].receive_count, 1);
}

async fn received_job_is_invisible_during_its_lease_and_redelivered_after_it(h: Harness) {
    let queue = h.queue();
    let job = due_job(&h).await;
    let lease = Duration::from_secs(2);
    let leased_at = Instant::now();
    let (first, _) = receive_within(queue.as_ref(), lease, Duration::from_secs(10)).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].job, job);
    assert_eq!(first[0].receive_count, 1);

    let (second, at) = receive_within(
        queue.as_ref(),
        Duration::from_secs(30),
        Duration::from_secs(15),
    )
    .await;
    assert!(
        at >= leased_at + lease,
        "redelivered {:?} into a {lease:?} lease",
        at - leased_at
    );
    assert_eq!(second.len(), 1, "redelivered once");
    assert_eq!(second[0].job, job);
    assert_eq!(second[0].receive_count, 2);
    assert_ne!(second[0].receipt, first[0].receipt);
}

async fn ack_deletes_the_job_for_good(h: Harness) {
    let queue = h.queue();
    due_job(&h).await;
    let (deliveries, _) = receive_within(
        queue.as_ref(),
        Duration::from_secs(1),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(deliveries.len(), 1);
    queue.ack(&deliveries[0]).await.expect("ack");

    // Past the lease, nothing comes back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        queue
            .receive(10, Duration::from_secs(30))
            .await
            .expect("receive")
            .is_empty(),
        "an acknowledged job is never redelivered"
    );
    assert!(h.raw_bodies().await.is_empty(), "nothing left in the queue");
}

async fn release_redelivers_after_the_delay(h: Harness) {
    let queue = h.queue();
    let job = due_job(&h).await;
    let before = Utc::now() - TimeDelta::seconds(1);
    let (first, _) = receive_within(
        queue.as_ref(),
        Duration::from_secs(30),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(first.len(), 1);

    let delay = Duration::from_secs(2);
    let released_at = Instant::now();
    queue
        .release(&first[0], "provider unavailable", delay)
        .await
        .expect("release");

    let (again, at) = receive_within(
        queue.as_ref(),
        Duration::from_secs(30),
        Duration::from_secs(15),
    )
    .await;
    assert!(
        at >= released_at + delay,
        "redelivered {:?} after a release for {delay:?}",
        at - released_at
    );
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].job, job);
    assert_eq!(again[0].receive_count, 2);
    // The first delivery's time stays with the job (the reference of its checkout's expiry).
    let first_at = first[0].first_delivered_at;
    assert!(
        before <= first_at && first_at <= Utc::now(),
        "first delivered at {first_at}, received after {before}"
    );
    assert_eq!(again[0].first_delivered_at, first_at);
}

async fn postpone_redelivers_after_the_delay_without_counting_the_delivery(h: Harness) {
    let queue = h.queue();
    let job = due_job(&h).await;
    let (first, _) = receive_within(
        queue.as_ref(),
        Duration::from_secs(30),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].receive_count, 1);

    let delay = Duration::from_secs(2);
    let postponed_at = Instant::now();
    queue
        .postpone(&first[0], "provider rate limit reached", delay)
        .await
        .expect("postpone");

    let (again, at) = receive_within(
        queue.as_ref(),
        Duration::from_secs(30),
        Duration::from_secs(15),
    )
    .await;
    assert!(
        at + EARLY_TOLERANCE >= postponed_at + delay,
        "redelivered {:?} after a postponement for {delay:?}",
        at - postponed_at
    );
    assert_eq!(again.len(), 1, "one job, not a copy beside it");
    assert_eq!(again[0].job, job);
    assert_eq!(
        again[0].receive_count, 1,
        "the postponed delivery is not counted"
    );
}

async fn defer_requeues_a_job_that_is_not_due_without_losing_it(h: Harness) {
    let queue = h.queue();
    let job = due_job(&h).await;
    // A short lease: if defer left the early copy behind, it would come back after it.
    let (first, _) = receive_within(
        queue.as_ref(),
        Duration::from_secs(1),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(first.len(), 1);

    // The delivery of a job due in 3 s (as SQS hands over a job whose delay exceeded 15 min).
    let delay = Duration::from_secs(3);
    let early = Delivery {
        job: RetryJob {
            scheduled_for: now_ms() + TimeDelta::seconds(3),
            ..first[0].job.clone()
        },
        ..first[0].clone()
    };
    let deferred_at = Instant::now();
    queue.defer(&early).await.expect("defer");

    let (again, at) = receive_within(
        queue.as_ref(),
        Duration::from_secs(30),
        Duration::from_secs(15),
    )
    .await;
    assert!(
        at + EARLY_TOLERANCE >= deferred_at + delay,
        "a deferred job came back {:?} after a {delay:?} defer",
        at - deferred_at
    );
    assert_eq!(again.len(), 1, "exactly one copy: {again:?}");
    assert_eq!(again[0].job.payment_session_id, job.payment_session_id);
    assert_eq!(again[0].job.attempt_number, job.attempt_number);
    queue.ack(&again[0]).await.expect("ack");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        queue
            .receive(10, Duration::from_secs(30))
            .await
            .expect("receive")
            .is_empty(),
        "the early copy was not left behind"
    );
}

async fn concurrent_receivers_get_each_job_exactly_once(h: Harness) {
    const JOBS: usize = 30;
    const RECEIVERS: usize = 3;
    let queue = h.queue();
    let session = h.session().await;
    let due = now_ms() - TimeDelta::seconds(1);
    let jobs: Vec<RetryJob> = (1..=JOBS as u32).map(|a| job(&session, a, due)).collect();
    h.enqueue_all(&jobs).await;

    let received = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(RECEIVERS));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tasks = Vec::new();
    for _ in 0..RECEIVERS {
        let (queue, received, start) = (queue.clone(), received.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut claimed = Vec::new();
            while received.load(Ordering::SeqCst) < JOBS && Instant::now() < deadline {
                let batch = queue
                    .receive(10, Duration::from_secs(60))
                    .await
                    .expect("receive");
                if batch.is_empty() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                received.fetch_add(batch.len(), Ordering::SeqCst);
                claimed.extend(batch);
            }
            claimed
        }));
    }
    let mut seen = BTreeSet::new();
    let mut total = 0;
    for task in tasks {
        for delivery in task.await.expect("receiver task") {
            total += 1;
            assert_eq!(delivery.receive_count, 1, "{delivery:?}");
            let attempt = delivery.job.attempt_number.get();
            assert!(seen.insert(attempt), "job {attempt} was received twice");
        }
    }
    assert_eq!(total, JOBS);
    assert_eq!(seen, (1..=JOBS as u32).collect::<BTreeSet<_>>());
}

async fn ping_succeeds(h: Harness) {
    h.queue().ping().await.expect("ping the queue");
}
