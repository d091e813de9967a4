//! The service-level metrics of DESIGN.md §6. Metric names and tags are a contract that
//! dashboards depend on: they are written only here.

use payretry_domain::{AttemptNumber, FailureReason};

pub const ATTEMPT_COUNT: &str = "payments.retry.attempt_count";
pub const FAILURE_COUNT: &str = "payments.retry.failure_count";
pub const SUCCESS_RATE: &str = "payments.retry.success_rate";
pub const ABANDONED_COUNT: &str = "payments.retry.abandoned_count";
pub const DEAD_LETTER_COUNT: &str = "payments.retry.dead_letter_count";
pub const SCHEDULE_LAG_SECONDS: &str = "payments.retry.schedule_lag_seconds";
pub const DOUBLE_PAYMENT_COUNT: &str = "payments.retry.double_payment_count";

/// Why a retry was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbandonReason {
    WindowExpired,
    AttemptsExhausted,
}

impl AbandonReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::WindowExpired => "window_expired",
            Self::AttemptsExhausted => "attempts_exhausted",
        }
    }
}

/// The worker created the checkout of retry `attempt`, retrying `reason`.
pub fn retry_checkout_created(attempt: AttemptNumber, reason: Option<&FailureReason>) {
    metrics::counter!(
        ATTEMPT_COUNT,
        "retry_attempt" => attempt.to_string(),
        "failure_reason" => reason.map_or("unknown", FailureReason::as_str).to_owned()
    )
    .increment(1);
}

/// A retried checkout ended: paid or failed (with the new reason).
pub fn retry_finished(attempt: AttemptNumber, failure: Option<&FailureReason>) {
    let rate = metrics::histogram!(SUCCESS_RATE, "retry_attempt" => attempt.to_string());
    match failure {
        None => rate.record(1.0),
        Some(reason) => {
            rate.record(0.0);
            metrics::counter!(
                FAILURE_COUNT,
                "retry_attempt" => attempt.to_string(),
                "failure_reason" => reason.as_str().to_owned()
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
        "retry_attempt" => duplicate_attempt.to_string()
    )
    .increment(1);
}

/// How late the worker picked a job, relative to when it was due.
pub fn schedule_lag(seconds: f64) {
    metrics::histogram!(SCHEDULE_LAG_SECONDS).record(seconds.max(0.0));
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
