//! The embedded in-memory store: the zero-setup default for one replica.
//!
//! State lives in one process, so it is only correct when a single replica
//! serves a domain. Batches run under one mutex, which is never held across
//! an await. A full bucket is not stored at all, and expired entries are
//! swept as batches run: each batch examines the next few entries of each
//! table, round robin, so every entry is examined again after
//! `entries / SWEEP_BATCH` batches.
//!
//! # Bounds
//!
//! The store contains at most [`MemoryBounds::max_buckets`] buckets and
//! [`MemoryBounds::max_estimates`] remembered estimates. A batch that would
//! store a new bucket past the bound first evicts the fullest (least used,
//! relative to its capacity) of [`EVICTION_SAMPLES`] buckets picked at
//! random. An evicted bucket comes back full, so the caller regains its used
//! units; picking the fullest of a sample keeps that small at a constant
//! cost per eviction, without scanning the table. Expired entries go first,
//! since they are full already. Estimates evict the oldest of a sample: a
//! report for an evicted estimate is charged in full, as for an unknown
//! request id. [`MemoryStore::stats`] counts evictions and forgiven units.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::warn;

use crate::clock::Clock;
use crate::limiter::bucket::{BucketParams, BucketState};
use crate::limiter::judge::{BatchOutcome, EstimateRecord, EstimateTable, judge};
use crate::telemetry::Throttle;

use super::Batch;

/// Entries of each table examined per batch for expiry.
const SWEEP_BATCH: usize = 64;

/// Entries sampled per eviction.
pub const EVICTION_SAMPLES: usize = 16;

/// Bounds on what the in-memory store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBounds {
    /// Most buckets held at once (full buckets are not held).
    pub max_buckets: usize,
    /// Most estimates and settled request ids remembered at once.
    pub max_estimates: usize,
}

impl MemoryBounds {
    pub const DEFAULT_MAX_BUCKETS: usize = 1_000_000;
    pub const DEFAULT_MAX_ESTIMATES: usize = 1_000_000;
}

impl Default for MemoryBounds {
    fn default() -> Self {
        Self { max_buckets: Self::DEFAULT_MAX_BUCKETS, max_estimates: Self::DEFAULT_MAX_ESTIMATES }
    }
}

/// Counts of stored entries and of evictions, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub buckets: usize,
    pub estimates: usize,
    /// Buckets evicted at the bucket bound.
    pub bucket_evictions: u64,
    /// Used units that bucket evictions gave back to callers (partial units
    /// rounded up).
    pub forgiven_units: u64,
    /// Estimates and settled request ids evicted at the estimate bound.
    pub estimate_evictions: u64,
}

/// Eviction counters, shared by every clone of a store and readable
/// without its lock.
#[derive(Debug, Default)]
struct Evictions {
    buckets: AtomicU64,
    forgiven_units: AtomicU64,
    estimates: AtomicU64,
}

/// The in-memory store. Clones share state.
#[derive(Clone)]
pub struct MemoryStore {
    clock: Clock,
    bounds: MemoryBounds,
    inner: Arc<Mutex<Tables>>,
    evictions: Arc<Evictions>,
    eviction_log: Arc<Throttle>,
    /// Accounts, key records and the audit log; guarded batches hold its
    /// lock while they are judged, so a guard and its batch are atomic.
    accounts: Arc<crate::accounts::memory::MemoryAccounts>,
}

struct Tables {
    buckets: Table<StoredBucket>,
    estimates: Table<EstimateRecord>,
    random: Random,
}

#[derive(Debug, Clone, Copy)]
struct StoredBucket {
    state: BucketState,
    /// The parameters the state was last judged with, to rank it for eviction.
    params: BucketParams,
}

impl MemoryStore {
    /// Creates a store with the default bounds.
    pub fn new(clock: Clock) -> Self {
        Self::with_bounds(clock, MemoryBounds::default())
    }

    /// Creates a store that keeps at most `bounds` entries (each at least 1).
    pub fn with_bounds(clock: Clock, bounds: MemoryBounds) -> Self {
        let bounds = MemoryBounds { max_buckets: bounds.max_buckets.max(1), max_estimates: bounds.max_estimates.max(1) };
        let tables = Tables { buckets: Table::default(), estimates: Table::default(), random: Random(0x853c_49e6_748f_ea9b) };
        Self {
            clock,
            bounds,
            inner: Arc::new(Mutex::new(tables)),
            evictions: Arc::default(),
            eviction_log: Arc::new(Throttle::new()),
            accounts: Arc::default(),
        }
    }

    /// Judges `batch` atomically at the store's clock.
    pub fn apply(&self, batch: &Batch) -> BatchOutcome {
        let now_ms = self.clock.now_ms();
        let estimate_ttl_ms = duration_ms(batch.estimate_ttl);
        let slack_ms = duration_ms(batch.ttl_slack);
        let evictions_before = self.evictions.buckets.load(Ordering::Relaxed) + self.evictions.estimates.load(Ordering::Relaxed);

        let outcome = {
            let mut guard = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let tables = &mut *guard;
            tables.buckets.sweep(now_ms, SWEEP_BATCH);
            tables.estimates.sweep(now_ms, SWEEP_BATCH);

            let states: Vec<Option<BucketState>> = batch
                .ops
                .iter()
                .map(|op| tables.buckets.get(&op.key).filter(|slot| slot.expires_ms > now_ms).map(|slot| slot.value.state))
                .collect();

            let outcome = {
                let mut view = EstimateView {
                    table: &mut tables.estimates,
                    random: &mut tables.random,
                    now_ms,
                    ttl_ms: estimate_ttl_ms,
                    max: self.bounds.max_estimates,
                    evictions: &self.evictions,
                };
                judge(&batch.ops, &states, now_ms, &mut view)
            };

            for (op, result) in batch.ops.iter().zip(&outcome.buckets) {
                if result.state.level == 0 {
                    tables.buckets.remove(&op.key);
                    continue;
                }
                let expires_ms = now_ms.saturating_add(result.state.reset_ms(&op.params, now_ms)).saturating_add(slack_ms);
                let stored = StoredBucket { state: result.state, params: op.params };
                if tables.buckets.update(&op.key, stored, expires_ms) {
                    continue;
                }
                while tables.buckets.len() >= self.bounds.max_buckets {
                    let forgiven = evict_bucket(&mut tables.buckets, &mut tables.random, now_ms);
                    self.evictions.buckets.fetch_add(1, Ordering::Relaxed);
                    self.evictions.forgiven_units.fetch_add(forgiven, Ordering::Relaxed);
                }
                tables.buckets.insert(&op.key, stored, expires_ms);
            }
            outcome
        };

        let evictions_after = self.evictions.buckets.load(Ordering::Relaxed) + self.evictions.estimates.load(Ordering::Relaxed);
        if evictions_after > evictions_before {
            self.log_evictions();
        }
        outcome
    }

    /// The account store kept next to the buckets.
    pub fn accounts(&self) -> &crate::accounts::memory::MemoryAccounts {
        &self.accounts
    }

    /// The clock buckets refill by.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Returns the bounds in force.
    pub fn bounds(&self) -> MemoryBounds {
        self.bounds
    }

    /// Number of buckets held (full buckets are not held).
    pub fn bucket_count(&self) -> usize {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).buckets.len()
    }

    /// Entries held and eviction counts since the store was created.
    pub fn stats(&self) -> MemoryStats {
        let (buckets, estimates) = {
            let tables = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            (tables.buckets.len(), tables.estimates.len())
        };
        MemoryStats {
            buckets,
            estimates,
            bucket_evictions: self.bucket_evictions(),
            forgiven_units: self.forgiven_units(),
            estimate_evictions: self.estimate_evictions(),
        }
    }

    /// Buckets evicted at the bound since the store was created.
    pub fn bucket_evictions(&self) -> u64 {
        self.evictions.buckets.load(Ordering::Relaxed)
    }

    /// Used units that evictions gave back since the store was created.
    pub fn forgiven_units(&self) -> u64 {
        self.evictions.forgiven_units.load(Ordering::Relaxed)
    }

    /// Estimates evicted at the bound since the store was created.
    pub fn estimate_evictions(&self) -> u64 {
        self.evictions.estimates.load(Ordering::Relaxed)
    }

    fn log_evictions(&self) {
        if let Some(suppressed) = self.eviction_log.allow() {
            warn!(
                store.max_buckets = self.bounds.max_buckets,
                store.max_estimates = self.bounds.max_estimates,
                store.bucket_evictions = self.bucket_evictions(),
                store.forgiven_units = self.forgiven_units(),
                store.estimate_evictions = self.estimate_evictions(),
                suppressed,
                "In-memory store is full; evicting the least used buckets, whose callers regain those units. \
                 Raise --max-buckets or --max-estimates, or use Redis"
            );
        }
    }
}

/// Evicts the fullest of a few sampled buckets and returns the used units
/// its caller regains (0 for an expired bucket, which is full already).
fn evict_bucket(table: &mut Table<StoredBucket>, random: &mut Random, now_ms: u64) -> u64 {
    let mut best: Option<(usize, u64, u64)> = None;
    for _ in 0..EVICTION_SAMPLES {
        let index = random.below(table.len());
        let slot = &table.slots[index];
        let (level, capacity) = if slot.expires_ms <= now_ms {
            (0, 1)
        } else {
            let mut state = slot.value.state;
            state.refill(&slot.value.params, now_ms);
            (state.level, slot.value.params.capacity_sub().max(1))
        };
        // level / capacity < best_level / best_capacity, exactly.
        let lower = best.is_none_or(|(_, best_level, best_capacity)| {
            u128::from(level) * u128::from(best_capacity) < u128::from(best_level) * u128::from(capacity)
        });
        if lower {
            best = Some((index, level, capacity));
        }
        if level == 0 {
            break;
        }
    }
    let Some((index, level, _)) = best else { return 0 };
    let scale = table.slots[index].value.params.scale.max(1);
    table.remove_at(index);
    level.div_ceil(scale)
}

/// Evicts the oldest of a few sampled estimates.
fn evict_estimate(table: &mut Table<EstimateRecord>, random: &mut Random) {
    let oldest = (0..EVICTION_SAMPLES).map(|_| random.below(table.len())).min_by_key(|index| table.slots[*index].expires_ms);
    if let Some(index) = oldest {
        table.remove_at(index);
    }
}

struct EstimateView<'a> {
    table: &'a mut Table<EstimateRecord>,
    random: &'a mut Random,
    now_ms: u64,
    ttl_ms: u64,
    max: usize,
    evictions: &'a Evictions,
}

impl EstimateTable for EstimateView<'_> {
    fn get(&mut self, key: &str) -> Option<EstimateRecord> {
        self.table.get(key).filter(|slot| slot.expires_ms > self.now_ms).map(|slot| slot.value)
    }

    fn put(&mut self, key: &str, record: EstimateRecord) {
        if !self.table.contains(key) {
            while self.table.len() >= self.max {
                evict_estimate(self.table, self.random);
                self.evictions.estimates.fetch_add(1, Ordering::Relaxed);
            }
        }
        let expires_ms = self.now_ms.saturating_add(self.ttl_ms);
        self.table.insert(key, record, expires_ms);
    }
}

/// A map whose entries also sit in a vector, so that random sampling and a
/// round-robin sweep cost O(1) per entry examined.
struct Table<T> {
    slots: Vec<Slot<T>>,
    index: HashMap<Arc<str>, usize>,
    /// Next slot the sweep examines.
    cursor: usize,
}

struct Slot<T> {
    key: Arc<str>,
    value: T,
    expires_ms: u64,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Self { slots: Vec::new(), index: HashMap::new(), cursor: 0 }
    }
}

impl<T> Table<T> {
    fn len(&self) -> usize {
        self.slots.len()
    }

    fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    fn get(&self, key: &str) -> Option<&Slot<T>> {
        self.index.get(key).map(|index| &self.slots[*index])
    }

    /// Replaces the value of a present key. Returns false when the key is absent.
    fn update(&mut self, key: &str, value: T, expires_ms: u64) -> bool {
        let Some(index) = self.index.get(key) else { return false };
        let slot = &mut self.slots[*index];
        slot.value = value;
        slot.expires_ms = expires_ms;
        true
    }

    fn insert(&mut self, key: &str, value: T, expires_ms: u64) {
        if let Some(index) = self.index.get(key) {
            let slot = &mut self.slots[*index];
            slot.value = value;
            slot.expires_ms = expires_ms;
            return;
        }
        let key: Arc<str> = Arc::from(key);
        self.index.insert(key.clone(), self.slots.len());
        self.slots.push(Slot { key, value, expires_ms });
    }

    fn remove(&mut self, key: &str) {
        if let Some(index) = self.index.get(key).copied() {
            self.remove_at(index);
        }
    }

    /// Removes the slot at `index`, moving the last slot into its place.
    fn remove_at(&mut self, index: usize) {
        let removed = self.slots.swap_remove(index);
        self.index.remove(&removed.key);
        if let Some(moved) = self.slots.get(index) {
            self.index.insert(moved.key.clone(), index);
        }
    }

    /// Examines up to `count` slots from the cursor and removes the expired ones.
    fn sweep(&mut self, now_ms: u64, count: usize) {
        for _ in 0..count {
            if self.slots.is_empty() {
                self.cursor = 0;
                return;
            }
            if self.cursor >= self.slots.len() {
                self.cursor = 0;
            }
            if self.slots[self.cursor].expires_ms <= now_ms {
                // The last slot moves here; it is examined next.
                self.remove_at(self.cursor);
            } else {
                self.cursor += 1;
            }
        }
    }
}

/// xorshift64*: cheap, deterministic sampling for eviction. The samples need
/// no unpredictability: a caller cannot see or steer which buckets are picked.
struct Random(u64);

impl Random {
    /// Returns a number in `0..bound` (`bound` at least 1).
    fn below(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let value = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (value % bound.max(1) as u64) as usize
    }
}

fn duration_ms(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
