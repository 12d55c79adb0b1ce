//! The clock the in-memory store refills by.
//!
//! Redis buckets use Redis's own clock instead, so replicas never disagree.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

/// A millisecond clock: tokio's monotonic clock (pausable in tests) or a
/// manual one that tests move by hand.
#[derive(Clone, Debug)]
pub enum Clock {
    Monotonic(Instant),
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// A monotonic clock starting now.
    pub fn monotonic() -> Self {
        Self::Monotonic(Instant::now())
    }

    /// A manual clock at `start_ms`.
    pub fn manual(start_ms: u64) -> Self {
        Self::Manual(Arc::new(AtomicU64::new(start_ms)))
    }

    /// Milliseconds since the clock's origin.
    pub fn now_ms(&self) -> u64 {
        match self {
            Self::Monotonic(origin) => u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX),
            Self::Manual(now) => now.load(Ordering::SeqCst),
        }
    }

    /// Moves a manual clock forward; a monotonic clock ignores it.
    pub fn advance_ms(&self, ms: u64) {
        if let Self::Manual(now) = self {
            now.fetch_add(ms, Ordering::SeqCst);
        }
    }
}
