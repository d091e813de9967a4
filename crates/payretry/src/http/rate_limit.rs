//! Request budgets, so the retry endpoint cannot be used for card testing and the anonymous
//! sandbox pages cannot be hammered: one budget per principal on checkout and retry, a wider
//! one per client address (an attacker with many tokens still has one address; buyers behind
//! one NAT share it, hence the wider budget), and one per client address for anonymous
//! requests. Fixed one-minute windows, in memory: each API process enforces its own budgets.
//!
//! A request is counted only when every budget it is checked against admits it: a principal
//! over its own budget spends nothing of its address's, so one caller cannot lock out the
//! others behind the same address; and a request its address refuses spends nothing of the
//! principal's. A request to checkout or retry that does not authenticate has no principal
//! and is charged to its address. A refused request never opens, resets or extends a window.
//!
//! Memory is bounded: each budget tracks at most [`MAX_TRACKED_KEYS`] keys. Expired windows
//! are dropped as time passes (oldest first, in O(1) per request); when the table is full of
//! live windows a new key evicts the one whose window started first — the window closest to
//! ending anyway, so the budget its owner regains is the smallest. A caller that can fill
//! the table with new keys inside one window already holds that many fresh budgets, so
//! flushing it gains nothing more.
//!
//! IPv6 addresses are counted per /64, the block one subscriber is usually given: rotating
//! addresses inside it is free and must not buy fresh budgets.

use super::AppState;
use super::auth::Caller;
use super::client_ip::ClientIp;
use super::error::ApiError;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

/// How many times the per-principal budget one client address gets.
pub const IP_BUDGET_FACTOR: u32 = 10;

/// The most keys one budget tracks at once (per principal, per address, anonymous).
pub const MAX_TRACKED_KEYS: usize = 100_000;

pub struct RateLimiter {
    principals: Budget<Arc<str>>,
    addresses: Budget<IpAddr>,
    anonymous: Budget<IpAddr>,
}

impl RateLimiter {
    pub fn new(per_principal_per_minute: u32) -> Self {
        Self::with_capacity(per_principal_per_minute, MAX_TRACKED_KEYS)
    }

    /// [`RateLimiter::new`] tracking at most `capacity` keys per budget.
    pub fn with_capacity(per_principal_per_minute: u32, capacity: usize) -> Self {
        let per_address = per_principal_per_minute.saturating_mul(IP_BUDGET_FACTOR);
        Self {
            principals: Budget::new(per_principal_per_minute, capacity),
            addresses: Budget::new(per_address, capacity),
            anonymous: Budget::new(per_address, capacity),
        }
    }

    /// Counts one request from `ip` by `principal` when both budgets admit it; otherwise
    /// 429 with `Retry-After` and nothing is counted.
    pub fn check(&self, ip: IpAddr, principal: &str) -> Result<(), ApiError> {
        let principal: Arc<str> = Arc::from(principal);
        let ip = address_key(ip);
        // Always in this order, so two requests cannot deadlock.
        let mut principals = self.principals.lock();
        let mut addresses = self.addresses.lock();
        let now = Instant::now();
        let principal_wait = principals.refusal(now, &principal, self.principals.per_minute);
        let address_wait = addresses.refusal(now, &ip, self.addresses.per_minute);
        if let Some(wait) = principal_wait.max(address_wait) {
            return Err(rate_limited(wait));
        }
        principals.count(now, principal, self.principals.capacity);
        addresses.count(now, ip, self.addresses.capacity);
        Ok(())
    }

    /// The caller of a request to a rate-limited route; a request that did not authenticate
    /// has no principal to charge, so it is charged to `ip` and refused (401, or 429 once
    /// the address's budget is spent).
    pub fn authenticated(
        &self,
        ip: IpAddr,
        caller: Result<Caller, ApiError>,
    ) -> Result<Caller, ApiError> {
        match caller {
            Ok(caller) => Ok(caller),
            Err(refusal) => {
                self.addresses.spend(address_key(ip))?;
                Err(refusal)
            }
        }
    }

    /// Counts one request that names no principal (the sandbox's pages) against `ip`'s
    /// anonymous budget; 429 with `Retry-After` when it is spent.
    pub fn check_anonymous(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.anonymous.spend(address_key(ip))
    }

    /// Keys tracked per budget: principals, addresses, anonymous addresses.
    pub fn tracked(&self) -> (usize, usize, usize) {
        (
            self.principals.lock().len(),
            self.addresses.lock().len(),
            self.anonymous.lock().len(),
        )
    }
}

/// Route layer for routes anyone may call (the sandbox's pages): each request is charged to
/// the client address's anonymous budget.
pub async fn anonymous(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    request: Request,
    next: Next,
) -> Response {
    match state.limiter.check_anonymous(ip) {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// The key an address is counted under: itself for IPv4 (also when IPv4-mapped), its /64
/// for IPv6.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

fn rate_limited(wait: Duration) -> ApiError {
    ApiError::RateLimited {
        retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
    }
}

/// One budget: a limit per window and the table of windows.
struct Budget<K> {
    per_minute: u32,
    capacity: usize,
    windows: Mutex<Windows<K>>,
}

impl<K: Hash + Eq + Clone> Budget<K> {
    fn new(per_minute: u32, capacity: usize) -> Self {
        Self {
            per_minute,
            capacity: capacity.max(1),
            windows: Mutex::new(Windows {
                open: HashMap::new(),
                by_start: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Windows<K>> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spend(&self, key: K) -> Result<(), ApiError> {
        self.spend_at(Instant::now(), key)
    }

    fn spend_at(&self, now: Instant, key: K) -> Result<(), ApiError> {
        let mut windows = self.lock();
        if let Some(wait) = windows.refusal(now, &key, self.per_minute) {
            return Err(rate_limited(wait));
        }
        windows.count(now, key, self.capacity);
        Ok(())
    }
}

/// The open windows of one budget. Invariant: `by_start` holds exactly one record per entry
/// of `open`, in the order the windows started (each window lasts [`WINDOW`], so that is
/// also the order they end in).
struct Windows<K> {
    open: HashMap<K, Window>,
    by_start: VecDeque<(Instant, K)>,
}

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    used: u32,
}

impl<K: Hash + Eq + Clone> Windows<K> {
    fn len(&self) -> usize {
        self.open.len()
    }

    /// How long until `key` may be counted again, or `None` when it may be now. Changes
    /// nothing.
    fn refusal(&self, now: Instant, key: &K, per_minute: u32) -> Option<Duration> {
        let window = self.open.get(key)?;
        let elapsed = now.saturating_duration_since(window.start);
        (elapsed < WINDOW && window.used >= per_minute).then(|| WINDOW - elapsed)
    }

    /// Counts one request for `key` (after [`Windows::refusal`] admitted it).
    fn count(&mut self, now: Instant, key: K, capacity: usize) {
        self.drop_expired(now);
        if let Some(window) = self.open.get_mut(&key) {
            window.used += 1;
            return;
        }
        while self.open.len() >= capacity {
            self.drop_oldest();
        }
        self.open.insert(
            key.clone(),
            Window {
                start: now,
                used: 1,
            },
        );
        self.by_start.push_back((now, key));
    }

    fn drop_expired(&mut self, now: Instant) {
        while let Some((start, _)) = self.by_start.front() {
            if now.saturating_duration_since(*start) < WINDOW {
                break;
            }
            self.drop_oldest();
        }
    }

    fn drop_oldest(&mut self) {
        if let Some((_, key)) = self.by_start.pop_front() {
            self.open.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn refused(result: Result<(), ApiError>) -> bool {
        matches!(result, Err(ApiError::RateLimited { retry_after_secs }) if (1..=60).contains(&retry_after_secs))
    }

    #[test]
    fn budget_is_per_principal() {
        let limiter = RateLimiter::new(2);
        assert!(limiter.check(ip(1), "a").is_ok());
        assert!(limiter.check(ip(2), "a").is_ok());
        assert!(refused(limiter.check(ip(3), "a")));
        assert!(limiter.check(ip(1), "b").is_ok());
    }

    #[test]
    fn one_address_cannot_spread_requests_over_many_principals() {
        let limiter = RateLimiter::new(1);
        for n in 0..IP_BUDGET_FACTOR {
            assert!(limiter.check(ip(9), &format!("token-{n}")).is_ok());
        }
        assert!(refused(limiter.check(ip(9), "fresh-token")));
        assert!(limiter.check(ip(8), "fresh-token").is_ok());
    }

    #[test]
    fn a_principal_over_its_budget_spends_nothing_of_its_address() {
        let limiter = RateLimiter::new(1);
        assert!(limiter.check(ip(7), "greedy").is_ok());
        for _ in 0..1000 {
            assert!(refused(limiter.check(ip(7), "greedy")));
        }
        // The address has spent one request of its ten: nine other principals still fit.
        for n in 0..IP_BUDGET_FACTOR - 1 {
            assert!(limiter.check(ip(7), &format!("neighbour-{n}")).is_ok());
        }
        assert!(refused(limiter.check(ip(7), "one-too-many")));
    }

    #[test]
    fn a_request_the_address_refuses_spends_nothing_of_the_principal() {
        let limiter = RateLimiter::new(1);
        for n in 0..IP_BUDGET_FACTOR {
            assert!(limiter.check(ip(5), &format!("token-{n}")).is_ok());
        }
        for _ in 0..5 {
            assert!(refused(limiter.check(ip(5), "patient")));
        }
        assert!(limiter.check(ip(6), "patient").is_ok());
    }

    #[test]
    fn refused_requests_do_not_extend_the_window() {
        let budget = Budget::new(2, 10);
        let start = Instant::now();
        assert!(budget.spend_at(start, "k").is_ok());
        assert!(budget.spend_at(start, "k").is_ok());
        for s in [1, 30, 59] {
            assert!(refused(
                budget.spend_at(start + Duration::from_secs(s), "k")
            ));
        }
        // The window opened by the first request ends on time despite the refusals.
        assert!(budget.spend_at(start + WINDOW, "k").is_ok());
    }

    #[test]
    fn retry_after_counts_down_to_the_end_of_the_window() {
        let budget = Budget::new(1, 10);
        let start = Instant::now();
        budget.spend_at(start, "k").unwrap();
        let wait = |s: u64| match budget.spend_at(start + Duration::from_millis(s), "k") {
            Err(ApiError::RateLimited { retry_after_secs }) => retry_after_secs,
            other => panic!("expected 429, got {other:?}"),
        };
        assert_eq!(wait(0), 60);
        assert_eq!(wait(45_500), 15);
        assert_eq!(wait(59_999), 1);
    }

    #[test]
    fn anonymous_requests_are_charged_to_the_address() {
        let limiter = RateLimiter::new(1);
        for _ in 0..IP_BUDGET_FACTOR {
            assert!(limiter.check_anonymous(ip(3)).is_ok());
        }
        assert!(refused(limiter.check_anonymous(ip(3))));
        assert!(limiter.check_anonymous(ip(4)).is_ok());
        // The sandbox's budget is its own: checkouts from that address are unaffected.
        assert!(limiter.check(ip(3), "buyer").is_ok());
    }

    #[test]
    fn unauthenticated_requests_are_charged_to_the_address() {
        let limiter = RateLimiter::new(1);
        for _ in 0..IP_BUDGET_FACTOR {
            let answer = limiter.authenticated(ip(2), Err(ApiError::Unauthenticated));
            assert!(matches!(answer, Err(ApiError::Unauthenticated)));
        }
        let answer = limiter.authenticated(ip(2), Err(ApiError::Unauthenticated));
        assert!(refused(answer.map(|_| ())));
        assert!(refused(limiter.check(ip(2), "buyer")));
        assert!(limiter.check(ip(1), "buyer").is_ok());
    }

    #[test]
    fn ipv6_is_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let limiter = RateLimiter::new(1);
        for n in 0..IP_BUDGET_FACTOR {
            let addr: IpAddr = format!("2001:db8:1:2::{:x}", n + 1).parse().unwrap();
            assert!(limiter.check_anonymous(addr).is_ok());
        }
        let same_64: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        assert!(refused(limiter.check_anonymous(same_64)));
        let next_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(limiter.check_anonymous(next_64).is_ok());

        for _ in 0..IP_BUDGET_FACTOR {
            assert!(limiter.check_anonymous(ip(200)).is_ok());
        }
        let mapped: IpAddr = "::ffff:10.0.0.200".parse().unwrap();
        assert!(refused(limiter.check_anonymous(mapped)));
    }

    #[test]
    fn memory_stays_bounded_under_a_million_distinct_keys() {
        let limiter = RateLimiter::new(5);
        for n in 0..1_000_000u32 {
            let addr = IpAddr::from((0x0a00_0000 | n).to_be_bytes());
            limiter.check(addr, &format!("p{n}")).unwrap();
            limiter.check_anonymous(addr).unwrap();
        }
        let (principals, addresses, anonymous) = limiter.tracked();
        assert_eq!(principals, MAX_TRACKED_KEYS);
        assert_eq!(addresses, MAX_TRACKED_KEYS);
        assert_eq!(anonymous, MAX_TRACKED_KEYS);
        for budget in [
            limiter.principals.lock().by_start.len(),
            limiter.addresses.lock().by_start.len(),
            limiter.anonymous.lock().by_start.len(),
        ] {
            assert_eq!(budget, MAX_TRACKED_KEYS);
        }
        // The newest keys are the ones still tracked, and still enforced.
        let last = IpAddr::from((0x0a00_0000u32 | 999_999).to_be_bytes());
        for _ in 1..5 {
            limiter.check(last, "p999999").unwrap();
        }
        assert!(refused(limiter.check(last, "p999999")));
    }

    #[test]
    fn a_full_table_evicts_the_window_that_started_first() {
        let budget = Budget::new(1, 3);
        let start = Instant::now();
        for (n, key) in ["a", "b", "c"].into_iter().enumerate() {
            budget
                .spend_at(start + Duration::from_secs(n as u64), key)
                .unwrap();
        }
        budget
            .spend_at(start + Duration::from_secs(3), "d")
            .unwrap();
        let windows = budget.lock();
        assert_eq!(windows.len(), 3);
        assert!(!windows.open.contains_key("a"));
        assert!(["b", "c", "d"].iter().all(|k| windows.open.contains_key(k)));
    }

    #[test]
    fn expired_windows_are_dropped_as_time_passes() {
        let budget = Budget::new(1, 1000);
        let start = Instant::now();
        for n in 0..500u32 {
            budget.spend_at(start, n).unwrap();
        }
        budget.spend_at(start + WINDOW, 9999).unwrap();
        assert_eq!(budget.lock().len(), 1);
        assert_eq!(budget.lock().by_start.len(), 1);
    }
}
