//! Exponential backoff: the one rule behind every "try again later" of payretry (the
//! worker's redeliveries and queue polls, the SQS and Segment relays, the Stripe client).
//! Pure: the caller draws the random number that jitter needs.

use std::time::Duration;

/// `base × factor^min(n, max_exponent)`, at most `cap`, optionally jittered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The first delay (`n = 0`).
    pub base: Duration,
    /// How much each step multiplies the delay by.
    pub factor: u32,
    /// Steps beyond this do not grow the delay any more.
    pub max_exponent: u32,
    /// The longest un-jittered delay.
    pub cap: Duration,
    pub jitter: Jitter,
}

/// How a delay is spread so that many clients failing together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Jitter {
    None,
    /// The capped delay scaled by a factor drawn from `min..max` (may end above the cap).
    Scale {
        min: f64,
        max: f64,
    },
    /// The capped delay plus up to `fraction` of it again, then capped again.
    AddUpTo {
        fraction: f64,
    },
}

impl Backoff {
    /// Doubling from `base` up to `cap`, growing for at most `max_exponent` steps, no jitter.
    pub const fn doubling(base: Duration, max_exponent: u32, cap: Duration) -> Self {
        Self {
            base,
            factor: 2,
            max_exponent,
            cap,
            jitter: Jitter::None,
        }
    }

    pub const fn with_jitter(self, jitter: Jitter) -> Self {
        Self { jitter, ..self }
    }

    /// The delay after `n` steps, without jitter.
    pub fn delay(&self, n: u32) -> Duration {
        let growth = self.factor.saturating_pow(n.min(self.max_exponent));
        self.base.saturating_mul(growth).min(self.cap)
    }

    /// The delay after `n` steps, jittered by `random` (in `0.0..1.0`; anything else counts
    /// as 0).
    pub fn jittered(&self, n: u32, random: f64) -> Duration {
        let delay = self.delay(n);
        let random = if random.is_finite() {
            random.clamp(0.0, 1.0)
        } else {
            0.0
        };
        match self.jitter {
            Jitter::None => delay,
            Jitter::Scale { min, max } => delay.mul_f64(min + random * (max - min)),
            Jitter::AddUpTo { fraction } => {
                (delay + delay.mul_f64(random * fraction)).min(self.cap)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_from_the_base_up_to_the_cap() {
        let backoff = Backoff::doubling(ms(200), 8, Duration::from_secs(30));
        let delays: Vec<_> = (0..10).map(|n| backoff.delay(n)).collect();
        assert_eq!(
            delays,
            [
                200, 400, 800, 1600, 3200, 6400, 12_800, 25_600, 30_000, 30_000
            ]
            .map(ms)
        );
    }

    #[test]
    fn the_service_sequences() {
        let secs = Duration::from_secs;
        let run =
            |b: Backoff, steps: std::ops::Range<u32>| steps.map(|n| b.delay(n)).collect::<Vec<_>>();
        // The worker's redeliveries (10 s default, after receive 1, 2, …), before jitter.
        assert_eq!(
            run(Backoff::doubling(secs(10), 16, secs(900)), 0..8),
            [10, 20, 40, 80, 160, 320, 640, 900].map(secs)
        );
        // The worker's queue polls after 1, 2, … failed receives (cap: 5 idle polls of 1 s).
        assert_eq!(
            run(Backoff::doubling(ms(100), 6, secs(5)), 1..8),
            [200, 400, 800, 1600, 3200, 5000, 5000].map(ms)
        );
        // The Segment relay after 1, 2, … failed deliveries (1 s default).
        assert_eq!(
            run(Backoff::doubling(secs(1), 10, secs(60)), 1..8),
            [2, 4, 8, 16, 32, 60, 60].map(secs)
        );
        // The Stripe client after 1, 2, … failed tries (from 100 ms), before jitter.
        assert_eq!(
            run(Backoff::doubling(ms(100), 31, secs(10)), 0..9),
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000].map(ms)
        );
    }

    #[test]
    fn stops_growing_after_max_exponent_even_below_the_cap() {
        let backoff = Backoff::doubling(ms(50), 10, Duration::from_secs(60));
        assert_eq!(backoff.delay(10), ms(51_200));
        assert_eq!(backoff.delay(11), ms(51_200));
        assert_eq!(backoff.delay(u32::MAX), ms(51_200));
    }

    #[test]
    fn never_overflows() {
        let backoff = Backoff::doubling(Duration::MAX, 31, Duration::from_secs(900));
        assert_eq!(backoff.delay(31), Duration::from_secs(900));
        let factor = Backoff {
            factor: u32::MAX,
            ..Backoff::doubling(Duration::from_secs(1), u32::MAX, Duration::MAX)
        };
        assert_eq!(
            factor.delay(u32::MAX),
            Duration::from_secs(u64::from(u32::MAX))
        );
    }

    #[test]
    fn scale_jitter_spreads_around_the_capped_delay() {
        let backoff = Backoff::doubling(Duration::from_secs(10), 16, Duration::from_secs(900))
            .with_jitter(Jitter::Scale { min: 0.8, max: 1.2 });
        assert_eq!(backoff.jittered(0, 0.0), Duration::from_secs(8));
        assert_eq!(backoff.jittered(0, 0.5), Duration::from_secs(10));
        assert_eq!(backoff.jittered(2, 0.0), Duration::from_secs(32));
        // The cap applies before the spread.
        assert_eq!(backoff.jittered(10, 1.0), Duration::from_secs(1080));
        assert_eq!(backoff.jittered(10, f64::NAN), Duration::from_secs(720));
    }

    #[test]
    fn added_jitter_stays_under_the_cap() {
        let backoff = Backoff::doubling(ms(100), 31, Duration::from_secs(10))
            .with_jitter(Jitter::AddUpTo { fraction: 0.5 });
        assert_eq!(backoff.jittered(0, 0.0), ms(100));
        assert_eq!(backoff.jittered(0, 1.0), ms(150));
        assert_eq!(backoff.jittered(1, 0.5), ms(250));
        assert_eq!(backoff.jittered(7, 1.0), Duration::from_secs(10));
        assert_eq!(backoff.jittered(1, 7.0), ms(300));
        assert_eq!(backoff.jittered(1, -1.0), ms(200));
    }
}
