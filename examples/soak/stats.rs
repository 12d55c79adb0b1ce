//! Counters and a latency histogram shared by the load tasks.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two of the latency histogram.
const SUB_BUCKETS: u64 = 8;
const BUCKETS: usize = 64 * SUB_BUCKETS as usize;

/// Latencies in microseconds, in log-linear buckets (about 12% wide).
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    max_us: AtomicU64,
}

impl Histogram {
    pub fn new() -> Self {
        Self { buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(), max_us: AtomicU64::new(0) }
    }

    pub fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        self.buckets[index(us)].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Returns the upper edge of the bucket containing the `q` quantile, in microseconds.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            seen += bucket.load(Ordering::Relaxed);
            if seen >= rank {
                return upper_edge(i).min(self.max_us());
            }
        }
        self.max_us()
    }

    pub fn max_us(&self) -> u64 {
        self.max_us.load(Ordering::Relaxed)
    }

    /// `p50 / p99 / p99.9 / max` in milliseconds.
    pub fn summary(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            ms(self.quantile_us(0.5)),
            ms(self.quantile_us(0.99)),
            ms(self.quantile_us(0.999)),
            ms(self.max_us())
        )
    }
}

fn index(us: u64) -> usize {
    let power = 63 - u64::from(us.leading_zeros());
    let sub = if power >= 3 { (us >> (power - 3)) & (SUB_BUCKETS - 1) } else { us & (SUB_BUCKETS - 1) };
    (power * SUB_BUCKETS + sub) as usize
}

fn upper_edge(index: usize) -> u64 {
    let power = index as u64 / SUB_BUCKETS;
    let sub = index as u64 % SUB_BUCKETS;
    if power < 3 {
        return 1 << power;
    }
    ((SUB_BUCKETS + sub + 1) << (power - 3)).saturating_sub(1)
}

/// Counts of what the load saw, and the first example of each problem.
pub struct Tally {
    pub calls: AtomicU64,
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    /// gRPC errors that the request did not ask for.
    pub errors: AtomicU64,
    /// gRPC errors a malformed request asked for and got.
    pub expected_errors: AtomicU64,
    /// Responses that differ from what the request's kind must get.
    pub unexpected: AtomicU64,
    pub latency: Histogram,
    first_problems: Mutex<Vec<String>>,
}

impl Tally {
    pub fn new() -> Self {
        Self {
            calls: AtomicU64::new(0),
            allowed: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            expected_errors: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
            latency: Histogram::new(),
            first_problems: Mutex::new(Vec::new()),
        }
    }

    /// Keeps the first few problem descriptions for the report.
    pub fn note(&self, problem: String) {
        let mut problems = self.first_problems.lock().expect("not poisoned");
        if problems.len() < 10 {
            problems.push(problem);
        }
    }

    pub fn problems(&self) -> Vec<String> {
        self.first_problems.lock().expect("not poisoned").clone()
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_land_within_a_bucket() {
        let histogram = Histogram::new();
        for us in 1..=1000 {
            histogram.record(Duration::from_micros(us));
        }
        let p50 = histogram.quantile_us(0.5);
        assert!((500..=570).contains(&p50), "p50 {p50}");
        assert_eq!(histogram.max_us(), 1000);
    }
}
