//! The service-level metrics of DESIGN.md §6. Metric names and tags are a contract that
//! dashboards depend on: they are written only here.
//!
//! Tag values are bounded: an attempt number past the most a policy allows and a failure
//! code Stripe does not document are tagged `other`, so no input can grow the number of
//! time series without limit.

use payretry_domain::{AttemptNumber, FailureReason};

pub const ATTEMPT_COUNT: &str = "payments.retry.attempt_count";
pub const FAILURE_COUNT: &str = "payments.retry.failure_count";
pub const SUCCESS_RATE: &str = "payments.retry.success_rate";
pub const ABANDONED_COUNT: &str = "payments.retry.abandoned_count";
pub const DEAD_LETTER_COUNT: &str = "payments.retry.dead_letter_count";
pub const SCHEDULE_LAG_SECONDS: &str = "payments.retry.schedule_lag_seconds";
pub const DOUBLE_PAYMENT_COUNT: &str = "payments.retry.double_payment_count";
pub const WEBHOOK_DELIVERY_COUNT: &str = "payments.webhook.delivery_count";
pub const WEBHOOK_DELIVERY_LAG_SECONDS: &str = "payments.webhook.delivery_lag_seconds";

/// The most retries a policy may allow (`PAYRETRY_MAX_ATTEMPTS` is at most 20).
const MAX_TAGGED_ATTEMPT: u32 = 20;

/// The `retry_attempt` tag.
fn attempt_tag(attempt: AttemptNumber) -> String {
    if attempt.get() <= MAX_TAGGED_ATTEMPT {
        attempt.to_string()
    } else {
        "other".to_owned()
    }
}

/// The `failure_reason` tag.
fn reason_tag(reason: Option<&FailureReason>) -> String {
    match reason {
        None => FailureReason::UNKNOWN.to_owned(),
        Some(reason) if reason.is_known() => reason.as_str().to_owned(),
        Some(_) => "other".to_owned(),
    }
}

/// Why a retry was dropped (the domain's lifecycle decides).
pub use payretry_domain::lifecycle::AbandonReason;

/// The worker created the checkout of retry `attempt`, retrying `reason`.
pub fn retry_checkout_created(attempt: AttemptNumber, reason: Option<&FailureReason>) {
    metrics::counter!(
        ATTEMPT_COUNT,
        "retry_attempt" => attempt_tag(attempt),
        "failure_reason" => reason_tag(reason)
    )
    .increment(1);
}

/// A retried checkout ended: paid or failed (with the new reason).
pub fn retry_finished(attempt: AttemptNumber, failure: Option<&FailureReason>) {
    let rate = metrics::histogram!(SUCCESS_RATE, "retry_attempt" => attempt_tag(attempt));
    match failure {
        None => rate.record(1.0),
        Some(reason) => {
            rate.record(0.0);
            metrics::counter!(
                FAILURE_COUNT,
                "retry_attempt" => attempt_tag(attempt),
                "failure_reason" => reason_tag(Some(reason))
            )
            .increment(1);
        }
    }
}

pub fn retry_abandoned(reason: AbandonReason) {
    metrics::counter!(ABANDONED_COUNT, "reason" => reason.as_str()).increment(1);
}

pub fn retry_dead_lettered() {
    metrics::counter!(DEAD_LETTER_COUNT).increment(1);
}

/// A session already paid was paid again through `duplicate_attempt`'s checkout: a buyer
/// was charged twice. Counted once per duplicate charge, so any non-zero rate is worth an
/// alert.
pub fn double_payment_detected(duplicate_attempt: AttemptNumber) {
    metrics::counter!(
        DOUBLE_PAYMENT_COUNT,
        "retry_attempt" => attempt_tag(duplicate_attempt)
    )
    .increment(1);
}

/// How late the worker picked a job, relative to when it was due.
pub fn schedule_lag(seconds: f64) {
    metrics::histogram!(SCHEDULE_LAG_SECONDS).record(seconds.max(0.0));
}

/// How one try of a merchant webhook delivery ended (the `outcome` tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    Delivered,
    /// Not accepted; another try is scheduled.
    Retried,
    /// Not accepted, and no try is left.
    Failed,
}

impl WebhookOutcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Retried => "retried",
            Self::Failed => "failed",
        }
    }
}

/// A merchant webhook try ended; a delivered event also records how long after its state
/// change it was delivered.
pub fn webhook_delivery(outcome: WebhookOutcome, lag_seconds: Option<f64>) {
    metrics::counter!(WEBHOOK_DELIVERY_COUNT, "outcome" => outcome.as_str()).increment(1);
    if let Some(lag) = lag_seconds {
        metrics::histogram!(WEBHOOK_DELIVERY_LAG_SECONDS).record(lag.max(0.0));
    }
}

/// Installs the process-wide recorder once: Prometheus always (for `/metrics`), fanned out
/// to DogStatsD over UDP when `dogstatsd` is set. Returns the Prometheus handle. The first
/// call in a process decides; later calls reuse it.
///
/// DogStatsD has distributions and histograms; the `metrics` facade has one histogram kind,
/// sent as Datadog distributions (`|d`), so `success_rate` averages correctly across hosts.
pub fn install(
    dogstatsd: Option<&str>,
) -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = prometheus.handle();
    let installed = match dogstatsd {
        Some(addr) => {
            let statsd = metrics_exporter_dogstatsd::DogStatsDBuilder::default()
                .with_remote_address(addr)?
                .with_telemetry(false)
                .send_histograms_as_distributions(true)
                .with_flush_interval(std::time::Duration::from_secs(1))
                .build()?;
            let fanout = metrics_util::layers::FanoutBuilder::default()
                .add_recorder(prometheus)
                .add_recorder(statsd)
                .build();
            metrics::set_global_recorder(fanout).is_ok()
        }
        None => metrics::set_global_recorder(prometheus).is_ok(),
    };
    if !installed {
        tracing::warn!("a metrics recorder was already installed");
    }
    Ok(HANDLE.get_or_init(|| handle).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_values_are_bounded() {
        assert_eq!(attempt_tag(AttemptNumber::new(3)), "3");
        assert_eq!(attempt_tag(AttemptNumber::new(20)), "20");
        assert_eq!(attempt_tag(AttemptNumber::new(u32::MAX)), "other");
        let known = FailureReason::from_code("insufficient_funds");
        assert_eq!(reason_tag(Some(&known)), "insufficient_funds");
        let invented = FailureReason::from_code("x_1234567");
        assert_eq!(reason_tag(Some(&invented)), "other");
        assert_eq!(reason_tag(None), "unknown");
    }
}
