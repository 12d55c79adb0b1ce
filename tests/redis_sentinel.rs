//! The service on a Sentinel-managed primary of throwaway servers: it
//! follows the primary through a failover without a restart, both when the
//! old primary dies and when it stays up as a replica that refuses writes.

#[path = "support/checks.rs"]
mod checks;
#[path = "support/redis.rs"]
mod redis_server;
#[path = "support/service.rs"]
mod service;

use std::time::{Duration, Instant};

use checks::{FIKRA, first_decided, requests_check, timed_call, wait_for_health};
use fikra_ratelimit::store::redis::RedisOptions;
use fikra_ratelimit::store::{RedisStore, Store};
use redis_server::RedisSentinel;
use service::{Service, limits};
use tonic_health::pb::health_check_response::ServingStatus;

/// Time from a promotion to correct answers that the service must meet.
const RECOVERY: Duration = Duration::from_secs(10);

/// Longest wait for the Sentinels to promote the replica.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(20);

async fn start_service(setup: &RedisSentinel) -> Service {
    let options = RedisOptions { store_timeout: Duration::from_secs(2), ..RedisOptions::default() };
    let store = RedisStore::connect_with(&setup.url(), &options).await.expect("connect through Sentinel");
    Service::start(limits(FIKRA), Store::Redis(store)).await
}

/// Checks used before a failover; each later check shows whether the
/// bucket survived it.
const USED: u64 = 20;

/// Sends [`USED`] checks for `api_key`, waits until the replica has them,
/// and returns when the last one was answered.
async fn use_requests(service: &Service, setup: &RedisSentinel, api_key: &str) -> Instant {
    let mut client = service.client().await;
    for _ in 0..USED {
        let answer = timed_call(&mut client, requests_check(api_key), Duration::from_secs(1)).await;
        assert!(answer.is_decided_ok(), "{answer:?}");
    }
    let used_at = Instant::now();
    let acknowledged = setup.primary().cli(&["WAIT", "1", "2000"]);
    assert_eq!(acknowledged, "1", "the replica acknowledges the writes");
    used_at
}

/// Asserts that `remaining`, answered at `now` for a key that used
/// [`USED`] of 30 units at `used_at` and then one more, reflects those
/// units: 30 per minute refill one unit per 2 s.
fn assert_bucket_kept(remaining: Option<u64>, used_at: Instant, now: Instant) {
    let remaining = remaining.expect("a remaining-requests header");
    let refilled = (now - used_at).as_secs() / 2;
    let expected = 30 - USED - 1 + refilled;
    assert!(
        (expected.saturating_sub(1)..=expected + 1).contains(&remaining),
        "remaining {remaining}, expected about {expected}: the bucket did not survive the failover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_follows_killed_primary() {
    let mut setup = RedisSentinel::start();
    let service = start_service(&setup).await;
    let channel = service.channel().await;
    wait_for_health(&channel, ServingStatus::Serving, RECOVERY).await.expect("SERVING at start");
    let used_at = use_requests(&service, &setup, "sentinel-killed").await;

    let old = setup.primary_port();
    setup.server_mut(old).kill();
    let mut client = service.client().await;
    let answer = timed_call(&mut client, requests_check("sentinel-killed"), Duration::from_millis(200)).await;
    assert!(answer.is_unavailable(), "a check while the primary is gone gets the failure mode: {answer:?}");
    wait_for_health(&channel, ServingStatus::NotServing, RECOVERY).await.expect("NOT_SERVING while the primary is gone");

    let new = tokio::task::block_in_place(|| setup.wait_for_new_primary(old, FAILOVER_TIMEOUT));
    let promoted = Instant::now();
    assert_ne!(new, old);
    let (answer, decided) =
        first_decided(&mut client, || requests_check("sentinel-killed"), RECOVERY).await.expect("a decision after the failover");
    assert!(decided - promoted <= RECOVERY, "first decision {:?} after the promotion", decided - promoted);
    assert_bucket_kept(answer.remaining_requests(), used_at, decided);
    let serving = wait_for_health(&channel, ServingStatus::Serving, RECOVERY).await.expect("SERVING after the failover");
    assert!(serving - promoted <= RECOVERY, "SERVING {:?} after the promotion", serving - promoted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_follows_demoted_primary() {
    let setup = RedisSentinel::start();
    let service = start_service(&setup).await;
    let channel = service.channel().await;
    wait_for_health(&channel, ServingStatus::Serving, RECOVERY).await.expect("SERVING at start");
    let used_at = use_requests(&service, &setup, "sentinel-demoted").await;

    // A forced failover promotes the replica and turns the old primary,
    // which stays up, into its replica.
    let old = setup.primary_port();
    let sentinel = &setup.sentinels[0];
    assert_eq!(sentinel.cli(&["SENTINEL", "FAILOVER", &setup.name]), "OK");
    let new = tokio::task::block_in_place(|| setup.wait_for_new_primary(old, FAILOVER_TIMEOUT));
    let promoted = Instant::now();

    let mut client = service.client().await;
    let (answer, decided) = first_decided(&mut client, || requests_check("sentinel-demoted"), RECOVERY)
        .await
        .expect("a decision after the failover");
    assert!(decided - promoted <= RECOVERY, "first decision {:?} after the promotion", decided - promoted);
    assert_bucket_kept(answer.remaining_requests(), used_at, decided);
    let after_failover = answer.remaining_requests().expect("a remaining-requests header");

    // Sentinel turns the old primary into a replica of the new one when it
    // next polls it, which takes up to 10 s.
    let deadline = Instant::now() + FAILOVER_TIMEOUT;
    while setup.server(old).role() != "slave" {
        assert!(Instant::now() < deadline, "the old primary did not become a replica");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = setup.server(old).cli(&["SET", "probe", "1"]);
    assert!(refused.starts_with("READONLY"), "the old primary stays up and refuses writes: {refused}");
    let answer = timed_call(&mut client, requests_check("sentinel-demoted"), Duration::from_secs(1)).await;
    let remaining = answer.remaining_requests().expect("a decision");
    assert!(
        remaining < after_failover + (decided.elapsed().as_secs() / 2) + 1,
        "checks after the demotion go to the new primary {new}: {remaining} left, {after_failover} before"
    );
    wait_for_health(&channel, ServingStatus::Serving, RECOVERY).await.expect("SERVING after the failover");
}
