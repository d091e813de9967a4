//! The window sweeper: expires sessions whose payment window closed, sleeping until the
//! next window end, purges idempotency records and processed event ids past 24 hours, and
//! closes the provider checkouts nobody should pay any more (see `service::closures`).
//! Owed duplicate refunds are the refund runner's.

use crate::service::Payments;
use crate::shutdown::Shutdown;
use chrono::{TimeDelta, Utc};
use std::sync::Arc;
use std::time::Duration;

pub struct Sweeper {
    pub payments: Arc<Payments>,
    /// Longest sleep between sweeps (sessions created by other processes are seen then).
    pub interval: Duration,
}

impl Sweeper {
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut last_purge = Utc::now() - TimeDelta::hours(2);
        while !shutdown.is_triggered() {
            match self.payments.expire_due_sessions().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(expired = n, "expired sessions whose window closed"),
                Err(error) => tracing::error!(%error, "window sweep failed"),
            }
            match self.payments.close_due_checkouts(Utc::now()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(closed = n, "closed checkouts nobody should pay any more"),
                Err(error) => tracing::error!(%error, "closing unwanted checkouts failed"),
            }
            if Utc::now() - last_purge > TimeDelta::hours(1) {
                let before = Utc::now() - TimeDelta::hours(24);
                if let Err(error) = self.payments.storage.purge_expired(before).await {
                    tracing::error!(%error, "purging idempotency records failed");
                }
                last_purge = Utc::now();
            }
            let next = self
                .payments
                .storage
                .next_window_end()
                .await
                .unwrap_or(None);
            let sleep = next
                .and_then(|at| (at - Utc::now()).to_std().ok())
                .map_or(self.interval, |d| d.min(self.interval));
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.payments.storage.checkouts_to_close() => {}
                _ = shutdown.wait() => {}
            }
        }
    }
}
