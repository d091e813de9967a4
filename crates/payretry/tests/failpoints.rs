//! Crash points (feature `failpoints`): the real binary is killed at the moments where a
//! crash could lose or duplicate work, then restarted on the same database. After each
//! crash: no retry lost, no second checkout for an attempt, no event lost (duplicates only
//! where the receiver deduplicates by id).
//!
//! Run with `cargo test -p payretry --features failpoints --test failpoints`
//! (scripts/test.sh does).
#![cfg(all(unix, feature = "failpoints"))]

mod support;

use payretry::http::auth::JwtKeys;
use payretry::secret::Secret;
use payretry_domain::Role;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::Duration;
use support::app::{declined_event, paid_event, paid_event_with_intent};
use support::fake_segment::FakeSegment;
use support::fake_stripe::{FakeStripe, TEST_SECRET_KEY};
use support::merchant_receiver::{
    MerchantReceiver, distinct_accepted, verify_with_reference_library,
};
use support::process::ServeProcess;
use support::services;

const JWT_SECRET: &str = "failpoint-test-jwt-secret-with-more-than-32-chars";
const WEBHOOK_SECRET: &str = "whsec_failpoints";

/// One scenario: a database, the fake Stripe, and the environment every process shares.
struct Scenario {
    dir: tempfile::TempDir,
    db: PathBuf,
    stripe: FakeStripe,
    env: Vec<(String, String)>,
    http: reqwest::Client,
    jwt: JwtKeys,
}

impl Scenario {
    async fn new(extra: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("p.db");
        let stripe = FakeStripe::start().await;
        let mut env: Vec<(String, String)> = [
            (
                "PAYRETRY_DATABASE_URL",
                format!("sqlite://{}", db.display()),
            ),
            ("PAYRETRY_PROVIDER", "stripe".to_owned()),
            ("STRIPE_API_BASE", stripe.base_url().to_owned()),
            ("STRIPE_SECRET_KEY", TEST_SECRET_KEY.to_owned()),
            ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
            ("PAYRETRY_JWT_SECRET", JWT_SECRET.to_owned()),
            ("PAYRETRY_RETRY_DELAYS", "1s".to_owned()),
            ("PAYRETRY_JOB_LEASE", "2s".to_owned()),
            // The restarted process listens elsewhere; like a deployment behind a load
            // balancer, both give Stripe the same return links.
            ("PAYRETRY_PUBLIC_URL", "https://pay.example.test".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        Self {
            dir,
            db,
            stripe,
            env,
            http: reqwest::Client::new(),
            jwt: JwtKeys::new(&Secret::new(JWT_SECRET)),
        }
    }

    /// Starts a process; `crash_at` arms one crash point.
    async fn start(&self, name: &str, crash_at: Option<&str>) -> ServeProcess {
        self.start_as(name, crash_at, "all").await
    }

    /// Starts a process in `role` (`all`, `api`, `worker`); `crash_at` arms one crash point.
    async fn start_as(&self, name: &str, crash_at: Option<&str>, role: &str) -> ServeProcess {
        let mut env = self.env.clone();
        if let Some(point) = crash_at {
            env.push(("FAILPOINTS".to_owned(), format!("{point}=return")));
        }
        let mut process = ServeProcess::spawn(
            env!("CARGO_BIN_EXE_payretry"),
            &["serve", "--role", role],
            &env,
            self.dir.path(),
            name,
        );
        process.wait_ready().await;
        process
    }

    fn buyer(&self) -> String {
        self.jwt.issue("buyer-1", Role::Buyer, 600)
    }

    fn admin(&self) -> String {
        self.jwt.issue("admin-1", Role::Admin, 600)
    }

    async fn create(&self, p: &ServeProcess) -> String {
        let r = self
            .http
            .post(format!("{}/payments/checkout", p.base))
            .bearer_auth(self.buyer())
            .json(&json!({"amount": 2500, "currency": "usd", "description": "Order 123"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        r.json::<Value>().await.unwrap()["sessionId"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn event(
        &self,
        p: &ServeProcess,
        event: &Value,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let body = serde_json::to_vec(event).unwrap();
        let signature = payretry::provider::signature::sign(
            &body,
            WEBHOOK_SECRET,
            chrono::Utc::now().timestamp(),
        );
        self.http
            .post(format!("{}/webhooks/stripe", p.base))
            .header("Stripe-Signature", signature)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
    }

    async fn retry(&self, p: &ServeProcess, id: &str) {
        let r = self.try_retry(p, id).await.unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }

    /// A retry of `id` under its one key; an error when the process gave no answer.
    async fn try_retry(
        &self,
        p: &ServeProcess,
        id: &str,
    ) -> Result<reqwest::Response, reqwest::Error> {
        self.http
            .post(format!("{}/payments/retry/{id}", p.base))
            .bearer_auth(self.buyer())
            .header("Idempotency-Key", format!("retry-{id}"))
            .send()
            .await
    }

    async fn status(&self, p: &ServeProcess, id: &str) -> Value {
        let url = format!("{}/payments/checkout/{id}/status", p.base);
        self.http
            .get(url)
            .bearer_auth(self.admin())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn wait_for(&self, p: &ServeProcess, id: &str, wanted: &str) -> Value {
        let mut last = Value::Null;
        for _ in 0..300 {
            last = self.status(p, id).await;
            if last["status"] == wanted {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{id} never became {wanted}: {last}\n{}", p.log_text());
    }

    async fn audit(&self, p: &ServeProcess, id: &str) -> Vec<String> {
        let url = format!("{}/payments/checkout/{id}/audit", p.base);
        let body: Value = self
            .http
            .get(url)
            .bearer_auth(self.admin())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap().to_owned())
            .collect()
    }

    async fn count(&self, sql: &'static str) -> i64 {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", self.db.display()))
            .await
            .unwrap();
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&mut conn)
            .await
            .unwrap()
    }
}

async fn assert_crashed(process: &mut ServeProcess, point: &str) {
    let status = process.wait_exit(Duration::from_secs(15)).await;
    let status = status.unwrap_or_else(|| {
        panic!(
            "the process did not crash at {point}; log:\n{}",
            process.log_text()
        )
    });
    assert_eq!(
        status.signal(),
        Some(6),
        "aborted at {point} (SIGABRT), got {status}"
    );
}

fn count_of(actions: &[String], action: &str) -> usize {
    actions.iter().filter(|a| *a == action).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_creating_the_checkout_and_recording_it_creates_no_second_checkout() {
    let s = Scenario::new(&[]).await;
    let mut first = s
        .start("first", Some("worker-after-checkout-created"))
        .await;
    let id = s.create(&first).await;
    s.event(&first, &declined_event(&id, 0, "insufficient_funds"))
        .await
        .unwrap();
    s.retry(&first, &id).await;

    assert_crashed(&mut first, "worker-after-checkout-created").await;
    assert_eq!(
        s.stripe.create_count(&id, 1),
        1,
        "the provider made the checkout before the crash"
    );

    let second = s.start("second", None).await;
    let open = s.wait_for(&second, &id, "open").await;

    assert_eq!(
        s.stripe.create_count(&id, 1),
        1,
        "the redelivered job got the same checkout back"
    );
    let checkout = s
        .stripe
        .checkouts()
        .into_iter()
        .find(|c| c.retry_attempt == 1)
        .expect("attempt 1 checkout");
    assert_eq!(open["providerSessionId"], checkout.id.as_str());
    assert_eq!(open["retryAttempts"], 1);
    let audit = s.audit(&second, &id).await;
    assert_eq!(count_of(&audit, "retry_initiated"), 1, "{audit:?}");
    assert!(
        s.stripe.violations().is_empty(),
        "{:?}",
        s.stripe.violations()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_retry_commits_before_the_relay_sends_loses_nothing() {
    let endpoint = services::sqs_endpoint();
    let env = services::unique_env();
    let client = payretry::queue::sqs::client(Some(&endpoint)).await;
    payretry::queue::sqs::setup(&client, &env, 5).await.unwrap();
    let s = Scenario::new(&[
        ("PAYRETRY_QUEUE", "sqs".to_owned()),
        ("PAYRETRY_SQS_ENDPOINT", endpoint),
        ("PAYRETRY_ENV", env),
    ])
    .await;
    let mut first = s.start("first", Some("relay-before-send")).await;
    let id = s.create(&first).await;
    s.event(&first, &declined_event(&id, 0, "insufficient_funds"))
        .await
        .unwrap();
    s.retry(&first, &id).await;

    assert_crashed(&mut first, "relay-before-send").await;
    assert_eq!(
        s.count("SELECT COUNT(*) FROM retry_jobs").await,
        1,
        "the job waits in the outbox"
    );

    let second = s.start("second", None).await;
    s.wait_for(&second, &id, "open").await;

    assert_eq!(s.stripe.create_count(&id, 1), 1);
    assert_eq!(count_of(&s.audit(&second, &id).await, "retry_initiated"), 1);
    for _ in 0..100 {
        if s.count("SELECT COUNT(*) FROM retry_jobs").await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the outbox row was never deleted after SQS accepted it");
}

/// The provider resends an event it got no 2xx for; both crash points must end with the
/// event applied exactly once.
async fn crash_in_webhook(point: &str) {
    let s = Scenario::new(&[]).await;
    let mut first = s.start("first", Some(point)).await;
    let id = s.create(&first).await;
    let decline = declined_event(&id, 0, "insufficient_funds");

    let answer = s.event(&first, &decline).await;
    assert!(answer.is_err(), "no answer: the process died mid-request");
    assert_crashed(&mut first, point).await;

    let second = s.start("second", None).await;
    let resent = s.event(&second, &decline).await.unwrap();
    assert_eq!(resent.status(), StatusCode::OK);
    let failed = s.status(&second, &id).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["failureReason"], "insufficient_funds");
    let audit = s.audit(&second, &id).await;
    assert_eq!(count_of(&audit, "payment_failed"), 1, "{audit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_a_webhook_is_applied_loses_nothing() {
    crash_in_webhook("webhook-before-apply").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_webhook_is_applied_applies_it_once() {
    crash_in_webhook("webhook-after-apply").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_segment_accepted_a_batch_resends_only_the_same_message_ids() {
    let segment = FakeSegment::start().await;
    let s = Scenario::new(&[
        ("PAYRETRY_SEGMENT_WRITE_KEY", "write-key".to_owned()),
        ("PAYRETRY_SEGMENT_ENDPOINT", segment.base_url.clone()),
    ])
    .await;
    let mut first = s.start("first", Some("segment-after-send")).await;
    let id = s.create(&first).await;
    s.event(&first, &declined_event(&id, 0, "insufficient_funds"))
        .await
        .unwrap();
    s.retry(&first, &id).await;
    assert_crashed(&mut first, "segment-after-send").await;
    let before_restart: HashSet<String> = message_ids(&segment);
    assert!(
        !before_restart.is_empty(),
        "Segment accepted a batch before the crash"
    );

    let second = s.start("second", None).await;
    let open = s.wait_for(&second, &id, "open").await;
    s.event(
        &second,
        &paid_event(&id, 1, open["providerSessionId"].as_str().unwrap()),
    )
    .await
    .unwrap();

    let expected: HashSet<String> = ["scheduled", "initiated", "completed"]
        .iter()
        .map(|e| format!("payretry-{id}-1-{e}"))
        .collect();
    for _ in 0..200 {
        if expected.is_subset(&message_ids(&segment)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received = message_ids(&segment);
    assert_eq!(received, expected, "every event delivered, none invented");
    let mut copies: HashMap<String, usize> = HashMap::new();
    for event in segment.accepted_events() {
        *copies
            .entry(event["messageId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert!(
        copies.values().any(|n| *n == 2),
        "the batch in flight at the crash was sent again: {copies:?}"
    );
    assert!(copies.values().all(|n| *n <= 2), "{copies:?}");
    // Segment answers before the relay deletes the rows it sent, so the outbox
    // empties a moment after the last batch arrives.
    let mut pending = s.count("SELECT COUNT(*) FROM analytics_events").await;
    for _ in 0..100 {
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        pending = s.count("SELECT COUNT(*) FROM analytics_events").await;
    }
    assert_eq!(pending, 0, "every sent event leaves the analytics outbox");
}

fn message_ids(segment: &FakeSegment) -> HashSet<String> {
    segment
        .accepted_events()
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_detecting_a_double_payment_and_refunding_it_refunds_once_after_restart() {
    let s = Scenario::new(&[("PAYRETRY_AUTO_REFUND_DUPLICATES", "true".to_owned())]).await;
    let mut first = s.start("first", Some("refund-before-claim")).await;
    let id = s.create(&first).await;
    let late_checkout = s.status(&first, &id).await["providerSessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    s.event(&first, &declined_event(&id, 0, "insufficient_funds"))
        .await
        .unwrap();
    s.retry(&first, &id).await;
    let open = s.wait_for(&first, &id, "open").await;
    let paid_checkout = open["providerSessionId"].as_str().unwrap().to_owned();
    let paid_intent = s.stripe.mark_paid(&paid_checkout);
    s.event(
        &first,
        &paid_event_with_intent(&id, 1, &paid_checkout, &paid_intent),
    )
    .await
    .unwrap();
    s.wait_for(&first, &id, "succeeded").await;
    let late_intent = s.stripe.mark_paid(&late_checkout);
    // The detecting commit wakes the refund runner, which dies before its call (the answer
    // to this webhook may or may not have been written by then).
    let _ = s
        .event(
            &first,
            &paid_event_with_intent(&id, 0, &late_checkout, &late_intent),
        )
        .await;

    assert_crashed(&mut first, "refund-before-claim").await;
    assert_eq!(s.stripe.refund_requests(), 0);
    assert_eq!(
        s.count("SELECT COUNT(*) FROM duplicate_payments WHERE status = 'refund_requested'")
            .await,
        1,
        "the owed refund is durable"
    );

    let second = s.start("second", None).await;
    for _ in 0..200 {
        let refunded = s
            .count("SELECT COUNT(*) FROM duplicate_payments WHERE status = 'refunded'")
            .await;
        if refunded == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let refunds = s.stripe.refunds();
    assert_eq!(refunds.len(), 1, "{refunds:?}\n{}", second.log_text());
    assert_eq!(refunds[0].payment_intent, late_intent);
    assert_eq!(s.stripe.refund_requests(), 1);
    let audit = s.audit(&second, &id).await;
    assert_eq!(count_of(&audit, "double_payment_detected"), 1, "{audit:?}");
    assert_eq!(count_of(&audit, "duplicate_refunded"), 1, "{audit:?}");
    assert!(
        s.stripe.violations().is_empty(),
        "{:?}",
        s.stripe.violations()
    );
}

/// Retries of several sessions arrive together, so SQLite's writer commits them as one
/// group, and the process dies at `point` inside that commit. A caller is answered only after
/// the commit holding its transition is durable, so: every retry answered 202 before the
/// crash is on disk; every retry the crash left unanswered is either wholly on disk or not at
/// all, and asking again with its key finishes it exactly once.
async fn crash_in_group_commit(point: &str) {
    const SESSIONS: usize = 12;
    let s = Scenario::new(&[]).await;
    // The API alone: no worker or sweeper commits beside the requests. The writer waits
    // 20 ms before it takes what is queued, so that retries sent together share a commit.
    let armed = format!("sqlite-group-commit-gather=sleep(20);{point}");
    let mut first = s.start_as("first", Some(&armed), "api").await;
    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        let id = s.create(&first).await;
        let declined = s
            .event(&first, &declined_event(&id, 0, "insufficient_funds"))
            .await
            .unwrap();
        assert_eq!(declined.status(), StatusCode::OK);
        ids.push(id);
    }

    let answers = futures::future::join_all(ids.iter().map(|id| s.try_retry(&first, id))).await;
    assert_crashed(&mut first, point).await;
    let accepted: Vec<bool> = answers
        .iter()
        .map(|answer| match answer {
            Ok(r) => {
                assert_eq!(r.status(), StatusCode::ACCEPTED, "the only answer is 202");
                true
            }
            Err(_) => false,
        })
        .collect();
    let unanswered = accepted.iter().filter(|a| !**a).count();
    assert!(
        unanswered >= 2,
        "the crash came inside a commit of several callers, none of them answered"
    );

    let second = s.start_as("second", None, "api").await;
    for (id, was_accepted) in ids.iter().zip(&accepted) {
        let status = s.status(&second, id).await;
        if *was_accepted {
            assert_eq!(
                status["status"], "retry_scheduled",
                "an accepted retry is kept"
            );
        } else {
            let found = status["status"].as_str().unwrap().to_owned();
            assert!(
                found == "failed" || found == "retry_scheduled",
                "all of it or none of it: {status}"
            );
        }
        let again = s.try_retry(&second, id).await.unwrap();
        assert_eq!(again.status(), StatusCode::ACCEPTED);
        assert_eq!(s.status(&second, id).await["status"], "retry_scheduled");
        let audit = s.audit(&second, id).await;
        assert_eq!(count_of(&audit, "retry_requested"), 1, "{id}: {audit:?}");
    }
    assert_eq!(
        s.count("SELECT COUNT(*) FROM retry_jobs").await,
        i64::try_from(SESSIONS).unwrap(),
        "one job per session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_inside_a_group_commit_answers_no_caller_and_loses_none() {
    crash_in_group_commit("sqlite-group-commit-before-commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_group_commit_before_its_answers_loses_none_and_repeats_none() {
    crash_in_group_commit("sqlite-group-commit-after-commit").await;
}

/// A scenario whose merchant events go to `receiver`, each try given 1 s (so a lease left by
/// a crashed relay runs out 7 s later).
async fn merchant_scenario(receiver: &MerchantReceiver) -> Scenario {
    Scenario::new(&[
        ("PAYRETRY_MERCHANT_WEBHOOK_URL", receiver.url.clone()),
        ("PAYRETRY_MERCHANT_WEBHOOK_SECRET", merchant_secret()),
        ("PAYRETRY_MERCHANT_WEBHOOK_TIMEOUT", "1s".to_owned()),
        ("PAYRETRY_MERCHANT_WEBHOOK_RETRY_DELAYS", "1s".to_owned()),
    ])
    .await
}

fn merchant_secret() -> String {
    payretry::merchant_events::signature::SigningKey::encode(&[42; 32])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_a_state_change_and_its_merchant_event_loses_no_event() {
    let receiver = MerchantReceiver::start().await;
    let s = merchant_scenario(&receiver).await;
    let mut first = s.start("first", Some("webhook-before-send")).await;
    let id = s.create(&first).await;
    s.event(&first, &declined_event(&id, 0, "insufficient_funds"))
        .await
        .unwrap();
    assert_crashed(&mut first, "webhook-before-send").await;
    assert!(receiver.received().is_empty(), "nothing was sent");

    let second = s.start("second", None).await;
    let received = receiver.wait_for_accepted(1, Duration::from_secs(30)).await;
    assert_eq!(received.len(), 1, "delivered once, after the lease ran out");
    assert_eq!(received[0].id, format!("msg_{id}_1"));
    let bodies = verify_with_reference_library(&received, &[&merchant_secret()]);
    assert_eq!(bodies[0]["type"], "payment_session.failed");
    assert_eq!(bodies[0]["data"]["sessionId"], id.as_str());
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_receiver_accepted_repeats_only_that_event_under_its_id() {
    let receiver = MerchantReceiver::start().await;
    let s = merchant_scenario(&receiver).await;
    let mut first = s.start("first", Some("webhook-after-delivered")).await;
    let id = s.create(&first).await;
    s.event(&first, &declined_event(&id, 0, "insufficient_funds"))
        .await
        .unwrap();
    assert_crashed(&mut first, "webhook-after-delivered").await;
    assert_eq!(receiver.received().len(), 1, "accepted before the crash");

    let second = s.start("second", None).await;
    s.retry(&second, &id).await;
    s.wait_for(&second, &id, "open").await;
    let received = receiver
        .wait_until(
            "the repeat and the retry's events",
            Duration::from_secs(30),
            |r| distinct_accepted(r) == 3 && r.len() >= 4,
        )
        .await;
    verify_with_reference_library(&received, &[&merchant_secret()]);
    let mut copies: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for r in &received {
        copies.entry(r.id.clone()).or_default().push(r.body.clone());
    }
    let repeated = &copies[&format!("msg_{id}_1")];
    assert_eq!(repeated.len(), 2, "the event in flight at the crash, again");
    assert_eq!(repeated[0], repeated[1], "with the same body");
    for n in [2, 3] {
        assert_eq!(copies[&format!("msg_{id}_{n}")].len(), 1, "{copies:?}");
    }
    assert_eq!(copies.len(), 3);
}
