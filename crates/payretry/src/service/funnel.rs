//! The retry funnel (DESIGN.md §6c): of the retries accepted in a period, per attempt
//! number, how many got a checkout, were paid, failed again, were abandoned or dead-lettered,
//! or are still in progress, and what the paid ones recovered, per currency (amounts in
//! different currencies are never added).
//!
//! A retry belongs to the period in which the buyer's retry was accepted (its attempt row was
//! created), and is counted where it stands now.

use super::{Payments, ServiceResult};
use crate::storage::{FunnelCounts, FunnelRow};
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// The longest period the funnel looks back over.
pub const MAX_PERIOD: Duration = Duration::days(31);
/// The shortest period given as a duration.
pub const MIN_PERIOD: Duration = Duration::minutes(1);
/// The period when none is asked for.
pub const DEFAULT_PERIOD: Duration = Duration::hours(24);

/// Why a `since` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`since` must be a duration from 1m to 31d in minutes, hours or days (`90m`, `24h`, `7d`) or an RFC 3339 time at most 31 days ago and not in the future"
)]
pub struct InvalidSince;

/// The start of the funnel's period from `raw` (the `since` parameter) at `now`: a duration
/// back from now (`90m`, `24h`, `7d`: 1 minute to 31 days), or an RFC 3339 time no more than
/// 31 days before `now` and not after it. `None` is [`DEFAULT_PERIOD`]. Times are kept to the
/// millisecond, as they are stored.
pub fn parse_since(raw: Option<&str>, now: DateTime<Utc>) -> Result<DateTime<Utc>, InvalidSince> {
    let since = match raw {
        None => now - DEFAULT_PERIOD,
        Some(raw) => match parse_period(raw) {
            Some(period) => now - period?,
            None => DateTime::parse_from_rfc3339(raw)
                .map_err(|_| InvalidSince)?
                .with_timezone(&Utc),
        },
    };
    if since > now || since < now - MAX_PERIOD {
        return Err(InvalidSince);
    }
    DateTime::from_timestamp_millis(since.timestamp_millis()).ok_or(InvalidSince)
}

/// `{n}m`, `{n}h` or `{n}d`: `None` when `raw` is not written as a duration (it may still be
/// a time), an error when it is one outside [`MIN_PERIOD`]..=[`MAX_PERIOD`].
fn parse_period(raw: &str) -> Option<Result<Duration, InvalidSince>> {
    let unit = raw.chars().last()?;
    let digits = &raw[..raw.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: i64 = digits.parse().ok()?;
    let period = match unit {
        'm' => Duration::minutes(n),
        'h' => Duration::hours(n),
        'd' => Duration::days(n),
        _ => return None,
    };
    Some(if (MIN_PERIOD..=MAX_PERIOD).contains(&period) {
        Ok(period)
    } else {
        Err(InvalidSince)
    })
}

/// What the paid retries of one currency recovered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct RecoveredAmount {
    #[schema(example = "usd")]
    pub currency: String,
    /// Minor units.
    #[schema(example = 2500)]
    pub amount: i64,
}

/// Where the retries of one group stand, and what the paid ones recovered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FunnelStage {
    /// Retries accepted (the buyer asked, the retry was scheduled).
    pub scheduled: u64,
    /// Of those, how many got a provider checkout.
    pub checkout_created: u64,
    /// Paid through the retry's checkout.
    pub paid: u64,
    /// The retry's checkout failed too.
    pub failed_again: u64,
    /// Dropped before a checkout was made (the window closed first).
    pub abandoned: u64,
    /// The retry's job kept failing and was moved aside (an admin may redrive it).
    pub dead_lettered: u64,
    /// Still scheduled, with a checkout open, or with a payment settling.
    pub in_progress: u64,
    /// The paid retries' session amounts, summed per currency (ordered by currency); a
    /// currency nothing was recovered in is absent.
    pub recovered: Vec<RecoveredAmount>,
}

/// The retries of one attempt number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptFunnel {
    /// 1 for the first retry, 2 for the second, …
    #[schema(example = 1)]
    pub attempt_number: u32,
    #[serde(flatten)]
    pub stage: FunnelStage,
}

/// The retry funnel of a period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryFunnel {
    /// The period's start: retries accepted from then on are counted.
    pub since: DateTime<Utc>,
    /// The period's end: now.
    pub until: DateTime<Utc>,
    /// Per attempt number, in order; an attempt number with no retry in the period is absent.
    pub attempts: Vec<AttemptFunnel>,
    /// Every attempt number together.
    pub totals: FunnelStage,
}

impl FunnelStage {
    fn add(&mut self, counts: &FunnelCounts) {
        self.scheduled += counts.scheduled;
        self.checkout_created += counts.checkout_created;
        self.paid += counts.paid;
        self.failed_again += counts.failed_again;
        self.abandoned += counts.abandoned;
        self.dead_lettered += counts.dead_lettered;
        self.in_progress += counts.in_progress;
    }
}

fn recovered(by_currency: BTreeMap<String, i64>) -> Vec<RecoveredAmount> {
    by_currency
        .into_iter()
        .filter(|(_, amount)| *amount != 0)
        .map(|(currency, amount)| RecoveredAmount { currency, amount })
        .collect()
}

impl RetryFunnel {
    /// The funnel from storage's groups (one per attempt number and currency).
    pub fn from_rows(since: DateTime<Utc>, until: DateTime<Utc>, rows: &[FunnelRow]) -> Self {
        let mut attempts: BTreeMap<u32, (FunnelStage, BTreeMap<String, i64>)> = BTreeMap::new();
        let mut totals = FunnelStage::default();
        let mut total_recovered: BTreeMap<String, i64> = BTreeMap::new();
        for row in rows {
            let (stage, by_currency) = attempts.entry(row.attempt.get()).or_default();
            stage.add(&row.counts);
            totals.add(&row.counts);
            let currency = row.currency.as_str();
            for sums in [&mut *by_currency, &mut total_recovered] {
                let sum = sums.entry(currency.to_owned()).or_default();
                *sum = sum.saturating_add(row.recovered);
            }
        }
        totals.recovered = recovered(total_recovered);
        Self {
            since,
            until,
            attempts: attempts
                .into_iter()
                .map(|(attempt_number, (mut stage, by_currency))| {
                    stage.recovered = recovered(by_currency);
                    AttemptFunnel {
                        attempt_number,
                        stage,
                    }
                })
                .collect(),
            totals,
        }
    }
}

impl Payments {
    /// The retry funnel of the retries accepted from `since` to `until`.
    pub async fn retry_funnel(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> ServiceResult<RetryFunnel> {
        let rows = self.storage.retry_funnel(since, until).await?;
        Ok(RetryFunnel::from_rows(since, until, &rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use payretry_domain::{AttemptNumber, Currency};

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2025-03-10T12:00:00.250Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn since_is_a_duration_back_from_now() {
        let now = now();
        assert_eq!(parse_since(None, now), Ok(now - Duration::hours(24)));
        assert_eq!(parse_since(Some("24h"), now), Ok(now - Duration::hours(24)));
        assert_eq!(parse_since(Some("7d"), now), Ok(now - Duration::days(7)));
        assert_eq!(
            parse_since(Some("90m"), now),
            Ok(now - Duration::minutes(90))
        );
        assert_eq!(parse_since(Some("1m"), now), Ok(now - Duration::minutes(1)));
        assert_eq!(parse_since(Some("31d"), now), Ok(now - Duration::days(31)));
        assert_eq!(parse_since(Some("744h"), now), Ok(now - Duration::days(31)));
    }

    #[test]
    fn since_is_a_time_within_the_last_31_days() {
        let now = now();
        let at = |raw: &str| parse_since(Some(raw), now);
        assert_eq!(
            at("2025-03-09T12:00:00Z"),
            Ok(now - Duration::hours(24) - Duration::milliseconds(250))
        );
        assert_eq!(
            at("2025-03-10T13:00:00+01:00"),
            Ok(now - Duration::milliseconds(250))
        );
        // Kept to the millisecond, as times are stored.
        assert_eq!(
            at("2025-03-10T11:00:00.123456Z"),
            Ok(now - Duration::hours(1) - Duration::milliseconds(127))
        );
        assert_eq!(at("2025-02-07T12:00:00.250Z"), Ok(now - MAX_PERIOD));
    }

    #[test]
    fn anything_else_is_refused() {
        let now = now();
        for bad in [
            "",
            "0m",
            "0h",
            "32d",
            "745h",
            "44641m",
            "1s",
            "1w",
            "h",
            "-1h",
            "+1h",
            "1.5h",
            " 1h",
            "1h ",
            "1H",
            "9999999d",
            "999999d",
            "1é",
            "é",
            "yesterday",
            "2025-03-10T12:00:01Z",
            "2025-02-07T12:00:00.249Z",
            "2025-03-10",
            "2025-03-10T12:00:00",
        ] {
            assert_eq!(parse_since(Some(bad), now), Err(InvalidSince), "{bad:?}");
        }
        assert!(InvalidSince.to_string().contains("`since`"));
    }

    fn row(attempt: u32, currency: &str, scheduled: u64, paid: u64, recovered: i64) -> FunnelRow {
        FunnelRow {
            attempt: AttemptNumber::new(attempt),
            currency: Currency::parse(currency).unwrap(),
            counts: FunnelCounts {
                scheduled,
                checkout_created: scheduled,
                paid,
                failed_again: scheduled - paid,
                ..FunnelCounts::default()
            },
            recovered,
        }
    }

    #[test]
    fn groups_add_up_per_attempt_and_in_total_and_currencies_stay_apart() {
        let now = now();
        let rows = [
            row(1, "eur", 2, 1, 1000),
            row(1, "usd", 3, 2, 5000),
            row(2, "usd", 1, 0, 0),
            row(3, "eur", 1, 1, 700),
        ];
        let funnel = RetryFunnel::from_rows(now - Duration::hours(24), now, &rows);
        let numbers: Vec<u32> = funnel.attempts.iter().map(|a| a.attempt_number).collect();
        assert_eq!(numbers, [1, 2, 3]);
        let first = &funnel.attempts[0].stage;
        assert_eq!((first.scheduled, first.paid, first.failed_again), (5, 3, 2));
        let amounts = |stage: &FunnelStage| -> Vec<(String, i64)> {
            stage
                .recovered
                .iter()
                .map(|r| (r.currency.clone(), r.amount))
                .collect()
        };
        assert_eq!(
            amounts(first),
            [("eur".to_owned(), 1000), ("usd".to_owned(), 5000)]
        );
        assert!(funnel.attempts[1].stage.recovered.is_empty());
        assert_eq!(funnel.totals.scheduled, 7);
        assert_eq!(funnel.totals.paid, 4);
        assert_eq!(
            amounts(&funnel.totals),
            [("eur".to_owned(), 1700), ("usd".to_owned(), 5000)]
        );
        let json = serde_json::to_value(&funnel.attempts[0]).unwrap();
        assert_eq!(json["attemptNumber"], 1);
        assert_eq!(json["checkoutCreated"], 5);
        assert_eq!(json["recovered"][1]["currency"], "usd");
    }

    #[test]
    fn an_empty_period_has_no_attempts_and_zero_totals() {
        let now = now();
        let funnel = RetryFunnel::from_rows(now - Duration::hours(24), now, &[]);
        assert!(funnel.attempts.is_empty());
        assert_eq!(funnel.totals, FunnelStage::default());
        let json = serde_json::to_value(&funnel).unwrap();
        assert_eq!(json["totals"]["recovered"], serde_json::json!([]));
        assert_eq!(json["totals"]["inProgress"], 0);
    }
}
