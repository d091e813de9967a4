//! Merchant events (DESIGN.md §6b): signed callbacks to the merchant's own systems about what
//! happened to a payment session, in the format of the Standard Webhooks specification.
//!
//! - Which change announces which event is the domain's (`payretry_domain::merchant_event`);
//!   the body is built by the service with the transition that commits it
//!   (`service::record`), so an event is written in the same transaction as its state change.
//! - [`signature`]: `webhook-signature` per the specification, one per configured secret.
//! - [`relay`]: delivers the outbox: leases, retries on the schedule, then `failed`.

pub mod relay;
pub mod signature;

use signature::SigningKey;
use std::time::Duration;

/// Where and how merchant events are delivered (`PAYRETRY_MERCHANT_WEBHOOK_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerchantWebhook {
    /// The receiver: an absolute `http://` or `https://` URL.
    pub url: String,
    /// Every key signs each delivery (several while rotating).
    pub keys: Vec<SigningKey>,
    /// The waits after the first, second, … failed try; when they run out the delivery is
    /// `failed`.
    pub retry_delays: Vec<Duration>,
    /// How long a receiver has to answer one try.
    pub timeout: Duration,
}

impl MerchantWebhook {
    /// The schedule of DESIGN.md §6b: about 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
    pub fn default_retry_delays() -> Vec<Duration> {
        [5, 300, 1_800, 7_200, 18_000, 36_000, 36_000]
            .into_iter()
            .map(Duration::from_secs)
            .collect()
    }

    /// The contract's timeout: a 2xx within 10 s is success.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
}
