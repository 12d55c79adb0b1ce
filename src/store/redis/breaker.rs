//! A circuit breaker for a Redis that stopped answering.
//!
//! A frozen Redis (a hung host, a network partition without resets) keeps
//! its connections open, so every call would wait its whole deadline. After
//! [`TRIP_AFTER`] calls in a row time out, the breaker opens: calls fail at
//! once, except one probe per [`PROBE_INTERVAL`]. The first call that gets
//! an answer closes it again.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Calls in a row that must time out before the breaker opens.
pub const TRIP_AFTER: u32 = 3;

/// Time between probe calls while the breaker is open.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// The breaker's state, shared by every clone of a store.
#[derive(Debug)]
pub struct Breaker {
    origin: Instant,
    /// Calls timed out in a row since the last answer.
    timeouts: AtomicU32,
    /// Milliseconds since `origin` at which the next probe may go.
    next_probe_ms: AtomicU64,
}

/// The effect of a finished call on the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The breaker opened with this call.
    Opened,
    /// The breaker closed with this call.
    Closed,
    Unchanged,
}

impl Breaker {
    pub fn new() -> Self {
        Self { origin: Instant::now(), timeouts: AtomicU32::new(0), next_probe_ms: AtomicU64::new(0) }
    }

    /// Whether a call may go to Redis now: always while closed, once per
    /// probe interval while open.
    pub fn admit(&self) -> bool {
        if self.timeouts.load(Ordering::Relaxed) < TRIP_AFTER {
            return true;
        }
        let now = self.now_ms();
        let next = self.next_probe_ms.load(Ordering::Relaxed);
        now >= next
            && self
                .next_probe_ms
                .compare_exchange(next, now + PROBE_INTERVAL.as_millis() as u64, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Records a call that got an answer from Redis.
    pub fn answered(&self) -> Change {
        if self.timeouts.swap(0, Ordering::Relaxed) >= TRIP_AFTER { Change::Closed } else { Change::Unchanged }
    }

    /// Records a call that passed its deadline.
    pub fn timed_out(&self) -> Change {
        if self.timeouts.fetch_add(1, Ordering::Relaxed) + 1 == TRIP_AFTER {
            self.next_probe_ms.store(self.now_ms() + PROBE_INTERVAL.as_millis() as u64, Ordering::Relaxed);
            Change::Opened
        } else {
            Change::Unchanged
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_probes_and_closes() {
        let breaker = Breaker::new();
        assert_eq!(breaker.timed_out(), Change::Unchanged);
        assert_eq!(breaker.timed_out(), Change::Unchanged);
        assert!(breaker.admit(), "closed until the third timeout");
        assert_eq!(breaker.timed_out(), Change::Opened);
        assert!(!breaker.admit(), "open: no call until the probe interval passed");

        tokio::time::advance(PROBE_INTERVAL).await;
        assert!(breaker.admit(), "one probe per interval");
        assert!(!breaker.admit(), "only one");

        assert_eq!(breaker.answered(), Change::Closed);
        assert!(breaker.admit());
        assert!(breaker.admit(), "closed: every call goes");
    }

    #[test]
    fn answers_reset_the_count() {
        let breaker = Breaker::new();
        breaker.timed_out();
        breaker.timed_out();
        assert_eq!(breaker.answered(), Change::Unchanged);
        breaker.timed_out();
        assert_eq!(breaker.timed_out(), Change::Unchanged, "timeouts must come in a row");
        assert!(breaker.admit());
    }
}
