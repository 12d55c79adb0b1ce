use std::time::Duration;

use super::*;
use crate::limiter::judge::{BucketOp, Estimate};

const HOUR_MS: u64 = 3_600_000;

fn params(limit: u64, window_ms: u64) -> BucketParams {
    BucketParams::new(limit, window_ms, limit).expect("exact parameters")
}

fn check(key: &str, params: BucketParams, cost: u64) -> BucketOp {
    BucketOp { key: key.to_owned(), params, check: Some(cost), shadow: false, credit: 0, reports: Vec::new(), estimates: Vec::new() }
}

fn batch(ops: Vec<BucketOp>) -> Batch {
    Batch { ops, ttl_slack: Duration::from_secs(2), estimate_ttl: Duration::from_secs(600) }
}

#[test]
fn sweep_reaches_expired_entries_behind_live_ones() {
    let clock = Clock::manual(0);
    let store = MemoryStore::new(clock.clone());
    for n in 0..200 {
        store.apply(&batch(vec![check(&format!("live-{n}"), params(1, HOUR_MS), 1)]));
    }
    for n in 0..1_000 {
        store.apply(&batch(vec![check(&format!("short-{n}"), params(1, 1_000), 1)]));
    }
    assert_eq!(store.bucket_count(), 1_200);

    // The short buckets are full again after 1 s and expire after 2 s of slack.
    clock.advance_ms(10_000);
    for _ in 0..40 {
        store.apply(&batch(vec![check("probe", params(1, 1_000), 0)]));
    }
    assert_eq!(store.bucket_count(), 200, "only the hourly buckets are left");
}

#[test]
fn bucket_bound_holds_and_counts_forgiven_units() {
    let clock = Clock::manual(0);
    let store = MemoryStore::with_bounds(clock.clone(), MemoryBounds { max_buckets: 100, max_estimates: 100 });
    for n in 0..1_000 {
        let outcome = store.apply(&batch(vec![check(&format!("k{n}"), params(1, HOUR_MS), 1)]));
        assert!(outcome.allowed, "k{n} is new");
        assert!(store.bucket_count() <= 100, "{} buckets after k{n}", store.bucket_count());
        clock.advance_ms(10);
    }

    let stats = store.stats();
    assert_eq!(stats.buckets, 100);
    assert_eq!(stats.bucket_evictions, 900);
    assert_eq!(stats.forgiven_units, 900, "each evicted bucket had used its one unit");

    // The oldest buckets have refilled most, so they were evicted first and
    // come back full; the newest were kept and stay empty.
    assert!(store.apply(&batch(vec![check("k0", params(1, HOUR_MS), 1)])).allowed, "k0 was evicted");
    assert!(!store.apply(&batch(vec![check("k999", params(1, HOUR_MS), 1)])).allowed, "k999 was kept");
}

#[test]
fn eviction_prefers_least_used_buckets() {
    let clock = Clock::manual(0);
    let store = MemoryStore::with_bounds(clock.clone(), MemoryBounds { max_buckets: 100, max_estimates: 100 });
    let ten = params(10, HOUR_MS);
    for n in 0..50 {
        store.apply(&batch(vec![check(&format!("heavy-{n}"), ten, 10)]));
        store.apply(&batch(vec![check(&format!("light-{n}"), ten, 1)]));
    }
    for n in 0..50 {
        store.apply(&batch(vec![check(&format!("new-{n}"), ten, 1)]));
    }

    assert_eq!(store.bucket_evictions(), 50);
    assert_eq!(store.forgiven_units(), 50, "only buckets that had used 1 of 10 units were evicted");
    for n in 0..50 {
        let outcome = store.apply(&batch(vec![check(&format!("heavy-{n}"), ten, 1)]));
        assert!(!outcome.allowed, "heavy-{n} kept its usage");
    }
}

#[test]
fn estimate_bound_holds() {
    let clock = Clock::manual(0);
    let store = MemoryStore::with_bounds(clock.clone(), MemoryBounds { max_buckets: 100, max_estimates: 10 });
    let tokens = params(1_000_000, 60_000);
    for n in 0..100 {
        let mut op = check("tokens", tokens, 5);
        op.estimates.push(Estimate { key: format!("estimate-{n}"), amount: 5 });
        assert!(store.apply(&batch(vec![op])).allowed);
        clock.advance_ms(1);
    }

    let stats = store.stats();
    assert_eq!(stats.estimates, 10);
    assert_eq!(stats.estimate_evictions, 90);
    assert_eq!(stats.bucket_evictions, 0);
}

#[test]
fn table_keeps_index_after_removals() {
    let mut table = Table::default();
    for n in 0..10 {
        table.insert(&format!("k{n}"), n, 100 + n as u64);
    }
    table.remove("k0");
    table.remove_at(3);
    table.sweep(105, 64);

    assert_eq!(table.len(), 4, "k6 to k9 remain");
    for slot in &table.slots {
        assert_eq!(table.index[&slot.key], table.slots.iter().position(|s| s.key == slot.key).expect("present"));
        assert!(slot.expires_ms > 105);
    }
}
