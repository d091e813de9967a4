//! Test data written straight into payretry's tables (after its own migrations ran): failed
//! sessions for the retry endpoint, scheduled sessions with due jobs for the worker.

use sqlx::{AssertSqlSafe, Connection, Executor};

/// The URL of database `name` on the server of `admin_url` (same user, host and options).
pub fn pg_url(admin_url: &str, name: &str) -> String {
    let (path, query) = admin_url
        .split_once('?')
        .map_or((admin_url, None), |(p, q)| (p, Some(q)));
    let base = path.rsplit_once('/').map_or(path, |(b, _)| b);
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// Database `name` on the server of `admin_url`, created afresh; returns its URL.
pub async fn fresh_pg(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let mut admin = sqlx::PgConnection::connect(admin_url).await?;
    admin
        .execute(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await?;
    admin
        .execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await?;
    admin.close().await?;
    Ok(pg_url(admin_url, name))
}

pub async fn drop_pg(admin_url: &str, name: &str) {
    if let Ok(mut admin) = sqlx::PgConnection::connect(admin_url).await {
        let _ = admin
            .execute(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .await;
    }
}

/// Which tables the run read by sequential scan, from PostgreSQL's statistics: a scan on a
/// hot path shows up here (rows read per table, most first).
pub async fn seq_scans(url: &str) -> anyhow::Result<String> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT relname::text, COALESCE(seq_scan, 0), COALESCE(seq_tup_read, 0)
         FROM pg_stat_user_tables WHERE seq_scan > 0 ORDER BY seq_tup_read DESC LIMIT 5",
    )
    .fetch_all(&mut conn)
    .await?;
    Ok(rows
        .iter()
        .map(|(table, scans, read)| format!("{table}: {scans} scans, {read} rows"))
        .collect::<Vec<_>>()
        .join("; "))
}

/// What to insert: `count` sessions `ps_{tag}_{n}`.
pub struct Batch<'a> {
    pub tag: &'a str,
    pub count: u64,
    pub buyer: &'a str,
    /// `failed` sessions with no job, or `retry_scheduled` ones with a job each.
    pub scheduled: bool,
    /// Job n is due at `run_at_ms + n * 1000 / per_second` (ms since the epoch).
    pub run_at_ms: i64,
    pub per_second: u64,
    /// Also write the `retry_jobs` rows (not for apalis, which has its own queue).
    pub jobs: bool,
}

pub fn session_id(tag: &str, n: u64) -> String {
    format!("ps_{tag}_{n}")
}

pub fn checkout_id(tag: &str, n: u64) -> String {
    format!("cs_{tag}_{n}")
}

fn statements(b: &Batch, pg: bool) -> Vec<String> {
    let now = chrono::Utc::now().timestamp_millis();
    let expires = now + 23 * 3600 * 1000;
    let (status, attempts, next) = if b.scheduled {
        ("retry_scheduled", 1, "run_at")
    } else {
        ("failed", 0, "NULL")
    };
    let series = if pg {
        format!("SELECT g AS n FROM generate_series(0, {}) g", b.count - 1)
    } else {
        format!(
            "WITH RECURSIVE s(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM s WHERE n + 1 < {}) SELECT n FROM s",
            b.count
        )
    };
    let run_at = format!("({} + (n * 1000) / {})", b.run_at_ms, b.per_second.max(1));
    let iso = if pg {
        format!(
            "to_char(to_timestamp({run_at} / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    } else {
        format!("strftime('%Y-%m-%dT%H:%M:%fZ', {run_at} / 1000.0, 'unixepoch')")
    };
    let tag = b.tag;
    let buyer = b.buyer;
    let mut out = vec![format!(
        "INSERT INTO payment_sessions (id, buyer_id, status, amount, currency, description,
            metadata, failure_reason, retry_attempts, last_retry_at, retry_reason, next_retry_at,
            current_attempt, provider_session_id, checkout_url, expires_at, created_at,
            updated_at, version)
         SELECT 'ps_{tag}_' || n, '{buyer}', '{status}', 2500, 'usd', 'Order ' || n, '{{}}',
            'insufficient_funds', {attempts}, {last}, {reason}, {next}, 0,
            'cs_{tag}_' || n, 'http://127.0.0.1/pay/cs_{tag}_' || n, {expires}, {now}, {now}, 1
         FROM (SELECT n, {run_at} AS run_at FROM ({series}) q) s",
        last = if b.scheduled {
            now.to_string()
        } else {
            "NULL".into()
        },
        reason = if b.scheduled {
            "'insufficient_funds'"
        } else {
            "NULL"
        },
    )];
    out.push(format!(
        "INSERT INTO payment_attempts (session_id, attempt_number, status, provider_session_id,
            failure_reason, created_at, updated_at)
         SELECT 'ps_{tag}_' || n, 0, 'failed', 'cs_{tag}_' || n, 'insufficient_funds', {now}, {now}
         FROM ({series}) q"
    ));
    if b.scheduled {
        out.push(format!(
            "INSERT INTO payment_attempts (session_id, attempt_number, status, scheduled_for,
                created_at, updated_at)
             SELECT 'ps_{tag}_' || n, 1, 'scheduled', {run_at}, {now}, {now} FROM ({series}) q"
        ));
    }
    if b.scheduled && b.jobs {
        out.push(format!(
            "INSERT INTO retry_jobs (session_id, attempt_number, payload, run_at, created_at)
             SELECT 'ps_{tag}_' || n, 1,
                '{{\"paymentSessionId\":\"ps_{tag}_' || n || '\",\"attemptNumber\":1,\"delaySeconds\":60,\"delayMinutes\":1,\"scheduledFor\":\"' || {iso} || '\",\"enqueuedAt\":\"' || {iso} || '\"}}',
                {run_at}, {now}
             FROM ({series}) q"
        ));
    }
    out
}

pub async fn insert_pg(url: &str, b: &Batch<'_>) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let mut tx = conn.begin().await?;
    for sql in statements(b, true) {
        tx.execute(AssertSqlSafe(sql)).await?;
    }
    tx.commit().await?;
    conn.execute("VACUUM ANALYZE").await?;
    Ok(())
}

pub async fn insert_sqlite(path: &std::path::Path, b: &Batch<'_>) -> anyhow::Result<()> {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(std::time::Duration::from_secs(30));
    let mut conn = sqlx::SqliteConnection::connect_with(&options).await?;
    let mut tx = conn.begin().await?;
    for sql in statements(b, false) {
        tx.execute(AssertSqlSafe(sql)).await?;
    }
    tx.commit().await?;
    conn.execute("ANALYZE").await?;
    Ok(())
}

pub async fn pg_count(url: &str, sql: &str) -> anyhow::Result<i64> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    Ok(sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql.to_owned()))
        .fetch_one(&mut conn)
        .await?)
}

pub async fn sqlite_count(path: &std::path::Path, sql: &str) -> anyhow::Result<i64> {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
    let mut conn = sqlx::SqliteConnection::connect_with(&options).await?;
    Ok(sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql.to_owned()))
        .fetch_one(&mut conn)
        .await?)
}
