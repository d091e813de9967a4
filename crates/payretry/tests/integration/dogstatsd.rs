//! DogStatsD datagrams of a full fail → retry → fail → retry → success flow, received on a
//! real UDP socket.
//!
//! The metrics recorder is process-wide and the first app a process builds installs it: this
//! test needs a process of its own. cargo-nextest gives every test one; under `cargo test`
//! run it alone (`cargo test -p payretry --test integration -- dogstatsd::`, as
//! scripts/test.sh does).

use crate::support::app::{Options, TestApp};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::net::UdpSocket;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_flow_emits_the_contract_metrics_over_udp() {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap().to_string();
    let app = TestApp::spawn_with(Options {
        vars: vec![
            ("PAYRETRY_RETRY_DELAYS", "1s".to_owned()),
            ("PAYRETRY_DOGSTATSD_ADDR", addr),
        ],
        ..Options::default()
    })
    .await;
    let buyer = app.buyer();
    let id = app.declined_session(&buyer).await.id;
    assert_eq!(app.retry(&buyer, &id, "k1").await.status(), 202);
    app.wait_for_status(&id, "open").await;
    app.decline(&id, 1, "card_declined").await;
    assert_eq!(app.retry(&buyer, &id, "k2").await.status(), 202);
    let open = app.wait_for_status(&id, "open").await;
    app.pay(&id, 2, open["providerSessionId"].as_str().unwrap())
        .await;

    let mut lines = BTreeSet::new();
    let mut buf = vec![0u8; 65_536];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < deadline {
        let wanted = [
            "attempt_count",
            "failure_count",
            "success_rate",
            "schedule_lag_seconds",
        ];
        if wanted
            .iter()
            .all(|w| lines.iter().any(|l: &String| l.contains(w)))
            && lines.iter().filter(|l| l.contains("success_rate")).count() >= 2
        {
            break;
        }
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await
        {
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                lines.insert(line.to_owned());
            }
        }
    }
    // Counters are flushed as deltas: an interval with no change sends `:0|c`, skipped here.
    let find = |name: &str| -> Vec<&String> {
        lines
            .iter()
            .filter(|l| {
                l.starts_with(&format!("{name}:")) && !l.starts_with(&format!("{name}:0|c"))
            })
            .collect()
    };
    let value = |line: &str| -> f64 {
        line.split(':')
            .nth(1)
            .and_then(|v| v.split('|').next())
            .unwrap()
            .parse()
            .unwrap()
    };
    let tags = |line: &str| -> BTreeSet<String> {
        line.split("|#")
            .nth(1)
            .map(|t| t.split(',').map(str::to_owned).collect())
            .unwrap_or_default()
    };

    let attempts = find("payments.retry.attempt_count");
    assert!(attempts.iter().all(|l| l.contains("|c")), "{attempts:?}");
    let attempt_tags: Vec<_> = attempts.iter().map(|l| tags(l)).collect();
    assert!(
        attempt_tags.contains(&BTreeSet::from([
            "retry_attempt:1".to_owned(),
            "failure_reason:insufficient_funds".to_owned()
        ])),
        "{lines:?}"
    );
    assert!(
        attempt_tags.contains(&BTreeSet::from([
            "retry_attempt:2".to_owned(),
            "failure_reason:card_declined".to_owned()
        ])),
        "{lines:?}"
    );

    let failures = find("payments.retry.failure_count");
    assert_eq!(failures.len(), 1, "{lines:?}");
    assert!(failures[0].contains("|c"));
    assert_eq!(value(failures[0]), 1.0);
    assert_eq!(
        tags(failures[0]),
        BTreeSet::from([
            "retry_attempt:1".to_owned(),
            "failure_reason:card_declined".to_owned()
        ])
    );

    let rates = find("payments.retry.success_rate");
    assert!(rates.iter().all(|l| l.contains("|d")), "{rates:?}");
    let rate_1 = rates
        .iter()
        .find(|l| tags(l).contains("retry_attempt:1"))
        .expect("attempt 1 finished");
    assert_eq!(value(rate_1), 0.0, "{rate_1}");
    let rate_2 = rates
        .iter()
        .find(|l| tags(l).contains("retry_attempt:2"))
        .expect("attempt 2 finished");
    assert_eq!(value(rate_2), 1.0, "{rate_2}");

    let lag = find("payments.retry.schedule_lag_seconds");
    assert!(
        !lag.is_empty() && lag.iter().all(|l| l.contains("|d")),
        "{lag:?}"
    );

    // The same flow, as Prometheus sees it at /metrics (dots become underscores).
    let text = app
        .request(reqwest::Method::GET, "/metrics", None, None, None)
        .await
        .text()
        .await
        .unwrap();
    let sample = |name: &str, labels: &[&str]| -> Option<f64> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .find(|l| labels.iter().all(|label| l.contains(label)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    assert_eq!(
        sample(
            "payments_retry_attempt_count",
            &[
                r#"retry_attempt="1""#,
                r#"failure_reason="insufficient_funds""#
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            "payments_retry_attempt_count",
            &[r#"retry_attempt="2""#, r#"failure_reason="card_declined""#]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            "payments_retry_failure_count",
            &[r#"retry_attempt="1""#, r#"failure_reason="card_declined""#]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample("payments_retry_success_rate_sum", &[r#"retry_attempt="2""#]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            "payments_retry_success_rate_count",
            &[r#"retry_attempt="1""#]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample("payments_retry_schedule_lag_seconds_count", &[]),
        Some(2.0),
        "{text}"
    );
}
