//! The refund runner: makes the provider calls of duplicate-payment refunds owed
//! (`service::duplicates`), outside any request.
//!
//! It is woken as soon as this process commits a double payment with a refund owed, and
//! otherwise looks every `interval`, so an owed refund left by a crash, an outage or another
//! process (whose own runner died) is found. Runners of several processes may look at once:
//! each refund call is claimed first, so only one of them makes it.

use crate::service::Payments;
use crate::service::duplicates::{REFUND_RETRY_BATCH, REFUND_RETRY_GRACE};
use crate::shutdown::Shutdown;
use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;

pub struct RefundRunner {
    pub payments: Arc<Payments>,
    /// Longest sleep between passes when nothing wakes it.
    pub interval: Duration,
}

impl RefundRunner {
    pub async fn run(self, mut shutdown: Shutdown) {
        while !shutdown.is_triggered() {
            let answered = match self
                .payments
                .retry_owed_refunds(Utc::now() - REFUND_RETRY_GRACE)
                .await
            {
                Ok(n) => n,
                Err(error) => {
                    tracing::error!(%error, "making owed duplicate refunds failed");
                    0
                }
            };
            if answered > 0 {
                tracing::info!(answered, "made owed duplicate refunds");
            }
            // A full batch may have left more behind: go again at once.
            if answered >= REFUND_RETRY_BATCH as usize {
                continue;
            }
            tokio::select! {
                _ = self.payments.storage.refund_owed() => {}
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.wait() => {}
            }
        }
    }
}
