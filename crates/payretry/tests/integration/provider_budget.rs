//! The provider budget (DESIGN.md §4) through the real server and a fake Stripe that is slow
//! and refuses requests past its rate limit with 429, as Stripe does: payretry paces its
//! calls, a 429 slows it down, and a job the limit refused is postponed without counting as
//! a failed delivery: it is never dead-lettered for it, and no buyer's attempt is spent on it.

use crate::support::app::{Options, TestApp, with_action};
use std::time::Duration;

const SESSIONS: usize = 6;

async fn app(vars: Vec<(&'static str, String)>) -> TestApp {
    TestApp::spawn_with(Options {
        vars,
        stripe: true,
        ..Options::default()
    })
    .await
}

/// Polls `done` every 50 ms for at most `limit`.
async fn wait_until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (90 s at most) until every session of `ids` is open on its retry's checkout.
async fn wait_until_open(app: &TestApp, ids: &[String]) {
    wait_until(
        "every retry's checkout is open",
        Duration::from_secs(90),
        async || {
            for id in ids {
                if app.status(&app.admin(), id).await["status"] != "open" {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

/// Stripe lets 4 requests a second through (the merchant's own traffic took the rest of the
/// account's limit), payretry's budget says 20: the retries of six buyers meet 429s, and
/// every one of them still gets its checkout, once, with nothing dead-lettered even though
/// a job may be delivered only twice.
#[tokio::test]
async fn a_429_storm_dead_letters_nothing_and_spends_no_attempt() {
    let app = app(vec![
        ("PAYRETRY_RETRY_DELAYS", "1s".to_owned()),
        ("PAYRETRY_MAX_RECEIVES", "2".to_owned()),
        ("PAYRETRY_PROVIDER_MAX_RPS", "20".to_owned()),
    ])
    .await;
    let fake = app.stripe.as_ref().expect("the fake Stripe API");
    fake.set_latency(Duration::from_millis(50));
    fake.set_rate_limit(4);
    let buyer = app.buyer();
    let mut ids = Vec::new();
    for n in 0..SESSIONS {
        let id = app.declined_session(&buyer).await.id;
        let accepted = app.retry(&buyer, &id, &format!("key-{n}")).await;
        assert_eq!(accepted.status(), 202);
        ids.push(id);
    }

    wait_until_open(&app, &ids).await;

    assert!(
        fake.rate_limited() > 0,
        "the fake never refused: no storm was tested"
    );
    assert_eq!(fake.violations(), Vec::<String>::new());
    for id in &ids {
        assert_eq!(fake.create_count(id, 1), 1, "{id}: one retry checkout");
        let status = app.status(&app.admin(), id).await;
        assert_eq!(status["retryAttempts"], 1, "{id}: {status}");
        let entries = app.audit_entries(id).await;
        assert_eq!(with_action(&entries, "retry_initiated").len(), 1, "{id}");
        assert!(
            with_action(&entries, "retry_dead_lettered").is_empty(),
            "{id}"
        );
    }
    assert!(
        app.admin_list("/admin/dead-letters", "deadLetters")
            .await
            .is_empty()
    );
}

/// A budget of 10 calls a second keeps every second at or under 10 (and its 0.1 s burst),
/// however many jobs fall due together.
#[tokio::test]
async fn no_second_sees_more_calls_than_the_budget() {
    let app = app(vec![
        ("PAYRETRY_RETRY_DELAYS", "1s".to_owned()),
        ("PAYRETRY_PROVIDER_MAX_RPS", "10".to_owned()),
    ])
    .await;
    let fake = app.stripe.as_ref().expect("the fake Stripe API");
    let buyer = app.buyer();
    let mut ids = Vec::new();
    for n in 0..SESSIONS * 2 {
        let id = app.declined_session(&buyer).await.id;
        assert_eq!(
            app.retry(&buyer, &id, &format!("key-{n}")).await.status(),
            202
        );
        ids.push(id);
    }

    wait_until_open(&app, &ids).await;

    let busiest = fake.busiest_second();
    assert!(
        busiest <= 11,
        "{busiest} calls reached the provider within one second"
    );
    assert_eq!(fake.rate_limited(), 0);
    assert_eq!(fake.violations(), Vec::<String>::new());
}

/// Every call refused for a while (the merchant's traffic took the whole limit): each job's
/// call gives up after its patience, and the job is postponed, not failed. With a job allowed
/// a single delivery, one counted postponement would dead-letter it; none is, and once
/// Stripe answers again every retry gets its checkout.
#[tokio::test]
async fn a_job_the_rate_limit_keeps_refusing_is_postponed_uncounted() {
    let app = app(vec![
        ("PAYRETRY_RETRY_DELAYS", "1s".to_owned()),
        ("PAYRETRY_MAX_RECEIVES", "1".to_owned()),
    ])
    .await;
    let fake = app.stripe.as_ref().expect("the fake Stripe API");
    let buyer = app.buyer();
    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        ids.push(app.open_session(&buyer).await.id);
    }
    fake.set_rate_limit(0);
    for (n, id) in ids.iter().enumerate() {
        app.decline(id, 0, "insufficient_funds").await;
        assert_eq!(
            app.retry(&buyer, id, &format!("key-{n}")).await.status(),
            202
        );
    }

    // Every job was postponed at least once, then delivered and refused again.
    wait_until("every job postponed", Duration::from_secs(60), async || {
        app.count("SELECT COUNT(*) FROM retry_jobs WHERE last_error LIKE '%rate limit%'")
            .await
            == SESSIONS as i64
    })
    .await;
    let refused = fake.rate_limited();
    wait_until(
        "the postponed jobs delivered again",
        Duration::from_secs(60),
        async || fake.rate_limited() >= refused + SESSIONS,
    )
    .await;
    assert!(
        app.admin_list("/admin/dead-letters", "deadLetters")
            .await
            .is_empty()
    );
    fake.set_rate_limit(1_000);

    wait_until_open(&app, &ids).await;
    assert!(
        app.admin_list("/admin/dead-letters", "deadLetters")
            .await
            .is_empty()
    );
    for id in &ids {
        assert_eq!(fake.create_count(id, 1), 1, "{id}");
        assert_eq!(
            app.status(&app.admin(), id).await["retryAttempts"],
            1,
            "{id}"
        );
    }
    assert_eq!(fake.violations(), Vec::<String>::new());
}
