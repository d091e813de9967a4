//! The outbox relay for SQS: moves retry jobs from the outbox table (written in the same
//! transaction as the state change) to the SQS queue, deleting each row only after SQS
//! accepted it. While SQS is down the rows simply stay: nothing is lost, and they drain
//! when it returns. A relay that dies mid-send leaves its rows leased; another (or the same
//! after restart) claims them when the lease ends, so a row may be sent twice, which the
//! worker's attempt check makes harmless.

use super::sqs::SqsQueue;
use super::{Outbox, QueueResult};
use crate::shutdown::Shutdown;
use payretry_domain::Backoff;
use std::sync::Arc;
use std::time::Duration;

/// Rows claimed per round (sent in batches of 10).
const BATCH: u32 = 100;
/// Longest sleep when nothing wakes the relay (rows written by other processes).
const IDLE_POLL: Duration = Duration::from_secs(1);

pub struct SqsRelay {
    pub outbox: Arc<dyn Outbox>,
    pub sqs: Arc<SqsQueue>,
    /// How long claimed rows are hidden from other relays while being sent; after a
    /// relay dies mid-send, its rows are claimed again once this has passed.
    pub lease: Duration,
}

impl SqsRelay {
    /// Relays one round; returns how many rows SQS accepted. Rows it did not accept are
    /// released at once, so they go as soon as SQS is back rather than after their lease.
    pub async fn relay_once(&self) -> QueueResult<usize> {
        let rows = self.outbox.claim_outbox(BATCH, self.lease).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        crate::crash_point!("relay-before-send");
        let jobs: Vec<_> = rows.iter().map(|d| d.job.clone()).collect();
        let (accepted, failure) = self.sqs.send(&jobs).await;
        let accepted: std::collections::HashSet<usize> = accepted.into_iter().collect();
        let (sent, refused): (Vec<_>, Vec<_>) = rows
            .into_iter()
            .enumerate()
            .partition(|(index, _)| accepted.contains(index));
        let sent: Vec<_> = sent.into_iter().map(|(_, row)| row).collect();
        let refused: Vec<_> = refused.into_iter().map(|(_, row)| row).collect();
        // Both, whatever the other's outcome: a failed delete leaves its rows leased (sent
        // again after the lease, which the worker's attempt check makes harmless), and must
        // not keep the refused rows from being released now.
        let deleted = self.outbox.delete_outbox(&sent).await;
        let released = self.outbox.release_outbox(&refused).await;
        if let Err(error) = &deleted {
            tracing::warn!(%error, rows = sent.len(), "could not delete relayed outbox rows; they are sent again after their lease");
        }
        deleted?;
        released?;
        match failure {
            Some(error) if accepted.is_empty() => Err(error),
            _ => Ok(accepted.len()),
        }
    }

    pub async fn run(self, mut shutdown: Shutdown) {
        let mut failures = 0u32;
        while !shutdown.is_triggered() {
            let wait = match self.relay_once().await {
                Ok(n) if n > 0 => {
                    failures = 0;
                    continue;
                }
                Ok(_) => IDLE_POLL,
                Err(error) => {
                    failures += 1;
                    let delay =
                        Backoff::doubling(Duration::from_millis(200), 8, Duration::from_secs(30))
                            .delay(failures);
                    tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "outbox relay to SQS failed; rows kept");
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.outbox.outbox_written(), if failures == 0 => {}
                _ = shutdown.wait() => {}
            }
        }
    }
}
