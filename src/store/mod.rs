//! Bucket stores: where bucket levels and remembered estimates live.
//!
//! Every store judges a whole batch atomically with
//! [`judge`](crate::limiter::judge::judge) semantics: one check is one store
//! round trip whatever the number of descriptors, and concurrent batches on
//! the same bucket never admit more than it holds.

pub mod memory;
pub mod redis;

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

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time; a retry may
    /// succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered something this service cannot read: a bug or a
    /// foreign key layout, never fixed by a retry.
    #[error("store protocol error: {0}")]
    Protocol(String),
}

impl StoreError {
    /// Whether a retry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// The configured store.
#[derive(Clone)]
pub enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl Store {
    /// Judges `batch` atomically.
    pub async fn apply(&self, batch: &Batch) -> Result<BatchOutcome, StoreError> {
        match self {
            Self::Memory(store) => Ok(store.apply(batch)),
            Self::Redis(store) => store.apply(batch).await,
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

    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }
}
