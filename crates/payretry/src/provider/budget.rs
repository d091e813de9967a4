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
//! embedded default where one process makes every call.

use async_trait::async_trait;
use std::sync::Mutex;
use std::time::Duration;
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

/// When calls may go: the pacing state, a plain value.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The configured rate (calls per second).
    max_rate: f64,
    /// The rate now, lowered by 429s and recovering towards `max_rate`.
    rate: f64,
    /// The earliest time the next reservation may be given.
    next_slot: Instant,
    /// No call goes before this (a `Retry-After`).
    paused_until: Instant,
    /// When the rate was last changed (a 429 or recovery), to recover from.
    rate_since: Instant,
}

impl Schedule {
    pub fn new(max_rate: f64, now: Instant) -> Self {
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

    /// Reserves the next free slot for a call asked for at `now`; the call goes at the
    /// returned time (`now` or later).
    pub fn reserve(&mut self, now: Instant) -> Instant {
        self.recover(now);
        let interval = Duration::from_secs_f64(1.0 / self.rate);
        // An idle budget keeps at most BURST's worth of unused slots.
        let burst = Duration::from_secs_f64(BURST);
        let earliest = now.checked_sub(burst).unwrap_or(now);
        let slot = self.next_slot.max(earliest).max(self.paused_until);
        self.next_slot = slot + interval;
        slot.max(now)
    }

    /// A 429 at `now`: halve the rate (not below the floor) and pause until `retry_after`.
    pub fn throttled(&mut self, now: Instant, retry_after: Option<Duration>) {
        self.recover(now);
        self.rate = (self.rate * BACKOFF_FACTOR).max(self.max_rate * FLOOR);
        self.rate_since = now;
        let pause = retry_after.unwrap_or(DEFAULT_PAUSE).min(MAX_PAUSE);
        self.paused_until = self.paused_until.max(now + pause);
        // Slots handed out before the 429 were planned at the old rate: start afresh.
        self.next_slot = self.paused_until;
    }

    fn recover(&mut self, now: Instant) {
        if self.rate >= self.max_rate {
            return;
        }
        let seconds = now.saturating_duration_since(self.rate_since).as_secs_f64();
        self.rate = (self.rate + self.max_rate * RECOVERY_PER_SECOND * seconds).min(self.max_rate);
        self.rate_since = now;
    }

    /// Whether a call reserved for `slot` may still go at `now`, or must reserve again (a
    /// 429 since paused the budget).
    pub fn still_open(&self, now: Instant) -> bool {
        now >= self.paused_until
    }
}

/// The budget of one process: the embedded default, where this process makes every call.
pub struct LocalBudget {
    schedule: Mutex<Schedule>,
}

impl LocalBudget {
    pub fn new(max_rate: f64) -> Self {
        Self {
            schedule: Mutex::new(Schedule::new(max_rate, Instant::now())),
        }
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
            let slot = self.schedule().reserve(Instant::now());
            tokio::time::sleep_until(slot).await;
            // A 429 while this call waited paused the budget: wait for a new slot.
            if self.schedule().still_open(Instant::now()) {
                return;
            }
        }
    }

    async fn throttled(&self, retry_after: Option<Duration>) {
        self.schedule().throttled(Instant::now(), retry_after);
    }

    fn current_rate(&self) -> f64 {
        self.schedule().rate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn slots_follow_each_other_at_the_rate_after_a_short_burst() {
        let start = Instant::now();
        let mut s = Schedule::new(10.0, start);
        // All asked at once, 1 s after an idle start: 0.1 s of burst (one slot), then 100 ms
        // apart.
        let now = at(start, 1000);
        let slots: Vec<u128> = (0..5)
            .map(|_| s.reserve(now).duration_since(now).as_millis())
            .collect();
        assert_eq!(slots, vec![0, 0, 100, 200, 300]);
    }

    #[test]
    fn no_second_gets_more_than_the_rate_and_its_burst() {
        let start = Instant::now();
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
        let start = Instant::now();
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
    fn a_retry_after_is_capped() {
        let start = Instant::now();
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
