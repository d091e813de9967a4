//! Configuration from the environment (DESIGN.md §7). Everything is optional; a bad value
//! stops start-up with one line naming the variable and what it accepts.

use crate::merchant_events::{MerchantWebhook, signature};
use crate::secret::Secret;
use ipnet::IpNet;
use payretry_domain::policy::{parse_delays, parse_duration};
use payretry_domain::{FailureReason, RetryPolicy};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// A bad setting: which variable, and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub var: &'static str,
    pub expected: String,
    /// The value given; empty when the variable was missing (or must not be echoed).
    pub got: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.var, self.expected)?;
        if !self.got.is_empty() {
            write!(f, " (got {:?})", self.got)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    /// The outbox table is the queue.
    Embedded,
    /// Amazon SQS, fed by the outbox relay.
    Sqs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Sandbox,
    Stripe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Everything payretry reads from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Base for links (checkout return URLs, the sandbox page). `None`: `http://{listen}`
    /// with the port actually bound.
    pub public_url: Option<String>,
    pub database_url: String,
    /// Suffix of the queue names.
    pub env: String,
    pub queue: QueueKind,
    /// A local SQS-compatible endpoint; `None`: AWS's.
    pub sqs_endpoint: Option<String>,
    pub policy: RetryPolicy,
    /// Deliveries of one job before it is dead-lettered.
    pub max_receives: u32,
    pub provider: ProviderKind,
    pub stripe_secret_key: Option<Secret>,
    /// Webhook signing secrets: the first signs (sandbox), any verifies (rotation).
    pub webhook_secrets: Vec<Secret>,
    pub stripe_api_base: String,
    /// Provider calls per second for the whole deployment (`PAYRETRY_PROVIDER_MAX_RPS`);
    /// `None`: the default for the key ([`crate::provider::stripe::default_max_rps`]).
    pub provider_max_rps: Option<u32>,
    /// `None`: generated once and kept in the database.
    pub jwt_secret: Option<Secret>,
    pub log_format: LogFormat,
    /// Segment write key; `None`: analytics off.
    pub segment_write_key: Option<Secret>,
    /// Segment's API base (`{endpoint}/v1/batch`).
    pub segment_endpoint: String,
    /// Where DogStatsD datagrams go (`host:port`); `None`: off.
    pub dogstatsd_addr: Option<String>,
    /// How long a delivered job is hidden from other workers before it is redelivered
    /// (its worker presumed dead).
    pub job_lease: std::time::Duration,
    /// Retry jobs processed at once by one worker.
    pub worker_concurrency: usize,
    /// Requests per minute per principal on checkout and retry.
    pub rate_limit_per_minute: u32,
    /// Peers whose `X-Forwarded-For` names the client (`PAYRETRY_TRUSTED_PROXIES`); empty:
    /// the TCP peer is the client.
    pub trusted_proxies: Vec<IpNet>,
    /// Refund a duplicate payment through the provider as soon as it is detected
    /// (`PAYRETRY_AUTO_REFUND_DUPLICATES`). Off by default: moving money back is a business
    /// decision, and support sees every duplicate either way.
    pub auto_refund_duplicates: bool,
    /// Where merchant events are delivered (`PAYRETRY_MERCHANT_WEBHOOK_*`); `None`: off.
    pub merchant_webhook: Option<MerchantWebhook>,
}

/// The longest payment window payretry accepts. A window is a promise that a checkout may
/// still be paid: a month is far past any real one, and a bound keeps every timestamp derived
/// from it representable.
pub const MAX_PAYMENT_WINDOW: Duration = Duration::from_secs(720 * 3600);

/// The shortest delay between a buyer's click and a retry checkout that reaches card
/// networks (a live Stripe key). The backoff is what keeps the retry endpoint from being a
/// card-testing tool; the sandbox and Stripe's test mode charge no real card, so tests and
/// the demo may go down to [`MIN_TEST_RETRY_DELAY`].
pub const MIN_LIVE_RETRY_DELAY: Duration = Duration::from_secs(10);

/// The shortest delay anywhere: zero would remove the backoff altogether.
pub const MIN_TEST_RETRY_DELAY: Duration = Duration::from_secs(1);

/// True when the provider charges real cards: the `stripe` provider with a live key.
fn charges_real_cards(c: &Config) -> bool {
    c.provider == ProviderKind::Stripe
        && c.stripe_secret_key.as_ref().is_some_and(|key| {
            let key = key.expose();
            !(key.starts_with("sk_test_") || key.starts_with("rk_test_"))
        })
}

/// Refuses retry delays under the floor that applies to this provider and key.
fn check_delay_floor(c: &Config) -> Result<(), ConfigError> {
    let floor = if charges_real_cards(c) {
        MIN_LIVE_RETRY_DELAY
    } else {
        MIN_TEST_RETRY_DELAY
    };
    if c.policy.delays().iter().any(|d| *d < floor) {
        let expected = if floor == MIN_LIVE_RETRY_DELAY {
            "expected every delay to be at least 10s with a live Stripe key (the backoff protects card networks)"
        } else {
            "expected every delay to be at least 1s"
        };
        return Err(bad("PAYRETRY_RETRY_DELAYS", expected, ""));
    }
    Ok(())
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            database_url: "sqlite://payretry.db".to_owned(),
            env: "dev".to_owned(),
            queue: QueueKind::Embedded,
            sqs_endpoint: None,
            policy: RetryPolicy::default(),
            max_receives: 5,
            provider: ProviderKind::Sandbox,
            stripe_secret_key: None,
            webhook_secrets: Vec::new(),
            stripe_api_base: "https://api.stripe.com".to_owned(),
            provider_max_rps: None,
            jwt_secret: None,
            log_format: LogFormat::Text,
            dogstatsd_addr: None,
            segment_write_key: None,
            segment_endpoint: "https://api.segment.io".to_owned(),
            job_lease: std::time::Duration::from_secs(60),
            worker_concurrency: 16,
            rate_limit_per_minute: 120,
            trusted_proxies: Vec::new(),
            auto_refund_duplicates: false,
            merchant_webhook: None,
        }
    }
}

/// Jobs in flight enough for a provider budget of `max_rps`: a job makes about three calls,
/// each of which takes up to half a second at Stripe, so keeping the budget busy takes about
/// `max_rps × 0.5` jobs waiting on the provider at once (async waits cost little). Never
/// fewer than the default 16, never more than 256.
fn concurrency_for_budget(max_rps: u32) -> usize {
    (max_rps as usize).div_ceil(2).clamp(16, 256)
}

fn bad(var: &'static str, expected: impl Into<String>, got: &str) -> ConfigError {
    ConfigError {
        var,
        expected: expected.into(),
        got: got.to_owned(),
    }
}

/// A comma list of CIDR blocks, IPv4 or IPv6; a bare address is a block of one, and host
/// bits past the prefix are ignored. `None` when an entry is neither.
fn parse_networks(value: &str) -> Option<Vec<IpNet>> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .map(|net| net.trunc())
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .ok()
        })
        .collect()
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// Reads settings through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = Self::default();
        if let Some(v) = lookup("PAYRETRY_LISTEN") {
            c.listen = v.parse().map_err(|_| {
                bad(
                    "PAYRETRY_LISTEN",
                    "expected host:port, e.g. 127.0.0.1:8080",
                    &v,
                )
            })?;
        }
        if let Some(v) = lookup("PAYRETRY_PUBLIC_URL") {
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                return Err(bad(
                    "PAYRETRY_PUBLIC_URL",
                    "expected an http:// or https:// URL",
                    &v,
                ));
            }
            c.public_url = Some(v.trim_end_matches('/').to_owned());
        }
        if let Some(v) = lookup("PAYRETRY_DATABASE_URL") {
            let known = ["sqlite:", "postgres:", "postgresql:"];
            if !known.iter().any(|scheme| v.starts_with(scheme)) {
                return Err(bad(
                    "PAYRETRY_DATABASE_URL",
                    "expected sqlite://PATH or postgres://…",
                    "[redacted]",
                ));
            }
            c.database_url = v;
        }
        if let Some(v) = lookup("PAYRETRY_ENV") {
            let ok = v.len() <= 40
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(bad(
                    "PAYRETRY_ENV",
                    "expected up to 40 letters, digits, `-` or `_`",
                    &v,
                ));
            }
            c.env = v;
        }
        if let Some(v) = lookup("PAYRETRY_QUEUE") {
            c.queue = match v.as_str() {
                "embedded" => QueueKind::Embedded,
                "sqs" => QueueKind::Sqs,
                _ => return Err(bad("PAYRETRY_QUEUE", "expected `embedded` or `sqs`", &v)),
            };
        }
        if let Some(v) = lookup("PAYRETRY_SQS_ENDPOINT") {
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                return Err(bad(
                    "PAYRETRY_SQS_ENDPOINT",
                    "expected an http:// or https:// URL",
                    &v,
                ));
            }
            c.sqs_endpoint = Some(v);
        }
        let delays = match lookup("PAYRETRY_RETRY_DELAYS") {
            Some(v) => {
                parse_delays(&v).map_err(|e| bad("PAYRETRY_RETRY_DELAYS", e.to_string(), &v))?
            }
            None => c.policy.delays().to_vec(),
        };
        let max_attempts = match lookup("PAYRETRY_MAX_ATTEMPTS") {
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=20).contains(n))
                .ok_or_else(|| {
                    bad(
                        "PAYRETRY_MAX_ATTEMPTS",
                        "expected a whole number from 1 to 20",
                        &v,
                    )
                })?,
            None => c.policy.max_attempts,
        };
        let window = match lookup("PAYRETRY_PAYMENT_WINDOW") {
            Some(v) => parse_duration(&v)
                .ok()
                .filter(|d| !d.is_zero() && *d <= MAX_PAYMENT_WINDOW)
                .ok_or_else(|| {
                    bad(
                        "PAYRETRY_PAYMENT_WINDOW",
                        "expected a duration from 1s to 720h, like `24h` (units s, m, h)",
                        &v,
                    )
                })?,
            None => c.policy.window,
        };
        let non_retryable = match lookup("PAYRETRY_NON_RETRYABLE_REASONS") {
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(FailureReason::from_code)
                .collect(),
            None => c.policy.non_retryable.clone(),
        };
        c.policy = RetryPolicy::new(delays, max_attempts, window, non_retryable)
            .map_err(|e| bad("PAYRETRY_RETRY_DELAYS", e.to_string(), ""))?;
        if let Some(v) = lookup("PAYRETRY_MAX_RECEIVES") {
            c.max_receives = v
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| {
                    bad(
                        "PAYRETRY_MAX_RECEIVES",
                        "expected a whole number from 1 to 1000",
                        &v,
                    )
                })?;
        }
        if let Some(v) = lookup("PAYRETRY_PROVIDER_MAX_RPS") {
            c.provider_max_rps = Some(
                v.parse::<u32>()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| {
                        bad(
                            "PAYRETRY_PROVIDER_MAX_RPS",
                            "expected a whole number of calls per second from 1 to 10000",
                            &v,
                        )
                    })?,
            );
        }
        if let Some(v) = lookup("PAYRETRY_PROVIDER") {
            c.provider = match v.as_str() {
                "sandbox" => ProviderKind::Sandbox,
                "stripe" => ProviderKind::Stripe,
                _ => {
                    return Err(bad(
                        "PAYRETRY_PROVIDER",
                        "expected `sandbox` or `stripe`",
                        &v,
                    ));
                }
            };
        }
        c.stripe_secret_key = lookup("STRIPE_SECRET_KEY").map(Secret::new);
        if let Some(v) = lookup("STRIPE_WEBHOOK_SECRET") {
            c.webhook_secrets = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Secret::new)
                .collect();
        }
        if let Some(v) = lookup("STRIPE_API_BASE") {
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                return Err(bad(
                    "STRIPE_API_BASE",
                    "expected an http:// or https:// URL",
                    &v,
                ));
            }
            c.stripe_api_base = v.trim_end_matches('/').to_owned();
        }
        check_delay_floor(&c)?;
        if c.provider == ProviderKind::Stripe {
            if c.stripe_secret_key.is_none() {
                return Err(bad(
                    "STRIPE_SECRET_KEY",
                    "required when PAYRETRY_PROVIDER=stripe",
                    "",
                ));
            }
            if c.webhook_secrets.is_empty() {
                return Err(bad(
                    "STRIPE_WEBHOOK_SECRET",
                    "required when PAYRETRY_PROVIDER=stripe",
                    "",
                ));
            }
        }
        if let Some(v) = lookup("PAYRETRY_JWT_SECRET") {
            if v.len() < 32 {
                return Err(bad(
                    "PAYRETRY_JWT_SECRET",
                    "expected at least 32 characters",
                    "[redacted]",
                ));
            }
            c.jwt_secret = Some(Secret::new(v));
        }
        if let Some(v) = lookup("PAYRETRY_LOG_FORMAT") {
            c.log_format = match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => return Err(bad("PAYRETRY_LOG_FORMAT", "expected `text` or `json`", &v)),
            };
        }
        c.segment_write_key = lookup("PAYRETRY_SEGMENT_WRITE_KEY").map(Secret::new);
        if let Some(v) = lookup("PAYRETRY_SEGMENT_ENDPOINT") {
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                return Err(bad(
                    "PAYRETRY_SEGMENT_ENDPOINT",
                    "expected an http:// or https:// URL",
                    &v,
                ));
            }
            c.segment_endpoint = v.trim_end_matches('/').to_owned();
        }
        if let Some(v) = lookup("PAYRETRY_DOGSTATSD_ADDR") {
            let valid = v
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(bad(
                    "PAYRETRY_DOGSTATSD_ADDR",
                    "expected host:port, e.g. 127.0.0.1:8125",
                    &v,
                ));
            }
            c.dogstatsd_addr = Some(v);
        }
        if let Some(v) = lookup("PAYRETRY_JOB_LEASE") {
            c.job_lease = parse_duration(&v)
                .ok()
                .filter(|d| d.as_secs() >= 1)
                .ok_or_else(|| {
                    bad(
                        "PAYRETRY_JOB_LEASE",
                        "expected a duration of at least 1s, like `60s`",
                        &v,
                    )
                })?;
        }
        if let Some(v) = lookup("PAYRETRY_WORKER_CONCURRENCY") {
            c.worker_concurrency = v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=256).contains(n))
                .ok_or_else(|| {
                    bad(
                        "PAYRETRY_WORKER_CONCURRENCY",
                        "expected a whole number from 1 to 256",
                        &v,
                    )
                })?;
        } else if c.provider == ProviderKind::Stripe {
            let max_rps = c.provider_max_rps.or_else(|| {
                c.stripe_secret_key
                    .as_ref()
                    .map(crate::provider::stripe::default_max_rps)
            });
            c.worker_concurrency = concurrency_for_budget(max_rps.unwrap_or(0));
        }
        if let Some(v) = lookup("PAYRETRY_RATE_LIMIT_PER_MINUTE") {
            c.rate_limit_per_minute =
                v.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                    bad(
                        "PAYRETRY_RATE_LIMIT_PER_MINUTE",
                        "expected a whole number of at least 1",
                        &v,
                    )
                })?;
        }
        if let Some(v) = lookup("PAYRETRY_TRUSTED_PROXIES") {
            c.trusted_proxies = parse_networks(&v).ok_or_else(|| {
                bad(
                    "PAYRETRY_TRUSTED_PROXIES",
                    "expected a comma list of CIDR blocks, e.g. 10.0.0.0/8,::1/128",
                    &v,
                )
            })?;
        }
        if let Some(v) = lookup("PAYRETRY_AUTO_REFUND_DUPLICATES") {
            c.auto_refund_duplicates = match v.as_str() {
                "true" => true,
                "false" => false,
                _ => {
                    return Err(bad(
                        "PAYRETRY_AUTO_REFUND_DUPLICATES",
                        "expected `true` or `false`",
                        &v,
                    ));
                }
            };
        }
        c.merchant_webhook = merchant_webhook(&lookup)?;
        Ok(c)
    }
}

/// `PAYRETRY_MERCHANT_WEBHOOK_URL` and `_SECRET` (both, or neither), and the tuning of
/// `_RETRY_DELAYS` and `_TIMEOUT`.
fn merchant_webhook(
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<Option<MerchantWebhook>, ConfigError> {
    const URL: &str = "PAYRETRY_MERCHANT_WEBHOOK_URL";
    const SECRET: &str = "PAYRETRY_MERCHANT_WEBHOOK_SECRET";
    const DELAYS: &str = "PAYRETRY_MERCHANT_WEBHOOK_RETRY_DELAYS";
    const TIMEOUT: &str = "PAYRETRY_MERCHANT_WEBHOOK_TIMEOUT";
    let (url, secret) = match (lookup(URL), lookup(SECRET)) {
        (None, None) => return Ok(None),
        (None, Some(_)) => {
            return Err(bad(
                URL,
                "expected the receiver's URL when PAYRETRY_MERCHANT_WEBHOOK_SECRET is set",
                "",
            ));
        }
        (Some(_), None) => {
            return Err(bad(
                SECRET,
                "expected `whsec_` + base64 of a 24 to 64 byte key (a comma list while rotating) when PAYRETRY_MERCHANT_WEBHOOK_URL is set",
                "",
            ));
        }
        (Some(url), Some(secret)) => (url, secret),
    };
    let parsed = reqwest::Url::parse(&url).ok().filter(|u| {
        matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty())
    });
    if parsed.is_none() {
        return Err(bad(
            URL,
            "expected an absolute http:// or https:// URL",
            &url,
        ));
    }
    let keys = signature::parse_secrets(&secret).map_err(|(n, why)| {
        bad(
            SECRET,
            format!("secret {n} is not valid ({why}): expected `whsec_` + base64 of a 24 to 64 byte key, a comma list while rotating"),
            "[redacted]",
        )
    })?;
    let retry_delays = match lookup(DELAYS) {
        None => MerchantWebhook::default_retry_delays(),
        Some(v) => parse_delays(&v)
            .ok()
            .filter(|d| d.len() <= 20 && d.iter().all(|d| d.as_secs() >= 1))
            .ok_or_else(|| {
                bad(
                    DELAYS,
                    "expected 1 to 20 durations of at least 1s, like `5s,5m,30m` (units s, m, h)",
                    &v,
                )
            })?,
    };
    let timeout = match lookup(TIMEOUT) {
        None => MerchantWebhook::DEFAULT_TIMEOUT,
        Some(v) => parse_duration(&v)
            .ok()
            .filter(|d| (1..=60).contains(&d.as_secs()))
            .ok_or_else(|| {
                bad(
                    TIMEOUT,
                    "expected a duration from 1s to 60s, like `10s`",
                    &v,
                )
            })?,
    };
    Ok(Some(MerchantWebhook {
        url,
        keys,
        retry_delays,
        timeout,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = from(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.database_url, "sqlite://payretry.db");
        assert_eq!(c.env, "dev");
        assert_eq!(c.max_receives, 5);
        assert_eq!(c.provider, ProviderKind::Sandbox);
        assert_eq!(c.policy, RetryPolicy::default());
    }

    #[test]
    fn bad_values_name_the_variable_in_one_line() {
        let cases = [
            ("PAYRETRY_LISTEN", "nowhere"),
            ("PAYRETRY_MAX_ATTEMPTS", "zero"),
            ("PAYRETRY_RETRY_DELAYS", "1m,5x"),
            ("PAYRETRY_PAYMENT_WINDOW", "0s"),
            ("PAYRETRY_PAYMENT_WINDOW", "99999999999999h"),
            ("PAYRETRY_PAYMENT_WINDOW", "721h"),
            ("PAYRETRY_RETRY_DELAYS", "0s"),
            ("PAYRETRY_RETRY_DELAYS", "1m,0s"),
            ("PAYRETRY_PROVIDER", "paypal"),
            ("PAYRETRY_QUEUE", "kafka"),
            ("PAYRETRY_SQS_ENDPOINT", "localhost:4566"),
            ("PAYRETRY_MAX_RECEIVES", "-1"),
            ("PAYRETRY_PROVIDER_MAX_RPS", "0"),
            ("PAYRETRY_PROVIDER_MAX_RPS", "2.5"),
            ("PAYRETRY_PROVIDER_MAX_RPS", "10001"),
            ("PAYRETRY_PROVIDER_MAX_RPS", "fast"),
            ("PAYRETRY_DATABASE_URL", "mysql://x"),
            ("PAYRETRY_AUTO_REFUND_DUPLICATES", "yes"),
            ("PAYRETRY_TRUSTED_PROXIES", "localhost"),
            ("PAYRETRY_TRUSTED_PROXIES", "10.0.0.0/33"),
            ("PAYRETRY_TRUSTED_PROXIES", "::1/129"),
            ("PAYRETRY_TRUSTED_PROXIES", "10.0.0/8"),
            ("PAYRETRY_TRUSTED_PROXIES", "10.0.0.0/8;::1/128"),
            ("PAYRETRY_TRUSTED_PROXIES", "10.0.0.0/8 ::1/128"),
        ];
        for (var, value) in cases {
            let err = from(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var);
            let line = err.to_string();
            assert!(line.starts_with(var) && !line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn worker_concurrency_follows_the_provider_budget_unless_set() {
        let stripe = [
            ("PAYRETRY_PROVIDER", "stripe"),
            ("STRIPE_SECRET_KEY", "sk_test_abc"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_x"),
        ];
        assert_eq!(from(&stripe).unwrap().worker_concurrency, 16, "20/s");
        let with = |extra: (&'static str, &'static str)| {
            let mut vars = stripe.to_vec();
            vars.push(extra);
            from(&vars).unwrap().worker_concurrency
        };
        assert_eq!(with(("PAYRETRY_PROVIDER_MAX_RPS", "80")), 40);
        assert_eq!(with(("PAYRETRY_PROVIDER_MAX_RPS", "1000")), 256);
        assert_eq!(with(("PAYRETRY_WORKER_CONCURRENCY", "3")), 3);
        assert_eq!(from(&[]).unwrap().worker_concurrency, 16, "the sandbox");
    }

    #[test]
    fn stripe_needs_its_keys_and_secrets_are_not_echoed() {
        let err = from(&[("PAYRETRY_PROVIDER", "stripe")]).unwrap_err();
        assert_eq!(err.var, "STRIPE_SECRET_KEY");
        let err = from(&[("PAYRETRY_JWT_SECRET", "short-secret")]).unwrap_err();
        assert!(!err.to_string().contains("short-secret"));
    }

    #[test]
    fn merchant_webhooks_need_a_url_and_a_valid_secret() {
        let secret = crate::merchant_events::signature::SigningKey::encode(&[9; 32]);
        assert!(from(&[]).unwrap().merchant_webhook.is_none());
        let on = from(&[
            (
                "PAYRETRY_MERCHANT_WEBHOOK_URL",
                "https://orders.example/hooks",
            ),
            (
                "PAYRETRY_MERCHANT_WEBHOOK_SECRET",
                &format!("{secret},{secret}"),
            ),
        ])
        .unwrap()
        .merchant_webhook
        .unwrap();
        assert_eq!(on.keys.len(), 2);
        assert_eq!(on.retry_delays.len(), 7);
        assert_eq!(on.timeout, Duration::from_secs(10));
        let refused = [
            vec![(
                "PAYRETRY_MERCHANT_WEBHOOK_URL",
                "https://orders.example/hooks",
            )],
            vec![("PAYRETRY_MERCHANT_WEBHOOK_SECRET", secret.as_str())],
            vec![
                ("PAYRETRY_MERCHANT_WEBHOOK_URL", "ftp://orders.example"),
                ("PAYRETRY_MERCHANT_WEBHOOK_SECRET", secret.as_str()),
            ],
            vec![
                ("PAYRETRY_MERCHANT_WEBHOOK_URL", "/hooks"),
                ("PAYRETRY_MERCHANT_WEBHOOK_SECRET", secret.as_str()),
            ],
            vec![
                ("PAYRETRY_MERCHANT_WEBHOOK_URL", "https://orders.example"),
                ("PAYRETRY_MERCHANT_WEBHOOK_SECRET", "whsec_dG9vc2hvcnQ="),
            ],
            vec![
                ("PAYRETRY_MERCHANT_WEBHOOK_URL", "https://orders.example"),
                ("PAYRETRY_MERCHANT_WEBHOOK_SECRET", secret.as_str()),
                ("PAYRETRY_MERCHANT_WEBHOOK_RETRY_DELAYS", "5s,0s"),
            ],
            vec![
                ("PAYRETRY_MERCHANT_WEBHOOK_URL", "https://orders.example"),
                ("PAYRETRY_MERCHANT_WEBHOOK_SECRET", secret.as_str()),
                ("PAYRETRY_MERCHANT_WEBHOOK_TIMEOUT", "2m"),
            ],
        ];
        for pairs in refused {
            let err = from(&pairs).unwrap_err();
            assert!(err.var.starts_with("PAYRETRY_MERCHANT_WEBHOOK_"), "{err}");
            let shown = err.to_string();
            assert!(
                !shown.contains(&secret[6..]) && !shown.contains("dG9vc2hvcnQ"),
                "{err}"
            );
        }
    }

    #[test]
    fn duplicates_are_refunded_only_when_asked() {
        assert!(!from(&[]).unwrap().auto_refund_duplicates);
        let on = from(&[("PAYRETRY_AUTO_REFUND_DUPLICATES", "true")]).unwrap();
        assert!(on.auto_refund_duplicates);
        let off = from(&[("PAYRETRY_AUTO_REFUND_DUPLICATES", "false")]).unwrap();
        assert!(!off.auto_refund_duplicates);
    }

    #[test]
    fn trusted_proxies_are_cidr_blocks_or_addresses() {
        assert!(from(&[]).unwrap().trusted_proxies.is_empty());
        let c = from(&[(
            "PAYRETRY_TRUSTED_PROXIES",
            "10.0.0.0/8,::1/128, 192.0.2.7 ,10.1.2.3/16,2001:db8::/32",
        )])
        .unwrap();
        let shown: Vec<String> = c.trusted_proxies.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "10.0.0.0/8",
                "::1/128",
                "192.0.2.7/32",
                "10.1.0.0/16",
                "2001:db8::/32"
            ]
        );
    }

    #[test]
    fn webhook_secrets_may_be_rotated() {
        let c = from(&[("STRIPE_WEBHOOK_SECRET", "whsec_new, whsec_old")]).unwrap();
        let secrets: Vec<&str> = c.webhook_secrets.iter().map(Secret::expose).collect();
        assert_eq!(secrets, ["whsec_new", "whsec_old"]);
    }

    #[test]
    fn a_live_key_needs_delays_of_at_least_ten_seconds() {
        let live = |delays: &str| {
            from(&[
                ("PAYRETRY_PROVIDER", "stripe"),
                ("STRIPE_SECRET_KEY", "sk_live_abc"),
                ("STRIPE_WEBHOOK_SECRET", "whsec_x"),
                ("PAYRETRY_PUBLIC_URL", "https://pay.example.com"),
                ("PAYRETRY_RETRY_DELAYS", delays),
            ])
        };
        let err = live("1m,9s").unwrap_err();
        assert_eq!(err.var, "PAYRETRY_RETRY_DELAYS");
        assert!(err.to_string().contains("10s"), "{err}");
        assert!(live("10s,1m").is_ok());
        let test_mode = from(&[
            ("PAYRETRY_PROVIDER", "stripe"),
            ("STRIPE_SECRET_KEY", "sk_test_abc"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_x"),
            ("PAYRETRY_RETRY_DELAYS", "1s"),
        ]);
        assert!(test_mode.is_ok());
        assert!(from(&[("PAYRETRY_RETRY_DELAYS", "1s,2s")]).is_ok());
    }

    #[test]
    fn the_longest_window_is_accepted() {
        let c = from(&[("PAYRETRY_PAYMENT_WINDOW", "720h")]).unwrap();
        assert_eq!(c.policy.window, MAX_PAYMENT_WINDOW);
    }
}
