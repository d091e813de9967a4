//! Closing provider checkouts nobody should pay any more (DESIGN.md §2: "when a session
//! succeeds, every other live checkout of it is closed at the provider").
//!
//! A checkout becomes unwanted when a newer attempt's checkout replaces it (a declined
//! checkout stays payable at Stripe), when the session is paid through another attempt's
//! checkout, or when the window closes. The lifecycle names it in the change's
//! `close_checkouts`, and the transition records it in the same commit, so the decision
//! survives a crash and a provider outage (a checkout created for a session that moved on
//! meanwhile is recorded on its own, `Storage::schedule_checkout_closures`). The commit wakes
//! the sweeper, which closes it at once, and retries with backoff until the provider says
//! the checkout is closed (an expired or completed one counts as closed), or until it would
//! have expired by itself ([`GIVE_UP_AFTER`]). One path for every closing: no request waits
//! on the provider for it, and no two loops race to close the same checkout.

use super::{Payments, ServiceResult};
use crate::provider::ProviderError;
use crate::storage::CheckoutClosure;
use chrono::{DateTime, TimeDelta, Utc};
use payretry_domain::Backoff;
use std::time::Duration;

/// Stripe closes every checkout within 24 hours of its creation; past that (with an hour of
/// slack) there is nothing left to close.
pub const GIVE_UP_AFTER: TimeDelta = TimeDelta::hours(25);

/// Closures tried per sweep, so one sweep stays short after an outage.
const BATCH: u32 = 50;

/// When to try again after `tries` failed tries: 5 s doubling, at most 30 minutes.
const RETRY_BACKOFF: Backoff =
    Backoff::doubling(Duration::from_secs(5), 9, Duration::from_secs(30 * 60));

fn retry_delay(tries: u32) -> TimeDelta {
    TimeDelta::from_std(RETRY_BACKOFF.delay(tries)).unwrap_or(TimeDelta::MAX)
}

impl Payments {
    /// Tries every closure that is due; returns how many checkouts were closed.
    pub async fn close_due_checkouts(&self, now: DateTime<Utc>) -> ServiceResult<usize> {
        let due = self.storage.due_checkout_closures(now, BATCH).await?;
        let mut closed = 0;
        for closure in &due {
            if self.close_checkout(closure, now).await? {
                closed += 1;
            }
        }
        Ok(closed)
    }

    /// One try: closed (or past saving) → forgotten; otherwise scheduled again.
    async fn close_checkout(
        &self,
        closure: &CheckoutClosure,
        now: DateTime<Utc>,
    ) -> ServiceResult<bool> {
        let checkout = &closure.provider_session_id;
        let error = match self.provider.expire_checkout(checkout).await {
            Ok(()) => {
                self.storage.checkout_closed(checkout).await?;
                tracing::info!(session_id = %closure.session_id, provider_session_id = %checkout, "closed a checkout nobody should pay any more");
                return Ok(true);
            }
            Err(
                ProviderError::Transient(e)
                | ProviderError::RateLimited(e)
                | ProviderError::Permanent(e),
            ) => e,
        };
        if now - closure.created_at > GIVE_UP_AFTER {
            tracing::error!(session_id = %closure.session_id, provider_session_id = %checkout, %error, "gave up closing a checkout; the provider has expired it by now");
            self.storage.checkout_closed(checkout).await?;
            return Ok(false);
        }
        tracing::warn!(session_id = %closure.session_id, provider_session_id = %checkout, tries = closure.tries + 1, %error, "could not close a checkout; will retry");
        self.storage
            .checkout_close_failed(checkout, now + retry_delay(closure.tries), &error)
            .await?;
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_half_an_hour() {
        assert_eq!(retry_delay(0), TimeDelta::seconds(5));
        assert_eq!(retry_delay(1), TimeDelta::seconds(10));
        assert_eq!(retry_delay(5), TimeDelta::seconds(160));
        assert_eq!(retry_delay(9), TimeDelta::minutes(30));
        assert_eq!(retry_delay(u32::MAX), TimeDelta::minutes(30));
    }
}
