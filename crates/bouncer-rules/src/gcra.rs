//! Rate-limit arithmetic: the generic cell rate algorithm (GCRA), the virtual-scheduling form of
//! a token bucket. A key's whole state is one number, its theoretical arrival time (TAT): the
//! moment its bucket would be full again. That makes the state cheap to keep for millions of
//! keys, exact under a compare-and-swap, easy to mirror in Redis, and independent of the limit's
//! parameters, so a limit can be tightened or relaxed while keys are mid-flight.
//!
//! Times are nanoseconds on a caller-chosen clock; nothing here reads the clock.

use std::time::Duration;

/// A rate with a burst: `burst` requests may come at once, then one every `emission_interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Time between two requests at the sustained rate, in nanoseconds.
    emission_interval: u64,
    /// How far ahead of now a key's TAT may run: `(burst - 1)` emission intervals.
    tolerance: u64,
    burst: u32,
}

/// The answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Let it through; store `tat` as the key's new state.
    Allow {
        tat: u64,
        /// Requests the key could still make at once after this one.
        remaining: u32,
        /// Until the key's bucket is full again.
        reset: Duration,
    },
    /// Refuse it; the key's state is unchanged.
    Deny {
        /// Until one request would be allowed.
        retry_after: Duration,
    },
}

impl Gcra {
    /// `count` requests per `period`, with bursts of up to `burst` (at least 1) at once.
    pub fn new(count: u32, period: Duration, burst: u32) -> Gcra {
        let count = u128::from(count.max(1));
        let burst = burst.max(1);
        let emission_interval =
            u64::try_from((period.as_nanos() / count).max(1)).unwrap_or(u64::MAX);
        Gcra {
            emission_interval,
            tolerance: emission_interval.saturating_mul(u64::from(burst - 1)),
            burst,
        }
    }

    /// This limit scaled by `factor` (0 < factor <= 1 tightens): the rate and the burst both
    /// shrink, never below one request per period and a burst of one.
    pub fn scaled(&self, factor: f64) -> Gcra {
        let factor = if factor.is_finite() && factor > 0.0 {
            factor
        } else {
            1.0
        };
        let interval = (self.emission_interval as f64 / factor).clamp(1.0, u64::MAX as f64) as u64;
        let burst = ((f64::from(self.burst) * factor).floor() as u32).max(1);
        Gcra {
            emission_interval: interval,
            tolerance: interval.saturating_mul(u64::from(burst - 1)),
            burst,
        }
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    pub fn emission_interval(&self) -> Duration {
        Duration::from_nanos(self.emission_interval)
    }

    /// Decides one request at `now` for a key whose state is `tat` (0 for a key never seen).
    pub fn check(&self, tat: u64, now: u64) -> Decision {
        self.check_n(tat, now, 1)
    }

    /// Decides `cost` requests at once (all or none), as a batch of them would count.
    pub fn check_n(&self, tat: u64, now: u64, cost: u32) -> Decision {
        let cost = u64::from(cost.max(1));
        let tat = tat.max(now);
        let new_tat = tat.saturating_add(self.emission_interval.saturating_mul(cost));
        // The request fits when, after it, the TAT runs no further ahead than one burst.
        let allowed_at =
            new_tat.saturating_sub(self.tolerance.saturating_add(self.emission_interval));
        if allowed_at > now {
            return Decision::Deny {
                retry_after: Duration::from_nanos(allowed_at - now),
            };
        }
        let ahead = new_tat - now;
        let room = self.tolerance.saturating_add(self.emission_interval) - ahead;
        Decision::Allow {
            tat: new_tat,
            remaining: u32::try_from(room / self.emission_interval).unwrap_or(u32::MAX),
            reset: Duration::from_nanos(ahead),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn allowed(limit: &Gcra, tat: &mut u64, now: u64) -> bool {
        match limit.check(*tat, now) {
            Decision::Allow { tat: next, .. } => {
                *tat = next;
                true
            }
            Decision::Deny { .. } => false,
        }
    }

    #[test]
    fn a_fresh_key_gets_its_burst_at_once_then_the_rate() {
        let limit = Gcra::new(10, Duration::from_secs(1), 5);
        let mut tat = 0;
        let now = 100 * SECOND;
        let passed = (0..20).filter(|_| allowed(&limit, &mut tat, now)).count();
        assert_eq!(passed, 5);
        // One more every tenth of a second.
        assert!(!allowed(&limit, &mut tat, now + SECOND / 10 - 1));
        assert!(allowed(&limit, &mut tat, now + SECOND / 10));
        assert!(!allowed(&limit, &mut tat, now + SECOND / 10));
        // Over a long run the rate holds exactly.
        let mut passed = 0;
        for step in 0..10_000u64 {
            if allowed(&limit, &mut tat, now + SECOND + step * SECOND / 1000) {
                passed += 1;
            }
        }
        // Ten seconds at 10/s, plus whatever the burst had refilled.
        assert!((100..=105).contains(&passed), "{passed}");
    }

    #[test]
    fn denials_say_when_to_retry_and_allows_what_is_left() {
        let limit = Gcra::new(2, Duration::from_secs(1), 2);
        let now = 50 * SECOND;
        let Decision::Allow {
            tat,
            remaining,
            reset,
        } = limit.check(0, now)
        else {
            panic!("the first request passes");
        };
        assert_eq!(remaining, 1);
        assert_eq!(reset, Duration::from_millis(500));
        let Decision::Allow { tat, remaining, .. } = limit.check(tat, now) else {
            panic!("the second request passes");
        };
        assert_eq!(remaining, 0);
        let Decision::Deny { retry_after } = limit.check(tat, now) else {
            panic!("the third is refused");
        };
        assert_eq!(retry_after, Duration::from_millis(500));
        // A refusal leaves the state as it was: retrying then passes.
        assert!(matches!(
            limit.check(tat, now + 500_000_000),
            Decision::Allow { .. }
        ));
    }

    #[test]
    fn tightening_applies_to_keys_mid_flight_keeping_the_share_they_used() {
        let limit = Gcra::new(100, Duration::from_secs(1), 100);
        let tight = limit.scaled(0.25);
        assert_eq!(tight.burst(), 25);
        assert_eq!(tight.emission_interval(), Duration::from_millis(40));
        let now = 10 * SECOND;
        let mut tat = 0;
        for _ in 0..20 {
            assert!(allowed(&limit, &mut tat, now));
        }
        // A fifth of the burst is used; under the tightened limit four fifths of its burst are
        // left.
        let passed = (0..50).filter(|_| allowed(&tight, &mut tat, now)).count();
        assert_eq!(passed, 20);
        // The bucket is empty whichever limit applies; relaxed, it refills four times as fast.
        assert!(!allowed(&limit, &mut tat, now));
        assert!(allowed(&limit, &mut tat, now + 10_000_000));
    }

    #[test]
    fn batches_pass_whole_or_not_at_all() {
        let limit = Gcra::new(10, Duration::from_secs(1), 10);
        let now = SECOND;
        let Decision::Allow { tat, remaining, .. } = limit.check_n(0, now, 8) else {
            panic!("eight of ten pass");
        };
        assert_eq!(remaining, 2);
        assert!(matches!(limit.check_n(tat, now, 3), Decision::Deny { .. }));
        assert!(matches!(limit.check_n(tat, now, 2), Decision::Allow { .. }));
    }

    #[test]
    fn extreme_parameters_do_not_overflow() {
        let fast = Gcra::new(u32::MAX, Duration::from_nanos(1), u32::MAX);
        assert!(matches!(
            fast.check(0, u64::MAX - 1),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            fast.check(u64::MAX, u64::MAX),
            Decision::Allow { .. }
        ));
        let yearly = Gcra::new(1, Duration::from_secs(365 * 86_400), 1);
        let now = 5 * SECOND;
        let Decision::Allow { tat, .. } = yearly.check(0, now) else {
            panic!("the first request passes");
        };
        let Decision::Deny { retry_after } = yearly.check(tat, now) else {
            panic!("the second waits a year");
        };
        assert_eq!(retry_after, Duration::from_secs(365 * 86_400));
        assert_eq!(yearly.scaled(f64::NAN), yearly);
        assert_eq!(yearly.scaled(0.000_001).burst(), 1);
    }
}
