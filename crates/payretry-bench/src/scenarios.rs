//! The scenarios of BENCHMARKS.md: (a)/(b) the retry endpoint of the real `payretry` binary,
//! (c) worker drain, (d) schedule lateness, (e) idle RSS and time to ready, (f) the same
//! drain on apalis.

use crate::db::{self, Batch};
use crate::load::{self, LoadResult, Target};
use crate::stub::Stub;
use crate::{Opts, log};
use payretry::app::{App, Tuning};
use payretry::config::Config;
use payretry::http::auth::JwtKeys;
use payretry::provider::stripe::StripeConfig;
use payretry::secret::Secret;
use payretry::worker::{Worker, WorkerSettings};
use payretry_domain::Role;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

pub const JWT_SECRET: &str = "payretry-bench-jwt-secret-of-at-least-32-chars";
pub const STRIPE_KEY: &str = "sk_test_payretrybench";
pub const WEBHOOK_SECRET: &str = "whsec_payretry_bench";
pub(crate) const BUYER: &str = "bench-buyer";

fn free_addr() -> anyhow::Result<std::net::SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// A running `payretry serve` child process.
pub struct Child {
    pub child: tokio::process::Child,
    pub addr: std::net::SocketAddr,
    pub started: Instant,
}

impl Child {
    pub fn spawn(
        opts: &Opts,
        database_url: &str,
        extra: &[(&str, String)],
        log_name: &str,
    ) -> anyhow::Result<Self> {
        let addr = free_addr()?;
        let log = std::fs::File::create(opts.work.join(format!("{log_name}.log")))?;
        let mut cmd = tokio::process::Command::new(&opts.payretry);
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PAYRETRY_LISTEN", addr.to_string())
            .env("PAYRETRY_DATABASE_URL", database_url)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let child = cmd.spawn()?;
        Ok(Self {
            child,
            addr,
            started,
        })
    }

    /// Polls `/readyz` until 200; returns the time since spawn.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("payretry exited early: {status}");
            }
            if ready(self.addr).await {
                return Ok(self.started.elapsed());
            }
            if Instant::now() > deadline {
                anyhow::bail!("payretry not ready after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SIGTERM: graceful shutdown, as an orchestrator would.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

async fn ready(addr: std::net::SocketAddr) -> bool {
    use http_body_util::{BodyExt, Empty};
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
    else {
        return false;
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = hyper::Request::get("/readyz")
        .header("host", addr.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .expect("request");
    match sender.send_request(request).await {
        Ok(r) => {
            let ok = r.status() == 200;
            let _ = r.into_body().collect().await;
            ok
        }
        Err(_) => false,
    }
}

/// (a)–(f) measure payretry against a zero-latency stub, not against Stripe's rate limit:
/// the provider budget is lifted out of the way, and a worker keeps the 16 jobs in flight
/// these scenarios were designed with (scenario (g) measures the budget).
const UNPACED: [(&str, &str); 2] = [
    ("PAYRETRY_PROVIDER_MAX_RPS", "10000"),
    ("PAYRETRY_WORKER_CONCURRENCY", "16"),
];

pub(crate) fn stripe_env(stub: &Stub) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("PAYRETRY_PROVIDER", "stripe".into()),
        // `serve` with Stripe needs the address buyers come back to; none come here.
        ("PAYRETRY_PUBLIC_URL", "https://pay.example.test".into()),
        ("STRIPE_API_BASE", stub.base.clone()),
        ("STRIPE_SECRET_KEY", STRIPE_KEY.into()),
        ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.into()),
        ("PAYRETRY_JWT_SECRET", JWT_SECRET.into()),
        ("PAYRETRY_RATE_LIMIT_PER_MINUTE", "1000000000".into()),
        // Retries are due in an hour: the worker has nothing to do during the run.
        ("PAYRETRY_RETRY_DELAYS", "1h".into()),
    ];
    env.extend(UNPACED.map(|(k, v)| (k, v.to_owned())));
    env
}

fn token() -> String {
    JwtKeys::new(&Secret::new(JWT_SECRET.to_owned())).issue(BUYER, Role::Buyer, 3600)
}

#[derive(Debug, Clone, Serialize)]
pub struct RetryBench {
    pub backend: String,
    pub closed: Vec<LoadResult>,
    pub open: Option<LoadResult>,
    pub prepared_sessions: u64,
}

impl RetryBench {
    pub fn at(&self, concurrency: usize) -> Option<&LoadResult> {
        self.closed.iter().find(|r| r.concurrency == concurrency)
    }
}

/// (a)/(b): the retry endpoint of the release binary on SQLite or PostgreSQL.
pub async fn retry_endpoint(
    opts: &Opts,
    stub: &Stub,
    postgres: bool,
) -> anyhow::Result<RetryBench> {
    let backend = if postgres { "postgres" } else { "sqlite" };
    let sessions = if opts.quick { 120_000 } else { 600_000 };
    let db_name = "payretry_bench_retry";
    let sqlite_path = opts.work.join("retry.db");
    let _ = std::fs::remove_file(&sqlite_path);
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(opts.work.join(format!("retry.db{suffix}")));
    }
    let url = if postgres {
        db::fresh_pg(&opts.pg_admin, db_name).await?
    } else {
        format!("sqlite://{}", sqlite_path.display())
    };
    let mut child = Child::spawn(opts, &url, &stripe_env(stub), &format!("retry-{backend}"))?;
    child.wait_ready(Duration::from_secs(30)).await?;
    let tag = "r";
    let batch = Batch {
        tag,
        count: sessions,
        buyer: BUYER,
        scheduled: false,
        run_at_ms: 0,
        per_second: 1,
        jobs: false,
    };
    let t0 = Instant::now();
    if postgres {
        db::insert_pg(&url, &batch).await?;
    } else {
        db::insert_sqlite(&sqlite_path, &batch).await?;
    }
    log(&format!(
        "  {backend}: {sessions} failed sessions prepared in {:.1}s",
        t0.elapsed().as_secs_f64()
    ));
    let mut order: Vec<u64> = (0..sessions).collect();
    // Spread the sessions over the table rather than walking it in insertion order.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in (1..order.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        order.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    let target = Arc::new(Target {
        addr: child.addr,
        token: token(),
        sessions: order.iter().map(|n| db::session_id(tag, *n)).collect(),
        next: AtomicUsize::new(0),
        key_prefix: format!("bench-{backend}"),
    });
    let secs = |s: u64| Duration::from_secs(if opts.quick { s } else { s * 3 });
    // Warm-up: connections, caches, the pool.
    let _ = load::closed_loop(target.clone(), 16, Duration::from_secs(1)).await;
    let mut closed = Vec::new();
    for (concurrency, s) in [(1, 2), (4, 2), (16, 5), (64, 5)] {
        let r = load::closed_loop(target.clone(), concurrency, secs(s)).await;
        log(&format!(
            "  {backend} closed c={concurrency}: {:.0} req/s p50 {:.2} ms p99 {:.2} ms max {:.1} ms errors {} {:?}",
            r.rps, r.p50_ms, r.p99_ms, r.max_ms, r.errors, r.error_kinds
        ));
        closed.push(r);
    }
    // Open loop at 70 % of the 16-connection throughput.
    let rate = closed
        .iter()
        .find(|r| r.concurrency == 16)
        .map_or(100.0, |r| (r.rps * 0.7).max(10.0));
    let open = load::open_loop(target.clone(), rate, 64, secs(4)).await;
    log(&format!(
        "  {backend} open {rate:.0}/s: p50 {:.2} ms p99 {:.2} ms max {:.1} ms errors {} {:?}",
        open.p50_ms, open.p99_ms, open.max_ms, open.errors, open.error_kinds
    ));
    log(&format!(
        "  {backend}: {} sessions left unused",
        target.remaining()
    ));
    child.stop().await;
    if postgres {
        match db::seq_scans(&url).await {
            Ok(scans) => log(&format!("  {backend}: sequential scans: {scans}")),
            Err(e) => log(&format!("  {backend}: no scan statistics: {e:#}")),
        }
        db::drop_pg(&opts.pg_admin, db_name).await;
    }
    Ok(RetryBench {
        backend: backend.into(),
        closed,
        open: Some(open),
        prepared_sessions: sessions,
    })
}

/// The app in this process (no HTTP), provider = the stub.
async fn in_process_app(url: &str, stub: &Stub) -> anyhow::Result<App> {
    let vars: HashMap<&str, String> = [
        ("PAYRETRY_DATABASE_URL", url.to_owned()),
        ("PAYRETRY_PROVIDER", "stripe".to_owned()),
        ("STRIPE_API_BASE", stub.base.clone()),
        ("STRIPE_SECRET_KEY", STRIPE_KEY.to_owned()),
        ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
        ("PAYRETRY_JWT_SECRET", JWT_SECRET.to_owned()),
    ]
    .into_iter()
    .chain(UNPACED.map(|(k, v)| (k, v.to_owned())))
    .collect();
    let config = Config::from_lookup(|k| vars.get(k).cloned())?;
    let mut tuning = Tuning::from_config(&config);
    tuning.stripe = Some(StripeConfig::new(
        stub.base.clone(),
        Secret::new(STRIPE_KEY.to_owned()),
    ));
    App::build(&config, "http://127.0.0.1:9".to_owned(), tuning).await
}

#[derive(Debug, Clone, Serialize)]
pub struct DrainBench {
    pub backend: String,
    pub claimers: usize,
    pub jobs: u64,
    pub created: u64,
    pub seconds: f64,
    pub per_second: f64,
    /// Checkouts created per second, in 1 s buckets.
    pub timeline: Vec<u32>,
    pub window_seconds: u64,
    pub first_window_rate: f64,
    pub last_window_rate: f64,
    pub jobs_left: i64,
}

#[allow(clippy::too_many_arguments)]
fn drain_summary(
    backend: &str,
    claimers: usize,
    jobs: u64,
    created: u64,
    seconds: f64,
    creates: &[u32],
    started_ms: u32,
    window: u64,
    jobs_left: i64,
) -> DrainBench {
    let mut timeline = vec![0u32; seconds.ceil() as usize + 1];
    for &at in creates {
        let s = (at.saturating_sub(started_ms) / 1000) as usize;
        if s < timeline.len() {
            timeline[s] += 1;
        }
    }
    let full = (seconds.floor() as usize).max(1);
    let w = (window as usize).clamp(1, full);
    let rate =
        |slice: &[u32]| slice.iter().map(|&v| f64::from(v)).sum::<f64>() / slice.len() as f64;
    let first = rate(&timeline[..w]);
    let last = rate(&timeline[full - w..full]);
    DrainBench {
        backend: backend.into(),
        claimers,
        jobs,
        created,
        seconds,
        per_second: created as f64 / seconds,
        timeline,
        window_seconds: w as u64,
        first_window_rate: first,
        last_window_rate: last,
        jobs_left,
    }
}

/// (c): `jobs` due jobs on PostgreSQL (or SQLite), `claimers` workers in this process.
pub async fn drain(
    opts: &Opts,
    stub: &Stub,
    postgres: bool,
    claimers: usize,
    jobs: u64,
    window: u64,
) -> anyhow::Result<DrainBench> {
    let backend = if postgres { "postgres" } else { "sqlite" };
    let db_name = "payretry_bench_drain";
    let path = opts.work.join("drain.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(opts.work.join(format!("drain.db{suffix}")));
    }
    let url = if postgres {
        db::fresh_pg(&opts.pg_admin, db_name).await?
    } else {
        format!("sqlite://{}", path.display())
    };
    let app = in_process_app(&url, stub).await?;
    let batch = Batch {
        tag: "d",
        count: jobs,
        buyer: BUYER,
        scheduled: true,
        run_at_ms: chrono::Utc::now().timestamp_millis() - 600_000,
        per_second: 1_000_000,
        jobs: true,
    };
    let t0 = Instant::now();
    if postgres {
        db::insert_pg(&url, &batch).await?;
    } else {
        db::insert_sqlite(&path, &batch).await?;
    }
    log(&format!(
        "  drain {backend}: {jobs} due jobs prepared in {:.1}s",
        t0.elapsed().as_secs_f64()
    ));
    stub.reset();
    let before = stub.creates();
    let (trigger, shutdown) = payretry::shutdown::channel();
    let settings = app.tuning.worker.clone();
    let started_ms = stub.now_ms();
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..claimers {
        let worker = Arc::new(Worker::new(
            app.state.payments.clone(),
            app.queue.clone(),
            settings.clone(),
        ));
        handles.push(tokio::spawn(worker.run(shutdown.clone())));
    }
    let limit = Duration::from_secs(if opts.quick { 120 } else { 3600 });
    let mut last_progress = (0u64, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let done = stub.creates() - before;
        if done >= jobs || started.elapsed() > limit {
            break;
        }
        if done != last_progress.0 {
            last_progress = (done, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(15) {
            log("  drain stalled for 15 s; stopping");
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    trigger.trigger();
    for h in handles {
        let _ = h.await;
    }
    let created = stub.creates() - before;
    let creates = stub.take_creates();
    let (c, r, e) = stub.counts();
    log(&format!(
        "  stub totals: {c} creates, {r} retrieves, {e} expires"
    ));
    let left = if postgres {
        db::pg_count(&url, "SELECT COUNT(*) FROM retry_jobs").await?
    } else {
        db::sqlite_count(&path, "SELECT COUNT(*) FROM retry_jobs").await?
    };
    drop(app);
    if postgres {
        db::drop_pg(&opts.pg_admin, db_name).await;
    }
    let d = drain_summary(
        backend, claimers, jobs, created, seconds, &creates, started_ms, window, left,
    );
    log(&format!(
        "  drain {backend} claimers={claimers}: {created}/{jobs} in {seconds:.1}s = {:.0}/s; first {}s {:.0}/s, last {}s {:.0}/s; {left} jobs left",
        d.per_second, d.window_seconds, d.first_window_rate, d.window_seconds, d.last_window_rate
    ));
    Ok(d)
}

#[derive(Debug, Clone, Serialize)]
pub struct LatenessBench {
    pub backend: String,
    pub per_second: u64,
    pub jobs: u64,
    pub picked: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// (d): jobs falling due at `per_second` on the embedded queue, one worker as `serve` runs
/// it; lateness = when the worker's first provider call for the job arrives − `run_at`.
pub async fn lateness(
    opts: &Opts,
    stub: &Stub,
    postgres: bool,
    per_second: u64,
    seconds: u64,
) -> anyhow::Result<LatenessBench> {
    let backend = if postgres { "postgres" } else { "sqlite" };
    let db_name = "payretry_bench_late";
    let path = opts.work.join("late.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(opts.work.join(format!("late.db{suffix}")));
    }
    let url = if postgres {
        db::fresh_pg(&opts.pg_admin, db_name).await?
    } else {
        format!("sqlite://{}", path.display())
    };
    let app = in_process_app(&url, stub).await?;
    let jobs = per_second * seconds;
    let lead_ms = 3000;
    let base = chrono::Utc::now().timestamp_millis() + lead_ms;
    let tag = "l";
    let batch = Batch {
        tag,
        count: jobs,
        buyer: BUYER,
        scheduled: true,
        run_at_ms: base,
        per_second,
        jobs: true,
    };
    if postgres {
        db::insert_pg(&url, &batch).await?;
    } else {
        db::insert_sqlite(&path, &batch).await?;
    }
    let now = chrono::Utc::now().timestamp_millis();
    anyhow::ensure!(
        now < base,
        "preparing the lateness jobs took longer than their lead time"
    );
    stub.reset();
    let (trigger, shutdown) = payretry::shutdown::channel();
    let worker = Arc::new(Worker::new(
        app.state.payments.clone(),
        app.queue.clone(),
        app.tuning.worker.clone(),
    ));
    let handle = tokio::spawn(worker.run(shutdown));
    let end = base + (seconds as i64) * 1000;
    let wait = (end - chrono::Utc::now().timestamp_millis()).max(0) as u64 + 2000;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    // Let the tail finish (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    while stub.creates() < jobs && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    trigger.trigger();
    let _ = handle.await;
    let seen = stub.take_first_retrieves();
    drop(app);
    if postgres {
        db::drop_pg(&opts.pg_admin, db_name).await;
    }
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3)?;
    let mut picked = 0;
    for n in 0..jobs {
        let run_at = base + (n as i64 * 1000) / per_second as i64;
        let id = db::checkout_id(tag, n);
        let late = match seen.get(&id) {
            Some(at) => {
                picked += 1;
                (at - run_at).max(1) as u64
            }
            // Never picked up within the run: counted at the time the run ended.
            None => (chrono::Utc::now().timestamp_millis() - run_at).max(1) as u64,
        };
        hist.record(late.min(3_600_000)).ok();
    }
    let r = LatenessBench {
        backend: backend.into(),
        per_second,
        jobs,
        picked,
        p50_ms: hist.value_at_quantile(0.5) as f64,
        p99_ms: hist.value_at_quantile(0.99) as f64,
        max_ms: hist.max() as f64,
    };
    log(&format!(
        "  lateness {backend} {per_second}/s: {picked}/{jobs} picked, p50 {} ms p99 {} ms max {} ms",
        r.p50_ms, r.p99_ms, r.max_ms
    ));
    Ok(r)
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleBench {
    pub backend: String,
    /// Fresh database (migrations run), milliseconds, each try.
    pub ready_fresh_ms: Vec<f64>,
    /// Restart on an existing database.
    pub ready_restart_ms: Vec<f64>,
    pub idle_rss_mib: f64,
}

/// (e): `payretry serve` with its defaults (sandbox provider), spawn → `/readyz` 200, and
/// resident memory after idling.
pub async fn idle(opts: &Opts, postgres: bool, tries: usize) -> anyhow::Result<IdleBench> {
    let backend = if postgres { "postgres" } else { "sqlite" };
    let db_name = "payretry_bench_idle";
    let mut fresh = Vec::new();
    let mut restart = Vec::new();
    let mut rss: f64 = 0.0;
    let env = [("PAYRETRY_JWT_SECRET", JWT_SECRET.to_owned())];
    for i in 0..tries {
        let path = opts.work.join(format!("idle{i}.db"));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(opts.work.join(format!("idle{i}.db{suffix}")));
        }
        let url = if postgres {
            db::fresh_pg(&opts.pg_admin, db_name).await?
        } else {
            format!("sqlite://{}", path.display())
        };
        let mut child = Child::spawn(opts, &url, &env, &format!("idle-{backend}"))?;
        fresh.push(
            child
                .wait_ready(Duration::from_secs(30))
                .await?
                .as_secs_f64()
                * 1000.0,
        );
        child.stop().await;
        let mut child = Child::spawn(opts, &url, &env, &format!("idle-{backend}"))?;
        restart.push(
            child
                .wait_ready(Duration::from_secs(30))
                .await?
                .as_secs_f64()
                * 1000.0,
        );
        if i == 0 {
            tokio::time::sleep(Duration::from_secs(if opts.quick { 3 } else { 10 })).await;
            rss = child.rss_kib().unwrap_or(0) as f64 / 1024.0;
        }
        child.stop().await;
        if postgres {
            db::drop_pg(&opts.pg_admin, db_name).await;
        }
    }
    log(&format!(
        "  idle {backend}: ready fresh {fresh:.0?} ms, restart {restart:.0?} ms, idle RSS {rss:.1} MiB"
    ));
    Ok(IdleBench {
        backend: backend.into(),
        ready_fresh_ms: fresh,
        ready_restart_ms: restart,
        idle_rss_mib: rss,
    })
}

/// (f): the same jobs, the same processing (`Worker::process`: session read, provider
/// retrieve + create, transition commit, expire), but claimed and acknowledged by apalis
/// (`apalis-postgres`) instead of payretry's queue.
pub async fn apalis_drain(
    opts: &Opts,
    stub: &Stub,
    claimers: usize,
    jobs: u64,
) -> anyhow::Result<DrainBench> {
    use apalis::prelude::*;
    use apalis_postgres::{Config as PgConfig, PostgresStorage};
    use payretry::queue::Delivery;
    use payretry_domain::RetryJob;

    let db_name = "payretry_bench_apalis";
    let url = db::fresh_pg(&opts.pg_admin, db_name).await?;
    let app = in_process_app(&url, stub).await?;
    let now = chrono::Utc::now();
    let batch = Batch {
        tag: "a",
        count: jobs,
        buyer: BUYER,
        scheduled: true,
        run_at_ms: now.timestamp_millis() - 600_000,
        per_second: 1_000_000,
        jobs: false,
    };
    db::insert_pg(&url, &batch).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(app.tuning.postgres_connections)
        .connect(&url)
        .await?;
    PostgresStorage::<()>::setup(&pool).await?;
    let config = PgConfig::default().queue("payretry-retry").batch_size(16);
    let mut storage = PostgresStorage::<RetryJob>::new(&pool).with_config(config.clone());
    let t0 = Instant::now();
    let scheduled_for = now - chrono::TimeDelta::minutes(10);
    let mut tasks = futures::stream::iter((0..jobs).map(|n| {
        let job = RetryJob::new(
            payretry_domain::PaymentSessionId::parse(&db::session_id("a", n)).expect("id"),
            payretry_domain::AttemptNumber::new(1),
            60,
            scheduled_for,
            scheduled_for,
        );
        TaskBuilder::new(job).build()
    }));
    storage.push_all(&mut tasks).await?;
    log(&format!(
        "  apalis: {jobs} jobs pushed in {:.1}s",
        t0.elapsed().as_secs_f64()
    ));

    async fn handle(
        job: RetryJob,
        worker: Data<Arc<payretry::worker::Worker>>,
    ) -> Result<(), BoxDynError> {
        let delivery = Delivery {
            job,
            receipt: String::new(),
            receive_count: 1,
            first_delivered_at: chrono::Utc::now(),
        };
        match worker.process(&delivery).await {
            payretry::worker::Outcome::CheckoutCreated => Ok(()),
            other => Err(format!("{other:?}").into()),
        }
    }

    stub.reset();
    let before = stub.creates();
    let settings: WorkerSettings = app.tuning.worker.clone();
    let worker = Arc::new(payretry::worker::Worker::new(
        app.state.payments.clone(),
        app.queue.clone(),
        settings.clone(),
    ));
    let started_ms = stub.now_ms();
    let started = Instant::now();
    let mut contexts = Vec::new();
    let mut workers = Vec::new();
    for i in 0..claimers {
        let backend = PostgresStorage::<RetryJob>::new(&pool).with_config(config.clone());
        let ctx = WorkerContext::new(&format!("bench-apalis-{i}"));
        contexts.push(ctx.clone());
        let w = WorkerBuilder::new(&ctx)
            .backend(backend)
            .data(worker.clone())
            .concurrency(settings.concurrency)
            .parallelize(|f| tokio::spawn(f))
            .build(handle);
        workers.push(w.run());
    }
    // Driven on this task (apalis's worker future does not satisfy `tokio::spawn`'s bounds).
    let all = futures::future::join_all(workers);
    tokio::pin!(all);
    let limit = Duration::from_secs(if opts.quick { 120 } else { 3600 });
    let monitor = async {
        let mut last_progress = (0u64, Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let done = stub.creates() - before;
            if done >= jobs || started.elapsed() > limit {
                break;
            }
            if done != last_progress.0 {
                last_progress = (done, Instant::now());
            } else if last_progress.1.elapsed() > Duration::from_secs(15) {
                log("  apalis drain stalled for 15 s; stopping");
                break;
            }
        }
    };
    tokio::select! {
        _ = monitor => {}
        _ = &mut all => { log("  apalis workers stopped early"); }
    }
    let seconds = started.elapsed().as_secs_f64();
    for ctx in &contexts {
        let _ = ctx.stop();
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), &mut all).await;
    let created = stub.creates() - before;
    let creates = stub.take_creates();
    pool.close().await;
    drop(app);
    db::drop_pg(&opts.pg_admin, db_name).await;
    let d = drain_summary(
        "postgres+apalis",
        claimers,
        jobs,
        created,
        seconds,
        &creates,
        started_ms,
        10,
        0,
    );
    log(&format!(
        "  apalis drain claimers={claimers}: {created}/{jobs} in {seconds:.1}s = {:.0}/s",
        d.per_second
    ));
    Ok(d)
}

pub fn default_payretry() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/payretry")
}
