//! `payretry-bench [--quick] [--out DIR]`: runs the machine's ceilings
//! (`shared/bench/limits.sh`) and payretry's scenarios in one run, and reports every result
//! as a ratio to its ceiling or target (BENCHMARKS.md). The last line printed is one JSON
//! object with every ratio.

mod budget;
mod charts;
mod db;
mod limits;
mod load;
mod s2p;
mod scenarios;
mod stub;

use scenarios::{DrainBench, IdleBench, LatenessBench, RetryBench};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct Opts {
    pub quick: bool,
    pub out: PathBuf,
    pub work: PathBuf,
    pub payretry: PathBuf,
    pub pg_admin: String,
    pub limits: PathBuf,
    pub only: Option<BTreeSet<String>>,
}

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Progress on stderr, so stdout stays the report.
pub fn log(line: &str) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[{t:6.1}s] {line}");
}

/// The local socket, as `limits.sh` reaches PostgreSQL with `pgbench`: the ceilings and
/// payretry then share one access path (over TCP the server's TLS would be negotiated,
/// which `pgbench` on the socket never pays).
const DEFAULT_PG: &str = "postgres://postgres@localhost/postgres?host=/var/run/postgresql";

const USAGE: &str = "usage: payretry-bench [--quick] [--out DIR] [--only a,b,c,d,e,f,g,limits,s2p] \
[--payretry PATH] [--pg URL] [--limits PATH]

Runs shared/bench/limits.sh, S2p (payretry's retry statement through pgbench) and the scenarios (a) retry endpoint on SQLite, (b) on \
PostgreSQL, (c) worker drain, (d) schedule lateness, (e) idle RSS and time to ready, \
(f) the drain on apalis, (g) the provider budget against a slow, rate-limiting Stripe; prints a table and, last, one JSON line with every ratio.
Build first: cargo build --release -p payretry -p payretry-bench";

fn parse_args() -> anyhow::Result<Opts> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut opts = Opts {
        quick: false,
        out: root.join("docs/bench"),
        work: std::env::temp_dir().join(format!("payretry-bench-{}", std::process::id())),
        payretry: scenarios::default_payretry(),
        pg_admin: std::env::var("PAYRETRY_BENCH_PG").unwrap_or_else(|_| DEFAULT_PG.to_owned()),
        limits: root.join("../shared/bench/limits.sh"),
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--quick" => opts.quick = true,
            "--out" => opts.out = PathBuf::from(value()?),
            "--payretry" => opts.payretry = PathBuf::from(value()?),
            "--pg" => opts.pg_admin = value()?,
            "--limits" => opts.limits = PathBuf::from(value()?),
            "--only" => {
                opts.only = Some(value()?.split(',').map(|s| s.trim().to_owned()).collect())
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(opts)
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, v)| v.trim())
        .to_owned();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    json!({"nproc": nproc, "cpu": model, "ram_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0, "kernel": kernel})
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn round(v: f64, digits: i32) -> Value {
    if v.is_finite() {
        let f = 10f64.powi(digits);
        json!((v * f).round() / f)
    } else {
        Value::Null
    }
}

#[derive(Default)]
struct Results {
    limits: Option<limits::Limits>,
    s2p: Option<s2p::S2pBench>,
    sqlite: Option<RetryBench>,
    postgres: Option<RetryBench>,
    drain: Option<DrainBench>,
    drain_sqlite: Option<DrainBench>,
    apalis: Option<DrainBench>,
    lateness: Option<LatenessBench>,
    lateness_pg: Option<LatenessBench>,
    idle: Option<IdleBench>,
    budget_pg: Option<budget::BudgetBench>,
    budget_sqlite: Option<budget::BudgetBench>,
}

/// One row of the report: what, measured, ceiling or target, ratio, the target on the ratio.
struct Row {
    key: &'static str,
    what: String,
    measured: String,
    against: String,
    ratio: f64,
    /// `ratio >= min` (true) or `ratio <= max` (false).
    at_least: bool,
    bound: f64,
}

impl Row {
    fn met(&self) -> Option<bool> {
        // A NaN bound: a figure reported for information, with no target.
        if !self.ratio.is_finite() || self.bound.is_nan() {
            return None;
        }
        Some(if self.at_least {
            self.ratio >= self.bound
        } else {
            self.ratio <= self.bound
        })
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn rows(r: &Results) -> Vec<Row> {
    let mut rows = Vec::new();
    let lim = r.limits.as_ref();
    let s2 = lim.map_or(f64::NAN, |l| l.s2_tps);
    let s2_p99 = lim.and_then(|l| l.s2_p99_ms).unwrap_or(f64::NAN);
    let s3 = lim.map_or(f64::NAN, |l| l.s3_tps);
    let sq = lim.map_or(f64::NAN, |l| l.sqlite_commits);
    if let Some(p) = &r.s2p {
        rows.push(Row {
            key: "s2p_vs_s2",
            what: "S2p: payretry's retry statement in pgbench, 16 clients".into(),
            measured: format!("{:.0} tps", p.tps),
            against: format!("S2 {s2:.0} tps"),
            ratio: p.tps / s2,
            at_least: true,
            bound: f64::NAN,
        });
        rows.push(Row {
            key: "s2p_p99_vs_s2_p99",
            what: "S2p: p99".into(),
            measured: format!("{:.2} ms", p.p99_ms.unwrap_or(f64::NAN)),
            against: format!("S2 p99 {s2_p99:.2} ms"),
            ratio: p.p99_ms.unwrap_or(f64::NAN) / s2_p99,
            at_least: false,
            bound: f64::NAN,
        });
        if let Some(c16) = r.postgres.as_ref().and_then(|pg| pg.at(16)) {
            rows.push(Row {
                key: "pg_retry_16_vs_s2p",
                what: "(b) retry endpoint, PostgreSQL, 16 conns vs S2p".into(),
                measured: format!("{:.0} req/s", c16.rps),
                against: format!("S2p {:.0} tps", p.tps),
                ratio: c16.rps / p.tps,
                at_least: true,
                bound: f64::NAN,
            });
        }
    }
    if let Some(pg) = &r.postgres
        && let Some(c16) = pg.at(16)
    {
        rows.push(Row {
            key: "pg_retry_16_vs_s2",
            what: "(b) retry endpoint, PostgreSQL, 16 conns: throughput".into(),
            measured: format!("{:.0} req/s", c16.rps),
            against: format!("S2 {s2:.0} tps"),
            ratio: c16.rps / s2,
            at_least: true,
            bound: 0.6,
        });
        rows.push(Row {
            key: "pg_retry_p99_vs_s2_p99",
            what: "(b) retry endpoint, PostgreSQL, 16 conns: p99".into(),
            measured: format!("{:.2} ms", c16.p99_ms),
            against: format!("S2 p99 {s2_p99:.2} ms"),
            ratio: c16.p99_ms / s2_p99,
            at_least: false,
            bound: 2.5,
        });
        rows.push(Row {
            key: "pg_retry_errors",
            what: "(b) retry endpoint, PostgreSQL: errors (all levels)".into(),
            measured: format!(
                "{}",
                pg.closed.iter().map(|c| c.errors).sum::<u64>()
                    + pg.open.as_ref().map_or(0, |o| o.errors)
            ),
            against: "0".into(),
            ratio: (pg.closed.iter().map(|c| c.errors).sum::<u64>()
                + pg.open.as_ref().map_or(0, |o| o.errors)) as f64,
            at_least: false,
            bound: 0.0,
        });
        if let Some(c64) = pg.at(64) {
            rows.push(Row {
                key: "pg_retry_64_vs_16",
                what: "(b) retry endpoint, PostgreSQL, 64 conns vs 16".into(),
                measured: format!("{:.0} req/s", c64.rps),
                against: format!("16 conns {:.0} req/s", c16.rps),
                ratio: c64.rps / c16.rps,
                at_least: true,
                bound: 0.9,
            });
        }
    }
    if let Some(lite) = &r.sqlite
        && let Some(c16) = lite.at(16)
    {
        rows.push(Row {
            key: "sqlite_retry_16_vs_commits",
            what: "(a) retry endpoint, SQLite, 16 conns: throughput".into(),
            measured: format!("{:.0} req/s", c16.rps),
            against: format!("SQLite FULL {sq:.0} commits/s"),
            ratio: c16.rps / sq,
            at_least: true,
            bound: 0.3,
        });
        rows.push(Row {
            key: "sqlite_retry_p99_vs_10ms",
            what: "(a) retry endpoint, SQLite, 16 conns: p99".into(),
            measured: format!("{:.2} ms", c16.p99_ms),
            against: "target 10 ms".into(),
            ratio: c16.p99_ms / 10.0,
            at_least: false,
            bound: 1.0,
        });
        let errors = lite.closed.iter().map(|c| c.errors).sum::<u64>()
            + lite.open.as_ref().map_or(0, |o| o.errors);
        rows.push(Row {
            key: "sqlite_retry_errors",
            what: "(a) retry endpoint, SQLite: errors incl. SQLITE_BUSY (all levels)".into(),
            measured: format!("{errors}"),
            against: "0".into(),
            ratio: errors as f64,
            at_least: false,
            bound: 0.0,
        });
    }
    if let Some(d) = &r.drain {
        rows.push(Row {
            key: "drain_4_vs_s3",
            what: format!("(c) worker drain, PostgreSQL, {} claimers", d.claimers),
            measured: format!("{:.0} checkouts/s", d.per_second),
            against: format!("S3 {s3:.0} claims/s"),
            ratio: d.per_second / s3,
            at_least: true,
            bound: 0.5,
        });
        rows.push(Row {
            key: "drain_last_vs_first",
            what: format!(
                "(c) drain of {} jobs: last {} s vs first {} s",
                d.jobs, d.window_seconds, d.window_seconds
            ),
            measured: format!("{:.0}/s", d.last_window_rate),
            against: format!("{:.0}/s", d.first_window_rate),
            ratio: d.last_window_rate / d.first_window_rate,
            at_least: true,
            bound: 0.7,
        });
        if let Some(a) = &r.apalis {
            rows.push(Row {
                key: "drain_vs_apalis",
                what: "(f) payretry drain vs the same drain on apalis".into(),
                measured: format!("{:.0}/s", d.per_second),
                against: format!("apalis {:.0}/s", a.per_second),
                ratio: d.per_second / a.per_second,
                at_least: true,
                bound: 5.0,
            });
        }
    }
    if let Some(l) = &r.lateness {
        rows.push(Row {
            key: "lateness_p99_vs_250ms",
            what: format!(
                "(d) schedule lateness p99, {} at {}/s",
                l.backend, l.per_second
            ),
            measured: format!("{:.0} ms", l.p99_ms),
            against: "target 250 ms".into(),
            ratio: l.p99_ms / 250.0,
            at_least: false,
            bound: 1.0,
        });
    }
    for (b, key) in [(&r.budget_pg, "pg"), (&r.budget_sqlite, "sqlite")] {
        let Some(b) = b else { continue };
        let who = format!(
            "(g) {} jobs due at once, {} on {}",
            b.jobs,
            match b.processes {
                1 => "1 process".to_owned(),
                n => format!("{n} processes"),
            },
            b.backend
        );
        rows.push(Row {
            key: if key == "pg" {
                "budget_used_pg"
            } else {
                "budget_used_sqlite"
            },
            what: format!("{who}: drain × calls/job ÷ budget"),
            measured: format!(
                "{:.1} calls/s ({:.2}/job)",
                b.calls as f64 / b.seconds,
                b.calls_per_job()
            ),
            against: format!("budget {}/s", b.budget_rps),
            ratio: b.budget_used(),
            at_least: true,
            bound: 0.9,
        });
        rows.push(Row {
            key: if key == "pg" {
                "budget_refused_pg"
            } else {
                "budget_refused_sqlite"
            },
            what: format!("{who}: refused with 429"),
            measured: format!("{} of {}", b.refused, b.calls + b.refused),
            against: "all sent".into(),
            ratio: b.refused_share(),
            at_least: false,
            bound: 0.01,
        });
        rows.push(Row {
            key: if key == "pg" {
                "budget_lateness_pg"
            } else {
                "budget_lateness_sqlite"
            },
            what: format!("{who}: lateness of the last job"),
            measured: format!("{:.1} s", b.seconds),
            against: format!(
                "jobs × calls/job ÷ budget = {:.1} s",
                b.calls as f64 / f64::from(b.budget_rps)
            ),
            ratio: b.lateness_ratio(),
            at_least: false,
            bound: 1.1,
        });
        let lost = b.dead_letters
            + b.attempts_spent
            + b.keys_created_twice as i64
            + (b.jobs as i64 - b.created as i64).abs();
        rows.push(Row {
            key: if key == "pg" {
                "budget_losses_pg"
            } else {
                "budget_losses_sqlite"
            },
            what: format!("{who}: dead letters + attempts spent + checkouts not created once"),
            measured: format!(
                "{} + {} + {}",
                b.dead_letters,
                b.attempts_spent,
                b.keys_created_twice as i64 + (b.jobs as i64 - b.created as i64).abs()
            ),
            against: "0".into(),
            ratio: lost as f64,
            at_least: false,
            bound: 0.0,
        });
    }
    if let Some(i) = &r.idle {
        rows.push(Row {
            key: "idle_rss_vs_30mb",
            what: "(e) idle RSS (SQLite, defaults)".into(),
            measured: format!("{:.1} MiB", i.idle_rss_mib),
            against: "target 30 MB".into(),
            ratio: i.idle_rss_mib * 1.048_576 / 30.0,
            at_least: false,
            bound: 1.0,
        });
        rows.push(Row {
            key: "ready_vs_300ms",
            what: "(e) start to ready, fresh database (median)".into(),
            measured: format!("{:.0} ms", median(&i.ready_fresh_ms)),
            against: "target 300 ms".into(),
            ratio: median(&i.ready_fresh_ms) / 300.0,
            at_least: false,
            bound: 1.0,
        });
    }
    rows
}

fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| result | measured | against | ratio | target | met |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let target = if r.bound.is_nan() {
            "information".to_owned()
        } else {
            format!("{} {}", if r.at_least { "≥" } else { "≤" }, r.bound)
        };
        let met = match r.met() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        t.push_str(&format!(
            "| {} | {} | {} | {:.3} | {} | {} |\n",
            r.what, r.measured, r.against, r.ratio, target, met
        ));
    }
    t
}

fn detail_table(runs: &[&RetryBench]) -> String {
    let mut t = String::from(
        "| backend | mode | conns | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for run in runs {
        for c in run.closed.iter().chain(run.open.iter()) {
            let mode = match c.rate {
                Some(rate) => format!("open {rate:.0}/s"),
                None => "closed".into(),
            };
            t.push_str(&format!(
                "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {} |\n",
                run.backend,
                mode,
                c.concurrency,
                c.rps,
                c.p50_ms,
                c.p90_ms,
                c.p99_ms,
                c.p999_ms,
                c.max_ms,
                c.errors
            ));
        }
    }
    t
}

async fn run(opts: &Opts) -> anyhow::Result<()> {
    let wants = |s: &str| opts.only.as_ref().is_none_or(|o| o.contains(s));
    std::fs::create_dir_all(&opts.work)?;
    std::fs::create_dir_all(&opts.out)?;
    anyhow::ensure!(
        opts.payretry.is_file(),
        "{} not found: cargo build --release -p payretry -p payretry-bench",
        opts.payretry.display()
    );
    let started = Instant::now();
    let load_before = loadavg();
    let machine = machine();
    log(&format!(
        "machine {machine}, load {load_before}, mode {}",
        if opts.quick { "quick" } else { "full" }
    ));
    let stub = stub::Stub::start().await?;
    let mut r = Results::default();
    if wants("limits") {
        log("limits.sh (S2, S3, SQLite FULL commits)…");
        let secs = if opts.quick { 5 } else { 10 };
        let limits_path = opts.limits.clone();
        let work = opts.work.clone();
        let l = tokio::task::spawn_blocking(move || limits::run(&limits_path, secs, 16, &work))
            .await??;
        log(&format!("  {l:?}"));
        r.limits = Some(l);
    }
    if wants("limits") || wants("s2p") {
        let secs = if opts.quick { 5 } else { 10 };
        let sessions = if opts.quick { 120_000 } else { 600_000 };
        log("S2p: payretry's retry statement through pgbench…");
        r.s2p = Some(s2p::run(opts, sessions, secs, 16).await?);
    }
    if wants("a") {
        log("(a) retry endpoint on SQLite");
        r.sqlite = Some(scenarios::retry_endpoint(opts, &stub, false).await?);
    }
    if wants("b") {
        log("(b) retry endpoint on PostgreSQL");
        r.postgres = Some(scenarios::retry_endpoint(opts, &stub, true).await?);
    }
    if wants("c") {
        let (jobs, window) = if opts.quick {
            (10_000, 5)
        } else {
            (1_000_000, 60)
        };
        log(&format!(
            "(c) worker drain, {jobs} jobs, PostgreSQL, 4 claimers"
        ));
        r.drain = Some(scenarios::drain(opts, &stub, true, 4, jobs, window).await?);
        if !opts.quick {
            log("(c) worker drain, 50000 jobs, SQLite, 1 claimer (information)");
            r.drain_sqlite = Some(scenarios::drain(opts, &stub, false, 1, 50_000, 10).await?);
        }
    }
    if wants("f") {
        let jobs = if opts.quick { 10_000 } else { 100_000 };
        log(&format!(
            "(f) the same drain on apalis, {jobs} jobs, 4 claimers"
        ));
        match scenarios::apalis_drain(opts, &stub, 4, jobs).await {
            Ok(a) => r.apalis = Some(a),
            Err(e) => log(&format!("  apalis drain failed: {e:#}")),
        }
    }
    if wants("d") {
        let secs = if opts.quick { 10 } else { 60 };
        log("(d) schedule lateness at 1000 due jobs/s, embedded queue on SQLite");
        r.lateness = Some(scenarios::lateness(opts, &stub, false, 1000, secs).await?);
        log("(d) schedule lateness at 1000 due jobs/s, embedded queue on PostgreSQL");
        r.lateness_pg = Some(scenarios::lateness(opts, &stub, true, 1000, secs).await?);
    }
    if wants("g") {
        let jobs = if opts.quick { 2_000 } else { 10_000 };
        log(&format!(
            "(g) provider budget: {jobs} jobs due at once, 250 ms latency, 429 past 100/s, budget 80/s, 2 processes on PostgreSQL"
        ));
        r.budget_pg = Some(budget::run(opts, true, 2, jobs).await?);
        log(&format!(
            "(g) provider budget: {jobs} jobs, the embedded default (1 process, SQLite)"
        ));
        r.budget_sqlite = Some(budget::run(opts, false, 1, jobs).await?);
    }
    if wants("e") {
        log("(e) idle RSS and time to ready");
        let tries = if opts.quick { 3 } else { 5 };
        r.idle = Some(scenarios::idle(opts, false, tries).await?);
    }
    let load_after = loadavg();
    let rows = rows(&r);

    // Charts.
    let retry_runs: Vec<RetryBench> = [r.sqlite.clone(), r.postgres.clone()]
        .into_iter()
        .flatten()
        .collect();
    if !retry_runs.is_empty() {
        let mut ceilings = Vec::new();
        if let Some(l) = &r.limits {
            ceilings.push(("S2 (pgbench, 16 clients)", l.s2_tps));
            ceilings.push(("SQLite FULL commits/s", l.sqlite_commits));
        }
        charts::throughput(&opts.out.join("throughput.svg"), &retry_runs, &ceilings)?;
        for run in &retry_runs {
            charts::latency(&opts.out.join(format!("latency-{}.svg", run.backend)), run)?;
        }
    }
    let drains: Vec<&DrainBench> = [r.drain.as_ref(), r.apalis.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    if !drains.is_empty() {
        charts::drain(&opts.out.join("drain.svg"), &drains)?;
    }

    // Report.
    let summary = table(&rows);
    let details = detail_table(&retry_runs.iter().collect::<Vec<_>>());
    let mut extra = String::new();
    for d in [&r.drain, &r.drain_sqlite, &r.apalis].into_iter().flatten() {
        extra.push_str(&format!(
            "- drain {} ({} claimers): {}/{} jobs in {:.1} s = {:.0} checkouts/s; first {} s {:.0}/s, last {} s {:.0}/s; {} jobs left\n",
            d.backend, d.claimers, d.created, d.jobs, d.seconds, d.per_second,
            d.window_seconds, d.first_window_rate, d.window_seconds, d.last_window_rate, d.jobs_left
        ));
    }
    for l in [&r.lateness, &r.lateness_pg].into_iter().flatten() {
        extra.push_str(&format!(
            "- lateness {} at {}/s: {}/{} picked, p50 {} ms, p99 {} ms, max {} ms\n",
            l.backend, l.per_second, l.picked, l.jobs, l.p50_ms, l.p99_ms, l.max_ms
        ));
    }
    if let Some(i) = &r.idle {
        extra.push_str(&format!(
            "- ready (ms) fresh {:?}, restart {:?}; idle RSS {:.1} MiB\n",
            i.ready_fresh_ms
                .iter()
                .map(|v| v.round())
                .collect::<Vec<_>>(),
            i.ready_restart_ms
                .iter()
                .map(|v| v.round())
                .collect::<Vec<_>>(),
            i.idle_rss_mib
        ));
    }
    if let Some(l) = &r.limits {
        extra.push_str(&format!(
            "- ceilings: S2 {:.0} tps (p50 {:.2} ms, p99 {:.2} ms), S3 {:.0} tps (p99 {:.2} ms), SQLite FULL {:.0} commits/s; {} clients, {} s each\n",
            l.s2_tps, l.s2_p50_ms.unwrap_or(f64::NAN), l.s2_p99_ms.unwrap_or(f64::NAN),
            l.s3_tps, l.s3_p99_ms.unwrap_or(f64::NAN), l.sqlite_commits, l.clients, l.seconds
        ));
    }
    if let Some(p) = &r.s2p {
        extra.push_str(&format!(
            "- S2p: {:.0} tps (p50 {:.2} ms, p99 {:.2} ms), {} writes in one statement of {} chars, {} sessions, {} clients, {} s, {} failed\n",
            p.tps, p.p50_ms.unwrap_or(f64::NAN), p.p99_ms.unwrap_or(f64::NAN), p.writes,
            p.statement_chars, p.sessions, p.clients, p.seconds, p.failed
        ));
    }
    let header = format!(
        "Machine: {} CPUs, {}, {} GiB RAM, Linux {}. Mode: {}. Load average before {}, after {}. Took {:.0} s.\n",
        machine["nproc"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["ram_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        if opts.quick { "--quick" } else { "full" },
        load_before,
        load_after,
        started.elapsed().as_secs_f64()
    );
    let report = format!("{header}\n{summary}\n{details}\n{extra}");
    std::fs::write(opts.out.join("results.md"), &report)?;
    let ratios: serde_json::Map<String, Value> = rows
        .iter()
        .map(|row| (row.key.to_owned(), round(row.ratio, 3)))
        .collect();
    let met: serde_json::Map<String, Value> = rows
        .iter()
        .map(|row| (row.key.to_owned(), json!(row.met())))
        .collect();
    let full = json!({
        "machine": machine,
        "mode": if opts.quick { "quick" } else { "full" },
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "limits": r.limits,
        "s2p": r.s2p,
        "retry_sqlite": r.sqlite,
        "retry_postgres": r.postgres,
        "drain": r.drain,
        "drain_sqlite": r.drain_sqlite,
        "apalis": r.apalis,
        "lateness": r.lateness,
        "lateness_postgres": r.lateness_pg,
        "idle": r.idle,
        "budget_postgres": r.budget_pg,
        "budget_sqlite": r.budget_sqlite,
        "ratios": ratios,
        "met": met,
    });
    std::fs::write(
        opts.out.join("results.json"),
        serde_json::to_string_pretty(&full)?,
    )?;
    let _ = std::fs::remove_dir_all(&opts.work);
    println!("{report}");
    let line = json!({
        "mode": if opts.quick { "quick" } else { "full" },
        "nproc": machine["nproc"],
        "ratios": ratios,
        "met": met,
    });
    println!("{line}");
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    START.get_or_init(Instant::now);
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(&opts).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("payretry-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
