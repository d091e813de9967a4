//! Merchant events through the real path (DESIGN.md §6b): the transition writes the event,
//! the relay signs and delivers it to a local receiver, and every delivery is verified by the
//! Standard Webhooks reference library from PyPI.

use crate::support::app::{Database, Options, TestApp, assert_problem, text};
use crate::support::merchant_receiver::{
    Answer, MerchantReceiver, Received, distinct_accepted, verify_with_reference_library,
};
use payretry::merchant_events::signature::SigningKey;
use payretry_domain::Role;
use reqwest::Method;
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

fn secret(byte: u8) -> String {
    SigningKey::encode(&[byte; 32])
}

/// The app with merchant events sent to `receiver`, signed with `secrets`, retried after
/// `delays`.
fn options(receiver: &MerchantReceiver, secrets: &[String], delays: &str) -> Options {
    Options {
        vars: vec![
            ("PAYRETRY_RETRY_DELAYS", "1s".to_owned()),
            ("PAYRETRY_MERCHANT_WEBHOOK_URL", receiver.url.clone()),
            ("PAYRETRY_MERCHANT_WEBHOOK_SECRET", secrets.join(",")),
            ("PAYRETRY_MERCHANT_WEBHOOK_RETRY_DELAYS", delays.to_owned()),
            ("PAYRETRY_MERCHANT_WEBHOOK_TIMEOUT", "2s".to_owned()),
        ],
        ..Options::default()
    }
}

/// The accepted deliveries of session `id`, one per event, in `sequence` order.
fn events_of(received: &[Received], id: &str) -> Vec<Value> {
    let mut by_id: HashMap<String, Value> = HashMap::new();
    for r in received.iter().filter(|r| r.accepted()) {
        let body = r.json();
        if body["data"]["sessionId"] == id {
            by_id.insert(r.id.clone(), body);
        }
    }
    let mut events: Vec<Value> = by_id.into_values().collect();
    events.sort_by_key(|e| e["data"]["sequence"].as_i64());
    events
}

fn types(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| text(e, "type")).collect()
}

/// Every event's sequence counts 1, 2, 3 … with no gap, and its envelope is the contract's.
fn assert_envelopes(events: &[Value], buyer: &str) {
    for (n, event) in events.iter().enumerate() {
        assert_eq!(event["data"]["sequence"], n as i64 + 1, "{event}");
        assert_eq!(event["data"]["buyer"], buyer, "{event}");
        for field in [
            "status",
            "amount",
            "currency",
            "retryAttempts",
            "maxRetryAttempts",
            "retryAvailable",
            "expiresAt",
        ] {
            assert!(
                !event["data"][field].is_null(),
                "{field} missing in {event}"
            );
        }
        chrono::DateTime::parse_from_rfc3339(event["timestamp"].as_str().unwrap())
            .expect("an RFC 3339 timestamp");
    }
}

async fn deliveries(app: &TestApp, query: &str) -> Vec<Value> {
    app.admin_list(&format!("/admin/webhook-deliveries{query}"), "deliveries")
        .await
}

#[tokio::test]
async fn the_whole_story_produces_its_events_in_sequence_with_the_contract_fields() {
    let receiver = MerchantReceiver::start().await;
    let secrets = [secret(1), secret(2)];
    let app = TestApp::spawn_with(Options {
        vars: {
            let mut vars = options(&receiver, &secrets, "1s").vars;
            vars.push(("PAYRETRY_MAX_ATTEMPTS", "2".to_owned()));
            vars
        },
        ..Options::default()
    })
    .await;
    let buyer = app.buyer();

    // Paid on the second retry, then charged again through the first retry's checkout.
    let paid = app.declined_session(&buyer).await.id;
    assert_eq!(app.retry(&buyer, &paid, "p1").await.status(), 202);
    let first = app.wait_for_status(&paid, "open").await;
    app.decline(&paid, 1, "insufficient_funds").await;
    assert_eq!(app.retry(&buyer, &paid, "p2").await.status(), 202);
    let second = app.wait_for_status(&paid, "open").await;
    app.pay(&paid, 2, &text(&second, "providerSessionId")).await;
    app.pay(&paid, 1, &text(&first, "providerSessionId")).await;

    // Every retry spent and failed: the last failure abandons the retry.
    let exhausted = app.declined_session(&buyer).await.id;
    for attempt in 1..=2 {
        assert_eq!(
            app.retry(&buyer, &exhausted, &format!("x{attempt}"))
                .await
                .status(),
            202
        );
        app.wait_for_status(&exhausted, "open").await;
        app.decline(&exhausted, attempt, "do_not_honor").await;
    }

    // Eight events each: the paid session's, and the exhausted one's ending in failed + abandoned.
    let received = receiver.wait_for_accepted(8 + 8, WAIT).await;
    for r in &received {
        assert_eq!(r.content_type, "application/json");
        assert_eq!(
            r.signature.split(' ').count(),
            2,
            "one signature per secret"
        );
    }
    // Each secret alone verifies every delivery (a receiver rotating its secret).
    let parsed = verify_with_reference_library(&received, &[&secrets[0], &secrets[1]]);
    assert_eq!(parsed.len(), received.len() * 2);

    let events = events_of(&received, &paid);
    assert_eq!(
        types(&events),
        [
            "payment_session.failed",
            "payment_session.retry_scheduled",
            "payment_session.retry_ready",
            "payment_session.failed",
            "payment_session.retry_scheduled",
            "payment_session.retry_ready",
            "payment_session.succeeded",
            "payment_session.double_payment",
        ]
    );
    assert_envelopes(&events, "buyer-1");
    assert_eq!(events[0]["data"]["status"], "failed");
    assert_eq!(events[0]["data"]["attemptNumber"], 0);
    assert_eq!(events[1]["data"]["status"], "retry_scheduled");
    assert_eq!(events[1]["data"]["attemptNumber"], 1);
    assert!(events[1]["data"]["scheduledFor"].is_string());
    assert_eq!(events[2]["data"]["status"], "open");
    assert_eq!(events[2]["data"]["checkoutUrl"], first["checkoutUrl"]);
    assert_eq!(events[3]["data"]["failureReason"], "insufficient_funds");
    assert_eq!(events[5]["data"]["checkoutUrl"], second["checkoutUrl"]);
    assert_eq!(events[6]["data"]["status"], "succeeded");
    assert_eq!(events[6]["data"]["paidAttempt"], 2);
    assert_eq!(events[7]["data"]["duplicateAttempt"], 1);
    assert_eq!(events[7]["data"]["refundStatus"], "detected");

    let events = events_of(&received, &exhausted);
    assert_eq!(events.len(), 8, "{:?}", types(&events));
    assert_eq!(
        types(&events)[events.len() - 2..],
        ["payment_session.failed", "payment_session.retry_abandoned"]
    );
    assert_envelopes(&events, "buyer-1");
    assert_eq!(
        events[events.len() - 1]["data"]["reason"],
        "attempts_exhausted"
    );
    assert_eq!(events[events.len() - 1]["data"]["retryAvailable"], false);

    // The admin list names each event by the webhook-id it was delivered with.
    let listed = deliveries(&app, &format!("?sessionId={paid}")).await;
    assert_eq!(listed.len(), 8);
    for (delivery, event) in listed.iter().zip(&events_of(&received, &paid)) {
        assert_eq!(delivery["status"], "delivered");
        assert_eq!(delivery["type"], event["type"]);
        assert!(
            received
                .iter()
                .any(|r| r.id == text(delivery, "eventId") && r.json() == *event)
        );
    }
}

#[tokio::test]
async fn a_session_whose_window_closes_announces_its_expiry() {
    let receiver = MerchantReceiver::start().await;
    let secrets = [secret(3)];
    let mut options = options(&receiver, &secrets, "1s");
    options
        .vars
        .push(("PAYRETRY_PAYMENT_WINDOW", "3s".to_owned()));
    let app = TestApp::spawn_with(options).await;
    let id = app.declined_session(&app.buyer()).await.id;
    let received = receiver
        .wait_until("the expiry announced", WAIT, |received| {
            types(&events_of(received, &id)).last().map(String::as_str)
                == Some("payment_session.expired")
        })
        .await;
    verify_with_reference_library(&received, &[&secrets[0]]);
    let events = events_of(&received, &id);
    assert_eq!(
        types(&events),
        ["payment_session.failed", "payment_session.expired"]
    );
    assert_eq!(events[1]["data"]["status"], "expired");
    assert!(events[1]["data"]["checkoutUrl"].is_null());
}

#[tokio::test]
async fn a_receiver_answering_500_then_204_gets_the_same_id_and_body_again() {
    let receiver = MerchantReceiver::start().await;
    receiver.answer_next([Answer::Status(500)]);
    let secrets = [secret(4)];
    let app = TestApp::spawn_with(options(&receiver, &secrets, "1s,1s")).await;
    let id = app.declined_session(&app.buyer()).await.id;

    let received = receiver.wait_for_accepted(1, WAIT).await;
    assert_eq!(received.len(), 2, "one refused try, one accepted");
    assert_eq!(received[0].answer, Answer::Status(500));
    assert_eq!(received[0].id, received[1].id);
    assert_eq!(received[0].body, received[1].body, "the same bytes");
    verify_with_reference_library(&received, &[&secrets[0]]);
    assert_eq!(received[1].json()["data"]["sessionId"], id);

    let delivery = app
        .wait_until_delivery(&format!("?sessionId={id}"), "delivered")
        .await;
    assert_eq!(delivery["attempts"], 2);
    assert_eq!(delivery["eventId"], received[0].id);
    let metrics = app
        .request(Method::GET, "/metrics", None, None, None)
        .await
        .text()
        .await
        .unwrap();
    for outcome in ["delivered", "retried"] {
        assert!(
            metrics.contains(&format!(
                "payments_webhook_delivery_count{{outcome=\"{outcome}\"}} 1"
            )),
            "{metrics}"
        );
    }
    assert!(metrics.contains("payments_webhook_delivery_lag_seconds"));
}

#[tokio::test]
async fn an_exhausted_schedule_fails_the_delivery_and_an_admin_redelivers_it() {
    let receiver = MerchantReceiver::start().await;
    receiver.answer_always(Answer::Status(503));
    let secrets = [secret(5)];
    let app = TestApp::spawn_with(options(&receiver, &secrets, "1s")).await;
    let id = app.declined_session(&app.buyer()).await.id;

    let failed = app.wait_until_delivery("?status=failed", "failed").await;
    assert_eq!(failed["attempts"], 2, "the first try and one retry");
    assert_eq!(failed["paymentSessionId"], id);
    assert_eq!(failed["lastError"], "the receiver answered 503");
    assert!(failed["nextAttemptAt"].is_null());
    assert_eq!(receiver.received().len(), 2);
    assert!(deliveries(&app, "?status=pending").await.is_empty());

    receiver.answer_always(Answer::Status(200));
    let path = format!(
        "/admin/webhook-deliveries/{}/redeliver",
        text(&failed, "id")
    );
    let support = app.token("support-1", Role::Support);
    assert_problem(
        app.request(Method::POST, &path, Some(&support), None, None)
            .await,
        403,
        "forbidden",
    )
    .await;
    let queued = app
        .request(Method::POST, &path, Some(&app.admin()), None, None)
        .await;
    assert_eq!(queued.status(), 202);
    let received = receiver.wait_for_accepted(1, WAIT).await;
    assert_eq!(received.len(), 3);
    assert_eq!(received[2].id, text(&failed, "eventId"));
    assert_eq!(received[2].body, received[0].body);
    verify_with_reference_library(&received, &[&secrets[0]]);
    let delivered = app
        .wait_until_delivery(&format!("?sessionId={id}"), "delivered")
        .await;
    assert_eq!(delivered["attempts"], 3);
    assert!(delivered["lastError"].is_null());
}

#[tokio::test]
async fn a_failed_redelivery_fails_again_after_one_try() {
    let receiver = MerchantReceiver::start().await;
    receiver.answer_always(Answer::Status(500));
    let secrets = [secret(6)];
    let app = TestApp::spawn_with(options(&receiver, &secrets, "1s,1s,1s")).await;
    app.declined_session(&app.buyer()).await;
    let failed = app.wait_until_delivery("?status=failed", "failed").await;
    assert_eq!(failed["attempts"], 4);
    let path = format!(
        "/admin/webhook-deliveries/{}/redeliver",
        text(&failed, "id")
    );
    let queued = app
        .request(Method::POST, &path, Some(&app.admin()), None, None)
        .await;
    assert_eq!(queued.status(), 202);
    receiver
        .wait_until("the redelivery tried", WAIT, |r| r.len() == 5)
        .await;
    let again = app.wait_until_delivery("?status=failed", "failed").await;
    assert_eq!(again["attempts"], 5, "one try, not a new schedule");
}

#[tokio::test]
async fn delivery_routes_refuse_bad_input_and_other_roles() {
    let receiver = MerchantReceiver::start().await;
    let app = TestApp::spawn_with(options(&receiver, &[secret(7)], "1s")).await;
    let admin = app.admin();
    for (query, code) in [
        ("?status=lost", "invalid_request"),
        ("?sessionId=nope", "invalid_request"),
        ("?status=failed&status=pending", "invalid_request"),
        ("?limit=0", "invalid_request"),
        ("?cursor=abc", "invalid_request"),
    ] {
        let path = format!("/admin/webhook-deliveries{query}");
        assert_problem(
            app.request(Method::GET, &path, Some(&admin), None, None)
                .await,
            400,
            code,
        )
        .await;
    }
    for role in [Role::Buyer, Role::Support] {
        let token = app.token("someone", role);
        assert_problem(
            app.request(
                Method::GET,
                "/admin/webhook-deliveries",
                Some(&token),
                None,
                None,
            )
            .await,
            403,
            "forbidden",
        )
        .await;
    }
    assert_problem(
        app.request(Method::GET, "/admin/webhook-deliveries", None, None, None)
            .await,
        401,
        "unauthenticated",
    )
    .await;
    for id in ["999999", "0", "-1", "x", "99999999999999999999"] {
        let path = format!("/admin/webhook-deliveries/{id}/redeliver");
        assert_problem(
            app.request(Method::POST, &path, Some(&admin), None, None)
                .await,
            404,
            "delivery_not_found",
        )
        .await;
    }
    // Pages: three sessions' events, two per page, in id order.
    for _ in 0..3 {
        app.declined_session(&app.buyer()).await;
    }
    receiver.wait_for_accepted(3, WAIT).await;
    let first: Value = app
        .request(
            Method::GET,
            "/admin/webhook-deliveries?limit=2",
            Some(&admin),
            None,
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["deliveries"].as_array().unwrap().len(), 2);
    let cursor = text(&first, "nextCursor");
    let rest: Value = app
        .request(
            Method::GET,
            &format!("/admin/webhook-deliveries?limit=2&cursor={cursor}"),
            Some(&admin),
            None,
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rest["deliveries"].as_array().unwrap().len(), 1);
    assert!(rest["nextCursor"].is_null());
}

#[tokio::test]
async fn a_receiver_that_hangs_does_not_slow_retries() {
    const SESSIONS: usize = 12;
    let receiver = MerchantReceiver::start().await;
    receiver.answer_always(Answer::Hang(Duration::from_secs(60)));
    let mut options = options(&receiver, &[secret(8)], "1s");
    // The contract's timeout: each try hangs for 10 s.
    options
        .vars
        .retain(|(k, _)| *k != "PAYRETRY_MERCHANT_WEBHOOK_TIMEOUT");
    let app = TestApp::spawn_with(options).await;
    let buyer = app.buyer();
    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        ids.push(app.declined_session(&buyer).await.id);
    }
    // The failure events are out, and every one of them is hanging.
    receiver
        .wait_until("the failure events sent", WAIT, |r| r.len() >= SESSIONS)
        .await;
    let mut latencies = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let asked = Instant::now();
        assert_eq!(app.retry(&buyer, id, &format!("h{n}")).await.status(), 202);
        latencies.push((asked, id));
    }
    let mut waited = Vec::new();
    for (asked, id) in latencies {
        app.wait_for_status(id, "open").await;
        waited.push(asked.elapsed());
    }
    // Every retry got its checkout while the receiver had not answered a single try: the
    // retry flow never waited on it.
    assert_eq!(receiver.answered(), 0, "a try ended before the retries did");
    waited.sort();
    eprintln!(
        "retry accepted → checkout open with a hanging receiver: median {:?}, max {:?} (delay 1 s)",
        waited[waited.len() / 2],
        waited[waited.len() - 1]
    );
}

#[tokio::test]
async fn events_are_delivered_from_postgres_with_the_same_fields() {
    let receiver = MerchantReceiver::start().await;
    let secrets = [secret(9)];
    let mut options = options(&receiver, &secrets, "1s");
    options.database = Database::Postgres;
    let app = TestApp::spawn_with(options).await;
    let buyer = app.buyer();
    let id = app.declined_session(&buyer).await.id;
    assert_eq!(app.retry(&buyer, &id, "pg1").await.status(), 202);
    app.wait_for_status(&id, "open").await;
    let received = receiver.wait_for_accepted(3, WAIT).await;
    verify_with_reference_library(&received, &[&secrets[0]]);
    let events = events_of(&received, &id);
    assert_eq!(
        types(&events),
        [
            "payment_session.failed",
            "payment_session.retry_scheduled",
            "payment_session.retry_ready"
        ]
    );
    assert_envelopes(&events, "buyer-1");
    assert_eq!(distinct_accepted(&received), 3);
}

/// The delivered count in a process's `/metrics`.
async fn delivered_by(base: &str) -> u64 {
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("payments_webhook_delivery_count{outcome=\"delivered\"} ")
                .map(|n| n.parse().unwrap())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn two_relay_processes_on_postgres_deliver_each_event_once() {
    const EVENTS: usize = 60;
    let receiver = MerchantReceiver::start().await;
    // Each answer takes half a second: one relay (16 tries at a time) cannot take the whole
    // backlog before the other looks.
    receiver.answer_always(Answer::Slow(Duration::from_millis(500)));
    let secrets = [secret(10)];
    let mut options = options(&receiver, &secrets, "1s");
    options.database = Database::Postgres;
    options.role = payretry::app::ServeRole::Api;
    let vars = options.vars.clone();
    let app = TestApp::spawn_with(options).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    env.extend([
        ("PAYRETRY_DATABASE_URL".to_owned(), app.db.url.clone()),
        (
            "STRIPE_WEBHOOK_SECRET".to_owned(),
            crate::support::app::WEBHOOK_SECRET.to_owned(),
        ),
        (
            "PAYRETRY_JWT_SECRET".to_owned(),
            crate::support::app::JWT_SECRET.to_owned(),
        ),
    ]);
    let mut other = crate::support::process::ServeProcess::spawn(
        env!("CARGO_BIN_EXE_payretry"),
        &["serve", "--role", "api"],
        &env,
        dir.path(),
        "second-relay",
    );
    other.wait_ready().await;

    let buyer = app.buyer();
    let mut ids = Vec::new();
    for _ in 0..EVENTS {
        ids.push(app.declined_session(&buyer).await.id);
    }
    let received = receiver
        .wait_for_accepted(EVENTS, Duration::from_secs(60))
        .await;
    verify_with_reference_library(&received, &[&secrets[0]]);
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for r in &received {
        *copies.entry(r.id.as_str()).or_default() += 1;
    }
    assert_eq!(copies.len(), EVENTS);
    assert!(
        copies.values().all(|n| *n == 1),
        "an event was delivered twice: {copies:?}"
    );
    for id in &ids {
        assert!(copies.contains_key(format!("msg_{id}_1").as_str()), "{id}");
    }
    // The receiver records a try when it arrives; its relay counts it once answered.
    let deadline = Instant::now() + WAIT;
    let split = loop {
        let split = (
            delivered_by(&app.base).await,
            delivered_by(&other.base).await,
        );
        if split.0 + split.1 >= EVENTS as u64 || Instant::now() > deadline {
            break split;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(split.0 + split.1, EVENTS as u64, "{split:?}");
    assert!(
        split.0 > 0 && split.1 > 0,
        "both relays delivered: {split:?}"
    );
}

#[tokio::test]
async fn without_a_receiver_no_delivery_rows_pile_up() {
    let app = TestApp::spawn().await;
    let buyer = app.buyer();
    let id = app.declined_session(&buyer).await.id;
    assert_eq!(app.retry(&buyer, &id, "n1").await.status(), 202);
    app.wait_for_status(&id, "open").await;
    assert_eq!(
        app.count("SELECT COUNT(*) FROM webhook_deliveries").await,
        0
    );
    assert_eq!(
        app.count("SELECT MAX(event_sequence) FROM payment_sessions")
            .await,
        0
    );
}
