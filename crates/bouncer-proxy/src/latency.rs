//! Response times counted in log-linear buckets of microseconds, four per power of two, so that a
//! percentile read from them is within a quarter of the truth. Recording is one relaxed atomic
//! add; reading takes the counts and starts afresh, so that each read covers the time since the
//! last one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const BUCKETS: usize = 64 * 4;

pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// The counts taken from a histogram at one time.
pub struct LatencySample {
    counts: Vec<u64>,
    total: u64,
}

impl LatencyHistogram {
    pub fn record(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts since the last take, leaving the histogram empty.
    pub fn take(&self) -> LatencySample {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|bucket| bucket.swap(0, Ordering::AcqRel))
            .collect();
        let total = counts.iter().sum();
        LatencySample { counts, total }
    }
}

impl LatencySample {
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `quantile` (0.99 for the 99th percentile) of the samples: the lower bound of the
    /// smallest bucket with that share of the samples at or below it; zero without samples.
    pub fn percentile(&self, quantile: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let wanted = ((self.total as f64) * quantile).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= wanted {
                return Duration::from_micros(bucket_floor(index));
            }
        }
        Duration::ZERO
    }
}

fn bucket(micros: u64) -> usize {
    if micros < 4 {
        return micros as usize;
    }
    let power = 63 - micros.leading_zeros() as usize;
    let quarter = ((micros >> (power - 2)) & 0b11) as usize;
    (power * 4 + quarter).min(BUCKETS - 1)
}

/// The lower bound of a bucket, in microseconds.
fn bucket_floor(bucket: usize) -> u64 {
    if bucket < 4 {
        return bucket as u64;
    }
    let power = bucket / 4;
    let quarter = (bucket % 4) as u64;
    (1u64 << power) + quarter * (1u64 << (power - 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_within_a_quarter() {
        for micros in [
            0u64, 3, 4, 5, 7, 100, 1_000, 262_144, 300_000, 499_999, 500_000, 10_000_000,
        ] {
            let floor = bucket_floor(bucket(micros));
            assert!(floor <= micros, "{micros}: {floor}");
            assert!(
                micros as f64 <= floor as f64 * 1.25 + 1.0,
                "{micros}: {floor}"
            );
        }
    }

    #[test]
    fn percentiles_come_from_the_samples_since_the_last_take() {
        let histogram = LatencyHistogram::default();
        for millis in 1..=100 {
            histogram.record(Duration::from_millis(millis));
        }
        let sample = histogram.take();
        assert_eq!(sample.count(), 100);
        let p50 = sample.percentile(0.5);
        assert!(
            (Duration::from_millis(40)..=Duration::from_millis(50)).contains(&p50),
            "{p50:?}"
        );
        let p99 = sample.percentile(0.99);
        assert!(
            (Duration::from_millis(79)..=Duration::from_millis(99)).contains(&p99),
            "{p99:?}"
        );
        assert_eq!(histogram.take().count(), 0, "taken");
        assert_eq!(histogram.take().percentile(0.99), Duration::ZERO);
    }
}
