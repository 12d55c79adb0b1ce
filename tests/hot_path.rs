//! The decision path makes at most one store call per check, whatever the
//! number of descriptors, and none for calls that need no state. Checks in
//! flight together share Redis commands.

#[path = "support/limiter.rs"]
mod support;
#[path = "support/redis.rs"]
mod redis;

use fikra_ratelimit::limiter::{Limiter, LimiterSettings};
use fikra_ratelimit::store::{RedisStore, Store};
use redis::RedisServer;
use support::*;

/// Starts a private Redis and a limiter on it with the LLM fixture limits.
async fn redis_limiter() -> (RedisServer, Limiter) {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect to the test redis");
    let limiter = Limiter::new(limits(include_str!("fixtures/llm.yaml")), Store::Redis(store), LimiterSettings::default());
    (server, limiter)
}

#[tokio::test]
async fn one_store_call_per_check() {
    let (server, limiter) = redis_limiter().await;

    // The first call may set up connections; count from the second.
    call(&limiter, request("llm", vec![rpm("warm-up", None)])).await;

    let shapes = [
        vec![rpm("K1", None)],
        vec![rpm("K2", None), tpm("K2", 100)],
        vec![rpm("K3", None), tpm("K3", 100), tpm("K3", 50), with_hits(desc(&[("api_key", "K3"), ("kind", "tpm"), ("phase", "report")]), 10)],
    ];
    for descriptors in shapes {
        let count = descriptors.len();
        let before = server.script_calls();
        assert!(call(&limiter, request("llm", descriptors)).await.ok());
        assert_eq!(server.script_calls() - before, 1, "a call with {count} descriptors");
    }

    let before = server.script_calls();
    call(&limiter, request("llm", vec![desc(&[("api_key", "K4"), ("kind", "other")])])).await;
    call(&limiter, request("llm-unknown", vec![rpm("K4", None)])).await;
    assert_eq!(server.script_calls() - before, 0, "calls that match no limit touch no state");
}

/// Checks that are in flight together share Redis commands, and each keeps
/// its own exact result: a hot key admits its limit and no more, and every
/// other key is charged once.
#[tokio::test]
async fn concurrent_checks_share_commands_and_stay_exact() {
    let (server, limiter) = redis_limiter().await;
    call(&limiter, request("llm", vec![rpm("warm-up", None)])).await;

    let before = server.command_calls("evalsha");
    let hot = (0..60).map(|_| call(&limiter, request("llm", vec![rpm("HOT", None)])));
    let spread = (0..60).map(|n| call(&limiter, request("llm", vec![rpm(&format!("K{n}"), None), tpm(&format!("K{n}"), 100)])));
    let (hot, spread) = futures_util::future::join(futures_util::future::join_all(hot), futures_util::future::join_all(spread)).await;
    let commands = server.command_calls("evalsha") - before;

    assert_eq!(hot.iter().filter(|call| call.ok()).count(), 30, "the hot key admits its 30 per minute");
    assert!(spread.iter().all(Call::ok), "every other key is far below its limit");
    assert!(spread.iter().all(|call| call.number("x-ratelimit-remaining-tokens") == 40_000 - 100), "each check saw its own charge");
    assert!(commands < 120, "120 checks in flight together took {commands} commands");
    for n in 0..60 {
        let again = call(&limiter, request("llm", vec![rpm(&format!("K{n}"), None)])).await;
        assert_eq!(again.number("x-ratelimit-remaining-requests"), 28, "K{n} was charged once before");
    }
}

/// A stored value the script cannot read fails that check alone; the checks
/// that shared its command are still counted.
#[tokio::test]
async fn batch_fails_only_the_unreadable_check() {
    let (server, limiter) = redis_limiter().await;
    assert!(call(&limiter, request("llm", vec![rpm("BAD", None)])).await.ok());
    let bad_hash = server.keys("*").pop().expect("the bucket hash of BAD");
    let bad_field = server.cli(&["HKEYS", &bad_hash]).trim().to_owned();
    server.cli(&["HSET", &bad_hash, &bad_field, "not-a-bucket"]);

    let before = server.command_calls("evalsha");
    let bad = try_call(&limiter, request("llm", vec![rpm("BAD", None)]));
    let good = futures_util::future::join_all((0..20).map(|n| try_call(&limiter, request("llm", vec![rpm(&format!("G{n}"), None)]))));
    let (bad, good) = futures_util::future::join(bad, good).await;
    assert!(server.command_calls("evalsha") - before < 21, "the 21 checks shared commands");

    let Err(error) = bad else { panic!("an unreadable bucket is an error") };
    let error = error.to_string();
    assert!(error.contains("unreadable bucket value"), "{error}");
    assert_eq!(server.cli(&["HGET", &bad_hash, &bad_field]).trim(), "not-a-bucket", "the failed check wrote nothing");
    for (n, result) in good.into_iter().enumerate() {
        let first = result.expect("a readable bucket is judged");
        assert!(first.ok());
        let again = call(&limiter, request("llm", vec![rpm(&format!("G{n}"), None)])).await;
        assert_eq!(again.number("x-ratelimit-remaining-requests"), 28, "G{n} was charged once before");
    }
}

/// After Redis loses its script cache, a batch is sent with the script
/// text and every check in it is judged.
#[tokio::test]
async fn batches_survive_a_flushed_script_cache() {
    let (server, limiter) = redis_limiter().await;
    call(&limiter, request("llm", vec![rpm("warm-up", None)])).await;
    server.cli(&["SCRIPT", "FLUSH"]);

    for round in 0..2 {
        let calls = futures_util::future::join_all((0..20).map(|n| try_call(&limiter, request("llm", vec![rpm(&format!("F{n}"), None)])))).await;
        for (n, result) in calls.into_iter().enumerate() {
            let call = result.expect("judged after the script cache was flushed");
            assert_eq!(call.number("x-ratelimit-remaining-requests"), 29 - round, "F{n} in round {round}");
        }
    }
}
