//! The one place that decides whether a retry may be scheduled (DESIGN.md §2).
//!
//! The checks run in the contract's order, so the refusal a caller sees is stable:
//! succeeded → processing → window passed → retry scheduled → open → attempts ≥ max → non-retryable
//! reason → the retry could not start inside the window. Visibility (404) is the caller's
//! concern and comes before all of these.

use crate::failure::FailureReason;
use crate::ids::AttemptNumber;
use crate::policy::RetryPolicy;
use crate::status::{RetryUnavailableReason, SessionStatus};
use chrono::{DateTime, TimeDelta, Utc};
use std::time::Duration;

/// What eligibility needs to know about a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSnapshot {
    pub status: SessionStatus,
    /// Retries already spent.
    pub retry_attempts: u32,
    pub failure_reason: Option<FailureReason>,
    pub expires_at: DateTime<Utc>,
}

/// A retry that may go ahead: which attempt, how long to wait, when the checkout is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPlan {
    pub attempt: AttemptNumber,
    pub delay: Duration,
    pub scheduled_for: DateTime<Utc>,
    /// Retries left after this one.
    pub remaining_after: u32,
}

/// Why a retry was refused, one variant per contract code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RetryRefusal {
    #[error("the payment has already succeeded")]
    PaymentAlreadySucceeded,
    #[error("a payment is being processed; its outcome is not known yet")]
    PaymentProcessing,
    #[error("the payment window has closed")]
    WindowExpired,
    #[error("a retry is already scheduled")]
    RetryAlreadyScheduled,
    #[error("the payment has not failed")]
    PaymentNotFailed,
    #[error("no retries are left for this payment")]
    RetryLimitReached,
    #[error("this failure cannot be retried with the same payment method")]
    FailureNotRetryable,
    #[error("the retry could not start before the payment window closes")]
    WouldStartAfterWindow,
}

impl RetryRefusal {
    /// The contract's error `code`.
    pub const fn code(self) -> &'static str {
        match self {
            Self::PaymentAlreadySucceeded => "payment_already_succeeded",
            Self::PaymentProcessing => "payment_processing",
            Self::WindowExpired | Self::WouldStartAfterWindow => "payment_window_expired",
            Self::RetryAlreadyScheduled => "retry_already_scheduled",
            Self::PaymentNotFailed => "payment_not_failed",
            Self::RetryLimitReached => "retry_limit_reached",
            Self::FailureNotRetryable => "failure_not_retryable",
        }
    }

    /// The contract's HTTP status: 410 for the window, 409 for every other refusal.
    pub const fn http_status(self) -> u16 {
        match self {
            Self::WindowExpired | Self::WouldStartAfterWindow => 410,
            _ => 409,
        }
    }

    /// The status object's `retryUnavailableReason` for this refusal.
    pub const fn unavailable_reason(self) -> RetryUnavailableReason {
        match self {
            Self::PaymentAlreadySucceeded => RetryUnavailableReason::PaymentSucceeded,
            Self::PaymentProcessing => RetryUnavailableReason::PaymentProcessing,
            Self::WindowExpired | Self::WouldStartAfterWindow => {
                RetryUnavailableReason::WindowExpired
            }
            Self::RetryAlreadyScheduled => RetryUnavailableReason::RetryScheduled,
            Self::PaymentNotFailed => RetryUnavailableReason::PaymentNotFailed,
            Self::RetryLimitReached => RetryUnavailableReason::LimitReached,
            Self::FailureNotRetryable => RetryUnavailableReason::FailureNotRetryable,
        }
    }
}

/// The status a caller should see: `expired` as soon as the window has passed, whether or
/// not the sweeper has run, unless the session was paid or its payment is processing (money
/// may still move: only the provider's outcome ends it).
pub fn effective_status(snapshot: &SessionSnapshot, now: DateTime<Utc>) -> SessionStatus {
    let waits_for_outcome = matches!(
        snapshot.status,
        SessionStatus::Succeeded | SessionStatus::Processing
    );
    if !waits_for_outcome && now >= snapshot.expires_at {
        SessionStatus::Expired
    } else {
        snapshot.status
    }
}

/// Decides whether the buyer may retry now, in the contract's order.
pub fn check_retry(
    snapshot: &SessionSnapshot,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
) -> Result<RetryPlan, RetryRefusal> {
    match effective_status(snapshot, now) {
        SessionStatus::Succeeded => return Err(RetryRefusal::PaymentAlreadySucceeded),
        SessionStatus::Processing => return Err(RetryRefusal::PaymentProcessing),
        SessionStatus::Expired => return Err(RetryRefusal::WindowExpired),
        SessionStatus::RetryScheduled => return Err(RetryRefusal::RetryAlreadyScheduled),
        SessionStatus::Open => return Err(RetryRefusal::PaymentNotFailed),
        SessionStatus::Failed => {}
    }
    if snapshot.retry_attempts >= policy.max_attempts {
        return Err(RetryRefusal::RetryLimitReached);
    }
    if let Some(reason) = &snapshot.failure_reason
        && !policy.is_retryable(reason)
    {
        return Err(RetryRefusal::FailureNotRetryable);
    }
    let attempt = AttemptNumber::new(snapshot.retry_attempts + 1);
    let delay = policy.delay_for(attempt);
    let scheduled_for = TimeDelta::from_std(delay)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .ok_or(RetryRefusal::WouldStartAfterWindow)?;
    if scheduled_for >= snapshot.expires_at {
        return Err(RetryRefusal::WouldStartAfterWindow);
    }
    Ok(RetryPlan {
        attempt,
        delay,
        scheduled_for,
        remaining_after: policy.max_attempts - attempt.get(),
    })
}

/// The status object's `retryUnavailableReason`: `None` exactly when [`check_retry`] would
/// let the buyer retry now, otherwise the reason of its refusal.
pub fn retry_unavailable_reason(
    snapshot: &SessionSnapshot,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
) -> Option<RetryUnavailableReason> {
    check_retry(snapshot, policy, now)
        .err()
        .map(RetryRefusal::unavailable_reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn failed(attempts: u32, reason: &str) -> SessionSnapshot {
        SessionSnapshot {
            status: SessionStatus::Failed,
            retry_attempts: attempts,
            failure_reason: Some(FailureReason::from_code(reason)),
            expires_at: now() + TimeDelta::hours(20),
        }
    }

    #[test]
    fn first_retry_waits_one_minute() {
        let plan = check_retry(
            &failed(0, "insufficient_funds"),
            &RetryPolicy::default(),
            now(),
        )
        .unwrap();
        assert_eq!(plan.attempt, AttemptNumber::new(1));
        assert_eq!(plan.delay, Duration::from_secs(60));
        assert_eq!(plan.scheduled_for, now() + TimeDelta::minutes(1));
        assert_eq!(plan.remaining_after, 2);
    }

    #[test]
    fn refusals_follow_the_contract_codes() {
        let policy = RetryPolicy::default();
        let mut s = failed(3, "insufficient_funds");
        assert_eq!(
            check_retry(&s, &policy, now()),
            Err(RetryRefusal::RetryLimitReached)
        );
        s.retry_attempts = 1;
        s.failure_reason = Some(FailureReason::from_code("stolen_card"));
        assert_eq!(
            check_retry(&s, &policy, now()),
            Err(RetryRefusal::FailureNotRetryable)
        );
        s.failure_reason = None;
        s.expires_at = now() + TimeDelta::seconds(299);
        let refusal = check_retry(&s, &policy, now()).unwrap_err();
        assert_eq!(refusal, RetryRefusal::WouldStartAfterWindow);
        assert_eq!(
            (refusal.http_status(), refusal.code()),
            (410, "payment_window_expired")
        );
    }

    #[test]
    fn a_retry_due_exactly_at_the_window_end_is_refused() {
        let mut s = failed(0, "card_declined");
        s.expires_at = now() + TimeDelta::minutes(1);
        assert_eq!(
            check_retry(&s, &RetryPolicy::default(), now()),
            Err(RetryRefusal::WouldStartAfterWindow)
        );
    }

    fn any_status() -> impl Strategy<Value = SessionStatus> {
        prop::sample::select(vec![
            SessionStatus::Open,
            SessionStatus::Failed,
            SessionStatus::RetryScheduled,
            SessionStatus::Processing,
            SessionStatus::Succeeded,
            SessionStatus::Expired,
        ])
    }

    proptest! {
        /// The first failing check in the contract's order is the one reported.
        #[test]
        fn refusal_order_matches_the_contract(
            status in any_status(),
            attempts in 0u32..6,
            non_retryable in any::<bool>(),
            minutes_left in -30i64..60,
        ) {
            let policy = RetryPolicy::default();
            let snapshot = SessionSnapshot {
                status,
                retry_attempts: attempts,
                failure_reason: Some(FailureReason::from_code(if non_retryable { "fraudulent" } else { "do_not_honor" })),
                expires_at: now() + TimeDelta::minutes(minutes_left),
            };
            let window_passed = minutes_left <= 0;
            let expected = if status == SessionStatus::Succeeded {
                Err(RetryRefusal::PaymentAlreadySucceeded)
            } else if status == SessionStatus::Processing {
                Err(RetryRefusal::PaymentProcessing)
            } else if window_passed || status == SessionStatus::Expired {
                Err(RetryRefusal::WindowExpired)
            } else if status == SessionStatus::RetryScheduled {
                Err(RetryRefusal::RetryAlreadyScheduled)
            } else if status == SessionStatus::Open {
                Err(RetryRefusal::PaymentNotFailed)
            } else if attempts >= 3 {
                Err(RetryRefusal::RetryLimitReached)
            } else if non_retryable {
                Err(RetryRefusal::FailureNotRetryable)
            } else {
                let delay_minutes = [1, 5, 15][attempts as usize];
                if delay_minutes >= minutes_left {
                    Err(RetryRefusal::WouldStartAfterWindow)
                } else {
                    Ok(AttemptNumber::new(attempts + 1))
                }
            };
            prop_assert_eq!(check_retry(&snapshot, &policy, now()).map(|p| p.attempt), expected);
        }

        /// However many times a buyer asks, no more than `max_attempts` retries are granted.
        #[test]
        fn attempts_never_exceed_the_cap(max in 0u32..6, presses in 0usize..12) {
            let policy = RetryPolicy::new(vec![Duration::from_secs(1)], max, Duration::from_secs(86_400), vec![]).unwrap();
            let mut s = failed(0, "card_declined");
            for _ in 0..presses {
                if let Ok(plan) = check_retry(&s, &policy, now()) {
                    s.retry_attempts = plan.attempt.get();
                    prop_assert!(plan.attempt.get() <= max);
                }
            }
            prop_assert!(s.retry_attempts <= max);
        }
    }
}
