//! Runs `shared/bench/limits.sh` (the machine's ceilings) in the same run. limits.sh reports
//! only throughput; to compare latency too, `pgbench` is wrapped (first on `PATH`) so that
//! it also writes its per-transaction log (`-l`), from which S2's and S3's p99 are read.

use serde::Serialize;
use std::path::Path;
use std::process::Command;

#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    pub s2_tps: f64,
    pub s3_tps: f64,
    pub sqlite_commits: f64,
    pub clients: u64,
    pub seconds: u64,
    pub s2_p50_ms: Option<f64>,
    pub s2_p99_ms: Option<f64>,
    pub s3_p99_ms: Option<f64>,
}

/// Latency percentiles (ms) from pgbench `-l` logs whose names start with `prefix`.
pub fn percentiles(dir: &Path, prefix: &str) -> Option<(f64, f64)> {
    let mut us: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).ok()?;
        // client_id transaction_no latency_us script_no epoch epoch_us
        us.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()),
        );
    }
    if us.is_empty() {
        return None;
    }
    us.sort_unstable();
    let q = |q: f64| us[((us.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    Some((q(0.5), q(0.99)))
}

pub fn run(script: &Path, seconds: u64, clients: u64, work: &Path) -> anyhow::Result<Limits> {
    let wrap = work.join("pgbench-wrap");
    let logs = work.join("pgbench-logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&wrap)?;
    std::fs::create_dir_all(&logs)?;
    let real = which("pgbench").ok_or_else(|| anyhow::anyhow!("pgbench not found on PATH"))?;
    let wrapper = wrap.join("pgbench");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n# payretry-bench: pgbench with a per-transaction log (for p99)\nexec {real} -l --log-prefix={logs}/run$(date +%s%N) \"$@\"\n",
            logs = logs.display(),
            real = real.display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    let path = format!(
        "{}:{}",
        wrap.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg(script)
        .arg(seconds.to_string())
        .arg(clients.to_string())
        .env("PATH", path)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "limits.sh failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| anyhow::anyhow!("limits.sh printed no JSON line"))?;
    let v: serde_json::Value = serde_json::from_str(last)?;
    let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    // Two pgbench runs, S2 then S3: order the log prefixes by their timestamp.
    let mut runs: Vec<String> = std::fs::read_dir(&logs)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.split('.').next().map(str::to_owned)
        })
        .collect();
    runs.sort();
    runs.dedup();
    let s2 = runs.first().and_then(|p| percentiles(&logs, p));
    let s3 = runs.get(1).and_then(|p| percentiles(&logs, p));
    let _ = std::fs::remove_dir_all(&logs);
    Ok(Limits {
        s2_tps: num("s2_tps"),
        s3_tps: num("s3_tps"),
        sqlite_commits: num("sqlite_commits"),
        clients: v["clients"].as_u64().unwrap_or(clients),
        seconds: v["seconds"].as_u64().unwrap_or(seconds),
        s2_p50_ms: s2.map(|p| p.0),
        s2_p99_ms: s2.map(|p| p.1),
        s3_p99_ms: s3.map(|p| p.1),
    })
}

pub fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var("PATH")
        .ok()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
