//! Request budgets on the routes that create checkouts and retries, so the retry endpoint
//! cannot be used for card testing: one per principal, and a wider one per client IP (an
//! attacker with many tokens still has one address; buyers behind one NAT share it, hence
//! the wider budget). Fixed one-minute windows, in memory: each API process enforces its
//! own budgets.

use super::error::ApiError;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

/// How many times the per-principal budget one client IP gets.
pub const IP_BUDGET_FACTOR: u32 = 10;

pub struct RateLimiter {
    principals: Budget,
    addresses: Budget,
}

impl RateLimiter {
    pub fn new(per_principal_per_minute: u32) -> Self {
        Self {
            principals: Budget::new(per_principal_per_minute),
            addresses: Budget::new(per_principal_per_minute.saturating_mul(IP_BUDGET_FACTOR)),
        }
    }

    /// Counts one request from `ip` by `principal`; 429 with `Retry-After` when either is
    /// over budget.
    pub fn check(&self, ip: IpAddr, principal: &str) -> Result<(), ApiError> {
        self.addresses.spend(&ip.to_string())?;
        self.principals.spend(principal)
    }
}

/// Fixed one-minute windows, one per key.
struct Budget {
    per_minute: u32,
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl Budget {
    fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            windows: Mutex::new(HashMap::new()),
        }
    }

    fn spend(&self, key: &str) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() > 100_000 {
            windows.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let entry = windows.entry(key.to_owned()).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        if entry.1 >= self.per_minute {
            let left = WINDOW.saturating_sub(now.duration_since(entry.0));
            return Err(ApiError::RateLimited {
                retry_after_secs: left.as_secs().max(1),
            });
        }
        entry.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn budget_is_per_principal() {
        let limiter = RateLimiter::new(2);
        assert!(limiter.check(ip(1), "a").is_ok());
        assert!(limiter.check(ip(2), "a").is_ok());
        assert!(matches!(
            limiter.check(ip(3), "a"),
            Err(ApiError::RateLimited { retry_after_secs }) if retry_after_secs >= 1
        ));
        assert!(limiter.check(ip(1), "b").is_ok());
    }

    #[test]
    fn one_address_cannot_spread_requests_over_many_principals() {
        let limiter = RateLimiter::new(1);
        for n in 0..IP_BUDGET_FACTOR {
            assert!(limiter.check(ip(9), &format!("token-{n}")).is_ok());
        }
        assert!(matches!(
            limiter.check(ip(9), "fresh-token"),
            Err(ApiError::RateLimited { .. })
        ));
        assert!(limiter.check(ip(8), "fresh-token").is_ok());
    }
}
