//! The SQS server stopped for 60 seconds under load and started again: buyers' retries are
//! accepted all along (they only touch the database), the outbox holds every job, `/readyz`
//! reports the queue as unavailable, and once SQS is back the backlog drains with exactly
//! one checkout per accepted retry.
//!
//! It takes over a minute, so scripts/test.sh runs it on its own, after the parallel suite.

mod support;

use reqwest::Method;
use std::time::{Duration, Instant};
use support::app::{Options, TestApp};
use support::services::{MotoServer, unique_env};

const SESSIONS: usize = 20;
const OUTAGE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sqs_outage_of_a_minute_loses_nothing_and_the_backlog_drains() {
    // Arrange: payretry on its own SQS server, and buyers whose first payment failed.
    let mut moto = MotoServer::start();
    let env = unique_env();
    let client = payretry::queue::sqs::client(Some(&moto.endpoint)).await;
    payretry::queue::sqs::setup(&client, &env, 5).await.unwrap();
    let app = TestApp::spawn_with(Options {
        vars: vec![
            ("PAYRETRY_QUEUE", "sqs".into()),
            ("PAYRETRY_SQS_ENDPOINT", moto.endpoint.clone()),
            ("PAYRETRY_ENV", env.clone()),
            ("PAYRETRY_RETRY_DELAYS", "1s".into()),
            ("PAYRETRY_RATE_LIMIT_PER_MINUTE", "100000".into()),
        ],
        stripe: true,
        ..Options::default()
    })
    .await;
    let buyer = app.buyer();
    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        let id = app.create_checkout(&buyer).await["sessionId"]
            .as_str()
            .unwrap()
            .to_owned();
        app.decline(&id, 0, "insufficient_funds").await;
        ids.push(id);
    }

    // Act: SQS goes away; buyers keep retrying through the outage.
    moto.stop();
    let started = Instant::now();
    let pause = OUTAGE / SESSIONS as u32;
    for id in &ids {
        let accepted = app.retry(&buyer, id, &format!("outage-{id}")).await;
        assert_eq!(
            accepted.status(),
            202,
            "retries are accepted while SQS is down"
        );
        tokio::time::sleep(pause).await;
    }
    let ready = app.request(Method::GET, "/readyz", None, None, None).await;
    assert_eq!(
        ready.status(),
        503,
        "the queue is unreachable and /readyz says so"
    );
    let held = app.count("SELECT COUNT(*) FROM retry_jobs").await;
    assert_eq!(
        held, SESSIONS as i64,
        "every accepted retry waits in the outbox"
    );
    if let Some(left) = OUTAGE.checked_sub(started.elapsed()) {
        tokio::time::sleep(left).await;
    }
    moto.restart();
    payretry::queue::sqs::setup(&client, &env, 5).await.unwrap();

    // Assert: the backlog drains, each retry exactly once.
    let deadline = Instant::now() + Duration::from_secs(90);
    for id in &ids {
        loop {
            let status = app.status(&buyer, id).await;
            if status["status"] == "open" {
                assert_eq!(status["retryAttempts"], 1);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{id} never got its retry checkout: {status}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let stripe = app.stripe.as_ref().unwrap();
    for id in &ids {
        assert_eq!(
            stripe.create_count(id, 1),
            1,
            "exactly one retry checkout for {id}"
        );
    }
    assert!(stripe.violations().is_empty(), "{:?}", stripe.violations());
    // The relay deletes the rows SQS accepted just after the send: wait for it (bounded).
    assert_eq!(
        app.settled_count("SELECT COUNT(*) FROM retry_jobs", 0)
            .await,
        0,
        "the outbox drained"
    );
    assert_eq!(
        app.request(Method::GET, "/readyz", None, None, None)
            .await
            .status(),
        200
    );
}
