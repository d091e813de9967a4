//! The retry policy: how long a buyer waits before each retry checkout, how many retries a
//! session gets, how long the payment window is, and which failures may not be retried.

use crate::failure::FailureReason;
use crate::ids::AttemptNumber;
use std::time::Duration;

/// The rules every retry is checked against. Built once from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay for attempt N is `delays[N-1]`; past the list the last delay repeats.
    delays: Vec<Duration>,
    /// Retries allowed per session (the original checkout is not counted).
    pub max_attempts: u32,
    /// How long a session may be paid, counted from its creation.
    pub window: Duration,
    /// Failures that need a different payment path, never a retry of the same card.
    pub non_retryable: Vec<FailureReason>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("expected a comma list of durations like `1m,5m,15m` (units s, m, h)")]
    Delays,
    #[error("expected a duration like `90s`, `15m` or `24h`")]
    Duration,
}

impl RetryPolicy {
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);
    /// Decline codes never retried by default. All are values Stripe puts in a
    /// `payment_intent.payment_failed` event's `last_payment_error.decline_code`, where
    /// payretry reads the reason (DESIGN.md §4). Radar's `highest_risk_level` is not among
    /// them: it is a charge's `outcome.reason`, which that event does not carry
    /// (`last_payment_error.charge` is only the charge's id, and event payloads are never
    /// expanded). A payment Radar blocks for highest risk arrives as `card_declined`, with
    /// `decline_code` `fraudulent` when Stripe gives one — and `fraudulent` is listed.
    pub const DEFAULT_NON_RETRYABLE: [&'static str; 5] = [
        "fraudulent",
        "stolen_card",
        "lost_card",
        "pickup_card",
        "merchant_blacklist",
    ];

    /// A policy; `delays` must not be empty.
    pub fn new(
        delays: Vec<Duration>,
        max_attempts: u32,
        window: Duration,
        non_retryable: Vec<FailureReason>,
    ) -> Result<Self, PolicyError> {
        if delays.is_empty() {
            return Err(PolicyError::Delays);
        }
        Ok(Self {
            delays,
            max_attempts,
            window,
            non_retryable,
        })
    }

    /// The minimum wait between the buyer's click and the checkout of retry `attempt`
    /// (1-based). Attempt 0 (the original checkout) has no delay.
    pub fn delay_for(&self, attempt: AttemptNumber) -> Duration {
        match attempt.get() {
            0 => Duration::ZERO,
            n => {
                let index = (n as usize - 1).min(self.delays.len() - 1);
                self.delays[index]
            }
        }
    }

    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }

    pub fn is_retryable(&self, reason: &FailureReason) -> bool {
        !self.non_retryable.contains(reason)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            delays: vec![
                Duration::from_secs(60),
                Duration::from_secs(5 * 60),
                Duration::from_secs(15 * 60),
            ],
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            window: Self::DEFAULT_WINDOW,
            non_retryable: Self::DEFAULT_NON_RETRYABLE
                .iter()
                .map(|code| FailureReason::from_code(code))
                .collect(),
        }
    }
}

/// Parses `90s`, `15m`, `24h` (a whole number and one unit).
pub fn parse_duration(raw: &str) -> Result<Duration, PolicyError> {
    let raw = raw.trim();
    let (digits, unit) = raw.split_at(raw.len().saturating_sub(1));
    let n: u64 = digits.parse().map_err(|_| PolicyError::Duration)?;
    let seconds = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        _ => None,
    };
    seconds
        .map(Duration::from_secs)
        .ok_or(PolicyError::Duration)
}

/// Parses `1m,5m,15m`.
pub fn parse_delays(raw: &str) -> Result<Vec<Duration>, PolicyError> {
    let delays: Result<Vec<_>, _> = raw.split(',').map(parse_duration).collect();
    match delays {
        Ok(list) if !list.is_empty() => Ok(list),
        _ => Err(PolicyError::Delays),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_delays_are_one_five_fifteen_minutes() {
        let policy = RetryPolicy::default();
        let minutes: Vec<u64> = (1..=4)
            .map(|n| policy.delay_for(AttemptNumber::new(n)).as_secs() / 60)
            .collect();
        assert_eq!(minutes, [1, 5, 15, 15]);
        assert_eq!(policy.delay_for(AttemptNumber::ORIGINAL), Duration::ZERO);
        assert_eq!(policy.max_attempts, 3);
        assert_eq!(policy.window, Duration::from_secs(86_400));
        assert!(!policy.is_retryable(&FailureReason::from_code("stolen_card")));
        assert!(policy.is_retryable(&FailureReason::from_code("insufficient_funds")));
    }

    #[test]
    fn the_default_non_retryable_reasons_are_decline_codes_a_failure_event_carries() {
        let policy = RetryPolicy::default();
        for code in [
            "fraudulent",
            "stolen_card",
            "lost_card",
            "pickup_card",
            "merchant_blacklist",
        ] {
            assert!(
                !policy.is_retryable(&FailureReason::from_code(code)),
                "{code}"
            );
        }
        // A charge outcome reason, never a failure event's reason: not a default (it can
        // still be configured through PAYRETRY_NON_RETRYABLE_REASONS).
        assert_eq!(policy.non_retryable.len(), 5);
        assert!(
            !policy
                .non_retryable
                .contains(&FailureReason::from_code("highest_risk_level"))
        );
        // A Radar block without a decline code arrives as the error code alone.
        assert!(policy.is_retryable(&FailureReason::from_code("card_declined")));
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        for bad in ["", "m", "5", "5d", "-1m", "1.5m", "m5"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_delays("1s,2s").unwrap().len(), 2);
        assert!(parse_delays("1s,,2s").is_err());
    }

    #[test]
    fn a_policy_needs_at_least_one_delay() {
        assert_eq!(
            RetryPolicy::new(vec![], 3, Duration::from_secs(60), vec![]),
            Err(PolicyError::Delays)
        );
    }

    proptest! {
        /// Delay N is the Nth configured delay; past the list the last one repeats.
        #[test]
        fn delay_for_follows_the_list_then_repeats_the_last(
            delays in prop::collection::vec(1u64..100_000, 1..6),
            attempt in 1u32..50,
        ) {
            let durations: Vec<Duration> = delays.iter().map(|s| Duration::from_secs(*s)).collect();
            let policy = RetryPolicy::new(durations, 3, Duration::from_secs(86_400), vec![]).unwrap();
            let expected = delays.get(attempt as usize - 1).copied().unwrap_or(*delays.last().unwrap());
            prop_assert_eq!(policy.delay_for(AttemptNumber::new(attempt)), Duration::from_secs(expected));
        }

        #[test]
        fn durations_round_trip(n in 0u64..1_000_000, unit in prop::sample::select(vec!["s", "m", "h"])) {
            let factor = match unit { "s" => 1, "m" => 60, _ => 3600 };
            prop_assert_eq!(parse_duration(&format!("{n}{unit}")), Ok(Duration::from_secs(n * factor)));
        }
    }
}
