//! The provider budget (DESIGN.md §4) through the real server and a fake Stripe that is slow
//! and refuses requests past its rate limit with 429, as Stripe does: payretry paces its
//! calls, a 429 slows it down, and a job the limit refused is postponed without counting as
//! a failed delivery: it is never dead-lettered for it, and no buyer's attempt is spent on it.

use crate::support::app::{Options, TestApp, WEBHOOK_SECRET, with_action};
use crate::support::fake_stripe::TEST_SECRET_KEY;
use crate::support::process::ServeProcess;
use crate::support::services::Database;
use payretry::app::ServeRole;
use std::time::Duration;

const SESSIONS: usize = 6;

/// The window the fake's arrivals are counted in, and the most calls a budget of 10 a
/// second may show in it: 30, its 0.1 s burst, and three calls of slack for arrival jitter (a
/// call sent late on a loaded machine lands among the ones after it). Three seconds rather
/// than one, so that jitter at the window's edges weighs little. Without pacing, or with a
/// budget per process, these tests show 45 or more.
const WINDOW: Duration = Duration::from_secs(3);
const BUSIEST_IN_WINDOW: usize = 34;

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

/// `n` declined sessions, each with its retry accepted (202); their ids.
async fn retried_sessions(app: &TestApp, n: usize) -> Vec<String> {
    let buyer = app.buyer();
    let mut ids = Vec::new();
    for k in 0..n {
        let id = app.declined_session(&buyer).await.id;
        let accepted = app.retry(&buyer, &id, &format!("key-{k}")).await;
        assert_eq!(accepted.status(), 202);
        ids.push(id);
    }
    ids
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
    let ids = retried_sessions(&app, SESSIONS).await;

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

/// A budget of 10 calls a second keeps every second at about 10 (see
/// [`BUSIEST_IN_WINDOW`]), however many jobs fall due together.
#[tokio::test]
async fn no_three_seconds_see_more_calls_than_the_budget() {
    let app = app(vec![
        ("PAYRETRY_RETRY_DELAYS", "1s".to_owned()),
        ("PAYRETRY_PROVIDER_MAX_RPS", "10".to_owned()),
    ])
    .await;
    let fake = app.stripe.as_ref().expect("the fake Stripe API");
    let ids = retried_sessions(&app, SESSIONS * 2).await;

    wait_until_open(&app, &ids).await;

    let busiest = fake.busiest(WINDOW);
    assert!(
        busiest <= BUSIEST_IN_WINDOW,
        "{busiest} calls reached the provider within {WINDOW:?}"
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

/// One deployment on PostgreSQL: this API process and two worker processes (the real
/// binary), each configured with a budget of 10 calls a second. Together they keep every
/// second at about 10: the budget is the deployment's, not each process's.
#[tokio::test]
async fn the_budget_holds_across_two_worker_processes_on_postgres() {
    let budget = ("PAYRETRY_PROVIDER_MAX_RPS", "10".to_owned());
    let app = TestApp::spawn_with(Options {
        vars: vec![("PAYRETRY_RETRY_DELAYS", "1s".to_owned()), budget.clone()],
        stripe: true,
        role: ServeRole::Api,
        database: Database::Postgres,
        ..Options::default()
    })
    .await;
    let fake = app.stripe.as_ref().expect("the fake Stripe API");
    let dir = tempfile::tempdir().expect("a directory for the workers' logs");
    let env: Vec<(String, String)> = [
        ("PAYRETRY_DATABASE_URL", app.db.url.clone()),
        ("PAYRETRY_PROVIDER", "stripe".to_owned()),
        ("PAYRETRY_PUBLIC_URL", "https://pay.example.test".to_owned()),
        ("STRIPE_API_BASE", fake.base_url().to_owned()),
        ("STRIPE_SECRET_KEY", TEST_SECRET_KEY.to_owned()),
        ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
        ("PAYRETRY_RETRY_DELAYS", "1s".to_owned()),
        // Two jobs each at a time: neither worker can take the whole backlog.
        ("PAYRETRY_WORKER_CONCURRENCY", "2".to_owned()),
        budget,
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut workers: Vec<ServeProcess> = (0..2)
        .map(|n| {
            ServeProcess::spawn(
                env!("CARGO_BIN_EXE_payretry"),
                &["serve", "--role", "worker"],
                &env,
                dir.path(),
                &format!("worker-{n}"),
            )
        })
        .collect();
    for worker in &mut workers {
        worker.wait_ready().await;
    }
    let ids = retried_sessions(&app, SESSIONS * 3).await;

    wait_until_open(&app, &ids).await;

    let busiest = fake.busiest(WINDOW);
    assert!(
        busiest <= BUSIEST_IN_WINDOW,
        "{busiest} calls reached the provider within {WINDOW:?} from three processes"
    );
    assert_eq!(fake.rate_limited(), 0);
    for id in &ids {
        assert_eq!(fake.create_count(id, 1), 1, "{id}");
    }
    assert_eq!(fake.violations(), Vec::<String>::new());
    let picked: Vec<bool> = workers
        .iter()
        .map(|w| w.log_text().contains("retry job processed"))
        .collect();
    assert_eq!(picked, [true, true], "both workers took jobs");
}
