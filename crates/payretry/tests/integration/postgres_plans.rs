//! PostgreSQL plans that must stay index lookups however a table grew after the plan was
//! made: a deploy starts with an empty `idempotency_keys`, each connection prepares its
//! statements once, and a plan cached while the table was empty would scan it ever after.

use crate::support::services::TempDatabase;
use payretry::storage::{IdempotencyScope, IdempotencyStore};
use payretry_domain::{PaymentSessionId, UserId};
use std::time::{Duration, Instant};

fn scope(key: String) -> IdempotencyScope {
    IdempotencyScope {
        caller: UserId::new("buyer_1"),
        key,
        fingerprint: "POST /x {}".to_owned(),
    }
}

/// The retry's read, prepared by the only connection of the pool while `idempotency_keys` held
/// 50 rows, still reads it through its index once it holds 20 000.
#[tokio::test]
async fn the_retry_read_prepared_on_a_small_table_never_scans_it_grown() {
    let db = TempDatabase::postgres().await;
    let storage = db.postgres_storage(1).await;
    let id = PaymentSessionId::parse("ps_plans").expect("id");
    let now = chrono::Utc::now();
    // What autovacuum records minutes after a deploy: a table of a few rows on one page.
    db.execute(
        "INSERT INTO idempotency_keys (caller, idempotency_key, fingerprint, locked_at, created_at)
         SELECT 'buyer_1', 'early-' || g, 'f', 0, 0 FROM generate_series(1, 50) g",
    )
    .await;
    db.execute("ANALYZE idempotency_keys").await;
    // Past the five custom plans after which PostgreSQL may settle on a generic one.
    for n in 0..10 {
        storage
            .lookup_idempotent_with_session(&scope(format!("empty-{n}")), &id, now)
            .await
            .expect("lookup on the empty table");
    }
    db.execute(
        "INSERT INTO idempotency_keys (caller, idempotency_key, fingerprint, locked_at, created_at)
         SELECT 'buyer_1', 'k-' || g, 'f', 0, 0 FROM generate_series(1, 20000) g",
    )
    .await;
    for n in 0..200 {
        storage
            .lookup_idempotent_with_session(&scope(format!("k-{}", n * 97 + 1)), &id, now)
            .await
            .expect("lookup on the grown table");
    }
    // A backend writes its table statistics when it exits: close the pool and wait for it.
    drop(storage);
    let deadline = Instant::now() + Duration::from_secs(30);
    while db
        .count("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        .await
        > 0
    {
        assert!(Instant::now() < deadline, "the pool's connection did not close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let scanned = db
        .count(
            "SELECT COALESCE(seq_tup_read, 0) FROM pg_stat_user_tables
             WHERE relname = 'idempotency_keys'",
        )
        .await;
    let by_index = db
        .count(
            "SELECT COALESCE(idx_scan, 0) FROM pg_stat_user_tables
             WHERE relname = 'idempotency_keys'",
        )
        .await;
    assert_eq!(
        scanned, 0,
        "rows of idempotency_keys read by sequential scan"
    );
    assert!(
        by_index >= 200,
        "only {by_index} index scans of idempotency_keys"
    );
}
