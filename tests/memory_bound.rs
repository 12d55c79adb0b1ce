//! Many distinct keys on a slow limit, with the in-memory store bounded
//! below the key count. The store never contains more buckets than the
//! bound, the least used buckets are evicted and come back full, the active
//! keys keep their state, and the forgiven units are counted.

#[path = "support/limiter.rs"]
mod support;

use std::sync::Arc;

use fikra_ratelimit::clock::Clock;
use fikra_ratelimit::config;
use fikra_ratelimit::limiter::{Limiter, LimiterSettings};
use fikra_ratelimit::store::Store;
use fikra_ratelimit::store::memory::{MemoryBounds, MemoryStore};
use support::{call, desc, request};

const HOURLY: &str = "
domain: llm
descriptors:
  - key: api_key
    rate_limit: {unit: hour, requests_per_unit: 1}
";

fn bounded(max_buckets: usize) -> (Limiter, MemoryStore, Clock) {
    let domain = config::parse(HOURLY, "hourly.yaml").expect("valid");
    let limits = config::Limits { domains: [(domain.name.clone(), Arc::new(domain))].into_iter().collect() };
    let clock = Clock::manual(1_000_000);
    let store = MemoryStore::with_bounds(clock.clone(), MemoryBounds { max_buckets, max_estimates: max_buckets });
    let limiter = Limiter::new(limits, Store::Memory(store.clone()), LimiterSettings::default());
    (limiter, store, clock)
}

#[tokio::test]
async fn bounded_store_evicts_least_used() {
    let (limiter, store, clock) = bounded(500);
    for n in 1..=2_000 {
        let key = format!("K{n}");
        assert!(call(&limiter, request("llm", vec![desc(&[("api_key", &key)])])).await.ok(), "{key} is new");
        assert!(store.bucket_count() <= 500, "{} buckets after {key}", store.bucket_count());
        clock.advance_ms(100);
    }

    let stats = store.stats();
    assert_eq!(stats.buckets, 500);
    assert_eq!(stats.bucket_evictions, 1_500);
    assert_eq!(stats.forgiven_units, 1_500, "every evicted key had used its one unit");

    // The oldest key had refilled most: it was evicted and comes back full.
    assert!(call(&limiter, request("llm", vec![desc(&[("api_key", "K1")])])).await.ok(), "K1 was evicted");
    // The newest keys had used the most and kept their state.
    for n in 1_951..=2_000 {
        let key = format!("K{n}");
        assert!(!call(&limiter, request("llm", vec![desc(&[("api_key", &key)])])).await.ok(), "{key} kept its state");
    }
    assert!(call(&limiter, request("llm", vec![desc(&[("api_key", "K2001")])])).await.ok());
    assert!(store.bucket_count() <= 500);
}

#[tokio::test]
async fn store_above_key_count_keeps_every_key() {
    let (limiter, store, _clock) = bounded(3_000);
    for n in 1..=2_000 {
        let key = format!("K{n}");
        assert!(call(&limiter, request("llm", vec![desc(&[("api_key", &key)])])).await.ok(), "{key} is new");
    }
    assert!(!call(&limiter, request("llm", vec![desc(&[("api_key", "K1")])])).await.ok());
    assert!(!call(&limiter, request("llm", vec![desc(&[("api_key", "K1777")])])).await.ok());
    assert_eq!(store.stats().bucket_evictions, 0);
    assert_eq!(store.stats().forgiven_units, 0);
}
