//! Scale-out with real processes (DESIGN.md §5, §7, §8; docs/SCALE.md): 2 `serve --role api`
//! and 3 `serve --role worker` processes of the real binary on one PostgreSQL database and
//! one SQS queue (moto), with the `stripe` provider pointed at one fake Stripe server in
//! this test process.
//!
//! 300 buyers each create a session, get declined, and retry 1 to 3 times (some also race a
//! second retry with another key, some replay their Idempotency-Key on the other API
//! process, some pay at the end). After about a third of the retries were accepted one
//! worker is SIGKILLed and restarted. At the end, counted at the fake Stripe server: every
//! accepted retry has exactly one checkout, no attempt that was never accepted has one, every
//! session reports as many retries as were accepted, and the outbox and queues are empty.
#![cfg(unix)]

mod support;

use payretry::http::auth::JwtKeys;
use payretry::secret::Secret;
use payretry_domain::Role;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::app::{WEBHOOK_SECRET, declined_event, paid_event};
use support::fake_stripe::{FakeStripe, TEST_SECRET_KEY};
use support::services::{TempDatabase, sqs_endpoint, unique_env};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

const SESSIONS: usize = 300;
/// Sessions in flight at once (moderate: the whole cluster shares 2 cores).
const IN_FLIGHT: usize = 32;
const API_PROCESSES: usize = 2;
const WORKER_PROCESSES: usize = 3;
const MAX_ATTEMPTS: u32 = 3;
const JWT_SECRET: &str = "scale-test-jwt-secret-with-more-than-32-characters";
/// From an accepted retry to its checkout. A job the killed worker held comes back after the
/// queue's visibility timeout (the worker's 60 s lease), so this leaves room for that.
const CHECKOUT_WAIT: Duration = Duration::from_secs(150);
/// The whole run, start-up to the last assertion.
const TEST_LIMIT: Duration = Duration::from_secs(480);
const DECLINE_REASONS: [&str; 4] = [
    "insufficient_funds",
    "card_declined",
    "expired_card",
    "do_not_honor",
];

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// One `payretry serve` child. Dropping it SIGKILLs and reaps the child (also on panic).
struct Proc {
    name: String,
    child: Child,
    base: String,
    log: PathBuf,
}

impl Proc {
    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    async fn wait_ready(&mut self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "{} exited during start-up ({status}); log:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            let ready = http
                .get(format!("{}/readyz", self.base))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK);
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never became ready within 60 s; log:\n{}",
                self.name,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every process of the deployment. Dropping it kills them all.
struct Cluster {
    dir: PathBuf,
    env: Vec<(String, String)>,
    apis: Vec<Proc>,
    workers: Vec<Proc>,
}

impl Cluster {
    /// The binary with exactly this test's environment: inherited payretry and Stripe
    /// settings are removed so the developer's shell cannot change the deployment.
    fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_payretry"));
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            if key.starts_with("PAYRETRY_") || key.starts_with("STRIPE_") || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        command
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null());
        command
    }

    /// `payretry sqs setup`, as an operator runs it.
    fn sqs_setup(&self) {
        let output = self
            .command()
            .args(["sqs", "setup"])
            .output()
            .expect("run payretry sqs setup");
        assert!(
            output.status.success(),
            "payretry sqs setup failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Starts `payretry serve --role {role}` on `port` (not yet ready).
    fn spawn(&self, name: &str, role: &str, port: u16) -> Proc {
        let log = self.dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = self
            .command()
            .args(["serve", "--role", role])
            .env("PAYRETRY_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        }
    }
}

/// The last `max` log lines (of every process) that contain `needle`, as evidence.
fn logs_mentioning(dir: &Path, needle: &str, max: usize) -> String {
    let mut found = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        found.extend(
            text.lines()
                .filter(|l| l.contains(needle))
                .map(|l| format!("[{name}] {l}")),
        );
    }
    let skip = found.len().saturating_sub(max);
    format!(
        "log lines mentioning {needle} (in {}):\n{}",
        dir.display(),
        found[skip..].join("\n")
    )
}

/// What one session does.
#[derive(Debug, Clone, Copy)]
struct Plan {
    retries: u32,
    pay_at_end: bool,
    /// Each retry is raced by a second request with another key on the other API process.
    race: bool,
    /// Each accepted retry is replayed with its key on the other API process.
    replay: bool,
}

impl Plan {
    fn of(i: usize) -> Self {
        Self {
            retries: 1 + (i % 3) as u32,
            pay_at_end: i % 4 == 1,
            race: i.is_multiple_of(5),
            replay: i % 7 == 3,
        }
    }
}

/// What one session ended with.
#[derive(Debug)]
struct SessionResult {
    index: usize,
    session: String,
    plan: Plan,
    /// Retries answered 202 (first answers only, replays excluded).
    accepted: u32,
    /// The provider checkout the status reported for attempt 0, 1, …, `accepted`.
    checkouts: Vec<String>,
    /// From each accepted retry to its open checkout.
    latencies: Vec<Duration>,
    final_status: Value,
}

struct Ctx {
    http: reqwest::Client,
    apis: Vec<String>,
    keys: JwtKeys,
    stripe: Arc<FakeStripe>,
    accepted: AtomicUsize,
    log_dir: PathBuf,
    database_url: String,
    sqs: aws_sdk_sqs::Client,
    queues: (String, String),
}

impl Ctx {
    fn api(&self, i: usize, k: usize) -> &str {
        &self.apis[(i + k) % self.apis.len()]
    }

    async fn status(&self, base: &str, token: &str, id: &str) -> Value {
        let response = self
            .http
            .get(format!("{base}/payments/checkout/{id}/status"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("status of {id} at {base}: {e}"));
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "status of {id} at {base}"
        );
        response.json().await.expect("status JSON")
    }

    async fn webhook(&self, base: &str, event: &Value) {
        let body = serde_json::to_vec(event).expect("event JSON");
        let signature = payretry::provider::signature::sign(
            &body,
            WEBHOOK_SECRET,
            chrono::Utc::now().timestamp(),
        );
        let response = self
            .http
            .post(format!("{base}/webhooks/stripe"))
            .header("Stripe-Signature", signature)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("webhook to {base}: {e}"));
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "webhook {} to {base}",
            event["type"]
        );
    }

    async fn retry(
        &self,
        base: &str,
        token: &str,
        id: &str,
        key: &str,
    ) -> (StatusCode, bool, bytes::Bytes) {
        let response = self
            .http
            .post(format!("{base}/payments/retry/{id}"))
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("retry of {id} at {base}: {e}"));
        let status = response.status();
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        (
            status,
            replayed,
            response.bytes().await.expect("retry body"),
        )
    }

    /// Where a stuck session's retry is: its rows, the database's busy connections, the
    /// queues, what the fake Stripe server saw, and the processes' log lines about it.
    async fn evidence(&self, id: &str) -> String {
        use sqlx::Connection;
        let mut out = String::new();
        match sqlx::PgConnection::connect(&self.database_url).await {
            Ok(mut conn) => {
                let queries = [
                    (
                        "session",
                        "SELECT to_jsonb(t)::text FROM payment_sessions t WHERE id = $1",
                    ),
                    (
                        "attempts",
                        "SELECT to_jsonb(t)::text FROM payment_attempts t WHERE session_id = $1 ORDER BY attempt_number",
                    ),
                    (
                        "outbox (retry_jobs)",
                        "SELECT to_jsonb(t)::text FROM retry_jobs t WHERE session_id = $1",
                    ),
                    (
                        "dead_letters",
                        "SELECT to_jsonb(t)::text FROM dead_letters t WHERE session_id = $1",
                    ),
                    (
                        "audit",
                        "SELECT to_jsonb(t)::text FROM audit_log t WHERE session_id = $1 ORDER BY id",
                    ),
                    (
                        "busy connections",
                        "SELECT to_jsonb(t)::text FROM (SELECT pid, state, wait_event_type, wait_event, \
                       (now() - xact_start)::text AS xact_age, left(query, 160) AS query FROM pg_stat_activity \
                       WHERE datname = current_database() AND state <> 'idle' AND pid <> pg_backend_pid() AND $1 <> '') t",
                    ),
                ];
                for (title, sql) in queries {
                    let rows = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql))
                        .bind(id)
                        .fetch_all(&mut conn)
                        .await
                        .unwrap_or_else(|e| vec![format!("(query failed: {e})")]);
                    out.push_str(&format!("{title}:\n  {}\n", rows.join("\n  ")));
                }
                let _ = conn.close().await;
            }
            Err(error) => out.push_str(&format!("database unreachable: {error}\n")),
        }
        for name in [&self.queues.0, &self.queues.1] {
            out.push_str(&format!(
                "{name}: {} message(s) visible + in flight + delayed\n",
                queue_depth(&self.sqs, name).await
            ));
        }
        let requests: Vec<String> = self
            .stripe
            .requests()
            .into_iter()
            .filter(|r| {
                r.body.contains(id) || r.idempotency_key.as_deref().is_some_and(|k| k.contains(id))
            })
            .map(|r| {
                format!(
                    "{} {} key={:?} body={}",
                    r.method, r.path, r.idempotency_key, r.body
                )
            })
            .collect();
        out.push_str(&format!(
            "fake Stripe requests for it:\n  {}\n",
            requests.join("\n  ")
        ));
        let violations: Vec<String> = self
            .stripe
            .violations()
            .into_iter()
            .filter(|v| v.contains(id))
            .collect();
        out.push_str(&format!(
            "fake Stripe violations for it:\n  {}\n",
            violations.join("\n  ")
        ));
        out.push_str(&logs_mentioning(&self.log_dir, id, 40));
        out
    }

    /// Polls until the session is open on the checkout of `attempt`.
    async fn wait_for_checkout(&self, base: &str, token: &str, id: &str, attempt: u32) -> Value {
        let deadline = Instant::now() + CHECKOUT_WAIT;
        loop {
            let status = self.status(base, token, id).await;
            if status["status"] == "open" && status["retryAttempts"] == attempt {
                return status;
            }
            let stuck = status["status"] != "retry_scheduled";
            if stuck || Instant::now() >= deadline {
                panic!(
                    "session {id}: accepted retry {attempt} never got its checkout within {} s \
                     (last status {status}); fake Stripe creates for this attempt: {}\n{}",
                    CHECKOUT_WAIT.as_secs(),
                    self.stripe.create_count(id, attempt),
                    self.evidence(id).await
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

async fn run_session(ctx: Arc<Ctx>, i: usize) -> SessionResult {
    let plan = Plan::of(i);
    let token = ctx
        .keys
        .issue(&format!("scale-buyer-{i:03}"), Role::Buyer, 3600);
    let created = ctx
        .http
        .post(format!("{}/payments/checkout", ctx.api(i, 0)))
        .bearer_auth(&token)
        .json(&json!({
            "amount": 1000 + i as i64,
            "currency": "usd",
            "description": format!("Scale order {i}"),
        }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("session {i}: create checkout: {e}"));
    assert_eq!(created.status(), StatusCode::CREATED, "session {i}: create");
    let created: Value = created.json().await.expect("status JSON");
    let id = created["sessionId"].as_str().expect("sessionId").to_owned();
    let mut checkouts = vec![
        created["providerSessionId"]
            .as_str()
            .expect("providerSessionId")
            .to_owned(),
    ];
    let mut latencies = Vec::new();
    let mut accepted = 0u32;

    for n in 1..=plan.retries {
        let reason = DECLINE_REASONS[(i + n as usize) % DECLINE_REASONS.len()];
        ctx.webhook(ctx.api(i, n as usize), &declined_event(&id, n - 1, reason))
            .await;
        let key = format!("scale-{i}-{n}");
        let primary = ctx.api(i, n as usize + 1);
        let (answers, replay_target) = if plan.race {
            let other = ctx.api(i, n as usize);
            let racer = format!("scale-{i}-{n}-racer");
            let (a, b) = tokio::join!(
                ctx.retry(primary, &token, &id, &key),
                ctx.retry(other, &token, &id, &racer)
            );
            (vec![(key.clone(), a), (racer, b)], other)
        } else {
            (
                vec![(key.clone(), ctx.retry(primary, &token, &id, &key).await)],
                ctx.api(i, n as usize),
            )
        };
        let requested_at = Instant::now();
        let mut winner = None;
        for (key, (status, replayed, body)) in answers {
            let text = String::from_utf8_lossy(&body).into_owned();
            match status {
                StatusCode::ACCEPTED => {
                    assert!(
                        !replayed,
                        "session {id}: first use of key {key} was a replay"
                    );
                    assert!(
                        winner.is_none(),
                        "BUG: session {id}: two concurrent retries for attempt {n} were both \
                         accepted (the compare-and-set let both through): {text}\n{}",
                        logs_mentioning(&ctx.log_dir, &id, 40)
                    );
                    winner = Some((key, body));
                }
                StatusCode::CONFLICT
                    if text.contains("retry_already_scheduled")
                        || text.contains("payment_not_failed") =>
                {
                    assert!(plan.race, "session {id}: retry {n} refused: {text}");
                }
                other => panic!(
                    "session {id}: retry {n} with key {key} answered {other}: {text}\n{}",
                    logs_mentioning(&ctx.log_dir, &id, 20)
                ),
            }
        }
        let (key, body) = winner.unwrap_or_else(|| {
            panic!("session {id}: no retry for attempt {n} was accepted (status was failed)")
        });
        let accepted_body: Value = serde_json::from_slice(&body).expect("retry JSON");
        assert_eq!(
            accepted_body["attemptNumber"], n,
            "session {id}: {accepted_body}"
        );
        accepted += 1;
        ctx.accepted.fetch_add(1, Ordering::SeqCst);

        if plan.replay {
            let (status, replayed, again) = ctx.retry(replay_target, &token, &id, &key).await;
            assert_eq!(
                status,
                StatusCode::ACCEPTED,
                "session {id}: replay of {key}"
            );
            assert!(
                replayed,
                "session {id}: replay of {key} not marked replayed"
            );
            assert_eq!(again, body, "session {id}: replay of {key} differs");
        }

        let open = ctx
            .wait_for_checkout(ctx.api(i, n as usize + 2), &token, &id, n)
            .await;
        latencies.push(requested_at.elapsed());
        let checkout = open["providerSessionId"]
            .as_str()
            .expect("providerSessionId")
            .to_owned();
        assert!(
            !checkouts.contains(&checkout),
            "session {id}: attempt {n} reuses checkout {checkout}"
        );
        checkouts.push(checkout);
    }

    let last = accepted;
    let end = ctx.api(i, 1);
    let wanted = if plan.pay_at_end {
        let checkout = checkouts[last as usize].clone();
        ctx.stripe.mark_paid(&checkout);
        ctx.webhook(end, &paid_event(&id, last, &checkout)).await;
        "succeeded"
    } else {
        ctx.webhook(end, &declined_event(&id, last, "insufficient_funds"))
            .await;
        "failed"
    };
    let final_status = ctx.status(ctx.api(i, 0), &token, &id).await;
    assert_eq!(
        final_status["status"], wanted,
        "session {id}: final status {final_status}"
    );
    SessionResult {
        index: i,
        session: id,
        plan,
        accepted,
        checkouts,
        latencies,
        final_status,
    }
}

async fn count(db: &TempDatabase, sql: &'static str) -> i64 {
    db.count(sql).await
}

/// Visible + in flight + delayed messages of one queue.
async fn queue_depth(client: &aws_sdk_sqs::Client, name: &str) -> i64 {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let url = client
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .unwrap_or_else(|e| panic!("queue {name}: {e:?}"))
        .queue_url
        .expect("queue URL");
    let attributes = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(A::ApproximateNumberOfMessages)
        .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(A::ApproximateNumberOfMessagesDelayed)
        .send()
        .await
        .unwrap_or_else(|e| panic!("attributes of {name}: {e:?}"))
        .attributes
        .unwrap_or_default();
    [
        A::ApproximateNumberOfMessages,
        A::ApproximateNumberOfMessagesNotVisible,
        A::ApproximateNumberOfMessagesDelayed,
    ]
    .iter()
    .map(|a| {
        attributes
            .get(a)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    })
    .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_api_and_three_worker_processes_create_exactly_one_checkout_per_accepted_retry() {
    match tokio::time::timeout(TEST_LIMIT, scale_run()).await {
        Ok(()) => {}
        Err(_) => panic!(
            "the scale test did not finish within {} s (see the process logs printed above)",
            TEST_LIMIT.as_secs()
        ),
    }
}

async fn scale_run() {
    let started = Instant::now();
    let endpoint = sqs_endpoint();
    let env = unique_env();
    let db = TempDatabase::postgres().await;
    let stripe = Arc::new(FakeStripe::start().await);
    let dir = std::env::temp_dir().join(format!("payretry-scale-{env}"));
    std::fs::create_dir_all(&dir).expect("log directory");
    // Kept after a failure, or always with PAYRETRY_TEST_KEEP_LOGS set.
    println!("scale: process logs in {}", dir.display());

    let api_ports: Vec<u16> = (0..API_PROCESSES).map(|_| free_port()).collect();
    let vars: Vec<(&str, String)> = vec![
        ("PAYRETRY_DATABASE_URL", db.url.clone()),
        // One public address for every process, as behind a load balancer (docs/SCALE.md):
        // the checkout's return URLs are part of the Stripe create request, which must be
        // the same whichever worker (re)sends it.
        (
            "PAYRETRY_PUBLIC_URL",
            format!("http://127.0.0.1:{}", api_ports[0]),
        ),
        ("PAYRETRY_QUEUE", "sqs".to_owned()),
        ("PAYRETRY_SQS_ENDPOINT", endpoint.clone()),
        ("PAYRETRY_ENV", env.clone()),
        ("PAYRETRY_MAX_RECEIVES", "5".to_owned()),
        ("PAYRETRY_PROVIDER", "stripe".to_owned()),
        ("STRIPE_API_BASE", stripe.base_url().to_owned()),
        ("STRIPE_SECRET_KEY", TEST_SECRET_KEY.to_owned()),
        ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
        ("PAYRETRY_JWT_SECRET", JWT_SECRET.to_owned()),
        ("PAYRETRY_RETRY_DELAYS", "1s,1s,1s".to_owned()),
        ("PAYRETRY_MAX_ATTEMPTS", MAX_ATTEMPTS.to_string()),
        ("PAYRETRY_RATE_LIMIT_PER_MINUTE", "100000".to_owned()),
        ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ];
    let mut cluster = Cluster {
        dir: dir.clone(),
        env: vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        apis: Vec::new(),
        workers: Vec::new(),
    };
    cluster.sqs_setup();

    // All five start at once on the empty database (migrations race, as in a deploy).
    for (n, port) in api_ports.iter().enumerate() {
        let api = cluster.spawn(&format!("api-{n}"), "api", *port);
        cluster.apis.push(api);
    }
    for n in 0..WORKER_PROCESSES {
        let worker = cluster.spawn(&format!("worker-{n}"), "worker", free_port());
        cluster.workers.push(worker);
    }
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()
        .expect("HTTP client");
    for process in cluster.apis.iter_mut().chain(cluster.workers.iter_mut()) {
        process.wait_ready(&http).await;
    }
    let startup = started.elapsed();

    let ctx = Arc::new(Ctx {
        http,
        apis: cluster.apis.iter().map(|p| p.base.clone()).collect(),
        keys: JwtKeys::new(&Secret::new(JWT_SECRET)),
        stripe: stripe.clone(),
        accepted: AtomicUsize::new(0),
        log_dir: dir.clone(),
        database_url: db.url.clone(),
        sqs: payretry::queue::sqs::client(Some(&endpoint)).await,
        queues: payretry::queue::sqs::queue_names(&env),
    });
    let planned: usize = (0..SESSIONS).map(|i| Plan::of(i).retries as usize).sum();
    let kill_after = planned / 3;

    let load_started = Instant::now();
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut sessions = JoinSet::new();
    for i in 0..SESSIONS {
        let (ctx, gate) = (ctx.clone(), gate.clone());
        sessions.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            run_session(ctx, i).await
        });
    }
    let mut results = Vec::with_capacity(SESSIONS);
    let mut settle = |joined: Result<SessionResult, tokio::task::JoinError>| match joined {
        Ok(result) => results.push(result),
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => panic!("a session task failed: {error}"),
    };

    // Partway through: SIGKILL a worker, then start it again.
    while ctx.accepted.load(Ordering::SeqCst) < kill_after {
        while let Some(joined) = sessions.try_join_next() {
            settle(joined);
        }
        assert!(
            !sessions.is_empty(),
            "every session finished before {kill_after} retries were accepted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let accepted_at_kill = ctx.accepted.load(Ordering::SeqCst);
    let victim = &mut cluster.workers[0];
    victim.child.kill().expect("SIGKILL worker-0");
    let killed = victim.child.wait().expect("reap worker-0");
    assert_eq!(killed.signal(), Some(9), "worker-0 died of SIGKILL");
    let killed_at = load_started.elapsed();
    println!(
        "scale: SIGKILLed worker-0 after {accepted_at_kill} accepted retries ({:.1} s into the load)",
        killed_at.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut restarted = cluster.spawn("worker-0-restarted", "worker", free_port());
    restarted.wait_ready(&ctx.http).await;
    let old = std::mem::replace(&mut cluster.workers[0], restarted);
    drop(old);
    println!("scale: worker-0 restarted");

    while let Some(joined) = sessions.join_next().await {
        settle(joined);
    }
    let load = load_started.elapsed();
    results.sort_by_key(|r| r.index);

    // ---- Counted at the fake Stripe server --------------------------------------------
    let violations = stripe.violations();
    assert!(
        violations.is_empty(),
        "fake Stripe saw contract violations: {violations:#?}"
    );
    let all_checkouts = stripe.checkouts();
    let mut by_attempt: HashMap<(String, u32), Vec<String>> = HashMap::new();
    for checkout in &all_checkouts {
        by_attempt
            .entry((checkout.payment_session_id.clone(), checkout.retry_attempt))
            .or_default()
            .push(checkout.id.clone());
    }
    let mut problems = Vec::new();
    for r in &results {
        for n in 0..=MAX_ATTEMPTS + 1 {
            let created = stripe.create_count(&r.session, n);
            let wanted = usize::from(n <= r.accepted);
            if created != wanted {
                problems.push(format!(
                    "session {} (#{}, plan {:?}): attempt {n} has {created} checkout(s), \
                     expected {wanted} ({} accepted); ids {:?}",
                    r.session,
                    r.index,
                    r.plan,
                    r.accepted,
                    by_attempt.get(&(r.session.clone(), n))
                ));
            }
            if let (Some(seen), Some([only])) = (
                r.checkouts.get(n as usize),
                by_attempt.get(&(r.session.clone(), n)).map(Vec::as_slice),
            ) && seen != only
            {
                problems.push(format!(
                    "session {}: attempt {n} reported checkout {seen}, fake Stripe created {only}",
                    r.session
                ));
            }
        }
        if r.final_status["retryAttempts"] != r.accepted {
            problems.push(format!(
                "session {}: retryAttempts {} but {} retries were accepted: {}",
                r.session, r.final_status["retryAttempts"], r.accepted, r.final_status
            ));
        }
    }
    if !problems.is_empty() {
        let first = &problems[0];
        let session = first.split_whitespace().nth(1).unwrap_or_default();
        panic!(
            "{} problem(s):\n{}\n{}",
            problems.len(),
            problems.join("\n"),
            ctx.evidence(session).await
        );
    }
    let accepted_total: u32 = results.iter().map(|r| r.accepted).sum();
    assert_eq!(
        all_checkouts.len(),
        SESSIONS + accepted_total as usize,
        "one checkout per session plus one per accepted retry"
    );

    // ---- Nothing left behind ----------------------------------------------------------
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let outbox = count(&db, "SELECT count(*) FROM retry_jobs").await;
        if outbox == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the retry_jobs outbox still holds {outbox} row(s) 30 s after the last checkout"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM dead_letters").await,
        0,
        "no retry job was dead-lettered"
    );
    let redelivered = count(
        &db,
        "SELECT count(*) FROM audit_log WHERE action = 'retry_initiated' \
         AND details::jsonb ->> 'receiveCount' <> '1'",
    )
    .await;
    // The delay is the minimum wait from the click to the new checkout (DESIGN.md §1).
    let early = count(
        &db,
        "SELECT count(*) FROM audit_log r JOIN audit_log i \
         ON i.session_id = r.session_id AND i.attempt_number = r.attempt_number \
         WHERE r.action = 'retry_requested' AND i.action = 'retry_initiated' \
         AND i.at - r.at < 1000",
    )
    .await;
    let shortest_ms = count(
        &db,
        "SELECT COALESCE(min(i.at - r.at), 0) FROM audit_log r JOIN audit_log i \
         ON i.session_id = r.session_id AND i.attempt_number = r.attempt_number \
         WHERE r.action = 'retry_requested' AND i.action = 'retry_initiated'",
    )
    .await;
    let sqs = payretry::queue::sqs::client(Some(&endpoint)).await;
    let (main_queue, dead_queue) = payretry::queue::sqs::queue_names(&env);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let depth = queue_depth(&sqs, &main_queue).await;
        if depth == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{main_queue} still holds {depth} message(s) 90 s after the last checkout"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        queue_depth(&sqs, &dead_queue).await,
        0,
        "{dead_queue} is empty"
    );

    let mut latencies: Vec<Duration> = results
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    latencies.sort();
    let paid = results.iter().filter(|r| r.plan.pay_at_end).count();
    let raced = results.iter().filter(|r| r.plan.race).count();
    let replayed = results.iter().filter(|r| r.plan.replay).count();
    let total = started.elapsed();
    println!(
        "scale: {API_PROCESSES} api + {WORKER_PROCESSES} worker processes, PostgreSQL + SQS (moto), \
         {IN_FLIGHT} sessions in flight"
    );
    println!(
        "scale: sessions {SESSIONS}, accepted retries {accepted_total}, checkouts {} \
         ({SESSIONS} first + {accepted_total} retries), paid at the end {paid}, raced {raced}, \
         replayed {replayed}",
        all_checkouts.len()
    );
    println!(
        "scale: worker-0 SIGKILLed at {accepted_at_kill} accepted retries and restarted; \
         checkouts created on a redelivery: {redelivered}; Stripe create requests {} for {} \
         checkouts",
        stripe.create_requests(),
        all_checkouts.len()
    );
    println!(
        "scale: retry accepted -> checkout open: min {:.2} s, p50 {:.2} s, p95 {:.2} s, max {:.2} s",
        percentile(&latencies, 0.0).as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64(),
        percentile(&latencies, 0.95).as_secs_f64(),
        percentile(&latencies, 1.0).as_secs_f64()
    );
    println!(
        "scale: checkouts created less than the 1 s delay after the accepted click: {early} \
         (shortest {shortest_ms} ms)"
    );
    println!(
        "scale: time: start-up {:.1} s, load {:.1} s, total {:.1} s",
        startup.as_secs_f64(),
        load.as_secs_f64(),
        total.as_secs_f64()
    );
    drop(cluster);
    if std::env::var_os("PAYRETRY_TEST_KEEP_LOGS").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
