//! Segment analytics through the real path: the analytics outbox, the relay, and a local
//! HTTP server standing in for Segment's `/v1/batch`.

use crate::support::app::{Options, TestApp};
use crate::support::fake_segment::FakeSegment;
use serde_json::Value;
use std::collections::HashSet;
use std::time::Duration;

const WRITE_KEY: &str = "segment-write-key-test";

/// Drives fail → retry → fail → retry → success, then the limit on a second session.
async fn run_story(app: &TestApp) -> (String, String) {
    let buyer = app.buyer();
    let id = app.declined_session(&buyer).await.id;
    assert_eq!(app.retry(&buyer, &id, "s1").await.status(), 202);
    app.wait_for_status(&id, "open").await;
    app.decline(&id, 1, "card_declined").await;
    assert_eq!(app.retry(&buyer, &id, "s2").await.status(), 202);
    let open = app.wait_for_status(&id, "open").await;
    app.pay(&id, 2, open["providerSessionId"].as_str().unwrap())
        .await;

    let other = app.token("buyer-2", payretry_domain::Role::Buyer);
    let exhausted = app.open_session(&other).await.id;
    app.decline(&exhausted, 0, "do_not_honor").await;
    for attempt in 1..=3 {
        assert_eq!(
            app.retry(&other, &exhausted, &format!("x{attempt}"))
                .await
                .status(),
            202
        );
        app.wait_for_status(&exhausted, "open").await;
        app.decline(&exhausted, attempt, "do_not_honor").await;
    }
    (id, exhausted)
}

async fn wait_for_events(segment: &FakeSegment, n: usize) -> Vec<Value> {
    for _ in 0..200 {
        let events = segment.accepted_events();
        if events.len() >= n {
            tokio::time::sleep(Duration::from_millis(300)).await;
            return segment.accepted_events();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("only {} events arrived", segment.accepted_events().len());
}

fn options(segment: &FakeSegment) -> Options {
    Options {
        vars: vec![
            ("PAYRETRY_RETRY_DELAYS", "1s".to_owned()),
            ("PAYRETRY_SEGMENT_WRITE_KEY", WRITE_KEY.to_owned()),
            ("PAYRETRY_SEGMENT_ENDPOINT", segment.base_url.clone()),
        ],
        ..Options::default()
    }
}

#[tokio::test]
async fn retry_events_reach_segment_in_batches_with_the_contract_shape() {
    let segment = FakeSegment::start().await;
    let app = TestApp::spawn_with(options(&segment)).await;
    let (paid, exhausted) = run_story(&app).await;

    // paid: 2 scheduled, 2 initiated, 2 completed. exhausted: 3 + 3 + 3 completed + 1 abandoned.
    let events = wait_for_events(&segment, 16).await;
    assert_eq!(events.len(), 16, "{events:#?}");
    let expected_auth = format!("Basic {}", base64_of(&format!("{WRITE_KEY}:")));
    for call in segment.calls() {
        assert_eq!(call.authorization.as_deref(), Some(expected_auth.as_str()));
        let batch = call.body["batch"].as_array().unwrap();
        assert!(!batch.is_empty() && batch.len() <= 100);
    }
    let ids: HashSet<&str> = events
        .iter()
        .map(|e| e["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), events.len(), "messageIds are unique");
    for e in &events {
        assert_eq!(e["type"], "track");
        assert!(
            e["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{e}"
        );
        assert!(e["properties"]["paymentSessionId"].is_string());
        assert!(e["properties"]["attemptNumber"].is_u64());
    }
    let of = |session: &str, name: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["properties"]["paymentSessionId"] == session && e["event"] == name)
            .collect()
    };
    assert!(
        of(&paid, "payments.retry.scheduled")
            .iter()
            .all(|e| e["userId"] == "buyer-1")
    );
    let scheduled = of(&paid, "payments.retry.scheduled");
    assert_eq!(scheduled.len(), 2);
    assert_eq!(
        scheduled[0]["properties"]["failureReason"],
        "insufficient_funds"
    );
    assert_eq!(
        scheduled[0]["properties"]["delayMinutes"].as_f64(),
        Some(1.0 / 60.0)
    );
    assert_eq!(of(&paid, "payments.retry.initiated").len(), 2);
    let completed = of(&paid, "payments.retry.completed");
    let outcomes: Vec<(u64, bool)> = completed
        .iter()
        .map(|e| {
            (
                e["properties"]["attemptNumber"].as_u64().unwrap(),
                e["properties"]["success"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(outcomes, [(1, false), (2, true)]);
    let abandoned = of(&exhausted, "payments.retry.abandoned");
    assert_eq!(abandoned.len(), 1);
    assert_eq!(abandoned[0]["properties"]["reason"], "attempts_exhausted");
    assert!(
        of(&exhausted, "payments.retry.scheduled")
            .iter()
            .all(|e| e["userId"] == "buyer-2")
    );
    assert_eq!(
        app.settled_count("SELECT COUNT(*) FROM analytics_events", 0)
            .await,
        0,
        "delivered rows are deleted"
    );
}

#[tokio::test]
async fn an_outage_at_segment_loses_and_duplicates_nothing() {
    let segment = FakeSegment::start().await;
    segment.fail_next(5);
    let app = TestApp::spawn_with(options(&segment)).await;
    run_story(&app).await;

    let events = wait_for_events(&segment, 16).await;
    assert!(
        segment.calls().iter().filter(|c| !c.accepted).count() == 5,
        "the outage was seen"
    );
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e["messageId"].as_str().unwrap())
        .collect();
    let unique: HashSet<&&str> = ids.iter().collect();
    assert_eq!(ids.len(), 16, "every event delivered");
    assert_eq!(unique.len(), 16, "none delivered twice");
}

#[tokio::test]
async fn without_a_write_key_no_analytics_rows_pile_up() {
    let app = TestApp::spawn().await;
    run_story(&app).await;
    assert_eq!(app.count("SELECT COUNT(*) FROM analytics_events").await, 0);
}

fn base64_of(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = text.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
