//! The embedded in-memory store: the zero-setup default for one replica.
//!
//! State lives in one process, so it is only correct when a single replica
//! serves a domain. Batches run under one mutex, which is never held across
//! an await. A full bucket is not stored at all, and expired entries are
//! swept as batches run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::clock::Clock;
use crate::limiter::bucket::BucketState;
use crate::limiter::judge::{BatchOutcome, EstimateRecord, EstimateTable, judge};

use super::Batch;

/// Entries examined per sweep of expired state.
const SWEEP_BATCH: usize = 64;

/// The in-memory store. Clones share state.
#[derive(Clone)]
pub struct MemoryStore {
    clock: Clock,
    inner: Arc<Mutex<Tables>>,
}

#[derive(Default)]
struct Tables {
    buckets: HashMap<String, Expiring<BucketState>>,
    estimates: HashMap<String, Expiring<EstimateRecord>>,
}

struct Expiring<T> {
    value: T,
    expires_ms: u64,
}

impl MemoryStore {
    pub fn new(clock: Clock) -> Self {
        Self { clock, inner: Arc::default() }
    }

    /// Judges `batch` atomically at the store's clock.
    pub fn apply(&self, batch: &Batch) -> BatchOutcome {
        let now_ms = self.clock.now_ms();
        let estimate_ttl_ms = duration_ms(batch.estimate_ttl);
        let slack_ms = duration_ms(batch.ttl_slack);

        let mut tables = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        tables.sweep(now_ms);

        let states: Vec<Option<BucketState>> = batch
            .ops
            .iter()
            .map(|op| tables.buckets.get(&op.key).filter(|e| e.expires_ms > now_ms).map(|e| e.value))
            .collect();

        let outcome = {
            let mut view = EstimateView { tables: &mut tables.estimates, now_ms, ttl_ms: estimate_ttl_ms };
            judge(&batch.ops, &states, now_ms, &mut view)
        };

        for (op, result) in batch.ops.iter().zip(&outcome.buckets) {
            if result.state.level == 0 {
                tables.buckets.remove(&op.key);
                continue;
            }
            let expires_ms = now_ms.saturating_add(result.state.reset_ms(&op.params, now_ms)).saturating_add(slack_ms);
            tables.buckets.insert(op.key.clone(), Expiring { value: result.state, expires_ms });
        }
        outcome
    }

    /// The clock buckets refill by.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Number of buckets held (full buckets are not held).
    pub fn bucket_count(&self) -> usize {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).buckets.len()
    }
}

impl Tables {
    /// Drops a few expired entries, so memory follows the active key set
    /// without a background task.
    fn sweep(&mut self, now_ms: u64) {
        let expired: Vec<String> = self
            .buckets
            .iter()
            .take(SWEEP_BATCH)
            .filter(|(_, entry)| entry.expires_ms <= now_ms)
            .map(|(key, _)| key.clone())
            .collect();
        for key in expired {
            self.buckets.remove(&key);
        }
        let expired: Vec<String> = self
            .estimates
            .iter()
            .take(SWEEP_BATCH)
            .filter(|(_, entry)| entry.expires_ms <= now_ms)
            .map(|(key, _)| key.clone())
            .collect();
        for key in expired {
            self.estimates.remove(&key);
        }
    }
}

struct EstimateView<'a> {
    tables: &'a mut HashMap<String, Expiring<EstimateRecord>>,
    now_ms: u64,
    ttl_ms: u64,
}

impl EstimateTable for EstimateView<'_> {
    fn get(&mut self, key: &str) -> Option<EstimateRecord> {
        self.tables.get(key).filter(|e| e.expires_ms > self.now_ms).map(|e| e.value)
    }

    fn put(&mut self, key: &str, record: EstimateRecord) {
        let expires_ms = self.now_ms + self.ttl_ms;
        self.tables.insert(key.to_owned(), Expiring { value: record, expires_ms });
    }
}

fn duration_ms(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
