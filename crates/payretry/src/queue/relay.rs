//! The outbox relay for SQS: moves retry jobs from the outbox table (written in the same
//! transaction as the state change) to the SQS queue, deleting each row only after SQS
//! accepted it. While SQS is down the rows simply stay: nothing is lost, and they drain
//! when it returns. A relay that dies mid-send leaves its rows leased; another (or the same
//! after restart) claims them when the lease ends, so a row may be sent twice, which the
//! worker's attempt check makes harmless.

use super::Outbox;
use super::sqs::SqsQueue;
use crate::shutdown::Shutdown;
use std::sync::Arc;
use std::time::Duration;

/// Rows claimed per round (sent in batches of 10).
const BATCH: u32 = 100;
/// How long claimed rows are hidden from other relays while being sent.
const LEASE: Duration = Duration::from_secs(30);
/// Longest sleep when nothing wakes the relay (rows written by other processes).
const IDLE_POLL: Duration = Duration::from_secs(1);

pub struct SqsRelay {
    pub outbox: Arc<dyn Outbox>,
    pub sqs: Arc<SqsQueue>,
}

impl SqsRelay {
    /// Relays one round; returns how many rows SQS accepted.
    pub async fn relay_once(&self) -> Result<usize, crate::storage::StorageError> {
        let rows = self.outbox.claim_outbox(BATCH, LEASE).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let jobs: Vec<_> = rows.iter().map(|d| d.job.clone()).collect();
        let accepted = self.sqs.send(&jobs).await?;
        for index in &accepted {
            self.outbox.delete_outbox(&rows[*index]).await?;
        }
        Ok(accepted.len())
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
                    let delay = Duration::from_millis(200)
                        .saturating_mul(1 << failures.min(8))
                        .min(Duration::from_secs(30));
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
