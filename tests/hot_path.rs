//! The decision path makes exactly one store call per check, whatever the
//! number of descriptors, and none for calls that need no state.

#[path = "support/limiter.rs"]
mod support;
#[path = "support/redis.rs"]
mod redis;

use fikra_ratelimit::limiter::{Limiter, LimiterSettings};
use fikra_ratelimit::store::{RedisStore, Store};
use redis::RedisServer;
use support::*;

/// Script calls Redis has served, from `INFO commandstats`. Commands a
/// script runs inside Redis are counted there too, so the count is of the
/// round trips that matter: EVALSHA, EVAL and SCRIPT.
fn command_calls(server: &RedisServer) -> u64 {
    server
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter(|line| ["cmdstat_evalsha:", "cmdstat_eval:", "cmdstat_script"].iter().any(|name| line.starts_with(name)))
        .filter_map(|line| line.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn one_store_call_per_check() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect to the test redis");
    let limiter = Limiter::new(limits(include_str!("fixtures/llm.yaml")), Store::Redis(store), LimiterSettings::default());

    // The first call may set up connections; count from the second.
    call(&limiter, request("llm", vec![rpm("warm-up", None)])).await;

    let shapes = [
        vec![rpm("K1", None)],
        vec![rpm("K2", None), tpm("K2", 100)],
        vec![rpm("K3", None), tpm("K3", 100), tpm("K3", 50), with_hits(desc(&[("api_key", "K3"), ("kind", "tpm"), ("phase", "report")]), 10)],
    ];
    for descriptors in shapes {
        let count = descriptors.len();
        let before = command_calls(&server);
        assert!(call(&limiter, request("llm", descriptors)).await.ok());
        assert_eq!(command_calls(&server) - before, 1, "a call with {count} descriptors");
    }

    let before = command_calls(&server);
    call(&limiter, request("llm", vec![desc(&[("api_key", "K4"), ("kind", "other")])])).await;
    call(&limiter, request("llm-unknown", vec![rpm("K4", None)])).await;
    assert_eq!(command_calls(&server) - before, 0, "calls that match no limit touch no state");
}
