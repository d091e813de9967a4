//! What only the SQS queue does (DESIGN.md §5, `PAYRETRY_QUEUE=sqs`), against moto's SQS
//! server: `payretry sqs setup` and its redrive policy, delays beyond SQS's 15 minutes,
//! visibility extension, the outbox relay through an SQS outage, and dead letters both ways
//! (the worker giving up, and a crash loop that the redrive policy moves to the DLQ).
//! The queue behaviour shared with the embedded queue is in `queue_conformance.rs`.

use crate::support::app::{Database, JWT_SECRET, Options, Queue, TestApp, text};
use crate::support::fake_stripe::FailureMode;
use crate::support::services::{MotoServer, TempDatabase, sqs_endpoint, unique_env};
use aws_sdk_sqs::types::QueueAttributeName;
use chrono::{DateTime, Duration as TimeDelta, Utc};
use payretry::app::{App, ServeRole, Tuning};
use payretry::config::Config;
use payretry::queue::relay::SqsRelay;
use payretry::queue::sqs::{self, SqsQueue};
use payretry::queue::{Delivery, JobQueue, QueueError};
use payretry::shutdown;
use payretry::storage::sqlite::SqliteStorage;
use payretry::storage::{
    Committed, NewAuditEntry, NewSession, SessionRecord, SessionStore, Transition,
};
use payretry::worker::{Outcome, Worker, WorkerSettings};
use payretry_domain::{
    Amount, AttemptNumber, AuditAction, Currency, Money, PaymentSessionId, ProviderSessionId,
    RetryJob, UserId,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::Connection;
use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Calls through the Stripe client per failed delivery (the default `max_tries`).
const STRIPE_TRIES_PER_CALL: usize = 3;

// ----- fixtures --------------------------------------------------------------------------

/// Now, at the millisecond precision the backends store.
fn now_ms() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).expect("now")
}

/// An SQS client for `endpoint` (the credential chain reads the fake AWS_* variables that
/// `sqs_endpoint()` sets).
async fn client(endpoint: &str) -> aws_sdk_sqs::Client {
    sqs_endpoint();
    sqs::client(Some(endpoint)).await
}

/// Both queues of `env` on the shared moto server, with `max_receives` in the redrive policy.
async fn queues(max_receives: u32) -> (String, aws_sdk_sqs::Client, String, String) {
    let env = unique_env();
    let client = client(&sqs_endpoint()).await;
    let (main, dlq) = sqs::setup(&client, &env, max_receives)
        .await
        .expect("create the test queues");
    (env, client, main, dlq)
}

/// An outbox (SQLite) in a temporary database.
struct Outboxed {
    storage: Arc<SqliteStorage>,
    url: String,
    _db: TempDatabase,
}

impl Outboxed {
    async fn new() -> Self {
        let db = TempDatabase::sqlite();
        Self {
            storage: Arc::new(db.sqlite_storage().await),
            url: db.url.clone(),
            _db: db,
        }
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
        self.reload(&id).await
    }

    async fn reload(&self, id: &PaymentSessionId) -> SessionRecord {
        self.storage
            .session(id)
            .await
            .expect("read session")
            .expect("session exists")
    }

    /// Commits a transition that writes `job` to the outbox.
    async fn enqueue(&self, job: &RetryJob) {
        let session = self.reload(&job.payment_session_id).await;
        let mut t = Transition::new(&session, session.state.clone());
        t.enqueue = Some(job.clone());
        assert_eq!(
            self.storage.commit(t).await.expect("commit"),
            Committed::Applied
        );
    }

    async fn outbox_rows(&self) -> i64 {
        let mut conn = sqlx::SqliteConnection::connect(&self.url)
            .await
            .expect("SQLite");
        sqlx::query_scalar("SELECT COUNT(*) FROM retry_jobs")
            .fetch_one(&mut conn)
            .await
            .expect("count outbox rows")
    }
}

fn job(session: &SessionRecord, attempt: u32, due: DateTime<Utc>, delay: u64) -> RetryJob {
    RetryJob::new(
        session.id.clone(),
        AttemptNumber::new(attempt),
        delay,
        due,
        due - TimeDelta::seconds(delay as i64),
    )
}

/// A queue attribute as a number.
async fn attribute(client: &aws_sdk_sqs::Client, url: &str, name: QueueAttributeName) -> i64 {
    client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(name.clone())
        .send()
        .await
        .expect("get queue attributes")
        .attributes()
        .and_then(|a| a.get(&name))
        .unwrap_or_else(|| panic!("no {name:?} for {url}"))
        .parse()
        .expect("a number")
}

/// (visible, in flight, delayed) messages of a queue.
async fn counts(client: &aws_sdk_sqs::Client, url: &str) -> (i64, i64, i64) {
    (
        attribute(client, url, QueueAttributeName::ApproximateNumberOfMessages).await,
        attribute(
            client,
            url,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        )
        .await,
        attribute(
            client,
            url,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
        )
        .await,
    )
}

/// Polls until `url` holds `wanted` (visible, in flight, delayed) messages.
async fn wait_for_counts(client: &aws_sdk_sqs::Client, url: &str, wanted: (i64, i64, i64)) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = counts(client, url).await;
        if now == wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} holds {now:?} (visible, in flight, delayed), expected {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Receives from `queue` until `n` deliveries arrived (15 s at most).
async fn receive_n(queue: &dyn JobQueue, n: usize, lease: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut all = Vec::new();
    while all.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} deliveries arrived: {all:?}",
            all.len()
        );
        all.extend(queue.receive(10, lease).await.expect("receive"));
    }
    all
}

/// A worker on the outbox database at `database_url`, consuming `queue`, built the way the
/// service builds it (sandbox provider, never reached in these tests).
async fn worker(database_url: &str, env: &str, queue: Arc<dyn JobQueue>) -> Worker {
    let vars: HashMap<&str, String> = HashMap::from([
        ("PAYRETRY_DATABASE_URL", database_url.to_owned()),
        ("PAYRETRY_JWT_SECRET", JWT_SECRET.to_owned()),
        ("PAYRETRY_QUEUE", "sqs".to_owned()),
        ("PAYRETRY_SQS_ENDPOINT", sqs_endpoint()),
        ("PAYRETRY_ENV", env.to_owned()),
    ]);
    let config = Config::from_lookup(|k| vars.get(k).cloned()).expect("config");
    let app = App::build(
        &config,
        "http://127.0.0.1:9".to_owned(),
        Tuning::from_config(&config),
    )
    .await
    .expect("build the app");
    Worker::new(app.state.payments.clone(), queue, WorkerSettings::default())
}

/// `payretry` (the real binary) with `vars`; returns (success, stdout, stderr).
fn payretry(args: &[&str], vars: &[(&str, String)]) -> (bool, String, String) {
    sqs_endpoint();
    let mut command = Command::new(env!("CARGO_BIN_EXE_payretry"));
    command
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1");
    for (key, value) in vars {
        command.env(key, value);
    }
    let out = command.output().expect("run payretry");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn dead_letters(app: &TestApp) -> Vec<Value> {
    let response = app
        .request(
            Method::GET,
            "/admin/dead-letters",
            Some(&app.admin()),
            None,
            None,
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["deadLetters"].as_array().unwrap().clone()
}

// ----- payretry sqs setup ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_setup_creates_both_queues_and_the_redrive_policy_idempotently() {
    let endpoint = sqs_endpoint();
    let env = unique_env();
    let vars = |max_receives: &str| {
        vec![
            ("PAYRETRY_QUEUE", "sqs".to_owned()),
            ("PAYRETRY_SQS_ENDPOINT", endpoint.clone()),
            ("PAYRETRY_ENV", env.clone()),
            ("PAYRETRY_MAX_RECEIVES", max_receives.to_owned()),
        ]
    };
    let (main_name, dlq_name) = sqs::queue_names(&env);
    assert_eq!(main_name, format!("payments-retry-{env}"));
    assert_eq!(dlq_name, format!("payments-retry-{env}-dlq"));

    for run in 1..=2 {
        let (ok, out, err) = payretry(&["sqs", "setup"], &vars("3"));
        assert!(ok, "run {run} of `payretry sqs setup` failed: {err}");
        assert!(out.contains(&main_name) && out.contains(&dlq_name), "{out}");
    }

    let client = client(&endpoint).await;
    let url = |name: String| {
        let client = client.clone();
        async move {
            client
                .get_queue_url()
                .queue_name(&name)
                .send()
                .await
                .unwrap_or_else(|e| panic!("queue {name} exists: {e:?}"))
                .queue_url()
                .expect("a URL")
                .to_owned()
        }
    };
    let main_url = url(main_name.clone()).await;
    let dlq_url = url(dlq_name).await;
    let listed = client
        .list_queues()
        .queue_name_prefix(&main_name)
        .send()
        .await
        .expect("list queues");
    assert_eq!(
        listed.queue_urls().len(),
        2,
        "exactly the two queues: {:?}",
        listed.queue_urls()
    );

    let attributes = |url: String| {
        let client = client.clone();
        async move {
            client
                .get_queue_attributes()
                .queue_url(&url)
                .attribute_names(QueueAttributeName::All)
                .send()
                .await
                .expect("get queue attributes")
                .attributes()
                .cloned()
                .unwrap_or_default()
        }
    };
    let dlq_arn = attributes(dlq_url.clone())
        .await
        .get(&QueueAttributeName::QueueArn)
        .cloned()
        .expect("the DLQ has an ARN");
    let redrive = |attributes: std::collections::HashMap<QueueAttributeName, String>| {
        let policy: Value = serde_json::from_str(
            attributes
                .get(&QueueAttributeName::RedrivePolicy)
                .expect("the main queue has a redrive policy"),
        )
        .expect("the redrive policy is JSON");
        let max = match &policy["maxReceiveCount"] {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        };
        (text(&policy, "deadLetterTargetArn"), max)
    };
    assert_eq!(
        redrive(attributes(main_url.clone()).await),
        (dlq_arn.clone(), Some(3))
    );
    assert!(
        !attributes(dlq_url)
            .await
            .contains_key(&QueueAttributeName::RedrivePolicy),
        "the DLQ itself has no redrive policy"
    );

    // A changed PAYRETRY_MAX_RECEIVES is applied by running setup again.
    let (ok, _, err) = payretry(&["sqs", "setup"], &vars("4"));
    assert!(ok, "{err}");
    assert_eq!(redrive(attributes(main_url).await), (dlq_arn, Some(4)));
}

// ----- delays beyond 15 minutes ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_due_in_20_minutes_is_sent_delayed_and_deferred_when_it_arrives_early() {
    let (env, client, main_url, _) = queues(5).await;
    let queue = Arc::new(
        SqsQueue::connect(client.clone(), &env)
            .await
            .expect("connect"),
    );
    let outbox = Outboxed::new().await;
    let session = outbox.session().await;
    let job = job(&session, 1, now_ms() + TimeDelta::minutes(20), 1200);
    outbox.enqueue(&job).await;

    // The relay sends it with the longest delay SQS takes (moto, like SQS, refuses a
    // DelaySeconds above 900, so an accepted send that is still delayed had 1..=900).
    let relay = SqsRelay {
        outbox: outbox.storage.clone(),
        sqs: queue.clone(),
        lease: Duration::from_secs(30),
    };
    assert_eq!(relay.relay_once().await.expect("relay"), 1);
    assert_eq!(outbox.outbox_rows().await, 0, "the row left the outbox");
    assert_eq!(counts(&client, &main_url).await, (0, 0, 1));

    // 15 minutes later SQS hands it over, 5 minutes early (played by sending the same body
    // without a delay).
    client
        .send_message()
        .queue_url(&main_url)
        .message_body(serde_json::to_string(&job).unwrap())
        .send()
        .await
        .expect("send the early copy");
    let delivery = receive_n(queue.as_ref(), 1, Duration::from_secs(60))
        .await
        .remove(0);
    assert_eq!(delivery.job, job);
    let before = outbox.reload(&session.id).await;

    let worker = worker(&outbox.url, &env, queue.clone()).await;
    assert_eq!(
        worker.handle(delivery).await.expect("handle"),
        Outcome::NotDue
    );

    // Not processed: the session is untouched; the early copy is gone (not left to its
    // visibility timeout) and a delayed copy carries the rest of the delay.
    assert_eq!(outbox.reload(&session.id).await, before);
    assert_eq!(counts(&client, &main_url).await, (0, 0, 2));
}

// ----- visibility ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_keeps_a_long_running_job_hidden() {
    let (env, client, _, _) = queues(5).await;
    let queue = Arc::new(SqsQueue::connect(client, &env).await.expect("connect"));
    let outbox = Outboxed::new().await;
    let session = outbox.session().await;
    outbox
        .enqueue(&job(&session, 1, now_ms() - TimeDelta::seconds(1), 60))
        .await;
    let relay = SqsRelay {
        outbox: outbox.storage.clone(),
        sqs: queue.clone(),
        lease: Duration::from_secs(30),
    };
    assert_eq!(relay.relay_once().await.expect("relay"), 1);

    let first = receive_n(queue.as_ref(), 1, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let extended_at = Instant::now();
    queue
        .extend(&first[0], Duration::from_secs(4))
        .await
        .expect("extend");

    let again = receive_n(queue.as_ref(), 1, Duration::from_secs(30)).await;
    let elapsed = extended_at.elapsed();
    assert!(
        elapsed >= Duration::from_secs(4),
        "redelivered {elapsed:?} into a 4 s extension"
    );
    assert_eq!(again[0].job, first[0].job);
    assert_eq!(again[0].receive_count, 2);
}

// ----- the relay through an SQS outage ---------------------------------------------------

/// The SQS relay's lease in production: `PAYRETRY_JOB_LEASE`'s default, as the app wires it.
const PRODUCTION_RELAY_LEASE: Duration = Duration::from_secs(60);

/// An own moto server, its queues, an outbox with 12 due jobs (two SQS batches) and a relay
/// claiming with `lease`; SQS is stopped after the rows were written.
struct Outage {
    moto: MotoServer,
    env: String,
    queue: Arc<SqsQueue>,
    outbox: Outboxed,
    relay: SqsRelay,
    jobs: Vec<RetryJob>,
}

impl Outage {
    async fn start(lease: Duration) -> Self {
        let mut moto = MotoServer::start();
        let env = unique_env();
        let client = client(&moto.endpoint).await;
        sqs::setup(&client, &env, 5).await.expect("setup");
        let queue = Arc::new(
            SqsQueue::connect(client.clone(), &env)
                .await
                .expect("connect"),
        );
        let outbox = Outboxed::new().await;
        let session = outbox.session().await;
        let due = now_ms() - TimeDelta::seconds(1);
        let jobs: Vec<RetryJob> = (1..=12).map(|a| job(&session, a, due, 60)).collect();
        for job in &jobs {
            outbox.enqueue(job).await;
        }
        let relay = SqsRelay {
            outbox: outbox.storage.clone(),
            sqs: queue.clone(),
            lease,
        };
        moto.stop();
        Self {
            moto,
            env,
            queue,
            outbox,
            relay,
            jobs,
        }
    }

    /// A relay round while SQS is down: it fails and every row stays in the outbox.
    async fn relay_fails_and_keeps_the_rows(&self) {
        let failed = self.relay.relay_once().await;
        assert!(
            matches!(failed, Err(QueueError::Sqs(_))),
            "a send to a stopped SQS fails: {failed:?}"
        );
        assert_eq!(
            self.outbox.outbox_rows().await,
            self.jobs.len() as i64,
            "every row is kept"
        );
    }

    /// Brings SQS back (moto is in memory: the queues are created again).
    async fn recover(&mut self) {
        self.moto.restart();
        sqs::setup(&client(&self.moto.endpoint).await, &self.env, 5)
            .await
            .expect("setup again");
    }

    /// One relay round sends every held row; each job then arrives exactly once.
    async fn relay_sends_everything_once(&self) {
        assert_eq!(
            self.relay
                .relay_once()
                .await
                .expect("relay after the outage"),
            self.jobs.len(),
            "every held row is sent once SQS is back"
        );
        assert_eq!(self.outbox.outbox_rows().await, 0, "sent rows are deleted");

        let deliveries = receive_n(
            self.queue.as_ref(),
            self.jobs.len(),
            Duration::from_secs(60),
        )
        .await;
        let mut seen = BTreeSet::new();
        for delivery in &deliveries {
            assert!(
                seen.insert(delivery.job.attempt_number.get()),
                "{:?} received twice",
                delivery.job
            );
            assert!(self.jobs.contains(&delivery.job), "{:?}", delivery.job);
            assert_eq!(delivery.receive_count, 1);
        }
        assert_eq!(seen.len(), self.jobs.len());
        assert!(
            self.queue
                .receive(10, Duration::from_secs(60))
                .await
                .expect("receive")
                .is_empty(),
            "nothing else in the queue"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_holds_rows_through_an_sqs_outage_and_loses_none() {
    let lease = Duration::from_secs(2);
    let mut outage = Outage::start(lease).await;
    outage.relay_fails_and_keeps_the_rows().await;
    // The failed round leased the rows before it returned: they are claimable again once its
    // lease has run from here, whatever time the claim itself took.
    let claimable_at = Instant::now() + lease + Duration::from_millis(100);
    outage.recover().await;
    tokio::time::sleep(claimable_at.saturating_duration_since(Instant::now())).await;
    outage.relay_sends_everything_once().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_sends_held_rows_as_soon_as_sqs_is_back() {
    let mut outage = Outage::start(PRODUCTION_RELAY_LEASE).await;
    outage.relay_fails_and_keeps_the_rows().await;
    outage.recover().await;
    outage.relay_sends_everything_once().await;
}

// ----- dead letters through the full app -------------------------------------------------

/// The provider fails every call of two deliveries (`PAYRETRY_MAX_RECEIVES=2`): the worker
/// dead-letters the job, the admin API lists it, and a redrive (through the outbox and SQS
/// again) opens the session once the provider is back.
async fn provider_failures_dead_letter_the_job_and_redrive_reopens(database: Database) {
    let (env, client, main_url, dlq_url) = queues(2).await;
    let app = TestApp::spawn_with(Options {
        stripe: true,
        vars: vec![
            ("PAYRETRY_RETRY_DELAYS", "1s".to_owned()),
            ("PAYRETRY_MAX_RECEIVES", "2".to_owned()),
            ("PAYRETRY_ENV", env),
        ],
        ..Options::on(database, Queue::Sqs)
    })
    .await;
    let fake = app.stripe.as_ref().expect("the fake Stripe API");
    let id = app.declined_session(&app.buyer()).await.id;

    // Each delivery asks the provider for the current checkout and gives up after
    // `STRIPE_TRIES_PER_CALL` 500s; two deliveries use exactly this many.
    fake.fail_next(2 * STRIPE_TRIES_PER_CALL, FailureMode::Status(500));
    assert_eq!(app.retry(&app.buyer(), &id, "key-1").await.status(), 202);
    let failed = app.wait_for_status(&id, "failed").await;
    assert_eq!(failed["failureReason"], "retry_processing_failed");
    assert_eq!(failed["retryAttempts"], 1);

    let dead = dead_letters(&app).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["paymentSessionId"], id.as_str());
    assert_eq!(dead[0]["attemptNumber"], 1);
    assert_eq!(dead[0]["receiveCount"], 2);
    assert_eq!(fake.create_count(&id, 1), 0);
    // The worker settled the message itself: nothing left for SQS's redrive policy.
    wait_for_counts(&client, &main_url, (0, 0, 0)).await;
    assert_eq!(counts(&client, &dlq_url).await, (0, 0, 0));
    assert!(
        app.audit_actions(&id)
            .await
            .contains(&"retry_dead_lettered".to_owned())
    );

    // The provider has recovered (the injected failures are used up).
    let redriven = app
        .request(
            Method::POST,
            &format!("/admin/dead-letters/{}/redrive", text(&dead[0], "id")),
            Some(&app.admin()),
            None,
            None,
        )
        .await;
    assert_eq!(redriven.status(), StatusCode::ACCEPTED);
    let open = app.wait_for_status(&id, "open").await;
    assert_eq!(open["retryAttempts"], 1, "a redrive spends no attempt");
    assert_eq!(fake.create_count(&id, 1), 1);
    assert!(dead_letters(&app).await.is_empty());
    wait_for_counts(&client, &main_url, (0, 0, 0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provider_failures_dead_letter_the_job_on_sqlite_and_sqs() {
    provider_failures_dead_letter_the_job_and_redrive_reopens(Database::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provider_failures_dead_letter_the_job_on_postgres_and_sqs() {
    provider_failures_dead_letter_the_job_and_redrive_reopens(Database::Postgres).await;
}

/// Workers keep dying mid-job (played by receiving the message straight from SQS and never
/// settling it): after `maxReceiveCount` receives the redrive policy moves it to the DLQ,
/// and the worker's drain turns it into a payretry dead letter, so the session is handed
/// back to the buyer. The CLI lists it, and redrives it through SQS again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_loop_ends_in_the_dlq_and_is_drained_into_a_dead_letter() {
    let endpoint = sqs_endpoint();
    let (env, client, main_url, dlq_url) = queues(2).await;
    // API role: the relay runs, no worker consumes the queue.
    let mut app = TestApp::spawn_with(Options {
        role: ServeRole::Api,
        vars: vec![
            ("PAYRETRY_RETRY_DELAYS", "1s".to_owned()),
            ("PAYRETRY_MAX_RECEIVES", "2".to_owned()),
            ("PAYRETRY_ENV", env.clone()),
        ],
        ..Options::on(Database::Sqlite, Queue::Sqs)
    })
    .await;
    let id = app.declined_session(&app.buyer()).await.id;
    assert_eq!(app.retry(&app.buyer(), &id, "key-1").await.status(), 202);

    // Two receives that never settle (a 1 s visibility timeout each).
    let raw_receive = || {
        client
            .receive_message()
            .queue_url(&main_url)
            .visibility_timeout(1)
            .wait_time_seconds(2)
            .send()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut receives = 0;
    while receives < 2 {
        assert!(Instant::now() < deadline, "received {receives} times only");
        let out = raw_receive().await.expect("raw receive");
        for message in out.messages() {
            let body: Value = serde_json::from_str(message.body().unwrap()).unwrap();
            assert_eq!(body["paymentSessionId"], id.as_str());
            receives += 1;
        }
    }
    // The next receive finds it past maxReceiveCount: the redrive policy moves it.
    loop {
        assert!(
            Instant::now() < deadline,
            "the message never reached the DLQ"
        );
        let out = raw_receive().await.expect("raw receive");
        assert!(
            out.messages().is_empty(),
            "received a third time: the redrive policy did not apply"
        );
        if counts(&client, &dlq_url).await == (1, 0, 0) {
            break;
        }
    }
    assert_eq!(counts(&client, &main_url).await, (0, 0, 0));
    assert_eq!(
        app.status(&app.buyer(), &id).await["status"],
        "retry_scheduled"
    );

    // The worker's drain.
    let queue = Arc::new(
        SqsQueue::connect(client.clone(), &env)
            .await
            .expect("connect"),
    );
    let worker = Arc::new(Worker::new(
        app.payments.clone(),
        queue.clone(),
        WorkerSettings {
            max_receives: 2,
            ..WorkerSettings::default()
        },
    ));
    let (trigger, stop) = shutdown::channel();
    let drain = tokio::spawn(worker.drain_sqs_dead_letters(queue, stop));

    let failed = app.wait_for_status(&id, "failed").await;
    assert_eq!(failed["failureReason"], "retry_processing_failed");
    let dead = dead_letters(&app).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["paymentSessionId"], id.as_str());
    assert_eq!(dead[0]["attemptNumber"], 1);
    assert!(dead[0]["receiveCount"].as_u64().unwrap() >= 2, "{dead:?}");
    assert!(
        text(&dead[0], "lastError").contains("dead-letter queue"),
        "{dead:?}"
    );
    wait_for_counts(&client, &dlq_url, (0, 0, 0)).await;
    trigger.trigger();
    drain.await.expect("drain task");

    // The CLI sees the same dead letters, and redrives through the outbox and SQS.
    let vars = vec![
        ("PAYRETRY_DATABASE_URL", app.db.url.clone()),
        ("PAYRETRY_JWT_SECRET", JWT_SECRET.to_owned()),
        ("PAYRETRY_QUEUE", "sqs".to_owned()),
        ("PAYRETRY_SQS_ENDPOINT", endpoint),
        ("PAYRETRY_ENV", env),
    ];
    let (ok, out, err) = payretry(&["dead-letters", "list"], &vars);
    assert!(ok, "{err}");
    let listed: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert_eq!(listed.len(), 1, "{out}");
    assert_eq!(listed[0]["paymentSessionId"], id.as_str());
    assert_eq!(listed[0]["id"], dead[0]["id"]);

    let (ok, out, err) = payretry(&["dead-letters", "redrive", &text(&dead[0], "id")], &vars);
    assert!(ok, "{err}");
    assert!(out.contains(&id), "{out}");
    assert_eq!(
        app.status(&app.buyer(), &id).await["status"],
        "retry_scheduled"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let redriven = loop {
        assert!(
            Instant::now() < deadline,
            "the redriven job never reached SQS"
        );
        let out = raw_receive().await.expect("raw receive");
        if let Some(message) = out.messages().first() {
            break serde_json::from_str::<Value>(message.body().unwrap()).unwrap();
        }
    };
    assert_eq!(redriven["paymentSessionId"], id.as_str());
    assert_eq!(redriven["attemptNumber"], 1);
    app.stop().await;
}
