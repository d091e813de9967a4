//! PostgreSQL restarted under load: payretry answers 503 (never a half-applied write) while
//! the database is away, `/readyz` says so, and it recovers within 5 seconds of the database
//! coming back.
//!
//! This test restarts the machine's PostgreSQL server, so it must not share the server with
//! other tests: scripts/test.sh leaves it out of the parallel run and runs it on its own.
//! Set `PAYRETRY_TEST_RESTART_POSTGRES` to the command that stops and restarts the server
//! (default: `pg_ctlcluster … stop`, two seconds down, `pg_ctlcluster … start`).

mod support;

use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::app::{Database, Options, Queue, TestApp};

fn restart_postgres() {
    let command = std::env::var("PAYRETRY_TEST_RESTART_POSTGRES").unwrap_or_else(|_| {
        let version = std::fs::read_dir("/etc/postgresql")
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .expect("no /etc/postgresql/<version>: set PAYRETRY_TEST_RESTART_POSTGRES");
        // Stop, stay down for two seconds (an outage, not a blink), start again.
        let ctl = format!("pg_ctlcluster --skip-systemctl-redirect {version} main");
        format!("{ctl} stop -m fast && sleep 2 && {ctl} start")
    });
    let status = std::process::Command::new("sh")
        .args(["-c", &command])
        .status()
        .expect("run the restart command");
    assert!(status.success(), "`{command}` failed: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payretry_recovers_from_a_postgresql_restart_under_load_with_nothing_half_applied() {
    let app = Arc::new(
        TestApp::spawn_with(Options {
            vars: vec![
                ("PAYRETRY_RATE_LIMIT_PER_MINUTE", "1000000".into()),
                ("PAYRETRY_RETRY_DELAYS", "60s".into()),
            ],
            // The provider (a stand-in for Stripe) stays up: only the database goes away.
            stripe: true,
            ..Options::on(Database::Postgres, Queue::Embedded)
        })
        .await,
    );
    let buyer = app.buyer();

    // Load: buyers keep creating checkouts while the database restarts.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for worker in 0..4 {
        let (app, stop, buyer) = (app.clone(), stop.clone(), buyer.clone());
        load.push(tokio::spawn(async move {
            let (mut created, mut statuses) = (Vec::new(), BTreeSet::new());
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let response = app
                    .request(
                        Method::POST,
                        "/payments/checkout",
                        Some(&buyer),
                        Some(&format!("load-{worker}-{n}")),
                        Some(json!({"amount": 100 + n, "currency": "usd"})),
                    )
                    .await;
                let status = response.status().as_u16();
                statuses.insert(status);
                match status {
                    201 => created.push(
                        response.json::<Value>().await.unwrap()["sessionId"]
                            .as_str()
                            .unwrap()
                            .to_owned(),
                    ),
                    503 => {
                        let body: Value = response.json().await.unwrap();
                        assert_eq!(body["code"], "unavailable", "{body}");
                    }
                    other => panic!("unexpected {other} during the restart"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (created, statuses)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The restart, observed from /readyz.
    let watcher = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut seen_503 = false;
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let status = app
                    .request(Method::GET, "/readyz", None, None, None)
                    .await
                    .status()
                    .as_u16();
                seen_503 |= status == 503;
                tokio::time::sleep(Duration::from_millis(25)).await;
                if seen_503 && status == 200 {
                    return (true, Instant::now());
                }
            }
            (seen_503, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::task::spawn_blocking(restart_postgres).await.unwrap();
    let back_at = Instant::now();
    let (saw_503, ready_again_at) = watcher.await.unwrap();

    // Recovery: within 5 s of the database being back, writes succeed again.
    let deadline = back_at + Duration::from_secs(5);
    let mut recovered_at = None;
    while Instant::now() < deadline {
        let probe = app
            .request(
                Method::POST,
                "/payments/checkout",
                Some(&buyer),
                None,
                Some(json!({"amount": 100, "currency": "usd"})),
            )
            .await;
        if probe.status() == 201 {
            recovered_at = Some(Instant::now());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut created = Vec::new();
    let mut statuses = BTreeSet::new();
    for task in load {
        let (c, s) = task.await.unwrap();
        created.extend(c);
        statuses.extend(s);
    }

    assert!(saw_503, "/readyz answered 503 while the database was away");
    assert!(
        recovered_at.is_some(),
        "no write succeeded within 5 s of the restart (statuses {statuses:?})"
    );
    assert!(ready_again_at <= back_at + Duration::from_secs(5) || recovered_at.is_some());
    // Nothing half-applied: every session has its first attempt and its audit entry, and
    // every 201 the buyers saw is a complete session.
    let sessions = app.count("SELECT COUNT(*) FROM payment_sessions").await;
    let attempts = app
        .count("SELECT COUNT(*) FROM payment_attempts WHERE attempt_number = 0")
        .await;
    let audits = app
        .count("SELECT COUNT(*) FROM audit_log WHERE action = 'checkout_created'")
        .await;
    assert_eq!((attempts, audits), (sessions, sessions));
    for id in &created {
        let status = app.status(&buyer, id).await;
        assert_eq!(status["status"], "open", "{id}");
    }
    assert!(created.len() as i64 <= sessions);
}
