//! The JSON routes the operator console reads (DESIGN.md §3, §6c): `GET /admin/sessions`
//! (newest first, filtered by buyer or status, paged by an opaque cursor) and
//! `GET /admin/stats/retries` (the retry funnel), on SQLite and on PostgreSQL.

use crate::support::app::{Database, Options, Session, TestApp, assert_problem, session_id, text};
use payretry_domain::Role;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

async fn spawn(database: Database) -> TestApp {
    TestApp::spawn_with(Options {
        database,
        ..Options::default()
    })
    .await
}

/// `GET path` as `token`; asserts 200 and returns the body.
async fn get_ok(app: &TestApp, path: &str, token: &str) -> Value {
    let response = app
        .request(Method::GET, path, Some(token), None, None)
        .await;
    assert_eq!(response.status(), StatusCode::OK, "GET {path}");
    response.json().await.unwrap()
}

/// Every session `query` lists, following `nextCursor` page by page (`limit` per page):
/// checks that each page but the last is full and only the last has a null cursor.
async fn walk_sessions(app: &TestApp, query: &str, limit: usize, token: &str) -> Vec<Value> {
    let mut sessions = Vec::new();
    let mut path = format!("/admin/sessions?limit={limit}{query}");
    loop {
        let body = get_ok(app, &path, token).await;
        let page = body["sessions"].as_array().expect("sessions").clone();
        assert!(page.len() <= limit, "{path}: {} sessions", page.len());
        sessions.extend(page.iter().cloned());
        match body["nextCursor"].as_str() {
            Some(cursor) => {
                assert_eq!(page.len(), limit, "{path}: a page before the last is full");
                path = format!("/admin/sessions?limit={limit}{query}&cursor={cursor}");
            }
            None => return sessions,
        }
    }
}

fn ids(sessions: &[Value]) -> Vec<String> {
    sessions.iter().map(session_id).collect()
}

/// Sets a session's creation time (ms) straight in the database, so the order is known.
async fn created_at(app: &TestApp, id: &str, ms: i64) {
    app.db
        .execute(&format!(
            "UPDATE payment_sessions SET created_at = {ms} WHERE id = '{id}'"
        ))
        .await;
}

/// Waits (10 s at most) until PostgreSQL's statistics say each of `indexes` was scanned:
/// the console's reads went through the indexes of migration 0014.
async fn assert_indexes_scanned(app: &TestApp, count_sql: &'static str, indexes: i64) {
    let mut scanned = app.count(count_sql).await;
    for _ in 0..200 {
        if scanned == indexes {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        scanned = app.count(count_sql).await;
    }
    panic!("{scanned} of {indexes} indexes scanned: {count_sql}");
}

async fn sessions_page_newest_first_with_filters(database: Database) {
    // Arrange: five sessions of buyer-a and one of buyer-b, created at known times; two of
    // buyer-a's share a creation time (the order falls back to the id). Two of buyer-a's
    // were declined.
    let app = spawn(database).await;
    let buyer_a = app.token("buyer-a", Role::Buyer);
    let buyer_b = app.token("buyer-b", Role::Buyer);
    let mut a: Vec<Session> = Vec::new();
    for _ in 0..5 {
        a.push(app.open_session(&buyer_a).await);
    }
    let b = app.open_session(&buyer_b).await;
    let base = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    for (session, offset) in a.iter().zip([0, 1000, 2000, 2000, 4000]) {
        created_at(&app, &session.id, base + offset).await;
    }
    created_at(&app, &b.id, base + 3000).await;
    app.decline(&a[0].id, 0, "insufficient_funds").await;
    app.decline(&a[3].id, 0, "card_declined").await;
    app.wait_for_status(&a[0].id, "failed").await;
    app.wait_for_status(&a[3].id, "failed").await;
    let support = app.token("support-1", Role::Support);
    // Newest first; of the two created at base + 2000, the greater id first.
    let (tied_first, tied_second) = if a[3].id > a[2].id {
        (&a[3].id, &a[2].id)
    } else {
        (&a[2].id, &a[3].id)
    };
    let newest_first: Vec<String> = [&a[4].id, &b.id, tied_first, tied_second, &a[1].id, &a[0].id]
        .into_iter()
        .cloned()
        .collect();

    // Act + assert: two at a time, every session once, newest first.
    let all = walk_sessions(&app, "", 2, &support).await;
    assert_eq!(ids(&all), newest_first);
    // One page of them all; a listed session is its status object with buyer and createdAt.
    let one_page = get_ok(&app, "/admin/sessions", &support).await;
    assert_eq!(ids(one_page["sessions"].as_array().unwrap()), newest_first);
    assert_eq!(one_page["nextCursor"], Value::Null);
    let listed = &one_page["sessions"][1];
    assert_eq!(listed["buyer"], "buyer-b");
    assert_eq!(listed["createdAt"], "2026-01-01T00:00:03Z");
    let mut status_object = listed.clone();
    let object = status_object.as_object_mut().unwrap();
    object.remove("buyer");
    object.remove("createdAt");
    assert_eq!(status_object, app.status(&support, &b.id).await);
    assert_eq!(one_page["sessions"][5]["status"], "failed");
    assert_eq!(
        one_page["sessions"][5]["failureReason"],
        "insufficient_funds"
    );

    // One buyer's: an exact match on the buyer's id, paged the same way.
    let a_newest_first: Vec<String> = newest_first
        .iter()
        .filter(|id| **id != b.id)
        .cloned()
        .collect();
    assert_eq!(
        ids(&walk_sessions(&app, "&buyer=buyer-a", 2, &support).await),
        a_newest_first
    );
    assert_eq!(
        ids(&walk_sessions(&app, "&buyer=buyer-b", 2, &support).await),
        [b.id.as_str()]
    );
    assert!(
        walk_sessions(&app, "&buyer=buyer", 2, &support)
            .await
            .is_empty()
    );

    // By stored status, and by buyer and status together.
    let failed = vec![a[3].id.clone(), a[0].id.clone()];
    assert_eq!(
        ids(&walk_sessions(&app, "&status=failed", 1, &support).await),
        failed
    );
    assert_eq!(
        ids(&walk_sessions(&app, "&status=open", 2, &support).await),
        [&a[4].id, &b.id, &a[2].id, &a[1].id]
            .into_iter()
            .cloned()
            .collect::<Vec<_>>()
    );
    assert_eq!(
        ids(&walk_sessions(&app, "&buyer=buyer-a&status=failed", 1, &support).await),
        failed
    );
    assert!(
        walk_sessions(&app, "&buyer=buyer-b&status=failed", 1, &support)
            .await
            .is_empty()
    );
    let none = get_ok(&app, "/admin/sessions?status=succeeded", &support).await;
    assert_eq!(none, json!({"sessions": [], "nextCursor": null}));

    if database == Database::Postgres {
        assert_indexes_scanned(
            &app,
            "SELECT count(*) FROM pg_stat_user_indexes WHERE idx_scan > 0 AND indexrelname IN
                ('payment_sessions_by_created', 'payment_sessions_by_buyer',
                 'payment_sessions_by_status')",
            3,
        )
        .await;
    }
}

#[tokio::test]
async fn sessions_page_newest_first_with_filters_on_sqlite() {
    sessions_page_newest_first_with_filters(Database::Sqlite).await;
}

#[tokio::test]
async fn sessions_page_newest_first_with_filters_on_postgres() {
    sessions_page_newest_first_with_filters(Database::Postgres).await;
}

/// Creates a session of `amount` in `currency` for `token`'s buyer and has the provider
/// decline its first checkout.
async fn declined_in(app: &TestApp, token: &str, amount: i64, currency: &str) -> String {
    let response = app
        .request(
            Method::POST,
            "/payments/checkout",
            Some(token),
            None,
            Some(json!({"amount": amount, "currency": currency, "description": "Order 7"})),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let id = session_id(&response.json().await.unwrap());
    app.decline(&id, 0, "insufficient_funds").await;
    app.wait_for_status(&id, "failed").await;
    id
}

/// The buyer retries the session; returns the checkout id of the retry once it is live.
async fn retried(app: &TestApp, token: &str, id: &str, key: &str) -> String {
    let response = app.retry(token, id, key).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED, "retry {id}");
    text(&app.wait_for_status(id, "open").await, "providerSessionId")
}

/// The funnel's numbers of one stage, as the route writes them.
fn stage(
    [
        scheduled,
        checkout_created,
        paid,
        failed_again,
        abandoned,
        dead_lettered,
        in_progress,
    ]: [u64; 7],
    recovered: Value,
) -> Value {
    json!({
        "scheduled": scheduled, "checkoutCreated": checkout_created, "paid": paid,
        "failedAgain": failed_again, "abandoned": abandoned, "deadLettered": dead_lettered,
        "inProgress": in_progress, "recovered": recovered,
    })
}

fn attempt(number: u32, numbers: [u64; 7], recovered: Value) -> Value {
    let mut attempt = stage(numbers, recovered);
    attempt["attemptNumber"] = json!(number);
    attempt
}

fn time(value: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(value.as_str().expect("a time"))
        .expect("RFC 3339")
        .into()
}

async fn retry_funnel_counts_the_story(database: Database) {
    // Arrange: four declined sessions, each retried once. Retry 1 of `paid` (25.00 USD) and
    // of `paid_eur` (18.00 EUR) is paid; retry 1 of `again` is declined and the buyer retries
    // a second time, whose checkout is open; retry 1 of `open` is left open.
    let app = spawn(database).await;
    let buyer = app.buyer();
    let paid = declined_in(&app, &buyer, 2500, "usd").await;
    let again = declined_in(&app, &buyer, 2500, "usd").await;
    let open = declined_in(&app, &buyer, 2500, "usd").await;
    let paid_eur = declined_in(&app, &buyer, 1800, "eur").await;
    let (paid_checkout, _, _, eur_checkout) = tokio::join!(
        retried(&app, &buyer, &paid, "funnel-paid"),
        retried(&app, &buyer, &again, "funnel-again"),
        retried(&app, &buyer, &open, "funnel-open"),
        retried(&app, &buyer, &paid_eur, "funnel-eur"),
    );
    app.pay(&paid, 1, &paid_checkout).await;
    app.pay(&paid_eur, 1, &eur_checkout).await;
    app.decline(&again, 1, "insufficient_funds").await;
    app.wait_for_status(&paid, "succeeded").await;
    app.wait_for_status(&paid_eur, "succeeded").await;
    app.wait_for_status(&again, "failed").await;
    retried(&app, &buyer, &again, "funnel-again-2").await;
    let support = app.token("support-1", Role::Support);

    // Act: the last 24 hours (the default).
    let funnel = get_ok(&app, "/admin/stats/retries", &support).await;

    // Assert
    let usd = json!({"currency": "usd", "amount": 2500});
    let eur = json!({"currency": "eur", "amount": 1800});
    assert_eq!(
        funnel["attempts"],
        json!([
            attempt(1, [4, 4, 2, 1, 0, 0, 1], json!([eur, usd])),
            attempt(2, [1, 1, 0, 0, 0, 0, 1], json!([])),
        ])
    );
    assert_eq!(
        funnel["totals"],
        stage([5, 5, 2, 1, 0, 0, 2], json!([eur, usd]))
    );
    let (since, until) = (time(&funnel["since"]), time(&funnel["until"]));
    assert_eq!(until - since, chrono::Duration::hours(24));
    assert!(
        (chrono::Utc::now() - until).num_seconds().abs() < 60,
        "{until}"
    );
    assert_eq!(
        get_ok(&app, "/admin/stats/retries?since=24h", &support).await["attempts"],
        funnel["attempts"]
    );

    // A retry accepted three days ago counts in the last 7 days, not in the last 24 hours.
    app.db
        .execute(&format!(
            "UPDATE payment_attempts SET created_at = created_at - {}
             WHERE session_id = '{paid_eur}' AND attempt_number = 1",
            3 * 24 * 60 * 60 * 1000_i64
        ))
        .await;
    let day = get_ok(&app, "/admin/stats/retries?since=24h", &support).await;
    assert_eq!(
        day["attempts"][0],
        attempt(1, [3, 3, 1, 1, 0, 0, 1], json!([usd]))
    );
    assert_eq!(day["totals"], stage([4, 4, 1, 1, 0, 0, 2], json!([usd])));
    let week = get_ok(&app, "/admin/stats/retries?since=7d", &support).await;
    assert_eq!(week["attempts"], funnel["attempts"]);
    assert_eq!(week["totals"], funnel["totals"]);
    assert_eq!(
        time(&week["until"]) - time(&week["since"]),
        chrono::Duration::days(7)
    );
    // A time: from an hour ago (percent-encoded, as a `+` would be read as a space).
    let an_hour_ago = (chrono::Utc::now() - chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
        .replace('+', "%2B");
    let hour = get_ok(
        &app,
        &format!("/admin/stats/retries?since={an_hour_ago}"),
        &support,
    )
    .await;
    assert_eq!(hour["totals"], day["totals"]);
    // Once every retry is older than the period, no attempt number is listed at all.
    app.db
        .execute("UPDATE payment_attempts SET created_at = created_at - 120000")
        .await;
    let minute = get_ok(&app, "/admin/stats/retries?since=1m", &support).await;
    assert_eq!(minute["attempts"], json!([]));
    assert_eq!(minute["totals"], stage([0; 7], json!([])));

    if database == Database::Postgres {
        assert_indexes_scanned(
            &app,
            "SELECT count(*) FROM pg_stat_user_indexes WHERE idx_scan > 0
                AND indexrelname = 'payment_attempts_retries_by_created'",
            1,
        )
        .await;
    }
}

#[tokio::test]
async fn retry_funnel_counts_the_story_on_sqlite() {
    retry_funnel_counts_the_story(Database::Sqlite).await;
}

#[tokio::test]
async fn retry_funnel_counts_the_story_on_postgres() {
    retry_funnel_counts_the_story(Database::Postgres).await;
}

#[tokio::test]
async fn console_data_routes_are_for_support_and_admins() {
    let app = TestApp::spawn().await;
    app.open_session(&app.buyer()).await;

    for path in ["/admin/sessions", "/admin/stats/retries"] {
        let response = app.request(Method::GET, path, None, None, None).await;
        assert_problem(response, 401, "unauthenticated").await;
        let buyer = app.buyer();
        let response = app
            .request(Method::GET, path, Some(&buyer), None, None)
            .await;
        assert_problem(response, 403, "forbidden").await;
        // A buyer's bad parameters are still a 403: the role is checked first.
        let response = app
            .request(
                Method::GET,
                &format!("{path}?limit=0&since=0m&status=x"),
                Some(&buyer),
                None,
                None,
            )
            .await;
        assert_problem(response, 403, "forbidden").await;
        for role in [Role::Support, Role::Admin] {
            get_ok(&app, path, &app.token("operator-1", role)).await;
        }
    }
    let sessions = get_ok(
        &app,
        "/admin/sessions",
        &app.token("support-1", Role::Support),
    )
    .await;
    assert_eq!(sessions["sessions"][0]["buyer"], "buyer-1");
}

#[tokio::test]
async fn console_data_routes_refuse_bad_parameters() {
    let app = TestApp::spawn().await;
    let support = app.token("support-1", Role::Support);
    // A real cursor, to show a cursor of another list is not one of this list's.
    for _ in 0..2 {
        app.open_session(&app.buyer()).await;
    }
    let first = get_ok(&app, "/admin/sessions?limit=1", &support).await;
    let cursor = first["nextCursor"].as_str().expect("a cursor").to_owned();
    get_ok(
        &app,
        &format!("/admin/sessions?limit=1&cursor={cursor}"),
        &support,
    )
    .await;
    let future = (chrono::Utc::now() + chrono::Duration::minutes(5))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let too_old = (chrono::Utc::now() - chrono::Duration::days(32))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let long_buyer = "b".repeat(256);
    let bad = [
        ("/admin/sessions?status=bogus".to_owned(), "`status`"),
        ("/admin/sessions?status=".to_owned(), "`status`"),
        ("/admin/sessions?status=FAILED".to_owned(), "`status`"),
        ("/admin/sessions?buyer=".to_owned(), "`buyer`"),
        (format!("/admin/sessions?buyer={long_buyer}"), "`buyer`"),
        ("/admin/sessions?limit=0".to_owned(), "`limit`"),
        ("/admin/sessions?limit=101".to_owned(), "`limit`"),
        ("/admin/sessions?limit=abc".to_owned(), "`limit`"),
        ("/admin/sessions?cursor=garbage".to_owned(), "`cursor`"),
        ("/admin/sessions?cursor=v1.42".to_owned(), "`cursor`"),
        ("/admin/sessions?cursor=".to_owned(), "`cursor`"),
        (format!("/admin/sessions?cursor={cursor}x!"), "`cursor`"),
        (
            "/admin/sessions?status=open&status=failed".to_owned(),
            "malformed",
        ),
        ("/admin/stats/retries?since=0m".to_owned(), "`since`"),
        ("/admin/stats/retries?since=32d".to_owned(), "`since`"),
        ("/admin/stats/retries?since=yesterday".to_owned(), "`since`"),
        ("/admin/stats/retries?since=".to_owned(), "`since`"),
        ("/admin/stats/retries?since=1s".to_owned(), "`since`"),
        (format!("/admin/stats/retries?since={future}"), "`since`"),
        (format!("/admin/stats/retries?since={too_old}"), "`since`"),
        (
            "/admin/stats/retries?since=1h&since=2h".to_owned(),
            "`since`",
        ),
    ];

    for (path, names) in bad {
        let response = app
            .request(Method::GET, &path, Some(&support), None, None)
            .await;
        let problem = assert_problem(response, 400, "invalid_request").await;
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(names), "{path}: {detail}");
    }
    // The longest buyer id is fine.
    let buyer = "b".repeat(255);
    get_ok(&app, &format!("/admin/sessions?buyer={buyer}"), &support).await;
}

#[tokio::test]
async fn a_retry_overtaken_by_a_payment_of_the_first_checkout_is_not_in_progress() {
    // A retry's checkout is open when the buyer pays the first checkout after all: the retry's
    // attempt row stays `open`, but the retry is over.
    let app = spawn(Database::Sqlite).await;
    let buyer = app.buyer();
    let id = declined_in(&app, &buyer, 2500, "usd").await;
    let first = text(&app.status(&app.admin(), &id).await, "providerSessionId");
    retried(&app, &buyer, &id, "overtaken").await;
    app.pay(&id, 0, &first).await;
    app.wait_for_status(&id, "succeeded").await;

    let funnel = get_ok(&app, "/admin/stats/retries", &app.admin()).await;

    assert_eq!(
        funnel["attempts"],
        json!([attempt(1, [1, 1, 0, 0, 0, 0, 0], json!([]))])
    );
}
