//! (g) The provider budget under Stripe's real conditions: a stub that answers after 250 ms
//! and refuses with 429 past 100 requests a second (Stripe's live limit), a budget of 80
//! calls a second, and a backlog of jobs all due at once, drained by payretry processes (two
//! on PostgreSQL, one on the embedded default). What it shows (issue 14's targets): the
//! drain runs at the budget's rate, almost nothing is refused, and the rate limit costs no
//! job and no buyer's attempt.

use crate::db::{self, Batch};
use crate::scenarios::{BUYER, Child, stripe_env};
use crate::stub::Stub;
use crate::{Opts, log};
use serde::Serialize;
use std::time::{Duration, Instant};

/// Stripe's default live limit, and payretry's default budget under it.
pub const STRIPE_LIMIT: usize = 100;
pub const BUDGET: u32 = 80;
const LATENCY: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Serialize)]
pub struct BudgetBench {
    pub backend: String,
    pub processes: usize,
    pub jobs: u64,
    pub budget_rps: u32,
    /// From the moment every job was due to the last checkout created.
    pub seconds: f64,
    /// Requests the stub answered (creates, retrieves, expires) until then, and refused.
    pub calls: u64,
    pub refused: u64,
    pub created: u64,
    pub dead_letters: i64,
    /// Sessions whose attempt count moved past the one retry they were seeded with.
    pub attempts_spent: i64,
    /// Idempotency keys the stub saw succeed more than once (a repeated create).
    pub keys_created_twice: usize,
}

impl BudgetBench {
    pub fn calls_per_job(&self) -> f64 {
        self.calls as f64 / self.jobs as f64
    }

    /// (jobs/s × calls per job) ÷ budget: how much of the budget the drain used.
    pub fn budget_used(&self) -> f64 {
        self.calls as f64 / self.seconds / f64::from(self.budget_rps)
    }

    /// The last job's lateness ÷ (jobs × calls per job ÷ budget).
    pub fn lateness_ratio(&self) -> f64 {
        self.seconds / (self.calls as f64 / f64::from(self.budget_rps))
    }

    pub fn refused_share(&self) -> f64 {
        self.refused as f64 / (self.calls + self.refused) as f64
    }
}

pub async fn run(
    opts: &Opts,
    postgres: bool,
    processes: usize,
    jobs: u64,
) -> anyhow::Result<BudgetBench> {
    let backend = if postgres { "postgres" } else { "sqlite" };
    let db_name = "payretry_bench_budget";
    let path = opts.work.join("budget.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(opts.work.join(format!("budget.db{suffix}")));
    }
    let url = if postgres {
        db::fresh_pg(&opts.pg_admin, db_name).await?
    } else {
        format!("sqlite://{}", path.display())
    };
    let stub = Stub::realistic(LATENCY, STRIPE_LIMIT).await?;
    // The budget, and the jobs in flight payretry derives from it.
    let mut env = stripe_env(&stub);
    env.retain(|(k, _)| {
        !matches!(
            *k,
            "PAYRETRY_PROVIDER_MAX_RPS" | "PAYRETRY_WORKER_CONCURRENCY"
        )
    });
    env.push(("PAYRETRY_PROVIDER_MAX_RPS", BUDGET.to_string()));
    let mut children = Vec::new();
    for n in 0..processes {
        let mut child = Child::spawn(opts, &url, &env, &format!("budget-{backend}-{n}"))?;
        child.wait_ready(Duration::from_secs(30)).await?;
        children.push(child);
    }
    // Every job falls due now, and is visible to the workers once the batch commits.
    let due = chrono::Utc::now().timestamp_millis();
    let started = Instant::now();
    let batch = Batch {
        tag: "g",
        count: jobs,
        buyer: BUYER,
        scheduled: true,
        run_at_ms: due,
        per_second: 1_000_000,
        jobs: true,
    };
    if postgres {
        db::insert_pg(&url, &batch).await?;
    } else {
        db::insert_sqlite(&path, &batch).await?;
    }
    // Three calls a job at the budget's rate, with room to miss it by a factor of three.
    let limit = Duration::from_secs_f64(jobs as f64 * 3.0 / f64::from(BUDGET) * 3.0 + 60.0);
    while stub.creates() < jobs && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (creates, retrieves, expires) = stub.counts();
    let refused = stub.refused();
    for child in children {
        child.stop().await;
    }
    let count = async |sql: &str| -> anyhow::Result<i64> {
        if postgres {
            db::pg_count(&url, sql).await
        } else {
            db::sqlite_count(&path, sql).await
        }
    };
    let dead_letters = count("SELECT COUNT(*) FROM dead_letters").await?;
    let attempts_spent =
        count("SELECT COUNT(*) FROM payment_sessions WHERE retry_attempts <> 1").await?;
    if postgres {
        db::drop_pg(&opts.pg_admin, db_name).await;
    }
    let b = BudgetBench {
        backend: backend.into(),
        processes,
        jobs,
        budget_rps: BUDGET,
        seconds,
        calls: creates + retrieves + expires,
        refused,
        created: creates,
        dead_letters,
        attempts_spent,
        keys_created_twice: stub.keys_created_twice(),
    };
    log(&format!(
        "  budget {backend}, {processes} process(es): {}/{jobs} checkouts in {seconds:.1} s; {} calls ({:.2}/job: {creates} creates, {retrieves} retrieves, {expires} expires), {refused} refused (429); budget used {:.3}, last job {:.3} × its bound; {dead_letters} dead letters, {attempts_spent} attempts spent, {} keys created twice",
        b.created,
        b.calls,
        b.calls_per_job(),
        b.budget_used(),
        b.lateness_ratio(),
        b.keys_created_twice
    ));
    Ok(b)
}
