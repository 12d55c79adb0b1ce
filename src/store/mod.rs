//! Bucket stores: where bucket levels and remembered estimates live.
//!
//! Every store judges a whole batch atomically with
//! [`judge`](crate::limiter::judge::judge) semantics: one check is one store
//! round trip whatever the number of descriptors, and concurrent batches on
//! the same bucket never admit more than it holds. The Redis store's module
//! documentation states what changes in Redis Cluster when one batch spans
//! several hash slots.
//!
//! Every store call has a deadline. A store that cannot judge a batch by
//! then returns a transient [`StoreError`], and the caller answers with the
//! configured failure mode. [`StoreFaults`] counts these faults.

pub mod memory;
pub mod redis;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::limiter::judge::{BatchOutcome, BucketOp};

pub use memory::MemoryStore;
pub use redis::RedisStore;

/// One atomic unit of store work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub ops: Vec<BucketOp>,
    /// Added to the time until a bucket is full to give its key's TTL.
    pub ttl_slack: Duration,
    /// How long estimates and settled request ids are remembered.
    pub estimate_ttl: Duration,
}

/// An account record the caller expects, checked atomically with a batch.
/// See [`crate::accounts`] for the design.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordGuard {
    /// The key record key, in the hash slot of the API key's buckets.
    pub key: String,
    /// The encoded record the caller planned with; `None` for no record.
    pub expected: Option<String>,
}

/// The result of a guarded batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guarded {
    /// Every guard held and the batch was judged.
    Judged(BatchOutcome),
    /// A record differs from its guard: the actual records, one per guard,
    /// and no bucket was touched.
    Stale(Vec<Option<String>>),
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time; a retry may
    /// succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store did not judge the batch within the call's deadline. It may
    /// still apply the batch later.
    #[error("store call timed out after {0:?}")]
    TimedOut(Duration),
    /// The maximum number of store calls were already in flight, so this
    /// call was not sent.
    #[error("store busy: {0} calls already in flight")]
    Busy(usize),
    /// The store answered something this service cannot read: a bug or a
    /// foreign key layout, never fixed by a retry.
    #[error("store protocol error: {0}")]
    Protocol(String),
}

impl StoreError {
    /// Returns whether a retry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::TimedOut(_) | Self::Busy(_))
    }
}

/// Counts of store faults, shared by every clone of a store.
#[derive(Debug, Default)]
pub struct StoreFaults {
    /// Calls that passed their deadline.
    pub timeouts: AtomicU64,
    /// Calls rejected because the in-flight bound was reached.
    pub busy: AtomicU64,
    /// Calls that failed because the store was unreachable or refused them.
    pub unavailable: AtomicU64,
    /// Holds of a batch spanning several hash slots that were released
    /// because the batch was denied or failed.
    pub holds_released: AtomicU64,
    /// Holds whose release failed; their units return through refill.
    pub release_failures: AtomicU64,
}

impl StoreFaults {
    pub const fn new() -> Self {
        Self {
            timeouts: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            unavailable: AtomicU64::new(0),
            holds_released: AtomicU64::new(0),
            release_failures: AtomicU64::new(0),
        }
    }

    /// Counts a failed call under its kind.
    pub fn record(&self, error: &StoreError) {
        let counter = match error {
            StoreError::TimedOut(_) => &self.timeouts,
            StoreError::Busy(_) => &self.busy,
            StoreError::Unavailable(_) => &self.unavailable,
            StoreError::Protocol(_) => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The answer a call gets when the store cannot judge it in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FailureMode {
    /// gRPC `UNAVAILABLE`, so Envoy's `failure_mode_deny` decides.
    #[default]
    Unavailable,
    /// An allowed answer without rate-limit headers (fail-open), counted in
    /// metrics.
    Allow,
}

/// The faults of a store that never fails.
static NO_FAULTS: StoreFaults = StoreFaults::new();

/// The configured store.
#[derive(Clone)]
pub enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl Store {
    /// Judges `batch` atomically, within the store's own time limit.
    pub async fn apply(&self, batch: &Batch) -> Result<BatchOutcome, StoreError> {
        self.apply_within(batch, None).await
    }

    /// Judges `batch` atomically, failing with a transient error once
    /// `budget` has passed. The store caps `budget` at its configured time
    /// limit, which also applies when `budget` is `None`.
    pub async fn apply_within(&self, batch: &Batch, budget: Option<Duration>) -> Result<BatchOutcome, StoreError> {
        match self {
            Self::Memory(store) => Ok(store.apply(batch)),
            // Boxed, so the futures of callers that may never reach Redis
            // stay small: an async call moves its whole state on creation.
            Self::Redis(store) => Box::pin(store.apply_within(batch, budget)).await,
        }
    }

    /// Judges `batch` unless an account record differs from its guard; see
    /// [`Guarded`]. One round trip, as [`apply_within`](Self::apply_within).
    pub async fn apply_guarded(
        &self,
        batch: &Batch,
        guards: &[RecordGuard],
        budget: Option<Duration>,
    ) -> Result<Guarded, StoreError> {
        match self {
            Self::Memory(store) => Ok(store.accounts().apply_guarded(store, batch, guards)),
            Self::Redis(store) => Box::pin(store.apply_guarded(batch, guards, budget)).await,
        }
    }

    /// Counts of this store's faults.
    pub fn faults(&self) -> &StoreFaults {
        match self {
            Self::Memory(_) => &NO_FAULTS,
            Self::Redis(store) => store.faults(),
        }
    }

    /// Checks that the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Redis(store) => store.ping().await,
        }
    }

    /// The clock for local timing next to this store: the in-memory store's
    /// own clock (so tests that move it move everything), else a monotonic one.
    pub fn local_clock(&self) -> crate::clock::Clock {
        match self {
            Self::Memory(store) => store.clock().clone(),
            Self::Redis(_) => crate::clock::Clock::monotonic(),
        }
    }

    /// Returns a short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }
}
