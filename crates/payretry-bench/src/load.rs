//! An HTTP/1.1 load generator for `POST /payments/retry/{id}`: a fixed number of
//! connections each sending back to back (closed loop), or requests started at a fixed rate
//! whatever the answers (open loop, latency measured from the intended start, so a stall is
//! not hidden by the generator waiting for it).

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to send: the i-th request retries session `sessions[i]` under key `{prefix}-{i}`.
pub struct Target {
    pub addr: std::net::SocketAddr,
    pub token: String,
    pub sessions: Vec<String>,
    pub next: AtomicUsize,
    pub key_prefix: String,
}

impl Target {
    fn take(&self) -> Option<(usize, &str)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.sessions.get(i).map(|s| (i, s.as_str()))
    }

    pub fn remaining(&self) -> usize {
        self.sessions
            .len()
            .saturating_sub(self.next.load(Ordering::Relaxed))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub mode: String,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub seconds: f64,
    pub ok: u64,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    pub rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// The run stopped early: every prepared session was used.
    pub exhausted: bool,
}

struct Tally {
    hist: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
            ok: 0,
            errors: BTreeMap::new(),
        }
    }

    fn record(&mut self, latency: Duration, outcome: Result<(), String>) {
        let us = (latency.as_micros() as u64).clamp(1, 60_000_000);
        self.hist.record(us).ok();
        match outcome {
            Ok(()) => self.ok += 1,
            Err(kind) => *self.errors.entry(kind).or_default() += 1,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.hist.add(other.hist).ok();
        self.ok += other.ok;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    fn finish(
        self,
        mode: &str,
        concurrency: usize,
        rate: Option<f64>,
        seconds: f64,
        exhausted: bool,
    ) -> LoadResult {
        let q = |q: f64| self.hist.value_at_quantile(q) as f64 / 1000.0;
        let errors: u64 = self.errors.values().sum();
        LoadResult {
            mode: mode.to_owned(),
            concurrency,
            rate,
            seconds,
            ok: self.ok,
            errors,
            rps: (self.ok + errors) as f64 / seconds,
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: self.hist.max() as f64 / 1000.0,
            error_kinds: self.errors,
            exhausted,
        }
    }
}

async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one retry; `Ok` for 202.
async fn send(
    sender: &mut Option<SendRequest<Empty<Bytes>>>,
    target: &Target,
    index: usize,
    session: &str,
) -> Result<(), String> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        *sender = Some(
            connect(target.addr)
                .await
                .map_err(|_| "connect".to_owned())?,
        );
    }
    let s = sender.as_mut().expect("connected");
    s.ready().await.map_err(|_| "connection".to_owned())?;
    let request = hyper::Request::post(format!("/payments/retry/{session}"))
        .header("host", target.addr.to_string())
        .header("authorization", format!("Bearer {}", target.token))
        .header("idempotency-key", format!("{}-{index}", target.key_prefix))
        .header("content-length", "0")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = match s.send_request(request).await {
        Ok(r) => r,
        Err(_) => {
            *sender = None;
            return Err("connection".to_owned());
        }
    };
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    if status == 202 {
        Ok(())
    } else {
        Err(format!("http {status}"))
    }
}

/// `concurrency` connections, each sending back to back, for `duration`.
pub async fn closed_loop(
    target: Arc<Target>,
    concurrency: usize,
    duration: Duration,
) -> LoadResult {
    let stop = Arc::new(AtomicBool::new(false));
    let exhausted = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let target = target.clone();
        let stop = stop.clone();
        let exhausted = exhausted.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut sender = None;
            while !stop.load(Ordering::Relaxed) {
                let Some((i, session)) = target.take() else {
                    exhausted.store(true, Ordering::Relaxed);
                    break;
                };
                let t0 = Instant::now();
                let outcome = send(&mut sender, &target, i, session).await;
                tally.record(t0.elapsed(), outcome);
            }
            tally
        }));
    }
    let deadline = tokio::time::sleep(duration);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                if exhausted.load(Ordering::Relaxed) { break; }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::new();
    for t in tasks {
        if let Ok(t) = t.await {
            total.merge(t);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    total.finish(
        "closed",
        concurrency,
        None,
        seconds,
        exhausted.load(Ordering::Relaxed),
    )
}

/// Requests started at `rate` per second for `duration`, over up to `connections`
/// connections; each latency counts from the request's intended start.
pub async fn open_loop(
    target: Arc<Target>,
    rate: f64,
    connections: usize,
    duration: Duration,
) -> LoadResult {
    let (tx, rx) = tokio::sync::mpsc::channel::<Instant>(1 << 20);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let exhausted = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::new()));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let target = target.clone();
        let rx = rx.clone();
        let exhausted = exhausted.clone();
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            let mut local = Tally::new();
            let mut sender = None;
            loop {
                let intended = { rx.lock().await.recv().await };
                let Some(intended) = intended else { break };
                let Some((i, session)) = target.take() else {
                    exhausted.store(true, Ordering::Relaxed);
                    break;
                };
                let outcome = send(&mut sender, &target, i, session).await;
                local.record(intended.elapsed(), outcome);
            }
            tally.lock().unwrap().merge(local);
        }));
    }
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (rate * duration.as_secs_f64()) as u64;
    for n in 0..total {
        let at = started + interval.mul_f64(n as f64);
        tokio::time::sleep_until(at.into()).await;
        if exhausted.load(Ordering::Relaxed) || tx.send(at).await.is_err() {
            break;
        }
    }
    drop(tx);
    for t in tasks {
        let _ = t.await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let tally = std::mem::replace(&mut *tally.lock().unwrap(), Tally::new());
    tally.finish(
        "open",
        connections,
        Some(rate),
        seconds,
        exhausted.load(Ordering::Relaxed),
    )
}
