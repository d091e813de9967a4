//! The provider's rate limit, as payretry keeps to it (DESIGN.md §4): every call payretry
//! makes to the provider waits for a slot of `PAYRETRY_PROVIDER_MAX_RPS`, and a 429 slows the
//! rate down (and pauses calls for the `Retry-After` the provider asked for) before it
//! recovers. Stripe's limit is per account and shared with the merchant's own traffic, so a
//! burst of due retries must not take all of it.
//!
//! The schedule is a pure value ([`Schedule`], unit-tested): each call reserves the next free
//! slot, `1 / rate` after the one before, so callers are served in the order they asked and
//! never faster than the rate; an idle budget lets a short burst through (at most
//! [`BURST`] of the rate's slots at once). [`LocalBudget`] keeps it in this process, for the
//! embedded default where one process makes every call; [`SharedBudget`] keeps it in a row
//! of the database every process of a deployment shares ([`ScheduleStore`], PostgreSQL),
//! each call reserving its slot there, so the processes together keep to the rate.

use async_trait::async_trait;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// How many calls an idle budget lets through at once, as a fraction of one second's rate:
/// 0.1 s worth (8 calls at 80/s), so no second ever sees much more than the rate.
pub const BURST: f64 = 0.1;

/// How far a 429 cuts the rate, and the floor it never goes under (a fraction of the
/// configured rate): halved per 429, down to a tenth.
const BACKOFF_FACTOR: f64 = 0.5;
const FLOOR: f64 = 0.1;

/// How fast the rate recovers after the last 429: a twentieth of the configured rate per
/// second, so from the floor back to the full rate in 18 s.
const RECOVERY_PER_SECOND: f64 = 0.05;

/// A pause after a 429 that named no `Retry-After`.
const DEFAULT_PAUSE: Duration = Duration::from_secs(1);

/// The longest pause a `Retry-After` may impose on the whole budget.
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// Calls to the provider, paced for the whole deployment.
#[async_trait]
pub trait ProviderBudget: Send + Sync + 'static {
    /// Waits until one more call may be sent now.
    async fn acquire(&self);

    /// The provider refused a call for its rate limit (429), asking to wait `retry_after`.
    async fn throttled(&self, retry_after: Option<Duration>);

    /// The rate calls are paced at now (calls per second), for metrics and tests.
    fn current_rate(&self) -> f64;
}

/// When calls may go: the pacing state, a plain value. Times are offsets from an origin the
/// owner picks (a process's start, or the Unix epoch for a schedule processes share).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The configured rate (calls per second).
    pub max_rate: f64,
    /// The rate now, lowered by 429s and recovering towards `max_rate`.
    pub rate: f64,
    /// The earliest time the next reservation may be given.
    pub next_slot: Duration,
    /// No call goes before this (a `Retry-After`).
    pub paused_until: Duration,
    /// When the rate was last changed (a 429 or recovery), to recover from.
    pub rate_since: Duration,
}

/// What a caller does to a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleChange {
    /// Reserve the next `n` slots (the answer: when the first may go, and how far apart).
    Reserve(u32),
    /// The provider refused a call for its rate limit, asking to wait this long (if it said).
    Throttled(Option<Duration>),
}

impl Schedule {
    pub fn new(max_rate: f64, now: Duration) -> Self {
        assert!(max_rate > 0.0, "a budget needs a positive rate");
        Self {
            max_rate,
            rate: max_rate,
            next_slot: now,
            paused_until: now,
            rate_since: now,
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Applies `change` at `now`; returns the slots reserved (none for a 429).
    pub fn apply(&mut self, change: ScheduleChange, now: Duration) -> Reserved {
        match change {
            ScheduleChange::Reserve(n) => self.reserve_many(now, n),
            ScheduleChange::Throttled(retry_after) => {
                self.throttled(now, retry_after);
                Reserved {
                    first: now,
                    every: Duration::ZERO,
                    count: 0,
                }
            }
        }
    }

    /// Reserves the next free slot for a call asked for at `now`; the call goes at the
    /// returned time (`now` or later).
    pub fn reserve(&mut self, now: Duration) -> Duration {
        self.reserve_many(now, 1).first.max(now)
    }

    /// Reserves the next `n` free slots, `1 / rate` apart, for calls asked for at `now`.
    pub fn reserve_many(&mut self, now: Duration, n: u32) -> Reserved {
        self.recover(now);
        let interval = Duration::from_secs_f64(1.0 / self.rate);
        // An idle budget keeps at most BURST's worth of unused slots.
        let burst = Duration::from_secs_f64(BURST);
        let earliest = now.saturating_sub(burst);
        let slot = self.next_slot.max(earliest).max(self.paused_until);
        self.next_slot = slot + interval * n.max(1);
        Reserved {
            first: slot,
            every: interval,
            count: n.max(1),
        }
    }

    /// A 429 at `now`: halve the rate (not below the floor) and pause until `retry_after`.
    pub fn throttled(&mut self, now: Duration, retry_after: Option<Duration>) {
        self.recover(now);
        self.rate = (self.rate * BACKOFF_FACTOR).max(self.max_rate * FLOOR);
        self.rate_since = now;
        let pause = retry_after.unwrap_or(DEFAULT_PAUSE).min(MAX_PAUSE);
        self.paused_until = self.paused_until.max(now + pause);
        // Slots handed out before the 429 were planned at the old rate: start afresh.
        self.next_slot = self.paused_until;
    }

    fn recover(&mut self, now: Duration) {
        if self.rate >= self.max_rate {
            return;
        }
        let seconds = now.saturating_sub(self.rate_since).as_secs_f64();
        self.rate = (self.rate + self.max_rate * RECOVERY_PER_SECOND * seconds).min(self.max_rate);
        self.rate_since = now;
    }

    /// Whether a call reserved for `slot` may still go at `now`, or must reserve again (a
    /// 429 since paused the budget).
    pub fn still_open(&self, now: Duration) -> bool {
        now >= self.paused_until
    }
}

/// Slots reserved together: `count` of them, `every` apart from `first` (a time that may lie
/// a burst in the past: such a slot goes at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    pub first: Duration,
    pub every: Duration,
    pub count: u32,
}

impl Reserved {
    pub fn slots(self) -> impl Iterator<Item = Duration> {
        (0..self.count).map(move |j| self.first + self.every * j)
    }
}

/// The budget of one process: the embedded default, where this process makes every call.
pub struct LocalBudget {
    schedule: Mutex<Schedule>,
    /// Times in the schedule are offsets from this.
    origin: Instant,
}

impl LocalBudget {
    pub fn new(max_rate: f64) -> Self {
        Self {
            schedule: Mutex::new(Schedule::new(max_rate, Duration::ZERO)),
            origin: Instant::now(),
        }
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl ProviderBudget for LocalBudget {
    async fn acquire(&self) {
        loop {
            let slot = self.schedule().reserve(self.now());
            tokio::time::sleep_until(self.origin + slot).await;
            // A 429 while this call waited paused the budget: wait for a new slot.
            if self.schedule().still_open(self.now()) {
                return;
            }
        }
    }

    async fn throttled(&self, retry_after: Option<Duration>) {
        let now = self.now();
        self.schedule().throttled(now, retry_after);
    }

    fn current_rate(&self) -> f64 {
        self.schedule().rate()
    }
}

/// Where a schedule shared by the processes of a deployment is kept: a row, changed under a
/// lock, so that of two processes reserving at once each gets its own slot.
#[async_trait]
pub trait ScheduleStore: Send + Sync + 'static {
    /// Applies `change` at `now` (since the Unix epoch) to the schedule `name`, created as
    /// `fresh` if there is none, with its configured rate set to `fresh`'s; returns what
    /// [`Schedule::apply`] returns.
    async fn apply_to_schedule(
        &self,
        name: &str,
        fresh: Schedule,
        change: ScheduleChange,
        now: Duration,
    ) -> Result<Reserved, Box<dyn std::error::Error + Send + Sync>>;
}

/// The budget of a deployment: one schedule in the shared database. A process reserves its
/// slots there in leases of [`LEASE`]'s worth (one slot at a time at the live default of 80
/// a second: one short transaction per call; a hundred at a time at 10 000 a second, so the
/// schedule's row never bounds the calls) and hands them to its callers in order; a slot
/// not taken within a burst of its time is dropped, never saved up. Calls already reserved
/// when another process meets a 429 still go (at most a lease and a burst's worth); every
/// reservation after it waits for the pause. If the database cannot be reached, this
/// process paces itself alone at the same rate until it can.
pub struct SharedBudget {
    store: std::sync::Arc<dyn ScheduleStore>,
    name: String,
    max_rate: f64,
    fallback: LocalBudget,
    /// Slots this process reserved and has not handed out, soonest first; locked while a
    /// lease is reserved, so one process reserves one lease at a time.
    slots: tokio::sync::Mutex<std::collections::VecDeque<Duration>>,
    /// The rate last seen in the shared schedule (f64 bits), for metrics.
    rate: AtomicU64,
}

/// How much of the rate one lease of slots covers: 10 ms (at least one slot).
pub const LEASE: Duration = Duration::from_millis(10);

impl SharedBudget {
    pub fn new(store: std::sync::Arc<dyn ScheduleStore>, name: &str, max_rate: f64) -> Self {
        Self {
            store,
            name: name.to_owned(),
            max_rate,
            fallback: LocalBudget::new(max_rate),
            slots: tokio::sync::Mutex::new(std::collections::VecDeque::new()),
            rate: AtomicU64::new(max_rate.to_bits()),
        }
    }

    /// Slots per lease at the configured rate.
    fn lease_size(&self) -> u32 {
        (self.max_rate * LEASE.as_secs_f64()).clamp(1.0, 100.0) as u32
    }

    async fn apply(&self, change: ScheduleChange) -> Option<Reserved> {
        let now = since_epoch();
        let fresh = Schedule::new(self.max_rate, now);
        match self
            .store
            .apply_to_schedule(&self.name, fresh, change, now)
            .await
        {
            Ok(reserved) => Some(reserved),
            Err(error) => {
                tracing::warn!(%error, "the shared provider budget is unreachable; pacing this process alone");
                None
            }
        }
    }
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

#[async_trait]
impl ProviderBudget for SharedBudget {
    async fn acquire(&self) {
        let burst = Duration::from_secs_f64(BURST);
        let mut slots = self.slots.lock().await;
        let now = since_epoch();
        while slots.front().is_some_and(|slot| *slot + burst < now) {
            slots.pop_front();
        }
        if slots.is_empty() {
            match self.apply(ScheduleChange::Reserve(self.lease_size())).await {
                Some(reserved) => slots.extend(reserved.slots()),
                None => {
                    drop(slots);
                    return self.fallback.acquire().await;
                }
            }
        }
        let slot = slots.pop_front().unwrap_or(now);
        drop(slots);
        tokio::time::sleep(slot.saturating_sub(since_epoch())).await;
    }

    async fn throttled(&self, retry_after: Option<Duration>) {
        // Slots leased before the 429 were planned at the old rate.
        self.slots.lock().await.clear();
        if self
            .apply(ScheduleChange::Throttled(retry_after))
            .await
            .is_none()
        {
            self.fallback.throttled(retry_after).await;
        }
        let halved = (f64::from_bits(self.rate.load(Ordering::Relaxed)) * BACKOFF_FACTOR)
            .max(self.max_rate * FLOOR);
        self.rate.store(halved.to_bits(), Ordering::Relaxed);
    }

    fn current_rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Duration, ms: u64) -> Duration {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn slots_follow_each_other_at_the_rate_after_a_short_burst() {
        let start = Duration::from_secs(1_000);
        let mut s = Schedule::new(10.0, start);
        // All asked at once, 1 s after an idle start: 0.1 s of burst (one slot), then 100 ms
        // apart.
        let now = at(start, 1000);
        let slots: Vec<u128> = (0..5).map(|_| (s.reserve(now) - now).as_millis()).collect();
        assert_eq!(slots, vec![0, 0, 100, 200, 300]);
    }

    #[test]
    fn no_second_gets_more_than_the_rate_and_its_burst() {
        let start = Duration::from_secs(1_000);
        let mut s = Schedule::new(80.0, start);
        let mut in_first_second = 0;
        for n in 0..1000 {
            // A caller every 2 ms: far more than 80 per second ask.
            let now = at(start, 2 * n);
            if s.reserve(now) < at(start, 1000) {
                in_first_second += 1;
            }
        }
        assert!(
            in_first_second <= 80 + 8,
            "{in_first_second} calls in the first second"
        );
        assert!(
            in_first_second >= 80,
            "{in_first_second} calls in the first second"
        );
    }

    #[test]
    fn a_429_halves_the_rate_pauses_for_retry_after_and_the_rate_recovers() {
        let start = Duration::from_secs(1_000);
        let mut s = Schedule::new(20.0, start);
        s.throttled(at(start, 0), Some(Duration::from_secs(2)));
        assert_eq!(s.rate(), 10.0);
        assert!(!s.still_open(at(start, 1999)));
        assert!(s.still_open(at(start, 2000)));
        // Nothing goes during the pause.
        assert_eq!(s.reserve(at(start, 500)), at(start, 2000));
        // A second 429 halves again; the floor is a tenth of the configured rate.
        s.throttled(at(start, 2000), None);
        s.throttled(at(start, 2000), None);
        s.throttled(at(start, 2000), None);
        assert_eq!(s.rate(), 2.0);
        // One second of recovery adds a twentieth of the configured rate; it never passes it.
        s.reserve(at(start, 3000));
        assert!((s.rate() - 3.0).abs() < 1e-9, "{}", s.rate());
        s.reserve(at(start, 60_000));
        assert_eq!(s.rate(), 20.0);
    }

    #[test]
    fn a_lease_takes_consecutive_slots_and_the_next_caller_waits_for_all_of_them() {
        let start = Duration::from_secs(1_000);
        let mut s = Schedule::new(100.0, start);
        let lease = s.reserve_many(start, 4);
        let slots: Vec<u128> = lease.slots().map(|t| (t - start).as_millis()).collect();
        assert_eq!(slots, vec![0, 10, 20, 30]);
        assert_eq!(s.reserve(start), at(start, 40));
    }

    #[test]
    fn a_retry_after_is_capped() {
        let start = Duration::from_secs(1_000);
        let mut s = Schedule::new(20.0, start);
        s.throttled(start, Some(Duration::from_secs(3600)));
        assert!(s.still_open(start + MAX_PAUSE));
    }

    #[tokio::test(start_paused = true)]
    async fn the_local_budget_paces_callers_in_the_order_they_asked() {
        let budget = std::sync::Arc::new(LocalBudget::new(10.0));
        let start = Instant::now();
        let mut handles = Vec::new();
        for _ in 0..5 {
            let budget = budget.clone();
            handles.push(tokio::spawn(async move {
                budget.acquire().await;
                Instant::now()
            }));
            tokio::task::yield_now().await;
        }
        let mut times = Vec::new();
        for h in handles {
            times.push(h.await.unwrap().duration_since(start).as_millis());
        }
        // A new budget has saved up no burst: one per 100 ms, in the order they asked.
        assert_eq!(times, vec![0, 100, 200, 300, 400]);
    }
}
