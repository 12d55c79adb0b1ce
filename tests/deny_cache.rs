//! The local denial cache: hot keys over their limit are denied without a
//! store round trip, never past the moment they could admit, and wrongful
//! denials after a credit elsewhere last at most the cache's maximum age.

#[path = "support/limiter.rs"]
mod support;
#[path = "support/redis.rs"]
mod redis;

use std::time::{Duration, Instant};

use fikra_ratelimit::limiter::{Limiter, LimiterSettings};
use fikra_ratelimit::store::{RedisStore, Store};
use redis::RedisServer;
use support::*;

fn settings(max_age: Duration) -> LimiterSettings {
    LimiterSettings { deny_cache_max_age: max_age, ..LimiterSettings::default() }
}

async fn redis_limiter(server: &RedisServer, max_age: Duration) -> Limiter {
    let store = RedisStore::connect(&server.url()).await.expect("connect to the test redis");
    Limiter::new(limits(include_str!("fixtures/llm.yaml")), Store::Redis(store), settings(max_age))
}

#[tokio::test]
async fn hot_key_denials_skip_the_store() {
    let server = RedisServer::start();
    let limiter = redis_limiter(&server, Duration::from_secs(5)).await;
    for _ in 0..30 {
        assert!(call(&limiter, request("llm", vec![rpm("hot", None)])).await.ok());
    }
    let first = call(&limiter, request("llm", vec![rpm("hot", None)])).await;
    assert!(!first.ok());

    let before = server.script_calls();
    for _ in 0..200 {
        let denied = call(&limiter, request("llm", vec![rpm("hot", None)])).await;
        assert!(!denied.ok());
        assert_eq!(denied.header("x-ratelimit-remaining-requests"), Some("0"));
        assert!(denied.header("retry-after").is_some());
    }
    assert_eq!(server.script_calls() - before, 0, "no store call while the cache knows the bucket is empty");
}

#[tokio::test]
async fn cached_denial_ends_when_bucket_could_admit() {
    let (limiter, clock) = limiter_with(include_str!("fixtures/llm.yaml"), settings(Duration::from_secs(60)));
    for _ in 0..30 {
        call(&limiter, request("llm", vec![rpm("K1", None)])).await;
    }
    assert!(!call(&limiter, request("llm", vec![rpm("K1", None)])).await.ok());
    clock.advance_ms(1_999);
    assert!(!call(&limiter, request("llm", vec![rpm("K1", None)])).await.ok());
    clock.advance_ms(1);
    assert!(call(&limiter, request("llm", vec![rpm("K1", None)])).await.ok(), "one unit refilled after 2 s");
}

#[tokio::test]
async fn cache_is_keyed_on_the_limit() {
    const MINUTE: i32 = 2;
    let (limiter, _clock) = limiter_with("domain: llm\n", settings(Duration::from_secs(60)));
    let with = |limit| request("llm", vec![with_override(desc(&[("api_key", "K1")]), limit, MINUTE)]);
    assert!(call(&limiter, with(2)).await.ok());
    assert!(call(&limiter, with(2)).await.ok());
    assert!(!call(&limiter, with(2)).await.ok());
    let raised = call(&limiter, with(10)).await;
    assert!(raised.ok(), "a higher limit is judged by the store");
    assert_eq!(raised.decision.statuses[0].remaining, 7);
}

#[tokio::test]
async fn local_credit_drops_the_entry() {
    let (limiter, _clock) = limiter_with(include_str!("fixtures/llm.yaml"), settings(Duration::from_secs(60)));
    for _ in 0..30 {
        call(&limiter, request("llm", vec![rpm("K1", None)])).await;
    }
    assert!(!call(&limiter, request("llm", vec![rpm("K1", None)])).await.ok());
    let mut credit = rpm("K1", None);
    credit.negative = true;
    call(&limiter, request("llm", vec![credit])).await;
    assert!(call(&limiter, request("llm", vec![rpm("K1", None)])).await.ok());
}

#[tokio::test]
async fn credit_elsewhere_is_seen_within_max_age() {
    let server = RedisServer::start();
    let max_age = Duration::from_millis(400);
    let cached = redis_limiter(&server, max_age).await;
    let other = redis_limiter(&server, max_age).await;

    for _ in 0..30 {
        call(&cached, request("llm", vec![rpm("K1", None)])).await;
    }
    assert!(!call(&cached, request("llm", vec![rpm("K1", None)])).await.ok());

    let mut credit = with_hits(rpm("K1", None), 10);
    credit.negative = true;
    call(&other, request("llm", vec![credit])).await;
    let credited = Instant::now();
    assert!(call(&other, request("llm", vec![rpm("K1", None)])).await.ok(), "the other replica sees the credit");

    // The replica that cached the denial may deny wrongly, but only until
    // its entry is max_age old.
    loop {
        let admitted = call(&cached, request("llm", vec![rpm("K1", None)])).await.ok();
        if admitted {
            break;
        }
        assert!(credited.elapsed() < max_age + Duration::from_millis(100), "denied {:?} after a credit", credited.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
