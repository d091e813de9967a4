//! S2p, the second PostgreSQL ceiling: payretry's own retry transition (the one statement
//! `postgres.rs` sends for it) run by `pgbench` on payretry's schema, as S2 runs its three
//! bare writes. (b) ÷ S2p is what the service around the SQL costs; S2p ÷ S2 is what
//! payretry's SQL volume costs (more rows, more indexes, the idempotent response).
//!
//! The statement is built by payretry's code (`retry_transition`, then the PostgreSQL plan
//! with every argument written as a literal), from a seeded session as (b) seeds them. Only
//! what must vary per transaction is replaced: the session (each client takes its own
//! sessions, so no two clients ever race for one), the idempotency key (a fresh UUID, as each
//! request of (b) has its own), and the compare-and-set's expected version (the row's own, so
//! the transition always applies: in PostgreSQL 15 a client whose statement fails stops).

use crate::db::{self, Batch};
use crate::limits::{percentiles, which};
use crate::scenarios::BUYER;
use crate::{Opts, log};
use payretry::service::retry::retry_transition;
use payretry::storage::postgres::PostgresStorage;
use payretry::storage::{IdempotencyScope, LiteralArg, SessionStore, Storage};
use payretry_domain::{PaymentSessionId, Principal, RetryPolicy, Role, UserId};
use serde::Serialize;
use std::process::Command;

#[derive(Debug, Clone, Serialize)]
pub struct S2pBench {
    pub tps: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub clients: u64,
    pub seconds: u64,
    pub sessions: u64,
    /// The statement's length, and how many writes it combines.
    pub statement_chars: usize,
    pub writes: usize,
    /// pgbench's failed transactions (must be 0: every client ran to the end).
    pub failed: u64,
}

/// A version no seeded session has: its literal is replaced by the row's own `version`.
const VERSION_MARK: i64 = 987_654_321_012;
/// The idempotency key's literal is replaced by a fresh UUID per transaction.
const KEY_MARK: &str = "s2p-key-mark";
const TAG: &str = "s2p";

pub async fn run(
    opts: &Opts,
    sessions: u64,
    seconds: u64,
    clients: u64,
) -> anyhow::Result<S2pBench> {
    let name = "payretry_bench_s2p";
    let url = db::fresh_pg(&opts.pg_admin, name).await?;
    let result = measure(opts, &url, sessions, seconds, clients).await;
    db::drop_pg(&opts.pg_admin, name).await;
    result
}

async fn measure(
    opts: &Opts,
    url: &str,
    sessions: u64,
    seconds: u64,
    clients: u64,
) -> anyhow::Result<S2pBench> {
    let storage = PostgresStorage::connect(url, 2).await?;
    storage.migrate().await?;
    let batch = Batch {
        tag: TAG,
        count: sessions,
        buyer: BUYER,
        scheduled: false,
        run_at_ms: 0,
        per_second: 1,
        jobs: false,
    };
    db::insert_pg(url, &batch).await?;
    let script = script(&storage, clients, sessions).await?;
    let writes = script.matches(" AS (").count();
    // Kept beside the report: what S2p ran.
    let path = opts.out.join("s2p.sql");
    std::fs::write(&path, &script)?;
    let logs = opts.work.join("s2p-logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)?;
    let pgbench = which("pgbench").ok_or_else(|| anyhow::anyhow!("pgbench not found on PATH"))?;
    let (user, database, host, port) = pg_target(url);
    let out = Command::new(pgbench)
        .args(["-n", "-M", "prepared", "-l"])
        .arg(format!("--log-prefix={}/s2p", logs.display()))
        .args(["-T", &seconds.to_string(), "-c", &clients.to_string()])
        .args(["-j", &clients.min(2).to_string(), "-f"])
        .arg(&path)
        .args(["-U", &user, "-h", &host, "-p", &port, &database])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "pgbench failed on S2p: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| -> Option<f64> {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split(|c: char| c.is_whitespace() || c == '/').next())
            .and_then(|v| v.parse().ok())
    };
    let tps = field("tps = ").ok_or_else(|| anyhow::anyhow!("pgbench printed no tps: {stdout}"))?;
    let failed = field("number of failed transactions: ").unwrap_or(0.0) as u64;
    // The statement did the retry's work: one job queued per transaction.
    let processed = field("number of transactions actually processed: ").unwrap_or(0.0) as i64;
    let jobs = db::pg_count(url, "SELECT count(*) FROM retry_jobs").await?;
    anyhow::ensure!(
        processed > 0 && jobs == processed,
        "S2p ran {processed} transactions but queued {jobs} jobs"
    );
    let latency = percentiles(&logs, "s2p");
    let _ = std::fs::remove_dir_all(&logs);
    log(&format!(
        "  S2p: {tps:.0} tps, p99 {:.2} ms, {writes} writes in one statement of {} chars",
        latency.map_or(f64::NAN, |l| l.1),
        script.len()
    ));
    Ok(S2pBench {
        tps,
        p50_ms: latency.map(|l| l.0),
        p99_ms: latency.map(|l| l.1),
        clients,
        seconds,
        sessions,
        statement_chars: script.len(),
        writes,
        failed,
    })
}

/// The pgbench script: session `n` of this client's share, then the retry statement.
async fn script(storage: &PostgresStorage, clients: u64, sessions: u64) -> anyhow::Result<String> {
    let first = db::session_id(TAG, 0);
    let mut session = storage
        .session(&PaymentSessionId::parse(&first)?)
        .await?
        .ok_or_else(|| anyhow::anyhow!("seeded session {first} not found"))?;
    session.version = VERSION_MARK;
    let caller = Principal {
        user: UserId::new(BUYER),
        role: Role::Buyer,
    };
    let scope = IdempotencyScope {
        caller: caller.user.clone(),
        key: KEY_MARK.into(),
        // A SHA-256 in hex, as the HTTP layer computes it.
        fingerprint: "f".repeat(64),
    };
    let now = payretry::service::now_millis();
    let (mut transition, _) = retry_transition(
        &RetryPolicy::default(),
        false,
        &session,
        &caller,
        &scope,
        now,
    )
    .map_err(|e| anyhow::anyhow!("the seeded session refused a retry: {e:?}"))?;
    // As in (b): no Segment key, so no analytics rows.
    transition.analytics.clear();
    let sql =
        payretry::storage::postgres_transition_sql(&transition, now, |arg| literal(arg, &first))?;
    Ok(format!(
        "\\set n :client_id + {clients} * random(0, {})\n{sql};\n",
        sessions / clients - 1
    ))
}

/// `arg` as SQL text for pgbench. Strings are escape strings with `:` written as `\x3a`:
/// pgbench would take `:name` (or `:12`) anywhere in the text for one of its variables.
fn literal(arg: LiteralArg<'_>, session: &str) -> String {
    match arg {
        LiteralArg::Null => "NULL".into(),
        LiteralArg::Int(VERSION_MARK) => "version".into(),
        LiteralArg::Int(n) => n.to_string(),
        LiteralArg::Bytes(bytes) => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!("'\\x{hex}'::bytea")
        }
        LiteralArg::Text(KEY_MARK) => "gen_random_uuid()::text".into(),
        LiteralArg::Text(text) => {
            let this_session = format!("('ps_{TAG}_' || (:n)::text)");
            if !text.contains(session) {
                return escape(text);
            }
            // "a<s>b" becomes (E'a' || <s> || E'b').
            let mut pieces = Vec::new();
            for (n, part) in text.split(session).enumerate() {
                if n > 0 {
                    pieces.push(this_session.clone());
                }
                if !part.is_empty() {
                    pieces.push(escape(part));
                }
            }
            format!("({})", pieces.join(" || "))
        }
    }
}

fn escape(text: &str) -> String {
    let body = text
        .replace('\\', "\\\\")
        .replace('\'', "\\'")
        .replace(':', "\\x3a");
    format!("E'{body}'")
}

/// User, database, socket directory (or host) and port of `url`, for pgbench's options.
fn pg_target(url: &str) -> (String, String, String, String) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, database) = path.split_once('/').unwrap_or((path, "postgres"));
    let (user, address) = authority.split_once('@').unwrap_or(("postgres", authority));
    let (host, port) = address.split_once(':').unwrap_or((address, "5432"));
    let host = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("host="))
        .unwrap_or(host);
    (user.into(), database.into(), host.into(), port.into())
}
