//! Money: integer minor units (cents) and a currency, never floating point.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount must be a whole number of minor units from 1 to 99999999")]
    Amount,
    #[error("currency must be three lowercase letters, e.g. `usd`")]
    Currency,
}

/// An amount in the currency's minor units, within what the contract accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Amount(i64);

impl Amount {
    pub const MIN: i64 = 1;
    pub const MAX: i64 = 99_999_999;

    pub fn new(minor_units: i64) -> Result<Self, MoneyError> {
        if (Self::MIN..=Self::MAX).contains(&minor_units) {
            Ok(Self(minor_units))
        } else {
            Err(MoneyError::Amount)
        }
    }

    pub const fn minor_units(self) -> i64 {
        self.0
    }
}

/// An ISO 4217 currency code in Stripe's lowercase form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Currency(String);

impl Currency {
    pub fn parse(raw: &str) -> Result<Self, MoneyError> {
        if raw.len() == 3 && raw.bytes().all(|b| b.is_ascii_lowercase()) {
            Ok(Self(raw.to_owned()))
        } else {
            Err(MoneyError::Currency)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the buyer pays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Money {
    pub amount: Amount,
    pub currency: Currency,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn amount_bounds_are_inclusive() {
        assert!(Amount::new(1).is_ok());
        assert!(Amount::new(99_999_999).is_ok());
        assert_eq!(Amount::new(0), Err(MoneyError::Amount));
        assert_eq!(Amount::new(-5), Err(MoneyError::Amount));
        assert_eq!(Amount::new(100_000_000), Err(MoneyError::Amount));
    }

    #[test]
    fn currency_is_three_lowercase_letters() {
        assert!(Currency::parse("usd").is_ok());
        for bad in ["USD", "us", "usdd", "u5d", "", "€ur"] {
            assert_eq!(Currency::parse(bad), Err(MoneyError::Currency), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn amount_accepts_exactly_the_contract_range(n in any::<i64>()) {
            prop_assert_eq!(Amount::new(n).is_ok(), (1..=99_999_999).contains(&n));
        }
    }
}
