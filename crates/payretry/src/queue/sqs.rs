//! Amazon SQS as the retry queue (DESIGN.md §5, `PAYRETRY_QUEUE=sqs`).
//!
//! - Producers never talk to SQS: jobs are written to the outbox in the state change's
//!   transaction, and the [`relay`](super::relay) moves them here with `DelaySeconds`.
//! - Workers long-poll, delete on success, and leave failures to the visibility timeout
//!   (`release` shortens it to the backoff). A job whose due time is beyond SQS's 15-minute
//!   delay arrives early and is re-sent with the rest of its delay ([`JobQueue::defer`]).
//! - After `maxReceiveCount` receives the redrive policy moves a message to the dead-letter
//!   queue; the worker drains that queue into payretry's dead letters so the session is
//!   handed back to the buyer (never stuck in `retry_scheduled`).

use super::{DeadLetterQueue, Delivery, JobQueue, QueueError, QueueResult};
use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};
use chrono::{DateTime, Utc};
use payretry_domain::RetryJob;
use std::collections::HashMap;
use std::time::Duration;

/// SQS's longest per-message delay.
pub const MAX_DELAY_SECONDS: i64 = 900;
/// Long-poll wait: bounded so a shutdown is noticed within this time.
const WAIT_TIME_SECONDS: i32 = 5;

/// `payments-retry-{env}` and `payments-retry-{env}-dlq`.
pub fn queue_names(env: &str) -> (String, String) {
    let main = format!("payments-retry-{env}");
    let dlq = format!("{main}-dlq");
    (main, dlq)
}

fn sqs_error(context: &str, error: impl std::fmt::Display) -> QueueError {
    QueueError::Sqs(format!("SQS {context}: {error}"))
}

/// Builds an SQS client from the standard AWS chain, optionally at a local endpoint.
pub async fn client(endpoint: Option<&str>) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    let shared = loader.load().await;
    let mut config = aws_sdk_sqs::config::Builder::from(&shared);
    if shared.region().is_none() {
        config = config.region(aws_sdk_sqs::config::Region::new("us-east-1"));
    }
    Client::from_conf(config.build())
}

/// Creates both queues and the redrive policy; safe to run again.
pub async fn setup(client: &Client, env: &str, max_receives: u32) -> QueueResult<(String, String)> {
    let (main, dlq) = queue_names(env);
    let dlq_url = client
        .create_queue()
        .queue_name(&dlq)
        .attributes(QueueAttributeName::MessageRetentionPeriod, "1209600")
        .send()
        .await
        .map_err(|e| {
            sqs_error(
                "create dead-letter queue",
                aws_sdk_sqs::error::DisplayErrorContext(e),
            )
        })?
        .queue_url
        .unwrap_or_default();
    let dlq_arn = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| {
            sqs_error(
                "read dead-letter queue ARN",
                aws_sdk_sqs::error::DisplayErrorContext(e),
            )
        })?
        .attributes
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .ok_or_else(|| QueueError::Sqs("SQS returned no dead-letter queue ARN".into()))?;
    let redrive = serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receives.to_string()});
    let main_url = client
        .create_queue()
        .queue_name(&main)
        .send()
        .await
        .map_err(|e| sqs_error("create queue", aws_sdk_sqs::error::DisplayErrorContext(e)))?
        .queue_url
        .unwrap_or_default();
    client
        .set_queue_attributes()
        .queue_url(&main_url)
        .attributes(QueueAttributeName::RedrivePolicy, redrive.to_string())
        .attributes(QueueAttributeName::VisibilityTimeout, "60")
        .send()
        .await
        .map_err(|e| {
            sqs_error(
                "set redrive policy",
                aws_sdk_sqs::error::DisplayErrorContext(e),
            )
        })?;
    Ok((main_url, dlq_url))
}

/// The retry queue on SQS.
pub struct SqsQueue {
    client: Client,
    queue_url: String,
    dlq_url: String,
}

impl SqsQueue {
    /// Finds both queues by name; fails with a hint if `payretry sqs setup` was not run.
    pub async fn connect(client: Client, env: &str) -> QueueResult<Self> {
        let (main, dlq) = queue_names(env);
        let url = |name: String| {
            let client = client.clone();
            async move {
                client
                    .get_queue_url()
                    .queue_name(&name)
                    .send()
                    .await
                    .map_err(|e| {
                        sqs_error(
                            &format!("queue {name} not found (run `payretry sqs setup`)"),
                            aws_sdk_sqs::error::DisplayErrorContext(e),
                        )
                    })?
                    .queue_url
                    .ok_or_else(|| QueueError::Sqs(format!("SQS returned no URL for {name}")))
            }
        };
        let queue_url = url(main).await?;
        let dlq_url = url(dlq).await?;
        Ok(Self {
            client,
            queue_url,
            dlq_url,
        })
    }

    /// Sends jobs with their remaining delay (rounded up to whole seconds, capped at 15
    /// minutes), in batches of 10. Returns the indexes (into `jobs`) SQS accepted, and the
    /// error that stopped any batch: one failed batch does not hide the ones that went.
    pub async fn send(&self, jobs: &[RetryJob]) -> (Vec<usize>, Option<QueueError>) {
        let mut accepted = Vec::with_capacity(jobs.len());
        let mut failure = None;
        for (chunk_index, chunk) in jobs.chunks(10).enumerate() {
            match self.send_batch(chunk).await {
                Ok(ids) => accepted.extend(ids.into_iter().map(|i| chunk_index * 10 + i)),
                Err(error) => failure = Some(error),
            }
        }
        (accepted, failure)
    }

    async fn send_batch(&self, chunk: &[RetryJob]) -> QueueResult<Vec<usize>> {
        let now = Utc::now();
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, job)| {
                // Rounded up: a job must never arrive before it is due.
                let millis = (job.scheduled_for - now).num_milliseconds();
                let delay = ((millis + 999) / 1000).clamp(0, MAX_DELAY_SECONDS);
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(serde_json::to_string(job).expect("jobs serialise"))
                    .delay_seconds(delay as i32)
                    .build()
                    .map_err(|e| sqs_error("build batch entry", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let output = self
            .client
            .send_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| sqs_error("send", aws_sdk_sqs::error::DisplayErrorContext(e)))?;
        for failed in output.failed() {
            tracing::warn!(
                code = failed.code(),
                message = failed.message(),
                "SQS refused a job; it stays in the outbox"
            );
        }
        Ok(output
            .successful()
            .iter()
            .filter_map(|entry| entry.id().parse::<usize>().ok())
            .collect())
    }
}

async fn receive(
    client: &Client,
    url: &str,
    max: u32,
    lease: Duration,
    wait: i32,
) -> QueueResult<Vec<Delivery>> {
    let output = client
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(max.clamp(1, 10) as i32)
        .visibility_timeout(lease.as_secs().clamp(1, 43_200) as i32)
        .wait_time_seconds(wait)
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .message_system_attribute_names(
            MessageSystemAttributeName::ApproximateFirstReceiveTimestamp,
        )
        .send()
        .await
        .map_err(|e| sqs_error("receive", aws_sdk_sqs::error::DisplayErrorContext(e)))?;
    let mut deliveries = Vec::new();
    for message in output.messages() {
        let (Some(body), Some(receipt)) = (message.body(), message.receipt_handle()) else {
            continue;
        };
        let attribute = |name: &MessageSystemAttributeName| {
            message
                .attributes()
                .and_then(|a: &HashMap<MessageSystemAttributeName, String>| a.get(name))
        };
        let receive_count = attribute(&MessageSystemAttributeName::ApproximateReceiveCount)
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        // SQS keeps the first receive's time (ms) with the message across redeliveries.
        let first_delivered_at =
            attribute(&MessageSystemAttributeName::ApproximateFirstReceiveTimestamp)
                .and_then(|ms| ms.parse::<i64>().ok())
                .and_then(DateTime::from_timestamp_millis)
                .unwrap_or_else(Utc::now);
        match serde_json::from_str::<RetryJob>(body) {
            Ok(job) => deliveries.push(Delivery {
                job,
                receipt: receipt.to_owned(),
                receive_count,
                first_delivered_at,
            }),
            Err(error) => {
                // Not ours or corrupt: it can never succeed; let the redrive policy take it.
                tracing::error!(%error, message_id = message.message_id(), "undecodable SQS message");
            }
        }
    }
    Ok(deliveries)
}

#[async_trait]
impl DeadLetterQueue for SqsQueue {
    /// Messages the redrive policy moved to the dead-letter queue (crash loops).
    async fn receive_dead(&self, max: u32) -> QueueResult<Vec<Delivery>> {
        receive(&self.client, &self.dlq_url, max, Duration::from_secs(60), 0).await
    }

    /// Deletes a message from the dead-letter queue once it was recorded.
    async fn delete_dead(&self, delivery: &Delivery) -> QueueResult<()> {
        self.client
            .delete_message()
            .queue_url(&self.dlq_url)
            .receipt_handle(&delivery.receipt)
            .send()
            .await
            .map_err(|e| {
                sqs_error(
                    "delete dead letter",
                    aws_sdk_sqs::error::DisplayErrorContext(e),
                )
            })?;
        Ok(())
    }
}

#[async_trait]
impl JobQueue for SqsQueue {
    async fn receive(&self, max: u32, lease: Duration) -> QueueResult<Vec<Delivery>> {
        receive(&self.client, &self.queue_url, max, lease, WAIT_TIME_SECONDS).await
    }

    async fn ack(&self, delivery: &Delivery) -> QueueResult<()> {
        self.client
            .delete_message()
            .queue_url(&self.queue_url)
            .receipt_handle(&delivery.receipt)
            .send()
            .await
            .map_err(|e| sqs_error("delete", aws_sdk_sqs::error::DisplayErrorContext(e)))?;
        Ok(())
    }

    async fn release(&self, delivery: &Delivery, _error: &str, delay: Duration) -> QueueResult<()> {
        self.client
            .change_message_visibility()
            .queue_url(&self.queue_url)
            .receipt_handle(&delivery.receipt)
            .visibility_timeout(delay.as_secs().clamp(0, 43_200) as i32)
            .send()
            .await
            .map_err(|e| {
                sqs_error(
                    "change visibility",
                    aws_sdk_sqs::error::DisplayErrorContext(e),
                )
            })?;
        Ok(())
    }

    async fn extend(&self, delivery: &Delivery, lease: Duration) -> QueueResult<()> {
        self.release(delivery, "", lease).await
    }

    async fn postpone(
        &self,
        delivery: &Delivery,
        _reason: &str,
        delay: Duration,
    ) -> QueueResult<()> {
        // SQS counts every receive, and its redrive policy would dead-letter a job the rate
        // limit kept refusing. A fresh copy starts its count afresh; then this copy goes (a
        // redelivery of it after a crash is harmless: the attempt check drops duplicates).
        // The copy's first receive is later: its checkout's `expires_at` may differ, which
        // Stripe accepts under the same key because a rate-limited create was never run.
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(serde_json::to_string(&delivery.job).expect("jobs serialise"))
            .delay_seconds(delay.as_secs().min(MAX_DELAY_SECONDS as u64) as i32)
            .send()
            .await
            .map_err(|e| {
                sqs_error(
                    "send a postponed job",
                    aws_sdk_sqs::error::DisplayErrorContext(e),
                )
            })?;
        self.ack(delivery).await
    }

    async fn defer(&self, delivery: &Delivery) -> QueueResult<()> {
        // Re-send with the rest of the delay, then drop this copy: a redelivery of the old
        // one after a crash is harmless (the worker's attempt check drops duplicates).
        let (accepted, error) = self.send(std::slice::from_ref(&delivery.job)).await;
        if accepted.is_empty() {
            return Err(
                error.unwrap_or_else(|| QueueError::Sqs("SQS refused the deferred job".into()))
            );
        }
        self.ack(delivery).await
    }

    async fn next_due(&self) -> QueueResult<Option<DateTime<Utc>>> {
        // Receive long-polls; there is nothing to sleep until.
        Ok(Some(Utc::now()))
    }

    async fn enqueued(&self) {
        std::future::pending::<()>().await
    }

    async fn ping(&self) -> QueueResult<()> {
        self.client
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .map_err(|e| sqs_error("ping", aws_sdk_sqs::error::DisplayErrorContext(e)))?;
        Ok(())
    }
}
