//! How the limiter lays buckets out in Redis. The buckets of an API key
//! whose last entry the configuration lists are fields of one hash. A value
//! the client picks names a hash of its own, so no hash grows with client
//! input.

#[path = "support/limiter.rs"]
mod support;
#[path = "support/redis.rs"]
mod redis;

use fikra_ratelimit::limiter::{Limiter, LimiterSettings};
use fikra_ratelimit::store::{RedisStore, Store};
use redis::RedisServer;
use support::*;

/// Requests and tokens meters listed by value, and a limit per model for
/// any model name the client sends.
const LAYOUT: &str = "
domain: llm
descriptors:
  - key: api_key
    descriptors:
      - key: meter
        value: requests
        rate_limit: {unit: minute, requests_per_unit: 30}
      - key: meter
        value: tokens
        meter: tokens
        rate_limit: {unit: minute, requests_per_unit: 40000}
      - key: model
        rate_limit: {unit: minute, requests_per_unit: 5}
";

async fn redis_limiter() -> (RedisServer, Limiter) {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect to the test redis");
    let limiter = Limiter::new(limits(LAYOUT), Store::Redis(store), LimiterSettings::default());
    (server, limiter)
}

/// Field counts of every hash in the server, by hash name.
fn hash_lengths(server: &RedisServer) -> Vec<(String, usize)> {
    let mut lengths: Vec<(String, usize)> = server
        .keys("*")
        .into_iter()
        .map(|key| {
            assert_eq!(server.cli(&["TYPE", &key]).trim(), "hash", "{key} holds a bucket hash");
            let length = server.cli(&["HLEN", &key]).trim().parse().expect("HLEN is a count");
            (key, length)
        })
        .collect();
    lengths.sort();
    lengths
}

#[tokio::test]
async fn client_values_name_own_hashes() {
    let (server, limiter) = redis_limiter().await;
    let meters = || vec![desc(&[("api_key", "K1"), ("meter", "requests")]), with_hits(desc(&[("api_key", "K1"), ("meter", "tokens")]), 100)];
    assert!(call(&limiter, request("llm", meters())).await.ok());

    let lengths = hash_lengths(&server);
    assert_eq!(lengths.len(), 1, "one hash for the key's meters: {lengths:?}");
    let (meter_hash, fields) = &lengths[0];
    assert_eq!(*fields, 2, "the requests and tokens buckets");
    assert!(server.pttl(meter_hash) > 0, "the hash has a TTL");

    // 300 model names of one busy key: each names its own one-field hash.
    for n in 0..300 {
        let model = format!("model-{n}");
        assert!(call(&limiter, request("llm", vec![desc(&[("api_key", "K1"), ("model", &model)])])).await.ok());
        if n % 50 == 0 {
            assert!(call(&limiter, request("llm", meters())).await.ok(), "the key stays busy");
        }
    }
    let lengths = hash_lengths(&server);
    assert_eq!(lengths.len(), 301, "a hash per model plus the meters' hash");
    assert!(lengths.iter().all(|(hash, fields)| *fields == 1 || hash == meter_hash), "{lengths:?}");
    assert_eq!(server.cli(&["HLEN", meter_hash]).trim(), "2", "the meters' hash holds only the meters");
    for (hash, _) in &lengths {
        assert!(hash.starts_with(&meter_hash[..23]), "{hash} shares the key's hash tag");
    }

    let answer = call(&limiter, request("llm", vec![desc(&[("api_key", "K1"), ("model", "model-7")])])).await;
    assert_eq!(answer.number("x-ratelimit-remaining-requests"), 3, "each model keeps its own count");
}
