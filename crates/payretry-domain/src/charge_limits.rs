//! Amounts Stripe refuses to charge, decided before anything is written or sent.
//!
//! Source: Stripe's "Supported currencies" guide (<https://docs.stripe.com/currencies>),
//! sections "Minimum and maximum charge amounts", "Zero-decimal currencies",
//! "Three-decimal currencies" and "Special cases", and Stripe's notice on ISK
//! ("Deprecation of fractional ISK charges and refunds", support.stripe.com), which answers
//! a fractional ISK amount with `400 invalid_charge_amount_no_decimal_compatible`.
//!
//! - **Minimums** are Stripe's table, in minor units. Stripe states them for the settlement
//!   currency; a charge in one of these currencies (settled in the same currency, the usual
//!   case) below its minimum is refused with `amount_too_small`. For currencies outside the
//!   table Stripe's rule is "the equivalent of 0.50 USD", which needs an exchange rate:
//!   payretry does not guess one, so only the contract's 1..=99 999 999 applies to them.
//! - **Three-decimal currencies** (`bhd`, `jod`, `kwd`, `omr`, `tnd`): the last digit must be
//!   0, i.e. the amount is a multiple of 10.
//! - **Zero-decimal currencies** (`jpy`, `krw`, …): the amount is in whole units already, so
//!   any whole number is a valid amount; only their minimum (`jpy` 50) applies.
//! - **Special cases**: `isk` is effectively zero-decimal but kept two-decimal in the API, so
//!   a charge must be a multiple of 100. `huf` and `twd` must be multiples of 100 only for
//!   *payouts* ("even though you can charge two-decimal amounts"), so charges are not
//!   restricted; `ugx` is a zero-decimal currency in the API.

use crate::money::Money;

/// Stripe's minimum charge per currency, in the currency's minor units (as the API takes
/// them): e.g. `usd` 50 is $0.50, `jpy` 50 is ¥50, `huf` 17 500 is 175.00 Ft. Sorted by code.
pub const STRIPE_MINIMUM_CHARGE: [(&str, i64); 24] = [
    ("aed", 200),
    ("aud", 50),
    ("bgn", 100),
    ("brl", 50),
    ("cad", 50),
    ("chf", 50),
    ("czk", 1500),
    ("dkk", 250),
    ("eur", 50),
    ("gbp", 30),
    ("hkd", 400),
    ("huf", 17_500),
    ("inr", 50),
    ("jpy", 50),
    ("mxn", 1000),
    ("myr", 200),
    ("nok", 300),
    ("nzd", 50),
    ("pln", 200),
    ("ron", 200),
    ("sek", 300),
    ("sgd", 50),
    ("thb", 1000),
    ("usd", 50),
];

/// Stripe's three-decimal currencies: amounts must end in 0 (a multiple of 10).
pub const STRIPE_THREE_DECIMAL: [&str; 5] = ["bhd", "jod", "kwd", "omr", "tnd"];

/// Stripe's zero-decimal currencies: the amount is in whole units.
pub const STRIPE_ZERO_DECIMAL: [&str; 16] = [
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
    "xaf", "xof", "xpf",
];

/// Two-decimal in the API, but charged in whole units only: the amount must be a multiple
/// of 100.
pub const STRIPE_WHOLE_UNITS_ONLY: [&str; 1] = ["isk"];

/// Why Stripe would refuse the amount. The message names the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChargeLimitError {
    #[error(
        "amount must be at least {minimum} for `{currency}` (Stripe's minimum charge, in minor units)"
    )]
    BelowMinimum { currency: String, minimum: i64 },
    #[error(
        "amount for `{currency}` must be a multiple of 10: Stripe requires the last digit of a three-decimal currency to be 0"
    )]
    ThreeDecimal { currency: String },
    #[error(
        "amount for `{currency}` must be a multiple of 100: Stripe charges `{currency}` in whole units only"
    )]
    WholeUnitsOnly { currency: String },
}

/// Stripe's minimum charge for `currency` in minor units, if Stripe lists one.
pub fn stripe_minimum_charge(currency: &str) -> Option<i64> {
    STRIPE_MINIMUM_CHARGE
        .binary_search_by(|(code, _)| (*code).cmp(currency))
        .ok()
        .map(|i| STRIPE_MINIMUM_CHARGE[i].1)
}

/// Whether Stripe treats `currency` as zero-decimal (amounts in whole units).
pub fn is_zero_decimal(currency: &str) -> bool {
    STRIPE_ZERO_DECIMAL.contains(&currency)
}

/// Refuses an amount Stripe would refuse to charge (below the currency's minimum, or
/// breaking its decimal rules). `money` is already within the contract's 1..=99 999 999.
pub fn check_stripe_charge(money: &Money) -> Result<(), ChargeLimitError> {
    let currency = money.currency.as_str();
    let amount = money.amount.minor_units();
    if let Some(minimum) = stripe_minimum_charge(currency)
        && amount < minimum
    {
        return Err(ChargeLimitError::BelowMinimum {
            currency: currency.to_owned(),
            minimum,
        });
    }
    if STRIPE_THREE_DECIMAL.contains(&currency) && amount % 10 != 0 {
        return Err(ChargeLimitError::ThreeDecimal {
            currency: currency.to_owned(),
        });
    }
    if STRIPE_WHOLE_UNITS_ONLY.contains(&currency) && amount % 100 != 0 {
        return Err(ChargeLimitError::WholeUnitsOnly {
            currency: currency.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::{Amount, Currency};
    use proptest::prelude::*;

    fn money(amount: i64, currency: &str) -> Money {
        Money {
            amount: Amount::new(amount).unwrap(),
            currency: Currency::parse(currency).unwrap(),
        }
    }

    #[test]
    fn the_tables_are_sorted_lowercase_codes() {
        let codes: Vec<&str> = STRIPE_MINIMUM_CHARGE.iter().map(|(c, _)| *c).collect();
        let mut sorted = codes.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(codes, sorted, "binary search needs a sorted table");
        let all = codes
            .iter()
            .chain(&STRIPE_THREE_DECIMAL)
            .chain(&STRIPE_ZERO_DECIMAL)
            .chain(&STRIPE_WHOLE_UNITS_ONLY);
        for code in all {
            assert!(Currency::parse(code).is_ok(), "{code}");
        }
    }

    #[test]
    fn minimums_follow_stripes_table() {
        for (currency, minimum) in [
            ("usd", 50),
            ("eur", 50),
            ("gbp", 30),
            ("jpy", 50),
            ("huf", 17_500),
            ("mxn", 1000),
        ] {
            assert_eq!(stripe_minimum_charge(currency), Some(minimum), "{currency}");
            assert!(check_stripe_charge(&money(minimum, currency)).is_ok());
            assert_eq!(
                check_stripe_charge(&money(minimum - 1, currency)),
                Err(ChargeLimitError::BelowMinimum {
                    currency: currency.to_owned(),
                    minimum
                })
            );
        }
        assert_eq!(stripe_minimum_charge("xyz"), None);
    }

    #[test]
    fn the_refusal_names_the_limit() {
        let line = check_stripe_charge(&money(49, "usd"))
            .unwrap_err()
            .to_string();
        assert!(
            line.contains("at least 50") && line.contains("`usd`"),
            "{line}"
        );
        let line = check_stripe_charge(&money(1234, "kwd"))
            .unwrap_err()
            .to_string();
        assert!(line.contains("multiple of 10"), "{line}");
        let line = check_stripe_charge(&money(4010, "isk"))
            .unwrap_err()
            .to_string();
        assert!(line.contains("multiple of 100"), "{line}");
    }

    #[test]
    fn three_decimal_amounts_end_in_zero() {
        for currency in STRIPE_THREE_DECIMAL {
            assert!(check_stripe_charge(&money(5120, currency)).is_ok());
            assert_eq!(
                check_stripe_charge(&money(5124, currency)),
                Err(ChargeLimitError::ThreeDecimal {
                    currency: currency.to_owned()
                })
            );
        }
    }

    #[test]
    fn isk_is_charged_in_whole_kronur_but_huf_and_twd_keep_their_decimals() {
        assert!(check_stripe_charge(&money(4000, "isk")).is_ok());
        assert!(check_stripe_charge(&money(4010, "isk")).is_err());
        // HUF and TWD are zero-decimal for payouts only.
        assert!(check_stripe_charge(&money(17_501, "huf")).is_ok());
        assert!(check_stripe_charge(&money(1001, "twd")).is_ok());
    }

    #[test]
    fn zero_decimal_amounts_are_whole_units() {
        assert!(is_zero_decimal("jpy") && is_zero_decimal("ugx") && !is_zero_decimal("usd"));
        assert!(check_stripe_charge(&money(51, "jpy")).is_ok());
        assert!(check_stripe_charge(&money(1, "krw")).is_ok());
        assert!(check_stripe_charge(&money(3, "ugx")).is_ok());
    }

    proptest! {
        #[test]
        fn a_currency_without_a_rule_accepts_the_whole_contract_range(n in 1i64..=99_999_999) {
            prop_assert!(check_stripe_charge(&money(n, "xyz")).is_ok());
            prop_assert!(check_stripe_charge(&money(n, "krw")).is_ok());
        }

        #[test]
        fn usd_accepts_exactly_its_minimum_and_above(n in 1i64..=99_999_999) {
            prop_assert_eq!(check_stripe_charge(&money(n, "usd")).is_ok(), n >= 50);
        }
    }
}
