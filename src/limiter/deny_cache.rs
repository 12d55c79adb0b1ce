//! A local cache of buckets known to be unable to admit.
//!
//! When the store denies a call, the states of its buckets are kept here
//! with the store clock they were read at. A later call naming the same
//! buckets with the same limits is judged against those states projected to
//! now, since refill continues while they sit here. If that projection
//! still cannot pay, the call is denied without a store round trip. The moment a
//! projection could admit, the call goes to the store, so the cache never
//! denies past the time the bucket could admit again on its own.
//!
//! Only credits made elsewhere can make such a denial wrong: a refund, an
//! `is_negative_hits` credit or a promotion through another replica. Those
//! wrongful denials last at most the configured maximum age of an entry.
//! Credits made through this replica drop the entry at once, and an entry
//! is keyed on the limit too, so a call with another limit (another tier or
//! an override) never reads it. The cache never admits anything, so it
//! cannot over-admit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::bucket::{BucketParams, BucketState};
use super::judge::{BatchOutcome, BucketOp, BucketResult};
use crate::clock::Clock;

/// Entries kept at most; beyond it the cache is cleared, which only costs
/// store round trips.
const MAX_ENTRIES: usize = 65_536;

/// The cache. Disabled when its maximum age is zero.
#[derive(Debug)]
pub struct DenyCache {
    /// Local time, to age entries and project their states.
    clock: Clock,
    max_age: Duration,
    entries: Mutex<HashMap<String, Entry>>,
    /// Counts clears, so an outcome read before a clear is not learned
    /// after it.
    generation: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    params: BucketParams,
    state: BucketState,
    /// The store clock the state was read at.
    store_now_ms: u64,
    /// Local clock time the entry was cached at, in milliseconds.
    cached_at_ms: u64,
}

impl DenyCache {
    pub fn new(clock: Clock, max_age: Duration) -> Self {
        Self { clock, max_age, entries: Mutex::new(HashMap::new()), generation: AtomicU64::new(0) }
    }

    fn max_age_ms(&self) -> u64 {
        u64::try_from(self.max_age.as_millis()).unwrap_or(u64::MAX)
    }

    fn enabled(&self) -> bool {
        !self.max_age.is_zero()
    }

    /// Judges `ops` locally when every bucket is cached under the same limit
    /// and at least one enforced check cannot pay by projection. Returns the
    /// outcome the store would most likely have given, with nothing charged.
    pub fn deny_locally(&self, ops: &[BucketOp]) -> Option<BatchOutcome> {
        if !self.enabled() || ops.is_empty() {
            return None;
        }
        // Credits and reports change state, so such calls always reach the store.
        if ops.iter().any(|op| op.credit > 0 || !op.reports.is_empty()) {
            return None;
        }

        let now = self.clock.now_ms();
        let entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut projected = Vec::with_capacity(ops.len());
        let mut now_ms = 0;
        for op in ops {
            let entry = entries.get(&op.key)?;
            let elapsed = now.saturating_sub(entry.cached_at_ms);
            if entry.params != op.params || elapsed >= self.max_age_ms() {
                return None;
            }
            let entry_now = entry.store_now_ms.saturating_add(elapsed);
            now_ms = now_ms.max(entry_now);
            projected.push(entry.state);
        }
        drop(entries);

        let mut allowed = true;
        let mut buckets = Vec::with_capacity(ops.len());
        for (op, mut state) in ops.iter().zip(projected) {
            state.refill(&op.params, now_ms);
            let fits = op.check.is_none_or(|cost| state.fits(&op.params, cost));
            if op.check.is_some() && !op.shadow && !fits {
                allowed = false;
            }
            buckets.push(BucketResult { state, fits, charged: false, forgiven: 0, settlements: Vec::new() });
        }
        (!allowed).then_some(BatchOutcome { now_ms, allowed: false, buckets })
    }

    /// Returns the current generation, to pass to [`learn`](Self::learn)
    /// with the outcome of a store call that starts now.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Learns from a store outcome: a denial caches every bucket's state, an
    /// admission or a credit drops what was cached for those buckets. An
    /// outcome of a call that started before the last clear (`generation`
    /// is older) only drops entries, since it may predate the change that
    /// caused the clear.
    pub fn learn(&self, generation: u64, ops: &[BucketOp], outcome: &BatchOutcome) {
        if !self.enabled() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.generation.load(Ordering::Acquire) == generation;
        let denied = current && !outcome.allowed && ops.iter().all(|op| op.credit == 0 && op.reports.is_empty());
        if !denied {
            for op in ops {
                entries.remove(&op.key);
            }
            return;
        }
        if entries.len() + ops.len() > MAX_ENTRIES {
            entries.clear();
        }
        let cached_at_ms = self.clock.now_ms();
        for (op, result) in ops.iter().zip(&outcome.buckets) {
            let entry = Entry { params: op.params, state: result.state, store_now_ms: outcome.now_ms, cached_at_ms };
            entries.insert(op.key.clone(), entry);
        }
    }

    /// Drops every entry; for a change of limits or tiers.
    pub fn clear(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied_check(params: BucketParams) -> (Vec<BucketOp>, BatchOutcome) {
        let mut state = BucketState::full(&params, 0);
        state.charge(&params, 30);
        let op = BucketOp {
            key: "b".into(),
            params,
            check: Some(1),
            shadow: false,
            credit: 0,
            reports: Vec::new(),
            estimates: Vec::new(),
        };
        let result = BucketResult { state, fits: false, charged: false, forgiven: 0, settlements: Vec::new() };
        (vec![op], BatchOutcome { now_ms: 0, allowed: false, buckets: vec![result] })
    }

    #[test]
    fn learn_caches_a_denial_of_the_current_generation() {
        let cache = DenyCache::new(Clock::manual(0), Duration::from_secs(5));
        let (ops, outcome) = denied_check(BucketParams::new(30, 60_000, 30).expect("exact"));
        cache.learn(cache.generation(), &ops, &outcome);
        assert!(cache.deny_locally(&ops).is_some());
    }

    #[test]
    fn learn_skips_a_denial_read_before_a_clear() {
        let cache = DenyCache::new(Clock::manual(0), Duration::from_secs(5));
        let (ops, outcome) = denied_check(BucketParams::new(30, 60_000, 30).expect("exact"));
        let before = cache.generation();
        cache.clear();
        cache.learn(before, &ops, &outcome);
        assert!(cache.deny_locally(&ops).is_none(), "a denial from before an account change was cached");
    }
}
